/*
 * Ember's CPU kernels, built at first use by ember/shard/native.py with the
 * machine's C compiler (-O3 -march=native -fopenmp) and called through ctypes.
 *
 * paged_decode_*: one new token per sequence attends over its cached context,
 * read in place from the paged KV cache through the block table. The torch
 * fallback gathers each sequence's blocks into a padded tensor first and reads
 * it again in SDPA; here every cached K/V row is read exactly once.
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
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* e^x for x <= 0 (scores minus their maximum), to float32 rounding: x = n ln2 + r, a degree-6
 * polynomial for e^r, 2^n built in the exponent bits. Unlike libm's expf it vectorizes. */
static inline float exp_neg(float x) {
    x = x < -87.f ? -87.f : x;
    const float shifter = 12582912.f; /* 1.5 * 2^23: adding it rounds to an integer */
    const float n = (x * 1.44269504088896341f + shifter) - shifter;
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

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
/* Sixteen elements of a cache row as floats (bf16 widened in registers). */
static inline __attribute__((always_inline)) __m512 load16(const void *row, int64_t i, const int bf16) {
    if (!bf16) return _mm512_loadu_ps((const float *)row + i);
    const __m256i half = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
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
#else
#define VECTOR_OK(dim) 0
static inline float dot_row(const float *q, const void *row, int64_t dim, int bf16) { return 0.f; }
static inline void axpy_row(float *a, float p, const void *row, int64_t dim, int bf16) {}
#endif

/* One sequence's KV heads h0 .. h1-1 (their `groups` query heads each) over keys start .. start+n-1.
 * Each cached row is read whole (all its KV heads of the task in turn): a block's rows are contiguous,
 * so the reads stream. */
static inline __attribute__((always_inline)) void attend(
    const float *qb, const void *k, const void *v, const int64_t *table, int64_t start, int64_t n, int64_t h0,
    int64_t h1, int64_t kv_heads, int64_t block_size, float scale, int64_t *slots, float *scores, float *acc,
    float *sums, float *out, const int64_t groups, const int64_t dim, const int bf16) {
    const int64_t rows = (h1 - h0) * groups; /* query heads of the task */
    /* the cache slots of positions start .. start+n-1, once for both passes (no division per token) */
    for (int64_t t = 0, block = start / block_size, offset = start % block_size; t < n; t++) {
        slots[t] = table[block] * block_size + offset;
        if (++offset == block_size) offset = 0, block++;
    }
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
    for (int64_t qi = 0; qi < rows; qi++) {
        float *s = scores + qi * n;
        float top = s[0];
        _Pragma("omp simd reduction(max : top)")
        for (int64_t t = 1; t < n; t++) top = s[t] > top ? s[t] : top;
        float total = 0.f;
        _Pragma("omp simd reduction(+ : total)")
        for (int64_t t = 0; t < n; t++) {
            s[t] = exp_neg(s[t] - top);
            total += s[t];
        }
        sums[qi] = total;
    }
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

#ifdef __AVX512F__
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
    for (int64_t t = 0, block = start / block_size, offset = start % block_size; t < n; t++) {
        slots[t] = table[block] * block_size + offset;
        if (++offset == block_size) offset = 0, block++;
    }
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
        for (int g = 0; g < G; g++) {
            float *sc = scores + (q0 + g) * n;
            float top = sc[0];
            _Pragma("omp simd reduction(max : top)")
            for (int64_t t = 1; t < n; t++) top = sc[t] > top ? sc[t] : top;
            float total = 0.f;
            _Pragma("omp simd reduction(+ : total)")
            for (int64_t t = 0; t < n; t++) {
                sc[t] = exp_neg(sc[t] - top);
                total += sc[t];
            }
            sums[q0 + g] = total;
        }
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
#ifdef __AVX512F__
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

static int64_t longest_context(const int64_t *lens, int64_t batch) {
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

static attend_plan plan_attention(const int64_t *lens, int64_t batch, int64_t heads, int64_t kv_heads, int threads) {
    const int64_t split = batch >= threads ? 1 : kv_heads;
    return (attend_plan){heads / kv_heads, longest_context(lens, batch), split, kv_heads / split};
}

/* Per-thread scratch of the decode attention (scores of the longest context, accumulators). */
typedef struct {
    float *scores, *acc, *sums;
    int64_t *slots;
} attend_scratch;

/* This thread's scratch for `plan`; a failed allocation sets *failed (shared) and returns 0. */
static int scratch_alloc(attend_scratch *sc, const attend_plan *plan, int64_t dim, int *failed) {
    const int64_t heads = plan->per_task * plan->groups;
    sc->scores = malloc(sizeof(float) * (size_t)(heads * plan->longest));
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

static void scratch_free(attend_scratch *sc) {
    free(sc->scores), free(sc->acc), free(sc->sums), free(sc->slots);
}

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
    return failed ? -1 : 0;
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

/* --- elementwise, float32, rows split across threads ------------------------------------------ */

/* One row of the residual add and RMSNorm: r = x (+ delta, stored into h when given), out = w * r / rms(r). */
static inline __attribute__((always_inline)) void norm_row(const float *xr, const float *dr, float *hr,
                                                           const float *w, float eps, float *o, int64_t dim) {
    float sq = 0.f;
    if (dr) {
#pragma omp simd reduction(+ : sq)
        for (int64_t i = 0; i < dim; i++) {
            const float s = xr[i] + dr[i];
            hr[i] = s;
            sq += s * s;
        }
        xr = hr;
    } else {
#pragma omp simd reduction(+ : sq)
        for (int64_t i = 0; i < dim; i++) sq += xr[i] * xr[i];
    }
    const float inv = 1.f / sqrtf(sq / (float)dim + eps);
#pragma omp simd
    for (int64_t i = 0; i < dim; i++) o[i] = w[i] * (xr[i] * inv);
}

/* out = w * r / sqrt(mean(r^2) + eps) per row, r = x (+ delta, stored into h when given): the residual
 * add and the RMSNorm of a decoder layer in one pass over the row. */
int rms_norm_f32(const float *x, const float *delta, float *h, const float *w, float eps, float *out, int64_t rows,
                 int64_t dim, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * dim >= 65536)
    for (int64_t r = 0; r < rows; r++)
        norm_row(x + r * dim, delta ? delta + r * dim : NULL, delta ? h + r * dim : NULL, w, eps, out + r * dim, dim);
    return 0;
}

/* One row of silu(gate) * up from the fused gate/up row g = [gate | up]. */
static inline __attribute__((always_inline)) void silu_mul_row(const float *g, float *o, int64_t inter) {
    const float *u = g + inter;
#pragma omp simd
    for (int64_t i = 0; i < inter; i++) {
        const float x = g[i];
        const float e = exp_neg(x > 0.f ? -x : x); /* e^-|x|, never overflows */
        const float sig = x > 0.f ? 1.f / (1.f + e) : e / (1.f + e);
        o[i] = x * sig * u[i];
    }
}

/* out[r, i] = silu(gu[r, i]) * gu[r, inter + i]: the gated MLP's activation on the fused gate/up output. */
int silu_mul_f32(const float *gu, float *out, int64_t rows, int64_t inter, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * inter >= 65536)
    for (int64_t r = 0; r < rows; r++) silu_mul_row(gu + r * 2 * inter, out + r * inter, inter);
    return 0;
}

/* Rotary embedding in place on the first `heads` heads of each row of x (rows `row_stride` floats
 * apart, heads `dim` apart): x[:rot] = x[:rot] * cos + swap_halves(x[:rot]) * sin, with cos/sin
 * [rows, rot] per token and sin's first half already negated (RotaryEmbedding's signed table). */
static inline __attribute__((always_inline)) void rotary_row(float *x, int64_t heads, int64_t dim, const float *c,
                                                             const float *s, int64_t rot) {
    const int64_t half = rot / 2;
    for (int64_t hd = 0; hd < heads; hd++) {
        float *v = x + hd * dim;
#pragma omp simd
        for (int64_t i = 0; i < half; i++) {
            const float a = v[i], b = v[i + half];
            v[i] = a * c[i] + b * s[i];
            v[i + half] = b * c[i + half] + a * s[i + half];
        }
    }
}

int rotary_f32(float *x, int64_t rows, int64_t row_stride, int64_t heads, int64_t dim, const float *cos,
               const float *sin, int64_t rot, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * heads * dim >= 65536)
    for (int64_t r = 0; r < rows; r++) rotary_row(x + r * row_stride, heads, dim, cos + r * rot, sin + r * rot, rot);
    return 0;
}

/* --- KV cache writes ------------------------------------------------------------------------ */

/* float32 -> bf16 bits, rounding to nearest even (NaN stays NaN), as torch's .to(bfloat16). */
static inline uint16_t to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* Row r of k and v (`width` floats each, rows `k_stride` / `v_stride` floats apart) into cache slot
 * slots[r] of kc and vc ([slots, width], float32 or bf16): the step's new keys and values, one call. */
static inline void kv_store_row(const float *ks, const float *vs, int64_t slot, int64_t width, void *kc, void *vc,
                                int bf16) {
    const int64_t at = slot * width;
    if (bf16) {
        uint16_t *kd = (uint16_t *)kc + at, *vd = (uint16_t *)vc + at;
        for (int64_t i = 0; i < width; i++) kd[i] = to_bf16(ks[i]);
        for (int64_t i = 0; i < width; i++) vd[i] = to_bf16(vs[i]);
    } else {
        memcpy((float *)kc + at, ks, sizeof(float) * (size_t)width);
        memcpy((float *)vc + at, vs, sizeof(float) * (size_t)width);
    }
}

int kv_store(const float *k, int64_t k_stride, const float *v, int64_t v_stride, const int64_t *slots,
             int64_t rows, int64_t width, void *kc, void *vc, int bf16) {
    for (int64_t r = 0; r < rows; r++) kv_store_row(k + r * k_stride, v + r * v_stride, slots[r], width, kc, vc, bf16);
    return 0;
}

/* --- logits: greedy choice and candidates ---------------------------------------------------- */

/* Per row of x [rows, vocab] float32: ids[r] = the first index of the row's maximum, lse[r] =
 * log(sum(exp(x))) (the chosen token's logprob is x[ids[r]] - lse[r]); -inf entries count as zero
 * probability. Two passes over the row, the second from cache. */
int argmax_lse(const float *x, int64_t rows, int64_t vocab, int64_t *ids, float *lse, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * vocab;
        float top = -INFINITY;
        int64_t at = 0, i = 0;
#ifdef __AVX512F__
        if (vocab >= 16) { /* lane-wise maxima and where they are, then the first of the best lanes */
            __m512 best = _mm512_set1_ps(-INFINITY);
            __m512i where = _mm512_setzero_si512(), cur = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                                                             13, 14, 15);
            const __m512i step = _mm512_set1_epi32(16);
            for (; i + 16 <= vocab; i += 16) {
                const __m512 v = _mm512_loadu_ps(row + i);
                const __mmask16 gt = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
                best = _mm512_mask_mov_ps(best, gt, v);
                where = _mm512_mask_mov_epi32(where, gt, cur);
                cur = _mm512_add_epi32(cur, step);
            }
            float lanes[16];
            int32_t spots[16];
            _mm512_storeu_ps(lanes, best);
            _mm512_storeu_si512((void *)spots, where);
            for (int j = 0; j < 16; j++)
                if (lanes[j] > top || (lanes[j] == top && lanes[j] > -INFINITY && spots[j] < at))
                    top = lanes[j], at = spots[j];
        }
#endif
        for (; i < vocab; i++)
            if (row[i] > top) top = row[i], at = i;
        float total = 0.f;
        if (top > -INFINITY && top < INFINITY) {
#pragma omp simd reduction(+ : total)
            for (int64_t i = 0; i < vocab; i++) total += exp_neg(row[i] - top);
        }
        ids[r] = at;
        lse[r] = (top > -INFINITY && top < INFINITY) ? top + logf(total) : top;
    }
    return 0;
}

