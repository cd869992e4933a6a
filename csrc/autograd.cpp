// Autograd of the forward ops (bn_act_fwd_train/_eval, preact_conv_fwd_train/_eval), registered in C++ for
// every device so that a training step pays no Python per layer and op: the Python custom-op autograd wrapper
// (torch.library.register_autograd) cost about 15 us per forward and 25 us per backward call on CPU, as much
// as the whole kernel at the small ResNet stages. Forward and backward call the ops through the dispatcher, so
// each device runs its own kernel (the CPU kernels of csrc/cpu, the CUDA router of csrc/cuda/router.cpp).
//
// Saved for backward: the input x, the per-channel statistics and the parameters; never the activation.
// Backward recomputes it in the backward op (with given statistics and no parameter gradient needed, in the
// elementwise op alone: frozen_input_grad). The backward ops have no derivative: their Python autograd
// (fusedrect/ops) raises on a second-order gradient, so backward calls them below autograd unless it builds a
// graph (create_graph=True).
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "bn_act_args.h"
#include "op_handles.h"

namespace fusedrect {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;
using op_signatures::BnBwdSig;
using op_signatures::BnElemtSig;
using op_signatures::BnEvalSig;
using op_signatures::BnTrainSig;
using op_signatures::ConvBwdSig;
using op_signatures::ConvEvalSig;
using op_signatures::ConvTrainSig;

// Where backward calls the backward ops: below autograd, unless a graph of the backward is being built.
struct BackwardDispatch {
  std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
  BackwardDispatch() {
    if (!at::GradMode::is_enabled()) below_autograd.emplace();
  }
};

Tensor or_undefined(const OptTensor& t) { return t.value_or(Tensor()); }
OptTensor optional(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// A per-channel gradient (fp32/fp64) in its parameter's dtype; a slope shared by every channel gets the sum of
// the per-channel gradients. Undefined where the parameter is absent or needs no gradient.
Tensor param_grad(const Tensor& grad, const Tensor& param) {
  if (!param.defined() || !param.requires_grad()) return Tensor();
  const Tensor g = grad.sym_numel() == param.sym_numel() ? grad : grad.sum().reshape_symint(param.sym_sizes());
  return g.to(param.scalar_type());
}

// The BatchNorm ops' saved state: (x, mean, invstd, weight, bias, slope) and batch_stats (save_conv saves the same
// and conv_weight: save_for_backward runs once per node).
void save_bn(AutogradContext* ctx, const Tensor& x, const Tensor& mean, const Tensor& invstd, const OptTensor& weight,
             const OptTensor& bias, const OptTensor& slope, bool batch_stats) {
  ctx->save_for_backward({x, mean, invstd, or_undefined(weight), or_undefined(bias), or_undefined(slope)});
  ctx->saved_data["batch_stats"] = batch_stats;
}

// Gradients of (x, weight, bias, slope) from the backward op's (dx, dweight, dbias, dslope).
template <typename Grads>
std::array<Tensor, 4> bn_grads(const variable_list& saved, const Grads& grads) {
  return {std::get<0>(grads), param_grad(std::get<1>(grads), saved[3]), param_grad(std::get<2>(grads), saved[4]),
          param_grad(std::get<3>(grads), saved[5])};
}

// Gradients of (x, weight, bias, slope) from the saved tensors s (unpacked once per backward: saved-tensor hooks
// such as non-reentrant checkpointing allow no second unpack).
std::array<Tensor, 4> bn_backward(AutogradContext* ctx, const variable_list& s, const Tensor& grad_y) {
  static const auto bwd = op<BnBwdSig>("fusedrect::bn_act_bwd");
  const BackwardDispatch dispatch;
  const auto grads = bwd.call(in_layout_of(grad_y, s[0]), s[0], s[1], s[2], optional(s[3]), optional(s[4]),
                              optional(s[5]), ctx->saved_data["batch_stats"].toBool());
  return bn_grads(s, grads);
}

// Whether this backward needs a gradient of weight, bias or slope (saved 3 to 5). The node's inputs are the
// tensor arguments given, in order: x, mean, invstd, then those of the three that are not None.
bool params_need_grad(AutogradContext* ctx, const variable_list& s) {
  size_t input = 3;
  for (size_t i = 3; i < 6; ++i) {
    if (s[i].defined() && ctx->needs_input_grad(input++)) return true;
  }
  return false;
}

// The gradient of x alone, for given statistics where no parameter needs a gradient (a frozen BatchNorm):
// dx = gamma * invstd * dz, one pass over (x, dy) instead of two, as the backward op's first pass only sums the
// parameters' gradients. It is the elementwise half of the SyncBN backward with zero sums (their terms vanish).
// Undefined where backward builds a graph (the backward op then raises at the second order) and under symbolic
// shapes (torch.compile with dynamic shapes), where the element count is not a number.
Tensor frozen_input_grad(const variable_list& s, const Tensor& grad_y) {
  static const auto elemt = op<BnElemtSig>("fusedrect::bn_act_bwd_elemt");
  if (at::GradMode::is_enabled()) return Tensor();
  const Tensor& x = s[0];
  if (x.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) return Tensor();
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Tensor zeros = at::zeros_like(s[2]);
  int64_t count = x.size(0);  // elements per channel, N * S (x.numel() / C fails where C == 0)
  for (int64_t d = 2; d < x.dim(); ++d) count *= x.size(d);
  return elemt.call(in_layout_of(grad_y, x), x, s[1], s[2], optional(s[3]), optional(s[4]), optional(s[5]), zeros,
                    zeros, count);
}

struct BnActTrain : torch::autograd::Function<BnActTrain> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                               const OptTensor& slope, double eps) {
    static const auto fwd = op<BnTrainSig>("fusedrect::bn_act_fwd_train");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, invstd] = fwd.call(x, weight, bias, slope, eps);
    save_bn(ctx, x, mean, invstd, weight, bias, slope, true);
    ctx->mark_non_differentiable({mean, invstd});
    ctx->set_materialize_grads(false);  // no zero-filled gradients for mean and invstd (two ops per step)
    return {y, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(5);  // no gradient reached y: none for the inputs
    auto [dx, dweight, dbias, dslope] = bn_backward(ctx, ctx->get_saved_variables(), grads[0]);
    return {dx, dweight, dbias, dslope, Tensor()};
  }
};

