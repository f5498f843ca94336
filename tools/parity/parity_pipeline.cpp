// Parity ops `sd_pipeline` and `cpu_randn`: the whole StableDiffusionPipeline call
// (prompt encoding, noise, every scheduler step, VAE decode) against the reference.
#include <ATen/CPUGeneratorImpl.h>

#include <map>

#include "model_folder.h"
#include "parity.h"
#include "parity_pipeline.h"
#include "pipeline.h"

namespace fairdiff::parity {
namespace {

std::string string_param(const ParityCase& c, const std::string& key) {
  const auto it = c.params().find(key);
  return it == c.params().end() || it->is_null() ? std::string() : it->get<std::string>();
}

void sd_pipeline(ParityCase& c) {
  StableDiffusionModel& model = model_for(c);
  StableDiffusionPipeline pipe(model);
  const double guidance = c.params().at("guidance_scale").get<double>();
  const int64_t steps = c.params().at("num_inference_steps").get<int64_t>();
  const int64_t height = c.params().at("height").get<int64_t>(), width = c.params().at("width").get<int64_t>();
  const int64_t clip_skip = c.params().value("clip_skip", nlohmann::json(0)).is_null()
                                ? 0 : c.params().value("clip_skip", int64_t{0});

  std::vector<at::Generator> generators;
  at::Tensor noise;
  if (c.has_input("latents")) {
    noise = c.input("latents").to(pipe.device(), pipe.dtype());
  } else {
    noise = pipe.initial_noise({c.params().at("generator_seed").get<int64_t>()}, height, width, &generators);
  }
  const int64_t B = noise.size(0);
  const std::vector<std::string> prompts(B, string_param(c, "prompt"));
  const std::vector<std::string> negatives(B, string_param(c, "negative_prompt"));
  const PromptEmbeddings emb = pipe.encode_prompts(prompts, negatives, clip_skip, guidance > 1.0);

  auto scheduler = scheduler_for(c);
  scheduler->set_timesteps(steps);
  std::vector<at::Tensor> step_latents;
  const at::Tensor latents = pipe.denoise(*scheduler, noise, emb, guidance, generators.empty() ? nullptr : &generators,
                                          [&](size_t, size_t, const at::Tensor& x) { step_latents.push_back(x); });
  const at::Tensor decoded = pipe.decode(latents);
  if (c.has_output("prompt_embeds")) c.check("prompt_embeds", emb.cond.context);
  if (c.has_output("negative_prompt_embeds") && emb.uncond.defined()) c.check("negative_prompt_embeds", emb.uncond.context);
  if (c.has_output("step_latents")) c.check("step_latents", at::stack(step_latents));
  c.check("latents", latents);
  if (c.has_output("decoded")) c.check("decoded", decoded);
  c.check("image", StableDiffusionPipeline::to_image(decoded));
}

void cpu_randn(ParityCase& c) {
  const auto& tensors = c.params().at("tensors");
  for (auto it = tensors.begin(); it != tensors.end(); ++it) {
    const std::string key = it.key();  // "out.seed0_1x4x8x8"
    at::Generator gen = at::detail::createCPUGenerator(it.value().at("seed").get<uint64_t>());
    const auto shape = it.value().at("shape").get<std::vector<int64_t>>();
    const at::Tensor draw = at::randn(shape, gen, at::TensorOptions(at::kFloat));
    // Outputs are named by the part after "out." in the manifest.
    for (const auto& name : c.output_names())
      if (c.spec()["outputs"][name].value("key", std::string()) == key) c.check(name, draw);
  }
}

}  // namespace

StableDiffusionModel& model_for(const ParityCase& c) {
  static std::map<std::string, StableDiffusionModel> cache;
  const std::string dir = c.model_dir();
  auto it = cache.find(dir);
  if (it == cache.end()) {
    LoadOptions lo{c.options().dtype, c.options().device};
    lo.prepack_convolutions = c.options().prepack;
    it = cache.emplace(dir, load_model_folder(dir, lo)).first;
  }
  return it->second;
}

std::unique_ptr<Scheduler> scheduler_for(const ParityCase& c) {
  const auto& s = c.params().at("scheduler");
  nlohmann::json config = s.at("config");
  config["_class_name"] = s.at("class");
  return make_scheduler(config, "", c.name() + " params.scheduler");
}

void register_pipeline_ops(OpRegistry& registry) {
  registry["sd_pipeline"] = sd_pipeline;
  registry["cpu_randn"] = cpu_randn;
}

}  // namespace fairdiff::parity
