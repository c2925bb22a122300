"""The CUDA backend (csrc/cuda) against the C reference (csrc/fm_quant.c, csrc/fm_ops.c) and the CPU engine.

Kernel tests: each CUDA kernel runs on fresh random inputs and is compared with the C reference kernel
run on the same inputs (pyflashmoe._core._kernel_*(gpu=True/False, ...)); outputs are poisoned
(0xff bytes = NaN) on the device before each kernel, so an element the kernel never writes fails.
Engine tests: logits of Engine(backend=1) against Engine(backend=0) on tiny transformers-derived
models converted with pyflashmoe.convert (bf16 and 4-bit experts), prefill and decode, with every
expert tier (all experts resident in VRAM; a VRAM cache smaller than a layer's experts, with and
without a pinned host cache).

Tolerances (relative error ||gpu - ref|| / ||ref||, the METHOD.md measure): both sides compute in
fp32 from the same bf16/affine weights and differ only in the order of float sums (warp tree vs
the CPU's 4/8/16-lane partial sums), so one dot product of n terms is off by about sqrt(n) * 6e-8;
at n = 4096 that is < 1e-5. Norms, RoPE and softmax use the device's expf/rsqrtf/powf/sincosf
(<= 2 ulp): 1e-5. The delta rule over a sequence compounds rounding through the state: 1e-4.
Attention over a few hundred keys: 1e-5. Engine logits: 22 layers of the above, compared as
max |diff| <= 2e-4 * max |logit| (the CPU-vs-transformers test in test_engine.py uses 1e-4).
"""
import os

import numpy as np
import pytest

core = pytest.importorskip("pyflashmoe._core")
from pyflashmoe.errors import ArgumentError, BackendError  # noqa: E402

HAVE_CUDA_API = hasattr(core, "cuda_available")
GPU = HAVE_CUDA_API and core.cuda_available()
REASON = ("pyflashmoe._core has no CUDA API" if not HAVE_CUDA_API else
          "this build has no CUDA backend (built without nvcc or FLASHMOE_CUDA=0)" if not core.cuda_compiled() else
          core.cuda_describe())
needs_gpu = pytest.mark.skipif(not GPU, reason=REASON)

TOL = {"f32": 2e-6, "bf16": 2e-5, "affine": 2e-5, "norm": 1e-5, "route": 1e-6, "conv": 1e-5,
       "gdn": 1e-4, "attn": 1e-5}


def rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "non-finite GPU output (unwritten element?)"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _bf16(x):
    """float32 -> bf16 bit patterns (round to nearest even) as uint16."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


# ---------------------------------------------------------------- availability (runs everywhere)

def test_cuda_api_present():
    assert HAVE_CUDA_API, "pyflashmoe._core lacks cuda_available()"
    assert isinstance(core.cuda_compiled(), bool)
    assert isinstance(core.cuda_describe(), str) and core.cuda_describe()
    if not core.cuda_compiled():
        assert not core.cuda_available()


@pytest.mark.skipif(GPU, reason="a GPU is present: the no-GPU error path cannot be exercised")
def test_backend_cuda_without_gpu_raises_clear_error(tmp_path):
    tm = pytest.importorskip("tiny_models")
    pytest.importorskip("transformers")
    from pyflashmoe.convert import convert
    hf, _ = tm.make_tiny_hf("qwen3_moe", str(tmp_path / "hf"), seed=0, num_hidden_layers=1)
    out = convert(hf, str(tmp_path / "fm"), bits=16, progress=False)
    with pytest.raises(BackendError, match="cuda"):
        core.Engine(out, backend=1)
    eng = core.Engine(out, backend=0)  # the CPU backend still opens the same dir
    assert eng.n_layers == 1


# ---------------------------------------------------------------- kernels

@needs_gpu
@pytest.mark.parametrize("n", [1, 3, 8, 19])
@pytest.mark.parametrize("bits,gs", [(2, 64), (3, 64), (4, 32), (4, 64), (4, 128), (5, 64), (6, 64), (8, 64)])
def test_affine_matmul(bits, gs, n):
    rng = np.random.default_rng(bits * 100 + gs + n)
    rows, cols = (192, 1024) if n > 1 else (1000, 4096)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    q, s, b = core.quantize(w, bits=bits, group_size=gs) if hasattr(core, "quantize") else _quantize(w, bits, gs)
    X = rng.standard_normal((n, cols)).astype(np.float32)
    got = core._kernel_matmul(True, bits, gs, q, s, b, X)
    ref = core._kernel_matmul(False, bits, gs, q, s, b, X)
    assert got.shape == (n, rows)
    assert rel(got, ref) < TOL["affine"]


def _quantize(w, bits, gs):
    from pyflashmoe import quant
    return quant.quantize(w, bits=bits, group_size=gs)


@needs_gpu
@pytest.mark.parametrize("n", [1, 5, 16])
@pytest.mark.parametrize("rows,cols", [(512, 4096), (33, 64), (7, 100)])
def test_bf16_and_f32_matmul(rows, cols, n):
    rng = np.random.default_rng(rows + cols + n)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    X = rng.standard_normal((n, cols)).astype(np.float32)
    wb = _bf16(w)
    assert rel(core._kernel_matmul(True, 16, 0, wb, None, None, X),
               core._kernel_matmul(False, 16, 0, wb, None, None, X)) < TOL["bf16"]
    assert rel(core._kernel_matmul(True, 32, 0, w, None, None, X),
               core._kernel_matmul(False, 32, 0, w, None, None, X)) < TOL["f32"] * 10


# ---------------------------------------------------------------- tensor-core prefill kernels (fm_cuda_mma.cuh)
# bf16 weights / affine codes x fp32 activations split into bf16 hi + lo on mma.sync, fp32 accumulate;
# against the C reference with the same tolerances as the fp32 kernels. Shapes: rows not multiples of
# the 64-row tile, an odd number of 32-column packs (96 cols: a half stage), few tiles (split-K over
# the columns, partials summed in order) and many.

MMA_KINDS = [(2, 32), (3, 64), (4, 32), (4, 128), (5, 64), (6, 32), (8, 64), (16, 0)]


def _mma_weights(rng, bits, gs, rows, cols):
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    if bits == 16:
        return _bf16(w), None, None
    return core.quantize(w, bits=bits, group_size=gs) if hasattr(core, "quantize") else _quantize(w, bits, gs)


@needs_gpu
@pytest.mark.parametrize("n", [2, 5, 16, 33, 64, 100, 256])
@pytest.mark.parametrize("bits,gs", MMA_KINDS)
@pytest.mark.parametrize("rows,cols", [(7, 1024), (100, 96), (4096, 512)])
def test_mma_matmul(bits, gs, rows, cols, n):
    if bits < 16 and cols % gs:
        pytest.skip("group size does not divide cols")
    rng = np.random.default_rng(bits * 1000 + gs + rows + cols + n)
    q, s, b = _mma_weights(rng, bits, gs, rows, cols)
    X = rng.standard_normal((n, cols)).astype(np.float32)
    got = core._kernel_matmul(True, bits, gs, q, s, b, X, mma=True)
    ref = core._kernel_matmul(False, bits, gs, q, s, b, X)
    assert got.shape == (n, rows)
    assert rel(got, ref) < TOL["affine" if bits < 16 else "bf16"]


@needs_gpu
@pytest.mark.parametrize("mma", ["1", "0"])
@pytest.mark.parametrize("n", [2, 17, 64, 256])
@pytest.mark.parametrize("bits,gs", [(4, 64), (3, 32), (8, 128), (16, 0)])
@pytest.mark.parametrize("rows,cols", [(7, 512), (100, 96), (520, 1024)])
def test_mma_swiglu(bits, gs, rows, cols, n, mma):
    """SwiGLU pair (dense MLP, shared expert): tensor cores (debug cuda_mma 1) and the fp32 kernels (0)."""
    if bits < 16 and cols % gs:
        pytest.skip("group size does not divide cols")
    rng = np.random.default_rng(bits * 1000 + gs + rows + cols + n)
    qg, sg, bg = _mma_weights(rng, bits, gs, rows, cols)
    qu, su, bu = _mma_weights(rng, bits, gs, rows, cols)
    X = rng.standard_normal((n, cols)).astype(np.float32)
    got = core._kernel_swiglu(bits, gs, qg, sg, bg, qu, su, bu, X, mma=mma == "1")
    g = core._kernel_matmul(False, bits, gs, qg, sg, bg, X).astype(np.float64)
    u = core._kernel_matmul(False, bits, gs, qu, su, bu, X).astype(np.float64)
    assert rel(got, g / (1 + np.exp(-g)) * u) < 2 * TOL["affine"]


@needs_gpu
@pytest.mark.parametrize("mma", ["1", "0"])
@pytest.mark.parametrize("n", [1, 2, 33])
@pytest.mark.parametrize("g_fmt,u_fmt", [((4, 32), (4, 64)), ((2, 32), (4, 64)), ((16, 0), (8, 64)),
                                         ((4, 128), (32, 0))])
def test_swiglu_gate_up_formats_differ(g_fmt, u_fmt, n, mma):
    """SwiGLU pair (dense MLP, shared expert) whose gate and up differ in group size or in kind: the
    split path (the gate's launch, then silu(gate) * up stored by the up's launch), decode and prefill."""
    rows, cols = 100, 512
    rng = np.random.default_rng(g_fmt[0] * 100 + u_fmt[0] + n)
    qg, sg, bg = _mma_weights(rng, *g_fmt, rows, cols) if g_fmt[0] < 32 else (
        rng.standard_normal((rows, cols)).astype(np.float32) * 0.05, None, None)
    qu, su, bu = _mma_weights(rng, *u_fmt, rows, cols) if u_fmt[0] < 32 else (
        rng.standard_normal((rows, cols)).astype(np.float32) * 0.05, None, None)
    X = rng.standard_normal((n, cols)).astype(np.float32)
    got = core._kernel_swiglu(*g_fmt, qg, sg, bg, qu, su, bu, X, mma=mma == "1", up_bits=u_fmt[0],
                              up_group_size=u_fmt[1])
    g = core._kernel_matmul(False, *g_fmt, qg, sg, bg, X).astype(np.float64)
    u = core._kernel_matmul(False, *u_fmt, qu, su, bu, X).astype(np.float64)
    assert rel(got, g / (1 + np.exp(-g)) * u) < 2 * TOL["affine"]


@needs_gpu
@pytest.mark.parametrize("n", [5, 100])
@pytest.mark.parametrize("mma", ["1", "0"])
def test_matmul_fp32_fallback(n, mma):
    """debug cuda_mma=0 (the fp32 k_mm path, for A/B runs) and bf16 widths the tensor-core path does not
    take (cols % 32 != 0) still match."""
    rng = np.random.default_rng(n)
    for bits, gs, rows, cols in [(4, 64, 300, 1024), (16, 0, 70, 100), (16, 0, 300, 512)]:
        q, s, b = _mma_weights(rng, bits, gs, rows, cols)
        X = rng.standard_normal((n, cols)).astype(np.float32)
        assert rel(core._kernel_matmul(True, bits, gs, q, s, b, X, mma=mma == "1"),
                   core._kernel_matmul(False, bits, gs, q, s, b, X)) < TOL["affine"]


def _expert_blocks(rng, bits, gs, H, I, E):
    """E expert blocks (uint8 [E, bytes]) of gate/up [I, H] and down [H, I], the parts 64-byte aligned,
    their offsets (gate w, s, b, up w, s, b, down w, s, b) and the matrices per expert."""
    mats, offs, parts = [], [], []
    for e in range(E):
        m = [_mma_weights(rng, bits, gs, r, c) for r, c in ((I, H), (I, H), (H, I))]
        mats.append(m)
        chunks, off = [], 0
        eo = []
        for q, s, b in m:
            for a in (q, s, b):
                if a is None:
                    eo.append(0)
                    continue
                raw = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
                eo.append(off)
                chunks.append(raw)
                pad = (-raw.size) % 64
                if pad:
                    chunks.append(np.zeros(pad, np.uint8))
                off += raw.size + pad
        offs = eo
        parts.append(np.concatenate(chunks))
    return np.stack(parts), np.array(offs, np.uint64), mats


@needs_gpu
@pytest.mark.parametrize("n,K,E", [(3, 2, 8), (100, 4, 6), (256, 8, 64)])
@pytest.mark.parametrize("bits,gs,H,I", [(4, 32, 160, 96), (3, 64, 320, 128), (8, 64, 192, 64), (2, 32, 96, 160),
                                         (16, 0, 160, 96), (6, 128, 256, 128), (5, 32, 96, 96)])
def test_mma_experts_grouped(bits, gs, H, I, n, K, E):
    """Routed experts grouped by expert (prefill): one block reads an expert's row tile once for up
    to 64 of its pairs (100 tokens x 4 of 6 experts: ~67 pairs per expert, items split)."""
    rng = np.random.default_rng(bits * 7 + H + I + n)
    blocks, offs, mats = _expert_blocks(rng, bits, gs, H, I, E)
    ids = np.stack([rng.permutation(E)[:K] for _ in range(n)]).astype(np.int32)
    X = rng.standard_normal((n, H)).astype(np.float32)
    got = core._kernel_experts(bits, gs, H, I, blocks, offs, ids, X)
    ref = np.zeros((n * K, H), np.float64)
    for e in range(E):
        pairs = np.nonzero(ids.reshape(-1) == e)[0]
        if pairs.size == 0:
            continue
        xe = X[pairs // K]
        (gq, gsc, gb), (uq, usc, ub), (dq, dsc, db) = mats[e]
        g = core._kernel_matmul(False, bits, gs, gq, gsc, gb, xe).astype(np.float64)
        u = core._kernel_matmul(False, bits, gs, uq, usc, ub, xe).astype(np.float64)
        h = (g / (1 + np.exp(-g)) * u).astype(np.float32)
        ref[pairs] = core._kernel_matmul(False, bits, gs, dq, dsc, db, h)
    assert rel(got, ref) < 3 * TOL["affine"]


@needs_gpu
@pytest.mark.parametrize("d", [16, 128, 256, 4096])
def test_norms(d):
    rng = np.random.default_rng(d)
    x = rng.standard_normal((5, d)).astype(np.float32) * 3
    z = rng.standard_normal((5, d)).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32) * 0.1
    for op, off in ((0, 1.0), (0, 0.0), (1, 0.0), (2, 0.0)):
        eps = 1e-6
        got = core._kernel_norm(True, op, x, z if op == 1 else None, w if op != 2 else None, eps, off)
        ref = core._kernel_norm(False, op, x, z if op == 1 else None, w if op != 2 else None, eps, off)
        assert rel(got, ref) < TOL["norm"], f"op {op}"


@needs_gpu
@pytest.mark.parametrize("E,K,norm", [(8, 2, 1), (256, 8, 1), (512, 10, 1), (128, 8, 0)])
def test_route_topk(E, K, norm):
    rng = np.random.default_rng(E + K)
    logits = rng.standard_normal((7, E)).astype(np.float32) * 2
    gi, gw = core._kernel_route(True, logits, K, norm)
    ri, rw = core._kernel_route(False, logits, K, norm)
    np.testing.assert_array_equal(gi, ri)
    assert rel(gw, rw) < TOL["route"]


@needs_gpu
@pytest.mark.parametrize("E,K,n_group,topk_group,norm,scale,bias", [
    (8, 2, 1, 1, True, 1.0, False), (16, 4, 4, 2, True, 2.5, True), (64, 6, 8, 3, False, 1.0, True),
    (256, 8, 8, 4, True, 2.5, True), (512, 10, 1, 1, True, 1.0, True), (96, 8, 48, 5, True, 1.5, True)])
def test_route_sigmoid(E, K, n_group, topk_group, norm, scale, bias):
    """k_route_sigmoid (spec.router sigmoid_topk) against fm_route, the CPU op that
    tests/test_model_features.py checks against transformers' DeepSeek-V3 router"""
    rng = np.random.default_rng(E + K + n_group)
    logits = rng.standard_normal((9, E)).astype(np.float32) * 2
    b = (rng.standard_normal(E) * 0.3).astype(np.float32) if bias else None
    kw = dict(bias=b, norm=norm, n_group=n_group, topk_group=topk_group, scale=scale)
    gi, gw = core._cuda_route_sigmoid(logits, K, **kw)
    ri, rw = core._ref_route(logits, K, "sigmoid_topk", **kw)
    np.testing.assert_array_equal(gi, ri)
    assert rel(gw, rw) < TOL["route"]


