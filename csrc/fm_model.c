/* fm_model.c: opening a model directory.
 *
 * Owns: fm_model_open/close and the accessors. Parses DIR/pyflashmoe.json (fm_json), builds the
 * layer table from "spec", reads dense.safetensors whole into private anonymous memory (read_dense:
 * nothing maps the file, so a later truncation cannot SIGBUS the process) and resolves every
 * canonical tensor to an fm_qmat or float vector through the manifest "tensors" table (absolute
 * offsets, each checked to lie inside the file, past its safetensors header and 64-byte aligned as
 * the converter writes them), reads the expert layout ("experts.layers[il].parts"), validates
 * sizes, shapes, dtypes, the format version and that manifest file paths stay inside the model
 * dir, then opens fm_io over the expert files and the compute pool.
 * Every count and dimension read from the spec is bounded (FM_MAX_*) before anything is sized from
 * it, so no size computation can overflow.
 * Does not own: the forward pass (fm_forward.c), reads (fm_io.c), kernels (fm_quant.c).
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fm_backend.h"
#include "fm_model.h"

#define MANIFEST "pyflashmoe.json"
#define DENSE "dense.safetensors"
#define FM_FORMAT_VERSION 1
/* bounds on the spec (far above any real model; they keep every size product inside 64 bits) */
#define FM_MAX_DIM (1 << 20)       /* hidden size, heads, head dims, intermediate sizes */
#define FM_MAX_VOCAB (1 << 24)
#define FM_MAX_LAYERS (1 << 16)
#define FM_MAX_EXPERTS (1 << 16)
#define FM_MAX_BLOCK ((uint64_t)1 << 40)  /* bytes of one expert block */
#define FM_MAX_FILE ((uint64_t)1 << 52)   /* bytes of a file offset */
#define FM_DENSE_ALIGN 64 /* every dense tensor's data starts at a multiple of 64 (format.py DENSE_ALIGN) */
#define FM_PART_ALIGN 64  /* and every part inside an expert block (format.py PART_ALIGN) */

typedef struct {
    fm_model *m;
    const fm_json *tensors;
    uint64_t data_start; /* first data byte of dense.safetensors (8 + its header length) */
    char *err;
    size_t errlen;
} fm_ld;

fm_model_params fm_model_default_params(void) {
    fm_model_params p;
    memset(&p, 0, sizeof p);
    p.backend = FM_BACKEND_CPU;
    p.verify_sizes = 1;
    p.prefetch = 1;
    p.lock_dense = 1;
    p.debug.cuda_graph = 1;
    p.debug.cuda_timing = 0;
    p.debug.cuda_mma = 1;
    p.debug.gdn_chunk = 4; /* timed on the H200 at 35B dims (bench/cuda_bench.py gdn): chunked/sequential
                              x0.98 at 2 tokens, x1.03 at 4, x1.20 at 16, x1.48 at 64 */
    p.debug.cpu_split = -1.0;
    return p;
}

/* FM_ERR_ARG naming the first field of d out of range */
static fm_status debug_check(const fm_debug_params *d, char *err, size_t errlen) {
    const struct {
        const char *name;
        int32_t v;
    } flags[] = {{"cuda_graph", d->cuda_graph}, {"cuda_timing", d->cuda_timing}, {"cuda_mma", d->cuda_mma}};
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++)
        if (flags[i].v != 0 && flags[i].v != 1)
            return fm_errf(err, errlen, FM_ERR_ARG, "debug.%s must be 0 or 1 (got %d)", flags[i].name, flags[i].v);
    if (d->gdn_chunk < 0)
        return fm_errf(err, errlen, FM_ERR_ARG,
                       "debug.gdn_chunk must be >= 0 (0: never chunked; n: chunked from n tokens; got %d)",
                       d->gdn_chunk);
    if (!(d->cpu_split < 0.0 || (d->cpu_split >= 0.0 && d->cpu_split <= 1.0)))
        return fm_errf(err, errlen, FM_ERR_ARG,
                       "debug.cpu_split must be < 0 (auto), 0 (off) or a fraction in (0, 1] (got %g)", d->cpu_split);
    return FM_OK;
}

fm_debug_params fm_model_debug(const fm_model *m) {
    if (!m) return fm_model_default_params().debug;
    return m->debug;
}

fm_status fm_model_set_debug(fm_model *m, const fm_debug_params *d, char *err, size_t errlen) {
    if (err && errlen) err[0] = 0;
    if (!m || !d) return fm_errf(err, errlen, FM_ERR_ARG, "fm_model_set_debug: %s is NULL", m ? "d" : "m");
    fm_status st = debug_check(d, err, errlen);
    if (st != FM_OK) return st;
    pthread_mutex_lock(&m->mu); /* held by every eval */
    m->debug = *d;
    pthread_mutex_unlock(&m->mu);
    return FM_OK;
}

static int own(fm_model *m, void *p) {
    if (!p) return 0;
    if (m->n_owned == m->cap_owned) {
        int32_t nc = m->cap_owned ? m->cap_owned * 2 : 64;
        void **no = realloc(m->owned, sizeof(void *) * (size_t)nc);
        if (!no) {
            free(p);
            return 0;
        }
        m->owned = no;
        m->cap_owned = nc;
    }
    m->owned[m->n_owned++] = p;
    return 1;
}

/* ---------------------------------------------------------------- json helpers */

static fm_status spec_int(const fm_json *spec, const char *key, int32_t *out, int32_t lo, int32_t hi, char *err,
                          size_t errlen) {
    const fm_json *v = fm_json_get(spec, key);
    if (!v || fm_json_kind(v) != FM_JSON_NUM)
        return fm_errf(err, errlen, FM_ERR_FORMAT, MANIFEST ": spec.%s is missing or not a number", key);
    double d = fm_json_num(v, 0);
    /* range first: casting an out-of-range double to an integer is undefined behaviour */
    if (!(d >= lo && d <= hi) || d != (double)(int64_t)d)
        return fm_errf(err, errlen, FM_ERR_FORMAT, MANIFEST ": spec.%s = %g is not an integer in [%d, %d]", key, d,
                       lo, hi);
    *out = (int32_t)d;
    return FM_OK;
}

static fm_status spec_num(const fm_json *spec, const char *key, double *out, char *err, size_t errlen) {
    const fm_json *v = fm_json_get(spec, key);
    if (!v || fm_json_kind(v) != FM_JSON_NUM)
        return fm_errf(err, errlen, FM_ERR_FORMAT, MANIFEST ": spec.%s is missing or not a number", key);
    double d = fm_json_num(v, 0);
    if (!(d >= -3.0e38 && d <= 3.0e38)) /* it is stored as a float: out of range is UB */
        return fm_errf(err, errlen, FM_ERR_FORMAT, MANIFEST ": spec.%s = %g is out of range", key, d);
    *out = d;
    return FM_OK;
}

static int json_u64(const fm_json *v, uint64_t *out) {
    if (!v || fm_json_kind(v) != FM_JSON_NUM) return 0;
    double d = fm_json_num(v, -1);
    if (!(d >= 0 && d <= 9.0e15) || d != (double)(uint64_t)d) return 0; /* range before the cast */
    *out = (uint64_t)d;
    return 1;
}

/* a small non-negative integer field, 0 when absent or out of [0, hi] (the caller rejects 0) */
static int32_t json_small_int(const fm_json *v, int32_t hi) {
    double d = fm_json_num(v, 0);
    return d >= 0 && d <= hi ? (int32_t)d : 0;
}

/* [offset, nbytes] pair */
static int json_span(const fm_json *v, uint64_t *off, uint64_t *nb) {
    if (!v || fm_json_kind(v) != FM_JSON_ARR || fm_json_len(v) != 2) return 0;
    return json_u64(fm_json_at(v, 0), off) && json_u64(fm_json_at(v, 1), nb);
}

