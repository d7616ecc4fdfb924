// int8 linear layers: y (rows, out) = epilogue(x' (rows, in) @ dequant(W)^T + bias) + residual
//
// W is stored as int8 q (out, in) with one fp16 scale per group of `group_size` inputs (quant.h).
// x' is x itself (ActivationMode::Exact) or x quantized per token (Grouped, Mixed); see quant.h.
//
// Variants:
//   linear_int8_scalar   the reference: one dot product per output and group, fp32 accumulation, over
//                        x' materialised as fp32 (quantized activations are q_x * s_x).
//   int8 (AVX2)          Grouped/Mixed, any batch, with int32 sums per group and one FMA per group
//                        with s_w * s_x. Grouped: 16-bit activations times the int8 weights widened to
//                        int16 (vpmovsxbw, vpmaddwd). Mixed: 8-bit activations, vpmaddubsw(|w|, x with
//                        w's sign: the unsigned operand is |w| <= 128, so pairs cannot saturate), then
//                        vpmaddwd; the outlier features are added in fp32 from the row already in cache.
//                        Batch 1 streams one weight row at a time; larger batches go 4 rows at a time
//                        over chunks of outputs whose weight rows stay in L1/L2, so each weight byte is
//                        reused from cache (quant_tile.inc). This beats dequantizing
//                        (in registers, or into fp32 panels for matmul.cc's GEMM) at every batch size
//                        on the bloom-560m shapes: bench/int8.ts. Where the CPU has AVX-VNNI the same
//                        tiles use vpdpwssd / vpdpbusd (quant_tile.inc), with identical results.
//   gemv (AVX2)          rows <= 4, Exact: int8 weights widened to fp32 in registers, scaled per group,
//                        FMA with fp32 x (also the fallback when in_features is not a multiple of 32).
//   gemm (AVX2)          rows > 4, Exact: chunks of W dequantized to fp32 and run through matmul.cc's
//                        GEMM. Exact is no dtype's mode: the float fallback and a bench variant.
//
// Integer products are exact in fp32 (|q_x q_w| <= 127 * 128 and partial sums stay far below 2^24),
// so computing x' @ W^T in fp32 over quantized activations is the int8 matmul LLM.int8() describes,
// up to the rounding of the final scaling.
#include "quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "epilogue.h"
#include "simd.h"

namespace blossom {

uint16_t f32_to_f16_up(float f) {
  uint16_t h = f32_to_f16(f);
  // Positive finite values only: the next larger half is the next bit pattern.
  if (f > 0.f && f16_to_f32(h) < f && (h & 0x7c00u) != 0x7c00u) ++h;
  return h;
}

namespace {

template <DType D>
inline float load_weight(const void* base, int64_t i) {
  if constexpr (D == DType::F32) return static_cast<const float*>(base)[i];
  else if constexpr (D == DType::F16) return f16_to_f32(static_cast<const uint16_t*>(base)[i]);
  else return bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
}

inline int8_t quantize_value(float v, float scale) {
  // fmin/fmax also turn NaN into a bound instead of an undefined conversion.
  const float r = std::nearbyint(v / scale);
  return static_cast<int8_t>(std::fmax(-127.f, std::fmin(127.f, r)));
}

template <DType D>
void quantize_rows(int8_t* q, uint16_t* scales, const void* src, int64_t row_begin, int64_t row_end, int64_t in,
                   int64_t group) {
  const int64_t groups = (in + group - 1) / group;
  for (int64_t o = row_begin; o < row_end; ++o) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * group, k1 = std::min(in, k0 + group);
      float absmax = 0.f;
      bool nan = false;
      for (int64_t k = k0; k < k1; ++k) {
        const float a = std::fabs(load_weight<D>(src, o * in + k));
        nan |= std::isnan(a);
        absmax = std::fmax(absmax, a);
      }
      // A NaN weight gives its group a NaN scale (the loader refuses such a tensor by name) instead
      // of a clamped level that would hide it; an infinite one gives an infinite scale.
      const uint16_t sh = nan ? uint16_t{0x7e00} : f32_to_f16_up(absmax / 127.f);
      scales[o * groups + g] = sh;
      const float s = f16_to_f32(sh);
      int8_t* qr = q + o * in;
      if (!(s > 0.f) || !std::isfinite(s)) {
        for (int64_t k = k0; k < k1; ++k) qr[k] = 0;
        continue;
      }
      for (int64_t k = k0; k < k1; ++k) qr[k] = quantize_value(load_weight<D>(src, o * in + k), s);
    }
  }
}

