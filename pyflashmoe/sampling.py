"""Token sampling on float32 logits (numpy), with Hugging Face transformers semantics.

Order of operations (as `transformers` `generate` applies them):
repetition penalty -> (greedy argmax if temperature == 0) -> temperature -> top-k -> top-p -> min-p
-> draw from the softmax of what is left.

* repetition_penalty: every token id seen so far (prompt + generated) has its logit divided by the
  penalty when positive, multiplied when negative (`RepetitionPenaltyLogitsProcessor`).
* top_k: keep the logits >= the k-th largest (ties kept). 0 disables.
* top_p: sort ascending, drop the tokens whose cumulative probability is <= 1 - top_p, always keep
  the most likely one (`TopPLogitsWarper`). 1.0 disables.
* min_p: drop tokens whose probability is < min_p * (probability of the top token) (`MinPLogitsWarper`).
  0 disables.
* seed: one `numpy.random.Generator` per generate call; the same seed gives the same tokens.

The full-vocabulary functions `apply_*` return new arrays with filtered entries set to -inf; the
`Sampler` runs the same steps on a compact candidate set, so a 250k vocabulary costs O(vocab)
per token instead of a full sort.

Token ids the tokenizer does not have are never drawn: checkpoints pad the embedding / LM head
past the tokenizer (Qwen3.5: 248,320 rows for 248,077 ids), and those rows get logits like any
other. `vocab_mask(tokenizer, n_vocab)` finds them once per model (ids at or past the tokenizer's
end, plus any gaps inside its range); the `Sampler` drops them before every other step (greedy,
temperature, top-k/p, min-p, after any logits processor such as a grammar), by a slice of the
logits, plus a copy when there are gaps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pyflashmoe.errors import ArgumentError, NumericalError

_NEG_INF = np.float32(-np.inf)


def _num(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ArgumentError(f"{name} must be a number, got {type(v).__name__} {v!r}")
    v = float(v)
    if math.isnan(v):
        raise ArgumentError(f"{name} must not be NaN")
    return v


def _int(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        if isinstance(v, float) and v.is_integer():
            return int(v)
        raise ArgumentError(f"{name} must be an integer, got {type(v).__name__} {v!r}")
    return int(v)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        t = _num("temperature", self.temperature)
        if t < 0 or math.isinf(t):
            raise ArgumentError(f"temperature must be >= 0 and finite (0 = greedy), got {self.temperature}")
        k = _int("top_k", self.top_k)
        if k < 0:
            raise ArgumentError(f"top_k must be >= 0 (0 = disabled), got {self.top_k}")
        p = _num("top_p", self.top_p)
        if not (0.0 < p <= 1.0):
            raise ArgumentError(f"top_p must be in (0, 1], got {self.top_p}")
        m = _num("min_p", self.min_p)
        if not (0.0 <= m < 1.0):
            raise ArgumentError(f"min_p must be in [0, 1), got {self.min_p}")
        r = _num("repetition_penalty", self.repetition_penalty)
        if r <= 0 or math.isinf(r):
            raise ArgumentError(f"repetition_penalty must be > 0 and finite (1 = off), got {self.repetition_penalty}")
        if self.seed is not None:
            s = _int("seed", self.seed)
            if s < 0:
                raise ArgumentError(f"seed must be >= 0, got {self.seed}")
            object.__setattr__(self, "seed", s)
        object.__setattr__(self, "temperature", t)
        object.__setattr__(self, "top_k", k)
        object.__setattr__(self, "top_p", p)
        object.__setattr__(self, "min_p", m)
        object.__setattr__(self, "repetition_penalty", r)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def validate_max_tokens(max_tokens) -> int:
    n = _int("max_tokens", max_tokens)
    if n < 0:
        raise ArgumentError(f"max_tokens must be >= 0, got {max_tokens}")
    return n


MAX_LOGIT_BIAS = 100.0  # |bias| limit per token (OpenAI's range)


def validate_logit_bias(bias, n_vocab: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """A logit_bias mapping {token id (int or integer string): bias in [-100, 100]} ->
    (ids int64, biases float32), or None when empty/None. ArgumentError names the key."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ArgumentError(f"logit_bias must be a dict {{token id: bias}}, got {type(bias).__name__}")
    if not bias:
        return None
    acc: dict[int, float] = {}
    for k, v in bias.items():
        if isinstance(k, str):
            ks = k.strip()
            if not ks.isascii() or not ks.lstrip("-").isdigit() or ks.count("-") > 1 \
                    or ("-" in ks and not ks.startswith("-")):
                raise ArgumentError(f"logit_bias key {k!r} is not a token id (an integer)")
            i = int(ks)
        elif isinstance(k, (int, np.integer)) and not isinstance(k, bool):
            i = int(k)
        else:
            raise ArgumentError(f"logit_bias key {k!r} is not a token id (an integer)")
        if i < 0 or (n_vocab is not None and i >= n_vocab):
            raise ArgumentError(f"logit_bias key {k!r} is outside the vocabulary [0, {n_vocab})")
        b = _num(f"logit_bias[{k!r}]", v)
        if not math.isfinite(b) or abs(b) > MAX_LOGIT_BIAS:
            raise ArgumentError(f"logit_bias[{k!r}] must be a finite number in [-100, 100], got {v!r}")
        acc[i] = acc.get(i, 0.0) + b
    ids = np.fromiter(acc.keys(), dtype=np.int64, count=len(acc))
    vals = np.fromiter(acc.values(), dtype=np.float32, count=len(acc))
    return ids, vals


