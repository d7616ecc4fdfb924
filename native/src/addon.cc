// N-API surface of the addon: memory mapping, allocation, the thread pool and the kernels.
// Declared for TypeScript in src/backend/native.ts; keep the two in step.
#include <napi.h>

#ifdef __linux__
#include <pthread.h>
#include <sched.h>
#endif

#include <algorithm>
#include <initializer_list>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <vector>
#include <mutex>
#include <string>
#include <unordered_map>

#include "io.h"
#include "mpi_bindings.h"
#include "kernels.h"
#include "memory.h"
#include <cmath>
#include "probes.h"
#include "quant.h"

namespace blossom {
namespace {

// Per-environment state: each worker thread that loads the addon gets its own pool.
struct Instance {
  std::unique_ptr<ThreadPool> pool;  // the default pool: --threads, caller included
  std::vector<std::unique_ptr<ThreadPool>> devices;  // pipeline devices: dedicated pools pinned to cores
  ThreadPool* active = nullptr;  // where kernels run now: a device pool, or null for the default pool
#ifdef __linux__
  bool saved_affinity = false;
  cpu_set_t affinity;  // the calling thread's own, restored when it leaves the devices
#endif
  std::unique_ptr<FileReader> reader;  // started on first use (disk offload)
};

Instance& instance(const Napi::Env& env) { return *env.GetInstanceData<Instance>(); }

// The pool kernels run on: the active pipeline device's, else the default one.
ThreadPool& compute(const Napi::Env& env) {
  Instance& inst = instance(env);
  return inst.active ? *inst.active : *inst.pool;
}

// A Region (a file mapping or an anonymous allocation) is handed to JS as an opaque External.
// Weights are addressed as (region, byte offset), so a tensor may be larger than the biggest
// ArrayBuffer V8 allows (BLOOM-176B's embedding is 7 GB). Views (ArrayBuffers over part of a
// region) keep the region alive; release() frees it at once and detaches every live view.
struct Tracked {
  Region region;
  std::shared_ptr<Region> shared;  // file mappings, shared by every thread that maps the same file
  int refs = 1;  // the External itself, plus one per live view
  bool released = false;
  std::vector<Napi::Reference<Napi::ArrayBuffer>> views;
};

void free_memory(Tracked* t) {
  if (t->shared) t->shared.reset();  // unmapped when no other thread holds it
  else release_region(t->region);
}

void unref(Tracked* t) {
  if (--t->refs > 0) return;
  if (!t->released) free_memory(t);
  delete t;
}

// Type tags for the addon's Externals, so that one kind handed where another is expected is refused,
// not reinterpreted (a chain read as a region would be memory corruption).
const napi_type_tag kRegionTag = {0x8f1c2b7a44d35e01ULL, 0x9a6e0c3d51b2f407ULL};
const napi_type_tag kChainTag = {0x2d7e915c08a34b6fULL, 0xc41f5a2e9b703d18ULL};

Napi::Value wrap_region(Napi::Env env, const Region& r, std::shared_ptr<Region> shared = nullptr) {
  auto* t = new Tracked();
  t->region = r;
  t->shared = std::move(shared);
  auto external = Napi::External<Tracked>::New(env, t, [](Napi::Env, Tracked* tr) { unref(tr); });
  external.TypeTag(&kRegionTag);
  return external;
}

bool is_region(Napi::Value v) {
  return v.IsExternal() && v.As<Napi::Object>().CheckTypeTag(&kRegionTag);
}

Tracked* region_arg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (!is_region(info[i])) throw Napi::TypeError::New(info.Env(), std::string(name) + ": expected a native region");
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
    auto shared = map_file_shared(info[0].As<Napi::String>().Utf8Value());
    return wrap_region(info.Env(), *shared, shared);
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

// allocAligned(bytes) -> a zeroed ArrayBuffer whose data starts on a 64-byte boundary, freed when
// collected. Activations go in these: the kernels' 32-byte loads of x then never split a cache line
// (a 16-byte-aligned x costs the bf16 GEMV ~17 % of its compute-bound rate). From 1 MiB up the
// buffer is fresh anonymous memory of its own, resident only where it is written (a KV cache sized
// for its capacity costs only the tokens written; calloc may hand back recycled, resident memory).
Napi::Value AllocAligned(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  int64_t bytes = integer(info, 0, "allocAligned: bytes");
  need(env, bytes <= (int64_t(1) << 32) - 1, "allocAligned: a buffer must be smaller than 4 GiB");
  if (bytes == 0) return Napi::ArrayBuffer::New(env, 0);
  struct Block {
    Region pages;  // set for page-backed buffers
    void* base;    // else the calloc'd block
    size_t size;
  };
  Block* block;
  void* data;
  if (bytes >= (int64_t(1) << 20)) {
    Region pages;
    try {
      pages = allocate_pages(static_cast<size_t>(bytes), /*huge=*/false);  // KV caches fill token by token
    } catch (const std::exception& e) {
      throw Napi::Error::New(env, std::string("allocAligned: ") + e.what());
    }
    block = new Block{pages, nullptr, pages.size};
    data = pages.data;
  } else {
    const size_t size = static_cast<size_t>(bytes) + 64;
    void* base = std::calloc(1, size);
    if (!base) throw Napi::Error::New(env, "allocAligned: cannot allocate " + std::to_string(bytes) + " bytes");
    block = new Block{Region{}, base, size};
    data = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(base) + 63) & ~uintptr_t(63));
  }
  Napi::MemoryManagement::AdjustExternalMemory(env, static_cast<int64_t>(block->size));
  return Napi::ArrayBuffer::New(
      env, data, static_cast<size_t>(bytes),
      [](Napi::Env e, void*, Block* b) {
        Napi::MemoryManagement::AdjustExternalMemory(e, -static_cast<int64_t>(b->size));
        if (b->base) std::free(b->base);
        else release_region(b->pages);
        delete b;
      },
      block);
}

Napi::Value RegionSize(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(region_arg(info, 0, "regionSize")->region.size));
}

// Byte range [offset, offset+length) of a region, checked.
// The byte length of a tensor from its dimensions and element size, refused if the product does not
// fit 63 bits (a wrapped product would pass the bounds checks with a tiny length).
int64_t product(const Napi::CallbackInfo& info, const char* name, std::initializer_list<int64_t> factors) {
  int64_t p = 1;
  for (int64_t f : factors) {
    if (f < 0 || __builtin_mul_overflow(p, f, &p)) range_error(info.Env(), std::string(name) + ": size overflows");
  }
  return p;
}

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
  if (!is_region(info[0])) type_error(info.Env(), "release: expected a native region");
  Tracked* t = info[0].As<Napi::External<Tracked>>().Data();
  if (t->released) return Napi::Boolean::New(info.Env(), false);
  for (auto& r : t->views) {
    if (r.IsEmpty()) continue;
    Napi::ArrayBuffer ab = r.Value();
    if (!ab.IsEmpty() && !ab.IsDetached()) ab.Detach();
  }
  t->views.clear();
  free_memory(t);
  t->released = true;
  return Napi::Boolean::New(info.Env(), true);
}

