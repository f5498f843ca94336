// Single-file (original LDM layout) checkpoints: the plan for the real SD 1.5 / SD 2.1 key
// sets maps every tensor, the inferred configs equal the released ones, and the tiny
// float16 fixture loads into the same weights as tiny-sd1 (up to float16 rounding).
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <set>

#include "config_json.h"
#include "model_folder.h"
#include "single_file.h"
#include "string_util.h"
#include "tensor_io.h"
#include "test_util.h"


namespace fairdiff {
namespace {

// {name: shape} of a keys.json file (or the "keys" object of the fixture's manifest).
TensorShapes read_shapes(const std::string& path) {
  nlohmann::json j = read_json_file(path);
  if (j.contains("keys")) j = j.at("keys");
  TensorShapes shapes;
  for (auto it = j.begin(); it != j.end(); ++it) shapes.emplace_back(it.key(), it.value().get<std::vector<int64_t>>());
  return shapes;
}

// The plan's tensors of `component` must be exactly `expected` (target name -> shape).
void expect_targets(const SingleFilePlan& plan, const std::string& component, const nlohmann::json& expected) {
  std::map<std::string, std::vector<int64_t>> got;
  for (const auto& t : plan.tensors)
    if (t.component == component) EXPECT_TRUE(got.emplace(t.target, t.shape).second) << "filled twice: " << t.target;
  std::vector<std::string> missing, wrong;
  for (auto it = expected.begin(); it != expected.end(); ++it) {
    auto g = got.find(it.key());
    if (g == got.end())
      missing.push_back(it.key());
    else if (g->second != it.value().get<std::vector<int64_t>>())
      wrong.push_back(it.key() + " " + shape_str(g->second) + " vs " + it.value().dump());
  }
  EXPECT_EQ(got.size(), expected.size()) << component;
  EXPECT_TRUE(missing.empty()) << component << ": " << missing.size() << " unfilled, first " << missing.front();
  EXPECT_TRUE(wrong.empty()) << component << ": " << wrong.size() << " wrong shapes, first " << wrong.front();
}

// Every checkpoint tensor is used exactly once (a fused in_proj once per part), or left
// out on purpose and then listed in plan.ignored; `expected_ignored` is that list.
void expect_sources_used_once(const SingleFilePlan& plan, const TensorShapes& shapes,
                              const std::set<std::string>& expected_ignored) {
  std::map<std::string, std::multiset<int64_t>> parts;
  for (const auto& t : plan.tensors) parts[t.source].insert(t.parts == 1 ? -1 : t.part);
  const std::set<std::string> ignored(plan.ignored.begin(), plan.ignored.end());
  EXPECT_EQ(ignored.size(), plan.ignored.size()) << "a tensor is listed twice in plan.ignored";
  EXPECT_EQ(ignored, expected_ignored);
  for (const auto& [name, shape] : shapes) {
    auto it = parts.find(name);
    if (ignored.count(name)) {
      EXPECT_EQ(it, parts.end()) << name << " is both used and ignored";
      continue;
    }
    ASSERT_NE(it, parts.end()) << name << " " << shape_str(shape) << " is used by no target";
    const std::multiset<int64_t> once = {-1}, fused = {0, 1, 2};
    EXPECT_TRUE(it->second == once || it->second == fused) << name << " is used " << it->second.size() << " times";
  }
}

// The config fields our networks read, compared value by value (absent = the default).
void expect_fields(const nlohmann::json& inferred, const nlohmann::json& reference, const std::string& what,
                   const std::vector<std::string>& fields, const nlohmann::json& defaults = nlohmann::json::object()) {
  for (const auto& f : fields) {
    const nlohmann::json want = reference.contains(f) ? reference.at(f) : defaults.value(f, nlohmann::json());
    const nlohmann::json got = inferred.contains(f) ? inferred.at(f) : nlohmann::json();
    EXPECT_EQ(got, want) << what << " " << f << ": inferred " << got.dump() << ", reference " << want.dump();
  }
}

const std::vector<std::string> kTextFields = {"vocab_size",        "hidden_size",         "intermediate_size",
                                              "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
                                              "hidden_act",        "layer_norm_eps",      "bos_token_id",
                                              "eos_token_id",      "pad_token_id"};
const std::vector<std::string> kUnetFields = {"in_channels",
                                              "out_channels",
                                              "center_input_sample",
                                              "flip_sin_to_cos",
                                              "freq_shift",
                                              "down_block_types",
                                              "mid_block_type",
                                              "up_block_types",
                                              "only_cross_attention",
                                              "block_out_channels",
                                              "layers_per_block",
                                              "downsample_padding",
                                              "mid_block_scale_factor",
                                              "act_fn",
                                              "norm_num_groups",
                                              "norm_eps",
                                              "cross_attention_dim",
                                              "transformer_layers_per_block",
                                              "attention_head_dim",
                                              "num_attention_heads",
                                              "use_linear_projection",
                                              "upcast_attention",
                                              "resnet_time_scale_shift",
                                              "resnet_out_scale_factor",
                                              "time_embedding_type",
                                              "time_embedding_dim",
                                              "conv_in_kernel",
                                              "conv_out_kernel"};
const std::vector<std::string> kVaeFields = {
    "in_channels",      "out_channels",   "down_block_types",    "up_block_types",          "block_out_channels",
    "layers_per_block", "act_fn",         "latent_channels",     "norm_num_groups",         "scaling_factor",
    "force_upcast",     "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention", "shift_factor",
    "latents_mean",     "latents_std"};
const nlohmann::json kVaeDefaults = {{"mid_block_add_attention", true}};

// The real checkpoints also carry these: ignored by name.
const std::vector<std::string> kScheduleBuffers = {"betas",
                                                   "alphas_cumprod",
                                                   "alphas_cumprod_prev",
                                                   "sqrt_alphas_cumprod",
                                                   "sqrt_one_minus_alphas_cumprod",
                                                   "log_one_minus_alphas_cumprod",
                                                   "sqrt_recip_alphas_cumprod",
                                                   "sqrt_recipm1_alphas_cumprod",
                                                   "posterior_variance",
                                                   "posterior_log_variance_clipped",
                                                   "posterior_mean_coef1",
                                                   "posterior_mean_coef2"};

void check_keyset(const std::string& dir, SdFamily family, const std::string& scheduler) {
  const TensorShapes shapes = read_shapes(dir + "/single_file.keys.json");
  const SingleFilePlan plan = plan_single_file(shapes, dir + "/single_file.keys.json");
  EXPECT_EQ(plan.family, family);
  for (const std::string component : {"text_encoder", "unet", "vae"})
    expect_targets(plan, component, read_json_file(dir + "/" + component + ".keys.json"));
  expect_sources_used_once(plan, shapes, {});
  std::vector<std::string> text_fields = kTextFields, unet_fields = kUnetFields, vae_fields = kVaeFields;
  text_fields.push_back("projection_dim");
  unet_fields.push_back("sample_size");
  vae_fields.push_back("sample_size");
  expect_fields(plan.text_encoder_config, read_json_file(dir + "/text_encoder.config.json"), "text_encoder",
                text_fields);
  expect_fields(plan.unet_config, read_json_file(dir + "/unet.config.json"), "unet", unet_fields);
  expect_fields(plan.vae_config, read_json_file(dir + "/vae.config.json"), "vae", vae_fields, kVaeDefaults);
  EXPECT_EQ(plan.scheduler_config.value("_class_name", ""), scheduler);
}

TEST(SingleFilePlan, Sd15KeysetMapsCompletely) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  check_keyset(fixtures + "/keysets/sd15", SdFamily::SD1, "PNDMScheduler");
}

TEST(SingleFilePlan, Sd21KeysetMapsCompletely) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  check_keyset(fixtures + "/keysets/sd21", SdFamily::SD2, "DDIMScheduler");
}

