// The ops of the `cuda` backend (bn_act.h): the CPU ops' argument checks (../bn_act_args.h), outputs allocated
// as the CPU ops allocate them, then the kernels (launch.h) on the current stream, under a guard of the input's
// device. Per channel c over its M elements (as fusedrect/reference.py):
//   forward   z = (x - mean) * scale + beta,  scale = gamma * invstd,  y = z > 0 ? z : a * z  (ReLU: a = 0)
//   backward  dz = dy * (z > 0 ? 1 : a),  dbeta = sum dz,  dgamma = invstd * sum dz * (x - mean),
//             da = sum dy * min(z, 0),  dx = scale * dz + B * (x - mean) + D, with B = -scale * invstd * dgamma / M
//             and D = -scale * dbeta / M when the batch statistics were used (else 0).
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>

#include <cmath>

#include "bn_act.h"
#include "launch.h"

namespace fusedrect::cuda {
namespace {

void check_cuda(const Tensor& input, const char* name) {
  TORCH_CHECK(input.is_cuda(), name, ": expected a CUDA tensor, got one on ", input.device());
}

// `t` (where given) must be on the input's device.
void check_device(const OptTensor& t, const Tensor& input, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->device() == input.device(), name, ": expected a tensor on ", input.device(),
              " (the input's device), got ", t->device());
}

// The checks every op makes of its data tensor and per-channel arguments; returns the geometry.
Geometry check_args(const Tensor& input, const char* name, const OptTensor& mean, const OptTensor& invstd,
                    const OptTensor& weight, const OptTensor& bias, const OptTensor& slope) {
  check_floating(input, name);
  check_cuda(input, name);
  check_device(mean, input, "mean");
  check_device(invstd, input, "invstd");
  check_device(weight, input, "weight");
  check_device(bias, input, "bias");
  check_device(slope, input, "slope");
  return geometry_of(input, name);
}

Mode mode_of(const ChannelArgs& args) { return args.slope.defined() ? Mode::kPReLU : Mode::kReLU; }

Tensor per_channel_empty(const Tensor& input, int64_t C) {
  return at::empty({C}, input.options().dtype(stats_dtype(input)));
}

Tensor table_for(const Tensor& input, int64_t C) {
  return at::empty({kRows, C}, input.options().dtype(stats_dtype(input)));
}

// (grad_input, grad_weight, grad_bias, grad_slope) of bn_act_bwd and bn_act_bwd_from_output.
std::tuple<Tensor, Tensor, Tensor, Tensor> backward(const Geometry& geo, const Tensor& grad_out,
                                                    const Tensor& input, const ChannelArgs& args, Mode mode,
                                                    bool batch_stats) {
  const int64_t C = geo.C;
  const auto options = args.invstd.options();
  if (input.numel() == 0) {
    return {at::empty_like(input), at::zeros({C}, options), at::zeros({C}, options),
            at::zeros({is_prelu(mode) ? C : 0}, options)};
  }
  const Tensor table = table_for(input, C);
  channel_table(args, C, table);
  Tensor grad_weight = at::empty({C}, options);
  Tensor grad_bias = at::empty({C}, options);
  Tensor grad_slope = at::empty({is_prelu(mode) ? C : 0}, options);
  backward_sums(geo, grad_out, input, table, mode, args.invstd, grad_weight, grad_bias,
                is_prelu(mode) ? grad_slope : Tensor(), batch_stats);
  Tensor grad_in = at::empty_like(input);
  grad_input(geo, grad_out, input, table, mode, grad_in);
  return {grad_in, grad_weight, grad_bias, grad_slope};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> bn_act_fwd_train(const Tensor& input, const OptTensor& weight,
                                                    const OptTensor& bias, const OptTensor& slope, double eps) {
  const Geometry geo = check_args(input, "input", std::nullopt, std::nullopt, weight, bias, slope);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t C = geo.C;
  ChannelArgs args(C, stats_dtype(input), std::nullopt, std::nullopt, weight, bias, slope);
  Tensor out = at::empty_like(input);
  if (input.numel() == 0) {  // an empty batch: mean 0, var 0 (never used to update running statistics)
    const auto options = input.options().dtype(stats_dtype(input));
    return {out, at::zeros({C}, options), at::full({C}, 1.0 / std::sqrt(eps), options)};
  }
  args.mean = per_channel_empty(input, C);
  args.invstd = per_channel_empty(input, C);
  const Tensor table = table_for(input, C);
  batch_stats(geo, input, eps, /*want_var=*/false, args.mean, args.invstd, &args, table);
  apply(geo, input, table, args.slope.defined(), out);
  return {out, args.mean, args.invstd};
}

Tensor bn_act_fwd_eval(const Tensor& input, const Tensor& mean, const Tensor& invstd, const OptTensor& weight,
                       const OptTensor& bias, const OptTensor& slope) {
  const Geometry geo = check_args(input, "input", mean, invstd, weight, bias, slope);
  const c10::cuda::CUDAGuard guard(input.device());
  const ChannelArgs args(geo.C, stats_dtype(input), mean, invstd, weight, bias, slope);
  Tensor out = at::empty_like(input);
  if (input.numel() == 0) return out;
  apply_given(geo, input, args, out);
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_bwd(const Tensor& grad_out, const Tensor& input,
                                                      const Tensor& mean, const Tensor& invstd,
                                                      const OptTensor& weight, const OptTensor& bias,
                                                      const OptTensor& slope, bool batch_stats) {
  const Geometry geo = check_args(input, "input", mean, invstd, weight, bias, slope);
  check_grad_out(grad_out, "grad_out", input, "input", geo);
  check_device(grad_out, input, "grad_out");
  const c10::cuda::CUDAGuard guard(input.device());
  const ChannelArgs args(geo.C, stats_dtype(input), mean, invstd, weight, bias, slope);
  return backward(geo, grad_out, input, args, mode_of(args), batch_stats);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_bwd_from_output(const Tensor& grad_out, const Tensor& output,
                                                                  const Tensor& invstd, const OptTensor& weight,
                                                                  const OptTensor& bias, const Tensor& slope) {
  const Geometry geo = check_args(output, "output", std::nullopt, invstd, weight, bias, slope);
  check_grad_out(grad_out, "grad_out", output, "output", geo);
  check_device(grad_out, output, "grad_out");
  const c10::cuda::CUDAGuard guard(output.device());
  const ChannelArgs args(geo.C, stats_dtype(output), std::nullopt, invstd, weight, bias, slope);
  return backward(geo, grad_out, output, args, Mode::kPReLUFromOutput, /*batch_stats=*/true);
}

std::tuple<Tensor, Tensor> bn_stats(const Tensor& input) {
  const Geometry geo = check_args(input, "input", std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                                  std::nullopt);
  const c10::cuda::CUDAGuard guard(input.device());
  Tensor mean = per_channel_empty(input, geo.C);
  Tensor var = per_channel_empty(input, geo.C);
  if (input.numel() == 0) return {mean.zero_(), var.zero_()};
  batch_stats(geo, input, 0.0, /*want_var=*/true, mean, var);
  return {mean, var};
}

std::tuple<Tensor, Tensor, Tensor> bn_act_bwd_reduce(const Tensor& grad_out, const Tensor& input,
                                                     const Tensor& mean, const Tensor& invstd,
                                                     const OptTensor& weight, const OptTensor& bias,
                                                     const OptTensor& slope) {
  const Geometry geo = check_args(input, "input", mean, invstd, weight, bias, slope);
  check_grad_out(grad_out, "grad_out", input, "input", geo);
  check_device(grad_out, input, "grad_out");
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t C = geo.C;
  const ChannelArgs args(C, stats_dtype(input), mean, invstd, weight, bias, slope);
  const Mode mode = mode_of(args);
  const auto options = args.invstd.options();
  Tensor sum_dz = at::zeros({C}, options);
  Tensor sum_dz_xhat = at::zeros({C}, options);
  Tensor grad_slope = at::zeros({is_prelu(mode) ? C : 0}, options);
  if (input.numel() == 0) return {sum_dz, sum_dz_xhat, grad_slope};
  const Tensor table = table_for(input, C);
  channel_table(args, C, table);
  backward_sums(geo, grad_out, input, table, mode, args.invstd, sum_dz_xhat, sum_dz,
                is_prelu(mode) ? grad_slope : Tensor(), /*dx_coefficients=*/false);
  return {sum_dz, sum_dz_xhat, grad_slope};
}

Tensor bn_act_bwd_elemt(const Tensor& grad_out, const Tensor& input, const Tensor& mean, const Tensor& invstd,
                        const OptTensor& weight, const OptTensor& bias, const OptTensor& slope,
                        const Tensor& sum_dz, const Tensor& sum_dz_xhat, int64_t count) {
  const Geometry geo = check_args(input, "input", mean, invstd, weight, bias, slope);
  check_grad_out(grad_out, "grad_out", input, "input", geo);
  check_device(grad_out, input, "grad_out");
  check_device(sum_dz, input, "sum_dz");
  check_device(sum_dz_xhat, input, "sum_dz_xhat");
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t C = geo.C;
  const auto dtype = stats_dtype(input);
  const ChannelArgs args(C, dtype, mean, invstd, weight, bias, slope);
  const Tensor dz = per_channel(sum_dz, C, dtype, "sum_dz");
  const Tensor dz_xhat = per_channel(sum_dz_xhat, C, dtype, "sum_dz_xhat");
  Tensor grad_in = at::empty_like(input);
  if (input.numel() == 0) return grad_in;
  TORCH_CHECK(count > 0, "count: expected a positive number of elements per channel, got ", count);
  const Tensor table = table_for(input, C);
  channel_table(args, C, table, dz, dz_xhat, count);
  grad_input(geo, grad_out, input, table, mode_of(args), grad_in);
  return grad_in;
}

int runtime_version() { return CUDART_VERSION; }

}  // namespace fusedrect::cuda
