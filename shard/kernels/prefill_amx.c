/*
 * ember.h's chunk_* pieces of a prompt chunk's attention over its cached context (prefill.c), read from a
 * bf16 paged KV cache, on AMX bf16 tiles (Sapphire Rapids and later).
 *
 * A chunk of `rows` new tokens at positions cached .. cached+rows-1, each attending causally over the keys
 * before it (or the last `window` of them). Per KV head, its query heads' rows (token r, group g) are
 * stacked as rows r*groups+g, sixteen to a tile:
 *
 *   1. The keys and values the chunk can see are repacked once into AMX's B layout (pairs of bf16 along
 *      the reduced dimension): keys 16 to a tile, values 32 keys to a tile.
 *   2. Per query tile: scores = Q K^T (tdpbf16ps, float32 sums) for every key the tile's rows may see;
 *      each row's softmax over its own keys in float32 (its maximum, e^(score - max) scaled, their sum);
 *      the probabilities rounded to bf16; out = P V (tdpbf16ps) / sum.
 *
 * The numbers are those of torch's SDPA on bf16 queries, keys and values, which this replaces on the
 * CPU: bf16 products summed in float32, softmax in float32, probabilities rounded to bf16 for P V. Unlike
 * SDPA it reads the cache in place through the block table, and spends its time on tiles rather than on
 * converting blocks between float32 and bf16.
 *
 * Layouts:
 *   q        [rows, heads, dim] float32, rows `q_stride` floats apart
 *   k, v     the layer's flat cache [slots, kv_heads, dim] bf16
 *   table    the sequence's block table (block ids of positions 0, block_size, ...)
 *   out      [rows, heads, dim] float32, rows `out_stride` floats apart
 */
#include "attention.h"

#if defined(__AMX_TILE__)
#include <sys/syscall.h>
#include <unistd.h>

/* (ember.h) Linux grants AMX's register state per process, on request: 1 once granted. */
int amx_permitted(void) {
    static int permitted = -1;
    if (permitted < 0) permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return permitted;
}
#endif

#ifdef EMBER_HAVE_AMX_BF16
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>

#define TILE 16     /* query rows per tile; keys per score tile */
#define PAIRS 32    /* keys per value tile (16 pairs) */
#define TILE_WORDS 256 /* a 16 x 64-byte tile, in 32-bit words */
#define CHUNK 256      /* keys per step of the online softmax: its scores stay in L1 */

/* Keys base+16j .. +15 of KV head h as `chunks` B tiles (one per 32 dims): word p of key n's chunk c is
 * the pair of dims c*32+2p, c*32+2p+1. Keys at or past `len` are zero. */
static void pack_keys(const uint16_t *k, const int64_t *table, int64_t first, int64_t len, int64_t h,
                      int64_t kv_heads, int64_t dim, int64_t block_size, uint32_t *dst) {
    const int64_t chunks = dim / 32;
    for (int64_t n = 0; n < TILE; n++) {
        const int64_t pos = first + n;
        if (pos >= len) {
            for (int64_t c = 0; c < chunks; c++)
                for (int64_t p = 0; p < 16; p++) dst[c * TILE_WORDS + p * 16 + n] = 0;
            continue;
        }
        const uint32_t *row = (const uint32_t *)(k + (slot_of(table, pos, block_size) * kv_heads + h) * dim);
        for (int64_t c = 0; c < chunks; c++)
            for (int64_t p = 0; p < 16; p++) dst[c * TILE_WORDS + p * 16 + n] = row[c * 16 + p];
    }
}

/* Values of keys first .. first+31 of KV head h as dim/16 B tiles: word col of row p of tile d pairs
 * dim d*16+col of keys first+2p and first+2p+1 (the first in the low half). Keys at or past `len` are
 * zero (their probabilities are zero too, and 0 * garbage could be NaN). */
static void pack_values(const uint16_t *v, const int64_t *table, int64_t first, int64_t len, int64_t h,
                        int64_t kv_heads, int64_t dim, int64_t block_size, uint32_t *dst) {
    const int64_t chunks = dim / 16;
    for (int64_t p = 0; p < 16; p++) {
        const int64_t a = first + 2 * p, b = a + 1;
        const uint16_t *ra = a < len ? v + (slot_of(table, a, block_size) * kv_heads + h) * dim : NULL;
        const uint16_t *rb = b < len ? v + (slot_of(table, b, block_size) * kv_heads + h) * dim : NULL;
        for (int64_t d = 0; d < chunks; d++) {
            const __m512i lo = ra ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(ra + d * 16)))
                                  : _mm512_setzero_si512();
            const __m512i hi = rb ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(rb + d * 16)))
                                  : _mm512_setzero_si512();
            _mm512_storeu_si512(dst + d * TILE_WORDS + p * 16, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
    }
}