// ---- activations ------------------------------------------------------------------------------
// Quantized activations, built once per call (rows * in work, small next to the matmul) and shared
// read-only by the workers. Scalar and AVX2 builds give bit-identical values: the same IEEE division,
// round-half-even and clamp.
struct Prepared {
  bool wide = false;                // Grouped: 16-bit values in x16; Mixed: 8-bit values in xq
  std::vector<int8_t> xq;           // Mixed (rows, in): outlier features are 0
  std::vector<int16_t> x16;         // Grouped (rows, in)
  std::vector<float> sx;            // activation scale per row and weight group (rows, groups)
  std::vector<float> xf;            // x' = value * sx, or x at outlier features (rows, in); float paths only
  std::vector<float> keep;          // Mixed: 0 at outlier features, 1 elsewhere (in)
  std::vector<int32_t> outliers;    // Mixed: outlier feature indices, ascending
  std::vector<int32_t> outlier_group;  // their weight groups
};

constexpr float kLevels8 = 127.f;
constexpr float kLevels16 = 32767.f;

Prepared& prepared_scratch() {
  static thread_local Prepared p;
  return p;
}

// Mixed: an input feature is an outlier if any token of this batch reaches the threshold.
void find_outliers(Prepared& p, const Int8LinearArgs& a) {
  const int64_t rows = a.rows, in = a.w.in_features;
  p.keep.assign(static_cast<size_t>(in), 1.f);
  p.outliers.clear();
  p.outlier_group.clear();
  if (!(a.threshold > 0.f) || !std::isfinite(a.threshold)) return;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < in; ++k)
      if (std::fabs(a.x[r * in + k]) >= a.threshold) p.keep[k] = 0.f;
  for (int64_t k = 0; k < in; ++k) {
    if (p.keep[k] == 0.f) {
      p.outliers.push_back(static_cast<int32_t>(k));
      p.outlier_group.push_back(static_cast<int32_t>(k / a.w.group_size));
    }
  }
}

inline int32_t quantize_level(float v, float scale, float levels) {
  const float r = std::nearbyint(v / scale);
  return static_cast<int32_t>(std::fmax(-levels, std::fmin(levels, r)));
}

// One row span [k0, k1): absmax (times keep), scale = absmax / levels, value = round(x * keep / scale),
// stored as 8-bit (xq) or 16-bit (x16) values; exactly one of the two is non-null.
float quantize_span_scalar(int8_t* xq, int16_t* x16, const float* x, const float* keep, int64_t k0, int64_t k1) {
  const float levels = x16 ? kLevels16 : kLevels8;
  float absmax = 0.f;
  bool nan = false;
  for (int64_t k = k0; k < k1; ++k) {
    const float v = std::fabs(x[k]) * (keep ? keep[k] : 1.f);
    nan |= std::isnan(v);
    absmax = std::fmax(absmax, v);
  }
  // A NaN activation makes the scale NaN, so the outputs it feeds are NaN too (as in fp32), not a
  // clamped level that would hide it.
  const float s = nan ? NAN : absmax / levels;
  for (int64_t k = k0; k < k1; ++k) {
    const int32_t v = s > 0.f ? quantize_level(x[k] * (keep ? keep[k] : 1.f), s, levels) : 0;
    if (x16) x16[k] = static_cast<int16_t>(v);
    else xq[k] = static_cast<int8_t>(v);
  }
  return s;
}

