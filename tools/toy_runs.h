// The runs of the toy-model tools (fairness-bench, dtype-error): one prompt, N images
// from consecutive seeds, quiet, into a folder of their own.
#pragma once

#include <cstdint>
#include <string>

#include "fairdiff/generate.h"

namespace fairdiff::tools {

// The settings every run of a tool shares; each tool has its own defaults.
struct ToyRunSettings {
  std::string model;
  int64_t images = 0, steps = 0, batch = 0, seed = 0;
  int threads = 1;  // process-wide: configure_process, once, before the first run
};

// The options of one run: `prompt`, guided by `fairness` ("" = unguided), written to `dir`.
// The caller sets what differs between its runs (CFG, dtype, fairness mode).
inline GenerateOptions toy_run(const ToyRunSettings& s, const std::string& prompt, const std::string& fairness,
                               const std::string& dir) {
  GenerateOptions g;
  g.model = s.model;
  g.prompt = prompt;
  g.images_per_prompt = s.images;
  g.batch_size = s.batch;
  g.steps = s.steps;
  g.seed = s.seed;
  g.out_dir = dir;
  g.quiet = true;
  if (!fairness.empty()) g.fairness = {fairness};
  return g;
}

}  // namespace fairdiff::tools
