/* fm_cuda_gdn_chunk.cuh: GatedDeltaNet over many tokens (prefill) in chunks of FMC_GDN_C tokens
 * (included by fm_cuda_ops.cu only, after fm_cuda_kernels.cuh).
 *
 * Owns: k_gdn_chunk (the delta rule for all tokens of a chunk at once, un-normalized outputs) and
 * its dynamic shared memory size. The gated RMSNorm over each head's dv outputs is a second pass
 * (k_norm op 1, in place on O); fmc_launch_gdn in fm_cuda_ops.cu picks this or the sequential k_gdn.
 * Does not own: the sequential recurrence k_gdn (decode), launches (fm_cuda_ops.cu).
 *
 * Math (per value head h, key head kh = h / (nv/nk)); with q, k l2-normalized (q also * dk^-0.5),
 * g_t = -exp(A_log[h]) softplus(a_t + dt_bias[h]), beta_t = sigmoid(b_t), S0 the state at the
 * chunk start, G_t = sum_{s<=t in chunk} g_s, gamma_t = exp(G_t):
 *   S_t = gamma_t S0 + sum_{s<=t} exp(G_t - G_s) k_s Delta_s^T      (Delta_s the delta-rule update)
 *   (I + A) Delta = diag(beta) (V - diag(gamma) K S0),   A[t,s] = beta_t exp(G_t - G_s) k_t.k_s, s < t
 *   o_t = gamma_t S0^T q_t + sum_{s<=t} exp(G_t - G_s) (q_t.k_s) Delta_s
 *   S_end = gamma_last S0 + K^T diag(exp(G_last - G_t)) Delta
 * Everything but the RMSNorm is independent per value column j, so a block owns 32 columns of one
 * head: grid (nv, ceil(dv/32)), 256 threads = 8 warps, lane = column. The small CxC matrices
 * (k.k, q.k with decay) are recomputed by every block of a head (cheap next to the rest). The
 * forward substitution runs in one warp (thread = column). G is summed in double and the decay of
 * a pair is exp of the difference (never gamma_t / gamma_s): with |g| up to tens per token a
 * float sum over 64 tokens would lose ~1e-4 of the difference. g is clamped at -200 (expf of
 * anything below about -104 is 0 in float, so the sequential kernel is unchanged by this) so that
 * G stays finite and G_t - G_s is never inf - inf.
 * A partial chunk (tc < C tokens) is padded with zero q, k, v, g, beta: padded rows give Delta = 0,
 * no decay, and are never written.
 */
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#define FMC_GDN_C 64        /* tokens per chunk */
#define FMC_GDN_CP 68       /* row stride of the [.][C] tiles: float4-aligned, few bank conflicts */
#define FMC_GDN_THREADS 256 /* 8 warps x 32 value columns */

/* dynamic shared memory of k_gdn_chunk for key dim dk (bytes): see the layout in the kernel */
static inline size_t gdn_chunk_smem(int dk) {
    return sizeof(double) * FMC_GDN_C + sizeof(float) * (4 * FMC_GDN_C + 32 * (size_t)dk + 2 * (size_t)dk * FMC_GDN_CP +
                                                         2 * FMC_GDN_C * FMC_GDN_CP + 2 * FMC_GDN_C * 32);
}

/* QKV [n, 2*nk*dk + nv*dv] (after conv: q heads, k heads, v heads); A, B [n, nv] (raw a, b);
 * S [nv, dk, dv] updated in place; O [n, nv*dv] gets the un-normalized outputs o_t. dk <= DKMAX. */
