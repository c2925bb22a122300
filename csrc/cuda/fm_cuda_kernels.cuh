/* fm_cuda_kernels.cuh: the CUDA kernels of the pyflashmoe backend (included by every csrc/cuda/*.cu
 * through fmc_internal.cuh: the kernels that are not templates are static, so each file that
 * launches one gets its own copy and the objects link without clashes).
 *
 * Owns: group-affine (2..8 bit) / bf16 / f32 matrix x vectors (decode and prefill share one kernel:
 * a warp per output row, NT token vectors per pass), gate/up SwiGLU pairs, the routed-expert
 * kernels over (token, k) pairs whose weights sit in VRAM slots, embedding rows, RMSNorm / gated
 * RMSNorm / L2 norm, router softmax + top-K, q/k norm + partial NeoX RoPE + KV-cache write,
 * causal GQA attention with online softmax and output gate, causal depthwise conv1d + SiLU, the
 * GatedDeltaNet recurrence (fused l2norm, gating and gated RMSNorm).
 * Does not own: launches, memory, the expert cache (fm_cuda_*.cu).
 *
 * Numerics follow csrc/fm_quant.c and csrc/fm_ops.c (fp32 activations and accumulation; affine
 * groups as s*dot(q,x) + b*sum(x)); only the order of float sums differs.
 */
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#define FMC_WARPS 8 /* warps per block in the row kernels */

/* a matrix on the device. kind: 0 f32, 1 bf16, 2..8 affine bits */
struct DMat {
    int32_t kind, gs;
    int64_t rows, cols;
    const void *w;          /* f32 / bf16 data or packed q words */
    const uint16_t *s, *b;  /* affine scales / biases (bf16) */
};

/* one part of an expert block: offsets relative to the slot base */
struct DPart {
    int32_t kind, gs;
    int64_t rows, cols;
    uint64_t off_w, off_s, off_b;
};

/* (host) may a gate of (kind gk, group size ggs) and its up (uk, ugs) run in one fused SwiGLU kernel
 * (k_mv_swiglu, k_mm_swiglu, the expert gate/up kernels, the tensor-core SwiGLU tile)? They read both
 * with the gate's kind and group size; anything else takes the split path (FMC_Y_GLU) */
static inline int fmc_gu_fused(int gk, int ggs, int uk, int ugs) { return gk == uk && (gk < 2 || ggs == ugs); }

__device__ __forceinline__ float bf2f(uint16_t h) { return __uint_as_float((uint32_t)h << 16); }
__device__ __forceinline__ float d_silu(float x) { return x / (1.0f + expf(-x)); }
__device__ __forceinline__ float d_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float d_softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

/* how a row kernel stores its result v at d (the `accumulate` / `mode` argument): FMC_Y_SET *d = v,
 * FMC_Y_ADD *d += v (fused residual add), FMC_Y_GLU *d = silu(*d) * v (SwiGLU of a gate already in
 * *d and its up projection v: the split gate/up path when the two differ in format) */
#define FMC_Y_SET 0
#define FMC_Y_ADD 1
#define FMC_Y_GLU 2
__device__ __forceinline__ void y_store(float *d, float v, int mode) {
    *d = mode == FMC_Y_ADD ? *d + v : mode == FMC_Y_GLU ? d_silu(*d) * v : v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result */
__device__ __forceinline__ float block_sum(float v, float *red /* shared [33] */) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[wid] = v;
    __syncthreads();
    if (wid == 0) {
        float t = lane < nw ? red[lane] : 0.0f;
        t = warp_sum(t);
        if (lane == 0) red[32] = t;
    }
    __syncthreads();
    return red[32];
}

/* ------------------------------------------------------------------ affine unpacking */

template <int BITS>
__device__ __forceinline__ void load_words(const uint32_t *p, uint32_t (&w)[BITS]) {
    if constexpr (BITS == 4) {
        uint4 v = __ldg(reinterpret_cast<const uint4 *>(p));
        w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
    } else if constexpr (BITS == 8) {
        uint4 v = __ldg(reinterpret_cast<const uint4 *>(p));
        uint4 u = __ldg(reinterpret_cast<const uint4 *>(p) + 1);
        w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
        w[4] = u.x; w[5] = u.y; w[6] = u.z; w[7] = u.w;
    } else if constexpr (BITS == 2) {
        uint2 v = __ldg(reinterpret_cast<const uint2 *>(p));
        w[0] = v.x; w[1] = v.y;
    } else {
#pragma unroll
        for (int i = 0; i < BITS; i++) w[i] = __ldg(p + i);
    }
}

/* value i (compile-time after unrolling) of a 32-value pack stored as a BITS-word bit stream */
template <int BITS>
__device__ __forceinline__ float getq(const uint32_t (&w)[BITS], int i) {
    const int bit = i * BITS, wi = bit >> 5, sh = bit & 31;
    uint32_t v = w[wi] >> sh;
    if (sh + BITS > 32) v |= w[wi + 1] << (32 - sh);
    /* exact int -> float without the quarter-rate I2F: 2^23 + v as a float, minus 2^23 */
    return __int_as_float(0x4B000000u | (v & ((1u << BITS) - 1u))) - 8388608.0f;
}

/* ------------------------------------------------------------------ row dot products
 * acc[t] += (partial, this lane's share of) W[r, :] . X[t, :] for t < nt (NT compile-time max).
 * The caller reduces acc over the warp. X rows are 16-byte aligned (ldx % 4 == 0). */

template <int BITS, int NT>
__device__ __forceinline__ void row_affine(const DMat &W, int64_t r, const float *X, int64_t ldx, int nt,
                                           float (&acc)[NT], int lane) {
    const int64_t packs = W.cols >> 5, ng = W.cols / W.gs;
    const int ppg = W.gs >> 5;
    const uint32_t *qr = reinterpret_cast<const uint32_t *>(W.w) + r * (W.cols * BITS / 32);
    const uint16_t *sr = W.s + r * ng, *br = W.b + r * ng;
    for (int64_t p = lane; p < packs; p += 32) {
        uint32_t w[BITS];
        load_words<BITS>(qr + p * BITS, w);
        const int64_t g = p / ppg;
        const float s = bf2f(__ldg(sr + g)), b = bf2f(__ldg(br + g));
        float qf[32];
#pragma unroll
        for (int i = 0; i < 32; i++) qf[i] = getq<BITS>(w, i);
#pragma unroll
        for (int t = 0; t < NT; t++) {
            if (t < nt) {
                const float4 *xp = reinterpret_cast<const float4 *>(X + t * ldx + p * 32);
                float d0 = 0.f, d1 = 0.f, xs0 = 0.f, xs1 = 0.f;
#pragma unroll
                for (int j = 0; j < 8; j += 2) {
                    float4 a = __ldg(xp + j), c = __ldg(xp + j + 1);
                    d0 += qf[4 * j] * a.x + qf[4 * j + 1] * a.y + qf[4 * j + 2] * a.z + qf[4 * j + 3] * a.w;
                    d1 += qf[4 * j + 4] * c.x + qf[4 * j + 5] * c.y + qf[4 * j + 6] * c.z + qf[4 * j + 7] * c.w;
                    xs0 += (a.x + a.y) + (a.z + a.w);
                    xs1 += (c.x + c.y) + (c.z + c.w);
                }
                acc[t] += s * (d0 + d1) + b * (xs0 + xs1);
            }
        }
    }
}

