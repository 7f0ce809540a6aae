"""Policy tests for the rendered Kubernetes manifests (k8s/overlays/local).

Run by scripts/check-k8s.sh with the Python of its venv (PyYAML comes with
kubernetes-validate):

    K8S_RENDERED=rendered.yaml python k8s/tests/test_policy.py

Without K8S_RENDERED it renders the overlay itself with kubectl. BIN_DIR
(default target/debug) holds the project's binaries; their `--help` is the
list of settings a container may set.

What every workload must have:
  - Deployment/StatefulSet/DaemonSet: liveness and readiness probes on every
    container;
  - every container and init container, Jobs included: cpu and memory
    requests and limits;
  - every pod: runAsNonRoot true and a non-zero runAsUser (pod or container
    level), plus the rest of the Pod Security "restricted" profile the
    namespaces enforce (no privilege escalation, capabilities drop ALL,
    RuntimeDefault seccomp);
  - every StatefulSet (Redpanda, Postgres and ClickHouse among them): a
    volumeClaimTemplate, mounted;
  - images: the Makefile's IMAGE for the project's workloads, every other
    image a pinned third-party one (a tag that is not `latest`, or a digest);
  - a container of the project's image runs one of its binaries, and every
    environment variable it sets is a setting that binary reads (the
    `[env: NAME` entries of its `--help`, or its subcommand's);
and the glue: metrics ports and scrape annotations agree with METRICS_ADDR,
the processor runs 2 replicas under a PodDisruptionBudget, the ConfigMaps
carry observability/ verbatim, the Dockerfile ships the binaries the
manifests run as the uid they run as, the k3d config names the Makefile's
cluster. The negative self-checks feed each rule a small bad manifest and
expect it rejected.

Prints one line per test ("ok   policy: ..." / "FAIL policy: ...") and ends
with "policy: N passed, M failed"; exits 1 when any failed.
"""

import fnmatch
import os
import re
import subprocess
import sys
import unittest

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.environ.get("K8S_ROOT") or os.path.abspath(os.path.join(HERE, "..", ".."))
OVERLAY = os.path.join(ROOT, "k8s", "overlays", "local")
BIN_DIR = os.environ.get("BIN_DIR") or os.path.join(ROOT, "target", "debug")

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")
LONG_RUNNING_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
PROJECT_BINARIES = ("processor", "sqs-consumer", "loadgen", "streamctl")
STATEFUL_PARTS = ("redpanda", "postgres", "clickhouse")
ENV_NAME = re.compile(r"\[env: ([A-Za-z_][A-Za-z0-9_]*)")


# ---------------------------------------------------------------- inputs


def load_rendered():
    path = os.environ.get("K8S_RENDERED")
    if path:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    else:
        text = subprocess.run(
            ["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", OVERLAY],
            check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(text) if doc]


def makefile_variable(name):
    """A Makefile variable as make sees it (`make -s print-NAME`), or as written."""
    target = "print-" + name.lower()
    try:
        out = subprocess.run(["make", "-s", "--no-print-directory", "-C", ROOT, target],
                             check=True, capture_output=True, text=True).stdout.strip()
        if out:
            return out
    except (OSError, subprocess.CalledProcessError):
        pass
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
        match = re.search(r"^%s\s*\??=\s*(\S+)" % re.escape(name), f.read(), re.M)
    return match.group(1) if match else None


_HELP_CACHE = {}


def binary_settings(command):
    """The env names `BIN_DIR/<command...> --help` lists, e.g. ("loadgen", "sqs")."""
    command = tuple(command)
    if command not in _HELP_CACHE:
        binary = os.path.join(BIN_DIR, command[0])
        out = subprocess.run([binary, *command[1:], "--help"], check=True,
                             capture_output=True, text=True, timeout=60).stdout
        _HELP_CACHE[command] = set(ENV_NAME.findall(out))
    return _HELP_CACHE[command]


# ---------------------------------------------------------------- walking


def name_of(doc):
    return "%s/%s" % (doc.get("kind"), doc.get("metadata", {}).get("name"))


