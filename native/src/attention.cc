// Ragged-batch causal attention with ALiBi over a paged KV cache of fp32, fp16 or bf16 keys and
// values (each kernel is a template on the cache's dtype; 16-bit entries are widened in registers).
//
// For each sequence, the new tokens' k and v are first written into the cache at positions
// past_len .. past_len+num_new-1, then every new query attends to keys 0 .. its own position:
//   score_j = slope_h * j + (q . k_j) / sqrt(head_dim)      (HF: alibi.baddbmm(q, k, alpha=inv_norm))
//   out     = sum_j softmax(score)_j * v_j                   (softmax in fp32)
// ALiBi uses the key's position only; softmax is shift-invariant, so this equals -slope*(i-j).
// Positions are those of the sequence's real tokens: padding never reaches the engine.
//
// Three ways through the keys: a sequence decoding one token streams its cache in one pass, block
// by block for a group of heads (attend_decode_avx2; in a small batch a long cache is split into
// key ranges whose partial softmax states are merged, so both threads stream it); a prefill (16 or
// more new tokens) goes through the keys in tiles of 6 queries x 16 keys (attend_prefill_avx2);
// a few new tokens take each head's keys in three passes (attend_head_avx2). All agree to float
// rounding (~1e-7).
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <stdexcept>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace blossom {

namespace {

struct Seq {
  int64_t token_start, num_new, past_len, table_offset;
};

// In a decoding batch of at most kSplitSequences sequences, a sequence of at least twice kRangeKeys
// keys is split into ranges of about kRangeKeys (whole blocks), computed as separate tasks and
// merged. Larger batches already give every thread whole sequences to stream (there, splitting
// measured 0-3 % slower).
constexpr int64_t kRangeKeys = 128;
constexpr int64_t kSplitSequences = 4;

// A sequence with at least this many new tokens (a prefill) takes attend_prefill_avx2: tiles of
// queries against chunks of keys, in registers.
constexpr int64_t kTiledQueries = 16;

// One cache entry of dtype D: fp32, or the 16 bits of fp16 / bf16.
template <DType D>
using Kv = std::conditional_t<D == DType::F32, float, uint16_t>;

template <DType D>
inline float kv_get(const Kv<D>* p) {
  if constexpr (D == DType::F32) return *p;
  else if constexpr (D == DType::F16) return f16_to_f32(*p);
  else return bf16_to_f32(*p);
}

// Appends n floats to the cache, rounded to nearest-even when it holds 16-bit entries.
template <DType D>
inline void kv_put(Kv<D>* dst, const float* src, int n) {
  if constexpr (D == DType::F32) {
    std::memcpy(dst, src, sizeof(float) * n);
  } else {
    for (int i = 0; i < n; ++i) dst[i] = D == DType::F16 ? f32_to_f16(src[i]) : f32_to_bf16(src[i]);
  }
}

template <DType D>
inline Kv<D>* kv_cache(void* p) {
  return static_cast<Kv<D>*>(p);
}

inline Seq seq_at(const AttentionArgs& a, int s) {
  const int32_t* d = a.seqs + 4 * s;
  return Seq{d[0], d[1], d[2], d[3]};
}

// Offset (in entries) of position `pos` of head `h` in a cache laid out (blocks, heads, block_size, head_dim).
inline int64_t cache_offset(const AttentionArgs& a, const Seq& s, int64_t pos, int h) {
  const int64_t block = a.block_table[s.table_offset + pos / a.block_size];
  return ((block * a.num_heads + h) * a.block_size + pos % a.block_size) * a.head_dim;
}

template <DType D>
float dot_scalar(const float* a, const Kv<D>* b, int n) {
  float s = 0.f;
  for (int i = 0; i < n; ++i) s += a[i] * kv_get<D>(b + i);
  return s;
}

template <DType D>
void axpy_scalar(float* y, float alpha, const Kv<D>* x, int n) {
  for (int i = 0; i < n; ++i) y[i] += alpha * kv_get<D>(x + i);
}

#if defined(__x86_64__)
// kv_put, 8 entries at a time: fp16 through F16C, bf16 rounded to nearest-even in integer lanes
// (NaN quieted), as the scalar conversions do.
template <DType D>
BLOSSOM_AVX2 void kv_put_avx2(Kv<D>* dst, const float* src, int n) {
  int i = 0;
  if constexpr (D == DType::F16) {
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else if constexpr (D == DType::BF16) {
    const __m256i one = _mm256_set1_epi32(1), half = _mm256_set1_epi32(0x7fff), quiet_bit = _mm256_set1_epi32(0x40);
    const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    for (; i + 8 <= n; i += 8) {
      const __m256i b = _mm256_castps_si256(_mm256_loadu_ps(src + i));
      const __m256i high = _mm256_srli_epi32(b, 16);
      const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(half, _mm256_and_si256(high, one))), 16);
      const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(b, abs_mask), inf);
      const __m256i r = _mm256_blendv_epi8(rounded, _mm256_or_si256(high, quiet_bit), nan);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
    }
  }
  kv_put<D>(dst + i, src + i, n - i);
}

template <DType D>
BLOSSOM_AVX2 float dot_avx2(const float* a, const Kv<D>* b, int n) {
  __m256 acc = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), simd::load8<D>(b + i), acc);
  float s = simd::hsum(acc);
  for (; i < n; ++i) s += a[i] * kv_get<D>(b + i);
  return s;
}

