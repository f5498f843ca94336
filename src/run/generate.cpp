// `fairdiff generate`: load once, plan the whole run, skip what the manifest
// already holds, then sample batch by batch: PNG (atomic) first, manifest line after.
#include <c10/core/InferenceMode.h>

#include <cstdlib>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <random>
#include <set>

#include "fairdiff/error.h"
#include "fairdiff/generate.h"
#include "fairness.h"
#include "data_paths.h"
#include "fs_util.h"
#include "run_plan.h"
#include "infotext.h"
#include "pipeline.h"
#include "png_io.h"
#include "runtime.h"
#include "semantic_guidance.h"
#include "sha256.h"
#include "single_file.h"

namespace fs = std::filesystem;

namespace fairdiff {
namespace {

constexpr const char* kVersion = "fairdiff 0.1.0";

bool is_single_file(const std::string& model) { return !is_directory(model); }

LoadOptions resolve_runtime(const GenerateOptions& o) {
  LoadOptions lo;
  lo.dtype = o.dtype == "fp16" ? at::kHalf : o.dtype == "bf16" ? at::kBFloat16 : at::kFloat;
  lo.prepack_convolutions = o.prepack_weights;
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
  if (lo.device.is_cpu() && lo.dtype == at::kHalf)
    throw_bad_input("--dtype", "fp16 needs a CUDA device", "use --dtype bf16 or fp32 on the CPU");
  return lo;
}

StableDiffusionModel load_model(const GenerateOptions& o, const LoadOptions& lo) {
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
  // As diffusers does: a half-precision SD VAE overflows, so it decodes in float32.
  if (lo.dtype == at::kHalf && model.vae->config().force_upcast) model.vae->to(at::kFloat);
  if (o.vae_tile != 0) {
    const int64_t f = model.vae->config().scale_factor();
    if (o.vae_tile > 0 && o.vae_tile % f != 0)
      throw_bad_input("--vae-tiling", "a tile of " + std::to_string(o.vae_tile) + " pixels is not a multiple of the VAE's scale factor " + std::to_string(f));
    model.vae->enable_tiling(o.vae_tile < 0 ? -1 : o.vae_tile / f);
  }
  return model;
}

std::string weights_file(const GenerateOptions& o) {
  return is_single_file(o.model) ? o.model : component_weights(o.model + "/unet", "diffusion_pytorch_model");
}

std::string model_name(const std::string& model) {
  fs::path p = fs::path(model).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();
  return is_single_file(model) ? p.stem().string() : p.filename().string();
}

// A1111's sampler and schedule names for what will run.
std::pair<std::string, std::string> a1111_sampler(const Scheduler& s, bool karras) {
  static const std::map<std::string, std::string> kNames = {
      {"PNDMScheduler", "PLMS"},           {"DDIMScheduler", "DDIM"},
      {"EulerDiscreteScheduler", "Euler"}, {"EulerAncestralDiscreteScheduler", "Euler a"},
      {"DPMSolverMultistepScheduler", "DPM++ 2M"}, {"LMSDiscreteScheduler", "LMS"}};
  auto it = kNames.find(s.name());
  return {it == kNames.end() ? s.name() : it->second, karras ? "Karras" : "Automatic"};
}

class Progress {
 public:
  Progress(int64_t total, bool quiet) : total_(total), quiet_(quiet), tty_(::isatty(STDERR_FILENO) != 0) {}
  void step(int64_t done, size_t step, size_t steps, double seconds_per_step) {
    if (quiet_ || !tty_) return;
    const double eta = seconds_per_step * static_cast<double>(steps - step - 1 + (total_ - done - 1) * steps);
    std::fprintf(stderr, "\r[%lld/%lld] step %zu/%zu  %.2f it/s  ETA %.0fs   ", static_cast<long long>(done + 1),
                 static_cast<long long>(total_), step + 1, steps, seconds_per_step > 0 ? 1.0 / seconds_per_step : 0.0,
                 eta);
    std::fflush(stderr);
  }
  void image(int64_t done, const std::string& file, double seconds) {
    if (quiet_) return;
    if (tty_) std::fprintf(stderr, "\r\033[K");
    spdlog::info("[{}/{}] {} ({:.1f} s)", done, total_, file, seconds);
  }