void fill_xf(Prepared& p, const Int8LinearArgs& a) {
  const int64_t rows = a.rows, in = a.w.in_features, G = a.w.group_size, groups = a.w.groups();
  p.xf.resize(static_cast<size_t>(rows * in));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < in; ++k) {
      const int64_t i = r * in + k;
      const bool outlier = a.mode == ActivationMode::Mixed && p.keep[k] == 0.f;
      const int32_t v = p.wide ? p.x16[i] : p.xq[i];
      p.xf[i] = outlier ? a.x[i] : static_cast<float>(v) * p.sx[r * groups + k / G];
    }
}

// quantize_span: the scalar or AVX2 span quantizer (bit-identical); rows are independent, so they run in parallel.
// Without a pool (a decode chain's op), the rows are quantized on the calling thread.
template <typename SpanFn>
void prepare_activations(ThreadPool* pool, Prepared& p, const Int8LinearArgs& a, SpanFn quantize_span) {
  const int64_t rows = a.rows, in = a.w.in_features, G = a.w.group_size, groups = a.w.groups();
  p.wide = a.mode == ActivationMode::Grouped;
  p.xq.resize(p.wide ? 0 : static_cast<size_t>(rows * in));
  p.x16.resize(p.wide ? static_cast<size_t>(rows * in) : 0);
  p.sx.resize(static_cast<size_t>(rows * groups));
  const float* keep = nullptr;
  if (a.mode == ActivationMode::Mixed) {
    find_outliers(p, a);
    if (!p.outliers.empty()) keep = p.keep.data();
  } else {
    p.outliers.clear();
    p.outlier_group.clear();
  }
  auto rows_range = [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      int8_t* xq = p.wide ? nullptr : p.xq.data() + r * in;
      int16_t* x16 = p.wide ? p.x16.data() + r * in : nullptr;
      const float* x = a.x + r * in;
      float* sx = p.sx.data() + r * groups;
      if (a.mode == ActivationMode::Grouped) {
        for (int64_t g = 0; g < groups; ++g) sx[g] = quantize_span(xq, x16, x, keep, g * G, std::min(in, (g + 1) * G));
      } else {  // per token
        const float s = quantize_span(xq, x16, x, keep, 0, in);
        for (int64_t g = 0; g < groups; ++g) sx[g] = s;
      }
    }
  };
  // A few rows (decoding) are quicker on the calling thread than a round trip through the pool.
  if (rows <= 8 || !pool) rows_range(0, rows);
  else pool->parallel_for(rows, 4, rows_range);
}

}  // namespace

void quantize_weights(ThreadPool& pool, int8_t* q, uint16_t* scales, const void* src, DType src_dtype, int64_t out,
                      int64_t in, int64_t group_size) {
  pool.parallel_for(out, 64, [&](int64_t b, int64_t e) {
    switch (src_dtype) {
      case DType::F32: quantize_rows<DType::F32>(q, scales, src, b, e, in, group_size); break;
      case DType::F16: quantize_rows<DType::F16>(q, scales, src, b, e, in, group_size); break;
      case DType::BF16: quantize_rows<DType::BF16>(q, scales, src, b, e, in, group_size); break;
      case DType::I8: break;  // rejected by the caller
    }
  });
}

int64_t linear_int8_scalar(ThreadPool& pool, const Int8LinearArgs& a) {
  const QuantWeights& w = a.w;
  const int64_t in = w.in_features, out = w.out_features, G = w.group_size, groups = w.groups();
  const float* xs = a.x;
  Prepared* p = nullptr;
  if (a.mode != ActivationMode::Exact) {
    p = &prepared_scratch();
    prepare_activations(&pool, *p, a, quantize_span_scalar);
    fill_xf(*p, a);
    xs = p->xf.data();
  }
  pool.parallel_for(out, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const int8_t* qr = w.q + o * in;
      for (int64_t r = 0; r < a.rows; ++r) {
        const float* xr = xs + r * in;
        float acc = 0.f;
        for (int64_t g = 0; g < groups; ++g) {
          float part = 0.f;
          for (int64_t k = g * G; k < std::min(in, (g + 1) * G); ++k) part += xr[k] * static_cast<float>(qr[k]);
          acc += f16_to_f32(w.scales[o * groups + g]) * part;
        }
        a.y[r * out + o] = acc;
      }
    }
    apply_epilogue_scalar(a.y, a.rows, out, begin, end, a.bias, a.epilogue, a.residual);
  });
  return p ? static_cast<int64_t>(p->outliers.size()) : 0;
}

