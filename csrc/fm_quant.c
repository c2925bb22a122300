/* fm_quant.c: group-affine quantization (MLX layout) and the matrix kernels; the numeric reference
 * for every backend.
 *
 * Owns: fm_quantize_affine / fm_dequantize_affine (bit-exact with mlx.core.quantize/dequantize),
 * the scalar reference kernels, run-time SIMD dispatch (the AVX2/AVX-512/NEON kernels live in
 * fm_quant_<isa>.c and fill a fm_kernels table), the threaded matvec / matmul drivers.
 * Does not own: the thread pool (fm_pool.c), model layout (fm_model.c).
 *
 * Numerics of the affine matvec: per group g of row r, y[r] += s*dot(q_g, x_g) + b*sum(x_g)
 * (exact rewrite of sum((s*q+b)*x)); every SIMD level does the same, only the float summation
 * order differs between levels.
 */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>

#include "fm_quant_impl.h"

/* ------------------------------------------------------------------ scalar kernels */

static float dot_scalar(const float *a, const float *b, int64_t n) {
    /* 4 partial sums: the same shape as the SIMD kernels, and faster than one chain */
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; i++) s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

static void axpy_scalar(float *y, float a, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

static void f32_rows_scalar(const fm_qmat *W, const float *x, const float *xsum, float *y,
                            int64_t r0, int64_t r1) {
    (void)xsum;
    const float *w = (const float *)W->data;
    for (int64_t r = r0; r < r1; r++) y[r] = dot_scalar(w + r * W->cols, x, W->cols);
}

static void bf16_rows_scalar(const fm_qmat *W, const float *x, const float *xsum, float *y,
                             int64_t r0, int64_t r1) {
    (void)xsum;
    const uint16_t *w = (const uint16_t *)W->data;
    const int64_t cols = W->cols;
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *row = w + r * cols;
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        int64_t c = 0;
        for (; c + 4 <= cols; c += 4) {
            s0 += fm_bf16_to_f32(row[c]) * x[c];
            s1 += fm_bf16_to_f32(row[c + 1]) * x[c + 1];
            s2 += fm_bf16_to_f32(row[c + 2]) * x[c + 2];
            s3 += fm_bf16_to_f32(row[c + 3]) * x[c + 3];
        }
        for (; c < cols; c++) s0 += fm_bf16_to_f32(row[c]) * x[c];
        y[r] = (s0 + s1) + (s2 + s3);
    }
}

static void affine_rows_scalar(const fm_qmat *W, const float *x, const float *xsum, float *y,
                               int64_t r0, int64_t r1) {
    const int32_t bits = W->bits, gs = W->group_size;
    const int64_t cols = W->cols, ng = cols / gs, rw = fm_affine_row_words(cols, bits);
    const int64_t gw = (int64_t)gs * bits / 32; /* words per group */
    uint8_t qv[128];
    for (int64_t r = r0; r < r1; r++) {
        const uint32_t *qr = W->q + r * rw;
        const uint16_t *sr = W->scales + r * ng, *br = W->biases + r * ng;
        float acc = 0;
        for (int64_t g = 0; g < ng; g++) {
            fm_unpack_bits(qr + g * gw, bits, gs, qv);
            const float *xg = x + g * gs;
            float d0 = 0, d1 = 0, d2 = 0, d3 = 0;
            for (int32_t i = 0; i < gs; i += 4) {
                d0 += (float)qv[i] * xg[i];
                d1 += (float)qv[i + 1] * xg[i + 1];
                d2 += (float)qv[i + 2] * xg[i + 2];
                d3 += (float)qv[i + 3] * xg[i + 3];
            }
            float xs;
            if (xsum) {
                xs = xsum[g];
            } else {
                xs = 0;
                for (int32_t i = 0; i < gs; i++) xs += xg[i];
            }
            acc += fm_bf16_to_f32(sr[g]) * ((d0 + d1) + (d2 + d3)) + fm_bf16_to_f32(br[g]) * xs;
        }
        y[r] = acc;
    }
}

/* ------------------------------------------------------------------ dispatch */

static fm_kernels g_tables[4];          /* written once under pthread_once, read-only after */
static fm_simd_level g_level;           /* idem */
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void affine_dequant_row(const fm_qmat *W, int64_t r, float *out);
static void affine_multi_scalar(const fm_qmat *W, const float *X, int64_t nv, const float *xsum,
                                float *Y, int64_t ldy, int64_t r0, int64_t r1);
