// Pieces of `fairdiff generate` shared between the torch-free planner
// (run_plan.cpp) and the sampling side (generate.cpp).
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace fairdiff {

// The --sampling-method names (stable-diffusion.cpp's spellings where they exist).
const std::vector<std::string>& sampling_methods();

// --sampling-method + --scheduler -> the scheduler factory's override name ("" = the model's own).
std::string scheduler_override(const std::string& method, const std::string& schedule);

// Manifest lines by image index; unparsable (torn) lines are skipped.
std::map<int64_t, nlohmann::json> read_manifest(const std::string& path);

}  // namespace fairdiff
