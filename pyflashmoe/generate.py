"""Model, generate(), logits(), stop strings, stats, and the `flashmoe run` command.

    import pyflashmoe as fm
    model = fm.Model.load("out/")
    for piece in model.generate("Hello", max_tokens=64, temperature=0.7):
        print(piece.text, end="", flush=True)
    logits = model.logits([1, 2, 3])   # float32 [n_tokens, vocab]; fresh state each call

Defaults (documented choices):
* context_length: min(spec max_position_embeddings, 4096) unless given.
* Sampling parameters left as None come from the model dir's generation_config.json when it
  has `do_sample: true` (temperature, top_k, top_p, min_p, repetition_penalty, as in transformers);
  otherwise greedy decoding (temperature 0). An explicit argument always wins.
* EOS: the union of generation_config.json `eos_token_id`, the manifest spec `eos_token_ids` and the
  tokenizer's eos token. An EOS token ends generation with finish_reason "stop" and adds no text.
* Text streams without broken UTF-8 (see tokenizer.StreamDecoder); with stop strings, text that
  could be the start of a stop string is held back until it is decided.
* The session keeps its state between generate calls; when a new prompt starts with every token
  the session already holds (a chat continuing), only the new tokens are evaluated. Any error
  resets the session, so the Model stays usable.
"""
from __future__ import annotations

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
                 path=None, generation_config=None):
        """Low-level constructor (tests inject a fake engine here); use Model.load()."""
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
        self._session_factory = session_factory
        self.session = session_factory(engine, self.context_length)
        self._held: list[int] = []  # tokens the session's state holds (valid only when in sync)
        self.eos_token_ids = self._eos_ids()
        self.stats: dict = {}
        self._gen_id = 0

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path=None, backend: str = "cpu", threads: int | None = None,
             io_threads: int | None = None, direct_io: bool = False, ram_budget=None,
             experts_per_token: int | None = None, context_length: int | None = None,
             vram_budget=None, debug: dict | None = None) -> "Model":
        """Open a model dir written by `flashmoe convert` (None: the embedded demo model).

        backend: "cpu", "cuda" (BackendError unless the extension has CUDA) or "auto" (CUDA when
        available, else CPU). ram_budget: bytes for the engine's own expert cache (int, or a string
        like "16GiB"); None/0 relies on the OS page cache. experts_per_token overrides the
        model's top-K. context_length defaults to min(max_position_embeddings, 4096).
        vram_budget (CUDA): bytes of VRAM for the expert cache (int or "16GiB"); None: the
        backend's default (60% of free VRAM). debug: the CUDA backend's comparison switches
        (pyflashmoe.switches; csrc/fm.h fm_debug_params) over those set by FM_CUDA_* variables,
        which are read here, once."""
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
                context_length=context_length, path=path, generation_config=gen_cfg)
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
        """Free the session and the engine (file handles, mappings, caches)."""
        self.session = None
        self.engine = None
        self._held = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"Model(path={self.path!r}, arch={self.spec.get('arch')!r}, vocab={self.n_vocab}, "
                f"context_length={self.context_length})")

    # ------------------------------------------------------------------ low level
    def _reset(self):
        self._held = []
        if self.engine is None:
            raise FlashMoEError("this Model is closed")
        try:
            self.session.reset()
        except Exception:
            # a session that cannot reset is replaced
            self.session = self._session_factory(self.engine, self.context_length)

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

    def _eval(self, tokens: np.ndarray, all_logits=False):
        if self.session is None:
            raise FlashMoEError("this Model is closed")
        try:
            out = self.session.eval(tokens, all_logits=all_logits)
        except ContextFullError:
            raise  # state unchanged by contract
        except BaseException:
            self._reset()
            raise
        self._held.extend(int(t) for t in tokens)
        return out

    def logits(self, tokens) -> np.ndarray:
        """float32 [n_tokens, vocab] logits of every position, computed from a fresh state."""
        arr = self._check_tokens(tokens)
        if arr.size == 0:
            raise ArgumentError("tokens must not be empty")
        if arr.size > self.context_length:
            raise ContextFullError(f"{arr.size} tokens do not fit the context length {self.context_length}")
        self._gen_id += 1
        self._reset()
        try:
            out = self._eval(arr, all_logits=True)
        finally:
            self._reset()
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
        return self._generate(ids, max_tokens, params, stops, ignore_eos, logprobs, logits_processor,
                              bias, int(top_logprobs))

    def _stats_snapshot(self) -> dict:
        try:
            return dict(self.session.stats())
        except Exception:
            return {}

    @staticmethod
    def _diff(a: dict, b: dict) -> dict:
        return {k: b.get(k, 0) - a.get(k, 0) for k in _STAT_KEYS if k in b}

    def _vocab_mask(self):
        """The ids that may be sampled (sampling.vocab_mask), computed once per model and
        tokenizer: ids past the tokenizer (a padded embedding) are never drawn."""
        from pyflashmoe.sampling import vocab_mask
        cached = getattr(self, "_vmask_cache", None)
        if cached is None or cached[0] is not self.tokenizer or cached[1] != self.n_vocab:
            cached = (self.tokenizer, self.n_vocab, vocab_mask(self.tokenizer, self.n_vocab))
            self._vmask_cache = cached
        return cached[2]

    def _generate(self, ids, max_tokens, params, stops, ignore_eos, want_logprobs, processor=None,
                  bias=None, n_top=0):
        self._gen_id += 1
        my_id = self._gen_id
        sampler_mask = self._vocab_mask()
        sampler = Sampler(params, mask=sampler_mask)
        sampler.add_seen(ids)
        decoder = self.tokenizer.stream_decoder() if self.tokenizer is not None else None
        eos = set() if ignore_eos else self.eos_token_ids
        self.stats = st = {"prompt_tokens": len(ids), "generated_tokens": 0, "cached_tokens": 0,
                           "prompt_s": 0.0, "decode_s": 0.0, "prompt_tps": 0.0, "decode_tps": 0.0,
                           "finish_reason": None}
        if max_tokens == 0:
            st["finish_reason"] = "length"
            yield GenerationPiece("", None, "length")
            return
        t0 = time.perf_counter()
        s0 = self._stats_snapshot()
        # prefill: reuse the session's state when the prompt extends what it holds
        held = self._held
        if held and len(held) < len(ids) and ids[:len(held)] == held \
                and self.session.pos == len(held):
            todo = ids[len(held):]
            st["cached_tokens"] = len(held)
        else:
            self._reset()
            todo = ids
        logits = self._eval(np.asarray(todo, dtype=np.int32))
        t1 = time.perf_counter()
        s1 = self._stats_snapshot()
        st["prompt_s"] = t1 - t0
        st["prompt_tps"] = len(todo) / st["prompt_s"] if st["prompt_s"] > 0 else 0.0
        st["prefill"] = self._diff(s0, s1)
        pending = ""
        n = 0
        generated: list[int] = []  # kept only for a logits processor
        finish = None
        t_first = None
        try:
            while True:
                x = logits if bias is None else apply_logit_bias(logits, bias)
                if processor is not None:
                    tok = sampler.sample(processor(generated, x))
                    generated.append(tok)
                else:
                    tok = sampler.sample(x)
                lp = _logprob(logits, tok) if want_logprobs else None
                top = top_k_logprobs(logits, n_top, sampler_mask) if n_top else None
                n += 1
                st["generated_tokens"] = n
                if t_first is None:
                    t_first = time.perf_counter()
                if tok in eos:
                    text = pending + (decoder.flush() if decoder else "")
                    pending = ""
                    finish = "stop"
                    if stops:
                        cut = [text.find(s) for s in stops if s in text]
                        if cut:
                            text = text[:min(cut)]
                    yield GenerationPiece(text, tok, finish, lp, top)
                    return
                new = decoder.add(tok) if decoder else ""
                last = n >= max_tokens or self.session.pos >= self.context_length
                if last and decoder:
                    new += decoder.flush()
                pending += new
                if stops:
                    hits = [(pending.find(s), s) for s in stops if s in pending]
                    if hits:
                        pos = min(h[0] for h in hits)
                        finish = "stop"
                        yield GenerationPiece(pending[:pos], tok, finish, lp, top)
                        return
                    keep = 0 if last else _stop_prefix_len(pending, stops)
                    out, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
                else:
                    out, pending = pending, ""
                if last:
                    finish = "length"
                    yield GenerationPiece(out + pending, tok, finish, lp, top)
                    return
                yield GenerationPiece(out, tok, None, lp, top)
                if self._gen_id != my_id:
                    raise FlashMoEError("this generation was superseded: another generate()/logits() "
                                        "call used the model's session; one generation at a time per Model")
                logits = self._eval(np.asarray([tok], dtype=np.int32))
        finally:
            t2 = time.perf_counter()
            s2 = self._stats_snapshot()
            st["finish_reason"] = finish
            st["decode_s"] = (t2 - t_first) if t_first is not None else 0.0
            n_dec = max(0, n - 1)  # tokens evaluated after the first sampled one
            st["decode_tokens"] = n_dec
            st["decode_tps"] = n_dec / st["decode_s"] if st["decode_s"] > 0 and n_dec else 0.0
            st["decode"] = self._diff(s1, s2)
            st["total_s"] = t2 - t0

    def generate_text(self, prompt, **kw) -> str:
        """The whole completion as one string (convenience over generate())."""
        return "".join(p.text for p in self.generate(prompt, **kw))


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
                      vram_budget=getattr(a, "vram_budget", None))


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
