// Diffusion schedulers: the update rule of the sampling loop, ported from diffusers 0.29.2.
//
//   std::unique_ptr<fairdiff::Scheduler> s =
//       fairdiff::make_scheduler(scheduler_config, /*override_name=*/"dpmpp_2m_karras",
//       "scheduler/scheduler_config.json");
//   s->set_timesteps(30);
//   at::Tensor x = noise * s->init_noise_sigma();                  // noise: N(0,1), [B, C, H, W]
//   for (size_t i = 0; i < s->timesteps().size(); ++i) {
//     at::Tensor eps = unet(s->scale_model_input(x, i), s->timesteps()[i], ...);
//     x = s->step(eps, i, x, &generators);                         // one CPU generator per batch item
//   }
//
// Each class computes what its diffusers namesake computes, in the same dtypes:
// the schedule tables are float32 tensors built with the same ATen ops (linspace,
// cumprod, pow), the numpy parts (timestep spacing, interpolation, Karras sigmas)
// are redone in float64 as numpy does them, and every scalar of step() is a 0-d
// float32 tensor combined in the reference's order, so float32 results agree to
// the last bit wherever the reference's own arithmetic is deterministic.
//
// Only <ATen/ATen.h>: schedulers never need torch::nn.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>
#include <vector>

namespace fairdiff {

class Scheduler {
 public:
  virtual ~Scheduler() = default;

  // Computes the timesteps (and sigmas) for `num_inference_steps` and resets all
  // per-run state (history of model outputs, step counters).
  virtual void set_timesteps(int64_t num_inference_steps) = 0;

  // The values the UNet is called with, in order (diffusers' scheduler.timesteps,
  // including PNDM's repeated second entry).
  const std::vector<double>& timesteps() const { return timesteps_; }

  // Initial latents = N(0,1) * init_noise_sigma().
  virtual double init_noise_sigma() const { return 1.0; }

  // What the UNet sees at step `step`: identity for PNDM/DDIM/DPM, sample / sqrt(sigma^2 + 1)
  // for the sigma (k-diffusion) schedulers.
  virtual at::Tensor scale_model_input(const at::Tensor& sample, size_t /*step*/) const { return sample; }

  // One denoising step: `step` indexes timesteps(); calls must come in order 0, 1, 2, ...
  // after set_timesteps. model_output, sample: [B, C, H, W]. `generators` (one CPU generator
  // per batch item) is used only by stochastic schedulers: item b's noise is
  // randn([1, C, H, W], generators[b]) drawn on the CPU in float32, then moved to the
  // sample's device and the model output's dtype, so each image depends only on its own seed.
  virtual at::Tensor step(const at::Tensor& model_output, size_t step, const at::Tensor& sample,
                          std::vector<at::Generator>* generators = nullptr) = 0;

  // The diffusers class name ("EulerDiscreteScheduler", ...).
  virtual std::string name() const = 0;

  // The sigma schedule (len(timesteps) + 1 values, as diffusers' scheduler.sigmas) for
  // the schedulers that keep one; empty for PNDM and DDIM.
  virtual std::vector<double> sigmas() const { return {}; }

