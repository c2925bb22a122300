/* fm_cuda_experts.cu: the compute of a MoE layer's routed experts, on the GPU and on the host.
 *
 * Owns: the expert launches over (token, k) pairs whose blocks sit in VRAM slots (one kernel pair
 * per chunk; prefill grouped by expert on tensor cores from a host-built work list; decode pair
 * sets behind their copies), and the CPU split: part of a decode layer's missed experts computed
 * on the host from fm_io's RAM cache (fm_cpu_experts_token, the CPU backend's op) while the GPU copies and
 * computes the rest (fmc_split_count, calibration, rate EMAs, the host share on the calling
 * thread: a worker thread for it measured slower, bench/RESULTS.md).
 * Does not own: which experts are where and the reads/copies (fm_cuda_moe.cu), kernels
 * (fm_cuda_kernels.cuh, fm_cuda_mma.cuh).
 */
#include <stdlib.h>

#include "fmc_internal.cuh"

/* prefill (n > 1): the routed experts grouped by expert on tensor cores. The host sorts a chunk's
 * pairs by expert id (counting sort, pairs ascending within an expert) into a permutation and a
 * work list of items {first, count <= 8*NT}: hw = [items (2 * nitems) | perm (np)]. Pairs with
 * hptrs[p] == NULL (not in this chunk) are left out. cnt: scratch [E]. */
fm_status fmc_mma_work_build(const int32_t *ids, const uint8_t *const *hptrs, int64_t npairs, int64_t E,
                                int32_t *cnt, int32_t *hw, int *nt_out, int64_t *nitems_out, int64_t *np_out, char *err,
                                size_t errlen) {
    for (int64_t e = 0; e < E; e++) cnt[e] = 0;
    int64_t np = 0;
    for (int64_t p = 0; p < npairs; p++) {
        if (hptrs && !hptrs[p]) continue;
        const int32_t e = ids[p];
        if (e < 0 || e >= E) return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: router produced expert id %d", e);
        cnt[e]++;
        np++;
    }
    int32_t maxc = 0;
    for (int64_t e = 0; e < E; e++)
        if (cnt[e] > maxc) maxc = cnt[e];
    const int nt = fmc_mma_nt(maxc), cap = 8 * nt;
    int64_t nitems = 0, run = 0;
    for (int64_t e = 0; e < E; e++) {
        const int32_t v = cnt[e];
        nitems += (v + cap - 1) / cap;
        cnt[e] = (int32_t)run; /* exclusive offsets */
        run += v;
    }
    int32_t *perm = hw + 2 * nitems;
    for (int64_t p = 0; p < npairs; p++) {
        if (hptrs && !hptrs[p]) continue;
        perm[cnt[ids[p]]++] = (int32_t)p; /* cnt[e] ends as the end of expert e */
    }
    int64_t it = 0, beg = 0;
    for (int64_t e = 0; e < E; e++) {
        const int64_t end = cnt[e];
        for (int64_t f = beg; f < end; f += cap) {
            hw[2 * it] = (int32_t)f;
            hw[2 * it + 1] = (int32_t)(end - f < cap ? end - f : cap);
            it++;
        }
        beg = end;
    }
    *nt_out = nt;
    *nitems_out = nitems;
    *np_out = np;
    return FM_OK;
}

/* gate and up read by one fused kernel (one kind and group size) */
static int gu_fused(const DPart &pg, const DPart &pu) { return fmc_gu_fused(pg.kind, pg.gs, pu.kind, pu.gs); }

int fmc_mma_experts_ok(const DPart &pg, const DPart &pu, const DPart &pd, int64_t H) {
    return fmc_mma_mat_ok(pg.kind, pg.cols, pg.gs) && fmc_mma_mat_ok(pu.kind, pu.cols, pu.gs) && pu.rows == pg.rows &&
           pu.cols == pg.cols && fmc_mma_mat_ok(pd.kind, pd.cols, pd.gs) && pd.cols == pg.rows && pg.cols == H;
}

/* dw: the device copy of a work list (fmc_mma_work_build). gate + up: Hbuf[p*I + r] = silu(g) * u from
 * row p / K of xn [., H]; down: Ye[p*H + r] from Hbuf[p]. Each block reads one row tile of one
 * expert once for all of its item's pairs. Gate and up of different formats: two plain launches,
 * the gate into Hbuf, then the up stored as silu(Hbuf) * u (FMC_Y_GLU). */
