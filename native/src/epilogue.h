// The epilogue of a linear layer over columns [c0, c1) of y (rows, out), in place:
// y = epilogue(y + bias) + residual, with bias (out) and residual (rows, out) optional.
// Defined in matmul.cc and shared by every kernel that produces y (matmul.cc, quant.cc). The AVX2
// version runs the ragged end of a range through the same vector code, so an output's value never
// depends on where a thread's column range happened to end.
#pragma once
#include <cstdint>

#include "simd.h"

namespace blossom {

void apply_epilogue_scalar(float* y, int64_t rows, int64_t out, int64_t c0, int64_t c1, const float* bias,
                           int epilogue, const float* residual);

#if defined(__x86_64__)
BLOSSOM_AVX2 void apply_epilogue_avx2(float* y, int64_t rows, int64_t out, int64_t c0, int64_t c1,
                                      const float* bias, int epilogue, const float* residual);
#endif

}  // namespace blossom