template <int NT>
__device__ __forceinline__ void row_bf16(const DMat &W, int64_t r, const float *X, int64_t ldx, int nt,
                                         float (&acc)[NT], int lane) {
    const uint16_t *wr = reinterpret_cast<const uint16_t *>(W.w) + r * W.cols;
    if ((W.cols & 7) == 0) {
        const int64_t packs = W.cols >> 3;
        for (int64_t p = lane; p < packs; p += 32) {
            uint4 v = __ldg(reinterpret_cast<const uint4 *>(wr) + p);
            float wf[8];
            wf[0] = __uint_as_float(v.x << 16); wf[1] = __uint_as_float(v.x & 0xffff0000u);
            wf[2] = __uint_as_float(v.y << 16); wf[3] = __uint_as_float(v.y & 0xffff0000u);
            wf[4] = __uint_as_float(v.z << 16); wf[5] = __uint_as_float(v.z & 0xffff0000u);
            wf[6] = __uint_as_float(v.w << 16); wf[7] = __uint_as_float(v.w & 0xffff0000u);
#pragma unroll
            for (int t = 0; t < NT; t++) {
                if (t < nt) {
                    const float4 *xp = reinterpret_cast<const float4 *>(X + t * ldx + p * 8);
                    float4 a = __ldg(xp), c = __ldg(xp + 1);
                    acc[t] += (wf[0] * a.x + wf[1] * a.y + wf[2] * a.z + wf[3] * a.w) +
                              (wf[4] * c.x + wf[5] * c.y + wf[6] * c.z + wf[7] * c.w);
                }
            }
        }
    } else {
        for (int64_t c = lane; c < W.cols; c += 32) {
            float wv = bf2f(__ldg(wr + c));
#pragma unroll
            for (int t = 0; t < NT; t++)
                if (t < nt) acc[t] += wv * __ldg(X + t * ldx + c);
        }
    }
}

template <int NT>
__device__ __forceinline__ void row_f32(const DMat &W, int64_t r, const float *X, int64_t ldx, int nt,
                                        float (&acc)[NT], int lane) {
    const float *wr = reinterpret_cast<const float *>(W.w) + r * W.cols;
    if ((W.cols & 3) == 0) {
        for (int64_t p = lane; p < (W.cols >> 2); p += 32) {
            float4 v = __ldg(reinterpret_cast<const float4 *>(wr) + p);
#pragma unroll
            for (int t = 0; t < NT; t++)
                if (t < nt) {
                    float4 a = __ldg(reinterpret_cast<const float4 *>(X + t * ldx) + p);
                    acc[t] += (v.x * a.x + v.y * a.y) + (v.z * a.z + v.w * a.w);
                }
        }
    } else {
        for (int64_t c = lane; c < W.cols; c += 32) {
            float wv = __ldg(wr + c);
#pragma unroll
            for (int t = 0; t < NT; t++)
                if (t < nt) acc[t] += wv * __ldg(X + t * ldx + c);
        }
    }
}

template <int KIND, int NT>
__device__ __forceinline__ void row_dot(const DMat &W, int64_t r, const float *X, int64_t ldx, int nt,
                                        float (&acc)[NT], int lane) {
    if constexpr (KIND == 0) row_f32<NT>(W, r, X, ldx, nt, acc, lane);
    else if constexpr (KIND == 1) row_bf16<NT>(W, r, X, ldx, nt, acc, lane);
    else row_affine<KIND, NT>(W, r, X, ldx, nt, acc, lane);
}

/* the 32 values of x in pack p into registers; returns their sum (the affine bias term) */
__device__ __forceinline__ float load_xpack(const float *__restrict__ x, int64_t p, float (&xf)[32]) {
    const float4 *xp = reinterpret_cast<const float4 *>(x + p * 32);
#pragma unroll
    for (int j = 0; j < 8; j++) {
        float4 a = __ldg(xp + j);
        xf[4 * j] = a.x; xf[4 * j + 1] = a.y; xf[4 * j + 2] = a.z; xf[4 * j + 3] = a.w;
    }
    float xs0 = 0.f, xs1 = 0.f;
#pragma unroll
    for (int i = 0; i < 32; i += 2) { xs0 += xf[i]; xs1 += xf[i + 1]; }
    return xs0 + xs1;
}

/* ------------------------------------------------------------------ decode: R rows per warp
 * One vector x; a warp computes R consecutive rows at once so each lane loads its slice of x once
 * for R rows (x traffic from L1 / R) and has R independent weight loads in flight. */

template <int BITS, int R>
__device__ __forceinline__ void rows_mv_affine(const DMat &W, int64_t r0, int nr, const float *__restrict__ x,
                                               float (&acc)[R], int lane, int ps) {
    const int64_t packs = W.cols >> 5, ng = W.cols / W.gs, rw = W.cols * BITS / 32;
    const int ppg = W.gs >> 5;
    const uint32_t *q0 = reinterpret_cast<const uint32_t *>(W.w) + r0 * rw;
    for (int64_t p = lane; p < packs; p += ps) {
        uint32_t w[R][BITS];
#pragma unroll
        for (int r = 0; r < R; r++) {
            if (r < nr) load_words<BITS>(q0 + r * rw + p * BITS, w[r]);
            else {
#pragma unroll
                for (int i = 0; i < BITS; i++) w[r][i] = 0u;
            }
        }
        const int64_t g = p / ppg;
        float sc[R], bi[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            sc[r] = r < nr ? bf2f(__ldg(W.s + (r0 + r) * ng + g)) : 0.f;
            bi[r] = r < nr ? bf2f(__ldg(W.b + (r0 + r) * ng + g)) : 0.f;
        }
        float xf[32];
        const float xs = load_xpack(x, p, xf);
#pragma unroll
        for (int r = 0; r < R; r++) {
            float d0 = 0.f, d1 = 0.f;
#pragma unroll
            for (int i = 0; i < 32; i += 2) {
                d0 += getq<BITS>(w[r], i) * xf[i];
                d1 += getq<BITS>(w[r], i + 1) * xf[i + 1];
            }
            acc[r] += sc[r] * (d0 + d1) + bi[r] * xs;
        }
    }
}

template <int R>
__device__ __forceinline__ void rows_mv_bf16(const DMat &W, int64_t r0, int nr, const float *__restrict__ x,
                                             float (&acc)[R], int lane, int ps) {
    const uint16_t *w0 = reinterpret_cast<const uint16_t *>(W.w) + r0 * W.cols;
    if ((W.cols & 7) == 0) {
        const int64_t packs = W.cols >> 3;
        for (int64_t p = lane; p < packs; p += ps) {
            uint4 v[R];
#pragma unroll
            for (int r = 0; r < R; r++)
                v[r] = r < nr ? __ldg(reinterpret_cast<const uint4 *>(w0 + r * W.cols) + p) : make_uint4(0, 0, 0, 0);
            const float4 a = __ldg(reinterpret_cast<const float4 *>(x + p * 8));
            const float4 c = __ldg(reinterpret_cast<const float4 *>(x + p * 8) + 1);
#pragma unroll
            for (int r = 0; r < R; r++) {
                acc[r] += (__uint_as_float(v[r].x << 16) * a.x + __uint_as_float(v[r].x & 0xffff0000u) * a.y +
                           __uint_as_float(v[r].y << 16) * a.z + __uint_as_float(v[r].y & 0xffff0000u) * a.w) +
                          (__uint_as_float(v[r].z << 16) * c.x + __uint_as_float(v[r].z & 0xffff0000u) * c.y +
                           __uint_as_float(v[r].w << 16) * c.z + __uint_as_float(v[r].w & 0xffff0000u) * c.w);
            }
        }
    } else {
        for (int64_t c = lane; c < W.cols; c += ps) {
            const float xv = __ldg(x + c);
#pragma unroll
            for (int r = 0; r < R; r++)
                if (r < nr) acc[r] += bf2f(__ldg(w0 + r * W.cols + c)) * xv;
        }
    }
}

