"""The models whose CPU logits are pinned bit for bit (tests/test_logits_fixture.py).

Each case is built the way the other tests build their models (tests/tiny_models.py with
transformers' classes, pyflashmoe.convert, pyflashmoe.synth, the shipped demo), evaluated on the CPU
backend with one fixed token sequence: a 12-token prefill returning every row, then 4 decode steps.
`tools/make_logits_fixture.py` wrote tests/data/cpu_logits_before.npz from main at 6e1b0c4... (the
commit before the one-loop rebuild; the exact commit is stored in the file), once per SIMD path.
"""
import os

import numpy as np

# name -> (kind, arch or preset, convert kwargs)
CASES = {}
for _arch in ("qwen3_5_moe", "qwen3_next", "qwen3_moe"):
    CASES[f"{_arch}-bf16"] = ("hf", _arch, dict(bits=16))
    CASES[f"{_arch}-q4g32"] = ("hf", _arch, dict(bits=4, group_size=32))
    CASES[f"{_arch}-q2g32"] = ("hf", _arch, dict(bits=2, group_size=32))
    CASES[f"{_arch}-q3g32"] = ("hf", _arch, dict(bits=3, group_size=32))
    CASES[f"{_arch}-q8g32-dense8"] = ("hf", _arch, dict(bits=8, group_size=32, dense_bits=8))
CASES["qwen3_moe-mlx4"] = ("mlx", "qwen3_moe", dict(bits=4, group_size=32))
CASES["synth-tiny-q4"] = ("synth", "tiny", dict(bits=4, group_size=64, vocab=512))
CASES["demo"] = ("demo", None, {})

N_PROMPT, N_DECODE = 12, 4


def tokens(vocab):
    return np.random.default_rng(7).integers(3, vocab, size=N_PROMPT + N_DECODE).astype(np.int32)


def build(name, root):
    """Model dir of case `name` under root (created; cached per root)."""
    from pyflashmoe.convert import convert
    kind, what, kw = CASES[name]
    out = os.path.join(root, name)
    if os.path.exists(out):
        return out
    if kind == "demo":
        from pyflashmoe.generate import DEMO_MODEL_DIR
        return str(DEMO_MODEL_DIR)
    if kind == "synth":
        from pyflashmoe.synth import synth
        return synth(out, preset=what, seed=0, progress=False, **kw)
    import tiny_models as tm
    hf = os.path.join(root, "hf-" + what)
    if not os.path.exists(hf):
        tm.make_tiny_hf(what, hf, seed=0)
    if kind == "mlx":
        mlx = tm.make_mlx_quantized(hf, os.path.join(root, "mlx-" + what), bits=kw["bits"],
                                    group_size=kw["group_size"])
        return convert(mlx, out, progress=False)
    return convert(hf, out, progress=False, **kw)


def logits(path):
    """[N_PROMPT + N_DECODE, vocab] float32 logits of the fixed sequence on the CPU backend."""
    import pyflashmoe._core as core
    eng = core.Engine(path, backend=0, n_threads=2)
    toks = tokens(eng.n_vocab)
    ses = core.Session(eng, 64)
    rows = [ses.eval(toks[:N_PROMPT], all_logits=True)]
    for t in toks[N_PROMPT:]:
        rows.append(ses.eval(np.array([t], np.int32))[None])
    return np.ascontiguousarray(np.concatenate(rows).astype(np.float32))
