// Backward kernels: one reduction pass for sum dz, sum dz * (x - mean) and (PReLU) sum dy * min(z, 0) as
// per-block partials, a fixed-order merge into the per-channel gradients (and the dx coefficients), then the
// elementwise dx = scale * dz + B * (x - mean) + D. z is recomputed from x (or from y, kPReLUFromOutput).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>

#include "elementwise.cuh"
#include "launch.h"

namespace fusedrect::cuda {
namespace {

// Sums per channel: dz, dz * (x - mean) and, for PReLU, dy * min(z, 0).
template <Mode kMode>
constexpr int kTerms = is_prelu(kMode) ? 3 : 2;

template <Mode kMode, typename T>
__device__ inline void add_terms(Sums<T, kTerms<kMode>>& s, const ZParams<kMode, T>& p, T v, T dy) {
  T xc, z;
  p.centred_and_z(v, xc, z);
  const T dz = grad_z<kMode>(z, dy, p.slope);
  s.v[0] += dz;
  s.v[1] += dz * xc;
  if constexpr (is_prelu(kMode)) s.v[2] += z > T(0) ? T(0) : z * dy;  // NaN propagates
}

// Writes a block's sums of channel c into the (K, G, C) partials.
template <typename T, int K>
__device__ void write_sums(const Sums<T, K>& s, T* partials, int64_t g, int64_t G, int64_t C, int64_t c) {
#pragma unroll
  for (int k = 0; k < K; ++k) partials[(k * G + g) * C + c] = s.v[k];
}

// NCHW: block (c, g) sums over elements [g * chunk, (g + 1) * chunk) of channel c.
template <typename scalar_t, typename index_t, Mode kMode>
__global__ void __launch_bounds__(kThreads)
    bwd_reduce_nchw_kernel(const scalar_t* dy, const scalar_t* x, const acc_t<scalar_t>* table,
                           acc_t<scalar_t>* partials, index_t C, Divider<index_t> S, index_t M, index_t chunk,
                           int64_t G) {
  using T = acc_t<scalar_t>;
  constexpr int V = kVec<scalar_t>;
  const index_t c = blockIdx.x;
  const index_t begin = index_t(blockIdx.y) * chunk;
  const index_t end = M - begin < chunk ? M : begin + chunk;
  const auto p = ZParams<kMode, T>::load(table, C, c);
  Sums<T, kTerms<kMode>> s{};
  for_each_channel_vector<V>(Inputs<scalar_t, 2>{{x, dy}}, C, S, c, begin, end, [&](const T(&v)[2][V], int k) {
#pragma unroll
    for (int l = 0; l < V; ++l) {
      if (l < k) add_terms(s, p, v[0][l], v[1][l]);
    }
  });
  s = block_merge(s);
  if (threadIdx.x == 0) write_sums(s, partials, blockIdx.y, G, C, c);
}

// Channels-last: block (tile, g) sums over rows [g * chunk, (g + 1) * chunk) of its channels, one state per
// channel lane.
template <typename scalar_t, typename index_t, Mode kMode>
__global__ void __launch_bounds__(kThreads)
    bwd_reduce_cl_kernel(const scalar_t* dy, const scalar_t* x, const acc_t<scalar_t>* table,
                         acc_t<scalar_t>* partials, index_t M, index_t C, index_t chunk, int64_t G) {
  using T = acc_t<scalar_t>;
  constexpr int V = kVec<scalar_t>;
  const index_t c0 = (index_t(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  const index_t begin = index_t(blockIdx.y) * chunk;
  const index_t end = M - begin < chunk ? M : begin + chunk;
  ZParams<kMode, T> p[V];
#pragma unroll
  for (int l = 0; l < V; ++l) p[l] = ZParams<kMode, T>::load(table, C, c0 + l < C ? c0 + l : 0);
  Sums<T, kTerms<kMode>> s[V] = {};
  for_each_row_group<1, V>(Inputs<scalar_t, 2>{{x, dy}}, C, c0, begin, end, [&](const T(&v)[2][1][V], int) {
#pragma unroll
    for (int l = 0; l < V; ++l) add_terms(s[l], p[l], v[0][0][l], v[1][0][l]);  // lanes past C add 0
  });
  column_merge(s);
  if (threadIdx.y == 0) {
#pragma unroll
    for (int l = 0; l < V; ++l) {
      if (c0 + l < C) write_sums(s[l], partials, blockIdx.y, G, C, c0 + l);
    }
  }
}

// Sums the G partials of each channel in a fixed order, in fp64, into the per-channel gradients
// (grad_slope: nullptr for ReLU) and, where `table` is given, the dx coefficients of the batch statistics:
//   B = -scale * invstd * grad_weight / M,  D = -scale * grad_bias / M.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    bwd_finalize_kernel(const T* partials, int64_t G, int64_t C, int64_t M, const T* invstd, T* grad_weight,
                        T* grad_bias, T* grad_slope, T* table) {
  const int K = grad_slope ? 3 : 2;
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  Sums<double, 3> s[1] = {};
  if (c < C) {
    for (int64_t g = threadIdx.y; g < G; g += blockDim.y) {
      for (int k = 0; k < K; ++k) s[0].v[k] += double(partials[(k * G + g) * C + c]);
    }
  }
  column_merge(s);
  if (threadIdx.y != 0 || c >= C) return;
  const T dbias = T(s[0].v[0]);
  const T dweight = T(s[0].v[1]) * invstd[c];
  grad_bias[c] = dbias;
  grad_weight[c] = dweight;
  if (grad_slope) grad_slope[c] = T(s[0].v[2]);
  if (table) {
    const T scale = table[kScale * C + c];
    const T inv_m = T(1) / T(M);
    table[kB * C + c] = -scale * invstd[c] * dweight * inv_m;
    table[kD * C + c] = -scale * dbias * inv_m;
  }
}

// dx = scale * dz + B * (x - mean) + D from (x or y, dy).
template <Mode kMode, typename T>
struct GradInput {
  static constexpr int kInputs = 2;

  struct Params {
    ZParams<kMode, T> z;
    T scale, b, d;
  };

  using Source = const T*;  // the table

  __device__ static Params load(const T* table, int64_t C, int64_t c) {
    return {ZParams<kMode, T>::load(table, C, c), table[kScale * C + c], table[kB * C + c], table[kD * C + c]};
  }

  __device__ static T compute(const Params& p, const T* in) {
    T xc, z;
    p.z.centred_and_z(in[0], xc, z);
    // B * (x - mean) is 0 where B is (given statistics), for an infinite x too: as PyTorch.
    return p.scale * grad_z<kMode>(z, in[1], p.z.slope) + (p.b == T(0) ? T(0) : p.b * xc) + p.d;
  }
};

// Calls f(std::integral_constant<Mode, mode>{}).
template <typename F>
void dispatch_mode(Mode mode, const F& f) {
  switch (mode) {
    case Mode::kReLU:
      return f(std::integral_constant<Mode, Mode::kReLU>{});
    case Mode::kPReLU:
      return f(std::integral_constant<Mode, Mode::kPReLU>{});
    case Mode::kPReLUFromOutput:
      return f(std::integral_constant<Mode, Mode::kPReLUFromOutput>{});
  }
}

}  // namespace

void backward_sums(const Geometry& geo, const Tensor& grad_out, const Tensor& input, const Tensor& table,
                   Mode mode, const Tensor& invstd, const Tensor& grad_weight, const Tensor& grad_bias,
                   const Tensor& grad_slope, bool dx_coefficients) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "fusedrect::cuda::backward", [&] {
    using T = acc_t<scalar_t>;
    constexpr int V = kVec<scalar_t>;
    const ReducePlan plan = reduce_plan(geo, V, 1);
    const Tensor partials = at::empty({is_prelu(mode) ? 3 : 2, plan.groups, geo.C}, invstd.options());
    const scalar_t* dy = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const T* coefficients = table.const_data_ptr<T>();
    T* sums = partials.mutable_data_ptr<T>();
    auto launch = [&](auto index, auto mode_constant) {
      using index_t = decltype(index);
      constexpr Mode kMode = decltype(mode_constant)::value;
      if (geo.channels_last) {
        bwd_reduce_cl_kernel<scalar_t, index_t, kMode><<<plan.grid, plan.block, 0, stream>>>(
            dy, x, coefficients, sums, index_t(geo.per_channel()), index_t(geo.C), index_t(plan.chunk),
            plan.groups);
      } else {
        bwd_reduce_nchw_kernel<scalar_t, index_t, kMode><<<plan.grid, plan.block, 0, stream>>>(
            dy, x, coefficients, sums, index_t(geo.C), Divider<index_t>(geo.S), index_t(geo.per_channel()),
            index_t(plan.chunk), plan.groups);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    dispatch_mode(mode, [&](auto m) {
      if (fits_32bit(input.numel())) {
        launch(uint32_t{}, m);
      } else {
        launch(uint64_t{}, m);
      }
    });
    const ReducePlan merge = merge_plan(geo.C);
    bwd_finalize_kernel<T><<<merge.grid, merge.block, 0, stream>>>(
        partials.const_data_ptr<T>(), plan.groups, geo.C, geo.per_channel(), invstd.const_data_ptr<T>(),
        grad_weight.mutable_data_ptr<T>(), grad_bias.mutable_data_ptr<T>(),
        grad_slope.defined() ? grad_slope.mutable_data_ptr<T>() : nullptr,
        dx_coefficients ? table.mutable_data_ptr<T>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void grad_input(const Geometry& geo, const Tensor& grad_out, const Tensor& input, const Tensor& table, Mode mode,
                const Tensor& grad_in) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "fusedrect::cuda::grad_input", [&] {
    using T = acc_t<scalar_t>;
    const Inputs<scalar_t, 2> in{{input.const_data_ptr<scalar_t>(), grad_out.const_data_ptr<scalar_t>()}};
    dispatch_mode(mode, [&](auto m) {
      launch_elementwise<GradInput<decltype(m)::value, T>>(geo, in, grad_in.mutable_data_ptr<scalar_t>(),
                                                           table.const_data_ptr<T>(), input.numel());
    });
  });
}

}  // namespace fusedrect::cuda