@needs_gpu
@pytest.mark.parametrize("rows", [1, 5, 512, 2111, 4096])
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_decode_matvec_row_and_split_paths(rows, bits):
    """n = 1: matrices with fewer than ~2 * SMs * 8 rows take the split-column kernel (a block per 4
    rows, its warps split the columns), larger ones the warp-per-4-rows kernel; both against the C
    reference."""
    rng = np.random.default_rng(rows * 10 + bits)
    cols = 4096
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    X = rng.standard_normal((1, cols)).astype(np.float32)
    if bits == 16:
        q, s, b, tol = _bf16(w), None, None, TOL["bf16"]
    else:
        q, s, b = core.quantize(w, bits=bits, group_size=64) if hasattr(core, "quantize") else _quantize(w, bits, 64)
        tol = TOL["affine"]
    gs = 0 if bits == 16 else 64
    got = core._kernel_matmul(True, bits, gs, q, s, b, X)
    ref = core._kernel_matmul(False, bits, gs, q, s, b, X)
    assert got.shape == (1, rows)
    assert rel(got, ref) < tol


@needs_gpu
@pytest.mark.parametrize("n", [1, 7, 64])
@pytest.mark.parametrize("C,k", [(96, 4), (8192, 4), (40, 2)])
def test_conv1d(C, k, n):
    rng = np.random.default_rng(C + k + n)
    X = rng.standard_normal((n, C)).astype(np.float32)
    st = rng.standard_normal((k - 1, C)).astype(np.float32)
    w = rng.standard_normal((C, k)).astype(np.float32) * 0.3
    gy, gs = core._kernel_conv1d(True, X, st, w)
    ry, rs = core._kernel_conv1d(False, X, st, w)
    assert rel(gy, ry) < TOL["conv"]
    assert rel(gs, rs) < TOL["conv"]


