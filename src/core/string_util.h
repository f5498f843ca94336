// Small string helpers for messages and parsing, one of each for the whole library.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace fairdiff {

// "a, b, c": the items with `separator` between them.
std::string join(const std::vector<std::string>& items, const std::string& separator = ", ");

// `s` without leading and trailing spaces, tabs, carriage returns and newlines.
std::string trim(const std::string& s);

bool starts_with(std::string_view s, std::string_view prefix);
bool ends_with(std::string_view s, std::string_view suffix);

// "[2,4,8,8]": a shape in error messages (torch callers pass t.sizes().vec()).
std::string shape_str(const std::vector<int64_t>& shape);

// "a, b, c, ... (12 in all)": the first `limit` names of a list in error messages.
std::string first_names(const std::vector<std::string>& names, size_t limit = 5);

}  // namespace fairdiff