/* One query tile's scores: S[16][keys] (float32, `keys` apart) = Q (tmm0..chunks-1) times the packed keys
 * of `blocks` 16-key blocks from `kp`, two blocks at a time in alternate accumulators. */
static inline void tile_scores(const uint32_t *kp, int64_t blocks, int64_t chunks, float *s, int64_t keys) {
    const int64_t block_words = chunks * TILE_WORDS;
    for (int64_t j = 0; j < blocks; j += 2) {
        const int two = j + 1 < blocks;
        const uint32_t *b0 = kp + j * block_words, *b1 = b0 + block_words;
        _tile_zero(6);
        if (two) _tile_zero(7);
        /* constant tile numbers: one step per 32 dims, the second block's in the other registers */
#define QK(c)                                          \
    if (chunks > c) {                                  \
        _tile_loadd(4, b0 + c * TILE_WORDS, 64);       \
        _tile_dpbf16ps(6, c, 4);                       \
        if (two) {                                     \
            _tile_loadd(5, b1 + c * TILE_WORDS, 64);   \
            _tile_dpbf16ps(7, c, 5);                   \
        }                                              \
    }
        QK(0) QK(1) QK(2) QK(3)
#undef QK
        _tile_stored(6, s + j * TILE, keys * 4);
        if (two) _tile_stored(7, s + (j + 1) * TILE, keys * 4);
    }
}

/* out tile [16][64 dims from d0] (float32, `dim` apart) = P [16][keys] (bf16, `keys` apart) times the packed
 * values of `pairs` 32-key blocks: four accumulators (tmm0-3) of 16 dims, the probabilities in tmm6/7. */
static inline void tile_values(const uint16_t *pb, int64_t pairs, const uint32_t *vp, int64_t dim, int64_t d0,
                               float *o, int64_t keys) {
    const int64_t chunks = (dim - d0) / 16 < 4 ? (dim - d0) / 16 : 4;
    const int64_t block_words = dim / 16 * TILE_WORDS;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t j = 0; j < pairs; j++) {
        const uint32_t *b = vp + j * block_words + (d0 / 16) * TILE_WORDS;
        const uint16_t *a = pb + j * PAIRS;
#define PV(A, c, B)                                    \
    if (chunks > c) {                                  \
        _tile_loadd(B, b + c * TILE_WORDS, 64);        \
        _tile_dpbf16ps(c, A, B);                       \
    }
        if (j % 2 == 0) {
            _tile_loadd(6, a, keys * 2);
            PV(6, 0, 4) PV(6, 1, 5) PV(6, 2, 4) PV(6, 3, 5)
        } else {
            _tile_loadd(7, a, keys * 2);
            PV(7, 0, 4) PV(7, 1, 5) PV(7, 2, 4) PV(7, 3, 5)
        }
#undef PV
    }
#define STORE(c) if (chunks > c) _tile_stored(c, o + d0 + c * 16, dim * 4);
    STORE(0) STORE(1) STORE(2) STORE(3)
#undef STORE
}

/* One row of a key chunk (online softmax): the scores s[a .. b) of `keys` (float32 dots, unscaled) raise
 * the row's running maximum *top (in dots); the bf16 probabilities e^((s - top) scale) go to p[0 .. keys)
 * (zero outside a .. b), and their float32 sum is added to *total after it is rescaled to the new
 * maximum. Returns that rescaling factor, by which the row's output so far must be multiplied too. */