void embedding_int8(ThreadPool& pool, float* y, const int32_t* ids, int64_t n, const QuantWeights& t) {
  const int64_t hidden = t.in_features, G = t.group_size, groups = t.groups();
  pool.parallel_for(n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = ids[i];
      for (int64_t g = 0; g < groups; ++g) {
        const float s = f16_to_f32(t.scales[row * groups + g]);
        for (int64_t k = g * G; k < std::min(hidden, (g + 1) * G); ++k)
          y[i * hidden + k] = static_cast<float>(t.q[row * hidden + k]) * s;
      }
    }
  });
}

#if defined(__x86_64__)
namespace {

using namespace simd;

constexpr int64_t kGemvMaxRows = 4;

BLOSSOM_AVX2_INLINE __m256 widen8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

BLOSSOM_AVX2_INLINE float scale_at(const uint16_t* scales, int64_t i) { return _cvtsh_ss(scales[i]); }

// --- gemv, float: R rows of fp32 x' against 4 int8 weight rows at a time --------------------------
template <int R>
BLOSSOM_AVX2 void gemv_float_block(float* y, const float* x, const QuantWeights& w, int64_t o_begin, int64_t o_end) {
  const int64_t in = w.in_features, out = w.out_features, G = w.group_size, groups = w.groups();
  int64_t o = o_begin;
  for (; o + 4 <= o_end; o += 4) {
    __m256 acc[R][4];
    float tail[R][4] = {};
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
    const int8_t* w0 = w.q + (o + 0) * in;
    const int8_t* w1 = w.q + (o + 1) * in;
    const int8_t* w2 = w.q + (o + 2) * in;
    const int8_t* w3 = w.q + (o + 3) * in;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * G, k1 = std::min(in, k0 + G);
      const float f0 = scale_at(w.scales, (o + 0) * groups + g), f1 = scale_at(w.scales, (o + 1) * groups + g);
      const float f2 = scale_at(w.scales, (o + 2) * groups + g), f3 = scale_at(w.scales, (o + 3) * groups + g);
      const __m256 s0 = _mm256_set1_ps(f0), s1 = _mm256_set1_ps(f1), s2 = _mm256_set1_ps(f2), s3 = _mm256_set1_ps(f3);
      int64_t k = k0;
      for (; k + 8 <= k1; k += 8) {
        const __m256 a0 = _mm256_mul_ps(widen8(w0 + k), s0), a1 = _mm256_mul_ps(widen8(w1 + k), s1);
        const __m256 a2 = _mm256_mul_ps(widen8(w2 + k), s2), a3 = _mm256_mul_ps(widen8(w3 + k), s3);
        for (int r = 0; r < R; ++r) {
          const __m256 xv = _mm256_loadu_ps(x + r * in + k);
          acc[r][0] = _mm256_fmadd_ps(a0, xv, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(a1, xv, acc[r][1]);
          acc[r][2] = _mm256_fmadd_ps(a2, xv, acc[r][2]);
          acc[r][3] = _mm256_fmadd_ps(a3, xv, acc[r][3]);
        }
      }
      for (; k < k1; ++k) {
        for (int r = 0; r < R; ++r) {
          const float xv = x[r * in + k];
          tail[r][0] += xv * w0[k] * f0;
          tail[r][1] += xv * w1[k] * f1;
          tail[r][2] += xv * w2[k] * f2;
          tail[r][3] += xv * w3[k] * f3;
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) y[r * out + o + j] = hsum(acc[r][j]) + tail[r][j];
  }
  for (; o < o_end; ++o) {
    const int8_t* wr = w.q + o * in;
    for (int r = 0; r < R; ++r) {
      __m256 acc = _mm256_setzero_ps();
      float tail = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t k0 = g * G, k1 = std::min(in, k0 + G);
        const float f = scale_at(w.scales, o * groups + g);
        const __m256 s = _mm256_set1_ps(f);
        int64_t k = k0;
        for (; k + 8 <= k1; k += 8) acc = _mm256_fmadd_ps(_mm256_mul_ps(widen8(wr + k), s), _mm256_loadu_ps(x + r * in + k), acc);
        for (; k < k1; ++k) tail += x[r * in + k] * wr[k] * f;
      }
      y[r * out + o] = hsum(acc) + tail;
    }
  }
}

BLOSSOM_AVX2 void gemv_float(float* y, const float* x, int64_t rows, const QuantWeights& w, int64_t b, int64_t e) {
  switch (rows) {
    case 1: gemv_float_block<1>(y, x, w, b, e); break;
    case 2: gemv_float_block<2>(y, x, w, b, e); break;
    case 3: gemv_float_block<3>(y, x, w, b, e); break;
    default: gemv_float_block<4>(y, x, w, b, e); break;
  }
}

// --- int8 weights x quantized activations: R rows against NO weight rows at a time ----------------
// Needs group_size and in_features to be multiples of 32 (one step covers 32 inputs).
//   WIDE (Grouped): weights widened to int16 (vpmovsxbw), times 16-bit activations with vpmaddwd.
//   else (Mixed):   8-bit activations: vpmaddubsw(|w|, sign(x, w)), then vpmaddwd with ones.
// Several outputs per tile share the activation loads and one horizontal reduction; per-output fixed
// costs matter at batch 1, where the LM head alone has 250880 outputs of 1024 inputs.
// Software prefetch distance for the weight stream. int8 rows are short (1 KiB at hidden 1024), so a
// tile reads several short streams inside one page and the hardware prefetcher barely ramps up;
// prefetching 16 KiB ahead took the bloom-560m shapes from ~0.61 to ~0.45 of bf16's time at batch 1.
constexpr int64_t kPrefetchBytes = 16384;
// Batch 1 reads one row at a time, a single stream like the bf16 GEMV's. With each thread streaming
// a contiguous share, 6 KiB ahead beat 8 KiB in 6 of 8 alternating runs (~2 % per decode step, as
// for the bf16 GEMV); 4 KiB was no better than 6.
constexpr int64_t kRowPrefetchBytes = 6144;

#define BLOSSOM_TILE BLOSSOM_AVX2
namespace tile_avx2 {
BLOSSOM_AVX2_INLINE __m256i dot16(__m256i acc, __m256i w0, __m256i a0, __m256i w1, __m256i a1) {
  return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(w0, a0), _mm256_madd_epi16(w1, a1)));
}
BLOSSOM_AVX2_INLINE __m256i dot16x1(__m256i acc, __m256i w, __m256i a) { return _mm256_add_epi32(acc, _mm256_madd_epi16(w, a)); }
// u = |w| <= 128, so vpmaddubsw's pairs (at most 2 * 128 * 127) cannot saturate.
BLOSSOM_AVX2_INLINE __m256i dot8(__m256i acc, __m256i u, __m256i s) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
#include "quant_tile.inc"
}  // namespace tile_avx2
#undef BLOSSOM_TILE

