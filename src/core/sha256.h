// SHA-256 of a file, for the A1111 "Model hash" (its first 10 hex digits).
#pragma once

#include <string>

namespace fairdiff {

// Lower-case hex digest of the file's bytes; throws BadInput when unreadable.
std::string sha256_file(const std::string& path);
std::string sha256_hex(const std::string& bytes);

}  // namespace fairdiff
