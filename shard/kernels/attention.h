/*
 * Paged decode attention, shared by paged_decode_* (attention.c) and decode_layers (fused_step.c): one
 * new token per sequence (or, in decode_layers, each row of a prompt chunk) attends over its cached
 * context, read in place from the paged KV cache through the block table. The torch fallback gathers
 * each sequence's blocks into a padded tensor first and reads it again in SDPA; here every cached K/V
 * row is read exactly once.
 *
 * Layouts (all contiguous except q's row stride):
 *   q        [batch, heads, dim] float32, rows `q_stride` floats apart
 *   k, v     [num_blocks * block_size, kv_heads, dim] (float32 or bf16)
 *   tables   [batch, table_width] int64 block ids
 *   lens     [batch] int64 context length after this step (keys per sequence)
 *   out      [batch, heads, dim] float32
 * `window` > 0 keeps only the last `window` keys (sliding-window layers).
 * Query heads h*groups .. h*groups+groups-1 share KV head h (GQA).
 */
#ifndef EMBER_ATTENTION_H
#define EMBER_ATTENTION_H

#include <math.h>
#include <stdlib.h>

#include "ember.h"

/* Element i of a cache row: float32, or bf16 widened (its bits are a float's high half). */
static inline __attribute__((always_inline)) float elem(const void *row, int64_t i, const int bf16) {
    if (!bf16) return ((const float *)row)[i];
    union { uint32_t u; float f; } v = {.u = (uint32_t)((const uint16_t *)row)[i] << 16};
    return v.f;
}

static inline __attribute__((always_inline)) const void *row_at(const void *base, int64_t row, const int64_t dim,
                                                                const int bf16) {
    return bf16 ? (const void *)((const uint16_t *)base + row * dim) : (const void *)((const float *)base + row * dim);
}

#ifdef __AVX512F__
#include <immintrin.h>
#define VEC 16
/* Sixteen bf16 values as floats (their bits are a float's high half). */
static inline __attribute__((always_inline)) __m512 widen16(__m256i half) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

/* Sixteen elements of a cache row as floats (bf16 widened in registers). */
static inline __attribute__((always_inline)) __m512 load16(const void *row, int64_t i, const int bf16) {
    if (!bf16) return _mm512_loadu_ps((const float *)row + i);
    return widen16(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + i)));
}

static inline __attribute__((always_inline)) float dot_row(const float *q, const void *row, const int64_t dim,
                                                           const int bf16) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < dim; i += VEC) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(row, i, bf16), acc);
    return _mm512_reduce_add_ps(acc);
}

static inline __attribute__((always_inline)) void axpy_row(float *a, float p, const void *row, const int64_t dim,
                                                           const int bf16) {
    const __m512 pv = _mm512_set1_ps(p);
    for (int64_t i = 0; i < dim; i += VEC)
        _mm512_storeu_ps(a + i, _mm512_fmadd_ps(pv, load16(row, i, bf16), _mm512_loadu_ps(a + i)));
}
#define VECTOR_OK(dim) ((dim) % VEC == 0)
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VEC 8
/* Eight bf16 values as floats (widen16's AVX2 form). */
static inline __attribute__((always_inline)) __m256 widen8(__m128i half) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

/* Eight elements of a cache row as floats (bf16 widened in registers). */
static inline __attribute__((always_inline)) __m256 load8(const void *row, int64_t i, const int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)row + i);
    return widen8(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + i)));
}

static inline __attribute__((always_inline)) float dot_row(const float *q, const void *row, const int64_t dim,
                                                           const int bf16) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 2 * VEC <= dim; i += 2 * VEC) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(row, i, bf16), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + VEC), load8(row, i + VEC, bf16), acc1);
    }
    if (i < dim) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(row, i, bf16), acc0);
    const __m256 acc = _mm256_add_ps(acc0, acc1);
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

static inline __attribute__((always_inline)) void axpy_row(float *a, float p, const void *row, const int64_t dim,
                                                           const int bf16) {
    const __m256 pv = _mm256_set1_ps(p);
    for (int64_t i = 0; i < dim; i += VEC)
        _mm256_storeu_ps(a + i, _mm256_fmadd_ps(pv, load8(row, i, bf16), _mm256_loadu_ps(a + i)));
}
#define VECTOR_OK(dim) ((dim) % VEC == 0)
#else
#define VECTOR_OK(dim) 0
static inline float dot_row(const float *q, const void *row, int64_t dim, int bf16) { return 0.f; }
static inline void axpy_row(float *a, float p, const void *row, int64_t dim, int bf16) {}
#endif

/* The cache slots of positions start .. start+n-1 of a sequence with block table `table`, once for every
 * pass over them (no division per token). */
static inline __attribute__((always_inline)) void cache_slots(const int64_t *table, int64_t start, int64_t n,
                                                              int64_t block_size, int64_t *slots) {
    for (int64_t t = 0, block = start / block_size, offset = start % block_size; t < n; t++) {
        slots[t] = table[block] * block_size + offset;
        if (++offset == block_size) offset = 0, block++;
    }
}

/* Each of `rows` rows of n scores (n apart) replaced by exp(score - the row's max); sums[r] the row's sum. */
static inline __attribute__((always_inline)) void softmax_rows(float *scores, int64_t rows, int64_t n, float *sums) {
    for (int64_t r = 0; r < rows; r++) {
        float *s = scores + r * n;
        float top = s[0];
        _Pragma("omp simd reduction(max : top)")
        for (int64_t t = 1; t < n; t++) top = s[t] > top ? s[t] : top;
        float total = 0.f;
        _Pragma("omp simd reduction(+ : total)")
        for (int64_t t = 0; t < n; t++) {
            s[t] = exp_neg(s[t] - top);
            total += s[t];
        }
        sums[r] = total;
    }
}