def pod_template(doc):
    """(pod metadata, pod spec) of a workload, or None."""
    kind = doc.get("kind")
    if kind not in WORKLOAD_KINDS:
        return None
    spec = doc.get("spec", {})
    if kind == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    template = spec.get("template", {})
    return template.get("metadata", {}), template.get("spec", {})


def workloads(docs):
    for doc in docs:
        found = pod_template(doc)
        if found is not None:
            yield doc, found[0], found[1]


def containers(pod_spec, init=True):
    """(is_init, container) for every container of a pod spec."""
    for container in pod_spec.get("initContainers", []) if init else []:
        yield True, container
    for container in pod_spec.get("containers", []):
        yield False, container


def where(doc, container, is_init=False):
    return "%s %scontainer %s" % (name_of(doc), "init " if is_init else "", container.get("name"))


def env_value(container, name):
    for entry in container.get("env", []):
        if entry.get("name") == name:
            return entry.get("value")
    return None


# ---------------------------------------------------------------- rules
# Each rule takes the rendered documents (and what else it needs) and returns
# a list of violations, one string each: empty means the rule holds.


def rule_probes(docs):
    bad = []
    for doc, _, pod in workloads(docs):
        if doc["kind"] not in LONG_RUNNING_KINDS:
            continue
        for _, container in containers(pod, init=False):
            for probe in ("livenessProbe", "readinessProbe"):
                if not container.get(probe):
                    bad.append("%s: no %s" % (where(doc, container), probe))
    return bad


def rule_resources(docs):
    bad = []
    for doc, _, pod in workloads(docs):
        for is_init, container in containers(pod):
            resources = container.get("resources") or {}
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if not (resources.get(kind) or {}).get(resource):
                        bad.append("%s: no %s.%s" % (where(doc, container, is_init), kind, resource))
    return bad


def effective(pod, container, field):
    """A securityContext field as the kubelet applies it: container over pod."""
    value = (container.get("securityContext") or {}).get(field)
    if value is None:
        value = (pod.get("securityContext") or {}).get(field)
    return value


def rule_security(docs):
    """Non-root, and the rest of Pod Security "restricted"."""
    bad = []
    for doc, _, pod in workloads(docs):
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(flag):
                bad.append("%s: %s" % (name_of(doc), flag))
        for volume in pod.get("volumes", []):
            if "hostPath" in volume:
                bad.append("%s: hostPath volume %s" % (name_of(doc), volume.get("name")))
        for is_init, container in containers(pod):
            at = where(doc, container, is_init)
            context = container.get("securityContext") or {}
            if effective(pod, container, "runAsNonRoot") is not True:
                bad.append("%s: runAsNonRoot is not true" % at)
            user = effective(pod, container, "runAsUser")
            if not isinstance(user, int) or user == 0:
                bad.append("%s: runAsUser %r (want a non-zero uid)" % (at, user))
            if context.get("privileged"):
                bad.append("%s: privileged" % at)
            if context.get("allowPrivilegeEscalation") is not False:
                bad.append("%s: allowPrivilegeEscalation is not false" % at)
            drop = (context.get("capabilities") or {}).get("drop") or []
            if "ALL" not in drop:
                bad.append("%s: capabilities do not drop ALL" % at)
            if (context.get("capabilities") or {}).get("add"):
                bad.append("%s: adds capabilities" % at)
            seccomp = effective(pod, container, "seccompProfile") or {}
            if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
                bad.append("%s: seccompProfile is not RuntimeDefault" % at)
    return bad


def rule_statefulsets(docs, required=STATEFUL_PARTS):
    bad = []
    names = set()
    for doc in docs:
        if doc.get("kind") != "StatefulSet":
            continue
        names.add(doc["metadata"]["name"])
        claims = [t.get("metadata", {}).get("name") for t in doc["spec"].get("volumeClaimTemplates", [])]
        if not claims:
            bad.append("%s: no volumeClaimTemplates" % name_of(doc))
            continue
        mounted = {m.get("name") for _, c in containers(doc["spec"]["template"]["spec"])
                   for m in c.get("volumeMounts", [])}
        for claim in claims:
            if claim not in mounted:
                bad.append("%s: claim %s is mounted by no container" % (name_of(doc), claim))
    for part in required:
        if part not in names:
            bad.append("no StatefulSet %s (its data must be on a PersistentVolumeClaim)" % part)
    return bad