/* idx [rows, k]: the indices of each row's k largest values (in no particular order; NaN never
 * chosen unless the row has fewer than k other values). One pass: a value enters the candidates
 * only when it beats the smallest of them, which after the first few hundred is rare. */
int topk_rows(const float *x, int64_t rows, int64_t vocab, int64_t k, int64_t *idx, int threads) {
    if (k < 1 || k > vocab || k > 256) return -2;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * vocab;
        float vals[256];
        int64_t *out = idx + r * k;
        for (int64_t j = 0; j < k; j++) vals[j] = -INFINITY, out[j] = j;
        int64_t low = 0; /* where the smallest candidate sits */
        float floor_v = -INFINITY;
        int filled = 0;
        for (int64_t i = 0; i < vocab; i++) {
            const float v = row[i];
            if (filled < k) {
                if (v != v) continue; /* NaN */
                vals[filled] = v, out[filled] = i, filled++;
                if (filled == k) {
                    low = 0;
                    for (int64_t j = 1; j < k; j++)
                        if (vals[j] < vals[low]) low = j;
                    floor_v = vals[low];
                }
                continue;
            }
            if (v > floor_v) {
                vals[low] = v, out[low] = i;
                low = 0;
                for (int64_t j = 1; j < k; j++)
                    if (vals[j] < vals[low]) low = j;
                floor_v = vals[low];
            }
        }
    }
    return 0;
}

