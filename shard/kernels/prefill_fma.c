/*
 * The pieces of a prompt chunk's attention over its cached context (ember.h's chunk_*), on float32 FMAs:
 * for CPUs with AVX2 and FMA, or AVX-512 without AMX bf16 tiles (prefill_amx.c's form of the same
 * pieces). Without them each of a chunk's rows attends by itself (attention.h's decode path), reading
 * the whole context once per row; here tiles of query rows share every key they read.
 *
 * A chunk of `rows` new tokens at positions cached .. cached+rows-1, each attending causally over the keys
 * before it (or the last `window` of them). Per KV head, its query heads' rows (token r, group g) are
 * stacked as rows r*groups+g, TILE_ROWS to a task:
 *
 *   1. The keys and values the chunk can see are widened to float32 once (chunk_pack, every KV head):
 *      keys in blocks of KEYS_PER_BLOCK, each stored dimension by dimension (the block's keys side by side,
 *      one vector per dimension and half block), values key by key.
 *   2. Per task, CHUNK keys at a time (an online softmax whose scores stay in L1): the scores of
 *      SCORE_ROWS rows x KEYS_PER_BLOCK keys in registers (a query element broadcast against two vectors
 *      of keys per dimension); each row's softmax over its own keys; then the output of OUT_ROWS rows x
 *      OUT_DIMS dimensions in registers, rescaled to the rows' new maxima once and summed over the keys.
 *
 * Every product, sum and probability is float32, as in the decode path, so a chunk's numbers differ
 * from that path's only by the order of summation.
 *
 * Layouts as in prefill_amx.c: q [rows, heads, dim] float32 (rows q_stride floats apart), the cache's
 * flat [slots, kv_heads, dim] bf16 K and V, the sequence's block table, out [rows, heads, dim] float32.
 */
#include "attention.h"

#ifdef EMBER_CHUNKS_FMA
#include <immintrin.h>

/* One vector of VEC floats (attention.h: 16 on AVX-512, 8 on AVX2); vf_widen: VEC bf16 values as floats. */
#ifdef __AVX512F__
typedef __m512 vf;
#define vf_load _mm512_loadu_ps
#define vf_store _mm512_storeu_ps
#define vf_fma _mm512_fmadd_ps
#define vf_mul _mm512_mul_ps
#define vf_set1 _mm512_set1_ps
#define vf_zero _mm512_setzero_ps
#define vf_widen(p) load16(p, 0, 1)
#else
typedef __m256 vf;
#define vf_load _mm256_loadu_ps
#define vf_store _mm256_storeu_ps
#define vf_fma _mm256_fmadd_ps
#define vf_mul _mm256_mul_ps
#define vf_set1 _mm256_set1_ps
#define vf_zero _mm256_setzero_ps
#define vf_widen(p) load8(p, 0, 1)
#endif

#define KEYS_PER_BLOCK (2 * VEC) /* a score micro-tile's keys: two vectors */
#define SCORE_ROWS 6           /* a score micro-tile's rows: 6 x 2 accumulators */
#define OUT_DIMS 32            /* an output micro-tile's dimensions (CHUNK_DIM_OK: heads are multiples) */
#define OUT_VECS (OUT_DIMS / VEC)
#define OUT_ROWS (12 / OUT_VECS) /* 12 accumulators: 3 rows on AVX2, 6 on AVX-512 */
#define TILE_ROWS 12             /* query rows per task: a multiple of SCORE_ROWS and OUT_ROWS */
#define CHUNK 256                /* keys per step of the online softmax */

/* (ember.h) The keys a chunk's rows see, rounded to key blocks, and its packed buffer's layout. */
void chunk_layout(chunk_span *c, int64_t kv_heads, int64_t dim, int64_t window) {
    const int64_t len = c->cached + c->rows;
    const int64_t lowest = window > 0 && c->cached + 1 > window ? c->cached + 1 - window : 0;
    c->base = lowest / KEYS_PER_BLOCK * KEYS_PER_BLOCK;
    c->span = (len + KEYS_PER_BLOCK - 1) / KEYS_PER_BLOCK * KEYS_PER_BLOCK - c->base;
    c->key_words = c->span * dim;
    c->value_words = c->span * dim;
    c->pack_tasks = c->span / KEYS_PER_BLOCK;
    c->tile_tasks = kv_heads * ((c->rows * c->groups + TILE_ROWS - 1) / TILE_ROWS);
}

/* (ember.h) Words (floats) of packed keys and values `chunk_layout` asks for. */
int64_t chunk_words(const chunk_span *c, int64_t kv_heads) { return kv_heads * (c->key_words + c->value_words); }

/* (ember.h) Pack task `task` (of c->pack_tasks): one block of keys and their values, every KV head, as
 * float32. Keys at or past the chunk's end are zero (their probabilities are zero too, and 0 * garbage
 * could be NaN). */