def image_repository(image):
    """The repository of an image reference, without tag or digest."""
    ref = image.split("@", 1)[0]
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    return ref[:colon] if colon > slash else ref


def is_pinned(image):
    if "@sha256:" in image:
        return True
    ref = image.split("@", 1)[0]
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon <= slash:
        return False
    tag = ref[colon + 1:]
    return bool(tag) and tag != "latest"


def rule_images(docs, project_image):
    bad = []
    project_repo = image_repository(project_image)
    for doc, _, pod in workloads(docs):
        for is_init, container in containers(pod):
            image = container.get("image", "")
            at = where(doc, container, is_init)
            if image == project_image:
                continue
            if image_repository(image) == project_repo or image_repository(image).endswith("/" + project_repo):
                bad.append("%s: image %s is not the Makefile's IMAGE %s" % (at, image, project_image))
            elif not is_pinned(image):
                bad.append("%s: image %r is neither the Makefile's IMAGE %s nor a pinned third-party image"
                           % (at, image, project_image))
    return bad


def project_containers(docs, project_image):
    for doc, meta, pod in workloads(docs):
        for is_init, container in containers(pod):
            if container.get("image") == project_image:
                yield doc, meta, pod, is_init, container


def container_command(container):
    """The argv a container runs: command + args (the image sets no ENTRYPOINT)."""
    return list(container.get("command") or []) + list(container.get("args") or [])


def help_command(argv):
    """The command whose --help lists the settings of argv: the binary and its subcommands."""
    binary = os.path.basename(argv[0])
    words = [binary]
    if binary == "loadgen" and len(argv) > 1 and argv[1] == "sqs":
        words.append("sqs")
    elif binary == "streamctl":
        for word in argv[1:3]:
            if word.startswith("-"):
                break
            words.append(word)
    return words


def declared_env(container, docs):
    """Env names a container sets: env entries and the keys envFrom brings in."""
    names = [entry["name"] for entry in container.get("env", [])]
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        for kind, ref in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if ref not in source:
                continue
            wanted = source[ref].get("name")
            for doc in docs:
                if doc.get("kind") == kind and doc["metadata"]["name"] == wanted:
                    keys = list((doc.get("data") or {})) + list((doc.get("stringData") or {}))
                    names += [prefix + key for key in keys]
    return names


def rule_env(docs, project_image, settings=binary_settings):
    bad = []
    for doc, _, _, is_init, container in project_containers(docs, project_image):
        at = where(doc, container, is_init)
        argv = container_command(container)
        if not argv:
            bad.append("%s: no command: say which binary runs" % at)
            continue
        if os.path.basename(argv[0]) not in PROJECT_BINARIES:
            bad.append("%s: runs %r, not one of the image's binaries %s" % (at, argv[0], ", ".join(PROJECT_BINARIES)))
            continue
        command = help_command(argv)
        known = settings(command)
        for name in declared_env(container, docs):
            if name not in known:
                bad.append("%s: env %s is not a setting of `%s` (its --help lists: %s)"
                           % (at, name, " ".join(command), ", ".join(sorted(known))))
    return bad


# What each binary serves for its probes on the metrics port: the processor's
# admin endpoint has real health (the supervisor runs) and readiness (all five
# actors run; 503 while it restarts them); the others only serve /metrics.
PROBE_PATHS = {"processor": {"livenessProbe": "/healthz", "readinessProbe": "/readyz"}}


