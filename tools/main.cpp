// fairdiff: the command line. Thin by design: flags -> library call -> exit code.
//
// Exit codes: 0 success, 1 runtime failure, 2 bad input (usage, files, values).
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <string>

#include "fairdiff/error.h"
#include "fairdiff/inspect.h"
#include "fairdiff/safetensors.h"

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

int inspect(const std::string& path) {
  if (ends_with(path, ".ckpt") || ends_with(path, ".pt") || ends_with(path, ".bin"))
    fairdiff::throw_unsupported(path, "PyTorch pickle files are never loaded: unpickling can execute code",
                                "use the model's .safetensors file");
  if (ends_with(path, ".safetensors")) {
    const fairdiff::SafeTensors st(path);
    int64_t params = 0;
    for (const auto& t : st.tensors()) {
      std::string shape;
      for (int64_t d : t.shape) shape += (shape.empty() ? "" : ",") + std::to_string(d);
      std::printf("%-70s %-4s [%s]\n", t.name.c_str(), fairdiff::dtype_name(t.dtype), shape.c_str());
      params += t.numel();
    }
    std::printf("%zu tensors, %lld values\n", st.tensors().size(), static_cast<long long>(params));
    return 0;
  }
  const fairdiff::ModelSummary s = fairdiff::inspect_model(path);
  std::printf("%s (%s)\n", s.dir.c_str(), s.class_name.c_str());
  for (const auto& c : s.components) {
    std::printf("  %-13s %-22s", c.name.c_str(), c.class_name.c_str());
    if (c.tensors) std::printf(" %5lld tensors %12lld parameters", static_cast<long long>(c.tensors),
                               static_cast<long long>(c.parameters));
    if (!c.detail.empty()) std::printf(" %s", c.detail.c_str());
    std::printf("\n");
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"fairdiff: fair text-to-image generation with Stable Diffusion"};
  app.require_subcommand(1);
  std::string inspect_path;
  auto* inspect_cmd = app.add_subcommand("inspect", "validate and describe a model folder or a .safetensors file");
  inspect_cmd->add_option("path", inspect_path, "model folder (diffusers layout) or .safetensors file")->required();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  spdlog::set_pattern("%v");
  try {
    if (*inspect_cmd) return inspect(inspect_path);
  } catch (const fairdiff::Error& e) {
    std::fprintf(stderr, "fairdiff: error: %s\n", e.what());
    return fairdiff::exit_code(e.kind());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fairdiff: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
