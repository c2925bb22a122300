"""`flashmoe bench`: the cold path is really cold, bytes match the routing, the report is complete.

References: the kernel (mincore residency after posix_fadvise DONTNEED; /proc/self/io read_bytes
for what really came from storage) and the model's manifest (block sizes).
"""
import json
import os
import subprocess
import sys

import pytest

from pyflashmoe import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """35B dims (real expert block size), 1 layer, cut vocabulary: ~560 MB."""
    from pyflashmoe.synth import synth
    out = tmp_path_factory.mktemp("bench") / "m"
    synth(str(out), preset="qwen3.5-35b-a3b", layers=1, vocab=4096, progress=False)
    return out


def test_drop_cache_and_residency(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(os.urandom(8 << 20))
    bench.warm_file(str(p))
    r, s = bench.resident_bytes(str(p))
    assert s == 8 << 20 and r > 0.9 * s
    bench.drop_cache([str(p)])
    r, _ = bench.resident_bytes(str(p))
    assert r < 0.05 * s
    # a dropped file really comes from storage again
    d0 = bench.proc_read_bytes()
    if d0 is None:
        pytest.skip("/proc/self/io not available")
    bench.warm_file(str(p))
    assert bench.proc_read_bytes() - d0 >= 0.9 * s


def test_cold_bench_reads_what_the_routing_asks(model):
    r = bench.bench(str(model), cold=True, tokens=3, prompt_tokens=4, repeat=2, threads=2,
                    roofline=False)
    block = json.load(open(model / "pyflashmoe.json"))["experts"]["layers"]["0"]["block_bytes"]
    assert r["block_bytes"] == block
    assert r["finite"]
    # the page cache held none of the expert files when each repeat started
    assert max(r["cold_check"]["residency_before"]) < 0.01
    for ph in ("prefill", "decode"):
        d = r[ph]
        # engine bytes == distinct routed experts not cached * block size
        assert d["bytes_match_loads"]
        assert d["expert_loads_per_token"] > 0
    # prefill of a cold repeat: every expert block the engine asks for comes from the disk
    # (readahead may add a little; page-cache hits would show as less)
    for run in r["runs"]:
        eng = run["prefill"]["stats"]["bytes_read"]
        disk = run["prefill"]["disk_bytes"]
        if disk is None:
            pytest.skip("/proc/self/io not available")
        assert eng == run["prefill"]["stats"]["expert_loads"] * block
        assert 0.95 * eng <= disk <= 1.5 * eng + (1 << 20), (eng, disk)
    # K distinct experts per token per layer for decode at most, and the prefill union
    K = r["k"]
    assert r["decode"]["expert_loads_per_token"] <= K + 1e-9
    assert r["prefill"]["expert_loads_per_token"] <= K + 1e-9


def test_warm_bench_with_ram_budget_hits(model):
    r = bench.bench(str(model), cold=False, tokens=2, prompt_tokens=2, repeat=1, threads=2,
                    ram_budget=1 << 30, roofline=False, warmup=False)
    assert r["prefill"]["expert_loads_per_token"] > 0
    assert r["finite"]


def test_cli_json_and_roofline(model):
    out = subprocess.run([sys.executable, "-m", "pyflashmoe", "bench", str(model), "--tokens", "2",
                          "--prompt-tokens", "2", "--repeat", "1", "--threads", "2", "--cold", "--json",
                          "--k", "4"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["k"] == 4 and r["decode"]["expert_loads_per_token"] <= 4
    rf = r["roofline"]
    assert rf["disk_gbps"] > 0 and rf["ram_gbps"] > 0
    assert rf["roofline_tps"] > 0 and 0 < rf["achieved_over_roofline"]
    ml = r["decode"]["ms_per_layer"]
    assert set(ml) == {"attn", "route", "io_wait", "expert"}
    txt = subprocess.run([sys.executable, "-m", "pyflashmoe", "bench", str(model), "--tokens", "1",
                          "--prompt-tokens", "1", "--repeat", "1", "--no-roofline"],
                         cwd=ROOT, capture_output=True, text=True)
    assert txt.returncode == 0, txt.stderr
    assert "decode" in txt.stdout and "ms/layer" in txt.stdout


def test_bad_arguments(model):
    from pyflashmoe.errors import ArgumentError, FormatError
    with pytest.raises(ArgumentError, match="--tokens"):
        bench.bench(str(model), tokens=0)
    with pytest.raises(ArgumentError, match="--k"):
        bench.bench(str(model), k=10 ** 6)
    with pytest.raises(FormatError):
        bench.bench(str(model / "experts"))


def test_plot_needs_matplotlib_or_draws(model, tmp_path):
    png = tmp_path / "p.png"
    out = subprocess.run([sys.executable, "-m", "pyflashmoe", "bench", str(model), "--tokens", "1",
                          "--prompt-tokens", "1", "--repeat", "1", "--plot", str(png),
                          "--plot-budgets", "0,64MiB"], cwd=ROOT, capture_output=True, text=True)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert out.returncode == 2 and "matplotlib" in out.stderr
        return
    assert out.returncode == 0, out.stderr
    assert png.stat().st_size > 1000
