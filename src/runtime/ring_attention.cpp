// The ring schedule: K/V chunks rotate over the transport while the backend folds each into fp32 state.
#include "ringattn/ring_attention.hpp"

#include <cstdlib>
#include <algorithm>
#include <cstring>

#include "plan/plan.hpp"
#include "ringattn/error.hpp"
#include "runtime/pass_guard.hpp"

namespace ringattn {
namespace {

// RINGATTN_RING_POST=early posts each exchange before the hop's compute is enqueued (the
// pre-fence schedule, for timing comparisons); unset or "after": fence, enqueue, then post.
constexpr const char* kRingPostEnv = "RINGATTN_RING_POST";

bool post_early_from_env() {
  const char* v = std::getenv(kRingPostEnv);
  return v != nullptr && std::strcmp(v, "early") == 0;
}

// RINGATTN_RING_FOLD=compute folds each dK/dV share into the partial on the compute stream, between
// two steps (for timing comparisons); unset or "beside": on the exchange stream, beside the next step.
constexpr const char* kRingFoldEnv = "RINGATTN_RING_FOLD";

bool fold_beside_from_env() {
  const char* v = std::getenv(kRingFoldEnv);
  return v == nullptr || std::strcmp(v, "compute") != 0;
}

// Source rank of the chunk visiting `rank` at step `step`: after k hops rank r holds chunk (r-k) mod p.
int source_of(int rank, int step, int world) { return ((rank - step) % world + world) % world; }

DType accumulator_dtype(DType dtype) { return dtype == DType::kF64 ? DType::kF64 : DType::kF32; }

TensorView chunk_view(void* base, std::size_t offset_bytes, DType dtype, Device device, int64_t b, int64_t s,
                      int64_t h, int64_t d) {
  return make_view(static_cast<char*>(base) + offset_bytes, dtype, device, {b, s, h, d});
}

// The neighbour ring's bytes of one hop: as many sent to rank+1 as received from rank-1.
void record_ring_bytes(HopStats& h, int rank, int world, std::size_t kv, std::size_t grad) {
  h.sent_bytes = h.received_bytes = kv;
  h.grad_sent_bytes = h.grad_received_bytes = grad;
  const int next = (rank + 1) % world, prev = (rank + world - 1) % world;
  if (next == prev) {
    h.peers.push_back({next, kv + grad, kv + grad});
  } else {
    h.peers.push_back({next, kv + grad, 0});
    h.peers.push_back({prev, 0, kv + grad});
  }
}

// Adds the pieces of rows `ranges` of a (B, S, row_elems) tensor at `base` to `out`: batch row
// by batch row, the ranges in order (the arrival order of a direct hop's rows).
void add_row_pieces(std::vector<PeerPiece>& out, const void* base, int64_t B, int64_t S, std::size_t row_bytes,
                    const std::vector<RowRange>& ranges) {
  for (int64_t b = 0; b < B; ++b) {
    for (const RowRange& rr : ranges) {
      out.push_back({static_cast<char*>(const_cast<void*>(base)) + (b * S + rr.lo) * row_bytes,
                     static_cast<std::size_t>(rr.size()) * row_bytes});
    }
  }
}

// A direct hop's bytes: per peer everything, sent/received_bytes K+V only (the dK/dV apart).
void record_peer_bytes(HopStats& st, const PeerExchange& ex, std::size_t grad_sent, std::size_t grad_received) {
  auto entry = [&](int peer) -> PeerBytes& {  // one entry per peer
    for (PeerBytes& p : st.peers) {
      if (p.rank == peer) return p;
    }
    return st.peers.emplace_back(PeerBytes{peer, 0, 0});
  };
  for (const PeerMessage& m : ex.sends) {
    st.sent_bytes += m.bytes();
    entry(m.peer).sent_bytes += m.bytes();
  }
  for (const PeerMessage& m : ex.recvs) {
    st.received_bytes += m.bytes();
    entry(m.peer).received_bytes += m.bytes();
  }
  st.grad_sent_bytes = grad_sent;
  st.grad_received_bytes = grad_received;
  st.sent_bytes -= grad_sent;
  st.received_bytes -= grad_received;
}

// The matching receive side: the same piece sizes, laid out one after another from `base`.
void add_packed_pieces(std::vector<PeerPiece>& out, void* base, int64_t B, std::size_t row_bytes,
                       const std::vector<RowRange>& ranges) {
  std::size_t offset = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (const RowRange& rr : ranges) {
      const std::size_t n = static_cast<std::size_t>(rr.size()) * row_bytes;
      out.push_back({static_cast<char*>(base) + offset, n});
      offset += n;
    }
  }
}

}  // namespace

