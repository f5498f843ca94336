// fairdiff-bench: speed and memory of a Stable Diffusion pipeline on this machine.
//
//   fairdiff-bench                                  # SD 1.5 architecture, random weights, 512 and 256
//   fairdiff-bench --model ./stable-diffusion-v1-5 --sizes 512 --steps 4 --dtype bf16
//   fairdiff-bench --sizes 256 --fairness-rows 2    # + a step with 2 edit concepts per image
//   fairdiff-bench --sizes 256 --libtorch-threads   # LibTorch's own thread default, to compare
//
// Prints one table row per measurement as it is taken, then one JSON line (the last
// line of stdout) with every figure. Progress goes to stderr.
//
// What is timed (wall clock; CUDA work is waited for):
//   kernels      a 2048x2048 float matmul and a 3x3 convolution 2x320x64x64, best of 3
//   build/load   the three networks (random mode: construction, then the random fill)
//   text encode  one text-encoder call on a CFG pair per image ([2B, 77] tokens), median of 3
//   UNet step    one step of the library's sampling loop (StableDiffusionPipeline::denoise:
//                one batched UNet call on [2B] latents, CFG, scheduler step); the first step
//                is a warm-up, the mean of the following ones is reported
//   fairness     the same with R extra UNet rows per image (semantic guidance with R edit
//                concepts evaluates [2B + R B] rows); its guidance arithmetic is left out
//   VAE decode   one decode of the B latents (first call at this size)
//   peak RSS     getrusage ru_maxrss: the process's high-water mark so far
// "cores busy" is CPU seconds / wall seconds over the timed steps (2.0 = both cores of a
// 2-core machine); the load average at start and end says whether other processes competed.
// "page faults" per step counts fresh pages mapped: freed memory returned to the kernel
// and taken again (see fairdiff::configure_allocator).
//
// Runtime: fairdiff::configure_threads(--threads) and fairdiff::configure_allocator(), as our
// executables start; --libtorch-threads and --system-malloc leave LibTorch's and glibc's
// defaults instead, for comparison. Default steps: 2 timed at 512x512 and above, 3 below
// (a 512x512 SD 1.5 CFG step takes tens of seconds on a 2-core CPU).
//
// Random weights: the networks are built from the SD 1.5 configs under
// <fixtures>/keysets/sd15 (tokenizer and scheduler: <fixtures>/models/tiny-sd1, the real
// CLIP vocabulary and SD 1.5's PNDM settings), weights ~ N(0, 0.02), biases 0, norm
// scales 1: the same FLOPs and memory as the real model; the images are noise.
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/InferenceMode.h>
#include <sys/resource.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "config_json.h"
#include "fairdiff/error.h"
#include "fs_util.h"
#include "model_folder.h"
#include "pipeline.h"
#include "runtime.h"
#include "scheduler.h"

namespace {

using Clock = std::chrono::steady_clock;
using fairdiff::StableDiffusionModel;
using fairdiff::StableDiffusionPipeline;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Waits for queued device work (CUDA runs asynchronously); nothing to do on the CPU.
void sync(const at::Tensor& t) {
  if (t.defined() && !t.is_cpu()) t.flatten()[0].item<float>();
}

double peak_rss_gib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / (1024.0 * 1024.0);  // ru_maxrss is in KiB on Linux
}

// CPU seconds (user + system, all threads) this process has used.
double cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

// Page faults (minor: no disk) this process has taken. Each maps a fresh 4 KiB page; on
// some VMs one costs ~25 us, so reused memory matters.
long page_faults() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_minflt;
}

// The 1-minute load average: how busy the machine was (other processes slow a benchmark down).
double load_average() {
  double load = -1;
  if (FILE* f = std::fopen("/proc/loadavg", "r")) {
    if (std::fscanf(f, "%lf", &load) != 1) load = -1;
    std::fclose(f);
  }
  return load;
}

