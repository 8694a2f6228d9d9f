// The C ABI (include/ringattn/ringattn_c.h) over RingAttention: argument checks, status codes, thread-local messages.
#include "ringattn/ringattn_c.h"

#include <cmath>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <string>
#include <vector>

#ifdef RINGATTN_HAVE_CUDA
#include <cuda_runtime.h>
#endif
#ifdef RINGATTN_HAVE_MPI
#include <mpi.h>
#endif

#include "attn/reference.hpp"
#include "plan/plan.hpp"
#include "ringattn/ringattn.hpp"

namespace ringattn {
namespace {

thread_local std::string t_last_error;

// A status with its message for ringattn_last_error().
struct CError {
  ringattn_status status;
  std::string message;
};

[[noreturn]] void c_fail(ringattn_status status, const std::string& message) {
  throw CError{status, context_prefix() + " " + message};
}

ringattn_status status_of(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kInvalidArgument: return RINGATTN_ERR_INVALID_ARGUMENT;
    case ErrorKind::kIo: return RINGATTN_ERR_IO;
    case ErrorKind::kMismatch: return RINGATTN_ERR_MISMATCH;
    case ErrorKind::kComm: return RINGATTN_ERR_COMM;
    case ErrorKind::kCuda: return RINGATTN_ERR_CUDA;
    case ErrorKind::kInternal: return RINGATTN_ERR_INTERNAL;
  }
  return RINGATTN_ERR_INTERNAL;
}

// Runs `body` with every exception turned into a status and a message: nothing crosses the ABI.
template <typename F>
ringattn_status guarded(F&& body) {
  try {
    body();
    t_last_error.clear();
    return RINGATTN_OK;
  } catch (const CError& e) {
    t_last_error = e.message;
    return e.status;
  } catch (const Error& e) {
    t_last_error = e.what();
    return status_of(e.kind());
  } catch (const std::bad_alloc&) {
    t_last_error = context_prefix() + " out of host memory";
    return RINGATTN_ERR_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    t_last_error = context_prefix() + " internal error: " + e.what();
    return RINGATTN_ERR_INTERNAL;
  } catch (...) {
    t_last_error = context_prefix() + " internal error: an unknown exception";
    return RINGATTN_ERR_INTERNAL;
  }
}

void require(bool ok, const std::string& message) {
  if (!ok) c_fail(RINGATTN_ERR_INVALID_ARGUMENT, message);
}

// A struct from the caller: not null, and at least as large as the fields this library reads.
template <typename T>
const T& input_struct(const T* p, const char* what) {
  require(p != nullptr, std::string(what) + " is NULL");
  require(p->struct_size >= sizeof(T), std::string(what) + "->struct_size is " + std::to_string(p->struct_size) +
                                           ", this library reads " + std::to_string(sizeof(T)) +
                                           " bytes (hint: set struct_size = sizeof(" + what + ") from this header)");
  return *p;
}

DType dtype_of(int32_t d, const char* what) {
  switch (d) {
    case RINGATTN_DTYPE_F64: return DType::kF64;
    case RINGATTN_DTYPE_F32: return DType::kF32;
    case RINGATTN_DTYPE_BF16: return DType::kBF16;
    case RINGATTN_DTYPE_F16: return DType::kF16;
    default: break;
  }
  c_fail(RINGATTN_ERR_UNSUPPORTED, std::string(what) + " has dtype " + std::to_string(d) +
                                       ", not one of RINGATTN_DTYPE_F64/F32/BF16/F16");
}

Layout layout_of(int32_t l) {
  switch (l) {
    case RINGATTN_LAYOUT_CONTIGUOUS: return Layout::kContiguous;
    case RINGATTN_LAYOUT_ZIGZAG: return Layout::kZigzag;
    case RINGATTN_LAYOUT_STRIPED: return Layout::kStriped;
    case RINGATTN_LAYOUT_AUTO: return Layout::kAuto;
    case RINGATTN_LAYOUT_BALANCED: return Layout::kBalanced;
    default: break;
  }
  c_fail(RINGATTN_ERR_UNSUPPORTED, "spec->layout " + std::to_string(l) + " is not a ringattn_layout");
}

AttentionSpec spec_of(const ringattn_spec* p) {
  const ringattn_spec& c = input_struct(p, "ringattn_spec");
  AttentionSpec s;
  s.batch = c.batch;
  s.seq_len = c.seq_len;
  s.heads = c.heads;
  s.kv_heads = c.kv_heads;
  s.head_dim = c.head_dim;
  s.dtype = dtype_of(c.dtype, "spec");
  s.layout = layout_of(c.layout);
  s.softmax_scale = c.softmax_scale;
  s.mask.causal = c.causal != 0;
  s.mask.has_window = c.has_window != 0;
  s.mask.window_left = c.window_left;
  s.mask.window_right = c.window_right;
  s.mask.stride = c.stride;
  s.mask.global_tokens = c.global_tokens;
  s.mask.mask_heads = c.mask_heads;
  require(c.num_docs >= 0, "spec->num_docs is " + std::to_string(c.num_docs));
  if (c.num_docs > 0) {
    require(c.doc_offsets != nullptr, "spec->num_docs is " + std::to_string(c.num_docs) + " but doc_offsets is NULL");
    s.mask.doc_offsets.assign(c.doc_offsets, c.doc_offsets + c.num_docs + 1);
  }
  return s;
}

// A view of a caller's tensor; shapes and dtypes are checked again by the ring against the spec.
TensorView view_of(const ringattn_tensor* t, const char* what, Device device) {
  const ringattn_tensor& c = input_struct(t, what);
  require(c.data != nullptr, std::string(what) + "->data is NULL");
  require(c.ndim >= 1 && c.ndim <= kMaxRank, std::string(what) + "->ndim is " + std::to_string(c.ndim));
  TensorView v;
  v.data = c.data;
  v.dtype = dtype_of(c.dtype, what);
  v.device = device;
  v.rank = c.ndim;
  for (int i = 0; i < c.ndim; ++i) {
    v.shape[i] = c.shape[i];
    v.stride[i] = c.stride[i];
  }
  require(v.is_contiguous(), std::string(what) + " " + v.describe() + " is not contiguous (row-major strides)");
  return v;
}

#ifdef RINGATTN_HAVE_CUDA
// Makes `device` current for a call and restores the caller's device afterwards.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    if (device < 0) return;
    if (cudaGetDevice(&saved_) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
      cudaGetLastError();
      c_fail(RINGATTN_ERR_CUDA, "cannot make CUDA device " + std::to_string(device) + " current");
    }
    active_ = saved_ != device;
    if (!active_) saved_ = -1;
  }
  ~DeviceScope() {
    if (active_) cudaSetDevice(saved_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int saved_ = -1;
  bool active_ = false;
};
#else
class DeviceScope {
 public:
  explicit DeviceScope(int) {}
};
#endif

// A host-memory ring over a binding's callbacks (ringattn_callbacks): the ring exchange only (the
// plan then keeps to the neighbour ring), one tag per piece from a counter every rank advances alike.
class CallbackTransport final : public Transport {
 public:
  CallbackTransport(const ringattn_callbacks& cb, double timeout_ms) : cb_(cb), timeout_ms_(timeout_ms) {}

  const char* name() const override { return "callbacks"; }
  int rank() const override { return cb_.rank; }
  int world() const override { return cb_.world; }
  void set_timeout_ms(double ms) override { timeout_ms_ = ms; }

  void start_exchange_pieces(const ExchangePart* parts, int num_parts, int hop,
                             const ExchangePrologue& before) override {
    throw_if_aborted();
    RINGATTN_CHECK(!posted_, ErrorKind::kInternal,
                   "exchange of hop " + std::to_string(hop) + " posted while hop " + std::to_string(hop_) +
                       " is still in flight",
                   "wait for each hop before posting the next");
    hop_ = hop;
    if (before) before(nullptr);  // host memory: the prologue runs here, before the transfer is posted
    const int next = (cb_.rank + 1) % cb_.world, prev = (cb_.rank + cb_.world - 1) % cb_.world;
    posted_ = true;
    for (int part = 0; part < num_parts; ++part) {
      const int64_t tag = next_tag_;
      next_tag_ = (next_tag_ + 1) % kTagModulus;
      if (parts[part].bytes == 0) continue;
      post(0, prev, parts[part].recv, parts[part].bytes, tag);
      post(1, next, const_cast<void*>(parts[part].send), parts[part].bytes, tag);
    }
  }

  void wait(int hop) override {
    throw_if_aborted();
    if (!posted_) return;
    posted_ = false;
    if (cb_.wait_all(cb_.user, timeout_ms_) != 0) {
      const std::string why = "exchange of hop " + std::to_string(hop) + " failed in the wait_all callback: " + text();
      abort(why);
      fail(ErrorKind::kComm, why, "a peer rank died or is stuck, or the binding's communication failed");
    }
  }

  void abort(const std::string& why) override {
    if (aborted_.empty()) aborted_ = why.empty() ? "aborted" : why;
    posted_ = false;
    if (cb_.abort) cb_.abort(cb_.user);
  }

 private:
  static constexpr int64_t kTagModulus = int64_t{1} << 30;

  std::string text() const {
    const char* t = cb_.last_error ? cb_.last_error(cb_.user) : nullptr;
    return t && *t ? std::string(t) : std::string("(no message)");
  }
  void throw_if_aborted() const {
    if (!aborted_.empty()) {
      fail(ErrorKind::kComm, "the callback transport was aborted earlier (" + aborted_ + ")",
           "a failed exchange ends the ring; make a new one");
    }
  }
  void post(int32_t send, int peer, void* data, std::size_t bytes, int64_t tag) {
    if (cb_.post(cb_.user, send, peer, data, bytes, tag) != 0) {
      const std::string why = std::string("posting a ") + (send ? "send to" : "receive from") + " rank " +
                              std::to_string(peer) + " at hop " + std::to_string(hop_) + " failed: " + text();
      abort(why);
      fail(ErrorKind::kComm, why, "check the binding's communicator (all ranks in the same group?)");
    }
  }

  ringattn_callbacks cb_;
  double timeout_ms_;
  int64_t next_tag_ = 0;
  int hop_ = -1;
  bool posted_ = false;
  std::string aborted_;
};

}  // namespace
}  // namespace ringattn