#define BLOSSOM_VNNI __attribute__((target("avx2,fma,f16c,avxvnni")))
#define BLOSSOM_TILE BLOSSOM_VNNI
namespace tile_vnni {
BLOSSOM_VNNI inline __m256i dot16(__m256i acc, __m256i w0, __m256i a0, __m256i w1, __m256i a1) {
  return _mm256_dpwssd_avx_epi32(_mm256_dpwssd_avx_epi32(acc, w0, a0), w1, a1);
}
BLOSSOM_VNNI inline __m256i dot16x1(__m256i acc, __m256i w, __m256i a) { return _mm256_dpwssd_avx_epi32(acc, w, a); }
BLOSSOM_VNNI inline __m256i dot8(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
#include "quant_tile.inc"
}  // namespace tile_vnni
#undef BLOSSOM_TILE

// Vectorised quantize_span_scalar, bit-identical to it.
BLOSSOM_AVX2 float quantize_span_avx2(int8_t* xq, int16_t* x16, const float* x, const float* keep, int64_t k0, int64_t k1) {
  const float levels = x16 ? kLevels16 : kLevels8;
  const __m256 sign_mask = _mm256_set1_ps(-0.f);
  __m256 vmax = _mm256_setzero_ps(), vnan = _mm256_setzero_ps();
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) {
    __m256 v = _mm256_andnot_ps(sign_mask, _mm256_loadu_ps(x + k));
    if (keep) v = _mm256_mul_ps(v, _mm256_loadu_ps(keep + k));
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    vmax = _mm256_max_ps(vmax, v);
  }
  float absmax = hmax(vmax);
  bool nan = _mm256_movemask_ps(vnan) != 0;
  for (; k < k1; ++k) {
    const float v = std::fabs(x[k]) * (keep ? keep[k] : 1.f);
    nan |= std::isnan(v);
    absmax = std::fmax(absmax, v);
  }
  const float s = nan ? NAN : absmax / levels;  // as quantize_span_scalar
  if (!(s > 0.f)) {
    if (x16) std::memset(x16 + k0, 0, static_cast<size_t>(k1 - k0) * 2);
    else std::memset(xq + k0, 0, static_cast<size_t>(k1 - k0));
    return s;
  }
  const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-levels), hi = _mm256_set1_ps(levels);
  k = k0;
  for (; k + 8 <= k1; k += 8) {
    __m256 v = _mm256_loadu_ps(x + k);
    if (keep) v = _mm256_mul_ps(v, _mm256_loadu_ps(keep + k));
    v = _mm256_round_ps(_mm256_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i i32 = _mm256_cvtps_epi32(_mm256_max_ps(lo, _mm256_min_ps(hi, v)));
    // 8 int32 within +-levels -> 8 int16 (-> 8 int8).
    const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    if (x16) _mm_storeu_si128(reinterpret_cast<__m128i*>(x16 + k), i16);
    else _mm_storel_epi64(reinterpret_cast<__m128i*>(xq + k), _mm_packs_epi16(i16, i16));
  }
  for (; k < k1; ++k) {
    const int32_t v = quantize_level(x[k] * (keep ? keep[k] : 1.f), s, levels);
    if (x16) x16[k] = static_cast<int16_t>(v);
    else xq[k] = static_cast<int8_t>(v);
  }
  return s;
}

