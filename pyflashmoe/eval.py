"""`flashmoe eval`: perplexity, and KL divergence against a reference (the job of
`llama-perplexity --kl-divergence`).

Scoring (as llama-perplexity does): the text is tokenized (no BOS) and cut into non-overlapping
windows of `ctx` tokens; each window is evaluated from a fresh state and only its second half is
scored: the logits at positions ctx/2 .. ctx-2 predict tokens ctx/2+1 .. ctx-1, so each window
scores ctx/2 - 1 tokens, each with at least ctx/2 tokens of context. `max_tokens` caps the scored
tokens (the last window is scored only up to the cap).

The reference is a model dir (its own K), an HF checkpoint dir (transformers, fp32 compute), or a
file saved by `save_reference` (`flashmoe eval --save-ref FILE`). A saved reference holds the
window tokens, the reference's exact NLL of each scored token, and per scored token its top-k
log-probs (ids + log-probs quantized to 1/4096 nat, clamped at -16). The KL divergence against a
saved reference is computed over the top-k ids plus one "tail" bucket (the rest of the
vocabulary): KL(P_S + tail || Q_S + tail), a lower bound of the exact KL (merging outcomes never
raises a KL divergence); the perplexities and the top-1 agreement are exact.

Per model dir and K the result holds: perplexity (with its standard error), Δperplexity and
ΔNLL against the reference, mean / median / p99 / max KL(ref || model) in nats per token, top-1
agreement, the size and bits per weight of the dir.
"""
from __future__ import annotations

import hashlib
import io
import json
import lzma
import math
import os
import sys
import time

import numpy as np

from pyflashmoe.errors import ArgumentError, BackendError, FormatError, ModelIOError

DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")
DEMO_MODEL = os.path.join(DEMO_DIR, "model")
DEMO_TEXT = os.path.join(DEMO_DIR, "heldout.txt.xz")
DEMO_REF = os.path.join(DEMO_DIR, "heldout_ref.npz.xz")

REF_FORMAT = "pyflashmoe-eval-ref"
REF_VERSION = 1
LP_SCALE = 4096.0      # saved log-probs: uint16 steps of 1/4096 nat ...
LP_MIN = -16.0         # ... over [-16, 0]
DEFAULT_CTX = 512
DEFAULT_REF_TOP_K = 32
EXACT_REF_BUDGET = 1 << 30   # bytes of full reference log-probs kept in memory; past it: top-k


