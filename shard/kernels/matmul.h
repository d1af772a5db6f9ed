/*
 * The matmul kernels' shared pieces: the activations' conversions and the tile loops that bf16_linear /
 * q4_linear (matmul_bf16.c, matmul_q4.c) and decode_layers (fused_step.c) run inside their own parallel
 * regions. Each row's result depends on that row only: batching never changes a sequence's numbers.
 */
#ifndef EMBER_MATMUL_H
#define EMBER_MATMUL_H

#include "ember.h"

#ifdef __AVX512F__
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

#ifdef EMBER_HAVE_VNNI
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
