// Schedulers: timesteps, sigmas and init_noise_sigma against diffusers 0.29.2 (every
// scheduler recorded in the fixtures' manifests), the CPU generator stream, and properties
// of step() derived on paper with dummy samples and dummy model outputs.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "config_json.h"
#include "safetensors.h"
#include "scheduler.h"
#include "ddim.h"
#include "dpm_solver_multistep.h"
#include "euler.h"
#include "euler_ancestral.h"
#include "lms.h"
#include "pndm.h"
#include "tensor_io.h"
#include "test_util.h"

namespace fairdiff {
namespace {

using nlohmann::json;

// ----------------------------------------------------------------------------- helpers

// Python's json writes -Infinity, Infinity and NaN as bare tokens (DPM's lambda_min_clipped);
// nlohmann rejects them, so quote them first (outside strings only).
json parse_python_json(const std::string& text) {
  std::string out;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      out += c;
      if (c == '\\' && i + 1 < text.size())
        out += text[++i];
      else if (c == '"')
        in_string = false;
      continue;
    }
    if (c == '"') in_string = true;
    bool replaced = false;
    for (const char* token : {"-Infinity", "Infinity", "NaN"}) {
      if (text.compare(i, std::strlen(token), token) == 0) {
        out += std::string("\"") + token + "\"";
        i += std::strlen(token) - 1;
        replaced = true;
        break;
      }
    }
    if (!replaced) out += c;
  }
  return json::parse(out);
}

json read_manifest(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_python_json(ss.str());
}

// EXPECTs |a - b| <= atol elementwise and says where it is worst.
void expect_close(const at::Tensor& actual, const at::Tensor& expected, double atol, const std::string& what) {
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
  const at::Tensor diff = (actual.to(at::kDouble) - expected.to(at::kDouble)).abs().flatten();
  const int64_t worst = diff.argmax().item<int64_t>();
  const double max_err = diff[worst].item<double>();
  EXPECT_LE(max_err, atol) << what << ": max |diff| " << max_err << " at flat index " << worst << " (actual "
                           << actual.flatten()[worst].item<double>() << ", expected "
                           << expected.flatten()[worst].item<double>() << ")";
}

json sd_config() {  // the scheduler config of Stable Diffusion 1.x (tiny-sd1 has the same)
  return json{{"_class_name", "PNDMScheduler"},   {"beta_start", 0.00085},       {"beta_end", 0.012},
              {"beta_schedule", "scaled_linear"}, {"num_train_timesteps", 1000}, {"set_alpha_to_one", false},
              {"skip_prk_steps", true},           {"steps_offset", 1},           {"clip_sample", false},
              {"timestep_spacing", "leading"},    {"prediction_type", "epsilon"}};
}

json with(json config, const json& changes) {
  for (const auto& [k, v] : changes.items()) config[k] = v;
  return config;
}

std::unique_ptr<Scheduler> make(const json& config, const std::string& name, int64_t steps) {
  std::unique_ptr<Scheduler> s = make_scheduler(config, name, "test");
  s->set_timesteps(steps);
  return s;
}

at::Tensor dummy_sample(int64_t batch = 2) {  // deterministic, [B, 4, 8, 8]
  return at::arange(batch * 4 * 8 * 8, at::kFloat).reshape({batch, 4, 8, 8}).mul(0.37).sin();
}

at::Tensor dummy_noise(int64_t batch = 2) {
  return at::arange(batch * 4 * 8 * 8, at::kFloat).reshape({batch, 4, 8, 8}).mul(1.3).cos().mul(1.5);
}

// alphas_cumprod of the SD schedule at training timestep t (float32, as the schedulers hold it).
double sd_alpha_cumprod(int64_t t) {
  NoiseScheduleConfig c;
  c.beta_start = 0.00085;
  c.beta_end = 0.012;
  c.beta_schedule = BetaSchedule::ScaledLinear;
  return sched::make_alphas_cumprod(c, false)[t].item<double>();
}

// ----------------------------------------------------------------------------- golden schedules

struct ScheduleCase {
  std::string name, model, cls;
  json config, expected;
  int64_t steps;
};

