#include "pndm.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "config_json.h"
#include "fairdiff/error.h"

namespace fairdiff {

using namespace config_json;

PNDMScheduler::Config PNDMScheduler::Config::from_json(const nlohmann::json& config, const std::string& where) {
  Config c;
  c.schedule = sched::read_noise_schedule(config, NoiseScheduleConfig{}, /*with_rescale=*/false, where);
  if (c.schedule.prediction_type == PredictionType::Sample)
    sched::reject(where, "prediction_type = \"sample\" for PNDMScheduler", "epsilon, v_prediction");
  c.skip_prk_steps = get_bool(config, "skip_prk_steps", c.skip_prk_steps, where);
  c.set_alpha_to_one = get_bool(config, "set_alpha_to_one", c.set_alpha_to_one, where);
  return c;
}

PNDMScheduler::PNDMScheduler(Config config) : config_(std::move(config)) {
  alphas_cumprod_ = sched::make_alphas_cumprod(config_.schedule, /*tiny_terminal_alpha=*/false);
  final_alpha_cumprod_ = config_.set_alpha_to_one ? sched::scalar(1.0) : alphas_cumprod_[0];
}

void PNDMScheduler::set_timesteps(int64_t n) {
  const int64_t T = config_.schedule.num_train_timesteps;
  if (n < 1 || (!config_.skip_prk_steps && n < 4))
    throw_bad_input(name(), "num_inference_steps = " + std::to_string(n) + " is too small",
                    config_.skip_prk_steps ? "use at least 1 step" : "the Runge-Kutta warm-up needs at least 4 steps");
  num_inference_steps_ = n;
  std::vector<int64_t> asc;  // diffusers' _timesteps, ascending
  for (double t : sched::spaced_timesteps(config_.schedule.timestep_spacing, T, n, config_.schedule.steps_offset,
                                          /*integer=*/true))
    asc.insert(asc.begin(), static_cast<int64_t>(t));
  const int64_t m = static_cast<int64_t>(asc.size());

  std::vector<int64_t> plms;
  prk_timesteps_.clear();
  if (config_.skip_prk_steps) {
    // PLMS only (crowsonkb's sampler): the second-largest timestep appears twice, because the
    // second call re-integrates from the first timestep with the averaged model output.
    plms.assign(asc.begin(), asc.end() - 1);
    if (m >= 2) plms.push_back(asc[m - 2]);
    plms.push_back(asc[m - 1]);
  } else {
    // Runge-Kutta warm-up over the last 4 timesteps: each step visits t, t - ratio/2 (twice), t - ratio.
    const int64_t half = T / n / 2;
    std::vector<int64_t> prk;
    for (int64_t i = m - 4; i < m; ++i) prk.insert(prk.end(), {asc[i], asc[i] + half});
    prk.pop_back();
    for (size_t i = 0; i < prk.size(); ++i) {
      if (i > 0) prk_timesteps_.push_back(prk[i]);
      if (i + 1 < prk.size()) prk_timesteps_.push_back(prk[i]);
    }
    std::reverse(prk_timesteps_.begin(), prk_timesteps_.end());
    plms.assign(asc.begin(), asc.end() - 3);
  }
  std::reverse(plms.begin(), plms.end());

  timesteps_.clear();
  for (int64_t t : prk_timesteps_) timesteps_.push_back(static_cast<double>(t));
  for (int64_t t : plms) timesteps_.push_back(static_cast<double>(t));
  counter_ = 0;
  ets_.clear();
  cur_sample_ = at::Tensor();
  cur_model_output_ = at::Tensor();
}

at::Tensor PNDMScheduler::step(const at::Tensor& model_output, size_t step, const at::Tensor& sample,
                               std::vector<at::Generator>* /*generators*/) {
  // model_output, sample: [B, C, H, W]
  sched::check_step(name(), step, counter_, timesteps_.size());
  const int64_t t = static_cast<int64_t>(timesteps_[step]);
  if (counter_ < prk_timesteps_.size() && !config_.skip_prk_steps) return step_prk(model_output, t, sample);
  return step_plms(model_output, t, sample);
}

at::Tensor PNDMScheduler::step_prk(const at::Tensor& model_output, int64_t timestep, const at::Tensor& sample) {
  // Classical 4-stage Runge-Kutta with the model output as the derivative (Algorithm 2, PRK):
  // e = e1/6 + e2/3 + e3/3 + e4/6, every stage restarting from the sample of the first stage.
  const int64_t ratio = config_.schedule.num_train_timesteps / num_inference_steps_;
  const int64_t prev_timestep = timestep - (counter_ % 2 ? 0 : ratio / 2);
  const int64_t t = prk_timesteps_[counter_ / 4 * 4];
  auto accumulate = [this](const at::Tensor& x) {
    cur_model_output_ = cur_model_output_.defined() ? cur_model_output_ + x : x;
  };
  at::Tensor e = model_output;
  switch (counter_ % 4) {
    case 0:
      accumulate((1.0 / 6) * model_output);
      ets_.push_back(model_output);
      cur_sample_ = sample;
      break;
    case 1:
    case 2:
      accumulate((1.0 / 3) * model_output);
      break;
    default:
      e = cur_model_output_ + (1.0 / 6) * model_output;
      cur_model_output_ = at::Tensor();
  }
  const at::Tensor& start = cur_sample_.defined() ? cur_sample_ : sample;
  at::Tensor prev = prev_sample(start, t, prev_timestep, e);
  ++counter_;
  return prev;
}

at::Tensor PNDMScheduler::step_plms(const at::Tensor& model_output, int64_t timestep, const at::Tensor& sample) {
  // Linear multistep (Adams-Bashforth) on the model outputs, equation (12) of the paper.
  const int64_t ratio = config_.schedule.num_train_timesteps / num_inference_steps_;
  // 1. Which interval: the second call repeats the first interval, [t + ratio -> t].
  int64_t t = timestep, prev_timestep = timestep - ratio;
  if (counter_ != 1) {
    if (ets_.size() > 3) ets_.erase(ets_.begin(), ets_.end() - 3);
    ets_.push_back(model_output);
  } else {
    prev_timestep = timestep;
    t = timestep + ratio;
  }
  // 2. The combined model output: Euler, then the trapezoid (Heun) correction of the first
  //    interval, then Adams-Bashforth of order 2, 3 and 4.
  const size_t n = ets_.size();
  at::Tensor e;
  at::Tensor x = sample;
  if (n == 1 && counter_ == 0) {
    e = model_output;
    cur_sample_ = sample;
  } else if (n == 1 && counter_ == 1) {
    e = (model_output + ets_.back()) / 2;
    x = cur_sample_;
    cur_sample_ = at::Tensor();
  } else if (n == 2) {
    e = (3 * ets_[n - 1] - ets_[n - 2]) / 2;
  } else if (n == 3) {
    e = (23 * ets_[n - 1] - 16 * ets_[n - 2] + 5 * ets_[n - 3]) / 12;
  } else {
    e = (1.0 / 24) * (55 * ets_[n - 1] - 59 * ets_[n - 2] + 37 * ets_[n - 3] - 9 * ets_[n - 4]);
  }
  // 3. Transfer x_t -> x_(t-delta) with that output.
  at::Tensor prev = prev_sample(x, t, prev_timestep, e);
  ++counter_;
  return prev;
}

at::Tensor PNDMScheduler::prev_sample(const at::Tensor& sample, int64_t timestep, int64_t prev_timestep,
                                      at::Tensor model_output) const {
  // The transfer part of formula (9): with a = alphas_cumprod,
  //   x_prev = sqrt(a_prev / a_t) x_t - (a_prev - a_t) e / (a_t sqrt(1 - a_prev) + sqrt(a_t (1 - a_t) a_prev)).
  const at::Tensor alpha_prod_t = alphas_cumprod_[timestep];
  const at::Tensor alpha_prod_t_prev = prev_timestep >= 0 ? alphas_cumprod_[prev_timestep] : final_alpha_cumprod_;
  const at::Tensor beta_prod_t = 1 - alpha_prod_t;
  const at::Tensor beta_prod_t_prev = 1 - alpha_prod_t_prev;
  if (config_.schedule.prediction_type == PredictionType::VPrediction)  // v -> epsilon
    model_output = alpha_prod_t.pow(0.5) * model_output + beta_prod_t.pow(0.5) * sample;
  const at::Tensor sample_coeff = (alpha_prod_t_prev / alpha_prod_t).pow(0.5);
  const at::Tensor denom =
      alpha_prod_t * beta_prod_t_prev.pow(0.5) + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev).pow(0.5);
  return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / denom;
}

}  // namespace fairdiff
