// How a BatchNorm input is walked on the CPU.
//
// The input is viewed as (N, C, S) in one of two native layouts (NCHW or channels-last, ../bn_act_args.h).
// Work is cut into tiles of ~kTileElems elements, small enough to stay in L2 so a tile can be read twice
// cheaply, each one or a few blocks of memory (elementwise passes walk them in address order, so the hardware
// prefetchers stream them; reductions keep their sums in registers, walking an NCHW tile channel by channel and
// a channels-last one in blocks of channel vectors down its rows: for_channel_blocks):
//   NCHW           samples [n0, n1) x channels [c0, c1) x positions [s0, s1): whole planes when C * S is
//                  small, runs of whole channels over a few samples when S is small (kMinChannelElems of each
//                  channel where N allows, or at least about half that: the samples are shared out evenly
//                  between the rows of tiles; the statistics' tiles more, bn_act.cpp), a piece of one run when S
//                  is large;
//   channels-last  rows [r0, r1) x channels [c0, c1).
// Tiles depend only on the shape, never on the thread count: a reduction writes one partial per (tile row g,
// channel) into a (G, C) buffer and merges the G partials in a fixed order, so results are bitwise
// reproducible.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <utility>
#include <vector>

#include "../bn_act_args.h"
#include "vec_io.h"

namespace fusedrect::cpu {

// On a lambda that runs once per vector (a walk's step, a reduction's terms): GCC had left such lambdas out of
// line in many of the ops' instantiations, a call for every vector with its vector registers saved around it
// (bf16's NCHW backward reduction took 1.55x the time, one thread).
#if defined(__GNUC__)
#define FUSEDRECT_PER_VECTOR __attribute__((always_inline))
#else
#define FUSEDRECT_PER_VECTOR
#endif

inline constexpr int64_t kTileElems = 16384;
inline constexpr int64_t kChannelBlock = 1024;  // channels-last tiles: at most this many channels
inline constexpr int64_t kMinChannelElems = 256;  // NCHW tiles: elements per channel (N allowing)

struct Tile {
  int64_t g;       // row of the (G, C) partial buffers
  int64_t n0, n1;  // samples (NCHW) or rows (channels-last)
  int64_t c0, c1;  // channels
  int64_t s0, s1;  // positions within a run (NCHW; [0, 1) for channels-last)