/* One sequence's KV heads h0 .. h1-1 (their `groups` query heads each) over keys start .. start+n-1.
 * Each cached row is read whole (all its KV heads of the task in turn): a block's rows are contiguous,
 * so the reads stream. */
static inline __attribute__((always_inline)) void attend(
    const float *qb, const void *k, const void *v, const int64_t *table, int64_t start, int64_t n, int64_t h0,
    int64_t h1, int64_t kv_heads, int64_t block_size, float scale, int64_t *slots, float *scores, float *acc,
    float *sums, float *out, const int64_t groups, const int64_t dim, const int bf16) {
    const int64_t rows = (h1 - h0) * groups; /* query heads of the task */
    cache_slots(table, start, n, block_size, slots);
    const int64_t row_bytes = kv_heads * dim * (bf16 ? 2 : 4);
    for (int64_t t = 0; t < n; t++) {
        if (t + 8 < n) /* a later slot's keys and values ahead of use (see attend64) */
            for (int64_t b = 0; b < row_bytes; b += 64) {
                __builtin_prefetch((const char *)k + slots[t + 8] * row_bytes + b, 0, 3);
                __builtin_prefetch((const char *)v + slots[t + 8] * row_bytes + b, 0, 2);
            }
        for (int64_t h = h0; h < h1; h++) {
            const void *kr = row_at(k, slots[t] * kv_heads + h, dim, bf16);
            for (int64_t g = 0; g < groups; g++) {
                const int64_t qi = (h - h0) * groups + g;
                const float *qg = qb + qi * dim;
                float dot = 0.f;
                if (VECTOR_OK(dim)) {
                    dot = dot_row(qg, kr, dim, bf16);
                } else {
                    _Pragma("omp simd reduction(+ : dot)")
                    for (int64_t i = 0; i < dim; i++) dot += qg[i] * elem(kr, i, bf16);
                }
                scores[qi * n + t] = dot * scale;
            }
        }
    }
    softmax_rows(scores, rows, n, sums);
    memset(acc, 0, sizeof(float) * (size_t)(rows * dim));
    for (int64_t t = 0; t < n; t++) {
        for (int64_t h = h0; h < h1; h++) {
            const void *vr = row_at(v, slots[t] * kv_heads + h, dim, bf16);
            for (int64_t g = 0; g < groups; g++) {
                const int64_t qi = (h - h0) * groups + g;
                const float p = scores[qi * n + t];
                float *a = acc + qi * dim;
                if (VECTOR_OK(dim)) {
                    axpy_row(a, p, vr, dim, bf16);
                } else {
                    _Pragma("omp simd")
                    for (int64_t i = 0; i < dim; i++) a[i] += p * elem(vr, i, bf16);
                }
            }
        }
    }
    for (int64_t qi = 0; qi < rows; qi++) {
        const float inv = 1.f / sums[qi];
        float *o = out + qi * dim;
        _Pragma("omp simd")
        for (int64_t i = 0; i < dim; i++) o[i] = acc[qi * dim + i] * inv;
    }
}

/* The sequence this thread will most likely attend next (see decode_task): its cached rows, fetched into
 * L2 one slot per call while this sequence computes, so that its first pass does not wait on memory. */
typedef struct {
    const int64_t *table;
    int64_t pos, end, block_size, row_bytes;
    const char *k, *v;
} next_rows;

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define ATTEND64 1        /* attend64: 64-wide heads with their queries and accumulators in registers */
#define ATTEND_PREFETCH 8 /* slots ahead */

/* The cache is read in block-table order, which the hardware cannot guess at block boundaries: fetch a
 * later slot's keys and values, every head (`row_bytes` from byte `at`), ahead of use, into L2 (keys into
 * L1 instead were 8 % slower over 30 layers' caches that had left every cache level). */
static inline __attribute__((always_inline)) void attend_prefetch(const void *k, const void *v, int64_t at,
                                                                  int64_t row_bytes) {
    for (int64_t b = 0; b < row_bytes; b += 64) {
        _mm_prefetch((const char *)k + at + b, _MM_HINT_T1);
        _mm_prefetch((const char *)v + at + b, _MM_HINT_T1);
    }
}

static inline __attribute__((always_inline)) void next_rows_fetch(next_rows *nr) {
    if (nr->pos >= nr->end) return;
    const int64_t slot = nr->table[nr->pos / nr->block_size] * nr->block_size + nr->pos % nr->block_size;
    attend_prefetch(nr->k, nr->v, slot * nr->row_bytes, nr->row_bytes);
    nr->pos++;
}
#endif

#ifdef __AVX512F__
/* Key t of KV head h (64 wide) as four float vectors; the first head's pass also prefetches a later slot
 * (`fetch`). */
static inline __attribute__((always_inline)) void key_row64(const void *k, const void *v, const int64_t *slots,
                                                            int64_t t, int64_t n, int64_t h, int fetch,
                                                            int64_t kv_heads, int64_t row_bytes, const int bf16,
                                                            __m512 *out) {
    if (fetch && t + ATTEND_PREFETCH < n) attend_prefetch(k, v, slots[t + ATTEND_PREFETCH] * row_bytes, row_bytes);
    const void *kr = row_at(k, slots[t] * kv_heads + h, 64, bf16);
#pragma GCC unroll 4
    for (int c = 0; c < 4; c++) out[c] = load16(kr, 16 * c, bf16);
}

