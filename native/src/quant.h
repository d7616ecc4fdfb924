// int8 weights: group-wise symmetric quantization and the linear layers that use it.
// Kernels know shapes and dtypes, never BLOOM. See quant.cc for the variants and why.
#pragma once
#include <cstdint>

#include "kernels.h"

namespace blossom {

// W (out, in) ~= q[o, k] * scale[o, k / group_size]: int8 values in [-127, 127] row-major, one fp16
// scale per `group_size` consecutive inputs of a row (the last group of a row may be shorter).
// group_size >= in_features means one scale per row (LLM.int8's vector-wise weights).
struct QuantWeights {
  const int8_t* q;
  const uint16_t* scales;  // fp16 bits, (out_features, groups())
  int64_t out_features;
  int64_t in_features;
  int64_t group_size;
  int64_t groups() const { return (in_features + group_size - 1) / group_size; }
};

// What happens to the activations x before they meet the int8 weights.
enum class ActivationMode : int {
  // x stays fp32; weights are dequantized in registers (weight-only int8).
  Exact = 0,
  // x is quantized per token and per group of group_size inputs to 16 bits (absmax / 32767), so the
  // kernels multiply integers (vpmaddwd against the int8 weights widened to int16) at close to fp32
  // activation precision (8-bit activations cost measurable accuracy; bench/int8.ts quality).
  Grouped = 1,
  // LLM.int8() (Dettmers et al. 2022): input features where any token's |x| >= threshold are outliers,
  // kept in fp32 and multiplied by the dequantized weight columns; every other feature is quantized per
  // token (absmax over the non-outlier features / 127) and multiplied in int8.
  Mixed = 2,
};

struct Int8LinearArgs {
  float* y;               // (rows, out)
  const float* x;         // (rows, in)
  int64_t rows;
  QuantWeights w;
  const float* bias;      // (out) or null
  int epilogue;           // Epilogue (kernels.h)
  const float* residual;  // (rows, out) or null; y may not alias it
  ActivationMode mode;
  float threshold;        // Mixed only; <= 0 or inf disables the decomposition
};

// Quantizes W (out, in) of dtype F32/F16/BF16 into q and fp16 scales: per group, scale = absmax / 127
// rounded up to fp16 (so no value clips), q = round_half_even(w / scale). Deterministic and identical in
// every variant (the values are the checkpoint format).
void quantize_weights(ThreadPool& pool, int8_t* q, uint16_t* scales, const void* src, DType src_dtype, int64_t out,
                      int64_t in, int64_t group_size);

// y = epilogue(x' @ dequant(W)^T + bias) + residual, where x' is x under `mode` (see ActivationMode).
// Returns the number of outlier features found (Mixed), else 0.
int64_t linear_int8(ThreadPool& pool, const Int8LinearArgs& a);
int64_t linear_int8_scalar(ThreadPool& pool, const Int8LinearArgs& a);
int64_t linear_int8_avx2(ThreadPool& pool, const Int8LinearArgs& a);

// One row of linear_int8 as an op of a decode chain (run_chain, matmul.cc): int8_row_prepare, on one
// thread, quantizes the row's activations into `s` (Grouped, Mixed) and picks the path linear_int8
// would take; then int8_row_part(b, e), on any thread, computes outputs [b, e) and their epilogue.
// The same bits as linear_int8 at one row (AVX2 only: a chain runs int8 ops only with those kernels).
struct Int8RowScratch;
// The calling thread's scratch (reused across calls).
Int8RowScratch& int8_row_scratch();
void int8_row_prepare(Int8RowScratch& s, const Int8LinearArgs& a);
void int8_row_part(const Int8RowScratch& s, const Int8LinearArgs& a, int64_t begin, int64_t end);
// Outputs a thread claims at a time, as linear_int8 hands them out at one row.
int64_t int8_row_grain(const Int8LinearArgs& a, int threads);

// y (n, hidden) = dequant(table)[ids]; table is (vocab, hidden).
void embedding_int8(ThreadPool& pool, float* y, const int32_t* ids, int64_t n, const QuantWeights& table);

// fp32 -> fp16 bits, rounded towards +inf in magnitude (a scale never shrinks below absmax / 127).
uint16_t f32_to_f16_up(float f);

}  // namespace blossom
