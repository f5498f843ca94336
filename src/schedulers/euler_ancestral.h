// EulerAncestralDiscreteScheduler: ancestral sampling with Euler steps (k-diffusion's
// sample_euler_ancestral): each step goes down to sigma_down deterministically, then adds
// fresh noise of scale sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2.
#pragma once

#include "scheduler.h"

namespace fairdiff {

class EulerAncestralDiscreteScheduler : public Scheduler {
 public:
  struct Config {
    NoiseScheduleConfig schedule;  // diffusers defaults: linear 0.0001..0.02, epsilon, linspace, offset 0
    static Config from_json(const nlohmann::json& config, const std::string& where);
  };

  explicit EulerAncestralDiscreteScheduler(Config config);

  void set_timesteps(int64_t num_inference_steps) override;
  double init_noise_sigma() const override;
  at::Tensor scale_model_input(const at::Tensor& sample, size_t step) const override;
  at::Tensor step(const at::Tensor& model_output, size_t step, const at::Tensor& sample,
                  std::vector<at::Generator>* generators = nullptr) override;
  std::string name() const override { return "EulerAncestralDiscreteScheduler"; }
  std::vector<double> sigmas() const override { return sched::to_doubles(sigmas_); }

 private:
  Config config_;
  at::Tensor alphas_cumprod_;  // [T] float32
  at::Tensor sigmas_;          // [n + 1] float32, last = 0
};

}  // namespace fairdiff
