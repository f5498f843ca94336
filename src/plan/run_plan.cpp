// The run plan of `fairdiff generate`: validated options, prompts, seeds,
// shards and manifest merging. Torch-free: everything here is decided before
// a model is loaded or a file is written.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>
#include <tuple>

#include "config_json.h"
#include "fairdiff/error.h"
#include "fairdiff/generate.h"
#include "config_json.h"
#include "fairness.h"
#include "file_lock.h"
#include "fs_util.h"
#include "infotext.h"
#include "run_plan.h"
#include "safetensors.h"
#include "string_util.h"
#include "unicode.h"

namespace fs = std::filesystem;

namespace fairdiff {
namespace {

// Hard caps: past them a run cannot finish, or its plan (one entry per image, held in
// memory) cannot be made. Within them, what the machine can hold is checked against its
// memory once the model's sizes are known (Model::Impl::check_run, src/run/model.cpp).
constexpr int64_t kMaxSteps = 10000;
constexpr int64_t kMaxSide = 16384;               // pixels per side
constexpr int64_t kMaxImagesPerPrompt = 100000;
constexpr int64_t kMaxImages = 1000000;           // in the whole run
constexpr double kMaxCfgScale = 100;              // finite, in [0, 100]

struct PromptSpec {
  std::string prompt, negative_prompt;
  int64_t count = 0;  // 0: images_per_prompt
  int64_t seed = -1;  // -1: continue the run's seed sequence
  int64_t steps = 0, width = 0, height = 0;
  double cfg_scale = -1;
};

bool parse_int(const char* text, int64_t* out) {
  if (!text || !*text) return false;
  char* end = nullptr;
  const long long v = std::strtoll(text, &end, 10);
  if (*end != '\0') return false;
  *out = v;
  return true;
}

void check_size(const std::string& where, int64_t width, int64_t height) {
  for (auto [name, v] : {std::pair{"width", width}, {"height", height}}) {
    if (v != 0 && (v < 8 || v % 8 != 0))
      throw_bad_input(where, std::string(name) + " " + std::to_string(v) + " is not a positive multiple of 8",
                      "use a size such as 512 or 768");
    if (v > kMaxSide)
      throw_bad_input(where, std::string(name) + " " + std::to_string(v) + " is more than " +
                                 std::to_string(kMaxSide) + " pixels",
                      "use a size such as 512 or 768, or upscale afterwards");
  }
}

void check_steps(const std::string& where, int64_t steps) {
  if (steps > kMaxSteps)
    throw_bad_input(where, "steps " + std::to_string(steps) + " is more than " + std::to_string(kMaxSteps),
                    "samplers converge in 20 to 150 steps");
}

// NaN passes every comparison: finite first.
void check_cfg_scale(const std::string& where, double cfg) {
  if (!std::isfinite(cfg) || cfg > kMaxCfgScale)
    throw_bad_input(where, "cfg_scale " + python_float(cfg) + " is not a number in [0, 100]",
                    "classifier-free guidance scales are about 1 to 30; 7.5 is usual");
}

void check_count(const std::string& where, int64_t count) {
  if (count > kMaxImagesPerPrompt)
    throw_bad_input(where, std::to_string(count) + " images per prompt is more than " +
                               std::to_string(kMaxImagesPerPrompt),
                    "split the run into several --out folders or use shards");
}

void check_utf8(const std::string& where, const std::string& text) {
  const size_t at = invalid_utf8_offset(text);
  if (at == std::string::npos) return;
  char byte[8];
  std::snprintf(byte, sizeof byte, "0x%02X", static_cast<unsigned char>(text[at]));
  throw_bad_input(where, "is not valid UTF-8: byte " + std::to_string(at) + " (" + byte + ") starts no character",
                  "save the prompt as UTF-8");
}

// A JSONL number field that must be a whole number: absent -> fallback; another type ->
// the wrong-type error; 2.5 or a number past int64 -> named.
int64_t whole_field(const nlohmann::json& j, const std::string& key, int64_t fallback, const std::string& where) {
  const auto it = j.find(key);
  if (it == j.end()) return fallback;
  if (!it->is_number())
    throw_bad_input(where, "a value has the wrong type", "prompt/negative_prompt are strings, the rest numbers");
  const std::optional<int64_t> v = whole_number(*it);
  if (!v) throw_bad_input(where, "\"" + key + "\" is " + it->dump() + ", not a whole number", "e.g. \"" + key + "\": 50");
  return *v;
}

// One JSONL line: {"prompt": ..., "negative_prompt": ..., "count": N, "seed": S, "steps": ..., "cfg_scale": ..., "width": ..., "height": ...}
PromptSpec parse_jsonl_line(const std::string& line, const std::string& where) {
  check_utf8(where, line);
  const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
  if (j.is_discarded() || !j.is_object()) throw_bad_input(where, "is not a valid JSON object", "fix or quote the line");
  static const std::set<std::string> kKeys = {"prompt", "negative_prompt", "count", "seed", "steps",
                                              "cfg_scale", "width", "height"};
  for (auto it = j.begin(); it != j.end(); ++it)
    if (!kKeys.count(it.key()))
      throw_bad_input(where, "unknown key \"" + it.key() + "\"",
                      "known keys: prompt, negative_prompt, count, seed, steps, cfg_scale, width, height");
  PromptSpec p;
  const char* types = "prompt/negative_prompt are strings, cfg_scale a number, the rest integers";
  if (!j.contains("prompt") || !j["prompt"].is_string()) throw_bad_input(where, "has no \"prompt\" string");
  try {
    p.prompt = j["prompt"].get<std::string>();
    p.negative_prompt = j.value("negative_prompt", std::string());
    p.cfg_scale = j.value("cfg_scale", -1.0);
  } catch (const nlohmann::json::exception&) {
    throw_bad_input(where, "a value has the wrong type", types);
  }
  p.count = whole_field(j, "count", 0, where);
  p.seed = whole_field(j, "seed", -1, where);
  p.steps = whole_field(j, "steps", 0, where);
  p.width = whole_field(j, "width", 0, where);
  p.height = whole_field(j, "height", 0, where);
  if (j.contains("count") && p.count < 1) throw_bad_input(where, "count must be at least 1");
  check_count(where, p.count);
  check_steps(where, p.steps);
  if (j.contains("steps") && p.steps < 1) throw_bad_input(where, "steps must be at least 1");
  if (j.contains("seed") && p.seed < 0) throw_bad_input(where, "seed must be non-negative");
  if (j.contains("cfg_scale") && p.cfg_scale < 0) throw_bad_input(where, "cfg_scale must be non-negative");
  if (j.contains("cfg_scale")) check_cfg_scale(where, p.cfg_scale);
  check_size(where, p.width, p.height);
  return p;
}

std::vector<PromptSpec> read_prompts(const GenerateOptions& o) {
  std::vector<PromptSpec> prompts;
  if (o.prompts_file.empty()) {
    PromptSpec p;
    p.prompt = o.prompt;
    p.negative_prompt = o.negative_prompt;
    prompts.push_back(p);
    return prompts;
  }
  std::ifstream in(o.prompts_file);
  if (!in || is_directory(o.prompts_file))
    throw_bad_input(o.prompts_file, "prompts file not found or not readable", "give a text or JSONL file");
  std::string line;
  for (int64_t number = 1; std::getline(in, line); ++number) {
    const std::string text = trim(line);
    if (text.empty()) continue;
    const std::string where = o.prompts_file + ":" + std::to_string(number);
    if (text[0] == '{') {
      PromptSpec p = parse_jsonl_line(text, where);
      if (p.negative_prompt.empty()) p.negative_prompt = o.negative_prompt;
      prompts.push_back(p);
    } else {
      check_utf8(where, line);
      PromptSpec p;
      p.prompt = text;
      p.negative_prompt = o.negative_prompt;
      prompts.push_back(p);
    }
  }
  if (prompts.empty()) throw_bad_input(o.prompts_file, "has no prompts", "one prompt per line, or JSONL objects");
  return prompts;
}

// Shard from the environment of a cluster job, when no flag gave one.
void shard_from_environment(GenerateOptions& o) {
  if (o.shard_index >= 0 || o.num_shards > 0) return;
  int64_t index = 0, count = 0, min = 0;
  if (parse_int(std::getenv("SLURM_ARRAY_TASK_ID"), &index) && parse_int(std::getenv("SLURM_ARRAY_TASK_COUNT"), &count)) {
    if (parse_int(std::getenv("SLURM_ARRAY_TASK_MIN"), &min)) index -= min;  // arrays may start at 1
  } else if (parse_int(std::getenv("JOB_COMPLETION_INDEX"), &index)) {
    // Kubernetes Indexed Jobs give the index only; the count comes from the flag or FAIRDIFF_NUM_SHARDS.
    if (!parse_int(std::getenv("FAIRDIFF_NUM_SHARDS"), &count))
      throw_bad_input("JOB_COMPLETION_INDEX", "is set but the number of shards is unknown",
                      "pass --num-shards N or set FAIRDIFF_NUM_SHARDS to the job's completions");
  } else if (parse_int(std::getenv("RANK"), &index) && parse_int(std::getenv("WORLD_SIZE"), &count)) {
  } else {
    return;
  }
  o.shard_index = index;
  o.num_shards = count;
}

bool writable_dir(const std::string& dir) { return is_directory(dir) && ::access(dir.c_str(), W_OK | X_OK) == 0; }

}  // namespace

void check_fp16_weights(const ModelOptions& o) {
  if (!o.fp16_weights) return;
  if (starts_with(o.device, "cuda"))
    throw_bad_input("--fp16-weights", "float16 weight storage is for the CPU", "on CUDA use --dtype fp16");
  if (o.dtype != "auto" && o.dtype != "fp32")
    throw_bad_input("--fp16-weights", "the weights are converted to float32 per layer, so it runs with --dtype fp32",
                    "drop --dtype " + o.dtype + ", or drop --fp16-weights");
  if (o.prepack_weights)
    throw_bad_input("--fp16-weights", "prepacked weights keep their dtype", "use one of --fp16-weights and --prepack-weights");
}

void validate(GenerateOptions& o) {
  if (o.model.empty()) throw_bad_input("--model", "no model given", "pass --model DIR (a diffusers folder) or FILE.safetensors");
  if (o.prompt.empty() && o.prompts_file.empty())
    throw_bad_input("--prompt", "no prompt given", "pass -p \"a photo of ...\" or --prompts FILE");
  if (!o.prompt.empty() && !o.prompts_file.empty())
    throw_bad_input("--prompt", "give either --prompt or --prompts, not both");
  if (o.images_per_prompt < 1) throw_bad_input("-N/--images", "must be at least 1");
  check_count("-N/--images", o.images_per_prompt);
  check_utf8("--prompt", o.prompt);
  check_utf8("--negative-prompt", o.negative_prompt);
  if (o.batch_size < 1) throw_bad_input("--batch-size", "must be at least 1");
  if (o.vae_tile < -1 || (o.vae_tile > 0 && (o.vae_tile < 32 || o.vae_tile % 8 != 0)))
    throw_bad_input("--vae-tiling", "tile of " + std::to_string(o.vae_tile) + " pixels",
                    "give a multiple of 8 of at least 32 pixels, or --vae-tiling alone for the VAE's own size");
  if (o.steps < 1) throw_bad_input("--steps", std::to_string(o.steps) + " is less than 1", "use e.g. --steps 50");
  check_steps("--steps", o.steps);
  if (o.cfg_scale < 0) throw_bad_input("--cfg-scale", "must be non-negative");
  check_cfg_scale("--cfg-scale", o.cfg_scale);
  if (o.clip_skip < 0) throw_bad_input("--clip-skip", "must be non-negative");
  check_size("--width/--height", o.width, o.height);
  std::string method = o.sampling_method == "plms" ? "pndm" : o.sampling_method;
  const SchedulerRow* row = find_scheduler_method(method);
  if (!method.empty() && !row)
    throw_bad_input("--sampling-method", "unknown sampler \"" + o.sampling_method + "\"",
                    "use one of " + join(sampling_methods()));
  o.sampling_method = method;
  if (!o.scheduler.empty() && o.scheduler != "discrete" && o.scheduler != "karras")
    throw_bad_input("--scheduler", "unknown scheduler \"" + o.scheduler + "\"", "use discrete or karras");
  if (o.scheduler == "karras" && !(row && row->supports_karras))
    throw_bad_input("--scheduler", "karras sigmas are available with --sampling-method euler, dpm++2m or lms",
                    "pick one of those samplers, or drop --scheduler karras");
  if (o.max_retries < 0 || o.max_retries > 100)
    throw_bad_input("--max-retries", std::to_string(o.max_retries) + " is not in [0, 100]",
                    "the number of extra attempts for an image that missed its group, e.g. 2");
  if (!(o.retry_edit_scale > 0 && o.retry_edit_scale <= 100))
    throw_bad_input("--retry-edit-scale", python_float(o.retry_edit_scale) + " is not in (0, 100]",
                    "the factor on every edit scale per retry, e.g. 2");
  if (!(o.retry_warmup >= 0 && o.retry_warmup <= 1))
    throw_bad_input("--retry-warmup", python_float(o.retry_warmup) + " is not in [0, 1]",
                    "the factor on the warm-up per retry, e.g. 0.5 (earlier) or 1 (unchanged)");
  if (!(o.retry_reach >= 1 && o.retry_reach <= 100))
    throw_bad_input("--retry-reach", python_float(o.retry_reach) + " is not in [1, 100]",
                    "the factor on the share of positions an edit keeps per retry, e.g. 2 or 1 (unchanged)");
  if (o.retry_seed_mode != "new" && o.retry_seed_mode != "same")
    throw_bad_input("--retry-seed", "unknown mode \"" + o.retry_seed_mode + "\"", "use new or same");
  if (!(o.verify_margin >= 0 && o.verify_margin <= 1))
    throw_bad_input("--verify-margin", python_float(o.verify_margin) + " is not a probability", "give a value in [0, 1]");
  if (o.verify && o.fairness.empty() && o.fairness_file.empty())
    throw_bad_input("--verify", "there is nothing to verify without a fairness instruction",
                    "add --fairness ATTRIBUTE=RATIOS (or --fairness-file), or drop --verify");
  if (o.verify && o.verify_classifier == "clip" && o.clip_model.empty())
    throw_bad_input("--verify", "the clip verifier needs a CLIP model",
                    "give --clip-model DIR (e.g. models/toy-clip), or --verify-classifier hue for the toy world");
  if (o.fairness_mode != "exact" && o.fairness_mode != "fast")
    throw_bad_input("--fairness-mode", "unknown mode \"" + o.fairness_mode + "\"", "use exact or fast");
  if (o.dtype != "auto" && o.dtype != "fp32" && o.dtype != "fp16" && o.dtype != "bf16")
    throw_bad_input("--dtype", "unknown dtype \"" + o.dtype + "\"", "use auto, fp32, fp16 or bf16");
  const bool cuda = starts_with(o.device, "cuda");
  if (o.device != "auto" && o.device != "cpu" && !cuda)
    throw_bad_input("--device", "unknown device \"" + o.device + "\"", "use auto, cpu, cuda or cuda:N");
  if (o.device == "cpu" && o.dtype == "fp16")
    throw_bad_input("--dtype", "fp16 needs a CUDA device (LibTorch has no half-precision CPU kernels)",
                    "use --dtype bf16 or fp32 on the CPU");
  check_fp16_weights(o);
  shard_from_environment(o);
  if (o.num_shards > 0 || o.shard_index >= 0) {
    if (o.num_shards < 1) throw_bad_input("--num-shards", "must be at least 1 with --shard-index");
    if (o.shard_index < 0 || o.shard_index >= o.num_shards)
      throw_bad_input("--shard-index", "shard index " + std::to_string(o.shard_index) + " is not in [0, " +
                                           std::to_string(o.num_shards) + ")", "shards are numbered from 0");
    if (o.seed < 0)
      throw_bad_input("--seed", "a random seed (-1) cannot be shared by shards",
                      "give every shard the same explicit --seed");
  }
  if (o.seed < -1) throw_bad_input("--seed", "must be -1 (random) or non-negative");
  // The output folder: writable if it exists, else its parent must be (it is created later).
  const fs::path out = fs::path(o.out_dir).lexically_normal();
  if (fs::exists(out)) {
    if (!writable_dir(out.string()))
      throw_bad_input(o.out_dir, "output folder is not a writable folder", "choose another --out");
  } else {
    fs::path parent = out.parent_path();
    while (!parent.empty() && !fs::exists(parent)) parent = parent.parent_path();
    if (!writable_dir(parent.empty() ? "." : parent.string()))
      throw_bad_input(o.out_dir, "output folder cannot be created here (parent not writable)", "choose another --out");
  }
  // Every line checked now, before the model loads; the plan (one entry per image) must fit.
  int64_t images = 0;
  for (const PromptSpec& p : read_prompts(o)) {
    images += p.count > 0 ? p.count : o.images_per_prompt;
    if (images > kMaxImages)
      throw_bad_input(o.prompts_file.empty() ? "-N/--images" : o.prompts_file,
                      "the run plans more than " + std::to_string(kMaxImages) + " images",
                      "split it into several runs (--out folders) or fewer images per prompt");
  }
  const bool fair = parse_fairness(o).enabled();
  if (fair && o.cfg_scale <= 1.0)
    throw_bad_input("--fairness", "semantic guidance needs classifier-free guidance (--cfg-scale above 1)",
                    "use e.g. --cfg-scale 7");
  if (!o.model.empty() && !fs::exists(o.model))
    throw_bad_input(o.model, "model not found", "pass a diffusers model folder or a .safetensors checkpoint");
  if (fair) check_text_encoder(o.model, o.fairness.empty() ? "--fairness-file" : "--fairness");
}

std::string manifest_name(const GenerateOptions& o) {
  const int64_t shards = o.num_shards > 0 ? o.num_shards : 1, shard = o.shard_index >= 0 ? o.shard_index : 0;
  return shards > 1 ? "manifest-shard-" + std::to_string(shard) + "-of-" + std::to_string(shards) + ".jsonl"
                    : "manifest.jsonl";
}

RunPlan plan_run(const GenerateOptions& o, int64_t native_width, int64_t native_height) {
  RunPlan plan;
  plan.base_seed = o.seed;
  plan.num_shards = o.num_shards > 0 ? o.num_shards : 1;
  plan.shard_index = o.shard_index >= 0 ? o.shard_index : 0;
  plan.manifest_name = manifest_name(o);
  const std::vector<PromptSpec> prompts = read_prompts(o);
  const FairnessSpec fairness = parse_fairness(o);
  int64_t index = 0;
  for (size_t p = 0; p < prompts.size(); ++p) {
    const PromptSpec& spec = prompts[p];
    const int64_t count = spec.count > 0 ? spec.count : o.images_per_prompt;
    // The last seed of the prompt must not run past int64 (the sum would be UB).
    const int64_t base = spec.seed >= 0 ? spec.seed : o.seed, first = spec.seed >= 0 ? 0 : index;
    if (base > std::numeric_limits<int64_t>::max() - first - count)
      throw_bad_input(spec.seed >= 0 ? o.prompts_file : "--seed",
                      "seed " + std::to_string(base) + " plus the image count runs past the largest seed",
                      "use a seed below 2^63 minus the number of images, e.g. a 32-bit one");
    // Groups are assigned per prompt over the whole run, before sharding: every shard sees the same plan.
    const auto groups = assign_groups(fairness, o.assignment, o.seed, static_cast<int64_t>(p), count);
    for (int64_t n = 0; n < count; ++n, ++index) {
      PlannedImage img;
      img.index = index;
      img.prompt_index = static_cast<int64_t>(p);
      img.prompt = spec.prompt;
      img.negative_prompt = spec.negative_prompt;
      // Image k of the run has seed S + k; a prompt with its own seed s numbers its images s, s+1, ...
      img.seed = spec.seed >= 0 ? spec.seed + n : o.seed + index;
      img.steps = spec.steps > 0 ? spec.steps : o.steps;
      img.cfg_scale = spec.cfg_scale >= 0 ? spec.cfg_scale : o.cfg_scale;
      img.width = spec.width > 0 ? spec.width : (o.width > 0 ? o.width : native_width);
      img.height = spec.height > 0 ? spec.height : (o.height > 0 ? o.height : native_height);
      char name[64];
      std::snprintf(name, sizeof name, "%05lld-%lld.png", static_cast<long long>(index), static_cast<long long>(img.seed));
      img.file = name;
      for (size_t a = 0; a < fairness.targets.size(); ++a) {
        const Attribute& attr = fairness.targets[a].attribute;
        img.groups.emplace_back(attr.name, attr.groups[static_cast<size_t>(groups[static_cast<size_t>(n)][a])].name);
      }
      plan.images.push_back(img);
    }
  }
  return plan;
}

namespace {

// How a manifest record differs from the planned image ("" when it does not): the first
// setting that changes the picture or the instruction.
std::string record_difference(const nlohmann::json& r, const PlannedImage& img, const FairnessSpec& spec,
                              const nlohmann::json& verify) {
  nlohmann::json groups = nlohmann::json::object();
  for (const auto& [attribute, group] : img.groups) groups[attribute] = group;
  nlohmann::json fairness = r.value("fairness", nlohmann::json::object());
  nlohmann::json made_verify = r.value("verify", nlohmann::json::object());
  if (!made_verify.is_object()) made_verify = nlohmann::json::object();
  if (!fairness.is_object()) fairness = nlohmann::json::object();  // a hand-edited line: compared as none
  const std::vector<std::tuple<std::string, nlohmann::json, nlohmann::json>> settings = {
      {"prompt", r.value("prompt", nlohmann::json()), img.prompt},
      {"negative prompt", r.value("negative_prompt", nlohmann::json()), img.negative_prompt},
      // A verified image may keep a retry's seed; it records the planned one too.
      {"seed", made_verify.value("planned_seed", r.value("seed", nlohmann::json())), img.seed},
      {"steps", r.value("steps", nlohmann::json()), img.steps},
      {"guidance scale", r.value("guidance_scale", nlohmann::json()), img.cfg_scale},
      {"size", {r.value("width", nlohmann::json()), r.value("height", nlohmann::json())}, {img.width, img.height}},
      {"fairness groups", fairness.value("groups", nlohmann::json::object()), groups},
      // Records carry the normalised shares as JSON doubles, which read back exactly.
      {"fairness targets", fairness.value("targets", nlohmann::json::object()), targets_record(spec)},
      {"joint target", fairness.value("joint", nlohmann::json()), joint_record(spec)},
      // Records from before --fairness-mode existed were made in the exact mode.
      {"fairness mode", spec.enabled() ? fairness.value("mode", nlohmann::json("exact")) : nlohmann::json(),
       spec.enabled() ? nlohmann::json(spec.mode) : nlohmann::json()},
      {"--verify settings", made_verify.value("settings", nlohmann::json()), verify}};
  for (const auto& [name, made, planned] : settings)
    if (made != planned) return name + " " + made.dump() + ", this run plans " + planned.dump();
  return "";
}

}  // namespace

void check_resume(const std::map<int64_t, nlohmann::json>& done, const std::vector<PlannedImage>& images,
                  const FairnessSpec& spec, const std::string& manifest_path, const nlohmann::json& verify) {
  const std::string hint = "use a new --out for changed settings, or rerun the original command to resume";
  for (const auto& [index, record] : done) {
    const std::string name = "image " + std::to_string(index) + " (" + record.value("file", std::string("?")) + ")";
    if (index < 0 || index >= static_cast<int64_t>(images.size()))
      throw_bad_input(manifest_path, name + " is not in this run, which plans " + std::to_string(images.size()) +
                                         " images: the folder holds another run", hint);
    const std::string difference = record_difference(record, images[static_cast<size_t>(index)], spec, verify);
    if (!difference.empty())
      throw_bad_input(manifest_path, name + " was made with " + difference + ": the folder holds another run", hint);
  }
}

std::vector<PlannedImage> RunPlan::shard() const {
  std::vector<PlannedImage> mine;
  // Round-robin: neighbouring images (same prompt) spread over shards, balancing the work.
  for (const auto& img : images)
    if (img.index % num_shards == shard_index) mine.push_back(img);
  return mine;
}

std::map<int64_t, nlohmann::json> read_manifest(const std::string& path) {
  std::map<int64_t, nlohmann::json> entries;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    // A torn last line (a crash while appending) is ignored: its image is regenerated. So is a
    // line that is not a record of ours: every record has an integer index and a file name,
    // which resuming and merging read as such.
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("index") || !j["index"].is_number_integer() ||
        !j.contains("file") || !j["file"].is_string())
      continue;
    entries[j["index"].get<int64_t>()] = j;
  }
  return entries;
}

