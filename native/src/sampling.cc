// Greedy choice for many sequences at once: per row, the argmax (lowest id among equal maxima, like
// torch.argmax) and its log-probability under the row's softmax, with some ids masked to -inf first
// (eos during min_new_tokens). The same result as src/generate/chooser.ts's greedy path, computed
// across the thread pool instead of one 250880-long row at a time on the engine's JS thread: rows
// are cut into blocks of kBlock logits (each block's max, first argmax and sum of exp(x - max)),
// combined per row in block order, so a single row (batch 1) also uses every thread and the result
// does not depend on the thread count. bloom-560m's 250880 logits at batch 1: 80 -> 43-53 us.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace blossom {

namespace {

#if defined(__x86_64__)
// The maximum, or NaN if any value is NaN (max_ps alone would drop it).
BLOSSOM_AVX2 float row_max_avx2(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(-INFINITY);
  __m256 nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    m = _mm256_max_ps(m, v);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  float best = simd::hmax(m);
  bool any_nan = _mm256_movemask_ps(nan) != 0;
  for (; i < n; ++i) {
    if (std::isnan(x[i])) any_nan = true;
    best = std::max(best, x[i]);
  }
  return any_nan ? NAN : best;
}

// The first index of `value` in x (which holds it).
BLOSSOM_AVX2 int64_t row_find_avx2(const float* x, int64_t n, float value) {
  const __m256 v = _mm256_set1_ps(value);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), v, _CMP_EQ_OQ));
    if (mask) return i + __builtin_ctz(static_cast<unsigned>(mask));
  }
  for (; i < n; ++i)
    if (x[i] == value) return i;
  return -1;
}

BLOSSOM_AVX2 double row_expsum_avx2(const float* x, int64_t n, float max) {
  const __m256 vm = _mm256_set1_ps(max);
  __m256 acc = _mm256_setzero_ps();
  double total = 0;
  int64_t i = 0;
  // Partial sums in fp32 over blocks of 4096, accumulated in fp64: exact to ~1e-7 relative.
  while (i + 8 <= n) {
    int64_t end = std::min<int64_t>(n & ~int64_t(7), i + 4096);
    for (; i < end; i += 8) acc = _mm256_add_ps(acc, simd::exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm)));
    total += simd::hsum(acc);
    acc = _mm256_setzero_ps();
  }
  for (; i < n; ++i) total += std::exp(static_cast<double>(x[i]) - max);
  return total;
}
#endif

// A row is taken in blocks of kBlock logits, so that one row (decoding at batch 1: 250880 logits)
// is shared by the threads; the split depends on the vocabulary only, never on the thread count.
constexpr int64_t kBlock = 16384;

struct BlockStats {
  float max;      // NaN if the block holds a NaN
  int64_t first;  // the block's first index of max (-1 if max is not finite)
  double sum;     // sum of exp(x - max) over the block (when max is finite)
};

BlockStats block_stats(const float* x, int64_t n, bool fast) {
  BlockStats b{-INFINITY, -1, 0.0};
#if defined(__x86_64__)
  if (fast) b.max = row_max_avx2(x, n);
  else
#endif
    for (int64_t i = 0; i < n; ++i) {
      if (std::isnan(x[i])) {
        b.max = NAN;
        break;
      }
      b.max = std::max(b.max, x[i]);
    }
  if (!std::isfinite(b.max)) return b;
#if defined(__x86_64__)
  if (fast) b.first = row_find_avx2(x, n, b.max);
  else
#endif
    for (int64_t i = 0; i < n; ++i)
      if (x[i] == b.max) {
        b.first = i;
        break;
      }
#if defined(__x86_64__)
  if (fast) b.sum = row_expsum_avx2(x, n, b.max);
  else
#endif
    for (int64_t i = 0; i < n; ++i) b.sum += std::exp(static_cast<double>(x[i]) - b.max);
  return b;
}

// The row's argmax (lowest id among equal maxima) and log-softmax from its blocks' stats, in block order.
void combine_blocks(const BlockStats* blocks, int64_t count, int32_t* id_out, double* logprob_out) {
  float max = -INFINITY;
  bool nan = false, inf = false;
  for (int64_t k = 0; k < count; ++k) {
    if (std::isnan(blocks[k].max)) nan = true;
    else if (std::isinf(blocks[k].max) && blocks[k].max > 0) inf = true;
    else max = std::max(max, blocks[k].max);
  }
  if (nan || inf || !std::isfinite(max)) {  // no finite maximum (NaN, +inf, everything masked): the caller's chooser reports it
    *id_out = -1;
    *logprob_out = NAN;
    return;
  }
  int64_t best = -1;
  double sum = 0;
  for (int64_t k = 0; k < count; ++k) {
    const BlockStats& b = blocks[k];
    if (!std::isfinite(b.max)) continue;  // a block masked entirely (-inf) adds nothing
    if (best < 0 && b.max == max) best = k * kBlock + b.first;
    sum += b.sum * std::exp(static_cast<double>(b.max) - static_cast<double>(max));
  }
  *id_out = static_cast<int32_t>(best);
  *logprob_out = std::isfinite(sum) ? -std::log(sum) : NAN;
}

}  // namespace

void greedy_rows(ThreadPool& pool, float* logits, int64_t rows, int64_t stride, int64_t vocab, const int32_t* suppress,
                 int64_t num_suppress, const uint8_t* suppress_rows, int32_t* ids, double* logprobs) {
  const bool fast = active_variant() == Variant::Avx2;
  // Masked ids become -inf in place (the logits are the caller's scratch, as the TypeScript chooser's are).
  for (int64_t r = 0; r < rows; ++r)
    if (suppress_rows[r])
      for (int64_t k = 0; k < num_suppress; ++k)
        if (suppress[k] >= 0 && suppress[k] < vocab) logits[r * stride + suppress[k]] = -INFINITY;
  const int64_t per_row = (vocab + kBlock - 1) / kBlock;
  static thread_local std::vector<BlockStats> stats;
  stats.resize(static_cast<size_t>(rows * per_row));
  BlockStats* const st = stats.data();  // the caller's; the lambda runs on every thread
  pool.parallel_for(rows * per_row, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / per_row, k = t % per_row;
      const int64_t i0 = k * kBlock;
      st[t] = block_stats(logits + r * stride + i0, std::min(kBlock, vocab - i0), fast);
    }
  });
  for (int64_t r = 0; r < rows; ++r) combine_blocks(st + r * per_row, per_row, ids + r, logprobs + r);
}

}  // namespace blossom