// Outputs per chunk handed to a thread: contiguous runs of weight rows long enough for the hardware
// prefetchers to ramp up (chunks of 32 rows alternating between the two cores cut the LM head's
// stream into 32 KiB pieces and ran 2 threads no faster than one), short enough that both threads
// finish together and, with several row blocks, that the chunk is reused from L2.
int64_t output_chunk(int threads, int64_t rows, int64_t in, int64_t out) {
  const int64_t bytes = rows <= 4 ? (int64_t{1} << 20) : (int64_t{256} << 10);
  int64_t chunk = std::max<int64_t>(32, bytes / std::max<int64_t>(1, in) / 32 * 32);
  const int64_t balanced = std::max<int64_t>(32, out / (4 * threads) / 32 * 32);
  return std::min(chunk, balanced);
}
int64_t output_chunk(const ThreadPool& pool, int64_t rows, int64_t in, int64_t out) { return output_chunk(pool.size(), rows, in, out); }

// --- Exact mode at more than kGemvMaxRows rows: the fp32 GEMM of matmul.cc over dequantized chunks --
// Exact (fp32 activations) is no dtype's mode, only the float fallback and a bench variant; the
// integer tiles above beat this at every batch size for Grouped and Mixed (bench/int8.ts: at batch
// 16-64, 1.2x bf16's time against 1.4-2.2x here). W is dequantized a chunk of output rows at a time
// into a buffer that stays in L3, and the chunk goes through linear_avx2 as an fp32 matrix.
constexpr int64_t kDequantChunkBytes = 8 << 20;