using namespace ringattn;

struct ringattn_loopback_s {
  int world = 0;
  int device = -1;
  std::vector<std::unique_ptr<Transport>> transports;  // handed out once each
  std::vector<void*> streams;                          // device rings: one per rank, owned
  ~ringattn_loopback_s() {
#ifdef RINGATTN_HAVE_CUDA
    transports.clear();
    for (void* s : streams) cudaStreamDestroy(static_cast<cudaStream_t>(s));
#endif
  }
};

struct ringattn_ring_s {
  int device = -1;
  std::unique_ptr<RingAttention> ring;
  bool timeline = false;
};

extern "C" {

uint32_t ringattn_api_version(void) { return (uint32_t{RINGATTN_C_API_MAJOR} << 16) | RINGATTN_C_API_MINOR; }

const char* ringattn_status_string(ringattn_status status) {
  switch (status) {
    case RINGATTN_OK: return "ok";
    case RINGATTN_ERR_INVALID_ARGUMENT: return "invalid argument";
    case RINGATTN_ERR_MISMATCH: return "ranks disagree";
    case RINGATTN_ERR_COMM: return "communication failure";
    case RINGATTN_ERR_TIMEOUT: return "timeout";
    case RINGATTN_ERR_CUDA: return "CUDA failure";
    case RINGATTN_ERR_OUT_OF_MEMORY: return "out of memory";
    case RINGATTN_ERR_UNSUPPORTED: return "unsupported";
    case RINGATTN_ERR_ABORTED: return "ring aborted by an earlier failure";
    case RINGATTN_ERR_IO: return "I/O failure";
    case RINGATTN_ERR_INTERNAL: return "internal error";
  }
  return "unknown status";
}

const char* ringattn_last_error(void) { return t_last_error.c_str(); }

ringattn_status ringattn_loopback_create(int32_t world, int32_t device, double timeout_ms, ringattn_loopback* out) {
  return guarded([&] {
    require(out != nullptr, "ringattn_loopback_create: out is NULL");
    *out = nullptr;
    require(world >= 1, "loopback world " + std::to_string(world) + " (hint: at least 1)");
    auto lb = std::make_unique<ringattn_loopback_s>();
    lb->world = world;
    lb->device = device;
    if (device >= 0) {
#ifdef RINGATTN_HAVE_CUDA
      DeviceScope scope(device);
      for (int r = 0; r < world; ++r) {
        cudaStream_t s = nullptr;
        if (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) != cudaSuccess) {
          cudaGetLastError();
          c_fail(RINGATTN_ERR_CUDA, "cudaStreamCreateWithFlags failed for a loopback rank");
        }
        lb->streams.push_back(s);
      }
      lb->transports = make_loopback_transports(world, lb->streams, timeout_ms > 0 ? timeout_ms : kDefaultTimeoutMs);
#else
      c_fail(RINGATTN_ERR_UNSUPPORTED, "a loopback ring on CUDA device " + std::to_string(device) +
                                           " in a ringattn built without CUDA (hint: device -1 for host memory)");
#endif
    } else {
      lb->transports = make_loopback_transports(world, {}, timeout_ms > 0 ? timeout_ms : kDefaultTimeoutMs);
    }
    *out = lb.release();
  });
}

