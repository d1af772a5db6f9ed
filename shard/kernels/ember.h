/*
 * Ember's CPU kernels: what every file of the library shares. The library is built at first use by
 * ember/shard/native.py from every .c file of shard/kernels, with the machine's C compiler (-O3
 * -march=native -fopenmp), into one shared object called through ctypes; native.py's docstring says
 * which kernel runs when.
 *
 *   attention.h / attention.c   paged decode attention over the KV cache, read in place
 *   prefill.c                   a prompt chunk's attention over a bf16 cache (paged_prefill_bf16), from
 *   prefill_amx.c / _fma.c      pieces on AMX bf16 tiles, or else on float32 FMAs (AVX2 or AVX-512)
 *   rows.h / elementwise.c      RMSNorm (+ residual add), silu * mul, rotary, K/V cache writes
 *   matmul.h, matmul_bf16.c     bf16 weights x bf16-rounded activations (AVX-512 BF16)
 *   matmul_q4.c                 int4 / int8 codes x int8 activations (AVX-512 VNNI or AVX2, w4a8)
 *   fused_step.c                a whole step's decoder layers in one call (decode_layers)
 *   sampling.c                  greedy choice with its logsumexp; top-k candidates of the LM head
 *   abi.c                       status messages and struct layouts, for native.py's checks at load
 *
 * Every entry point returns a status: EMBER_OK (0) or one of the EMBER_E_* codes below, which
 * native.py raises as NativeError with ember_status_message's text. Functions shared between files
 * but not entry points are EMBER_INTERNAL (hidden from the library's symbol table).
 */
#ifndef EMBER_H
#define EMBER_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define EMBER_INTERNAL __attribute__((visibility("hidden")))

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define EMBER_HAVE_BF16 1 /* bf16_linear, and decode_layers over bf16 weights */
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define EMBER_HAVE_VNNI 1 /* the int8 kernels on AVX-512 VNNI's vpdpbusd */
#endif
#if defined(EMBER_HAVE_VNNI) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
/* q4_linear (w4a8, the 8-bit LM head) and decode_layers: on vpdpbusd (VNNI), else AVX2's vpmaddubsw, which
 * sums the same integers; the float steps are the same either way, so the numbers are too */
#define EMBER_HAVE_Q4 1
#endif
#if defined(EMBER_HAVE_VNNI) && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define EMBER_HAVE_AMX 1 /* q4_linear / decode_layers' projections of many rows on AMX int8 tiles */
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define EMBER_HAVE_AMX_BF16 1 /* paged_prefill_bf16: prompt chunks' attention over a bf16 cache */
#endif
#if defined(__AMX_TILE__)
/* 1 once Linux has granted this process AMX's register state (asked at the first call), else 0. */
EMBER_INTERNAL int amx_permitted(void);

/* AMX's tile configuration (palette 1): each tile's rows and bytes per row (_tile_loadconfig). */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_tile_config;
#endif

/* A prompt chunk of one sequence attending over a bf16 cache, in pieces a parallel region shares:
 * `chunk_layout` (once the span's fields are set), `chunk_pack` for each of pack_tasks, then `chunk_tile`
 * for each of tile_tasks, with a scratch per thread. On AMX bf16 tiles (prefill_amx.c) where the build
 * has them, else on float32 FMAs (prefill_fma.c); `chunks_permitted` says whether this process may. */
#if defined(EMBER_HAVE_AMX_BF16)
#define EMBER_HAVE_CHUNKS 1
#elif defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define EMBER_HAVE_CHUNKS 1
#define EMBER_CHUNKS_FMA 1
#endif
#define CHUNK_DIM_OK(dim) ((dim) % 32 == 0 && (dim) <= 128)
typedef struct {
    const float *q;     /* [rows, heads, dim] float32, rows q_stride floats apart */
    int64_t q_stride;
    float *out;         /* [rows, heads, dim] float32, rows out_stride floats apart */
    int64_t out_stride;
    const int64_t *table; /* the sequence's block table */
    int64_t cached, rows, groups; /* positions cached .. cached+rows-1; query heads per KV head */
    /* chunk_layout's */
    int64_t base, span, key_words, value_words, pack_tasks, tile_tasks;
    uint32_t *packed; /* chunk_words(...) 32-bit words (bf16 pairs or floats), 64-byte aligned */
} chunk_span;
typedef struct {
    float *scores, *ot, *acc;
    uint16_t *probs, *qt;
} chunk_scratch;
#ifdef EMBER_HAVE_CHUNKS
EMBER_INTERNAL int chunks_permitted(void);
EMBER_INTERNAL void chunk_layout(chunk_span *c, int64_t kv_heads, int64_t dim, int64_t window);
EMBER_INTERNAL int64_t chunk_words(const chunk_span *c, int64_t kv_heads);
EMBER_INTERNAL void chunk_pack(const chunk_span *c, int64_t task, const uint16_t *k, const uint16_t *v,
                               int64_t kv_heads, int64_t dim, int64_t block_size);