/* The lane-wise products of a 64-wide query (four vectors) and key, summed over the four: the dot product
 * still to be summed across lanes. */
static inline __attribute__((always_inline)) __m512 dot64(const __m512 *q, const __m512 *key) {
    __m512 x = _mm512_mul_ps(q[0], key[0]);
    x = _mm512_fmadd_ps(q[1], key[1], x);
    x = _mm512_fmadd_ps(q[2], key[2], x);
    return _mm512_fmadd_ps(q[3], key[3], x);
}

/* The horizontal sums of four vectors, as one: lane i of the result sums every lane of the i-th. */
static inline __attribute__((always_inline)) __m128 reduce4(__m512 x, __m512 y, __m512 z, __m512 w) {
    /* per 128-bit chunk: [x0+x2, y0+y2, x1+x3, y1+y3] and the same for z, w */
    const __m512 xy = _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
    const __m512 zw = _mm512_add_ps(_mm512_unpacklo_ps(z, w), _mm512_unpackhi_ps(z, w));
    /* per chunk: the chunk's sums of x, y, z, w */
    const __m512 c = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(xy), _mm512_castps_pd(zw))),
                                   _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(xy), _mm512_castps_pd(zw))));
    /* the four chunks added: chunks 0+2, 1+3, then those two */
    const __m512 d = _mm512_add_ps(c, _mm512_shuffle_f32x4(c, c, _MM_SHUFFLE(1, 0, 3, 2)));
    const __m512 e = _mm512_add_ps(d, _mm512_shuffle_f32x4(d, d, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm512_castps512_ps128(e);
}
/* `attend` for 64-wide heads and G (1..4) query heads per KV head, with the G queries, and then the G
 * output accumulators, in registers: each cached K and V row is widened once for all G heads, and the
 * weighted sum never goes through memory. The same steps as `attend` (scores, softmax, the weighted sum
 * over keys in order); only each score's sum across lanes is associated differently (reduce4), so the
 * numbers agree to float32 rounding, not bit for bit. */
static inline __attribute__((always_inline)) void attend64(
    const float *qb, const void *k, const void *v, const int64_t *table, int64_t start, int64_t n, int64_t h0,
    int64_t h1, int64_t kv_heads, int64_t block_size, float scale, int64_t *slots, float *scores, float *sums,
    float *out, next_rows *next, const int G, const int bf16) {
    cache_slots(table, start, n, block_size, slots);
    const int64_t row_bytes = kv_heads * 64 * (bf16 ? 2 : 4); /* one slot's keys (or values), every head */
    for (int64_t h = h0; h < h1; h++) {
        const int64_t q0 = (h - h0) * G;
        {
            __m512 qv[4][4];
#pragma GCC unroll 4
            for (int g = 0; g < G; g++)
#pragma GCC unroll 4
                for (int c = 0; c < 4; c++) qv[g][c] = _mm512_loadu_ps(qb + (q0 + g) * 64 + 16 * c);
            const __m128 scale4 = _mm_set1_ps(scale);
            int64_t t = 0;
            for (; t + 4 <= n; t += 4) {
                /* four keys at a time: each query's four dot products reduced together (reduce4), about a
                 * third of the shuffles and adds of four horizontal sums */
                __m512 a[4][4]; /* [query][key] */
                if (h != h0) next_rows_fetch(next);
#pragma GCC unroll 4
                for (int j = 0; j < 4; j++) {
                    __m512 kv4[4];
                    key_row64(k, v, slots, t + j, n, h, h == h0, kv_heads, row_bytes, bf16, kv4);
#pragma GCC unroll 4
                    for (int g = 0; g < G; g++) a[g][j] = dot64(qv[g], kv4);
                }
#pragma GCC unroll 4
                for (int g = 0; g < G; g++)
                    _mm_storeu_ps(scores + (q0 + g) * n + t,
                                  _mm_mul_ps(reduce4(a[g][0], a[g][1], a[g][2], a[g][3]), scale4));
            }
            for (; t < n; t++) {
                __m512 kv4[4];
                key_row64(k, v, slots, t, n, h, h == h0, kv_heads, row_bytes, bf16, kv4);
#pragma GCC unroll 4
                for (int g = 0; g < G; g++) scores[(q0 + g) * n + t] = _mm512_reduce_add_ps(dot64(qv[g], kv4)) * scale;
            }
        }
        softmax_rows(scores + q0 * n, G, n, sums + q0);
        __m512 acc[4][4];
#pragma GCC unroll 4
        for (int g = 0; g < G; g++)
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) acc[g][c] = _mm512_setzero_ps();
        for (int64_t t = 0; t < n; t++) {
            next_rows_fetch(next);
            const void *vr = row_at(v, slots[t] * kv_heads + h, 64, bf16);
            const __m512 v0 = load16(vr, 0, bf16), v1 = load16(vr, 16, bf16), v2 = load16(vr, 32, bf16),
                         v3 = load16(vr, 48, bf16);
#pragma GCC unroll 4
            for (int g = 0; g < G; g++) {
                const __m512 p = _mm512_set1_ps(scores[(q0 + g) * n + t]);
                acc[g][0] = _mm512_fmadd_ps(p, v0, acc[g][0]);
                acc[g][1] = _mm512_fmadd_ps(p, v1, acc[g][1]);
                acc[g][2] = _mm512_fmadd_ps(p, v2, acc[g][2]);
                acc[g][3] = _mm512_fmadd_ps(p, v3, acc[g][3]);
            }
        }
#pragma GCC unroll 4
        for (int g = 0; g < G; g++) {
            const __m512 inv = _mm512_set1_ps(1.f / sums[q0 + g]);
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) _mm512_storeu_ps(out + (q0 + g) * 64 + 16 * c, _mm512_mul_ps(acc[g][c], inv));
        }
    }
}
#elif defined(ATTEND64)
/* AVX2's reduce4: the horizontal sums of four 8-lane vectors, lane i of the result the i-th's. */
static inline __attribute__((always_inline)) __m128 reduce4(__m256 x, __m256 y, __m256 z, __m256 w) {
    /* per 128-bit half: [x0+x2, y0+y2, x1+x3, y1+y3], the same for z, w, then the half's sums of x, y, z, w */
    const __m256 xy = _mm256_add_ps(_mm256_unpacklo_ps(x, y), _mm256_unpackhi_ps(x, y));
    const __m256 zw = _mm256_add_ps(_mm256_unpacklo_ps(z, w), _mm256_unpackhi_ps(z, w));
    const __m256 c = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(xy), _mm256_castps_pd(zw))),
                                   _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(xy), _mm256_castps_pd(zw))));
    return _mm_add_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps(c, 1));
}

