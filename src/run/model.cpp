// The embedding API: Model::load, set_fairness, generate. A batch is the reference's
// pipeline call: encode prompts, per-image noise, denoise with CFG and each image's edit
// concepts in one UNet call per step, decode, and the record of everything that made it.
#include <c10/core/InferenceMode.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <mutex>
#include <sstream>
#include <tuple>
#include <thread>

#include "config_json.h"
#include "data_paths.h"
#include "fairdiff/error.h"
#include "fs_util.h"
#include "hash_cache.h"
#include "layers.h"
#include "model_impl.h"
#include "run_plan.h"
#include "runtime.h"
#include "safetensors.h"
#include "scheduler_table.h"
#include "single_file.h"

namespace fs = std::filesystem;

namespace fairdiff {
namespace {

constexpr const char* kVersion = "fairdiff 0.1.0";

bool is_single_file(const std::string& model) { return !is_directory(model); }

// bf16 on a CPU without native bfloat16, against fp32: its matmuls and convolutions measured
// 22-52x slower (fairdiff-bench --no-onednn; README, Performance).
constexpr const char* kNonNativeBf16Slowdown = "20-50x";

// 1. Where and in what precision the networks run (dtype "auto" resolved in `o`).
LoadOptions resolve_runtime(ModelOptions& o) {
  LoadOptions lo;
  lo.prepack_convolutions = o.prepack_weights;
  lo.weights_cache = run_weights_cache(o.weights_cache, o.fp16_weights);
  if (o.device == "auto") {
    lo.device = at::hasCUDA() ? at::Device(at::kCUDA) : at::Device(at::kCPU);
  } else {
    try {
      lo.device = at::Device(o.device);
    } catch (const std::exception&) {
      throw_bad_input("--device", "\"" + o.device + "\" is not a device", "use cpu, cuda or cuda:N");
    }
    if (lo.device.is_cuda() && !at::hasCUDA())
      throw_bad_input("--device", "CUDA is not available in this build or on this machine", "use --device cpu");
  }
  check_fp16_weights(o);
  if (o.fp16_weights && !lo.device.is_cpu())  // "auto" found a GPU
    throw_bad_input("--fp16-weights", "float16 weight storage is for the CPU", "use --device cpu, or on CUDA --dtype fp16");
  if (o.fp16_weights) o.dtype = "fp32";  // the arithmetic stays float32 ("auto" resolves to it)
  if (o.dtype == "auto") o.dtype = lo.device.is_cpu() && cpu_has_native_bf16() ? "bf16" : "fp32";
  lo.dtype = o.dtype == "fp16" ? at::kHalf : o.dtype == "bf16" ? at::kBFloat16 : at::kFloat;
  if (lo.device.is_cpu() && lo.dtype == at::kHalf)
    throw_bad_input("--dtype", "fp16 needs a CUDA device", "use --dtype bf16 or fp32 on the CPU");
  if (lo.device.is_cpu() && lo.dtype == at::kBFloat16 && !cpu_has_native_bf16())
    spdlog::warn("--dtype bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX), so LibTorch runs it in its "
                 "reference kernels: a UNet step takes about {} the time of fp32 here (measured); use --dtype fp32",
                 kNonNativeBf16Slowdown);
  // Reads FAIRDIFF_CONV now, so that a bad value stops the run before any work, whatever the
  // device and dtype.
  const char* convolutions = leaf::convolution_path();
  spdlog::debug("float32 convolutions: {}", convolutions);
  if (lo.prepack_convolutions && lo.device.is_cpu() && !prepacks_convolutions(lo))
    spdlog::warn("--prepack-weights: LibTorch's oneDNN cannot reorder {} weights on this CPU (bf16 needs AVX-512 "
                 "BW, VL and DQ), so the convolutions keep their plain weights here",
                 o.dtype);
  return lo;
}

// 2. The networks, from a diffusers folder or a single-file checkpoint.
StableDiffusionModel load_networks(const ModelOptions& o, const LoadOptions& lo) {
  StableDiffusionModel model;
  if (is_single_file(o.model)) {
    if (o.tokenizer_dir.empty())
      throw_bad_input(o.model, "a single-file checkpoint carries no tokenizer",
                      "pass --tokenizer DIR (the tokenizer/ folder of a diffusers release of the same family)");
    SingleFileOptions sf;
    sf.prediction_type = o.prediction_type;
    model = load_single_file(o.model, o.tokenizer_dir, lo, sf);
  } else {
    model = load_model_folder(o.model, lo);
  }
  if (o.fp16_weights) store_weights_fp16(model);
  // As diffusers does: a half-precision SD VAE overflows, so it decodes in float32.
  if (lo.dtype == at::kHalf && model.vae->config().force_upcast) model.vae->to(at::kFloat);
  if (o.vae_tile != 0) {
    const int64_t f = model.vae->config().scale_factor();
    if (o.vae_tile > 0 && o.vae_tile % f != 0)
      throw_bad_input("--vae-tiling", "a tile of " + std::to_string(o.vae_tile) +
                                          " pixels is not a multiple of the VAE's scale factor " + std::to_string(f));
    model.vae->enable_tiling(o.vae_tile < 0 ? -1 : o.vae_tile / f);
  }
  return model;
}

std::string weights_file(const std::string& model) {
  return is_single_file(model) ? model : model_weights(model, "unet");
}

std::string model_name(const std::string& model) {
  fs::path p = fs::path(model).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();
  return is_single_file(model) ? p.stem().string() : p.filename().string();
}

// A1111's sampler and schedule names for what will run.
std::pair<std::string, std::string> a1111_sampler(const Scheduler& s, bool karras) {
  return {a1111_sampler_name(s.name()), karras ? "Karras" : "Automatic"};
}

FairEdits fair_edits(const FairnessSpec& spec) {
  FairEdits e;
  for (size_t a = 0; a < spec.targets.size(); ++a) {
    const Attribute& attr = spec.targets[a].attribute;
    e.rows.emplace_back(attr.groups.size());
    for (size_t g = 0; g < attr.groups.size(); ++g)
      for (const std::string& prompt : attr.groups[g].edit_prompts) {
        e.rows[a][g].push_back(static_cast<int64_t>(e.prompts.size()));
        e.prompts.push_back(prompt);
        e.owner.emplace_back(a, g);
      }
  }
  return e;
}

// Index of each assigned group in its attribute; BadInput when an image names another
// attribute or an unknown group.
std::vector<int64_t> group_indices(const FairnessSpec& spec, const GroupAssignment& groups) {
  if (groups.size() != spec.targets.size())
    throw_bad_input("fairness", "an image assigns " + std::to_string(groups.size()) + " attributes, the instruction has " +
                                    std::to_string(spec.targets.size()),
                    "assign one group per attribute, in the instruction's order (Model::assign_groups)");
  std::vector<int64_t> out;
  for (size_t a = 0; a < spec.targets.size(); ++a) {
    const Attribute& attr = spec.targets[a].attribute;
    if (groups[a].first != attr.name)
      throw_bad_input("fairness", "attribute " + std::to_string(a) + " is \"" + attr.name + "\", the image names \"" +
                                      groups[a].first + "\"");
    int64_t target = -1;
    for (size_t g = 0; g < attr.groups.size(); ++g)
      if (attr.groups[g].name == groups[a].second) target = static_cast<int64_t>(g);
    if (target < 0) throw_bad_input("fairness", "\"" + groups[a].second + "\" is not a group of " + attr.name);
    out.push_back(target);
  }
  return out;
}

// One image's concepts: per attribute, the assigned group's prompts forward, every other
// group's reversed (exact), or the assigned group's only (fast).
std::vector<EditConcept> fair_concepts(const FairnessSpec& spec, const FairEdits& edits, const ImageRequest& request) {
  const GroupAssignment& groups = request.groups;
  std::vector<EditConcept> concepts;
  if (groups.empty()) return concepts;
  const std::vector<int64_t> targets = group_indices(spec, groups);
  const bool fast = spec.mode == "fast";
  for (size_t a = 0; a < spec.targets.size(); ++a) {
    const Attribute& attr = spec.targets[a].attribute;
    EditConcept base;
    base.guidance_scale = attr.defaults.edit_guidance_scale * request.edit_scale;
    base.threshold = std::max(0.0, 1.0 - (1.0 - attr.defaults.edit_threshold) * request.edit_reach);
    base.warmup_steps = static_cast<int64_t>(std::floor(static_cast<double>(attr.defaults.edit_warmup_steps) * request.edit_warmup));
    // steer_toward gives concept k for group k; each group's prompts share its direction.
    const std::vector<EditConcept> per_group =
        steer_toward(targets[a], static_cast<int64_t>(attr.groups.size()), base);
    for (size_t g = 0; g < attr.groups.size(); ++g)
      for (int64_t row : edits.rows[a][g]) {
        if (fast && static_cast<int64_t>(g) != targets[a]) continue;
        EditConcept c = per_group[g];
        c.embedding = row;
        concepts.push_back(c);
      }
  }
  return concepts;
}

nlohmann::json fair_record(const FairnessSpec& spec, const FairEdits& edits, const std::string& assignment,
                           const GroupAssignment& assigned, const std::vector<EditConcept>& concepts) {
  nlohmann::json groups = nlohmann::json::object(), list = nlohmann::json::array();
  for (const auto& [attribute, group] : assigned) groups[attribute] = group;
  for (const EditConcept& c : concepts) {
    const auto [a, g] = edits.owner[static_cast<size_t>(c.embedding)];
    list.push_back({{"attribute", spec.targets[a].attribute.name},
                    {"group", spec.targets[a].attribute.groups[g].name},
                    {"prompt", edits.prompts[static_cast<size_t>(c.embedding)]},
                    {"reverse", c.reverse},
                    {"guidance_scale", c.guidance_scale},
                    {"threshold", c.threshold},
                    {"warmup_steps", c.warmup_steps}});
  }
  const EditDefaults& d = spec.targets.front().attribute.defaults;
  // targets: the instruction itself, so an audit can compare what came out with what was asked
  // (and resume can tell another run's folder: run_plan.cpp compares the same record).
  nlohmann::json record = {{"assignment", assignment}, {"mode", spec.mode},           {"groups", groups},
                           {"targets", targets_record(spec)}, {"edits", list},
                           {"momentum_scale", d.edit_momentum_scale}, {"momentum_beta", d.edit_mom_beta}};
  if (spec.joint) record["joint"] = joint_record(spec);
  return record;
}

// ---------------------------------------------------------------------------------------
// What fits: the memory a model and a run need, estimated before the work, against what
// this machine (or its cgroup) has available. Estimates are lower bounds on purpose (every
// network has more parameters and keeps more tensors alive than counted here): a refused
// run could never have finished; an accepted one may still be tight.
// ---------------------------------------------------------------------------------------

// Bytes this process can still use: MemAvailable + SwapFree, capped by the cgroup's limit
// (v2 memory.max, v1 memory.limit_in_bytes) less its usage; infinity when unknown.
double available_memory() {
  double available = std::numeric_limits<double>::infinity();
  std::ifstream meminfo("/proc/meminfo");
  double mem = -1, swap = 0;
  for (std::string key; meminfo >> key;) {
    double kib = 0;
    meminfo >> kib;
    if (key == "MemAvailable:") mem = kib * 1024;
    if (key == "SwapFree:") swap = kib * 1024;
    meminfo.ignore(std::numeric_limits<std::streamsize>::max(), '\n');
  }
  if (mem >= 0) available = mem + swap;
  const auto read_number = [](const char* path) {
    std::ifstream in(path);
    double v = -1;
    std::string text;
    if (in >> text && text != "max") v = std::strtod(text.c_str(), nullptr);
    return v;
  };
  for (auto [limit_file, usage_file] : {std::pair{"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"},
                                        {"/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                         "/sys/fs/cgroup/memory/memory.usage_in_bytes"}}) {
    const double limit = read_number(limit_file), usage = read_number(usage_file);
    if (limit > 0 && limit < 1e18 && usage >= 0) available = std::min(available, std::max(0.0, limit - usage));
  }
  return available;
}

std::string bytes_text(double bytes) {
  const char* units[] = {"bytes", "KB", "MB", "GB", "TB", "PB", "EB"};
  size_t u = 0;
  for (; bytes >= 1000 && u + 1 < std::size(units); ++u) bytes /= 1000;
  char text[48];
  if (bytes >= 1e5) std::snprintf(text, sizeof text, "%.2g %s", bytes, units[u]);  // past EB
  else std::snprintf(text, sizeof text, "%.3g %s", bytes, units[u]);
  return text;
}

double dtype_bytes(const std::string& dtype) { return dtype == "fp32" ? 4 : 2; }

// Parameters of a network described by its config, counting only the largest terms
// (embeddings, attention and MLP matrices, 3x3 convolutions); -1 when the config does not
// parse (the loader names what is wrong).
double config_parameters(const std::string& component, const nlohmann::json& j, const std::string& where) {
  try {
    if (component == "text_encoder" || component == "text_encoder_2") {
      const CLIPTextConfig c = CLIPTextConfig::from_json(j, where);
      const double h = static_cast<double>(c.hidden_size);
      return static_cast<double>(c.vocab_size + c.max_position_embeddings) * h +
             static_cast<double>(c.num_hidden_layers) * (4 * h * h + 2 * h * static_cast<double>(c.intermediate_size));
    }
    if (component == "unet") {
      const UNet2DConditionConfig c = UNet2DConditionConfig::from_json(j, where);
      double n = 0;
      for (size_t i = 0; i < c.block_out_channels.size(); ++i) {
        const double ch = static_cast<double>(c.block_out_channels[i]);
        const double layers = static_cast<double>(i < c.layers_per_block.size() ? c.layers_per_block[i] : 1);
        n += 18 * ch * ch * (3 * layers + 1);  // down and up resnets: two 3x3 convolutions each
      }
      return n;
    }
    if (component == "vae") {
      const AutoencoderKLConfig c = AutoencoderKLConfig::from_json(j, where);
      double n = 0;
      for (int64_t ch : c.block_out_channels)
        n += 18 * static_cast<double>(ch) * static_cast<double>(ch) * static_cast<double>(2 * c.layers_per_block + 1);
      return n;
    }
  } catch (const Error&) {
  }
  return -1;
}

// Values in a safetensors file, from its header (nothing is read); -1 when it does not open.
double file_parameters(const std::string& path) {
  try {
    const SafeTensors st(path);
    double n = 0;
    for (const TensorView& t : st.tensors()) n += static_cast<double>(t.numel());
    return n;
  } catch (const Error&) {
    return -1;
  }
}

// Before anything is built: the weights that the configs describe and the files hold, in
// the run's dtype, against the available memory. BadInput naming the config or the file.
void check_weights_fit(const ModelOptions& o) {
  const double available = available_memory();
  if (!std::isfinite(available)) return;
  const double bytes_per = o.fp16_weights ? 2 : dtype_bytes(o.dtype);  // nearly every weight is a linear or conv one
  struct Part {
    std::string file;
    double parameters;
    bool from_config;
  };
  std::vector<Part> parts;
  if (is_single_file(o.model)) {
    parts.push_back({o.model, file_parameters(o.model), false});
  } else {
    for (const std::string component : {"text_encoder", "text_encoder_2", "unet", "vae"}) {
      const std::string dir = o.model + "/" + component, config = dir + "/config.json";
      if (!is_regular_file(config)) continue;
      nlohmann::json j;
      try {
        j = read_json_file(config);
      } catch (const Error&) {
        continue;  // the loader says what is wrong with it
      }
      const double from_config = config_parameters(component, j, config);
      double from_file = -1;
      std::string file;
      try {
        file = model_weights(o.model, component);
        from_file = file_parameters(file);
      } catch (const Error&) {
      }
      if (from_config >= from_file) parts.push_back({config, from_config, true});
      else parts.push_back({file, from_file, false});
    }
  }
  double total = 0;
  const Part* largest = nullptr;
  for (const Part& p : parts) {
    if (p.parameters <= 0) continue;
    total += p.parameters * bytes_per;
    if (!largest || p.parameters > largest->parameters) largest = &p;
  }
  if (!largest || total <= available) return;
  char count[32];
  std::snprintf(count, sizeof count, "%.3g", largest->parameters);
  const std::string size = bytes_text(largest->parameters * bytes_per) + " in " + o.dtype;
  if (largest->from_config)
    throw_bad_input(largest->file, "its sizes describe a network of at least " + std::string(count) + " parameters (" +
                                       size + "), more than the " + bytes_text(available) +
                                       " of memory available here (MemAvailable + swap, or the cgroup's limit)",
                    "check block_out_channels, hidden_size, vocab_size and the other sizes against the weights file");
  throw_bad_input(largest->file, "holds " + std::string(count) + " parameters (" + size + "); the model needs " +
                                     bytes_text(total) + ", more than the " + bytes_text(available) +
                                     " of memory available here (MemAvailable + swap, or the cgroup's limit)",
                  "use a machine with more memory, or --dtype bf16 to halve the weights");
}

// Every id the tokenizer can emit must have a row in the text encoder's embedding, and every
// position of its window one in the position embedding: LibTorch would stop with "index out
// of range in self" at the first prompt.
void check_tokenizer_fits(const Tokenizer& tokenizer, const CLIPTextConfig& c, const std::string& where) {
  const int64_t max_id = tokenizer.max_id();
  if (max_id >= c.vocab_size)
    throw_bad_input(where, "token id " + std::to_string(max_id) + " is beyond the text encoder's vocabulary of " +
                               std::to_string(c.vocab_size) + " embeddings",
                    "vocab.json, added_tokens.json or tokenizer_config.json gives a token an id the model does not "
                    "have: use the tokenizer that came with the model");
  if (tokenizer.model_max_length() > c.max_position_embeddings)
    throw_bad_input(where, "model_max_length " + std::to_string(tokenizer.model_max_length()) +
                               " is more than the text encoder's " + std::to_string(c.max_position_embeddings) +
                               " positions (max_position_embeddings)",
                    "use the tokenizer that came with the model");
}

void check_tokenizer_fits(const StableDiffusionModel& sd, const ModelOptions& o) {
  if (!sd.text_encoder || !sd.tokenizer) return;
  check_tokenizer_fits(*sd.tokenizer, sd.text_encoder->config(),
                       is_single_file(o.model) ? o.tokenizer_dir : o.model + "/tokenizer");
  if (sd.text_encoder_2 && sd.tokenizer_2)
    check_tokenizer_fits(*sd.tokenizer_2, sd.text_encoder_2->config(), o.model + "/tokenizer_2");
}

// Non-finite latents or pixels: a model file holding NaN or infinite weights (BadInput,
// exit 2: the file is broken and rerunning cannot help; the component's weights file is
// named), else an overflow of the run's precision (Runtime, exit 1: fp16 is the usual
// cause). Scanning the weights costs one pass over them, and only once something failed.
[[noreturn]] void non_finite(const StableDiffusionModel& sd, const ModelOptions& o, const std::string& what) {
  const std::vector<std::pair<std::string, const torch::nn::Module*>> networks = {
      {"text_encoder", sd.text_encoder.get()}, {"text_encoder_2", sd.text_encoder_2 ? sd.text_encoder_2.get() : nullptr},
      {"unet", sd.unet.get()}, {"vae", sd.vae.get()}};
  for (const auto& [component, module] : networks) {
    if (!module) continue;
    for (const at::Tensor& p : module->parameters()) {
      if (at::isfinite(p).all().item<bool>()) continue;
      std::string file = o.model;
      if (!is_single_file(o.model)) {
        try {
          file = model_weights(o.model, component);
        } catch (const Error&) {
          file = o.model + "/" + component;
        }
      }
      throw_bad_input(file, "the " + component + "'s weights hold NaN or infinite values (" + what +
                                " are not finite)", "the file is corrupt: download or convert the model again");
    }
  }
  throw Error(ErrorKind::Runtime, o.model, what + " are not finite (NaN or infinity) in " + o.dtype,
              o.dtype == "fp32" ? "the model's numbers overflow; check the model" : "run with --dtype fp32");
}

// Clip skip: diffusers' hidden_states[-(k + 1)] needs k below the encoder's layer count.
void check_clip_skip(const StableDiffusionModel& sd, int64_t clip_skip, const std::string& where) {
  if (clip_skip <= 0 || !sd.text_encoder) return;
  // SDXL's hidden_states[-(k + 2)] has the same bound, on the smaller of its two encoders.
  int64_t layers = sd.text_encoder->config().num_hidden_layers;
  if (sd.text_encoder_2) layers = std::min(layers, sd.text_encoder_2->config().num_hidden_layers);
  if (clip_skip >= layers)
    throw_bad_input(where, std::to_string(clip_skip) + " skips all of the text encoder's " + std::to_string(layers) +
                               " layers",
                    "use a value from 0 to " + std::to_string(layers - 1) + "; A1111's Clip skip 2 is 1 here");
}

void check_settings(const SamplingSettings& s) {
  if (s.steps < 1) throw_bad_input("steps", std::to_string(s.steps) + " is less than 1", "use e.g. 50 steps");
  for (auto [name, v] : {std::pair{"width", s.width}, {"height", s.height}})
    if (v < 8 || v % 8 != 0)
      throw_bad_input(name, std::to_string(v) + " is not a positive multiple of 8", "use a size such as 512 or 768");
  if (s.clip_skip < 0) throw_bad_input("clip_skip", "must be non-negative");
}

// "WxH" -> (height, width) in pixels, each in [1, 16384].
std::pair<int64_t, int64_t> parse_size(const std::string& text, const std::string& flag) {
  const size_t x = text.find('x');
  int64_t w = 0, h = 0;
  try {
    size_t used_w = 0, used_h = 0;
    if (x == std::string::npos) throw std::invalid_argument("no x");
    w = std::stoll(text.substr(0, x), &used_w);
    h = std::stoll(text.substr(x + 1), &used_h);
    if (used_w != x || used_h != text.size() - x - 1) throw std::invalid_argument("trailing");
  } catch (const std::exception&) {
    throw_bad_input(flag, "\"" + text + "\" is not WIDTHxHEIGHT", "give it in pixels, e.g. 1024x1024");
  }
  if (w < 1 || h < 1 || w > 16384 || h > 16384)
    throw_bad_input(flag, "\"" + text + "\" is outside 1..16384 pixels", "give it in pixels, e.g. 1024x1024");
  return {h, w};
}

// SDXL's size conditioning of an image of s.width x s.height: the flags, else the
// reference's defaults. BadInput naming the flag when the model takes none.
SizeConditioning size_conditioning(const SamplingSettings& s, const StableDiffusionPipeline& pipe,
                                   const std::string& model) {
  for (auto [flag, value] : {std::pair{"--original-size", &s.original_size}, {"--crop-top-left", &s.crop_top_left},
                             {"--target-size", &s.target_size}})
    if (!value->empty() && !pipe.takes_size_conditioning())
      throw_bad_input(flag, "size conditioning is for SDXL; " + model + " has no UNet addition_embed_type text_time",
                      "drop --original-size, --crop-top-left and --target-size for this model");
  SizeConditioning c = StableDiffusionPipeline::default_size_conditioning(s.height, s.width);
  if (!s.original_size.empty()) std::tie(c.original_height, c.original_width) = parse_size(s.original_size, "--original-size");
  if (!s.target_size.empty()) std::tie(c.target_height, c.target_width) = parse_size(s.target_size, "--target-size");
  if (!s.crop_top_left.empty()) {
    const std::string& t = s.crop_top_left;
    const size_t comma = t.find(',');
    try {
      size_t used_top = 0, used_left = 0;
      if (comma == std::string::npos) throw std::invalid_argument("no comma");
      c.crop_top = std::stoll(t.substr(0, comma), &used_top);
      c.crop_left = std::stoll(t.substr(comma + 1), &used_left);
      if (used_top != comma || used_left != t.size() - comma - 1 || c.crop_top < 0 || c.crop_left < 0 ||
          c.crop_top > 16384 || c.crop_left > 16384)
        throw std::invalid_argument("range");
    } catch (const std::exception&) {
      throw_bad_input("--crop-top-left", "\"" + t + "\" is not TOP,LEFT", "give two pixel offsets in 0..16384, e.g. 0,0");
    }
  }
  return c;
}

}  // namespace

std::string default_model() {
  if (const char* env = std::getenv("FAIRDIFF_MODEL"); env && *env) return env;
  return find_data("models/toy");
}

void configure_process(int threads) {
  configure_threads(threads);  // LibTorch alone may use one thread on 2-vCPU machines (see runtime.h)
  configure_allocator();       // keep freed activations for reuse: page faults cost more than the math
}

// ---------------------------------------------------------------------------------------
// Model::Impl
// ---------------------------------------------------------------------------------------

void Model::Impl::check_run(const std::vector<PlannedImage>& images, const GenerateOptions& o) const {
  if (images.empty()) return;
  check_clip_skip(sd, o.clip_skip, "--clip-skip");
  size_conditioning(o, *pipe, options.model);  // refused flags and malformed sizes, before anything is written
  if (!pipe->device().is_cpu()) return;  // CUDA memory is the device's: not estimated here
  // Activations of the largest batch: the UNet's first level holds a few tensors of
  // rows x C0 x h x w (rows: CFG's two per image, one more per edit prompt), the VAE's
  // last level a few of B x C x H x W per decode (one tile's with --vae-tiling).
  const UNet2DConditionConfig& u = sd.unet->config();
  const AutoencoderKLConfig& v = sd.vae->config();
  const double f = static_cast<double>(pipe->vae_scale_factor());
  const double batch = static_cast<double>(std::min<int64_t>(o.batch_size, static_cast<int64_t>(images.size())));
  const double rows = batch * (2 + static_cast<double>(edits.prompts.size()));
  double worst = 0;
  const PlannedImage* largest = &images.front();
  for (const PlannedImage& img : images) {
    const double pixels = static_cast<double>(img.width) * static_cast<double>(img.height);
    const double decode_pixels = sd.vae->tiling() ? std::min(pixels, 1024.0 * 1024.0) : pixels;
    const double bytes = 4 * (4 * rows * static_cast<double>(u.block_out_channels.front()) * pixels / (f * f) +
                              3 * batch * static_cast<double>(v.block_out_channels.front()) * decode_pixels);
    if (bytes > worst) worst = bytes, largest = &img;
  }
  const double available = available_memory();
  if (worst > available)
    throw_bad_input("-W/-H, --batch-size", std::to_string(largest->width) + "x" + std::to_string(largest->height) +
                                               " images in batches of " + std::to_string(static_cast<int64_t>(batch)) +
                                               " need at least " + bytes_text(worst) + " for activations, more than the " +
                                               bytes_text(available) + " of memory available here",
                    "use a smaller size or --batch-size, --vae-tiling, or a machine with more memory");
}

void Model::Impl::start_model_hash() {
  // A detached thread, not std::async: a run that stops early (bad input, an error) must not
  // wait for a hash nobody needs; the thread holds nothing of the model.
  // At the lowest priority (nice 19, this thread only): on a cache miss the hash of a 4 GB
  // file takes seconds of a core, and at normal priority it took one of the 2 cores from the
  // text encoder and the first steps (start to first step 5.6 s instead of 1-1.8 s on the
  // build VM). Now it runs on what the work leaves; the first image's metadata waits for it.
  std::packaged_task<std::string()> job([file = weights_file(options.model)] {
    setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 19);
    return cached_sha256_file(file).substr(0, 10);
  });
  hash_job_ = job.get_future();
  std::thread(std::move(job)).detach();
}

const std::string& Model::Impl::model_hash() {
  if (hash_.empty()) {
    if (!hash_job_.valid()) start_model_hash();
    hash_ = hash_job_.get();
  }
  return hash_;
}

GeneratedBatch Model::Impl::generate(const std::vector<ImageRequest>& batch, const SamplingSettings& in,
                                     const ProgressCallback& on_step) {
  c10::InferenceMode inference;
  SamplingSettings s = in;
  if (s.width == 0) s.width = native_width;
  if (s.height == 0) s.height = native_height;
  check_settings(s);
  check_clip_skip(sd, s.clip_skip, "clip_skip");
  const SizeConditioning size = size_conditioning(s, *pipe, options.model);
  const int64_t B = static_cast<int64_t>(batch.size());
  GeneratedBatch out;
  if (B == 0) return out;

  // 1. The instruction: each image's concepts (checked before any work).
  const bool cfg = s.cfg_scale > 1.0;
  std::vector<std::vector<EditConcept>> concepts;
  bool steered = false;
  for (const ImageRequest& r : batch) {
    if (!r.groups.empty() && !fairness.enabled())
      throw_bad_input("fairness", "an image is assigned groups but no fairness instruction is set",
                      "call set_fairness first");
    for (double f : {r.edit_scale, r.edit_warmup, r.edit_reach})
      if (!(f >= 0 && std::isfinite(f)))
        throw_bad_input("ImageRequest", "an edit factor of " + python_float(f) + " is not a finite factor >= 0",
                        "use e.g. 1 (unchanged) or 2");
    concepts.push_back(fair_concepts(fairness, edits, r));
    steered = steered || !r.groups.empty();
  }
  if (steered && !cfg)
    throw_bad_input("cfg_scale", python_float(s.cfg_scale) + ": semantic guidance needs it above 1",
                    "use e.g. a guidance scale of 7");

  // 2. The scheduler, fresh for the batch.
  const std::string override_name = scheduler_override(s.sampling_method, s.scheduler);
  const std::string where =
      is_single_file(options.model) ? options.model : options.model + "/scheduler/scheduler_config.json";
  auto scheduler = make_scheduler(sd.scheduler_config, override_name, where);
  const bool karras = override_name.find("karras") != std::string::npos ||
                      (override_name.empty() && sd.scheduler_config.value("use_karras_sigmas", false));
  const auto [sampler_name, schedule_type] = a1111_sampler(*scheduler, karras);
  scheduler->set_timesteps(s.steps);

  // 3. Prompts, noise and the edit rows.
  std::vector<std::string> prompts, negatives;
  std::vector<int64_t> seeds;
  for (const ImageRequest& r : batch) {
    prompts.push_back(r.prompt);
    negatives.push_back(r.negative_prompt);
    seeds.push_back(r.seed);
  }
  pipe->conditioner().empty_negative_is_none = !s.encode_empty_negative;
  PromptEmbeddings emb = pipe->encode_prompts(prompts, negatives, s.clip_skip, cfg);
  if (pipe->takes_size_conditioning()) pipe->condition_on_size(emb, size);
  spdlog::debug("prompts encoded at {:.2f} s of the process", process_seconds());
  for (int64_t i = 0; i < B; ++i)
    if (emb.truncated[static_cast<size_t>(i)] && warned_truncated.insert(prompts[static_cast<size_t>(i)]).second)
      spdlog::warn("prompt truncated at {} tokens: \"{}\"", sd.tokenizer->model_max_length(), prompts[static_cast<size_t>(i)]);
  std::vector<at::Generator> generators;
  const at::Tensor noise = pipe->initial_noise(seeds, s.height, s.width, &generators);
  std::unique_ptr<SemanticGuidance> sega;
  if (steered) {
    // Every group's edit prompts, encoded once per instruction.
    if (!edit_table.defined()) edit_table = encode_edit_prompts(sd, edits.prompts).to(pipe->device(), pipe->dtype());
    SemanticGuidanceSettings settings;
    settings.momentum_scale = fairness.targets.front().attribute.defaults.edit_momentum_scale;
    settings.momentum_beta = fairness.targets.front().attribute.defaults.edit_mom_beta;
    settings.images = concepts;
    sega = std::make_unique<SemanticGuidance>(edit_table, std::move(settings));
  }

  // 4. Denoise, 5. decode.
  static std::once_flag first_step;  // start-up, as scripts/bench measures it (SPDLOG_LEVEL=debug)
  sd.use("unet");  // as denoise does first: the step starts with the UNet's pages mapped in
  std::call_once(first_step, [] { spdlog::debug("first denoising step at {:.2f} s of the process", process_seconds()); });
  auto last = std::chrono::steady_clock::now();
  const at::Tensor latents = pipe->denoise(
      *scheduler, noise, emb, s.cfg_scale, &generators,
      [&](size_t step, size_t steps, const at::Tensor& x) {
        // One reduction on the batch after the first step: a broken model stops here,
        // before the other steps and before any image is written.
        if (step == 0 && !at::isfinite(x).all().item<bool>())
          non_finite(sd, options, "the latents after the first denoising step");
        const auto now = std::chrono::steady_clock::now();
        if (on_step) on_step({step, steps, B, std::chrono::duration<double>(now - last).count()});
        last = now;
      },
      sega.get());
  const at::Tensor decoded = pipe->decode(latents);
  if (!at::isfinite(decoded).all().item<bool>()) non_finite(sd, options, "the decoded images");
  out.pixels = StableDiffusionPipeline::to_uint8(StableDiffusionPipeline::to_image(decoded));

  // 6. What made each image: A1111's parameters and the full record (nothing that varies
  // between runs, so an image's bytes depend only on the image).
  const std::string& hash = model_hash();
  for (int64_t i = 0; i < B; ++i) {
    const ImageRequest& r = batch[static_cast<size_t>(i)];
    Infotext info;
    info.prompt = r.prompt;
    info.negative_prompt = r.negative_prompt;
    info.params = {{"Steps", std::to_string(s.steps)},
                   {"Sampler", sampler_name},
                   {"Schedule type", schedule_type},
                   {"CFG scale", python_float(s.cfg_scale)},
                   {"Seed", std::to_string(r.seed)},
                   {"Size", std::to_string(s.width) + "x" + std::to_string(s.height)},
                   {"Model hash", hash},
                   {"Model", name}};
    // diffusers' clip_skip k skips k layers; A1111 counts the last layer as 1.
    if (s.clip_skip > 0) info.params.emplace_back("Clip skip", std::to_string(s.clip_skip + 1));
    if (!r.groups.empty()) info.params.emplace_back("Fairness", fairness_label(r.groups));
    info.params.emplace_back("Version", kVersion);
    nlohmann::json record = {{"prompt", r.prompt},         {"negative_prompt", r.negative_prompt},
                             {"seed", r.seed},             {"steps", s.steps},
                             {"scheduler", scheduler->name()}, {"sampler", sampler_name},
                             {"schedule_type", schedule_type}, {"guidance_scale", s.cfg_scale},
                             {"width", s.width},           {"height", s.height},
                             {"clip_skip", s.clip_skip},   {"model", name},
                             {"model_hash", hash},         {"dtype", options.dtype},
                             {"version", kVersion}};
    if (pipe->takes_size_conditioning()) {
      // SDXL: the size conditions, resolved (diffusers' names and (height, width) order).
      record["original_size"] = {size.original_height, size.original_width};
      record["crops_coords_top_left"] = {size.crop_top, size.crop_left};
      record["target_size"] = {size.target_height, size.target_width};
    }
    if (!r.groups.empty())
      record["fairness"] = fair_record(fairness, edits, fairness_options.assignment, r.groups,
                                       concepts[static_cast<size_t>(i)]);
    // Tiles change the pixels near their seams: recorded (in pixels) when used.
    if (options.fp16_weights) record["weight_dtype"] = "fp16";  // changes the pixels: recorded
    if (sd.vae->tiling()) record["vae_tile"] = sd.vae->tile_latent_size() * sd.vae->config().scale_factor();
    out.infotexts.push_back(std::move(info));
    out.records.push_back(std::move(record));
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------

Model::Model(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;
Model::~Model() = default;

Model Model::load(const ModelOptions& options) {
  c10::InferenceMode inference;
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  if (impl->options.model.empty()) impl->options.model = default_model();
  if (impl->options.model.empty())
    throw_bad_input("--model", "no model given and none found (FAIRDIFF_MODEL, share/fairdiff/models/toy)",
                    "pass --model DIR (a diffusers folder) or FILE.safetensors");
  if (!fs::exists(impl->options.model))
    throw_bad_input(impl->options.model, "model not found", "pass a diffusers model folder or a .safetensors checkpoint");
  const LoadOptions lo = resolve_runtime(impl->options);
  check_weights_fit(impl->options);  // before a single parameter is allocated
  impl->start_model_hash();  // beside the loading and the denoising, never in front of them
  spdlog::debug("loading the networks at {:.2f} s of the process", process_seconds());
  impl->sd = load_networks(impl->options, lo);
  spdlog::debug("networks loaded at {:.2f} s of the process", process_seconds());
  check_tokenizer_fits(impl->sd, impl->options);
  impl->pipe = std::make_unique<StableDiffusionPipeline>(impl->sd);
  impl->name = model_name(impl->options.model);
  impl->device_name = lo.device.str();
  const int64_t f = impl->pipe->vae_scale_factor();
  const auto& sample_size = impl->sd.unet->config().sample_size;  // latent pixels: [size] or [height, width]
  impl->native_height = (sample_size.empty() ? 64 : sample_size.front()) * f;
  impl->native_width = (sample_size.empty() ? 64 : sample_size.back()) * f;
  return Model(std::move(impl));
}

const ModelOptions& Model::options() const { return impl_->options; }
std::string Model::name() const { return impl_->name; }
std::string Model::device() const { return impl_->device_name; }
int64_t Model::native_width() const { return impl_->native_width; }
int64_t Model::native_height() const { return impl_->native_height; }
Model::Impl& Model::impl() { return *impl_; }

void Model::set_fairness(const FairnessOptions& options) {
  FairnessSpec spec = parse_fairness(options);
  if (spec.enabled() && !impl_->sd.text_encoder)
    throw_bad_input("fairness", "needs the model's text encoder to embed the edit prompts; " + impl_->options.model +
                                    " has none", "use a model with a text encoder");
  impl_->fairness_options = options;
  impl_->fairness = std::move(spec);
  impl_->edits = fair_edits(impl_->fairness);
  impl_->edit_table = Conditioning();
}

bool Model::fairness_enabled() const { return impl_->fairness.enabled(); }

std::vector<GroupAssignment> Model::assign_groups(int64_t n, int64_t seed, int64_t prompt_index) const {
  const FairnessSpec& spec = impl_->fairness;
  const auto indices = fairdiff::assign_groups(spec, impl_->fairness_options.assignment, seed, prompt_index, n);
  std::vector<GroupAssignment> out(static_cast<size_t>(n));
  if (!spec.enabled()) return out;
  for (size_t k = 0; k < out.size(); ++k)
    for (size_t a = 0; a < spec.targets.size(); ++a) {
      const Attribute& attr = spec.targets[a].attribute;
      out[k].emplace_back(attr.name, attr.groups[static_cast<size_t>(indices[k][a])].name);
    }
  return out;
}

std::vector<Image> Model::generate(const std::vector<ImageRequest>& batch, const SamplingSettings& settings,
                                   const ProgressCallback& on_step) {
  const GeneratedBatch g = impl_->generate(batch, settings, on_step);
  std::vector<Image> images;
  for (size_t i = 0; i < g.records.size(); ++i) {
    const at::Tensor rgb = g.pixels[static_cast<int64_t>(i)].contiguous();  // [H, W, 3]
    Image im;
    im.height = rgb.size(0);
    im.width = rgb.size(1);
    im.rgb.assign(rgb.data_ptr<uint8_t>(), rgb.data_ptr<uint8_t>() + rgb.numel());
    im.parameters = format_infotext(g.infotexts[i]);
    im.record = g.records[i].dump();
    images.push_back(std::move(im));
  }
  return images;
}

}  // namespace fairdiff