// A released SD 1.5 file also holds the EMA copy, the DDPM schedule and position_ids.
TEST(SingleFilePlan, ExtrasOfRealCheckpointsAreIgnoredByName) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  TensorShapes shapes = read_shapes(fixtures + "/keysets/sd15/single_file.keys.json");
  const size_t n_model = shapes.size();
  std::set<std::string> extras = {"cond_stage_model.transformer.text_model.embeddings.position_ids", "model_ema.decay",
                                  "model_ema.num_updates", "model_ema.diffusion_modelinput_blocks00weight"};
  for (const auto& b : kScheduleBuffers) extras.insert(b);
  for (const auto& e : extras)
    shapes.emplace_back(e, e == "model_ema.diffusion_modelinput_blocks00weight" ? std::vector<int64_t>{320, 4, 3, 3}
                                                                                : std::vector<int64_t>{1000});
  const SingleFilePlan plan = plan_single_file(shapes, "sd15-full.safetensors");
  EXPECT_EQ(plan.tensors.size(), n_model);
  expect_sources_used_once(plan, shapes, extras);
}

// SD 2.x as released: the whole OpenCLIP tower (24 blocks, token_embedding,
// positional_embedding, ln_final, text_projection, logit_scale). The reference builds 23
// text layers and leaves the last block and the contrastive head out.
TEST(SingleFilePlan, Sd2OpenClipLayoutDropsLastBlockAndHead) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  const std::string dir = fixtures + "/keysets/sd21";
  const std::string o = "cond_stage_model.model.";
  TensorShapes shapes;
  std::set<std::string> dropped = {o + "text_projection", o + "logit_scale"};
  for (const auto& [name, shape] : read_shapes(dir + "/single_file.keys.json")) {
    std::string n = name;
    auto swap_prefix = [&](const std::string& from, const std::string& to) {
      if (starts_with(n, from)) n = to + n.substr(from.size());
    };
    swap_prefix(o + "resblocks.", o + "transformer.resblocks.");
    swap_prefix(o + "text_model.embeddings.token_embedding.", o + "token_embedding.");
    swap_prefix(o + "text_model.embeddings.position_embedding.weight", o + "positional_embedding");
    swap_prefix(o + "text_model.final_layer_norm.", o + "ln_final.");
    shapes.emplace_back(n, shape);
    const std::string block22 = o + "transformer.resblocks.22.";
    if (starts_with(n, block22)) {
      const std::string last = o + "transformer.resblocks.23." + n.substr(block22.size());
      shapes.emplace_back(last, shape);
      dropped.insert(last);
    }
  }
  shapes.emplace_back(o + "text_projection", std::vector<int64_t>{1024, 1024});
  shapes.emplace_back(o + "logit_scale", std::vector<int64_t>{});
  const SingleFilePlan plan = plan_single_file(shapes, "sd21-full.safetensors");
  EXPECT_EQ(plan.family, SdFamily::SD2);
  EXPECT_EQ(plan.text_encoder_config.at("num_hidden_layers"), 23);
  expect_targets(plan, "text_encoder", read_json_file(dir + "/text_encoder.keys.json"));
  expect_sources_used_once(plan, shapes, dropped);
  // q, k, v are the three row blocks of in_proj_weight, in that order.
  for (const auto& t : plan.tensors)
    if (t.target == "text_model.encoder.layers.3.self_attn.k_proj.weight") {
      EXPECT_EQ(t.source, o + "transformer.resblocks.3.attn.in_proj_weight");
      EXPECT_EQ(t.transform, Transform::Rows);
      EXPECT_EQ(t.part, 1);
      EXPECT_EQ(t.parts, 3);
      EXPECT_EQ(t.shape, (std::vector<int64_t>{1024, 1024}));
    }
}

