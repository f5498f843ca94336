// A prompts file (plain lines and JSONL objects with overrides) through validate and
// plan_run: the input is the file, then a line "N SEED SHARDS INDEX" (images per prompt,
// --seed, --num-shards, --shard-index) and --fairness values, separated by "\n--8<--\n".
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>

#include "fairdiff/generate.h"
#include "fuzz_util.h"
#include "run_plan.h"

namespace fs = std::filesystem;

namespace {

// The plan holds every image of the run, so its size is what the input asks for: a file
// asking for billions of images is not a finding. Inputs planning more than this skip plan_run.
constexpr int64_t kMaxImages = 2000;

int64_t images_asked(const std::string& file, int64_t per_prompt) {
  std::istringstream in(file);
  int64_t total = 0;
  for (std::string line; std::getline(in, line);) {
    int64_t count = per_prompt;
    const auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.is_object() && j.contains("count") && j["count"].is_number()) {
      const double c = j["count"].get<double>();
      count = c > kMaxImages ? kMaxImages + 1 : static_cast<int64_t>(std::max(c, 1.0));
    }
    total += std::max<int64_t>(count, 1);
    if (total > kMaxImages) break;
  }
  return total;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto parts = fuzz::split(data, size, 3);
  fairdiff::GenerateOptions o;
  o.model = std::string(FAIRDIFF_SOURCE_DIR) + "/models/toy";
  o.prompts_file = fuzz::scratch_dir() + "/prompts.txt";
  o.out_dir = fuzz::scratch_dir() + "/out";
  o.attributes_dir = std::string(FAIRDIFF_SOURCE_DIR) + "/configs/attributes";
  o.cfg_scale = 7;
  fuzz::write_file(o.prompts_file, parts[0]);
  std::istringstream settings(parts[1]);
  settings >> o.images_per_prompt >> o.seed >> o.num_shards >> o.shard_index;
  if (o.images_per_prompt > 20) o.images_per_prompt = 20;
  std::istringstream specs(parts[2]);
  for (std::string line; std::getline(specs, line);) o.fairness.push_back(line);
  fuzz::refuse_cleanly([&] {
    fairdiff::validate(o);
    if (images_asked(parts[0], o.images_per_prompt) > kMaxImages) return;
    const fairdiff::RunPlan plan = fairdiff::plan_run(o, 512, 512);
    const auto mine = plan.shard();
    if (mine.size() > plan.images.size()) std::abort();
    for (size_t i = 0; i < plan.images.size(); ++i)
      if (plan.images[i].index != static_cast<int64_t>(i)) std::abort();
    // generate writes each image's record and A1111 text: they must be writable.
    for (const auto& img : plan.images)
      (void)nlohmann::json({{"prompt", img.prompt}, {"negative_prompt", img.negative_prompt}}).dump();
    fairdiff::check_resume({}, plan.images, fairdiff::parse_fairness(o), o.out_dir + "/" + plan.manifest_name);
  });
  return 0;
}