EMBER_INTERNAL int chunk_scratch_alloc(chunk_scratch *sc, int64_t dim);
EMBER_INTERNAL void chunk_scratch_free(chunk_scratch *sc);
EMBER_INTERNAL void chunk_tile(const chunk_span *c, int64_t task, int64_t kv_heads, int64_t dim, int64_t window,
                               float scale, chunk_scratch *sc);
#endif

/* The statuses: X(name, code, message). abi.c turns them into ember_status_name / _message. */
#define EMBER_STATUSES(X)                                                                                        \
    X(EMBER_OK, 0, "done")                                                                                       \
    X(EMBER_E_NO_MEMORY, -1, "a scratch buffer could not be allocated")                                          \
    X(EMBER_E_NO_INT8, -2, "this build has no int8 kernels (w4a8, 8-bit codes, the fused step): no AVX2")       \
    X(EMBER_E_NO_BF16, -3, "this build has no AVX-512 BF16 kernels (bf16 weights)")                             \
    X(EMBER_E_BITS, -4, "codes must be 4, 5 or 8 bits wide")                                                     \
    X(EMBER_E_IN_FEATURES, -5, "the input features (k) must be a multiple of 32")                                \
    X(EMBER_E_OUT_FEATURES, -6, "the output features (n) must be a multiple of 16")                              \
    X(EMBER_E_TOPK, -7, "k must be in 1 .. min(256, vocab)")                                                     \
    X(EMBER_E_LAYER_WIDTHS, -8, "hidden size, heads * head_dim and intermediate size must be multiples of 32") \
    X(EMBER_E_NO_CHUNKS, -9, "this build or process has no prompt-chunk kernel (AMX bf16 tiles, AVX2 or AVX-512)") \
    X(EMBER_E_HEAD_DIM, -10, "the head dimension must be a multiple of 32, at most 128")

enum ember_status {
#define EMBER_STATUS_ENUM(name, code, message) name = code,
    EMBER_STATUSES(EMBER_STATUS_ENUM)
#undef EMBER_STATUS_ENUM
};

/* --- the structs decode_layers reads (mirrored by ctypes.Structure classes in native.py, whose sizes
 * and field offsets are checked against ember_layout at load: keep the two in step) ----------------- */

/* A linear layer's weight [n, k]: w4a8's packed 4-bit codes with float16 scales d and minimums m per 32
 * inputs (native.Q4Weight: GGUF's own precision for them), or bf16 weights' packed tiles
 * (native.BF16Weight; d and m NULL). */
typedef struct {
    const void *packed;
    const uint16_t *d, *m; /* IEEE float16 bits */
} ember_linear;

/* One decoder layer of decode_layers' table: built once at load (the cache pointers when the cache is
 * allocated). */
typedef struct {
    const float *input_norm, *post_norm; /* RMSNorm weights [hidden] float32 */
    ember_linear qkv, o_proj, gate_up, down;
    void *k_cache, *v_cache; /* the layer's flat caches [slots, kv_heads * head_dim], float32 or bf16 */
    int64_t window;          /* sliding window in keys (0: none) */
} ember_decode_layer;

/* decode_layers' arguments: the model's (set once at load), the cache's (set when it is allocated) and
 * the step's. Row r is a token of sequence row_seq[r] (row_seq NULL: of sequence r, one token each),
 * whose block table is tables[row_seq[r]], and attends over lens[r] keys of it. */
typedef struct {
    /* the model */
    const ember_decode_layer *layers;
    int64_t num_layers, hidden, heads, kv_heads, head_dim, inter;
    float eps, scale;     /* the RMSNorms' epsilon; the attention's scale (head_dim^-0.5) */
    int32_t bf16_weights; /* 1: every projection is bf16 (BF16Weight); 0: w4a8 (Q4Weight) */
    /* the cache */
    int32_t bf16_cache; /* 1: the caches hold bf16; 0: float32 */
    int64_t block_size;
    /* the step */
    int64_t rows, rot, table_width;
    float *delta;    /* [rows, hidden]: enters with the embeddings, leaves with the last layer's output */
    float *residual; /* [rows, hidden]: leaves with the residual stream before it */
    const float *cos, *sin;                         /* [rows, rot] */
    const int64_t *slots;                           /* [rows] cache slot of each row's K and V */
    const int64_t *tables, *row_seq, *lens;         /* [sequences, table_width], [rows] or NULL, [rows] */
    int64_t chunk_rows; /* a sequence's run of more than this many prompt rows over a cached context attends
                         * as one chunk (chunk_*) where the cache is bf16; 0: every row by itself */
    int32_t threads;
} ember_decode_step;

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

#endif
