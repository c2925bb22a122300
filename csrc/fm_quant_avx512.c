/* fm_quant_avx512.c: AVX-512 (F/BW/VL) kernels, same structure as fm_quant_avx2.c with 16 lanes.
 *
 * Owns: dot/axpy, f32/bf16/affine matvec rows and the multi-vector (matmul) rows at 512 bits.
 * Does not own: dispatch, threading, the row dequantizer (the AVX2 one is used: the AVX-512 table
 * starts as a copy of the AVX2 table).
 *
 * Affine decode, 16 values at a time: a 32-value block is `bits` words, masked-loaded into one
 * register (nothing past the block is read); each lane picks its word with vpermd, shifts it, and
 * for widths that straddle words (3, 5, 6) ORs in the next word shifted left.
 */
#include "fm_quant_impl.h"

#if defined(FM_HAVE_AVX512)
#include <immintrin.h>

/* software prefetch distance (bytes ahead in the weight stream): one core cannot keep enough
 * misses in flight from the hardware prefetcher alone when a row ends every few KiB */
#define FM_PF_DIST 2048

#define FM_T __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#define FM_TI __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"), always_inline)) static inline

FM_TI __mmask16 tail_mask(int64_t n) { return (__mmask16)((1u << n) - 1u); } /* n < 16 */

FM_T static float dot_avx512(const float *a, const float *b, int64_t n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(),
           s3 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        for (int k = 0; k < 4; k++) _mm_prefetch((const char *)(a + i) + FM_PF_DIST + 64 * k, _MM_HINT_T0);
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), s2);
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), s3);
    }
    for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    if (i < n) {
        const __mmask16 m = tail_mask(n - i);
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

FM_T static void axpy_avx512(float *y, float a, const float *x, int64_t n) {
    const __m512 va = _mm512_set1_ps(a);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    if (i < n) {
        const __mmask16 m = tail_mask(n - i);
        _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, x + i),
                                                        _mm512_maskz_loadu_ps(m, y + i)));
    }
}

FM_T static void f32_rows_avx512(const fm_qmat *W, const float *x, const float *xsum, float *y,
                                 int64_t r0, int64_t r1) {
    (void)xsum;
    const float *w = (const float *)W->data;
    for (int64_t r = r0; r < r1; r++) y[r] = dot_avx512(w + r * W->cols, x, W->cols);
}

FM_TI __m512 bf16x16(const uint16_t *p) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
FM_TI __m512 bf16x16_mask(const uint16_t *p, __mmask16 m) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

FM_T static void bf16_rows_avx512(const fm_qmat *W, const float *x, const float *xsum, float *y,
                                  int64_t r0, int64_t r1) {
    (void)xsum;
    const int64_t cols = W->cols;
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *row = (const uint16_t *)W->data + r * cols;
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(),
               s3 = _mm512_setzero_ps();
        int64_t c = 0;
        for (; c + 64 <= cols; c += 64) {
            _mm_prefetch((const char *)(row + c) + FM_PF_DIST, _MM_HINT_T0);
            _mm_prefetch((const char *)(row + c) + FM_PF_DIST + 64, _MM_HINT_T0);
            s0 = _mm512_fmadd_ps(bf16x16(row + c), _mm512_loadu_ps(x + c), s0);
            s1 = _mm512_fmadd_ps(bf16x16(row + c + 16), _mm512_loadu_ps(x + c + 16), s1);
            s2 = _mm512_fmadd_ps(bf16x16(row + c + 32), _mm512_loadu_ps(x + c + 32), s2);
            s3 = _mm512_fmadd_ps(bf16x16(row + c + 48), _mm512_loadu_ps(x + c + 48), s3);
        }
        for (; c + 16 <= cols; c += 16) s0 = _mm512_fmadd_ps(bf16x16(row + c), _mm512_loadu_ps(x + c), s0);
        if (c < cols) {
            const __mmask16 m = tail_mask(cols - c);
            s1 = _mm512_fmadd_ps(bf16x16_mask(row + c, m), _mm512_maskz_loadu_ps(m, x + c), s1);
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
    }
}

FM_TI float bias_dot(const uint16_t *b, const float *xsum, int64_t ng) {
    __m512 s = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 16 <= ng; g += 16) s = _mm512_fmadd_ps(bf16x16(b + g), _mm512_loadu_ps(xsum + g), s);
    if (g < ng) {
        const __mmask16 m = tail_mask(ng - g);
        s = _mm512_fmadd_ps(bf16x16_mask(b + g, m), _mm512_maskz_loadu_ps(m, xsum + g), s);
    }
    return _mm512_reduce_add_ps(s);
}

FM_TI __m512i load_block(const uint32_t *blk, int bits) {
    if (bits == 8) return _mm512_setzero_si512(); /* unused */
    return _mm512_maskz_loadu_epi32((__mmask16)((1u << bits) - 1u), blk);
}

