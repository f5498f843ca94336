// Reading config.json values with the reference's defaults and one clear
// error per bad value (used by every network's and scheduler's Config::from_json).
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "fairdiff/error.h"

namespace fairdiff {

// The parsed config.json of `path`; throws a BadInput error when unreadable or not JSON.
nlohmann::json read_json_file(const std::string& path, const std::string& hint = {});

// Rejects a config value we do not implement, naming it and what is supported; the hint
// defaults to the one for Stable Diffusion networks.
[[noreturn]] void reject_config(const std::string& where, const std::string& key, const nlohmann::json& value,
                                const std::string& supported, const std::string& hint = {});

// A JSON number as an int64 when it is a whole number that int64 holds: integers, and
// integral floats (2.0, as some writers store them); nullopt for anything else (2.5,
// 1.84467e+20, 18446744073709551615, "2"). Casting a float beyond int64 is undefined
// behaviour, and nlohmann's get<int64_t>() does exactly that: read user JSON through this.
std::optional<int64_t> whole_number(const nlohmann::json& value);

// Typed config values. Absent or null keys take the given default; a present key of the
// wrong type is a BadInput error naming `where`, the key, the type expected and the value found.
namespace config_json {

bool has_value(const nlohmann::json& config, const std::string& key);  // present and not null
// An integer; integral floats (1.0, as some writers store them) count as integers.
int64_t get_int(const nlohmann::json& config, const std::string& key, int64_t fallback, const std::string& where);
double get_number(const nlohmann::json& config, const std::string& key, double fallback, const std::string& where);
bool get_bool(const nlohmann::json& config, const std::string& key, bool fallback, const std::string& where);
std::string get_string(const nlohmann::json& config, const std::string& key, const std::string& fallback,
                       const std::string& where);
std::vector<std::string> get_string_list(const nlohmann::json& config, const std::string& key,
                                         const std::vector<std::string>& fallback, const std::string& where);
std::vector<double> get_number_list(const nlohmann::json& config, const std::string& key,
                                    const std::vector<double>& fallback, const std::string& where);
// An int or a list of ints; an int is returned as a one-element list.
std::vector<int64_t> get_int_or_list(const nlohmann::json& config, const std::string& key,
                                     const std::vector<int64_t>& fallback, const std::string& where);
// Throws Unsupported unless the key is absent or null.
void require_null(const nlohmann::json& config, const std::string& key, const std::string& where,
                  const std::string& hint = {});
// Logs one warning listing keys that are not in `known` and do not start with '_'
// (the reference ignores unknown keys with a warning too).
void warn_unknown_keys(const nlohmann::json& config, const std::vector<std::string>& known, const std::string& where);
// Broadcasts a one-element list to `n` entries; checks the length otherwise.
std::vector<int64_t> per_block(const std::vector<int64_t>& values, size_t n, const std::string& key,
                               const std::string& where);

}  // namespace config_json
}  // namespace fairdiff