static fm_dtype parse_dtype(const char *s, int *ok) {
    *ok = 1;
    if (s && !strcmp(s, "bf16")) return FM_DT_BF16;
    if (s && !strcmp(s, "f32")) return FM_DT_F32;
    if (s && !strcmp(s, "affine")) return FM_DT_AFFINE;
    *ok = 0;
    return FM_DT_F32;
}

static int valid_bits(int32_t b) { return b == 2 || b == 3 || b == 4 || b == 5 || b == 6 || b == 8; }
static int valid_gs(int32_t g) { return g == 32 || g == 64 || g == 128; }

/* shape of entry e as [rows, cols]; a 1-D shape gives rows=1 */
static int entry_shape(const fm_json *e, int64_t *dims, int32_t *nd) {
    const fm_json *sh = fm_json_get(e, "shape");
    if (!sh || fm_json_kind(sh) != FM_JSON_ARR || fm_json_len(sh) < 1 || fm_json_len(sh) > 4) return 0;
    *nd = fm_json_len(sh);
    for (int32_t i = 0; i < *nd; i++) {
        uint64_t d;
        if (!json_u64(fm_json_at(sh, i), &d)) return 0;
        dims[i] = (int64_t)d;
    }
    return 1;
}

/* ---------------------------------------------------------------- tensors */

static const fm_json *tensor_entry(fm_ld *ld, const char *name, fm_status *st) {
    const fm_json *e = fm_json_get(ld->tensors, name);
    if (!e || fm_json_kind(e) != FM_JSON_OBJ) {
        *st = fm_errf(ld->err, ld->errlen, FM_ERR_FORMAT, MANIFEST ": tensors[\"%s\"] is missing (needed by the spec)",
                      name);
        return NULL;
    }
    *st = FM_OK;
    return e;
}

/* pointer into the mmap at [off, off+nb), copied to an aligned buffer when misaligned */
static const void *map_span(fm_ld *ld, const char *name, const char *field, uint64_t off, uint64_t nb,
                            uint64_t want, size_t align, fm_status *st) {
    fm_model *m = ld->m;
    *st = FM_OK;
    if (nb != want) {
        *st = fm_errf(ld->err, ld->errlen, FM_ERR_FORMAT,
                      MANIFEST ": tensors[\"%s\"].%s has %llu bytes, its shape and dtype need %llu", name, field,
                      (unsigned long long)nb, (unsigned long long)want);
        return NULL;
    }
    if (off > m->map_len || nb > m->map_len - off) {
        *st = fm_errf(ld->err, ld->errlen, FM_ERR_FORMAT,
                      DENSE ": tensors[\"%s\"].%s [%llu, +%llu) lies beyond the end of the file (%llu bytes)", name,
                      field, (unsigned long long)off, (unsigned long long)nb, (unsigned long long)m->map_len);
        return NULL;
    }
    /* the converter puts every tensor's data past the safetensors header at a multiple of 64: an
     * offset that is not is a damaged manifest (it would read shifted, garbage weights) */
    if (off < ld->data_start || off % FM_DENSE_ALIGN) {
        *st = fm_errf(ld->err, ld->errlen, FM_ERR_FORMAT,
                      MANIFEST ": tensors[\"%s\"].%s offset %llu is %s (damaged manifest?)", name, field,
                      (unsigned long long)off,
                      off < ld->data_start ? "inside the safetensors header of " DENSE
                                           : "not a multiple of 64 as the converter writes it");
        return NULL;
    }
    const uint8_t *p = (const uint8_t *)m->map + off;
    if (((uintptr_t)p % align) == 0) return p;
    void *c = aligned_alloc(64, (nb + 63) / 64 * 64);
    if (!c || !own(m, c)) {
        *st = fm_errf(ld->err, ld->errlen, FM_ERR_OOM, "out of memory copying tensor %s", name);
        return NULL;
    }
    memcpy(c, p, nb);
    return c;
}

static fm_status get_mat(fm_ld *ld, const char *name, int64_t rows, int64_t cols, fm_qmat *out) {
    fm_status st;
    const fm_json *e = tensor_entry(ld, name, &st);
    if (!e) return st;
    int64_t dims[4];
    int32_t nd;
    if (!entry_shape(e, dims, &nd) || nd != 2)
        return fm_errf(ld->err, ld->errlen, FM_ERR_FORMAT, MANIFEST ": tensors[\"%s\"].shape is missing or not 2-D",
                       name);
    if (dims[0] != rows || dims[1] != cols)
        return fm_errf(ld->err, ld->errlen, FM_ERR_FORMAT,
                       MANIFEST ": tensors[\"%s\"].shape is [%lld, %lld], the spec needs [%lld, %lld]", name,
                       (long long)dims[0], (long long)dims[1], (long long)rows, (long long)cols);
    int ok;
    const char *ds = fm_json_str(fm_json_get(e, "dtype"));
    fm_dtype dt = parse_dtype(ds, &ok);
    if (!ok)
        return fm_errf(ld->err, ld->errlen, FM_ERR_FORMAT,
                       MANIFEST ": tensors[\"%s\"].dtype is \"%s\", expected bf16, f32 or affine", name, ds ? ds : "?");
    memset(out, 0, sizeof *out);
    out->dt = dt;
    out->rows = rows;
    out->cols = cols;
    if (dt == FM_DT_AFFINE) {
        int32_t bits = json_small_int(fm_json_get(e, "bits"), 64);
        int32_t gs = json_small_int(fm_json_get(e, "group_size"), 1 << 20);
        if (!valid_bits(bits) || !valid_gs(gs) || cols % gs != 0 || (cols * bits) % 32 != 0)
            return fm_errf(ld->err, ld->errlen, FM_ERR_FORMAT,
                           MANIFEST ": tensors[\"%s\"]: bits %d / group_size %d invalid for %lld columns", name, bits,
                           gs, (long long)cols);
        out->bits = bits;
        out->group_size = gs;
        const char *f[3] = {"q", "scales", "biases"};
        uint64_t want[3] = {(uint64_t)rows * (uint64_t)(cols * bits / 32) * 4u, (uint64_t)rows * (uint64_t)(cols / gs) * 2u,
                            (uint64_t)rows * (uint64_t)(cols / gs) * 2u};
        const void *p[3];
        for (int i = 0; i < 3; i++) {
            uint64_t off, nb;
            if (!json_span(fm_json_get(e, f[i]), &off, &nb))
                return fm_errf(ld->err, ld->errlen, FM_ERR_FORMAT,
                               MANIFEST ": tensors[\"%s\"].%s must be [offset, nbytes]", name, f[i]);
            p[i] = map_span(ld, name, f[i], off, nb, want[i], i == 0 ? 4 : 2, &st);
            if (!p[i]) return st;
        }
        out->q = p[0];
        out->scales = p[1];
        out->biases = p[2];
    } else {
        uint64_t off, nb;
        if (!json_u64(fm_json_get(e, "offset"), &off) || !json_u64(fm_json_get(e, "nbytes"), &nb))
            return fm_errf(ld->err, ld->errlen, FM_ERR_FORMAT,
                           MANIFEST ": tensors[\"%s\"].offset / .nbytes missing or invalid", name);
        size_t es = dt == FM_DT_BF16 ? 2 : 4;
        out->data = map_span(ld, name, "nbytes", off, nb, (uint64_t)rows * (uint64_t)cols * es, es, &st);
        if (!out->data) return st;
    }
    return FM_OK;
}

/* a float vector of n values (stored f32, or bf16); shape must have n elements and, if rows>0,
 * the 2-D shape [rows, n/rows] */
