// Transport's non-virtual forms (a concatenated send as exchange pieces) and the default peer exchange.
#include <vector>

#include "ringattn/transport.hpp"

#include <string>

#include "ringattn/error.hpp"

namespace ringattn {

void Transport::start_exchange_parts(const SendPart* parts, int num_parts, void* recv, int hop,
                                     const ExchangePrologue& before) {
  std::vector<ExchangePart> pieces(static_cast<std::size_t>(num_parts));
  std::size_t offset = 0;
  for (int i = 0; i < num_parts; ++i) {
    pieces[i] = ExchangePart{parts[i].data, static_cast<char*>(recv) + offset, parts[i].bytes};
    offset += parts[i].bytes;
  }
  start_exchange_pieces(pieces.data(), num_parts, hop, before);
}

}  // namespace ringattn

namespace ringattn {

void Transport::start_peer_exchange(const PeerExchange& exchange, int hop, const ExchangePrologue& before) {
  (void)exchange;
  (void)before;
  fail(ErrorKind::kInternal,
       std::string("the ") + name() + " transport has no peer exchange (hop " + std::to_string(hop) + ")",
       "the ring plan asks supports_peer_exchange() first");
}

}  // namespace ringattn
