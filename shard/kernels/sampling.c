/* The logits' helpers: a greedy choice with its logsumexp (the sampler's all-greedy batches), and each
 * row's top-k candidates (the LM head's rescoring under low-precision matmuls). */
#include <math.h>

#include "ember.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

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
    return EMBER_OK;
}

/* idx [rows, k]: the indices of each row's k largest values (in no particular order; NaN never
 * chosen unless the row has fewer than k other values). One pass: a value enters the candidates
 * only when it beats the smallest of them, which after the first few hundred is rare. */
int topk_rows(const float *x, int64_t rows, int64_t vocab, int64_t k, int64_t *idx, int threads) {
    if (k < 1 || k > vocab || k > 256) return EMBER_E_TOPK;
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
    return EMBER_OK;
}
