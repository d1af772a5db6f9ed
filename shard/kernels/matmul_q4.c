/*
 * int4 weights x int8 activations: `--quantize w4a8`'s linears, and with 8-bit codes its LM head. On
 * AVX-512 VNNI (vpdpbusd, 16 outputs a vector, AMX int8 tiles for many rows where the CPU has them), else on
 * AVX2 (vpmaddubsw, 8 outputs a vector: the AVX2 section below).
 *
 * Weights: GGUF Q4_1's blocks, w = d * q + m per group of 32 inputs, q in 0..15. Packed for
 * vpdpbusd in tiles of 16 output features: for tile t and group g, 4 chunks of 64 bytes; byte b
 * (0..3) of lane j in chunk c holds q[16t + j][32g + 8c + b] in its low nibble and
 * q[16t + j][32g + 8c + 4 + b] in its high one. d and m are float16 [tiles, groups, 16] (GGUF's own
 * precision for them: a Q4_1 tensor takes exactly its file's bytes), widened as they are loaded; m is
 * NULL for the symmetric types (m = -2^(bits-1) d: Q4_0, Q5_0, Q8_0), whose files hold no minimum.
 * 8-bit codes: byte b of lane j in chunk c (of 8) is q[16t + j][32g + 4c + b]. 5-bit codes: the 4-bit
 * layout of their low nibbles, then 8 64-bit masks of their fifth bits, bit 4 j + b of mask c for input
 * 32g + 4c + b of output 16t + j (320 bytes per tile and group).
 * Activations are quantized per row and group of 32 to int8 (x = dx * xq, Q8_0's rule), so
 *   sum_k w x = sum_g d dx sum_k q xq + m dx sum_k xq
 * with the integer sums done 64 products per instruction. Each row's result depends on that row
 * only: batching never changes a sequence's numbers.
 */
#include <stdlib.h>

#include "matmul.h"

#ifdef EMBER_HAVE_Q4
/* Rows r0.. of the activations, their scales and code sums, and the output. */
typedef struct {
    const int8_t *xq;
    const float *dx, *sx;
    float *out;
} row_block;

static inline __attribute__((always_inline)) row_block rows_from(const int8_t *xq, const float *dx, const float *sx,
                                                                 float *out, int64_t r0, int64_t k, int64_t n) {
    const int64_t groups = k / Q4_GROUP;
    return (row_block){xq + r0 * k, dx + r0 * groups, sx + r0 * groups, out + r0 * n};
}

#ifdef EMBER_HAVE_VNNI
int q4_supported(void) { return 1; }

/* The 8 code vectors of one (tile, group): BITS 4 holds two inputs' codes per byte (see above), BITS 8
 * one (byte b of lane j in chunk c: input 4c + b), so vector j always pairs with activation dword j. */
