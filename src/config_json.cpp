#include "config_json.h"

#include "fs_util.h"

namespace fairdiff {

nlohmann::json read_json_file(const std::string& path, const std::string& hint) {
  const std::string text = read_text_file(path, hint);
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw_bad_input(path, "is not valid JSON", hint.empty() ? "repair or replace the file" : hint);
  if (!j.is_object()) throw_bad_input(path, "is not a JSON object", hint.empty() ? "repair or replace the file" : hint);
  return j;
}

void reject_config(const std::string& where, const std::string& key, const nlohmann::json& value,
                   const std::string& supported) {
  throw_unsupported(where, key + " = " + value.dump() + " is not supported (supported: " + supported + ")",
                    "fairdiff cannot build this model faithfully; use a Stable Diffusion 1.x/2.x model");
}

}  // namespace fairdiff
