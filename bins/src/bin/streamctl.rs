//! `streamctl`: look at what the pipeline did, inspect and replay dead
//! letters, set up and watch the SQS queues.

use std::time::Duration;

use clap::{Parser, Subcommand};
use stream_bins::config::{parse_or_exit, ConnectionArgs, SqsArgs};
use stream_bins::dlq::{DlqFilter, DlqSource};

/// Operate and inspect the streaming pipeline.
#[derive(Debug, Parser)]
#[command(name = "streamctl", version, about)]
struct Streamctl {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Wait for the pipeline to catch up, then print what happened:
    /// events produced, stored, dead-lettered by type, lag, success ratio.
    /// Exits 0 when every event is accounted for, 1 otherwise.
    Report {
        #[command(flatten)]
        connections: ConnectionArgs,
        /// Seconds to wait for the checkpoint to reach the end of the topic (0: do not wait).
        #[arg(long, default_value_t = 120)]
        wait_secs: u64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Reconcile the source topic, read independently, with PostgreSQL,
    /// ClickHouse and the dead-letter topic, per partition: stored,
    /// dead-lettered, missing, duplicated. Exits 0 when clean, 1 otherwise.
    Audit {
        #[command(flatten)]
        connections: ConnectionArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// A consumer group's lag read from the broker's side: per partition the
    /// end offset, the group's committed offset and (with --postgres-url)
    /// the persisted checkpoint. Keeps measuring while the processor is
    /// down. With --serve, a Prometheus exporter (job lag-exporter) that
    /// reads every --interval-secs; without, one table. Exits 1 when a
    /// source cannot be read.
    Lag(stream_bins::lag::LagArgs),
    /// The processor's state from its admin endpoint: ready, restarts per
    /// actor, mailboxes, checkpoint.
    Status {
        /// The processor's admin address (its --metrics-addr).
        #[arg(long, env = "ADMIN_ADDR", default_value = "127.0.0.1:9464")]
        admin: String,
        /// A file holding the processor's admin token; `/status` is open,
        /// so this is optional (accepted so that one set of flags serves
        /// both commands).
        #[arg(long, env = "ADMIN_TOKEN_FILE")]
        admin_token_file: Option<std::path::PathBuf>,
    },
    /// Kill one of the processor's actors (consumer, parser, sink,
    /// dlq_writer, committer) through its admin endpoint; the supervisor
    /// restarts the pipeline from the checkpoint. Sends the admin token.
    Kill {
        /// The actor to kill.
        actor: String,
        /// Make it panic at its next message instead of killing it.
        #[arg(long, conflicts_with = "hang")]
        panic: bool,
        /// Make it hang at its next message (hold it forever without
        /// progress): the watchdog restarts it after --stall-timeout-ms.
        #[arg(long)]
        hang: bool,
        /// The processor's admin address (its --metrics-addr).
        #[arg(long, env = "ADMIN_ADDR", default_value = "127.0.0.1:9464")]
        admin: String,
        /// A file holding the processor's admin token (the same file as
        /// its --admin-token-file), sent as `Authorization: Bearer`.
        #[arg(long, env = "ADMIN_TOKEN_FILE")]
        admin_token_file: Option<std::path::PathBuf>,
    },
    /// The dead letters: stats, show, replay (from the topic or the
    /// archive), and archive them to S3-compatible storage.
    Dlq {
        #[command(subcommand)]
        command: Box<DlqCommand>,
    },
    /// A live view from Prometheus: rates, lag, mailbox depth, restarts, SLI
    /// and error budget left. Draws on a terminal (q quits); prints a plain
    /// line per second when stdout is not a terminal.
    Watch {
        /// Prometheus address, host:port.
        #[arg(long, env = "PROMETHEUS_ADDR", default_value = "127.0.0.1:9090")]
        prometheus: String,
        /// Stop after this many refreshes (default: until quit).
        #[arg(long)]
        iterations: Option<u64>,
    },
    /// Draw a PNG of a run from Prometheus: throughput, lag, dead-lettered/s
    /// and SLI over time, with marks (kills) as vertical lines.
    Chart {
        /// Prometheus address, host:port.
        #[arg(long, env = "PROMETHEUS_ADDR", default_value = "127.0.0.1:9090")]
        prometheus: String,
        /// Start of the run, Unix seconds.
        #[arg(long)]
        start: f64,
        /// End of the run, Unix seconds (default: now).
        #[arg(long)]
        end: Option<f64>,
        /// A mark, `UNIX_SECONDS:label` (repeatable), e.g. a kill.
        #[arg(long = "mark", value_parser = parse_mark)]
        marks: Vec<(f64, String)>,
        /// Where to write the PNG.
        #[arg(long, default_value = "pipeline.png")]
        out: std::path::PathBuf,
    },
    /// The SQS queues: setup, status.
    Sqs {
        #[command(subcommand)]
        command: SqsCommand,
    },
    /// The Kafka topics: ensure.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// The PostgreSQL tables: migrate.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
}

#[derive(Debug, Subcommand)]
enum DbCommand {
    /// Create every PostgreSQL table of the pipeline and the sqs-consumer
    /// that is missing (run it as the tables' owner), and grant a role read
    /// and write on them: with it, the processor and the sqs-consumer can
    /// connect as a role that may not create, alter or drop anything.
    Migrate(stream_bins::db::MigrateArgs),
}

#[derive(Debug, Subcommand)]
enum TopicsCommand {
    /// Create the source and dead-letter topics through the Kafka admin API
    /// if they are missing (a topic that exists is left as it is). Waits for
    /// the broker to answer and for every partition to have a leader.
    Ensure(stream_bins::topics::EnsureArgs),
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Count dead letters by error type, stage, source partition and age.
    Stats {
        #[command(flatten)]
        connections: ConnectionArgs,
        #[command(flatten)]
        filter: DlqFilter,
        #[command(flatten)]
        source: DlqSource,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print dead letters with their headers (payloads shown safely).
    Show {
        #[command(flatten)]
        connections: ConnectionArgs,
        #[command(flatten)]
        filter: DlqFilter,
        #[command(flatten)]
        source: DlqSource,
        /// The most records to print.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Re-publish dead letters to the source topic after a fix. Dry run unless
    /// --execute: prints what would move. Each dead letter is replayed at most
    /// once, and none that was already replayed --max-replays times.
    Replay {
        #[command(flatten)]
        connections: ConnectionArgs,
        #[command(flatten)]
        filter: DlqFilter,
        #[command(flatten)]
        source: DlqSource,
        /// Publish for real.
        #[arg(long)]
        execute: bool,
        /// Skip dead letters whose `dlq.replay.count` reached this.
        #[arg(long, default_value_t = 1)]
        max_replays: u32,
    },
    /// Move dead letters into S3-compatible object storage, where the
    /// topic's retention cannot delete them: gzip-compressed JSON Lines under
    /// <dlq-topic>/dt=YYYY-MM-DD/hr=HH/, named by their first position in the
    /// dead-letter topic, each with a manifest. Resumes where the archive
    /// ends, so a run killed at any point and run again writes every dead
    /// letter once. Prints a line per object.
    Archive(Box<stream_bins::archive::ArchiveArgs>),
}

#[derive(Debug, Subcommand)]
enum SqsCommand {
    /// Create the queue and its dead-letter queue with a redrive policy, or
    /// check an existing queue's policy.
    Setup {
        #[command(flatten)]
        sqs: SqsArgs,
        /// Receives before the broker moves a message to the dead-letter queue.
        #[arg(long, env = "SQS_MAX_RECEIVE_COUNT", default_value_t = 3)]
        max_receive_count: u32,
        /// Also empty both queues (for a clean demo run).
        #[arg(long)]
        purge: bool,
    },
    /// Messages waiting, in flight, and redriven to the dead-letter queue.
    Status {
        #[command(flatten)]
        sqs: SqsArgs,
    },
}

fn parse_mark(text: &str) -> Result<(f64, String), String> {
    let (time, label) = text.split_once(':').unwrap_or((text, "mark"));
    let time: f64 = time
        .parse()
        .map_err(|_| format!("{time:?} is not Unix seconds"))?;
    Ok((time, label.to_string()))
}

async fn audit(connections: &ConnectionArgs, json: bool) -> anyhow::Result<i32> {
    let audit = stream_bins::audit::audit(connections).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&audit)?);
    } else {
        print!("{}", audit.render());
    }
    Ok(if audit.clean() { 0 } else { 1 })
}

/// One request to the processor's admin endpoint; prints the answer.
fn admin_call(
    admin: &str,
    method: &str,
    path: &str,
    token_file: Option<&std::path::Path>,
) -> anyhow::Result<i32> {
    let token = token_file
        .map(stream_bins::admin::read_token_file)
        .transpose()
        .map_err(|reason| {
            anyhow::anyhow!("invalid setting --admin-token-file (ADMIN_TOKEN_FILE): {reason}")
        })?;
    let (code, body) = stream_bins::http::http_request(admin, method, path, token.as_deref())
        .map_err(|error| {
            anyhow::anyhow!("cannot reach the processor's admin endpoint at {admin}: {error}")
        })?;
    print!("{body}");
    match code {
        200 => return Ok(0),
        401 if token.is_none() => eprintln!(
            "error: the processor answered 401: pass its admin token with --admin-token-file (ADMIN_TOKEN_FILE)"
        ),
        401 => eprintln!(
            "error: the processor answered 401: it refused the token in --admin-token-file (ADMIN_TOKEN_FILE)"
        ),
        _ => eprintln!("error: the processor answered {code}"),
    }
    Ok(1)
}

fn config_or_exit<T>(result: Result<T, stream_bins::config::ConfigError>) -> T {
    result.unwrap_or_else(|config_error| {
        eprintln!("error: {config_error}");
        std::process::exit(2);
    })
}

#[tokio::main]
async fn main() {
    let streamctl: Streamctl = parse_or_exit();
    let result = match streamctl.command {
        Command::Report {
            connections,
            wait_secs,
            json,
        } => {
            config_or_exit(connections.validate());
            report(&connections, wait_secs, json).await
        }
        Command::Dlq { command } => dlq(*command).await,
        Command::Audit { connections, json } => {
            config_or_exit(connections.validate());
            audit(&connections, json).await
        }
        Command::Lag(arguments) => {
            let brokers = config_or_exit(arguments.validate());
            match arguments.serve {
                Some(address) => {
                    stream_bins::init_tracing();
                    stream_bins::lag::serve(&arguments, &brokers, address).await
                }
                None => stream_bins::lag::print_once(&arguments, &brokers).await,
            }
        }
        Command::Status {
            admin,
            admin_token_file,
        } => admin_call(&admin, "GET", "/status", admin_token_file.as_deref()),
        Command::Kill {
            actor,
            panic,
            hang,
            admin,
            admin_token_file,
        } => {
            let action = match (panic, hang) {
                (true, _) => "panic",
                (_, true) => "hang",
                _ => "kill",
            };
            admin_call(
                &admin,
                "POST",
                &format!("/actors/{actor}/{action}"),
                admin_token_file.as_deref(),
            )
        }
        Command::Chart {
            prometheus,
            start,
            end,
            marks,
            out,
        } => {
            let end = end.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|elapsed| elapsed.as_secs_f64())
                    .unwrap_or_default()
            });
            stream_bins::chart::chart_from_prometheus(&prometheus, start, end, &marks, &out).map(
                |()| {
                    println!("chart written to {}", out.display());
                    0
                },
            )
        }
        Command::Watch {
            prometheus,
            iterations,
        } => tokio::task::spawn_blocking(move || {
            stream_bins::watch::run(&prometheus, iterations).map(|()| 0)
        })
        .await
        .unwrap_or_else(|join_error| Err(anyhow::anyhow!("watch panicked: {join_error}"))),
        Command::Sqs { command } => sqs(command).await,
        Command::Topics { command } => topics(command).await,
        Command::Db {
            command: DbCommand::Migrate(arguments),
        } => {
            config_or_exit(arguments.validate());
            stream_bins::db::migrate(&arguments).await.map(|()| 0)
        }
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(command_error) => {
            eprintln!("error: {command_error:#}");
            std::process::exit(1);
        }
    }
}

