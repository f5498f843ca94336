// Loading an original-layout single-file checkpoint as a model: the three networks are
// built from the configs the plan inferred (single_file.cpp) and every parameter is filled
// from the memory-mapped file through its planned transform, in one copy straight to the
// requested dtype and device.
#include <c10/core/GradMode.h>
#include <spdlog/spdlog.h>
#include <torch/nn/module.h>

#include <algorithm>
#include <map>
#include <memory>
#include <set>

#include "fairdiff/error.h"
#include "fs_util.h"
#include "model_folder.h"
#include "single_file.h"
#include "string_util.h"
#include "tensor_io.h"

namespace fairdiff {
namespace {

// The planned tensor as a view of `src`, the stored tensor (no copy yet).
at::Tensor planned_view(const at::Tensor& src, const PlannedTensor& t) {
  switch (t.transform) {
    case Transform::Copy: return src;
    case Transform::SqueezeConv1x1: return src.view(t.shape);  // [O,I,1,1] -> [O,I]
    case Transform::Rows: {
      const int64_t n = src.size(0) / t.parts;
      return src.narrow(0, t.part * n, n);  // [3C, ...] -> [C, ...], contiguous
    }
  }
  return src;
}

// Fills every parameter and buffer of `module` from the plan's tensors of `component`.
// Strict, like load_state_dict: the module and the plan must name the same tensors with
// the same shapes (a difference means the inferred config does not fit the file).
MappedWeights fill_module(torch::nn::Module& module, const std::string& component, const SingleFilePlan& plan,
                 const std::shared_ptr<const SafeTensors>& owner, const LoadOptions& options) {
  const SafeTensors& file = *owner;
  std::map<std::string, const PlannedTensor*> planned;
  for (const auto& t : plan.tensors)
    if (t.component == component) planned.emplace(t.target, &t);

  std::vector<std::pair<std::string, at::Tensor>> targets;
  for (const auto& p : module.named_parameters(/*recurse=*/true)) targets.emplace_back(p.key(), p.value());
  for (const auto& b : module.named_buffers(/*recurse=*/true)) targets.emplace_back(b.key(), b.value());

  std::vector<std::string> missing, mismatched, unexpected;
  std::set<std::string> expected;
  for (const auto& [name, target] : targets) {
    expected.insert(name);
    auto it = planned.find(name);
    if (it == planned.end())
      missing.push_back(name);
    else if (at::IntArrayRef(it->second->shape) != target.sizes())
      mismatched.push_back(name + " (file " + it->second->source + " " + shape_str(it->second->shape) + ", model " +
                           shape_str(target.sizes().vec()) + ")");
  }
  for (const auto& [name, t] : planned)
    if (!expected.count(name)) unexpected.push_back(name + " <- " + t->source);

  const std::string hint = "the " + component +
                           " config inferred from the file does not describe it; pass the "
                           "values the shapes cannot tell as config overrides";
  if (!mismatched.empty())
    throw_bad_input(
        file.path(),
        std::to_string(mismatched.size()) + " " + component + " tensors have the wrong shape: " + first_names(mismatched),
        hint);
  if (!missing.empty())
    throw_bad_input(file.path(),
                    std::to_string(missing.size()) + " " + component + " tensors are missing: " + first_names(missing),
                    hint);
  if (!unexpected.empty())
    throw_bad_input(file.path(),
                    std::to_string(unexpected.size()) + " mapped tensors are not part of the " + component + ": " +
                        first_names(unexpected),
                    hint);

  at::NoGradGuard no_grad;
  std::vector<const TensorView*> aliased;
  // How many of the module's tensors each stored tensor still has to fill (a fused q/k/v fills three).
  std::map<const TensorView*, int> readers;
  for (const auto& [name, target] : targets) ++readers[&file.at(planned.at(name)->source)];
  for (auto& [name, target] : targets) {
    const PlannedTensor& t = *planned.at(name);
    const TensorView& stored = file.at(t.source);
    // Floating tensors take the requested dtype; integer buffers keep theirs.
    const at::ScalarType dtype = at::isFloatingType(target.scalar_type()) ? options.dtype : target.scalar_type();
    // As load_state_dict: a view of the read-only mapping where the dtype matches on the
    // CPU, else one copy, after which the file's pages go once every part of the stored
    // tensor is read (kept, a bf16 run of the SD 1.5 file held them all: 6.6 GiB at its peak
    // against 2.6 GiB from a folder). A fused q/k/v is split into three views of its rows.
    const at::Tensor src = planned_view(tensor_view(stored, owner), t);
    if (can_alias(src, dtype, options.device)) {
      target.set_data(src);
      aliased.push_back(&stored);
    } else {
      target.set_data(src.to(options.device, dtype, /*non_blocking=*/false, /*copy=*/true));
      if (--readers[&stored] == 0) file.discard(stored);
    }
  }
  module.eval();
  return MappedWeights(owner, std::move(aliased));
}

}  // namespace

StableDiffusionModel load_single_file(const std::string& checkpoint, const std::string& tokenizer_dir,
                                      const LoadOptions& options, const SingleFileOptions& single) {
  refuse_pickle_checkpoint(checkpoint);
  const std::string tokenizer_hint =
      "a single-file checkpoint carries no tokenizer: pass the tokenizer/ folder of a diffusers release of the "
      "same family (SD 1.x: CLIP ViT-L/14's; SD 2.x: the one that pads with \"!\")";
  if (tokenizer_dir.empty()) throw_bad_input(checkpoint, "no tokenizer folder given", tokenizer_hint);
  if (!is_directory(tokenizer_dir)) throw_bad_input(tokenizer_dir, "tokenizer folder not found", tokenizer_hint);

  // Shared: tensors that alias the mapping keep it alive after this returns.
  const auto owner = std::make_shared<const SafeTensors>(checkpoint);
  const SafeTensors& file = *owner;
  TensorShapes shapes;
  shapes.reserve(file.tensors().size());
  for (const auto& t : file.tensors()) shapes.emplace_back(t.name, t.shape);
  const SingleFilePlan plan = plan_single_file(shapes, checkpoint, single);
  spdlog::info("{}: {} single-file checkpoint, text encoder {}, {} tensors mapped, {} left out", checkpoint,
               family_name(plan.family), plan.text_encoder_layout, plan.tensors.size(), plan.ignored.size());

  // Configs first: an unsupported value fails before any weight is read.
  const std::string inferred = checkpoint + " (inferred ";
  const CLIPTextConfig text_config =
      CLIPTextConfig::from_json(plan.text_encoder_config, inferred + "text_encoder config)");
  const UNet2DConditionConfig unet_config =
      UNet2DConditionConfig::from_json(plan.unet_config, inferred + "unet config)");
  const AutoencoderKLConfig vae_config = AutoencoderKLConfig::from_json(plan.vae_config, inferred + "vae config)");

  StableDiffusionModel m;
  m.dir = checkpoint;
  m.index.class_name = "StableDiffusionPipeline";
  m.index.components = {
      {"text_encoder", {"transformers", "CLIPTextModel"}},
      {"tokenizer", {"transformers", "CLIPTokenizer"}},
      {"unet", {"diffusers", "UNet2DConditionModel"}},
      {"vae", {"diffusers", "AutoencoderKL"}},
      {"scheduler", {"diffusers", plan.scheduler_config.value("_class_name", "")}},
  };
  m.scheduler_config = plan.scheduler_config;

  m.tokenizer = load_tokenizer(tokenizer_dir);
  if (m.tokenizer->vocab_size() > text_config.vocab_size)
    throw_bad_input(tokenizer_dir,
                    "the tokenizer has " + std::to_string(m.tokenizer->vocab_size()) +
                        " tokens but the checkpoint's text encoder embeds " + std::to_string(text_config.vocab_size),
                    tokenizer_hint);
  // The SD 2.x tokenizer pads with "!" (id 0), SD 1.x's with <|endoftext|>: the wrong one
  // changes every prompt embedding. Allowed (it is the user's choice), but said.
  const bool pads_with_zero = m.tokenizer->pad_id() == 0;
  if ((plan.family == SdFamily::SD2) != pads_with_zero)
    spdlog::warn("{}: the tokenizer pads with id {}, the {} tokenizer of the reference with {}", tokenizer_dir,
                 m.tokenizer->pad_id(), family_name(plan.family),
                 plan.family == SdFamily::SD2 ? "0 (\"!\")" : "49407 (<|endoftext|>)");

  // Every parameter comes from the file (fill_module), or, where it converts on the CPU and
  // converted before, from the weights cache's entry (written after the load when it missed;
  // not when prepacking replaces the weights right away).
  std::vector<PendingWeights> pending;
  auto fill = [&](torch::nn::Module& module, const std::string& component) {
    const bool cached = options.weights_cache.enabled() && options.device.is_cpu() &&
                        std::any_of(plan.tensors.begin(), plan.tensors.end(), [&](const PlannedTensor& t) {
                          return t.component == component && converts(file.at(t.source), options.dtype);
                        });
    const CachedWeightsKey key = cached ? cached_weights_key(checkpoint, component, options.dtype) : CachedWeightsKey{};
    MappedWeights mapped = load_through_cache(
        module, options.weights_cache, cached ? &key : nullptr,
        [&] { return fill_module(module, component, plan, owner, options); },
        prepacks_convolutions(options) ? nullptr : &pending);
    module.eval();
    return mapped;
  };
  m.text_encoder = leaf::built_for_load<CLIPTextModel>(text_config);
  m.mapped["text_encoder"] = fill(*m.text_encoder, "text_encoder");
  m.unet = leaf::built_for_load<UNet2DConditionModel>(unet_config);
  m.mapped["unet"] = fill(*m.unet, "unet");
  m.vae = leaf::built_for_load<AutoencoderKL>(vae_config);
  m.mapped["vae"] = fill(*m.vae, "vae");
  m.cache_writes = store_cached_weights(options.weights_cache, std::move(pending));
  m.page_out_idle = options.page_out_idle;
  // Ready to run: every mapped page now, or each component's when it runs (page_out_idle,
  // StableDiffusionModel::use); prepack_model does the same with what it leaves.
  if (prepacks_convolutions(options))
    prepack_model(m);
  else if (!options.page_out_idle)
    for (auto& [name, weights] : m.mapped) weights.prefault_all();
  return m;
}

}  // namespace fairdiff