// advise(region, byteOffset, byteLength, 'willneed' | 'dontneed' | 'nohugepage')
Napi::Value Advise(const Napi::CallbackInfo& info) {
  Tracked* t = region_arg(info, 0, "advise");
  int64_t offset = integer(info, 1, "advise: byteOffset");
  int64_t length = integer(info, 2, "advise: byteLength");
  uint8_t* p = region_bytes(info, t, offset, length, "advise");
  std::string how = info[3].As<Napi::String>().Utf8Value();
  if (how == "willneed") advise_willneed(p, static_cast<size_t>(length));
  else if (how == "dontneed") advise_dontneed(p, static_cast<size_t>(length));
  else if (how == "nohugepage") advise_nohugepage(p, static_cast<size_t>(length));
  else type_error(info.Env(), "advise: expected 'willneed', 'dontneed' or 'nohugepage'");
  return info.Env().Undefined();
}

// settleFilePages(fileRegion, ranges: Float64Array of (byteOffset, byteLength) pairs)
//   -> { eligibleBytes, beforeBytes, afterBytes, reread } (memory.h, settle_file_pages); all 0 for
//   a region that is not a file mapping
Napi::Value SettleFilePages(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  Tracked* t = region_arg(info, 0, "settleFilePages");
  auto ranges = typed<double>(info, 1, "settleFilePages: ranges", napi_float64_array);
  if (ranges.length % 2 != 0) range_error(env, "settleFilePages: ranges must hold (byteOffset, byteLength) pairs");
  std::vector<std::pair<size_t, size_t>> list;
  for (size_t i = 0; i < ranges.length; i += 2) {
    const double o = ranges.data[i], n = ranges.data[i + 1];
    if (!(o >= 0 && n >= 0 && o + n <= static_cast<double>(t->region.size)) || o != std::floor(o) || n != std::floor(n)) {
      range_error(env, "settleFilePages: range " + std::to_string(i / 2) + " is not inside the mapping");
    }
    list.emplace_back(static_cast<size_t>(o), static_cast<size_t>(n));
  }
  SettleReport rep = t->shared ? settle_file_pages(t->region, list) : SettleReport{};
  auto o = Napi::Object::New(env);
  o.Set("eligibleBytes", Napi::Number::New(env, static_cast<double>(rep.eligible)));
  o.Set("beforeBytes", Napi::Number::New(env, static_cast<double>(rep.before)));
  o.Set("afterBytes", Napi::Number::New(env, static_cast<double>(rep.after)));
  o.Set("reread", Napi::Boolean::New(env, rep.reread));
  return o;
}

// residentBytes() -> this process's resident set; residentBytes(buffer) -> how much of that
// ArrayBuffer or typed array lies in resident pages (unaffected by anything else the process frees).
Napi::Value ResidentBytes(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  if (info.Length() == 0 || info[0].IsUndefined()) return Napi::Number::New(env, static_cast<double>(resident_bytes()));
  const void* data = nullptr;
  size_t size = 0;
  if (info[0].IsArrayBuffer()) {
    auto ab = info[0].As<Napi::ArrayBuffer>();
    data = ab.Data(), size = ab.ByteLength();
  } else if (info[0].IsTypedArray()) {
    auto ta = info[0].As<Napi::TypedArray>();
    data = static_cast<const uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset(), size = ta.ByteLength();
  } else {
    type_error(env, "residentBytes: expected nothing, an ArrayBuffer or a typed array");
  }
  return Napi::Number::New(env, static_cast<double>(resident_bytes_in(data, size)));
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
  o.Set("avxVnni", f.avx_vnni);
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

// createDevices(cpuSets: number[][]): one dedicated pool per device, pinned to its cores.
Napi::Value CreateDevices(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  if (!info[0].IsArray()) type_error(env, "createDevices: expected an array of core lists");
  auto sets = info[0].As<Napi::Array>();
  auto& inst = instance(env);
#ifdef __linux__
  if (inst.active && inst.saved_affinity) pthread_setaffinity_np(pthread_self(), sizeof inst.affinity, &inst.affinity);
#endif
  inst.active = nullptr;
  inst.devices.clear();
  for (uint32_t d = 0; d < sets.Length(); ++d) {
    auto cores = sets.Get(d).As<Napi::Array>();
    std::vector<int> cpus;
    for (uint32_t c = 0; c < cores.Length(); ++c) cpus.push_back(cores.Get(c).As<Napi::Number>().Int32Value());
    need(env, !cpus.empty(), "createDevices: device " + std::to_string(d) + " has no cores");
    inst.devices.push_back(std::make_unique<ThreadPool>(static_cast<int>(cpus.size()), cpus));
  }
  return env.Undefined();
}

// useDevice(index): kernels run on that device's pool from now on; -1: the default pool.
Napi::Value UseDevice(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  int64_t d = integer(info, 0, "useDevice: index", -1);
  auto& inst = instance(env);
  need(env, d < static_cast<int64_t>(inst.devices.size()), "useDevice: no device " + std::to_string(d));
  ThreadPool* next = d < 0 ? nullptr : inst.devices[static_cast<size_t>(d)].get();
  if (next == inst.active) return env.Undefined();
#ifdef __linux__
  // The calling thread takes part in the device's work: pin it to the device's cores meanwhile.
  if (next) {
    if (!inst.saved_affinity) inst.saved_affinity = pthread_getaffinity_np(pthread_self(), sizeof inst.affinity, &inst.affinity) == 0;
    cpu_set_t set;
    CPU_ZERO(&set);
    for (int c : next->cpus()) CPU_SET(c, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
  } else if (inst.saved_affinity) {
    pthread_setaffinity_np(pthread_self(), sizeof inst.affinity, &inst.affinity);
  }
#endif
  inst.active = next;
  return env.Undefined();
}

Napi::Value GetThreads(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), instance(info.Env()).pool->size());
}