fm_status fmc_mma_launch_experts(cudaStream_t st, const uint8_t *const *dptrs, const int32_t *dw, int64_t nitems,
                                    int nt, const DPart &pg, const DPart &pu, const DPart &pd, int K, int64_t H,
                                    const float *xn, float *hb, float *ye, char *err, size_t errlen) {
    if (nitems <= 0) return FM_OK;
    if (nitems > 65535) return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA: %lld expert work items", (long long)nitems);
    MmaArgs a;
    memset(&a, 0, sizeof a);
    a.ptrs = dptrs;
    a.items = dw;
    a.perm = dw + 2 * nitems;
    a.PA = pg;
    a.PB = pu;
    a.in_div = K;
    a.X = xn;
    a.ldx = H;
    a.Y = hb;
    a.ldy = pg.rows;
    if (gu_fused(pg, pu)) {
        dim3 g1((unsigned)((pg.rows + FMC_MMA_ROWS / 2 - 1) / (FMC_MMA_ROWS / 2)), (unsigned)nitems);
        CKS(fmc_mma_launch(1, st, a, pg.kind, nt, g1, err, errlen));
    } else {
        dim3 g1((unsigned)((pg.rows + FMC_MMA_ROWS - 1) / FMC_MMA_ROWS), (unsigned)nitems);
        a.PB = pg;
        a.accumulate = FMC_Y_SET;
        CKS(fmc_mma_launch(0, st, a, pg.kind, nt, g1, err, errlen));
        a.PA = a.PB = pu;
        a.accumulate = FMC_Y_GLU;
        CKS(fmc_mma_launch(0, st, a, pu.kind, nt, g1, err, errlen));
        a.accumulate = FMC_Y_SET;
    }
    a.PA = a.PB = pd;
    a.in_div = 1;
    a.X = hb;
    a.ldx = pd.cols;
    a.Y = ye;
    a.ldy = pd.rows;
    dim3 g2((unsigned)((pd.rows + FMC_MMA_ROWS - 1) / FMC_MMA_ROWS), (unsigned)nitems);
    CKS(fmc_mma_launch(0, st, a, pd.kind, nt, g2, err, errlen));
    return FM_OK;
}

/* the work list goes up in one copy from this chunk's region of the pinned cm->h_mwork; a region is
 * rewritten only after the host has synced past the copy that read it (the next layer's ev_topi
 * wait, or the stream sync below) */
static fm_status launch_experts_grouped(fmc_ctx *x, const cl_layer *L, const uint8_t *const *dptrs,
                                        const uint8_t *const *hptrs, int64_t ci, int64_t npairs, char *err,
                                        size_t errlen) {
    fm_model *m = x->m;
    fmc_session *c = x->c;
    fmc_model *cm = x->cm;
    cudaStream_t st = cm->cs;
    if (!hptrs) { /* resident: the routed ids live on the device only */
        CK(cudaMemcpyAsync(cm->h_topi, c->topi, sizeof(int32_t) * (size_t)npairs, cudaMemcpyDeviceToHost, st));
        CK(cudaStreamSynchronize(st));
        c->cnt.syncs++;
    }
    const int64_t reg = 3 * (int64_t)FMC_UBATCH * m->k_tok;
    int32_t *hw = cm->h_mwork + ci * reg, *dw = cm->d_mwork + ci * reg;
    int nt = 1;
    int64_t nitems = 0, np = 0;
    CKS(fmc_mma_work_build(cm->h_topi, hptrs, npairs, m->n_experts, cm->mcnt, hw, &nt, &nitems, &np, err, errlen));
    if (!np) return FM_OK;
    CK(cudaMemcpyAsync(dw, hw, sizeof(int32_t) * (size_t)(2 * nitems + np), cudaMemcpyHostToDevice, st));
    return fmc_mma_launch_experts(st, dptrs, dw, nitems, nt, L->pg, L->pu, L->pd, m->k_tok, m->H, c->xn, c->hb, c->ye, err,
                              errlen);
}