static void bf16_multi_scalar(const fm_qmat *W, const float *X, int64_t nv, const float *xsum,
                              float *Y, int64_t ldy, int64_t r0, int64_t r1);
static void f32_multi_scalar(const fm_qmat *W, const float *X, int64_t nv, const float *xsum,
                             float *Y, int64_t ldy, int64_t r0, int64_t r1);

static void fill_scalar(fm_kernels *k) {
    memset(k, 0, sizeof *k);
    for (int b = 0; b <= 8; b++) {
        k->affine[b] = affine_rows_scalar;
        k->affine_row[b] = affine_dequant_row;
        k->affine_multi[b] = affine_multi_scalar;
    }
    k->bf16_multi = bf16_multi_scalar;
    k->f32_multi = f32_multi_scalar;
    k->bf16 = bf16_rows_scalar;
    k->f32 = f32_rows_scalar;
    k->dot = dot_scalar;
    k->axpy = axpy_scalar;
}

static fm_simd_level detect_level(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
#if defined(FM_HAVE_AVX512)
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
        return FM_SIMD_AVX512;
#endif
#if defined(FM_HAVE_AVX2)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return FM_SIMD_AVX2;
#endif
    return FM_SIMD_SCALAR;
#elif defined(__aarch64__) && defined(FM_HAVE_NEON)
    return FM_SIMD_NEON;
#else
    return FM_SIMD_SCALAR;
#endif
}

static void init_once(void) {
    for (int i = 0; i < 4; i++) fill_scalar(&g_tables[i]);
#if defined(FM_HAVE_AVX2)
    fm_kernels_fill_avx2(&g_tables[FM_SIMD_AVX2]);
#endif
#if defined(FM_HAVE_AVX512)
    fm_kernels_fill_avx2(&g_tables[FM_SIMD_AVX512]); /* AVX-512 tables fall back to AVX2 kernels */
    fm_kernels_fill_avx512(&g_tables[FM_SIMD_AVX512]);
#endif
#if defined(FM_HAVE_NEON)
    fm_kernels_fill_neon(&g_tables[FM_SIMD_NEON]);
#endif
    fm_simd_level lv = detect_level();
    const char *force = getenv("FM_SIMD");
    if (force) {
        fm_simd_level want = lv;
        if (!strcmp(force, "scalar")) want = FM_SIMD_SCALAR;
        else if (!strcmp(force, "avx2")) want = FM_SIMD_AVX2;
        else if (!strcmp(force, "avx512")) want = FM_SIMD_AVX512;
        else if (!strcmp(force, "neon")) want = FM_SIMD_NEON;
        /* only ever lower: a forced path the CPU cannot run is ignored */
        if (want == FM_SIMD_SCALAR) lv = want;
        else if (lv != FM_SIMD_NEON && want != FM_SIMD_NEON && want < lv) lv = want;
    }
    g_level = lv;
}

fm_simd_level fm_simd_level_active(void) {
    pthread_once(&g_once, init_once);
    return g_level;
}

const fm_kernels *fm_kernels_for(fm_simd_level lv) {
    pthread_once(&g_once, init_once);
    if ((int)lv < 0 || (int)lv > 3) lv = FM_SIMD_SCALAR;
    return &g_tables[lv];
}

static const char *level_name(fm_simd_level lv) {
    switch (lv) {
    case FM_SIMD_AVX512: return "avx512";
    case FM_SIMD_AVX2: return "avx2";
    case FM_SIMD_NEON: return "neon";
    default: return "scalar";
    }
}

const char *fm_simd_name(void) { return level_name(fm_simd_level_active()); }

int32_t fm_simd_level_supported(int32_t lv) {
    fm_simd_level best = detect_level();
    if (lv == FM_SIMD_SCALAR) return 1;
    if (best == FM_SIMD_NEON) return lv == FM_SIMD_NEON;
    return lv != FM_SIMD_NEON && lv <= (int32_t)best;
}

/* ------------------------------------------------------------------ matrix drivers */

static fm_rows_fn rows_fn(const fm_kernels *k, const fm_qmat *W) {
    switch (W->dt) {
    case FM_DT_F32: return k->f32;
    case FM_DT_BF16: return k->bf16;
    default: return k->affine[W->bits] ? k->affine[W->bits] : affine_rows_scalar;
    }
}