BLOSSOM_AVX2 void dequantize_rows(float* dst, const QuantWeights& w, int64_t o_begin, int64_t o_end) {
  const int64_t in = w.in_features, G = w.group_size, groups = w.groups();
  for (int64_t o = o_begin; o < o_end; ++o) {
    const int8_t* src = w.q + o * in;
    const uint16_t* sr = w.scales + o * groups;
    float* d = dst + (o - o_begin) * in;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * G, k1 = std::min(in, k0 + G);
      const float f = scale_at(sr, g);
      const __m256 s = _mm256_set1_ps(f);
      int64_t k = k0;
      for (; k + 8 <= k1; k += 8) _mm256_storeu_ps(d + k, _mm256_mul_ps(widen8(src + k), s));
      for (; k < k1; ++k) d[k] = static_cast<float>(src[k]) * f;
    }
  }
}

void dequantized_gemm(ThreadPool& pool, float* y, const float* x, int64_t rows, const QuantWeights& w, const float* bias,
                      int epilogue, const float* residual) {
  const int64_t in = w.in_features, out = w.out_features;
  const int64_t chunk = std::min(out, std::max<int64_t>(64, kDequantChunkBytes / (4 * in)));
  // The caller's buffers (thread_local: the pool's threads must see these, not their own, so they
  // are passed to the lambdas as plain pointers).
  static thread_local std::vector<float> weights_buffer, part_buffer;
  weights_buffer.resize(static_cast<size_t>(chunk * in));
  part_buffer.resize(static_cast<size_t>(rows * chunk));
  float* weights = weights_buffer.data();
  float* part = part_buffer.data();
  for (int64_t o0 = 0; o0 < out; o0 += chunk) {
    const int64_t c = std::min(chunk, out - o0);
    pool.parallel_for(c, 16, [&](int64_t b, int64_t e) { dequantize_rows(weights + b * in, w, o0 + b, o0 + e); });
    const WeightMatrix dense{weights, DType::F32, c, in};
    linear_avx2(pool, part, x, rows, dense, nullptr, kNone, nullptr);
    pool.parallel_for(rows, 16, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) std::memcpy(y + r * out + o0, part + r * c, sizeof(float) * c);
    });
  }
  pool.parallel_for(out, 256, [&](int64_t b, int64_t e) { apply_epilogue_avx2(y, rows, out, b, e, bias, epilogue, residual); });
  if (weights_buffer.size() > static_cast<size_t>(kDequantChunkBytes / 4)) weights_buffer = {};  // after a long-row matrix
}

}  // namespace

namespace {

// Many outliers (a low threshold) would make the per-output fp32 loop dominate: the float path
// computes the same x' @ W^T with the outliers folded into x'.
bool int8_tiles_apply(const Prepared& p, const QuantWeights& w) {
  const bool few_outliers = static_cast<int64_t>(p.outliers.size()) * 16 <= w.in_features;
  return few_outliers && w.group_size % 32 == 0 && w.in_features % 32 == 0;
}

// Outputs [begin, end) of every row through the integer tiles, then their epilogue.
void int8_tiles_range(const Prepared& p, const Int8LinearArgs& a, int64_t begin, int64_t end) {
  if (use_avx_vnni()) {
    if (p.wide) tile_vnni::int8_rows<true>(a.y, p, a.x, a.rows, a.w, begin, end);
    else tile_vnni::int8_rows<false>(a.y, p, a.x, a.rows, a.w, begin, end);
  } else {
    if (p.wide) tile_avx2::int8_rows<true>(a.y, p, a.x, a.rows, a.w, begin, end);
    else tile_avx2::int8_rows<false>(a.y, p, a.x, a.rows, a.w, begin, end);
  }
  apply_epilogue_avx2(a.y, a.rows, a.w.out_features, begin, end, a.bias, a.epilogue, a.residual);
}

// Outputs [begin, end) of at most kGemvMaxRows rows of fp32 x against the weights dequantized in registers.
void float_rows_range(const Int8LinearArgs& a, const float* x, int64_t begin, int64_t end) {
  gemv_float(a.y, x, a.rows, a.w, begin, end);
  apply_epilogue_avx2(a.y, a.rows, a.w.out_features, begin, end, a.bias, a.epilogue, a.residual);
}

}  // namespace

