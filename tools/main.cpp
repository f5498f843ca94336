// fairdiff: the command line. Thin by design: flags -> library call -> exit code.
//
// Exit codes: 0 success, 1 failure during the run, 2 bad usage or input
// (checked before any model is loaded or any file is written).
#include <spdlog/cfg/env.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "fairdiff/audit.h"
#include "fairdiff/error.h"
#include "fairdiff/generate.h"
#include "fairdiff/inspect.h"
#include "fairdiff/model.h"

namespace {

int inspect(const std::string& path) {
  const std::string ext = std::filesystem::path(path).extension().string();
  if (ext == ".ckpt" || ext == ".pt" || ext == ".bin")
    fairdiff::throw_unsupported(path, "PyTorch pickle files are never loaded: unpickling can execute code",
                                "use the model's .safetensors file");
  if (ext == ".safetensors") {
    const std::vector<fairdiff::TensorSummary> tensors = fairdiff::inspect_safetensors(path);
    int64_t params = 0;
    for (const auto& t : tensors) {
      std::string shape;
      for (int64_t d : t.shape) shape += (shape.empty() ? "" : ",") + std::to_string(d);
      std::printf("%-70s %-4s [%s]\n", t.name.c_str(), t.dtype.c_str(), shape.c_str());
      params += t.numel;
    }
    std::printf("%zu tensors, %lld values\n", tensors.size(), static_cast<long long>(params));
    return 0;
  }
  const fairdiff::ModelSummary s = fairdiff::inspect_model(path);
  std::printf("%s (%s)\n", s.dir.c_str(), s.class_name.c_str());
  for (const auto& c : s.components) {
    std::printf("  %-13s %-22s", c.name.c_str(), c.class_name.c_str());
    if (c.tensors) std::printf(" %5lld tensors %12lld parameters", static_cast<long long>(c.tensors),
                               static_cast<long long>(c.parameters));
    if (!c.detail.empty()) std::printf(" %s", c.detail.c_str());
    std::printf("\n");
  }
  return 0;
}

struct AuditFlags {
  fairdiff::AuditOptions options;
  bool json = false;
};

void add_audit_flags(CLI::App* cmd, AuditFlags& f) {
  std::string classifiers;
  for (const auto& name : fairdiff::classifier_names()) classifiers += (classifiers.empty() ? "" : ", ") + name;
  cmd->add_option("dir", f.options.dir, "the --out folder of a generate run")->required();
  cmd->add_option("--attribute", f.options.attribute, "the attribute to audit (default: the one the run assigns)");
  cmd->add_option("--classifier", f.options.classifier, "how images are put into groups: " + classifiers)->capture_default_str();
  cmd->add_flag("--json", f.json, "print the report as JSON (schema in include/fairdiff/audit.h)");
  cmd->add_option("--clip-model", f.options.classifier_options.model,
                  "--classifier clip: a transformers CLIPModel folder (e.g. models/toy-clip, openai/clip-vit-large-patch14)");
  cmd->add_option("--margin", f.options.classifier_options.margin,
                  "--classifier clip: an image whose best group probability is below this stays unclassified")
      ->capture_default_str();
  cmd->add_option("--device", f.options.classifier_options.device, "where a network classifier runs: cpu, cuda, cuda:N")
      ->capture_default_str();
  cmd->add_option("--attributes", f.options.classifier_options.attributes_dir,
                  "attribute library folder (class prompts; default: share/fairdiff/configs/attributes)");
  cmd->add_option("--chart", f.options.chart_path, "bar chart PNG (default: DIR/audit-chart.png)");
  cmd->add_option("--sheet", f.options.sheet_path, "contact sheet PNG (default: DIR/audit-sheet.png)");
}

int run_audit(const AuditFlags& f) {
  const fairdiff::AuditReport report = fairdiff::audit(f.options);
  std::fputs((f.json ? fairdiff::audit_json(report) : fairdiff::audit_text(report)).c_str(), stdout);
  return 0;
}

void add_generate_flags(CLI::App* cmd, fairdiff::GenerateOptions& o, int& threads) {
  // Spellings follow stable-diffusion.cpp where the meaning is the same.
  cmd->add_option("-m,--model", o.model,
                  "diffusers model folder or single-file .safetensors checkpoint (default: $FAIRDIFF_MODEL, else "
                  "the toy model shipped in share/fairdiff/models/toy)");
  cmd->add_option("--tokenizer", o.tokenizer_dir, "tokenizer/ folder for a single-file checkpoint");
  cmd->add_option("--prediction-type", o.prediction_type, "single-file SD 2.x: epsilon (512-base) or v_prediction");
  cmd->add_option("-p,--prompt", o.prompt, "the prompt");
  cmd->add_option("-n,--negative-prompt", o.negative_prompt,
                  "the negative prompt (SDXL: none gives zero embeddings, -n \"\" encodes the empty text)")
      ->each([&o](const std::string& v) { o.encode_empty_negative = v.empty(); });
  cmd->add_option("--prompts", o.prompts_file, "file: one prompt per line, or JSONL {prompt, negative_prompt, count, seed, steps, cfg_scale, width, height}");
  cmd->add_option("-N,--images", o.images_per_prompt, "images per prompt")->capture_default_str();
  cmd->add_option("--batch-size", o.batch_size, "images per UNet call (does not change the images)")->capture_default_str();
  cmd->add_option("--steps", o.steps, "denoising steps")->capture_default_str();
  cmd->add_option("--cfg-scale", o.cfg_scale, "classifier-free guidance scale")->capture_default_str();
  cmd->add_option("--sampling-method", o.sampling_method, "pndm, ddim, euler, euler_a, dpm++2m, lms (default: the model's scheduler)");
  cmd->add_option("--scheduler", o.scheduler, "discrete or karras (with euler, dpm++2m, lms)");
  cmd->add_option("-W,--width", o.width, "image width, a multiple of 8 (default: the model's size)");
  cmd->add_option("-H,--height", o.height, "image height, a multiple of 8 (default: the model's size)");
  cmd->add_option("-s,--seed", o.seed, "seed of image 0; image i uses seed+i; -1 = random (recorded)")->capture_default_str();
  cmd->add_option("--clip-skip", o.clip_skip, "text encoder layers to skip from the end (diffusers' clip_skip)");
  cmd->add_option("--original-size", o.original_size, "SDXL: WxH conditioned on as the original image size (default: -W x -H)");
  cmd->add_option("--crop-top-left", o.crop_top_left, "SDXL: TOP,LEFT crop offset conditioned on (diffusers' crops_coords_top_left; default 0,0)");
  cmd->add_option("--target-size", o.target_size, "SDXL: WxH conditioned on as the target size (default: -W x -H)");
  cmd->add_option("--dtype", o.dtype, "auto (bf16 on a CPU with native bfloat16, else fp32), fp32, fp16 (CUDA) or bf16")->capture_default_str();
  cmd->add_option("--device", o.device, "auto, cpu, cuda or cuda:N")->capture_default_str();
  cmd->add_option("-o,--out", o.out_dir, "output folder (PNGs + manifest.jsonl)")->capture_default_str();
  cmd->add_option("--shard-index", o.shard_index, "this shard (0-based); default from SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX or RANK");
  cmd->add_option("--num-shards", o.num_shards, "number of shards; default from SLURM_ARRAY_TASK_COUNT, FAIRDIFF_NUM_SHARDS or WORLD_SIZE");
  cmd->add_option("--threads", threads, "CPU threads (0 = all cores)");
  cmd->add_flag("--prepack-weights", o.prepack_weights,
                "CPU: reorder convolution weights once into oneDNN's layout at load (faster steps, a few "
                "seconds more to load)");
  cmd->add_flag("--no-weights-cache{false}", o.weights_cache,
                "CPU: neither read nor keep weights converted at load (bf16 from float32 files) in the weights "
                "cache (~/.cache/fairdiff/weights; FAIRDIFF_WEIGHTS_CACHE_GB caps it, default 16)");
  cmd->add_flag("--fp16-weights", o.fp16_weights,
                "CPU: keep the linear and convolution weights in float16, converted to float32 per layer as it "
                "runs (half the memory, slower steps; runs with --dtype fp32)");
  cmd->add_flag("--vae-tiling{-1}", o.vae_tile,
                "decode in overlapping tiles (diffusers' enable_tiling) for images larger than the VAE's "
                "sample_size; --vae-tiling=PX sets the tile in pixels");
  cmd->add_option("--fairness", o.fairness,
                  "ATTRIBUTE=RATIOS, repeatable: steer each image toward an assigned group (gender=50:50, gender=female:30,male:70)")
      ->allow_extra_args(false);
  cmd->add_option("--fairness-file", o.fairness_file, "JSON {\"attributes\": [{\"name\", \"targets\", edit overrides}]}");
  cmd->add_option("--attributes", o.attributes_dir, "attribute library folder (default: share/fairdiff/configs/attributes beside the binary or in the install prefix)");
  cmd->add_option("--assignment", o.assignment, "quota (exact counts per prompt, shuffled) or random (independent draws)")
      ->capture_default_str();
  cmd->add_option("--fairness-mode", o.fairness_mode,
                  "exact (assigned group forward, the others reversed: 2 + groups UNet rows per image) or fast "
                  "(assigned group only: 3 rows)")
      ->capture_default_str();
  cmd->add_flag("--verify", o.verify,
                "with --fairness: classify every image for its assigned groups and remake the ones that missed "
                "(up to --max-retries times); what was seen and kept is recorded per image");
  cmd->add_option("--verify-classifier", o.verify_classifier, "the verifier: clip (with --clip-model) or hue (the toy world)")
      ->capture_default_str();
  cmd->add_option("--clip-model", o.clip_model, "the verifier's transformers CLIPModel folder (e.g. models/toy-clip)");
  cmd->add_option("--verify-margin", o.verify_margin,
                  "a best-group probability below this counts as unclassified (a miss)")->capture_default_str();
  cmd->add_option("--max-retries", o.max_retries, "extra attempts for an image that missed its groups")->capture_default_str();
  cmd->add_option("--retry-edit-scale", o.retry_edit_scale, "retry k multiplies every edit scale by this to the k-th power")
      ->capture_default_str();
  cmd->add_option("--retry-warmup", o.retry_warmup, "retry k multiplies every edit's warm-up by this to the k-th power")
      ->capture_default_str();
  cmd->add_option("--retry-reach", o.retry_reach,
                  "retry k multiplies the share of positions an edit keeps (1 - threshold) by this to the k-th power")
      ->capture_default_str();
  cmd->add_option("--retry-seed", o.retry_seed_mode, "new (a seed derived from the image's seed and the attempt) or same")
      ->capture_default_str();
  cmd->add_flag("-q,--quiet", o.quiet, "no progress output");
}

}  // namespace

