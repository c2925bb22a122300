/* fm_cuda_mma.cuh: tensor-core matrix kernels for prefill (n > 1 tokens), included by fm_cuda_ops.cu
 * after fm_cuda_kernels.cuh.
 *
 * Owns: k_mma, one kernel body for (a) dense Y (+)= W X over n tokens, (b) a dense SwiGLU pair
 * H = silu(G X) * (U X), (c) the routed experts grouped by expert (a work list of items, one item =
 * one expert's pairs, up to 8*NT of them: the block reads its row tile of that expert once for
 * all of them), gate+up and down; k_mma_reduce, the fixed-order sum of split-K partials.
 * Does not own: launches, the work lists, the split-K workspace (fm_cuda_ops.cu).
 *
 * Numerics (fp32 activations; the engine's GPU-vs-CPU tolerance rules out plain bf16 activations):
 * mma.sync m16n8k16 bf16 x bf16 -> fp32 with
 *   A (weights, rows x cols): affine: the centred integer codes q - 2^(bits-1) (|.| <= 128, exact in
 *     bf16); bf16 weights: the raw values;
 *   B (activations, cols x tokens): x = hi + lo, hi = bf16(x), lo = bf16(x - hi): two MMAs into one
 *     fp32 accumulator, x carried to ~16 mantissa bits (relative error per product <= 2^-16).
 *   affine: per 32-column pack (inside one group, gs % 32 == 0) a fresh accumulator c = dot(q', x),
 *     total += s * c + b' * xsum with b' = b + s * 2^(bits-1) and xsum the fp32 sum of the pack's
 *     32 x values (the CPU's s*dot(q,x) + b*sum(x), regrouped; centring halves the rounding of the
 *     dot). Simulated in numpy: relative error ~2.5e-6 (norm) for 2..8 bits and bf16, against the
 *     kernel tests' 2e-5.
 *
 * Tiling: a block is 4 warps (128 threads) and 64 "virtual rows" (plain: 64 weight rows; SwiGLU:
 * 32 gate rows + the same 32 up rows) x 8*NT tokens; each warp owns 16 virtual rows and every
 * token of the block (NT m16n8 tiles). Columns go in stages of 64 (two packs) through shared
 * memory: weights dequantized to bf16 codes, x split into hi/lo bf16 plus the per-pack xsum; the
 * next stage's weights and x are loaded into registers while the current one is multiplied.
 * Fragments come from shared memory with ldmatrix (rows padded to 144 B: conflict-free).
 * Fragment layouts (PTX ISA, m16n8k16, g = lane>>2, t = lane&3): a0 (row g, k 2t..2t+1), a1 (row
 * g+8, k 2t..), a2 (row g, k 2t+8..), a3 (row g+8, k 2t+8..); b0 (k 2t..2t+1, col g), b1 (k
 * 2t+8.., col g); c0,c1 (row g, cols 2t,2t+1), c2,c3 (row g+8, cols 2t,2t+1).
 * Split-K (dense, when the tile grid would leave SMs idle): blockIdx.z takes a range of stages and
 * writes its partial tile to a workspace; k_mma_reduce sums the partials in z order (deterministic).
 */
#pragma once
#include <cuda_bf16.h>
#include "fm_cuda_kernels.cuh"

#define FMC_MMA_THREADS 128
#define FMC_MMA_ROWS 64 /* virtual rows per block */
#define FMC_MMA_LDS 72  /* shared row stride in bf16 elements (64 + 8 pad = 144 B) */

