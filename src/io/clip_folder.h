// A transformers CLIPModel folder, as CLIPModel.save_pretrained and CLIPProcessor.save_pretrained
// write it (the layout of openai/clip-vit-large-patch14 on the Hugging Face hub):
//
//   config.json                  model_type "clip", text_config / vision_config
//   model.safetensors            text_model.*, vision_model.*, text_projection, visual_projection, logit_scale
//   preprocessor_config.json     CLIPImageProcessor
//   vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
//
//   CLIPFolder clip = load_clip_folder("models/toy-clip", {});
#pragma once

#include <memory>
#include <string>

#include "clip_image_processor.h"
#include "clip_model.h"
#include "model_folder.h"
#include "tokenizer.h"

namespace fairdiff {

struct CLIPFolder {
  std::string dir;
  CLIPModel model{nullptr};
  std::unique_ptr<Tokenizer> tokenizer;
  CLIPImageProcessorConfig processor;
  MappedWeights mapped;  // the weights that alias model.safetensors
};

// Strict, as for the diffusion networks: a missing file, an unsupported config value, or a
// missing, unexpected or misshapen tensor is a BadInput error naming the file.
CLIPFolder load_clip_folder(const std::string& dir, const LoadOptions& options);

}  // namespace fairdiff
