"""Seed 001's consumer batched: what a user would write instead.

The same table and the same idempotency key as seed001_consumer.py (source
position `topic-partition-offset`, raw value, nothing parsed), but per poll of
up to 1000 messages (`consume(num_messages=1000)`): one multi-row
`INSERT ... ON CONFLICT (id) DO NOTHING`, one database commit, then one
synchronous offset commit of the positions consumed so far. Storing before
committing keeps it at-least-once, and the key makes the replay harmless.

The clock starts at the first message (the group join is not counted). It stops
after --max-events messages or --max-seconds, whichever comes first. The last
stdout line is a JSON summary.
"""

import argparse
import json
import sys
import time

import psycopg
from confluent_kafka import Consumer, KafkaError

BATCH = 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--postgres-url", required=True)
    parser.add_argument("--max-events", type=int, required=True)
    parser.add_argument("--max-seconds", type=float, required=True)
    parser.add_argument("--start-timeout", type=float, default=60.0)
    parser.add_argument("--idle-timeout", type=float, default=30.0)
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
    inserted = 0
    first_at = None
    last_message_at = time.monotonic()
    try:
        while consumed < args.max_events:
            now = time.monotonic()
            if first_at is None and now - last_message_at > args.start_timeout:
                print(f"batched: no message within {args.start_timeout}s", file=sys.stderr)
                return 1
            if first_at is not None and now - first_at >= args.max_seconds:
                break
            if first_at is not None and now - last_message_at > args.idle_timeout:
                print(
                    f"batched: nothing new for {args.idle_timeout}s at {consumed} messages",
                    file=sys.stderr,
                )
                return 1
            messages = consumer.consume(num_messages=BATCH, timeout=1.0)
            rows = []
            for message in messages:
                if message.error():
                    if message.error().code() == KafkaError._PARTITION_EOF:
                        continue
                    print(f"batched: consumer error: {message.error()}", file=sys.stderr)
                    return 1
                rows.append(
                    (f"{message.topic()}-{message.partition()}-{message.offset()}", message.value())
                )
            if not rows:
                continue
            if first_at is None:
                first_at = time.monotonic()
            last_message_at = time.monotonic()
            placeholders = ",".join(["(%s, %s)"] * len(rows))
            params = [value for row in rows for value in row]
            cursor.execute(
                f"INSERT INTO events (id, data) VALUES {placeholders} ON CONFLICT (id) DO NOTHING",
                params,
            )
            inserted += cursor.rowcount
            conn.commit()
            consumer.commit(asynchronous=False)
            consumed += len(rows)
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
                "duplicates": consumed - inserted,
                "stored": stored,
                "distinct": distinct,
                "seconds": seconds,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
