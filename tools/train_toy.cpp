// fairdiff-train-toy: trains the shipped model (models/toy) on the toy world
// (src/toy_world.h) with the same modules Stable Diffusion uses, in small configs:
//
//   1. AutoencoderKL (32x32x3 pictures <-> 16x16x4 latents): reconstruction + a light
//      KL term, then scaling_factor = 1 / std of the latents, as the SD VAE defines it;
//   2. CLIPTextModel + UNet2DConditionModel, trained together on the DDPM noise
//      objective (epsilon prediction, SD's scaled-linear betas), with 10% of captions
//      dropped to "" so classifier-free guidance works; the weights saved are an
//      exponential moving average.
//
// The result is an ordinary diffusers model folder (model_index.json, text_encoder/,
// tokenizer/, unet/, vae/, scheduler/) that `fairdiff generate --model` reads.
// The SentencePiece tokenizer is trained beforehand by fairdiff-toy-tokenizer (a
// separate, torch-free program: libsentencepiece must not share a process with
// LibTorch). scripts/train-toy runs both with the committed settings.
//
// Deterministic for a given --seed and thread count.
#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/optim/adamw.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "autoencoder_kl.h"
#include "clip_text_model.h"
#include "fairdiff/error.h"
#include "safetensors.h"
#include "tokenizer.h"
#include "fs_util.h"
#include "runtime.h"
#include "tensor_io.h"
#include "tool_main.h"
#include "toy_world.h"
#include "train_util.h"
#include "unet_2d_condition.h"

namespace fs = std::filesystem;
using nlohmann::json;
using fairdiff::tools::cosine_lr;
using fairdiff::tools::init_for_training;
using fairdiff::tools::seconds_since;
using fairdiff::tools::set_lr;
using fairdiff::tools::write_json;

namespace {

struct Options {
  std::string tokenizer_dir, out_dir;
  uint64_t seed = 0;
  int64_t vae_steps = 1500, unet_steps = 6000, batch = 32;
  double vae_lr = 2e-3, unet_lr = 1e-3;
  double caption_dropout = 0.1;
  // One thread by default: these layers are small, and OpenBLAS's thread pool spends more
  // time waiting than computing on them (measured: 2 threads 4.3 s per UNet step, 1
  // thread 0.55 s, on a loaded 2-core machine).
  int threads = 1;
  int64_t log_every = 100;
  int64_t save_every = 0;  // also write the model every N UNet steps (to look at it early)
};

// ---------------------------------------------------------------------------
// Configs: diffusers config.json files, small versions of SD 1.x's.

json vae_config() {
  return {{"_class_name", "AutoencoderKL"},
          {"in_channels", 3},
          {"out_channels", 3},
          {"down_block_types", {"DownEncoderBlock2D", "DownEncoderBlock2D"}},
          {"up_block_types", {"UpDecoderBlock2D", "UpDecoderBlock2D"}},
          {"block_out_channels", {16, 32}},
          {"layers_per_block", 1},
          {"act_fn", "silu"},
          {"latent_channels", 4},
          {"norm_num_groups", 8},
          {"sample_size", fairdiff::toy::kImageSize},
          {"scaling_factor", 1.0},  // replaced by the measured value
          {"force_upcast", true}};
}

json text_encoder_config(int64_t vocab_size, int64_t max_length, int64_t eos_id) {
  return {{"architectures", {"CLIPTextModel"}},
          {"model_type", "clip_text_model"},
          {"vocab_size", vocab_size},
          {"hidden_size", 64},
          {"intermediate_size", 256},
          {"num_hidden_layers", 2},
          {"num_attention_heads", 4},
          {"max_position_embeddings", max_length},
          {"hidden_act", "gelu"},
          {"layer_norm_eps", 1e-5},
          {"eos_token_id", eos_id},
          {"torch_dtype", "float32"}};
}

json unet_config() {
  return {{"_class_name", "UNet2DConditionModel"},
          {"sample_size", fairdiff::toy::kImageSize / 2},
          {"in_channels", 4},
          {"out_channels", 4},
          // Cross-attention at 8x8 (and in the mid block) only: colour and class are global
          // properties, and attention over the 256 positions of 16x16 would dominate the cost.
          {"down_block_types", {"DownBlock2D", "CrossAttnDownBlock2D"}},
          {"up_block_types", {"CrossAttnUpBlock2D", "UpBlock2D"}},
          {"block_out_channels", {32, 64}},
          {"layers_per_block", 1},
          {"cross_attention_dim", 64},
          {"attention_head_dim", 4},
          {"norm_num_groups", 16},
          {"act_fn", "silu"}};
}

// Stable Diffusion's scheduler settings (PNDM with PLMS steps, scaled-linear betas).
json scheduler_config() {
  return {{"_class_name", "PNDMScheduler"},
          {"num_train_timesteps", 1000},
          {"beta_start", 0.00085},
          {"beta_end", 0.012},
          {"beta_schedule", "scaled_linear"},
          {"skip_prk_steps", true},
          {"set_alpha_to_one", false},
          {"steps_offset", 1},
          {"prediction_type", "epsilon"},
          {"timestep_spacing", "leading"}};
}

// ---------------------------------------------------------------------------
// Exponential moving average of a module's parameters (the weights that get saved).
class Ema {
 public:
  explicit Ema(torch::nn::Module& module) {
    for (const auto& p : module.named_parameters()) shadow_.emplace_back(p.key(), p.value().detach().clone());
  }
  void update(torch::nn::Module& module, int64_t step) {
    at::NoGradGuard no_grad;
    // Warm-up: the average forgets the random start quickly, then settles to 0.999.
    const double decay = std::min(0.999, (1.0 + step) / (10.0 + step));
    size_t k = 0;
    for (const auto& p : module.named_parameters()) shadow_[k++].second.lerp_(p.value(), 1.0 - decay);
  }
  // Swaps the module's weights with the average (twice restores them).
  void swap(torch::nn::Module& module) {
    at::NoGradGuard no_grad;
    size_t k = 0;
    for (const auto& p : module.named_parameters()) {
      at::Tensor live = p.value().clone();
      p.value().copy_(shadow_[k].second);
      shadow_[k++].second.copy_(live);
    }
  }
  void copy_to(torch::nn::Module& module) const {
    at::NoGradGuard no_grad;
    size_t k = 0;
    for (const auto& p : module.named_parameters()) p.value().copy_(shadow_[k++].second);
  }

