#include "ddim.h"

#include <nlohmann/json.hpp>

#include "config_json.h"
#include "fairdiff/error.h"

namespace fairdiff {

using namespace config_json;

DDIMScheduler::Config DDIMScheduler::Config::from_json(const nlohmann::json& config, const std::string& where) {
  Config c;
  c.schedule = sched::read_noise_schedule(config, NoiseScheduleConfig{}, /*with_rescale=*/true, where);
  c.clip_sample = get_bool(config, "clip_sample", c.clip_sample, where);
  c.clip_sample_range = get_number(config, "clip_sample_range", c.clip_sample_range, where);
  c.set_alpha_to_one = get_bool(config, "set_alpha_to_one", c.set_alpha_to_one, where);
  c.thresholding = get_bool(config, "thresholding", c.thresholding, where);
  c.dynamic_thresholding_ratio =
      get_number(config, "dynamic_thresholding_ratio", c.dynamic_thresholding_ratio, where);
  c.sample_max_value = get_number(config, "sample_max_value", c.sample_max_value, where);
  return c;
}

DDIMScheduler::DDIMScheduler(Config config) : config_(std::move(config)) {
  alphas_cumprod_ = sched::make_alphas_cumprod(config_.schedule, /*tiny_terminal_alpha=*/false);
  final_alpha_cumprod_ = config_.set_alpha_to_one ? sched::scalar(1.0) : alphas_cumprod_[0];
}

void DDIMScheduler::set_timesteps(int64_t n) {
  const int64_t T = config_.schedule.num_train_timesteps;
  if (n < 1 || n > T)
    throw_bad_input(name(), "num_inference_steps = " + std::to_string(n) + " must be between 1 and " +
                                "num_train_timesteps = " + std::to_string(T));
  num_inference_steps_ = n;
  timesteps_ = sched::spaced_timesteps(config_.schedule.timestep_spacing, T, n, config_.schedule.steps_offset,
                                       /*integer=*/true);
}

at::Tensor DDIMScheduler::step(const at::Tensor& model_output, size_t step, const at::Tensor& sample,
                               std::vector<at::Generator>* generators) {
  // model_output, sample: [B, C, H, W]. Notation of the paper: a_t = alphas_cumprod[t].
  sched::check_step(name(), step, step, timesteps_.size());
  const int64_t t = static_cast<int64_t>(timesteps_[step]);
  // 1. The previous timestep (always T // n earlier, whatever the spacing), and a_t, a_prev.
  const int64_t prev_t = t - config_.schedule.num_train_timesteps / num_inference_steps_;
  const at::Tensor alpha_prod_t = alphas_cumprod_[t];
  const at::Tensor alpha_prod_t_prev = prev_t >= 0 ? alphas_cumprod_[prev_t] : final_alpha_cumprod_;
  const at::Tensor beta_prod_t = 1 - alpha_prod_t;

  // 2. Predicted x_0 and epsilon, eq. (12): x_0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t).
  at::Tensor pred_original_sample, pred_epsilon;
  switch (config_.schedule.prediction_type) {
    case PredictionType::Epsilon:
      pred_original_sample = (sample - beta_prod_t.pow(0.5) * model_output) / alpha_prod_t.pow(0.5);
      pred_epsilon = model_output;
      break;
    case PredictionType::Sample:
      pred_original_sample = model_output;
      pred_epsilon = (sample - alpha_prod_t.pow(0.5) * pred_original_sample) / beta_prod_t.pow(0.5);
      break;
    case PredictionType::VPrediction:  // v = sqrt(a_t) eps - sqrt(1 - a_t) x_0
      pred_original_sample = alpha_prod_t.pow(0.5) * sample - beta_prod_t.pow(0.5) * model_output;
      pred_epsilon = alpha_prod_t.pow(0.5) * model_output + beta_prod_t.pow(0.5) * sample;
      break;
  }

  // 3. Clip or threshold x_0.
  if (config_.thresholding)
    pred_original_sample =
        sched::threshold_sample(pred_original_sample, config_.dynamic_thresholding_ratio, config_.sample_max_value);
  else if (config_.clip_sample)
    pred_original_sample = pred_original_sample.clamp(-config_.clip_sample_range, config_.clip_sample_range);

  // 4. sigma_t(eta) of eq. (16): eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)).
  const at::Tensor beta_prod_t_prev = 1 - alpha_prod_t_prev;
  const at::Tensor variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev);
  const at::Tensor std_dev_t = eta_ * variance.pow(0.5);

  // 5. The direction pointing to x_t, and x_prev of eq. (12).
  const at::Tensor pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t.pow(2)).pow(0.5) * pred_epsilon;
  at::Tensor prev_sample = alpha_prod_t_prev.pow(0.5) * pred_original_sample + pred_sample_direction;

  // 6. Fresh noise for eta > 0.
  if (eta_ > 0) prev_sample = prev_sample + std_dev_t * sched::batch_noise(model_output, generators, name());
  return prev_sample;
}

}  // namespace fairdiff