def _gdn_inputs(nk, nv, dk, dv, n, decay="mixed"):
    """GatedDeltaNet inputs with a nonzero initial state. decay: "mixed" (g about -0.05..-50 per
    token), "strong" (g down to -2400 per token, clamped at -200 by the chunked kernel: exp(G)
    underflows inside a chunk, next to tokens that barely decay), "weak" (g about -1e-3..-1e-2: the
    state remembers a whole sequence; one head decays hard)."""
    rng = np.random.default_rng(nk * nv + dk + n + {"mixed": 0, "strong": 1000, "weak": 2000}[decay])
    cd = 2 * nk * dk + nv * dv
    qkv = rng.standard_normal((n, cd)).astype(np.float32)
    z = rng.standard_normal((n, nv * dv)).astype(np.float32)
    a = rng.standard_normal((n, nv)).astype(np.float32)
    b = rng.standard_normal((n, nv)).astype(np.float32)
    A_log = np.log(rng.uniform(1, 16, nv)).astype(np.float32)
    dt_bias = (rng.standard_normal(nv) * 0.5).astype(np.float32)
    nw = (1 + rng.standard_normal(dv) * 0.1).astype(np.float32)
    S = (rng.standard_normal((nv, dk, dv)) * 0.1).astype(np.float32)
    if decay == "strong":
        A_log = np.log(rng.uniform(20, 200, nv)).astype(np.float32)
        a = (a * 4).astype(np.float32)
        S = (S * 10).astype(np.float32)
    elif decay == "weak":
        A_log = np.log(rng.uniform(1e-3, 1e-2, nv)).astype(np.float32)
        A_log[0] = np.float32(np.log(1e4))
        S = (S * 10).astype(np.float32)
    return qkv, z, a, b, A_log, dt_bias, nw, S