template <int R>
__device__ __forceinline__ void rows_mv_f32(const DMat &W, int64_t r0, int nr, const float *__restrict__ x,
                                            float (&acc)[R], int lane, int ps) {
    const float *w0 = reinterpret_cast<const float *>(W.w) + r0 * W.cols;
    if ((W.cols & 3) == 0) {
        for (int64_t p = lane; p < (W.cols >> 2); p += ps) {
            const float4 a = __ldg(reinterpret_cast<const float4 *>(x) + p);
#pragma unroll
            for (int r = 0; r < R; r++)
                if (r < nr) {
                    float4 v = __ldg(reinterpret_cast<const float4 *>(w0 + r * W.cols) + p);
                    acc[r] += (v.x * a.x + v.y * a.y) + (v.z * a.z + v.w * a.w);
                }
        }
    } else {
        for (int64_t c = lane; c < W.cols; c += ps) {
            const float xv = __ldg(x + c);
#pragma unroll
            for (int r = 0; r < R; r++)
                if (r < nr) acc[r] += __ldg(w0 + r * W.cols + c) * xv;
        }
    }
}

/* p0: this thread's first pack (lane, or lane + 32 * warp when a block's warps split the columns),
 * ps: the pack stride (32, or 32 * warps) */
template <int KIND, int R>
__device__ __forceinline__ void rows_mv(const DMat &W, int64_t r0, int nr, const float *__restrict__ x,
                                        float (&acc)[R], int p0, int ps = 32) {
    if constexpr (KIND == 0) rows_mv_f32<R>(W, r0, nr, x, acc, p0, ps);
    else if constexpr (KIND == 1) rows_mv_bf16<R>(W, r0, nr, x, acc, p0, ps);
    else rows_mv_affine<KIND, R>(W, r0, nr, x, acc, p0, ps);
}

/* gate and up rows r0..r0+nr of two affine matrices of one shape, bit width AND group size (the
 * gate's is used for both: the launchers run fused only when fmc_gu_fused) in one pass: each lane
 * loads its slice of x once for 2R rows (x traffic from L1 halved against two rows_mv calls) */
template <int BITS, int R>
__device__ __forceinline__ void rows_mv_affine2(const DMat &G, const DMat &U, int64_t r0, int nr,
                                                const float *__restrict__ x, float (&ag)[R], float (&au)[R], int p0,
                                                int ps) {
    const int64_t packs = G.cols >> 5, ng = G.cols / G.gs, rw = G.cols * BITS / 32;
    const int ppg = G.gs >> 5;
    const uint32_t *g0 = reinterpret_cast<const uint32_t *>(G.w) + r0 * rw;
    const uint32_t *u0 = reinterpret_cast<const uint32_t *>(U.w) + r0 * rw;
    for (int64_t p = p0; p < packs; p += ps) {
        uint32_t wg[R][BITS], wu[R][BITS];
#pragma unroll
        for (int r = 0; r < R; r++) {
            if (r < nr) {
                load_words<BITS>(g0 + r * rw + p * BITS, wg[r]);
                load_words<BITS>(u0 + r * rw + p * BITS, wu[r]);
            } else {
#pragma unroll
                for (int i = 0; i < BITS; i++) wg[r][i] = wu[r][i] = 0u;
            }
        }
        const int64_t g = p / ppg;
        float sg[R], bg[R], su[R], bu[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int64_t o = (r0 + r) * ng + g;
            sg[r] = r < nr ? bf2f(__ldg(G.s + o)) : 0.f;
            bg[r] = r < nr ? bf2f(__ldg(G.b + o)) : 0.f;
            su[r] = r < nr ? bf2f(__ldg(U.s + o)) : 0.f;
            bu[r] = r < nr ? bf2f(__ldg(U.b + o)) : 0.f;
        }
        float xf[32];
        const float xs = load_xpack(x, p, xf);
#pragma unroll
        for (int r = 0; r < R; r++) {
            float d0 = 0.f, d1 = 0.f, e0 = 0.f, e1 = 0.f;
#pragma unroll
            for (int i = 0; i < 32; i += 2) {
                d0 += getq<BITS>(wg[r], i) * xf[i];
                d1 += getq<BITS>(wg[r], i + 1) * xf[i + 1];
                e0 += getq<BITS>(wu[r], i) * xf[i];
                e1 += getq<BITS>(wu[r], i + 1) * xf[i + 1];
            }
            ag[r] += sg[r] * (d0 + d1) + bg[r] * xs;
            au[r] += su[r] * (e0 + e1) + bu[r] * xs;
        }
    }
}

/* gate/up of one format (fmc_gu_fused): the fused pass for affine, two passes otherwise. Gate and
 * up of different kinds or group sizes go through the split path (two row launches, FMC_Y_GLU). */
template <int KIND, int R>
__device__ __forceinline__ void rows_mv_gu(const DMat &G, const DMat &U, int64_t r0, int nr,
                                           const float *__restrict__ x, float (&ag)[R], float (&au)[R], int p0,
                                           int ps = 32) {
    if constexpr (KIND >= 2) {
        rows_mv_affine2<KIND, R>(G, U, r0, nr, x, ag, au, p0, ps);
    } else {
        rows_mv<KIND, R>(G, r0, nr, x, ag, p0, ps);
        rows_mv<KIND, R>(U, r0, nr, x, au, p0, ps);
    }
}

#define FMC_MV_R 4
#define FMC_MULTI 4
/* up to FMC_MULTI matrices with the same input x and the same kind, one launch (blockIdx.y picks
 * the matrix): y_j[r] (+)= W_j[r,:] . x */
struct MVSet {
    DMat W[FMC_MULTI];
    float *y[FMC_MULTI];
    int acc[FMC_MULTI];
};

/* y[r] (+)= W[r,:] . x over all rows, FMC_MV_R rows per warp pass, the grid's warps in turn
 * (accumulate: an FMC_Y_* mode) */
template <int KIND>
__device__ __forceinline__ void warp_rows_mv(const DMat &W, const float *__restrict__ x, float *__restrict__ y,
                                             int accumulate) {
    const int lane = threadIdx.x & 31;
    const int64_t warp = (int64_t)blockIdx.x * FMC_WARPS + (threadIdx.x >> 5);
    const int64_t nwarps = (int64_t)gridDim.x * FMC_WARPS;
    for (int64_t r0 = warp * FMC_MV_R; r0 < W.rows; r0 += nwarps * FMC_MV_R) {
        const int nr = (int)(W.rows - r0 < FMC_MV_R ? W.rows - r0 : FMC_MV_R);
        float acc[FMC_MV_R];
#pragma unroll
        for (int r = 0; r < FMC_MV_R; r++) acc[r] = 0.f;
        rows_mv<KIND, FMC_MV_R>(W, r0, nr, x, acc, lane);
#pragma unroll
        for (int r = 0; r < FMC_MV_R; r++) {
            const float v = warp_sum(acc[r]);
            if (lane == r && r < nr) y_store(y + r0 + r, v, accumulate);
        }
    }
}

template <int KIND>
__global__ void __launch_bounds__(FMC_WARPS * 32) k_mv(MVSet set, const float *__restrict__ x) {
    warp_rows_mv<KIND>(set.W[blockIdx.y], x, set.y[blockIdx.y], set.acc[blockIdx.y]);
}

/* the same for matrices with few rows (routers, 1-row gates): a block per FMC_MV_R rows, its warps
 * split the columns (pack p goes to warp (p / 32) % FMC_WARPS); the partial sums meet in shared
 * memory in a fixed order (deterministic) */
template <int KIND>
__global__ void __launch_bounds__(FMC_WARPS * 32) k_mv_sk(MVSet set, const float *__restrict__ x) {
    const DMat &W = set.W[blockIdx.y];
    float *__restrict__ y = set.y[blockIdx.y];
    const int accumulate = set.acc[blockIdx.y];
    __shared__ float part[FMC_WARPS][FMC_MV_R];
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    for (int64_t r0 = (int64_t)blockIdx.x * FMC_MV_R; r0 < W.rows; r0 += (int64_t)gridDim.x * FMC_MV_R) {
        const int nr = (int)(W.rows - r0 < FMC_MV_R ? W.rows - r0 : FMC_MV_R);
        float acc[FMC_MV_R];
#pragma unroll
        for (int r = 0; r < FMC_MV_R; r++) acc[r] = 0.f;
        rows_mv<KIND, FMC_MV_R>(W, r0, nr, x, acc, lane + 32 * wid, 32 * FMC_WARPS);
#pragma unroll
        for (int r = 0; r < FMC_MV_R; r++) {
            const float v = warp_sum(acc[r]);
            if (lane == 0) part[wid][r] = v;
        }
        __syncthreads();
        if (threadIdx.x < FMC_MV_R && (int)threadIdx.x < nr) {
            float v = 0.f;
#pragma unroll
            for (int w = 0; w < FMC_WARPS; w++) v += part[w][threadIdx.x];
            y_store(y + r0 + threadIdx.x, v, accumulate);
        }
        __syncthreads();
    }
}

