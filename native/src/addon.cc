// N-API surface of the addon: memory mapping, allocation, the thread pool and the kernels.
// Declared for TypeScript in src/backend/native.ts; keep the two in step.
#include <napi.h>

#include <algorithm>
#include <memory>
#include <vector>
#include <mutex>
#include <string>
#include <unordered_map>

#include "kernels.h"
#include "memory.h"
#include "probes.h"
#include "quant.h"

namespace blossom {
namespace {

// Per-environment state: each worker thread that loads the addon gets its own pool.
struct Instance {
  std::unique_ptr<ThreadPool> pool;
};

Instance& instance(const Napi::Env& env) { return *env.GetInstanceData<Instance>(); }

// A Region (a file mapping or an anonymous allocation) is handed to JS as an opaque External.
// Weights are addressed as (region, byte offset), so a tensor may be larger than the biggest
// ArrayBuffer V8 allows (BLOOM-176B's embedding is 7 GB). Views (ArrayBuffers over part of a
// region) keep the region alive; release() frees it at once and detaches every live view.
struct Tracked {
  Region region;
  int refs = 1;  // the External itself, plus one per live view
  bool released = false;
  std::vector<Napi::Reference<Napi::ArrayBuffer>> views;
};

void unref(Tracked* t) {
  if (--t->refs > 0) return;
  if (!t->released) release_region(t->region);
  delete t;
}

Napi::Value wrap_region(Napi::Env env, const Region& r) {
  auto* t = new Tracked();
  t->region = r;
  return Napi::External<Tracked>::New(env, t, [](Napi::Env, Tracked* tr) { unref(tr); });
}

Tracked* region_arg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (!info[i].IsExternal()) throw Napi::TypeError::New(info.Env(), std::string(name) + ": expected a native region");
  Tracked* t = info[i].As<Napi::External<Tracked>>().Data();
  if (t->released) throw Napi::Error::New(info.Env(), std::string(name) + ": region was released");
  return t;
}

[[noreturn]] void type_error(Napi::Env env, const std::string& msg) { throw Napi::TypeError::New(env, msg); }
[[noreturn]] void range_error(Napi::Env env, const std::string& msg) { throw Napi::RangeError::New(env, msg); }

// A typed array argument as (pointer, length in elements, byte length).
template <typename T>
struct View {
  T* data;
  size_t length;
};

template <typename T>
View<T> typed(const Napi::CallbackInfo& info, size_t i, const char* name, napi_typedarray_type type, bool nullable = false) {
  Napi::Value v = info[i];
  if (nullable && (v.IsNull() || v.IsUndefined())) return View<T>{nullptr, 0};
  if (!v.IsTypedArray()) type_error(info.Env(), std::string(name) + ": expected a typed array");
  auto a = v.As<Napi::TypedArray>();
  if (a.TypedArrayType() != type) type_error(info.Env(), std::string(name) + ": wrong typed array type");
  auto* base = static_cast<uint8_t*>(a.ArrayBuffer().Data());
  if (!base && a.ElementLength() > 0) type_error(info.Env(), std::string(name) + ": buffer is detached");
  return View<T>{reinterpret_cast<T*>(base + a.ByteOffset()), a.ElementLength()};
}

View<float> f32(const Napi::CallbackInfo& info, size_t i, const char* name, bool nullable = false) {
  return typed<float>(info, i, name, napi_float32_array, nullable);
}
View<int32_t> i32(const Napi::CallbackInfo& info, size_t i, const char* name) {
  return typed<int32_t>(info, i, name, napi_int32_array);
}

int64_t integer(const Napi::CallbackInfo& info, size_t i, const char* name, int64_t min = 0) {
  if (!info[i].IsNumber()) type_error(info.Env(), std::string(name) + ": expected a number");
  double d = info[i].As<Napi::Number>().DoubleValue();
  int64_t v = static_cast<int64_t>(d);
  if (static_cast<double>(v) != d || v < min) range_error(info.Env(), std::string(name) + ": expected an integer >= " + std::to_string(min));
  return v;
}

DType dtype_arg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  int64_t d = integer(info, i, name);
  if (d > 3) range_error(info.Env(), std::string(name) + ": unknown dtype code " + std::to_string(d));
  return static_cast<DType>(d);
}

