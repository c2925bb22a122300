/* fm_quant_avx2.c: AVX2/FMA kernels (x86-64 only; compiled for baseline x86-64, every function
 * carries target("avx2,fma") and runs only when fm_quant.c's dispatch saw the CPU support it).
 *
 * Owns: dot/axpy, the f32 and bf16 matvec rows, the affine matvec rows for every bit width.
 * Does not own: dispatch, threading, the scalar reference (fm_quant.c).
 *
 * Affine decode, 8 values at a time: a block of 32 values is `bits` words. For bits 2/4 one word
 * is broadcast and shifted per lane (vpsrlvd); for 8 the bytes are zero-extended; for 3/5/6 the
 * block's words are masked-loaded (no read past the block) and each lane takes its low word and the
 * next one (vpermd), shifted and OR-ed. Per group: acc += s * (q . x) as 8 lanes, the bias term
 * sum_g b_g * sum(x_g) is one dot over the groups at the end of the row.
 */
#include "fm_quant_impl.h"

#if defined(FM_HAVE_AVX2)
#include <immintrin.h>

/* software prefetch distance (bytes ahead in the weight stream): one core cannot keep enough
 * misses in flight from the hardware prefetcher alone when a row ends every few KiB */
#define FM_PF_DIST 2048

#define FM_T __attribute__((target("avx2,fma")))
#define FM_TI __attribute__((target("avx2,fma"), always_inline)) static inline

FM_TI float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

FM_T static float dot_avx2(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(),
           s3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        _mm_prefetch((const char *)(a + i) + FM_PF_DIST, _MM_HINT_T0);
        _mm_prefetch((const char *)(a + i) + FM_PF_DIST + 64, _MM_HINT_T0);
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float r = hsum8(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

FM_T static void axpy_avx2(float *y, float a, const float *x, int64_t n) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
        _mm256_storeu_ps(y + i + 8,
                         _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(y + i + 8)));
    }
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

FM_T static void f32_rows_avx2(const fm_qmat *W, const float *x, const float *xsum, float *y,
                               int64_t r0, int64_t r1) {
    (void)xsum;
    const float *w = (const float *)W->data;
    for (int64_t r = r0; r < r1; r++) y[r] = dot_avx2(w + r * W->cols, x, W->cols);
}

FM_TI __m256 bf16x8(const uint16_t *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

FM_T static void bf16_rows_avx2(const fm_qmat *W, const float *x, const float *xsum, float *y,
                                int64_t r0, int64_t r1) {
    (void)xsum;
    const int64_t cols = W->cols;
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *row = (const uint16_t *)W->data + r * cols;
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(),
               s3 = _mm256_setzero_ps();
        int64_t c = 0;
        for (; c + 32 <= cols; c += 32) {
            _mm_prefetch((const char *)(row + c) + FM_PF_DIST, _MM_HINT_T0);
            s0 = _mm256_fmadd_ps(bf16x8(row + c), _mm256_loadu_ps(x + c), s0);
            s1 = _mm256_fmadd_ps(bf16x8(row + c + 8), _mm256_loadu_ps(x + c + 8), s1);
            s2 = _mm256_fmadd_ps(bf16x8(row + c + 16), _mm256_loadu_ps(x + c + 16), s2);
            s3 = _mm256_fmadd_ps(bf16x8(row + c + 24), _mm256_loadu_ps(x + c + 24), s3);
        }
        for (; c + 8 <= cols; c += 8) s0 = _mm256_fmadd_ps(bf16x8(row + c), _mm256_loadu_ps(x + c), s0);
        float acc = hsum8(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
        for (; c < cols; c++) acc += fm_bf16_to_f32(row[c]) * x[c];
        y[r] = acc;
    }
}

/* sum_g bf16(b[g]) * xsum[g] */
FM_TI float bias_dot(const uint16_t *b, const float *xsum, int64_t ng) {
    __m256 s = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= ng; g += 8) s = _mm256_fmadd_ps(bf16x8(b + g), _mm256_loadu_ps(xsum + g), s);
    float r = hsum8(s);
    for (; g < ng; g++) r += fm_bf16_to_f32(b[g]) * xsum[g];
    return r;
}

/* the 8 values [8*ci, 8*ci+8) of a 32-value block starting at word pointer blk, as int32 lanes.
 * wv: the block's words (masked load), used by the generic path only. */
