"""Sessions for many conversations at once, and the prefix states they resume from.

A Qwen3.5 session cannot be rewound like a KV cache (the GatedDeltaNet state is recurrent), so a
request that extends an earlier conversation is served from a session whose state holds a prefix
of its tokens: a live idle session, or a saved snapshot of one (Session.save_state, csrc/fm_state.c).

THE interface every generation path uses (pyflashmoe.generate, the server's scheduler):

    pool = StatePool(engine, session_factory, context_length, max_sessions=N)
    sess, logits, n_cached = pool.prefill(ids)   # exclusive use of sess until finish()
    ... decode with sess (sess.eval([tok]) or a batched step over several sessions) ...
    pool.finish(sess, held)                      # held: the token ids sess's state now holds,
                                                 # or None when unknown (the state is dropped)

prefill evaluates only ids[n_cached:] (at least one token, so logits are those of ids[-1]);
n_cached is what usage reports as cached tokens. On an error inside prefill the session is reset
and returned to the pool before the error propagates (ContextFullError leaves nothing evaluated).

Snapshots (issue 10 item 3). Keyed by the token prefix they hold: (n, blake2b-128 of the int32
bytes of ids[:n]). Taken at
  * message boundaries: prefill evaluates the uncached tokens in chunks split at the last
    `n_boundaries` (default 2) positions of a boundary token (the chat template's `<|im_start|>`,
    set by configure(tokenizer=...)) and snapshots after each chunk: the start of the generation
    prompt (where a re-rendered history diverges when the template drops a thinking block or
    re-serialises a tool call) and the start of the last message (where an edited tool result or a
    regenerated user message diverges);
  * the end of the prompt, when it is at least `min_gap` tokens past the last boundary (a raw
    completion prompt; after a chat prompt the boundary is a few tokens before it);
  * the end of a finished generation (finish: prompt + generated tokens), lazily: the session
    keeps that state live, and it is saved only when the session is about to be given another
    state (another conversation, or a snapshot load), so a conversation that goes on in its own
    session costs no copy.
prefill resumes from the longest prefix of ids (shorter than ids) held by a live idle session or
a snapshot; a live session wins a tie (no copy).

Tiers. Snapshots live in RAM (each in its own anonymous mmap, so an evicted one's memory goes
back to the system at once, never kept by malloc) within `ram_bytes` (LRU); beyond it the least
recently used spill to `disk_dir` (atomic: a temporary file renamed into place, under a
sub-directory per model: a hash of its manifest, which lists every weight file's sha256, and the
experts per token), which has its
own cap `disk_bytes` (LRU; the oldest files are deleted). Without disk_dir an evicted snapshot is
dropped. A spilled file that cannot be read or that load_state refuses (damaged, truncated,
another model) is deleted with a log line and the prefill goes on from the next best source, never
an error. Files left in the model's sub-directory by an earlier process are adopted (their name is
their key) on first use. Defaults: ram_bytes = 8 snapshots at full context (the state at
context_length tokens), at least 256 MiB, at most 1/8 of the machine's RAM (the rest is the
experts' page cache); disk_bytes 8 GiB when a disk_dir is set.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import mmap
import os
import struct
import threading
import time

import numpy as np

from pyflashmoe.errors import ArgumentError, ContextFullError, FlashMoEError

log = logging.getLogger("pyflashmoe.prefix")

# csrc/fm_state.c fm_state_hdr: magic, checksum, version, header_bytes, fingerprint, payload_bytes,
# pos, n_layers, H, vocab, k_tok, n_full, n_linear, kv_dim, conv_rows, conv_dim, lin_nv, lin_dk,
# lin_dv, reserved, weights_id (host byte order, no padding)
_HDR = struct.Struct("=8sQIIQQ14iQ")
_MAGIC = b"FMSTATE\0"
_SUFFIX = ".fmstate"

DEFAULT_N_BOUNDARIES = 2
DEFAULT_MIN_GAP = 16        # tokens: an end-of-prompt snapshot this close to a boundary is skipped
DEFAULT_MIN_TOKENS = 1      # no snapshot of fewer tokens
DEFAULT_DISK_BYTES = 8 << 30
MIN_RAM_BYTES = 256 << 20


def header_info(buf) -> dict:
    """The fields of a snapshot's header (csrc/fm_state.c), and its bytes per token / fixed bytes."""
    mv = memoryview(buf).cast("B")
    if len(mv) < _HDR.size or bytes(mv[:8]) != _MAGIC:
        raise ArgumentError("not a session state snapshot (bad magic or too short)")
    (_, checksum, version, header_bytes, fingerprint, payload, pos, n_layers, H, vocab, k_tok, n_full,
     n_linear, kv_dim, conv_rows, conv_dim, nv, dk, dv, _, weights_id) = _HDR.unpack_from(mv, 0)
    per_token = 4 * 2 * n_full * kv_dim
    fixed = header_bytes + 4 * n_linear * (conv_rows * conv_dim + nv * dk * dv)
    return {"version": version, "pos": pos, "fingerprint": fingerprint, "weights_id": weights_id,
            "header_bytes": header_bytes, "payload_bytes": payload, "n_layers": n_layers,
            "per_token_bytes": per_token, "fixed_bytes": fixed, "checksum": checksum}


