// EulerDiscreteScheduler: Euler's method on the probability-flow ODE in the sigma
// parametrisation of Karras et al. 2022 (https://arxiv.org/abs/2206.00364, Algorithm 2
// without churn), as k-diffusion's sample_euler. The sample is x_0 + sigma eps.
#pragma once

#include <optional>

#include "scheduler.h"

namespace fairdiff {

class EulerDiscreteScheduler : public Scheduler {
 public:
  struct Config {
    NoiseScheduleConfig schedule;  // diffusers defaults: linear 0.0001..0.02, epsilon, linspace, offset 0
    bool use_karras_sigmas = false;
    std::optional<double> sigma_min, sigma_max;  // Karras range; default: the ends of the schedule
    bool continuous_timesteps = false;           // timestep_type "continuous": t = sigma.log() / 4 (v_prediction)
    bool final_sigma_zero = true;                // final_sigmas_type "zero", else "sigma_min"
    static Config from_json(const nlohmann::json& config, const std::string& where);
  };

  explicit EulerDiscreteScheduler(Config config);

  void set_timesteps(int64_t num_inference_steps) override;
  double init_noise_sigma() const override;
  at::Tensor scale_model_input(const at::Tensor& sample, size_t step) const override;
  at::Tensor step(const at::Tensor& model_output, size_t step, const at::Tensor& sample,
                  std::vector<at::Generator>* generators = nullptr) override;
  std::string name() const override { return "EulerDiscreteScheduler"; }
  std::vector<double> sigmas() const override { return sched::to_doubles(sigmas_); }

 private:
  Config config_;
  at::Tensor alphas_cumprod_;  // [T] float32
  at::Tensor sigmas_;          // [n + 1] float32, last = final sigma
};

}  // namespace fairdiff
