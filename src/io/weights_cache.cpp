#include "weights_cache.h"

#include <spdlog/spdlog.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <torch/nn/module.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>

#include "fairdiff/error.h"
#include "hash_cache.h"
#include "sha256.h"

namespace fairdiff {
namespace fs = std::filesystem;
namespace {

// Raised whenever the loaders change what a module holds for a given file (a key renamed,
// a tensor split another way): older entries then simply miss.
constexpr const char* kVersion = "1";

// The safetensors dtype of a tensor of `dtype`; false where safetensors has none we write.
bool stored_dtype(at::ScalarType dtype, DType& out) {
  switch (dtype) {
    case at::kFloat: out = DType::F32; return true;
    case at::kHalf: out = DType::F16; return true;
    case at::kBFloat16: out = DType::BF16; return true;
    case at::kLong: out = DType::I64; return true;
    case at::kByte: out = DType::U8; return true;
    default: return false;
  }
}

const char* dtype_label(at::ScalarType dtype) {
  DType d;
  return stored_dtype(dtype, d) ? dtype_name(d) : "?";
}

// The metadata an entry carries: what it was converted from, and into what.
std::map<std::string, std::string> entry_metadata(const CachedWeightsKey& key) {
  return {{"fairdiff_weights_cache", kVersion},
          {"source", key.source},
          {"source_size", std::to_string(key.source_size)},
          {"source_mtime_ns", std::to_string(key.source_mtime_ns)},
          {"component", key.component},
          {"dtype", dtype_label(key.dtype)}};
}

void remove_entry(const std::string& path, const std::string& why) {
  std::error_code ec;
  fs::remove(path, ec);
  spdlog::debug("{}: {}; removed from the weights cache", path, why);
}

// Marks an entry as loaded now: eviction goes by modification time, oldest first.
void touch(const std::string& path) { utimensat(AT_FDCWD, path.c_str(), nullptr, 0); }

uint64_t free_bytes(const std::string& dir) {
  struct statvfs s {};
  if (statvfs(dir.c_str(), &s) != 0) return 0;
  return static_cast<uint64_t>(s.f_bavail) * s.f_frsize;
}

// Writes one entry; false when it was skipped (no room) or failed (a debug line says why).
bool write_entry(const WeightsCache& cache, const PendingWeights& p) {
  std::vector<TensorBytes> tensors;
  uint64_t bytes = 0;
  for (const auto& [name, t] : p.tensors) {
    DType dtype;
    if (!stored_dtype(t.scalar_type(), dtype) || !t.is_contiguous() || !t.device().is_cpu()) {
      spdlog::debug("{}: {} is not storable as it is; no weights cache entry", p.key.component, name);
      return false;
    }
    tensors.push_back({name, dtype, t.sizes().vec(), static_cast<const uint8_t*>(t.data_ptr()), t.nbytes()});
    bytes += t.nbytes();
  }
  const uint64_t reserve = uint64_t{1} << 30;
  if (bytes > cache.max_bytes || free_bytes(cache.dir) < bytes + reserve) {
    spdlog::info("weights cache {}: no room for the {} MiB of {} in {} (kept under {} MiB, and 1 GiB of the disk "
                 "free); it converts again next time",
                 cache.dir, bytes >> 20, p.key.component, dtype_label(p.key.dtype), cache.max_bytes >> 20);
    return false;
  }
  const std::string path = cached_weights_path(cache, p.key);
  write_safetensors(path, tensors, entry_metadata(p.key), "weights");
  return true;
}

// Whether the entry at `path` was converted from a file that is gone (a model deleted or
// moved, a temporary copy): it can never be loaded again. An unreadable entry counts as gone.
bool source_is_gone(const fs::path& path) {
  try {
    const SafeTensors entry(path.string());
    const auto it = entry.metadata().find("source");
    std::error_code ec;
    return it == entry.metadata().end() || !fs::exists(it->second, ec);
  } catch (const Error&) {
    return true;
  }
}

// Keeps the entries under max_bytes, removing those whose source is gone, then the least
// recently loaded (never `keep`); and temporaries that nobody has written for an hour (a run
// killed while it wrote one).
void evict(const WeightsCache& cache, const std::string& keep) {
  struct Entry {
    fs::path path;
    uint64_t bytes;
    fs::file_time_type time;
  };
  std::vector<Entry> entries;
  uint64_t total = 0;
  std::error_code ec;
  const auto stale = fs::file_time_type::clock::now() - std::chrono::hours(1);
  for (const auto& e : fs::directory_iterator(cache.dir, ec)) {
    if (!e.is_regular_file(ec)) continue;
    const std::string name = e.path().filename().string();
    const auto time = e.last_write_time(ec);
    if (name.find(".safetensors.tmp.") != std::string::npos) {
      if (time < stale) fs::remove(e.path(), ec);
      continue;
    }
    if (e.path().extension() != ".safetensors") continue;
    if (e.path().string() != keep && source_is_gone(e.path())) {
      remove_entry(e.path().string(), "its source is gone");
      continue;
    }
    entries.push_back({e.path(), static_cast<uint64_t>(e.file_size(ec)), time});
    total += entries.back().bytes;
  }
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) { return a.time < b.time; });
  for (const Entry& e : entries) {
    if (total <= cache.max_bytes) break;
    if (e.path.string() == keep) continue;
    if (fs::remove(e.path, ec)) total -= e.bytes;
    spdlog::debug("{}: least recently loaded, removed from the weights cache", e.path.string());
  }
}

}  // namespace

