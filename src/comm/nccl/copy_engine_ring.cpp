// CopyEngineRing: interprocess events and memory handles shared once, per-exchange host messages, cudaMemcpyAsync.
#include "comm/nccl/copy_engine_ring.hpp"

#include <cuda.h>

#include <cstdlib>
#include <cstring>
#include <functional>

#include "ringattn/error.hpp"

namespace ringattn {
namespace {

constexpr int kTagFree = 11;  // receiver -> rank-1: its recv buffers are free (handles, offsets, sizes)
constexpr int kTagSent = 12;  // sender -> rank+1: the copies of an exchange are enqueued, sent[] recorded
constexpr unsigned kEventFlags = cudaEventDisableTiming | cudaEventInterprocess;
constexpr const char* kCopyEngineEnv = "RINGATTN_COPY_ENGINE";

void check_cuda(cudaError_t e, const std::string& call) {
  if (e != cudaSuccess) {
    fail(ErrorKind::kCuda, call + " failed: " + cudaGetErrorString(e),
         "the copy-engine exchange needs the ranks' GPUs to reach each other (NVLink/PCIe peer access); "
         "unset RINGATTN_COPY_ENGINE to exchange over NCCL");
  }
}

void check_mpi(int rc, const char* call) {
  if (rc != MPI_SUCCESS) fail(ErrorKind::kComm, std::string(call) + " failed in the copy-engine exchange", "");
}

using GetAddressRangeFn = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);

GetAddressRangeFn address_range_fn() {
  static const GetAddressRangeFn fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status{};
    constexpr unsigned kDriverApiVersion = 3020;  // cuMemGetAddressRange_v2
    if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &ptr, kDriverApiVersion, cudaEnableDefault,
                                         &status) != cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return static_cast<GetAddressRangeFn>(nullptr);
    }
    return reinterpret_cast<GetAddressRangeFn>(ptr);
  }();
  return fn;
}

}  // namespace

bool CopyEngineRing::wanted(MPI_Comm comm, int world) {
  const char* env = std::getenv(kCopyEngineEnv);
  int mine = (env == nullptr || std::strcmp(env, "0") != 0) && world > 1 ? 1 : 0;
  char name[MPI_MAX_PROCESSOR_NAME] = {0};
  int len = 0;
  check_mpi(MPI_Get_processor_name(name, &len), "MPI_Get_processor_name");
  const unsigned long long h = std::hash<std::string>{}(std::string(name, static_cast<std::size_t>(len)));
  unsigned long long lo = 0, hi = 0;
  int all = 0;
  check_mpi(MPI_Allreduce(&h, &lo, 1, MPI_UNSIGNED_LONG_LONG, MPI_MIN, comm), "MPI_Allreduce");
  check_mpi(MPI_Allreduce(&h, &hi, 1, MPI_UNSIGNED_LONG_LONG, MPI_MAX, comm), "MPI_Allreduce");
  check_mpi(MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MIN, comm), "MPI_Allreduce");
  return all == 1 && lo == hi;
}

void CopyEngineRing::agree(bool ok, const std::string& what) {
  int mine = ok ? 1 : 0, all = 0;
  check_mpi(MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MIN, comm_), "MPI_Allreduce");
  if (all == 1) return;
  release();
  fail(ErrorKind::kCuda, ok ? "another rank could not set up the copy-engine exchange" : what,
       "unset RINGATTN_COPY_ENGINE or set it to 0 to exchange over NCCL");
}

