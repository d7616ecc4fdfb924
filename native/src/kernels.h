// Kernel entry points. Each has a scalar reference version (kept beside the fast one,
// and selectable at run time for tests) and, where it matters, an AVX2+FMA+F16C version.
#pragma once
#include <cstdint>
#include <vector>

#include "common.h"
#include "thread_pool.h"

namespace blossom {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false, avx512f = false, avx_vnni = false;
  int logical_cores = 1, physical_cores = 1;
  char model[64] = {0};
};
const CpuFeatures& cpu_features();

// 0 = scalar reference, 1 = AVX2/FMA/F16C. Chosen at start-up from cpuid, overridable.
enum class Variant : int { Scalar = 0, Avx2 = 1 };
Variant active_variant();
bool set_variant(Variant v);  // false if the CPU lacks it
// Within Avx2: the int8 tiles use AVX-VNNI (vpdpwssd, vpdpbusd) where the CPU has it; same results.
bool use_avx_vnni();
bool set_avx_vnni(bool on);  // false if the CPU lacks it

// Weight matrix W (out, in) in `dtype`. panel_k == 0: row-major, as nn.Linear keeps it.
// panel_k > 0: in column panels of panel_k inputs (the last one narrower), panel after panel; panel p
// (inputs [p*panel_k, p*panel_k + n)) is its own row-major (out, n) matrix at element out * p*panel_k.
// Long rows are stored so (at load, src/backend/cpu.ts): a row of x then fits in L1 beside the weight
// stream (see linear_panels in matmul.cc).
struct WeightMatrix {
  const void* data;
  DType dtype;
  int64_t out_features;
  int64_t in_features;
  int64_t panel_k = 0;
};

enum Epilogue : int { kNone = 0, kGelu = 1 };

// y (rows, out) = epilogue(x (rows, in) @ W^T + bias) + residual
// bias (out) and residual (rows, out) may be null; y must not overlap x or residual.
void linear(ThreadPool& pool, float* y, const float* x, int64_t rows, const WeightMatrix& w,
            const float* bias, int epilogue, const float* residual);
void linear_scalar(ThreadPool& pool, float* y, const float* x, int64_t rows, const WeightMatrix& w,
                   const float* bias, int epilogue, const float* residual);
void linear_avx2(ThreadPool& pool, float* y, const float* x, int64_t rows, const WeightMatrix& w,
                 const float* bias, int epilogue, const float* residual);

// y (rows, cols) = (x - mean) / sqrt(var + eps) * gamma + beta, per row, in fp32.
// One row of layer_norm, on the calling thread (the same arithmetic).
void layer_norm_row(float* y, const float* x, int64_t cols, const float* gamma, const float* beta, float eps);

// Ragged-batch attention with a paged KV cache.
//   qkv (tokens, heads, 3, head_dim): fused projection output, BLOOM's per-head layout.
//   k_cache/v_cache (blocks, heads, block_size, head_dim) in kv_dtype: F32, or F16 / BF16 (half
//   the bytes; new keys and values are rounded to nearest-even as they are appended, and widened
//   to fp32 in registers when read; every product and sum stays fp32).
//   seqs: for each of num_seqs sequences, 4 ints: token_start, num_new, past_len, block_table_offset.
//   block_table: block indices; a sequence's entries start at its offset.
// Writes the new tokens' k,v into the cache, then out (tokens, heads*head_dim) =
//   softmax_j(slope_h * j + q.k_j / sqrt(head_dim)) v_j over keys j <= the query's position.
struct AttentionArgs {
  float* out;
  const float* qkv;
  int64_t num_tokens;
  int num_heads;
  int head_dim;
  void* k_cache;
  void* v_cache;
  DType kv_dtype;
  int block_size;
  int64_t num_blocks;
  const int32_t* seqs;
  int num_seqs;
  const int32_t* block_table;
  int64_t block_table_len;
  const float* slopes;
};
void attention(ThreadPool& pool, const AttentionArgs& a);

// A decode step's attention for one sequence decoding one token, as an op of a chain (run_chain):
// the same tasks attention() makes for it (key ranges of a long cache, merged after; otherwise groups
// of heads), so the results are the same bits. A task that holds the new position first appends
// its heads' new key and value to the cache.
struct DecodeTask {
  int32_t seq, h0, h1;
  int64_t j_begin, j_end;
  int64_t partial;  // offset of the range's partial states, or -1
};
struct DecodeMerge {
  int32_t seq;
  int64_t partial, ranges;
};
struct DecodePlan {
  std::vector<DecodeTask> tasks;
  std::vector<DecodeMerge> merges;
  int64_t partial_floats = 0;
};
// Throws std::range_error if a.seqs / a.block_table describe tokens or blocks outside the batch or cache.
void check_attention_batch(const AttentionArgs& a);
// Whether a chain's thread pool can run attention `a` itself: AVX2 kernels, head_dim a multiple of
// 8, one sequence decoding one token.
bool chain_attention_ok(const AttentionArgs& a);
void plan_chain_attention(const AttentionArgs& a, int threads, DecodePlan& plan);
void chain_attention_task(const AttentionArgs& a, const DecodeTask& t, float* partials);
void chain_attention_merge(const AttentionArgs& a, const DecodeMerge& m, int h, float* partials);

