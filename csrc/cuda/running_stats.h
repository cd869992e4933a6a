// The CUDA implementations of bn_update_running_stats and bn_invstd (registered with the dispatcher for CUDA
// tensors in running_stats.cu; schemas in ../fusedrect.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fusedrect::cuda {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

void bn_update_running_stats(const OptTensor& running_mean, const OptTensor& running_var, const Tensor& mean,
                             const Tensor& invstd, double eps, int64_t count, double momentum,
                             const OptTensor& momentum_tensor);

Tensor bn_invstd(const Tensor& var, double eps, at::ScalarType dtype);

}  // namespace fusedrect::cuda
