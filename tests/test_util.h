// Helpers shared by the unit tests.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "fairdiff/error.h"

namespace fairdiff::test {

// ../shared/fixtures beside the project root, or $FAIRDIFF_FIXTURES; "" when absent.
inline std::string fixtures_dir() {
  if (const char* env = std::getenv("FAIRDIFF_FIXTURES"); env && *env)
    return std::filesystem::is_directory(env) ? env : "";
  const std::filesystem::path p = std::filesystem::path(FAIRDIFF_SOURCE_DIR) / ".." / "shared" / "fixtures";
  return std::filesystem::is_directory(p) ? std::filesystem::canonical(p).string() : "";
}

#define FAIRDIFF_REQUIRE_FIXTURES(var)                                                     \
  const std::string var = ::fairdiff::test::fixtures_dir();                                \
  if (var.empty()) GTEST_SKIP() << "golden fixtures not found: set FAIRDIFF_FIXTURES or "  \
                                   "place them in ../shared/fixtures";

// A fresh empty temporary folder, removed with the object.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "fairdiff-test-XXXXXX").string();
    path = mkdtemp(tmpl.data());
  }
  ~TempDir() { std::filesystem::remove_all(path); }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

// Runs `fn`, expects a fairdiff::Error of `kind` whose one-line message contains every `needle`.
template <typename Fn>
void expect_error(Fn&& fn, ErrorKind kind, std::initializer_list<std::string> needles) {
  try {
    fn();
    ADD_FAILURE() << "expected a fairdiff::Error, got none";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(static_cast<int>(e.kind()), static_cast<int>(kind)) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "error must be one line: " << msg;
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
  }
}

}  // namespace fairdiff::test
