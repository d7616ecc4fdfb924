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
