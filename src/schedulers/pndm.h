// PNDMScheduler: pseudo numerical methods for diffusion models (Liu et al. 2022,
// https://arxiv.org/abs/2202.09778). A pseudo Runge-Kutta warm-up (skipped with
// skip_prk_steps, as Stable Diffusion does), then the pseudo linear multistep (PLMS)
// method, whose first two calls both integrate from the first timestep.
#pragma once

#include "scheduler.h"

namespace fairdiff {

class PNDMScheduler : public Scheduler {
 public:
  struct Config {
    NoiseScheduleConfig schedule;  // diffusers defaults: linear 0.0001..0.02, epsilon, leading, offset 0
    bool skip_prk_steps = false;
    bool set_alpha_to_one = false;  // previous alpha of the last step: 1, or alphas_cumprod[0]
    static Config from_json(const nlohmann::json& config, const std::string& where);
  };

  explicit PNDMScheduler(Config config);

  void set_timesteps(int64_t num_inference_steps) override;
  at::Tensor step(const at::Tensor& model_output, size_t step, const at::Tensor& sample,
                  std::vector<at::Generator>* generators = nullptr) override;
  std::string name() const override { return "PNDMScheduler"; }

 private:
  at::Tensor step_prk(const at::Tensor& model_output, int64_t timestep, const at::Tensor& sample);
  at::Tensor step_plms(const at::Tensor& model_output, int64_t timestep, const at::Tensor& sample);
  at::Tensor prev_sample(const at::Tensor& sample, int64_t timestep, int64_t prev_timestep,
                         at::Tensor model_output) const;

  Config config_;
  at::Tensor alphas_cumprod_;       // [T] float32
  at::Tensor final_alpha_cumprod_;  // 0-d float32
  int64_t num_inference_steps_ = 0;
  std::vector<int64_t> prk_timesteps_;
  // Per-run state.
  size_t counter_ = 0;
  std::vector<at::Tensor> ets_;  // past model outputs (at most 4)
  at::Tensor cur_sample_;        // the sample the current multi-call step started from (undefined: none)
  at::Tensor cur_model_output_;  // Runge-Kutta accumulator (undefined: zero)
};

}  // namespace fairdiff
