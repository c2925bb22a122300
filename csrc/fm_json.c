/* fm_json.c: a small, strict, read-only JSON DOM for the manifest (RFC 8259).
 *
 * Owns: parsing (objects, arrays, strings with every escape incl. \uXXXX surrogate pairs -> UTF-8,
 * numbers via strtod in the C locale, true/false/null), the node arena, lookups. Does not own: the
 * meaning of any key (fm_model.c reads the manifest).
 *
 * Every node, string and child table lives in one arena owned by the root, so a parse costs a
 * handful of mallocs and fm_json_free is one walk over the arena chunks. Children of a container
 * are collected on a scratch stack while parsing and copied into the arena when the container
 * closes. Objects larger than a few entries also get a sorted key index, so fm_json_get is
 * O(log n) (the tensor table has thousands of keys) and duplicate keys are found and rejected.
 * Strict: no comments, no trailing commas, no leading zeros, no NaN/Infinity, no control
 * characters or invalid UTF-8 inside strings, no unpaired surrogates, nothing after the value
 * (a leading UTF-8 BOM is skipped, as RFC 8259 allows).
 */
#include <errno.h>
#include <locale.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(__APPLE__)
#include <xlocale.h>
#endif

#include "fm_internal.h"

#define FM_JSON_MAX_DEPTH 256
#define FM_JSON_CHUNK (64 * 1024)
#define FM_JSON_INDEX_MIN 8 /* objects with at least this many keys get a sorted index */

typedef struct json_chunk {
    struct json_chunk *next;
    size_t used, cap;
    max_align_t data[]; /* cap bytes */
} json_chunk;

struct fm_json {
    fm_json_type t;
    int32_t n;               /* entries of an array / object */
    union {
        double num;
        int b;
        struct { const char *s; size_t len; } str;
        struct {
            fm_json **items;     /* n values */
            const char **keys;   /* objects: n keys (NUL-terminated) */
            size_t *key_lens;
            int32_t *sorted;     /* objects with n >= FM_JSON_INDEX_MIN: entry indices sorted by key */
        } c;
    } u;
};

/* the root node sits at the start of its document so fm_json_free can find the arena */
typedef struct {
    fm_json root;
    uint32_t magic;
    json_chunk *chunks;
} json_doc;
#define FM_JSON_MAGIC 0x4a534f4eu

typedef struct {
    const char *text, *p, *end;
    json_doc *doc;
    /* scratch stack of children (values and keys) shared by all open containers */
    fm_json **st_items;
    const char **st_keys;
    size_t *st_lens;
    size_t st_n, st_cap;
    char *err;
    size_t errlen;
    const char *err_at;
    int failed;
#if defined(__GLIBC__) || defined(__APPLE__)
    locale_t cloc;
#endif
} json_parser;

/* ---- arena ---- */
static void *arena_alloc(json_parser *ps, size_t n) {
    n = (n + 15) & ~(size_t)15;
    json_chunk *c = ps->doc->chunks;
    if (!c || c->cap - c->used < n) {
        size_t cap = n > FM_JSON_CHUNK ? n : FM_JSON_CHUNK;
        json_chunk *nc = malloc(sizeof *nc + cap);
        if (!nc) return NULL;
        nc->cap = cap;
        nc->used = 0;
        /* a big one-off block goes behind the current chunk so the current one keeps filling */
        if (c && cap == n) {
            nc->next = c->next;
            c->next = nc;
            nc->used = n;
            return (char *)nc->data;
        }
        nc->next = c;
        ps->doc->chunks = nc;
        c = nc;
    }
    void *r = (char *)c->data + c->used;
    c->used += n;
    return r;
}

/* ---- errors ---- */
static void *fail(json_parser *ps, const char *at, const char *what) {
    if (ps->failed) return NULL;
    ps->failed = 1;
    if (at > ps->end) at = ps->end;
    int64_t line = 1, col = 1;
    for (const char *q = ps->text; q < at; q++) {
        if (*q == '\n') { line++; col = 1; }
        else if (((unsigned char)*q & 0xc0) != 0x80) col++; /* count code points, not bytes */
    }
    fm_errf(ps->err, ps->errlen, FM_ERR_FORMAT, "line %lld col %lld: %s", (long long)line,
            (long long)col, what);
    return NULL;
}

static void *oom(json_parser *ps) { return fail(ps, ps->p, "out of memory"); }

