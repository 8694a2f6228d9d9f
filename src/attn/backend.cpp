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

void Backend::forward_step_into(const TensorView& k, const TensorView& v, const ChunkPositions& k_pos,
                                const TensorView& out, const TensorView& lse) {
  forward_step(k, v, k_pos);
  forward_end(out, lse);
}
void Backend::backward_begin(const TensorView&, const TensorView&, const TensorView&, const TensorView&,
                             const ChunkPositions&) {
  missing(*this, "backward pass");
}
void Backend::backward_step(const TensorView&, const TensorView&, const ChunkPositions&, const TensorView&,
                            const TensorView&) {
  missing(*this, "backward pass");
}
void Backend::backward_step_into(const TensorView& k, const TensorView& v, const ChunkPositions& k_pos,
                                 const TensorView& dk_out, const TensorView& dv_out) {
  const bool wide = dk_out.dtype == DType::kF32 || dk_out.dtype == DType::kF64;
  if (!wide || dv_out.dtype != dk_out.dtype) missing(*this, "backward step into rounded dK/dV");
  zero(dk_out);
  zero(dv_out);
  backward_step(k, v, k_pos, dk_out, dv_out);
}
void Backend::backward_end(const TensorView&) { missing(*this, "backward pass"); }
void Backend::cast_accumulator(const TensorView&, const TensorView&) { missing(*this, "accumulator cast"); }
void Backend::cast_accumulator_sum(const TensorView& acc, const TensorView& addend, const TensorView& dst) {
  accumulate(acc, addend);
  cast_accumulator(acc, dst);
}
void Backend::zero(const TensorView&) { missing(*this, "zero fill"); }
void Backend::accumulate(const TensorView&, const TensorView&) { missing(*this, "accumulate"); }
void Backend::fold_on(const TensorView& dst, const TensorView& src, void* stream) {
  if (stream != nullptr) missing(*this, "fold on a side stream");
  accumulate(dst, src);
}

}  // namespace ringattn
