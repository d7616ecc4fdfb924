// linear: y (rows, out) = epilogue(x (rows, in) @ W^T + bias) + residual
//
// Three variants:
//   linear_scalar   the reference: one dot product per output, fp32 accumulation.
//   gemv (AVX2)     rows <= kGemvMaxRows: decode. Bound by memory bandwidth: every weight is read
//                   once per call, converted to fp32 in registers, and used for all rows of x.
//   gemm (AVX2)     larger batches: bound by FMA throughput. Weight panels of 16 outputs are
//                   converted once into an fp32 buffer that stays in L1/L2 and reused for every
//                   6-row block of x by a 6x16 register-tile microkernel.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace blossom {

namespace {

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

}  // namespace

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

constexpr int64_t kGemvMaxRows = 4;

// --- epilogue, vectorised over a column range ---------------------------------------------
BLOSSOM_AVX2 void apply_epilogue_avx2(float* y, int64_t rows, int64_t out, int64_t c0, int64_t c1, const float* bias,
                                      int epilogue, const float* residual) {
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = y + r * out;
    const float* rr = residual ? residual + r * out : nullptr;
    int64_t o = c0;
    for (; o + 8 <= c1; o += 8) {
      __m256 v = _mm256_loadu_ps(yr + o);
      if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + o));
      if (epilogue == kGelu) v = gelu8(v);
      if (rr) v = _mm256_add_ps(v, _mm256_loadu_ps(rr + o));
      _mm256_storeu_ps(yr + o, v);
    }
    for (; o < c1; ++o) {
      float v = yr[o] + (bias ? bias[o] : 0.f);
      if (epilogue == kGelu) v = gelu_tanh(v);
      if (rr) v += rr[o];
      yr[o] = v;
    }
  }
}

// --- gemv: R rows of x against 4 weight rows at a time -------------------------------------
template <DType D, int R>
BLOSSOM_AVX2 void gemv_block(float* y, const float* x, const WeightMatrix& w, int64_t o_begin, int64_t o_end) {
  const int64_t in = w.in_features, out = w.out_features;
  const size_t es = dtype_size(D);
  const char* base = static_cast<const char*>(w.data);
  const int64_t in8 = in & ~int64_t(7);
  int64_t o = o_begin;
  for (; o + 4 <= o_end; o += 4) {
    __m256 acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
    const char* w0 = base + (o + 0) * in * es;
    const char* w1 = base + (o + 1) * in * es;
    const char* w2 = base + (o + 2) * in * es;
    const char* w3 = base + (o + 3) * in * es;
    for (int64_t k = 0; k < in8; k += 8) {
      __m256 a0 = load8<D>(w0 + k * es), a1 = load8<D>(w1 + k * es);
      __m256 a2 = load8<D>(w2 + k * es), a3 = load8<D>(w3 + k * es);
      for (int r = 0; r < R; ++r) {
        __m256 xv = _mm256_loadu_ps(x + r * in + k);
        acc[r][0] = _mm256_fmadd_ps(a0, xv, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(a1, xv, acc[r][1]);
        acc[r][2] = _mm256_fmadd_ps(a2, xv, acc[r][2]);
        acc[r][3] = _mm256_fmadd_ps(a3, xv, acc[r][3]);
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < 4; ++j) {
        float s = hsum(acc[r][j]);
        for (int64_t k = in8; k < in; ++k) s += x[r * in + k] * load_as_f32(w.data, D, (o + j) * in + k);
        y[r * out + o + j] = s;
      }
    }
  }
  for (; o < o_end; ++o) {
    const char* wr = base + o * in * es;
    for (int r = 0; r < R; ++r) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t k = 0; k < in8; k += 8) acc = _mm256_fmadd_ps(load8<D>(wr + k * es), _mm256_loadu_ps(x + r * in + k), acc);
      float s = hsum(acc);
      for (int64_t k = in8; k < in; ++k) s += x[r * in + k] * load_as_f32(w.data, D, o * in + k);
      y[r * out + o] = s;
    }
  }
}

template <DType D>
BLOSSOM_AVX2 void gemv_range(float* y, const float* x, int64_t rows, const WeightMatrix& w, int64_t o_begin, int64_t o_end) {
  switch (rows) {
    case 1: gemv_block<D, 1>(y, x, w, o_begin, o_end); break;
    case 2: gemv_block<D, 2>(y, x, w, o_begin, o_end); break;
    case 3: gemv_block<D, 3>(y, x, w, o_begin, o_end); break;
    default: gemv_block<D, 4>(y, x, w, o_begin, o_end); break;
  }
}

// --- gemm ---------------------------------------------------------------------------------
constexpr int MR = 6;      // rows of x per microkernel tile
constexpr int NR = 16;     // outputs per tile (two ymm)
constexpr int64_t KC = 256;  // depth of one packed panel
constexpr int64_t NB = 64;   // outputs per parallel task (4 panels)

// Packs W[o0 : o0+NR, k0 : k0+kc] as fp32 [kc][NR]; outputs past `out` are zero.
template <DType D>
BLOSSOM_AVX2 void pack_panel(float* dst, const WeightMatrix& w, int64_t o0, int64_t k0, int64_t kc) {
  const int64_t in = w.in_features;
  const size_t es = dtype_size(D);
  const char* base = static_cast<const char*>(w.data);
  const int64_t valid = std::min<int64_t>(NR, w.out_features - o0);
  if (valid < NR) std::fill(dst, dst + kc * NR, 0.f);
  const int64_t kc8 = kc & ~int64_t(7);
  for (int64_t j = 0; j < valid; ++j) {
    const char* src = base + ((o0 + j) * in + k0) * es;
    int64_t k = 0;
    for (; k < kc8; k += 8) {
      // Transpose-on-store: 8 consecutive k of one output go to stride NR.
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, load8<D>(src + k * es));
      for (int t = 0; t < 8; ++t) dst[(k + t) * NR + j] = tmp[t];
    }
    for (; k < kc; ++k) dst[k * NR + j] = load_as_f32(w.data, D, (o0 + j) * in + k0 + k);
  }
}

