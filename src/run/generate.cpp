// `fairdiff generate`, the job: load once, plan the whole run, skip what the manifest
// already holds, then sample batch by batch through Model (model.cpp): PNG (atomic) first,
// manifest line after.
#include <c10/core/InferenceMode.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <random>

#include "config_json.h"
#include "fairdiff/audit.h"
#include "fairdiff/error.h"
#include "fairdiff/generate.h"
#include "file_lock.h"
#include "fs_util.h"
#include "model_impl.h"
#include "png_io.h"
#include "run_plan.h"
#include "string_util.h"

namespace fs = std::filesystem;

namespace fairdiff {
namespace {

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

// The run's sampling settings with the image's own (a prompts file may set them per line).
SamplingSettings sampling_settings(const GenerateOptions& o, const PlannedImage& img) {
  SamplingSettings s = o;
  s.steps = img.steps;
  s.cfg_scale = img.cfg_scale;
  s.width = img.width;
  s.height = img.height;
  return s;
}

// A random seed is drawn once and kept in the manifest, so a resumed run reuses it.
void resolve_random_seed(GenerateOptions& o, const std::map<int64_t, nlohmann::json>& done) {
  if (o.seed >= 0) return;
  const bool recorded = !done.empty() && done.begin()->second.contains("base_seed");
  // A hand-edited record: get<int64_t>() of 1e20 would be undefined behaviour.
  const std::optional<int64_t> seed = recorded ? whole_number(done.begin()->second["base_seed"]) : std::nullopt;
  if (recorded && (!seed || *seed < 0))
    throw_bad_input(o.out_dir, "the manifest's base_seed " + done.begin()->second["base_seed"].dump() + " is not a seed",
                    "repair the manifest or use a new --out");
  o.seed = recorded ? *seed : static_cast<int64_t>(std::random_device{}() & 0xffffffffu);
  spdlog::info("seed {}", o.seed);
}

void check_fair_guidance_scale(const FairnessSpec& fairness, const RunPlan& plan) {
  if (!fairness.enabled()) return;
  for (const auto& img : plan.images)
    if (img.cfg_scale <= 1.0)
      throw_bad_input("--fairness", "image " + std::to_string(img.index) + " has cfg_scale " +
                                        python_float(img.cfg_scale) + "; semantic guidance needs it above 1",
                      "raise cfg_scale in the prompts file");
}

// This shard's images that the manifest does not hold yet (with their PNG complete).
std::vector<PlannedImage> images_to_do(const RunPlan& plan, const std::map<int64_t, nlohmann::json>& done,
                                       const fs::path& out, RunSummary* summary) {
  std::vector<PlannedImage> todo;
  for (const auto& img : plan.shard()) {
    ++summary->planned;
    auto it = done.find(img.index);
    if (it != done.end() && it->second.value("file", "") == img.file && png_is_complete((out / img.file).string()))
      ++summary->skipped;
    else
      todo.push_back(img);
  }
  return todo;
}

// The next batch from `begin`: consecutive images that share steps, guidance and size.
size_t batch_end(const std::vector<PlannedImage>& todo, size_t begin, int64_t batch_size) {
  auto same = [](const PlannedImage& a, const PlannedImage& b) {
    return a.steps == b.steps && a.cfg_scale == b.cfg_scale && a.width == b.width && a.height == b.height;
  };
  size_t end = begin + 1;
  while (end < todo.size() && static_cast<int64_t>(end - begin) < batch_size && same(todo[begin], todo[end])) ++end;
  return end;
}

// One attempt at an image, as generated.
struct Made {
  at::Tensor rgb;  // [H, W, 3] uint8
  nlohmann::json record;
  Infotext infotext;
};

// --verify: a classifier per attribute of the instruction, and what a retry changes.
class Verifier {
 public:
  Verifier(const GenerateOptions& o, const FairnessSpec& spec, const std::string& device) : options_(o) {
    if (!o.verify) return;
    if (o.verify_classifier == "clip") register_clip_classifier();
    for (const FairnessTarget& t : spec.targets) {
      ClassifierOptions co;
      co.attribute = t.attribute.name;
      co.model = o.clip_model;
      co.device = device;
      co.margin = o.verify_margin;
      co.attributes_dir = o.attributes_dir;
      std::unique_ptr<GroupClassifier> c = make_classifier(o.verify_classifier, co);
      std::vector<std::string> names;
      for (const AttributeGroup& g : t.attribute.groups) names.push_back(g.name);
      if (c->groups() != names)
        throw_bad_input("--verify-classifier " + o.verify_classifier,
                        "tells the groups " + join(c->groups()) + " of " + t.attribute.name + ", the instruction has " +
                            join(names),
                        "use a classifier for this attribute library");
      classifiers_.push_back(std::move(c));
    }
    settings_ = {{"classifier", o.verify_classifier}, {"model", o.clip_model},
                 {"margin", o.verify_margin},         {"max_retries", o.max_retries},
                 {"retry_edit_scale", o.retry_edit_scale}, {"retry_warmup", o.retry_warmup},
                 {"retry_reach", o.retry_reach},         {"retry_seed", o.retry_seed_mode}};
  }