TEST(SingleFilePlan, VaeAttentionConvWeightsBecomeLinear) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  const SingleFilePlan plan = plan_single_file(read_shapes(fixtures + "/keysets/sd15/single_file.keys.json"), "x");
  int squeezed = 0;
  for (const auto& t : plan.tensors)
    if (t.transform == Transform::SqueezeConv1x1) {
      ++squeezed;
      EXPECT_EQ(t.source_shape, (std::vector<int64_t>{512, 512, 1, 1})) << t.source;
      EXPECT_EQ(t.shape, (std::vector<int64_t>{512, 512})) << t.target;
    }
  EXPECT_EQ(squeezed, 8);  // q, k, v, proj_out of the encoder's and the decoder's mid block
}

TEST(SingleFilePlan, PredictionTypeAndOverrides) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  const TensorShapes sd15 = read_shapes(fixtures + "/keysets/sd15/single_file.keys.json");
  const TensorShapes sd21 = read_shapes(fixtures + "/keysets/sd21/single_file.keys.json");
  EXPECT_EQ(plan_single_file(sd15, "x").scheduler_config.at("prediction_type"), "epsilon");
  EXPECT_EQ(plan_single_file(sd21, "x").scheduler_config.at("prediction_type"), "v_prediction");
  SingleFileOptions options;
  options.prediction_type = "epsilon";  // an SD 2.x 512-base checkpoint
  EXPECT_EQ(plan_single_file(sd21, "x", options).scheduler_config.at("prediction_type"), "epsilon");
  options.config_overrides = {{"unet", {{"sample_size", 64}}},
                              {"scheduler", {{"_class_name", "EulerDiscreteScheduler"}}}};
  const SingleFilePlan plan = plan_single_file(sd21, "x", options);
  EXPECT_EQ(plan.unet_config.at("sample_size"), 64);
  EXPECT_EQ(plan.unet_config.at("block_out_channels"), nlohmann::json({320, 640, 1280, 1280}));
  EXPECT_EQ(plan.scheduler_config.at("_class_name"), "EulerDiscreteScheduler");

  options = {};
  options.prediction_type = "noise";
  test::expect_error([&] { plan_single_file(sd21, "m.safetensors", options); }, ErrorKind::BadInput,
                     {"m.safetensors", "\"noise\"", "v_prediction"});
  options = {};
  options.config_overrides = {{"unte", {{"sample_size", 64}}}};
  test::expect_error([&] { plan_single_file(sd21, "m.safetensors", options); }, ErrorKind::BadInput,
                     {"m.safetensors", "\"unte\""});
}