template <DType D>
BLOSSOM_AVX2 void axpy_avx2(float* y, float alpha, const Kv<D>* x, int n) {
  const __m256 va = _mm256_set1_ps(alpha);
  int i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, simd::load8<D>(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * kv_get<D>(x + i);
}

// Sums of 8 vectors: lane t of the result is the sum of v[t]'s 8 lanes.
BLOSSOM_AVX2_INLINE __m256 hsum8x8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));  // 0123 | 4567 halves
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // a = [v0l v1l v2l v3l | v0h v1h v2h v3h], b likewise for v4..v7: add low and high halves.
  const __m256 lo = _mm256_permute2f128_ps(a, b, 0x20);
  const __m256 hi = _mm256_permute2f128_ps(a, b, 0x31);
  return _mm256_add_ps(lo, hi);
}

// Scores of jn contiguous keys of one head, at positions j0.., into sc[0..jn):
// slope * position + (q . k) * scale, 8 keys at a time; returns their max. While it scores 8 keys it
// prefetches the same byte range of pf_a and pf_b (either may be null).
template <DType D>
BLOSSOM_AVX2_INLINE float score_keys_avx2(float* sc, const float* q, const Kv<D>* kb, int64_t jn, int64_t j0, float slope,
                                          float scale, int d, const char* pf_a, const char* pf_b) {
  constexpr int64_t entry = sizeof(Kv<D>);
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  float mx = -INFINITY;
  int64_t j = 0;
  for (; j + 8 <= jn; j += 8) {
    for (int64_t line = j * d * entry; line < (j + 8) * d * entry; line += 64) {
      if (pf_a) _mm_prefetch(pf_a + line, _MM_HINT_T0);
      if (pf_b) _mm_prefetch(pf_b + line, _MM_HINT_T0);
    }
    __m256 acc[8];
    for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
    for (int e = 0; e < d; e += 8) {
      const __m256 qv = _mm256_loadu_ps(q + e);
      for (int u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(qv, simd::load8<D>(kb + (j + u) * d + e), acc[u]);
    }
    const __m256 pos = _mm256_add_ps(_mm256_set1_ps(static_cast<float>(j0 + j)), _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 v = _mm256_fmadd_ps(_mm256_set1_ps(slope), pos, _mm256_mul_ps(hsum8x8(acc), _mm256_set1_ps(scale)));
    _mm256_storeu_ps(sc + j, v);
    vmax = _mm256_max_ps(vmax, v);
  }
  for (; j < jn; ++j) {
    const float v = slope * static_cast<float>(j0 + j) + dot_avx2<D>(q, kb + j * d, d) * scale;
    sc[j] = v;
    mx = std::max(mx, v);
  }
  return std::max(mx, simd::hmax(vmax));
}

// sc[j] = exp(sc[j] - mx) over n scores, 8 at a time; returns their sum.
BLOSSOM_AVX2_INLINE float exp_sum_avx2(float* sc, int64_t n, float mx) {
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = simd::exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + j), vmx));
    _mm256_storeu_ps(sc + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = simd::hsum(vsum);
  for (; j < n; ++j) {
    sc[j] = std::exp(sc[j] - mx);
    sum += sc[j];
  }
  return sum;
}

// The AVX2 version of attend_head for head_dim a multiple of 8. Same three passes as the
// reference (scores and their max, exponentials and their sum, weighted sum of values), each
// vectorised across keys: 8 keys' dot products at a time, exp over 8 scores, and the value sum
// held in registers 64 dimensions at a time and divided by the sum once at the end.
template <DType D>
BLOSSOM_AVX2 void attend_head_avx2(const AttentionArgs& a, const Seq& s, int h, std::vector<float>& scores) {
  const Kv<D>* const k_cache = kv_cache<D>(a.k_cache);
  const Kv<D>* const v_cache = kv_cache<D>(a.v_cache);
  const int d = a.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const float slope = a.slopes[h];
  const int64_t stride = static_cast<int64_t>(a.num_heads) * 3 * d;
  const int bs = a.block_size;
  for (int64_t i = 0; i < s.num_new; ++i) {
    const int64_t t = s.token_start + i;
    const int64_t n = s.past_len + i + 1;  // keys 0 .. pos
    const float* q = a.qkv + t * stride + static_cast<int64_t>(h) * 3 * d;
    if (static_cast<int64_t>(scores.size()) < n + 8) scores.resize(n + 8);
    float* sc = scores.data();
    // 1. scores_j = slope * j + (q . k_j) * scale, 8 keys at a time within each block.
    float mx = -INFINITY;
    for (int64_t j0 = 0; j0 < n; j0 += bs) {
      const Kv<D>* kb = k_cache + cache_offset(a, s, j0, h);  // bs keys of this head, contiguous
      // Blocks are scattered, so the hardware prefetchers restart at each one: fetch the next
      // block's keys and this block's values (for pass 3) while these keys are being scored.
      const char* next_k = j0 + bs < n ? reinterpret_cast<const char*>(k_cache + cache_offset(a, s, j0 + bs, h)) : nullptr;
      const char* this_v = reinterpret_cast<const char*>(v_cache + cache_offset(a, s, j0, h));
      mx = std::max(mx, score_keys_avx2<D>(sc + j0, q, kb, std::min<int64_t>(bs, n - j0), j0, slope, scale, d, next_k, this_v));
    }
    // 2. e_j = exp(score_j - max) and their sum.
    const float sum = exp_sum_avx2(sc, n, mx);
    // 3. out = (sum_j e_j v_j) / sum, 64 dimensions per pass with the accumulators in registers.
    float* o = a.out + t * static_cast<int64_t>(a.num_heads) * d + static_cast<int64_t>(h) * d;
    const __m256 inv = _mm256_set1_ps(1.0f / sum);
    for (int e0 = 0; e0 < d; e0 += 64) {
      const int chunks = std::min(64, d - e0) / 8;
      __m256 acc[8];
      for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
      for (int64_t j0 = 0; j0 < n; j0 += bs) {
        const Kv<D>* vb = v_cache + cache_offset(a, s, j0, h) + e0;
        const int64_t jn = std::min<int64_t>(bs, n - j0);
        for (int64_t jj = 0; jj < jn; ++jj) {
          const __m256 p = _mm256_set1_ps(sc[j0 + jj]);
          const Kv<D>* v = vb + jj * d;
          if (chunks == 8) {
            for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(p, simd::load8<D>(v + 8 * c), acc[c]);
          } else {
            for (int c = 0; c < chunks; ++c) acc[c] = _mm256_fmadd_ps(p, simd::load8<D>(v + 8 * c), acc[c]);
          }
        }
      }
      for (int c = 0; c < chunks; ++c) _mm256_storeu_ps(o + e0 + 8 * c, _mm256_mul_ps(acc[c], inv));
    }
  }
}