/* Key t of KV head h (64 wide) as eight float vectors; the first head's pass also prefetches a later slot
 * (`fetch`), as key_row64 does. */
static inline __attribute__((always_inline)) void key_row8(const void *k, const void *v, const int64_t *slots,
                                                           int64_t t, int64_t n, int64_t h, int fetch,
                                                           int64_t kv_heads, int64_t row_bytes, const int bf16,
                                                           __m256 *out) {
    if (fetch && t + ATTEND_PREFETCH < n) attend_prefetch(k, v, slots[t + ATTEND_PREFETCH] * row_bytes, row_bytes);
    const void *kr = row_at(k, slots[t] * kv_heads + h, 64, bf16);
#pragma GCC unroll 8
    for (int c = 0; c < 8; c++) out[c] = load8(kr, 8 * c, bf16);
}

/* One query's dot product with a key (eight vectors), still to be summed across lanes. */
static inline __attribute__((always_inline)) void dot64_8(const float *q, const __m256 *key, __m256 *acc) {
    __m256 x = _mm256_mul_ps(_mm256_loadu_ps(q), key[0]);
#pragma GCC unroll 8
    for (int c = 1; c < 8; c++) x = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * c), key[c], x);
    *acc = x;
}

/* attend64 on 8-lane vectors (AVX2 + FMA): the AVX-512 form's steps. Each key row is widened once for the G
 * queries, which come from L1 (G x 8 vectors do not fit the 16 registers); four keys' dot products are
 * reduced together. The weighted sum runs over the keys twice, once per half of the dimensions, so that
 * the G x 4 accumulators of a half stay in registers; each output element still sums its keys in order,
 * as `attend` does. */
static inline __attribute__((always_inline)) void attend64(
    const float *qb, const void *k, const void *v, const int64_t *table, int64_t start, int64_t n, int64_t h0,
    int64_t h1, int64_t kv_heads, int64_t block_size, float scale, int64_t *slots, float *scores, float *sums,
    float *out, next_rows *next, const int G, const int bf16) {
    cache_slots(table, start, n, block_size, slots);
    const int64_t row_bytes = kv_heads * 64 * (bf16 ? 2 : 4); /* one slot's keys (or values), every head */
    const __m128 scale4 = _mm_set1_ps(scale);
    for (int64_t h = h0; h < h1; h++) {
        const int64_t q0 = (h - h0) * G;
        const float *qh = qb + q0 * 64;
        int64_t t = 0;
        for (; t + 4 <= n; t += 4) {
            __m256 a[4][4]; /* [query][key] */
            if (h != h0) next_rows_fetch(next);
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
                __m256 key[8];
                key_row8(k, v, slots, t + j, n, h, h == h0, kv_heads, row_bytes, bf16, key);
#pragma GCC unroll 4
                for (int g = 0; g < G; g++) dot64_8(qh + g * 64, key, &a[g][j]);
            }
#pragma GCC unroll 4
            for (int g = 0; g < G; g++)
                _mm_storeu_ps(scores + (q0 + g) * n + t, _mm_mul_ps(reduce4(a[g][0], a[g][1], a[g][2], a[g][3]), scale4));
        }
        for (; t < n; t++) {
            __m256 key[8];
            key_row8(k, v, slots, t, n, h, h == h0, kv_heads, row_bytes, bf16, key);
#pragma GCC unroll 4
            for (int g = 0; g < G; g++) {
                __m256 a;
                dot64_8(qh + g * 64, key, &a);
                const __m256 z = _mm256_setzero_ps();
                scores[(q0 + g) * n + t] = _mm_cvtss_f32(reduce4(a, z, z, z)) * scale;
            }
        }
        softmax_rows(scores + q0 * n, G, n, sums + q0);
        for (int half = 0; half < 2; half++) {
            __m256 acc[4][4];
#pragma GCC unroll 4
            for (int g = 0; g < G; g++)
#pragma GCC unroll 4
                for (int c = 0; c < 4; c++) acc[g][c] = _mm256_setzero_ps();
            for (int64_t i = 0; i < n; i++) {
                if (half) next_rows_fetch(next);
                const void *vr = row_at(v, slots[i] * kv_heads + h, 64, bf16);
                __m256 val[4];
#pragma GCC unroll 4
                for (int c = 0; c < 4; c++) val[c] = load8(vr, 32 * half + 8 * c, bf16);
#pragma GCC unroll 4
                for (int g = 0; g < G; g++) {
                    const __m256 p = _mm256_broadcast_ss(scores + (q0 + g) * n + i);
#pragma GCC unroll 4
                    for (int c = 0; c < 4; c++) acc[g][c] = _mm256_fmadd_ps(p, val[c], acc[g][c]);
                }
            }
#pragma GCC unroll 4
            for (int g = 0; g < G; g++) {
                const __m256 inv = _mm256_set1_ps(1.f / sums[q0 + g]);
#pragma GCC unroll 4
                for (int c = 0; c < 4; c++)
                    _mm256_storeu_ps(out + (q0 + g) * 64 + 32 * half + 8 * c, _mm256_mul_ps(acc[g][c], inv));
            }
        }
    }
}
#endif

