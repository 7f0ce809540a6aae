#!/usr/bin/env bash
# The local demo: starts the services, runs the processor under
# `loadgen --poison-rate 0.005`, kills an actor and then the whole process
# mid-run (seed 000's step 2: counts before, the kills, counts after, proven by
# `streamctl audit`), waits for catch-up and prints what happened.
#
#   bash scripts/demo.sh            # 200000 events
#   COUNT=50000 bash scripts/demo.sh
#
# Each run starts clean: it recreates the topics `events` and `events.dlq`,
# drops the pipeline's tables and uses a fresh consumer group.
#
# Installs and builds write to .services/demo-setup.log (one line each here);
# the processor's log is .services/processor.log, the lag exporter's
# .services/lag-exporter.log. The chart of the run: .services/demo.png.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

COUNT="${COUNT:-200000}"
RATE="${RATE:-20000}"
POISON_RATE="${POISON_RATE:-0.005}"
BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
POSTGRES_URL="${POSTGRES_URL:-postgres://postgres:postgres@127.0.0.1:5432/pipeline}"
CLICKHOUSE_URL="${CLICKHOUSE_URL:-http://127.0.0.1:8123}"
METRICS_ADDR="${METRICS_ADDR:-127.0.0.1:9464}"
GROUP="processor-demo-$(date +%s)"
STATE="$ROOT/.services"
mkdir -p "$STATE"

say() { printf '%s\n' "$*" >&2; }
SETUP_LOG="$STATE/demo-setup.log"
: >"$SETUP_LOG"
# quietly WHAT COMMAND...: runs COMMAND with its output in $SETUP_LOG, says
# one line, and on a failure shows the log's tail.
quietly() {
  local what="$1" began
  shift
  began=$(date +%s)
  printf '%s ... ' "$what" >&2
  if "$@" >>"$SETUP_LOG" 2>&1; then
    printf 'done in %s s\n' "$(($(date +%s) - began))" >&2
  else
    printf 'FAILED; the end of %s:\n' "$SETUP_LOG" >&2
    tail -30 "$SETUP_LOG" >&2
    exit 1
  fi
}

say "== 0. services and binaries (output in $SETUP_LOG) =="
# services.sh creates the topics with streamctl: build it in release, as below.
quietly "services: Kafka, PostgreSQL, ClickHouse, SQS (moto), and the streamctl that creates the topics" env STREAMCTL_PROFILE=release bash scripts/services.sh up
quietly "release build (the first takes several minutes)" cargo build --release -p stream-bins -p loadgen
BIN="$ROOT/target/release"

say "== starting clean: topics recreated, tables dropped, group $GROUP =="
"$BIN/streamctl" topics ensure --brokers "$BROKERS" --topic events --dlq-topic events.dlq --recreate >>"$SETUP_LOG" 2>&1
psql -q "$POSTGRES_URL" -c 'DROP TABLE IF EXISTS events; DROP TABLE IF EXISTS pipeline_checkpoints;' >/dev/null
curl -sf "$CLICKHOUSE_URL/" --data-binary 'DROP TABLE IF EXISTS pipeline.events' >/dev/null

say "== Prometheus (rules from observability/) and Alertmanager =="
if ! command -v prometheus >/dev/null || ! command -v prometheus-alertmanager >/dev/null; then
  quietly "installing prometheus and alertmanager (apt)" env DEBIAN_FRONTEND=noninteractive apt-get install -y prometheus prometheus-alertmanager
fi
PROMETHEUS_ADDR="${PROMETHEUS_ADDR:-127.0.0.1:9090}"
if curl -sf "http://$PROMETHEUS_ADDR/-/ready" >/dev/null 2>&1; then
  say "error: something already answers on $PROMETHEUS_ADDR (set PROMETHEUS_ADDR)"; exit 1
fi
rm -rf "$STATE/prometheus" "$STATE/alertmanager"
prometheus --config.file="$ROOT/observability/prometheus/prometheus.yml" --storage.tsdb.path="$STATE/prometheus" \
  --web.listen-address="$PROMETHEUS_ADDR" >"$STATE/prometheus.log" 2>&1 &
