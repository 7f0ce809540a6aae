#!/usr/bin/env bash
# Offline checks of the Kubernetes deployment (k8s/, Dockerfile, Makefile); no
# cluster and no Docker engine needed:
#   - k8s/generate-secrets.sh writes the Secrets' env files the overlay reads
#     (random values, into the git-ignored k8s/overlays/local/secrets/, only
#     where none exist: a fresh clone has none, and nothing is committed);
#   - every kustomization under k8s/ renders with
#     `kubectl kustomize --load-restrictor LoadRestrictionsNone`;
#   - every rendered object validates against the Kubernetes $K8S_VERSION
#     schemas (kubernetes-validate --strict, offline: the schemas ship with it,
#     installed into .services/venv-k8s when missing);
#   - the policy tests, k8s/tests/test_policy.py (probes, resources, non-root,
#     PVCs, images, env vars against the binaries' --help; the broker: Apache
#     Kafka's official image in KRaft mode, its log dirs on a PVC, no
#     auto-created topics, replication factor 1 for the offsets and transaction
#     topics; every KAFKA_BROKERS on the Service kafka; topic-init creating the
#     processor's topics; the processor's static membership (pod name) and
#     session timeout; no committed secret literal, every referenced Secret key
#     generated; the app role for PostgreSQL and the db-migrate Job; the
#     processor's admin token from a Secret; a NetworkPolicy per component, a
#     default deny per namespace, who reaches which port; ... and negative
#     self-checks); the binaries come from
#     target/debug (BIN_DIR), built with cargo only when missing;
#   - the in-cluster Prometheus config passes promtool (when promtool is here);
#   - the Makefile's targets parse (make -n);
#   - bash -n and shellcheck on every script under scripts/ and k8s/, and on
#     the shell snippets the manifests run (`bash -c` in the init containers).
# Prints one line per check and ends with "k8s: N passed, M failed"; exits 1
# when any check failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

K8S_VERSION="${K8S_VERSION:-1.31.0}"
KUBERNETES_VALIDATE_VERSION="1.37.0"
VENV="$ROOT/.services/venv-k8s"
BIN_DIR="${BIN_DIR:-$ROOT/target/debug}"
OVERLAY="k8s/overlays/local"

# shellcheck source-path=SCRIPTDIR source=lib/checks.sh
source "$ROOT/scripts/lib/checks.sh"

fail() {
  failed=$((failed + 1))
  printf 'FAIL %s\n' "$1"
  if [ $# -gt 1 ]; then printf '     %s\n' "${@:2}"; fi
}

finish() {
  echo "k8s: $passed passed, $failed failed"
  [ "$failed" -eq 0 ]
}

apt_install() {
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
  export DEBIAN_FRONTEND=noninteractive
  if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
    "${sudo[@]}" apt-get update -qq
  fi
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" >"$WORK/apt.log" 2>&1 || {
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" >"$WORK/apt.log" 2>&1
  }
}

ensure_venv() {
  if [ -x "$VENV/bin/kubernetes-validate" ] &&
    "$VENV/bin/kubernetes-validate" --version 2>/dev/null | grep -qx "$KUBERNETES_VALIDATE_VERSION"; then
    return 0
  fi
  echo "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION into $VENV" >&2
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
}

ensure_binaries() {
  local missing=0 binary
  for binary in processor sqs-consumer loadgen streamctl; do
    [ -x "$BIN_DIR/$binary" ] || missing=1
  done
  [ "$missing" -eq 0 ] && return 0
  command -v cargo >/dev/null 2>&1 || {
    echo "the binaries are missing from $BIN_DIR and cargo is not installed" >&2
    return 1
  }
  echo "building the binaries (cargo build -p stream-bins -p loadgen)" >&2
  cargo build -p stream-bins -p loadgen >&2
  [ -x "$BIN_DIR/processor" ] || {
    echo "cargo build left no binaries in $BIN_DIR (set BIN_DIR)" >&2
    return 1
  }
}

render() {
  kubectl kustomize --load-restrictor LoadRestrictionsNone "$1"
}

validate() {
  "$VENV/bin/kubernetes-validate" --kubernetes-version "$K8S_VERSION" --strict --quiet "$1"
}

