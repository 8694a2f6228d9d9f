/* ringattn_c.h: the C ABI of ringattn (C99): opaque rings, fixed status codes and enums, versioned structs, no exceptions. */
#ifndef RINGATTN_C_H
#define RINGATTN_C_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define RINGATTN_C_EXPORT
#else
#define RINGATTN_C_EXPORT __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Functions and enum values are only ever added. A binding checks
 * ringattn_api_version() >> 16 == RINGATTN_C_API_MAJOR before it calls anything else. */
#define RINGATTN_C_API_MAJOR 1
#define RINGATTN_C_API_MINOR 1

/* Status of every call; values fixed forever. The message of the last failure on the calling
 * thread (with rank, host and device) is ringattn_last_error(). */
typedef enum ringattn_status {
  RINGATTN_OK = 0,
  RINGATTN_ERR_INVALID_ARGUMENT = 1, /* a null, mis-shaped or wrongly typed argument, a too small struct_size */
  RINGATTN_ERR_MISMATCH = 2,         /* ranks disagree on the problem */
  RINGATTN_ERR_COMM = 3,             /* MPI / NCCL failure, timeout or abort (the message says which) */
  RINGATTN_ERR_TIMEOUT = 4,          /* reserved: timeouts are reported as RINGATTN_ERR_COMM today */
  RINGATTN_ERR_CUDA = 5,             /* CUDA runtime failure */
  RINGATTN_ERR_OUT_OF_MEMORY = 6,    /* host allocation failed */
  RINGATTN_ERR_UNSUPPORTED = 7,      /* a backend, transport or dtype this build does not have */
  RINGATTN_ERR_ABORTED = 8,          /* the ring failed in an earlier pass (its error is kept) */
  RINGATTN_ERR_IO = 9,
  RINGATTN_ERR_INTERNAL = 10         /* a bug in ringattn */
} ringattn_status;

typedef enum ringattn_dtype {
  RINGATTN_DTYPE_F64 = 0,
  RINGATTN_DTYPE_F32 = 1,
  RINGATTN_DTYPE_BF16 = 2,
  RINGATTN_DTYPE_F16 = 3
} ringattn_dtype;

/* How the global sequence is split over the ring (see ringattn_ring_positions). */
typedef enum ringattn_layout {
  RINGATTN_LAYOUT_CONTIGUOUS = 0,
  RINGATTN_LAYOUT_ZIGZAG = 1,
  RINGATTN_LAYOUT_STRIPED = 2,
  RINGATTN_LAYOUT_AUTO = 3,
  RINGATTN_LAYOUT_BALANCED = 4
} ringattn_layout;

typedef enum ringattn_pass { RINGATTN_PASS_FORWARD = 0, RINGATTN_PASS_BACKWARD = 1 } ringattn_pass;

typedef enum ringattn_transport_kind {
  RINGATTN_TRANSPORT_LOCAL = 0,    /* one process, world 1 */
  RINGATTN_TRANSPORT_MPI = 1,      /* host memory over a borrowed MPI communicator (CPU backend) */
  RINGATTN_TRANSPORT_NCCL = 2,     /* device memory over a borrowed NCCL communicator (CUDA backend) */
  RINGATTN_TRANSPORT_LOOPBACK = 3  /* p ranks of one process, one thread each (tests; a p-rank ring on one GPU) */
} ringattn_transport_kind;

/* A contiguous row-major tensor; strides count elements. Every fixed-width integer field holds
 * the value of the enum it names. */
typedef struct ringattn_tensor {
  size_t struct_size; /* sizeof(ringattn_tensor) */
  void* data;         /* host memory (CPU backend) or device memory of the ring's device (CUDA) */
  int32_t dtype;      /* ringattn_dtype */
  int32_t ndim;       /* 4: (batch, seq, heads, head_dim) for q, k, v, out, dout, dq, dk, dv; 3: (batch, heads, seq) for lse */
  int64_t shape[4];
  int64_t stride[4];
} ringattn_tensor;

/* The attention problem; every ring of a job passes the same one. */
typedef struct ringattn_spec {
  size_t struct_size;   /* sizeof(ringattn_spec) */
  int64_t batch;
  int64_t seq_len;      /* global: all ranks together */
  int32_t heads;        /* query heads */
  int32_t kv_heads;     /* key/value heads dividing heads (GQA/MQA); 0: = heads */
  int32_t head_dim;
  int32_t dtype;        /* ringattn_dtype of q, k, v, out, dout, dq, dk, dv; lse is fp32 (fp64 for fp64) */
  int32_t layout;       /* ringattn_layout */
  int32_t causal;       /* 1: key j visible to query i only when j <= i */
  double softmax_scale; /* 0: 1/sqrt(head_dim) */
  /* Patterns (a patterned head sees a key when one given pattern holds, within causal and documents): */
  int32_t has_window;   /* 1: i - window_left <= j <= i + window_right */
  int32_t mask_heads;   /* K > 0: the patterns apply to query heads 0..K-1 only; 0: to every head */
  int64_t window_left;  /* -1: unbounded */
  int64_t window_right; /* -1: unbounded */
  int64_t stride;       /* > 0: (i - j) mod stride == 0 */
  int64_t global_tokens;/* > 0: i or j among the first global_tokens positions of its document */
  /* Documents (packed sequences): num_docs + 1 increasing host offsets from 0 to seq_len
   * (cu_seqlens), copied at ring creation; num_docs 0: one document. */
  int64_t num_docs;
  const int64_t* doc_offsets;
} ringattn_spec;