/* decode SwiGLU: h[r] = silu(G[r].x) * (U[r].x), 2 rows of each per warp pass */
/* h[r] = silu(G[r,:].x) * (U[r,:].x) over all rows, 2 rows of each per warp pass */
template <int KIND>
__device__ __forceinline__ void warp_rows_swiglu(const DMat &G, const DMat &U, const float *__restrict__ x,
                                                 float *__restrict__ h) {
    const int lane = threadIdx.x & 31;
    const int64_t warp = (int64_t)blockIdx.x * FMC_WARPS + (threadIdx.x >> 5);
    const int64_t nwarps = (int64_t)gridDim.x * FMC_WARPS;
    for (int64_t r0 = warp * 2; r0 < G.rows; r0 += nwarps * 2) {
        const int nr = (int)(G.rows - r0 < 2 ? G.rows - r0 : 2);
        float ag[2] = {0.f, 0.f}, au[2] = {0.f, 0.f};
        rows_mv_gu<KIND, 2>(G, U, r0, nr, x, ag, au, lane);
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const float g = warp_sum(ag[r]), u = warp_sum(au[r]);
            if (lane == r && r < nr) h[r0 + r] = d_silu(g) * u;
        }
    }
}

template <int KIND>
__global__ void __launch_bounds__(FMC_WARPS * 32) k_mv_swiglu(DMat G, DMat U, const float *__restrict__ x,
                                                               float *__restrict__ h) {
    warp_rows_swiglu<KIND>(G, U, x, h);
}

/* ------------------------------------------------------------------ matrix kernels */

/* Y[t*ldy + r] (+)= W[r,:] . X[t,:] for t < n; a warp per row, token tiles of NT. accumulate: add
 * into Y (fused residual add). */
template <int KIND, int NT>
__global__ void __launch_bounds__(FMC_WARPS * 32) k_mm(DMat W, const float *__restrict__ X, int64_t ldx, int64_t n,
                                                        float *__restrict__ Y, int64_t ldy, int accumulate) {
    const int lane = threadIdx.x & 31;
    const int64_t warp = (int64_t)blockIdx.x * FMC_WARPS + (threadIdx.x >> 5);
    const int64_t nwarps = (int64_t)gridDim.x * FMC_WARPS;
    for (int64_t r = warp; r < W.rows; r += nwarps) {
        for (int64_t t0 = 0; t0 < n; t0 += NT) {
            const int nt = (int)(n - t0 < NT ? n - t0 : NT);
            float acc[NT];
#pragma unroll
            for (int t = 0; t < NT; t++) acc[t] = 0.f;
            row_dot<KIND, NT>(W, r, X + t0 * ldx, ldx, nt, acc, lane);
#pragma unroll
            for (int t = 0; t < NT; t++) acc[t] = warp_sum(acc[t]);
            if (lane == 0) {
#pragma unroll
                for (int t = 0; t < NT; t++)
                    if (t < nt) {
                        y_store(Y + (t0 + t) * ldy + r, acc[t], accumulate);
                    }
            }
        }
    }
}

/* Hout[t*I + r] = silu(G[r,:].X[t]) * (U[r,:].X[t]) (SwiGLU of a dense MLP / shared expert) */
template <int KIND, int NT>
__global__ void __launch_bounds__(FMC_WARPS * 32) k_mm_swiglu(DMat G, DMat U, const float *__restrict__ X,
                                                               int64_t ldx, int64_t n, float *__restrict__ Hout) {
    const int lane = threadIdx.x & 31;
    const int64_t warp = (int64_t)blockIdx.x * FMC_WARPS + (threadIdx.x >> 5);
    const int64_t nwarps = (int64_t)gridDim.x * FMC_WARPS;
    for (int64_t r = warp; r < G.rows; r += nwarps) {
        for (int64_t t0 = 0; t0 < n; t0 += NT) {
            const int nt = (int)(n - t0 < NT ? n - t0 : NT);
            float ag[NT], au[NT];
#pragma unroll
            for (int t = 0; t < NT; t++) ag[t] = au[t] = 0.f;
            row_dot<KIND, NT>(G, r, X + t0 * ldx, ldx, nt, ag, lane);
            row_dot<KIND, NT>(U, r, X + t0 * ldx, ldx, nt, au, lane);
#pragma unroll
            for (int t = 0; t < NT; t++) {
                ag[t] = warp_sum(ag[t]);
                au[t] = warp_sum(au[t]);
            }
            if (lane == 0) {
#pragma unroll
                for (int t = 0; t < NT; t++)
                    if (t < nt) Hout[(t0 + t) * G.rows + r] = d_silu(ag[t]) * au[t];
            }
        }
    }
}

__device__ __forceinline__ DMat part_mat(const DPart &P, const uint8_t *base) {
    DMat W;
    W.kind = P.kind;
    W.gs = P.gs;
    W.rows = P.rows;
    W.cols = P.cols;
    W.w = base + P.off_w;
    W.s = reinterpret_cast<const uint16_t *>(base + P.off_s);
    W.b = reinterpret_cast<const uint16_t *>(base + P.off_b);
    return W;
}

/* one routed expert's rows in this block's warps: gate+up (2 rows of each per warp pass) into
 * Hbuf[p*I + r] = silu(g)*u, and down (FMC_MV_R rows per warp pass) into Ye[p*H + r] */
template <int KIND>
__device__ __forceinline__ void expert_gateup(const DMat &G, const DMat &U, const float *__restrict__ x,
                                              float *__restrict__ Hbuf, int p) {
    warp_rows_swiglu<KIND>(G, U, x, Hbuf + (int64_t)p * G.rows);
}

template <int KIND>
__device__ __forceinline__ void expert_down(const DMat &D, const float *__restrict__ h, float *__restrict__ Ye, int p) {
    warp_rows_mv<KIND>(D, h, Ye + (int64_t)p * D.rows, 0);
}

/* routed experts, gate+up: pair p = t*K + k (blockIdx.y) uses the expert block at ptrs[p]
 * (NULL: not in this chunk, skipped); Hbuf[p*I + r] = silu(g)*u */
template <int KIND>
__global__ void __launch_bounds__(FMC_WARPS * 32) k_moe_gateup(DPart PG, DPart PU, const uint8_t *const *ptrs, int K,
                                                                const float *__restrict__ X, int64_t H,
                                                                float *__restrict__ Hbuf) {
    const int p = blockIdx.y;
    const uint8_t *base = ptrs[p];
    if (!base) return;
    const DMat G = part_mat(PG, base), U = part_mat(PU, base);
    const float *x = X + (int64_t)(p / K) * H;
    expert_gateup<KIND>(G, U, x, Hbuf, p);
}

/* routed experts, one of gate / up alone (the split path: gate and up differ in kind or group size):
 * Hbuf[p*I + r] = W[r,:] . x stored by mode (FMC_Y_SET for the gate, then FMC_Y_GLU for the up) */
template <int KIND>
__global__ void __launch_bounds__(FMC_WARPS * 32) k_moe_part(DPart P, const uint8_t *const *ptrs, int K,
                                                              const float *__restrict__ X, int64_t H,
                                                              float *__restrict__ Hbuf, int mode) {
    const int p = blockIdx.y;
    const uint8_t *base = ptrs[p];
    if (!base) return;
    const DMat W = part_mat(P, base);
    warp_rows_mv<KIND>(W, X + (int64_t)(p / K) * H, Hbuf + (int64_t)p * W.rows, mode);
}

