#include "infotext.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>

#include "string_util.h"

namespace fairdiff {

std::string python_float(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  if (value == 0) return std::signbit(value) ? "-0.0" : "0.0";
  // Shortest digits that read back to the same double.
  char buf[64];
  int precision = 1;
  for (; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof buf, "%.*e", precision - 1, value);
    if (std::strtod(buf, nullptr) == value) break;
  }
  // buf = [-]d.ddde[+-]XX; split into digits and exponent.
  std::string s = buf;
  const bool negative = s[0] == '-';
  if (negative) s.erase(0, 1);
  const size_t e = s.find('e');
  const int exponent = std::atoi(s.c_str() + e + 1);
  std::string digits = s.substr(0, e);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  std::string out;
  if (exponent < -4 || exponent >= 16) {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char exp[16];
    std::snprintf(exp, sizeof exp, "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
    out += exp;
  } else if (exponent < 0) {
    out = "0." + std::string(static_cast<size_t>(-exponent - 1), '0') + digits;
  } else {
    const size_t int_len = static_cast<size_t>(exponent) + 1;
    if (digits.size() <= int_len) {
      out = digits + std::string(int_len - digits.size(), '0') + ".0";
    } else {
      out = digits.substr(0, int_len) + "." + digits.substr(int_len);
    }
  }
  return negative ? "-" + out : out;
}

std::string a1111_quote(const std::string& value) {
  if (value.find_first_of(",:\n") == std::string::npos) return value;
  // ensure_ascii=False: non-ASCII characters stay as they are; invalid UTF-8 becomes U+FFFD
  // (as Python, which cannot hold it, would have it) instead of throwing.
  return nlohmann::json(value).dump(-1, ' ', /*ensure_ascii=*/false, nlohmann::json::error_handler_t::replace);
}

std::string format_infotext(const Infotext& info) {
  std::string text = info.prompt;
  if (!info.negative_prompt.empty()) text += "\nNegative prompt: " + info.negative_prompt;
  std::string params;
  for (const auto& [key, value] : info.params) {
    if (!params.empty()) params += ", ";
    params += key == value ? key : key + ": " + a1111_quote(value);
  }
  return text + "\n" + params;
}

namespace {

const std::regex& param_pattern() {
  // A1111's re_param: a key of word characters, spaces, '-' and '/', then a
  // JSON-quoted value or anything up to the next comma.
  static const std::regex re(R"re(\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$))re");
  return re;
}

std::vector<std::pair<std::string, std::string>> find_params(const std::string& line) {
  std::vector<std::pair<std::string, std::string>> found;
  for (auto it = std::sregex_iterator(line.begin(), line.end(), param_pattern()); it != std::sregex_iterator(); ++it)
    found.emplace_back((*it)[1].str(), (*it)[2].str());
  return found;
}

}  // namespace

Infotext parse_infotext(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(trim(text));
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  Infotext info;
  std::string last = lines.empty() ? "" : lines.back();
  if (lines.empty() || find_params(last).size() < 3) last.clear();
  else lines.pop_back();
  bool negative = false;
  for (std::string line : lines) {
    line = trim(line);
    if (starts_with(line, "Negative prompt:")) {
      negative = true;
      line = trim(line.substr(16));
    }
    std::string& target = negative ? info.negative_prompt : info.prompt;
    target += (target.empty() ? "" : "\n") + line;
  }
  for (auto& [key, value] : find_params(last)) {
    if (value.size() >= 2 && value.front() == '"' && value.back() == '"') {
      const auto parsed = nlohmann::json::parse(value, nullptr, false);
      if (parsed.is_string()) value = parsed.get<std::string>();
    }
    info.params.emplace_back(key, value);
  }
  return info;
}

}  // namespace fairdiff
