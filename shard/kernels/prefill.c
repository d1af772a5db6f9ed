/*
 * paged_prefill_bf16: the attention of one sequence's prompt chunk over its cached context (and itself),
 * read from a bf16 paged KV cache in place through the block table, in one parallel region: the chunk's
 * keys and values packed once (chunk_pack), then tiles of query rows (chunk_tile). The pieces are
 * ember.h's chunk_*: on AMX bf16 tiles where the build has them (prefill_amx.c: SDPA's bf16 numbers),
 * else on float32 FMAs (prefill_fma.c: the decode path's float32 numbers). decode_layers (fused_step.c)
 * runs the same pieces for the chunks of its steps.
 */
#include "ember.h"

#ifdef EMBER_HAVE_CHUNKS
#include <stdlib.h>

/* (ember.h) 1 where chunk_* may run in this process. */
int chunks_permitted(void) {
#ifdef EMBER_HAVE_AMX_BF16
    return amx_permitted();
#else
    return 1;
#endif
}

int paged_prefill_bf16(const float *q, int64_t q_stride, const uint16_t *k, const uint16_t *v, const int64_t *table,
                       int64_t cached, int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size,
                       int64_t window, float scale, float *out, int64_t out_stride, int threads) {
    if (!chunks_permitted()) return EMBER_E_NO_CHUNKS;
    if (!CHUNK_DIM_OK(dim)) return EMBER_E_HEAD_DIM;
    if (rows <= 0) return EMBER_OK;
    chunk_span c = {.q = q, .q_stride = q_stride, .out = out, .out_stride = out_stride, .table = table,
                    .cached = cached, .rows = rows, .groups = heads / kv_heads};
    chunk_layout(&c, kv_heads, dim, window);
    c.packed = aligned_alloc(64, sizeof(uint32_t) * (size_t)chunk_words(&c, kv_heads));
    if (c.packed == NULL) return EMBER_E_NO_MEMORY;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t task = 0; task < c.pack_tasks; task++) chunk_pack(&c, task, k, v, kv_heads, dim, block_size);
        chunk_scratch sc;
        const int ok = chunk_scratch_alloc(&sc, dim);
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < c.tile_tasks; task++)
            if (ok) chunk_tile(&c, task, kv_heads, dim, window, scale, &sc);
        chunk_scratch_free(&sc);
    }
    free(c.packed);
    return failed ? EMBER_E_NO_MEMORY : EMBER_OK;
}

int prefill_chunks_supported(void) { return chunks_permitted(); }
#else
int paged_prefill_bf16(const float *q, int64_t q_stride, const uint16_t *k, const uint16_t *v, const int64_t *table,
                       int64_t cached, int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size,
                       int64_t window, float scale, float *out, int64_t out_stride, int threads) {
    return EMBER_E_NO_CHUNKS;
}

int prefill_chunks_supported(void) { return 0; }
#endif
