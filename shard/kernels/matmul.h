/*
 * The matmul kernels' shared pieces: the activations' conversions and the tile loops that bf16_linear /
 * q4_linear (matmul_bf16.c, matmul_q4.c) and decode_layers (fused_step.c) run inside their own parallel
 * regions. Each row's result depends on that row only: batching never changes a sequence's numbers.
 */
#ifndef EMBER_MATMUL_H
#define EMBER_MATMUL_H

#include "ember.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define Q4_GROUP 32 /* inputs per scale: GGUF Q4_1's blocks for the weights, Q8_0's for the activations */

#ifdef EMBER_HAVE_BF16
/* x [k] float32 -> o [k] bf16, round to nearest even (as torch's casts); k % 32 == 0 */
static inline void to_bf16_row(const float *x, int64_t k, uint16_t *o) {
    for (int64_t i = 0; i < k; i += 32) {
        const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
        _mm512_storeu_si512((void *)(o + i), (__m512i)v);
    }
}

/* out [rows, n] = xb [rows, k] (bf16) times the packed weight transposed, its tiles shared among the
 * threads of the enclosing parallel region (an orphaned `omp for`, with its barrier). */
EMBER_INTERNAL void bf16_tiles(const uint16_t *xb, int64_t rows, int64_t k, const uint16_t *w, int64_t n, float *out);
#endif

#ifdef EMBER_HAVE_Q4
/* One row of activations quantized per group of 32 to int8: xq [k], dx and sx [k / 32] the scale and
 * the scale times the group's code sum. AVX-512 and AVX2 round the same products the same way (to nearest
 * even) and saturate alike, so both give the same bytes. */
static inline void quantize_row(const float *x, int64_t k, int8_t *xq, float *dx, float *sx) {
    for (int64_t g = 0; g < k / Q4_GROUP; g++) {
        const float *src = x + g * Q4_GROUP;
#ifdef EMBER_HAVE_VNNI
        const __m512 a = _mm512_loadu_ps(src), b = _mm512_loadu_ps(src + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        const float d = amax / 127.f;
        const __m512 inv = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
        const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)); /* round to nearest even */
        const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
        _mm_storeu_si128((__m128i *)(xq + g * Q4_GROUP), _mm512_cvtsepi32_epi8(qa));
        _mm_storeu_si128((__m128i *)(xq + g * Q4_GROUP + 16), _mm512_cvtsepi32_epi8(qb));
        const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
#else
        __m256 v[4], top = _mm256_setzero_ps();
        const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(src + 8 * i);
            top = _mm256_max_ps(top, _mm256_and_ps(v[i], magnitude));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float d = _mm_cvtss_f32(m4) / 127.f;
        const __m256 inv = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
        __m256i q[4];
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv)); /* round to nearest even */
        /* packs works within 128-bit lanes: its bytes come out as [q0 0-3, q1 0-3, q2 0-3, q3 0-3 | q0 4-7, ...] */
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)(xq + g * Q4_GROUP),
                            _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        const __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
        const int32_t sum = _mm_cvtsi128_si32(s4);
#endif
        dx[g] = d;
        sx[g] = d * (float)sum;
    }
}

/* out [rows, n] = xq [rows, k] (int8 per 32, quantize_row) times the packed weight [n, k] transposed, its
 * 4-, 5- or 8-bit codes' (q4_tiles, q5_tiles, q8_tiles) tiles shared among the threads of the enclosing
 * parallel region (an orphaned `omp for`, with its barrier). On AMX tiles (q4_amx) blocks of 16 rows are
 * read, so `xq` must be readable to the next multiple of 16 rows. */
EMBER_INTERNAL void q4_tiles(const int8_t *xq, const float *dx, const float *sx, int64_t rows, int64_t k,
                             const uint8_t *packed, const uint16_t *d, const uint16_t *m, int64_t n, float *out);
EMBER_INTERNAL void q5_tiles(const int8_t *xq, const float *dx, const float *sx, int64_t rows, int64_t k,
                             const uint8_t *packed, const uint16_t *d, const uint16_t *m, int64_t n, float *out);
EMBER_INTERNAL void q8_tiles(const int8_t *xq, const float *dx, const float *sx, int64_t rows, int64_t k,
                             const uint8_t *packed, const uint16_t *d, const uint16_t *m, int64_t n, float *out);
#endif

#endif
