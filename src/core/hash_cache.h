// The SHA-256 of large files (checkpoints), computed once per file and remembered.
//
//   const std::string digest = cached_sha256_file("v1-5-pruned.safetensors");  // 2nd run: a lookup
//
// A1111 keeps such a cache too: hashing a 4 GB checkpoint takes seconds even with the CPU's
// SHA instructions (half a minute without), on every run that writes the "Model hash".
// The cache is one JSON file, hashes.json, in hash_cache_dir(): for each absolute path its
// size, modification time (ns) and digest. An entry counts only while the file's size and
// modification time are unchanged. The cache is an optimisation and never an error: an
// unreadable or corrupt cache is ignored (and rewritten), an unwritable one skipped with
// a debug log line. It is written to a temporary name and renamed, so concurrent runs never
// see half a file; when two runs store at once one entry may be lost, and is computed again.
#pragma once

#include <string>

namespace fairdiff {

// $FAIRDIFF_CACHE_DIR, else $XDG_CACHE_HOME/fairdiff, else $HOME/.cache/fairdiff ("" when
// none of these is set).
std::string hash_cache_dir();

// sha256_file(path) through the cache file `cache_file` ("" = no cache). `hit`, when given,
// says whether the digest came from the cache. Throws BadInput when `path` is unreadable.
std::string cached_sha256_file(const std::string& path, const std::string& cache_file, bool* hit = nullptr);

// The same through hash_cache_dir()/hashes.json.
std::string cached_sha256_file(const std::string& path);

}  // namespace fairdiff