def apply_logit_bias(logits, bias: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """logits + the (validated) bias, as a new float32 array (the input is not modified)."""
    x = np.array(logits, dtype=np.float32, copy=True)
    if bias is not None:
        x[bias[0]] += bias[1]
    return x


def _as_logits(logits) -> np.ndarray:
    x = np.asarray(logits)
    if x.ndim != 1:
        raise ArgumentError(f"logits must be 1-D [vocab], got shape {x.shape}")
    return x.astype(np.float32, copy=True)


# ---------------------------------------------------------------- full-vocabulary steps (HF warpers)
def apply_repetition_penalty(logits, seen_ids, penalty: float) -> np.ndarray:
    x = _as_logits(logits)
    if penalty == 1.0 or seen_ids is None or len(seen_ids) == 0:
        return x
    ids = np.unique(np.asarray(seen_ids, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < x.shape[0])]
    s = x[ids]
    x[ids] = np.where(s < 0, s * np.float32(penalty), s / np.float32(penalty))
    return x


def apply_temperature(logits, temperature: float) -> np.ndarray:
    x = _as_logits(logits)
    if temperature <= 0:
        raise ArgumentError(f"temperature must be > 0 to scale logits, got {temperature}")
    return x / np.float32(temperature)


def apply_top_k(logits, top_k: int) -> np.ndarray:
    x = _as_logits(logits)
    n = x.shape[0]
    if top_k <= 0 or top_k >= n:
        return x
    kth = np.partition(x, n - top_k)[n - top_k]
    x[x < kth] = _NEG_INF
    return x


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x)
    e = np.exp(x - m)
    return e / e.sum(dtype=np.float32)


def apply_top_p(logits, top_p: float) -> np.ndarray:
    x = _as_logits(logits)
    if top_p >= 1.0:
        return x
    order = np.argsort(x, kind="stable")  # ascending
    cum = np.cumsum(_softmax(x[order]), dtype=np.float32)
    remove = cum <= np.float32(1.0 - top_p)
    remove[-1] = False
    x[order[remove]] = _NEG_INF
    return x


def apply_min_p(logits, min_p: float) -> np.ndarray:
    x = _as_logits(logits)
    if min_p <= 0.0:
        return x
    p = _softmax(x)
    x[p < np.float32(min_p) * p.max()] = _NEG_INF
    return x


