"""Decode benchmarks (pytest-benchmark): one decode token on synthetic Qwen3.5-MoE models.

    python -m pytest bench/bench_decode.py --benchmark-only [--benchmark-json out.json]

Models:
  tiny      `flashmoe synth --preset tiny` (written into a temporary dir by the fixture)
  35b       a `flashmoe synth --preset qwen3.5-35b-a3b` dir (~23 GB) at $FLASHMOE_BENCH_35B
            (default /work/synth/q35b); skipped with the reason when it is absent.
Each round decodes one greedy token on a warm session (page cache as it is; the 35B model does
not fit the page cache of a 24 GB machine, so its experts partly come from disk). extra_info
records the per-phase ms and bytes read of the measured tokens. For cold numbers, the roofline
and llama.cpp use `flashmoe bench` and bench/compare_llamacpp.py.
"""
import os

import numpy as np
import pytest

from pyflashmoe import _core

NCPU = os.cpu_count() or 1
MODEL_35B = os.environ.get("FLASHMOE_BENCH_35B", "/work/synth/q35b")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from pyflashmoe.synth import synth
    out = tmp_path_factory.mktemp("bench_decode") / "tiny"
    synth(str(out), preset="tiny", progress=False, tokenizer="")
    return str(out)


def _decode_bench(benchmark, path, threads, k=None, rounds=8):
    eng = _core.Engine(path, n_threads=threads, experts_per_token=int(k or 0))
    sess = _core.Session(eng, 512)
    rng = np.random.default_rng(0)
    logits = sess.eval(rng.integers(0, 1000, size=4).astype(np.int32))
    state = {"tok": int(np.argmax(logits))}

    def step():
        if sess.pos >= sess.n_ctx - 1:
            sess.reset()
        lg = sess.eval(np.array([state["tok"]], np.int32))
        state["tok"] = int(np.argmax(lg))
        return lg

    step()  # warm-up
    sess.reset_stats()
    lg = benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
    assert np.isfinite(lg).all()
    st = sess.stats()
    n = max(1, st["n_tokens"])
    benchmark.extra_info.update({k2: st[k2] / n for k2 in ("ms_attn", "ms_route", "ms_io_wait",
                                                            "ms_expert", "ms_other", "bytes_read",
                                                            "expert_loads", "expert_hits")})
    benchmark.extra_info["threads"] = threads


@pytest.mark.parametrize("threads", sorted({1, NCPU}))
def test_decode_tiny(benchmark, tiny_dir, threads):
    _decode_bench(benchmark, tiny_dir, threads, rounds=32)


@pytest.mark.parametrize("k", [None, 4])
def test_decode_35b(benchmark, k):
    if not os.path.isfile(os.path.join(MODEL_35B, "pyflashmoe.json")):
        pytest.skip(f"no 35B-dims synthetic model at {MODEL_35B} (make one with "
                    f"`flashmoe synth --preset qwen3.5-35b-a3b {MODEL_35B}` or set FLASHMOE_BENCH_35B)")
    _decode_bench(benchmark, MODEL_35B, NCPU, k=k, rounds=5)
