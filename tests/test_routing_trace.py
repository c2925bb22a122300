"""The C core's routing trace (fm_session_set_trace / Session.set_trace, `run --timing`).

The trace's expert ids must equal an independent reference: the top-K of softmax(router logits)
that transformers' own router module sees (forward hooks on each layer's `mlp.gate`), on tiny random
models built by tests/tiny_models.py and converted at 16 bits; the per-layer counters must sum to
n_tokens x K; `flashmoe run --timing` prints one line per layer.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny_models import load_tiny_hf, make_tiny_hf  # noqa: E402

core = pytest.importorskip("pyflashmoe._core")
from pyflashmoe.convert import convert  # noqa: E402
from pyflashmoe.errors import ArgumentError  # noqa: E402

if not hasattr(core, "Engine"):
    pytest.skip("pyflashmoe._core was built without the engine", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {
    # Qwen3.5-MoE: 16 experts, top-4, every layer MoE
    "qwen3_5_moe": ("qwen3_5_moe", dict(num_experts=16, num_experts_per_tok=4)),
    # Qwen3-MoE with a dense-MLP layer (its trace rows are -1)
    "qwen3_moe_dense1": ("qwen3_moe", dict(mlp_only_layers=[1], num_experts_per_tok=3)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
    arch, over = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    hf_dir, cfg = make_tiny_hf(arch, str(root / "hf"), seed=3, **over)
    out = convert(hf_dir, str(root / "fm16"), bits=16, progress=False)
    return {"arch": arch, "hf": hf_dir, "cfg": cfg, "fm16": out}


def _hf_router_logits(arch, hf_dir, tokens):
    """Per layer: the router logits [n, E] transformers computes (None for a dense-MLP layer)."""
    model = load_tiny_hf(arch, hf_dir)
    got = {}
    hooks = []
    for il, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is None or not hasattr(layer.mlp, "experts"):
            continue

        def hook(mod, inp, out, il=il):
            lg = out[0] if isinstance(out, tuple) else out
            got[il] = lg.detach().float().reshape(-1, lg.shape[-1]).numpy().copy()
        hooks.append(gate.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.tensor(np.asarray(tokens, dtype=np.int64)[None]))
    for h in hooks:
        h.remove()
    return [got.get(il) for il in range(len(model.model.layers))]


def _check_picks(ids, logits, K, layer):
    """ids [n, K] (engine) against softmax(logits) top-K: exact (order too) where the reference has
    clear gaps; where neighbouring probabilities nearly tie, only a set within the tie."""
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    order = np.argsort(-p, axis=-1, kind="stable")
    clear = 0
    for t in range(p.shape[0]):
        srt = p[t, order[t, :K + 1]]
        gaps = -np.diff(srt)
        if gaps.min() > 1e-4:
            assert ids[t].tolist() == order[t, :K].tolist(), f"layer {layer} token {t}"
            clear += 1
        else:  # every pick is at least (about) as likely as the reference's K-th
            assert len(set(ids[t].tolist())) == K
            assert (p[t, ids[t]] >= srt[K - 1] - 1e-4).all(), f"layer {layer} token {t}"
    assert clear >= 0.8 * p.shape[0], f"layer {layer}: only {clear} of {p.shape[0]} rows without near-ties"


def test_trace_equals_transformers_router(tiny):
    cfg = tiny["cfg"]
    eng = core.Engine(tiny["fm16"], n_threads=2)
    K, NL, E = eng.experts_per_token, eng.n_layers, eng.n_experts
    assert K == cfg["num_experts_per_tok"] and E == cfg["num_experts"]
    toks = np.random.default_rng(5).integers(3, eng.n_vocab, size=24).astype(np.int32)
    ses = core.Session(eng, 64)
    assert ses.trace() is None  # off by default
    ses.set_trace(cap_tokens=64)
    ses.eval(toks[:16])              # prefill
    for t in toks[16:]:              # then decode, one token at a time
        ses.eval(np.array([t], dtype=np.int32))
    tr = ses.trace()
    assert tr["n_tokens"] == 24 and tr["ids"].shape == (24, NL, K)
    ref = _hf_router_logits(tiny["arch"], tiny["hf"], toks)
    n_moe = 0
    for il in range(NL):
        if ref[il] is None:
            assert (tr["ids"][:, il] == -1).all()
            assert tr["counts"][il].sum() == 0
            continue
        n_moe += 1
        _check_picks(tr["ids"][:, il], ref[il], K, il)
        # counters: n_tokens x K per MoE layer, and they agree with the ids
        assert tr["counts"][il].sum() == 24 * K
        np.testing.assert_array_equal(tr["counts"][il], np.bincount(tr["ids"][:, il].ravel(), minlength=E))
    assert n_moe == sum(r is not None for r in ref) and n_moe >= 3
    assert tr["layer_ms"].shape == (NL, 2) and (tr["layer_ms"] >= 0).all() and tr["layer_ms"].sum() > 0


def test_trace_cap_reset_and_clear(tiny):
    eng = core.Engine(tiny["fm16"], n_threads=1)
    K = eng.experts_per_token
    ses = core.Session(eng, 64)
    toks = np.arange(3, 13, dtype=np.int32)
    ses.set_trace(cap_tokens=4, layer_ms=False)
    ses.eval(toks)
    ses.reset()                      # a session reset does not touch the trace
    ses.eval(toks[:3])
    tr = ses.trace()
    assert tr["n_tokens"] == 13 and tr["ids"].shape[0] == 4 and tr["layer_ms"] is None
    moe = [il for il in range(eng.n_layers) if eng.expert_block_bytes(il)]
    for il in moe:  # counters are never capped
        assert tr["counts"][il].sum() == 13 * K
    # the same tokens from a fresh session route the same way (the trace is a pure observer)
    ses2 = core.Session(eng, 64)
    ses2.set_trace(cap_tokens=16)
    ses2.eval(toks)
    np.testing.assert_array_equal(ses2.trace()["ids"][:4], tr["ids"])
    # a new set_trace starts from zero; clear_trace stops it and returns the last trace
    ses.set_trace(cap_tokens=2, counts=False, layer_ms=False)
    ses.eval(toks[3:4])
    last = ses.clear_trace()
    assert last["n_tokens"] == 1 and last["counts"] is None and last["ids"].shape[0] == 1
    assert ses.trace() is None
    ses.eval(toks[4:5])
    assert ses.trace() is None
    with pytest.raises(ArgumentError, match="cap_tokens"):
        ses.set_trace(cap_tokens=-1)


def test_trace_off_gives_the_same_logits(tiny):
    eng = core.Engine(tiny["fm16"], n_threads=1)
    toks = np.arange(5, 17, dtype=np.int32)
    a = core.Session(eng, 32)
    b = core.Session(eng, 32)
    b.set_trace(cap_tokens=32)
    np.testing.assert_array_equal(a.eval(toks, all_logits=True), b.eval(toks, all_logits=True))


@pytest.mark.skipif(not getattr(core, "cuda_available", lambda: False)(), reason="no usable CUDA device")
def test_cuda_session_refuses_trace(tiny):
    from pyflashmoe.errors import BackendError
    eng = core.Engine(tiny["fm16"], backend=1)
    ses = core.Session(eng, 16)
    with pytest.raises(BackendError, match="CUDA backend does not record"):
        ses.set_trace(cap_tokens=4)
    ses.set_trace(cap_tokens=0, counts=False, layer_ms=False)  # "off" is accepted


DEMO = os.path.join(ROOT, "pyflashmoe", "demo", "model")


@pytest.mark.skipif(not os.path.exists(os.path.join(DEMO, "pyflashmoe.json")), reason="no demo model in the tree")
def test_run_timing_prints_per_layer_lines():
    import json
    with open(os.path.join(DEMO, "pyflashmoe.json")) as f:
        spec = json.load(f)["spec"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "pyflashmoe", "run", DEMO, "-p", "Once upon a time", "-n", "6",
                        "--threads", "2", "--timing"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip().startswith("layer ")]
    assert len(lines) == spec["n_layers"], r.stderr
    assert "per layer (decode" in r.stderr
    for il, ln in enumerate(lines):
        assert f"layer {il:>2}" in ln and "mixer" in ln and "ffn" in ln
        assert ("entropy" in ln) == (spec["layers"][il]["ffn"] == "moe"), ln
        assert f"of {spec['n_experts']} experts" not in ln  # "used/total experts" form
        assert f"/{spec['n_experts']} experts" in ln
