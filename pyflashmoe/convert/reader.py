"""Checkpoint readers: sharded safetensors (+ index), MLX affine, FP8 block-scaled.

Owns: opening a source checkpoint directory, normalizing tensor names (multimodal prefixes,
skipped vision / MTP tensors), and reading one tensor or one slice along the first axis at a time
with pread (never a whole shard), converting bf16 / f16 / f32 / fp8 to float32 on request.
Does not own: the mapping to canonical names (pyflashmoe.models) or writing (pyflashmoe.format).
"""
from __future__ import annotations

import json
import os

import numpy as np

from pyflashmoe.errors import FormatError, ModelIOError
from pyflashmoe.format import ST_DTYPES, bf16_to_f32, pread_exact, read_st_header

SKIP_PREFIXES = ("model.visual.", "visual.", "vision_tower.", "model.vision_tower.", "mtp.",
                 "model.mtp.", "language_model.mtp.", "model.language_model.mtp.")


def normalize_name(name: str):
    """HF / MLX / multimodal tensor name -> `model.…` / `lm_head.…`, or None for skipped tensors."""
    for p in SKIP_PREFIXES:
        if name.startswith(p):
            return None
    for a, b in (("model.language_model.", "model."), ("language_model.model.", "model."),
                 ("language_model.lm_head.", "lm_head."), ("language_model.", "")):
        if name.startswith(a):
            name = b + name[len(a):]
            break
    if name.startswith("model.visual.") or ".mtp." in name:
        return None
    return name


def _fp8_e4m3_table():
    v = np.arange(256, dtype=np.uint32)
    s = np.where(v & 0x80, -1.0, 1.0)
    e = (v >> 3) & 0xF
    m = (v & 0x7).astype(np.float64)
    val = np.where(e == 0, m / 8.0 * 2.0 ** -6, (1.0 + m / 8.0) * 2.0 ** (e.astype(np.float64) - 7))
    val = s * val
    val[(v & 0x7F) == 0x7F] = np.nan
    return val.astype(np.float32)


def _fp8_e5m2_table():
    v = np.arange(256, dtype=np.uint16)
    return ((v << 8).astype(np.uint16).view(np.float16)).astype(np.float32)


FP8_TABLES = {}


def fp8_to_f32(raw, dtype):
    if dtype not in FP8_TABLES:
        FP8_TABLES[dtype] = _fp8_e4m3_table() if dtype == "F8_E4M3" else _fp8_e5m2_table()
    return FP8_TABLES[dtype][raw]


def to_f32(raw, dtype, where="tensor"):
    if dtype == "BF16":
        return bf16_to_f32(raw)
    if dtype in ("F32",):
        return np.asarray(raw, dtype=np.float32)
    if dtype in ("F16", "F64"):
        return raw.astype(np.float32)
    if dtype in ("F8_E4M3", "F8_E5M2"):
        return fp8_to_f32(raw, dtype)
    raise FormatError(f"{where}: dtype {dtype} is not a floating-point dtype")


MAX_JSON_BYTES = 64 << 20
MAX_TENSORS = 1 << 20


def _read_json_file(p):
    """A JSON file -> value; FormatError / ModelIOError naming the file, never anything else."""
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise ModelIOError(f"{p}: cannot read: {e.strerror or e}") from None
    if len(raw) > MAX_JSON_BYTES:
        raise FormatError(f"{p}: larger than {MAX_JSON_BYTES} bytes")
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise FormatError(f"{p}: not valid JSON (nested too deeply)") from None
    except ValueError as e:     # JSONDecodeError, UnicodeDecodeError, over-long integers
        raise FormatError(f"{p}: not valid JSON ({e})") from None


def _shard_path(root, fn, where):
    """A shard file name from the index must be a plain relative path inside the checkpoint."""
    ok = isinstance(fn, str) and 0 < len(fn) <= 1024 and "\0" not in fn and "\\" not in fn
    if ok:
        try:
            fn.encode("utf-8")
        except UnicodeEncodeError:
            ok = False
    if ok:
        ok = not os.path.isabs(fn) and all(x not in ("", ".", "..") for x in fn.split("/"))
    if ok:
        real, top = os.path.realpath(os.path.join(root, fn)), os.path.realpath(root)
        ok = real != top and os.path.commonpath([top, real]) == top
    if not ok:
        raise FormatError(f"{where}: {repr(fn)[:200]} is not a file name inside the checkpoint directory")
    return os.path.join(root, fn)


def check_config(config, where="config.json"):
    """Checks of the config.json fields the converter reads besides the spec (which
    pyflashmoe.models.spec_from_config checks): quantization blocks must be objects, the FP8
    weight_block_size two positive ints. FormatError naming the field."""
    from pyflashmoe.models import normalize_config
    try:
        cfg = normalize_config(config)
    except FormatError as e:
        raise FormatError(f"{where}: {str(e).split(': ', 1)[-1]}") from None
    for k in ("quantization", "quantization_config"):
        v = cfg.get(k)
        if v is not None and not isinstance(v, dict):
            raise FormatError(f"{where}: field {k!r} must be an object, got {type(v).__name__}")
    for k in ("quantization", "quantization_config"):
        q = cfg.get(k) or {}
        if q.get("mode") is not None and not isinstance(q["mode"], str):
            raise FormatError(f"{where}: field {k}.mode must be a string")
    wb = (cfg.get("quantization_config") or {}).get("weight_block_size")
    if wb is not None and not (isinstance(wb, list) and len(wb) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 1 << 16 for x in wb)):
        raise FormatError(f"{where}: field quantization_config.weight_block_size must be two positive "
                          f"integers [rows, cols], got {wb!r}"[:400])
    return cfg


