// fairdiff-parity DIR: every golden case under DIR, one line each, then "N passed, N failed".
//
//   fairdiff-parity ../shared/fixtures                 # all groups
//   fairdiff-parity ../shared/fixtures/unet -k sd2     # one group, cases whose name contains "sd2"
#include <c10/core/InferenceMode.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <sstream>

#include "config_json.h"
#include "fairdiff/error.h"
#include "parity.h"
#include "tensor_io.h"
#include "tool_main.h"

namespace fs = std::filesystem;

namespace fairdiff::parity {
namespace {

// Half precision cannot meet float32 tolerances; scale them by the ratio of
// machine epsilons (float16 2^-10, bfloat16 2^-7, float32 2^-23). Printed in the header.
double tolerance_scale(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return std::ldexp(1.0, 13);
    case at::kBFloat16: return std::ldexp(1.0, 16);
    default: return 1.0;
  }
}

std::string fmt_g(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", v);
  return buf;
}

std::string first_values(const at::Tensor& t, int n = 4) {
  at::Tensor flat = t.flatten();
  std::ostringstream ss;
  ss << "[";
  for (int64_t i = 0; i < std::min<int64_t>(n, flat.numel()); ++i)
    ss << (i ? ", " : "") << flat[i].item<double>();
  ss << (flat.numel() > n ? ", ...]" : "]");
  return ss.str();
}

}  // namespace

ParityCase::ParityCase(std::string fixtures_root, std::string group_dir, nlohmann::json spec,
                       const RunOptions& options)
    : root_(std::move(fixtures_root)), group_dir_(std::move(group_dir)), spec_(std::move(spec)), options_(options) {
  name_ = spec_.value("name", std::string("?"));
  op_ = spec_.value("op", std::string("?"));
  params_ = spec_.contains("params") ? spec_["params"] : nlohmann::json::object();
}

std::string ParityCase::fixtures_path(const std::string& relative) const { return root_ + "/" + relative; }

std::string ParityCase::model_dir() const { return fixtures_path(spec_.value("model", std::string())); }

static const SafeTensors& case_file(std::unique_ptr<SafeTensors>& file, const std::string& group_dir,
                                    const nlohmann::json& spec) {
  if (!file) file = std::make_unique<SafeTensors>(group_dir + "/" + spec.at("file").get<std::string>());
  return *file;
}

bool ParityCase::has_input(const std::string& input) const {
  return spec_.contains("inputs") && spec_["inputs"].contains(input);
}

at::Tensor ParityCase::input(const std::string& input) const {
  if (!has_input(input)) throw std::runtime_error("case has no input '" + input + "'");
  return tensor(spec_["inputs"][input].get<std::string>());
}

at::Tensor ParityCase::tensor(const std::string& key) const {
  auto& file = const_cast<std::unique_ptr<SafeTensors>&>(file_);
  const TensorView& view = case_file(file, group_dir_, spec_).at(key);
  return load_tensor(view, scalar_type(view.dtype));
}

bool ParityCase::has_output(const std::string& output) const {
  return spec_.contains("outputs") && spec_["outputs"].contains(output);
}

std::vector<std::string> ParityCase::output_names() const {
  std::vector<std::string> names;
  if (spec_.contains("outputs"))
    for (auto it = spec_["outputs"].begin(); it != spec_["outputs"].end(); ++it) names.push_back(it.key());
  return names;
}

at::Tensor ParityCase::expected(const std::string& output) const {
  if (!has_output(output)) throw std::runtime_error("case has no output '" + output + "'");
  const auto& key = spec_["outputs"][output]["key"].get<std::string>();
  auto& file = const_cast<std::unique_ptr<SafeTensors>&>(file_);
  const TensorView& view = case_file(file, group_dir_, spec_).at(key);
  return load_tensor(view, scalar_type(view.dtype));
}

