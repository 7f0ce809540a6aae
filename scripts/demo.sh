#!/usr/bin/env bash
# The local demo: starts the services, runs the processor under
# `loadgen --poison-rate 0.005`, waits for catch-up and prints what happened.
#
#   bash scripts/demo.sh            # 200000 events
#   COUNT=50000 bash scripts/demo.sh
#
# Each run starts clean: it recreates the topics `events` and `events.dlq`,
# drops the pipeline's tables and uses a fresh consumer group.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

COUNT="${COUNT:-200000}"
RATE="${RATE:-0}"
POISON_RATE="${POISON_RATE:-0.005}"
BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
POSTGRES_URL="${POSTGRES_URL:-postgres://postgres:postgres@127.0.0.1:5432/pipeline}"
CLICKHOUSE_URL="${CLICKHOUSE_URL:-http://127.0.0.1:8123}"
METRICS_ADDR="${METRICS_ADDR:-127.0.0.1:9464}"
GROUP="processor-demo-$(date +%s)"
STATE="$ROOT/.services"
mkdir -p "$STATE"

say() { printf '%s\n' "$*" >&2; }

say "== 0. services =="
bash scripts/services.sh up

say "== building release binaries (first time takes a few minutes) =="
cargo build --release -p stream-bins -p loadgen
BIN="$ROOT/target/release"

say "== starting clean: topics recreated, tables dropped, group $GROUP =="
for topic in events events.dlq; do
  tansu topic delete "$topic" --broker "tcp://${BROKERS}" >/dev/null 2>&1 || true
  tansu topic create "$topic" --partitions 6 --broker "tcp://${BROKERS}" >/dev/null
done
psql -q "$POSTGRES_URL" -c 'DROP TABLE IF EXISTS events; DROP TABLE IF EXISTS pipeline_checkpoints;' >/dev/null
curl -sf "$CLICKHOUSE_URL/" --data-binary 'DROP TABLE IF EXISTS pipeline.events' >/dev/null

say "== Prometheus (rules from observability/) and Alertmanager =="
if ! command -v prometheus >/dev/null || ! command -v prometheus-alertmanager >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y prometheus prometheus-alertmanager >&2
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
# shellcheck disable=SC2317  # called from the EXIT trap
stop_observability() { kill "$PROMETHEUS_PID" "$ALERTMANAGER_PID" 2>/dev/null || true; }
trap stop_observability EXIT
for _ in $(seq 1 100); do curl -sf "http://$PROMETHEUS_ADDR/-/ready" >/dev/null 2>&1 && break; sleep 0.2; done
curl -sf "http://$PROMETHEUS_ADDR/-/ready" >/dev/null || { say "prometheus did not start:"; tail -20 "$STATE/prometheus.log" >&2; exit 1; }
# promql EXPR: the first value of an instant query, or "none".
promql() {
  curl -sf --get "http://$PROMETHEUS_ADDR/api/v1/query" --data-urlencode "query=$1" |
    python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "none")'
}

say "== 1. processor =="
"$BIN/processor" --brokers "$BROKERS" --group "$GROUP" --postgres-url "$POSTGRES_URL" \
  --clickhouse-url "$CLICKHOUSE_URL" --metrics-addr "$METRICS_ADDR" >"$STATE/processor.log" 2>&1 &
PROCESSOR_PID=$!
# shellcheck disable=SC2317  # called from the EXIT trap
stop_processor() {
  if kill -TERM "$PROCESSOR_PID" 2>/dev/null; then wait "$PROCESSOR_PID" 2>/dev/null || true; fi
  stop_observability
}
trap stop_processor EXIT
for _ in $(seq 1 100); do
  if grep -q "pipeline started" "$STATE/processor.log"; then break; fi
  if ! kill -0 "$PROCESSOR_PID" 2>/dev/null; then
    say "processor exited:"; tail -20 "$STATE/processor.log" >&2; exit 1
  fi
  sleep 0.2
done
grep -q "pipeline started" "$STATE/processor.log" || { say "processor did not start in 20 s"; tail -20 "$STATE/processor.log" >&2; exit 1; }
say "processor running (pid $PROCESSOR_PID, metrics http://$METRICS_ADDR/metrics, log $STATE/processor.log)"

say "waiting for Prometheus to scrape the processor before any event (so its rates cover them all)"
for _ in $(seq 1 60); do [ "$(promql 'stream_events_processed_total')" = "0" ] && break; sleep 0.5; done

say "== 2. loadgen --count $COUNT --poison-rate $POISON_RATE =="
START=$(date +%s.%N)
RUN_START=$(date +%s)
LEDGER=$("$BIN/loadgen" --brokers "$BROKERS" --topic events --count "$COUNT" --rate "$RATE" --poison-rate "$POISON_RATE" | tail -1)
say "ledger: $LEDGER"

say "== 3. waiting for the processor to catch up =="
set +e
"$BIN/streamctl" report --brokers "$BROKERS" --group "$GROUP" --postgres-url "$POSTGRES_URL" \
  --clickhouse-url "$CLICKHOUSE_URL" --wait-secs 600
VERDICT=$?
set -e
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

"$BIN/streamctl" chart --prometheus "$PROMETHEUS_ADDR" --start "$((RUN_START - 10))" --out "$STATE/demo.png"

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
