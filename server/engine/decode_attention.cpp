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

#include "decode_attention.h"

namespace {

template <typename T>
void attend(const T* q, const T* k, const T* v, int64_t capacity, const int64_t* starts, const int64_t* lengths,
            int64_t rows, int64_t kv_heads, int64_t group, int64_t dim, float scale, int threads, T* out) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < rows * kv_heads; t++) {
        const int64_t row = t / kv_heads, head = t % kv_heads;
        const int64_t first = (head * capacity + starts[row]) * dim;
        attend_head(q + t * group * dim, k + first, v + first, lengths[row], group, dim, scale, out + t * group * dim);
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
