"""Seed 001's "idempotency keys" consumer, as the seed writes it.

The seed (shared/seeds/001_*.txt, "Pattern 1: Idempotency Keys"):

    for message in consumer:
        event_id = message.key.decode('utf-8')
        try:
            cursor.execute("INSERT INTO events (id, data) VALUES (%s, %s)",
                           (event_id, message.value))
            conn.commit()
            consumer.commit()
        except psycopg2.IntegrityError:
            conn.rollback()
            consumer.commit()

Per message: one INSERT, one database commit, one synchronous offset commit
(kafka-python's `commit()` blocks until the broker answers, so
`asynchronous=False` here). It runs on confluent-kafka and psycopg 3 instead of
kafka-python and psycopg2; the per-message round trips are the same.

One deviation, forced by the data: the seed keys on `message.key`, but
loadgen's key is the user id (10,000 users, not unique per event), so the
idempotency key here is the record's source position `topic-partition-offset`,
unique per record. Like the seed, nothing is parsed or validated: the raw
value goes into `data`.

The bench runs this for a bounded slice (--max-seconds / --max-events): at
about a thousand events a second a full run would take many minutes. The clock
starts at the first message (the group join is not counted, which favours
this consumer). The last stdout line is a JSON summary.
"""

import argparse
import json
import sys
import time

import psycopg
from confluent_kafka import Consumer, KafkaError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--postgres-url", required=True)
    parser.add_argument("--max-events", type=int, required=True)
    parser.add_argument("--max-seconds", type=float, required=True)
    parser.add_argument("--start-timeout", type=float, default=60.0)
    args = parser.parse_args()

    conn = psycopg.connect(args.postgres_url)
    cursor = conn.cursor()
    consumer = Consumer(
        {
            "bootstrap.servers": args.brokers,
            "group.id": args.group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([args.topic])

    consumed = 0
    duplicates = 0
    first_at = None
    waited_from = time.monotonic()
    try:
        while consumed < args.max_events:
            now = time.monotonic()
            if first_at is None and now - waited_from > args.start_timeout:
                print(f"seed001: no message within {args.start_timeout}s", file=sys.stderr)
                return 1
            if first_at is not None and now - first_at >= args.max_seconds:
                break
            message = consumer.poll(1.0)
            if message is None:
                continue
            if message.error():
                if message.error().code() == KafkaError._PARTITION_EOF:
                    continue
                print(f"seed001: consumer error: {message.error()}", file=sys.stderr)
                return 1
            if first_at is None:
                first_at = time.monotonic()
            event_id = f"{message.topic()}-{message.partition()}-{message.offset()}"
            try:
                cursor.execute(
                    "INSERT INTO events (id, data) VALUES (%s, %s)",
                    (event_id, message.value()),
                )
                conn.commit()
                consumer.commit(message=message, asynchronous=False)
            except psycopg.errors.UniqueViolation:
                conn.rollback()
                duplicates += 1
                consumer.commit(message=message, asynchronous=False)
            consumed += 1
        seconds = time.monotonic() - first_at if first_at is not None else 0.0
    finally:
        consumer.close()

    cursor.execute("SELECT count(*), count(DISTINCT id) FROM events")
    stored, distinct = cursor.fetchone()
    conn.close()
    print(
        json.dumps(
            {
                "consumed": consumed,
                "duplicates": duplicates,
                "stored": stored,
                "distinct": distinct,
                "seconds": seconds,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