struct Int8RowScratch {
  Prepared p;
  bool tiles = false;  // the integer tiles; else the float path over p.xf (or x, Exact)
};

Int8RowScratch& int8_row_scratch() {
  static thread_local Int8RowScratch s;
  return s;
}

void int8_row_prepare(Int8RowScratch& s, const Int8LinearArgs& a) {
  s.tiles = false;
  if (a.mode == ActivationMode::Exact) return;
  prepare_activations(nullptr, s.p, a, quantize_span_avx2);
  s.tiles = int8_tiles_apply(s.p, a.w);
  if (!s.tiles) fill_xf(s.p, a);
}

void int8_row_part(const Int8RowScratch& s, const Int8LinearArgs& a, int64_t begin, int64_t end) {
  if (s.tiles) int8_tiles_range(s.p, a, begin, end);
  else float_rows_range(a, a.mode == ActivationMode::Exact ? a.x : s.p.xf.data(), begin, end);
}

int64_t int8_row_grain(const Int8LinearArgs& a, int threads) { return output_chunk(threads, 1, a.w.in_features, a.w.out_features); }

int64_t linear_int8_avx2(ThreadPool& pool, const Int8LinearArgs& a) {
  const QuantWeights& w = a.w;
  const int64_t out = w.out_features;
  if (a.mode != ActivationMode::Exact) {
    Prepared& p = prepared_scratch();
    prepare_activations(&pool, p, a, quantize_span_avx2);
    if (int8_tiles_apply(p, w)) {
      // Chunks of outputs whose weight rows are reused from cache by every block of 4 rows.
      auto body = [&](int64_t begin, int64_t end) { int8_tiles_range(p, a, begin, end); };
      // Up to 4 rows the kernels stream the weights (bandwidth-bound): each thread keeps to one
      // contiguous run of rows; beyond, chunks are handed out in any order.
      const int64_t chunk = output_chunk(pool, a.rows, w.in_features, out);
      if (a.rows <= 4) pool.parallel_streams(out, chunk, body);
      else pool.parallel_for(out, chunk, body);
      return static_cast<int64_t>(p.outliers.size());
    }
    // Shapes the 32-wide int8 path cannot tile: the same x', dequantized, through the float paths.
    fill_xf(p, a);
    Int8LinearArgs f = a;
    f.x = p.xf.data();
    f.mode = ActivationMode::Exact;
    linear_int8_avx2(pool, f);
    return static_cast<int64_t>(p.outliers.size());
  }
  if (a.rows <= kGemvMaxRows) {
    pool.parallel_for(out, output_chunk(pool, a.rows, w.in_features, out), [&](int64_t begin, int64_t end) { float_rows_range(a, a.x, begin, end); });
  } else {
    dequantized_gemm(pool, a.y, a.x, a.rows, w, a.bias, a.epilogue, a.residual);
  }
  return 0;
}
#else
int64_t linear_int8_avx2(ThreadPool& pool, const Int8LinearArgs& a) { return linear_int8_scalar(pool, a); }
#endif

int64_t linear_int8(ThreadPool& pool, const Int8LinearArgs& a) {
  if (active_variant() == Variant::Avx2) return linear_int8_avx2(pool, a);
  return linear_int8_scalar(pool, a);
}

}  // namespace blossom