/* the routed experts of npairs (token, k) pairs; dptrs: device pointer per pair (NULL: not in
 * this chunk). Prefill (n > 1) goes grouped by expert (launch_experts_grouped); hptrs: the host
 * copy of this chunk's pointers (cached tiers; NULL: resident, ids read back here), ci: chunk */
/* grids of the gate+up and down expert kernels for n experts (blockIdx.y): a pair's rows spread
 * over fewer blocks when many pairs run at once */
static void expert_grids(const cl_layer *L, int sms, int64_t n, dim3 *gu, dim3 *gd) {
    /* gate+up fused: 2 rows of each per warp pass; split (one part per launch): FMC_MV_R rows */
    dim3 g1 = fmc_mv_grid(L->pg.rows, gu_fused(L->pg, L->pu) ? 2 : FMC_MV_R, sms),
         g2 = fmc_mv_grid(L->pd.rows, FMC_MV_R, sms);
    const int64_t want = (int64_t)sms * 8;
    if ((int64_t)g1.x * n > want) g1.x = (unsigned)((want + n - 1) / n);
    if ((int64_t)g2.x * n > want) g2.x = (unsigned)((want + n - 1) / n);
    if (g1.x < 1) g1.x = 1;
    if (g2.x < 1) g2.x = 1;
    g1.y = g2.y = (unsigned)n;
    *gu = g1;
    *gd = g2;
}

fm_status fmc_launch_experts(fmc_ctx *x, const cl_layer *L, const uint8_t *const *dptrs,
                                const uint8_t *const *hptrs, int64_t ci, int64_t npairs, char *err, size_t errlen) {
    fm_model *m = x->m;
    fmc_session *c = x->c;
    cudaStream_t st = x->cm->cs;
    const int K = m->k_tok;
    /* grouped by expert (host work list): prefill, and any pass whose routed ids are on the host
     * already (hptrs, the cached tiers). A resident multi-sequence decode step keeps the per-pair
     * kernels: the grouped path would wait for the ids on the host once per layer (a full stream
     * sync), which costs more than re-reading the few experts its rows share from VRAM / L2 */
    if (x->n > 1 && !x->graph && x->cm->mcnt && m->debug.cuda_mma && fmc_mma_experts_ok(L->pg, L->pu, L->pd, m->H) &&
        (hptrs || !x->rows))
        return launch_experts_grouped(x, L, dptrs, hptrs, ci, npairs, err, errlen);
    dim3 gg, gd;
    expert_grids(L, x->cm->sms, npairs, &gg, &gd);
#define LG(KD) k_moe_gateup<KD><<<gg, FMC_WARPS * 32, 0, st>>>(L->pg, L->pu, dptrs, K, c->xn, m->H, c->hb)
#define LPG(KD) k_moe_part<KD><<<gg, FMC_WARPS * 32, 0, st>>>(L->pg, dptrs, K, c->xn, m->H, c->hb, FMC_Y_SET)
#define LPU(KD) k_moe_part<KD><<<gg, FMC_WARPS * 32, 0, st>>>(L->pu, dptrs, K, c->xn, m->H, c->hb, FMC_Y_GLU)
#define LD(KD) k_moe_down<KD><<<gd, FMC_WARPS * 32, 0, st>>>(L->pd, dptrs, c->hb, c->ye)
    if (gu_fused(L->pg, L->pu)) { /* fused: one kind and group size */
        KIND_SWITCH(L->pg.kind, LG)
    } else { /* split: the gate, then the up stored as silu(gate) * up (each its own format) */
        KIND_SWITCH(L->pg.kind, LPG)
        CKL();
        KIND_SWITCH(L->pu.kind, LPU)
    }
    CKL();
    KIND_SWITCH(L->pd.kind, LD)
    CKL();
#undef LG
#undef LPG
#undef LPU
#undef LD
    return FM_OK;
}

/* ---- the CPU share of a layer's missed experts (decode, one token) ----
 * y_cpu = sum_j w_j * down_j(silu(gate_j x) * up_j x) over the experts in cm->cblk, straight from
 * fm_io's RAM cache (page-locked), by the CPU backend's expert op (fm_cpu_experts_token, fm_cpu.c) */

