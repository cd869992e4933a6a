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
#include <vector>

namespace fusedrect::cpu {
namespace {

constexpr size_t kMinBytes = size_t(128) << 10;  // glibc's default mmap threshold: smaller blocks reuse heap pages
constexpr size_t kSizeClass = 4096;               // a page
constexpr int64_t kDefaultLimit = int64_t(512) << 20;

// Memory from the CPU allocator (its DataPtr frees it) and the size class it serves.
struct Buffer {
  c10::DataPtr memory;
  size_t bytes;
};

// Idle buffers in the order they were freed. A request takes the most recently freed buffer of its size class;
// past the limit the oldest go back to the allocator. Few buffers are idle at once (a handful per layer), so a
// linear scan is cheap next to the pass that fills the buffer.
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
    for (auto it = idle_.rbegin(); it != idle_.rend(); ++it) {
      if ((*it)->bytes == bytes) {
        std::unique_ptr<Buffer> buffer = std::move(*it);
        idle_.erase(std::next(it).base());
        idle_bytes_ -= int64_t(bytes);
        ++hits_;
        return buffer;
      }
    }
    ++misses_;
    return nullptr;
  }

  void give(std::unique_ptr<Buffer> buffer) {
    std::vector<std::unique_ptr<Buffer>> evicted;  // freed after the lock is released
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (int64_t(buffer->bytes) > limit_) {  // would evict everything else and then itself
        evicted.push_back(std::move(buffer));
        return;
      }
      idle_bytes_ += int64_t(buffer->bytes);
      idle_.push_back(std::move(buffer));
      evict_to(limit_, evicted);
    }
  }

  void set_limit(int64_t bytes) {
    std::vector<std::unique_ptr<Buffer>> evicted;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      limit_ = bytes;
      evict_to(limit_, evicted);
    }
  }

  void empty() {
    std::vector<std::unique_ptr<Buffer>> evicted;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      evict_to(0, evicted);
    }
  }

  BufferCacheStats stats() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return {limit_, idle_bytes_, int64_t(idle_.size()), hits_, misses_};
  }

 private:
  void evict_to(int64_t limit, std::vector<std::unique_ptr<Buffer>>& evicted) {
    size_t n = 0;
    while (idle_bytes_ > limit) {
      idle_bytes_ -= int64_t(idle_[n]->bytes);
      evicted.push_back(std::move(idle_[n++]));
    }
    idle_.erase(idle_.begin(), idle_.begin() + n);
  }

  std::mutex mutex_;
  std::vector<std::unique_ptr<Buffer>> idle_;
  int64_t idle_bytes_ = 0;
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