std::vector<ScheduleCase> manifest_schedules(const std::string& fixtures) {
  std::vector<ScheduleCase> cases;
  for (const char* group : {"pipeline", "sdxl", "sega"}) {
    const std::string path = fixtures + "/" + group + "/manifest.json";
    if (!std::ifstream(path)) continue;
    const json manifest = read_manifest(path);
    for (const auto& c : manifest["cases"]) {
      if (!c.contains("params") || !c["params"].contains("scheduler")) continue;
      const json& s = c["params"]["scheduler"];
      cases.push_back({std::string(group) + "/" + c["name"].get<std::string>(), c.value("model", ""),
                       s["class"].get<std::string>(), s["config"], s,
                       c["params"]["num_inference_steps"].get<int64_t>()});
    }
  }
  return cases;
}

void expect_schedule(const Scheduler& s, const json& expected, const std::string& what) {
  const auto ts = expected["timesteps"].get<std::vector<double>>();
  EXPECT_EQ(s.timesteps(), ts) << what << ": timesteps";
  if (expected.contains("sigmas")) {
    const auto want = expected["sigmas"].get<std::vector<double>>();
    const std::vector<double> got = s.sigmas();
    ASSERT_EQ(got.size(), want.size()) << what << ": number of sigmas";
    for (size_t i = 0; i < want.size(); ++i)
      EXPECT_NEAR(got[i], want[i], 1e-6 * std::abs(want[i])) << what << ": sigma " << i;
  }
  const double sigma0 = expected["init_noise_sigma"].get<double>();
  EXPECT_NEAR(s.init_noise_sigma(), sigma0, 1e-6 * sigma0) << what << ": init_noise_sigma";
}

TEST(SchedulerFixtures, TimestepsSigmasInitNoiseSigmaOfEveryCase) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  const auto cases = manifest_schedules(fixtures);
  ASSERT_GE(cases.size(), 12u);
  std::set<std::string> classes;
  for (const auto& c : cases) {
    json config = c.config;
    config["_class_name"] = c.cls;
    const auto s = make(config, "", c.steps);
    EXPECT_EQ(s->name(), c.cls) << c.name;
    expect_schedule(*s, c.expected, c.name + " (" + c.cls + ", " + std::to_string(c.steps) + " steps)");
    classes.insert(c.cls);
  }
  EXPECT_EQ(classes.size(), 6u) << "expected all six scheduler classes in the fixtures";
}

// The model folders' own scheduler_config.json plus an override name gives the recorded
// scheduler, as diffusers' Scheduler.from_config(pipe.scheduler.config) did for the fixtures.
TEST(SchedulerFixtures, OverrideNamesFromModelFolderConfig) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  int checked = 0;
  for (const auto& c : manifest_schedules(fixtures)) {
    if (c.model.empty()) continue;
    const json folder_config = read_json_file(fixtures + "/" + c.model + "/scheduler/scheduler_config.json");
    const bool karras = c.config.value("use_karras_sigmas", false);
    const std::string name = c.cls == "PNDMScheduler"                     ? "pndm"
                             : c.cls == "DDIMScheduler"                   ? "ddim"
                             : c.cls == "EulerDiscreteScheduler"          ? (karras ? "euler_karras" : "euler")
                             : c.cls == "EulerAncestralDiscreteScheduler" ? "euler_a"
                             : c.cls == "LMSDiscreteScheduler"            ? (karras ? "lms_karras" : "lms")
                                                                          : (karras ? "dpmpp_2m_karras" : "dpmpp_2m");
    const auto s = make(folder_config, name, c.steps);
    EXPECT_EQ(s->name(), c.cls) << c.name;
    expect_schedule(*s, c.expected, c.name + " via " + c.model + " + \"" + name + "\"");
    ++checked;
  }
  EXPECT_GE(checked, 12);
}

// torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)), bit for bit.
TEST(SchedulerFixtures, CpuGeneratorStream) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  const json manifest = read_manifest(fixtures + "/pipeline/manifest.json");
  const SafeTensors file(fixtures + "/pipeline/generator_stream.safetensors");
  int checked = 0;
  for (const auto& c : manifest["cases"]) {
    if (c.value("op", "") != "cpu_randn") continue;
    for (const auto& [key, spec] : c["params"]["tensors"].items()) {
      at::Generator g = at::detail::createCPUGenerator(spec["seed"].get<uint64_t>());
      const at::Tensor drawn = at::randn(spec["shape"].get<std::vector<int64_t>>(), g, at::kFloat);
      const at::Tensor expected = load_tensor(file.at(key), at::kFloat);
      EXPECT_TRUE(at::equal(drawn, expected)) << key << ": max |diff| " << (drawn - expected).abs().max().item<float>();
      ++checked;
    }
  }
  EXPECT_GE(checked, 6);
}

// ----------------------------------------------------------------------------- schedules by hand

TEST(SchedulerSchedule, TimestepSpacings) {
  const json ddim = with(sd_config(), {{"_class_name", "DDIMScheduler"}, {"steps_offset", 0}});
  EXPECT_EQ(make(with(ddim, {{"timestep_spacing", "trailing"}}), "", 10)->timesteps(),
            (std::vector<double>{999, 899, 799, 699, 599, 499, 399, 299, 199, 99}));
  EXPECT_EQ(make(with(ddim, {{"timestep_spacing", "trailing"}}), "", 3)->timesteps(),
            (std::vector<double>{999, 666, 332}));
  EXPECT_EQ(make(with(ddim, {{"timestep_spacing", "linspace"}}), "", 10)->timesteps(),
            (std::vector<double>{999, 888, 777, 666, 555, 444, 333, 222, 111, 0}));
  EXPECT_EQ(make(with(ddim, {{"steps_offset", 1}}), "", 8)->timesteps(),
            (std::vector<double>{876, 751, 626, 501, 376, 251, 126, 1}));
  // Euler keeps linspace timesteps fractional (float32).
  EXPECT_EQ(make(with(sd_config(), {{"timestep_spacing", "linspace"}}), "euler", 7)->timesteps(),
            (std::vector<double>{999, 832.5, 666, 499.5, 333, 166.5, 0}));
  // DPM: n + 1 points without the smallest.
  EXPECT_EQ(make(with(sd_config(), {{"timestep_spacing", "trailing"}}), "dpmpp_2m", 10)->timesteps(),
            (std::vector<double>{999, 899, 799, 699, 599, 499, 399, 299, 199, 99}));
  EXPECT_EQ(make(with(sd_config(), {{"timestep_spacing", "linspace"}}), "dpmpp_2m", 4)->timesteps(),
            (std::vector<double>{999, 749, 500, 250}));
}

TEST(SchedulerSchedule, PndmTimesteps) {
  // PLMS only: the second timestep is repeated.
  EXPECT_EQ(make(sd_config(), "", 5)->timesteps(), (std::vector<double>{801, 601, 601, 401, 201, 1}));
  EXPECT_EQ(make(sd_config(), "", 1)->timesteps(), (std::vector<double>{1}));
  // With the Runge-Kutta warm-up: 12 PRK calls over the last 4 intervals, then PLMS.
  EXPECT_EQ(make(with(sd_config(), {{"skip_prk_steps", false}}), "", 10)->timesteps(),
            (std::vector<double>{901, 851, 851, 801, 801, 751, 751, 701, 701, 651, 651, 601,  //
                                 601, 501, 401, 301, 201, 101, 1}));
}