/* The cache slot of position `pos` of a sequence with block table `table`. */
static inline int64_t slot_of(const int64_t *table, int64_t pos, int64_t block_size) {
    return table[pos / block_size] * block_size + pos % block_size;
}

#ifdef __AVX512F__
/* The lanes t .. t+15 that fall in a .. b. */
static inline __mmask16 lanes_in(int64_t t, int64_t a, int64_t b) {
    const int64_t lo = a - t, hi = b - t;
    __mmask16 keep = 0xffff;
    if (lo > 0) keep &= lo >= 16 ? 0 : (__mmask16)(0xffff << lo);
    if (hi < 16) keep &= hi <= 0 ? 0 : (__mmask16)(0xffff >> (16 - hi));
    return keep;
}

/* 2^x of 16 lanes for x <= 0 (the exponents of a softmax, in bits): 2^n for the nearest integer n by the
 * exponent's scaling, 2^f (|f| <= 1/2) by a degree-5 polynomial, about 3e-6 relative: far below the
 * bf16 rounding the probabilities then take. */
static inline __attribute__((always_inline)) __m512 exp2_neg16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 e = _mm512_set1_ps(1.3333558146e-3f);
    e = _mm512_fmadd_ps(e, f, _mm512_set1_ps(9.6181291076e-3f));
    e = _mm512_fmadd_ps(e, f, _mm512_set1_ps(5.5504108665e-2f));
    e = _mm512_fmadd_ps(e, f, _mm512_set1_ps(2.4022650696e-1f));
    e = _mm512_fmadd_ps(e, f, _mm512_set1_ps(6.9314718056e-1f));
    e = _mm512_fmadd_ps(e, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(e, n);
}

#endif

#ifdef EMBER_HAVE_AMX_BF16
/*
 * `attend64` on AMX bf16 tiles, for a bf16 cache whose blocks hold a multiple of 16 slots and up to 8
 * query heads per KV head. Per KV head:
 *
 *   1. Scores, 16 keys a tile: the keys' rows straight from the cache (an A tile: 16 consecutive slots,
 *      32 dims a row) times the queries as B tiles (dims in pairs, a query per column). A query is split
 *      into its bf16 part and the bf16 part of what remains (hi + lo: 16 of float32's 24 bits), and both
 *      multiply into the same float32 sums: scores to about 1e-5 relative, where bf16 queries alone would
 *      be off by 4e-3. The 16 x 16 sums (a key per row) are read back a query at a time.
 *   2. The softmax per query over its scores in float32 (maximum, 2^x, sum), as `attend64`.
 *   3. out = P V, 32 keys a step: each query's probabilities split hi + lo again (two A rows), the values
 *      of key pairs interleaved into B tiles (vpunpck: its 128-bit lanes permute the dims, undone when
 *      the output is written), sums in float32 on the tiles.
 *
 * About float32's numbers (tested against the float32 path to 2e-5), not its bits: a build with AMX and
 * one without differ in the last places. Every row of every step takes this path on such a build, so a
 * sequence's numbers still never depend on its batch.
 */
#define AMX_GROUPS_MAX 8

/* Every tile 16 rows of 64 bytes, the attention kernels' one configuration (attend_amx64 here, the
 * prefill's tiles in prefill_amx.c). */
static inline void attend_tiles_configure(void) {
    amx_tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) c.rows[t] = 16, c.colsb[t] = 64;
    _tile_loadconfig(&c);
}

/* Whether decode attention may take AMX tiles (attention.c: attention_amx; on where granted). */
EMBER_INTERNAL extern int attend_amx_on;

static inline int attend_amx_fits(int64_t dim, int64_t groups, int64_t block_size, const int bf16) {
    return bf16 && attend_amx_on && dim == 64 && groups <= AMX_GROUPS_MAX && block_size % 16 == 0;
}

/* The queries of one KV head as B tiles: word p of column g of chunk c holds dims c*32+2p, +1 of query
 * g's hi part (hi) or lo part (lo); columns past `groups` are zero. */
