// Device building blocks of the CUDA kernels: 128-bit accesses with scalar tails, the per-channel
// coefficient table, the activation math, and the Welford / sum states with their deterministic merges
// (warp shuffles and shared-memory trees in a fixed order: no atomics, bitwise reproducible).
#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/macros/Macros.h>

#include <cstdint>

#include "modes.h"

namespace fusedrect::cuda {

constexpr int kThreads = 256;  // threads per block of every kernel
constexpr int kWarpSize = 32;

// Statistics and sums: fp32 for fp16/bf16/fp32 input, fp64 for fp64.
template <typename scalar_t>
using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;

// Elements of scalar_t in one 128-bit access.
template <typename scalar_t>
constexpr int kVec = 16 / sizeof(scalar_t);

template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Pack {
  scalar_t v[V];
};

// Up to N data pointers, passed to a kernel by value.
template <typename scalar_t, int N>
struct Inputs {
  const scalar_t* p[N];

  __device__ bool aligned() const {
    bool ok = true;
#pragma unroll
    for (int i = 0; i < N; ++i) ok = ok && reinterpret_cast<uintptr_t>(p[i]) % 16 == 0;
    return ok;
  }
};

// Division by a runtime constant: multiply-shift for 32-bit indices, plain division for 64-bit ones.
template <typename index_t>
using Divider = at::cuda::detail::IntDivider<index_t>;

// v[l] = p[l] as T for l < n (n <= V), 0 past n; one 128-bit load where `whole` (n == V, p 16-byte aligned).
template <int V, typename scalar_t, typename T>
__device__ inline void load_lanes(const scalar_t* p, int n, bool whole, T (&v)[V]) {
  if (whole) {
    const Pack<scalar_t, V> pack = *reinterpret_cast<const Pack<scalar_t, V>*>(p);
#pragma unroll
    for (int l = 0; l < V; ++l) v[l] = static_cast<T>(pack.v[l]);
  } else {
#pragma unroll
    for (int l = 0; l < V; ++l) v[l] = l < n ? static_cast<T>(p[l]) : T(0);
  }
}

// p[l] = v[l] rounded to scalar_t for l < n; one 128-bit store where `whole`.
template <int V, typename scalar_t, typename T>
__device__ inline void store_lanes(scalar_t* p, int n, bool whole, const T (&v)[V]) {
  if (whole) {
    Pack<scalar_t, V> pack;
#pragma unroll
    for (int l = 0; l < V; ++l) pack.v[l] = static_cast<scalar_t>(v[l]);
    *reinterpret_cast<Pack<scalar_t, V>*>(p) = pack;
  } else {
#pragma unroll
    for (int l = 0; l < V; ++l) {
      if (l < n) p[l] = static_cast<scalar_t>(v[l]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// act(z): PReLU z > 0 ? z : a * z (as torch.prelu); ReLU z <= 0 ? 0 : z (NaN stays NaN, as torch.relu).
template <Mode kMode, typename T>
__device__ inline T activate(T z, T a) {
  if constexpr (is_prelu(kMode)) return z > T(0) ? z : a * z;
  return z <= T(0) ? T(0) : z;
}

// dz = dL/dz from dy: PReLU z > 0 ? dy : a * dy (as torch.prelu's backward); ReLU z <= 0 ? 0 : dy (as
// threshold_backward).
template <Mode kMode, typename T>
__device__ inline T grad_z(T z, T dy, T a) {
  if constexpr (is_prelu(kMode)) return z > T(0) ? dy : a * dy;
  return z <= T(0) ? T(0) : dy;
}

// The coefficients that turn what a pass reads (x, or y from the output) into (x - mean, z).
template <Mode kMode, typename T>
struct ZParams {
  T p0, p1, beta, slope;  // p0, p1 = mean, scale; from the output 1 / scale, 1 / a

  static constexpr bool kFromOutput = kMode == Mode::kPReLUFromOutput;

  __device__ static ZParams load(const T* table, int64_t C, int64_t c) {
    ZParams p;
    p.p0 = table[(kFromOutput ? kInvScale : kMean) * C + c];
    p.p1 = table[(kFromOutput ? kInvSlope : kScale) * C + c];
    p.beta = table[kBeta * C + c];
    p.slope = is_prelu(kMode) ? table[kSlope * C + c] : T(0);
    return p;
  }

  __device__ void centred_and_z(T v, T& xc, T& z) const {
    if constexpr (kFromOutput) {
      z = v > T(0) ? v : v * p1;
      xc = (z - beta) * p0;
    } else {
      xc = v - p0;
      z = xc * p1 + beta;
    }
  }
};

// ---------------------------------------------------------------------------------------------------------
// Reduction states. Both are plain aggregates (zeroed by `State s{}`) so they can live in shared memory.

// Count, mean and sum of squared deviations from the mean (M2) of a set of values.
template <typename T>
struct Welford {
  T n, mean, m2;

  // Chan et al.: with delta = mean_b - mean and w = nb / (n + nb),
  //   mean += delta * w,  m2 += m2_b + delta^2 * n * w,  n += nb.
  // Where a mean is infinite (an infinite input) the weighted sum keeps it (inf, or NaN from inf and -inf, as
  // PyTorch's sums) where mean + delta * w would be inf - inf. Merging with an empty side (n or nb 0) adds no
  // delta^2 term, which would be inf * 0 = NaN where delta^2 overflows (|x| > ~1e19 in fp32: the variance is
  // then infinite): delta is zeroed, not the product, which keeps the term's fused multiply-add.
  __device__ void merge(T nb, T mean_b, T m2_b) {
    const T total = n + nb;
    const T w = total > T(0) ? nb / total : T(0);
    const T delta = mean_b - mean;
    mean = delta - delta == T(0) ? mean + delta * w : mean * (T(1) - w) + mean_b * w;  // delta finite or not
    const T spread = n * w > T(0) ? delta : T(0);  // n > 0 and nb > 0
    m2 += m2_b + spread * spread * n * w;
    n = total;
  }

  __device__ void merge(const Welford& o) { merge(o.n, o.mean, o.m2); }

  // Adds v[0 .. k) (0 < k <= N): their mean and M2 by two passes over registers, then one merge.
  template <int N>
  __device__ void add(const T (&v)[N], int k) {
    T sum = 0;
#pragma unroll
    for (int l = 0; l < N; ++l) sum += l < k ? v[l] : T(0);
    const T mean_b = k == N ? sum * (T(1) / T(N)) : sum / T(k);  // N is a power of two: exact
    T m2_b = 0;
#pragma unroll
    for (int l = 0; l < N; ++l) {
      const T d = l < k ? v[l] - mean_b : T(0);
      m2_b += d * d;
    }
    merge(T(k), mean_b, m2_b);
  }

  __device__ Welford shfl_down(int offset) const {
    return {__shfl_down_sync(0xffffffffu, n, offset), __shfl_down_sync(0xffffffffu, mean, offset),
            __shfl_down_sync(0xffffffffu, m2, offset)};
  }
};

template <typename T, int K>
struct Sums {
  T v[K];

  __device__ void merge(const Sums& o) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] += o.v[k];
  }

  __device__ Sums shfl_down(int offset) const {
    Sums s;
#pragma unroll
    for (int k = 0; k < K; ++k) s.v[k] = __shfl_down_sync(0xffffffffu, v[k], offset);
    return s;
  }
};

// Merges the states of a 1-D block of kThreads threads: a shuffle tree in each warp, then one over the
// warps' results. The result is valid in thread 0.
template <typename State>
__device__ State block_merge(State s) {
  constexpr int kWarps = kThreads / kWarpSize;
  __shared__ State warps[kWarps];
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) s.merge(s.shfl_down(offset));
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (lane == 0) warps[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < kWarps ? warps[lane] : State{};
#pragma unroll
    for (int offset = kWarps / 2; offset > 0; offset /= 2) s.merge(s.shfl_down(offset));
  }
  return s;
}

// Merges the L states of each thread with those of the threads with the same threadIdx.x, over threadIdx.y
// (blockDim.y a power of two, blockDim.x * blockDim.y == kThreads), by a tree in shared memory. The result
// is valid where threadIdx.y == 0.
template <int L, typename State>
__device__ void column_merge(State (&s)[L]) {
  __shared__ State buf[kThreads * L];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int l = 0; l < L; ++l) buf[tid * L + l] = s[l];
  __syncthreads();
  for (int stride = blockDim.y / 2; stride > 0; stride /= 2) {
    if (threadIdx.y < stride) {
#pragma unroll
      for (int l = 0; l < L; ++l) {
        s[l].merge(buf[(tid + stride * blockDim.x) * L + l]);
        buf[tid * L + l] = s[l];
      }
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------------
// How the reductions walk their share of the input.

// NCHW: channel c's elements with in-channel indices m in [begin, end) (m = n * S + s, stored at
// (n * C + c) * S + s), V consecutive ones per call f(v, k) with k <= V valid lanes of each input, strided
// over a 1-D block. A call whose lanes lie in one run reads each input with one 128-bit load where aligned;
// one that crosses a run boundary reads lane by lane.
template <int V, int NI, typename scalar_t, typename index_t, typename F>
__device__ void for_each_channel_vector(const Inputs<scalar_t, NI>& in, index_t C, const Divider<index_t>& S,
                                        index_t c, index_t begin, index_t end, const F& f) {
  using T = acc_t<scalar_t>;
  const bool aligned = in.aligned();
  for (index_t m = begin + index_t(threadIdx.x) * V; m < end; m += index_t(kThreads) * V) {
    const int k = end - m < index_t(V) ? int(end - m) : V;
    const auto ns = S.divmod(m);
    T v[NI][V];
    if (ns.mod + index_t(k) <= S.divisor) {
      const index_t off = (ns.div * C + c) * S.divisor + ns.mod;
      const bool whole = aligned && k == V && off % V == 0;
#pragma unroll
      for (int i = 0; i < NI; ++i) load_lanes<V>(in.p[i] + off, k, whole, v[i]);
    } else {
      index_t n = ns.div, s = ns.mod;
#pragma unroll
      for (int l = 0; l < V; ++l) {
        const index_t off = (n * C + c) * S.divisor + s;
#pragma unroll
        for (int i = 0; i < NI; ++i) v[i][l] = l < k ? static_cast<T>(in.p[i][off]) : T(0);
        if (++s == S.divisor) {
          s = 0;
          ++n;
        }
      }
    }
    f(v, k);
  }
}

// Channels-last: rows [begin, end) of the (M, C) matrix at the V channels c0 .. c0 + V - 1 of this thread
// (lanes past C read as 0), R rows per call f(v, rows) with v[input][row][lane] and the first `rows` rows
// valid; rows strided over threadIdx.y. Each row is one 128-bit load per input where C % V == 0 and aligned.
template <int R, int V, int NI, typename scalar_t, typename index_t, typename F>
__device__ void for_each_row_group(const Inputs<scalar_t, NI>& in, index_t C, index_t c0, index_t begin,
                                   index_t end, const F& f) {
  using T = acc_t<scalar_t>;
  if (c0 >= C) return;
  const int lanes = C - c0 < index_t(V) ? int(C - c0) : V;
  const bool whole = lanes == V && C % V == 0 && in.aligned();
  const index_t step = blockDim.y;
  for (index_t r = begin + threadIdx.y; r < end; r += R * step) {
    T v[NI][R][V];
    int rows = 0;
#pragma unroll
    for (int j = 0; j < R; ++j) {
      const index_t row = r + j * step;
      const bool valid = row < end;
      rows += valid;
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        if (valid) {
          load_lanes<V>(in.p[i] + row * C + c0, lanes, whole, v[i][j]);
        } else {
#pragma unroll
          for (int l = 0; l < V; ++l) v[i][j][l] = T(0);
        }
      }
    }
    f(v, rows);
  }
}

}  // namespace fusedrect::cuda