# ---------------------------------------------------------------------------------- text, windows
def read_text(path) -> str:
    """The text of `path` (UTF-8; `.xz` files are decompressed)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ArgumentError(f"--text {path}: not a file")
    try:
        if path.endswith(".xz"):
            with lzma.open(path, "rb") as f:
                data = f.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except (OSError, lzma.LZMAError) as e:
        raise ModelIOError(f"--text {path}: cannot read: {e}") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"--text {path}: not UTF-8 text ({e})") from e
    if not text.strip():
        raise ArgumentError(f"--text {path}: the file is empty")
    return text


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def make_windows(ids, ctx: int, max_tokens: int | None = None, what: str = "--text"):
    """[n_windows, ctx] int array of non-overlapping windows, and the number of scored tokens
    (<= max_tokens)."""
    _check_ctx(ctx)
    ids = np.asarray(ids, dtype=np.int64)
    per = scored_per_window(ctx)
    n = len(ids) // ctx
    if n == 0:
        raise ArgumentError(f"{what}: {len(ids)} tokens, fewer than one window of --ctx {ctx} tokens")
    total = n * per
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
            raise ArgumentError(f"--max-tokens must be a positive integer, got {max_tokens!r}")
        total = min(total, int(max_tokens))
        n = -(-total // per)
    return ids[:n * ctx].reshape(n, ctx), total


def _check_ctx(ctx):
    if isinstance(ctx, bool) or not isinstance(ctx, (int, np.integer)) or ctx < 4:
        raise ArgumentError(f"--ctx must be an integer >= 4, got {ctx!r}")


def scored_per_window(ctx: int) -> int:
    return ctx - 1 - ctx // 2


def _targets(windows, total):
    """Target token of every scored position, in order: window w, positions ctx/2+1 .. ctx-1."""
    first = windows.shape[1] // 2
    return windows[:, first + 1:].reshape(-1)[:total]


def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---------------------------------------------------------------------------------- log-prob sources
class _DirSource:
    """A pyflashmoe model dir at one K: log-softmax of the scored positions of a window."""

    def __init__(self, path, k=None, threads=None, ctx=DEFAULT_CTX, backend="cpu"):
        from pyflashmoe.generate import Model
        self.path = os.fspath(path)
        try:
            self.model = Model.load(self.path, backend=backend, threads=threads, experts_per_token=k,
                                    context_length=ctx)
        except ArgumentError as e:
            raise ArgumentError(f"{self.path} at --k {k}: {e}") from e
        self.k = k if k is not None else self.model.spec.get("n_experts_per_tok")
        self.n_vocab = self.model.n_vocab

    def __call__(self, window):
        first = len(window) // 2
        logits = self.model.logits(window[:-1])
        return log_softmax(logits[first:])

    def close(self):
        self.model.close()


class _HFSource:
    """An HF checkpoint dir through transformers (weights as stored, fp32 compute) on `device`
    (a torch device: "cpu", "cuda", "cuda:1"; TF32 off, so a GPU computes in fp32 too)."""

    def __init__(self, path, threads=None, device=None):
        try:
            import torch
            import transformers
        except ImportError as e:
            raise BackendError(f"--ref {path}: an HF checkpoint as reference needs torch and "
                               f"transformers ({e}); save a reference file instead") from e
        if threads:
            torch.set_num_threads(int(threads))
        self.torch = torch
        try:
            self.device = torch.device(device or "cpu")
        except (RuntimeError, TypeError) as e:
            raise ArgumentError(f"--ref-device {device!r}: not a torch device ({e})") from None
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise BackendError(f"--ref-device {device}: torch sees no CUDA device "
                                   f"(torch {torch.__version__})")
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        try:
            m = transformers.AutoModelForCausalLM.from_pretrained(os.fspath(path))
        except Exception as e:
            raise FormatError(f"--ref {path}: transformers cannot load this checkpoint: {e}") from e
        self.model = m.float().eval().to(self.device)
        self.path = os.fspath(path)
        self.hidden = None          # the lm_head input of the last call, [n_scored, H] float32
        head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
        self.head = head if isinstance(head, torch.nn.Linear) else None
        if self.head is not None:
            def hook(mod, inp):
                self._h = inp[0]
            self.head.register_forward_pre_hook(hook)
        self.k = getattr(m.config, "num_experts_per_tok", None)
        self.n_vocab = int(m.config.vocab_size)

    def __call__(self, window):
        first = len(window) // 2
        with self.torch.no_grad():
            x = self.torch.from_numpy(np.asarray(window[:-1], dtype=np.int64))[None].to(self.device)
            logits = self.model(input_ids=x).logits[0, first:].float().cpu().numpy()
            if self.head is not None and getattr(self, "_h", None) is not None:
                self.hidden = self._h[0, first:].float().cpu().numpy()
        return log_softmax(logits)

    def head_weights(self):
        """(W [V, H] float32, bias or None) of the lm_head, or None when logits are not W·h."""
        if self.head is None:
            return None
        w = self.head.weight.detach().float().cpu().numpy()
        b = None if self.head.bias is None else self.head.bias.detach().float().cpu().numpy()
        return w, b

    def close(self):
        self.model = None


def _tokenizer_of(path, what):
    from pyflashmoe.tokenizer import Tokenizer
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FormatError(f"{what} {path}: no tokenizer.json (needed to tokenize --text)")
    return Tokenizer.from_dir(path)


def _tokenizer_digest(path):
    p = os.path.join(path, "tokenizer.json")
    try:
        with open(p, "rb") as f:
            return _sha256(f.read())
    except OSError:
        return None


# ---------------------------------------------------------------------------------- references
class Reference:
    """Reference log-probs on the scored tokens: `full` (exact, [N, V]) or top-k (`ids`, `lp`),
    plus the exact NLL of each scored token and the reference's top-1 id."""

    def __init__(self, windows, total, nll, top1, full=None, ids=None, lp=None, meta=None,
                 hidden=None, head=None, bias=None):
        self.windows, self.total = windows, int(total)
        self.hidden, self.head, self.bias = hidden, head, bias
        self.nll = np.asarray(nll, dtype=np.float64)
        self.top1 = np.asarray(top1, dtype=np.int64)
        self.full, self.ids, self.lp = full, ids, lp
        self.meta = dict(meta or {})

    @property
    def exact(self):
        return self.full is not None or self.hidden is not None

    @property
    def ppl(self):
        return float(math.exp(self.nll.mean()))

    def rows(self, lo, hi):
        if self.full is not None:
            return self.full[lo:hi], None
        if self.hidden is not None:   # logits = W · h (+ b), recomputed in fp32 as the source did
            z = self.hidden[lo:hi].astype(np.float32) @ self.head.T
            if self.bias is not None:
                z = z + self.bias
            return log_softmax(z), None
        return self.ids[lo:hi], self.lp[lo:hi]


def iter_rows(source, windows, total, progress=None):
    """(pos, rows): `source`'s scored log-prob rows of each window in turn, cut so that `total`
    rows come out in all; `progress` (a tqdm bar or None) advances by each window's rows."""
    pos = 0
    for w in windows:
        if pos >= total:
            return
        rows = source(w)[:total - pos]
        yield pos, rows
        pos += len(rows)
        if progress is not None:
            progress.update(len(rows))


