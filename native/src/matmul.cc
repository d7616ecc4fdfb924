// linear: y (rows, out) = epilogue(x (rows, in) @ W^T + bias) + residual
//
// W is (out, in) in f32, f16 or bf16, as nn.Linear stores it; accumulation is always fp32.
// Variants:
//   linear_scalar   the reference: one dot product per output, in order. Kept beside the fast
//                   ones and selectable at run time (setKernelVariant('scalar')) for tests.
//   AVX2+FMA+F16C, by batch (crossovers measured with bench/tune-linear.ts on the dev machine):
//   gemv            rows <= 2 (decode). Bound by memory bandwidth: each thread streams whole
//                   weight rows of its own contiguous share in address order with a software
//                   prefetch, converting in registers.
//   gemm_small      3..64 rows while x takes at most half of L2 (512 KiB). Compute-bound from
//                   ~4 rows on, yet weights are still converted in registers (packing would cost
//                   as much as using them) and reused from L1 by every 4-row tile of x; the next
//                   group of weight rows is prefetched.
//   gemm            the rest (more rows, or long rows). Weight panels converted to fp32 once per
//                   k block and reused by every 3-row tile of x; x packed once per call.
// Every variant computes each output with a fixed arithmetic order that does not depend on the
// thread count or on how outputs were split between threads (tested bitwise).
#ifdef __linux__
#include <sched.h>
#endif
#include <algorithm>
#include <atomic>
#include <memory>
#include <thread>
#include <new>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "epilogue.h"
#include "kernels.h"
#include "quant.h"
#include "simd.h"

namespace blossom {

void apply_epilogue_scalar(float* y, int64_t rows, int64_t out, int64_t col_begin, int64_t col_end,
                           const float* bias, int epilogue, const float* residual) {
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = y + r * out;
    const float* rr = residual ? residual + r * out : nullptr;
    for (int64_t o = col_begin; o < col_end; ++o) {
      float v = yr[o] + (bias ? bias[o] : 0.f);
      if (epilogue == kGelu) v = gelu_tanh(v);
      if (rr) v += rr[o];
      yr[o] = v;
    }
  }
}

void linear_scalar(ThreadPool& pool, float* y, const float* x, int64_t rows, const WeightMatrix& w,
                   const float* bias, int epilogue, const float* residual) {
  const int64_t in = w.in_features, out = w.out_features;
  pool.parallel_for(out, 64, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * in;
        float acc = 0.f;
        for (int64_t k = 0; k < in; ++k) acc += xr[k] * load_as_f32(w.data, w.dtype, o * in + k);
        y[r * out + o] = acc;
      }
    }
    apply_epilogue_scalar(y, rows, out, begin, end, bias, epilogue, residual);
  });
}

#if defined(__x86_64__)
namespace {

using namespace simd;

// Blocking, crossover and prefetch parameters. The defaults are what measured best on the
// development machine (2 Zen 5 cores, 48 KiB L1d and 1 MiB L2 each, 32 MiB L3), found with
// bench/tune-linear.ts, which changes them through set_linear_tuning().
struct Tuning {
  int64_t gemv_max_rows = 2;
  int64_t gemv_chunk_bytes = 1 << 20;
  int64_t gemv_prefetch = 6144;  // bytes ahead; with contiguous shares 6 KiB beat 8 KiB by 2-3 % per decode step
  // The prefetch's hint: 1 non-temporal (NTA), 0 into L1 (T0). In one process alternating the two
  // every 100 decode steps (bloom-560m bf16, batch 1, 10-16 pairs), NTA took 0.98-0.99x the step
  // time in the high-bandwidth state and 0.98x in the low one. (Each matrix on its own streams about
  // as fast either way, tune-linear: 0.99-1.06x: the gain is in what the weights no longer push out of the caches
  // between one op and the next: the KV cache, the activations.)
  int64_t gemv_prefetch_nta = 1;
  int64_t kc = 512;
  int64_t nb = 96;
  int64_t mc = 192;
  int64_t gemm_prefetch_panels = 1;  // how many weight panels ahead to prefetch (0: none)
  int64_t gemm_prefetch_hint = 0;    // 0: into L1 (T0), 1: into L2 (T1)
  int64_t small_max_rows = 64;
  int64_t small_max_x_bytes = 512 << 10;  // x must stay in L2 (with room) across all groups
  int64_t small_nb = 96;
};
Tuning g_tuning;
const Tuning& tuning() { return g_tuning; }

}  // namespace

// --- epilogue, vectorised over a column range (epilogue.h) ----------------------------------
// The ragged end of a range goes through the same vector code (via a padded copy), so an
// output's value never depends on where a thread's range happened to end.
BLOSSOM_AVX2_INLINE __m256 epilogue8(__m256 v, const float* bias, int epilogue, const float* residual) {
  if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias));
  if (epilogue == kGelu) v = gelu8(v);
  if (residual) v = _mm256_add_ps(v, _mm256_loadu_ps(residual));
  return v;
}

BLOSSOM_AVX2 void apply_epilogue_avx2(float* y, int64_t rows, int64_t out, int64_t c0, int64_t c1, const float* bias,
                                      int epilogue, const float* residual) {
  if (!bias && epilogue == kNone && !residual) return;
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = y + r * out;
    const float* rr = residual ? residual + r * out : nullptr;
    int64_t o = c0;
    for (; o + 8 <= c1; o += 8) _mm256_storeu_ps(yr + o, epilogue8(_mm256_loadu_ps(yr + o), bias ? bias + o : nullptr, epilogue, rr ? rr + o : nullptr));
    if (o < c1) {
      const int64_t n = c1 - o;
      alignas(32) float yt[8] = {0}, bt[8] = {0}, rt[8] = {0};
      std::memcpy(yt, yr + o, sizeof(float) * n);
      if (bias) std::memcpy(bt, bias + o, sizeof(float) * n);
      if (rr) std::memcpy(rt, rr + o, sizeof(float) * n);
      _mm256_store_ps(yt, epilogue8(_mm256_load_ps(yt), bias ? bt : nullptr, epilogue, rr ? rt : nullptr));
      std::memcpy(yr + o, yt, sizeof(float) * n);
    }
  }
}

