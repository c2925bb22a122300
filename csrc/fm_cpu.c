/* fm_cpu.c: the CPU backend.
 *
 * Owns: the CPU backend's routed-expert op for one token (fm_cpu_experts_token, also called by the
 * CUDA backend's CPU split).
 * Does not own: kernels (fm_quant.c), ops (fm_ops.c), reads (fm_io.c).
 */
#include "fm_model.h"

/* one token through nc experts: gate+up rows of every expert in one pool job, then down rows */
typedef struct {
    const fm_part *parts;
    const uint8_t *const *blk;
    const float *x;
    float *g, *u, *y;
    int64_t I, H;
} fm_exp_job;

static void job_exp_gu(void *ctx, int64_t s, int64_t e, int32_t tid) {
    (void)tid;
    fm_exp_job *j = ctx;
    int64_t I = j->I;
    while (s < e) {
        int64_t c = s / (2 * I), r = s % (2 * I);
        int up = r >= I;
        int64_t r0 = up ? r - I : r;
        int64_t end = c * 2 * I + (up ? 2 * I : I);
        int64_t r1 = r0 + ((e < end ? e : end) - s);
        fm_qmat w = fm_part_view(&j->parts[up ? FM_PART_UP : FM_PART_GATE], j->blk[c]);
        fm_qmat_matvec_rows(&w, j->x, (up ? j->u : j->g) + c * I, r0, r1);
        s += r1 - r0;
    }
}

static void job_exp_down(void *ctx, int64_t s, int64_t e, int32_t tid) {
    (void)tid;
    fm_exp_job *j = ctx;
    int64_t H = j->H;
    while (s < e) {
        int64_t c = s / H, r0 = s % H;
        int64_t end = (c + 1) * H;
        int64_t r1 = r0 + ((e < end ? e : end) - s);
        fm_qmat w = fm_part_view(&j->parts[FM_PART_DOWN], j->blk[c]);
        fm_qmat_matvec_rows(&w, j->g + c * j->I, j->y + c * H, r0, r1);
        s += r1 - r0;
    }
}

/* rows per pool chunk: about 16 KiB of weights */
static int64_t grain_rows(const fm_qmat *W) {
    int64_t rb = (int64_t)(fm_qmat_bytes(W) / (uint64_t)(W->rows > 0 ? W->rows : 1)) + 1;
    int64_t g = 16384 / rb;
    return g < 4 ? 4 : g;
}

void fm_cpu_experts_token(fm_pool *pool, const fm_model *m, const fm_layer *L, const uint8_t *const *blocks,
                          int32_t nc, const float *xn, float *g, float *u, float *ye) {
    if (nc <= 0) return;
    int64_t I = m->moe_I, H = m->H;
    fm_exp_job j = {L->parts, blocks, xn, g, u, ye, I, H};
    fm_qmat wg = fm_part_view(&L->parts[FM_PART_GATE], blocks[0]);
    fm_qmat wd = fm_part_view(&L->parts[FM_PART_DOWN], blocks[0]);
    fm_pool_for(pool, (int64_t)nc * 2 * I, grain_rows(&wg), job_exp_gu, &j);
    for (int64_t i = 0; i < (int64_t)nc * I; i++) g[i] = fm_silu(g[i]) * u[i];
    fm_pool_for(pool, (int64_t)nc * H, grain_rows(&wd), job_exp_down, &j);
}
