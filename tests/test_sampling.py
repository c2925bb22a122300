"""Sampling vs transformers' logits processors on random logits."""
import numpy as np
import pytest

from pyflashmoe import sampling as S
from pyflashmoe.errors import ArgumentError

torch = pytest.importorskip("torch")
lp = pytest.importorskip("transformers.generation.logits_process")


def _rand(seed, n=5000, scale=3.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * scale).astype(np.float32)


def _hf(proc, x, input_ids=None):
    ids = torch.tensor([input_ids if input_ids is not None else [0]], dtype=torch.long)
    return proc(ids, torch.from_numpy(x.copy())[None, :])[0].numpy()


def _same_mask_and_values(got, ref):
    assert np.array_equal(np.isfinite(got), np.isfinite(ref))
    f = np.isfinite(ref)
    np.testing.assert_allclose(got[f], ref[f], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_warpers_match_transformers(seed):
    x = _rand(seed)
    _same_mask_and_values(S.apply_temperature(x, 0.7), _hf(lp.TemperatureLogitsWarper(0.7), x))
    for k in (1, 5, 50, 4999, 5000, 10000):
        _same_mask_and_values(S.apply_top_k(x, k), _hf(lp.TopKLogitsWarper(k), x))
    for p in (0.05, 0.3, 0.9, 0.99, 1.0):
        _same_mask_and_values(S.apply_top_p(x, p), _hf(lp.TopPLogitsWarper(p), x))
    for m in (0.01, 0.1, 0.5, 0.9):
        _same_mask_and_values(S.apply_min_p(x, m), _hf(lp.MinPLogitsWarper(m), x))
    x[:20] = -np.abs(x[:20])  # make sure both signs are penalised
    x[20:40] = np.abs(x[20:40])
    seen = list(range(0, 40, 1)) + [7, 7, 3000]
    for r in (0.5, 1.3, 2.0):
        _same_mask_and_values(S.apply_repetition_penalty(x, seen, r),
                              _hf(lp.RepetitionPenaltyLogitsProcessor(r), x, seen))


def _hf_chain(x, params, seen):
    procs = []
    if params.repetition_penalty != 1.0:
        procs.append(lp.RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    procs.append(lp.TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        procs.append(lp.TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        procs.append(lp.TopPLogitsWarper(params.top_p))
    if params.min_p:
        procs.append(lp.MinPLogitsWarper(params.min_p))
    out = x
    for p in procs:
        out = _hf(p, out, seen)
    return out


_COMBOS = [
    dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.0, repetition_penalty=1.1),
    dict(temperature=1.0, top_k=0, top_p=0.9, min_p=0.0, repetition_penalty=1.0),
    dict(temperature=0.6, top_k=20, top_p=0.95, min_p=0.05, repetition_penalty=1.0),
    dict(temperature=1.5, top_k=0, top_p=1.0, min_p=0.1, repetition_penalty=1.3),
    dict(temperature=0.3, top_k=0, top_p=0.5, min_p=0.0, repetition_penalty=0.8),
    dict(temperature=2.0, top_k=0, top_p=0.999, min_p=0.0, repetition_penalty=1.0),
]


@pytest.mark.parametrize("combo", range(len(_COMBOS)))
@pytest.mark.parametrize("seed", range(3))
def test_chain_and_candidates_match_transformers(combo, seed):
    params = S.SamplingParams(**_COMBOS[combo])
    x = _rand(100 + seed, n=20000, scale=4.0)
    seen = list(np.random.default_rng(seed).integers(0, 20000, 300))
    ref = _hf_chain(x, params, seen)
    _same_mask_and_values(S.filtered_logits(x, params, seen), ref)
    sampler = S.Sampler(params)
    sampler.add_seen(seen)
    idx, vals = sampler.candidates(x)
    assert set(idx.tolist()) == set(np.flatnonzero(np.isfinite(ref)).tolist())
    np.testing.assert_allclose(vals, ref[idx], rtol=1e-6, atol=1e-6)


def test_greedy_with_penalty_matches_transformers():
    x = _rand(7, n=1000)
    seen = [int(np.argmax(x))]
    ref = _hf(lp.RepetitionPenaltyLogitsProcessor(3.0), x, seen)
    s = S.Sampler(S.SamplingParams(temperature=0.0, repetition_penalty=3.0))
    s.add_seen(seen)
    assert s.sample(x) == int(np.argmax(ref))
    assert S.Sampler(S.SamplingParams()).sample(x) == int(np.argmax(x))


def test_sampling_distribution():
    """Empirical frequencies follow softmax of transformers' processed logits."""
    x = _rand(3, n=12, scale=1.5)
    params = S.SamplingParams(temperature=0.9, top_k=8, top_p=0.9, seed=1234)
    ref = _hf_chain(x, params, None)
    p = torch.softmax(torch.from_numpy(ref), -1).numpy().astype(np.float64)
    s = S.Sampler(params)
    n = 40000
    counts = np.bincount([s.sample(x) for _ in range(n)], minlength=12)
    assert np.all(counts[p == 0] == 0)
    expected = p * n
    nz = expected > 0
    chi2 = float((((counts - expected) ** 2)[nz] / expected[nz]).sum())
    assert chi2 < 40.0, (chi2, counts, expected)  # ~7 dof; p(chi2>40) is ~1e-6


def test_seed_reproducible():
    x = _rand(5, n=3000)
    params = S.SamplingParams(temperature=1.0, top_p=0.95, seed=42)
    a = [S.Sampler(params).sample(x) for _ in range(1)]
    s1, s2 = S.Sampler(params), S.Sampler(params)
    seq1 = [s1.sample(x) for _ in range(50)]
    seq2 = [s2.sample(x) for _ in range(50)]
    assert seq1 == seq2 and seq1[0] == a[0]
    s3 = S.Sampler(S.SamplingParams(temperature=1.0, top_p=0.95, seed=43))
    assert [s3.sample(x) for _ in range(50)] != seq1


@pytest.mark.parametrize("kw,name", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.2), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(min_p=1.0), "min_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(seed=-3), "seed"),
    (dict(temperature="hot"), "temperature"),
])
def test_validation(kw, name):
    with pytest.raises(ArgumentError, match=name):
        S.SamplingParams(**kw)


def test_validate_max_tokens():
    assert S.validate_max_tokens(0) == 0
    with pytest.raises(ArgumentError, match="max_tokens"):
        S.validate_max_tokens(-1)
    with pytest.raises(ArgumentError, match="max_tokens"):
        S.validate_max_tokens("10")


def test_logprob():
    x = _rand(9, n=500)
    ref = torch.log_softmax(torch.from_numpy(x), -1).numpy()
    for t in (0, 17, int(np.argmax(x))):
        assert abs(S.logprob(x, t) - float(ref[t])) < 1e-5


# ------------------------------------------------------------------ logit_bias
def test_logit_bias_validation_and_apply():
    assert S.validate_logit_bias(None, 10) is None and S.validate_logit_bias({}, 10) is None
    ids, vals = S.validate_logit_bias({"3": 5, 1: -2.5}, 10)
    assert dict(zip(ids.tolist(), vals.tolist())) == {3: 5.0, 1: -2.5}
    x = np.zeros(10, np.float32)
    y = S.apply_logit_bias(x, (ids, vals))
    assert y[3] == 5 and y[1] == -2.5 and x[3] == 0  # input untouched
    for bad, what in [({"x": 1}, "'x'"), ({"1.5": 1}, "'1.5'"), ({"10": 1}, "'10'"),
                      ({"-1": 1}, "'-1'"), ({"2": 101}, "'2'"), ({"2": float("nan")}, "'2'"),
                      ({"2": float("inf")}, "'2'"), ({"2": "1"}, "'2'"), ({True: 1}, "True")]:
        with pytest.raises(ArgumentError, match="logit_bias") as e:
            S.validate_logit_bias(bad, 10)
        assert what in str(e.value)
    with pytest.raises(ArgumentError, match="logit_bias"):
        S.validate_logit_bias([1, 2], 10)