def compute_reference(source, windows, total, top_k=DEFAULT_REF_TOP_K, exact=None, progress=None,
                      meta=None) -> Reference:
    """Run `source` over the windows. exact: keep the full log-probs (None: when they fit
    EXACT_REF_BUDGET bytes), else keep the top `top_k`."""
    V = int(source.n_vocab)
    if exact is None:
        exact = total * V * 4 <= EXACT_REF_BUDGET
    tgt = _targets(windows, total)
    nll = np.empty(total)
    top1 = np.empty(total, dtype=np.int64)
    full = np.empty((total, V), dtype=np.float32) if exact else None
    ids = None if exact else np.empty((total, top_k), dtype=np.int32)
    lp = None if exact else np.empty((total, top_k), dtype=np.float32)
    hidden = [] if getattr(source, "head_weights", None) and source.head_weights() is not None else None
    for pos, rows in iter_rows(source, windows, total, progress):
        n = len(rows)
        if hidden is not None:
            h = source.hidden[:n]
            if pos == 0:   # logits must be W·h (+ b): no softcapping or scaling after the head
                w, b = source.head_weights()
                z = h @ w.T + (0 if b is None else b)
                if not np.allclose(log_softmax(z), rows, atol=1e-3):
                    hidden = None
            if hidden is not None:
                hidden.append(h)
        t = tgt[pos:pos + n]
        nll[pos:pos + n] = -rows[np.arange(n), t]
        top1[pos:pos + n] = rows.argmax(-1)
        if exact:
            full[pos:pos + n] = rows
        else:
            part = np.argpartition(-rows, top_k - 1, axis=-1)[:, :top_k]
            plp = np.take_along_axis(rows, part, -1)
            order = np.argsort(-plp, axis=-1, kind="stable")
            ids[pos:pos + n] = np.take_along_axis(part, order, -1)
            lp[pos:pos + n] = np.take_along_axis(plp, order, -1)
    ref = Reference(windows, total, nll, top1, full=full, ids=ids, lp=lp, meta=meta)
    if hidden is not None:
        ref.hidden = np.concatenate(hidden).astype(np.float32)
        ref.head, ref.bias = source.head_weights()
    return ref


def quantize_lp(lp):
    q = np.rint(-np.clip(np.asarray(lp, dtype=np.float64), LP_MIN, 0.0) * LP_SCALE)
    return q.astype(np.uint16)


def dequantize_lp(q):
    return -(np.asarray(q, dtype=np.float64) / LP_SCALE)


