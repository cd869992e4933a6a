// Host stand-ins for the CUDA built-ins that csrc/cuda's kernels use, so that the kernels compile as C++ and
// run on CPU tensors (tests/test_cuda_emulated.py). Blocks run one after another; the threads of a block are
// fibers switched at every __syncthreads and warp shuffle, so a barrier is: every live thread of the block has
// reached its next switch point. This checks the kernels' arithmetic, indexing, merges and determinism; not the
// GPU's memory model, launch limits or speed.
#pragma once
#include <cuda_runtime.h>
#include <cuda_runtime_api.h>
#include <ucontext.h>
#include <vector>
#include <functional>
#include <memory>
#include <cstdint>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace emu {
struct Dim { unsigned x = 1, y = 1, z = 1; };
inline Dim tid, bid, bdim, gdim;
struct Fiber { ucontext_t ctx; bool done = false; Dim t; };
constexpr size_t kStack = 1 << 16;
inline std::vector<std::unique_ptr<char[]>> stacks;  // one per thread of a block, kept across launches
inline ucontext_t scheduler;
inline Fiber* current = nullptr;
inline std::function<void()> body;
inline std::vector<double> buf;
inline void trampoline() { body(); current->done = true; swapcontext(&current->ctx, &scheduler); }
inline void yield() { swapcontext(&current->ctx, &scheduler); }
inline int linear() { return tid.y * bdim.x + tid.x; }
template <typename K, typename... A>
void launch(dim3 grid, dim3 blk, K kernel, A... args) {
  const int n = blk.x * blk.y * blk.z;
  body = [=] { kernel(args...); };
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::vector<Fiber> fibers(n);
      buf.assign(n, 0.0);
      while (int(stacks.size()) < n) stacks.emplace_back(new char[kStack]);
      int i = 0;
      for (unsigned ty = 0; ty < blk.y; ++ty)
        for (unsigned tx = 0; tx < blk.x; ++tx, ++i) {
          Fiber& f = fibers[i];
          f.t = {tx, ty, 0};
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = stacks[i].get();
          f.ctx.uc_stack.ss_size = kStack;
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, trampoline, 0);
        }
      bid = {bx, by, 0}; bdim = {blk.x, blk.y, blk.z}; gdim = {grid.x, grid.y, grid.z};
      for (bool live = true; live;) {
        live = false;
        for (Fiber& f : fibers) {
          if (f.done) continue;
          current = &f;
          tid = f.t;
          swapcontext(&scheduler, &f.ctx);
          live = live || !f.done;
        }
      }
    }
}
}  // namespace emu

#define threadIdx (::emu::tid)
#define blockIdx (::emu::bid)
#define blockDim (::emu::bdim)
#define gridDim (::emu::gdim)

inline void __syncthreads() { emu::yield(); }
// Products rounded on their own (the host compiler here never fuses a multiply into an add).
#define __fmul_rn(a, b) (float(a) * float(b))
#define __dmul_rn(a, b) (double(a) * double(b))

template <typename T>
T __shfl_down_sync(unsigned, T v, int offset) {
  const int me = emu::linear();
  const int lane = me % 32;
  emu::buf[me] = double(v);  // float and double values, exactly
  emu::yield();
  const double r = lane + offset < 32 ? emu::buf[me + offset] : double(v);
  emu::yield();
  return T(r);
}