void need(const Napi::Env& env, bool ok, const std::string& msg) {
  if (!ok) range_error(env, msg);
}

template <typename A, typename B>
bool overlaps(const A* a, size_t an, const B* b, size_t bn) {
  if (!a || !b) return false;
  auto a0 = reinterpret_cast<uintptr_t>(a), a1 = a0 + an * sizeof(A);
  auto b0 = reinterpret_cast<uintptr_t>(b), b1 = b0 + bn * sizeof(B);
  return a0 < b1 && b0 < a1;
}

// ---- memory ----------------------------------------------------------------------------------

Napi::Value MapFile(const Napi::CallbackInfo& info) {
  if (!info[0].IsString()) type_error(info.Env(), "mapFile: expected a path");
  try {
    return wrap_region(info.Env(), map_file(info[0].As<Napi::String>().Utf8Value()));
  } catch (const std::exception& e) {
    throw Napi::Error::New(info.Env(), e.what());
  }
}

Napi::Value Allocate(const Napi::CallbackInfo& info) {
  int64_t bytes = integer(info, 0, "allocate: bytes");
  try {
    return wrap_region(info.Env(), allocate_pages(static_cast<size_t>(bytes)));
  } catch (const std::exception& e) {
    throw Napi::Error::New(info.Env(), e.what());
  }
}

Napi::Value RegionSize(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(region_arg(info, 0, "regionSize")->region.size));
}

// Byte range [offset, offset+length) of a region, checked.
uint8_t* region_bytes(const Napi::CallbackInfo& info, Tracked* t, int64_t offset, int64_t length, const char* name) {
  if (offset < 0 || length < 0 || static_cast<uint64_t>(offset) + static_cast<uint64_t>(length) > t->region.size)
    range_error(info.Env(), std::string(name) + ": byte range [" + std::to_string(offset) + ", " +
                                std::to_string(offset + length) + ") is outside the region of " +
                                std::to_string(t->region.size) + " bytes");
  return static_cast<uint8_t*>(t->region.data) + offset;
}

// view(region, byteOffset, byteLength) -> ArrayBuffer over that range (no copy).
Napi::Value View_(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  Tracked* t = region_arg(info, 0, "view");
  int64_t offset = integer(info, 1, "view: byteOffset");
  int64_t length = integer(info, 2, "view: byteLength");
  uint8_t* p = region_bytes(info, t, offset, length, "view");
  need(env, length <= (int64_t(1) << 32) - 1, "view: a view must be smaller than 4 GiB; address large tensors by region and offset");
  if (length == 0) return Napi::ArrayBuffer::New(env, 0);
  t->refs++;
  auto ab = Napi::ArrayBuffer::New(env, p, static_cast<size_t>(length), [](Napi::Env, void*, Tracked* tr) { unref(tr); }, t);
  // Forget views that have been collected, then remember this one weakly for release().
  auto& v = t->views;
  v.erase(std::remove_if(v.begin(), v.end(), [](Napi::Reference<Napi::ArrayBuffer>& r) { return r.IsEmpty() || r.Value().IsEmpty(); }), v.end());
  v.push_back(Napi::Weak(ab));
  return ab;
}

// Frees a region now (dispose()) and detaches its views, so later use fails loudly instead of reading freed memory.
Napi::Value Release(const Napi::CallbackInfo& info) {
  if (!info[0].IsExternal()) type_error(info.Env(), "release: expected a native region");
  Tracked* t = info[0].As<Napi::External<Tracked>>().Data();
  if (t->released) return Napi::Boolean::New(info.Env(), false);
  for (auto& r : t->views) {
    if (r.IsEmpty()) continue;
    Napi::ArrayBuffer ab = r.Value();
    if (!ab.IsEmpty() && !ab.IsDetached()) ab.Detach();
  }
  t->views.clear();
  release_region(t->region);
  t->released = true;
  return Napi::Boolean::New(info.Env(), true);
}

