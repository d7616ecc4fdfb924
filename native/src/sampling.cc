// Greedy choice for many sequences at once: per row, the argmax (lowest id among equal maxima, like
// torch.argmax) and its log-probability under the row's softmax, with some ids masked to -inf first
// (eos during min_new_tokens). The same result as src/generate/chooser.ts's greedy path, computed
// across the thread pool instead of one 250880-long row at a time on the engine's JS thread.
#include <cmath>
#include <limits>

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

void greedy_row(float* x, int64_t n, const int32_t* suppress, int64_t num_suppress, bool fast, int32_t* id_out, double* logprob_out) {
  // Masked ids become -inf in place (the logits are the caller's scratch, as the TypeScript chooser's are).
  for (int64_t k = 0; k < num_suppress; ++k)
    if (suppress[k] >= 0 && suppress[k] < n) x[suppress[k]] = -INFINITY;
  float max = -INFINITY;
#if defined(__x86_64__)
  if (fast) max = row_max_avx2(x, n);
  else
#endif
    for (int64_t i = 0; i < n; ++i) {
      if (std::isnan(x[i])) {
        max = NAN;
        break;
      }
      max = std::max(max, x[i]);
    }
  int64_t best = -1;
  if (std::isfinite(max)) {
    for (int64_t i = 0; i < n; ++i)
      if (x[i] == max) {
        best = i;
        break;
      }
  }
  if (best < 0) {  // no finite maximum (NaN, +inf, everything masked): the caller's chooser reports it
    *id_out = -1;
    *logprob_out = NAN;
    return;
  }
  double sum;
#if defined(__x86_64__)
  if (fast) sum = row_expsum_avx2(x, n, max);
  else
#endif
  {
    sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += std::exp(static_cast<double>(x[i]) - max);
  }
  *id_out = static_cast<int32_t>(best);
  *logprob_out = std::isfinite(sum) ? -std::log(sum) : NAN;  // a NaN anywhere makes the sum NaN
}

}  // namespace

void greedy_rows(ThreadPool& pool, float* logits, int64_t rows, int64_t stride, int64_t vocab, const int32_t* suppress,
                 int64_t num_suppress, const uint8_t* suppress_rows, int32_t* ids, double* logprobs) {
  const bool fast = active_variant() == Variant::Avx2;
  pool.parallel_for(rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      greedy_row(logits + r * stride, vocab, suppress, suppress_rows[r] ? num_suppress : 0, fast, ids + r, logprobs + r);
  });
}

}  // namespace blossom
