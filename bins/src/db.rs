//! `streamctl db migrate`: the PostgreSQL tables created by their owner, and
//! a least-privilege role for the binaries. The processor and the
//! sqs-consumer run no DDL on a table that exists, so they can connect as a
//! role that may only read and write these tables.

use anyhow::Context;
use stream_actors::storage::{
    connect_postgres, ensure_table, migrate_postgres_source_topic, migrate_postgres_traceparent,
    postgres_tables,
};

use crate::config::{invalid, ConfigError, LOCAL_POSTGRES_URL};

/// What the role named by `--grant-to` may do on every table.
pub const APP_PRIVILEGES: &str = "SELECT, INSERT, UPDATE, DELETE";

/// `streamctl db migrate`'s settings.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateArgs {
    /// PostgreSQL URL of a role that may create tables (the database
    /// owner). It carries the password, so its value is never printed
    /// (default: the local cluster of scripts/services.sh).
    #[arg(
        long,
        env = "POSTGRES_URL",
        default_value = LOCAL_POSTGRES_URL,
        hide_default_value = true,
        hide_env_values = true
    )]
    pub postgres_url: String,
    /// An existing role to grant SELECT, INSERT, UPDATE and DELETE on the
    /// pipeline's tables, and nothing else: the role the processor and the
    /// sqs-consumer connect as.
    #[arg(long, env = "DB_GRANT_TO")]
    pub grant_to: Option<String>,
    /// The topic the rows of an `events` table made by an older version
    /// (without `source_topic`) came from: the migration attributes them to
    /// it. Unused when the table has the column.
    #[arg(long, env = "DB_EXISTING_ROWS_TOPIC", default_value = "events")]
    pub existing_rows_topic: String,
}

impl MigrateArgs {
    /// Checks the URL and the role name (lower-case letters, digits and `_`,
    /// as PostgreSQL folds an unquoted name).
    pub fn validate(&self) -> Result<(), ConfigError> {
        crate::config::validate_postgres_url(&self.postgres_url)?;
        if !stream_actors::storage::is_topic_name(&self.existing_rows_topic) {
            return Err(invalid(
                "--existing-rows-topic",
                "DB_EXISTING_ROWS_TOPIC",
                format!(
                    "{:?} is not a Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)",
                    self.existing_rows_topic
                ),
            ));
        }
        if let Some(role) = &self.grant_to {
            let valid = role.len() <= 63
                && role.starts_with(|first: char| first.is_ascii_lowercase() || first == '_')
                && role
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !valid {
                return Err(invalid(
                    "--grant-to",
                    "DB_GRANT_TO",
                    format!("{role:?}: use at most 63 of a-z 0-9 _, starting with a letter or _"),
                ));
            }
        }
        Ok(())
    }
}

/// Creates the missing tables and grants the role; one line per step.
pub async fn migrate(arguments: &MigrateArgs) -> anyhow::Result<()> {
    let client = connect_postgres(&arguments.postgres_url).await?;
    let tables = postgres_tables();
    for (table, ddl) in &tables {
        let created = ensure_table(&client, table, ddl).await?;
        println!(
            "table {table}: {}",
            if created { "created" } else { "exists" }
        );
    }
    if let Some(rows) =
        migrate_postgres_source_topic(&client, &arguments.existing_rows_topic).await?
    {
        println!(
            "table events: added source_topic; {rows} existing rows attributed to topic {}",
            arguments.existing_rows_topic
        );
    }
    if migrate_postgres_traceparent(&client).await? {
        println!("table events: added traceparent (existing rows have none)");
    }
    if let Some(role) = &arguments.grant_to {
        let names: Vec<&str> = tables.iter().map(|(table, _)| *table).collect();
        let names = names.join(", ");
        client
            .batch_execute(&format!("GRANT {APP_PRIVILEGES} ON {names} TO \"{role}\""))
            .await
            .with_context(|| {
                format!(
                    "cannot grant {APP_PRIVILEGES} on the tables to role {role} (does it exist? a superuser creates it: CREATE ROLE {role} LOGIN PASSWORD '...')"
                )
            })?;
        println!("granted {APP_PRIVILEGES} on {names} to {role}");
    }
    Ok(())
}