TEST(SingleFilePlan, ErrorsNameTheTensors) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  const TensorShapes sd15 = read_shapes(fixtures + "/keysets/sd15/single_file.keys.json");
  auto edited = [&](const std::function<void(TensorShapes&)>& edit) {
    TensorShapes s = sd15;
    edit(s);
    return s;
  };
  auto erase = [](TensorShapes& s, const std::string& name) {
    s.erase(std::remove_if(s.begin(), s.end(), [&](const auto& t) { return t.first == name; }), s.end());
  };
  // An unknown tensor (a LoRA merged badly, another architecture) and a missing one.
  const TensorShapes extra =
      edited([](TensorShapes& s) { s.emplace_back("model.diffusion_model.extra.weight", std::vector<int64_t>{3}); });
  test::expect_error(
      [&] { plan_single_file(extra, "m.safetensors"); }, ErrorKind::BadInput,
      {"m.safetensors", "1 checkpoint tensors map to no SD 1.x tensor", "model.diffusion_model.extra.weight [3]"});
  const TensorShapes missing = edited([&](TensorShapes& s) {
    erase(s, "model.diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.to_v.weight");
  });
  test::expect_error([&] { plan_single_file(missing, "m.safetensors"); }, ErrorKind::BadInput,
                     {"1 tensors of the inferred SD 1.x model are missing",
                      "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v.weight <- "
                      "model.diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.to_v.weight"});
  const TensorShapes sdxl =
      edited([](TensorShapes& s) { s.emplace_back("conditioner.embedders.0.transformer.x", std::vector<int64_t>{1}); });
  test::expect_error([&] { plan_single_file(sdxl, "m.safetensors"); }, ErrorKind::Unsupported,
                     {"m.safetensors", "SDXL"});
  const TensorShapes inpaint = edited([](TensorShapes& s) {
    for (auto& t : s)
      if (t.first == "model.diffusion_model.input_blocks.0.0.weight") t.second = {320, 9, 3, 3};
  });
  test::expect_error([&] { plan_single_file(inpaint, "m.safetensors"); }, ErrorKind::Unsupported, {"9", "inpainting"});
  const TensorShapes no_text = edited([&](TensorShapes& s) {
    s.erase(
        std::remove_if(s.begin(), s.end(), [](const auto& t) { return starts_with(t.first, "cond_stage_model."); }),
        s.end());
  });
  test::expect_error([&] { plan_single_file(no_text, "m.safetensors"); }, ErrorKind::BadInput, {"has no text encoder"});
  test::expect_error(
      [&] {
        plan_single_file({{"conv_in.weight", {320, 4, 3, 3}}}, "unet.safetensors");
      },
      ErrorKind::BadInput, {"unet.safetensors", "not an original-layout", "diffusers"});
  const TensorShapes mixed = edited([](TensorShapes& s) {
    for (auto& t : s)
      if (t.first.find("attn2.to_k.weight") != std::string::npos ||
          t.first.find("attn2.to_v.weight") != std::string::npos)
        t.second[1] = 1024;
  });
  test::expect_error([&] { plan_single_file(mixed, "m.safetensors"); }, ErrorKind::BadInput,
                     {"768", "1024", "different models"});
}