static fm_status get_vec(fm_ld *ld, const char *name, int64_t n, int64_t rows, const float **out) {
    fm_status st;
    const fm_json *e = tensor_entry(ld, name, &st);
    if (!e) return st;
    int64_t dims[4];
    int32_t nd;
    if (!entry_shape(e, dims, &nd))
        return fm_errf(ld->err, ld->errlen, FM_ERR_FORMAT, MANIFEST ": tensors[\"%s\"].shape is missing", name);
    int64_t cnt = 1;
    for (int32_t i = 0; i < nd; i++)
        if (__builtin_mul_overflow(cnt, dims[i], &cnt)) {
            cnt = -1; /* absurd: reported below */
            break;
        }
    if (cnt != n || (rows > 0 && (dims[0] != rows || dims[nd - 1] != n / rows)))
        return fm_errf(ld->err, ld->errlen, FM_ERR_FORMAT,
                       MANIFEST ": tensors[\"%s\"].shape has %lld elements (first dim %lld), the spec needs %lld", name,
                       (long long)cnt, (long long)dims[0], (long long)n);
    const char *ds = fm_json_str(fm_json_get(e, "dtype"));
    int ok;
    fm_dtype dt = parse_dtype(ds, &ok);
    if (!ok || dt == FM_DT_AFFINE)
        return fm_errf(ld->err, ld->errlen, FM_ERR_FORMAT, MANIFEST ": tensors[\"%s\"].dtype is \"%s\", expected f32",
                       name, ds ? ds : "?");
    uint64_t off, nb;
    if (!json_u64(fm_json_get(e, "offset"), &off) || !json_u64(fm_json_get(e, "nbytes"), &nb))
        return fm_errf(ld->err, ld->errlen, FM_ERR_FORMAT, MANIFEST ": tensors[\"%s\"].offset / .nbytes missing or invalid",
                       name);
    size_t es = dt == FM_DT_BF16 ? 2 : 4;
    const uint8_t *p = map_span(ld, name, "nbytes", off, nb, (uint64_t)n * es, 1, &st);
    if (!p) return st;
    float *v = aligned_alloc(64, ((size_t)n * 4 + 63) / 64 * 64);
    if (!v || !own(ld->m, v)) return fm_errf(ld->err, ld->errlen, FM_ERR_OOM, "out of memory copying tensor %s", name);
    if (dt == FM_DT_F32)
        memcpy(v, p, (size_t)n * 4);
    else
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            v[i] = fm_bf16_to_f32(h);
        }
    *out = v;
    return FM_OK;
}

/* ---------------------------------------------------------------- experts */

static fm_status get_part(fm_model *m, const fm_json *parts, const char *pname, int32_t il, uint64_t block_bytes,
                          int64_t rows, int64_t cols, fm_part *out, char *err, size_t errlen) {
    const fm_json *e = fm_json_get(parts, pname);
    if (!e || fm_json_kind(e) != FM_JSON_OBJ)
        return fm_errf(err, errlen, FM_ERR_FORMAT, MANIFEST ": experts.layers[\"%d\"].parts.%s is missing", il, pname);
    int64_t dims[4];
    int32_t nd;
    if (!entry_shape(e, dims, &nd) || nd != 2 || dims[0] != rows || dims[1] != cols)
        return fm_errf(err, errlen, FM_ERR_FORMAT,
                       MANIFEST ": experts.layers[\"%d\"].parts.%s.shape is not [%lld, %lld]", il, pname,
                       (long long)rows, (long long)cols);
    int ok;
    const char *ds = fm_json_str(fm_json_get(e, "dtype"));
    memset(out, 0, sizeof *out);
    out->dt = parse_dtype(ds, &ok);
    out->rows = rows;
    out->cols = cols;
    if (!ok)
        return fm_errf(err, errlen, FM_ERR_FORMAT,
                       MANIFEST ": experts.layers[\"%d\"].parts.%s.dtype is \"%s\", expected bf16, f32 or affine", il, pname,
                       ds ? ds : "?");
    if (out->dt == FM_DT_AFFINE) {
        int32_t bits = json_small_int(fm_json_get(e, "bits"), 64);
        int32_t gs = json_small_int(fm_json_get(e, "group_size"), 1 << 20);
        if (!valid_bits(bits) || !valid_gs(gs) || cols % gs != 0 || (cols * bits) % 32 != 0)
            return fm_errf(err, errlen, FM_ERR_FORMAT,
                           MANIFEST ": experts.layers[\"%d\"].parts.%s: bits %d / group_size %d invalid for %lld columns",
                           il, pname, bits, gs, (long long)cols);
        out->bits = bits;
        out->group_size = gs;
        const char *f[3] = {"q", "scales", "biases"};
        uint64_t want[3] = {(uint64_t)rows * (uint64_t)(cols * bits / 32) * 4u, (uint64_t)rows * (uint64_t)(cols / gs) * 2u,
                            (uint64_t)rows * (uint64_t)(cols / gs) * 2u};
        uint64_t *dst[3] = {&out->off_q, &out->off_s, &out->off_b};
        for (int i = 0; i < 3; i++) {
            uint64_t off, nb;
            if (!json_span(fm_json_get(e, f[i]), &off, &nb) || nb != want[i] || off > block_bytes ||
                nb > block_bytes - off || off % FM_PART_ALIGN != 0)
                return fm_errf(err, errlen, FM_ERR_FORMAT,
                               MANIFEST ": experts.layers[\"%d\"].parts.%s.%s must be [offset, %llu] inside the %llu-byte "
                               "block, 64-byte aligned",
                               il, pname, f[i], (unsigned long long)want[i], (unsigned long long)block_bytes);
            *dst[i] = off;
        }
    } else {
        size_t es = out->dt == FM_DT_BF16 ? 2 : 4;
        uint64_t want = (uint64_t)rows * (uint64_t)cols * es, off, nb;
        if (!json_span(fm_json_get(e, "data"), &off, &nb) || nb != want || off > block_bytes || nb > block_bytes - off ||
            off % FM_PART_ALIGN != 0)
            return fm_errf(err, errlen, FM_ERR_FORMAT,
                           MANIFEST ": experts.layers[\"%d\"].parts.%s.data must be [offset, %llu] inside the %llu-byte "
                           "block, 64-byte aligned",
                           il, pname, (unsigned long long)want, (unsigned long long)block_bytes);
        out->off_data = off;
    }
    /* optional bias: f32 [rows] inside the block */
    const fm_json *bv = fm_json_get(e, "bias");
    if (bv) {
        uint64_t want = (uint64_t)rows * 4u, off, nb;
        if (!json_span(bv, &off, &nb) || nb != want || off > block_bytes || nb > block_bytes - off ||
            off % FM_PART_ALIGN != 0)
            return fm_errf(err, errlen, FM_ERR_FORMAT,
                           MANIFEST ": experts.layers[\"%d\"].parts.%s.bias must be [offset, %llu] (f32 [%lld]) inside "
                           "the %llu-byte block, 64-byte aligned",
                           il, pname, (unsigned long long)want, (long long)rows, (unsigned long long)block_bytes);
        out->has_bias = 1;
        out->off_bias = off;
    }
    (void)m;
    return FM_OK;
}

/* ---------------------------------------------------------------- open */

/* one reader of read_dense: [a, b) of the file into p + a, 64 MiB per pread */
typedef struct {
    int fd;
    uint8_t *p;
    size_t a, b, got; /* got: bytes of [a, b) read; < b - a on failure */
    int err_no;       /* 0 with got < b - a: the file ended early */
} dense_part;

static void *dense_reader(void *arg) {
    dense_part *d = arg;
    const size_t chunk = (size_t)64 << 20;
    while (d->a + d->got < d->b) {
        size_t off = d->a + d->got, want = d->b - off < chunk ? d->b - off : chunk;
        ssize_t r = pread(d->fd, d->p + off, want, (off_t)off);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            d->err_no = r < 0 ? errno : 0;
            break;
        }
        d->got += (size_t)r;
    }
    return NULL;
}

/* The dense weights, read whole into private anonymous memory (m->map, page-aligned like the
 * mapping it replaces; read-only once filled). Nothing maps the file afterwards, so truncating or
 * rewriting dense.safetensors while a model is open cannot SIGBUS the process (a MAP_SHARED
 * mapping would fault on the next touch of a page past the new end). Up to 4 threads read
 * disjoint ranges (page faults and copies scale with cores). The file's page-cache copy is dropped
 * after the read (POSIX_FADV_DONTNEED) so the weights are not held in RAM twice; with lock_dense
 * they are mlock'ed so memory pressure cannot page them out. The caller (Engine) holds no GIL. */
