#!/usr/bin/env bash
# Runs fairdiff-parity over the golden fixtures; exit 77 (ctest: skipped) when they are absent.
set -u
parity=$1 source_dir=$2
fixtures=${FAIRDIFF_FIXTURES:-$source_dir/../shared/fixtures}
if [ ! -d "$fixtures" ]; then
  echo "SKIP: golden fixtures not found at $fixtures (set FAIRDIFF_FIXTURES)"
  exit 77
fi
# Every convolution path: plain weights through oneDNN (the default) and as matrix products
# (FAIRDIFF_CONV=gemm), and prepacked (--prepack-weights).
FAIRDIFF_CONV=onednn "$parity" "$fixtures" || exit 1
FAIRDIFF_CONV=gemm "$parity" "$fixtures" || exit 1
exec "$parity" "$fixtures" --prepack-weights
