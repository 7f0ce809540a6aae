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
and the glue: metrics ports and scrape annotations agree with METRICS_ADDR,
the processor runs 2 replicas in one group under a PodDisruptionBudget, as
static members (KAFKA_GROUP_INSTANCE_ID is the pod name), with a
SESSION_TIMEOUT_MS, if set, within Kafka's default
group.min/max.session.timeout.ms (6000..300000), the ConfigMaps
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
    elif all(b["spec"].get("minAvailable") != 1 for b in budgets):
        bad.append("processor: PodDisruptionBudget is not minAvailable: 1")
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
              "spec": {"minAvailable": 1, "selector": {"matchLabels": dict(labels)}}}
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
        """METRICS_ADDR binds 0.0.0.0 on the metrics port that probes and scrape annotations use"""
        self.assertHolds(rule_metrics(DOCS, IMAGE))

    def test_processor(self):
        """the processor: 2 replicas in one group, static members by pod name, a PodDisruptionBudget minAvailable 1"""
        self.assertHolds(rule_processor(DOCS, IMAGE))

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
