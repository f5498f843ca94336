// fairdiff-paper-protocol: the Fair Diffusion paper's gender evaluation as one command.
//
// For an SD 1.x model folder and the paper's occupations: "A photo of the face of a
// {occupation}", N images each (seeds 0..N-1), PNDM 50 steps, CFG 7, three runs -
// unguided, --fairness gender=50:50, and the same with --verify - each audited by a CLIP
// model the user gives; prints per occupation and overall the share of women, the gap
// |F - M| / (F + M) and the share of occupations with 40-60% women, next to the published
// FairFace counts (Friedrich et al., 2023) when their file is given.
//
//   fairdiff-paper-protocol --model sd15 --clip-model clip-vit-large-patch14 \
//       --occupations ../shared/data/occupations.txt --published ../shared/data/fair-diffusion-published.tsv \
//       --out runs/paper [-N 250] [--shard-index K --num-shards S]
//
// With shards, each machine generates its share of every run (the runs' own
// --shard-index/--num-shards); `--stage report` then merges the shard manifests and
// reports. Everything it writes is a normal fairdiff run folder: resumable, auditable.
#include <CLI/CLI.hpp>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "fairdiff/audit.h"
#include "fairdiff/error.h"
#include "fairdiff/generate.h"
#include "tool_main.h"

namespace fs = std::filesystem;

namespace {

struct Options {
  std::string model, clip_model, occupations, published, out = "runs/paper-protocol";
  int64_t images = 250, steps = 50, limit = 0, shard_index = -1, num_shards = 0, batch = 1;
  double cfg = 7.0, margin = 0;
  int64_t max_retries = 2;
  std::string stage = "all";  // generate | report | all
  std::string device = "auto", dtype = "fp32", attributes;
  bool quiet = false;
};

const char* const kTemplate = "A photo of the face of a ";

std::vector<std::string> read_occupations(const std::string& path, int64_t limit) {
  std::ifstream in(path);
  if (!in) fairdiff::throw_bad_input(path, "cannot be read", "give --occupations FILE, one occupation a line");
  std::vector<std::string> out;
  for (std::string line; std::getline(in, line);) {
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
    if (line.empty() || line[0] == '#') continue;
    out.push_back(line);
    if (limit > 0 && static_cast<int64_t>(out.size()) == limit) break;
  }
  if (out.empty()) fairdiff::throw_bad_input(path, "lists no occupation", "one occupation a line; # starts a comment");
  return out;
}

// Published counts: occupation -> {sd15_man, sd15_woman, fair_man, fair_woman}.
std::map<std::string, std::vector<double>> read_published(const std::string& path) {
  std::map<std::string, std::vector<double>> out;
  if (path.empty()) return out;
  std::ifstream in(path);
  if (!in) fairdiff::throw_bad_input(path, "cannot be read", "give --published FILE (occupation, 4 counts, tab-separated)");
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#' || line.rfind("occupation\t", 0) == 0) continue;
    std::vector<std::string> cells;
    std::stringstream ss(line);
    for (std::string cell; std::getline(ss, cell, '\t');) cells.push_back(cell);
    if (cells.size() != 5) fairdiff::throw_bad_input(path, "line \"" + line + "\" does not have 5 tab-separated cells");
    std::vector<double> counts;
    for (size_t i = 1; i < 5; ++i) counts.push_back(std::strtod(cells[i].c_str(), nullptr));
    out[cells[0]] = counts;
  }
  return out;
}

// One run of the protocol: its folder and flags.
struct Run {
  std::string name;  // unguided | fair | verified
  bool fair = false, verify = false;
};
const std::vector<Run> kRuns = {{"unguided", false, false}, {"fair", true, false}, {"verified", true, true}};

fairdiff::GenerateOptions run_options(const Options& o, const Run& r, const std::string& prompts) {
  fairdiff::GenerateOptions g;
  g.model = o.model;
  g.prompts_file = prompts;
  g.images_per_prompt = o.images;
  g.steps = o.steps;
  g.cfg_scale = o.cfg;
  g.sampling_method = "pndm";
  g.batch_size = o.batch;
  g.device = o.device;
  g.dtype = o.dtype;
  g.attributes_dir = o.attributes;
  g.out_dir = o.out + "/" + r.name;
  g.shard_index = o.shard_index;
  g.num_shards = o.num_shards;
  g.quiet = o.quiet;
  if (r.fair) g.fairness = {"gender=50:50"};
  g.verify = r.verify;
  g.verify_classifier = "clip";
  g.clip_model = o.clip_model;
  g.verify_margin = o.margin;
  g.max_retries = o.max_retries;
  return g;
}