double mean(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return v.empty() ? 0 : s / static_cast<double>(v.size());
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

struct Options {
  std::string model;     // "" = random weights, SD 1.5 architecture
  std::string fixtures;  // "" = $FAIRDIFF_FIXTURES or ../shared/fixtures beside the source tree
  std::vector<int64_t> sizes = {512, 256};
  int64_t steps = 0;  // 0: 2 at 512x512 and above, 3 below
  int64_t batch = 1;
  std::string dtype = "fp32";
  std::string device = "cpu";
  int threads = 0;
  bool libtorch_threads = false;
  bool system_malloc = false;
  int64_t fairness_rows = 0;
  std::string scheduler;  // "" = the model's
  bool skip_vae = false;
};

at::ScalarType parse_dtype(const std::string& s) {
  if (s == "fp32") return at::kFloat;
  if (s == "bf16") return at::kBFloat16;
  if (s == "fp16") return at::kHalf;
  fairdiff::throw_bad_input("--dtype", "expected fp32, bf16 or fp16, found \"" + s + "\"");
}

at::Device parse_device(const std::string& s) {
  at::Device device(at::kCPU);
  try {
    device = at::Device(s);
  } catch (const c10::Error&) {
    fairdiff::throw_bad_input("--device", "expected cpu, cuda or cuda:N, found \"" + s + "\"");
  }
  if (!device.is_cpu() && !device.is_cuda())
    fairdiff::throw_unsupported("--device", "only cpu and cuda are supported, found \"" + s + "\"");
  if (device.is_cuda() && !at::hasCUDA())
    fairdiff::throw_unsupported("--device " + s, "this LibTorch was built without CUDA (or no GPU is visible)",
                                "build against a CUDA LibTorch: CMAKE_PREFIX_PATH, see CMakeLists.txt");
  return device;
}

std::string fixtures_root(const Options& o) {
  if (!o.fixtures.empty()) return o.fixtures;
  if (const char* env = std::getenv("FAIRDIFF_FIXTURES"); env && *env) return env;
  return std::string(FAIRDIFF_SOURCE_DIR) + "/../shared/fixtures";
}

// Weights ~ N(0, 0.02), biases 0, one-dimensional weights (norm scales) 1: finite activations
// through all layers, at the cost of the real model.
void fill_random(torch::nn::Module& module, at::Generator& gen) {
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    at::Tensor p = item.value();
    const std::string& name = item.key();
    const bool is_bias = name.size() >= 4 && name.compare(name.size() - 4, 4, "bias") == 0;
    if (is_bias) {
      p.zero_();
    } else if (p.dim() == 1) {
      p.fill_(1.0);
    } else if (p.is_cpu()) {
      p.normal_(0.0, 0.02, gen);
    } else {
      p.normal_(0.0, 0.02);
    }
  }
}

// The SD 1.5 architecture from the fixture configs, random weights. Returns the seconds of
// construction and of the random fill.
StableDiffusionModel random_sd15(const std::string& fixtures, const fairdiff::LoadOptions& lo, double* build_s,
                                 double* init_s) {
  const std::string keysets = fixtures + "/keysets/sd15";
  const std::string tiny = fixtures + "/models/tiny-sd1";
  if (!fairdiff::is_directory(keysets))
    fairdiff::throw_bad_input(keysets, "the SD 1.5 configs for the random-weight benchmark are missing",
                              "set FAIRDIFF_FIXTURES (or --fixtures) to the fixtures folder, or pass --model DIR");
  StableDiffusionModel m;
  m.dir = "random SD 1.5 (" + keysets + ")";
  const auto t0 = Clock::now();
  const std::string te = keysets + "/text_encoder.config.json", un = keysets + "/unet.config.json",
                    va = keysets + "/vae.config.json";
  m.text_encoder = fairdiff::CLIPTextModel(fairdiff::CLIPTextConfig::from_json(fairdiff::read_json_file(te), te));
  m.unet = fairdiff::UNet2DConditionModel(
      fairdiff::UNet2DConditionConfig::from_json(fairdiff::read_json_file(un), un));
  m.vae = fairdiff::AutoencoderKL(fairdiff::AutoencoderKLConfig::from_json(fairdiff::read_json_file(va), va));
  m.tokenizer = fairdiff::load_tokenizer(tiny + "/tokenizer");  // the real CLIP vocabulary
  m.scheduler_config = fairdiff::read_json_file(tiny + "/scheduler/scheduler_config.json");  // = SD 1.5's
  for (torch::nn::Module* mod : std::vector<torch::nn::Module*>{m.text_encoder.get(), m.unet.get(), m.vae.get()}) {
    mod->to(lo.device, lo.dtype);
    mod->eval();
  }
  *build_s = seconds_since(t0);
  const auto t1 = Clock::now();
  at::Generator gen = at::detail::createCPUGenerator(1234);
  fill_random(*m.text_encoder, gen);
  fill_random(*m.unet, gen);
  fill_random(*m.vae, gen);
  sync(m.unet->parameters().front());
  *init_s = seconds_since(t1);
  return m;
}

