// Machine probes for the kernel benchmark: the limits a kernel is judged against.
//
//   probe_read_bandwidth  best-of-N multi-threaded streaming read-sum over a buffer much larger than
//                         the last-level cache, with AVX2 loads, without and with software
//                         prefetch: the most a GEMV could stream.
//   probe_fma_peak        independent FMA chains held in registers on every thread: the most a GEMM
//                         could compute with AVX2 (256-bit) FMA.
//   fill_random           fills weights with random values of a dtype (benchmark and test inputs).
//
// The probes use the AVX2 instructions the kernels use, so they report what those kernels could
// reach; on a CPU without AVX2 they fall back to scalar loops (and the scalar kernels run there).
#include "probes.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <stdexcept>
#include <vector>

#include "memory.h"
#include "simd.h"

namespace blossom {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

bool have_avx2() {
  const CpuFeatures& f = cpu_features();
  return f.avx2 && f.fma && f.f16c;
}

#if defined(__x86_64__)
// Sums [p, p+n) as floats with 8 independent accumulators so the adds never limit the stream;
// the result is returned so the loads cannot be optimised away. With prefetch > 0, each 256-byte
// step also prefetches `prefetch` bytes ahead (what the GEMV kernels do), non-temporal with `nta`.
BLOSSOM_AVX2 float read_sum_avx2(const float* p, size_t n, size_t prefetch, bool nta) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    if (prefetch) {
      const char* ahead = reinterpret_cast<const char*>(p + i) + prefetch;
      if (nta) {
        _mm_prefetch(ahead, _MM_HINT_NTA);
        _mm_prefetch(ahead + 64, _MM_HINT_NTA);
        _mm_prefetch(ahead + 128, _MM_HINT_NTA);
        _mm_prefetch(ahead + 192, _MM_HINT_NTA);
      } else {
        _mm_prefetch(ahead, _MM_HINT_T0);
        _mm_prefetch(ahead + 64, _MM_HINT_T0);
        _mm_prefetch(ahead + 128, _MM_HINT_T0);
        _mm_prefetch(ahead + 192, _MM_HINT_T0);
      }
    }
    a0 = _mm256_add_ps(a0, _mm256_load_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_load_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_load_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_load_ps(p + i + 24));
    a4 = _mm256_add_ps(a4, _mm256_load_ps(p + i + 32));
    a5 = _mm256_add_ps(a5, _mm256_load_ps(p + i + 40));
    a6 = _mm256_add_ps(a6, _mm256_load_ps(p + i + 48));
    a7 = _mm256_add_ps(a7, _mm256_load_ps(p + i + 56));
  }
  a0 = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                     _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
  float s = simd::hsum(a0);
  for (; i < n; ++i) s += p[i];
  return s;
}

// `iters` rounds of 12 independent FMA chains: 12 accumulators cover FMA latency (4-5 cycles)
// times two FMA pipes with room to spare. 12 * 8 lanes * 2 flops per iteration.
BLOSSOM_AVX2 float fma_chains_avx2(int64_t iters, float seed) {
  __m256 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps(seed + 0.001f * i);
  // x*m + c with m slightly below 1 stays finite forever, so there are no denormal slow paths.
  const __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it) {
    for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_ps(a[i], m, c);
  }
  __m256 s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, a[i]);
  return simd::hsum(s);
}
#endif

float read_sum_scalar(const float* p, size_t n) {
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += p[i];
    s1 += p[i + 1];
    s2 += p[i + 2];
    s3 += p[i + 3];
  }
  for (; i < n; ++i) s0 += p[i];
  return s0 + s1 + s2 + s3;
}

float fma_chains_scalar(int64_t iters, float seed) {
  float a[12];
  for (int i = 0; i < 12; ++i) a[i] = seed + 0.001f * i;
  for (int64_t it = 0; it < iters; ++it)
    for (int i = 0; i < 12; ++i) a[i] = a[i] * 0.999999f + 1e-7f;
  float s = 0;
  for (float v : a) s += v;
  return s;
}

std::atomic<float> g_sink{0.f};  // keeps the probes' results alive

// splitmix64: a tiny, well-mixed generator; one stream per chunk so threads never share state.
inline uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace

double probe_read_bandwidth(size_t bytes, int threads, int runs, void* buffer) {
  if (threads < 1) threads = 1;
  if (runs < 1) runs = 1;
  bytes &= ~size_t(4095);
  if (bytes < (1u << 20)) throw std::invalid_argument("probeReadBandwidth: buffer must be at least 1 MiB");
  Region buf{};
  if (!buffer) buf = allocate_pages(bytes);
  ThreadPool pool(threads);
  float* data = static_cast<float*>(buffer ? buffer : buf.data);
  const size_t n = bytes / sizeof(float);
  const bool fast = have_avx2();
  // Each thread reads a contiguous share, cache-line aligned, as a GEMV thread reads its rows.
  auto share = [&](int t) {
    size_t per = (n / threads) & ~size_t(15);
    size_t b = per * t, e = t == threads - 1 ? n : b + per;
    return std::pair<size_t, size_t>(b, e);
  };
  // Page the buffer in (and make it non-zero) on the threads that will read it.
  pool.run([&](int t, int) {
    auto [b, e] = share(t);
    for (size_t i = b; i < e; ++i) data[i] = static_cast<float>(i & 1023) * 1e-3f;
  });
  double best = 0;
  // Each run is repeated without and with software prefetch (at two distances, into L1 and
  // non-temporal, as the GEMV kernels do): the probe reports the best any of these ways of
  // streaming reaches. (Non-temporal read 1-2 % faster than T0 in the low-bandwidth state.)
  struct Way {
    size_t prefetch;
    bool nta;
  };
  const Way ways[] = {{0, false}, {4096, false}, {8192, false}, {4096, true}, {8192, true}};
  for (int r = 0; r < runs; ++r)
  for (const Way& way : ways) {
    std::atomic<float> total{0.f};
    auto t0 = Clock::now();
    pool.run([&](int t, int) {
      auto [b, e] = share(t);
#if defined(__x86_64__)
      float s = fast ? read_sum_avx2(data + b, e - b, way.prefetch, way.nta) : read_sum_scalar(data + b, e - b);
#else
      float s = read_sum_scalar(data + b, e - b);
#endif
      float cur = total.load();
      while (!total.compare_exchange_weak(cur, cur + s)) {}
    });
    const double sec = seconds_since(t0);
    g_sink.store(total.load());
    best = std::max(best, static_cast<double>(bytes) / sec / 1e9);
  }
  if (!buffer) release_region(buf);
  return best;
}

double probe_fma_peak(int threads, int runs) {
  if (threads < 1) threads = 1;
  if (runs < 1) runs = 1;
  ThreadPool pool(threads);
  const bool fast = have_avx2();
  // ~50 ms per run at a few GHz: long enough to hide start-up, short enough to repeat.
  const int64_t iters = fast ? 20'000'000 : 2'000'000;
  const double flops_per_thread = static_cast<double>(iters) * 12 * (fast ? 8 : 1) * 2;
  double best = 0;
  for (int r = 0; r < runs; ++r) {
    auto t0 = Clock::now();
    pool.run([&](int t, int) {
#if defined(__x86_64__)
      float s = fast ? fma_chains_avx2(iters, 1.0f + t) : fma_chains_scalar(iters, 1.0f + t);
#else
      float s = fma_chains_scalar(iters, 1.0f + t);
#endif
      g_sink.store(s);
    });
    const double sec = seconds_since(t0);
    best = std::max(best, flops_per_thread * threads / sec / 1e9);
  }
  return best;
}

void fill_random(ThreadPool& pool, void* dst, DType dtype, int64_t n, uint64_t seed, float scale) {
  constexpr int64_t kChunk = 1 << 16;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  pool.parallel_for(chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      uint64_t state = seed * 0x2545f4914f6cdd1dull + static_cast<uint64_t>(c);
      const int64_t b = c * kChunk, e = std::min(n, b + kChunk);
      for (int64_t i = b; i < e; ++i) {
        // Uniform in [-scale, scale): 24 random bits mapped to [-1, 1).
        const float u = static_cast<float>(static_cast<int64_t>(splitmix64(state) >> 40) - (1 << 23)) * (1.0f / (1 << 23));
        const float v = u * scale;
        switch (dtype) {
          case DType::F32: static_cast<float*>(dst)[i] = v; break;
          case DType::F16: static_cast<uint16_t*>(dst)[i] = f32_to_f16(v); break;
          case DType::BF16: static_cast<uint16_t*>(dst)[i] = f32_to_bf16(v); break;
          case DType::I8: static_cast<int8_t*>(dst)[i] = static_cast<int8_t>(std::lround(u * 127.f)); break;
        }
      }
    }
  });
}

}  // namespace blossom
