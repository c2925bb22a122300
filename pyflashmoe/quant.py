"""Group-affine quantization in the MLX layout, and bf16 helpers (numpy API over the C core).

Layout (docs/INTERNALS.md section 2): ``w[r, c] = q[r, c] * scale[r, c // gs] + bias[r, c // gs]``;
``q`` packs each row as a little-endian bit stream into uint32 words; scales and biases are bf16
bit patterns (uint16). ``quantize`` gives the same q / scales / biases as ``mlx.core.quantize``
(scales rounded to bf16 at the end, as mlx does for bf16 input); ``dequantize`` gives the same
float32 as ``mlx.core.dequantize`` with float32 scales and biases.

Every function accepts C-contiguous arrays without copying them (others are copied once), works
on arrays with leading batch dimensions (``[..., rows, cols]``) and releases the GIL inside the C
calls, so several threads can run them at once. Bad parameters raise
:class:`pyflashmoe.errors.ArgumentError` naming the parameter.
"""
from __future__ import annotations

import concurrent.futures
import os

import numpy as np

from pyflashmoe import _core
from pyflashmoe.errors import ArgumentError

__all__ = ["quantize", "dequantize", "matvec", "f32_to_bf16", "bf16_to_f32", "simd_name",
           "simd_levels", "QMatrix", "Pool", "BITS", "GROUP_SIZES"]

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
QMatrix = _core.QMatrix
Pool = _core.Pool

_CHUNK_ELEMS = 1 << 22  # elements of w converted / quantized per C call (bounds temporaries)


def simd_name() -> str:
    """The SIMD path the kernels use: avx512, avx2, neon or scalar (FM_SIMD lowers it)."""
    return _core.simd_name()


def simd_levels() -> list[str]:
    """Every SIMD path this CPU can run (tests compare each against the scalar reference)."""
    return _core.simd_levels()


def _check_bits_gs(bits, group_size):
    if not isinstance(bits, (int, np.integer)) or int(bits) not in BITS:
        raise ArgumentError(f"bits: {bits!r} is not one of {BITS}")
    if not isinstance(group_size, (int, np.integer)) or int(group_size) not in GROUP_SIZES:
        raise ArgumentError(f"group_size: {group_size!r} is not one of {GROUP_SIZES}")
    return int(bits), int(group_size)


def _as_f32_rows(w: np.ndarray) -> np.ndarray:
    """w as float32; uint16 is taken as bf16 bits."""
    if w.dtype == np.float32:
        return np.ascontiguousarray(w)
    if w.dtype == np.uint16:
        return bf16_to_f32(w)
    if w.dtype.kind != "f":
        raise ArgumentError(f"w: dtype {w.dtype} is not a float type (or uint16 bf16 bits)")
    return np.ascontiguousarray(w, dtype=np.float32)


def _map_chunks(fn, n: int, step: int, n_threads: int):
    starts = range(0, n, step)
    if n_threads <= 1 or len(starts) <= 1:
        for s in starts:
            fn(s, min(n, s + step))
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=n_threads) as ex:
        for f in [ex.submit(fn, s, min(n, s + step)) for s in starts]:
            f.result()


