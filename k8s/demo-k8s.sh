#!/usr/bin/env bash
# The resilience demo against the k3d cluster (after `make k3d-up images deploy`):
#   1. poison is dead-lettered, not dropped: events.dlq count (streamctl dlq stats)
#   2. a killed processor pod resumes from its checkpoint: stored events before
#      and after `kubectl delete pod`, then `streamctl audit` (the topic read on
#      its own against both stores and the DLQ; exit 0 = every event stored or
#      dead-lettered, exactly once: "climbed, no gap, no dupes")
#   3. the SLO holds: sli:success:ratio5m from Prometheus against 0.99
#   4. queue contrast: ElasticMQ redrives a poison order after maxReceiveCount
#
# streamctl and loadgen run inside the pods (`kubectl exec`), with the pods'
# own settings. Exits with the audit's status: 0 when every event is accounted for.
#
#   bash k8s/demo-k8s.sh                      # or: make demo-k8s
#   KUBE_CONTEXT=k3d-stream-pipeline LOADGEN_TIMEOUT=1200 bash k8s/demo-k8s.sh
set -euo pipefail

KUBECTL="${KUBECTL:-kubectl}"
KUBE_CONTEXT="${KUBE_CONTEXT:-}"
NS="${NAMESPACE:-platform}"
OBS_NS="${OBS_NAMESPACE:-observability}"
# Seconds to wait for the loadgen Job to send everything (180000 at 500/s: 6 min).
LOADGEN_TIMEOUT="${LOADGEN_TIMEOUT:-900}"
# Seconds to wait for the processors to reach the end of the topic.
CATCH_UP_SECS="${CATCH_UP_SECS:-600}"
SLO_TARGET_DEFAULT="0.99"
ORDERS="${ORDERS:-200}"

k() {
  if [ -n "$KUBE_CONTEXT" ]; then
    "$KUBECTL" --context "$KUBE_CONTEXT" "$@"
  else
    "$KUBECTL" "$@"
  fi
}

say() { printf '%s\n' "$*"; }
note() { printf '   %s\n' "$*"; }
die() { printf 'demo-k8s: %s\n' "$*" >&2; exit 1; }

# Runs a command in the processor Deployment's container (any of its pods).
in_processor() { k -n "$NS" exec deploy/processor -c processor -- "$@"; }
in_sqs_consumer() { k -n "$NS" exec deploy/sqs-consumer -c sqs-consumer -- "$@"; }

# json_number KEY: the first numeric value of "KEY" in the JSON on stdin.
json_number() { sed -n "s/.*\"$1\":\([0-9.eE+-]*\).*/\1/p" | awk 'NR == 1'; }

# prom_value QUERY: the value of an instant query's first sample, or empty.
prom_value() {
  k -n "$OBS_NS" exec statefulset/prometheus -c prometheus -- \
    wget -qO- "http://127.0.0.1:9090/api/v1/query?query=$1" 2>/dev/null |
    sed -n 's/.*"value":\[[^,]*,"\([^"]*\)"\].*/\1/p' | awk 'NR == 1'
}

processor_pods() {
  k -n "$NS" get pods -l app.kubernetes.io/name=processor \
    --field-selector=status.phase=Running -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}'
}

command -v "$KUBECTL" >/dev/null 2>&1 || die "$KUBECTL not found: install kubectl"
k -n "$NS" get deployment/processor >/dev/null 2>&1 ||
  die "no deployment/processor in namespace $NS: run make k3d-up images deploy first"
k -n "$NS" rollout status deployment/processor --timeout=300s >/dev/null

say "== 1. Poison is dead-lettered, not dropped =="
DLQ_JSON=$(in_processor streamctl dlq stats --json)
DLQ_TOTAL=$(printf '%s' "$DLQ_JSON" | json_number total)
note "events.dlq messages so far: ${DLQ_TOTAL:-?}"

say "== 2. Killed processor resumes from its checkpoint (no data loss) =="
BEFORE=$(in_processor streamctl report --wait-secs 0 --json | json_number postgres_rows || true)
VICTIM=$(processor_pods | awk 'NR == 1')
[ -n "$VICTIM" ] || die "no running processor pod"
note "stored events before: ${BEFORE:-?}; deleting pod $VICTIM"
k -n "$NS" delete pod "$VICTIM" --wait=true >/dev/null
# The Deployment replaces it; wait until as many pods are ready as the
# autoscaler wants (KEDA sets the count from the group's lag). A pod is ready
# once it holds partitions.
deadline=$((SECONDS + 300))
until [ "$(k -n "$NS" get deployment/processor -o jsonpath='{.status.readyReplicas}/{.spec.replicas}' |
  awk -F/ '$1 != "" && $1 == $2 { print "ok" }')" = ok ]; do
  [ "$SECONDS" -lt "$deadline" ] || die "the processor pods were not all ready again within 300 s"
  sleep 2
