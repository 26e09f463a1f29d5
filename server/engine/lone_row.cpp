// The decode step of one row alone (one stream), float32, for the Llama-family models lean_decode.py serves: the
// whole step, from the token to its logits, in one call. Built at start-up by lone_row.py, which says why.
//
// The step is lean_decode.py's `_hidden` and LM head, op for op: RMSNorm, the fused q/k/v product, rotary on q and k,
// k and v written to the layer's pools at the row's column, attention over the row's columns [start, start + kv_len)
// (decode_attention.h, as the attention kernel runs it), the o product and residual add, RMSNorm, the fused gate/up
// product, SiLU(gate) x up, the down product and residual add; after the last layer the final RMSNorm and the LM
// head. Only the order of sums inside the products, norms and attention differs from torch's, by float rounding.
//
// Where the time goes: a step reads every weight once (540 MB with the default model), so it is the matrix-vector
// products, and they are as fast as they read memory. `product` reads BLOCK weight rows side by side, each into
// LANES accumulators (one 512-bit register, or two 256-bit ones: the compiler vectorises the lane loop for the CPU
// it is built on), prefetching AHEAD floats down each row; rows are split between the threads in contiguous halves.
// Everything between the products (a few thousand floats) runs on the calling thread.

#include "decode_attention.h"

#ifdef PHASE_TIMERS
#include <omp.h>
#endif

namespace {

constexpr int64_t LANES = 16;
constexpr int64_t BLOCK = 8;
constexpr int64_t AHEAD = 256;

// y[r] = w[r] . x for R consecutive rows of w (row length n)
template <int64_t R>
void rows_dot(const float* w, const float* x, float* y, int64_t n) {
    float acc[R][LANES] = {};
    int64_t e = 0;
    for (; e + LANES <= n; e += LANES) {
        for (int64_t r = 0; r < R; r++) {
            __builtin_prefetch(w + r * n + e + AHEAD);
#pragma omp simd
            for (int64_t l = 0; l < LANES; l++) acc[r][l] += w[r * n + e + l] * x[e + l];
        }
    }
    for (int64_t r = 0; r < R; r++) {
        float sum = 0.f;
        for (int64_t tail = e; tail < n; tail++) sum += w[r * n + tail] * x[tail];
        for (int64_t l = 0; l < LANES; l++) sum += acc[r][l];
        y[r] = sum;
    }
}

// y [out] = w [out, in] x [in], on `threads` threads
void product(const float* w, const float* x, float* y, int64_t out, int64_t in, int threads) {
    const int64_t blocks = out / BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) rows_dot<BLOCK>(w + b * BLOCK * in, x, y + b * BLOCK, in);
    for (int64_t r = blocks * BLOCK; r < out; r++) rows_dot<1>(w + r * in, x, y + r, in);
}

// out = h / sqrt(mean(h^2) + eps) * weight, as torch.rms_norm in float32
void rms_norm(const float* h, const float* weight, float eps, int64_t n, float* out) {
    float squares = 0.f;
#pragma omp simd reduction(+ : squares)
    for (int64_t e = 0; e < n; e++) squares += h[e] * h[e];
    const float scale = 1.f / std::sqrt(squares / static_cast<float>(n) + eps);
    for (int64_t e = 0; e < n; e++) out[e] = h[e] * scale * weight[e];
}

// x * cos + rotate_half(x) * sin for `heads` heads of `dim` values, in place (transformers' apply_rotary_pos_emb)
void rotate(float* x, const float* cos, const float* sin, int64_t heads, int64_t dim) {
    const int64_t half = dim / 2;
    for (int64_t head = 0; head < heads; head++) {
        float* v = x + head * dim;
        for (int64_t e = 0; e < half; e++) {
            const float a = v[e], b = v[e + half];
            v[e] = a * cos[e] - b * sin[e];
            v[e + half] = b * cos[e + half] + a * sin[e + half];
        }
    }
}

// Where a step's time goes, for bench/decode_profile.py, which builds the library with PHASE_TIMERS: each phase's
// seconds summed over the steps into `reft_phase_seconds` (its names: `reft_phase_names`). Built without it, as the
// server builds it, `lap` is nothing.
enum Phase { NORMS, QKV, ROTARY_KV, ATTENTION, O, ADDS, GATE_UP, SILU, DOWN, HEAD, PHASES };

}  // namespace

