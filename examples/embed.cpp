// Embedding fairdiff in another program through include/fairdiff alone: load the model
// once, ask for a fair batch, get pixels and records back in memory, and audit them with
// a classifier from the registry. No file is written except the pictures this example
// chooses to save (binary PPM, so it needs no image library).
//
//   fairdiff-embed-example [MODEL_DIR [OUT_DIR]]      (default: the shipped toy model, no files)
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "fairdiff/audit.h"
#include "fairdiff/error.h"
#include "fairdiff/model.h"

namespace {

void save_ppm(const fairdiff::Image& im, const std::string& path) {
  std::ofstream out(path, std::ios::binary);
  out << "P6\n" << im.width << " " << im.height << "\n255\n";
  out.write(reinterpret_cast<const char*>(im.rgb.data()), static_cast<std::streamsize>(im.rgb.size()));
}

int run(int argc, char** argv) {
  fairdiff::configure_process(0);  // the embedder's choice: every CPU, freed memory reused

  fairdiff::ModelOptions mo;
  mo.model = argc > 1 ? argv[1] : fairdiff::default_model();
  mo.device = "cpu";
  fairdiff::Model model = fairdiff::Model::load(mo);
  std::printf("model %s on %s, native size %lldx%lld\n", model.name().c_str(), model.device().c_str(),
              static_cast<long long>(model.native_width()), static_cast<long long>(model.native_height()));

  // Half the kites red, half blue: exact quotas, each image steered toward its group.
  fairdiff::FairnessOptions fo;
  fo.fairness = {"colour=red:50,blue:50"};
  model.set_fairness(fo);
  const int n = 4;
  const int64_t seed = 7;
  const std::vector<fairdiff::GroupAssignment> groups = model.assign_groups(n, seed);

  std::vector<fairdiff::ImageRequest> batch;
  for (int i = 0; i < n; ++i) batch.push_back({"a photo of a kite", "", seed + i, groups[static_cast<size_t>(i)]});
  fairdiff::SamplingSettings s;
  s.steps = 20;
  int steps_seen = 0;
  const std::vector<fairdiff::Image> images =
      model.generate(batch, s, [&](const fairdiff::StepProgress&) { ++steps_seen; });

  // See what came out, with the registry's hue classifier (the toy world's colours).
  const auto classifier = fairdiff::make_classifier("hue", "colour");
  int hits = 0;
  for (int i = 0; i < n; ++i) {
    const fairdiff::Image& im = images[static_cast<size_t>(i)];
    const int g = classifier->classify(im.rgb.data(), static_cast<int>(im.width), static_cast<int>(im.height));
    const std::string seen = g < 0 ? "unclassified" : classifier->groups()[static_cast<size_t>(g)];
    const std::string& assigned = groups[static_cast<size_t>(i)].front().second;
    hits += seen == assigned;
    std::printf("image %d: seed %lld, assigned %s, classified %s, %zu record bytes\n", i,
                static_cast<long long>(seed + i), assigned.c_str(), seen.c_str(), im.record.size());
    if (argc > 2) save_ppm(im, std::string(argv[2]) + "/image-" + std::to_string(i) + ".ppm");
  }
  std::printf("%d steps, %d of %d images in their assigned group\n", steps_seen, hits, n);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const fairdiff::Error& e) {
    std::fprintf(stderr, "embed-example: error: %s\n", e.what());
    return fairdiff::exit_code(e.kind());
  }
}
