// Matrix products of a few to about a hundred rows against a weight packed in column panels, float32: the products
// of a decode step of many streams. Built at start-up by panel_product.py, which says why.
//
// y [m, n] = x [m, k] w^T, w [n, k] packed as panels [ceil(n / WIDTH), k, WIDTH]: panel j holds output columns
// [j WIDTH, (j + 1) WIDTH) with their k weights one after the other, so a panel is one contiguous stream.
//
// Each thread takes a contiguous share of the panels. Against a panel it computes the rows in blocks of at most
// ROWS (balanced: 32 rows as 11 + 11 + 10), each block a tile of accumulators held in registers (ROWS x WIDTH floats:
// 24 of the 32 AVX-512 registers, or 12 of the 16 AVX2 ones) that takes one broadcast of x and two vector loads of
// the panel per FMA of each row. Every output is one sum over k in order, whatever the number of rows.
//
// The panel is read from memory by the first block and from cache by the others, so while a thread computes, it
// prefetches the panel after this one, spread evenly over all its blocks: the weights then stream at an even rate
// instead of in bursts one block long (at 32 rows on a 2-core Xeon, a step's products in 54 ms against 62-66 with a
// prefetch down the current panel only, 77 with none). A single block prefetches its own panel AHEAD steps of k ahead
// (at 8 rows, 28-31 ms against 35-39 with the next panel's prefetch).

#include <cstdint>
#include <cstring>

namespace {

#ifdef __AVX512F__
constexpr int64_t LANES = 16, ROWS = 12;
#else
constexpr int64_t LANES = 8, ROWS = 6;
#endif
constexpr int64_t WIDTH = 2 * LANES;
constexpr int64_t AHEAD = 64;
constexpr int64_t LINE = 64;  // bytes of a cache line
typedef float vec __attribute__((vector_size(LANES * 4), aligned(4)));

// y [R, cols] (row stride ys) = x [R, k] (row stride xs) against one panel p [k, WIDTH]; prefetching `stride` bytes
// from `fetch` for each step of k
template <int64_t R>
void tile(const float* x, int64_t xs, const float* p, int64_t k, float* y, int64_t ys, int64_t cols,
          const char* fetch, int64_t stride) {
    vec low[R], high[R];
    for (int64_t r = 0; r < R; r++) low[r] = high[r] = vec{};
    for (int64_t e = 0; e < k; e++) {
        for (int64_t b = 0; b < stride; b += LINE) __builtin_prefetch(fetch + e * stride + b);
        const vec w0 = *reinterpret_cast<const vec*>(p + e * WIDTH);
        const vec w1 = *reinterpret_cast<const vec*>(p + e * WIDTH + LANES);
        for (int64_t r = 0; r < R; r++) {
            const float a = x[r * xs + e];
            low[r] += a * w0;
            high[r] += a * w1;
        }
    }
    for (int64_t r = 0; r < R; r++) {
        float out[WIDTH];
        *reinterpret_cast<vec*>(out) = low[r];
        *reinterpret_cast<vec*>(out + LANES) = high[r];
        std::memcpy(y + r * ys, out, cols * sizeof(float));
    }
}

// `tile` for `left` (1 to R) rows: one compiled tile per row count
template <int64_t R>
void rows(const float* x, int64_t xs, const float* p, int64_t k, float* y, int64_t ys, int64_t cols, int64_t left,
          const char* fetch, int64_t stride) {
    if constexpr (R > 0) {
        if (left == R) tile<R>(x, xs, p, k, y, ys, cols, fetch, stride);
        else rows<R - 1>(x, xs, p, k, y, ys, cols, left, fetch, stride);
    }
}

}  // namespace

extern "C" int64_t reft_panel_width() { return WIDTH; }

// y [m, n] = x [m, k] w^T for w packed as `panels` (above), on `threads` threads
extern "C" void reft_panel_product(const float* x, int64_t m, int64_t k, const float* panels, int64_t n, float* y,
                                   int threads) {
    if (m <= 0) return;  // a step with no rows here (y is empty)
    const int64_t count = (n + WIDTH - 1) / WIDTH;
    const int64_t blocks = (m + ROWS - 1) / ROWS;
    const int64_t stride = (WIDTH * static_cast<int64_t>(sizeof(float)) + blocks - 1) / blocks;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t j = 0; j < count; j++) {
        const float* p = panels + j * k * WIDTH;
        const int64_t cols = n - j * WIDTH < WIDTH ? n - j * WIDTH : WIDTH;
        const char* ahead = reinterpret_cast<const char*>(blocks == 1 ? p + AHEAD * WIDTH : p + k * WIDTH);
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t first = b * m / blocks;
            rows<ROWS>(x + first * k, k, p, k, y + first * n + j * WIDTH, n, cols, (b + 1) * m / blocks - first,
                       ahead + b * k * stride, stride);
        }
    }
}
