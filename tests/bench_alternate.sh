#!/usr/bin/env bash
# fairdiff-bench --alternate (issue 15): the fairness step timed against the CFG step in one
# sampling loop, alternately, on the shipped toy model; and its refusals.
# Usage: bench_alternate.sh FAIRDIFF_BENCH SOURCE_DIR
set -euo pipefail
bench=$1 src=$2
command -v python3 >/dev/null || { echo "no python3: skipped"; exit 77; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

"$bench" --model "$src/models/toy" --sizes 64 --steps 2 --skip-vae --threads 1 --fairness-rows 1 --alternate 4 \
  >"$tmp/out" 2>"$tmp/err" || fail "bench exited $?: $(tail -n 3 "$tmp/err")"
# 2 warm-up steps (one of each), then 4 pairs: 10 steps, CFG on the even ones.
[ "$(grep -c 'CFG|CFG+rows 64x64 step' "$tmp/err")" = 10 ] || fail "expected 10 steps: $(cat "$tmp/err")"
[ "$(grep -c 'CFG|CFG+rows 64x64 step [12]/10 (warm-up)' "$tmp/err")" = 2 ] || fail "expected 2 warm-up steps"
grep -q 'alternating: median of 4 pairs' "$tmp/out" || fail "no alternating row: $(cat "$tmp/out")"
tail -n 1 "$tmp/out" | python3 -c '
import json, sys
s = json.loads(sys.stdin.read())["sizes"][0]
r, c, f = s["fairness_pair_ratios"], s["fairness_pair_cfg_step_s"], s["fairness_pair_step_s"]
assert s["fairness_alternate_pairs"] == 4 and len(r) == len(c) == len(f) == 4, s
for ri, ci, fi in zip(r, c, f):
    assert ci > 0 and fi > 0 and abs(ri - fi / ci) < 1e-9 * ri, (ri, ci, fi)
m = sorted(r)
assert abs(s["fairness_step_ratio"] - (m[1] + m[2]) / 2) < 1e-12, s  # the median of an even count
assert s["fairness_unet_batch"] == 3, s
assert s["fairness_extra_rows_by_step"] == [0, 1] * 5, s  # the extra row on odd steps only
' || fail "the JSON line does not hold the pairs"

for bad in "--alternate 2" "--alternate -1 --fairness-rows 1"; do
  # shellcheck disable=SC2086
  if "$bench" --model "$src/models/toy" --sizes 64 $bad >"$tmp/out" 2>"$tmp/err"; then fail "accepted: $bad"; fi
  [ "$(wc -l <"$tmp/err")" = 1 ] && grep -q -- "--alternate" "$tmp/err" || fail "unclear refusal of $bad: $(cat "$tmp/err")"
done
echo "PASS"
