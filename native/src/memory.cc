#include "memory.h"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <cmath>
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
  if (p == MAP_FAILED) {
    close(fd);
    throw std::runtime_error(path + ": mmap failed (" + std::strerror(e) + ")");
  }
  r.data = p;
  r.fd = fd;
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
  if (r.fd >= 0) close(r.fd);
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

// ---- settling a file mapping in 2 MiB folios -------------------------------------------------
// Whether the page cache can hold a file in 2 MiB folios depends on how its pages got there. Read
// through a VM_HUGEPAGE mapping (map_huge_aligned), they arrive in PMD-sized folios that the kernel
// maps with one entry each; written by a process (a checkpoint just downloaded or converted) or read
// with read(), they sit in smaller folios, and a mapping of them takes 512 entries per 2 MiB for as
// long as they stay cached. Decoding streams every weight once per token, and on the development
// machine (bloom-560m bf16, the same checkpoint in both states, steps alternated in one process) it
// ran 2.0-2.5 % faster per step from 2 MiB folios (see README, decode). settle_file_pages moves the
// pieces of a file that are not mapped 2 MiB at a time to the better state, at load: it replaces
// their part of the mapping (which frees its 4 KiB page tables), drops their cached pages that nobody
// else maps (posix_fadvise DONTNEED) and reads them again through the mapping. Which pieces are
// mapped how comes from the PAGEMAP_SCAN ioctl (Linux 6.7; without it nothing is re-read). A re-read
// costs a read of those pieces from disk, so it is done only where it helps: one piece first as a
// probe (nothing more if the filesystem or the kernel gives no 2 MiB folio), not when at most 1/16
// of the pieces would gain, and not for weights larger than the memory available (they could not
// all stay resident: touching them would only evict the first ones).
namespace {

// PAGEMAP_SCAN (linux/fs.h from 6.7; defined here for older headers).
struct PmPageRegion {
  uint64_t start, end, categories;
};
struct PmScanArg {
  uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages, category_inverted, category_mask, category_anyof_mask, return_mask;
};
constexpr unsigned long kPagemapScan = _IOWR('f', 16, PmScanArg);
constexpr uint64_t kPageIsHuge = 1u << 6;

// For each 2 MiB piece of [begin, end) (begin 2 MiB-aligned), whether it is mapped by one 2 MiB
// entry. False (and `pieces` untouched) where the kernel has no PAGEMAP_SCAN.
bool huge_pieces(uintptr_t begin, uintptr_t end, std::vector<bool>& pieces) {
  int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  std::vector<bool> out((end - begin) / kHugePage, false);
  std::vector<PmPageRegion> vec(512);
  uintptr_t at = begin;
  bool ok = true;
  while (at < end) {
    PmScanArg arg{};
    arg.size = sizeof arg;
    arg.start = at;
    arg.end = end;
    arg.vec = reinterpret_cast<uintptr_t>(vec.data());
    arg.vec_len = vec.size();
    arg.category_mask = kPageIsHuge;  // only regions where every page is PMD-mapped (or hugetlb)
    arg.return_mask = kPageIsHuge;
    const long n = ioctl(fd, kPagemapScan, &arg);
    if (n < 0) {
      ok = false;
      break;
    }
    for (long i = 0; i < n; ++i) {
      // Whole pieces inside the region.
      const uintptr_t lo = std::max<uintptr_t>(vec[i].start, begin), hi = std::min<uintptr_t>(vec[i].end, end);
      for (uintptr_t p = (lo - begin + kHugePage - 1) / kHugePage * kHugePage; begin + p + kHugePage <= hi; p += kHugePage) out[p / kHugePage] = true;
    }
    if (arg.walk_end <= at) break;
    at = arg.walk_end;
  }
  close(fd);
  if (ok) pieces.swap(out);
  return ok;
}

// Sum of FilePmdMapped over the mappings of this process overlapping [begin, end), from /proc/self/smaps.
size_t file_pmd_mapped(uintptr_t begin, uintptr_t end) {
  FILE* f = std::fopen("/proc/self/smaps", "r");
  if (!f) return 0;
  char* line = nullptr;
  size_t cap = 0;
  bool inside = false;
  size_t kb = 0;
  // Whole lines (getline): a mapping's header "lo-hi perms offset dev inode path" may be longer than
  // any fixed buffer, and the rest of a long path must not be taken for a header.
  while (getline(&line, &cap, f) > 0) {
    unsigned long long lo = 0, hi = 0, v = 0;
    if (std::sscanf(line, "FilePmdMapped: %llu kB", &v) == 1) {
      if (inside) kb += v;
    } else if (std::sscanf(line, "%llx-%llx ", &lo, &hi) == 2) {
      inside = lo < end && begin < hi;
    }
  }
  std::free(line);
  std::fclose(f);
  return static_cast<size_t>(kb) * 1024;
}

// Reads one byte of every page of [p, p+n): faults the range in.
void touch_pages(const uint8_t* p, size_t n) {
  const size_t page = page_size();
  unsigned sum = 0;
  for (size_t i = 0; i < n; i += page) sum += *static_cast<const volatile uint8_t*>(p + i);
  if (n) sum += *static_cast<const volatile uint8_t*>(p + n - 1);
  (void)sum;
}

// Replaces [offset, offset+length) (2 MiB-aligned) of the mapping with a fresh mapping of the same
// open file, which frees the old range's page tables (and merges with its neighbours again), and
// drops its pages from the page cache where no one else maps them (dirty pages are written first, so
// none is kept back). The file is the one mapped, even if a new one has replaced it on disk since.
void evict_file_range(const Region& r, size_t offset, size_t length) {
  uint8_t* at = static_cast<uint8_t*>(r.data) + offset;
  if (mmap(at, length, PROT_READ, MAP_SHARED | MAP_FIXED, r.fd, static_cast<off_t>(offset)) == MAP_FAILED) {
    madvise(at, length, MADV_DONTNEED);  // the old mapping stays; its entries go
  }
#ifdef MADV_HUGEPAGE
  madvise(at, length, MADV_HUGEPAGE);
#endif
#ifdef __linux__
  sync_file_range(r.fd, static_cast<off_t>(offset), static_cast<off_t>(length),
                  SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
#endif
  posix_fadvise(r.fd, static_cast<off_t>(offset), static_cast<off_t>(length), POSIX_FADV_DONTNEED);
}

// Whether transparent huge pages may back a madvise(MADV_HUGEPAGE) mapping at all.
bool thp_possible() {
  FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
  if (!f) return false;
  char buf[128] = {0};
  const size_t n = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  return n > 0 && std::strstr(buf, "[never]") == nullptr;
}

// MemAvailable from /proc/meminfo, in bytes (0 if unknown).
size_t memory_available() {
  FILE* f = std::fopen("/proc/meminfo", "r");
  if (!f) return 0;
  char line[256];
  unsigned long long kb = 0;
  while (std::fgets(line, sizeof line, f)) {
    if (std::sscanf(line, "MemAvailable: %llu kB", &kb) == 1) break;
  }
  std::fclose(f);
  return static_cast<size_t>(kb) * 1024;
}

}  // namespace

SettleReport settle_file_pages(const Region& r, const std::vector<std::pair<size_t, size_t>>& ranges) {
  // One at a time: replicas loading the same checkpoint share its mapping, and the second finds it settled.
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  SettleReport rep;
  if (!r.data || r.fd < 0) return rep;
  auto* base = static_cast<uint8_t*>(r.data);
  const uintptr_t begin = reinterpret_cast<uintptr_t>(base), end = begin + r.size;
  // The ranges clipped to the file, and the 2 MiB pieces of the file they touch: a piece is mapped by
  // one entry only if all of it is one folio, so it is dropped and read whole (the bytes between two
  // tensors used in place, a bias or a norm copied at load, come with it).
  std::vector<std::pair<size_t, size_t>> clipped;
  const size_t whole = r.size / kHugePage;
  std::vector<bool> wanted(whole, false);
  size_t bytes = 0;
  for (auto [offset, length] : ranges) {
    if (offset >= r.size || length == 0) continue;
    const size_t hi = offset + std::min(length, r.size - offset);
    clipped.emplace_back(offset, hi - offset);
    bytes += hi - offset;
    for (size_t p = offset / kHugePage; p < std::min(whole, (hi + kHugePage - 1) / kHugePage); ++p) wanted[p] = true;
  }
  for (bool w : wanted) rep.eligible += w ? kHugePage : 0;
  // Weights that cannot all stay resident are left to be paged in on use, as before.
  const size_t available = memory_available() + resident_bytes_in(base, r.size);
  if (available > 0 && bytes > available) {
    rep.before = rep.after = file_pmd_mapped(begin, end);
    return rep;
  }
  for (auto [o, n] : clipped) touch_pages(base + o, n);
  rep.before = rep.after = file_pmd_mapped(begin, end);
  const bool aligned = (begin & (kHugePage - 1)) == 0;
  std::vector<bool> huge;
  if (rep.eligible == 0 || !huge_file_mappings() || !thp_possible() || !aligned || !huge_pieces(begin, begin + whole * kHugePage, huge)) return rep;
  // The pieces to read again, as runs (first piece, count).
  std::vector<std::pair<size_t, size_t>> runs;
  size_t missing = 0;
  for (size_t p = 0; p < whole; ++p) {
    if (!wanted[p] || huge[p]) continue;
    ++missing;
    if (!runs.empty() && runs.back().first + runs.back().second == p) ++runs.back().second;
    else runs.emplace_back(p, 1);
  }
  if (missing * kHugePage * 16 <= rep.eligible) return rep;
  // Probe: the first such piece, dropped and read again.
  const size_t probe = runs.front().first;
  evict_file_range(r, probe * kHugePage, kHugePage);
  touch_pages(base + probe * kHugePage, kHugePage);
  std::vector<bool> after;
  if (!huge_pieces(begin + probe * kHugePage, begin + (probe + 1) * kHugePage, after) || after.empty() || !after[0]) {
    rep.after = file_pmd_mapped(begin, end);
    return rep;  // no 2 MiB folio for it: leave the rest as it is
  }
  // Each run read again right after it is dropped: dropped first, a later run could be read back
  // (in small folios) by the readahead of an earlier one's faults (an audit saw a quantized
  // checkpoint take two loads to settle).
  for (auto [p, n] : runs) {
    const size_t from = p == probe ? p + 1 : p, count = p == probe ? n - 1 : n;
    if (count > 0) evict_file_range(r, from * kHugePage, count * kHugePage);
    touch_pages(base + p * kHugePage, n * kHugePage);
  }
  for (auto [o, n] : clipped) touch_pages(base + o, n);  // the last partial piece, if a range reaches it
  rep.after = file_pmd_mapped(begin, end);
  rep.reread = true;
  return rep;
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