 private:
  std::vector<std::pair<std::string, at::Tensor>> shadow_;
};

// ---------------------------------------------------------------------------
// Data: batch `b` of the stream is pictures b*B .. b*B+B-1 of the world, the same for
// every run with the same seed.

struct Batch {
  at::Tensor images;                  // [B,3,32,32] in [-1,1]
  std::vector<std::string> captions;  // B captions
};

Batch make_batch(const fairdiff::toy::World& world, uint64_t seed, int64_t index, int64_t size) {
  constexpr int S = fairdiff::toy::kImageSize;
  at::Tensor bytes = at::empty({size, S, S, 3}, at::kByte);
  Batch batch;
  for (int64_t i = 0; i < size; ++i) {
    const fairdiff::toy::Sample s = world.sample(seed, static_cast<uint64_t>(index * size + i));
    std::memcpy(bytes[i].data_ptr<uint8_t>(), s.rgb.data(), s.rgb.size());
    batch.captions.push_back(s.caption);
  }
  batch.images = bytes.permute({0, 3, 1, 2}).to(at::kFloat).div(127.5).sub(1.0);  // [B,3,S,S]
  return batch;
}

// ---------------------------------------------------------------------------
// Saving: a module's parameters as a safetensors file (float32, names = checkpoint keys).

void save_module(torch::nn::Module& module, const fs::path& path) { fairdiff::save_state_dict(module, path.string()); }

// ---------------------------------------------------------------------------
// Stage 1: the autoencoder.

fairdiff::AutoencoderKL train_vae(const Options& o, const fairdiff::toy::World& world) {
  const json config = vae_config();
  fairdiff::AutoencoderKL vae(fairdiff::AutoencoderKLConfig::from_json(config, "vae config"));
  init_for_training(*vae);
  torch::optim::AdamW opt(vae->parameters(), torch::optim::AdamWOptions(o.vae_lr).weight_decay(0.0));
  at::Generator noise_gen = at::detail::createCPUGenerator(o.seed ^ 0x5AEULL);
  const auto t0 = std::chrono::steady_clock::now();
  double running = 0;
  for (int64_t step = 0; step < o.vae_steps; ++step) {
    set_lr(opt, cosine_lr(o.vae_lr, step, o.vae_steps, 100));
    const Batch batch = make_batch(world, o.seed, step, o.batch);
    const fairdiff::LatentDistribution d = vae->encode(batch.images);
    const at::Tensor z = d.mean + d.std * at::randn(d.mean.sizes(), noise_gen);  // [B,4,16,16]
    const at::Tensor recon = vae->decode(z);                                      // [B,3,32,32]
    // Reconstruction (L1 keeps the flat colours crisp, L2 the edges) + a light KL term
    // that keeps the latents near N(0, 1) without blurring.
    const at::Tensor kl = 0.5 * (d.mean.pow(2) + d.logvar.exp() - 1.0 - d.logvar).mean();
    const at::Tensor loss = (recon - batch.images).abs().mean() + (recon - batch.images).pow(2).mean() + 1e-4 * kl;
    opt.zero_grad();
    loss.backward();
    opt.step();
    running = step == 0 ? loss.item<double>() : 0.98 * running + 0.02 * loss.item<double>();
    if (step % o.log_every == 0 || step + 1 == o.vae_steps)
      std::printf("vae  step %5lld/%lld  loss %.5f  %.1f s\n", (long long)step, (long long)o.vae_steps, running,
                  seconds_since(t0));
    std::fflush(stdout);
  }
  vae->eval();
  return vae;
}

// scaling_factor: 1 / std of the latents over fresh pictures (the SD VAE's 0.18215 is
// the same statistic for its data).
double measure_scaling_factor(fairdiff::AutoencoderKL& vae, const Options& o, const fairdiff::toy::World& world) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> latents;
  for (int64_t b = 0; b < 16; ++b) latents.push_back(vae->encode(make_batch(world, o.seed + 1, b, 64).images).mean);
  return 1.0 / at::cat(latents).std().item<double>();
}

