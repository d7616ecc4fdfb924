#include "io.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <stdexcept>

namespace blossom {

FileReader::FileReader() : thread_([this] { run(); }) {}

FileReader::~FileReader() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
  for (auto& [path, fd] : fds_) close(fd);
}

int FileReader::fd_for(const std::string& path) {
  auto it = fds_.find(path);
  if (it != fds_.end()) return it->second;
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd >= 0) fds_[path] = fd;
  return fd;
}

int64_t FileReader::enqueue(const std::string& path, int64_t offset, int64_t length, void* dst, bool evict_after) {
  std::lock_guard<std::mutex> lock(mutex_);
  int64_t ticket = next_ticket_++;
  queue_.push_back(Job{ticket, path, offset, length, dst, evict_after});
  cv_.notify_all();
  return ticket;
}

void FileReader::run() {
  for (;;) {
    Job job;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      job = queue_.front();
      queue_.pop_front();
    }
    std::string error;
    auto started = std::chrono::steady_clock::now();
    int fd = fd_for(job.path);
    if (fd < 0) {
      error = job.path + ": cannot open (" + std::strerror(errno) + ")";
    } else {
      char* dst = static_cast<char*>(job.dst);
      int64_t done = 0;
      while (done < job.length) {
        ssize_t n = pread(fd, dst + done, static_cast<size_t>(job.length - done), job.offset + done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
          error = job.path + ": read failed at byte " + std::to_string(job.offset + done) + " (" +
                  (n == 0 ? std::string("unexpected end of file") : std::string(std::strerror(errno))) + ")";
          break;
        }
        done += n;
      }
      // Drop the pages from the page cache, so the next pass reads the disk again (a model larger than RAM).
      if (error.empty() && job.evict) posix_fadvise(fd, job.offset, job.length, POSIX_FADV_DONTNEED);
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error.empty()) errors_[job.ticket] = error;
      durations_[job.ticket] = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
      done_through_ = job.ticket;
    }
    cv_.notify_all();
  }
}

std::pair<double, double> FileReader::wait(int64_t ticket) {
  auto start = std::chrono::steady_clock::now();
  std::unique_lock<std::mutex> lock(mutex_);
  cv_.wait(lock, [&] { return done_through_ >= ticket; });
  double read_seconds = durations_[ticket];
  durations_.erase(ticket);
  auto it = errors_.find(ticket);
  if (it != errors_.end()) {
    std::string e = it->second;
    errors_.erase(it);
    throw std::runtime_error(e);
  }
  return {std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), read_seconds};
}

}  // namespace blossom
