#!/usr/bin/env bash
# Each bad input: `fairdiff` exits non-zero with exactly one line on stderr that
# names the file and the problem.
set -u
fairdiff=$1 source_dir=$2
fixtures=${FAIRDIFF_FIXTURES:-$source_dir/../shared/fixtures}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0 passes=0

# expect NAME EXIT_CODE NEEDLE -- COMMAND...
expect() {
  local name=$1 code=$2 needle=$3
  shift 4
  "$@" >"$tmp/out" 2>"$tmp/err"
  local rc=$? lines
  lines=$(wc -l <"$tmp/err")
  if [ "$rc" -eq "$code" ] && [ "$lines" -eq 1 ] && grep -qF -- "$needle" "$tmp/err"; then
    passes=$((passes + 1)); echo "ok   $name: $(cat "$tmp/err")"
  else
    failures=$((failures + 1)); echo "FAIL $name: exit $rc (want $code), $lines stderr lines, want '$needle':"; cat "$tmp/err"
  fi
}

# header length (8 bytes little-endian) followed by a header and data
raw() { python3 - "$@" <<'PY'
import sys, struct
path, header, data_len = sys.argv[1], sys.argv[2], int(sys.argv[3])
length = int(sys.argv[4]) if len(sys.argv) > 4 else len(header)
open(path, "wb").write(struct.pack("<Q", length) + header.encode() + b"\0" * data_len)
PY
}

printf 'abc' >"$tmp/truncated.safetensors"
expect truncated 2 "truncated.safetensors: file has 3 bytes" -- "$fairdiff" inspect "$tmp/truncated.safetensors"
raw "$tmp/hlen.safetensors" '{}' 0 999
expect header_past_eof 2 "header length 999 runs past the end" -- "$fairdiff" inspect "$tmp/hlen.safetensors"
raw "$tmp/range.safetensors" '{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}' 8
expect offsets_out_of_range 2 "lie outside the 8-byte data section" -- "$fairdiff" inspect "$tmp/range.safetensors"
raw "$tmp/overlap.safetensors" '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}' 12
expect offsets_overlap 2 "overlaps" -- "$fairdiff" inspect "$tmp/overlap.safetensors"
raw "$tmp/dtype.safetensors" '{"w":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}' 8
expect unknown_dtype 2 'dtype "C64"' -- "$fairdiff" inspect "$tmp/dtype.safetensors"
raw "$tmp/json.safetensors" '{"w": nope}' 0
expect invalid_header_json 2 "not a well-formed JSON" -- "$fairdiff" inspect "$tmp/json.safetensors"
printf 'x' >"$tmp/model.ckpt"
expect pickle 2 "can execute code" -- "$fairdiff" inspect "$tmp/model.ckpt"
expect missing_model 2 "model folder not found" -- "$fairdiff" inspect "$tmp/no-such-model"
mkdir "$tmp/empty-run"
expect audit_missing_dir 2 "run folder not found" -- "$fairdiff" audit "$tmp/no-such-run"
expect audit_no_manifest 2 "has no manifest.jsonl" -- "$fairdiff" audit "$tmp/empty-run"
expect audit_classifier 2 "unknown classifier (available: hue)" -- "$fairdiff" audit "$tmp/empty-run" --classifier clip

