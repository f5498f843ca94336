// Small file-system helpers shared inside the library (not public API).
#pragma once

#include <string>

namespace fairdiff {

// Writes `contents` to a temporary name beside `path`, flushes it, then renames
// it over `path`: a crash leaves either the old file or the new one, never half.
void write_file_atomic(const std::string& path, const std::string& contents);

// Reads a whole text file; throws a BadInput error naming the file when absent.
std::string read_text_file(const std::string& path, const std::string& hint = {});

bool is_directory(const std::string& path);
bool is_regular_file(const std::string& path);

}  // namespace fairdiff