static void skip_ws(json_parser *ps) {
    while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r'))
        ps->p++;
}

static int stack_push(json_parser *ps, fm_json *v, const char *key, size_t klen) {
    if (ps->st_n == ps->st_cap) {
        size_t cap = ps->st_cap ? ps->st_cap * 2 : 64;
        fm_json **ni = realloc(ps->st_items, cap * sizeof *ni);
        if (!ni) return 0;
        ps->st_items = ni;
        const char **nk = realloc(ps->st_keys, cap * sizeof *nk);
        if (!nk) return 0;
        ps->st_keys = nk;
        size_t *nl = realloc(ps->st_lens, cap * sizeof *nl);
        if (!nl) return 0;
        ps->st_lens = nl;
        ps->st_cap = cap;
    }
    ps->st_items[ps->st_n] = v;
    ps->st_keys[ps->st_n] = key;
    ps->st_lens[ps->st_n] = klen;
    ps->st_n++;
    return 1;
}

static int key_cmp(const char *a, size_t al, const char *b, size_t bl) {
    int c = memcmp(a, b, al < bl ? al : bl);
    if (c) return c;
    return al < bl ? -1 : al > bl;
}

/* ---- strings ---- */
static int hex4(const char *p, uint32_t *out) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (uint32_t)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (uint32_t)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (uint32_t)(c - 'A' + 10);
        else return 0;
    }
    *out = v;
    return 1;
}

