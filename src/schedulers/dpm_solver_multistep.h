// DPMSolverMultistepScheduler: DPM-Solver++ (Lu et al. 2022, https://arxiv.org/abs/2211.01095)
// and DPM-Solver (https://arxiv.org/abs/2206.00927), multistep, orders 1 and 2 ("2M"), in
// the half-log-SNR variable lambda = log(alpha_t / sigma_t). Optionally on Karras sigmas.
#pragma once

#include <cmath>
#include <optional>

#include "scheduler.h"

namespace fairdiff {

class DPMSolverMultistepScheduler : public Scheduler {
 public:
  enum class Algorithm { DPMSolverPP, DPMSolver };  // "dpmsolver++" (data prediction), "dpmsolver" (noise)
  enum class SolverType { Midpoint, Heun };

  struct Config {
    NoiseScheduleConfig schedule;  // diffusers defaults: linear 0.0001..0.02, epsilon, linspace, offset 0
    int solver_order = 2;
    bool thresholding = false;
    double dynamic_thresholding_ratio = 0.995;
    double sample_max_value = 1.0;
    Algorithm algorithm_type = Algorithm::DPMSolverPP;
    SolverType solver_type = SolverType::Midpoint;
    bool lower_order_final = true;
    bool euler_at_final = false;
    bool use_karras_sigmas = false;
    bool use_lu_lambdas = false;
    std::optional<double> sigma_min, sigma_max;  // Karras range, when the config carries these keys
    bool final_sigma_zero = true;                // final_sigmas_type "zero", else "sigma_min"
    double lambda_min_clipped = -INFINITY;
    bool learned_variance = false;  // variance_type "learned" / "learned_range": keep output channels :3
    static Config from_json(const nlohmann::json& config, const std::string& where);
  };

  explicit DPMSolverMultistepScheduler(Config config);

  void set_timesteps(int64_t num_inference_steps) override;
  at::Tensor step(const at::Tensor& model_output, size_t step, const at::Tensor& sample,
                  std::vector<at::Generator>* generators = nullptr) override;
  std::string name() const override { return "DPMSolverMultistepScheduler"; }
  std::vector<double> sigmas() const override { return sched::to_doubles(sigmas_); }

 private:
  at::Tensor convert_model_output(const at::Tensor& model_output, const at::Tensor& sample, int64_t i) const;
  at::Tensor first_order_update(const at::Tensor& model_output, const at::Tensor& sample, int64_t i) const;
  at::Tensor second_order_update(const at::Tensor& sample, int64_t i) const;

  Config config_;
  at::Tensor alphas_cumprod_;  // [T] float32
  at::Tensor sigmas_;          // [n + 1] float32, last = final sigma
  // Per-run state.
  std::vector<at::Tensor> model_outputs_;  // the last solver_order converted outputs, oldest first
  int lower_order_nums_ = 0;
  size_t next_step_ = 0;
};

}  // namespace fairdiff