namespace {

using namespace simd;

// Sums of 4 vectors, lane i of the result = sum of v[i]'s 8 lanes.
BLOSSOM_AVX2_INLINE __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  __m256 ab = _mm256_hadd_ps(a, b);  // a01 a23 b01 b23 | a45 a67 b45 b67
  __m256 cd = _mm256_hadd_ps(c, d);
  __m256 abcd = _mm256_hadd_ps(ab, cd);  // a0123 b0123 c0123 d0123 | a4567 ...
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// --- gemv: one weight row at a time against R rows of x, weights converted in registers ------
// Each thread streams its weight rows strictly in address order, with a software prefetch a fixed
// distance ahead (a non-temporal hint by default: weights are used once and should not evict x, the
// KV cache or the next op's inputs; Tuning::gemv_prefetch_nta).
// Measured on the development machine: the hardware prefetchers alone lose 10-45% (more for
// long rows), and interleaving 2-4 rows per pass, or splitting long rows into k blocks so that
// x stays in L1, both lost bandwidth against this single stream (in the row-major layout; a
// matrix stored in column panels keeps x in L1 with one stream per panel: linear_panels). U
// vectors per step give R*U independent accumulators. G (rows per pass) is kept as a parameter for such experiments.
template <DType D, int R, int G>
BLOSSOM_AVX2_INLINE void gemv_group(float* y, const float* x, const WeightMatrix& w, int64_t o) {
  constexpr int U = R <= 2 ? 4 : 2;
  constexpr int64_t es = D == DType::F32 ? 4 : 2;
  constexpr int64_t step_bytes = 8 * U * es;  // weight bytes per row per step: 64 or 128
  const int64_t in = w.in_features, out = w.out_features;
  const char* wr = static_cast<const char*>(w.data) + o * in * es;
  const int64_t pf = tuning().gemv_prefetch;
  __m256 acc[G][R][U];
  for (int g = 0; g < G; ++g)
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < U; ++j) acc[g][r][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= in; k += 8 * U) {
    if (pf) {
      for (int g = 0; g < G; ++g)
        for (int64_t line = 0; line < step_bytes; line += 64) {
          if (tuning().gemv_prefetch_nta) _mm_prefetch(wr + g * in * es + k * es + pf + line, _MM_HINT_NTA);
          else _mm_prefetch(wr + g * in * es + k * es + pf + line, _MM_HINT_T0);
        }
    }
    for (int j = 0; j < U; ++j) {
      __m256 xv[R];
      for (int r = 0; r < R; ++r) xv[r] = _mm256_loadu_ps(x + r * in + k + 8 * j);
      for (int g = 0; g < G; ++g) {
        const __m256 wv = load8<D>(wr + (g * in + k + 8 * j) * es);
        for (int r = 0; r < R; ++r) acc[g][r][j] = _mm256_fmadd_ps(wv, xv[r], acc[g][r][j]);
      }
    }
  }
  for (; k + 8 <= in; k += 8) {
    for (int g = 0; g < G; ++g) {
      const __m256 wv = load8<D>(wr + (g * in + k) * es);
      for (int r = 0; r < R; ++r) acc[g][r][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * in + k), acc[g][r][0]);
    }
  }
  for (int g = 0; g < G; ++g) {
    for (int r = 0; r < R; ++r) {
      __m256 v = acc[g][r][0];
      for (int j = 1; j < U; ++j) v = _mm256_add_ps(v, acc[g][r][j]);
      float s = hsum(v);
      for (int64_t kk = k; kk < in; ++kk) s += x[r * in + kk] * load_as_f32(w.data, D, (o + g) * in + kk);
      y[r * out + o + g] = s;
    }
  }
}

template <DType D, int R>
BLOSSOM_AVX2 void gemv_rows(float* y, const float* x, const WeightMatrix& w, int64_t o_begin, int64_t o_end) {
  for (int64_t o = o_begin; o < o_end; ++o) gemv_group<D, R, 1>(y, x, w, o);
}

template <DType D>
BLOSSOM_AVX2 void gemv_range(float* y, const float* x, int64_t rows, const WeightMatrix& w, int64_t o_begin, int64_t o_end) {
  switch (rows) {
    case 1: gemv_rows<D, 1>(y, x, w, o_begin, o_end); break;
    case 2: gemv_rows<D, 2>(y, x, w, o_begin, o_end); break;
    case 3: gemv_rows<D, 3>(y, x, w, o_begin, o_end); break;
    default: gemv_rows<D, 4>(y, x, w, o_begin, o_end); break;
  }
}

// Rows a GEMV thread claims at a time: gemv_chunk_bytes of weights, at most a quarter of a thread's share.
int64_t gemv_grain(const WeightMatrix& w, int threads) {
  const int64_t row_bytes = w.in_features * static_cast<int64_t>(dtype_size(w.dtype));
  const int64_t chunk = std::max<int64_t>(1, tuning().gemv_chunk_bytes / row_bytes);
  return std::min(chunk, std::max<int64_t>(1, w.out_features / (4 * threads)));
}

