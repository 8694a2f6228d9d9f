// CopyEngineRing::wanted: the ranks of one host agree on the copy-engine exchange, and one rank's RINGATTN_COPY_ENGINE=0 turns it off for all.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdlib>
#include <string>

#include "comm/nccl/copy_engine_ring.hpp"

namespace ringattn::test {
namespace {

// Host-side only (MPI and the environment): runs with or without GPUs.
TEST(CopyEngine, WantedOnOneHostUnlessOneRankTurnsItOff) {
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  const char* before = std::getenv("RINGATTN_COPY_ENGINE");
  const std::string saved = before != nullptr ? before : "";
  unsetenv("RINGATTN_COPY_ENGINE");
  // mpirun starts every rank of these tests on this host.
  EXPECT_EQ(CopyEngineRing::wanted(MPI_COMM_WORLD, world), world > 1);
  EXPECT_FALSE(CopyEngineRing::wanted(MPI_COMM_WORLD, 1)) << "a ring of one rank exchanges nothing";
  if (rank == 0) setenv("RINGATTN_COPY_ENGINE", "0", 1);
  EXPECT_FALSE(CopyEngineRing::wanted(MPI_COMM_WORLD, world)) << "rank 0 turned it off: every rank must agree";
  setenv("RINGATTN_COPY_ENGINE", "1", 1);
  EXPECT_EQ(CopyEngineRing::wanted(MPI_COMM_WORLD, world), world > 1);
  if (before != nullptr) {
    setenv("RINGATTN_COPY_ENGINE", saved.c_str(), 1);
  } else {
    unsetenv("RINGATTN_COPY_ENGINE");
  }
}

}  // namespace
}  // namespace ringattn::test
