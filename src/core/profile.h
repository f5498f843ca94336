// Per-operator timers: where a denoising step spends its time, and at what rate.
//
//   fairdiff::profile::Session session;            // collect while alive (scripts/bench)
//   unet->forward(x, t, context);
//   for (auto op : fairdiff::profile::kOps) {
//     const auto& s = session.totals()[op];      // seconds, FLOPs, calls of every conv2d, ...
//   }
//
// The leaf layers (layers.h) open a Scope around their one heavy ATen call; with no
// Session alive a Scope costs one atomic load. FLOPs are counted from the actual shapes
// (2 per multiply-add), so a component's GFLOP/s is measured, not assumed. Wall-clock time
// is taken on the calling thread; ops run their own threads inside, so each scope also
// takes the process's CPU time (every thread's): CPU seconds over wall seconds is how many
// cores an op kept busy, and where it falls short of the thread count a core waited. With a device
// `sync` the session waits for queued GPU work at each scope's end (which serialises the
// GPU: use it to attribute time, not to measure the total).
//
// One Session at a time, process-wide. Torch-free.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>

namespace fairdiff::profile {

enum Op : int {
  kConv2d,      // at::conv2d (UNet and VAE convolutions, 1x1 projections)
  kLinear,      // at::linear (attention projections, feed-forward, time embedding)
  kAttention,   // q k^T, softmax, probs v (the score products of every attention)
  kGroupNorm,   // at::group_norm
  kLayerNorm,   // at::layer_norm
  kOpCount
};
constexpr std::array<Op, kOpCount> kOps = {kConv2d, kLinear, kAttention, kGroupNorm, kLayerNorm};
const char* op_name(Op op);  // "conv2d", "linear", "attention", "group_norm", "layer_norm"

struct OpTotals {
  double seconds = 0;
  double cpu_seconds = 0;  // the whole process's CPU time inside the op's scopes
  double flops = 0;  // 2 per multiply-add; 0 for the norms (bandwidth-bound)
  int64_t calls = 0;
};
using Totals = std::array<OpTotals, kOpCount>;

class Session {
 public:
  // `sync` (optional) waits for queued device work; called at the end of every scope.
  explicit Session(std::function<void()> sync = nullptr);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  const Totals& totals() const { return totals_; }
  void reset() { totals_ = {}; }

 private:
  friend class Scope;
  std::function<void()> sync_;
  Totals totals_{};
};

class Scope {
 public:
  Scope(Op op, double flops);
  ~Scope();
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  Session* session_;
  Op op_;
  double flops_;
  std::chrono::steady_clock::time_point start_;
  double cpu_start_ = 0;
};

}  // namespace fairdiff::profile