# The in-cluster Prometheus config through promtool. Debian's promtool is built
# without Kubernetes service discovery, so kubernetes_sd_configs become a
# placeholder static_configs first; everything else (relabelling, alerting,
# rule_files) is checked as written.
promtool_config() {
  "$VENV/bin/python" - "$1" "$WORK/prometheus-static.yml" <<'PY'
import sys
import yaml
with open(sys.argv[1], encoding="utf-8") as f:
    config = yaml.safe_load(f)
for job in config.get("scrape_configs", []):
    if job.pop("kubernetes_sd_configs", None) is not None:
        job.setdefault("static_configs", []).append({"targets": ["127.0.0.1:1"]})
with open(sys.argv[2], "w", encoding="utf-8") as f:
    yaml.safe_dump(config, f)
PY
  promtool check config "$WORK/prometheus-static.yml"
}

# The Makefile's IMAGE, the one place the image is named, is NAME:TAG.
image_variable() {
  local image
  image=$(make -s print-image)
  echo "IMAGE=$image"
  [[ "$image" =~ ^[a-z0-9][a-z0-9./_-]*:[A-Za-z0-9_][A-Za-z0-9._-]*$ ]]
}

# Writes every inline script of the rendered manifests (a container whose
# command is a shell with -c) to DIR, one file each, for bash -n and shellcheck.
extract_inline_scripts() {
  "$VENV/bin/python" - "$WORK/overlay.yaml" "$1" <<'PY'
import os
import sys
import yaml
out = sys.argv[2]
os.makedirs(out, exist_ok=True)
for doc in yaml.safe_load_all(open(sys.argv[1], encoding="utf-8")):
    if not doc or doc.get("kind") not in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        continue
    pod = doc["spec"]["template"]["spec"]
    for container in pod.get("initContainers", []) + pod.get("containers", []):
        argv = list(container.get("command") or []) + list(container.get("args") or [])
        shells = {"/bin/bash": "bash", "bash": "bash", "/bin/sh": "sh", "sh": "sh"}
        if len(argv) >= 3 and argv[0] in shells and argv[1] == "-c":
            name = "%s-%s-%s.sh" % (doc["kind"].lower(), doc["metadata"]["name"], container["name"])
            with open(os.path.join(out, name), "w", encoding="utf-8") as f:
                f.write("#!/usr/bin/env %s\n%s" % (shells[argv[0]], argv[2]))
PY
}

policy_tests() {
  set +e
  K8S_RENDERED="$WORK/overlay.yaml" BIN_DIR="$BIN_DIR" K8S_ROOT="$ROOT" \
    "$VENV/bin/python" k8s/tests/test_policy.py >"$WORK/policy.out" 2>&1
  local status=$?
  set -e
  local summary
  summary=$(grep -E '^policy: [0-9]+ passed, [0-9]+ failed$' "$WORK/policy.out" | tail -n1 || true)
  grep -v -E '^policy: [0-9]+ passed, [0-9]+ failed$' "$WORK/policy.out" || true
  if [ -z "$summary" ]; then
    fail "policy tests (k8s/tests/test_policy.py) did not finish (exit $status)"
    return
  fi
  local p m
  p=$(printf '%s' "$summary" | sed -E 's/^policy: ([0-9]+) passed.*/\1/')
  m=$(printf '%s' "$summary" | sed -E 's/.* ([0-9]+) failed$/\1/')
  passed=$((passed + p))
  failed=$((failed + m))
  if [ "$m" -eq 0 ] && [ "$status" -ne 0 ]; then
    fail "policy tests exited $status"
  fi
}

# --- tools
if ! command -v kubectl >/dev/null 2>&1; then
  fail "kubectl is missing: install kubectl 1.27 or newer (its built-in kustomize v5 renders k8s/)"
  finish
  exit 1
fi
echo "kubectl: $(kubectl version --client 2>/dev/null | sed -n 's/^Client Version: //p'), kustomize $(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: //p')"
command -v python3 >/dev/null 2>&1 || { fail "python3 is missing (needed for kubernetes-validate and the policy tests)"; finish; exit 1; }
if ! ensure_venv >"$WORK/venv.log" 2>&1; then
  fail "cannot install kubernetes-validate into $VENV" "$(tail -n 5 "$WORK/venv.log")"
  finish
  exit 1