namespace {

bool blank(const std::string& line) { return line.find_first_not_of(" \t\r") == std::string::npos; }

bool json_object(const std::string& line) {
  const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
  return !j.is_discarded() && j.is_object();
}

// Cuts `path` back to its first `size` bytes and flushes it.
void truncate_durable(const std::string& path, size_t size) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  const bool ok = fd >= 0 && ::ftruncate(fd, static_cast<off_t>(size)) == 0 && ::fsync(fd) == 0;
  const int err = errno;
  if (fd >= 0) ::close(fd);
  if (!ok) throw Error(ErrorKind::Runtime, path, std::string("cannot cut off the torn last line: ") + std::strerror(err));
}

}  // namespace

std::string manifest_lock_path(const std::string& manifest_path) { return manifest_path + ".lock"; }

int64_t repair_manifest(const std::string& path, const std::string& owner) {
  if (!is_regular_file(path)) return 0;
  const std::string text = read_text_file(path);
  std::string kept, moved;
  int64_t count = 0;
  for (size_t pos = 0; pos < text.size();) {
    size_t end = text.find('\n', pos);
    const bool has_newline = end != std::string::npos;
    if (!has_newline) end = text.size();
    const std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    if ((has_newline && blank(line)) || json_object(line)) {
      kept += line + "\n";
    } else {
      moved += line + "\n";
      ++count;
    }
  }
  if (kept == text) return 0;
  // The copy first: a crash between the two steps leaves the line twice, never nowhere.
  if (!moved.empty()) append_line_durable(path + ".torn", moved.substr(0, moved.size() - 1));
  if (text.compare(0, kept.size(), kept) == 0)
    truncate_durable(path, kept.size());  // only the tail was torn
  else if (kept.compare(0, text.size(), text) == 0)
    append_line_durable(path, "");  // a whole last record without its newline
  else
    write_file_atomic(path, kept, owner);
  return count;
}

