// Original single-file Stable Diffusion checkpoints (CompVis / Stability "LDM" layout).
//
// Model hubs distribute SD 1.x / 2.x as ONE .safetensors file whose tensor names are
// those of the original training code: model.diffusion_model.* (UNet),
// first_stage_model.* (VAE), cond_stage_model.transformer.* (SD 1.x CLIP text model) or
// cond_stage_model.model.* (SD 2.x OpenCLIP text tower). This file reads such a file as
// a model: it infers the family and every config value the tensor shapes tell, maps
// each checkpoint tensor to its diffusers / transformers name (one table, in
// single_file.cpp), and loads the three networks with the tokenizer the user names.
//
//   fairdiff::StableDiffusionModel m = fairdiff::load_single_file(
//       "v1-5-pruned-emaonly.safetensors", "models/sd15/tokenizer", fairdiff::LoadOptions{});
//
//   // Planning alone (torch-free): names and shapes in, configs and a mapping out.
//   fairdiff::SingleFilePlan plan = fairdiff::plan_single_file(shapes, "model.safetensors");
//   plan.unet_config["block_out_channels"];      // [320, 640, 1280, 1280]
//   plan.tensors[0];                             // {"unet", "conv_in.weight", "model.diffusion_model...", Copy}
//
// Pickle checkpoints (.ckpt, .pt, .pth, .bin) are refused: unpickling can execute code.
//
// Torch-free: load_single_file is declared with forward-declared types; include
// model_folder.h to call it.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

namespace fairdiff {

struct LoadOptions;
struct StableDiffusionModel;

enum class SdFamily {
  SD1,  // CLIP ViT-L/14 text encoder (cond_stage_model.transformer.*), conv projections in the UNet
  SD2,  // OpenCLIP ViT-H/14 text tower (cond_stage_model.model.*), linear projections in the UNet
};

const char* family_name(SdFamily family);  // "SD 1.x", "SD 2.x"

// How one target tensor is made from its checkpoint tensor (always a view, never a sum).
enum class Transform {
  Copy,            // same shape
  SqueezeConv1x1,  // [O, I, 1, 1] 1x1-conv weight -> [O, I] linear weight (VAE mid-block attention)
  Rows,            // rows [part * n, (part + 1) * n) of dim 0, n = rows / parts (fused in_proj -> q, k, v)
};

const char* transform_name(Transform transform);  // "copy", "squeeze_conv1x1", "rows"

struct PlannedTensor {
  std::string component;  // "text_encoder", "unet" or "vae"
  std::string target;     // state-dict name inside that component (diffusers / transformers)
  std::string source;     // tensor name in the checkpoint
  Transform transform = Transform::Copy;
  int64_t part = 0, parts = 1;        // for Transform::Rows
  std::vector<int64_t> source_shape;  // as stored
  std::vector<int64_t> shape;         // after the transform: the target's shape
};

struct SingleFilePlan {
  SdFamily family = SdFamily::SD1;
  std::string text_encoder_layout;  // which of the known text-encoder layouts the file uses
  // config.json objects, as the diffusers / transformers folder of this model would hold them.
  nlohmann::json text_encoder_config, unet_config, vae_config, scheduler_config;
  std::vector<PlannedTensor> tensors;  // every target tensor of the three components, once
  std::vector<std::string> ignored;    // checkpoint tensors left out on purpose (EMA copy, schedule buffers, ...)
};

struct SingleFileOptions {
  // The scheduler's prediction_type: "epsilon", "v_prediction" or "sample"; empty = the
  // family's default (SD 1.x: epsilon; SD 2.x: v_prediction, as the reference assumes for
  // every SD 2.x file: 512-base checkpoints need "epsilon" here).
  std::string prediction_type;
  // Values the shapes cannot tell (sample_size, head counts of unusual models, ...):
  // {"unet": {...}, "vae": {...}, "text_encoder": {...}, "scheduler": {...}}, each merged
  // over the inferred config (JSON merge patch) before anything is built.
  nlohmann::json config_overrides = nlohmann::json::object();
};

using TensorShapes = std::vector<std::pair<std::string, std::vector<int64_t>>>;

// Infers the family and configs from `tensors` (name, shape) and maps every target tensor
// to its source. `where` (the file) names the checkpoint in errors. Throws a BadInput error
// listing the first few checkpoint tensors that map to nothing and the first few expected
// tensors that are missing; Unsupported for SDXL, inpainting and class-conditioned files.
SingleFilePlan plan_single_file(const TensorShapes& tensors, const std::string& where,
                                const SingleFileOptions& options = {});

// Throws Unsupported for a pickle checkpoint (by extension or by its first bytes), BadInput
// when `path` is not a regular file. Torch-free; load_single_file calls it first.
void refuse_pickle_checkpoint(const std::string& path);

// Loads a single-file checkpoint as a model: the networks are built from the inferred
// configs and filled from the memory-mapped file, one copy per tensor straight to
// options.dtype / options.device. The tokenizer comes from `tokenizer_dir` (a diffusers
// tokenizer folder: vocab.json, merges.txt, ...), as single files carry none.
StableDiffusionModel load_single_file(const std::string& checkpoint, const std::string& tokenizer_dir,
                                      const LoadOptions& options, const SingleFileOptions& single = {});

}  // namespace fairdiff
