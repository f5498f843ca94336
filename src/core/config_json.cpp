#include "config_json.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>

#include "fs_util.h"
#include "string_util.h"

namespace fairdiff {

// Python's json module writes the non-standard tokens NaN, Infinity and -Infinity
// (diffusers configs carry "lambda_min_clipped": -Infinity). Quote them outside
// strings so the file parses; readers of such keys accept the quoted forms.
std::string quote_python_nonfinite(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      out.push_back(c);
      if (c == '\\' && i + 1 < text.size()) out.push_back(text[++i]);
      else if (c == '"') in_string = false;
      continue;
    }
    if (c == '"') in_string = true;
    bool replaced = false;
    for (const char* token : {"-Infinity", "Infinity", "NaN"}) {
      const size_t n = std::char_traits<char>::length(token);
      if (text.compare(i, n, token) == 0) {
        out += '"' + std::string(token) + '"';
        i += n - 1;
        replaced = true;
        break;
      }
    }
    if (!replaced) out.push_back(c);
  }
  return out;
}

nlohmann::json read_json_file(const std::string& path, const std::string& hint) {
  const std::string text = quote_python_nonfinite(read_text_file(path, hint));
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw_bad_input(path, "is not valid JSON", hint.empty() ? "repair or replace the file" : hint);
  if (!j.is_object()) throw_bad_input(path, "is not a JSON object", hint.empty() ? "repair or replace the file" : hint);
  return j;
}

void reject_config(const std::string& where, const std::string& key, const nlohmann::json& value,
                   const std::string& supported, const std::string& hint) {
  throw_unsupported(where, key + " = " + value.dump() + " is not supported (supported: " + supported + ")",
                    hint.empty() ? "fairdiff cannot build this model faithfully; use a Stable Diffusion 1.x/2.x model"
                                 : hint);
}

std::optional<int64_t> whole_number(const nlohmann::json& value) {
  if (value.is_number_unsigned()) {
    const uint64_t u = value.get<uint64_t>();
    if (u > static_cast<uint64_t>(INT64_MAX)) return std::nullopt;
    return static_cast<int64_t>(u);
  }
  if (value.is_number_integer()) return value.get<int64_t>();
  if (value.is_number_float()) {
    // Some writers store integral values as floats (1.0). [-2^63, 2^63) holds exactly.
    const double d = value.get<double>();
    if (std::isfinite(d) && std::floor(d) == d && d >= -0x1p63 && d < 0x1p63) return static_cast<int64_t>(d);
  }
  return std::nullopt;
}

namespace config_json {
namespace {

[[noreturn]] void wrong_type(const std::string& where, const std::string& key, const std::string& expected,
                             const nlohmann::json& found) {
  throw_bad_input(where,
                  "config value " + key + " = " + found.dump() + " has the wrong type (expected " + expected + ")",
                  "fix config.json or re-save the model with diffusers");
}

int64_t as_int(const nlohmann::json& value, const std::string& key, const std::string& where) {
  if (const auto v = whole_number(value)) return *v;
  wrong_type(where, key, value.is_number() ? "an integer of at most 19 digits" : "an integer", value);
}

}  // namespace

bool has_value(const nlohmann::json& config, const std::string& key) {
  auto it = config.find(key);
  return it != config.end() && !it->is_null();
}

int64_t get_int(const nlohmann::json& config, const std::string& key, int64_t fallback, const std::string& where) {
  if (!has_value(config, key)) return fallback;
  return as_int(config.at(key), key, where);
}

double get_number(const nlohmann::json& config, const std::string& key, double fallback, const std::string& where) {
  if (!has_value(config, key)) return fallback;
  const auto& value = config.at(key);
  if (!value.is_number()) wrong_type(where, key, "a number", value);
  return value.get<double>();
}

bool get_bool(const nlohmann::json& config, const std::string& key, bool fallback, const std::string& where) {
  if (!has_value(config, key)) return fallback;
  const auto& value = config.at(key);
  if (!value.is_boolean()) wrong_type(where, key, "true or false", value);
  return value.get<bool>();
}

std::string get_string(const nlohmann::json& config, const std::string& key, const std::string& fallback,
                       const std::string& where) {
  if (!has_value(config, key)) return fallback;
  const auto& value = config.at(key);
  if (!value.is_string()) wrong_type(where, key, "a string", value);
  return value.get<std::string>();
}

std::vector<std::string> get_string_list(const nlohmann::json& config, const std::string& key,
                                         const std::vector<std::string>& fallback, const std::string& where) {
  if (!has_value(config, key)) return fallback;
  const auto& value = config.at(key);
  if (!value.is_array()) wrong_type(where, key, "a list of strings", value);
  std::vector<std::string> out;
  for (const auto& item : value) {
    if (!item.is_string()) wrong_type(where, key, "a list of strings", value);
    out.push_back(item.get<std::string>());
  }
  return out;
}

std::vector<double> get_number_list(const nlohmann::json& config, const std::string& key,
                                    const std::vector<double>& fallback, const std::string& where) {
  if (!has_value(config, key)) return fallback;
  const auto& value = config.at(key);
  if (!value.is_array()) wrong_type(where, key, "a list of numbers", value);
  std::vector<double> out;
  for (const auto& item : value) {
    if (!item.is_number()) wrong_type(where, key, "a list of numbers", value);
    out.push_back(item.get<double>());
  }
  return out;
}

std::vector<int64_t> get_int_or_list(const nlohmann::json& config, const std::string& key,
                                     const std::vector<int64_t>& fallback, const std::string& where) {
  if (!has_value(config, key)) return fallback;
  const auto& value = config.at(key);
  if (!value.is_array()) return {as_int(value, key, where)};
  std::vector<int64_t> out;
  for (const auto& item : value) {
    if (item.is_array())
      throw_unsupported(where, key + " = " + value.dump() + " (nested lists) is not supported",
                        "give one integer per block");
    out.push_back(as_int(item, key, where));
  }
  if (out.empty()) wrong_type(where, key, "an integer or a non-empty list of integers", value);
  return out;
}

void require_null(const nlohmann::json& config, const std::string& key, const std::string& where,
                  const std::string& hint) {
  if (!has_value(config, key)) return;
  throw_unsupported(where, key + " = " + config.at(key).dump() + " is not supported (supported: null)", hint);
}

void warn_unknown_keys(const nlohmann::json& config, const std::vector<std::string>& known, const std::string& where) {
  std::vector<std::string> unknown;
  for (auto it = config.begin(); it != config.end(); ++it) {
    if (!it.key().empty() && it.key()[0] == '_') continue;
    if (std::find(known.begin(), known.end(), it.key()) == known.end()) unknown.push_back(it.key());
  }
  if (!unknown.empty())
    spdlog::warn("{}: ignoring unknown config keys: {} (the reference ignores them too)", where, join(unknown));
}

std::vector<int64_t> per_block(const std::vector<int64_t>& values, size_t n, const std::string& key,
                               const std::string& where) {
  if (values.size() == 1) return std::vector<int64_t>(n, values[0]);
  if (values.size() != n)
    throw_bad_input(
        where,
        key + " has " + std::to_string(values.size()) + " entries, expected one per block (" + std::to_string(n) + ")",
        "give one value, or one per entry of down_block_types");
  return values;
}

}  // namespace config_json

}  // namespace fairdiff
