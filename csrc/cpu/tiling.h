// How a BatchNorm input is walked on the CPU.
//
// The input (N, C, *spatial) is viewed as (N, C, S) with S = prod(spatial), and M = N * S elements per
// channel. Two memory layouts are native:
//   NCHW           per channel, N contiguous runs of S elements;
//   channels-last  a row-major (M, C) matrix (any rank: (N, C), channels_last, channels_last_3d, and
//                  (N, C, L) tensors transposed from (N, L, C)).
// Work is cut into tiles that depend only on the shape, never on the thread count, so every per-tile
// partial and every fixed-order merge of partials is bitwise reproducible:
//   NCHW           tile (c, g) = elements [g*chunk, (g+1)*chunk) of channel c;
//   channels-last  tile (g, b) = rows [g*chunk, (g+1)*chunk) x channel block b.
// A tile holds ~kTileElems elements, small enough to stay in L2 so a tile can be read twice cheaply.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <array>

#include "vec_io.h"

namespace fusedrect::cpu {

inline constexpr int64_t kTileElems = 8192;
inline constexpr int64_t kChannelBlock = 256;  // channels-last tiles: channels per tile

struct Geometry {
  int64_t N, C, S;
  bool channels_last;

  int64_t per_channel() const { return N * S; }
};

// True when `x` is laid out as a row-major (N * S, C) matrix.
inline bool is_channels_last_dense(const at::Tensor& x) {
  std::vector<int64_t> order{0};
  for (int64_t d = 2; d < x.dim(); ++d) order.push_back(d);
  order.push_back(1);
  return x.permute(order).is_contiguous();
}

// NCHW when x is contiguous (unless S == 1, where the matrix walk is the better one), channels-last when
// x is a dense (N*S, C) matrix; anything else is rejected (the Python front door copies it first).
inline Geometry geometry_of(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() >= 2, name, ": expected at least 2 dims (N, C, ...), got ", x.sizes());
  Geometry g{x.size(0), x.size(1), 1, false};
  for (int64_t d = 2; d < x.dim(); ++d) g.S *= x.size(d);
  const bool nchw = x.is_contiguous();
  const bool cl = is_channels_last_dense(x);
  TORCH_CHECK(nchw || cl, name, ": expected a contiguous or channels-last tensor, got strides ", x.strides());
  g.channels_last = cl && (g.S == 1 || !nchw);
  return g;
}

struct Tiling {
  int64_t chunk;    // elements (NCHW) or rows (channels-last) per tile along M
  int64_t groups;   // G: tiles along M, the leading dim of every (G, C) partial buffer
  int64_t blocks;   // channel blocks (channels-last), 1 channel per tile (NCHW)
  int64_t width;    // channels per block

  int64_t count(int64_t g, int64_t M) const { return std::min(chunk, M - g * chunk); }
};

inline Tiling tiling_of(const Geometry& geo) {
  const int64_t M = geo.per_channel();
  Tiling t{};
  if (geo.channels_last) {
    t.width = std::min<int64_t>(std::max<int64_t>(geo.C, 1), kChannelBlock);
    t.blocks = (geo.C + t.width - 1) / t.width;
    t.chunk = std::max<int64_t>(1, kTileElems / t.width);
  } else {
    t.width = 1;
    t.blocks = geo.C;
    t.chunk = kTileElems;
  }
  t.groups = std::max<int64_t>(1, (M + t.chunk - 1) / t.chunk);
  return t;
}

struct Tile {
  int64_t g;       // index along M
  int64_t c0, c1;  // channels [c0, c1)
  int64_t m0, m1;  // elements of each channel [m0, m1)
};

// Runs f(tile) for every tile, in parallel; small inputs stay on one thread.
template <typename F>
void parallel_for_tiles(const Geometry& geo, const Tiling& t, const F& f) {
  const int64_t M = geo.per_channel();
  const int64_t ntiles = t.groups * t.blocks;
  const int64_t grain = std::max<int64_t>(1, 4 * kTileElems / std::max<int64_t>(1, t.chunk * t.width));
  at::parallel_for(0, ntiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      // NCHW: consecutive tiles walk one channel; channels-last: consecutive tiles walk one row range.
      const int64_t g = geo.channels_last ? i / t.blocks : i % t.groups;
      const int64_t b = geo.channels_last ? i % t.blocks : i / t.groups;
      const int64_t c0 = b * t.width;
      f(Tile{g, c0, std::min(c0 + t.width, geo.C), g * t.chunk, std::min((g + 1) * t.chunk, M)});
    }
  });
}

// Calls f(offset, len) for each contiguous run of channel c's elements [m0, m1) in an NCHW tensor.
template <typename F>
inline void for_each_run(const Geometry& geo, int64_t c, int64_t m0, int64_t m1, const F& f) {
  int64_t n = m0 / geo.S;
  int64_t s = m0 % geo.S;
  for (int64_t m = m0; m < m1; ++n, s = 0) {
    const int64_t len = std::min(geo.S - s, m1 - m);
    f((n * geo.C + c) * geo.S + s, len);
    m += len;
  }
}

