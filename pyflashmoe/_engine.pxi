# _engine.pxi: Engine (fm_model) and Session (fm_session) handles (owned by the engine work).
#
# Engine opens a model directory; Session is one timeline (KV cache + linear-attention state).
# Every call into the forward pass runs with the GIL released. One Session must not be used by two
# threads at once (checked: a second concurrent call raises RuntimeError); sessions of one Engine
# are serialised inside the C core.
import numpy as _np
from libc.stdint cimport uint8_t
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize

_STATS_KEYS = ("n_eval_calls", "n_tokens", "bytes_read", "expert_loads", "expert_hits",
               "expert_hits_vram", "ms_total", "ms_attn", "ms_route", "ms_io_wait", "ms_expert",
               "ms_other", "last_bytes_read", "last_expert_loads", "last_expert_hits",
               "last_n_tokens", "prefetch_blocks", "prefetch_used")

# fm_debug_params (csrc/fm.h): comparison switches of the CUDA backend, as a dict for Engine(debug=...)
# and Engine.set_debug; pyflashmoe.switches maps the FM_CUDA_* environment variables onto it
DEBUG_KEYS = ("cuda_graph", "cuda_timing", "cuda_mma", "gdn_chunk", "cpu_split")


cdef _debug_update(fm_debug_params *d, debug):
    """Copy the switches of the dict `debug` into *d (types checked here, ranges by the C core)."""
    if debug is None:
        return
    if not isinstance(debug, dict):
        raise ArgumentError(f"debug must be a dict of switches ({', '.join(DEBUG_KEYS)}), got {type(debug).__name__}")
    for k, v in debug.items():
        if k not in DEBUG_KEYS:
            raise ArgumentError(f"debug: unknown switch {k!r} (known: {', '.join(DEBUG_KEYS)})")
        if k == "cpu_split":
            if isinstance(v, str) and v == "auto":
                v = -1.0
            elif isinstance(v, (bool, str)) or not isinstance(v, (int, float, _np.integer, _np.floating)):
                raise ArgumentError(f"debug.cpu_split must be 'auto' or a number (got {v!r})")
            d.cpu_split = float(v)
            continue
        if isinstance(v, bool):
            v = int(v)
        if not isinstance(v, (int, _np.integer)) or not (-2 ** 31 <= int(v) < 2 ** 31):
            raise ArgumentError(f"debug.{k} must be an integer (got {v!r})")
        if k == "cuda_graph":
            d.cuda_graph = int(v)
        elif k == "cuda_timing":
            d.cuda_timing = int(v)
        elif k == "cuda_mma":
            d.cuda_mma = int(v)
        else:
            d.gdn_chunk = int(v)


cdef dict _debug_dict(fm_debug_params d):
    return {"cuda_graph": d.cuda_graph, "cuda_timing": d.cuda_timing, "cuda_mma": d.cuda_mma,
            "gdn_chunk": d.gdn_chunk, "cpu_split": d.cpu_split}


