"""Model.generate_batch (issue 10 item 4, Python side): several prompts decoded together, each
sequence giving exactly what generate() gives for it alone; sequences of different lengths join
and leave the running batch; errors reset every session of the batch and the Model stays usable.

Runs on the embedded demo model, on a tiny converted Qwen3.5-MoE from tests/tiny_models.py (needs
torch/transformers: skipped with the reason otherwise) and on test_generate's fake engine (with
and without an engine-level eval_batch)."""
import os
import sys

import numpy as np
import pytest

from pyflashmoe import generate as G
from pyflashmoe.errors import ArgumentError, FlashMoEError, ModelIOError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_generate import FakeEngine, FakeSession, make_model, tok  # noqa: E402,F401

core = pytest.importorskip("pyflashmoe._core")
needs_engine = pytest.mark.skipif(not hasattr(core, "Engine"),
                                  reason="pyflashmoe._core was built without the engine")


def _alone(m, prompt, **kw):
    pieces = list(m.generate(prompt, **kw))
    return [p.token for p in pieces], "".join(p.text for p in pieces), pieces[-1].finish_reason


def _batched(m, items, **kw):
    toks, texts, fins, order = {}, {}, {}, []
    for i, p in m.generate_batch(items, **kw):
        assert fins.get(i) is None, "a piece after the last one"
        toks.setdefault(i, []).append(p.token)
        texts[i] = texts.get(i, "") + p.text
        fins[i] = p.finish_reason
        order.append(i)
    return toks, texts, fins, order


# ------------------------------------------------------------------------------ the demo model
@pytest.fixture(scope="module")
def demo():
    return G.Model.load(threads=2, parallel=4)


@pytest.fixture(scope="module")
def demo1():
    return G.Model.load(threads=2)


@needs_engine
def test_demo_batch_equals_separate_greedy(demo, demo1):
    prompts = ["Once upon a time", "The king said", "In the beginning God created the heaven",
               "She opened the door and", "A", "The old man walked slowly down the road to the"]
    lengths = [12, 30, 5, 22, 17, 9]  # different lengths: sequences leave at different steps
    items = [{"prompt": p, "max_tokens": n} for p, n in zip(prompts, lengths)]
    toks, texts, fins, order = _batched(demo, items, temperature=0, ignore_eos=True)
    assert demo.parallel == 4
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        want = _alone(demo1, p, max_tokens=n, temperature=0, ignore_eos=True)
        assert (toks[i], texts[i], fins[i]) == want, i
    # 6 sequences, 4 at a time: the 5th joined only after one had left, and the pieces of the
    # running sequences interleave
    last = {i: len(order) - 1 - order[::-1].index(i) for i in range(6)}
    assert order.index(4) > min(last[i] for i in range(4))
    assert order.index(5) > sorted(last[i] for i in range(5))[1]
    assert order[:8] != sorted(order[:8])
    st = demo.stats
    assert st["sequences"] == 6 and st["generated_tokens"] == sum(lengths)
    assert st["steps"] < sum(lengths) and st["batched_tokens"] > st["steps"]
    assert [s["generated_tokens"] for s in demo.batch_stats] == lengths


@needs_engine
def test_demo_batch_own_sampling_params_and_stops(demo, demo1):
    items = [{"prompt": "Once upon a time", "temperature": 0.8, "seed": 11, "max_tokens": 20},
             {"prompt": "The king said", "temperature": 0, "stop": [" the", "."], "max_tokens": 40},
             {"prompt": "Once upon a time", "temperature": 1.0, "top_k": 5, "seed": 3,
              "max_tokens": 15}]
    toks, texts, fins, _ = _batched(demo, items, ignore_eos=True)
    for i, it in enumerate(items):
        kw = {k: v for k, v in it.items() if k != "prompt"}
        assert (toks[i], texts[i], fins[i]) == _alone(demo1, it["prompt"], ignore_eos=True, **kw), i


@needs_engine
def test_demo_batch_then_prefix_reuse(demo):
    ids = demo.tokenizer.encode("Once upon a time there was")
    toks, _, _, _ = _batched(demo, [ids, ids[:3]], max_tokens=6, temperature=0, ignore_eos=True)
    follow = ids + toks[0][:-1]  # the last sampled token was never evaluated
    got = [p.token for p in demo.generate(follow + [5], max_tokens=3, temperature=0)]
    assert demo.stats["cached_tokens"] == len(follow)
    m1 = G.Model.load(threads=2)
    assert got == [p.token for p in m1.generate(follow + [5], max_tokens=3, temperature=0)]


