/*
 * A whole step's decoder layers in one call (decode_layers), for w4a8 weights or bf16 weights on
 * Ember's kernel: per layer the residual add + RMSNorm, qkv, rotary, the K/V write, paged attention,
 * o_proj, add + RMSNorm, gate/up, silu*mul, down, in one parallel region. The same arithmetic as the
 * per-op kernels (rows.h, attention.h, matmul.h), without a Python call, an allocation or a thread fork
 * between them. Every row (token) attends over its own sequence's keys in the cache, its own included
 * (all rows' K/V are written first): row r belongs to sequence row_seq[r] (NULL: r, a decode step),
 * whose block table is tables[row_seq[r]], and sees lens[r] keys (its position + 1), so decode, prefill
 * and mixed steps are one code path.
 *
 * Its arguments are one ember_decode_step (ember.h; native.DecodeStep): the model's shapes and its
 * layers' table (ember_decode_layer: norm weights, the four projections' weights, the layer's K and V
 * cache and its sliding window), the cache's dtype and block size, and the step's tensors. `delta`
 * [rows, hidden] enters holding the embeddings and leaves holding the last layer's output; `residual`
 * [rows, hidden] leaves holding the residual stream before it (the final norm adds the two).
 */
#include <stdlib.h>

#include "attention.h"
#include "matmul.h"
#include "rows.h"

#ifdef EMBER_HAVE_Q4
/* decode_layers' two weight kinds: a projection's input row quantized to int8 per 32 (w4a8) or rounded
 * to bf16 (bf16 weights), into row r of `xq`; and a projection by one of the layer's weights. */
static inline __attribute__((always_inline)) void prep_row(const float *src, int64_t k, int64_t r, int8_t *xq,
                                                           float *dx, float *sx, const int bf16_weights) {
#ifdef EMBER_HAVE_BF16
    if (bf16_weights) {
        to_bf16_row(src, k, (uint16_t *)xq + r * k);
        return;
    }
#endif
    const int64_t groups = k / Q4_GROUP;
    quantize_row(src, k, xq + r * k, dx + r * groups, sx + r * groups);
}

static inline __attribute__((always_inline)) void project(const ember_linear *w, const int8_t *xq,
                                                          const float *dx, const float *sx, int64_t rows, int64_t k,
                                                          int64_t n, float *out, const int bf16_weights) {
#ifdef EMBER_HAVE_BF16
    if (bf16_weights) {
        bf16_tiles((const uint16_t *)xq, rows, k, (const uint16_t *)w->packed, n, out);
        return;
    }
#endif
    q4_tiles(xq, dx, sx, rows, k, (const uint8_t *)w->packed, w->d, w->m, n, out);
}

#ifdef EMBER_PROFILE /* a build for profiling: seconds per phase of decode_layers, thread 0's view */
#include <omp.h>
static double phase_seconds[8];
double *ember_phase_seconds(void) { return phase_seconds; }
#define PHASE(i)                                                                                                 \
    do {                                                                                                         \
        if (omp_get_thread_num() == 0) {                                                                         \
            const double now = omp_get_wtime();                                                                  \
            phase_seconds[i] += now - phase_start, phase_start = now;                                            \
        }                                                                                                        \
    } while (0)
#else
#define PHASE(i) ((void)0)
#endif

/* A step's prompt chunks that attend as chunks (chunk_*: AMX tiles or FMAs): the runs of more than
 * step->chunk_rows rows of one sequence at consecutive positions over a cached context (none unless the
 * cache is bf16 and the build has chunk_*), their packed keys and values (one buffer, reused by every
 * layer), and which rows they hold. */
typedef struct {
    chunk_span *spans;
    int64_t count, pack_tasks, tile_tasks;
    uint8_t *in_chunk; /* [rows] or NULL */
    uint32_t *packed;
} chunks_of_step;