TEST(SingleFile, PickleCheckpointsAreRefused) {
  test::TempDir tmp;
  for (const std::string name : {"model.ckpt", "model.pt", "model.PTH", "pytorch_model.bin"}) {
    std::ofstream(tmp / name) << "pickle";
    test::expect_error([&] { refuse_pickle_checkpoint(tmp / name); }, ErrorKind::Unsupported,
                       {name, "pickle", "can execute code"});
  }
  // torch.save's zip format and a raw pickle, renamed.
  std::ofstream(tmp / "zip.safetensors") << std::string("PK\x03\x04", 4) << std::string(100, 'x');
  std::ofstream(tmp / "raw.safetensors") << std::string("\x80\x02}q\x00(X", 7) << std::string(100, 'x');
  for (const std::string name : {"zip.safetensors", "raw.safetensors"})
    test::expect_error([&] { refuse_pickle_checkpoint(tmp / name); }, ErrorKind::Unsupported,
                       {name, "pickle checkpoint under another name"});
  test::expect_error([&] { refuse_pickle_checkpoint(tmp / "absent.safetensors"); }, ErrorKind::BadInput,
                     {"absent.safetensors", "not found"});
  test::expect_error([&] { load_single_file(tmp / "model.ckpt", tmp.path.string(), LoadOptions{}); },
                     ErrorKind::Unsupported, {"model.ckpt", "can execute code"});
}

// -- The tiny fixture ------------------------------------------------------------------

struct Tiny {
  std::string fixtures;
  std::string checkpoint() const { return fixtures + "/models/tiny-sd1-single-file/tiny-sd1.fp16.safetensors"; }
  std::string folder() const { return fixtures + "/models/tiny-sd1"; }
  std::string tokenizer() const { return folder() + "/tokenizer"; }
};

TEST(SingleFileTiny, InferredConfigsEqualTinySd1) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  const Tiny tiny{fixtures};
  const SafeTensors file(tiny.checkpoint());
  TensorShapes shapes;
  for (const auto& t : file.tensors()) shapes.emplace_back(t.name, t.shape);
  const SingleFilePlan plan = plan_single_file(shapes, tiny.checkpoint());
  EXPECT_EQ(plan.family, SdFamily::SD1);
  expect_sources_used_once(plan, shapes, {});
  // sample_size (the default image size) and projection_dim cannot be read from shapes:
  // they take SD 1.5's values, which the tiny model does not share.
  expect_fields(plan.text_encoder_config, read_json_file(tiny.folder() + "/text_encoder/config.json"), "text_encoder",
                kTextFields);
  expect_fields(plan.unet_config, read_json_file(tiny.folder() + "/unet/config.json"), "unet", kUnetFields);
  expect_fields(plan.vae_config, read_json_file(tiny.folder() + "/vae/config.json"), "vae", kVaeFields, kVaeDefaults);
  const nlohmann::json scheduler = read_json_file(tiny.folder() + "/scheduler/scheduler_config.json");
  for (auto it = scheduler.begin(); it != scheduler.end(); ++it)
    if (it.key() != "_diffusers_version")
      EXPECT_EQ(plan.scheduler_config.value(it.key(), nlohmann::json()), it.value()) << "scheduler " << it.key();
}

// Every parameter of `got` against the same-named one of `want`; prints the worst.
void expect_same_parameters(const torch::nn::Module& got, const torch::nn::Module& want, const std::string& what,
                            bool exact_half) {
  const auto g = got.named_parameters(true), w = want.named_parameters(true);
  ASSERT_EQ(g.size(), w.size()) << what;
  double worst = 0;
  std::string worst_name;
  for (const auto& p : w) {
    const at::Tensor* a = g.find(p.key());
    ASSERT_NE(a, nullptr) << what << ": " << p.key() << " missing";
    ASSERT_EQ(a->sizes(), p.value().sizes()) << what << ": " << p.key();
    const at::Tensor ref = p.value().to(at::kDouble);
    if (exact_half) {
      // Loaded as float16: bit for bit the reference rounded to float16.
      ASSERT_EQ(a->scalar_type(), at::kHalf) << p.key();
      EXPECT_TRUE(at::equal(*a, p.value().to(at::kHalf))) << what << ": " << p.key();
      continue;
    }
    ASSERT_EQ(a->scalar_type(), at::kFloat) << p.key();
    // Float16 rounding: half an ulp of 2^-10 relative, plus the float16 subnormal step.
    const at::Tensor err = (a->to(at::kDouble) - ref).abs();
    const at::Tensor excess = err - (std::ldexp(1.0, -11) * ref.abs() + 1e-7);
    const double max_excess = excess.max().item<double>();
    const double max_err = err.max().item<double>();
    if (max_err > worst) worst = max_err, worst_name = p.key();
    EXPECT_LE(max_excess, 0.0) << what << ": " << p.key() << " max |error| " << max_err << " at flat index "
                               << excess.flatten().argmax().item<int64_t>() << ", first values "
                               << a->flatten().slice(0, 0, 3) << " vs " << p.value().flatten().slice(0, 0, 3);
  }
  if (!exact_half)
    std::cout << "  " << what << ": " << w.size() << " parameters, max |error| " << worst << " (" << worst_name
              << ")\n";
}

