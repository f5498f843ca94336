#include "fairdiff/inspect.h"

#include "model_folder.h"
#include "safetensors.h"

namespace fairdiff {
namespace {

ComponentSummary summarize(const ModelIndex& index, const std::string& name, torch::nn::Module& module,
                           const std::string& weights) {
  ComponentSummary s;
  s.name = name;
  s.class_name = index.components.at(name).second;
  s.weights = weights;
  s.tensors = static_cast<int64_t>(module.named_parameters().size() + module.named_buffers().size());
  s.parameters = parameter_count(module);
  return s;
}

}  // namespace

ModelSummary inspect_model(const std::string& model_dir) {
  StableDiffusionModel m = load_model_folder(model_dir, LoadOptions{});
  ModelSummary s;
  s.dir = model_dir;
  s.class_name = m.index.class_name;
  auto tokenizer = [&](const std::string& name, const Tokenizer& t) {
    ComponentSummary tok;
    tok.name = name;
    tok.class_name = m.index.components.at(name).second;
    tok.detail = "max length " + std::to_string(t.model_max_length());
    s.components.push_back(tok);
  };
  tokenizer("tokenizer", *m.tokenizer);
  s.components.push_back(summarize(m.index, "text_encoder", *m.text_encoder,
                                   model_weights(model_dir, "text_encoder")));
  if (m.xl()) {  // SDXL's second tokenizer and encoder
    tokenizer("tokenizer_2", *m.tokenizer_2);
    s.components.push_back(summarize(m.index, "text_encoder_2", *m.text_encoder_2,
                                     model_weights(model_dir, "text_encoder_2")));
  }
  s.components.push_back(summarize(m.index, "unet", *m.unet,
                                   model_weights(model_dir, "unet")));
  s.components.push_back(summarize(m.index, "vae", *m.vae,
                                   model_weights(model_dir, "vae")));
  ComponentSummary sched;
  sched.name = "scheduler";
  sched.class_name = m.index.components.at("scheduler").second;
  s.components.push_back(sched);
  return s;
}

std::vector<TensorSummary> inspect_safetensors(const std::string& path) {
  const SafeTensors st(path);
  std::vector<TensorSummary> out;
  for (const auto& t : st.tensors()) out.push_back({t.name, dtype_name(t.dtype), t.shape, t.numel()});
  return out;
}

}  // namespace fairdiff