/* values [16*ci, 16*ci+16) of the 32-value block at blk (wv: its words) as int32 lanes */
FM_TI __m512i decode16(const uint32_t *blk, __m512i wv, int bits, int ci) {
    if (bits == 8) return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blk + 4 * ci)));
    const __m512i mask = _mm512_set1_epi32((1 << bits) - 1);
#define P(j) (bits * (16 * ci + (j)))
    const __m512i lo_idx = _mm512_setr_epi32(
        P(0) >> 5, P(1) >> 5, P(2) >> 5, P(3) >> 5, P(4) >> 5, P(5) >> 5, P(6) >> 5, P(7) >> 5,
        P(8) >> 5, P(9) >> 5, P(10) >> 5, P(11) >> 5, P(12) >> 5, P(13) >> 5, P(14) >> 5, P(15) >> 5);
    const __m512i sh = _mm512_setr_epi32(
        P(0) & 31, P(1) & 31, P(2) & 31, P(3) & 31, P(4) & 31, P(5) & 31, P(6) & 31, P(7) & 31,
        P(8) & 31, P(9) & 31, P(10) & 31, P(11) & 31, P(12) & 31, P(13) & 31, P(14) & 31, P(15) & 31);
#undef P
    __m512i v = _mm512_srlv_epi32(_mm512_permutexvar_epi32(lo_idx, wv), sh);
    if (32 % bits) { /* straddling widths: the next word's low bits (lanes past the block read 0) */
        __m512i hi = _mm512_permutexvar_epi32(_mm512_add_epi32(lo_idx, _mm512_set1_epi32(1)), wv);
        v = _mm512_or_si512(v, _mm512_sllv_epi32(hi, _mm512_sub_epi32(_mm512_set1_epi32(32), sh)));
    }
    return _mm512_and_si512(v, mask);
}

FM_TI void affine_rows_avx512(const fm_qmat *W, const float *x, const float *xsum, float *y,
                              int64_t r0, int64_t r1, const int bits) {
    const int32_t gs = W->group_size;
    const int64_t cols = W->cols, ng = cols / gs, rw = fm_affine_row_words(cols, bits);
    const int nb = gs / 32;
    for (int64_t r = r0; r < r1; r++) {
        const uint32_t *qr = W->q + r * rw;
        const uint16_t *sr = W->scales + r * ng;
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        for (int64_t g = 0; g < ng; g++) {
            __m512 d0 = _mm512_setzero_ps(), d1 = _mm512_setzero_ps();
            const float *xg = x + g * gs;
            const uint32_t *qg = qr + g * (int64_t)nb * bits;
            _mm_prefetch((const char *)qg + FM_PF_DIST, _MM_HINT_T0);
            if (nb * bits > 16) _mm_prefetch((const char *)qg + FM_PF_DIST + 64, _MM_HINT_T0);
            for (int b = 0; b < nb; b++) {
                const uint32_t *blk = qg + b * bits;
                const float *xb = xg + b * 32;
                __m512i wv = load_block(blk, bits);
                d0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(decode16(blk, wv, bits, 0)), _mm512_loadu_ps(xb), d0);
                d1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(decode16(blk, wv, bits, 1)), _mm512_loadu_ps(xb + 16), d1);
            }
            const __m512 s = _mm512_set1_ps(fm_bf16_to_f32(sr[g]));
            if (g & 1) acc1 = _mm512_fmadd_ps(s, _mm512_add_ps(d0, d1), acc1);
            else acc0 = _mm512_fmadd_ps(s, _mm512_add_ps(d0, d1), acc0);
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + bias_dot(W->biases + r * ng, xsum, ng);
    }
}

FM_TI void affine_multi_avx512(const fm_qmat *W, const float *X, const float *xsum, float *Y,
                               int64_t ldy, int64_t r0, int64_t r1, const int bits, const int NV) {
    const int32_t gs = W->group_size;
    const int64_t cols = W->cols, ng = cols / gs, rw = fm_affine_row_words(cols, bits);
    const int nb = gs / 32;
    for (int64_t r = r0; r < r1; r++) {
        const uint32_t *qr = W->q + r * rw;
        const uint16_t *sr = W->scales + r * ng;
        __m512 acc[4];
        for (int v = 0; v < NV; v++) acc[v] = _mm512_setzero_ps();
        for (int64_t g = 0; g < ng; g++) {
            __m512 d[4];
            for (int v = 0; v < NV; v++) d[v] = _mm512_setzero_ps();
            const uint32_t *qg = qr + g * (int64_t)nb * bits;
            for (int b = 0; b < nb; b++) {
                const uint32_t *blk = qg + b * bits;
                const float *xb = X + g * gs + b * 32;
                __m512i wv = load_block(blk, bits);
#pragma GCC unroll 2
                for (int ci = 0; ci < 2; ci++) {
                    __m512 qf = _mm512_cvtepi32_ps(decode16(blk, wv, bits, ci));
                    for (int v = 0; v < NV; v++)
                        d[v] = _mm512_fmadd_ps(qf, _mm512_loadu_ps(xb + v * cols + 16 * ci), d[v]);
                }
            }
            const __m512 s = _mm512_set1_ps(fm_bf16_to_f32(sr[g]));
            for (int v = 0; v < NV; v++) acc[v] = _mm512_fmadd_ps(s, d[v], acc[v]);
        }
        for (int v = 0; v < NV; v++)
            Y[v * ldy + r] = _mm512_reduce_add_ps(acc[v]) + bias_dot(W->biases + r * ng, xsum + v * ng, ng);
    }
}

