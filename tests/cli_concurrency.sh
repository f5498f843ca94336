#!/usr/bin/env bash
# Nothing lost, nothing mixed (issue 14), end to end on the shipped toy model:
# the same command started twice at once (one refuses, naming the holder), two
# shards at once into one folder, and a torn manifest line repaired by a rerun,
# each folder ending byte-identical to an undisturbed run.
set -u
fairdiff=$1
tmp=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill -CONT "$p" 2>/dev/null; done; rm -rf "$tmp"' EXIT
failures=0
ok() { echo "ok   $*"; }
fail() { echo "FAIL $*"; failures=$((failures + 1)); }
run=(generate -p "a kite" -N 6 --steps 10 --threads 1 -q)  # "$fairdiff" "${run[@]}" &: $! is fairdiff's pid
gen() { "$fairdiff" "${run[@]}" "$@"; }

# lines in a manifest, and whether every index in it is there once
lines() { [ -f "$1" ] && wc -l <"$1" || echo 0; }
unique_indices() {
  python3 -c 'import json,sys; i=[json.loads(l)["index"] for l in open(sys.argv[1])]; sys.exit(len(i)!=len(set(i)))' "$1"
}
# every PNG of the reference run is in $1, byte for byte
same_pngs() {
  local f
  for f in "$tmp/ref"/*.png; do cmp -s "$f" "$1/$(basename "$f")" || { echo "  differs: $(basename "$f")"; return 1; }; done
}

gen -o "$tmp/ref" || { echo "FAIL the undisturbed run failed"; exit 1; }
[ "$(ls "$tmp/ref"/*.png | wc -l)" -eq 6 ] || { echo "FAIL the undisturbed run has no 6 images"; exit 1; }

# 1. The same command twice at once. To make the outcome certain rather than a race,
# the one that takes the lock is stopped until the other has finished.
attempt=0
while :; do
  attempt=$((attempt + 1))
  out="$tmp/twice$attempt"
  "$fairdiff" "${run[@]}" -o "$out" 2>"$tmp/a.err" & a=$!
  "$fairdiff" "${run[@]}" -o "$out" 2>"$tmp/b.err" & b=$!
  pids=("$a" "$b")
  holder=""
  for _ in $(seq 1 3000); do  # up to 30 s for the model to load
    holder=$(sed -n 's/^pid \([0-9]*\) on host .*/\1/p' "$out/manifest.jsonl.lock" 2>/dev/null)
    [ -n "$holder" ] && break
    sleep 0.01
  done
  case $holder in
    "$a") other=$b ;;
    "$b") other=$a ;;
    *) echo "FAIL the lock file names pid '$holder', neither $a nor $b"; wait "$a" "$b"; exit 1 ;;
  esac
  kill -STOP "$holder" 2>/dev/null
  wait "$other"; rc_other=$?
  kill -CONT "$holder" 2>/dev/null
  wait "$holder"; rc_holder=$?
  pids=()
  if [ "$rc_holder" -eq 0 ] && [ "$rc_other" -eq 0 ] && [ "$attempt" -lt 3 ]; then
    echo "note: the first run had finished before the second looked (attempt $attempt); again"
    continue
  fi
  break
done
[ "$other" = "$a" ] && err="$tmp/a.err" || err="$tmp/b.err"
if [ "$rc_holder" -eq 0 ] && [ "$rc_other" -eq 2 ] && [ "$(wc -l <"$err")" -eq 1 ] &&
   grep -qF "manifest.jsonl: in use by pid $holder on host " "$err"; then
  ok "same command twice: one ran, the other exit 2: $(cat "$err")"
else
  fail "same command twice: exits $rc_holder (holder $holder) and $rc_other, stderr:"; cat "$tmp/a.err" "$tmp/b.err"
fi
if [ "$(lines "$out/manifest.jsonl")" -eq 6 ] && unique_indices "$out/manifest.jsonl" && same_pngs "$out"; then
  ok "same command twice: 6 manifest lines, no index twice, PNGs equal the undisturbed run's"
else
  fail "same command twice: the folder is not the complete run"
fi
complete=$out

# 2. Two shards at once into one folder: both run, merge gives the whole run.
"$fairdiff" "${run[@]}" -o "$tmp/shards" --shard-index 0 --num-shards 2 2>"$tmp/s0.err" & s0=$!
"$fairdiff" "${run[@]}" -o "$tmp/shards" --shard-index 1 --num-shards 2 2>"$tmp/s1.err" & s1=$!
wait "$s0"; rc0=$?
wait "$s1"; rc1=$?
merged=$("$fairdiff" merge "$tmp/shards" 2>&1)
if [ "$rc0" -eq 0 ] && [ "$rc1" -eq 0 ] && [ "$merged" = "6 images in $tmp/shards/manifest.jsonl" ] &&
   unique_indices "$tmp/shards/manifest.jsonl" && same_pngs "$tmp/shards"; then
  ok "two shards at once: both ran; $merged; PNGs equal the undisturbed run's"
else
  fail "two shards at once: exits $rc0 and $rc1, merge said '$merged'"; cat "$tmp/s0.err" "$tmp/s1.err"
fi

# 3. A torn manifest line: the audit names it, a rerun repairs it and redoes the image.
truncate -s -7 "$complete/manifest.jsonl"
audit_err=$("$fairdiff" audit "$complete" 2>&1 >/dev/null); audit_rc=$?
if [ "$audit_rc" -eq 2 ] && [ "$(echo "$audit_err" | wc -l)" -eq 1 ] &&
   echo "$audit_err" | grep -qF "manifest.jsonl:6: the last line is torn"; then
  ok "torn manifest: audit exit 2: $audit_err"
else
  fail "torn manifest: audit exit $audit_rc: $audit_err"
fi
gen -o "$complete" 2>"$tmp/repair.err"; rc=$?
if [ "$rc" -eq 0 ] && [ "$(lines "$complete/manifest.jsonl")" -eq 6 ] && unique_indices "$complete/manifest.jsonl" &&
   [ "$(lines "$complete/manifest.jsonl.torn")" -eq 1 ] && same_pngs "$complete"; then
  ok "torn manifest: the rerun kept 5 lines, moved the torn one to manifest.jsonl.torn, redid the image"
else
  fail "torn manifest: rerun exit $rc, $(lines "$complete/manifest.jsonl") lines:"; cat "$tmp/repair.err"
fi

[ "$failures" -eq 0 ] && echo "all passed" || echo "$failures failed"
exit $((failures > 0))