// advise(region, byteOffset, byteLength, 'willneed' | 'dontneed')
Napi::Value Advise(const Napi::CallbackInfo& info) {
  Tracked* t = region_arg(info, 0, "advise");
  int64_t offset = integer(info, 1, "advise: byteOffset");
  int64_t length = integer(info, 2, "advise: byteLength");
  uint8_t* p = region_bytes(info, t, offset, length, "advise");
  std::string how = info[3].As<Napi::String>().Utf8Value();
  if (how == "willneed") advise_willneed(p, static_cast<size_t>(length));
  else if (how == "dontneed") advise_dontneed(p, static_cast<size_t>(length));
  else type_error(info.Env(), "advise: expected 'willneed' or 'dontneed'");
  return info.Env().Undefined();
}

Napi::Value ResidentBytes(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(resident_bytes()));
}

// ---- machine and threads ---------------------------------------------------------------------

Napi::Value CpuInfo(const Napi::CallbackInfo& info) {
  const CpuFeatures& f = cpu_features();
  auto o = Napi::Object::New(info.Env());
  o.Set("model", f.model);
  o.Set("avx2", f.avx2);
  o.Set("fma", f.fma);
  o.Set("f16c", f.f16c);
  o.Set("avx512f", f.avx512f);
  o.Set("logicalCores", f.logical_cores);
  o.Set("physicalCores", f.physical_cores);
  return o;
}

Napi::Value SetThreads(const Napi::CallbackInfo& info) {
  int64_t n = integer(info, 0, "setThreads: threads", 1);
  need(info.Env(), n <= 1024, "setThreads: at most 1024 threads");
  auto& inst = instance(info.Env());
  if (!inst.pool || inst.pool->size() != n) inst.pool = std::make_unique<ThreadPool>(static_cast<int>(n));
  return info.Env().Undefined();
}

Napi::Value GetThreads(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), instance(info.Env()).pool->size());
}

Napi::Value SetVariant(const Napi::CallbackInfo& info) {
  std::string v = info[0].As<Napi::String>().Utf8Value();
  if (v == "scalar") set_variant(Variant::Scalar);
  else if (v == "avx2") {
    if (!set_variant(Variant::Avx2)) range_error(info.Env(), "setKernelVariant: this CPU lacks AVX2/FMA/F16C");
  } else if (v == "auto") {
    const CpuFeatures& f = cpu_features();
    set_variant(f.avx2 && f.fma && f.f16c ? Variant::Avx2 : Variant::Scalar);
  } else type_error(info.Env(), "setKernelVariant: expected 'scalar', 'avx2' or 'auto'");
  return info.Env().Undefined();
}

Napi::Value GetVariant(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), active_variant() == Variant::Avx2 ? "avx2" : "scalar");
}

// ---- kernels ---------------------------------------------------------------------------------

// linear(y, x, rows, wRegion, wOffset, wDtype, outFeatures, inFeatures, bias|null, epilogue, residual|null)
Napi::Value Linear(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  auto y = f32(info, 0, "linear: y");
  auto x = f32(info, 1, "linear: x");
  int64_t rows = integer(info, 2, "linear: rows");
  Tracked* wr = region_arg(info, 3, "linear: weight");
  int64_t woff = integer(info, 4, "linear: weight offset");
  DType dt = dtype_arg(info, 5, "linear: weight dtype");
  int64_t out = integer(info, 6, "linear: outFeatures", 1);
  int64_t in = integer(info, 7, "linear: inFeatures", 1);
  auto bias = f32(info, 8, "linear: bias", true);
  int64_t epi = integer(info, 9, "linear: epilogue");
  auto res = f32(info, 10, "linear: residual", true);
  need(env, dt != DType::I8, "linear: int8 weights need linearInt8");
  const uint8_t* wdata = region_bytes(info, wr, woff, out * in * static_cast<int64_t>(dtype_size(dt)), "linear: weight");
  need(env, x.length >= static_cast<size_t>(rows * in), "linear: x is shorter than rows*in");
  need(env, y.length >= static_cast<size_t>(rows * out), "linear: y is shorter than rows*out");
  need(env, !bias.data || bias.length >= static_cast<size_t>(out), "linear: bias is shorter than out");
  need(env, !res.data || res.length >= static_cast<size_t>(rows * out), "linear: residual is shorter than rows*out");
  need(env, epi == kNone || epi == kGelu, "linear: unknown epilogue");
  need(env, !overlaps(y.data, rows * out, x.data, rows * in), "linear: y must not overlap x");
  need(env, !overlaps(y.data, rows * out, res.data, res.data ? rows * out : 0), "linear: y must not overlap residual");
  WeightMatrix wm{wdata, dt, out, in};
  linear(*instance(env).pool, y.data, x.data, rows, wm, bias.data, static_cast<int>(epi), res.data);
  return env.Undefined();
}