class Checkpoint:
    """A source checkpoint directory: config.json + *.safetensors (optionally an index)."""

    def __init__(self, path):
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(self.path):
            raise ModelIOError(f"{self.path}: source is not a directory")
        cp = os.path.join(self.path, "config.json")
        if not os.path.isfile(cp):
            raise FormatError(f"{cp}: missing (a checkpoint directory needs config.json)")
        self.config = _read_json_file(cp)
        if not isinstance(self.config, dict):
            raise FormatError(f"{cp}: top level is not a JSON object")
        check_config(self.config, cp)
        self.generation_config = None
        gp = os.path.join(self.path, "generation_config.json")
        if os.path.isfile(gp):
            try:
                g = _read_json_file(gp)
            except (FormatError, ModelIOError):
                g = None          # optional file: an unreadable one is ignored, as before
            self.generation_config = g if isinstance(g, dict) else None
        self.files = self._shard_list()
        self.tensors = {}   # normalized name -> (file, raw name, dtype, shape, start, end)
        for fn in self.files:
            p = os.path.join(self.path, fn)
            st, _ = read_st_header(p)
            if len(self.tensors) + len(st) > MAX_TENSORS:
                raise FormatError(f"{p}: more than {MAX_TENSORS} tensors in the checkpoint")
            for raw, (dt, shape, a, b) in st.items():
                n = normalize_name(raw)
                if n is None:
                    continue
                if n in self.tensors:
                    raise FormatError(f"{p}: tensor {raw!r} also present in {self.tensors[n][0]}")
                self.tensors[n] = (p, raw, dt, shape, a, b)
        self._fds = {}

    def _shard_list(self):
        idx = os.path.join(self.path, "model.safetensors.index.json")
        if os.path.isfile(idx):
            j = _read_json_file(idx)
            wm = j.get("weight_map") if isinstance(j, dict) else None
            if not isinstance(wm, dict) or not wm:
                raise FormatError(f"{idx}: malformed: field weight_map must be a non-empty object "
                                  f"mapping tensor names to shard files")
            files = set()
            for name, fn in wm.items():
                if not isinstance(fn, str) or fn not in files:
                    _shard_path(self.path, fn, f"{idx}: field weight_map[{name!r}]")
                    files.add(fn)
            files = sorted(files)
            for fn in files:
                if not os.path.isfile(os.path.join(self.path, fn)):
                    raise FormatError(f"{idx}: field weight_map names {fn!r}, which is missing")
            return files
        try:
            files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
        except OSError as e:
            raise ModelIOError(f"{self.path}: cannot list: {e.strerror or e}") from None
        if not files:
            raise FormatError(f"{self.path}: no *.safetensors files")
        return files

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def _fd(self, p):
        fd = self._fds.get(p)
        if fd is None:
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError as e:
                raise ModelIOError(f"{p}: cannot open: {e.strerror or e}") from None
            self._fds[p] = fd
        return fd

    def has(self, name):
        return name in self.tensors

    def dtype(self, name):
        return self.tensors[name][2]

    def shape(self, name):
        return self.tensors[name][3]

    def where(self, name):
        e = self.tensors.get(name)
        return f"{e[0]}: tensor {e[1]!r}" if e else f"{self.path}: tensor {name!r}"

    def require(self, name, needed_for):
        if name not in self.tensors:
            raise FormatError(f"{self.path}: tensor {name!r} not found in any of {self.files} "
                              f"(needed for {needed_for})")

    def check_shape(self, name, shape, why=""):
        got = tuple(self.shape(name))
        if got != tuple(shape):
            raise FormatError(f"{self.where(name)}: field shape {list(got)}, expected {list(shape)}"
                              + (f" ({why})" if why else ""))

    def read_raw(self, name) -> np.ndarray:
        """The tensor's bytes as a numpy array of its storage dtype (bf16/fp8 as uint16/uint8)."""
        p, raw, dt, shape, a, b = self.tensors[name]
        buf = pread_exact(self._fd(p), b - a, a, p, f"tensor {raw!r}")
        return np.frombuffer(buf, ST_DTYPES[dt]).reshape(shape)

    def read_index0(self, name, i) -> np.ndarray:
        """Slice [i] along the first axis (one expert of a stacked tensor), raw dtype."""
        p, raw, dt, shape, a, b = self.tensors[name]
        n = int(np.prod(shape[1:], dtype=np.int64)) * ST_DTYPES[dt].itemsize
        buf = pread_exact(self._fd(p), n, a + i * n, p, f"tensor {raw!r}[{i}]")
        return np.frombuffer(buf, ST_DTYPES[dt]).reshape(shape[1:])

    def read_rows(self, name, r0, r1, index0=None) -> np.ndarray:
        """Rows [r0, r1) of a tensor (of its slice [index0] when given), raw dtype."""
        p, raw, dt, shape, a, b = self.tensors[name]
        if index0 is not None:
            shape = shape[1:]
        inner = tuple(shape[1:])
        rowb = int(np.prod(inner, dtype=np.int64)) * ST_DTYPES[dt].itemsize
        base = a + (index0 or 0) * shape[0] * rowb
        buf = pread_exact(self._fd(p), (r1 - r0) * rowb, base + r0 * rowb, p, f"tensor {raw!r} rows {r0}:{r1}")
        return np.frombuffer(buf, ST_DTYPES[dt]).reshape((r1 - r0,) + tuple(inner))

    def read_f32(self, name, index0=None) -> np.ndarray:
        raw = self.read_raw(name) if index0 is None else self.read_index0(name, index0)
        return to_f32(raw, self.dtype(name), self.where(name))