#define FM_AFFINE_AVX512(B)                                                                        \
    FM_T static void affine_rows_avx512_##B(const fm_qmat *W, const float *x, const float *xsum,   \
                                            float *y, int64_t r0, int64_t r1) {                    \
        affine_rows_avx512(W, x, xsum, y, r0, r1, B);                                              \
    }                                                                                              \
    FM_T static void affine_multi_avx512_##B(const fm_qmat *W, const float *X, int64_t nv,        \
                                             const float *xsum, float *Y, int64_t ldy, int64_t r0, \
                                             int64_t r1) {                                         \
        switch (nv) {                                                                              \
        case 1: affine_multi_avx512(W, X, xsum, Y, ldy, r0, r1, B, 1); break;                      \
        case 2: affine_multi_avx512(W, X, xsum, Y, ldy, r0, r1, B, 2); break;                      \
        case 3: affine_multi_avx512(W, X, xsum, Y, ldy, r0, r1, B, 3); break;                      \
        default: affine_multi_avx512(W, X, xsum, Y, ldy, r0, r1, B, 4); break;                     \
        }                                                                                          \
    }
FM_AFFINE_AVX512(2)
FM_AFFINE_AVX512(3)
FM_AFFINE_AVX512(4)
FM_AFFINE_AVX512(5)
FM_AFFINE_AVX512(6)
FM_AFFINE_AVX512(8)

FM_TI void dense_multi_avx512(const fm_qmat *W, const float *X, float *Y, int64_t ldy, int64_t r0,
                              int64_t r1, const int is_bf16, const int NV) {
    const int64_t cols = W->cols;
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *rb = (const uint16_t *)W->data + r * cols;
        const float *rf = (const float *)W->data + r * cols;
        __m512 acc[4];
        for (int v = 0; v < NV; v++) acc[v] = _mm512_setzero_ps();
        int64_t c = 0;
        for (; c + 16 <= cols; c += 16) {
            __m512 w = is_bf16 ? bf16x16(rb + c) : _mm512_loadu_ps(rf + c);
            for (int v = 0; v < NV; v++) acc[v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(X + v * cols + c), acc[v]);
        }
        if (c < cols) {
            const __mmask16 m = tail_mask(cols - c);
            __m512 w = is_bf16 ? bf16x16_mask(rb + c, m) : _mm512_maskz_loadu_ps(m, rf + c);
            for (int v = 0; v < NV; v++)
                acc[v] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, X + v * cols + c), acc[v]);
        }
        for (int v = 0; v < NV; v++) Y[v * ldy + r] = _mm512_reduce_add_ps(acc[v]);
    }
}

#define FM_DENSE_MULTI_AVX512(NAME, ISBF)                                                          \
    FM_T static void NAME(const fm_qmat *W, const float *X, int64_t nv, const float *xsum,        \
                          float *Y, int64_t ldy, int64_t r0, int64_t r1) {                         \
        (void)xsum;                                                                                \
        switch (nv) {                                                                              \
        case 1: dense_multi_avx512(W, X, Y, ldy, r0, r1, ISBF, 1); break;                          \
        case 2: dense_multi_avx512(W, X, Y, ldy, r0, r1, ISBF, 2); break;                          \
        case 3: dense_multi_avx512(W, X, Y, ldy, r0, r1, ISBF, 3); break;                          \
        default: dense_multi_avx512(W, X, Y, ldy, r0, r1, ISBF, 4); break;                         \
        }                                                                                          \
    }
FM_DENSE_MULTI_AVX512(bf16_multi_avx512, 1)
FM_DENSE_MULTI_AVX512(f32_multi_avx512, 0)

void fm_kernels_fill_avx512(fm_kernels *k) {
#define SET(B)                                                                                     \
    k->affine[B] = affine_rows_avx512_##B;                                                         \
    k->affine_multi[B] = affine_multi_avx512_##B;
    SET(2) SET(3) SET(4) SET(5) SET(6) SET(8)
#undef SET
    k->bf16 = bf16_rows_avx512;
    k->f32 = f32_rows_avx512;
    k->bf16_multi = bf16_multi_avx512;
    k->f32_multi = f32_multi_avx512;
    k->dot = dot_avx512;
    k->axpy = axpy_avx512;
}

#endif /* FM_HAVE_AVX512 */
