/* The elementwise kernels of the per-op path, float32, rows split across threads (rows.h), and the
 * K/V cache write. */
#include "rows.h"

/* out = w * r / sqrt(mean(r^2) + eps) per row, r = x (+ delta, stored into h when given): the residual
 * add and the RMSNorm of a decoder layer in one pass over the row. */
int rms_norm_f32(const float *x, const float *delta, float *h, const float *w, float eps, float *out, int64_t rows,
                 int64_t dim, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * dim >= 65536)
    for (int64_t r = 0; r < rows; r++)
        norm_row(x + r * dim, delta ? delta + r * dim : NULL, delta ? h + r * dim : NULL, w, eps, out + r * dim, dim);
    return EMBER_OK;
}

/* out[r, i] = silu(gu[r, i]) * gu[r, inter + i]: the gated MLP's activation on the fused gate/up output. */
int silu_mul_f32(const float *gu, float *out, int64_t rows, int64_t inter, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * inter >= 65536)
    for (int64_t r = 0; r < rows; r++) silu_mul_row(gu + r * 2 * inter, out + r * inter, inter);
    return EMBER_OK;
}

/* Rotary embedding in place on the first `heads` heads of each of `rows` rows (rotary_row). */
int rotary_f32(float *x, int64_t rows, int64_t row_stride, int64_t heads, int64_t dim, const float *cos,
               const float *sin, int64_t rot, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * heads * dim >= 65536)
    for (int64_t r = 0; r < rows; r++) rotary_row(x + r * row_stride, heads, dim, cos + r * rot, sin + r * rot, rot);
    return EMBER_OK;
}

/* Rows k[r], v[r] into cache slot slots[r] (kv_store_row), for the per-op path's K/V write. */
int kv_store(const float *k, int64_t k_stride, const float *v, int64_t v_stride, const int64_t *slots,
             int64_t rows, int64_t width, void *kc, void *vc, int bf16) {
    for (int64_t r = 0; r < rows; r++) kv_store_row(k + r * k_stride, v + r * v_stride, slots[r], width, kc, vc, bf16);
    return EMBER_OK;
}