  bool on() const { return options_.verify; }
  int64_t max_retries() const { return options_.max_retries; }
  const nlohmann::json& settings() const { return settings_; }  // null when off

  // Attempt `attempt` (0 = the planned image) of `img`.
  ImageRequest request(const PlannedImage& img, int64_t attempt) const {
    ImageRequest r{img.prompt, img.negative_prompt, img.seed, img.groups};
    if (attempt > 0) {
      if (options_.retry_seed_mode == "new") r.seed = retry_seed(img.seed, attempt);
      const auto k = static_cast<double>(attempt);
      r.edit_scale = std::pow(options_.retry_edit_scale, k);
      r.edit_warmup = std::pow(options_.retry_warmup, k);
      r.edit_reach = std::pow(options_.retry_reach, k);
    }
    return r;
  }

  // What the classifiers see in one attempt, recorded per attribute: the group (null = none)
  // and its probability of the assigned group where the classifier has probabilities.
  struct Look {
    bool hit = true;
    nlohmann::json seen = nlohmann::json::object(), probability = nlohmann::json::object();
  };
  Look look(const Made& made, const GroupAssignment& groups) const {
    Look l;
    const auto w = static_cast<int>(made.rgb.size(1)), h = static_cast<int>(made.rgb.size(0));
    for (size_t a = 0; a < classifiers_.size(); ++a) {
      const GroupClassifier& c = *classifiers_[a];
      const auto& [attribute, assigned] = groups[a];
      // One network call for the verdict and its probabilities.
      const GroupClassifier::Judgement j = c.judge(made.rgb.data_ptr<uint8_t>(), w, h);
      const std::vector<double>& p = j.probabilities;
      const int g = j.group;
      l.seen[attribute] = g < 0 ? nlohmann::json() : nlohmann::json(c.groups()[static_cast<size_t>(g)]);
      const auto target = std::find(c.groups().begin(), c.groups().end(), assigned) - c.groups().begin();
      if (!p.empty()) l.probability[attribute] = p[static_cast<size_t>(target)];
      l.hit = l.hit && g == target;
    }
    return l;
  }

