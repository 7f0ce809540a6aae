//! The stores behind the sink and the committer: the PostgreSQL `events`
//! table, the ClickHouse `events` table and the PostgreSQL checkpoint table.
//!
//! Idempotency, which makes replay after a crash harmless:
//! - PostgreSQL: `event_id` is the primary key and inserts say
//!   `ON CONFLICT (event_id) DO NOTHING`, so a replayed event is not stored twice.
//! - ClickHouse: the table is a `ReplacingMergeTree` ordered by `event_id`, so
//!   rows with the same `event_id` collapse into one on merge, and
//!   `SELECT count() FROM events FINAL` counts one row per `event_id` even
//!   before the merge. Works on ClickHouse 18.16 and on current releases.
//!
//! Every row carries its source position: `source_topic`, `source_partition`,
//! `source_offset`, so pipelines reading different topics can share the
//! tables and each is audited on its own, and its record's W3C
//! `traceparent` (see [`crate::trace_context`]). Tables made before
//! `source_topic` or `traceparent` existed are migrated at connect
//! ([`migrate_postgres_source_topic`], [`migrate_postgres_traceparent`],
//! and the ClickHouse half in [`ClickHouseEvents::connect`]).

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::config::PipelineConfig;
use crate::error::{with_causes, within, PipelineError};
use crate::models::{SourcePosition, ValidRecord};
use crate::trace_context::Traceparent;

/// The longest one call to PostgreSQL or ClickHouse may take unless the
/// configuration says otherwise (`--service-timeout-ms`).
pub const DEFAULT_SERVICE_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a PostgreSQL connection and drives it on the runtime; a server that
/// does not answer within [`DEFAULT_SERVICE_TIMEOUT`] is an error.
pub async fn connect_postgres(url: &str) -> Result<Client, PipelineError> {
    let what = format!("connect to {}", redact_url(url));
    within(
        DEFAULT_SERVICE_TIMEOUT,
        "postgres",
        &what,
        open_postgres(url, &what),
    )
    .await
}

/// Connects (unbounded: callers bound it) and drives the connection on the runtime.
async fn open_postgres(url: &str, what: &str) -> Result<Client, PipelineError> {
    let target = crate::postgres_tls::PostgresTarget::parse(url).map_err(|reason| {
        PipelineError::Config {
            setting: "--postgres-url (POSTGRES_URL)",
            reason,
        }
    })?;
    target.connect().await.map_err(|error| {
        // A certificate that does not verify is a setting to fix, not an
        // outage: say which.
        let text = with_causes(&error);
        if text.contains("certificate verify failed") {
            PipelineError::Config {
                setting: "--postgres-url (POSTGRES_URL): sslrootcert, sslmode",
                reason: format!(
                    "{what}: the server's TLS certificate does not verify against {}: {text}",
                    target
                        .root_cert
                        .as_ref()
                        .map(|file| file.display().to_string())
                        .unwrap_or_else(|| "the system's trust store".to_string())
                ),
            }
        } else {
            PipelineError::postgres(what)(error)
        }
    })
}

/// A connection for the pipeline's own statements: connecting and every
/// statement are bounded by `limit`, on the server too (`statement_timeout`),
/// so a hung server is an error the breaker sees, never a wait forever.
pub async fn connect_postgres_within(url: &str, limit: Duration) -> Result<Client, PipelineError> {
    let what = format!("connect to {}", redact_url(url));
    within(limit, "postgres", &what, async {
        let client = open_postgres(url, &what).await?;
        client
            .batch_execute(&format!("SET statement_timeout = {}", limit.as_millis()))
            .await
            .map_err(PipelineError::postgres("set statement_timeout"))?;
        Ok(client)
    })
    .await
}

/// `events` (PostgreSQL): unique `event_id` unless `dedup` is off (the
/// recovery tests' negative control).
pub fn events_ddl(dedup: bool) -> String {
    let key = if dedup { "PRIMARY KEY" } else { "" };
    format!(
        "CREATE TABLE IF NOT EXISTS events (
            event_id UUID {key},
            event_type TEXT NOT NULL,
            user_id TEXT NOT NULL,
            amount DOUBLE PRECISION NOT NULL,
            ts_ms BIGINT NOT NULL,
            schema_version INTEGER NOT NULL,
            source_topic TEXT NOT NULL,
            source_partition INTEGER NOT NULL,
            source_offset BIGINT NOT NULL,
            stored_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            traceparent TEXT
        )"
    )
}

/// `pipeline_checkpoints`: the next offset per group, topic and partition.
pub const CHECKPOINTS_DDL: &str = "CREATE TABLE IF NOT EXISTS pipeline_checkpoints (
        consumer_group TEXT NOT NULL,
        topic TEXT NOT NULL,
        partition INTEGER NOT NULL,
        next_offset BIGINT NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (consumer_group, topic, partition)
    )";

/// `dlq_positions`: the DLQ index.
pub const DLQ_POSITIONS_DDL: &str = "CREATE TABLE IF NOT EXISTS dlq_positions (
        consumer_group TEXT NOT NULL,
        topic TEXT NOT NULL,
        partition INTEGER NOT NULL,
        source_offset BIGINT NOT NULL,
        confirmed BOOLEAN NOT NULL DEFAULT false,
        scan_from BIGINT[] NOT NULL,
        PRIMARY KEY (consumer_group, topic, partition, source_offset)
    )";

