#include <cpuid.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <set>
#include <string>
#include <thread>

#include "kernels.h"

namespace blossom {

namespace {

CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  bool osxsave_avx = false;
  if (__get_cpuid(1, &a, &b, &c, &d)) {
    f.fma = (c >> 12) & 1;
    f.f16c = (c >> 29) & 1;
    bool osxsave = (c >> 27) & 1;
    bool avx = (c >> 28) & 1;
    if (osxsave && avx) {
      unsigned lo, hi;
      __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
      osxsave_avx = (lo & 6) == 6;  // XMM and YMM state enabled by the OS
      if (osxsave_avx && ((lo & 0xe0) == 0xe0)) {
        if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) f.avx512f = (b >> 16) & 1;
      }
    }
  }
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) f.avx2 = osxsave_avx && ((b >> 5) & 1);
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx_vnni = osxsave_avx && ((a >> 4) & 1);
  if (!osxsave_avx) f.fma = f.f16c = false;
  // Brand string.
  unsigned brand[12];
  if (__get_cpuid(0x80000000, &a, &b, &c, &d) && a >= 0x80000004) {
    for (unsigned i = 0; i < 3; ++i) __get_cpuid(0x80000002 + i, &brand[4 * i], &brand[4 * i + 1], &brand[4 * i + 2], &brand[4 * i + 3]);
    char buf[49];
    std::memcpy(buf, brand, 48);
    buf[48] = 0;
    const char* s = buf;
    while (*s == ' ') ++s;
    std::snprintf(f.model, sizeof f.model, "%s", s);
  }
  f.logical_cores = static_cast<int>(std::thread::hardware_concurrency());
  if (f.logical_cores < 1) f.logical_cores = 1;
  // Physical cores: distinct (physical id, core id) pairs in /proc/cpuinfo.
  std::ifstream info("/proc/cpuinfo");
  std::set<std::pair<int, int>> cores;
  std::string line;
  int phys = 0;
  while (std::getline(info, line)) {
    if (line.rfind("physical id", 0) == 0) phys = std::atoi(line.substr(line.find(':') + 1).c_str());
    if (line.rfind("core id", 0) == 0) cores.insert({phys, std::atoi(line.substr(line.find(':') + 1).c_str())});
  }
  f.physical_cores = cores.empty() ? f.logical_cores : static_cast<int>(cores.size());
  return f;
}

Variant initial_variant(const CpuFeatures& f) {
  const char* env = std::getenv("BLOSSOM_KERNELS");
  if (env && std::strcmp(env, "scalar") == 0) return Variant::Scalar;
  return (f.avx2 && f.fma && f.f16c) ? Variant::Avx2 : Variant::Scalar;
}

Variant g_variant = initial_variant(cpu_features());

// BLOSSOM_KERNELS=avx2 keeps AVX2 without VNNI.
bool g_vnni = g_variant == Variant::Avx2 && cpu_features().avx_vnni &&
              !(std::getenv("BLOSSOM_KERNELS") && std::strcmp(std::getenv("BLOSSOM_KERNELS"), "avx2") == 0);

}  // namespace

const CpuFeatures& cpu_features() {
  static CpuFeatures f = detect();
  return f;
}

Variant active_variant() { return g_variant; }

bool use_avx_vnni() { return g_vnni; }

bool set_avx_vnni(bool on) {
  if (on && !cpu_features().avx_vnni) return false;
  g_vnni = on;
  return true;
}

bool set_variant(Variant v) {
  const CpuFeatures& f = cpu_features();
  if (v == Variant::Avx2 && !(f.avx2 && f.fma && f.f16c)) return false;
  g_variant = v;
  return true;
}

}  // namespace blossom
