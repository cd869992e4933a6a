// The CPU kernels of the BatchNorm + ReLU/PReLU ops that other CPU ops build on (the pre-activation
// convolution, preact_conv.cpp). Signatures and semantics: the op schemas in ../fusedrect.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fusedrect::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_fwd_train(const at::Tensor& input,
                                                                const std::optional<at::Tensor>& weight,
                                                                const std::optional<at::Tensor>& bias,
                                                                const std::optional<at::Tensor>& slope, double eps);

at::Tensor bn_act_fwd_eval(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                           const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& slope);

// bn_act_bwd writing grad_input into `dx_out` (the input's shape, dtype and layout; it may be grad_out itself,
// whose elements are each read before they are written): saves an input-sized allocation where the caller owns
// a dead buffer, as the pre-activation convolution's backward does.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_bwd_into(
    const at::Tensor& dx_out, const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& slope, bool batch_stats);

}  // namespace fusedrect::cpu
