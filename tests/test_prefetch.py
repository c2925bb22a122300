"""Speculative expert prefetch (fm_model_params.prefetch) and per-block expert compute in decode.

Prefetch only asks the kernel to read predicted expert blocks into the page cache, so decode logits
must be bit-identical with it off, on (default depth), at every explicit depth and with the
engine's RAM cache; the decode logits are also checked against transformers (fp32) so the
per-block path (each expert computed as its block lands) is tested against a reference nobody here
wrote. Stats: blocks prefetched and how many the real routing used.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import load_tiny_hf, make_tiny_hf  # noqa: E402

core = pytest.importorskip("pyflashmoe._core")
from pyflashmoe.convert import convert  # noqa: E402
from pyflashmoe.errors import ArgumentError  # noqa: E402

if not hasattr(core, "Engine"):
    pytest.skip("pyflashmoe._core was built without the engine", allow_module_level=True)

N_PROMPT, N_GEN = 6, 12


@pytest.fixture(scope="module", params=["qwen3_5_moe", "qwen3_moe"])
def tiny(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("pf_" + request.param)
    hf_dir, cfg = make_tiny_hf(request.param, str(root / "hf"), seed=3)
    out = convert(hf_dir, str(root / "fm16"), bits=16, progress=False)
    return {"arch": request.param, "hf": hf_dir, "fm": out}


def _decode(eng, toks, n_gen=N_GEN):
    """prompt, then n_gen single-token steps fed the reference tokens; logits of every step"""
    ses = core.Session(eng, 64)
    out = [ses.eval(toks[:N_PROMPT]).copy()]
    for t in toks[N_PROMPT:N_PROMPT + n_gen]:
        out.append(ses.eval(np.array([t], dtype=np.int32)).copy())
    return np.stack(out), ses.stats()


def test_prefetch_never_changes_logits_and_matches_transformers(tiny):
    off = core.Engine(tiny["fm"], n_threads=2, prefetch=False)
    toks = np.random.default_rng(7).integers(3, off.n_vocab, size=N_PROMPT + N_GEN).astype(np.int32)
    ref, st_off = _decode(off, toks)
    assert st_off["prefetch_blocks"] == 0 and st_off["prefetch_used"] == 0
    k = off.experts_per_token
    for pf, budget in ((True, 0), (2, 0), (k, 0), (True, 1 << 20)):
        ours, st = _decode(core.Engine(tiny["fm"], n_threads=2, prefetch=pf, ram_budget=budget), toks)
        np.testing.assert_array_equal(ours, ref, err_msg=f"prefetch={pf} ram_budget={budget}")
        if budget == 0:
            assert st["prefetch_blocks"] > 0, f"prefetch={pf} queued nothing"
        assert 0 <= st["prefetch_used"] <= st["prefetch_blocks"]
        assert st["bytes_read"] == st_off["bytes_read"] or budget  # reads what the routing asks
    # transformers fp32, step by step (teacher-forced on the same tokens)
    model = load_tiny_hf(tiny["arch"], tiny["hf"])
    with torch.no_grad():
        hf = model(torch.tensor(toks[None].astype(np.int64))).logits[0].float().numpy()
    want = hf[N_PROMPT - 1:N_PROMPT + N_GEN]
    scale = float(np.abs(want).max())
    err = float(np.abs(ref - want).max())
    assert err <= 1e-4 * scale, f"max |diff| {err:.3g} vs transformers (scale {scale:.3g})"


def test_prefetch_depth_bounds_what_is_queued(tiny):
    eng = core.Engine(tiny["fm"], n_threads=2, prefetch=1)
    k = eng.experts_per_token
    toks = np.random.default_rng(8).integers(3, eng.n_vocab, size=N_PROMPT + N_GEN).astype(np.int32)
    _, st1 = _decode(eng, toks)
    _, stk = _decode(core.Engine(tiny["fm"], n_threads=2, prefetch=k), toks)
    _, stbig = _decode(core.Engine(tiny["fm"], n_threads=2, prefetch=10 * k), toks)
    n_moe = sum(1 for il in range(eng.n_layers) if eng.expert_block_bytes(il))
    # one prediction per MoE layer per decode step (the first from the embedding)
    assert stk["prefetch_blocks"] == N_GEN * n_moe * k
    assert stbig["prefetch_blocks"] == stk["prefetch_blocks"]  # capped at K
    assert st1["prefetch_blocks"] == N_GEN * n_moe * ((3 * k + 9) // 10)


def test_prefetch_off_with_direct_io_and_bad_value(tiny):
    try:
        eng = core.Engine(tiny["fm"], n_threads=2, direct_io=True, prefetch=True)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"direct_io not available here: {e}")
    toks = np.random.default_rng(9).integers(3, eng.n_vocab, size=N_PROMPT + 4).astype(np.int32)
    _, st = _decode(eng, toks, n_gen=4)
    assert st["prefetch_blocks"] == 0
    with pytest.raises(ArgumentError):
        core.Engine(tiny["fm"], prefetch=-1)
