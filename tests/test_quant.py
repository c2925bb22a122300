"""Quantizer and matrix kernels of the C core against references nobody here wrote.

- Quantization / dequantization: bit-exact against mlx.core.quantize / mlx.core.dequantize.
- Matvec / matmul: against mlx.core.quantized_matmul and float64 numpy on the mlx-dequantized
  weights, for every SIMD path this CPU can run, plus each path against the scalar reference.
- bf16 helpers: against torch's float32 <-> bfloat16 conversion (round to nearest even).

Tolerances of the float kernels: every kernel sums in float32 but in a different order (lanes,
per-group partial sums, the s*dot(q,x) + b*sum(x) rewrite), so results differ by rounding only.
The rounding error of any summation order of m terms is at most about m*u times the sum of the
absolute values of the terms (u = 2^-24). We bound with T = sum_g |s|*sum|q*x| + |b|*sum|x| (the
magnitudes the affine kernels actually add) and allow K*u*T with K = cols/8 + 64: a kernel summing
8 lanes of cols/8 terms each, plus the lane/group reductions. A real bug (a dropped or doubled
element, a wrong scale or bias, a wrong row) moves the result by about one term, i.e. ~T/cols,
several times more than the allowance for every size tested here.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is the reference for bf16 rounding")
try:
    import mlx.core as mx
except ImportError:  # the kernel tests below still run (numpy / scalar references)
    mx = None
need_mlx = pytest.mark.skipif(mx is None, reason="mlx is not installed: it is the reference for the "
                              "MLX quantization layout")

from pyflashmoe import quant  # noqa: E402
from pyflashmoe.errors import ArgumentError  # noqa: E402

U = 2.0 ** -24
LEVELS = quant.simd_levels()
RNG_SEED = 1234


def mlx_bf16_bits(a) -> np.ndarray:
    """bf16 bit patterns of an mlx array (converted by mlx itself)."""
    return (np.array(a.astype(mx.bfloat16).astype(mx.float32)).view(np.uint32) >> 16).astype(np.uint16)


def torch_bf16_bits(a: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


def torch_bf16_value(bits: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16)
    return t.to(torch.float32).numpy()


def weight_cases(rng, rows, cols):
    yield "normal", rng.standard_normal((rows, cols)).astype(np.float32)
    yield "small", (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    yield "positive", rng.uniform(0.1, 1, (rows, cols)).astype(np.float32)
    yield "negative", rng.uniform(-1, -0.1, (rows, cols)).astype(np.float32)
    yield "constant", np.full((rows, cols), 0.3, np.float32)
    yield "zeros", np.zeros((rows, cols), np.float32)
    yield "tiny", (rng.standard_normal((rows, cols)) * 1e-9).astype(np.float32)  # eps clamp
    yield "large", (rng.standard_normal((rows, cols)) * 1e4).astype(np.float32)
    yield "integers", rng.integers(-8, 8, (rows, cols)).astype(np.float32)  # rint ties
    yield "sparse", (rng.standard_normal((rows, cols)) * (rng.random((rows, cols)) < 0.05)).astype(np.float32)
    # heavy-tailed with mixed scales per row
    yield "mixed", (rng.standard_t(3, (rows, cols)) * 10.0 ** rng.integers(-3, 2, (rows, 1))).astype(np.float32)


# ---------------------------------------------------------------- quantize / dequantize vs mlx

@need_mlx
@pytest.mark.parametrize("bits", quant.BITS)
@pytest.mark.parametrize("gs", quant.GROUP_SIZES)
def test_quantize_matches_mlx(bits, gs):
    # Our quantizer performs mlx's float operations in mlx's order (min/max, scale, edge, rint of
    # (w-bias)/scale), so q, scales and biases must be identical, not merely close.
    rng = np.random.default_rng(RNG_SEED + bits * 1000 + gs)
    for name, w in weight_cases(rng, 24, 384):
        # bf16 weights (what checkpoints hold): mlx computes in float and stores bf16 scales
        wb = torch_bf16_value(torch_bf16_bits(w))
        q, s, b = quant.quantize(wb, bits, gs)
        mq, ms, mb = mx.quantize(mx.array(wb).astype(mx.bfloat16), group_size=gs, bits=bits)
        np.testing.assert_array_equal(q, np.array(mq), err_msg=f"q {name} bf16 input")
        np.testing.assert_array_equal(s, mlx_bf16_bits(ms), err_msg=f"scales {name}")
        np.testing.assert_array_equal(b, mlx_bf16_bits(mb), err_msg=f"biases {name}")
        # float32 weights: q identical to mlx's float32 quantization, scales its float32 scales
        # rounded to bf16 (our scales are stored bf16)
        q, s, b = quant.quantize(w, bits, gs)
        mq, ms, mb = mx.quantize(mx.array(w), group_size=gs, bits=bits)
        np.testing.assert_array_equal(q, np.array(mq), err_msg=f"q {name} f32 input")
        np.testing.assert_array_equal(s, mlx_bf16_bits(ms), err_msg=f"scales {name} f32 input")
        np.testing.assert_array_equal(b, mlx_bf16_bits(mb), err_msg=f"biases {name} f32 input")


def test_quantize_input_dtypes_and_batch():
    rng = np.random.default_rng(RNG_SEED)
    w = rng.standard_normal((3, 5, 128)).astype(np.float32)
    wbits = torch_bf16_bits(w)
    ref = quant.quantize(torch_bf16_value(wbits), 4, 64)
    # uint16 is taken as bf16 bits; leading dims are kept
    for got in (quant.quantize(wbits, 4, 64), quant.quantize(torch_bf16_value(wbits).astype(np.float64), 4, 64),
                quant.quantize(torch_bf16_value(wbits), 4, 64, n_threads=2)):
        for a, r in zip(got, ref):
            assert a.shape[:2] == (3, 5)
            np.testing.assert_array_equal(a, r)
    # non-contiguous input is accepted (copied)
    wt = np.asfortranarray(torch_bf16_value(wbits).reshape(15, 128))
    np.testing.assert_array_equal(quant.quantize(wt, 4, 64)[0], ref[0].reshape(15, -1))


@need_mlx
@pytest.mark.parametrize("bits", quant.BITS)
@pytest.mark.parametrize("gs", quant.GROUP_SIZES)
def test_dequantize_matches_mlx(bits, gs):
    rng = np.random.default_rng(RNG_SEED + bits * 7 + gs)
    rows, cols = 33, 512
    q = rng.integers(0, 2 ** 32, (rows, cols * bits // 32), dtype=np.uint64).astype(np.uint32)
    mag = 10.0 ** rng.integers(-6, 3, (rows, cols // gs))
    s = torch_bf16_bits(rng.standard_normal((rows, cols // gs)) * mag)
    b = torch_bf16_bits(rng.standard_normal((rows, cols // gs)) * mag)
    got = quant.dequantize(q, s, b, bits, gs)
    ref = np.array(mx.dequantize(mx.array(q), mx.array(torch_bf16_value(s)), mx.array(torch_bf16_value(b)),
                                 group_size=gs, bits=bits))
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
    # get_row (the embedding lookup) is the same function row by row
    m = quant.QMatrix("affine", rows, cols, q=q, scales=s, biases=b, bits=bits, group_size=gs)
    for r in (0, 17, rows - 1):
        np.testing.assert_array_equal(m.get_row(r).view(np.uint32), ref[r].view(np.uint32))
        for level in LEVELS:  # every SIMD path dequantizes bit-exactly too
            np.testing.assert_array_equal(m.get_row(r, level=level).view(np.uint32), ref[r].view(np.uint32))
    # mlx with bf16 scales returns bf16 rounded twice (product, then sum): ours rounded that way agrees
    mb = mx.dequantize(mx.array(q), mx.array(torch_bf16_value(s)).astype(mx.bfloat16),
                       mx.array(torch_bf16_value(b)).astype(mx.bfloat16), group_size=gs, bits=bits)
    qv = quant.dequantize(q, np.full_like(s, 0x3F80), np.zeros_like(b), bits, gs)  # the raw q values
    sv = np.repeat(torch_bf16_value(s), gs, 1)
    bv = np.repeat(torch_bf16_value(b), gs, 1)
    twice = quant.f32_to_bf16(torch_bf16_value(quant.f32_to_bf16(sv * qv)) + bv)
    np.testing.assert_array_equal(twice, mlx_bf16_bits(mb))


@need_mlx
def test_roundtrip_through_mlx():
    # ours -> mlx.dequantize and mlx.quantize -> ours agree
    rng = np.random.default_rng(RNG_SEED + 5)
    w = torch_bf16_value(torch_bf16_bits(rng.standard_normal((16, 256))))
    for bits in (3, 4, 8):
        q, s, b = quant.quantize(w, bits, 64)
        ref = np.array(mx.dequantize(mx.array(q), mx.array(torch_bf16_value(s)), mx.array(torch_bf16_value(b)),
                                     group_size=64, bits=bits))
        np.testing.assert_array_equal(quant.dequantize(q, s, b, bits, 64), ref)


# ---------------------------------------------------------------- matvec / matmul

def affine_bound(q, s, b, bits, gs, x):
    """T of the module docstring, per row."""
    qv = quant.dequantize(q, np.full_like(s, 0x3F80), np.zeros_like(b), bits, gs).astype(np.float64)
    rows, cols = qv.shape
    ax = np.abs(x.astype(np.float64))
    sq = np.abs(qv * ax).reshape(rows, cols // gs, gs).sum(-1)
    sx = ax.reshape(cols // gs, gs).sum(-1)
    return (np.abs(torch_bf16_value(s)) * sq + np.abs(torch_bf16_value(b)) * sx).sum(-1)


def tol_k(cols):
    return (cols / 8 + 64) * U


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("bits", quant.BITS)
@pytest.mark.parametrize("gs", quant.GROUP_SIZES)
def test_affine_matvec(level, bits, gs):
    rng = np.random.default_rng(RNG_SEED + bits + gs)
    rows, cols = 67, 1024
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    w[:, :gs] += 0.3  # groups with large biases
    q, s, b = quant.quantize(w, bits, gs)
    x = rng.standard_normal(cols).astype(np.float32)
    m = quant.QMatrix("affine", rows, cols, q=q, scales=s, biases=b, bits=bits, group_size=gs)
    y = m.matvec(x, level=level)
    # independent: float64 product of mlx's dequantization (ours, checked bit-exact against mlx
    # elsewhere, when mlx is absent)
    if mx is not None:
        wd = np.array(mx.dequantize(mx.array(q), mx.array(torch_bf16_value(s)), mx.array(torch_bf16_value(b)),
                                    group_size=gs, bits=bits)).astype(np.float64)
    else:
        wd = quant.dequantize(q, s, b, bits, gs).astype(np.float64)
    ref = wd @ x.astype(np.float64)
    tol = tol_k(cols) * affine_bound(q, s, b, bits, gs, x)
    assert np.all(np.abs(y - ref) <= tol), np.max(np.abs(y - ref) / tol)
    # against the scalar reference kernel
    ys = m.matvec(x, level="scalar")
    assert np.all(np.abs(y - ys) <= 2 * tol)
    # and mlx's own kernel (float32 throughout, its own summation order)
    if mx is None:
        return
    mref = np.array(mx.quantized_matmul(mx.array(x[None]), mx.array(q), mx.array(torch_bf16_value(s)),
                                        mx.array(torch_bf16_value(b)), transpose=True, group_size=gs,
                                        bits=bits))[0]
    assert np.all(np.abs(y - mref) <= 2 * tol)


@pytest.mark.parametrize("level", LEVELS)
def test_bf16_f32_matvec(level):
    rng = np.random.default_rng(RNG_SEED + 99)
    for rows, cols in ((1, 8), (5, 24), (37, 1000), (130, 2048)):
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        wb = torch_bf16_bits(w)
        wv = torch_bf16_value(wb).astype(np.float64)
        x = rng.standard_normal(cols).astype(np.float32)
        tol = tol_k(cols) * (np.abs(wv) @ np.abs(x.astype(np.float64)))
        y = quant.QMatrix("bf16", rows, cols, data=wb).matvec(x, level=level)
        assert np.all(np.abs(y - wv @ x) <= tol), (rows, cols)
        w32 = w.astype(np.float64)
        tol32 = tol_k(cols) * (np.abs(w32) @ np.abs(x.astype(np.float64)))
        y32 = quant.QMatrix("f32", rows, cols, data=w).matvec(x, level=level)
        assert np.all(np.abs(y32 - w32 @ x) <= tol32), (rows, cols)


def test_public_matvec_and_threads():
    rng = np.random.default_rng(RNG_SEED + 3)
    rows, cols = 777, 512
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal(cols).astype(np.float32)
    q, s, b = quant.quantize(w, 4, 64)
    m = quant.QMatrix("affine", rows, cols, q=q, scales=s, biases=b, bits=4, group_size=64)
    y1 = quant.matvec(q, s, b, x, 4, 64)
    # same kernel per row whatever the thread split: bit-identical
    np.testing.assert_array_equal(quant.matvec(q, s, b, x, 4, 64, n_threads=2), y1)
    np.testing.assert_array_equal(m.matvec(x, pool=quant.Pool(3)), y1)
    np.testing.assert_array_equal(m.matvec(x), y1)
    wb = quant.f32_to_bf16(w)
    yb = quant.matvec(wb, None, None, x, 16)
    np.testing.assert_array_equal(quant.matvec(wb, None, None, x, 16, n_threads=2), yb)
    wv = quant.bf16_to_f32(wb).astype(np.float64)
    assert np.all(np.abs(yb - wv @ x) <= tol_k(cols) * (np.abs(wv) @ np.abs(x)))


@pytest.mark.parametrize("level", LEVELS)
def test_matvec_rows_writes_only_its_rows(level):
    rng = np.random.default_rng(RNG_SEED + 4)
    rows, cols = 50, 256
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal(cols).astype(np.float32)
    q, s, b = quant.quantize(w, 3, 32)
    mats = [quant.QMatrix("affine", rows, cols, q=q, scales=s, biases=b, bits=3, group_size=32),
            quant.QMatrix("bf16", rows, cols, data=quant.f32_to_bf16(w)),
            quant.QMatrix("f32", rows, cols, data=w)]
    for m in mats:
        full = m.matvec(x, level=level)
        for r0, r1 in ((0, 1), (3, 17), (49, 50), (10, 10), (0, 50)):
            y = np.full(rows, np.nan, np.float32)
            m.matvec_rows(x, y, r0, r1, level=level)
            assert np.all(np.isnan(np.delete(y, np.arange(r0, r1))))
            np.testing.assert_array_equal(y[r0:r1], full[r0:r1])


@pytest.mark.parametrize("level", LEVELS)
def test_matmul(level):
    rng = np.random.default_rng(RNG_SEED + 6)
    rows, cols = 45, 384
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    q, s, b = quant.quantize(w, 4, 128)
    wd = quant.dequantize(q, s, b, 4, 128).astype(np.float64)
    wb = quant.f32_to_bf16(w)
    mats = [(quant.QMatrix("affine", rows, cols, q=q, scales=s, biases=b, bits=4, group_size=128), wd),
            (quant.QMatrix("bf16", rows, cols, data=wb), quant.bf16_to_f32(wb).astype(np.float64)),
            (quant.QMatrix("f32", rows, cols, data=w), w.astype(np.float64))]
    for n in (1, 2, 7, 33):
        X = rng.standard_normal((n, cols)).astype(np.float32)
        for m, ref_w in mats:
            for pool in (None, quant.Pool(2)):
                Y = m.matmul(X, pool=pool, level=level)
                assert Y.shape == (n, rows)
                ref = X.astype(np.float64) @ ref_w.T
                # matmul dots dequantized rows: the bound uses |w| (plus the affine T for n == 1,
                # which runs the matvec kernel)
                tol = tol_k(cols) * (np.abs(X.astype(np.float64)) @ np.abs(ref_w).T) * 2
                if m is mats[0][0]:
                    tol = tol + tol_k(cols) * np.stack([affine_bound(q, s, b, 4, 128, xi) for xi in X])
                assert np.all(np.abs(Y - ref) <= tol), (n, level)


@pytest.mark.parametrize("level", LEVELS)
def test_dot_axpy(level):
    rng = np.random.default_rng(RNG_SEED + 8)
    for n in list(range(0, 70)) + [1000, 4099]:
        a = rng.standard_normal(n).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        ref = a.astype(np.float64) @ b
        got = quant._core.dot_f32(a, b, level=level)
        assert abs(got - ref) <= (n / 8 + 64) * U * (np.abs(a) @ np.abs(b)) + 1e-30, n
        y = rng.standard_normal(n).astype(np.float32)
        alpha = np.float32(rng.standard_normal())
        want = y + alpha * a  # one multiply, one add per element in float32: exact same rounding
        yy = y.copy()
        quant._core.axpy_f32(yy, alpha, a, level=level)
        # fused multiply-add (SIMD) rounds once instead of twice: within 1 ulp of the product
        # (numpy rounds the product then the sum; fma rounds once: each within u of exact)
        assert np.all(np.abs(yy - want) <= (np.abs(alpha * a) + np.abs(want)) * 2 * U), n
    # the active path as the C core calls it
    a = rng.standard_normal(123).astype(np.float32)
    assert abs(quant._core.dot_f32(a, a) - a.astype(np.float64) @ a) < 1e-3


def test_simd_env_forces_scalar():
    code = "import pyflashmoe.quant as q; print(q.simd_name())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FM_SIMD": "scalar"},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "scalar"
    best = subprocess.run([sys.executable, "-c", code], env={k: v for k, v in os.environ.items() if k != "FM_SIMD"},
                          capture_output=True, text=True, check=True).stdout.strip()
    assert best == LEVELS[-1]


# ---------------------------------------------------------------- bf16 helpers

def test_bf16_conversion_matches_torch():
    rng = np.random.default_rng(RNG_SEED + 10)
    vals = np.concatenate([
        (rng.uniform(-3, 3, 100000) * 10.0 ** rng.integers(-40, 38, 100000)).astype(np.float32),
        rng.integers(0, 2 ** 32, 100000, dtype=np.uint64).astype(np.uint32).view(np.float32),  # all bit patterns
        np.array([0.0, -0.0, np.inf, -np.inf, 1.0, 3.4e38, -3.4e38, 1e-45, 1.17e-38], np.float32),
        # exact ties: low 16 bits 0x8000, both parities of bit 16
        (np.array([0x3F808000, 0x3F818000, 0x7F7F8000, 0x00018000], np.uint32)).view(np.float32),
    ]).astype(np.float32)
    finite = ~np.isnan(vals)
    got = quant.f32_to_bf16(vals)
    np.testing.assert_array_equal(got[finite], torch_bf16_bits(vals[finite]))
    # NaN stays NaN (payload may differ from torch's canonical NaN)
    assert np.all(np.isnan(quant.bf16_to_f32(got[~finite])))
    bits = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16)
    back = quant.bf16_to_f32(bits)
    ref = torch_bf16_value(bits)
    np.testing.assert_array_equal(back.view(np.uint32), ref.view(np.uint32))
    # shape kept, 2-D
    assert quant.f32_to_bf16(np.ones((3, 4), np.float32)).shape == (3, 4)


# ---------------------------------------------------------------- bad parameters

def test_bad_parameters_name_the_parameter():
    w = np.ones((4, 128), np.float32)
    q, s, b = quant.quantize(w, 4, 64)
    with pytest.raises(ArgumentError, match="bits"):
        quant.quantize(w, 7, 64)
    with pytest.raises(ArgumentError, match="group_size"):
        quant.quantize(w, 4, 48)
    with pytest.raises(ArgumentError, match="w"):
        quant.quantize(np.ones((4, 100), np.float32), 4, 64)
    with pytest.raises(ArgumentError, match="w"):
        quant.quantize(np.ones(128, np.float32), 4, 64)
    with pytest.raises(ArgumentError, match="scales"):
        quant.dequantize(q, s[:, :1], b, 4, 64)
    with pytest.raises(ArgumentError, match="biases"):
        quant.dequantize(q, s, b.astype(np.float32), 4, 64)
    with pytest.raises(ArgumentError, match="cols"):
        quant.dequantize(q, s, b, 4, 64, cols=64)
    with pytest.raises(ArgumentError, match="q"):
        quant.dequantize(q.astype(np.int64), s, b, 4, 64)
    with pytest.raises(ArgumentError, match="x"):
        quant.matvec(q, s, b, np.ones(127, np.float32), 4, 64)
    with pytest.raises(ArgumentError, match="bits"):
        quant.matvec(q, s, b, np.ones(128, np.float32), 16)
    with pytest.raises(ArgumentError, match="a"):
        quant.bf16_to_f32(np.ones(3, np.float32))
    with pytest.raises(ArgumentError, match="level"):
        quant.QMatrix("f32", 4, 128, data=w).matvec(np.ones(128, np.float32), level="sse9")
    with pytest.raises(ArgumentError, match="data"):
        quant.QMatrix("f32", 4, 128, data=w[:2])
    with pytest.raises(ArgumentError, match="dtype"):
        quant.QMatrix("f16", 4, 128, data=w)
    # the C layer itself checks too (bypassing quant.py)
    with pytest.raises(ArgumentError, match="bits"):
        quant._core.quantize_affine(w, 9, 64, q, s, b)
    with pytest.raises(ArgumentError, match="group_size"):
        quant._core.dequantize_affine(q, s, b, 4, 16, np.empty((4, 128), np.float32))
