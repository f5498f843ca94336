#include "scheduler_table.h"

namespace fairdiff {

const std::vector<SchedulerRow>& scheduler_table() {
  static const std::vector<SchedulerRow> kRows = {
      {"pndm", "pndm", "PNDMScheduler", "PLMS", false},
      {"ddim", "ddim", "DDIMScheduler", "DDIM", false},
      {"euler", "euler", "EulerDiscreteScheduler", "Euler", true},
      {"euler_a", "euler_a", "EulerAncestralDiscreteScheduler", "Euler a", false},
      {"dpm++2m", "dpmpp_2m", "DPMSolverMultistepScheduler", "DPM++ 2M", true},
      {"lms", "lms", "LMSDiscreteScheduler", "LMS", true},
  };
  return kRows;
}

const SchedulerRow* find_scheduler_method(const std::string& method) {
  for (const SchedulerRow& row : scheduler_table())
    if (method == row.method) return &row;
  return nullptr;
}

const SchedulerRow* find_scheduler_class(const std::string& class_name) {
  for (const SchedulerRow& row : scheduler_table())
    if (class_name == row.class_name) return &row;
  return nullptr;
}

const std::vector<std::string>& sampling_methods() {
  static const std::vector<std::string> kMethods = [] {
    std::vector<std::string> v;
    for (const SchedulerRow& row : scheduler_table()) v.push_back(row.method);
    return v;
  }();
  return kMethods;
}

std::string scheduler_override(const std::string& method, const std::string& schedule) {
  if (method.empty()) return "";
  // "plms" is A1111's name for PNDM (without its Runge-Kutta warm-up, as diffusers runs it).
  const SchedulerRow* row = find_scheduler_method(method == "plms" ? "pndm" : method);
  if (!row) return method;  // the factory names what it does not know
  const bool karras = schedule == "karras" && row->supports_karras;
  return std::string(row->name) + (karras ? "_karras" : "");
}

std::string a1111_sampler_name(const std::string& class_name) {
  const SchedulerRow* row = find_scheduler_class(class_name);
  return row ? row->a1111_name : class_name;
}

}  // namespace fairdiff