double PassStats::compute_ms() const {
  double t = 0.0;
  for (const auto& h : hops) t += h.compute_ms;
  return t;
}

double PassStats::exposed_comm_ms() const {
  double t = 0.0;
  for (const auto& h : hops) t += h.exposed_comm_ms;
  return t;
}

RingAttention::RingAttention(const AttentionSpec& spec, std::unique_ptr<Backend> backend,
                             std::unique_ptr<Transport> transport)
    : RingAttention(spec, std::move(backend), std::move(transport), RingOptions{}) {}

RingAttention::RingAttention(const AttentionSpec& spec, std::unique_ptr<Backend> backend,
                             std::unique_ptr<Transport> transport, const RingOptions& options)
    : spec_(spec), backend_(std::move(backend)), transport_(std::move(transport)) {
  RINGATTN_CHECK(backend_ && transport_, ErrorKind::kInternal, "RingAttention needs a backend and a transport", "");
  if (options.embedded) enable_embedded();
  if (spec_.kv_heads == 0) spec_.kv_heads = spec_.heads;
  spec_.validate(transport_->world());
  local_seq_ = spec_.local_seq(transport_->world());
  mask_ = spec_.mask.view();
  layout_ = spec_.resolved_layout(transport_->world());
  // Device rings keep the tuned neighbour ring (copy engines, folds beside the compute) for dense and
  // causal masks, whose ring efficiency was measured at 95-99%; direct plans there come with the
  // masked kernels. Host rings and masked problems take the plan's choice.
  const bool masked = spec_.mask.has_pattern() || spec_.mask.has_documents();
  const bool forced = std::getenv("RINGATTN_PLAN_ROUTE") != nullptr;  // timing and tests: the plan's override
  const bool peers =
      transport_->supports_peer_exchange() && (backend_->device() == Device::kHost || masked || forced);
  plan_ = std::make_unique<RingPlan>(plan_ring(spec_, transport_->world(), peers));
  q_pos_ = plan_->ranks.positions(transport_->rank());
  backend_->prepare(spec_, local_seq_, local_seq_);
  if (plan_->route == Route::kDirect) {
    const int r = transport_->rank();
    const std::vector<PlanStep> steps = plan_steps(*plan_, r);
    for (std::size_t i = 1; i < steps.size(); ++i) {
      DirectHop h;
      h.hop = steps[i].hop;
      const int reader = plan_->reader_at(r, h.hop);
      h.recv_rows = steps[i].num_rows();
      h.send_rows = plan_->rows(plan_->needed[reader][r]);
      h.owner = steps[i].owner;
      h.reader = h.send_rows > 0 ? reader : -1;
      h.recv_segments = steps[i].positions;
      direct_.push_back(std::move(h));
    }
  }
  const std::size_t kv_elems =
      static_cast<std::size_t>(spec_.batch * local_seq_ * spec_.effective_kv_heads() * spec_.head_dim);
  kv_bytes_ = 2 * kv_elems * dtype_size(spec_.dtype);
  grad_bytes_ = 2 * kv_elems * dtype_size(accumulator_dtype(spec_.dtype));
  post_early_ = post_early_from_env();
  fold_beside_ = fold_beside_from_env();
}

RingAttention::~RingAttention() {
  // The transport's watchdog may outlive the guard whose failure word it sets.
  if (transport_ && guard_) transport_->set_failure_flag(nullptr);
}

void RingAttention::read_timeline(const std::vector<HopMarks>& marks, int start_mark, int end_mark) {
  const std::vector<double> t = backend_->synchronize_and_read_marks();
  for (std::size_t s = 0; s < marks.size(); ++s) {
    stats_.hops[s].compute_ms = t[marks[s].computed] - t[marks[s].begin];
    stats_.hops[s].exposed_comm_ms = t[marks[s].arrived] - t[marks[s].computed];
  }
  stats_.total_ms = t[end_mark] - t[start_mark];
}

int RingAttention::rank() const { return transport_->rank(); }
int RingAttention::world() const { return transport_->world(); }