TEST(SchedulerSchedule, BetaSchedules) {
  NoiseScheduleConfig c;
  c.num_train_timesteps = 1000;
  const at::Tensor linear = sched::make_betas(c);
  EXPECT_FLOAT_EQ(linear[0].item<float>(), 0.0001f);
  EXPECT_FLOAT_EQ(linear[999].item<float>(), 0.02f);
  c.beta_schedule = BetaSchedule::SquaredCosCapV2;
  const at::Tensor cosine = sched::make_betas(c);
  auto alpha_bar = [](double t) { return std::pow(std::cos((t + 0.008) / 1.008 * 3.141592653589793 / 2), 2); };
  EXPECT_FLOAT_EQ(cosine[0].item<float>(), static_cast<float>(1 - alpha_bar(0.001) / alpha_bar(0)));
  EXPECT_FLOAT_EQ(cosine[999].item<float>(), 0.999f);  // capped
  // Zero terminal SNR: the last alpha_cumprod becomes 0 (beta 1), the first is kept.
  c.beta_schedule = BetaSchedule::ScaledLinear;
  c.beta_start = 0.00085;
  c.beta_end = 0.012;
  const double first = sched::make_alphas_cumprod(c, false)[0].item<double>();
  c.rescale_betas_zero_snr = true;
  const at::Tensor rescaled = sched::make_alphas_cumprod(c, false);
  EXPECT_NEAR(rescaled[0].item<double>(), first, 1e-6);
  EXPECT_EQ(rescaled[999].item<double>(), 0.0);
  EXPECT_EQ(sched::make_alphas_cumprod(c, true)[999].item<double>(), std::ldexp(1.0, -24));
  // ... and the sigma schedulers then start near sqrt(2^24) = 4096.
  const auto euler =
      make(with(sd_config(), {{"rescale_betas_zero_snr", true}, {"timestep_spacing", "trailing"}}), "euler", 10);
  EXPECT_NEAR(euler->sigmas()[0], 4096.0, 1.0);
}

TEST(SchedulerSchedule, DpmLambdaMinClipped) {
  // The cosine schedule's last timesteps have a very low log-SNR; clipping it drops them.
  const json cosine = with(sd_config(), {{"_class_name", "DPMSolverMultistepScheduler"},
                                         {"beta_schedule", "squaredcos_cap_v2"},
                                         {"timestep_spacing", "linspace"}});
  EXPECT_EQ(make(cosine, "", 10)->timesteps().front(), 999);
  const double first = make(with(cosine, {{"lambda_min_clipped", -5.1}}), "", 10)->timesteps().front();
  EXPECT_LT(first, 999);
  EXPECT_GT(first, 900);
}

TEST(SchedulerSchedule, KarrasOverrides) {
  const auto lms = make(sd_config(), "lms_karras", 10);
  const auto plain = make(sd_config(), "lms", 10);
  const std::vector<double> ks = lms->sigmas(), ps = plain->sigmas();
  // The Karras schedule spans the same range as the plain one, denser at small sigmas.
  EXPECT_NEAR(ks.front(), ps.front(), 1e-5 * ps.front());
  EXPECT_NEAR(ks[9], ps[9], 1e-5 * ps[9]);
  EXPECT_LT(ks[5], ps[5]);
  EXPECT_NE(lms->timesteps()[5], std::round(lms->timesteps()[5]));  // fractional timesteps
  // Euler has Karras sigmas too (EulerDiscreteScheduler's use_karras_sigmas).
  const auto euler_k = make(sd_config(), "euler_karras", 10), euler = make(sd_config(), "euler", 10);
  EXPECT_NEAR(euler_k->sigmas().front(), euler->sigmas().front(), 1e-5 * euler->sigmas().front());
  EXPECT_LT(euler_k->sigmas()[5], euler->sigmas()[5]);
  EXPECT_EQ(euler_k->name(), "EulerDiscreteScheduler");
  // A DPM config with Karras on, overridden to plain 2M, loses it.
  const json dpm_karras =
      with(sd_config(), {{"_class_name", "DPMSolverMultistepScheduler"}, {"use_karras_sigmas", true}});
  EXPECT_EQ(make(dpm_karras, "", 10)->timesteps().front(), 999);
  EXPECT_EQ(make(dpm_karras, "dpmpp_2m", 10)->timesteps().front(), 901);
  EXPECT_EQ(make(dpm_karras, "DPMSolverMultistepScheduler", 10)->timesteps().front(), 999);  // class name: as is
}

// ----------------------------------------------------------------------------- step() on paper

