// fairdiff-fairness-bench: does fair guidance reach the proportions it is asked for?
//
// For each case (a prompt of the toy world and a colour target), generates N images
// without and with --fairness from the same seeds, audits both runs with the exact hue
// classifier, and prints one table row: the model's own shares (the bias), the target,
// the shares reached, the error, and the cost (seconds and UNet evaluations per image).
//
//   fairdiff-fairness-bench --out runs/fairness-bench            # N = 200 per case
//   fairdiff-fairness-bench --images 64 --check 10               # the test suite's version:
//       exit 1 unless every guided share is within 10 points of its target and the
//       unguided kite runs are biased by at least 20 points
//
// scripts/fairness-bench builds and runs it; README "Fairness benchmark" has the figures.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
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
  std::string fairness;  // --fairness value
  bool against_bias;     // the model alone is far from this target (the check needs it biased)
};

// Targets: balance a biased class, 30:70, a target against the data's bias (kites are 90%
// red in the training data), and all three colours.
const std::vector<Case> kCases = {
    {"a photo of a kite", "colour=red:50,blue:50", true},
    {"a photo of a boat", "colour=red:30,blue:70", false},
    {"a photo of a kite", "colour=red:10,blue:90", true},
    {"a photo of a house", "colour=red:1,green:1,blue:1", false},
};

struct Options {
  fairdiff::tools::ToyRunSettings run{"", /*images=*/200, /*steps=*/50, /*batch=*/16, /*seed=*/1000, /*threads=*/1};
  std::string out = "runs/fairness-bench";
  double cfg = 7.0;
  double check = 0;  // percentage points; 0 = report only
  std::string mode = "exact";  // --fairness-mode of the guided runs
  std::string dtype = "auto";  // generate --dtype of every run
  bool paper = false;          // the paper's edit settings instead of the colour attribute's defaults
  std::string verify_model;    // a CLIP folder: adds a guided run with --verify judged by it
  std::string verifier = "clip";
  int64_t max_retries = 2;
  double verify_margin = 0;
  double check_verified = 0;   // percentage points for the verified run; 0 = report only
  size_t only_case = 0;        // 1-based; 0 = every case
};

// Fair Diffusion's published edit settings (scale 4, threshold 0.95, warm-up 5, momentum
// 0.5 / 0.6), which under-steer the toy model: the realistic case for --verify.
std::string paper_fairness_file(const Options& o, const Case& c, const std::string& dir) {
  nlohmann::json targets = nlohmann::json::object();
  std::stringstream ratios(c.fairness.substr(c.fairness.find('=') + 1));
  for (std::string item; std::getline(ratios, item, ',');)
    targets[item.substr(0, item.find(':'))] = std::stod(item.substr(item.find(':') + 1));
  const nlohmann::json file = {
      {"attributes", {{{"name", "colour"}, {"targets", targets}, {"edit_guidance_scale", 4}, {"edit_threshold", 0.95},
                       {"edit_warmup_steps", 5}, {"edit_momentum_scale", 0.5}, {"edit_mom_beta", 0.6}}}}};
  fs::create_directories(dir);
  const std::string path = dir + "/paper-settings.json";
  std::ofstream(path) << file.dump(2) << "\n";
  (void)o;
  return path;
}

struct RunResult {
  fairdiff::AuditReport audit;
  double seconds_per_image = 0;
  double retries_per_image = 0;
};

// generate's options for one run of case c (the paper's settings file aside).
fairdiff::GenerateOptions run_options(const Options& o, const Case& c, const std::string& dir, bool fair,
                                      bool verify) {
  fairdiff::GenerateOptions g = fairdiff::tools::toy_run(o.run, c.prompt, fair ? c.fairness : "", dir);
  g.cfg_scale = o.cfg;
  g.fairness_mode = o.mode;
  g.dtype = o.dtype;
  g.verify = verify;
  g.verify_classifier = o.verifier;
  g.clip_model = o.verify_model;
  g.max_retries = o.max_retries;
  g.verify_margin = o.verify_margin;
  return g;
}