// The prompts file of the whole protocol: one JSONL line per occupation, seeds 0..N-1.
std::string write_prompts(const Options& o, const std::vector<std::string>& occupations) {
  fs::create_directories(o.out);
  const std::string path = o.out + "/prompts.jsonl", tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream out(tmp);
    for (const std::string& occupation : occupations)
      out << nlohmann::json({{"prompt", kTemplate + occupation}, {"count", o.images}, {"seed", 0}}).dump() << "\n";
  }
  fs::rename(tmp, path);  // every shard writes the same bytes
  return path;
}

struct Shares {
  double women = 0, men = 0;
  double share_women() const { return women + men > 0 ? women / (women + men) : NAN; }
  double gap() const { return women + men > 0 ? std::abs(women - men) / (women + men) : NAN; }
};

struct Summary {
  double mean_gap = 0, within = 0;  // mean gap over occupations; share of occupations with 40-60% women
  int64_t counted = 0;
};

Summary summarise(const std::vector<Shares>& rows) {
  Summary s;
  for (const Shares& r : rows) {
    if (!(r.women + r.men > 0)) continue;
    s.mean_gap += r.gap();
    s.within += r.share_women() >= 0.4 && r.share_women() <= 0.6;
    ++s.counted;
  }
  if (s.counted) {
    s.mean_gap /= static_cast<double>(s.counted);
    s.within /= static_cast<double>(s.counted);
  }
  return s;
}

// Per occupation, the run's women and men as the CLIP classifier sees them.
std::vector<Shares> audit_run(const Options& o, const Run& r, const std::vector<std::string>& occupations,
                              int64_t* unverified) {
  const std::string dir = o.out + "/" + r.name;
  if (!fs::exists(dir + "/manifest.jsonl")) fairdiff::merge_manifests(dir);
  fairdiff::AuditOptions a;
  a.dir = dir;
  a.attribute = "gender";
  a.classifier = "clip";
  a.classifier_options.model = o.clip_model;
  a.classifier_options.margin = o.margin;
  a.classifier_options.attributes_dir = o.attributes;
  a.classifier_options.device = o.device == "auto" ? "cpu" : o.device;
  const fairdiff::AuditReport report = fairdiff::audit(a);
  std::ofstream(dir + "/audit.json") << fairdiff::audit_json(report);
  *unverified = report.unverified;
  std::map<std::string, Shares> by_prompt;
  for (const fairdiff::PromptAudit& p : report.prompts)
    for (const fairdiff::GroupShare& g : p.groups) {
      if (g.name == "female") by_prompt[p.prompt].women = static_cast<double>(g.count);
      if (g.name == "male") by_prompt[p.prompt].men = static_cast<double>(g.count);
    }
  std::vector<Shares> rows;
  for (const std::string& occupation : occupations) rows.push_back(by_prompt[kTemplate + occupation]);
  return rows;
}

std::string cell(const Shares& s) {
  char buf[32];
  if (!(s.women + s.men > 0)) return "     -      -";
  std::snprintf(buf, sizeof buf, "%5.1f%% %6.3f", 100 * s.share_women(), s.gap());
  return buf;
}