// Tiled attention for many new tokens of sequence s, head h (flash-attention on the CPU): a tile of
// R <= 6 queries goes through the keys 16 at a time. Scores S (R x 16) are an outer-product
// micro-kernel over the head's keys transposed once per call into kt (chunks of 16 keys, each a
// contiguous (head_dim, 16) block, zero padded), so each step is 2 loads and R broadcasts for 2R
// FMAs; then an online softmax per row (running max and sum, ALiBi, the causal mask), and the
// output rows (R x head_dim, in `acc`) rescaled and accumulated 16 dimensions at a time from the 16
// keys' values. The per-query path (attend_head_avx2) loads 8 keys per query for every 8 FMAs.
template <int R>
BLOSSOM_AVX2_INLINE void score_tile(const float* const* q, const float* kt, int d, __m256 (&s)[6][2]) {
  // Local accumulators (the compiler keeps them in registers; accumulating into `s` itself, which
  // the caller's code reads after, measured them spilled to the stack on every step).
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int e = 0; e < d; ++e) {
    const __m256 k0 = _mm256_loadu_ps(kt + e * 16), k1 = _mm256_loadu_ps(kt + e * 16 + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 qb = _mm256_broadcast_ss(q[r] + e);
      acc[r][0] = _mm256_fmadd_ps(qb, k0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(qb, k1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    s[r][0] = acc[r][0];
    s[r][1] = acc[r][1];
  }
}

template <int R, DType D>
BLOSSOM_AVX2_INLINE void accumulate_values(float* acc, const float* p, const Kv<D>* const* v, int64_t keys, int d) {
  for (int e0 = 0; e0 < d; e0 += 16) {
    const bool two = e0 + 16 <= d;  // else 8 dimensions left
    __m256 o[6][2];
    for (int r = 0; r < R; ++r) {
      o[r][0] = _mm256_loadu_ps(acc + r * d + e0);
      o[r][1] = two ? _mm256_loadu_ps(acc + r * d + e0 + 8) : _mm256_setzero_ps();
    }
    for (int64_t jj = 0; jj < keys; ++jj) {
      const __m256 v0 = simd::load8<D>(v[jj] + e0);
      const __m256 v1 = two ? simd::load8<D>(v[jj] + e0 + 8) : _mm256_setzero_ps();
      for (int r = 0; r < R; ++r) {
        const __m256 pb = _mm256_broadcast_ss(p + r * 16 + jj);
        o[r][0] = _mm256_fmadd_ps(pb, v0, o[r][0]);
        o[r][1] = _mm256_fmadd_ps(pb, v1, o[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(acc + r * d + e0, o[r][0]);
      if (two) _mm256_storeu_ps(acc + r * d + e0 + 8, o[r][1]);
    }
  }
}

template <int R, DType D>
BLOSSOM_AVX2 void attend_tile_avx2(const AttentionArgs& a, const Seq& s, int h, int64_t i0, const float* kt, std::vector<float>& work) {
  const int d = a.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const float slope = a.slopes[h];
  const int64_t stride = static_cast<int64_t>(a.num_heads) * 3 * d;
  const Kv<D>* const v_cache = kv_cache<D>(a.v_cache);
  // work: R x d output accumulators, then R x 16 probabilities.
  if (static_cast<int64_t>(work.size()) < R * (d + 16)) work.resize(R * (d + 16));
  float* acc = work.data();
  float* p = acc + R * d;
  std::fill(acc, acc + R * d, 0.f);
  const float* q[6];
  alignas(32) float m[8], l[8], cmax[8], corr[8];  // per row: running max and sum, this chunk's max, rescale
  int64_t last[6];  // each query's last key (its own position)
  for (int r = 0; r < 8; ++r) m[r] = l[r] = cmax[r] = 0.f;
  for (int r = 0; r < R; ++r) {
    q[r] = a.qkv + (s.token_start + i0 + r) * stride + static_cast<int64_t>(h) * 3 * d;
    m[r] = -INFINITY;
    last[r] = s.past_len + i0 + r;
  }
  const int64_t n = last[R - 1] + 1;
  const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const Kv<D>* v[16];
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t keys = std::min<int64_t>(16, n - j0);
    __m256 sc[6][2];
    score_tile<R>(q, kt + j0 * d, d, sc);
    // The 16 keys' value rows: one cache lookup per block.
    for (int64_t jj = 0; jj < keys;) {
      const Kv<D>* base = v_cache + cache_offset(a, s, j0 + jj, h);
      const int64_t run = std::min<int64_t>(keys - jj, a.block_size - (j0 + jj) % a.block_size);
      for (int64_t t = 0; t < run; ++t) v[jj + t] = base + t * d;
      jj += run;
    }
    // score = slope * j + dot * scale, -inf past the query's position; each row's chunk max.
    __m256 visible[6][2];
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < 2; ++c) {
        const __m256 pos = _mm256_add_ps(_mm256_set1_ps(static_cast<float>(j0 + 8 * c)), lane);
        visible[r][c] = _mm256_cmp_ps(pos, _mm256_set1_ps(static_cast<float>(last[r])), _CMP_LE_OQ);
        const __m256 x = _mm256_fmadd_ps(_mm256_set1_ps(slope), pos, _mm256_mul_ps(sc[r][c], _mm256_set1_ps(scale)));
        sc[r][c] = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), x, visible[r][c]);
      }
      cmax[r] = simd::hmax(_mm256_max_ps(sc[r][0], sc[r][1]));
    }
    // New maxima and the factors that rescale what came before, for all rows at once. Key 0 is in
    // the first chunk and visible to every query, so maxima are finite from then on (a row with no
    // visible key in a later chunk keeps its max: factor 1, probabilities 0).
    const __m256 m_old = _mm256_load_ps(m);
    const __m256 m_new = _mm256_max_ps(m_old, _mm256_load_ps(cmax));
    _mm256_store_ps(corr, simd::exp8(_mm256_sub_ps(m_old, m_new)));
    _mm256_store_ps(m, m_new);
    if (j0 == 0) std::fill(corr, corr + 8, 0.f);  // m_old = -inf
    for (int r = 0; r < R; ++r) {
      __m256 sum = _mm256_setzero_ps();
      for (int c = 0; c < 2; ++c) {
        const __m256 e = _mm256_and_ps(simd::exp8(_mm256_sub_ps(sc[r][c], _mm256_set1_ps(m[r]))), visible[r][c]);
        _mm256_storeu_ps(p + r * 16 + 8 * c, e);
        sum = _mm256_add_ps(sum, e);
      }
      l[r] = l[r] * corr[r] + simd::hsum(sum);
      if (corr[r] != 1.f) {
        const __m256 vc = _mm256_set1_ps(corr[r]);
        for (int e = 0; e < d; e += 8) _mm256_storeu_ps(acc + r * d + e, _mm256_mul_ps(_mm256_loadu_ps(acc + r * d + e), vc));
      }
    }
    accumulate_values<R, D>(acc, p, v, keys, d);
  }
  for (int r = 0; r < R; ++r) {
    float* o = a.out + (s.token_start + i0 + r) * static_cast<int64_t>(a.num_heads) * d + static_cast<int64_t>(h) * d;
    const __m256 inv = _mm256_set1_ps(1.0f / l[r]);
    for (int e = 0; e < d; e += 8) _mm256_storeu_ps(o + e, _mm256_mul_ps(_mm256_loadu_ps(acc + r * d + e), inv));
  }
}