/* the nc experts of cm->cblk on the host: cm->cy[j*H..] = expert j's output (unweighted) */
static void cpu_experts(fmc_model *cm, const fm_layer *FL, int64_t nc, const float *xn) {
    fm_model *m = cm->m;
    fm_cpu_experts_token(m->pool, m, FL, cm->cblk, (int32_t)nc, xn, cm->cg, cm->cu, cm->cy);
}

/* how many of a layer's misses the CPU takes: m_ram of them are in fm_io's RAM cache (the only
 * ones the CPU can take), m_other come from storage (always the GPU's). split > 0: that fraction of
 * m_ram; split < 0 (auto): both sides finish at once when the CPU takes a share rate_cpu /
 * (rate_cpu + rate_h2d) of all the missed bytes. */
int64_t fmc_split_count(double split, double rate_h2d, double rate_cpu, int64_t m_ram, int64_t m_other,
                           int probe) {
    if (split == 0.0 || m_ram <= 0) return 0;
    double want;
    if (split > 0.0) {
        want = split * (double)m_ram;
    } else if (rate_h2d <= 0.0 || rate_cpu <= 0.0) {
        want = 1.0; /* a rate not measured yet: one expert on the host measures both sides */
    } else {
        want = (double)(m_ram + m_other) * rate_cpu / (rate_cpu + rate_h2d);
        /* a share under 2 experts does not pay for itself: its result still has to cross PCIe
         * after the host's fixed costs, and on the H100 machine such shares made decode slower
         * than PCIe alone (bench/RESULTS.md). Off then, except a 1-expert probe (probe != 0) that
         * keeps rate_cpu current, so the split comes back when the host is fast again. */
        if (want < 1.5) want = probe ? 1.0 : 0.0;
    }
    int64_t n = (int64_t)(want + 0.5);
    if (n < 0) n = 0;
    if (n > m_ram) n = m_ram;
    return n;
}

void fmc_ema(double *r, double sample) {
    if (!(sample > 0.0) || !isfinite(sample)) return;
    *r = *r > 0.0 ? 0.75 * *r + 0.25 * sample : sample;
}

/* first auto-split layer: time a few of this layer's blocks in fm_io's RAM cache (page-locked)
 * over PCIe and on the CPU pool (the online EMAs refine both afterwards). Between requests: the
 * fm_io_peek pointers stay valid until the next fm_io_submit. */
fm_status fmc_split_calibrate(fmc_model *cm, fmc_session *c, int32_t il, const fm_layer *FL, char *err,
                                 size_t errlen) {
    (void)c;
    cm->calibrated = 1;
    fm_model *m = cm->m;
    const int64_t E = m->n_experts, cap = m->k_tok < 4 ? m->k_tok : 4;
    const uint64_t bb = FL->block_bytes;
    int64_t nb = 0;
    for (int64_t e = 0; e < E && nb < cap; e++) {
        const uint8_t *blk = fm_io_peek(m->io, il, (int32_t)e);
        if (blk) cm->cblk[nb++] = blk;
    }
    if (nb < 1) return FM_OK; /* nothing of this layer in RAM yet: the online rates decide */
    void *d = NULL;
    CK(cudaMalloc(&d, (size_t)nb * bb));
    float best = 0.f;
    cudaError_t e = cudaSuccess;
    for (int rep = 0; rep < 3 && e == cudaSuccess; rep++) {
        cudaEventRecord(cm->ev_t0, cm->xs);
        for (int64_t i = 0; i < nb; i++)
            cudaMemcpyAsync((uint8_t *)d + (uint64_t)i * bb, cm->cblk[i], bb, cudaMemcpyHostToDevice, cm->xs);
        cudaEventRecord(cm->ev_t1, cm->xs);
        e = cudaEventSynchronize(cm->ev_t1);
        float ms = 0.f;
        if (e == cudaSuccess) e = cudaEventElapsedTime(&ms, cm->ev_t0, cm->ev_t1);
        if (e == cudaSuccess && ms > 0.f && (best == 0.f || ms < best)) best = ms;
    }
    cudaFree(d);
    CK(e);
    if (best > 0.f) cm->rate_h2d = (double)((uint64_t)nb * bb) / (double)best;
    double bc = 0.0;
    for (int rep = 0; rep < 3; rep++) {
        const double t0 = fm_now_ms();
        cpu_experts(cm, FL, nb, cm->h_xn);
        const double ms = fm_now_ms() - t0;
        if (rep > 0 && (bc == 0.0 || ms < bc)) bc = ms;
    }
    if (bc > 0.0) cm->rate_cpu = (double)((uint64_t)nb * bb) / bc;
    return FM_OK;
}

