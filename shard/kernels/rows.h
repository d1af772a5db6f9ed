/*
 * The row functions of the elementwise kernels (elementwise.c), shared with decode_layers (fused_step.c):
 * float32 rows, each thread a share of them.
 */
#ifndef EMBER_ROWS_H
#define EMBER_ROWS_H

#include <math.h>

#include "ember.h"

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

/* One row of silu(gate) * up from the fused gate/up row g = [gate | up]. */
static inline __attribute__((always_inline)) void silu_mul_row(const float *g, float *o, int64_t inter) {
    const float *u = g + inter;
#pragma omp simd
    for (int64_t i = 0; i < inter; i++) {
        const float x = g[i];
        const float e = exp_neg(x > 0.f ? -x : x); /* e^-|x|, never overflows */
        /* 1 / (1 + e) or e / (1 + e): one division of a chosen numerator, so the loop vectorizes (a
         * division inside a branch keeps it scalar) */
        const float sig = (x > 0.f ? 1.f : e) / (1.f + e);
        o[i] = x * sig * u[i];
    }
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

#endif