void chunk_pack(const chunk_span *c, int64_t task, const uint16_t *k, const uint16_t *v, int64_t kv_heads,
                int64_t dim, int64_t block_size) {
    const int64_t len = c->cached + c->rows, first = c->base + task * KEYS_PER_BLOCK;
    const int64_t words = c->key_words + c->value_words, block = KEYS_PER_BLOCK * dim;
    for (int64_t h = 0; h < kv_heads; h++) {
        float *kt = (float *)c->packed + h * words + task * block; /* [dim][KEYS_PER_BLOCK] */
        float *vr = (float *)c->packed + h * words + c->key_words + task * block; /* [KEYS_PER_BLOCK][dim] */
        for (int64_t n = 0; n < KEYS_PER_BLOCK; n++) {
            const int64_t pos = first + n;
            if (pos >= len) {
                for (int64_t d = 0; d < dim; d++) kt[d * KEYS_PER_BLOCK + n] = 0.f;
                memset(vr + n * dim, 0, sizeof(float) * (size_t)dim);
                continue;
            }
            const int64_t at = (slot_of(c->table, pos, block_size) * kv_heads + h) * dim;
            for (int64_t d = 0; d < dim; d++) kt[d * KEYS_PER_BLOCK + n] = elem(k + at, d, 1);
            for (int64_t d = 0; d < dim; d += VEC) vf_store(vr + n * dim + d, vf_widen(v + at + d));
        }
    }
}

/* (ember.h) A thread's scratch for chunk_tile (scores and output accumulators); 0 when it could not be
 * allocated. */
int chunk_scratch_alloc(chunk_scratch *sc, int64_t dim) {
    memset(sc, 0, sizeof *sc);
    sc->scores = aligned_alloc(64, sizeof(float) * TILE_ROWS * CHUNK);
    sc->acc = aligned_alloc(64, sizeof(float) * (size_t)(TILE_ROWS * dim));
    return sc->scores && sc->acc;
}

void chunk_scratch_free(chunk_scratch *sc) {
    free(sc->scores), free(sc->probs), free(sc->qt), free(sc->ot), free(sc->acc);
}

/* Scores s[SCORE_ROWS][keys] (unscaled dots; rows CHUNK apart) of the rows whose queries start at q[r]
 * against `blocks` packed key blocks from kt. */
static inline void score_rows(const float *const *q, const float *kt, int64_t blocks, int64_t dim, float *s) {
    for (int64_t j = 0; j < blocks; j++, kt += KEYS_PER_BLOCK * dim) {
        vf a0[SCORE_ROWS], a1[SCORE_ROWS];
#pragma GCC unroll 6
        for (int r = 0; r < SCORE_ROWS; r++) a0[r] = vf_zero(), a1[r] = vf_zero();
        for (int64_t d = 0; d < dim; d++) {
            const vf k0 = vf_load(kt + d * KEYS_PER_BLOCK), k1 = vf_load(kt + d * KEYS_PER_BLOCK + VEC);
#pragma GCC unroll 6
            for (int r = 0; r < SCORE_ROWS; r++) {
                const vf x = vf_set1(q[r][d]);
                a0[r] = vf_fma(x, k0, a0[r]);
                a1[r] = vf_fma(x, k1, a1[r]);
            }
        }
#pragma GCC unroll 6
        for (int r = 0; r < SCORE_ROWS; r++) {
            vf_store(s + r * CHUNK + j * KEYS_PER_BLOCK, a0[r]);
            vf_store(s + r * CHUNK + j * KEYS_PER_BLOCK + VEC, a1[r]);
        }
    }
}

/* acc[OUT_ROWS][OUT_DIMS] (rows `dim` apart) = acc * rescale[r] + p[r] V over `keys` keys of the values vr
 * (from dimension d0; p's rows CHUNK apart). */
