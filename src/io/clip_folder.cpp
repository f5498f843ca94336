#include "clip_folder.h"

#include "config_json.h"
#include "fs_util.h"

namespace fairdiff {

CLIPFolder load_clip_folder(const std::string& dir, const LoadOptions& options) {
  const std::string hint = "expected a transformers CLIPModel folder (config.json, model.safetensors, "
                           "preprocessor_config.json, vocab.json, merges.txt)";
  if (!is_directory(dir)) throw_bad_input(dir, "CLIP model folder not found", hint);
  for (const char* file : {"config.json", "preprocessor_config.json"})
    if (!is_regular_file(dir + "/" + file)) throw_bad_input(dir, std::string("has no ") + file, hint);
  CLIPFolder clip;
  clip.dir = dir;
  const std::string config_path = dir + "/config.json";
  const CLIPConfig config = CLIPConfig::from_json(read_json_file(config_path), config_path);
  const std::string processor_path = dir + "/preprocessor_config.json";
  clip.processor = CLIPImageProcessorConfig::from_json(read_json_file(processor_path), processor_path);
  clip.tokenizer = load_tokenizer(dir);
  if (clip.tokenizer->max_id() >= config.text_config.vocab_size)
    throw_bad_input(dir, "the tokenizer has ids up to " + std::to_string(clip.tokenizer->max_id()) +
                             " but text_config.vocab_size is " + std::to_string(config.text_config.vocab_size),
                    "the tokenizer files and config.json come from different models");
  clip.model = leaf::built_for_load<CLIPModel>(config);  // every parameter comes from the file, below
  const auto weights = std::make_shared<const SafeTensors>(component_weights(dir, "model"));
  clip.mapped = MappedWeights(weights, load_state_dict(*clip.model, weights, "CLIP model", options.dtype, options.device));
  clip.mapped.prefault_all();
  clip.model->eval();
  return clip;
}

}  // namespace fairdiff