cdef class Engine:
    """A model directory opened for inference: dense weights read into memory, expert files opened."""
    cdef fm_model *_m
    cdef readonly str path

    def __cinit__(self):
        self._m = NULL

    def __init__(self, str path, int backend=0, int n_threads=0, int io_threads=0,
                 bint direct_io=False, ram_budget=0, int experts_per_token=0, vram_budget=0,
                 bint lock_dense=True, prefetch=True, debug=None):
        """debug: a dict of comparison switches (DEBUG_KEYS; csrc/fm.h fm_debug_params), the rest
        default; a bad value raises ArgumentError naming the switch."""
        cdef fm_model_params p = fm_model_default_params()
        cdef char err[1024]
        cdef fm_status st
        cdef bytes bpath = path.encode()
        cdef const char *cpath = bpath
        if int(ram_budget) < 0:
            raise ArgumentError(f"ram_budget must be >= 0 (got {ram_budget})")
        if experts_per_token < 0:
            raise ArgumentError(f"experts_per_token must be >= 0 (got {experts_per_token})")
        p.backend = backend
        p.n_threads = n_threads
        p.io_threads = io_threads
        p.direct_io = 1 if direct_io else 0
        p.ram_budget = <uint64_t>int(ram_budget)
        if int(vram_budget) < 0:
            raise ArgumentError(f"vram_budget must be >= 0 (got {vram_budget})")
        p.vram_budget = <uint64_t>int(vram_budget)
        p.experts_per_token = experts_per_token
        if int(prefetch) < 0:
            raise ArgumentError(f"prefetch must be a bool or a count >= 0 (got {prefetch})")
        p.prefetch = <int32_t>min(int(prefetch), 1 << 30)
        p.lock_dense = 1 if lock_dense else 0
        _debug_update(&p.debug, debug)
        err[0] = 0
        with nogil:
            st = fm_model_open(&self._m, cpath, &p, err, sizeof(err))
        if st != FM_OK:
            self._m = NULL
            raise _error_from(st, err)
        self.path = path

    def __dealloc__(self):
        if self._m != NULL:
            fm_model_close(self._m)
            self._m = NULL

    cdef fm_model *_ptr(self) except NULL:
        if self._m == NULL:
            raise ArgumentError("Engine is not open")
        return self._m

    @property
    def n_vocab(self):
        return fm_model_n_vocab(self._ptr())

    @property
    def n_layers(self):
        return fm_model_n_layers(self._ptr())

    @property
    def hidden(self):
        return fm_model_hidden(self._ptr())

    @property
    def experts_per_token(self):
        return fm_model_experts_per_token(self._ptr())

    @property
    def n_experts(self):
        """Routed experts per MoE layer (0 for a model without routed experts)."""
        return fm_model_n_experts(self._ptr())

    @property
    def dense_bytes(self):
        return fm_model_dense_bytes(self._ptr())

    @property
    def dense_locked(self):
        """True when the dense weights are mlock'ed (resident whatever the expert traffic)."""
        return bool(fm_model_dense_locked(self._ptr()))

    @property
    def debug(self):
        """The comparison switches now (a dict over DEBUG_KEYS; cpu_split < 0 is auto)."""
        return _debug_dict(fm_model_debug(self._ptr()))

    def set_debug(self, debug=None, **switches):
        """Change some comparison switches (a dict and/or keywords over DEBUG_KEYS; the others keep their
        values) from the next eval on; waits for an eval running on another thread. A bad value raises
        ArgumentError naming the switch and changes nothing."""
        m = self._ptr()
        cdef fm_debug_params d = fm_model_debug(m)
        cdef char err[512]
        if debug is not None and not isinstance(debug, dict):
            raise ArgumentError(f"debug must be a dict of switches ({', '.join(DEBUG_KEYS)}), got {type(debug).__name__}")
        _debug_update(&d, {**(debug or {}), **switches})
        err[0] = 0
        cdef fm_status st
        with nogil:
            st = fm_model_set_debug(m, &d, err, sizeof(err))
        if st != FM_OK:
            raise _error_from(st, err)

    def expert_block_bytes(self, int il):
        """Bytes of one expert block of layer il (0 for a layer without routed experts)."""
        m = self._ptr()
        if il < 0 or il >= fm_model_n_layers(m):
            raise ArgumentError(f"layer index {il} out of range [0, {fm_model_n_layers(m)})")
        return fm_model_expert_block_bytes(m, il)

    def eval_batch(self, sessions, tokens):
        """One decode step of several sessions of this engine together: tokens[i] for sessions[i]
        at its own position (each advances by one); float32 logits [n, vocab], row i for
        sessions[i]. Every MoE layer reads the union of the batch's experts once. The sessions must
        be distinct Sessions of this engine; ContextFullError when one is full (nothing evaluated);
        on any other error every session of the batch is reset to position 0."""
        cdef fm_model *m = self._ptr()
        sess = list(sessions)
        cdef int32_t n = <int32_t>len(sess)
        if n < 1:
            raise ArgumentError("eval_batch: sessions is empty")
        arr = _np.asarray(tokens)
        if arr.ndim != 1 or arr.shape[0] != n:
            raise ArgumentError(f"eval_batch: tokens must be 1-D with one id per session ({n}), got shape {arr.shape}")
        if arr.dtype.kind not in "iu":
            raise ArgumentError(f"eval_batch: tokens must be integers (got dtype {arr.dtype})")
        vocab = fm_model_n_vocab(m)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            i = int(_np.nonzero(arr == bad)[0][0])
            raise ArgumentError(f"eval_batch: token id {bad} of session {i} is outside the vocabulary [0, {vocab})")
        cdef Session so
        for i, o in enumerate(sess):
            if not isinstance(o, Session):
                raise ArgumentError(f"eval_batch: sessions[{i}] is not a Session (got {type(o).__name__})")
            so = <Session>o
            if so.engine is not self:
                raise ArgumentError(f"eval_batch: sessions[{i}] belongs to another Engine")
            so._ptr()
            if so._busy:
                raise RuntimeError(f"eval_batch: sessions[{i}] is in use by another call")
        cdef int32_t[::1] tv = _np.ascontiguousarray(arr, dtype=_np.int32)
        out = _np.empty((n, vocab), dtype=_np.float32)
        cdef float[::1] ov = out.reshape(-1)
        cdef int64_t nl = ov.shape[0]
        ptrs = _np.empty(n, dtype=_np.uintp)
        for i, o in enumerate(sess):
            so = <Session>o
            ptrs[i] = <size_t>so._s
        cdef size_t[::1] pv = ptrs
        cdef char err[1024]
        cdef fm_status st
        marked = []
        try:
            for o in sess:
                so = <Session>o
                if so._busy:
                    raise ArgumentError("eval_batch: a session appears twice in sessions")
                so._busy = True
                marked.append(so)
            err[0] = 0
            with nogil:
                st = fm_session_eval_batch(<fm_session *const *>&pv[0], n, &tv[0], &ov[0], nl, err, sizeof(err))
        finally:
            for so in marked:
                so._busy = False
        if st != FM_OK:
            raise _error_from(st, err)
        return out


