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
#include "fairdiff/error.h"
#include "fairdiff/generate.h"
#include "file_lock.h"
#include "fs_util.h"
#include "model_impl.h"
#include "png_io.h"
#include "run_plan.h"

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

}  // namespace

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
  check_resume(done, plan.images, m.fairness, manifest_path);  // never mix two runs' images in one folder
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
  check_resume(resumed, plan.images, m.fairness, manifest_path);

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
    std::vector<ImageRequest> requests;
    for (const PlannedImage& img : batch) requests.push_back({img.prompt, img.negative_prompt, img.seed, img.groups});
    const GeneratedBatch g = m.generate(requests, sampling_settings(o, batch.front()), [&](const StepProgress& p) {
      progress.step(summary.generated, p.step, p.steps, p.seconds);
    });
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / static_cast<double>(batch.size());
    for (size_t i = 0; i < batch.size(); ++i) {
      const PlannedImage& img = batch[i];
      nlohmann::json record = g.records[i];
      record["index"] = img.index;
      record["file"] = img.file;
      record["base_seed"] = plan.base_seed;
      const at::Tensor rgb = g.pixels[static_cast<int64_t>(i)].contiguous();  // [H, W, 3] uint8
      write_png((out / img.file).string(), rgb.data_ptr<uint8_t>(), static_cast<int>(img.width),
                static_cast<int>(img.height), {{"parameters", format_infotext(g.infotexts[i])}, {"fairdiff", record.dump()}},
                owner);
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