template <DType D>
void gemv(ThreadPool& pool, float* y, const float* x, int64_t rows, const WeightMatrix& w, const float* bias,
          int epilogue, const float* residual) {
  const int64_t out = w.out_features;
  // Each thread streams its own contiguous share of the rows, claimed a chunk at a time, and takes
  // chunks from the back of the other's share when its own is done, so both cores finish together.
  // Measured against chunks handed out in any order (1 MiB, alternating between the threads): the
  // LM head streamed at 0.89 -> 0.96 of the read probe, fc1 0.89 -> 0.93; a decode step 3-4 %
  // faster. Every restart of a stream costs its ramp-up.
  const int64_t chunk = gemv_grain(w, pool.size());
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    const int64_t rn = std::min<int64_t>(4, rows - r0);
    pool.parallel_streams(out, chunk, [&](int64_t begin, int64_t end) {
      gemv_range<D>(y + r0 * out, x + r0 * w.in_features, rn, w, begin, end);
      apply_epilogue_avx2(y + r0 * out, rn, out, begin, end, bias, epilogue, residual ? residual + r0 * out : nullptr);
    });
  }
}

// --- gemm -----------------------------------------------------------------------------------
// Dot-product form: every operand is read along k, the contiguous dimension of both x and W, so
// weights need no transposition: a panel of NR weight rows is only converted to fp32 (once per
// KC x MC block, into a buffer that stays in L1) and reused by every MR-row tile of x. x is packed
// once per call into k-blocks of KC (rows at a short stride, so they do not all fall into the
// same cache sets as they would at a power-of-two stride of `in` floats). The MR x NR tile keeps
// MR*NR = 12 accumulators in registers (enough independent chains to cover FMA latency on two
// pipes); their horizontal sums are taken once per KC block.
constexpr int MR = 3;
constexpr int NR = 4;

inline int64_t round8(int64_t n) { return (n + 7) & ~int64_t(7); }

// A per-thread scratch buffer, 64-byte aligned, grown on demand and kept between calls.
class Scratch {
 public:
  ~Scratch() { std::free(data_); }
  float* get(size_t floats) {
    if (floats > capacity_) {
      std::free(data_);
      const size_t bytes = (floats * sizeof(float) + 63) & ~size_t(63);
      data_ = static_cast<float*>(std::aligned_alloc(64, bytes));
      if (!data_) throw std::bad_alloc();
      capacity_ = bytes / sizeof(float);
    }
    return data_;
  }
  // Frees the buffer if it grew past `floats` (a long prefill should not pin its scratch forever).
  void trim(size_t floats) {
    if (capacity_ > floats) {
      std::free(data_);
      data_ = nullptr;
      capacity_ = 0;
    }
  }

 private:
  float* data_ = nullptr;
  size_t capacity_ = 0;
};

// Packs W[o0 : o0+NR, k0 : k0+kc] as fp32 [NR][kcp] (kcp = kc rounded up to 8, zero-padded);
// rows past `out` are zero.
template <DType D>
BLOSSOM_AVX2 void pack_weights(float* dst, const WeightMatrix& w, int64_t o0, int64_t k0, int64_t kc) {
  constexpr int64_t es = D == DType::F32 ? 4 : 2;
  const int64_t in = w.in_features, kcp = round8(kc);
  const char* base = static_cast<const char*>(w.data);
  const int64_t valid = std::min<int64_t>(NR, w.out_features - o0);
  const int64_t kc8 = kc & ~int64_t(7);
  for (int64_t j = 0; j < NR; ++j) {
    float* d = dst + j * kcp;
    if (j >= valid) {
      std::fill(d, d + kcp, 0.f);
      continue;
    }
    const char* src = base + ((o0 + j) * in + k0) * es;
    int64_t k = 0;
    for (; k < kc8; k += 8) _mm256_store_ps(d + k, load8<D>(src + k * es));
    for (; k < kc; ++k) d[k] = load_as_f32(w.data, D, (o0 + j) * in + k0 + k);
    for (; k < kcp; ++k) d[k] = 0.f;
  }
}

// C[M x ncols] (+)= A[M x kcp] . B[NR x kcp]^T, A and B fp32 with row strides kcp.
template <int M>
BLOSSOM_AVX2 void micro_kernel(float* c, int64_t ldc, const float* a, const float* b, int64_t kcp, bool accumulate,
                               int ncols) {
  __m256 acc[M][NR];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kcp; k += 8) {
    __m256 av[M];
    for (int i = 0; i < M; ++i) av[i] = _mm256_load_ps(a + i * kcp + k);
    for (int j = 0; j < NR; ++j) {
      __m256 bv = _mm256_load_ps(b + j * kcp + k);
      for (int i = 0; i < M; ++i) acc[i][j] = _mm256_fmadd_ps(av[i], bv, acc[i][j]);
    }
  }
  for (int i = 0; i < M; ++i) {
    __m128 s = hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
    float* ci = c + i * ldc;
    if (ncols == NR) {
      if (accumulate) s = _mm_add_ps(s, _mm_loadu_ps(ci));
      _mm_storeu_ps(ci, s);
    } else {
      alignas(16) float tmp[NR];
      _mm_store_ps(tmp, s);
      for (int j = 0; j < ncols; ++j) ci[j] = accumulate ? ci[j] + tmp[j] : tmp[j];
    }
  }
}

BLOSSOM_AVX2 void micro_dispatch(int m, float* c, int64_t ldc, const float* a, const float* b, int64_t kcp,
                                 bool accumulate, int ncols) {
  switch (m) {
    case 3: micro_kernel<3>(c, ldc, a, b, kcp, accumulate, ncols); break;
    case 2: micro_kernel<2>(c, ldc, a, b, kcp, accumulate, ncols); break;
    default: micro_kernel<1>(c, ldc, a, b, kcp, accumulate, ncols); break;
  }
}

// Packs x (rows, in) as fp32 blocks [kb][rows][kcp(kb)], each k block zero-padded to a multiple of 8.
BLOSSOM_AVX2 void pack_x(float* dst, const float* x, int64_t rows, int64_t in, int64_t kc_max, int64_t r_begin,
                         int64_t r_end) {
  for (int64_t k0 = 0, off = 0; k0 < in; k0 += kc_max) {
    const int64_t kc = std::min(kc_max, in - k0), kcp = round8(kc);
    for (int64_t r = r_begin; r < r_end; ++r) {
      float* d = dst + off + r * kcp;
      std::memcpy(d, x + r * in + k0, sizeof(float) * kc);
      std::fill(d + kc, d + kcp, 0.f);
    }
    off += rows * kcp;
  }
}

