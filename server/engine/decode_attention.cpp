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

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>

extern "C" void reft_decode_attention(const float* q, const float* k, const float* v, int64_t capacity,
                                      const int64_t* starts, const int64_t* lengths, int64_t rows,
                                      int64_t kv_heads, int64_t group, int64_t dim, float scale, int threads,
                                      float* out) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t task = 0; task < rows * kv_heads; task++) {
        const int64_t row = task / kv_heads, head = task % kv_heads, n = lengths[row];
        const float* keys = k + (head * capacity + starts[row]) * dim;
        const float* values = v + (head * capacity + starts[row]) * dim;
        const float* query = q + task * group * dim;
        float* result = out + task * group * dim;
        float* scores = static_cast<float*>(std::malloc(sizeof(float) * group * (n > 0 ? n : 1)));
        if (scores == nullptr || n <= 0) {  // no memory, or nothing to attend to: NaN, never a plausible value
            for (int64_t i = 0; i < group * dim; i++) result[i] = std::numeric_limits<float>::quiet_NaN();
            std::free(scores);
            continue;
        }
        for (int64_t j = 0; j < n; j++) {  // scores[i, j] = q_i . k_j * scale
            const float* key = keys + j * dim;
            for (int64_t i = 0; i < group; i++) {
                const float* qi = query + i * dim;
                float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                for (int64_t e = 0; e < dim; e++) dot += qi[e] * key[e];
                scores[i * n + j] = dot * scale;
            }
        }
        for (int64_t i = 0; i < group; i++) {  // softmax over j, from the largest score
            float* si = scores + i * n;
            float top = std::numeric_limits<float>::lowest();  // not -inf: built with -ffast-math
            for (int64_t j = 0; j < n; j++) top = si[j] > top ? si[j] : top;
            float sum = 0.f;
            for (int64_t j = 0; j < n; j++) {
                si[j] = std::exp(si[j] - top);
                sum += si[j];
            }
            for (int64_t j = 0; j < n; j++) si[j] /= sum;
            for (int64_t e = 0; e < dim; e++) result[i * dim + e] = 0.f;
        }
        for (int64_t j = 0; j < n; j++) {  // result_i = sum_j p[i, j] v_j
            const float* value = values + j * dim;
            for (int64_t i = 0; i < group; i++) {
                const float p = scores[i * n + j];
                float* ri = result + i * dim;
#pragma omp simd
                for (int64_t e = 0; e < dim; e++) ri[e] += p * value[e];
            }
        }
        std::free(scores);
    }
}
