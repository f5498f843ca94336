// `fairdiff generate`: the run plan (every image's prompt, seed and settings,
// fixed before sharding) and its execution into PNG files + manifest.jsonl.
//
//   fairdiff::GenerateOptions o;
//   o.model = "./stable-diffusion-v1-5";
//   o.prompt = "a photo of a doctor";
//   o.images_per_prompt = 4;
//   o.out_dir = "runs/doctor";
//   fairdiff::validate(o);                       // throws Error(BadInput) before any work
//   fairdiff::RunSummary s = fairdiff::generate(o);
//
// The job API, on top of Model (model.h): a whole run of planned images written to a
// folder, shardable and resumable. Torch-free header: the CLI maps flags to
// GenerateOptions and errors to exit codes. Process-wide settings (threads, allocator)
// are the caller's: configure_process (model.h).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "fairdiff/model.h"

namespace fairdiff {

// A run: the model (ModelOptions), how images are sampled (SamplingSettings, the defaults
// of every prompt), the fairness instruction (FairnessOptions), and the job's own settings.
struct GenerateOptions : ModelOptions, SamplingSettings, FairnessOptions {
  std::string prompt;             // -p; or prompts_file
  std::string negative_prompt;    // -n
  std::string prompts_file;       // one prompt per line, or JSONL objects with overrides
  int64_t images_per_prompt = 1;  // -N
  int64_t batch_size = 1;         // images per UNet call
  int64_t seed = 42;              // -1 = random, recorded
  std::string out_dir = "out";
  int64_t shard_index = -1;       // -1: from the environment (SLURM, Kubernetes, RANK), else unsharded
  int64_t num_shards = 0;
  bool quiet = false;

  // --verify (with --fairness): each decoded image is classified for every attribute it was
  // assigned; one that shows another group (or none) is made again, up to max_retries
  // times, and the first attempt that reaches its groups is kept. Retry k (1..K) uses the
  // seed retry_seed(seed, k) (retry_seed_mode "new") or the same seed ("same"), every
  // edit's guidance scale times retry_edit_scale^k, its warm-up times retry_warmup^k and
  // the share its threshold keeps times retry_reach^k. An image that misses every attempt keeps
  // its first attempt and is recorded as unverified. Deterministic: the same command gives
  // the same bytes for any batch size, shard or resume.
  bool verify = false;
  std::string verify_classifier = "clip";  // a name of the audit's classifier registry
  std::string clip_model;                  // the classifier's model folder (--clip-model)
  double verify_margin = 0;                // below this best-group probability: unclassified, a miss
  int64_t max_retries = 2;
  double retry_edit_scale = 2.0;
  double retry_warmup = 0.5;  // the edit starts earlier: the attribute settles in the first steps
  double retry_reach = 2.0;   // and touches more of the latent (0.95 -> 0.9 -> 0.8)
  std::string retry_seed_mode = "new";
};

// The seed of retry `attempt` (>= 1) of the image planned with `seed`: a 32-bit value mixed
// from both (splitmix64), as A1111 seeds are.
int64_t retry_seed(int64_t seed, int64_t attempt);

// One image of the run, fully determined before anything runs.
struct PlannedImage {
  int64_t index = 0;         // position in the whole (unsharded) run
  int64_t prompt_index = 0;  // which prompt (line) it belongs to
  std::string prompt, negative_prompt;
  int64_t seed = 0;
  int64_t steps = 0;
  double cfg_scale = 0;
  int64_t width = 0, height = 0;
  std::string file;          // file name inside out_dir: "00012-1234.png"
  // With --fairness: attribute -> assigned group, in the order the attributes were given.
  GroupAssignment groups;
};

struct RunPlan {
  std::vector<PlannedImage> images;  // the whole run
  int64_t shard_index = 0, num_shards = 1;
  int64_t base_seed = 0;
  std::string manifest_name;         // "manifest.jsonl" or "manifest-shard-K-of-N.jsonl"
  std::vector<PlannedImage> shard() const;  // this shard's images (index % num_shards == shard_index)
};

// Checks every option that can be checked without the model (exit 2 on failure);
// resolves the shard from the environment; nothing is written.
void validate(GenerateOptions& options);

// The manifest this shard writes in out_dir: "manifest.jsonl", or
// "manifest-shard-K-of-N.jsonl" with shards (validate resolves them first).
std::string manifest_name(const GenerateOptions& options);

// The plan: prompts (file or flag) x images_per_prompt; image k of prompt p gets
// seed (prompt seed or base seed + k over the whole run) and its settings.
// `native_width/height` fill in 0 sizes (the model's native size).
RunPlan plan_run(const GenerateOptions& options, int64_t native_width, int64_t native_height);

struct RunSummary {
  int64_t planned = 0, skipped = 0, generated = 0;
  int64_t retries = 0, verified = 0, unverified = 0;  // --verify: extra attempts made; images reached / missed
  std::string manifest_path;
};

// Loads the model, plans, skips what the manifest already has, generates the
// rest. Throws fairdiff::Error (BadInput before any file is written).
RunSummary generate(GenerateOptions options);

// Joins the shard manifests of `out_dir` into manifest.jsonl (sorted by index);
// throws when two shards claim one image or an image's file is missing.
int64_t merge_manifests(const std::string& out_dir);

}  // namespace fairdiff