def _to_bf16(a):
    """float32 -> bf16 bits (uint16), or None when that would round."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    bits = a.view(np.uint32)
    if np.any(bits & 0xFFFF):
        return None
    return (bits >> 16).astype(np.uint16)


def _from_bf16(u):
    return (np.asarray(u, dtype=np.uint32) << 16).view(np.float32)


def save_reference(ref: Reference, path, top_k=DEFAULT_REF_TOP_K, payload="auto") -> int:
    """Write `ref` as an xz-compressed .npz: the window tokens, the exact NLLs and top-1 ids, and
    either (payload "hidden", exact: the default when the reference came from an HF checkpoint
    whose logits are lm_head·h) the final hidden state of each scored token in fp16 plus the
    lm_head weights, or (payload "topk", approximate) the top_k log-probs of each scored token.
    Returns the file size in bytes."""
    path = os.fspath(path)
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ArgumentError(f"--ref-top-k must be a positive integer, got {top_k!r}")
    if payload not in ("auto", "hidden", "topk"):
        raise ArgumentError(f"payload must be 'auto', 'hidden' or 'topk', got {payload!r}")
    if payload == "auto":
        payload = "hidden" if ref.hidden is not None else "topk"
    if payload == "hidden" and ref.hidden is None:
        raise ArgumentError("payload 'hidden' needs a reference computed from an HF checkpoint")
    n_vocab = int(ref.meta.get("n_vocab") or 0)
    idt = np.uint16 if n_vocab and n_vocab <= 65536 else np.int32
    common = dict(windows=ref.windows.astype(idt), nll=ref.nll.astype(np.float32),
                  top1=ref.top1.astype(idt))
    if payload == "hidden":
        h16 = ref.hidden.astype(np.float16)
        if not np.all(np.isfinite(h16)):
            raise FormatError("the reference's hidden states overflow fp16: save with payload 'topk'")
        head = _to_bf16(ref.head)
        arrays = dict(common, hidden=h16, **({"head_bf16": head} if head is not None
                                              else {"head_f32": ref.head.astype(np.float32)}))
        if ref.bias is not None:
            arrays["bias"] = ref.bias.astype(np.float32)
        meta = dict(ref.meta, payload="hidden", top_k=None)
        return _write_ref(path, meta, ref, arrays)
    if ref.full is not None or ref.hidden is not None:
        full = ref.full if ref.full is not None else None
        ids_l, lp_l = [], []
        for lo in range(0, ref.total, 1024):
            rows = full[lo:lo + 1024] if full is not None else ref.rows(lo, lo + 1024)[0]
            kk = min(int(top_k), rows.shape[1])
            part = np.argpartition(-rows, kk - 1, axis=-1)[:, :kk]
            plp = np.take_along_axis(rows, part, -1)
            order = np.argsort(-plp, axis=-1, kind="stable")
            ids_l.append(np.take_along_axis(part, order, -1))
            lp_l.append(np.take_along_axis(plp, order, -1))
        ids, lp = np.concatenate(ids_l), np.concatenate(lp_l)
        top_k = ids.shape[1]
    else:
        if top_k > ref.ids.shape[1]:
            raise ArgumentError(f"--ref-top-k {top_k}: this reference holds only the top "
                                f"{ref.ids.shape[1]} log-probs per token")
        ids, lp = ref.ids[:, :top_k], ref.lp[:, :top_k]
    meta = dict(ref.meta, payload="topk", top_k=int(top_k), lp_scale=LP_SCALE, lp_min=LP_MIN)
    return _write_ref(path, meta, ref, dict(common, ids=ids.astype(idt), lp=quantize_lp(lp)))


def _write_ref(path, meta, ref, arrays):
    meta = dict(meta, format=REF_FORMAT, version=REF_VERSION, tokens=ref.total,
                ctx=int(ref.windows.shape[1]))
    arrays = dict(arrays, meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    tmp = path + ".tmp"
    try:
        with lzma.open(tmp, "wb", preset=9 | lzma.PRESET_EXTREME) as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    except OSError as e:
        raise ModelIOError(f"--save-ref {path}: cannot write: {e}") from e
    return os.path.getsize(path)


def load_reference(path) -> Reference:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ArgumentError(f"--ref {path}: not a file or directory")
    try:
        with lzma.open(path, "rb") as f:
            data = f.read()
        z = np.load(io.BytesIO(data), allow_pickle=False)
        arrays = {k: z[k] for k in z.files}
    except (OSError, lzma.LZMAError, ValueError, EOFError) as e:
        raise FormatError(f"--ref {path}: not a reference file saved by `flashmoe eval --save-ref` ({e})") from e
    miss = [k for k in ("meta", "windows", "nll", "top1") if k not in arrays]
    if miss:
        raise FormatError(f"--ref {path}: arrays {miss} missing (not a reference file)")
    try:
        meta = json.loads(bytes(arrays["meta"]).decode())
    except ValueError as e:
        raise FormatError(f"--ref {path}: field 'meta' is not JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != REF_FORMAT:
        raise FormatError(f"--ref {path}: field 'meta.format' is not {REF_FORMAT!r}")
    if meta.get("version") != REF_VERSION:
        raise FormatError(f"--ref {path}: field 'meta.version' is {meta.get('version')!r}, "
                          f"this pyflashmoe reads version {REF_VERSION}")
    windows = arrays["windows"].astype(np.int64)
    total = meta.get("tokens")
    nll, top1 = arrays["nll"].astype(np.float64), arrays["top1"].astype(np.int64)
    if windows.ndim != 2 or not isinstance(total, int) or windows.shape[1] != meta.get("ctx") \
            or nll.shape != (total,) or top1.shape != (total,) \
            or not (0 < total <= windows.shape[0] * scored_per_window(windows.shape[1])):
        raise FormatError(f"--ref {path}: array shapes do not match meta (tokens, ctx)")
    payload = meta.get("payload")
    if payload == "hidden":
        head = _from_bf16(arrays["head_bf16"]) if "head_bf16" in arrays else arrays.get("head_f32")
        hidden = arrays.get("hidden")
        bias = arrays.get("bias")
        if head is None or hidden is None or head.ndim != 2 or hidden.shape != (total, head.shape[1]) \
                or (bias is not None and bias.shape != (head.shape[0],)):
            raise FormatError(f"--ref {path}: arrays 'hidden' / 'head_bf16' missing or of the wrong shape")
        meta.setdefault("n_vocab", int(head.shape[0]))
        return Reference(windows, total, nll, top1, meta=meta, hidden=hidden,
                         head=np.asarray(head, dtype=np.float32), bias=bias)
    if payload != "topk":
        raise FormatError(f"--ref {path}: field 'meta.payload' is {payload!r} (expected 'hidden' or 'topk')")
    ids, lp = arrays.get("ids"), arrays.get("lp")
    if ids is None or lp is None or ids.ndim != 2 or ids.shape[0] != total or lp.shape != ids.shape:
        raise FormatError(f"--ref {path}: arrays 'ids' / 'lp' missing or of the wrong shape")
    return Reference(windows, total, nll, top1, ids=ids.astype(np.int64), lp=dequantize_lp(lp), meta=meta)


# ---------------------------------------------------------------------------------- metrics
def token_metrics(lq, ref: Reference, lo, targets):
    """Per scored token: NLL of the target, KL(ref || q), whether the top-1 ids agree."""
    n = len(lq)
    nll = -lq[np.arange(n), targets]
    agree = lq.argmax(-1) == ref.top1[lo:lo + n]
    a, b = ref.rows(lo, lo + n)
    if b is None:      # exact: full reference log-probs
        lp = a.astype(np.float64)
        kl = (np.exp(lp) * (lp - lq)).sum(-1)
    else:              # top-k + tail bucket
        p = np.exp(b)
        lqs = np.take_along_axis(lq, a, -1)
        kl = (p * (b - lqs)).sum(-1)
        pt = np.clip(1.0 - p.sum(-1), 0.0, 1.0)
        qt = np.clip(1.0 - np.exp(lqs).sum(-1), 1e-30, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            tail = np.where(pt > 0, pt * (np.log(np.maximum(pt, 1e-300)) - np.log(qt)), 0.0)
        if a.shape[1] < lq.shape[1]:   # (ids covering the whole vocabulary leave no tail)
            kl = kl + tail
    return nll, np.maximum(kl, 0.0), agree


def summarize(nll, kl=None, agree=None, ref: Reference | None = None) -> dict:
    n = len(nll)
    mean = float(nll.mean())
    se = float(nll.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    out = {"tokens": n, "nll": mean, "ppl": math.exp(mean), "ppl_se": math.exp(mean) * se}
    if ref is not None and kl is not None:
        rn = ref.nll[:n]
        out.update(ref_ppl=float(math.exp(rn.mean())), delta_nll=float(mean - rn.mean()),
                   delta_ppl=float(math.exp(mean) - math.exp(rn.mean())),
                   kld_mean=float(kl.mean()), kld_median=float(np.median(kl)),
                   kld_p99=float(np.percentile(kl, 99)), kld_max=float(kl.max()),
                   kld_se=float(kl.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
                   top1_agreement=float(agree.mean()), kld_exact=ref.exact)
    return out


def dir_size_info(path) -> dict:
    """Size of a model dir's weight files, its parameter count and bits per weight (from
    pyflashmoe.json), and the experts' / dense bits."""
    from pyflashmoe.format import read_json_file
    man = read_json_file(os.path.join(path, "pyflashmoe.json"), "manifest")
    if not isinstance(man, dict):
        return {}
    size = sum(int(f.get("size", 0)) for f in (man.get("files") or {}).values() if isinstance(f, dict))
    params = 0
    for t in (man.get("tensors") or {}).values():
        if isinstance(t, dict) and isinstance(t.get("shape"), list):
            params += int(np.prod(t["shape"]))
    for L in ((man.get("experts") or {}).get("layers") or {}).values():
        if not isinstance(L, dict):
            continue
        per = sum(int(np.prod(p["shape"])) for p in (L.get("parts") or {}).values()
                  if isinstance(p, dict) and isinstance(p.get("shape"), list))
        params += per * int(L.get("n_experts") or 0)
    q = man.get("quantization") or {}
    return {"size_bytes": size, "params": params, "bpw": (8.0 * size / params) if params else None,
            "expert_bits": (q.get("experts") or {}).get("bits"), "dense_bits": (q.get("dense") or {}).get("bits")}