static void group_sums(const float *x, int64_t cols, int32_t gs, float *xsum) {
    for (int64_t g = 0; g < cols / gs; g++) {
        const float *xg = x + g * gs;
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (int32_t i = 0; i < gs; i += 4) {
            s0 += xg[i];
            s1 += xg[i + 1];
            s2 += xg[i + 2];
            s3 += xg[i + 3];
        }
        xsum[g] = (s0 + s1) + (s2 + s3);
    }
}

#define FM_XSUM_STACK 1024

void fm_qmat_matvec_rows_k(const fm_kernels *k, const fm_qmat *W, const float *x, float *y,
                           int64_t r0, int64_t r1) {
    if (r1 <= r0) return;
    if (W->dt != FM_DT_AFFINE) {
        rows_fn(k, W)(W, x, NULL, y, r0, r1);
        return;
    }
    const int64_t ng = W->cols / W->group_size;
    float stackbuf[FM_XSUM_STACK];
    float *xsum = ng <= FM_XSUM_STACK ? stackbuf : malloc((size_t)ng * sizeof(float));
    if (!xsum) { /* no memory: the scalar kernel sums x itself */
        affine_rows_scalar(W, x, NULL, y, r0, r1);
        return;
    }
    group_sums(x, W->cols, W->group_size, xsum);
    rows_fn(k, W)(W, x, xsum, y, r0, r1);
    if (xsum != stackbuf) free(xsum);
}

void fm_qmat_matvec_rows(const fm_qmat *W, const float *x, float *y, int64_t r0, int64_t r1) {
    fm_qmat_matvec_rows_k(fm_kernels_for(fm_simd_level_active()), W, x, y, r0, r1);
}

typedef struct {
    const fm_qmat *W;
    const float *x, *xsum;
    float *y;
    fm_rows_fn fn;
} matvec_ctx;

static void matvec_task(void *ctx, int64_t s, int64_t e, int32_t tid) {
    (void)tid;
    matvec_ctx *c = ctx;
    c->fn(c->W, c->x, c->xsum, c->y, s, e);
}

void fm_qmat_matvec_k(const fm_kernels *k, fm_pool *pool, const fm_qmat *W, const float *x, float *y) {
    if (W->rows <= 0) return;
    if (!pool || fm_pool_size(pool) <= 1 || W->rows < 64) {
        fm_qmat_matvec_rows_k(k, W, x, y, 0, W->rows);
        return;
    }
    float stackbuf[FM_XSUM_STACK];
    float *xsum = NULL;
    if (W->dt == FM_DT_AFFINE) {
        const int64_t ng = W->cols / W->group_size;
        xsum = ng <= FM_XSUM_STACK ? stackbuf : malloc((size_t)ng * sizeof(float));
        if (!xsum) {
            matvec_ctx c = {W, x, NULL, y, affine_rows_scalar};
            fm_pool_for(pool, W->rows, 16, matvec_task, &c);
            return;
        }
        group_sums(x, W->cols, W->group_size, xsum);
    }
    matvec_ctx c = {W, x, xsum, y, rows_fn(k, W)};
    /* rows per chunk: at least 16 KiB of weights so the pool overhead stays small */
    int64_t row_bytes = (int64_t)(fm_qmat_bytes(W) / (uint64_t)W->rows) + 1;
    int64_t grain = 16384 / row_bytes;
    if (grain < 4) grain = 4;
    fm_pool_for(pool, W->rows, grain, matvec_task, &c);
    if (xsum && xsum != stackbuf) free(xsum);
}

void fm_qmat_matvec(fm_pool *pool, const fm_qmat *W, const float *x, float *y) {
    fm_qmat_matvec_k(fm_kernels_for(fm_simd_level_active()), pool, W, x, y);
}

/* w[r, c] = s*q + b, computed as MLX does (see fm_dequantize_affine) */
static void affine_dequant_row(const fm_qmat *W, int64_t r, float *out) {
    const int32_t bits = W->bits, gs = W->group_size;
    const int64_t cols = W->cols, ng = cols / gs;
    const int64_t gw = (int64_t)gs * bits / 32;
    const uint32_t *qr = W->q + r * fm_affine_row_words(cols, bits);
    uint8_t qv[128];
    for (int64_t g = 0; g < ng; g++) {
        fm_unpack_bits(qr + g * gw, bits, gs, qv);
        const float s = fm_bf16_to_f32(W->scales[r * ng + g]);
        const float b = fm_bf16_to_f32(W->biases[r * ng + g]);
        float *o = out + g * gs;
        /* s (bf16, 8 significant bits) * q (<= 8 bits) is exact in float, so fused or not this is
         * one rounding, the same as mlx.core.dequantize with float32 scales/biases */
        for (int32_t i = 0; i < gs; i++) o[i] = s * (float)qv[i] + b;
    }
}