void RingAttention::check_inputs(const TensorView& t, int heads, const char* what) const {
  const bool ok = t.rank == 4 && t.shape[0] == spec_.batch && t.shape[1] == local_seq_ && t.shape[2] == heads &&
                  t.shape[3] == spec_.head_dim && t.dtype == spec_.dtype && t.device == backend_->device() &&
                  t.is_contiguous();
  RINGATTN_CHECK(ok, ErrorKind::kInvalidArgument,
                 std::string(what) + " is " + t.describe() + (t.is_contiguous() ? "" : " (not contiguous)") +
                     ", expected contiguous " + dtype_name(spec_.dtype) + "[" + std::to_string(spec_.batch) + ", " +
                     std::to_string(local_seq_) + ", " + std::to_string(heads) + ", " +
                     std::to_string(spec_.head_dim) + "] on " +
                     (backend_->device() == Device::kHost ? "host" : "cuda"),
                 "pass each rank's chunk of seq_len / ranks tokens in the (batch, seq, heads, head_dim) layout");
}

void RingAttention::forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                            const TensorView& lse) {
  check_inputs(q, spec_.heads, "q");
  check_inputs(k, spec_.effective_kv_heads(), "k");
  check_inputs(v, spec_.effective_kv_heads(), "v");
  check_inputs(out, spec_.heads, "out");
  if (plan_->route == Route::kDirect) {
    forward_direct(q, k, v, out, lse);
    return;
  }
  const int p = world(), r = rank();
  const int64_t B = spec_.batch, S = local_seq_, Hkv = spec_.effective_kv_heads(), D = spec_.head_dim;
  const Device dev = backend_->device();
  if (!buffers_[1] && p > 1) {
    // Hop 0 computes on the caller's K/V; buffer 1 receives hop 0, buffer 0 only hop 1 onwards.
    buffers_[0] = p > 2 ? backend_->allocate(kv_bytes_) : nullptr;
    buffers_[1] = p > 1 ? backend_->allocate(kv_bytes_) : nullptr;
  }
  backend_->reset_marks();
  const int start_mark = backend_->mark();
  backend_->forward_begin(q, q_pos_);

  std::vector<HopMarks> marks(p);
  stats_ = PassStats{};
  stats_.hops.resize(p);
  // Hop 0 sends the caller's K and V as the two parts of one message and computes on them in
  // place: no copy into the travelling buffers. Later hops forward buffer (s % 2) whole.
  // On an asynchronous backend the exchange is fenced before the compute is enqueued and posted
  // after it, so the host's posting latency overlaps GPU work; a synchronous backend posts first.
  const bool post_after_launch = backend_->stream() != nullptr && !post_early_;
  const SendPart own_kv[2] = {{k.data, kv_bytes_ / 2}, {v.data, kv_bytes_ / 2}};
  bool finished = false;  // forward_step_into ended the pass
  for (int s = 0; s < p; ++s) {
    void* cur = buffers_[s % 2];
    const bool exchange = s + 1 < p;
    auto post = [&] {
      if (s == 0) {
        transport_->start_exchange_parts(own_kv, 2, buffers_[1], s);
      } else {
        transport_->start_exchange(cur, buffers_[(s + 1) % 2], kv_bytes_, s);
      }
    };
    if (exchange && post_after_launch) {
      transport_->fence(s);
    } else if (exchange) {
      post();
    }
    const int src = source_of(r, s, p);
    const ChunkPositions k_pos = plan_->ranks.positions(src);
    const bool skip = classify_chunks(mask_, spec_.heads, q_pos_, k_pos) == Visibility::kEmpty;
    marks[s].begin = backend_->mark();
    if (!skip && p == 1) {  // one rank: the only step writes out and lse itself
      backend_->forward_step_into(k, v, k_pos, out, lse);
      finished = true;
    } else if (!skip) {
      backend_->forward_step(s == 0 ? k : chunk_view(cur, 0, spec_.dtype, dev, B, S, Hkv, D),
                             s == 0 ? v : chunk_view(cur, kv_bytes_ / 2, spec_.dtype, dev, B, S, Hkv, D), k_pos);
    }
    marks[s].computed = backend_->mark();
    if (exchange && post_after_launch) post();
    if (exchange) transport_->wait(s);
    marks[s].arrived = backend_->mark();
    stats_.hops[s].hop = s;
    stats_.hops[s].source_rank = src;
    stats_.hops[s].skipped = skip;
    if (exchange) record_ring_bytes(stats_.hops[s], r, p, kv_bytes_, 0);
    if (hop_cb_) hop_cb_(s, p, hop_user_);
  }
  stats_.visible_pairs = plan_->visible_pairs[r];
  if (!finished) backend_->forward_end(out, lse);
  const int end_mark = backend_->mark();
  finish_pass(marks, start_mark, end_mark);
}