@needs_engine
def test_demo_batch_argument_errors(demo):
    with pytest.raises(ArgumentError, match=r"prompts\[1\].*temperature"):
        demo.generate_batch(["a", {"prompt": "b", "temperature": -1}])
    with pytest.raises(ArgumentError, match=r"prompts\[0\].*'prompt' key"):
        demo.generate_batch([{"max_tokens": 3}])
    with pytest.raises(ArgumentError, match=r"prompts\[0\]: unknown argument 'temprature'"):
        demo.generate_batch([{"prompt": "a", "temprature": 1}])
    with pytest.raises(ArgumentError, match="parallel=5 exceeds"):
        demo.generate_batch(["a"], parallel=5)
    with pytest.raises(ArgumentError, match="must not be empty"):
        demo.generate_batch([])
    with pytest.raises(ArgumentError, match="list of prompts"):
        demo.generate_batch("a")
    # nothing ran: every session is idle
    assert demo.pool.stats()["busy"] == 0


# ------------------------------------------------------------------------------ tiny_models.py
@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    pytest.importorskip("torch", reason="tests/tiny_models.py needs torch")
    pytest.importorskip("transformers", reason="tests/tiny_models.py needs transformers")
    from pyflashmoe.convert import convert
    from tiny_models import make_tiny_hf
    base = tmp_path_factory.mktemp("batch_tiny")
    make_tiny_hf("qwen3_5_moe", str(base / "hf"), seed=5)
    convert(str(base / "hf"), str(base / "fm"), bits=4, progress=False)
    return str(base / "fm")


@needs_engine
def test_tiny_model_batch_equals_separate_greedy(tiny_hf):
    m = G.Model.load(tiny_hf, threads=2, parallel=3)
    m1 = G.Model.load(tiny_hf, threads=2)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 500, size=n).tolist() for n in (4, 19, 1, 33, 8)]
    lengths = [25, 3, 14, 9, 20]
    items = [{"prompt": p, "max_tokens": n} for p, n in zip(prompts, lengths)]
    toks, _, fins, _ = _batched(m, items, temperature=0, ignore_eos=True)
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        want = [t.token for t in m1.generate(p, max_tokens=n, temperature=0, ignore_eos=True)]
        assert toks[i] == want and fins[i] == "length", i


