"""Model, generate(), logits(), stop strings, stats, and the `flashmoe run` command.

    import pyflashmoe as fm
    model = fm.Model.load("out/")
    for piece in model.generate("Hello", max_tokens=64, temperature=0.7):
        print(piece.text, end="", flush=True)
    logits = model.logits([1, 2, 3])   # float32 [n_tokens, vocab]; fresh state each call
    model = fm.Model.load("out/", parallel=4)      # up to 4 sequences decoded together
    for i, piece in model.generate_batch(["Hi", {"prompt": "Yo", "temperature": 0.8, "seed": 1}]):
        ...                                         # (index into the list, GenerationPiece)

Defaults (documented choices):
* context_length: min(spec max_position_embeddings, 4096) unless given.
* Sampling parameters left as None come from the model dir's generation_config.json when it
  has `do_sample: true` (temperature, top_k, top_p, min_p, repetition_penalty, as in transformers);
  otherwise greedy decoding (temperature 0). An explicit argument always wins.
* EOS: the union of generation_config.json `eos_token_id`, the manifest spec `eos_token_ids` and the
  tokenizer's eos token. An EOS token ends generation with finish_reason "stop" and adds no text.
* Text streams without broken UTF-8 (see tokenizer.StreamDecoder); with stop strings, text that
  could be the start of a stop string is held back until it is decided.
* Sessions come from the Model's StatePool (pyflashmoe.prefix; `parallel` of them, default 1):
  a session keeps its state between generate calls, and a new prompt that extends a held state or
  a saved snapshot (a chat continuing) evaluates only its new tokens. Any error resets the
  session, so the Model stays usable. A generation is a Generation object (prefill / step /
  close) that generate(), generate_batch() and the server's batching loop step; when every
  session is held by an open generation, a new generate()/logits() call supersedes the oldest.
"""
from __future__ import annotations

import collections
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from pyflashmoe.errors import (ArgumentError, BackendError, ContextFullError, FlashMoEError,
                               FormatError)
from pyflashmoe.sampling import Sampler, SamplingParams, logprob as _logprob, validate_max_tokens
from pyflashmoe.sampling import apply_logit_bias, validate_logit_bias

DEFAULT_CONTEXT = 4096
#: the trained demo model shipped inside the package (pyflashmoe/demo/README.md says what it is)
DEMO_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo", "model")


def resolve_model_dir(path, quiet: bool = False) -> str:
    """`path` as a str; None means the embedded demo model, which is announced in one line on
    stderr (unless quiet) so that nobody mistakes its output for their own model's."""
    if path is not None:
        return os.fspath(path)
    if not os.path.isfile(os.path.join(DEMO_MODEL_DIR, "pyflashmoe.json")):
        raise FormatError(f"{DEMO_MODEL_DIR}: the embedded demo model is missing from this install "
                          f"(reinstall pyflashmoe, or pass a model dir)")
    if not quiet:
        print("pyflashmoe: no model dir given: using the embedded demo model (a 17.7M-parameter "
              "Qwen3.5-MoE trained on public-domain English; pass a model dir to use your own)",
              file=sys.stderr)
    return DEMO_MODEL_DIR
_BACKENDS = {"cpu": 0, "cuda": 1}
_STAT_KEYS = ("n_eval_calls", "n_tokens", "bytes_read", "expert_loads", "expert_hits",
              "expert_hits_vram", "ms_total", "ms_attn", "ms_route", "ms_io_wait", "ms_expert",
              "ms_other")


@dataclass
class GenerationPiece:
    """One step of generation. `text` may be "" (bytes held back, or text withheld while it might
    be a stop string); `token` is the sampled id (None only for the empty piece of max_tokens=0);
    `finish_reason` is set on the last piece: "stop" (EOS or stop string) or "length".
    `logprob`: log-probability of `token` under the model's raw distribution (log-softmax of the
    logits before logit_bias, sampling settings or a grammar); `top_logprobs`: the k most likely
    (token id, logprob) pairs of that same distribution, most likely first (generate's
    top_logprobs=k; None when k is 0)."""
    text: str
    token: int | None
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


#: the largest top_logprobs generate() accepts (OpenAI's chat API allows 0..20)
MAX_TOP_LOGPROBS = 20


def top_k_logprobs(logits, k: int, mask=None) -> list[tuple[int, float]]:
    """The k most likely (token id, log-probability) pairs of log-softmax(logits), most likely
    first (ties: lower id first). Only ids that may be sampled are listed (`mask`, a
    sampling.VocabMask: ids past the tokenizer are left out); the normalisation is over every
    logit, as for GenerationPiece.logprob."""
    x = np.asarray(logits, dtype=np.float32)
    m = float(x.max())
    ls = math.log(float(np.exp(x - m, dtype=np.float32).sum(dtype=np.float64)))
    cand = mask.apply(x) if mask is not None else x
    k = min(int(k), cand.shape[0])
    if k <= 0:
        return []
    idx = np.argpartition(-cand, k - 1)[:k] if k < cand.shape[0] else np.arange(cand.shape[0])
    idx = idx[np.lexsort((idx, -cand[idx]))]
    return [(int(i), float(x[i]) - m - ls) for i in idx if np.isfinite(cand[i])]  # as logprob()


_SIZE_RE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*")
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024, "m": 1000 ** 2,
          "mb": 1000 ** 2, "mib": 1024 ** 2, "mi": 1024 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "gib": 1024 ** 3, "gi": 1024 ** 3, "t": 1000 ** 4, "tb": 1000 ** 4, "tib": 1024 ** 4,
          "ti": 1024 ** 4}


