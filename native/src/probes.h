// Machine probes (read bandwidth, FMA peak) and random fills for the kernel benchmark and tests.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "kernels.h"

namespace blossom {

// GB/s of the best of `runs` streaming reads of a `bytes` buffer (written first) on `threads` threads:
// `buffer` if given, else a fresh allocation, freed after. A benchmark that probes between runs keeps
// one buffer: in a VM whose balloon reports freed pages to the host (this project's development
// machine does), freeing and re-faulting a GiB per probe stalled the decode steps measured after it.
double probe_read_bandwidth(size_t bytes, int threads, int runs, void* buffer = nullptr);
// GFLOP/s of the best of `runs` rounds of independent 256-bit FMA chains on `threads` threads.
double probe_fma_peak(int threads, int runs);
// n values of `dtype`, uniform in [-scale, scale), from `seed` (deterministic whatever the thread count).
void fill_random(ThreadPool& pool, void* dst, DType dtype, int64_t n, uint64_t seed, float scale);

// Sets one of linear's blocking parameters (matmul.cc), for tuning experiments; false if unknown.
bool set_linear_tuning(const std::string& name, int64_t value);

}  // namespace blossom
