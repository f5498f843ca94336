// fairdiff-bench --save-random-sdxl DIR: the SDXL base 1.0 architecture with random weights,
// written once as a diffusers folder so that `fairdiff-bench --model DIR` measures SDXL as a
// real model loads and runs (mapped weights, paging idle components out).
//
// The weights are written straight from the key sets (<fixtures>/keysets/sdxl_base: every
// tensor's name and shape), one tensor at a time: no network is built, so writing the
// 10.3 GB of float32 weights needs memory for the largest tensor only (the 253 MB token
// embedding of text_encoder_2). Values as the SD 1.5 random model: weights ~ N(0, 0.02),
// biases 0, one-dimensional norm scales 1 (finite activations at the real model's cost).
// Tokenizers and scheduler come from <fixtures>/models/tiny-sdxl (the real CLIP vocabulary,
// SDXL base's Euler settings).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "config_json.h"
#include "fairdiff/error.h"
#include "fs_util.h"

namespace fairdiff::bench {
namespace {

namespace fs = std::filesystem;

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// One safetensors file of float32 tensors named and shaped by keys.json, written in order.
void write_random_safetensors(const std::string& keys_path, const std::string& out, at::Generator& gen) {
  const nlohmann::json keys = read_json_file(keys_path);
  nlohmann::json header = nlohmann::json::object();
  int64_t offset = 0;
  for (auto it = keys.begin(); it != keys.end(); ++it) {
    int64_t n = 1;
    for (int64_t d : it.value().get<std::vector<int64_t>>()) n *= d;
    header[it.key()] = {{"dtype", "F32"}, {"shape", it.value()}, {"data_offsets", {offset, offset + 4 * n}}};
    offset += 4 * n;
  }
  header["__metadata__"] = {{"format", "pt"}, {"fairdiff_bench", "random weights from " + keys_path}};
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data starts 8-byte aligned
  std::ofstream f(out, std::ios::binary | std::ios::trunc);
  if (!f) throw_bad_input(out, "cannot be written", "check the folder and the free space");
  const uint64_t length = text.size();
  f.write(reinterpret_cast<const char*>(&length), 8);  // little-endian on every machine we build for
  f.write(text.data(), static_cast<std::streamsize>(text.size()));
  // nlohmann::json's object iterates in key order, the order of the offsets above.
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const auto shape = it.value()["shape"].get<std::vector<int64_t>>();
    at::Tensor t;
    if (ends_with(it.key(), ".bias")) t = at::zeros(shape, at::kFloat);
    else if (shape.size() == 1) t = at::ones(shape, at::kFloat);  // norm scales
    else t = at::randn(shape, gen, at::TensorOptions(at::kFloat)) * 0.02;
    t = t.contiguous();
    f.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(t.nbytes()));
  }
  if (!f.flush()) throw_bad_input(out, "could not be written completely", "check the free space");
}

void copy_writable(const fs::path& from, const fs::path& to) {
  fs::copy_file(from, to, fs::copy_options::overwrite_existing);
  fs::permissions(to, fs::perms::owner_write, fs::perm_options::add);  // shared/ is read-only
}

}  // namespace

int save_random_sdxl(const std::string& fixtures, const std::string& dir) {
  const auto t0 = std::chrono::steady_clock::now();
  const fs::path out(dir), keysets = fs::path(fixtures) / "keysets/sdxl_base", tiny = fs::path(fixtures) / "models/tiny-sdxl";
  if (!is_directory(keysets.string()) || !is_directory(tiny.string()))
    throw_bad_input(keysets.string(), "the SDXL key sets or models/tiny-sdxl are missing",
                    "set FAIRDIFF_FIXTURES (or --fixtures) to the fixtures folder");
  for (const char* sub : {"text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae", "scheduler"})
    fs::create_directories(out / sub);
  for (const char* tok : {"tokenizer", "tokenizer_2"})
    for (const auto& entry : fs::directory_iterator(tiny / tok))
      if (entry.is_regular_file()) copy_writable(entry.path(), out / tok / entry.path().filename());
  copy_writable(tiny / "scheduler/scheduler_config.json", out / "scheduler/scheduler_config.json");
  at::Generator gen = at::detail::createCPUGenerator(1234);
  for (const std::string component : {"text_encoder", "text_encoder_2", "vae", "unet"}) {
    nlohmann::json config = read_json_file((keysets / (component + ".config.json")).string());
    if (component == "text_encoder_2") config["architectures"] = {"CLIPTextModelWithProjection"};
    write_file_atomic((out / component / "config.json").string(), config.dump(2) + "\n");
    const std::string weights = component.rfind("text_encoder", 0) == 0 ? "model.safetensors"
                                                                        : "diffusion_pytorch_model.safetensors";
    std::fprintf(stderr, "writing %s/%s\n", component.c_str(), weights.c_str());
    write_random_safetensors((keysets / (component + ".keys.json")).string(), (out / component / weights).string(), gen);
  }
  const nlohmann::json index = {{"_class_name", "StableDiffusionXLPipeline"},
                                {"_fairdiff_bench", "SDXL base 1.0 architecture, random weights (fairdiff-bench)"},
                                {"force_zeros_for_empty_prompt", true},
                                {"text_encoder", {"transformers", "CLIPTextModel"}},
                                {"text_encoder_2", {"transformers", "CLIPTextModelWithProjection"}},
                                {"tokenizer", {"transformers", "CLIPTokenizer"}},
                                {"tokenizer_2", {"transformers", "CLIPTokenizer"}},
                                {"unet", {"diffusers", "UNet2DConditionModel"}},
                                {"vae", {"diffusers", "AutoencoderKL"}},
                                {"scheduler", {"diffusers", "EulerDiscreteScheduler"}}};
  write_file_atomic((out / "model_index.json").string(), index.dump(2) + "\n");
  std::printf("wrote %s (random SDXL base 1.0, float32) in %.1f s\n", dir.c_str(),
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return 0;
}

}  // namespace fairdiff::bench