async fn report(connections: &ConnectionArgs, wait_secs: u64, json: bool) -> anyhow::Result<i32> {
    if wait_secs > 0 {
        stream_bins::report::wait_for_catch_up(connections, Duration::from_secs(wait_secs)).await?;
    }
    let report = stream_bins::report::gather(connections).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", report.render());
    }
    Ok(if report.accounted_for() { 0 } else { 1 })
}

async fn dlq(command: DlqCommand) -> anyhow::Result<i32> {
    match command {
        DlqCommand::Stats {
            connections,
            filter,
            source,
            json,
        } => {
            config_or_exit(connections.validate());
            let records = source.read(&connections).await?;
            let stats = stream_bins::dlq::stats(&records, &connections.topic, &filter);
            if json {
                println!("{}", serde_json::to_string(&stats)?);
            } else {
                println!(
                    "dead letters in {} from {}: {}",
                    connections.dlq_topic, connections.topic, stats.total
                );
                for (title, counts) in [
                    ("by error type", &stats.by_error_type),
                    ("by stage", &stats.by_stage),
                    ("by source partition", &stats.by_source_partition),
                    ("by age", &stats.by_age),
                ] {
                    println!("{title}:");
                    for (key, count) in counts {
                        println!("  {key}: {count}");
                    }
                }
            }
        }
        DlqCommand::Show {
            connections,
            filter,
            source,
            limit,
        } => {
            config_or_exit(connections.validate());
            let records = source.read(&connections).await?;
            for record in records
                .iter()
                .filter(|record| filter.accepts(record, &connections.topic))
                .take(limit)
            {
                println!("{}", stream_bins::dlq::render_record(record));
            }
        }
        DlqCommand::Replay {
            connections,
            filter,
            source,
            execute,
            max_replays,
        } => {
            config_or_exit(connections.validate());
            let records = source.read(&connections).await?;
            let outcome = stream_bins::dlq::replay_records(
                &connections,
                &records,
                &filter,
                max_replays,
                execute,
            )
            .await?;
            let verb = if execute {
                "replayed"
            } else {
                "would replay (dry run; --execute to publish)"
            };
            println!(
                "{verb}: {} to {} {:?}; skipped: {} already replayed, {} at the replay limit, {} envelopes (not the original bytes)",
                if execute {
                    outcome.published
                } else {
                    outcome.selected
                },
                connections.topic,
                outcome.selected_by_error_type,
                outcome.skipped_already_replayed,
                outcome.skipped_replay_limit,
                outcome.skipped_envelopes
            );
        }
        DlqCommand::Archive(arguments) => {
            config_or_exit(arguments.validate());
            // Its warnings (dead letters retention deleted first, lost
            // commits) and the bucket's creation go to stderr.
            stream_bins::init_tracing();
            let faults = stream_actors::faults::Faults::from_env().unwrap_or_else(|fault_error| {
                eprintln!("error: {fault_error}");
                std::process::exit(2);
            });
            let termination = stream_bins::termination()?;
            let stop = async {
                let signal = termination.await;
                tracing::info!("{signal} received: closing the open batches");
            };
            stream_bins::archive::run(&arguments, &faults, stop).await?;
        }
    }
    Ok(0)
}