FM_TI __m256i decode8(const uint32_t *blk, __m256i wv, int bits, int ci) {
    const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
    if (bits == 8) {
        return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 2 * ci)));
    } else if (bits == 4) {
        const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)blk[ci]), sh), mask);
    } else if (bits == 2) {
        const int base = (ci & 1) * 16;
        const __m256i sh = _mm256_setr_epi32(base, base + 2, base + 4, base + 6, base + 8, base + 10,
                                             base + 12, base + 14);
        return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)blk[ci >> 1]), sh), mask);
    } else {
        /* lane j: bit p = bits*(8ci+j) of the block; value = (w[p>>5] >> (p&31)) | (w[(p>>5)+1] << (32-(p&31))) */
#define P(j) (bits * (8 * ci + (j)))
        const __m256i lo_idx = _mm256_setr_epi32(P(0) >> 5, P(1) >> 5, P(2) >> 5, P(3) >> 5, P(4) >> 5,
                                                 P(5) >> 5, P(6) >> 5, P(7) >> 5);
        const __m256i sh = _mm256_setr_epi32(P(0) & 31, P(1) & 31, P(2) & 31, P(3) & 31, P(4) & 31,
                                             P(5) & 31, P(6) & 31, P(7) & 31);
#undef P
        const __m256i one = _mm256_set1_epi32(1), k32 = _mm256_set1_epi32(32);
        __m256i lo = _mm256_permutevar8x32_epi32(wv, lo_idx);
        /* index 8 wraps to word 0: harmless, that lane's high part is shifted above `bits` */
        __m256i hi = _mm256_permutevar8x32_epi32(wv, _mm256_add_epi32(lo_idx, one));
        __m256i v = _mm256_or_si256(_mm256_srlv_epi32(lo, sh),
                                    _mm256_sllv_epi32(hi, _mm256_sub_epi32(k32, sh)));
        return _mm256_and_si256(v, mask);
    }
}

FM_TI __m256i load_block(const uint32_t *blk, int bits) {
    if (bits == 2 || bits == 4 || bits == 8) return _mm256_setzero_si256(); /* unused */
    /* only `bits` words belong to the block: masked lanes are not read (no fault past the end) */
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(bits), lane);
    return _mm256_maskload_epi32((const int *)blk, m);
}

FM_TI void affine_rows_avx2(const fm_qmat *W, const float *x, const float *xsum, float *y,
                            int64_t r0, int64_t r1, const int bits) {
    const int32_t gs = W->group_size;
    const int64_t cols = W->cols, ng = cols / gs, rw = fm_affine_row_words(cols, bits);
    const int nb = gs / 32; /* 32-value blocks per group */
    for (int64_t r = r0; r < r1; r++) {
        const uint32_t *qr = W->q + r * rw;
        const uint16_t *sr = W->scales + r * ng;
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (int64_t g = 0; g < ng; g++) {
            __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
            const float *xg = x + g * gs;
            const uint32_t *qg = qr + g * (int64_t)nb * bits;
            _mm_prefetch((const char *)qg + FM_PF_DIST, _MM_HINT_T0);
            if (nb * bits > 16) _mm_prefetch((const char *)qg + FM_PF_DIST + 64, _MM_HINT_T0);
            for (int b = 0; b < nb; b++) {
                const uint32_t *blk = qg + b * bits;
                const float *xb = xg + b * 32;
                __m256i wv = load_block(blk, bits);
                d0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(decode8(blk, wv, bits, 0)), _mm256_loadu_ps(xb), d0);
                d1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(decode8(blk, wv, bits, 1)), _mm256_loadu_ps(xb + 8), d1);
                d0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(decode8(blk, wv, bits, 2)), _mm256_loadu_ps(xb + 16), d0);
                d1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(decode8(blk, wv, bits, 3)), _mm256_loadu_ps(xb + 24), d1);
            }
            const __m256 s = _mm256_set1_ps(fm_bf16_to_f32(sr[g]));
            if (g & 1) acc1 = _mm256_fmadd_ps(s, _mm256_add_ps(d0, d1), acc1);
            else acc0 = _mm256_fmadd_ps(s, _mm256_add_ps(d0, d1), acc0);
        }
        y[r] = hsum8(_mm256_add_ps(acc0, acc1)) + bias_dot(W->biases + r * ng, xsum, ng);
    }
}

#define FM_AFFINE_AVX2(B)                                                                          \
    FM_T static void affine_rows_avx2_##B(const fm_qmat *W, const float *x, const float *xsum,     \
                                          float *y, int64_t r0, int64_t r1) {                      \
        affine_rows_avx2(W, x, xsum, y, r0, r1, B);                                                \
    }