# ---------------------------------------------------------------------------------- driver
def _classify_ref(ref):
    ref = os.fspath(ref)
    if os.path.isdir(ref):
        if os.path.isfile(os.path.join(ref, "pyflashmoe.json")):
            return "dir"
        if os.path.isfile(os.path.join(ref, "config.json")):
            return "hf"
        raise ArgumentError(f"--ref {ref}: a directory with neither pyflashmoe.json (model dir) nor "
                            f"config.json (HF checkpoint)")
    if os.path.isfile(ref):
        return "file"
    raise ArgumentError(f"--ref {ref}: no such file or directory")


def parse_k_list(s):
    if s is None or s == "":
        return [None]
    if isinstance(s, (list, tuple)):
        items = list(s)
    else:
        items = [x.strip() for x in str(s).split(",")]
    out = []
    for x in items:
        try:
            k = int(x)
        except (TypeError, ValueError):
            raise ArgumentError(f"--k: {x!r} is not an integer (expected e.g. --k 2,4,8)") from None
        if k < 1:
            raise ArgumentError(f"--k: {k} must be >= 1")
        if k not in out:
            out.append(k)
    return out


def _progress(total, desc, quiet):
    if quiet:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, leave=False, dynamic_ncols=True)


def evaluate(models=None, text=None, ref=None, ks=None, ctx=None, max_tokens=None, threads=None,
             save_ref=None, ref_top_k=DEFAULT_REF_TOP_K, quiet=False, backend="cpu", log=None,
             ref_device=None) -> dict:
    """Evaluate each model dir × each K. Returns {"config": ..., "reference": ..., "results": [...]}.
    With no models and no text: the embedded demo on its shipped held-out text against its
    shipped reference. `ref_device`: the torch device of an HF checkpoint reference (default cpu)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    models = [os.fspath(m) for m in (models or [])]
    ks = parse_k_list(ks)
    if not models and save_ref is None:     # no model dir: the embedded demo
        models = [DEMO_MODEL]
        if text is None and ref is None:    # ... on its held-out text against its bf16 reference
            text, ref = DEMO_TEXT, DEMO_REF
            log(f"flashmoe eval: the embedded demo model ({DEMO_MODEL}) on its held-out text "
                f"({os.path.basename(DEMO_TEXT)}) against its saved bf16 reference")
        else:
            log(f"flashmoe eval: no MODEL_DIR given: the embedded demo model ({DEMO_MODEL})")
    for m in models:
        if not os.path.isdir(m) or not os.path.isfile(os.path.join(m, "pyflashmoe.json")):
            raise ArgumentError(f"MODEL_DIR {m}: not a model dir made by `flashmoe convert` "
                                f"(no pyflashmoe.json)")
    if save_ref is not None and ref is None:
        raise ArgumentError("--save-ref needs --ref (the model dir or HF checkpoint to save)")
    if save_ref is not None and os.path.isdir(os.fspath(save_ref)):
        raise ArgumentError(f"--save-ref {save_ref}: is a directory (give a file name)")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
        raise ArgumentError(f"--threads must be a non-negative integer, got {threads!r}")
    if ctx is not None:
        _check_ctx(ctx)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
        raise ArgumentError(f"--max-tokens must be a positive integer, got {max_tokens!r}")
    kind = _classify_ref(ref) if ref is not None else None
    if ref_device not in (None, "cpu") and kind != "hf":
        raise ArgumentError(f"--ref-device {ref_device}: only an HF checkpoint reference runs through "
                            f"torch (--ref {ref} is {'a ' + kind if kind else 'not given'})")
    if kind == "file" and save_ref is not None:
        raise ArgumentError("--save-ref needs --ref to be a model dir or an HF checkpoint, not a saved file")

    # ---- the reference file fixes the windows; else tokenize the text
    reference = None
    text_sha = None
    if kind == "file":
        reference = load_reference(ref)
        rctx = reference.windows.shape[1]
        if ctx is not None and ctx != rctx:
            raise ArgumentError(f"--ctx {ctx}: the reference {ref} was saved with ctx {rctx}")
        ctx = rctx
    ctx = ctx or DEFAULT_CTX
    tok_dir = models[0] if models else ref
    windows = total = None
    if text is not None:
        raw = read_text(text)
        text_sha = _sha256(raw.encode("utf-8"))
        if reference is not None and reference.meta.get("text_sha256") not in (None, text_sha):
            raise ArgumentError(f"--text {text}: not the text the reference {ref} was saved from "
                                f"(sha256 {text_sha[:12]}..., the reference: "
                                f"{str(reference.meta.get('text_sha256'))[:12]}...)")
        digests = {}
        for d in (models if models else [tok_dir]) + ([os.fspath(ref)] if kind in ("dir", "hf") else []):
            digests.setdefault(_tokenizer_digest(d), d)
        ids = None
        for dig, d in digests.items():
            what = "MODEL_DIR" if d in models else "--ref"
            got = _tokenizer_of(d, what).encode(raw)
            if ids is not None and got != ids:
                raise FormatError(f"{what} {d}: its tokenizer splits --text differently from "
                                  f"{tok_dir}'s: the perplexities would not be comparable")
            ids = got
        windows, total = make_windows(ids, ctx, max_tokens)
        if reference is not None and total > reference.total:   # score what the reference covers
            if max_tokens is not None:
                log(f"flashmoe eval: --ref {ref} covers {reference.total} scored tokens: "
                    f"scoring {reference.total}, not {max_tokens}")
            total = reference.total
            windows = windows[:-(-total // scored_per_window(ctx))]
        if reference is not None:
            if reference.windows.shape[0] < windows.shape[0] or not np.array_equal(
                    reference.windows[:windows.shape[0]], windows):
                raise FormatError(f"--ref {ref}: its tokens differ from the tokenization of --text {text} "
                                  f"by {tok_dir}'s tokenizer (a different tokenizer?)")
    elif reference is not None:
        want = reference.meta.get("tokenizer_sha256")
        for m in models:
            got = _tokenizer_digest(m)
            if want and got and got != want:
                log(f"flashmoe eval: note: MODEL_DIR {m} has another tokenizer.json than the one --ref "
                    f"{ref} was made with; scoring the reference's token ids (give --text to check)")
        windows = reference.windows
        total = reference.total
        if max_tokens is not None:
            total = min(total, max_tokens)
            windows = windows[:-(-total // scored_per_window(ctx))]
    else:
        raise ArgumentError("--text FILE is required (the text to score), unless --ref is a saved reference file")

    tgt = _targets(windows, total)
    cfg = {"ctx": int(ctx), "tokens": int(total), "windows": int(windows.shape[0]),
           "scored_per_window": scored_per_window(ctx), "text": os.fspath(text) if text else None,
           "text_sha256": text_sha, "ref": os.fspath(ref) if ref is not None else None,
           "ref_kind": kind, "scoring": "second half of each non-overlapping window (llama-perplexity)"}
    n_runs = len(models) * len(ks) + (1 if kind in ("dir", "hf") else 0)
    bar = _progress(total * n_runs, "eval", quiet)
    out = {"config": cfg, "reference": None, "results": []}
    try:
        # ---- compute the reference (model dir / HF)
        if kind in ("dir", "hf"):
            t0 = time.time()
            src = (_DirSource(ref, None, threads, ctx, backend) if kind == "dir"
                   else _HFSource(ref, threads, ref_device))
            try:
                meta = {"source": os.path.basename(os.path.normpath(os.fspath(ref))), "source_kind": kind,
                        "n_vocab": int(src.n_vocab), "k": src.k, "text_sha256": text_sha,
                        "tokenizer_sha256": _tokenizer_digest(os.fspath(ref) if kind == "dir" else tok_dir),
                        "created_by": "flashmoe eval --save-ref"}
                reference = compute_reference(src, windows, total, top_k=ref_top_k,
                                              exact=None, progress=bar,
                                              meta=meta)
            finally:
                src.close()
            if not reference.exact:
                log(f"flashmoe eval: the reference log-probs of {total} tokens do not fit "
                    f"{EXACT_REF_BUDGET >> 20} MiB: KLD over the reference's top {ref_top_k} + tail")
            out["reference"] = dict(summarize(reference.nll), model=os.fspath(ref), kind=kind, k=meta["k"],
                                    seconds=round(time.time() - t0, 2))
            if save_ref is not None:
                size = save_reference(reference, save_ref, top_k=ref_top_k)
                what = ("final hidden states + lm_head: exact" if reference.hidden is not None
                        else f"top {ref_top_k} log-probs")
                log(f"flashmoe eval: saved the reference ({total} tokens, {what}) "
                    f"to {save_ref} ({size / 1e6:.2f} MB)")
                out["reference"]["saved"] = {"path": os.fspath(save_ref), "bytes": size,
                                             "payload": "hidden" if reference.hidden is not None else "topk"}
        elif reference is not None:
            out["reference"] = dict(summarize(reference.nll[:total]), model=os.fspath(ref), kind="file",
                                    source=reference.meta.get("source"), k=reference.meta.get("k"),
                                    payload=reference.meta.get("payload"), top_k=reference.meta.get("top_k"),
                                    exact=reference.exact)
        rv = reference.meta.get("n_vocab") if reference is not None else None
        # ---- each model × K
        for m in models:
            info = dir_size_info(m)
            for k in ks:
                t0 = time.time()
                src = _DirSource(m, k, threads, ctx, backend)
                try:
                    if reference is not None and rv and int(rv) != int(src.n_vocab):
                        raise FormatError(f"MODEL_DIR {m}: vocabulary {src.n_vocab}, the reference's "
                                          f"{rv}: not comparable")
                    nll = np.empty(total)
                    kl = np.empty(total) if reference is not None else None
                    agree = np.empty(total, dtype=bool) if reference is not None else None
                    for pos, lq in iter_rows(src, windows, total, bar):
                        n = len(lq)
                        t = tgt[pos:pos + n]
                        if reference is not None:
                            nll[pos:pos + n], kl[pos:pos + n], agree[pos:pos + n] = \
                                token_metrics(lq, reference, pos, t)
                        else:
                            nll[pos:pos + n] = -lq[np.arange(n), t]
                    r = {"model": m, "k": src.k}
                    r.update(info)
                    r.update(summarize(nll, kl, agree, reference))
                    r["seconds"] = round(time.time() - t0, 2)
                    out["results"].append(r)
                finally:
                    src.close()
    finally:
        if bar is not None:
            bar.close()
    return out


# ---------------------------------------------------------------------------------- output
def format_table(res: dict) -> str:
    cfg = res["config"]
    lines = [f"{cfg['tokens']} tokens scored: {cfg['windows']} windows of {cfg['ctx']}, the second "
             f"half of each ({cfg['scored_per_window']} tokens)"]
    ref = res.get("reference")
    if ref:
        how = ""
        if ref.get("kind") == "file":
            how = (" (saved: final hidden states + lm_head, exact)" if ref.get("payload") == "hidden"
                   else f" (saved top-{ref.get('top_k')} log-probs)")
        lines.append(f"reference: {ref['model']}{how}: ppl {ref['ppl']:.4f} ± {ref['ppl_se']:.4f}")
    has_ref = bool(ref)
    head = ["model", "K", "bits", "bpw", "MB", "ppl", "±"]
    if has_ref:
        head += ["Δppl", "KLD mean", "KLD p99", "top-1 agree"]
    rows = []
    for r in res["results"]:
        name = os.path.basename(os.path.normpath(r["model"]))
        if os.path.realpath(r["model"]) == os.path.realpath(DEMO_MODEL):
            name = "demo (embedded)"
        bits = r.get("expert_bits")
        row = [name, str(r.get("k")), f"{bits}/{r.get('dense_bits')}" if bits else "-",
               f"{r['bpw']:.2f}" if r.get("bpw") else "-",
               f"{r['size_bytes'] / 1e6:.1f}" if r.get("size_bytes") else "-",
               f"{r['ppl']:.4f}", f"{r['ppl_se']:.4f}"]
        if has_ref:
            row += [f"{r['delta_ppl']:+.4f}", f"{r['kld_mean']:.5f}", f"{r['kld_p99']:.5f}",
                    f"{100 * r['top1_agreement']:.2f}%"]
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    if rows:
        lines.append(fmt(head))
        lines.extend(fmt(r) for r in rows)
    if has_ref and any(not r.get("kld_exact", True) for r in res["results"]):
        lines.append("KLD: over the reference's top-k ids + one tail bucket (a lower bound of the exact KLD)")
    return "\n".join(lines)


def plot(res: dict, path) -> None:
    """KLD (mean) against bits per weight, one line per K: PNG/SVG via matplotlib when installed,
    else a self-made SVG (.svg only)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".png", ".svg"):
        raise ArgumentError(f"--plot {path}: give a .png or .svg file name")
    pts = {}
    for r in res["results"]:
        if r.get("bpw") is None or "kld_mean" not in r:
            continue
        pts.setdefault(r.get("k"), []).append((r["bpw"], r["kld_mean"]))
    if not pts:
        raise ArgumentError("--plot needs a reference (--ref) and model dirs with a manifest")
    for k in pts:
        pts[k].sort()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    try:
        if plt is not None:
            fig, ax = plt.subplots(figsize=(6, 4))
            for k, p in sorted(pts.items(), key=lambda kv: (kv[0] is None, kv[0])):
                ax.plot([x for x, _ in p], [y for _, y in p], "o-", label=f"K={k}")
            ax.set_xlabel("bits per weight (whole model dir)")
            ax.set_ylabel("mean KL divergence (nats/token)")
            if all(y > 0 for p in pts.values() for _, y in p):
                ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fig.savefig(path)
            plt.close(fig)
            return
        if ext == ".png":
            raise ArgumentError(f"--plot {path}: PNG needs matplotlib (not installed); give a .svg name")
        with open(path, "w", encoding="utf-8") as f:
            f.write(_svg(pts))
    except OSError as e:
        raise ModelIOError(f"--plot {path}: cannot write: {e}") from e


