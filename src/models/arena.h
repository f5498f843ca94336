// LibTorch's CPU allocator for large blocks: one region of address space whose pages the
// kernel may back with 2 MiB transparent huge pages, carved into blocks best-fit.
//
//   fairdiff::install_huge_page_arena();   // configure_allocator does this (runtime.h)
//   at::Tensor h = at::empty({2, 320, 64, 64});   // 10 MiB: a block of the arena
//   ...                                         // freed blocks are reused, merged with free neighbours
//   fairdiff::release_arena_free_memory();      // release_free_memory does this between phases
//
// Why: a freshly allocated activation costs a page fault per 4 KiB page on its first touch,
// and on this project's VMs a fault costs 2.6-25 us. An image's first UNet step and first
// VAE decode touch gigabytes of fresh memory (release_free_memory hands each phase's freed
// memory back before the next): the SD 1.5 VAE decode at 512x512 in float32 took 12.5 s the
// first time and 9.5 s the next. glibc can ask for huge pages on its heap
// (GLIBC_TUNABLES=glibc.malloc.hugetlb=1), but only from the environment when the process
// starts (the first decode took 9.8 s with it); a c10 allocator can do it from the inside:
// with this one, 9.1 s. Blocks under 1 MiB stay with LibTorch's default allocator, glibc's
// heap.
//
// Torch-free header: the bookkeeping, BlockRanges, is tested on its own.
#pragma once

#include <cstddef>
#include <map>
#include <optional>
#include <set>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fairdiff {

// Which byte ranges of a region of `capacity` bytes are in use, as offsets: blocks are
// taken from the smallest free range that holds them (its start) or, when none does, from
// the untouched space above the highest block (`top`); a block given back merges with the
// free ranges beside it, and one that reaches the top lowers it. Sizes are rounded up to
// `granule` bytes (a page), so every block starts on a page.
class BlockRanges {
 public:
  BlockRanges(size_t capacity, size_t granule);
  // The offset of a new block of at least `bytes`, or nothing when the region has no room.
  std::optional<size_t> take(size_t bytes);
  // Frees the block that take() returned at `offset`; returns its (rounded) size.
  size_t give_back(size_t offset);
  // The ranges [begin, end) that are free but were used since the last forget_used(): the
  // free ranges below the top and the space between the top and the highest end ever
  // taken. Their pages may be resident; release_arena_free_memory hands them back.
  std::vector<std::pair<size_t, size_t>> free_used_ranges() const;
  void forget_used() { high_water_ = top_; }

  size_t in_use() const { return in_use_; }  // bytes in blocks
  size_t top() const { return top_; }
  size_t high_water() const { return high_water_; }
  size_t free_ranges() const { return free_.size(); }

 private:
  void add_free(size_t offset, size_t size);
  void remove_free(std::map<size_t, size_t>::iterator it);
  size_t capacity_, granule_;
  size_t top_ = 0, high_water_ = 0, in_use_ = 0;
  std::map<size_t, size_t> free_;                 // offset -> size, every range below top_
  std::set<std::pair<size_t, size_t>> by_size_;   // (size, offset) of the same ranges
  std::unordered_map<size_t, size_t> used_;       // offset -> size of every block in use
};

// Reserves the region (address space the size of physical memory; nothing is resident until
// touched), asks for huge pages on it (madvise MADV_HUGEPAGE) and makes it LibTorch's CPU
// allocator for blocks of 1 MiB and more. Returns false, changing nothing, where the kernel
// has transparent huge pages off ("never") or the reservation fails. Idempotent.
bool install_huge_page_arena();
// Hands back to the kernel the pages of the arena's free ranges (whole huge pages, so that
// the next touch gets a huge page again). Nothing without the arena.
void release_arena_free_memory();
// Whether `p` lies in the arena (tests, reports).
bool arena_owns(const void* p);
// Whether install_huge_page_arena took (reports).
bool huge_page_arena_installed();

}  // namespace fairdiff
