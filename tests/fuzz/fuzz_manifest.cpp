// Manifests of a sharded run: the input is two shard manifests (JSONL), separated by a
// "\n--8<--\n" line, in a folder holding two small PNGs (a.png, b.png). read_manifest
// reads each, check_resume compares it with a fixed plan, merge_manifests joins them and
// the audit parses every record, reads the images and writes its chart and sheet.
#include <filesystem>

#include "fairdiff/audit.h"
#include "fairdiff/generate.h"
#include "fuzz_util.h"
#include "png_io.h"
#include "run_plan.h"

namespace fs = std::filesystem;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string dir = [] {
    const std::string d = fuzz::scratch_dir() + "/run";
    fs::create_directories(d);
    std::vector<uint8_t> red(8 * 8 * 3), blue(8 * 8 * 3);
    for (size_t i = 0; i < red.size(); i += 3) red[i] = 220, blue[i + 2] = 220;
    fairdiff::write_png(d + "/a.png", red.data(), 8, 8, {{"parameters", "a kite\nSteps: 2, Seed: 1, Size: 8x8"}});
    fairdiff::write_png(d + "/b.png", blue.data(), 8, 8, {});
    return d;
  }();
  // The plan a resumed run would compare the records with: 2 images of one prompt, colour 50:50.
  static const auto plan = [] {
    fairdiff::GenerateOptions o;
    o.prompt = "a kite";
    o.images_per_prompt = 2;
    o.fairness = {"colour=red:50,blue:50"};
    o.attributes_dir = std::string(FAIRDIFF_SOURCE_DIR) + "/configs/attributes";
    return std::make_pair(fairdiff::plan_run(o, 8, 8), fairdiff::parse_fairness(o));
  }();
  const auto parts = fuzz::split(data, size, 2);
  fs::remove(dir + "/manifest.jsonl");
  const std::string shards[2] = {dir + "/manifest-shard-0-of-2.jsonl", dir + "/manifest-shard-1-of-2.jsonl"};
  for (int k = 0; k < 2; ++k) {
    fuzz::write_file(shards[k], parts[static_cast<size_t>(k)]);
    const auto done = fairdiff::read_manifest(shards[k]);
    fuzz::refuse_cleanly([&] { fairdiff::check_resume(done, plan.first.images, plan.second, shards[k]); });
  }
  fuzz::refuse_cleanly([&] { fairdiff::merge_manifests(dir); });
  fuzz::refuse_cleanly([&] {
    fairdiff::AuditOptions o;
    o.dir = dir;
    o.classifier_options.attributes_dir = std::string(FAIRDIFF_SOURCE_DIR) + "/configs/attributes";
    const fairdiff::AuditReport r = fairdiff::audit(o);
    fairdiff::audit_text(r);
    fairdiff::audit_json(r);
  });
  return 0;
}