FM_AFFINE_AVX2(2)
FM_AFFINE_AVX2(3)
FM_AFFINE_AVX2(4)
FM_AFFINE_AVX2(5)
FM_AFFINE_AVX2(6)
FM_AFFINE_AVX2(8)

/* one dequantized row (matmul, embeddings): s*q + b; s*q is exact so the fused form rounds the
 * same as the scalar reference (and mlx) */
FM_TI void affine_row_dequant_avx2(const fm_qmat *W, int64_t r, float *out, const int bits) {
    const int32_t gs = W->group_size;
    const int64_t cols = W->cols, ng = cols / gs;
    const int nb = gs / 32;
    const uint32_t *qr = W->q + r * fm_affine_row_words(cols, bits);
    for (int64_t g = 0; g < ng; g++) {
        const __m256 s = _mm256_set1_ps(fm_bf16_to_f32(W->scales[r * ng + g]));
        const __m256 bb = _mm256_set1_ps(fm_bf16_to_f32(W->biases[r * ng + g]));
        for (int b = 0; b < nb; b++) {
            const uint32_t *blk = qr + (g * nb + b) * bits;
            float *o = out + g * gs + b * 32;
            __m256i wv = load_block(blk, bits);
#pragma GCC unroll 4
            for (int ci = 0; ci < 4; ci++)
                _mm256_storeu_ps(o + 8 * ci, _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(decode8(blk, wv, bits, ci)), bb));
        }
    }
}

#define FM_DEQ_AVX2(B)                                                                             \
    FM_T static void affine_row_avx2_##B(const fm_qmat *W, int64_t r, float *out) {               \
        affine_row_dequant_avx2(W, r, out, B);                                                     \
    }
FM_DEQ_AVX2(2)
FM_DEQ_AVX2(3)
FM_DEQ_AVX2(4)
FM_DEQ_AVX2(5)
FM_DEQ_AVX2(6)
FM_DEQ_AVX2(8)


/* ---- several vectors at once (matmul): the weights are decoded once for NV <= 4 vectors ---- */

FM_TI void affine_multi_avx2(const fm_qmat *W, const float *X, int64_t nvec, const float *xsum,
                             float *Y, int64_t ldy, int64_t r0, int64_t r1, const int bits,
                             const int NV) {
    (void)nvec;
    const int32_t gs = W->group_size;
    const int64_t cols = W->cols, ng = cols / gs, rw = fm_affine_row_words(cols, bits);
    const int nb = gs / 32;
    for (int64_t r = r0; r < r1; r++) {
        const uint32_t *qr = W->q + r * rw;
        const uint16_t *sr = W->scales + r * ng;
        __m256 acc[4];
        for (int v = 0; v < NV; v++) acc[v] = _mm256_setzero_ps();
        for (int64_t g = 0; g < ng; g++) {
            __m256 d[4];
            for (int v = 0; v < NV; v++) d[v] = _mm256_setzero_ps();
            const uint32_t *qg = qr + g * (int64_t)nb * bits;
            for (int b = 0; b < nb; b++) {
                const uint32_t *blk = qg + b * bits;
                const float *xb = X + g * gs + b * 32;
                __m256i wv = load_block(blk, bits);
#pragma GCC unroll 4
                for (int ci = 0; ci < 4; ci++) {
                    __m256 qf = _mm256_cvtepi32_ps(decode8(blk, wv, bits, ci));
                    for (int v = 0; v < NV; v++)
                        d[v] = _mm256_fmadd_ps(qf, _mm256_loadu_ps(xb + v * cols + 8 * ci), d[v]);
                }
            }
            const __m256 s = _mm256_set1_ps(fm_bf16_to_f32(sr[g]));
            for (int v = 0; v < NV; v++) acc[v] = _mm256_fmadd_ps(s, d[v], acc[v]);
        }
        for (int v = 0; v < NV; v++)
            Y[v * ldy + r] = hsum8(acc[v]) + bias_dot(W->biases + r * ng, xsum + v * ng, ng);
    }
}

