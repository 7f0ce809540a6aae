# shellcheck shell=bash
# The harness the check scripts share. Source it after `set -euo pipefail`:
# it makes a scratch directory $WORK (removed on exit), counts $passed and
# $failed, and defines `check NAME COMMAND...`, which runs COMMAND, prints
# "ok" or "FAIL" with NAME and, on failure, the command's output indented.

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

passed=0
failed=0

check() {
  local name="$1"
  shift
  if "$@" >"$WORK/out" 2>&1; then
    passed=$((passed + 1))
    printf 'ok   %s\n' "$name"
  else
    failed=$((failed + 1))
    printf 'FAIL %s\n' "$name"
    sed 's/^/     /' "$WORK/out"
  fi
}