# no_gc_clear: when the garbage collector breaks a cycle that holds a Session (a traceback frame,
# a fixture), it must not drop the Session's reference to its Engine first: the Engine could be
# freed before the Session's C state, whose free reads the model (a use after free at exit)
@cython.no_gc_clear
cdef class Session:
    """One timeline over an Engine: KV cache for n_ctx tokens plus the recurrent state."""
    cdef fm_session *_s
    cdef readonly Engine engine
    cdef bint _busy
    cdef object _trace  # numpy buffers the C trace writes into (kept alive while set)

    def __cinit__(self):
        self._s = NULL
        self._busy = False

    def __init__(self, Engine engine, int n_ctx):
        cdef char err[1024]
        cdef fm_status st
        cdef fm_model *m = engine._ptr()
        if n_ctx < 1:
            raise ArgumentError(f"n_ctx must be >= 1 (got {n_ctx})")
        err[0] = 0
        with nogil:
            st = fm_session_new(&self._s, m, n_ctx, err, sizeof(err))
        if st != FM_OK:
            self._s = NULL
            raise _error_from(st, err)
        self.engine = engine

    def __dealloc__(self):
        if self._s != NULL:
            fm_session_free(self._s)
            self._s = NULL

    cdef fm_session *_ptr(self) except NULL:
        if self._s == NULL:
            raise ArgumentError("Session is not open")
        return self._s

    def eval(self, tokens, bint all_logits=False):
        """Evaluate tokens at positions pos..pos+n-1; return float32 logits [vocab] (last token)
        or [n, vocab] when all_logits. A non-finite hidden state or logit raises NumericalError
        naming the layer and position; after it (or any error mid-eval) the session is at pos 0."""
        cdef fm_session *s = self._ptr()
        arr = _np.asarray(tokens)
        if arr.ndim != 1:
            raise ArgumentError(f"tokens must be 1-D (got shape {arr.shape})")
        if arr.size == 0:
            raise ArgumentError("tokens is empty")
        if arr.dtype.kind not in "iu":
            raise ArgumentError(f"tokens must be integers (got dtype {arr.dtype})")
        if arr.dtype != _np.int32:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < -2**31 or hi >= 2**31:
                bad = lo if lo < -2**31 else hi
                pos = int(_np.nonzero(arr == bad)[0][0])
                raise ArgumentError(f"token id {bad} at position {pos} is outside the vocabulary "
                                    f"[0, {self.engine.n_vocab})")
        cdef int32_t[::1] tv = _np.ascontiguousarray(arr, dtype=_np.int32)
        cdef int32_t n = <int32_t>tv.shape[0]
        cdef int32_t vocab = fm_model_n_vocab(self.engine._m)
        if all_logits:
            out = _np.empty((n, vocab), dtype=_np.float32)
        else:
            out = _np.empty(vocab, dtype=_np.float32)
        cdef float[::1] ov = out.reshape(-1)
        cdef int64_t nl = ov.shape[0]
        cdef int32_t al = 1 if all_logits else 0
        cdef char err[1024]
        cdef fm_status st
        if self._busy:
            raise RuntimeError("Session.eval called concurrently from two threads")
        self._busy = True
        err[0] = 0
        try:
            with nogil:
                st = fm_session_eval(s, &tv[0], n, &ov[0], nl, al, err, sizeof(err))
        finally:
            self._busy = False
        if st != FM_OK:
            raise _error_from(st, err)
        return out

    def reset(self):
        """Empty the KV cache (the rows written are zeroed) and the recurrent state (pos back to 0)."""
        cdef fm_session *s = self._ptr()
        if self._busy:
            raise RuntimeError("Session.reset called while eval runs")
        with nogil:
            fm_session_reset(s)

    @property
    def pos(self):
        return fm_session_pos(self._ptr())

    @property
    def n_ctx(self):
        return fm_session_n_ctx(self._ptr())

    def stats(self):
        """Cumulative counters and per-phase milliseconds (keys = fm_stats field names)."""
        cdef fm_stats st
        fm_session_get_stats(self._ptr(), &st)
        return {"n_eval_calls": st.n_eval_calls, "n_tokens": st.n_tokens,
                "bytes_read": st.bytes_read, "expert_loads": st.expert_loads,
                "expert_hits": st.expert_hits, "expert_hits_vram": st.expert_hits_vram,
                "ms_total": st.ms_total, "ms_attn": st.ms_attn, "ms_route": st.ms_route,
                "ms_io_wait": st.ms_io_wait, "ms_expert": st.ms_expert, "ms_other": st.ms_other,
                "last_bytes_read": st.last_bytes_read, "last_expert_loads": st.last_expert_loads,
                "last_expert_hits": st.last_expert_hits, "last_n_tokens": st.last_n_tokens,
                "prefetch_blocks": st.prefetch_blocks, "prefetch_used": st.prefetch_used}

    def reset_stats(self):
        fm_session_reset_stats(self._ptr())

    def state_size(self):
        """Bytes save_state() returns now (it grows with pos)."""
        cdef uint64_t n = 0
        fm_session_state_size(self._ptr(), &n)
        return int(n)

    def save_state(self, into=None):
        """The session's state at its position (KV rows [0, pos), conv and recurrent states, pos)
        as bytes: a snapshot load_state() restores into any session of the same model (either
        backend) with n_ctx >= pos. See csrc/fm.h fm_session_state_save for the format.
        into: a writable contiguous buffer of at least state_size() bytes (e.g. an anonymous
        mmap, whose memory goes back to the system when it is closed) receives the snapshot
        instead; the bytes written are returned."""
        cdef fm_session *s = self._ptr()
        cdef uint64_t n = 0, written = 0
        cdef char err[1024]
        cdef fm_status st
        cdef char *p
        cdef uint8_t[::1] w
        if into is not None:
            try:
                w = memoryview(into).cast("B")
            except (TypeError, ValueError) as e:
                raise ArgumentError(f"save_state: into must be a writable contiguous buffer ({e})") from None
        if self._busy:
            raise RuntimeError("Session.save_state called while eval runs")
        self._busy = True
        out = None
        try:
            fm_session_state_size(s, &n)
            if into is None:
                out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>n)
                p = PyBytes_AS_STRING(out)
            else:
                if <uint64_t>w.shape[0] < n:
                    raise ArgumentError(f"save_state: into holds {w.shape[0]} bytes, the state needs {n}")
                p = <char *>&w[0]
            err[0] = 0
            with nogil:
                st = fm_session_state_save(s, p, n, &written, err, sizeof(err))
        finally:
            self._busy = False
        if st != FM_OK:
            raise _error_from(st, err)
        return out if into is None else int(written)

    def load_state(self, buf):
        """Replace the session's state and position with a snapshot from save_state() (bytes or
        any contiguous byte buffer). FormatError naming what differs for a snapshot of another
        model or a truncated / damaged buffer, ContextFullError when it holds more tokens than
        n_ctx; the session is unchanged on either."""
        cdef fm_session *s = self._ptr()
        cdef const uint8_t[::1] v
        try:
            v = memoryview(buf).cast("B")
        except (TypeError, ValueError) as e:
            raise ArgumentError(f"load_state: buf must be a contiguous bytes-like object ({e})") from None
        cdef uint8_t dummy = 0
        cdef const uint8_t *p = &dummy
        cdef uint64_t n = <uint64_t>v.shape[0]
        if n > 0:
            p = &v[0]
        cdef char err[1024]
        cdef fm_status st
        if self._busy:
            raise RuntimeError("Session.load_state called while eval runs")
        self._busy = True
        err[0] = 0
        try:
            with nogil:
                st = fm_session_state_load(s, p, n, err, sizeof(err))
        finally:
            self._busy = False
        if st != FM_OK:
            raise _error_from(st, err)

    def set_trace(self, int cap_tokens=0, bint counts=True, bint layer_ms=True):
        """Record the routing of every token evaluated from now on (CPU backend only; the CUDA
        backend raises BackendError). cap_tokens > 0 keeps the K expert ids per layer of the first
        cap_tokens tokens; counts keeps per-layer pick counts (all tokens); layer_ms keeps per-layer
        token-mixer and FFN milliseconds. Replaces (and zeroes) any previous trace; read it with
        trace(), stop with clear_trace(). Off by default, and free when off."""
        cdef fm_session *s = self._ptr()
        if cap_tokens < 0:
            raise ArgumentError(f"cap_tokens must be >= 0 (got {cap_tokens})")
        if self._busy:
            raise RuntimeError("Session.set_trace called while eval runs")
        cdef fm_model *m = self.engine._ptr()
        cdef int32_t NL = fm_model_n_layers(m), K = fm_model_experts_per_token(m)
        cdef int32_t E = fm_model_n_experts(m)
        bufs = {"ids": _np.full((cap_tokens, NL, max(K, 1)), -1, dtype=_np.int32) if cap_tokens else None,
                "counts": _np.zeros((NL, max(E, 1)), dtype=_np.int64) if counts else None,
                "layer_ms": _np.zeros((NL, 2), dtype=_np.float64) if layer_ms else None}
        cdef fm_trace t
        t.ids = NULL
        t.cap_tokens = cap_tokens
        t.counts = NULL
        t.layer_ms = NULL
        cdef int32_t[:, :, ::1] iv
        cdef int64_t[:, ::1] cv
        cdef double[:, ::1] lv
        if bufs["ids"] is not None:
            iv = bufs["ids"]
            t.ids = &iv[0, 0, 0]
        if bufs["counts"] is not None:
            cv = bufs["counts"]
            t.counts = &cv[0, 0]
        if bufs["layer_ms"] is not None:
            lv = bufs["layer_ms"]
            t.layer_ms = &lv[0, 0]
        cdef char err[1024]
        err[0] = 0
        cdef fm_status st = fm_session_set_trace(s, &t, err, sizeof(err))
        if st != FM_OK:
            raise _error_from(st, err)
        self._trace = bufs

    def clear_trace(self):
        """Stop recording; returns the last trace() (None when no trace was set)."""
        cdef fm_session *s = self._ptr()
        if self._busy:
            raise RuntimeError("Session.clear_trace called while eval runs")
        out = self.trace()
        cdef char err[1024]
        err[0] = 0
        fm_session_set_trace(s, NULL, err, sizeof(err))
        self._trace = None
        return out

    def trace(self):
        """The routing trace since set_trace: {"n_tokens": tokens evaluated, "ids": int32
        [min(n_tokens, cap_tokens), n_layers, K] (expert ids by descending router probability; -1
        for a layer without routed experts) or None, "counts": int64 [n_layers, n_experts] or None,
        "layer_ms": float64 [n_layers, 2] (token mixer, FFN) or None}; copies. None when off."""
        if self._trace is None:
            return None
        n = int(fm_session_trace_tokens(self._ptr()))
        ids = self._trace["ids"]
        return {"n_tokens": n,
                "ids": None if ids is None else ids[:min(n, ids.shape[0])].copy(),
                "counts": None if self._trace["counts"] is None else self._trace["counts"].copy(),
                "layer_ms": None if self._trace["layer_ms"] is None else self._trace["layer_ms"].copy()}