void ringattn_loopback_destroy(ringattn_loopback loopback) {
  guarded([&] { delete loopback; });
}

ringattn_status ringattn_ring_create(const ringattn_spec* spec, const ringattn_transport_desc* transport,
                                     const ringattn_ring_options* options, ringattn_ring* out) {
  return guarded([&] {
    require(out != nullptr, "ringattn_ring_create: out is NULL");
    *out = nullptr;
    const AttentionSpec s = spec_of(spec);
    const ringattn_transport_desc& t = input_struct(transport, "ringattn_transport_desc");
    const ringattn_ring_options& o = input_struct(options, "ringattn_ring_options");
    require(o.device >= -1, "options->device is " + std::to_string(o.device) + " (hint: -1 for the CPU backend)");
#ifndef RINGATTN_HAVE_CUDA
    if (o.device >= 0) {
      c_fail(RINGATTN_ERR_UNSUPPORTED, "CUDA device " + std::to_string(o.device) +
                                           " asked of a ringattn built without CUDA (hint: device -1, the CPU backend)");
    }
#endif
    DeviceScope scope(o.device);
    const double timeout = t.timeout_ms > 0 ? t.timeout_ms : kDefaultTimeoutMs;
    auto r = std::make_unique<ringattn_ring_s>();
    r->device = o.device;
    void* stream = o.stream;
    std::unique_ptr<Backend> backend;
    if (t.kind == RINGATTN_TRANSPORT_LOOPBACK) {
      require(t.loopback != nullptr, "transport->loopback is NULL (hint: ringattn_loopback_create)");
      ringattn_loopback_s& lb = *t.loopback;
      require(t.rank >= 0 && t.rank < lb.world, "transport->rank " + std::to_string(t.rank) +
                                                    " outside the loopback group of " + std::to_string(lb.world));
      require(lb.transports[t.rank] != nullptr, "loopback rank " + std::to_string(t.rank) + " already has a ring");
      require((lb.device >= 0) == (o.device >= 0) && (lb.device < 0 || lb.device == o.device),
              "the loopback group is on device " + std::to_string(lb.device) + ", the ring on " +
                  std::to_string(o.device));
      if (lb.device >= 0) stream = lb.streams[t.rank];
    }
    backend = o.device >= 0 ? make_cuda_backend(stream) : make_cpu_backend();
    std::unique_ptr<Transport> tr;
    switch (t.kind) {
      case RINGATTN_TRANSPORT_LOCAL:
        tr = make_local_transport();
        break;
      case RINGATTN_TRANSPORT_MPI: {
#ifdef RINGATTN_HAVE_MPI
        require(o.device < 0, "the MPI transport moves host memory: use device -1 (the CPU backend)");
        MPI_Comm comm = MPI_Comm_f2c(static_cast<MPI_Fint>(t.mpi_comm));
        tr = make_mpi_transport_borrowed(&comm);
        tr->set_timeout_ms(timeout);
#else
        c_fail(RINGATTN_ERR_UNSUPPORTED, "an MPI transport asked of a ringattn built without MPI");
#endif
        break;
      }
      case RINGATTN_TRANSPORT_NCCL:
#ifdef RINGATTN_HAVE_NCCL
        require(o.device >= 0, "the NCCL transport moves device memory: give options->device");
        require(t.nccl_comm != nullptr, "transport->nccl_comm is NULL");
        tr = make_nccl_transport_borrowed(t.nccl_comm, backend->stream(), timeout);
#else
        c_fail(RINGATTN_ERR_UNSUPPORTED, "an NCCL transport asked of a ringattn built without NCCL");
#endif
        break;
      case RINGATTN_TRANSPORT_LOOPBACK:
        tr = std::move(t.loopback->transports[t.rank]);
        break;
      default:
        c_fail(RINGATTN_ERR_UNSUPPORTED, "transport->kind " + std::to_string(t.kind) + " is not a ringattn_transport_kind");
    }
    RingOptions ro;
    ro.embedded = o.embedded != 0;
    r->ring = std::make_unique<RingAttention>(s, std::move(backend), std::move(tr), ro);
    *out = r.release();
  });
}