// All new tokens of sequence s, head h, in tiles of 6 queries (attend_tile_avx2); the head's keys
// are transposed (and widened) once into `kt`.
template <DType D>
BLOSSOM_AVX2 void attend_prefill_avx2(const AttentionArgs& a, const Seq& s, int h, std::vector<float>& kt, std::vector<float>& work) {
  const int d = a.head_dim;
  const Kv<D>* const k_cache = kv_cache<D>(a.k_cache);
  const int64_t n = s.past_len + s.num_new;
  // Chunk by chunk of 16 keys, each chunk's (head_dim, 16) transpose contiguous: the score
  // micro-kernel then reads one 16-key chunk as one sequential run.
  const int64_t padded = (n + 15) / 16 * 16;
  kt.assign(static_cast<size_t>(padded * d), 0.f);
  for (int64_t j = 0; j < n; ++j) {
    const Kv<D>* k = k_cache + cache_offset(a, s, j, h);
    float* chunk = kt.data() + (j / 16) * 16 * d + j % 16;
    for (int e = 0; e < d; ++e) chunk[e * 16] = kv_get<D>(k + e);
  }
  int64_t i0 = 0;
  for (; i0 + 6 <= s.num_new; i0 += 6) attend_tile_avx2<6, D>(a, s, h, i0, kt.data(), work);
  switch (s.num_new - i0) {
    case 5: attend_tile_avx2<5, D>(a, s, h, i0, kt.data(), work); break;
    case 4: attend_tile_avx2<4, D>(a, s, h, i0, kt.data(), work); break;
    case 3: attend_tile_avx2<3, D>(a, s, h, i0, kt.data(), work); break;
    case 2: attend_tile_avx2<2, D>(a, s, h, i0, kt.data(), work); break;
    case 1: attend_tile_avx2<1, D>(a, s, h, i0, kt.data(), work); break;
    default: break;
  }
}