#define FM_AFFINE_MULTI_AVX2(B)                                                                    \
    FM_T static void affine_multi_avx2_##B(const fm_qmat *W, const float *X, int64_t nv,          \
                                           const float *xsum, float *Y, int64_t ldy, int64_t r0,  \
                                           int64_t r1) {                                           \
        switch (nv) {                                                                              \
        case 1: affine_multi_avx2(W, X, nv, xsum, Y, ldy, r0, r1, B, 1); break;                    \
        case 2: affine_multi_avx2(W, X, nv, xsum, Y, ldy, r0, r1, B, 2); break;                    \
        case 3: affine_multi_avx2(W, X, nv, xsum, Y, ldy, r0, r1, B, 3); break;                    \
        default: affine_multi_avx2(W, X, nv, xsum, Y, ldy, r0, r1, B, 4); break;                   \
        }                                                                                          \
    }
FM_AFFINE_MULTI_AVX2(2)
FM_AFFINE_MULTI_AVX2(3)
FM_AFFINE_MULTI_AVX2(4)
FM_AFFINE_MULTI_AVX2(5)
FM_AFFINE_MULTI_AVX2(6)
FM_AFFINE_MULTI_AVX2(8)

FM_TI void dense_multi_avx2(const fm_qmat *W, const float *X, float *Y, int64_t ldy, int64_t r0,
                            int64_t r1, const int is_bf16, const int NV) {
    const int64_t cols = W->cols;
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *rb = (const uint16_t *)W->data + r * cols;
        const float *rf = (const float *)W->data + r * cols;
        __m256 acc[4];
        for (int v = 0; v < NV; v++) acc[v] = _mm256_setzero_ps();
        int64_t c = 0;
        for (; c + 8 <= cols; c += 8) {
            __m256 w = is_bf16 ? bf16x8(rb + c) : _mm256_loadu_ps(rf + c);
            for (int v = 0; v < NV; v++) acc[v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(X + v * cols + c), acc[v]);
        }
        for (int v = 0; v < NV; v++) {
            float t = hsum8(acc[v]);
            for (int64_t cc = c; cc < cols; cc++)
                t += (is_bf16 ? fm_bf16_to_f32(rb[cc]) : rf[cc]) * X[v * cols + cc];
            Y[v * ldy + r] = t;
        }
    }
}

#define FM_DENSE_MULTI_AVX2(NAME, ISBF)                                                            \
    FM_T static void NAME(const fm_qmat *W, const float *X, int64_t nv, const float *xsum,        \
                          float *Y, int64_t ldy, int64_t r0, int64_t r1) {                         \
        (void)xsum;                                                                                \
        switch (nv) {                                                                              \
        case 1: dense_multi_avx2(W, X, Y, ldy, r0, r1, ISBF, 1); break;                            \
        case 2: dense_multi_avx2(W, X, Y, ldy, r0, r1, ISBF, 2); break;                            \
        case 3: dense_multi_avx2(W, X, Y, ldy, r0, r1, ISBF, 3); break;                            \
        default: dense_multi_avx2(W, X, Y, ldy, r0, r1, ISBF, 4); break;                           \
        }                                                                                          \
    }
FM_DENSE_MULTI_AVX2(bf16_multi_avx2, 1)
FM_DENSE_MULTI_AVX2(f32_multi_avx2, 0)

void fm_kernels_fill_avx2(fm_kernels *k) {
    k->affine_multi[2] = affine_multi_avx2_2;
    k->affine_multi[3] = affine_multi_avx2_3;
    k->affine_multi[4] = affine_multi_avx2_4;
    k->affine_multi[5] = affine_multi_avx2_5;
    k->affine_multi[6] = affine_multi_avx2_6;
    k->affine_multi[8] = affine_multi_avx2_8;
    k->bf16_multi = bf16_multi_avx2;
    k->f32_multi = f32_multi_avx2;
    k->affine[2] = affine_rows_avx2_2;
    k->affine[3] = affine_rows_avx2_3;
    k->affine[4] = affine_rows_avx2_4;
    k->affine[5] = affine_rows_avx2_5;
    k->affine[6] = affine_rows_avx2_6;
    k->affine[8] = affine_rows_avx2_8;
    k->affine_row[2] = affine_row_avx2_2;
    k->affine_row[3] = affine_row_avx2_3;
    k->affine_row[4] = affine_row_avx2_4;
    k->affine_row[5] = affine_row_avx2_5;
    k->affine_row[6] = affine_row_avx2_6;
    k->affine_row[8] = affine_row_avx2_8;
    k->bf16 = bf16_rows_avx2;
    k->f32 = f32_rows_avx2;
    k->dot = dot_avx2;
    k->axpy = axpy_avx2;
}

#endif /* FM_HAVE_AVX2 */