ringattn_status ringattn_ring_create_callbacks(const ringattn_spec* spec, const ringattn_callbacks* callbacks,
                                               double timeout_ms, const ringattn_ring_options* options,
                                               ringattn_ring* out) {
  return guarded([&] {
    require(out != nullptr, "ringattn_ring_create_callbacks: out is NULL");
    *out = nullptr;
    const AttentionSpec s = spec_of(spec);
    const ringattn_callbacks& cb = input_struct(callbacks, "ringattn_callbacks");
    const ringattn_ring_options& o = input_struct(options, "ringattn_ring_options");
    require(o.device == -1, "callbacks move host memory: options->device must be -1 (the CPU backend)");
    require(cb.post != nullptr && cb.wait_all != nullptr, "callbacks->post and callbacks->wait_all must be set");
    require(cb.world >= 1 && cb.rank >= 0 && cb.rank < cb.world,
            "callbacks->rank " + std::to_string(cb.rank) + " outside a ring of " + std::to_string(cb.world));
    auto r = std::make_unique<ringattn_ring_s>();
    r->device = -1;
    std::unique_ptr<Transport> tr;
    if (cb.world == 1) {
      tr = make_local_transport();
    } else {
      tr = std::make_unique<CallbackTransport>(cb, timeout_ms > 0 ? timeout_ms : kDefaultTimeoutMs);
    }
    RingOptions ro;
    ro.embedded = o.embedded != 0;
    r->ring = std::make_unique<RingAttention>(s, make_cpu_backend(), std::move(tr), ro);
    *out = r.release();
  });
}

