// Forward kernels: batch statistics (per-block Welford partials, then a fixed-order Chan merge), the
// per-channel coefficient table, and the apply pass y = act((x - mean) * scale + beta).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>

#include <cmath>

#include "elementwise.cuh"
#include "launch.h"

namespace fusedrect::cuda {
namespace {

constexpr int kStatsRows = 4;  // channels-last statistics: rows per thread step (one two-pass chunk per lane)

// Writes a block's partial (mean, M2) of channel c into row g of the (G, C) buffers.
template <typename T>
__device__ void write_partial(const Welford<T>& w, T* part_mean, T* part_m2, int64_t g, int64_t C, int64_t c) {
  part_mean[g * C + c] = w.mean;
  part_m2[g * C + c] = w.m2;
}

// NCHW: block (c, g) reduces elements [g * chunk, (g + 1) * chunk) of channel c, V at a time.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    stats_nchw_kernel(const scalar_t* x, acc_t<scalar_t>* part_mean, acc_t<scalar_t>* part_m2, index_t C,
                      Divider<index_t> S, index_t M, index_t chunk) {
  using T = acc_t<scalar_t>;
  constexpr int V = kVec<scalar_t>;
  const index_t c = blockIdx.x;
  const index_t begin = index_t(blockIdx.y) * chunk;
  const index_t end = M - begin < chunk ? M : begin + chunk;
  Welford<T> w{};
  for_each_channel_vector<V>(Inputs<scalar_t, 1>{{x}}, C, S, c, begin, end,
                             [&](const T(&v)[1][V], int k) { w.add(v[0], k); });
  w = block_merge(w);
  if (threadIdx.x == 0) write_partial(w, part_mean, part_m2, blockIdx.y, C, c);
}

// Channels-last: block (tile, g) reduces rows [g * chunk, (g + 1) * chunk) of its channels; each thread keeps
// one state per channel lane, fed kStatsRows rows at a time.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    stats_cl_kernel(const scalar_t* x, acc_t<scalar_t>* part_mean, acc_t<scalar_t>* part_m2, index_t M,
                    index_t C, index_t chunk) {
  using T = acc_t<scalar_t>;
  constexpr int V = kVec<scalar_t>;
  const index_t c0 = (index_t(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  const index_t begin = index_t(blockIdx.y) * chunk;
  const index_t end = M - begin < chunk ? M : begin + chunk;
  Welford<T> w[V] = {};
  for_each_row_group<kStatsRows, V>(Inputs<scalar_t, 1>{{x}}, C, c0, begin, end,
                                    [&](const T(&v)[1][kStatsRows][V], int rows) {
#pragma unroll
                                      for (int l = 0; l < V; ++l) {
                                        T column[kStatsRows];
#pragma unroll
                                        for (int j = 0; j < kStatsRows; ++j) column[j] = v[0][j][l];
                                        w[l].add(column, rows);
                                      }
                                    });
  column_merge(w);
  if (threadIdx.y == 0) {
#pragma unroll
    for (int l = 0; l < V; ++l) {
      if (c0 + l < C) write_partial(w[l], part_mean, part_m2, blockIdx.y, C, c0 + l);
    }
  }
}

// The op's per-channel arguments (nullptr where absent) and, for bn_act_bwd_elemt, the given sums.
template <typename T>
struct ChannelPtrs {
  const T *mean, *invstd, *weight, *bias, *slope;
  bool slope_shared;
  const T *sum_dz, *sum_dz_xhat;
  T inv_count;
};

// Channel c's scale = gamma * invstd, beta and slope from the op's arguments.
template <typename T>
__device__ __forceinline__ T scale_of(const ChannelPtrs<T>& a, T invstd, int64_t c) {
  return (a.weight ? a.weight[c] : T(1)) * invstd;
}
template <typename T>
__device__ __forceinline__ T beta_of(const ChannelPtrs<T>& a, int64_t c) {
  return a.bias ? a.bias[c] : T(0);
}
template <typename T>
__device__ __forceinline__ T slope_of(const ChannelPtrs<T>& a, int64_t c) {
  return a.slope ? a.slope[a.slope_shared ? 0 : c] : T(0);
}

// Channel c's column of the coefficient table, from its statistics.
template <typename T>
__device__ __forceinline__ void write_coefficients(const ChannelPtrs<T>& a, T mean, T invstd, int64_t C, int64_t c,
                                                   T* table) {
  const T scale = scale_of(a, invstd, c);
  const T slope = slope_of(a, c);
  table[kMean * C + c] = mean;
  table[kScale * C + c] = scale;
  table[kBeta * C + c] = beta_of(a, c);
  table[kSlope * C + c] = slope;
  table[kInvScale * C + c] = T(1) / scale;
  table[kInvSlope * C + c] = a.slope ? T(1) / slope : T(0);
  table[kB * C + c] = a.sum_dz ? -scale * invstd * a.sum_dz_xhat[c] * a.inv_count : T(0);
  table[kD * C + c] = a.sum_dz ? -scale * a.sum_dz[c] * a.inv_count : T(0);
}

// Merges the G partials of each channel in a fixed order, in fp64: group g holds min(chunk, M - g * chunk)
// elements of every channel. mean = merged mean; out2 = var = M2 / M where want_var, else 1 / sqrt(var + eps).
// Where `table` is given (the training forward), also writes the channel's coefficients from the mean and
// invstd just computed: one launch less than a coefficients_kernel after it.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    stats_merge_kernel(const T* part_mean, const T* part_m2, int64_t G, int64_t C, int64_t M, int64_t chunk,
                       double eps, bool want_var, T* mean, T* out2, ChannelPtrs<T> args, T* table) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  Welford<double> w[1] = {};
  if (c < C) {
    for (int64_t g = threadIdx.y; g < G; g += blockDim.y) {
      w[0].merge(double(std::min(chunk, M - g * chunk)), double(part_mean[g * C + c]), double(part_m2[g * C + c]));
    }
  }
  column_merge(w);
  if (threadIdx.y == 0 && c < C) {
    const double var = w[0].m2 / double(M);
    const T channel_mean = T(w[0].mean);
    const T second = T(want_var ? var : 1.0 / std::sqrt(var + eps));
    mean[c] = channel_mean;
    out2[c] = second;
    if (table != nullptr) write_coefficients(args, channel_mean, second, C, c, table);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) coefficients_kernel(ChannelPtrs<T> a, int64_t C, T* table) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < C) write_coefficients(a, a.mean ? a.mean[c] : T(0), a.invstd[c], C, c, table);
}

