/* fm_quant_impl.h: private to csrc/fm_quant*.c (the kernel files), never seen by other modules
 * except through fm.h / fm_internal.h.
 *
 * Owns: the kernel table each SIMD level fills in, the level enum and the shared scalar helpers
 * (bit-stream unpacking). Does not own: the public entry points (fm_quant.c).
 */
#ifndef FM_QUANT_IMPL_H
#define FM_QUANT_IMPL_H

#include "fm_internal.h"

/* which SIMD files are compiled in (each file is empty elsewhere) */
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#define FM_HAVE_AVX2 1
#define FM_HAVE_AVX512 1
#endif
/* FM_HAVE_NEON: no NEON file yet; arm64 runs the scalar kernels */

typedef enum { FM_SIMD_SCALAR = 0, FM_SIMD_AVX2 = 1, FM_SIMD_AVX512 = 2, FM_SIMD_NEON = 3 } fm_simd_level;

/* xsum[g] = sum of x over group g (AFFINE only; NULL for other dtypes or when the kernel must
 * compute it itself: only the scalar kernel accepts NULL). */
typedef void (*fm_rows_fn)(const fm_qmat *W, const float *x, const float *xsum, float *y,
                           int64_t r0, int64_t r1);
/* Y[v*ldy + r] = (W X_v)[r] for v < nv (1..FM_MULTI_MAX), r in [r0, r1); X_v = X + v*cols;
 * xsum + v*ng: the group sums of X_v (AFFINE). */
#define FM_MULTI_MAX 4
typedef void (*fm_multi_fn)(const fm_qmat *W, const float *X, int64_t nv, const float *xsum,
                            float *Y, int64_t ldy, int64_t r0, int64_t r1);
typedef void (*fm_row_fn)(const fm_qmat *W, int64_t r, float *out); /* one dequantized row */
typedef float (*fm_dot_fn)(const float *a, const float *b, int64_t n);
typedef void (*fm_axpy_fn)(float *y, float a, const float *x, int64_t n);

typedef struct {
    fm_rows_fn affine[9];    /* matvec rows, by bits */
    fm_row_fn affine_row[9]; /* dequantize one row, by bits (bit-exact at every level) */
    fm_multi_fn affine_multi[9]; /* matmul rows, by bits */
    fm_rows_fn bf16;
    fm_rows_fn f32;
    fm_multi_fn bf16_multi, f32_multi;
    fm_dot_fn dot;
    fm_axpy_fn axpy;
} fm_kernels;

/* the table of one level (levels not compiled in return the scalar table) */
const fm_kernels *fm_kernels_for(fm_simd_level lv);
/* the level in use: the best the CPU supports, lowered by FM_SIMD (read once per process) */
fm_simd_level fm_simd_level_active(void);

/* per-level tables (fm_quant_avx2.c, fm_quant_avx512.c, fm_quant_neon.c) */
void fm_kernels_fill_avx2(fm_kernels *k);
void fm_kernels_fill_avx512(fm_kernels *k);
void fm_kernels_fill_neon(fm_kernels *k);

/* the drivers with an explicit kernel table (tests force each level through these) */
void fm_qmat_matvec_rows_k(const fm_kernels *k, const fm_qmat *W, const float *x, float *y,
                           int64_t r0, int64_t r1);
void fm_qmat_matvec_k(const fm_kernels *k, fm_pool *pool, const fm_qmat *W, const float *x, float *y);
void fm_qmat_matmul_k(const fm_kernels *k, fm_pool *pool, const fm_qmat *W, const float *X,
                      int64_t n, float *Y);
void fm_qmat_get_row_k(const fm_kernels *k, const fm_qmat *W, int64_t r, float *out);
/* fm_matvec with an explicit table; bits 16: bf16, bits 32: f32 (tests only) */
fm_status fm_matvec_k(const fm_kernels *k, const void *q, const uint16_t *scales,
                      const uint16_t *biases, int64_t rows, int64_t cols, int32_t bits,
                      int32_t group_size, const float *x, float *y, int32_t n_threads, char *err,
                      size_t errlen);
/* 1 when this CPU (and build) can run level lv */
int32_t fm_simd_level_supported(int32_t lv);

/* a row of a quantized matrix */
static inline int64_t fm_affine_row_words(int64_t cols, int32_t bits) { return cols * bits / 32; }

/* Unpack n (multiple of 32) b-bit values of a little-endian bit stream starting at word p. */
static inline void fm_unpack_bits(const uint32_t *p, int32_t bits, int64_t n, uint8_t *out) {
    const uint32_t mask = (1u << bits) - 1u;
    if (32 % bits == 0) { /* 2, 4, 8: values never straddle words */
        const int per = 32 / bits;
        for (int64_t k = 0; k < n; k++) out[k] = (uint8_t)((p[k / per] >> ((k % per) * bits)) & mask);
        return;
    }
    for (int64_t blk = 0; blk < n; blk += 32) {
        /* 32 values take exactly `bits` words */
        uint64_t acc = 0;
        int have = 0;
        const uint32_t *w = p + (blk / 32) * bits;
        int wi = 0;
        for (int k = 0; k < 32; k++) {
            if (have < bits) {
                acc |= (uint64_t)w[wi++] << have;
                have += 32;
            }
            out[blk + k] = (uint8_t)(acc & mask);
            acc >>= bits;
            have -= bits;
        }
    }
}

#endif