static inline __attribute__((always_inline)) void load_codes(const uint8_t *wp, __m512i *w, const int BITS) {
    if (BITS == 4 || BITS == 5) {
        const __m512i low = _mm512_set1_epi8(0x0F);
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            const __m512i v = _mm512_loadu_si512((const void *)(wp + c * 64));
            w[2 * c] = _mm512_and_si512(v, low);
            w[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
        if (BITS == 5) { /* the fifth bits: a 64-bit mask per vector, bit i for its byte i, adding 16 */
            const __m512i sixteen = _mm512_set1_epi8(16);
            uint64_t high[8];
            memcpy(high, wp + 256, sizeof high);
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) w[j] = _mm512_mask_add_epi8(w[j], _cvtu64_mask64(high[j]), w[j], sixteen);
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

/* The 16 minimums m of one (tile, group) at `at`; where m is NULL (a symmetric type: Q4_0, Q5_0, Q8_0) each
 * is -2^(BITS-1) d, exactly what float16 would have held. */
static inline __attribute__((always_inline)) __m512 lows16(const uint16_t *m, int64_t at, __m512 dv, const int BITS) {
    return m ? half16(m + at) : _mm512_mul_ps(dv, _mm512_set1_ps(-(float)(1 << (BITS - 1))));
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
        const __m512 mv = lows16(m, (tile * groups + g) * 16, dv, BITS);
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
    const char *next_m = m ? (const char *)(m + (tile + 2) * groups * 16) : NULL;  /* 32 bytes per tile and group */
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; r++) acc0[r] = _mm512_setzero_ps(), acc1[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512i w0[8], w1[8];
        load_codes(packed + (tile * groups + g) * 64 * BITS, w0, BITS);
        load_codes(packed + ((tile + 1) * groups + g) * 64 * BITS, w1, BITS);
        const __m512 dv0 = half16(d + (tile * groups + g) * 16);
        const __m512 mv0 = lows16(m, (tile * groups + g) * 16, dv0, BITS);
        const __m512 dv1 = half16(d + ((tile + 1) * groups + g) * 16);
        const __m512 mv1 = lows16(m, ((tile + 1) * groups + g) * 16, dv1, BITS);
        if (ahead) {
#pragma GCC unroll 16
            for (int c = 0; c < 2 * BITS; c++) _mm_prefetch(next_codes + (g * 2 * BITS + c) * 64, _MM_HINT_T1);
            _mm_prefetch(next_d + g * 64, _MM_HINT_T1);
            if (m) _mm_prefetch(next_m + g * 64, _MM_HINT_T1);
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

#ifdef EMBER_HAVE_AMX
/*
 * Many rows on AMX int8 tiles (Sapphire Rapids and later). A group of 32 inputs is one tdpbsud of 16 rows'
 * int8 activations (tmm0, 16 x 32 bytes, signed) by one (tile, group)'s codes (tmm1, 8 x 64 bytes,
 * unsigned: exactly the packed layout above, 4 consecutive inputs of 16 outputs per 64 bytes) into 16 x 16
 * int32 sums (tmm2). Those are the integers the vpdpbusd path sums, and each then takes the same float
 * operations in the same order (sums * (d dx) + acc, then m sx + acc, group by group), so a row's result
 * is the same to the bit on either path: a step's row count may pick the path.
 */
#define AMX_ROWS 16 /* rows per tile; `xq` must be readable to a multiple of 16 rows (matmul.h) */

/* The smallest row count that goes on tiles; 0: none (q4_amx sets it). */
static int64_t amx_min_rows = 0;


static void amx_configure(void) {
    amx_tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    c.rows[0] = AMX_ROWS, c.colsb[0] = Q4_GROUP; /* tmm0: activations */
    c.rows[1] = Q4_GROUP / 4, c.colsb[1] = 64;  /* tmm1: codes */
    c.rows[2] = AMX_ROWS, c.colsb[2] = 64;      /* tmm2, tmm3: int32 sums, one per group in turn */
    c.rows[3] = AMX_ROWS, c.colsb[3] = 64;
    _tile_loadconfig(&c);
}

/* The float work of one group's sums for ROWS rows: the vpdpbusd path's, operation for operation. */
static inline __attribute__((always_inline)) void amx_accumulate(const int32_t *sums, __m512 dv, __m512 mv,
                                                                 const float *dx, const float *sx, int64_t groups,
                                                                 int64_t g, __m512 *acc, const int ROWS) {
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; r++) {
        const __m512 s = _mm512_cvtepi32_ps(_mm512_load_si512((const void *)(sums + r * 16)));
        acc[r] = _mm512_fmadd_ps(s, _mm512_mul_ps(dv, _mm512_set1_ps(dx[r * groups + g])), acc[r]);
        acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sx[r * groups + g]), acc[r]);
    }
}

/* Group g's int32 sums of 16 rows by 16 outputs into `sums` (tmm2 and tmm3 in turn). */
static inline __attribute__((always_inline)) void amx_sums(const uint8_t *codes, const int8_t *xq, int64_t k,
                                                           int64_t g0, int64_t g, int32_t *sums) {
    _tile_loadd(0, xq + g * Q4_GROUP, k);
    _tile_loadd(1, codes + (g - g0) * 512, 64);
    if (g % 2 == 0) {
        _tile_zero(2);
        _tile_dpbsud(2, 0, 1);
        _tile_stored(2, sums, 64);
    } else {
        _tile_zero(3);
        _tile_dpbsud(3, 0, 1);
        _tile_stored(3, sums, 64);
    }
}

/* ROWS (1..16) rows against one tile of 16 outputs over groups g0 .. g1 - 1, whose codes are `codes` (a
 * byte per code, 512 bytes per group from g0). The sums of a group are computed (tmm2 and tmm3 in turn)
 * while the previous group's are accumulated. Past the first groups (g0 > 0) the rows' sums so far are
 * read back from `out`, where the previous groups left them: float32 both ways, so nothing rounds. */
static inline __attribute__((always_inline)) void amx_block(const uint8_t *codes, const uint16_t *d,
                                                            const uint16_t *m, const int8_t *xq, const float *dx,
                                                            const float *sx, int64_t k, int64_t n, int64_t tile,
                                                            int64_t g0, int64_t g1, float *out, const int ROWS,
                                                            const int BITS) {
    const int64_t groups = k / Q4_GROUP;
    int32_t sums[2][AMX_ROWS * 16] __attribute__((aligned(64)));
    __m512 acc[AMX_ROWS];
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; r++) acc[r] = g0 ? _mm512_loadu_ps(out + r * n + tile * 16) : _mm512_setzero_ps();
    amx_sums(codes, xq, k, g0, g0, sums[g0 % 2]);
    for (int64_t g = g0; g < g1; g++) {
        if (g + 3 < g1)
            for (int c = 0; c < 8; c++) _mm_prefetch((const char *)(codes + (g + 3 - g0) * 512 + c * 64), _MM_HINT_T0);
        if (g + 1 < g1) amx_sums(codes, xq, k, g0, g + 1, sums[(g + 1) % 2]);
        const __m512 dv = half16(d + (tile * groups + g) * 16);
        amx_accumulate(sums[g % 2], dv, lows16(m, (tile * groups + g) * 16, dv, BITS), dx, sx, groups, g, acc, ROWS);
    }
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; r++) _mm512_storeu_ps(out + r * n + tile * 16, acc[r]);
}

