// The schedulers fairdiff runs, under every name each goes by: the --sampling-method
// spelling, the scheduler factory's short name, the diffusers class and the A1111
// sampler of the infotext. Torch-free, so that the planner (which checks the flags)
// and the scheduler factory (which builds the class) read one table.
#pragma once

#include <string>
#include <vector>

namespace fairdiff {

struct SchedulerRow {
  const char* method;      // --sampling-method ("dpm++2m"; stable-diffusion.cpp's spellings)
  const char* name;        // make_scheduler's override name ("dpmpp_2m"; + "_karras" when supported)
  const char* class_name;  // diffusers class ("DPMSolverMultistepScheduler")
  const char* a1111_name;  // A1111 sampler name ("DPM++ 2M")
  bool supports_karras;    // --scheduler karras (use_karras_sigmas)
};

// All rows, in the order of help texts and error messages.
const std::vector<SchedulerRow>& scheduler_table();
// The row of a --sampling-method / of a diffusers class name; nullptr when there is none.
const SchedulerRow* find_scheduler_method(const std::string& method);
const SchedulerRow* find_scheduler_class(const std::string& class_name);

// The --sampling-method names.
const std::vector<std::string>& sampling_methods();

// --sampling-method + --scheduler -> the scheduler factory's override name ("" = the model's own).
std::string scheduler_override(const std::string& method, const std::string& schedule);

// The A1111 sampler name of a diffusers scheduler class ("Euler a"); the class name itself when unknown.
std::string a1111_sampler_name(const std::string& class_name);

}  // namespace fairdiff
