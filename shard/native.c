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

/* One (sequence, KV head): its `groups` query heads over keys start .. start+n-1. */
static inline __attribute__((always_inline)) void attend(
    const float *qb, const void *k, const void *v, const int64_t *table, int64_t start, int64_t n, int64_t h,
    int64_t kv_heads, int64_t block_size, float scale, float *scores, float *acc, float *sums,
    float *out, const int64_t groups, const int64_t dim, const int bf16) {
    /* positions start .. start+n-1 walk the block table without a division per token */
    int64_t block = start / block_size, offset = start % block_size;
    for (int64_t t = 0; t < n; t++) {
        const int64_t slot = table[block] * block_size + offset;
        if (++offset == block_size) offset = 0, block++;
        const void *kr = row_at(k, slot * kv_heads + h, dim, bf16);
        for (int64_t g = 0; g < groups; g++) {
            const float *qg = qb + g * dim;
            float dot = 0.f;
            if (VECTOR_OK(dim)) {
                dot = dot_row(qg, kr, dim, bf16);
            } else {
                _Pragma("omp simd reduction(+ : dot)")
                for (int64_t i = 0; i < dim; i++) dot += qg[i] * elem(kr, i, bf16);
            }
            scores[g * n + t] = dot * scale;
        }
    }
    for (int64_t g = 0; g < groups; g++) {
        float *s = scores + g * n;
        float top = s[0];
        _Pragma("omp simd reduction(max : top)")
        for (int64_t t = 1; t < n; t++) top = s[t] > top ? s[t] : top;
        float total = 0.f;
        _Pragma("omp simd reduction(+ : total)")
        for (int64_t t = 0; t < n; t++) {
            s[t] = exp_neg(s[t] - top);
            total += s[t];
        }
        sums[g] = total;
    }
    memset(acc, 0, sizeof(float) * (size_t)(groups * dim));
    block = start / block_size, offset = start % block_size;
    for (int64_t t = 0; t < n; t++) {
        const int64_t slot = table[block] * block_size + offset;
        if (++offset == block_size) offset = 0, block++;
        const void *vr = row_at(v, slot * kv_heads + h, dim, bf16);
        for (int64_t g = 0; g < groups; g++) {
            const float p = scores[g * n + t];
            float *a = acc + g * dim;
            if (VECTOR_OK(dim)) {
                axpy_row(a, p, vr, dim, bf16);
            } else {
                _Pragma("omp simd")
                for (int64_t i = 0; i < dim; i++) a[i] += p * elem(vr, i, bf16);
            }
        }
    }
    for (int64_t g = 0; g < groups; g++) {
        const float inv = 1.f / sums[g];
        float *o = out + g * dim;
        _Pragma("omp simd")
        for (int64_t i = 0; i < dim; i++) o[i] = acc[g * dim + i] * inv;
    }
}

static int paged_decode(const float *q, int64_t q_stride, const void *k, const void *v, const int64_t *tables,
                        int64_t table_width, const int64_t *lens, int64_t batch, int64_t heads, int64_t kv_heads,
                        int64_t dim, int64_t block_size, int64_t window, float scale, float *out, int threads,
                        const int bf16) {
    const int64_t groups = heads / kv_heads;
    int64_t longest = 1;
    for (int64_t b = 0; b < batch; b++)
        if (lens[b] > longest) longest = lens[b];
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *scores = malloc(sizeof(float) * (size_t)(groups * longest));
        float *acc = malloc(sizeof(float) * (size_t)(groups * dim));
        float *sums = malloc(sizeof(float) * (size_t)groups);
        const int ok = scores && acc && sums;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < batch; b++) {
            for (int64_t h = 0; h < kv_heads; h++) {
                if (!ok) continue;
                const int64_t len = lens[b];
                const int64_t start = (window > 0 && len > window) ? len - window : 0;
                const float *qb = q + b * q_stride + h * groups * dim;
                const int64_t *table = tables + b * table_width;
                float *o = out + (b * heads + h * groups) * dim;
                /* constant head sizes let the compiler unroll the row loops completely */
                if (dim == 64)
                    attend(qb, k, v, table, start, len - start, h, kv_heads, block_size, scale, scores, acc,
                           sums, o, groups, 64, bf16);
                else if (dim == 128)
                    attend(qb, k, v, table, start, len - start, h, kv_heads, block_size, scale, scores, acc,
                           sums, o, groups, 128, bf16);
                else
                    attend(qb, k, v, table, start, len - start, h, kv_heads, block_size, scale, scores, acc,
                           sums, o, groups, dim, bf16);
            }
        }
        free(scores);
        free(acc);
        free(sums);
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

/* out = w * r / sqrt(mean(r^2) + eps) per row, r = x (+ delta, stored into h when given): the residual
 * add and the RMSNorm of a decoder layer in one pass over the row. */
int rms_norm_f32(const float *x, const float *delta, float *h, const float *w, float eps, float *out, int64_t rows,
                 int64_t dim, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * dim >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *o = out + r * dim;
        float sq = 0.f;
        if (delta) {
            const float *dr = delta + r * dim;
            float *hr = h + r * dim;
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
    return 0;
}

/* out[r, i] = silu(gu[r, i]) * gu[r, inter + i]: the gated MLP's activation on the fused gate/up output. */
int silu_mul_f32(const float *gu, float *out, int64_t rows, int64_t inter, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * inter >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gu + r * 2 * inter;
        const float *u = g + inter;
        float *o = out + r * inter;
#pragma omp simd
        for (int64_t i = 0; i < inter; i++) {
            const float x = g[i];
            const float e = exp_neg(x > 0.f ? -x : x); /* e^-|x|, never overflows */
            const float sig = x > 0.f ? 1.f / (1.f + e) : e / (1.f + e);
            o[i] = x * sig * u[i];
        }
    }
    return 0;
}

/* Rotary embedding in place on the first `heads` heads of each row of x (rows `row_stride` floats
 * apart, heads `dim` apart): x[:rot] = x[:rot] * cos + swap_halves(x[:rot]) * sin, with cos/sin
 * [rows, rot] per token and sin's first half already negated (RotaryEmbedding's signed table). */
int rotary_f32(float *x, int64_t rows, int64_t row_stride, int64_t heads, int64_t dim, const float *cos,
               const float *sin, int64_t rot, int threads) {
    const int64_t half = rot / 2;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * heads * dim >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + r * rot;
        const float *s = sin + r * rot;
        for (int64_t hd = 0; hd < heads; hd++) {
            float *v = x + r * row_stride + hd * dim;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                const float a = v[i], b = v[i + half];
                v[i] = a * c[i] + b * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
    return 0;
}

int ember_native_version(void) { return 2; }