typedef struct ringattn_loopback_s* ringattn_loopback;

/* Where the ring's exchanges go. Borrowed communicators are never finalized or destroyed. */
typedef struct ringattn_transport_desc {
  size_t struct_size;          /* sizeof(ringattn_transport_desc) */
  int32_t kind;                /* ringattn_transport_kind */
  int32_t rank;                /* LOOPBACK: this ring's rank in the group */
  void* nccl_comm;             /* NCCL: the host program's ncclComm_t (aborted, not destroyed, on a failure) */
  int64_t mpi_comm;            /* MPI: MPI_Comm_c2f() of the host program's communicator (duplicated inside) */
  ringattn_loopback loopback;  /* LOOPBACK: from ringattn_loopback_create */
  double timeout_ms;           /* per-hop timeout; 0: 300 s */
} ringattn_transport_desc;

typedef struct ringattn_ring_options {
  size_t struct_size; /* sizeof(ringattn_ring_options) */
  int32_t device;     /* -1: CPU backend; >= 0: CUDA backend on this device */
  int32_t embedded;   /* 1: embedded passes (below); 0: blocking passes, as the ringattn CLI runs them */
  void* stream;       /* blocking CUDA rings: their compute stream (NULL: one of their own); embedded: unused */
} ringattn_ring_options;

/* One ring: one problem shape on one transport; its plan and buffers are made once, so a binding
 * keeps one ring per shape. Used by one thread at a time. */
typedef struct ringattn_ring_s* ringattn_ring;

RINGATTN_C_EXPORT uint32_t ringattn_api_version(void); /* (major << 16) | minor of the loaded library */
RINGATTN_C_EXPORT const char* ringattn_status_string(ringattn_status status);
RINGATTN_C_EXPORT const char* ringattn_last_error(void); /* thread-local; "" after a successful call */

/* p loopback ranks; device -1: host memory (CPU rings), else rings on that one GPU (each rank gets
 * its own stream). Destroy it after its rings. */
RINGATTN_C_EXPORT ringattn_status ringattn_loopback_create(int32_t world, int32_t device, double timeout_ms,
                                                           ringattn_loopback* out);
RINGATTN_C_EXPORT void ringattn_loopback_destroy(ringattn_loopback loopback);

RINGATTN_C_EXPORT ringattn_status ringattn_ring_create(const ringattn_spec* spec, const ringattn_transport_desc* transport,
                                                       const ringattn_ring_options* options, ringattn_ring* out);
RINGATTN_C_EXPORT void ringattn_ring_destroy(ringattn_ring ring);
RINGATTN_C_EXPORT ringattn_status ringattn_ring_info(ringattn_ring ring, int32_t* rank, int32_t* world,
                                                     int64_t* local_seq);
/* The global positions of this rank's local_seq rows, in local row order (how to shard). */
RINGATTN_C_EXPORT ringattn_status ringattn_ring_positions(ringattn_ring ring, int64_t* positions, int64_t count);

/* Since 1.1. The global positions of rank `rank`'s rows on a ring of `world` ranks for `spec`, in
 * local row order, as ringattn_ring_positions would give them (auto resolved, balanced blocks
 * assigned): a pure function of (spec, world, rank), no ring and no communication (how a binding
 * shards a global tensor). count must be spec->seq_len / world. */
RINGATTN_C_EXPORT ringattn_status ringattn_layout_positions(const ringattn_spec* spec, int32_t world, int32_t rank,
                                                            int64_t* positions, int64_t count);

/* Since 1.1. Host callbacks that carry a CPU ring's exchanges over a binding's own communication
 * (torch.distributed over gloo, for one). They are called on the thread that runs the pass (the one
 * in ringattn_forward, ringattn_backward or ringattn_ring_create_callbacks) and must not throw. */
typedef struct ringattn_callbacks {
  size_t struct_size; /* sizeof(ringattn_callbacks) */
  void* user;         /* passed back to every callback */
  int32_t rank;       /* this process's rank in the ring */
  int32_t world;      /* ranks in the ring */
  /* Posts a non-blocking send (send = 1) of `bytes` at `data` to `peer`, or a receive (send = 0) of
   * `bytes` from `peer` into `data`. Every rank posts the same tags in the same order, so a send
   * and its receive carry the same tag (0 <= tag < 2^30). Returns 0, or nonzero on a failure. */
  int32_t (*post)(void* user, int32_t send, int32_t peer, void* data, size_t bytes, int64_t tag);
  /* Completes everything posted so far within timeout_ms; 0, or nonzero on a failure or timeout. */
  int32_t (*wait_all)(void* user, double timeout_ms);
  /* Drops whatever is still posted after a failure; may be NULL. */
  void (*abort)(void* user);
  /* The text of the last failure (copied at once); may be NULL. */
  const char* (*last_error)(void* user);
} ringattn_callbacks;

