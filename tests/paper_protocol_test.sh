#!/usr/bin/env bash
# The paper protocol's mechanics on the tiny fixture models: 2 occupations x 4 images, three
# runs (unguided, fair, fair + verify), audited by tiny-clip, reported next to the published
# counts. Skipped (77) without the fixtures.
set -u
tool=$1 source_dir=$2
fixtures=${FAIRDIFF_FIXTURES:-$source_dir/../shared/fixtures}
data=${FAIRDIFF_PAPER_DATA:-$source_dir/../shared/data}
if [ ! -d "$fixtures/models/tiny-sd1" ] || [ ! -f "$data/occupations.txt" ]; then
  echo "SKIP: fixtures or paper data not found"; exit 77
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
"$tool" -m "$fixtures/models/tiny-sd1" --clip-model "$fixtures/models/tiny-clip" --occupations "$data/occupations.txt" \
  --published "$data/fair-diffusion-published.tsv" --limit 2 -N 4 --out "$out" -q > "$out/report.txt" 2> "$out/err.txt" \
  || { cat "$out/err.txt"; fail "the protocol failed"; }
cat "$out/report.txt"
for run in unguided fair verified; do
  n=$(ls "$out/$run"/[0-9]*.png | wc -l)
  [ "$n" = 8 ] || fail "$run has $n images, expected 8"
  [ -f "$out/$run/audit.json" ] || fail "$run was not audited"
done
grep -q '"verify"' "$out/verified/manifest.jsonl" || fail "the verified run has no verify records"
grep -q '"verify"' "$out/fair/manifest.jsonl" && fail "the fair run was verified"
grep -q "^accountant" "$out/report.txt" || fail "no row for the first occupation"
grep -q "paper: SD 1.5" "$out/report.txt" || fail "the published figures are missing"
for k in "ours: unguided" "ours: fair" "ours: verified"; do
  grep -q "^$k" "$out/report.txt" || fail "no summary line for $k"
done
[ -f "$out/protocol.json" ] || fail "no protocol.json"
# Sharded: two shards generate, the report stage merges; the same images as one machine.
for k in 0 1; do
  "$tool" -m "$fixtures/models/tiny-sd1" --clip-model "$fixtures/models/tiny-clip" --occupations "$data/occupations.txt" \
    --limit 2 -N 4 --out "$out/sharded" -q --shard-index $k --num-shards 2 --stage generate > /dev/null 2>&1 \
    || fail "shard $k failed"
done
"$tool" -m "$fixtures/models/tiny-sd1" --clip-model "$fixtures/models/tiny-clip" --occupations "$data/occupations.txt" \
  --limit 2 -N 4 --out "$out/sharded" -q --stage report > "$out/sharded.txt" 2>&1 || fail "the report stage failed"
for run in unguided fair verified; do
  for f in "$out/$run"/[0-9]*.png; do
    cmp -s "$f" "$out/sharded/$run/$(basename "$f")" || fail "sharded $run/$(basename "$f") differs"
  done
done
echo "PASS"
