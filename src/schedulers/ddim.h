// DDIMScheduler: denoising diffusion implicit models (Song et al. 2020,
// https://arxiv.org/abs/2010.02502). Deterministic for eta = 0 (the pipelines' default).
#pragma once

#include "scheduler.h"

namespace fairdiff {

class DDIMScheduler : public Scheduler {
 public:
  struct Config {
    NoiseScheduleConfig schedule;  // diffusers defaults: linear 0.0001..0.02, epsilon, leading, offset 0
    bool clip_sample = true;
    double clip_sample_range = 1.0;
    bool set_alpha_to_one = true;  // previous alpha of the last step: 1, or alphas_cumprod[0]
    bool thresholding = false;
    double dynamic_thresholding_ratio = 0.995;
    double sample_max_value = 1.0;
    static Config from_json(const nlohmann::json& config, const std::string& where);
  };

  explicit DDIMScheduler(Config config);

  // The weight of the fresh noise, eq. (16) of the paper: 0 = DDIM (default), 1 = DDPM-like.
  // Not a config key: diffusers takes it as an argument of step().
  void set_eta(double eta) { eta_ = eta; }

  void set_timesteps(int64_t num_inference_steps) override;
  at::Tensor step(const at::Tensor& model_output, size_t step, const at::Tensor& sample,
                  std::vector<at::Generator>* generators = nullptr) override;
  std::string name() const override { return "DDIMScheduler"; }

 private:
  Config config_;
  at::Tensor alphas_cumprod_;       // [T] float32
  at::Tensor final_alpha_cumprod_;  // 0-d float32
  int64_t num_inference_steps_ = 0;
  double eta_ = 0.0;
};

}  // namespace fairdiff
