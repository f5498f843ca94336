// Parity op `sega_pipeline`: SemanticStableDiffusionPipeline (diffusers) against our
// pipeline + SemanticGuidance, with every per-step internal the fixtures record.
//
// The reference's per-concept arguments apply to every image; here they become one
// identical concept list per image. Our default run skips (image, concept) estimates
// that cannot change the result; when it skipped any, `edit_estimates` is checked on a
// second run that evaluates every estimate, as the reference does.
#include <cstdio>
#include <map>

#include "model_folder.h"
#include "parity.h"
#include "parity_pipeline.h"
#include "pipeline.h"
#include "semantic_guidance.h"

namespace fairdiff::parity {
namespace {

bool present(const nlohmann::json& params, const std::string& key) {
  return params.contains(key) && !params[key].is_null();
}

// A string or a list of strings (null / absent: none).
std::vector<std::string> strings_param(const nlohmann::json& params, const std::string& key) {
  if (!present(params, key)) return {};
  if (params[key].is_string()) return {params[key].get<std::string>()};
  return params[key].get<std::vector<std::string>>();
}

// Concept c's value of a per-concept argument: a scalar for all, or a list indexed by concept.
template <typename T>
T per_concept(const nlohmann::json& params, const std::string& key, size_t c, T fallback) {
  if (!present(params, key)) return fallback;
  const auto& v = params[key];
  return v.is_array() ? v.at(c).get<T>() : v.get<T>();
}

struct SegaRun {
  at::Tensor latents;
  std::vector<at::Tensor> step_latents;
  std::vector<SemanticStepRecord> records;
  int64_t edit_rows = 0;
};

void sega_pipeline(ParityCase& c) {
  const nlohmann::json& p = c.params();
  StableDiffusionModel& model = model_for(c);
  StableDiffusionPipeline pipe(model);
  const double guidance = p.at("guidance_scale").get<double>();
  const int64_t steps = p.at("num_inference_steps").get<int64_t>();

  const at::Tensor noise = c.input("latents").to(pipe.device(), pipe.dtype());  // [B, C, h, w]
  const int64_t B = noise.size(0);
  std::vector<std::string> prompts = strings_param(p, "prompt");
  if (prompts.size() == 1) prompts.assign(static_cast<size_t>(B), prompts.front());
  std::vector<std::string> negatives = strings_param(p, "negative_prompt");
  if (negatives.size() <= 1) negatives.assign(static_cast<size_t>(B), negatives.empty() ? "" : negatives.front());
  if (static_cast<int64_t>(prompts.size()) != B || static_cast<int64_t>(negatives.size()) != B)
    return c.fail("(params)", "prompts and negative prompts do not match the " + std::to_string(B) + " latents");

  // Text conditioning as the semantic pipeline: prompts and concepts without truncation (cut
  // after 77 ids), negatives with it; last hidden state, no clip skip.
  PromptEmbeddings emb;
  emb.cond = encode_edit_prompts(model, prompts);
  emb.uncond = model.text_encoder->forward(pipe.token_ids(negatives, /*truncate=*/true, nullptr).to(pipe.device()))
                   .last_hidden_state;
  const std::vector<std::string> concepts = strings_param(p, "editing_prompt");
  const Conditioning table = encode_edit_prompts(model, concepts);  // K rows, concept k = row k

  // The reference's per-concept arguments, the same for every image.
  SemanticGuidanceSettings settings;
  settings.momentum_scale = p.value("edit_momentum_scale", 0.1);
  settings.momentum_beta = p.value("edit_mom_beta", 0.4);
  std::vector<EditConcept> list;
  const bool has_weights = present(p, "edit_weights") && !p["edit_weights"].empty();  // `if edit_weights:`
  for (size_t k = 0; k < concepts.size(); ++k) {
    EditConcept e;
    e.embedding = static_cast<int64_t>(k);
    e.reverse = per_concept<bool>(p, "reverse_editing_direction", k, false);
    e.guidance_scale = per_concept<double>(p, "edit_guidance_scale", k, 5.0);
    e.warmup_steps = per_concept<int64_t>(p, "edit_warmup_steps", k, 10);
    e.cooldown_steps = per_concept<int64_t>(p, "edit_cooldown_steps", k, kNeverCoolDown);
    e.threshold = per_concept<double>(p, "edit_threshold", k, 0.9);
    e.weight = has_weights ? p["edit_weights"].at(k).get<double>() : 1.0;
    list.push_back(e);
  }
  settings.images.assign(static_cast<size_t>(B), list);

  auto run = [&](bool evaluate_all) {
    SegaRun r;
    SemanticGuidance sega(table, settings);
    sega.set_evaluate_all(evaluate_all);
    sega.set_observer([&](const SemanticStepRecord& rec) { r.records.push_back(rec); });
    auto scheduler = scheduler_for(c);
    scheduler->set_timesteps(steps);
    r.latents = pipe.denoise(*scheduler, noise, emb, guidance, nullptr,
                             [&](size_t, size_t, const at::Tensor& x) { r.step_latents.push_back(x); }, &sega);
    r.edit_rows = sega.edit_rows_total();
    return r;
  };
  const SegaRun main = run(false);
  const int64_t T = static_cast<int64_t>(main.step_latents.size());
  if (T > steps + 1)  // the reference's buffers hold num_inference_steps + 1 rows
    return c.fail("(params)", "the reference cannot record " + std::to_string(T) + " steps (IndexError)");

  // The per-step buffers as the reference lays them out: [steps + 1, ...], zero rows where unused.
  const auto opts = at::TensorOptions(at::kFloat);
  const int64_t K = static_cast<int64_t>(concepts.size());
  auto buffers = [&](const SegaRun& r, at::Tensor* sem, at::Tensor* unc, at::Tensor* txt, at::Tensor* edit) {
    const at::IntArrayRef shape = noise.sizes();  // [B, C, h, w]
    *sem = at::zeros({steps + 1, B, shape[1], shape[2], shape[3]}, opts);
    *unc = at::zeros_like(*sem);
    *txt = at::zeros_like(*sem);
    *edit = at::zeros({steps + 1, K, B, shape[1], shape[2], shape[3]}, opts);
    for (const auto& rec : r.records) {
      const int64_t i = static_cast<int64_t>(rec.step);
      const at::Tensor guide = rec.guidance.to(at::kCPU, at::kFloat);
      for (int64_t b = 0; b < B; ++b)
        if (rec.applied[static_cast<size_t>(b)]) (*sem)[i][b].copy_(guide[b]);
      (*unc)[i].copy_(rec.eps_uncond.to(at::kCPU, at::kFloat));
      (*txt)[i].copy_(rec.eps_text.to(at::kCPU, at::kFloat));
      for (size_t j = 0; j < rec.rows.size(); ++j)
        (*edit)[i][rec.rows[j].embedding][rec.rows[j].image].copy_(
            rec.eps_edit[static_cast<int64_t>(j)].to(at::kCPU, at::kFloat));
    }
  };
  at::Tensor sem, unc, txt, edit;
  buffers(main, &sem, &unc, &txt, &edit);

  const int64_t all_rows = T * B * K;  // what the reference evaluates
  c.note("UNet rows: " + std::to_string(2 * B * T + main.edit_rows) + " over " + std::to_string(T) +
         " steps (CFG " + std::to_string(2 * B * T) + " + edits " + std::to_string(main.edit_rows) + "; the reference " +
         std::to_string(2 * B * T + (K > 0 ? all_rows : 0)) + ")");

  const at::Tensor decoded = pipe.decode(main.latents);
  for (const auto& name : c.output_names()) {
    if (name == "latents") c.check(name, main.latents);
    else if (name == "step_latents") c.check(name, at::stack(main.step_latents));
    else if (name == "decoded") c.check(name, decoded);
    else if (name == "image") c.check(name, StableDiffusionPipeline::to_image(decoded));
    else if (name == "sem_guidance") c.check(name, sem);
    else if (name == "uncond_estimates") c.check(name, unc);
    else if (name == "text_estimates") c.check(name, txt);
    else if (name == "edit_estimates") {
      if (main.edit_rows == all_rows) {
        c.check(name, edit);
      } else {
        // Estimates the default run skipped (they cannot change the result): take them
        // from a run that evaluates every one, and compare that run's latents too.
        const SegaRun full = run(true);
        at::Tensor s2, u2, t2, e2;
        buffers(full, &s2, &u2, &t2, &e2);
        c.check(name, e2);
        const double dl = (full.latents - main.latents).abs().max().item<double>();
        const double ds = (s2 - sem).abs().max().item<double>();
        char buf[200];
        std::snprintf(buf, sizeof buf,
                      "edit_estimates from a run evaluating all %lld; it differs from the default run by "
                      "%.3g (latents), %.3g (sem_guidance)",
                      static_cast<long long>(all_rows), dl, ds);
        c.note(buf);
      }
    } else {
      c.fail(name, "output not produced by sega_pipeline");
    }
  }
}

}  // namespace

void register_sega_ops(OpRegistry& registry) { registry["sega_pipeline"] = sega_pipeline; }

}  // namespace fairdiff::parity