#define AMX_GROUPS 32 /* groups of 4-bit codes unpacked to bytes at a time: 16 KiB on the stack */

/* tiles_of on AMX tiles: a tile's 4-bit codes are unpacked to bytes AMX_GROUPS groups at a time (8-bit
 * codes are read in place), and every block of 16 rows runs over them before the next groups. */
static void amx_tiles(const int8_t *xq, const float *dx, const float *sx, int64_t rows, int64_t k,
                      const uint8_t *packed, const uint16_t *d, const uint16_t *m, int64_t n, float *out,
                      const int BITS) {
    const int64_t groups = k / Q4_GROUP;
    uint8_t unpacked[AMX_GROUPS * 512] __attribute__((aligned(64)));
    amx_configure();
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n / 16; t++) {
        for (int64_t g0 = 0; g0 < groups; g0 += AMX_GROUPS) {
            const int64_t g1 = g0 + AMX_GROUPS < groups ? g0 + AMX_GROUPS : groups;
            const uint8_t *codes = packed + (t * groups + g0) * 64 * BITS;
            /* this thread's next tile (static schedule) fetched into L2 meanwhile: the whole model does not
             * stay in cache, and a tile's work is too short for the hardware prefetcher to run ahead */
            const int ahead = t + 1 < n / 16;
            const char *next_codes = (const char *)(packed + ((t + 1) * groups + g0) * 64 * BITS);
            const char *next_d = (const char *)(d + ((t + 1) * groups + g0) * 16);
            const char *next_m = m ? (const char *)(m + ((t + 1) * groups + g0) * 16) : NULL;
            if (ahead)
                for (int64_t g = g0; g < g1; g += 2) {
                    for (int c = 0; c < 2 * BITS; c++) _mm_prefetch(next_codes + ((g - g0) * BITS + c) * 64, _MM_HINT_T1);
                    _mm_prefetch(next_d + (g - g0) * 32, _MM_HINT_T1);
                    if (m) _mm_prefetch(next_m + (g - g0) * 32, _MM_HINT_T1);
                }
            if (BITS != 8) {
                for (int64_t g = g0; g < g1; g++) {
                    __m512i w[8];
                    load_codes(packed + (t * groups + g) * 64 * BITS, w, BITS);
#pragma GCC unroll 8
                    for (int j = 0; j < 8; j++) _mm512_store_si512((void *)(unpacked + (g - g0) * 512 + j * 64), w[j]);
                }
                codes = unpacked;
            }
            for (int64_t r0 = 0; r0 < rows; r0 += AMX_ROWS) {
                const int64_t left = rows - r0;
                const row_block b = rows_from(xq, dx, sx, out, r0, k, n);
                switch (left >= AMX_ROWS ? AMX_ROWS : left) {
#define AMX_CASE(R) case R: amx_block(codes, d, m, b.xq, b.dx, b.sx, k, n, t, g0, g1, b.out, R, BITS); break;
                    AMX_CASE(16) AMX_CASE(15) AMX_CASE(14) AMX_CASE(13) AMX_CASE(12) AMX_CASE(11) AMX_CASE(10)
                    AMX_CASE(9) AMX_CASE(8) AMX_CASE(7) AMX_CASE(6) AMX_CASE(5) AMX_CASE(4) AMX_CASE(3)
                    AMX_CASE(2)
#undef AMX_CASE
                    default: amx_block(codes, d, m, b.xq, b.dx, b.sx, k, n, t, g0, g1, b.out, 1, BITS); break;
                }
            }
        }
    }
    _tile_release();
}