static inline float row_chunk(const float *s, uint16_t *p, int64_t a, int64_t b, int64_t keys, float scale,
                              float *top, float *total) {
    if (a >= b) {
        memset(p, 0, sizeof(uint16_t) * (size_t)keys);
        return 1.f;
    }
    __m512 most = _mm512_set1_ps(s[a]);
    for (int64_t t = a / 16 * 16; t < b; t += 16)
        most = _mm512_mask_max_ps(most, lanes_in(t, a, b), most, _mm512_loadu_ps(s + t));
    const float before = *top, now = fmaxf(before, _mm512_reduce_max_ps(most));
    const float rescale = before == -INFINITY ? 0.f : exp_neg((before - now) * scale);
    /* e^((s - now) scale) = 2^(s scale log2(e) - now scale log2(e)): one fma for the exponent */
    const float bits = scale * 1.44269504088896341f;
    const __m512 sv = _mm512_set1_ps(bits), shift = _mm512_set1_ps(-now * bits);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < keys; t += 16) {
        const __mmask16 keep = lanes_in(t, a, b);
        __m512 e = _mm512_setzero_ps();
        if (keep) e = _mm512_maskz_mov_ps(keep, exp2_neg16(_mm512_fmadd_ps(_mm512_loadu_ps(s + t), sv, shift)));
        sum = _mm512_add_ps(sum, e);
        _mm256_storeu_si256((__m256i *)(p + t), (__m256i)_mm512_cvtneps_pbh(e));
    }
    *top = now;
    *total = *total * rescale + _mm512_reduce_add_ps(sum);
    return rescale;
}

/* Query rows i0 .. i0+15 of KV head h (row i: token i / groups, query head h*groups + i % groups). */
static void query_tile(const float *q, int64_t q_stride, int64_t i0, int64_t qrows, int64_t h, int64_t groups,
                       int64_t dim, uint16_t *dst) {
    for (int64_t i = i0; i < i0 + TILE; i++) {
        uint16_t *row = dst + (i - i0) * dim;
        if (i >= qrows) {
            memset(row, 0, sizeof(uint16_t) * (size_t)dim);
            continue;
        }
        const float *src = q + (i / groups) * q_stride + (h * groups + i % groups) * dim;
        for (int64_t c = 0; c < dim; c += 16)
            _mm256_storeu_si256((__m256i *)(row + c), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + c)));
    }
}

/* (ember.h) The keys a chunk's rows see, rounded to value tiles, and its packed buffer's layout. */
void chunk_layout(chunk_span *c, int64_t kv_heads, int64_t dim, int64_t window) {
    const int64_t len = c->cached + c->rows;
    /* the first key any row sees, rounded down to a value tile; the keys after the last, rounded up */
    const int64_t lowest = window > 0 && c->cached + 1 > window ? c->cached + 1 - window : 0;
    c->base = lowest / PAIRS * PAIRS;
    c->span = (len + PAIRS - 1) / PAIRS * PAIRS - c->base;
    c->key_words = c->span / TILE * (dim / 32) * TILE_WORDS;
    c->value_words = c->span / PAIRS * (dim / 16) * TILE_WORDS;
    c->pack_tasks = c->span / PAIRS;
    c->tile_tasks = kv_heads * ((c->rows * c->groups + TILE - 1) / TILE);
}

/* (ember.h) Words of packed keys and values `chunk_layout` asks for. */
int64_t chunk_words(const chunk_span *c, int64_t kv_heads) { return kv_heads * (c->key_words + c->value_words); }

/* (ember.h) Pack task `task` (of c->pack_tasks): 32 keys and their values, every KV head. */
void chunk_pack(const chunk_span *c, int64_t task, const uint16_t *k, const uint16_t *v, int64_t kv_heads,
                int64_t dim, int64_t block_size) {
    const int64_t len = c->cached + c->rows, first = c->base + task * PAIRS, chunks = dim / 32;
    for (int64_t h = 0; h < kv_heads; h++) {
        uint32_t *kp = c->packed + h * (c->key_words + c->value_words);
        pack_keys(k, c->table, first, len, h, kv_heads, dim, block_size, kp + (2 * task) * chunks * TILE_WORDS);
        pack_keys(k, c->table, first + TILE, len, h, kv_heads, dim, block_size,
                  kp + (2 * task + 1) * chunks * TILE_WORDS);
        pack_values(v, c->table, first, len, h, kv_heads, dim, block_size,
                    kp + c->key_words + task * (dim / 16) * TILE_WORDS);
    }
}

/* (ember.h) A thread's scratch for chunk_tile; 0 when it could not be allocated. */
int chunk_scratch_alloc(chunk_scratch *sc, int64_t dim) {
    sc->scores = aligned_alloc(64, sizeof(float) * TILE * CHUNK);
    sc->probs = aligned_alloc(64, sizeof(uint16_t) * TILE * CHUNK);
    sc->qt = aligned_alloc(64, sizeof(uint16_t) * (size_t)(TILE * dim));
    sc->ot = aligned_alloc(64, sizeof(float) * (size_t)(TILE * dim));
    sc->acc = aligned_alloc(64, sizeof(float) * (size_t)(TILE * dim));
    return sc->scores && sc->probs && sc->qt && sc->ot && sc->acc;
}

