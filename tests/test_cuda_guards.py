"""The numerical guard of the CUDA backend (issue 9 item 5), on a GPU; skipped without one.

The CUDA forward records the first non-finite hidden state (after the embedding, fused into every
MoE layer's combine kernel, a small kernel after a dense-FFN layer) and logit in a device word that
comes back with the logits: no extra host sync, and the same inside the captured decode graph. The
error text is the CPU backend's (fm_numeric_error). k_route must also give K distinct ids in
[0, E) for NaN / inf router logits (they index the expert tables on the host and the device).
"""
import json
import os
import shutil

import numpy as np
import pytest

core = pytest.importorskip("pyflashmoe._core")
from pyflashmoe.errors import NumericalError  # noqa: E402

GPU = hasattr(core, "cuda_available") and core.cuda_available()
REASON = ("this build has no CUDA backend" if not (hasattr(core, "cuda_compiled") and core.cuda_compiled())
          else core.cuda_describe())
pytestmark = pytest.mark.skipif(not GPU, reason=REASON)

CTX = 320


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pyflashmoe.synth import synth
    out = str(tmp_path_factory.mktemp("cuda_guards") / "tiny")
    synth(out, preset="tiny", vocab=1024, bits=4, group_size=64, progress=False)
    return out


def _manifest(d):
    with open(os.path.join(d, "pyflashmoe.json")) as f:
        return json.load(f)


def _fill(path, off, nbytes):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(b"\xff" * nbytes)


def _model(d, resident=True):
    from pyflashmoe.generate import Model
    kw = {}
    if not resident:
        lay = next(iter(_manifest(d)["experts"]["layers"].values()))
        kw["vram_budget"] = 8 * lay["block_bytes"]  # 8 slots for 16 experts x 4 layers: streamed
    eng = core.Engine(d, backend=1, n_threads=2, **kw)
    return Model(eng, lambda e, n: core.Session(e, n), spec=_manifest(d)["spec"], context_length=CTX, path=d)


def _greedy(m, ids, n=6):
    return [p.token for p in m.generate(ids, max_tokens=n, temperature=0, ignore_eos=True)]


def _ids(n, seed, avoid=()):
    ids = np.random.default_rng(seed).integers(3, 1000, size=n)
    return [int(t) if int(t) not in avoid else 3 for t in ids]


@pytest.mark.parametrize("norm", [False, True])
def test_route_kernel_nan_and_inf_logits_give_distinct_valid_ids(norm):
    E, K = 64, 8
    rng = np.random.default_rng(0)
    L = rng.standard_normal((6, E)).astype(np.float32)
    L[0, :] = np.nan
    L[1, ::3] = np.nan
    L[2, :] = -np.inf
    L[3, 5] = np.inf
    L[4, :] = np.inf
    L[5, :K - 2] = np.nan  # fewer finite logits than ... still E - K + 2 of them
    idx, w = core._kernel_route(True, L, K, norm)
    assert idx.min() >= 0 and idx.max() < E
    for r in range(L.shape[0]):
        assert len(set(idx[r].tolist())) == K, (r, idx[r])
    # finite rows keep their exact reference results
    ok = rng.standard_normal((4, E)).astype(np.float32)
    gi, gw = core._kernel_route(True, ok, K, norm)
    ri, rw = core._kernel_route(False, ok, K, norm)
    np.testing.assert_array_equal(gi, ri)
    np.testing.assert_allclose(gw, rw, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("resident", [True, False])
def test_nan_expert_blocks_raise_naming_the_layer(tiny, tmp_path, resident):
    d = str(tmp_path / "m")
    shutil.copytree(tiny, d)
    lays = _manifest(d)["experts"]["layers"]
    il = min(lays, key=int)
    lay = lays[il]
    path = os.path.join(d, lay["file"])
    good = open(path, "rb").read()
    ids = _ids(20, 1)
    want = _greedy(_model(tiny, resident), ids)
    _fill(path, lay["data_offset"], lay["n_experts"] * lay["block_bytes"])
    m = _model(d, resident)  # resident: the blocks are uploaded at open
    layer_re = rf"layer {il} \((linear|full) attention \+ moe\): non-finite hidden state at position"
    with pytest.raises(NumericalError, match=layer_re + r" 0\b"):
        _greedy(m, ids)  # prefill
    assert m.session.pos == 0
    with pytest.raises(NumericalError, match=layer_re + r" 0\b"):
        m.session.eval([5])  # one token: the captured decode graph when resident
    assert m.session.pos == 0
    with pytest.raises(NumericalError, match=layer_re):
        m.logits(ids)
    with open(path, "wb") as f:
        f.write(good)
    m = _model(d, resident)  # the VRAM cache may hold the damaged blocks: reload
    assert _greedy(m, ids) == want


@pytest.mark.parametrize("resident", [True, False])
def test_nan_embedding_row_reports_the_position(tiny, tmp_path, resident):
    """Only token `bad`'s embedding row is NaN: the error names the position where it is fed, in a
    prefill (second pass of 256 tokens included), in plain decode and in graph decode."""
    d = str(tmp_path / "m")
    shutil.copytree(tiny, d)
    man = _manifest(d)
    e = man["tensors"]["tok_embd"]
    if e["dtype"] != "bf16":
        pytest.skip(f"tok_embd is {e['dtype']}")
    H = man["spec"]["hidden_size"]
    bad = 777
    _fill(os.path.join(d, "dense.safetensors"), e["offset"] + bad * H * 2, H * 2)
    m = _model(d, resident)
    ids = _ids(300, 2, avoid=(bad,))
    emb = r"token embedding: non-finite hidden state at position "
    for at in (9, 280):
        with pytest.raises(NumericalError, match=emb + rf"{at}\b"):
            m.session.eval(ids[:at] + [bad] + ids[at:at + 5])
        assert m.session.pos == 0
    for t in ids[:4]:
        m.session.eval([t])  # decode (graph when resident)
    with pytest.raises(NumericalError, match=emb + r"4\b"):
        m.session.eval([bad])
    assert m.session.pos == 0
    # the session is clean afterwards: the same logits as a fresh model
    ref = _model(tiny, resident).session.eval(ids[:12], all_logits=True)
    np.testing.assert_allclose(m.session.eval(ids[:12], all_logits=True), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("tensor,where,prefill_pos", [
    # a prefill without all_logits computes the last row's logits only: position n-1 (as on the CPU)
    ("output_norm", r"logits \(final norm \+ lm_head\): non-finite value at position ", 7),
    ("blk.2.attn_norm", r"layer 2 \((linear|full) attention \+ moe\): non-finite hidden state at position ", 0),
])
def test_nan_dense_tensor(tiny, tmp_path, tensor, where, prefill_pos):
    d = str(tmp_path / "m")
    shutil.copytree(tiny, d)
    e = _manifest(d)["tensors"][tensor]
    spans = [tuple(e[k]) for k in ("q", "scales", "biases")] if e["dtype"] == "affine" else [(e["offset"], e["nbytes"])]
    for off, nb in spans:
        _fill(os.path.join(d, "dense.safetensors"), off, nb)
    m = _model(d)
    with pytest.raises(NumericalError, match=where + "0 "):
        m.session.eval([5])  # graph decode
    with pytest.raises(NumericalError, match=where + "0 "):
        m.logits(_ids(8, 3))  # all_logits
    with pytest.raises(NumericalError, match=where + f"{prefill_pos} "):
        _greedy(m, _ids(8, 3))