void ringattn_ring_destroy(ringattn_ring ring) {
  guarded([&] {
    if (ring == nullptr) return;
    DeviceScope scope(ring->device);
    delete ring;
  });
}

}  // extern "C"

namespace {

ringattn_ring_s& ring_of(ringattn_ring ring) {
  require(ring != nullptr && ring->ring != nullptr, "ring is NULL");
  return *ring;
}

// A kept failure makes every later call fail with RINGATTN_ERR_ABORTED and the original message.
void throw_kept(RingAttention& ring) {
  if (auto e = ring.poll()) throw CError{RINGATTN_ERR_ABORTED, e->what()};
}

}  // namespace

extern "C" {

ringattn_status ringattn_ring_info(ringattn_ring ring, int32_t* rank, int32_t* world, int64_t* local_seq) {
  return guarded([&] {
    RingAttention& r = *ring_of(ring).ring;
    if (rank) *rank = r.rank();
    if (world) *world = r.world();
    if (local_seq) *local_seq = r.local_seq();
  });
}

ringattn_status ringattn_ring_positions(ringattn_ring ring, int64_t* positions, int64_t count) {
  return guarded([&] {
    RingAttention& r = *ring_of(ring).ring;
    require(positions != nullptr, "positions is NULL");
    require(count == r.local_seq(), "positions holds " + std::to_string(count) + " entries, the ring has " +
                                        std::to_string(r.local_seq()) + " local rows");
    for (int64_t i = 0; i < count; ++i) positions[i] = r.positions().at(i);
  });
}

ringattn_status ringattn_layout_positions(const ringattn_spec* spec, int32_t world, int32_t rank, int64_t* positions,
                                         int64_t count) {
  return guarded([&] {
    AttentionSpec s = spec_of(spec);
    require(world >= 1, "world " + std::to_string(world) + " (hint: at least 1)");
    require(rank >= 0 && rank < world, "rank " + std::to_string(rank) + " outside a ring of " + std::to_string(world));
    s.validate(world);
    require(positions != nullptr, "positions is NULL");
    require(count == s.local_seq(world), "positions holds " + std::to_string(count) + " entries, a rank has " +
                                             std::to_string(s.local_seq(world)) + " local rows");
    const RankLayout ranks = layout_ranks(s, world);
    const ChunkPositions p = ranks.positions(rank);
    for (int64_t i = 0; i < count; ++i) positions[i] = p.at(i);
  });
}

#ifdef RINGATTN_HAVE_MPI
namespace {
bool g_mpi_initialized_here = false;  // ringattn_mpi_world called MPI_Init_thread
}  // namespace
#endif

ringattn_status ringattn_mpi_world(int64_t* comm, int32_t* rank, int32_t* world) {
  return guarded([&] {
#ifdef RINGATTN_HAVE_MPI
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (finalized) c_fail(RINGATTN_ERR_COMM, "MPI is already finalized in this process");
    if (!initialized) {
      int provided = 0;
      if (MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
        c_fail(RINGATTN_ERR_COMM, "MPI_Init_thread failed (hint: launch with mpirun, or check the Open MPI installation)");
      }
      g_mpi_initialized_here = true;
    }
    int r = 0, w = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &r);
    MPI_Comm_size(MPI_COMM_WORLD, &w);
    if (comm) *comm = static_cast<int64_t>(MPI_Comm_c2f(MPI_COMM_WORLD));
    if (rank) *rank = r;
    if (world) *world = w;
#else
    (void)comm;
    (void)rank;
    (void)world;
    c_fail(RINGATTN_ERR_UNSUPPORTED, "ringattn_mpi_world in a ringattn built without MPI");
#endif
  });
}

