// layer_norm and embedding lookup. Both are cheap next to the matmuls; they are written to be
// exact (two-pass variance, as torch.layer_norm) and vectorised where it is free.
#include <algorithm>
#include <cmath>

#include "kernels.h"
#include "simd.h"

namespace blossom {

namespace {

void layer_norm_row_scalar(float* y, const float* x, int64_t cols, const float* gamma, const float* beta, float eps) {
  double sum = 0;
  for (int64_t i = 0; i < cols; ++i) sum += x[i];
  const float mean = static_cast<float>(sum / cols);
  double sq = 0;
  for (int64_t i = 0; i < cols; ++i) {
    double d = x[i] - mean;
    sq += d * d;
  }
  const float inv = 1.0f / std::sqrt(static_cast<float>(sq / cols) + eps);
  for (int64_t i = 0; i < cols; ++i) y[i] = (x[i] - mean) * inv * gamma[i] + beta[i];
}

#if defined(__x86_64__)
BLOSSOM_AVX2 void layer_norm_row_avx2(float* y, const float* x, int64_t cols, const float* gamma, const float* beta,
                                      float eps) {
  using namespace simd;
  const int64_t c8 = cols & ~int64_t(7);
  __m256 s = _mm256_setzero_ps();
  for (int64_t i = 0; i < c8; i += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(x + i));
  float sum = hsum(s);
  for (int64_t i = c8; i < cols; ++i) sum += x[i];
  const float mean = sum / static_cast<float>(cols);
  const __m256 vm = _mm256_set1_ps(mean);
  __m256 q = _mm256_setzero_ps();
  for (int64_t i = 0; i < c8; i += 8) {
    __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), vm);
    q = _mm256_fmadd_ps(d, d, q);
  }
  float sq = hsum(q);
  for (int64_t i = c8; i < cols; ++i) sq += (x[i] - mean) * (x[i] - mean);
  const float inv = 1.0f / std::sqrt(sq / static_cast<float>(cols) + eps);
  const __m256 vi = _mm256_set1_ps(inv);
  for (int64_t i = 0; i < c8; i += 8) {
    __m256 n = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm), vi);
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(n, _mm256_loadu_ps(gamma + i), _mm256_loadu_ps(beta + i)));
  }
  for (int64_t i = c8; i < cols; ++i) y[i] = (x[i] - mean) * inv * gamma[i] + beta[i];
}
#endif

}  // namespace

void layer_norm_row(float* y, const float* x, int64_t cols, const float* gamma, const float* beta, float eps) {
#if defined(__x86_64__)
  if (active_variant() == Variant::Avx2) return layer_norm_row_avx2(y, x, cols, gamma, beta, eps);
#endif
  layer_norm_row_scalar(y, x, cols, gamma, beta, eps);
}

void layer_norm(ThreadPool& pool, float* y, const float* x, int64_t rows, int64_t cols, const float* gamma,
                const float* beta, float eps) {
  const bool fast = active_variant() == Variant::Avx2;
  pool.parallel_for(rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
#if defined(__x86_64__)
      if (fast) {
        layer_norm_row_avx2(y + r * cols, x + r * cols, cols, gamma, beta, eps);
        continue;
      }
#endif
      layer_norm_row_scalar(y + r * cols, x + r * cols, cols, gamma, beta, eps);
    }
  });
}

void embedding(ThreadPool& pool, float* y, const int32_t* ids, int64_t n, const void* table, DType dtype,
               int64_t hidden) {
  pool.parallel_for(n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t row = ids[t];
      for (int64_t i = 0; i < hidden; ++i) y[t * hidden + i] = load_as_f32(table, dtype, row * hidden + i);
    }
  });
}

void embedding_shard(ThreadPool& pool, float* y, const int32_t* ids, int64_t n, const void* table, DType dtype, int64_t hidden,
                     int64_t first_id, int64_t vocab) {
  pool.parallel_for(n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t row = static_cast<int64_t>(ids[t]) - first_id;
      float* out = y + t * hidden;
      if (row < 0 || row >= vocab) {
        std::fill(out, out + hidden, 0.f);
        continue;
      }
      for (int64_t i = 0; i < hidden; ++i) out[i] = load_as_f32(table, dtype, row * hidden + i);
    }
  });
}

}  // namespace blossom
