/* san_driver.c: a C-only exerciser of the pyflashmoe core for the sanitizer sweep
 * (tools/sanitize.sh builds it with -fsanitize=address,undefined and runs it with leak detection
 * on; no Python in the process, so every leak LSan reports is ours).
 *
 * What it runs:
 *  - kernels: every SIMD level this CPU supports against the scalar reference, on exactly sized
 *    heap buffers (an over-read of one element is an ASan error): quantize / dequantize / get_row,
 *    matvec rows, threaded matvec, matmul (1..9 vectors), bf16/f32 rows with every tail length,
 *    dot/axpy with every tail length;
 *  - the thread pool: many small jobs, odd sizes and grains, pools of 1..5 threads;
 *    (-DSAN_KERNELS_ONLY: only these two, linked with fm_quant*.c and fm_pool.c alone);
 *  - JSON: every prefix of each given manifest parsed from an exactly sized, unterminated buffer;
 *  - models: for each model dir given, open (several parameter sets), sessions, prefill, decode,
 *    all_logits, context overflow, a bad token, reset, close; the disk probe on its files.
 *
 * Usage: san_driver [model_dir ...]     exit status 0 when every check passed.
 *        san_driver --mutant dir ...     open/eval malformed dirs (tools/san_mutants.py): any
 *                                        fm_status is fine; sanitizer reports and crashes are not.
 * Numerical agreement is checked loosely (the Python tests own exactness); this is about memory.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fm_quant_impl.h"

static int g_fail = 0;
#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                   \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fprintf(stderr, "\n");                                                                 \
            g_fail++;                                                                              \
        }                                                                                          \
    } while (0)

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static float frand(void) { /* [-1, 1) */
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (float)((g_rng >> 40) & 0xffffff) / (float)(1 << 23) - 1.0f;
}

static void *xmalloc(size_t n) { /* exact size: ASan puts the redzone right after */
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

static float *rand_vec(int64_t n) {
    float *v = xmalloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) v[i] = frand();
    return v;
}

static int close_to(float a, float b, float scale) { return fabsf(a - b) <= 1e-3f * (scale + fabsf(b)) + 1e-4f; }

static const char *lv_name(int lv) {
    static const char *n[] = {"scalar", "avx2", "avx512", "neon"};
    return n[lv];
}

/* ------------------------------------------------------------------ kernels */