fi
echo "kubernetes-validate: $("$VENV/bin/kubernetes-validate" --version), schemas of Kubernetes $K8S_VERSION (offline, strict)"
if ! command -v shellcheck >/dev/null 2>&1; then
  echo "installing shellcheck with apt-get" >&2
  apt_install shellcheck || true
fi

# --- the Secrets' values (the overlay's secretGenerator reads them)
check "k8s/generate-secrets.sh: the Secrets' env files in $OVERLAY/secrets (generated where absent)" \
  bash k8s/generate-secrets.sh

# --- render and validate every kustomization
kustomizations=()
while IFS= read -r dir; do kustomizations+=("$dir"); done \
  < <(find k8s -name kustomization.yaml | sed 's|/kustomization.yaml$||' | sort)
if [ "${#kustomizations[@]}" -eq 0 ]; then
  fail "no kustomization.yaml under k8s/"
fi
for dir in "${kustomizations[@]}"; do
  out="$WORK/$(printf '%s' "$dir" | tr '/' '_').yaml"
  if render "$dir" >"$out" 2>"$WORK/render.err"; then
    passed=$((passed + 1))
    printf 'ok   render %s (%s objects)\n' "$dir" "$(grep -c '^kind:' "$out")"
    check "kubernetes-validate $dir (Kubernetes $K8S_VERSION, strict)" validate "$out"
  else
    fail "render $dir" "$(cat "$WORK/render.err")"
  fi
done
if [ -s "$WORK/$(printf '%s' "$OVERLAY" | tr '/' '_').yaml" ]; then
  cp "$WORK/$(printf '%s' "$OVERLAY" | tr '/' '_').yaml" "$WORK/overlay.yaml"
else
  fail "the overlay $OVERLAY did not render: no policy tests"
fi

# --- policy tests
if [ -s "$WORK/overlay.yaml" ]; then
  if ensure_binaries >"$WORK/build.log" 2>&1; then
    policy_tests
  else
    fail "the project's binaries (for their --help)" "$(tail -n 5 "$WORK/build.log")"
  fi
fi

# --- Prometheus config, Makefile
if command -v promtool >/dev/null 2>&1; then
  check "promtool check config k8s/base/observability/prometheus/prometheus.yml (Kubernetes SD as static)" \
    promtool_config k8s/base/observability/prometheus/prometheus.yml
else
  echo "skip promtool check config (promtool not installed: scripts/check-observability.sh installs it)"
fi
check "Makefile: secrets k3d-up images deploy demo-k8s k3d-down render check parse (make -n)" \
  make -n -s secrets k3d-up images deploy demo-k8s k3d-down render check
check "Makefile: IMAGE ($(make -s print-image 2>/dev/null || true)) is a name:tag reference" image_variable

# --- shell scripts
scripts=()
while IFS= read -r script; do scripts+=("$script"); done < <(find scripts k8s -name '*.sh' -type f | sort)
inline=()
if [ -s "$WORK/overlay.yaml" ] && extract_inline_scripts "$WORK/inline" 2>"$WORK/inline.err"; then
  while IFS= read -r script; do inline+=("$script"); done < <(find "$WORK/inline" -name '*.sh' -type f | sort)
elif [ -s "$WORK/overlay.yaml" ]; then
  fail "extract the manifests' inline scripts" "$(cat "$WORK/inline.err")"
fi
for script in "${scripts[@]}"; do
  check "bash -n $script" bash -n "$script"
done
for script in ${inline[@]+"${inline[@]}"}; do
  check "bash -n inline script of $(basename "$script" .sh) (rendered manifests)" bash -n "$script"
done
if command -v shellcheck >/dev/null 2>&1; then
  for script in "${scripts[@]}"; do
    check "shellcheck $script" shellcheck -x "$script"
  done
  for script in ${inline[@]+"${inline[@]}"}; do
    check "shellcheck inline script of $(basename "$script" .sh)" shellcheck "$script"
  done
else
  fail "shellcheck is missing and apt-get could not install it"
fi

finish
