#include "arena.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <mutex>
#include <string>

namespace fairdiff {

BlockRanges::BlockRanges(size_t capacity, size_t granule) : capacity_(capacity / granule * granule), granule_(granule) {}

void BlockRanges::add_free(size_t offset, size_t size) {
  free_.emplace(offset, size);
  by_size_.emplace(size, offset);
}

void BlockRanges::remove_free(std::map<size_t, size_t>::iterator it) {
  by_size_.erase({it->second, it->first});
  free_.erase(it);
}

std::optional<size_t> BlockRanges::take(size_t bytes) {
  const size_t size = (std::max<size_t>(bytes, 1) + granule_ - 1) / granule_ * granule_;
  size_t offset;
  // Best fit, as glibc serves its large blocks: the smallest free range that holds the block
  // (the lowest of equal ones), split; the rest stays free.
  if (auto fit = by_size_.lower_bound({size, 0}); fit != by_size_.end()) {
    const auto [range, start] = *fit;
    remove_free(free_.find(start));
    if (range > size) add_free(start + size, range - size);
    offset = start;
  } else {
    if (size > capacity_ - top_) return std::nullopt;
    offset = top_;
    top_ += size;
    high_water_ = std::max(high_water_, top_);
  }
  used_.emplace(offset, size);
  in_use_ += size;
  return offset;
}

size_t BlockRanges::give_back(size_t offset) {
  const auto block = used_.find(offset);
  if (block == used_.end()) return 0;
  const size_t size = block->second;
  used_.erase(block);
  in_use_ -= size;
  size_t begin = offset, end = offset + size;
  if (auto next = free_.find(end); next != free_.end()) {
    end += next->second;
    remove_free(next);
  }
  if (auto prev = free_.lower_bound(begin); prev != free_.begin() && std::prev(prev)->first + std::prev(prev)->second == begin) {
    begin = std::prev(prev)->first;
    remove_free(std::prev(prev));
  }
  if (end == top_)
    top_ = begin;  // no free range ever ends at the top: it is the top
  else
    add_free(begin, end - begin);
  return size;
}

std::vector<std::pair<size_t, size_t>> BlockRanges::free_used_ranges() const {
  std::vector<std::pair<size_t, size_t>> ranges;
  for (const auto& [offset, size] : free_) ranges.emplace_back(offset, offset + size);
  if (high_water_ > top_) ranges.emplace_back(top_, high_water_);
  return ranges;
}

namespace {

constexpr size_t kHugePage = size_t(2) << 20;  // x86-64's transparent huge page
constexpr size_t kPage = 4096;
constexpr size_t kMinBlock = size_t(1) << 20;  // below: LibTorch's default allocator

// Whether the kernel gives huge pages to a region that asks (madvise) or to every one.
bool transparent_huge_pages() {
  std::ifstream in("/sys/kernel/mm/transparent_hugepage/enabled");
  const std::string mode((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return mode.find("[always]") != std::string::npos || mode.find("[madvise]") != std::string::npos;
}

class HugePageArena final : public c10::Allocator {
 public:
  HugePageArena(char* base, size_t capacity, c10::Allocator* small)
      : base_(base), capacity_(capacity), small_(small), small_raw_deleter_(small->raw_deleter()),
        ranges_(capacity, kPage) {}

  c10::DataPtr allocate(size_t n) const override {
    if (n >= kMinBlock) {
      std::optional<size_t> offset;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        offset = ranges_.take(n);
      }
      if (offset) return {base_ + *offset, base_ + *offset, &free_block, c10::Device(c10::DeviceType::CPU)};
    }
    return small_->allocate(n);  // and when the region is full (it is the size of the memory)
  }
  // raw_allocate / raw_deallocate (oneDNN's buffers through ideep take this way) get one
  // deleter for every pointer, the arena's blocks and the small allocator's.
  c10::DeleterFnPtr raw_deleter() const override { return &free_any; }

  bool owns(const void* p) const {
    const char* c = static_cast<const char*>(p);
    return c >= base_ && c < base_ + capacity_;
  }
  void release() {
    std::lock_guard<std::mutex> lock(mutex_);
    // Whole huge pages only: a partly released one would be split into 4 KiB pages, and the
    // next block there would fault 512 times instead of once.
    for (const auto& [begin, end] : ranges_.free_used_ranges()) {
      const size_t b = (begin + kHugePage - 1) / kHugePage * kHugePage, e = end / kHugePage * kHugePage;
      if (e > b) madvise(base_ + b, e - b, MADV_DONTNEED);
    }
    ranges_.forget_used();
  }

 private:
  static void free_block(void* p);
  static void free_any(void* p);
  char* const base_;
  const size_t capacity_;
  c10::Allocator* const small_;
  const c10::DeleterFnPtr small_raw_deleter_;
  mutable std::mutex mutex_;
  mutable BlockRanges ranges_;
};

// Set once, never freed: tensors may outlive everything else, to the last static destructor.
std::atomic<HugePageArena*> g_arena{nullptr};

void HugePageArena::free_block(void* p) {
  HugePageArena* arena = g_arena.load();
  std::lock_guard<std::mutex> lock(arena->mutex_);
  arena->ranges_.give_back(static_cast<size_t>(static_cast<char*>(p) - arena->base_));
}

void HugePageArena::free_any(void* p) {
  HugePageArena* arena = g_arena.load();
  if (arena->owns(p))
    free_block(p);
  else if (arena->small_raw_deleter_)
    arena->small_raw_deleter_(p);
  else
    c10::free_cpu(p);
}

}  // namespace

bool install_huge_page_arena() {
  static std::mutex installing;
  std::lock_guard<std::mutex> lock(installing);
  if (g_arena.load()) return true;
  if (!transparent_huge_pages()) return false;
  // Address space the size of physical memory (more could never be resident), reserved
  // without committing it (MAP_NORESERVE): pages exist only once touched.
  const size_t memory = static_cast<size_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t capacity = memory / kHugePage * kHugePage;
  if (capacity < kHugePage) return false;
  void* region = mmap(nullptr, capacity + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                      -1, 0);
  if (region == MAP_FAILED) return false;
  char* base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(region) + kHugePage - 1) / kHugePage * kHugePage);
  if (madvise(base, capacity, MADV_HUGEPAGE) != 0) {
    munmap(region, capacity + kHugePage);
    return false;
  }
  auto* arena = new HugePageArena(base, capacity, c10::GetCPUAllocator());
  g_arena.store(arena);
  c10::SetCPUAllocator(arena, /*priority=*/1);  // above the default's 0
  if (c10::GetCPUAllocator() == arena) return true;
  g_arena.store(nullptr);  // another allocator holds a higher priority: leave it be
  delete arena;
  munmap(region, capacity + kHugePage);
  return false;
}

void release_arena_free_memory() {
  if (HugePageArena* arena = g_arena.load()) arena->release();
}

bool arena_owns(const void* p) {
  HugePageArena* arena = g_arena.load();
  return arena && arena->owns(p);
}

bool huge_page_arena_installed() { return g_arena.load() != nullptr; }

}  // namespace fairdiff