/* --- bfloat16 weights x bf16-rounded activations (AVX-512 BF16) -------------------------------- */
/*
 * bfloat16 weights times float32 activations rounded to bfloat16 (`--matmul-dtype bfloat16`), float32
 * sums: what oneDNN's bf16 linear computes, on AVX-512 BF16's vdpbf16ps (two products per lane and
 * instruction). The weight [n, k] is packed by tiles of 16 output features and pairs of inputs:
 * [n / 16, k / 2, 16, 2], so one 64-byte load holds a pair of inputs for 16 outputs, and the matching
 * pair of a row's activations is one broadcast dword. Each row's result depends on that row only.
 */
#if defined(__AVX512F__) && defined(__AVX512BF16__)
int bf16_supported(void) { return 1; }

/* x [k] float32 -> o [k] bf16, round to nearest even (as torch's casts); k % 32 == 0 */
static inline void to_bf16_row(const float *x, int64_t k, uint16_t *o) {
    for (int64_t i = 0; i < k; i += 32) {
        const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
        _mm512_storeu_si512((void *)(o + i), (__m512i)v);
    }
}

#define BF16_ROWS 12 /* rows per pass over one or two tiles: up to 24 accumulators */

/* ROWS (1..BF16_ROWS) rows of bf16 activations against TILES (1 or 2) tiles from `tile` on. Two tiles
 * share each broadcast: 20-25 % faster than oneDNN at 32 rows on SmolLM2's shapes, twice at 1 row.
 * `ahead`: on the first rows' pass, fetch the next pair of tiles (this thread's next under the static
 * schedule) into L2, two lines per input pair (gate/up and qkv 10-15 % faster at 32 rows). */