/* the host's share of a decode layer's misses (cm->cblk / cm->cpair, ncpu of them): the experts on
 * the CPU pool, then their weighted sum into h_ycpu */
static void host_share_compute(fmc_model *cm, const fm_layer *FL, int64_t ncpu) {
    const int64_t H = cm->m->H;
    cpu_experts(cm, FL, ncpu, cm->h_xn);
    for (int64_t d = 0; d < H; d++) cm->h_ycpu[d] = 0.f;
    for (int64_t j = 0; j < ncpu; j++) {
        const float w = cm->cpair[j] >= 0 ? cm->h_topw[cm->cpair[j]] : 0.f;
        const float *src = cm->cy + j * H;
        for (int64_t d = 0; d < H; d++) cm->h_ycpu[d] += w * src[d];
    }
}

/* the host share on the calling thread, now (its time kept for fmc_host_share_finish) */
void fmc_host_share_inline(fmc_model *cm, const fm_layer *FL, int64_t ncpu) {
    const double t0 = fm_now_ms();
    host_share_compute(cm, FL, ncpu);
    cm->share_ms = fm_now_ms() - t0;
}

/* after fmc_host_share_inline: queue the share's sum for the combine (d_ycpu), set the pairs' bits
 * and charge its time */
fm_status fmc_host_share_finish(fmc_ctx *x, const fm_layer *FL, int64_t ncpu, uint32_t *hostmask,
                                const float **ycpu, char *err, size_t errlen) {
    fmc_model *cm = x->cm;
    fmc_session *c = x->c;
    const double ms = cm->share_ms;
    for (int64_t j = 0; j < ncpu; j++)
        if (cm->cpair[j] >= 0 && cm->cpair[j] < 32) *hostmask |= 1u << cm->cpair[j];
    fmc_ema(&cm->rate_cpu, (double)((uint64_t)ncpu * FL->block_bytes) / ms);
    c->cnt.cpu_experts += ncpu;
    c->cnt.cpu_layers++;
    c->cnt.cpu_ms += ms;
    CK(cudaMemcpyAsync(cm->d_ycpu, cm->h_ycpu, sizeof(float) * (size_t)x->m->H, cudaMemcpyHostToDevice, cm->cs));
    *ycpu = cm->d_ycpu;
    return FM_OK;
}

/* decode experts whose VRAM blocks are in S (cnt members), on the compute stream */
fm_status fmc_launch_dec(fmc_ctx *x, const cl_layer *L, const PairSet *S, int cnt, char *err, size_t errlen) {
    if (cnt <= 0) return FM_OK;
    fmc_session *c = x->c;
    cudaStream_t st = x->cm->cs;
    dim3 g1, g2;
    expert_grids(L, x->cm->sms, cnt, &g1, &g2);
#define LG(KD) k_dec_gateup<KD><<<g1, FMC_WARPS * 32, 0, st>>>(L->pg, L->pu, *S, c->xn, c->hb)
#define LPG(KD) k_dec_part<KD><<<g1, FMC_WARPS * 32, 0, st>>>(L->pg, *S, c->xn, c->hb, FMC_Y_SET)
#define LPU(KD) k_dec_part<KD><<<g1, FMC_WARPS * 32, 0, st>>>(L->pu, *S, c->xn, c->hb, FMC_Y_GLU)
#define LD(KD) k_dec_down<KD><<<g2, FMC_WARPS * 32, 0, st>>>(L->pd, *S, c->hb, c->ye)
    if (gu_fused(L->pg, L->pu)) { /* fused: one kind and group size */
        KIND_SWITCH(L->pg.kind, LG)
    } else { /* split: the gate, then the up stored as silu(gate) * up (each its own format) */
        KIND_SWITCH(L->pg.kind, LPG)
        CKL();
        KIND_SWITCH(L->pu.kind, LPU)
    }
    CKL();
    KIND_SWITCH(L->pd.kind, LD)
    CKL();
#undef LG
#undef LPG
#undef LPU
#undef LD
    return FM_OK;
}
