/* fm_cuda_state.cu: the CUDA backend's session state hooks (fm_backend.state_get / state_set) for
 * fm_state.c's snapshots: one piece (KV rows [0, rows) of a full-attention layer, or the conv or
 * recurrent state of a linear-attention layer) copied between the session's device arrays and a
 * caller's host buffer on the model's compute stream, which is then synchronized: the copy is
 * ordered after every launch of earlier evals and complete (the host buffer free) on return.
 * The layouts are the CPU backend's (f32, fmc_session's arrays), so snapshots cross backends.
 */
#include "fmc_internal.cuh"

/* the device array of piece idx and its bytes for `rows` KV rows */
static float *fmc_state_piece(fm_session *s, int32_t piece, int32_t idx, int32_t rows, size_t *bytes) {
    fmc_session *c = (fmc_session *)s->bs;
    *bytes = sizeof(float) * (size_t)fm_state_piece_floats(s->m, piece, rows);
    return piece == FM_STATE_K ? c->kc[idx] : piece == FM_STATE_V ? c->vc[idx] : piece == FM_STATE_CONV ? c->conv[idx]
                                                                                                  : c->ssm[idx];
}

static fm_status fmc_state_check(fm_session *s, int32_t piece, int32_t idx, int32_t rows, char *err, size_t errlen) {
    const fm_model *m = s->m;
    const fmc_session *c = (const fmc_session *)s->bs;
    if (!c) return fm_errf(err, errlen, FM_ERR_BACKEND, "CUDA session state: the session has no device state");
    int32_t n = (piece == FM_STATE_K || piece == FM_STATE_V) ? m->n_full : m->n_linear;
    if (piece < FM_STATE_K || piece > FM_STATE_SSM || idx < 0 || idx >= n ||
        ((piece == FM_STATE_K || piece == FM_STATE_V) && (rows < 1 || rows > c->n_ctx)))
        return fm_errf(err, errlen, FM_ERR_ARG, "CUDA session state: piece %d index %d rows %d out of range", piece,
                       idx, rows);
    return FM_OK;
}

fm_status fmc_state_get(fm_session *s, int32_t piece, int32_t idx, int32_t rows, void *dst, char *err,
                                   size_t errlen) {
    CKS(fmc_state_check(s, piece, idx, rows, err, errlen));
    size_t bytes;
    const float *d = fmc_state_piece(s, piece, idx, rows, &bytes);
    cudaStream_t st = ((fmc_session *)s->bs)->cm->cs;
    CK(cudaSetDevice(0));
    CK(cudaMemcpyAsync(dst, d, bytes, cudaMemcpyDeviceToHost, st));
    CK(cudaStreamSynchronize(st));
    ((fmc_session *)s->bs)->cnt.syncs++;
    return FM_OK;
}

fm_status fmc_state_set(fm_session *s, int32_t piece, int32_t idx, int32_t rows, const void *src,
                                   char *err, size_t errlen) {
    CKS(fmc_state_check(s, piece, idx, rows, err, errlen));
    size_t bytes;
    float *d = fmc_state_piece(s, piece, idx, rows, &bytes);
    cudaStream_t st = ((fmc_session *)s->bs)->cm->cs;
    CK(cudaSetDevice(0));
    CK(cudaMemcpyAsync(d, src, bytes, cudaMemcpyHostToDevice, st));
    CK(cudaStreamSynchronize(st));
    ((fmc_session *)s->bs)->cnt.syncs++;
    return FM_OK;
}