// Prefetches the weights one panel (NR rows x kc) will pack, so that their DRAM latency overlaps
// the microkernels of the panels before it.
template <DType D>
BLOSSOM_AVX2_INLINE void prefetch_panel(const WeightMatrix& w, int64_t o0, int64_t k0, int64_t kc) {
  constexpr int64_t es = D == DType::F32 ? 4 : 2;
  const char* base = static_cast<const char*>(w.data);
  const int64_t rows = std::min<int64_t>(NR, w.out_features - o0);
  const bool l2 = tuning().gemm_prefetch_hint == 1;
  for (int64_t j = 0; j < rows; ++j) {
    const char* p = base + ((o0 + j) * w.in_features + k0) * es;
    const char* e = p + kc * es;
    for (const char* q = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63)); q < e; q += 64) {
      if (l2) _mm_prefetch(q, _MM_HINT_T1);
      else _mm_prefetch(q, _MM_HINT_T0);
    }
  }
}

// One task: outputs [o_begin, o_end) for all rows.
template <DType D>
BLOSSOM_AVX2 void gemm_task(float* y, const float* xp, int64_t rows, const WeightMatrix& w, int64_t o_begin,
                            int64_t o_end, float* panel) {
  const int64_t in = w.in_features, out = w.out_features;
  const int64_t KC = tuning().kc, MC = tuning().mc;
  const int64_t ahead = tuning().gemm_prefetch_panels * NR;
  for (int64_t m0 = 0; m0 < rows; m0 += MC) {
    const int64_t mc = std::min(MC, rows - m0);
    int64_t xoff = 0;
    for (int64_t k0 = 0; k0 < in; k0 += KC) {
      const int64_t kc = std::min(KC, in - k0), kcp = round8(kc);
      const float* xblock = xp + xoff;
      for (int64_t o0 = o_begin; o0 < o_end; o0 += NR) {
        if (ahead) {
          // The panel `ahead` outputs on in this k block, or at the start of the next one.
          int64_t po = o0 + ahead, pk = k0, pkc = kc;
          if (po >= o_end) {
            po = o_begin + (po - o_end);
            pk = k0 + KC;
            pkc = std::min(KC, in - pk);
          }
          if (pk < in && po < o_end) prefetch_panel<D>(w, po, pk, pkc);
        }
        pack_weights<D>(panel, w, o0, k0, kc);
        const int ncols = static_cast<int>(std::min<int64_t>(NR, o_end - o0));
        for (int64_t r0 = m0; r0 < m0 + mc; r0 += MR) {
          const int m = static_cast<int>(std::min<int64_t>(MR, m0 + mc - r0));
          micro_dispatch(m, y + r0 * out + o0, out, xblock + r0 * kcp, panel, kcp, k0 > 0, ncols);
        }
      }
      xoff += rows * kcp;
    }
  }
}

template <DType D>
void gemm(ThreadPool& pool, float* y, const float* x, int64_t rows, const WeightMatrix& w, const float* bias,
          int epilogue, const float* residual) {
  const int64_t in = w.in_features, out = w.out_features;
  const int64_t KC = tuning().kc;
  const int64_t nblocks = (in + KC - 1) / KC;
  static thread_local Scratch xpack;
  float* xp = xpack.get(static_cast<size_t>(rows * round8(KC) * nblocks));
  pool.parallel_for(rows, 16, [&](int64_t b, int64_t e) { pack_x(xp, x, rows, in, KC, b, e); });
  int64_t nb = tuning().nb;
  // Enough tasks that both threads finish together even on small layers.
  while (nb > NR && out / nb < 8 * pool.size()) nb /= 2;
  nb = std::max<int64_t>(NR, nb / NR * NR);
  pool.parallel_for(out, nb, [&](int64_t begin, int64_t end) {
    static thread_local Scratch panel;
    gemm_task<D>(y, xp, rows, w, begin, end, panel.get(static_cast<size_t>(NR * round8(KC))));
    apply_epilogue_avx2(y, rows, out, begin, end, bias, epilogue, residual);
  });
  xpack.trim(size_t(16) << 20);
}

// --- small batches: weights converted in registers, reused from L1 across row tiles ----------
// For a handful of rows, packing weights costs as much as using them. Instead a group of SN
// weight rows is read (from DRAM, once) and converted in registers by the first SM-row tile of x,
// and read again from L1 by the following tiles. The next group is prefetched while the first
// tile runs, so the DRAM stream overlaps the FMAs.
constexpr int SM = 4;  // rows of x per tile
constexpr int SN = 3;  // weight rows (outputs) per group