// A decode step's single-row ops, attention included, run by the pool as one job (run_chain,
// matmul.cc): each op waits for the one before at a barrier, so the weights of one matrix after
// another stream without the threads returning to the caller between them.
struct ChainOp {
  enum Kind : int { kLayerNorm = 0, kLinear = 1, kAttention = 2, kLinearInt8 = 3 } kind;
  float* y;
  const float* x;
  // layer norm: y (cols) = layer_norm(x) * gamma + beta
  int64_t cols = 0;
  const float* gamma = nullptr;
  const float* beta = nullptr;
  float eps = 0;
  // linear: y (out) = epilogue(x (in) @ W^T + bias) + residual
  WeightMatrix w{};
  const float* bias = nullptr;
  int epilogue = 0;
  const float* residual = nullptr;
  // attention: y = attention(x, the cache), one token; seqs and block_table are the run's (ChainStep)
  AttentionArgs attention{};
  // int8 linear: as linear (bias, epilogue, residual above) with the weights of quant.h's QuantWeights
  // (int8 values (out, in), fp16 scales (out, groups)) and an ActivationMode (quant.h) with its threshold
  const int8_t* q = nullptr;
  const uint16_t* q_scales = nullptr;
  int64_t q_out = 0, q_in = 0, q_group = 0;
  int q_mode = 0;
  float q_threshold = 0;
};
// The batch an attention op of a chain sees on this run: one token, as AttentionArgs describes it.
struct ChainStep {
  const int32_t* seqs = nullptr;
  int num_seqs = 0;
  const int32_t* block_table = nullptr;
  int64_t block_table_len = 0;
};
// Runs ops[0..n) on one row, with the same arithmetic as layer_norm, linear and attention at one
// token. Throws std::range_error (before running any op) if `step` is not one sequence decoding one
// token or does not fit an attention op's cache. Returns true if the ops ran as one pool job, false
// if one by one (the same results).
bool run_chain(ThreadPool& pool, const ChainOp* ops, size_t n, const ChainStep& step);

void layer_norm(ThreadPool& pool, float* y, const float* x, int64_t rows, int64_t cols, const float* gamma,
                const float* beta, float eps);

// y (n, hidden) = table[ids[i]] converted to fp32.
void embedding(ThreadPool& pool, float* y, const int32_t* ids, int64_t n, const void* table, DType dtype,
               int64_t hidden);

// Converts n elements between dtypes (F32/F16/BF16), rounding to nearest even.
void convert(ThreadPool& pool, void* dst, DType dst_dtype, const void* src, DType src_dtype, int64_t n);

// dst (rows, count) = src (rows, cols)[:, first : first+count], converted (a tensor-parallel row-split shard).
void slice_columns(ThreadPool& pool, void* dst, DType dst_dtype, const void* src, DType src_dtype, int64_t rows, int64_t cols,
                   int64_t first, int64_t count);

// Copies rows [row_begin, row_end) of src (out, in, row-major), converted, to their places in dst,
// the whole (out, in) matrix in column panels of panel_k inputs (WeightMatrix); each source row is
// read once.
void to_panels(ThreadPool& pool, void* dst, DType dst_dtype, const void* src, DType src_dtype, int64_t out, int64_t in,
               int64_t panel_k, int64_t row_begin, int64_t row_end);

// Like embedding(), for a vocabulary shard: table holds ids [first_id, first_id + vocab); other ids give zero rows.
void embedding_shard(ThreadPool& pool, float* y, const int32_t* ids, int64_t n, const void* table, DType dtype, int64_t hidden,
                     int64_t first_id, int64_t vocab);

// Greedy choice per row: ids[r] = argmax (lowest id on ties) of logits row r (vocab entries, rows
// `stride` floats apart), logprobs[r] its log-softmax; rows with suppress_rows[r] set first mask the
// `suppress` ids to -inf, in place. A row with no finite maximum gets id -1 and a NaN logprob.
void greedy_rows(ThreadPool& pool, float* logits, int64_t rows, int64_t stride, int64_t vocab, const int32_t* suppress,
                 int64_t num_suppress, const uint8_t* suppress_rows, int32_t* ids, double* logprobs);


}  // namespace blossom