void fm_qmat_get_row_k(const fm_kernels *k, const fm_qmat *W, int64_t r, float *out) {
    switch (W->dt) {
    case FM_DT_F32:
        memcpy(out, (const float *)W->data + r * W->cols, (size_t)W->cols * sizeof(float));
        break;
    case FM_DT_BF16: {
        const uint16_t *row = (const uint16_t *)W->data + r * W->cols;
        for (int64_t c = 0; c < W->cols; c++) out[c] = fm_bf16_to_f32(row[c]);
        break;
    }
    default: k->affine_row[W->bits](W, r, out);
    }
}

void fm_qmat_get_row(const fm_qmat *W, int64_t r, float *out) {
    fm_qmat_get_row_k(fm_kernels_for(fm_simd_level_active()), W, r, out);
}

uint64_t fm_qmat_bytes(const fm_qmat *W) {
    const uint64_t n = (uint64_t)W->rows * (uint64_t)W->cols;
    switch (W->dt) {
    case FM_DT_F32: return n * 4;
    case FM_DT_BF16: return n * 2;
    default: return n * (uint64_t)W->bits / 8 + 2 * 2 * (n / (uint64_t)W->group_size);
    }
}

/* ---- matmul: Y[n, rows] = X[n, cols] W^T ----
 * Rows are split between threads in blocks of FM_MM_RB; inside a block, vectors go by tiles of
 * FM_MULTI_MAX and the multi kernel decodes each weight element once per tile. A block's weights
 * (a few KiB) stay in L1/L2 while the tiles pass, so each weight row is read from memory once. */

#define FM_MM_RB 16

static void affine_multi_scalar(const fm_qmat *W, const float *X, int64_t nv, const float *xsum,
                                float *Y, int64_t ldy, int64_t r0, int64_t r1) {
    const int64_t ng = W->cols / W->group_size;
    for (int64_t v = 0; v < nv; v++)
        affine_rows_scalar(W, X + v * W->cols, xsum ? xsum + v * ng : NULL, Y + v * ldy, r0, r1);
}
static void bf16_multi_scalar(const fm_qmat *W, const float *X, int64_t nv, const float *xsum,
                              float *Y, int64_t ldy, int64_t r0, int64_t r1) {
    for (int64_t v = 0; v < nv; v++) bf16_rows_scalar(W, X + v * W->cols, xsum, Y + v * ldy, r0, r1);
}
static void f32_multi_scalar(const fm_qmat *W, const float *X, int64_t nv, const float *xsum,
                             float *Y, int64_t ldy, int64_t r0, int64_t r1) {
    for (int64_t v = 0; v < nv; v++) f32_rows_scalar(W, X + v * W->cols, xsum, Y + v * ldy, r0, r1);
}

static fm_multi_fn multi_fn(const fm_kernels *k, const fm_qmat *W) {
    switch (W->dt) {
    case FM_DT_F32: return k->f32_multi;
    case FM_DT_BF16: return k->bf16_multi;
    default: return k->affine_multi[W->bits];
    }
}

typedef struct {
    const fm_qmat *W;
    const float *X, *xsum;
    int64_t n;
    float *Y;
    fm_multi_fn fn;
} matmul_ctx;

static void matmul_task(void *ctx, int64_t s, int64_t e, int32_t tid) {
    (void)tid;
    matmul_ctx *c = ctx;
    const fm_qmat *W = c->W;
    const int64_t cols = W->cols, rows = W->rows;
    const int64_t ng = W->dt == FM_DT_AFFINE ? cols / W->group_size : 0;
    for (int64_t r0 = s; r0 < e; r0 += FM_MM_RB) {
        const int64_t r1 = r0 + FM_MM_RB < e ? r0 + FM_MM_RB : e;
        for (int64_t v = 0; v < c->n; v += FM_MULTI_MAX) {
            const int64_t nv = c->n - v < FM_MULTI_MAX ? c->n - v : FM_MULTI_MAX;
            c->fn(W, c->X + v * cols, nv, c->xsum ? c->xsum + v * ng : NULL, c->Y + v * rows, rows,
                  r0, r1);
        }
    }
}