/* (matmul.h) Put AMX tiles to work from `min_rows` rows (0 or less: never): 1 when they will be, 0 when
 * the process may not use them (Linux grants AMX's state per process, on request). */
int q4_amx(int64_t min_rows) {
    if (min_rows <= 0) {
        amx_min_rows = 0;
        return 0;
    }
    const int permitted = amx_permitted();
    amx_min_rows = permitted ? min_rows : 0;
    return permitted;
}
#else
int q4_amx(int64_t min_rows) {
    (void)min_rows;
    return 0;
}
#endif

/* The tiles of out [rows, n] = xq [rows, k] times the packed weight [n, k] transposed, shared among the
 * threads of the enclosing parallel region (an orphaned `omp for`, with its barrier). */
static inline __attribute__((always_inline)) void tiles_of(const int8_t *xq, const float *dx, const float *sx,
                                                           int64_t rows, int64_t k, const uint8_t *packed,
                                                           const uint16_t *d, const uint16_t *m, int64_t n, float *out,
                                                           const int BITS) {
#ifdef EMBER_HAVE_AMX
    if (amx_min_rows && rows >= amx_min_rows) {
        amx_tiles(xq, dx, sx, rows, k, packed, d, m, n, out, BITS);
        return;
    }
#endif
    if ((n / 16) % 2 == 0) { /* pairs of tiles: 15-20 % faster from 4 rows up, the same numbers */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n / 16; t += 2) {
            for (int64_t r0 = 0; r0 < rows; r0 += Q4_ROWS2) {
                const int64_t left = rows - r0;
                const row_block b = rows_from(xq, dx, sx, out, r0, k, n);
                const int ahead = BITS == 8 && r0 == 0 && t + 2 < n / 16;
                switch (left >= Q4_ROWS2 ? Q4_ROWS2 : left) {
                    case 4: q4_tile2(packed, d, m, b.xq, b.dx, b.sx, k, n, t, b.out, 4, BITS, ahead); break;
                    case 3: q4_tile2(packed, d, m, b.xq, b.dx, b.sx, k, n, t, b.out, 3, BITS, ahead); break;
                    case 2: q4_tile2(packed, d, m, b.xq, b.dx, b.sx, k, n, t, b.out, 2, BITS, ahead); break;
                    default: q4_tile2(packed, d, m, b.xq, b.dx, b.sx, k, n, t, b.out, 1, BITS, ahead); break;
                }
            }
        }
        return;
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n / 16; t++) {
        for (int64_t r0 = 0; r0 < rows; r0 += Q4_ROWS) {
            const int64_t left = rows - r0;
            const row_block b = rows_from(xq, dx, sx, out, r0, k, n);
            switch (left >= Q4_ROWS ? Q4_ROWS : left) {
#define Q4_CASE(R) case R: q4_tile(packed, d, m, b.xq, b.dx, b.sx, k, n, t, b.out, R, BITS); break;

                Q4_CASE(8) Q4_CASE(7) Q4_CASE(6) Q4_CASE(5) Q4_CASE(4) Q4_CASE(3) Q4_CASE(2)
#undef Q4_CASE
                default: q4_tile(packed, d, m, b.xq, b.dx, b.sx, k, n, t, b.out, 1, BITS); break;
            }
        }
    }
}

#else /* AVX2 */
int q4_supported(void) { return 2; }

int q4_amx(int64_t min_rows) {
    (void)min_rows;
    return 0;
}

