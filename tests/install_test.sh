#!/usr/bin/env bash
# The installed fairdiff works from any folder: `cmake --install` into a temporary prefix,
# then, from a folder with neither the source nor the build tree,
#   - the installed CLI generates on the installed toy model with fair guidance (no
#     --model, no --attributes: both are found under PREFIX/share/fairdiff) and audits it;
#   - the example program builds against the installed package (find_package(fairdiff),
#     include/fairdiff alone) and runs.
set -euo pipefail
build=$(cd "$1" && pwd) source_dir=$(cd "$2" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmake --install "$build" --prefix "$tmp/prefix" >"$tmp/install.log"
mkdir "$tmp/elsewhere"
cd "$tmp/elsewhere"
unset FAIRDIFF_MODEL FAIRDIFF_DATA_DIR

echo "== installed CLI, from $PWD"
"$tmp/prefix/bin/fairdiff" generate -p "a photo of a kite" -N 2 --steps 3 --threads 1 -q \
  --fairness colour=red:50,blue:50 -o run
lines=$(wc -l <run/manifest.jsonl)
[ "$lines" -eq 2 ] || { echo "FAIL: $lines manifest lines, want 2"; exit 1; }
grep -q '"groups":{"colour":' run/manifest.jsonl || { echo "FAIL: no fairness groups recorded"; exit 1; }
"$tmp/prefix/bin/fairdiff" audit run >audit.txt
grep -q "classifier hue" audit.txt || { echo "FAIL: audit"; cat audit.txt; exit 1; }
echo "ok: 2 images, manifest and audit"

echo "== example program against the installed package"
cmake -S "$source_dir/examples" -B "$tmp/example" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$tmp/prefix" \
  >"$tmp/example-configure.log" || { cat "$tmp/example-configure.log"; exit 1; }
cmake --build "$tmp/example" -j2 >"$tmp/example-build.log" 2>&1 || { cat "$tmp/example-build.log"; exit 1; }
# Its data come from FAIRDIFF_DATA_DIR here: the binary lies outside the prefix.
FAIRDIFF_DATA_DIR="$tmp/prefix/share/fairdiff" "$tmp/example/fairdiff-embed-example" \
  "$tmp/prefix/share/fairdiff/models/toy" | tee example.txt
grep -q "images in their assigned group" example.txt
echo "ok: example built against the installed package and ran"