static fm_status read_dense(fm_model *m, int fd, const char *path, size_t len, int lock, char *err, size_t errlen) {
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return fm_errf(err, errlen, FM_ERR_OOM, "%s: cannot allocate %llu bytes for the dense weights (%s)", path,
                       (unsigned long long)len, strerror(errno));
    m->map = p;
    m->map_len = len;
#ifdef POSIX_FADV_SEQUENTIAL
    posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
#endif
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    size_t nt = (len + ((size_t)256 << 20) - 1) / ((size_t)256 << 20); /* a thread per 256 MiB, */
    if (nt > 4) nt = 4;                                               /* at most 4, */
    if (ncpu > 0 && nt > (size_t)ncpu) nt = (size_t)ncpu;             /* at most the CPUs */
    if (nt < 1) nt = 1;
    dense_part parts[4];
    pthread_t th[4];
    int started[4] = {0, 0, 0, 0};
    size_t per = (len / nt + 4095) & ~(size_t)4095;
    for (size_t i = 0; i < nt; i++) {
        size_t a = i * per < len ? i * per : len, b = (i + 1) * per < len && i + 1 < nt ? (i + 1) * per : len;
        parts[i] = (dense_part){fd, p, a, b, 0, 0};
        if (i > 0) started[i] = pthread_create(&th[i], NULL, dense_reader, &parts[i]) == 0;
    }
    dense_reader(&parts[0]);
    for (size_t i = 1; i < nt; i++) {
        if (started[i])
            pthread_join(th[i], NULL);
        else
            dense_reader(&parts[i]); /* no thread: read that range here */
    }
    for (size_t i = 0; i < nt; i++) {
        const dense_part *d = &parts[i];
        if (d->got == d->b - d->a) continue;
        if (d->err_no)
            return fm_errf(err, errlen, FM_ERR_IO, "%s: read failed at byte %llu (%s)", path,
                           (unsigned long long)(d->a + d->got), strerror(d->err_no));
        return fm_errf(err, errlen, FM_ERR_IO, "%s: file ended at byte %llu of %llu while reading (truncated?)", path,
                       (unsigned long long)(d->a + d->got), (unsigned long long)len);
    }
#ifdef POSIX_FADV_DONTNEED
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
#endif
    mprotect(p, len, PROT_READ); /* the weights are never written: a stray write faults at once */
    /* Keep the dense weights resident: every token touches all of them. A refused lock is not an
     * error (fm_model_dense_locked tells). */
    if (lock && mlock(p, len) == 0) m->dense_locked = 1;
    return FM_OK;
}

static char *read_file(const char *path, size_t *len, char *err, size_t errlen, fm_status *st) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        *st = fm_errf(err, errlen, errno == ENOENT ? FM_ERR_FORMAT : FM_ERR_IO, "%s: cannot open (%s)", path,
                      strerror(errno));
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = n >= 0 ? malloc((size_t)n + 1) : NULL;
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) {
        *st = fm_errf(err, errlen, buf ? FM_ERR_IO : FM_ERR_OOM, "%s: cannot read", path);
        free(buf);
        fclose(f);
        return NULL;
    }
    fclose(f);
    buf[n] = 0;
    *len = (size_t)n;
    *st = FM_OK;
    return buf;
}

static char *path_join(const char *dir, const char *name) {
    size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (!p) return NULL;
    memcpy(p, dir, a);
    p[a] = '/';
    memcpy(p + a + 1, name, b + 1);
    return p;
}

/* ---------------------------------------------------------------- model features (spec data) */

/* optional spec key `key` (at where.key): one of names[n] -> its index; absent -> 0 (the default) */
static fm_status feat_choice(const fm_json *obj, const char *where, const char *key, const char *const *names,
                             int32_t n, int32_t *out, char *err, size_t errlen) {
    const fm_json *v = fm_json_get(obj, key);
    *out = 0;
    if (!v) return FM_OK;
    const char *s = fm_json_str(v);
    for (int32_t i = 0; s && i < n; i++)
        if (!strcmp(s, names[i])) {
            *out = i;
            return FM_OK;
        }
    char list[160] = "";
    for (int32_t i = 0; i < n; i++) {
        size_t l = strlen(list);
        snprintf(list + l, sizeof list - l, "%s%s", i ? ", " : "", names[i]);
    }
    return fm_errf(err, errlen, FM_ERR_FORMAT, MANIFEST ": %s.%s \"%.60s\" is not one of %s", where, key,
                   s ? s : "(not a string)", list);
}

static fm_status feat_bool(const fm_json *obj, const char *where, const char *key, int32_t *out, char *err,
                           size_t errlen) {
    const fm_json *v = fm_json_get(obj, key);
    *out = 0;
    if (!v) return FM_OK;
    if (fm_json_kind(v) != FM_JSON_BOOL)
        return fm_errf(err, errlen, FM_ERR_FORMAT, MANIFEST ": %s.%s must be true or false", where, key);
    *out = fm_json_bool(v, 0);
    return FM_OK;
}

/* optional number in [lo, hi]; absent -> dflt */
static fm_status feat_num(const fm_json *obj, const char *where, const char *key, double dflt, double lo, double hi,
                          int integer, double *out, char *err, size_t errlen) {
    const fm_json *v = fm_json_get(obj, key);
    *out = dflt;
    if (!v) return FM_OK;
    double d = fm_json_num(v, NAN);
    if (fm_json_kind(v) != FM_JSON_NUM || !(d >= lo && d <= hi) || (integer && d != floor(d)))
        return fm_errf(err, errlen, FM_ERR_FORMAT, MANIFEST ": %s.%s must be %s in [%g, %g]", where, key,
                       integer ? "an integer" : "a number", lo, hi);
    *out = d;
    return FM_OK;
}

/* spec.router*, routed_scaling_factor, expert_act, swiglu_*, shared_gate and per layer
 * sliding_window / attn_sinks (after the layer kinds are known); defaults when absent (manifests
 * written before these keys: the Qwen3 family). The same rules as ModelSpec.check_features. */