def parse_size(v, name="ram_budget") -> int:
    """Bytes from an int or a string like "16GiB", "512MB", "1.5G" (K/M/G/T = powers of 1000,
    Ki/Mi/Gi/Ti or KiB/MiB/GiB/TiB = powers of 1024)."""
    if v is None:
        return 0
    if isinstance(v, bool):
        raise ArgumentError(f"{name} must be a byte count or a size string like '16GiB', got {v!r}")
    if isinstance(v, (int, np.integer)):
        if v < 0:
            raise ArgumentError(f"{name} must be >= 0, got {v}")
        return int(v)
    if isinstance(v, str):
        m = _SIZE_RE.fullmatch(v)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ArgumentError(f"{name}: cannot parse {v!r} as a size (examples: 16GiB, 512MB, 1073741824)")


def _core():
    try:
        from pyflashmoe import _core
    except ImportError as e:  # pragma: no cover - build problem
        raise BackendError(f"the native extension pyflashmoe._core is not built: {e}") from e
    if not hasattr(_core, "Engine"):
        raise BackendError("this build of pyflashmoe._core has no Engine (engine not compiled in)")
    return _core


def cuda_available() -> bool:
    try:
        from pyflashmoe import _core
    except ImportError:
        return False
    f = getattr(_core, "cuda_available", None)
    return bool(f()) if callable(f) else False


def _read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise FormatError(f"{path}: invalid JSON ({what}): {e}") from e


