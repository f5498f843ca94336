#include "string_util.h"

#include <algorithm>
#include <cstddef>

namespace fairdiff {
namespace {

constexpr const char* kWhitespace = " \t\r\n";

}  // namespace

std::string join(const std::vector<std::string>& items, const std::string& separator) {
  std::string s;
  for (size_t i = 0; i < items.size(); ++i) s += (i ? separator : "") + items[i];
  return s;
}

std::string trim(const std::string& s) {
  const size_t b = s.find_first_not_of(kWhitespace);
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(kWhitespace) - b + 1);
}

bool starts_with(std::string_view s, std::string_view prefix) {
  return s.size() >= prefix.size() && s.compare(0, prefix.size(), prefix) == 0;
}

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string first_names(const std::vector<std::string>& names, size_t limit) {
  const auto end = names.begin() + static_cast<std::ptrdiff_t>(std::min(limit, names.size()));
  std::string s = join(std::vector<std::string>(names.begin(), end));
  if (names.size() > limit) s += ", ... (" + std::to_string(names.size()) + " in all)";
  return s;
}

}  // namespace fairdiff