static inline __attribute__((always_inline)) void bf16_tile(const uint16_t *w, const uint16_t *xb, int64_t k,
                                                            int64_t n, int64_t tile, float *out, const int ROWS,
                                                            const int TILES, const int ahead) {
    const int64_t pairs = k / 2;
    const __m512bh *w0 = (const __m512bh *)(w + tile * pairs * 32);
    const __m512bh *w1 = (const __m512bh *)(w + (tile + 1) * pairs * 32);
    const uint32_t *x = (const uint32_t *)xb;
    __m512 a0[BF16_ROWS], a1[BF16_ROWS];
#pragma GCC unroll 12
    for (int r = 0; r < ROWS; r++) a0[r] = _mm512_setzero_ps(), a1[r] = _mm512_setzero_ps();
    const char *next = (const char *)(w + (tile + 2) * pairs * 32);
    for (int64_t p = 0; p < pairs; p++) {
        if (ahead) _mm_prefetch(next + p * 128, _MM_HINT_T1), _mm_prefetch(next + p * 128 + 64, _MM_HINT_T1);
        const __m512bh v0 = (__m512bh)_mm512_loadu_ps((const float *)(w0 + p));
        const __m512bh v1 = TILES == 2 ? (__m512bh)_mm512_loadu_ps((const float *)(w1 + p)) : v0;
#pragma GCC unroll 12
        for (int r = 0; r < ROWS; r++) {
            const __m512bh b = (__m512bh)_mm512_set1_epi32((int)x[r * pairs + p]);
            a0[r] = _mm512_dpbf16_ps(a0[r], v0, b);
            if (TILES == 2) a1[r] = _mm512_dpbf16_ps(a1[r], v1, b);
        }
    }
#pragma GCC unroll 12
    for (int r = 0; r < ROWS; r++) {
        _mm512_storeu_ps(out + r * n + tile * 16, a0[r]);
        if (TILES == 2) _mm512_storeu_ps(out + r * n + tile * 16 + 16, a1[r]);
    }
}

/* out [rows, n] = xb [rows, k] (bf16) times the packed weight transposed, its tiles shared among the
 * threads of the enclosing parallel region (an orphaned `omp for`, with its barrier). */
static void bf16_tiles(const uint16_t *xb, int64_t rows, int64_t k, const uint16_t *w, int64_t n, float *out) {
    const int64_t tiles = n / 16;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; t += 2) {
        const int two = t + 1 < tiles;
        for (int64_t r0 = 0; r0 < rows; r0 += BF16_ROWS) {
            const int64_t left = rows - r0;
            const uint16_t *xr = xb + r0 * k;
            float *o = out + r0 * n;
            const int ahead = r0 == 0 && t + 3 < tiles;
            switch ((left >= BF16_ROWS ? BF16_ROWS : left) * 2 + two) {
#define BF16_CASE(R)                                                                                           \
    case 2 * R + 1: bf16_tile(w, xr, k, n, t, o, R, 2, ahead); break;                                                 \
    case 2 * R: bf16_tile(w, xr, k, n, t, o, R, 1, 0); break;
                BF16_CASE(12) BF16_CASE(11) BF16_CASE(10) BF16_CASE(9) BF16_CASE(8) BF16_CASE(7)
                BF16_CASE(6) BF16_CASE(5) BF16_CASE(4) BF16_CASE(3) BF16_CASE(2) BF16_CASE(1)
#undef BF16_CASE
            }
        }
    }
}

/* out [rows, n] float32 = x [rows, k] float32 (rounded to bf16) times the packed bf16 weight [n, k]
 * transposed; k % 32 == 0, n % 16 == 0. */
int bf16_linear(const float *x, int64_t rows, int64_t k, const uint16_t *w, int64_t n, float *out, int threads) {
    if (k % 32 || n % 16) return -2;
    uint16_t *xb = malloc(sizeof(uint16_t) * (size_t)(rows * k));
    if (!xb) return -1;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) to_bf16_row(x + r * k, k, xb + r * k);
        bf16_tiles(xb, rows, k, w, n, out);
    }
    free(xb);
    return 0;
}
#define HAVE_BF16_TILES 1
#else
int bf16_supported(void) { return 0; }
int bf16_linear(const float *x, int64_t rows, int64_t k, const uint16_t *w, int64_t n, float *out, int threads) {
    return -2;
}
#endif