// layerNorm(y, x, rows, cols, gamma, beta, eps)
Napi::Value LayerNorm(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  auto y = f32(info, 0, "layerNorm: y");
  auto x = f32(info, 1, "layerNorm: x");
  int64_t rows = integer(info, 2, "layerNorm: rows");
  int64_t cols = integer(info, 3, "layerNorm: cols", 1);
  auto g = f32(info, 4, "layerNorm: gamma");
  auto b = f32(info, 5, "layerNorm: beta");
  float eps = info[6].As<Napi::Number>().FloatValue();
  need(env, x.length >= static_cast<size_t>(rows * cols) && y.length >= static_cast<size_t>(rows * cols),
       "layerNorm: x or y is shorter than rows*cols");
  need(env, g.length >= static_cast<size_t>(cols) && b.length >= static_cast<size_t>(cols), "layerNorm: gamma/beta shorter than cols");
  layer_norm(*instance(env).pool, y.data, x.data, rows, cols, g.data, b.data, eps);
  return env.Undefined();
}

// embedding(y, ids, tableRegion, tableOffset, dtype, vocab, hidden)
Napi::Value Embedding(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  auto y = f32(info, 0, "embedding: y");
  auto ids = i32(info, 1, "embedding: ids");
  Tracked* tr = region_arg(info, 2, "embedding: table");
  int64_t toff = integer(info, 3, "embedding: table offset");
  DType dt = dtype_arg(info, 4, "embedding: dtype");
  int64_t vocab = integer(info, 5, "embedding: vocab", 1);
  int64_t hidden = integer(info, 6, "embedding: hidden", 1);
  need(env, dt != DType::I8, "embedding: int8 tables are not supported");
  const uint8_t* table = region_bytes(info, tr, toff, vocab * hidden * static_cast<int64_t>(dtype_size(dt)), "embedding: table");
  need(env, y.length >= ids.length * static_cast<size_t>(hidden), "embedding: y is shorter than ids*hidden");
  for (size_t i = 0; i < ids.length; ++i)
    if (ids.data[i] < 0 || ids.data[i] >= vocab)
      range_error(env, "embedding: token id " + std::to_string(ids.data[i]) + " at index " + std::to_string(i) +
                           " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
  embedding(*instance(env).pool, y.data, ids.data, static_cast<int64_t>(ids.length), table, dt, hidden);
  return env.Undefined();
}

// convert(dstRegion, dstOffset, dstDtype, srcRegion, srcOffset, srcDtype, n)
Napi::Value Convert(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  Tracked* dr = region_arg(info, 0, "convert: dst");
  int64_t doff = integer(info, 1, "convert: dst offset");
  DType dd = dtype_arg(info, 2, "convert: dst dtype");
  Tracked* sr = region_arg(info, 3, "convert: src");
  int64_t soff = integer(info, 4, "convert: src offset");
  DType sd = dtype_arg(info, 5, "convert: src dtype");
  int64_t n = integer(info, 6, "convert: n");
  need(env, dd != DType::I8 && sd != DType::I8, "convert: int8 goes through quantize");
  uint8_t* dst = region_bytes(info, dr, doff, n * static_cast<int64_t>(dtype_size(dd)), "convert: dst");
  const uint8_t* src = region_bytes(info, sr, soff, n * static_cast<int64_t>(dtype_size(sd)), "convert: src");
  convert(*instance(env).pool, dst, dd, src, sd, n);
  return env.Undefined();
}

// attention(out, qkv, numTokens, numHeads, headDim, kCache, vCache, blockSize, seqs, blockTable, slopes)
Napi::Value Attention(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  AttentionArgs a{};
  auto out = f32(info, 0, "attention: out");
  auto qkv = f32(info, 1, "attention: qkv");
  a.num_tokens = integer(info, 2, "attention: numTokens");
  a.num_heads = static_cast<int>(integer(info, 3, "attention: numHeads", 1));
  a.head_dim = static_cast<int>(integer(info, 4, "attention: headDim", 1));
  auto kc = f32(info, 5, "attention: kCache");
  auto vc = f32(info, 6, "attention: vCache");
  a.block_size = static_cast<int>(integer(info, 7, "attention: blockSize", 1));
  auto seqs = i32(info, 8, "attention: seqs");
  auto table = i32(info, 9, "attention: blockTable");
  auto slopes = f32(info, 10, "attention: slopes");
  const int64_t width = static_cast<int64_t>(a.num_heads) * a.head_dim;
  need(env, out.length >= static_cast<size_t>(a.num_tokens * width), "attention: out is shorter than tokens*heads*headDim");
  need(env, qkv.length >= static_cast<size_t>(a.num_tokens * width * 3), "attention: qkv is shorter than tokens*3*heads*headDim");
  need(env, kc.length == vc.length, "attention: k and v caches differ in size");
  const int64_t block_floats = width * a.block_size;
  need(env, kc.length % block_floats == 0, "attention: cache size is not a whole number of blocks");
  need(env, seqs.length % 4 == 0, "attention: seqs must hold 4 ints per sequence");
  need(env, slopes.length >= static_cast<size_t>(a.num_heads), "attention: fewer slopes than heads");
  need(env, !overlaps(out.data, out.length, qkv.data, qkv.length), "attention: out must not overlap qkv");
  a.out = out.data;
  a.qkv = qkv.data;
  a.k_cache = kc.data;
  a.v_cache = vc.data;
  a.num_blocks = static_cast<int64_t>(kc.length) / block_floats;
  a.seqs = seqs.data;
  a.num_seqs = static_cast<int>(seqs.length / 4);
  a.block_table = table.data;
  a.block_table_len = static_cast<int64_t>(table.length);
  a.slopes = slopes.data;
  try {
    attention(*instance(env).pool, a);
  } catch (const std::range_error& e) {
    range_error(env, e.what());
  }
  return env.Undefined();
}

// ---- int8 (native/src/quant.cc) -------------------------------------------------------------------

// An int8 matrix's two tensors, checked: q (out, in) int8 and scales (out, ceil(in / group)) fp16.
QuantWeights quant_weights_arg(const Napi::CallbackInfo& info, size_t i, int64_t out, int64_t in, int64_t group, const char* name) {
  auto env = info.Env();
  Tracked* qr = region_arg(info, i, name);
  int64_t qoff = integer(info, i + 1, "int8: q offset");
  Tracked* sr = region_arg(info, i + 2, name);
  int64_t soff = integer(info, i + 3, "int8: scales offset");
  need(env, group >= 1, std::string(name) + ": group size must be >= 1");
  need(env, soff % 2 == 0, std::string(name) + ": scales must start at an even byte offset");
  QuantWeights w{};
  w.out_features = out;
  w.in_features = in;
  w.group_size = group;
  w.q = reinterpret_cast<const int8_t*>(region_bytes(info, qr, qoff, out * in, name));
  w.scales = reinterpret_cast<const uint16_t*>(region_bytes(info, sr, soff, out * w.groups() * 2, name));
  return w;
}

// quantizeWeights(qRegion, qOffset, sRegion, sOffset, srcRegion, srcOffset, srcDtype, out, in, groupSize)
Napi::Value QuantizeWeights(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  int64_t out = integer(info, 7, "quantizeWeights: out", 1);
  int64_t in = integer(info, 8, "quantizeWeights: in", 1);
  int64_t group = integer(info, 9, "quantizeWeights: groupSize", 1);
  QuantWeights w = quant_weights_arg(info, 0, out, in, group, "quantizeWeights: destination");
  Tracked* src = region_arg(info, 4, "quantizeWeights: source");
  int64_t srcoff = integer(info, 5, "quantizeWeights: source offset");
  DType sd = dtype_arg(info, 6, "quantizeWeights: source dtype");
  need(env, sd != DType::I8, "quantizeWeights: the source is already int8");
  const uint8_t* sp = region_bytes(info, src, srcoff, out * in * static_cast<int64_t>(dtype_size(sd)), "quantizeWeights: source");
  quantize_weights(*instance(env).pool, const_cast<int8_t*>(w.q), const_cast<uint16_t*>(w.scales), sp, sd, out, in, group);
  return env.Undefined();
}

// linearInt8(y, x, rows, qRegion, qOffset, sRegion, sOffset, out, in, groupSize, bias|null, epilogue, residual|null,
//            activationMode, threshold) -> outlier features found (mode 2), else 0
Napi::Value LinearInt8(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  auto y = f32(info, 0, "linearInt8: y");
  auto x = f32(info, 1, "linearInt8: x");
  int64_t rows = integer(info, 2, "linearInt8: rows");
  int64_t out = integer(info, 7, "linearInt8: outFeatures", 1);
  int64_t in = integer(info, 8, "linearInt8: inFeatures", 1);
  int64_t group = integer(info, 9, "linearInt8: groupSize", 1);
  QuantWeights w = quant_weights_arg(info, 3, out, in, group, "linearInt8: weight");
  auto bias = f32(info, 10, "linearInt8: bias", true);
  int64_t epi = integer(info, 11, "linearInt8: epilogue");
  auto res = f32(info, 12, "linearInt8: residual", true);
  int64_t mode = integer(info, 13, "linearInt8: activationMode");
  float threshold = info[14].As<Napi::Number>().FloatValue();
  need(env, x.length >= static_cast<size_t>(rows * in), "linearInt8: x is shorter than rows*in");
  need(env, y.length >= static_cast<size_t>(rows * out), "linearInt8: y is shorter than rows*out");
  need(env, !bias.data || bias.length >= static_cast<size_t>(out), "linearInt8: bias is shorter than out");
  need(env, !res.data || res.length >= static_cast<size_t>(rows * out), "linearInt8: residual is shorter than rows*out");
  need(env, epi == kNone || epi == kGelu, "linearInt8: unknown epilogue");
  need(env, mode >= 0 && mode <= 2, "linearInt8: activationMode must be 0 (exact), 1 (grouped) or 2 (mixed)");
  need(env, !overlaps(y.data, rows * out, x.data, rows * in), "linearInt8: y must not overlap x");
  need(env, !overlaps(y.data, rows * out, res.data, res.data ? rows * out : 0), "linearInt8: y must not overlap residual");
  Int8LinearArgs a{y.data, x.data, rows, w, bias.data, static_cast<int>(epi), res.data, static_cast<ActivationMode>(mode), threshold};
  return Napi::Number::New(env, static_cast<double>(linear_int8(*instance(env).pool, a)));
}

// embeddingInt8(y, ids, qRegion, qOffset, sRegion, sOffset, vocab, hidden, groupSize)
Napi::Value EmbeddingInt8(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  auto y = f32(info, 0, "embeddingInt8: y");
  auto ids = i32(info, 1, "embeddingInt8: ids");
  int64_t vocab = integer(info, 6, "embeddingInt8: vocab", 1);
  int64_t hidden = integer(info, 7, "embeddingInt8: hidden", 1);
  int64_t group = integer(info, 8, "embeddingInt8: groupSize", 1);
  QuantWeights t = quant_weights_arg(info, 2, vocab, hidden, group, "embeddingInt8: table");
  need(env, y.length >= ids.length * static_cast<size_t>(hidden), "embeddingInt8: y is shorter than ids*hidden");
  for (size_t i = 0; i < ids.length; ++i)
    if (ids.data[i] < 0 || ids.data[i] >= vocab)
      range_error(env, "embeddingInt8: token id " + std::to_string(ids.data[i]) + " at index " + std::to_string(i) +
                           " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
  embedding_int8(*instance(env).pool, y.data, ids.data, static_cast<int64_t>(ids.length), t);
  return env.Undefined();
}

// ---- probes and benchmark inputs ---------------------------------------------------------------

// probeReadBandwidth(bytes, threads, runs) -> GB/s
Napi::Value ProbeReadBandwidth(const Napi::CallbackInfo& info) {
  int64_t bytes = integer(info, 0, "probeReadBandwidth: bytes", 1 << 20);
  int64_t threads = integer(info, 1, "probeReadBandwidth: threads", 1);
  int64_t runs = info.Length() > 2 && !info[2].IsUndefined() ? integer(info, 2, "probeReadBandwidth: runs", 1) : 5;
  try {
    return Napi::Number::New(info.Env(), probe_read_bandwidth(static_cast<size_t>(bytes), static_cast<int>(threads), static_cast<int>(runs)));
  } catch (const std::exception& e) {
    throw Napi::Error::New(info.Env(), e.what());
  }
}

// probeFmaPeak(threads, runs) -> GFLOP/s
Napi::Value ProbeFmaPeak(const Napi::CallbackInfo& info) {
  int64_t threads = integer(info, 0, "probeFmaPeak: threads", 1);
  int64_t runs = info.Length() > 1 && !info[1].IsUndefined() ? integer(info, 1, "probeFmaPeak: runs", 1) : 5;
  return Napi::Number::New(info.Env(), probe_fma_peak(static_cast<int>(threads), static_cast<int>(runs)));
}

// fillRandom(region, byteOffset, dtype, count, seed, scale)
Napi::Value FillRandom(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  Tracked* t = region_arg(info, 0, "fillRandom: region");
  int64_t off = integer(info, 1, "fillRandom: byteOffset");
  DType dt = dtype_arg(info, 2, "fillRandom: dtype");
  int64_t n = integer(info, 3, "fillRandom: count");
  int64_t seed = integer(info, 4, "fillRandom: seed");
  float scale = info[5].As<Napi::Number>().FloatValue();
  uint8_t* p = region_bytes(info, t, off, n * static_cast<int64_t>(dtype_size(dt)), "fillRandom");
  fill_random(*instance(env).pool, p, dt, n, static_cast<uint64_t>(seed), scale);
  return env.Undefined();
}

}  // namespace

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* inst = new Instance();
  int threads = cpu_features().physical_cores;
  inst->pool = std::make_unique<ThreadPool>(threads);
  env.SetInstanceData<Instance>(inst);
  exports.Set("mapFile", Napi::Function::New(env, MapFile));
  exports.Set("allocate", Napi::Function::New(env, Allocate));
  exports.Set("release", Napi::Function::New(env, Release));
  exports.Set("regionSize", Napi::Function::New(env, RegionSize));
  exports.Set("view", Napi::Function::New(env, View_));
  exports.Set("advise", Napi::Function::New(env, Advise));
  exports.Set("residentBytes", Napi::Function::New(env, ResidentBytes));
  exports.Set("cpuInfo", Napi::Function::New(env, CpuInfo));
  exports.Set("setThreads", Napi::Function::New(env, SetThreads));
  exports.Set("getThreads", Napi::Function::New(env, GetThreads));
  exports.Set("setKernelVariant", Napi::Function::New(env, SetVariant));
  exports.Set("getKernelVariant", Napi::Function::New(env, GetVariant));
  exports.Set("linear", Napi::Function::New(env, Linear));
  exports.Set("layerNorm", Napi::Function::New(env, LayerNorm));
  exports.Set("embedding", Napi::Function::New(env, Embedding));
  exports.Set("convert", Napi::Function::New(env, Convert));
  exports.Set("attention", Napi::Function::New(env, Attention));
  exports.Set("probeReadBandwidth", Napi::Function::New(env, ProbeReadBandwidth));
  exports.Set("probeFmaPeak", Napi::Function::New(env, ProbeFmaPeak));
  exports.Set("fillRandom", Napi::Function::New(env, FillRandom));
  exports.Set("quantizeWeights", Napi::Function::New(env, QuantizeWeights));
  exports.Set("linearInt8", Napi::Function::New(env, LinearInt8));
  exports.Set("embeddingInt8", Napi::Function::New(env, EmbeddingInt8));
  return exports;
}

}  // namespace blossom

static Napi::Object InitAddon(Napi::Env env, Napi::Object exports) { return blossom::Init(env, exports); }

NODE_API_MODULE(blossom_native, InitAddon)