def rule_metrics(docs, project_image):
    """METRICS_ADDR binds 0.0.0.0, and its port is the `metrics` port, the scrape annotation's and the probes'."""
    bad = []
    for doc, meta, _, is_init, container in project_containers(docs, project_image):
        at = where(doc, container, is_init)
        addr = env_value(container, "METRICS_ADDR")
        if addr is None:
            continue
        host, _, port = addr.rpartition(":")
        if host != "0.0.0.0":
            bad.append("%s: METRICS_ADDR %s does not bind 0.0.0.0 (unreachable from Prometheus)" % (at, addr))
        ports = {p.get("name"): p.get("containerPort") for p in container.get("ports", [])}
        if str(ports.get("metrics")) != port:
            bad.append("%s: container port `metrics` is %s, METRICS_ADDR says %s" % (at, ports.get("metrics"), port))
        annotations = meta.get("annotations") or {}
        if annotations.get("prometheus.io/scrape") != "true":
            bad.append("%s: pod lacks prometheus.io/scrape: \"true\"" % at)
        if annotations.get("prometheus.io/port") != port:
            bad.append("%s: prometheus.io/port %r, METRICS_ADDR port %s" % (at, annotations.get("prometheus.io/port"), port))
        binary = (container_command(container) or [""])[0]
        for probe in ("livenessProbe", "readinessProbe"):
            path = PROBE_PATHS.get(binary, {}).get(probe, "/metrics")
            get = (container.get(probe) or {}).get("httpGet")
            if get and (get.get("path") != path or str(ports.get(get.get("port"), get.get("port"))) != port):
                bad.append("%s: %s is not GET %s on the metrics port" % (at, probe, path))
    return bad


def find(docs, kind, name):
    for doc in docs:
        if doc.get("kind") == kind and doc["metadata"]["name"] == name:
            return doc
    return None


def rule_processor(docs, project_image):
    bad = []
    deployment = find(docs, "Deployment", "processor")
    if deployment is None:
        return ["no Deployment processor"]
    if deployment["spec"].get("replicas", 1) < 2:
        bad.append("processor: replicas %s, want 2 (one consumer group)" % deployment["spec"].get("replicas"))
    labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    if labels.get("app.kubernetes.io/name") != "processor":
        bad.append("processor pods are not labelled app.kubernetes.io/name=processor (Prometheus job, rules' up{job=\"processor\"})")
    container = next((c for c in deployment["spec"]["template"]["spec"]["containers"]
                      if c.get("image") == project_image), None)
    if container is None:
        return bad + ["processor: no container runs %s" % project_image]
    if env_value(container, "FETCH_REWIND") != "0":
        bad.append("processor: FETCH_REWIND must be \"0\" on Redpanda (the rewind is for Tansu)")
    group = env_value(container, "KAFKA_GROUP")
    if not group:
        bad.append("processor: KAFKA_GROUP not set: both replicas must share one group")
    budgets = [d for d in docs if d.get("kind") == "PodDisruptionBudget"
               and all(labels.get(k) == v for k, v in d["spec"].get("selector", {}).get("matchLabels", {}).items())]
    if not budgets:
        bad.append("processor: no PodDisruptionBudget selects its pods")
    elif all(b["spec"].get("minAvailable") != 1 for b in budgets):
        bad.append("processor: PodDisruptionBudget is not minAvailable: 1")
    return bad


def configmap(docs, prefix, namespace):
    """The generated ConfigMap whose name is prefix plus kustomize's hash."""
    for doc in docs:
        meta = doc.get("metadata", {})
        if (doc.get("kind") == "ConfigMap" and meta.get("namespace") == namespace
                and re.fullmatch(re.escape(prefix) + r"(-[a-z0-9]{10})?", meta.get("name", ""))):
            return doc
    return None