def _total_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def _digest(arr: np.ndarray) -> bytes:
    return hashlib.blake2b(arr.tobytes(), digest_size=16).digest()


class _Slot:
    __slots__ = ("session", "held", "busy", "used")

    def __init__(self, session):
        self.session = session
        self.held: list[int] = []
        self.busy = False
        self.used = 0.0


class _Snap:
    """One snapshot: ids[:n] with digest; data (an mmap) in RAM, or path on disk."""
    __slots__ = ("n", "digest", "nbytes", "data", "path", "spilling")

    def __init__(self, n, digest, nbytes, data=None, path=None):
        self.n, self.digest, self.nbytes, self.data, self.path = n, digest, nbytes, data, path
        self.spilling = False

    @property
    def key(self):
        return (self.n, self.digest)


class StatePool:
    """Up to max_sessions live sessions plus snapshots; see the module docstring for the contract."""

    def __init__(self, engine, session_factory, context_length: int, max_sessions: int = 1, *,
                 ram_bytes: int | None = None, disk_dir: str | None = None, disk_bytes: int | None = None,
                 boundary_ids=(), n_boundaries: int = DEFAULT_N_BOUNDARIES, min_gap: int = DEFAULT_MIN_GAP,
                 min_tokens: int = DEFAULT_MIN_TOKENS, snapshots: bool = True):
        if isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions < 1:
            raise ArgumentError(f"max_sessions must be a positive integer, got {max_sessions!r}")
        self.engine = engine
        self._factory = session_factory
        self.context_length = int(context_length)
        self.max_sessions = max_sessions
        self._slots: list[_Slot] = []
        self._lock = threading.Lock()
        # snapshots
        self.snapshots = bool(snapshots)
        self.ram_bytes: int | None = None       # None: the default, decided from the first snapshot
        self.disk_dir: str | None = None
        self.disk_bytes = DEFAULT_DISK_BYTES
        self.boundary_ids: frozenset[int] = frozenset()
        self.n_boundaries = DEFAULT_N_BOUNDARIES
        self.min_gap = DEFAULT_MIN_GAP
        self.min_tokens = DEFAULT_MIN_TOKENS
        self._ram: collections.OrderedDict = collections.OrderedDict()   # key -> _Snap, LRU first
        self._disk: collections.OrderedDict = collections.OrderedDict()
        self._lengths: collections.Counter = collections.Counter()       # n -> snapshots of n tokens
        self._ram_used = 0
        self._leaving = 0      # RAM bytes of snapshots being written to disk
        self._disk_used = 0
        self._subdir: str | None = None
        self._count = collections.Counter()
        self.configure(ram_bytes=ram_bytes, disk_dir=disk_dir, disk_bytes=disk_bytes, boundary_ids=boundary_ids,
                       n_boundaries=n_boundaries, min_gap=min_gap, min_tokens=min_tokens)

    # ------------------------------------------------------------------ configuration
    def configure(self, *, ram_bytes=None, disk_dir=None, disk_bytes=None, boundary_ids=None, tokenizer=None,
                  n_boundaries=None, min_gap=None, min_tokens=None, snapshots=None) -> None:
        """Change the snapshot settings (None: unchanged). tokenizer: takes its `<|im_start|>` id as
        the boundary token. Budgets shrink at once (evicting); disk_dir applies to later spills."""
        def size(v, name):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ArgumentError(f"{name} must be a byte count >= 0, got {v!r}")
            return int(v)

        def count(v, name):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ArgumentError(f"{name} must be an integer >= 0, got {v!r}")
            return int(v)
        if snapshots is not None:
            self.snapshots = bool(snapshots)
        if ram_bytes is not None:
            self.ram_bytes = size(ram_bytes, "ram_bytes")
        if disk_bytes is not None:
            self.disk_bytes = size(disk_bytes, "disk_bytes")
        if disk_dir is not None:
            if not isinstance(disk_dir, (str, os.PathLike)) or not str(disk_dir):
                raise ArgumentError(f"disk_dir must be a directory path, got {disk_dir!r}")
            d = os.path.abspath(os.fspath(disk_dir))
            if os.path.exists(d) and not os.path.isdir(d):
                raise ArgumentError(f"disk_dir {d} exists and is not a directory")
            self.disk_dir = d
            self._subdir = None
        if tokenizer is not None:
            tid = tokenizer.token_to_id("<|im_start|>") if hasattr(tokenizer, "token_to_id") else None
            if tid is not None:
                boundary_ids = [tid]
        if boundary_ids is not None:
            self.boundary_ids = frozenset(int(t) for t in boundary_ids)
        if n_boundaries is not None:
            self.n_boundaries = count(n_boundaries, "n_boundaries")
        if min_gap is not None:
            self.min_gap = count(min_gap, "min_gap")
        if min_tokens is not None:
            self.min_tokens = max(1, count(min_tokens, "min_tokens"))
        self._enforce()

    # ------------------------------------------------------------------ internals: live sessions
    def _slot_of(self, sess) -> _Slot:
        for s in self._slots:
            if s.session is sess:
                return s
        raise ArgumentError("StatePool.finish: this session does not belong to the pool")

    @staticmethod
    def _common(held: list[int], ids: list[int]) -> int:
        """len(held) when held is a prefix of ids[:-1] (the last id must still be evaluated), else 0."""
        n = len(held)
        if n == 0 or n >= len(ids) or ids[:n] != held:
            return 0
        return n

    def _best_snapshot(self, arr: np.ndarray) -> _Snap | None:
        """The snapshot of the longest prefix of arr[:-1] (under the lock)."""
        lengths = sorted(n for n in self._lengths if n < arr.size)
        if not lengths:
            return None
        h = hashlib.blake2b(digest_size=16)
        prev, best = 0, None
        for n in lengths:
            h.update(arr[prev:n].tobytes())
            prev = n
            key = (n, h.copy().digest())
            e = self._ram.get(key) or self._disk.get(key)
            if e is not None:
                best = e
        return best

    def _spare_slot(self, idle):
        """A slot to give a new state (under the lock): a new one while under max_sessions, else an
        idle one holding nothing, else the least recently used idle one."""
        if len(self._slots) < self.max_sessions:
            slot = _Slot(None)
            self._slots.append(slot)
            return slot
        if idle:
            empty = [s for s in idle if not s.held]
            return empty[0] if empty else min(idle, key=lambda s: s.used)
        raise FlashMoEError(f"all {self.max_sessions} sessions are busy")

    def _pick(self, ids: list[int], arr: np.ndarray) -> tuple[_Slot, int, _Snap | None]:
        with self._lock:
            idle = [s for s in self._slots if not s.busy]
            best, best_n = None, 0
            for s in idle:
                n = self._common(s.held, ids)
                if n > best_n:
                    best, best_n = s, n
            snap = self._best_snapshot(arr) if self.snapshots else None
            if snap is not None and snap.n > best_n:
                best, best_n = self._spare_slot(idle), snap.n  # a session for the load
                self._touch(snap)
            else:
                snap = None
                if best is None:
                    best = self._spare_slot(idle)
            best.busy = True
            best.used = time.monotonic()
        if best.session is None:
            try:
                best.session = self._factory(self.engine, self.context_length)
            except BaseException:
                with self._lock:
                    self._slots.remove(best)
                raise
        return best, best_n, snap

    def _reset(self, slot: _Slot) -> None:
        slot.held = []
        slot.session.reset()

    def _stash(self, slot: _Slot) -> None:
        """Before a live state is replaced: keep it as a snapshot (the lazy end-of-generation
        snapshot of finish) unless one of that prefix exists."""
        held = slot.held
        if not held or len(held) < self.min_tokens or not self.snapshots:
            return
        try:
            if slot.session.pos != len(held):
                return
        except Exception:
            return
        self._snapshot(slot.session, np.asarray(held, dtype=np.int32))

    # ------------------------------------------------------------------ internals: snapshots
    def _can_snapshot(self, sess) -> bool:
        return self.snapshots and hasattr(sess, "save_state") and hasattr(sess, "load_state")

    def _snapshot(self, sess, arr: np.ndarray) -> None:
        """Save sess's state (holding arr) as the snapshot of arr; never raises."""
        if not self._can_snapshot(sess) or arr.size < self.min_tokens:
            return
        if self.ram_bytes == 0 and self.disk_dir is None:
            return  # nowhere to keep it
        key = (int(arr.size), _digest(arr))
        with self._lock:
            e = self._ram.get(key) or self._disk.get(key)
            if e is not None:
                self._touch(e)
                return
        try:
            nbytes = int(sess.state_size())
            mm = mmap.mmap(-1, nbytes)
            sess.save_state(into=mm)
        except Exception as ex:  # a snapshot is an optimisation: the request goes on without it
            log.warning("prefix states: saving a snapshot of %d tokens failed: %s", arr.size, ex)
            self._count["save_failures"] += 1
            return
        if self.ram_bytes is None:
            self._default_budget(mm)
        if self.disk_dir is not None and self._subdir is None:
            self._model_dir(mm)  # adopts the files an earlier process left there
        e = _Snap(key[0], key[1], nbytes, data=mm)
        with self._lock:
            if key in self._ram or key in self._disk:
                mm.close()
                return
            self._ram[key] = e
            self._lengths[e.n] += 1
            self._ram_used += nbytes
            self._count["saved"] += 1
        self._enforce()

    def _default_budget(self, mm) -> None:
        """8 snapshots at full context, in [256 MiB, RAM / 8]."""
        try:
            info = header_info(mm)
            full = info["fixed_bytes"] + info["per_token_bytes"] * self.context_length
        except Exception:
            full = len(mm)
        cap = max(MIN_RAM_BYTES, _total_ram() // 8)
        self.ram_bytes = int(min(max(8 * full, MIN_RAM_BYTES), cap))

    def _touch(self, e: _Snap) -> None:
        """e was used: most recent in its tier (under the lock)."""
        if self._ram.get(e.key) is e:
            self._ram.move_to_end(e.key)
        elif self._disk.get(e.key) is e:
            self._disk.move_to_end(e.key)

    def _drop(self, e: _Snap, why: str | None = None) -> None:
        """Forget e (under the lock); returns nothing; the caller closes / deletes outside."""
        if self._ram.get(e.key) is e:
            del self._ram[e.key]
            self._ram_used -= e.nbytes
            if e.spilling:
                self._leaving -= e.nbytes
        elif self._disk.get(e.key) is e:
            del self._disk[e.key]
            self._disk_used -= e.nbytes
        else:
            return
        self._lengths[e.n] -= 1
        if self._lengths[e.n] <= 0:
            del self._lengths[e.n]
        if why:
            self._count[why] += 1

    def _model_tag(self, data=None) -> str | None:
        """The disk tier's sub-directory name for this model: a hash of its manifest (which lists
        every weight file's sha256) and the experts per token; from a snapshot's header (its
        fingerprint and weights id) for an engine without a path."""
        path = getattr(self.engine, "path", None)
        if path:
            try:
                with open(os.path.join(path, "pyflashmoe.json"), "rb") as f:
                    h = hashlib.blake2b(f.read(), digest_size=8).hexdigest()
                return f"{h}-k{int(getattr(self.engine, 'experts_per_token', 0))}"
            except OSError as ex:
                log.warning("prefix states: cannot read the manifest of %s: %s", path, ex)
                return None
        if data is not None:
            try:
                info = header_info(data)
                return f"{info['fingerprint']:016x}-{info['weights_id']:016x}"
            except ArgumentError:
                return None
        return None

    def _model_dir(self, data=None) -> str | None:
        """The disk tier's directory for this model (created; earlier files adopted), or None."""
        if self.disk_dir is None:
            return None
        if self._subdir is not None:
            return self._subdir
        tag = self._model_tag(data)
        if tag is None:
            return None
        sub = os.path.join(self.disk_dir, tag)
        try:
            os.makedirs(sub, exist_ok=True)
        except OSError as ex:
            log.warning("prefix states: cannot use the disk directory %s: %s", self.disk_dir, ex)
            return None
        self._subdir = sub
        self._adopt(sub)
        return sub

    def _adopt(self, sub: str) -> None:
        """Files of an earlier process in sub join the disk tier (oldest first); stray temporaries go."""
        found = []
        try:
            names = os.listdir(sub)
        except OSError:
            return
        for name in names:
            p = os.path.join(sub, name)
            if name.endswith(".tmp"):
                try:
                    os.unlink(p)
                except OSError:
                    pass
                continue
            if not name.endswith(_SUFFIX):
                continue
            try:
                n_s, d_s = name[:-len(_SUFFIX)].split("-")
                n, dg = int(n_s), bytes.fromhex(d_s)
                st = os.stat(p)
            except (ValueError, OSError):
                continue
            if len(dg) == 16 and n > 0:
                found.append((st.st_mtime, n, dg, st.st_size, p))
        with self._lock:
            for _, n, dg, size, p in sorted(found):
                key = (n, dg)
                if key in self._ram or key in self._disk:
                    continue
                self._disk[key] = _Snap(n, dg, size, path=p)
                self._lengths[n] += 1
                self._disk_used += size
                self._count["adopted"] += 1

    def _enforce(self) -> None:
        """RAM over budget: spill (or drop) the least recently used; disk over its cap: delete the
        oldest. The writes and deletions run outside the lock."""
        if self.ram_bytes is None:
            return
        victims = []
        with self._lock:
            for e in list(self._ram.values()):
                if self._ram_used - self._leaving <= self.ram_bytes:
                    break
                if e.spilling:
                    continue
                e.spilling = True
                self._leaving += e.nbytes
                victims.append(e)
        for e in victims:
            self._spill(e)
        self._trim_disk()

    def _spill(self, e: _Snap) -> None:
        data = e.data
        d = self._model_dir(data) if data is not None else None
        path = None
        if d is not None and e.nbytes <= self.disk_bytes:
            path = os.path.join(d, f"{e.n}-{e.digest.hex()}{_SUFFIX}")
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except OSError as ex:
                log.warning("prefix states: spilling a snapshot to %s failed: %s", d, ex)
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                path = None
        with self._lock:
            if self._ram.get(e.key) is e:
                self._drop(e, None)
                if path is not None and e.key not in self._disk:
                    e.data, e.path, e.spilling = None, path, False
                    self._disk[e.key] = e
                    self._lengths[e.n] += 1
                    self._disk_used += e.nbytes
                    self._count["spilled"] += 1
                else:
                    self._count["dropped"] += 1
        # readers hold their own reference to the mmap while they load from it (see _fetch)

    def _trim_disk(self) -> None:
        doomed = []
        with self._lock:
            while self._disk and self._disk_used > self.disk_bytes:
                e = next(iter(self._disk.values()))
                self._drop(e, "disk_evicted")
                doomed.append(e.path)
        for p in doomed:
            try:
                os.unlink(p)
            except OSError:
                pass

    def _fetch(self, e: _Snap):
        """The snapshot's bytes (an mmap), or None (a disk file that cannot be read: dropped)."""
        data = e.data
        if data is not None:
            return data
        try:
            with open(e.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size <= 0:
                    raise OSError("empty file")
                mm = mmap.mmap(-1, size)
                got = f.readinto(mm)
                if got != size:
                    raise OSError(f"read {got} of {size} bytes")
            with self._lock:
                self._count["disk_reads"] += 1
            return mm
        except OSError as ex:
            self._forget(e, f"cannot read it ({ex})")
            return None

    def _forget(self, e: _Snap, why: str) -> None:
        where = e.path or "RAM"
        log.warning("prefix states: dropped the snapshot of %d tokens at %s: %s", e.n, where, why)
        with self._lock:
            self._drop(e, "load_failures")
        if e.path:
            try:
                os.unlink(e.path)
            except OSError:
                pass

    # ------------------------------------------------------------------ the interface
    def prefill(self, ids):
        """(session, logits of ids[-1], n_cached): see the module docstring."""
        ids = [int(t) for t in ids]
        if not ids:
            raise ArgumentError("prefill: ids must not be empty")
        if len(ids) > self.context_length:
            raise ContextFullError(f"the prompt has {len(ids)} tokens; the context length is "
                                   f"{self.context_length}")
        arr = np.asarray(ids, dtype=np.int32)
        if self.disk_dir is not None and self._subdir is None and self.snapshots:
            self._model_dir()  # adopts the states an earlier process left for this model
        slot, n, snap = self._pick(ids, arr)
        try:
            if snap is not None:
                n, snap = self._load(slot, snap, ids, arr)
            elif n == 0 and (slot.held or slot.session.pos):
                self._stash(slot)
                self._reset(slot)
            logits = self._evaluate(slot.session, arr, n)
        except BaseException:
            try:
                self._reset(slot)
            finally:
                with self._lock:
                    slot.busy = False
            raise
        slot.held = ids
        with self._lock:
            self._count["prefills"] += 1
            self._count["cached_tokens"] += n
            self._count["evaluated_tokens"] += len(ids) - n
            self._count["snapshot_hits" if snap is not None and n else "live_hits" if n else "misses"] += 1
        return slot.session, logits, n

    def _load(self, slot: _Slot, snap: _Snap, ids: list[int], arr: np.ndarray) -> tuple[int, _Snap | None]:
        """slot's session gets snap's state, or the next best snapshot's when that one cannot be
        read or is refused (dropped with a log line): (tokens it holds, the snapshot used); (0,
        None) with the session reset when none loads."""
        self._stash(slot)  # the live state it replaces (when it holds one)
        while snap is not None:
            data = self._fetch(snap)
            if data is not None:
                try:
                    slot.session.load_state(data)
                    slot.held = ids[:snap.n]
                    return snap.n, snap
                except FlashMoEError as ex:
                    self._forget(snap, f"load_state refused it ({ex})")
            with self._lock:
                snap = self._best_snapshot(arr)
                if snap is not None:
                    self._touch(snap)
        self._reset(slot)
        return 0, None

    def _points(self, arr: np.ndarray, start: int) -> list[int]:
        """Snapshot points in (start, len): the last n_boundaries boundary positions, and the end
        of the prompt when it is min_gap past the last boundary."""
        n = arr.size
        pts = []
        if self.boundary_ids and self.n_boundaries:
            seg = arr[start + 1:n]
            mask = np.isin(seg, np.fromiter(self.boundary_ids, dtype=np.int32))
            pos = (np.nonzero(mask)[0] + start + 1).tolist()
            pts = [p for p in pos[-self.n_boundaries:] if p >= self.min_tokens]
        last_b = pts[-1] if pts else start
        if n - last_b >= self.min_gap and n >= self.min_tokens:
            pts.append(n)
        return pts

    def _evaluate(self, sess, arr: np.ndarray, n: int):
        """Evaluate arr[n:] in chunks split at the snapshot points, snapshotting at each."""
        pts = self._points(arr, n) if self._can_snapshot(sess) else []
        start = n
        for p in pts:
            if p >= arr.size:
                break
            sess.eval(arr[start:p])
            start = p
            self._snapshot(sess, arr[:p])
        logits = sess.eval(arr[start:])
        if pts and pts[-1] == arr.size:
            self._snapshot(sess, arr)
        return logits

    def finish(self, sess, held) -> None:
        """Give sess back; held: the ids its state holds (None: unknown, the state is dropped).
        The state is kept live; it becomes a snapshot when the session is given another state."""
        slot = self._slot_of(sess)
        try:
            if held is None or sess.pos != len(held):
                self._reset(slot)
            else:
                slot.held = [int(t) for t in held]
        finally:
            with self._lock:
                slot.busy = False
                slot.used = time.monotonic()

    def sessions(self) -> list:
        """The live sessions (for stats and tests)."""
        return [s.session for s in self._slots if s.session is not None]

    def stats(self) -> dict:
        with self._lock:
            out = {"sessions": len(self._slots), "busy": sum(s.busy for s in self._slots),
                   "max_sessions": self.max_sessions,
                   "snapshots_ram": len(self._ram), "ram_bytes": self._ram_used,
                   "ram_budget": self.ram_bytes, "snapshots_disk": len(self._disk),
                   "disk_bytes": self._disk_used, "disk_budget": self.disk_bytes if self.disk_dir else 0,
                   "disk_dir": self._subdir or self.disk_dir}
            for k in ("prefills", "cached_tokens", "evaluated_tokens", "live_hits", "snapshot_hits", "misses",
                      "saved", "spilled", "dropped", "disk_evicted", "disk_reads", "load_failures",
                      "save_failures", "adopted"):
                out[k] = self._count[k]
            return out

    def clear_snapshots(self) -> None:
        """Forget every snapshot (RAM freed; the disk files of this model deleted)."""
        with self._lock:
            ram, disk = list(self._ram.values()), list(self._disk.values())
            for e in ram + disk:
                self._drop(e, None)
        for e in disk:
            try:
                os.unlink(e.path)
            except OSError:
                pass


def add_state_args(p) -> None:
    """The snapshot flags of `flashmoe serve` (argparse parser p)."""
    p.add_argument("--state-ram", default=None,
                   help="RAM for saved conversation states (prefix snapshots), e.g. 2GiB (default: 8 "
                        "states at full context, 256 MiB .. RAM/8)")
    p.add_argument("--state-dir", default=None,
                   help="directory the states spill to beyond --state-ram (default: none, they are "
                        "dropped); kept across restarts, one sub-directory per model")
    p.add_argument("--state-disk", default=None,
                   help="disk cap of --state-dir (default 8GiB; the oldest states are deleted)")


def state_settings(a) -> dict:
    """StatePool.configure keywords from --state-ram / --state-dir / --state-disk (add_state_args);
    checked here, before the model is loaded."""
    from pyflashmoe.generate import parse_size
    ram = getattr(a, "state_ram", None)
    disk = getattr(a, "state_disk", None)
    d = getattr(a, "state_dir", None)
    if disk is not None and d is None:
        raise ArgumentError("--state-disk needs --state-dir")
    if d is not None and os.path.exists(d) and not os.path.isdir(d):
        raise ArgumentError(f"--state-dir {d} exists and is not a directory")
    return {"ram_bytes": parse_size(ram, "--state-ram") if ram is not None else None,
            "disk_bytes": parse_size(disk, "--state-disk") if disk is not None else None,
            "disk_dir": d}
