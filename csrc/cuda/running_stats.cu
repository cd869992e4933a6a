// The running-statistics ops on CUDA tensors, one kernel each instead of the composites' ATen launches (the
// host time of a layer on a GPU is mostly launches). bn_update_running_stats (six launches), per channel c in
// the composite's roundings:
//   var_c = max(1 / invstd_c^2 - eps, 0) * count / (count - 1)   in the statistics dtype, each step rounded
//   running_mean_c = lerp(running_mean_c, mean_c, w),  running_var_c = lerp(running_var_c, var_c, w)
// with ATen's lerp, and w the momentum, or the momentum tensor's value read on the device (no host sync).
// Per-channel tensors that are not plain vectors on one device take the composite (../running_stats.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/native/Lerp.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../running_stats.h"
#include "running_stats.h"

namespace fusedrect::cuda {
namespace {

constexpr int kThreads = 256;

// Products rounded on their own: the compiler may not fuse them into the next addition (the composite rounds
// the variance before lerp reads it).
__device__ __forceinline__ float mul_rounded(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rounded(double a, double b) { return __dmul_rn(a, b); }

template <typename R, typename S>
__global__ void running_stats_kernel(R* running_mean, R* running_var, const S* mean, const S* invstd,
                                     const R* momentum_tensor, double momentum, S eps, S unbias, int64_t C) {
  using opmath_t = at::opmath_type<R>;
  const opmath_t w = momentum_tensor != nullptr ? opmath_t(*momentum_tensor) : opmath_t(momentum);
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C; c += int64_t(gridDim.x) * blockDim.x) {
    if (running_mean != nullptr) running_mean[c] = at::native::lerp(running_mean[c], R(mean[c]), w);
    if (running_var != nullptr) {
      S var = S(1) / (invstd[c] * invstd[c]) - eps;
      var = var < S(0) ? S(0) : var;  // clamp_min: NaN stays NaN
      running_var[c] = at::native::lerp(running_var[c], R(mul_rounded(var, unbias)), w);
    }
  }
}

// bn_invstd (three launches): invstd_c = 1 / sqrt(S(var_c) + S(eps)), each step correctly rounded as on the CPU
// (ATen's CUDA rsqrt is rsqrtf, within 2 ulp): the same bits on both devices.
template <typename V, typename S>
__global__ void invstd_kernel(const V* var, S eps, S* out, int64_t C) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C; c += int64_t(gridDim.x) * blockDim.x) {
    out[c] = S(1) / std::sqrt(S(var[c]) + eps);
  }
}

int blocks_for(int64_t C) { return int(std::clamp<int64_t>((C + kThreads - 1) / kThreads, 1, 1024)); }

}  // namespace

void bn_update_running_stats(const OptTensor& running_mean, const OptTensor& running_var, const Tensor& mean,
                             const Tensor& invstd, double eps, int64_t count, double momentum,
                             const OptTensor& momentum_tensor) {
  const int64_t C = mean.numel();
  const at::Device device = mean.device();
  const Tensor rm = running_mean.value_or(Tensor());
  const Tensor rv = running_var.value_or(Tensor());
  const Tensor weight = momentum_tensor.value_or(Tensor());
  const auto running_ok = [&](const Tensor& t) {
    return !t.defined() || (plain_vector(t, device, C) && at::isFloatingType(t.scalar_type()));
  };
  // The composite takes everything else, and counts of 1 or less (it returns on 0 and raises on the rest).
  if (count <= 1 || !(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble) ||
      !plain_vector(mean, device, C) || !plain_vector(invstd, device, C) || invstd.dtype() != mean.dtype() ||
      !running_ok(rm) || !running_ok(rv) || (rm.defined() && rv.defined() && rm.dtype() != rv.dtype()) ||
      !disjoint({&rm, &rv, &mean, &invstd}) ||
      (weight.defined() && !(weight.device() == device && weight.numel() == 1 && weight.is_floating_point()))) {
    return update_running_stats_composite(running_mean, running_var, mean, invstd, eps, count, momentum,
                                          momentum_tensor);
  }
  if (!rm.defined() && !rv.defined()) return;
  const c10::cuda::CUDAGuard guard(mean.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto running_dtype = (rm.defined() ? rm : rv).scalar_type();
  const int blocks = blocks_for(C);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_update_running_stats", [&] {
    using S = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_dtype, "bn_update_running_stats", [&] {
      using R = scalar_t;
      const Tensor w = weight.defined() ? weight.to(running_dtype) : Tensor();  // as the composite casts it
      running_stats_kernel<R, S><<<blocks, kThreads, 0, stream>>>(
          rm.defined() ? rm.mutable_data_ptr<R>() : nullptr, rv.defined() ? rv.mutable_data_ptr<R>() : nullptr,
          mean.const_data_ptr<S>(), invstd.const_data_ptr<S>(), w.defined() ? w.const_data_ptr<R>() : nullptr,
          momentum, S(eps), S(double(count) / double(count - 1)), C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  for (const Tensor* t : {&rm, &rv}) {
    if (t->defined()) torch::autograd::impl::bump_version(*t);  // written through pointers, as lerp_ would
  }
}

Tensor bn_invstd(const Tensor& var, double eps, at::ScalarType dtype) {
  if (!(dtype == at::kFloat || dtype == at::kDouble) || !at::isFloatingType(var.scalar_type()) ||
      !plain_vector(var, var.device(), var.numel())) {
    return invstd_composite(var, eps, dtype);
  }
  const int64_t C = var.numel();
  Tensor out = at::empty({C}, var.options().dtype(dtype));
  if (C == 0) return out;
  const c10::cuda::CUDAGuard guard(var.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(dtype, "bn_invstd", [&] {
    using S = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, var.scalar_type(), "bn_invstd", [&] {
      invstd_kernel<scalar_t, S><<<blocks_for(C), kThreads, 0, stream>>>(var.const_data_ptr<scalar_t>(), S(eps),
                                                                         out.mutable_data_ptr<S>(), C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(fusedrect, CUDA, m) {
  m.impl("bn_update_running_stats", &bn_update_running_stats);
  m.impl("bn_invstd", &bn_invstd);
}

}  // namespace fusedrect::cuda
