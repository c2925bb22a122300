"""Model.generate(top_logprobs=k): the k most likely tokens of the raw distribution per step."""
import math

import numpy as np
import pytest

from pyflashmoe import generate as G
from pyflashmoe.errors import ArgumentError
from pyflashmoe.sampling import VocabMask


def _ref_log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max()
    return x - m - math.log(np.exp(x - m).sum())


def test_top_k_logprobs_helper():
    x = np.array([1.0, 3.0, 3.0, -2.0, 0.5, 7.0], dtype=np.float32)
    ref = _ref_log_softmax(x)
    top = G.top_k_logprobs(x, 3)
    assert [t for t, _ in top] == [5, 1, 2]          # ties: lower id first
    assert np.allclose([lp for _, lp in top], ref[[5, 1, 2]], atol=1e-5)
    assert [t for t, _ in G.top_k_logprobs(x, 10)] == [5, 1, 2, 0, 4, 3]   # k > vocab: all
    assert G.top_k_logprobs(x, 0) == []
    # ids the tokenizer lacks (a padded embedding) are never listed; normalisation stays global
    mask = VocabMask(n=5, holes=np.array([1], dtype=np.int64))
    top = G.top_k_logprobs(x, 3, mask)
    assert [t for t, _ in top] == [2, 0, 4]
    assert np.allclose([lp for _, lp in top], ref[[2, 0, 4]], atol=1e-5)


@pytest.fixture(scope="module")
def demo():
    return G.Model.load(G.DEMO_MODEL_DIR)


def test_generate_top_logprobs_demo_model(demo):
    ids = demo.encode_prompt("Once upon a time")
    pieces = list(demo.generate(ids, max_tokens=4, temperature=0, ignore_eos=True, top_logprobs=5))
    ctx = list(ids)
    for p in pieces:
        ref = _ref_log_softmax(demo.logits(ctx)[-1])
        assert len(p.top_logprobs) == 5
        toks = [t for t, _ in p.top_logprobs]
        lps = [lp for _, lp in p.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert toks[0] == p.token                     # greedy: the chosen token is the top one
        assert p.logprob == lps[0]                      # the same value as .logprob
        assert np.allclose(lps, ref[toks], atol=1e-4)
        assert set(toks) == set(np.argsort(-ref, kind="stable")[:5].tolist())
        ctx.append(p.token)
    # sampling settings do not change the reported distribution
    hot = next(iter(demo.generate(ids, max_tokens=1, temperature=1.5, top_k=2, seed=1,
                                  top_logprobs=3)))
    assert [t for t, _ in hot.top_logprobs] == [t for t, _ in pieces[0].top_logprobs[:3]]
    # default: none
    assert next(iter(demo.generate(ids, max_tokens=1))).top_logprobs is None


@pytest.mark.parametrize("bad", [-1, 21, 1.5, True, "3"])
def test_top_logprobs_validated(demo, bad):
    with pytest.raises(ArgumentError, match="top_logprobs"):
        demo.generate("Hi", max_tokens=1, top_logprobs=bad)