// With the true noise as model output, every deterministic scheduler follows the exact
// trajectory x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (VP schedulers) or x0 + sigma eps (sigma
// schedulers), so the loop ends at the clean sample (or at t = 0's noise level for DDIM/PNDM).
TEST(SchedulerStep, DdimEtaZeroFollowsTheExactTrajectory) {
  for (const char* prediction : {"epsilon", "v_prediction", "sample"}) {
    auto s = make(with(sd_config(), {{"prediction_type", prediction}}), "ddim", 10);
    const at::Tensor x0 = dummy_sample(), eps = dummy_noise();
    const double a_first = sd_alpha_cumprod(901);
    at::Tensor x = std::sqrt(a_first) * x0 + std::sqrt(1 - a_first) * eps;
    for (size_t i = 0; i < s->timesteps().size(); ++i) {
      const double a = sd_alpha_cumprod(static_cast<int64_t>(s->timesteps()[i]));
      const at::Tensor out = std::string(prediction) == "epsilon"  ? eps
                             : std::string(prediction) == "sample" ? x0
                                                                   : std::sqrt(a) * eps - std::sqrt(1 - a) * x0;
      x = s->step(out, i, x);
    }
    const double a0 = sd_alpha_cumprod(0);  // set_alpha_to_one false: the last step goes to t = 0
    expect_close(x, std::sqrt(a0) * x0 + std::sqrt(1 - a0) * eps, 2e-5, std::string("DDIM ") + prediction);
  }
}

TEST(SchedulerStep, PndmSecondCallRepeatsTheFirstInterval) {
  auto s = make(sd_config(), "pndm", 10);
  const at::Tensor x = dummy_sample(), e = dummy_noise();
  const at::Tensor first = s->step(e, 0, x);
  // Call 1 (timestep 801 again) restarts from the sample of call 0 with the mean of both outputs:
  // the sample passed in is ignored, and a constant output gives the same result.
  const at::Tensor second = s->step(e, 1, at::full_like(x, 1e6));
  expect_close(second, first, 1e-6, "PNDM call 1 vs call 0");
  // A different output at call 1 enters as the average (e + e1) / 2.
  auto t = make(sd_config(), "pndm", 10);
  t->step(e, 0, x);
  auto ddim = make(with(sd_config(), {{"_class_name", "DDIMScheduler"}}), "", 10);
  expect_close(t->step(e + 2 * x, 1, first), ddim->step(e + x, 0, x), 2e-6, "PNDM call 1 = DDIM step with the mean");
}

TEST(SchedulerStep, PndmFollowsTheExactTrajectory) {
  for (bool prk : {false, true}) {
    auto s = make(with(sd_config(), {{"skip_prk_steps", !prk}}), "pndm", 10);
    const at::Tensor x0 = dummy_sample(), eps = dummy_noise();
    const double a_first = sd_alpha_cumprod(901);
    at::Tensor x = std::sqrt(a_first) * x0 + std::sqrt(1 - a_first) * eps;
    for (size_t i = 0; i < s->timesteps().size(); ++i) x = s->step(eps, i, x);
    const double a0 = sd_alpha_cumprod(0);
    expect_close(x, std::sqrt(a0) * x0 + std::sqrt(1 - a0) * eps, 2e-5, prk ? "PNDM with PRK" : "PNDM");
  }
}

TEST(SchedulerStep, SigmaSchedulersEndAtTheCleanSample) {
  for (const char* name : {"euler", "euler_a", "lms", "lms_karras"}) {
    for (const char* prediction : {"epsilon", "v_prediction"}) {
      auto s = make(with(sd_config(), {{"prediction_type", prediction}}), name, 10);
      const std::vector<double> sigmas = s->sigmas();
      const at::Tensor x0 = dummy_sample(), eps = dummy_noise();
      at::Tensor x = x0 + sigmas[0] * eps;
      std::vector<at::Generator> gens = {at::detail::createCPUGenerator(1), at::detail::createCPUGenerator(2)};
      for (size_t i = 0; i < s->timesteps().size(); ++i) {
        // v = alpha eps - sigma_vp x0 at the current point of the trajectory, alpha = 1 / sqrt(sigma^2 + 1).
        const double alpha = 1 / std::sqrt(sigmas[i] * sigmas[i] + 1);
        const at::Tensor out = std::string(prediction) == "epsilon" ? eps : alpha * eps - sigmas[i] * alpha * x0;
        x = s->step(out, i, x, &gens);
        // Ancestral steps leave the trajectory (fresh noise): re-derive eps from where we are.
        if (std::string(name) == "euler_a" && i + 1 < sigmas.size() - 1) x = x0 + sigmas[i + 1] * eps;
      }
      expect_close(x, x0, 5e-5, std::string(name) + " " + prediction);
    }
  }
}

