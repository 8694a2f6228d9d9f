// LoopbackTransport: p ranks in one process (a thread each) exchanging through a shared hub, by memcpy or device copies.
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#ifdef RINGATTN_HAVE_CUDA
#include <cuda_runtime.h>
#endif

#include "ringattn/error.hpp"
#include "ringattn/transport.hpp"

namespace ringattn {
namespace {

using Clock = std::chrono::steady_clock;

constexpr const char* kTimeoutHint = "a rank of the loopback ring never posted its side; raise the timeout if a step "
                                     "legitimately takes longer";

std::string seconds_text(double ms) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.3f s", ms / 1000.0);
  return buf;
}

#ifdef RINGATTN_HAVE_CUDA
void check_cuda(cudaError_t e, const char* call) {
  if (e != cudaSuccess) {
    fail(ErrorKind::kCuda, std::string("loopback transport: ") + call + " failed: " + cudaGetErrorString(e),
         "pass compute streams of the current device, one per rank");
  }
}
#endif

// A message is met by (sender, receiver, hop, seq): seq counts the messages of that pair and hop
// so far, on both sides alike, so messages of one pair match in list order and a hop number
// reused by the next pass never meets the previous pass's message.
struct MessageKey {
  int sender = 0, receiver = 0, hop = 0;
  long seq = 0;
  bool operator<(const MessageKey& o) const {
    return std::tie(sender, receiver, hop, seq) < std::tie(o.sender, o.receiver, o.hop, o.seq);
  }
};

enum class Stage {
  kOpen,     // one side posted
  kMatched,  // both sides posted; host mode: a waiter of either side copies it
  kCopying,  // host mode: a waiter copies it outside the lock
  kDone,     // host: copied; device: the copy is enqueued and `copied` recorded after it
};

struct Message {
  std::vector<PeerPiece> send, recv;  // send pieces are only read
  bool has_send = false, has_recv = false;
  Stage stage = Stage::kOpen;
  bool sender_waited = false, receiver_waited = false;  // erased once both sides' waits saw it done
#ifdef RINGATTN_HAVE_CUDA
  cudaEvent_t sender_posted = nullptr;    // on the sender's exchange stream: its side is ready
  cudaEvent_t receiver_posted = nullptr;  // on the receiver's exchange stream
  cudaEvent_t copied = nullptr;           // on the receiver's exchange stream, after the copy
#endif
};

// State shared by the ranks of one loopback ring; everything in it is guarded by `mu`.
struct Hub {
  explicit Hub(int world_size, const std::vector<void*>& compute_streams)
      : world(world_size), device_mode(!compute_streams.empty()) {
#ifdef RINGATTN_HAVE_CUDA
    if (device_mode) {
      check_cuda(cudaGetDevice(&device), "cudaGetDevice");
      for (void* s : compute_streams) {
        compute.push_back(static_cast<cudaStream_t>(s));
        cudaStream_t x = nullptr;
        check_cuda(cudaStreamCreateWithFlags(&x, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
        exchange.push_back(x);
      }
    }
#endif
  }
  ~Hub() {
#ifdef RINGATTN_HAVE_CUDA
    // Both release their resources once the work queued on them completes.
    for (cudaEvent_t e : events) cudaEventDestroy(e);
    for (cudaStream_t x : exchange) cudaStreamDestroy(x);
#endif
  }
  Hub(const Hub&) = delete;
  Hub& operator=(const Hub&) = delete;

  void abort_locked(const std::string& why) {
    if (aborted.empty()) aborted = why;
    cv.notify_all();
  }

#ifdef RINGATTN_HAVE_CUDA
  // Events come from a pool that grows only while more are in flight than ever before, so a
  // steady ring creates none per hop.
  cudaEvent_t take_event_locked() {
    if (free_events.empty()) {
      cudaEvent_t e = nullptr;
      check_cuda(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreateWithFlags");
      events.push_back(e);
      return e;
    }
    cudaEvent_t e = free_events.back();
    free_events.pop_back();
    return e;
  }
  void give_event_locked(cudaEvent_t e) {
    if (e != nullptr) free_events.push_back(e);
  }
  int device = 0;
  std::vector<cudaStream_t> compute;   // the callers' streams, one per rank
  std::vector<cudaStream_t> exchange;  // ours, one per rank: copies into that rank run here
  std::vector<cudaEvent_t> events;     // every event created, destroyed with the hub
  std::vector<cudaEvent_t> free_events;
#endif

  const int world;
  const bool device_mode;
  std::mutex mu;
  std::condition_variable cv;
  std::map<MessageKey, Message> messages;
  std::string aborted;  // set once: every waiter and every later call fails with it
};

// Host mode: a receive is satisfied by memcpy from the matching send, done by whichever side's
// wait finds the pair first; wait(hop) returns once this rank's receives of the hop landed and its
// sends were copied out (so both buffers are the caller's again).
// Device mode: the second side to post enqueues the copies (cudaMemcpyAsync) on the receiver's
// exchange stream, after both sides' exchange streams reached the post (each waits for its compute
// stream up to the fence, or up to the post, then runs `before`); wait(hop) makes the compute
// stream wait for the copies of this rank's messages. The host waits only for peers to post.
class LoopbackTransport final : public Transport {
 public:
  LoopbackTransport(std::shared_ptr<Hub> hub, int rank, double timeout_ms)
      : hub_(std::move(hub)), rank_(rank), timeout_ms_(timeout_ms) {}

  ~LoopbackTransport() override {
    std::unique_lock<std::mutex> lock(hub_->mu);
    if (!posts_.empty()) {
      hub_->abort_locked("loopback rank " + std::to_string(rank_) + " was destroyed with hop " +
                         std::to_string(posts_.begin()->first) + " in flight");
    }
    wait_for_copies_locked(lock);
    // No peer may copy from or into this rank's buffers once it is gone.
    for (auto& [hop, post] : posts_) {
      for (const MessageKey& key : post.keys) hub_->messages.erase(key);
    }
    posts_.clear();
  }
  LoopbackTransport(const LoopbackTransport&) = delete;
  LoopbackTransport& operator=(const LoopbackTransport&) = delete;

  const char* name() const override { return "loopback"; }
  int rank() const override { return rank_; }
  int world() const override { return hub_->world; }
  bool supports_peer_exchange() const override { return true; }

  void set_timeout_ms(double ms) override {
    RINGATTN_CHECK(ms > 0, ErrorKind::kInvalidArgument, "timeout " + std::to_string(ms) + " ms is not positive",
                   "pass a positive timeout");
    timeout_ms_ = ms;
  }

  void start_exchange_pieces(const ExchangePart* parts, int num_parts, int hop,
                             const ExchangePrologue& before) override {
    const int world = hub_->world;
    PeerExchange exchange;
    exchange.sends.push_back(PeerMessage{(rank_ + 1) % world, {}});
    exchange.recvs.push_back(PeerMessage{(rank_ + world - 1) % world, {}});
    for (int i = 0; i < num_parts; ++i) {
      // A send's data is only read (PeerPiece is shared by both directions).
      exchange.sends[0].pieces.push_back(PeerPiece{const_cast<void*>(parts[i].send), parts[i].bytes});
      exchange.recvs[0].pieces.push_back(PeerPiece{parts[i].recv, parts[i].bytes});
    }
    post(exchange, hop, before);
  }

  void start_peer_exchange(const PeerExchange& exchange, int hop, const ExchangePrologue& before) override {
    post(exchange, hop, before);
  }

  void fence(int hop) override {
#ifdef RINGATTN_HAVE_CUDA
    if (!hub_->device_mode) return;
    std::unique_lock<std::mutex> lock(hub_->mu);
    throw_if_aborted_locked(hop, lock);
    check_cuda(cudaSetDevice(hub_->device), "cudaSetDevice");
    cudaEvent_t& e = fences_[hop];
    if (e == nullptr) e = hub_->take_event_locked();
    check_cuda(cudaEventRecord(e, hub_->compute[rank_]), "cudaEventRecord (fence)");
#else
    (void)hop;
#endif
  }

  void wait(int hop) override {
    std::unique_lock<std::mutex> lock(hub_->mu);
    throw_if_aborted_locked(hop, lock);
    auto it = posts_.find(hop);
    RINGATTN_CHECK(it != posts_.end(), ErrorKind::kInternal,
                   "loopback rank " + std::to_string(rank_) + ": wait for hop " + std::to_string(hop) +
                       " that was never started",
                   "post each hop before waiting for it");
    Post& post = it->second;
    const auto deadline = Clock::now() + std::chrono::duration<double, std::milli>(timeout_ms_);
    while (true) {
      throw_if_aborted_locked(hop, lock);
      bool done = true, progressed = false;
      const MessageKey* open = nullptr;  // the first message whose peer has not posted its side
      for (const MessageKey& key : post.keys) {
        Message& m = hub_->messages.at(key);
        if (m.stage == Stage::kMatched) {
          copy_unlocked(m, lock);
          progressed = true;
          break;  // the lock was released: look again from the start
        }
        if (m.stage != Stage::kDone) done = false;
        if (m.stage == Stage::kOpen && open == nullptr) open = &key;
      }
      if (progressed) continue;
      if (done) break;
      if (open != nullptr && Clock::now() >= deadline) {  // a copy in progress always finishes
        const bool sending = open->sender == rank_ && !hub_->messages.at(*open).has_recv;
        const int peer = sending ? open->receiver : open->sender;
        const std::string why = "loopback rank " + std::to_string(rank_) + ": exchange of hop " +
                                std::to_string(hop) + " timed out after " + seconds_text(timeout_ms_) +
                                " waiting for rank " + std::to_string(peer) +
                                (sending ? " (its receive of our send)" : " (its send of our receive)");
        hub_->abort_locked(why);
        wait_for_copies_locked(lock);
        fail(ErrorKind::kComm, why, kTimeoutHint);
      }
      if (open != nullptr) {
        hub_->cv.wait_until(lock, deadline);
      } else {
        hub_->cv.wait(lock);  // only copies in progress remain: their end notifies
      }
    }
#ifdef RINGATTN_HAVE_CUDA
    if (hub_->device_mode) {
      check_cuda(cudaSetDevice(hub_->device), "cudaSetDevice");
      for (const MessageKey& key : post.keys) {
        check_cuda(cudaStreamWaitEvent(hub_->compute[rank_], hub_->messages.at(key).copied, 0),
                   "cudaStreamWaitEvent (compute waits for the copies)");
      }
      hub_->give_event_locked(post.posted);  // every copy that waits for it is enqueued
    }
#endif
    for (const MessageKey& key : post.keys) {
      auto m = hub_->messages.find(key);
      if (m == hub_->messages.end()) continue;  // a message to self, released at its first key
      if (key.sender == rank_) m->second.sender_waited = true;
      if (key.receiver == rank_) m->second.receiver_waited = true;
      if (m->second.sender_waited && m->second.receiver_waited) {
#ifdef RINGATTN_HAVE_CUDA
        hub_->give_event_locked(m->second.copied);  // both compute streams' waits captured it
#endif
        hub_->messages.erase(m);
      }
    }
    posts_.erase(it);
  }

  void abort(const std::string& why) override {
    std::lock_guard<std::mutex> lock(hub_->mu);
    hub_->abort_locked("loopback rank " + std::to_string(rank_) + " aborted: " + why);
  }

  // Embedded passes: the host still meets its peers' posts (the ranks are threads of one process),
  // but never waits for the device.
  void set_compute_stream(void* stream) override {
#ifdef RINGATTN_HAVE_CUDA
    if (!hub_->device_mode) return;
    std::lock_guard<std::mutex> lock(hub_->mu);
    hub_->compute[rank_] = stream != nullptr ? static_cast<cudaStream_t>(stream) : cudaStreamLegacy;  // as the backend's
#else
    (void)stream;
#endif
  }

  // This rank's exchange stream joins its compute stream: after the pass's last wait every copy
  // into this rank is enqueued there (the copies out of it run on the receivers' streams, which
  // the compute stream already waited for).
  Verdict end_pass_async() override {
#ifdef RINGATTN_HAVE_CUDA
    if (hub_->device_mode) {
      std::lock_guard<std::mutex> lock(hub_->mu);
      check_cuda(cudaSetDevice(hub_->device), "cudaSetDevice");
      cudaEvent_t joined = hub_->take_event_locked();
      check_cuda(cudaEventRecord(joined, hub_->exchange[rank_]), "cudaEventRecord (exchange -> compute)");
      check_cuda(cudaStreamWaitEvent(hub_->compute[rank_], joined, 0), "cudaStreamWaitEvent (compute joins exchange)");
      hub_->give_event_locked(joined);  // the wait captured it
    }
#endif
    return {};
  }

 private:
  // What one rank posted for one hop: the keys of its messages (sends and receives).
  struct Post {
    std::vector<MessageKey> keys;
#ifdef RINGATTN_HAVE_CUDA
    cudaEvent_t posted = nullptr;  // on this rank's exchange stream, after the fence and `before`
#endif
  };

  // Throws the hub's abort, after the copies other ranks make from or into this rank's buffers
  // have finished (a memcpy: never a wait on a stalled peer).
  void throw_if_aborted_locked(int hop, std::unique_lock<std::mutex>& lock) {
    if (hub_->aborted.empty()) return;
    wait_for_copies_locked(lock);
    fail(ErrorKind::kComm,
         "loopback rank " + std::to_string(rank_) + ", hop " + std::to_string(hop) + ": the ring was aborted (" +
             hub_->aborted + ")",
         "the first failure above names the rank and hop that failed");
  }

  void wait_for_copies_locked(std::unique_lock<std::mutex>& lock) {
    hub_->cv.wait(lock, [this] {
      for (const auto& [hop, post] : posts_) {
        for (const MessageKey& key : post.keys) {
          auto m = hub_->messages.find(key);
          if (m != hub_->messages.end() && m->second.stage == Stage::kCopying) return false;
        }
      }
      return true;
    });
  }

  void check_peer(int peer, const char* what, int hop) const {
    RINGATTN_CHECK(peer >= 0 && peer < hub_->world, ErrorKind::kInternal,
                   "loopback rank " + std::to_string(rank_) + ": hop " + std::to_string(hop) + " would " + what +
                       " rank " + std::to_string(peer) + " of a ring of " + std::to_string(hub_->world),
                   "the plan names peers in [0, world)");
  }

  void post(const PeerExchange& exchange, int hop, const ExchangePrologue& before) {
    for (const PeerMessage& m : exchange.sends) check_peer(m.peer, "send to", hop);
    for (const PeerMessage& m : exchange.recvs) check_peer(m.peer, "receive from", hop);
    if (!hub_->device_mode && before) before(nullptr);  // host memory: on the posting thread
    std::unique_lock<std::mutex> lock(hub_->mu);
    throw_if_aborted_locked(hop, lock);
    RINGATTN_CHECK(posts_.count(hop) == 0, ErrorKind::kInternal,
                   "loopback rank " + std::to_string(rank_) + ": hop " + std::to_string(hop) +
                       " posted again before it was waited for",
                   "wait for each hop before posting it again");
    Post post;
#ifdef RINGATTN_HAVE_CUDA
    if (hub_->device_mode) {
      // The exchange stream reaches the compute stream's fence (or its present end), runs the
      // prologue, and marks that point: copies from or into this rank's buffers start there.
      check_cuda(cudaSetDevice(hub_->device), "cudaSetDevice");
      cudaStream_t x = hub_->exchange[rank_];
      auto fence = fences_.find(hop);
      if (fence != fences_.end()) {
        check_cuda(cudaStreamWaitEvent(x, fence->second, 0), "cudaStreamWaitEvent (exchange waits for fence)");
        hub_->give_event_locked(fence->second);
        fences_.erase(fence);
      } else {
        cudaEvent_t ready = hub_->take_event_locked();
        check_cuda(cudaEventRecord(ready, hub_->compute[rank_]), "cudaEventRecord (compute -> exchange)");
        check_cuda(cudaStreamWaitEvent(x, ready, 0), "cudaStreamWaitEvent (exchange waits for compute)");
        hub_->give_event_locked(ready);  // the wait captured it
      }
      if (before) before(x);
      post.posted = hub_->take_event_locked();
      check_cuda(cudaEventRecord(post.posted, x), "cudaEventRecord (exchange posted)");
    }
#endif
    for (const PeerMessage& m : exchange.sends) {
      const MessageKey key{rank_, m.peer, hop, send_counts_[{m.peer, hop}]++};
      Message& msg = hub_->messages[key];
      msg.send = m.pieces;
      msg.has_send = true;
#ifdef RINGATTN_HAVE_CUDA
      msg.sender_posted = post.posted;
#endif
      post.keys.push_back(key);
      if (msg.has_recv) match_locked(key, msg);
    }
    for (const PeerMessage& m : exchange.recvs) {
      const MessageKey key{m.peer, rank_, hop, recv_counts_[{m.peer, hop}]++};
      Message& msg = hub_->messages[key];
      msg.recv = m.pieces;
      msg.has_recv = true;
#ifdef RINGATTN_HAVE_CUDA
      msg.receiver_posted = post.posted;
#endif
      post.keys.push_back(key);
      if (msg.has_send) match_locked(key, msg);
    }
    posts_.emplace(hop, std::move(post));
    hub_->cv.notify_all();
  }

  // Both sides of `msg` are posted: checks that the pieces agree, then (device) enqueues the copies.
  void match_locked(const MessageKey& key, Message& msg) {
    bool same = msg.send.size() == msg.recv.size();
    for (std::size_t i = 0; same && i < msg.send.size(); ++i) same = msg.send[i].bytes == msg.recv[i].bytes;
    if (!same) {
      const std::string why = "loopback: hop " + std::to_string(key.hop) + " message from rank " +
                              std::to_string(key.sender) + " to rank " + std::to_string(key.receiver) + " has " +
                              std::to_string(msg.send.size()) + " pieces (" + std::to_string(PeerMessage{0, msg.send}.bytes()) +
                              " bytes) sent but " + std::to_string(msg.recv.size()) + " pieces (" +
                              std::to_string(PeerMessage{0, msg.recv}.bytes()) + " bytes) received";
      hub_->abort_locked(why);
      fail(ErrorKind::kInternal, why, "both sides of a message come from the same plan: piece sizes must agree");
    }
    msg.stage = Stage::kMatched;
#ifdef RINGATTN_HAVE_CUDA
    if (hub_->device_mode) {
      cudaStream_t x = hub_->exchange[key.receiver];
      check_cuda(cudaStreamWaitEvent(x, msg.sender_posted, 0), "cudaStreamWaitEvent (copy waits for the sender)");
      check_cuda(cudaStreamWaitEvent(x, msg.receiver_posted, 0), "cudaStreamWaitEvent (copy waits for the receiver)");
      for (std::size_t i = 0; i < msg.send.size(); ++i) {
        if (msg.send[i].bytes == 0) continue;
        check_cuda(cudaMemcpyAsync(msg.recv[i].data, msg.send[i].data, msg.send[i].bytes, cudaMemcpyDeviceToDevice, x),
                   "cudaMemcpyAsync (loopback copy)");
      }
      msg.copied = hub_->take_event_locked();
      check_cuda(cudaEventRecord(msg.copied, x), "cudaEventRecord (copied)");
      msg.stage = Stage::kDone;
    }
#else
    (void)key;
#endif
  }

  // Host mode: copies a matched message outside the hub's lock (a waiter of either side does it).
  void copy_unlocked(Message& msg, std::unique_lock<std::mutex>& lock) {
    msg.stage = Stage::kCopying;
    lock.unlock();
    for (std::size_t i = 0; i < msg.send.size(); ++i) {
      if (msg.send[i].bytes > 0) std::memcpy(msg.recv[i].data, msg.send[i].data, msg.send[i].bytes);
    }
    lock.lock();
    msg.stage = Stage::kDone;
    hub_->cv.notify_all();
  }

  std::shared_ptr<Hub> hub_;
  const int rank_;
  double timeout_ms_;
  std::map<int, Post> posts_;                          // by hop: posted, not yet waited for
  std::map<std::pair<int, int>, long> send_counts_;    // (receiver, hop) -> messages sent so far
  std::map<std::pair<int, int>, long> recv_counts_;    // (sender, hop) -> messages received so far
#ifdef RINGATTN_HAVE_CUDA
  std::map<int, cudaEvent_t> fences_;                  // by hop: recorded by fence(), used by the post
#endif
};

}  // namespace

std::vector<std::unique_ptr<Transport>> make_loopback_transports(int world, const std::vector<void*>& compute_streams,
                                                                 double timeout_ms) {
  RINGATTN_CHECK(world >= 1, ErrorKind::kInvalidArgument,
                 "a loopback ring of " + std::to_string(world) + " ranks", "pass at least one rank");
  RINGATTN_CHECK(compute_streams.empty() || static_cast<int>(compute_streams.size()) == world,
                 ErrorKind::kInvalidArgument,
                 "a loopback ring of " + std::to_string(world) + " ranks given " +
                     std::to_string(compute_streams.size()) + " compute streams",
                 "pass one stream per rank, or none for host memory");
  RINGATTN_CHECK(timeout_ms > 0, ErrorKind::kInvalidArgument,
                 "loopback timeout " + std::to_string(timeout_ms) + " ms is not positive", "pass a positive timeout");
#ifndef RINGATTN_HAVE_CUDA
  RINGATTN_CHECK(compute_streams.empty(), ErrorKind::kInvalidArgument,
                 "this ringattn was built without CUDA, so a loopback ring cannot run on compute streams",
                 "pass no streams (host memory), or rebuild with CUDA");
#endif
  auto hub = std::make_shared<Hub>(world, compute_streams);
  std::vector<std::unique_ptr<Transport>> out;
  for (int r = 0; r < world; ++r) out.push_back(std::make_unique<LoopbackTransport>(hub, r, timeout_ms));
  return out;
}

}  // namespace ringattn