// R extra conditioning rows per image in the CFG call, as semantic guidance's edit concepts
// are evaluated: the UNet batch grows from 2B to (2 + R) B. The guidance term itself (a few
// elementwise ops on [R B, C, h, w]) is left out: it is noise next to the UNet.
class ExtraRows : public fairdiff::GuidanceExtension {
 public:
  ExtraRows(const at::Tensor& cond, int64_t rows) {
    const int64_t B = cond.size(0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t b = 0; b < B; ++b) latent_rows_.push_back(b);
    const at::Tensor idx = at::tensor(latent_rows_, at::kLong).to(cond.device());
    extra_ = cond.index_select(0, idx);  // [R B, L, D]
  }
  at::Tensor embeddings(size_t, std::vector<int64_t>* latent_rows) override {
    *latent_rows = latent_rows_;
    return extra_;
  }
  at::Tensor apply(size_t, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor& g) override {
    return g;
  }

 private:
  std::vector<int64_t> latent_rows_;
  at::Tensor extra_;
};

struct StepTimes {
  double warmup = 0;          // the first step
  std::vector<double> timed;  // the others
  double cpu_per_wall = 0;    // over the timed steps: CPU seconds / wall seconds (busy cores)
  double faults_per_step = 0; // page faults per timed step
  at::Tensor latents;
};

// Runs the library's sampling loop over 1 + `steps` UNet calls and times each call.
StepTimes time_steps(StableDiffusionPipeline& pipe, StableDiffusionModel& model, const Options& o,
                     const fairdiff::PromptEmbeddings& emb, int64_t size, int64_t steps,
                     fairdiff::GuidanceExtension* extension, const char* label) {
  auto sched = fairdiff::make_scheduler(model.scheduler_config, o.scheduler, "scheduler_config.json");
  // The fewest inference steps giving at least 1 + steps UNet calls (PNDM repeats one timestep).
  for (int64_t k = 1;; ++k) {
    sched->set_timesteps(k);
    if (static_cast<int64_t>(sched->timesteps().size()) >= 1 + steps) break;
  }
  std::vector<at::Generator> gens;
  std::vector<int64_t> seeds;
  for (int64_t b = 0; b < o.batch; ++b) seeds.push_back(42 + b);
  const at::Tensor noise = pipe.initial_noise(seeds, size, size, &gens);
  StepTimes out;
  auto last = Clock::now();
  auto timed_start = last;
  double cpu_start = 0;
  long faults_start = 0;
  const size_t n = sched->timesteps().size();
  out.latents = pipe.denoise(*sched, noise, emb, 7.5, &gens,
                             [&](size_t i, size_t, const at::Tensor& latents) {
                               sync(latents);
                               const double dt = seconds_since(last);
                               if (i == 0)
                                 out.warmup = dt;
                               else
                                 out.timed.push_back(dt);
                               std::fprintf(stderr, "  %s %lldx%lld step %zu/%zu%s: %.2f s\n", label,
                                            static_cast<long long>(size), static_cast<long long>(size), i + 1, n,
                                            i == 0 ? " (warm-up)" : "", dt);
                               last = Clock::now();
                               if (i == 0) {
                                 timed_start = last;
                                 cpu_start = cpu_seconds();
                                 faults_start = page_faults();
                               }
                             },
                             extension);
  if (!out.timed.empty()) {
    out.cpu_per_wall = (cpu_seconds() - cpu_start) / seconds_since(timed_start);
    out.faults_per_step = static_cast<double>(page_faults() - faults_start) / static_cast<double>(out.timed.size());
  }
  return out;
}