CopyEngineRing::CopyEngineRing(MPI_Comm comm, int rank, int world, cudaStream_t compute_stream, int slots)
    : rank_(rank), world_(world), compute_stream_(compute_stream) {
  next_ = (rank_ + 1) % world_;
  prev_ = (rank_ + world_ - 1) % world_;
  check_mpi(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
  const std::size_t k = static_cast<std::size_t>(slots);
  free_.assign(k, nullptr);
  sent_.assign(k, nullptr);
  next_free_.assign(k, nullptr);
  prev_sent_.assign(k, nullptr);
  free_marked_.assign(k, -1);
  free_out_.resize(k);
  sent_out_.assign(k, -1);
  // Local set-up first, agreed on by every rank before any rank waits for a peer.
  std::vector<cudaIpcEventHandle_t> my_free(k), my_sent(k), their_free(k), their_sent(k);
  cudaIpcMemHandle_t my_probe{}, their_probe{};
  std::string why;
  auto local = [&](cudaError_t e, const char* call) {
    if (e != cudaSuccess && why.empty()) why = std::string(call) + " failed: " + cudaGetErrorString(e);
    return e == cudaSuccess;
  };
  for (std::size_t i = 0; i < k && why.empty(); ++i) {
    local(cudaEventCreateWithFlags(&free_[i], kEventFlags), "cudaEventCreateWithFlags (interprocess)") &&
        local(cudaEventCreateWithFlags(&sent_[i], kEventFlags), "cudaEventCreateWithFlags (interprocess)") &&
        local(cudaIpcGetEventHandle(&my_free[i], free_[i]), "cudaIpcGetEventHandle") &&
        local(cudaIpcGetEventHandle(&my_sent[i], sent_[i]), "cudaIpcGetEventHandle");
  }
  if (why.empty() && local(cudaMalloc(&probe_, kProbeBytes), "cudaMalloc (probe)")) {
    local(cudaIpcGetMemHandle(&my_probe, probe_), "cudaIpcGetMemHandle");
  }
  agree(why.empty(), why);
  const int bytes = static_cast<int>(k * sizeof(cudaIpcEventHandle_t));
  // rank-1 waits on our free events and writes into our memory, rank+1 waits on our sent events.
  check_mpi(MPI_Sendrecv(my_free.data(), bytes, MPI_BYTE, prev_, kTagFree, their_free.data(), bytes, MPI_BYTE, next_,
                         kTagFree, comm_, MPI_STATUS_IGNORE),
            "MPI_Sendrecv of event handles");
  check_mpi(MPI_Sendrecv(my_sent.data(), bytes, MPI_BYTE, next_, kTagSent, their_sent.data(), bytes, MPI_BYTE, prev_,
                         kTagSent, comm_, MPI_STATUS_IGNORE),
            "MPI_Sendrecv of event handles");
  check_mpi(MPI_Sendrecv(&my_probe, sizeof(my_probe), MPI_BYTE, prev_, kTagFree, &their_probe, sizeof(their_probe),
                         MPI_BYTE, next_, kTagFree, comm_, MPI_STATUS_IGNORE),
            "MPI_Sendrecv of the probe handle");
  for (std::size_t i = 0; i < k && why.empty(); ++i) {
    local(cudaIpcOpenEventHandle(&next_free_[i], their_free[i]), "cudaIpcOpenEventHandle (rank+1's free event)") &&
        local(cudaIpcOpenEventHandle(&prev_sent_[i], their_sent[i]), "cudaIpcOpenEventHandle (rank-1's sent event)");
  }
  // Mapping rank+1's probe proves that its memory is reachable (peer access) before any exchange.
  void* mapped = nullptr;
  if (why.empty() && local(cudaIpcOpenMemHandle(&mapped, their_probe, cudaIpcMemLazyEnablePeerAccess),
                           "cudaIpcOpenMemHandle (rank+1's probe)")) {
    opened_.emplace(std::string(reinterpret_cast<const char*>(&their_probe), sizeof(their_probe)),
                    static_cast<char*>(mapped));
  }
  agree(why.empty(), why);
}

CopyEngineRing::~CopyEngineRing() { release(); }

void CopyEngineRing::release() {
  cancel();
  for (auto& [key, base] : opened_) cudaIpcCloseMemHandle(base);
  opened_.clear();
  for (auto* v : {&free_, &sent_, &next_free_, &prev_sent_}) {
    for (cudaEvent_t& e : *v) {
      if (e) cudaEventDestroy(e);
      e = nullptr;
    }
  }
  if (probe_) cudaFree(probe_);
  probe_ = nullptr;
  cudaGetLastError();  // a failed set-up leaves nothing behind for the caller's next CUDA call
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  comm_ = MPI_COMM_NULL;
}

void CopyEngineRing::cancel() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) {
    sends_.clear();
    return;
  }
  for (MPI_Request& r : sends_) {
    if (r == MPI_REQUEST_NULL) continue;
    int done = 0;
    MPI_Test(&r, &done, MPI_STATUS_IGNORE);
    if (!done) {
      MPI_Cancel(&r);
      MPI_Request_free(&r);
    }
  }
  sends_.clear();
}

