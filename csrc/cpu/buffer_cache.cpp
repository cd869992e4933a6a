// The recycling allocator behind empty_like_recycled (see buffer_cache.h for why).
#include "buffer_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#ifndef _WIN32
#include <pthread.h>
#endif

#include <memory>
#include <mutex>

namespace fusedrect::cpu {
namespace {

constexpr size_t kMinBytes = size_t(128) << 10;  // glibc's default mmap threshold: smaller blocks reuse heap pages
constexpr size_t kSizeClass = 4096;               // a page
constexpr int64_t kDefaultLimit = int64_t(512) << 20;

// Memory from the CPU allocator (its DataPtr frees it), the size class it serves and, while it is idle, its
// neighbours in the cache's list.
struct Buffer {
  c10::DataPtr memory;
  size_t bytes;
  Buffer* older = nullptr;
  Buffer* newer = nullptr;
};

// Frees a chain of buffers linked through `older` (outside the cache's lock).
void free_chain(Buffer* chain) {
  while (chain != nullptr) {
    std::unique_ptr<Buffer> buffer(chain);
    chain = chain->older;
  }
}

// Idle buffers in a list in the order they were freed (intrusive: giving a buffer back, which runs in a DataPtr
// deleter, allocates nothing). A request takes the most recently freed buffer of its size class; past the limit
// the oldest go back to the allocator. Few buffers are idle at once (a few per layer), so a linear scan is
// cheap next to the pass that fills the buffer.
class BufferCache {
 public:
  // Never destroyed: tensors can be freed during interpreter teardown, after static destructors ran.
  static BufferCache& instance() {
    static auto* cache = new BufferCache();
    return *cache;
  }

  BufferCache() {
#ifndef _WIN32
    // A child forked while another thread held the lock could never take it: fork() holds it instead.
    pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                   [] { instance().mutex_.unlock(); });
#endif
  }

  std::unique_ptr<Buffer> take(size_t bytes) {
    const std::lock_guard<std::mutex> lock(mutex_);
    for (Buffer* b = newest_; b != nullptr; b = b->older) {
      if (b->bytes == bytes) {
        unlink(b);
        ++hits_;
        return std::unique_ptr<Buffer>(b);
      }
    }
    ++misses_;
    return nullptr;
  }

  void give(std::unique_ptr<Buffer> buffer) {
    Buffer* evicted = nullptr;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (int64_t(buffer->bytes) > limit_) {  // would evict everything else and then itself
        evicted = buffer.release();
        evicted->older = nullptr;
      } else {
        Buffer* b = buffer.release();
        b->older = newest_;
        b->newer = nullptr;
        (newest_ != nullptr ? newest_->newer : oldest_) = b;
        newest_ = b;
        idle_bytes_ += int64_t(b->bytes);
        ++idle_buffers_;
        evicted = evict_to(limit_);
      }
    }
    free_chain(evicted);
  }

  void set_limit(int64_t bytes) {
    Buffer* evicted = nullptr;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      limit_ = bytes;
      evicted = evict_to(limit_);
    }
    free_chain(evicted);
  }

  void empty() {
    Buffer* evicted = nullptr;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      evicted = evict_to(0);
    }
    free_chain(evicted);
  }

  BufferCacheStats stats() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return {limit_, idle_bytes_, idle_buffers_, hits_, misses_};
  }

 private:
  void unlink(Buffer* b) {
    (b->older != nullptr ? b->older->newer : oldest_) = b->newer;
    (b->newer != nullptr ? b->newer->older : newest_) = b->older;
    idle_bytes_ -= int64_t(b->bytes);
    --idle_buffers_;
  }

  // Unlinks the oldest buffers until at most `limit` bytes are idle; returns them chained through `older`.
  Buffer* evict_to(int64_t limit) {
    Buffer* chain = nullptr;
    while (idle_bytes_ > limit) {
      Buffer* b = oldest_;
      unlink(b);
      b->older = chain;
      chain = b;
    }
    return chain;
  }

  std::mutex mutex_;
  Buffer* oldest_ = nullptr;
  Buffer* newest_ = nullptr;
  int64_t idle_bytes_ = 0;
  int64_t idle_buffers_ = 0;
  int64_t limit_ = kDefaultLimit;
  int64_t hits_ = 0, misses_ = 0;
};

class RecyclingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kMinBytes) return c10::GetCPUAllocator()->allocate(nbytes);
    const size_t bytes = (nbytes + kSizeClass - 1) / kSizeClass * kSizeClass;
    std::unique_ptr<Buffer> buffer = BufferCache::instance().take(bytes);
    if (!buffer) buffer.reset(new Buffer{c10::GetCPUAllocator()->allocate(bytes), bytes});
    void* data = buffer->memory.get();
    return {data, buffer.release(), &release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // A Buffer context is this allocator's ordinary one, so copy-on-write (torch._lazy_clone) may wrap it.
  bool is_simple_data_ptr(const c10::DataPtr& data_ptr) const override {
    return data_ptr.get_deleter() == &release || data_ptr.get() == data_ptr.get_context();
  }

 private:
  static void release(void* buffer) {
    BufferCache::instance().give(std::unique_ptr<Buffer>(static_cast<Buffer*>(buffer)));
  }
};

}  // namespace

at::Tensor empty_like_recycled(const at::Tensor& like) {
  TORCH_INTERNAL_ASSERT(like.device().is_cpu() && like.is_non_overlapping_and_dense());
  static auto* allocator = new RecyclingAllocator();  // never destroyed: storages keep a pointer to it
  return at::detail::empty_strided_generic(like.sizes(), like.strides(), allocator,
                                           c10::DispatchKeySet(c10::DispatchKey::CPU), like.scalar_type());
}

BufferCacheStats buffer_cache_stats() { return BufferCache::instance().stats(); }

void set_buffer_cache_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "limit: expected a non-negative number of bytes, got ", bytes);
  BufferCache::instance().set_limit(bytes);
}

void empty_buffer_cache() { BufferCache::instance().empty(); }

}  // namespace fusedrect::cpu
