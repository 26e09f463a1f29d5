// Decode attention over the engine's KV pools on a CPU: one query row per stream, against exactly that
// stream's columns. Built at start-up by attention_kernel.py, which says why it exists.
//
// q, out: [rows, kv_heads, group, dim], contiguous (a row's query heads, grouped by the key head they read);
// k, v:   one layer's pools, [kv_heads, capacity, dim], contiguous;
// row r reads columns [starts[r], starts[r] + lengths[r]) of every key head, and nothing else.
//
// One task per (row, key head), spread over `threads` OpenMP threads (torch's own runtime: the library is
// loaded after torch). A task reads its keys once, for all `group` query heads that share them, then its
// values once: two passes over memory per task, the least the softmax allows without rescaling.
//
// Two entry points, one per storage type: float32, and bfloat16 (stored as the top 16 bits of a float32).
// Either way the arithmetic is float32; bfloat16 inputs are widened as read, and the result is rounded to
// the nearest bfloat16 (ties to even) once, at the end, as torch rounds a float32 result.

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

template <typename T>
void attend(const T* q, const T* k, const T* v, int64_t capacity, const int64_t* starts, const int64_t* lengths,
            int64_t rows, int64_t kv_heads, int64_t group, int64_t dim, float scale, int threads, T* out) {
    const bool fixed = group == REFT_GROUP && dim == REFT_DIM;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < rows * kv_heads; t++) {
        const int64_t row = t / kv_heads, head = t % kv_heads, n = lengths[row];
        T* result = out + t * group * dim;
        float* scores = static_cast<float*>(std::malloc(sizeof(float) * group * ((n > 0 ? n : 1) + 2 * dim)));
        if (scores == nullptr || n <= 0) {  // no memory, or nothing to attend to: NaN, never a plausible value
            for (int64_t i = 0; i < group * dim; i++) store(std::numeric_limits<float>::quiet_NaN(), result + i);
            std::free(scores);
            continue;
        }
        const int64_t first = (head * capacity + starts[row]) * dim;
        if (fixed) {
            attend_task<T, REFT_GROUP, REFT_DIM>(q + t * group * dim, k + first, v + first, n, scale, scores,
                                                 result);
        } else {
            attend_any(q + t * group * dim, k + first, v + first, n, group, dim, scale, scores, result);
        }
        std::free(scores);
    }
}

}  // namespace

extern "C" void reft_decode_attention(const float* q, const float* k, const float* v, int64_t capacity,
                                      const int64_t* starts, const int64_t* lengths, int64_t rows,
                                      int64_t kv_heads, int64_t group, int64_t dim, float scale, int threads,
                                      float* out) {
    attend(q, k, v, capacity, starts, lengths, rows, kv_heads, group, dim, scale, threads, out);
}

extern "C" void reft_decode_attention_bf16(const bf16* q, const bf16* k, const bf16* v, int64_t capacity,
                                           const int64_t* starts, const int64_t* lengths, int64_t rows,
                                           int64_t kv_heads, int64_t group, int64_t dim, float scale, int threads,
                                           bf16* out) {
    attend(q, k, v, capacity, starts, lengths, rows, kv_heads, group, dim, scale, threads, out);
}