# n >= 2 runs the chunked kernel (64-token chunks): one partial chunk, exactly one, one + 1 token,
# several with a partial last; n = 1 the sequential (decode) kernel.
@needs_gpu
@pytest.mark.parametrize("n", [1, 2, 9, 64, 65, 100, 300])
@pytest.mark.parametrize("nk,nv,dk,dv", [(2, 4, 16, 16), (16, 32, 128, 128), (4, 8, 64, 32)])
def test_gated_delta_net(nk, nv, dk, dv, n):
    args = _gdn_inputs(nk, nv, dk, dv, n)
    go, gS = core._kernel_gdn(True, *args, nk, nv, dk, dv, 1e-6)
    ro, rS = core._kernel_gdn(False, *args, nk, nv, dk, dv, 1e-6)
    assert rel(go, ro) < TOL["gdn"]
    assert rel(gS, rS) < TOL["gdn"]


@needs_gpu
@pytest.mark.parametrize("decay", ["strong", "weak"])
@pytest.mark.parametrize("n", [1, 9, 130])
@pytest.mark.parametrize("nk,nv,dk,dv", [(2, 4, 16, 16), (1, 2, 32, 48), (3, 6, 100, 40), (2, 2, 128, 256)])
def test_gated_delta_net_decay_and_shapes(nk, nv, dk, dv, n, decay):
    args = _gdn_inputs(nk, nv, dk, dv, n, decay)
    go, gS = core._kernel_gdn(True, *args, nk, nv, dk, dv, 1e-6)
    ro, rS = core._kernel_gdn(False, *args, nk, nv, dk, dv, 1e-6)
    assert rel(go, ro) < TOL["gdn"]
    assert rel(gS, rS) < TOL["gdn"]


@needs_gpu
@pytest.mark.parametrize("n", [2, 65, 300])
@pytest.mark.parametrize("nk,nv,dk,dv", [(2, 4, 16, 16), (16, 32, 128, 128)])
def test_gated_delta_net_chunked_matches_sequential(nk, nv, dk, dv, n):
    """debug gdn_chunk=0 (sequential kernel) and =1 (chunked from n >= 2) agree."""
    args = _gdn_inputs(nk, nv, dk, dv, n, "weak")
    so, sS = core._kernel_gdn(True, *args, nk, nv, dk, dv, 1e-6, gdn_chunk=0)
    co, cS = core._kernel_gdn(True, *args, nk, nv, dk, dv, 1e-6, gdn_chunk=1)
    assert rel(co, so) < TOL["gdn"]
    assert rel(cS, sS) < TOL["gdn"]


@needs_gpu
@pytest.mark.parametrize("n,pos", [(1, 0), (1, 300), (13, 0), (6, 41)])
@pytest.mark.parametrize("nh,nkv,dh,rot,gate,qk", [(4, 2, 16, 4, 1, 1), (32, 2, 256, 64, 1, 1),
                                                    (8, 8, 128, 128, 0, 1), (6, 3, 64, 32, 0, 0)])
def test_attention(nh, nkv, dh, rot, gate, qk, n, pos):
    rng = np.random.default_rng(nh + dh + n + pos)
    qd, kvd = nh * dh, nkv * dh
    qg = rng.standard_normal((n, qd * (2 if gate else 1))).astype(np.float32)
    k = rng.standard_normal((n, kvd)).astype(np.float32)
    v = rng.standard_normal((n, kvd)).astype(np.float32)
    qn = (rng.standard_normal(dh) * 0.1).astype(np.float32) if qk else None
    kn = (rng.standard_normal(dh) * 0.1).astype(np.float32) if qk else None
    kc = rng.standard_normal((pos + n, kvd)).astype(np.float32)
    vc = rng.standard_normal((pos + n, kvd)).astype(np.float32)
    args = (qg, k, v, qn, kn, kc, vc, pos, nh, nkv, dh, rot, 1e7 if dh == 256 else 1e4, gate, 1e-6, 1.0)
    go, gkc, gvc = core._kernel_attention(True, *args)
    ro, rkc, rvc = core._kernel_attention(False, *args)
    assert rel(gkc, rkc) < TOL["attn"]
    np.testing.assert_array_equal(gvc, rvc)
    assert rel(go, ro) < TOL["attn"]


