#include "model_folder.h"

#include <c10/core/InferenceMode.h>

#include "config_json.h"
#include "fs_util.h"
#include "runtime.h"
#include "string_util.h"
#include "tensor_io.h"

namespace fairdiff {
namespace {

const std::string kFolderHint = "expected a Stable Diffusion model folder in the diffusers layout";

// The components a text-to-image SD 1.x/2.x pipeline needs, with the classes we implement.
const std::map<std::string, std::vector<std::string>> kRequired = {
    {"text_encoder", {"CLIPTextModel"}},
    // The shipped toy model has a SentencePiece tokenizer (tokenizer/spiece.model).
    {"tokenizer", {"CLIPTokenizer", "CLIPTokenizerFast", "SentencePieceTokenizer"}},
    {"unet", {"UNet2DConditionModel"}},
    {"vae", {"AutoencoderKL"}},
    {"scheduler", {}},  // any class name: the scheduler is chosen from its config later
};

// What an SDXL pipeline adds.
const std::map<std::string, std::vector<std::string>> kRequiredXL = {
    {"text_encoder_2", {"CLIPTextModelWithProjection"}},
    {"tokenizer_2", {"CLIPTokenizer", "CLIPTokenizerFast"}},
};

const std::vector<std::string> kPipelines = {"StableDiffusionPipeline", "StableDiffusionXLPipeline"};

template <typename Holder, typename Config>
Holder load_component(const std::string& dir, const std::string& component, const std::string& weights_name,
                      const LoadOptions& options, MappedWeights* mapped, std::vector<PendingWeights>* pending) {
  if (!is_directory(dir))
    throw_bad_input(dir, "component folder " + component + "/ is missing", kFolderHint);
  const std::string config_path = dir + "/config.json";
  const Config config = Config::from_json(read_json_file(config_path), config_path);
  Holder module = leaf::built_for_load<Holder>(config);  // every parameter comes from the file, below
  const std::string file = component_weights(dir, weights_name);
  // Shared: tensors that alias the mapping keep it alive after this returns.
  const auto weights = std::make_shared<const SafeTensors>(file);
  // A conversion on the CPU is done once: later loads map the weights cache's entry.
  const std::vector<TensorView>& stored = weights->tensors();
  const bool cached = options.weights_cache.enabled() && options.device.is_cpu() &&
                      std::any_of(stored.begin(), stored.end(), [&](const TensorView& v) { return converts(v, options.dtype); });
  const CachedWeightsKey key = cached ? cached_weights_key(file, component, options.dtype) : CachedWeightsKey{};
  MappedWeights views = load_through_cache(
      *module, options.weights_cache, cached ? &key : nullptr,
      [&] { return MappedWeights(weights, load_state_dict(*module, weights, component, options.dtype, options.device)); },
      pending);
  // Ready to run: every page mapped now, in one call per tensor; unless the model maps each
  // component in when it runs (page_out_idle: StableDiffusionModel::use), or prepacking
  // reads the conv weights once and drops them (prepack_model then prefaults what is left).
  const bool mapped_at_use = mapped && options.page_out_idle;
  if (!mapped_at_use && !prepacks_convolutions(options)) views.prefault_all();
  if (mapped) *mapped = std::move(views);
  module->eval();
  // The values the constructor initialised (torch::nn layers do; the CLIP encoders hold
  // 2.6 GiB of them in SDXL) are freed now: give them back rather than keep them in the heap.
  release_free_memory();
  return module;
}

}  // namespace

ModelIndex read_model_index(const std::string& model_dir) {
  if (!is_directory(model_dir)) throw_bad_input(model_dir, "model folder not found", kFolderHint);
  const std::string path = model_dir + "/model_index.json";
  if (!is_regular_file(path)) throw_bad_input(model_dir, "has no model_index.json", kFolderHint);
  const nlohmann::json j = read_json_file(path);
  ModelIndex index;
  index.class_name = config_json::get_string(j, "_class_name", "", path);
  index.xl = index.class_name == "StableDiffusionXLPipeline";
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key().empty() || it.key()[0] == '_' || !it.value().is_array() || it.value().size() != 2) continue;
    if (it.value()[0].is_null() || it.value()[1].is_null()) continue;  // e.g. safety_checker [null, null]
    if (!it.value()[0].is_string() || !it.value()[1].is_string())
      throw_bad_input(path, "component " + it.key() + " = " + it.value().dump() + " is not [library, class]");
    index.components[it.key()] = {it.value()[0].get<std::string>(), it.value()[1].get<std::string>()};
  }
  // The SDXL refiner has text_encoder_2 only and works on images (img2img): say so by name.
  if (index.components.count("text_encoder_2") && !index.components.count("text_encoder"))
    throw_unsupported(path, "has text_encoder_2 but no text_encoder: an SDXL refiner (" + index.class_name +
                                "), which refines images and does not generate them",
                      "use the SDXL base model (stabilityai/stable-diffusion-xl-base-1.0)");
  if (index.class_name.find("XL") != std::string::npos && !index.xl)
    throw_unsupported(path, "_class_name = " + index.class_name + " is not supported (supported: " + join(kPipelines) +
                                ")",
                      "use a text-to-image Stable Diffusion 1.x, 2.x or XL model");
  for (const auto* required : {&kRequired, &kRequiredXL}) {
    if (required == &kRequiredXL && !index.xl) break;
    for (const auto& [name, classes] : *required) {
      auto it = index.components.find(name);
      if (it == index.components.end())
        throw_bad_input(path, "lists no " + name + " component" + (index.xl ? " (an SDXL pipeline needs it)" : ""),
                        kFolderHint);
      const std::string& cls = it->second.second;
      if (!classes.empty() && std::find(classes.begin(), classes.end(), cls) == classes.end())
        throw_unsupported(path, name + " class " + cls + " is not supported (supported: " + join(classes) + ")",
                          "use a Stable Diffusion 1.x, 2.x or XL model");
    }
  }
  if (!index.xl && index.components.count("text_encoder_2"))
    throw_unsupported(path, "has a second text encoder but _class_name = " + index.class_name +
                                " (supported with two: StableDiffusionXLPipeline)",
                      "use a Stable Diffusion 1.x, 2.x or XL model");
  // diffusers' StableDiffusionXLPipeline defaults force_zeros_for_empty_prompt to true.
  index.force_zeros_for_empty_prompt = index.xl && config_json::get_bool(j, "force_zeros_for_empty_prompt", true, path);
  return index;
}