void row(const std::string& what, const std::string& size, double seconds, const std::string& notes) {
  std::printf("%-36s %-9s %9.3f  %s\n", what.c_str(), size.c_str(), seconds, notes.c_str());
  std::fflush(stdout);
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

nlohmann::json kernels(const at::TensorOptions& to) {
  auto best_of = [](auto&& f) {
    f();
    double best = 1e30;
    for (int i = 0; i < 3; ++i) {
      const auto t0 = Clock::now();
      sync(f());
      best = std::min(best, seconds_since(t0));
    }
    return best;
  };
  const at::Tensor a = at::randn({2048, 2048}).to(to), b = at::randn({2048, 2048}).to(to);
  const double mm = best_of([&] { return at::mm(a, b); });
  const at::Tensor x = at::randn({2, 320, 64, 64}).to(to), w = at::randn({320, 320, 3, 3}).to(to);
  const double conv = best_of([&] { return at::conv2d(x, w, {}, 1, 1); });
  const double mm_flops = 2.0 * 2048 * 2048 * 2048, conv_flops = 2.0 * 2 * 320 * 320 * 9 * 64 * 64;
  return {{"matmul2048_s", mm},
          {"matmul2048_gflops", mm_flops / mm / 1e9},
          {"conv3x3_2x320x64x64_s", conv},
          {"conv3x3_2x320x64x64_gflops", conv_flops / conv / 1e9}};
}

int run(const Options& o) {
  for (int64_t s : o.sizes)
    if (s <= 0 || s % 64 != 0)
      fairdiff::throw_bad_input("--sizes", "expected image sizes that are positive multiples of 64, found " +
                                               std::to_string(s));
  if (o.batch < 1) fairdiff::throw_bad_input("--batch", "expected at least 1 image, found " + std::to_string(o.batch));
  if (o.steps < 0) fairdiff::throw_bad_input("--steps", "expected 0 (default) or more steps");
  if (o.fairness_rows < 0) fairdiff::throw_bad_input("--fairness-rows", "expected 0 or more rows per image");
  const at::ScalarType dtype = parse_dtype(o.dtype);
  const at::Device device = parse_device(o.device);
  if (dtype == at::kHalf && device.is_cpu())
    fairdiff::throw_unsupported("--dtype fp16", "LibTorch 1.13 has no half-precision matmul on the CPU",
                                "use --dtype bf16 or fp32 on the CPU, fp16 with --device cuda");

  if (!o.libtorch_threads) fairdiff::configure_threads(o.threads);
  const bool allocator = !o.system_malloc && fairdiff::configure_allocator();
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  const std::string malloc_setting = allocator             ? "configure_allocator"
                                     : tunables && *tunables ? std::string("GLIBC_TUNABLES=") + tunables
                                                             : "glibc defaults";
  c10::InferenceMode inference;
  nlohmann::json report = {{"bench", "fairdiff"},
                           {"device", device.str()},
                           {"dtype", o.dtype},
                           {"threads", at::get_num_threads()},
                           {"thread_summary", fairdiff::thread_summary()},
                           {"thread_setting", o.libtorch_threads ? "libtorch default" : "configure_threads"},
                           {"malloc", malloc_setting},
                           {"batch", o.batch},
                           {"load_average_at_start", load_average()}};

  std::printf("fairdiff-bench: %s, %s, %s%s, malloc %s; load average %.2f at start\n", device.str().c_str(),
              o.dtype.c_str(), fairdiff::thread_summary().c_str(), o.libtorch_threads ? " (LibTorch's default)" : "",
              malloc_setting.c_str(), load_average());
  const auto kern = kernels(at::TensorOptions(dtype).device(device));
  report["kernels"] = kern;
  std::printf("kernels (%s): matmul 2048x2048 %.1f GFLOP/s, conv3x3 2x320x64x64 %.1f GFLOP/s\n\n", o.dtype.c_str(),
              kern["matmul2048_gflops"].get<double>(), kern["conv3x3_2x320x64x64_gflops"].get<double>());
  std::printf("%-36s %-9s %9s  %s\n", "measurement", "size", "seconds", "notes");

  // Models.
  fairdiff::LoadOptions lo;
  lo.dtype = dtype;
  lo.device = device;
  StableDiffusionModel model;
  if (o.model.empty()) {
    double build_s = 0, init_s = 0;
    model = random_sd15(fixtures_root(o), lo, &build_s, &init_s);
    report["model"] = "random SD 1.5";
    report["build_s"] = build_s;
    report["random_init_s"] = init_s;
    row("build networks (from configs)", "-", build_s,
        "SD 1.5 architecture, uninitialised" + std::string(dtype == at::kFloat ? "" : ", converted to " + o.dtype));
    row("random init (normal_ fill)", "-", init_s, "not a cost of real use");
  } else {
    const auto t0 = Clock::now();
    model = fairdiff::load_model_folder(o.model, lo);
    sync(model.unet->parameters().front());
    const double load_s = seconds_since(t0);
    report["model"] = o.model;
    report["load_s"] = load_s;
    row("load model folder", "-", load_s, o.model);
  }
  const int64_t p_text = fairdiff::parameter_count(*model.text_encoder), p_unet = fairdiff::parameter_count(*model.unet),
                p_vae = fairdiff::parameter_count(*model.vae);
  report["parameters"] = {{"text_encoder", p_text}, {"unet", p_unet}, {"vae", p_vae}};
  report["peak_rss_after_load_gib"] = peak_rss_gib();
  std::printf("%-36s %-9s %9s  text %.1fM, unet %.1fM, vae %.1fM parameters; peak RSS %.2f GiB\n", "", "", "",
              p_text / 1e6, p_unet / 1e6, p_vae / 1e6, peak_rss_gib());
  StableDiffusionPipeline pipe(model);

  // Text encoder: prompts and negatives in one call, as the pipeline does for CFG.
  const std::vector<std::string> prompts(static_cast<size_t>(o.batch), "a photo of a doctor, portrait, studio light");
  const std::vector<std::string> negatives(static_cast<size_t>(o.batch), "");
  fairdiff::PromptEmbeddings emb = pipe.encode_prompts(prompts, negatives, 0, true);  // warm-up
  std::vector<double> te;
  for (int i = 0; i < 3; ++i) {
    const auto t0 = Clock::now();
    emb = pipe.encode_prompts(prompts, negatives, 0, true);
    sync(emb.cond);
    te.push_back(seconds_since(t0));
  }
  report["text_encode_s"] = median(te);
  row("text encode (CFG pair per image)", "-", median(te),
      "batch " + std::to_string(2 * o.batch) + " x 77 tokens, median of 3");

  // Per size: UNet steps, the fairness variant, the VAE.
  report["sizes"] = nlohmann::json::array();
  for (int64_t size : o.sizes) {
    const std::string sz = std::to_string(size) + "x" + std::to_string(size);
    const int64_t steps = o.steps > 0 ? o.steps : (size * size >= 512 * 512 ? 2 : 3);
    nlohmann::json r = {{"size", size}, {"unet_batch", 2 * o.batch}};
    const StepTimes st = time_steps(pipe, model, o, emb, size, steps, nullptr, "CFG");
    const double step_s = mean(st.timed);
    r["warmup_step_s"] = st.warmup;
    r["timed_steps"] = st.timed.size();
    r["step_s"] = step_s;
    const double step_min = st.timed.empty() ? 0 : *std::min_element(st.timed.begin(), st.timed.end());
    r["step_min_s"] = step_min;
    r["step_per_image_s"] = step_s / static_cast<double>(o.batch);
    r["step_cpu_per_wall"] = st.cpu_per_wall;
    r["step_page_faults"] = st.faults_per_step;
    row("UNet step (CFG)", sz, step_s,
        "UNet batch " + std::to_string(2 * o.batch) + ", mean of " + std::to_string(st.timed.size()) + " (min " +
            fmt("%.3f", step_min) + "), warm-up " + fmt("%.3f", st.warmup) + " s, " +
            fmt("%.2f", st.cpu_per_wall) + " cores busy, " + fmt("%.0f", st.faults_per_step) + " page faults");
    bool finite = st.latents.isfinite().all().item<bool>();
    r["latents_finite"] = finite;

    if (o.fairness_rows > 0) {
      ExtraRows extra(emb.cond, o.fairness_rows);
      const StepTimes ft = time_steps(pipe, model, o, emb, size, steps, &extra, "CFG+rows");
      const double f_s = mean(ft.timed);
      const int64_t fb = (2 + o.fairness_rows) * o.batch;
      r["fairness_rows"] = o.fairness_rows;
      r["fairness_unet_batch"] = fb;
      r["fairness_warmup_step_s"] = ft.warmup;
      r["fairness_step_s"] = f_s;
      r["fairness_step_per_image_s"] = f_s / static_cast<double>(o.batch);
      r["fairness_extra_per_image_s"] = (f_s - step_s) / static_cast<double>(o.batch);
      r["fairness_step_ratio"] = f_s / step_s;
      row("UNet step (CFG + " + std::to_string(o.fairness_rows) + " rows/image)", sz, f_s,
          "UNet batch " + std::to_string(fb) + ", x" + fmt("%.2f", f_s / step_s) + " the CFG step, +" +
              fmt("%.3f", (f_s - step_s) / static_cast<double>(o.batch)) + " s per image per step");
    }

    if (!o.skip_vae) {
      const auto t0 = Clock::now();
      const at::Tensor image = pipe.decode(st.latents);
      sync(image);
      const double vae_s = seconds_since(t0);
      const bool image_finite = image.isfinite().all().item<bool>();
      finite = finite && image_finite;
      r["vae_decode_s"] = vae_s;
      r["image_finite"] = image_finite;
      row("VAE decode", sz, vae_s, std::to_string(o.batch) + " image(s), first call at this size");
    }
    const double rss = peak_rss_gib();
    r["peak_rss_gib"] = rss;
    std::printf("%-36s %-9s %9s  peak RSS so far %.2f GiB; outputs finite: %s\n", "", sz.c_str(), "", rss,
                finite ? "yes" : "NO");
    report["sizes"].push_back(r);
  }
  report["peak_rss_gib"] = peak_rss_gib();
  report["load_average_at_end"] = load_average();
  std::printf("\npeak RSS %.2f GiB; load average %.2f at the end\n", peak_rss_gib(), load_average());
  std::printf("%s\n", report.dump().c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"fairdiff-bench: build/load, text encoder, UNet step, VAE decode and peak memory of Stable Diffusion"};
  Options o;
  app.add_option("--model", o.model, "diffusers model folder (default: SD 1.5 architecture with random weights)");
  app.add_option("--fixtures", o.fixtures, "fixtures folder with keysets/sd15 (default: $FAIRDIFF_FIXTURES or ../shared/fixtures)");
  app.add_option("--sizes", o.sizes, "square image sizes, comma-separated")->delimiter(',')->capture_default_str();
  app.add_option("--steps", o.steps, "timed UNet steps per size after one warm-up step, at least (PNDM repeats a timestep); default: 2 at 512 and above, 3 below");
  app.add_option("--batch", o.batch, "images per UNet call (the CFG batch is twice this)")->capture_default_str();
  app.add_option("--dtype", o.dtype, "fp32, bf16 or fp16")->capture_default_str();
  app.add_option("--device", o.device, "cpu, cuda or cuda:N")->capture_default_str();
  app.add_option("--threads", o.threads, "CPU threads, 0 = all CPUs (or OMP_NUM_THREADS)")->capture_default_str();
  app.add_flag("--libtorch-threads", o.libtorch_threads, "keep LibTorch's own thread default (for comparison)");
  app.add_option("--fairness-rows", o.fairness_rows, "also time a step with R extra UNet rows per image (SEGA with R concepts)");
  app.add_option("--scheduler", o.scheduler, "scheduler override (pndm, ddim, euler, ...; default: the model's)");
  app.add_flag("--system-malloc", o.system_malloc, "keep glibc's malloc defaults (for comparison)");
  app.add_flag("--skip-vae", o.skip_vae, "do not time the VAE decode");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  try {
    return run(o);
  } catch (const fairdiff::Error& e) {
    std::fprintf(stderr, "fairdiff-bench: error: %s\n", e.what());
    return fairdiff::exit_code(e.kind());
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "fairdiff-bench: error: %s\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fairdiff-bench: error: %s\n", e.what());
    return 1;
  }
}