// C tile (m x NR, leading dimension ldc) (+)= A rows (m x kc, leading dimension lda) @ B panel (kc x NR).
template <int M>
BLOSSOM_AVX2 void micro_kernel(float* c, int64_t ldc, const float* a, int64_t lda, const float* b, int64_t kc,
                               bool accumulate, int ncols) {
  __m256 acc[M][2];
  for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    __m256 b0 = _mm256_load_ps(b + k * NR);
    __m256 b1 = _mm256_load_ps(b + k * NR + 8);
    for (int i = 0; i < M; ++i) {
      __m256 av = _mm256_broadcast_ss(a + i * lda + k);
      acc[i][0] = _mm256_fmadd_ps(av, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(av, b1, acc[i][1]);
    }
  }
  if (ncols == NR) {
    for (int i = 0; i < M; ++i) {
      float* ci = c + i * ldc;
      if (accumulate) {
        acc[i][0] = _mm256_add_ps(acc[i][0], _mm256_loadu_ps(ci));
        acc[i][1] = _mm256_add_ps(acc[i][1], _mm256_loadu_ps(ci + 8));
      }
      _mm256_storeu_ps(ci, acc[i][0]);
      _mm256_storeu_ps(ci + 8, acc[i][1]);
    }
  } else {
    alignas(32) float tmp[NR];
    for (int i = 0; i < M; ++i) {
      _mm256_store_ps(tmp, acc[i][0]);
      _mm256_store_ps(tmp + 8, acc[i][1]);
      float* ci = c + i * ldc;
      for (int j = 0; j < ncols; ++j) ci[j] = accumulate ? ci[j] + tmp[j] : tmp[j];
    }
  }
}

BLOSSOM_AVX2 void micro_dispatch(int m, float* c, int64_t ldc, const float* a, int64_t lda, const float* b, int64_t kc,
                                 bool accumulate, int ncols) {
  switch (m) {
    case 6: micro_kernel<6>(c, ldc, a, lda, b, kc, accumulate, ncols); break;
    case 5: micro_kernel<5>(c, ldc, a, lda, b, kc, accumulate, ncols); break;
    case 4: micro_kernel<4>(c, ldc, a, lda, b, kc, accumulate, ncols); break;
    case 3: micro_kernel<3>(c, ldc, a, lda, b, kc, accumulate, ncols); break;
    case 2: micro_kernel<2>(c, ldc, a, lda, b, kc, accumulate, ncols); break;
    default: micro_kernel<1>(c, ldc, a, lda, b, kc, accumulate, ncols); break;
  }
}

// One task: outputs [o_begin, o_end) for all rows.
template <DType D>
BLOSSOM_AVX2 void gemm_task(float* y, const float* x, int64_t rows, const WeightMatrix& w, int64_t o_begin,
                            int64_t o_end, float* panel) {
  const int64_t in = w.in_features, out = w.out_features;
  for (int64_t k0 = 0; k0 < in; k0 += KC) {
    const int64_t kc = std::min(KC, in - k0);
    for (int64_t o0 = o_begin; o0 < o_end; o0 += NR) {
      pack_panel<D>(panel, w, o0, k0, kc);
      const int ncols = static_cast<int>(std::min<int64_t>(NR, o_end - o0));
      for (int64_t r0 = 0; r0 < rows; r0 += MR) {
        const int m = static_cast<int>(std::min<int64_t>(MR, rows - r0));
        micro_dispatch(m, y + r0 * out + o0, out, x + r0 * in + k0, in, panel, kc, k0 > 0, ncols);
      }
    }
  }
}

template <DType D>
void linear_avx2_typed(ThreadPool& pool, float* y, const float* x, int64_t rows, const WeightMatrix& w,
                       const float* bias, int epilogue, const float* residual) {
  const int64_t out = w.out_features;
  if (rows <= kGemvMaxRows) {
    // Chunks of 32 outputs, handed out dynamically so both cores finish together.
    pool.parallel_for(out, 32, [&](int64_t begin, int64_t end) {
      gemv_range<D>(y, x, rows, w, begin, end);
      apply_epilogue_avx2(y, rows, out, begin, end, bias, epilogue, residual);
    });
    return;
  }
  pool.parallel_for(out, NB, [&](int64_t begin, int64_t end) {
    alignas(64) static thread_local float panel[KC * NR];
    gemm_task<D>(y, x, rows, w, begin, end, panel);
    apply_epilogue_avx2(y, rows, out, begin, end, bias, epilogue, residual);
  });
}

}  // namespace

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
void linear_avx2(ThreadPool& pool, float* y, const float* x, int64_t rows, const WeightMatrix& w, const float* bias,
                 int epilogue, const float* residual) {
  linear_scalar(pool, y, x, rows, w, bias, epilogue, residual);
}
#endif

void linear(ThreadPool& pool, float* y, const float* x, int64_t rows, const WeightMatrix& w, const float* bias,
            int epilogue, const float* residual) {
  if (active_variant() == Variant::Avx2) linear_avx2(pool, y, x, rows, w, bias, epilogue, residual);
  else linear_scalar(pool, y, x, rows, w, bias, epilogue, residual);
}

}  // namespace blossom
