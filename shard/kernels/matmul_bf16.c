/*
 * bfloat16 weights times float32 activations rounded to bfloat16 (`--matmul-dtype bfloat16`), float32
 * sums: what oneDNN's bf16 linear computes, on AVX-512 BF16's vdpbf16ps (two products per lane and
 * instruction). The weight [n, k] is packed by tiles of 16 output features and pairs of inputs:
 * [n / 16, k / 2, 16, 2], so one 64-byte load holds a pair of inputs for 16 outputs, and the matching
 * pair of a row's activations is one broadcast dword.
 */
#include <stdlib.h>

#include "matmul.h"

#ifdef EMBER_HAVE_BF16
int bf16_supported(void) { return 1; }

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

/* (matmul.h) */
void bf16_tiles(const uint16_t *xb, int64_t rows, int64_t k, const uint16_t *w, int64_t n, float *out) {
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
    if (k % 32) return EMBER_E_IN_FEATURES;
    if (n % 16) return EMBER_E_OUT_FEATURES;
    uint16_t *xb = malloc(sizeof(uint16_t) * (size_t)(rows * k));
    if (!xb) return EMBER_E_NO_MEMORY;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) to_bf16_row(x + r * k, k, xb + r * k);
        bf16_tiles(xb, rows, k, w, n, out);
    }
    free(xb);
    return EMBER_OK;
}
#else
int bf16_supported(void) { return 0; }
int bf16_linear(const float *x, int64_t rows, int64_t k, const uint16_t *w, int64_t n, float *out, int threads) {
    return EMBER_E_NO_BF16;
}
#endif