TEST(SingleFileTiny, LoadsTheWeightsOfTinySd1) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  c10::InferenceMode guard;
  const Tiny tiny{fixtures};
  LoadOptions plain;  // dense weights kept (prepacked convolutions release theirs)
  plain.prepack_convolutions = false;
  const StableDiffusionModel ref = load_model_folder(tiny.folder(), plain);
  const StableDiffusionModel m = load_single_file(tiny.checkpoint(), tiny.tokenizer(), plain);
  EXPECT_EQ(m.index.class_name, "StableDiffusionPipeline");
  EXPECT_EQ(m.scheduler_config.value("_class_name", ""), "PNDMScheduler");
  EXPECT_EQ(m.tokenizer->tokenize("a photo of a cat").input_ids, ref.tokenizer->tokenize("a photo of a cat").input_ids);
  expect_same_parameters(*m.text_encoder, *ref.text_encoder, "text_encoder", false);
  expect_same_parameters(*m.unet, *ref.unet, "unet", false);
  expect_same_parameters(*m.vae, *ref.vae, "vae", false);

  const StableDiffusionModel half = load_single_file(tiny.checkpoint(), tiny.tokenizer(), {at::kHalf, at::kCPU});
  expect_same_parameters(*half.text_encoder, *ref.text_encoder, "text_encoder fp16", true);
  expect_same_parameters(*half.unet, *ref.unet, "unet fp16", true);
  expect_same_parameters(*half.vae, *ref.vae, "vae fp16", true);
}