// y = act(z) for the forward: one input (x), the coefficients from the table.
template <Mode kMode, typename T>
struct Apply {
  static constexpr int kInputs = 1;
  using Params = ZParams<kMode, T>;
  using Source = const T*;

  __device__ static Params load(const T* table, int64_t C, int64_t c) { return Params::load(table, C, c); }

  __device__ static T compute(const Params& p, const T* in) {
    T xc, z;
    p.centred_and_z(in[0], xc, z);
    return activate<kMode>(z, p.slope);
  }
};

// The same with given statistics (the eval forward): each channel's coefficients computed where they are
// loaded, as write_coefficients computes them (the same bits), instead of by a table kernel launched first.
template <Mode kMode, typename T>
struct ApplyGiven : Apply<kMode, T> {
  using Source = ChannelPtrs<T>;

  __device__ static ZParams<kMode, T> load(const ChannelPtrs<T>& a, int64_t, int64_t c) {
    ZParams<kMode, T> p;
    p.p0 = a.mean ? a.mean[c] : T(0);
    p.p1 = scale_of(a, a.invstd[c], c);
    p.beta = beta_of(a, c);
    p.slope = slope_of(a, c);
    return p;
  }
};

template <typename T>
const T* data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
ChannelPtrs<T> channel_ptrs(const ChannelArgs& args, const Tensor& sum_dz = Tensor(),
                            const Tensor& sum_dz_xhat = Tensor(), int64_t count = 0) {
  return {data_or_null<T>(args.mean),
          data_or_null<T>(args.invstd),
          data_or_null<T>(args.weight),
          data_or_null<T>(args.bias),
          data_or_null<T>(args.slope),
          args.slope.defined() && args.slope.numel() == 1,
          data_or_null<T>(sum_dz),
          data_or_null<T>(sum_dz_xhat),
          count > 0 ? T(1) / T(count) : T(0)};
}

}  // namespace