/* --- int4 weights x int8 activations (AVX-512 VNNI) ------------------------------------------- */
/*
 * Weights: GGUF Q4_1's blocks, w = d * q + m per group of 32 inputs, q in 0..15. Packed for
 * vpdpbusd in tiles of 16 output features: for tile t and group g, 4 chunks of 64 bytes; byte b
 * (0..3) of lane j in chunk c holds q[16t + j][32g + 8c + b] in its low nibble and
 * q[16t + j][32g + 8c + 4 + b] in its high one. d and m are float32 [tiles, groups, 16].
 * Activations are quantized per row and group of 32 to int8 (x = dx * xq, Q8_0's rule), so
 *   sum_k w x = sum_g d dx sum_k q xq + m dx sum_k xq
 * with the integer sums done 64 products per instruction. Each row's result depends on that row
 * only: batching never changes a sequence's numbers.
 */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define Q4_GROUP 32

int q4_supported(void) { return 1; }

/* One row of activations quantized per group of 32 to int8: xq [k], dx and sx [k / 32] the scale and
 * the scale times the group's code sum. */
static inline void quantize_row(const float *x, int64_t k, int8_t *xq, float *dx, float *sx) {
    for (int64_t g = 0; g < k / Q4_GROUP; g++) {
        const float *src = x + g * Q4_GROUP;
        const __m512 a = _mm512_loadu_ps(src), b = _mm512_loadu_ps(src + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        const float d = amax / 127.f;
        const __m512 inv = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
        const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)); /* round to nearest even */
        const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
        _mm_storeu_si128((__m128i *)(xq + g * Q4_GROUP), _mm512_cvtsepi32_epi8(qa));
        _mm_storeu_si128((__m128i *)(xq + g * Q4_GROUP + 16), _mm512_cvtsepi32_epi8(qb));
        dx[g] = d;
        sx[g] = d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    }
}

/* The 8 code vectors of one (tile, group): BITS 4 holds two inputs' codes per byte (see above), BITS 8
 * one (byte b of lane j in chunk c: input 4c + b), so vector j always pairs with activation dword j. */
static inline __attribute__((always_inline)) void load_codes(const uint8_t *wp, __m512i *w, const int BITS) {
    if (BITS == 4) {
        const __m512i low = _mm512_set1_epi8(0x0F);
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            const __m512i v = _mm512_loadu_si512((const void *)(wp + c * 64));
            w[2 * c] = _mm512_and_si512(v, low);
            w[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
    } else {
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) w[j] = _mm512_loadu_si512((const void *)(wp + j * 64));
    }
}

#define Q4_ROWS 8 /* rows per pass over a weight tile: 16 accumulators + 8 unpacked weights in 32 registers */

/* ROWS (1..Q4_ROWS) rows of activations against one tile of 16 output features. */
static inline __attribute__((always_inline)) void q4_tile(const uint8_t *packed, const float *d, const float *m,
                                                          const int8_t *xq, const float *dx, const float *sx,
                                                          int64_t k, int64_t n, int64_t tile, float *out,
                                                          const int ROWS, const int BITS) {
    const int64_t groups = k / Q4_GROUP;
    __m512 acc[Q4_ROWS];
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512i w[8];
        load_codes(packed + (tile * groups + g) * 64 * BITS, w, BITS);
        const __m512 dv = _mm512_loadu_ps(d + (tile * groups + g) * 16);
        const __m512 mv = _mm512_loadu_ps(m + (tile * groups + g) * 16);
#pragma GCC unroll 16
        for (int r = 0; r < ROWS; r++) {
            const int32_t *xr = (const int32_t *)(xq + r * k + g * Q4_GROUP);
            __m512i s = _mm512_setzero_si512();
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) s = _mm512_dpbusd_epi32(s, w[j], _mm512_set1_epi32(xr[j]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dv, _mm512_set1_ps(dx[r * groups + g])),
                                     acc[r]);
            acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sx[r * groups + g]), acc[r]);
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; r++) _mm512_storeu_ps(out + r * n + tile * 16, acc[r]);
}

#define Q4_ROWS2 4 /* rows per pass over a pair of tiles: 8 accumulators + 16 unpacked weights */

/* ROWS (1..Q4_ROWS2) rows against tiles `tile` and `tile` + 1 (32 output features): each activation
 * broadcast feeds two vpdpbusd. */
