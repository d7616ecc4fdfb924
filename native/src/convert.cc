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

}  // namespace blossom