# ---------------------------------------------------------------- engine: GPU backend vs CPU backend

@pytest.fixture(scope="module", params=["qwen3_5_moe", "qwen3_next", "qwen3_moe"])
def tiny_dirs(request, tmp_path_factory):
    if not GPU:
        pytest.skip(REASON)
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tm = pytest.importorskip("tiny_models")
    from pyflashmoe.convert import convert
    arch = request.param
    need = {"qwen3_5_moe": "Qwen3_5MoeForCausalLM", "qwen3_next": "Qwen3NextForCausalLM",
            "qwen3_moe": "Qwen3MoeForCausalLM"}[arch]
    if not hasattr(transformers, need):
        pytest.skip(f"transformers {transformers.__version__} has no {need}")
    root = tmp_path_factory.mktemp("cuda_" + arch)
    hf, _ = tm.make_tiny_hf(arch, str(root / "hf"), seed=0)
    dirs = {"arch": arch, "bf16": convert(hf, str(root / "fm16"), bits=16, progress=False),
            "q4": convert(hf, str(root / "fm4"), bits=4, group_size=32, progress=False)}
    # per-part formats (issue 12 item 5), through the converter's user paths:
    # "fallback": --bits 2 --group-size 64 --dense-bits 8 on moe_intermediate / shared 48, which 64
    #   and 32 do not divide: routed gate/up 2-bit g64 with down bf16 in one expert, shexp_down bf16
    hf48, _ = tm.make_tiny_hf(arch, str(root / "hf48"), seed=0, moe_intermediate_size=48,
                              shared_expert_intermediate_size=48)
    dirs["fallback"] = convert(hf48, str(root / "fmfb"), bits=2, group_size=64, dense_bits=8, progress=False)
    # MLX checkpoints published with per-layer / per-part formats (mlx_lm.convert quant_predicate,
    # tests/mlx_recipes.py), converted as published: "mixed" (gate/up 2-bit g32 or 4-bit g64 by layer,
    # down bf16 or 8-bit g32, attention at 3/5/6 bits), "mixed_gu" (gate 2-bit g32, up 4-bit g64, down
    # bf16 in one expert), "mixed_gs" (routed and shared gate 4-bit g32, up 4-bit g64)
    # A machine where mlx cannot be installed (the GPU machine's glibc is older than mlx's wheels)
    # takes the same MLX checkpoints made elsewhere by tools/make_mlx_checkpoints.py:
    # $FLASHMOE_TEST_MLX_DIR/<arch>/mlx_<name>
    pre = os.environ.get("FLASHMOE_TEST_MLX_DIR")
    try:
        import mlx_lm  # noqa: F401
        import mlx_recipes
    except ImportError as e:
        if not pre:
            dirs.update(mixed=None, mixed_gu=None, mixed_gs=None,
                        why=f"mlx_lm not importable ({e}) and FLASHMOE_TEST_MLX_DIR not set")
            return dirs
        mlx_recipes = None
    for name in ("mixed", "mixed_gu", "mixed_gs"):
        if mlx_recipes is None:
            mlx = os.path.join(pre, arch, f"mlx_{name}")
        else:
            pred = {"mixed": mlx_recipes.mixed, "mixed_gu": mlx_recipes.gate_up_kinds,
                    "mixed_gs": mlx_recipes.gate_up_groups}[name]
            mlx = tm.make_mlx_quantized(hf, str(root / f"mlx_{name}"), bits=4, group_size=32, quant_predicate=pred)
        dirs[name] = convert(mlx, str(root / f"fm_{name}"), progress=False)
    return dirs


def _close(ours, ref, rel_tol=2e-4):
    scale = float(np.abs(ref).max())
    err = float(np.abs(ours - ref).max())
    assert np.all(np.isfinite(ours))
    assert err <= rel_tol * scale, f"max |diff| {err:.3g} > {rel_tol} * max|ref| {scale:.3g}"


TIERS = {  # name -> Engine kwargs (block sizes of the tiny models are a few KiB)
    "resident": {},
    "vram_lru": {"vram_budget": 3 * 16384},
    "vram_lru+ram": {"vram_budget": 3 * 16384, "ram_budget": 5 * 16384},
    "vram_lru+ram_resident": {"vram_budget": 3 * 16384, "ram_budget": 1 << 30},
}


