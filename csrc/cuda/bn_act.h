// The CUDA C++ implementations of the BatchNorm + ReLU/PReLU ops (the `cuda` backend), one host function per
// op with the op's schema (csrc/fusedrect.cpp). The ops' CUDA kernels (router.cpp) run them unless
// FUSEDRECT_BACKEND names triton; Python reaches them directly as `fusedrect._C.cuda.<op name>`.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fusedrect::cuda {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

std::tuple<Tensor, Tensor, Tensor> bn_act_fwd_train(const Tensor& input, const OptTensor& weight,
                                                    const OptTensor& bias, const OptTensor& slope, double eps);

Tensor bn_act_fwd_eval(const Tensor& input, const Tensor& mean, const Tensor& invstd, const OptTensor& weight,
                       const OptTensor& bias, const OptTensor& slope);

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_bwd(const Tensor& grad_out, const Tensor& input,
                                                      const Tensor& mean, const Tensor& invstd,
                                                      const OptTensor& weight, const OptTensor& bias,
                                                      const OptTensor& slope, bool batch_stats);

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_bwd_from_output(const Tensor& grad_out, const Tensor& output,
                                                                  const Tensor& invstd, const OptTensor& weight,
                                                                  const OptTensor& bias, const Tensor& slope);

std::tuple<Tensor, Tensor> bn_stats(const Tensor& input);

std::tuple<Tensor, Tensor, Tensor> bn_act_bwd_reduce(const Tensor& grad_out, const Tensor& input,
                                                     const Tensor& mean, const Tensor& invstd,
                                                     const OptTensor& weight, const OptTensor& bias,
                                                     const OptTensor& slope);

Tensor bn_act_bwd_elemt(const Tensor& grad_out, const Tensor& input, const Tensor& mean, const Tensor& invstd,
                        const OptTensor& weight, const OptTensor& bias, const OptTensor& slope,
                        const Tensor& sum_dz, const Tensor& sum_dz_xhat, int64_t count);

int runtime_version();  // CUDART_VERSION of the toolkit this was compiled with

}  // namespace fusedrect::cuda
