// bn_act_fwd_eval_running (schema in fusedrect.cpp): the eval forward from the running statistics in one call,
// a composite of bn_invstd and bn_act_fwd_eval through the dispatcher, so each device runs its own kernels and
// the eval op's autograd (autograd.cpp) applies. One Python call per eval layer instead of two (about 2 us of a
// small layer's 12 on CPU; on a GPU one op's Python and dispatch).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <utility>

#include "bn_act_args.h"
#include "op_handles.h"
#include "running_stats.h"

namespace fusedrect {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

Tensor bn_act_fwd_eval_running(const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
                               double eps, const OptTensor& weight, const OptTensor& bias, const OptTensor& slope) {
  static const auto invstd_op = op<op_signatures::BnInvstdSig>("fusedrect::bn_invstd");
  static const auto eval_op = op<op_signatures::BnEvalSig>("fusedrect::bn_act_fwd_eval");
  if (input.dim() >= 2) {  // else bn_act_fwd_eval names what is wrong with input
    const c10::SymInt C = input.sym_size(1);
    for (const auto& [t, name] : {std::pair{&running_mean, "running_mean"}, std::pair{&running_var, "running_var"}}) {
      TORCH_CHECK_VALUE(t->dim() == 1 && holds(*t, C), name, ": expected shape (", C, ",), one value per channel of "
                        "input, got ", t->sym_sizes());
    }
  }
  const at::ScalarType dtype = stats_dtype(input);
  const Tensor mean = running_mean.scalar_type() == dtype ? running_mean : running_mean.to(dtype);
  return eval_op.call(input, mean, invstd_op.call(running_var, eps, dtype), weight, bias, slope);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedrect, CompositeImplicitAutograd, m) {
  m.impl("bn_act_fwd_eval_running", &bn_act_fwd_eval_running);
}

}  // namespace fusedrect