WeightsCache run_weights_cache(bool use, bool fp16_weights) {
  WeightsCache cache = use ? default_weights_cache() : WeightsCache{};
  cache.write = !fp16_weights;
  return cache;
}

WeightsCache default_weights_cache() {
  WeightsCache cache;
  const std::string dir = hash_cache_dir();
  if (!dir.empty()) cache.dir = (fs::path(dir) / "weights").string();
  if (const char* gb = std::getenv("FAIRDIFF_WEIGHTS_CACHE_GB"); gb && *gb) {
    char* end = nullptr;
    const double v = std::strtod(gb, &end);
    if (end == gb || *end != '\0' || !(v >= 0) || v > 1e6)
      throw_bad_input("FAIRDIFF_WEIGHTS_CACHE_GB", std::string("\"") + gb + "\" is not a number of gigabytes",
                      "set it to the most the weights cache may hold, e.g. 16, or 0 for no cache");
    cache.max_bytes = static_cast<uint64_t>(v * double(uint64_t{1} << 30));
  }
  return cache;
}

bool converts(const TensorView& stored, at::ScalarType dtype) {
  const at::ScalarType from = scalar_type(stored.dtype);
  return at::isFloatingType(from) && from != dtype;
}

CachedWeightsKey cached_weights_key(const std::string& source, const std::string& component, at::ScalarType dtype) {
  CachedWeightsKey key;
  std::error_code ec;
  key.source = fs::absolute(source, ec).lexically_normal().string();
  key.component = component;
  key.dtype = dtype;
  struct stat st {};
  if (::stat(source.c_str(), &st) == 0) {
    key.source_size = static_cast<int64_t>(st.st_size);
    key.source_mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec;
  }
  return key;
}

std::string cached_weights_path(const WeightsCache& cache, const CachedWeightsKey& key) {
  // Named by what it converts, not by the source's version: a changed source overwrites its entry.
  const std::string what = std::string(kVersion) + "\n" + key.source + "\n" + key.component + "\n" + dtype_label(key.dtype);
  return (fs::path(cache.dir) / (sha256_hex(what).substr(0, 24) + ".safetensors")).string();
}

bool load_cached_weights(torch::nn::Module& module, const WeightsCache& cache, const CachedWeightsKey& key,
                         MappedWeights& mapped) {
  if (!cache.enabled() || key.source_size < 0) return false;
  const std::string path = cached_weights_path(cache, key);
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return false;
  std::shared_ptr<const SafeTensors> entry;
  try {
    entry = std::make_shared<const SafeTensors>(path);
  } catch (const Error& e) {
    remove_entry(path, std::string("unreadable (") + e.what() + ")");
    return false;
  }
  if (entry->metadata() != entry_metadata(key)) {
    spdlog::debug("{}: made from another version of {}; converting again", path, key.source);
    return false;
  }
  std::vector<const TensorView*> aliased;
  try {
    aliased = load_state_dict(module, entry, key.component, key.dtype, at::Device(at::kCPU));
  } catch (const Error& e) {
    remove_entry(path, std::string("does not fit the ") + key.component + " (" + e.what() + ")");
    return false;
  }
  touch(path);
  spdlog::debug("{}: the {} weights of {} in {} from the weights cache", path, key.component, key.source,
                dtype_label(key.dtype));
  mapped = MappedWeights(std::move(entry), std::move(aliased));
  return true;
}

PendingWeights pending_weights(torch::nn::Module& module, CachedWeightsKey key) {
  PendingWeights p{std::move(key), {}};
  for (const auto& t : module.named_parameters(/*recurse=*/true)) p.tensors.emplace_back(t.key(), t.value());
  for (const auto& t : module.named_buffers(/*recurse=*/true)) p.tensors.emplace_back(t.key(), t.value());
  return p;
}

MappedWeights load_through_cache(torch::nn::Module& module, const WeightsCache& cache, const CachedWeightsKey* key,
                                 const std::function<MappedWeights()>& load, std::vector<PendingWeights>* pending) {
  MappedWeights mapped;
  if (key && load_cached_weights(module, cache, *key, mapped)) return mapped;
  mapped = load();
  if (key && pending) pending->push_back(pending_weights(module, *key));
  return mapped;
}

std::future<void> store_cached_weights(const WeightsCache& cache, std::vector<PendingWeights> pending) {
  if (!cache.enabled() || !cache.write || pending.empty()) return {};
  uint64_t bytes = 0;
  for (const auto& p : pending)
    for (const auto& [name, t] : p.tensors) bytes += t.nbytes();
  spdlog::info("keeping the {} MiB of weights converted to {} in the weights cache ({}), so that the next load "
               "maps them (FAIRDIFF_WEIGHTS_CACHE_GB=0: no cache)",
               bytes >> 20, dtype_label(pending.front().key.dtype), cache.dir);
  return std::async(std::launch::async, [cache, pending = std::move(pending)]() mutable {
    // Beside the work, never in front of it: on a cache miss the first steps run meanwhile.
    setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 19);
    try {
      fs::create_directories(cache.dir);
    } catch (const std::exception& e) {
      spdlog::debug("weights cache {}: cannot create it ({})", cache.dir, e.what());
      return;
    }
    for (PendingWeights& p : pending) {
      try {
        if (write_entry(cache, p)) evict(cache, cached_weights_path(cache, p.key));
      } catch (const std::exception& e) {
        spdlog::debug("weights cache {}: the {} entry was not written ({})", cache.dir, p.key.component, e.what());
      }
      p.tensors.clear();  // the converted copies go now, if the model let them go already
    }
  });
}

}  // namespace fairdiff
