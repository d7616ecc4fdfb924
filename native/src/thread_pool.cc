#include "thread_pool.h"

#ifdef __linux__
#include <pthread.h>
#include <sched.h>
#endif

#include <algorithm>
#include <chrono>
#include <memory>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define BLOSSOM_PAUSE() _mm_pause()
#else
#define BLOSSOM_PAUSE() std::this_thread::yield()
#endif

namespace blossom {

namespace {
// How long an idle worker spins before sleeping. Between the ops of one decode step the
// gap is a few microseconds; between tokens (sampling in JS) it can be a millisecond.
constexpr auto kSpin = std::chrono::microseconds(2000);
}  // namespace

ThreadPool::ThreadPool(int threads) : threads_(threads < 1 ? 1 : threads) {
  for (int i = 1; i < threads_; ++i) workers_.emplace_back([this, i] { worker_main(i); });
}

ThreadPool::ThreadPool(int threads, std::vector<int> cpus) : threads_(threads < 1 ? 1 : threads), cpus_(std::move(cpus)) {
  for (int i = 1; i < threads_; ++i) workers_.emplace_back([this, i] { worker_main(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_.store(true);
    generation_.fetch_add(1);
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::worker_main(int index) {
#ifdef __linux__
  if (!cpus_.empty()) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpus_[static_cast<size_t>(index) % cpus_.size()], &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
  }
#endif
  uint64_t seen = 0;
  for (;;) {
    uint64_t gen = generation_.load(std::memory_order_acquire);
    if (gen == seen) {
      auto start = std::chrono::steady_clock::now();
      int spins = 0;
      while ((gen = generation_.load(std::memory_order_acquire)) == seen) {
        BLOSSOM_PAUSE();
        if (++spins % 256 == 0) {
          if (std::chrono::steady_clock::now() - start > kSpin) break;
          // On a busy machine the thread that will post the next job may be waiting for this core.
          std::this_thread::yield();
        }
      }
      if (gen == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleepers_.fetch_add(1);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        sleepers_.fetch_sub(1);
        gen = generation_.load(std::memory_order_acquire);
      }
    }
    seen = gen;
    if (stop_.load()) return;
    (*job_)(index, threads_);
    remaining_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::run(const std::function<void(int, int)>& fn) {
  if (threads_ == 1) {
    fn(0, 1);
    return;
  }
  job_ = &fn;
  remaining_.store(threads_ - 1, std::memory_order_release);
  {
    // Publishing under the mutex pairs with the sleepers' predicate check, so no wake-up is lost.
    std::lock_guard<std::mutex> lock(mutex_);
    generation_.fetch_add(1, std::memory_order_acq_rel);
  }
  if (sleepers_.load() > 0) wake_.notify_all();
  fn(0, threads_);
  // Spin briefly, then yield: a worker that was preempted (another process on its core) finishes sooner.
  for (int spins = 0; remaining_.load(std::memory_order_acquire) != 0; ++spins) {
    if (spins < 2048) BLOSSOM_PAUSE();
    else std::this_thread::yield();
  }
  job_ = nullptr;
}

void ThreadPool::parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  if (threads_ == 1 || n <= grain) {
    fn(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  run([&](int, int) {
    for (;;) {
      int64_t begin = next.fetch_add(grain, std::memory_order_relaxed);
      if (begin >= n) break;
      int64_t end = begin + grain < n ? begin + grain : n;
      fn(begin, end);
    }
  });
}

void ThreadPool::parallel_streams(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  // Nothing to share out (one thread, one chunk, nothing at all), or more rows than a share's
  // packed bounds can count: plain chunks.
  if (threads_ == 1 || n <= std::max<int64_t>(grain, 1) || n >= (int64_t(1) << 32)) return parallel_for(n, grain, fn);
  const int t_count = threads_;
  std::unique_ptr<StreamShare[]> shares(new StreamShare[static_cast<size_t>(t_count)]);
  init_stream_shares(shares.get(), t_count, n);
  const uint64_t g = static_cast<uint64_t>(std::max<int64_t>(grain, 1));
  run([&](int t, int) { work_stream_shares(shares.get(), t_count, t, g, fn); });
}

}  // namespace blossom