static fm_status parse_features(fm_model *m, const fm_json *spec, const fm_json *layers, char *err, size_t errlen) {
    static const char *const routers[] = {"softmax_topk", "sigmoid_topk"};
    static const char *const acts[] = {"swiglu", "swiglu_clamp"};
    static const char *const gates[] = {"sigmoid", "none"};
    fm_status st;
    int32_t rb;
    double ng, tg, sc, lim, al;
    if ((st = feat_choice(spec, "spec", "router", routers, 2, &m->route.kind, err, errlen)) != FM_OK ||
        (st = feat_bool(spec, "spec", "router_bias", &rb, err, errlen)) != FM_OK ||
        (st = feat_num(spec, "spec", "router_n_group", 1, 1, FM_MAX_EXPERTS, 1, &ng, err, errlen)) != FM_OK ||
        (st = feat_num(spec, "spec", "router_topk_group", 1, 1, FM_MAX_EXPERTS, 1, &tg, err, errlen)) != FM_OK ||
        (st = feat_num(spec, "spec", "routed_scaling_factor", 1.0, 1e-6, 1e6, 0, &sc, err, errlen)) != FM_OK ||
        (st = feat_choice(spec, "spec", "expert_act", acts, 2, &m->act.kind, err, errlen)) != FM_OK ||
        (st = feat_num(spec, "spec", "swiglu_limit", 7.0, 0.0, 1e6, 0, &lim, err, errlen)) != FM_OK ||
        (st = feat_num(spec, "spec", "swiglu_alpha", 1.702, -1e6, 1e6, 0, &al, err, errlen)) != FM_OK ||
        (st = feat_choice(spec, "spec", "shared_gate", gates, 2, &m->shared_gate, err, errlen)) != FM_OK)
        return st;
    m->route.norm = m->norm_topk;
    m->route.n_group = (int32_t)ng;
    m->route.topk_group = (int32_t)tg;
    m->route.scale = (float)sc;
    m->router_bias = rb;
    m->act.limit = (float)lim;
    m->act.alpha = (float)al;
    if (m->act.kind == FM_ACT_SWIGLU_CLAMP && !(lim > 0))
        return fm_errf(err, errlen, FM_ERR_FORMAT, MANIFEST ": spec.swiglu_limit must be > 0 with expert_act swiglu_clamp");
    if (m->route.topk_group > m->route.n_group)
        return fm_errf(err, errlen, FM_ERR_FORMAT, MANIFEST ": spec.router_topk_group %d exceeds spec.router_n_group %d",
                       m->route.topk_group, m->route.n_group);
    if (m->route.n_group > 1 || m->route.topk_group > 1) {
        int32_t E = m->n_moe ? m->n_experts : 0, G = m->route.n_group;
        if (m->route.kind != FM_ROUTER_SIGMOID)
            return fm_errf(err, errlen, FM_ERR_FORMAT,
                           MANIFEST ": spec.router_n_group %d: group-limited routing needs router sigmoid_topk", G);
        if (E % G || E / G < 2)
            return fm_errf(err, errlen, FM_ERR_FORMAT,
                           MANIFEST ": spec.router_n_group %d must divide n_experts %d into groups of at least 2", G, E);
        if (m->k_model > m->route.topk_group * (E / G))
            return fm_errf(err, errlen, FM_ERR_FORMAT,
                           MANIFEST ": spec.router_topk_group %d groups of %d experts cannot hold n_experts_per_tok %d",
                           m->route.topk_group, E / G, m->k_model);
    }
    for (int32_t il = 0; il < m->n_layers; il++) {
        const fm_json *L = fm_json_at(layers, il);
        char where[48];
        snprintf(where, sizeof where, "spec.layers[%d]", il);
        double w;
        int32_t sk;
        if ((st = feat_num(L, where, "sliding_window", 0, 0, 1 << 24, 1, &w, err, errlen)) != FM_OK ||
            (st = feat_bool(L, where, "attn_sinks", &sk, err, errlen)) != FM_OK)
            return st;
        if (m->layers[il].attn != FM_ATTN_FULL && (w > 0 || sk))
            return fm_errf(err, errlen, FM_ERR_FORMAT,
                           MANIFEST ": %s: sliding_window / attn_sinks apply to full attention layers only", where);
        m->layers[il].window = (int32_t)w;
        m->layers[il].has_sinks = sk;
    }
    return FM_OK;
}

static fm_status parse_spec(fm_model *m, const fm_json *spec, char *err, size_t errlen) {
    fm_status st;
    /* spec.arch is not read: the C core follows the feature fields only (Python checks the arch) */
#define SIH(key, dst, lo, hi) \
    if ((st = spec_int(spec, key, &m->dst, lo, hi, err, errlen)) != FM_OK) return st
#define SI(key, dst, lo) SIH(key, dst, lo, FM_MAX_DIM)
    SI("hidden_size", H, 1);
    SIH("n_layers", n_layers, 1, FM_MAX_LAYERS);
    SIH("vocab_size", vocab, 1, FM_MAX_VOCAB);
    SIH("n_experts", n_experts, 0, FM_MAX_EXPERTS);
    SIH("n_experts_per_tok", k_model, 0, FM_MAX_EXPERTS);
    SI("moe_intermediate_size", moe_I, 0);
    SI("shared_expert_intermediate_size", sh_I, 0);
    SI("intermediate_size", dense_I, 0);
    SIH("max_position_embeddings", max_pos, 0, 2147483647);
    double d;
    if ((st = spec_num(spec, "rms_norm_eps", &d, err, errlen)) != FM_OK) return st;
    m->eps = (float)d;
    if ((st = spec_num(spec, "norm_offset", &d, err, errlen)) != FM_OK) return st;
    m->norm_offset = (float)d;
    m->norm_topk = fm_json_bool(fm_json_get(spec, "norm_topk_prob"), 1);
    m->tie = fm_json_bool(fm_json_get(spec, "tie_word_embeddings"), 0);
    m->attn_gate = fm_json_bool(fm_json_get(spec, "attn_output_gate"), 0);

    const fm_json *layers = fm_json_get(spec, "layers");
    if (!layers || fm_json_kind(layers) != FM_JSON_ARR || fm_json_len(layers) != m->n_layers)
        return fm_errf(err, errlen, FM_ERR_FORMAT, MANIFEST ": spec.layers must be a list of n_layers (%d) entries",
                       m->n_layers);
    m->layers = calloc((size_t)m->n_layers, sizeof(fm_layer));
    if (!m->layers) return fm_errf(err, errlen, FM_ERR_OOM, "out of memory");
    for (int32_t il = 0; il < m->n_layers; il++) {
        const fm_json *L = fm_json_at(layers, il);
        const char *a = fm_json_str(fm_json_get(L, "attn")), *f = fm_json_str(fm_json_get(L, "ffn"));
        fm_layer *ly = &m->layers[il];
        if (a && !strcmp(a, "full")) {
            ly->attn = FM_ATTN_FULL;
            ly->state_idx = m->n_full++;
        } else if (a && !strcmp(a, "linear")) {
            ly->attn = FM_ATTN_LINEAR;
            ly->state_idx = m->n_linear++;
        } else {
            return fm_errf(err, errlen, FM_ERR_FORMAT, MANIFEST ": spec.layers[%d].attn must be \"full\" or \"linear\"", il);
        }
        if (f && !strcmp(f, "moe")) {
            ly->ffn = FM_FFN_MOE;
            m->n_moe++;
        } else if (f && !strcmp(f, "dense")) {
            ly->ffn = FM_FFN_DENSE;
        } else {
            return fm_errf(err, errlen, FM_ERR_FORMAT, MANIFEST ": spec.layers[%d].ffn must be \"moe\" or \"dense\"", il);
        }
    }
    if (m->n_full) {
        SI("n_heads", n_heads, 1);
        SI("n_kv_heads", n_kv_heads, 1);
        SI("head_dim", head_dim, 1);
        SI("rotary_dim", rotary_dim, 0);
        if ((st = spec_num(spec, "rope_theta", &d, err, errlen)) != FM_OK) return st;
        m->rope_theta = (float)d;
        if (m->n_heads % m->n_kv_heads)
            return fm_errf(err, errlen, FM_ERR_FORMAT, MANIFEST ": spec.n_heads %d is not a multiple of spec.n_kv_heads %d",
                           m->n_heads, m->n_kv_heads);
        if (m->rotary_dim % 2 || m->rotary_dim > m->head_dim)
            return fm_errf(err, errlen, FM_ERR_FORMAT, MANIFEST ": spec.rotary_dim %d must be even and <= head_dim %d",
                           m->rotary_dim, m->head_dim);
    }
    if (m->n_linear) {
        SI("linear_n_k_heads", lin_nk, 1);
        SI("linear_n_v_heads", lin_nv, 1);
        SI("linear_k_dim", lin_dk, 1);
        SI("linear_v_dim", lin_dv, 1);
        SI("linear_conv_kernel", conv_k, 1);
        if (m->lin_nv % m->lin_nk)
            return fm_errf(err, errlen, FM_ERR_FORMAT,
                           MANIFEST ": spec.linear_n_v_heads %d is not a multiple of spec.linear_n_k_heads %d", m->lin_nv,
                           m->lin_nk);
        if (m->conv_k > 16)
            return fm_errf(err, errlen, FM_ERR_FORMAT, MANIFEST ": spec.linear_conv_kernel %d > 16 is not supported",
                           m->conv_k);
        /* the recurrence keeps a dv-float row on the stack: bound it (real models use 128) */
        if (m->lin_dk > 4096 || m->lin_dv > 4096)
            return fm_errf(err, errlen, FM_ERR_FORMAT,
                           MANIFEST ": spec.linear_k_dim %d / spec.linear_v_dim %d > 4096 is not supported",
                           m->lin_dk, m->lin_dv);
    }
    if (m->n_moe) {
        if (m->n_experts < 1 || m->k_model < 1 || m->k_model > m->n_experts || m->moe_I < 1)
            return fm_errf(err, errlen, FM_ERR_FORMAT,
                           MANIFEST ": spec.n_experts %d / n_experts_per_tok %d / moe_intermediate_size %d invalid for "
                           "MoE layers",
                           m->n_experts, m->k_model, m->moe_I);
    }
    if (m->n_moe < m->n_layers && m->dense_I < 1)
        return fm_errf(err, errlen, FM_ERR_FORMAT, MANIFEST ": spec.intermediate_size must be > 0 for dense FFN layers");
    if ((st = parse_features(m, spec, layers, err, errlen)) != FM_OK) return st;
#undef SI
#undef SIH
    return FM_OK;
}

