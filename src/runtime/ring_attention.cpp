// The ring schedule: K/V chunks rotate over the transport while the backend folds each into fp32 state.
#include "ringattn/ring_attention.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "ringattn/error.hpp"

namespace ringattn {
namespace {

// RINGATTN_RING_POST=early posts each exchange before the hop's compute is enqueued (the
// pre-fence schedule, for timing comparisons); unset or "after": fence, enqueue, then post.
constexpr const char* kRingPostEnv = "RINGATTN_RING_POST";

bool post_early_from_env() {
  const char* v = std::getenv(kRingPostEnv);
  return v != nullptr && std::strcmp(v, "early") == 0;
}

// Source rank of the chunk visiting `rank` at step `step`: after k hops rank r holds chunk (r-k) mod p.
int source_of(int rank, int step, int world) { return ((rank - step) % world + world) % world; }

// The backward's last step is cut by key rows: the first part (this share of the rows) must hide
// that step's incoming partial (fp32 dK/dV, two thirds of a full hop's bytes); its rows' finished
// gradients then travel home while the second part computes, and only the second part's rows
// travel with nothing beside them. The cut is the same on every rank (the home messages' sizes
// must match) and a multiple of the GPU backward kernels' key block.
constexpr double kLastStepFirstShare = 0.6;
constexpr int64_t kCutMultiple = 128;

DType accumulator_dtype(DType dtype) { return dtype == DType::kF64 ? DType::kF64 : DType::kF32; }

TensorView chunk_view(void* base, std::size_t offset_bytes, DType dtype, Device device, int64_t b, int64_t s,
                      int64_t h, int64_t d) {
  return make_view(static_cast<char*>(base) + offset_bytes, dtype, device, {b, s, h, d});
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
    : spec_(spec), backend_(std::move(backend)), transport_(std::move(transport)) {
  RINGATTN_CHECK(backend_ && transport_, ErrorKind::kInternal, "RingAttention needs a backend and a transport", "");
  if (spec_.kv_heads == 0) spec_.kv_heads = spec_.heads;
  spec_.validate(transport_->world());
  local_seq_ = spec_.local_seq(transport_->world());
  q_pos_ = chunk_positions(spec_.layout, spec_.seq_len, transport_->rank(), transport_->world());
  backend_->prepare(spec_, local_seq_, local_seq_);
  const std::size_t kv_elems =
      static_cast<std::size_t>(spec_.batch * local_seq_ * spec_.effective_kv_heads() * spec_.head_dim);
  kv_bytes_ = 2 * kv_elems * dtype_size(spec_.dtype);
  grad_bytes_ = 2 * kv_elems * dtype_size(accumulator_dtype(spec_.dtype));
  post_early_ = post_early_from_env();
  // Row ranges of a batch-1 chunk are contiguous messages.
  if (transport_->world() > 1 && spec_.batch == 1 && local_seq_ >= 2 * kCutMultiple) {
    const int64_t blocks = std::llround(kLastStepFirstShare * static_cast<double>(local_seq_) / kCutMultiple);
    last_cut_ = std::min(std::max<int64_t>(blocks, 1) * kCutMultiple, (local_seq_ - 1) / kCutMultiple * kCutMultiple);
  }
}

RingAttention::~RingAttention() = default;

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
    const ChunkPositions k_pos = chunk_positions(spec_.layout, spec_.seq_len, src, p);
    const bool skip = classify_chunks(q_pos_, k_pos, spec_.causal) == Visibility::kEmpty;
    marks[s].begin = backend_->mark();
    if (!skip) {
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
    if (hop_cb_) hop_cb_(s, p, hop_user_);
  }
  backend_->forward_end(out, lse);
  const int end_mark = backend_->mark();
  read_timeline(marks, start_mark, end_mark);
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
  const int p = world(), r = rank();
  const int64_t B = spec_.batch, S = local_seq_, Hkv = spec_.effective_kv_heads(), D = spec_.head_dim;
  const Device dev = backend_->device();
  const DType acc_dtype = accumulator_dtype(spec_.dtype);
  // Message layout per hop: [K | V | dK partial | dV partial]; the gradient part belongs to the
  // chunk this rank processed one step earlier, so it travels one hop behind its K/V.
  const std::size_t msg_bytes = kv_bytes_ + grad_bytes_;
  if (!grad_buffers_[0]) {
    grad_buffers_[0] = backend_->allocate(msg_bytes);
    grad_buffers_[1] = p > 1 ? backend_->allocate(msg_bytes) : nullptr;
    local_grad_ = backend_->allocate(grad_bytes_);
  }
  // The first rows of a cut last step arrive home (hop p) in local_grad_'s dK rows [0, cut), which
  // their own rounding has read, when 16-bit rows take at most half the fp32 bytes; else apart.
  const int64_t row_bytes = Hkv * D * static_cast<int64_t>(dtype_size(spec_.dtype));
  const bool recv_in_share = dtype_size(acc_dtype) >= 2 * dtype_size(spec_.dtype);
  if (last_cut_ > 0 && !recv_in_share && !home_recv_)
    home_recv_ = backend_->allocate(static_cast<std::size_t>(2 * last_cut_ * row_bytes));
  void* first_rows_recv = recv_in_share ? local_grad_ : home_recv_;
  auto kview = [&](void* base) { return chunk_view(base, 0, spec_.dtype, dev, B, S, Hkv, D); };
  auto vview = [&](void* base) { return chunk_view(base, kv_bytes_ / 2, spec_.dtype, dev, B, S, Hkv, D); };
  auto gview = [&](void* base, std::size_t offset) {
    return make_view(static_cast<char*>(base) + offset, acc_dtype, dev, {2, B, S, Hkv * D});
  };
  auto dk_of = [&](void* base, std::size_t offset) { return chunk_view(base, offset, acc_dtype, dev, B, S, Hkv, D); };
  auto dv_of = [&](void* base, std::size_t offset) {
    return chunk_view(base, offset + grad_bytes_ / 2, acc_dtype, dev, B, S, Hkv, D);
  };

  // The cut last step (see kLastStepFirstShare): `home` is the buffer whose gradient part receives
  // the last partial (hop p-1) and whose free K/V part holds the rounded results that travel home.
  void* home = p > 1 ? grad_buffers_[p % 2] : nullptr;
  auto last_rows = [&](void* kv, const ChunkPositions& k_pos, int64_t lo, int64_t hi) {
    const int64_t n = hi - lo;
    backend_->backward_step(narrow(kview(kv), 1, lo, n), narrow(vview(kv), 1, lo, n), k_pos.rows(lo, hi),
                            narrow(dk_of(local_grad_, 0), 1, lo, n), narrow(dv_of(local_grad_, 0), 1, lo, n));
  };
  // Rows [lo, hi) of the last chunk: partial plus this rank's share, rounded into home's K/V part.
  auto round_home = [&](int64_t lo, int64_t hi, bool with_share) {
    for (int t = 0; t < 2; ++t) {
      const int64_t n = hi - lo;
      const TensorView acc = narrow(t == 0 ? dk_of(home, kv_bytes_) : dv_of(home, kv_bytes_), 1, lo, n);
      const TensorView dst = narrow(t == 0 ? kview(home) : vview(home), 1, lo, n);
      if (with_share) {
        const TensorView share = narrow(t == 0 ? dk_of(local_grad_, 0) : dv_of(local_grad_, 0), 1, lo, n);
        backend_->cast_accumulator_sum(acc, share, dst);
      } else {
        backend_->cast_accumulator(acc, dst);
      }
    }
  };
  // Sends rows [lo, hi) of the rounded dK and dV home; the same rows of this rank's own chunk arrive
  // in `recv` as [dK rows | dV rows]. Rows of every batch entry: a part range is one message only
  // for batch 1 or all rows.
  auto post_home = [&](int64_t lo, int64_t hi, void* recv, int hop) {
    const std::size_t bytes = static_cast<std::size_t>(B * (hi - lo) * row_bytes);
    const SendPart parts[2] = {{static_cast<char*>(home) + lo * row_bytes, bytes},
                               {static_cast<char*>(home) + kv_bytes_ / 2 + lo * row_bytes, bytes}};
    transport_->start_exchange_parts(parts, 2, recv, hop);
  };

  backend_->reset_marks();
  const int start_mark = backend_->mark();
  backend_->backward_begin(q, out, dout, lse, q_pos_);
  const bool post_after_launch = backend_->stream() != nullptr && !post_early_;  // as in forward()
  const SendPart own_kv[2] = {{k.data, kv_bytes_ / 2}, {v.data, kv_bytes_ / 2}};

  // Hops 0..p-1 compute; hop p (p > 1) is the home hop, reported with its own compute (the last
  // sum and rounding) and exposed time (the transfer nothing runs beside).
  std::vector<HopMarks> marks(p + (p > 1 ? 1 : 0));
  stats_ = PassStats{};
  stats_.hops.resize(marks.size());
  // This rank's dK/dV share of step s's chunk goes, at step 0 (the own chunk, whose partial starts
  // here and leaves at hop 1), straight into the gradient part of hop 1's message; at later steps
  // into local_grad_, added at step s+1 to the partial that arrived one hop behind its K/V. After a
  // skipped step there is no share (`shared` false): the partial passes on as it arrived.
  bool shared = false;
  bool cut_last = false;  // the last step was cut: hop p took its first rows home
  for (int s = 0; s < p; ++s) {
    void* cur = grad_buffers_[s % 2];
    void* nxt = p > 1 ? grad_buffers_[(s + 1) % 2] : nullptr;
    if (s >= 2 && shared) backend_->accumulate(gview(cur, kv_bytes_), gview(local_grad_, 0));
    const bool send_kv = s + 1 < p, send_grad = s >= 1, exchange = send_kv || send_grad;
    auto post = [&] {
      if (s == 0) {  // hop 0: the caller's K and V, sent in place
        transport_->start_exchange_parts(own_kv, 2, nxt, s);
      } else {
        const std::size_t offset = send_kv ? 0 : kv_bytes_;
        const std::size_t bytes = (send_kv ? kv_bytes_ : 0) + (send_grad ? grad_bytes_ : 0);
        transport_->start_exchange(static_cast<char*>(cur) + offset, static_cast<char*>(nxt) + offset, bytes, s);
      }
    };
    if (exchange && post_after_launch) {
      transport_->fence(s);
    } else if (exchange) {
      post();
    }
    const int src = source_of(r, s, p);
    const ChunkPositions k_pos = chunk_positions(spec_.layout, spec_.seq_len, src, p);
    const bool skip = classify_chunks(q_pos_, k_pos, spec_.causal) == Visibility::kEmpty;
    marks[s].begin = backend_->mark();
    void* share = s == 0 && p > 1 ? static_cast<char*>(grad_buffers_[1]) + kv_bytes_ : local_grad_;
    shared = !skip;
    if (s == 0 || !skip) backend_->zero(gview(share, 0));  // hop 1 sends the own chunk's share in any case
    cut_last = s == p - 1 && p > 1 && last_cut_ > 0;  // on every rank alike, computing or not
    if (cut_last) {
      // First part; then the last partial is waited for and the first part's rows, now final, start
      // home (hop p) while the second part computes. Hop p-1's wait sits inside this step's compute.
      if (!skip) last_rows(cur, k_pos, 0, last_cut_);
      if (post_after_launch) post();
      transport_->wait(s);
      round_home(0, last_cut_, shared);
      post_home(0, last_cut_, first_rows_recv, p);
      if (!skip) last_rows(cur, k_pos, last_cut_, S);
      marks[s].computed = backend_->mark();
      marks[s].arrived = marks[s].computed;
    } else {
      if (!skip) {
        backend_->backward_step(s == 0 ? k : kview(cur), s == 0 ? v : vview(cur), k_pos, dk_of(share, 0),
                                dv_of(share, 0));
      }
      marks[s].computed = backend_->mark();
      if (exchange && post_after_launch) post();
      if (exchange) transport_->wait(s);
      marks[s].arrived = backend_->mark();
    }
    stats_.hops[s] = HopStats{s, src, skip, 0.0, 0.0};
    if (hop_cb_) hop_cb_(s, p, hop_user_);
  }
  // Home hop: the chunk processed last belongs to rank r+1; send it its finished gradients. They
  // are final here, so they are rounded to the input dtype before they travel (into the free K/V
  // part of the buffer): the owner gets the bits it would have rounded itself, and for 16-bit
  // inputs this transfer carries half the bytes of the fp32 sums. With the last step cut, its first
  // rows left during the step (hop p); the rest go now (hop p + 1).
  if (p > 1) {
    void* nxt = grad_buffers_[(p + 1) % 2];  // the last step's K/V, free now: receives own rows
    const bool cut = cut_last;
    const int64_t lo = cut ? last_cut_ : 0;
    marks[p].begin = backend_->mark();
    if (cut) transport_->wait(p);  // under the second part; before hop p + 1 takes the transport
    round_home(lo, S, shared);     // shared: the arrived partial plus this rank's share, in one pass
    marks[p].computed = backend_->mark();
    post_home(lo, S, nxt, cut ? p + 1 : p);
    transport_->wait(cut ? p + 1 : p);
    marks[p].arrived = backend_->mark();
    stats_.hops[p] = HopStats{p, source_of(r, p - 1, p), false, 0.0, 0.0};
    const std::size_t first = static_cast<std::size_t>(lo * row_bytes);
    const std::size_t rest = static_cast<std::size_t>(B * (S - lo) * row_bytes);
    auto* dkb = static_cast<char*>(dk.data);
    auto* dvb = static_cast<char*>(dv.data);
    if (cut) {
      backend_->copy(dkb, first_rows_recv, first);
      backend_->copy(dvb, static_cast<char*>(first_rows_recv) + first, first);
    }
    backend_->copy(dkb + first, nxt, rest);
    backend_->copy(dvb + first, static_cast<char*>(nxt) + rest, rest);
  } else {
    backend_->cast_accumulator(dk_of(local_grad_, 0), dk);
    backend_->cast_accumulator(dv_of(local_grad_, 0), dv);
  }
  backend_->backward_end(dq);
  const int end_mark = backend_->mark();
  read_timeline(marks, start_mark, end_mark);
}

}  // namespace ringattn
