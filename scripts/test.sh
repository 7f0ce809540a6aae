#!/usr/bin/env bash
# The test command: installs and starts the local services (first run on a
# fresh machine installs them), checks formatting and lints, checks the
# Prometheus rules, alerts and dashboards, then runs every test against the
# real services.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

echo "test: starting local services" >&2
bash scripts/services.sh up

echo "test: cargo fmt --check" >&2
cargo fmt --all -- --check

echo "test: cargo clippy -D warnings" >&2
cargo clippy --workspace --all-targets -- -D warnings

echo "test: observability assets (promtool, amtool, dashboards)" >&2
bash scripts/check-observability.sh

echo "test: cargo test (integration tests run one at a time: 2 cores)" >&2
cargo test --workspace --no-fail-fast -- --test-threads=1