static void check_affine(int lv, int bits, int gs, int64_t rows, int64_t cols, fm_pool *pool) {
    const fm_kernels *ks = fm_kernels_for(FM_SIMD_SCALAR), *k = fm_kernels_for((fm_simd_level)lv);
    char err[256];
    const int64_t ng = cols / gs, rw = cols * bits / 32;
    float *w = rand_vec(rows * cols);
    uint32_t *q = xmalloc((size_t)(rows * rw) * 4);
    uint16_t *s = xmalloc((size_t)(rows * ng) * 2), *b = xmalloc((size_t)(rows * ng) * 2);
    CHECK(fm_quantize_affine(w, rows, cols, bits, gs, q, s, b, err, sizeof err) == FM_OK, "quantize: %s", err);
    fm_qmat W = {.dt = FM_DT_AFFINE, .bits = bits, .group_size = gs, .rows = rows, .cols = cols,
                 .q = q, .scales = s, .biases = b};
    /* dequantized reference and per-row scale for the tolerance */
    float *deq = xmalloc((size_t)(rows * cols) * sizeof(float));
    CHECK(fm_dequantize_affine(q, s, b, rows, cols, bits, gs, deq, err, sizeof err) == FM_OK, "dequantize: %s", err);
    float *row = xmalloc((size_t)cols * sizeof(float));
    for (int64_t r = 0; r < rows; r++) {
        fm_qmat_get_row_k(k, &W, r, row);
        CHECK(!memcmp(row, deq + r * cols, (size_t)cols * sizeof(float)), "%s get_row bits %d gs %d r %lld",
              lv_name(lv), bits, gs, (long long)r);
    }
    /* matvec: rows kernel, pool driver, reference = scalar */
    float *x = rand_vec(cols), *yref = xmalloc((size_t)rows * 4), *y = xmalloc((size_t)rows * 4);
    fm_qmat_matvec_rows_k(ks, &W, x, yref, 0, rows);
    fm_qmat_matvec_rows_k(k, &W, x, y, 0, rows);
    for (int64_t r = 0; r < rows; r++)
        CHECK(close_to(y[r], yref[r], (float)cols), "%s matvec_rows bits %d gs %d rows %lld cols %lld r %lld: %g vs %g",
              lv_name(lv), bits, gs, (long long)rows, (long long)cols, (long long)r, y[r], yref[r]);
    if (rows > 2) { /* a sub-range writes only its rows */
        for (int64_t r = 0; r < rows; r++) y[r] = -12345.f;
        fm_qmat_matvec_rows_k(k, &W, x, y, 1, rows - 1);
        CHECK(y[0] == -12345.f && y[rows - 1] == -12345.f, "%s matvec_rows wrote outside [1, rows-1)", lv_name(lv));
    }
    fm_qmat_matvec_k(k, pool, &W, x, y);
    for (int64_t r = 0; r < rows; r++)
        CHECK(close_to(y[r], yref[r], (float)cols), "%s matvec pool bits %d r %lld", lv_name(lv), bits, (long long)r);
    /* matmul with 2..9 vectors (tiles of 4 plus a remainder) */
    for (int64_t n = 2; n <= 9; n += (n < 5 ? 1 : 4)) {
        float *X = rand_vec(n * cols), *Y = xmalloc((size_t)(n * rows) * 4);
        fm_qmat_matmul_k(k, pool, &W, X, n, Y);
        for (int64_t v = 0; v < n; v++) {
            fm_qmat_matvec_rows_k(ks, &W, X + v * cols, yref, 0, rows);
            for (int64_t r = 0; r < rows; r++)
                CHECK(close_to(Y[v * rows + r], yref[r], (float)cols), "%s matmul bits %d gs %d n %lld v %lld r %lld",
                      lv_name(lv), bits, gs, (long long)n, (long long)v, (long long)r);
        }
        free(X);
        free(Y);
    }
    /* public entry (threads inside) */
    CHECK(fm_matvec_k(k, q, s, b, rows, cols, bits, gs, x, y, 3, err, sizeof err) == FM_OK, "fm_matvec_k: %s", err);
    free(w), free(q), free(s), free(b), free(deq), free(row), free(x), free(yref), free(y);
}

static void check_dense(int lv, int bf16, int64_t rows, int64_t cols, fm_pool *pool) {
    const fm_kernels *ks = fm_kernels_for(FM_SIMD_SCALAR), *k = fm_kernels_for((fm_simd_level)lv);
    float *wf = rand_vec(rows * cols);
    uint16_t *wb = xmalloc((size_t)(rows * cols) * 2);
    for (int64_t i = 0; i < rows * cols; i++) wb[i] = fm_f32_to_bf16(wf[i]);
    fm_qmat W = {.dt = bf16 ? FM_DT_BF16 : FM_DT_F32, .rows = rows, .cols = cols};
    W.data = bf16 ? (const void *)wb : (const void *)wf;
    float *x = rand_vec(cols), *yref = xmalloc((size_t)rows * 4), *y = xmalloc((size_t)rows * 4);
    fm_qmat_matvec_rows_k(ks, &W, x, yref, 0, rows);
    fm_qmat_matvec_rows_k(k, &W, x, y, 0, rows);
    for (int64_t r = 0; r < rows; r++)
        CHECK(close_to(y[r], yref[r], (float)cols), "%s %s rows cols %lld", lv_name(lv), bf16 ? "bf16" : "f32", (long long)cols);
    fm_qmat_matvec_k(k, pool, &W, x, y);
    float *row = xmalloc((size_t)cols * 4);
    fm_qmat_get_row_k(k, &W, rows - 1, row);
    for (int64_t n = 2; n <= 5; n++) {
        float *X = rand_vec(n * cols), *Y = xmalloc((size_t)(n * rows) * 4);
        fm_qmat_matmul_k(k, pool, &W, X, n, Y);
        for (int64_t v = 0; v < n; v++) {
            fm_qmat_matvec_rows_k(ks, &W, X + v * cols, yref, 0, rows);
            for (int64_t r = 0; r < rows; r++)
                CHECK(close_to(Y[v * rows + r], yref[r], (float)cols), "%s %s matmul cols %lld", lv_name(lv),
                      bf16 ? "bf16" : "f32", (long long)cols);
        }
        free(X);
        free(Y);
    }
    free(wf), free(wb), free(x), free(yref), free(y), free(row);
}

