// The settings shared by the embedding API (model.h) and the job API (generate.h).
// Torch-free; defaults are the reference's (diffusers) or stable-diffusion.cpp's.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fairdiff {

// Which model, on which device, in which precision. Fixed when the model is loaded.
struct ModelOptions {
  std::string model;            // diffusers folder or single-file .safetensors ("" = default_model())
  std::string tokenizer_dir;    // for single-file checkpoints (a diffusers tokenizer/ folder)
  std::string prediction_type;  // override for single-file SD 2.x: epsilon | v_prediction
  // auto | fp32 | fp16 (CUDA) | bf16. auto: bf16 on a CPU with native bfloat16 (AVX512-BF16
  // or AMX), where it ran 1.6-2.2x faster than fp32 (README, Performance); fp32 on other
  // CPUs and on CUDA. Records and manifests name the dtype it resolved to.
  std::string dtype = "auto";
  std::string device = "auto";  // auto | cpu | cuda | cuda:N
  // VAE decode in overlapping tiles (diffusers' enable_tiling): for images larger than the
  // tile, the decoder's memory is one tile's. 0 = off; -1 = the VAE's sample_size (512 for
  // SD 1.5); else the tile in image pixels, a multiple of 8 (the VAE's scale factor) of at
  // least 32.
  int64_t vae_tile = 0;
  // CPU: every convolution weight reordered once into oneDNN's layout at load (faster steps,
  // slower load; see LoadOptions::prepack_convolutions). Images agree with a plain run to
  // float rounding (within one level on the tiny test model), not always bit for bit.
  bool prepack_weights = false;
  // CPU, float32: the linear and convolution weights (all but a few MB of SD's) are kept in
  // float16 and each converted to float32 when its layer runs: half the memory, slower
  // steps, images within the bound README "Performance" gives. Needs --dtype fp32 (or auto,
  // which it then resolves to fp32); not with prepack_weights. Recorded as weight_dtype.
  bool fp16_weights = false;
  // CPU: weights converted at load (a dtype other than the files', as bf16 from float32
  // files) are kept on disk in the weights cache ($FAIRDIFF_CACHE_DIR or ~/.cache/fairdiff,
  // weights/; at most $FAIRDIFF_WEIGHTS_CACHE_GB, default 16) and mapped from there by later
  // loads instead of converted again: the same numbers, a faster start. false: neither read
  // nor written.
  bool weights_cache = true;
};

// How one batch of images is sampled: every image of a batch shares these.
struct SamplingSettings {
  int64_t steps = 50;
  double cfg_scale = 7.5;
  int64_t width = 0, height = 0;  // 0 = the model's native size
  int64_t clip_skip = 0;          // diffusers' meaning: layers skipped from the end (A1111 "Clip skip" - 1)
  std::string sampling_method;    // "" = the model's scheduler; pndm, ddim, euler, euler_a, dpm++2m, lms
  std::string scheduler;          // "" / discrete or karras
  // SDXL size conditioning (diffusers' original_size, crops_coords_top_left, target_size),
  // as given: "WxH", "TOP,LEFT" and "WxH" in pixels; "" = the reference's default (the
  // output size; 0,0). Refused for a model without size conditioning.
  std::string original_size, crop_top_left, target_size;
  // SDXL with force_zeros_for_empty_prompt: an empty negative prompt gives zero embeddings
  // (diffusers' negative_prompt=None), unless this is set: then "" is encoded as text
  // (negative_prompt=""). The CLI sets it when -n "" is given explicitly.
  bool encode_empty_negative = false;
};

// Fair Diffusion's instruction: which attributes to balance and toward which shares.
struct FairnessOptions {
  std::vector<std::string> fairness;  // "gender=50:50", "gender=female:30,male:70"; one per attribute
  std::string fairness_file;          // JSON {"attributes": [{"name", "targets", ...}], "joint": ...}
  std::string attributes_dir;         // attribute library ("" = configs/attributes found at run time)
  std::string assignment = "quota";   // quota (exact counts per prompt, shuffled) | random (independent draws)
  // exact: the assigned group's concepts forward, every other group's reversed (2 + groups
  // UNet rows per image); fast: the assigned group's concepts only (3 rows per image).
  std::string fairness_mode = "exact";
};

}  // namespace fairdiff