 private:
  int64_t total_;
  bool quiet_, tty_;
};

// Fair Diffusion's edit concepts: every group's edit prompts, one embedding row each.
struct FairEdits {
  std::vector<std::string> prompts;                // row r of the table: prompts[r]
  std::vector<std::vector<std::vector<int64_t>>> rows;  // [attribute][group] -> rows
  std::vector<std::pair<size_t, size_t>> owner;    // row -> (attribute, group)
};

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

// One image's concepts: per attribute, the assigned group's prompts forward, every other
// group's reversed (exact), or the assigned group's only (fast).
std::vector<EditConcept> fair_concepts(const FairnessSpec& spec, const FairEdits& edits, const PlannedImage& img,
                                       bool fast) {
  std::vector<EditConcept> concepts;
  for (size_t a = 0; a < spec.targets.size(); ++a) {
    const Attribute& attr = spec.targets[a].attribute;
    int64_t target = 0;
    for (size_t g = 0; g < attr.groups.size(); ++g)
      if (attr.groups[g].name == img.groups[a].second) target = static_cast<int64_t>(g);
    EditConcept base;
    base.guidance_scale = attr.defaults.edit_guidance_scale;
    base.threshold = attr.defaults.edit_threshold;
    base.warmup_steps = attr.defaults.edit_warmup_steps;
    // steer_toward gives concept k for group k; each group's prompts share its direction.
    const std::vector<EditConcept> per_group = steer_toward(target, static_cast<int64_t>(attr.groups.size()), base);
    for (size_t g = 0; g < attr.groups.size(); ++g)
      for (int64_t row : edits.rows[a][g]) {
        if (fast && static_cast<int64_t>(g) != target) continue;
        EditConcept c = per_group[g];
        c.embedding = row;
        concepts.push_back(c);
      }
  }
  return concepts;
}

nlohmann::json fair_record(const FairnessSpec& spec, const FairEdits& edits, const GenerateOptions& o,
                           const PlannedImage& img, const std::vector<EditConcept>& concepts) {
  nlohmann::json groups = nlohmann::json::object(), list = nlohmann::json::array();
  for (const auto& [attribute, group] : img.groups) groups[attribute] = group;
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
  return {{"assignment", o.assignment}, {"mode", spec.mode}, {"groups", groups}, {"targets", targets_record(spec)}, {"edits", list},
          {"momentum_scale", d.edit_momentum_scale}, {"momentum_beta", d.edit_mom_beta}};
}

}  // namespace

std::string default_model() {
  if (const char* env = std::getenv("FAIRDIFF_MODEL"); env && *env) return env;
  return find_data("models/toy");
}

RunSummary generate(GenerateOptions o) {
  validate(o);
  configure_threads(o.threads);  // LibTorch alone may use one thread on 2-vCPU machines (see runtime.h)
  configure_allocator();         // keep freed activations for reuse: page faults cost more than the math
  c10::InferenceMode inference;
  const LoadOptions lo = resolve_runtime(o);
  const fs::path out(o.out_dir);

  // Everything that can fail on bad input happens before the first file is written.
  StableDiffusionModel model = load_model(o, lo);
  StableDiffusionPipeline pipe(model);
  const std::string override_name = scheduler_override(o.sampling_method, o.scheduler);
  const std::string sched_where = is_single_file(o.model) ? o.model : o.model + "/scheduler/scheduler_config.json";
  auto scheduler = make_scheduler(model.scheduler_config, override_name, sched_where);
  const bool karras = override_name.find("karras") != std::string::npos ||
                      (override_name.empty() && model.scheduler_config.value("use_karras_sigmas", false));
  const auto [sampler_name, schedule_type] = a1111_sampler(*scheduler, karras);
  const int64_t f = pipe.vae_scale_factor();
  const auto& sample_size = model.unet->config().sample_size;  // latent pixels: [size] or [height, width]
  const int64_t native_h = (sample_size.empty() ? 64 : sample_size.front()) * f;
  const int64_t native_w = (sample_size.empty() ? 64 : sample_size.back()) * f;

  // A random seed is drawn once and kept in the manifest, so a resumed run reuses it.
  RunPlan probe = plan_run(o, native_w, native_h);
  const std::string manifest_path = (out / probe.manifest_name).string();
  std::map<int64_t, nlohmann::json> done = read_manifest(manifest_path);
  if (o.seed < 0) {
    o.seed = !done.empty() && done.begin()->second.contains("base_seed")
                 ? done.begin()->second["base_seed"].get<int64_t>()
                 : static_cast<int64_t>(std::random_device{}() & 0xffffffffu);
    spdlog::info("seed {}", o.seed);
  }
  const RunPlan plan = plan_run(o, native_w, native_h);
  const FairnessSpec fairness = parse_fairness(o);
  const FairEdits edits = fair_edits(fairness);
  if (fairness.enabled())
    for (const auto& img : plan.images)
      if (img.cfg_scale <= 1.0)
        throw_bad_input("--fairness", "image " + std::to_string(img.index) + " has cfg_scale " +
                                          python_float(img.cfg_scale) + "; semantic guidance needs it above 1",
                        "raise cfg_scale in the prompts file");
  check_resume(done, plan.images, fairness, manifest_path);  // never mix two runs' images in one folder
  std::vector<PlannedImage> todo;
  RunSummary summary;
  summary.manifest_path = manifest_path;
  for (const auto& img : plan.shard()) {
    ++summary.planned;
    auto it = done.find(img.index);
    if (it != done.end() && it->second.value("file", "") == img.file && png_is_complete((out / img.file).string()))
      ++summary.skipped;
    else
      todo.push_back(img);
  }
  fs::create_directories(out);
  remove_stale_temporaries(out.string());
  if (summary.skipped && !o.quiet) spdlog::info("resuming: {} of {} images already done", summary.skipped, summary.planned);

  const std::string hash = sha256_file(weights_file(o)).substr(0, 10);
  const std::string name = model_name(o.model);
  const std::string device_name = lo.device.str();
  Progress progress(static_cast<int64_t>(todo.size()), o.quiet);
  std::set<std::string> warned_truncated;
  // Every group's edit prompts, encoded once for the run: [K, 77, D] on the UNet's device and dtype.
  at::Tensor edit_table;
  if (fairness.enabled() && !todo.empty())
    edit_table = encode_edit_prompts(model, edits.prompts).to(pipe.device(), pipe.dtype());

  for (size_t begin = 0; begin < todo.size();) {
    // A batch: consecutive images that share steps, guidance and size.
    size_t end = begin + 1;
    auto same = [&](const PlannedImage& a, const PlannedImage& b) {
      return a.steps == b.steps && a.cfg_scale == b.cfg_scale && a.width == b.width && a.height == b.height;
    };
    while (end < todo.size() && static_cast<int64_t>(end - begin) < o.batch_size && same(todo[begin], todo[end])) ++end;
    const std::vector<PlannedImage> batch(todo.begin() + static_cast<long>(begin), todo.begin() + static_cast<long>(end));
    const PlannedImage& first = batch.front();
    const auto t0 = std::chrono::steady_clock::now();

    std::vector<std::string> prompts, negatives;
    std::vector<int64_t> seeds;
    for (const auto& img : batch) {
      prompts.push_back(img.prompt);
      negatives.push_back(img.negative_prompt);
      seeds.push_back(img.seed);
    }
    const bool cfg = first.cfg_scale > 1.0;
    const PromptEmbeddings emb = pipe.encode_prompts(prompts, negatives, o.clip_skip, cfg);
    for (size_t i = 0; i < batch.size(); ++i)
      if (emb.truncated[i] && warned_truncated.insert(prompts[i]).second)
        spdlog::warn("prompt truncated at {} tokens: \"{}\"", model.tokenizer->model_max_length(), prompts[i]);
    std::vector<at::Generator> generators;
    const at::Tensor noise = pipe.initial_noise(seeds, first.height, first.width, &generators);
    scheduler = make_scheduler(model.scheduler_config, override_name, sched_where);  // fresh state per batch
    scheduler->set_timesteps(first.steps);
    std::vector<std::vector<EditConcept>> concepts;
    std::unique_ptr<SemanticGuidance> sega;
    if (fairness.enabled()) {
      SemanticGuidanceSettings settings;
      settings.momentum_scale = fairness.targets.front().attribute.defaults.edit_momentum_scale;
      settings.momentum_beta = fairness.targets.front().attribute.defaults.edit_mom_beta;
      for (const auto& img : batch) settings.images.push_back(fair_concepts(fairness, edits, img, o.fairness_mode == "fast"));
      concepts = settings.images;
      sega = std::make_unique<SemanticGuidance>(edit_table, std::move(settings));
    }
    auto last = std::chrono::steady_clock::now();
    const at::Tensor latents = pipe.denoise(
        *scheduler, noise, emb, first.cfg_scale, &generators, [&](size_t step, size_t steps, const at::Tensor&) {
          const auto now = std::chrono::steady_clock::now();
          progress.step(summary.generated, step, steps, std::chrono::duration<double>(now - last).count());
          last = now;
        },
        sega.get());
    const at::Tensor pixels = StableDiffusionPipeline::to_uint8(StableDiffusionPipeline::to_image(pipe.decode(latents)));
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / static_cast<double>(batch.size());

    for (size_t i = 0; i < batch.size(); ++i) {
      const PlannedImage& img = batch[i];
      Infotext info;
      info.prompt = img.prompt;
      info.negative_prompt = img.negative_prompt;
      info.params = {{"Steps", std::to_string(img.steps)},
                     {"Sampler", sampler_name},
                     {"Schedule type", schedule_type},
                     {"CFG scale", python_float(img.cfg_scale)},
                     {"Seed", std::to_string(img.seed)},
                     {"Size", std::to_string(img.width) + "x" + std::to_string(img.height)},
                     {"Model hash", hash},
                     {"Model", name}};
      // diffusers' clip_skip k skips k layers; A1111 counts the last layer as 1.
      if (o.clip_skip > 0) info.params.emplace_back("Clip skip", std::to_string(o.clip_skip + 1));
      if (fairness.enabled()) info.params.emplace_back("Fairness", fairness_label(img.groups));
      info.params.emplace_back("Version", kVersion);
      // The full record: everything needed to regenerate this image (and nothing
      // that varies between runs, so the PNG bytes depend only on the image).
      nlohmann::json record = {{"index", img.index},          {"file", img.file},
                               {"prompt", img.prompt},        {"negative_prompt", img.negative_prompt},
                               {"seed", img.seed},            {"base_seed", plan.base_seed},
                               {"steps", img.steps},          {"scheduler", scheduler->name()},
                               {"sampler", sampler_name},     {"schedule_type", schedule_type},
                               {"guidance_scale", img.cfg_scale}, {"width", img.width},
                               {"height", img.height},        {"clip_skip", o.clip_skip},
                               {"model", name},               {"model_hash", hash},
                               {"dtype", o.dtype},            {"version", kVersion}};
      if (fairness.enabled()) record["fairness"] = fair_record(fairness, edits, o, img, concepts[i]);
      // Tiles change the pixels near their seams: recorded (in pixels) when used.
      if (model.vae->tiling())
        record["vae_tile"] = model.vae->tile_latent_size() * model.vae->config().scale_factor();
      if (fairness.joint) record["fairness"]["joint"] = joint_record(fairness);
      const at::Tensor rgb = pixels[static_cast<int64_t>(i)].contiguous();  // [H, W, 3] uint8
      write_png((out / img.file).string(), rgb.data_ptr<uint8_t>(), static_cast<int>(img.width),
                static_cast<int>(img.height), {{"parameters", format_infotext(info)}, {"fairdiff", record.dump()}});
      record["device"] = device_name;
      record["seconds"] = seconds;
      record["shard"] = {plan.shard_index, plan.num_shards};
      append_line_durable(manifest_path, record.dump());
      ++summary.generated;
      progress.image(summary.generated, img.file, seconds);
    }
    begin = end;
  }
  return summary;
}

}  // namespace fairdiff
