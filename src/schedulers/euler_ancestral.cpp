#include "euler_ancestral.h"

#include <nlohmann/json.hpp>

#include "fairdiff/error.h"

namespace fairdiff {

EulerAncestralDiscreteScheduler::Config EulerAncestralDiscreteScheduler::Config::from_json(const nlohmann::json& config,
                                                                                           const std::string& where) {
  Config c;
  NoiseScheduleConfig defaults;
  defaults.timestep_spacing = TimestepSpacing::Linspace;
  c.schedule = sched::read_noise_schedule(config, defaults, /*with_rescale=*/true, where);
  if (c.schedule.prediction_type == PredictionType::Sample)  // diffusers: NotImplementedError
    sched::reject(where, "prediction_type = \"sample\" for EulerAncestralDiscreteScheduler", "epsilon, v_prediction");
  return c;
}

EulerAncestralDiscreteScheduler::EulerAncestralDiscreteScheduler(Config config) : config_(std::move(config)) {
  alphas_cumprod_ = sched::make_alphas_cumprod(config_.schedule, /*tiny_terminal_alpha=*/true);
}

void EulerAncestralDiscreteScheduler::set_timesteps(int64_t n) {
  if (n < 1) throw_bad_input(name(), "num_inference_steps = " + std::to_string(n) + " must be at least 1");
  // Timesteps (float32) and their sigmas, interpolated linearly in t over the training table; final sigma 0.
  sched::SigmaSchedule schedule = sched::sigma_schedule(config_.schedule, alphas_cumprod_, n, /*karras=*/false);
  timesteps_ = std::move(schedule.timesteps);
  schedule.sigmas.push_back(0.0);
  sigmas_ = sched::float_tensor(schedule.sigmas);
}

double EulerAncestralDiscreteScheduler::init_noise_sigma() const {
  return sched::k_init_noise_sigma(sigmas_, config_.schedule.timestep_spacing);
}

at::Tensor EulerAncestralDiscreteScheduler::scale_model_input(const at::Tensor& sample, size_t step) const {
  return sched::k_scale_model_input(sample, sigmas_[static_cast<int64_t>(step)]);
}

at::Tensor EulerAncestralDiscreteScheduler::step(const at::Tensor& model_output, size_t step,
                                                 const at::Tensor& sample_in, std::vector<at::Generator>* generators) {
  // model_output, sample: [B, C, H, W]; computed in float32, returned in the model output's dtype.
  sched::check_step(name(), step, step, timesteps_.size());
  const at::Tensor sample = sample_in.to(at::kFloat);
  const at::Tensor sigma = sigmas_[static_cast<int64_t>(step)];
  // 1. Predicted x_0.
  const at::Tensor pred_original_sample =
      config_.schedule.prediction_type == PredictionType::Epsilon
          ? sample - sigma * model_output
          : model_output * (-sigma / (sigma.pow(2) + 1).pow(0.5)) + sample / (sigma.pow(2) + 1);  // v
  // 2. Split the next noise level: sigma_up^2 = sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2,
  //    sigma_down^2 = sigma_to^2 - sigma_up^2.
  const at::Tensor sigma_from = sigmas_[static_cast<int64_t>(step)];
  const at::Tensor sigma_to = sigmas_[static_cast<int64_t>(step) + 1];
  const at::Tensor sigma_up = (sigma_to.pow(2) * (sigma_from.pow(2) - sigma_to.pow(2)) / sigma_from.pow(2)).pow(0.5);
  const at::Tensor sigma_down = (sigma_to.pow(2) - sigma_up.pow(2)).pow(0.5);
  // 3. Euler step down to sigma_down along dx/dsigma = (x - x_0) / sigma.
  const at::Tensor derivative = (sample - pred_original_sample) / sigma;
  const at::Tensor dt = sigma_down - sigma;
  at::Tensor prev_sample = sample + derivative * dt;
  // 4. Fresh noise up to sigma_to: item b from generators[b].
  const at::Tensor noise = sched::batch_noise(model_output, generators, name());
  prev_sample = prev_sample + noise * sigma_up;
  return prev_sample.to(model_output.scalar_type());
}

}  // namespace fairdiff