static inline __attribute__((always_inline)) void q4_tile2(const uint8_t *packed, const float *d, const float *m,
                                                           const int8_t *xq, const float *dx, const float *sx,
                                                           int64_t k, int64_t n, int64_t tile, float *out,
                                                           const int ROWS, const int BITS, const int ahead) {
    const int64_t groups = k / Q4_GROUP;
    __m512 acc0[Q4_ROWS2], acc1[Q4_ROWS2];
    /* `ahead`: on the first rows' pass, fetch the next pair of tiles (this thread's next, under the static
     * schedule) into L2 while computing this one, a slice of its codes, scales and lows per group. Only
     * 8-bit codes (the LM head) ask for it: at twice the bytes per op the hardware prefetcher falls behind
     * (the head 10-16 % faster at 32 rows); 4-bit layers gained nothing measurable. */
    const char *next_codes = (const char *)(packed + (tile + 2) * groups * 64 * BITS);
    const char *next_d = (const char *)(d + (tile + 2) * groups * 16);
    const char *next_m = (const char *)(m + (tile + 2) * groups * 16);
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; r++) acc0[r] = _mm512_setzero_ps(), acc1[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512i w0[8], w1[8];
        load_codes(packed + (tile * groups + g) * 64 * BITS, w0, BITS);
        load_codes(packed + ((tile + 1) * groups + g) * 64 * BITS, w1, BITS);
        const __m512 dv0 = _mm512_loadu_ps(d + (tile * groups + g) * 16);
        const __m512 mv0 = _mm512_loadu_ps(m + (tile * groups + g) * 16);
        const __m512 dv1 = _mm512_loadu_ps(d + ((tile + 1) * groups + g) * 16);
        const __m512 mv1 = _mm512_loadu_ps(m + ((tile + 1) * groups + g) * 16);
        if (ahead) {
#pragma GCC unroll 16
            for (int c = 0; c < 2 * BITS; c++) _mm_prefetch(next_codes + (g * 2 * BITS + c) * 64, _MM_HINT_T1);
            _mm_prefetch(next_d + g * 128, _MM_HINT_T1), _mm_prefetch(next_d + g * 128 + 64, _MM_HINT_T1);
            _mm_prefetch(next_m + g * 128, _MM_HINT_T1), _mm_prefetch(next_m + g * 128 + 64, _MM_HINT_T1);
        }
#pragma GCC unroll 8
        for (int r = 0; r < ROWS; r++) {
            const int32_t *xr = (const int32_t *)(xq + r * k + g * Q4_GROUP);
            __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) {
                const __m512i a = _mm512_set1_epi32(xr[j]);
                s0 = _mm512_dpbusd_epi32(s0, w0[j], a);
                s1 = _mm512_dpbusd_epi32(s1, w1[j], a);
            }
            const __m512 dxr = _mm512_set1_ps(dx[r * groups + g]), sxr = _mm512_set1_ps(sx[r * groups + g]);
            acc0[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_mul_ps(dv0, dxr), acc0[r]);
            acc0[r] = _mm512_fmadd_ps(mv0, sxr, acc0[r]);
            acc1[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), _mm512_mul_ps(dv1, dxr), acc1[r]);
            acc1[r] = _mm512_fmadd_ps(mv1, sxr, acc1[r]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; r++) {
        _mm512_storeu_ps(out + r * n + tile * 16, acc0[r]);
        _mm512_storeu_ps(out + r * n + tile * 16 + 16, acc1[r]);
    }
}

/* The tiles of out [rows, n] = xq [rows, k] times the packed weight [n, k] transposed, shared among the
 * threads of the enclosing parallel region (an orphaned `omp for`, with its barrier). */
static inline __attribute__((always_inline)) void tiles_of(const int8_t *xq, const float *dx, const float *sx,
                                                           int64_t rows, int64_t k, const uint8_t *packed,
                                                           const float *d, const float *m, int64_t n, float *out,
                                                           const int BITS) {
    const int64_t groups = k / Q4_GROUP;
    if ((n / 16) % 2 == 0) { /* pairs of tiles: 15-20 % faster from 4 rows up, the same numbers */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n / 16; t += 2) {
            for (int64_t r0 = 0; r0 < rows; r0 += Q4_ROWS2) {
                const int64_t left = rows - r0;
                const int8_t *xr = xq + r0 * k;
                const float *dr = dx + r0 * groups, *sr = sx + r0 * groups;
                float *o = out + r0 * n;
                const int ahead = BITS == 8 && r0 == 0 && t + 2 < n / 16;
                switch (left >= Q4_ROWS2 ? Q4_ROWS2 : left) {
                    case 4: q4_tile2(packed, d, m, xr, dr, sr, k, n, t, o, 4, BITS, ahead); break;
                    case 3: q4_tile2(packed, d, m, xr, dr, sr, k, n, t, o, 3, BITS, ahead); break;
                    case 2: q4_tile2(packed, d, m, xr, dr, sr, k, n, t, o, 2, BITS, ahead); break;
                    default: q4_tile2(packed, d, m, xr, dr, sr, k, n, t, o, 1, BITS, ahead); break;
                }
            }
        }
        return;
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n / 16; t++) {
        for (int64_t r0 = 0; r0 < rows; r0 += Q4_ROWS) {
            const int64_t left = rows - r0;
            const int8_t *xr = xq + r0 * k;
            const float *dr = dx + r0 * groups, *sr = sx + r0 * groups;
            float *o = out + r0 * n;
            switch (left >= Q4_ROWS ? Q4_ROWS : left) {
#define Q4_CASE(R) case R: q4_tile(packed, d, m, xr, dr, sr, k, n, t, o, R, BITS); break;

                Q4_CASE(8) Q4_CASE(7) Q4_CASE(6) Q4_CASE(5) Q4_CASE(4) Q4_CASE(3) Q4_CASE(2)
#undef Q4_CASE
                default: q4_tile(packed, d, m, xr, dr, sr, k, n, t, o, 1, BITS); break;
            }
        }
    }
}