/// `dlq_replays`: dead letters `streamctl dlq replay` has published.
pub const DLQ_REPLAYS_DDL: &str = "CREATE TABLE IF NOT EXISTS dlq_replays (
        dlq_topic TEXT NOT NULL,
        dlq_partition INTEGER NOT NULL,
        dlq_offset BIGINT NOT NULL,
        replayed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (dlq_topic, dlq_partition, dlq_offset)
    )";

/// `orders`: the SQS consumer's store.
pub const ORDERS_DDL: &str = "CREATE TABLE IF NOT EXISTS orders (
        order_id UUID PRIMARY KEY,
        customer_id TEXT NOT NULL,
        amount DOUBLE PRECISION NOT NULL,
        currency TEXT NOT NULL,
        sqs_message_id TEXT NOT NULL,
        stored_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )";

/// Every PostgreSQL table of the project, by name, as `streamctl db
/// migrate` creates them.
pub fn postgres_tables() -> Vec<(&'static str, String)> {
    vec![
        ("events", events_ddl(true)),
        ("pipeline_checkpoints", CHECKPOINTS_DDL.to_string()),
        ("dlq_positions", DLQ_POSITIONS_DDL.to_string()),
        ("dlq_replays", DLQ_REPLAYS_DDL.to_string()),
        ("orders", ORDERS_DDL.to_string()),
    ]
}

/// Makes sure `table` exists. A table already there is left alone without
/// any DDL, so a role limited to reading and writing the tables (the
/// least-privilege set-up: `streamctl db migrate --grant-to`) works. A
/// missing one is created under a transaction-scoped advisory lock (two
/// processes creating the same table at once otherwise race inside
/// PostgreSQL: a unique violation on `pg_type`); a role that may not
/// create it gets an error that says to migrate first. Returns whether it
/// created the table.
pub async fn ensure_table(client: &Client, table: &str, ddl: &str) -> Result<bool, PipelineError> {
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .map_err(PipelineError::postgres(format!("look up table {table}")))?
        .get(0);
    if exists {
        return Ok(false);
    }
    ddl_under_lock(
        client,
        &format!("{ddl};"),
        format!("table {table} is missing and this role may not create it: run `streamctl db migrate` with the owner's --postgres-url first"),
        format!("create table {table}"),
    )
    .await?;
    Ok(true)
}

/// Runs `statements` in one transaction under the DDL advisory lock (two
/// processes running the same DDL at once otherwise race inside
/// PostgreSQL). Fails with `refused` as context when the role lacks the
/// privilege, `failed` otherwise; the failed transaction is rolled back.
async fn ddl_under_lock(
    client: &Client,
    statements: &str,
    refused: String,
    failed: String,
) -> Result<(), PipelineError> {
    let done = client
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(7242026); {statements} COMMIT;"
        ))
        .await;
    let Err(source) = done else {
        return Ok(());
    };
    // The failed transaction must not stay open on this connection.
    let _ = client.batch_execute("ROLLBACK").await;
    let context = if source.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    {
        refused
    } else {
        failed
    };
    Err(PipelineError::Postgres { context, source })
}

/// Gives a PostgreSQL `events` table made before rows carried their topic
/// a `source_topic` column, its existing rows attributed to
/// `existing_rows_topic` (a Kafka topic name, checked here), then made NOT
/// NULL; in one transaction under the DDL advisory lock. Returns how many
/// rows it attributed, or None when the column was there (no DDL run, so a
/// role that may only read and write passes). A role that may not alter the
/// table gets an error that says to migrate as the owner.
pub async fn migrate_postgres_source_topic(
    client: &Client,
    existing_rows_topic: &str,
) -> Result<Option<u64>, PipelineError> {
    if postgres_events_has(client, "source_topic").await? {
        return Ok(None);
    }
    if !is_topic_name(existing_rows_topic) {
        return Err(PipelineError::Config {
            setting: "the topic for existing rows",
            reason: format!("{existing_rows_topic:?} is not a Kafka topic name"),
        });
    }
    alter_events(
        client,
        "source_topic",
        &format!(
            "ALTER TABLE events ADD COLUMN IF NOT EXISTS source_topic TEXT;
             UPDATE events SET source_topic = '{existing_rows_topic}' WHERE source_topic IS NULL;
             ALTER TABLE events ALTER COLUMN source_topic SET NOT NULL;"
        ),
        "streamctl db migrate --existing-rows-topic TOPIC",
    )
    .await?;
    let attributed = client
        .query_one(
            "SELECT count(*) FROM events WHERE source_topic = $1",
            &[&existing_rows_topic],
        )
        .await
        .map_err(PipelineError::postgres("count the migrated rows"))?
        .get::<_, i64>(0);
    Ok(Some(attributed as u64))
}

/// Whether the PostgreSQL `events` table has `column`.
async fn postgres_events_has(client: &Client, column: &str) -> Result<bool, PipelineError> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name = 'events' AND column_name = $1)",
            &[&column],
        )
        .await
        .map_err(PipelineError::postgres(format!("look up events.{column}")))?
        .get(0))
}