/*
 * AVX2 has no vpdpbusd. vpmaddubsw multiplies unsigned codes by signed activations and adds adjacent pairs
 * into 16-bit lanes, without saturating here: a 4-bit code times an int8 is at most 15 x 127, so a lane
 * holds the sum of all 8 vectors of a group (16 products, |sum| <= 30,480) before vpmaddwd widens it to
 * int32. 8-bit and 5-bit codes are split into their low four bits and the rest (the high four bits, or the
 * fifth bit), each summed the same way and put together in int32 (low + 16 rest). So every group's sums
 * are vpdpbusd's integers exactly, and the float steps that follow are the VNNI path's, in its order: the
 * two paths give the same bits. A vector holds 8 outputs: each tile of 16 is two halves, read from the same
 * packed bytes (lanes 0-7 of every 64-byte chunk, then lanes 8-15).
 */
#define Q4_ROWS_AVX2 4 /* rows per pass over half a tile: 4 accumulators, 4 (8: 5- and 8-bit) partial sums */

/* Vector j (0..7, paired with activation dword j) of one (tile, group)'s codes at `wp`, outputs 8h..8h+7:
 * `lo` their low four bits, `hi` the rest (none for 4-bit codes). */
static inline __attribute__((always_inline)) void codes_half(const uint8_t *wp, int h, int j, __m256i *lo,
                                                             __m256i *hi, const int BITS) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    if (BITS == 8) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(wp + j * 64 + h * 32));
        *lo = _mm256_and_si256(v, low);
        *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        return;
    }
    const __m256i v = _mm256_loadu_si256((const __m256i *)(wp + (j / 2) * 64 + h * 32));
    *lo = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(v, 4) : v, low);
    if (BITS == 5) { /* the fifth bits: 32 bits of mask j, bit i for byte i, spread to a byte each (0 or 1) */
        int32_t bits;
        memcpy(&bits, wp + 256 + j * 8 + h * 4, sizeof bits);
        const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(bits),
                                                   _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2,
                                                                    2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
        const __m256i bit = _mm256_and_si256(spread, _mm256_set1_epi64x((int64_t)0x8040201008040201ull));
        *hi = _mm256_min_epu8(bit, _mm256_set1_epi8(1));
    }
}

/* 8 float16 values widened to float32. */
static inline __attribute__((always_inline)) __m256 half8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

/* ROWS (1..Q4_ROWS_AVX2) rows against half h of tile `tile` (outputs 16 tile + 8h .. + 7). */
static inline __attribute__((always_inline)) void q4_half(const uint8_t *packed, const uint16_t *d, const uint16_t *m,
                                                          const int8_t *xq, const float *dx, const float *sx,
                                                          int64_t k, int64_t n, int64_t tile, int h, float *out,
                                                          const int ROWS, const int BITS) {
    const int64_t groups = k / Q4_GROUP;
    const __m256i ones = _mm256_set1_epi16(1), sixteens = _mm256_set1_epi16(16);
    __m256 acc[Q4_ROWS_AVX2];
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *wp = packed + (tile * groups + g) * 64 * BITS;
        __m256i lo16[Q4_ROWS_AVX2], hi16[Q4_ROWS_AVX2];
#pragma GCC unroll 4
        for (int r = 0; r < ROWS; r++) lo16[r] = _mm256_setzero_si256(), hi16[r] = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            __m256i lo, hi = _mm256_setzero_si256();
            codes_half(wp, h, j, &lo, &hi, BITS);
#pragma GCC unroll 4
            for (int r = 0; r < ROWS; r++) {
                const __m256i a = _mm256_set1_epi32(((const int32_t *)(xq + r * k + g * Q4_GROUP))[j]);
                lo16[r] = _mm256_add_epi16(lo16[r], _mm256_maddubs_epi16(lo, a));
                if (BITS != 4) hi16[r] = _mm256_add_epi16(hi16[r], _mm256_maddubs_epi16(hi, a));
            }
        }
        const int64_t at = (tile * groups + g) * 16 + 8 * h;
        const __m256 dv = half8(d + at);
        const __m256 mv = m ? half8(m + at) : _mm256_mul_ps(dv, _mm256_set1_ps(-(float)(1 << (BITS - 1))));