/* routed experts, down: Ye[p*H + r] = D[r,:] . Hbuf[p] */
template <int KIND>
__global__ void __launch_bounds__(FMC_WARPS * 32) k_moe_down(DPart PD, const uint8_t *const *ptrs,
                                                              const float *__restrict__ Hbuf, float *__restrict__ Ye) {
    const int p = blockIdx.y;
    const uint8_t *base = ptrs[p];
    if (!base) return;
    const DMat D = part_mat(PD, base);
    const float *h = Hbuf + (int64_t)p * D.cols;
    expert_down<KIND>(D, h, Ye, p);
}

/* decode (one token) with the experts' VRAM blocks passed by value: member j (blockIdx.y) is the
 * block at S.p[j] for pair S.pair[j] (= k); no pointer array in device memory, so a layer can launch
 * its experts in several groups (hits at once, each copied miss as soon as its copy lands) */
#define FMC_PSET 32
struct PairSet {
    const uint8_t *p[FMC_PSET];
    int32_t pair[FMC_PSET];
};

template <int KIND>
__global__ void __launch_bounds__(FMC_WARPS * 32) k_dec_gateup(DPart PG, DPart PU, PairSet S,
                                                                const float *__restrict__ x, float *__restrict__ Hbuf) {
    const uint8_t *base = S.p[blockIdx.y];
    const int p = S.pair[blockIdx.y];
    const DMat G = part_mat(PG, base), U = part_mat(PU, base);
    expert_gateup<KIND>(G, U, x, Hbuf, p);
}

/* decode, one of gate / up alone (as k_moe_part) */
template <int KIND>
__global__ void __launch_bounds__(FMC_WARPS * 32) k_dec_part(DPart P, PairSet S, const float *__restrict__ x,
                                                              float *__restrict__ Hbuf, int mode) {
    const uint8_t *base = S.p[blockIdx.y];
    const int p = S.pair[blockIdx.y];
    const DMat W = part_mat(P, base);
    warp_rows_mv<KIND>(W, x, Hbuf + (int64_t)p * W.rows, mode);
}

template <int KIND>
__global__ void __launch_bounds__(FMC_WARPS * 32) k_dec_down(DPart PD, PairSet S, const float *__restrict__ Hbuf,
                                                              float *__restrict__ Ye) {
    const uint8_t *base = S.p[blockIdx.y];
    const int p = S.pair[blockIdx.y];
    const DMat D = part_mat(PD, base);
    const float *h = Hbuf + (int64_t)p * D.cols;
    expert_down<KIND>(D, h, Ye, p);
}

/* resident experts: ptrs[p] = table[topi[p]] */
static __global__ void k_fill_ptrs(const int32_t *topi, int64_t npairs, const uint8_t *const *table, const uint8_t **ptrs) {
    int64_t p = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (p < npairs) ptrs[p] = table[topi[p]];
}

/* X[t] += sum_k w[t,k] * Ye[t*K+k] + (has_sh ? g * sho[t] : 0), g = sigmoid(shs[t]) (spec.shared_gate
 * sigmoid: GATE1 false, the default kernel) or 1 (spec.shared_gate none: GATE1 true, shs unread) */
/* hostmask (CPU split, decode, n == 1): bit k set = pair k was computed on the host; the weighted
 * sum of those arrives as ycpu [n, H] (NULL: none) */
template <bool GATE1>
static __global__ void k_moe_combine(float *__restrict__ X, const float *__restrict__ Ye, const float *__restrict__ topw,
                              int K, const float *__restrict__ sho, const float *__restrict__ shs, int has_sh,
                              int64_t n, int64_t H, uint32_t hostmask, const float *__restrict__ ycpu,
                              unsigned long long guard_code, unsigned long long *__restrict__ bad) {
    const int64_t t = blockIdx.y;
    for (int64_t d = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; d < H; d += (int64_t)gridDim.x * blockDim.x) {
        float acc = 0.f;
        for (int k = 0; k < K; k++)
            if (!(k < 32 && ((hostmask >> k) & 1u))) acc += topw[t * K + k] * Ye[(t * K + k) * H + d];
        if (ycpu) acc += ycpu[t * H + d];
        if (has_sh) acc += (GATE1 ? 1.0f : d_sigmoid(shs[t])) * sho[t * H + d];
        const float v = X[t * H + d] + acc;
        X[t * H + d] = v;
        /* numerical guard of the layer (as k_check_finite, fused: no extra launch per MoE layer) */
        if (bad && (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u) atomicMin(bad, guard_code | (unsigned long long)t);
    }
}

/* ------------------------------------------------------------------ embedding */

static __global__ void k_embed(DMat W, const int32_t *tokens, float *X) {
    const int64_t t = blockIdx.x;
    const int64_t r = tokens[t];
    float *out = X + t * W.cols;
    for (int64_t c = threadIdx.x; c < W.cols; c += blockDim.x) {
        float v;
        if (W.kind == 0) {
            v = reinterpret_cast<const float *>(W.w)[r * W.cols + c];
        } else if (W.kind == 1) {
            v = bf2f(reinterpret_cast<const uint16_t *>(W.w)[r * W.cols + c]);
        } else {
            const int bits = W.kind;
            const uint32_t *q = reinterpret_cast<const uint32_t *>(W.w) + r * (W.cols * bits / 32);
            const int64_t bit = c * bits, wi = bit >> 5;
            const int sh = (int)(bit & 31);
            uint32_t u = q[wi] >> sh;
            if (sh + bits > 32) u |= q[wi + 1] << (32 - sh);
            u &= (1u << bits) - 1u;
            const int64_t ng = W.cols / W.gs, g = c / W.gs;
            v = bf2f(W.s[r * ng + g]) * (float)u + bf2f(W.b[r * ng + g]);
        }
        out[c] = v;
    }
}

/* ------------------------------------------------------------------ norms */

/* op 0: y = x̂ (w + off); op 1: y = w x̂ silu(z); op 2: y = x / sqrt(sum x² + eps). One block per row. */
static __global__ void k_norm(int op, const float *__restrict__ X, const float *__restrict__ Z, const float *__restrict__ w,
                       int64_t d, float eps, float off, float *__restrict__ Y) {
    __shared__ float red[33];
    const int64_t row = blockIdx.x;
    const float *x = X + row * d;
    float ss = 0.f;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) ss += x[i] * x[i];
    ss = block_sum(ss, red);
    float r = op == 2 ? rsqrtf(ss + eps) : rsqrtf(ss / (float)d + eps);
    float *y = Y + row * d;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
        float v = x[i] * r;
        if (op == 0) v *= w[i] + off;
        else if (op == 1) v = w[i] * v * d_silu(Z[row * d + i]);
        y[i] = v;
    }
}

/* ------------------------------------------------------------------ routing */

/* the largest of x[0..E) across one warp (every lane gets it): its index (ties: the lower index) and
 * *vout its value; index 0x7fffffff and -INFINITY when every entry is -INFINITY or NaN */
static __device__ __forceinline__ int warp_argmax(const float *x, int E, int lane, float *vout) {
    float v = -INFINITY;
    int idx = 0x7fffffff;
    for (int i = lane; i < E; i += 32) {
        const float xi = x[i];
        if (xi > v || (xi == v && i < idx)) { v = xi; idx = i; }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float v2 = __shfl_xor_sync(0xffffffffu, v, o);
        const int i2 = __shfl_xor_sync(0xffffffffu, idx, o);
        if (v2 > v || (v2 == v && i2 < idx)) { v = v2; idx = i2; }
    }
    *vout = v;
    return idx;
}

/* the softmax router of one token, one warp (blockDim 32): softmax over E, top-K (descending, ties:
 * lower index), renormalise. The K selection rounds are warp shuffles over the probabilities in
 * shared memory: no block barriers (the old one-block version spent ~11 us per token on them).
 * EX (k_route_ex only): bias[E] (may be NULL) added to the logits first, the K weights times scale
 * at the end (fm_ops.c fm_route); EX false is k_route, the default path, without either. */