// Per-channel parameter vectors: broadcast from one channel (NCHW) or loaded over channels (channels-last).
template <typename T, size_t NP>
using ParamPtrs = std::array<const T*, NP>;
template <typename T, size_t NP>
using ParamVecs = std::array<at::vec::Vectorized<T>, NP>;

template <typename T, size_t NP>
inline ParamVecs<T, NP> broadcast_params(const ParamPtrs<T, NP>& p, int64_t c) {
  ParamVecs<T, NP> v;
  for (size_t k = 0; k < NP; ++k) v[k] = at::vec::Vectorized<T>(p[k][c]);
  return v;
}

template <typename T, size_t NP>
inline ParamVecs<T, NP> load_params(const ParamPtrs<T, NP>& p, int64_t c, int64_t n) {
  ParamVecs<T, NP> v;
  for (size_t k = 0; k < NP; ++k) v[k] = at::vec::Vectorized<T>::loadu(p[k] + c, n);
  return v;
}

// Elementwise pass over one tile: out = f(params, inputs...) for every element.
template <typename scalar_t, size_t NP, size_t NI, typename F>
void map_tile(const Geometry& geo, const Tile& tile, const std::array<const scalar_t*, NI>& in,
              const ParamPtrs<opmath_t<scalar_t>, NP>& params, scalar_t* out, const F& f) {
  using Vec = MathVec<scalar_t>;
  constexpr int64_t V = Vec::size();
  auto step = [&](const ParamVecs<opmath_t<scalar_t>, NP>& P, int64_t off, int64_t n) {
    std::array<Vec, NI> X;
    for (size_t i = 0; i < NI; ++i) X[i] = load(in[i] + off, n);
    store(out + off, f(P, X), n);
  };
  if (geo.channels_last) {
    for (int64_t r = tile.m0; r < tile.m1; ++r) {
      for (int64_t c = tile.c0; c < tile.c1; c += V) {
        const int64_t n = std::min(V, tile.c1 - c);
        step(load_params(params, c, n), r * geo.C + c, n);
      }
    }
  } else {
    const auto P = broadcast_params(params, tile.c0);
    for_each_run(geo, tile.c0, tile.m0, tile.m1, [&](int64_t off, int64_t len) {
      for (int64_t i = 0; i < len; i += V) step(P, off + i, std::min(V, len - i));
    });
  }
}

// Reduction over one tile: acc[k][c] = sum over the tile's elements of channel c of f(params, inputs...)[k].
// acc[k] is indexed by channel; lanes past a tail are masked out before they are added.
template <typename scalar_t, size_t NP, size_t NI, size_t K, typename F>
void reduce_tile(const Geometry& geo, const Tile& tile, const std::array<const scalar_t*, NI>& in,
                 const ParamPtrs<opmath_t<scalar_t>, NP>& params, const std::array<opmath_t<scalar_t>*, K>& acc,
                 const F& f) {
  using T = opmath_t<scalar_t>;
  using Vec = MathVec<scalar_t>;
  constexpr int64_t V = Vec::size();
  auto terms = [&](const ParamVecs<T, NP>& P, int64_t off, int64_t n) {
    std::array<Vec, NI> X;
    for (size_t i = 0; i < NI; ++i) X[i] = load(in[i] + off, n);
    std::array<Vec, K> t = f(P, X);
    if (n < V) {
      for (size_t k = 0; k < K; ++k) t[k] = Vec::set(Vec(T(0)), t[k], n);
    }
    return t;
  };
  if (geo.channels_last) {
    for (size_t k = 0; k < K; ++k) std::fill(acc[k] + tile.c0, acc[k] + tile.c1, T(0));
    for (int64_t r = tile.m0; r < tile.m1; ++r) {
      for (int64_t c = tile.c0; c < tile.c1; c += V) {
        const int64_t n = std::min(V, tile.c1 - c);
        const auto t = terms(load_params(params, c, n), r * geo.C + c, n);
        for (size_t k = 0; k < K; ++k) (Vec::loadu(acc[k] + c, n) + t[k]).store(acc[k] + c, n);
      }
    }
  } else {
    const auto P = broadcast_params(params, tile.c0);
    std::array<Vec, K> sum;
    sum.fill(Vec(T(0)));
    for_each_run(geo, tile.c0, tile.m0, tile.m1, [&](int64_t off, int64_t len) {
      for (int64_t i = 0; i < len; i += V) {
        const auto t = terms(P, off + i, std::min(V, len - i));
        for (size_t k = 0; k < K; ++k) sum[k] = sum[k] + t[k];
      }
    });
    for (size_t k = 0; k < K; ++k) acc[k][tile.c0] = reduce_add(sum[k]);
  }
}

}  // namespace fusedrect::cpu
