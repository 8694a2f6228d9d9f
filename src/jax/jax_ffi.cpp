// XLA FFI handlers of ringattn.jax on the CPU (libringattn_jax): forward and backward over the C ABI, one cached ring per problem.
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "ringattn/ringattn_c.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The problem attributes every call carries (ringattn.jax passes them; see _ffi_attrs there).
struct Attrs {
  bool causal;
  double scale;
  int64_t has_window, window_left, window_right, stride, global_tokens, mask_heads, layout;
  ffi::Span<const int64_t> doc_offsets;  // num_docs + 1 offsets, or one 0: a single document
  int64_t mpi_comm;                      // MPI_Comm_c2f of the ring's communicator; -1: world 1 in this process
  int64_t world;
};

int32_t dtype_of(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F64: return RINGATTN_DTYPE_F64;
    case ffi::DataType::F32: return RINGATTN_DTYPE_F32;
    case ffi::DataType::BF16: return RINGATTN_DTYPE_BF16;
    case ffi::DataType::F16: return RINGATTN_DTYPE_F16;
    default: return -1;
  }
}

ringattn_tensor tensor_of(void* data, int32_t dtype, ffi::Span<const int64_t> dims) {
  ringattn_tensor t{};
  t.struct_size = sizeof(t);
  t.data = data;
  t.dtype = dtype;
  t.ndim = static_cast<int32_t>(dims.size());
  int64_t step = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    t.shape[i] = dims[i];
    t.stride[i] = step;
    step *= dims[i];
  }
  return t;
}

ffi::Error library_error(ringattn_status s, const char* what) {
  const std::string text = std::string("ringattn (") + ringattn_status_string(s) + ") in " + what + ": " +
                           ringattn_last_error();
  return s == RINGATTN_ERR_INVALID_ARGUMENT ? ffi::Error::InvalidArgument(text) : ffi::Error::Internal(text);
}

// Rings by problem: made on first use (collectively, for MPI rings), kept for the process.
using Key = std::tuple<std::vector<int64_t>, double, int64_t>;
std::mutex g_mutex;
std::map<Key, ringattn_ring> g_rings;

ffi::Error ring_for(ffi::AnyBuffer q, ffi::AnyBuffer k, const Attrs& a, ringattn_ring* out) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4) return ffi::Error::InvalidArgument("ringattn: q, k must be 4-D");
  const int32_t dtype = dtype_of(q.element_type());
  if (dtype < 0) return ffi::Error::InvalidArgument("ringattn: q has a dtype other than f64/f32/bf16/f16");
  ringattn_spec s{};
  s.struct_size = sizeof(s);
  s.batch = qd[0];
  s.seq_len = qd[1] * a.world;
  s.heads = static_cast<int32_t>(qd[2]);
  s.kv_heads = static_cast<int32_t>(kd[2]);
  s.head_dim = static_cast<int32_t>(qd[3]);
  s.dtype = dtype;
  s.layout = static_cast<int32_t>(a.layout);
  s.causal = a.causal ? 1 : 0;
  s.softmax_scale = a.scale;
  s.has_window = static_cast<int32_t>(a.has_window);
  s.window_left = a.window_left;
  s.window_right = a.window_right;
  s.stride = a.stride;
  s.global_tokens = a.global_tokens;
  s.mask_heads = static_cast<int32_t>(a.mask_heads);
  std::vector<int64_t> offsets(a.doc_offsets.begin(), a.doc_offsets.end());
  s.num_docs = offsets.size() > 1 ? static_cast<int64_t>(offsets.size()) - 1 : 0;
  s.doc_offsets = s.num_docs ? offsets.data() : nullptr;

  std::vector<int64_t> key_fields = {s.batch, s.seq_len, s.heads, s.kv_heads, s.head_dim, s.dtype, s.layout,
                                     s.causal, s.has_window, s.window_left, s.window_right, s.stride,
                                     s.global_tokens, s.mask_heads, a.world};
  key_fields.insert(key_fields.end(), offsets.begin(), offsets.end());
  const Key key{key_fields, a.scale, a.mpi_comm};
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_rings.find(key);
  if (it != g_rings.end()) {
    *out = it->second;
    return ffi::Error::Success();
  }
  ringattn_transport_desc t{};
  t.struct_size = sizeof(t);
  t.kind = a.mpi_comm < 0 ? RINGATTN_TRANSPORT_LOCAL : RINGATTN_TRANSPORT_MPI;
  t.mpi_comm = a.mpi_comm < 0 ? 0 : a.mpi_comm;
  ringattn_ring_options o{};
  o.struct_size = sizeof(o);
  o.device = -1;
  ringattn_ring ring = nullptr;
  const ringattn_status st = ringattn_ring_create(&s, &t, &o, &ring);
  if (st != RINGATTN_OK) return library_error(st, "ringattn_ring_create");
  g_rings.emplace(key, ring);
  *out = ring;
  return ffi::Error::Success();
}

