// CPU implementation of the pre-activation convolution ops conv2d(act(BN(x))) (schemas in ../fusedrect.cpp):
// the fused BatchNorm + act kernel into a scratch tensor, the framework's convolution (oneDNN), the scratch
// freed at once. Backward recomputes the activation into a scratch for the convolution's backward (input and
// weight gradients), frees it, then runs the fused BatchNorm + act backward on the activation's gradient,
// writing dx over it (no further input-sized allocation).
#include <ATen/Functions.h>
#include <torch/library.h>

#include "../bn_act_args.h"
#include "bn_act.h"

namespace fusedrect::cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

Tensor conv(const Tensor& a, const Tensor& conv_weight, const OptTensor& conv_bias, c10::IntArrayRef stride,
            c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  return at::convolution(a, conv_weight, conv_bias, stride, padding, dilation, false, {0, 0}, groups);
}

std::tuple<Tensor, Tensor, Tensor> preact_conv_fwd_train(const Tensor& input, const OptTensor& weight,
                                                         const OptTensor& bias, const OptTensor& slope, double eps,
                                                         const Tensor& conv_weight, const OptTensor& conv_bias,
                                                         c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                         c10::IntArrayRef dilation, int64_t groups) {
  auto [a, mean, invstd] = bn_act_fwd_train(input, weight, bias, slope, eps);
  return {conv(a, conv_weight, conv_bias, stride, padding, dilation, groups), mean, invstd};
}

Tensor preact_conv_fwd_eval(const Tensor& input, const Tensor& mean, const Tensor& invstd, const OptTensor& weight,
                            const OptTensor& bias, const OptTensor& slope, const Tensor& conv_weight,
                            const OptTensor& conv_bias, c10::IntArrayRef stride, c10::IntArrayRef padding,
                            c10::IntArrayRef dilation, int64_t groups) {
  const Tensor a = bn_act_fwd_eval(input, mean, invstd, weight, bias, slope);
  return conv(a, conv_weight, conv_bias, stride, padding, dilation, groups);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> preact_conv_bwd(
    const Tensor& grad_out, const Tensor& input, const Tensor& mean, const Tensor& invstd, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& slope, const Tensor& conv_weight, bool has_conv_bias,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups, bool batch_stats) {
  Tensor grad_a, grad_conv_weight;
  {
    const Tensor a = bn_act_fwd_eval(input, mean, invstd, weight, bias, slope);  // the recomputed activation
    std::tie(grad_a, grad_conv_weight, std::ignore) = at::convolution_backward(
        grad_out, a, conv_weight, std::nullopt, stride, padding, dilation, false, {0, 0}, groups,
        {true, true, false});
  }
  Tensor grad_conv_bias = has_conv_bias ? grad_out.sum({0, 2, 3}) : grad_out.new_empty({0});
  grad_a = in_layout_of(grad_a, input);  // a scratch of ours: dx is written over it
  auto [dx, dweight, dbias, dslope] =
      bn_act_bwd_into(grad_a, grad_a, input, mean, invstd, weight, bias, slope, batch_stats);
  return {dx, dweight, dbias, dslope, in_layout_of(grad_conv_weight, conv_weight), grad_conv_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedrect, CPU, m) {
  m.impl("preact_conv_fwd_train", &preact_conv_fwd_train);
  m.impl("preact_conv_fwd_eval", &preact_conv_fwd_eval);
  m.impl("preact_conv_bwd", &preact_conv_bwd);
}

}  // namespace fusedrect::cpu