static void check_dot_axpy(int lv) {
    const fm_kernels *ks = fm_kernels_for(FM_SIMD_SCALAR), *k = fm_kernels_for((fm_simd_level)lv);
    for (int64_t n = 0; n <= 140; n++) {
        float *a = rand_vec(n), *b = rand_vec(n), *y1 = rand_vec(n), *y2 = xmalloc((size_t)n * 4 + 1);
        memcpy(y2, y1, (size_t)n * 4);
        CHECK(close_to(k->dot(a, b, n), ks->dot(a, b, n), (float)n), "%s dot n %lld", lv_name(lv), (long long)n);
        k->axpy(y1, 0.5f, a, n);
        ks->axpy(y2, 0.5f, a, n);
        for (int64_t i = 0; i < n; i++) CHECK(close_to(y1[i], y2[i], 1), "%s axpy n %lld", lv_name(lv), (long long)n);
        free(a), free(b), free(y1), free(y2);
    }
}

/* non-finite and extreme weights: quantize must not convert NaN/inf to an integer (UB) */
static void check_special_values(void) {
    char err[256];
    const int64_t cols = 64;
    const float vals[] = {NAN, INFINITY, -INFINITY, 3.4e38f, -3.4e38f, 1e-45f, -0.0f, 0.0f};
    float *w = xmalloc(sizeof(float) * 8 * cols);
    for (int r = 0; r < 8; r++)
        for (int64_t c = 0; c < cols; c++) w[r * cols + c] = (c % 3 == 0) ? vals[(r + c) % 8] : frand();
    for (int bits = 2; bits <= 8; bits++) {
        if (bits == 7) continue;
        uint32_t *q = xmalloc(sizeof(uint32_t) * 8 * (size_t)(cols * bits / 32));
        uint16_t *s = xmalloc(2 * 8 * 2), *b = xmalloc(2 * 8 * 2);
        float *out = xmalloc(sizeof(float) * 8 * cols);
        CHECK(fm_quantize_affine(w, 8, cols, bits, 32, q, s, b, err, sizeof err) == FM_OK, "quantize special: %s", err);
        CHECK(fm_dequantize_affine(q, s, b, 8, cols, bits, 32, out, err, sizeof err) == FM_OK, "dequantize special: %s", err);
        free(q), free(s), free(b), free(out);
    }
    free(w);
}

static void run_kernels(void) {
    check_special_values();
    static const int bitsv[] = {2, 3, 4, 5, 6, 8}, gsv[] = {32, 64, 128};
    static const int64_t rowsv[] = {1, 3, 70};
    fm_pool *pool = fm_pool_new(3);
    for (int lv = 0; lv < 4; lv++) {
        if (!fm_simd_level_supported(lv)) continue;
        fprintf(stderr, "san_driver: kernels at level %s\n", lv_name(lv));
        for (int bi = 0; bi < 6; bi++)
            for (int gi = 0; gi < 3; gi++)
                for (int ri = 0; ri < 3; ri++)
                    for (int64_t m = 1; m <= 19; m += 9) /* cols = gs, 10 gs, 19 gs (odd group counts) */
                        check_affine(lv, bitsv[bi], gsv[gi], rowsv[ri], gsv[gi] * m, pool);
        for (int64_t cols = 1; cols <= 70; cols++) {
            check_dense(lv, 1, cols < 8 ? 65 : 5, cols, pool);
            check_dense(lv, 0, cols < 8 ? 65 : 5, cols, pool);
        }
        check_dot_axpy(lv);
    }
    fm_pool_free(pool);
}

/* ------------------------------------------------------------------ pool */

typedef struct {
    int64_t n;
    unsigned char *hit;
} pool_ctx;

static void pool_job(void *ctx, int64_t s, int64_t e, int32_t tid) {
    pool_ctx *c = ctx;
    (void)tid;
    for (int64_t i = s; i < e; i++) c->hit[i]++;
}