static size_t put_utf8(char *o, uint32_t cp) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) { o[0] = (char)(0xc0 | (cp >> 6)); o[1] = (char)(0x80 | (cp & 0x3f)); return 2; }
    if (cp < 0x10000) {
        o[0] = (char)(0xe0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        o[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    o[0] = (char)(0xf0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    o[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* length of a valid UTF-8 sequence at p (first byte >= 0x80), 0 if invalid (overlong, surrogate,
 * > U+10FFFF, truncated) */
static size_t utf8_seq(const unsigned char *p, const unsigned char *end) {
    unsigned c = p[0];
    size_t n;
    uint32_t cp;
    if (c >= 0xc2 && c <= 0xdf) { n = 2; cp = c & 0x1f; }
    else if (c >= 0xe0 && c <= 0xef) { n = 3; cp = c & 0x0f; }
    else if (c >= 0xf0 && c <= 0xf4) { n = 4; cp = c & 0x07; }
    else return 0;
    if ((size_t)(end - p) < n) return 0;
    for (size_t i = 1; i < n; i++) {
        if ((p[i] & 0xc0) != 0x80) return 0;
        cp = (cp << 6) | (p[i] & 0x3f);
    }
    if ((n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10ffff))) return 0;
    if (cp >= 0xd800 && cp <= 0xdfff) return 0;
    return n;
}

/* ps->p at the opening quote; decoded bytes (NUL-terminated) go into the arena */
static const char *parse_string(json_parser *ps, size_t *out_len) {
    const char *start = ps->p++;
    /* decoded output is never longer than the raw text: find the closing quote first */
    const char *q = ps->p;
    while (q < ps->end && *q != '"') q += (*q == '\\' && q + 1 < ps->end) ? 2 : 1;
    if (q >= ps->end) return fail(ps, start, "unterminated string");
    char *out = arena_alloc(ps, (size_t)(q - ps->p) + 1);
    if (!out) return oom(ps);
    size_t o = 0;
    while (ps->p < q) {
        unsigned char c = (unsigned char)*ps->p;
        if (c < 0x20) return fail(ps, ps->p, "control character in string (escape it)");
        if (c == '\\') {
            const char *esc = ps->p++;
            char e = *ps->p++;
            switch (e) {
            case '"': out[o++] = '"'; break;
            case '\\': out[o++] = '\\'; break;
            case '/': out[o++] = '/'; break;
            case 'b': out[o++] = '\b'; break;
            case 'f': out[o++] = '\f'; break;
            case 'n': out[o++] = '\n'; break;
            case 'r': out[o++] = '\r'; break;
            case 't': out[o++] = '\t'; break;
            case 'u': {
                uint32_t cp;
                if (q - ps->p < 4 || !hex4(ps->p, &cp)) return fail(ps, esc, "bad \\u escape (need 4 hex digits)");
                ps->p += 4;
                if (cp >= 0xdc00 && cp <= 0xdfff) return fail(ps, esc, "unpaired low surrogate in \\u escape");
                if (cp >= 0xd800 && cp <= 0xdbff) {
                    uint32_t lo;
                    if (q - ps->p < 6 || ps->p[0] != '\\' || ps->p[1] != 'u' || !hex4(ps->p + 2, &lo) ||
                        lo < 0xdc00 || lo > 0xdfff)
                        return fail(ps, esc, "unpaired high surrogate in \\u escape");
                    ps->p += 6;
                    cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                }
                o += put_utf8(out + o, cp); /* at most 4 bytes out of 6 (or 12) in */
                break;
            }
            default: return fail(ps, esc, "bad escape in string");
            }
        } else if (c < 0x80) {
            out[o++] = (char)c;
            ps->p++;
        } else {
            size_t n = utf8_seq((const unsigned char *)ps->p, (const unsigned char *)q);
            if (!n) return fail(ps, ps->p, "invalid UTF-8 in string");
            memcpy(out + o, ps->p, n);
            o += n;
            ps->p += n;
        }
    }
    ps->p = q + 1;
    out[o] = 0;
    *out_len = o;
    return out;
}

/* ---- numbers ---- */
static int parse_number(json_parser *ps, double *out) {
    const char *s = ps->p, *p = ps->p, *e = ps->end;
    if (p < e && *p == '-') p++;
    if (p >= e || !(*p >= '0' && *p <= '9')) { fail(ps, s, "invalid value"); return 0; }
    if (*p == '0') {
        p++;
        if (p < e && *p >= '0' && *p <= '9') { fail(ps, s, "leading zero in number"); return 0; }
    } else {
        while (p < e && *p >= '0' && *p <= '9') p++;
    }
    if (p < e && *p == '.') {
        p++;
        if (p >= e || !(*p >= '0' && *p <= '9')) { fail(ps, p, "digit expected after '.' in number"); return 0; }
        while (p < e && *p >= '0' && *p <= '9') p++;
    }
    if (p < e && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < e && (*p == '+' || *p == '-')) p++;
        if (p >= e || !(*p >= '0' && *p <= '9')) { fail(ps, p, "digit expected in exponent"); return 0; }
        while (p < e && *p >= '0' && *p <= '9') p++;
    }
    /* the input need not be NUL-terminated: copy the lexeme */
    size_t n = (size_t)(p - s);
    char buf[128];
    char *tmp = n < sizeof buf ? buf : malloc(n + 1);
    if (!tmp) { oom(ps); return 0; }
    memcpy(tmp, s, n);
    tmp[n] = 0;
#if defined(__GLIBC__) || defined(__APPLE__)
    double v = ps->cloc ? strtod_l(tmp, NULL, ps->cloc) : strtod(tmp, NULL);
#else
    double v = strtod(tmp, NULL);
#endif
    if (tmp != buf) free(tmp);
    if (isinf(v)) { fail(ps, s, "number out of range"); return 0; }
    *out = v;
    ps->p = p;
    return 1;
}

/* ---- values ---- */
static fm_json *new_node(json_parser *ps, fm_json_type t, int root) {
    fm_json *v = root ? &ps->doc->root : arena_alloc(ps, sizeof *v);
    if (!v) return oom(ps);
    memset(v, 0, sizeof *v);
    v->t = t;
    return v;
}

static int literal(json_parser *ps, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(ps->end - ps->p) >= n && memcmp(ps->p, word, n) == 0) {
        ps->p += n;
        return 1;
    }
    return 0;
}

/* merge sort of entry indices by key (stable; no qsort_r portability issues) */
static void sort_idx(int32_t *a, int32_t *tmp, int32_t n, const char **keys, const size_t *lens) {
    if (n < 2) return;
    int32_t h = n / 2;
    sort_idx(a, tmp, h, keys, lens);
    sort_idx(a + h, tmp, n - h, keys, lens);
    int32_t i = 0, j = h, k = 0;
    while (i < h && j < n)
        tmp[k++] = key_cmp(keys[a[j]], lens[a[j]], keys[a[i]], lens[a[i]]) < 0 ? a[j++] : a[i++];
    while (i < h) tmp[k++] = a[i++];
    while (j < n) tmp[k++] = a[j++];
    memcpy(a, tmp, (size_t)n * sizeof *a);
}

static fm_json *parse_value(json_parser *ps, int depth, int root);

/* move the children pushed since `base` into the container's arena tables */
static int close_container(json_parser *ps, fm_json *v, size_t base, int is_obj, const char *open) {
    size_t n = ps->st_n - base;
    if (n > INT32_MAX) { fail(ps, open, "container has too many entries"); return 0; }
    v->n = (int32_t)n;
    if (n) {
        v->u.c.items = arena_alloc(ps, n * sizeof(fm_json *));
        if (!v->u.c.items) { oom(ps); return 0; }
        memcpy(v->u.c.items, ps->st_items + base, n * sizeof(fm_json *));
        if (is_obj) {
            v->u.c.keys = arena_alloc(ps, n * sizeof(char *));
            v->u.c.key_lens = arena_alloc(ps, n * sizeof(size_t));
            if (!v->u.c.keys || !v->u.c.key_lens) { oom(ps); return 0; }
            memcpy(v->u.c.keys, ps->st_keys + base, n * sizeof(char *));
            memcpy(v->u.c.key_lens, ps->st_lens + base, n * sizeof(size_t));
            const char **k = v->u.c.keys;
            const size_t *kl = v->u.c.key_lens;
            int32_t dup = -1;
            if (n >= FM_JSON_INDEX_MIN) {
                int32_t *idx = arena_alloc(ps, n * sizeof(int32_t));
                int32_t *tmp = malloc(n * sizeof(int32_t));
                if (!idx || !tmp) { free(tmp); oom(ps); return 0; }
                for (size_t i = 0; i < n; i++) idx[i] = (int32_t)i;
                sort_idx(idx, tmp, (int32_t)n, k, kl);
                free(tmp);
                for (size_t i = 1; i < n && dup < 0; i++)
                    if (key_cmp(k[idx[i - 1]], kl[idx[i - 1]], k[idx[i]], kl[idx[i]]) == 0)
                        dup = idx[i] > idx[i - 1] ? idx[i] : idx[i - 1];
                v->u.c.sorted = idx;
            } else {
                for (size_t i = 1; i < n && dup < 0; i++)
                    for (size_t j = 0; j < i; j++)
                        if (key_cmp(k[j], kl[j], k[i], kl[i]) == 0) { dup = (int32_t)i; break; }
            }
            if (dup >= 0) {
                char msg[160];
                snprintf(msg, sizeof msg, "duplicate key \"%.100s\" in object", k[dup]);
                fail(ps, open, msg);
                return 0;
            }
        }
    }
    ps->st_n = base;
    return 1;
}

static fm_json *parse_array(json_parser *ps, int depth, int root) {
    const char *open = ps->p++;
    fm_json *v = new_node(ps, FM_JSON_ARR, root);
    if (!v) return NULL;
    size_t base = ps->st_n;
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == ']') {
        ps->p++;
        return v;
    }
    for (;;) {
        skip_ws(ps);
        fm_json *item = parse_value(ps, depth + 1, 0);
        if (!item) return NULL;
        if (!stack_push(ps, item, NULL, 0)) return oom(ps);
        skip_ws(ps);
        if (ps->p >= ps->end) return fail(ps, open, "unterminated array");
        if (*ps->p == ',') { ps->p++; continue; }
        if (*ps->p == ']') { ps->p++; break; }
        return fail(ps, ps->p, "expected ',' or ']' in array");
    }
    if (!close_container(ps, v, base, 0, open)) return NULL;
    return v;
}

static fm_json *parse_object(json_parser *ps, int depth, int root) {
    const char *open = ps->p++;
    fm_json *v = new_node(ps, FM_JSON_OBJ, root);
    if (!v) return NULL;
    size_t base = ps->st_n;
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == '}') {
        ps->p++;
        return v;
    }
    for (;;) {
        skip_ws(ps);
        if (ps->p >= ps->end) return fail(ps, open, "unterminated object");
        if (*ps->p != '"') return fail(ps, ps->p, "expected a string key in object");
        size_t klen;
        const char *key = parse_string(ps, &klen);
        if (!key) return NULL;
        skip_ws(ps);
        if (ps->p >= ps->end || *ps->p != ':') return fail(ps, ps->p, "expected ':' after object key");
        ps->p++;
        skip_ws(ps);
        fm_json *item = parse_value(ps, depth + 1, 0);
        if (!item) return NULL;
        if (!stack_push(ps, item, key, klen)) return oom(ps);
        skip_ws(ps);
        if (ps->p >= ps->end) return fail(ps, open, "unterminated object");
        if (*ps->p == ',') { ps->p++; continue; }
        if (*ps->p == '}') { ps->p++; break; }
        return fail(ps, ps->p, "expected ',' or '}' in object");
    }
    if (!close_container(ps, v, base, 1, open)) return NULL;
    return v;
}

