// Dtype conversion for weights converted at load (an explicit choice: --dtype fp32 on a bf16
// checkpoint, say). Exact when widening; round-to-nearest-even when narrowing.
#include <algorithm>
#include <cstring>

#include "kernels.h"

namespace blossom {

void convert(ThreadPool& pool, void* dst, DType dst_dtype, const void* src, DType src_dtype, int64_t n) {
  pool.parallel_for(n, 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float v = load_as_f32(src, src_dtype, i);
      switch (dst_dtype) {
        case DType::F32: static_cast<float*>(dst)[i] = v; break;
        case DType::F16: static_cast<uint16_t*>(dst)[i] = f32_to_f16(v); break;
        case DType::BF16: static_cast<uint16_t*>(dst)[i] = f32_to_bf16(v); break;
        case DType::I8: break;  // quantization has its own kernels
      }
    }
  });
}

namespace {

// count elements from s (src_dtype) to d (dst_dtype), rounding to nearest even when narrowing.
void copy_run(char* d, DType dst_dtype, const char* s, DType src_dtype, int64_t count) {
  const size_t ss = dtype_size(src_dtype);
  if (dst_dtype == src_dtype) {
    std::memcpy(d, s, count * ss);
    return;
  }
  for (int64_t i = 0; i < count; ++i) {
    const float v = load_as_f32(s, src_dtype, i);
    switch (dst_dtype) {
      case DType::F32: std::memcpy(d + 4 * i, &v, 4); break;
      case DType::F16: { uint16_t h = f32_to_f16(v); std::memcpy(d + 2 * i, &h, 2); break; }
      case DType::BF16: { uint16_t h = f32_to_bf16(v); std::memcpy(d + 2 * i, &h, 2); break; }
      case DType::I8: break;
    }
  }
}

}  // namespace

void slice_columns(ThreadPool& pool, void* dst, DType dst_dtype, const void* src, DType src_dtype, int64_t rows, int64_t cols,
                   int64_t first, int64_t count) {
  const size_t ds = dtype_size(dst_dtype), ss = dtype_size(src_dtype);
  pool.parallel_for(rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      copy_run(static_cast<char*>(dst) + r * count * ds, dst_dtype, static_cast<const char*>(src) + (r * cols + first) * ss, src_dtype, count);
    }
  });
}

void to_panels(ThreadPool& pool, void* dst, DType dst_dtype, const void* src, DType src_dtype, int64_t out, int64_t in,
               int64_t panel_k, int64_t row_begin, int64_t row_end) {
  const size_t ds = dtype_size(dst_dtype), ss = dtype_size(src_dtype);
  pool.parallel_for(row_end - row_begin, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = row_begin + begin; r < row_begin + end; ++r) {
      for (int64_t k0 = 0; k0 < in; k0 += panel_k) {
        const int64_t n = std::min(panel_k, in - k0);
        copy_run(static_cast<char*>(dst) + (out * k0 + r * n) * ds, dst_dtype, static_cast<const char*>(src) + (r * in + k0) * ss, src_dtype, n);
      }
    }
  });
}

}  // namespace blossom
