// Embedding fairdiff: load a Stable Diffusion model once, generate images in memory,
// optionally steered toward assigned identity groups (Fair Diffusion).
//
//   #include <fairdiff/model.h>
//
//   fairdiff::configure_process(0);                       // threads and allocator: once, at start-up
//   fairdiff::ModelOptions mo;
//   mo.model = "./stable-diffusion-v1-5";
//   fairdiff::Model model = fairdiff::Model::load(mo);    // throws fairdiff::Error (error.h)
//
//   fairdiff::FairnessOptions fo;
//   fo.fairness = {"gender=50:50"};
//   model.set_fairness(fo);                               // edit prompts encoded once
//   auto groups = model.assign_groups(/*n=*/4, /*seed=*/42);  // exact 50:50, shuffled
//
//   std::vector<fairdiff::ImageRequest> batch(4);
//   for (int i = 0; i < 4; ++i) batch[i] = {"a photo of a doctor", "", 42 + i, groups[i]};
//   fairdiff::SamplingSettings s;                         // steps, CFG, size, sampler
//   for (const fairdiff::Image& im : model.generate(batch, s)) {
//     // im.rgb: im.height x im.width x 3 bytes; im.record: JSON of everything that made it
//   }
//
// One batch is one UNet call per step (CFG and every image's edit rows together); an
// image's pixels depend only on its request and the settings, never on its batch.
// Torch-free header (pimpl): an embedder compiles against include/fairdiff alone.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "fairdiff/options.h"

namespace fairdiff {

// attribute -> group, one pair per attribute of the fairness instruction, in its order.
using GroupAssignment = std::vector<std::pair<std::string, std::string>>;

struct ImageRequest {
  std::string prompt, negative_prompt;
  int64_t seed = 0;
  GroupAssignment groups;  // empty: not steered (also when no fairness is set)
  // generate --verify's retries: every edit concept's guidance scale times edit_scale, its
  // warm-up times edit_warmup (rounded down), and the share of latent positions its threshold
  // keeps (1 - threshold) times edit_reach (at most all of them).
  double edit_scale = 1.0, edit_warmup = 1.0, edit_reach = 1.0;
};

struct Image {
  int64_t width = 0, height = 0;
  std::vector<uint8_t> rgb;  // height x width x 3, row-major
  std::string parameters;    // A1111's "parameters" text (what the PNG carries)
  std::string record;        // JSON: prompt, seed, sampler, model, fairness edits, ...
};

struct StepProgress {
  size_t step = 0, steps = 0;   // the step just finished (0-based) of the batch's steps
  int64_t images = 0;           // images in the batch
  double seconds = 0;           // this step's wall time
};
using ProgressCallback = std::function<void(const StepProgress&)>;

// The model the CLI uses when none is given: $FAIRDIFF_MODEL, else the shipped toy model
// (share/fairdiff/models/toy beside the binary or in the install prefix); "" when neither.
std::string default_model();

// Process-wide settings for CPU inference, once, before the first model loads: LibTorch's
// and OpenBLAS's threads (0 = every CPU this process may use), a malloc that keeps freed
// memory for reuse, and LibTorch's CPU allocator: blocks of 1 MiB and more from a region on
// transparent huge pages, where the kernel offers them (fewer, cheaper first touches; it
// reserves address space the size of physical memory, resident only as used). The library
// never changes them on its own.
void configure_process(int threads);

// Adds the CLIP zero-shot classifier ("clip": a transformers CLIPModel folder judges the
// groups of any attribute whose file has classifier_prompts) to the audit's registry
// (fairdiff/audit.h). Call once at start-up; the CLI does.
void register_clip_classifier();

class Model {
 public:
  // Loads and validates every component (BadInput naming the file on any problem).
  static Model load(const ModelOptions& options);
  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;
  ~Model();

  const ModelOptions& options() const;
  std::string name() const;           // the folder or file name, as A1111 records it
  std::string device() const;         // "cpu", "cuda:0"
  int64_t native_width() const;       // the UNet's sample size times the VAE's scale factor
  int64_t native_height() const;

  // Fair Diffusion's instruction (attribute library, targets, edit settings); replaces the
  // previous one. An empty instruction turns steering off.
  void set_fairness(const FairnessOptions& options);
  bool fairness_enabled() const;
  // The groups of n images of one prompt: exact quotas (or independent draws) in a seeded
  // order, as `fairdiff generate` assigns them; deterministic in (seed, prompt_index).
  std::vector<GroupAssignment> assign_groups(int64_t n, int64_t seed, int64_t prompt_index = 0) const;

  // Generates the batch; `on_step` (optional) after every denoising step.
  std::vector<Image> generate(const std::vector<ImageRequest>& batch, const SamplingSettings& settings,
                              const ProgressCallback& on_step = nullptr);

  struct Impl;
  Impl& impl();  // for the library's own job runner (src/run)

 private:
  explicit Model(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace fairdiff