def _as_id_list(v) -> list[int]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v if isinstance(x, (int, np.integer)) and not isinstance(x, bool)]
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return [int(v)]
    return []


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class Model:
    """A converted model directory opened for inference."""

    def __init__(self, engine, session_factory, tokenizer=None, spec=None, context_length=None,
                 path=None, generation_config=None, parallel: int = 1):
        """Low-level constructor (tests inject a fake engine here); use Model.load().

        parallel: how many sessions the Model's StatePool may hold (sequences generated at
        once: generate_batch, the server); sessions past the first are made when first needed."""
        self.engine = engine
        self.path = path
        self.tokenizer = tokenizer
        self.spec = dict(spec or {})
        self.generation_config = dict(generation_config or {})
        self.n_vocab = int(engine.n_vocab)
        max_pos = int(self.spec.get("max_position_embeddings") or 0)
        if context_length is None:
            context_length = min(max_pos, DEFAULT_CONTEXT) if max_pos > 0 else DEFAULT_CONTEXT
        if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)) \
                or context_length <= 0:
            raise ArgumentError(f"context_length must be a positive integer, got {context_length!r}")
        self.context_length = int(context_length)
        if isinstance(parallel, bool) or not isinstance(parallel, (int, np.integer)) or parallel < 1:
            raise ArgumentError(f"parallel must be a positive integer (sessions), got {parallel!r}")
        self._session_factory = session_factory
        # the first session is made now (an error shows at load, as before); the pool takes it
        # as its first session and makes the others when they are first needed
        first = [session_factory(engine, self.context_length)]

        def factory(e, n):
            return first.pop() if first else session_factory(e, n)

        from pyflashmoe.prefix import StatePool
        self.pool = StatePool(engine, factory, self.context_length, max_sessions=int(parallel))
        self.pool.configure(tokenizer=tokenizer)  # snapshots at the chat template's <|im_start|>
        self._last_session = first[0]  # what `session` returns: the last one a generation used
        self._held: list[int] = []  # tokens the last generation left in _last_session's state
        self._open: list = []  # open Generations, oldest first (see _make_room)
        self.eos_token_ids = self._eos_ids()
        self.stats: dict = {}
        self.batch_stats: list = []

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path=None, backend: str = "cpu", threads: int | None = None,
             io_threads: int | None = None, direct_io: bool = False, ram_budget=None,
             experts_per_token: int | None = None, context_length: int | None = None,
             vram_budget=None, debug: dict | None = None, parallel: int = 1) -> "Model":
        """Open a model dir written by `flashmoe convert` (None: the embedded demo model).

        backend: "cpu", "cuda" (BackendError unless the extension has CUDA) or "auto" (CUDA when
        available, else CPU). ram_budget: bytes for the engine's own expert cache (int, or a string
        like "16GiB"); None/0 relies on the OS page cache. experts_per_token overrides the
        model's top-K. context_length defaults to min(max_position_embeddings, 4096).
        vram_budget (CUDA): bytes of VRAM for the expert cache (int or "16GiB"); None: the
        backend's default (60% of free VRAM). debug: the CUDA backend's comparison switches
        (pyflashmoe.switches; csrc/fm.h fm_debug_params) over those set by FM_CUDA_* variables,
        which are read here, once. parallel: sessions the Model may hold at once (sequences
        decoded together by generate_batch or the server; each costs a context's KV rows and
        recurrent state, made when first needed); 1 keeps one session."""
        from pyflashmoe import format as _fmt
        path = resolve_model_dir(path)
        manifest_path = os.path.join(path, "pyflashmoe.json")
        if not os.path.lexists(path):
            _fmt.recover_replaced(path)   # a `convert --force` killed mid-replace (format.AtomicDir)
        if not os.path.isdir(path):
            raise FormatError(f"{path}: not a directory (expected a model dir made by `flashmoe convert`)")
        manifest = _fmt.read_json_file(manifest_path, "manifest")
        if manifest is None and not os.path.lexists(manifest_path):
            raise FormatError(f"{manifest_path}: not found (is {path} a model dir made by `flashmoe convert`?)")
        if not isinstance(manifest, dict) or not isinstance(manifest.get("spec"), dict):
            raise FormatError(f"{manifest_path}: field 'spec' missing or not an object")
        spec = manifest["spec"]
        if not isinstance(backend, str) or backend.lower() not in ("cpu", "cuda", "auto"):
            raise ArgumentError(f"backend must be 'cpu', 'cuda' or 'auto', got {backend!r}")
        backend = backend.lower()
        if backend == "auto":
            backend = "cuda" if cuda_available() else "cpu"
        elif backend == "cuda" and not cuda_available():
            raise BackendError("backend 'cuda': this build of pyflashmoe has no CUDA support "
                               "(or no GPU is visible); use backend='cpu'")
        for name, v in (("threads", threads), ("io_threads", io_threads),
                        ("experts_per_token", experts_per_token)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0):
                raise ArgumentError(f"{name} must be a non-negative integer, got {v!r}")
        if experts_per_token is not None and experts_per_token == 0:
            raise ArgumentError("experts_per_token must be >= 1 (None = the model's own)")
        n_exp = spec.get("n_experts") if isinstance(spec.get("n_experts"), int) else 0
        if experts_per_token is not None and n_exp and experts_per_token > n_exp:
            raise ArgumentError(f"experts_per_token={experts_per_token} exceeds the model's n_experts={n_exp}")
        budget = parse_size(ram_budget, "ram_budget")
        vbudget = parse_size(vram_budget, "vram_budget")
        from pyflashmoe.switches import debug_from_env
        if debug is not None and not isinstance(debug, dict):
            raise ArgumentError(f"debug must be a dict of switches, got {type(debug).__name__}")
        dbg = {**debug_from_env(), **(debug or {})}
        # the one model-dir check (paths inside the dir; every offset / size / dtype against the
        # file headers), after the cheap argument checks and before the C core maps anything
        manifest = _fmt.validate(path)
        spec = manifest["spec"]
        core = _core()
        engine = core.Engine(path, backend=_BACKENDS[backend], n_threads=int(threads or 0),
                             io_threads=int(io_threads or 0), direct_io=bool(direct_io),
                             ram_budget=budget, experts_per_token=int(experts_per_token or 0),
                             vram_budget=vbudget, debug=dbg)
        tokenizer = None
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            from pyflashmoe.tokenizer import Tokenizer
            tokenizer = Tokenizer.from_dir(path)
        gen_cfg = _fmt.read_json_file(os.path.join(path, "generation_config.json"), "generation config") or {}
        if not isinstance(gen_cfg, dict):
            gen_cfg = {}
        m = cls(engine, lambda e, n: core.Session(e, n), tokenizer=tokenizer, spec=spec,
                context_length=context_length, path=path, generation_config=gen_cfg,
                parallel=parallel)
        m.manifest = manifest
        m.backend = backend
        return m

    def _eos_ids(self) -> set[int]:
        ids = set(_as_id_list(self.generation_config.get("eos_token_id")))
        ids |= set(_as_id_list(self.spec.get("eos_token_ids")))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return {i for i in ids if 0 <= i < self.n_vocab}

    def default_sampling(self) -> dict:
        """Sampling defaults from generation_config.json (transformers semantics), else greedy."""
        g = self.generation_config
        if not g.get("do_sample"):
            return {"temperature": 0.0}
        d = {"temperature": float(g.get("temperature", 1.0))}
        if g.get("top_k") is not None:
            d["top_k"] = int(g["top_k"])
        if g.get("top_p") is not None:
            d["top_p"] = float(g["top_p"])
        if g.get("min_p") is not None:
            d["min_p"] = float(g["min_p"])
        if g.get("repetition_penalty") is not None:
            d["repetition_penalty"] = float(g["repetition_penalty"])
        return d

    def close(self) -> None:
        """Free the sessions and the engine (file handles, mappings, caches)."""
        for g in list(self._open):
            g.close(ok=False)
        self._last_session = None
        self.pool = None
        self.engine = None
        self._held = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"Model(path={self.path!r}, arch={self.spec.get('arch')!r}, vocab={self.n_vocab}, "
                f"context_length={self.context_length})")

    # ------------------------------------------------------------------ sessions
    @property
    def session(self):
        """The session the last generation (or logits call) used; the first one before any.
        For inspection (pos, stats, trace); generation takes its sessions from self.pool."""
        return self._last_session

    @session.setter
    def session(self, value):
        self._last_session = value

    @property
    def parallel(self) -> int:
        """How many sessions the pool may hold (sequences generated at once)."""
        return self.pool.max_sessions if self.pool is not None else 0

    def ensure_parallel(self, n: int) -> None:
        """Let the pool hold at least n sessions (never fewer than now)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ArgumentError(f"parallel must be a positive integer (sessions), got {n!r}")
        self._check_open()
        if int(n) > self.pool.max_sessions:
            self.pool.max_sessions = int(n)

    def _check_open(self):
        if self.engine is None or self.pool is None:
            raise FlashMoEError("this Model is closed")

    def _make_room(self):
        """Before taking a session: when every session of the pool is held by an open
        generation, the oldest one is superseded (its state is kept; its next step raises), so
        a new generate()/logits() call always runs, as with one session before the pool."""
        self._check_open()
        st = self.pool.stats()
        if st["busy"] < st["max_sessions"]:
            return
        self._open = [g for g in self._open if not g.closed]
        if self._open:
            self._open[0]._supersede()

    def _reset(self):
        """Drop every held state: open generations end (superseded), idle sessions are reset."""
        self._held = []
        self._check_open()
        for g in list(self._open):
            g._supersede(keep=False)
        for sess in self.pool.sessions():
            try:
                self.pool.finish(sess, None)  # every session is idle now: resets its state
            except FlashMoEError:
                pass

    def _eval_batch(self, sessions, tokens) -> np.ndarray:
        """float32 [n, vocab]: one token per session, each session at its own position (all
        sessions of this Model's engine, distinct). The engine's batched step (every MoE layer
        reads the union of the batch's experts once) when it has one, else one eval per
        session with the same contract: ContextFullError before anything is evaluated when a
        session is full; on any other error every session of the batch is reset to position 0."""
        toks = np.ascontiguousarray(np.asarray(tokens, dtype=np.int32).reshape(-1))
        sessions = list(sessions)
        if len(sessions) != toks.size:
            raise ArgumentError(f"_eval_batch: {len(sessions)} sessions but {toks.size} tokens")
        if hasattr(self.engine, "eval_batch"):
            # the rows in the pool's session order: the leading session (whose scratch and, on
            # CUDA, per-batch-size graphs the step uses) stays the same while sequences come and go
            rank = {id(x): k for k, x in enumerate(self.pool.sessions())} if self.pool else {}
            order = sorted(range(len(sessions)), key=lambda k: rank.get(id(sessions[k]), len(rank) + k))
            if order != list(range(len(sessions))):
                out = np.asarray(self.engine.eval_batch([sessions[k] for k in order], toks[order]),
                                 dtype=np.float32).reshape(len(sessions), self.n_vocab)
                res = np.empty_like(out)
                res[order] = out
                return res
            return np.asarray(self.engine.eval_batch(sessions, toks), dtype=np.float32).reshape(
                len(sessions), self.n_vocab)
        for i, s in enumerate(sessions):
            n_ctx = getattr(s, "n_ctx", self.context_length)
            if s.pos + 1 > n_ctx:
                raise ContextFullError(f"session {i} of the batch is full ({s.pos} of {n_ctx} "
                                       f"positions)")
        try:
            return np.stack([np.asarray(s.eval(toks[i:i + 1]), dtype=np.float32).reshape(-1)
                             for i, s in enumerate(sessions)])
        except BaseException:
            for s in sessions:
                try:
                    s.reset()
                except Exception:
                    pass
            raise

    # ------------------------------------------------------------------ low level
    def _check_tokens(self, tokens) -> np.ndarray:
        if isinstance(tokens, (str, bytes)):
            raise ArgumentError("tokens must be a sequence of token ids, not a string (use model.tokenizer.encode)")
        try:
            arr = np.asarray(tokens)
        except Exception as e:
            raise ArgumentError(f"tokens: cannot convert to an integer array: {e}") from e
        if arr.ndim != 1:
            raise ArgumentError(f"tokens must be 1-D, got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ArgumentError(f"tokens must be integers, got dtype {arr.dtype}")
        if arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= self.n_vocab:
                bad = lo if lo < 0 else hi
                raise ArgumentError(f"token id {bad} is outside the vocabulary [0, {self.n_vocab})")
        return np.ascontiguousarray(arr, dtype=np.int32)

    def logits(self, tokens) -> np.ndarray:
        """float32 [n_tokens, vocab] logits of every position, computed from a fresh state."""
        arr = self._check_tokens(tokens)
        if arr.size == 0:
            raise ArgumentError("tokens must not be empty")
        if arr.size > self.context_length:
            raise ContextFullError(f"{arr.size} tokens do not fit the context length {self.context_length}")
        self._make_room()
        # a session from the pool (its one-token prefill is discarded: fresh state below)
        sess, _, _ = self.pool.prefill([int(arr[0])])
        self._last_session = sess
        self._held = []
        try:
            sess.reset()
            out = sess.eval(arr, all_logits=True)
        finally:
            self.pool.finish(sess, None)  # the state is not kept (as before the pool)
        return np.asarray(out, dtype=np.float32).reshape(arr.size, self.n_vocab)

    def encode_prompt(self, prompt, chat_template_kwargs=None) -> list[int]:
        """Token ids of a prompt: a string (encoded as is), a list of message dicts (chat
        template with add_generation_prompt=True), or a list of token ids."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise FormatError(f"{self.path}: no tokenizer.json in the model dir; pass token ids")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            if self.tokenizer is None:
                raise FormatError(f"{self.path}: no tokenizer.json in the model dir; cannot apply a chat template")
            kw = dict(chat_template_kwargs or {})
            return self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True,
                                                      tokenize=True, **kw)
        if isinstance(prompt, np.ndarray) or (isinstance(prompt, (list, tuple)) and
                                              all(isinstance(t, (int, np.integer)) and not isinstance(t, bool)
                                                  for t in prompt)):
            return [int(t) for t in self._check_tokens(prompt)]
        raise ArgumentError("prompt must be a str, a list of {'role','content'} message dicts, or a list of token ids")

    # ------------------------------------------------------------------ generation
    def generate(self, prompt, max_tokens: int = 256, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None, stop=None,
                 chat_template_kwargs: dict | None = None, ignore_eos: bool = False,
                 logprobs: bool = True, logits_processor=None,
                 logit_bias: dict | None = None,
                 top_logprobs: int = 0) -> Iterator[GenerationPiece]:
        """Stream GenerationPieces. Arguments are validated before the generator is returned
        (ArgumentError), so a bad call fails at once and leaves the model untouched.

        logits_processor: optional fn(generated_ids: list[int], logits: float32 [vocab]) -> logits,
        called before each token is sampled (e.g. pyflashmoe.constrain's JSON masks); logprobs
        stay those of the unprocessed logits.

        logit_bias: {token id: bias in [-100, 100]} added to the logits before every sampled
        token (before logits_processor, so a grammar's mask still wins; OpenAI semantics).

        top_logprobs: 0..20; k > 0 sets each piece's `top_logprobs` to the k most likely
        (token id, logprob) pairs of the raw distribution at that step."""
        return self._generate(self._prepare(
            prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop,
            chat_template_kwargs=chat_template_kwargs, ignore_eos=ignore_eos, logprobs=logprobs,
            logits_processor=logits_processor, logit_bias=logit_bias, top_logprobs=top_logprobs))

    _PREPARE_KEYS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                     "seed", "stop", "chat_template_kwargs", "ignore_eos", "logprobs",
                     "logits_processor", "logit_bias", "top_logprobs")

    def _prepare(self, prompt, max_tokens: int = 256, temperature=None, top_k=None, top_p=None,
                 min_p=None, repetition_penalty=None, seed=None, stop=None,
                 chat_template_kwargs=None, ignore_eos=False, logprobs=True, logits_processor=None,
                 logit_bias=None, top_logprobs=0) -> "Generation":
        """generate()'s arguments, validated, as a Generation that has not started."""
        self._check_open()
        max_tokens = validate_max_tokens(max_tokens)
        if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, (int, np.integer)) \
                or not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise ArgumentError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], "
                                f"got {top_logprobs!r}")
        bias = validate_logit_bias(logit_bias, self.n_vocab)
        given = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
                 "repetition_penalty": repetition_penalty}
        kw = self.default_sampling()
        kw.update({k: v for k, v in given.items() if v is not None})
        params = SamplingParams(seed=seed, **kw)
        if stop is None:
            stops = []
        elif isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
            stops = list(stop)
        else:
            raise ArgumentError(f"stop must be a string or a list of strings, got {stop!r}")
        if any(s == "" for s in stops):
            raise ArgumentError("stop strings must not be empty")
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise ArgumentError("chat_template_kwargs must be a dict")
        ids = self.encode_prompt(prompt, chat_template_kwargs)
        if not ids:
            raise ArgumentError("the prompt encodes to zero tokens")
        if len(ids) >= self.context_length:
            raise ContextFullError(f"the prompt has {len(ids)} tokens; the context length is "
                                   f"{self.context_length} (pass context_length= to Model.load)")
        if stops and self.tokenizer is None:
            raise ArgumentError("stop strings need a tokenizer (the model dir has no tokenizer.json)")
        if logits_processor is not None and not callable(logits_processor):
            raise ArgumentError("logits_processor must be callable (generated_ids, logits) -> logits")
        return Generation(self, ids, max_tokens, params, stops, ignore_eos, logprobs,
                          logits_processor, bias, int(top_logprobs))

    def _vocab_mask(self):
        """The ids that may be sampled (sampling.vocab_mask), computed once per model and
        tokenizer: ids past the tokenizer (a padded embedding) are never drawn."""
        from pyflashmoe.sampling import vocab_mask
        cached = getattr(self, "_vmask_cache", None)
        if cached is None or cached[0] is not self.tokenizer or cached[1] != self.n_vocab:
            cached = (self.tokenizer, self.n_vocab, vocab_mask(self.tokenizer, self.n_vocab))
            self._vmask_cache = cached
        return cached[2]

    def _generate(self, g: "Generation"):
        """generate()'s generator over one Generation, evaluated alone on its session."""
        ok = True
        try:
            logits = g.prefill()
            while True:
                piece, tok = g.step(logits)
                yield piece
                if tok is None:
                    return
                g.check_superseded()
                logits = g.eval_next()
        except GeneratorExit:
            raise  # the caller stopped early: the state is consistent and kept
        except BaseException:
            ok = False
            raise
        finally:
            g.close(ok=ok)

    def generate_batch(self, prompts, parallel: int | None = None, **common
                       ) -> Iterator[tuple[int, GenerationPiece]]:
        """Generate for several prompts together: yields (index into prompts, GenerationPiece).

        Each item of prompts is a prompt (as for generate()) or a dict of generate() keyword
        arguments with a "prompt" key (its own sampling parameters, seed, stop, max_tokens, ...);
        common: generate() keyword arguments for every item (an item's own win). At most
        `parallel` sequences (default: the Model's, Model.load(parallel=N)) run at once; the
        others wait and join as sequences finish. Each running sequence has its own session; one
        decode step evaluates a token of every running sequence together (Model._eval_batch).
        Each sequence's pieces are those generate() would give for it alone (greedy decoding
        gives the same tokens; a seed gives the same draws). Every argument is validated before
        the generator is returned. Afterwards self.batch_stats holds each item's stats dict and
        self.stats the totals ("generated_tokens", "wall_s", "decode_tps" aggregate, ...)."""
        self._check_open()
        if isinstance(prompts, (str, bytes, dict)) or not isinstance(prompts, (list, tuple)):
            raise ArgumentError("prompts must be a list of prompts (or of dicts of generate() "
                                "arguments with a 'prompt' key)")
        if not prompts:
            raise ArgumentError("prompts must not be empty")
        cap = self.parallel if parallel is None else parallel
        if isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < 1:
            raise ArgumentError(f"parallel must be a positive integer, got {parallel!r}")
        if cap > self.parallel:
            raise ArgumentError(f"parallel={cap} exceeds the Model's {self.parallel} sessions "
                                f"(Model.load(parallel=N))")
        bad = [k for k in common if k not in self._PREPARE_KEYS]
        if bad:
            raise ArgumentError(f"generate_batch: unknown argument {bad[0]!r}")
        gens = []
        for i, item in enumerate(prompts):
            kw = dict(common)
            if isinstance(item, dict):
                if "prompt" not in item:
                    raise ArgumentError(f"prompts[{i}]: a dict item needs a 'prompt' key")
                extra = [k for k in item if k != "prompt" and k not in self._PREPARE_KEYS]
                if extra:
                    raise ArgumentError(f"prompts[{i}]: unknown argument {extra[0]!r}")
                kw.update({k: v for k, v in item.items() if k != "prompt"})
                item = item["prompt"]
            try:
                gens.append(self._prepare(item, **kw))
            except ArgumentError as e:
                raise ArgumentError(f"prompts[{i}]: {e}") from None
            except ContextFullError as e:
                raise ContextFullError(f"prompts[{i}]: {e}") from None
        self.batch_stats = [g.stats for g in gens]
        return self._generate_batch(gens, int(cap))

    def _generate_batch(self, gens, cap):
        waiting = collections.deque(enumerate(gens))
        running: list = []  # (index, Generation), each with a token to evaluate
        t0 = time.perf_counter()
        total = {"sequences": len(gens), "parallel": cap, "generated_tokens": 0, "steps": 0,
                 "batched_tokens": 0, "prompt_tokens": sum(len(g.ids) for g in gens),
                 "cached_tokens": 0, "wall_s": 0.0, "tps": 0.0}
        self.stats = total
        ok = True
        try:
            while waiting or running:
                while waiting and len(running) < cap:  # join: prefill, then the first token
                    i, g = waiting.popleft()
                    logits = g.prefill(set_model_stats=False)
                    piece, tok = g.step(logits)
                    yield i, piece
                    if tok is None:
                        g.close()
                    else:
                        running.append((i, g))
                if not running:
                    continue
                for _, g in running:
                    g.check_superseded()
                rows = self._eval_batch([g.session for _, g in running],
                                        [g.next_token for _, g in running])
                total["steps"] += 1
                total["batched_tokens"] += len(running)
                still = []
                for k, (i, g) in enumerate(running):
                    piece, tok = g.step(rows[k])
                    if tok is None:
                        g.close()  # leaves: its session goes back to the pool
                    else:
                        still.append((i, g))
                    yield i, piece
                running = still
        except GeneratorExit:
            raise
        except BaseException:
            ok = False
            raise
        finally:
            for _, g in running:
                g.close(ok=ok)
            for _, g in waiting:
                g.close(ok=ok)
            total["generated_tokens"] = sum(g.stats["generated_tokens"] for g in gens)
            total["cached_tokens"] = sum(g.stats["cached_tokens"] for g in gens)
            total["wall_s"] = time.perf_counter() - t0
            dec = sum(g.stats.get("decode_tokens", 0) for g in gens)
            total["decode_tokens"] = dec
            total["tps"] = total["generated_tokens"] / total["wall_s"] if total["wall_s"] > 0 else 0.0

    def generate_text(self, prompt, **kw) -> str:
        """The whole completion as one string (convenience over generate())."""
        return "".join(p.text for p in self.generate(prompt, **kw))