// One k step of a small tile: N weight vectors converted once, used by M rows of x.
template <DType D, int M, int N>
BLOSSOM_AVX2_INLINE void small_step(__m256 (&acc)[M][N], const float* x, int64_t in, const char* w, int64_t k) {
  constexpr int64_t es = D == DType::F32 ? 4 : 2;
  __m256 wv[N];
  for (int j = 0; j < N; ++j) wv[j] = load8<D>(w + (j * in + k) * es);
  for (int i = 0; i < M; ++i) {
    const __m256 xv = _mm256_loadu_ps(x + i * in + k);
    for (int j = 0; j < N; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
  }
}

template <DType D, int M, int N>
BLOSSOM_AVX2 void small_tile(float* y, int64_t ldy, const float* x, int64_t in, const char* w, const char* prefetch) {
  constexpr int64_t es = D == DType::F32 ? 4 : 2;
  constexpr int U = static_cast<int>(64 / (8 * es));  // vectors per 64-byte line of weights
  __m256 acc[M][N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t in8 = in & ~int64_t(7);
  int64_t k = 0;
  if (prefetch) {
    for (; k + 8 * U <= in8; k += 8 * U) {
      for (int j = 0; j < SN; ++j) _mm_prefetch(prefetch + (j * in + k) * es, _MM_HINT_T0);
      for (int u = 0; u < U; ++u) small_step<D, M, N>(acc, x, in, w, k + 8 * u);
    }
  }
  for (; k < in8; k += 8) small_step<D, M, N>(acc, x, in, w, k);
  for (int i = 0; i < M; ++i) {
    alignas(16) float s[4];
    const __m256 zero = _mm256_setzero_ps();
    _mm_store_ps(s, hsum4(acc[i][0], N > 1 ? acc[i][N > 1 ? 1 : 0] : zero, N > 2 ? acc[i][N > 2 ? 2 : 0] : zero, zero));
    for (int j = 0; j < N; ++j) {
      float v = s[j];
      for (int64_t kk = in8; kk < in; ++kk) v += x[i * in + kk] * load_as_f32(w, D, j * in + kk);
      y[i * ldy + j] = v;
    }
  }
}

template <DType D, int N>
BLOSSOM_AVX2 void small_group(float* y, int64_t ldy, const float* x, int64_t rows, int64_t in, const char* w,
                              const char* prefetch) {
  int64_t r = 0;
  for (; r + SM <= rows; r += SM, prefetch = nullptr) small_tile<D, SM, N>(y + r * ldy, ldy, x + r * in, in, w, prefetch);
  switch (rows - r) {
    case 3: small_tile<D, 3, N>(y + r * ldy, ldy, x + r * in, in, w, prefetch); break;
    case 2: small_tile<D, 2, N>(y + r * ldy, ldy, x + r * in, in, w, prefetch); break;
    case 1: small_tile<D, 1, N>(y + r * ldy, ldy, x + r * in, in, w, prefetch); break;
    default: break;
  }
}

template <DType D>
void gemm_small(ThreadPool& pool, float* y, const float* x, int64_t rows, const WeightMatrix& w, const float* bias,
                int epilogue, const float* residual) {
  constexpr int64_t es = D == DType::F32 ? 4 : 2;
  const int64_t in = w.in_features, out = w.out_features;
  const char* base = static_cast<const char*>(w.data);
  int64_t nb = tuning().small_nb;
  while (nb > SN && out / nb < 8 * pool.size()) nb /= 2;
  nb = std::max<int64_t>(SN, nb / SN * SN);
  pool.parallel_for(out, nb, [&](int64_t begin, int64_t end) {
    int64_t o = begin;
    for (; o + SN <= end; o += SN) {
      const char* next = o + 2 * SN <= end ? base + (o + SN) * in * es : nullptr;
      small_group<D, SN>(y + o, out, x, rows, in, base + o * in * es, next);
    }
    if (end - o == 2) small_group<D, 2>(y + o, out, x, rows, in, base + o * in * es, nullptr);
    if (end - o == 1) small_group<D, 1>(y + o, out, x, rows, in, base + o * in * es, nullptr);
    apply_epilogue_avx2(y, rows, out, begin, end, bias, epilogue, residual);
  });
}

template <DType D>
void linear_avx2_typed(ThreadPool& pool, float* y, const float* x, int64_t rows, const WeightMatrix& w,
                       const float* bias, int epilogue, const float* residual) {
  if (rows <= tuning().gemv_max_rows) gemv<D>(pool, y, x, rows, w, bias, epilogue, residual);
  else if (rows <= tuning().small_max_rows && rows * w.in_features * 4 <= tuning().small_max_x_bytes) gemm_small<D>(pool, y, x, rows, w, bias, epilogue, residual);
  else gemm<D>(pool, y, x, rows, w, bias, epilogue, residual);
}

}  // namespace

bool set_linear_tuning(const std::string& name, int64_t value) {
  Tuning& t = g_tuning;
  if (value < 0) return false;
  if (name == "gemvMaxRows") t.gemv_max_rows = value;
  else if (name == "gemvChunkBytes") t.gemv_chunk_bytes = value;
  else if (name == "gemvPrefetch") t.gemv_prefetch = value;
  else if (name == "gemvPrefetchNta") t.gemv_prefetch_nta = value;
  else if (name == "kc" && value >= 8) t.kc = value / 8 * 8;
  else if (name == "nb" && value >= 4) t.nb = value;
  else if (name == "mc" && value >= 1) t.mc = value;
  else if (name == "gemmPrefetchPanels") t.gemm_prefetch_panels = value;
  else if (name == "smallMaxRows") t.small_max_rows = value;
  else if (name == "smallMaxXBytes") t.small_max_x_bytes = value;
  else if (name == "smallNb" && value >= 3) t.small_nb = value;
  else if (name == "gemmPrefetchHint" && value <= 1) t.gemm_prefetch_hint = value;
  else return false;
  return true;
}

void linear_avx2(ThreadPool& pool, float* y, const float* x, int64_t rows, const WeightMatrix& w, const float* bias,
                 int epilogue, const float* residual) {
  switch (w.dtype) {
    case DType::F32: return linear_avx2_typed<DType::F32>(pool, y, x, rows, w, bias, epilogue, residual);
    case DType::F16: return linear_avx2_typed<DType::F16>(pool, y, x, rows, w, bias, epilogue, residual);
    case DType::BF16: return linear_avx2_typed<DType::BF16>(pool, y, x, rows, w, bias, epilogue, residual);
    default: return linear_scalar(pool, y, x, rows, w, bias, epilogue, residual);
  }
}
#else
bool set_linear_tuning(const std::string&, int64_t) { return false; }
void linear_avx2(ThreadPool& pool, float* y, const float* x, int64_t rows, const WeightMatrix& w, const float* bias,
                 int epilogue, const float* residual) {
  linear_scalar(pool, y, x, rows, w, bias, epilogue, residual);
}
#endif

namespace {

using LinearFn = void (*)(ThreadPool&, float*, const float*, int64_t, const WeightMatrix&, const float*, int, const float*);
using EpilogueFn = void (*)(float*, int64_t, int64_t, int64_t, int64_t, const float*, int, const float*);

// --- a matrix stored in column panels (kernels.h) --------------------------------------------
// y = epilogue(sum over panels p of x[:, panel p] @ W_p^T + bias) + residual, the panels' sums
// added in panel order (so, like every variant, independent of the thread count). Each panel is
// an ordinary row-major matrix for `fn` with rows of at most panel_k inputs: at batch 1, a
// bf16/fp16 row of 16384 inputs against 64 KiB of fp32 x (more than L1) streamed at 73-86 % of the
// read bandwidth, as 4 panels of 4096 at 95-99 % (bench:kernels, bloom-7b1 dense_4h_to_h).
// Panel p's sum goes to one of two buffers with the running sum as its residual (the kernels
// write y before adding the residual, so the two must differ), starting in the one that makes
// the last panel land in y; bias, GELU and the caller's residual follow in one pass.
void linear_panels(ThreadPool& pool, float* y, const float* x, int64_t rows, const WeightMatrix& w, const float* bias,
                   int epilogue, const float* residual, LinearFn fn, EpilogueFn apply_epilogue) {
  const int64_t in = w.in_features, out = w.out_features, kc = w.panel_k;
  const int64_t es = static_cast<int64_t>(dtype_size(w.dtype));
  const int64_t panels = (in + kc - 1) / kc;
  static thread_local std::vector<float> x_panel, partial;
  partial.resize(static_cast<size_t>(rows * out));
  float* sums[2] = {y, partial.data()};
  int target = static_cast<int>((panels - 1) & 1);
  const float* running = nullptr;
  for (int64_t k0 = 0; k0 < in; k0 += kc) {
    const int64_t n = std::min(kc, in - k0);
    const WeightMatrix panel{static_cast<const char*>(w.data) + out * k0 * es, w.dtype, out, n};
    const float* xp = x + k0;
    if (rows > 1) {
      x_panel.resize(static_cast<size_t>(rows * n));
      float* dst = x_panel.data();  // (inside the tasks, the name x_panel would be the pool thread's own)
      pool.parallel_for(rows, 16, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) std::memcpy(dst + r * n, x + r * in + k0, sizeof(float) * n);
      });
      xp = dst;
    }
    fn(pool, sums[target], xp, rows, panel, nullptr, kNone, running);
    running = sums[target];
    target ^= 1;
  }
  if (bias || epilogue != kNone || residual)
    pool.parallel_for(out, 256, [&](int64_t b, int64_t e) { apply_epilogue(y, rows, out, b, e, bias, epilogue, residual); });
  if (partial.capacity() > (size_t(4) << 20)) std::vector<float>().swap(partial);
  if (x_panel.capacity() > (size_t(4) << 20)) std::vector<float>().swap(x_panel);
}

}  // namespace

