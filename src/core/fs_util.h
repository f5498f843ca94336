// Small file-system helpers shared inside the library (not public API).
#pragma once

#include <string>

namespace fairdiff {

// Writes `contents` to a temporary name beside `path`, flushes it, then renames
// it over `path`: a crash leaves either the old file or the new one, never half.
void write_file_atomic(const std::string& path, const std::string& contents);

// Reads a whole text file; throws a BadInput error naming the file when absent.
std::string read_text_file(const std::string& path, const std::string& hint = {});

// Appends one line (a newline is added) with a single write, then fsyncs: a
// crash leaves at most a torn last line, which readers skip.
void append_line_durable(const std::string& path, const std::string& line);

// Removes temporary files that write_file_atomic left behind in `dir` after a
// crash (names containing ".tmp."); returns how many.
int remove_stale_temporaries(const std::string& dir);

bool is_directory(const std::string& path);
bool is_regular_file(const std::string& path);

}  // namespace fairdiff