def quantize(w, bits: int = 4, group_size: int = 64, *, n_threads: int = 1):
    """Quantize ``w[..., rows, cols]`` (float32, any float dtype, or uint16 bf16 bits).

    Returns ``(q uint32 [..., rows, cols*bits/32], scales uint16 [..., rows, cols/gs],
    biases uint16 [..., rows, cols/gs])``. ``n_threads > 1`` quantizes row chunks in parallel
    (<= 0: all CPUs).
    """
    bits, group_size = _check_bits_gs(bits, group_size)
    w = np.asarray(w)
    if w.ndim < 2:
        raise ArgumentError(f"w: needs at least 2 dimensions, got shape {w.shape}")
    cols = w.shape[-1]
    if cols == 0 or cols % group_size:
        raise ArgumentError(f"w: last dimension {cols} is not a positive multiple of group_size {group_size}")
    lead = w.shape[:-1]
    rows = int(np.prod(lead))
    w2 = w.reshape(rows, cols) if w.flags.c_contiguous else np.ascontiguousarray(w).reshape(rows, cols)
    q = np.empty((rows, cols * bits // 32), np.uint32)
    scales = np.empty((rows, cols // group_size), np.uint16)
    biases = np.empty((rows, cols // group_size), np.uint16)
    if n_threads <= 0:
        n_threads = os.cpu_count() or 1

    def run(r0, r1):
        _core.quantize_affine(_as_f32_rows(w2[r0:r1]), bits, group_size, q[r0:r1], scales[r0:r1],
                              biases[r0:r1])

    _map_chunks(run, rows, max(1, _CHUNK_ELEMS // cols), n_threads)
    return (q.reshape(*lead, q.shape[1]), scales.reshape(*lead, scales.shape[1]),
            biases.reshape(*lead, biases.shape[1]))


def _qsb(q, scales, biases, bits, group_size, cols):
    bits, group_size = _check_bits_gs(bits, group_size)
    q = np.ascontiguousarray(q)
    if q.dtype != np.uint32:
        raise ArgumentError(f"q: dtype {q.dtype}, expected uint32")
    if q.ndim < 2:
        raise ArgumentError(f"q: needs at least 2 dimensions, got shape {q.shape}")
    full = q.shape[-1] * 32 // bits
    if cols is None:
        cols = full
    if cols != full or cols % group_size:
        raise ArgumentError(f"cols: {cols} does not match q's last dimension {q.shape[-1]} at {bits} bits"
                            f" (or is not a multiple of group_size {group_size})")
    lead = q.shape[:-1]
    rows = int(np.prod(lead))
    out = []
    for name, a in (("scales", scales), ("biases", biases)):
        a = np.ascontiguousarray(a)
        if a.dtype != np.uint16:
            raise ArgumentError(f"{name}: dtype {a.dtype}, expected uint16 (bf16 bits)")
        if a.shape != (*lead, cols // group_size):
            raise ArgumentError(f"{name}: shape {a.shape}, expected {(*lead, cols // group_size)}")
        out.append(a.reshape(rows, cols // group_size))
    return q.reshape(rows, q.shape[-1]), out[0], out[1], bits, group_size, cols, lead, rows


def dequantize(q, scales, biases, bits: int, group_size: int, cols: int | None = None,
               *, n_threads: int = 1) -> np.ndarray:
    """float32 ``[..., rows, cols]`` from the quantized parts (bit-exact vs mlx.core.dequantize
    with float32 scales/biases). ``cols`` defaults to what ``q`` holds."""
    q2, s2, b2, bits, group_size, cols, lead, rows = _qsb(q, scales, biases, bits, group_size, cols)
    out = np.empty((rows, cols), np.float32)
    if n_threads <= 0:
        n_threads = os.cpu_count() or 1

    def run(r0, r1):
        _core.dequantize_affine(q2[r0:r1], s2[r0:r1], b2[r0:r1], bits, group_size, out[r0:r1])

    _map_chunks(run, rows, max(1, _CHUNK_ELEMS // cols), n_threads)
    return out.reshape(*lead, cols)


def matvec(q, scales, biases, x, bits: int, group_size: int = 0, *, n_threads: int = 1) -> np.ndarray:
    """``y[rows] = W x`` with the C kernel (fm_matvec). ``bits`` in 2..8: q/scales/biases as
    :func:`quantize` returns them (2-D); ``bits == 16``: ``q`` is the bf16 matrix (uint16
    ``[rows, cols]``), scales/biases ignored."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ArgumentError(f"x: must be 1-D, got shape {x.shape}")
    empty = np.empty(0, np.uint16)
    if bits == 16:
        q = np.ascontiguousarray(q)
        if q.dtype != np.uint16 or q.ndim != 2:
            raise ArgumentError(f"q: bits 16 needs a 2-D uint16 (bf16) matrix, got {q.dtype} {q.shape}")
        rows, cols = q.shape
        s2 = b2 = empty
    else:
        q2, s2, b2, bits, group_size, cols, lead, rows = _qsb(q, scales, biases, bits, group_size, None)
        if len(lead) != 1:
            raise ArgumentError(f"q: must be 2-D for matvec, got shape {np.shape(q)}")
        q = q2
        s2, b2 = s2.reshape(-1), b2.reshape(-1)
    y = np.empty(rows, np.float32)
    _core.matvec(q.reshape(-1).view(np.uint8), s2, b2, rows, cols, bits, group_size, x, y, n_threads)
    return y


def f32_to_bf16(a) -> np.ndarray:
    """bf16 bit patterns (uint16, same shape) of ``a`` rounded to nearest even; NaN stays NaN."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    out = np.empty(a.shape, np.uint16)
    if a.size:
        _core.f32_to_bf16(a.reshape(-1), out.reshape(-1))
    return out


def bf16_to_f32(a) -> np.ndarray:
    """float32 values of bf16 bit patterns (uint16 array, any shape); exact."""
    a = np.asarray(a)
    if a.dtype != np.uint16:
        raise ArgumentError(f"a: dtype {a.dtype}, expected uint16 (bf16 bits)")
    a = np.ascontiguousarray(a)
    out = np.empty(a.shape, np.float32)
    if a.size:
        _core.bf16_to_f32(a.reshape(-1), out.reshape(-1))
    return out