static void run_pool(void) {
    fprintf(stderr, "san_driver: thread pool\n");
    for (int32_t nt = 0; nt <= 5; nt++) {
        fm_pool *p = fm_pool_new(nt);
        CHECK(p != NULL, "fm_pool_new(%d)", nt);
        if (!p) continue;
        for (int it = 0; it < 300; it++) {
            int64_t n = (it * 37) % 211, grain = 1 + it % 7;
            pool_ctx c = {n, xmalloc((size_t)n + 1)};
            memset(c.hit, 0, (size_t)n + 1);
            fm_pool_for(p, n, grain, pool_job, &c);
            for (int64_t i = 0; i < n; i++) CHECK(c.hit[i] == 1, "pool nt %d n %lld item %lld ran %d times", nt,
                                                  (long long)n, (long long)i, c.hit[i]);
            free(c.hit);
        }
        fm_pool_free(p);
    }
    fm_pool_free(NULL);
}

#ifndef SAN_KERNELS_ONLY /* -DSAN_KERNELS_ONLY: link with fm_quant*.c + fm_pool.c alone */
/* ------------------------------------------------------------------ JSON */

static void walk(const fm_json *v, int depth) {
    if (!v || depth > 64) return;
    (void)fm_json_num(v, 0);
    (void)fm_json_bool(v, 0);
    (void)fm_json_str(v);
    int32_t n = fm_json_len(v);
    for (int32_t i = 0; i < n; i++) {
        if (fm_json_kind(v) == FM_JSON_OBJ) {
            const char *key = fm_json_key_at(v, i);
            if (key) (void)fm_json_get(v, key);
        }
        walk(fm_json_at(v, i), depth + 1);
    }
}

static void run_json_text(const char *text, size_t len) {
    char err[256];
    /* every prefix, from an exactly sized buffer without a terminating NUL */
    size_t step = len > 4000 ? len / 2000 : 1;
    for (size_t n = 0; n <= len; n += (n + step > len && n != len) ? len - n : step) {
        char *buf = xmalloc(n);
        memcpy(buf, text, n);
        fm_json *j = fm_json_parse(buf, n, err, sizeof err);
        if (j) {
            walk(j, 0);
            fm_json_free(j);
        }
        free(buf);
        if (n == len) break;
    }
}

static void run_json(int nmodels, char **models) {
    fprintf(stderr, "san_driver: json\n");
    static const char *cases[] = {
        "{}", "[]", "null", "true", "false", "0", "-0.5e-3", "1e400", "\"\\u00e9\\ud83d\\ude00\"",
        "\"\\ud800\"", "\"\\u12\"", "[1,2,[3,[4,{\"a\":[]}]]]", "{\"a\":1,\"a\":2}", "{\"a\" 1}",
        "[1,]", "{,}", "\"\x01\"", "[\"a\\", "123abc", "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
        "{\"k\":\"v\",\"n\":{\"m\":[true,false,null,1.5,-2,\"s\"]}}", " \t\r\n{ } ", "\"\\/\\b\\f\\n\\r\\t\"",
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) run_json_text(cases[i], strlen(cases[i]));
    char *deep = xmalloc(200001); /* nesting depth: must fail cleanly, not overflow the stack */
    memset(deep, '[', 100000);
    memset(deep + 100000, ']', 100000);
    char err[256];
    fm_json *j = fm_json_parse(deep, 200000, err, sizeof err);
    fm_json_free(j);
    free(deep);
    for (int i = 0; i < nmodels; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/pyflashmoe.json", models[i]);
        FILE *f = fopen(path, "rb");
        if (!f) continue;
        fseek(f, 0, SEEK_END);
        long n = ftell(f);
        fseek(f, 0, SEEK_SET);
        char *t = xmalloc((size_t)n);
        if (fread(t, 1, (size_t)n, f) == (size_t)n) run_json_text(t, (size_t)n);
        fclose(f);
        free(t);
    }
}

/* ------------------------------------------------------------------ models */