TEST(SchedulerStep, ScaleModelInput) {
  auto euler = make(sd_config(), "euler", 10);
  const at::Tensor x = dummy_sample();
  const double sigma = euler->sigmas()[3];
  expect_close(euler->scale_model_input(x, 3), x / std::sqrt(sigma * sigma + 1), 1e-6, "Euler scale_model_input");
  auto ddim = make(sd_config(), "ddim", 10);
  EXPECT_TRUE(at::equal(ddim->scale_model_input(x, 3), x));
  EXPECT_DOUBLE_EQ(ddim->init_noise_sigma(), 1.0);
}

TEST(SchedulerStep, DpmFirstStepIsFirstOrderAndLastStepLandsOnX0) {
  const json dpm = with(sd_config(), {{"_class_name", "DPMSolverMultistepScheduler"}});
  for (bool karras : {false, true}) {
    auto two = make(with(dpm, {{"use_karras_sigmas", karras}}), "", 10);
    auto one = make(with(dpm, {{"use_karras_sigmas", karras}, {"solver_order", 1}}), "", 10);
    const at::Tensor x = dummy_sample();
    auto model = [](const at::Tensor& sample, size_t i) { return 0.1 * sample + 0.01 * static_cast<double>(i); };
    // Step 0: no history yet, so 2M takes the first-order (DDIM) step.
    at::Tensor a = two->step(model(x, 0), 0, x), b = one->step(model(x, 0), 0, x);
    EXPECT_TRUE(at::equal(a, b)) << "first step must be first order";
    // Step 1: second order differs.
    at::Tensor a1 = two->step(model(a, 1), 1, a), b1 = one->step(model(b, 1), 1, b);
    EXPECT_GT((a1 - b1).abs().max().item<double>(), 1e-6);
    // Run to the last step; with a final sigma of 0 it returns the x0 prediction itself.
    at::Tensor y = a1;
    for (size_t i = 2; i + 1 < two->timesteps().size(); ++i) y = two->step(model(y, i), i, y);
    const size_t last = two->timesteps().size() - 1;
    const double sigma = two->sigmas()[last];
    const double alpha_t = 1 / std::sqrt(sigma * sigma + 1);
    const at::Tensor eps = model(y, last);
    expect_close(two->step(eps, last, y), (y - sigma * alpha_t * eps) / alpha_t, 1e-5, "DPM last step");
  }
}

TEST(SchedulerStep, DpmFollowsTheExactTrajectory) {
  for (const char* name : {"dpmpp_2m", "dpmpp_2m_karras"}) {
    auto s = make(sd_config(), name, 10);
    const std::vector<double> sigmas = s->sigmas();
    const at::Tensor x0 = dummy_sample(), eps = dummy_noise();
    const double alpha0 = 1 / std::sqrt(sigmas[0] * sigmas[0] + 1);
    at::Tensor x = alpha0 * x0 + sigmas[0] * alpha0 * eps;  // VP scale
    for (size_t i = 0; i < s->timesteps().size(); ++i) x = s->step(eps, i, x);
    expect_close(x, x0, 5e-5, name);
  }
}