// ---------------------------------------------------------------------------
// Stage 2: text encoder + UNet on the noise objective.

struct Denoiser {
  fairdiff::CLIPTextModel text_encoder{nullptr};
  fairdiff::UNet2DConditionModel unet{nullptr};
};

// Writes the model folder (defined below); called with the averaged weights in place.
void publish(const Options& o, fairdiff::AutoencoderKL& vae, double scaling_factor, Denoiser& m,
             const fairdiff::Tokenizer& tokenizer);

Denoiser train_denoiser(const Options& o, const fairdiff::toy::World& world, fairdiff::AutoencoderKL& vae,
                        double scaling_factor, const fairdiff::Tokenizer& tokenizer) {
  Denoiser m;
  m.text_encoder = fairdiff::CLIPTextModel(fairdiff::CLIPTextConfig::from_json(
      text_encoder_config(tokenizer.vocab_size(), tokenizer.model_max_length(), tokenizer.eos_id()), "text config"));
  m.unet = fairdiff::UNet2DConditionModel(fairdiff::UNet2DConditionConfig::from_json(unet_config(), "unet config"));
  init_for_training(*m.text_encoder);
  init_for_training(*m.unet);

  std::vector<at::Tensor> params = m.unet->parameters();
  for (const at::Tensor& p : m.text_encoder->parameters()) params.push_back(p);
  torch::optim::AdamW opt(params, torch::optim::AdamWOptions(o.unet_lr).weight_decay(0.01));
  Ema ema_unet(*m.unet), ema_text(*m.text_encoder);

  // DDPM forward process with SD's betas: sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012).
  const at::Tensor betas = at::linspace(std::sqrt(0.00085), std::sqrt(0.012), 1000, at::kDouble).pow(2);
  const at::Tensor alphas_cumprod = (1.0 - betas).cumprod(0).to(at::kFloat);  // [1000]

  at::Generator gen = at::detail::createCPUGenerator(o.seed ^ 0xD1FFULL);
  fairdiff::toy::Rng dropout_rng(o.seed ^ 0xCA9ULL);
  const auto t0 = std::chrono::steady_clock::now();
  double running = 0;
  for (int64_t step = 0; step < o.unet_steps; ++step) {
    set_lr(opt, cosine_lr(o.unet_lr, step, o.unet_steps, 200));
    Batch batch = make_batch(world, o.seed + 2, step, o.batch);
    at::Tensor latents;  // [B,4,16,16]
    {
      at::NoGradGuard no_grad;
      const fairdiff::LatentDistribution d = vae->encode(batch.images);
      latents = (d.mean + d.std * at::randn(d.mean.sizes(), gen)) * scaling_factor;
    }
    // Caption dropout: the unconditional estimate of classifier-free guidance is "".
    std::vector<int64_t> ids;
    for (std::string& caption : batch.captions) {
      if (dropout_rng.uniform() < o.caption_dropout) caption.clear();
      const fairdiff::TokenizedText t = tokenizer.tokenize(caption);
      ids.insert(ids.end(), t.input_ids.begin(), t.input_ids.end());
    }
    const at::Tensor input_ids =
        at::from_blob(ids.data(), {o.batch, tokenizer.model_max_length()}, at::kLong).clone();  // [B,L]

    const at::Tensor t = at::randint(0, 1000, {o.batch}, gen, at::kLong);  // [B]
    const at::Tensor noise = at::randn(latents.sizes(), gen);              // [B,4,16,16]
    const at::Tensor a = alphas_cumprod.index_select(0, t).view({-1, 1, 1, 1});
    const at::Tensor noisy = a.sqrt() * latents + (1.0 - a).sqrt() * noise;

    const at::Tensor context = m.text_encoder->prompt_embeds(input_ids);  // [B,L,64]
    const at::Tensor eps = m.unet->forward(noisy, t, context);            // [B,4,16,16]
    const at::Tensor loss = (eps - noise).pow(2).mean();
    opt.zero_grad();
    loss.backward();
    at::NoGradGuard no_grad;
    double norm2 = 0;  // global gradient-norm clipping at 1
    for (const at::Tensor& p : params)
      if (p.grad().defined()) norm2 += p.grad().pow(2).sum().item<double>();
    const double scale = std::min(1.0, 1.0 / (std::sqrt(norm2) + 1e-6));
    if (scale < 1.0)
      for (const at::Tensor& p : params)
        if (p.grad().defined()) p.grad().mul_(scale);
    opt.step();
    ema_unet.update(*m.unet, step);
    ema_text.update(*m.text_encoder, step);
    running = step == 0 ? loss.item<double>() : 0.99 * running + 0.01 * loss.item<double>();
    if (o.save_every > 0 && (step + 1) % o.save_every == 0 && step + 1 < o.unet_steps) {
      ema_unet.swap(*m.unet);
      ema_text.swap(*m.text_encoder);
      publish(o, vae, scaling_factor, m, tokenizer);
      ema_unet.swap(*m.unet);
      ema_text.swap(*m.text_encoder);
      std::printf("saved the averaged weights of step %lld\n", (long long)step + 1);
    }
    if (step % o.log_every == 0 || step + 1 == o.unet_steps)
      std::printf("unet step %5lld/%lld  loss %.5f  %.1f s\n", (long long)step, (long long)o.unet_steps, running,
                  seconds_since(t0));
    std::fflush(stdout);
  }
  ema_unet.copy_to(*m.unet);
  ema_text.copy_to(*m.text_encoder);
  return m;
}

