// Factories of the concrete transports (internal): MPI over host memory, NCCL over device memory.
#pragma once

#include <memory>

#include "ringattn/transport.hpp"

#ifdef RINGATTN_HAVE_MPI
#include <mpi.h>
#endif

namespace ringattn {

#ifdef RINGATTN_HAVE_MPI
// Ring over `comm` (duplicated internally) with non-blocking MPI_Isend/Irecv on host buffers.
std::unique_ptr<Transport> make_mpi_transport(MPI_Comm comm);
#endif

#ifdef RINGATTN_HAVE_NCCL
// Ring over a dedicated NCCL communicator bootstrapped through `comm` (unique id broadcast),
// with its own communication stream ordered against `compute_stream` (a cudaStream_t) by events.
std::unique_ptr<Transport> make_nccl_transport(MPI_Comm comm, int device, void* compute_stream);
#endif

}  // namespace ringattn