struct MmaArgs {
    /* dense: the matrix (SwiGLU: gate A, up B; same kind and shape) */
    DMat A, B;
    /* grouped experts (items != NULL): parts of the expert block at ptrs[pair] */
    DPart PA, PB;
    const uint8_t *const *ptrs;
    const int32_t *items; /* [2 * nitems]: first index into perm, count (<= 8*NT) */
    const int32_t *perm;  /* pair ids grouped by expert */
    int32_t in_div;       /* input row of pair p: p / in_div (gate/up: K; down: 1) */
    /* input rows X + row * ldx (fp32, 16-byte aligned, ldx % 4 == 0); output Y + row * ldy */
    const float *X;
    int64_t ldx;
    float *Y;
    int64_t ldy;
    int64_t n; /* dense: tokens */
    int32_t accumulate; /* FMC_Y_* (plain launches) */
    /* split-K (dense, gridDim.z > 1): partials at ws[(z * n + t) * R2 + r], R2 = rows (x2 SwiGLU:
     * gate at r, up at rows + r) */
    float *ws;
};

__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const uint16_t *p) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

/* two floats -> bf16 hi pair and bf16 lo pair (lower index in the low half) */
__device__ __forceinline__ void mma_split2(float x0, float x1, uint32_t &h, uint32_t &l) {
    __nv_bfloat162 hb = __floats2bfloat162_rn(x0, x1);
    const float2 hf = __bfloat1622float2(hb);
    __nv_bfloat162 lb = __floats2bfloat162_rn(x0 - hf.x, x1 - hf.y);
    h = *reinterpret_cast<uint32_t *>(&hb);
    l = *reinterpret_cast<uint32_t *>(&lb);
}

/* small exact integers (as floats) -> a bf16 pair: the top 16 bits of each float */
__device__ __forceinline__ uint32_t mma_pack_exact(float lo, float hi) {
    return __byte_perm(__float_as_uint(lo), __float_as_uint(hi), 0x7632);
}

/* registers of one thread's share of a stage of weights: virtual row tid>>1, pack tid&1 */
template <int KIND>
struct MmaAReg {
    uint32_t w[KIND >= 2 ? KIND : 16]; /* affine: the pack's BITS words; bf16: 32 values */
    float s, b;
};

