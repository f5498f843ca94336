#include "data_paths.h"

#include <cstdlib>
#include <filesystem>
#include <system_error>

#ifndef FAIRDIFF_INSTALL_DATADIR
#define FAIRDIFF_INSTALL_DATADIR "/usr/local/share/fairdiff"
#endif

namespace fs = std::filesystem;

namespace fairdiff {

std::vector<std::string> data_dirs() {
  std::vector<std::string> dirs;
  if (const char* env = std::getenv("FAIRDIFF_DATA_DIR"); env && *env) dirs.emplace_back(env);
  std::error_code ec;
  // Linux: the running program's own path (an embedding program's, when fairdiff is a library in it).
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    dirs.push_back((exe.parent_path() / "share" / "fairdiff").string());
    dirs.push_back((exe.parent_path().parent_path() / "share" / "fairdiff").string());
  }
  dirs.emplace_back(FAIRDIFF_INSTALL_DATADIR);
  return dirs;
}

std::string find_data(const std::string& relative) {
  for (const std::string& dir : data_dirs()) {
    std::error_code ec;
    const fs::path p = fs::path(dir) / relative;
    if (fs::exists(p, ec)) return p.lexically_normal().string();
  }
  return {};
}

}  // namespace fairdiff