static fm_status load_tensors(fm_ld *ld) {
    fm_model *m = ld->m;
    fm_status st;
    int64_t H = m->H;
    char nm[96];
#define MAT(name, dst, r, c) \
    if ((st = get_mat(ld, name, r, c, dst)) != FM_OK) return st
#define VEC(name, dst, n, rows) \
    if ((st = get_vec(ld, name, n, rows, dst)) != FM_OK) return st
    MAT("tok_embd", &m->tok_embd, m->vocab, H);
    VEC("output_norm", &m->output_norm, H, 0);
    if (!m->tie) MAT("output", &m->output, m->vocab, H);
    int64_t qd = (int64_t)m->n_heads * m->head_dim, kvd = (int64_t)m->n_kv_heads * m->head_dim;
    int64_t nk = m->lin_nk, nv = m->lin_nv, dk = m->lin_dk, dv = m->lin_dv;
    int64_t cd = 2 * nk * dk + nv * dv;
    for (int32_t il = 0; il < m->n_layers; il++) {
        fm_layer *L = &m->layers[il];
#define N(suffix) (snprintf(nm, sizeof nm, "blk.%d." suffix, il), nm)
        VEC(N("attn_norm"), &L->attn_norm, H, 0);
        VEC(N("ffn_norm"), &L->ffn_norm, H, 0);
        if (L->attn == FM_ATTN_FULL) {
            MAT(N("attn_q"), &L->wq, qd * (m->attn_gate ? 2 : 1), H);
            MAT(N("attn_k"), &L->wk, kvd, H);
            MAT(N("attn_v"), &L->wv, kvd, H);
            MAT(N("attn_o"), &L->wo, H, qd);
            VEC(N("attn_q_norm"), &L->q_norm, m->head_dim, 0);
            VEC(N("attn_k_norm"), &L->k_norm, m->head_dim, 0);
            if (L->has_sinks) VEC(N("attn_sinks"), &L->sinks, m->n_heads, 0);
        } else {
            MAT(N("ssm_qkv"), &L->ssm_qkv, cd, H);
            MAT(N("ssm_z"), &L->ssm_z, nv * dv, H);
            MAT(N("ssm_b"), &L->ssm_b, nv, H);
            MAT(N("ssm_a"), &L->ssm_a, nv, H);
            VEC(N("ssm_conv"), &L->ssm_conv, cd * m->conv_k, cd);
            VEC(N("ssm_dt_bias"), &L->dt_bias, nv, 0);
            VEC(N("ssm_A_log"), &L->A_log, nv, 0);
            VEC(N("ssm_norm"), &L->ssm_norm, dv, 0);
            MAT(N("ssm_out"), &L->ssm_out, H, nv * dv);
        }
        if (L->ffn == FM_FFN_MOE) {
            MAT(N("ffn_router"), &L->router, m->n_experts, H);
            if (m->router_bias) VEC(N("ffn_router_bias"), &L->router_bias, m->n_experts, 0);
            if (m->sh_I > 0) {
                L->has_shexp = 1;
                MAT(N("shexp_gate"), &L->sh_gate, m->sh_I, H);
                MAT(N("shexp_up"), &L->sh_up, m->sh_I, H);
                MAT(N("shexp_down"), &L->sh_down, H, m->sh_I);
                if (m->shared_gate == FM_SHGATE_SIGMOID) MAT(N("shexp_router"), &L->sh_router, 1, H);
            }
        } else {
            MAT(N("ffn_gate"), &L->ffn_gate, m->dense_I, H);
            MAT(N("ffn_up"), &L->ffn_up, m->dense_I, H);
            MAT(N("ffn_down"), &L->ffn_down, H, m->dense_I);
        }
#undef N
    }
#undef MAT
#undef VEC
    return FM_OK;
}

/* a file named by the manifest must stay inside the model dir: relative, not empty, no ".." component */
static int inside_path(const char *p) {
    if (!p[0] || p[0] == '/') return 0;
    for (const char *c = p;;) {
        const char *e = strchr(c, '/');
        size_t n = e ? (size_t)(e - c) : strlen(c);
        if (n == 2 && c[0] == '.' && c[1] == '.') return 0;
        if (!e) return 1;
        c = e + 1;
    }
}

/* 8 + the safetensors header length of the file at path (the start of its data), or 0 with err set */
static uint64_t st_data_start(const char *path, fm_status *st, char *err, size_t errlen) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        *st = fm_errf(err, errlen, FM_ERR_IO, "%s: cannot open (%s)", path, strerror(errno));
        return 0;
    }
    uint8_t b[8];
    ssize_t r;
    do r = pread(fd, b, 8, 0); while (r < 0 && errno == EINTR);
    int e = errno;
    close(fd);
    if (r != 8) {
        *st = r < 0 ? fm_errf(err, errlen, FM_ERR_IO, "%s: cannot read the safetensors header (%s)", path, strerror(e))
                    : fm_errf(err, errlen, FM_ERR_FORMAT, "%s: shorter than a safetensors header (truncated?)", path);
        return 0;
    }
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | b[i];
    *st = FM_OK;
    return n > FM_MAX_FILE ? FM_MAX_FILE : 8 + n;
}

/* the expert data must start where the expert file's safetensors header ends (the converter pads the
 * header so that this is data_offset): anything else reads shifted, garbage blocks */
static fm_status check_expert_header(const char *path, int32_t il, uint64_t doff, char *err, size_t errlen) {
    fm_status st;
    uint64_t ds = st_data_start(path, &st, err, errlen);
    if (st != FM_OK) return st;
    if (ds != doff)
        return fm_errf(err, errlen, FM_ERR_FORMAT,
                       "%s: its safetensors data starts at byte %llu but " MANIFEST " experts.layers[\"%d\"].data_offset "
                       "is %llu (damaged manifest or file?)",
                       path, (unsigned long long)ds, il, (unsigned long long)doff);
    return FM_OK;
}

