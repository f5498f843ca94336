// What `fairdiff inspect` reports: a model folder or a safetensors file,
// fully validated (every component built from its config and loaded strictly).
//
//   fairdiff::ModelSummary s = fairdiff::inspect_model("./stable-diffusion-v1-5");
//   for (const auto& c : s.components) printf("%s %lld\n", c.name.c_str(), c.parameters);
//   for (const auto& t : fairdiff::inspect_safetensors("unet.safetensors")) printf("%s\n", t.name.c_str());
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fairdiff {

struct ComponentSummary {
  std::string name;        // "unet"
  std::string class_name;  // "UNet2DConditionModel"
  std::string weights;     // the .safetensors file loaded (empty for tokenizer/scheduler)
  int64_t tensors = 0;
  int64_t parameters = 0;
  std::string detail;      // e.g. "vocab 49408, max length 77" or the scheduler class
};

struct ModelSummary {
  std::string dir;
  std::string class_name;
  std::vector<ComponentSummary> components;
};

// Loads the whole model folder on the CPU in float32; throws fairdiff::Error on any problem.
ModelSummary inspect_model(const std::string& model_dir);

struct TensorSummary {
  std::string name;
  std::string dtype;           // "F32", "F16", "BF16", ...
  std::vector<int64_t> shape;
  int64_t numel = 0;
};

// The tensors of a .safetensors file, from its header (every field validated; no tensor read).
std::vector<TensorSummary> inspect_safetensors(const std::string& path);

}  // namespace fairdiff
