// Shared definitions for Blossom's native kernels.
// Kernels know shapes and dtypes, never BLOOM.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <cmath>

namespace blossom {

// Storage dtypes of weight tensors. Values are part of the JS<->native contract
// (src/backend/native.ts mirrors them).
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, I8 = 3 };

inline size_t dtype_size(DType d) {
  switch (d) {
    case DType::F32: return 4;
    case DType::F16: return 2;
    case DType::BF16: return 2;
    case DType::I8: return 1;
  }
  return 0;
}

// Exact bf16 -> f32: bf16 is the top half of an f32.
inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// f32 -> bf16 with round-to-nearest-even (NaN kept quiet).
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

// Exact IEEE half -> f32 (scalar; the SIMD paths use F16C).
inline float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) { mant <<= 1; exp--; }
      mant &= 0x3ffu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// f32 -> IEEE half, round-to-nearest-even, with overflow to inf.
inline uint16_t f32_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t absx = x & 0x7fffffffu;
  if (absx > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (absx >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (absx < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    // Multiplying by 2^24 is exact; nearbyint rounds half to even.
    float scaled = std::fabs(f) * 16777216.0f;
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(scaled)));
  }
  uint32_t e = (absx >> 23) - 127 + 15;
  uint32_t mant = absx & 0x7fffffu;
  uint32_t half = (e << 10) | (mant >> 13);
  uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) half++;
  return static_cast<uint16_t>(sign | half);
}

inline float load_as_f32(const void* base, DType d, size_t i) {
  switch (d) {
    case DType::F32: { float v; std::memcpy(&v, static_cast<const char*>(base) + 4 * i, 4); return v; }
    case DType::F16: { uint16_t h; std::memcpy(&h, static_cast<const char*>(base) + 2 * i, 2); return f16_to_f32(h); }
    case DType::BF16: { uint16_t h; std::memcpy(&h, static_cast<const char*>(base) + 2 * i, 2); return bf16_to_f32(h); }
    case DType::I8: return static_cast<float>(static_cast<const int8_t*>(base)[i]);
  }
  return 0.f;
}

// BLOOM's tanh GELU (bloom_gelu_forward in transformers).
inline float gelu_tanh(float x) {
  return x * 0.5f * (1.0f + std::tanh(0.79788456f * x * (1.0f + 0.044715f * x * x)));
}

}  // namespace blossom