int64_t merge_manifests(const std::string& out_dir) {
  if (!is_directory(out_dir)) throw_bad_input(out_dir, "output folder not found", "give the --out folder of the run");
  std::map<int64_t, nlohmann::json> merged;
  std::map<int64_t, std::string> source;
  std::vector<std::string> shard_files;
  for (const auto& e : fs::directory_iterator(out_dir)) {
    const std::string name = e.path().filename().string();
    if (starts_with(name, "manifest-shard-") && e.path().extension() == ".jsonl")
      shard_files.push_back(e.path().string());
  }
  std::sort(shard_files.begin(), shard_files.end());
  if (shard_files.empty())
    throw_bad_input(out_dir, "has no manifest-shard-*.jsonl files", "run the shards with --out pointing here first");
  const std::string unsharded = out_dir + "/manifest.jsonl";
  const FileLock lock(manifest_lock_path(unsharded), unsharded, "an unsharded generate is writing it: wait for it to finish");
  if (is_regular_file(unsharded)) shard_files.insert(shard_files.begin(), unsharded);
  for (const auto& file : shard_files) {
    for (auto& [index, entry] : read_manifest(file)) {
      auto it = merged.find(index);
      if (it != merged.end() && it->second.value("file", "") != entry.value("file", ""))
        throw_bad_input(file, "image " + std::to_string(index) + " is also in " + source[index] + " with another file",
                        "were these shards planned with different options?");
      if (!is_regular_file(out_dir + "/" + entry.value("file", std::string())))
        throw_bad_input(file, "lists " + entry.value("file", std::string()) + ", which is missing",
                        "rerun that shard: it resumes and regenerates missing images");
      merged[index] = entry;
      source[index] = file;
    }
  }
  std::string text;
  for (const auto& [index, entry] : merged) text += entry.dump() + "\n";
  write_file_atomic(unsharded, text);
  return static_cast<int64_t>(merged.size());
}

