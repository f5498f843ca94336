// fairdiff-bench: speed and memory of a Stable Diffusion pipeline on this machine.
//
//   fairdiff-bench                                  # SD 1.5 architecture, random weights, 512 and 256
//   fairdiff-bench --model ./stable-diffusion-v1-5 --sizes 512 --steps 4 --dtype bf16
//   fairdiff-bench --sizes 256 --fairness-rows 2    # + a step with 2 edit concepts per image
//   fairdiff-bench --sizes 512 --fairness-rows 1 --alternate 4   # its ratio from 4 alternating pairs
//   fairdiff-bench --sizes 256 --libtorch-threads   # LibTorch's own thread default, to compare
//   fairdiff-bench --save-random-model runs/sd15-random   # write the random SD 1.5 as a diffusers folder
//   fairdiff-bench --model runs/sd15-random --sizes 1024 --vae-tiling   # tiled VAE decode
//
// Prints one table row per measurement as it is taken, then one JSON line (the last
// line of stdout) with every figure. Progress goes to stderr.
//
// What is timed (wall clock; CUDA work is waited for):
//   peak         the machine's arithmetic peak: a hand-written FMA loop (AVX-512 or AVX2) on
//                every thread, and the AVX512-BF16 dot product where the CPU has it
//   kernels      a 2048x2048 float matmul and a 3x3 convolution 2x320x64x64, best of 3
//   build/load   the three networks (random mode: construction, then the random fill; with
//                --model: the folder, weights mapped and prefaulted, ready to run)
//   text encode  one text-encoder call on a CFG pair per image ([2B, 77] tokens), median of 3
//   UNet step    one step of the library's sampling loop (StableDiffusionPipeline::denoise:
//                one batched UNet call on [2B] latents, CFG, scheduler step); the first step
//                is a warm-up, the mean of the following ones is reported
//   fairness     the same with R extra UNet rows per image (semantic guidance with R edit
//                concepts evaluates [2B + R B] rows); its guidance arithmetic is left out;
//                with --alternate N, in one loop with the CFG steps, alternately (N pairs)
//   VAE decode   one decode of the B latents (first call at this size); with --vae-runs N,
//                also the mean of N - 1 more (the memory faulted in by the first is reused)
//   peak RSS     the process's high-water mark (VmHWM), per phase: Linux resets it when
//                "5" is written to /proc/self/clear_refs; compared with the weights' bytes
//   profile      per component (text encoder, UNet step, VAE decode) and per operator
//                (conv2d, linear, attention products, norms; profile.h): seconds, GFLOP
//                counted from the shapes, GFLOP/s and its share of the measured peak;
//                "other" is the rest of the wall time (elementwise ops, copies, scheduler)
// "cores busy" is CPU seconds / wall seconds over the timed steps (2.0 = both cores of a
// 2-core machine); the load average at start and end says whether other processes competed.
// "page faults" per step counts fresh pages mapped: freed memory returned to the kernel
// and taken again (see fairdiff::configure_allocator).
//
// Runtime: fairdiff::configure_threads(--threads) and fairdiff::configure_allocator(), as our
// executables start; --libtorch-threads and --system-malloc leave LibTorch's and glibc's
// defaults instead, for comparison, and --no-huge-page-arena keeps glibc's configured heap
// for the large blocks too (no arena.h). Default steps: 2 timed at 512x512 and above, 3 below
// (a 512x512 SD 1.5 CFG step takes tens of seconds on a 2-core CPU).
//
// Random weights: the networks are built from the SD 1.5 configs under
// <fixtures>/keysets/sd15 (tokenizer and scheduler: <fixtures>/models/tiny-sd1, the real
// CLIP vocabulary and SD 1.5's PNDM settings), weights ~ N(0, 0.02), biases 0, norm
// scales 1: the same FLOPs and memory as the real model; the images are noise.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <c10/core/InferenceMode.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cpuid.h>
#include <immintrin.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <nlohmann/json.hpp>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "arena.h"
#include "config_json.h"
#include "cpu_kernels.h"
#include "fairdiff/error.h"
#include "fs_util.h"
#include "layers.h"
#include "model_folder.h"
#include "pipeline.h"
#include "profile.h"
#include "runtime.h"
#include "scheduler.h"
#include "tensor_io.h"
#include "weights_cache.h"
#include "tool_main.h"

namespace fairdiff::bench {
int save_random_sdxl(const std::string& fixtures, const std::string& dir);  // tools/bench_sdxl.cpp
}

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

// VmHWM of /proc/self/status: the resident high-water mark since start or the last reset.
double vm_hwm_gib() {
  double kib = -1;
  if (FILE* f = std::fopen("/proc/self/status", "r")) {
    char line[256];
    while (std::fgets(line, sizeof line, f))
      if (std::sscanf(line, "VmHWM: %lf kB", &kib) == 1) break;
    std::fclose(f);
  }
  return kib < 0 ? peak_rss_gib() : kib / (1024.0 * 1024.0);
}

// A "Name:  123 kB" field of /proc/self/status in GiB (RssAnon, RssFile, VmRSS), -1 if absent.
double status_gib(const char* field) {
  double kib = -1;
  if (FILE* f = std::fopen("/proc/self/status", "r")) {
    char line[256];
    const std::string prefix = std::string(field) + ":";
    while (std::fgets(line, sizeof line, f))
      if (std::strncmp(line, prefix.c_str(), prefix.size()) == 0) {
        kib = std::atof(line + prefix.size());
        break;
      }
    std::fclose(f);
  }
  return kib < 0 ? -1 : kib / (1024.0 * 1024.0);
}

// Starts a new peak-RSS phase: the high-water mark drops to the current RSS. False where the
// kernel does not allow it (the phase peaks are then the peak so far).
bool reset_peak_rss() {
  FILE* f = std::fopen("/proc/self/clear_refs", "w");
  if (!f) return false;
  const bool ok = std::fputs("5", f) >= 0;
  return std::fclose(f) == 0 && ok;
}

// The process's peak over all phases (VmHWM resets lose the earlier ones).
struct PeakTracker {
  double overall = 0;
  // The peak of the phase that ends now; starts the next one.
  double end_phase() {
    const double p = vm_hwm_gib();
    overall = std::max(overall, p);
    reset_peak_rss();
    return p;
  }
};

// ---------------------------------------------------------------------------
// The machine's arithmetic peak: independent FMA chains, enough of them to cover the FMA
// latency on two ports, on every thread at once. No memory traffic: an upper bound that no
// real kernel reaches, and the yardstick for "share of peak".
//
// One loop, chains(), for every instruction set; an Isa names its vector type, its
// instructions and how many chains fit in its registers with the two operands: 12 of
// AVX2's 16 (with 16 the accumulators spilled to memory, and the loop ran at 34.5 GFLOP/s on
// a Zen 3 where a plain 12-accumulator loop reaches 190), 16 of AVX-512's 32. Each Isa's functions carry its target attribute, and the entry points
// (fma_avx512, ...) carry it too and flatten: everything is inlined into a function built
// for that instruction set, which the caller picks at run time.

