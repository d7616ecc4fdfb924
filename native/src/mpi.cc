// MPI for tensor parallelism: initialisation from the engine worker thread, all-reduce, broadcast
// and gather. Compiled in when node-gyp finds Open MPI's mpicxx (BLOSSOM_MPI); otherwise every entry
// point reports that MPI is unavailable.
#include "mpi_bindings.h"

#include <cstdlib>
#include <stdexcept>
#include <string>

#ifdef BLOSSOM_MPI
#include <dlfcn.h>
#include <mpi.h>
#endif

namespace blossom::mpi {

#ifdef BLOSSOM_MPI
namespace {
bool g_initialized = false;

void check(int rc, const char* what) {
  if (rc != MPI_SUCCESS) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    throw std::runtime_error(std::string(what) + " failed: " + std::string(msg, len));
  }
}
}  // namespace

bool available() { return true; }

World init() {
  if (!g_initialized) {
    // Node loads addons RTLD_LOCAL; Open MPI's plugins need libmpi's symbols global.
    for (const char* lib : {"libmpi.so.40", "libmpi.so"}) {
      if (dlopen(lib, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD) || dlopen(lib, RTLD_NOW | RTLD_GLOBAL)) break;
    }
    int provided = 0;
    // Funneled: only the thread that initialises (the engine worker) makes MPI calls.
    check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
    g_initialized = true;
  }
  World w;
  MPI_Comm_rank(MPI_COMM_WORLD, &w.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &w.size);
  MPI_Comm local;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, w.rank, MPI_INFO_NULL, &local);
  MPI_Comm_rank(local, &w.local_rank);
  MPI_Comm_size(local, &w.local_size);
  MPI_Comm_free(&local);
  return w;
}

void all_reduce_sum(float* data, int64_t count) {
  check(MPI_Allreduce(MPI_IN_PLACE, data, static_cast<int>(count), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD), "MPI_Allreduce");
}

void broadcast(void* data, int64_t bytes, int root) {
  check(MPI_Bcast(data, static_cast<int>(bytes), MPI_BYTE, root, MPI_COMM_WORLD), "MPI_Bcast");
}

void gather(const float* send, int64_t count, float* recv, const int* counts, const int* displs, int root) {
  check(MPI_Gatherv(send, static_cast<int>(count), MPI_FLOAT, recv, counts, displs, MPI_FLOAT, root, MPI_COMM_WORLD), "MPI_Gatherv");
}

void abort(int code) {
  MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

void finalize() {
  if (g_initialized) {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
    g_initialized = false;
  }
}

#else
[[noreturn]] static void unavailable() {
  throw std::runtime_error("this build has no MPI support: install Open MPI (Debian: openmpi-bin libopenmpi-dev) and run `npm run build:native`");
}
bool available() { return false; }
World init() { unavailable(); }
void all_reduce_sum(float*, int64_t) { unavailable(); }
void broadcast(void*, int64_t, int) { unavailable(); }
void gather(const float*, int64_t, float*, const int*, const int*, int) { unavailable(); }
void finalize() {}
void abort(int code) { std::_Exit(code); }
#endif

}  // namespace blossom::mpi
