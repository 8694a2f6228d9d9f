// The ring plan: where every rank's tokens live and, per hop, which K/V rows each rank sends to which peers.
#pragma once

#include <cstdint>
#include <vector>

#include "ringattn/layout.hpp"
#include "ringattn/mask.hpp"
#include "ringattn/spec.hpp"

namespace ringattn {

// Local rows [lo, hi) of a chunk.
struct RowRange {
  int64_t lo = 0;
  int64_t hi = 0;
  int64_t size() const { return hi - lo; }
};

// Positions of every rank's chunk for a spec on `world` ranks: auto resolved, balanced blocks
// assigned (identical on every rank: a pure function of the spec).
struct RankLayout {
  Layout layout = Layout::kContiguous;  // resolved: never kAuto
  std::vector<std::vector<Segment>> segments;  // [rank] -> runs of global positions, in local row order
  // Positions of rank r's chunk (a view of `segments`: keep this RankLayout alive).
  ChunkPositions positions(int rank) const { return positions_from(segments[static_cast<std::size_t>(rank)]); }
  int world() const { return static_cast<int>(segments.size()); }
};
RankLayout layout_ranks(const AttentionSpec& spec, int world);

// How K/V rows travel in a pass.
enum class Route {
  kRing,    // every chunk visits every rank over the neighbour ring (dense needs: the tuned ring)
  kDirect,  // at hop t the owner s sends rank s+t exactly the rows its queries see (peer exchange)
};
const char* route_name(Route route);

// The whole plan, identical on every rank. Hop t (1 <= t < world) pairs every rank r with the
// reader r+t (it sends) and the owner r-t (it receives), as the ring's hop t does; a direct plan
// moves only the rows needed[reader][owner] and leaves out hops where no pair has anything.
struct RingPlan {
  Route route = Route::kRing;
  RankLayout ranks;
  int world = 1;
  // needed[r][s]: merged local row ranges of rank s's chunk that some query of rank r sees under
  // some head (r != s; empty when none); needed[r][r] is empty (the local block needs no transfer).
  std::vector<std::vector<std::vector<RowRange>>> needed;
  // Hops (distances t) in execution order after the local block: ring: 1..world-1; direct: the
  // distances where some pair has rows to move.
  std::vector<int> hops;
  // Visible (query, key) pairs of each rank's queries over all batch rows and heads.
  std::vector<double> visible_pairs;
  // K+V rows one forward pass moves in all (forwarding included), and the rows that the ranks'
  // queries need from other ranks (the lower bound of the masks issue).
  int64_t rows_sent = 0;
  int64_t rows_needed = 0;

  int owner_at(int rank, int hop) const { return ((rank - hop) % world + world) % world; }
  int reader_at(int rank, int hop) const { return (rank + hop) % world; }
  int64_t rows(const std::vector<RowRange>& ranges) const {
    int64_t n = 0;
    for (const auto& r : ranges) n += r.size();
    return n;
  }
};

// One compute step of a rank: the rows of `owner`'s chunk that it computes on, in the order they
// arrive (a whole chunk on the ring; the needed rows on a direct hop), with their positions.
struct PlanStep {
  int hop = 0;     // distance t: step 0 is the own block
  int owner = -1;  // -1: nothing arrives in this hop
  std::vector<RowRange> rows;
  std::vector<Segment> positions;  // runs that continue each other are merged
  int64_t num_rows() const {
    int64_t n = 0;
    for (const auto& r : rows) n += r.size();
    return n;
  }
};
// The compute steps of `rank` in execution order: the own block, then one per hop of plan.hops.
std::vector<PlanStep> plan_steps(const RingPlan& plan, int rank);

// Plans `spec` on `world` ranks. `peer_exchange`: whether the transport can send to any peer
// (else the plan is the neighbour ring, which moves every chunk everywhere but stays exact).
RingPlan plan_ring(const AttentionSpec& spec, int world, bool peer_exchange);

// Bytes of one K+V row: 2 x batch x kv_heads x head_dim x dtype size.
uint64_t kv_row_bytes(const AttentionSpec& spec);

}  // namespace ringattn