void ParityCase::check(const std::string& output, const at::Tensor& actual_in) {
  const auto& spec = spec_["outputs"][output];
  OutputResult r;
  r.output = output;
  r.exact = spec.value("exact", false);
  r.atol = spec.value("atol", 0.0) * tolerance_scale(options_.dtype);
  r.rtol = spec.value("rtol", 0.0) * tolerance_scale(options_.dtype);
  const at::Tensor expected_t = expected(output).to(at::kDouble);
  const at::Tensor actual = actual_in.detach().to(at::kCPU).to(at::kDouble);
  if (actual.sizes() != expected_t.sizes()) {
    std::ostringstream ss;
    ss << "shape " << actual.sizes() << ", expected " << expected_t.sizes();
    r.detail = ss.str();
    r.max_abs_err = INFINITY;
    r.worst_ratio = INFINITY;
    results_.push_back(r);
    return;
  }
  const at::Tensor diff = (actual - expected_t).abs();
  const bool finite = at::isfinite(actual).all().item<bool>();
  r.max_abs_err = diff.numel() ? diff.max().item<double>() : 0.0;
  if (!finite) r.max_abs_err = INFINITY;
  if (r.exact) {
    r.pass = finite && r.max_abs_err == 0.0;
    r.worst_ratio = r.pass ? 0.0 : INFINITY;
  } else {
    const at::Tensor ratio = diff / (r.atol + r.rtol * expected_t.abs());
    r.worst_ratio = ratio.numel() ? ratio.max().item<double>() : 0.0;
    r.pass = finite && r.worst_ratio <= 1.0;
  }
  if (!r.pass && diff.numel()) {
    const int64_t at_flat = diff.flatten().argmax().item<int64_t>();
    std::ostringstream ss;
    ss << "worst at flat index " << at_flat << ": got " << actual.flatten()[at_flat].item<double>() << ", expected "
       << expected_t.flatten()[at_flat].item<double>() << "; first values got " << first_values(actual)
       << " expected " << first_values(expected_t);
    r.detail = ss.str();
  }
  results_.push_back(r);
}

void ParityCase::fail(const std::string& output, const std::string& why) {
  OutputResult r;
  r.output = output;
  r.max_abs_err = INFINITY;
  r.worst_ratio = INFINITY;
  r.detail = why;
  results_.push_back(r);
}

bool ParityCase::passed() const {
  if (results_.empty()) return false;
  return std::all_of(results_.begin(), results_.end(), [](const OutputResult& r) { return r.pass; });
}

namespace {

struct Totals {
  int passed = 0, failed = 0, skipped = 0;
};

void print_case(const ParityCase& c, bool verbose) {
  const OutputResult* worst = nullptr;
  for (const auto& r : c.results())
    if (!worst || r.worst_ratio > worst->worst_ratio) worst = &r;
  const bool ok = c.passed();
  const char* status = ok ? "PASS" : c.informational() ? "INFO" : "FAIL";
  std::string line = std::string(status) + "  " + c.name();
  if (worst) {
    line += "  max|err| " + fmt_g(worst->max_abs_err) + " (" + worst->output + ")";
    line += worst->exact ? "  exact" : "  tol atol " + fmt_g(worst->atol) + " rtol " + fmt_g(worst->rtol);
    line += "  err/tol " + fmt_g(worst->worst_ratio);
  } else {
    line += "  checked no output";
  }
  std::printf("%s\n", line.c_str());
  for (const auto& n : c.notes()) std::printf("      %s\n", n.c_str());
  for (const auto& r : c.results())
    if (verbose || !r.pass)
      std::printf("      %s %s: max|err| %s, err/tol %s%s%s\n", r.pass ? "ok  " : "BAD ", r.output.c_str(),
                  fmt_g(r.max_abs_err).c_str(), fmt_g(r.worst_ratio).c_str(), r.detail.empty() ? "" : "; ",
                  r.detail.c_str());
}

std::vector<fs::path> find_manifests(const fs::path& dir) {
  std::vector<fs::path> found;
  if (fs::is_regular_file(dir / "manifest.json")) found.push_back(dir / "manifest.json");
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file() && e.path().filename() == "manifest.json" && e.path().parent_path() != dir)
      found.push_back(e.path());
  std::sort(found.begin(), found.end());
  return found;
}

// The fixtures root is the nearest ancestor of a manifest with a models/ folder.
fs::path fixtures_root_of(const fs::path& manifest) {
  for (fs::path p = manifest.parent_path(); !p.empty() && p != p.root_path(); p = p.parent_path())
    if (fs::is_directory(p / "models")) return p;
  return manifest.parent_path().parent_path();
}

