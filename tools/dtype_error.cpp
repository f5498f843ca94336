// fairdiff-dtype-error: how far a reduced-precision run's images are from float32's.
//
// For each case (a prompt of the toy world, unguided or with --fairness), generates the
// same images (same seeds, settings and groups) with --dtype fp32 and with --dtype D, then
// compares every pair of PNGs: the largest and the mean difference in 8-bit levels, the
// PSNR, the share of pixels more than 8 levels apart, and whether the hue classifier
// (audit.h) puts both images in the same colour group; for a fairness case also the
// shares each run reached.
//
//   fairdiff-dtype-error                               # bf16 against fp32 on models/toy, 32 images a case
//   fairdiff-dtype-error --images 64 --steps 50 --out runs/dtype-error
//   fairdiff-dtype-error --dtype fp16-weights          # generate --fp16-weights against fp32
//
// scripts/dtype-error builds and runs it; README "Performance" quotes the figures.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "fairdiff/audit.h"
#include "fairdiff/error.h"
#include "fairdiff/generate.h"
#include "toy_runs.h"
#include "tool_main.h"

namespace fs = std::filesystem;

namespace {

struct Case {
  std::string prompt;
  std::string fairness;  // "" = unguided
};

const std::vector<Case> kCases = {
    {"a photo of a kite", ""},
    {"a photo of a house", ""},
    {"a photo of a kite", "colour=red:50,blue:50"},
};

struct Options {
  fairdiff::tools::ToyRunSettings run{"", /*images=*/32, /*steps=*/25, /*batch=*/8, /*seed=*/2000, /*threads=*/1};
  std::string out = "runs/dtype-error", dtype = "bf16";
};

// Pixel statistics of one pair of images, accumulated over a case.
struct PairStats {
  int64_t images = 0, pixels = 0, far_pixels = 0, same_group = 0, classified_pairs = 0;
  int max_levels = 0;
  double sum_abs = 0, sum_sq = 0;

  void add(const fairdiff::RgbImage& a, const fairdiff::RgbImage& b, int group_a, int group_b) {
    if (a.rgb.size() != b.rgb.size()) fairdiff::throw_bad_input("images", "the two runs' images differ in size");
    for (size_t i = 0; i < a.rgb.size(); ++i) {
      const int d = std::abs(static_cast<int>(a.rgb[i]) - static_cast<int>(b.rgb[i]));
      max_levels = std::max(max_levels, d);
      sum_abs += d;
      sum_sq += static_cast<double>(d) * d;
      if (d > 8) ++far_pixels;
    }
    pixels += static_cast<int64_t>(a.rgb.size());
    ++images;
    if (group_a >= 0 || group_b >= 0) {
      ++classified_pairs;
      if (group_a == group_b) ++same_group;
    }
  }
  double mean_abs() const { return pixels ? sum_abs / static_cast<double>(pixels) : 0; }
  double psnr() const {
    const double mse = pixels ? sum_sq / static_cast<double>(pixels) : 0;
    return mse > 0 ? 10 * std::log10(255.0 * 255.0 / mse) : INFINITY;
  }
};

void generate_run(const Options& o, const Case& c, const std::string& dtype, const std::string& dir) {
  fs::remove_all(dir);
  fairdiff::GenerateOptions g = fairdiff::tools::toy_run(o.run, c.prompt, c.fairness, dir);
  // "fp16-weights": float32 arithmetic with float16 weights (generate --fp16-weights).
  g.fp16_weights = dtype == "fp16-weights";
  g.dtype = g.fp16_weights ? "fp32" : dtype;
  g.device = "cpu";
  fairdiff::generate(g);
}

// The PNG files of a run folder by name.
std::map<std::string, std::string> pngs(const std::string& dir) {
  std::map<std::string, std::string> files;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".png" && e.path().filename().string().rfind("audit-", 0) != 0)
      files[e.path().filename().string()] = e.path().string();
  return files;
}

std::string shares_text(const fairdiff::AuditReport& r) {
  std::string s;
  for (const auto& g : r.prompts.front().groups) {
    char buf[48];
    std::snprintf(buf, sizeof buf, "%s%s %.0f", s.empty() ? "" : " ", g.name.c_str(), 100 * g.share);
    s += buf;
  }
  return s;
}

