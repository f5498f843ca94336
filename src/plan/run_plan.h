// Pieces of `fairdiff generate` shared between the torch-free planner
// (run_plan.cpp) and the sampling side (generate.cpp).
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "fairdiff/generate.h"
#include "fairness.h"
#include "scheduler_table.h"  // sampling_methods, scheduler_override

namespace fairdiff {

// Manifest lines by image index; unparsable (torn) lines, and lines without an integer
// "index" and a string "file", are skipped.
std::map<int64_t, nlohmann::json> read_manifest(const std::string& path);

// Resume's repair of an interrupted append (generate calls it holding the manifest's lock):
// every line that is not a JSON object, above all a torn last line (killed or out of disk
// inside the append), is appended to PATH.torn and cut out of the manifest, so that its
// image is redone and the audit reads the folder again. A last line that is a whole record
// and lacks only its newline gets the newline. The common case, a torn tail, is a truncate
// (it needs no free space); a bad line inside is a rewrite (write_file_atomic with `owner`).
// Returns how many lines it moved aside.
int64_t repair_manifest(const std::string& path, const std::string& owner);

// The lock file of one manifest, PATH.lock (core's FileLock): generate holds it for its
// whole run, merge while it writes manifest.jsonl.
std::string manifest_lock_path(const std::string& manifest_path);

// parse_fairness over the options' fairness part.
FairnessSpec parse_fairness(const GenerateOptions& options);

// Resume safety (run_plan.cpp): `done` holds the records already in the manifest of --out.
// Throws BadInput naming the first image whose record was made for another plan (prompt,
// seed, steps, guidance, size, assigned groups, fairness targets or --verify settings:
// `verify`, null when off, against the records' verify.settings) or that this plan
// does not have, so that a changed command never mixes two runs in one folder.
void check_resume(const std::map<int64_t, nlohmann::json>& done, const std::vector<PlannedImage>& images,
                  const FairnessSpec& spec, const std::string& manifest_path,
                  const nlohmann::json& verify = nullptr);

// With fairness on: BadInput when `model` positively has no text encoder to embed the
// edit prompts (model_index.json lists none; a .safetensors checkpoint without
// cond_stage_model.* tensors). Anything else wrong with the model is left to the loader.
void check_text_encoder(const std::string& model, const std::string& flag);

// --fp16-weights with the other options: BadInput unless CPU, float32 (auto counts) and no
// prepacking. Generate's validate and Model::load both ask.
void check_fp16_weights(const ModelOptions& o);

}  // namespace fairdiff
