#!/usr/bin/env bash
# What libgomp took as its wait policy in each of our processes (OMP_DISPLAY_ENV=verbose prints
# it from libgomp's own initialiser): PASSIVE when the user sets nothing
# (tools/omp_passive_default.cpp answers libgomp's getenv) and the user's choice otherwise.
# The policy line alone cannot tell: libgomp prints 'PASSIVE' for an unset variable too, while
# its workers spin 300000 rounds before they sleep. GOMP_SPINCOUNT tells: 0 only under PASSIVE.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: omp_wait_policy.sh BINARY..."; exit 2; }
fail() { echo "FAIL: $*"; exit 1; }
# Newer libgomp (GCC 16 in Debian sid) puts the scope before each line: "  [host] OMP_WAIT_POLICY = ...".
# "POLICY SPINCOUNT", e.g. "PASSIVE 0".
policy() {
  local bin=$1; shift
  env -u GOMP_SPINCOUNT "$@" OMP_DISPLAY_ENV=verbose "$bin" --help 2>&1 |
    sed -n "s/^ *\(\[[a-z]*\] \)\{0,1\}\(OMP_WAIT_POLICY\|GOMP_SPINCOUNT\) = '\(.*\)'$/\3/p" | paste -sd' '
}

for bin in "$@"; do
  name=$(basename "$bin")
  unset_policy=$(policy "$bin" -u OMP_WAIT_POLICY)
  [ "$unset_policy" = "PASSIVE 0" ] || fail "$name, unset: libgomp took '$unset_policy' (policy, spin count), want 'PASSIVE 0'"
  active=$(policy "$bin" OMP_WAIT_POLICY=active)
  case $active in "ACTIVE "[1-9]*) ;; *) fail "$name, OMP_WAIT_POLICY=active: libgomp took '$active'" ;; esac
  passive=$(policy "$bin" OMP_WAIT_POLICY=passive)
  [ "$passive" = "PASSIVE 0" ] || fail "$name, OMP_WAIT_POLICY=passive: libgomp took '$passive'"
  env -u OMP_WAIT_POLICY "$bin" --help >/dev/null 2>&1 || fail "$name --help failed"
  echo "$name: libgomp's wait policy: unset -> PASSIVE (spin 0), active -> ACTIVE, passive -> PASSIVE"
done
