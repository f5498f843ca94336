#include "hash_cache.h"

#include <spdlog/spdlog.h>
#include <sys/stat.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "fairdiff/error.h"
#include "fs_util.h"
#include "sha256.h"

namespace fairdiff {
namespace fs = std::filesystem;
namespace {

// What identifies a version of a file without reading it.
struct FileStamp {
  int64_t size = -1;
  int64_t mtime_ns = 0;
};

FileStamp stamp_of(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) throw_bad_input(path, "cannot read the file to hash it");
  return {static_cast<int64_t>(st.st_size), static_cast<int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec};
}

// The cache's entries; an absent, unreadable or malformed file is an empty cache.
nlohmann::json read_cache(const std::string& cache_file) {
  std::ifstream in(cache_file, std::ios::binary);
  if (!in) return nlohmann::json::object();
  std::stringstream text;
  text << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains("files") || !j["files"].is_object()) {
    spdlog::debug("{}: not a hash cache; it will be rewritten", cache_file);
    return nlohmann::json::object();
  }
  return j["files"];
}

bool entry_matches(const nlohmann::json& e, const FileStamp& s) {
  return e.is_object() && e.contains("size") && e["size"].is_number_integer() && e["size"].get<int64_t>() == s.size &&
         e.contains("mtime_ns") && e["mtime_ns"].is_number_integer() && e["mtime_ns"].get<int64_t>() == s.mtime_ns &&
         e.contains("sha256") && e["sha256"].is_string() && e["sha256"].get<std::string>().size() == 64;
}

void store(const std::string& cache_file, const std::string& key, const FileStamp& s, const std::string& digest) {
  try {
    fs::create_directories(fs::path(cache_file).parent_path());
    nlohmann::json files = read_cache(cache_file);  // again: another run may have added entries since
    files[key] = {{"size", s.size}, {"mtime_ns", s.mtime_ns}, {"sha256", digest}};
    // One temporary per thread: two models hashing in one process must not share one.
    const std::string owner = "t" + std::to_string(std::hash<std::thread::id>()(std::this_thread::get_id()) % 1000000);
    write_file_atomic(cache_file, nlohmann::json{{"files", files}}.dump(1) + "\n", owner);
  } catch (const std::exception& e) {  // never fatal: the digest is known, only not remembered
    spdlog::debug("{}: cannot store the hash ({})", cache_file, e.what());
  }
}

}  // namespace

std::string hash_cache_dir() {
  if (const char* d = std::getenv("FAIRDIFF_CACHE_DIR"); d && *d) return d;
  if (const char* d = std::getenv("XDG_CACHE_HOME"); d && *d) return (fs::path(d) / "fairdiff").string();
  if (const char* d = std::getenv("HOME"); d && *d) return (fs::path(d) / ".cache" / "fairdiff").string();
  return {};
}

std::string cached_sha256_file(const std::string& path, const std::string& cache_file, bool* hit) {
  if (hit) *hit = false;
  if (cache_file.empty()) return sha256_file(path);
  const FileStamp before = stamp_of(path);
  std::error_code ec;
  const std::string key = fs::absolute(path, ec).lexically_normal().string();
  const nlohmann::json files = read_cache(cache_file);
  if (auto it = files.find(key); it != files.end() && entry_matches(*it, before)) {
    if (hit) *hit = true;
    return (*it)["sha256"].get<std::string>();
  }
  const std::string digest = sha256_file(path);
  // A file rewritten while it was read has no one digest: returned, not remembered.
  const FileStamp after = stamp_of(path);
  if (after.size == before.size && after.mtime_ns == before.mtime_ns) store(cache_file, key, before, digest);
  return digest;
}

std::string cached_sha256_file(const std::string& path) {
  const std::string dir = hash_cache_dir();
  return cached_sha256_file(path, dir.empty() ? std::string() : (fs::path(dir) / "hashes.json").string());
}

}  // namespace fairdiff