struct BnActEval : torch::autograd::Function<BnActEval> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& mean, const Tensor& invstd,
                               const OptTensor& weight, const OptTensor& bias, const OptTensor& slope) {
    static const auto fwd = op<BnEvalSig>("fusedrect::bn_act_fwd_eval");
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor y = fwd.call(x, mean, invstd, weight, bias, slope);
    save_bn(ctx, x, mean, invstd, weight, bias, slope, false);
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    if (!params_need_grad(ctx, saved)) {
      Tensor dx = frozen_input_grad(saved, grads[0]);
      if (dx.defined()) return {dx, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    }
    auto [dx, dweight, dbias, dslope] = bn_backward(ctx, saved, grads[0]);
    return {dx, Tensor(), Tensor(), dweight, dbias, dslope};
  }
};

// The convolution part: saves conv_weight after the BatchNorm tensors, and the geometry.
void save_conv(AutogradContext* ctx, const Tensor& x, const Tensor& mean, const Tensor& invstd,
               const OptTensor& weight, const OptTensor& bias, const OptTensor& slope, const Tensor& conv_weight,
               const OptTensor& conv_bias, c10::IntArrayRef stride, c10::IntArrayRef padding,
               c10::IntArrayRef dilation, int64_t groups, bool batch_stats) {
  ctx->save_for_backward({x, mean, invstd, or_undefined(weight), or_undefined(bias), or_undefined(slope), conv_weight});
  ctx->saved_data["batch_stats"] = batch_stats;
  ctx->saved_data["has_conv_bias"] = conv_bias.has_value() && conv_bias->defined();
  ctx->saved_data["stride"] = stride.vec();
  ctx->saved_data["padding"] = padding.vec();
  ctx->saved_data["dilation"] = dilation.vec();
  ctx->saved_data["groups"] = groups;
}