// One decoding token (num_new == 1) of sequence s, heads [h0, h1), in a single pass over the cache
// block by block ("online softmax": a running max m, sum l and unnormalised output per head, rescaled
// by exp(m_old - m_new) when a block raises the max). In the cache layout (blocks, heads, block_size,
// head_dim) heads h0..h1-1 of one block are one contiguous run of keys (and one of values), so each
// thread streams runs of (h1 - h0) * block_size * head_dim floats instead of one head's 4 KiB at a
// time, prefetching a head's worth ahead.
// Keys [j_begin, j_end) only (j_begin a multiple of block_size): with `partial`, the unnormalised
// state of each head (d accumulators, max, sum: d + 2 floats) is written there for merge_partials;
// without, the normalised output.
template <DType D>
BLOSSOM_AVX2 void attend_decode_avx2(const AttentionArgs& a, const Seq& s, int h0, int h1, int64_t j_begin, int64_t j_end,
                                     std::vector<float>& state, float* partial) {
  const Kv<D>* const k_cache = kv_cache<D>(a.k_cache);
  const Kv<D>* const v_cache = kv_cache<D>(a.v_cache);
  const int d = a.head_dim, bs = a.block_size;
  const int nh = h1 - h0;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int64_t stride = static_cast<int64_t>(a.num_heads) * 3 * d;
  const int64_t t = s.token_start;
  const int64_t n = std::min(s.past_len + 1, j_end);  // keys j_begin .. min(pos, j_end - 1)
  // State per head: d accumulators, then the scores of one block (bs, rounded up to 8), max and sum.
  const int64_t per = d + ((bs + 7) & ~7) + 2;
  if (static_cast<int64_t>(state.size()) < per * nh) state.resize(per * nh);
  for (int hh = 0; hh < nh; ++hh) {
    float* st = state.data() + hh * per;
    std::fill(st, st + d, 0.f);
    st[per - 2] = -INFINITY;
    st[per - 1] = 0.f;
  }
  const int64_t head_bytes = static_cast<int64_t>(bs) * d * static_cast<int64_t>(sizeof(Kv<D>));  // one head's keys (or values) in a block
  for (int64_t j0 = j_begin; j0 < n; j0 += bs) {
    const int64_t jn = std::min<int64_t>(bs, n - j0);
    const Kv<D>* kb0 = k_cache + cache_offset(a, s, j0, h0);
    const Kv<D>* vb0 = v_cache + cache_offset(a, s, j0, h0);
    const char* next_k = j0 + bs < n ? reinterpret_cast<const char*>(k_cache + cache_offset(a, s, j0 + bs, h0)) : nullptr;
    for (int hh = 0; hh < nh; ++hh) {
      const int h = h0 + hh;
      float* st = state.data() + hh * per;
      float* acc = st;
      float* sc = st + d;
      const float* q = a.qkv + t * stride + static_cast<int64_t>(h) * 3 * d;
      const Kv<D>* kb = kb0 + static_cast<int64_t>(hh) * bs * d;
      const Kv<D>* vb = vb0 + static_cast<int64_t>(hh) * bs * d;
      // Prefetch the next head's keys (after the last head, the next block's first) and this head's
      // values, used once its scores are done. Measured at batch 8-128 over 100-400 cached tokens
      // (in-process, alternating; high-bandwidth state): 65-78 % of the read bandwidth; next head's
      // keys and values 59-75 %, keys only 53-72 %, the whole next block spread over this block's
      // heads 56 %, no software prefetch 46-52 %. A 16-bit head is half the bytes, and its values are
      // fetched a head ahead too (this head's only for a block's first head): bloom-560m shape, fp16
      // cache, in one process alternating with the fp32 scheme, batch 128 over 100 tokens 1.55-1.76
      // against 1.79-2.12 ms, batch 8 over 512 -7 %, batch 1 over 2048 -12 %.
      const char* nk = hh + 1 < nh ? reinterpret_cast<const char*>(kb + bs * d) : next_k;
      if (nk) for (int64_t line = 0; line < head_bytes; line += 64) _mm_prefetch(nk + line, _MM_HINT_T0);
      const char* this_v = reinterpret_cast<const char*>(vb);
      if (D == DType::F32 || hh == 0) for (int64_t line = 0; line < head_bytes; line += 64) _mm_prefetch(this_v + line, _MM_HINT_T0);
      if (D != DType::F32 && hh + 1 < nh) {
        const char* next_v = reinterpret_cast<const char*>(vb + bs * d);
        for (int64_t line = 0; line < head_bytes; line += 64) _mm_prefetch(next_v + line, _MM_HINT_T0);
      }
      // Scores of this block's keys; rescale what came before if they raise the max.
      const float bmax = score_keys_avx2<D>(sc, q, kb, jn, j0, a.slopes[h], scale, d, nullptr, nullptr);
      const float m_old = st[per - 2];
      const float m_new = std::max(m_old, bmax);
      const float corr = std::exp(m_old - m_new);  // 0 for the first block (m_old = -inf)
      const float sum = exp_sum_avx2(sc, jn, m_new);
      st[per - 2] = m_new;
      st[per - 1] = st[per - 1] * corr + sum;
      // acc = acc * corr + sum_j p_j v_j, 64 dimensions at a time in registers.
      const __m256 vc = _mm256_set1_ps(corr);
      for (int e0 = 0; e0 < d; e0 += 64) {
        const int chunks = std::min(64, d - e0) / 8;
        __m256 r[8];
        for (int c = 0; c < chunks; ++c) r[c] = _mm256_mul_ps(_mm256_loadu_ps(acc + e0 + 8 * c), vc);
        for (int64_t jj = 0; jj < jn; ++jj) {
          const __m256 p = _mm256_set1_ps(sc[jj]);
          const Kv<D>* v = vb + jj * d + e0;
          if (chunks == 8) {
            for (int c = 0; c < 8; ++c) r[c] = _mm256_fmadd_ps(p, simd::load8<D>(v + 8 * c), r[c]);
          } else {
            for (int c = 0; c < chunks; ++c) r[c] = _mm256_fmadd_ps(p, simd::load8<D>(v + 8 * c), r[c]);
          }
        }
        for (int c = 0; c < chunks; ++c) _mm256_storeu_ps(acc + e0 + 8 * c, r[c]);
      }
    }
  }
  for (int hh = 0; hh < nh; ++hh) {
    const float* st = state.data() + hh * per;
    if (partial) {
      float* p = partial + static_cast<int64_t>(hh) * (d + 2);
      std::copy(st, st + d, p);
      p[d] = st[per - 2];
      p[d + 1] = st[per - 1];
      continue;
    }
    float* o = a.out + t * static_cast<int64_t>(a.num_heads) * d + static_cast<int64_t>(h0 + hh) * d;
    const __m256 inv = _mm256_set1_ps(1.0f / st[per - 1]);
    for (int e = 0; e < d; e += 8) _mm256_storeu_ps(o + e, _mm256_mul_ps(_mm256_loadu_ps(st + e), inv));
  }
}