static void run_model(const char *dir) {
    char err[512];
    fprintf(stderr, "san_driver: model %s\n", dir);
    fm_model_params variants[4];
    for (int i = 0; i < 4; i++) variants[i] = fm_model_default_params();
    variants[0].n_threads = 1;
    variants[1].n_threads = 3;
    variants[1].ram_budget = 1 << 20; /* a small LRU: hits and evictions */
    variants[1].io_threads = 2;
    variants[2].n_threads = 2;
    variants[2].direct_io = 1; /* tmpfs refuses O_DIRECT: the fallback path */
    variants[2].experts_per_token = 1;
    variants[3].n_threads = 2;
    variants[3].ram_budget = 64ull << 20;
    for (int vi = 0; vi < 4; vi++) {
        fm_model *m = NULL;
        fm_status st = fm_model_open(&m, dir, &variants[vi], err, sizeof err);
        CHECK(st == FM_OK, "open %s (variant %d): %s", dir, vi, err);
        if (st != FM_OK) continue;
        const int32_t vocab = fm_model_n_vocab(m), nl = fm_model_n_layers(m);
        (void)fm_model_hidden(m), (void)fm_model_dense_bytes(m);
        for (int32_t il = 0; il < nl; il++) (void)fm_model_expert_block_bytes(m, il);
        const int32_t n_ctx = 40;
        fm_session *s = NULL, *s2 = NULL;
        st = fm_session_new(&s, m, n_ctx, err, sizeof err);
        CHECK(st == FM_OK, "session_new: %s", err);
        st = fm_session_new(&s2, m, 8, err, sizeof err);
        CHECK(st == FM_OK, "session_new 2: %s", err);
        if (!s || !s2) {
            fm_session_free(s);
            fm_session_free(s2);
            fm_model_close(m);
            continue;
        }
        int32_t toks[40];
        for (int i = 0; i < 40; i++) toks[i] = 3 + (i * 131) % (vocab - 3);
        float *all = xmalloc((size_t)20 * (size_t)vocab * sizeof(float));
        float *last = xmalloc((size_t)vocab * sizeof(float));
        /* prefill with all logits, then decode one by one */
        st = fm_session_eval(s, toks, 20, all, (int64_t)20 * vocab, 1, err, sizeof err);
        CHECK(st == FM_OK, "eval prefill all_logits: %s", err);
        for (int i = 20; i < 30 && st == FM_OK; i++) {
            st = fm_session_eval(s, toks + i, 1, last, vocab, 0, err, sizeof err);
            CHECK(st == FM_OK, "eval decode %d: %s", i, err);
        }
        /* prefill without logits, then an uneven chunk */
        st = fm_session_eval(s, toks + 30, 7, NULL, 0, 0, err, sizeof err);
        CHECK(st == FM_OK, "eval NULL logits: %s", err);
        st = fm_session_eval(s, toks + 37, 3, last, vocab, 0, err, sizeof err);
        CHECK(st == FM_OK, "eval to n_ctx: %s", err);
        st = fm_session_eval(s, toks, 1, last, vocab, 0, err, sizeof err);
        CHECK(st == FM_ERR_CTX_FULL, "eval past n_ctx: %d", (int)st);
        fm_session_reset(s);
        int32_t bad[2] = {5, vocab};
        st = fm_session_eval(s, bad, 2, last, vocab, 0, err, sizeof err);
        CHECK(st == FM_ERR_ARG, "bad token: %d", (int)st);
        bad[1] = -1;
        st = fm_session_eval(s, bad, 2, last, vocab, 0, err, sizeof err);
        CHECK(st == FM_ERR_ARG, "negative token: %d", (int)st);
        st = fm_session_eval(s, toks, 2, last, vocab - 1, 0, err, sizeof err);
        CHECK(st == FM_ERR_ARG, "short logits buffer: %d", (int)st);
        st = fm_session_eval(s, toks, 9, all, (int64_t)9 * vocab, 1, err, sizeof err);
        CHECK(st == FM_OK, "eval after errors: %s", err);
        /* second session interleaved, overflowing its small context */
        st = fm_session_eval(s2, toks, 8, last, vocab, 0, err, sizeof err);
        CHECK(st == FM_OK, "session 2: %s", err);
        st = fm_session_eval(s2, toks, 1, last, vocab, 0, err, sizeof err);
        CHECK(st == FM_ERR_CTX_FULL, "session 2 overflow: %d", (int)st);
        fm_stats stats;
        fm_session_get_stats(s, &stats);
        fm_session_reset_stats(s);
        (void)fm_session_pos(s), (void)fm_session_n_ctx(s);
        free(all);
        free(last);
        fm_session_free(s);
        fm_session_free(s2);
        fm_model_close(m);
    }
    /* the disk probe: threads, buffered and O_DIRECT (tmpfs refuses it: an error, not a crash) */
    {
        char dpath[4096];
        double gbps = 0;
        snprintf(dpath, sizeof dpath, "%s/dense.safetensors", dir);
        CHECK(fm_io_probe(dpath, 4096, 16, 3, 0, &gbps, err, sizeof err) == FM_OK, "fm_io_probe: %s", err);
        (void)fm_io_probe(dpath, 4096, 16, 2, 1, &gbps, err, sizeof err);
        CHECK(fm_io_probe(dpath, 4095, 16, 2, 0, &gbps, err, sizeof err) == FM_ERR_ARG, "fm_io_probe bad block size");
    }
    /* error paths of open: missing dir, a file for a dir */
    fm_model *m = NULL;
    fm_model_params p = fm_model_default_params();
    CHECK(fm_model_open(&m, "/nonexistent/pyflashmoe-san", &p, err, sizeof err) != FM_OK, "open of a missing dir succeeded");
    fm_model_close(m);
    m = NULL;
    char path[4096];
    snprintf(path, sizeof path, "%s/pyflashmoe.json", dir);
    CHECK(fm_model_open(&m, path, &p, err, sizeof err) != FM_OK, "open of a file succeeded");
    fm_model_close(m);
}

