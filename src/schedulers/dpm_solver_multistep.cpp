#include "dpm_solver_multistep.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "config_json.h"
#include "fairdiff/error.h"

namespace fairdiff {

using namespace config_json;

namespace {

// alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t: the VP pair of a k-diffusion sigma.
std::pair<at::Tensor, at::Tensor> alpha_sigma(const at::Tensor& sigma) {
  const at::Tensor alpha_t = (sigma.pow(2) + 1).pow(0.5).reciprocal();
  return {alpha_t, sigma * alpha_t};
}

// A config number that Python's json may have written as -Infinity / Infinity / NaN (read
// here as a number, or as a string where the reader turned those tokens into strings).
double read_extended_number(const nlohmann::json& config, const std::string& key, double fallback,
                            const std::string& where) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return fallback;
  if (it->is_string()) {
    const std::string v = it->get<std::string>();
    if (v == "-Infinity" || v == "-inf") return -INFINITY;
    if (v == "Infinity" || v == "inf") return INFINITY;
    if (v == "NaN" || v == "nan") return NAN;
  }
  return get_number(config, key, fallback, where);
}

}  // namespace

DPMSolverMultistepScheduler::Config DPMSolverMultistepScheduler::Config::from_json(const nlohmann::json& config,
                                                                                   const std::string& where) {
  Config c;
  NoiseScheduleConfig defaults;
  defaults.timestep_spacing = TimestepSpacing::Linspace;
  c.schedule = sched::read_noise_schedule(config, defaults, /*with_rescale=*/true, where);
  c.solver_order = static_cast<int>(get_int(config, "solver_order", c.solver_order, where));
  if (c.solver_order != 1 && c.solver_order != 2)
    sched::reject(where, "solver_order = " + std::to_string(c.solver_order), "1, 2");
  c.thresholding = get_bool(config, "thresholding", c.thresholding, where);
  c.dynamic_thresholding_ratio =
      get_number(config, "dynamic_thresholding_ratio", c.dynamic_thresholding_ratio, where);
  c.sample_max_value = get_number(config, "sample_max_value", c.sample_max_value, where);
  // diffusers maps "deis" to dpmsolver++ and the UniPC/DEIS solver types to midpoint.
  const size_t algorithm =
      sched::read_choice(config, "algorithm_type", "dpmsolver++", {"dpmsolver++", "dpmsolver", "deis"}, where);
  c.algorithm_type = algorithm == 1 ? Algorithm::DPMSolver : Algorithm::DPMSolverPP;
  const size_t solver =
      sched::read_choice(config, "solver_type", "midpoint", {"midpoint", "heun", "logrho", "bh1", "bh2"}, where);
  c.solver_type = solver == 1 ? SolverType::Heun : SolverType::Midpoint;
  c.lower_order_final = get_bool(config, "lower_order_final", c.lower_order_final, where);
  c.euler_at_final = get_bool(config, "euler_at_final", c.euler_at_final, where);
  c.use_karras_sigmas = get_bool(config, "use_karras_sigmas", c.use_karras_sigmas, where);
  c.use_lu_lambdas = get_bool(config, "use_lu_lambdas", c.use_lu_lambdas, where);
  // diffusers reads sigma_min / sigma_max whenever its config has them (e.g. carried over from an Euler config).
  if (has_value(config, "sigma_min"))
    c.sigma_min = get_number(config, "sigma_min", 0.0, where);
  if (has_value(config, "sigma_max"))
    c.sigma_max = get_number(config, "sigma_max", 0.0, where);
  c.final_sigma_zero = sched::read_choice(config, "final_sigmas_type", "zero", {"zero", "sigma_min"}, where) == 0;
  if (c.final_sigma_zero && c.algorithm_type == Algorithm::DPMSolver)
    sched::reject(where, "final_sigmas_type = \"zero\" with algorithm_type = \"dpmsolver\"",
                  "final_sigmas_type \"sigma_min\" for dpmsolver, or algorithm_type \"dpmsolver++\"");
  c.lambda_min_clipped = read_extended_number(config, "lambda_min_clipped", c.lambda_min_clipped, where);
  const std::string variance = get_string(config, "variance_type", "", where);
  c.learned_variance = variance == "learned" || variance == "learned_range";
  return c;
}

DPMSolverMultistepScheduler::DPMSolverMultistepScheduler(Config config) : config_(std::move(config)) {
  alphas_cumprod_ = sched::make_alphas_cumprod(config_.schedule, /*tiny_terminal_alpha=*/true);
}

