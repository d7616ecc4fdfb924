// Dtype conversion for weights converted at load (an explicit choice: --dtype fp32 on a bf16
// checkpoint, say). Exact when widening; round-to-nearest-even when narrowing.
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

void slice_columns(ThreadPool& pool, void* dst, DType dst_dtype, const void* src, DType src_dtype, int64_t rows, int64_t cols,
                   int64_t first, int64_t count) {
  const size_t ds = dtype_size(dst_dtype), ss = dtype_size(src_dtype);
  pool.parallel_for(rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const char* s = static_cast<const char*>(src) + (r * cols + first) * ss;
      char* d = static_cast<char*>(dst) + r * count * ds;
      if (dst_dtype == src_dtype) {
        std::memcpy(d, s, count * ss);
        continue;
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
  });
}

}  // namespace blossom
