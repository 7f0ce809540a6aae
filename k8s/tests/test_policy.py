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
  - every StatefulSet (Kafka, Postgres and ClickHouse among them): a
    volumeClaimTemplate, mounted;
  - images: the Makefile's IMAGE for the project's workloads, every other
    image a pinned third-party one (a tag that is not `latest`, or a digest);
  - a container of the project's image runs one of its binaries, and every
    environment variable it sets is a setting that binary reads (the
    `[env: NAME` entries of its `--help`, or its subcommand's);
the broker: Apache Kafka from the official image (apache/kafka), one KRaft
node that is broker and controller, its log dirs on its PVC, a fixed
CLUSTER_ID, no service links (the image reads every KAFKA_* variable as a
broker setting), auto.create.topics.enable=false and replication factor 1
for the offsets and transaction topics (one node); every KAFKA_BROKERS names
the Service `kafka` on its port, and every project binary that reads
KAFKA_BROKERS gets it; the topic-init Job creates, with `streamctl topics
ensure`, every topic the processor and loadgen use;
and the glue: metrics ports and scrape annotations agree with METRICS_ADDR
(the lag exporter's --serve), probes use /healthz (and the processor's
/readyz) where the binary serves it, the lag exporter runs one replica of
`streamctl lag --serve` on the processor's group and topic with the
checkpoint (POSTGRES_URL), the DLQ archiver one replica (Recreate) of
`streamctl dlq archive --follow` on the processor's dead-letter topic, the processor runs in one group under a
PodDisruptionBudget (maxUnavailable 1), its replica count set by one KEDA
ScaledObject (no `replicas` on the Deployment; 1 to the topic's partitions; a
Kafka trigger on the processor's brokers, group and topic, with metadata keys
KEDA reads and, if set, a protocol version Kafka 4 serves; a scale-up that waits out
twice the session timeout, a scale-down of one pod a minute; KEDA's operator
admitted to the broker), as static members (KAFKA_GROUP_INSTANCE_ID is the pod
name), with a SESSION_TIMEOUT_MS, if set, within Kafka's default
group.min/max.session.timeout.ms (6000..300000), the ConfigMaps
carry observability/ verbatim, the Dockerfile ships the binaries the
manifests run as the uid they run as, the k3d config names the Makefile's
cluster;
and security (issue 12): no committed file under k8s/ holds a secret (no
secretGenerator `literals:`, generator sources only in the git-ignored
k8s/overlays/local/secrets/, no Secret with data), no credential env var is a
literal value, every referenced Secret key is rendered and written by
k8s/generate-secrets.sh (run into a temporary directory: 0600 files, random
hex, URLs carrying their passwords, kept on a re-run); PostgreSQL's app role
(created LOGIN by the postgres init with a password from a Secret, CREATE on
schema public revoked; the db-migrate Job runs `streamctl db migrate
--grant-to pipeline_app` as the owner after pg_isready; every other
POSTGRES_URL is the role's); the processor's ADMIN_TOKEN_FILE on a read-only
Secret volume only its group reads; `make wait` waiting for the setup Jobs;
the NetworkPolicies: a default deny per namespace, a policy of its own for
every pod template, the processor's port 9464 admitting namespace platform
and Prometheus only, and the flows they admit (evaluated between every pair
of workloads and from probe pods) equal to the expected table.
The negative self-checks feed each rule a small bad manifest (or a broken
copy of the rendered one) and expect it rejected.

Prints one line per test ("ok   policy: ..." / "FAIL policy: ...") and ends
with "policy: N passed, M failed"; exits 1 when any failed.
"""

import base64
import copy
import fnmatch
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import unittest
import urllib.parse

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.environ.get("K8S_ROOT") or os.path.abspath(os.path.join(HERE, "..", ".."))
OVERLAY_REL = os.path.join("k8s", "overlays", "local")
OVERLAY = os.path.join(ROOT, OVERLAY_REL)
BIN_DIR = os.environ.get("BIN_DIR") or os.path.join(ROOT, "target", "debug")

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")
LONG_RUNNING_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
PROJECT_BINARIES = ("processor", "sqs-consumer", "loadgen", "streamctl")
STATEFUL_PARTS = ("kafka", "postgres", "clickhouse")
ENV_NAME = re.compile(r"\[env: ([A-Za-z_][A-Za-z0-9_]*)")
# The broker: a StatefulSet and its client Service, both `kafka`, running the
# official image.
BROKER = "kafka"
BROKER_IMAGE = ("apache/kafka", "docker.io/apache/kafka")
# Kafka's default group.min.session.timeout.ms and group.max.session.timeout.ms:
# the coordinator rejects a member whose session timeout lies outside.
SESSION_TIMEOUT_MS = (6000, 300000)
# The topics the binaries use when KAFKA_TOPIC / KAFKA_DLQ_TOPIC are unset
# (the defaults their --help shows).
TOPIC_DEFAULTS = {"KAFKA_TOPIC": "events", "KAFKA_DLQ_TOPIC": "events.dlq"}


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
        run = subprocess.run([binary, *command[1:], "--help"], capture_output=True, text=True, timeout=60)
        if run.returncode != 0:
            # A manifest runs a subcommand this build does not have (yet).
            raise AssertionError("`%s --help` exited %d: %s (is %s older than the manifests?)"
                                 % (" ".join(command), run.returncode,
                                    (run.stderr.strip().splitlines() or ["no output"])[0], binary))
        _HELP_CACHE[command] = set(ENV_NAME.findall(run.stdout))
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


def env_entry(container, name):
    """The env entry named name (with `value` or `valueFrom`), or None."""
    for entry in container.get("env", []):
        if entry.get("name") == name:
            return entry
    return None


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


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


# What each binary (or subcommand) serves for its probes on the metrics port:
# the processor's admin endpoint has real health (the supervisor runs) and
# readiness (all five actors run; 503 while it restarts them); the lag
# exporter serves /healthz; the others only serve /metrics.
PROBE_PATHS = {
    "processor": {"livenessProbe": "/healthz", "readinessProbe": "/readyz"},
    "streamctl lag": {"livenessProbe": "/healthz", "readinessProbe": "/healthz"},
    "streamctl dlq archive": {"livenessProbe": "/healthz", "readinessProbe": "/healthz"},
}
# Where a binary (or subcommand) is told to serve /metrics: (flag, env); the
# binaries with a metrics endpoint but these take METRICS_ADDR.
METRICS_SETTING = {"streamctl lag": ("--serve", "LAG_EXPORTER_ADDR"),
                   "streamctl dlq archive": ("--serve", "DLQ_ARCHIVER_ADDR")}


def metrics_address(container):
    """(the setting's name, its value or None): where a container serves /metrics."""
    argv = container_command(container)
    flag, env = METRICS_SETTING.get(" ".join(help_command(argv)) if argv else "", (None, "METRICS_ADDR"))
    if flag is None:
        return env, env_value(container, env)
    return "%s (%s)" % (flag, env), flag_or_env(container, flag, env)


def rule_metrics(docs, project_image):
    """METRICS_ADDR (the lag exporter's --serve) binds 0.0.0.0, and its port is the `metrics` port, the scrape annotation's and the probes'."""
    bad = []
    for doc, meta, _, is_init, container in project_containers(docs, project_image):
        at = where(doc, container, is_init)
        setting, addr = metrics_address(container)
        if addr is None:
            continue
        host, _, port = addr.rpartition(":")
        if host != "0.0.0.0":
            bad.append("%s: %s %s does not bind 0.0.0.0 (unreachable from Prometheus)" % (at, setting, addr))
        ports = {p.get("name"): p.get("containerPort") for p in container.get("ports", [])}
        if str(ports.get("metrics")) != port:
            bad.append("%s: container port `metrics` is %s, %s says %s" % (at, ports.get("metrics"), setting, port))
        annotations = meta.get("annotations") or {}
        if annotations.get("prometheus.io/scrape") != "true":
            bad.append("%s: pod lacks prometheus.io/scrape: \"true\"" % at)
        if annotations.get("prometheus.io/port") != port:
            bad.append("%s: prometheus.io/port %r, %s port %s" % (at, annotations.get("prometheus.io/port"), setting, port))
        command = " ".join(help_command(container_command(container)))
        for probe in ("livenessProbe", "readinessProbe"):
            path = PROBE_PATHS.get(command, {}).get(probe, "/metrics")
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
    labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    if labels.get("app.kubernetes.io/name") != "processor":
        bad.append("processor pods are not labelled app.kubernetes.io/name=processor (Prometheus job, rules' up{job=\"processor\"})")
    container = next((c for c in deployment["spec"]["template"]["spec"]["containers"]
                      if c.get("image") == project_image), None)
    if container is None:
        return bad + ["processor: no container runs %s" % project_image]
    group = env_value(container, "KAFKA_GROUP")
    if not group:
        bad.append("processor: KAFKA_GROUP not set: both replicas must share one group")
    instance = env_entry(container, "KAFKA_GROUP_INSTANCE_ID") or {}
    field = ((instance.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
    if field != "metadata.name":
        bad.append("processor: KAFKA_GROUP_INSTANCE_ID is not the pod name (valueFrom.fieldRef.fieldPath "
                   "metadata.name): static membership needs an id unique in the group that a restarted "
                   "container keeps")
    if env_entry(container, "SESSION_TIMEOUT_MS") is not None:
        timeout = env_value(container, "SESSION_TIMEOUT_MS")
        low, high = SESSION_TIMEOUT_MS
        if not (timeout or "").isdigit() or not low <= int(timeout) <= high:
            bad.append("processor: SESSION_TIMEOUT_MS %r is not a number of milliseconds in %d..%d "
                       "(Kafka's default group.min/max.session.timeout.ms; the broker rejects the member)"
                       % (timeout, low, high))
    budgets = [d for d in docs if d.get("kind") == "PodDisruptionBudget"
               and all(labels.get(k) == v for k, v in d["spec"].get("selector", {}).get("matchLabels", {}).items())]
    if not budgets:
        bad.append("processor: no PodDisruptionBudget selects its pods")
    elif all(b["spec"].get("maxUnavailable") != 1 or "minAvailable" in b["spec"] for b in budgets):
        bad.append("processor: PodDisruptionBudget is not maxUnavailable: 1 (the autoscaler may leave one "
                   "replica, and minAvailable 1 would then block every drain)")
    return bad


LAG_EXPORTER = "lag-exporter"


def processor_container(docs, project_image):
    """The processor Deployment's container of the project's image, or None."""
    processor = find(docs, "Deployment", "processor")
    return next((c for c in (processor or {}).get("spec", {}).get("template", {}).get("spec", {})
                 .get("containers", []) if c.get("image") == project_image), None)


def rule_lag_exporter(docs, project_image):
    """The lag exporter: one replica of `streamctl lag --serve` labelled lag-exporter (the
    rules' job), measuring the processor's group on the processor's topic, with the
    checkpoint (POSTGRES_URL)."""
    deployment = find(docs, "Deployment", LAG_EXPORTER)
    if deployment is None:
        return ["no Deployment %s: nothing reads the lag while the processor is down" % LAG_EXPORTER]
    bad = []
    if deployment["spec"].get("replicas", 1) != 1:
        bad.append("%s: replicas %s, want 1 (HighConsumerLag sums stream_group_lag per group: a second "
                   "exporter doubles it)" % (LAG_EXPORTER, deployment["spec"].get("replicas")))
    labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    if labels.get(NAME_LABEL) != LAG_EXPORTER:
        bad.append("%s pods are not labelled %s=%s (Prometheus job, the rules' up{job=\"%s\"})"
                   % (LAG_EXPORTER, NAME_LABEL, LAG_EXPORTER, LAG_EXPORTER))
    container = next((c for c in deployment["spec"]["template"]["spec"]["containers"]
                      if c.get("image") == project_image), None)
    if container is None:
        return bad + ["%s: no container runs %s" % (LAG_EXPORTER, project_image)]
    if container_command(container)[:2] != ["streamctl", "lag"]:
        return bad + ["%s: runs %r, not `streamctl lag`" % (LAG_EXPORTER, container_command(container))]
    if flag_or_env(container, "--serve", "LAG_EXPORTER_ADDR") is None:
        bad.append("%s: no --serve (LAG_EXPORTER_ADDR): it would print one table and exit" % LAG_EXPORTER)
    if env_entry(container, "POSTGRES_URL") is None and flag_or_env(container, "--postgres-url", "POSTGRES_URL") is None:
        bad.append("%s: no POSTGRES_URL: the checkpoint lag (stream_checkpoint_lag) is not exported" % LAG_EXPORTER)
    consumer = processor_container(docs, project_image)
    if consumer is None:
        return bad + ["no processor container: whose lag does %s measure?" % LAG_EXPORTER]
    for flag, env, default in (("--group", "KAFKA_GROUP", "processor"), ("--topic", "KAFKA_TOPIC", "events")):
        measured = flag_or_env(container, flag, env) or default
        consumed = flag_or_env(consumer, flag, env) or default
        if measured != consumed:
            bad.append("%s: %s %r, the processor's is %r: it measures another group's lag"
                       % (LAG_EXPORTER, env, measured, consumed))
    return bad


DLQ_ARCHIVER = "dlq-archiver"


def rule_dlq_archiver(docs, project_image):
    """The DLQ archiver: one replica, replaced not rolled (two archivers of a topic would write the same
    objects side by side), of `streamctl dlq archive --follow` on the processor's dead-letter topic, in a
    group of its own, writing to an S3 endpoint that is a Service here."""
    deployment = find(docs, "Deployment", DLQ_ARCHIVER)
    if deployment is None:
        return ["no Deployment %s: dead letters live only as long as the topic's retention" % DLQ_ARCHIVER]
    bad = []
    if deployment["spec"].get("replicas", 1) != 1:
        bad.append("%s: replicas %s, want 1" % (DLQ_ARCHIVER, deployment["spec"].get("replicas")))
    if (deployment["spec"].get("strategy") or {}).get("type") != "Recreate":
        bad.append("%s: strategy is not Recreate: a rollout would run two archivers at once" % DLQ_ARCHIVER)
    container = next((c for c in deployment["spec"]["template"]["spec"]["containers"]
                      if c.get("image") == project_image), None)
    if container is None:
        return bad + ["%s: no container runs %s" % (DLQ_ARCHIVER, project_image)]
    argv = container_command(container)
    if argv[:3] != ["streamctl", "dlq", "archive"]:
        return bad + ["%s: runs %r, not `streamctl dlq archive`" % (DLQ_ARCHIVER, argv)]
    if "--follow" not in argv:
        bad.append("%s: no --follow: it would archive once and exit" % DLQ_ARCHIVER)
    consumer = processor_container(docs, project_image)
    if consumer is None:
        return bad + ["no processor container: whose dead letters does %s archive?" % DLQ_ARCHIVER]
    archived = flag_or_env(container, "--dlq-topic", "KAFKA_DLQ_TOPIC") or "events.dlq"
    written = flag_or_env(consumer, "--dlq-topic", "KAFKA_DLQ_TOPIC") or "events.dlq"
    if archived != written:
        bad.append("%s: KAFKA_DLQ_TOPIC %r, the processor writes %r" % (DLQ_ARCHIVER, archived, written))
    group = flag_or_env(container, "--archiver-group", "DLQ_ARCHIVER_GROUP") or "dlq-archiver"
    if group == (flag_or_env(consumer, "--group", "KAFKA_GROUP") or "processor"):
        bad.append("%s: DLQ_ARCHIVER_GROUP %r is the processor's group" % (DLQ_ARCHIVER, group))
    endpoint = urllib.parse.urlsplit(flag_or_env(container, "--s3-endpoint", "S3_ENDPOINT") or "")
    host = (endpoint.hostname or "").split(".")[0]
    service = find(docs, "Service", host)
    if service is None or not any(str(p.get("port")) == str(endpoint.port) for p in service["spec"].get("ports", [])):
        bad.append("%s: S3_ENDPOINT %s is no Service port here" % (DLQ_ARCHIVER, endpoint.geturl() or "(unset)"))
    return bad


# KEDA's ScaledObject for the processor (k8s/base/platform/processor-scaledobject.yaml).
SCALED_OBJECT = ("keda.sh/v1alpha1", "ScaledObject")
# KEDA's operator, which reads the group's lag from the broker: namespace keda,
# its pods' labels in KEDA's manifests (config/manager/manager.yaml).
KEDA_OPERATOR = ("keda", {"app": "keda-operator", "name": "keda-operator"})
# The metadata KEDA 2.21's Kafka scaler reads (pkg/scalers/kafka_scaler.go,
# kafkaMetadata's `keda:"name=..."` tags); any other key is ignored by KEDA, so a
# misspelt one silently keeps the default.
KEDA_KAFKA_METADATA = {
    "bootstrapServers", "consumerGroup", "topic", "partitionLimitation", "lagThreshold",
    "activationLagThreshold", "offsetResetPolicy", "allowIdleConsumers", "excludePersistentLag",
    "scaleToZeroOnInvalidOffset", "limitToPartitionsWithLag", "ensureEvenDistributionOfPartitions",
    "fullMetadata", "version", "tls", "unsafeSsl", "sasl", "saslTokenProvider", "awsRegion",
}
# Below 0.10.1 the scaler reads end offsets with ListOffsets v0, which Kafka 4
# refuses (KIP-896; measured: KEDA 2.21.1 against Kafka 4.4.0 fails with EOF).
OLDEST_KAFKA_PROTOCOL = (0, 10, 1)


def rule_processor_autoscaling(docs, project_image):
    """The processor's replicas follow the group's lag: one KEDA ScaledObject on Deployment processor
    (which sets no replicas of its own), 1 to as many replicas as the topic has partitions, a Kafka
    trigger on the processor's brokers, group and topic, a scale-up that waits out a static member's
    session timeout and a scale-down of one pod a minute, and a NetworkPolicy that lets KEDA's operator
    reach the broker."""
    deployment = find(docs, "Deployment", "processor")
    consumer = processor_container(docs, project_image)
    if deployment is None or consumer is None:
        return ["no processor Deployment running %s" % project_image]
    scaled = [d for d in docs if (d.get("apiVersion"), d.get("kind")) == SCALED_OBJECT
              and (d.get("spec", {}).get("scaleTargetRef") or {}).get("name") == "processor"]
    if len(scaled) != 1:
        return ["%d ScaledObjects (%s) target Deployment processor, want 1" % (len(scaled), "/".join(SCALED_OBJECT))]
    spec = scaled[0]["spec"]
    bad = []
    ref = spec["scaleTargetRef"]
    if ref.get("kind", "Deployment") != "Deployment" or ref.get("apiVersion", "apps/v1") != "apps/v1":
        bad.append("ScaledObject processor: scaleTargetRef is %s %s, not the Deployment"
                   % (ref.get("apiVersion"), ref.get("kind")))
    if "replicas" in deployment["spec"]:
        bad.append("processor: spec.replicas is %s while the ScaledObject's HPA owns the count: every apply "
                   "would reset it" % deployment["spec"]["replicas"])
    if spec.get("minReplicaCount") != 1:
        bad.append("ScaledObject processor: minReplicaCount %r, want 1 (KEDA's default 0 stops every "
                   "processor when the lag is 0)" % spec.get("minReplicaCount"))
    topic = flag_or_env(consumer, "--topic", "KAFKA_TOPIC") or TOPIC_DEFAULTS["KAFKA_TOPIC"]
    job = find(docs, "Job", "topic-init")
    ensure = next((c for _, c in containers(job["spec"]["template"]["spec"])
                   if container_command(c)[:3] == ["streamctl", "topics", "ensure"]), None) if job else None
    partitions = (flag_or_env(ensure, "--partitions", "TOPIC_PARTITIONS") or "6") if ensure else None
    if partitions is None or not partitions.isdigit():
        bad.append("ScaledObject processor: the partitions of %s are unknown (topic-init sets TOPIC_PARTITIONS)"
                   % topic)
    elif spec.get("maxReplicaCount") != int(partitions):
        bad.append("ScaledObject processor: maxReplicaCount %r, want %s, the partitions of %s: a member "
                   "beyond them gets none" % (spec.get("maxReplicaCount"), partitions, topic))
    triggers = spec.get("triggers") or []
    if len(triggers) != 1 or triggers[0].get("type") != "kafka":
        bad.append("ScaledObject processor: triggers %s, want one of type kafka (the group's lag)"
                   % [t.get("type") for t in triggers])
    else:
        meta = triggers[0].get("metadata") or {}
        unknown = sorted(set(meta) - KEDA_KAFKA_METADATA)
        if unknown:
            bad.append("ScaledObject processor: Kafka trigger metadata %s is not read by KEDA's Kafka scaler"
                       % ", ".join(unknown))
        wanted = (("bootstrapServers", flag_or_env(consumer, "--brokers", "KAFKA_BROKERS")),
                  ("consumerGroup", flag_or_env(consumer, "--group", "KAFKA_GROUP") or "processor"),
                  ("topic", topic))
        for key, value in wanted:
            if meta.get(key) != value:
                bad.append("ScaledObject processor: %s %r, the processor's is %r" % (key, meta.get(key), value))
        if not str(meta.get("lagThreshold", "")).isdigit() or int(meta["lagThreshold"]) < 1:
            bad.append("ScaledObject processor: lagThreshold %r is not a positive number of records"
                       % meta.get("lagThreshold"))
        if meta.get("offsetResetPolicy") != "earliest":
            bad.append("ScaledObject processor: offsetResetPolicy %r, want earliest (the processor starts a "
                       "partition without a checkpoint at the log's beginning)" % meta.get("offsetResetPolicy"))
        if str(meta.get("allowIdleConsumers", "false")).lower() != "false":
            bad.append("ScaledObject processor: allowIdleConsumers is on: replicas beyond the partitions idle")
        if "version" in meta:
            version = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)(\.\d+)?", str(meta["version"]))
            if not version or tuple(int(part) for part in version.groups()[:3]) < OLDEST_KAFKA_PROTOCOL:
                bad.append("ScaledObject processor: version %r is not a Kafka version of 0.10.1 or newer: "
                           "below it the scaler reads end offsets with ListOffsets v0, which Kafka 4 refuses"
                           % meta["version"])
    behavior = (((spec.get("advanced") or {}).get("horizontalPodAutoscalerConfig") or {}).get("behavior") or {})
    session_ms = int(flag_or_env(consumer, "--session-timeout-ms", "SESSION_TIMEOUT_MS") or SESSION_TIMEOUT_MS[0])
    up = behavior.get("scaleUp") or {}
    if int(up.get("stabilizationWindowSeconds", 0)) * 1000 < 2 * session_ms:
        bad.append("ScaledObject processor: scaleUp.stabilizationWindowSeconds %s is under twice the session "
                   "timeout (%d ms): the lag a removed static member leaves for one session timeout would "
                   "bring the pod back" % (up.get("stabilizationWindowSeconds", 0), session_ms))
    down = behavior.get("scaleDown") or {}
    policies = down.get("policies") or []
    if (int(down.get("stabilizationWindowSeconds", 0)) < 60 or not policies
            or any(p.get("type") != "Pods" or p.get("value", 0) > 1 or p.get("periodSeconds", 0) < 60
                   for p in policies)):
        bad.append("ScaledObject processor: scaleDown is not one pod per minute or slower after a window of "
                   "60 s or more (each removal moves partitions)")
    pods = pods_by_component(docs)
    if BROKER in pods:
        namespace, labels, ports = pods[BROKER]
        port = next(((number, name) for number, name in ports if number == 9092), (9092, "kafka"))
        if not admitted(docs, (namespace, labels), port, KEDA_OPERATOR):
            bad.append("no NetworkPolicy admits KEDA's operator (namespace %s, app=%s) to %s:9092: it cannot "
                       "read the lag" % (KEDA_OPERATOR[0], KEDA_OPERATOR[1]["app"], BROKER))
    return bad


def listeners(text):
    """A KAFKA_LISTENERS-style list: {LISTENER NAME: (host, port)}."""
    out = {}
    for item in (text or "").split(","):
        name, sep, rest = item.strip().partition("://")
        if sep:
            host, _, port = rest.rpartition(":")
            out[name.upper()] = (host, port)
    return out


def target_port(service_port, container):
    """The container port number a Service port reaches (targetPort by name or number)."""
    target = service_port.get("targetPort", service_port.get("port"))
    for port in container.get("ports", []):
        if port.get("name") == target:
            return str(port.get("containerPort"))
    return str(target)


# The broker settings the pipeline depends on, as the image's variables (it
# writes KAFKA_FOO_BAR to server.properties as foo.bar).
BROKER_SETTINGS = {
    "KAFKA_AUTO_CREATE_TOPICS_ENABLE": (
        "false", "topics come from the topic-init Job, never from a produce, a fetch or a metadata request"),
    "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": (
        "1", "one node: the default 3 leaves __consumer_offsets uncreated and no consumer group works"),
    "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": ("1", "one node"),
    "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": ("1", "one node"),
}
# Set as literal values: the node cannot start without them.
BROKER_REQUIRED = ("KAFKA_NODE_ID", "KAFKA_LISTENERS", "KAFKA_ADVERTISED_LISTENERS",
                   "KAFKA_CONTROLLER_LISTENER_NAMES", "KAFKA_CONTROLLER_QUORUM_VOTERS",
                   "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP", "KAFKA_INTER_BROKER_LISTENER_NAME",
                   "KAFKA_LOG_DIRS", "CLUSTER_ID")


def rule_broker(docs):
    """The broker: apache/kafka, one KRaft node (broker and controller), its log on the PVC, the settings above."""
    bad = []
    sts = find(docs, "StatefulSet", BROKER)
    if sts is None:
        return ["no StatefulSet %s (the broker)" % BROKER]
    at = name_of(sts)
    namespace = sts["metadata"].get("namespace")
    replicas = sts["spec"].get("replicas", 1)
    if replicas != 1:
        bad.append("%s: replicas %r, want 1 (one KRaft node; the internal topics have replication factor 1)"
                   % (at, replicas))
    template = sts["spec"].get("template", {})
    pod = template.get("spec", {})
    pod_labels = template.get("metadata", {}).get("labels", {})
    container = next((c for c in pod.get("containers", [])
                      if image_repository(c.get("image", "")) in BROKER_IMAGE), None)
    if container is None:
        return bad + ["%s: no container runs the official image apache/kafka:<tag>" % at]
    if pod.get("enableServiceLinks") is not False:
        bad.append("%s: enableServiceLinks is not false: the image makes every KAFKA_* variable a broker "
                   "setting, the Service %s's links (KAFKA_PORT, KAFKA_SERVICE_HOST, ...) too" % (at, BROKER))
    env = {e.get("name"): e.get("value") for e in container.get("env", [])}
    for name in BROKER_REQUIRED:
        if not env.get(name):
            bad.append("%s: %s is not set to a value" % (at, name))
    roles = sorted(r.strip() for r in (env.get("KAFKA_PROCESS_ROLES") or "").split(",") if r.strip())
    if roles != ["broker", "controller"]:
        bad.append("%s: KAFKA_PROCESS_ROLES %r, want broker,controller (KRaft, one combined node)"
                   % (at, env.get("KAFKA_PROCESS_ROLES")))
    for name, (want, why) in sorted(BROKER_SETTINGS.items()):
        if env.get(name) != want:
            bad.append("%s: %s is %r, want %r (%s)" % (at, name, env.get(name), want, why))
    if env.get("CLUSTER_ID") and not re.fullmatch(r"[A-Za-z0-9_-]{22}", env["CLUSTER_ID"]):
        bad.append("%s: CLUSTER_ID %r is not a base64url UUID (kafka-storage.sh random-uuid)" % (at, env["CLUSTER_ID"]))
    # The quorum is this node alone, on its controller listener.
    bound = listeners(env.get("KAFKA_LISTENERS"))
    controller = (env.get("KAFKA_CONTROLLER_LISTENER_NAMES") or "").split(",")[0].strip().upper()
    voters = [v.strip() for v in (env.get("KAFKA_CONTROLLER_QUORUM_VOTERS") or "").split(",") if v.strip()]
    if env.get("KAFKA_CONTROLLER_QUORUM_VOTERS"):
        ids = [v.partition("@")[0] for v in voters]
        if ids != [env.get("KAFKA_NODE_ID")]:
            bad.append("%s: KAFKA_CONTROLLER_QUORUM_VOTERS %r is not this one node (KAFKA_NODE_ID %r)"
                       % (at, env.get("KAFKA_CONTROLLER_QUORUM_VOTERS"), env.get("KAFKA_NODE_ID")))
        elif controller not in bound or voters[0].rpartition(":")[2] != bound[controller][1]:
            bad.append("%s: the voter %s is not on the controller listener %s of KAFKA_LISTENERS"
                       % (at, voters[0], controller or "?"))
    protocols = {k.strip().upper() for k, _, _ in (i.partition(":") for i in
                 (env.get("KAFKA_LISTENER_SECURITY_PROTOCOL_MAP") or "").split(","))}
    for name in bound:
        if name not in protocols:
            bad.append("%s: listener %s has no KAFKA_LISTENER_SECURITY_PROTOCOL_MAP entry" % (at, name))
    # Clients: the inter-broker listener is the client one; it advertises the
    # pod's stable name under the headless Service, on the port it binds.
    client = (env.get("KAFKA_INTER_BROKER_LISTENER_NAME") or "").upper()
    advertised = listeners(env.get("KAFKA_ADVERTISED_LISTENERS"))
    headless = find(docs, "Service", sts["spec"].get("serviceName", ""))
    stable = ["%s-0.%s.%s.svc%s" % (BROKER, sts["spec"].get("serviceName"), namespace, suffix)
              for suffix in (".cluster.local", "")]
    if client not in bound or client not in advertised:
        bad.append("%s: the inter-broker listener %r is not in both KAFKA_LISTENERS and "
                   "KAFKA_ADVERTISED_LISTENERS" % (at, client))
    elif advertised[client][0] not in stable or advertised[client][1] != bound[client][1]:
        bad.append("%s: listener %s advertises %s:%s, want %s:%s (the pod's name under its headless Service)"
                   % (at, client, advertised[client][0], advertised[client][1], stable[0], bound[client][1]))
    if (headless is None or headless["spec"].get("clusterIP") != "None"
            or not matches(headless["spec"].get("selector"), pod_labels)):
        bad.append("%s: serviceName %r is not a headless Service selecting its pods"
                   % (at, sts["spec"].get("serviceName")))
    service = find(docs, "Service", BROKER)
    if service is None or service["spec"].get("clusterIP") == "None" or \
            not matches(service["spec"].get("selector"), pod_labels):
        bad.append("no Service %s (not headless) selecting the broker's pods: clients bootstrap from it" % BROKER)
    elif client in bound and not any(target_port(p, container) == bound[client][1]
                                     for p in service["spec"].get("ports", [])):
        bad.append("Service %s: no port reaches the client listener (%s)" % (BROKER, bound[client][1]))
    # The log (and the KRaft metadata log, in the first log dir) on the PVC.
    claims = {t.get("metadata", {}).get("name") for t in sts["spec"].get("volumeClaimTemplates", [])}
    mounts = [m["mountPath"].rstrip("/") for m in container.get("volumeMounts", []) if m.get("name") in claims]
    for path in (env.get("KAFKA_LOG_DIRS") or "").split(","):
        path = path.strip().rstrip("/")
        if path and not any(path == m or path.startswith(m + "/") for m in mounts):
            bad.append("%s: log dir %s is not on a volumeClaimTemplate's mount (%s): a restart would lose the log"
                       % (at, path, ", ".join(mounts) or "none"))
    return bad


def rule_broker_addresses(docs, project_image, settings=binary_settings):
    """Every KAFKA_BROKERS is the Service kafka on its port; every project binary that reads it gets it."""
    bad = []
    service = find(docs, "Service", BROKER)
    if service is None:
        return ["no Service %s: KAFKA_BROKERS has nothing to point at" % BROKER]
    namespace = service["metadata"].get("namespace")
    fqdn = ["%s.%s" % (BROKER, namespace), "%s.%s.svc" % (BROKER, namespace),
            "%s.%s.svc.cluster.local" % (BROKER, namespace)]
    ports = {str(p.get("port")) for p in service["spec"].get("ports", [])}
    for doc, _, pod in workloads(docs):
        local = doc["metadata"].get("namespace") == namespace
        hosts = ([BROKER] if local else []) + fqdn
        for is_init, container in containers(pod):
            at = where(doc, container, is_init)
            if env_entry(container, "KAFKA_BROKERS") is None:
                argv = container_command(container)
                if (container.get("image") == project_image and argv
                        and os.path.basename(argv[0]) in PROJECT_BINARIES
                        and "KAFKA_BROKERS" in settings(help_command(argv))):
                    bad.append("%s: KAFKA_BROKERS is not set (the binary would use its default 127.0.0.1:9092)" % at)
                continue
            value = env_value(container, "KAFKA_BROKERS") or ""
            for address in value.split(","):
                host, _, port = address.strip().rpartition(":")
                if host not in hosts or port not in ports:
                    bad.append("%s: KAFKA_BROKERS %r is not the Service %s (%s:%s)"
                               % (at, value, BROKER, hosts[-1], "/".join(sorted(ports))))
    return bad


def flag_or_env(container, flag, env):
    """A setting as the binary sees it: `--flag value`, `--flag=value`, else the env value, else None."""
    argv = container_command(container)
    for i, word in enumerate(argv):
        if word == flag and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return env_value(container, env)


def rule_topic_init(docs, project_image):
    """topic-init creates, with `streamctl topics ensure`, every topic the processor and loadgen use."""
    bad = []
    job = find(docs, "Job", "topic-init")
    if job is None:
        return ["no Job topic-init: the broker creates no topic (auto.create.topics.enable=false)"]
    pod = job["spec"]["template"]["spec"]
    ensure = next((c for _, c in containers(pod) if c.get("image") == project_image
                   and container_command(c)[:3] == ["streamctl", "topics", "ensure"]), None)
    if ensure is None:
        return ["Job/topic-init: no container runs `streamctl topics ensure` from %s" % project_image]
    created = {flag_or_env(ensure, "--topic", "KAFKA_TOPIC") or TOPIC_DEFAULTS["KAFKA_TOPIC"],
               flag_or_env(ensure, "--dlq-topic", "KAFKA_DLQ_TOPIC") or TOPIC_DEFAULTS["KAFKA_DLQ_TOPIC"]}
    for doc, _, _, is_init, container in project_containers(docs, project_image):
        argv = container_command(container)
        binary = os.path.basename(argv[0]) if argv else ""
        if binary == "processor":
            wanted = [("--topic", "KAFKA_TOPIC"), ("--dlq-topic", "KAFKA_DLQ_TOPIC")]
        elif binary == "loadgen" and argv[1:2] != ["sqs"]:
            wanted = [("--topic", "KAFKA_TOPIC")]
        else:
            continue
        for flag, env in wanted:
            topic = flag_or_env(container, flag, env) or TOPIC_DEFAULTS[env]
            if topic not in created:
                bad.append("%s: topic %s (%s) is not one topic-init creates (%s)"
                           % (where(doc, container, is_init), topic, env, ", ".join(sorted(created))))
    broker = find(docs, "StatefulSet", BROKER)
    brokers = broker["spec"].get("replicas", 1) if broker else 1
    factor = flag_or_env(ensure, "--replication-factor", "TOPIC_REPLICATION_FACTOR") or "1"
    if not factor.isdigit() or int(factor) > brokers:
        bad.append("Job/topic-init: replication factor %r, more than the %d broker(s)" % (factor, brokers))
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


# ---------------------------------------------------------------- security
# Issue 12: no credential in git (every Secret generated at deploy time), the
# processor's admin token from a Secret, PostgreSQL as a least-privilege role,
# and a NetworkPolicy per component.

# Where k8s/generate-secrets.sh writes the env files the overlay's
# secretGenerator reads (git ignores it), and the generator itself.
SECRETS_DIR = os.path.join("k8s", "overlays", "local", "secrets")
GENERATOR = os.path.join("k8s", "generate-secrets.sh")
# Env names (and Secret keys) whose value is a credential: never a literal in
# a manifest, always a random value from the generator. POSTGRES_URL carries
# its password. A *_FILE name holds a path, not the credential.
CREDENTIAL = re.compile(r"(PASSWORD|SECRET|TOKEN|_KEY|_KEY_ID)$")
URL_WITH_PASSWORD = ("POSTGRES_URL",)
# The processor's admin token: one line of at least 16 visible ASCII characters
# (its --help); the generator makes 64 hex characters.
ADMIN_TOKEN = re.compile(r"[0-9a-f]{64}")
# PostgreSQL: the owner creates the tables (the db-migrate Job), the
# application role reads and writes them (the processor, the sqs-consumer).
APP_ROLE = "pipeline_app"
MIGRATE_JOB = "db-migrate"
APP_ROLE_USERS = ("processor", "sqs-consumer")
# Jobs the rest of the deployment waits for (`make wait`).
SETUP_JOBS = ("topic-init", MIGRATE_JOB)
# The processor's admin endpoint (METRICS_ADDR's port): only namespace
# platform and Prometheus reach it.
ADMIN_PORT = 9464
PROMETHEUS = ("observability", {"app.kubernetes.io/name": "prometheus"})
NAME_LABEL = "app.kubernetes.io/name"


def is_credential(name):
    return bool(CREDENTIAL.search(name.upper())) or name in URL_WITH_PASSWORD


def secret_data(docs, namespace, name):
    """The decoded data of the rendered Secret namespace/name, or None."""
    for doc in docs:
        meta = doc.get("metadata", {})
        if doc.get("kind") == "Secret" and meta.get("name") == name and meta.get("namespace") == namespace:
            data = {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in (doc.get("data") or {}).items()}
            data.update(doc.get("stringData") or {})
            return data
    return None


def secret_value(docs, namespace, entry):
    """The value an env entry takes from a secretKeyRef (decoded), or None."""
    ref = ((entry or {}).get("valueFrom") or {}).get("secretKeyRef")
    if not ref:
        return None
    return (secret_data(docs, namespace, ref.get("name")) or {}).get(ref.get("key"))


def secret_refs(doc, pod):
    """(where, Secret name, key or None) for every Secret a pod template uses."""
    refs = []
    for is_init, container in containers(pod):
        at = where(doc, container, is_init)
        for entry in container.get("env", []):
            ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
            if ref and not ref.get("optional"):
                refs.append(("%s env %s" % (at, entry.get("name")), ref.get("name"), ref.get("key")))
        for source in container.get("envFrom", []):
            ref = source.get("secretRef")
            if ref and not ref.get("optional"):
                refs.append(("%s envFrom" % at, ref.get("name"), None))
    for volume in pod.get("volumes", []):
        sources = [volume["secret"]] if "secret" in volume else [
            dict(s["secret"], secretName=s["secret"].get("name"))
            for s in (volume.get("projected") or {}).get("sources", []) if "secret" in s]
        for source in sources:
            if source.get("optional"):
                continue
            at = "%s volume %s" % (name_of(doc), volume.get("name"))
            keys = [item.get("key") for item in source.get("items", [])] or [None]
            refs += [(at, source.get("secretName"), key) for key in keys]
    return refs


def rule_secret_refs(docs):
    """Every Secret (and key) a workload references is rendered."""
    bad = []
    for doc, _, pod in workloads(docs):
        namespace = doc["metadata"].get("namespace")
        for at, name, key in secret_refs(doc, pod):
            data = secret_data(docs, namespace, name)
            if data is None:
                bad.append("%s: Secret %s/%s is not rendered" % (at, namespace, name))
            elif key is not None and key not in data:
                bad.append("%s: Secret %s has no key %s (it has %s)" % (at, name, key, ", ".join(sorted(data))))
    return bad


def rule_secret_env(docs):
    """A credential env var (password, key, token, POSTGRES_URL) comes from a Secret, never a literal value."""
    bad = []
    for doc, _, pod in workloads(docs):
        for is_init, container in containers(pod):
            for entry in container.get("env", []):
                if is_credential(entry.get("name", "")) and "value" in entry:
                    bad.append("%s: env %s is a literal value: take it from a generated Secret (secretKeyRef)"
                               % (where(doc, container, is_init), entry["name"]))
    return bad


def committed_k8s_files(root):
    """{path relative to root: text} of every YAML file under k8s/ but the generated secrets/."""
    files = {}
    for directory, subdirs, names in os.walk(os.path.join(root, "k8s")):
        rel_dir = os.path.relpath(directory, root)
        subdirs[:] = [d for d in subdirs if os.path.join(rel_dir, d) != SECRETS_DIR]
        for name in names:
            if name.endswith((".yaml", ".yml")):
                with open(os.path.join(directory, name), encoding="utf-8") as f:
                    files[os.path.join(rel_dir, name)] = f.read()
    return files


def generator_sources(entry):
    """The paths a secretGenerator entry reads (envs, and files' KEY=PATH or PATH)."""
    return list(entry.get("envs") or []) + [f.split("=", 1)[-1] for f in entry.get("files") or []]


def rule_secret_literals(files):
    """No committed file holds a secret: no `literals:` in a secretGenerator, whose
    sources all lie in the generated (git-ignored) directory, and no Secret with
    data or stringData."""
    bad = []
    for path, text in sorted(files.items()):
        try:
            docs = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
        except yaml.YAMLError as error:
            bad.append("%s: not YAML (%s)" % (path, error))
            continue
        for doc in docs:
            if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
                bad.append("%s: Secret %s carries data: generate it at deploy time (k8s/generate-secrets.sh)"
                           % (path, doc.get("metadata", {}).get("name")))
            if os.path.basename(path) not in ("kustomization.yaml", "kustomization.yml"):
                continue
            for entry in doc.get("secretGenerator") or []:
                if entry.get("literals"):
                    bad.append("%s: secretGenerator %s has literals: read them from a generated env file"
                               % (path, entry.get("name")))
                for source in generator_sources(entry):
                    target = os.path.normpath(os.path.join(os.path.dirname(path), source))
                    if os.path.dirname(target) != SECRETS_DIR:
                        bad.append("%s: secretGenerator %s reads %s, outside the generated %s/"
                                   % (path, entry.get("name"), target, SECRETS_DIR))
    return bad


def parse_env_file(text):
    """KEY=VALUE lines as kustomize's `envs:` reads them (comments and blank lines skipped)."""
    values = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value
    return values


def overlay_generators(root):
    """The overlay's secretGenerator entries."""
    with open(os.path.join(root, OVERLAY_REL, "kustomization.yaml"), encoding="utf-8") as f:
        return yaml.safe_load(f).get("secretGenerator") or []


def rule_generated(directory, generators):
    """The generator's output: a 0700 directory of 0600 files, one per secretGenerator
    source, random hex credentials, each POSTGRES_URL carrying its file's password.
    Returns (violations, {generator name: {key: value}})."""
    bad, keys = [], {}
    if stat.S_IMODE(os.stat(directory).st_mode) & 0o077:
        bad.append("%s: mode %o, want 0700" % (directory, stat.S_IMODE(os.stat(directory).st_mode)))
    for entry in generators:
        values = keys.setdefault(entry.get("name"), {})
        for source in entry.get("envs") or []:
            path = os.path.join(directory, os.path.basename(source))
            if not os.path.isfile(path):
                bad.append("secretGenerator %s: the generator wrote no %s" % (entry.get("name"), os.path.basename(source)))
                continue
            if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
                bad.append("%s: mode %o, want 0600" % (path, stat.S_IMODE(os.stat(path).st_mode)))
            with open(path, encoding="utf-8") as f:
                values.update(parse_env_file(f.read()))
        for source in entry.get("files") or []:
            key, _, path = source.rpartition("=")
            path = os.path.join(directory, os.path.basename(path))
            if not os.path.isfile(path):
                bad.append("secretGenerator %s: the generator wrote no %s" % (entry.get("name"), os.path.basename(path)))
                continue
            with open(path, encoding="utf-8") as f:
                values[key or os.path.basename(path)] = f.read()
    for name, values in sorted(keys.items()):
        for key, value in sorted(values.items()):
            if key in URL_WITH_PASSWORD:
                password = urllib.parse.urlsplit(value).password
                if password not in [v for k, v in values.items() if k.upper().endswith("PASSWORD")]:
                    bad.append("%s: %s does not carry the password generated next to it" % (name, key))
            elif CREDENTIAL.search(key.upper()) and not re.fullmatch(r"[0-9a-f]{20,}", value):
                bad.append("%s: %s is not a random hex value of 20 or more characters" % (name, key))
            if key == "token" and not ADMIN_TOKEN.fullmatch(value):
                bad.append("%s: token is not 64 hex characters" % name)
    return bad, keys


def generated_name(rendered_name, generator_names):
    """The secretGenerator name of a rendered Secret (its name without kustomize's hash)."""
    for name in generator_names:
        if rendered_name == name or re.fullmatch(re.escape(name) + r"-[a-z0-9]{10}", rendered_name or ""):
            return name
    return None


def rule_generator_covers(docs, keys):
    """Every Secret key the rendered workloads reference is one the generator writes."""
    bad = []
    for doc, _, pod in workloads(docs):
        for at, name, key in secret_refs(doc, pod):
            generator = generated_name(name, keys)
            if generator is None:
                bad.append("%s: Secret %s comes from no secretGenerator of the overlay" % (at, name))
            elif key is not None and key not in keys[generator]:
                bad.append("%s: key %s of Secret %s is not written by %s" % (at, key, generator, GENERATOR))
    return bad


def url_of(docs, doc, container):
    """The POSTGRES_URL a container gets from a Secret, parsed, or None."""
    value = secret_value(docs, doc["metadata"].get("namespace"), env_entry(container, "POSTGRES_URL"))
    return urllib.parse.urlsplit(value) if value else None


def rule_app_role(docs, project_image):
    """PostgreSQL least privilege: the postgres init creates the LOGIN role pipeline_app
    (password from a Secret) and revokes CREATE on schema public from PUBLIC; the
    db-migrate Job runs `streamctl db migrate` as the owner, granting to that role,
    after waiting for PostgreSQL; the processor and the sqs-consumer connect as the
    role, with the password it was created with; no other container gets the owner's URL."""
    bad = []
    sts = find(docs, "StatefulSet", "postgres")
    if sts is None:
        return ["no StatefulSet postgres"]
    namespace = sts["metadata"].get("namespace")
    pod = sts["spec"]["template"]["spec"]
    container = next((c for c in pod.get("containers", []) if image_repository(c.get("image", "")).endswith("postgres")), None)
    if container is None:
        return ["StatefulSet/postgres: no postgres container"]
    owner = env_value(container, "POSTGRES_USER") or "postgres"
    owner_password = secret_value(docs, namespace, env_entry(container, "POSTGRES_PASSWORD"))
    if owner_password is None:
        bad.append("StatefulSet/postgres: POSTGRES_PASSWORD is not from a Secret")
    # The init script, from a ConfigMap on /docker-entrypoint-initdb.d, executable.
    mounts = {m["name"]: m for m in container.get("volumeMounts", [])
              if m.get("mountPath", "").rstrip("/") == "/docker-entrypoint-initdb.d"}
    volumes = [v for v in pod.get("volumes", []) if v.get("name") in mounts and "configMap" in v]
    scripts = {}
    for volume in volumes:
        cm = find(docs, "ConfigMap", volume["configMap"].get("name"))
        scripts.update({k: v for k, v in ((cm or {}).get("data") or {}).items() if k.endswith(".sh")})
        if not volume["configMap"].get("defaultMode", 0o644) & 0o100:
            bad.append("StatefulSet/postgres: the initdb scripts are not executable (defaultMode): the "
                       "entrypoint would source them into its own shell")
    role_script = next((t for t in scripts.values() if re.search(r"CREATE ROLE %s\b" % APP_ROLE, t)), None)
    app_password = None
    if role_script is None:
        bad.append("StatefulSet/postgres: no /docker-entrypoint-initdb.d script from a ConfigMap creates role %s"
                   % APP_ROLE)
    else:
        if not re.search(r"ALTER ROLE %s WITH LOGIN\b" % APP_ROLE, role_script) and \
                not re.search(r"CREATE ROLE %s\b[^;]*\bLOGIN\b" % APP_ROLE, role_script):
            bad.append("StatefulSet/postgres: the init script does not make %s a LOGIN role" % APP_ROLE)
        if not re.search(r"REVOKE CREATE ON SCHEMA public FROM PUBLIC", role_script):
            bad.append("StatefulSet/postgres: the init script does not REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        variable = re.search(r"\\getenv\s+\w+\s+([A-Za-z_][A-Za-z0-9_]*)", role_script)
        if variable is None:
            bad.append("StatefulSet/postgres: the init script reads %s's password from no env var (\\getenv)"
                       % APP_ROLE)
        else:
            app_password = secret_value(docs, namespace, env_entry(container, variable.group(1)))
            if app_password is None:
                bad.append("StatefulSet/postgres: %s (the role's password) is not from a Secret" % variable.group(1))
    # The migration, as the owner.
    job = find(docs, "Job", MIGRATE_JOB)
    migrate = None
    if job is None:
        bad.append("no Job %s: nothing creates the tables (the app role may not)" % MIGRATE_JOB)
    else:
        job_pod = job["spec"]["template"]["spec"]
        migrate = next((c for _, c in containers(job_pod) if c.get("image") == project_image
                        and container_command(c)[:3] == ["streamctl", "db", "migrate"]), None)
        if migrate is None:
            bad.append("Job/%s: no container runs `streamctl db migrate` from %s" % (MIGRATE_JOB, project_image))
        else:
            grant = flag_or_env(migrate, "--grant-to", "DB_GRANT_TO")
            if grant != APP_ROLE:
                bad.append("Job/%s: grants to %r, not %s" % (MIGRATE_JOB, grant, APP_ROLE))
            url = url_of(docs, job, migrate)
            if url is None or url.username != owner or url.password != owner_password:
                bad.append("Job/%s: POSTGRES_URL is not the owner's (%s, POSTGRES_PASSWORD) from a Secret"
                           % (MIGRATE_JOB, owner))
        if not any("pg_isready" in " ".join(container_command(c)) for c in job_pod.get("initContainers", [])):
            bad.append("Job/%s: no init container waits for PostgreSQL (pg_isready)" % MIGRATE_JOB)
    # The application's connections: every container with a POSTGRES_URL but
    # the migration's uses the application role.
    users = set()
    for doc, _, pod in workloads(docs):
        for is_init, c in containers(pod):
            if env_entry(c, "POSTGRES_URL") is None or c is migrate:
                continue
            url = url_of(docs, doc, c)
            if url is None:
                bad.append("%s: POSTGRES_URL is not from a Secret" % where(doc, c, is_init))
                continue
            if url.username != APP_ROLE:
                bad.append("%s: connects to PostgreSQL as %r, not the application role %s"
                           % (where(doc, c, is_init), url.username, APP_ROLE))
            elif app_password is not None and url.password != app_password:
                bad.append("%s: the %s password in POSTGRES_URL is not the one the init script gives the role"
                           % (where(doc, c, is_init), APP_ROLE))
            if c.get("image") == project_image and container_command(c) and not is_init:
                users.add(os.path.basename(container_command(c)[0]))
    for binary in APP_ROLE_USERS:
        if binary not in users:
            bad.append("no %s container connects as %s" % (binary, APP_ROLE))
    return bad


def rule_admin_token(docs, project_image):
    """The processor reads its admin token (ADMIN_TOKEN_FILE) from a Secret mounted
    read-only, readable by its non-root user and by no other."""
    bad = []
    deployment = find(docs, "Deployment", "processor")
    if deployment is None:
        return ["no Deployment processor"]
    pod = deployment["spec"]["template"]["spec"]
    container = next((c for c in pod.get("containers", []) if c.get("image") == project_image), None)
    if container is None:
        return ["processor: no container runs %s" % project_image]
    path = env_value(container, "ADMIN_TOKEN_FILE")
    if not path or not path.startswith("/"):
        return ["processor: ADMIN_TOKEN_FILE is %r, not an absolute path: the admin routes are disabled" % path]
    mount = next((m for m in container.get("volumeMounts", [])
                  if path.startswith(m["mountPath"].rstrip("/") + "/") and not m.get("subPath")), None)
    if mount is None:
        return ["processor: ADMIN_TOKEN_FILE %s is on no mounted volume" % path]
    volume = next((v for v in pod.get("volumes", []) if v.get("name") == mount["name"]), {})
    source = volume.get("secret")
    if source is None:
        return ["processor: ADMIN_TOKEN_FILE %s is on volume %s, which is not a Secret" % (path, mount["name"])]
    relative = path[len(mount["mountPath"].rstrip("/")) + 1:]
    item = next((i for i in source.get("items", []) if i.get("path") == relative), None)
    key = item["key"] if item else relative
    mode = (item or {}).get("mode", source.get("defaultMode", 0o644))
    if source.get("items") and item is None:
        bad.append("processor: Secret volume %s does not project %s" % (mount["name"], relative))
    value = (secret_data(docs, deployment["metadata"].get("namespace"), source.get("secretName")) or {}).get(key)
    if value is None:
        bad.append("processor: Secret %s has no key %s" % (source.get("secretName"), key))
    elif not re.fullmatch(r"[\x21-\x7e]{16,}", value.strip()):
        bad.append("processor: the admin token is not one line of 16 or more visible ASCII characters")
    if not mount.get("readOnly"):
        bad.append("processor: the admin token's volume is not mounted readOnly")
    if mode & 0o027:
        bad.append("processor: the admin token's mode %04o lets others read it, or the group write it" % mode)
    if not (pod.get("securityContext") or {}).get("fsGroup") and effective(pod, container, "runAsUser") not in (None, 0):
        bad.append("processor: no fsGroup: the token's file is root's, and user %s cannot read it"
                   % effective(pod, container, "runAsUser"))
    return bad


def makefile_recipe(text, target):
    """The recipe lines of a Makefile target."""
    match = re.search(r"(?m)^%s:[^\n]*\n((?:\t[^\n]*\n?)*)" % re.escape(target), text)
    return [line.strip() for line in match.group(1).splitlines()] if match else []


def rule_makefile_jobs(docs, makefile_text, setup_jobs=SETUP_JOBS):
    """`make wait` waits for the setup Jobs; `make deploy` deletes, before it applies,
    every Job whose template names a generated Secret (its name changes with its
    values, and a Job's template is immutable)."""
    bad = []
    wait = " ".join(makefile_recipe(makefile_text, "wait"))
    deploy = makefile_recipe(makefile_text, "deploy")
    applied = next((i for i, line in enumerate(deploy) if " apply " in line + " "), len(deploy))
    for name in setup_jobs:
        if find(docs, "Job", name) is None:
            bad.append("no Job %s" % name)
        elif not re.search(r"wait --for=condition=complete job/%s\b" % re.escape(name), wait):
            bad.append("Makefile: `make wait` does not wait for job/%s" % name)
    for doc, _, pod in workloads(docs):
        if doc["kind"] == "Job" and secret_refs(doc, pod):
            if not any(re.search(r"delete job %s\b" % re.escape(doc["metadata"]["name"]), line)
                       for line in deploy[:applied]):
                bad.append("Makefile: `make deploy` does not delete job/%s before it applies: a regenerated "
                           "Secret renames what its immutable template references" % doc["metadata"]["name"])
    return bad


# ---------------------------------------------------------------- network policies


def selects(selector, labels):
    """A LabelSelector (matchLabels, matchExpressions) against labels; {} selects all."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression.get("key"), expression.get("operator"), expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def namespace_labels(docs, namespace):
    """A namespace's labels as the API server has them (kubernetes.io/metadata.name is automatic)."""
    labels = dict(next((d["metadata"].get("labels") or {} for d in docs
                        if d.get("kind") == "Namespace" and d["metadata"].get("name") == namespace), {}))
    labels["kubernetes.io/metadata.name"] = namespace
    return labels


def network_policies(docs):
    return [d for d in docs if d.get("kind") == "NetworkPolicy"]


def restricts_ingress(policy):
    types = policy["spec"].get("policyTypes")
    return "Ingress" in types if types else True


def policies_selecting(docs, namespace, labels):
    return [p for p in network_policies(docs) if p["metadata"].get("namespace") == namespace
            and restricts_ingress(p) and selects(p["spec"].get("podSelector"), labels)]


def port_admits(rule_port, number, name, protocol="TCP"):
    if rule_port.get("protocol", "TCP") != protocol:
        return False
    port = rule_port.get("port")
    if port is None:
        return True
    if isinstance(port, int) or str(port).isdigit():
        return int(port) <= number <= int(rule_port.get("endPort", port))
    return port == name


def peer_admits(docs, peer, policy_namespace, namespace, labels):
    """Whether a `from` peer admits a pod of namespace with labels (an ipBlock may
    match any pod's address: it counts as admitting every pod)."""
    if "ipBlock" in peer:
        return True
    if peer.get("namespaceSelector") is None:
        in_namespace = namespace == policy_namespace
    else:
        in_namespace = selects(peer["namespaceSelector"], namespace_labels(docs, namespace))
    return in_namespace and (peer.get("podSelector") is None or selects(peer["podSelector"], labels))


def admitted(docs, target, port, source):
    """Whether the policies let source (namespace, labels) connect to target's port.
    target: (namespace, labels); port: (number, name)."""
    selecting = policies_selecting(docs, *target)
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            if rule.get("ports") and not any(port_admits(p, *port) for p in rule["ports"]):
                continue
            peers = rule.get("from")
            if not peers or any(peer_admits(docs, peer, target[0], *source) for peer in peers):
                return True
    return False


def component(meta, doc):
    return (meta.get("labels") or {}).get(NAME_LABEL) or doc["metadata"]["name"]


def pods_by_component(docs):
    """{component: (namespace, pod labels, [(port number, port name)])} for every workload."""
    out = {}
    for doc, meta, pod in workloads(docs):
        ports = [(p["containerPort"], p.get("name")) for _, c in containers(pod, init=False)
                 for p in c.get("ports", []) if p.get("protocol", "TCP") == "TCP"]
        out[component(meta, doc)] = (doc["metadata"].get("namespace"), meta.get("labels") or {}, ports)
    return out


def rule_network_policies(docs):
    """A default deny (ingress) in every namespace with workloads; every pod template
    selected by a policy of its own besides it."""
    bad = []
    pods = pods_by_component(docs)
    for namespace in sorted({ns for ns, _, _ in pods.values()}):
        if not any(p["metadata"].get("namespace") == namespace and p["spec"].get("podSelector") == {}
                   and restricts_ingress(p) and not p["spec"].get("ingress")
                   for p in network_policies(docs)):
            bad.append("namespace %s: no default-deny NetworkPolicy (podSelector {}, Ingress, no rules)" % namespace)
    for name, (namespace, labels, _) in sorted(pods.items()):
        selecting = policies_selecting(docs, namespace, labels)
        if not selecting:
            bad.append("%s (namespace %s): selected by no NetworkPolicy: every pod may connect to it" % (name, namespace))
        elif all(p["spec"].get("podSelector") == {} for p in selecting):
            bad.append("%s (namespace %s): no NetworkPolicy of its own (only namespace-wide ones)" % (name, namespace))
    return bad


def rule_admin_port(docs, processor="processor", port=ADMIN_PORT, prometheus=PROMETHEUS):
    """The processor's admin port admits its own namespace and Prometheus, nothing else."""
    pods = pods_by_component(docs)
    if processor not in pods:
        return ["no %s pods" % processor]
    namespace, labels, ports = pods[processor]
    name = next((n for number, n in ports if number == port), None)
    if name is None:
        return ["%s: no container port %d" % (processor, port)]
    bad = []
    for policy in policies_selecting(docs, namespace, labels):
        for rule in policy["spec"].get("ingress") or []:
            if rule.get("ports") and not any(port_admits(p, port, name) for p in rule["ports"]):
                continue
            if not rule.get("from"):
                bad.append("NetworkPolicy %s admits every source on %s:%d" % (policy["metadata"]["name"], processor, port))
            for peer in rule.get("from") or []:
                if "ipBlock" in peer:
                    bad.append("NetworkPolicy %s admits an ipBlock (%s) on %s:%d"
                               % (policy["metadata"]["name"], peer["ipBlock"].get("cidr"), processor, port))
    probes = [  # (who, namespace, labels, admitted?)
        ("a pod of namespace %s" % namespace, namespace, {NAME_LABEL: "stranger"}, True),
        ("Prometheus", prometheus[0], prometheus[1], True),
        ("another pod of namespace %s" % prometheus[0], prometheus[0], {NAME_LABEL: "grafana"}, False),
        ("an unlabelled pod of namespace %s" % prometheus[0], prometheus[0], {}, False),
        ("a pod of namespace default", "default", dict(prometheus[1]), False),
        ("a pod of namespace default", "default", {}, False),
    ]
    for who, ns, pod_labels, want in probes:
        if admitted(docs, (namespace, labels), (port, name), (ns, pod_labels)) != want:
            bad.append("%s:%d %s %s" % (processor, port, "does not admit" if want else "admits", who))
    return bad


# Who connects to whom: (client, server, server's container port), clients and
# servers by app.kubernetes.io/name. The NetworkPolicies must admit exactly
# these (rule_flows computes what they admit between every pair of workloads,
# and from probe pods: "stranger@NS", a pod of NS no policy names,
# "outsider", a pod of namespace default, and KEDA's operator, which the
# cluster runs outside these manifests). Kubelet's probes are not clients:
# k3s's kube-router accepts traffic from the pod's own node.
PLATFORM_FLOWS = {
    ("processor", "kafka", 9092), ("loadgen", "kafka", 9092), ("topic-init", "kafka", 9092),
    ("kafka", "kafka", 9092), ("kafka", "kafka", 9093),
    ("processor", "postgres", 5432), ("sqs-consumer", "postgres", 5432), ("db-migrate", "postgres", 5432),
    ("processor", "clickhouse", 8123),
    ("sqs-consumer", "elasticmq", 9324),
    ("prometheus", "processor", 9464), ("prometheus", "sqs-consumer", 9466), ("prometheus", "loadgen", 9465),
    # The lag exporter reads the broker and the checkpoints; Prometheus scrapes it.
    ("lag-exporter", "kafka", 9092), ("lag-exporter", "postgres", 5432), ("prometheus", "lag-exporter", 9467),
    # The DLQ archiver reads the dead-letter topic and writes MinIO; Prometheus scrapes it.
    ("dlq-archiver", "kafka", 9092), ("dlq-archiver", "minio", 9000), ("prometheus", "dlq-archiver", 9468),
    # KEDA's operator reads the processor group's lag.
    ("keda-operator", "kafka", 9092),
}
OBSERVABILITY_FLOWS = {
    ("grafana", "prometheus", 9090), ("prometheus", "prometheus", 9090),
    # streamctl watch / chart, run in a processor pod (k8s/README.md).
    ("processor", "prometheus", 9090),
    ("prometheus", "alertmanager", 9093),
}


def expected_flows(docs):
    """The flows above, plus every pod of the processor's namespace to its admin port."""
    pods = pods_by_component(docs)
    namespace = pods.get("processor", ("platform",))[0]
    local = [name for name, (ns, _, _) in pods.items() if ns == namespace] + ["stranger@%s" % namespace]
    return PLATFORM_FLOWS | OBSERVABILITY_FLOWS | {(name, "processor", ADMIN_PORT) for name in local}


def rule_flows(docs, expected):
    """The NetworkPolicies admit exactly the expected (client, server, port) flows."""
    pods = pods_by_component(docs)
    sources = {name: (ns, labels) for name, (ns, labels, _) in pods.items()}
    for namespace in sorted({ns for ns, _ in sources.values()}):
        sources["stranger@%s" % namespace] = (namespace, {NAME_LABEL: "stranger"})
    sources["outsider"] = ("default", {})
    sources["keda-operator"] = KEDA_OPERATOR
    actual = set()
    for server, (namespace, labels, ports) in pods.items():
        for number, name in ports:
            for client, source in sources.items():
                if admitted(docs, (namespace, labels), (number, name), source):
                    actual.add((client, server, number))
    bad = ["missing: %s -> %s:%d (no NetworkPolicy admits it)" % flow for flow in sorted(expected - actual)
           if flow[1] in pods]
    bad += ["unexpected: %s -> %s:%d (admitted, but not in the expected flows)" % flow
            for flow in sorted(actual - expected)]
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
                    "env": [{"name": "KAFKA_BROKERS", "value": "kafka:9092"}],
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


BROKER_ENV = {
    "KAFKA_NODE_ID": "1",
    "KAFKA_PROCESS_ROLES": "broker,controller",
    "KAFKA_LISTENERS": "PLAINTEXT://:9092,CONTROLLER://:9093",
    "KAFKA_ADVERTISED_LISTENERS": "PLAINTEXT://kafka-0.kafka-headless.platform.svc.cluster.local:9092",
    "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
    "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
    "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
    "KAFKA_INTER_BROKER_LISTENER_NAME": "PLAINTEXT",
    "CLUSTER_ID": "aN0nGaa1RZS_5_hWgp2osQ",
    "KAFKA_LOG_DIRS": "/var/lib/kafka/data/kraft-combined-logs",
    "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
    "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
    "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
    "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
}


def good_broker():
    """A one-node KRaft broker with its headless and client Services, which rule_broker accepts."""
    labels = {"app.kubernetes.io/name": "kafka"}
    port = {"name": "kafka", "port": 9092, "targetPort": "kafka"}
    return [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kafka-headless", "namespace": "platform"},
         "spec": {"clusterIP": "None", "selector": dict(labels), "ports": [dict(port)]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kafka", "namespace": "platform"},
         "spec": {"selector": dict(labels), "ports": [dict(port)]}},
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "kafka", "namespace": "platform"},
         "spec": {"serviceName": "kafka-headless", "replicas": 1, "selector": {"matchLabels": dict(labels)},
                  "template": {"metadata": {"labels": dict(labels)}, "spec": {
                      "enableServiceLinks": False,
                      "containers": [{
                          "name": "kafka", "image": "apache/kafka:4.1.1",
                          "env": [{"name": k, "value": v} for k, v in BROKER_ENV.items()],
                          "ports": [{"name": "kafka", "containerPort": 9092},
                                    {"name": "controller", "containerPort": 9093}],
                          "volumeMounts": [{"name": "data", "mountPath": "/var/lib/kafka/data"}],
                      }]}},
                  "volumeClaimTemplates": [{"metadata": {"name": "data"}}]}},
    ]


def set_env(container, name, value):
    """Sets (or, with None, removes) a literal env entry."""
    container["env"] = [e for e in container.get("env", []) if e.get("name") != name]
    if value is not None:
        container["env"].append({"name": name, "value": value})


def good_processor():
    """The processor Deployment and its PodDisruptionBudget, which rule_processor accepts."""
    doc = good_deployment()
    labels = {"app.kubernetes.io/name": "processor"}
    doc["metadata"]["name"] = "processor"
    doc["spec"]["replicas"] = 2
    doc["spec"]["selector"]["matchLabels"] = dict(labels)
    doc["spec"]["template"]["metadata"]["labels"] = dict(labels)
    doc["spec"]["template"]["spec"]["containers"][0]["env"] += [
        {"name": "KAFKA_GROUP", "value": "processor"},
        {"name": "KAFKA_GROUP_INSTANCE_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    budget = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
              "metadata": {"name": "processor", "namespace": "platform"},
              "spec": {"maxUnavailable": 1, "selector": {"matchLabels": dict(labels)}}}
    return [doc, budget]


def good_topic_init():
    """The topic-init Job: `streamctl topics ensure` from the project's image."""
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "topic-init", "namespace": "platform"},
        "spec": {"template": {"spec": {"restartPolicy": "OnFailure", "containers": [{
            "name": "topics", "image": "stream-pipeline:dev",
            "command": ["streamctl", "topics", "ensure", "--wait-secs", "120"],
            "env": [{"name": "KAFKA_BROKERS", "value": "kafka:9092"},
                    {"name": "KAFKA_TOPIC", "value": "events"},
                    {"name": "KAFKA_DLQ_TOPIC", "value": "events.dlq"},
                    {"name": "TOPIC_REPLICATION_FACTOR", "value": "1"}],
        }]}}},
    }


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
        """Kafka, Postgres, ClickHouse (every StatefulSet) keep their data on a PVC"""
        self.assertHolds(rule_statefulsets(DOCS))

    def test_images(self):
        """images are the Makefile's IMAGE or pinned third-party images"""
        self.assertHolds(rule_images(DOCS, IMAGE))
        self.assertTrue(list(project_containers(DOCS, IMAGE)), "no workload runs %s" % IMAGE)

    def test_env(self):
        """every env var on a project container is a setting its binary's --help lists"""
        self.assertHolds(rule_env(DOCS, IMAGE))

    def test_metrics(self):
        """METRICS_ADDR (the lag exporter's --serve) binds 0.0.0.0 on the metrics port that probes and scrape annotations use"""
        self.assertHolds(rule_metrics(DOCS, IMAGE))

    def test_processor(self):
        """the processor: one group, static members by pod name, a PodDisruptionBudget maxUnavailable 1"""
        self.assertHolds(rule_processor(DOCS, IMAGE))

    def test_processor_autoscaling(self):
        """the processor's replicas follow the lag: a KEDA ScaledObject, 1 to the partitions, its group and topic, slow scale-down"""
        self.assertHolds(rule_processor_autoscaling(DOCS, IMAGE))

    def test_lag_exporter(self):
        """the lag exporter: 1 replica of streamctl lag --serve, the processor's group and topic, with the checkpoint"""
        self.assertHolds(rule_lag_exporter(DOCS, IMAGE))

    def test_dlq_archiver(self):
        """the DLQ archiver: 1 replica, Recreate, streamctl dlq archive --follow on the processor's dead-letter topic, to an S3 Service"""
        self.assertHolds(rule_dlq_archiver(DOCS, IMAGE))

    def test_broker(self):
        """the broker: apache/kafka, one KRaft node, log dirs on its PVC, no auto-created topics, replication factor 1"""
        self.assertHolds(rule_broker(DOCS))

    def test_broker_addresses(self):
        """every KAFKA_BROKERS is the Service kafka on its port; every binary that reads it gets it"""
        self.assertHolds(rule_broker_addresses(DOCS, IMAGE))

    def test_topic_init(self):
        """topic-init creates (streamctl topics ensure) every topic the processor and loadgen use"""
        self.assertHolds(rule_topic_init(DOCS, IMAGE))

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

    def test_secret_literals(self):
        """no committed file under k8s/ holds a secret: no secretGenerator literals, no Secret data, sources only in secrets/"""
        self.assertHolds(rule_secret_literals(committed_k8s_files(ROOT)))

    def test_secrets_git_ignored(self):
        """git ignores k8s/overlays/local/secrets/ and tracks nothing in it"""
        if shutil.which("git") is None or subprocess.run(
                ["git", "-C", ROOT, "rev-parse", "--git-dir"], capture_output=True).returncode != 0:
            self.skipTest("not a git work tree")
        probe = os.path.join(SECRETS_DIR, "postgres-app.env")
        ignored = subprocess.run(["git", "-C", ROOT, "check-ignore", "-q", "--no-index", probe]).returncode == 0
        self.assertTrue(ignored, "%s is not git-ignored" % probe)
        tracked = subprocess.run(["git", "-C", ROOT, "ls-files", "--", SECRETS_DIR],
                                 check=True, capture_output=True, text=True).stdout.split()
        self.assertEqual([], tracked, "tracked in %s" % SECRETS_DIR)

    def test_secret_env(self):
        """passwords, keys, tokens and POSTGRES_URL come from Secrets, never literal env values"""
        self.assertHolds(rule_secret_env(DOCS))

    def test_secret_refs(self):
        """every Secret and key a workload references is rendered"""
        self.assertHolds(rule_secret_refs(DOCS))

    def test_generator(self):
        """k8s/generate-secrets.sh writes every referenced key (0600, random hex, URLs with their passwords) and keeps what exists"""
        tmp = tempfile.mkdtemp()
        try:
            first, second = os.path.join(tmp, "a", "secrets"), os.path.join(tmp, "b", "secrets")
            for directory in (first, first, second):
                subprocess.run(["bash", os.path.join(ROOT, GENERATOR), directory], check=True,
                               capture_output=True, text=True, timeout=60)
            violations, keys = rule_generated(first, overlay_generators(ROOT))
            violations += rule_generator_covers(DOCS, keys)
            _, other = rule_generated(second, overlay_generators(ROOT))
            for name, values in keys.items():
                for key, value in values.items():
                    if is_credential(key) and other[name].get(key) == value:
                        violations.append("%s: %s came out the same twice (not random)" % (name, key))
            # Kept: the first directory was generated into twice; a third run
            # with its files present changes none of them.
            before = {n: open(os.path.join(first, n), encoding="utf-8").read() for n in os.listdir(first)}
            subprocess.run(["bash", os.path.join(ROOT, GENERATOR), first], check=True, capture_output=True, timeout=60)
            after = {n: open(os.path.join(first, n), encoding="utf-8").read() for n in os.listdir(first)}
            if before != after:
                violations.append("a re-run changed %s" % sorted(n for n in after if before.get(n) != after[n]))
        finally:
            shutil.rmtree(tmp)
        self.assertHolds(violations)

    def test_app_role(self):
        """PostgreSQL: init creates LOGIN role pipeline_app; db-migrate (owner) grants it; processor and sqs-consumer connect as it"""
        self.assertHolds(rule_app_role(DOCS, IMAGE))

    def test_admin_token(self):
        """the processor's ADMIN_TOKEN_FILE is a read-only mounted Secret only its group reads"""
        self.assertHolds(rule_admin_token(DOCS, IMAGE))

    def test_makefile_jobs(self):
        """make wait waits for topic-init and db-migrate; make deploy deletes Jobs that name generated Secrets first"""
        with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
            self.assertHolds(rule_makefile_jobs(DOCS, f.read()))

    def test_network_policies(self):
        """each namespace has a default deny; every pod template is selected by a NetworkPolicy of its own"""
        self.assertHolds(rule_network_policies(DOCS))

    def test_admin_port(self):
        """the processor's port 9464 admits namespace platform and Prometheus only"""
        self.assertHolds(rule_admin_port(DOCS))

    def test_flows(self):
        """the NetworkPolicies admit exactly the expected client -> server:port flows"""
        self.assertHolds(rule_flows(DOCS, expected_flows(DOCS)))


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
        self.assertEqual(1, len(rule_statefulsets([], ["kafka"])))

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

    def test_lag_exporter_serve_address(self):
        """self-check: a lag exporter serving on loopback, on another port, or probing /metrics is rejected"""
        def lag_exporter(serve, probe="/healthz"):
            doc = good_deployment()
            container = doc["spec"]["template"]["spec"]["containers"][0]
            container["command"] = ["streamctl", "lag", "--serve", serve]
            container["ports"] = [{"name": "metrics", "containerPort": 9467}]
            container["livenessProbe"] = {"httpGet": {"path": "/healthz", "port": "metrics"}}
            container["readinessProbe"] = {"httpGet": {"path": probe, "port": "metrics"}}
            doc["spec"]["template"]["metadata"]["annotations"] = {"prometheus.io/scrape": "true",
                                                                 "prometheus.io/port": "9467"}
            return rule_metrics([doc], "stream-pipeline:dev")
        self.assertEqual([], lag_exporter("0.0.0.0:9467"))
        for serve, probe, words in (("127.0.0.1:9467", "/healthz", "does not bind 0.0.0.0"),
                                    ("0.0.0.0:9464", "/healthz", "container port `metrics` is 9467"),
                                    ("0.0.0.0:9467", "/metrics", "readinessProbe is not GET /healthz")):
            violations = lag_exporter(serve, probe)
            self.assertTrue(violations and any(words in v for v in violations), (serve, probe, violations))

    def test_lag_exporter(self):
        """self-check: two lag exporters, another group or topic, no --serve, no checkpoint are rejected"""
        def exporter(docs):
            return find(docs, "Deployment", LAG_EXPORTER)["spec"]["template"]["spec"]["containers"][0]

        self.assertEqual([], rule_lag_exporter(DOCS, IMAGE))
        for change, words in (
                (lambda docs: find(docs, "Deployment", LAG_EXPORTER)["spec"].update(replicas=2), "want 1"),
                (lambda docs: set_env(exporter(docs), "KAFKA_GROUP", "other"), "KAFKA_GROUP 'other'"),
                (lambda docs: set_env(exporter(docs), "KAFKA_TOPIC", "events.dlq"), "KAFKA_TOPIC 'events.dlq'"),
                (lambda docs: exporter(docs).update(command=["streamctl", "lag"]), "no --serve"),
                (lambda docs: exporter(docs).update(env=[e for e in exporter(docs)["env"]
                                                         if e["name"] != "POSTGRES_URL"]), "no POSTGRES_URL")):
            violations = rule_lag_exporter(self.rendered(change), IMAGE)
            self.assertEqual(1, len(violations), (words, violations))
            self.assertIn(words, violations[0])
        violations = rule_lag_exporter([d for d in DOCS if name_of(d) != "Deployment/" + LAG_EXPORTER], IMAGE)
        self.assertEqual(1, len(violations), violations)

    def test_dlq_archiver(self):
        """self-check: two archivers, a rolling update, no --follow, another topic, the processor's group, no S3 Service are rejected"""
        def archiver(docs):
            return find(docs, "Deployment", DLQ_ARCHIVER)["spec"]["template"]["spec"]["containers"][0]

        self.assertEqual([], rule_dlq_archiver(DOCS, IMAGE))
        for change, words in (
                (lambda docs: find(docs, "Deployment", DLQ_ARCHIVER)["spec"].update(replicas=2), "want 1"),
                (lambda docs: find(docs, "Deployment", DLQ_ARCHIVER)["spec"].update(strategy={"type": "RollingUpdate"}),
                 "not Recreate"),
                (lambda docs: archiver(docs).update(command=[w for w in archiver(docs)["command"] if w != "--follow"]),
                 "no --follow"),
                (lambda docs: set_env(archiver(docs), "KAFKA_DLQ_TOPIC", "other.dlq"), "KAFKA_DLQ_TOPIC 'other.dlq'"),
                (lambda docs: set_env(archiver(docs), "DLQ_ARCHIVER_GROUP", "processor"), "processor's group"),
                (lambda docs: set_env(archiver(docs), "S3_ENDPOINT", "http://nowhere:9000"), "no Service port")):
            violations = rule_dlq_archiver(self.rendered(change), IMAGE)
            self.assertEqual(1, len(violations), (words, violations))
            self.assertIn(words, violations[0])

    def test_processor_autoscaling(self):
        """self-check: replicas set, min 0, max past the partitions, another group or topic, idle consumers, the old protocol, quick scaling, a misspelt key, KEDA kept from the broker are rejected"""
        def scaled(docs):
            return next(d for d in docs if d.get("kind") == "ScaledObject")

        def trigger(docs):
            return scaled(docs)["spec"]["triggers"][0]["metadata"]

        def behavior(docs):
            return scaled(docs)["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]

        def keep_keda_out(docs):
            policy = find(docs, "NetworkPolicy", BROKER)
            policy["spec"]["ingress"] = [rule for rule in policy["spec"]["ingress"]
                                         if not any("namespaceSelector" in peer for peer in rule.get("from", []))]

        self.assertEqual([], rule_processor_autoscaling(DOCS, IMAGE))
        for change, words in (
                (lambda docs: find(docs, "Deployment", "processor")["spec"].update(replicas=2), "spec.replicas"),
                (lambda docs: scaled(docs)["spec"].update(minReplicaCount=0), "minReplicaCount 0"),
                (lambda docs: scaled(docs)["spec"].update(maxReplicaCount=12), "maxReplicaCount 12"),
                (lambda docs: trigger(docs).update(consumerGroup="other"), "consumerGroup 'other'"),
                (lambda docs: trigger(docs).update(topic="events.dlq"), "topic 'events.dlq'"),
                (lambda docs: trigger(docs).update(allowIdleConsumers="true"), "allowIdleConsumers"),
                (lambda docs: trigger(docs).update(offsetResetPolicy="latest"), "offsetResetPolicy 'latest'"),
                (lambda docs: trigger(docs).update(version="0.10.0.0"), "version '0.10.0.0'"),
                (lambda docs: trigger(docs).update(version="4.0"), "version '4.0'"),
                (lambda docs: trigger(docs).update(lagthreshold="100"), "lagthreshold"),
                (lambda docs: behavior(docs)["scaleUp"].update(stabilizationWindowSeconds=0), "scaleUp"),
                (lambda docs: behavior(docs)["scaleDown"]["policies"][0].update(value=3), "scaleDown"),
                (lambda docs: behavior(docs).pop("scaleDown"), "scaleDown"),
                (keep_keda_out, "KEDA's operator")):
            violations = rule_processor_autoscaling(self.rendered(change), IMAGE)
            self.assertEqual(1, len(violations), (words, violations))
            self.assertIn(words, violations[0])
        violations = rule_processor_autoscaling([d for d in DOCS if d.get("kind") != "ScaledObject"], IMAGE)
        self.assertEqual(["0 ScaledObjects (keda.sh/v1alpha1/ScaledObject) target Deployment processor, want 1"],
                         violations)

    def test_good_broker_passes(self):
        """self-check: the good one-node KRaft broker passes the broker rules"""
        docs = good_broker() + good_processor() + [good_topic_init()]
        self.assertEqual([], rule_broker(docs))
        self.assertEqual([], rule_broker_addresses(docs, "stream-pipeline:dev", fake_settings))
        self.assertEqual([], rule_topic_init(docs, "stream-pipeline:dev"))
        self.assertEqual([], rule_processor(docs, "stream-pipeline:dev"))

    def broker_with(self, change):
        docs = good_broker()
        change(docs[2], docs[2]["spec"]["template"]["spec"]["containers"][0])
        return rule_broker(docs)

    def test_broker_settings(self):
        """self-check: auto-created topics, replication factors above 1, no KRaft roles/quorum/CLUSTER_ID are rejected"""
        for name, value in (("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "true"),
                            ("KAFKA_AUTO_CREATE_TOPICS_ENABLE", None),
                            ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "3"),
                            ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", None),
                            ("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "3"),
                            ("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "2"),
                            ("KAFKA_PROCESS_ROLES", "broker"),
                            ("KAFKA_CONTROLLER_QUORUM_VOTERS", None),
                            ("KAFKA_CONTROLLER_QUORUM_VOTERS", "2@localhost:9093"),
                            ("CLUSTER_ID", None),
                            ("CLUSTER_ID", "my-cluster")):
            violations = self.broker_with(lambda sts, c, n=name, v=value: set_env(c, n, v))
            self.assertTrue(any(name in v for v in violations), (name, value, violations))

    def test_broker_image_and_links(self):
        """self-check: another image than apache/kafka, or service links on, is rejected"""
        violations = self.broker_with(lambda sts, c: c.update(image="bitnami/kafka:3.9"))
        self.assertTrue(any("apache/kafka" in v for v in violations), violations)
        violations = self.broker_with(lambda sts, c: sts["spec"]["template"]["spec"].pop("enableServiceLinks"))
        self.assertEqual(1, len(violations), violations)
        self.assertIn("enableServiceLinks", violations[0])

    def test_broker_log_dirs_on_pvc(self):
        """self-check: log dirs off the PVC, or no volumeClaimTemplates, are rejected"""
        violations = self.broker_with(lambda sts, c: set_env(c, "KAFKA_LOG_DIRS", "/tmp/kraft-combined-logs"))
        self.assertEqual(1, len(violations), violations)
        self.assertIn("/tmp/kraft-combined-logs", violations[0])
        violations = self.broker_with(lambda sts, c: sts["spec"].pop("volumeClaimTemplates"))
        self.assertEqual(1, len(violations), violations)
        violations = self.broker_with(lambda sts, c: set_env(c, "KAFKA_LOG_DIRS", "/var/lib/kafka/data-other"))
        self.assertEqual(1, len(violations), violations)

    def test_broker_advertised_and_services(self):
        """self-check: advertising localhost, or no client Service, is rejected"""
        violations = self.broker_with(
            lambda sts, c: set_env(c, "KAFKA_ADVERTISED_LISTENERS", "PLAINTEXT://localhost:9092"))
        self.assertEqual(1, len(violations), violations)
        self.assertIn("advertises localhost:9092", violations[0])
        violations = self.broker_with(lambda sts, c: sts["spec"].update(replicas=3))
        self.assertEqual(1, len(violations), violations)
        docs = [d for d in good_broker() if d["metadata"]["name"] != "kafka-headless"]
        self.assertEqual(1, len(rule_broker(docs)), rule_broker(docs))
        docs = [d for d in good_broker() if d["kind"] != "Service" or d["metadata"]["name"] != "kafka"]
        self.assertEqual(1, len(rule_broker(docs)), rule_broker(docs))

    def test_broker_addresses(self):
        """self-check: KAFKA_BROKERS on another host or port, or missing where the binary reads it, is rejected"""
        for value in ("kafka:9093", "broker.platform.svc.cluster.local:9092", "127.0.0.1:9092",
                      "kafka.platform.svc.cluster.local:9092,localhost:9092"):
            docs = good_broker() + self.broken(lambda pod, v=value: set_env(pod["containers"][0], "KAFKA_BROKERS", v))
            self.assertEqual(1, len(rule_broker_addresses(docs, "stream-pipeline:dev", fake_settings)), value)
        for value in ("kafka:9092", "kafka.platform:9092", "kafka.platform.svc.cluster.local:9092"):
            docs = good_broker() + self.broken(lambda pod, v=value: set_env(pod["containers"][0], "KAFKA_BROKERS", v))
            self.assertEqual([], rule_broker_addresses(docs, "stream-pipeline:dev", fake_settings), value)
        docs = good_broker() + self.broken(lambda pod: set_env(pod["containers"][0], "KAFKA_BROKERS", None))
        violations = rule_broker_addresses(docs, "stream-pipeline:dev", fake_settings)
        self.assertEqual(1, len(violations), violations)
        self.assertIn("127.0.0.1:9092", violations[0])

    def test_topic_init(self):
        """self-check: no topic-init, a topic it does not create, or a replication factor above the brokers is rejected"""
        docs = good_broker() + good_processor()
        self.assertEqual(1, len(rule_topic_init(docs, "stream-pipeline:dev")))
        job = good_topic_init()
        set_env(job["spec"]["template"]["spec"]["containers"][0], "KAFKA_DLQ_TOPIC", "dead-letters")
        violations = rule_topic_init(docs + [job], "stream-pipeline:dev")
        self.assertEqual(1, len(violations), violations)
        self.assertIn("events.dlq", violations[0])
        job = good_topic_init()
        job["spec"]["template"]["spec"]["containers"][0]["command"] += ["--replication-factor", "3"]
        self.assertEqual(1, len(rule_topic_init(docs + [job], "stream-pipeline:dev")))
        job = good_topic_init()
        job["spec"]["template"]["spec"]["containers"][0]["command"] = ["streamctl", "sqs", "setup"]
        self.assertEqual(1, len(rule_topic_init(docs + [job], "stream-pipeline:dev")))

    def test_processor_static_membership(self):
        """self-check: a processor without the pod name as KAFKA_GROUP_INSTANCE_ID is rejected"""
        def processor_with(value):
            docs = good_processor()
            container = docs[0]["spec"]["template"]["spec"]["containers"][0]
            container["env"] = [e for e in container["env"] if e["name"] != "KAFKA_GROUP_INSTANCE_ID"]
            if value is not None:
                container["env"].append(dict(value, name="KAFKA_GROUP_INSTANCE_ID"))
            return rule_processor(docs, "stream-pipeline:dev")
        for value in (None, {"value": "processor-0"},
                      {"valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}):
            violations = processor_with(value)
            self.assertEqual(1, len(violations), (value, violations))
            self.assertIn("KAFKA_GROUP_INSTANCE_ID", violations[0])

    def test_processor_session_timeout(self):
        """self-check: a SESSION_TIMEOUT_MS outside 6000..300000 (Kafka's group min/max) is rejected"""
        for value, expected in (("6000", 0), ("45000", 0), ("300000", 0),
                                ("5999", 1), ("3000", 1), ("300001", 1), ("6s", 1), ("", 1)):
            docs = good_processor()
            set_env(docs[0]["spec"]["template"]["spec"]["containers"][0], "SESSION_TIMEOUT_MS", value)
            violations = rule_processor(docs, "stream-pipeline:dev")
            self.assertEqual(expected, len(violations), (value, violations))

    def test_dockerfile(self):
        """self-check: a Dockerfile that runs as root or lacks a binary is rejected"""
        docs = [good_deployment()]
        good = "FROM rust AS b\nFROM debian\nCOPY --from=b /out/processor /usr/local/bin/\nUSER 10001:10001\n"
        self.assertEqual([], rule_dockerfile(docs, "stream-pipeline:dev", good))
        self.assertEqual(1, len(rule_dockerfile(docs, "stream-pipeline:dev", good.replace("/out/processor", "/out/loadgen"))))
        self.assertTrue(rule_dockerfile(docs, "stream-pipeline:dev", good.replace("USER 10001:10001", "USER 0")))

    # ---- issue 12: secrets, admin token, app role, network policies

    def rendered(self, change):
        """A copy of the rendered manifests with one thing broken."""
        docs = copy.deepcopy(DOCS)
        change(docs)
        return docs

    def test_secret_literals(self):
        """self-check: secretGenerator literals, a source outside secrets/, a Secret with data are rejected"""
        base = "k8s/base/platform/kustomization.yaml"
        overlay = "k8s/overlays/local/kustomization.yaml"
        good = {overlay: "secretGenerator:\n  - name: a\n    envs: [secrets/a.env]\n",
                base: "resources: [x.yaml]\n"}
        self.assertEqual([], rule_secret_literals(good))
        for path, text in ((base, "secretGenerator:\n  - name: a\n    literals: [PASSWORD=postgres]\n"),
                           (base, "secretGenerator:\n  - name: a\n    envs: [a.env]\n"),
                           (overlay, "secretGenerator:\n  - name: a\n    files: [token=../../base/token]\n"),
                           ("k8s/base/platform/s.yaml", "kind: Secret\nmetadata: {name: a}\nstringData: {a: b}\n")):
            violations = rule_secret_literals(dict(good, **{path: text}))
            self.assertEqual(1, len(violations), (text, violations))

    def test_secret_env_and_refs(self):
        """self-check: a literal password or URL, or a reference to a missing Secret key, is rejected"""
        for name in ("POSTGRES_URL", "CLICKHOUSE_PASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
            docs = self.broken(lambda pod, n=name: set_env(pod["containers"][0], n, "x"))
            self.assertEqual(1, len(rule_secret_env(docs)), name)
        docs = self.broken(lambda pod: set_env(pod["containers"][0], "ADMIN_TOKEN_FILE", "/run/token"))
        self.assertEqual([], rule_secret_env(docs))
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "platform"},
                  "data": {"a": base64.b64encode(b"x").decode()}}
        for key, expected in (("a", 0), ("b", 1)):
            docs = self.broken(lambda pod, k=key: pod["containers"][0]["env"].append(
                {"name": "CLICKHOUSE_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "s", "key": k}}}))
            self.assertEqual(expected, len(rule_secret_refs(docs + [secret])), key)
            self.assertEqual(1, len(rule_secret_refs(docs)), key)

    def test_generated(self):
        """self-check: a world-readable file, a URL without its password, a short token are rejected"""
        generators = [{"name": "db", "envs": ["secrets/db.env"]}, {"name": "admin", "envs": ["secrets/admin.env"]}]
        hexed = "ab" * 24
        files = {"db.env": "PASSWORD=%s\nPOSTGRES_URL=postgres://u:%s@h:5432/d\n" % (hexed, hexed),
                 "admin.env": "token=%s\n" % ("cd" * 32)}
        tmp = tempfile.mkdtemp()
        try:
            def write(changes=None, mode=0o600):
                directory = tempfile.mkdtemp(dir=tmp)
                os.chmod(directory, 0o700)
                for name, text in dict(files, **(changes or {})).items():
                    with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
                        f.write(text)
                    os.chmod(os.path.join(directory, name), mode)
                return rule_generated(directory, generators)[0]
            self.assertEqual([], write())
            self.assertEqual(2, len(write(mode=0o644)))
            self.assertEqual(1, len(write({"db.env": "PASSWORD=%s\nPOSTGRES_URL=postgres://u:other@h/d\n" % hexed})))
            self.assertEqual(1, len(write({"db.env": "PASSWORD=postgres\nPOSTGRES_URL=postgres://u:postgres@h/d\n"})))
            self.assertEqual(1, len(write({"admin.env": "token=%s\n" % ("cd" * 16)})))
        finally:
            shutil.rmtree(tmp)
        keys = {"db": {"PASSWORD": hexed}}
        docs = self.broken(lambda pod: pod["containers"][0]["env"].append(
            {"name": "CLICKHOUSE_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db-abcde12345", "key": "OTHER"}}}))
        self.assertEqual(1, len(rule_generator_covers(docs, keys)))

    def test_app_role(self):
        """self-check: the owner's URL in the processor, no grant, no REVOKE, no wait for PostgreSQL are rejected"""
        def owner_url_in_processor(docs):
            container = find(docs, "Deployment", "processor")["spec"]["template"]["spec"]["containers"][0]
            owner = find(docs, "Job", MIGRATE_JOB)["spec"]["template"]["spec"]["containers"][0]
            container["env"] = [e for e in container["env"] if e["name"] != "POSTGRES_URL"] + \
                [copy.deepcopy(env_entry(owner, "POSTGRES_URL"))]

        def no_grant(docs):
            container = find(docs, "Job", MIGRATE_JOB)["spec"]["template"]["spec"]["containers"][0]
            container["command"] = ["streamctl", "db", "migrate"]

        def no_revoke(docs):
            for doc in docs:
                for key, text in list((doc.get("data") or {}).items()) if doc.get("kind") == "ConfigMap" else []:
                    doc["data"][key] = text.replace("REVOKE CREATE ON SCHEMA public FROM PUBLIC", "SELECT 1")

        def no_wait(docs):
            find(docs, "Job", MIGRATE_JOB)["spec"]["template"]["spec"]["initContainers"] = []

        def app_password_differs(docs):
            for doc in docs:
                if doc.get("kind") == "Secret" and doc["metadata"]["name"].startswith("postgres-app-credentials"):
                    doc["data"]["PIPELINE_APP_PASSWORD"] = base64.b64encode(b"f" * 48).decode()

        self.assertEqual([], rule_app_role(DOCS, IMAGE))
        for change, words in ((owner_url_in_processor, "not the application role"), (no_grant, "grants to None"),
                              (no_revoke, "REVOKE CREATE"), (no_wait, "pg_isready"),
                              (app_password_differs, "password in POSTGRES_URL")):
            violations = rule_app_role(self.rendered(change), IMAGE)
            self.assertTrue(violations and all(words in v for v in violations), (change.__name__, violations))
        self.assertEqual(1, len(rule_app_role([d for d in DOCS if name_of(d) != "Job/" + MIGRATE_JOB], IMAGE)))

    def test_admin_token(self):
        """self-check: a token file off the Secret, world-readable, writable, or no ADMIN_TOKEN_FILE is rejected"""
        def processor_pod(docs):
            return find(docs, "Deployment", "processor")["spec"]["template"]["spec"]

        def token_volume(docs):
            return next(v for v in processor_pod(docs)["volumes"] if "secret" in v)

        def not_a_secret(docs):
            volume = token_volume(docs)
            del volume["secret"]
            volume["emptyDir"] = {}

        self.assertEqual([], rule_admin_token(DOCS, IMAGE))
        for change, words in (
                (lambda docs: set_env(processor_pod(docs)["containers"][0], "ADMIN_TOKEN_FILE", "/tmp/token"),
                 "on volume tmp, which is not a Secret"),
                (lambda docs: set_env(processor_pod(docs)["containers"][0], "ADMIN_TOKEN_FILE", None),
                 "not an absolute path"),
                (lambda docs: token_volume(docs)["secret"].update(defaultMode=0o444), "lets others read it"),
                (lambda docs: token_volume(docs)["secret"].update(defaultMode=0o460), "the group write it"),
                (not_a_secret, "which is not a Secret"),
                (lambda docs: [m.pop("readOnly", None) for m in processor_pod(docs)["containers"][0]["volumeMounts"]],
                 "not mounted readOnly"),
                (lambda docs: processor_pod(docs)["securityContext"].pop("fsGroup"), "no fsGroup")):
            violations = rule_admin_token(self.rendered(change), IMAGE)
            self.assertEqual(1, len(violations), (words, violations))
            self.assertIn(words, violations[0])

    def test_makefile_jobs(self):
        """self-check: a Makefile that does not wait for db-migrate, or applies before deleting it, is rejected"""
        with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
            text = f.read()
        self.assertEqual([], rule_makefile_jobs(DOCS, text))
        no_wait = re.sub(r"(?m)^\t.*job/db-migrate.*\n", "", text)
        self.assertEqual(1, len(rule_makefile_jobs(DOCS, no_wait)), rule_makefile_jobs(DOCS, no_wait))
        no_delete = re.sub(r"(?m)^\t.*delete job db-migrate.*\n", "", text)
        self.assertEqual(1, len(rule_makefile_jobs(DOCS, no_delete)), rule_makefile_jobs(DOCS, no_delete))

    def policy(self, docs, namespace, name):
        return next(d for d in docs if d.get("kind") == "NetworkPolicy"
                    and d["metadata"]["namespace"] == namespace and d["metadata"]["name"] == name)

    def test_network_policies(self):
        """self-check: no default deny, or a workload without a policy of its own, is rejected"""
        self.assertEqual([], rule_network_policies(DOCS))
        docs = [d for d in DOCS if not (d.get("kind") == "NetworkPolicy" and d["metadata"]["name"] ==
                                        "default-deny-ingress" and d["metadata"]["namespace"] == "observability")]
        violations = rule_network_policies(docs)
        self.assertEqual(1, len(violations), violations)
        self.assertIn("observability", violations[0])
        docs = copy.deepcopy(DOCS) + [dict(good_deployment(), metadata={"name": "tiny", "namespace": "platform"})]
        violations = rule_network_policies(docs)
        self.assertEqual(1, len(violations), violations)
        self.assertIn("tiny", violations[0])
        docs = [d for d in docs if d.get("kind") != "NetworkPolicy"]
        self.assertTrue(any("selected by no NetworkPolicy" in v for v in rule_network_policies(docs)))

    def test_admin_port(self):
        """self-check: the processor's port open to every namespace, to an ipBlock, or closed to Prometheus is rejected"""
        def peers(docs):
            return self.policy(docs, "platform", "processor")["spec"]["ingress"][0]["from"]
        for change, words in (
                (lambda docs: peers(docs).append({"namespaceSelector": {}}), "admits a pod of namespace default"),
                (lambda docs: peers(docs).append({"ipBlock": {"cidr": "0.0.0.0/0"}}), "ipBlock"),
                (lambda docs: peers(docs).pop(1), "does not admit Prometheus"),
                (lambda docs: peers(docs)[1].pop("podSelector"), "admits another pod of namespace observability"),
                (lambda docs: self.policy(docs, "platform", "processor")["spec"]["ingress"][0].pop("from"),
                 "admits every source")):
            violations = rule_admin_port(self.rendered(change))
            self.assertTrue(any(words in v for v in violations), (words, violations))

    def test_flows(self):
        """self-check: an extra client of PostgreSQL, or ElasticMQ closed to the sqs-consumer, is rejected"""
        expected = expected_flows(DOCS)
        self.assertEqual([], rule_flows(DOCS, expected))

        def grafana_to_postgres(docs):
            rule = self.policy(docs, "platform", "postgres")["spec"]["ingress"][0]
            rule["from"].append({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}},
                                 "podSelector": {"matchLabels": {NAME_LABEL: "grafana"}}})
        self.assertEqual(["unexpected: grafana -> postgres:5432 (admitted, but not in the expected flows)"],
                         rule_flows(self.rendered(grafana_to_postgres), expected))

        def closed_queue(docs):
            self.policy(docs, "platform", "elasticmq")["spec"]["ingress"] = []
        self.assertEqual(["missing: sqs-consumer -> elasticmq:9324 (no NetworkPolicy admits it)"],
                         rule_flows(self.rendered(closed_queue), expected))
        docs = [d for d in DOCS if not (d.get("kind") == "NetworkPolicy" and d["metadata"]["namespace"] == "observability")]
        self.assertTrue(any(v.startswith("unexpected: outsider -> grafana:3000") for v in rule_flows(docs, expected)))


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
        if result.skipped and not problems:
            print("skip policy: %s (%s)" % (title, result.skipped[0][1]))
        elif problems:
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