FairnessSpec parse_fairness(const GenerateOptions& o) { return parse_fairness(static_cast<const FairnessOptions&>(o)); }

void check_text_encoder(const std::string& model, const std::string& flag) {
  std::string missing;
  if (is_directory(model)) {
    std::ifstream in(model + "/model_index.json");
    const nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
    if (j.is_discarded() || !j.is_object()) return;  // the loader names what is wrong
    const auto it = j.find("text_encoder");
    if (it == j.end() || !it->is_array() || it->size() != 2 || (*it)[0].is_null() || (*it)[1].is_null())
      missing = "its model_index.json lists no text_encoder";
  } else if (model.size() > 12 && ends_with(model, ".safetensors")) {
    try {
      const SafeTensors st(model);  // header only: the tensors stay mapped, unread
      bool found = false;
      for (const TensorView& t : st.tensors()) found = found || starts_with(t.name, "cond_stage_model.");
      if (!found) missing = "the checkpoint has no cond_stage_model.* tensors";
    } catch (const Error&) {
      return;  // a broken file: the loader says how
    }
  }
  if (!missing.empty())
    throw_bad_input(flag, "needs the model's text encoder to embed the edit prompts; " + model + " has none (" +
                              missing + ")",
                    "use a model with a text encoder, or drop the fairness flags");
}

}  // namespace fairdiff