PROMETHEUS_PID=$!
prometheus-alertmanager --config.file="$ROOT/observability/alertmanager/alertmanager.yml" \
  --storage.path="$STATE/alertmanager" --web.listen-address=127.0.0.1:9093 --cluster.listen-address= \
  >"$STATE/alertmanager.log" 2>&1 &
ALERTMANAGER_PID=$!
# The lag, read from the broker by a process of its own: it keeps
# measuring while the processor is down (job lag-exporter in prometheus.yml).
LAG_EXPORTER_ADDR="${LAG_EXPORTER_ADDR:-127.0.0.1:9467}"
"$BIN/streamctl" lag --brokers "$BROKERS" --group "$GROUP" --topic events --postgres-url "$POSTGRES_URL" \
  --serve "$LAG_EXPORTER_ADDR" >"$STATE/lag-exporter.log" 2>&1 &
LAG_EXPORTER_PID=$!
# shellcheck disable=SC2317  # called from the EXIT trap
stop_observability() { kill "$PROMETHEUS_PID" "$ALERTMANAGER_PID" "$LAG_EXPORTER_PID" 2>/dev/null || true; }
trap stop_observability EXIT
for _ in $(seq 1 100); do curl -sf "http://$PROMETHEUS_ADDR/-/ready" >/dev/null 2>&1 && break; sleep 0.2; done
curl -sf "http://$PROMETHEUS_ADDR/-/ready" >/dev/null || { say "prometheus did not start:"; tail -20 "$STATE/prometheus.log" >&2; exit 1; }
# promql EXPR: the first value of an instant query, or "none".
promql() {
  curl -sf --get "http://$PROMETHEUS_ADDR/api/v1/query" --data-urlencode "query=$1" |
    python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "none")'
}