void linear(ThreadPool& pool, float* y, const float* x, int64_t rows, const WeightMatrix& w, const float* bias,
            int epilogue, const float* residual) {
  const bool avx2 = active_variant() == Variant::Avx2;
  if (w.panel_k > 0 && w.panel_k < w.in_features) {
#if defined(__x86_64__)
    if (avx2) return linear_panels(pool, y, x, rows, w, bias, epilogue, residual, linear_avx2, apply_epilogue_avx2);
#endif
    return linear_panels(pool, y, x, rows, w, bias, epilogue, residual, linear_scalar, apply_epilogue_scalar);
  }
  if (avx2) linear_avx2(pool, y, x, rows, w, bias, epilogue, residual);
  else linear_scalar(pool, y, x, rows, w, bias, epilogue, residual);
}

// --- run_chain: the single-row ops of a decode step as one pool job -----------------------------
// Measured on the development machine (bloom-560m's 96 layer matrices, bf16, batch 1, in one
// process, scratch benchmark): as separate linear() calls 74.4 GB/s in the high-bandwidth state and
// 43.5 in the low one, in one job with a barrier between matrices 77.2 and 46.6; the LM head alone
// 78.7 and 48.1. Every call restarts the threads' streams from cold and costs its dispatch; in one
// job a thread goes from its share of one matrix to its share of the next at once.
// Each linear op is split as gemv() splits it (contiguous shares streamed front to back, chunks
// taken from the back of the fuller share by a thread whose own is done), and one in column panels
// as linear_panels runs it, panel by panel (in-process against the ops one by one, bloom-1b7 bf16:
// 0.988x the step time in the high-bandwidth state, 1.003x in the low one); a layer norm runs on
// thread 0 while the others wait at the barrier (a row of 1024-4096 floats: a microsecond).
// Attention is an op of the chain too (the tasks attention() makes for one decoding sequence, taken
// from a counter), so a whole decode step after the embedding is one job: in one process, steps
// alternating with attention called between chains (300 of each, bloom-560m bf16), 0.984x the step
// time in the high-bandwidth state and 0.990x in the low one.
namespace {

// A spinning barrier for the pool's threads inside one job.
class ChainBarrier {
 public:
  explicit ChainBarrier(int threads) : threads_(threads) {}
  void wait(int& phase) {
    ++phase;
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == threads_ * phase) {
      phase_.store(phase, std::memory_order_release);
      return;
    }
    for (int spins = 0; phase_.load(std::memory_order_acquire) < phase; ++spins) {
      if (spins < 4096) {
#if defined(__x86_64__)
        _mm_pause();
#endif
      } else {
        std::this_thread::yield();  // the other thread may be waiting for this core
      }
    }
  }

 private:
  const int threads_;
  std::atomic<int> arrived_{0};
  std::atomic<int> phase_{0};
};

