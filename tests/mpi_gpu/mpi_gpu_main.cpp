// gtest main for the MPI + GPU tests: one GPU per rank or every test skips visibly; exit code is the OR over ranks.
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>
#include <string>

#include "mpi_gpu/mpi_gpu_env.hpp"

namespace ringattn::test {

std::string& gpu_skip_reason() {
  static std::string reason;
  return reason;
}

}  // namespace ringattn::test

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  ::testing::InitGoogleTest(&argc, argv);
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);

  // Every rank needs a GPU of its own on its host; decide together so that all ranks skip alike.
  MPI_Comm node;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node);
  int local_rank = 0, local_size = 1;
  MPI_Comm_rank(node, &local_rank);
  MPI_Comm_size(node, &local_size);
  MPI_Comm_free(&node);
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
  cudaGetLastError();
  const int short_here = local_rank >= devices ? 1 : 0;
  int short_any = 0;
  MPI_Allreduce(&short_here, &short_any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (short_any) {
    ringattn::test::gpu_skip_reason() = "needs one GPU per rank: " + std::to_string(world) + " ranks (" +
                                        std::to_string(local_size) + " on this host), " + std::to_string(devices) +
                                        " GPU(s) visible here";
    if (rank == 0) std::fprintf(stderr, "mpi_gpu tests SKIPPED: %s\n", ringattn::test::gpu_skip_reason().c_str());
  } else {
    cudaSetDevice(local_rank);
  }

  if (rank != 0) {
    // Only rank 0 prints the gtest banner; the others report failures only.
    ::testing::TestEventListeners& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  const int local_failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  ringattn::test::release_session();
  int any_failed = 0;
  MPI_Allreduce(&local_failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (local_failed) std::fprintf(stderr, "rank %d: mpi_gpu tests FAILED\n", rank);
  if (rank == 0) std::fprintf(stderr, "mpi_gpu tests on %d ranks: %s\n", world, any_failed ? "FAILED" : "passed");
  MPI_Finalize();
  return any_failed;
}
