// Default Backend methods: a backend without a backward pass says so instead of failing silently.
#include "ringattn/backend.hpp"

#include "ringattn/error.hpp"

namespace ringattn {
namespace {

[[noreturn]] void missing(const Backend& b, const char* what) {
  fail(ErrorKind::kInvalidArgument, std::string("the ") + b.name() + " backend has no " + what,
       "use --backend cpu for this operation");
}

}  // namespace

void Backend::backward_begin(const TensorView&, const TensorView&, const TensorView&, const TensorView&,
                             const ChunkPositions&) {
  missing(*this, "backward pass");
}
void Backend::backward_step(const TensorView&, const TensorView&, const ChunkPositions&, const TensorView&,
                            const TensorView&) {
  missing(*this, "backward pass");
}
void Backend::backward_end(const TensorView&) { missing(*this, "backward pass"); }
void Backend::cast_accumulator(const TensorView&, const TensorView&) { missing(*this, "accumulator cast"); }
void Backend::cast_accumulator_sum(const TensorView& acc, const TensorView& addend, const TensorView& dst) {
  accumulate(acc, addend);
  cast_accumulator(acc, dst);
}
void Backend::zero(const TensorView&) { missing(*this, "zero fill"); }
void Backend::accumulate(const TensorView&, const TensorView&) { missing(*this, "accumulate"); }
void Backend::zero_on(const TensorView& acc, void* stream) {
  if (stream != nullptr) missing(*this, "zero fill on a side stream");
  zero(acc);
}
void Backend::fold_on(const TensorView& dst, const TensorView& src, void* stream) {
  if (stream != nullptr) missing(*this, "fold on a side stream");
  accumulate(dst, src);
  zero(src);
}

}  // namespace ringattn