static fm_status load_experts(fm_model *m, const fm_json *root, int verify, char *err, size_t errlen) {
    fm_status st;
    const fm_json *layers = fm_json_get(fm_json_get(root, "experts"), "layers");
    if (m->n_moe && (!layers || fm_json_kind(layers) != FM_JSON_OBJ))
        return fm_errf(err, errlen, FM_ERR_FORMAT, MANIFEST ": experts.layers is missing");
    m->files = calloc((size_t)m->n_layers, sizeof(fm_expert_file));
    m->paths = calloc((size_t)m->n_layers, sizeof(char *));
    if (!m->files || !m->paths) return fm_errf(err, errlen, FM_ERR_OOM, "out of memory");
    for (int32_t il = 0; il < m->n_layers; il++) {
        fm_layer *L = &m->layers[il];
        if (L->ffn != FM_FFN_MOE) continue;
        char key[16];
        snprintf(key, sizeof key, "%d", il);
        const fm_json *e = fm_json_get(layers, key);
        if (!e || fm_json_kind(e) != FM_JSON_OBJ)
            return fm_errf(err, errlen, FM_ERR_FORMAT, MANIFEST ": experts.layers[\"%d\"] is missing (layer %d is MoE)",
                           il, il);
        const char *file = fm_json_str(fm_json_get(e, "file"));
        uint64_t ne, bb, doff;
        if (!file)
            return fm_errf(err, errlen, FM_ERR_FORMAT, MANIFEST ": experts.layers[\"%d\"].file is missing", il);
        if (!inside_path(file))
            return fm_errf(err, errlen, FM_ERR_FORMAT,
                           MANIFEST ": experts.layers[\"%d\"].file \"%.200s\" must be a relative path inside the model "
                           "dir (not absolute, no \"..\" component)",
                           il, file);
        if (!json_u64(fm_json_get(e, "n_experts"), &ne) || ne != (uint64_t)m->n_experts)
            return fm_errf(err, errlen, FM_ERR_FORMAT, MANIFEST ": experts.layers[\"%d\"].n_experts is not spec.n_experts %d",
                           il, m->n_experts);
        if (!json_u64(fm_json_get(e, "block_bytes"), &bb) || bb == 0 || bb % 4096 || bb > FM_MAX_BLOCK)
            return fm_errf(err, errlen, FM_ERR_FORMAT,
                           MANIFEST ": experts.layers[\"%d\"].block_bytes is missing or not a positive multiple of 4096 "
                           "(at most 2^40)",
                           il);
        if (!json_u64(fm_json_get(e, "data_offset"), &doff) || doff % 4096 || doff > FM_MAX_FILE)
            return fm_errf(err, errlen, FM_ERR_FORMAT,
                           MANIFEST ": experts.layers[\"%d\"].data_offset is missing or not a multiple of 4096 (at most "
                           "2^52)",
                           il);
        const fm_json *parts = fm_json_get(e, "parts");
        if ((st = get_part(m, parts, "gate", il, bb, m->moe_I, m->H, &L->parts[FM_PART_GATE], err, errlen)) != FM_OK ||
            (st = get_part(m, parts, "up", il, bb, m->moe_I, m->H, &L->parts[FM_PART_UP], err, errlen)) != FM_OK ||
            (st = get_part(m, parts, "down", il, bb, m->H, m->moe_I, &L->parts[FM_PART_DOWN], err, errlen)) != FM_OK)
            return st;
        L->block_bytes = bb;
        m->paths[il] = path_join(m->dir, file);
        if (!m->paths[il]) return fm_errf(err, errlen, FM_ERR_OOM, "out of memory");
        struct stat sb;
        if (stat(m->paths[il], &sb) != 0)
            return fm_errf(err, errlen, errno == ENOENT ? FM_ERR_FORMAT : FM_ERR_IO, "%s: cannot stat (%s)", m->paths[il],
                           strerror(errno));
        if (!S_ISREG(sb.st_mode))
            return fm_errf(err, errlen, FM_ERR_FORMAT, "%s: not a regular file (experts.layers[\"%d\"].file)",
                           m->paths[il], il);
        if (verify && (st = check_expert_header(m->paths[il], il, doff, err, errlen)) != FM_OK) return st;
        if (verify && (uint64_t)sb.st_size < doff + ne * bb)
            return fm_errf(err, errlen, FM_ERR_FORMAT,
                           "%s: file has %llu bytes, experts.layers[\"%d\"] needs %llu (data_offset + n_experts * "
                           "block_bytes): truncated?",
                           m->paths[il], (unsigned long long)sb.st_size, il, (unsigned long long)(doff + ne * bb));
        m->files[il].path = m->paths[il];
        m->files[il].data_offset = doff;
        m->files[il].block_bytes = bb;
        m->files[il].n_experts = (int32_t)ne;
    }
    return FM_OK;
}

/* ---------------------------------------------------------------- backend selection */

/* the host copy of the dense weights, for a backend that has its own (fm_backend.host_dense 0):
 * unmapped; map_len stays (fm_model_dense_bytes) */
static void release_dense(fm_model *m) {
    if (!m->map) return;
    if (m->dense_locked) munlock(m->map, m->map_len);
    m->dense_locked = 0;
    munmap(m->map, m->map_len);
    m->map = NULL;
}

/* every layer's kinds are in range and index ops the backend has (the layer loop indexes
 * be->mixer[attn] and be->ffn[ffn] without a check) */
static fm_status backend_kinds(const fm_model *m, const char *mpath, char *err, size_t errlen) {
    const fm_backend *be = m->be;
    for (int32_t il = 0; il < m->n_layers; il++) {
        const fm_layer *L = &m->layers[il];
        if (L->attn < 0 || L->attn >= FM_ATTN_KINDS || L->ffn < 0 || L->ffn >= FM_FFN_KINDS)
            return fm_errf(err, errlen, FM_ERR_FORMAT, "%s: spec.layers[%d]: unknown layer kind (attn %d, ffn %d)",
                           mpath, il, L->attn, L->ffn);
        if (!be->mixer[L->attn])
            return fm_errf(err, errlen, FM_ERR_BACKEND,
                           "%s: spec.layers[%d]: the %s backend has no %s token mixer (attn \"%s\")", mpath, il,
                           be->name, fm_attn_kind_desc(L->attn), fm_attn_kind_name(L->attn));
        if (!be->ffn[L->ffn])
            return fm_errf(err, errlen, FM_ERR_BACKEND, "%s: spec.layers[%d]: the %s backend has no %s FFN (ffn \"%s\")",
                           mpath, il, be->name, fm_ffn_kind_desc(L->ffn), fm_ffn_kind_name(L->ffn));
    }
    return FM_OK;
}

/* the backend's capability check: the model-wide features, then every layer (the first refusal,
 * which names the layer and the feature, is the error) */
static fm_status backend_supports(const fm_model *m, const char *mpath, char *err, size_t errlen) {
    for (int32_t il = -1; il < m->n_layers; il++) {
        char why[400];
        why[0] = 0;
        fm_status st = m->be->supports(m, il, why, sizeof why);
        if (st != FM_OK) return fm_errf(err, errlen, st, "%s: %s", mpath, why);
    }
    return FM_OK;
}