// The default OMP_WAIT_POLICY=PASSIVE comes from tools/omp_passive_default.cpp, linked in.
int main(int argc, char** argv) {
  fairdiff::register_clip_classifier();
  CLI::App app{"fairdiff: fair text-to-image generation with Stable Diffusion"};
  app.require_subcommand(1);
  // For scripts that record which fairdiff made a run; stdout, exit 0.
  app.set_version_flag("--version", "fairdiff " FAIRDIFF_VERSION);
  std::string inspect_path, merge_dir;
  fairdiff::GenerateOptions gen;
  int threads = 0;
  auto* generate_cmd = app.add_subcommand("generate", "generate images (PNG + manifest.jsonl)");
  add_generate_flags(generate_cmd, gen, threads);
  auto* merge_cmd = app.add_subcommand("merge", "join the shard manifests of an output folder into manifest.jsonl");
  merge_cmd->add_option("dir", merge_dir, "the --out folder of the shards")->required();
  auto* inspect_cmd = app.add_subcommand("inspect", "validate and describe a model folder or a .safetensors file");
  inspect_cmd->add_option("path", inspect_path, "model folder (diffusers layout) or .safetensors file")->required();
  AuditFlags audit_flags;
  auto* audit_cmd = app.add_subcommand("audit", "classify a run's images and compare the group shares with its fairness targets");
  add_audit_flags(audit_cmd, audit_flags);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help of a subcommand, --version
    // A usage error is one line too.
    std::fprintf(stderr, "fairdiff: error: %s (run fairdiff --help)\n", e.what());
    return 2;
  }
  spdlog::set_pattern("%v");
  spdlog::cfg::load_env_levels();  // SPDLOG_LEVEL=debug: timings for scripts/bench
  try {
    if (*inspect_cmd) return inspect(inspect_path);
    if (*merge_cmd) {
      const int64_t n = fairdiff::merge_manifests(merge_dir);
      std::printf("%lld images in %s/manifest.jsonl\n", static_cast<long long>(n), merge_dir.c_str());
      return 0;
    }
    if (*audit_cmd) return run_audit(audit_flags);
    if (*generate_cmd) {
      if (gen.model.empty()) gen.model = fairdiff::default_model();
      fairdiff::configure_process(threads);
      const fairdiff::RunSummary s = fairdiff::generate(gen);
      if (!gen.quiet) {
        std::string verify;
        if (gen.verify)
          verify = ", " + std::to_string(s.verified) + " verified, " + std::to_string(s.unverified) +
                   " unverified (missed after every retry), " + std::to_string(s.retries) + " retries";
        spdlog::info("{} images: {} generated, {} already done{}; manifest {}", s.planned, s.generated, s.skipped,
                     verify, s.manifest_path);
      }
      return 0;
    }
  } catch (const fairdiff::Error& e) {
    std::fprintf(stderr, "fairdiff: error: %s\n", e.what());
    return fairdiff::exit_code(e.kind());
  } catch (const std::exception& e) {
    // One line: LibTorch's errors (c10::Error) carry a backtrace after the first.
    const std::string what = e.what();
    std::fprintf(stderr, "fairdiff: error: %s\n", what.substr(0, what.find('\n')).c_str());
    return 1;
  }
  return 0;
}