template <int KIND, int NT, int SWI>
__global__ void __launch_bounds__(FMC_MMA_THREADS) k_mma(MmaArgs a) {
    constexpr int NTOK = 8 * NT;
    constexpr int LDS = FMC_MMA_LDS;
    constexpr int UPT = NTOK * 8 / FMC_MMA_THREADS > 0 ? NTOK * 8 / FMC_MMA_THREADS : 1; /* x units (8 floats) per thread */
    __shared__ __align__(16) uint16_t sA[FMC_MMA_ROWS * LDS];
    __shared__ __align__(16) uint16_t sXh[NTOK * LDS];
    __shared__ __align__(16) uint16_t sXl[NTOK * LDS];
    __shared__ float sXs[NTOK][2];
    __shared__ float sSc[FMC_MMA_ROWS][2], sBi[FMC_MMA_ROWS][2];
    __shared__ int32_t sIn[NTOK], sOut[NTOK];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    DMat A, B;
    int cnt;
    if (a.items) {
        const int32_t first = a.items[2 * blockIdx.y];
        cnt = a.items[2 * blockIdx.y + 1];
        const uint8_t *base = a.ptrs[a.perm[first]];
        A = part_mat(a.PA, base);
        B = SWI ? part_mat(a.PB, base) : A;
        if (tid < NTOK) {
            const int32_t p = tid < cnt ? a.perm[first + tid] : -1;
            sIn[tid] = p >= 0 ? p / a.in_div : -1;
            sOut[tid] = p;
        }
    } else {
        A = a.A;
        B = SWI ? a.B : a.A;
        const int64_t t0 = (int64_t)blockIdx.y * NTOK;
        cnt = (int)(a.n - t0 < NTOK ? a.n - t0 : NTOK);
        if (tid < NTOK) sIn[tid] = sOut[tid] = tid < cnt ? (int32_t)(t0 + tid) : -1;
    }
    const int64_t rows = A.rows, cols = A.cols;
    const int64_t r0 = (int64_t)blockIdx.x * (SWI ? FMC_MMA_ROWS / 2 : FMC_MMA_ROWS);
    if (r0 >= rows) return; /* uniform over the block */
    const int64_t packs = cols >> 5, nst = (packs + 1) >> 1;
    const int ntl = (cnt + 7) >> 3; /* n-tiles holding tokens */
    /* split-K: this block's range of stages */
    const int64_t per = (nst + gridDim.z - 1) / gridDim.z;
    const int64_t s_beg = (int64_t)blockIdx.z * per;
    const int64_t s_end = s_beg + per < nst ? s_beg + per : nst;
    __syncthreads(); /* sIn / sOut */

    /* ---- this thread's weight row (loader) */
    const int lvr = tid >> 1, lpk = tid & 1;
    const bool lsel = SWI && lvr >= FMC_MMA_ROWS / 2;
    const int64_t lrow = r0 + (SWI ? (lvr & (FMC_MMA_ROWS / 2 - 1)) : lvr);
    const bool lok = lrow < rows;
    const void *lw = lsel ? B.w : A.w;
    const uint16_t *ls = lsel ? B.s : A.s;
    const uint16_t *lb = lsel ? B.b : A.b;
    const int64_t ng = KIND >= 2 ? cols / A.gs : 1;
    /* ---- this thread's x units: unit u = tid + 128 i: token u >> 3, 8 columns (u & 7) * 8 */
    const float *xrow[UPT];
#pragma unroll
    for (int i = 0; i < UPT; i++) {
        const int u = tid + FMC_MMA_THREADS * i;
        const int j = u >> 3;
        xrow[i] = (u < NTOK * 8 && j < cnt) ? a.X + (int64_t)sIn[j] * a.ldx + (u & 7) * 8 : nullptr;
    }

    MmaAReg<KIND> ar;
    float4 xr[UPT][2];
    auto load_stage = [&](int64_t st) {
        const int64_t P = st * 2 + lpk;
        const bool ok = lok && P < packs;
        if constexpr (KIND >= 2) {
            if (ok) {
                load_words<KIND>(reinterpret_cast<const uint32_t *>(lw) + lrow * (cols * KIND / 32) + P * KIND, ar.w);
                const int64_t g = (P * 32) / A.gs;
                ar.s = bf2f(__ldg(ls + lrow * ng + g));
                ar.b = bf2f(__ldg(lb + lrow * ng + g));
            } else {
#pragma unroll
                for (int i = 0; i < KIND; i++) ar.w[i] = 0u;
                ar.s = ar.b = 0.f;
            }
        } else {
            if (ok) {
                const uint4 *p = reinterpret_cast<const uint4 *>(reinterpret_cast<const uint16_t *>(lw) + lrow * cols + P * 32);
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const uint4 v = __ldg(p + i);
                    ar.w[4 * i] = v.x; ar.w[4 * i + 1] = v.y; ar.w[4 * i + 2] = v.z; ar.w[4 * i + 3] = v.w;
                }
            } else {
#pragma unroll
                for (int i = 0; i < 16; i++) ar.w[i] = 0u;
            }
        }
#pragma unroll
        for (int i = 0; i < UPT; i++) {
            const int u = tid + FMC_MMA_THREADS * i;
            const int64_t Pu = st * 2 + ((u & 7) >> 2);
            if (xrow[i] && Pu < packs) {
                const float4 *xp = reinterpret_cast<const float4 *>(xrow[i] + st * 64);
                xr[i][0] = __ldg(xp);
                xr[i][1] = __ldg(xp + 1);
            } else {
                xr[i][0] = xr[i][1] = make_float4(0.f, 0.f, 0.f, 0.f);
            }
        }
    };
    auto store_stage = [&]() {
        uint4 *dA = reinterpret_cast<uint4 *>(sA + lvr * LDS + lpk * 32);
        if constexpr (KIND >= 2) {
            constexpr float mid = (float)(1 << (KIND - 1));
            uint32_t pk[16];
#pragma unroll
            for (int i = 0; i < 16; i++)
                pk[i] = mma_pack_exact(getq<KIND>(ar.w, 2 * i) - mid, getq<KIND>(ar.w, 2 * i + 1) - mid);
#pragma unroll
            for (int i = 0; i < 4; i++) dA[i] = make_uint4(pk[4 * i], pk[4 * i + 1], pk[4 * i + 2], pk[4 * i + 3]);
            sSc[lvr][lpk] = ar.s;
            sBi[lvr][lpk] = ar.b + ar.s * mid;
        } else {
#pragma unroll
            for (int i = 0; i < 4; i++) dA[i] = make_uint4(ar.w[4 * i], ar.w[4 * i + 1], ar.w[4 * i + 2], ar.w[4 * i + 3]);
        }
#pragma unroll
        for (int i = 0; i < UPT; i++) {
            const int u = tid + FMC_MMA_THREADS * i;
            if (u < NTOK * 8) { /* uniform per warp (NTOK * 8 is a multiple of 32) */
                const int j = u >> 3, c8 = u & 7;
                const float4 p = xr[i][0], q = xr[i][1];
                uint32_t h0, h1, h2, h3, l0, l1, l2, l3;
                mma_split2(p.x, p.y, h0, l0);
                mma_split2(p.z, p.w, h1, l1);
                mma_split2(q.x, q.y, h2, l2);
                mma_split2(q.z, q.w, h3, l3);
                *reinterpret_cast<uint4 *>(sXh + j * LDS + c8 * 8) = make_uint4(h0, h1, h2, h3);
                *reinterpret_cast<uint4 *>(sXl + j * LDS + c8 * 8) = make_uint4(l0, l1, l2, l3);
                if constexpr (KIND >= 2) {
                    float xs = ((p.x + p.y) + (p.z + p.w)) + ((q.x + q.y) + (q.z + q.w));
                    xs += __shfl_xor_sync(0xffffffffu, xs, 1);
                    xs += __shfl_xor_sync(0xffffffffu, xs, 2);
                    if ((c8 & 3) == 0) sXs[j][c8 >> 2] = xs;
                }
            }
        }
    };

    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    const int g = lane >> 2, t = lane & 3;

    if (s_beg < s_end) load_stage(s_beg);
    for (int64_t st = s_beg; st < s_end; st++) {
        __syncthreads(); /* the previous stage's fragments are read */
        store_stage();
        if (st + 1 < s_end) load_stage(st + 1); /* in flight during this stage's MMAs */
        __syncthreads();
#pragma unroll
        for (int pk = 0; pk < 2; pk++) {
            if (st * 2 + pk >= packs) break;
            uint32_t a0[4], a1[4];
            const uint16_t *ab = sA + (warp * 16 + (lane & 15)) * LDS + pk * 32 + (lane >> 4) * 8;
            ldsm_x4(a0, ab);
            ldsm_x4(a1, ab + 16);
            float s0 = 0.f, s1 = 0.f, b0 = 0.f, b1 = 0.f;
            if constexpr (KIND >= 2) {
                s0 = sSc[warp * 16 + g][pk];
                s1 = sSc[warp * 16 + g + 8][pk];
                b0 = sBi[warp * 16 + g][pk];
                b1 = sBi[warp * 16 + g + 8][pk];
            }
#pragma unroll
            for (int j = 0; j < NT; j++) {
                if (j < ntl) {
                    uint32_t bh[4], bl[4];
                    const int xo = (j * 8 + (lane & 7)) * LDS + pk * 32 + (lane >> 3) * 8;
                    ldsm_x4(bh, sXh + xo);
                    ldsm_x4(bl, sXl + xo);
                    if constexpr (KIND >= 2) {
                        float c[4] = {0.f, 0.f, 0.f, 0.f};
                        mma_bf16_16816(c, a0, bh[0], bh[1]);
                        mma_bf16_16816(c, a0, bl[0], bl[1]);
                        mma_bf16_16816(c, a1, bh[2], bh[3]);
                        mma_bf16_16816(c, a1, bl[2], bl[3]);
                        const float x0 = sXs[j * 8 + 2 * t][pk], x1 = sXs[j * 8 + 2 * t + 1][pk];
                        acc[j][0] += s0 * c[0] + b0 * x0;
                        acc[j][1] += s0 * c[1] + b0 * x1;
                        acc[j][2] += s1 * c[2] + b1 * x0;
                        acc[j][3] += s1 * c[3] + b1 * x1;
                    } else {
                        mma_bf16_16816(acc[j], a0, bh[0], bh[1]);
                        mma_bf16_16816(acc[j], a0, bl[0], bl[1]);
                        mma_bf16_16816(acc[j], a1, bh[2], bh[3]);
                        mma_bf16_16816(acc[j], a1, bl[2], bl[3]);
                    }
                }
            }
        }
    }

    /* ---- epilogue: acc[j][e] is virtual row warp*16 + g (+8 for e >= 2), token j*8 + 2t + (e & 1) */
    if (gridDim.z > 1) { /* split-K partials (dense) */
        const int64_t R2 = SWI ? 2 * rows : rows;
        float *w = a.ws + (int64_t)blockIdx.z * a.n * R2;
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int vr = warp * 16 + g + (e >> 1) * 8, tk = j * 8 + 2 * t + (e & 1);
                const int64_t r = r0 + (SWI ? (vr & (FMC_MMA_ROWS / 2 - 1)) : vr);
                if (r < rows && tk < cnt)
                    w[(int64_t)sOut[tk] * R2 + ((SWI && vr >= FMC_MMA_ROWS / 2) ? rows : 0) + r] = acc[j][e];
            }
        return;
    }
    if constexpr (SWI) {
        /* up rows (warps 2, 3) hand their values to the gate rows (warps 0, 1) through shared memory */
        __syncthreads(); /* every warp is done with sXh */
        float *sU = reinterpret_cast<float *>(sXh); /* [NTOK][33] floats <= NTOK * LDS bf16 */
        if (warp >= 2) {
#pragma unroll
            for (int j = 0; j < NT; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int vr = warp * 16 + g + (e >> 1) * 8 - FMC_MMA_ROWS / 2, tk = j * 8 + 2 * t + (e & 1);
                    sU[tk * 33 + vr] = acc[j][e];
                }
        }
        __syncthreads();
        if (warp < 2) {
#pragma unroll
            for (int j = 0; j < NT; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int vr = warp * 16 + g + (e >> 1) * 8, tk = j * 8 + 2 * t + (e & 1);
                    const int64_t r = r0 + vr;
                    if (r < rows && tk < cnt)
                        a.Y[(int64_t)sOut[tk] * a.ldy + r] = d_silu(acc[j][e]) * sU[tk * 33 + vr];
                }
        }
    } else {
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int vr = warp * 16 + g + (e >> 1) * 8, tk = j * 8 + 2 * t + (e & 1);
                const int64_t r = r0 + vr;
                if (r < rows && tk < cnt) {
                    y_store(a.Y + (int64_t)sOut[tk] * a.ldy + r, acc[j][e], a.accumulate);
                }
            }
    }
}

/* split-K: Y[t*ldy + r] (+)= sum_z ws[z][t][r] (z ascending; accumulate: an FMC_Y_* mode);
 * SwiGLU: silu(sum gate) * sum up */
static __global__ void k_mma_reduce(const float *__restrict__ ws, int splits, int64_t n, int64_t rows, int swi,
                             float *__restrict__ Y, int64_t ldy, int accumulate) {
    const int64_t R2 = swi ? 2 * rows : rows, tot = n * rows;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < tot; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = i / rows, r = i - t * rows;
        float gs = 0.f, us = 0.f;
        for (int z = 0; z < splits; z++) {
            const float *w = ws + ((int64_t)z * n + t) * R2;
            gs += w[r];
            if (swi) us += w[rows + r];
        }
        const float v = swi ? d_silu(gs) * us : gs;
        y_store(Y + t * ldy + r, v, accumulate);
    }
}
