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

say "== 1. processor =="
"$BIN/processor" --brokers "$BROKERS" --group "$GROUP" --postgres-url "$POSTGRES_URL" \
  --clickhouse-url "$CLICKHOUSE_URL" --metrics-addr "$METRICS_ADDR" >"$STATE/processor.log" 2>&1 &
PROCESSOR_PID=$!
# shellcheck disable=SC2317  # called from the EXIT trap
stop_processor() {
  if kill -TERM "$PROCESSOR_PID" 2>/dev/null; then wait "$PROCESSOR_PID" 2>/dev/null || true; fi
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

say "== 2. loadgen --count $COUNT --poison-rate $POISON_RATE =="
START=$(date +%s.%N)
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