template <bool EX>
static __device__ __forceinline__ void route_softmax(const float *__restrict__ logits, const float *__restrict__ bias,
                                                     float scale, int E, int K, int norm, int32_t *__restrict__ topi,
                                                     float *__restrict__ topw) {
    extern __shared__ float sp[]; /* E */
    const int64_t t = blockIdx.x;
    const int lane = threadIdx.x;
    const float *l = logits + t * E;
    float mx = -INFINITY;
    for (int i = lane; i < E; i += 32) mx = fmaxf(mx, EX && bias ? l[i] + bias[i] : l[i]);
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float s = 0.f;
    for (int i = lane; i < E; i += 32) {
        const float e = expf((EX && bias ? l[i] + bias[i] : l[i]) - mx);
        sp[i] = e;
        s += e;
    }
    s = warp_sum(s);
    const float inv = 1.0f / s;
    /* a NaN probability (NaN logits: a damaged router or hidden state, which the eval's numerical
     * guard then reports) becomes -1: below every real probability but above the -INFINITY that
     * marks a chosen expert, so the K rounds below still pick K distinct ids in [0, E) */
    for (int i = lane; i < E; i += 32) {
        const float p = sp[i] * inv;
        sp[i] = p == p ? p : -1.0f;
    }
    __syncwarp();
    float wsum = 0.f;
    for (int k = 0; k < K; k++) {
        float v;
        const int idx = warp_argmax(sp, E, lane, &v);
        if (lane == 0) {
            topi[t * K + k] = idx;
            topw[t * K + k] = v;
        }
        if (idx >= 0 && idx < E && (idx & 31) == lane) sp[idx] = -INFINITY;
        wsum += v;
        __syncwarp();
    }
    if (!EX) {
        if (norm && lane < K)
            for (int k = lane; k < K; k += 32) topw[t * K + k] = topw[t * K + k] / wsum;
    } else if (lane < K) {
        for (int k = lane; k < K; k += 32) {
            float w = topw[t * K + k];
            if (norm) w = w / wsum;
            if (scale != 1.0f) w *= scale;
            topw[t * K + k] = w;
        }
    }
}

/* the default router (spec.router softmax_topk, no router_bias, routed_scaling_factor 1) */
static __global__ void k_route(const float *__restrict__ logits, int E, int K, int norm, int32_t *__restrict__ topi,
                        float *__restrict__ topw) {
    route_softmax<false>(logits, NULL, 1.0f, E, K, norm, topi, topw);
}

/* spec.router softmax_topk with spec.router_bias (bias[E], NULL: none) and/or a
 * spec.routed_scaling_factor other than 1 (gpt-oss style); shared memory: E floats */
static __global__ void k_route_ex(const float *__restrict__ logits, const float *__restrict__ bias, float scale, int E,
                                  int K, int norm, int32_t *__restrict__ topi, float *__restrict__ topw) {
    route_softmax<true>(logits, bias, scale, E, K, norm, topi, topw);
}

/* the sigmoid router (spec.router sigmoid_topk, DeepSeek-V3; fm_ops.c fm_route): one warp per token
 * (blockDim 32). scores = sigmoid(logits); the choice uses scores + bias (bias may be NULL), limited
 * to the topk_group best of n_group groups (each ranked by the sum of its two largest biased
 * scores) when n_group > 1; K rounds of warp argmax (descending, ties: lower index); weights = the
 * unbiased scores, divided by their sum + 1e-20 when norm, times scale. Shared memory: 2 * E +
 * 2 * n_group floats. A NaN selection score becomes -3e38 (below every real score, above the
 * -INFINITY of a chosen or masked expert) so K distinct ids are still picked. */
static __global__ void k_route_sigmoid(const float *__restrict__ logits, const float *__restrict__ bias, int E, int K,
                                       int norm, int n_group, int topk_group, float scale,
                                       int32_t *__restrict__ topi, float *__restrict__ topw) {
    extern __shared__ float sm[];
    float *score = sm, *sel = sm + E, *gs = sm + 2 * E, *chosen = sm + 2 * E + n_group;
    const int64_t t = blockIdx.x;
    const int lane = threadIdx.x;
    const float *l = logits + t * E;
    for (int i = lane; i < E; i += 32) {
        const float s = 1.0f / (1.0f + expf(-l[i]));
        const float v = bias ? s + bias[i] : s;
        score[i] = s;
        sel[i] = v == v ? v : -3.0e38f;
    }
    __syncwarp();
    if (n_group > 1 && topk_group < n_group) {
        const int per = E / n_group;
        for (int g = lane; g < n_group; g += 32) {
            float a = -INFINITY, b = -INFINITY;
            for (int i = 0; i < per; i++) {
                const float x = sel[g * per + i];
                if (x > a) { b = a; a = x; } else if (x > b) { b = x; }
            }
            gs[g] = a + b;
            chosen[g] = 0.0f;
        }
        __syncwarp();
        for (int r = 0; r < topk_group; r++) {
            float v = -INFINITY;
            int idx = 0x7fffffff;
            for (int g = lane; g < n_group; g += 32)
                if (chosen[g] == 0.0f && (idx == 0x7fffffff || gs[g] > v || (gs[g] == v && g < idx))) { v = gs[g]; idx = g; }
            for (int o = 16; o > 0; o >>= 1) {
                const float v2 = __shfl_xor_sync(0xffffffffu, v, o);
                const int i2 = __shfl_xor_sync(0xffffffffu, idx, o);
                if (i2 != 0x7fffffff && (idx == 0x7fffffff || v2 > v || (v2 == v && i2 < idx))) { v = v2; idx = i2; }
            }
            if (lane == 0 && idx >= 0 && idx < n_group) chosen[idx] = 1.0f;
            __syncwarp();
        }
        for (int i = lane; i < E; i += 32)
            if (chosen[i / per] == 0.0f) sel[i] = -INFINITY;
        __syncwarp();
    }
    float wsum = 0.f;
    for (int k = 0; k < K; k++) {
        float v;
        const int idx = warp_argmax(sel, E, lane, &v);
        const float w = idx >= 0 && idx < E ? score[idx] : 0.0f;
        if (lane == 0) {
            topi[t * K + k] = idx;
            topw[t * K + k] = w;
        }
        __syncwarp();
        if (idx >= 0 && idx < E && (idx & 31) == lane) sel[idx] = -INFINITY;
        wsum += w;
        __syncwarp();
    }
    if (lane < K) {
        const float den = wsum + 1e-20f;
        for (int k = lane; k < K; k += 32) {
            float w = topw[t * K + k];
            if (norm) w /= den;
            if (scale != 1.0f) w *= scale;
            topw[t * K + k] = w;
        }
    }
}

/* ------------------------------------------------------------------ numerical guard */

/* any NaN/Inf among x[n * row] (a bit test, no float compare): atomicMin of code | (t_off + i / row)
 * into *bad (UINT64_MAX: none seen). The host puts the eval chunk and the stage (embedding, layer,
 * logits) in the high bits of code, so the smallest value is the first stage in stream order that
 * saw one, and its first row. Takes no host value that changes between graph replays. */
static __global__ void k_check_finite(const float *__restrict__ x, int64_t n, int64_t row, unsigned long long code,
                               int64_t t_off, unsigned long long *__restrict__ bad) {
    const int64_t tot = n * row;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < tot; i += (int64_t)gridDim.x * blockDim.x)
        if ((__float_as_uint(x[i]) & 0x7f800000u) == 0x7f800000u) { /* this thread's first: its smallest i */
            atomicMin(bad, code | (unsigned long long)(t_off + i / row));
            return;
        }
}

/* ------------------------------------------------------------------ full attention */