void chunk_scratch_free(chunk_scratch *sc) {
    free(sc->scores), free(sc->probs), free(sc->qt), free(sc->ot), free(sc->acc);
}

/* (ember.h) Tile task `task` (of c->tile_tasks, the later tiles with more keys first): 16 query rows of one
 * KV head over the packed keys and values, into c->out. Configures the tiles itself (other kernels of the
 * same thread use others) and releases them. */
void chunk_tile(const chunk_span *c, int64_t task, int64_t kv_heads, int64_t dim, int64_t window, float scale,
                chunk_scratch *sc) {
    const int64_t groups = c->groups, qrows = c->rows * groups, tiles = (qrows + TILE - 1) / TILE;
    const int64_t chunks = dim / 32, cached = c->cached, base = c->base;
    float *scores = sc->scores, *ot = sc->ot, *acc = sc->acc;
    uint16_t *probs = sc->probs, *qt = sc->qt;
    const int64_t h = task % kv_heads, i0 = (tiles - 1 - task / kv_heads) * TILE;
    const int64_t last = (i0 + TILE < qrows ? i0 + TILE : qrows) - 1;
    const int64_t seen = cached + last / groups + 1; /* keys the tile's last row sees */
    const int64_t first_pos = cached + i0 / groups;
    const int64_t lo = window > 0 && first_pos + 1 > window ? first_pos + 1 - window : 0;
    const int64_t from = lo / PAIRS * PAIRS, to = (seen + PAIRS - 1) / PAIRS * PAIRS;
    const uint32_t *kp = c->packed + h * (c->key_words + c->value_words);
    /* tiles (all 16 x 64 bytes): tmm0-3 query chunks, then output accumulators; tmm4-5 keys or values;
     * tmm6-7 score accumulators, then probabilities */
    attend_tiles_configure();
    query_tile(c->q, c->q_stride, i0, qrows, h, groups, dim, qt);
    float top[TILE], total[TILE], rescale[TILE];
    for (int64_t r = 0; r < TILE; r++) top[r] = -INFINITY, total[r] = 0.f;
    memset(acc, 0, sizeof(float) * (size_t)(TILE * dim));
    for (int64_t c0 = from; c0 < to; c0 += CHUNK) {
        const int64_t keys = to - c0 < CHUNK ? to - c0 : CHUNK;
#define LOADQ(t) if (chunks > t) _tile_loadd(t, qt + t * 32, dim * 2);
        LOADQ(0) LOADQ(1) LOADQ(2) LOADQ(3)
#undef LOADQ
        tile_scores(kp + (c0 - base) / TILE * chunks * TILE_WORDS, keys / TILE, chunks, scores, keys);
        for (int64_t i = i0; i < i0 + TILE; i++) {
            int64_t a = 0, b = 0; /* the row's keys in this chunk */
            if (i <= last) {
                const int64_t pos = cached + i / groups;
                const int64_t low = window > 0 && pos + 1 > window ? pos + 1 - window : 0;
                a = (low > c0 ? low : c0) - c0, b = (pos + 1 < c0 + keys ? pos + 1 : c0 + keys) - c0;
            }
            rescale[i - i0] = row_chunk(scores + (i - i0) * keys, probs + (i - i0) * keys, a, b, keys, scale,
                                        top + (i - i0), total + (i - i0));
        }
        for (int64_t d0 = 0; d0 < dim; d0 += 64)
            tile_values(probs, keys / PAIRS, kp + c->key_words + (c0 - base) / PAIRS * (dim / 16) * TILE_WORDS, dim,
                        d0, ot, keys);
        for (int64_t r = 0; r < TILE; r++) {
            const __m512 f = _mm512_set1_ps(rescale[r]);
            for (int64_t d = 0; d < dim; d += 16)
                _mm512_storeu_ps(acc + r * dim + d,
                                 _mm512_fmadd_ps(_mm512_loadu_ps(acc + r * dim + d), f, _mm512_loadu_ps(ot + r * dim + d)));
        }
    }
    for (int64_t i = i0; i <= last; i++) {
        float *o = c->out + (i / groups) * c->out_stride + (h * groups + i % groups) * dim;
        const __m512 inv = _mm512_set1_ps(1.f / total[i - i0]);
        for (int64_t d = 0; d < dim; d += 16)
            _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(acc + (i - i0) * dim + d), inv));
    }
    _tile_release();
}

int prefill_amx_supported(void) { return amx_permitted(); }
#else
int prefill_amx_supported(void) { return 0; }
#endif
