// Reading config.json values with the reference's defaults and one clear
// error per bad value (used by every network's Config::from_json).
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "fairdiff/error.h"

namespace fairdiff {

// The parsed config.json of `path`; throws a BadInput error when unreadable or not JSON.
nlohmann::json read_json_file(const std::string& path, const std::string& hint = {});

// Value of `key`, or `fallback` when absent or null. A value of the wrong JSON
// type is a BadInput error naming the file and the key.
template <typename T>
T config_value(const nlohmann::json& config, const std::string& key, const T& fallback, const std::string& where) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return fallback;
  try {
    return it->template get<T>();
  } catch (const nlohmann::json::exception&) {
    throw_bad_input(where, "config value " + key + " = " + it->dump() + " has the wrong type",
                    "compare with the reference config.json of this component");
  }
}

// Rejects a config value we do not implement, naming it and what is supported.
[[noreturn]] void reject_config(const std::string& where, const std::string& key, const nlohmann::json& value,
                                const std::string& supported);

}  // namespace fairdiff
