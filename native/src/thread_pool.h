// A persistent pool of worker threads. The calling thread takes part in every job,
// so a pool of N threads starts N-1 workers. Workers spin briefly between jobs
// (decode issues hundreds of short jobs per token) and then sleep.
//
// A device pool (pipeline placement's "devices" on the CPU backend) pins its workers to the
// device's cores; the caller, which still takes part, is pinned there while the device is in use
// (see useDevice in addon.cc).
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace blossom {

// One thread's share of [0, n) in parallel_streams: the remaining range [front, back) packed in one
// word (front in the low half, back in the high half), so the owner (front) and a thief (back) each
// claim with one compare-and-swap. Also used inside a running job (run_chain, matmul.cc).
struct alignas(64) StreamShare {
  std::atomic<uint64_t> range;
};

// Splits [0, n) (n < 2^32) into `count` contiguous shares, share t for thread t.
inline void init_stream_shares(StreamShare* shares, int count, int64_t n) {
  for (int t = 0; t < count; ++t) {
    const uint64_t b = static_cast<uint64_t>(n * t / count), e = static_cast<uint64_t>(n * (t + 1) / count);
    shares[t].range.store(b | (e << 32), std::memory_order_relaxed);
  }
}

// Thread t's part of the work: fn(begin, end) over its own share front to back in chunks of `grain`,
// then over chunks taken from the back of whichever share has the most left, until none has any.
template <typename F>
void work_stream_shares(StreamShare* shares, int count, int t, uint64_t grain, F&& fn) {
  std::atomic<uint64_t>& own = shares[t].range;
  for (uint64_t r = own.load(std::memory_order_relaxed);;) {
    const uint64_t front = r & 0xffffffffu, back = r >> 32;
    if (front >= back) break;
    const uint64_t next = front + grain < back ? front + grain : back;
    if (own.compare_exchange_weak(r, next | (back << 32), std::memory_order_relaxed)) {
      fn(static_cast<int64_t>(front), static_cast<int64_t>(next));
      r = own.load(std::memory_order_relaxed);
    }
  }
  for (;;) {
    int victim = -1;
    uint64_t most = 0;
    for (int v = 0; v < count; ++v) {
      const uint64_t r = shares[v].range.load(std::memory_order_relaxed);
      const uint64_t front = r & 0xffffffffu, back = r >> 32;
      if (back > front && back - front > most) most = back - front, victim = v;
    }
    if (victim < 0) return;
    std::atomic<uint64_t>& theirs = shares[victim].range;
    uint64_t r = theirs.load(std::memory_order_relaxed);
    const uint64_t front = r & 0xffffffffu, back = r >> 32;
    if (front >= back) continue;
    const uint64_t start = back - (grain < back - front ? grain : back - front);
    if (theirs.compare_exchange_weak(r, front | (start << 32), std::memory_order_relaxed))
      fn(static_cast<int64_t>(start), static_cast<int64_t>(back));
  }
}

class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  // A device pool: one thread per core in `cpus`, the workers pinned round-robin to them.
  ThreadPool(int threads, std::vector<int> cpus);

  const std::vector<int>& cpus() const { return cpus_; }
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return threads_; }

  // Runs fn(thread_index, thread_count) once on each thread, caller included; returns when all are done.
  void run(const std::function<void(int, int)>& fn);

  // Splits [0, n) into chunks of `grain` handed out dynamically, so threads finish together
  // even when one core is slower (another process, frequency).
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

  // For streaming kernels: each thread owns a contiguous share of [0, n) and works through it
  // front to back in chunks of `grain`, so that its reads stay one stream; a thread whose share
  // is done takes chunks from the back of the share with the most left.
  void parallel_streams(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

 private:
  void worker_main(int index);

  int threads_;
  std::vector<int> cpus_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> remaining_{0};
  std::atomic<bool> stop_{false};
  std::atomic<int> sleepers_{0};
  const std::function<void(int, int)>* job_ = nullptr;
};

}  // namespace blossom