ringattn_status ringattn_mpi_finalize(void) {
  return guarded([&] {
#ifdef RINGATTN_HAVE_MPI
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (g_mpi_initialized_here && !finalized) MPI_Finalize();
    g_mpi_initialized_here = false;
#endif
  });
}

ringattn_status ringattn_workspace_bytes(ringattn_ring ring, int32_t pass, size_t* bytes) {
  return guarded([&] {
    RingAttention& r = *ring_of(ring).ring;
    require(bytes != nullptr, "bytes is NULL");
    require(pass == RINGATTN_PASS_FORWARD || pass == RINGATTN_PASS_BACKWARD,
            "pass " + std::to_string(pass) + " is not a ringattn_pass");
    *bytes = r.embedded() ? r.workspace_bytes(pass == RINGATTN_PASS_FORWARD ? Pass::kForward : Pass::kBackward) : 0;
  });
}

ringattn_status ringattn_set_timeline(ringattn_ring ring, int32_t on) {
  return guarded([&] { ring_of(ring).timeline = on != 0; });
}

ringattn_status ringattn_forward(ringattn_ring ring, const ringattn_tensor* q, const ringattn_tensor* k,
                                 const ringattn_tensor* v, const ringattn_tensor* out, const ringattn_tensor* lse,
                                 void* workspace, size_t workspace_bytes, void* stream) {
  return guarded([&] {
    ringattn_ring_s& h = ring_of(ring);
    RingAttention& r = *h.ring;
    throw_kept(r);
    const Device dev = r.backend().device();
    const TensorView tq = view_of(q, "q", dev), tk = view_of(k, "k", dev), tv = view_of(v, "v", dev);
    const TensorView to = view_of(out, "out", dev), tl = view_of(lse, "lse", dev);
    DeviceScope scope(h.device);
    if (!r.embedded()) {
      r.forward(tq, tk, tv, to, tl);
      return;
    }
    PassOptions o;
    o.stream = stream;
    o.workspace = workspace;
    o.workspace_bytes = workspace_bytes;
    o.timeline = h.timeline;
    r.forward(tq, tk, tv, to, tl, o);
  });
}

