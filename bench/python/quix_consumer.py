"""Kafka to PostgreSQL with Quix Streams, the way its documentation suggests,
for the bench's peers phase (bench/src/peers/quix.rs).

- An Application at least once (its default), from the earliest offset.
- Each value is validated by the same rules as the pipeline's parser (a
  Python shop writes them itself): JSON object, every field with its type,
  schema_version 1, a UUID event_id, ts within one year ahead and ten back,
  no NUL, fields up to 4096 bytes.
- A record that fails raises; the processing-error callback produces it to
  the dead-letter topic with the error in headers and suppresses the error.
- Valid events go to Quix's PostgreSQLSink, ON CONFLICT DO NOTHING on the
  primary key event_id (the table is made by the bench).

Runs until stopped (SIGTERM: Quix closes, flushing its last checkpoint).
"""

import argparse
import json
import logging
import time
import uuid

from confluent_kafka import Producer
from quixstreams import Application
from quixstreams.sinks.community.postgresql import PostgreSQLSink

ONE_YEAR_MS = 365 * 24 * 60 * 60 * 1000
MAX_FIELD_BYTES = 4096
FIELDS = (
    ("event_id", str),
    ("event_type", str),
    ("user_id", str),
    ("amount", (int, float)),
    ("ts", int),
    ("schema_version", int),
)


class Poison(Exception):
    """A record that is not a valid event, with the pipeline's error type."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


def validate(value: bytes) -> dict:
    try:
        event = json.loads(value)
    except (ValueError, UnicodeDecodeError) as error:
        raise Poison("malformed_json", str(error)) from error
    if not isinstance(event, dict):
        raise Poison("malformed_json", "value is not a JSON object")
    for name, kinds in FIELDS:
        if name not in event or event[name] is None:
            raise Poison("missing_field", f"missing field `{name}`")
        field = event[name]
        if isinstance(field, bool) or not isinstance(field, kinds):
            raise Poison("wrong_field_type", f"`{name}` has the wrong type")
    if event["schema_version"] != 1:
        raise Poison("unknown_schema_version", "schema_version is not accepted")
    try:
        uuid.UUID(event["event_id"])
    except ValueError as error:
        raise Poison("invalid_value", "event_id is not a UUID") from error
    for name in ("event_type", "user_id"):
        if len(event[name].encode()) > MAX_FIELD_BYTES:
            raise Poison("field_too_long", f"{name} is too long")
        if "\0" in event[name]:
            raise Poison("nul_in_text", f"{name} holds a NUL character")
    now_ms = int(time.time() * 1000)
    if not now_ms - 10 * ONE_YEAR_MS <= event["ts"] <= now_ms + ONE_YEAR_MS:
        raise Poison("timestamp_out_of_range", "ts is out of range")
    return {name: event[name] for name, _ in FIELDS}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--dlq-topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dbname", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--table", required=True)
    arguments = parser.parse_args()

    dead_letters = Producer(
        {"bootstrap.servers": arguments.brokers, "enable.idempotence": True}
    )

    def on_processing_error(error, row, logger):
        """Sends the record that failed to the dead-letter topic; suppresses."""
        if row is None:
            return False
        kind = error.kind if isinstance(error, Poison) else type(error).__name__
        dead_letters.produce(
            arguments.dlq_topic,
            key=row.key,
            value=row.value,
            headers=[
                ("dlq.error.type", kind.encode()),
                ("dlq.error.message", str(error).encode()),
                ("dlq.source.topic", row.topic.encode()),
                ("dlq.source.partition", str(row.partition).encode()),
                ("dlq.source.offset", str(row.offset).encode()),
            ],
        )
        dead_letters.poll(0)
        return True

    app = Application(
        broker_address=arguments.brokers,
        consumer_group=arguments.group,
        auto_offset_reset="earliest",
        on_processing_error=on_processing_error,
        loglevel="WARNING",
    )
    topic = app.topic(arguments.topic, value_deserializer="bytes", key_deserializer="str")
    sink = PostgreSQLSink(
        host=arguments.host,
        port=arguments.port,
        dbname=arguments.dbname,
        user=arguments.user,
        password=arguments.password,
        table_name=arguments.table,
        schema_auto_update=False,
        primary_key_columns="event_id",
        on_conflict_do_nothing=True,
        include_metadata=False,
    )
    stream = app.dataframe(topic).apply(validate)
    stream.sink(sink)
    logging.getLogger("quix_consumer").warning("quixstreams consuming %s", arguments.topic)
    try:
        app.run()
    finally:
        dead_letters.flush(30)


if __name__ == "__main__":
    main()
