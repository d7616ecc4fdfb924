#pragma once
#include <cstdint>

namespace blossom::mpi {

struct World {
  int rank = 0, size = 1, local_rank = 0, local_size = 1;
};

bool available();
World init();
void all_reduce_sum(float* data, int64_t count);
void broadcast(void* data, int64_t bytes, int root);
// Rank `root` receives counts[r] floats from each rank r at displs[r] (counts/displs used on root only).
void gather(const float* send, int64_t count, float* recv, const int* counts, const int* displs, int root);
void finalize();
// Ends every rank of the job (a rank failed where the others cannot go on without it).
[[noreturn]] void abort(int code);

}  // namespace blossom::mpi