 private:
  const GenerateOptions& options_;
  std::vector<std::unique_ptr<GroupClassifier>> classifiers_;  // per attribute, in the instruction's order
  nlohmann::json settings_;
};

// Attempt `attempt` of the given images, in batches of at most batch_size.
std::vector<Made> make_attempt(Model::Impl& m, const GenerateOptions& o, const Verifier& verifier,
                               const std::vector<PlannedImage>& images, int64_t attempt,
                               const std::function<void(const StepProgress&)>& on_step) {
  std::vector<Made> made;
  for (size_t begin = 0; begin < images.size(); begin += static_cast<size_t>(o.batch_size)) {
    const size_t end = std::min(images.size(), begin + static_cast<size_t>(o.batch_size));
    std::vector<ImageRequest> requests;
    for (size_t i = begin; i < end; ++i) requests.push_back(verifier.request(images[i], attempt));
    const GeneratedBatch g = m.generate(requests, sampling_settings(o, images[begin]), on_step);
    for (size_t i = 0; i < requests.size(); ++i)
      made.push_back({g.pixels[static_cast<int64_t>(i)].contiguous(), g.records[i], g.infotexts[i]});
  }
  return made;
}

// --verify on a batch made once: classify, remake the images that missed (only those, and
// each image alone decides, so batch sizes and shards do not change what is kept), keep
// the first attempt that reached its groups, or the first attempt, marked unverified.
void verify_batch(Model::Impl& m, const GenerateOptions& o, const Verifier& verifier,
                  const std::vector<PlannedImage>& batch, std::vector<Made>& made, RunSummary* summary,
                  const std::function<void(const StepProgress&)>& on_step) {
  std::vector<nlohmann::json> tries(batch.size(), nlohmann::json::array());
  std::vector<int64_t> kept(batch.size(), -1);
  std::vector<size_t> pending(batch.size());
  for (size_t i = 0; i < batch.size(); ++i) pending[i] = i;
  std::vector<Made> attempt_made = made;
  for (int64_t attempt = 0; !pending.empty() && attempt <= verifier.max_retries(); ++attempt) {
    if (attempt > 0) {
      std::vector<PlannedImage> again;
      for (size_t i : pending) again.push_back(batch[i]);
      attempt_made = make_attempt(m, o, verifier, again, attempt, on_step);
      summary->retries += static_cast<int64_t>(again.size());
    }
    std::vector<size_t> missed;
    for (size_t k = 0; k < pending.size(); ++k) {
      const size_t i = pending[k];
      const Made& a = attempt_made[attempt > 0 ? k : i];
      const Verifier::Look l = verifier.look(a, batch[i].groups);
      const ImageRequest r = verifier.request(batch[i], attempt);
      tries[i].push_back({{"seed", r.seed},
                          {"edit_scale", r.edit_scale},
                          {"edit_warmup", r.edit_warmup},
                          {"edit_reach", r.edit_reach},
                          {"seen", l.seen},
                          {"probability", l.probability}});
      if (l.hit) {
        kept[i] = attempt;
        if (attempt > 0) made[i] = a;
      } else {
        missed.push_back(i);
      }
    }
    pending = missed;
  }
  for (size_t i = 0; i < batch.size(); ++i) {
    const bool verified = kept[i] >= 0;
    made[i].record["verify"] = {{"verified", verified},
                                {"attempts", tries[i].size()},
                                {"kept", verified ? kept[i] : 0},
                                {"planned_seed", batch[i].seed},
                                {"tries", tries[i]},
                                {"settings", verifier.settings()}};
    ++(verified ? summary->verified : summary->unverified);
  }
}

}  // namespace

int64_t retry_seed(int64_t seed, int64_t attempt) {
  uint64_t x = static_cast<uint64_t>(seed) * 0x100000001b3ull + static_cast<uint64_t>(attempt);
  x += 0x9e3779b97f4a7c15ull;  // splitmix64
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  x ^= x >> 31;
  return static_cast<int64_t>(x & 0xffffffffull);
}

RunSummary generate(GenerateOptions o) {
  validate(o);
  c10::InferenceMode inference;
  const fs::path out(o.out_dir);

  // 1. Everything that can fail on bad input happens before the first file is written.
  Model model = Model::load(o);
  Model::Impl& m = model.impl();
  const std::string manifest_path = (out / manifest_name(o)).string();
  const std::map<int64_t, nlohmann::json> done = read_manifest(manifest_path);
  resolve_random_seed(o, done);
  const RunPlan plan = plan_run(o, m.native_width, m.native_height);
  model.set_fairness(o);
  check_fair_guidance_scale(m.fairness, plan);
  const Verifier verifier(o, m.fairness, m.device_name);  // its classifiers load (and fail) here
  check_resume(done, plan.images, m.fairness, manifest_path, verifier.settings());  // never mix two runs
  m.check_run(plan.shard(), o);  // --clip-skip against the model, the largest batch against memory

  // 2. The folder: one process per manifest (shards share a folder, each its own manifest),
  // then what a killed run of this shard left: a torn manifest line, temporaries.
  fs::create_directories(out);
  const FileLock lock(manifest_lock_path(manifest_path), manifest_path,
                      "the same run is already generating into this folder: wait for it, or give another --out");
  const std::string owner = std::to_string(plan.shard_index) + "-of-" + std::to_string(plan.num_shards);
  if (const int64_t torn = repair_manifest(manifest_path, owner))
    spdlog::warn("{}: moved {} torn line(s) to {}.torn; their images are redone", manifest_path, torn, manifest_path);
  remove_stale_temporaries(out.string(), owner);
  // Read again under the lock: the read above may have raced a run that has finished since.
  const std::map<int64_t, nlohmann::json> resumed = read_manifest(manifest_path);
  check_resume(resumed, plan.images, m.fairness, manifest_path, verifier.settings());

  // 3. What is left to do.
  RunSummary summary;
  summary.manifest_path = manifest_path;
  const std::vector<PlannedImage> todo = images_to_do(plan, resumed, out, &summary);
  if (summary.skipped && !o.quiet) spdlog::info("resuming: {} of {} images already done", summary.skipped, summary.planned);

  // 4. Batch by batch: sample, then PNG and manifest line per image.
  Progress progress(static_cast<int64_t>(todo.size()), o.quiet);
  for (size_t begin = 0; begin < todo.size();) {
    const size_t end = batch_end(todo, begin, o.batch_size);
    const std::vector<PlannedImage> batch(todo.begin() + static_cast<long>(begin), todo.begin() + static_cast<long>(end));
    const auto t0 = std::chrono::steady_clock::now();
    const auto on_step = [&](const StepProgress& p) { progress.step(summary.generated, p.step, p.steps, p.seconds); };
    std::vector<Made> made = make_attempt(m, o, verifier, batch, 0, on_step);
    if (verifier.on()) verify_batch(m, o, verifier, batch, made, &summary, on_step);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / static_cast<double>(batch.size());
    for (size_t i = 0; i < batch.size(); ++i) {
      const PlannedImage& img = batch[i];
      nlohmann::json record = made[i].record;
      record["index"] = img.index;
      record["file"] = img.file;
      record["base_seed"] = plan.base_seed;
      write_png((out / img.file).string(), made[i].rgb.data_ptr<uint8_t>(), static_cast<int>(img.width),
                static_cast<int>(img.height),
                {{"parameters", format_infotext(made[i].infotext)}, {"fairdiff", record.dump()}}, owner);
      record["device"] = m.device_name;
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