void fm_qmat_matmul_k(const fm_kernels *k, fm_pool *pool, const fm_qmat *W, const float *X,
                      int64_t n, float *Y) {
    if (n <= 0 || W->rows <= 0) return;
    if (n == 1) {
        fm_qmat_matvec_k(k, pool, W, X, Y);
        return;
    }
    float *xsum = NULL;
    fm_multi_fn fn = multi_fn(k, W);
    if (W->dt == FM_DT_AFFINE) {
        const int64_t ng = W->cols / W->group_size;
        xsum = malloc((size_t)(n * ng) * sizeof(float));
        if (!xsum) fn = affine_multi_scalar; /* no memory: the scalar kernel sums x itself */
        else
            for (int64_t v = 0; v < n; v++) group_sums(X + v * W->cols, W->cols, W->group_size, xsum + v * ng);
    }
    matmul_ctx c = {W, X, xsum, n, Y, fn};
    fm_pool_for(pool, W->rows, FM_MM_RB, matmul_task, &c);
    free(xsum);
}

void fm_qmat_matmul(fm_pool *pool, const fm_qmat *W, const float *X, int64_t n, float *Y) {
    fm_qmat_matmul_k(fm_kernels_for(fm_simd_level_active()), pool, W, X, n, Y);
}

float fm_dot_f32(const float *a, const float *b, int64_t n) {
    return fm_kernels_for(fm_simd_level_active())->dot(a, b, n);
}

void fm_axpy_f32(float *y, float a, const float *x, int64_t n) {
    fm_kernels_for(fm_simd_level_active())->axpy(y, a, x, n);
}

/* ------------------------------------------------------------------ quantization */

static fm_status check_affine(int64_t rows, int64_t cols, int32_t bits, int32_t group_size,
                              char *err, size_t errlen) {
    if (bits != 2 && bits != 3 && bits != 4 && bits != 5 && bits != 6 && bits != 8)
        return fm_errf(err, errlen, FM_ERR_ARG, "bits: %d is not one of 2, 3, 4, 5, 6, 8", bits);
    if (group_size != 32 && group_size != 64 && group_size != 128)
        return fm_errf(err, errlen, FM_ERR_ARG, "group_size: %d is not one of 32, 64, 128", group_size);
    if (rows < 0) return fm_errf(err, errlen, FM_ERR_ARG, "rows: %lld is negative", (long long)rows);
    if (cols <= 0 || cols % group_size)
        return fm_errf(err, errlen, FM_ERR_ARG, "cols: %lld is not a positive multiple of group_size %d",
                       (long long)cols, group_size);
    return FM_OK;
}

/* One group, exactly as MLX's CPU quantizer (mlx/backend/cpu/quantized.cpp) does it. */
static void quantize_group(const float *w, int32_t gs, int32_t bits, uint8_t *qv, float *scale_out,
                           float *bias_out) {
    const float n_bins = (float)((1 << bits) - 1);
    const float eps = 1e-7f;
    float w_min = INFINITY, w_max = -INFINITY;
    for (int32_t j = 0; j < gs; j++) {
        w_max = fmaxf(w_max, w[j]);
        w_min = fminf(w_min, w[j]);
    }
    const int mask = fabsf(w_min) > fabsf(w_max);
    float scale = fmaxf((w_max - w_min) / n_bins, eps);
    scale = mask ? scale : -scale;
    const float edge = mask ? w_min : w_max;
    const float q0 = rintf(edge / scale);
    float bias = 0;
    if (q0 != 0) {
        scale = edge / q0;
        bias = edge;
    }
    for (int32_t j = 0; j < gs; j++) {
        float v = rintf((w[j] - bias) / scale);
        v = fminf(fmaxf(v, 0.0f), n_bins);
        qv[j] = (uint8_t)v;
    }
    *scale_out = scale;
    *bias_out = bias;
}

static void pack_bits(const uint8_t *qv, int32_t bits, int64_t n, uint32_t *out) {
    /* continuous little-endian bit stream; n is a multiple of 32 so it fills whole words */
    uint64_t acc = 0;
    int have = 0;
    int64_t wi = 0;
    for (int64_t k = 0; k < n; k++) {
        acc |= (uint64_t)qv[k] << have;
        have += bits;
        if (have >= 32) {
            out[wi++] = (uint32_t)acc;
            acc >>= 32;
            have -= 32;
        }
    }
}