Napi::Value SetVariant(const Napi::CallbackInfo& info) {
  std::string v = info[0].As<Napi::String>().Utf8Value();
  const CpuFeatures& f = cpu_features();
  if (v == "scalar") {
    set_variant(Variant::Scalar);
    set_avx_vnni(false);
  } else if (v == "avx2" || v == "avx2-vnni") {
    if (!set_variant(Variant::Avx2)) range_error(info.Env(), "setKernelVariant: this CPU lacks AVX2/FMA/F16C");
    if (!set_avx_vnni(v == "avx2-vnni")) range_error(info.Env(), "setKernelVariant: this CPU lacks AVX-VNNI");
  } else if (v == "auto") {
    const bool avx2 = f.avx2 && f.fma && f.f16c;
    set_variant(avx2 ? Variant::Avx2 : Variant::Scalar);
    set_avx_vnni(avx2 && f.avx_vnni);
  } else type_error(info.Env(), "setKernelVariant: expected 'scalar', 'avx2', 'avx2-vnni' or 'auto'");
  return info.Env().Undefined();
}

Napi::Value GetVariant(const Napi::CallbackInfo& info) {
  if (active_variant() == Variant::Scalar) return Napi::String::New(info.Env(), "scalar");
  return Napi::String::New(info.Env(), use_avx_vnni() ? "avx2-vnni" : "avx2");
}

// ---- kernels ---------------------------------------------------------------------------------

// linear(y, x, rows, wRegion, wOffset, wDtype, outFeatures, inFeatures, bias|null, epilogue, residual|null[, panelK])
// panelK (default 0): W is stored in column panels of panelK inputs (kernels.h WeightMatrix).
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
  const int64_t panel_k = info.Length() > 11 && !info[11].IsUndefined() ? integer(info, 11, "linear: panelK") : 0;
  need(env, dt != DType::I8, "linear: int8 weights need linearInt8");
  const uint8_t* wdata = region_bytes(info, wr, woff, product(info, "linear: weight", {out, in, static_cast<int64_t>(dtype_size(dt))}), "linear: weight");
  need(env, x.length >= static_cast<size_t>(product(info, "linear: x", {rows, in})), "linear: x is shorter than rows*in");
  need(env, y.length >= static_cast<size_t>(product(info, "linear: y", {rows, out})), "linear: y is shorter than rows*out");
  need(env, !bias.data || bias.length >= static_cast<size_t>(out), "linear: bias is shorter than out");
  need(env, !res.data || res.length >= static_cast<size_t>(rows * out), "linear: residual is shorter than rows*out");
  need(env, epi == kNone || epi == kGelu, "linear: unknown epilogue");
  need(env, !overlaps(y.data, rows * out, x.data, rows * in), "linear: y must not overlap x");
  need(env, !overlaps(y.data, rows * out, res.data, res.data ? rows * out : 0), "linear: y must not overlap residual");
  WeightMatrix wm{wdata, dt, out, in, panel_k};
  linear(compute(env), y.data, x.data, rows, wm, bias.data, static_cast<int>(epi), res.data);
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
  const int64_t n = product(info, "layerNorm: x", {rows, cols});
  need(env, x.length >= static_cast<size_t>(n) && y.length >= static_cast<size_t>(n), "layerNorm: x or y is shorter than rows*cols");
  need(env, g.length >= static_cast<size_t>(cols) && b.length >= static_cast<size_t>(cols), "layerNorm: gamma/beta shorter than cols");
  layer_norm(compute(env), y.data, x.data, rows, cols, g.data, b.data, eps);
  return env.Undefined();
}

// ---- chains of single-row ops (run_chain) ----------------------------------------------------
// createChain(ops) -> chain; runChain(chain, seqs?, blockTable?) runs its ops (-> true if as one pool job, false if one by one). An op is [0, y, x, cols, gamma, beta, eps] (layer norm of one row) or
// [1, y, x, wRegion, wOffset, wDtype, outFeatures, inFeatures, panelK, bias|null, epilogue, residual|null]
// (linear of one row) or [2, out, qkv, kCache, vCache, kvDtype, numHeads, headDim, blockSize, slopes]
// or [3, y, x, qRegion, qOffset, scalesRegion, scalesOffset, outFeatures, inFeatures, groupSize,
// activationMode, threshold, bias|null, epilogue, residual|null] (linearInt8 of one row)
// (attention of one token; runChain's seqs and blockTable give its batch, as attention() takes it). The chain keeps its arrays and weight regions alive; a region released since (the model
// disposed) makes runChain throw instead of reading freed memory.
struct ChainArray {
  Napi::Reference<Napi::Value> ref;  // the typed array, kept alive
  const void* data;                  // where its elements started
  size_t bytes;                      // how many of its bytes the op uses
};
struct Chain {
  std::vector<ChainOp> ops;
  std::vector<ChainArray> arrays;
  std::vector<Tracked*> regions;
  bool attention = false;  // holds an attention op (runChain needs the batch)
  ~Chain() {
    for (Tracked* t : regions) unref(t);
  }
};

// A typed array of `type` given as a value (an element of an op list); else "<name>: expected <what>".
template <typename T>
View<T> typed_value(const Napi::Env& env, Napi::Value v, const std::string& name, napi_typedarray_type type, const char* what) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != type) type_error(env, name + ": expected " + what);
  auto a = v.As<Napi::TypedArray>();
  auto* base = static_cast<uint8_t*>(a.ArrayBuffer().Data());
  if (!base && a.ElementLength() > 0) type_error(env, name + ": buffer is detached");
  return View<T>{reinterpret_cast<T*>(base + a.ByteOffset()), a.ElementLength()};
}

View<float> f32_value(const Napi::Env& env, Napi::Value v, const std::string& name, bool nullable = false) {
  if (nullable && (v.IsNull() || v.IsUndefined())) return View<float>{nullptr, 0};
  return typed_value<float>(env, v, name, napi_float32_array, "a Float32Array");
}

int64_t integer_value(const Napi::Env& env, Napi::Value v, const std::string& name, int64_t min = 0) {
  if (!v.IsNumber()) type_error(env, name + ": expected a number");
  const double d = v.As<Napi::Number>().DoubleValue();
  const int64_t i = static_cast<int64_t>(d);
  if (static_cast<double>(i) != d || i < min) range_error(env, name + ": expected an integer >= " + std::to_string(min));
  return i;
}

