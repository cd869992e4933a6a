// The argument checks and the (N, C, S) view shared by the CPU and CUDA implementations of the BatchNorm +
// ReLU/PReLU ops, so that both raise the same messages for the same mistakes.
//
// The input (N, C, *spatial) is viewed as (N, C, S) with S = prod(spatial), and M = N * S elements per
// channel. Two memory layouts are native:
//   NCHW           N planes of C contiguous runs of S elements;
//   channels-last  a row-major (N * S, C) matrix (any rank: (N, C), channels_last, channels_last_3d, and
//                  (N, C, L) tensors transposed from (N, L, C)).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <optional>

namespace fusedrect {

struct Geometry {
  int64_t N, C, S;
  bool channels_last;

  int64_t per_channel() const { return N * S; }
};

// True when `x` is laid out as a row-major (N * S, C) matrix: x.permute(0, 2, ..., 1).is_contiguous() from the
// sizes and strides alone (that view costs a dispatcher call on every op), dims of size 1 ignored as there.
inline bool is_channels_last_dense(const at::Tensor& x) {
  if (x.numel() == 0) return true;
  int64_t expected = 1;  // the stride of the next dim in row-major (N, d2, ..., dk, C) order
  auto dense = [&](int64_t d) {
    if (x.size(d) == 1) return true;
    if (x.stride(d) != expected) return false;
    expected *= x.size(d);
    return true;
  };
  if (!dense(1)) return false;
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    if (!dense(d)) return false;
  }
  return dense(0);
}

// NCHW when x is contiguous (unless S == 1, where the matrix walk is the better one), channels-last when
// x is a dense (N*S, C) matrix; anything else is rejected (the Python front door copies it first).
inline Geometry geometry_of(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() >= 2, name, ": expected at least 2 dims (N, C, ...), got ", x.sizes());
  Geometry g{x.size(0), x.size(1), 1, false};
  for (int64_t d = 2; d < x.dim(); ++d) g.S *= x.size(d);
  const bool nchw = x.is_contiguous();
  g.channels_last = (g.S == 1 || !nchw) && is_channels_last_dense(x);  // checked only where it decides the walk
  TORCH_CHECK(nchw || g.channels_last, name, ": expected a contiguous or channels-last tensor, got strides ",
              x.strides());
  return g;
}

// Statistics and reductions: fp64 for fp64 input, fp32 otherwise.
inline at::ScalarType stats_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_floating(const at::Tensor& x, const char* name) {
  const auto s = x.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf, name,
              ": expected a float16, bfloat16, float32 or float64 tensor, got ", s);
}

// A gradient-sized tensor (grad_out, or dx_out that dx is written into; `what` names it) must match the shape,
// dtype and memory layout of the tensor `like` (named `name`) that the kernels walk together with it: the input,
// or the output where backward recovers the input from it.
inline void check_grad_out(const at::Tensor& grad_out, const char* what, const at::Tensor& like, const char* name,
                           const Geometry& geo) {
  TORCH_CHECK(grad_out.sizes() == like.sizes() && grad_out.scalar_type() == like.scalar_type(), what,
              ": expected the shape and dtype of ", name, " ", like.sizes(), " ", like.scalar_type(), ", got ",
              grad_out.sizes(), " ", grad_out.scalar_type());
  TORCH_CHECK(geometry_of(grad_out, what).channels_last == geo.channels_last, what,
              ": expected the memory layout of ", name);
}

// `grad` in the memory layout of `x`: gradients arrive expanded, or in another layout, and the kernels walk both
// together.
inline at::Tensor in_layout_of(const at::Tensor& grad, const at::Tensor& x) {
  return grad.sym_strides() == x.sym_strides() ? grad : at::empty_like(x).copy_(grad);  // symbolic under compile
}

// `p` as a contiguous tensor of `dtype` (undefined where absent), after checking it has `C` elements
// (or 1 where `shared_ok`).
inline at::Tensor per_channel(const std::optional<at::Tensor>& p, int64_t C, at::ScalarType dtype,
                              const char* name, bool shared_ok = false) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  TORCH_CHECK(p->dim() == 1 && (p->numel() == C || (shared_ok && p->numel() == 1)), name, ": expected shape (",
              C, shared_ok ? ",) or (1,)" : ",)", ", got ", p->sizes());
  if (p->scalar_type() == dtype && p->is_contiguous()) return *p;  // the usual case: skips two dispatcher calls
  return p->to(dtype).contiguous();
}

// The per-channel op arguments as contiguous tensors of the statistics dtype (undefined where absent),
// after checking their shapes.
struct ChannelArgs {
  at::Tensor mean, invstd, weight, bias, slope;

  ChannelArgs(int64_t C, at::ScalarType dtype, const std::optional<at::Tensor>& mean_,
              const std::optional<at::Tensor>& invstd_, const std::optional<at::Tensor>& weight_,
              const std::optional<at::Tensor>& bias_, const std::optional<at::Tensor>& slope_)
      : mean(per_channel(mean_, C, dtype, "mean")),
        invstd(per_channel(invstd_, C, dtype, "invstd")),
        weight(per_channel(weight_, C, dtype, "weight")),
        bias(per_channel(bias_, C, dtype, "bias")),
        slope(per_channel(slope_, C, dtype, "slope", true)) {}
};

}  // namespace fusedrect