#ifdef PHASE_TIMERS
extern "C" {
char reft_phase_names[] = "norms,q/k/v product,rotary and KV write,attention,o product,residual adds,"
                          "gate/up product,SiLU x up,down product,LM head";
double reft_phase_seconds[PHASES] = {};
}

namespace {
double clock_now() { return omp_get_wtime(); }
void lap(Phase phase, double& since) {
    const double now = clock_now();
    reft_phase_seconds[phase] += now - since;
    since = now;
}
}  // namespace
#else
namespace {
double clock_now() { return 0.0; }
void lap(Phase, double&) {}
}  // namespace
#endif

// The model's sizes and constants, fixed for the process.
struct Shape {
    int64_t layers, hidden, heads, kv_heads, head_dim, intermediate, vocab, capacity;
    float eps, scale;
};

// weights: per layer, its input norm, fused q/k/v [(heads + 2 kv_heads) head_dim, hidden], o [hidden, heads head_dim],
//   post-attention norm, fused gate/up [2 intermediate, hidden], down [hidden, intermediate]; all contiguous.
// pools: per layer, its key pool and value pool [kv_heads, capacity, head_dim].
// cos, sin: transformers' rotary values at the row's position [head_dim].
// scratch: hidden * 2 + (2 heads + 2 kv_heads) head_dim + 3 intermediate floats. logits: [vocab].
extern "C" void reft_lone_row(const Shape* s, const float* const* weights, float* const* pools, const float* embed,
                              const float* final_norm, const float* head, int64_t token, int64_t column,
                              int64_t start, int64_t kv_len, const float* cos, const float* sin, float* scratch,
                              float* logits, int threads) {
    const int64_t d = s->head_dim, hidden = s->hidden, heads = s->heads, kv_heads = s->kv_heads;
    const int64_t group = heads / kv_heads, qkv_rows = (heads + 2 * kv_heads) * d, inter = s->intermediate;
    float* h = scratch;
    float* x = h + hidden;
    float* qkv = x + hidden;
    float* attended = qkv + qkv_rows;
    float* gate_up = attended + heads * d;
    float* act = gate_up + 2 * inter;
    double since = clock_now();
    for (int64_t e = 0; e < hidden; e++) h[e] = embed[token * hidden + e];
    for (int64_t layer = 0; layer < s->layers; layer++) {
        const float* const* w = weights + 6 * layer;
        float* pool_k = pools[2 * layer];
        float* pool_v = pools[2 * layer + 1];
        rms_norm(h, w[0], s->eps, hidden, x);
        lap(NORMS, since);
        product(w[1], x, qkv, qkv_rows, hidden, threads);
        lap(QKV, since);
        rotate(qkv, cos, sin, heads + kv_heads, d);
        const float* k = qkv + heads * d;
        const float* v = k + kv_heads * d;
        for (int64_t kh = 0; kh < kv_heads; kh++) {
            for (int64_t e = 0; e < d; e++) {
                pool_k[(kh * s->capacity + column) * d + e] = k[kh * d + e];
                pool_v[(kh * s->capacity + column) * d + e] = v[kh * d + e];
            }
        }
        lap(ROTARY_KV, since);
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t kh = 0; kh < kv_heads; kh++) {
            const int64_t first = (kh * s->capacity + start) * d;
            attend_head(qkv + kh * group * d, pool_k + first, pool_v + first, kv_len, group, d, s->scale,
                        attended + kh * group * d);
        }
        lap(ATTENTION, since);
        product(w[2], attended, x, hidden, heads * d, threads);
        lap(O, since);
        for (int64_t e = 0; e < hidden; e++) h[e] += x[e];
        lap(ADDS, since);
        rms_norm(h, w[3], s->eps, hidden, x);
        lap(NORMS, since);
        product(w[4], x, gate_up, 2 * inter, hidden, threads);
        lap(GATE_UP, since);
        for (int64_t e = 0; e < inter; e++) {
            const float g = gate_up[e];
            act[e] = g / (1.f + std::exp(-g)) * gate_up[inter + e];
        }
        lap(SILU, since);
        product(w[5], act, x, hidden, inter, threads);
        lap(DOWN, since);
        for (int64_t e = 0; e < hidden; e++) h[e] += x[e];
        lap(ADDS, since);
    }
    rms_norm(h, final_norm, s->eps, hidden, x);
    lap(NORMS, since);
    product(head, x, logits, s->vocab, hidden, threads);
    lap(HEAD, since);
}
