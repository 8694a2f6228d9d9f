// Peer-exchange test cases shared by the loopback (threads) and MPI (processes) tests: who sends what to whom at each hop.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "ringattn/transport.hpp"

namespace ringattn::test {

inline constexpr int kPeerCaseHops = 4;  // hop 1: the last rank only sends; hop 2: rank 0 is idle

// Piece sizes of the messages from `sender` to `receiver` at `hop` (none, one or two messages;
// the two directions of a pair differ), known alike to both sides.
inline std::vector<std::vector<std::size_t>> peer_case_messages(int world, int hop, int sender, int receiver) {
  if (hop == 1 && world > 1 && receiver == world - 1) return {};       // a rank that only sends
  if (hop == 2 && (sender == 0 || receiver == 0)) return {};           // an empty exchange on rank 0
  const int count = (sender * 3 + receiver * 5 + hop) % 3;
  std::vector<std::vector<std::size_t>> out;
  for (int m = 0; m < count; ++m) {
    const std::size_t head = static_cast<std::size_t>((sender * 7 + receiver * 11 + hop * 13 + m) % 50);  // may be 0
    const std::size_t body = static_cast<std::size_t>(1000 + 37 * sender + 101 * receiver + 7 * hop + 3 * m);
    out.push_back({head, body});
  }
  return out;
}

inline unsigned char peer_case_byte(int hop, int sender, int receiver, int message, int piece, std::size_t i) {
  return static_cast<unsigned char>((hop * 31 + sender * 17 + receiver * 13 + message * 7 + piece * 5 + i) & 0xFF);
}

// One rank's buffers for one hop: its sends filled with the pattern, its receives poisoned.
struct PeerCase {
  std::vector<std::vector<unsigned char>> storage;  // one per piece; never resized after setup
  PeerExchange exchange;
  struct Expect {
    int peer, message, piece;
    const std::vector<unsigned char>* data;
  };
  std::vector<Expect> expected;  // receive pieces, to check
  int hop = 0, rank = 0;
};

inline PeerCase make_peer_case(int world, int rank, int hop) {
  PeerCase c;
  c.hop = hop;
  c.rank = rank;
  std::size_t pieces = 0;
  for (int peer = 0; peer < world; ++peer) {
    for (const auto& m : peer_case_messages(world, hop, rank, peer)) pieces += m.size();
    for (const auto& m : peer_case_messages(world, hop, peer, rank)) pieces += m.size();
  }
  c.storage.reserve(pieces);
  // Sends listed from the highest peer down, receives from the lowest up: list order matters only
  // within one pair.
  for (int peer = world - 1; peer >= 0; --peer) {
    const auto messages = peer_case_messages(world, hop, rank, peer);
    for (int m = 0; m < static_cast<int>(messages.size()); ++m) {
      PeerMessage msg{peer, {}};
      for (int p = 0; p < static_cast<int>(messages[m].size()); ++p) {
        c.storage.emplace_back(messages[m][p]);
        auto& buf = c.storage.back();
        for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = peer_case_byte(hop, rank, peer, m, p, i);
        msg.pieces.push_back(PeerPiece{buf.data(), buf.size()});
      }
      c.exchange.sends.push_back(std::move(msg));
    }
  }
  for (int peer = 0; peer < world; ++peer) {
    const auto messages = peer_case_messages(world, hop, peer, rank);
    for (int m = 0; m < static_cast<int>(messages.size()); ++m) {
      PeerMessage msg{peer, {}};
      for (int p = 0; p < static_cast<int>(messages[m].size()); ++p) {
        c.storage.emplace_back(messages[m][p], static_cast<unsigned char>(0xEE));
        auto& buf = c.storage.back();
        msg.pieces.push_back(PeerPiece{buf.data(), buf.size()});
        c.expected.push_back({peer, m, p, &buf});
      }
      c.exchange.recvs.push_back(std::move(msg));
    }
  }
  return c;
}

// The first wrong byte of a received piece, as text; empty when every piece holds what its sender wrote.
inline std::string peer_case_mismatch(const PeerCase& c) {
  for (const auto& e : c.expected) {
    for (std::size_t i = 0; i < e.data->size(); ++i) {
      const unsigned char want = peer_case_byte(c.hop, e.peer, c.rank, e.message, e.piece, i);
      if ((*e.data)[i] != want) {
        return "rank " + std::to_string(c.rank) + " hop " + std::to_string(c.hop) + ": message " +
               std::to_string(e.message) + " from rank " + std::to_string(e.peer) + " piece " +
               std::to_string(e.piece) + " byte " + std::to_string(i) + " is " + std::to_string((*e.data)[i]) +
               ", expected " + std::to_string(want);
      }
    }
  }
  return "";
}

}  // namespace ringattn::test