void batch_stats(const Geometry& geo, const Tensor& x, double eps, bool want_var, const Tensor& mean,
                 const Tensor& out2, const ChannelArgs* args, const Tensor& table) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fusedrect::cuda::batch_stats", [&] {
    using T = acc_t<scalar_t>;
    constexpr int V = kVec<scalar_t>;
    const ReducePlan plan = reduce_plan(geo, V, kStatsRows);
    const Tensor part_mean = at::empty({plan.groups, geo.C}, mean.options());
    const Tensor part_m2 = at::empty({plan.groups, geo.C}, mean.options());
    auto launch = [&](auto index) {
      using index_t = decltype(index);
      const scalar_t* data = x.const_data_ptr<scalar_t>();
      if (geo.channels_last) {
        stats_cl_kernel<scalar_t, index_t><<<plan.grid, plan.block, 0, stream>>>(
            data, part_mean.mutable_data_ptr<T>(), part_m2.mutable_data_ptr<T>(), index_t(geo.per_channel()),
            index_t(geo.C), index_t(plan.chunk));
      } else {
        stats_nchw_kernel<scalar_t, index_t><<<plan.grid, plan.block, 0, stream>>>(
            data, part_mean.mutable_data_ptr<T>(), part_m2.mutable_data_ptr<T>(), index_t(geo.C),
            Divider<index_t>(geo.S), index_t(geo.per_channel()), index_t(plan.chunk));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (fits_32bit(x.numel())) {
      launch(uint32_t{});
    } else {
      launch(uint64_t{});
    }
    const ReducePlan merge = merge_plan(geo.C);
    const ChannelPtrs<T> ptrs = args != nullptr ? channel_ptrs<T>(*args) : ChannelPtrs<T>{};
    stats_merge_kernel<T><<<merge.grid, merge.block, 0, stream>>>(
        part_mean.const_data_ptr<T>(), part_m2.const_data_ptr<T>(), plan.groups, geo.C, geo.per_channel(),
        plan.chunk, eps, want_var, mean.mutable_data_ptr<T>(), out2.mutable_data_ptr<T>(), ptrs,
        table.defined() ? table.mutable_data_ptr<T>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void channel_table(const ChannelArgs& args, int64_t C, const Tensor& table, const Tensor& sum_dz,
                   const Tensor& sum_dz_xhat, int64_t count) {
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "fusedrect::cuda::channel_table", [&] {
    using T = scalar_t;
    coefficients_kernel<T><<<ceil_div(C, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        channel_ptrs<T>(args, sum_dz, sum_dz_xhat, count), C, table.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void apply_given(const Geometry& geo, const Tensor& x, const ChannelArgs& args, const Tensor& y) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fusedrect::cuda::apply_given", [&] {
    using T = acc_t<scalar_t>;
    const Inputs<scalar_t, 1> in{{x.const_data_ptr<scalar_t>()}};
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    const ChannelPtrs<T> ptrs = channel_ptrs<T>(args);
    if (args.slope.defined()) {
      launch_elementwise<ApplyGiven<Mode::kPReLU, T>>(geo, in, out, ptrs, x.numel());
    } else {
      launch_elementwise<ApplyGiven<Mode::kReLU, T>>(geo, in, out, ptrs, x.numel());
    }
  });
}

void apply(const Geometry& geo, const Tensor& x, const Tensor& table, bool prelu, const Tensor& y) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fusedrect::cuda::apply", [&] {
    using T = acc_t<scalar_t>;
    const Inputs<scalar_t, 1> in{{x.const_data_ptr<scalar_t>()}};
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    const T* coefficients = table.const_data_ptr<T>();
    if (prelu) {
      launch_elementwise<Apply<Mode::kPReLU, T>>(geo, in, out, coefficients, x.numel());
    } else {
      launch_elementwise<Apply<Mode::kReLU, T>>(geo, in, out, coefficients, x.numel());
    }
  });
}

}  // namespace fusedrect::cuda
