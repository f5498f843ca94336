#include "euler.h"

#include <cmath>
#include <nlohmann/json.hpp>

#include "config_json.h"
#include "fairdiff/error.h"

namespace fairdiff {

using namespace config_json;

EulerDiscreteScheduler::Config EulerDiscreteScheduler::Config::from_json(const nlohmann::json& config,
                                                                         const std::string& where) {
  Config c;
  NoiseScheduleConfig defaults;
  defaults.timestep_spacing = TimestepSpacing::Linspace;
  c.schedule = sched::read_noise_schedule(config, defaults, /*with_rescale=*/true, where);
  sched::read_choice(config, "interpolation_type", "linear", {"linear"}, where);
  c.use_karras_sigmas = get_bool(config, "use_karras_sigmas", false, where);
  if (has_value(config, "sigma_min"))
    c.sigma_min = get_number(config, "sigma_min", 0.0, where);
  if (has_value(config, "sigma_max"))
    c.sigma_max = get_number(config, "sigma_max", 0.0, where);
  c.continuous_timesteps =
      sched::read_choice(config, "timestep_type", "discrete", {"discrete", "continuous"}, where) == 1;
  c.final_sigma_zero = sched::read_choice(config, "final_sigmas_type", "zero", {"zero", "sigma_min"}, where) == 0;
  return c;
}

EulerDiscreteScheduler::EulerDiscreteScheduler(Config config) : config_(std::move(config)) {
  alphas_cumprod_ = sched::make_alphas_cumprod(config_.schedule, /*tiny_terminal_alpha=*/true);
}

void EulerDiscreteScheduler::set_timesteps(int64_t n) {
  if (n < 1) throw_bad_input(name(), "num_inference_steps = " + std::to_string(n) + " must be at least 1");
  // 1. Timesteps and sigmas, interpolated or Karras (sigma_min / sigma_max of the config if set).
  sched::SigmaSchedule schedule = sched::sigma_schedule(config_.schedule, alphas_cumprod_, n, config_.use_karras_sigmas,
                                                        config_.sigma_min, config_.sigma_max);
  // 2. The final sigma: 0, or the smallest training sigma.
  schedule.sigmas.push_back(config_.final_sigma_zero ? 0.0 : sched::min_train_sigma(alphas_cumprod_));
  sigmas_ = sched::float_tensor(schedule.sigmas);
  // 3. Timesteps in float32 (Karras ones too), or 0.25 log sigma for continuous v-prediction models.
  timesteps_.clear();
  if (config_.continuous_timesteps && config_.schedule.prediction_type == PredictionType::VPrediction) {
    for (int64_t i = 0; i + 1 < sigmas_.size(0); ++i) timesteps_.push_back((0.25 * sigmas_[i].log()).item<double>());
  } else {
    for (double v : schedule.timesteps) timesteps_.push_back(static_cast<float>(v));
  }
}

double EulerDiscreteScheduler::init_noise_sigma() const {
  return sched::k_init_noise_sigma(sigmas_, config_.schedule.timestep_spacing);
}

at::Tensor EulerDiscreteScheduler::scale_model_input(const at::Tensor& sample, size_t step) const {
  return sched::k_scale_model_input(sample, sigmas_[static_cast<int64_t>(step)]);
}

at::Tensor EulerDiscreteScheduler::step(const at::Tensor& model_output, size_t step, const at::Tensor& sample_in,
                                        std::vector<at::Generator>* /*generators*/) {
  // model_output, sample: [B, C, H, W]; computed in float32, returned in the model output's dtype.
  sched::check_step(name(), step, step, timesteps_.size());
  const at::Tensor sample = sample_in.to(at::kFloat);
  const at::Tensor sigma = sigmas_[static_cast<int64_t>(step)];
  // (No churn: diffusers' s_churn defaults to 0, so sigma_hat = sigma and its noise draw is unused.)
  // 1. Predicted x_0 (the denoiser D(x; sigma) of the paper).
  const at::Tensor pred_original_sample =
      sched::predicted_original_sample(config_.schedule.prediction_type, model_output, sample, sigma);
  // 2. The ODE derivative dx/dsigma = (x - D(x)) / sigma, and one Euler step to the next sigma.
  const at::Tensor derivative = (sample - pred_original_sample) / sigma;
  const at::Tensor dt = sigmas_[static_cast<int64_t>(step) + 1] - sigma;
  const at::Tensor prev_sample = sample + derivative * dt;
  return prev_sample.to(model_output.scalar_type());
}

}  // namespace fairdiff