static fm_json *parse_value(json_parser *ps, int depth, int root) {
    if (depth >= FM_JSON_MAX_DEPTH) return fail(ps, ps->p, "nesting too deep (limit 256)");
    if (ps->p >= ps->end) return fail(ps, ps->p, "unexpected end of input, value expected");
    fm_json *v;
    switch (*ps->p) {
    case '{': return parse_object(ps, depth, root);
    case '[': return parse_array(ps, depth, root);
    case '"': {
        size_t len;
        const char *s = parse_string(ps, &len);
        if (!s || !(v = new_node(ps, FM_JSON_STR, root))) return NULL;
        v->u.str.s = s;
        v->u.str.len = len;
        return v;
    }
    case 't':
    case 'f':
    case 'n': {
        fm_json_type t = *ps->p == 'n' ? FM_JSON_NULL : FM_JSON_BOOL;
        int b = *ps->p == 't';
        if (!literal(ps, *ps->p == 't' ? "true" : *ps->p == 'f' ? "false" : "null"))
            return fail(ps, ps->p, "invalid literal");
        if (!(v = new_node(ps, t, root))) return NULL;
        v->u.b = b;
        return v;
    }
    default: {
        double d;
        if (!parse_number(ps, &d) || !(v = new_node(ps, FM_JSON_NUM, root))) return NULL;
        v->u.num = d;
        return v;
    }
    }
}