# ------------------------------------------------------------------------------ fake engine
class BatchFakeEngine(FakeEngine):
    """FakeEngine with an engine-level eval_batch (the C contract, checked)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.batch_calls = []
        self.leading = []  # sessions[0] of each call

    def eval_batch(self, sessions, tokens):
        assert len(sessions) == tokens.size and len(set(map(id, sessions))) == len(sessions)
        self.batch_calls.append(len(sessions))
        self.leading.append(sessions[0])
        try:
            return np.stack([s.eval(tokens[i:i + 1]) for i, s in enumerate(sessions)])
        except BaseException:
            for s in sessions:
                s.reset()
            raise


def _fake(tok, engine_cls=FakeEngine, parallel=3):
    eng = engine_cls(tok.vocab_size)
    return G.Model(eng, FakeSession, tokenizer=tok, spec={}, context_length=4096,
                   parallel=parallel), eng


@pytest.mark.parametrize("engine_cls", [FakeEngine, BatchFakeEngine])
def test_fake_batch_equals_separate(tok, engine_cls):
    m, eng = _fake(tok, engine_cls)
    m1, _ = _fake(tok, FakeEngine, parallel=1)
    prompts = ["one two", "three", "four five six seven", "eight nine"]
    items = [{"prompt": p, "max_tokens": n, "seed": i, "temperature": 0.7}
             for i, (p, n) in enumerate(zip(prompts, (7, 2, 11, 5)))]
    toks, texts, fins, _ = _batched(m, items, ignore_eos=True)
    for i, it in enumerate(items):
        kw = {k: v for k, v in it.items() if k != "prompt"}
        assert (toks[i], texts[i], fins[i]) == _alone(m1, it["prompt"], ignore_eos=True, **kw)
    if engine_cls is BatchFakeEngine:
        assert max(eng.batch_calls) == 3 and min(eng.batch_calls) >= 1


def test_fake_batch_error_resets_every_session_and_model_stays_usable(tok):
    m, eng = _fake(tok, BatchFakeEngine)
    items = [{"prompt": p, "max_tokens": 10} for p in ("a b", "c d", "e f")]
    ref, _, _, _ = _batched(m, items, ignore_eos=True, temperature=0)
    eng.calls = 0
    eng.fail_at_call = 6  # inside a batched step
    with pytest.raises(ModelIOError):
        _batched(m, items, ignore_eos=True, temperature=0)
    assert all(s.pos == 0 for s in m.pool.sessions()) and m.pool.stats()["busy"] == 0
    eng.fail_at_call = None
    assert _batched(m, items, ignore_eos=True, temperature=0)[0] == ref


def test_fake_batch_stopped_early_keeps_model_usable(tok):
    m, _ = _fake(tok, BatchFakeEngine)
    g = m.generate_batch(["a b", "c d", "e f", "g h"], max_tokens=10, temperature=0)
    for _ in range(5):
        next(g)
    g.close()
    assert m.pool.stats()["busy"] == 0
    assert len(list(m.generate("a b", max_tokens=4))) == 4


def test_fake_generate_supersedes_the_oldest_when_all_sessions_are_busy(tok):
    m, _ = _fake(tok, parallel=2)
    g1 = m.generate("a b", max_tokens=20, ignore_eos=True)
    g2 = m.generate("c d", max_tokens=20, ignore_eos=True)
    next(g1), next(g2)
    assert len(list(m.generate("e f", max_tokens=3))) == 3  # takes g1's session
    with pytest.raises(FlashMoEError, match="superseded"):
        list(g1)
    assert len(list(g2)) == 19  # g2 kept its session


def test_parallel_argument_checked(tok):
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ArgumentError, match="parallel"):
            G.Model(FakeEngine(tok.vocab_size), FakeSession, tokenizer=tok, parallel=bad)


def test_fake_batch_pieces_equal_alone_with_logprobs(tok):
    m, _ = _fake(tok, BatchFakeEngine)
    m1, _ = _fake(tok, FakeEngine, parallel=1)
    items = [{"prompt": "one", "max_tokens": 5, "top_logprobs": 3},
             {"prompt": "two three", "max_tokens": 7, "logit_bias": {5: 50.0}}]
    got = {}
    for i, p in m.generate_batch(items, temperature=0, ignore_eos=True):
        got.setdefault(i, []).append(p)
    for i, it in enumerate(items):
        kw = {k: v for k, v in it.items() if k != "prompt"}
        assert got[i] == list(m1.generate(it["prompt"], temperature=0, ignore_eos=True, **kw))
    assert got[0][0].top_logprobs is not None and len(got[0][0].top_logprobs) == 3


@needs_engine
def test_bench_parallel_smoke(tmp_path):
    """bench/bench_parallel.py runs (tiny settings) and writes its JSON."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import bench_parallel
    out = tmp_path / "bp.json"
    assert bench_parallel.main(["--models", "demo", "--streams", "1,2", "--tokens", "4",
                                "--repeats", "2", "--threads", "1", "--server",
                                "--json", str(out)]) == 0
    import json
    res = json.loads(out.read_text())["results"]
    assert [(r["path"], r["streams"]) for r in res] == [("generate_batch", 1), ("generate_batch", 2),
                                                         ("server", 1), ("server", 2)]
    assert all(r["agg_tps"] > 0 and len(r["spread"]["runs"]) == 2 for r in res)
    assert res[0]["speedup"] == 1.0 and res[0]["bytes_per_token"] >= 0
    # timed: generate_batch after every stream's first token; the server: every token
    assert [r["timed_tokens"] for r in res] == [3, 6, 4, 8]


def test_batch_rows_in_pool_order_keep_the_leading_session(tok):
    """Model._eval_batch hands the engine its sessions in the pool's order (rows mapped back),
    so the leading session stays the first while sequences leave and join in any order."""
    m, eng = _fake(tok, BatchFakeEngine, parallel=3)
    m1, _ = _fake(tok, FakeEngine, parallel=1)
    items = [{"prompt": p, "max_tokens": n} for p, n in (("a", 3), ("b c", 9), ("d", 5), ("e f", 8))]
    toks, _, _, _ = _batched(m, items, temperature=0, ignore_eos=True)
    for i, it in enumerate(items):
        assert toks[i] == _alone(m1, it["prompt"], max_tokens=it["max_tokens"], temperature=0,
                                 ignore_eos=True)[0]
    first = m.pool.sessions()[0]
    # "a" leaves after 3 tokens and "e f" joins on its session, which stays the first
    assert len(eng.leading) == 9 and all(s is first for s in eng.leading)
