// A config.json: read_json_file (with Python's NaN/Infinity tokens), then every typed
// getter of config_json on every key, as the networks' and schedulers' from_json call them.
#include "config_json.h"
#include "fuzz_util.h"

namespace cj = fairdiff::config_json;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::scratch_dir() + "/config.json";
  fuzz::write_file(path, std::string(reinterpret_cast<const char*>(data), size));
  nlohmann::json config;
  bool ok = false;
  fuzz::refuse_cleanly([&] {
    config = fairdiff::read_json_file(path);
    ok = true;
  });
  if (!ok) return 0;
  std::vector<std::string> keys;
  for (auto it = config.begin(); it != config.end(); ++it) keys.push_back(it.key());
  keys.push_back("absent");
  for (const std::string& key : keys) {
    fuzz::refuse_cleanly([&] { cj::has_value(config, key); });
    fuzz::refuse_cleanly([&] { cj::get_int(config, key, 0, path); });
    fuzz::refuse_cleanly([&] { cj::get_number(config, key, 0, path); });
    fuzz::refuse_cleanly([&] { cj::get_bool(config, key, false, path); });
    fuzz::refuse_cleanly([&] { cj::get_string(config, key, "", path); });
    fuzz::refuse_cleanly([&] { cj::get_string_list(config, key, {}, path); });
    fuzz::refuse_cleanly([&] { cj::get_number_list(config, key, {}, path); });
    fuzz::refuse_cleanly([&] {
      const auto values = cj::get_int_or_list(config, key, {1}, path);
      cj::per_block(values, 4, key, path);
    });
    fuzz::refuse_cleanly([&] { cj::require_null(config, key, path); });
  }
  fuzz::refuse_cleanly([&] { cj::warn_unknown_keys(config, {"sample_size"}, path); });
  return 0;
}
