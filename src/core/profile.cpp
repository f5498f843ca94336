#include "profile.h"

#include <atomic>
#include <stdexcept>

#include <time.h>

namespace fairdiff::profile {
namespace {

std::atomic<Session*> g_active{nullptr};
// The counted scopes of each op open on this thread: 0 or 1.
thread_local std::array<int, kOpCount> open_scopes{};

// CPU seconds of every thread of the process so far (nanosecond accounting, not ticks).
double process_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

}  // namespace

const char* op_name(Op op) {
  switch (op) {
    case kConv2d: return "conv2d";
    case kLinear: return "linear";
    case kAttention: return "attention";
    case kGroupNorm: return "group_norm";
    case kLayerNorm: return "layer_norm";
    case kOpCount: break;
  }
  return "?";
}

Session::Session(std::function<void()> sync) : sync_(std::move(sync)) {
  Session* expected = nullptr;
  if (!g_active.compare_exchange_strong(expected, this))
    throw std::logic_error("fairdiff::profile::Session: another session is already collecting");
}

Session::~Session() { g_active.store(nullptr); }

Scope::Scope(Op op, double flops) : session_(g_active.load(std::memory_order_relaxed)), op_(op), flops_(flops) {
  if (!session_) return;
  // A scope inside an open one of the same op on this thread is part of it, already counted
  // (multi_head_attention calls itself once per image): counting it too would count its time
  // and FLOPs twice.
  if (open_scopes[op]++ > 0) {
    --open_scopes[op];
    session_ = nullptr;
    return;
  }
  cpu_start_ = process_cpu_seconds();
  start_ = std::chrono::steady_clock::now();
}

Scope::~Scope() {
  if (!session_) return;
  --open_scopes[op_];
  if (session_->sync_) session_->sync_();
  OpTotals& t = session_->totals_[op_];
  t.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  t.cpu_seconds += process_cpu_seconds() - cpu_start_;
  t.flops += flops_;
  t.calls += 1;
}

}  // namespace fairdiff::profile