TEST(SchedulerStep, AncestralNoiseDependsOnlyOnTheItemsGenerator) {
  auto run = [](const at::Tensor& x0, std::vector<uint64_t> seeds) {
    auto s = make(sd_config(), "euler_a", 10);
    std::vector<at::Generator> gens;
    for (uint64_t seed : seeds) gens.push_back(at::detail::createCPUGenerator(seed));
    at::Tensor x = x0 * s->init_noise_sigma();
    for (size_t i = 0; i < s->timesteps().size(); ++i) x = s->step(0.1 * s->scale_model_input(x, i), i, x, &gens);
    return x;
  };
  const at::Tensor x = dummy_sample(2);
  const at::Tensor both = run(x, {7, 8});
  EXPECT_TRUE(at::equal(both.slice(0, 0, 1), run(x.slice(0, 0, 1), {7}))) << "item 0 alone";
  EXPECT_TRUE(at::equal(both.slice(0, 1, 2), run(x.slice(0, 1, 2), {8}))) << "item 1 alone";
  EXPECT_TRUE(at::equal(both.slice(0, 1, 2), run(x, {9, 8}).slice(0, 1, 2))) << "neighbour's seed changed";
  EXPECT_FALSE(at::equal(both.slice(0, 0, 1), run(x, {9, 8}).slice(0, 0, 1))) << "own seed changed";
  // Batch of one: the same draws as diffusers' single generator, randn([1, 4, 8, 8]) per step.
  auto s = make(sd_config(), "euler_a", 2);
  std::vector<at::Generator> gens = {at::detail::createCPUGenerator(7)};
  const at::Tensor x1 = x.slice(0, 0, 1);
  const at::Tensor out = s->step(at::zeros_like(x1), 0, x1, &gens);
  at::Generator g = at::detail::createCPUGenerator(7);
  const at::Tensor noise = at::randn({1, 4, 8, 8}, g, at::kFloat);
  const std::vector<double> sig = s->sigmas();
  const double up = std::sqrt(sig[1] * sig[1] * (sig[0] * sig[0] - sig[1] * sig[1]) / (sig[0] * sig[0]));
  const double down = std::sqrt(sig[1] * sig[1] - up * up);
  expect_close(out, x1 + noise * up, 1e-5 * (1 + down), "ancestral step with zero noise prediction");
}

TEST(SchedulerStep, DdimEtaNoiseDependsOnlyOnTheItemsGenerator) {
  auto run = [](const at::Tensor& x, std::vector<uint64_t> seeds) {
    auto s = make(sd_config(), "ddim", 5);
    dynamic_cast<DDIMScheduler&>(*s).set_eta(1.0);
    std::vector<at::Generator> gens;
    for (uint64_t seed : seeds) gens.push_back(at::detail::createCPUGenerator(seed));
    at::Tensor y = x;
    for (size_t i = 0; i < s->timesteps().size(); ++i) y = s->step(0.1 * y, i, y, &gens);
    return y;
  };
  const at::Tensor x = dummy_sample(2);
  const at::Tensor both = run(x, {3, 4});
  EXPECT_TRUE(at::equal(both.slice(0, 1, 2), run(x.slice(0, 1, 2), {4})));
  EXPECT_FALSE(at::equal(both, run(x, {3, 5})));
  auto deterministic = make(sd_config(), "ddim", 5);  // eta 0 draws nothing
  EXPECT_TRUE(at::equal(deterministic->step(x, 0, x), deterministic->step(x, 0, x)));
}

TEST(SchedulerStep, DynamicThresholding) {
  const at::Tensor x = at::linspace(-4, 4, 1000, at::kFloat).reshape({1, 1, 10, 100});
  // s = the 0.995 quantile of |x| (about 3.96), clamped to max 2: clamp to [-2, 2], then divide by 2.
  expect_close(sched::threshold_sample(x, 0.995, 2.0), x.clamp(-2, 2) / 2, 1e-7, "threshold at 2");
  // A quantile below 1 is raised to 1: plain clipping to [-1, 1].
  expect_close(sched::threshold_sample(x * 0.1, 0.995, 2.0), x * 0.1, 1e-7, "no threshold below 1");
}

TEST(SchedulerStep, LmsCoefficientsIntegrateTheLagrangeBasis) {
  auto s = make(sd_config(), "lms", 10);
  auto* lms = dynamic_cast<LMSDiscreteScheduler*>(s.get());
  ASSERT_NE(lms, nullptr);
  const std::vector<double> sig = lms->sigmas();
  // Order 1: the step size itself.
  EXPECT_NEAR(lms->lms_coefficient(1, 0, 0), sig[1] - sig[0], 1e-12);
  // Order 4 at step 5: Simpson's rule is exact for the cubic basis polynomials.
  for (int j = 0; j < 4; ++j) {
    auto basis = [&](double tau) {
      double p = 1;
      for (int k = 0; k < 4; ++k)
        if (k != j) p *= (tau - sig[5 - k]) / (sig[5 - j] - sig[5 - k]);
      return p;
    };
    const double a = sig[5], b = sig[6];
    const double exact = (b - a) / 6 * (basis(a) + 4 * basis((a + b) / 2) + basis(b));
    EXPECT_NEAR(lms->lms_coefficient(4, 5, j), exact, 1e-6 * std::abs(b - a)) << "basis " << j;
  }
  // The Kronrod rule itself integrates polynomials of degree 30 exactly.
  EXPECT_NEAR(gauss_kronrod_21([](double x) { return std::pow(x, 30); }, -1, 1), 2.0 / 31, 1e-14);
  EXPECT_NEAR(gauss_kronrod_21([](double x) { return std::pow(x, 28) + x; }, 0, 2), std::pow(2, 29) / 29 + 2, 1e-5);
}