/// Gives a PostgreSQL `events` table made before rows carried their trace
/// a `traceparent` column (NULL in the existing rows), under the DDL
/// advisory lock. Returns whether it added it; no DDL runs when the column
/// is there, so a role that may only read and write passes. A role that may
/// not alter the table gets an error that says to migrate as the owner.
pub async fn migrate_postgres_traceparent(client: &Client) -> Result<bool, PipelineError> {
    if postgres_events_has(client, "traceparent").await? {
        return Ok(false);
    }
    alter_events(
        client,
        "traceparent",
        "ALTER TABLE events ADD COLUMN IF NOT EXISTS traceparent TEXT;",
        "streamctl db migrate",
    )
    .await?;
    Ok(true)
}

/// Runs `statements`, which add `column` to `events` (see [`ddl_under_lock`]);
/// a role that may not gets an error that says to run `migrate_command` as
/// the owner first.
async fn alter_events(
    client: &Client,
    column: &str,
    statements: &str,
    migrate_command: &str,
) -> Result<(), PipelineError> {
    ddl_under_lock(
        client,
        statements,
        format!("table events has no {column} column (made by an older version) and this role may not add it: run `{migrate_command}` with the owner's --postgres-url first"),
        format!("add {column} to events"),
    )
    .await
}

/// Kafka's rule for a topic name: 1 to 249 of `a-z A-Z 0-9 . _ -`.
pub fn is_topic_name(name: &str) -> bool {
    (1..=249).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A connection string fit for a log line or an error: the password of a
/// URL's user info, any `password`/`sslpassword` query parameter, and the
/// `password=` of a `key=value` PostgreSQL string are replaced by `***`.
pub fn redact_url(url: &str) -> String {
    const SECRET_KEYS: [&str; 2] = ["password", "sslpassword"];
    let Some((scheme, rest)) = url.split_once("://") else {
        // `host=... user=... password=...`: a value may be quoted.
        return redact_key_values(url, &SECRET_KEYS);
    };
    let (authority_and_path, query) = match rest.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (rest, None),
    };
    let (authority, path) = match authority_and_path.find('/') {
        Some(slash) => authority_and_path.split_at(slash),
        None => (authority_and_path, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((credentials, host)) => match credentials.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let mut redacted = format!("{scheme}://{authority}{path}");
    if let Some(query) = query {
        let parameters: Vec<String> = query
            .split('&')
            .map(|parameter| match parameter.split_once('=') {
                Some((key, _)) if SECRET_KEYS.contains(&key.to_ascii_lowercase().as_str()) => {
                    format!("{key}=***")
                }
                _ => parameter.to_string(),
            })
            .collect();
        redacted.push('?');
        redacted.push_str(&parameters.join("&"));
    }
    redacted
}

/// `key=value key='quoted value'` with the values of `secret_keys` replaced.
fn redact_key_values(text: &str, secret_keys: &[&str]) -> String {
    let mut redacted = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(equals) = rest.find('=') {
        let key_start = rest[..equals]
            .rfind(char::is_whitespace)
            .map_or(0, |space| space + 1);
        let key = rest[key_start..equals].trim();
        redacted.push_str(&rest[..=equals]);
        let value = &rest[equals + 1..];
        let value_len = if let Some(quoted) = value.strip_prefix('\'') {
            // Up to the closing quote that is not escaped.
            let mut escaped = false;
            let mut end = quoted.len();
            for (index, character) in quoted.char_indices() {
                match character {
                    '\\' if !escaped => escaped = true,
                    '\'' if !escaped => {
                        end = index + 1;
                        break;
                    }
                    _ => escaped = false,
                }
            }
            (end + 1).min(value.len())
        } else {
            value.find(char::is_whitespace).unwrap_or(value.len())
        };
        if secret_keys.contains(&key.to_ascii_lowercase().as_str()) {
            redacted.push_str("***");
        } else {
            redacted.push_str(&value[..value_len]);
        }
        rest = &value[value_len..];
    }
    redacted.push_str(rest);
    redacted
}

/// The PostgreSQL half of the sink: the `events` table.
pub struct PostgresEvents {
    /// A dedicated connection; the sink writes one batch at a time.
    client: Client,
    /// The topic the rows come from (`source_topic`).
    topic: String,
    /// Whether `event_id` is unique (see [`PipelineConfig::dedup`]).
    dedup: bool,
    /// The longest one statement may take.
    timeout: Duration,
}

impl PostgresEvents {
    /// Connects and creates the table if it is missing (or migrates one
    /// without `source_topic`, its rows attributed to this pipeline's
    /// topic, with a warning); every call is bounded by the service timeout.
    pub async fn connect(config: &PipelineConfig) -> Result<PostgresEvents, PipelineError> {
        let timeout = config.service_timeout;
        let client = connect_postgres_within(&config.postgres_url, timeout).await?;
        ensure_table(&client, "events", &events_ddl(config.dedup)).await?;
        if let Some(rows) = migrate_postgres_source_topic(&client, &config.topic).await? {
            tracing::warn!(
                rows,
                topic = %config.topic,
                "postgres: events had no source_topic (made by an older version): added it; its existing rows are attributed to this pipeline's topic"
            );
        }
        if migrate_postgres_traceparent(&client).await? {
            tracing::info!("postgres: events had no traceparent (made by an older version): added it; existing rows have none");
        }
        Ok(PostgresEvents {
            client,
            topic: config.topic.clone(),
            dedup: config.dedup,
            timeout,
        })
    }

    /// Stores a batch in one statement; events already there are skipped.
    /// Returns how many rows were new.
    pub async fn write(&self, records: &[ValidRecord]) -> Result<u64, PipelineError> {
        let mut event_ids: Vec<Uuid> = Vec::with_capacity(records.len());
        let mut event_types: Vec<&str> = Vec::with_capacity(records.len());
        let mut user_ids: Vec<&str> = Vec::with_capacity(records.len());
        let mut amounts: Vec<f64> = Vec::with_capacity(records.len());
        let mut timestamps: Vec<i64> = Vec::with_capacity(records.len());
        let mut schema_versions: Vec<i32> = Vec::with_capacity(records.len());
        let traceparents: Vec<Traceparent> = records
            .iter()
            .map(|record| record.raw.trace.header())
            .collect();
        let traceparents: Vec<&str> = traceparents.iter().map(Traceparent::as_str).collect();
        for record in records {
            event_ids.push(record.event.event_id);
            event_types.push(&record.event.event_type);
            user_ids.push(&record.event.user_id);
            amounts.push(record.event.amount);
            timestamps.push(record.event.ts_ms);
            schema_versions.push(record.event.schema_version as i32);
        }
        let (partitions, offsets) =
            split_positions(records.iter().map(|record| record.raw.position));
        let on_conflict = if self.dedup {
            "ON CONFLICT (event_id) DO NOTHING"
        } else {
            ""
        };
        let statement = format!("INSERT INTO events (event_id, event_type, user_id, amount, ts_ms, schema_version, source_partition, source_offset, traceparent, source_topic)
                 SELECT *, $10::text FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::float8[], $5::int8[], $6::int4[], $7::int4[], $8::int8[], $9::text[])
                 {on_conflict}");
        let what = describe_batch(records);
        within(self.timeout, "postgres", &what, async {
            self.client
                .execute(
                    &statement,
                    &[
                        &event_ids,
                        &event_types,
                        &user_ids,
                        &amounts,
                        &timestamps,
                        &schema_versions,
                        &partitions,
                        &offsets,
                        &traceparents,
                        &self.topic,
                    ],
                )
                .await
                .map_err(PipelineError::postgres(what.as_str()))
        })
        .await
    }

    /// Deletes the rows stored from these source positions (records another
    /// store refused, which are dead-lettered instead). Returns how many went.
    pub async fn remove(&self, positions: &[SourcePosition]) -> Result<u64, PipelineError> {
        let (partitions, offsets) = split_positions(positions.iter().copied());
        within(self.timeout, "postgres", "delete refused records", async {
            self.client
                .execute(
                    "DELETE FROM events WHERE source_topic = $3 AND (source_partition, source_offset) IN
                     (SELECT * FROM UNNEST($1::int4[], $2::int8[]))",
                    &[&partitions, &offsets, &self.topic],
                )
                .await
                .map_err(PipelineError::postgres("delete refused records"))
        })
        .await
    }
}

/// What a batch write was doing, for its errors: how many events, and the
/// source positions of the first and the last.
pub fn describe_batch(records: &[ValidRecord]) -> String {
    match (records.first(), records.last()) {
        (Some(first), Some(last)) => format!(
            "insert a batch of {} events (first {}, last {})",
            records.len(),
            first.raw.position,
            last.raw.position
        ),
        _ => "insert an empty batch".to_string(),
    }
}

/// Partitions and offsets as two columns.
fn split_positions(positions: impl Iterator<Item = SourcePosition>) -> (Vec<i32>, Vec<i64>) {
    positions
        .map(|position| (position.partition, position.offset))
        .unzip()
}

/// One row of the ClickHouse `events` table, in column order (RowBinary).
#[derive(Debug, clickhouse::Row, Serialize)]
struct ClickHouseEventRow<'a> {
    event_id: String,
    event_type: &'a str,
    user_id: &'a str,
    amount: f64,
    ts_ms: i64,
    schema_version: u32,
    source_topic: &'a str,
    source_partition: i32,
    source_offset: i64,
    traceparent: &'a str,
}

/// The ClickHouse half of the sink: the `events` table.
pub struct ClickHouseEvents {
    /// HTTP client bound to the configured database.
    client: clickhouse::Client,
    /// The topic the rows come from (`source_topic`).
    topic: String,
    /// The longest one call may take.
    timeout: Duration,
}

impl ClickHouseEvents {
    /// Builds the client from the configuration (no connection yet). With
    /// `clickhouse_ca_file`, it trusts that CA only; fails if the file holds
    /// no certificate.
    pub fn client(config: &PipelineConfig) -> Result<clickhouse::Client, PipelineError> {
        let base = match &config.clickhouse_ca_file {
            None => clickhouse::Client::default(),
            Some(ca_file) => crate::clickhouse_tls::client_trusting(ca_file).map_err(|reason| {
                PipelineError::Config {
                    setting: "--clickhouse-ca-file (CLICKHOUSE_CA_FILE)",
                    reason,
                }
            })?,
        };
        let mut client = base
            .with_url(&config.clickhouse_url)
            .with_database(&config.clickhouse_database)
            // RowBinary without the schema round trip: works on ClickHouse 18.16 too.
            .with_validation(false);
        if let Some(user) = &config.clickhouse_user {
            client = client.with_user(user);
        }
        if let Some(password) = &config.clickhouse_password {
            client = client.with_password(password);
        }
        Ok(client)
    }

    /// Creates the table if it is missing; every call is bounded by
    /// `config.service_timeout`.
    pub async fn connect(config: &PipelineConfig) -> Result<ClickHouseEvents, PipelineError> {
        let client = ClickHouseEvents::client(config)?;
        let timeout = config.service_timeout;
        let engine = if config.dedup {
            "ReplacingMergeTree()"
        } else {
            "MergeTree()"
        };
        let create = client
            .query(&format!(
                "CREATE TABLE IF NOT EXISTS events (
                    event_id String,
                    event_type String,
                    user_id String,
                    amount Float64,
                    ts_ms Int64,
                    schema_version UInt32,
                    source_topic String,
                    source_partition Int32,
                    source_offset Int64,
                    stored_at DateTime DEFAULT now(),
                    traceparent String
                ) ENGINE = {engine} ORDER BY event_id",
            ))
            .execute();
        let what = format!(
            "create table {}.events at {}",
            config.clickhouse_database,
            redact_url(&config.clickhouse_url)
        );
        within(timeout, "clickhouse", &what, async {
            create.await.map_err(|error| {
                // A certificate that does not verify is a setting to fix,
                // not an outage: say which.
                let text = with_causes(&error);
                if text.contains("invalid peer certificate") {
                    PipelineError::Config {
                        setting: "--clickhouse-ca-file (CLICKHOUSE_CA_FILE)",
                        reason: format!(
                            "{what}: the server's TLS certificate does not verify against {}: {text}",
                            config
                                .clickhouse_ca_file
                                .as_ref()
                                .map(|file| file.display().to_string())
                                .unwrap_or_else(|| "the public web PKI (webpki roots)".to_string())
                        ),
                    }
                } else {
                    PipelineError::clickhouse(what.clone())(error)
                }
            })
        })
        .await?;
        let events = ClickHouseEvents {
            client,
            topic: config.topic.clone(),
            timeout,
        };
        within(
            timeout,
            "clickhouse",
            "add source_topic and traceparent to events",
            async {
                events.migrate_source_topic().await?;
                events.migrate_traceparent().await
            },
        )
        .await?;
        Ok(events)
    }

    /// Gives a table made before rows carried their topic a `source_topic`
    /// column whose default is this pipeline's topic: ClickHouse computes a
    /// default when it reads a part written without the column, so the
    /// existing rows read as this topic (with a warning), and every insert
    /// names its topic. Another processor adding it first is not an error.
    async fn migrate_source_topic(&self) -> Result<(), PipelineError> {
        if self.has_column("source_topic").await? {
            return Ok(());
        }
        if !is_topic_name(&self.topic) {
            return Err(PipelineError::Config {
                setting: "--topic",
                reason: format!("{:?} is not a Kafka topic name", self.topic),
            });
        }
        let added = self
            .client
            .query(&format!(
                "ALTER TABLE events ADD COLUMN source_topic String DEFAULT '{}' AFTER schema_version",
                self.topic
            ))
            .execute()
            .await;
        match added {
            Ok(()) => {
                tracing::warn!(
                    topic = %self.topic,
                    "clickhouse: events had no source_topic (made by an older version): added it; its existing rows read as this pipeline's topic"
                );
                Ok(())
            }
            Err(_) if self.has_column("source_topic").await? => Ok(()),
            Err(error) => Err(PipelineError::clickhouse("add source_topic to events")(
                error,
            )),
        }
    }

    /// Gives a table made before rows carried their trace a `traceparent`
    /// column; existing rows read as `''`. Another processor adding it first
    /// is not an error.
    async fn migrate_traceparent(&self) -> Result<(), PipelineError> {
        if self.has_column("traceparent").await? {
            return Ok(());
        }
        let added = self
            .client
            .query("ALTER TABLE events ADD COLUMN traceparent String DEFAULT ''")
            .execute()
            .await;
        match added {
            Ok(()) => {
                tracing::info!("clickhouse: events had no traceparent (made by an older version): added it; existing rows have none");
                Ok(())
            }
            Err(_) if self.has_column("traceparent").await? => Ok(()),
            Err(error) => Err(PipelineError::clickhouse("add traceparent to events")(
                error,
            )),
        }
    }

    /// Whether the `events` table has `column`.
    async fn has_column(&self, column: &str) -> Result<bool, PipelineError> {
        self.client
            .query("SELECT count() FROM system.columns WHERE database = currentDatabase() AND table = 'events' AND name = ?")
            .bind(column)
            .fetch_one::<u64>()
            .await
            .map(|count| count > 0)
            .map_err(PipelineError::clickhouse(format!("look up events.{column}")))
    }

    /// Stores a batch in one INSERT, within the timeout.
    pub async fn write(&self, records: &[ValidRecord]) -> Result<(), PipelineError> {
        let what = describe_batch(records);
        within(
            self.timeout,
            "clickhouse",
            &what,
            self.insert(records, &what),
        )
        .await
    }

    /// The INSERT; its errors say `what` (the batch) and the step that failed.
    async fn insert(&self, records: &[ValidRecord], what: &str) -> Result<(), PipelineError> {
        let mut insert = self
            .client
            .insert::<ClickHouseEventRow<'_>>("events")
            .await
            .map_err(PipelineError::clickhouse(format!("{what}: begin insert")))?;
        for record in records {
            let traceparent = record.raw.trace.header();
            let row = ClickHouseEventRow {
                event_id: record.event.event_id.to_string(),
                event_type: &record.event.event_type,
                user_id: &record.event.user_id,
                amount: record.event.amount,
                ts_ms: record.event.ts_ms,
                schema_version: record.event.schema_version,
                source_topic: &self.topic,
                source_partition: record.raw.position.partition,
                source_offset: record.raw.position.offset,
                traceparent: traceparent.as_str(),
            };
            insert
                .write(&row)
                .await
                .map_err(|error| PipelineError::clickhouse(format!("{what}: write row"))(error))?;
        }
        insert
            .end()
            .await
            .map_err(PipelineError::clickhouse(format!("{what}: finish insert")))
    }

    /// Deletes the rows stored from these source positions (records another
    /// store refused) and waits until the deletion is done: a mutation, as
    /// ClickHouse 18.16 has no other DELETE. Rare: only hostile input gets
    /// here. Bounded by the service timeout plus [`MUTATION_DEADLINE`].
    pub async fn remove(&self, positions: &[SourcePosition]) -> Result<(), PipelineError> {
        within(
            self.timeout + MUTATION_DEADLINE,
            "clickhouse",
            "delete refused records",
            self.delete(positions),
        )
        .await
    }

    async fn delete(&self, positions: &[SourcePosition]) -> Result<(), PipelineError> {
        let tuples: Vec<String> = positions
            .iter()
            .map(|position| format!("({}, {})", position.partition, position.offset))
            .collect();
        self.client
            .query(&format!(
                "ALTER TABLE events DELETE WHERE source_topic = ? AND (source_partition, source_offset) IN ({})",
                tuples.join(", ")
            ))
            .bind(self.topic.as_str())
            .execute()
            .await
            .map_err(PipelineError::clickhouse("delete refused records"))?;
        loop {
            let pending: u64 = self
                .client
                .query("SELECT count() FROM system.mutations WHERE database = currentDatabase() AND table = 'events' AND is_done = 0")
                .fetch_one()
                .await
                .map_err(PipelineError::clickhouse("wait for the delete"))?;
            if pending == 0 {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// How long a ClickHouse delete may take before it counts as failed (and is tried again).
const MUTATION_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// The SQS consumer's store: the PostgreSQL `orders` table.
pub struct PostgresOrders {
    /// A dedicated connection.
    client: Client,
}

impl PostgresOrders {
    /// Connects and creates the table if it is missing.
    pub async fn connect(url: &str) -> Result<PostgresOrders, PipelineError> {
        let client = connect_postgres_within(url, DEFAULT_SERVICE_TIMEOUT).await?;
        ensure_table(&client, "orders", ORDERS_DDL).await?;
        Ok(PostgresOrders { client })
    }

    /// Stores an order; a second store of the same `order_id` changes nothing.
    /// Returns whether the row is new.
    pub async fn store(
        &self,
        order: &crate::order::Order,
        message_id: &str,
    ) -> Result<bool, PipelineError> {
        let inserted = within(DEFAULT_SERVICE_TIMEOUT, "postgres", "insert order", async {
            self.client
                .execute(
                    "INSERT INTO orders (order_id, customer_id, amount, currency, sqs_message_id)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (order_id) DO NOTHING",
                    &[
                        &order.order_id,
                        &order.customer_id,
                        &order.amount,
                        &order.currency,
                        &message_id,
                    ],
                )
                .await
                .map_err(PipelineError::postgres("insert order"))
        })
        .await?;
        Ok(inserted == 1)
    }

    /// Whether the connection has closed (the store must reconnect).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

/// A dedicated PostgreSQL connection for the pipeline's own state, re-made
/// on the next call after a failure (so a PostgreSQL restart pauses the
/// caller instead of ending it), every call bounded by the service timeout.
struct Session {
    url: String,
    /// The longest connecting or one statement may take: the lock is never
    /// held longer, so a hung server cannot freeze the caller.
    timeout: Duration,
    /// `None` after a failure.
    client: tokio::sync::Mutex<Option<Client>>,
}

impl Session {
    /// Connects and creates `table` with `ddl` if it is missing.
    async fn open(
        url: &str,
        timeout: Duration,
        table: &str,
        ddl: &str,
    ) -> Result<Session, PipelineError> {
        let client = connect_postgres_within(url, timeout).await?;
        ensure_table(&client, table, ddl).await?;
        Ok(Session {
            url: url.to_string(),
            timeout,
            client: tokio::sync::Mutex::new(Some(client)),
        })
    }

    /// Runs `work` on the connection, connecting first if needed; a failure
    /// drops the connection so the next call makes a new one.
    async fn with_client<T, F>(&self, what: &str, work: F) -> Result<T, PipelineError>
    where
        F: for<'c> FnOnce(
            &'c Client,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, PipelineError>> + Send + 'c>,
        >,
    {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = Some(connect_postgres_within(&self.url, self.timeout).await?);
        }
        let result = within(
            self.timeout,
            "postgres",
            what,
            work(guard.as_ref().expect("connected above")),
        )
        .await;
        if result.is_err() {
            *guard = None;
        }
        result
    }
}

/// The persisted checkpoint: per partition, the next offset to read.
pub struct CheckpointStore {
    session: Session,
}

impl CheckpointStore {
    /// Connects and creates the table if it is missing; every call is
    /// bounded by `timeout`.
    pub async fn connect(url: &str, timeout: Duration) -> Result<CheckpointStore, PipelineError> {
        let session = Session::open(url, timeout, "pipeline_checkpoints", CHECKPOINTS_DDL).await?;
        Ok(CheckpointStore { session })
    }

    /// The next offset to read for every partition that has a checkpoint.
    pub async fn load(&self, group: &str, topic: &str) -> Result<HashMap<i32, i64>, PipelineError> {
        let (group, topic) = (group.to_string(), topic.to_string());
        self.session.with_client("load checkpoint", move |client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        "SELECT partition, next_offset FROM pipeline_checkpoints WHERE consumer_group = $1 AND topic = $2",
                        &[&group, &topic],
                    )
                    .await
                    .map_err(PipelineError::postgres("load checkpoint"))?;
                Ok(rows
                    .iter()
                    .map(|row| (row.get::<_, i32>(0), row.get::<_, i64>(1)))
                    .collect())
            })
        })
        .await
    }

    /// Persists the next offset of several partitions in one statement.
    ///
    /// A checkpoint never moves back: each value means "everything below is
    /// stored", so the larger of the old and the new is still true. This
    /// matters in a rebalance, where the previous owner of a partition may
    /// persist late, after the new owner has moved on.
    pub async fn persist(
        &self,
        group: &str,
        topic: &str,
        positions: &[(i32, i64)],
    ) -> Result<(), PipelineError> {
        let (group, topic) = (group.to_string(), topic.to_string());
        let partitions: Vec<i32> = positions.iter().map(|(partition, _)| *partition).collect();
        let offsets: Vec<i64> = positions.iter().map(|(_, offset)| *offset).collect();
        self.session.with_client("persist checkpoint", move |client| {
            Box::pin(async move {
                client
                    .execute(
                        "INSERT INTO pipeline_checkpoints (consumer_group, topic, partition, next_offset)
                         SELECT $1, $2, * FROM UNNEST($3::int4[], $4::int8[])
                         ON CONFLICT (consumer_group, topic, partition)
                         DO UPDATE SET next_offset = GREATEST(pipeline_checkpoints.next_offset, EXCLUDED.next_offset), updated_at = now()",
                        &[&group, &topic, &partitions, &offsets],
                    )
                    .await
                    .map_err(PipelineError::postgres("persist checkpoint"))?;
                Ok(())
            })
        })
        .await
    }
}