/* Since 1.1. A CPU ring (options->device -1) over `callbacks`; timeout_ms per hop (0: 300 s). */
RINGATTN_C_EXPORT ringattn_status ringattn_ring_create_callbacks(const ringattn_spec* spec,
                                                                 const ringattn_callbacks* callbacks, double timeout_ms,
                                                                 const ringattn_ring_options* options,
                                                                 ringattn_ring* out);

/* Since 1.1. MPI for bindings without an MPI package of their own (mpi4py): initializes MPI
 * (MPI_THREAD_FUNNELED) when nobody has, and gives MPI_Comm_c2f(MPI_COMM_WORLD) for
 * ringattn_transport_desc.mpi_comm with this process's rank and the world size (each may be NULL).
 * RINGATTN_ERR_UNSUPPORTED in a build without MPI. */
RINGATTN_C_EXPORT ringattn_status ringattn_mpi_world(int64_t* comm, int32_t* rank, int32_t* world);
/* Since 1.1. Finalizes MPI when ringattn_mpi_world initialized it (call after the last ring is
 * destroyed); otherwise does nothing. */
RINGATTN_C_EXPORT ringattn_status ringattn_mpi_finalize(void);

/* Embedded passes: bytes of workspace a pass needs (0 is possible); the same for every call. */
RINGATTN_C_EXPORT ringattn_status ringattn_workspace_bytes(ringattn_ring ring, int32_t pass, size_t* bytes);
/* Embedded: per-hop times for ringattn_last_stats (the calls then wait for their pass); default off. */
RINGATTN_C_EXPORT ringattn_status ringattn_set_timeline(ringattn_ring ring, int32_t on);

/* Forward: q (B, S_local, H, D); k, v (B, S_local, Hkv, D); writes out like q and lse (B, H, S_local).
 * Blocking rings return when the pass is done (workspace and stream unused). Embedded rings enqueue
 * the pass on `stream` (a cudaStream_t of the ring's device, NULL the default stream; ignored on
 * the CPU) after the work already there, join every internal stream back into it, and return:
 * inputs, outputs and `workspace` (ringattn_workspace_bytes bytes, 256-byte aligned, in the
 * backend's memory) are in use until the stream reaches that point. Nothing is allocated and the
 * host never waits for the device inside an embedded call. A pass that fails writes NaN into its
 * outputs (on the stream), and its error is kept: ringattn_poll and every later call return it. */
RINGATTN_C_EXPORT ringattn_status ringattn_forward(ringattn_ring ring, const ringattn_tensor* q, const ringattn_tensor* k,
                                                   const ringattn_tensor* v, const ringattn_tensor* out,
                                                   const ringattn_tensor* lse, void* workspace, size_t workspace_bytes,
                                                   void* stream);
/* Backward: out and lse from the forward, dout like out; writes dq like q, dk and dv like k and v. */
RINGATTN_C_EXPORT ringattn_status ringattn_backward(ringattn_ring ring, const ringattn_tensor* q,
                                                    const ringattn_tensor* k, const ringattn_tensor* v,
                                                    const ringattn_tensor* out, const ringattn_tensor* lse,
                                                    const ringattn_tensor* dout, const ringattn_tensor* dq,
                                                    const ringattn_tensor* dk, const ringattn_tensor* dv,
                                                    void* workspace, size_t workspace_bytes, void* stream);
/* RINGATTN_OK, or the kept failure of the ring (a watchdog's or a pass guard's); never blocks. */
RINGATTN_C_EXPORT ringattn_status ringattn_poll(ringattn_ring ring);
/* The last pass's times in ms (0 without a timeline): first to last mark, compute, exposed communication. */
RINGATTN_C_EXPORT ringattn_status ringattn_last_stats(ringattn_ring ring, double* total_ms, double* compute_ms,
                                                      double* exposed_comm_ms);

/* The naive fp64 reference over the whole sequence, on the host (tests of bindings): q, k, v of any
 * dtype (B, seq_len, H|Hkv, D); out fp64 like q, lse fp64 (B, H, seq_len); dq, dk, dv fp64. */
RINGATTN_C_EXPORT ringattn_status ringattn_reference_forward(const ringattn_spec* spec, const ringattn_tensor* q,
                                                             const ringattn_tensor* k, const ringattn_tensor* v,
                                                             const ringattn_tensor* out, const ringattn_tensor* lse);
RINGATTN_C_EXPORT ringattn_status ringattn_reference_backward(const ringattn_spec* spec, const ringattn_tensor* q,
                                                              const ringattn_tensor* k, const ringattn_tensor* v,
                                                              const ringattn_tensor* dout, const ringattn_tensor* dq,
                                                              const ringattn_tensor* dk, const ringattn_tensor* dv);

#ifdef __cplusplus
}
#endif

#endif /* RINGATTN_C_H */
