// Background file reads for disk offload: a queue of preads into memory regions, served by one
// I/O thread, so the next layer's weights arrive while the current layer computes.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>

namespace blossom {

class FileReader {
 public:
  FileReader();
  ~FileReader();
  FileReader(const FileReader&) = delete;
  FileReader& operator=(const FileReader&) = delete;

  // Queues a read of [offset, offset+length) of `path` into dst; returns a ticket.
  int64_t enqueue(const std::string& path, int64_t offset, int64_t length, void* dst, bool evict_after);
  // Blocks until the ticket's read is done. Returns {seconds spent waiting, seconds the read took}.
  // Throws on a read error.
  std::pair<double, double> wait(int64_t ticket);

 private:
  struct Job {
    int64_t ticket;
    std::string path;
    int64_t offset, length;
    void* dst;
    bool evict;
  };
  void run();
  int fd_for(const std::string& path);

  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Job> queue_;
  std::unordered_map<int64_t, std::string> errors_;
  std::unordered_map<int64_t, double> durations_;
  int64_t next_ticket_ = 1;
  int64_t done_through_ = 0;  // tickets complete in order
  bool stop_ = false;
  std::unordered_map<std::string, int> fds_;
  std::thread thread_;
};

}  // namespace blossom
