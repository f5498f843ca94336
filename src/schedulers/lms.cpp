#include "lms.h"

#include <cmath>
#include <functional>
#include <nlohmann/json.hpp>

#include "config_json.h"
#include "fairdiff/error.h"

namespace fairdiff {

using namespace config_json;

double gauss_kronrod_21(const std::function<double(double)>& f, double a, double b) {
  // Nodes of the 21-point Kronrod rule on [-1, 1] (odd entries: the 10-point Gauss nodes), largest first.
  static const double xgk[11] = {
      0.995657163025808080735527280689003, 0.973906528517171720077964012084452, 0.930157491355708226001207180059508,
      0.865063366688984510732096688423493, 0.780817726586416897063717578345042, 0.679409568299024406234327365114874,
      0.562757134668604683339000099272694, 0.433395394129247190799265943165784, 0.294392862701460198131126603103866,
      0.148874338981631210884826001129720, 0.000000000000000000000000000000000};
  static const double wgk[11] = {
      0.011694638867371874278064396062192, 0.032558162307964727478818972459390, 0.054755896574351996031381300244580,
      0.075039674810919952767043140916190, 0.093125454583697605535065465083366, 0.109387158802297641899210590325805,
      0.123491976262065851077958109831074, 0.134709217311473325928054001771707, 0.142775938577060080797094273138717,
      0.147739104901338491374841515972068, 0.149445554002916905664936468389821};
  // quad accepts the first estimate when its error estimate is below max(1.49e-8, 1e-4 |result|); for the
  // low-degree polynomials of LMS the Gauss and Kronrod sums agree far better than that, so only the
  // Kronrod sum is needed (the Gauss weights serve the error estimate alone).
  const double centr = 0.5 * (a + b);
  const double hlgth = 0.5 * (b - a);
  double resk = wgk[10] * f(centr);
  for (int j = 1; j <= 9; j += 2) {  // the Gauss nodes first, as qk21 does
    const double absc = hlgth * xgk[j];
    resk = resk + wgk[j] * (f(centr - absc) + f(centr + absc));
  }
  for (int j = 0; j <= 8; j += 2) {
    const double absc = hlgth * xgk[j];
    resk = resk + wgk[j] * (f(centr - absc) + f(centr + absc));
  }
  return resk * hlgth;
}

LMSDiscreteScheduler::Config LMSDiscreteScheduler::Config::from_json(const nlohmann::json& config,
                                                                     const std::string& where) {
  Config c;
  NoiseScheduleConfig defaults;
  defaults.timestep_spacing = TimestepSpacing::Linspace;
  c.schedule = sched::read_noise_schedule(config, defaults, /*with_rescale=*/false, where);
  c.use_karras_sigmas = get_bool(config, "use_karras_sigmas", false, where);
  return c;
}

LMSDiscreteScheduler::LMSDiscreteScheduler(Config config) : config_(std::move(config)) {
  alphas_cumprod_ = sched::make_alphas_cumprod(config_.schedule, /*tiny_terminal_alpha=*/false);
}

void LMSDiscreteScheduler::set_timesteps(int64_t n) {
  if (n < 1) throw_bad_input(name(), "num_inference_steps = " + std::to_string(n) + " must be at least 1");
  // Timesteps and sigmas, interpolated or Karras; Karras timesteps stay fractional float64
  // values here, unlike Euler's. Final sigma 0.
  sched::SigmaSchedule schedule =
      sched::sigma_schedule(config_.schedule, alphas_cumprod_, n, config_.use_karras_sigmas);
  timesteps_ = std::move(schedule.timesteps);
  schedule.sigmas.push_back(0.0);
  sigmas_ = sched::float_tensor(schedule.sigmas);
  sigma_values_.assign(sigmas_.data_ptr<float>(), sigmas_.data_ptr<float>() + sigmas_.numel());
  derivatives_.clear();
  next_step_ = 0;
}

double LMSDiscreteScheduler::init_noise_sigma() const {
  return sched::k_init_noise_sigma(sigmas_, config_.schedule.timestep_spacing);
}

at::Tensor LMSDiscreteScheduler::scale_model_input(const at::Tensor& sample, size_t step) const {
  return sched::k_scale_model_input(sample, sigmas_[static_cast<int64_t>(step)]);
}

double LMSDiscreteScheduler::lms_coefficient(int order, int64_t t, int current_order) const {
  const std::vector<float>& s = sigma_values_;
  // l_j(tau) = prod_{k != j} (tau - s[t-k]) / (s[t-j] - s[t-k]): float32 products of float32 factors,
  // tau rounded to float32 first, as Python floats meet 0-d float32 tensors in the reference.
  auto basis = [&](double tau) -> double {
    if (order == 1) return 1.0;  // the empty product: the Python float 1.0
    const float tf = static_cast<float>(tau);
    float p = 1.0f;  // 1 * the first factor is exact, like the reference's 1.0 * tensor
    for (int k = 0; k < order; ++k)
      if (k != current_order) p *= (tf - s[t - k]) / (s[t - current_order] - s[t - k]);
    return p;
  };
  return gauss_kronrod_21(basis, s[t], s[t + 1]);
}

at::Tensor LMSDiscreteScheduler::step(const at::Tensor& model_output, size_t step, const at::Tensor& sample,
                                      std::vector<at::Generator>* /*generators*/) {
  // model_output, sample: [B, C, H, W]; in the sample's dtype (the reference does not upcast here).
  sched::check_step(name(), step, next_step_, timesteps_.size());
  ++next_step_;
  const int64_t i = static_cast<int64_t>(step);
  const at::Tensor sigma = sigmas_[i];
  // 1. Predicted x_0 (the denoiser D(x; sigma) of the paper).
  const at::Tensor pred_original_sample =
      sched::predicted_original_sample(config_.schedule.prediction_type, model_output, sample, sigma);
  // 2. The ODE derivative (x - x_0) / sigma, kept for the next steps.
  derivatives_.push_back((sample - pred_original_sample) / sigma);
  if (derivatives_.size() > static_cast<size_t>(kOrder)) derivatives_.erase(derivatives_.begin());
  // 3. Coefficients of the last `order` derivatives (newest first).
  const int order = static_cast<int>(std::min<int64_t>(i + 1, kOrder));
  // 4. x_next = x + sum_j c_j d_(i-j).
  at::Tensor sum;
  for (int j = 0; j < order; ++j) {
    const at::Tensor term = lms_coefficient(order, i, j) * derivatives_[derivatives_.size() - 1 - j];
    sum = sum.defined() ? sum + term : term;
  }
  return sample + sum;
}

}  // namespace fairdiff