class Generation:
    """One sequence being generated, stepped by its owner (Model.generate, Model.generate_batch,
    the server's engine loop):

        g = model._prepare(prompt, **generate_kwargs)   # validated; nothing evaluated yet
        logits = g.prefill()                 # a session from model.pool (prefix reuse)
        while True:
            piece, tok = g.step(logits)      # sample; tok None: finished (piece is the last)
            ... send piece ...
            if tok is None: break
            logits = g.eval_next()           # or a batched step: model._eval_batch(sessions, toks)
        g.close(ok=True)                     # the session goes back (pool.finish); idempotent

    step(logits) takes the logits of the token it returned last (of the prompt's last token the
    first time). close(ok=False) after an error drops the session's state. A generation whose
    session was taken by a newer one (Model._make_room) is superseded: check_superseded() /
    step() raise FlashMoEError."""

    def __init__(self, model, ids, max_tokens, params, stops, ignore_eos, want_logprobs,
                 processor=None, bias=None, n_top=0):
        self.model = model
        self.n_top = n_top
        self.ids = list(ids)
        self.max_tokens = max_tokens
        self.params = params
        self.stops = stops
        self.want_logprobs = want_logprobs
        self.processor = processor
        self.bias = bias
        self.eos = set() if ignore_eos else model.eos_token_ids
        self.stats = {"prompt_tokens": len(self.ids), "generated_tokens": 0, "cached_tokens": 0,
                      "prompt_s": 0.0, "decode_s": 0.0, "prompt_tps": 0.0, "decode_tps": 0.0,
                      "finish_reason": None}
        self.session = None
        self.next_token: int | None = None  # sampled, to be evaluated before the next step
        self.finished = False
        self.closed = False
        self.superseded = False
        self._sampler = None
        self._decoder = None
        self._held: list[int] = []  # the tokens the session's state holds
        self._pending = ""
        self._n = 0
        self._generated: list[int] = []
        self._t0 = self._t_first = None
        self._s1 = {}

    # ----- life cycle
    def prefill(self, set_model_stats: bool = True):
        """Take a session from the model's pool and evaluate the prompt's uncached tokens;
        returns the logits of the prompt's last token (None when max_tokens is 0: nothing is
        evaluated)."""
        m = self.model
        if set_model_stats:
            m.stats = self.stats
        if self.session is not None or self.closed:
            raise FlashMoEError("Generation.prefill: already started")
        self._mask = m._vocab_mask()
        self._sampler = Sampler(self.params, mask=self._mask)
        self._sampler.add_seen(self.ids)
        self._decoder = m.tokenizer.stream_decoder() if m.tokenizer is not None else None
        if self.max_tokens == 0:
            return None
        self._t0 = time.perf_counter()
        m._make_room()
        before = {id(x): _stats_of(x) for x in m.pool.sessions()}
        try:
            sess, logits, n_cached = m.pool.prefill(self.ids)
        except BaseException:
            m._held = []
            self.closed = True
            raise
        t1 = time.perf_counter()
        self.session = sess
        m._last_session = sess
        m._open.append(self)
        self._held = list(self.ids)
        self._s1 = _stats_of(sess)
        st = self.stats
        st["cached_tokens"] = n_cached
        st["prompt_s"] = t1 - self._t0
        n_eval = len(self.ids) - n_cached
        st["prompt_tps"] = n_eval / st["prompt_s"] if st["prompt_s"] > 0 else 0.0
        st["prefill"] = _diff(before.get(id(sess), {}), self._s1)
        return logits

    def check_superseded(self):
        if self.superseded:
            raise FlashMoEError("this generation was superseded: another generate()/logits() "
                                "call needed its session (all of the Model's sessions were in "
                                "use; Model.load(parallel=N) gives N)")

    def eval_next(self):
        """Evaluate next_token alone on this generation's session; its logits."""
        self.check_superseded()
        return self.session.eval(np.asarray([self.next_token], dtype=np.int32))

    def step(self, logits):
        """(GenerationPiece, the token to evaluate next, or None when this was the last piece)."""
        if self.finished:
            raise FlashMoEError("Generation.step: the generation has finished")
        self.check_superseded()
        if self._sampler is None:
            raise FlashMoEError("Generation.step: prefill() first")
        st = self.stats
        if self.max_tokens == 0:
            return self._finish("length", GenerationPiece("", None, "length"))
        if self.next_token is not None:  # the logits are those of next_token: it is in the state
            self._held.append(self.next_token)
            self.next_token = None
        x = logits if self.bias is None else apply_logit_bias(logits, self.bias)
        if self.processor is not None:
            tok = self._sampler.sample(self.processor(self._generated, x))
            self._generated.append(tok)
        else:
            tok = self._sampler.sample(x)
        lp = _logprob(logits, tok) if self.want_logprobs else None
        top = top_k_logprobs(logits, self.n_top, self._mask) if self.n_top else None
        self._n += 1
        st["generated_tokens"] = self._n
        if self._t_first is None:
            self._t_first = time.perf_counter()
        stops, decoder = self.stops, self._decoder
        if tok in self.eos:
            text = self._pending + (decoder.flush() if decoder else "")
            self._pending = ""
            if stops:
                cut = [text.find(s) for s in stops if s in text]
                if cut:
                    text = text[:min(cut)]
            return self._finish("stop", GenerationPiece(text, tok, "stop", lp, top))
        new = decoder.add(tok) if decoder else ""
        last = self._n >= self.max_tokens or len(self._held) >= self.model.context_length
        if last and decoder:
            new += decoder.flush()
        pending = self._pending + new
        if stops:
            hits = [pending.find(s) for s in stops if s in pending]
            if hits:
                self._pending = ""
                return self._finish("stop", GenerationPiece(pending[:min(hits)], tok, "stop", lp, top))
            keep = 0 if last else _stop_prefix_len(pending, stops)
            out, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
        else:
            out, pending = pending, ""
        if last:
            self._pending = ""
            return self._finish("length", GenerationPiece(out + pending, tok, "length", lp, top))
        self._pending = pending
        self.next_token = tok
        return GenerationPiece(out, tok, None, lp, top), tok

    def _finish(self, reason, piece):
        self.finished = True
        self.stats["finish_reason"] = reason
        return piece, None

    def close(self, ok: bool = True) -> None:
        """Give the session back to the pool with the state it holds (ok=False: after an error,
        the state is dropped). Fills the decode stats. Idempotent."""
        if self.closed:
            return
        self.closed = True
        m = self.model
        st = self.stats
        t2 = time.perf_counter()
        st["decode_s"] = (t2 - self._t_first) if self._t_first is not None else 0.0
        n_dec = max(0, self._n - 1)  # tokens evaluated after the first sampled one
        st["decode_tokens"] = n_dec
        st["decode_tps"] = n_dec / st["decode_s"] if st["decode_s"] > 0 and n_dec else 0.0
        if self._t0 is not None:
            st["total_s"] = t2 - self._t0
        if self.session is None:
            return
        st["decode"] = _diff(self._s1, _stats_of(self.session))
        try:
            m._open.remove(self)
        except ValueError:
            pass
        if self.superseded or m.pool is None:
            return
        held = self._held if ok else None
        kept = held is not None and getattr(self.session, "pos", -1) == len(held)
        try:
            m.pool.finish(self.session, held)
        finally:
            if m._last_session is self.session:
                m._held = list(held) if kept else []

    def _supersede(self, keep: bool = True):
        """Another generation needs this one's session: give it back now (its state kept when
        keep and consistent); this generation's next step raises."""
        if self.closed:
            return
        self.close(ok=keep)
        self.superseded = True