def rule_observability(docs):
    """ConfigMaps carry observability/ verbatim; Grafana's datasource has uid prometheus."""
    bad = []
    expected = [
        ("prometheus-rules", "rules.yml", "observability/prometheus/rules.yml"),
        ("alertmanager-config", "alertmanager.yml", "observability/alertmanager/alertmanager.yml"),
    ]
    dash_dir = os.path.join(ROOT, "observability", "grafana", "dashboards")
    for board in sorted(os.listdir(dash_dir)):
        if board.endswith(".json"):
            expected.append(("grafana-dashboards", board, "observability/grafana/dashboards/" + board))
    for prefix, key, path in expected:
        cm = configmap(docs, prefix, "observability")
        if cm is None:
            bad.append("no ConfigMap %s in observability" % prefix)
            continue
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            if (cm.get("data") or {}).get(key) != f.read():
                bad.append("ConfigMap %s key %s differs from %s" % (cm["metadata"]["name"], key, path))
    cm = configmap(docs, "grafana-datasources", "observability")
    sources = yaml.safe_load(next(iter((cm or {}).get("data", {}).values()), "") or "{}") or {}
    if not any(s.get("uid") == "prometheus" and s.get("type") == "prometheus" for s in sources.get("datasources", [])):
        bad.append("Grafana has no provisioned datasource with type prometheus and uid prometheus")
    cm = configmap(docs, "prometheus-config", "observability")
    config = yaml.safe_load(next(iter((cm or {}).get("data", {}).values()), "") or "{}") or {}
    relabels = [r for job in config.get("scrape_configs", []) for r in job.get("relabel_configs", [])]
    if not any(r.get("target_label") == "job" and r.get("source_labels") == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"]
               for r in relabels):
        bad.append("Prometheus: no scrape config sets job from app.kubernetes.io/name")
    if not config.get("alerting", {}).get("alertmanagers"):
        bad.append("Prometheus: no alertmanagers")
    rules_dirs = mount_paths(docs, "prometheus", "prometheus-rules")
    if not any(fnmatch.fnmatch(os.path.join(d, "rules.yml"), pattern)
               for d in rules_dirs for pattern in config.get("rule_files", [])):
        bad.append("Prometheus: rule_files %s match no mounted rules.yml (mounted at %s)"
                   % (config.get("rule_files"), rules_dirs))
    cm = configmap(docs, "grafana-dashboard-providers", "observability")
    providers = yaml.safe_load(next(iter((cm or {}).get("data", {}).values()), "") or "{}") or {}
    paths = {p.get("options", {}).get("path") for p in providers.get("providers", [])}
    if not paths & set(mount_paths(docs, "grafana", "grafana-dashboards")):
        bad.append("Grafana: the dashboard provider's path %s is not where grafana-dashboards is mounted" % paths)
    return bad


def mount_paths(docs, workload, configmap_prefix):
    """Where a workload mounts the generated ConfigMap named configmap_prefix-<hash>."""
    paths = []
    for doc, _, pod in workloads(docs):
        if doc["metadata"]["name"] != workload:
            continue
        volumes = {v["name"] for v in pod.get("volumes", [])
                   if re.fullmatch(re.escape(configmap_prefix) + r"(-[a-z0-9]{10})?",
                                   (v.get("configMap") or {}).get("name", ""))}
        for _, container in containers(pod):
            paths += [m["mountPath"] for m in container.get("volumeMounts", [])
                      if m["name"] in volumes and not m.get("subPath")]
    return paths


def rule_dockerfile(docs, project_image, dockerfile_text):
    """The image ships every binary the manifests run, as the uid they run as."""
    bad = []
    stages = re.split(r"(?im)^FROM\s", dockerfile_text)
    final = stages[-1] if stages else ""
    user = re.findall(r"(?im)^USER\s+(\d+)", final)
    uid = int(user[-1]) if user else None
    if uid in (None, 0):
        bad.append("Dockerfile: the final stage has no numeric non-root USER")
    copied = " ".join(re.findall(r"(?im)^COPY\s.*$", final))
    for doc, _, pod, is_init, container in project_containers(docs, project_image):
        at = where(doc, container, is_init)
        argv = container_command(container)
        if argv and os.path.basename(argv[0]) in PROJECT_BINARIES and "/" + os.path.basename(argv[0]) not in copied:
            bad.append("%s: Dockerfile's final stage copies no %s" % (at, argv[0]))
        if uid is not None and effective(pod, container, "runAsUser") != uid:
            bad.append("%s: runAsUser %s, the image's USER is %s" % (at, effective(pod, container, "runAsUser"), uid))
    return bad


def rule_k3d(config, cluster):
    bad = []
    if config.get("apiVersion") != "k3d.io/v1alpha5" or config.get("kind") != "Simple":
        bad.append("k3d config is not k3d.io/v1alpha5 Simple")
    if (config.get("metadata") or {}).get("name") != cluster:
        bad.append("k3d cluster name %r is not the Makefile's CLUSTER %r"
                   % ((config.get("metadata") or {}).get("name"), cluster))
    if not is_pinned(config.get("image", "")):
        bad.append("k3d node image %r is not pinned" % config.get("image"))
    published = {str(p.get("port", "")).split(":")[-2] for p in config.get("ports", [])
                 if "loadbalancer" in (p.get("nodeFilters") or []) and str(p.get("port", "")).count(":")}
    for port in ("3000", "9090"):
        if port not in published:
            bad.append("k3d loadbalancer does not publish port %s" % port)
    return bad