Napi::Value CreateChain(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  if (!info[0].IsArray()) type_error(env, "createChain: expected an array of ops");
  auto list = info[0].As<Napi::Array>();
  auto chain = std::make_unique<Chain>();
  auto keep_bytes = [&](Napi::Value v, const void* data, size_t bytes) {
    if (v.IsNull() || v.IsUndefined()) return;
    chain->arrays.push_back(ChainArray{Napi::Persistent(v), data, bytes});
  };
  auto keep = [&](Napi::Value v, const View<float>& view, int64_t floats) { keep_bytes(v, view.data, static_cast<size_t>(floats) * sizeof(float)); };
  // d[j] a region and d[j + 1] an offset into it where rows * cols elements of `size` bytes must fit
  // (compared by division: the product may overflow); the chain keeps the region alive.
  auto region_part = [&](const Napi::Array& d, uint32_t j, const std::string& at, const char* what, int64_t rows, int64_t cols, uint64_t size) {
    Napi::Value rv = d.Get(j);
    if (!is_region(rv)) type_error(env, at + " " + what + ": expected a native region");
    Tracked* t = rv.As<Napi::External<Tracked>>().Data();
    if (t->released) range_error(env, at + " " + what + ": region was released");
    const int64_t off = integer_value(env, d.Get(j + 1), at + " " + what + " offset");
    const uint64_t room = static_cast<uint64_t>(off) <= t->region.size ? (t->region.size - static_cast<uint64_t>(off)) / size : 0;
    if (static_cast<uint64_t>(off) > t->region.size || static_cast<uint64_t>(rows) > room / static_cast<uint64_t>(cols)) range_error(env, at + ": the " + what + " is outside its region");
    t->refs++;
    chain->regions.push_back(t);
    return static_cast<const uint8_t*>(t->region.data) + off;
  };
  // A linear op's d[b] bias, d[b + 1] epilogue and d[b + 2] residual, and its x and y, checked for out outputs of in inputs.
  auto linear_tail = [&](const Napi::Array& d, uint32_t b, const std::string& at, ChainOp& op, const View<float>& x, const View<float>& y, int64_t out, int64_t in) {
    auto bias = f32_value(env, d.Get(b), at + " bias", true);
    auto res = f32_value(env, d.Get(b + 2), at + " residual", true);
    keep(d.Get(1u), y, out), keep(d.Get(2u), x, in), keep(d.Get(b), bias, out), keep(d.Get(b + 2), res, out);
    op.bias = bias.data, op.residual = res.data;
    op.epilogue = static_cast<int>(integer_value(env, d.Get(b + 1), at + " epilogue"));
    need(env, op.epilogue == kNone || op.epilogue == kGelu, at + ": unknown epilogue");
    need(env, x.length >= static_cast<size_t>(in) && y.length >= static_cast<size_t>(out), at + ": x or y is too short");
    need(env, (!bias.data || bias.length >= static_cast<size_t>(out)) && (!res.data || res.length >= static_cast<size_t>(out)), at + ": bias or residual is too short");
    need(env, !overlaps(op.y, static_cast<size_t>(out), op.x, static_cast<size_t>(in)) && !overlaps(op.y, static_cast<size_t>(out), op.residual, res.data ? static_cast<size_t>(out) : 0),
         at + ": y overlaps x or residual");
  };
  for (uint32_t i = 0; i < list.Length(); ++i) {
    const std::string at = "createChain: op " + std::to_string(i);
    if (!list.Get(i).IsArray()) type_error(env, at + ": expected an array");
    auto d = list.Get(i).As<Napi::Array>();
    const int64_t kind = integer_value(env, d.Get(0u), at + " kind");
    ChainOp op{};
    auto y = f32_value(env, d.Get(1u), at + " y");
    auto x = f32_value(env, d.Get(2u), at + " x");
    op.y = y.data, op.x = x.data;
    if (kind == 0) {
      op.kind = ChainOp::kLayerNorm;
      op.cols = integer_value(env, d.Get(3u), at + " cols", 1);
      auto g = f32_value(env, d.Get(4u), at + " gamma");
      auto b = f32_value(env, d.Get(5u), at + " beta");
      keep(d.Get(1u), y, op.cols), keep(d.Get(2u), x, op.cols), keep(d.Get(4u), g, op.cols), keep(d.Get(5u), b, op.cols);
      op.gamma = g.data, op.beta = b.data;
      op.eps = d.Get(6u).As<Napi::Number>().FloatValue();
      need(env, x.length >= static_cast<size_t>(op.cols) && y.length >= static_cast<size_t>(op.cols) && g.length >= static_cast<size_t>(op.cols) && b.length >= static_cast<size_t>(op.cols),
           at + ": an array is shorter than cols");
    } else if (kind == 1) {
      op.kind = ChainOp::kLinear;
      const int64_t dt = integer_value(env, d.Get(5u), at + " weight dtype");
      need(env, dt <= 2, at + ": int8 weights go in an op of kind 3");
      const int64_t out = integer_value(env, d.Get(6u), at + " outFeatures", 1), in = integer_value(env, d.Get(7u), at + " inFeatures", 1);
      const int64_t panel_k = integer_value(env, d.Get(8u), at + " panelK");
      const DType dtype = static_cast<DType>(dt);
      op.w = WeightMatrix{region_part(d, 3u, at, "weight", out, in, dtype_size(dtype)), dtype, out, in, panel_k};
      linear_tail(d, 9u, at, op, x, y, out, in);
    } else if (kind == 3) {
      op.kind = ChainOp::kLinearInt8;
      const int64_t out = integer_value(env, d.Get(7u), at + " outFeatures", 1), in = integer_value(env, d.Get(8u), at + " inFeatures", 1);
      const int64_t group = integer_value(env, d.Get(9u), at + " groupSize", 1);
      const int64_t groups = (in + group - 1) / group;
      need(env, out <= (int64_t{1} << 40) / in && out <= (int64_t{1} << 40) / groups, at + ": the weight is too large");
      op.q = reinterpret_cast<const int8_t*>(region_part(d, 3u, at, "weight", out, in, 1));
      need(env, integer_value(env, d.Get(6u), at + " scales offset") % 2 == 0, at + ": scales must start at an even byte offset");
      op.q_scales = reinterpret_cast<const uint16_t*>(region_part(d, 5u, at, "scales", out, groups, 2));
      op.q_out = out, op.q_in = in, op.q_group = group;
      op.q_mode = static_cast<int>(integer_value(env, d.Get(10u), at + " activationMode"));
      need(env, op.q_mode <= 2, at + ": activationMode must be 0 (exact), 1 (grouped) or 2 (mixed)");
      if (!d.Get(11u).IsNumber()) type_error(env, at + " threshold: expected a number");
      op.q_threshold = d.Get(11u).As<Napi::Number>().FloatValue();
      linear_tail(d, 12u, at, op, x, y, out, in);
    } else if (kind == 2) {
      op.kind = ChainOp::kAttention;
      chain->attention = true;
      AttentionArgs& a = op.attention;
      const int64_t dt = integer_value(env, d.Get(5u), at + " kvDtype");
      need(env, dt <= 2, at + ": the KV cache holds fp32, fp16 or bf16");
      a.kv_dtype = static_cast<DType>(dt);
      a.num_heads = static_cast<int>(std::min<int64_t>(integer_value(env, d.Get(6u), at + " numHeads", 1), 1 << 20));
      a.head_dim = static_cast<int>(std::min<int64_t>(integer_value(env, d.Get(7u), at + " headDim", 1), 1 << 20));
      a.block_size = static_cast<int>(std::min<int64_t>(integer_value(env, d.Get(8u), at + " blockSize", 1), 1 << 20));
      const bool wide = a.kv_dtype == DType::F32;
      auto cache = [&](uint32_t j, const char* which) {
        Napi::Value v = d.Get(j);
        auto c = typed_value<uint8_t>(env, v, at + " " + which, wide ? napi_float32_array : napi_uint16_array,
                                      wide ? "a Float32Array (fp32 cache)" : "a Uint16Array (fp16/bf16 cache)");
        keep_bytes(v, c.data, c.length * (wide ? 4 : 2));
        return std::pair<void*, size_t>(c.data, c.length);
      };
      auto [k, k_len] = cache(3u, "kCache");
      auto [v, v_len] = cache(4u, "vCache");
      auto slopes = f32_value(env, d.Get(9u), at + " slopes");
      // (Each factor is at most 2^20: no product overflows.)
      const int64_t width = static_cast<int64_t>(a.num_heads) * a.head_dim;
      const int64_t block_entries = width * a.block_size;
      need(env, k_len == v_len, at + ": k and v caches differ in size");
      need(env, k_len % static_cast<size_t>(block_entries) == 0, at + ": cache size is not a whole number of blocks");
      need(env, y.length >= static_cast<size_t>(width) && x.length >= static_cast<size_t>(3 * width), at + ": out or qkv is shorter than heads*headDim (x3 for qkv)");
      need(env, slopes.length >= static_cast<size_t>(a.num_heads), at + ": fewer slopes than heads");
      need(env, !overlaps(y.data, static_cast<size_t>(width), x.data, static_cast<size_t>(3 * width)), at + ": out overlaps qkv");
      keep(d.Get(1u), y, width), keep(d.Get(2u), x, 3 * width), keep(d.Get(9u), slopes, a.num_heads);
      a.out = y.data, a.qkv = x.data, a.k_cache = k, a.v_cache = v, a.slopes = slopes.data;
      a.num_blocks = static_cast<int64_t>(k_len) / block_entries;
    } else {
      range_error(env, at + ": unknown kind " + std::to_string(kind));
    }
    chain->ops.push_back(op);
  }
  auto external = Napi::External<Chain>::New(env, chain.release(), [](Napi::Env, Chain* c) { delete c; });
  external.TypeTag(&kChainTag);
  return external;
}