def filtered_logits(logits, params: SamplingParams, seen_ids=None) -> np.ndarray:
    """The full-vocabulary logits the sampler draws from (filtered entries -inf), HF order."""
    x = apply_repetition_penalty(logits, seen_ids, params.repetition_penalty)
    if params.greedy:
        out = np.full_like(x, _NEG_INF)
        i = int(np.argmax(x))
        out[i] = x[i]
        return out
    x = apply_temperature(x, params.temperature)
    x = apply_top_k(x, params.top_k)
    x = apply_top_p(x, params.top_p)
    return apply_min_p(x, params.min_p)


# ---------------------------------------------------------------- ids the tokenizer lacks
@dataclass(frozen=True)
class VocabMask:
    """The token ids that may be sampled: ids below `n` except `holes` (sorted int64 ids below
    `n` that the tokenizer does not have; usually empty)."""
    n: int
    holes: np.ndarray

    def apply(self, x: np.ndarray) -> np.ndarray:
        """x restricted to the samplable ids: x[:n] (a view), with holes set to -inf (a copy)."""
        if x.shape[0] > self.n:
            x = x[:self.n]
        if self.holes.size:
            h = self.holes[self.holes < x.shape[0]]
            if h.size:
                x = np.array(x, dtype=np.float32, copy=True)
                x[h] = _NEG_INF
        return x


def vocab_mask(tokenizer, n_vocab: int) -> VocabMask | None:
    """The VocabMask of a model with `n_vocab` logits and this tokenizer (pyflashmoe.tokenizer.
    Tokenizer or anything with get_vocab / id_to_token); None when every id below n_vocab is
    the tokenizer's (nothing to mask) or there is no tokenizer (token ids in, token ids out)."""
    n_vocab = int(n_vocab)
    if tokenizer is None or n_vocab <= 0:
        return None
    hf = getattr(tokenizer, "_tok", tokenizer)
    ids = None
    get_vocab = getattr(hf, "get_vocab", None)
    if callable(get_vocab):
        try:
            ids = np.fromiter(get_vocab(with_added_tokens=True).values(), dtype=np.int64)
        except TypeError:
            ids = np.fromiter(get_vocab().values(), dtype=np.int64)
    else:
        id_to_token = getattr(tokenizer, "id_to_token", None)
        if not callable(id_to_token):
            return None
        ids = np.array([i for i in range(n_vocab) if id_to_token(i) is not None], dtype=np.int64)
    ids = ids[(ids >= 0) & (ids < n_vocab)]
    have = np.zeros(n_vocab, dtype=bool)
    have[ids] = True
    if have.all():
        return None
    n = int(np.flatnonzero(have)[-1]) + 1 if have.any() else 0
    if n == 0:
        raise ArgumentError(f"the tokenizer has none of the model's {n_vocab} token ids: "
                            "nothing can be sampled (wrong tokenizer.json?)")
    holes = np.flatnonzero(~have[:n]).astype(np.int64)
    return VocabMask(n, holes)


# ---------------------------------------------------------------- the per-token sampler
def _check_samplable(x: np.ndarray) -> None:
    """NumericalError unless some token can be drawn: no NaN, at least one logit above -inf (one
    O(vocab) max; np.max propagates NaN)."""
    if x.shape[0] == 0:
        raise ArgumentError("logits are empty (vocabulary of 0 tokens)")
    mx = float(x.max())
    if math.isnan(mx):
        raise NumericalError("logits contain NaN: nothing can be sampled (damaged weights or a logits "
                             "processor returning NaN?)")
    if mx == -math.inf:
        raise NumericalError("every logit is -inf: all tokens are masked (by a logits processor or "
                             "constrained decoding, or only ids the tokenizer lacks are left), "
                             "nothing can be sampled")