void CopyEngineRing::wait_request(MPI_Request* req, const Poll& poll, const std::string& what) {
  while (true) {
    int done = 0;
    check_mpi(MPI_Test(req, &done, MPI_STATUS_IGNORE), "MPI_Test");
    if (done) return;
    try {
      poll(what);
    } catch (...) {
      // Never waited for: a silent peer may never match it, and an MPI without cancellation would
      // hang here. A receive's buffer is a member, so a late match writes where it may.
      MPI_Cancel(req);
      MPI_Request_free(req);
      throw;
    }
  }
}

void CopyEngineRing::complete_sends(const Poll& poll) {
  for (MPI_Request& r : sends_) wait_request(&r, poll, "the delivery of a copy-engine host message");
  sends_.clear();
}

void CopyEngineRing::mark_free(long seq) {
  const int s = slot(seq);
  check_cuda(cudaEventRecord(free_[s], compute_stream_), "cudaEventRecord (free)");
  free_marked_[s] = seq;
}

void CopyEngineRing::unmark_free(long seq) {
  const int s = slot(seq);
  if (free_marked_[s] == seq) free_marked_[s] = -1;
}

void CopyEngineRing::export_pointer(void* ptr, cudaIpcMemHandle_t* handle, unsigned long long* offset) {
  GetAddressRangeFn range = address_range_fn();
  RINGATTN_CHECK(range != nullptr, ErrorKind::kCuda, "cuMemGetAddressRange is not available from the driver",
                 "unset RINGATTN_COPY_ENGINE to exchange over NCCL");
  CUdeviceptr base = 0;
  size_t size = 0;
  RINGATTN_CHECK(range(&base, &size, reinterpret_cast<CUdeviceptr>(ptr)) == CUDA_SUCCESS, ErrorKind::kCuda,
                 "a receive buffer of the ring is not device memory of this process",
                 "pass device pointers from cudaMalloc, or unset RINGATTN_COPY_ENGINE");
  // Asked every time: an allocation freed and made again at the same address has a new handle.
  check_cuda(cudaIpcGetMemHandle(handle, reinterpret_cast<void*>(base)),
             "cudaIpcGetMemHandle (receive buffers must come from cudaMalloc for the copy-engine exchange)");
  *offset = static_cast<unsigned long long>(reinterpret_cast<CUdeviceptr>(ptr) - base);
}

char* CopyEngineRing::open_handle(const cudaIpcMemHandle_t& handle) {
  const std::string key(reinterpret_cast<const char*>(&handle), sizeof(handle));
  auto it = opened_.find(key);
  if (it != opened_.end()) return it->second;
  void* base = nullptr;
  check_cuda(cudaIpcOpenMemHandle(&base, handle, cudaIpcMemLazyEnablePeerAccess),
             "cudaIpcOpenMemHandle (rank " + std::to_string(next_) + "'s receive buffer)");
  opened_.emplace(key, static_cast<char*>(base));
  return static_cast<char*>(base);
}