/* ---- public ---- */
static void free_chunks(json_chunk *c) {
    while (c) {
        json_chunk *n = c->next;
        free(c);
        c = n;
    }
}

fm_json *fm_json_parse(const char *text, size_t len, char *err, size_t errlen) {
    if (err && errlen) err[0] = 0;
    if (!text && len) {
        fm_errf(err, errlen, FM_ERR_ARG, "fm_json_parse: text is NULL");
        return NULL;
    }
    json_doc *doc = calloc(1, sizeof *doc);
    if (!doc) {
        fm_errf(err, errlen, FM_ERR_OOM, "line 1 col 1: out of memory");
        return NULL;
    }
    doc->magic = FM_JSON_MAGIC;
    json_parser ps = {0};
    ps.text = text ? text : "";
    ps.p = ps.text;
    ps.end = ps.text + len;
    ps.doc = doc;
    ps.err = err;
    ps.errlen = errlen;
#if defined(__GLIBC__) || defined(__APPLE__)
    ps.cloc = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
#endif
    if (len >= 3 && memcmp(ps.p, "\xef\xbb\xbf", 3) == 0) ps.p += 3;
    skip_ws(&ps);
    fm_json *root = parse_value(&ps, 0, 1);
    if (root) {
        skip_ws(&ps);
        if (ps.p != ps.end) root = fail(&ps, ps.p, "unexpected data after the JSON value");
    }
    free(ps.st_items);
    free(ps.st_keys);
    free(ps.st_lens);
#if defined(__GLIBC__) || defined(__APPLE__)
    if (ps.cloc) freelocale(ps.cloc);
#endif
    if (!root) {
        free_chunks(doc->chunks);
        free(doc);
        return NULL;
    }
    return &doc->root;
}

void fm_json_free(fm_json *root) {
    if (!root) return;
    json_doc *doc = (json_doc *)root;
    if (doc->magic != FM_JSON_MAGIC) return; /* not a root: owned by its document */
    doc->magic = 0;
    free_chunks(doc->chunks);
    free(doc);
}

fm_json_type fm_json_kind(const fm_json *v) { return v ? v->t : FM_JSON_NULL; }

const fm_json *fm_json_get(const fm_json *obj, const char *key) {
    if (!obj || obj->t != FM_JSON_OBJ || !key) return NULL;
    size_t kl = strlen(key);
    const char **k = obj->u.c.keys;
    const size_t *lens = obj->u.c.key_lens;
    if (obj->u.c.sorted) {
        const int32_t *idx = obj->u.c.sorted;
        int32_t lo = 0, hi = obj->n;
        while (lo < hi) {
            int32_t mid = lo + (hi - lo) / 2;
            int c = key_cmp(k[idx[mid]], lens[idx[mid]], key, kl);
            if (c == 0) return obj->u.c.items[idx[mid]];
            if (c < 0) lo = mid + 1;
            else hi = mid;
        }
        return NULL;
    }
    for (int32_t i = 0; i < obj->n; i++)
        if (lens[i] == kl && memcmp(k[i], key, kl) == 0) return obj->u.c.items[i];
    return NULL;
}