// The fused q/k/v of the OpenCLIP layout, end to end: the tiny fixture rewritten with its
// text encoder in the SD 2.x release layout (one in_proj per block, an extra last block,
// text_projection, logit_scale) loads the same text-encoder weights.
TEST(SingleFileTiny, OpenClipLayoutLoadsFusedProjections) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  c10::InferenceMode guard;
  const Tiny tiny{fixtures};
  const SafeTensors sd1(tiny.checkpoint());
  const std::string clip = "cond_stage_model.transformer.text_model.", o = "cond_stage_model.model.";
  const std::vector<std::pair<std::string, std::string>> renames = {
      {"embeddings.token_embedding.weight", "token_embedding.weight"},
      {"embeddings.position_embedding.weight", "positional_embedding"},
      {"final_layer_norm.", "ln_final."},
      {"layer_norm1.", "ln_1."},
      {"layer_norm2.", "ln_2."},
      {"mlp.fc1.", "mlp.c_fc."},
      {"mlp.fc2.", "mlp.c_proj."},
      {"self_attn.out_proj.", "attn.out_proj."},
  };
  std::vector<TensorData> out;
  std::map<std::string, TensorData> fused;  // in_proj name -> q, k, v rows appended in order
  int64_t blocks = 0;
  for (const auto& t : sd1.tensors()) {
    TensorData d{t.name, t.dtype, t.shape, std::vector<uint8_t>(t.data, t.data + t.nbytes)};
    if (!starts_with(t.name, clip)) {
      out.push_back(std::move(d));
      continue;
    }
    std::string rest = t.name.substr(clip.size());
    if (starts_with(rest, "encoder.layers.")) {
      rest = "transformer.resblocks." + rest.substr(std::strlen("encoder.layers."));
      blocks = std::max<int64_t>(blocks, std::stoll(rest.substr(std::strlen("transformer.resblocks."))) + 1);
    }
    for (const auto& [from, to] : renames)
      if (auto p = rest.find(from); p != std::string::npos) rest.replace(p, from.size(), to);
    const std::string kind = rest.find("q_proj") != std::string::npos   ? "q"
                             : rest.find("k_proj") != std::string::npos ? "k"
                             : rest.find("v_proj") != std::string::npos ? "v"
                                                                        : "";
    if (kind.empty()) {
      out.push_back({o + rest, t.dtype, t.shape, std::move(d.bytes)});
      continue;
    }
    const bool weight = ends_with(rest, "weight");
    const std::string name =
        o + rest.substr(0, rest.find("self_attn.")) + (weight ? "attn.in_proj_weight" : "attn.in_proj_bias");
    fused[name + "/" + kind] = std::move(d);
  }
  for (int64_t n = 0; n < blocks; ++n)
    for (const std::string leaf : {"attn.in_proj_weight", "attn.in_proj_bias"}) {
      const std::string name = o + "transformer.resblocks." + std::to_string(n) + "." + leaf;
      TensorData d = fused.at(name + "/q");
      d.name = name;
      d.shape[0] *= 3;  // rows of q, then k, then v: row-major, so the bytes simply follow
      for (const char* kind : {"/k", "/v"}) {
        const auto& more = fused.at(name + kind).bytes;
        d.bytes.insert(d.bytes.end(), more.begin(), more.end());
      }
      out.push_back(std::move(d));
    }
  // The released tower has one block more than SD 2.x uses, and a contrastive head.
  std::vector<TensorData> extra;
  const std::string last = o + "transformer.resblocks." + std::to_string(blocks - 1) + ".";
  for (const auto& d : out)
    if (starts_with(d.name, last)) {
      extra.push_back(d);
      extra.back().name = o + "transformer.resblocks." + std::to_string(blocks) + "." + d.name.substr(last.size());
    }
  for (auto& d : extra) out.push_back(std::move(d));
  out.push_back({o + "text_projection", DType::F16, {32, 32}, std::vector<uint8_t>(32 * 32 * 2, 0)});
  out.push_back({o + "logit_scale", DType::F16, {}, std::vector<uint8_t>(2, 0)});
  test::TempDir tmp;
  write_safetensors(tmp / "openclip.safetensors", out);

  LoadOptions plain;  // dense weights kept (prepacked convolutions release theirs)
  plain.prepack_convolutions = false;
  const StableDiffusionModel m = load_single_file(tmp / "openclip.safetensors", tiny.tokenizer(), plain);
  EXPECT_EQ(m.text_encoder->config().num_hidden_layers, blocks);
  EXPECT_EQ(m.text_encoder->config().hidden_act, "gelu");
  EXPECT_EQ(m.scheduler_config.value("prediction_type", ""), "v_prediction");
  const StableDiffusionModel ref = load_model_folder(tiny.folder(), plain);
  expect_same_parameters(*m.text_encoder, *ref.text_encoder, "text_encoder (OpenCLIP layout)", false);
}

TEST(SingleFileTiny, BadTokenizerAndOverridesThatDoNotFit) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  c10::InferenceMode guard;
  const Tiny tiny{fixtures};
  test::expect_error([&] { load_single_file(tiny.checkpoint(), "/nonexistent/tokenizer", {}); }, ErrorKind::BadInput,
                     {"/nonexistent/tokenizer", "tokenizer folder not found", "carries no tokenizer"});
  test::expect_error([&] { load_single_file(tiny.checkpoint(), "", {}); }, ErrorKind::BadInput,
                     {"no tokenizer folder given"});
  // The module built from the (overridden) config must take exactly the planned tensors.
  SingleFileOptions options;
  options.config_overrides = {{"unet", {{"cross_attention_dim", 16}}}};
  test::expect_error([&] { load_single_file(tiny.checkpoint(), tiny.tokenizer(), {}, options); }, ErrorKind::BadInput,
                     {"tiny-sd1.fp16.safetensors", "unet tensors have the wrong shape", "attn2.to_k.weight"});
  options.config_overrides = {{"vae", {{"layers_per_block", 2}}}};
  test::expect_error([&] { load_single_file(tiny.checkpoint(), tiny.tokenizer(), {}, options); }, ErrorKind::BadInput,
                     {"vae tensors are missing", "resnets.1"});
}

}  // namespace
}  // namespace fairdiff