# ---------------------------------------------------------------- tests


DOCS = None
IMAGE = None


def setUpModule():
    global DOCS, IMAGE
    DOCS = load_rendered()
    IMAGE = makefile_variable("IMAGE")


def good_deployment():
    """A small Deployment that every rule accepts; the negative checks break one thing each."""
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "tiny", "namespace": "platform"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "tiny"}}, "template": {
            "metadata": {"labels": {"app": "tiny"}},
            "spec": {
                "securityContext": {"runAsNonRoot": True, "runAsUser": 10001,
                                    "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{
                    "name": "tiny", "image": "stream-pipeline:dev", "command": ["processor"],
                    "env": [{"name": "KAFKA_BROKERS", "value": "redpanda:9092"}],
                    "livenessProbe": {"httpGet": {"path": "/healthz", "port": 9464}},
                    "readinessProbe": {"httpGet": {"path": "/readyz", "port": 9464}},
                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"},
                                  "limits": {"cpu": "100m", "memory": "64Mi"}},
                    "securityContext": {"allowPrivilegeEscalation": False,
                                        "capabilities": {"drop": ["ALL"]}},
                }],
            }}},
    }


def fake_settings(command):
    return {"KAFKA_BROKERS", "METRICS_ADDR"} if command == ["processor"] else set()


class Manifests(unittest.TestCase):
    def assertHolds(self, violations):
        if violations:
            self.fail("%d violation(s):\n%s" % (len(violations), "\n".join(violations)))

    def test_rendered(self):
        """the overlay renders workloads in namespaces platform and observability"""
        namespaces = {d["metadata"].get("namespace") for d, _, _ in workloads(DOCS)}
        self.assertEqual({"platform", "observability"}, namespaces)
        self.assertTrue(IMAGE, "no IMAGE in the Makefile")

    def test_probes(self):
        """every Deployment/StatefulSet/DaemonSet container has liveness and readiness probes"""
        self.assertHolds(rule_probes(DOCS))

    def test_resources(self):
        """every container and init container (Jobs too) has cpu and memory requests and limits"""
        self.assertHolds(rule_resources(DOCS))

    def test_security(self):
        """every pod runs non-root (runAsNonRoot, runAsUser != 0) under the restricted profile"""
        self.assertHolds(rule_security(DOCS))

    def test_statefulsets(self):
        """Redpanda, Postgres, ClickHouse (every StatefulSet) keep their data on a PVC"""
        self.assertHolds(rule_statefulsets(DOCS))

    def test_images(self):
        """images are the Makefile's IMAGE or pinned third-party images"""
        self.assertHolds(rule_images(DOCS, IMAGE))
        self.assertTrue(list(project_containers(DOCS, IMAGE)), "no workload runs %s" % IMAGE)

    def test_env(self):
        """every env var on a project container is a setting its binary's --help lists"""
        self.assertHolds(rule_env(DOCS, IMAGE))

    def test_metrics(self):
        """METRICS_ADDR binds 0.0.0.0 on the metrics port that probes and scrape annotations use"""
        self.assertHolds(rule_metrics(DOCS, IMAGE))

    def test_processor(self):
        """the processor: 2 replicas in one group, FETCH_REWIND=0, a PodDisruptionBudget minAvailable 1"""
        self.assertHolds(rule_processor(DOCS, IMAGE))

    def test_observability(self):
        """rules, alertmanager.yml and dashboards are observability/'s files verbatim; datasource uid prometheus"""
        self.assertHolds(rule_observability(DOCS))

    def test_dockerfile(self):
        """the Dockerfile ships every binary the manifests run, as the uid they run as"""
        with open(os.path.join(ROOT, "Dockerfile"), encoding="utf-8") as f:
            self.assertHolds(rule_dockerfile(DOCS, IMAGE, f.read()))

    def test_k3d(self):
        """k8s/k3d-cluster.yaml: the Makefile's CLUSTER, a pinned k3s, Grafana/Prometheus ports"""
        with open(os.path.join(ROOT, "k8s", "k3d-cluster.yaml"), encoding="utf-8") as f:
            config = yaml.safe_load(f)
        self.assertHolds(rule_k3d(config, makefile_variable("CLUSTER")))