#pragma GCC unroll 4
        for (int r = 0; r < ROWS; r++) {
            __m256i s = _mm256_madd_epi16(lo16[r], ones);
            if (BITS != 4) s = _mm256_add_epi32(s, _mm256_madd_epi16(hi16[r], sixteens));
            const __m256 dxr = _mm256_set1_ps(dx[r * groups + g]), sxr = _mm256_set1_ps(sx[r * groups + g]);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dv, dxr), acc[r]);
            acc[r] = _mm256_fmadd_ps(mv, sxr, acc[r]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; r++) _mm256_storeu_ps(out + r * n + tile * 16 + 8 * h, acc[r]);
}

static inline __attribute__((always_inline)) void tiles_of(const int8_t *xq, const float *dx, const float *sx,
                                                           int64_t rows, int64_t k, const uint8_t *packed,
                                                           const uint16_t *d, const uint16_t *m, int64_t n, float *out,
                                                           const int BITS) {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n / 16; t++) {
        for (int h = 0; h < 2; h++) {
            for (int64_t r0 = 0; r0 < rows; r0 += Q4_ROWS_AVX2) {
                const int64_t left = rows - r0;
                const row_block b = rows_from(xq, dx, sx, out, r0, k, n);
                switch (left >= Q4_ROWS_AVX2 ? Q4_ROWS_AVX2 : left) {
                    case 4: q4_half(packed, d, m, b.xq, b.dx, b.sx, k, n, t, h, b.out, 4, BITS); break;
                    case 3: q4_half(packed, d, m, b.xq, b.dx, b.sx, k, n, t, h, b.out, 3, BITS); break;
                    case 2: q4_half(packed, d, m, b.xq, b.dx, b.sx, k, n, t, h, b.out, 2, BITS); break;
                    default: q4_half(packed, d, m, b.xq, b.dx, b.sx, k, n, t, h, b.out, 1, BITS); break;
                }
            }
        }
    }
}
#endif /* EMBER_HAVE_VNNI */

/* (matmul.h) */
void q4_tiles(const int8_t *xq, const float *dx, const float *sx, int64_t rows, int64_t k,
              const uint8_t *packed, const uint16_t *d, const uint16_t *m, int64_t n, float *out) {
    tiles_of(xq, dx, sx, rows, k, packed, d, m, n, out, 4);
}

void q8_tiles(const int8_t *xq, const float *dx, const float *sx, int64_t rows, int64_t k,
              const uint8_t *packed, const uint16_t *d, const uint16_t *m, int64_t n, float *out) {
    tiles_of(xq, dx, sx, rows, k, packed, d, m, n, out, 8);
}

void q5_tiles(const int8_t *xq, const float *dx, const float *sx, int64_t rows, int64_t k,
              const uint8_t *packed, const uint16_t *d, const uint16_t *m, int64_t n, float *out) {
    tiles_of(xq, dx, sx, rows, k, packed, d, m, n, out, 5);
}

/* out [rows, n] = x [rows, k] times the packed weight [n, k] transposed (k % 32 == 0, n % 16 == 0), its
 * codes 4 or 8 `bits` wide (w = d * q + m per 32 inputs either way). */
int q4_linear(const float *x, int64_t rows, int64_t k, const uint8_t *packed, const uint16_t *d, const uint16_t *m,
              int64_t n, float *out, int bits, int threads) {
    if (bits != 4 && bits != 5 && bits != 8) return EMBER_E_BITS;
    if (k % Q4_GROUP) return EMBER_E_IN_FEATURES;
    if (n % 16) return EMBER_E_OUT_FEATURES;
    const int64_t groups = k / Q4_GROUP;
    int8_t *xq = calloc((size_t)((rows + 15) / 16 * 16), (size_t)k); /* whole tiles of 16 rows (AMX) */
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
        else if (bits == 5)
            q5_tiles(xq, dx, sx, rows, k, packed, d, m, n, out);
        else
            q4_tiles(xq, dx, sx, rows, k, packed, d, m, n, out);
    }
    free(xq), free(dx), free(sx);
    return EMBER_OK;
}
#else
int q4_supported(void) { return 0; }
int q4_amx(int64_t min_rows) {
    (void)min_rows;
    return 0;
}
int q4_linear(const float *x, int64_t rows, int64_t k, const uint8_t *packed, const uint16_t *d, const uint16_t *m,
              int64_t n, float *out, int bits, int threads) {
    return EMBER_E_NO_INT8;
}
#endif