fm_status fm_model_open(fm_model **out, const char *dir, const fm_model_params *params, char *err, size_t errlen) {
    if (err && errlen) err[0] = 0;
    if (!out) return fm_errf(err, errlen, FM_ERR_ARG, "fm_model_open: out is NULL");
    *out = NULL;
    if (!dir) return fm_errf(err, errlen, FM_ERR_ARG, "fm_model_open: dir is NULL");
    fm_model_params p = params ? *params : fm_model_default_params();
    if (p.backend != FM_BACKEND_CPU && p.backend != FM_BACKEND_CUDA)
        return fm_errf(err, errlen, FM_ERR_BACKEND, "fm_model_open: backend %d is not one of 0 (cpu), 1 (cuda)",
                       p.backend);
    fm_status dst = debug_check(&p.debug, err, errlen);
    if (dst != FM_OK) return dst;
    if (p.backend == FM_BACKEND_CUDA && !fm_cuda_available()) {
        char why[256];
        fm_cuda_describe(why, sizeof why);
        return fm_errf(err, errlen, FM_ERR_BACKEND, "fm_model_open: backend cuda is not available: %s", why);
    }
    fm_model *m = calloc(1, sizeof *m);
    if (!m) return fm_errf(err, errlen, FM_ERR_OOM, "out of memory");
    m->debug = p.debug;
    fm_status st = FM_OK;
    fm_json *root = NULL;
    char *text = NULL, *mpath = NULL, *dpath = NULL;
    int fd = -1;
    m->dir = strdup(dir);
    mpath = path_join(dir, MANIFEST);
    dpath = path_join(dir, DENSE);
    if (!m->dir || !mpath || !dpath) {
        st = fm_errf(err, errlen, FM_ERR_OOM, "out of memory");
        goto fail;
    }
    size_t tlen;
    text = read_file(mpath, &tlen, err, errlen, &st);
    if (!text) goto fail;
    char jerr[200];
    root = fm_json_parse(text, tlen, jerr, sizeof jerr);
    if (!root) {
        st = fm_errf(err, errlen, FM_ERR_FORMAT, "%s: invalid JSON: %s", mpath, jerr);
        goto fail;
    }
    const char *fmt = fm_json_str(fm_json_get(root, "format"));
    if (!fmt || strcmp(fmt, "pyflashmoe")) {
        st = fm_errf(err, errlen, FM_ERR_FORMAT, "%s: field \"format\" must be \"pyflashmoe\"", mpath);
        goto fail;
    }
    double ver = fm_json_num(fm_json_get(root, "format_version"), -1);
    if (ver != FM_FORMAT_VERSION) {
        st = fm_errf(err, errlen, FM_ERR_FORMAT,
                     "%s: format_version %g is not supported (this build reads version %d)", mpath, ver,
                     FM_FORMAT_VERSION);
        goto fail;
    }
    const fm_json *spec = fm_json_get(root, "spec");
    if (!spec || fm_json_kind(spec) != FM_JSON_OBJ) {
        st = fm_errf(err, errlen, FM_ERR_FORMAT, "%s: field \"spec\" is missing", mpath);
        goto fail;
    }
    if ((st = parse_spec(m, spec, err, errlen)) != FM_OK) goto fail;
    /* the backend: its table, and every layer's kinds index ops it has */
    m->be = p.backend == FM_BACKEND_CUDA ? fm_cuda_backend() : &fm_cpu_backend;
    if (!m->be) {
        st = fm_errf(err, errlen, FM_ERR_BACKEND, "fm_model_open: backend %d has no implementation in this build",
                     p.backend);
        goto fail;
    }
    if ((st = backend_kinds(m, mpath, err, errlen)) != FM_OK) goto fail;
    m->k_tok = m->k_model;
    if (p.experts_per_token > 0) {
        if (m->n_moe && p.experts_per_token > m->n_experts) {
            st = fm_errf(err, errlen, FM_ERR_ARG, "experts_per_token %d must be in 1..n_experts (%d)",
                         p.experts_per_token, m->n_experts);
            goto fail;
        }
        m->k_tok = p.experts_per_token;
    }
    /* dense weights */
    fd = open(dpath, O_RDONLY | O_CLOEXEC | O_NONBLOCK); /* O_NONBLOCK: a FIFO planted there must not hang us */
    if (fd < 0) {
        st = fm_errf(err, errlen, errno == ENOENT ? FM_ERR_FORMAT : FM_ERR_IO, "%s: cannot open (%s)", dpath,
                     strerror(errno));
        goto fail;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode) || sb.st_size <= 0) {
        st = fm_errf(err, errlen, FM_ERR_FORMAT, "%s: empty, unreadable or not a regular file", dpath);
        goto fail;
    }
    const fm_json *fsz = fm_json_get(fm_json_get(fm_json_get(root, "files"), DENSE), "size");
    uint64_t want_size;
    if (p.verify_sizes && json_u64(fsz, &want_size) && want_size != (uint64_t)sb.st_size) {
        st = fm_errf(err, errlen, FM_ERR_FORMAT, "%s: file has %llu bytes, manifest files[\"" DENSE "\"].size says %llu",
                     dpath, (unsigned long long)sb.st_size, (unsigned long long)want_size);
        goto fail;
    }
    if ((uint64_t)sb.st_size < 8 || (uint64_t)sb.st_size > FM_MAX_FILE || (uint64_t)sb.st_size > (uint64_t)SIZE_MAX) {
        st = fm_errf(err, errlen, FM_ERR_FORMAT, "%s: %llu bytes is not a dense weights file", dpath,
                     (unsigned long long)sb.st_size);
        goto fail;
    }
    /* locked only for a backend that reads them from host memory during evals */
    if ((st = read_dense(m, fd, dpath, (size_t)sb.st_size, p.lock_dense && m->be->host_dense, err, errlen)) != FM_OK)
        goto fail;
    close(fd);
    fd = -1;
    const fm_json *tensors = fm_json_get(root, "tensors");
    if (!tensors || fm_json_kind(tensors) != FM_JSON_OBJ) {
        st = fm_errf(err, errlen, FM_ERR_FORMAT, "%s: field \"tensors\" is missing", mpath);
        goto fail;
    }
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | ((const uint8_t *)m->map)[i];
    if (hlen > m->map_len - 8) {
        st = fm_errf(err, errlen, FM_ERR_FORMAT, "%s: safetensors header length %llu exceeds the file size %llu",
                     dpath, (unsigned long long)hlen, (unsigned long long)m->map_len);
        goto fail;
    }
    fm_ld ld = {m, tensors, 8 + hlen, err, errlen};
    if ((st = load_tensors(&ld)) != FM_OK) goto fail;
    if ((st = load_experts(m, root, p.verify_sizes, err, errlen)) != FM_OK) goto fail;
    if ((st = backend_supports(m, mpath, err, errlen)) != FM_OK) goto fail;

    if (pthread_mutex_init(&m->mu, NULL) != 0) {
        st = fm_errf(err, errlen, FM_ERR_OOM, "cannot create the model mutex");
        goto fail;
    }
    m->mu_init = 1;
    m->pool = fm_pool_new(p.n_threads);
    if (!m->pool) {
        st = fm_errf(err, errlen, FM_ERR_OOM, "cannot start %d compute threads", p.n_threads);
        goto fail;
    }
    if (m->n_moe) { /* experts per fm_io_submit (the backends' expert reader) */
        int32_t mb = m->n_experts < 16 ? m->n_experts : 16;
        m->max_batch = m->k_tok > mb ? m->k_tok : mb;
    }
    fm_state_model_ids(m, text, tlen);
    m->be_open = 1; /* model_close undoes a partial model_open too */
    if ((st = m->be->model_open(m, &p, err, errlen)) != FM_OK) goto fail;
    if (!m->be->host_dense) release_dense(m); /* the backend holds its own copy */
    fm_json_free(root);
    free(text);
    free(mpath);
    free(dpath);
    *out = m;
    return FM_OK;
fail:
    if (fd >= 0) close(fd);
    fm_json_free(root);
    free(text);
    free(mpath);
    free(dpath);
    fm_model_close(m);
    return st;
}

void fm_model_close(fm_model *m) {
    if (!m) return;
    if (m->be_open) m->be->model_close(m);
    if (m->pool) fm_pool_free(m->pool);
    if (m->map) {
        if (m->dense_locked) munlock(m->map, m->map_len);
        munmap(m->map, m->map_len);
    }
    if (m->mu_init) pthread_mutex_destroy(&m->mu);
    for (int32_t i = 0; i < m->n_owned; i++) free(m->owned[i]);
    free(m->owned);
    if (m->paths)
        for (int32_t i = 0; i < m->n_layers; i++) free(m->paths[i]);
    free(m->paths);
    free(m->files);
    free(m->layers);
    free(m->dir);
    free(m);
}

void fm_model_set_log(fm_model *m, fm_log_fn fn, void *user) {
    if (!m) return;
    m->log_fn = fn;
    m->log_user = user;
}

int32_t fm_model_n_vocab(const fm_model *m) { return m ? m->vocab : 0; }
int32_t fm_model_n_layers(const fm_model *m) { return m ? m->n_layers : 0; }
int32_t fm_model_hidden(const fm_model *m) { return m ? m->H : 0; }
int32_t fm_model_experts_per_token(const fm_model *m) { return m ? m->k_tok : 0; }
int32_t fm_model_n_experts(const fm_model *m) { return m && m->n_moe ? m->n_experts : 0; }
uint64_t fm_model_dense_bytes(const fm_model *m) { return m ? (uint64_t)m->map_len : 0; }
int32_t fm_model_dense_locked(const fm_model *m) { return m ? m->dense_locked : 0; }
uint64_t fm_model_expert_block_bytes(const fm_model *m, int32_t il) {
    if (!m || il < 0 || il >= m->n_layers || m->layers[il].ffn != FM_FFN_MOE) return 0;
    return m->layers[il].block_bytes;
}