std::string component_weights(const std::string& dir, const std::string& name) {
  for (const std::string& candidate : {dir + "/" + name + ".safetensors", dir + "/" + name + ".fp16.safetensors"})
    if (is_regular_file(candidate)) return candidate;
  for (const std::string& pickle : {dir + "/" + name + ".bin", dir + "/" + name + ".fp16.bin"})
    if (is_regular_file(pickle))
      throw_unsupported(pickle, "PyTorch pickle weights are not loaded: unpickling can execute code",
                        "convert the folder to safetensors (diffusers: save_pretrained(safe_serialization=True))");
  throw_bad_input(dir, "has no " + name + ".safetensors", kFolderHint);
}

namespace {

// transformers names its weights model.*, diffusers diffusion_pytorch_model.*.
const char* weights_name(const std::string& component) {
  return component == "text_encoder" || component == "text_encoder_2" ? "model" : "diffusion_pytorch_model";
}

}  // namespace

std::string model_weights(const std::string& model_dir, const std::string& component) {
  return component_weights(model_dir + "/" + component, weights_name(component));
}

namespace {

// The class the folder's config.json names must be the one its slot takes (a projection
// head in text_encoder/, or none in text_encoder_2/, is a mixed-up folder).
void require_architecture(const std::string& dir, const std::string& architecture) {
  const std::string config_path = dir + "/config.json";
  if (!is_regular_file(config_path)) return;  // load_component names what is missing
  const CLIPTextConfig c = CLIPTextConfig::from_json(read_json_file(config_path), config_path);
  if (!c.architecture.empty() && c.architecture != architecture)
    throw_bad_input(config_path, "architectures is " + c.architecture + ", this folder holds a " + architecture,
                    "take the folder from the model's release");
}

}  // namespace

CLIPTextModel load_text_encoder(const std::string& dir, const LoadOptions& options, MappedWeights* mapped,
                                std::vector<PendingWeights>* pending) {
  require_architecture(dir, "CLIPTextModel");
  return load_component<CLIPTextModel, CLIPTextConfig>(dir, "text_encoder", weights_name("text_encoder"), options, mapped,
                                                      pending);
}

CLIPTextModelWithProjection load_text_encoder_2(const std::string& dir, const LoadOptions& options,
                                                MappedWeights* mapped, std::vector<PendingWeights>* pending) {
  require_architecture(dir, "CLIPTextModelWithProjection");
  return load_component<CLIPTextModelWithProjection, CLIPTextConfig>(dir, "text_encoder_2",
                                                                     weights_name("text_encoder_2"), options, mapped,
                                                                     pending);
}

UNet2DConditionModel load_unet(const std::string& dir, const LoadOptions& options, MappedWeights* mapped,
                               std::vector<PendingWeights>* pending) {
  return load_component<UNet2DConditionModel, UNet2DConditionConfig>(dir, "unet", weights_name("unet"), options,
                                                                     mapped, pending);
}

AutoencoderKL load_vae(const std::string& dir, const LoadOptions& options, MappedWeights* mapped,
                       std::vector<PendingWeights>* pending) {
  return load_component<AutoencoderKL, AutoencoderKLConfig>(dir, "vae", weights_name("vae"), options, mapped, pending);
}