/// A source position the DLQ index holds (at or past the checkpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedDeadLetter {
    /// The poison record's source position.
    pub position: SourcePosition,
    /// Whether the broker confirmed the dead letter's delivery.
    pub confirmed: bool,
    /// The dead-letter topic's end offset of each of its partitions (by
    /// partition id) before the dead letter was produced: where to look for
    /// it when its delivery was never confirmed.
    pub scan_from: Vec<i64>,
}

/// The DLQ index: which source positions of one group and topic are
/// dead-lettered, so a restart looks up the positions at or past the
/// checkpoint instead of reading the whole dead-letter topic.
///
/// A row is written before its dead letter is produced (the intent, with
/// the dead-letter topic's end offsets of that moment) and confirmed after
/// the broker's acknowledgement. A crash between the two leaves an
/// unconfirmed intent; the DLQ writer resolves it by reading the
/// dead-letter topic from those end offsets only. Rows below the checkpoint
/// are pruned: the consumer never goes back past it.
pub struct DlqIndex {
    session: Session,
    group: String,
    topic: String,
}

impl DlqIndex {
    /// Connects and creates the table if it is missing; every call is
    /// bounded by `timeout`.
    pub async fn connect(
        url: &str,
        timeout: Duration,
        group: &str,
        topic: &str,
    ) -> Result<DlqIndex, PipelineError> {
        let session = Session::open(url, timeout, "dlq_positions", DLQ_POSITIONS_DDL).await?;
        Ok(DlqIndex {
            session,
            group: group.to_string(),
            topic: topic.to_string(),
        })
    }