template <class Isa>
double chains(int64_t iters) {
  constexpr int n = Isa::kChains;
  typename Isa::Acc acc[n];
  typename Isa::Operand a, b;
  for (int j = 0; j < n; ++j) Isa::start(acc[j], j);
  Isa::operands(a, b);
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < n; ++j) Isa::step(acc[j], a, b);
  }
  float sum = 0;
  for (int j = 0; j < n; ++j) sum += Isa::sum(acc[j]);
  volatile float sink = sum;
  (void)sink;
  return static_cast<double>(iters) * n * Isa::kFlops;  // FLOPs
}

// FMA chains on a vector of Vec::kLanes floats: start at 1 + j/1000, multiply by 0.999999
// and add 1e-7 (no overflow, no denormals), 2 FLOPs a lane an instruction.
template <class Vec>
struct Fma {
  using Acc = typename Vec::V;
  using Operand = typename Vec::V;
  static constexpr double kFlops = Vec::kLanes * 2;
  static constexpr int kChains = Vec::kChains;
  static void start(Acc& acc, int j) { Vec::set1(acc, 1.0f + 1e-3f * static_cast<float>(j)); }
  static void operands(Operand& a, Operand& b) {
    Vec::set1(a, 0.999999f);
    Vec::set1(b, 1e-7f);
  }
  static void step(Acc& acc, const Operand& a, const Operand& b) { Vec::fmadd(acc, a, b); }
  static float sum(const Acc& acc) { return Vec::sum(acc); }
};

// The instructions of the two FMA instruction sets.
struct Avx512 {
  using V = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kChains = 16;
  __attribute__((target("avx512f"))) static void set1(V& v, float x) { v = _mm512_set1_ps(x); }
  __attribute__((target("avx512f"))) static void fmadd(V& acc, const V& a, const V& b) { acc = _mm512_fmadd_ps(acc, a, b); }
  __attribute__((target("avx512f"))) static float sum(const V& v) { return _mm512_reduce_add_ps(v); }
};

struct Avx2 {
  using V = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kChains = 12;
  __attribute__((target("avx2,fma"))) static void set1(V& v, float x) { v = _mm256_set1_ps(x); }
  __attribute__((target("avx2,fma"))) static void fmadd(V& acc, const V& a, const V& b) { acc = _mm256_fmadd_ps(acc, a, b); }
  __attribute__((target("avx2,fma"))) static float sum(const V& v) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, v);
    float s = 0;
    for (float x : lanes) s += x;
    return s;
  }
};

// vdpbf16ps: 32 bf16 products summed pairwise into 16 float lanes, 64 FLOPs an instruction.
struct Avx512Bf16Dot {
  using Acc = __m512;
  using Operand = __m512bh;
  static constexpr double kFlops = 64;
  static constexpr int kChains = 16;
  __attribute__((target("avx512f,avx512bf16"))) static void start(Acc& acc, int) { acc = _mm512_setzero_ps(); }
  __attribute__((target("avx512f,avx512bf16"))) static void operands(Operand& a, Operand& b) {
    a = (__m512bh)_mm512_set1_epi16(0x3f80);  // 1
    b = (__m512bh)_mm512_set1_epi16(0x3380);  // ~6e-8
  }
  __attribute__((target("avx512f,avx512bf16"))) static void step(Acc& acc, const Operand& a, const Operand& b) {
    acc = _mm512_dpbf16_ps(acc, a, b);
  }
  __attribute__((target("avx512f,avx512bf16"))) static float sum(const Acc& acc) {
    return _mm512_reduce_add_ps(acc);
  }
};

__attribute__((target("avx512f"), flatten)) double fma_avx512(int64_t iters) { return chains<Fma<Avx512>>(iters); }
__attribute__((target("avx2,fma"), flatten)) double fma_avx2(int64_t iters) { return chains<Fma<Avx2>>(iters); }
__attribute__((target("avx512f,avx512bf16"), flatten)) double dot_bf16(int64_t iters) {
  return chains<Avx512Bf16Dot>(iters);
}

// AMX (Sapphire Rapids and later): tdpbf16ps multiplies a 16x32 bf16 tile by a 32x16 one
// into 16x16 float accumulators, 16384 FLOPs an instruction; oneDNN runs bf16 convolutions
// and matmuls on it. Four accumulator tiles, operands kept in tile registers.
struct TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

__attribute__((target("amx-tile,amx-bf16"))) double tile_bf16(int64_t iters) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  alignas(64) uint16_t ones[16 * 32];
  for (auto& v : ones) v = 0x3c00;  // small bf16 values
  alignas(64) float out[16 * 16];
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, ones, 64);
  _tile_loadd(5, ones, 64);
  _tile_loadd(6, ones, 64);
  _tile_loadd(7, ones, 64);
  for (int64_t i = 0; i < iters; ++i) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, out, 64);
  _tile_release();
  volatile float sink = out[0];
  (void)sink;
  return static_cast<double>(iters) * 4 * 16384;
}

// Linux hands AMX's tile state to a process that asks (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); false where the CPU or kernel has none.
bool amx_available() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 22))) return false;  // AMX-BF16
  return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}

// GFLOP/s of `kernel` run on `threads` threads at once.
double parallel_gflops(double (*kernel)(int64_t), int threads, int64_t iters) {
  std::vector<std::thread> pool;
  std::vector<double> flops(static_cast<size_t>(threads));
  const auto t0 = Clock::now();
  for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { flops[static_cast<size_t>(t)] = kernel(iters); });
  for (auto& th : pool) th.join();
  const double s = seconds_since(t0);
  double total = 0;
  for (double f : flops) total += f;
  return total / s / 1e9;
}

struct MachinePeak {
  std::string fp32_kernel;  // "avx512 fma" / "avx2 fma"
  double fp32_gflops = 0;
  double avx2_gflops = 0;   // the AVX2 loop, also where AVX-512 is there (what AVX2 kernels can reach)
  double bf16_gflops = 0;   // AVX512-BF16 dot products; 0: none
  double amx_gflops = 0;    // AMX bf16 tiles; 0: none
  double bf16_peak() const { return std::max(bf16_gflops, amx_gflops); }
};

MachinePeak machine_peak(int threads) {
  MachinePeak p;
  const int64_t iters = 20'000'000;
  __builtin_cpu_init();
  // The best of three runs: a peak is what the machine can do, and a virtual machine's
  // neighbours take some of it at times (seen here: 311 to 452 GFLOP/s between runs).
  auto best = [&](double (*kernel)(int64_t), int64_t n) {
    double g = 0;
    for (int i = 0; i < 3; ++i) g = std::max(g, parallel_gflops(kernel, threads, n));
    return g;
  };
  // Held to AVX2 (FAIRDIFF_CPU_ISA=avx2, with oneDNN, ATen and OpenBLAS held alike: the README's
  // AVX2-only rows), the yardstick is the AVX2 loop: on a CPU with full-width AVX-512 (Zen 5)
  // it is half the AVX-512 one.
  if (__builtin_cpu_supports("avx512f") && fairdiff::cpu::best_isa() == fairdiff::cpu::Isa::kAvx512) {
    p.fp32_kernel = "avx512 fma";
    p.fp32_gflops = best(fma_avx512, iters);
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) p.avx2_gflops = best(fma_avx2, iters);
  if (p.fp32_kernel.empty() && p.avx2_gflops > 0) {
    p.fp32_kernel = "avx2 fma";
    p.fp32_gflops = p.avx2_gflops;
  }
  if (__builtin_cpu_supports("avx512bf16")) p.bf16_gflops = best(dot_bf16, iters);
  if (amx_available()) p.amx_gflops = best(tile_bf16, iters / 4);
  return p;
}

