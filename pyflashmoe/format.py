"""The model directory: the one definition of its layout (write, read, validate, verify, info).

Owns: docs/INTERNALS.md section 3. The manifest `pyflashmoe.json`, `dense.safetensors` (every
non-expert tensor, each tensor's data 64-byte aligned by U8 padding tensors named `__pad__.N`),
`experts/L{il:03d}.safetensors` (one U8 tensor "experts" [n_experts, block_bytes], header padded
so the data starts at 4096, block_bytes a multiple of 4096, parts 64-aligned inside a block), the
atomic directory writer, and numpy readers used by tests and tools. Does not own: how tensors are
produced (pyflashmoe.convert) or how the C core maps them (csrc).

Every error is a FormatError / ModelIOError naming the file and the field.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import struct
import tempfile
import zlib

import numpy as np

from pyflashmoe.errors import ArgumentError, FormatError, ModelIOError

MANIFEST = "pyflashmoe.json"
FORMAT_NAME = "pyflashmoe"
FORMAT_VERSION = 1
DENSE_FILE = "dense.safetensors"
PAGE = 4096
PART_ALIGN = 64
DENSE_ALIGN = 64

# safetensors dtype -> (numpy dtype used to hold the raw bytes, itemsize)
ST_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("u1"), "F8_E4M3": np.dtype("u1"), "F8_E5M2": np.dtype("u1"),
}
MANIFEST_DTYPE = {"bf16": "BF16", "f32": "F32"}


def align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


# ---- bf16 -------------------------------------------------------------------------------------

def f32_to_bf16(x) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even; NaN stays NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    r = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        r[nan] = 0x7FC0
    return r


def bf16_to_f32(b) -> np.ndarray:
    b = np.ascontiguousarray(b, dtype=np.uint16)
    return (b.astype(np.uint32) << np.uint32(16)).view(np.float32)


# ---- group-affine reference (numpy; the MLX layout of docs/INTERNALS.md section 2) -------------

def affine_sizes(shape, bits, group_size):
    out, inn = shape
    return {"q": out * inn * bits // 32 * 4, "scales": out * (inn // group_size) * 2,
            "biases": out * (inn // group_size) * 2}


def unpack_affine(q, bits, cols) -> np.ndarray:
    """Unpack uint32 rows [rows, cols*bits/32] into integer values [rows, cols] (little-endian bit stream)."""
    q = np.ascontiguousarray(q, dtype="<u4")
    rows = q.shape[0]
    by = q.view(np.uint8).reshape(rows, -1)
    bitsarr = np.unpackbits(by, axis=1, bitorder="little")[:, :cols * bits]
    bitsarr = bitsarr.reshape(rows, cols, bits).astype(np.uint32)
    return (bitsarr << np.arange(bits, dtype=np.uint32)).sum(axis=2).astype(np.uint32)


def dequantize_affine(q, scales, biases, bits, group_size) -> np.ndarray:
    """w[r, c] = q[r, c] * scale[r, c // gs] + bias[r, c // gs], float32."""
    s = bf16_to_f32(scales)
    b = bf16_to_f32(biases)
    cols = s.shape[1] * group_size
    v = unpack_affine(q, bits, cols).astype(np.float32)
    return v * np.repeat(s, group_size, axis=1) + np.repeat(b, group_size, axis=1)


# ---- safetensors writing -----------------------------------------------------------------------

class HashingFile:
    """A file opened for writing that hashes every byte it writes (sha256) and counts them.

    Hashing and writing run on two background threads (both release the GIL), each fed in order
    through a bounded queue, so they overlap each other and the caller's work; memory held is at
    most `depth` chunks per queue. An error on either thread is raised by the next write / close.
    """

    _STOP = object()

    def __init__(self, path, depth=8):
        import queue
        import threading
        self.path = path
        self.f = open(path, "wb")
        self.h = hashlib.sha256()
        self.n = 0
        self._err = None
        self._qs = [queue.Queue(depth), queue.Queue(depth)]
        self._ts = [threading.Thread(target=self._run, args=(self._qs[0], self.h.update), daemon=True),
                    threading.Thread(target=self._run, args=(self._qs[1], self.f.write), daemon=True)]
        for t in self._ts:
            t.start()

    def _run(self, q, fn):
        while True:
            b = q.get()
            if b is self._STOP:
                return
            if self._err is None:
                try:
                    fn(b)
                except BaseException as e:  # surfaced on the caller's thread
                    self._err = e

    def _raise(self):
        if self._err is not None:
            e, self._err = self._err, None
            raise e

    def write(self, b):
        self._raise()
        b = bytes(memoryview(b).cast("B"))     # immutable copy: the caller may reuse its buffer
        for q in self._qs:
            q.put(b)
        self.n += len(b)

    def pad_to(self, n):
        if n > self.n:
            self.write(b"\0" * (n - self.n))

    def _join(self):
        for q in self._qs:
            q.put(self._STOP)
        for t in self._ts:
            t.join()

    def abort(self):
        self._join()
        self.f.close()

    def close(self, fsync=True):
        self._join()
        try:
            self._raise()
            self.f.flush()
            if fsync:
                os.fsync(self.f.fileno())
        finally:
            self.f.close()
        return {"size": self.n, "sha256": self.h.hexdigest()}


def _st_header(entries, metadata, data_align):
    """entries: [(name, st_dtype, shape, nbytes)] -> (header bytes padded, {name: data offset})."""
    hdr = {}
    if metadata:
        hdr["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    pos, offs, npad = 0, {}, 0
    for name, dt, shape, nbytes in entries:
        a = align(pos, DENSE_ALIGN)
        if a != pos:
            hdr[f"__pad__.{npad}"] = {"dtype": "U8", "shape": [a - pos], "data_offsets": [pos, a]}
            npad += 1
            pos = a
        hdr[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offs[name] = pos
        pos += nbytes
    raw = json.dumps(hdr, separators=(",", ":")).encode()
    total = align(8 + len(raw), data_align)
    raw = raw + b" " * (total - 8 - len(raw))
    return struct.pack("<Q", len(raw)) + raw, offs, pos


class SafetensorsWriter:
    """Stream a safetensors file whose tensor list is known up front; data written in list order.

    Each tensor's data starts at a multiple of 64 from the data start (padding tensors fill the
    gaps, so the file stays valid safetensors), and the data start is a multiple of `data_align`.
    """

    def __init__(self, path, entries, metadata=None, data_align=DENSE_ALIGN):
        self.entries = [(n, dt, tuple(int(s) for s in shape), int(nb)) for n, dt, shape, nb in entries]
        header, offs, self.data_len = _st_header(self.entries, metadata, data_align)
        self.data_start = len(header)
        self.offsets = {n: self.data_start + o for n, o in offs.items()}
        self.sizes = {n: nb for n, _, _, nb in self.entries}
        self.f = HashingFile(path)
        self.f.write(header)
        self._next = 0

    def write(self, name, arr):
        self.write_chunks(name, (arr,))

    def write_chunks(self, name, chunks):
        """Write tensor `name` from an iterable of arrays whose bytes, concatenated, are its data."""
        exp = self.entries[self._next]
        if exp[0] != name:
            raise AssertionError(f"SafetensorsWriter: wrote {name!r}, expected {exp[0]!r}")
        self.f.pad_to(self.offsets[name])
        start = self.f.n
        for a in chunks:
            self.f.write(np.ascontiguousarray(a).view(np.uint8).reshape(-1))
        if self.f.n - start != exp[3]:
            raise AssertionError(f"SafetensorsWriter: {name!r} has {self.f.n - start} bytes, expected {exp[3]}")
        self._next += 1

    def abort(self):
        self.f.abort()

    def close(self):
        if self._next != len(self.entries):
            raise AssertionError(f"SafetensorsWriter: {len(self.entries) - self._next} tensors not written")
        self.f.pad_to(self.data_start + self.data_len)
        return self.f.close()


def expert_file_header(n_experts, block_bytes):
    """The safetensors header of an expert file, padded so the data starts at 4096."""
    hdr, _, _ = _st_header([("experts", "U8", (n_experts, block_bytes), n_experts * block_bytes)],
                           {"format": FORMAT_NAME}, PAGE)
    return hdr


def expert_block_layout(parts):
    """parts: [(name, {"dtype": "bf16"|"affine", "shape": [o, i], "bits", "group_size"})] in block order.

    Returns (layout dict for the manifest, block_bytes): every sub-array starts at a multiple of 64;
    the block is rounded up to 4096.
    """
    pos, layout = 0, {}
    for name, d in parts:
        e = dict(d)
        if d["dtype"] == "affine":
            sz = affine_sizes(d["shape"], d["bits"], d["group_size"])
            for k in ("q", "scales", "biases"):
                pos = align(pos, PART_ALIGN)
                e[k] = [pos, sz[k]]
                pos += sz[k]
        else:
            nb = d["shape"][0] * d["shape"][1] * (2 if d["dtype"] == "bf16" else 4)
            pos = align(pos, PART_ALIGN)
            e["data"] = [pos, nb]
            pos += nb
        layout[name] = e
    return layout, align(max(pos, 1), PAGE)


# ---- atomic output directory -------------------------------------------------------------------
#
# Guarantees of AtomicDir (`convert`, `synth`; docs/INTERNALS.md section 3):
# * A new DST appears by one rename of a finished temporary dir (manifest written last), so an
#   interrupted write, even SIGKILL, never leaves a loadable but incomplete DST.
# * Replacing DST (--force) swaps the finished dir with DST in one step where the OS and the
#   filesystem can exchange two directories: Linux renameat2(RENAME_EXCHANGE) (ext4, xfs, btrfs,
#   tmpfs, f2fs, overlayfs, ...) and macOS renamex_np(RENAME_SWAP) (APFS). There one complete
#   model (the old, then the new) is at DST at every moment; the old one, now under the temporary
#   name, is deleted afterwards (by the next run on DST if this one dies first).
# * Elsewhere (NFS, FUSE, older ZFS, other OSes) DST is renamed to `.NAME.old-PID-XXXXXXXX`, then
#   the new dir to DST. A crash between those two renames leaves no DST until the next
#   AtomicDir on DST (convert / synth) or `recover_replaced(DST)` (the model-dir reader calls it
#   when DST is missing) renames the old dir back: the old model, complete, is restored.
# * Leftovers of dead processes are deleted by the next AtomicDir on DST: temporary dirs always,
#   `.old-` dirs only once DST exists again (never the only copy of the old model).

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2                 # linux/fs.h
_RENAME_SWAP = 0x2                   # darwin sys/stdio.h
# renameat2 syscall numbers, used only when libc has no renameat2 wrapper (glibc < 2.28, musl)
_NR_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "i386": 353, "i686": 353, "aarch64": 276,
                 "arm64": 276, "riscv64": 276, "loongarch64": 276, "armv7l": 382, "armv6l": 382,
                 "ppc64le": 357, "ppc64": 357, "s390x": 347}
_swap_impl_cache = []


def _swap_impl():
    """-> callable(a: bytes, b: bytes) -> int (0 or -1 with errno set), or None."""
    if not _swap_impl_cache:
        fn = None
        try:
            import ctypes
            import platform
            import sys
            libc = ctypes.CDLL(None, use_errno=True)
            if sys.platform.startswith("linux"):
                f = getattr(libc, "renameat2", None)
                if f is not None:
                    f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                                  ctypes.c_uint]
                    f.restype = ctypes.c_int

                    def fn(a, b, f=f):
                        return f(_AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE)
                elif platform.machine() in _NR_RENAMEAT2:
                    sc, nr = libc.syscall, _NR_RENAMEAT2[platform.machine()]
                    sc.restype = ctypes.c_long

                    def fn(a, b, sc=sc, nr=nr):
                        return sc(ctypes.c_long(nr), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(a),
                                  ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(b),
                                  ctypes.c_uint(_RENAME_EXCHANGE))
            elif sys.platform == "darwin":
                f = getattr(libc, "renamex_np", None)
                if f is not None:
                    f.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
                    f.restype = ctypes.c_int

                    def fn(a, b, f=f):
                        return f(a, b, _RENAME_SWAP)
        except (OSError, AttributeError, TypeError):   # no loadable C library (e.g. Windows)
            fn = None
        _swap_impl_cache.append(fn)
    return _swap_impl_cache[0]


def exchange_dirs(a, b) -> bool:
    """Atomically swap the directory entries `a` and `b` (both exist, same filesystem).

    True when swapped; False when this OS or filesystem cannot (nothing was changed); OSError
    for any other failure (nothing was changed either).
    """
    import ctypes
    import errno
    fn = _swap_impl()
    if fn is None:
        return False
    if fn(os.fsencode(a), os.fsencode(b)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False      # no such call / flag here (EPERM: a seccomp filter that blocks it)
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_tree(path):
    """Delete a leftover dir (or a symlink that stood at DST: the link only, never its target)."""
    if os.path.islink(path):
        try:
            os.unlink(path)
        except OSError:
            pass
    else:
        shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid) -> bool:
    if pid == os.getpid():
        return False      # our own leftover from an earlier failed attempt
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        pass
    return True


def _leftovers(parent, base):
    """[(kind 'tmp'|'old', pid, path)] of the hidden dirs AtomicDir makes beside DST=parent/base."""
    import re
    pat = re.compile(r"\." + re.escape(base) + r"\.(tmp|old)-(\d+)-[A-Za-z0-9_]+")
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    out = []
    for n in names:
        m = pat.fullmatch(n)
        if m:
            out.append((m.group(1), int(m.group(2)), os.path.join(parent, n)))
    return out


def recover_replaced(dst) -> bool:
    """If DST is missing because a replace died between its two renames (the fallback without an
    atomic exchange), move the previous dir back from `.NAME.old-PID-*`. True when restored."""
    dst = os.path.abspath(os.fspath(dst))
    if os.path.lexists(dst):
        return False
    parent, base = os.path.split(dst)
    olds = []
    for kind, pid, p in _leftovers(parent, base):
        if kind == "old" and not _pid_alive(pid) and os.path.isdir(p) and not os.path.islink(p):
            try:
                olds.append((os.stat(p).st_mtime_ns, p))
            except OSError:
                pass
    for _, p in sorted(olds, reverse=True):   # one in practice; the newest if several
        try:
            os.rename(p, dst)
        except OSError:
            if os.path.lexists(dst):          # someone else restored it first
                return False
            continue
        _fsync_dir(parent)
        return True
    return False


def is_model_dir(path) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


class AtomicDir:
    """Write a directory atomically: into `.NAME.tmp-PID-XXXX` beside DST, fsync, then rename it to
    DST, or exchange it with an existing DST (--force). See the guarantees above.

    The temporary name is never the destination and the manifest is written last, so an
    interrupted write (even SIGKILL) leaves nothing at DST that loads, and an interrupted replace
    leaves the old model at DST (or, without an atomic exchange, where the next run restores it).
    """

    def __init__(self, dst, force=False):
        self.dst = os.path.abspath(os.fspath(dst))
        self.force = force
        self.tmp = None

    def check(self):
        """Fail early (before any work) when DST cannot be written. Restores a DST that a replace
        killed between its two renames left aside (the fallback without an atomic exchange)."""
        dst, parent = self.dst, os.path.dirname(self.dst)
        recover_replaced(dst)
        if os.path.lexists(dst):
            if not self.force:
                raise ArgumentError(f"{dst}: destination exists; pass --force to replace it")
            if not os.path.isdir(dst) or (os.listdir(dst) and not is_model_dir(dst)):
                raise ArgumentError(f"{dst}: destination exists and is not a pyflashmoe model dir "
                                    f"(no {MANIFEST}); refusing to replace it even with --force")
        if not os.path.isdir(parent):
            raise ModelIOError(f"{dst}: parent directory {parent} does not exist")

    def __enter__(self):
        dst, parent = self.dst, os.path.dirname(self.dst)
        self.check()
        self._clean_stale(dst)
        try:
            self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-{os.getpid()}-", dir=parent)
        except OSError as e:
            raise ModelIOError(f"{dst}: cannot create the output directory in {parent}: "
                               f"{e.strerror or e}") from None
        return self.tmp

    @staticmethod
    def _clean_stale(dst):
        """Delete the leftovers of dead processes: temporary dirs, and `.old-` dirs once DST
        exists (before that, an `.old-` dir may hold the only copy of the previous model)."""
        parent, base = os.path.split(dst)
        have_dst = os.path.lexists(dst)
        for kind, pid, p in _leftovers(parent, base):
            if (kind == "tmp" or have_dst) and not _pid_alive(pid):
                _remove_tree(p)

    def __exit__(self, et, ev, tb):
        if et is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        _fsync_dir(self.tmp)
        for sub in ("experts",):
            if os.path.isdir(os.path.join(self.tmp, sub)):
                _fsync_dir(os.path.join(self.tmp, sub))
        parent = os.path.dirname(self.dst)
        try:
            if os.path.lexists(self.dst):
                self._replace(parent)
            else:
                os.rename(self.tmp, self.dst)
                _fsync_dir(parent)
        except OSError as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise ModelIOError(f"{self.dst}: cannot move the finished output into place: "
                               f"{e.strerror or e}") from None
        return False

    def _replace(self, parent):
        if exchange_dirs(self.tmp, self.dst):
            _fsync_dir(parent)         # the swap is durable before the old model is deleted
            _remove_tree(self.tmp)     # the old model, now under the temporary name
            return
        # no atomic exchange here: move DST aside, then the new dir in (see recover_replaced)
        old = os.path.join(parent, f".{os.path.basename(self.dst)}.old-{os.getpid()}-"
                                   f"{os.urandom(4).hex()}")
        os.rename(self.dst, old)
        try:
            os.rename(self.tmp, self.dst)
        except OSError:
            os.rename(old, self.dst)
            raise
        _fsync_dir(parent)
        _remove_tree(old)


MANIFEST_DIGEST = "manifest_sha256"
MANIFEST_MAX_BYTES = 64 << 20          # a 1024-layer manifest is a few MB
ST_HEADER_MAX_BYTES = 100 << 20        # safetensors' own limit is 100 MB
MAX_FILES = 8192
MAX_BLOCK_BYTES = 1 << 34


def manifest_digest(manifest: dict) -> str:
    """sha256 of the canonical JSON of the manifest without its `manifest_sha256` field."""
    m = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    return hashlib.sha256(json.dumps(m, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(dirpath, manifest):
    """Write pyflashmoe.json with its digest (field manifest_sha256, checked by verify)."""
    p = os.path.join(dirpath, MANIFEST)
    m = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    m[MANIFEST_DIGEST] = manifest_digest(m)
    data = json.dumps(m, indent=1, sort_keys=False).encode()
    with open(p, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# ---- reading and validation -------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _desc(v) -> str:
    try:
        r = repr(v)
    except (ValueError, RecursionError):    # e.g. an int too long for repr
        r = f"<{type(v).__name__}>"
    return r if len(r) <= 80 else r[:77] + "..."


def read_json_file(p, what="file", max_bytes=MANIFEST_MAX_BYTES):
    """A JSON file -> value, None when it does not exist; FormatError / ModelIOError otherwise."""
    try:
        with open(p, "rb") as f:
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ModelIOError(f"{p}: cannot read ({what}): {e.strerror or e}") from None
    if len(raw) > max_bytes:
        raise FormatError(f"{p}: larger than {max_bytes} bytes ({what})")
    return _json_loads(raw, p)


def _json_loads(raw: bytes, where: str):
    """json.loads that raises only FormatError (bad UTF-8, bad JSON, nesting, huge ints)."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{where}: invalid JSON ({e})") from None
    except RecursionError:
        raise FormatError(f"{where}: invalid JSON (nested too deeply)") from None
    except ValueError as e:       # e.g. an integer with more than 4300 digits
        raise FormatError(f"{where}: invalid JSON ({e})") from None


class _StrictJSONError(ValueError):
    pass


def _no_dup_keys(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise _StrictJSONError(f"duplicate key {_desc(k)} in object")
        d[k] = v
    return d


def _no_constant(s):
    raise _StrictJSONError(f"{s} is not a JSON number")


def _finite_float(s):
    v = float(s)
    if math.isinf(v):
        raise _StrictJSONError(f"number {s[:40]} out of range")
    return v


def _double_int(s):
    v = int(s)
    if abs(v) > 1.7976931348623157e308:       # exact int/float comparison: a double would be inf
        raise _StrictJSONError(f"number {s[:40]}... out of range")
    return v


JSON_MAX_DEPTH = 256


def _json_loads_strict(raw: bytes, where: str):
    """The manifest's JSON, read as strictly as the C core's parser (csrc/fm_json.c) reads it, so
    that the two never disagree: no duplicate keys, no NaN / Infinity, no number that overflows a
    double, no unpaired surrogate escape, nesting at most 256 deep."""
    try:
        v = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_dup_keys, parse_constant=_no_constant,
                       parse_float=_finite_float, parse_int=_double_int)
    except _StrictJSONError as e:
        raise FormatError(f"{where}: invalid JSON ({e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{where}: invalid JSON ({e})") from None
    except RecursionError:
        raise FormatError(f"{where}: invalid JSON (nested too deeply)") from None
    except ValueError as e:
        raise FormatError(f"{where}: invalid JSON ({e})") from None
    todo = [(v, 1)] if isinstance(v, (dict, list)) else []
    while todo:
        x, dpt = todo.pop()
        if dpt > JSON_MAX_DEPTH:
            raise FormatError(f"{where}: invalid JSON (nesting deeper than {JSON_MAX_DEPTH})")
        items = x.values() if isinstance(x, dict) else x
        if items and dpt >= JSON_MAX_DEPTH:        # a value of any kind one level deeper
            raise FormatError(f"{where}: invalid JSON (nesting deeper than {JSON_MAX_DEPTH})")
        for c in items:
            if isinstance(c, (dict, list)):
                todo.append((c, dpt + 1))
    try:
        json.dumps(v, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise FormatError(f"{where}: invalid JSON (a string holds an unpaired surrogate escape: "
                          f"{e.object[max(0, e.start - 20):e.end + 20]!r})") from None
    return v


def read_st_header(path):
    """Parse a safetensors header -> (tensors {name: (dtype, shape, abs_start, abs_end)}, metadata).

    Checks the length prefix, the JSON, every entry's dtype / shape / data_offsets against the
    file size. Errors (FormatError / ModelIOError) name the file and field; nothing else escapes.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > ST_HEADER_MAX_BYTES:
                raise FormatError(f"{path}: corrupt safetensors header: header length field {n} "
                                  f"exceeds the file size {size} (or the {ST_HEADER_MAX_BYTES}-byte limit)")
            raw = f.read(n)
            if len(raw) != n:
                raise FormatError(f"{path}: truncated safetensors header ({len(raw)} of {n} bytes)")
    except OSError as e:
        raise ModelIOError(f"{path}: cannot read: {e.strerror or e}") from None
    hdr = _json_loads(raw, f"{path}: corrupt safetensors header")
    if not isinstance(hdr, dict):
        raise FormatError(f"{path}: corrupt safetensors header: top level is not an object")
    meta = hdr.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{path}: corrupt safetensors header: field __metadata__ must map strings "
                          f"to strings")
    base = 8 + n
    out = {}
    for name, e in hdr.items():
        where = f"{path}: tensor {_desc(name)}"
        if not isinstance(e, dict):
            raise FormatError(f"{where}: header entry is not an object")
        dt, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not isinstance(dt, str) or dt not in ST_DTYPES:
            raise FormatError(f"{where}: field dtype {_desc(dt)} is not a safetensors dtype")
        if (not isinstance(shape, list) or len(shape) > 16
                or not all(_is_int(s) and 0 <= s <= size for s in shape)):
            raise FormatError(f"{where}: field shape {_desc(shape)} is malformed")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs)
                or offs[0] < 0 or offs[1] < offs[0]):
            raise FormatError(f"{where}: field data_offsets {_desc(offs)} is malformed")
        nb = math.prod(shape) * ST_DTYPES[dt].itemsize
        if offs[1] - offs[0] != nb:
            raise FormatError(f"{where}: field data_offsets spans {offs[1] - offs[0]} "
                              f"bytes but dtype {dt} shape {shape} needs {nb}")
        if base + offs[1] > size:
            raise FormatError(f"{path}: truncated: tensor {_desc(name)} ends at byte {base + offs[1]} "
                              f"but the file has {size} bytes")
        out[name] = (dt, tuple(shape), base + offs[0], base + offs[1])
    return out, meta


def pread_exact(fd, n, off, path, what):
    buf = bytearray(n)
    mv = memoryview(buf)
    got = 0
    while got < n:
        try:
            k = os.preadv(fd, [mv[got:]], off + got)
        except OSError as e:
            raise ModelIOError(f"{path}: reading {what}: {e.strerror or e}") from None
        if k == 0:
            raise FormatError(f"{path}: truncated while reading {what} (wanted {n} bytes at {off})")
        got += k
    return buf


def read_manifest(dirpath) -> dict:
    """pyflashmoe.json as a dict: format, version and the top-level objects checked."""
    dirpath = os.fspath(dirpath)
    p = os.path.join(dirpath, MANIFEST)
    if not os.path.lexists(dirpath):
        recover_replaced(dirpath)   # a replace killed between its two renames (see AtomicDir)
    if not os.path.isdir(dirpath):
        raise ModelIOError(f"{dirpath}: not a directory")
    if not os.path.isfile(p):
        raise FormatError(f"{p}: missing; {dirpath} is not a pyflashmoe model dir "
                          f"(convert a checkpoint with `flashmoe convert`)")
    try:
        with open(p, "rb") as f:
            raw = f.read(MANIFEST_MAX_BYTES + 1)
    except OSError as e:
        raise ModelIOError(f"{p}: cannot read: {e.strerror or e}") from None
    if len(raw) > MANIFEST_MAX_BYTES:
        raise FormatError(f"{p}: larger than {MANIFEST_MAX_BYTES} bytes; not a pyflashmoe manifest")
    m = _json_loads_strict(raw, p)
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise FormatError(f"{p}: field format is {_desc(m.get('format')) if isinstance(m, dict) else None}, "
                          f"expected {FORMAT_NAME!r}")
    v = m.get("format_version")
    if not _is_int(v) or v != FORMAT_VERSION:
        raise FormatError(f"{p}: field format_version is {_desc(v)}; this pyflashmoe reads version "
                          f"{FORMAT_VERSION} (reconvert the model)")
    for k in ("spec", "tensors", "experts", "files", "quantization"):
        if not isinstance(m.get(k), dict):
            raise FormatError(f"{p}: missing or malformed field {k!r} (must be an object)")
    return m


def model_file(dirpath, rel, where="pyflashmoe.json: files") -> str:
    """The path of manifest-named file `rel` inside model dir `dirpath`, or FormatError.

    `rel` must be a relative, normalized POSIX path (no `..`, `.`, empty or absolute parts, no
    backslash or NUL) that resolves (symlinks followed) inside the model dir."""
    ok = isinstance(rel, str) and 0 < len(rel) <= 1024 and "\0" not in rel and "\\" not in rel
    if ok:
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            ok = False
    if ok:
        parts = rel.split("/")
        ok = not os.path.isabs(rel) and all(x not in ("", ".", "..") for x in parts)
    if not ok:
        raise FormatError(f"{where}: path {_desc(rel)} must be a relative, normalized path inside "
                          f"the model dir (no '..', not absolute)")
    full = os.path.join(dirpath, rel)
    root = os.path.realpath(dirpath)
    real = os.path.realpath(full)
    if real == root or os.path.commonpath([root, real]) != root:
        raise FormatError(f"{where}: path {_desc(rel)} resolves to {real}, outside the model dir {root}")
    return full


def _fail(where, field, msg):
    raise FormatError(f"{where}: field {field} {msg}")


def _span(where, field, rng, limit, align_to=1):
    """[offset, nbytes] of non-negative ints with offset+nbytes <= limit, offset % align_to == 0."""
    if (not isinstance(rng, list) or len(rng) != 2 or not all(_is_int(x) and x >= 0 for x in rng)
            or rng[0] + rng[1] > limit or rng[0] % align_to):
        _fail(where, field, f"{_desc(rng)} must be [offset, nbytes] inside {limit} bytes, offset a "
                            f"multiple of {align_to}")
    return rng


def _entry_sizes(where, e, shape_want, allowed):
    """Check an entry's dtype / shape / bits / group_size; -> {field: nbytes}."""
    if not isinstance(e, dict):
        raise FormatError(f"{where}: entry must be an object, got {_desc(e)}")
    dt, shape = e.get("dtype"), e.get("shape")
    if not isinstance(dt, str) or dt not in allowed:
        _fail(where, "dtype", f"{_desc(dt)} must be one of {', '.join(allowed)}")
    if not isinstance(shape, list) or [x for x in shape] != list(shape_want) \
            or not all(_is_int(x) for x in shape):
        _fail(where, "shape", f"{_desc(shape)} but the spec implies {list(shape_want)}")
    if dt == "affine":
        bits, gs = e.get("bits"), e.get("group_size")
        if (not _is_int(bits) or bits not in (2, 3, 4, 5, 6, 8) or not _is_int(gs)
                or gs not in (32, 64, 128) or len(shape) != 2 or shape[1] % gs or (shape[1] * bits) % 32):
            raise FormatError(f"{where}: affine fields bits={_desc(bits)} group_size={_desc(gs)} "
                              f"shape={shape} are inconsistent")
        return affine_sizes(shape, bits, gs)
    return {"data": math.prod(shape) * (2 if dt == "bf16" else 4)}


# dense tensors stored F32 by every writer (the C core reads them as float vectors)
_F32_KINDS = ("vector", "conv")


def validate(dirpath, check_tensors=True) -> dict:
    """Read the manifest and check it against the files it names: paths, sizes, and (with
    check_tensors) every tensor's dtype, shape and offset against the safetensors header of the
    file it lives in, every expert layer's data range and part ranges. Header reads only (no
    data is read or hashed: see verify). This is the one place model dirs are checked; Model.load
    and `flashmoe info` / `verify` call it.

    Returns the manifest; raises FormatError / ModelIOError naming the file and field.
    """
    from pyflashmoe.models import ModelSpec, tensor_map
    dirpath = os.fspath(dirpath)
    m = read_manifest(dirpath)
    mp = os.path.join(dirpath, MANIFEST)
    spec = ModelSpec.from_dict(m["spec"], where=f"{mp}: spec")
    d = m.get(MANIFEST_DIGEST)
    if d is not None and not (isinstance(d, str) and len(d) == 64):
        _fail(mp, MANIFEST_DIGEST, f"{_desc(d)} is not a sha256 hex digest")
    files = m["files"]
    if len(files) > MAX_FILES:
        _fail(mp, "files", f"lists {len(files)} files (at most {MAX_FILES})")
    sizes = {}
    for rel, fe in files.items():
        where = f"{mp}: files[{_desc(rel)}]"
        p = model_file(dirpath, rel, where)
        if not isinstance(fe, dict) or not _is_int(fe.get("size")) or fe["size"] < 0 \
                or not isinstance(fe.get("sha256"), str) or len(fe["sha256"]) != 64:
            raise FormatError(f"{where}: must be {{\"size\": bytes, \"sha256\": hex digest}}, got {_desc(fe)}")
        if not os.path.isfile(p):
            raise FormatError(f"{p}: missing (listed in {MANIFEST} files)")
        try:
            sz = os.path.getsize(p)
        except OSError as e:
            raise ModelIOError(f"{p}: cannot stat: {e.strerror or e}") from None
        if sz != fe["size"]:
            raise FormatError(f"{p}: size {sz} bytes but {MANIFEST} files[{rel!r}].size is {fe['size']}"
                              f" (truncated or modified file)")
        sizes[rel] = sz
    if DENSE_FILE not in sizes:
        _fail(mp, "files", f"does not list {DENSE_FILE!r}")
    layers = m["experts"].get("layers")
    if not isinstance(layers, dict):
        _fail(mp, "experts.layers", "is missing or not an object")
    moe = spec.moe_layers()
    want_keys = [str(i) for i in moe]
    if sorted(layers) != sorted(want_keys):
        _fail(mp, "experts.layers", f"has layers {_desc(sorted(layers))} but the spec's MoE layers are {moe}")
    owner = {DENSE_FILE: "the dense tensors"}
    for k in want_keys:
        L = layers[k]
        where = f"{mp}: experts.layers[{k!r}]"
        if not isinstance(L, dict):
            raise FormatError(f"{where}: must be an object, got {_desc(L)}")
        model_file(dirpath, L.get("file"), f"{where}.file")
        if L["file"] not in sizes:
            raise FormatError(f"{where}: field file {L['file']!r} is not listed in {MANIFEST} files "
                              f"(its size and sha256 are unknown)")
        if L["file"] in owner:
            raise FormatError(f"{where}: field file {L['file']!r} is already the file of {owner[L['file']]}")
        owner[L["file"]] = f"experts.layers[{k!r}]"
    _check_quant(mp, m["quantization"])
    if not check_tensors:
        return m
    _check_dense(dirpath, mp, m, spec, sizes[DENSE_FILE], tensor_map(spec))
    for k in want_keys:
        _check_expert_layer(dirpath, mp, k, layers[k], spec, m["quantization"])
    return m


def _part_format(pe) -> dict:
    """An expert part's storage as quantization.experts writes it: {"bits": 16} for bf16, {"bits": 32}
    for f32, else {"bits": b, "group_size": g}."""
    if pe["dtype"] in ("bf16", "f32"):
        return {"bits": 16 if pe["dtype"] == "bf16" else 32}
    return {"bits": pe["bits"], "group_size": pe["group_size"]}


def _check_part_formats(where, parts, qe):
    """Per-part formats against quantization.experts: every part of a layer stored as its
    "formats" list says when there is one (parts stored differently: per-part fallbacks, MLX
    mixed-bits sources), else the gate in the single format {"bits", "group_size"} it names."""
    if not isinstance(qe, dict):
        return
    fmts = qe.get("formats")
    if fmts is not None:
        for pn, pe in parts.items():
            if _part_format(pe) not in fmts:
                _fail(where, f"parts.{pn}", f"is {_desc(_part_format(pe))} but {MANIFEST} "
                                            f"quantization.experts.formats lists {_desc(fmts)}")
        return
    g = parts["gate"]
    qb = _part_format(g)["bits"]
    if qe.get("bits") != qb or (qb not in (16, 32) and qe.get("group_size", g["group_size"]) != g["group_size"]):
        _fail(where, "parts.gate", f"is {g['dtype']} bits {qb} but {MANIFEST} quantization.experts "
                                   f"says {_desc(qe)}")


def _check_quant(mp, q):
    for k in ("experts", "dense"):
        e = q.get(k)
        if e is None:
            continue
        if not isinstance(e, dict) or not _is_int(e.get("bits")) \
                or ("group_size" in e and not _is_int(e["group_size"])):
            _fail(mp, f"quantization.{k}", f"{_desc(e)} must be {{\"bits\": int, \"group_size\": int}}")
    fm = (q.get("experts") or {}).get("formats")
    if fm is not None and (not isinstance(fm, list) or not 0 < len(fm) <= 64 or not all(
            isinstance(a, dict) and (a in ({"bits": 16}, {"bits": 32}) or (set(a) == {"bits", "group_size"} and _is_int(
                a["bits"]) and _is_int(a["group_size"]))) for a in fm)):
        _fail(mp, "quantization.experts.formats", f"{_desc(fm)} must be a list of {{\"bits\": 16 | 32}} or "
                                                  f"{{\"bits\", \"group_size\"}}")
    notes = q.get("notes")
    if notes is not None and (not isinstance(notes, list) or len(notes) > 4096
                              or not all(isinstance(n, str) for n in notes)):
        _fail(mp, "quantization.notes", f"{_desc(notes)} must be a list of strings")
    sa = (q.get("dense") or {}).get("source_affine")
    if sa is not None and (not isinstance(sa, list) or len(sa) > 64 or not all(
            isinstance(a, dict) and _is_int(a.get("bits")) and _is_int(a.get("group_size")) for a in sa)):
        _fail(mp, "quantization.dense.source_affine", f"{_desc(sa)} must be a list of {{bits, group_size}}")


def _check_dense(dirpath, mp, m, spec, dsize, tmap):
    dp = os.path.join(dirpath, DENSE_FILE)
    st, _ = read_st_header(dp)
    want = {t.name: t for t in tmap}
    tensors = m["tensors"]
    for name in want:
        if name not in tensors:
            raise FormatError(f"{mp}: tensors: missing {name!r} (needed by spec.arch {spec.arch})")
    for name in tensors:
        if name not in want:
            raise FormatError(f"{mp}: tensors: unexpected {_desc(name)} (not a tensor of spec.arch "
                              f"{spec.arch} with these dims)")
    for name, t in want.items():
        e = tensors[name]
        where = f"{mp}: tensors[{name!r}]"
        allowed = ("f32",) if t.kind in _F32_KINDS else ("bf16", "f32", "affine")
        sizes = _entry_sizes(where, e, t.shape, allowed)
        if e["dtype"] == "affine":
            hdr = {"q": ("U32", [t.shape[0], t.shape[1] * e["bits"] // 32]),
                   "scales": ("BF16", [t.shape[0], t.shape[1] // e["group_size"]]),
                   "biases": ("BF16", [t.shape[0], t.shape[1] // e["group_size"]])}
            for k in ("q", "scales", "biases"):
                rng = _span(where, k, e.get(k), dsize, DENSE_ALIGN)
                if rng[1] != sizes[k]:
                    _fail(where, k, f"has {rng[1]} bytes, expected {sizes[k]}")
                se = st.get(f"{name}.{k}")
                if se is None or se[2] != rng[0] or se[0] != hdr[k][0] or list(se[1]) != hdr[k][1]:
                    raise FormatError(f"{dp}: tensor {name}.{k} missing or disagrees with {MANIFEST} "
                                      f"tensors[{name!r}].{k} {rng} (needs {hdr[k][0]} {hdr[k][1]} at offset "
                                      f"{rng[0]}; header has {_desc(se)})")
        else:
            off, nb = e.get("offset"), e.get("nbytes")
            _span(where, "offset/nbytes", [off, nb], dsize, DENSE_ALIGN)
            if nb != sizes["data"]:
                _fail(where, "nbytes", f"{nb} but {e['dtype']} {e['shape']} needs {sizes['data']}")
            se = st.get(name)
            if se is None or se[2] != off or se[0] != MANIFEST_DTYPE[e["dtype"]] \
                    or list(se[1]) != list(e["shape"]):
                raise FormatError(f"{dp}: tensor {name!r} missing or disagrees with {MANIFEST} "
                                  f"tensors[{name!r}] (dtype/shape/offset {e['dtype']} {e['shape']} "
                                  f"{off}; header has {_desc(se)})")


def _check_expert_layer(dirpath, mp, k, L, spec, quant):
    where = f"{mp}: experts.layers[{k!r}]"
    p = os.path.join(dirpath, L["file"])
    bb, ne, do = L.get("block_bytes"), L.get("n_experts"), L.get("data_offset")
    if not (_is_int(bb) and 0 < bb <= MAX_BLOCK_BYTES and bb % PAGE == 0):
        _fail(where, "block_bytes", f"{_desc(bb)} is not a positive multiple of {PAGE}")
    if not _is_int(ne) or ne != spec.n_experts:
        _fail(where, "n_experts", f"{_desc(ne)} but the spec has {spec.n_experts}")
    if not (_is_int(do) and do >= 0 and do % PAGE == 0):
        _fail(where, "data_offset", f"{_desc(do)} is not a non-negative multiple of {PAGE}")
    try:
        fsize = os.path.getsize(p)
    except OSError as e:
        raise ModelIOError(f"{p}: cannot stat: {e.strerror or e}") from None
    if do + ne * bb > fsize:
        _fail(where, "data_offset", f"{do} + n_experts {ne} * block_bytes {bb} = {do + ne * bb} is "
                                    f"beyond the end of {p} ({fsize} bytes)")
    est, _ = read_st_header(p)
    ee = est.get("experts")
    if ee is None or ee[0] != "U8" or list(ee[1]) != [ne, bb] or ee[2] != do:
        raise FormatError(f"{p}: tensor 'experts' missing or not U8 [{ne}, {bb}] at offset {do} as "
                          f"{MANIFEST} experts.layers[{k!r}] says (header has {_desc(ee)})")
    parts = L.get("parts")
    if not isinstance(parts, dict) or list(parts) != ["gate", "up", "down"]:
        _fail(where, "parts", f"must be gate, up, down in that order, got "
                              f"{_desc(list(parts) if isinstance(parts, dict) else parts)}")
    I, H = spec.moe_intermediate_size, spec.hidden_size
    want_shapes = {"gate": [I, H], "up": [I, H], "down": [H, I]}
    spans = []
    for pn, pe in parts.items():
        pw = f"{where}.parts.{pn}"
        sizes = _entry_sizes(pw, pe, want_shapes[pn], ("bf16", "f32", "affine"))
        for sk, nb in sizes.items():
            rng = _span(pw, sk, pe.get(sk), bb, PART_ALIGN)
            if rng[1] != nb:
                _fail(pw, sk, f"{rng} (needs {nb} bytes at a multiple of {PART_ALIGN})")
            spans.append((rng[0], rng[0] + rng[1], f"{pn}.{sk}"))
        spans += _part_bias_spans(pw, pn, pe, want_shapes[pn][0], bb)
    spans.sort()
    for a, b in zip(spans, spans[1:]):
        if b[0] < a[1]:
            raise FormatError(f"{where}: parts {a[2]} and {b[2]} overlap inside the block")
    _check_part_formats(where, parts, quant.get("experts"))
    crc = L.get("block_crc32")
    if crc is not None and (not isinstance(crc, list) or len(crc) != ne
                            or not all(_is_int(c) and 0 <= c <= 0xFFFFFFFF for c in crc)):
        _fail(where, "block_crc32", f"must be a list of n_experts ({ne}) unsigned 32-bit ints, got "
                                    f"{_desc(crc) if not isinstance(crc, list) else f'{len(crc)} entries'}")


def _part_bias_spans(pw, pn, pe, rows, bb):
    """An expert part's optional `bias` (f32 [rows] inside the block, 64-aligned; the spec's
    model features, docs/INTERNALS.md section 3) -> [(start, end, name)] for the overlap check."""
    if "bias" not in pe:
        return []
    rng = _span(pw, "bias", pe["bias"], bb, PART_ALIGN)
    if rng[1] != rows * 4:
        _fail(pw, "bias", f"{rng} (needs f32 [{rows}] = {rows * 4} bytes at a multiple of {PART_ALIGN})")
    return [(rng[0], rng[0] + rng[1], f"{pn}.bias")]


def open_model_dir(dirpath) -> dict:
    """validate() and return the manifest: what a loader calls first."""
    return validate(dirpath)


class ModelDir:
    """numpy access to a model dir (tests, tools). Reads lazily with pread; no torch."""

    def __init__(self, dirpath, validate_tensors=True):
        self.dir = os.fspath(dirpath)
        self.manifest = validate(self.dir, check_tensors=validate_tensors)
        from pyflashmoe.models import ModelSpec
        self.spec = ModelSpec.from_dict(self.manifest["spec"])

    def _read(self, rel, off, n, what):
        p = os.path.join(self.dir, rel)
        fd = os.open(p, os.O_RDONLY)
        try:
            return pread_exact(fd, n, off, p, what)
        finally:
            os.close(fd)

    def tensor_names(self):
        return list(self.manifest["tensors"])

    def dense_raw(self, name):
        """bf16 -> uint16 array, f32 -> float32 array, affine -> dict(q, scales, biases, bits, group_size)."""
        e = self.manifest["tensors"][name]
        shape = tuple(e["shape"])
        if e["dtype"] == "affine":
            out, inn = shape
            d = {"bits": e["bits"], "group_size": e["group_size"]}
            d["q"] = np.frombuffer(self._read(DENSE_FILE, *e["q"], f"{name}.q"), "<u4").reshape(out, -1)
            d["scales"] = np.frombuffer(self._read(DENSE_FILE, *e["scales"], f"{name}.scales"), "<u2").reshape(out, -1)
            d["biases"] = np.frombuffer(self._read(DENSE_FILE, *e["biases"], f"{name}.biases"), "<u2").reshape(out, -1)
            return d
        dt = "<u2" if e["dtype"] == "bf16" else "<f4"
        return np.frombuffer(self._read(DENSE_FILE, e["offset"], e["nbytes"], name), dt).reshape(shape)

    def dense(self, name) -> np.ndarray:
        """Any dense tensor as float32 (affine dequantized)."""
        e = self.manifest["tensors"][name]
        r = self.dense_raw(name)
        if e["dtype"] == "affine":
            return dequantize_affine(r["q"], r["scales"], r["biases"], r["bits"], r["group_size"])
        return bf16_to_f32(r) if e["dtype"] == "bf16" else r

    def expert_block(self, layer, e) -> bytes:
        L = self.manifest["experts"]["layers"][str(layer)]
        if not 0 <= e < L["n_experts"]:
            raise ArgumentError(f"expert index {e} out of range [0, {L['n_experts']})")
        return self._read(L["file"], L["data_offset"] + e * L["block_bytes"], L["block_bytes"],
                          f"expert {e}")

    def expert_raw(self, layer, e) -> dict:
        """{part: uint16 bf16 matrix | dict(q, scales, biases, bits, group_size)} for one expert."""
        L = self.manifest["experts"]["layers"][str(layer)]
        blk = bytes(self.expert_block(layer, e))
        out = {}
        for pn, pe in L["parts"].items():
            rows = pe["shape"][0]
            if pe["dtype"] == "affine":
                d = {"bits": pe["bits"], "group_size": pe["group_size"]}
                for k, dt in (("q", "<u4"), ("scales", "<u2"), ("biases", "<u2")):
                    o, n = pe[k]
                    d[k] = np.frombuffer(blk[o:o + n], dt).reshape(rows, -1)
                out[pn] = d
            else:
                o, n = pe["data"]
                dt = "<u2" if pe["dtype"] == "bf16" else "<f4"
                out[pn] = np.frombuffer(blk[o:o + n], dt).reshape(pe["shape"])
        return out

    def expert(self, layer, e) -> dict:
        """{part: float32 [out, in]} for one expert (affine dequantized)."""
        L = self.manifest["experts"]["layers"][str(layer)]
        out = {}
        for pn, r in self.expert_raw(layer, e).items():
            pe = L["parts"][pn]
            if pe["dtype"] == "affine":
                out[pn] = dequantize_affine(r["q"], r["scales"], r["biases"], r["bits"], r["group_size"])
            elif pe["dtype"] == "bf16":
                out[pn] = bf16_to_f32(r)
            else:
                out[pn] = r.astype(np.float32)
        return out


def read_model_dir(dirpath) -> ModelDir:
    return ModelDir(dirpath)



# ---- verify / info -----------------------------------------------------------------------------

def check_manifest_digest(dirpath) -> dict:
    """read_manifest + its recorded digest recomputed; FormatError when missing or different."""
    dirpath = os.fspath(dirpath)
    m = read_manifest(dirpath)
    mp = os.path.join(dirpath, MANIFEST)
    d = m.get(MANIFEST_DIGEST)
    if d is None:
        raise FormatError(f"{mp}: no field {MANIFEST_DIGEST} (the manifest was written by an older "
                          f"pyflashmoe), so it cannot be verified; reconvert the model "
                          f"(`flashmoe convert SRC {dirpath} --force`) to record it")
    got = manifest_digest(m)
    if d != got:
        raise FormatError(f"{mp}: field {MANIFEST_DIGEST} is {_desc(d)} but the manifest hashes to {got}: "
                          f"the manifest was modified after it was written (e.g. an offset edited by "
                          f"hand); restore it or reconvert the model")
    return m


def _crc_error(p, k, e, got, want, off, bb):
    return FormatError(f"{p}: expert {e} of layer {k} (bytes {off}..{off + bb}) has crc32 {got:#010x} but "
                       f"{MANIFEST} experts.layers[{k!r}].block_crc32[{e}] is {want:#010x} (damaged expert "
                       f"data; restore the file or reconvert)")


def _readinto_full(f, mv) -> int:
    """readinto until mv is full or EOF; -> bytes read."""
    got = 0
    while got < len(mv):
        r = f.readinto(mv[got:])
        if not r:
            break
        got += r
    return got


def _hash_file(p, rel, fe, bar, layer=None, stats=None):
    """sha256 of a whole file (8 MiB reads); for an expert layer with block_crc32, every block's
    CRC32 in the same pass (the first damaged block is named)."""
    h = hashlib.sha256()
    bufsz = 8 << 20
    try:
        with open(p, "rb", buffering=0) as f:
            if layer is not None:
                k, L = layer
                do, bb, crcs = L["data_offset"], L["block_bytes"], L["block_crc32"]
                head = bytearray(do)
                if _readinto_full(f, memoryview(head)) != do:
                    raise FormatError(f"{p}: truncated before the expert data of layer {k}")
                h.update(head)
                per = max(1, bufsz // bb)
                buf = bytearray(per * bb)
                e = 0
                while e < len(crcs):
                    nblk = min(per, len(crcs) - e)
                    mv = memoryview(buf)[:nblk * bb]
                    got = _readinto_full(f, mv)
                    if got < len(mv):
                        raise FormatError(f"{p}: truncated inside expert {e + got // bb} of layer {k}")
                    h.update(mv)
                    for j in range(nblk):
                        c = zlib.crc32(mv[j * bb:(j + 1) * bb])
                        if c != crcs[e + j]:
                            raise _crc_error(p, k, e + j, c, crcs[e + j], do + (e + j) * bb, bb)
                    stats["blocks"] += nblk
                    if bar:
                        bar.update(len(mv))
                    e += nblk
                if bar:
                    bar.update(len(head))
            while True:
                b = f.read(bufsz)
                if not b:
                    break
                h.update(b)
                if bar:
                    bar.update(len(b))
    except OSError as e:
        raise ModelIOError(f"{p}: cannot read: {e.strerror or e}") from None
    if h.hexdigest() != fe["sha256"]:
        raise FormatError(f"{p}: sha256 {h.hexdigest()} does not match {MANIFEST} "
                          f"files[{rel!r}].sha256 {fe['sha256']} (file is corrupt)")


def _sample_count(sample, n):
    """Blocks to check out of n: sample is None (default count), "all", an int count, a float
    fraction in (0, 1], or a string of those ("8", "0.1", "10%")."""
    if sample is None:
        return min(n, QUICK_SAMPLE_DEFAULT)
    bad = ArgumentError(f"sample: {sample!r} is not 'all', a count >= 1 or a fraction in (0, 1]")
    if isinstance(sample, str):
        s = sample.strip().lower()
        try:
            if s == "all":
                return n
            if s.endswith("%"):
                sample = float(s[:-1]) / 100.0
            elif "." in s or "e" in s:
                sample = float(s)
            else:
                sample = int(s)
        except ValueError:
            raise bad from None
    if isinstance(sample, bool) or not isinstance(sample, (int, float)):
        raise bad
    if isinstance(sample, float):
        if not 0.0 < sample <= 1.0:
            raise bad
        return max(1, min(n, math.ceil(sample * n)))
    if sample < 1:
        raise bad
    return min(n, sample)


QUICK_SAMPLE_DEFAULT = 8


def verify(dirpath, progress=False, quick=False, sample=None, seed=None) -> dict:
    """Check a model dir's data against its manifest; FormatError naming the file on a mismatch.

    Always: the manifest digest (field manifest_sha256; a manifest without one fails, reconvert)
    and validate() (paths, sizes, every offset against the file headers).
    Full (default): the sha256 of every file and, where the manifest records block_crc32, every
    expert block's CRC32 in the same pass (reads every byte of the model once).
    quick=True: the sha256 of dense.safetensors only (reads the whole dense file) plus the CRC32
    of `sample` expert blocks per layer chosen at random (`seed`): sample is a count (default 8),
    a fraction in (0, 1] or "all". Layers without block_crc32 are reported as unchecked.

    Returns a report: {"mode", "files_hashed", "blocks_checked", "layers_without_crc",
    "bytes_read", "seconds"}.
    """
    import time
    t0 = time.perf_counter()
    dirpath = os.fspath(dirpath)
    if quick:
        _sample_count(sample, 1)             # a bad option fails before any reading
    check_manifest_digest(dirpath)
    m = validate(dirpath)
    layers = m["experts"]["layers"]
    by_file = {L["file"]: (k, L) for k, L in layers.items()}
    no_crc = sorted((k for k, L in layers.items() if L.get("block_crc32") is None), key=int)
    stats = {"blocks": 0}
    rep = {"mode": "quick" if quick else "full", "files_hashed": [], "blocks_checked": 0,
           "layers_without_crc": no_crc, "bytes_read": 0, "seconds": 0.0}
    if quick:
        todo = {DENSE_FILE: m["files"][DENSE_FILE]}
    else:
        todo = m["files"]
    total = sum(fe["size"] for fe in todo.values())
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="verify")
        except ImportError:
            bar = None
    try:
        for rel, fe in todo.items():
            lay = by_file.get(rel)
            if lay is not None and lay[1].get("block_crc32") is None:
                lay = None
            _hash_file(os.path.join(dirpath, rel), rel, fe, bar, lay, stats)
            rep["files_hashed"].append(rel)
            rep["bytes_read"] += fe["size"]
        if quick:
            rng = random.Random(seed)
            for k in sorted(layers, key=int):
                L = layers[k]
                crcs = L.get("block_crc32")
                if crcs is None:
                    continue
                p = os.path.join(dirpath, L["file"])
                ne, bb, do = L["n_experts"], L["block_bytes"], L["data_offset"]
                pick = sorted(rng.sample(range(ne), _sample_count(sample, ne)))
                try:
                    fd = os.open(p, os.O_RDONLY)
                except OSError as e:
                    raise ModelIOError(f"{p}: cannot open: {e.strerror or e}") from None
                try:
                    for e in pick:
                        blk = pread_exact(fd, bb, do + e * bb, p, f"expert {e}")
                        c = zlib.crc32(blk)
                        if c != crcs[e]:
                            raise _crc_error(p, k, e, c, crcs[e], do + e * bb, bb)
                        stats["blocks"] += 1
                        rep["bytes_read"] += bb
                finally:
                    os.close(fd)
    finally:
        if bar:
            bar.close()
    rep["blocks_checked"] = stats["blocks"]
    rep["seconds"] = time.perf_counter() - t0
    return rep


def _fmt_bytes(n):
    for u in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or u == "TiB":
            return f"{n:.1f} {u}" if u != "B" else f"{n} B"
        n /= 1024


def _show(v) -> str:
    """A manifest string for display: as is when short and printable, else repr'd and cut."""
    return v if isinstance(v, str) and len(v) <= 200 and v.isprintable() else _desc(v)


def info_text(dirpath) -> str:
    """A summary of a model dir; validate() first, so every path and field shown was checked."""
    dirpath = os.fspath(dirpath)
    m = validate(dirpath)
    s = m["spec"]
    q = m["quantization"]
    n_full = sum(1 for l in s["layers"] if l["attn"] == "full")
    n_moe = sum(1 for l in s["layers"] if l["ffn"] == "moe")
    dense_sz = m["files"][DENSE_FILE]["size"]
    exp_files = {L["file"] for L in m["experts"]["layers"].values()}
    exp_sz = sum(fe["size"] for rel, fe in m["files"].items() if rel in exp_files)
    L0 = next(iter(m["experts"]["layers"].values()), None)
    eq = q.get("experts") or {}
    dq = q.get("dense") or {}
    src = m.get("source") if isinstance(m.get("source"), dict) else {}
    lines = [
        f"{dirpath}",
        f"  format        {m['format']} v{m['format_version']} ({_show(m.get('created_by', '?'))})",
        f"  architecture  {s['arch']}  (source {_show(src.get('kind', '?'))}: {_show(src.get('path', '?'))})",
        f"  layers        {s['n_layers']} ({n_full} full attention, {s['n_layers'] - n_full} linear; "
        f"{n_moe} MoE)",
        f"  hidden        {s['hidden_size']}, vocab {s['vocab_size']}, heads {s['n_heads']}/{s['n_kv_heads']}"
        f" x {s['head_dim']}",
        f"  experts       {s.get('n_experts', 0)} per layer, {s.get('n_experts_per_tok', 0)} per token, "
        f"intermediate {s.get('moe_intermediate_size', 0)}, shared {s.get('shared_expert_intermediate_size', 0)}",
        f"  quantization  experts {eq.get('bits')}-bit"
        + (f" group {eq['group_size']}" if eq.get("group_size") else "")
        + f", dense {dq.get('bits')}-bit"
        + "".join(f" + source affine {a['bits']}-bit group {a['group_size']}"
                  for a in dq.get("source_affine", [])),
    ]
    if eq.get("formats"):
        lines.append("  expert parts  " + ", ".join(
            "bf16" if f == {"bits": 16} else "f32" if f == {"bits": 32} else f"{f['bits']}-bit group {f['group_size']}"
            for f in eq["formats"])
            + " (per part and layer)")
    for n in q.get("notes") or []:
        lines.append(f"  note          {n[:300] if n.isprintable() else _desc(n)}")
    if L0:
        lines.append(f"  expert block  {L0['block_bytes']} bytes ({_fmt_bytes(L0['block_bytes'])})"
                     + ("" if L0.get("block_crc32") is not None else ", no block checksums"))
    lines += [f"  dense size    {_fmt_bytes(dense_sz)}",
              f"  expert size   {_fmt_bytes(exp_sz)} in {len(m['experts']['layers'])} files",
              f"  tensors       {len(m['tensors'])} dense",
              "  manifest      " + ("sha256 recorded" if m.get(MANIFEST_DIGEST) else
                                     "no digest (older version; `verify` needs a reconvert)")]
    return "\n".join(lines)
