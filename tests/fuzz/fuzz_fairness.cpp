// Fairness instructions: --fairness values (one per line), a --fairness-file and an
// attribute file of the library ("fuzz.json", beside copies of configs/attributes),
// separated by "\n--8<--\n" lines, then --assignment and --fairness-mode on one line.
// An accepted instruction is assigned to a few images and recorded.
#include <filesystem>
#include <sstream>

#include "fairness.h"
#include "fuzz_util.h"

namespace fs = std::filesystem;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string library = [] {
    const std::string dir = fuzz::scratch_dir() + "/attributes";
    fs::create_directories(dir);
    for (const char* name : {"gender.json", "colour.json"})
      fs::copy_file(std::string(FAIRDIFF_SOURCE_DIR) + "/configs/attributes/" + name, dir + "/" + name);
    return dir;
  }();
  const auto parts = fuzz::split(data, size, 4);
  fairdiff::FairnessOptions o;
  o.attributes_dir = library;
  std::istringstream specs(parts[0]);
  for (std::string line; std::getline(specs, line);) o.fairness.push_back(line);
  if (!parts[1].empty()) {
    o.fairness_file = fuzz::scratch_dir() + "/fairness.json";
    fuzz::write_file(o.fairness_file, parts[1]);
  }
  fuzz::write_file(library + "/fuzz.json", parts[2]);
  std::istringstream settings(parts[3]);
  settings >> o.assignment >> o.fairness_mode;
  if (o.assignment.empty()) o.assignment = "quota";
  fuzz::refuse_cleanly([&] {
    const fairdiff::FairnessSpec spec = fairdiff::parse_fairness(o);
    const auto groups = fairdiff::assign_groups(spec, o.assignment, 42, 1, 7);
    if (groups.size() != 7) std::abort();
    for (const auto& image : groups) {
      if (image.size() != spec.targets.size()) std::abort();
      std::vector<std::pair<std::string, std::string>> named;
      for (size_t a = 0; a < image.size(); ++a) {
        const auto& attribute = spec.targets[a].attribute;
        if (image[a] < 0 || image[a] >= static_cast<int64_t>(attribute.groups.size())) std::abort();
        named.emplace_back(attribute.name, attribute.groups[static_cast<size_t>(image[a])].name);
      }
      fairdiff::fairness_label(named);
    }
    fairdiff::targets_record(spec).dump();
    fairdiff::joint_record(spec).dump();
  });
  fuzz::refuse_cleanly([&] { fairdiff::load_attribute("fuzz", library); });
  return 0;
}
