#include "scheduler.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "config_json.h"
#include "fairdiff/error.h"
#include "ddim.h"
#include "dpm_solver_multistep.h"
#include "euler.h"
#include "euler_ancestral.h"
#include "lms.h"
#include "pndm.h"
#include "scheduler_table.h"
#include "string_util.h"

namespace fairdiff {

using namespace config_json;

namespace {

constexpr double kPi = 3.141592653589793;  // Python's math.pi

}  // namespace

namespace sched {

namespace {

// rescale_zero_terminal_snr of Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample
// Steps are Flawed", algorithm 1), in diffusers' float32 ops: shift sqrt(alphas_cumprod) so
// that its last value is 0, scale it back to its first value, and undo the cumprod.
at::Tensor rescale_zero_terminal_snr(const at::Tensor& betas) {
  at::Tensor alphas_bar_sqrt = at::cumprod(1.0 - betas, 0).sqrt();
  const at::Tensor first = alphas_bar_sqrt[0].clone();
  const at::Tensor last = alphas_bar_sqrt[-1].clone();
  alphas_bar_sqrt -= last;
  alphas_bar_sqrt *= first / (first - last);
  const at::Tensor alphas_bar = alphas_bar_sqrt.pow(2);
  const at::Tensor alphas = at::cat({alphas_bar.slice(0, 0, 1), alphas_bar.slice(0, 1) / alphas_bar.slice(0, 0, -1)});
  return 1 - alphas;
}

}  // namespace

void reject(const std::string& where, const std::string& what, const std::string& supported) {
  throw_unsupported(where, what + " is not supported (supported: " + supported + ")",
                    "choose a supported value in the scheduler config or pick another scheduler");
}

size_t read_choice(const nlohmann::json& config, const std::string& key, const std::string& fallback,
                   const std::vector<std::string>& allowed, const std::string& where) {
  const std::string value = get_string(config, key, fallback, where);
  for (size_t i = 0; i < allowed.size(); ++i)
    if (value == allowed[i]) return i;
  reject(where, key + " = \"" + value + "\"", join(allowed));
}

NoiseScheduleConfig read_noise_schedule(const nlohmann::json& config, NoiseScheduleConfig c, bool with_rescale,
                                        const std::string& where) {
  c.num_train_timesteps = get_int(config, "num_train_timesteps", c.num_train_timesteps, where);
  if (c.num_train_timesteps < 2)
    throw_bad_input(where, "num_train_timesteps = " + std::to_string(c.num_train_timesteps) + " must be at least 2");
  c.beta_start = get_number(config, "beta_start", c.beta_start, where);
  c.beta_end = get_number(config, "beta_end", c.beta_end, where);
  c.beta_schedule = static_cast<BetaSchedule>(
      read_choice(config, "beta_schedule", "linear", {"linear", "scaled_linear", "squaredcos_cap_v2"}, where));
  c.trained_betas = get_number_list(config, "trained_betas", {}, where);
  if (!c.trained_betas.empty() && static_cast<int64_t>(c.trained_betas.size()) != c.num_train_timesteps)
    throw_bad_input(where, "trained_betas has " + std::to_string(c.trained_betas.size()) + " values, expected " +
                               "num_train_timesteps = " + std::to_string(c.num_train_timesteps));
  if (with_rescale) c.rescale_betas_zero_snr = get_bool(config, "rescale_betas_zero_snr", false, where);
  const char* spacing_default = c.timestep_spacing == TimestepSpacing::Linspace  ? "linspace"
                                : c.timestep_spacing == TimestepSpacing::Leading ? "leading"
                                                                                 : "trailing";
  c.timestep_spacing = static_cast<TimestepSpacing>(
      read_choice(config, "timestep_spacing", spacing_default, {"linspace", "leading", "trailing"}, where));
  c.prediction_type = static_cast<PredictionType>(
      read_choice(config, "prediction_type", "epsilon", {"epsilon", "v_prediction", "sample"}, where));
  c.steps_offset = get_int(config, "steps_offset", c.steps_offset, where);
  return c;
}

at::Tensor make_betas(const NoiseScheduleConfig& c) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const int64_t n = c.num_train_timesteps;
  at::Tensor betas;
  if (!c.trained_betas.empty()) {
    betas = at::tensor(c.trained_betas, at::TensorOptions().dtype(at::kDouble)).to(at::kFloat);
  } else if (c.beta_schedule == BetaSchedule::Linear) {
    betas = at::linspace(c.beta_start, c.beta_end, n, f32);
  } else if (c.beta_schedule == BetaSchedule::ScaledLinear) {
    // Linear in sqrt(beta) (latent diffusion); the square roots are Python floats.
    betas = at::linspace(std::pow(c.beta_start, 0.5), std::pow(c.beta_end, 0.5), n, f32).pow(2);
  } else {
    // Glide's cosine schedule (Nichol & Dhariwal 2021): alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2),
    // beta_i = min(1 - alpha_bar((i+1)/n) / alpha_bar(i/n), 0.999), in float64.
    auto alpha_bar = [](double t) {
      const double c = std::cos((t + 0.008) / 1.008 * kPi / 2);
      return c * c;
    };
    std::vector<double> b(n);
    for (int64_t i = 0; i < n; ++i)
      b[i] = std::min(1 - alpha_bar(static_cast<double>(i + 1) / n) / alpha_bar(static_cast<double>(i) / n), 0.999);
    betas = at::tensor(b, at::TensorOptions().dtype(at::kDouble)).to(at::kFloat);
  }
  if (c.rescale_betas_zero_snr) betas = rescale_zero_terminal_snr(betas);
  return betas;
}

at::Tensor make_alphas_cumprod(const NoiseScheduleConfig& config, bool tiny_terminal_alpha) {
  at::Tensor alphas_cumprod = at::cumprod(1.0 - make_betas(config), 0);
  // A zero terminal SNR makes the first sigma infinite; 2^-24 (the smallest float16 subnormal) keeps it finite.
  if (config.rescale_betas_zero_snr && tiny_terminal_alpha) alphas_cumprod[-1].fill_(std::ldexp(1.0, -24));
  return alphas_cumprod;
}

std::vector<float> train_sigmas(const at::Tensor& alphas_cumprod) {
  const at::Tensor s = ((1 - alphas_cumprod) / alphas_cumprod).pow(0.5).contiguous();
  return std::vector<float>(s.data_ptr<float>(), s.data_ptr<float>() + s.numel());
}

std::vector<float> log_sigmas(const std::vector<float>& train_sigmas) {
  std::vector<float> out;
  for (float v : train_sigmas) out.push_back(std::log(v));
  return out;
}

double min_train_sigma(const at::Tensor& alphas_cumprod) {
  return ((1 - alphas_cumprod[0]) / alphas_cumprod[0]).pow(0.5).item<double>();
}

SigmaSchedule sigma_schedule(const NoiseScheduleConfig& c, const at::Tensor& alphas_cumprod, int64_t n, bool karras,
                             std::optional<double> sigma_min, std::optional<double> sigma_max) {
  SigmaSchedule s;
  // 1. Timesteps (float32), and their sigmas interpolated linearly in t over the training table.
  s.timesteps = spaced_timesteps(c.timestep_spacing, c.num_train_timesteps, n, c.steps_offset, /*integer=*/false);
  const std::vector<float> table = train_sigmas(alphas_cumprod);
  for (double t : s.timesteps) s.sigmas.push_back(np_interp_index(t, table));
  if (!karras) return s;
  // 2. Karras sigmas between the ends of that schedule, mapped back to fractional timesteps.
  const std::vector<float> logs = log_sigmas(table);
  s.sigmas = karras_sigmas(sigma_min.value_or(s.sigmas.back()), sigma_max.value_or(s.sigmas.front()), n);
  s.timesteps.clear();
  for (double sigma : s.sigmas) s.timesteps.push_back(sigma_to_t(sigma, logs));
  return s;
}

double np_round(double x) { return std::nearbyint(x); }  // default rounding mode: half to even, like numpy.rint

std::vector<double> np_linspace(double start, double stop, int64_t num) {
  std::vector<double> y(std::max<int64_t>(num, 0));
  const int64_t div = num - 1;
  const double delta = stop - start;
  for (int64_t k = 0; k < num; ++k) {
    if (div > 0) {
      const double step = delta / static_cast<double>(div);
      y[k] = (step == 0 ? static_cast<double>(k) / div * delta : static_cast<double>(k) * step) + start;
    } else {
      y[k] = static_cast<double>(k) * delta + start;
    }
  }
  if (div > 0) y[num - 1] = stop;
  return y;
}

std::vector<double> np_arange(double start, double stop, double step) {
  const double len = std::ceil((stop - start) / step);
  if (!(len > 0)) return {};
  std::vector<double> y(static_cast<size_t>(len));
  y[0] = start;
  if (y.size() > 1) y[1] = start + step;
  const double delta = y.size() > 1 ? y[1] - y[0] : 0.0;  // numpy fills start + i * (second - first)
  for (size_t i = 2; i < y.size(); ++i) y[i] = start + static_cast<double>(i) * delta;
  return y;
}

double np_interp_index(double x, const std::vector<float>& fp) {
  const int64_t n = static_cast<int64_t>(fp.size());
  if (x <= 0) return fp[0];
  if (x >= static_cast<double>(n - 1)) return fp[n - 1];
  const int64_t j = static_cast<int64_t>(std::floor(x));
  if (static_cast<double>(j) == x) return fp[j];
  const double slope = (static_cast<double>(fp[j + 1]) - static_cast<double>(fp[j])) / 1.0;
  return slope * (x - static_cast<double>(j)) + static_cast<double>(fp[j]);
}

std::vector<double> karras_sigmas(double sigma_min, double sigma_max, int64_t n) {
  const double rho = 7.0;  // the value of the paper
  const double min_inv_rho = std::pow(sigma_min, 1 / rho);
  const double max_inv_rho = std::pow(sigma_max, 1 / rho);
  std::vector<double> sigmas;
  for (double r : np_linspace(0, 1, n)) sigmas.push_back(std::pow(max_inv_rho + r * (min_inv_rho - max_inv_rho), rho));
  return sigmas;
}

double sigma_to_t(double sigma, const std::vector<float>& log_sigmas) {
  // numpy 1.x value-based casting: the float64 log sigma meets float32 arrays, so the
  // comparisons and the interpolation weight are float32; t itself is float64.
  const float log_sigma = static_cast<float>(std::log(std::max(sigma, 1e-10)));
  const int64_t n = static_cast<int64_t>(log_sigmas.size());
  int64_t low = 0;  // the last index with log_sigmas[i] <= log_sigma (0 when none)
  for (int64_t i = 0; i < n; ++i)
    if (log_sigma - log_sigmas[i] >= 0) low = i;
  low = std::min(low, n - 2);
  const float lo = log_sigmas[low], hi = log_sigmas[low + 1];
  float w = (lo - log_sigma) / (lo - hi);
  w = std::min(std::max(w, 0.0f), 1.0f);
  return static_cast<double>(1.0f - w) * static_cast<double>(low) +
         static_cast<double>(w) * static_cast<double>(low + 1);
}

std::vector<double> spaced_timesteps(TimestepSpacing spacing, int64_t num_train_timesteps, int64_t n,
                                     int64_t steps_offset, bool integer) {
  std::vector<double> t;
  switch (spacing) {
    case TimestepSpacing::Linspace:  // evenly over [0, T-1], both ends included
      for (double v : np_linspace(0, static_cast<double>(num_train_timesteps - 1), n))
        t.push_back(integer ? np_round(v) : static_cast<double>(static_cast<float>(v)));
      std::reverse(t.begin(), t.end());
      break;
    case TimestepSpacing::Leading: {  // multiples of T // n from 0, shifted by steps_offset
      const int64_t ratio = num_train_timesteps / n;
      for (int64_t k = n - 1; k >= 0; --k) t.push_back(static_cast<double>(k * ratio + steps_offset));
      break;
    }
    case TimestepSpacing::Trailing: {  // T - k T/n, rounded, minus one: always starts at T-1
      const double ratio = static_cast<double>(num_train_timesteps) / static_cast<double>(n);
      for (double v : np_arange(static_cast<double>(num_train_timesteps), 0, -ratio)) t.push_back(np_round(v) - 1);
      break;
    }
  }
  return t;
}

at::Tensor threshold_sample(const at::Tensor& x, double ratio, double max_value) {
  // x: [B, C, ...]
  const at::ScalarType dtype = x.scalar_type();
  at::Tensor y = (dtype == at::kFloat || dtype == at::kDouble) ? x : x.to(at::kFloat);
  y = y.reshape({x.size(0), -1});  // [B, C*H*W]
  at::Tensor s = at::quantile(y.abs(), ratio, /*dim=*/1);
  s = at::clamp(s, c10::optional<at::Scalar>(1), c10::optional<at::Scalar>(max_value)).unsqueeze(1);  // [B, 1]
  y = at::clamp(y, c10::optional<at::Tensor>(-s), c10::optional<at::Tensor>(s)) / s;
  return y.reshape(x.sizes()).to(dtype);
}

at::Tensor batch_noise(const at::Tensor& like, std::vector<at::Generator>* generators, const std::string& who) {
  const auto cpu_f32 = at::TensorOptions().dtype(at::kFloat).device(at::kCPU);
  std::vector<int64_t> shape = like.sizes().vec();
  at::Tensor noise;
  if (!generators || generators->empty()) {
    noise = at::randn(shape, cpu_f32);
  } else if (generators->size() == 1) {  // one generator for the whole batch, as diffusers does with one
    noise = at::randn(shape, (*generators)[0], cpu_f32);
  } else {
    if (static_cast<int64_t>(generators->size()) != shape[0])
      throw_bad_input(
          who, "got " + std::to_string(generators->size()) + " generators for a batch of " + std::to_string(shape[0]),
          "pass one CPU generator per batch item");
    shape[0] = 1;
    std::vector<at::Tensor> items;
    for (auto& g : *generators) items.push_back(at::randn(shape, g, cpu_f32));  // [1, C, H, W] each
    noise = at::cat(items, 0);
  }
  return noise.to(like.device(), like.scalar_type());
}

double k_init_noise_sigma(const at::Tensor& sigmas, TimestepSpacing spacing) {
  const at::Tensor max_sigma = sigmas.max();
  if (spacing == TimestepSpacing::Linspace || spacing == TimestepSpacing::Trailing) return max_sigma.item<double>();
  return (max_sigma.pow(2) + 1).pow(0.5).item<double>();
}

at::Tensor k_scale_model_input(const at::Tensor& sample, const at::Tensor& sigma) {
  return sample / (sigma.pow(2) + 1).pow(0.5);
}

at::Tensor float_tensor(const std::vector<double>& values) {
  return at::tensor(values, at::TensorOptions().dtype(at::kDouble)).to(at::kFloat);
}

std::vector<double> to_doubles(const at::Tensor& t) {
  const at::Tensor d = t.to(at::kDouble).contiguous();
  return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
}

at::Tensor scalar(double value) { return at::scalar_tensor(value, at::TensorOptions().dtype(at::kFloat)); }

void check_step(const std::string& who, size_t step, size_t expected, size_t num_timesteps) {
  if (num_timesteps == 0) throw_bad_input(who, "step() called before set_timesteps()", "call set_timesteps first");
  if (step >= num_timesteps)
    throw_bad_input(
        who, "step " + std::to_string(step) + " is out of range (" + std::to_string(num_timesteps) + " timesteps)");
  if (step != expected)
    throw_bad_input(who, "step " + std::to_string(step) + " called, expected step " + std::to_string(expected),
                    "this scheduler keeps a history: take the steps in order, or call set_timesteps to restart");
}

at::Tensor predicted_original_sample(PredictionType prediction, const at::Tensor& model_output,
                                     const at::Tensor& sample, const at::Tensor& sigma) {
  switch (prediction) {
    case PredictionType::Epsilon:
      return sample - sigma * model_output;
    case PredictionType::Sample:
      return model_output;
    case PredictionType::VPrediction:  // c_out * v + c_skip * x
      return model_output * (-sigma / (sigma.pow(2) + 1).pow(0.5)) + sample / (sigma.pow(2) + 1);
  }
  throw std::logic_error("unknown prediction type");
}

}  // namespace sched

