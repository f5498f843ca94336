#!/usr/bin/env bash
# Every bad input, through the real CLI: `fairdiff` exits with the expected code and exactly
# one line on stderr that names the flag or file and the problem; a refused `generate`
# creates nothing in --out. One table: each row is
#
#   row NAME EXIT NEEDLE -- COMMAND...      (gen_row: the same, plus "nothing in $tmp/never")
#
# Model folders are copies of the shipped model (models/toy, found by the built binary
# without --model) with one part broken at a time; only the rows that need a CLIP BPE
# tokenizer or the SD-sized fixture model use ../shared/fixtures (skipped without it).
set -u
fairdiff=$1 source_dir=$2
source_dir=$(cd "$source_dir" && pwd)  # absolute: the model copies below are symlinks
fixtures=${FAIRDIFF_FIXTURES:-$source_dir/../shared/fixtures}
[ -d "$fixtures" ] && fixtures=$(cd "$fixtures" && pwd)
toy=$source_dir/models/toy
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0 passes=0

row() {
  local name=$1 code=$2 needle=$3
  shift 4
  "$@" >"$tmp/out" 2>"$tmp/err"
  local rc=$? lines
  lines=$(wc -l <"$tmp/err")
  if [ "$rc" -eq "$code" ] && [ "$lines" -eq 1 ] && grep -qF -- "$needle" "$tmp/err"; then
    passes=$((passes + 1)); printf 'ok   %-34s %s  %s\n' "$name" "$rc" "$(cat "$tmp/err")"
  else
    failures=$((failures + 1)); echo "FAIL $name: exit $rc (want $code), $lines stderr lines, want '$needle':"; head -c 2000 "$tmp/err"
  fi
}
gen_row() {
  local name=$1
  row "$@"
  if [ -e "$tmp/never" ]; then failures=$((failures + 1)); echo "FAIL $name: wrote $tmp/never"; rm -rf "$tmp/never"; fi
}

# header length (8 bytes little-endian) followed by a header and data
raw() { python3 - "$@" <<'PY'
import sys, struct
path, header, data_len = sys.argv[1], sys.argv[2], int(sys.argv[3])
length = int(sys.argv[4]) if len(sys.argv) > 4 else len(header)
open(path, "wb").write(struct.pack("<Q", length) + header.encode() + b"\0" * data_len)
PY
}
# edit_json FILE PYTHON-EXPRESSION-ON-j: rewrites a JSON file in place (a copy, never a link).
edit_json() { python3 - "$1" "$2" <<'PY'
import json, sys
path, expr = sys.argv[1], sys.argv[2]
j = json.load(open(path))
exec(expr)
open(path + ".new", "w").write(json.dumps(j))
PY
  rm -f "$1"; mv "$1.new" "$1"; }