static inline __attribute__((always_inline)) void amx_query_tiles(const float *qh, int64_t groups, uint32_t *hi,
                                                                  uint32_t *lo) {
    memset(hi, 0, 2 * 1024), memset(lo, 0, 2 * 1024);
    for (int64_t g = 0; g < groups; g++) {
        uint16_t h16[64] __attribute__((aligned(64))), l16[64] __attribute__((aligned(64)));
        for (int c = 0; c < 64; c += 16) {
            const __m512 x = _mm512_loadu_ps(qh + g * 64 + c);
            const __m256i h = (__m256i)_mm512_cvtneps_pbh(x);
            _mm256_store_si256((__m256i *)(h16 + c), h);
            _mm256_store_si256((__m256i *)(l16 + c), (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(x, widen16(h))));
        }
        const uint32_t *hw = (const uint32_t *)h16, *lw = (const uint32_t *)l16;
        for (int c = 0; c < 2; c++)
            for (int p = 0; p < 16; p++) {
                hi[c * 256 + p * 16 + g] = hw[c * 16 + p];
                lo[c * 256 + p * 16 + g] = lw[c * 16 + p];
            }
    }
}

/* The scores of one 16-key tile (slots from `row`, rows `stride` bytes apart) into sums tile C (0 or 7),
 * with key registers A (1 or 6): hi and lo queries over both 32-dim chunks. */
#define AMX_SCORES(C, A, row, stride)                  \
    do {                                               \
        _tile_zero(C);                                 \
        _tile_loadd(A, (row), (stride));               \
        _tile_dpbf16ps(C, A, 2);                       \
        _tile_dpbf16ps(C, A, 4);                       \
        _tile_loadd(A, (const uint16_t *)(row) + 32, (stride)); \
        _tile_dpbf16ps(C, A, 3);                       \
        _tile_dpbf16ps(C, A, 5);                       \
    } while (0)

/* One query's scores of a 16-key tile (keys t0 .. t0+15 of the sequence; those outside start .. len-1
 * are -inf) from the stored sums st [key][query]: column g, scaled. */
static inline __attribute__((always_inline)) __m512 amx_column(const float *st, int64_t g, int64_t t0,
                                                               int64_t start, int64_t len, float scale) {
    const __m512i idx = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4,
                                                                              3, 2, 1, 0),
                                                             _mm512_set1_epi32(16)),
                                         _mm512_set1_epi32((int)g));
    const __m512 s = _mm512_mul_ps(_mm512_i32gather_ps(idx, st, 4), _mm512_set1_ps(scale));
    const __mmask16 keep = lanes_in(t0, start, len);
    return _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), keep, s);
}