// q: (B, S_local, H, D); k, v: (B, S_local, Hkv, D) -> out like q, lse (B, H, S_local) f32 (f64 for f64).
ffi::Error forward(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::Result<ffi::AnyBuffer> out,
                   ffi::Result<ffi::AnyBuffer> lse, Attrs a) {
  ringattn_ring ring = nullptr;
  if (ffi::Error e = ring_for(q, k, a, &ring); e.failure()) return e;
  const int32_t dt = dtype_of(q.element_type());
  const ringattn_tensor tq = tensor_of(q.untyped_data(), dt, q.dimensions());
  const ringattn_tensor tk = tensor_of(k.untyped_data(), dt, k.dimensions());
  const ringattn_tensor tv = tensor_of(v.untyped_data(), dt, v.dimensions());
  const ringattn_tensor to = tensor_of(out->untyped_data(), dt, out->dimensions());
  const ringattn_tensor tl = tensor_of(lse->untyped_data(), dtype_of(lse->element_type()), lse->dimensions());
  std::lock_guard<std::mutex> lock(g_mutex);  // a ring is used by one thread at a time
  const ringattn_status st = ringattn_forward(ring, &tq, &tk, &tv, &to, &tl, nullptr, 0, nullptr);
  return st == RINGATTN_OK ? ffi::Error::Success() : library_error(st, "ringattn_forward");
}

ffi::Error backward(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer out, ffi::AnyBuffer lse,
                    ffi::AnyBuffer dout, ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                    ffi::Result<ffi::AnyBuffer> dv, Attrs a) {
  ringattn_ring ring = nullptr;
  if (ffi::Error e = ring_for(q, k, a, &ring); e.failure()) return e;
  const int32_t dt = dtype_of(q.element_type());
  auto t = [&](void* p, ffi::Span<const int64_t> d) { return tensor_of(p, dt, d); };
  const ringattn_tensor tq = t(q.untyped_data(), q.dimensions()), tk = t(k.untyped_data(), k.dimensions());
  const ringattn_tensor tv = t(v.untyped_data(), v.dimensions()), to = t(out.untyped_data(), out.dimensions());
  const ringattn_tensor tl = tensor_of(lse.untyped_data(), dtype_of(lse.element_type()), lse.dimensions());
  const ringattn_tensor tdo = t(dout.untyped_data(), dout.dimensions());
  const ringattn_tensor tdq = t(dq->untyped_data(), dq->dimensions()), tdk = t(dk->untyped_data(), dk->dimensions());
  const ringattn_tensor tdv = t(dv->untyped_data(), dv->dimensions());
  std::lock_guard<std::mutex> lock(g_mutex);
  const ringattn_status st =
      ringattn_backward(ring, &tq, &tk, &tv, &to, &tl, &tdo, &tdq, &tdk, &tdv, nullptr, 0, nullptr);
  return st == RINGATTN_OK ? ffi::Error::Success() : library_error(st, "ringattn_backward");
}

}  // namespace

#define RINGATTN_JAX_ATTRS(binding)                                                                                \
  binding.Attr<bool>("causal")                                                                                     \
      .Attr<double>("scale")                                                                                       \
      .Attr<int64_t>("has_window")                                                                                 \
      .Attr<int64_t>("window_left")                                                                                \
      .Attr<int64_t>("window_right")                                                                               \
      .Attr<int64_t>("stride")                                                                                     \
      .Attr<int64_t>("global_tokens")                                                                              \
      .Attr<int64_t>("mask_heads")                                                                                 \
      .Attr<int64_t>("layout")                                                                                     \
      .Attr<ffi::Span<const int64_t>>("doc_offsets")                                                               \
      .Attr<int64_t>("mpi_comm")                                                                                   \
      .Attr<int64_t>("world")

namespace {
ffi::Error forward_flat(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::Result<ffi::AnyBuffer> out,
                        ffi::Result<ffi::AnyBuffer> lse, bool causal, double scale, int64_t has_window, int64_t wl,
                        int64_t wr, int64_t stride, int64_t gt, int64_t mh, int64_t layout,
                        ffi::Span<const int64_t> docs, int64_t mpi_comm, int64_t world) {
  return forward(q, k, v, out, lse, Attrs{causal, scale, has_window, wl, wr, stride, gt, mh, layout, docs, mpi_comm, world});
}
ffi::Error backward_flat(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer out, ffi::AnyBuffer lse,
                         ffi::AnyBuffer dout, ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                         ffi::Result<ffi::AnyBuffer> dv, bool causal, double scale, int64_t has_window, int64_t wl,
                         int64_t wr, int64_t stride, int64_t gt, int64_t mh, int64_t layout,
                         ffi::Span<const int64_t> docs, int64_t mpi_comm, int64_t world) {
  return backward(q, k, v, out, lse, dout, dq, dk, dv,
                  Attrs{causal, scale, has_window, wl, wr, stride, gt, mh, layout, docs, mpi_comm, world});
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ringattn_jax_forward_cpu, forward_flat,
                              RINGATTN_JAX_ATTRS(ffi::Ffi::Bind()
                                                     .Arg<ffi::AnyBuffer>()
                                                     .Arg<ffi::AnyBuffer>()
                                                     .Arg<ffi::AnyBuffer>()
                                                     .Ret<ffi::AnyBuffer>()
                                                     .Ret<ffi::AnyBuffer>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ringattn_jax_backward_cpu, backward_flat,
                              RINGATTN_JAX_ATTRS(ffi::Ffi::Bind()
                                                     .Arg<ffi::AnyBuffer>()
                                                     .Arg<ffi::AnyBuffer>()
                                                     .Arg<ffi::AnyBuffer>()
                                                     .Arg<ffi::AnyBuffer>()
                                                     .Arg<ffi::AnyBuffer>()
                                                     .Arg<ffi::AnyBuffer>()
                                                     .Ret<ffi::AnyBuffer>()
                                                     .Ret<ffi::AnyBuffer>()
                                                     .Ret<ffi::AnyBuffer>()));
