/*
 * int4 weights x int8 activations (AVX-512 VNNI): `--quantize w4a8`'s linears, and with 8-bit codes
 * its LM head.
 *
 * Weights: GGUF Q4_1's blocks, w = d * q + m per group of 32 inputs, q in 0..15. Packed for
 * vpdpbusd in tiles of 16 output features: for tile t and group g, 4 chunks of 64 bytes; byte b
 * (0..3) of lane j in chunk c holds q[16t + j][32g + 8c + b] in its low nibble and
 * q[16t + j][32g + 8c + 4 + b] in its high one. d and m are float16 [tiles, groups, 16] (GGUF's own
 * precision for them: a Q4_1 tensor takes exactly its file's bytes), widened as they are loaded.
 * Activations are quantized per row and group of 32 to int8 (x = dx * xq, Q8_0's rule), so
 *   sum_k w x = sum_g d dx sum_k q xq + m dx sum_k xq
 * with the integer sums done 64 products per instruction. Each row's result depends on that row
 * only: batching never changes a sequence's numbers.
 */
#include <stdlib.h>

#include "matmul.h"

#ifdef EMBER_HAVE_VNNI
int q4_supported(void) { return 1; }

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

/* 16 float16 values widened to float32. */
static inline __attribute__((always_inline)) __m512 half16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

#define Q4_ROWS 8 /* rows per pass over a weight tile: 16 accumulators + 8 unpacked weights in 32 registers */

/* ROWS (1..Q4_ROWS) rows of activations against one tile of 16 output features. */
static inline __attribute__((always_inline)) void q4_tile(const uint8_t *packed, const uint16_t *d, const uint16_t *m,
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
        const __m512 dv = half16(d + (tile * groups + g) * 16);
        const __m512 mv = half16(m + (tile * groups + g) * 16);
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
static inline __attribute__((always_inline)) void q4_tile2(const uint8_t *packed, const uint16_t *d, const uint16_t *m,
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
    const char *next_m = (const char *)(m + (tile + 2) * groups * 16);  /* 32 bytes per tile and group */
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; r++) acc0[r] = _mm512_setzero_ps(), acc1[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512i w0[8], w1[8];
        load_codes(packed + (tile * groups + g) * 64 * BITS, w0, BITS);
        load_codes(packed + ((tile + 1) * groups + g) * 64 * BITS, w1, BITS);
        const __m512 dv0 = half16(d + (tile * groups + g) * 16);
        const __m512 mv0 = half16(m + (tile * groups + g) * 16);
        const __m512 dv1 = half16(d + ((tile + 1) * groups + g) * 16);
        const __m512 mv1 = half16(m + ((tile + 1) * groups + g) * 16);
        if (ahead) {
#pragma GCC unroll 16
            for (int c = 0; c < 2 * BITS; c++) _mm_prefetch(next_codes + (g * 2 * BITS + c) * 64, _MM_HINT_T1);
            _mm_prefetch(next_d + g * 64, _MM_HINT_T1), _mm_prefetch(next_m + g * 64, _MM_HINT_T1);
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
                                                           const uint16_t *d, const uint16_t *m, int64_t n, float *out,
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

/* (matmul.h) */
void q4_tiles(const int8_t *xq, const float *dx, const float *sx, int64_t rows, int64_t k,
              const uint8_t *packed, const uint16_t *d, const uint16_t *m, int64_t n, float *out) {
    tiles_of(xq, dx, sx, rows, k, packed, d, m, n, out, 4);
}

void q8_tiles(const int8_t *xq, const float *dx, const float *sx, int64_t rows, int64_t k,
              const uint8_t *packed, const uint16_t *d, const uint16_t *m, int64_t n, float *out) {
    tiles_of(xq, dx, sx, rows, k, packed, d, m, n, out, 8);
}

/* out [rows, n] = x [rows, k] times the packed weight [n, k] transposed (k % 32 == 0, n % 16 == 0), its
 * codes 4 or 8 `bits` wide (w = d * q + m per 32 inputs either way). */
int q4_linear(const float *x, int64_t rows, int64_t k, const uint8_t *packed, const uint16_t *d, const uint16_t *m,
              int64_t n, float *out, int bits, int threads) {
    if (bits != 4 && bits != 8) return EMBER_E_BITS;
    if (k % Q4_GROUP) return EMBER_E_IN_FEATURES;
    if (n % 16) return EMBER_E_OUT_FEATURES;
    const int64_t groups = k / Q4_GROUP;
    int8_t *xq = malloc((size_t)(rows * k));
    float *dx = malloc(sizeof(float) * (size_t)(rows * groups));
    float *sx = malloc(sizeof(float) * (size_t)(rows * groups));
    if (!xq || !dx || !sx) {
        free(xq), free(dx), free(sx);
        return EMBER_E_NO_MEMORY;
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
    return EMBER_OK;
}
#else
int q4_supported(void) { return 0; }
int q4_linear(const float *x, int64_t rows, int64_t k, const uint8_t *packed, const uint16_t *d, const uint16_t *m,
              int64_t n, float *out, int bits, int threads) {
    return EMBER_E_NO_VNNI;
}
#endif