Napi::Value RunChain(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  if (!info[0].IsExternal() || !info[0].As<Napi::Object>().CheckTypeTag(&kChainTag)) type_error(env, "runChain: expected a chain");
  Chain* c = info[0].As<Napi::External<Chain>>().Data();
  for (Tracked* t : c->regions) need(env, !t->released, "runChain: a weight region was released (the model was disposed)");
  // Every array of the chain is still where it was and as long (not detached by a transfer or a
  // released region, not shrunk): a chain keeps raw pointers.
  for (const ChainArray& arr : c->arrays) {
    auto ta = arr.ref.Value().As<Napi::TypedArray>();
    const auto* base = static_cast<const uint8_t*>(ta.ArrayBuffer().Data());
    need(env, base && base + ta.ByteOffset() == arr.data && ta.ByteLength() >= arr.bytes, "runChain: an array of the chain was detached, moved or shrunk since it was built");
  }
  ChainStep step{};
  const bool given = info.Length() > 1 && !info[1].IsUndefined();
  if (given) {
    auto seqs = i32(info, 1, "runChain: seqs");
    auto table = i32(info, 2, "runChain: blockTable");
    need(env, seqs.length % 4 == 0, "runChain: seqs must hold 4 ints per sequence");
    step = ChainStep{seqs.data, static_cast<int>(seqs.length / 4), table.data, static_cast<int64_t>(table.length)};
  }
  need(env, !c->attention || given, "runChain: the chain holds attention: give its seqs and blockTable");
  bool fused = false;
  try {
    fused = run_chain(compute(env), c->ops.data(), c->ops.size(), step);
  } catch (const std::range_error& e) {
    range_error(env, e.what());
  }
  return Napi::Boolean::New(env, fused);
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
  const uint8_t* table = region_bytes(info, tr, toff, product(info, "embedding: table", {vocab, hidden, static_cast<int64_t>(dtype_size(dt))}), "embedding: table");
  need(env, y.length >= ids.length * static_cast<size_t>(hidden), "embedding: y is shorter than ids*hidden");
  for (size_t i = 0; i < ids.length; ++i)
    if (ids.data[i] < 0 || ids.data[i] >= vocab)
      range_error(env, "embedding: token id " + std::to_string(ids.data[i]) + " at index " + std::to_string(i) +
                           " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
  embedding(compute(env), y.data, ids.data, static_cast<int64_t>(ids.length), table, dt, hidden);
  return env.Undefined();
}

// The (dst, dstOffset, dstDtype, src, srcOffset, srcDtype) arguments that open convert,
// sliceColumns and toPanels; each checks its byte ranges once it knows the lengths.
struct CopyArgs {
  Tracked* dst_region;
  int64_t dst_offset;
  DType dst;
  Tracked* src_region;
  int64_t src_offset;
  DType src;
};
CopyArgs copy_args(const Napi::CallbackInfo& info, const std::string& fn) {
  return CopyArgs{region_arg(info, 0, (fn + ": dst").c_str()), integer(info, 1, (fn + ": dst offset").c_str()),
                  dtype_arg(info, 2, (fn + ": dst dtype").c_str()), region_arg(info, 3, (fn + ": src").c_str()),
                  integer(info, 4, (fn + ": src offset").c_str()), dtype_arg(info, 5, (fn + ": src dtype").c_str())};
}

// convert(dstRegion, dstOffset, dstDtype, srcRegion, srcOffset, srcDtype, n)
Napi::Value Convert(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  const CopyArgs a = copy_args(info, "convert");
  const DType dd = a.dst, sd = a.src;
  int64_t n = integer(info, 6, "convert: n");
  need(env, dd != DType::I8 && sd != DType::I8, "convert: int8 goes through quantize");
  uint8_t* dst = region_bytes(info, a.dst_region, a.dst_offset, product(info, "convert: dst", {n, static_cast<int64_t>(dtype_size(dd))}), "convert: dst");
  const uint8_t* src = region_bytes(info, a.src_region, a.src_offset, product(info, "convert: src", {n, static_cast<int64_t>(dtype_size(sd))}), "convert: src");
  convert(compute(env), dst, dd, src, sd, n);
  return env.Undefined();
}

// attention(out, qkv, numTokens, numHeads, headDim, kCache, vCache, blockSize, seqs, blockTable, slopes, kvDtype?)
// kvDtype (default F32): the caches' dtype, F32 (Float32Array) or F16 / BF16 (Uint16Array).
Napi::Value Attention(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  AttentionArgs a{};
  auto out = f32(info, 0, "attention: out");
  auto qkv = f32(info, 1, "attention: qkv");
  a.num_tokens = integer(info, 2, "attention: numTokens");
  a.num_heads = static_cast<int>(integer(info, 3, "attention: numHeads", 1));
  a.head_dim = static_cast<int>(integer(info, 4, "attention: headDim", 1));
  a.kv_dtype = info.Length() > 11 && !info[11].IsUndefined() ? dtype_arg(info, 11, "attention: kvDtype") : DType::F32;
  need(env, a.kv_dtype != DType::I8, "attention: kvDtype must be F32, F16 or BF16");
  const bool wide = a.kv_dtype == DType::F32;
  const napi_typedarray_type cache_type = wide ? napi_float32_array : napi_uint16_array;
  const char* k_name = wide ? "attention: kCache (fp32: a Float32Array)" : "attention: kCache (fp16/bf16: a Uint16Array)";
  const char* v_name = wide ? "attention: vCache (fp32: a Float32Array)" : "attention: vCache (fp16/bf16: a Uint16Array)";
  auto kc = typed<uint8_t>(info, 5, k_name, cache_type);
  auto vc = typed<uint8_t>(info, 6, v_name, cache_type);
  a.block_size = static_cast<int>(integer(info, 7, "attention: blockSize", 1));
  auto seqs = i32(info, 8, "attention: seqs");
  auto table = i32(info, 9, "attention: blockTable");
  auto slopes = f32(info, 10, "attention: slopes");
  const int64_t width = static_cast<int64_t>(a.num_heads) * a.head_dim;
  need(env, out.length >= static_cast<size_t>(a.num_tokens * width), "attention: out is shorter than tokens*heads*headDim");
  need(env, qkv.length >= static_cast<size_t>(a.num_tokens * width * 3), "attention: qkv is shorter than tokens*3*heads*headDim");
  need(env, kc.length == vc.length, "attention: k and v caches differ in size");
  const int64_t block_entries = width * a.block_size;
  need(env, kc.length % block_entries == 0, "attention: cache size is not a whole number of blocks");
  need(env, seqs.length % 4 == 0, "attention: seqs must hold 4 ints per sequence");
  need(env, slopes.length >= static_cast<size_t>(a.num_heads), "attention: fewer slopes than heads");
  need(env, !overlaps(out.data, out.length, qkv.data, qkv.length), "attention: out must not overlap qkv");
  a.out = out.data;
  a.qkv = qkv.data;
  a.k_cache = kc.data;
  a.v_cache = vc.data;
  a.num_blocks = static_cast<int64_t>(kc.length) / block_entries;
  a.seqs = seqs.data;
  a.num_seqs = static_cast<int>(seqs.length / 4);
  a.block_table = table.data;
  a.block_table_len = static_cast<int64_t>(table.length);
  a.slopes = slopes.data;
  try {
    attention(compute(env), a);
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
  w.q = reinterpret_cast<const int8_t*>(region_bytes(info, qr, qoff, product(info, name, {out, in}), name));
  w.scales = reinterpret_cast<const uint16_t*>(region_bytes(info, sr, soff, product(info, name, {out, static_cast<int64_t>(w.groups()), 2}), name));
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
  const uint8_t* sp = region_bytes(info, src, srcoff, product(info, "quantizeWeights: source", {out, in, static_cast<int64_t>(dtype_size(sd))}), "quantizeWeights: source");
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
  need(env, x.length >= static_cast<size_t>(product(info, "linearInt8: x", {rows, in})), "linearInt8: x is shorter than rows*in");
  need(env, y.length >= static_cast<size_t>(product(info, "linearInt8: y", {rows, out})), "linearInt8: y is shorter than rows*out");
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

// probeReadBandwidth(bytes, threads, runs, buffer?) -> GB/s (buffer: a writable region of >= bytes, kept by
// the caller, instead of a fresh allocation freed after)
Napi::Value ProbeReadBandwidth(const Napi::CallbackInfo& info) {
  int64_t bytes = integer(info, 0, "probeReadBandwidth: bytes", 1 << 20);
  int64_t threads = integer(info, 1, "probeReadBandwidth: threads", 1);
  int64_t runs = info.Length() > 2 && !info[2].IsUndefined() ? integer(info, 2, "probeReadBandwidth: runs", 1) : 5;
  void* buffer = nullptr;
  if (info.Length() > 3 && !info[3].IsUndefined()) {
    Tracked* t = region_arg(info, 3, "probeReadBandwidth: buffer");
    need(info.Env(), t->region.size >= static_cast<uint64_t>(bytes), "probeReadBandwidth: buffer region is smaller than bytes");
    need(info.Env(), !t->shared, "probeReadBandwidth: buffer must be an allocated region (a file mapping is read-only)");
    buffer = t->region.data;
  }
  try {
    return Napi::Number::New(info.Env(), probe_read_bandwidth(static_cast<size_t>(bytes), static_cast<int>(threads), static_cast<int>(runs), buffer));
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
  uint8_t* p = region_bytes(info, t, off, product(info, "fillRandom", {n, static_cast<int64_t>(dtype_size(dt))}), "fillRandom");
  fill_random(*instance(env).pool, p, dt, n, static_cast<uint64_t>(seed), scale);
  return env.Undefined();
}

// readFile(path, fileOffset, byteLength, dstRegion, dstOffset, evictAfter) -> ticket: a background pread.
Napi::Value ReadFile(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  if (!info[0].IsString()) type_error(env, "readFile: expected a path");
  std::string path = info[0].As<Napi::String>().Utf8Value();
  int64_t offset = integer(info, 1, "readFile: fileOffset");
  int64_t length = integer(info, 2, "readFile: byteLength");
  Tracked* dst = region_arg(info, 3, "readFile: dst");
  int64_t dst_offset = integer(info, 4, "readFile: dstOffset");
  bool evict = info[5].ToBoolean().Value();
  uint8_t* p = region_bytes(info, dst, dst_offset, length, "readFile: dst");
  auto& inst = instance(env);
  if (!inst.reader) inst.reader = std::make_unique<FileReader>();
  return Napi::Number::New(env, static_cast<double>(inst.reader->enqueue(path, offset, length, p, evict)));
}

// waitRead(ticket) -> [seconds spent waiting (0 if the read had finished), seconds the read took].
Napi::Value WaitRead(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  int64_t ticket = integer(info, 0, "waitRead: ticket", 1);
  auto& inst = instance(env);
  if (!inst.reader) range_error(env, "waitRead: no reads were queued");
  try {
    auto [waited, read] = inst.reader->wait(ticket);
    auto out = Napi::Array::New(env, 2);
    out.Set(0u, Napi::Number::New(env, waited));
    out.Set(1u, Napi::Number::New(env, read));
    return out;
  } catch (const std::exception& e) {
    throw Napi::Error::New(env, e.what());
  }
}

// sliceColumns(dstRegion, dstOffset, dstDtype, srcRegion, srcOffset, srcDtype, rows, cols, first, count)
Napi::Value SliceColumns(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  const CopyArgs a = copy_args(info, "sliceColumns");
  const DType dd = a.dst, sd = a.src;
  int64_t rows = integer(info, 6, "sliceColumns: rows");
  int64_t cols = integer(info, 7, "sliceColumns: cols", 1);
  int64_t first = integer(info, 8, "sliceColumns: first");
  int64_t count = integer(info, 9, "sliceColumns: count");
  need(env, dd != DType::I8 && sd != DType::I8, "sliceColumns: int8 is not supported");
  need(env, first + count <= cols, "sliceColumns: column range past the matrix");
  uint8_t* dst = region_bytes(info, a.dst_region, a.dst_offset, product(info, "sliceColumns: dst", {rows, count, static_cast<int64_t>(dtype_size(dd))}), "sliceColumns: dst");
  const uint8_t* src = region_bytes(info, a.src_region, a.src_offset, product(info, "sliceColumns: src", {rows, cols, static_cast<int64_t>(dtype_size(sd))}), "sliceColumns: src");
  slice_columns(compute(env), dst, dd, src, sd, rows, cols, first, count);
  return env.Undefined();
}

// toPanels(dst, dstOffset, dstDtype, src, srcOffset, srcDtype, out, in, panelK, rowBegin, rowEnd)
// src and dst each hold a whole (out, in) matrix: src row-major, dst in column panels of panelK.
Napi::Value ToPanels(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  const CopyArgs a = copy_args(info, "toPanels");
  const DType dd = a.dst, sd = a.src;
  int64_t out = integer(info, 6, "toPanels: out", 1);
  int64_t in = integer(info, 7, "toPanels: in", 1);
  int64_t panel_k = integer(info, 8, "toPanels: panelK", 1);
  int64_t row_begin = integer(info, 9, "toPanels: rowBegin");
  int64_t row_end = integer(info, 10, "toPanels: rowEnd");
  need(env, dd != DType::I8 && sd != DType::I8, "toPanels: int8 is not supported");
  need(env, row_begin <= row_end && row_end <= out, "toPanels: row range past the matrix");
  uint8_t* dst = region_bytes(info, a.dst_region, a.dst_offset, product(info, "toPanels: dst", {out, in, static_cast<int64_t>(dtype_size(dd))}), "toPanels: dst");
  const uint8_t* src = region_bytes(info, a.src_region, a.src_offset, product(info, "toPanels: src", {out, in, static_cast<int64_t>(dtype_size(sd))}), "toPanels: src");
  to_panels(compute(env), dst, dd, src, sd, out, in, panel_k, row_begin, row_end);
  return env.Undefined();
}

// embeddingShard(y, ids, tableRegion, tableOffset, dtype, vocab, hidden, firstId)
Napi::Value EmbeddingShard(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  auto y = f32(info, 0, "embeddingShard: y");
  auto ids = i32(info, 1, "embeddingShard: ids");
  Tracked* tr = region_arg(info, 2, "embeddingShard: table");
  int64_t toff = integer(info, 3, "embeddingShard: table offset");
  DType dt = dtype_arg(info, 4, "embeddingShard: dtype");
  int64_t vocab = integer(info, 5, "embeddingShard: vocab", 1);
  int64_t hidden = integer(info, 6, "embeddingShard: hidden", 1);
  int64_t first = integer(info, 7, "embeddingShard: firstId");
  need(env, dt != DType::I8, "embeddingShard: int8 tables are not supported");
  const uint8_t* table = region_bytes(info, tr, toff, product(info, "embeddingShard: table", {vocab, hidden, static_cast<int64_t>(dtype_size(dt))}), "embeddingShard: table");
  need(env, y.length >= ids.length * static_cast<size_t>(hidden), "embeddingShard: y is shorter than ids*hidden");
  embedding_shard(compute(env), y.data, ids.data, static_cast<int64_t>(ids.length), table, dt, hidden, first, vocab);
  return env.Undefined();
}

// greedyRows(logits, rows, stride, vocab, suppress: Int32Array, suppressRows: Uint8Array, ids: Int32Array, logprobs: Float64Array)
Napi::Value GreedyRows(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  auto logits = f32(info, 0, "greedyRows: logits");
  int64_t rows = integer(info, 1, "greedyRows: rows");
  int64_t stride = integer(info, 2, "greedyRows: stride", 1);
  int64_t vocab = integer(info, 3, "greedyRows: vocab", 1);
  auto suppress = i32(info, 4, "greedyRows: suppress");
  auto suppress_rows = typed<uint8_t>(info, 5, "greedyRows: suppressRows", napi_uint8_array);
  auto ids = i32(info, 6, "greedyRows: ids");
  auto logprobs = typed<double>(info, 7, "greedyRows: logprobs", napi_float64_array);
  need(env, vocab <= stride, "greedyRows: vocab exceeds the row stride");
  need(env, rows == 0 || logits.length >= static_cast<size_t>((rows - 1) * stride + vocab), "greedyRows: logits shorter than rows x stride");
  need(env, suppress_rows.length >= static_cast<size_t>(rows) && ids.length >= static_cast<size_t>(rows) && logprobs.length >= static_cast<size_t>(rows),
       "greedyRows: suppressRows, ids and logprobs need one entry per row");
  greedy_rows(compute(env), logits.data, rows, stride, vocab, suppress.data, static_cast<int64_t>(suppress.length), suppress_rows.data, ids.data, logprobs.data);
  return env.Undefined();
}

// ---- MPI (tensor parallelism) --------------------------------------------------------------------

template <typename F>
Napi::Value mpi_call(const Napi::Env& env, F&& f) {
  try {
    return f();
  } catch (const std::exception& e) {
    throw Napi::Error::New(env, e.what());
  }
}

Napi::Value MpiAvailable(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), mpi::available()); }

Napi::Value MpiInit(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  return mpi_call(env, [&]() -> Napi::Value {
    mpi::World w = mpi::init();
    auto o = Napi::Object::New(env);
    o.Set("rank", w.rank);
    o.Set("size", w.size);
    o.Set("localRank", w.local_rank);
    o.Set("localSize", w.local_size);
    return o;
  });
}

// mpiAllReduceSum(data: Float32Array, count)
Napi::Value MpiAllReduceSum(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  auto d = f32(info, 0, "mpiAllReduceSum: data");
  int64_t count = integer(info, 1, "mpiAllReduceSum: count");
  need(env, static_cast<size_t>(count) <= d.length, "mpiAllReduceSum: count exceeds the array");
  return mpi_call(env, [&]() -> Napi::Value {
    mpi::all_reduce_sum(d.data, count);
    return env.Undefined();
  });
}

// mpiBroadcast(data: any typed array, root): the array's bytes, in place.
Napi::Value MpiBroadcast(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  if (!info[0].IsTypedArray()) type_error(env, "mpiBroadcast: expected a typed array");
  auto a = info[0].As<Napi::TypedArray>();
  int64_t root = integer(info, 1, "mpiBroadcast: root");
  auto* p = static_cast<uint8_t*>(a.ArrayBuffer().Data()) + a.ByteOffset();
  return mpi_call(env, [&]() -> Napi::Value {
    mpi::broadcast(p, static_cast<int64_t>(a.ByteLength()), static_cast<int>(root));
    return env.Undefined();
  });
}

// mpiGather(send: Float32Array, count, recv: Float32Array | null, counts: Int32Array, displs: Int32Array, root)
Napi::Value MpiGather(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  auto send = f32(info, 0, "mpiGather: send");
  int64_t count = integer(info, 1, "mpiGather: count");
  auto recv = f32(info, 2, "mpiGather: recv", true);
  auto counts = i32(info, 3, "mpiGather: counts");
  auto displs = i32(info, 4, "mpiGather: displs");
  int64_t root = integer(info, 5, "mpiGather: root");
  need(env, static_cast<size_t>(count) <= send.length, "mpiGather: count exceeds the send array");
  return mpi_call(env, [&]() -> Napi::Value {
    mpi::gather(send.data, count, recv.data, counts.data, displs.data, static_cast<int>(root));
    return env.Undefined();
  });
}

Napi::Value MpiAbort(const Napi::CallbackInfo& info) {
  mpi::abort(static_cast<int>(integer(info, 0, "mpiAbort: code")));
}

Napi::Value MpiFinalize(const Napi::CallbackInfo& info) {
  mpi::finalize();
  return info.Env().Undefined();
}

// setLinearTuning(name, value) -> boolean (false: unknown name or value)
Napi::Value SetLinearTuning(const Napi::CallbackInfo& info) {
  if (!info[0].IsString()) type_error(info.Env(), "setLinearTuning: expected a parameter name");
  int64_t v = integer(info, 1, "setLinearTuning: value");
  return Napi::Boolean::New(info.Env(), set_linear_tuning(info[0].As<Napi::String>().Utf8Value(), v));
}

}  // namespace

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* inst = new Instance();
  int threads = cpu_features().physical_cores;
  inst->pool = std::make_unique<ThreadPool>(threads);
  env.SetInstanceData<Instance>(inst);
  exports.Set("mapFile", Napi::Function::New(env, MapFile));
  exports.Set("allocate", Napi::Function::New(env, Allocate));
  exports.Set("allocAligned", Napi::Function::New(env, AllocAligned));
  exports.Set("release", Napi::Function::New(env, Release));
  exports.Set("regionSize", Napi::Function::New(env, RegionSize));
  exports.Set("view", Napi::Function::New(env, View_));
  exports.Set("advise", Napi::Function::New(env, Advise));
  exports.Set("residentBytes", Napi::Function::New(env, ResidentBytes));
  exports.Set("settleFilePages", Napi::Function::New(env, SettleFilePages));
  exports.Set("createChain", Napi::Function::New(env, CreateChain));
  exports.Set("runChain", Napi::Function::New(env, RunChain));
  exports.Set("readFile", Napi::Function::New(env, ReadFile));
  exports.Set("sliceColumns", Napi::Function::New(env, SliceColumns));
  exports.Set("toPanels", Napi::Function::New(env, ToPanels));
  exports.Set("embeddingShard", Napi::Function::New(env, EmbeddingShard));
  exports.Set("greedyRows", Napi::Function::New(env, GreedyRows));
  exports.Set("mpiAvailable", Napi::Function::New(env, MpiAvailable));
  exports.Set("mpiInit", Napi::Function::New(env, MpiInit));
  exports.Set("mpiAllReduceSum", Napi::Function::New(env, MpiAllReduceSum));
  exports.Set("mpiBroadcast", Napi::Function::New(env, MpiBroadcast));
  exports.Set("mpiGather", Napi::Function::New(env, MpiGather));
  exports.Set("mpiFinalize", Napi::Function::New(env, MpiFinalize));
  exports.Set("mpiAbort", Napi::Function::New(env, MpiAbort));
  exports.Set("waitRead", Napi::Function::New(env, WaitRead));
  exports.Set("cpuInfo", Napi::Function::New(env, CpuInfo));
  exports.Set("setThreads", Napi::Function::New(env, SetThreads));
  exports.Set("getThreads", Napi::Function::New(env, GetThreads));
  exports.Set("createDevices", Napi::Function::New(env, CreateDevices));
  exports.Set("useDevice", Napi::Function::New(env, UseDevice));
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
  exports.Set("setLinearTuning", Napi::Function::New(env, SetLinearTuning));
  exports.Set("quantizeWeights", Napi::Function::New(env, QuantizeWeights));
  exports.Set("linearInt8", Napi::Function::New(env, LinearInt8));
  exports.Set("embeddingInt8", Napi::Function::New(env, EmbeddingInt8));
  return exports;
}

}  // namespace blossom

static Napi::Object InitAddon(Napi::Env env, Napi::Object exports) { return blossom::Init(env, exports); }

NODE_API_MODULE(blossom_native, InitAddon)