// ---------------------------------------------------------------------------
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

// The middle value; of an even count, the mean of the two middle ones.
double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t h = v.size() / 2;
  return v.size() % 2 ? v[h] : (v[h - 1] + v[h]) / 2;
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
  bool no_huge_page_arena = false;
  int64_t fairness_rows = 0;
  int64_t alternate = 0;  // --alternate N: N pairs of CFG and fairness steps in one sampling loop
  std::string scheduler;  // "" = the model's
  bool skip_vae = false;
  bool peak_only = false;  // --peak-only: the machine peak alone
  std::string conv;        // --conv gemm|onednn: the float32 CPU convolution path (default: FAIRDIFF_CONV, else onednn)
  bool no_onednn = false;  // --no-onednn: LibTorch's own kernels, as on a CPU without native bf16
  bool vae_only = false;
  int vae_runs = 1;  // --vae-runs: decodes to time; after the first, their mean
  bool prepack = false;  // LoadOptions::prepack_convolutions
  bool weights_cache = true;  // --model: read and write the weights cache, as generate does
  bool fp16_weights = false;  // generate --fp16-weights: linear and conv weights kept in float16
  int64_t vae_tile = 0;  // 0 off, -1 the VAE's sample_size, else pixels
  std::string save_random_model;  // write the random SD 1.5 there and exit
  std::string save_random_sdxl;   // write the random SDXL base there and exit (bench_sdxl.cpp)
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
  if (lo.prepack_convolutions && lo.device.is_cpu()) fairdiff::prepack_model(m);  // as loading does
  return m;
}

// Writes `m` (random SD 1.5) as a diffusers folder, so that loading it can be measured:
// the keyset configs, the tiny model's tokenizer (the real CLIP vocabulary) and scheduler.
void save_random_model(StableDiffusionModel& m, const std::string& fixtures, const std::string& dir) {
  namespace fs = std::filesystem;
  const fs::path out(dir), keysets = fs::path(fixtures) / "keysets/sd15", tiny = fs::path(fixtures) / "models/tiny-sd1";
  for (const char* sub : {"text_encoder", "tokenizer", "unet", "vae", "scheduler"}) fs::create_directories(out / sub);
  auto copy = [](const fs::path& from, const fs::path& to) {
    fs::copy_file(from, to, fs::copy_options::overwrite_existing);
    fs::permissions(to, fs::perms::owner_write, fs::perm_options::add);  // shared/ is read-only
  };
  for (const auto& entry : fs::directory_iterator(tiny / "tokenizer"))
    if (entry.is_regular_file()) copy(entry.path(), out / "tokenizer" / entry.path().filename());
  copy(tiny / "scheduler/scheduler_config.json", out / "scheduler/scheduler_config.json");
  copy(keysets / "text_encoder.config.json", out / "text_encoder/config.json");
  copy(keysets / "unet.config.json", out / "unet/config.json");
  copy(keysets / "vae.config.json", out / "vae/config.json");
  fairdiff::save_state_dict(*m.text_encoder, (out / "text_encoder/model.safetensors").string());
  fairdiff::save_state_dict(*m.unet, (out / "unet/diffusion_pytorch_model.safetensors").string());
  fairdiff::save_state_dict(*m.vae, (out / "vae/diffusion_pytorch_model.safetensors").string());
  const nlohmann::json index = {{"_class_name", "StableDiffusionPipeline"},
                                {"_fairdiff_bench", "SD 1.5 architecture, random weights (fairdiff-bench)"},
                                {"text_encoder", {"transformers", "CLIPTextModel"}},
                                {"tokenizer", {"transformers", "CLIPTokenizer"}},
                                {"unet", {"diffusers", "UNet2DConditionModel"}},
                                {"vae", {"diffusers", "AutoencoderKL"}},
                                {"scheduler", {"diffusers", "PNDMScheduler"}}};
  fairdiff::write_file_atomic((out / "model_index.json").string(), index.dump(2) + "\n");
}

