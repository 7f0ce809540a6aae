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
#     installed into .services/venv-k8s when missing); a kind it has no
#     schema for fails, except KEDA's ScaledObject, which validates against
#     the CRD of KEDA $KEDA_VERSION (the version `make keda` installs; its Go
#     module from the Go module proxy, checked against a pinned SHA-256,
#     kept in .services/keda-$KEDA_VERSION), strictly: no unknown field;
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
# KEDA: the Makefile's KEDA_VERSION (checked below), its Go module's SHA-256.
KEDA_VERSION="$(make -s print-keda-version 2>/dev/null || true)"
KEDA_MODULE_SHA256="872fa4b9d4282969ece753727ca31a7a31eaf341a52fa0972148297521ca9a75"
KEDA_PINNED="2.21.1"
KEDA_DIR="$ROOT/.services/keda-$KEDA_PINNED"
GOPROXY_URL="${GOPROXY_URL:-https://proxy.golang.org}"
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

# kubernetes-validate passes a kind it has no schema for with a warning: here
# that fails, unless the kind is one whose CRD schema validate_crd_objects
# checks.
validate() {
  local out
  out=$("$VENV/bin/kubernetes-validate" --kubernetes-version "$K8S_VERSION" --strict --quiet "$1" 2>&1) || {
    printf '%s\n' "$out"
    return 1
  }
  if printf '%s\n' "$out" | grep "Couldn't find schema" |
    grep -v "kind ScaledObject with api version keda.sh/v1alpha1 " | grep -q .; then
    printf '%s\n' "$out"
    return 1
  fi
}

# KEDA's ScaledObject CRD, from KEDA's Go module (the Go module proxy serves
# it as a zip; config/crd/bases holds the CRDs KEDA installs).
ensure_keda_crd() {
  [ -s "$KEDA_DIR/keda.sh_scaledobjects.yaml" ] && return 0
  mkdir -p "$KEDA_DIR"
  local zip="$KEDA_DIR/module.zip"
  curl -fsS --retry 3 --max-time 120 -o "$zip" \
    "$GOPROXY_URL/github.com/kedacore/keda/v2/@v/v$KEDA_PINNED.zip"
  echo "$KEDA_MODULE_SHA256  $zip" | sha256sum -c --quiet - || {
    echo "the KEDA module from $GOPROXY_URL is not the one pinned (SHA-256 $KEDA_MODULE_SHA256)"
    rm -f "$zip"
    return 1
  }
  python3 - "$zip" "$KEDA_DIR" "github.com/kedacore/keda/v2@v$KEDA_PINNED/config/crd/bases/keda.sh_scaledobjects.yaml" <<'PY'
import os
import sys
import zipfile
with zipfile.ZipFile(sys.argv[1]) as module:
    data = module.read(sys.argv[3])
target = os.path.join(sys.argv[2], os.path.basename(sys.argv[3]))
with open(target + ".tmp", "wb") as f:
    f.write(data)
os.replace(target + ".tmp", target)
PY
  rm -f "$zip"
}

# Every object of FILE whose kind a CRD in KEDA_DIR defines, against that
# CRD's openAPIV3Schema for its version. Strict like `kubectl apply`'s field
# validation: an object schema that does not allow unknown fields
# (x-kubernetes-preserve-unknown-fields, additionalProperties) rejects them.
validate_crd_objects() {
  "$VENV/bin/python" - "$1" "$KEDA_DIR" <<'PY'
import glob
import os
import sys
import jsonschema
import yaml

def strict(schema):
    if not isinstance(schema, dict):
        return schema
    schema = {k: strict(v) if k in ("items", "additionalProperties") else v for k, v in schema.items()}
    if "properties" in schema:
        schema["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    return schema

schemas = {}
for path in glob.glob(os.path.join(sys.argv[2], "*.yaml")):
    crd = yaml.safe_load(open(path, encoding="utf-8"))
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    for version in crd["spec"]["versions"]:
        if version.get("served"):
            schemas[(group + "/" + version["name"], kind)] = strict(version["schema"]["openAPIV3Schema"])
checked, errors = 0, []
for doc in yaml.safe_load_all(open(sys.argv[1], encoding="utf-8")):
    if not doc:
        continue
    schema = schemas.get((doc.get("apiVersion"), doc.get("kind")))
    if schema is None:
        continue
    checked += 1
    name = "%s/%s" % (doc["kind"], doc["metadata"]["name"])
    for error in jsonschema.Draft7Validator(schema).iter_errors(doc):
        errors.append("%s: %s at %s" % (name, error.message, "/".join(map(str, error.absolute_path)) or "/"))
for error in errors:
    print(error)
print("%d object(s) of %d CRD kind(s) checked" % (checked, len({k for _, k in schemas})))
sys.exit(1 if errors else 0)
PY
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
if [ "$KEDA_VERSION" != "$KEDA_PINNED" ]; then
  fail "the Makefile's KEDA_VERSION ($KEDA_VERSION) is not the version whose CRD this script pins ($KEDA_PINNED): update KEDA_PINNED and KEDA_MODULE_SHA256 together"
fi
if ! ensure_keda_crd >"$WORK/keda.log" 2>&1; then
  fail "cannot fetch KEDA $KEDA_PINNED's ScaledObject CRD from $GOPROXY_URL" "$(tail -n 5 "$WORK/keda.log")"
fi
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
    if grep -q '^kind: ScaledObject$' "$out"; then
      check "ScaledObjects of $dir against KEDA $KEDA_PINNED's CRD schema (strict)" validate_crd_objects "$out"
    fi
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
check "Makefile: secrets k3d-up keda images deploy demo-k8s k3d-down render check parse (make -n)" \
  make -n -s secrets k3d-up keda images deploy demo-k8s k3d-down render check
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