static void q4_tiles(const int8_t *xq, const float *dx, const float *sx, int64_t rows, int64_t k,
                     const uint8_t *packed, const float *d, const float *m, int64_t n, float *out) {
    tiles_of(xq, dx, sx, rows, k, packed, d, m, n, out, 4);
}

static void q8_tiles(const int8_t *xq, const float *dx, const float *sx, int64_t rows, int64_t k,
                     const uint8_t *packed, const float *d, const float *m, int64_t n, float *out) {
    tiles_of(xq, dx, sx, rows, k, packed, d, m, n, out, 8);
}

/* out [rows, n] = x [rows, k] times the packed weight [n, k] transposed (k % 32 == 0, n % 16 == 0), its
 * codes 4 or 8 `bits` wide (w = d * q + m per 32 inputs either way). */
int q4_linear(const float *x, int64_t rows, int64_t k, const uint8_t *packed, const float *d, const float *m,
              int64_t n, float *out, int bits, int threads) {
    if (bits != 4 && bits != 8) return -2;
    const int64_t groups = k / Q4_GROUP;
    int8_t *xq = malloc((size_t)(rows * k));
    float *dx = malloc(sizeof(float) * (size_t)(rows * groups));
    float *sx = malloc(sizeof(float) * (size_t)(rows * groups));
    if (!xq || !dx || !sx) {
        free(xq), free(dx), free(sx);
        return -1;
    }
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) quantize_row(x + r * k, k, xq + r * k, dx + r * groups, sx + r * groups);
        if (bits == 8)
            q8_tiles(xq, dx, sx, rows, k, packed, d, m, n, out);
        else
            q4_tiles(xq, dx, sx, rows, k, packed, d, m, n, out);
    }
    free(xq), free(dx), free(sx);
    return 0;
}

/* decode_layers' two weight kinds: a projection's input row quantized to int8 per 32 (w4a8) or rounded
 * to bf16 (bf16 weights), into row r of `xq`; and a projection over the layer's fields from f[i] on. */
static inline __attribute__((always_inline)) void prep_row(const float *src, int64_t k, int64_t r, int8_t *xq,
                                                           float *dx, float *sx, const int bf16_weights) {
#ifdef HAVE_BF16_TILES
    if (bf16_weights) {
        to_bf16_row(src, k, (uint16_t *)xq + r * k);
        return;
    }
#endif
    const int64_t groups = k / Q4_GROUP;
    quantize_row(src, k, xq + r * k, dx + r * groups, sx + r * groups);
}

static inline __attribute__((always_inline)) void project(const int64_t *f, int i, const int8_t *xq,
                                                          const float *dx, const float *sx, int64_t rows, int64_t k,
                                                          int64_t n, float *out, const int bf16_weights) {
#ifdef HAVE_BF16_TILES
    if (bf16_weights) {
        bf16_tiles((const uint16_t *)xq, rows, k, (const uint16_t *)f[i], n, out);
        return;
    }
#endif
    q4_tiles(xq, dx, sx, rows, k, (const uint8_t *)f[i], (const float *)f[i + 1], (const float *)f[i + 2], n, out);
}

/*
 * A whole step's decoder layers under w4a8, in one parallel region: per layer the residual add +
 * RMSNorm, qkv, rotary, the K/V write, paged attention, o_proj, add + RMSNorm, gate/up, silu*mul,
 * down — the same arithmetic as the per-op kernels, without a Python call, an allocation or a
 * thread fork between them. Every row (token) attends over its own sequence's keys in the cache,
 * its own included (all rows' K/V are written first): row r belongs to sequence row_seq[r] (NULL:
 * r, a decode step), whose block table is tables[row_seq[r]], and sees lens[r] keys (its position
 * + 1), so decode, prefill and mixed steps are one code path.
 *
 * `layer` holds DECODE_LAYER_FIELDS addresses per layer, in this order: input norm weight, post norm
 * weight, then packed / d / m for qkv, o_proj, gate_up and down, then the layer's flat K and V cache,
 * and its sliding window (0: none) as a number. `delta` [rows, hidden] enters holding the embeddings
 * and leaves holding the last layer's output; `residual` [rows, hidden] leaves holding the residual
 * stream before it (the final norm adds the two). cos/sin [rows, rot]; slots [rows].
 */