// ---------------------------------------------------------------------------

void copy_tokenizer(const fs::path& from, const fs::path& to) {
  fs::create_directories(to);
  for (const auto& entry : fs::directory_iterator(from))
    if (entry.is_regular_file()) fs::copy_file(entry.path(), to / entry.path().filename());
}

void write_model(const Options& o, const fs::path& dir, fairdiff::AutoencoderKL& vae, double scaling_factor,
                 Denoiser& m, const fairdiff::Tokenizer& tokenizer) {
  for (const char* sub : {"vae", "unet", "text_encoder", "scheduler"}) fs::create_directories(dir / sub);
  copy_tokenizer(o.tokenizer_dir, dir / "tokenizer");
  json vae_json = vae_config();
  vae_json["scaling_factor"] = scaling_factor;
  write_json(dir / "vae" / "config.json", vae_json);
  save_module(*vae, dir / "vae" / "diffusion_pytorch_model.safetensors");
  write_json(dir / "unet" / "config.json", unet_config());
  save_module(*m.unet, dir / "unet" / "diffusion_pytorch_model.safetensors");
  write_json(dir / "text_encoder" / "config.json",
             text_encoder_config(tokenizer.vocab_size(), tokenizer.model_max_length(), tokenizer.eos_id()));
  save_module(*m.text_encoder, dir / "text_encoder" / "model.safetensors");
  write_json(dir / "scheduler" / "scheduler_config.json", scheduler_config());
  write_json(dir / "model_index.json",
             {{"_class_name", "StableDiffusionPipeline"},
              {"_fairdiff_toy", {{"seed", o.seed}, {"vae_steps", o.vae_steps}, {"unet_steps", o.unet_steps},
                                 {"batch", o.batch}, {"trainer", "fairdiff-train-toy (scripts/train-toy)"}}},
              {"text_encoder", {"transformers", "CLIPTextModel"}},
              {"tokenizer", {"fairdiff", "SentencePieceTokenizer"}},
              {"unet", {"diffusers", "UNet2DConditionModel"}},
              {"vae", {"diffusers", "AutoencoderKL"}},
              {"scheduler", {"diffusers", "PNDMScheduler"}},
              {"safety_checker", {nullptr, nullptr}},
              {"feature_extractor", {nullptr, nullptr}},
              {"requires_safety_checker", false}});
}