# A copy of models/toy as symlinks in $tmp/m; a part to break is replaced by a real copy.
model() {
  rm -rf "$tmp/m"; mkdir "$tmp/m"
  for c in "$toy"/*; do
    if [ -d "$c" ]; then mkdir "$tmp/m/$(basename "$c")"; ln -s "$c"/* "$tmp/m/$(basename "$c")/"; else ln -s "$c" "$tmp/m/"; fi
  done
}
own() { rm "$tmp/m/$1"; cp "$toy/$1" "$tmp/m/$1"; }  # make one file of $tmp/m a real copy
# generate on the toy model (found without --model), with -p "a kite" unless a row gives a prompt
gen() {
  local a prompt=(-p "a kite")
  for a in "$@"; do case $a in -p|--prompt|--prompts) prompt=() ;; esac; done
  "$fairdiff" generate "${prompt[@]}" --device cpu --threads 1 -q "$@"
}
genm() { gen -m "$tmp/m" "$@"; }  # the same on the broken copy $tmp/m

# --- safetensors files and inspect -------------------------------------------------------
printf 'abc' >"$tmp/truncated.safetensors"
row truncated 2 "truncated.safetensors: file has 3 bytes" -- "$fairdiff" inspect "$tmp/truncated.safetensors"
raw "$tmp/hlen.safetensors" '{}' 0 999
row header_past_eof 2 "header length 999 runs past the end" -- "$fairdiff" inspect "$tmp/hlen.safetensors"
raw "$tmp/range.safetensors" '{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}' 8
row offsets_out_of_range 2 "lie outside the 8-byte data section" -- "$fairdiff" inspect "$tmp/range.safetensors"
raw "$tmp/overlap.safetensors" '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}' 12
row offsets_overlap 2 "overlaps" -- "$fairdiff" inspect "$tmp/overlap.safetensors"
raw "$tmp/dtype.safetensors" '{"w":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}' 8
row unknown_dtype 2 'dtype "C64"' -- "$fairdiff" inspect "$tmp/dtype.safetensors"
raw "$tmp/json.safetensors" '{"w": nope}' 0
row invalid_header_json 2 "not a well-formed JSON" -- "$fairdiff" inspect "$tmp/json.safetensors"
raw "$tmp/hugeshape.safetensors" '{"w":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,4]}}' 4
row safetensors_huge_shape 2 "hugeshape.safetensors" -- "$fairdiff" inspect "$tmp/hugeshape.safetensors"
printf 'x' >"$tmp/model.ckpt"
row pickle 2 "can execute code" -- "$fairdiff" inspect "$tmp/model.ckpt"
row missing_model 2 "model folder not found" -- "$fairdiff" inspect "$tmp/no-such-model"

# --- model folders: models/toy with one part broken ----------------------------------------
model; rm -rf "$tmp/m/vae"
row missing_component 2 "component folder vae/ is missing" -- "$fairdiff" inspect "$tmp/m"
model; rm "$tmp/m/unet/config.json"; printf '{"in_channels": 4,' >"$tmp/m/unet/config.json"
row invalid_config_json 2 "unet/config.json: is not valid JSON" -- "$fairdiff" inspect "$tmp/m"
model; own unet/config.json; edit_json "$tmp/m/unet/config.json" 'j["resnet_time_scale_shift"] = "scale_shift"'
row unsupported_config 2 "resnet_time_scale_shift" -- "$fairdiff" inspect "$tmp/m"
model; own model_index.json; edit_json "$tmp/m/model_index.json" 'j["_class_name"] = "StableDiffusionXLPipeline"'
row sdxl_without_text_encoder_2 2 "lists no text_encoder_2 component" -- "$fairdiff" inspect "$tmp/m"
model; own unet/config.json; edit_json "$tmp/m/unet/config.json" 'j["layers_per_block"] = 1.8446744073709552e20'
row config_float_past_int64 2 "layers_per_block = 1.844674407370955e+20 has the wrong type" -- "$fairdiff" inspect "$tmp/m"
model; own unet/config.json; edit_json "$tmp/m/unet/config.json" 'j["norm_num_groups"] = 18446744073709551615'
row config_unsigned_past_int64 2 "norm_num_groups = 18446744073709551615 has the wrong type" -- "$fairdiff" inspect "$tmp/m"
model; own unet/config.json; edit_json "$tmp/m/unet/config.json" 'j["layers_per_block"] = 1.5'
row config_fractional_int 2 "layers_per_block = 1.5 has the wrong type (expected an integer" -- "$fairdiff" inspect "$tmp/m"
model
if "$fairdiff" inspect "$tmp/m" >"$tmp/out" 2>&1 && grep -q "UNet2DConditionModel" "$tmp/out"; then
  passes=$((passes + 1)); echo "ok   inspect toy"
else
  failures=$((failures + 1)); echo "FAIL inspect toy:"; cat "$tmp/out"
fi

# --- generate: flags (nothing written) -------------------------------------------------------
gen_row gen_sampler 2 'unknown sampler "heun2"' -- gen --sampling-method heun2 -o "$tmp/never"
gen_row gen_karras 2 "karras sigmas are available" -- gen --sampling-method ddim --scheduler karras -o "$tmp/never"
gen_row gen_size 2 "width 100 is not a positive multiple of 8" -- gen -W 100 -o "$tmp/never"
gen_row gen_width_huge 2 "width 100000 is more than 16384 pixels" -- gen -W 100000 -o "$tmp/never"
gen_row gen_width_2p31 2 "width 2147483640 is more than 16384 pixels" -- gen -W 2147483640 -o "$tmp/never"
gen_row gen_weights_cache_gb 2 'FAIRDIFF_WEIGHTS_CACHE_GB: "lots" is not a number of gigabytes' -- \
  env FAIRDIFF_WEIGHTS_CACHE_GB=lots "$fairdiff" generate -p x --steps 1 -o "$tmp/never"
gen_row gen_conv_env 2 "FAIRDIFF_CONV: expected gemm or onednn, found 'fast'" -- \
  env FAIRDIFF_CONV=fast "$fairdiff" generate -p x --steps 1 -o "$tmp/never"
gen_row gen_height_2p31 2 "height 2147483648 is more than 16384 pixels" -- gen -H 2147483648 -o "$tmp/never"
gen_row gen_height_2p63 2 "--height" -- gen -H 9223372036854775808 -o "$tmp/never"
gen_row gen_steps 2 "--steps: 0 is less than 1" -- gen --steps 0 -o "$tmp/never"
gen_row gen_steps_huge 2 "--steps: steps 1000000000 is more than 10000" -- gen --steps 1000000000 -o "$tmp/never"
gen_row gen_steps_exponent 2 "--steps = 1e9" -- gen --steps 1e9 -o "$tmp/never"
gen_row gen_images_huge 2 "-N/--images: 1000000000 images per prompt is more than 100000" -- gen -N 1000000000 -o "$tmp/never"
gen_row gen_images_exponent 2 "--images = 1e9" -- gen -N 1e9 -o "$tmp/never"
gen_row gen_memory 2 "need at least" -- gen -W 16384 -H 16384 -N 64 --batch-size 64 -o "$tmp/never"
gen_row gen_cfg_nan 2 "--cfg-scale: cfg_scale nan is not a number in [0, 100]" -- gen --cfg-scale nan -o "$tmp/never"
gen_row gen_cfg_inf 2 "--cfg-scale: cfg_scale inf is not a number in [0, 100]" -- gen --cfg-scale inf -o "$tmp/never"
gen_row gen_cfg_huge 2 "--cfg-scale: cfg_scale 1e+308 is not a number in [0, 100]" -- gen --cfg-scale 1e308 -o "$tmp/never"
gen_row gen_cfg_negative 2 "--cfg-scale: must be non-negative" -- gen --cfg-scale -1 -o "$tmp/never"
gen_row gen_clip_skip_negative 2 "--clip-skip: must be non-negative" -- gen --clip-skip -1 -o "$tmp/never"
gen_row gen_clip_skip_layers 2 "--clip-skip: 100 skips all of the text encoder's 2 layers" -- gen --clip-skip 100 -o "$tmp/never"
gen_row gen_clip_skip_all 2 "--clip-skip: 2 skips all of the text encoder's 2 layers" -- gen --clip-skip 2 -o "$tmp/never"
gen_row gen_prompt_utf8 2 "--prompt: is not valid UTF-8: byte 2 (0xFF)" -- gen -p $'a \xff kite' -o "$tmp/never"
gen_row gen_negative_utf8 2 "--negative-prompt: is not valid UTF-8: byte 0 (0xC0)" -- gen -n $'\xc0\xaf' -o "$tmp/never"
gen_row gen_prompt_surrogate 2 "--prompt: is not valid UTF-8: byte 4 (0xED)" -- gen -p $'kite\xed\xa0\x80' -o "$tmp/never"
gen_row gen_vae_tile 2 "--vae-tiling: tile of 12 pixels" -- gen --vae-tiling=12 -o "$tmp/never"
gen_row gen_missing_model 2 "model not found" -- "$fairdiff" generate -m "$tmp/nomodel" -p x -o "$tmp/never"
gen_row gen_shard 2 "shard index 2 is not in [0, 2)" -- gen --shard-index 2 --num-shards 2 -o "$tmp/never"
gen_row gen_seed 2 "--seed: must be -1 (random) or non-negative" -- gen --seed -5 -o "$tmp/never"
gen_row gen_batch 2 "--batch-size: must be at least 1" -- gen --batch-size 0 -o "$tmp/never"
printf 'x' >"$tmp/afile"
row gen_out_not_dir 2 "output folder is not a writable folder" -- gen -o "$tmp/afile"
gen_row gen_usage 2 "run fairdiff --help" -- gen --no-such-flag -o "$tmp/never"
gen_row gen_fp16_cpu 2 "fp16 needs a CUDA device" -- gen --dtype fp16 -o "$tmp/never"

mkdir "$tmp/seeded"; echo '{"index": 0, "file": "00000-1.png", "base_seed": 1e20}' >"$tmp/seeded/manifest.jsonl"
row gen_manifest_base_seed 2 "the manifest's base_seed 1e+20 is not a seed" -- gen --seed -1 -o "$tmp/seeded"

# --- generate: prompts files ------------------------------------------------------------------
gen_row gen_prompts_file 2 "prompts file not found" -- gen --prompts "$tmp/none.txt" -o "$tmp/never"
# jsonl_row NAME NEEDLE LINE: a prompts file whose line 2 is LINE
jsonl_row() {
  printf 'a kite\n%s\n' "$3" >"$tmp/p.jsonl"
  gen_row "$1" 2 "$2" -- gen --prompts "$tmp/p.jsonl" -o "$tmp/never"
}
jsonl_row gen_jsonl_type "p.jsonl:2: a value has the wrong type" '{"prompt": "a boat", "count": "two"}'
jsonl_row gen_jsonl_count_huge "p.jsonl:2: 1000000000 images per prompt is more than 100000" '{"prompt": "a boat", "count": 1000000000}'
jsonl_row gen_jsonl_count_float "p.jsonl:2: \"count\" is 1e+20, not a whole number" '{"prompt": "a boat", "count": 1e20}'
jsonl_row gen_jsonl_width_huge "p.jsonl:2: width 4294967296 is more than 16384 pixels" '{"prompt": "a boat", "width": 4294967296}'
jsonl_row gen_jsonl_steps_float "p.jsonl:2: \"steps\" is 2.5, not a whole number" '{"prompt": "a boat", "steps": 2.5}'
jsonl_row gen_jsonl_steps_huge "p.jsonl:2: steps 100000 is more than 10000" '{"prompt": "a boat", "steps": 100000}'
jsonl_row gen_jsonl_cfg_huge "p.jsonl:2: cfg_scale 1e+308 is not a number in [0, 100]" '{"prompt": "a boat", "cfg_scale": 1e308}'
jsonl_row gen_jsonl_seed_unsigned "p.jsonl:2: \"seed\" is 18446744073709551615, not a whole number" '{"prompt": "a boat", "seed": 18446744073709551615}'
jsonl_row gen_jsonl_utf8 "p.jsonl:2: is not valid UTF-8: byte 14 (0xFF)" $'{"prompt": "a \xff boat"}'
printf 'a kite\na \xe2\x82 boat\n' >"$tmp/p.txt"
gen_row gen_prompts_utf8 2 "p.txt:2: is not valid UTF-8: byte 2 (0xE2)" -- gen --prompts "$tmp/p.txt" -o "$tmp/never"
for i in $(seq 1 11); do echo '{"prompt": "a kite", "count": 100000}'; done >"$tmp/many.jsonl"
gen_row gen_run_too_many 2 "many.jsonl: the run plans more than 1000000 images" -- gen --prompts "$tmp/many.jsonl" -o "$tmp/never"

# --- generate: fairness ---------------------------------------------------------------------------
# fair_row NAME NEEDLE JSON: --fairness-file holding JSON
fair_row() {
  printf '%s' "$3" >"$tmp/fair.json"
  gen_row "$1" 2 "$2" -- gen --fairness-file "$tmp/fair.json" -o "$tmp/never"
}
gen_row gen_fairness_attribute 2 'unknown attribute "age"' -- gen --fairness age=50:50 -o "$tmp/never"
gen_row gen_fairness_ratio 2 'ratio "abc" is not a number' -- gen --fairness colour=50:abc:1 -o "$tmp/never"
gen_row gen_fairness_groups 2 "more ratios than groups" -- gen --fairness colour=1:2:3:4 -o "$tmp/never"
gen_row gen_fairness_zero 2 "all ratios are zero" -- gen --fairness colour=red:0,blue:0 -o "$tmp/never"
gen_row gen_fairness_ratio_huge 2 "--fairness gender=1e308:1: ratio 1e+308 is more than 1e9" -- gen --fairness gender=1e308:1 -o "$tmp/never"
gen_row gen_fairness_ratio_inf 2 'gender=inf:1: unknown group "inf"' -- gen --fairness gender=inf:1 -o "$tmp/never"
gen_row gen_fairness_cfg 2 "semantic guidance needs classifier-free guidance" -- gen --fairness colour=1:1:1 --cfg-scale 1 -o "$tmp/never"
printf '{"attributes": [{"name": "gender", "targets": {"female": 30, "male": 70}}],
  "joint": {"attributes": ["gender", "colour"], "targets": {"female,red": 1, "male,blue": 1}}}' >"$tmp/contradict.json"
gen_row gen_fairness_joint_contradiction 2 "joint targets contradict the marginal targets of gender" -- \
  gen --fairness-file "$tmp/contradict.json" -o "$tmp/never"
fair_row gen_fairness_joint_group 'unknown group "purple" of attribute "colour"' '{"joint": {"attributes": ["gender", "colour"], "targets": {"female,purple": 1}}}'
fair_row gen_fairness_joint_huge "fair.json: joint: ratio 1e+300 is more than 1e9" '{"joint": {"attributes": ["gender", "colour"], "targets": {"female,red": 1e300, "male,blue": 1}}}'
fair_row gen_fairness_negative_scale "fair.json: colour: edit_guidance_scale -4 is not in [0, 100]" '{"attributes": [{"name": "colour", "targets": {"red": 1, "blue": 1}, "edit_guidance_scale": -4}]}'
fair_row gen_fairness_beta "fair.json: colour: edit_mom_beta 2 is not in [0, 1]" '{"attributes": [{"name": "colour", "targets": {"red": 1, "blue": 1}, "edit_mom_beta": 2}]}'
fair_row gen_fairness_warmup_float "fair.json: colour: edit_warmup_steps 2.5 is not a whole number" '{"attributes": [{"name": "colour", "targets": {"red": 1, "blue": 1}, "edit_warmup_steps": 2.5}]}'
fair_row gen_fairness_warmup_huge "fair.json: colour: edit_warmup_steps 1e+20 is not a whole number" '{"attributes": [{"name": "colour", "targets": {"red": 1, "blue": 1}, "edit_warmup_steps": 1e20}]}'
model; own model_index.json; edit_json "$tmp/m/model_index.json" 'del j["text_encoder"]'
gen_row gen_fairness_no_text_encoder 2 "needs the model's text encoder to embed the edit prompts" -- genm --fairness colour=1:1:1 -o "$tmp/never"

# --- generate: broken model folders (nothing written) ----------------------------------------------
model; rm "$tmp/m/unet/config.json"; printf '{"in_channels": 4,' >"$tmp/m/unet/config.json"
gen_row gen_corrupt_model 2 "unet/config.json: is not valid JSON" -- genm -o "$tmp/never"
model; own unet/config.json; edit_json "$tmp/m/unet/config.json" 'j["block_out_channels"] = [32, 2000000]'
gen_row gen_config_huge 2 "unet/config.json: its sizes describe a network of at least" -- genm -o "$tmp/never"
model; own text_encoder/config.json; edit_json "$tmp/m/text_encoder/config.json" 'j["vocab_size"] = 10**13'
gen_row gen_config_vocab_huge 2 "text_encoder/config.json: its sizes describe a network of at least" -- genm -o "$tmp/never"
model; own tokenizer/tokenizer_config.json; edit_json "$tmp/m/tokenizer/tokenizer_config.json" 'j["model_max_length"] = 77'
gen_row gen_tokenizer_positions 2 "tokenizer: model_max_length 77 is more than the text encoder's 16 positions" -- genm -o "$tmp/never"
# A CLIP BPE tokenizer whose vocab.json gives one token an id past the 43 embeddings.
model; own model_index.json; edit_json "$tmp/m/model_index.json" 'j["tokenizer"] = ["transformers", "CLIPTokenizer"]'
rm -rf "$tmp/m/tokenizer"; mkdir "$tmp/m/tokenizer"
python3 -c 'import json, sys; v = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "kite</w>": 100000}; json.dump(v, open(sys.argv[1], "w"))' "$tmp/m/tokenizer/vocab.json"
printf '#version: 0.2\nk i\n' >"$tmp/m/tokenizer/merges.txt"
printf '{"model_max_length": 16}' >"$tmp/m/tokenizer/tokenizer_config.json"
gen_row gen_vocab_id 2 "tokenizer: token id 100000 is beyond the text encoder's vocabulary of 43 embeddings" -- genm -o "$tmp/never"
printf '{"big</w>": 5000000000}' >"$tmp/m/tokenizer/added_tokens.json"
python3 -c 'import json, sys; v = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}; json.dump(v, open(sys.argv[1], "w"))' "$tmp/m/tokenizer/vocab.json"
gen_row gen_added_token_id 2 "tokenizer: token id 5000000000 is beyond the text encoder's vocabulary of 43 embeddings" -- genm -o "$tmp/never"
# Weights full of NaN: stopped after the first step, before any PNG (exit 2: the file is broken).
# The check runs in the sampling loop, after generate() made the (empty) --out folder.
model; own unet/diffusion_pytorch_model.safetensors
python3 - "$tmp/m/unet/diffusion_pytorch_model.safetensors" <<'PY'
import struct, sys
path = sys.argv[1]
b = bytearray(open(path, "rb").read())
n = struct.unpack("<Q", b[:8])[0]
b[8 + n:] = b"\xff" * (len(b) - 8 - n)  # 0xffffffff is a NaN in F32
open(path, "wb").write(bytes(b))
PY
row gen_nan_weights 2 "unet/diffusion_pytorch_model.safetensors: the unet's weights hold NaN or infinite values" -- genm --steps 3 -o "$tmp/nan"
# The run had started (the folder and its lock file exist): no image and no manifest line.
if [ -n "$(ls -A "$tmp/nan" 2>/dev/null | grep -v '^manifest.jsonl.lock$')" ]; then
  failures=$((failures + 1)); echo "FAIL gen_nan_weights: wrote $(ls "$tmp/nan")"
fi

# --- audit ----------------------------------------------------------------------------------------
mkdir "$tmp/empty-run"
row audit_missing_dir 2 "run folder not found" -- "$fairdiff" audit "$tmp/no-such-run"
row audit_no_manifest 2 "has no manifest.jsonl" -- "$fairdiff" audit "$tmp/empty-run"
row audit_classifier 2 "unknown classifier (available: hue, clip)" -- "$fairdiff" audit "$tmp/empty-run" --classifier vit
mkdir "$tmp/run"
printf 'x' >"$tmp/x.png"
echo '{"index": 0, "file": "../x.png", "prompt": "a kite"}' >"$tmp/run/manifest.jsonl"
row audit_file_outside 2 'manifest.jsonl:1: "file" "../x.png" is not a file inside the run folder' -- "$fairdiff" audit "$tmp/run" --attribute colour
echo '{"index": 0, "file": "/etc/passwd", "prompt": "a kite"}' >"$tmp/run/manifest.jsonl"
row audit_file_absolute 2 'manifest.jsonl:1: "file" "/etc/passwd" is not a file inside the run folder' -- "$fairdiff" audit "$tmp/run" --attribute colour
echo '{"index": 1e20, "file": "a.png", "prompt": "a kite"}' >"$tmp/run/manifest.jsonl"
row audit_index_float 2 'manifest.jsonl:1: a record needs "index" (an integer)' -- "$fairdiff" audit "$tmp/run" --attribute colour
echo '{"index": 0, "file": "bomb.png", "prompt": "a kite"}' >"$tmp/run/manifest.jsonl"
python3 - "$tmp/run/bomb.png" <<'PY'
import struct, sys, zlib
def chunk(t, d): return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
idat = zlib.compress(b"\0" * 100000, 9)
open(sys.argv[1], "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
PY
row audit_png_bomb 2 "bomb.png: claims 100000x100000 pixels, more than the audit reads" -- "$fairdiff" audit "$tmp/run" --attribute colour

# --- the rows that need ../shared/fixtures: a CLIP BPE tokenizer of SD's size ---------------------
if [ -d "$fixtures/models/tiny-sd1" ]; then
  rm -rf "$tmp/f"; mkdir "$tmp/f"
  for c in "$fixtures"/models/tiny-sd1/*; do
    if [ -d "$c" ]; then mkdir "$tmp/f/$(basename "$c")"; ln -s "$c"/* "$tmp/f/$(basename "$c")/"; else ln -s "$c" "$tmp/f/"; fi
  done
  printf '{"<huge>": 1000000}' >"$tmp/f/tokenizer/added_tokens.json"
  gen_row fixture_added_token_id 2 "tokenizer: token id 1000000 is beyond the text encoder's vocabulary" -- \
    "$fairdiff" generate -m "$tmp/f" -p "a cat" --device cpu -q -o "$tmp/never"
  rm "$tmp/f/tokenizer/added_tokens.json"
  gen_row fixture_clip_skip 2 "--clip-skip: 100 skips all of the text encoder's" -- \
    "$fairdiff" generate -m "$tmp/f" -p "a cat" --device cpu -q --clip-skip 100 -o "$tmp/never"
else
  echo "note: fixtures not found at $fixtures; the 2 tiny-sd1 rows are skipped"
fi

# --- the CLIP classifier and generate --verify (issue 12) ----------------------------------------
gen_row verify_without_fairness 2 "--verify: there is nothing to verify without a fairness instruction" -- \
  "$fairdiff" generate -p "a kite" --verify --verify-classifier hue -q -o "$tmp/never"
gen_row verify_without_clip_model 2 "--verify: the clip verifier needs a CLIP model" -- \
  "$fairdiff" generate -p "a kite" --fairness colour=red:1,blue:1 --verify -q -o "$tmp/never"
gen_row verify_negative_retries 2 "--max-retries: -1 is not in [0, 100]" -- \
  "$fairdiff" generate -p "a kite" --fairness colour=red:1,blue:1 --verify --verify-classifier hue --max-retries -1 \
  -q -o "$tmp/never"
gen_row verify_retry_seed 2 "--retry-seed: unknown mode \"other\"" -- \
  "$fairdiff" generate -p "a kite" --fairness colour=red:1,blue:1 --verify --verify-classifier hue --retry-seed other \
  -q -o "$tmp/never"
if [ -d "$fixtures/models/tiny-clip" ]; then
  "$fairdiff" generate -p "a kite" -N 2 --steps 2 --device cpu --threads 1 -q -o "$tmp/run12" >/dev/null 2>&1
  clip() { rm -rf "$tmp/clip"; cp -r "$fixtures/models/tiny-clip" "$tmp/clip"; }
  audit_clip() { "$fairdiff" audit "$tmp/run12" --attribute colour --classifier clip --clip-model "$tmp/clip" "$@"; }
  clip; rm "$tmp/clip/preprocessor_config.json"
  row clip_no_preprocessor 2 "clip: has no preprocessor_config.json" -- audit_clip
  clip; edit_json "$tmp/clip/config.json" "j['vision_config']['hidden_act'] = 'relu'"
  row clip_vision_config 2 "vision_config.hidden_act = \"relu\" is not supported" -- audit_clip
  clip; python3 - "$tmp/clip/model.safetensors" <<'PY'
import json, struct, sys
path = sys.argv[1]
raw = open(path, "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
data = raw[8 + n:]
header["vision_model.extra.weight"] = {"dtype": "F32", "shape": [2], "data_offsets": [len(data), len(data) + 8]}
h = json.dumps(header).encode()
h += b" " * (-len(h) % 8)
open(path, "wb").write(struct.pack("<Q", len(h)) + h + data + b"\0" * 8)
PY
  row clip_unexpected_key 2 "1 tensors are not part of the CLIP model: vision_model.extra.weight" -- audit_clip
  clip; mkdir -p "$tmp/attrs12"
  edit_json_copy() { python3 -c "import json,sys; j=json.load(open(sys.argv[1])); j.pop('classifier_prompts'); json.dump(j, open(sys.argv[2],'w'))" "$@"; }
  edit_json_copy "$source_dir/configs/attributes/colour.json" "$tmp/attrs12/colour.json"
  row clip_no_class_prompts 2 "attribute \"colour\" has no classifier_prompts" -- audit_clip --attributes "$tmp/attrs12"
  row clip_without_model 2 "--classifier clip: needs a CLIP model" -- \
    "$fairdiff" audit "$tmp/run12" --attribute colour --classifier clip
  first=$(ls "$tmp/run12"/*.png | head -1)
  cp "$first" "$tmp/first.png"; head -c 100 "$tmp/first.png" >"$first"
  row clip_corrupt_image 2 "is not a complete PNG file" -- audit_clip
  cp "$tmp/first.png" "$first"
else
  echo "note: fixtures not found at $fixtures; the 7 tiny-clip rows are skipped"
fi
# --- SDXL (issue 13): refused by name, nothing written ---------------------------------------
# A copy of the fixtures' tiny-sdxl as symlinks in $tmp/x (a part to break is made a real copy).
if [ -d "$fixtures/models/tiny-sdxl" ]; then
  xl=$fixtures/models/tiny-sdxl
  sdxl() {
    rm -rf "$tmp/x"; mkdir "$tmp/x"
    for c in "$xl"/*; do
      if [ -d "$c" ]; then mkdir "$tmp/x/$(basename "$c")"; ln -s "$c"/* "$tmp/x/$(basename "$c")/"; else ln -s "$c" "$tmp/x/"; fi
    done
  }
  xl_own() { rm "$tmp/x/$1"; cp "$xl/$1" "$tmp/x/$1"; }
  xl_gen() { "$fairdiff" generate -m "$tmp/x" -p "a photo of a nurse" --steps 2 --device cpu -q -o "$tmp/never" "$@"; }
  sdxl; rm -rf "$tmp/x/text_encoder_2"
  gen_row sdxl_no_text_encoder_2 2 "component folder text_encoder_2/ is missing" -- xl_gen
  sdxl; rm -rf "$tmp/x/tokenizer_2"
  gen_row sdxl_no_tokenizer_2 2 "component folder tokenizer_2/ is missing" -- xl_gen
  sdxl; xl_own model_index.json; edit_json "$tmp/x/model_index.json" 'del j["tokenizer_2"]'
  gen_row sdxl_index_without_tokenizer_2 2 "lists no tokenizer_2 component (an SDXL pipeline needs it)" -- xl_gen
  sdxl; xl_own unet/config.json; edit_json "$tmp/x/unet/config.json" 'del j["projection_class_embeddings_input_dim"]'
  gen_row sdxl_text_time_without_sizes 2 "unet/config.json: addition_embed_type \"text_time\" needs projection_class_embeddings_input_dim" -- xl_gen
  sdxl; xl_own model_index.json
  edit_json "$tmp/x/model_index.json" 'j["_class_name"] = "StableDiffusionXLImg2ImgPipeline"; j["text_encoder"] = [None, None]; j["tokenizer"] = [None, None]'
  rm -rf "$tmp/x/text_encoder" "$tmp/x/tokenizer"
  gen_row sdxl_refiner 2 "an SDXL refiner" -- xl_gen
  mkdir -p "$tmp/attrs"; cp "$source_dir"/configs/attributes/*.json "$tmp/attrs/"
  edit_json "$tmp/attrs/gender.json" 'j["groups"][0]["edit_prompts"] = [" "]'
  sdxl
  gen_row sdxl_fairness_empty_edit_prompt 2 "has an empty edit prompt" -- xl_gen --fairness gender=50:50 --attributes "$tmp/attrs"
  gen_row sdxl_bad_crop 2 "--crop-top-left: \"4;8\" is not TOP,LEFT" -- xl_gen --crop-top-left "4;8"
  gen_row sdxl_bad_original_size 2 "--original-size: \"1024\" is not WIDTHxHEIGHT" -- xl_gen --original-size 1024
  raw "$tmp/sdxl.safetensors" '{"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}' 4
  gen_row sdxl_single_file 2 "single-file SDXL is not supported" -- \
    "$fairdiff" generate -m "$tmp/sdxl.safetensors" --tokenizer "$xl/tokenizer" -p "a cat" --device cpu -q -o "$tmp/never"
else
  echo "note: fixtures not found at $fixtures; the SDXL rows are skipped"
fi
gen_row size_conditioning_not_sdxl 2 "--original-size: size conditioning is for SDXL" -- \
  "$fairdiff" generate -p "a kite" --original-size 1024x1024 --device cpu -q -o "$tmp/never"
# --- issue 15 (speed): the dtype names, auto included ------------------------------------------
gen_row gen_dtype_unknown 2 'unknown dtype "fp8"' -- gen --dtype fp8 -o "$tmp/never"
gen_row gen_dtype_hint 2 "use auto, fp32, fp16 or bf16" -- gen --dtype float -o "$tmp/never"
gen_row gen_fp16_weights_bf16 2 "--fp16-weights: the weights are converted to float32 per layer" -- gen --fp16-weights --dtype bf16 -o "$tmp/never"
gen_row gen_fp16_weights_prepack 2 "use one of --fp16-weights and --prepack-weights" -- gen --fp16-weights --prepack-weights -o "$tmp/never"
gen_row gen_fp16_weights_cuda 2 "float16 weight storage is for the CPU" -- "$fairdiff" generate -p "a kite" --fp16-weights --device cuda -q -o "$tmp/never"

# --- resume after a kill: kill -9 while the toy model makes 6 images, then rerun -----------------
resume() { exec "$fairdiff" generate -p "a kite" -N 6 --steps 60 --device cpu --threads 1 -q -o "$1"; }
(resume "$tmp/full") >/dev/null 2>&1
(resume "$tmp/killed") >/dev/null 2>&1 &  # exec: $! is fairdiff itself
pid=$!
for _ in $(seq 1 1200); do [ -s "$tmp/killed/manifest.jsonl" ] && break; sleep 0.05; done
kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
done_before=$(cat "$tmp/killed/manifest.jsonl" 2>/dev/null | wc -l)
(resume "$tmp/killed") >/dev/null 2>&1
if [ "$(wc -l <"$tmp/killed/manifest.jsonl")" -eq 6 ] && [ "$done_before" -ge 1 ] && [ "$done_before" -lt 6 ] &&
   diff <(cd "$tmp/full" && md5sum *.png) <(cd "$tmp/killed" && md5sum *.png) >/dev/null &&
   [ -z "$(ls "$tmp/killed" | grep '\.tmp\.')" ]; then
  passes=$((passes + 1)); echo "ok   resume after kill -9 ($done_before of 6 done before the kill)"
else
  failures=$((failures + 1)); echo "FAIL resume after kill -9 ($done_before done before the kill)"; ls -la "$tmp/killed"
fi
# --- fairdiff-clip-agreement (issue 12, the shipped toy CLIP); skipped when not built -----------
agreement=$(dirname "$fairdiff")/fairdiff-clip-agreement
if [ -x "$agreement" ]; then
  mkdir -p "$tmp/no-png"
  row agreement_missing_out 2 "--out $tmp/none: not a folder" -- "$agreement" --out "$tmp/none"
  row agreement_no_png 2 "--out $tmp/no-png: has no PNG images" -- "$agreement" --out "$tmp/no-png"
  row agreement_min_range 2 "--min-agreement" -- "$agreement" --out "$tmp/no-png" --min-agreement 2
  row agreement_clip_model 2 "CLIP model folder not found" -- \
    "$agreement" --throughput --clip-model "$tmp/none" --images 1
else
  echo "note: $agreement not built; its 4 rows are skipped"
fi

# --- fairdiff-fairness-bench: generate's checks before its table; skipped when not built --------
fbench=$(dirname "$fairdiff")/fairdiff-fairness-bench
if [ -x "$fbench" ]; then
  row fbench_dtype_unknown 2 'unknown dtype "fp8"' -- "$fbench" --dtype fp8 --out "$tmp/never-bench"
  if [ -s "$tmp/out" ] || [ -e "$tmp/never-bench" ]; then
    failures=$((failures + 1)); echo "FAIL fbench_dtype_unknown: printed on stdout or wrote $tmp/never-bench"
  fi
  row fbench_mode_unknown 2 '--fairness-mode' -- "$fbench" --fairness-mode slow --out "$tmp/never-bench"
else
  echo "note: $fbench not built; its 2 rows are skipped"
fi

echo "$passes passed, $failures failed"
[ "$failures" -eq 0 ]