void RingAttention::backward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                             const TensorView& lse, const TensorView& dout, const TensorView& dq,
                             const TensorView& dk, const TensorView& dv) {
  check_inputs(q, spec_.heads, "q");
  check_inputs(k, spec_.effective_kv_heads(), "k");
  check_inputs(v, spec_.effective_kv_heads(), "v");
  check_inputs(out, spec_.heads, "out");
  check_inputs(dout, spec_.heads, "dout");
  check_inputs(dq, spec_.heads, "dq");
  check_inputs(dk, spec_.effective_kv_heads(), "dk");
  check_inputs(dv, spec_.effective_kv_heads(), "dv");
  if (plan_->route == Route::kDirect) {
    backward_direct(q, k, v, out, lse, dout, dq, dk, dv);
    return;
  }
  const int p = world(), r = rank();
  const int64_t B = spec_.batch, S = local_seq_, Hkv = spec_.effective_kv_heads(), D = spec_.head_dim;
  const Device dev = backend_->device();
  const DType acc_dtype = accumulator_dtype(spec_.dtype);
  // Message layout per hop: [K | V | dK partial | dV partial]; the gradient part belongs to the
  // chunk this rank processed one step earlier, so it travels one hop behind its K/V.
  // One rank needs none of these: its only step writes the rounded gradients straight into dk, dv.
  const std::size_t msg_bytes = kv_bytes_ + grad_bytes_;
  if (!grad_buffers_[0] && p > 1) {
    grad_buffers_[0] = backend_->allocate(msg_bytes);
    grad_buffers_[1] = backend_->allocate(msg_bytes);
    local_grad_[1] = backend_->allocate(grad_bytes_);
    local_grad_[0] = p > 2 ? backend_->allocate(grad_bytes_) : local_grad_[1];
  }
  auto kview = [&](void* base) { return chunk_view(base, 0, spec_.dtype, dev, B, S, Hkv, D); };
  auto vview = [&](void* base) { return chunk_view(base, kv_bytes_ / 2, spec_.dtype, dev, B, S, Hkv, D); };
  auto gview = [&](void* base, std::size_t offset) {
    return make_view(static_cast<char*>(base) + offset, acc_dtype, dev, {2, B, S, Hkv * D});
  };
  auto dk_of = [&](void* base, std::size_t offset) { return chunk_view(base, offset, acc_dtype, dev, B, S, Hkv, D); };
  auto dv_of = [&](void* base, std::size_t offset) {
    return chunk_view(base, offset + grad_bytes_ / 2, acc_dtype, dev, B, S, Hkv, D);
  };

  backend_->reset_marks();
  const int start_mark = backend_->mark();
  backend_->backward_begin(q, out, dout, lse, q_pos_);
  const bool post_after_launch = backend_->stream() != nullptr && !post_early_;  // as in forward()
  const SendPart own_kv[2] = {{k.data, kv_bytes_ / 2}, {v.data, kv_bytes_ / 2}};

  // Hops 0..p-1 compute; hop p (p > 1) is the home hop, reported with its own compute (the last
  // sum and rounding, and dQ's finalize beside the transfer) and exposed time.
  std::vector<HopMarks> marks(p + (p > 1 ? 1 : 0));
  stats_ = PassStats{};
  stats_.hops.resize(marks.size());
  // This rank's dK/dV share of step s's chunk is stored (not added: no zeroing pass) at step 0 (the
  // own chunk, whose partial starts here and leaves at hop 1) straight into the gradient part of hop
  // 1's message; at a later step s into local_grad_[s % 2]. Hop s+1's prologue folds it into the
  // partial that arrived one hop behind its K/V on the exchange stream, beside step s+1's compute, so
  // no pass over the partials sits between two steps. After a skipped step there is no share
  // (`shared` false): the partial passes on as it arrived. One rank (p = 1) has no partial at all:
  // its step rounds dK, dV into the caller's tensors.
  bool shared = false;
  for (int s = 0; s < p; ++s) {
    void* cur = p > 1 ? grad_buffers_[s % 2] : nullptr;
    void* nxt = p > 1 ? grad_buffers_[(s + 1) % 2] : nullptr;
    const bool send_kv = s + 1 < p, send_grad = s >= 1, exchange = send_kv || send_grad;
    ExchangePrologue before;
    if (s >= 2 && shared) {
      void* prev_share = local_grad_[(s - 1) % 2];
      if (fold_beside_) {
        before = [&, prev_share](void* stream) {
          backend_->fold_on(gview(cur, kv_bytes_), gview(prev_share, 0), stream);
        };
      } else {
        backend_->fold_on(gview(cur, kv_bytes_), gview(prev_share, 0), nullptr);
      }
    }
    auto post = [&] {
      if (s == 0) {  // hop 0: the caller's K and V, sent in place
        transport_->start_exchange_parts(own_kv, 2, nxt, s, before);
      } else {
        const std::size_t offset = send_kv ? 0 : kv_bytes_;
        const std::size_t bytes = (send_kv ? kv_bytes_ : 0) + (send_grad ? grad_bytes_ : 0);
        transport_->start_exchange(static_cast<char*>(cur) + offset, static_cast<char*>(nxt) + offset, bytes, s,
                                   before);
      }
    };
    if (exchange && post_after_launch) {
      transport_->fence(s);
    } else if (exchange) {
      post();
    }
    const int src = source_of(r, s, p);
    const ChunkPositions k_pos = plan_->ranks.positions(src);
    const bool skip = classify_chunks(mask_, spec_.heads, q_pos_, k_pos) == Visibility::kEmpty;
    marks[s].begin = backend_->mark();
    shared = !skip;
    if (p == 1) {
      if (skip) {
        backend_->zero(dk);
        backend_->zero(dv);
      } else {
        backend_->backward_step_into(k, v, k_pos, dk, dv);
      }
    } else {
      void* share = s == 0 ? static_cast<char*>(grad_buffers_[1]) + kv_bytes_ : local_grad_[s % 2];
      if (!skip) {
        backend_->backward_step_into(s == 0 ? k : kview(cur), s == 0 ? v : vview(cur), k_pos, dk_of(share, 0),
                                     dv_of(share, 0));
      } else if (s == 0) {
        backend_->zero(gview(share, 0));  // hop 1 sends the own chunk's share in any case
      }
    }
    marks[s].computed = backend_->mark();
    if (exchange && post_after_launch) post();
    if (exchange) transport_->wait(s);
    marks[s].arrived = backend_->mark();
    stats_.hops[s] = HopStats{};
    stats_.hops[s].hop = s;
    stats_.hops[s].source_rank = src;
    stats_.hops[s].skipped = skip;
    if (exchange) record_ring_bytes(stats_.hops[s], r, p, send_kv ? kv_bytes_ : 0, send_grad ? grad_bytes_ : 0);
    if (hop_cb_) hop_cb_(s, p, hop_user_);
  }
  // Home hop: the chunk processed last belongs to rank r+1; send it its finished gradients. They
  // are final here, so they are rounded to the input dtype before they travel (into the free K/V
  // part of the buffer): the owner gets the bits it would have rounded itself, and for 16-bit
  // inputs this transfer, which no step hides, carries half the bytes of the fp32 sums. dQ's
  // finalize runs beside the transfer. They land in a buffer of the ring and are copied to the
  // caller's dk and dv: a transport may need buffers it can share with the peer (the copy-engine
  // exchange maps the receiver's memory by CUDA IPC, which a caller's pool or VMM memory refuses).
  if (p > 1) {
    void* cur = grad_buffers_[p % 2];  // the arrived partial; its K/V part is stale
    void* last_share = local_grad_[(p - 1) % 2];
    marks[p].begin = backend_->mark();
    if (shared) {  // the arrived partial plus this rank's share, added and rounded in one pass
      backend_->cast_accumulator_sum(dk_of(cur, kv_bytes_), dk_of(last_share, 0), kview(cur));
      backend_->cast_accumulator_sum(dv_of(cur, kv_bytes_), dv_of(last_share, 0), vview(cur));
    } else {
      backend_->cast_accumulator(dk_of(cur, kv_bytes_), kview(cur));
      backend_->cast_accumulator(dv_of(cur, kv_bytes_), vview(cur));
    }
    void* home = grad_buffers_[(p + 1) % 2];  // receives [dK | dV] of this rank's own chunk
    transport_->start_exchange(cur, home, kv_bytes_, p);
    backend_->backward_end(dq);
    marks[p].computed = backend_->mark();
    transport_->wait(p);
    marks[p].arrived = backend_->mark();
    stats_.hops[p] = HopStats{};
    stats_.hops[p].hop = p;
    stats_.hops[p].source_rank = source_of(r, p - 1, p);
    record_ring_bytes(stats_.hops[p], r, p, 0, kv_bytes_);  // the finished dK/dV, rounded to the input dtype
    backend_->copy(dk.data, home, kv_bytes_ / 2);
    backend_->copy(dv.data, static_cast<char*>(home) + kv_bytes_ / 2, kv_bytes_ / 2);
  } else {
    backend_->backward_end(dq);
  }
  stats_.visible_pairs = plan_->visible_pairs[r];
  const int end_mark = backend_->mark();
  finish_pass(marks, start_mark, end_mark);
}

}  // namespace ringattn