class NegativeSelfChecks(unittest.TestCase):
    """Each rule rejects a manifest that breaks it (and accepts the good one)."""

    def broken(self, change):
        doc = good_deployment()
        change(doc["spec"]["template"]["spec"])
        return [doc]

    def test_good_manifest_passes(self):
        """self-check: the tiny good manifest passes every rule"""
        docs = [good_deployment()]
        for violations in (rule_probes(docs), rule_resources(docs), rule_security(docs),
                           rule_images(docs, "stream-pipeline:dev"),
                           rule_env(docs, "stream-pipeline:dev", fake_settings)):
            self.assertEqual([], violations)

    def test_missing_probes(self):
        """self-check: a Deployment without probes is rejected"""
        docs = self.broken(lambda pod: [pod["containers"][0].pop(p) for p in ("livenessProbe", "readinessProbe")])
        self.assertEqual(2, len(rule_probes(docs)), rule_probes(docs))

    def test_missing_limits(self):
        """self-check: a container (or init container) without limits is rejected"""
        docs = self.broken(lambda pod: pod["containers"][0]["resources"].pop("limits"))
        self.assertEqual(2, len(rule_resources(docs)))

        def add_init(pod):
            pod["initContainers"] = [{"name": "init", "image": "busybox:1.36",
                                      "resources": {"requests": {"cpu": "1m", "memory": "1Mi"}}}]
        self.assertEqual(2, len(rule_resources(self.broken(add_init))))

    def test_root(self):
        """self-check: a pod running as root, or without runAsNonRoot, is rejected"""
        def as_root(pod):
            pod["containers"][0]["securityContext"]["runAsUser"] = 0
        self.assertTrue(any("runAsUser 0" in v for v in rule_security(self.broken(as_root))))

        def no_flag(pod):
            pod["securityContext"].pop("runAsNonRoot")
        self.assertTrue(any("runAsNonRoot" in v for v in rule_security(self.broken(no_flag))))

    def test_images(self):
        """self-check: an unpinned image, or another tag of the project's image, is rejected"""
        for image in ("redis", "redis:latest", "stream-pipeline:other", "docker.io/library/stream-pipeline:dev2"):
            docs = self.broken(lambda pod, image=image: pod["containers"][0].update(image=image))
            self.assertEqual(1, len(rule_images(docs, "stream-pipeline:dev")), image)
        for image in ("redis:7.4", "ghcr.io/x/y@sha256:" + "0" * 64):
            docs = self.broken(lambda pod, image=image: pod["containers"][0].update(image=image))
            self.assertEqual([], rule_images(docs, "stream-pipeline:dev"), image)

    def test_env(self):
        """self-check: an env var the binary does not read, or an unknown binary, is rejected"""
        docs = self.broken(lambda pod: pod["containers"][0]["env"].append({"name": "KAFKA_BROKER", "value": "x"}))
        self.assertEqual(1, len(rule_env(docs, "stream-pipeline:dev", fake_settings)))
        docs = self.broken(lambda pod: pod["containers"][0].update(command=["sh", "-c", "processor"]))
        self.assertEqual(1, len(rule_env(docs, "stream-pipeline:dev", fake_settings)))

    def test_env_from_real_binary(self):
        """self-check: the real processor --help lists METRICS_ADDR and not a made-up name"""
        known = binary_settings(["processor"])
        self.assertIn("METRICS_ADDR", known)
        self.assertIn("KAFKA_BROKERS", known)
        self.assertNotIn("NOT_A_SETTING", known)

    def test_statefulset_without_claim(self):
        """self-check: a StatefulSet without volumeClaimTemplates, or a missing store, is rejected"""
        doc = good_deployment()
        doc["kind"] = "StatefulSet"
        doc["metadata"]["name"] = "postgres"
        self.assertEqual(["StatefulSet/postgres: no volumeClaimTemplates"], rule_statefulsets([doc], ["postgres"]))
        self.assertEqual(1, len(rule_statefulsets([], ["redpanda"])))

    def test_metrics_mismatch(self):
        """self-check: METRICS_ADDR on loopback or on another port than the scrape annotation is rejected"""
        def loopback(pod):
            pod["containers"][0]["env"].append({"name": "METRICS_ADDR", "value": "127.0.0.1:9464"})
            pod["containers"][0]["ports"] = [{"name": "metrics", "containerPort": 9464}]
        docs = self.broken(loopback)
        docs[0]["spec"]["template"]["metadata"]["annotations"] = {"prometheus.io/scrape": "true", "prometheus.io/port": "9999"}
        violations = rule_metrics(docs, "stream-pipeline:dev")
        self.assertTrue(any("0.0.0.0" in v for v in violations), violations)
        self.assertTrue(any("prometheus.io/port" in v for v in violations), violations)

    def test_processor_probes_use_health_and_readiness(self):
        """self-check: a processor probing /metrics instead of /healthz and /readyz is rejected"""
        def metrics_probes(pod):
            container = pod["containers"][0]
            container["env"].append({"name": "METRICS_ADDR", "value": "0.0.0.0:9464"})
            container["ports"] = [{"name": "metrics", "containerPort": 9464}]
            container["readinessProbe"] = {"httpGet": {"path": "/metrics", "port": "metrics"}}
        docs = self.broken(metrics_probes)
        docs[0]["spec"]["template"]["metadata"]["annotations"] = {"prometheus.io/scrape": "true", "prometheus.io/port": "9464"}
        violations = rule_metrics(docs, "stream-pipeline:dev")
        self.assertEqual(1, len(violations), violations)
        self.assertIn("readinessProbe is not GET /readyz on the metrics port", violations[0])

    def test_processor_probes_use_health_and_readiness(self):
        """self-check: a processor probing /metrics instead of /healthz and /readyz is rejected"""
        def metrics_probes(pod):
            container = pod["containers"][0]
            container["env"].append({"name": "METRICS_ADDR", "value": "0.0.0.0:9464"})
            container["ports"] = [{"name": "metrics", "containerPort": 9464}]
            container["readinessProbe"] = {"httpGet": {"path": "/metrics", "port": "metrics"}}
        docs = self.broken(metrics_probes)
        docs[0]["spec"]["template"]["metadata"]["annotations"] = {"prometheus.io/scrape": "true", "prometheus.io/port": "9464"}
        violations = rule_metrics(docs, "stream-pipeline:dev")
        self.assertEqual(1, len(violations), violations)
        self.assertIn("readinessProbe is not GET /readyz on the metrics port", violations[0])

    def test_dockerfile(self):
        """self-check: a Dockerfile that runs as root or lacks a binary is rejected"""
        docs = [good_deployment()]
        good = "FROM rust AS b\nFROM debian\nCOPY --from=b /out/processor /usr/local/bin/\nUSER 10001:10001\n"
        self.assertEqual([], rule_dockerfile(docs, "stream-pipeline:dev", good))
        self.assertEqual(1, len(rule_dockerfile(docs, "stream-pipeline:dev", good.replace("/out/processor", "/out/loadgen"))))
        self.assertTrue(rule_dockerfile(docs, "stream-pipeline:dev", good.replace("USER 10001:10001", "USER 0")))


# ---------------------------------------------------------------- runner


def main():
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    for case in (Manifests, NegativeSelfChecks):
        suite.addTests(loader.loadTestsFromTestCase(case))
    try:
        setUpModule()
    except Exception as error:  # rendering or the Makefile failed: nothing to test
        print("FAIL policy: cannot load the manifests: %s" % error)
        print("policy: 0 passed, 1 failed")
        return 1
    passed = failed = 0
    for test in suite:
        result = unittest.TestResult()
        test.run(result)
        title = (test.shortDescription() or test.id()).strip()
        problems = result.failures + result.errors
        if problems:
            failed += 1
            print("FAIL policy: %s" % title)
            for _, trace in problems:
                lines = trace.rstrip().splitlines()
                message = [line for line in lines if not line.startswith(("Traceback", "  File", "    "))]
                for line in (message or lines)[-25:]:
                    print("     " + line)
        else:
            passed += 1
            print("ok   policy: %s" % title)
    print("policy: %d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
