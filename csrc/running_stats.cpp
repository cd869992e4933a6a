// The running-statistics ops (schemas in fusedrect.cpp). The update of the training forward: for every device a
// few ATen ops on (C,) tensors (running_stats.h), in C++ so that a layer's forward pays one dispatcher call for
// it instead of eight Python ones (about 20 us on CPU); for contiguous CPU tensors one loop over the channels
// instead of those eight ops (about 10 us less per training forward), for CUDA tensors one kernel
// (cuda/running_stats.cu). fusedrect/reference.py's update_running_stats is the ground truth, bit for bit.
// The eval forward's invstd from the running variance: likewise one loop (CPU) or one kernel (CUDA) in place
// of a conversion, an add and an rsqrt, bit for bit as they round it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "running_stats.h"

namespace fusedrect {
namespace {

using at::Tensor;

// ATen's lerp as its vectorised CPU kernel computes it (in the buffer's opmath type).
template <typename T>
T lerp(T start, T end, T weight) {
  return std::abs(weight) < T(0.5) ? std::fma(weight, end - start, start)
                                   : std::fma(weight - T(1), end - start, end);
}

// The composite's arithmetic, rounding step by rounding step (bit for bit): the unbiased variance in the
// statistics dtype (as pow(-2), sub_, clamp_min_ and mul_ round it) stored before it is blended, so that the
// compiler cannot fuse its last multiply into lerp's subtraction; each batch value cast to the buffer's dtype
// (.to); lerp with the momentum as the composite passes it (a Scalar, or a tensor cast to the buffer's dtype).
// Writing through pointers, it bumps the buffers' version counters itself, as lerp_ does.
void bn_update_running_stats_cpu(const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                                 const Tensor& mean, const Tensor& invstd, double eps, int64_t count,
                                 double momentum, const std::optional<Tensor>& momentum_tensor) {
  const int64_t C = mean.numel();
  const bool has_tensor = momentum_tensor.has_value() && momentum_tensor->defined();
  const Tensor rm = running_mean.value_or(Tensor());
  const Tensor rv = running_var.value_or(Tensor());
  const at::Device cpu(at::kCPU);
  const auto plain = [&](const Tensor& t) { return !t.defined() || plain_vector(t, cpu, C); };
  // The composite takes everything else, and counts of 1 or less (it returns on 0 and raises on the rest).
  if (count <= 1 || !plain_vector(mean, cpu, C) || !plain_vector(invstd, cpu, C) || invstd.dtype() != mean.dtype() ||
      !(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble) || !plain(rm) || !plain(rv) ||
      !disjoint({&rm, &rv, &mean, &invstd}) ||
      (has_tensor && !(momentum_tensor->device().is_cpu() && momentum_tensor->numel() == 1 &&
                       momentum_tensor->is_floating_point()))) {
    return update_running_stats_composite(running_mean, running_var, mean, invstd, eps, count, momentum,
                                          momentum_tensor);
  }
  const double weight = has_tensor ? momentum_tensor->item<double>() : momentum;
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_update_running_stats", [&] {
    using stat_t = scalar_t;
    const auto blend = [&](const Tensor& running, const stat_t* batch) {
      if (!running.defined()) return;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(), "bn_update_running", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const opmath_t w = has_tensor ? opmath_t(scalar_t(weight)) : opmath_t(weight);
        scalar_t* r = running.mutable_data_ptr<scalar_t>();
        for (int64_t c = 0; c < C; ++c) r[c] = scalar_t(lerp(opmath_t(r[c]), opmath_t(scalar_t(batch[c])), w));
      });
      torch::autograd::impl::bump_version(running);
    };
    blend(rm, mean.const_data_ptr<stat_t>());
    if (rv.defined()) {
      const stat_t* istd = invstd.const_data_ptr<stat_t>();
      const stat_t unbias = stat_t(double(count) / double(count - 1));
      std::vector<stat_t> var(C);
      for (int64_t c = 0; c < C; ++c) {
        var[c] = std::max(stat_t(1) / (istd[c] * istd[c]) - stat_t(eps), stat_t(0)) * unbias;
      }
      blend(rv, var.data());
    }
  });
}

// invstd_c = 1 / sqrt(S(var_c) + S(eps)) in S = dtype: ATen's vectorised rsqrt is 1 / sqrt too, each step
// correctly rounded.
Tensor bn_invstd_cpu(const Tensor& var, double eps, at::ScalarType dtype) {
  if (!(dtype == at::kFloat || dtype == at::kDouble) || !at::isFloatingType(var.scalar_type()) ||
      !plain_vector(var, at::Device(at::kCPU), var.numel())) {
    return invstd_composite(var, eps, dtype);
  }
  const int64_t C = var.numel();
  Tensor out = at::empty({C}, var.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "bn_invstd", [&] {
    using S = scalar_t;
    S* o = out.mutable_data_ptr<S>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, var.scalar_type(), "bn_invstd", [&] {
      const scalar_t* v = var.const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) o[c] = S(1) / std::sqrt(S(v[c]) + S(eps));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedrect, CompositeExplicitAutograd, m) {
  m.impl("bn_update_running_stats", &update_running_stats_composite);
  m.impl("bn_invstd", &invstd_composite);
}

TORCH_LIBRARY_IMPL(fusedrect, CPU, m) {
  m.impl("bn_update_running_stats", &bn_update_running_stats_cpu);
  m.impl("bn_invstd", &bn_invstd_cpu);
}

}  // namespace fusedrect
