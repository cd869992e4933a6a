// The elementwise passes (forward apply, backward dx): out = Op::compute(coefficients of the channel, inputs)
// for every element, in both layouts. An Op provides
//   kInputs                          the number of input tensors read per element,
//   Source                           where the coefficients come from (device.cuh's table, or the op's
//                                    per-channel arguments themselves),
//   Params, Params load(source, C, c) the coefficients of channel c,
//   T compute(Params, const T* in)   the output from one element of each input.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "device.cuh"
#include "plan.h"

namespace fusedrect::cuda {

// NCHW: a 1-D grid strided over the flat tensor, V elements per step. The V lanes of a step mostly lie in one
// plane (one channel: its coefficients are loaded once); a step that crosses planes loads them per lane.
template <typename Op, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    elementwise_nchw_kernel(Inputs<scalar_t, Op::kInputs> in, scalar_t* out, typename Op::Source source,
                            index_t numel, Divider<index_t> S, Divider<index_t> C) {
  using T = acc_t<scalar_t>;
  constexpr int V = kVec<scalar_t>;
  constexpr int NI = Op::kInputs;
  const bool aligned = in.aligned() && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  const index_t stride = index_t(gridDim.x) * kThreads * V;
  for (index_t i = (index_t(blockIdx.x) * kThreads + threadIdx.x) * V; i < numel; i += stride) {
    const int k = numel - i < index_t(V) ? int(numel - i) : V;
    const bool whole = aligned && k == V;
    T v[NI][V];
#pragma unroll
    for (int j = 0; j < NI; ++j) load_lanes<V>(in.p[j] + i, k, whole, v[j]);
    const auto plane = S.divmod(i);  // (n * C + c, s)
    index_t c = C.mod(plane.div);
    T r[V];
    if (plane.mod + index_t(k) <= S.divisor) {
      const auto p = Op::load(source, C.divisor, c);
#pragma unroll
      for (int l = 0; l < V; ++l) {
        T e[NI];
#pragma unroll
        for (int j = 0; j < NI; ++j) e[j] = v[j][l];
        r[l] = Op::compute(p, e);
      }
    } else {
      index_t s = plane.mod;
#pragma unroll
      for (int l = 0; l < V; ++l) {
        if (s == S.divisor) {
          s = 0;
          c = c + 1 == C.divisor ? 0 : c + 1;
        }
        T e[NI];
#pragma unroll
        for (int j = 0; j < NI; ++j) e[j] = v[j][l];
        r[l] = l < k ? Op::compute(Op::load(source, C.divisor, c), e) : T(0);
        ++s;
      }
    }
    store_lanes<V>(out + i, k, whole, r);
  }
}

// Channels-last: each thread keeps the coefficients of its V channels in registers and walks rows.
template <typename Op, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    elementwise_cl_kernel(Inputs<scalar_t, Op::kInputs> in, scalar_t* out, typename Op::Source source,
                          index_t M, index_t C) {
  using T = acc_t<scalar_t>;
  constexpr int V = kVec<scalar_t>;
  constexpr int NI = Op::kInputs;
  const index_t c0 = (index_t(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (c0 >= C) return;
  const int lanes = C - c0 < index_t(V) ? int(C - c0) : V;
  const bool whole = lanes == V && C % V == 0 && in.aligned() && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  typename Op::Params p[V];
#pragma unroll
  for (int l = 0; l < V; ++l) p[l] = Op::load(source, C, c0 + (l < lanes ? l : 0));
  for (index_t r = index_t(blockIdx.y) * blockDim.y + threadIdx.y; r < M; r += index_t(gridDim.y) * blockDim.y) {
    const index_t off = r * C + c0;
    T v[NI][V];
#pragma unroll
    for (int j = 0; j < NI; ++j) load_lanes<V>(in.p[j] + off, lanes, whole, v[j]);
    T y[V];
#pragma unroll
    for (int l = 0; l < V; ++l) {
      T e[NI];
#pragma unroll
      for (int j = 0; j < NI; ++j) e[j] = v[j][l];
      y[l] = Op::compute(p[l], e);
    }
    store_lanes<V>(out + off, lanes, whole, y);
  }
}

// Launches Op over a non-empty tensor of geometry `geo` on the current stream.
template <typename Op, typename scalar_t>
void launch_elementwise(const Geometry& geo, const Inputs<scalar_t, Op::kInputs>& in, scalar_t* out,
                        const typename Op::Source& source, int64_t numel) {
  constexpr int V = kVec<scalar_t>;
  const ElementwisePlan plan = elementwise_plan(geo, numel, V);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto index) {
    using index_t = decltype(index);
    if (geo.channels_last) {
      elementwise_cl_kernel<Op, scalar_t, index_t><<<plan.grid, plan.block, 0, stream>>>(
          in, out, source, index_t(geo.per_channel()), index_t(geo.C));
    } else {
      elementwise_nchw_kernel<Op, scalar_t, index_t><<<plan.grid, plan.block, 0, stream>>>(
          in, out, source, index_t(numel), Divider<index_t>(geo.S), Divider<index_t>(geo.C));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (fits_32bit(numel)) {
    launch(uint32_t{});
  } else {
    launch(uint64_t{});
  }
}

}  // namespace fusedrect::cuda
