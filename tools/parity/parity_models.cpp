// Parity ops for the networks (text encoder here; UNet and VAE in
// parity_unet_vae.cpp) and the key-set check of the real SD checkpoints.
#include <c10/core/DefaultDtype.h>
#include <spdlog/spdlog.h>

#include <cstdio>
#include <filesystem>
#include <set>

#include "config_json.h"
#include "model_folder.h"
#include "parity.h"
#include "single_file.h"

namespace fs = std::filesystem;

namespace fairdiff::parity {

namespace {

LoadOptions load_options(const ParityCase& c) { return {c.options().dtype, c.options().device}; }

CLIPTextModel& text_encoder_for(const ParityCase& c) {
  static std::map<std::string, CLIPTextModel> cache;
  const std::string dir = c.model_dir() + "/text_encoder";
  auto it = cache.find(dir);
  if (it == cache.end()) it = cache.emplace(dir, load_text_encoder(dir, load_options(c))).first;
  return it->second;
}

void text_encoder_forward(ParityCase& c) {
  CLIPTextModel& model = text_encoder_for(c);
  const at::Tensor ids = c.input("input_ids").to(c.options().device);
  const CLIPTextOutput out = model->forward(ids);
  const auto& hs = out.hidden_states;
  const at::Tensor penultimate = hs[hs.size() - 2];
  c.check("last_hidden_state", out.last_hidden_state);
  c.check("penultimate_hidden_state", penultimate);
  c.check("penultimate_final_ln", model->final_layer_norm(penultimate));
  c.check("pooler_output", out.pooler_output);
  c.check("embeddings_output", hs.front());
  // clip_skip = 1 through the pipeline-facing entry point equals the same tensor.
  c.check("penultimate_final_ln", model->prompt_embeds(ids, 1));
}

// Compares a module's parameter names and shapes with a keys.json {name: shape}.
bool same_keys(torch::nn::Module& module, const nlohmann::json& keys, const std::string& label, bool verbose) {
  std::map<std::string, std::vector<int64_t>> ours;
  for (const auto& p : module.named_parameters()) ours[p.key()] = p.value().sizes().vec();
  for (const auto& b : module.named_buffers()) ours[b.key()] = b.value().sizes().vec();
  std::vector<std::string> missing, unexpected, mismatched;
  for (auto it = keys.begin(); it != keys.end(); ++it) {
    auto ours_it = ours.find(it.key());
    if (ours_it == ours.end()) missing.push_back(it.key());
    else if (ours_it->second != it.value().get<std::vector<int64_t>>()) mismatched.push_back(it.key());
  }
  for (const auto& [name, shape] : ours)
    if (!keys.contains(name)) unexpected.push_back(name);
  const bool ok = missing.empty() && unexpected.empty() && mismatched.empty();
  std::printf("%s  keyset %-28s %4zu tensors, %11lld parameters", ok ? "PASS" : "FAIL", label.c_str(), ours.size(),
              static_cast<long long>(parameter_count(module)));
  if (!ok) std::printf("  (%zu missing, %zu unexpected, %zu wrong shape)", missing.size(), unexpected.size(),
                       mismatched.size());
  std::printf("\n");
  auto show = [&](const char* what, const std::vector<std::string>& names) {
    for (size_t i = 0; i < names.size() && (verbose || i < 5); ++i) std::printf("      %s: %s\n", what, names[i].c_str());
  };
  show("missing", missing);
  show("unexpected", unexpected);
  show("wrong shape", mismatched);
  return ok;
}

template <typename Holder, typename Config>
bool check_component(const fs::path& model_dir, const std::string& component, bool verbose) {
  const std::string config_path = (model_dir / (component + ".config.json")).string();
  const nlohmann::json keys = read_json_file((model_dir / (component + ".keys.json")).string());
  const std::string label = model_dir.filename().string() + "/" + component;
  try {
    // Names and shapes only: built in bfloat16 (the SDXL UNet would take 10.3 GB in fp32).
    const caffe2::TypeMeta saved = c10::get_default_dtype();
    c10::set_default_dtype(caffe2::TypeMeta::Make<at::BFloat16>());
    struct Restore {
      caffe2::TypeMeta dtype;
      ~Restore() { c10::set_default_dtype(dtype); }
    } restore{saved};
    Holder module(Config::from_json(read_json_file(config_path), config_path));
    return same_keys(*module, keys, label, verbose);
  } catch (const Error& e) {
    if (e.kind() == ErrorKind::Unsupported) {
      std::printf("SKIP  keyset %-28s rejected clearly: %s\n", label.c_str(), e.what());
      return true;
    }
    throw;
  }
}

// The LDM single-file names of a real checkpoint must map completely onto the
// diffusers names and shapes of its three components.
bool check_single_file(const fs::path& model_dir, bool verbose) {
  const std::string path = (model_dir / "single_file.keys.json").string();
  const nlohmann::json keys = read_json_file(path);
  TensorShapes shapes;
  for (auto it = keys.begin(); it != keys.end(); ++it) shapes.emplace_back(it.key(), it.value().get<std::vector<int64_t>>());
  const std::string label = model_dir.filename().string() + "/single_file";
  const SingleFilePlan plan = plan_single_file(shapes, path);
  std::map<std::string, nlohmann::json> targets;
  for (const std::string component : {"text_encoder", "unet", "vae"})
    targets[component] = read_json_file((model_dir / (component + ".keys.json")).string());
  size_t wrong = 0, filled = 0;
  for (const auto& t : plan.tensors) {
    const auto& component_keys = targets.at(t.component);
    if (!component_keys.contains(t.target) || component_keys[t.target].get<std::vector<int64_t>>() != t.shape) {
      if (verbose || wrong < 5) std::printf("      unmatched: %s %s <- %s\n", t.component.c_str(), t.target.c_str(), t.source.c_str());
      ++wrong;
    } else {
      ++filled;
    }
  }
  size_t expected = 0;
  for (const auto& [component, k] : targets) expected += k.size();
  const bool ok = wrong == 0 && filled == expected;
  std::printf("%s  keyset %-28s %4zu tensors mapped to %zu of %zu targets (%s), %zu ignored\n", ok ? "PASS" : "FAIL",
              label.c_str(), shapes.size(), filled, expected, family_name(plan.family), plan.ignored.size());
  return ok;
}

}  // namespace

void register_model_ops(OpRegistry& registry) {
  registry["text_encoder_forward"] = text_encoder_forward;
  register_unet_vae_ops(registry);
}

bool run_keysets(const std::string& keysets_dir, bool verbose) {
  bool ok = true;
  std::vector<fs::path> models;
  for (const auto& e : fs::directory_iterator(keysets_dir))
    if (e.is_directory()) models.push_back(e.path());
  std::sort(models.begin(), models.end());
  for (const fs::path& model : models) {
    if (fs::exists(model / "text_encoder.keys.json"))
      ok &= check_component<CLIPTextModel, CLIPTextConfig>(model, "text_encoder", verbose);
    if (fs::exists(model / "text_encoder_2.keys.json"))  // SDXL
      ok &= check_component<CLIPTextModelWithProjection, CLIPTextConfig>(model, "text_encoder_2", verbose);
    if (fs::exists(model / "unet.keys.json"))
      ok &= check_component<UNet2DConditionModel, UNet2DConditionConfig>(model, "unet", verbose);
    if (fs::exists(model / "vae.keys.json"))
      ok &= check_component<AutoencoderKL, AutoencoderKLConfig>(model, "vae", verbose);
    if (fs::exists(model / "single_file.keys.json")) ok &= check_single_file(model, verbose);
  }
  return ok;
}

}  // namespace fairdiff::parity
