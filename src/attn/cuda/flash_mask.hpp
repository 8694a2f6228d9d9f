// The kernels' compile-time mask classes and the choice between them (host and device).
#pragma once

#include "ringattn/mask.hpp"

namespace ringattn::cuda {

// What a kernel instantiation knows about the mask at compile time.
//  kCausal:  dense or causal, chosen by the runtime flag `causal` of the params: today's kernels,
//            whose code the masked instantiations leave as it was.
//  kGeneral: any Mask (windows, strides, global tokens, documents, per-head patterns, combined with
//            the causal rule): tiles are classified with ringattn::classify, empty tiles skipped,
//            partial tiles apply ringattn::visible per element, full tiles run mask-free.
enum class MaskClass { kCausal, kGeneral };

// The class a mask needs: kCausal when it has neither documents nor patterns.
inline MaskClass mask_class(const Mask& m) {
  return m.doc_offsets == nullptr && !m.has_pattern() ? MaskClass::kCausal : MaskClass::kGeneral;
}

}  // namespace ringattn::cuda