static inline __attribute__((always_inline)) void attend_amx64(
    const float *qb, const void *k, const void *v, const int64_t *table, int64_t start, int64_t n, int64_t h0,
    int64_t h1, int64_t kv_heads, int64_t block_size, float scale, float *scores, float *out, const int G) {
    const int64_t len = start + n, t_first = start / 16 * 16, keys = (len - t_first + 31) / 32 * 32;
    const int64_t stride = kv_heads * 64 * 2; /* bytes between consecutive slots' rows */
    uint32_t qhi[512] __attribute__((aligned(64))), qlo[512] __attribute__((aligned(64)));
    float st[2][256] __attribute__((aligned(64)));
    uint16_t probs[16 * 32] __attribute__((aligned(64)));
    uint32_t vals[2][4 * 256] __attribute__((aligned(64)));
    float o[4][256] __attribute__((aligned(64)));
    /* tiles: scores in tmm0/tmm7 (alternate key tiles), keys in tmm1/tmm6, the queries' hi and lo parts in
     * tmm2-3 and tmm4-5 (two 32-dim chunks); then the output's four 16-column chunks in tmm0-3,
     * probabilities in tmm4, values in tmm5/tmm6 */
    attend_tiles_configure();
    memset(probs, 0, sizeof probs);
    for (int64_t h = h0; h < h1; h++) {
        const int64_t q0 = (h - h0) * G;
        amx_query_tiles(qb + q0 * 64, G, qhi, qlo);
        _tile_loadd(2, qhi, 64);
        _tile_loadd(3, qhi + 256, 64);
        _tile_loadd(4, qlo, 64);
        _tile_loadd(5, qlo + 256, 64);
        /* 1. scores, [query][key - t_first], padded to `keys` with -inf */
        __m512 most[AMX_GROUPS_MAX];
        for (int g = 0; g < G; g++) most[g] = _mm512_set1_ps(-INFINITY);
        for (int64_t t0 = t_first; t0 < len; t0 += 16) {
            const uint16_t *row = (const uint16_t *)k + (slot_of(table, t0, block_size) * kv_heads + h) * 64;
            const int odd = ((t0 - t_first) / 16) % 2;
            if (odd) {
                AMX_SCORES(7, 6, row, stride);
                _tile_stored(7, st[1], 64);
            } else {
                AMX_SCORES(0, 1, row, stride);
                _tile_stored(0, st[0], 64);
            }
            for (int g = 0; g < G; g++) {
                const __m512 s = amx_column(st[odd], g, t0, start, len, scale);
                most[g] = _mm512_max_ps(most[g], s);
                _mm512_storeu_ps(scores + (q0 + g) * keys + (t0 - t_first), s);
            }
        }
        for (int g = 0; g < G; g++)
            for (int64_t t = (len - t_first + 15) / 16 * 16; t < keys; t += 16)
                _mm512_storeu_ps(scores + (q0 + g) * keys + t, _mm512_set1_ps(-INFINITY));
        /* 2 and 3: probabilities 32 keys at a time, times the values */
        float top[AMX_GROUPS_MAX];
        __m512 total[AMX_GROUPS_MAX];
        for (int g = 0; g < G; g++) top[g] = _mm512_reduce_max_ps(most[g]), total[g] = _mm512_setzero_ps();
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
        for (int64_t t = 0; t < keys; t += 32) {
            for (int g = 0; g < G; g++) {
                const float *sc = scores + (q0 + g) * keys + t;
                const __m512 log2e = _mm512_set1_ps(1.44269504088896341f), shift = _mm512_set1_ps(-top[g]);
                const __m512 s0 = _mm512_loadu_ps(sc), s1 = _mm512_loadu_ps(sc + 16);
                const __m512 p0 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s0, minus_inf, _CMP_NEQ_OQ),
                                                      exp2_neg16(_mm512_mul_ps(_mm512_add_ps(s0, shift), log2e)));
                const __m512 p1 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s1, minus_inf, _CMP_NEQ_OQ),
                                                      exp2_neg16(_mm512_mul_ps(_mm512_add_ps(s1, shift), log2e)));
                total[g] = _mm512_add_ps(total[g], _mm512_add_ps(p0, p1));
                const __m512i hi = (__m512i)_mm512_cvtne2ps_pbh(p1, p0); /* keys t .. t+31 in order */
                const __m512 back0 = widen16(_mm512_castsi512_si256(hi)),
                             back1 = widen16(_mm512_extracti64x4_epi64(hi, 1));
                _mm512_store_si512(probs + g * 32, hi);
                _mm512_store_si512(probs + (G + g) * 32,
                                   (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(p1, back1), _mm512_sub_ps(p0, back0)));
            }
            /* the values of keys t_first+t .. +31, pairs interleaved (zero outside start .. len-1) */
            uint32_t *vb = vals[(t / 32) % 2];
            for (int p = 0; p < 16; p++) {
                const int64_t a = t_first + t + 2 * p, b = a + 1;
                __m512i a0 = _mm512_setzero_si512(), a1 = a0, b0 = a0, b1 = a0;
                if (a >= start && a < len) {
                    const uint16_t *ra = (const uint16_t *)v + (slot_of(table, a, block_size) * kv_heads + h) * 64;
                    a0 = _mm512_loadu_si512(ra), a1 = _mm512_loadu_si512(ra + 32);
                }
                if (b >= start && b < len) {
                    const uint16_t *rb = (const uint16_t *)v + (slot_of(table, b, block_size) * kv_heads + h) * 64;
                    b0 = _mm512_loadu_si512(rb), b1 = _mm512_loadu_si512(rb + 32);
                }
                _mm512_store_si512(vb + 0 * 256 + p * 16, _mm512_unpacklo_epi16(a0, b0));
                _mm512_store_si512(vb + 1 * 256 + p * 16, _mm512_unpackhi_epi16(a0, b0));
                _mm512_store_si512(vb + 2 * 256 + p * 16, _mm512_unpacklo_epi16(a1, b1));
                _mm512_store_si512(vb + 3 * 256 + p * 16, _mm512_unpackhi_epi16(a1, b1));
            }
            _tile_loadd(4, probs, 64);
            _tile_loadd(5, vb, 64);
            _tile_dpbf16ps(0, 4, 5);
            _tile_loadd(6, vb + 256, 64);
            _tile_dpbf16ps(1, 4, 6);
            _tile_loadd(5, vb + 512, 64);
            _tile_dpbf16ps(2, 4, 5);
            _tile_loadd(6, vb + 768, 64);
            _tile_dpbf16ps(3, 4, 6);
        }
        _tile_stored(0, o[0], 64);
        _tile_stored(1, o[1], 64);
        _tile_stored(2, o[2], 64);
        _tile_stored(3, o[3], 64);
        /* out = (hi rows + lo rows) / sum, the dims put back in order: tile d, column 4L+i holds dim
         * 32(d/2) + 8L + 4(d%2) + i (vpunpck works within 128-bit lanes) */
        const __m512i first = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
        const __m512i second = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
        for (int g = 0; g < G; g++) {
            const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total[g]));
            float *dst = out + (q0 + g) * 64;
            for (int half = 0; half < 2; half++) {
                const float *lo_t = o[2 * half], *hi_t = o[2 * half + 1];
                const __m512 x = _mm512_add_ps(_mm512_loadu_ps(lo_t + g * 16), _mm512_loadu_ps(lo_t + (G + g) * 16));
                const __m512 y = _mm512_add_ps(_mm512_loadu_ps(hi_t + g * 16), _mm512_loadu_ps(hi_t + (G + g) * 16));
                _mm512_storeu_ps(dst + 32 * half, _mm512_mul_ps(_mm512_permutex2var_ps(x, first, y), inv));
                _mm512_storeu_ps(dst + 32 * half + 16, _mm512_mul_ps(_mm512_permutex2var_ps(x, second, y), inv));
            }
        }
    }
    _tile_release();
}
#endif

/* The first key a query at context length `len` sees: all of them, or the last `window` (0: no window). */
static inline int64_t window_start(int64_t len, int64_t window) {
    return (window > 0 && len > window) ? len - window : 0;
}

/* A guess at the task this thread takes after `task` (of `tasks`) when `threads` share them in order
 * (dynamic, one at a time, tasks of about equal cost): `task` + `threads`, or -1 past the end. */