// ----------------------------------------------------------------------------- errors

TEST(SchedulerErrors, UnsupportedAndBadValues) {
  using test::expect_error;
  const json dpm = with(sd_config(), {{"_class_name", "DPMSolverMultistepScheduler"}});
  expect_error([&] { make_scheduler(sd_config(), "heun", "cfg.json"); }, ErrorKind::Unsupported,
               {"cfg.json", "heun", "dpmpp_2m_karras"});
  expect_error(
      [&] {
        make_scheduler(with(sd_config(), {{"_class_name", "UniPCMultistepScheduler"}}), "", "cfg.json");
      },
      ErrorKind::Unsupported, {"UniPCMultistepScheduler", "DDIMScheduler"});
  expect_error(
      [&] {
        make_scheduler(with(dpm, {{"solver_order", 3}}), "", "cfg.json");
      },
      ErrorKind::Unsupported, {"solver_order = 3", "1, 2"});
  expect_error(
      [&] {
        make_scheduler(with(dpm, {{"algorithm_type", "sde-dpmsolver++"}}), "", "cfg.json");
      },
      ErrorKind::Unsupported, {"sde-dpmsolver++", "dpmsolver++"});
  expect_error(
      [&] {
        make_scheduler(with(sd_config(), {{"beta_schedule", "sigmoid"}}), "ddim", "cfg.json");
      },
      ErrorKind::Unsupported, {"beta_schedule", "squaredcos_cap_v2"});
  expect_error(
      [&] {
        make_scheduler(with(sd_config(), {{"prediction_type", "sample"}}), "euler_a", "cfg.json");
      },
      ErrorKind::Unsupported, {"prediction_type"});
  expect_error(
      [&] {
        make_scheduler(with(sd_config(), {{"num_train_timesteps", "many"}}), "", "cfg.json");
      },
      ErrorKind::BadInput, {"num_train_timesteps"});
  json nameless = sd_config();
  nameless.erase("_class_name");
  expect_error([&] { make_scheduler(nameless, "", "cfg.json"); }, ErrorKind::BadInput, {"_class_name"});
  // -Infinity written by Python's json (as a string once quoted) is accepted.
  EXPECT_NO_THROW(make_scheduler(with(dpm, {{"lambda_min_clipped", "-Infinity"}}), "", "cfg.json"));
  EXPECT_EQ(scheduler_names().size(), 9u);  // pndm ddim euler euler_karras euler_a dpmpp_2m(_karras) lms(_karras)
}

TEST(SchedulerErrors, StepMisuse) {
  using test::expect_error;
  const at::Tensor x = dummy_sample();
  auto dpm = make_scheduler(sd_config(), "dpmpp_2m", "cfg.json");
  expect_error([&] { dpm->step(x, 0, x); }, ErrorKind::BadInput, {"set_timesteps"});
  dpm->set_timesteps(10);
  expect_error([&] { dpm->step(x, 1, x); }, ErrorKind::BadInput, {"expected step 0"});
  expect_error([&] { dpm->step(x, 10, x); }, ErrorKind::BadInput, {"out of range"});
  auto ea = make(sd_config(), "euler_a", 10);
  std::vector<at::Generator> three(3, at::detail::createCPUGenerator(1));
  expect_error([&] { ea->step(x, 0, x, &three); }, ErrorKind::BadInput, {"3 generators", "batch of 2"});
  expect_error([&] { make(sd_config(), "ddim", 0); }, ErrorKind::BadInput, {"num_inference_steps"});
}

}  // namespace
}  // namespace fairdiff
