// Parity ops of the sdxl/ group: sdxl_text_encode (both tokenizers and encoders, the pooled
// embedding), unet_forward_sdxl (text_time conditioning) and sdxl_pipeline (the whole
// StableDiffusionXLPipeline call). The model folder is loaded once through the library's
// loader, so these cases also cover model_index.json, text_encoder_2/ and tokenizer_2/.
#include <c10/core/InferenceMode.h>

#include <string>
#include <vector>

#include "model_folder.h"
#include "parity.h"
#include "parity_pipeline.h"
#include "pipeline.h"

namespace fairdiff::parity {
namespace {

at::Tensor model_input(const ParityCase& c, const std::string& name) {
  return c.input(name).to(c.options().device, c.options().dtype);
}

std::vector<std::string> prompt_list(const nlohmann::json& v) {
  if (v.is_array()) return v.get<std::vector<std::string>>();
  return {v.get<std::string>()};
}

void sdxl_text_encode(ParityCase& c) {
  c10::InferenceMode inference;
  StableDiffusionModel& model = model_for(c);
  StableDiffusionPipeline pipe(model);
  const std::vector<std::string> prompts = prompt_list(c.params().at("prompts"));
  // The ids both tokenizers give (exact), then everything from the case's own ids.
  if (c.has_output("input_ids_1")) c.check("input_ids_1", clip_token_ids(*model.tokenizer, prompts, true, nullptr));
  if (c.has_output("input_ids_2")) c.check("input_ids_2", clip_token_ids(*model.tokenizer_2, prompts, true, nullptr));
  const at::Tensor ids_1 = c.input("input_ids_1").to(c.options().device);
  const at::Tensor ids_2 = c.input("input_ids_2").to(c.options().device);
  const CLIPTextOutput te1 = model.text_encoder->forward(ids_1);
  const CLIPTextOutput te2 = model.text_encoder_2->forward(ids_2);
  c.check("te1_penultimate_hidden_state", te1.hidden_states[te1.hidden_states.size() - 2]);
  c.check("te2_penultimate_hidden_state", te2.hidden_states[te2.hidden_states.size() - 2]);
  c.check("te1_last_hidden_state", te1.last_hidden_state);
  c.check("te2_last_hidden_state", te2.last_hidden_state);
  // The conditioner (what the pipeline runs), from the prompts.
  const PromptEmbeddings e = pipe.encode_prompts(prompts, {}, 0, false);
  c.check("prompt_embeds", e.cond.context);
  c.check("pooled_prompt_embeds", e.cond.pooled);
  if (c.has_output("prompt_embeds_clip_skip1")) {
    const PromptEmbeddings skipped = pipe.encode_prompts(prompts, {}, 1, false);
    c.check("prompt_embeds_clip_skip1", skipped.cond.context);
    c.check("pooled_prompt_embeds", skipped.cond.pooled);  // clip skip never touches the pooled embedding
  }
}

void unet_forward_sdxl(ParityCase& c) {
  c10::InferenceMode inference;
  StableDiffusionModel& model = model_for(c);
  Conditioning cond(model_input(c, "encoder_hidden_states"));
  cond.pooled = model_input(c, "text_embeds");
  cond.time_ids = c.input("time_ids").to(c.options().device);
  model.use("unet");
  c.check("sample", model.unet->forward(model_input(c, "sample"), case_timestep(c), cond));
}

void sdxl_pipeline(ParityCase& c) {
  c10::InferenceMode inference;
  StableDiffusionModel& model = model_for(c);
  StableDiffusionPipeline pipe(model);
  const nlohmann::json& p = c.params();
  const double guidance = p.at("guidance_scale").get<double>();
  const int64_t steps = p.at("num_inference_steps").get<int64_t>();
  const at::Tensor noise = model_input(c, "latents");
  const int64_t B = noise.size(0);
  std::vector<std::string> prompts = prompt_list(p.at("prompt"));
  if (prompts.size() == 1) prompts.assign(static_cast<size_t>(B), prompts.front());
  // negative_prompt null: none given (zeros under force_zeros_for_empty_prompt); "": the text.
  const bool none = p.at("negative_prompt").is_null();
  std::vector<std::string> negatives(static_cast<size_t>(B));
  if (!none) {
    negatives = prompt_list(p.at("negative_prompt"));
    if (negatives.size() == 1) negatives.assign(static_cast<size_t>(B), negatives.front());
  }
  if (p.value("force_zeros_for_empty_prompt", true) != model.index.force_zeros_for_empty_prompt)
    c.note("params.force_zeros_for_empty_prompt differs from model_index.json; using the folder's");
  pipe.conditioner().empty_negative_is_none = none;
  PromptEmbeddings emb = pipe.encode_prompts(prompts, negatives, 0, guidance > 1.0);
  pipe.conditioner().empty_negative_is_none = true;

  SizeConditioning size;
  const auto orig = p.at("original_size").get<std::vector<int64_t>>();
  const auto crop = p.at("crops_coords_top_left").get<std::vector<int64_t>>();
  const auto target = p.at("target_size").get<std::vector<int64_t>>();
  size.original_height = orig.at(0), size.original_width = orig.at(1);
  size.crop_top = crop.at(0), size.crop_left = crop.at(1);
  size.target_height = target.at(0), size.target_width = target.at(1);
  pipe.condition_on_size(emb, size);

  auto scheduler = scheduler_for(c);
  scheduler->set_timesteps(steps);
  std::vector<at::Tensor> step_latents;
  const at::Tensor latents = pipe.denoise(*scheduler, noise, emb, guidance, nullptr,
                                          [&](size_t, size_t, const at::Tensor& x) { step_latents.push_back(x); });
  const at::Tensor decoded = pipe.decode(latents);
  c.check("prompt_embeds", emb.cond.context);
  c.check("pooled_prompt_embeds", emb.cond.pooled);
  if (emb.uncond.defined()) {
    c.check("negative_prompt_embeds", emb.uncond.context);
    c.check("negative_pooled_prompt_embeds", emb.uncond.pooled);
  }
  c.check("add_time_ids", emb.cond.time_ids.narrow(0, 0, 1));
  c.check("step_latents", at::stack(step_latents));
  c.check("latents", latents);
  c.check("decoded", decoded);
  c.check("image", StableDiffusionPipeline::to_image(decoded));
}

}  // namespace

void register_sdxl_ops(OpRegistry& registry) {
  registry["sdxl_text_encode"] = sdxl_text_encode;
  registry["unet_forward_sdxl"] = unet_forward_sdxl;
  registry["sdxl_pipeline"] = sdxl_pipeline;
}

}  // namespace fairdiff::parity