/* The span holding task *t of the step's pack tasks (pack) or tile tasks (!pack); *t becomes its own. */
static inline const chunk_span *chunk_of_task(const chunks_of_step *c, int64_t *t, const int pack) {
    const chunk_span *s = c->spans;
    while (*t >= (pack ? s->pack_tasks : s->tile_tasks)) *t -= pack ? s->pack_tasks : s->tile_tasks, s++;
    return s;
}

static void chunks_free(chunks_of_step *c) {
    free(c->spans), free(c->in_chunk), free(c->packed);
    memset(c, 0, sizeof *c);
}

/* Fill `c` for `step` (queries in `wide`, outputs in `attn`); 0 when memory ran out. */
static int find_chunks(const ember_decode_step *step, const float *wide, int64_t qkv_width, float *attn,
                       int64_t q_width, chunks_of_step *c) {
#ifdef EMBER_HAVE_CHUNKS
    const int64_t rows = step->rows, *row_seq = step->row_seq, *lens = step->lens;
    if (step->chunk_rows <= 0 || !row_seq || !step->bf16_cache || !CHUNK_DIM_OK(step->head_dim) || !chunks_permitted())
        return 1;
    int64_t words = 0;
    for (int64_t r = 0; r < rows;) {
        int64_t end = r + 1;
        while (end < rows && row_seq[end] == row_seq[r] && lens[end] == lens[end - 1] + 1) end++;
        if (end - r > step->chunk_rows && lens[r] > 1) {
            if (!c->spans && !(c->spans = calloc((size_t)rows, sizeof(chunk_span)))) return 0;
            if (!c->in_chunk && !(c->in_chunk = calloc((size_t)rows, 1))) return 0;
            chunk_span *s = c->spans + c->count++;
            *s = (chunk_span){.q = wide + r * qkv_width, .q_stride = qkv_width, .out = attn + r * q_width,
                              .out_stride = q_width, .table = step->tables + row_seq[r] * step->table_width,
                              .cached = lens[r] - 1, .rows = end - r, .groups = step->heads / step->kv_heads};
            chunk_layout(s, step->kv_heads, step->head_dim, 0); /* no window: the most keys any layer packs */
            c->pack_tasks += s->pack_tasks, c->tile_tasks += s->tile_tasks;
            words += chunk_words(s, step->kv_heads);
            memset(c->in_chunk + r, 1, (size_t)(end - r));
        }
        r = end;
    }
    if (c->count && !(c->packed = aligned_alloc(64, sizeof(uint32_t) * (size_t)words))) return 0;
    for (int64_t i = 0, at = 0; i < c->count; i++) {
        c->spans[i].packed = c->packed + at;
        at += chunk_words(c->spans + i, step->kv_heads);
    }
#else
    (void)step, (void)wide, (void)qkv_width, (void)attn, (void)q_width, (void)c;
#endif
    return 1;
}

