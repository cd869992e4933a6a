// How the kernels' grids cover the (N, C, S) view of the input (../bn_act_args.h).
//
// Reductions are split by the shape alone, never by the device, so their results are bitwise the same on
// every GPU: each block writes one partial per (group g, channel) into a (G, C) buffer, merged in a fixed
// order. Elementwise passes have no order to keep and size their grids to the device.
//   NCHW           reductions: block (c, g) walks a contiguous share (chunk) of channel c's M elements;
//                  elementwise: a 1-D grid strided over the flat tensor, 128-bit vectors.
//   channels-last  2-D blocks: threadIdx.x over groups of V adjacent channels (one 128-bit access per row),
//                  threadIdx.y over rows; grid (channel tiles, row groups).
#pragma once

#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "../bn_act_args.h"
#include "device.cuh"

namespace fusedrect::cuda {

constexpr int64_t kTargetBlocks = 1024;  // blocks a reduction aims for (about one wave on an H100)
constexpr int64_t kMinSteps = 4;         // loop steps per thread before a reduction splits further
constexpr int64_t kWavesPerPass = 4;     // elementwise grids: blocks per SM, in units of 8 resident blocks

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 32-bit index arithmetic where every offset (and one grid stride past the end) fits.
inline bool fits_32bit(int64_t numel) { return numel < (int64_t(1) << 31); }

// Channels-last blocks: bx threads over channel groups of V (a power of two, at most a warp), by over rows.
struct ChannelTile {
  int bx, by;
  int64_t tiles;  // blocks along C
};

inline ChannelTile channel_tile(int64_t C, int V) {
  const int64_t groups = ceil_div(std::max<int64_t>(C, 1), V);
  int bx = 1;
  while (bx < kWarpSize && bx < groups) bx *= 2;
  return {bx, kThreads / bx, ceil_div(std::max<int64_t>(C, 1), int64_t(bx) * V)};
}

struct ReducePlan {
  dim3 grid, block;
  int64_t groups;  // G
  int64_t chunk;   // elements (NCHW) or rows (channels-last) of each channel per group; the last has the rest
};

// `rows_per_call`: rows a channels-last thread reads per step (for_each_row_group's R).
inline ReducePlan reduce_plan(const Geometry& geo, int V, int rows_per_call) {
  const int64_t M = geo.per_channel();
  int64_t blocks_per_group, per_step;
  dim3 block;
  if (geo.channels_last) {
    const ChannelTile t = channel_tile(geo.C, V);
    blocks_per_group = t.tiles;
    per_step = int64_t(t.by) * rows_per_call;
    block = dim3(t.bx, t.by);
  } else {
    blocks_per_group = geo.C;
    per_step = int64_t(kThreads) * V;
    block = dim3(kThreads);
  }
  const int64_t most = std::max<int64_t>(1, kTargetBlocks / blocks_per_group);
  const int64_t wanted = std::clamp<int64_t>(ceil_div(M, kMinSteps * per_step), 1, most);
  int64_t chunk = ceil_div(M, wanted);
  if (!geo.channels_last) chunk = ceil_div(chunk, V) * V;  // vectors stay aligned to the chunk starts
  const int64_t groups = ceil_div(M, chunk);
  return {dim3(blocks_per_group, groups), block, groups, chunk};
}

// Blocks of the per-channel merges over G groups: bx channels by `by` chains over g, then a tree over y.
inline ReducePlan merge_plan(int64_t C) {
  const ChannelTile t = channel_tile(C, 1);
  return {dim3(t.tiles), dim3(t.bx, t.by), 0, 0};
}

struct ElementwisePlan {
  dim3 grid, block;
};

inline int64_t multiprocessors() {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return count;
}

inline ElementwisePlan elementwise_plan(const Geometry& geo, int64_t numel, int V) {
  const int64_t most = multiprocessors() * 8 * kWavesPerPass;
  if (geo.channels_last) {
    const ChannelTile t = channel_tile(geo.C, V);
    const int64_t row_blocks = std::clamp<int64_t>(ceil_div(geo.per_channel(), t.by), 1,
                                                   std::clamp<int64_t>(most / t.tiles, 1, 65535));
    return {dim3(t.tiles, row_blocks), dim3(t.bx, t.by)};
  }
  return {dim3(std::clamp<int64_t>(ceil_div(ceil_div(numel, V), kThreads), 1, most)), dim3(kThreads)};
}

}  // namespace fusedrect::cuda
