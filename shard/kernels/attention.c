/* paged_decode_f32 / _bf16: a decode step's attention for the per-op path (attention.h). */
#include "attention.h"

static int paged_decode(const float *q, int64_t q_stride, const void *k, const void *v, const int64_t *tables,
                        int64_t table_width, const int64_t *lens, int64_t batch, int64_t heads, int64_t kv_heads,
                        int64_t dim, int64_t block_size, int64_t window, float scale, float *out, int threads,
                        const int bf16) {
    const attend_plan plan = plan_attention(lens, batch, heads, kv_heads, threads);
    const int64_t split = plan.split, per_task = plan.per_task;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        attend_scratch sc;
        const int ok = scratch_alloc(&sc, &plan, dim, &failed);
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < batch * split; task++) {
            if (!ok) continue;
            decode_task(task, split, per_task, q, q_stride, k, v, tables, NULL, table_width, lens, heads, kv_heads, dim,
                        block_size, window, scale, out, heads * dim, sc.slots, sc.scores, sc.acc, sc.sums,
                        likely_next(task, batch * split, threads), bf16);
        }
        scratch_free(&sc);
    }
    return failed ? EMBER_E_NO_MEMORY : EMBER_OK;
}

int paged_decode_f32(const float *q, int64_t q_stride, const float *k, const float *v, const int64_t *tables,
                     int64_t table_width, const int64_t *lens, int64_t batch, int64_t heads, int64_t kv_heads,
                     int64_t dim, int64_t block_size, int64_t window, float scale, float *out, int threads) {
    return paged_decode(q, q_stride, k, v, tables, table_width, lens, batch, heads, kv_heads, dim, block_size,
                        window, scale, out, threads, 0);
}

int paged_decode_bf16(const float *q, int64_t q_stride, const uint16_t *k, const uint16_t *v,
                      const int64_t *tables, int64_t table_width, const int64_t *lens, int64_t batch, int64_t heads,
                      int64_t kv_heads, int64_t dim, int64_t block_size, int64_t window, float scale, float *out,
                      int threads) {
    return paged_decode(q, q_stride, k, v, tables, table_width, lens, batch, heads, kv_heads, dim, block_size,
                        window, scale, out, threads, 1);
}

#ifdef EMBER_HAVE_AMX_BF16
int attend_amx_on = 0;

/* Decode attention over a bf16 cache on AMX tiles (attend_amx64) where `on` and this process may use
 * them: 1 when it will, else 0 (the AVX-512 path). */
int attention_amx(int on) {
    attend_amx_on = on && amx_permitted();
    return attend_amx_on;
}
#else
int attention_amx(int on) {
    (void)on;
    return 0;
}
#endif