// `a`: an attention op's arguments with the run's batch.
bool chainable(const ChainOp& op, const AttentionArgs& a) {
  if (op.kind == ChainOp::kLayerNorm) return true;
  if (op.kind == ChainOp::kAttention) return chain_attention_ok(a);
  if (op.kind == ChainOp::kLinearInt8) return active_variant() == Variant::Avx2;
  // (linear() takes the GEMV at one row only while gemvMaxRows >= 1.)
  return active_variant() == Variant::Avx2 && tuning().gemv_max_rows >= 1 &&
         (op.w.dtype == DType::F32 || op.w.dtype == DType::F16 || op.w.dtype == DType::BF16);
}

// A linear op's weights in column panels (linear_panels): how many.
int64_t panel_count(const ChainOp& op) {
  const int64_t kc = op.w.panel_k;
  return op.kind == ChainOp::kLinear && kc > 0 && kc < op.w.in_features ? (op.w.in_features + kc - 1) / kc : 0;
}

#if defined(__x86_64__)
void chain_gemv_part(const ChainOp& op, int64_t b, int64_t e) {
  switch (op.w.dtype) {
    case DType::F32: gemv_range<DType::F32>(op.y, op.x, 1, op.w, b, e); break;
    case DType::F16: gemv_range<DType::F16>(op.y, op.x, 1, op.w, b, e); break;
    default: gemv_range<DType::BF16>(op.y, op.x, 1, op.w, b, e); break;
  }
  apply_epilogue_avx2(op.y, 1, op.w.out_features, b, e, op.bias, op.epilogue, op.residual);
}
#endif

// An int8 linear op's arguments, for one row.
Int8LinearArgs int8_args(const ChainOp& op) {
  return Int8LinearArgs{op.y, op.x, 1, QuantWeights{op.q, op.q_scales, op.q_out, op.q_in, op.q_group}, op.bias, op.epilogue, op.residual,
                        static_cast<ActivationMode>(op.q_mode), op.q_threshold};
}

void run_op(ThreadPool& pool, const ChainOp& op, const AttentionArgs& a) {
  if (op.kind == ChainOp::kLayerNorm) layer_norm_row(op.y, op.x, op.cols, op.gamma, op.beta, op.eps);
  else if (op.kind == ChainOp::kAttention) attention(pool, a);
  else if (op.kind == ChainOp::kLinearInt8) linear_int8(pool, int8_args(op));
  else linear(pool, op.y, op.x, 1, op.w, op.bias, op.epilogue, op.residual);
}

}  // namespace

// CPUs this process may run on. The barriers spin: with more pool threads than CPUs, a waiting thread
// would hold a core the working one needs (an audit measured 2.6 against 0.7-1.2 ms a step at 3
// threads on 2 cores), so the ops then run one by one.
static int usable_cpus() {
  static const int n = [] {
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
#endif
    return static_cast<int>(std::thread::hardware_concurrency());
  }();
  return n;
}

