// The host launchers of the kernels, called by the ops in bn_act.cu on non-empty tensors, on the current
// stream of the input's device (the caller holds the device guard). Per-channel tensors are contiguous and of
// the statistics dtype (acc_t of the input).
#pragma once

#include <ATen/core/Tensor.h>

#include "../bn_act_args.h"
#include "modes.h"

namespace fusedrect::cuda {

using at::Tensor;

// forward.cu

// Per-channel mean and, into `out2`, 1 / sqrt(var + eps), or the biased var itself where `want_var`. Where
// `table` is given, also fills it from `args` as channel_table would, with the statistics just computed.
void batch_stats(const Geometry& geo, const Tensor& x, double eps, bool want_var, const Tensor& mean,
                 const Tensor& out2, const ChannelArgs* args = nullptr, const Tensor& table = Tensor());

// Fills the (kRows, C) coefficient table from args (mean may be undefined: 0). B and D are 0, or, where
// sum_dz is defined, those of bn_act_bwd_elemt: B = -scale * invstd * sum_dz_xhat / count,
// D = -scale * sum_dz / count.
void channel_table(const ChannelArgs& args, int64_t C, const Tensor& table, const Tensor& sum_dz = Tensor(),
                   const Tensor& sum_dz_xhat = Tensor(), int64_t count = 0);

// y = act((x - mean) * scale + beta).
void apply(const Geometry& geo, const Tensor& x, const Tensor& table, bool prelu, const Tensor& y);

// The same with the coefficients computed in the pass from args (mean and invstd given): no table, one launch.
void apply_given(const Geometry& geo, const Tensor& x, const ChannelArgs& args, const Tensor& y);

// backward.cu

// The per-channel sums of the backward: grad_bias = sum dz, grad_weight = invstd * sum dz * (x - mean),
// grad_slope = sum dy * min(z, 0) (PReLU; undefined for ReLU). `input` is x, or y for kPReLUFromOutput.
// Where `dx_coefficients`, also writes the table's B and D for the batch statistics.
void backward_sums(const Geometry& geo, const Tensor& grad_out, const Tensor& input, const Tensor& table,
                   Mode mode, const Tensor& invstd, const Tensor& grad_weight, const Tensor& grad_bias,
                   const Tensor& grad_slope, bool dx_coefficients);

// dx = scale * dz + B * (x - mean) + D.
void grad_input(const Geometry& geo, const Tensor& grad_out, const Tensor& input, const Tensor& table, Mode mode,
                const Tensor& grad_in);

}  // namespace fusedrect::cuda
