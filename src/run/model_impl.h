// Model::Impl: a loaded model, its pipeline and Fair Diffusion's edit concepts, shared by
// the embedding API (model.cpp) and the job runner (generate.cpp). LibTorch inside.
#pragma once

#include <ATen/ATen.h>

#include <future>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "fairdiff/generate.h"
#include "fairdiff/model.h"
#include "fairness.h"
#include "infotext.h"
#include "pipeline.h"
#include "semantic_guidance.h"

namespace fairdiff {

// Fair Diffusion's edit concepts: every group's edit prompts, one conditioning row each.
struct FairEdits {
  std::vector<std::string> prompts;                     // row r of the table: prompts[r]
  std::vector<std::vector<std::vector<int64_t>>> rows;  // [attribute][group] -> rows
  std::vector<std::pair<size_t, size_t>> owner;         // row -> (attribute, group)
};

// One batch as generated: per image the A1111 text, the record, and the pixels.
struct GeneratedBatch {
  std::vector<Infotext> infotexts;
  std::vector<nlohmann::json> records;  // everything but the job's index, file and base_seed
  at::Tensor pixels;                    // [B, H, W, 3] uint8 on the CPU
};

struct Model::Impl {
  ModelOptions options;
  StableDiffusionModel sd;
  std::unique_ptr<StableDiffusionPipeline> pipe;
  std::string name, device_name;
  int64_t native_width = 0, native_height = 0;

  FairnessOptions fairness_options;
  FairnessSpec fairness;
  FairEdits edits;
  Conditioning edit_table;  // encoded on first use, on the UNet's device and dtype

  std::set<std::string> warned_truncated;

  // Before a run writes anything: --clip-skip against the text encoder's layers, and on
  // the CPU the activations of its largest batch against the available memory (BadInput).
  void check_run(const std::vector<PlannedImage>& images, const GenerateOptions& options) const;
  // The A1111 "Model hash": the first 10 hex digits of the weights' SHA-256. start_model_hash
  // (at load) looks it up in the hash cache (hash_cache.h) or computes it on a thread of its
  // own, beside the denoising; model_hash waits for it where the first image is written.
  void start_model_hash();
  const std::string& model_hash();
  // Checks the batch against the settings and the fairness instruction (BadInput), then
  // samples it: one UNet call per step for CFG and every image's edit rows.
  GeneratedBatch generate(const std::vector<ImageRequest>& batch, const SamplingSettings& settings,
                          const ProgressCallback& on_step);

 private:
  std::future<std::string> hash_job_;
  std::string hash_;
};

}  // namespace fairdiff