static inline int64_t likely_next(int64_t task, int64_t tasks, int threads) {
    return task + threads < tasks ? task + threads : -1;
}

/* Task `task` of a decode step's attention: sequence task / split, KV heads of its share `per_task`. */
static inline __attribute__((always_inline)) void decode_task(
    int64_t task, int64_t split, int64_t per_task, const float *q, int64_t q_stride, const void *k, const void *v,
    const int64_t *tables, const int64_t *row_seq, int64_t table_width, const int64_t *lens, int64_t heads,
    int64_t kv_heads, int64_t dim,
    int64_t block_size, int64_t window, float scale, float *out, int64_t out_stride, int64_t *slots, float *scores,
    float *acc, float *sums, int64_t next_task, const int bf16) {
    const int64_t groups = heads / kv_heads;
    const int64_t b = task / split, h0 = (task % split) * per_task, h1 = h0 + per_task;
    const int64_t len = lens[b];
    const int64_t start = window_start(len, window);
    /* next_task (or -1): a guess at this thread's next task, whose rows (every head: split must be 1) are
     * fetched while this one computes */
    next_rows next = {0};
    if (next_task >= 0 && split == 1) {
        const int64_t nlen = lens[next_task];
        next = (next_rows){tables + (row_seq ? row_seq[next_task] : next_task) * table_width,
                           window_start(nlen, window), nlen, block_size,
                           kv_heads * dim * (bf16 ? 2 : 4), (const char *)k, (const char *)v};
    }
    const float *qb = q + b * q_stride + h0 * groups * dim;
    const int64_t *table = tables + (row_seq ? row_seq[b] : b) * table_width;
    float *o = out + b * out_stride + h0 * groups * dim;
    /* constant head sizes let the compiler unroll the row loops completely */
#ifdef EMBER_HAVE_AMX_BF16
    if (attend_amx_fits(dim, groups, block_size, bf16)) {
        attend_amx64(qb, k, v, table, start, len - start, h0, h1, kv_heads, block_size, scale, scores, o, (int)groups);
        return;
    }
#endif
#ifdef ATTEND64
    if (dim == 64 && groups <= 4) {
        const int64_t n = len - start;
        switch (groups) {
            case 1: attend64(qb, k, v, table, start, n, h0, h1, kv_heads, block_size, scale, slots, scores, sums, o,
                             &next, 1, bf16); return;
            case 2: attend64(qb, k, v, table, start, n, h0, h1, kv_heads, block_size, scale, slots, scores, sums, o,
                             &next, 2, bf16); return;
            case 3: attend64(qb, k, v, table, start, n, h0, h1, kv_heads, block_size, scale, slots, scores, sums, o,
                             &next, 3, bf16); return;
            default: attend64(qb, k, v, table, start, n, h0, h1, kv_heads, block_size, scale, slots, scores, sums, o,
                              &next, 4, bf16); return;
        }
    }
#endif
    (void)next; /* `attend` fetches nothing ahead */
    if (dim == 64)
        attend(qb, k, v, table, start, len - start, h0, h1, kv_heads, block_size, scale, slots, scores, acc, sums, o,
               groups, 64, bf16);
    else if (dim == 128)
        attend(qb, k, v, table, start, len - start, h0, h1, kv_heads, block_size, scale, slots, scores, acc, sums, o,
               groups, 128, bf16);
    else
        attend(qb, k, v, table, start, len - start, h0, h1, kv_heads, block_size, scale, slots, scores, acc, sums, o,
               groups, dim, bf16);
}

static inline int64_t longest_context(const int64_t *lens, int64_t batch) {
    int64_t longest = 1;
    for (int64_t b = 0; b < batch; b++)
        if (lens[b] > longest) longest = lens[b];
    return longest;
}

/* How a step's attention is shared: a task per sequence (whole rows read once), or per (sequence, KV
 * head) when there are fewer sequences than threads; scratch sized for the longest context. */
typedef struct {
    int64_t groups, longest, split, per_task;
} attend_plan;

static inline attend_plan plan_attention(const int64_t *lens, int64_t batch, int64_t heads, int64_t kv_heads,
                                         int threads) {
    const int64_t split = batch >= threads ? 1 : kv_heads;
    return (attend_plan){heads / kv_heads, longest_context(lens, batch), split, kv_heads / split};
}

/* Per-thread scratch of the decode attention (scores of the longest context, accumulators). */
typedef struct {
    float *scores, *acc, *sums;
    int64_t *slots;
} attend_scratch;

/* This thread's scratch for `plan`; a failed allocation sets *failed (shared) and returns 0. */
static inline int scratch_alloc(attend_scratch *sc, const attend_plan *plan, int64_t dim, int *failed) {
    const int64_t heads = plan->per_task * plan->groups;
    sc->scores = malloc(sizeof(float) * (size_t)(heads * (plan->longest + 64))); /* + attend_amx64's padding */
    sc->acc = malloc(sizeof(float) * (size_t)(heads * dim));
    sc->sums = malloc(sizeof(float) * (size_t)heads);
    sc->slots = malloc(sizeof(int64_t) * (size_t)plan->longest);
    const int ok = sc->scores && sc->acc && sc->sums && sc->slots;
    if (!ok) {
#pragma omp atomic write
        *failed = 1;
    }
    return ok;
}

static inline void scratch_free(attend_scratch *sc) {
    free(sc->scores), free(sc->acc), free(sc->sums), free(sc->slots);
}

#endif
