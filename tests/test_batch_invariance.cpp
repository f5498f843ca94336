// An image's numbers do not depend on the batch it was sampled in: the promise behind
// "same seed, same bytes" for any --batch-size. (Not for any --threads: see the README.)
// Checked bit for bit on the final latents (stricter than the PNG bytes), with classifier-
// free guidance and per-image semantic guidance rows (whose count changes with the batch),
// on three model shapes built beside the shipped toy model:
//   toy      the shipped model: 2-level UNet (32/64), one layer per block, context width 64
//   deep     4 levels (32/32/64/64), one layer per block, three cross-attention levels,
//            context width 48 (a random text encoder of that width)
//   wide     3 levels (32/64/64), two layers per block, linear projections, 8 heads
// ctest runs this file a second time with LibTorch, oneDNN and OpenBLAS limited to their
// AVX2 kernels (tests/CMakeLists.txt), so the promise is checked on both kinds of CPU
// kernels that machines here have.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <torch/nn/module.h>

#include <filesystem>
#include <fstream>
#include <memory>

#include "clip_text_model.h"
#include "model_folder.h"
#include "pipeline.h"
#include "runtime.h"
#include "scheduler.h"
#include "semantic_guidance.h"
#include "tensor_io.h"
#include "test_util.h"
#include "unet_2d_condition.h"

namespace fs = std::filesystem;