if [ -d "$fixtures/models/tiny-sd1" ]; then
  # A model folder of symlinks, with one part broken at a time.
  model() {
    rm -rf "$tmp/m"; mkdir "$tmp/m"
    for c in "$fixtures"/models/tiny-sd1/*; do
      if [ -d "$c" ]; then mkdir "$tmp/m/$(basename "$c")"; ln -s "$c"/* "$tmp/m/$(basename "$c")/"; else ln -s "$c" "$tmp/m/"; fi
    done
  }
  model; rm -rf "$tmp/m/vae"
  expect missing_component 2 "component folder vae/ is missing" -- "$fairdiff" inspect "$tmp/m"
  model; rm "$tmp/m/unet/config.json"; printf '{"in_channels": 4,' >"$tmp/m/unet/config.json"
  expect invalid_config_json 2 "unet/config.json: is not valid JSON" -- "$fairdiff" inspect "$tmp/m"
  model; rm "$tmp/m/unet/config.json"; sed 's/"resnet_time_scale_shift": "default"/"resnet_time_scale_shift": "scale_shift"/' \
    "$fixtures/models/tiny-sd1/unet/config.json" >"$tmp/m/unet/config.json"
  expect unsupported_config 2 "resnet_time_scale_shift" -- "$fairdiff" inspect "$tmp/m"
  model; rm "$tmp/m/model_index.json"; sed 's/"StableDiffusionPipeline"/"StableDiffusionXLPipeline"/' \
    "$fixtures/models/tiny-sd1/model_index.json" >"$tmp/m/model_index.json"
  expect sdxl_rejected 2 "SDXL is not supported yet" -- "$fairdiff" inspect "$tmp/m"
  model
  if "$fairdiff" inspect "$tmp/m" >"$tmp/out" 2>&1 && grep -q "UNet2DConditionModel" "$tmp/out"; then
    passes=$((passes + 1)); echo "ok   inspect tiny-sd1"
  else
    failures=$((failures + 1)); echo "FAIL inspect tiny-sd1:"; cat "$tmp/out"
  fi

  # generate: each bad input is one line, exit 2, and nothing written (no output folder).
  gen() { "$fairdiff" generate -m "$fixtures/models/tiny-sd1" -p "a cat" --device cpu -q "$@"; }
  nothing_written() {
    local name=$1
    expect "$@"
    if [ -e "$tmp/never" ]; then failures=$((failures + 1)); echo "FAIL $name: wrote $tmp/never"; rm -rf "$tmp/never"; fi
  }
  nothing_written gen_sampler 2 'unknown sampler "heun2"' -- gen --sampling-method heun2 -o "$tmp/never"
  nothing_written gen_karras 2 "karras sigmas are available" -- gen --sampling-method ddim --scheduler karras -o "$tmp/never"
  nothing_written gen_size 2 "width 100 is not a positive multiple of 8" -- gen -W 100 -o "$tmp/never"
  nothing_written gen_steps 2 "--steps: 0 is less than 1" -- gen --steps 0 -o "$tmp/never"
  nothing_written gen_vae_tile 2 "--vae-tiling: tile of 12 pixels" -- gen --vae-tiling=12 -o "$tmp/never"
  nothing_written gen_missing_model 2 "model not found" -- "$fairdiff" generate -m "$tmp/nomodel" -p x -o "$tmp/never"
  model; rm "$tmp/m/unet/config.json"; printf '{"in_channels": 4,' >"$tmp/m/unet/config.json"
  nothing_written gen_corrupt_model 2 "unet/config.json: is not valid JSON" -- "$fairdiff" generate -m "$tmp/m" -p x --device cpu -o "$tmp/never"
  nothing_written gen_prompts_file 2 "prompts file not found" -- "$fairdiff" generate -m "$fixtures/models/tiny-sd1" --prompts "$tmp/none.txt" -o "$tmp/never"
  printf 'a cat\n{"prompt": "a dog", "count": "two"}\n' >"$tmp/bad.jsonl"
  nothing_written gen_jsonl 2 "bad.jsonl:2: a value has the wrong type" -- "$fairdiff" generate -m "$fixtures/models/tiny-sd1" --prompts "$tmp/bad.jsonl" -o "$tmp/never"
  nothing_written gen_shard 2 "shard index 2 is not in [0, 2)" -- gen --shard-index 2 --num-shards 2 -o "$tmp/never"
  printf 'x' >"$tmp/afile"
  expect gen_out_not_dir 2 "output folder is not a writable folder" -- gen -o "$tmp/afile"
  nothing_written gen_usage 2 "run fairdiff --help" -- gen --no-such-flag -o "$tmp/never"
  nothing_written gen_fp16_cpu 2 "fp16 needs a CUDA device" -- gen --dtype fp16 -o "$tmp/never"
  nothing_written gen_fairness_attribute 2 'unknown attribute "age"' -- gen --fairness age=50:50 -o "$tmp/never"
  nothing_written gen_fairness_ratio 2 'ratio "abc" is not a number' -- gen --fairness gender=50:abc -o "$tmp/never"
  nothing_written gen_fairness_groups 2 "more ratios than groups" -- gen --fairness gender=1:2:3 -o "$tmp/never"
  nothing_written gen_fairness_zero 2 "all ratios are zero" -- gen --fairness gender=female:0,male:0 -o "$tmp/never"
  printf '{"attributes": [{"name": "gender", "targets": {"female": 30, "male": 70}}],
    "joint": {"attributes": ["gender", "colour"], "targets": {"female,red": 1, "male,blue": 1}}}' >"$tmp/contradict.json"
  nothing_written gen_fairness_joint_contradiction 2 "joint targets contradict the marginal targets of gender" -- \
    gen --fairness-file "$tmp/contradict.json" -o "$tmp/never"
  printf '{"joint": {"attributes": ["gender", "colour"], "targets": {"female,purple": 1}}}' >"$tmp/purple.json"
  nothing_written gen_fairness_joint_group 2 'unknown group "purple" of attribute "colour"' -- \
    gen --fairness-file "$tmp/purple.json" -o "$tmp/never"
  model; rm "$tmp/m/model_index.json"
  python3 -c 'import json, sys; j = json.load(open(sys.argv[1])); del j["text_encoder"]; json.dump(j, open(sys.argv[2], "w"))' \
    "$fixtures/models/tiny-sd1/model_index.json" "$tmp/m/model_index.json"
  nothing_written gen_fairness_no_text_encoder 2 "needs the model's text encoder to embed the edit prompts" -- \
    "$fairdiff" generate -m "$tmp/m" -p x --device cpu --fairness gender=50:50 -o "$tmp/never"

  # Resume after a kill: kill -9 while image 1 of 6 is being made, then rerun. One thread: on a
  # busy machine more only spin (src/runtime.h), and the first image could outlast the wait.
  "$fairdiff" generate -m "$fixtures/models/tiny-sd1" -p "a cat" -N 6 --steps 30 --device cpu --threads 1 -q -o "$tmp/full" >/dev/null 2>&1
  "$fairdiff" generate -m "$fixtures/models/tiny-sd1" -p "a cat" -N 6 --steps 30 --device cpu --threads 1 -q -o "$tmp/killed" >/dev/null 2>&1 &
  pid=$!
  for _ in $(seq 1 1200); do [ -f "$tmp/killed/manifest.jsonl" ] && break; sleep 0.05; done
  kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  done_before=$(cat "$tmp/killed/manifest.jsonl" 2>/dev/null | wc -l)
  "$fairdiff" generate -m "$fixtures/models/tiny-sd1" -p "a cat" -N 6 --steps 30 --device cpu --threads 1 -q -o "$tmp/killed" >/dev/null 2>&1
  if [ "$(wc -l <"$tmp/killed/manifest.jsonl")" -eq 6 ] && [ "$done_before" -ge 1 ] && [ "$done_before" -lt 6 ] &&
     diff <(cd "$tmp/full" && md5sum *.png) <(cd "$tmp/killed" && md5sum *.png) >/dev/null &&
     [ -z "$(ls "$tmp/killed" | grep '\.tmp\.')" ]; then
    passes=$((passes + 1)); echo "ok   resume after kill -9 ($done_before of 6 done before the kill)"
  else
    failures=$((failures + 1)); echo "FAIL resume after kill -9 ($done_before done before the kill)"; ls -la "$tmp/killed"
  fi
else
  echo "note: fixtures not found at $fixtures; model-folder cases skipped"
fi
echo "$passes passed, $failures failed"
[ "$failures" -eq 0 ]