// Bytes of every parameter and buffer: what the weights take in memory.
double weight_bytes(torch::nn::Module& module) {
  double bytes = 0;
  for (const auto& t : module.parameters()) bytes += static_cast<double>(t.numel() * t.element_size());
  for (const auto& t : module.buffers()) bytes += static_cast<double>(t.numel() * t.element_size());
  return bytes;
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

// One profile table: the operators of `what`, then the rest of its wall time. "cores" is an
// op's CPU seconds (every thread) over its wall seconds: below the thread count, a core
// waited. cpu_s is the CPU time of the whole of wall_s, for the rest's row (< 0: unknown).
nlohmann::json profile_rows(const std::string& what, const fairdiff::profile::Totals& totals, double wall_s,
                            double runs, double peak_gflops, double cpu_s = -1) {
  nlohmann::json ops = nlohmann::json::object();
  double timed = 0, timed_cpu = 0, flops = 0;
  std::printf("  %-28s %7s %9s %7s %9s %9s %7s %6s\n", ("profile: " + what).c_str(), "calls", "s/run", "share",
              "GFLOP/run", "GFLOP/s", "of peak", "cores");
  for (fairdiff::profile::Op op : fairdiff::profile::kOps) {
    const auto& t = totals[op];
    if (t.calls == 0) continue;
    timed += t.seconds;
    timed_cpu += t.cpu_seconds;
    flops += t.flops;
    const double gflops = t.flops > 0 ? t.flops / t.seconds / 1e9 : 0;
    const double cores = t.seconds > 0 ? t.cpu_seconds / t.seconds : 0;
    ops[fairdiff::profile::op_name(op)] = {{"calls", t.calls / runs},   {"seconds", t.seconds / runs},
                                           {"gflop", t.flops / runs / 1e9}, {"gflops", gflops},
                                           {"cores_busy", cores}};
    if (t.flops > 0)
      std::printf("  %-28s %7.0f %9.3f %6.1f%% %9.1f %9.1f %6.1f%% %6.2f\n", fairdiff::profile::op_name(op),
                  t.calls / runs, t.seconds / runs, 100 * t.seconds / wall_s, t.flops / runs / 1e9, gflops,
                  100 * gflops / peak_gflops, cores);
    else
      std::printf("  %-28s %7.0f %9.3f %6.1f%% %9s %9s %7s %6.2f\n", fairdiff::profile::op_name(op), t.calls / runs,
                  t.seconds / runs, 100 * t.seconds / wall_s, "-", "-", "-", cores);
  }
  const double other = std::max(0.0, wall_s - timed);
  const double other_cores = cpu_s >= 0 && other > 0 ? std::max(0.0, cpu_s - timed_cpu) / other : -1;
  std::printf("  %-28s %7s %9.3f %6.1f%% %9s %9s %7s %6s\n", "other (elementwise, copies)", "", other / runs,
              100 * other / wall_s, "", "", "", other_cores >= 0 ? fmt("%.2f", other_cores).c_str() : "");
  const double gflops = flops / wall_s / 1e9;
  std::printf("  %-28s %7s %9.3f %7s %9.1f %9.1f %6.1f%% %6s\n", ("= " + what).c_str(), "", wall_s / runs, "",
              flops / runs / 1e9, gflops, 100 * gflops / peak_gflops,
              cpu_s >= 0 ? fmt("%.2f", cpu_s / wall_s).c_str() : "");
  std::fflush(stdout);
  nlohmann::json out = {{"ops", ops},
                        {"other_seconds", other / runs},
                        {"seconds", wall_s / runs},
                        {"gflop", flops / runs / 1e9},
                        {"gflops", gflops},
                        {"share_of_peak", gflops / peak_gflops}};
  if (other_cores >= 0) out["other_cores_busy"] = other_cores;
  return out;
}

// R extra conditioning rows per image in the CFG call, as semantic guidance's edit concepts
// are evaluated: the UNet batch grows from 2B to (2 + R) B. The guidance term itself (a few
// elementwise ops on [R B, C, h, w]) is left out: it is noise next to the UNet.
class ExtraRows : public fairdiff::GuidanceExtension {
 public:
  // every_other: the rows on odd steps only, so that one loop alternates CFG steps (even)
  // and steps with the extra rows (odd).
  ExtraRows(const fairdiff::Conditioning& cond, int64_t rows, bool every_other = false) : every_other_(every_other) {
    const int64_t B = cond.rows();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t b = 0; b < B; ++b) latent_rows_.push_back(b);
    extra_ = cond.index_select(at::tensor(latent_rows_, at::kLong));  // R B rows
  }
  fairdiff::Conditioning embeddings(size_t step, std::vector<int64_t>* latent_rows) override {
    if (every_other_ && step % 2 == 0) {
      latent_rows->clear();
      given_.push_back(0);
      return extra_.index_select(at::zeros({0}, at::kLong));  // no rows
    }
    *latent_rows = latent_rows_;
    given_.push_back(extra_.rows());
    return extra_;
  }
  // The rows given at each step so far.
  const std::vector<int64_t>& given() const { return given_; }
  at::Tensor apply(size_t, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor& g) override {
    return g;
  }

 private:
  bool every_other_;
  std::vector<int64_t> given_;
  std::vector<int64_t> latent_rows_;
  fairdiff::Conditioning extra_;
};

struct StepTimes {
  double warmup = 0;          // the first step (the last of them, with several warm-up steps)
  std::vector<double> timed;  // the others
  double cpu_per_wall = 0;    // over the timed steps: CPU seconds / wall seconds (busy cores)
  double faults_per_step = 0; // page faults per timed step
  fairdiff::profile::Totals profile{};  // over the timed steps
  at::Tensor latents;
};

// Waits for queued device work at the end of each profile scope (nothing on the CPU).
std::function<void()> profile_sync(const at::Device& device) {
  if (device.is_cpu()) return nullptr;
  return [device] { sync(at::ones({1}, at::TensorOptions().device(device))); };
}

// The initial noise of the benchmark's `batch` images (seeds 42, 43, ...) at size x size.
at::Tensor bench_noise(StableDiffusionPipeline& pipe, int64_t batch, int64_t size, std::vector<at::Generator>* gens) {
  std::vector<int64_t> seeds;
  for (int64_t b = 0; b < batch; ++b) seeds.push_back(42 + b);
  return pipe.initial_noise(seeds, size, size, gens);
}