def _svg(pts) -> str:
    W, H, L, R, T, B = 640, 420, 70, 110, 20, 50
    xs = [x for p in pts.values() for x, _ in p]
    ys = [y for p in pts.values() for _, y in p]
    logy = all(y > 0 for y in ys)
    fy = (lambda y: math.log10(y)) if logy else (lambda y: y)
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(fy(y) for y in ys), max(fy(y) for y in ys)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    px = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)
    py = lambda y: T + (1 - (fy(y) - y0) / (y1 - y0)) * (H - T - B)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
         f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
         f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">bits per weight (whole model dir)</text>',
         f'<text x="16" y="{(T + H - B) / 2}" text-anchor="middle" transform="rotate(-90 16 {(T + H - B) / 2})">'
         f'mean KLD (nats/token){", log scale" if logy else ""}</text>']
    for i in range(5):
        xv = x0 + (x1 - x0) * i / 4
        s.append(f'<text x="{px(xv):.1f}" y="{H - B + 16}" text-anchor="middle">{xv:.2f}</text>')
        yv = y0 + (y1 - y0) * i / 4
        lab = 10 ** yv if logy else yv
        ypix = T + (1 - i / 4) * (H - T - B)
        s.append(f'<text x="{L - 6}" y="{ypix + 4:.1f}" text-anchor="end">{lab:.3g}</text>')
        s.append(f'<line x1="{L}" y1="{ypix:.1f}" x2="{W - R}" y2="{ypix:.1f}" stroke="#ddd"/>')
    for j, (k, p) in enumerate(sorted(pts.items(), key=lambda kv: (kv[0] is None, kv[0]))):
        c = colors[j % len(colors)]
        s.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="'
                 + " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in p) + '"/>')
        s.extend(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{c}"/>' for x, y in p)
        s.append(f'<text x="{W - R + 10}" y="{T + 16 + 18 * j}" fill="{c}">K={k}</text>')
    s.append("</svg>")
    return "\n".join(s) + "\n"


def run_cli(a) -> int:
    if a.plot and os.path.splitext(a.plot)[1].lower() not in (".png", ".svg"):
        raise ArgumentError(f"--plot {a.plot}: give a .png or .svg file name")
    for opt, p in (("--json", a.json), ("--plot", a.plot), ("--save-ref", a.save_ref)):
        if p and not os.path.isdir(os.path.dirname(os.path.abspath(p))):
            raise ArgumentError(f"{opt} {p}: the directory {os.path.dirname(os.path.abspath(p))} does not exist")
    res = evaluate(models=a.models, text=a.text, ref=a.ref, ks=a.k, ctx=a.ctx, max_tokens=a.max_tokens,
                   threads=a.threads, save_ref=a.save_ref, ref_top_k=a.ref_top_k, quiet=a.quiet,
                   backend=a.backend, ref_device=getattr(a, "ref_device", None))
    if res["results"] or res["reference"]:
        print(format_table(res))
    if a.json:
        try:
            with open(a.json, "w", encoding="utf-8") as f:
                json.dump(res, f, indent=1)
                f.write("\n")
        except OSError as e:
            raise ModelIOError(f"--json {a.json}: cannot write: {e}") from e
    if a.plot:
        plot(res, a.plot)
    return 0