void DPMSolverMultistepScheduler::set_timesteps(int64_t n) {
  if (n < 1) throw_bad_input(name(), "num_inference_steps = " + std::to_string(n) + " must be at least 1");
  const NoiseScheduleConfig& s = config_.schedule;
  const int64_t T = s.num_train_timesteps;
  // 1. Leave out the training timesteps whose lambda is below lambda_min_clipped (cosine schedules).
  const at::Tensor lambda_t =
      (alphas_cumprod_.sqrt().log() - (1 - alphas_cumprod_).sqrt().log()).contiguous();  // [T], decreasing
  const float* lambda = lambda_t.data_ptr<float>();
  int64_t clipped = 0;  // torch.searchsorted(flip(lambda_t), lambda_min_clipped): the count below it
  for (int64_t i = 0; i < T; ++i)
    if (lambda[i] < config_.lambda_min_clipped) ++clipped;
  const int64_t last_timestep = T - clipped;

  // 2. n integer timesteps: n + 1 evenly spaced points without the smallest (linspace, leading),
  //    or steps of T / n down from last_timestep (trailing).
  std::vector<double> t;
  switch (s.timestep_spacing) {
    case TimestepSpacing::Linspace:
      for (double v : sched::np_linspace(0, static_cast<double>(last_timestep - 1), n + 1))
        t.push_back(sched::np_round(v));
      std::reverse(t.begin(), t.end());
      t.pop_back();
      break;
    case TimestepSpacing::Leading: {
      const int64_t ratio = last_timestep / (n + 1);
      for (int64_t k = n; k >= 1; --k) t.push_back(static_cast<double>(k * ratio + s.steps_offset));
      break;
    }
    case TimestepSpacing::Trailing:
      for (double v : sched::np_arange(static_cast<double>(last_timestep), 0, -static_cast<double>(T) / n))
        t.push_back(sched::np_round(v) - 1);
      break;
  }

  // 3. Sigmas: interpolated at those timesteps, or Karras / uniform-lambda sigmas whose
  //    timesteps are then read back off the training table and rounded.
  const std::vector<float> table = sched::train_sigmas(alphas_cumprod_);
  const std::vector<float> log_sigmas = sched::log_sigmas(table);
  std::vector<double> sigmas;
  if (config_.use_karras_sigmas || config_.use_lu_lambdas) {
    if (config_.use_karras_sigmas) {
      sigmas =
          sched::karras_sigmas(config_.sigma_min.value_or(table.front()), config_.sigma_max.value_or(table.back()), n);
    } else {  // lambdas linear from log sigma_max down to log sigma_min (rho = 1)
      for (double r : sched::np_linspace(0, 1, n))
        sigmas.push_back(
            std::exp(static_cast<double>(log_sigmas.back()) +
                     r * (static_cast<double>(log_sigmas.front()) - static_cast<double>(log_sigmas.back()))));
    }
    t.clear();
    for (double sigma : sigmas) t.push_back(sched::np_round(sched::sigma_to_t(sigma, log_sigmas)));
  } else {
    for (double v : t) sigmas.push_back(sched::np_interp_index(v, table));
  }
  sigmas.push_back(config_.final_sigma_zero ? 0.0 : sched::min_train_sigma(alphas_cumprod_));
  sigmas_ = sched::float_tensor(sigmas);
  timesteps_.clear();
  for (double v : t) timesteps_.push_back(static_cast<double>(static_cast<int64_t>(v)));

  model_outputs_.assign(config_.solver_order, at::Tensor());
  lower_order_nums_ = 0;
  next_step_ = 0;
}

at::Tensor DPMSolverMultistepScheduler::convert_model_output(const at::Tensor& model_output, const at::Tensor& sample,
                                                             int64_t i) const {
  // DPM-Solver++ integrates the data prediction x_0, DPM-Solver the noise prediction eps;
  // with x_t = alpha_t x_0 + sigma_t eps either follows from the other.
  const auto [alpha_t, sigma_t] = alpha_sigma(sigmas_[i]);
  const PredictionType prediction = config_.schedule.prediction_type;
  const at::Tensor output = config_.learned_variance ? model_output.slice(1, 0, 3) : model_output;
  if (config_.algorithm_type == Algorithm::DPMSolverPP) {
    at::Tensor x0_pred = prediction == PredictionType::Epsilon  ? (sample - sigma_t * output) / alpha_t
                         : prediction == PredictionType::Sample ? model_output
                                                                : alpha_t * sample - sigma_t * model_output;  // v
    if (config_.thresholding)
      x0_pred = sched::threshold_sample(x0_pred, config_.dynamic_thresholding_ratio, config_.sample_max_value);
    return x0_pred;
  }
  at::Tensor epsilon = prediction == PredictionType::Epsilon  ? output
                       : prediction == PredictionType::Sample ? (sample - alpha_t * model_output) / sigma_t
                                                              : alpha_t * model_output + sigma_t * sample;  // v
  if (config_.thresholding) {
    at::Tensor x0_pred = (sample - sigma_t * epsilon) / alpha_t;
    x0_pred = sched::threshold_sample(x0_pred, config_.dynamic_thresholding_ratio, config_.sample_max_value);
    epsilon = (sample - alpha_t * x0_pred) / sigma_t;
  }
  return epsilon;
}

