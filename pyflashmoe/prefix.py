"""Sessions for many conversations at once, and the prefix states they resume from.

A Qwen3.5 session cannot be rewound like a KV cache (the GatedDeltaNet state is recurrent), so a
request that extends an earlier conversation is served from a session whose state holds a prefix
of its tokens: a live idle session, or (issue 10 item 3) a saved snapshot of one.

THE interface every generation path uses (pyflashmoe.generate, the server's scheduler):

    pool = StatePool(engine, session_factory, context_length, max_sessions=N)
    sess, logits, n_cached = pool.prefill(ids)   # exclusive use of sess until finish()
    ... decode with sess (sess.eval([tok]) or a batched step over several sessions) ...
    pool.finish(sess, held)                      # held: the token ids sess's state now holds,
                                                 # or None when unknown (the state is dropped)

prefill evaluates only ids[n_cached:] (at least one token, so logits are those of ids[-1]);
n_cached is what usage reports as cached tokens. On an error inside prefill the session is reset
and returned to the pool before the error propagates (ContextFullError leaves nothing evaluated).

This first version reuses live idle sessions only (the longest held prefix wins; the least
recently used idle session is reset when none matches and no new one may be made).
"""
from __future__ import annotations

import threading
import time

import numpy as np

from pyflashmoe.errors import ArgumentError, ContextFullError, FlashMoEError


class _Slot:
    __slots__ = ("session", "held", "busy", "used")

    def __init__(self, session):
        self.session = session
        self.held: list[int] = []
        self.busy = False
        self.used = 0.0


class StatePool:
    """Up to max_sessions live sessions; see the module docstring for the contract."""

    def __init__(self, engine, session_factory, context_length: int, max_sessions: int = 1):
        if isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions < 1:
            raise ArgumentError(f"max_sessions must be a positive integer, got {max_sessions!r}")
        self.engine = engine
        self._factory = session_factory
        self.context_length = int(context_length)
        self.max_sessions = max_sessions
        self._slots: list[_Slot] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ internals
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

    def _pick(self, ids: list[int]) -> tuple[_Slot, int]:
        with self._lock:
            idle = [s for s in self._slots if not s.busy]
            best, best_n = None, 0
            for s in idle:
                n = self._common(s.held, ids)
                if n > best_n:
                    best, best_n = s, n
            if best is None:
                if len(self._slots) < self.max_sessions:
                    best = _Slot(None)
                    self._slots.append(best)
                elif idle:
                    best = min(idle, key=lambda s: s.used)
                else:
                    raise FlashMoEError(f"all {self.max_sessions} sessions are busy")
            best.busy = True
            best.used = time.monotonic()
        if best.session is None:
            try:
                best.session = self._factory(self.engine, self.context_length)
            except BaseException:
                with self._lock:
                    self._slots.remove(best)
                raise
        return best, best_n

    @staticmethod
    def _reset(slot: _Slot) -> None:
        slot.held = []
        slot.session.reset()

    # ------------------------------------------------------------------ the interface
    def prefill(self, ids):
        """(session, logits of ids[-1], n_cached): see the module docstring."""
        ids = [int(t) for t in ids]
        if not ids:
            raise ArgumentError("prefill: ids must not be empty")
        if len(ids) > self.context_length:
            raise ContextFullError(f"the prompt has {len(ids)} tokens; the context length is "
                                   f"{self.context_length}")
        slot, n = self._pick(ids)
        try:
            if n == 0 and (slot.held or slot.session.pos):
                self._reset(slot)
            todo = np.asarray(ids[n:], dtype=np.int32)
            logits = slot.session.eval(todo)
        except BaseException:
            try:
                self._reset(slot)
            finally:
                with self._lock:
                    slot.busy = False
            raise
        slot.held = ids
        return slot.session, logits, n

    def finish(self, sess, held) -> None:
        """Give sess back; held: the ids its state holds (None: unknown, the state is dropped)."""
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
            return {"sessions": len(self._slots), "busy": sum(s.busy for s in self._slots),
                    "max_sessions": self.max_sessions}
