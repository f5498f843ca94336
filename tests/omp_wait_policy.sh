#!/usr/bin/env bash
# What libgomp took as its wait policy in the CLI's process (OMP_DISPLAY_ENV prints it from
# libgomp's own initialiser): PASSIVE when the user sets nothing (tools/main.cpp answers
# libgomp's getenv) and the user's choice otherwise.
# Usage: omp_wait_policy.sh FAIRDIFF_BINARY
set -euo pipefail
bin=$1
fail() { echo "FAIL: $*"; exit 1; }
# Newer libgomp (GCC 16 in Debian sid) puts the scope before each line: "  [host] OMP_WAIT_POLICY = ...".
policy() {
  env "$@" OMP_DISPLAY_ENV=true "$bin" --help 2>&1 |
    sed -n "s/^ *\(\[[a-z]*\] \)\{0,1\}OMP_WAIT_POLICY = '\(.*\)'$/\2/p"
}

unset_policy=$(policy -u OMP_WAIT_POLICY)
[ "$unset_policy" = PASSIVE ] || fail "unset: libgomp took '$unset_policy', want one line PASSIVE"
active=$(policy OMP_WAIT_POLICY=active)
[ "$active" = ACTIVE ] || fail "OMP_WAIT_POLICY=active: libgomp took '$active'"
passive=$(policy OMP_WAIT_POLICY=passive)
[ "$passive" = PASSIVE ] || fail "OMP_WAIT_POLICY=passive: libgomp took '$passive'"
env -u OMP_WAIT_POLICY "$bin" --help >/dev/null 2>&1 || fail "--help failed"
echo "libgomp's wait policy: unset -> PASSIVE, active -> ACTIVE, passive -> PASSIVE"
