// Stable Diffusion model folders in the Hugging Face diffusers layout:
//
//   model_index.json
//   text_encoder/{config.json, model.safetensors}
//   tokenizer/{vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json}
//   unet/{config.json, diffusion_pytorch_model.safetensors}
//   vae/{config.json, diffusion_pytorch_model.safetensors}
//   scheduler/scheduler_config.json
//
// An SDXL folder (StableDiffusionXLPipeline) adds text_encoder_2/ (CLIPTextModelWithProjection)
// and tokenizer_2/, and model_index.json's force_zeros_for_empty_prompt.
//
// Each component is built from its own config.json and loaded strictly by name.
#pragma once

#include <ATen/ATen.h>

#include <future>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "autoencoder_kl.h"
#include "clip_text_model.h"
#include "tokenizer.h"
#include "tensor_io.h"
#include "unet_2d_condition.h"
#include "weights_cache.h"

namespace fairdiff {

struct LoadOptions {
  at::ScalarType dtype = at::kFloat;  // weights are converted on load (an F16 file loads as F32 and back)
  at::Device device = at::kCPU;
  // Weights that alias their files (CPU, the file's dtype) of the components not in use
  // leave this process's memory (StableDiffusionModel::use): only the running network's
  // weights count in the resident set, and each is mapped in when it first runs (the UNet
  // beside the text encoder), not when loaded. false maps every component in at load and
  // keeps it resident.
  bool page_out_idle = true;
  // CPU inference: every convolution's weight is reordered once into oneDNN's layout
  // (leaf::Conv2d::prepack) and the dense copy let go (its pages of the file dropped);
  // such a model runs on the CPU only. Measured on SD 1.5 (README "Performance"): UNet
  // steps 0-13% faster at 512x512, about 20% at 256x256; load 2.5-3.5 s longer (the reorder);
  // and the conv weights (2.3 GiB) become anonymous memory, which cannot leave the
  // process while the VAE runs. Opt-in (generate --prepack-weights): worth it for long runs.
  bool prepack_convolutions = false;
  // Weights converted at load (a dtype other than the files'; CPU only) are read from this
  // cache when it holds them, else written to it after the load (weights_cache.h). Off (no
  // folder) by default here; generate and the embedding API use default_weights_cache(). Not written
  // when convolutions are prepacked (prepacks_convolutions), which replaces the loaded weights at once.
  WeightsCache weights_cache;
};

struct ModelIndex {
  std::string class_name;  // "StableDiffusionPipeline"
  // component name -> (library, class), e.g. "unet" -> ("diffusers", "UNet2DConditionModel")
  std::map<std::string, std::pair<std::string, std::string>> components;
  bool xl = false;  // StableDiffusionXLPipeline: two text encoders
  // SDXL: a missing negative prompt is zero embeddings (diffusers' default for the pipeline: true).
  bool force_zeros_for_empty_prompt = false;
};

// Reads and validates model_index.json; rejects pipelines we cannot run (SDXL refiners,
// img2img, ...).
ModelIndex read_model_index(const std::string& model_dir);

// The weights file of a component folder: `<name>.safetensors`, else the
// `<name>.fp16.safetensors` variant; a pickle (.bin/.ckpt) only is an error.
std::string component_weights(const std::string& component_dir, const std::string& name);

// The weights file of a network component of a model folder ("text_encoder": model.*,
// "unet" / "vae": diffusion_pytorch_model.*), by component_weights.
std::string model_weights(const std::string& model_dir, const std::string& component);

// `mapped` (optional) receives the weights that alias the file (tensor_io.h); `pending`
// (optional) the converted weights to store in LoadOptions::weights_cache, when it missed.
CLIPTextModel load_text_encoder(const std::string& component_dir, const LoadOptions& options,
                                MappedWeights* mapped = nullptr, std::vector<PendingWeights>* pending = nullptr);
// SDXL's text_encoder_2/ (CLIPTextModelWithProjection).
CLIPTextModelWithProjection load_text_encoder_2(const std::string& component_dir, const LoadOptions& options,
                                                MappedWeights* mapped = nullptr,
                                                std::vector<PendingWeights>* pending = nullptr);
UNet2DConditionModel load_unet(const std::string& component_dir, const LoadOptions& options,
                               MappedWeights* mapped = nullptr, std::vector<PendingWeights>* pending = nullptr);
AutoencoderKL load_vae(const std::string& component_dir, const LoadOptions& options, MappedWeights* mapped = nullptr,
                       std::vector<PendingWeights>* pending = nullptr);

struct StableDiffusionModel {
  std::string dir;
  ModelIndex index;
  std::unique_ptr<Tokenizer> tokenizer;
  CLIPTextModel text_encoder{nullptr};
  // SDXL only (index.xl): the second tokenizer (pads with "!") and text encoder.
  std::unique_ptr<Tokenizer> tokenizer_2;
  CLIPTextModelWithProjection text_encoder_2{nullptr};
  UNet2DConditionModel unet{nullptr};
  AutoencoderKL vae{nullptr};
  nlohmann::json scheduler_config;

  bool xl() const { return static_cast<bool>(text_encoder_2); }

  // Weights that alias their files, by component ("text_encoder", "text_encoder_2", "unet", "vae").
  std::map<std::string, MappedWeights> mapped;
  bool page_out_idle = false;  // LoadOptions::page_out_idle, as loaded
  // Called before running a component: its weights are made resident (one prefault call
  // when they were paged out) and, with page_out_idle, every other component's pages go
  // back to the page cache, and so does the heap memory that the previous component freed
  // (release_free_memory, runtime.h). On an SD 1.5 step at 512x512 this keeps the text
  // encoder's and the VAE's 0.77 GiB out of the UNet's peak, and the UNet's 3.2 GiB out of
  // the VAE's; mapping 3.2 GiB back from the page cache takes about 0.3 s (once per image).
  // Without page_out_idle every component is mapped in when loaded; with it, each when it
  // first runs, and while a text encoder runs, the UNet on a thread of its own (prefetch).
  void use(const std::string& component);
  std::string active;  // the component use() was last called for
  // The component being mapped in beside the running one, and its thread. Declared after
  // `mapped`: destroyed first, so the thread ends before the weights it maps go.
  std::string prefetching;
  std::future<void> prefetch;
  void finish_prefetch();  // waits for the prefetch, if any
  // The weights cache's entries being written (LoadOptions::weights_cache). Declared last:
  // destroyed first, so a model goes only once they are written.
  std::future<void> cache_writes;
};

StableDiffusionModel load_model_folder(const std::string& model_dir, const LoadOptions& options);

// Whether a load with `options` prepacks its convolutions: prepack_convolutions on the CPU, in
// a dtype whose weights oneDNN can reorder here (leaf::onednn_reorders; else every convolution
// would keep its plain weight).
bool prepacks_convolutions(const LoadOptions& options);

// LoadOptions::prepack_convolutions for a loaded model: prepacks the three networks'
// convolutions, forgets their dense weights' mapped pages and prefaults the mapped weights
// that remain. Returns the number prepacked.
int64_t prepack_model(StableDiffusionModel& model);

// ModelOptions::fp16_weights for a model loaded in float32 on the CPU: every linear and
// convolution weight of its networks stored in float16 (leaf::store_weights), the pages of
// the file they were read from dropped. Returns the number stored.
int64_t store_weights_fp16(StableDiffusionModel& model);

// Number of scalar parameters of a module (for reports).
int64_t parameter_count(torch::nn::Module& module);

}  // namespace fairdiff