ringattn_status ringattn_backward(ringattn_ring ring, const ringattn_tensor* q, const ringattn_tensor* k,
                                  const ringattn_tensor* v, const ringattn_tensor* out, const ringattn_tensor* lse,
                                  const ringattn_tensor* dout, const ringattn_tensor* dq, const ringattn_tensor* dk,
                                  const ringattn_tensor* dv, void* workspace, size_t workspace_bytes, void* stream) {
  return guarded([&] {
    ringattn_ring_s& h = ring_of(ring);
    RingAttention& r = *h.ring;
    throw_kept(r);
    const Device dev = r.backend().device();
    const TensorView tq = view_of(q, "q", dev), tk = view_of(k, "k", dev), tv = view_of(v, "v", dev);
    const TensorView to = view_of(out, "out", dev), tl = view_of(lse, "lse", dev);
    const TensorView tdo = view_of(dout, "dout", dev), tdq = view_of(dq, "dq", dev);
    const TensorView tdk = view_of(dk, "dk", dev), tdv = view_of(dv, "dv", dev);
    DeviceScope scope(h.device);
    if (!r.embedded()) {
      r.backward(tq, tk, tv, to, tl, tdo, tdq, tdk, tdv);
      return;
    }
    PassOptions o;
    o.stream = stream;
    o.workspace = workspace;
    o.workspace_bytes = workspace_bytes;
    o.timeline = h.timeline;
    r.backward(tq, tk, tv, to, tl, tdo, tdq, tdk, tdv, o);
  });
}

ringattn_status ringattn_poll(ringattn_ring ring) {
  return guarded([&] { throw_kept(*ring_of(ring).ring); });
}

ringattn_status ringattn_last_stats(ringattn_ring ring, double* total_ms, double* compute_ms, double* exposed_comm_ms) {
  return guarded([&] {
    const PassStats& s = ring_of(ring).ring->last_stats();
    if (total_ms) *total_ms = s.total_ms;
    if (compute_ms) *compute_ms = s.compute_ms();
    if (exposed_comm_ms) *exposed_comm_ms = s.exposed_comm_ms();
  });
}