say "== 1. processor =="
# The admin token for the kill routes: a fresh random one per demo run, in
# a file only this user can read (the processor and streamctl read it).
ADMIN_TOKEN_FILE="$STATE/admin-token"
(umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$ADMIN_TOKEN_FILE")
export ADMIN_TOKEN_FILE
PROCESSOR_PID=""
start_processor() {
  # Static membership (as the pod name in Kubernetes): the restarted process
  # takes its partitions back without waiting out the session timeout.
  "$BIN/processor" --brokers "$BROKERS" --group "$GROUP" --postgres-url "$POSTGRES_URL" \
    --clickhouse-url "$CLICKHOUSE_URL" --metrics-addr "$METRICS_ADDR" --group-instance-id demo-processor-0 \
    >>"$STATE/processor.log" 2>&1 &
  PROCESSOR_PID=$!
  for _ in $(seq 1 200); do
    if curl -sf "http://$METRICS_ADDR/readyz" >/dev/null 2>&1; then return 0; fi
    if ! kill -0 "$PROCESSOR_PID" 2>/dev/null; then
      say "processor exited:"; tail -20 "$STATE/processor.log" >&2; exit 1
    fi
    sleep 0.1
  done
  say "processor not ready in 20 s"; tail -20 "$STATE/processor.log" >&2; exit 1
}
# shellcheck disable=SC2317  # called from the EXIT trap
stop_processor() {
  if kill -TERM "$PROCESSOR_PID" 2>/dev/null; then wait "$PROCESSOR_PID" 2>/dev/null || true; fi
  stop_observability
}
trap stop_processor EXIT
: >"$STATE/processor.log"
start_processor
say "processor running (pid $PROCESSOR_PID, admin http://$METRICS_ADDR/status, metrics /metrics, log $STATE/processor.log)"

say "waiting for Prometheus to scrape the processor and the lag exporter before any event (so the chart covers them all)"
for _ in $(seq 1 60); do
  [ "$(promql 'stream_events_processed_total')" = "0" ] && [ "$(promql 'sum(stream_group_lag)')" = "0" ] && break
  sleep 0.5
done

say "== 2. loadgen --count $COUNT --rate $RATE --poison-rate $POISON_RATE (in the background) =="
START=$(date +%s.%N)
RUN_START=$(date +%s)
"$BIN/loadgen" --brokers "$BROKERS" --topic events --count "$COUNT" --rate "$RATE" --poison-rate "$POISON_RATE" \
  >"$STATE/ledger.txt" &
LOADGEN_PID=$!
stored() { psql -tA "$POSTGRES_URL" -c 'SELECT count(*) FROM events' 2>/dev/null || echo 0; }
for _ in $(seq 1 300); do [ "$(stored)" -gt "$((COUNT / 5))" ] && break; sleep 0.1; done

say "== 2b. kill and watch (seed 000, step 2) =="
now() { date +%s.%N; }
# seconds_since T: seconds from T (a now) to now, one decimal.
seconds_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
# lag: the group's lag as the lag exporter reads it from the broker.
lag() { curl -sf "http://$LAG_EXPORTER_ADDR/metrics" | awk '/^stream_group_lag\{/ { sum += $2 } END { print sum + 0 }'; }
BEFORE=$(stored)
printf 'stored before the kills: %s\n' "$BEFORE"
KILL_ACTOR_AT=$(now)
"$BIN/streamctl" kill sink --admin "$METRICS_ADDR" >/dev/null
for _ in $(seq 1 300); do
  curl -sf "http://$METRICS_ADDR/status" | grep -q '"generation":2' && curl -sf "http://$METRICS_ADDR/readyz" >/dev/null && break
  sleep 0.05
done
PIPELINE_BACK_AT=$(now)
printf 'actor kill: the supervisor restarted the pipeline from the checkpoint in %s s; restarts: %s\n' \
  "$(seconds_since "$KILL_ACTOR_AT")" \
  "$(curl -sf "http://$METRICS_ADDR/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["restarts"])')"
# Let it store for a while, so the chart shows the two kills apart.
RESUMED=$(stored)
for _ in $(seq 1 200); do [ "$(stored)" -gt "$((RESUMED + COUNT / 10))" ] && break; sleep 0.05; done
KILL_PROCESS_AT=$(now)
kill -9 "$PROCESSOR_PID"
wait "$PROCESSOR_PID" 2>/dev/null || true
# Down, as a node failure would leave it, until the lag exporter sees the
# lag climb by DOWN_LAG records (at most 15 s, or until loadgen is done).
DOWN_LAG="${DOWN_LAG:-40000}"
LAG_AT_KILL=$(lag)
for _ in $(seq 1 150); do
  [ "$(lag)" -ge "$((LAG_AT_KILL + DOWN_LAG))" ] && break
  kill -0 "$LOADGEN_PID" 2>/dev/null || break
  sleep 0.1
done
printf 'processor SIGKILLed at %s rows; down for %s s while the lag climbed from %s to %s; restarting it as an orchestrator would\n' \
  "$(stored)" "$(seconds_since "$KILL_PROCESS_AT")" "$LAG_AT_KILL" "$(lag)"
PROCESS_BACK_AT=$(now)
start_processor
AFTER_KILL=$(stored)
for _ in $(seq 1 300); do [ "$(stored)" -gt "$AFTER_KILL" ] && break; sleep 0.05; done
printf 'processor back and storing %s s after the restart\n' "$(seconds_since "$PROCESS_BACK_AT")"
wait "$LOADGEN_PID"
LEDGER=$(tail -1 "$STATE/ledger.txt")
say "ledger: $LEDGER"

say "== 3. waiting for the processor to catch up =="
set +e
"$BIN/streamctl" report --brokers "$BROKERS" --group "$GROUP" --postgres-url "$POSTGRES_URL" \
  --clickhouse-url "$CLICKHOUSE_URL" --wait-secs 600
VERDICT=$?
CAUGHT_UP_AT=$(date +%s)
AFTER=$(stored)
printf 'stored after the kills: %s (before: %s)\n' "$AFTER" "$BEFORE"
say "== 3b. streamctl audit: the topic, read independently, against both stores and the DLQ =="
"$BIN/streamctl" audit --brokers "$BROKERS" --postgres-url "$POSTGRES_URL" --clickhouse-url "$CLICKHOUSE_URL"
AUDIT=$?
set -e
if [ "$AUDIT" -eq 0 ] && [ "$AFTER" -gt "$BEFORE" ]; then
  echo "kill and watch: climbed, no gap, no dupes"
else
  echo "kill and watch: FAILED (audit exit $AUDIT, stored $BEFORE -> $AFTER)"
  VERDICT=1
fi
END=$(date +%s.%N)
awk -v n="$COUNT" -v s="$START" -v e="$END" 'BEGIN { printf "end to end: %d events in %.1f s (%.0f events/s, loadgen, processing and the report overlapping)\n", n, e - s, n / (e - s) }'
printf 'ledger from loadgen: %s\n' "$LEDGER"

say "== the SLO, read from Prometheus =="
STORED=$(psql -tA "$POSTGRES_URL" -c 'SELECT count(*) FROM events')
for _ in $(seq 1 60); do [ "$(promql 'stream_events_processed_total')" = "$STORED" ] && break; sleep 0.5; done
SCRAPED=$(promql 'timestamp(stream_events_processed_total)')
for _ in $(seq 1 60); do
  EVALUATED=$(promql 'timestamp(sli:success:ratio5m)')
  [ "$EVALUATED" != "none" ] && awk -v e="$EVALUATED" -v s="$SCRAPED" 'BEGIN { exit !(e > s) }' && break
  sleep 0.5
done
printf 'success ratio (SLI, sli:success:ratio5m): %.4f (target 0.99)\n' "$(promql 'sli:success:ratio5m')"
printf 'error budget left (last hour, slo:error_budget:remaining1h): %.1f%%\n' "$(promql '100 * slo:error_budget:remaining1h')"
printf 'alerts: %s\n' "$(curl -sf "http://$PROMETHEUS_ADDR/api/v1/alerts" |
  python3 -c 'import json,sys; a=json.load(sys.stdin)["data"]["alerts"]; print(", ".join(x["labels"]["alertname"]+"="+x["state"] for x in a) or "none pending or firing")')"