@needs_gpu
@pytest.mark.parametrize("which", ["bf16", "q4", "fallback", "mixed", "mixed_gu"])
@pytest.mark.parametrize("tier", list(TIERS))
def test_engine_logits_match_cpu(tiny_dirs, which, tier):
    path = tiny_dirs[which]
    if path is None:
        pytest.skip(tiny_dirs["why"])
    cpu = core.Engine(path, backend=0, n_threads=2)
    kw = dict(TIERS[tier])
    bb = max(cpu.expert_block_bytes(i) for i in range(cpu.n_layers))
    if "vram_budget" in kw:
        kw["vram_budget"] = 3 * bb  # 3 slots: K=2 fits, a prompt's union (8 experts) needs 3 chunks
    if kw.get("ram_budget") == 5 * 16384:
        kw["ram_budget"] = 5 * bb
    gpu = core.Engine(path, backend=1, **kw)
    rng = np.random.default_rng(7)
    toks = rng.integers(3, cpu.n_vocab, size=12).astype(np.int32)
    sc, sg = core.Session(cpu, 64), core.Session(gpu, 64)
    lc = sc.eval(toks, all_logits=True)
    lg = sg.eval(toks, all_logits=True)
    _close(lg, lc)
    # greedy decode, step by step (decode kernels, KV cache and recurrent state carried on the GPU)
    tok = int(np.argmax(lc[-1]))
    for _ in range(8):
        a = sc.eval([tok])
        b = sg.eval([tok])
        _close(b, a)
        tok = int(np.argmax(a))
    cnt = core.cuda_counters(sg)
    st = sg.stats()
    if tier == "resident":
        assert cnt["resident"] and cnt["storage_reads"] == 0
    else:
        assert not cnt["resident"] and cnt["vram_slots"] == 3
        assert st["expert_loads"] == cnt["storage_reads"] and st["expert_hits_vram"] == cnt["vram_hits"]
        if tier == "vram_lru+ram_resident":  # every expert pinned in RAM at open: no storage reads
            assert cnt["ram_hits"] > 0 and cnt["storage_reads"] == 0
        else:
            assert cnt["storage_reads"] > 0
    # reset: a fresh timeline reproduces the prompt logits
    sg.reset()
    _close(sg.eval(toks, all_logits=True), lc)


@needs_gpu
@pytest.mark.parametrize("mma", [1, 0])
@pytest.mark.parametrize("which", ["mixed_gs", "mixed_gu"])
def test_engine_gate_up_group_sizes_differ(tiny_dirs, which, mma):
    """Gate and up of one kind and two group sizes (mixed_gs: routed and shared, 4-bit g32 / g64) or of
    two kinds (mixed_gu: routed 2-bit g32 / 4-bit g64): the split gate/up launches (FMC_Y_GLU), prefill
    on tensor cores (cuda_mma 1) and on the fp32 kernels (0: the per-pair expert kernels), then decode."""
    path = tiny_dirs[which]
    if path is None:
        pytest.skip(tiny_dirs["why"])
    cpu = core.Engine(path, backend=0, n_threads=2)
    gpu = core.Engine(path, backend=1, debug={"cuda_mma": mma})
    toks = np.random.default_rng(7).integers(3, cpu.n_vocab, size=12).astype(np.int32)
    sc, sg = core.Session(cpu, 64), core.Session(gpu, 64)
    lc = sc.eval(toks, all_logits=True)
    _close(sg.eval(toks, all_logits=True), lc)
    tok = int(np.argmax(lc[-1]))
    for _ in range(4):
        a = sc.eval([tok])
        _close(sg.eval([tok]), a)
        tok = int(np.argmax(a))


@needs_gpu
def test_engine_long_prompt_spans_ubatches(tiny_dirs):
    cpu = core.Engine(tiny_dirs["bf16"], backend=0, n_threads=2)
    gpu = core.Engine(tiny_dirs["bf16"], backend=1)
    toks = np.random.default_rng(3).integers(3, cpu.n_vocab, size=300).astype(np.int32)
    a = core.Session(cpu, 512).eval(toks)
    b = core.Session(gpu, 512).eval(toks)  # 256-token passes on the GPU
    _close(b, a, 5e-4)


# ---------------------------------------------------------------- CPU split: missed experts computed on the host