RunResult run_case(const Options& o, const Case& c, const std::string& dir, bool fair, bool verify = false) {
  fs::remove_all(dir);
  fairdiff::GenerateOptions g = run_options(o, c, dir, fair, verify);
  if (fair && o.paper) {
    g.fairness.clear();
    g.fairness_file = paper_fairness_file(o, c, dir + "-settings");
  }
  const auto t0 = std::chrono::steady_clock::now();
  const fairdiff::RunSummary summary = fairdiff::generate(g);
  RunResult r;
  r.retries_per_image = static_cast<double>(summary.retries) / static_cast<double>(o.run.images);
  r.seconds_per_image = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / o.run.images;
  fairdiff::AuditOptions a;
  a.dir = dir;
  a.attribute = "colour";
  r.audit = fairdiff::audit(a);
  return r;
}

std::string shares(const fairdiff::PromptAudit& p, bool targets) {
  std::string s;
  for (const auto& g : p.groups) {
    char buf[48];
    const double v = targets ? g.target.value_or(0.0) : g.share;
    std::snprintf(buf, sizeof buf, "%s%s %.0f", s.empty() ? "" : " ", g.name.c_str(), 100 * v);
    s += buf;
  }
  return s;
}

// Largest |share - target| of a run against the guided run's targets (the unguided run
// has none of its own; the guided run's audit computes its own errors).
double max_error(const fairdiff::PromptAudit& run, const fairdiff::PromptAudit& targets) {
  double worst = 0;
  for (size_t g = 0; g < run.groups.size(); ++g)
    worst = std::max(worst, std::abs(run.groups[g].share - targets.groups[g].target.value_or(0.0)));
  return worst;
}