int run(const Options& o) {
  std::printf("dtype error: %s against fp32, model %s, %lld images per case, %lld steps, %d thread(s)\n",
              o.dtype.c_str(), o.run.model.c_str(), (long long)o.run.images, (long long)o.run.steps, o.run.threads);
  std::printf("%-20s %-22s | %9s %10s %8s %9s | %10s | %-22s %-22s\n", "prompt", "fairness", "max lvls", "mean lvls",
              "PSNR dB", ">8 lvls", "same group", "fp32 shares", (o.dtype + " shares").c_str());
  fairdiff::HueClassifier hue;
  nlohmann::json report = {
      {"dtype", o.dtype}, {"model", o.run.model}, {"images", o.run.images}, {"steps", o.run.steps}};
  report["cases"] = nlohmann::json::array();
  for (size_t k = 0; k < kCases.size(); ++k) {
    const Case& c = kCases[k];
    const std::string dir = o.out + "/case-" + std::to_string(k + 1);
    generate_run(o, c, "fp32", dir + "/fp32");
    generate_run(o, c, o.dtype, dir + "/" + o.dtype);
    const auto a = pngs(dir + "/fp32"), b = pngs(dir + "/" + o.dtype);
    if (a.size() != b.size() || a.empty()) fairdiff::throw_bad_input(dir, "the two runs wrote different images");
    PairStats stats;
    for (const auto& [name, path] : a) {
      const fairdiff::RgbImage ia = fairdiff::read_png_rgb(path), ib = fairdiff::read_png_rgb(b.at(name));
      stats.add(ia, ib, hue.classify(ia.rgb.data(), ia.width, ia.height),
                hue.classify(ib.rgb.data(), ib.width, ib.height));
    }
    fairdiff::AuditOptions audit_a, audit_b;
    audit_a.dir = dir + "/fp32";
    audit_b.dir = dir + "/" + o.dtype;
    audit_a.attribute = audit_b.attribute = "colour";
    const fairdiff::AuditReport ra = fairdiff::audit(audit_a), rb = fairdiff::audit(audit_b);
    const double same = stats.classified_pairs ? static_cast<double>(stats.same_group) / stats.classified_pairs : 1.0;
    const double far = static_cast<double>(stats.far_pixels) / static_cast<double>(stats.pixels);
    std::printf("%-20s %-22s | %9d %10.2f %8.1f %8.2f%% | %9.1f%% | %-22s %-22s\n", c.prompt.c_str(),
                c.fairness.empty() ? "-" : c.fairness.c_str(), stats.max_levels, stats.mean_abs(), stats.psnr(),
                100 * far, 100 * same, shares_text(ra).c_str(), shares_text(rb).c_str());
    std::fflush(stdout);
    report["cases"].push_back({{"prompt", c.prompt},
                               {"fairness", c.fairness},
                               {"max_levels", stats.max_levels},
                               {"mean_levels", stats.mean_abs()},
                               {"psnr_db", stats.psnr()},
                               {"share_over_8_levels", far},
                               {"same_group", same},
                               {"fp32_max_abs_error", ra.max_abs_error ? nlohmann::json(*ra.max_abs_error) : nlohmann::json()},
                               {"dtype_max_abs_error", rb.max_abs_error ? nlohmann::json(*rb.max_abs_error) : nlohmann::json()}});
  }
  std::printf("%s\n", report.dump().c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"fairdiff-dtype-error: images of a reduced-precision run against float32's on the toy model"};
  Options o;
  o.run.model = fairdiff::default_model();
  app.add_option("--model", o.run.model, "model folder (default: models/toy or $FAIRDIFF_MODEL)");
  app.add_option("--dtype", o.dtype, "the precision to compare with fp32: bf16, or fp16-weights (float32 with float16 weights)")->capture_default_str();
  app.add_option("--images", o.run.images, "images per case")->capture_default_str();
  app.add_option("--steps", o.run.steps, "denoising steps")->capture_default_str();
  app.add_option("--batch", o.run.batch, "images per UNet call")->capture_default_str();
  app.add_option("--seed", o.run.seed, "seed of image 0")->capture_default_str();
  app.add_option("--threads", o.run.threads, "CPU threads")->capture_default_str();
  app.add_option("--out", o.out, "where the runs are written")->capture_default_str();
  return fairdiff::tools::run_tool("fairdiff-dtype-error", app, argc, argv, [&] {
    if (o.run.model.empty()) fairdiff::throw_bad_input("--model", "no model given and models/toy not found");
    fairdiff::configure_process(o.run.threads);
    return run(o);
  });
}
