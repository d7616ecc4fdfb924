// Memory-mapped files and page-aligned anonymous allocations.
#pragma once
#include <cstddef>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace blossom {

struct Region {
  void* data = nullptr;
  size_t size = 0;
  // File mappings: the mapped file, kept open (settle_file_pages remaps parts of it: a mapping of the
  // same open file merges with its neighbours again) and closed by release_region.
  int fd = -1;
};

// Maps a whole file read-only. Throws std::runtime_error naming the file on failure.
Region map_file(const std::string& path);
// The same, but one mapping per file per process: engine workers (replicas) that map the same
// checkpoint share its pages instead of each counting them. Unmapped when the last owner drops it.
std::shared_ptr<Region> map_file_shared(const std::string& path);
// Anonymous, zero-filled, page-aligned memory, resident only once touched; transparent huge pages
// requested unless `huge` is false (buffers filled a little at a time: each touch would make 2 MiB resident).
Region allocate_pages(size_t bytes, bool huge = true);
void release_region(const Region& r);
// Hints to the kernel: bring pages in ahead of use, or drop them (file-backed pages are re-read on demand).
void advise_willneed(void* data, size_t size);
void advise_dontneed(void* data, size_t size);
// Map these pages 4 KiB at a time even where the page cache holds them in 2 MiB folios (offloading
// reads and drops small pieces of a checkpoint; 2 MiB mappings would keep whole huge pages resident).
void advise_nohugepage(void* data, size_t size);
// What settle_file_pages found and did, in bytes: `eligible` is the part of the ranges that
// 2 MiB entries can map (whole aligned 2 MiB pieces), `before` / `after` how much of the mapping
// was so mapped before and after.
struct SettleReport {
  size_t eligible = 0, before = 0, after = 0;
  bool reread = false;
};
// For a file mapping: makes the pages of the byte ranges (offset, length pairs) resident and, where
// the page cache holds them in pieces smaller than 2 MiB, drops them and reads them again through the
// mapping, which brings them back as 2 MiB folios mapped with one entry each (see memory.cc).
SettleReport settle_file_pages(const Region& r, const std::vector<std::pair<size_t, size_t>>& ranges);
// Resident set size of this process in bytes (from /proc/self/statm), 0 if unknown.
size_t resident_bytes();
// Bytes of [data, data+size) in resident pages (mincore), whole pages counted.
size_t resident_bytes_in(const void* data, size_t size);

}  // namespace blossom
