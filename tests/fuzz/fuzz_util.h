// Shared by the fuzz targets: a scratch folder per process, writing the input as files,
// splitting one input into several files, and the rule that a fairdiff::Error is the
// only acceptable way to refuse an input (anything else escaping is a finding).
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <spdlog/spdlog.h>

#include "fairdiff/error.h"

namespace fuzz {

// Warnings about odd inputs are expected by the thousand: keep the fuzzer's output readable.
inline const bool logs_off = [] {
  spdlog::set_level(spdlog::level::off);
  return true;
}();

// A fresh folder for this process (in /dev/shm when there is one: writes stay in memory).
inline const std::string& scratch_dir() {
  // Never destroyed: the atexit clean-up runs after static destructors.
  static const std::string* dir = [] {
    std::string pattern = (access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp") + std::string("/fairdiff-fuzz-XXXXXX");
    if (!mkdtemp(pattern.data())) std::abort();
    std::atexit([] { std::system(("rm -rf '" + scratch_dir() + "'").c_str()); });
    return new std::string(pattern);
  }();
  return *dir;
}

inline void write_file(const std::string& path, const std::string& bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::abort();
  if (!bytes.empty()) std::fwrite(bytes.data(), 1, bytes.size(), f);
  std::fclose(f);
}

// The input cut at every occurrence of `separator` ("\n--8<--\n" in the seeds); at most
// `parts` pieces (the last keeps the rest), missing pieces are empty.
inline std::vector<std::string> split(const uint8_t* data, size_t size, size_t parts,
                                      const std::string& separator = "\n--8<--\n") {
  const std::string text(reinterpret_cast<const char*>(data), size);
  std::vector<std::string> out;
  size_t start = 0;
  while (out.size() + 1 < parts) {
    const size_t at = text.find(separator, start);
    if (at == std::string::npos) break;
    out.push_back(text.substr(start, at - start));
    start = at + separator.size();
  }
  out.push_back(text.substr(start));
  out.resize(parts);
  return out;
}

// Runs `fn`, accepting a fairdiff::Error as the refusal of a bad input; its message must be
// one line (the CLI prints it as one).
template <class Fn>
void refuse_cleanly(Fn fn) {
  try {
    fn();
  } catch (const fairdiff::Error& e) {
    if (std::string(e.what()).find('\n') != std::string::npos) {
      std::fprintf(stderr, "error message spans several lines: %s\n", e.what());
      std::abort();
    }
  }
}

}  // namespace fuzz