// The output of one head from the partial states of `parts` key ranges (each d accumulators, max m
// and sum l; an empty range has m = -inf, l = 0): rescaled to the overall max and summed.
BLOSSOM_AVX2 void merge_partials(float* out, const float* part, int64_t part_stride, int parts, int d) {
  float m = -INFINITY;
  for (int r = 0; r < parts; ++r) m = std::max(m, part[r * part_stride + d]);
  float l = 0.f;
  for (int r = 0; r < parts; ++r) l += part[r * part_stride + d + 1] * std::exp(part[r * part_stride + d] - m);
  for (int e = 0; e < d; e += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int r = 0; r < parts; ++r) {
      const float* p = part + r * part_stride;
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(p + e), _mm256_set1_ps(std::exp(p[d] - m) / l), acc);
    }
    _mm256_storeu_ps(out + e, acc);
  }
}
#endif

template <bool Fast, DType D>
void attend_head(const AttentionArgs& a, const Seq& s, int h, std::vector<float>& scores) {
  const Kv<D>* const k_cache = kv_cache<D>(a.k_cache);
  const Kv<D>* const v_cache = kv_cache<D>(a.v_cache);
  const int d = a.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const float slope = a.slopes[h];
  const int64_t stride = static_cast<int64_t>(a.num_heads) * 3 * d;
  for (int64_t i = 0; i < s.num_new; ++i) {
    const int64_t t = s.token_start + i;
    const int64_t pos = s.past_len + i;
    const float* q = a.qkv + t * stride + static_cast<int64_t>(h) * 3 * d;
    if (static_cast<int64_t>(scores.size()) < pos + 1) scores.resize(pos + 1);
    float mx = -INFINITY;
    for (int64_t j = 0; j <= pos; ++j) {
      const Kv<D>* k = k_cache + cache_offset(a, s, j, h);
#if defined(__x86_64__)
      const float qk = Fast ? dot_avx2<D>(q, k, d) : dot_scalar<D>(q, k, d);
#else
      const float qk = dot_scalar<D>(q, k, d);
#endif
      const float sc = slope * static_cast<float>(j) + qk * scale;
      scores[j] = sc;
      mx = std::max(mx, sc);
    }
    float sum = 0.f;
    for (int64_t j = 0; j <= pos; ++j) {
      const float e = std::exp(scores[j] - mx);
      scores[j] = e;
      sum += e;
    }
    float* o = a.out + t * static_cast<int64_t>(a.num_heads) * d + static_cast<int64_t>(h) * d;
    std::fill(o, o + d, 0.f);
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j <= pos; ++j) {
      const Kv<D>* v = v_cache + cache_offset(a, s, j, h);
#if defined(__x86_64__)
      if (Fast) axpy_avx2<D>(o, scores[j] * inv, v, d);
      else axpy_scalar<D>(o, scores[j] * inv, v, d);
#else
      axpy_scalar<D>(o, scores[j] * inv, v, d);
#endif
    }
  }
}

// Writes new token i of sequence s (its keys and values for heads [h0, h1)) into the cache.
template <DType D>
void append_heads(const AttentionArgs& a, const Seq& s, int64_t i, int h0, int h1, bool fast) {
  Kv<D>* const k_cache = kv_cache<D>(a.k_cache);
  Kv<D>* const v_cache = kv_cache<D>(a.v_cache);
  const int d = a.head_dim;
  const float* row = a.qkv + (s.token_start + i) * static_cast<int64_t>(a.num_heads) * 3 * d;
  for (int h = h0; h < h1; ++h) {
    const int64_t off = cache_offset(a, s, s.past_len + i, h);
    const float* k = row + static_cast<int64_t>(h) * 3 * d + d;
    const float* v = k + d;
#if defined(__x86_64__)
    if (fast && D != DType::F32) {
      kv_put_avx2<D>(k_cache + off, k, d);
      kv_put_avx2<D>(v_cache + off, v, d);
      continue;
    }
#else
    (void)fast;
#endif
    kv_put<D>(k_cache + off, k, d);
    kv_put<D>(v_cache + off, v, d);
  }
}

