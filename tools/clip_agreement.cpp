// fairdiff-clip-agreement: how often two classifiers of the audit put an image into the
// same group. By default the toy world's exact hue classifier against the CLIP zero-shot
// classifier with the shipped toy CLIP (models/toy-clip), on the PNGs of one or more
// `fairdiff generate` output folders:
//
//   fairdiff-clip-agreement --out runs/demo/fair --out runs/demo/unguided --min-agreement 0.98
//
// prints the confusion matrix (rows: the first classifier's groups and "unclassified";
// columns: the second's) and the share of images on its diagonal, and exits 1 when that
// share is below --min-agreement. --throughput instead times the second classifier alone
// (images per second, batched as the audit does) on the same images, or on synthetic ones.
// Uses the public API only (include/fairdiff).
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "fairdiff/audit.h"
#include "fairdiff/error.h"
#include "fairdiff/model.h"
#include "tool_main.h"

namespace fs = std::filesystem;

namespace {

struct Options {
  std::vector<std::string> dirs;
  std::string first = "hue", second = "clip";
  std::string attribute = "colour";
  std::string clip_model;  // "" = models/toy-clip of this source tree
  std::string device = "cpu";
  double margin = 0.5;
  double min_agreement = 0;
  int64_t batch = 32;
  int threads = 1;
  bool throughput = false;
  int64_t images = 64;  // --throughput: images timed (after one warm-up batch)
};

std::vector<fs::path> pngs(const std::vector<std::string>& dirs) {
  std::vector<fs::path> out;
  for (const std::string& dir : dirs) {
    if (!fs::is_directory(dir)) fairdiff::throw_bad_input("--out " + dir, "not a folder", "give a generate --out folder");
    std::vector<fs::path> files;
    for (const auto& e : fs::directory_iterator(dir))
      if (e.is_regular_file() && e.path().extension() == ".png") files.push_back(e.path());
    if (files.empty()) fairdiff::throw_bad_input("--out " + dir, "has no PNG images", "give a generate --out folder");
    std::sort(files.begin(), files.end());
    out.insert(out.end(), files.begin(), files.end());
  }
  return out;
}

std::unique_ptr<fairdiff::GroupClassifier> make(const std::string& name, const Options& o) {
  fairdiff::ClassifierOptions c;
  c.attribute = o.attribute;
  c.device = o.device;
  c.margin = o.margin;
  if (name == "clip") c.model = o.clip_model.empty() ? std::string(FAIRDIFF_SOURCE_DIR) + "/models/toy-clip" : o.clip_model;
  return fairdiff::make_classifier(name, c);
}

// Every image's group by `classifier`, in batches of o.batch (-1: unclassified).
std::vector<int> classify_all(const fairdiff::GroupClassifier& classifier, const std::vector<fairdiff::RgbImage>& images,
                              int64_t batch) {
  std::vector<int> out;
  for (size_t i = 0; i < images.size(); i += size_t(batch)) {
    std::vector<const fairdiff::RgbImage*> chunk;
    for (size_t j = i; j < std::min(images.size(), i + size_t(batch)); ++j) chunk.push_back(&images[j]);
    const std::vector<int> groups = classifier.classify_batch(chunk);
    out.insert(out.end(), groups.begin(), groups.end());
  }
  return out;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Synthetic pictures for --throughput without --out: a coloured square on grey, 32x32.
std::vector<fairdiff::RgbImage> synthetic_images(int64_t n) {
  std::vector<fairdiff::RgbImage> out;
  for (int64_t i = 0; i < n; ++i) {
    fairdiff::RgbImage image{32, 32, std::vector<uint8_t>(32 * 32 * 3, 200)};
    for (int y = 8; y < 24; ++y)
      for (int x = 8; x < 24; ++x) image.rgb[size_t(y * 32 + x) * 3 + size_t(i % 3)] = 255;
    out.push_back(std::move(image));
  }
  return out;
}

int throughput(const Options& o, std::vector<fairdiff::RgbImage> images) {
  if (images.empty()) images = synthetic_images(o.images + o.batch);
  const auto t0 = std::chrono::steady_clock::now();
  const auto classifier = make(o.second, o);
  const double load_s = seconds_since(t0);
  std::vector<fairdiff::RgbImage> warm(images.begin(), images.begin() + std::min<int64_t>(o.batch, int64_t(images.size())));
  classify_all(*classifier, warm, o.batch);  // first call: allocations, lazy initialisation
  std::vector<fairdiff::RgbImage> timed;
  for (int64_t i = 0; i < o.images; ++i) timed.push_back(images[size_t(i) % images.size()]);
  const auto t1 = std::chrono::steady_clock::now();
  classify_all(*classifier, timed, o.batch);
  const double s = seconds_since(t1);
  std::printf("%s classifier (%s): loaded in %.1f s; %lld images in %.2f s = %.2f images/s (batch %lld, %d threads)\n",
              o.second.c_str(), o.second == "clip" ? (o.clip_model.empty() ? "models/toy-clip" : o.clip_model.c_str()) : "-",
              load_s, (long long)o.images, s, double(o.images) / s, (long long)o.batch, o.threads);
  return 0;
}

int run(const Options& o) {
  fairdiff::configure_process(o.threads);
  fairdiff::register_clip_classifier();
  std::vector<fairdiff::RgbImage> images;
  for (const fs::path& f : pngs(o.dirs)) images.push_back(fairdiff::read_png_rgb(f.string()));
  if (o.throughput) return throughput(o, std::move(images));
  if (images.empty()) fairdiff::throw_bad_input("--out", "no folder given", "give one or more generate --out folders");

  const auto a = make(o.first, o), b = make(o.second, o);
  const std::vector<int> ga = classify_all(*a, images, o.batch), gb = classify_all(*b, images, o.batch);

  // Columns follow the second classifier's groups; a row agrees on the column of its own name.
  const std::vector<std::string>& rows = a->groups();
  const std::vector<std::string>& cols = b->groups();
  std::vector<std::vector<int64_t>> m(rows.size() + 1, std::vector<int64_t>(cols.size() + 1, 0));
  auto row_of = [&](int g) { return g < 0 ? rows.size() : size_t(g); };
  auto col_of = [&](int g) { return g < 0 ? cols.size() : size_t(g); };
  int64_t same = 0;
  for (size_t i = 0; i < images.size(); ++i) {
    ++m[row_of(ga[i])][col_of(gb[i])];
    const bool both_none = ga[i] < 0 && gb[i] < 0;
    const bool same_group = ga[i] >= 0 && gb[i] >= 0 && rows[size_t(ga[i])] == cols[size_t(gb[i])];
    same += both_none || same_group;
  }
  const double agreement = double(same) / double(images.size());

  std::printf("%zu images, attribute %s: rows %s, columns %s (margin %g)\n", images.size(), o.attribute.c_str(),
              o.first.c_str(), o.second.c_str(), o.margin);
  std::printf("%-14s", "");
  for (const std::string& c : cols) std::printf("%14s", c.c_str());
  std::printf("%14s\n", "unclassified");
  for (size_t r = 0; r <= rows.size(); ++r) {
    std::printf("%-14s", r < rows.size() ? rows[r].c_str() : "unclassified");
    for (int64_t n : m[r]) std::printf("%14lld", (long long)n);
    std::printf("\n");
  }
  std::printf("agreement: %lld of %zu = %.2f%%\n", (long long)same, images.size(), 100.0 * agreement);
  if (agreement < o.min_agreement) {
    std::fprintf(stderr, "fairdiff-clip-agreement: agreement %.2f%% is below --min-agreement %.2f%%\n", 100.0 * agreement,
                 100.0 * o.min_agreement);
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"fairdiff-clip-agreement: confusion matrix and agreement of two classifiers (default hue vs clip)"};
  Options o;
  app.add_option("--out", o.dirs, "generate --out folder whose PNGs are classified (repeatable)");
  app.add_option("--first", o.first, "classifier of the rows")->capture_default_str();
  app.add_option("--second", o.second, "classifier of the columns (and of --throughput)")->capture_default_str();
  app.add_option("--attribute", o.attribute, "attribute both classifiers tell")->capture_default_str();
  app.add_option("--clip-model", o.clip_model, "CLIPModel folder of the clip classifier (default: models/toy-clip)");
  app.add_option("--margin", o.margin, "clip: a best probability below this leaves an image unclassified")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  app.add_option("--device", o.device, "where the clip classifier runs")->capture_default_str();
  app.add_option("--min-agreement", o.min_agreement, "exit 1 when the agreement is below this share")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  app.add_option("--batch", o.batch, "images per classifier call")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--threads", o.threads, "CPU threads (0 = all CPUs)")->capture_default_str();
  app.add_flag("--throughput", o.throughput, "time the second classifier instead (images per second)");
  app.add_option("--images", o.images, "--throughput: images timed")->check(CLI::PositiveNumber)->capture_default_str();
  return fairdiff::tools::run_tool("fairdiff-clip-agreement", app, argc, argv, [&] { return run(o); });
}