static inline void out_rows(const float *p, const float *rescale, const float *vr, int64_t keys, int64_t dim,
                            int64_t d0, float *acc) {
    vf o[OUT_ROWS][OUT_VECS];
#pragma GCC unroll 6
    for (int r = 0; r < OUT_ROWS; r++) {
        const vf f = vf_set1(rescale[r]);
#pragma GCC unroll 4
        for (int c = 0; c < OUT_VECS; c++) o[r][c] = vf_mul(vf_load(acc + r * dim + d0 + c * VEC), f);
    }
    for (int64_t t = 0; t < keys; t++) {
        const float *row = vr + t * dim + d0;
        vf x[OUT_VECS];
#pragma GCC unroll 4
        for (int c = 0; c < OUT_VECS; c++) x[c] = vf_load(row + c * VEC);
#pragma GCC unroll 6
        for (int r = 0; r < OUT_ROWS; r++) {
            const vf pr = vf_set1(p[r * CHUNK + t]);
#pragma GCC unroll 4
            for (int c = 0; c < OUT_VECS; c++) o[r][c] = vf_fma(pr, x[c], o[r][c]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < OUT_ROWS; r++)
#pragma GCC unroll 4
        for (int c = 0; c < OUT_VECS; c++) vf_store(acc + r * dim + d0 + c * VEC, o[r][c]);
}

/* One row of a key chunk (online softmax): the scores s[a .. b) of `keys` (float32 dots, unscaled) raise
 * the row's running maximum *top (in dots) and become e^((s - top) scale), the others zero; their sum is
 * added to *total after it is rescaled to the new maximum. Returns that rescaling factor, by which the
 * row's output so far must be multiplied too. */
static inline float row_chunk(float *s, int64_t a, int64_t b, int64_t keys, float scale, float *top, float *total) {
    if (a >= b) {
        memset(s, 0, sizeof(float) * (size_t)keys);
        return 1.f;
    }
    float most = s[a];
#pragma omp simd reduction(max : most)
    for (int64_t t = a + 1; t < b; t++) most = s[t] > most ? s[t] : most;
    const float before = *top, now = before > most ? before : most;
    const float rescale = before == -INFINITY ? 0.f : exp_neg((before - now) * scale);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = a; t < b; t++) {
        s[t] = exp_neg((s[t] - now) * scale);
        sum += s[t];
    }
    for (int64_t t = 0; t < a; t++) s[t] = 0.f;
    for (int64_t t = b; t < keys; t++) s[t] = 0.f;
    *top = now;
    *total = *total * rescale + sum;
    return rescale;
}

/* (ember.h) Tile task `task` (of c->tile_tasks, the later tiles with more keys first): TILE_ROWS query rows
 * of one KV head over the packed keys and values, into c->out. */
void chunk_tile(const chunk_span *c, int64_t task, int64_t kv_heads, int64_t dim, int64_t window, float scale,
                chunk_scratch *sc) {
    const int64_t groups = c->groups, qrows = c->rows * groups, tiles = (qrows + TILE_ROWS - 1) / TILE_ROWS;
    const int64_t cached = c->cached, base = c->base;
    const int64_t h = task % kv_heads, i0 = (tiles - 1 - task / kv_heads) * TILE_ROWS;
    const int64_t last = (i0 + TILE_ROWS < qrows ? i0 + TILE_ROWS : qrows) - 1;
    const int64_t seen = cached + last / groups + 1; /* keys the tile's last row sees */
    const int64_t first_pos = cached + i0 / groups;
    const int64_t lo = window > 0 && first_pos + 1 > window ? first_pos + 1 - window : 0;
    const int64_t from = lo / KEYS_PER_BLOCK * KEYS_PER_BLOCK;
    const int64_t to = (seen + KEYS_PER_BLOCK - 1) / KEYS_PER_BLOCK * KEYS_PER_BLOCK;
    const float *kp = (const float *)c->packed + h * (c->key_words + c->value_words), *vp = kp + c->key_words;
    float *scores = sc->scores, *acc = sc->acc;
    const float *q[TILE_ROWS];
    float top[TILE_ROWS], total[TILE_ROWS], rescale[TILE_ROWS];
    for (int64_t r = 0; r < TILE_ROWS; r++) {
        const int64_t i = i0 + r <= last ? i0 + r : i0; /* rows past the last: any real row, zero weight */
        q[r] = c->q + (i / groups) * c->q_stride + (h * groups + i % groups) * dim;
        top[r] = -INFINITY, total[r] = 0.f;
    }
    memset(acc, 0, sizeof(float) * (size_t)(TILE_ROWS * dim));
    for (int64_t c0 = from; c0 < to; c0 += CHUNK) {
        const int64_t keys = to - c0 < CHUNK ? to - c0 : CHUNK;
        for (int64_t r0 = 0; r0 < TILE_ROWS; r0 += SCORE_ROWS)
            score_rows(q + r0, kp + (c0 - base) * dim, keys / KEYS_PER_BLOCK, dim, scores + r0 * CHUNK);
        for (int64_t r = 0; r < TILE_ROWS; r++) {
            int64_t a = 0, b = 0; /* the row's keys in this chunk */
            if (i0 + r <= last) {
                const int64_t pos = cached + (i0 + r) / groups;
                const int64_t low = window > 0 && pos + 1 > window ? pos + 1 - window : 0;
                a = (low > c0 ? low : c0) - c0, b = (pos + 1 < c0 + keys ? pos + 1 : c0 + keys) - c0;
            }
            rescale[r] = row_chunk(scores + r * CHUNK, a, b, keys, scale, top + r, total + r);
        }
        for (int64_t r0 = 0; r0 < TILE_ROWS; r0 += OUT_ROWS)
            for (int64_t d0 = 0; d0 < dim; d0 += OUT_DIMS)
                out_rows(scores + r0 * CHUNK, rescale + r0, vp + (c0 - base) * dim, keys, dim, d0, acc + r0 * dim);
    }
    for (int64_t i = i0; i <= last; i++) {
        float *o = c->out + (i / groups) * c->out_stride + (h * groups + i % groups) * dim;
        const float inv = 1.f / total[i - i0];
        const float *a = acc + (i - i0) * dim;
        for (int64_t d = 0; d < dim; d++) o[d] = a[d] * inv;
    }
}
#endif