 protected:
  std::vector<double> timesteps_;
};

// Builds a scheduler from a diffusers scheduler_config.json object (its `_class_name` picks
// the class). A non-empty `override_name` picks another class with the same betas and
// timestep settings, like diffusers' `OtherScheduler.from_config(config)`: "pndm", "ddim",
// "euler", "euler_karras", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lms", "lms_karras" (or a diffusers
// class name). "dpmpp_2m" forces algorithm_type dpmsolver++ and solver_order 2; the
// "_karras" names force use_karras_sigmas on, "euler", "dpmpp_2m" and "lms" force it off.
// Unknown classes and unsupported values throw an Unsupported error listing what is
// supported; values of the wrong type throw BadInput. `where` names the config in messages.
std::unique_ptr<Scheduler> make_scheduler(const nlohmann::json& config, const std::string& override_name,
                                          const std::string& where);

// The short names make_scheduler accepts as override_name, for help texts.
const std::vector<std::string>& scheduler_names();

// ---------------------------------------------------------------------------------------
// Building blocks shared by the scheduler files (src/schedulers/*).

enum class BetaSchedule { Linear, ScaledLinear, SquaredCosCapV2 };
enum class TimestepSpacing { Linspace, Leading, Trailing };
enum class PredictionType { Epsilon, VPrediction, Sample };

// The noise-schedule settings every scheduler shares. Defaults are diffusers' constructor
// defaults; each class's from_json passes its own where they differ (timestep_spacing).
struct NoiseScheduleConfig {
  int64_t num_train_timesteps = 1000;
  double beta_start = 0.0001;
  double beta_end = 0.02;
  BetaSchedule beta_schedule = BetaSchedule::Linear;
  std::vector<double> trained_betas;  // non-empty: used instead of beta_schedule
  bool rescale_betas_zero_snr = false;
  PredictionType prediction_type = PredictionType::Epsilon;
  TimestepSpacing timestep_spacing = TimestepSpacing::Leading;
  int64_t steps_offset = 0;
};

namespace sched {

// Reads the shared keys of `config` over `defaults`; rescale_betas_zero_snr only when the
// class has that option (`with_rescale`), since diffusers ignores keys a class lacks.
NoiseScheduleConfig read_noise_schedule(const nlohmann::json& config, NoiseScheduleConfig defaults, bool with_rescale,
                                        const std::string& where);

// Reads a string option and returns its index in `allowed`; Unsupported error otherwise.
size_t read_choice(const nlohmann::json& config, const std::string& key, const std::string& fallback,
                   const std::vector<std::string>& allowed, const std::string& where);

// Throws Unsupported naming `what` (e.g. "prediction_type = \"sample\"") and the supported values.
[[noreturn]] void reject(const std::string& where, const std::string& what, const std::string& supported);

// Betas as diffusers builds them: float32 torch.linspace (of the square roots for
// scaled_linear, then squared), the Glide cosine schedule in float64 cast to float32,
// or trained_betas cast to float32; then rescaled to zero terminal SNR when asked.
at::Tensor make_betas(const NoiseScheduleConfig& config);

// cumprod(1 - betas) in float32 (torch.cumprod accumulates in double on the CPU).
// `tiny_terminal_alpha`: with rescale_betas_zero_snr, the sigma schedulers set the last
// value to 2^-24 so that the first sigma is finite (Euler, Euler ancestral, DPM do; DDIM not).
at::Tensor make_alphas_cumprod(const NoiseScheduleConfig& config, bool tiny_terminal_alpha);

// sqrt((1 - alphas_cumprod) / alphas_cumprod) in float32, indexed by training timestep.
std::vector<float> train_sigmas(const at::Tensor& alphas_cumprod);
// Their logs, in float32 as numpy computes them from the float32 sigmas.
std::vector<float> log_sigmas(const std::vector<float>& train_sigmas);
// The smallest training sigma, computed as diffusers does for final_sigmas_type "sigma_min".
double min_train_sigma(const at::Tensor& alphas_cumprod);

// The schedule of the k-diffusion schedulers (Euler, Euler ancestral, LMS), without the
// final sigma: timesteps spaced as `config` says (float32 values) and their sigmas,
// interpolated linearly in t over the training table. With `karras`: Karras sigmas between
// sigma_min and sigma_max (by default the ends of that schedule), and timesteps read back
// off the table as fractions in float64 (LMS keeps them so, Euler casts them to float32).
struct SigmaSchedule {
  std::vector<double> timesteps;
  std::vector<double> sigmas;
};
SigmaSchedule sigma_schedule(const NoiseScheduleConfig& config, const at::Tensor& alphas_cumprod,
                             int64_t num_inference_steps, bool karras, std::optional<double> sigma_min = std::nullopt,
                             std::optional<double> sigma_max = std::nullopt);

// Timesteps in descending order for `spacing`, as DDIM/PNDM (integer = true: linspace values
// rounded) and Euler/LMS (integer = false: linspace values cast to float32) compute them.
std::vector<double> spaced_timesteps(TimestepSpacing spacing, int64_t num_train_timesteps, int64_t num_inference_steps,
                                     int64_t steps_offset, bool integer);

// numpy.linspace(start, stop, num), endpoint included, in float64.
std::vector<double> np_linspace(double start, double stop, int64_t num);
// numpy.arange(start, stop, step) for float64 arguments (numpy's length and fill rules).
std::vector<double> np_arange(double start, double stop, double step);
// numpy.round / numpy.rint: round half to even.
double np_round(double x);
// numpy.interp(x, arange(len(fp)), fp) in float64.
double np_interp_index(double x, const std::vector<float>& fp);
// Karras et al. (2022) sigmas: (max^(1/7) + ramp (min^(1/7) - max^(1/7)))^7, ramp = linspace(0, 1, n).
std::vector<double> karras_sigmas(double sigma_min, double sigma_max, int64_t n);
// diffusers' _sigma_to_t: piecewise-linear inverse of log sigma over the training table
// (log_sigmas in float32, as numpy computes them from the float32 sigmas).
double sigma_to_t(double sigma, const std::vector<float>& log_sigmas);

// Dynamic thresholding of Imagen (diffusers' _threshold_sample): per item, s = the
// `ratio` quantile of |x|, clamped to [1, max_value]; x -> clamp(x, -s, s) / s.
at::Tensor threshold_sample(const at::Tensor& x, double ratio, double max_value);

// Item b's noise: randn([1, ...], generators[b]) in float32 on the CPU, concatenated over
// the batch and moved to `like`'s device and dtype. Without generators: the default CPU
// generator for the whole batch (not reproducible across batch layouts).
at::Tensor batch_noise(const at::Tensor& like, std::vector<at::Generator>* generators, const std::string& who);

// For the sigma (k-diffusion) schedulers, whose sample is x_0 + sigma eps:
// init_noise_sigma = max sigma for linspace/trailing spacing, else sqrt(max sigma^2 + 1)
// (float32, as diffusers' property computes it from its sigmas tensor) ...
double k_init_noise_sigma(const at::Tensor& sigmas, TimestepSpacing spacing);
// ... and the UNet input sample / sqrt(sigma^2 + 1) (unit variance again).
at::Tensor k_scale_model_input(const at::Tensor& sample, const at::Tensor& sigma);
// float32 values as a tensor [n] on the CPU, and back as doubles.
at::Tensor float_tensor(const std::vector<double>& values);
std::vector<double> to_doubles(const at::Tensor& t);

// 0-d float32 CPU tensor, the type of diffusers' schedule scalars.
at::Tensor scalar(double value);

// Throws BadInput unless set_timesteps was called and `step` is the next step (`expected`).
void check_step(const std::string& who, size_t step, size_t expected, size_t num_timesteps);

// The denoiser D(x; sigma) of the k-diffusion samplers (Euler, LMS): the predicted x_0
// from the model's output at noise level sigma (a 0-dim tensor), in the arithmetic's dtype:
// epsilon x - sigma eps; sample: the output; v: c_out v + c_skip x.
at::Tensor predicted_original_sample(PredictionType prediction, const at::Tensor& model_output,
                                     const at::Tensor& sample, const at::Tensor& sigma);

}  // namespace sched
}  // namespace fairdiff
