#!/usr/bin/env bash
# scripts/gpu-check's CPU-side parts: the dry run checks its arguments and names every
# command; --pack fills .gpu-check/ (with apt-get stood in for); --unpack unpacks .deb files
# with dpkg-deb and without it; the table is computed from a bench JSON line with known numbers.
# Usage: gpu_check_dry_run.sh SOURCE_DIR
set -euo pipefail
src=$1
fixtures=${FAIRDIFF_FIXTURES:-$src/../shared/fixtures}
command -v python3 >/dev/null || { echo "no python3: skipped"; exit 77; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

if [ -d "$fixtures/keysets/sd15" ]; then
  plan=$("$src/scripts/gpu-check" --dry-run "$fixtures")
  for want in "fairdiff-parity $fixtures --device cuda --dtype fp32" "--dtype fp16" "--batch 8" "--fairness-rows 2"; do
    grep -qF -- "$want" <<<"$plan" || fail "dry run does not name \"$want\": $plan"
  done
  # The rehearsal's settings (a CPU machine, small) reach every command of the plan.
  plan=$(FAIRDIFF_GPU_CHECK_DEVICE=cpu FAIRDIFF_GPU_CHECK_DTYPES=fp32 FAIRDIFF_GPU_CHECK_SIZE=64 \
         FAIRDIFF_GPU_CHECK_BATCH=1 FAIRDIFF_GPU_CHECK_BUILD=build-x "$src/scripts/gpu-check" --dry-run "$fixtures")
  for want in "build-x/fairdiff-parity $fixtures --device cpu --dtype fp32" "--device cpu --dtype fp32 --sizes 64 --batch 1"; do
    grep -qF -- "$want" <<<"$plan" || fail "rehearsal dry run does not name \"$want\": $plan"
  done
  grep -qF -- "--dtype fp16" <<<"$plan" && fail "rehearsal dry run still names fp16: $plan"
  # An empty or unknown dtype list: one line, exit 2, before anything runs.
  for bad in "" " " "fp64"; do
    rc=0; FAIRDIFF_GPU_CHECK_DTYPES=$bad "$src/scripts/gpu-check" --dry-run "$fixtures" >"$tmp/out" 2>"$tmp/err" || rc=$?
    [ "$rc" = 2 ] || fail "FAIRDIFF_GPU_CHECK_DTYPES='$bad': exit $rc, want 2"
    grep -q "FAIRDIFF_GPU_CHECK_DTYPES" "$tmp/err" && [ "$(wc -l <"$tmp/err")" = 1 ] || fail "FAIRDIFF_GPU_CHECK_DTYPES='$bad': unclear error: $(cat "$tmp/err")"
    [ -s "$tmp/out" ] && fail "FAIRDIFF_GPU_CHECK_DTYPES='$bad' planned: $(cat "$tmp/out")"
  done
fi
mkdir "$tmp/empty"
if "$src/scripts/gpu-check" --dry-run "$tmp/empty" 2>"$tmp/err"; then fail "a folder without keysets was accepted"; fi
grep -q "no keysets/sd15" "$tmp/err" || fail "unclear error: $(cat "$tmp/err")"
if "$src/scripts/gpu-check" --pack "$tmp/empty" 2>"$tmp/err"; then fail "--pack took a folder without keysets"; fi
grep -q "no keysets/sd15" "$tmp/err" || fail "unclear --pack error: $(cat "$tmp/err")"

# --unpack (what the device run does with the packed .deb files): with dpkg-deb, and with ar and
# tar alone, for each compression dpkg-deb writes. Each package holds one header of its own.
if command -v dpkg-deb >/dev/null && command -v ar >/dev/null; then
  mkdir "$tmp/debs"
  kinds=(xz gzip none)
  command -v zstd >/dev/null && kinds+=(zstd)  # tar's --zstd runs it
  for z in "${kinds[@]}"; do
    pkg=$tmp/pkg-$z
    mkdir -p "$pkg/DEBIAN" "$pkg/usr/include/fake"
    printf 'Package: fake-%s\nVersion: 1\nArchitecture: all\nMaintainer: fairdiff tests <tests@localhost>\nDescription: test package\n' "$z" >"$pkg/DEBIAN/control"
    echo "// packed with $z" >"$pkg/usr/include/fake/$z.h"
    dpkg-deb -Z"$z" --build "$pkg" "$tmp/debs/fake-$z.deb" >/dev/null
  done
  unpacked() {
    for z in "${kinds[@]}"; do
      [ "$(cat "$tmp/prefix/usr/include/fake/$z.h" 2>/dev/null)" = "// packed with $z" ] || fail "$1: $z package not unpacked"
    done
  }
  "$src/scripts/gpu-check" --unpack "$tmp/debs" "$tmp/prefix"
  unpacked "with dpkg-deb"
  # The fallback: a PATH with what the script needs but dpkg-deb.
  mkdir "$tmp/bin"
  for tool in bash env dirname ar tar grep xz gzip zstd mkdir rm cat; do
    if command -v "$tool" >/dev/null; then ln -s "$(command -v "$tool")" "$tmp/bin/$tool"; fi
  done
  rm -rf "$tmp/prefix"
  PATH=$tmp/bin "$src/scripts/gpu-check" --unpack "$tmp/debs" "$tmp/prefix"
  unpacked "with ar and tar"
  # A folder with something in it is refused and left as it was (it could be any folder).
  echo mine >"$tmp/prefix/mine"
  if "$src/scripts/gpu-check" --unpack "$tmp/debs" "$tmp/prefix" 2>"$tmp/err"; then fail "--unpack took a non-empty folder"; fi
  grep -q "is not empty" "$tmp/err" && [ "$(wc -l <"$tmp/err")" = 1 ] || fail "unclear --unpack error: $(cat "$tmp/err")"
  [ "$(cat "$tmp/prefix/mine")" = mine ] || fail "--unpack touched a non-empty folder"
  if "$src/scripts/gpu-check" --unpack "$tmp/debs" 2>"$tmp/err"; then fail "--unpack took one argument"; fi
  if "$src/scripts/gpu-check" --unpack "$tmp/empty" "$tmp/prefix2" 2>"$tmp/err"; then fail "--unpack took a folder without .deb files"; fi
  grep -q "no .deb files" "$tmp/err" || fail "unclear --unpack error: $(cat "$tmp/err")"
fi

# --pack (run where Debian's apt works), in a copy of the script so that the project's own
# .gpu-check/ is left alone, with apt-get stood in for: every package named, the fixtures but
# the SDXL and single-file models, and the old pack kept whole when a download fails.
mkdir -p "$tmp/proj/scripts" "$tmp/fake-apt"
cp "$src/scripts/gpu-check" "$tmp/proj/scripts/"
cat >"$tmp/fake-apt/apt-get" <<'SH'
#!/usr/bin/env bash
# apt-get download [-q] PACKAGE...: a file per package in the current folder, or the failure asked for.
[ "$1" = download ] || exit 100
shift
if [ -n "${FAKE_APT_FAIL:-}" ]; then echo "E: Unable to locate package $FAKE_APT_FAIL" >&2; exit 100; fi
for p in "$@"; do [ "$p" = -q ] || echo "$p" >"${p}_1.0_amd64.deb"; done
SH
chmod +x "$tmp/fake-apt/apt-get"
fx=$tmp/fx
mkdir -p "$fx/keysets/sd15" "$fx/models/tiny-sd1/unet" "$fx/models/tiny-sdxl" "$fx/models/tiny-sd1-single-file" "$fx/sdxl" "$fx/sd15"
echo '{}' >"$fx/keysets/sd15/single_file.keys.json"
echo weights >"$fx/models/tiny-sd1/unet/weights"
echo golden >"$fx/sd15/case"
for f in models/tiny-sdxl/weights models/tiny-sd1-single-file/model.safetensors sdxl/case; do echo behind >"$fx/$f"; done
PATH=$tmp/fake-apt:$PATH "$tmp/proj/scripts/gpu-check" --pack "$fx" >"$tmp/out" 2>"$tmp/err" || fail "--pack failed: $(cat "$tmp/err")"
pack=$tmp/proj/.gpu-check
for p in nlohmann-json3-dev libcli11-dev libspdlog-dev libspdlog1.10 libfmt-dev libfmt9 libstb-dev; do
  [ -f "$pack/debs/${p}_1.0_amd64.deb" ] || fail "--pack did not download $p: $(ls "$pack/debs")"
done
for f in keysets/sd15/single_file.keys.json models/tiny-sd1/unet/weights sd15/case; do
  cmp -s "$fx/$f" "$pack/fixtures/$f" || fail "--pack did not copy $f"
done
for d in models/tiny-sdxl models/tiny-sd1-single-file sdxl; do
  [ ! -e "$pack/fixtures/$d" ] || fail "--pack copied $d, which stays behind"
done
[ ! -e "$tmp/proj/.gpu-check.tmp" ] && [ ! -e "$pack/apt.log" ] || fail "--pack left its temporary files"
grep -qF 'command: scripts/gpu-check .gpu-check/fixtures "$OUT"' "$tmp/out" || fail "--pack does not name the device command: $(cat "$tmp/out")"
rc=0; FAKE_APT_FAIL=libstb-dev PATH=$tmp/fake-apt:$PATH "$tmp/proj/scripts/gpu-check" --pack "$fx" >"$tmp/out" 2>"$tmp/err" || rc=$?
[ "$rc" = 1 ] || fail "a failed download: exit $rc, want 1"
grep -q "Unable to locate package libstb-dev" "$tmp/err" && grep -q "^gpu-check: apt-get download failed" "$tmp/err" ||
  fail "unclear download error: $(cat "$tmp/err")"
[ -f "$pack/debs/libstb-dev_1.0_amd64.deb" ] && cmp -s "$fx/sd15/case" "$pack/fixtures/sd15/case" || fail "a failed --pack damaged the old pack"
[ ! -e "$tmp/proj/.gpu-check.tmp" ] || fail "a failed --pack left .gpu-check.tmp"

# 50 steps of 0.1 s + 0.8 s decode + 0.2 s text, batch 8: 6.0 / 8 = 0.750 s an image; with
# fairness 50 x 0.15 + 1.0 = 8.5 / 8 = 1.0625 s, x1.42.
cat >"$tmp/bench.txt" <<'JSON'
some table lines first
{"device":"cuda","dtype":"fp16","batch":8,"text_encode_s":0.2,"sizes":[{"size":512,"step_s":0.1,"vae_decode_s":0.8,"fairness_rows":2,"fairness_step_s":0.15}]}
JSON
table=$("$src/scripts/gpu-check" --table-from "$tmp/bench.txt")
echo "$table"
grep -qF "| plain CFG | 512 | 0.100 s | 0.750 s | 1.00 |" <<<"$table" || fail "plain row"
grep -qF "| --fairness (+2 rows/image) | 512 | 0.150 s | 1.062 s | 1.42 |" <<<"$table" || fail "fairness row"
echo "gpu-check dry run and table: ok"