ringattn_status ringattn_reference_forward(const ringattn_spec* spec, const ringattn_tensor* q, const ringattn_tensor* k,
                                           const ringattn_tensor* v, const ringattn_tensor* out,
                                           const ringattn_tensor* lse) {
  return guarded([&] {
    AttentionSpec s = spec_of(spec);
    if (s.kv_heads == 0) s.kv_heads = s.heads;
    s.validate(1);
    const TensorView tq = view_of(q, "q", Device::kHost), tk = view_of(k, "k", Device::kHost);
    const TensorView tv = view_of(v, "v", Device::kHost), to = view_of(out, "out", Device::kHost);
    const TensorView tl = view_of(lse, "lse", Device::kHost);
    const int64_t B = s.batch, S = s.seq_len, H = s.heads, Hkv = s.kv_heads, D = s.head_dim;
    auto is = [](const TensorView& t, std::initializer_list<int64_t> shape) {
      int i = 0;
      if (t.rank != static_cast<int>(shape.size())) return false;
      for (int64_t n : shape) {
        if (t.shape[i++] != n) return false;
      }
      return true;
    };
    require(is(tq, {B, S, H, D}) && is(tk, {B, S, Hkv, D}) && is(tv, {B, S, Hkv, D}),
            "q, k, v must be (batch, seq_len, heads | kv_heads, head_dim)");
    require(is(to, {B, S, H, D}) && to.dtype == DType::kF64 && is(tl, {B, H, S}) && tl.dtype == DType::kF64,
            "out must be fp64 (batch, seq_len, heads, head_dim), lse fp64 (batch, heads, seq_len)");
    const ChunkPositions all = identity_positions(S);
    reference_attention(s, tq, all, tk, tv, all, to, tl);
  });
}

ringattn_status ringattn_reference_backward(const ringattn_spec* spec, const ringattn_tensor* q, const ringattn_tensor* k,
                                            const ringattn_tensor* v, const ringattn_tensor* dout,
                                            const ringattn_tensor* dq, const ringattn_tensor* dk,
                                            const ringattn_tensor* dv) {
  return guarded([&] {
    AttentionSpec s = spec_of(spec);
    if (s.kv_heads == 0) s.kv_heads = s.heads;
    s.validate(1);
    const TensorView tq = view_of(q, "q", Device::kHost), tk = view_of(k, "k", Device::kHost);
    const TensorView tv = view_of(v, "v", Device::kHost), tdo = view_of(dout, "dout", Device::kHost);
    const TensorView tdq = view_of(dq, "dq", Device::kHost), tdk = view_of(dk, "dk", Device::kHost);
    const TensorView tdv = view_of(dv, "dv", Device::kHost);
    const int64_t B = s.batch, S = s.seq_len, H = s.heads, Hkv = s.kv_heads, D = s.head_dim;
    auto is = [](const TensorView& t, std::initializer_list<int64_t> shape) {
      int i = 0;
      if (t.rank != static_cast<int>(shape.size())) return false;
      for (int64_t n : shape) {
        if (t.shape[i++] != n) return false;
      }
      return true;
    };
    require(is(tq, {B, S, H, D}) && is(tk, {B, S, Hkv, D}) && is(tv, {B, S, Hkv, D}) && is(tdo, {B, S, H, D}),
            "q, k, v, dout must be (batch, seq_len, heads | kv_heads, head_dim)");
    require(is(tdq, {B, S, H, D}) && is(tdk, {B, S, Hkv, D}) && is(tdv, {B, S, Hkv, D}) &&
                tdq.dtype == DType::kF64 && tdk.dtype == DType::kF64 && tdv.dtype == DType::kF64,
            "dq, dk, dv must be fp64 like q, k, v");
    reference_attention_backward(s, tq, tk, tv, tdo, tdq, tdk, tdv);
  });
}

}  // extern "C"