int decode_layers(const ember_decode_step *step) {
#ifndef EMBER_HAVE_BF16
    if (step->bf16_weights) return EMBER_E_NO_BF16;
#endif
    const ember_decode_layer *layers = step->layers;
    const int64_t num_layers = step->num_layers, rows = step->rows, hidden = step->hidden, heads = step->heads,
                  kv_heads = step->kv_heads, dim = step->head_dim, inter = step->inter, rot = step->rot;
    const int64_t table_width = step->table_width, block_size = step->block_size;
    const float eps = step->eps, scale = step->scale;
    float *delta = step->delta, *residual = step->residual;
    const float *cos = step->cos, *sin = step->sin;
    const int64_t *slots = step->slots, *tables = step->tables, *row_seq = step->row_seq, *lens = step->lens;
    const int bf16 = step->bf16_cache, bf16_weights = step->bf16_weights, threads = step->threads;
    const int64_t q_width = heads * dim, kv_width = kv_heads * dim, qkv_width = q_width + 2 * kv_width;
    const int64_t widest = (2 * inter > qkv_width ? 2 * inter : qkv_width);
    const int64_t k_max = inter > q_width ? (inter > hidden ? inter : hidden) : (q_width > hidden ? q_width : hidden);
    if (hidden % Q4_GROUP || q_width % Q4_GROUP || inter % Q4_GROUP) return EMBER_E_LAYER_WIDTHS;
    const size_t floats = (size_t)(rows * (hidden + widest + q_width + inter + 2 * (k_max / Q4_GROUP)));
    float *buf = malloc(sizeof(float) * floats);
    /* int8 codes, or bf16 activations; whole tiles of 16 rows (AMX reads them, matmul.h) */
    int8_t *xq = calloc(2 * (size_t)((rows + 15) / 16 * 16), (size_t)k_max);
    if (!buf || !xq) {
        free(buf), free(xq);
        return EMBER_E_NO_MEMORY;
    }
    float *x = buf;                    /* [rows, hidden] normed input of a projection */
    float *wide = x + rows * hidden;   /* [rows, qkv_width] or [rows, 2 * inter] */
    float *attn = wide + rows * widest; /* [rows, q_width] attention output */
    float *act = attn + rows * q_width; /* [rows, inter] */
    float *dx = act + rows * inter, *sx = dx + rows * (k_max / Q4_GROUP);
    const attend_plan plan = plan_attention(lens, rows, heads, kv_heads, threads);
    const int64_t split = plan.split, per_task = plan.per_task;
    chunks_of_step chunks = {0};
    if (!find_chunks(step, wide, qkv_width, attn, q_width, &chunks)) {
        free(buf), free(xq);
        return EMBER_E_NO_MEMORY;
    }
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        attend_scratch sc;
        const int ok = scratch_alloc(&sc, &plan, dim, &failed);
#ifdef EMBER_HAVE_CHUNKS
        chunk_scratch csc = {0};
        const int chunk_ok = chunks.count == 0 || chunk_scratch_alloc(&csc, dim);
        if (!chunk_ok) {
#pragma omp atomic write
            failed = 1;
        }
#endif
#pragma omp barrier
#ifdef EMBER_PROFILE
        double phase_start = omp_get_wtime();
#endif
        for (int64_t l = 0; l < num_layers && !failed; l++) {
            const ember_decode_layer *f = layers + l;
            const float *in_w = f->input_norm, *post_w = f->post_norm;
            const void *kc = f->k_cache, *vc = f->v_cache;
            const int64_t window = f->window;
            /* residual (+)= delta, x = norm(residual), quantized for qkv */
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) {
                float *res = residual + r * hidden;
                if (l == 0) {
                    memcpy(res, delta + r * hidden, sizeof(float) * (size_t)hidden);
                    norm_row(res, NULL, NULL, in_w, eps, x + r * hidden, hidden);
                } else {
                    norm_row(res, delta + r * hidden, res, in_w, eps, x + r * hidden, hidden);
                }
                prep_row(x + r * hidden, hidden, r, xq, dx, sx, bf16_weights);
            }
            PHASE(0);
            project(&f->qkv, xq, dx, sx, rows, hidden, qkv_width, wide, bf16_weights);
            PHASE(1);
            if (!row_seq && split == 1) {
                /* decode, a task per sequence: its rotary, K/V write, attention and quantization in one go
                 * (its only new key is its own), two barriers fewer */
#pragma omp for schedule(dynamic, 1)
                for (int64_t r = 0; r < rows; r++) {
                    float *row = wide + r * qkv_width;
                    rotary_row(row, heads + kv_heads, dim, cos + r * rot, sin + r * rot, rot);
                    kv_store_row(row + q_width, row + q_width + kv_width, slots[r], kv_width, (void *)kc, (void *)vc,
                                 bf16);
                    if (ok)
                        decode_task(r, 1, kv_heads, wide, qkv_width, kc, vc, tables, NULL, table_width, lens, heads,
                                    kv_heads, dim, block_size, window, scale, attn, q_width, sc.slots, sc.scores,
                                    sc.acc, sc.sums, likely_next(r, rows, threads), bf16);
                    prep_row(attn + r * q_width, q_width, r, xq, dx, sx, bf16_weights);
                }
            } else {
                /* rotary on q and k, then k and v into the cache */
#pragma omp for schedule(static)
                for (int64_t r = 0; r < rows; r++) {
                    float *row = wide + r * qkv_width;
                    rotary_row(row, heads + kv_heads, dim, cos + r * rot, sin + r * rot, rot);
                    kv_store_row(row + q_width, row + q_width + kv_width, slots[r], kv_width, (void *)kc,
                                 (void *)vc, bf16);
                }
#ifdef EMBER_HAVE_CHUNKS
                if (chunks.count) {
                    /* prompt chunks over a cached context: their keys and values packed once, then tiles
                     * of query rows (the other rows' tasks follow without waiting) */
#pragma omp single
                    {
                        chunks.pack_tasks = 0;
                        for (int64_t i = 0; i < chunks.count; i++) {
                            chunk_layout(chunks.spans + i, kv_heads, dim, window); /* within the no-window size */
                            chunks.pack_tasks += chunks.spans[i].pack_tasks;
                        }
                    }
#pragma omp for schedule(static)
                    for (int64_t task = 0; task < chunks.pack_tasks; task++) {
                        int64_t t = task;
                        const chunk_span *span = chunk_of_task(&chunks, &t, 1);
                        chunk_pack(span, t, kc, vc, kv_heads, dim, block_size);
                    }
#pragma omp for schedule(dynamic, 1) nowait
                    for (int64_t task = 0; task < chunks.tile_tasks; task++) {
                        int64_t t = task;
                        const chunk_span *span = chunk_of_task(&chunks, &t, 0);
                        if (chunk_ok) chunk_tile(span, t, kv_heads, dim, window, scale, &csc);
                    }
                }
#endif
#pragma omp for schedule(dynamic, 1)
                for (int64_t task = 0; task < rows * split; task++) {
                    if (!ok || (chunks.in_chunk && chunks.in_chunk[task / split])) continue;
                    /* no guess at the next task: a prompt's rows mostly share their sequence, already fetched */
                    decode_task(task, split, per_task, wide, qkv_width, kc, vc, tables, row_seq, table_width, lens,
                                heads, kv_heads, dim, block_size, window, scale, attn, q_width, sc.slots, sc.scores,
                                sc.acc, sc.sums, -1, bf16);
                }
#pragma omp for schedule(static)
                for (int64_t r = 0; r < rows; r++) prep_row(attn + r * q_width, q_width, r, xq, dx, sx, bf16_weights);
            }
            PHASE(2);
            project(&f->o_proj, xq, dx, sx, rows, q_width, hidden, delta, bf16_weights);
            PHASE(3);
            /* residual += o, x = norm(residual), quantized for gate/up */
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) {
                float *res = residual + r * hidden;
                norm_row(res, delta + r * hidden, res, post_w, eps, x + r * hidden, hidden);
                prep_row(x + r * hidden, hidden, r, xq, dx, sx, bf16_weights);
            }
            PHASE(4);
            project(&f->gate_up, xq, dx, sx, rows, hidden, 2 * inter, wide, bf16_weights);
            PHASE(5);
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) {
                silu_mul_row(wide + r * 2 * inter, act + r * inter, inter);
                prep_row(act + r * inter, inter, r, xq, dx, sx, bf16_weights);
            }
            PHASE(6);
            project(&f->down, xq, dx, sx, rows, inter, hidden, delta, bf16_weights);
            PHASE(7);
        }
        scratch_free(&sc);
#ifdef EMBER_HAVE_CHUNKS
        if (chunks.count) chunk_scratch_free(&csc);
#endif
    }
    free(buf), free(xq);
    chunks_free(&chunks);
    return failed ? EMBER_E_NO_MEMORY : EMBER_OK;
}
#else
int decode_layers(const ember_decode_step *step) { return EMBER_E_NO_INT8; }
#endif