void publish(const Options& o, fairdiff::AutoencoderKL& vae, double scaling_factor, Denoiser& m,
             const fairdiff::Tokenizer& tokenizer) {
  fairdiff::tools::publish_folder(o.out_dir, [&](const fs::path& dir) { write_model(o, dir, vae, scaling_factor, m, tokenizer); });
}

int run(const Options& o) {
  fairdiff::configure_threads(o.threads);
  fairdiff::configure_allocator();
  at::manual_seed(o.seed);  // the initial weights
  const auto tokenizer = fairdiff::load_tokenizer(o.tokenizer_dir);
  const fairdiff::toy::World world;
  const auto t0 = std::chrono::steady_clock::now();

  fairdiff::AutoencoderKL vae = train_vae(o, world);
  const double scaling_factor = measure_scaling_factor(vae, o, world);
  std::printf("vae scaling_factor %.5f\n", scaling_factor);
  Denoiser m = train_denoiser(o, world, vae, scaling_factor, *tokenizer);

  publish(o, vae, scaling_factor, m, *tokenizer);
  std::printf("wrote %s in %.0f s\n", o.out_dir.c_str(), seconds_since(t0));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"fairdiff-train-toy: train the shipped toy model (see scripts/train-toy)"};
  Options o;
  app.add_option("--tokenizer", o.tokenizer_dir, "SentencePiece tokenizer folder from fairdiff-toy-tokenizer")
      ->required();
  app.add_option("--out", o.out_dir, "model folder to write (replaced when the run finishes)")->required();
  app.add_option("--seed", o.seed, "seed of the data stream, initial weights and noise")->capture_default_str();
  app.add_option("--vae-steps", o.vae_steps, "autoencoder training steps")->capture_default_str();
  app.add_option("--unet-steps", o.unet_steps, "UNet + text encoder training steps")->capture_default_str();
  app.add_option("--batch", o.batch, "pictures per step")->capture_default_str();
  app.add_option("--vae-lr", o.vae_lr, "autoencoder peak learning rate")->capture_default_str();
  app.add_option("--unet-lr", o.unet_lr, "UNet + text encoder peak learning rate")->capture_default_str();
  app.add_option("--save-every", o.save_every, "also write the model every N UNet steps (0: at the end only)")
      ->capture_default_str();
  app.add_option("--log-every", o.log_every, "steps between progress lines")->capture_default_str();
  app.add_option("--threads", o.threads, "CPU threads (0 = all CPUs)")->capture_default_str();
  return fairdiff::tools::run_tool("fairdiff-train-toy", app, argc, argv, [&] { return run(o); });
}