template <int DKMAX>
__global__ void __launch_bounds__(FMC_GDN_THREADS)
    k_gdn_chunk(const float *__restrict__ QKV, const float *__restrict__ Aa, const float *__restrict__ Bb,
                const float *__restrict__ A_log, const float *__restrict__ dt_bias, float *__restrict__ S,
                float *__restrict__ O, int64_t n, int nk, int nv, int dk, int dv) {
    constexpr int C = FMC_GDN_C, CP = FMC_GDN_CP;
    extern __shared__ __align__(16) unsigned char gdn_smem[];
    double *Gd = reinterpret_cast<double *>(gdn_smem); /* [C] G_t (double) */
    float *gam = reinterpret_cast<float *>(Gd + C);    /* [C] exp(G_t) */
    float *wdec = gam + C;                             /* [C] exp(G_last - G_t) */
    float *bet = wdec + C;                             /* [C] beta_t (0 for padding) */
    float *gg = bet + C;                               /* [C] g_t (0 for padding) */
    float *S0 = gg + C;                                /* [dk][32] state columns of this block */
    float *Qt = S0 + 32 * dk;                          /* [dk][CP] normalized q, transposed */
    float *Kt = Qt + CP * dk;                          /* [dk][CP] normalized k, transposed */
    float *Am = Kt + CP * dk;                          /* [C][CP] A[t][s] (s < t; 0 on/above the diagonal) */
    float *Pt = Am + CP * C;                           /* [C][CP] Pt[s][t] = P[t][s] (0 for s > t) */
    float *Rd = Pt + CP * C;                           /* [C][32] rhs, then Delta */
    float *Rw = Rd + 32 * C;                           /* [C][32] exp(G_last - G_t) Delta_t */

    const int h = blockIdx.x, tid = threadIdx.x, w = tid >> 5, l = tid & 31;
    const int j = blockIdx.y * 32 + l;
    const bool act = j < dv;
    const int kh = h / (nv / nk);
    const int64_t cd = 2 * (int64_t)nk * dk + (int64_t)nv * dv, vd = (int64_t)nv * dv;
    const int64_t qoff = (int64_t)kh * dk, koff = (int64_t)nk * dk + (int64_t)kh * dk,
                  voff = 2 * (int64_t)nk * dk + (int64_t)h * dv + j;
    float *Sh = S + (int64_t)h * dk * dv;
    for (int d = w; d < dk; d += 8) S0[d * 32 + l] = act ? Sh[(int64_t)d * dv + j] : 0.f;
    const float Aneg = -expf(A_log[h]), dtb = dt_bias[h], qs = rsqrtf((float)dk);

    /* this thread's 4x4 tile (bt, bs), bs <= bt, of the lower triangle of the CxC matrices */
    int bt = -1, bs = 0;
    if (tid < (C / 4) * (C / 4 + 1) / 2) {
        int r = tid;
        bt = 0;
        while (r >= bt + 1) {
            r -= bt + 1;
            bt++;
        }
        bs = r;
    }
    /* this warp's tokens of a chunk: lo = 4w..4w+3 and hi = C-4-4w..C-1-4w (balanced triangles) */
    const int tlo = 4 * w, thi = C - 4 - 4 * w;

    for (int64_t t0 = 0; t0 < n; t0 += C) {
        const int tc = (int)(n - t0 < C ? n - t0 : C);
        /* 1. q, k rows of the chunk: l2norm, transpose into Qt / Kt (zero rows for padding); g, beta */
        for (int t = w; t < C; t += 8) {
            constexpr int NV = DKMAX / 32;
            float qv[NV], kv[NV], pq = 0.f, pk = 0.f;
            const float *row = QKV + (t0 + t) * cd;
#pragma unroll
            for (int i = 0; i < NV; i++) {
                const int d = l + 32 * i;
                const bool ok = t < tc && d < dk;
                qv[i] = ok ? row[qoff + d] : 0.f;
                kv[i] = ok ? row[koff + d] : 0.f;
                pq += qv[i] * qv[i];
                pk += kv[i] * kv[i];
            }
            pq = warp_sum(pq);
            pk = warp_sum(pk);
            const float rq = rsqrtf(pq + 1e-6f) * qs, rk = rsqrtf(pk + 1e-6f);
#pragma unroll
            for (int i = 0; i < NV; i++) {
                const int d = l + 32 * i;
                if (d < dk) {
                    Qt[d * CP + t] = qv[i] * rq;
                    Kt[d * CP + t] = kv[i] * rk;
                }
            }
        }
        if (tid < C) {
            float g = 0.f, be = 0.f;
            if (tid < tc) {
                const int64_t ti = (t0 + tid) * nv + h;
                g = fmaxf(Aneg * d_softplus(Aa[ti] + dtb), -200.f);
                be = d_sigmoid(Bb[ti]);
            }
            gg[tid] = g;
            bet[tid] = be;
        }
        __syncthreads();

        /* 2. G = cumulative sum of g over the chunk (double; lane l owns tokens 2l, 2l+1) */
        if (w == 0) {
            const double g0 = gg[2 * l], g1 = gg[2 * l + 1];
            double x = g0 + g1;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const double y = __shfl_up_sync(0xffffffffu, x, o);
                if (l >= o) x += y;
            }
            double ex = __shfl_up_sync(0xffffffffu, x, 1);
            if (l == 0) ex = 0.0;
            const double G0 = ex + g0, G1 = x, Gl = __shfl_sync(0xffffffffu, x, 31);
            Gd[2 * l] = G0;
            Gd[2 * l + 1] = G1;
            gam[2 * l] = expf((float)G0);
            gam[2 * l + 1] = expf((float)G1);
            wdec[2 * l] = expf((float)(Gl - G0));
            wdec[2 * l + 1] = expf((float)(Gl - G1));
        }
        __syncthreads();

        /* 3a. q.S0, k.S0 for this warp's 8 tokens and column j; rhs = beta (v - gamma k.S0) */
        float qS[8], kS[8];
#pragma unroll
        for (int u = 0; u < 8; u++) qS[u] = kS[u] = 0.f;
        for (int d = 0; d < dk; d++) {
            const float s0 = S0[d * 32 + l];
            const float4 qa = *reinterpret_cast<const float4 *>(Qt + d * CP + tlo);
            const float4 qb = *reinterpret_cast<const float4 *>(Qt + d * CP + thi);
            const float4 ka = *reinterpret_cast<const float4 *>(Kt + d * CP + tlo);
            const float4 kb = *reinterpret_cast<const float4 *>(Kt + d * CP + thi);
            qS[0] += qa.x * s0, qS[1] += qa.y * s0, qS[2] += qa.z * s0, qS[3] += qa.w * s0;
            qS[4] += qb.x * s0, qS[5] += qb.y * s0, qS[6] += qb.z * s0, qS[7] += qb.w * s0;
            kS[0] += ka.x * s0, kS[1] += ka.y * s0, kS[2] += ka.z * s0, kS[3] += ka.w * s0;
            kS[4] += kb.x * s0, kS[5] += kb.y * s0, kS[6] += kb.z * s0, kS[7] += kb.w * s0;
        }
#pragma unroll
        for (int u = 0; u < 8; u++) {
            const int t = u < 4 ? tlo + u : thi + u - 4;
            const float v = (t < tc && act) ? QKV[(t0 + t) * cd + voff] : 0.f;
            Rd[t * 32 + l] = bet[t] * (v - gam[t] * kS[u]);
        }

        /* 3b. the lower triangle of k.k and q.k, decayed: A (strictly lower, * beta_t) and P^T */
        if (bt >= 0 && 4 * bt < tc) {
            float kk[4][4], qk[4][4];
#pragma unroll
            for (int a = 0; a < 4; a++)
#pragma unroll
                for (int b = 0; b < 4; b++) kk[a][b] = qk[a][b] = 0.f;
            for (int d = 0; d < dk; d++) {
                const float4 k4 = *reinterpret_cast<const float4 *>(Kt + d * CP + 4 * bt);
                const float4 q4 = *reinterpret_cast<const float4 *>(Qt + d * CP + 4 * bt);
                const float4 s4 = *reinterpret_cast<const float4 *>(Kt + d * CP + 4 * bs);
                const float ka[4] = {k4.x, k4.y, k4.z, k4.w}, qa[4] = {q4.x, q4.y, q4.z, q4.w},
                            sa[4] = {s4.x, s4.y, s4.z, s4.w};
#pragma unroll
                for (int a = 0; a < 4; a++)
#pragma unroll
                    for (int b = 0; b < 4; b++) {
                        kk[a][b] += ka[a] * sa[b];
                        qk[a][b] += qa[a] * sa[b];
                    }
            }
#pragma unroll
            for (int a = 0; a < 4; a++)
#pragma unroll
                for (int b = 0; b < 4; b++) {
                    const int t = 4 * bt + a, s = 4 * bs + b;
                    const float e = s <= t ? expf((float)(Gd[t] - Gd[s])) : 0.f;
                    Am[t * CP + s] = s < t ? bet[t] * e * kk[a][b] : 0.f;
                    Pt[s * CP + t] = e * qk[a][b];
                }
        }
        __syncthreads();

        /* 4. forward substitution (I + A) Delta = rhs, one warp, thread = column; Delta in registers */
        if (w == 0) {
            float dl[C];
#pragma unroll
            for (int t = 0; t < C; t++) dl[t] = 0.f;
#pragma unroll
            for (int t = 0; t < C; t++) {
                float x = 0.f;
                if (t < tc) {
                    x = Rd[t * 32 + l];
                    /* groups of 4 with s4 < t; entries s >= t in the last group are 0 (dl too) */
#pragma unroll
                    for (int s4 = 0; s4 < t; s4 += 4) {
                        const float4 a4 = *reinterpret_cast<const float4 *>(Am + t * CP + s4);
                        x -= a4.x * dl[s4];
                        x -= a4.y * dl[s4 + 1];
                        x -= a4.z * dl[s4 + 2];
                        x -= a4.w * dl[s4 + 3];
                    }
                }
                dl[t] = x;
                Rd[t * 32 + l] = x;
                Rw[t * 32 + l] = x * wdec[t];
            }
        }
        __syncthreads();

        /* 5a. o_t = gamma_t q_t.S0 + sum_{s<=t} P[t][s] Delta_s for this warp's tokens (un-normalized) */
        {
            float oa[4], ob[4];
#pragma unroll
            for (int u = 0; u < 4; u++) {
                oa[u] = gam[tlo + u] * qS[u];
                ob[u] = gam[thi + u] * qS[4 + u];
            }
            const int ea = tlo + 4 < tc ? tlo + 4 : tc, eb = thi + 4 < tc ? thi + 4 : tc;
            for (int s = 0; s < ea; s++) {
                const float r = Rd[s * 32 + l];
                const float4 p = *reinterpret_cast<const float4 *>(Pt + s * CP + tlo);
                oa[0] += p.x * r, oa[1] += p.y * r, oa[2] += p.z * r, oa[3] += p.w * r;
            }
            for (int s = 0; s < eb; s++) {
                const float r = Rd[s * 32 + l];
                const float4 p = *reinterpret_cast<const float4 *>(Pt + s * CP + thi);
                ob[0] += p.x * r, ob[1] += p.y * r, ob[2] += p.z * r, ob[3] += p.w * r;
            }
            if (act) {
                float *Ob = O + t0 * vd + (int64_t)h * dv + j;
#pragma unroll
                for (int u = 0; u < 4; u++) {
                    if (tlo + u < tc) Ob[(tlo + u) * vd] = oa[u];
                    if (thi + u < tc) Ob[(thi + u) * vd] = ob[u];
                }
            }
        }

        /* 5b. S_end = gamma_last S0 + K^T diag(exp(G_last - G_t)) Delta; rows d = w + 8i of column j */
        {
            constexpr int NR = DKMAX / 8;
            const float gl = gam[C - 1]; /* padding has g = 0, so this is gamma of the last real token */
            float acc[NR];
#pragma unroll
            for (int i = 0; i < NR; i++) {
                const int d = w + 8 * i;
                acc[i] = d < dk ? gl * S0[d * 32 + l] : 0.f;
            }
            for (int t = 0; t < tc; t += 4) { /* rows tc.. of Kt and Rw are 0 */
                const float r0 = Rw[t * 32 + l], r1 = Rw[(t + 1) * 32 + l], r2 = Rw[(t + 2) * 32 + l],
                            r3 = Rw[(t + 3) * 32 + l];
#pragma unroll
                for (int i = 0; i < NR; i++) {
                    const int d = w + 8 * i;
                    if (d < dk) {
                        const float4 k4 = *reinterpret_cast<const float4 *>(Kt + d * CP + t);
                        acc[i] += k4.x * r0 + k4.y * r1 + k4.z * r2 + k4.w * r3;
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < NR; i++) {
                const int d = w + 8 * i;
                if (d < dk) S0[d * 32 + l] = acc[i];
            }
        }
        __syncthreads();
    }
    for (int d = w; d < dk; d += 8)
        if (act) Sh[(int64_t)d * dv + j] = S0[d * 32 + l];
}