// The tasks of the decoding sequences `decoding` (each num_new == 1). In a small batch, a sequence
// with a long cache is split into ranges of kRangeKeys keys, each a task over all heads whose
// partial softmax states are merged after (flash-decoding): a thread streams its ranges' keys and
// values as long contiguous runs (a sequence's blocks are allocated in order). The split depends on
// the batch, not on the thread count, so neither do the results. Other sequences are one task per
// group of heads, as many groups as give every thread two tasks (the grouping does not change any
// head's sums).
void plan_decode(const AttentionArgs& a, const std::vector<int32_t>& decoding_seqs, int threads, DecodePlan& plan) {
  static thread_local std::vector<int32_t> unsplit;
  plan.tasks.clear();
  plan.merges.clear();
  unsplit.clear();
  const int64_t decoding = static_cast<int64_t>(decoding_seqs.size());
  const int d = a.head_dim;
  const int64_t range_blocks = std::max<int64_t>(1, kRangeKeys / a.block_size);
  const int64_t part_stride = static_cast<int64_t>(d) + 2;  // floats per head and range
  int64_t partial_floats = 0;
  for (const int32_t si : decoding_seqs) {
    const int64_t blocks = (seq_at(a, si).past_len + 1 + a.block_size - 1) / a.block_size;
    const int64_t ranges = decoding <= kSplitSequences && blocks >= 2 * range_blocks ? blocks / range_blocks : 1;
    if (ranges == 1) {
      unsplit.push_back(si);
      continue;
    }
    plan.merges.push_back(DecodeMerge{si, partial_floats, ranges});
    for (int64_t r = 0; r < ranges; ++r) {
      const int64_t b0 = r * blocks / ranges, b1 = (r + 1) * blocks / ranges;
      plan.tasks.push_back(DecodeTask{si, 0, a.num_heads, b0 * a.block_size, b1 * a.block_size, partial_floats});
      partial_floats += a.num_heads * part_stride;
    }
  }
  if (!unsplit.empty()) {
    const int64_t want = 2 * threads, n = static_cast<int64_t>(unsplit.size());
    const int groups = static_cast<int>(std::clamp<int64_t>((want - static_cast<int64_t>(plan.tasks.size()) + n - 1) / n, 1, a.num_heads));
    const int per_group = (a.num_heads + groups - 1) / groups;
    for (const int32_t si : unsplit)
      for (int h0 = 0; h0 < a.num_heads; h0 += per_group)
        plan.tasks.push_back(DecodeTask{si, h0, std::min(a.num_heads, h0 + per_group), 0, seq_at(a, si).past_len + 1, -1});
  }
  plan.partial_floats = partial_floats;
}

template <DType D>
void attention_in(ThreadPool& pool, const AttentionArgs& a) {
  const int d = a.head_dim;
  const bool fast = active_variant() == Variant::Avx2;
  // 1. Append the new keys and values.
  pool.parallel_for(a.num_seqs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t si = begin; si < end; ++si) {
      const Seq s = seq_at(a, static_cast<int>(si));
      for (int64_t i = 0; i < s.num_new; ++i) append_heads<D>(a, s, i, 0, a.num_heads, fast);
    }
  });
#if defined(__x86_64__)
  // 2. Sequences decoding one token: tasks as plan_decode makes them, then the merges of split ones.
  static thread_local std::vector<int32_t> decoding_seqs;
  decoding_seqs.clear();
  for (int si = 0; si < a.num_seqs; ++si)
    if (seq_at(a, si).num_new == 1) decoding_seqs.push_back(si);
  const int64_t decoding = static_cast<int64_t>(decoding_seqs.size());
  const bool stream = fast && d % 8 == 0 && decoding > 0;
  if (stream) {
    static thread_local DecodePlan plan;
    plan_decode(a, decoding_seqs, pool.size(), plan);
    const int64_t part_stride = static_cast<int64_t>(d) + 2;
    static thread_local std::vector<float> partials;
    if (static_cast<int64_t>(partials.size()) < plan.partial_floats) partials.resize(static_cast<size_t>(plan.partial_floats));
    float* const part_base = partials.data();
    const DecodeTask* const task_list = plan.tasks.data();  // the caller's; the lambda runs on every thread
    pool.parallel_streams(static_cast<int64_t>(plan.tasks.size()), 1, [&](int64_t begin, int64_t end) {
      static thread_local std::vector<float> state;
      for (int64_t i = begin; i < end; ++i) {
        const DecodeTask& t = task_list[i];
        attend_decode_avx2<D>(a, seq_at(a, t.seq), t.h0, t.h1, t.j_begin, t.j_end, state, t.partial >= 0 ? part_base + t.partial : nullptr);
      }
    });
    const DecodeMerge* const merge_list = plan.merges.data();
    pool.parallel_for(static_cast<int64_t>(plan.merges.size()) * a.num_heads, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const DecodeMerge& m = merge_list[i / a.num_heads];
        const int64_t h = i % a.num_heads;
        float* o = a.out + seq_at(a, m.seq).token_start * static_cast<int64_t>(a.num_heads) * d + h * d;
        merge_partials(o, part_base + m.partial + h * part_stride, a.num_heads * part_stride, static_cast<int>(m.ranges), d);
      }
    });
    if (decoding == a.num_seqs) return;
  }