fm_status fm_quantize_affine(const float *w, int64_t rows, int64_t cols, int32_t bits,
                             int32_t group_size, uint32_t *q, uint16_t *scales, uint16_t *biases,
                             char *err, size_t errlen) {
    fm_status st = check_affine(rows, cols, bits, group_size, err, errlen);
    if (st != FM_OK) return st;
    if (rows && (!w || !q || !scales || !biases))
        return fm_errf(err, errlen, FM_ERR_ARG, "%s: NULL buffer",
                       !w ? "w" : !q ? "q" : !scales ? "scales" : "biases");
    const int64_t ng = cols / group_size, gw = (int64_t)group_size * bits / 32;
    const int64_t rw = fm_affine_row_words(cols, bits);
    uint8_t qv[128];
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t g = 0; g < ng; g++) {
            float s, b;
            quantize_group(w + r * cols + g * group_size, group_size, bits, qv, &s, &b);
            pack_bits(qv, bits, group_size, q + r * rw + g * gw);
            scales[r * ng + g] = fm_f32_to_bf16(s);
            biases[r * ng + g] = fm_f32_to_bf16(b);
        }
    }
    return FM_OK;
}

fm_status fm_dequantize_affine(const uint32_t *q, const uint16_t *scales, const uint16_t *biases,
                               int64_t rows, int64_t cols, int32_t bits, int32_t group_size,
                               float *out, char *err, size_t errlen) {
    fm_status st = check_affine(rows, cols, bits, group_size, err, errlen);
    if (st != FM_OK) return st;
    if (rows && (!out || !q || !scales || !biases))
        return fm_errf(err, errlen, FM_ERR_ARG, "%s: NULL buffer",
                       !out ? "out" : !q ? "q" : !scales ? "scales" : "biases");
    fm_qmat W = {.dt = FM_DT_AFFINE, .bits = bits, .group_size = group_size, .rows = rows,
                 .cols = cols, .q = q, .scales = scales, .biases = biases};
    const fm_kernels *k = fm_kernels_for(fm_simd_level_active());
    for (int64_t r = 0; r < rows; r++) k->affine_row[bits](&W, r, out + r * cols);
    return FM_OK;
}

fm_status fm_matvec_k(const fm_kernels *k, const void *q, const uint16_t *scales,
                      const uint16_t *biases, int64_t rows, int64_t cols, int32_t bits,
                      int32_t group_size, const float *x, float *y, int32_t n_threads, char *err,
                      size_t errlen) {
    fm_qmat W = {.rows = rows, .cols = cols};
    if (bits == 16 || bits == 32) {
        if (rows < 0 || cols <= 0)
            return fm_errf(err, errlen, FM_ERR_ARG, "%s: must be positive", rows < 0 ? "rows" : "cols");
        W.dt = bits == 16 ? FM_DT_BF16 : FM_DT_F32;
        W.data = q;
    } else {
        fm_status st = check_affine(rows, cols, bits, group_size, err, errlen);
        if (st != FM_OK) return st;
        if (rows && (!scales || !biases))
            return fm_errf(err, errlen, FM_ERR_ARG, "%s: NULL buffer", !scales ? "scales" : "biases");
        W.dt = FM_DT_AFFINE;
        W.bits = bits;
        W.group_size = group_size;
        W.q = q;
        W.scales = scales;
        W.biases = biases;
    }
    if (rows && (!q || !x || !y))
        return fm_errf(err, errlen, FM_ERR_ARG, "%s: NULL buffer", !q ? "q" : !x ? "x" : "y");
    fm_pool *pool = NULL;
    if (n_threads > 1) {
        pool = fm_pool_new(n_threads);
        if (!pool) return fm_errf(err, errlen, FM_ERR_OOM, "n_threads: cannot start %d threads", n_threads);
    }
    fm_qmat_matvec_k(k, pool, &W, x, y);
    fm_pool_free(pool);
    return FM_OK;
}

fm_status fm_matvec(const void *q, const uint16_t *scales, const uint16_t *biases, int64_t rows,
                    int64_t cols, int32_t bits, int32_t group_size, const float *x, float *y,
                    int32_t n_threads, char *err, size_t errlen) {
    return fm_matvec_k(fm_kernels_for(fm_simd_level_active()), q, scales, biases, rows, cols, bits,
                       group_size, x, y, n_threads, err, errlen);
}
