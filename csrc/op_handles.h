// Typed dispatcher handles of the extension's own ops, for the C++ code that calls them through the dispatcher,
// so that each device runs its own kernel and the op's autograd applies: the forward ops' autograd (autograd.cpp)
// and the eval composite (eval_running.cpp). The signatures follow the schemas in fusedrect.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace fusedrect {

// The typed dispatcher handle of the op `name` ("fusedrect::<op>").
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

namespace op_signatures {

using at::Tensor;
using c10::IntArrayRef;
using OptTensor = std::optional<Tensor>;

using BnTrainSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&,
                                                      const OptTensor&, double);
using BnEvalSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                         const OptTensor&);
using BnInvstdSig = Tensor(const Tensor&, double, at::ScalarType);
using BnBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                            const Tensor&, const OptTensor&, const OptTensor&,
                                                            const OptTensor&, bool);
using BnElemtSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                          const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, int64_t);
using ConvTrainSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&,
                                                        const OptTensor&, double, const Tensor&, const OptTensor&,
                                                        IntArrayRef, IntArrayRef, IntArrayRef, int64_t);
using ConvEvalSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                           const OptTensor&, const Tensor&, const OptTensor&, IntArrayRef, IntArrayRef, IntArrayRef,
                           int64_t);
using ConvBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, const Tensor&, bool, IntArrayRef, IntArrayRef, IntArrayRef, int64_t, bool);

}  // namespace op_signatures
}  // namespace fusedrect