  int64_t count() const { return (n1 - n0) * (s1 - s0); }  // elements per channel
};

struct Tiling {
  int64_t rows;                          // samples (NCHW) or rows (channels-last)
  int64_t n_per, c_per, s_per;           // tile extents (at most; rows are shared out evenly, below)
  int64_t n_blocks, c_blocks, s_blocks;  // tiles along each extent
  int64_t groups() const { return n_blocks * s_blocks; }  // G
  // The first row of tile row gn: the rows are shared out evenly (sizes differ by at most one), so that no tile
  // row is a small remainder (32 samples of 7x7 in rows of 6 had left 2 for the last, which then took the slow
  // run-by-run statistics and left a thread idle).
  int64_t row_begin(int64_t gn) const {  // floor(gn * rows / n_blocks), without the product's overflow
    return gn * (rows / n_blocks) + gn * (rows % n_blocks) / n_blocks;
  }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// min_channel_elems: NCHW tiles of runs shorter than it hold about that many elements of each channel (N allowing).
// max_channels > 0: NCHW tiles hold at most that many channels, their samples filling the rest (slabs, below).
inline Tiling tiling_of(const Geometry& geo, int64_t min_channel_elems = kMinChannelElems, int64_t max_channels = 0) {
  const int64_t C = std::max<int64_t>(geo.C, 1);
  Tiling t{};
  if (geo.channels_last) {
    t.c_per = std::min(C, kChannelBlock);
    t.n_per = std::max<int64_t>(1, kTileElems / t.c_per);
    t.s_per = 1;
    t.n_blocks = ceil_div(geo.per_channel(), t.n_per);
    t.s_blocks = 1;
  } else {
    // Short runs (small S): several samples per tile, so that a reduction sums about min_channel_elems of each
    // channel (at least about half, row_begin) in vector lanes before one horizontal sum.
    t.s_per = std::min(std::max<int64_t>(geo.S, 1), kTileElems);
    const int64_t runs = std::max<int64_t>(1, kTileElems / t.s_per);
    const int64_t min_samples =
        std::clamp<int64_t>(ceil_div(min_channel_elems, t.s_per), 1, std::max<int64_t>(geo.N, 1));
    t.c_per = std::min(C, std::max<int64_t>(1, runs / min_samples));
    t.n_per = t.c_per == C ? std::max<int64_t>(1, runs / C) : min_samples;
    if (max_channels > 0 && t.c_per > max_channels) {
      t.c_per = max_channels;
      t.n_per = runs / max_channels;  // at least min_samples
    }
    t.n_blocks = ceil_div(geo.N, t.n_per);
    t.s_blocks = ceil_div(geo.S, t.s_per);
  }
  t.rows = geo.channels_last ? geo.per_channel() : geo.N;
  t.c_blocks = ceil_div(geo.C, t.c_per);
  t.n_blocks = std::max<int64_t>(t.n_blocks, 1);
  t.s_blocks = std::max<int64_t>(t.s_blocks, 1);
  return t;
}

// Tile i of t (tile rows outermost, then channel blocks, then pieces of runs).
inline Tile tile_at(const Geometry& geo, const Tiling& t, int64_t i) {
  const int64_t positions = geo.channels_last ? 1 : geo.S;
  const int64_t gs = i % t.s_blocks;
  const int64_t b = (i / t.s_blocks) % t.c_blocks;
  const int64_t gn = i / (t.s_blocks * t.c_blocks);
  return Tile{gn * t.s_blocks + gs,
              t.row_begin(gn), t.row_begin(gn + 1),
              b * t.c_per, std::min((b + 1) * t.c_per, geo.C),
              gs * t.s_per, std::min((gs + 1) * t.s_per, positions)};
}

// Runs f(tile) for every tile, in parallel: each thread takes a contiguous range of tiles (of memory, but where
// NCHW tiles hold part of the channels of several samples) holding an even share of the elements, the tiles
// whose first element falls in its share (shared out by tile count instead, 32x512x7x7 NCHW's 60 tiles of
// unequal sizes had given one thread 18 samples' work and the other 14); small inputs stay on one thread.
template <typename F>
void parallel_for_tiles(const Geometry& geo, const Tiling& t, const F& f) {
  const int64_t ntiles = t.n_blocks * t.c_blocks * t.s_blocks;
  const int64_t total = t.rows * geo.C * (geo.channels_last ? 1 : geo.S);
  at::parallel_for(0, total, 4 * kTileElems, [&](int64_t begin, int64_t end) {
    int64_t first = 0;  // of the tile i, in the walk's order
    for (int64_t i = 0; i < ntiles && first < end; ++i) {
      const Tile tile = tile_at(geo, t, i);
      if (first >= begin) f(tile);
      first += tile.count() * (tile.c1 - tile.c0);
    }
  });
}

// Elements per channel in each tile row g of the partial buffers (the same for every channel).
inline std::vector<int64_t> tile_counts(const Geometry& geo, const Tiling& t) {
  const int64_t positions = geo.channels_last ? 1 : geo.S;
  std::vector<int64_t> counts(t.groups());
  for (int64_t gn = 0; gn < t.n_blocks; ++gn) {
    for (int64_t gs = 0; gs < t.s_blocks; ++gs) {
      counts[gn * t.s_blocks + gs] = (t.row_begin(gn + 1) - t.row_begin(gn)) *
                                     (std::min((gs + 1) * t.s_per, positions) - gs * t.s_per);
    }
  }
  return counts;
}

// Calls f(channel, offset, len) for each contiguous run of an NCHW tile, in address order.
template <typename F>
inline void for_each_run(const Geometry& geo, const Tile& tile, const F& f) {
  for (int64_t n = tile.n0; n < tile.n1; ++n) {
    for (int64_t c = tile.c0; c < tile.c1; ++c) f(c, (n * geo.C + c) * geo.S + tile.s0, tile.s1 - tile.s0);
  }
}

// A hint to bring the line holding p into the caches (no fault where p is not mapped).
inline void prefetch(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 3);
#endif
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

// How many vectors a pass keeps in registers at once: the column blocks of shifted_stats (2 * kBlockVectors vectors
// of 3 values: 12 of AVX2's 16 registers, 24 of AVX-512's 32), the widest channels-last rows whose parameters
// map_tile keeps in registers, and about kBlockVectors sums in flight in reduce_tile's NCHW walk.
#ifdef CPU_CAPABILITY_AVX512
inline constexpr size_t kBlockVectors = 4;
#else
inline constexpr size_t kBlockVectors = 2;
#endif

// A reduction walks a channels-last tile in blocks of kReduceBlockVectors vectors of channels, every row of the
// tile for one block before the next, so that the block's sums stay in registers (an elementwise pass walks it
// row by row instead, its writes in address order: blocked, it measured slower here): for_channel_blocks.
// The blocks are 4 vectors on every capability: two lines of each fp32 input a row on AVX2, whose walk down the
// rows waits on memory, not on registers. With AVX2's 2 vectors (one line) a step had half the loads in flight,
// and PReLU's backward sums took 1.17-1.28x this time (AMD Zen 3, one thread, the four ResNet stages; median of 6
// alternating pairs of processes), although 12 sums of 16 registers now leave the parameters on the stack.
// (In 6 more pairs, at a time when every build ran about 1.6x faster, the two were within 0.94-1.08 of each
// other.)
inline constexpr size_t kReduceBlockVectors = 4;

// Calls f(std::integral_constant<size_t, B>{}) with B = n, for 1 <= n <= kMax.
template <size_t kMax, typename F>
inline void with_vector_count(int64_t n, const F& f) {
  if constexpr (kMax > 1) {
    if (n < int64_t(kMax)) return with_vector_count<kMax - 1>(n, f);
  }
  f(std::integral_constant<size_t, kMax>{});
}

// Calls f(std::integral_constant<size_t, I>{}) for I = 0, ..., N - 1, unrolled, so that an array indexed by I has
// constant indices: GCC then keeps it in registers (a channel block's sums, a short row's parameters), where with
// a loop over I it kept a block's sums on the stack, a load and a store for every add (channels-last fp32, one
// thread: the backward's reduction 1.3x, the eval forward over 64 channels 2x the time).
template <typename F, size_t... I>
inline void static_for_each(const F& f, std::index_sequence<I...>) {
  (f(std::integral_constant<size_t, I>{}), ...);
}

template <size_t N, typename F>
inline void static_for(const F& f) {
  static_for_each(f, std::make_index_sequence<N>{});
}

// Walks the elements [begin, end) in blocks of vectors: f(i, std::integral_constant<size_t, B>{}, V) for blocks of B
// whole vectors from i, then one block of the whole vectors left (fewer than B), then f(i, 1, n) for a last vector of
// n < V lanes. (for_channel_blocks, below, walks a tile's channels so.) Left over one by one, AVX-512's 4 vectors of
// 64 channels-last channels had been 4 walks of one chain of adds each down the rows, where shifted_stats takes 8
// vectors at a time: 32x64x56x56's statistics took 2x the time of 32x128x28x28's (about 1 copy of the input against
// 0.5, two threads). Each vector's sums still add the rows in order, but the results may differ in the last bits from
// the one-by-one walk's: with n = V known, the compiler fuses some multiplies into the sums' adds (FMA) that it kept
// apart where n was a run-time value.
template <size_t B, int64_t V, typename F>
inline void for_vector_blocks(int64_t begin, int64_t end, const F& f) {
  static_assert(B > 1, "blocks of one vector: the last call would take more than a vector");
  int64_t i = begin;
  for (; i + int64_t(B) * V <= end; i += B * V) f(i, std::integral_constant<size_t, B>{}, V);
  const int64_t whole = (end - i) / V;
  if (whole > 0) {
    with_vector_count<B - 1>(whole, [&](auto vectors) { f(i, vectors, V); });
    i += whole * V;
  }
  if (i < end) f(i, std::integral_constant<size_t, 1>{}, end - i);
}

// for_vector_blocks over the tile's channels: f(c, std::integral_constant<size_t, B>{}, n) for blocks of B full
// vectors of channels from c, then for one block of the full vectors left, then for a last vector of n < V lanes
// where the tile's channels are not a multiple of V.
template <size_t B, int64_t V, typename F>
inline void for_channel_blocks(const Tile& tile, const F& f) {
  for_vector_blocks<B, V>(tile.c0, tile.c1, f);
}

// Walks a contiguous segment of `len` elements in vectors: store_at(i, compute_at(i, n), n) for each vector at
// element i with n lanes. Where len is not a multiple of V but at least V, the tail is the whole vector ending at
// len, overlapping the one before it (its overlapped lanes the same values, bit for bit: every lane is computed
// alike): computed first and stored last, so that where the output is also an input (dx into grad_out) every
// element is still read before it is written. Only a segment shorter than a vector takes a partial (masked) store:
// AVX2's masked store is microcoded on AMD's cores, and one per 7x7 run had cost about a fifth of the NCHW eval
// forward (one thread, 32x512x7x7). A segment of whole vectors is walked in address order: with its last vector
// first as well, every channels-last row began with a load a row's length ahead, and the backward over 96, 128,
// 256 and 512 channels (28x28 to 7x7) took 1.02-1.16x the time, the eval forward and the elementwise half 0.96-1.10x
// (two threads, fp32, AVX-512, the two walks alternated in one process, caches flushed before each call or not;
// NCHW within 0.93-1.04x).
template <int64_t V, typename Compute, typename Store>
inline void for_vectors_of_segment(int64_t len, const Compute& compute_at, const Store& store_at) {
  if (len < V) {
    if (len > 0) store_at(0, compute_at(0, len), len);
    return;
  }
  if (len % V == 0) {
    for (int64_t i = 0; i < len; i += V) store_at(i, compute_at(i, V), V);
    return;
  }
  const auto last = compute_at(len - V, V);
  for (int64_t i = 0; i + V < len; i += V) store_at(i, compute_at(i, V), V);
  store_at(len - V, last, V);
}

// NCHW tiles of runs shorter than a vector and at least this many samples are walked sample by sample over a copy
// of the parameters spread out to every position (map_tile): fewer samples would not repay the copy.
inline constexpr int64_t kSpreadSamples = 4;

// An elementwise pass whose inputs and output together are larger than this writes its output's whole, aligned
// vectors past the caches (store_streaming), where the capability can: the output would leave the caches before
// it is read anyway, and a cached store first reads each line it writes. Not where the output is also an input
// (dx into grad_out): its lines are in the cache already, just read. 32 MiB is the L3 of one of AMD's core
// complexes. Two threads, AVX-512 (AMD Zen 4, a VM), fp32, 32x64x56x56, the op alone in a loop: the eval forward
// took 0.78-0.86x the time, the backward's elementwise pass 0.64-0.85x (in the benchmark, training forward and
// backward 3.5-4.4 copies of the input against 4.4-5.1), and at 32x128x28x28 (38.5 MB) 0.86-0.92x; smaller passes
// lost by it (in the same loop, with every pass streaming: 32x128x28x28's eval forward, 26 MB in all, 0.99-1.19x
// the time, 32x256x14x14's 4x, its output no longer in L3 for the next call).
inline constexpr int64_t kStreamingBytes = int64_t(32) << 20;

// Elementwise pass over one tile: out = f(params, inputs...) for every element; its whole vectors past the caches
// where the pass is larger than kStreamingBytes.
template <typename scalar_t, size_t NP, size_t NI, typename F>
void map_tile(const Geometry& geometry, const Tile& walked, const std::array<const scalar_t*, NI>& inputs,
              const ParamPtrs<opmath_t<scalar_t>, NP>& rows, scalar_t* out, const F& f) {
  // Local copies of what the loops read: a vector store may alias any memory (the intrinsics' vector types are
  // may_alias), so values read through these references were read again after every store.
  const Geometry geo = geometry;
  const Tile tile = walked;
  const std::array<const scalar_t*, NI> in = inputs;
  const ParamPtrs<opmath_t<scalar_t>, NP> params = rows;
  using Vec = MathVec<scalar_t>;
  constexpr int64_t V = Vec::size();
  auto compute = [&](const ParamVecs<opmath_t<scalar_t>, NP>& P, int64_t off, int64_t n) FUSEDRECT_PER_VECTOR {
    std::array<Vec, NI> X;
    for (size_t i = 0; i < NI; ++i) X[i] = load(in[i] + off, n);
    return f(P, X);
  };
  const bool in_place = std::find(in.begin(), in.end(), out) != in.end();
  const bool streaming = kCanStream<scalar_t> && !in_place &&
                         geo.per_channel() * geo.C * int64_t(sizeof(scalar_t) * (NI + 1)) > kStreamingBytes;
  auto store_at = [&](int64_t off, const Vec& v, int64_t n) FUSEDRECT_PER_VECTOR {
    if (streaming && n == V) {
      store_streaming(out + off, v);
    } else {
      store(out + off, v, n);
    }
  };
  const int64_t width = tile.c1 - tile.c0;
  const int64_t row_vectors = ceil_div(width, V);
  if (geo.channels_last && row_vectors <= int64_t(kBlockVectors)) {
    // Row by row (writes in address order), a row's parameters loaded once for all rows (in registers where
    // they fit: up to 7 per vector); its last vector as for_vectors_of_segment's (the whole vector ending at the
    // row's end where the row holds one: computed first, stored last).
    with_vector_count<kBlockVectors>(row_vectors, [&](auto vectors) {
      constexpr size_t B = decltype(vectors)::value;
      const int64_t last_lanes = std::min(width, V);
      const int64_t last_at = width - last_lanes;  // from the row's first channel
      std::array<ParamVecs<opmath_t<scalar_t>, NP>, B> P;
      for (size_t j = 0; j + 1 < B; ++j) P[j] = load_params(params, tile.c0 + j * V, V);
      P[B - 1] = load_params(params, tile.c0 + last_at, last_lanes);
      for (int64_t r = tile.n0; r < tile.n1; ++r) {
        const int64_t row = r * geo.C + tile.c0;
        const Vec last = compute(P[B - 1], row + last_at, last_lanes);
        static_for<B - 1>([&](auto j) FUSEDRECT_PER_VECTOR {
          store_at(row + j * V, compute(P[j], row + j * V, V), V);
        });
        store_at(row + last_at, last, last_lanes);
      }
    });
  } else if (geo.channels_last) {
    // Wide rows, row by row in address order (the hardware prefetchers stream them), each vector's parameters
    // re-read from L1 (whole lines: the callers' rows are line-aligned, ChannelTable; only a row's tail, the
    // vector ending at its last channel, may span two where C is not a multiple of V). In groups of 4 rows, each
    // vector's parameters loaded once for the group (out of address order, the next tile prefetched by
    // software), it took 1.3-1.4x this time (one thread, fp32, 32x256x14x14 and 32x128x28x28).
    for (int64_t r = tile.n0; r < tile.n1; ++r) {
      const int64_t row = r * geo.C + tile.c0;
      for_vectors_of_segment<V>(
          width,
          [&](int64_t i, int64_t n) FUSEDRECT_PER_VECTOR {
            return compute(load_params(params, tile.c0 + i, n), row + i, n);
          },
          [&](int64_t i, const Vec& v, int64_t n) FUSEDRECT_PER_VECTOR { store_at(row + i, v, n); });
    }
  } else if (geo.S < V && tile.n1 - tile.n0 >= kSpreadSamples) {
    // Runs shorter than a vector (NCHW 2x2, say): each sample's part of the tile, (c1 - c0) * S contiguous
    // elements, is one segment, walked over the parameters repeated S times a channel (a copy per tile, shared
    // by its samples). Run by run, each run was one partial vector, a masked store, microcoded on AMD's cores.
    using T = opmath_t<scalar_t>;
    const int64_t len = width * geo.S;
    const int64_t spread_vectors = ceil_div(len, V);  // per row
    std::vector<Vec> spread(NP * spread_vectors);  // vector-aligned rows: no load spans two lines
    ParamPtrs<T, NP> spread_rows;
    for (size_t k = 0; k < NP; ++k) {
      T* row = reinterpret_cast<T*>(spread.data() + k * spread_vectors);
      for (int64_t c = tile.c0; c < tile.c1; ++c) std::fill_n(row + (c - tile.c0) * geo.S, geo.S, params[k][c]);
      spread_rows[k] = row;
    }
    for (int64_t n = tile.n0; n < tile.n1; ++n) {
      const int64_t base = (n * geo.C + tile.c0) * geo.S;
      for_vectors_of_segment<V>(
          len,
          [&](int64_t i, int64_t m) FUSEDRECT_PER_VECTOR {
            return compute(load_params(spread_rows, i, m), base + i, m);
          },
          [&](int64_t i, const Vec& v, int64_t m) FUSEDRECT_PER_VECTOR { store_at(base + i, v, m); });
    }
  } else {
    for_each_run(geo, tile, [&](int64_t c, int64_t off, int64_t len) {
      const auto P = broadcast_params(params, c);
      for_vectors_of_segment<V>(
          len, [&](int64_t i, int64_t n) FUSEDRECT_PER_VECTOR { return compute(P, off + i, n); },
          [&](int64_t i, const Vec& v, int64_t n) FUSEDRECT_PER_VECTOR { store_at(off + i, v, n); });
    });
  }
  if (streaming) streaming_fence();
}

// Reduction over one tile: acc[k][c] = sum over the tile's elements of channel c of f(params, inputs...)[k].
// acc[k] is indexed by channel; lanes past a tail are masked out before they are added.
template <typename scalar_t, size_t NP, size_t NI, size_t K, typename F>
void reduce_tile(const Geometry& geo, const Tile& tile, const std::array<const scalar_t*, NI>& inputs,
                 const ParamPtrs<opmath_t<scalar_t>, NP>& rows, const std::array<opmath_t<scalar_t>*, K>& acc,
                 const F& f) {
  using T = opmath_t<scalar_t>;
  using Vec = MathVec<scalar_t>;
  constexpr int64_t V = Vec::size();
  // Local copies, as in map_tile: read through the references, the pointers were loaded again for every vector
  // (channels-last, where registers run short: from the stack, with the loop's counter).
  const std::array<const scalar_t*, NI> in = inputs;
  const ParamPtrs<T, NP> params = rows;
  auto terms = [&](const ParamVecs<T, NP>& P, int64_t off, int64_t n) FUSEDRECT_PER_VECTOR {
    std::array<Vec, NI> X;
    for (size_t i = 0; i < NI; ++i) X[i] = load(in[i] + off, n);
    std::array<Vec, K> t = f(P, X);
    if (n < V) {
      for (size_t k = 0; k < K; ++k) t[k] = Vec::set(Vec(T(0)), t[k], n);
    }
    return t;
  };
  if (geo.channels_last) {
    // Each step down a block's rows reads a new line of every input, a row apart, which the hardware
    // prefetchers did not see coming: the backward's reduction waited on those loads (AMD Zen 3, one thread,
    // 32x128x28x28: 2.7x the NCHW time). So each step also prefetches as many elements of the rows after the
    // tile (the thread's next tile, where tiles span every channel), in address order.
    const int64_t C = geo.C;
    const int64_t ahead =
        tile.c0 == 0 && tile.c1 == C ? std::min(tile.n1 - tile.n0, geo.per_channel() - tile.n1) * C : 0;  // elements
    int64_t fetched = 0;
    constexpr int64_t kLineElems = std::max<int64_t>(1, 64 / int64_t(sizeof(scalar_t)));
    for_channel_blocks<kReduceBlockVectors, V>(tile, [&](int64_t c, auto block, int64_t n) {
      constexpr size_t B = decltype(block)::value;
      std::array<std::array<Vec, K>, B> sum;
      static_for<B>([&](auto j) { sum[j].fill(Vec(T(0))); });
      // The block's parameters loaded once for all its rows: where they and the sums outnumber the registers
      // (PReLU's backward sums: 16 parameter vectors and 12 sums) the compiler keeps some on the stack, and
      // that still took 0.86-0.98x the time of loading every row's from the table (the sums alone over 96-512
      // channels, PReLU and ReLU, AVX-512 and AVX2, two threads, caches warm; 1.01-1.02x over 64).
      std::array<ParamVecs<T, NP>, B> P;
      static_for<B>([&](auto j) { P[j] = load_params(params, c + j * V, n); });
      for (int64_t r = tile.n0; r < tile.n1; ++r) {  // each channel's rows in order, as in NCHW
        if (fetched < ahead) {  // every line of the step's share: B * V elements
          for (int64_t e = fetched; e < std::min(fetched + int64_t(B) * V, ahead); e += kLineElems) {
            for (size_t i = 0; i < NI; ++i) prefetch(in[i] + tile.n1 * C + e);
          }
          fetched += int64_t(B) * V;
        }
        static_for<B>([&](auto j) {
          const auto t = terms(P[j], r * C + c + j * V, n);
          for (size_t k = 0; k < K; ++k) sum[j][k] = sum[j][k] + t[k];
        });
      }
      static_for<B>([&](auto j) {
        for (size_t k = 0; k < K; ++k) sum[j][k].store(acc[k] + c + j * V, n);
      });
    });
  } else {
    // Channel by channel, its runs (one per sample) summed in vector lanes, one horizontal sum per channel.
    // A run is `full` whole vectors and a tail of `tail` lanes (the same for every run of the tile), summed into
    // U independent sums per term, vector j of a run into sums[j % U] and the tail (its lanes past the run
    // masked out) into sums[U - 1], combined in a fixed order. With one sum per term every add waits for the one
    // before: the statistics' passes (one or two terms of one or two operations each) took 1.4x the time in
    // short runs. U = kBlockVectors / K keeps about kBlockVectors sums in flight, and at least two per term
    // where there are one or two terms (AVX2's one sum per term had left the statistics' second pass waiting on
    // each fused multiply-add: one thread, NCHW, 32x256x14x14 and 32x128x28x28 took 1.2-1.3x the time; ReLU's
    // backward sums, two terms, took as long or longer); more of them slowed PReLU's backward, three terms whose
    // operations already fill the pipelines, by setting up and combining them (AVX2, two per term: 32x512x7x7
    // NCHW 1.07x the time).
    constexpr size_t U = std::max<size_t>(K <= 2 ? 2 : 1, kBlockVectors / K);
    const int64_t len = tile.s1 - tile.s0;
    const int64_t full = len / V;
    const int64_t tail = len - full * V;
    const int64_t unrolled = full / int64_t(U) * int64_t(U);
    for (int64_t c = tile.c0; c < tile.c1; ++c) {
      const auto P = broadcast_params(params, c);
      std::array<std::array<Vec, K>, U> sums;
      static_for<U>([&](auto u) { sums[u].fill(Vec(T(0))); });
      auto add = [&](auto u, int64_t off, int64_t n) FUSEDRECT_PER_VECTOR {
        const auto t = terms(P, off, n);
        for (size_t k = 0; k < K; ++k) sums[u][k] = sums[u][k] + t[k];
      };
      for (int64_t n = tile.n0; n < tile.n1; ++n) {
        const int64_t off = (n * geo.C + c) * geo.S + tile.s0;
        for (int64_t j = 0; j < unrolled; j += U) {
          static_for<U>([&](auto u) FUSEDRECT_PER_VECTOR { add(u, off + (j + int64_t(u)) * V, V); });
        }
        static_for<U - 1>([&](auto u) FUSEDRECT_PER_VECTOR {
          if (unrolled + int64_t(u) < full) add(u, off + (unrolled + int64_t(u)) * V, V);
        });
        if (tail != 0) add(std::integral_constant<size_t, U - 1>{}, off + full * V, tail);
      }
      for (size_t k = 0; k < K; ++k) {
        Vec sum = sums[0][k];
        static_for<U - 1>([&](auto u) { sum = sum + sums[u + 1][k]; });
        acc[k][c] = reduce_add(sum);
      }
    }
  }
}

// Two passes over an NCHW input larger than kStreamingBytes (the op's inputs and output together), a reduction and
// then an elementwise pass over what it read (the training forward: statistics, then the output; the backward:
// the sums, then dx), run slab by slab: each thread reduces the tiles of a channel block, finishes its channels
// and walks the same tiles again while they are in its caches, where the whole-input walk's second pass found
// none of it there. Two threads, AVX-512 (AMD Zen 4, a VM), fp32, the caches flushed before each call, the two
// walks alternated in one process: the backward of 32x64x56x56, 64x64x56x56, 32x128x56x56, 128x64x56x56,
// 16x64x112x112, 32x256x28x28 and 64x512x14x14 took 0.73-0.85x the time, the training forward 0.83-0.97x
// (128x512x7x7: 0.94x and 0.98x). Smaller inputs keep the whole-input walk, whose second pass reads L3: slab by
// slab, 32x128x28x28's, 32x256x14x14's and 32x512x7x7's passes took 0.95-1.04x the time (caches flushed; 40
// pairs) and 0.98-1.01x (not).
// Channels-last inputs too: there a slab of a few channels is a line or two of every row, and 32x64x56x56's
// backward took 1.25x the time (slabs of 16 channels).
// A slab's tiles hold at most about kSlabBytes of the inputs that both passes read, where one channel allows
// (every element of a channel is reduced before any is walked again), so that it stays in the caches of the
// thread working on it; and slabs are walked only where each thread gets at least kSlabsPerThread of them
// (fewer leave a thread idle at the end: 13 slabs on two threads are 7 against 6). A slab's tiles are those the
// whole-input walk takes, so the results are the same bits either way.
inline constexpr int64_t kSlabBytes = int64_t(1) << 20;
inline constexpr int64_t kSlabsPerThread = 8;

// How a two-pass op is walked: its tiling, and whether slab by slab (two_passes).
struct TwoPassPlan {
  Tiling tiling;
  bool slabs;
};

// The plan of a two-pass op (reduce_elems as tiling_of's min_channel_elems) whose passes both read `read_bytes`
// bytes of input per element, `pass_bytes` the bytes of its inputs and output in all.
inline TwoPassPlan two_pass_plan(const Geometry& geo, int64_t reduce_elems, int64_t read_bytes, int64_t pass_bytes) {
  const bool large = !geo.channels_last && pass_bytes > kStreamingBytes;
  const int64_t channel_bytes = std::max<int64_t>(1, geo.per_channel() * read_bytes);
  const Tiling t = tiling_of(geo, reduce_elems, large ? std::max<int64_t>(1, kSlabBytes / channel_bytes) : 0);
  return {t, large && t.c_blocks >= kSlabsPerThread * at::get_num_threads()};
}

// Runs reduce(tile) over every tile of t, then finish(c0, c1) over ranges of the channels of at least finish_grain
// channels: a reduction over the whole input (the first half of two_passes' whole-input walk, and the separate
// reduce ops).
template <typename Reduce, typename Finish>
void reduce_whole(const Geometry& geo, const Tiling& t, int64_t finish_grain, const Reduce& reduce,
                  const Finish& finish) {
  parallel_for_tiles(geo, t, reduce);
  at::parallel_for(0, geo.C, finish_grain, finish);
}

// Runs a two-pass op: reduce(tile) over every tile of plan.tiling, finish(c0, c1) for the channels [c0, c1) once
// all their tiles are reduced, then apply(tile) over the input (elementwise: any tiling serves). Slab by slab where
// plan.slabs: each thread a channel block at a time, apply over the block's tiles of plan.tiling in reverse order
// (the last reduced first: where the slab overflows a cache that evicts the least recently used lines, the walk
// then evicts lines it has walked already); else each step over the whole input, finish over
// channel ranges of at least finish_grain channels and apply over the tiles of apply_tiling.
template <typename Reduce, typename Finish, typename Apply>
void two_passes(const Geometry& geo, const TwoPassPlan& plan, int64_t finish_grain, const Tiling& apply_tiling,
                const Reduce& reduce, const Finish& finish, const Apply& apply) {
  const Tiling& t = plan.tiling;
  if (!plan.slabs) {
    reduce_whole(geo, t, finish_grain, reduce, finish);
    parallel_for_tiles(geo, apply_tiling, apply);
    return;
  }
  at::parallel_for(0, t.c_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t tiles = t.groups();  // the block's, k = gn * s_blocks + gs (tile_at)
      auto tile_of = [&](int64_t k) {
        return tile_at(geo, t, (k / t.s_blocks * t.c_blocks + b) * t.s_blocks + k % t.s_blocks);
      };
      for (int64_t k = 0; k < tiles; ++k) reduce(tile_of(k));
      finish(b * t.c_per, std::min((b + 1) * t.c_per, geo.C));
      for (int64_t k = tiles - 1; k >= 0; --k) apply(tile_of(k));
    }
  });
}

}  // namespace fusedrect::cpu
