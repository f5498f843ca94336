#!/usr/bin/env bash
# The shipped CLIP (models/toy-clip) against the exact hue classifier on freshly generated
# toy pictures: 64 images (the four toy prompts, 8 unguided and 8 with --fairness each,
# seeds 20000..: neither the training seeds 900000.. nor the README's 1,000-image
# measurement, 10000..). fairdiff-clip-agreement must find >= 98% agreement (at most one
# image of 64 apart), and `fairdiff audit --classifier clip` must run on the same folder.
set -euo pipefail
fairdiff=$1 agreement=$2 source_dir=$3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
gen() {
  "$fairdiff" generate --model "$source_dir/models/toy" --attributes "$source_dir/configs/attributes" \
    --prompt "$1" -N 8 --batch-size 8 --seed 20000 --threads 1 -q --out "$tmp/$2" "${@:3}"
}
dirs=()
for c in kite boat house ball; do
  gen "a photo of a $c" "$c-u"
  gen "a photo of a $c" "$c-f" --fairness colour=red:1,green:1,blue:1
  dirs+=(--out "$tmp/$c-u" --out "$tmp/$c-f")
done
"$agreement" "${dirs[@]}" --clip-model "$source_dir/models/toy-clip" --margin 0.5 --min-agreement 0.98
"$fairdiff" audit "$tmp/kite-f" --classifier clip --clip-model "$source_dir/models/toy-clip" --margin 0.5 \
  --attributes "$source_dir/configs/attributes"