namespace fairdiff {
namespace {

const fs::path kToy = fs::path(FAIRDIFF_SOURCE_DIR) / "models" / "toy";

nlohmann::json read_json(const fs::path& p) {
  std::ifstream in(p);
  return nlohmann::json::parse(in);
}

void write_json(const fs::path& p, const nlohmann::json& j) {
  fs::create_directories(p.parent_path());
  std::ofstream(p) << j.dump(2);
}

// A model folder: the toy's tokenizer, VAE and scheduler, with a UNet (and, when the
// context width changes, a text encoder) of another shape and random weights.
// The networks leave their weights uninitialised (they are loaded): norms 1 and 0, biases
// 0, the rest N(0, 0.02), as a random Stable Diffusion checkpoint is written.
void randomize(torch::nn::Module& module) {
  c10::NoGradGuard no_grad;
  for (auto& p : module.named_parameters()) {
    if (p.key().find("norm") != std::string::npos) continue;
    if (p.key().size() > 5 && p.key().compare(p.key().size() - 5, 5, ".bias") == 0)
      p.value().zero_();
    else
      p.value().normal_(0, 0.02);
  }
}

fs::path make_variant(const fs::path& dir, const nlohmann::json& unet_changes, int64_t context_width) {
  fs::create_directories(dir);
  for (const char* part : {"model_index.json", "tokenizer", "vae", "scheduler"}) fs::create_symlink(kToy / part, dir / part);
  torch::manual_seed(7);
  nlohmann::json text = read_json(kToy / "text_encoder" / "config.json");
  if (context_width != text["hidden_size"].get<int64_t>()) {
    text["hidden_size"] = context_width;
    text["intermediate_size"] = 4 * context_width;
    write_json(dir / "text_encoder" / "config.json", text);
    CLIPTextModel te(CLIPTextConfig::from_json(text, "text_encoder/config.json"));
    randomize(*te);
    save_state_dict(*te, (dir / "text_encoder" / "model.safetensors").string());
  } else {
    fs::create_symlink(kToy / "text_encoder", dir / "text_encoder");
  }
  nlohmann::json unet = read_json(kToy / "unet" / "config.json");
  unet.update(unet_changes);
  unet["cross_attention_dim"] = context_width;
  write_json(dir / "unet" / "config.json", unet);
  UNet2DConditionModel u(UNet2DConditionConfig::from_json(unet, "unet/config.json"));
  randomize(*u);
  save_state_dict(*u, (dir / "unet" / "diffusion_pytorch_model.safetensors").string());
  return dir;
}

struct Shape {
  const char* name;
  nlohmann::json unet;  // changes to the toy's UNet config
  int64_t context_width;
};

const std::vector<Shape>& shapes() {
  static const std::vector<Shape> s = {
      {"toy", nullptr, 64},
      {"deep",
       {{"block_out_channels", {32, 32, 64, 64}},
        {"down_block_types", {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"}},
        {"up_block_types", {"UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"}},
        {"layers_per_block", 1},
        {"attention_head_dim", 4}},
       48},
      {"wide",
       {{"block_out_channels", {32, 64, 64}},
        {"down_block_types", {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"}},
        {"up_block_types", {"UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"}},
        {"layers_per_block", 2},
        {"attention_head_dim", 8},
        {"use_linear_projection", true}},
       64},
  };
  return s;
}

class BatchInvariance : public ::testing::TestWithParam<size_t> {
 protected:
  void SetUp() override {
    const Shape& shape = shapes()[GetParam()];
    dir_ = shape.unet.is_null() ? kToy : make_variant(tmp_ / shape.name, shape.unet, shape.context_width);
    model_ = std::make_unique<StableDiffusionModel>(load_model_folder(dir_.string(), LoadOptions{}));
  }

  // Final latents of images `seeds`, sampled together in one batch: CFG 7, 8 PNDM steps,
  // image b steered toward edit concept b % 2 (its own SEGA rows, one warm-up step).
  at::Tensor sample(const std::vector<int64_t>& seeds) {
    c10::InferenceMode guard;
    StableDiffusionPipeline pipe(*model_);
    std::vector<std::string> prompts, negatives;
    SemanticGuidanceSettings s;
    s.momentum_scale = 0.3;
    s.momentum_beta = 0.6;
    EditConcept base;
    base.guidance_scale = 3;
    base.warmup_steps = 1;
    base.threshold = 0.9;
    for (int64_t seed : seeds) {
      prompts.push_back(seed % 2 ? "a photo of a boat" : "a red kite");
      negatives.push_back(seed % 3 ? "" : "blue");
      s.images.push_back(steer_toward(seed % 2, 2, base));
    }
    SemanticGuidance sega(encode_edit_prompts(*model_, {"red", "blue"}), s);
    const PromptEmbeddings emb = pipe.encode_prompts(prompts, negatives, 0, /*cfg=*/true);
    auto sched = make_scheduler(model_->scheduler_config, "", "scheduler_config.json");
    sched->set_timesteps(8);
    return pipe.denoise(*sched, pipe.initial_noise(seeds, 32, 32, nullptr), emb, 7.0, nullptr, nullptr, &sega);
  }

  test::TempDir tmp_;
  fs::path dir_;
  std::unique_ptr<StableDiffusionModel> model_;
};

TEST_P(BatchInvariance, LatentsAreBitIdenticalForAnyBatchSize) {
  const std::vector<int64_t> seeds = {11, 12, 13, 14};
  configure_threads(1);  // the same for every run here: the thread count is not what is tested
  const at::Tensor together = sample(seeds);  // [4, C, h, w]
  ASSERT_TRUE(together.isfinite().all().item<bool>());
  EXPECT_GT(together.std().item<double>(), 0.05) << "degenerate latents would hide differences";
  for (size_t b = 0; b < seeds.size(); ++b) {
    const at::Tensor alone = sample({seeds[b]});
    EXPECT_TRUE(at::equal(alone[0], together[static_cast<int64_t>(b)]))
        << shapes()[GetParam()].name << ": image " << b << " differs between batch 1 and 4 by up to "
        << (alone[0] - together[static_cast<int64_t>(b)]).abs().max().item<double>();
  }
  const at::Tensor pair = sample({seeds[2], seeds[3]});
  EXPECT_TRUE(at::equal(pair, together.slice(0, 2, 4))) << shapes()[GetParam()].name << ": batch 2 differs from 4";
}

INSTANTIATE_TEST_SUITE_P(Shapes, BatchInvariance, ::testing::Range<size_t>(0, 3),
                         [](const ::testing::TestParamInfo<size_t>& i) { return std::string(shapes()[i.param].name); });

}  // namespace
}  // namespace fairdiff