class Sampler:
    """Draws one token per call from float32 logits. One Sampler per generate call.

    mask: a VocabMask (see vocab_mask): ids it excludes are never drawn, at any setting."""

    def __init__(self, params: SamplingParams, vocab_size: int | None = None,
                 mask: VocabMask | None = None):
        self.params = params
        self.mask = mask
        self.rng = np.random.default_rng(params.seed)
        self._seen: set[int] = set()
        self._seen_arr: np.ndarray | None = None

    def add_seen(self, ids) -> None:
        """Record token ids (prompt and generated) for the repetition penalty."""
        if self.params.repetition_penalty == 1.0:
            return
        for i in ids:
            i = int(i)
            if i not in self._seen:
                self._seen.add(i)
                self._seen_arr = None

    def _penalized(self, logits) -> np.ndarray:
        x = np.asarray(logits, dtype=np.float32)
        if x.ndim != 1:
            raise ArgumentError(f"logits must be 1-D [vocab], got shape {x.shape}")
        if self.mask is not None:
            x = self.mask.apply(x)
        if self.params.repetition_penalty == 1.0 or not self._seen:
            return x
        if self._seen_arr is None:
            self._seen_arr = np.fromiter(self._seen, dtype=np.int64, count=len(self._seen))
        return apply_repetition_penalty(x, self._seen_arr, self.params.repetition_penalty)

    def candidates(self, logits) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, processed logits) of the tokens that survive every filter."""
        p = self.params
        x = self._penalized(logits)
        n = x.shape[0]
        _check_samplable(x)
        if p.greedy:
            i = int(np.argmax(x))
            return np.array([i], dtype=np.int64), x[i:i + 1].copy()
        x = x / np.float32(p.temperature)
        if 0 < p.top_k < n:
            kth = np.partition(x, n - p.top_k)[n - p.top_k]
            idx = np.flatnonzero(x >= kth)
        else:
            idx = np.flatnonzero(x > _NEG_INF)
        vals = x[idx]
        if p.top_p < 1.0 and idx.shape[0] > 1:
            idx, vals = self._top_p(idx, vals, p.top_p)
        if p.min_p > 0.0 and idx.shape[0] > 1:
            # p_i >= min_p * p_max  <=>  x_i >= x_max + log(min_p)  (no softmax over the vocab)
            keep = vals >= vals.max() + np.float32(math.log(p.min_p))
            idx, vals = idx[keep], vals[keep]
        return idx, vals

    @staticmethod
    def _top_p(idx, vals, top_p):
        # keep token j iff the probability mass strictly above it is < top_p (== HF's ascending
        # cumulative-sum rule); only the top m candidates need sorting unless they are all kept.
        m_max = vals.shape[0]
        pr = _softmax(vals)
        m = min(m_max, 1024)
        while True:
            if m < m_max:
                top = np.argpartition(-pr, m - 1)[:m]
            else:
                top = np.arange(m_max)
            order = top[np.argsort(-pr[top], kind="stable")]
            ps = pr[order]
            above = np.cumsum(ps, dtype=np.float64) - ps
            keep = above < top_p
            keep[0] = True
            if not keep[-1] or m == m_max:
                sel = order[keep]
                return idx[sel], vals[sel]
            m = m_max  # a flat distribution: sort everything

    def sample(self, logits) -> int:
        """One token id; records it for the repetition penalty."""
        idx, vals = self.candidates(logits)
        if idx.shape[0] == 1:
            tok = int(idx[0])
        else:
            e = np.exp((vals - vals.max()).astype(np.float64))
            c = np.cumsum(e)
            j = int(np.searchsorted(c, self.rng.random() * c[-1], side="right"))
            tok = int(idx[min(j, idx.shape[0] - 1)])
        if self.params.repetition_penalty != 1.0 and tok not in self._seen:
            self._seen.add(tok)
            self._seen_arr = None
        return tok


def logprob(logits, token: int) -> float:
    """log softmax(logits)[token] under the model's raw distribution."""
    x = np.asarray(logits, dtype=np.float32)
    m = float(x.max())
    return float(x[token]) - m - math.log(float(np.exp(x - m, dtype=np.float32).sum(dtype=np.float64)))