#else
  const bool stream = false;
#endif
  // 3. The other sequences' tokens (all of them without AVX2): one task per (sequence, head).
  pool.parallel_for(static_cast<int64_t>(a.num_seqs) * a.num_heads, 1, [&](int64_t begin, int64_t end) {
    static thread_local std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const Seq s = seq_at(a, static_cast<int>(task / a.num_heads));
      const int h = static_cast<int>(task % a.num_heads);
      if (stream && s.num_new == 1) continue;
#if defined(__x86_64__)
      if (fast && a.head_dim % 8 == 0) {
        static thread_local std::vector<float> kt, work;
        if (s.num_new >= kTiledQueries) attend_prefill_avx2<D>(a, s, h, kt, work);
        else attend_head_avx2<D>(a, s, h, scores);
        continue;
      }
#endif
      if (fast) attend_head<true, D>(a, s, h, scores);
      else attend_head<false, D>(a, s, h, scores);
    }
  });
}

}  // namespace

void check_attention_batch(const AttentionArgs& a) {
  // The ragged batch description against the cache and token count, before touching memory.
  for (int s = 0; s < a.num_seqs; ++s) {
    const Seq q = seq_at(a, s);
    if (q.token_start < 0 || q.num_new < 0 || q.token_start + q.num_new > a.num_tokens || q.past_len < 0)
      throw std::range_error("attention: sequence " + std::to_string(s) + " describes tokens outside the batch");
    const int64_t blocks_needed = (q.past_len + q.num_new + a.block_size - 1) / a.block_size;
    if (q.table_offset < 0 || q.table_offset + blocks_needed > a.block_table_len)
      throw std::range_error("attention: sequence " + std::to_string(s) + " block table is shorter than its length");
    for (int64_t b = 0; b < blocks_needed; ++b) {
      const int32_t blk = a.block_table[q.table_offset + b];
      if (blk < 0 || blk >= a.num_blocks)
        throw std::range_error("attention: sequence " + std::to_string(s) + " refers to cache block " +
                               std::to_string(blk) + " outside the pool of " + std::to_string(a.num_blocks));
    }
  }
}

void attention(ThreadPool& pool, const AttentionArgs& a) {
  check_attention_batch(a);
  switch (a.kv_dtype) {
    case DType::F32: return attention_in<DType::F32>(pool, a);
    case DType::F16: return attention_in<DType::F16>(pool, a);
    case DType::BF16: return attention_in<DType::BF16>(pool, a);
    default: throw std::invalid_argument("attention: the KV cache holds fp32, fp16 or bf16");
  }
}

// ---- attention as an op of a decode chain (run_chain in matmul.cc) -----------------------------

bool chain_attention_ok(const AttentionArgs& a) {
#if defined(__x86_64__)
  return active_variant() == Variant::Avx2 && a.head_dim % 8 == 0 && a.num_seqs == 1 && seq_at(a, 0).num_new == 1 &&
         (a.kv_dtype == DType::F32 || a.kv_dtype == DType::F16 || a.kv_dtype == DType::BF16);
#else
  (void)a;
  return false;
#endif
}

void plan_chain_attention(const AttentionArgs& a, int threads, DecodePlan& plan) {
  static thread_local const std::vector<int32_t> first{0};
  plan_decode(a, first, threads, plan);
}

#if defined(__x86_64__)
namespace {
template <DType D>
void chain_task_in(const AttentionArgs& a, const DecodeTask& t, float* partials) {
  static thread_local std::vector<float> state;
  const Seq s = seq_at(a, t.seq);
  // The task that holds the new position appends its heads first; no other task reads it.
  if (t.j_begin <= s.past_len && s.past_len < t.j_end) append_heads<D>(a, s, 0, t.h0, t.h1, true);
  attend_decode_avx2<D>(a, s, t.h0, t.h1, t.j_begin, t.j_end, state, t.partial >= 0 ? partials + t.partial : nullptr);
}
}  // namespace

void chain_attention_task(const AttentionArgs& a, const DecodeTask& t, float* partials) {
  switch (a.kv_dtype) {
    case DType::F32: return chain_task_in<DType::F32>(a, t, partials);
    case DType::F16: return chain_task_in<DType::F16>(a, t, partials);
    default: return chain_task_in<DType::BF16>(a, t, partials);
  }
}

void chain_attention_merge(const AttentionArgs& a, const DecodeMerge& m, int h, float* partials) {
  const int d = a.head_dim;
  const int64_t part_stride = static_cast<int64_t>(d) + 2;
  float* o = a.out + seq_at(a, m.seq).token_start * static_cast<int64_t>(a.num_heads) * d + static_cast<int64_t>(h) * d;
  merge_partials(o, partials + m.partial + h * part_stride, a.num_heads * part_stride, static_cast<int>(m.ranges), d);
}
#else
void chain_attention_task(const AttentionArgs&, const DecodeTask&, float*) {}
void chain_attention_merge(const AttentionArgs&, const DecodeMerge&, int, float*) {}
#endif

}  // namespace blossom