// Runs the library's sampling loop over warmup_steps + `steps` UNet calls and times each call.
StepTimes time_steps(StableDiffusionPipeline& pipe, StableDiffusionModel& model, const Options& o,
                     const fairdiff::PromptEmbeddings& emb, int64_t size, int64_t steps,
                     fairdiff::GuidanceExtension* extension, const char* label, size_t warmup_steps = 1) {
  auto sched = fairdiff::make_scheduler(model.scheduler_config, o.scheduler, "scheduler_config.json");
  // The fewest inference steps giving at least warm-up + steps UNet calls (PNDM repeats one timestep).
  for (int64_t k = 1;; ++k) {
    sched->set_timesteps(k);
    if (sched->timesteps().size() >= warmup_steps + static_cast<size_t>(steps)) break;
  }
  std::vector<at::Generator> gens;
  const at::Tensor noise = bench_noise(pipe, o.batch, size, &gens);
  StepTimes out;
  auto last = Clock::now();
  auto timed_start = last;
  double cpu_start = 0;
  long faults_start = 0;
  const size_t n = sched->timesteps().size();
  fairdiff::profile::Session session(profile_sync(pipe.device()));
  out.latents = pipe.denoise(*sched, noise, emb, 7.5, &gens,
                             [&](size_t i, size_t, const at::Tensor& latents) {
                               sync(latents);
                               const double dt = seconds_since(last);
                               const bool warming = i < warmup_steps;
                               if (warming)
                                 out.warmup = dt;
                               else
                                 out.timed.push_back(dt);
                               std::fprintf(stderr, "  %s %lldx%lld step %zu/%zu%s: %.2f s\n", label,
                                            static_cast<long long>(size), static_cast<long long>(size), i + 1, n,
                                            warming ? " (warm-up)" : "", dt);
                               last = Clock::now();
                               if (i + 1 == warmup_steps) {
                                 session.reset();  // profile the timed steps only
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
  out.profile = session.totals();
  return out;
}

void row(const std::string& what, const std::string& size, double seconds, const std::string& notes) {
  std::printf("%-36s %-9s %9.3f  %s\n", what.c_str(), size.c_str(), seconds, notes.c_str());
  std::fflush(stdout);
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

// The benchmark, as the steps of a generation (diffusers numbers those of __call__):
//   1. check_options, load_options      the flags, once, before anything runs
//   2. configure_runtime                threads and malloc
//   3. measure_machine                  arithmetic peak and two kernels: the yardsticks
//   4. load_model, describe_weights     build (random SD 1.5) or load a folder
//   5. bench_text_encoder               a CFG pair of prompts per image
//   6. bench_size, for each size:       UNet steps (bench_unet, bench_extra_rows), then
//                                       the VAE decode (bench_vae)
//   7. report                           peak memory, then the JSON line

void check_options(const Options& o) {
  for (int64_t s : o.sizes)
    if (s <= 0 || s % 64 != 0)
      fairdiff::throw_bad_input("--sizes", "expected image sizes that are positive multiples of 64, found " +
                                               std::to_string(s));
  if (o.batch < 1) fairdiff::throw_bad_input("--batch", "expected at least 1 image, found " + std::to_string(o.batch));
  if (o.steps < 0) fairdiff::throw_bad_input("--steps", "expected 0 (default) or more steps");
  if (o.fairness_rows < 0) fairdiff::throw_bad_input("--fairness-rows", "expected 0 or more rows per image");
  if (o.alternate < 0) fairdiff::throw_bad_input("--alternate", "expected 0 (off) or more pairs of steps");
  if (o.alternate > 0 && o.fairness_rows == 0)
    fairdiff::throw_bad_input("--alternate", "times the --fairness-rows step against the CFG step: add --fairness-rows R");
  if (o.vae_tile < -1 || (o.vae_tile > 0 && (o.vae_tile < 32 || o.vae_tile % 8 != 0)))
    fairdiff::throw_bad_input("--vae-tiling", "expected a tile of at least 32 pixels, a multiple of 8");
}

fairdiff::LoadOptions load_options(const Options& o) {
  fairdiff::LoadOptions lo;
  lo.dtype = parse_dtype(o.dtype);
  lo.device = parse_device(o.device);
  if (lo.dtype == at::kHalf && lo.device.is_cpu())
    fairdiff::throw_unsupported("--dtype fp16", "LibTorch 1.13 has no half-precision matmul on the CPU",
                                "use --dtype bf16 or fp32 on the CPU, fp16 with --device cuda");
  lo.prepack_convolutions = o.prepack;
  // As generate: a converting load (bf16 from float32 files) maps the cached copy when there is one.
  lo.weights_cache = fairdiff::run_weights_cache(o.weights_cache, o.fp16_weights);
  if (o.fp16_weights && (lo.dtype != at::kFloat || !lo.device.is_cpu() || o.prepack))
    fairdiff::throw_bad_input("--fp16-weights", "float16 weight storage runs float32 on the CPU, without prepacking",
                              "use --dtype fp32 --device cpu");
  return lo;
}

// Sets the threads and malloc as asked; returns the malloc setting, in words.
std::string configure_runtime(const Options& o) {
  if (o.no_onednn) at::globalContext().setUserEnabledMkldnn(false);
  if (!o.conv.empty()) fairdiff::leaf::use_gemm_convolutions(o.conv == "gemm");
  if (!o.libtorch_threads) fairdiff::configure_threads(o.threads);
  const bool allocator = !o.system_malloc && fairdiff::configure_allocator(!o.no_huge_page_arena);
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  return allocator               ? std::string("configure_allocator") +
                                       (fairdiff::huge_page_arena_installed() ? " with the huge-page arena" : "")
         : tunables && *tunables ? std::string("GLIBC_TUNABLES=") + tunables
                                 : "glibc defaults";
}

// --save-random-model DIR: writes the random SD 1.5 and stops there.
int save_random(const Options& o, const fairdiff::LoadOptions& lo) {
  if (lo.dtype != at::kFloat || !lo.device.is_cpu())
    fairdiff::throw_bad_input("--save-random-model", "the random model is written in float32 from the CPU",
                              "drop --dtype and --device");
  double build_s = 0, init_s = 0;
  fairdiff::LoadOptions dense = lo;
  dense.prepack_convolutions = false;  // the weights are written out
  StableDiffusionModel m = random_sd15(fixtures_root(o), dense, &build_s, &init_s);
  const auto t0 = Clock::now();
  save_random_model(m, fixtures_root(o), o.save_random_model);
  std::printf("wrote %s (random SD 1.5, float32) in %.1f s\n", o.save_random_model.c_str(), seconds_since(t0));
  return 0;
}

// The first line of the output and of the report: where and how the benchmark runs.
nlohmann::json start_report(const Options& o, const at::Device& device, const std::string& malloc_setting) {
  nlohmann::json report = {{"bench", "fairdiff"},
                           {"device", device.str()},
                           {"dtype", o.dtype},
                           {"threads", at::get_num_threads()},
                           {"thread_summary", fairdiff::thread_summary()},
                           {"thread_setting", o.libtorch_threads ? "libtorch default" : "configure_threads"},
                           {"malloc", malloc_setting},
                           {"batch", o.batch},
                           {"prepack_weights", o.prepack},
                           {"weights_cache", o.weights_cache},
                           {"fp16_weights", o.fp16_weights},
                           {"convolutions", fairdiff::leaf::convolution_path()},
                           {"load_average_at_start", load_average()}};
  std::printf("fairdiff-bench: %s, %s, %s%s, malloc %s, float32 convolutions %s; load average %.2f at start\n",
              device.str().c_str(), o.dtype.c_str(), fairdiff::thread_summary().c_str(),
              o.libtorch_threads ? " (LibTorch's default)" : "", malloc_setting.c_str(),
              fairdiff::leaf::convolution_path(), load_average());
  return report;
}

// The machine's peak and two kernels. Returns the peak GFLOP/s of this run's dtype: bf16
// products run on the dot-product units where the CPU has them. On CUDA the CPU peak means
// nothing: 0, and shares of peak are left out.
double measure_machine(const Options& o, const fairdiff::LoadOptions& lo, nlohmann::json& report) {
  const MachinePeak mp = machine_peak(at::get_num_threads());
  const double peak = !lo.device.is_cpu()                             ? 0
                      : lo.dtype == at::kBFloat16 && mp.bf16_peak() > 0 ? mp.bf16_peak()
                                                                        : mp.fp32_gflops;
  report["machine_peak"] = {{"fp32_kernel", mp.fp32_kernel},
                            {"fp32_gflops", mp.fp32_gflops},
                            {"avx2_fma_gflops", mp.avx2_gflops},
                            {"bf16_dot_gflops", mp.bf16_gflops},
                            {"amx_bf16_gflops", mp.amx_gflops},
                            {"threads", at::get_num_threads()}};
  std::printf("machine peak (%d threads): fp32 %s %.1f GFLOP/s%s%s%s\n", at::get_num_threads(), mp.fp32_kernel.c_str(),
              mp.fp32_gflops,
              mp.fp32_kernel != "avx2 fma" && mp.avx2_gflops > 0
                  ? (" (avx2 fma " + fmt("%.1f", mp.avx2_gflops) + ")").c_str()
                  : "",
              mp.bf16_gflops > 0 ? (", bf16 dot product " + fmt("%.1f", mp.bf16_gflops) + " GFLOP/s").c_str() : "",
              mp.amx_gflops > 0 ? (", bf16 AMX tiles " + fmt("%.1f", mp.amx_gflops) + " GFLOP/s").c_str() : "");
  if (o.peak_only) return peak;
  const auto kern = kernels(at::TensorOptions(lo.dtype).device(lo.device));
  report["kernels"] = kern;
  std::printf("kernels (%s): matmul 2048x2048 %.1f GFLOP/s, conv3x3 2x320x64x64 %.1f GFLOP/s\n\n", o.dtype.c_str(),
              kern["matmul2048_gflops"].get<double>(), kern["conv3x3_2x320x64x64_gflops"].get<double>());
  return peak;
}

// The random SD 1.5 (no --model) or the model folder, with VAE tiling as asked.
StableDiffusionModel load_model(const Options& o, const fairdiff::LoadOptions& lo, nlohmann::json& report) {
  StableDiffusionModel model;
  if (o.model.empty()) {
    double build_s = 0, init_s = 0;
    model = random_sd15(fixtures_root(o), lo, &build_s, &init_s);
    report["model"] = "random SD 1.5";
    report["build_s"] = build_s;
    report["random_init_s"] = init_s;
    row("build networks (from configs)", "-", build_s,
        "SD 1.5 architecture, uninitialised" + std::string(lo.dtype == at::kFloat ? "" : ", converted to " + o.dtype));
    row("random init (normal_ fill)", "-", init_s, "not a cost of real use");
  } else {
    const auto t0 = Clock::now();
    model = fairdiff::load_model_folder(o.model, lo);
    sync(model.unet->parameters().front());
    const double load_s = seconds_since(t0);
    report["model"] = o.model;
    report["load_s"] = load_s;
    row("load model folder", "-", load_s,
        o.model + (o.prepack ? " (mapped; conv weights prepacked)" : " (mapped; each network mapped in when it runs)"));
    if (model.cache_writes.valid()) {
      // generate writes a missed entry beside the steps; here it is waited for, so that the
      // steps are timed alone.
      const auto t1 = Clock::now();
      model.cache_writes.wait();
      report["weights_cache_write_s"] = seconds_since(t1);
      row("write the weights cache", "-", seconds_since(t1), "a converting load's first time (beside the work in generate)");
    }
  }
  if (o.fp16_weights) {
    const auto t0 = Clock::now();
    const int64_t n = fairdiff::store_weights_fp16(model);
    report["fp16_weights_s"] = seconds_since(t0);
    row("store weights in float16", "-", seconds_since(t0), std::to_string(n) + " linear and conv weights");
  }
  if (o.vae_tile != 0) {
    const int64_t f = model.vae->config().scale_factor();
    if (o.vae_tile > 0 && o.vae_tile % f != 0)
      fairdiff::throw_bad_input("--vae-tiling", "the tile must be a multiple of the VAE's scale factor " +
                                                    std::to_string(f));
    model.vae->enable_tiling(o.vae_tile < 0 ? -1 : o.vae_tile / f);
    report["vae_tile"] = model.vae->tile_latent_size() * f;
  }
  return model;
}

// Parameters, weights and memory after loading (ends the load phase). Returns the GiB of weights.
double describe_weights(StableDiffusionModel& model, PeakTracker& peaks, nlohmann::json& report) {
  const int64_t p_text = fairdiff::parameter_count(*model.text_encoder), p_unet = fairdiff::parameter_count(*model.unet),
                p_vae = fairdiff::parameter_count(*model.vae);
  const double weights_gib =
      (weight_bytes(*model.text_encoder) + weight_bytes(*model.unet) + weight_bytes(*model.vae)) / (1024.0 * 1024 * 1024);
  report["parameters"] = {{"text_encoder", p_text}, {"unet", p_unet}, {"vae", p_vae}};
  report["weights_gib"] = weights_gib;
  const double load_peak = peaks.end_phase();
  report["peak_rss_load_gib"] = load_peak;
  report["rss_after_load"] = {{"file_gib", status_gib("RssFile")}, {"anon_gib", status_gib("RssAnon")}};
  std::printf("%-36s %-9s %9s  resident after load: %.2f GiB mapped from files (weights, libraries), %.2f GiB anonymous\n",
              "", "", "", status_gib("RssFile"), status_gib("RssAnon"));
  std::printf("%-36s %-9s %9s  text %.1fM, unet %.1fM, vae %.1fM parameters = %.2f GiB of weights; peak RSS %.2f GiB\n",
              "", "", "", p_text / 1e6, p_unet / 1e6, p_vae / 1e6, weights_gib, load_peak);
  return weights_gib;
}

// FLOPs of one text encoder call on [2B, 77] tokens. The text encoder is built from
// torch::nn layers (not profiled op by op): its FLOPs from the weights' shapes instead,
// 2 per weight per token of every linear layer plus the attention products (4 L^2 d per head).
double text_encoder_flops(StableDiffusionModel& model, int64_t batch) {
  const double tokens = 2.0 * static_cast<double>(batch) * 77;
  double linear_weights = 0;
  for (const auto& p : model.text_encoder->named_parameters())
    if (p.value().dim() == 2 && p.key().find("embedding") == std::string::npos)
      linear_weights += static_cast<double>(p.value().numel());
  const auto& tc = model.text_encoder->config();
  return 2 * tokens * linear_weights + 4.0 * tokens * 77 * static_cast<double>(tc.hidden_size * tc.num_hidden_layers);
}

// Text encoder: prompts and negatives in one call, as the pipeline does for CFG. Returns
// the embeddings the UNet steps use.
fairdiff::PromptEmbeddings bench_text_encoder(StableDiffusionPipeline& pipe, StableDiffusionModel& model,
                                              const Options& o, double peak, nlohmann::json& report) {
  const std::vector<std::string> prompts(static_cast<size_t>(o.batch), "a photo of a doctor, portrait, studio light");
  const std::vector<std::string> negatives(static_cast<size_t>(o.batch), "");
  fairdiff::PromptEmbeddings emb = pipe.encode_prompts(prompts, negatives, 0, true);  // warm-up
  std::vector<double> te;
  fairdiff::profile::Totals te_profile{};
  {
    fairdiff::profile::Session session(profile_sync(pipe.device()));
    for (int i = 0; i < 3; ++i) {
      const auto t0 = Clock::now();
      emb = pipe.encode_prompts(prompts, negatives, 0, true);
      sync(emb.cond.context);
      te.push_back(seconds_since(t0));
    }
    te_profile = session.totals();
  }
  const double s = median(te);
  report["text_encode_s"] = s;
  row("text encode (CFG pair per image)", "-", s, "batch " + std::to_string(2 * o.batch) + " x 77 tokens, median of 3");
  const double flops = text_encoder_flops(model, o.batch);
  report["text_encode_gflop"] = flops / 1e9;
  report["text_encode_gflops"] = flops / s / 1e9;
  std::printf("  text encoder: %.1f GFLOP a call (from the weights' shapes), %.1f GFLOP/s, %.1f%% of peak\n",
              flops / 1e9, flops / s / 1e9, peak > 0 ? 100 * flops / s / 1e9 / peak : 0.0);
  if (te_profile[fairdiff::profile::kLinear].calls > 0)
    report["text_encode_profile"] = profile_rows("text encoder", te_profile, te[0] + te[1] + te[2], 3, peak);
  return emb;
}

// What the measurements of one size share.
struct SizeBench {
  StableDiffusionPipeline& pipe;
  StableDiffusionModel& model;
  const Options& o;
  const fairdiff::PromptEmbeddings& emb;
  double peak;  // GFLOP/s, 0 on CUDA
  PeakTracker& peaks;
  int64_t size;
  std::string sz;  // "512x512"
  int64_t steps;   // timed UNet steps
};

struct UNetResult {
  double step_s = 0;  // mean of the timed steps
  at::Tensor latents;
  bool finite = true;
};

// CFG UNet steps at one size.
UNetResult bench_unet(const SizeBench& b, nlohmann::json& r) {
  const Options& o = b.o;
  b.peaks.end_phase();
  const StepTimes st = time_steps(b.pipe, b.model, o, b.emb, b.size, b.steps, nullptr, "CFG");
  const double step_s = mean(st.timed);
  r["warmup_step_s"] = st.warmup;
  r["timed_steps"] = st.timed.size();
  r["step_s"] = step_s;
  const double step_min = st.timed.empty() ? 0 : *std::min_element(st.timed.begin(), st.timed.end());
  r["step_min_s"] = step_min;
  r["step_per_image_s"] = step_s / static_cast<double>(o.batch);
  r["step_cpu_per_wall"] = st.cpu_per_wall;
  r["step_page_faults"] = st.faults_per_step;
  const double unet_peak = b.peaks.end_phase();
  r["peak_rss_unet_gib"] = unet_peak;
  row("UNet step (CFG)", b.sz, step_s,
      "UNet batch " + std::to_string(2 * o.batch) + ", mean of " + std::to_string(st.timed.size()) + " (min " +
          fmt("%.3f", step_min) + "), warm-up " + fmt("%.3f", st.warmup) + " s, " + fmt("%.2f", st.cpu_per_wall) +
          " cores busy, " + fmt("%.0f", st.faults_per_step) + " page faults, peak RSS " + fmt("%.2f", unet_peak) +
          " GiB");
  if (!st.timed.empty()) {
    double wall = 0;
    for (double t : st.timed) wall += t;
    r["unet_profile"] = profile_rows("UNet step", st.profile, wall, static_cast<double>(st.timed.size()), b.peak,
                                    st.cpu_per_wall * wall);
  }
  const bool finite = st.latents.isfinite().all().item<bool>();
  r["latents_finite"] = finite;
  return {step_s, st.latents, finite};
}

// The fairness step's figures against the CFG step's: step_s and f_s, the seconds of each, and
// their ratio (f_s / step_s, or the median of alternating pairs).
void report_extra_rows(const SizeBench& b, double step_s, double f_s, double ratio, double warmup_s,
                       nlohmann::json& r, const std::string& how) {
  const Options& o = b.o;
  const int64_t fb = (2 + o.fairness_rows) * o.batch;
  r["fairness_rows"] = o.fairness_rows;
  r["fairness_unet_batch"] = fb;
  r["fairness_warmup_step_s"] = warmup_s;
  r["fairness_step_s"] = f_s;
  r["fairness_step_per_image_s"] = f_s / static_cast<double>(o.batch);
  r["fairness_extra_per_image_s"] = (f_s - step_s) / static_cast<double>(o.batch);
  r["fairness_step_ratio"] = ratio;
  r["peak_rss_fairness_gib"] = b.peaks.end_phase();
  row("UNet step (CFG + " + std::to_string(o.fairness_rows) + " rows/image)", b.sz, f_s,
      "UNet batch " + std::to_string(fb) + ", x" + fmt("%.2f", ratio) + " the CFG step" + how + ", +" +
          fmt("%.3f", (f_s - step_s) / static_cast<double>(o.batch)) + " s per image per step");
}

// The same steps with --fairness-rows extra rows per image, against the CFG step of step_s.
void bench_extra_rows(const SizeBench& b, double step_s, nlohmann::json& r) {
  const Options& o = b.o;
  ExtraRows extra(b.emb.cond, o.fairness_rows);
  const StepTimes ft = time_steps(b.pipe, b.model, o, b.emb, b.size, b.steps, &extra, "CFG+rows");
  const double f_s = mean(ft.timed);
  report_extra_rows(b, step_s, f_s, f_s / step_s, ft.warmup, r, "");
}

// --alternate N: one sampling loop whose steps alternate, CFG on even steps and CFG plus the
// extra rows on odd ones; a warm-up step of each, then N pairs. The ratio is the median of
// the pairs' ratios. Separate runs of each (bench_extra_rows) put any drift of the machine's
// speed between them into the ratio: a VM here moved its FMA peak by a quarter between runs
// and its CFG step by 16% between runs a few minutes apart. Adjacent steps share the drift.
void bench_alternating_rows(const SizeBench& b, nlohmann::json& r) {
  const Options& o = b.o;
  ExtraRows extra(b.emb.cond, o.fairness_rows, true);
  const StepTimes st = time_steps(b.pipe, b.model, o, b.emb, b.size, 2 * o.alternate, &extra, "CFG|CFG+rows", 2);
  std::vector<double> cfg_s, fair_s, ratios;
  for (size_t i = 0; i + 1 < st.timed.size(); i += 2) {
    cfg_s.push_back(st.timed[i]);
    fair_s.push_back(st.timed[i + 1]);
    ratios.push_back(st.timed[i + 1] / st.timed[i]);
  }
  r["fairness_alternate_pairs"] = ratios.size();
  r["fairness_extra_rows_by_step"] = extra.given();  // 0, R B, 0, R B, ...
  r["fairness_pair_ratios"] = ratios;
  r["fairness_pair_cfg_step_s"] = cfg_s;
  r["fairness_pair_step_s"] = fair_s;
  const auto [lo, hi] = std::minmax_element(ratios.begin(), ratios.end());
  report_extra_rows(b, median(cfg_s), median(fair_s), median(ratios), st.warmup, r,
                    ", alternating: median of " + std::to_string(ratios.size()) + " pairs (x" + fmt("%.2f", *lo) +
                        "-" + fmt("%.2f", *hi) + ")");
}

// `runs` VAE decodes of `latents`, profiled: their wall and CPU seconds, and the last image.
struct Decodes {
  double seconds = 0, cpu_seconds = 0;
  fairdiff::profile::Totals profile{};
  at::Tensor image;
};
Decodes time_decodes(const SizeBench& b, const at::Tensor& latents, int runs) {
  fairdiff::profile::Session session(profile_sync(b.pipe.device()));
  Decodes d;
  const auto t0 = Clock::now();
  const double cpu0 = cpu_seconds();
  for (int i = 0; i < runs; ++i) sync(d.image = b.pipe.decode(latents));
  d.seconds = seconds_since(t0);
  d.cpu_seconds = cpu_seconds() - cpu0;
  d.profile = session.totals();
  return d;
}

// VAE decode of `latents` (the first call at this size), then with --vae-runs the later
// decodes of a run (its next images), which reuse the memory the first one faulted in.
// Returns whether the image is finite.
bool bench_vae(const SizeBench& b, const at::Tensor& latents, nlohmann::json& r) {
  const Decodes first = time_decodes(b, latents, 1);
  const bool image_finite = first.image.isfinite().all().item<bool>();
  const double vae_peak = b.peaks.end_phase();
  r["vae_decode_s"] = first.seconds;
  r["image_finite"] = image_finite;
  r["peak_rss_vae_gib"] = vae_peak;
  const auto& vae = b.model.vae;
  const std::string tiles =
      vae->tiling() ? ", tiles of " + std::to_string(vae->tile_latent_size() * vae->config().scale_factor()) + " px" : "";
  row("VAE decode", b.sz, first.seconds,
      std::to_string(b.o.batch) + " image(s), first call at this size" + tiles + ", peak RSS " +
          fmt("%.2f", vae_peak) + " GiB");
  r["vae_profile"] = profile_rows("VAE decode", first.profile, first.seconds, 1, b.peak, first.cpu_seconds);
  if (b.o.vae_runs > 1) {
    const int runs = b.o.vae_runs - 1;
    const Decodes again = time_decodes(b, latents, runs);
    r["vae_decode_again_s"] = again.seconds / runs;
    row("VAE decode, again", b.sz, again.seconds / runs, "mean of " + std::to_string(runs) + " more decodes");
    r["vae_again_profile"] =
        profile_rows("VAE decode, again", again.profile, again.seconds, runs, b.peak, again.cpu_seconds);
  }
  return image_finite;
}

// One size: UNet steps (and the fairness variant), then the VAE. Returns its report entry.
nlohmann::json bench_size(const SizeBench& b, double weights_gib) {
  const Options& o = b.o;
  nlohmann::json r = {{"size", b.size}, {"unet_batch", 2 * o.batch}};
  at::Tensor latents;  // what the VAE decodes
  bool finite = true;
  if (o.vae_only) {
    // Latents of the scale the UNet leaves (the VAE sees latents / scaling_factor ~ N(0,1)).
    std::vector<at::Generator> gens;
    latents = bench_noise(b.pipe, o.batch, b.size, &gens) * b.model.vae->config().scaling_factor;
    b.model.use("vae");  // as after denoising: the decode phase's peak is the VAE's own
    b.peaks.end_phase();
  } else {
    const UNetResult unet = bench_unet(b, r);
    latents = unet.latents;
    finite = unet.finite;
    if (o.alternate > 0)
      bench_alternating_rows(b, r);
    else if (o.fairness_rows > 0)
      bench_extra_rows(b, unet.step_s, r);
  }
  if (!o.skip_vae) finite = bench_vae(b, latents, r) && finite;
  const double rss = b.peaks.overall;
  r["peak_rss_gib"] = rss;
  std::printf("%-36s %-9s %9s  peak RSS so far %.2f GiB = %.2fx the weights; outputs finite: %s\n", "", b.sz.c_str(),
              "", rss, rss / weights_gib, finite ? "yes" : "NO");
  return r;
}

int run(const Options& o) {
  check_options(o);
  const fairdiff::LoadOptions lo = load_options(o);
  const std::string malloc_setting = configure_runtime(o);
  c10::InferenceMode inference;
  if (!o.save_random_model.empty()) return save_random(o, lo);
  if (!o.save_random_sdxl.empty()) return fairdiff::bench::save_random_sdxl(fixtures_root(o), o.save_random_sdxl);

  nlohmann::json report = start_report(o, lo.device, malloc_setting);
  const double peak = measure_machine(o, lo, report);
  if (o.peak_only) {
    std::printf("%s\n", report.dump().c_str());
    return 0;
  }
  std::printf("%-36s %-9s %9s  %s\n", "measurement", "size", "seconds", "notes");

  fairdiff::release_free_memory();  // the probes' tensors are not the pipeline's
  PeakTracker peaks;
  peaks.end_phase();  // the phases below start here
  StableDiffusionModel model = load_model(o, lo, report);
  const double weights_gib = describe_weights(model, peaks, report);
  StableDiffusionPipeline pipe(model);
  const fairdiff::PromptEmbeddings emb = bench_text_encoder(pipe, model, o, peak, report);

  report["sizes"] = nlohmann::json::array();
  for (int64_t size : o.sizes) {
    const int64_t steps = o.steps > 0 ? o.steps : (size * size >= 512 * 512 ? 2 : 3);
    const SizeBench b{pipe, model, o, emb, peak, peaks, size, std::to_string(size) + "x" + std::to_string(size), steps};
    report["sizes"].push_back(bench_size(b, weights_gib));
  }

  peaks.end_phase();
  report["peak_rss_gib"] = peaks.overall;
  report["peak_rss_over_weights"] = peaks.overall / weights_gib;
  report["load_average_at_end"] = load_average();
  std::printf("\npeak RSS %.2f GiB = %.2fx the %.2f GiB of weights; load average %.2f at the end\n", peaks.overall,
              peaks.overall / weights_gib, weights_gib, load_average());
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
  app.add_option("--alternate", o.alternate,
                 "time the --fairness-rows step against the CFG step in one sampling loop, alternately: N pairs "
                 "after a warm-up step of each; the ratio is the median of the pairs' ratios");
  app.add_option("--scheduler", o.scheduler, "scheduler override (pndm, ddim, euler, ...; default: the model's)");
  app.add_flag("--system-malloc", o.system_malloc, "keep glibc's malloc defaults (for comparison)");
  app.add_flag("--no-huge-page-arena", o.no_huge_page_arena,
               "configure glibc's malloc but keep large blocks on its heap, not in the huge-page arena (for comparison)");
  app.add_flag("--peak-only", o.peak_only, "measure the machine's FMA peak and stop");
  app.add_option("--conv", o.conv, "float32 CPU convolutions: gemm (im2col and OpenBLAS) or onednn (default: FAIRDIFF_CONV, else onednn)")
      ->check(CLI::IsMember({"gemm", "onednn"}));
  app.add_flag("--no-onednn", o.no_onednn,
               "LibTorch's kernels without oneDNN: what bf16 gets on a CPU without AVX-512 bf16 support, where "
               "LibTorch 1.13 does not use oneDNN for it (with ATEN_CPU_CAPABILITY=avx2 for the rest)");
  app.add_flag("--skip-vae", o.skip_vae, "do not time the VAE decode");
  app.add_flag("--no-weights-cache{false}", o.weights_cache,
               "with --model: neither read nor write the weights cache (as generate --no-weights-cache)");
  app.add_flag("--prepack-weights", o.prepack, "reorder convolution weights into oneDNN's layout at load (as generate --prepack-weights)");
  app.add_flag("--fp16-weights", o.fp16_weights, "keep linear and conv weights in float16, converted per layer (as generate --fp16-weights; with --dtype fp32)");
  app.add_option("--vae-runs", o.vae_runs,
                 "decode N times: the first call, as always, then the mean of the others (a run's later images)")
      ->check(CLI::Range(1, 100));
  app.add_flag("--vae-only", o.vae_only, "time only the VAE decode (of noise latents), e.g. with --vae-tiling at 1024");
  app.add_flag("--vae-tiling{-1}", o.vae_tile, "decode in tiles (the VAE's sample_size, or --vae-tiling=PX)");
  app.add_option("--save-random-model", o.save_random_model,
                 "write the random SD 1.5 (float32) as a diffusers folder DIR and exit; bench it with --model DIR");
  app.add_option("--save-random-sdxl", o.save_random_sdxl,
                 "write the SDXL base architecture with random float32 weights (10.3 GB) as a diffusers folder DIR "
                 "and exit; bench it with --model DIR");
  return fairdiff::tools::run_tool("fairdiff-bench", app, argc, argv, [&] { return run(o); });
}