/* grid (n, nh + nkv): q heads (split gate, q-norm, RoPE) then kv heads (k-norm, RoPE, cache write
 * of k and v at row pos+t). blockDim 128. rows (a multi-sequence pass; else NULL): token t is the
 * next token of its own sequence, caches rows->kc[t] / rows->vc[t], at position rows->pos[t]. */
struct fmc_rows_attn {
    float *const *kc;
    float *const *vc;
    const int *pos;
};
static __global__ void k_attn_prep(const float *__restrict__ QG, const float *__restrict__ Kn, const float *__restrict__ Vn,
                            const float *__restrict__ qnw, const float *__restrict__ knw, float *__restrict__ Q,
                            float *__restrict__ Gt, float *__restrict__ KC, float *__restrict__ VC, int pos_arg,
                            const int *__restrict__ dpos, int nh, int nkv, int dh, int rot, float theta, int gate,
                            float eps, float off, fmc_rows_attn rows) {
    const int pos = dpos ? *dpos : pos_arg; /* dpos: graph replays read the position from the device */
    extern __shared__ float buf[]; /* dh */
    __shared__ float red[33];
    const int64_t t = blockIdx.x;
    const int hh = blockIdx.y;
    const int p = rows.kc ? rows.pos[t] : pos + (int)t;
    if (rows.kc) {
        KC = rows.kc[t];
        VC = rows.vc[t];
    }
    const int64_t qd = (int64_t)nh * dh, kvd = (int64_t)nkv * dh;
    const float *src;
    const float *nw;
    float *dst;
    if (hh < nh) {
        src = gate ? QG + t * qd * 2 + (int64_t)hh * dh * 2 : QG + t * qd + (int64_t)hh * dh;
        nw = qnw;
        dst = Q + t * qd + (int64_t)hh * dh;
        if (gate)
            for (int d = threadIdx.x; d < dh; d += blockDim.x) Gt[t * qd + (int64_t)hh * dh + d] = src[dh + d];
    } else {
        const int h = hh - nh;
        src = Kn + t * kvd + (int64_t)h * dh;
        nw = knw;
        dst = KC + (int64_t)p * kvd + (int64_t)h * dh;
        for (int d = threadIdx.x; d < dh; d += blockDim.x)
            VC[(int64_t)p * kvd + (int64_t)h * dh + d] = Vn[t * kvd + (int64_t)h * dh + d];
    }
    float ss = 0.f;
    for (int d = threadIdx.x; d < dh; d += blockDim.x) {
        float v = src[d];
        buf[d] = v;
        ss += v * v;
    }
    ss = block_sum(ss, red); /* syncs: buf visible */
    if (nw) {
        const float r = rsqrtf(ss / (float)dh + eps);
        for (int d = threadIdx.x; d < dh; d += blockDim.x) buf[d] = buf[d] * r * (nw[d] + off);
        __syncthreads();
    }
    const int half = rot / 2;
    for (int d = threadIdx.x; d < dh; d += blockDim.x) {
        float v = buf[d];
        if (d < rot) {
            const int i = d < half ? d : d - half;
            const float inv = 1.0f / powf(theta, (float)(2 * i) / (float)rot);
            const float ang = (float)p * inv;
            float sn, cs;
            sincosf(ang, &sn, &cs);
            if (d < half) v = buf[d] * cs - buf[d + half] * sn;
            else v = buf[d] * cs + buf[d - half] * sn;
        }
        dst[d] = v;
    }
}

/* grid (n, nh), blockDim 128 (4 warps): token t attends keys 0..pos+t; online softmax per warp over
 * interleaved keys, merged in shared memory; out *= sigmoid(gate) when gate. dh <= 256. */
#define FMC_ATT_WARPS 4
static __global__ void __launch_bounds__(FMC_ATT_WARPS * 32) k_attn(const float *__restrict__ Q, const float *__restrict__ KC,
                                                              const float *__restrict__ VC, const float *__restrict__ Gt,
                                                              float *__restrict__ O, int pos_arg,
                                                              const int *__restrict__ dpos, int nh, int nkv, int dh,
                                                              float scale, int gate, fmc_rows_attn rows) {
    const int pos = dpos ? *dpos : pos_arg;
    __shared__ float sq[256];
    __shared__ float sm[FMC_ATT_WARPS], sl[FMC_ATT_WARPS];
    __shared__ float so[FMC_ATT_WARPS][256];
    const int64_t t = blockIdx.x;
    const int h = blockIdx.y, kh = h / (nh / nkv);
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int64_t qd = (int64_t)nh * dh, kvd = (int64_t)nkv * dh;
    for (int d = threadIdx.x; d < dh; d += blockDim.x) sq[d] = Q[t * qd + (int64_t)h * dh + d];
    __syncthreads();
    const int nkeys = rows.kc ? rows.pos[t] + 1 : pos + (int)t + 1;
    if (rows.kc) {
        KC = rows.kc[t];
        VC = rows.vc[t];
    }
    float m = -INFINITY, l = 0.f, acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++) acc[i] = 0.f;
    for (int j = wid; j < nkeys; j += FMC_ATT_WARPS) {
        const float *kr = KC + (int64_t)j * kvd + (int64_t)kh * dh;
        const float *vr = VC + (int64_t)j * kvd + (int64_t)kh * dh;
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int d = lane + 32 * i;
            if (d < dh) s += sq[d] * kr[d];
        }
        s = warp_sum(s) * scale;
        const float mn = fmaxf(m, s);
        const float c = expf(m - mn), e = expf(s - mn);
        l = l * c + e;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int d = lane + 32 * i;
            if (d < dh) acc[i] = acc[i] * c + e * vr[d];
        }
        m = mn;
    }
    if (lane == 0) { sm[wid] = m; sl[wid] = l; }
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int d = lane + 32 * i;
        if (d < dh) so[wid][d] = acc[i];
    }
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < FMC_ATT_WARPS; w++) M = fmaxf(M, sm[w]);
    float L = 0.f, f[FMC_ATT_WARPS];
    for (int w = 0; w < FMC_ATT_WARPS; w++) {
        f[w] = sm[w] == -INFINITY ? 0.f : expf(sm[w] - M);
        L += sl[w] * f[w];
    }
    for (int d = threadIdx.x; d < dh; d += blockDim.x) {
        float v = 0.f;
        for (int w = 0; w < FMC_ATT_WARPS; w++) v += so[w][d] * f[w];
        v /= L;
        if (gate) v *= d_sigmoid(Gt[t * qd + (int64_t)h * dh + d]);
        O[t * qd + (int64_t)h * dh + d] = v;
    }
}

/* ------------------------------------------------------------------ linear attention */

/* causal depthwise conv1d + SiLU, a thread per channel over n tokens; state [(k-1), C].
 * states (a multi-sequence pass; else NULL): row blockIdx.y is one token of its own sequence
 * (X, Y row blockIdx.y, state states[blockIdx.y]; n must be 1) */
static __global__ void k_conv(const float *__restrict__ X, int64_t n, float *__restrict__ state, const float *__restrict__ w,
                       int C, int k, float *__restrict__ Y, float *const *__restrict__ states = NULL) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    if (states) {
        state = states[blockIdx.y];
        X += (int64_t)blockIdx.y * C;
        Y += (int64_t)blockIdx.y * C;
    }
    float win[8];
    const float *wc = w + (int64_t)c * k;
#pragma unroll
    for (int j = 0; j < 8; j++)
        if (j < k - 1) win[j] = state[(int64_t)j * C + c];
    for (int64_t t = 0; t < n; t++) {
        const float xt = X[t * C + c];
        float acc = wc[k - 1] * xt;
#pragma unroll
        for (int j = 0; j < 8; j++)
            if (j < k - 1) acc += wc[j] * win[j];
        Y[t * C + c] = d_silu(acc);
#pragma unroll
        for (int j = 0; j < 7; j++)
            if (j + 1 < k - 1) win[j] = win[j + 1];
        if (k > 1) {
#pragma unroll
            for (int j = 0; j < 8; j++)
                if (j == k - 2) win[j] = xt;
        }
    }