    /// Records the intent to dead-letter `positions`, before producing, and
    /// in the same statement confirms `delivered` (earlier dead letters the
    /// broker acknowledged: confirming them late only means a restart reads
    /// a little of the dead-letter topic for them). An intent already there
    /// keeps its older (further back) `scan_from`.
    pub async fn intend(
        &self,
        positions: &[SourcePosition],
        scan_from: &[i64],
        delivered: &[SourcePosition],
    ) -> Result<(), PipelineError> {
        let (group, topic) = (self.group.clone(), self.topic.clone());
        let (partitions, offsets) = split_positions(positions.iter().copied());
        let (delivered_partitions, delivered_offsets) = split_positions(delivered.iter().copied());
        let scan_from = scan_from.to_vec();
        self.session
            .with_client("record dead-letter intents", move |client| {
                Box::pin(async move {
                    client
                        .execute(
                            "WITH confirmed AS (
                                 UPDATE dlq_positions d SET confirmed = true
                                 FROM UNNEST($6::int4[], $7::int8[]) AS c(p, o)
                                 WHERE d.consumer_group = $1 AND d.topic = $2
                                   AND d.partition = c.p AND d.source_offset = c.o
                                 RETURNING 1)
                             INSERT INTO dlq_positions (consumer_group, topic, partition, source_offset, scan_from)
                             SELECT $1, $2, p, o, $5 FROM UNNEST($3::int4[], $4::int8[]) AS t(p, o)
                             ON CONFLICT DO NOTHING",
                            &[
                                &group,
                                &topic,
                                &partitions,
                                &offsets,
                                &scan_from,
                                &delivered_partitions,
                                &delivered_offsets,
                            ],
                        )
                        .await
                        .map_err(PipelineError::postgres("record dead-letter intents"))?;
                    Ok(())
                })
            })
            .await
    }

    /// Marks these positions delivered.
    pub async fn confirm(&self, positions: &[SourcePosition]) -> Result<(), PipelineError> {
        self.change(
            "confirm dead letters",
            "UPDATE dlq_positions d SET confirmed = true
             FROM UNNEST($3::int4[], $4::int8[]) AS t(p, o)
             WHERE d.consumer_group = $1 AND d.topic = $2 AND d.partition = t.p AND d.source_offset = t.o",
            positions,
        )
        .await
    }

    /// Drops unconfirmed intents found not delivered: their records go again.
    pub async fn forget(&self, positions: &[SourcePosition]) -> Result<(), PipelineError> {
        self.change(
            "forget undelivered dead-letter intents",
            "DELETE FROM dlq_positions d
             USING UNNEST($3::int4[], $4::int8[]) AS t(p, o)
             WHERE d.consumer_group = $1 AND d.topic = $2 AND d.partition = t.p AND d.source_offset = t.o
               AND NOT d.confirmed",
            positions,
        )
        .await
    }

    /// Runs `statement` with group, topic, partitions and offsets.
    async fn change(
        &self,
        what: &'static str,
        statement: &'static str,
        positions: &[SourcePosition],
    ) -> Result<(), PipelineError> {
        if positions.is_empty() {
            return Ok(());
        }
        let (group, topic) = (self.group.clone(), self.topic.clone());
        let (partitions, offsets) = split_positions(positions.iter().copied());
        self.session
            .with_client(what, move |client| {
                Box::pin(async move {
                    client
                        .execute(statement, &[&group, &topic, &partitions, &offsets])
                        .await
                        .map_err(PipelineError::postgres(what))?;
                    Ok(())
                })
            })
            .await
    }

    /// Deletes what lies below the persisted checkpoint; returns how many.
    pub async fn prune(&self) -> Result<u64, PipelineError> {
        let (group, topic) = (self.group.clone(), self.topic.clone());
        self.session
            .with_client("prune the dlq index", move |client| {
                Box::pin(async move {
                    client
                        .execute(
                            "DELETE FROM dlq_positions d USING pipeline_checkpoints c
                             WHERE d.consumer_group = $1 AND d.topic = $2
                               AND c.consumer_group = d.consumer_group AND c.topic = d.topic
                               AND c.partition = d.partition AND d.source_offset < c.next_offset",
                            &[&group, &topic],
                        )
                        .await
                        .map_err(PipelineError::postgres("prune the dlq index"))
                })
            })
            .await
    }

    /// What the index holds at or past each partition's floor.
    pub async fn lookup(
        &self,
        floors: &HashMap<i32, i64>,
    ) -> Result<Vec<IndexedDeadLetter>, PipelineError> {
        let (group, topic) = (self.group.clone(), self.topic.clone());
        let (partitions, offsets): (Vec<i32>, Vec<i64>) = floors.iter().unzip();
        self.session
            .with_client("look up the dlq index", move |client| {
                Box::pin(async move {
                    let rows = client
                        .query(
                            "SELECT d.partition, d.source_offset, d.confirmed, d.scan_from
                             FROM dlq_positions d JOIN UNNEST($3::int4[], $4::int8[]) AS f(p, floor)
                               ON d.partition = f.p AND d.source_offset >= f.floor
                             WHERE d.consumer_group = $1 AND d.topic = $2",
                            &[&group, &topic, &partitions, &offsets],
                        )
                        .await
                        .map_err(PipelineError::postgres("look up the dlq index"))?;
                    Ok(rows
                        .iter()
                        .map(|row| IndexedDeadLetter {
                            position: SourcePosition {
                                partition: row.get(0),
                                offset: row.get(1),
                            },
                            confirmed: row.get(2),
                            scan_from: row.get(3),
                        })
                        .collect())
                })
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://postgres:secret@127.0.0.1:5432/pipeline"),
            "postgres://postgres:***@127.0.0.1:5432/pipeline"
        );
        assert_eq!(redact_url("http://127.0.0.1:8123"), "http://127.0.0.1:8123");
        assert_eq!(
            redact_url("https://user:p@ss:word@ch.example:8443/?database=x"),
            "https://user:***@ch.example:8443/?database=x"
        );
        assert_eq!(
            redact_url(
                "postgres://db.example/pipeline?user=app&password=s3cret&sslmode=verify-full"
            ),
            "postgres://db.example/pipeline?user=app&password=***&sslmode=verify-full"
        );
        assert_eq!(
            redact_url("host=db user=app password=s3cret dbname=pipeline"),
            "host=db user=app password=*** dbname=pipeline"
        );
        assert_eq!(
            redact_url("host=db password='it s \\' secret' sslpassword=k dbname=p"),
            "host=db password=*** sslpassword=*** dbname=p"
        );
    }
}