async fn sqs(command: SqsCommand) -> anyhow::Result<i32> {
    use stream_actors::sqs;
    match command {
        SqsCommand::Setup {
            sqs: arguments,
            max_receive_count,
            purge,
        } => {
            let settings = config_or_exit(arguments.validate());
            let client = sqs::client(&settings);
            let setup = sqs::setup_queues(
                &client,
                &settings,
                &arguments.queue,
                &arguments.dlq,
                max_receive_count,
            )
            .await?;
            if purge {
                for url in [&setup.queue_url, &setup.dlq_url] {
                    client
                        .purge_queue()
                        .queue_url(url)
                        .send()
                        .await
                        .map_err(|error| {
                            sqs::classify(&settings, &format!("purge {url}"), error)
                        })?;
                }
            }
            println!(
                "{} {} -> {} after {max_receive_count} receives",
                if setup.created { "created" } else { "checked" },
                setup.queue_url,
                setup.dlq_url
            );
        }
        SqsCommand::Status { sqs: arguments } => {
            let settings = config_or_exit(arguments.validate());
            let client = sqs::client(&settings);
            let queue_url = sqs::queue_url(&client, &settings, &arguments.queue).await?;
            let dlq_url = sqs::queue_url(&client, &settings, &arguments.dlq).await?;
            println!(
                "{}: {} waiting, {} in flight",
                arguments.queue,
                sqs::approximate_messages(&client, &settings, &queue_url).await?,
                sqs::approximate_in_flight(&client, &settings, &queue_url).await?
            );
            println!(
                "messages redriven to {}: {}",
                arguments.dlq,
                sqs::approximate_messages(&client, &settings, &dlq_url).await?
            );
        }
    }
    Ok(0)
}

async fn topics(command: TopicsCommand) -> anyhow::Result<i32> {
    let TopicsCommand::Ensure(arguments) = command;
    let specs = config_or_exit(arguments.validate());
    let brokers = config_or_exit(arguments.kafka());
    let outcomes = stream_bins::topics::ensure(
        &brokers,
        &specs,
        arguments.replication_factor,
        arguments.recreate,
        Duration::from_secs(arguments.wait_secs),
    )
    .await?;
    println!("{}", stream_bins::topics::render(&outcomes));
    Ok(0)
}
