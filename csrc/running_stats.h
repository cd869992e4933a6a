// What the running-statistics ops share between devices (running_stats.cpp, cuda/running_stats.cu): the
// composites of ATen ops that every device can run, and the tests of what the one-pass kernels can take.
//   update:  running_mean = lerp(running_mean, mean, momentum)
//            running_var  = lerp(running_var, max(1 / invstd^2 - eps, 0) * count / (count - 1), momentum)
//   invstd:  1 / sqrt(var + eps)
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <initializer_list>
#include <iterator>
#include <optional>

namespace fusedrect {

// Whether t holds n values (under torch.compile's dynamic shapes n may be symbolic: the comparison then guards).
inline bool holds(const at::Tensor& t, const c10::SymInt& n) { return t.sym_numel() == n; }

// fusedrect/reference.py's update_running_stats in ATen ops: returns on count 0, raises on count 1. Every tensor
// holds one value per channel of mean (lerp_ would broadcast a single value over them), momentum_tensor one.
inline void update_running_stats_composite(const std::optional<at::Tensor>& running_mean,
                                           const std::optional<at::Tensor>& running_var, const at::Tensor& mean,
                                           const at::Tensor& invstd, double eps, int64_t count, double momentum,
                                           const std::optional<at::Tensor>& momentum_tensor) {
  const c10::SymInt C = mean.sym_numel();
  const auto check_channels = [&](const std::optional<at::Tensor>& t, const char* name) {
    TORCH_CHECK_VALUE(!t.has_value() || !t->defined() || holds(*t, C), name, ": expected ", C,
                      " values (one per channel, as mean), got ", t->sym_numel());
  };
  check_channels(invstd, "invstd");
  check_channels(running_mean, "running_mean");
  check_channels(running_var, "running_var");
  TORCH_CHECK_VALUE(!momentum_tensor.has_value() || !momentum_tensor->defined() || holds(*momentum_tensor, 1),
                    "momentum_tensor: expected one value, got ", momentum_tensor->sym_numel());
  if (count == 0) return;
  TORCH_CHECK(count > 1, "count: expected more than 1 value per channel to update the running variance, got ",
              count);
  const at::NoGradGuard no_grad;
  const auto blend = [&](const at::Tensor& running, const at::Tensor& batch) {
    const at::Tensor b = batch.to(running.scalar_type());
    if (momentum_tensor.has_value() && momentum_tensor->defined()) {
      running.lerp_(b, momentum_tensor->to(running.scalar_type()).reshape({}));
    } else {
      running.lerp_(b, momentum);
    }
  };
  if (running_mean.has_value() && running_mean->defined()) blend(*running_mean, mean);
  if (running_var.has_value() && running_var->defined()) {
    blend(*running_var, invstd.pow(-2).sub_(eps).clamp_min_(0).mul_(double(count) / double(count - 1)));
  }
}

// bn_invstd: (var.to(dtype) + eps).rsqrt_(), dtype float or double.
inline at::Tensor invstd_composite(const at::Tensor& var, double eps, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble, "dtype: expected float32 or float64, got ", dtype);
  TORCH_CHECK_TYPE(at::isFloatingType(var.scalar_type()), "var: expected a floating-point tensor, got ",
                   var.scalar_type());
  const at::NoGradGuard no_grad;
  return var.to(dtype).add(eps).rsqrt_();
}

// A contiguous (numel,) tensor on `device`: what the one-pass kernels walk.
inline bool plain_vector(const at::Tensor& t, const at::Device& device, int64_t numel) {
  return t.device() == device && t.dim() == 1 && t.is_contiguous() && t.numel() == numel;
}

// No two of the defined tensors share memory.
inline bool disjoint(std::initializer_list<const at::Tensor*> tensors) {
  for (auto a = tensors.begin(); a != tensors.end(); ++a) {
    for (auto b = std::next(a); b != tensors.end(); ++b) {
      if ((*a)->defined() && (*b)->defined() && at::get_overlap_status(**a, **b) != at::MemOverlapStatus::No) {
        return false;
      }
    }
  }
  return true;
}

}  // namespace fusedrect
