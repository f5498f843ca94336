// LMSDiscreteScheduler: linear multistep (Adams-Bashforth, up to order 4) on the
// probability-flow ODE in sigma (k-diffusion's sample_lms). The coefficients are integrals
// of the Lagrange basis over [sigma_i, sigma_(i+1)], computed as scipy.integrate.quad does.
#pragma once

#include <functional>

#include "scheduler.h"

namespace fairdiff {

class LMSDiscreteScheduler : public Scheduler {
 public:
  struct Config {
    NoiseScheduleConfig schedule;  // diffusers defaults: linear 0.0001..0.02, epsilon, linspace, offset 0
    bool use_karras_sigmas = false;
    static Config from_json(const nlohmann::json& config, const std::string& where);
  };

  explicit LMSDiscreteScheduler(Config config);

  void set_timesteps(int64_t num_inference_steps) override;
  double init_noise_sigma() const override;
  at::Tensor scale_model_input(const at::Tensor& sample, size_t step) const override;
  at::Tensor step(const at::Tensor& model_output, size_t step, const at::Tensor& sample,
                  std::vector<at::Generator>* generators = nullptr) override;
  std::string name() const override { return "LMSDiscreteScheduler"; }
  std::vector<double> sigmas() const override { return sched::to_doubles(sigmas_); }

  // The weight of the derivative `current_order` steps back in step `step` of an `order`-step
  // method: integral over [sigma_step, sigma_(step+1)] of its Lagrange basis polynomial on the
  // last `order` sigmas (the polynomial in float32, as diffusers evaluates it on float32 sigmas).
  double lms_coefficient(int order, int64_t step, int current_order) const;

  static constexpr int kOrder = 4;  // diffusers' default `order` argument of step()

 private:
  Config config_;
  at::Tensor alphas_cumprod_;  // [T] float32
  at::Tensor sigmas_;          // [n + 1] float32, last = 0
  std::vector<float> sigma_values_;
  std::vector<at::Tensor> derivatives_;  // the last kOrder derivatives, oldest first
  size_t next_step_ = 0;
};

// scipy.integrate.quad for an integrand that the first 21-point Gauss-Kronrod rule already
// integrates within its tolerance (polynomials of degree < 20, as here): QUADPACK's qk21 on
// [a, b], in the same order of operations.
double gauss_kronrod_21(const std::function<double(double)>& f, double a, double b);

}  // namespace fairdiff
