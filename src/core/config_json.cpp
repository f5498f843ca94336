#include "config_json.h"

#include "fs_util.h"

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
                   const std::string& supported) {
  throw_unsupported(where, key + " = " + value.dump() + " is not supported (supported: " + supported + ")",
                    "fairdiff cannot build this model faithfully; use a Stable Diffusion 1.x/2.x model");
}

}  // namespace fairdiff
