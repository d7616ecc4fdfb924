#include "memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <tuple>
#include <vector>

namespace blossom {

namespace {
size_t page_size() {
  static size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}
uintptr_t page_floor(uintptr_t p) { return p & ~(page_size() - 1); }

constexpr size_t kHugePage = size_t{2} << 20;

bool huge_file_mappings() {
  static const bool on = [] {
    const char* v = std::getenv("BLOSSOM_FILE_HUGEPAGES");
    return !(v && std::strcmp(v, "0") == 0);
  }();
  return on;
}

// Maps `size` bytes of `fd` read-only at a 2 MiB-aligned address and asks for transparent huge
// pages. File offset 0 then falls on a huge-page boundary, so wherever the page cache holds the file
// in 2 MiB folios (Linux reads a VM_HUGEPAGE mapping ahead in PMD-sized folios on filesystems with
// large-folio support: ext4 since 6.16, xfs, tmpfs with huge=) the kernel maps them with one PMD
// entry each instead of 512 PTEs. Decoding streams every weight once per token, so this removes
// almost all of its TLB misses and page walks. Nothing is copied; where the kernel cannot do it the
// mapping is an ordinary 4 KiB-page one. Returns MAP_FAILED with errno set on failure.
void* map_huge_aligned(int fd, size_t size) {
  if (!huge_file_mappings() || size < kHugePage) return mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  void* reserve = mmap(nullptr, size + kHugePage, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (reserve == MAP_FAILED) return mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  uintptr_t base = reinterpret_cast<uintptr_t>(reserve);
  uintptr_t aligned = (base + kHugePage - 1) & ~(kHugePage - 1);
  void* p = mmap(reinterpret_cast<void*>(aligned), size, PROT_READ, MAP_SHARED | MAP_FIXED, fd, 0);
  if (p == MAP_FAILED) {
    int e = errno;
    munmap(reserve, size + kHugePage);
    errno = e;
    return MAP_FAILED;
  }
  // Give back the reservation's slack on both sides of the file mapping.
  if (aligned > base) munmap(reserve, aligned - base);
  uintptr_t end = aligned + ((size + page_size() - 1) & ~(page_size() - 1));
  uintptr_t reserve_end = base + size + kHugePage;
  if (reserve_end > end) munmap(reinterpret_cast<void*>(end), reserve_end - end);
#ifdef MADV_HUGEPAGE
  madvise(p, size, MADV_HUGEPAGE);
#endif
  return p;
}
}  // namespace

Region map_file(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error(path + ": cannot open (" + std::strerror(errno) + ")");
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int e = errno;
    close(fd);
    throw std::runtime_error(path + ": cannot stat (" + std::strerror(e) + ")");
  }
  Region r;
  r.size = static_cast<size_t>(st.st_size);
  if (r.size == 0) {
    close(fd);
    return r;
  }
  void* p = map_huge_aligned(fd, r.size);
  int e = errno;
  close(fd);
  if (p == MAP_FAILED) throw std::runtime_error(path + ": mmap failed (" + std::strerror(e) + ")");
  r.data = p;
  return r;
}

std::shared_ptr<Region> map_file_shared(const std::string& path) {
  static std::mutex mutex;
  static std::map<std::tuple<dev_t, ino_t, off_t, time_t, long>, std::weak_ptr<Region>> cache;
  struct stat st;
  if (stat(path.c_str(), &st) != 0) throw std::runtime_error(path + ": cannot stat (" + std::strerror(errno) + ")");
  auto key = std::make_tuple(st.st_dev, st.st_ino, st.st_size, st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
  std::lock_guard<std::mutex> lock(mutex);
  for (auto it = cache.begin(); it != cache.end();) it = it->second.expired() ? cache.erase(it) : std::next(it);
  if (auto existing = cache[key].lock()) return existing;
  auto mapping = std::shared_ptr<Region>(new Region(map_file(path)), [](Region* r) {
    release_region(*r);
    delete r;
  });
  cache[key] = mapping;
  return mapping;
}

Region allocate_pages(size_t bytes, bool huge) {
  Region r;
  r.size = bytes;
  if (bytes == 0) return r;
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("cannot allocate " + std::to_string(bytes) + " bytes (" + std::strerror(errno) + ")");
#ifdef MADV_HUGEPAGE
  if (huge && bytes >= (2u << 20)) madvise(p, bytes, MADV_HUGEPAGE);
#endif
  r.data = p;
  return r;
}

void release_region(const Region& r) {
  if (r.data && r.size) munmap(r.data, r.size);
}

namespace {
// [data, data+size) widened to start on a page boundary, as madvise and mincore require.
struct PageRange {
  void* start;
  size_t length;
};
PageRange page_range(const void* data, size_t size) {
  const uintptr_t start = page_floor(reinterpret_cast<uintptr_t>(data));
  return {reinterpret_cast<void*>(start), size + (reinterpret_cast<uintptr_t>(data) - start)};
}
void advise(void* data, size_t size, int advice) {
  if (!data || !size) return;
  const PageRange r = page_range(data, size);
  madvise(r.start, r.length, advice);
}
}  // namespace

void advise_willneed(void* data, size_t size) { advise(data, size, MADV_WILLNEED); }

void advise_dontneed(void* data, size_t size) { advise(data, size, MADV_DONTNEED); }

void advise_nohugepage(void* data, size_t size) {
#ifdef MADV_NOHUGEPAGE
  advise(data, size, MADV_NOHUGEPAGE);
#endif
}

size_t resident_bytes_in(const void* data, size_t size) {
  if (!data || !size) return 0;
  const size_t page = page_size();
  const PageRange r = page_range(data, size);
  std::vector<unsigned char> vec((r.length + page - 1) / page);
  if (mincore(r.start, r.length, vec.data()) != 0) return 0;
  size_t pages = 0;
  for (unsigned char v : vec) pages += v & 1;
  return pages * page;
}

size_t resident_bytes() {
  FILE* f = std::fopen("/proc/self/statm", "r");
  if (!f) return 0;
  unsigned long size = 0, resident = 0;
  int n = std::fscanf(f, "%lu %lu", &size, &resident);
  std::fclose(f);
  return n == 2 ? resident * page_size() : 0;
}

}  // namespace blossom