void CopyEngineRing::post(long seq, const ExchangePart* parts, int num_parts, cudaStream_t comm_stream,
                          const Poll& poll) {
  RINGATTN_CHECK(num_parts >= 1 && num_parts <= kMaxParts, ErrorKind::kInternal,
                 "copy-engine exchange of " + std::to_string(num_parts) + " parts", "");
  complete_sends(poll);  // the message buffers of this slot are free again
  const int s = slot(seq);
  // Receiver: our recv buffers are free once the compute enqueued so far (or up to the fence) is done.
  if (free_marked_[s] != seq) check_cuda(cudaEventRecord(free_[s], compute_stream_), "cudaEventRecord (free)");
  FreeMessage& out = free_out_[s];
  std::memset(&out, 0, sizeof(out));
  out.seq = seq;
  out.num_parts = num_parts;
  for (int i = 0; i < num_parts; ++i) {
    out.parts[i].bytes = parts[i].bytes;
    if (parts[i].bytes > 0) export_pointer(parts[i].recv, &out.parts[i].handle, &out.parts[i].offset);
  }
  MPI_Request req = MPI_REQUEST_NULL;
  check_mpi(MPI_Isend(&out, sizeof(out), MPI_BYTE, prev_, kTagFree, comm_, &req), "MPI_Isend (free)");
  sends_.push_back(req);

  // Sender: rank+1's buffers for this exchange.
  FreeMessage& in = free_in_;
  req = MPI_REQUEST_NULL;
  check_mpi(MPI_Irecv(&in, sizeof(in), MPI_BYTE, next_, kTagFree, comm_, &req), "MPI_Irecv (free)");
  wait_request(&req, poll, "rank " + std::to_string(next_) + "'s receive buffers");
  RINGATTN_CHECK(in.seq == seq && in.num_parts == num_parts, ErrorKind::kComm,
                 "copy-engine exchange " + std::to_string(seq) + ": rank " + std::to_string(next_) +
                     " posted exchange " + std::to_string(in.seq) + " with " + std::to_string(in.num_parts) +
                     " parts, this rank " + std::to_string(num_parts),
                 "every rank must run the same ring passes");
  check_cuda(cudaStreamWaitEvent(comm_stream, next_free_[s], 0), "cudaStreamWaitEvent (rank+1's free event)");
  for (int i = 0; i < num_parts; ++i) {
    RINGATTN_CHECK(in.parts[i].bytes == parts[i].bytes, ErrorKind::kComm,
                   "copy-engine exchange " + std::to_string(seq) + ": part " + std::to_string(i) + " is " +
                       std::to_string(parts[i].bytes) + " bytes here but " + std::to_string(in.parts[i].bytes) +
                       " on rank " + std::to_string(next_),
                   "every rank must run the same ring passes");
    if (parts[i].bytes == 0) continue;
    char* dst = open_handle(in.parts[i].handle) + in.parts[i].offset;
    check_cuda(cudaMemcpyAsync(dst, parts[i].send, parts[i].bytes, cudaMemcpyDeviceToDevice, comm_stream),
               "cudaMemcpyAsync to rank " + std::to_string(next_));
  }
  check_cuda(cudaEventRecord(sent_[s], comm_stream), "cudaEventRecord (sent)");
  sent_out_[s] = seq;
  req = MPI_REQUEST_NULL;
  check_mpi(MPI_Isend(&sent_out_[s], 1, MPI_LONG, next_, kTagSent, comm_, &req), "MPI_Isend (sent)");
  sends_.push_back(req);
}

void CopyEngineRing::wait(long seq, const Poll& poll) {
  long& got = sent_in_;
  got = -1;
  MPI_Request req = MPI_REQUEST_NULL;
  check_mpi(MPI_Irecv(&got, 1, MPI_LONG, prev_, kTagSent, comm_, &req), "MPI_Irecv (sent)");
  wait_request(&req, poll, "rank " + std::to_string(prev_) + "'s data");
  RINGATTN_CHECK(got == seq, ErrorKind::kComm,
                 "copy-engine exchange " + std::to_string(seq) + ": rank " + std::to_string(prev_) + " sent exchange " +
                     std::to_string(got),
                 "every rank must run the same ring passes");
  check_cuda(cudaStreamWaitEvent(compute_stream_, prev_sent_[slot(seq)], 0),
             "cudaStreamWaitEvent (rank-1's sent event)");
}

}  // namespace ringattn