@needs_gpu
@pytest.mark.parametrize("which", ["bf16", "q4"])
@pytest.mark.parametrize("tier", ["vram_lru+ram_resident", "vram_lru+ram"])
@pytest.mark.parametrize("split", ["0", "0.5", "1", "auto"])
def test_cpu_split_matches_cpu_backend(tiny_dirs, which, tier, split):
    """Decode with debug cpu_split: part (0.5), all (1), none (0) or an automatic share of the
    misses found in the pinned host cache computed on the CPU from that cache while the GPU copies
    the rest; logits against the CPU backend at every step. Then Engine.set_debug turns it off."""
    path = tiny_dirs[which]
    cpu = core.Engine(path, backend=0, n_threads=2)
    bb = max(cpu.expert_block_bytes(i) for i in range(cpu.n_layers))
    ram = (1 << 30) if tier == "vram_lru+ram_resident" else 5 * bb
    gpu = core.Engine(path, backend=1, n_threads=2, vram_budget=3 * bb, ram_budget=ram,
                      debug={"cpu_split": split if split == "auto" else float(split)})
    toks = np.random.default_rng(11).integers(3, cpu.n_vocab, size=10).astype(np.int32)
    sc, sg = core.Session(cpu, 64), core.Session(gpu, 64)
    _close(sg.eval(toks), sc.eval(toks))  # prefill: never split
    c0 = core.cuda_counters(sg)
    assert c0["cpu_experts"] == 0
    tok = int(np.argmax(sc.eval([int(toks[-1])])))
    sg.eval([int(toks[-1])])
    n_dec = 12
    for _ in range(n_dec):
        a = sc.eval([tok])
        b = sg.eval([tok])
        _close(b, a)
        tok = int(np.argmax(a))
    c1 = core.cuda_counters(sg)
    st = sg.stats()
    assert st["expert_loads"] == c1["storage_reads"] and st["expert_hits_vram"] == c1["vram_hits"]
    routed = (n_dec + 1) * gpu.experts_per_token * sum(
        1 for i in range(gpu.n_layers) if gpu.expert_block_bytes(i) > 0)
    dec = {k: c1[k] - c0[k] for k in ("vram_hits", "ram_hits", "storage_reads", "cpu_experts", "h2d_bytes")}
    assert dec["vram_hits"] + dec["ram_hits"] + dec["storage_reads"] == routed
    # every expert not computed on the host was copied
    assert dec["h2d_bytes"] <= (dec["ram_hits"] - dec["cpu_experts"] + dec["storage_reads"]) * bb
    if split == "0":
        assert c1["cpu_experts"] == 0 and c1["split"] == 0.0
    elif split == "auto":
        assert c1["split"] < 0
    else:
        assert c1["split"] == float(split)
        # only misses found in the pinned host cache go to the CPU: with every expert pinned, every
        # decode miss is one (with 5 RAM slots behind 3 VRAM slots almost none is: storage reads)
        if tier == "vram_lru+ram_resident":
            assert dec["cpu_experts"] > 0 and c1["cpu_gbps"] > 0
            if split == "1":  # every miss computed on the host: nothing crosses PCIe
                assert dec["h2d_bytes"] == 0 and dec["cpu_experts"] == dec["ram_hits"]
    # switched off between evals: no expert on the host from the next eval on, same logits
    gpu.set_debug(cpu_split=0)
    assert gpu.debug["cpu_split"] == 0.0
    for _ in range(3):
        a = sc.eval([tok])
        _close(sg.eval([tok]), a)
        tok = int(np.argmax(a))
    c2 = core.cuda_counters(sg)
    assert c2["cpu_experts"] == c1["cpu_experts"] and c2["split"] == 0.0


@needs_gpu
def test_cpu_split_bad_setting_raises(tiny_dirs):
    cpu = core.Engine(tiny_dirs["bf16"], backend=0, n_threads=2)
    bb = max(cpu.expert_block_bytes(i) for i in range(cpu.n_layers))
    with pytest.raises(ArgumentError, match="debug.cpu_split"):
        core.Engine(tiny_dirs["bf16"], backend=1, vram_budget=3 * bb, ram_budget=1 << 30,
                    debug={"cpu_split": 1.5})
    gpu = core.Engine(tiny_dirs["bf16"], backend=1, vram_budget=3 * bb, ram_budget=1 << 30)
    with pytest.raises(ArgumentError, match="debug.cpu_split"):
        gpu.set_debug(cpu_split=1.5)
    assert gpu.debug["cpu_split"] < 0  # unchanged: auto
    core.Session(gpu, 16).eval([5])


@needs_gpu
@pytest.mark.parametrize("which", ["bf16", "q4"])
def test_debug_switches_keep_logits(tiny_dirs, which):
    """Resident decode without the CUDA graph (cuda_graph=0) and with a sync per op (cuda_timing=1),
    and prefill on the fp32 kernels (cuda_mma=0) and the sequential GatedDeltaNet (gdn_chunk=0), all
    switched between evals with Engine.set_debug, match the CPU backend."""
    path = tiny_dirs[which]
    cpu = core.Engine(path, backend=0, n_threads=2)
    gpu = core.Engine(path, backend=1)
    toks = np.random.default_rng(5).integers(3, cpu.n_vocab, size=20).astype(np.int32)
    ref = core.Session(cpu, 64).eval(toks, all_logits=True)
    for sw in ({"cuda_mma": 0}, {"gdn_chunk": 0}, {"cuda_mma": 0, "gdn_chunk": 0}, {}):
        gpu.set_debug(**{"cuda_mma": 1, "gdn_chunk": 2, **sw})
        _close(core.Session(gpu, 64).eval(toks, all_logits=True), ref)
    sc, sg = core.Session(cpu, 64), core.Session(gpu, 64)
    sc.eval(toks[:4])
    sg.eval(toks[:4])
    for i, sw in enumerate([{"cuda_graph": 1}, {"cuda_graph": 0}, {"cuda_timing": 1}, {"cuda_timing": 0}] * 2):
        gpu.set_debug(**sw)
        s0 = sg.stats()
        _close(sg.eval([int(toks[4 + i])]), sc.eval([int(toks[4 + i])]))
        if sw == {"cuda_timing": 1}:
            assert sg.stats()["ms_attn"] > s0["ms_attn"]