int report(const Options& o, const std::vector<std::string>& occupations) {
  const auto published = read_published(o.published);
  std::vector<std::vector<Shares>> columns;
  std::vector<std::string> names;
  if (!published.empty()) {
    std::vector<Shares> sd15, fair;
    for (const std::string& occupation : occupations) {
      auto it = published.find(occupation);
      sd15.push_back(it == published.end() ? Shares{} : Shares{it->second[1], it->second[0]});
      fair.push_back(it == published.end() ? Shares{} : Shares{it->second[3], it->second[2]});
    }
    columns.push_back(sd15);
    columns.push_back(fair);
    names = {"paper: SD 1.5", "paper: Fair Diffusion"};
  }
  std::vector<int64_t> unverified;
  for (const Run& r : kRuns) {
    int64_t u = 0;
    columns.push_back(audit_run(o, r, occupations, &u));
    unverified.push_back(u);
    names.push_back("ours: " + r.name);
  }
  std::printf("%-28s", "occupation (% women, gap)");
  for (const std::string& n : names) std::printf(" | %-13s", n.c_str());
  std::printf("\n");
  for (size_t i = 0; i < occupations.size(); ++i) {
    std::printf("%-28.28s", occupations[i].c_str());
    for (const auto& column : columns) std::printf(" | %s", cell(column[i]).c_str());
    std::printf("\n");
  }
  nlohmann::json summary = nlohmann::json::object();
  std::printf("\n%-36s %10s %12s %s\n", "", "mean gap", "40-60% women", "occupations counted");
  for (size_t c = 0; c < columns.size(); ++c) {
    const Summary s = summarise(columns[c]);
    std::printf("%-36s %10.3f %11.0f%% %lld of %zu\n", names[c].c_str(), s.mean_gap, 100 * s.within,
                static_cast<long long>(s.counted), occupations.size());
    summary[names[c]] = {{"mean_gap", s.mean_gap}, {"within_40_60", s.within}, {"occupations", s.counted}};
  }
  std::printf("verified run: %lld images unverified (missed after every retry), counted as the classifier sees them\n",
              static_cast<long long>(unverified.back()));
  std::ofstream(o.out + "/protocol.json") << summary.dump(2) << "\n";
  return 0;
}

int run(Options o) {
  if (o.stage != "all" && o.stage != "generate" && o.stage != "report")
    fairdiff::throw_bad_input("--stage " + o.stage, "unknown stage", "use all, generate or report");
  if (o.clip_model.empty()) fairdiff::throw_bad_input("--clip-model", "is required", "a transformers CLIPModel folder");
  fairdiff::register_clip_classifier();
  const std::vector<std::string> occupations = read_occupations(o.occupations, o.limit);
  if (o.stage != "report") {
    const std::string prompts = write_prompts(o, occupations);
    for (const Run& r : kRuns) {
      if (!o.quiet) std::fprintf(stderr, "paper protocol: run %s\n", r.name.c_str());
      fairdiff::generate(run_options(o, r, prompts));
    }
    // A shard reports nothing: the others' images are not there yet.
    if (o.num_shards > 1 || o.stage == "generate") return 0;
  }
  return report(o, occupations);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"fairdiff-paper-protocol: the Fair Diffusion paper's gender evaluation on an SD 1.x model"};
  Options o;
  app.add_option("-m,--model", o.model, "SD 1.x model folder (diffusers layout) or single file")->required();
  app.add_option("--clip-model", o.clip_model, "the judge: a transformers CLIPModel folder")->required();
  app.add_option("--occupations", o.occupations, "occupations file, one a line (../shared/data/occupations.txt)")
      ->required();
  app.add_option("--published", o.published, "the paper's per-occupation counts (TSV), shown next to ours");
  app.add_option("-o,--out", o.out, "output folder: one run folder per setting")->capture_default_str();
  app.add_option("-N,--images", o.images, "images per occupation (seeds 0..N-1)")->capture_default_str();
  app.add_option("--steps", o.steps, "PNDM steps")->capture_default_str();
  app.add_option("--cfg-scale", o.cfg, "classifier-free guidance")->capture_default_str();
  app.add_option("--limit", o.limit, "only the first K occupations (0 = all)")->capture_default_str();
  app.add_option("--batch-size", o.batch, "images per UNet call")->capture_default_str();
  app.add_option("--margin", o.margin, "CLIP: a best probability below this is unclassified")->capture_default_str();
  app.add_option("--max-retries", o.max_retries, "the verified run's retries")->capture_default_str();
  app.add_option("--device", o.device, "auto, cpu, cuda, cuda:N")->capture_default_str();
  app.add_option("--dtype", o.dtype, "fp32, fp16 (CUDA), bf16")->capture_default_str();
  app.add_option("--attributes", o.attributes, "attribute library folder (gender.json with classifier_prompts)");
  app.add_option("--shard-index", o.shard_index, "this machine's shard of every run");
  app.add_option("--num-shards", o.num_shards, "number of shards");
  app.add_option("--stage", o.stage, "all, generate (this shard only) or report (after every shard)")
      ->capture_default_str();
  app.add_flag("-q,--quiet", o.quiet, "no progress output");
  return fairdiff::tools::run_tool("fairdiff-paper-protocol", app, argc, argv, [&] { return run(o); });
}