bool run_chain(ThreadPool& pool, const ChainOp* ops, size_t n, const ChainStep& step) {
  // Each attention op with this run's batch, checked against its cache before any op runs.
  static thread_local std::vector<AttentionArgs> attn;
  attn.assign(n, AttentionArgs{});
  for (size_t i = 0; i < n; ++i) {
    if (ops[i].kind != ChainOp::kAttention) continue;
    AttentionArgs& a = attn[i];
    a = ops[i].attention;
    a.num_tokens = 1;
    a.seqs = step.seqs, a.num_seqs = step.num_seqs;
    a.block_table = step.block_table, a.block_table_len = step.block_table_len;
    check_attention_batch(a);
    // The op has one row of out and qkv: any other batch would write no output (the next ops then
    // read the last step's) or have two sequences race on that row.
    if (a.num_seqs != 1 || a.seqs[1] != 1)
      throw std::range_error("runChain: a chain's attention takes one sequence decoding one token (seqs = [0, 1, pastLen, tableOffset]), got " +
                             (a.num_seqs != 1 ? std::to_string(a.num_seqs) + " sequences" : "a sequence with " + std::to_string(a.seqs[1]) + " new tokens"));
  }
  bool fused = pool.size() > 1 && pool.size() <= usable_cpus();
  for (size_t i = 0; i < n && fused; ++i) fused = chainable(ops[i], attn[i]);
#if defined(__x86_64__)
  if (fused) {
    const int t_count = pool.size();
    // Attention ops: the tasks attention() would make (the same bits), taken by the threads in turn
    // from a counter; a long cache's key ranges are merged after a barrier, a head at a time.
    static thread_local std::vector<DecodePlan> plans;
    static thread_local std::vector<float> partials;
    if (plans.size() < n) plans.resize(n);
    int64_t partial_floats = 0;
    for (size_t i = 0; i < n; ++i) {
      if (ops[i].kind != ChainOp::kAttention) continue;
      plan_chain_attention(attn[i], t_count, plans[i]);
      partial_floats = std::max(partial_floats, plans[i].partial_floats);
    }
    if (static_cast<int64_t>(partials.size()) < partial_floats) partials.resize(static_cast<size_t>(partial_floats));
    float* const part_base = partials.data();
    const AttentionArgs* const attn_args = attn.data();  // the caller's thread_locals, read by every thread
    const DecodePlan* const attn_plans = plans.data();
    std::unique_ptr<StreamShare[]> counters(new StreamShare[2 * n]);  // (used as plain counters)
    for (size_t i = 0; i < 2 * n; ++i) counters[i].range.store(0, std::memory_order_relaxed);
    // Each linear op's shares and chunk, as gemv() hands them out (parallel_streams; an int8 op's as
    // linear_int8 does at one row); an op in column panels has a set of shares per panel, from
    // first_share[i] on.
    std::vector<uint64_t> grain(n, 0);
    std::vector<size_t> first_share(n, 0);
    std::vector<int64_t> share_sets_of(n, 0);
    size_t share_sets = 0;
    int64_t partial_out = 0;
    for (size_t i = 0; i < n; ++i) {
      first_share[i] = share_sets;
      if (ops[i].kind == ChainOp::kLinearInt8) {
        grain[i] = static_cast<uint64_t>(int8_row_grain(int8_args(ops[i]), t_count));
        share_sets_of[i] = 1;
      } else if (ops[i].kind == ChainOp::kLinear) {
        const int64_t panels = panel_count(ops[i]);
        const WeightMatrix panel0{ops[i].w.data, ops[i].w.dtype, ops[i].w.out_features, panels > 0 ? ops[i].w.panel_k : ops[i].w.in_features};
        grain[i] = static_cast<uint64_t>(gemv_grain(panel0, t_count));
        share_sets_of[i] = std::max<int64_t>(1, panels);
        if (panels > 0) partial_out = std::max(partial_out, ops[i].w.out_features);
      }
      share_sets += static_cast<size_t>(share_sets_of[i]);
    }
    std::unique_ptr<StreamShare[]> shares(new StreamShare[std::max<size_t>(1, share_sets) * static_cast<size_t>(t_count)]);
    for (size_t i = 0; i < n; ++i) {
      const int64_t rows = ops[i].kind == ChainOp::kLinearInt8 ? ops[i].q_out : ops[i].w.out_features;
      for (int64_t p = 0; p < share_sets_of[i]; ++p) init_stream_shares(&shares[(first_share[i] + static_cast<size_t>(p)) * t_count], t_count, rows);
    }
    // An int8 op's quantized activations, prepared by thread 0 and read by every thread (the
    // barrier after each op keeps the next int8 op from preparing over them while in use).
    Int8RowScratch* const int8_scratch = &int8_row_scratch();
    // Panels' running sums, as linear_panels keeps them: panel p's sum goes to one of y and this
    // buffer with the one before as its residual, so that the last lands in y.
    static thread_local std::vector<float> partial;
    if (static_cast<int64_t>(partial.size()) < partial_out) partial.resize(static_cast<size_t>(partial_out));
    float* const partial_base = partial.data();
    ChainBarrier barrier(t_count);
    pool.run([&](int t, int) {
      int phase = 0;
      for (size_t i = 0; i < n; ++i) {
        const ChainOp& op = ops[i];
        if (op.kind == ChainOp::kLayerNorm) {
          if (t == 0) layer_norm_row(op.y, op.x, op.cols, op.gamma, op.beta, op.eps);
        } else if (op.kind == ChainOp::kAttention) {
          const AttentionArgs& a = attn_args[i];
          const DecodePlan& plan = attn_plans[i];
          const uint64_t tasks = plan.tasks.size();
          for (uint64_t k; (k = counters[2 * i].range.fetch_add(1, std::memory_order_relaxed)) < tasks;)
            chain_attention_task(a, plan.tasks[k], part_base);
          if (!plan.merges.empty()) {
            barrier.wait(phase);
            const uint64_t heads = static_cast<uint64_t>(a.num_heads), merges = plan.merges.size() * heads;
            for (uint64_t k; (k = counters[2 * i + 1].range.fetch_add(1, std::memory_order_relaxed)) < merges;)
              chain_attention_merge(a, plan.merges[k / heads], static_cast<int>(k % heads), part_base);
          }
        } else if (op.kind == ChainOp::kLinearInt8) {
          const Int8LinearArgs a = int8_args(op);
          if (t == 0) int8_row_prepare(*int8_scratch, a);
          barrier.wait(phase);
          work_stream_shares(&shares[first_share[i] * t_count], t_count, t, grain[i], [&](int64_t b, int64_t e) { int8_row_part(*int8_scratch, a, b, e); });
        } else if (const int64_t panels = panel_count(op); panels > 0) {
          // linear_panels at one row: the panels in order, each a GEMV with the running sum as its
          // residual (a barrier between them: a row's next panel may fall to the other thread),
          // then bias, GELU and the op's residual over y. The same calls on the same ranges' values.
          const int64_t out = op.w.out_features, in = op.w.in_features, kc = op.w.panel_k;
          const int64_t es = static_cast<int64_t>(dtype_size(op.w.dtype));
          float* sums[2] = {op.y, partial_base};
          int target = static_cast<int>((panels - 1) & 1);
          const float* running = nullptr;
          for (int64_t p = 0; p < panels; ++p) {
            const int64_t k0 = p * kc;
            ChainOp part = op;
            part.y = sums[target], part.x = op.x + k0;
            part.w = WeightMatrix{static_cast<const char*>(op.w.data) + out * k0 * es, op.w.dtype, out, std::min(kc, in - k0)};
            part.bias = nullptr, part.epilogue = kNone, part.residual = running;
            work_stream_shares(&shares[(first_share[i] + static_cast<size_t>(p)) * t_count], t_count, t, grain[i], [&](int64_t b, int64_t e) { chain_gemv_part(part, b, e); });
            running = sums[target];
            target ^= 1;
            if (p + 1 < panels) barrier.wait(phase);
          }
          if (op.bias || op.epilogue != kNone || op.residual) {
            barrier.wait(phase);
            const int64_t b = out * t / t_count, e = out * (t + 1) / t_count;
            if (b < e) apply_epilogue_avx2(op.y, 1, out, b, e, op.bias, op.epilogue, op.residual);
          }
        } else {
          work_stream_shares(&shares[first_share[i] * t_count], t_count, t, grain[i], [&](int64_t b, int64_t e) { chain_gemv_part(op, b, e); });
        }
        if (i + 1 < n) barrier.wait(phase);  // the pool's join is the last one
      }
    });
    return true;
  }
#endif
  for (size_t i = 0; i < n; ++i) run_op(pool, ops[i], attn[i]);
  return false;
}

}  // namespace blossom
