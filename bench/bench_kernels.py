"""Kernel benchmarks (pytest-benchmark): matvec and matmul at real projection shapes.

    python -m pytest bench/bench_kernels.py --benchmark-only [--benchmark-json out.json]

Shapes: 2048x512 and 512x2048 (a routed expert's gate/up and down at hidden 2048, I 512),
4096x1024, and 32768x2048 (an lm_head slice: the full 248320x2048 is too big for a micro
benchmark). Dtypes: 4-bit affine (group 64) and bf16. Each case reports weight GB/s in extra_info.
"""
import os

import numpy as np
import pytest

from pyflashmoe import quant

SHAPES = [(2048, 512), (512, 2048), (4096, 1024), (32768, 2048)]
NCPU = os.cpu_count() or 1
THREADS = sorted({1, NCPU})


def make(dtype, rows, cols, rng):
    w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    if dtype == "q4":
        q, s, b = quant.quantize(w, 4, 64)
        return quant.QMatrix("affine", rows, cols, q=q, scales=s, biases=b, bits=4, group_size=64)
    if dtype == "q8":
        q, s, b = quant.quantize(w, 8, 64)
        return quant.QMatrix("affine", rows, cols, q=q, scales=s, biases=b, bits=8, group_size=64)
    return quant.QMatrix("bf16", rows, cols, data=quant.f32_to_bf16(w))


@pytest.fixture(scope="module")
def pools():
    return {t: quant.Pool(t) for t in THREADS}


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("dtype", ["q4", "bf16", "q8"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matvec(benchmark, pools, shape, dtype, threads):
    rng = np.random.default_rng(0)
    m = make(dtype, *shape, rng)
    x = rng.standard_normal(shape[1]).astype(np.float32)
    y = np.empty(shape[0], np.float32)
    pool = pools[threads]
    benchmark.group = f"matvec {shape[0]}x{shape[1]}"
    benchmark.extra_info.update(simd=quant.simd_name(), weight_bytes=m.nbytes)
    benchmark(m.matvec, x, y, pool)
    benchmark.extra_info["weight_GBps"] = round(m.nbytes / benchmark.stats.stats.median / 1e9, 2)


@pytest.mark.parametrize("n", [4, 32])
@pytest.mark.parametrize("dtype", ["q4", "bf16"])
def test_matmul(benchmark, pools, dtype, n):
    rows, cols = 4096, 1024
    rng = np.random.default_rng(1)
    m = make(dtype, rows, cols, rng)
    X = rng.standard_normal((n, cols)).astype(np.float32)
    pool = pools[THREADS[-1]]
    benchmark.group = f"matmul {rows}x{cols}"
    benchmark(m.matmul, X, pool)
    benchmark.extra_info["GFLOPs"] = round(2 * n * rows * cols / benchmark.stats.stats.median / 1e9, 2)
    benchmark.extra_info["matvec_equiv_GBps"] = round(n * m.nbytes / benchmark.stats.stats.median / 1e9, 2)


def test_dot(benchmark):
    rng = np.random.default_rng(2)
    a = rng.standard_normal(4096).astype(np.float32)
    b = rng.standard_normal(4096).astype(np.float32)
    benchmark(quant._core.dot_f32, a, b)