int run(const std::string& dir, const std::string& filter, const RunOptions& options) {
  c10::InferenceMode inference;
  OpRegistry registry;
  register_model_ops(registry);
  register_tokenizer_ops(registry);
  register_pipeline_ops(registry);
  register_sega_ops(registry);
  register_clip_ops(registry);
  register_sdxl_ops(registry);

  if (!fs::is_directory(dir)) throw_bad_input(dir, "fixtures folder not found", "give the path of ../shared/fixtures");
  Totals totals;
  std::map<std::string, std::vector<std::string>> unsupported;  // op -> case names
  if (tolerance_scale(options.dtype) != 1.0)
    std::printf("note: tolerances x %g for %s (ratio of machine epsilons to float32)\n",
                tolerance_scale(options.dtype), c10::toString(options.dtype));
  for (const fs::path& manifest_path : find_manifests(dir)) {
    const nlohmann::json manifest = read_json_file(manifest_path.string());
    if (!manifest.contains("cases")) continue;  // e.g. the single-file model's description
    const std::string root = fixtures_root_of(manifest_path).string();
    const std::string group_dir = manifest_path.parent_path().string();
    std::printf("== %s (%s)\n", manifest.value("group", std::string("?")).c_str(), manifest_path.string().c_str());
    for (const auto& spec : manifest.value("cases", nlohmann::json::array())) {
      ParityCase c(root, group_dir, spec, options);
      if (!filter.empty() && c.name().find(filter) == std::string::npos) continue;
      auto handler = registry.find(c.op());
      if (handler == registry.end()) {
        unsupported[c.op()].push_back(c.name());
        ++totals.skipped;
        continue;
      }
      try {
        handler->second(c);
      } catch (const std::exception& e) {
        c.fail("(exception)", e.what());
      }
      print_case(c, options.verbose);
      (c.passed() || c.informational() ? totals.passed : totals.failed)++;
    }
  }
  const fs::path keysets = fs::path(dir) / "keysets";
  const fs::path keysets_dir = fs::is_directory(keysets) ? keysets : fs::path(dir);
  if (filter.empty() || std::string("keysets").find(filter) != std::string::npos) {
    if (fs::exists(keysets_dir / "summary.json")) {
      std::printf("== keysets (%s)\n", keysets_dir.string().c_str());
      (run_keysets(keysets_dir.string(), options.verbose) ? totals.passed : totals.failed)++;
    }
  }
  for (const auto& [op, names] : unsupported)
    std::printf("not supported yet: op %s (%zu cases, e.g. %s)\n", op.c_str(), names.size(), names.front().c_str());
  std::printf("%d passed, %d failed, %d skipped\n", totals.passed, totals.failed, totals.skipped);
  return totals.failed == 0 ? 0 : 1;
}

at::ScalarType parse_dtype(const std::string& s) {
  if (s == "fp32") return at::kFloat;
  if (s == "fp16") return at::kHalf;
  if (s == "bf16") return at::kBFloat16;
  throw_bad_input("--dtype", "'" + s + "' is not a dtype", "use fp32, fp16 or bf16");
}

}  // namespace
}  // namespace fairdiff::parity

int main(int argc, char** argv) {
  CLI::App app{"fairdiff-parity: run the golden reference cases under DIR and compare"};
  std::string dir, filter, device = "cpu", dtype = "fp32";
  fairdiff::parity::RunOptions options;
  app.add_option("dir", dir, "fixtures folder (searched for manifest.json files)")->required();
  app.add_option("-k,--filter", filter, "run only cases whose name contains this text");
  app.add_option("--device", device, "cpu, cuda or cuda:N");
  app.add_option("--dtype", dtype, "model dtype: fp32, fp16 or bf16");
  app.add_flag("--strict-ftfy", options.strict_ftfy, "count ftfy tokenizer mismatches as failures");
  app.add_flag("-v,--verbose", options.verbose, "print every output of every case");
  app.add_flag("--prepack-weights", options.prepack, "prepack every convolution (generate --prepack-weights)");
  return fairdiff::tools::run_tool("fairdiff-parity", app, argc, argv, [&] {
    options.device = at::Device(device);
    options.dtype = fairdiff::parity::parse_dtype(dtype);
    return fairdiff::parity::run(dir, filter, options);
  });
}
