// What the two trainers of the shipped models share (fairdiff-train-toy, models/toy, and
// fairdiff-train-toy-clip, models/toy-clip): torch.nn's default initialisation, the
// cosine learning-rate schedule, and writing a JSON file.
#pragma once

#include <torch/nn/module.h>
#include <torch/optim/adamw.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "fs_util.h"

namespace fairdiff::tools {

// Initialisation as torch.nn's defaults (our layers are built uninitialised for fast
// loading): weights and biases uniform in +-1/sqrt(fan_in), embeddings N(0, 0.02),
// norms at scale 1 and shift 0.
inline void init_for_training(torch::nn::Module& module) {
  at::NoGradGuard no_grad;
  std::map<std::string, int64_t> fan_in;  // layer prefix -> fan-in of its weight
  for (const auto& p : module.named_parameters()) {
    const std::string& name = p.key();
    at::Tensor t = p.value();
    const bool weight = name.size() >= 6 && name.compare(name.size() - 6, 6, "weight") == 0;
    if (!weight) continue;
    const std::string prefix = name.substr(0, name.size() - 6);
    if (name.find("embedding") != std::string::npos && t.dim() == 2) {
      t.normal_(0.0, 0.02);
    } else if (t.dim() >= 2) {
      const int64_t fan = t.numel() / t.size(0);
      fan_in[prefix] = fan;
      const double bound = 1.0 / std::sqrt(static_cast<double>(fan));
      t.uniform_(-bound, bound);
    } else {
      t.fill_(1.0);  // a norm's scale
    }
  }
  for (const auto& p : module.named_parameters()) {
    const std::string& name = p.key();
    if (name.size() < 4 || name.compare(name.size() - 4, 4, "bias") != 0) continue;
    const auto it = fan_in.find(name.substr(0, name.size() - 4));
    at::Tensor t = p.value();
    if (it == fan_in.end()) {
      t.zero_();  // a norm's shift
    } else {
      const double bound = 1.0 / std::sqrt(static_cast<double>(it->second));
      t.uniform_(-bound, bound);
    }
  }
}

// Linear warm-up, then a cosine decay to 5% of the peak.
inline double cosine_lr(double peak, int64_t step, int64_t total, int64_t warmup) {
  if (step < warmup) return peak * (step + 1) / warmup;
  const double t = double(step - warmup) / double(std::max<int64_t>(1, total - warmup));
  return peak * (0.05 + 0.95 * 0.5 * (1.0 + std::cos(M_PI * t)));
}

inline void set_lr(torch::optim::AdamW& opt, double lr) {
  for (auto& group : opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
}

inline void write_json(const std::filesystem::path& path, const nlohmann::json& j) {
  fairdiff::write_file_atomic(path.string(), j.dump(2) + "\n");
}

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Writes a model folder next to `out_dir` with `write`, then swaps it in, so that an
// interrupted run never leaves half a model.
inline void publish_folder(const std::string& out_dir, const std::function<void(const std::filesystem::path&)>& write) {
  namespace fs = std::filesystem;
  const fs::path out = fs::absolute(out_dir).lexically_normal();
  const fs::path tmp = out.string() + ".tmp";
  fs::remove_all(tmp);
  write(tmp);
  const fs::path old = out.string() + ".old";
  fs::remove_all(old);
  if (fs::exists(out)) fs::rename(out, old);
  fs::rename(tmp, out);
  fs::remove_all(old);
}

}  // namespace fairdiff::tools
