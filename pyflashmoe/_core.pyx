# cython: language_level=3
"""pyflashmoe._core: the Cython boundary over csrc/fm.h.

Owns C handles and passes caller-owned buffers; releases the GIL around every call that does I/O or
compute. One .pxi per area keeps the pieces apart: _quant.pxi (quantizer, kernels), _engine.pxi
(model and session), _ops.pxi (test entry points of the model-feature ops).
"""
cimport cython
from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t, uint64_t
from pyflashmoe._fm cimport *

from pyflashmoe.errors import (ArgumentError, BackendError, ContextFullError, FlashMoEError,
                               FormatError, ModelIOError, NumericalError)


cdef object _error_from(fm_status st, const char *err):
    msg = err.decode("utf-8", "replace")
    if st == FM_ERR_ARG:
        return ArgumentError(msg)
    if st == FM_ERR_IO:
        return ModelIOError(msg)
    if st == FM_ERR_FORMAT:
        return FormatError(msg)
    if st == FM_ERR_OOM:
        return MemoryError(msg)
    if st == FM_ERR_BACKEND:
        return BackendError(msg)
    if st == FM_ERR_CTX_FULL:
        return ContextFullError(msg)
    if st == FM_ERR_NUMERIC:
        return NumericalError(msg)
    return FlashMoEError(f"status {int(st)}: {msg}")


def simd_name():
    """The SIMD path the kernels use on this CPU: avx512, avx2, neon or scalar."""
    return fm_simd_name().decode()


include "_quant.pxi"
include "_engine.pxi"
include "_cuda.pxi"
include "_ops.pxi"
