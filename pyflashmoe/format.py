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
import os
import shutil
import struct
import tempfile

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
        except (OSError, AttributeError):
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


def write_manifest(dirpath, manifest):
    p = os.path.join(dirpath, MANIFEST)
    data = json.dumps(manifest, indent=1, sort_keys=False).encode()
    with open(p, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# ---- reading and validation -------------------------------------------------------------------

def read_st_header(path):
    """Parse a safetensors header -> (tensors {name: (dtype, shape, abs_start, abs_end)}, metadata).

    Checks the length prefix, the JSON, every entry's dtype / shape / data_offsets against the
    file size. Errors name the file and field.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 512 * 1024 * 1024:
                raise FormatError(f"{path}: corrupt safetensors header: header length field {n} "
                                  f"exceeds the file size {size}")
            raw = f.read(n)
    except OSError as e:
        raise ModelIOError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        hdr = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: corrupt safetensors header: not valid JSON ({e})") from None
    if not isinstance(hdr, dict):
        raise FormatError(f"{path}: corrupt safetensors header: top level is not an object")
    meta = hdr.pop("__metadata__", None) or {}
    base = 8 + n
    out = {}
    for name, e in hdr.items():
        if not isinstance(e, dict):
            raise FormatError(f"{path}: tensor {name!r}: header entry is not an object")
        dt, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if dt not in ST_DTYPES:
            raise FormatError(f"{path}: tensor {name!r}: field dtype {dt!r} is not a safetensors dtype")
        if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)):
            raise FormatError(f"{path}: tensor {name!r}: field shape {shape!r} is malformed")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)
                or offs[0] < 0 or offs[1] < offs[0]):
            raise FormatError(f"{path}: tensor {name!r}: field data_offsets {offs!r} is malformed")
        nb = int(np.prod(shape, dtype=np.int64)) * ST_DTYPES[dt].itemsize
        if offs[1] - offs[0] != nb:
            raise FormatError(f"{path}: tensor {name!r}: field data_offsets spans {offs[1] - offs[0]} "
                              f"bytes but dtype {dt} shape {shape} needs {nb}")
        if base + offs[1] > size:
            raise FormatError(f"{path}: truncated: tensor {name!r} ends at byte {base + offs[1]} "
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
    p = os.path.join(os.fspath(dirpath), MANIFEST)
    if not os.path.lexists(dirpath):
        recover_replaced(dirpath)   # a replace killed between its two renames (see AtomicDir)
    if not os.path.isdir(dirpath):
        raise ModelIOError(f"{dirpath}: not a directory")
    if not os.path.isfile(p):
        raise FormatError(f"{p}: missing; {dirpath} is not a pyflashmoe model dir "
                          f"(convert a checkpoint with `flashmoe convert`)")
    try:
        with open(p, "rb") as f:
            m = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{p}: not valid JSON ({e})") from None
    except OSError as e:
        raise ModelIOError(f"{p}: cannot read: {e.strerror or e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise FormatError(f"{p}: field format is {m.get('format') if isinstance(m, dict) else None!r}, "
                          f"expected {FORMAT_NAME!r}")
    v = m.get("format_version")
    if v != FORMAT_VERSION:
        raise FormatError(f"{p}: field format_version is {v!r}; this pyflashmoe reads version "
                          f"{FORMAT_VERSION} (reconvert the model)")
    for k in ("spec", "tensors", "experts", "files", "quantization"):
        if not isinstance(m.get(k), dict):
            raise FormatError(f"{p}: missing or malformed field {k!r}")
    return m


def _check_range(where, field, rng, limit):
    if (not isinstance(rng, list) or len(rng) != 2 or not all(isinstance(x, int) and x >= 0 for x in rng)
            or rng[0] + rng[1] > limit):
        raise FormatError(f"{where}: field {field} {rng!r} is malformed or beyond {limit} bytes")


def _tensor_nbytes(where, e):
    shape = e.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s > 0 for s in shape):
        raise FormatError(f"{where}: field shape {shape!r} is malformed")
    if e.get("dtype") == "affine":
        bits, gs = e.get("bits"), e.get("group_size")
        if bits not in (2, 3, 4, 5, 6, 8) or gs not in (32, 64, 128) or len(shape) != 2 or shape[1] % gs:
            raise FormatError(f"{where}: affine fields bits={bits!r} group_size={gs!r} shape={shape!r} "
                              f"are inconsistent")
        return affine_sizes(shape, bits, gs)
    if e.get("dtype") not in MANIFEST_DTYPE:
        raise FormatError(f"{where}: field dtype {e.get('dtype')!r} must be bf16, f32 or affine")
    return {"data": int(np.prod(shape)) * (2 if e["dtype"] == "bf16" else 4)}


def validate(dirpath, check_tensors=True) -> dict:
    """Read the manifest and check it against the files: sizes, shapes, dtypes, offsets.

    Returns the manifest; raises FormatError naming file and field. Does not hash (see verify).
    """
    from pyflashmoe.models import ModelSpec, tensor_map
    dirpath = os.fspath(dirpath)
    m = read_manifest(dirpath)
    mp = os.path.join(dirpath, MANIFEST)
    spec = ModelSpec.from_dict(m["spec"], where=f"{mp}: spec")
    for rel, fe in m["files"].items():
        p = os.path.join(dirpath, rel)
        if not os.path.isfile(p):
            raise FormatError(f"{p}: missing (listed in {MANIFEST} files)")
        sz = os.path.getsize(p)
        if sz != fe.get("size"):
            raise FormatError(f"{p}: size {sz} bytes but {MANIFEST} files[{rel!r}].size is {fe.get('size')}"
                              f" (truncated or modified file)")
    if not check_tensors:
        return m
    # dense tensors: every canonical tensor present, shapes as the spec says, offsets in file
    dp = os.path.join(dirpath, DENSE_FILE)
    st, _ = read_st_header(dp)
    dsize = os.path.getsize(dp)
    want = {t.name: t for t in tensor_map(spec)}
    for name, t in want.items():
        if name not in m["tensors"]:
            raise FormatError(f"{mp}: tensors: missing {name!r}")
    for name, e in m["tensors"].items():
        where = f"{mp}: tensors[{name!r}]"
        sizes = _tensor_nbytes(where, e)
        if name in want and tuple(e["shape"]) != tuple(want[name].shape):
            raise FormatError(f"{where}: field shape {e['shape']} but the spec implies "
                              f"{list(want[name].shape)}")
        if e["dtype"] == "affine":
            for k in ("q", "scales", "biases"):
                _check_range(where, k, e.get(k), dsize)
                if e[k][1] != sizes[k]:
                    raise FormatError(f"{where}: field {k} has {e[k][1]} bytes, expected {sizes[k]}")
                se = st.get(f"{name}.{k}")
                if se is None or se[2] != e[k][0]:
                    raise FormatError(f"{dp}: tensor {name}.{k} missing or not at the offset the manifest says")
        else:
            _check_range(where, "offset/nbytes", [e.get("offset", -1), e.get("nbytes", -1)], dsize)
            if e["nbytes"] != sizes["data"]:
                raise FormatError(f"{where}: field nbytes {e['nbytes']} but {e['dtype']} {e['shape']} "
                                  f"needs {sizes['data']}")
            se = st.get(name)
            if se is None or se[2] != e["offset"] or se[0] != MANIFEST_DTYPE[e["dtype"]] \
                    or list(se[1]) != list(e["shape"]):
                raise FormatError(f"{dp}: tensor {name!r} missing or disagrees with {MANIFEST} "
                                  f"(dtype/shape/offset)")
    # experts
    layers = m["experts"].get("layers")
    if not isinstance(layers, dict):
        raise FormatError(f"{mp}: field experts.layers is missing")
    moe = spec.moe_layers()
    if sorted(int(k) for k in layers) != moe:
        raise FormatError(f"{mp}: experts.layers has layers {sorted(int(k) for k in layers)} but the "
                          f"spec's MoE layers are {moe}")
    I, H = spec.moe_intermediate_size, spec.hidden_size
    want_shapes = {"gate": [I, H], "up": [I, H], "down": [H, I]}
    for k, L in layers.items():
        where = f"{mp}: experts.layers[{k!r}]"
        p = os.path.join(dirpath, L.get("file", ""))
        bb, ne, do = L.get("block_bytes"), L.get("n_experts"), L.get("data_offset")
        if not (isinstance(bb, int) and bb > 0 and bb % PAGE == 0):
            raise FormatError(f"{where}: field block_bytes {bb!r} is not a positive multiple of {PAGE}")
        if ne != spec.n_experts:
            raise FormatError(f"{where}: field n_experts {ne!r} but the spec has {spec.n_experts}")
        if not (isinstance(do, int) and do % PAGE == 0):
            raise FormatError(f"{where}: field data_offset {do!r} is not a multiple of {PAGE}")
        est, _ = read_st_header(p)
        ee = est.get("experts")
        if ee is None or ee[0] != "U8" or list(ee[1]) != [ne, bb] or ee[2] != do:
            raise FormatError(f"{p}: tensor 'experts' missing or not U8 [{ne}, {bb}] at offset {do}")
        parts = L.get("parts", {})
        if list(parts) != ["gate", "up", "down"]:
            raise FormatError(f"{where}: field parts must be gate, up, down in that order, got {list(parts)}")
        for pn, pe in parts.items():
            pw = f"{where}.parts.{pn}"
            sizes = _tensor_nbytes(pw, pe)
            if pe["shape"] != want_shapes[pn]:
                raise FormatError(f"{pw}: field shape {pe['shape']} but the spec implies {want_shapes[pn]}")
            for sk, nb in sizes.items():
                rng = pe.get(sk)
                _check_range(pw, sk, rng, bb)
                if rng[1] != nb or rng[0] % PART_ALIGN:
                    raise FormatError(f"{pw}: field {sk} {rng} (needs {nb} bytes at a multiple of {PART_ALIGN})")
    return m


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

def verify(dirpath, progress=False):
    """Recompute the sha256 of every data file (streamed, 8 MiB at a time) against the manifest."""
    dirpath = os.fspath(dirpath)
    m = validate(dirpath, check_tensors=False)
    total = sum(fe["size"] for fe in m["files"].values())
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="verify")
        except ImportError:
            bar = None
    try:
        for rel, fe in m["files"].items():
            p = os.path.join(dirpath, rel)
            h = hashlib.sha256()
            try:
                with open(p, "rb") as f:
                    while True:
                        b = f.read(8 << 20)
                        if not b:
                            break
                        h.update(b)
                        if bar:
                            bar.update(len(b))
            except OSError as e:
                raise ModelIOError(f"{p}: cannot read: {e.strerror or e}") from None
            if h.hexdigest() != fe.get("sha256"):
                raise FormatError(f"{p}: sha256 {h.hexdigest()} does not match {MANIFEST} "
                                  f"files[{rel!r}].sha256 {fe.get('sha256')} (file is corrupt)")
    finally:
        if bar:
            bar.close()
    return True


def _fmt_bytes(n):
    for u in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or u == "TiB":
            return f"{n:.1f} {u}" if u != "B" else f"{n} B"
        n /= 1024


def info_text(dirpath) -> str:
    dirpath = os.fspath(dirpath)
    m = validate(dirpath)
    s = m["spec"]
    q = m["quantization"]
    n_full = sum(1 for l in s["layers"] if l["attn"] == "full")
    n_moe = sum(1 for l in s["layers"] if l["ffn"] == "moe")
    dense_sz = m["files"].get(DENSE_FILE, {}).get("size", 0)
    exp_sz = sum(fe["size"] for rel, fe in m["files"].items() if rel.startswith("experts/"))
    L0 = next(iter(m["experts"]["layers"].values()), None)
    eq = q.get("experts", {})
    lines = [
        f"{dirpath}",
        f"  format        {m['format']} v{m['format_version']} ({m.get('created_by', '?')})",
        f"  architecture  {s['arch']}  (source {m.get('source', {}).get('kind', '?')}: "
        f"{m.get('source', {}).get('path', '?')})",
        f"  layers        {s['n_layers']} ({n_full} full attention, {s['n_layers'] - n_full} linear; "
        f"{n_moe} MoE)",
        f"  hidden        {s['hidden_size']}, vocab {s['vocab_size']}, heads {s['n_heads']}/{s['n_kv_heads']}"
        f" x {s['head_dim']}",
        f"  experts       {s['n_experts']} per layer, {s['n_experts_per_tok']} per token, "
        f"intermediate {s['moe_intermediate_size']}, shared {s['shared_expert_intermediate_size']}",
        f"  quantization  experts {eq.get('bits')}-bit"
        + (f" group {eq['group_size']}" if eq.get("group_size") else "")
        + f", dense {q.get('dense', {}).get('bits')}-bit"
        + "".join(f" + source affine {a['bits']}-bit group {a['group_size']}"
                  for a in q.get("dense", {}).get("source_affine", [])),
    ]
    if L0:
        lines.append(f"  expert block  {L0['block_bytes']} bytes ({_fmt_bytes(L0['block_bytes'])})")
    lines += [f"  dense size    {_fmt_bytes(dense_sz)}",
              f"  expert size   {_fmt_bytes(exp_sz)} in {len(m['experts']['layers'])} files",
              f"  tensors       {len(m['tensors'])} dense"]
    return "\n".join(lines)