int run(const Options& o) {
  std::printf(
      "fairness benchmark: model %s, %lld images per run, %lld steps, CFG %g, batch %lld, %d thread(s), %s mode\n",
      o.run.model.c_str(), (long long)o.run.images, (long long)o.run.steps, o.cfg, (long long)o.run.batch,
      o.run.threads, o.mode.c_str());
  std::fflush(stdout);
  std::printf("%-20s %-26s | %-22s | %-22s | %-22s | %6s %6s | %5s | %6s %6s | %s\n", "prompt", "target", "unguided (bias)",
              "target %", "guided", "|err|", "max", "hit", "s/img", "fair", "UNet/img");
  bool ok = true;
  double sum_error = 0;
  for (size_t k = 0; k < kCases.size(); ++k) {
    if (o.only_case && k + 1 != o.only_case) continue;
    const Case& c = kCases[k];
    const std::string dir = o.out + "/case-" + std::to_string(k + 1);
    const RunResult plain = run_case(o, c, dir + "/unguided", false);
    const RunResult fair = run_case(o, c, dir + "/fair", true);
    const fairdiff::PromptAudit& p = plain.audit.prompts.front();
    const fairdiff::PromptAudit& f = fair.audit.prompts.front();
    const double mean = fair.audit.mean_abs_error.value_or(0.0), worst = fair.audit.max_abs_error.value_or(0.0);
    const double bias = max_error(p, f);
    sum_error += mean;
    // UNet evaluations per image: per step unconditional + text, plus one per edit concept
    // (exact: every group of the attribute, toward one and away from the others; fast: the
    // assigned group only). Momentum makes warm-up steps count too.
    const size_t concepts = o.mode == "fast" ? 1 : f.groups.size();
    char unet[32];
    std::snprintf(unet, sizeof unet, "%lld -> %lld", (long long)(2 * o.run.steps),
                  (long long)((2 + concepts) * o.run.steps));
    std::printf("%-20s %-26s | %-22s | %-22s | %-22s | %5.1f%% %5.1f%% | %4.0f%% | %6.2f %6.2f | %s\n", c.prompt.c_str(),
                c.fairness.c_str(), shares(p, false).c_str(), shares(f, true).c_str(), shares(f, false).c_str(),
                100 * mean, 100 * worst, 100 * f.hit_rate().value_or(0.0), plain.seconds_per_image,
                fair.seconds_per_image, unet);
    if (!o.verify_model.empty() || o.verifier != "clip") {
      // The same guided run with --verify; the judge is still the exact hue classifier.
      const RunResult v = run_case(o, c, dir + "/verified", true, true);
      const fairdiff::PromptAudit& pv = v.audit.prompts.front();
      const double vmean = v.audit.mean_abs_error.value_or(0.0), vworst = v.audit.max_abs_error.value_or(0.0);
      std::printf("%-20s %-26s | %-22s | %-22s | %-22s | %5.1f%% %5.1f%% | %4.0f%% | %6s %6.2f | retries/img %.2f, "
                  "unverified %lld\n",
                  "  + --verify", o.verifier.c_str(), "", "", shares(pv, false).c_str(), 100 * vmean, 100 * vworst,
                  100 * pv.hit_rate().value_or(0.0), "", v.seconds_per_image, v.retries_per_image,
                  static_cast<long long>(v.audit.unverified));
      if (o.check_verified > 0 && 100 * vworst > o.check_verified) {
        std::printf("  FAIL: a verified share is %.1f points from its target (bound %.0f)\n", 100 * vworst,
                    o.check_verified);
        ok = false;
      }
    }
    std::fflush(stdout);  // a row as soon as its case is done (the full run takes a while)
    if (o.check > 0) {
      if (100 * worst > o.check) {
        std::printf("  FAIL: a guided share is %.1f points from its target (bound %.0f)\n", 100 * worst, o.check);
        ok = false;
      }
      if (c.against_bias && 100 * bias < 2 * o.check) {
        std::printf("  FAIL: the unguided run is only %.1f points from the target: not the biased model expected\n",
                    100 * bias);
        ok = false;
      }
    }
  }
  std::printf("mean |achieved - target| over all cases and groups: %.1f points\n",
              100 * sum_error / static_cast<double>(kCases.size()));
  std::printf("runs, charts and contact sheets: %s/case-*/{unguided,fair,verified}/audit-*.png\n", o.out.c_str());
  if (o.check > 0) std::printf("%s\n", ok ? "check passed" : "check FAILED");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"fairdiff-fairness-bench: unguided vs fair-guided colour proportions on the shipped toy model"};
  Options o;
  app.add_option("--model", o.run.model, "model folder (default: models/toy)");
  app.add_option("--out", o.out, "folder for the runs (each case's folders are replaced)")->capture_default_str();
  app.add_option("-N,--images", o.run.images, "images per run")->capture_default_str();
  app.add_option("--steps", o.run.steps, "denoising steps")->capture_default_str();
  app.add_option("--cfg-scale", o.cfg, "classifier-free guidance scale")->capture_default_str();
  app.add_option("--batch-size", o.run.batch, "images per UNet call")->capture_default_str();
  app.add_option("--seed", o.run.seed, "seed of the first image (both runs of a case use the same seeds)")
      ->capture_default_str();
  app.add_option("--fairness-mode", o.mode, "exact or fast (see fairdiff generate --help)")->capture_default_str();
  app.add_option("--dtype", o.dtype, "generate --dtype of every run (auto: bf16 on a CPU with native bf16)")
      ->capture_default_str();
  app.add_option("--threads", o.run.threads, "CPU threads (the toy model's layers are too small to share)")
      ->capture_default_str();
  app.add_option("--check", o.check,
                 "fail unless every guided share is within this many points of its target and the unguided "
                 "runs of targets against the bias miss by twice as much");
  app.add_option("--case", o.only_case, "run only case K (1-based)");
  app.add_flag("--paper", o.paper,
               "guide with the paper's edit settings (scale 4, threshold 0.95, warm-up 5, momentum 0.5/0.6) "
               "instead of the colour attribute's tuned defaults");
  app.add_option("--verify-model", o.verify_model, "a CLIP folder (models/toy-clip): adds a guided run with --verify");
  app.add_option("--verifier", o.verifier, "the verify classifier (clip, or hue: the judge itself)")->capture_default_str();
  app.add_option("--max-retries", o.max_retries, "retries of the verified run")->capture_default_str();
  app.add_option("--verify-margin", o.verify_margin, "the verifier's margin (generate --verify-margin)")->capture_default_str();
  app.add_option("--check-verified", o.check_verified,
                 "fail unless every verified share is within this many points of its target");
  return fairdiff::tools::run_tool("fairdiff-fairness-bench", app, argc, argv, [&] {
    if (o.verifier == "clip" && !o.verify_model.empty()) fairdiff::register_clip_classifier();
    if (o.run.model.empty()) o.run.model = fairdiff::default_model();
    if (o.run.model.empty())
      throw fairdiff::Error(fairdiff::ErrorKind::BadInput, "--model", "models/toy is missing: pass --model");
    // The flags that pass through to generate are checked as generate checks them, before
    // the table starts: a bad --dtype is one line on stderr and nothing on stdout.
    fairdiff::GenerateOptions first = run_options(o, kCases.front(), o.out + "/check", true, !o.verify_model.empty());
    fairdiff::validate(first);
    fairdiff::configure_process(o.run.threads);
    return run(o);
  });
}