done
note "processors ready again: $(processor_pods | tr '\n' ' ')"
note "autoscaler (KEDA, from the group's lag): $(k -n "$NS" get hpa keda-hpa-processor \
  -o jsonpath='{.status.currentReplicas} replica(s) running, {.status.desiredReplicas} wanted' 2>/dev/null || echo 'no HPA: is KEDA installed (make keda)?')"
# The audit needs a quiet topic: wait for loadgen to have sent everything.
if ! k -n "$NS" wait job/loadgen --for=condition=complete --timeout="${LOADGEN_TIMEOUT}s" >/dev/null; then
  k -n "$NS" logs job/loadgen --tail=5 >&2 || true
  die "loadgen did not complete within ${LOADGEN_TIMEOUT}s"
fi
note "loadgen ledger: $(k -n "$NS" logs job/loadgen -c loadgen --tail=1)"
set +e
AFTER_JSON=$(in_processor streamctl report --wait-secs "$CATCH_UP_SECS" --json)
set -e
AFTER=$(printf '%s' "$AFTER_JSON" | json_number postgres_rows)
if [ -n "$BEFORE" ] && [ -n "$AFTER" ] && [ "$AFTER" -gt "$BEFORE" ]; then
  note "events before: $BEFORE  after: $AFTER  (climbed: the processors carried on from the checkpoint)"
else
  note "events before: ${BEFORE:-?}  after: ${AFTER:-?}"
fi
set +e
AUDIT=$(in_processor streamctl audit)
VERDICT=$?
set -e
printf '%s\n' "$AUDIT" | sed 's/^/   /'
if [ "$VERDICT" -eq 0 ] && [ -n "$BEFORE" ] && [ -n "$AFTER" ] && [ "$AFTER" -gt "$BEFORE" ]; then
  note "climbed, no gap, no dupes"
fi

say "== 3. The SLO stays within its error budget =="
SLI=$(prom_value 'sli:success:ratio5m')
TARGET=$(prom_value 'slo:objective:ratio')
TARGET="${TARGET:-$SLO_TARGET_DEFAULT}"
if [ -z "$SLI" ]; then
  note "success ratio (SLI): no data yet (Prometheus needs a dead letter within the last 5m)"
elif awk -v s="$SLI" -v t="$TARGET" 'BEGIN { exit !(s + 0 >= t + 0) }'; then
  note "success ratio (SLI): $(printf '%.4f' "$SLI")  (target $TARGET): within budget"
else
  note "success ratio (SLI): $(printf '%.4f' "$SLI")  (target $TARGET): BELOW target, the budget burns"
fi

say "== 4. Queue contrast: the broker redrives after maxReceiveCount =="
in_sqs_consumer streamctl sqs setup --max-receive-count 3 | sed 's/^/   /'
# The pod's METRICS_ADDR is the consumer's own port: loadgen must not bind it.
ORDERS_LEDGER=$(in_sqs_consumer env -u METRICS_ADDR loadgen sqs --count "$ORDERS" --poison-rate 0.02 | tail -n1)
note "orders ledger: $ORDERS_LEDGER"
STATUS=""
for _ in $(seq 1 120); do
  STATUS=$(in_sqs_consumer streamctl sqs status)
  if printf '%s' "$STATUS" | grep -q "0 waiting, 0 in flight"; then break; fi
  sleep 1
done
printf '%s\n' "$STATUS" | sed 's/^/   /'
note "log (Kafka): the consumer decides a record is poison and writes it to events.dlq itself; the original stays on the log, replayable."
note "queue (SQS): the consumer only fails to delete; the broker counts receives and moves the message to orders-dlq after maxReceiveCount."

if [ "$VERDICT" -eq 0 ]; then
  say "demo-k8s: every event accounted for"
else
  say "demo-k8s: the audit found a mismatch (streamctl audit exited $VERDICT)"
fi
exit "$VERDICT"