def _stats_of(sess) -> dict:
    try:
        return dict(sess.stats())
    except Exception:
        return {}


def _diff(a: dict, b: dict) -> dict:
    return {k: b.get(k, 0) - a.get(k, 0) for k in _STAT_KEYS if k in b}


# ---------------------------------------------------------------------- flashmoe run
def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024.0
    return f"{n:.1f} TiB"


def load_from_args(a) -> "Model":
    """Model.load with the engine options shared by `flashmoe run`, `chat` and `serve`."""
    return Model.load(a.dir, backend=getattr(a, "backend", "cpu") or "cpu",
                      threads=getattr(a, "threads", None), io_threads=getattr(a, "io_threads", None),
                      direct_io=bool(getattr(a, "direct_io", False)),
                      ram_budget=getattr(a, "ram_budget", None),
                      experts_per_token=getattr(a, "k", None),
                      context_length=getattr(a, "ctx", None),
                      vram_budget=getattr(a, "vram_budget", None),
                      parallel=getattr(a, "parallel", None) or 1)


def run_cli(a) -> int:
    """`flashmoe run DIR -p PROMPT ...`: stream the completion to stdout, speeds to stderr."""
    # validate what was given before the (slow) model load
    given = {"temperature": getattr(a, "temp", None), "top_k": getattr(a, "top_k", None),
             "top_p": getattr(a, "top_p", None), "min_p": getattr(a, "min_p", None),
             "repetition_penalty": getattr(a, "repeat_penalty", None)}
    SamplingParams(seed=a.seed, **{k: v for k, v in given.items() if v is not None})
    validate_max_tokens(a.max_tokens)
    model = load_from_args(a)
    prompt = a.prompt
    if getattr(a, "chat", False):
        prompt = [{"role": "user", "content": a.prompt}]
    gen = model.generate(prompt, max_tokens=a.max_tokens, temperature=getattr(a, "temp", None),
                         top_k=getattr(a, "top_k", None), top_p=getattr(a, "top_p", None),
                         min_p=getattr(a, "min_p", None),
                         repetition_penalty=getattr(a, "repeat_penalty", None), seed=a.seed,
                         stop=getattr(a, "stop", None) or None)
    timing = bool(getattr(a, "timing", False))
    trace_note = tr0 = None
    if timing:  # per-layer ms and routing counts from the C core's routing trace (CPU backend)
        try:
            model.session.set_trace(cap_tokens=0, counts=True, layer_ms=True)
        except (BackendError, AttributeError) as e:
            trace_note = f"per-layer breakdown: not recorded ({e})"
    out = sys.stdout
    for i, piece in enumerate(gen):
        if i == 0 and timing and trace_note is None:
            tr0 = model.session.trace()  # after the prefill (and the first token's sampling)
        if piece.text:
            out.write(piece.text)
            out.flush()
    out.write("\n")
    out.flush()
    s = model.stats
    err = sys.stderr
    print(f"prompt: {s['prompt_tokens']} tokens, {s['prompt_tps']:.2f} tok/s | "
          f"decode: {s['generated_tokens']} tokens, {s['decode_tps']:.2f} tok/s | "
          f"finish: {s['finish_reason']}", file=err)
    if getattr(a, "timing", False):
        for phase in ("prefill", "decode"):
            d = s.get(phase) or {}
            nt = d.get("n_tokens") or 0
            if not nt:
                continue
            per = lambda k: d.get(k, 0.0) / nt  # noqa: E731
            loads, hits = d.get("expert_loads", 0), d.get("expert_hits", 0) + d.get("expert_hits_vram", 0)
            rate = hits / (loads + hits) if loads + hits else 0.0
            print(f"{phase} per token ({nt} tokens): total {per('ms_total'):.2f} ms | "
                  f"attention {per('ms_attn'):.2f} | routing {per('ms_route'):.2f} | "
                  f"I/O wait {per('ms_io_wait'):.2f} | experts {per('ms_expert'):.2f} | "
                  f"other {per('ms_other'):.2f} ms", file=err)
            print(f"{phase} I/O: {_fmt_bytes(d.get('bytes_read', 0) / nt)} read per token, "
                  f"{loads / nt:.1f} expert loads/token, cache hits {hits} ({100 * rate:.1f}%"
                  f"{', VRAM ' + str(d.get('expert_hits_vram', 0)) if d.get('expert_hits_vram') else ''})",
                  file=err)
        tr = model.session.trace() if trace_note is None else None
        if trace_note is not None:
            print(trace_note, file=err)
        elif tr is not None and tr["n_tokens"]:
            # decode rows when there were decode tokens (trace minus its snapshot after the prefill)
            ms, nt, what = tr["layer_ms"], tr["n_tokens"], "prompt + decode"
            if tr0 is not None and nt > tr0["n_tokens"]:
                ms, nt, what = ms - tr0["layer_ms"], nt - tr0["n_tokens"], "decode"
            cnt = tr["counts"]
            kinds = [(L.get("attn", "?"), L.get("ffn", "?")) for L in (model.spec.get("layers") or [])]
            print(f"per layer ({what}, ms/token over {nt} tokens; routing over all {tr['n_tokens']} "
                  f"tokens: experts used, entropy of the pick frequency, top 3):", file=err)
            for il in range(ms.shape[0]):
                kind = "+".join(kinds[il]) if il < len(kinds) else "?"
                line = (f"  layer {il:>2} {kind:<14} mixer {ms[il, 0] / nt:7.3f} | ffn {ms[il, 1] / nt:7.3f} ms")
                c = cnt[il].astype(np.float64)
                tot = c.sum()
                if tot > 0 and c.size > 1:
                    f = c / tot
                    nz = f[f > 0]
                    ent = float(-(nz * np.log2(nz)).sum())
                    top = np.argsort(-c, kind="stable")[:3]
                    line += (f" | {int((c > 0).sum())}/{c.size} experts, entropy {ent:.2f} of "
                             f"{math.log2(c.size):.2f} bits, top " +
                             ", ".join(f"e{int(e)} {100 * f[e]:.1f}%" for e in top))
                print(line, file=err)
    return 0