const std::vector<std::string>& scheduler_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> v;
    for (const SchedulerRow& row : scheduler_table()) {
      v.push_back(row.name);
      if (row.supports_karras) v.push_back(std::string(row.name) + "_karras");
    }
    return v;
  }();
  return names;
}

namespace {

// The class an override name picks, forcing the settings its short name stands for:
// "dpmpp_2m" is DPM-Solver++ of order 2, and a short name of a scheduler with Karras
// sigmas turns them on ("_karras") or off. A diffusers class name is taken as is.
std::string override_class(const std::string& override_name, nlohmann::json& cfg, const std::string& where) {
  if (find_scheduler_class(override_name)) return override_name;
  for (const SchedulerRow& row : scheduler_table()) {
    const bool karras = row.supports_karras && override_name == std::string(row.name) + "_karras";
    if (override_name != row.name && !karras) continue;
    if (starts_with(override_name, "dpmpp_2m")) {
      cfg["algorithm_type"] = "dpmsolver++";
      cfg["solver_order"] = 2;
    }
    if (row.supports_karras) cfg["use_karras_sigmas"] = karras;
    return row.class_name;
  }
  sched::reject(where, "scheduler \"" + override_name + "\"", join(scheduler_names()));
}

}  // namespace

std::unique_ptr<Scheduler> make_scheduler(const nlohmann::json& config, const std::string& override_name,
                                          const std::string& where) {
  if (!config.is_object()) throw_bad_input(where, "the scheduler config is not a JSON object");
  nlohmann::json cfg = config;
  std::string cls;
  if (override_name.empty()) {
    cls = get_string(config, "_class_name", "", where);
    if (cls.empty())
      throw_bad_input(where, "has no _class_name", "name the scheduler class, e.g. \"_class_name\": \"DDIMScheduler\"");
  } else {
    cls = override_class(override_name, cfg, where);
  }
  if (cls == "PNDMScheduler") return std::make_unique<PNDMScheduler>(PNDMScheduler::Config::from_json(cfg, where));
  if (cls == "DDIMScheduler") return std::make_unique<DDIMScheduler>(DDIMScheduler::Config::from_json(cfg, where));
  if (cls == "EulerDiscreteScheduler")
    return std::make_unique<EulerDiscreteScheduler>(EulerDiscreteScheduler::Config::from_json(cfg, where));
  if (cls == "EulerAncestralDiscreteScheduler")
    return std::make_unique<EulerAncestralDiscreteScheduler>(
        EulerAncestralDiscreteScheduler::Config::from_json(cfg, where));
  if (cls == "DPMSolverMultistepScheduler")
    return std::make_unique<DPMSolverMultistepScheduler>(DPMSolverMultistepScheduler::Config::from_json(cfg, where));
  if (cls == "LMSDiscreteScheduler")
    return std::make_unique<LMSDiscreteScheduler>(LMSDiscreteScheduler::Config::from_json(cfg, where));
  std::vector<std::string> classes;
  for (const SchedulerRow& row : scheduler_table()) classes.push_back(row.class_name);
  sched::reject(where, "_class_name = \"" + cls + "\"", join(classes));
}

}  // namespace fairdiff
