// Decode attention's per-task arithmetic over one key head's columns, shared by decode_attention.cpp (every row of
// a step) and lone_row.cpp (the step of one row alone). Why it is written this way: attention_kernel.py.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

// The served model's query heads per key head and head size, given by attention_kernel.py at build time.
#ifndef REFT_GROUP
#define REFT_GROUP 3
#endif
#ifndef REFT_DIM
#define REFT_DIM 64
#endif

namespace {

using bf16 = uint16_t;

inline float widen(float x) { return x; }

inline float widen(bf16 x) {
    const uint32_t bits = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline void store(float x, float* out) { *out = x; }

inline void store(float x, bf16* out) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it a quiet NaN (rounding could make it infinity)
        *out = static_cast<bf16>((bits >> 16) | 0x40u);
        return;
    }
    bits += 0x7fffu + ((bits >> 16) & 1u);
    *out = static_cast<bf16>(bits >> 16);
}

// scores [group, n]: each row's softmax in place, from its largest score.
void softmax(float* scores, int64_t group, int64_t n) {
    for (int64_t i = 0; i < group; i++) {
        float* si = scores + i * n;
        float top = std::numeric_limits<float>::lowest();  // not -inf: built with -ffast-math
        for (int64_t j = 0; j < n; j++) top = si[j] > top ? si[j] : top;
        float sum = 0.f;
        for (int64_t j = 0; j < n; j++) {
            si[j] = std::exp(si[j] - top);
            sum += si[j];
        }
        for (int64_t j = 0; j < n; j++) si[j] /= sum;
    }
}

// One (row, key head) task: G query heads of D values each against n keys, in `scores` [G, n]. G and D are
// compile-time constants, so that a key's G dot products and a value's G sums stay in registers across the head
// dimension; with run-time sizes the compiler reloaded them at every step (1.5x the time on a Xeon, 16 rows of
// 1,024 keys). `attend` instantiates it for the served model's shape only (REFT_GROUP, REFT_DIM): each further
// shape costs start-up compile time (eight shapes took 2.0 s to build, one 0.7 s).
template <typename T, int64_t G, int64_t D>
void attend_task(const T* query, const T* keys, const T* values, int64_t n, float scale, float* scores, T* result) {
    float q[G][D], sums[G][D];
    for (int64_t i = 0; i < G; i++) {
        for (int64_t e = 0; e < D; e++) {
            q[i][e] = widen(query[i * D + e]);
            sums[i][e] = 0.f;
        }
    }
    for (int64_t j = 0; j < n; j++) {  // scores[i, j] = q_i . k_j * scale
        const T* key = keys + j * D;
        float dots[G] = {};
#pragma omp simd reduction(+ : dots[:G])
        for (int64_t e = 0; e < D; e++) {
            const float x = widen(key[e]);
            for (int64_t i = 0; i < G; i++) dots[i] += q[i][e] * x;
        }
        for (int64_t i = 0; i < G; i++) scores[i * n + j] = dots[i] * scale;
    }
    softmax(scores, G, n);
    for (int64_t j = 0; j < n; j++) {  // sums_i = sum_j p[i, j] v_j
        const T* value = values + j * D;
#pragma omp simd
        for (int64_t e = 0; e < D; e++) {
            const float x = widen(value[e]);
            for (int64_t i = 0; i < G; i++) sums[i][e] += scores[i * n + j] * x;
        }
    }
    for (int64_t i = 0; i < G; i++) {
        for (int64_t e = 0; e < D; e++) store(sums[i][e], result + i * D + e);
    }
}

// The same for sizes known at run time only: any other shape.
template <typename T>
void attend_any(const T* query, const T* keys, const T* values, int64_t n, int64_t group, int64_t dim, float scale,
                float* scores, T* result) {
    float* q = scores + group * n;  // the caller's buffer: scores [group, n], then q and sums [group, dim] each
    float* sums = q + group * dim;
    for (int64_t i = 0; i < group * dim; i++) {
        q[i] = widen(query[i]);
        sums[i] = 0.f;
    }
    for (int64_t j = 0; j < n; j++) {
        const T* key = keys + j * dim;
        for (int64_t i = 0; i < group; i++) {
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t e = 0; e < dim; e++) dot += q[i * dim + e] * widen(key[e]);
            scores[i * n + j] = dot * scale;
        }
    }
    softmax(scores, group, n);
    for (int64_t j = 0; j < n; j++) {
        const T* value = values + j * dim;
        for (int64_t i = 0; i < group; i++) {
            const float p = scores[i * n + j];
#pragma omp simd
            for (int64_t e = 0; e < dim; e++) sums[i * dim + e] += p * widen(value[e]);
        }
    }
    for (int64_t i = 0; i < group * dim; i++) store(sums[i], result + i);
}

// One key head's task: `group` query heads of `dim` values against n keys, through `attend_task` where the shape is
// the one built for. Where it cannot run (no keys, no memory for the scores) the result is NaN, never a plausible
// value.
template <typename T>
void attend_head(const T* query, const T* keys, const T* values, int64_t n, int64_t group, int64_t dim, float scale,
                 T* result) {
    float* scores = static_cast<float*>(std::malloc(sizeof(float) * group * ((n > 0 ? n : 1) + 2 * dim)));
    if (scores == nullptr || n <= 0) {
        for (int64_t i = 0; i < group * dim; i++) store(std::numeric_limits<float>::quiet_NaN(), result + i);
        std::free(scores);
        return;
    }
    if (group == REFT_GROUP && dim == REFT_DIM) {
        attend_task<T, REFT_GROUP, REFT_DIM>(query, keys, values, n, scale, scores, result);
    } else {
        attend_any(query, keys, values, n, group, dim, scale, scores, result);
    }
    std::free(scores);
}

}  // namespace