#define DECODE_LAYER_FIELDS 17
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
int decode_layers(const int64_t *layer, int64_t num_layers, float *delta, float *residual, int64_t rows,
                  int64_t hidden, int64_t heads, int64_t kv_heads, int64_t dim, int64_t inter, float eps,
                  const float *cos, const float *sin, int64_t rot, const int64_t *slots, const int64_t *tables,
                  const int64_t *row_seq, int64_t table_width, const int64_t *lens, int64_t block_size, float scale,
                  int bf16, int bf16_weights, int threads) {
#ifndef HAVE_BF16_TILES
    if (bf16_weights) return -2;
#endif
    const int64_t q_width = heads * dim, kv_width = kv_heads * dim, qkv_width = q_width + 2 * kv_width;
    const int64_t widest = (2 * inter > qkv_width ? 2 * inter : qkv_width);
    const int64_t k_max = inter > q_width ? (inter > hidden ? inter : hidden) : (q_width > hidden ? q_width : hidden);
    if (hidden % Q4_GROUP || q_width % Q4_GROUP || inter % Q4_GROUP) return -2;
    const size_t floats = (size_t)(rows * (hidden + widest + q_width + inter + 2 * (k_max / Q4_GROUP)));
    float *buf = malloc(sizeof(float) * floats);
    int8_t *xq = malloc(2 * (size_t)(rows * k_max)); /* int8 codes, or bf16 activations */
    if (!buf || !xq) {
        free(buf), free(xq);
        return -1;
    }
    float *x = buf;                    /* [rows, hidden] normed input of a projection */
    float *wide = x + rows * hidden;   /* [rows, qkv_width] or [rows, 2 * inter] */
    float *attn = wide + rows * widest; /* [rows, q_width] attention output */
    float *act = attn + rows * q_width; /* [rows, inter] */
    float *dx = act + rows * inter, *sx = dx + rows * (k_max / Q4_GROUP);
    const attend_plan plan = plan_attention(lens, rows, heads, kv_heads, threads);
    const int64_t split = plan.split, per_task = plan.per_task;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        attend_scratch sc;
        const int ok = scratch_alloc(&sc, &plan, dim, &failed);
#pragma omp barrier
#ifdef EMBER_PROFILE
        double phase_start = omp_get_wtime();
#endif
        for (int64_t l = 0; l < num_layers && !failed; l++) {
            const int64_t *f = layer + l * DECODE_LAYER_FIELDS;
            const float *in_w = (const float *)f[0], *post_w = (const float *)f[1];
            const void *kc = (const void *)f[14], *vc = (const void *)f[15];
            const int64_t window = f[16];
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
            project(f, 2, xq, dx, sx, rows, hidden, qkv_width, wide, bf16_weights);
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
#pragma omp for schedule(dynamic, 1)
                for (int64_t task = 0; task < rows * split; task++) {
                    if (!ok) continue;
                    /* no guess at the next task: a prompt's rows mostly share their sequence, already fetched */
                    decode_task(task, split, per_task, wide, qkv_width, kc, vc, tables, row_seq, table_width, lens,
                                heads, kv_heads, dim, block_size, window, scale, attn, q_width, sc.slots, sc.scores,
                                sc.acc, sc.sums, -1, bf16);
                }
#pragma omp for schedule(static)
                for (int64_t r = 0; r < rows; r++) prep_row(attn + r * q_width, q_width, r, xq, dx, sx, bf16_weights);
            }
            PHASE(2);
            project(f, 5, xq, dx, sx, rows, q_width, hidden, delta, bf16_weights);
            PHASE(3);
            /* residual += o, x = norm(residual), quantized for gate/up */
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) {
                float *res = residual + r * hidden;
                norm_row(res, delta + r * hidden, res, post_w, eps, x + r * hidden, hidden);
                prep_row(x + r * hidden, hidden, r, xq, dx, sx, bf16_weights);
            }
            PHASE(4);
            project(f, 8, xq, dx, sx, rows, hidden, 2 * inter, wide, bf16_weights);
            PHASE(5);
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) {
                silu_mul_row(wide + r * 2 * inter, act + r * inter, inter);
                prep_row(act + r * inter, inter, r, xq, dx, sx, bf16_weights);
            }
            PHASE(6);
            project(f, 11, xq, dx, sx, rows, inter, hidden, delta, bf16_weights);
            PHASE(7);
        }
        scratch_free(&sc);
    }
    free(buf), free(xq);
    return failed ? -1 : 0;
}
#else
int q4_supported(void) { return 0; }
int q4_linear(const float *x, int64_t rows, int64_t k, const uint8_t *packed, const float *d, const float *m,
              int64_t n, float *out, int bits, int threads) {
    return -2;
}
int decode_layers(const int64_t *layer, int64_t num_layers, float *delta, float *residual, int64_t rows,
                  int64_t hidden, int64_t heads, int64_t kv_heads, int64_t dim, int64_t inter, float eps,
                  const float *cos, const float *sin, int64_t rot, const int64_t *slots, const int64_t *tables,
                  const int64_t *row_seq, int64_t table_width, const int64_t *lens, int64_t block_size, float scale,
                  int bf16, int bf16_weights, int threads) {
    return -2;
}
#endif

int ember_native_version(void) { return 6; }