// Gradients of (x, weight, bias, slope, conv_weight, conv_bias).
std::array<Tensor, 6> conv_backward(AutogradContext* ctx, const Tensor& grad_out) {
  static const auto bwd = op<ConvBwdSig>("fusedrect::preact_conv_bwd");
  const variable_list s = ctx->get_saved_variables();
  auto& data = ctx->saved_data;
  const bool has_conv_bias = data["has_conv_bias"].toBool();
  const BackwardDispatch dispatch;
  const auto grads = bwd.call(grad_out, s[0], s[1], s[2], optional(s[3]), optional(s[4]), optional(s[5]), s[6],
                              has_conv_bias, data["stride"].toIntVector(), data["padding"].toIntVector(),
                              data["dilation"].toIntVector(), data["groups"].toInt(), data["batch_stats"].toBool());
  const auto g = bn_grads(s, grads);
  return {g[0], g[1], g[2], g[3], std::get<4>(grads), has_conv_bias ? std::get<5>(grads) : Tensor()};
}

struct PreActConvTrain : torch::autograd::Function<PreActConvTrain> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                               const OptTensor& slope, double eps, const Tensor& conv_weight,
                               const OptTensor& conv_bias, c10::IntArrayRef stride, c10::IntArrayRef padding,
                               c10::IntArrayRef dilation, int64_t groups) {
    static const auto fwd = op<ConvTrainSig>("fusedrect::preact_conv_fwd_train");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, invstd] =
        fwd.call(x, weight, bias, slope, eps, conv_weight, conv_bias, stride, padding, dilation, groups);
    save_conv(ctx, x, mean, invstd, weight, bias, slope, conv_weight, conv_bias, stride, padding, dilation, groups,
              true);
    ctx->mark_non_differentiable({mean, invstd});
    ctx->set_materialize_grads(false);  // as BnActTrain
    return {out, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(11);
    const auto g = conv_backward(ctx, grads[0]);
    return {g[0], g[1], g[2], g[3], Tensor(), g[4], g[5], Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

struct PreActConvEval : torch::autograd::Function<PreActConvEval> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& mean, const Tensor& invstd,
                               const OptTensor& weight, const OptTensor& bias, const OptTensor& slope,
                               const Tensor& conv_weight, const OptTensor& conv_bias, c10::IntArrayRef stride,
                               c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
    static const auto fwd = op<ConvEvalSig>("fusedrect::preact_conv_fwd_eval");
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = fwd.call(x, mean, invstd, weight, bias, slope, conv_weight, conv_bias, stride, padding, dilation,
                          groups);
    save_conv(ctx, x, mean, invstd, weight, bias, slope, conv_weight, conv_bias, stride, padding, dilation, groups,
              false);
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto g = conv_backward(ctx, grads[0]);
    return {g[0], Tensor(), Tensor(), g[1], g[2], g[3], g[4], g[5], Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> bn_act_fwd_train(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                                    const OptTensor& slope, double eps) {
  const auto out = BnActTrain::apply(x, weight, bias, slope, eps);
  return {out[0], out[1], out[2]};
}

Tensor bn_act_fwd_eval(const Tensor& x, const Tensor& mean, const Tensor& invstd, const OptTensor& weight,
                       const OptTensor& bias, const OptTensor& slope) {
  return BnActEval::apply(x, mean, invstd, weight, bias, slope)[0];
}

std::tuple<Tensor, Tensor, Tensor> preact_conv_fwd_train(const Tensor& x, const OptTensor& weight,
                                                         const OptTensor& bias, const OptTensor& slope, double eps,
                                                         const Tensor& conv_weight, const OptTensor& conv_bias,
                                                         c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                         c10::IntArrayRef dilation, int64_t groups) {
  const auto out = PreActConvTrain::apply(x, weight, bias, slope, eps, conv_weight, conv_bias, stride, padding,
                                          dilation, groups);
  return {out[0], out[1], out[2]};
}

Tensor preact_conv_fwd_eval(const Tensor& x, const Tensor& mean, const Tensor& invstd, const OptTensor& weight,
                            const OptTensor& bias, const OptTensor& slope, const Tensor& conv_weight,
                            const OptTensor& conv_bias, c10::IntArrayRef stride, c10::IntArrayRef padding,
                            c10::IntArrayRef dilation, int64_t groups) {
  return PreActConvEval::apply(x, mean, invstd, weight, bias, slope, conv_weight, conv_bias, stride, padding,
                               dilation, groups)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedrect, Autograd, m) {
  m.impl("bn_act_fwd_train", &bn_act_fwd_train);
  m.impl("bn_act_fwd_eval", &bn_act_fwd_eval);
  m.impl("preact_conv_fwd_train", &preact_conv_fwd_train);
  m.impl("preact_conv_fwd_eval", &preact_conv_fwd_eval);
}

}  // namespace fusedrect
