#!/usr/bin/env bash
# The test command: installs and starts the local services (first run on a
# fresh machine installs them), checks formatting and lints, checks the
# Prometheus rules, alerts and dashboards and the Kubernetes manifests, then
# runs every test against the real services.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Incremental caches only help a developer's rebuilds; on CI they are
# gigabytes of disk for nothing.
if [[ -n "${CI:-}" ]]; then export CARGO_INCREMENTAL=0; fi
disk() { df -h --output=avail,target "$ROOT" | tail -1 | awk '{print "test: disk free: " $1 " on " $2}' >&2; }
disk

echo "test: starting local services" >&2
bash scripts/services.sh up

echo "test: cargo fmt --check" >&2
cargo fmt --all -- --check

echo "test: cargo clippy -D warnings" >&2
cargo clippy --workspace --all-targets -- -D warnings

echo "test: observability assets (promtool, amtool, dashboards)" >&2
bash scripts/check-observability.sh

echo "test: kubernetes manifests (kustomize, schemas, policy; reads the binaries' own settings)" >&2
cargo build --workspace
bash scripts/check-k8s.sh

disk
echo "test: cargo test (integration tests run one at a time: 2 cores)" >&2
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
set +e
cargo test --workspace --no-fail-fast -- --test-threads=1 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo's own last line is the doc-tests').
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;/) passed += $(i - 1); if ($(i) ~ /^failed;/) failed += $(i - 1) } }
     END { printf "tests: %d passed, %d failed\n", passed, failed }' "$LOG"
exit "$status"
