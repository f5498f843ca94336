// fairdiff-parity: runs the golden cases of ../shared/fixtures against our code.
//
// Each manifest.json lists cases {name, op, model, file, inputs, params, outputs};
// an op handler computes the outputs from the inputs and hands them to
// `ParityCase::check`, which compares them with the reference element-wise:
// |actual - expected| <= atol + rtol * |expected|, or bit-exactly for outputs
// marked "exact".
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "safetensors.h"

namespace fairdiff::parity {

struct RunOptions {
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;  // model dtype; tolerances scale for half precision
  bool strict_ftfy = false;
  bool verbose = false;
  bool prepack = false;  // convolutions prepacked (LoadOptions::prepack_convolutions) in every network
};

struct OutputResult {
  std::string output;
  double max_abs_err = 0;   // max |actual - expected|
  double worst_ratio = 0;   // max |actual - expected| / (atol + rtol |expected|); <= 1 passes
  double atol = 0, rtol = 0;
  bool exact = false;
  bool pass = false;
  std::string detail;       // where the worst element is and the first values, when failing
};

class ParityCase {
 public:
  ParityCase(std::string fixtures_root, std::string group_dir, nlohmann::json spec, const RunOptions& options);

  const std::string& name() const { return name_; }
  const std::string& op() const { return op_; }
  const nlohmann::json& spec() const { return spec_; }
  const nlohmann::json& params() const { return params_; }
  const RunOptions& options() const { return options_; }
  std::string model_dir() const;                 // fixtures_root / spec.model
  std::string fixtures_path(const std::string& relative) const;

  bool has_input(const std::string& input) const;
  at::Tensor input(const std::string& input) const;      // spec.inputs[input] -> tensor key (CPU)
  at::Tensor tensor(const std::string& key) const;       // a tensor of the case file by key (CPU)
  bool has_output(const std::string& output) const;
  at::Tensor expected(const std::string& output) const;  // spec.outputs[output].key (CPU)
  std::vector<std::string> output_names() const;

  // Compares `actual` (any device/dtype) with the expected output and records it.
  void check(const std::string& output, const at::Tensor& actual);
  // Records a failure that is not a tensor comparison (wrong count, exception).
  void fail(const std::string& output, const std::string& why);
  // Records an informational line (e.g. "140/152 ftfy prompts match").
  void note(const std::string& text) { notes_.push_back(text); }

  const std::vector<OutputResult>& results() const { return results_; }
  const std::vector<std::string>& notes() const { return notes_; }
  // A case that checks nothing is a failure, so a handler cannot pass by omission.
  bool passed() const;
  // Marks failures as informational (counted as passed) for non-strict ftfy cases.
  void set_informational(bool on) { informational_ = on; }
  bool informational() const { return informational_; }

 private:
  std::string root_, group_dir_, name_, op_;
  nlohmann::json spec_, params_;
  RunOptions options_;
  std::unique_ptr<SafeTensors> file_;
  std::vector<OutputResult> results_;
  std::vector<std::string> notes_;
  bool informational_ = false;
};

using OpHandler = std::function<void(ParityCase&)>;
using OpRegistry = std::map<std::string, OpHandler>;

// Each file of handlers adds its ops (ops not registered are reported as "not supported yet").
void register_model_ops(OpRegistry& registry);      // text_encoder_forward (+ the two below)
void register_unet_vae_ops(OpRegistry& registry);   // unet_forward, vae_decode, vae_encode
void register_tokenizer_ops(OpRegistry& registry);  // tokenize
void register_pipeline_ops(OpRegistry& registry);   // sd_pipeline, cpu_randn
void register_sega_ops(OpRegistry& registry);       // sega_pipeline
void register_clip_ops(OpRegistry& registry);       // clip_image_embeds, clip_text_embeds, clip_preprocess, clip_zero_shot
void register_sdxl_ops(OpRegistry& registry);       // sdxl_text_encode, unet_forward_sdxl, sdxl_pipeline

// A UNet case's timestep: in.timestep [B], else params.timestep with its JSON type
// (int -> int64, float -> float64), as the reference's UNet sees it.
at::Tensor case_timestep(const ParityCase& c);

// Builds our modules from the real SD configs in fixtures/keysets and compares
// every parameter name and shape; returns false on any mismatch.
bool run_keysets(const std::string& keysets_dir, bool verbose);

}  // namespace fairdiff::parity