namespace ringattn {

void RingAttention::add_kv_messages(PeerExchange& ex, int j, const TensorView& k, const TensorView& v) const {
  const int r = rank();
  const int64_t B = spec_.batch, S = local_seq_;
  const std::size_t row_bytes = static_cast<std::size_t>(spec_.effective_kv_heads() * spec_.head_dim) *
                                dtype_size(spec_.dtype);
  const DirectHop& h = direct_[j];
  if (h.reader >= 0) {  // this rank's rows that the reader's queries see, from its own K and V
    PeerMessage m{h.reader, {}};
    add_row_pieces(m.pieces, k.data, B, S, row_bytes, plan_->needed[h.reader][r]);
    add_row_pieces(m.pieces, v.data, B, S, row_bytes, plan_->needed[h.reader][r]);
    ex.sends.push_back(std::move(m));
  }
  if (h.owner >= 0) {  // the owner's rows, packed into buffer j % 2: K (B, n, Hkv, D) then V
    void* buf = direct_kv_[j % 2];
    PeerMessage m{h.owner, {}};
    add_packed_pieces(m.pieces, buf, B, row_bytes, plan_->needed[r][h.owner]);
    add_packed_pieces(m.pieces, static_cast<char*>(buf) + B * h.recv_rows * row_bytes, B, row_bytes,
                      plan_->needed[r][h.owner]);
    ex.recvs.push_back(std::move(m));
  }
}

// Direct plan, forward. Step j computes C[j] (j = 0: this rank's own block; j >= 1: the rows that
// remote hop j-1 brought) while remote hop j's rows travel into the other buffer: the owner sends
// them from its own K/V, so nothing is forwarded and a rank with nothing to move posts nothing.
void RingAttention::forward_direct(const TensorView& q, const TensorView& k, const TensorView& v,
                                   const TensorView& out, const TensorView& lse) {
  const int r = rank();
  const int H = static_cast<int>(direct_.size());
  const int64_t B = spec_.batch, Hkv = spec_.effective_kv_heads(), D = spec_.head_dim;
  const Device dev = backend_->device();
  const std::size_t es = dtype_size(spec_.dtype);
  const std::size_t row_bytes = static_cast<std::size_t>(Hkv * D) * es;  // one K (or V) row of one batch row
  int64_t max_rows = 0;
  for (const DirectHop& h : direct_) max_rows = std::max(max_rows, h.recv_rows);
  if (!direct_kv_[0] && max_rows > 0) {
    direct_kv_[0] = backend_->allocate(2 * B * max_rows * row_bytes);
    direct_kv_[1] = H > 1 ? backend_->allocate(2 * B * max_rows * row_bytes) : direct_kv_[0];
  }
  backend_->reset_marks();
  const int start_mark = backend_->mark();
  backend_->forward_begin(q, q_pos_);
  std::vector<HopMarks> marks(H + 1);
  stats_ = PassStats{};
  stats_.hops.resize(H + 1);
  const bool post_after_launch = backend_->stream() != nullptr && !post_early_;
  for (int j = 0; j <= H; ++j) {
    PeerExchange ex;
    if (j < H) add_kv_messages(ex, j, k, v);
    const bool exchange = !ex.empty();
    if (exchange && post_after_launch) {
      transport_->fence(j);
    } else if (exchange) {
      transport_->start_peer_exchange(ex, j);
    }
    marks[j].begin = backend_->mark();
    HopStats& st = stats_.hops[j];
    st.hop = j;
    if (j == 0) {
      st.source_rank = r;
      st.skipped = classify_chunks(mask_, spec_.heads, q_pos_, q_pos_) == Visibility::kEmpty;
      if (!st.skipped) backend_->forward_step(k, v, q_pos_);
    } else {
      const DirectHop& h = direct_[j - 1];
      const ChunkPositions k_pos = positions_from(h.recv_segments);
      st.source_rank = h.owner;
      st.skipped = h.owner < 0 || classify_chunks(mask_, spec_.heads, q_pos_, k_pos) == Visibility::kEmpty;
      if (!st.skipped) {
        void* buf = direct_kv_[(j - 1) % 2];
        const int64_t n = h.recv_rows;
        backend_->forward_step(make_view(buf, spec_.dtype, dev, {B, n, Hkv, D}),
                               make_view(static_cast<char*>(buf) + B * n * row_bytes, spec_.dtype, dev, {B, n, Hkv, D}),
                               k_pos);
      }
    }
    marks[j].computed = backend_->mark();
    if (exchange && post_after_launch) transport_->start_peer_exchange(ex, j);
    if (exchange) transport_->wait(j);
    marks[j].arrived = backend_->mark();
    record_peer_bytes(st, ex, 0, 0);
    if (hop_cb_) hop_cb_(j, H + 1, hop_user_);
  }
  stats_.visible_pairs = plan_->visible_pairs[r];
  backend_->forward_end(out, lse);
  const int end_mark = backend_->mark();
  finish_pass(marks, start_mark, end_mark);
}

// Direct plan, backward. As the forward, plus the way home: the dK/dV of the rows computed at
// step j (remote hop j-1) go back to their owner with step j+1's exchange, and the owner adds
// what its readers return into the fp32 sums of its own rows, rounded into dk, dv at the end.
void RingAttention::backward_direct(const TensorView& q, const TensorView& k, const TensorView& v,
                                    const TensorView& out, const TensorView& lse, const TensorView& dout,
                                    const TensorView& dq, const TensorView& dk, const TensorView& dv) {
  const int r = rank();
  const int H = static_cast<int>(direct_.size());
  const int64_t B = spec_.batch, S = local_seq_, Hkv = spec_.effective_kv_heads(), D = spec_.head_dim;
  const Device dev = backend_->device();
  const DType acc_dtype = accumulator_dtype(spec_.dtype);
  const std::size_t row_bytes = static_cast<std::size_t>(Hkv * D) * dtype_size(spec_.dtype);
  const std::size_t grad_row_bytes = static_cast<std::size_t>(Hkv * D) * dtype_size(acc_dtype);
  int64_t max_recv = 0, max_send = 0;
  for (const DirectHop& h : direct_) {
    max_recv = std::max(max_recv, h.recv_rows);
    max_send = std::max(max_send, h.send_rows);
  }
  if (!direct_kv_[0] && max_recv > 0) {
    direct_kv_[0] = backend_->allocate(2 * B * max_recv * row_bytes);
    direct_kv_[1] = H > 1 ? backend_->allocate(2 * B * max_recv * row_bytes) : direct_kv_[0];
  }
  if (!direct_grad_[0] && max_recv > 0) {
    direct_grad_[0] = backend_->allocate(2 * B * max_recv * grad_row_bytes);
    direct_grad_[1] = H > 1 ? backend_->allocate(2 * B * max_recv * grad_row_bytes) : direct_grad_[0];
  }
  if (!direct_grad_in_ && max_send > 0) direct_grad_in_ = backend_->allocate(2 * B * max_send * grad_row_bytes);
  if (!own_grad_) own_grad_ = backend_->allocate(2 * B * S * grad_row_bytes);
  const TensorView own_dk = make_view(own_grad_, acc_dtype, dev, {B, S, Hkv, D});
  const TensorView own_dv = make_view(static_cast<char*>(own_grad_) + B * S * grad_row_bytes, acc_dtype, dev,
                                      {B, S, Hkv, D});

  backend_->reset_marks();
  const int start_mark = backend_->mark();
  backend_->backward_begin(q, out, dout, lse, q_pos_);
  // Steps 0..H compute; step H+1 only brings the last dK/dV home.
  const int steps = H + 2;
  std::vector<HopMarks> marks(steps);
  stats_ = PassStats{};
  stats_.hops.resize(steps);
  const bool post_after_launch = backend_->stream() != nullptr && !post_early_;
  for (int j = 0; j < steps; ++j) {
    PeerExchange ex;
    if (j < H) add_kv_messages(ex, j, k, v);  // remote hop j's K/V, as in the forward
    const int g = j - 2;  // remote hop whose dK/dV travel home in this exchange
    std::size_t grad_sent = 0, grad_received = 0;
    if (g >= 0 && g < H) {
      const DirectHop& h = direct_[g];
      if (h.owner >= 0) {  // the dK/dV of the rows this rank computed on go to their owner
        PeerMessage m{h.owner, {}};
        m.pieces.push_back({direct_grad_[g % 2], static_cast<std::size_t>(2 * B * h.recv_rows) * grad_row_bytes});
        grad_sent = m.bytes();
        ex.sends.push_back(std::move(m));
      }
      if (h.reader >= 0) {  // and those of this rank's rows come back from their reader
        PeerMessage m{h.reader, {}};
        m.pieces.push_back({direct_grad_in_, static_cast<std::size_t>(2 * B * h.send_rows) * grad_row_bytes});
        grad_received = m.bytes();
        ex.recvs.push_back(std::move(m));
      }
    }
    const bool exchange = !ex.empty();
    if (exchange && post_after_launch) {
      transport_->fence(j);
    } else if (exchange) {
      transport_->start_peer_exchange(ex, j);
    }
    marks[j].begin = backend_->mark();
    HopStats& st = stats_.hops[j];
    st.hop = j;
    st.source_rank = -1;
    st.skipped = true;
    if (j == 0) {  // the own block stores over the sums: no zeroing pass
      st.source_rank = r;
      st.skipped = false;
      backend_->backward_step_into(k, v, q_pos_, own_dk, own_dv);
    } else if (j <= H) {
      const DirectHop& h = direct_[j - 1];
      st.source_rank = h.owner;
      if (h.owner >= 0) {
        const int64_t n = h.recv_rows;
        void* buf = direct_kv_[(j - 1) % 2];
        void* gb = direct_grad_[(j - 1) % 2];
        st.skipped = false;  // the owner waits for these dK/dV: zeros where nothing is visible
        backend_->backward_step_into(
            make_view(buf, spec_.dtype, dev, {B, n, Hkv, D}),
            make_view(static_cast<char*>(buf) + B * n * row_bytes, spec_.dtype, dev, {B, n, Hkv, D}),
            positions_from(h.recv_segments), make_view(gb, acc_dtype, dev, {B, n, Hkv, D}),
            make_view(static_cast<char*>(gb) + B * n * grad_row_bytes, acc_dtype, dev, {B, n, Hkv, D}));
      }
    }
    marks[j].computed = backend_->mark();
    if (exchange && post_after_launch) transport_->start_peer_exchange(ex, j);
    if (exchange) transport_->wait(j);
    if (grad_received > 0) {  // add the returned dK/dV into this rank's sums, range by range
      const DirectHop& h = direct_[g];
      const std::vector<RowRange>& ranges = plan_->needed[h.reader][r];
      for (int part = 0; part < 2; ++part) {
        char* dst = static_cast<char*>(own_grad_) + part * B * S * grad_row_bytes;
        char* src = static_cast<char*>(direct_grad_in_) + part * B * h.send_rows * grad_row_bytes;
        int64_t offset = 0;
        for (int64_t b = 0; b < B; ++b) {
          for (const RowRange& rr : ranges) {
            const int64_t n = rr.size();
            backend_->accumulate(make_view(dst + (b * S + rr.lo) * grad_row_bytes, acc_dtype, dev, {1, n, Hkv, D}),
                                 make_view(src + offset * grad_row_bytes, acc_dtype, dev, {1, n, Hkv, D}));
            offset += n;
          }
        }
      }
    }
    marks[j].arrived = backend_->mark();
    record_peer_bytes(st, ex, grad_sent, grad_received);
    if (hop_cb_) hop_cb_(j, steps, hop_user_);
  }
  backend_->cast_accumulator(own_dk, dk);
  backend_->cast_accumulator(own_dv, dv);
  backend_->backward_end(dq);
  stats_.visible_pairs = plan_->visible_pairs[r];
  const int end_mark = backend_->mark();
  finish_pass(marks, start_mark, end_mark);
}

}  // namespace ringattn