int32_t fm_json_len(const fm_json *v) {
    return v && (v->t == FM_JSON_ARR || v->t == FM_JSON_OBJ) ? v->n : 0;
}

const fm_json *fm_json_at(const fm_json *v, int32_t i) {
    if (!v || (v->t != FM_JSON_ARR && v->t != FM_JSON_OBJ) || i < 0 || i >= v->n) return NULL;
    return v->u.c.items[i];
}

const char *fm_json_key_at(const fm_json *obj, int32_t i) {
    if (!obj || obj->t != FM_JSON_OBJ || i < 0 || i >= obj->n) return NULL;
    return obj->u.c.keys[i];
}

double fm_json_num(const fm_json *v, double dflt) { return v && v->t == FM_JSON_NUM ? v->u.num : dflt; }

int fm_json_bool(const fm_json *v, int dflt) { return v && v->t == FM_JSON_BOOL ? v->u.b : dflt; }

const char *fm_json_str(const fm_json *v) { return v && v->t == FM_JSON_STR ? v->u.str.s : NULL; }

/* ---- test hook (tests/test_io.py via ctypes) ----
 * Parses text and writes a compact re-serialization into out (objects in document order), using
 * only the public accessors; also checks that fm_json_get finds every key of every object.
 * Returns the output length, or -1 (parse error, message in err), -2 (out too small),
 * -3 (fm_json_get disagrees with fm_json_at). */
typedef struct { char *o; size_t n, cap; int bad; } json_out;

static void out_put(json_out *w, const char *s, size_t n) {
    if (w->n + n > w->cap) { w->bad = w->bad ? w->bad : -2; return; }
    memcpy(w->o + w->n, s, n);
    w->n += n;
}

static void out_str(json_out *w, const char *s, size_t n) {
    out_put(w, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char b[8];
        if (c == '"' || c == '\\') { b[0] = '\\'; b[1] = (char)c; out_put(w, b, 2); }
        else if (c < 0x20) { snprintf(b, sizeof b, "\\u%04x", c); out_put(w, b, 6); }
        else out_put(w, (const char *)&s[i], 1);
    }
    out_put(w, "\"", 1);
}

static void out_value(json_out *w, const fm_json *v) {
    char b[40];
    switch (fm_json_kind(v)) {
    case FM_JSON_NULL: out_put(w, "null", 4); break;
    case FM_JSON_BOOL: fm_json_bool(v, 0) ? out_put(w, "true", 4) : out_put(w, "false", 5); break;
    case FM_JSON_NUM: {
        int n = snprintf(b, sizeof b, "%.17g", fm_json_num(v, 0));
        for (int i = 0; i < n; i++) if (b[i] == ',') b[i] = '.'; /* locale-proof */
        out_put(w, b, (size_t)n);
        break;
    }
    case FM_JSON_STR: out_str(w, v->u.str.s, v->u.str.len); break;
    case FM_JSON_ARR:
        out_put(w, "[", 1);
        for (int32_t i = 0; i < fm_json_len(v); i++) {
            if (i) out_put(w, ",", 1);
            out_value(w, fm_json_at(v, i));
        }
        out_put(w, "]", 1);
        break;
    case FM_JSON_OBJ:
        out_put(w, "{", 1);
        for (int32_t i = 0; i < fm_json_len(v); i++) {
            if (i) out_put(w, ",", 1);
            const char *k = fm_json_key_at(v, i);
            if (strlen(k) == v->u.c.key_lens[i] && fm_json_get(v, k) != fm_json_at(v, i)) w->bad = -3;
            out_str(w, k, v->u.c.key_lens[i]);
            out_put(w, ":", 1);
            out_value(w, fm_json_at(v, i));
        }
        out_put(w, "}", 1);
        break;
    }
}

int64_t fm_test_json_roundtrip(const char *text, size_t len, char *out, size_t outlen, char *err,
                               size_t errlen) {
    fm_json *root = fm_json_parse(text, len, err, errlen);
    if (!root) return -1;
    json_out w = {out, 0, outlen, 0};
    out_value(&w, root);
    fm_json_free(root);
    return w.bad ? w.bad : (int64_t)w.n;
}