/* a malformed model dir (tools/san_mutants.py): any status is fine, a sanitizer report is not */
static int run_mutant(const char *dir) {
    char err[512] = {0};
    fm_model_params p = fm_model_default_params();
    p.n_threads = 2;
    p.ram_budget = 1 << 20;
    fm_model *m = NULL;
    fm_status st = fm_model_open(&m, dir, &p, err, sizeof err);
    if (st != FM_OK) {
        if (m) fprintf(stderr, "FAIL: fm_model_open returned %d but set *out\n", (int)st), g_fail++;
        if (!memchr(err, 0, sizeof err) || !err[0]) fprintf(stderr, "FAIL: empty or unterminated message\n"), g_fail++;
        printf("open: %d %s\n", (int)st, err);
        return 0;
    }
    printf("open: OK\n");
    fm_session *s = NULL;
    if (fm_session_new(&s, m, 8, err, sizeof err) == FM_OK) {
        const int32_t vocab = fm_model_n_vocab(m);
        float *lg = xmalloc((size_t)3 * (size_t)vocab * sizeof(float));
        int32_t toks[3] = {1 % vocab, 7 % vocab, (vocab - 1)};
        st = fm_session_eval(s, toks, 3, lg, (int64_t)3 * vocab, 1, err, sizeof err);
        printf("eval 3: %d %s\n", (int)st, st ? err : "");
        st = fm_session_eval(s, toks, 1, lg, vocab, 0, err, sizeof err);
        printf("eval 1: %d %s\n", (int)st, st ? err : "");
        free(lg);
        fm_session_free(s);
    } else {
        printf("session: %s\n", err);
    }
    fm_model_close(m);
    return 0;
}

#endif /* SAN_KERNELS_ONLY */

int main(int argc, char **argv) {
#ifdef SAN_KERNELS_ONLY
    (void)argc, (void)argv;
    fprintf(stderr, "san_driver: kernels only; active SIMD level %s\n", fm_simd_name());
    run_pool();
    run_kernels();
#else
    if (argc > 1 && !strcmp(argv[1], "--mutant")) {
        for (int i = 2; i < argc; i++) run_mutant(argv[i]);
        return g_fail ? 1 : 0;
    }
    run_pool();
    run_kernels();
    run_json(argc - 1, argv + 1);
    for (int i = 1; i < argc; i++) run_model(argv[i]);
#endif
    fprintf(stderr, "san_driver: %s (%d failed checks)\n", g_fail ? "FAILED" : "ok", g_fail);
    return g_fail ? 1 : 0;
}