"$BIN/streamctl" chart --prometheus "$PROMETHEUS_ADDR" --start "$((RUN_START - 5))" --end "$((CAUGHT_UP_AT + 5))" \
  --out "$STATE/demo.png" \
  --mark "$KILL_ACTOR_AT:kill sink" --mark "$PIPELINE_BACK_AT:pipeline restarted" \
  --mark "$KILL_PROCESS_AT:SIGKILL processor" --mark "$PROCESS_BACK_AT:processor restarted"

say "== 4. queue contrast: the broker redrives after maxReceiveCount =="
"$BIN/streamctl" sqs setup --queue orders --dlq orders-dlq --max-receive-count 3 --purge >&2
"$BIN/sqs-consumer" --queue orders --dlq orders-dlq --postgres-url "$POSTGRES_URL" --wait-secs 1 \
  --retry-delay-secs 0 --metrics-addr "${SQS_METRICS_ADDR:-127.0.0.1:9466}" >"$STATE/sqs-consumer.log" 2>&1 &
SQS_PID=$!
# shellcheck disable=SC2317  # called from the EXIT trap
stop_all() {
  if kill -TERM "$SQS_PID" 2>/dev/null; then wait "$SQS_PID" 2>/dev/null || true; fi
  stop_processor
}
trap stop_all EXIT
ORDERS=$("$BIN/loadgen" sqs --queue orders --count "${ORDERS:-200}" --poison-rate 0.02 | tail -1)
say "orders ledger: $ORDERS"
for _ in $(seq 1 120); do
  STATUS=$("$BIN/streamctl" sqs status --queue orders --dlq orders-dlq)
  if printf '%s' "$STATUS" | grep -q "0 waiting, 0 in flight"; then break; fi
  sleep 0.5
done
DLQ_COUNT=$("$BIN/streamctl" dlq stats --brokers "$BROKERS" --json | sed -E 's/^\{"total":([0-9]+).*/\1/')
printf 'events.dlq messages so far: %s\n' "$DLQ_COUNT"
"$BIN/streamctl" sqs status --queue orders --dlq orders-dlq | grep redriven
echo "log (Kafka): the consumer decides a record is poison and writes it to events.dlq itself; the original stays on the log, replayable."
echo "queue (SQS): the consumer only fails to delete; the broker counts receives and moves the message to orders-dlq after maxReceiveCount."
exit "$VERDICT"
