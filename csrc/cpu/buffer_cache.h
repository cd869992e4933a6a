// Input-sized outputs of the CPU ops (y, dx) come from a bounded cache of recycled buffers.
//
// Why: PyTorch's CPU allocator does not cache. glibc maps a block above its mmap threshold afresh and unmaps it on
// free, so every training step's outputs are new pages, and each 4 KiB page costs a fault on first touch. On the
// 2-core VMs we measure on, mapping a 3.2 MB output (32x512x7x7 fp32) takes ~0.9 ms even pre-faulted in one
// syscall, where a copy of it takes ~0.1 ms. A freed buffer of at least kMinBytes is kept instead, up to a byte limit
// (the oldest evicted first), and handed to the next request of the same size class (rounded up to 4 KiB), so a
// training loop's outputs reuse the previous step's pages. Smaller requests go to the CPU allocator as before.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fusedrect::cpu {

// An uninitialised tensor with the sizes, strides and dtype of `like` (a dense CPU tensor), its storage from the
// cache (resizable, as any CPU tensor's).
at::Tensor empty_like_recycled(const at::Tensor& like);

struct BufferCacheStats {
  int64_t limit_bytes;   // idle bytes kept at most; 0: nothing is kept
  int64_t idle_bytes;    // held now, waiting for a request
  int64_t idle_buffers;
  int64_t hits, misses;  // requests of kMinBytes or more (a storage's growth by resize_ included) served from the
                         // cache / by the allocator, since the process started (a forked child inherits them)
};

BufferCacheStats buffer_cache_stats();
void set_buffer_cache_limit(int64_t bytes);  // frees the oldest idle buffers down to the new limit
void empty_buffer_cache();                   // frees every idle buffer (the limit stays)

}  // namespace fusedrect::cpu