#pragma unroll
    for (int j = 0; j < 8; j++)
        if (j < k - 1) state[(int64_t)j * C + c] = win[j];
}

/* GatedDeltaNet over n tokens, sequential in t: block = value head h (blockDim = dv, a multiple of
 * 32), thread j keeps column j of the state S[h] (dk <= DKMAX) in registers.
 * QKV [n, 2*nk*dk + nv*dv] after conv; Z [n, nv*dv]; A, B [n, nv]; O [n, nv*dv]. */
template <int DKMAX>
__global__ void __launch_bounds__(256) k_gdn(const float *__restrict__ QKV, const float *__restrict__ Z,
                                              const float *__restrict__ Aa, const float *__restrict__ Bb,
                                              const float *__restrict__ A_log, const float *__restrict__ dt_bias,
                                              const float *__restrict__ normw, float *__restrict__ S, float *__restrict__ O,
                                              int64_t n, int nk, int nv, int dk, int dv, float eps) {
    /* blockDim.x = dv rounded up to a multiple of 32; threads j >= dv only join the reductions */
    __shared__ float sq[DKMAX], sk[DKMAX];
    __shared__ float red[33];
    const int h = blockIdx.x, j = threadIdx.x;
    const bool act = j < dv;
    const int kh = h / (nv / nk);
    const int64_t cd = 2 * (int64_t)nk * dk + (int64_t)nv * dv, vd = (int64_t)nv * dv;
    float *Sh = S + (int64_t)h * dk * dv;
    float st[DKMAX];
#pragma unroll
    for (int i = 0; i < DKMAX; i++) st[i] = (act && i < dk) ? Sh[(int64_t)i * dv + j] : 0.f;
    const float Aneg = -expf(A_log[h]);
    const float qs = rsqrtf((float)dk);
    for (int64_t t = 0; t < n; t++) {
        const float *row = QKV + t * cd;
        float pq = 0.f, pk = 0.f;
        for (int i = j; i < dk; i += blockDim.x) {
            float a = row[(int64_t)kh * dk + i], b = row[(int64_t)nk * dk + (int64_t)kh * dk + i];
            sq[i] = a;
            sk[i] = b;
            pq += a * a;
            pk += b * b;
        }
        const float ssq = block_sum(pq, red);
        const float ssk = block_sum(pk, red);
        const float rq = rsqrtf(ssq + 1e-6f) * qs, rk = rsqrtf(ssk + 1e-6f);
        const float beta = d_sigmoid(Bb[t * nv + h]);
        const float g = Aneg * d_softplus(Aa[t * nv + h] + dt_bias[h]);
        const float decay = expf(g);
        const float v = act ? row[2 * (int64_t)nk * dk + (int64_t)h * dv + j] : 0.f;
        float kv = 0.f;
#pragma unroll
        for (int i = 0; i < DKMAX; i++)
            if (i < dk) {
                st[i] *= decay;
                kv += st[i] * (sk[i] * rk);
            }
        const float delta = (v - kv) * beta;
        float o = 0.f;
#pragma unroll
        for (int i = 0; i < DKMAX; i++)
            if (i < dk) {
                st[i] += (sk[i] * rk) * delta;
                o += st[i] * (sq[i] * rq);
            }
        if (!act) o = 0.f;
        /* gated RMSNorm over the dv outputs of this head */
        const float ss = block_sum(o * o, red);
        const float r = rsqrtf(ss / (float)dv + eps);
        if (act) O[t * vd + (int64_t)h * dv + j] = normw[j] * (o * r) * d_silu(Z[t * vd + (int64_t)h * dv + j]);
    }
#pragma unroll
    for (int i = 0; i < DKMAX; i++)
        if (act && i < dk) Sh[(int64_t)i * dv + j] = st[i];
}

/* GatedDeltaNet, decode (one token): grid (nv, ceil(dv/32)), 128 threads = 32 value columns x 4
 * slices of the key dim; a thread keeps its column's rows i = slice*DKS .. +DKS of the state in
 * registers (no spills, unlike k_gdn's full column); the slices' partial S^T k and S^T q meet in
 * shared memory. O gets the un-normalized o; the gated RMSNorm over each head's dv outputs is a
 * second pass (k_norm op 1, in place). dk <= 4 * DKS. */
template <int DKS>
__global__ void __launch_bounds__(128) k_gdn_dec(const float *__restrict__ QKV, const float *__restrict__ Aa,
                                                  const float *__restrict__ Bb, const float *__restrict__ A_log,
                                                  const float *__restrict__ dt_bias, float *__restrict__ S,
                                                  float *__restrict__ O, int nk, int nv, int dk, int dv,
                                                  float *const *__restrict__ Srows = NULL) {
    /* Srows (a multi-sequence pass): row blockIdx.z is one token of its own sequence (state Srows[z]) */
    if (Srows) {
        const int64_t r = blockIdx.z;
        S = Srows[r];
        QKV += r * (2 * (int64_t)nk * dk + (int64_t)nv * dv);
        Aa += r * nv;
        Bb += r * nv;
        O += r * (int64_t)nv * dv;
    }
    __shared__ float sq[4 * DKS], sk[4 * DKS];
    __shared__ float part[2][4][32];
    __shared__ float nrm[2][4];
    const int h = blockIdx.x, col = threadIdx.x & 31, sl = threadIdx.x >> 5;
    const int j = blockIdx.y * 32 + col;
    const bool act = j < dv;
    const int kh = h / (nv / nk);
    float pq = 0.f, pk = 0.f;
    for (int i = threadIdx.x; i < dk; i += blockDim.x) {
        const float a = QKV[(int64_t)kh * dk + i], b = QKV[(int64_t)nk * dk + (int64_t)kh * dk + i];
        sq[i] = a;
        sk[i] = b;
        pq += a * a;
        pk += b * b;
    }
    pq = warp_sum(pq);
    pk = warp_sum(pk);
    if (col == 0) {
        nrm[0][sl] = pq;
        nrm[1][sl] = pk;
    }
    __syncthreads();
    const float ssq = (nrm[0][0] + nrm[0][1]) + (nrm[0][2] + nrm[0][3]);
    const float ssk = (nrm[1][0] + nrm[1][1]) + (nrm[1][2] + nrm[1][3]);
    const float rq = rsqrtf(ssq + 1e-6f) * rsqrtf((float)dk), rk = rsqrtf(ssk + 1e-6f);
    const float beta = d_sigmoid(Bb[h]);
    const float decay = expf(-expf(A_log[h]) * d_softplus(Aa[h] + dt_bias[h]));
    float *Sh = S + (int64_t)h * dk * dv;
    const int i0 = sl * DKS;
    float st[DKS];
    float kv = 0.f;
#pragma unroll
    for (int r = 0; r < DKS; r++) {
        const int i = i0 + r;
        st[r] = (act && i < dk) ? Sh[(int64_t)i * dv + j] * decay : 0.f;
        if (i < dk) kv += st[r] * (sk[i] * rk);
    }
    part[0][sl][col] = kv;
    __syncthreads();
    kv = (part[0][0][col] + part[0][1][col]) + (part[0][2][col] + part[0][3][col]);
    const float v = act ? QKV[2 * (int64_t)nk * dk + (int64_t)h * dv + j] : 0.f;
    const float delta = (v - kv) * beta;
    float o = 0.f;
#pragma unroll
    for (int r = 0; r < DKS; r++) {
        const int i = i0 + r;
        if (i < dk) {
            st[r] += (sk[i] * rk) * delta;
            o += st[r] * (sq[i] * rq);
        }
    }
    part[1][sl][col] = o;
    __syncthreads();
    if (sl == 0 && act)
        O[(int64_t)h * dv + j] = (part[1][0][col] + part[1][1][col]) + (part[1][2][col] + part[1][3][col]);
#pragma unroll
    for (int r = 0; r < DKS; r++) {
        const int i = i0 + r;
        if (act && i < dk) Sh[(int64_t)i * dv + j] = st[r];
    }
}
