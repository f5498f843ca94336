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

struct GenerateOptions {
  std::string model;            // diffusers folder or single-file .safetensors
  std::string tokenizer_dir;    // for single-file checkpoints (a diffusers tokenizer/ folder)
  std::string prediction_type;  // override for single-file SD 2.x: epsilon | v_prediction
  std::string prompt;           // -p; or prompts_file
  std::string negative_prompt;  // -n
  std::string prompts_file;     // one prompt per line, or JSONL objects with overrides
  int64_t images_per_prompt = 1;  // -N
  int64_t batch_size = 1;         // images per UNet call
  int64_t steps = 50;
  double cfg_scale = 7.5;
  std::string sampling_method;  // "" = the model's scheduler; pndm, ddim, euler, euler_a, dpm++2m, lms
  std::string scheduler;        // "" / discrete or karras
  int64_t width = 0, height = 0;  // 0 = the model's native size
  int64_t seed = 42;              // -1 = random, recorded
  int64_t clip_skip = 0;          // diffusers' meaning: layers skipped from the end (A1111 "Clip skip" - 1)
  std::string dtype = "fp32";     // fp32 | fp16 | bf16
  std::string device = "auto";    // auto | cpu | cuda | cuda:N
  std::string out_dir = "out";
  int64_t shard_index = -1;       // -1: from the environment (SLURM, Kubernetes, RANK), else unsharded
  int64_t num_shards = 0;
  // VAE decode in overlapping tiles (diffusers' enable_tiling): for images larger than the
  // tile, the decoder's memory is one tile's. 0 = off; -1 = the VAE's sample_size (512 for
  // SD 1.5); else the tile in image pixels: a multiple of 8 (of the VAE's scale factor) of
  // at least 32.
  int64_t vae_tile = 0;
  // CPU: reorder every convolution weight once into oneDNN's layout at load (faster steps,
  // slower load; see LoadOptions::prepack_convolutions). Images agree with a plain run to
  // float rounding (within one level on the tiny test model), not always bit for bit.
  bool prepack_weights = false;
  // Fair Diffusion: each image is assigned an identity group per attribute and steered
  // toward it with semantic guidance. "gender=50:50", "gender=female:30,male:70".
  std::vector<std::string> fairness;  // --fairness, repeatable (one per attribute)
  std::string fairness_file;          // --fairness-file: JSON {"attributes": [{"name", "targets", ...}]}
  std::string attributes_dir;         // --attributes: attribute library ("" = configs/attributes found at run time)
  std::string assignment = "quota";   // quota (exact counts per prompt, shuffled) | random (independent draws)
  // exact: Fair Diffusion as published (the assigned group's concepts forward, every other
  // group's reversed: 2 + groups UNet rows per image); fast: the assigned group's concepts
  // only (3 rows per image for any number of groups), opt-in, measured by fairness-bench.
  std::string fairness_mode = "exact";
  bool quiet = false;
};

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

// The plan: prompts (file or flag) x images_per_prompt; image k of prompt p gets
// seed (prompt seed or base seed + k over the whole run) and its settings.
// `native_width/height` fill in 0 sizes (the model's native size).
RunPlan plan_run(const GenerateOptions& options, int64_t native_width, int64_t native_height);

struct RunSummary {
  int64_t planned = 0, skipped = 0, generated = 0;
  std::string manifest_path;
};

// Loads the model, plans, skips what the manifest already has, generates the
// rest. Throws fairdiff::Error (BadInput before any file is written).
RunSummary generate(GenerateOptions options);

// Joins the shard manifests of `out_dir` into manifest.jsonl (sorted by index);
// throws when two shards claim one image or an image's file is missing.
int64_t merge_manifests(const std::string& out_dir);

}  // namespace fairdiff