at::Tensor DPMSolverMultistepScheduler::first_order_update(const at::Tensor& m, const at::Tensor& sample,
                                                           int64_t i) const {
  // DPM-Solver-1 (= DDIM) from s = step i to t = step i + 1, with h = lambda_t - lambda_s:
  //   ++: x_t = sigma_t / sigma_s x_s - alpha_t (e^-h - 1) x0;   plain: x_t = alpha_t / alpha_s x_s - sigma_t (e^h - 1)
  //   eps.
  const auto [alpha_t, sigma_t] = alpha_sigma(sigmas_[i + 1]);
  const auto [alpha_s, sigma_s] = alpha_sigma(sigmas_[i]);
  const at::Tensor lambda_t = alpha_t.log() - sigma_t.log();
  const at::Tensor lambda_s = alpha_s.log() - sigma_s.log();
  const at::Tensor h = lambda_t - lambda_s;
  if (config_.algorithm_type == Algorithm::DPMSolverPP)
    return (sigma_t / sigma_s) * sample - (alpha_t * (at::exp(-h) - 1.0)) * m;
  return (alpha_t / alpha_s) * sample - (sigma_t * (at::exp(h) - 1.0)) * m;
}

at::Tensor DPMSolverMultistepScheduler::second_order_update(const at::Tensor& sample, int64_t i) const {
  // Multistep second order from s0 = step i (with s1 = step i - 1) to t = step i + 1:
  // D0 = m0, D1 = (m0 - m1) / r0 with r0 = h_0 / h the ratio of the last two lambda steps.
  const auto [alpha_t, sigma_t] = alpha_sigma(sigmas_[i + 1]);
  const auto [alpha_s0, sigma_s0] = alpha_sigma(sigmas_[i]);
  const auto [alpha_s1, sigma_s1] = alpha_sigma(sigmas_[i - 1]);
  const at::Tensor lambda_t = alpha_t.log() - sigma_t.log();
  const at::Tensor lambda_s0 = alpha_s0.log() - sigma_s0.log();
  const at::Tensor lambda_s1 = alpha_s1.log() - sigma_s1.log();
  const at::Tensor& m0 = model_outputs_[model_outputs_.size() - 1];
  const at::Tensor& m1 = model_outputs_[model_outputs_.size() - 2];
  const at::Tensor h = lambda_t - lambda_s0, h_0 = lambda_s0 - lambda_s1;
  const at::Tensor r0 = h_0 / h;
  const at::Tensor& D0 = m0;
  const at::Tensor D1 = r0.reciprocal() * (m0 - m1);
  const bool midpoint = config_.solver_type == SolverType::Midpoint;
  if (config_.algorithm_type == Algorithm::DPMSolverPP) {  // eq. (4.9)-style updates of the ++ paper
    const at::Tensor a = alpha_t * (at::exp(-h) - 1.0);
    if (midpoint) return (sigma_t / sigma_s0) * sample - a * D0 - (0.5 * a) * D1;
    return (sigma_t / sigma_s0) * sample - a * D0 + (alpha_t * ((at::exp(-h) - 1.0) / h + 1.0)) * D1;
  }
  const at::Tensor a = sigma_t * (at::exp(h) - 1.0);
  if (midpoint) return (alpha_t / alpha_s0) * sample - a * D0 - (0.5 * a) * D1;
  return (alpha_t / alpha_s0) * sample - a * D0 - (sigma_t * ((at::exp(h) - 1.0) / h - 1.0)) * D1;
}

at::Tensor DPMSolverMultistepScheduler::step(const at::Tensor& model_output, size_t step, const at::Tensor& sample,
                                             std::vector<at::Generator>* /*generators*/) {
  // model_output, sample: [B, C, H, W]; the update is computed on a float32 sample and
  // returned in the model output's dtype.
  sched::check_step(name(), step, next_step_, timesteps_.size());
  const int64_t i = static_cast<int64_t>(step);
  const int64_t n = static_cast<int64_t>(timesteps_.size());
  // 1. Fall back to first order at the final step (always with a final sigma of zero, where
  //    the second-order term is undefined; and for short schedules with lower_order_final).
  const bool lower_order_final =
      i == n - 1 && (config_.euler_at_final || (config_.lower_order_final && n < 15) || config_.final_sigma_zero);
  // 2. Convert the output and push it into the history.
  const at::Tensor m = convert_model_output(model_output, sample, i);
  std::rotate(model_outputs_.begin(), model_outputs_.begin() + 1, model_outputs_.end());
  model_outputs_.back() = m;
  // 3. First order until there is a history (and at the end), else second order.
  const at::Tensor x = sample.to(at::kFloat);
  at::Tensor prev_sample = config_.solver_order == 1 || lower_order_nums_ < 1 || lower_order_final
                               ? first_order_update(m, x, i)
                               : second_order_update(x, i);
  if (lower_order_nums_ < config_.solver_order) ++lower_order_nums_;
  ++next_step_;
  return prev_sample.to(m.scalar_type());
}

}  // namespace fairdiff