StableDiffusionModel load_model_folder(const std::string& model_dir, const LoadOptions& options) {
  StableDiffusionModel m;
  m.dir = model_dir;
  m.index = read_model_index(model_dir);
  const std::string scheduler_config = model_dir + "/scheduler/scheduler_config.json";
  if (!is_regular_file(scheduler_config))
    throw_bad_input(model_dir, "has no scheduler/scheduler_config.json", kFolderHint);
  m.scheduler_config = read_json_file(scheduler_config);
  if (!is_directory(model_dir + "/tokenizer"))
    throw_bad_input(model_dir, "component folder tokenizer/ is missing", kFolderHint);
  m.tokenizer = load_tokenizer(model_dir + "/tokenizer");
  // Converted weights to store in the cache (not when prepacking replaces them right away).
  std::vector<PendingWeights> pending;
  std::vector<PendingWeights>* to_cache = prepacks_convolutions(options) ? nullptr : &pending;
  m.text_encoder = load_text_encoder(model_dir + "/text_encoder", options, &m.mapped["text_encoder"], to_cache);
  if (m.index.xl) {
    if (!is_directory(model_dir + "/tokenizer_2"))
      throw_bad_input(model_dir, "component folder tokenizer_2/ is missing (an SDXL model has two tokenizers)",
                      kFolderHint);
    m.tokenizer_2 = load_tokenizer(model_dir + "/tokenizer_2");
    if (!is_directory(model_dir + "/text_encoder_2"))
      throw_bad_input(model_dir, "component folder text_encoder_2/ is missing (an SDXL model has two text encoders)",
                      kFolderHint);
    m.text_encoder_2 = load_text_encoder_2(model_dir + "/text_encoder_2", options, &m.mapped["text_encoder_2"], to_cache);
  }
  m.unet = load_unet(model_dir + "/unet", options, &m.mapped["unet"], to_cache);
  m.vae = load_vae(model_dir + "/vae", options, &m.mapped["vae"], to_cache);
  m.cache_writes = store_cached_weights(options.weights_cache, std::move(pending));
  m.page_out_idle = options.page_out_idle;
  if (prepacks_convolutions(options)) prepack_model(m);
  return m;
}

bool prepacks_convolutions(const LoadOptions& options) {
  return options.prepack_convolutions && options.device.is_cpu() && leaf::onednn_reorders(options.dtype);
}

int64_t prepack_model(StableDiffusionModel& m) {
  c10::InferenceMode inference;
  int64_t n = 0;
  auto prepack = [&](torch::nn::Module& module, const std::string& component) {
    auto it = m.mapped.find(component);
    n += leaf::prepack_convolutions(module, [&](const at::Tensor& weight) {
      if (it != m.mapped.end()) it->second.forget(weight.data_ptr());
      // The reorder went through a dense copy of the weight; with configure_allocator the
      // heap keeps such blocks, and 40 different large sizes would add up (0.7 GiB here).
      if (weight.nbytes() > (size_t(8) << 20)) release_free_memory();
    });
  };
  prepack(*m.text_encoder, "text_encoder");
  prepack(*m.unet, "unet");
  prepack(*m.vae, "vae");
  release_free_memory();
  // The weights that are still the file's: now, or when their component runs.
  if (!m.page_out_idle)
    for (auto& [name, weights] : m.mapped) weights.prefault_all();
  return n;
}

namespace {
bool is_text_encoder(const std::string& component) {
  return component == "text_encoder" || component == "text_encoder_2";
}
}  // namespace

int64_t store_weights_fp16(StableDiffusionModel& m) {
  c10::InferenceMode inference;
  int64_t n = 0;
  auto store = [&](torch::nn::Module& module, const std::string& component) {
    auto it = m.mapped.find(component);
    n += leaf::store_weights(module, at::kHalf, [&](const at::Tensor& weight) {
      if (it != m.mapped.end()) it->second.forget(weight.data_ptr());
    });
  };
  store(*m.text_encoder, "text_encoder");
  if (m.xl()) store(*m.text_encoder_2, "text_encoder_2");
  store(*m.unet, "unet");
  store(*m.vae, "vae");
  release_free_memory();
  return n;
}

void StableDiffusionModel::use(const std::string& component) {
  // A text encoder runs beside the UNet's prefault; anything else waits for it first, so
  // that no page is dropped or needed while the other thread maps it.
  if (prefetch.valid() && !is_text_encoder(component)) finish_prefetch();
  if (page_out_idle && component != active) {
    for (auto& [name, weights] : mapped)
      if (name != component && !(prefetch.valid() && name == prefetching)) weights.page_out();
    release_free_memory();
  }
  if (auto it = mapped.find(component); it != mapped.end()) it->second.page_in();
  active = component;
  // The UNet runs after the text encoders: map its pages in now, on a thread of its own.
  // The encoders run on the CPUs while the kernel maps the pages; both memory-bound, they
  // overlap well (start to first step of SD 1.5: README "Performance").
  if (page_out_idle && is_text_encoder(component) && !prefetch.valid()) {
    auto unet_weights = mapped.find("unet");
    if (unet_weights != mapped.end() && !unet_weights->second.resident()) {
      prefetching = "unet";
      prefetch = std::async(std::launch::async, [weights = &unet_weights->second] { weights->page_in(); });
    }
  }
}

void StableDiffusionModel::finish_prefetch() {
  if (!prefetch.valid()) return;
  prefetch.get();
  prefetching.clear();
}

int64_t parameter_count(torch::nn::Module& module) {
  int64_t n = 0;
  for (const auto& p : module.parameters()) n += p.numel();
  return n;
}

}  // namespace fairdiff
