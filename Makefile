# The pipeline on a local Kubernetes cluster (k3d). From a laptop with Docker,
# k3d and kubectl:
#
#   make k3d-up images deploy demo-k8s     # cluster, image, manifests, demo
#   make k3d-down                          # delete the cluster
#
# `make render` prints the manifests; `make check` runs the offline checks
# (scripts/check-k8s.sh: render, schema validation, policy tests, shellcheck).
# The Secrets' values are generated on this machine, never committed:
# `make secrets` (k8s/generate-secrets.sh; render, deploy and check run it)
# writes them to k8s/overlays/local/secrets/ when they are not there yet.
# k8s/README.md explains every step.

# The project's one image. The manifests name it verbatim and
# scripts/check-k8s.sh reads it from here (`make -s print-image`).
IMAGE ?= stream-pipeline:dev
# The k3d cluster: metadata.name in k8s/k3d-cluster.yaml (checked).
CLUSTER ?= stream-pipeline
K3D_CONFIG := k8s/k3d-cluster.yaml
OVERLAY ?= k8s/overlays/local
KUBE_CONTEXT ?= k3d-$(CLUSTER)
KUBECTL ?= kubectl
K := $(KUBECTL) --context $(KUBE_CONTEXT)
# The base kustomizations read observability/ at the repository root.
KUSTOMIZE_FLAGS := --load-restrictor LoadRestrictionsNone
TIMEOUT ?= 600s
# KEDA, which scales the processor on its group's lag
# (k8s/base/platform/processor-scaledobject.yaml). scripts/check-k8s.sh
# validates the ScaledObject against this version's CRD.
KEDA_VERSION ?= 2.21.1
KEDA_MANIFEST ?= https://github.com/kedacore/keda/releases/download/v$(KEDA_VERSION)/keda-$(KEDA_VERSION).yaml

.PHONY: help print-image print-cluster print-keda-version keda secrets k3d-up images deploy wait demo-k8s k3d-down render check bench

help:
	@echo "make k3d-up      create the k3d cluster $(CLUSTER) ($(K3D_CONFIG))"
	@echo "make images      docker build -t $(IMAGE) . and import it into the cluster"
	@echo "make keda        install KEDA $(KEDA_VERSION) (the processor's autoscaler) into namespace keda"
	@echo "make deploy      install KEDA, render $(OVERLAY), apply it, wait for every rollout"
	@echo "make secrets     generate the Secrets' values once (k8s/generate-secrets.sh, into $(OVERLAY)/secrets/)"
	@echo "make demo-k8s    the resilience demo against the cluster (k8s/demo-k8s.sh)"
	@echo "make k3d-down    delete the cluster"
	@echo "make render      print the rendered manifests"
	@echo "make check       offline checks (scripts/check-k8s.sh)"
	@echo "make bench       issue 7's benchmarks and issue 14's peers on the local services (cargo run -p bench --release; BENCH_ARGS=... passes flags)"

print-image:
	@echo $(IMAGE)

print-cluster:
	@echo $(CLUSTER)

print-keda-version:
	@echo $(KEDA_VERSION)

# KEDA's own release manifest (CRDs, operator, metrics API server, admission
# webhooks), applied server-side (its CRDs are too large for the
# last-applied annotation); the ScaledObject needs its CRD and its operator.
keda:
	$(K) apply --server-side -f $(KEDA_MANIFEST)
	$(K) -n keda wait --for=condition=Available deployment --all --timeout=$(TIMEOUT)

k3d-up:
	k3d cluster create --config $(K3D_CONFIG)

images:
	docker build -t $(IMAGE) .
	k3d image import $(IMAGE) --cluster $(CLUSTER)

# Random values for every Secret, written only where none exist yet (so the
# stores keep the passwords they were initialised with).
secrets:
	@bash k8s/generate-secrets.sh

render: secrets
	@$(KUBECTL) kustomize $(KUSTOMIZE_FLAGS) $(OVERLAY)

# db-migrate is deleted first: its template names the generated Secrets, whose
# names change with their values, and a Job's template cannot change. It is
# idempotent, so every deploy runs it again (and re-applies the app role's
# password).
deploy: secrets keda
	$(K) -n platform delete job db-migrate --ignore-not-found
	$(KUBECTL) kustomize $(KUSTOMIZE_FLAGS) $(OVERLAY) | $(K) apply -f -
	@$(MAKE) --no-print-directory wait

# Stores first, then the topics and the tables, then everything else.
wait:
	$(K) -n platform rollout status statefulset/kafka --timeout=$(TIMEOUT)
	$(K) -n platform rollout status statefulset/postgres --timeout=$(TIMEOUT)
	$(K) -n platform rollout status statefulset/clickhouse --timeout=$(TIMEOUT)
	$(K) -n platform wait --for=condition=complete job/topic-init --timeout=$(TIMEOUT)
	$(K) -n platform wait --for=condition=complete job/db-migrate --timeout=$(TIMEOUT)
	$(K) -n platform rollout status deployment/elasticmq --timeout=$(TIMEOUT)
	$(K) -n platform rollout status deployment/processor --timeout=$(TIMEOUT)
	$(K) -n platform rollout status deployment/sqs-consumer --timeout=$(TIMEOUT)
	$(K) -n platform rollout status deployment/lag-exporter --timeout=$(TIMEOUT)
	$(K) -n platform rollout status statefulset/minio --timeout=$(TIMEOUT)
	$(K) -n platform rollout status deployment/dlq-archiver --timeout=$(TIMEOUT)
	$(K) -n observability rollout status statefulset/prometheus --timeout=$(TIMEOUT)
	$(K) -n observability rollout status deployment/alertmanager --timeout=$(TIMEOUT)
	$(K) -n observability rollout status deployment/grafana --timeout=$(TIMEOUT)
	@echo "deployed: Grafana http://localhost:3000  Prometheus http://localhost:9090  Alertmanager http://localhost:9093"

demo-k8s:
	KUBECTL="$(KUBECTL)" KUBE_CONTEXT="$(KUBE_CONTEXT)" bash k8s/demo-k8s.sh

k3d-down:
	k3d cluster delete $(CLUSTER)

check: secrets
	bash scripts/check-k8s.sh

# Issue 7's benchmarks and issue 14's peers (Kafka Connect + Debezium JDBC sink,
# resolved by Maven on the first run; Quix Streams from PyPI) and their
# behaviour table (hostile records, a SIGKILL mid-run), side by side on the local services
# (scripts/services.sh up): a Markdown table on stdout, bench.md, bench.png and
# RSS CSVs in target/bench/.
# Smaller run: make bench BENCH_ARGS="--events 100000 --memory-events 200000 --peers-events 200000"
# Without the peers: make bench BENCH_ARGS=--skip-peers
BENCH_ARGS ?=
bench:
	cargo run -p bench --release -- $(BENCH_ARGS)
