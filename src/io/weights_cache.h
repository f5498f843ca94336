// Weights converted at load (a bf16 model from float32 files), kept on disk so that the next
// load maps them as a float32 load maps its files, instead of converting them again.
//
//   WeightsCache cache = default_weights_cache();
//   const CachedWeightsKey key = cached_weights_key(file, "unet", at::kBFloat16);
//   std::vector<PendingWeights> pending;
//   MappedWeights mapped = load_through_cache(*unet, cache, &key, convert_from_the_file, &pending);
//   model.cache_writes = store_cached_weights(cache, std::move(pending));  // a miss: written beside the work
//
// Why: a conversion writes every weight into new memory, and where the kernel hands out new
// pages slowly (a VM measured at 0.26-0.79 GB/s) the 2.1 GB of SD 1.5 in bf16 took 5-8 s
// before the first step; pages of a file in the page cache are only mapped (README, Performance).
//
// One entry is one safetensors file per (source file, component, dtype), its tensors named
// as the module's (a single-file checkpoint's too: its entries need no key conversion), its
// metadata the source's path, size and modification time; an entry counts only while these
// are unchanged, as in the hash cache (hash_cache.h). Entries are written after the load,
// from the loaded tensors, on a thread at the lowest priority; at most max_bytes are kept,
// the least recently loaded going first, and an entry whose source file is gone (a deleted
// model, a temporary copy) goes when the next one is written. The cache is never an error: an entry that does not
// open or fit the module is removed and the weights converted as without a cache.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <future>
#include <string>
#include <utility>
#include <vector>

#include "safetensors.h"
#include "tensor_io.h"

namespace torch::nn {
class Module;
}

namespace fairdiff {

struct WeightsCache {
  std::string dir;                           // "" = no cache
  uint64_t max_bytes = uint64_t{16} << 30;  // all entries together
  bool write = true;                         // false: entries are read, misses not stored
  bool enabled() const { return !dir.empty() && max_bytes > 0; }
};

// hash_cache_dir()/weights, at most $FAIRDIFF_WEIGHTS_CACHE_GB gigabytes (default 16; 0 = no cache).
WeightsCache default_weights_cache();

// The cache that generate and fairdiff-bench load through: default_weights_cache() when `use`
// (--no-weights-cache: none), and not written with float16 weight storage (--fp16-weights),
// which replaces the loaded weights at once.
WeightsCache run_weights_cache(bool use, bool fp16_weights);

// Whether loading `stored` as a floating tensor of `dtype` converts it (integer tensors keep
// their dtype).
bool converts(const TensorView& stored, at::ScalarType dtype);

// Which conversion an entry holds, and the version of its source it was made from.
struct CachedWeightsKey {
  std::string source;     // absolute path of the file the weights were converted from
  std::string component;  // "unet", ...
  at::ScalarType dtype = at::kFloat;
  int64_t source_size = -1, source_mtime_ns = 0;
};

// The key of the weights of `component` in `source` converted to `dtype` (stats the source now).
CachedWeightsKey cached_weights_key(const std::string& source, const std::string& component, at::ScalarType dtype);

// The file of the entry of `key` in `cache`.
std::string cached_weights_path(const WeightsCache& cache, const CachedWeightsKey& key);

// Fills every tensor of `module` (on the CPU) from the entry of `key`, as views of its
// mapping, which `mapped` receives; false when there is no entry for this version of the
// source, or it does not fit `module` (it is removed then).
bool load_cached_weights(torch::nn::Module& module, const WeightsCache& cache, const CachedWeightsKey& key,
                         MappedWeights& mapped);

// A component's converted tensors, held until written.
struct PendingWeights {
  CachedWeightsKey key;
  std::vector<std::pair<std::string, at::Tensor>> tensors;
};
PendingWeights pending_weights(torch::nn::Module& module, CachedWeightsKey key);

// A loader's use of the cache for one component: `module` from the entry of `*key` when the
// cache holds it, else from `load` (which converts), its tensors then added to `pending`
// (when given). `key` null: no cache for this load (nothing converts, or not on the CPU).
MappedWeights load_through_cache(torch::nn::Module& module, const WeightsCache& cache, const CachedWeightsKey* key,
                                 const std::function<MappedWeights()>& load, std::vector<PendingWeights>* pending);

// Writes the entries, one after another, on a thread of their own at the lowest priority
// (nice 19), each only where the disk keeps 1 GiB free besides it, then removes the entries
// whose source is gone and the least recently loaded ones beyond cache.max_bytes. Each
// component's tensors are let go once written. Never throws: a failure is a debug line and
// no entry.
std::future<void> store_cached_weights(const WeightsCache& cache, std::vector<PendingWeights> pending);

}  // namespace fairdiff
