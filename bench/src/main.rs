//! Issue 7's benchmarks, side by side in one invocation on the local services:
//!
//! ```sh
//! cargo run -p bench --release -- [--events 500000] [--memory-events 1000000] [--out target/bench]
//! ```
//!
//! 1. parser: a quick in-process figure, events/s on one core (criterion has
//!    the careful one: `cargo bench -p stream-actors --bench parser`);
//! 2. throughput: the pipeline end to end, a no-op rdkafka consumer, seed
//!    001's per-message Python consumer (a time-boxed slice) and a batched
//!    Python consumer, all on one topic, with the ratios;
//! 3. latency: end-to-end p50 and p99 at a fixed rate;
//! 4. memory: the processor binary draining a backlog, bounded mailboxes
//!    against a lifted bound, RSS sampled over time.
//!
//! 5. recovery: [`recovery::recovery_rows`] (SIGKILL and actor kill);
//! 6. dlq-restart: an actor restart with a large dead-letter topic;
//! 7. peers (issue 14): the processor binary beside Kafka Connect with
//!    Debezium's JDBC sink and Quix Streams, 1M events each, and how each
//!    behaves with hostile records and under a SIGKILL ([`peers`];
//!    `--skip-peers`).
//!
//! Prints a Markdown table on stdout (progress on stderr), and writes
//! `bench.md`, `bench.png` and the RSS samples as CSV into `--out`. Exits 1
//! when a measurement could not be made; a missed target is reported, not an
//! error.

mod chart;
mod dlq_restart;
mod latency;
mod memory;
mod parser;
mod peers;
mod python;
mod recovery;
mod table;
mod throughput;

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use stream_bins::scratch;
use table::{at_least, at_most, thousands, Row, Verdict};

/// Pipeline end to end, events/s.
const PIPELINE_TARGET: f64 = 50_000.0;
/// Pipeline / raw consume (issue 10).
const RAW_RATIO_TARGET: f64 = 0.8;
/// End-to-end latency at 5k ev/s in the latency profile, seconds (issue 10).
const LATENCY_P50_TARGET: f64 = 0.020;
const LATENCY_P99_TARGET: f64 = 0.100;
/// Pipeline / seed 001's pattern.
const SEED001_RATIO_TARGET: f64 = 40.0;
/// Peak RSS while draining, MB.
const RSS_TARGET_MB: f64 = 150.0;
/// Parser events/s on one core.
const PARSER_TARGET: f64 = 500_000.0;

/// One part of the bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Phase {
    Parser,
    Throughput,
    Latency,
    Memory,
    Recovery,
    /// An actor restart with an empty and with a large dead-letter topic.
    DlqRestart,
    /// The pipeline beside what users pick instead (Kafka Connect's JDBC
    /// sink), on the same broker and PostgreSQL.
    Peers,
}

/// Issue 7's benchmarks, side by side on the local services.
#[derive(Debug, Clone, Parser)]
#[command(name = "bench", about, long_about = None)]
struct Args {
    /// Events for the throughput comparison.
    #[arg(long, default_value_t = 500_000)]
    events: u64,
    /// Where bench.md, bench.png and the RSS CSVs go (default: <workspace>/target/bench).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Backlog the processor drains in the memory measurement.
    #[arg(long, default_value_t = 1_000_000)]
    memory_events: u64,
    /// Mailbox capacity of the negative control (the bound "lifted").
    #[arg(long, default_value_t = 100_000)]
    unbounded_capacity: usize,
    /// `--batch-size` of the slow-sink memory scenario, where the consumer
    /// outruns the sink (0: skip that scenario).
    #[arg(long, default_value_t = 100)]
    slow_sink_batch_size: usize,
    /// Events per second for the latency measurement.
    #[arg(long, default_value_t = 5_000)]
    latency_rate: u64,
    /// The sink's linger (`--linger-ms`) in the latency profile, measured
    /// against the latency targets beside the default (throughput) profile.
    #[arg(long, default_value_t = 5)]
    latency_profile_linger_ms: u64,
    /// Seconds of load at --latency-rate.
    #[arg(long, default_value_t = 30)]
    latency_seconds: u64,
    /// Seconds seed 001's consumer runs (from its first message).
    #[arg(long, default_value_t = 25.0)]
    seed001_seconds: f64,
    /// The most events seed 001's consumer reads.
    #[arg(long, default_value_t = 30_000)]
    seed001_max_events: u64,
    /// Time box of the batched Python consumer, seconds.
    #[arg(long, default_value_t = 300.0)]
    batched_max_seconds: f64,
    /// Seconds per parser mix.
    #[arg(long, default_value_t = 3.0)]
    parser_seconds: f64,
    /// The processor binary (default: build target/release/processor with cargo).
    #[arg(long)]
    processor: Option<PathBuf>,
    /// The Python venv for the baselines and Quix Streams (created when missing).
    #[arg(long)]
    venv: Option<PathBuf>,
    /// Run only these phases.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "parser,throughput,latency,memory,recovery,dlq-restart,peers"
    )]
    only: Vec<Phase>,
    /// Skip the peers phase (its first run resolves Kafka Connect and the
    /// JDBC sink connector from Maven Central and installs Quix Streams
    /// from PyPI).
    #[arg(long)]
    skip_peers: bool,
    /// Export the throughput run's spans (a span per stored batch and per
    /// dead letter) to this OTLP/HTTP collector, to measure what the export
    /// costs. Unset: no export, as the processor's default.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Events in each peer's topic (the SIGKILL runs use it too).
    #[arg(long, default_value_t = 1_000_000)]
    peers_events: u64,
}

/// The workspace root (this crate's parent directory).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ has a parent")
        .to_path_buf()
}

/// Fails early, naming the service, when one is not listening.
fn preflight() -> anyhow::Result<()> {
    let brokers = scratch::brokers();
    let kafka = brokers
        .servers
        .split(',')
        .next()
        .unwrap_or_default()
        .to_string();
    let postgres_config: tokio_postgres::Config = scratch::postgres_admin_url().parse()?;
    let postgres = match (
        postgres_config.get_hosts().first(),
        postgres_config.get_ports().first(),
    ) {
        (Some(tokio_postgres::config::Host::Tcp(host)), Some(port)) => format!("{host}:{port}"),
        _ => "127.0.0.1:5432".to_string(),
    };
    let clickhouse_url = scratch::clickhouse_url();
    let clickhouse = clickhouse_url
        .split("://")
        .nth(1)
        .unwrap_or_default()
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    for (service, address) in [
        ("kafka", kafka),
        ("postgres", postgres),
        ("clickhouse", clickhouse),
    ] {
        let reachable =
            address
                .to_socket_addrs()
                .ok()
                .into_iter()
                .flatten()
                .any(|socket: SocketAddr| {
                    TcpStream::connect_timeout(&socket, Duration::from_secs(2)).is_ok()
                });
        anyhow::ensure!(
            reachable,
            "{service} is not listening on {address}: start the services with `bash scripts/services.sh up`"
        );
    }
    Ok(())
}

/// Runs a phase as its own task, so that a panic inside (the scratch helpers
/// panic on a service error) is reported as that phase's failure.
async fn guarded<T: Send + 'static>(
    phase: impl std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    match tokio::spawn(phase).await {
        Ok(result) => result,
        Err(join_error) => Err(anyhow::anyhow!("{join_error}")),
    }
}

fn rate_text(rate: f64) -> String {
    format!("{} ev/s", thousands(rate))
}

/// Everything measured, for the table, the notes and the chart.
#[derive(Default)]
struct Results {
    rows: Vec<Row>,
    notes: Vec<String>,
    failures: Vec<String>,
    throughput_bars: Vec<(String, f64)>,
    memory: Vec<(memory::Scenario, memory::MemoryRun, memory::MemoryRun)>,
    /// The peers table (Markdown), when that phase ran.
    peers: Option<String>,
}

fn parser_rows(results: &mut Results, parsed: &[parser::ParserResult]) {
    for result in parsed {
        results.rows.push(Row {
            measurement: format!(
                "parser, {} ({:.1} % valid), one core (in-process loop)",
                result.mix,
                result.valid as f64 / result.parsed as f64 * 100.0
            ),
            events: Some(result.parsed),
            seconds: Some(result.seconds),
            value: rate_text(result.rate()),
            target: format!(">= {}", rate_text(PARSER_TARGET)),
            verdict: at_least(result.rate(), PARSER_TARGET),
        });
    }
    results.notes.push(
        "Parser: loadgen's own records (`generate_record`, seeded), parsed round-robin on one thread; \
         criterion's figures: `cargo bench -p stream-actors --bench parser`."
            .to_string(),
    );
}

fn throughput_rows(results: &mut Results, measured: &throughput::ThroughputResult, args: &Args) {
    let pipeline = measured.pipeline_rate();
    let raw = measured.raw_rate();
    let seed001 = measured.seed001.rate();
    let batched = measured.batched.rate();
    let rows = [
        Row {
            measurement: format!(
                "pipeline end to end (exactly-once sinks, poison 0.005){}",
                if args.otlp_endpoint.is_some() {
                    ", spans exported over OTLP"
                } else {
                    ""
                }
            ),
            events: Some(measured.events),
            seconds: Some(measured.pipeline_seconds),
            value: rate_text(pipeline),
            target: format!(">= {}", rate_text(PIPELINE_TARGET)),
            verdict: at_least(pipeline, PIPELINE_TARGET),
        },
        Row {
            measurement: format!(
                "pipeline once running: from its first checkpoint ({:.2} s after start) to caught up",
                measured.first_checkpoint_seconds
            ),
            events: Some(measured.events - measured.first_checkpoint_offsets),
            seconds: Some(measured.pipeline_seconds - measured.first_checkpoint_seconds),
            value: rate_text(measured.pipeline_running_rate()),
            target: "none (issue 7 times end to end)".to_string(),
            verdict: Verdict::None,
        },
        Row {
            measurement: "raw consume, no-op rdkafka consumer, same topic".to_string(),
            events: Some(measured.raw_read),
            seconds: Some(measured.raw_seconds),
            value: rate_text(raw),
            target: "baseline".to_string(),
            verdict: Verdict::None,
        },
        Row {
            measurement: format!(
                "seed 001 consumer, Python, per-message insert + db commit + offset commit (time-boxed slice: {} s or {} events)",
                args.seed001_seconds, args.seed001_max_events
            ),
            events: Some(measured.seed001.consumed),
            seconds: Some(measured.seed001.seconds),
            value: rate_text(seed001),
            target: "baseline".to_string(),
            verdict: Verdict::None,
        },
        Row {
            measurement: "batched Python consumer (1000 per poll, one insert, one commit)".to_string(),
            events: Some(measured.batched.consumed),
            seconds: Some(measured.batched.seconds),
            value: rate_text(batched),
            target: "baseline".to_string(),
            verdict: Verdict::None,
        },
        Row {
            measurement: "ratio pipeline / raw consume".to_string(),
            events: None,
            seconds: None,
            value: format!("{:.3} x", pipeline / raw),
            target: format!(">= {RAW_RATIO_TARGET} x"),
            verdict: at_least(pipeline / raw, RAW_RATIO_TARGET),
        },
        Row {
            measurement: "ratio pipeline / seed 001 pattern".to_string(),
            events: None,
            seconds: None,
            value: format!("{:.1} x", pipeline / seed001),
            target: format!(">= {SEED001_RATIO_TARGET} x"),
            verdict: at_least(pipeline / seed001, SEED001_RATIO_TARGET),
        },
        Row {
            measurement: "ratio pipeline / batched Python".to_string(),
            events: None,
            seconds: None,
            value: format!("{:.2} x", pipeline / batched),
            target: "none in issue 7".to_string(),
            verdict: Verdict::None,
        },
    ];
    results.rows.extend(rows);
    results.throughput_bars = vec![
        ("pipeline".to_string(), pipeline),
        ("raw consume".to_string(), raw),
        ("seed 001 (slice)".to_string(), seed001),
        ("batched Python".to_string(), batched),
    ];
    results.notes.push(format!(
        "Throughput: one topic of {} events (6 partitions). The pipeline is timed from `start_pipeline` (group join included) \
         until the persisted checkpoint reaches the end, and its report accounts for every event. The raw consumer is timed from \
         its assignment. The Python consumers are timed from their first message (group join not counted, which favours them); \
         each writes into its own scratch PostgreSQL database, and the bench checks the stored rows equal the messages consumed.",
        measured.events
    ));
    results.notes.push(format!(
        "Seed 001's pattern ran for a bounded slice ({} events in {:.1} s), its rate taken over that slice: a full run of {} \
         events would take about {:.1} minutes. Its idempotency key is the source position, not `message.key` (loadgen keys \
         by user id, which is not unique per event).",
        measured.seed001.consumed,
        measured.seed001.seconds,
        measured.events,
        measured.events as f64 / seed001 / 60.0
    ));
}

fn latency_rows(
    results: &mut Results,
    measured: &latency::LatencyResult,
    rate: u64,
    linger: Duration,
    with_targets: bool,
) {
    let profile = if with_targets {
        "latency profile"
    } else {
        "throughput profile"
    };
    for (name, value, target) in [
        ("p50", measured.p50, LATENCY_P50_TARGET),
        ("p99", measured.p99, LATENCY_P99_TARGET),
    ] {
        results.rows.push(Row {
            measurement: format!(
                "latency end to end {name}, at {rate} ev/s, {profile} (--linger-ms {})",
                linger.as_millis()
            ),
            events: Some(measured.sent),
            seconds: Some(measured.seconds),
            value: format!("{:.0} ms", value * 1000.0),
            target: if with_targets {
                format!("<= {:.0} ms", target * 1000.0)
            } else {
                "none (see the latency profile)".to_string()
            },
            verdict: if with_targets {
                at_most(value, target)
            } else {
                Verdict::None
            },
        });
    }
    for (name, value) in [("p50", measured.raw_p50), ("p99", measured.raw_p99)] {
        results.rows.push(Row {
            measurement: format!(
                "latency {name}, no-op rdkafka consumer on the same load (broker + client alone)"
            ),
            events: Some(measured.raw_samples as u64),
            seconds: Some(measured.seconds),
            value: format!("{:.0} ms", value * 1000.0),
            target: "baseline".to_string(),
            verdict: Verdict::None,
        });
    }
    results.notes.push(format!(
        "Latency: Kafka record timestamp (producer create time) to both stores holding the event, per valid event, from \
         the sink's own `stream_end_to_end_latency_seconds` samples kept in-process (all {} of them, ms resolution; \
         loadgen achieved {:.0} ev/s; max {:.0} ms). Includes loadgen's linger (10 ms) and the sink's linger ({} ms, {profile}).",
        measured.samples,
        measured.achieved_rate,
        measured.max * 1000.0,
        linger.as_millis()
    ));
}

fn memory_rows(
    results: &mut Results,
    scenario: &memory::Scenario,
    bounded: &memory::MemoryRun,
    unbounded: &memory::MemoryRun,
) {
    results.rows.push(Row {
        measurement: format!(
            "memory, {}: processor draining the backlog, bounded mailboxes (capacity {}), peak RSS",
            scenario.name, bounded.capacity
        ),
        events: Some(bounded.events),
        seconds: Some(bounded.seconds),
        value: format!("{:.0} MB", bounded.peak_mb()),
        target: format!("<= {RSS_TARGET_MB:.0} MB"),
        verdict: at_most(bounded.peak_mb(), RSS_TARGET_MB),
    });
    results.rows.push(Row {
        measurement: format!(
            "memory, {}: bounded, RSS growth (peak of second half - peak of first half)",
            scenario.name
        ),
        events: None,
        seconds: None,
        value: format!("{:+.1} MB", bounded.growth_mb()),
        target: format!("flat: <= {:.0} MB", bounded.flat_limit_mb()),
        verdict: if bounded.flat() {
            Verdict::Met
        } else {
            Verdict::Missed(format!(
                "{:.0} MB over",
                bounded.growth_mb() - bounded.flat_limit_mb()
            ))
        },
    });
    let (target, verdict) = if scenario.control {
        (
            "negative control: well above the bounded peak (> 1.5 x)".to_string(),
            Verdict::Control(unbounded.peak_mb() > 1.5 * bounded.peak_mb()),
        )
    } else {
        ("for comparison".to_string(), Verdict::None)
    };
    results.rows.push(Row {
        measurement: format!(
            "memory, {}: bound lifted (capacity {}), peak RSS",
            scenario.name, unbounded.capacity
        ),
        events: Some(unbounded.events),
        seconds: Some(unbounded.seconds),
        value: format!("{:.0} MB", unbounded.peak_mb()),
        target,
        verdict,
    });
    results.notes.push(format!(
        "Memory, {}: peak records in flight {:.0} bounded, {:.0} lifted; peak mailbox depth {:.0} bounded, {:.0} lifted; \
         drain (start to caught up) {:.0} ev/s bounded, {:.0} ev/s lifted.",
        scenario.name,
        bounded.max_in_flight,
        unbounded.max_in_flight,
        bounded.max_mailbox_depth,
        unbounded.max_mailbox_depth,
        bounded.events as f64 / bounded.seconds,
        unbounded.events as f64 / unbounded.seconds,
    ));
}

fn write_rss_csv(path: &Path, run: &memory::MemoryRun) -> anyhow::Result<()> {
    let mut text = String::from("seconds,rss_mb\n");
    for (time, mb) in &run.samples {
        writeln!(text, "{time:.3},{mb:.2}")?;
    }
    std::fs::write(path, text)?;
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let root = workspace_root();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target").join("bench"));
    std::fs::create_dir_all(&out)?;
    preflight()?;
    let capture = latency::install_recorder()?;
    let wants =
        |phase: Phase| args.only.contains(&phase) && !(phase == Phase::Peers && args.skip_peers);
    let mut results = Results::default();

    if wants(Phase::Parser) {
        eprintln!(
            "bench: parser: {} s per mix on one thread",
            args.parser_seconds
        );
        let seconds = Duration::from_secs_f64(args.parser_seconds);
        let parsed = tokio::task::spawn_blocking(move || {
            vec![
                parser::measure("loadgen mix (poison 0.005)", 0.005, seconds),
                parser::measure("all poison (five kinds)", 1.0, seconds),
            ]
        })
        .await?;
        parser_rows(&mut results, &parsed);
    }

    let venv = args
        .venv
        .clone()
        .unwrap_or_else(|| root.join(".bench-venv"));
    if wants(Phase::Throughput) {
        let venv = venv.clone();
        let scripts = root.join("bench").join("python");
        let phase_args = args.clone();
        let measured = guarded(async move {
            let python = python::ensure_venv(&venv).await?;
            let export = match &phase_args.otlp_endpoint {
                Some(endpoint) => Some(stream_actors::spans::SpanExport::start(endpoint, 2000)?),
                None => None,
            };
            let spans = export
                .as_ref()
                .map(|(_, spans)| spans.clone())
                .unwrap_or_default();
            let measured = throughput::run(
                phase_args.events,
                &python,
                &scripts,
                throughput::Seed001Bounds {
                    seconds: phase_args.seed001_seconds,
                    max_events: phase_args.seed001_max_events,
                },
                phase_args.batched_max_seconds,
                spans,
            )
            .await;
            if let Some((export, _)) = export {
                tokio::task::spawn_blocking(move || export.shutdown(Duration::from_secs(10)))
                    .await?;
            }
            measured
        })
        .await;
        match measured {
            Ok(measured) => throughput_rows(&mut results, &measured, &args),
            Err(error) => results.failures.push(format!("throughput: {error:#}")),
        }
    }

    if wants(Phase::Latency) {
        // Both profiles: the latency one (short sink linger) against the
        // targets, the default (throughput) one for comparison.
        let default_linger = stream_actors::PipelineConfig::local_defaults().linger;
        let profile_linger = Duration::from_millis(args.latency_profile_linger_ms);
        for (linger, with_targets) in [(profile_linger, true), (default_linger, false)] {
            let (capture, rate, seconds) =
                (capture.clone(), args.latency_rate, args.latency_seconds);
            let measured =
                guarded(async move { latency::run(&capture, rate, seconds, linger).await }).await;
            match measured {
                Ok(measured) => latency_rows(
                    &mut results,
                    &measured,
                    args.latency_rate,
                    linger,
                    with_targets,
                ),
                Err(error) => results.failures.push(format!("latency: {error:#}")),
            }
        }
    }

    let processor = if wants(Phase::Memory)
        || wants(Phase::Recovery)
        || wants(Phase::DlqRestart)
        || wants(Phase::Peers)
    {
        match &args.processor {
            Some(path) => Some(path.clone()),
            None => match memory::build_processor(&root) {
                Ok(path) => Some(path),
                Err(error) => {
                    results.failures.push(format!("memory: {error:#}"));
                    None
                }
            },
        }
    } else {
        None
    };
    if let Some(processor) = processor.as_ref().filter(|_| wants(Phase::Memory)) {
        let bounded_capacity = stream_actors::PipelineConfig::local_defaults().mailbox_capacity;
        let mut scenarios = vec![memory::Scenario {
            name: "default settings".to_string(),
            flags: Vec::new(),
            control: false,
        }];
        if args.slow_sink_batch_size > 0 {
            scenarios.push(memory::Scenario {
                name: format!("slow sink (--batch-size {})", args.slow_sink_batch_size),
                flags: vec![
                    "--batch-size".to_string(),
                    args.slow_sink_batch_size.to_string(),
                ],
                control: true,
            });
        }
        let (processor, events, unbounded_capacity, logs) = (
            processor.clone(),
            args.memory_events,
            args.unbounded_capacity,
            out.clone(),
        );
        match guarded(async move {
            memory::run(
                &processor,
                events,
                bounded_capacity,
                unbounded_capacity,
                &scenarios,
                &logs,
            )
            .await
        })
        .await
        {
            Ok(pairs) => {
                for (index, (scenario, bounded, unbounded)) in pairs.iter().enumerate() {
                    memory_rows(&mut results, scenario, bounded, unbounded);
                    write_rss_csv(&out.join(format!("rss-{index}-bounded.csv")), bounded)?;
                    write_rss_csv(&out.join(format!("rss-{index}-unbounded.csv")), unbounded)?;
                }
                results.notes.push(format!(
                    "Memory: `target/release/processor` as a subprocess on a backlog of {} events, VmRSS sampled every \
                     {} ms from its start until the checkpoint reached the end; every drain has its own group and databases \
                     and accounts for every event. The lifted bound is the largest `--mailbox-capacity` the processor accepts \
                     ({unbounded_capacity} messages of up to --batch-size records each). RSS samples: rss-*.csv.",
                    args.memory_events,
                    memory::SAMPLE_EVERY.as_millis(),
                ));
                results.memory = pairs;
            }
            Err(error) => results.failures.push(format!("memory: {error:#}")),
        }
    }

    if let Some(processor) = processor.clone().filter(|_| wants(Phase::DlqRestart)) {
        match guarded(async move { dlq_restart::rows(&processor).await }).await {
            Ok(rows) => results.rows.extend(rows),
            Err(error) => results.failures.push(format!("dlq restart: {error:#}")),
        }
    }

    if let Some(processor) = processor.clone().filter(|_| wants(Phase::Peers)) {
        let (root, venv, events, logs) =
            (root.clone(), venv.clone(), args.peers_events, out.clone());
        match guarded(async move { peers::run(&processor, &root, &venv, events, &logs).await })
            .await
        {
            Ok(measured) => {
                let mut table = peers::render(&measured.runs, &measured.expected);
                if let Some(behaviour) = &measured.behaviour {
                    table.push_str("\n\nHow each behaves:\n\n");
                    table.push_str(behaviour);
                }
                results.peers = Some(table);
                results.rows.extend(peers::target_rows(&measured.runs));
                results.failures.extend(
                    measured
                        .failures
                        .into_iter()
                        .map(|failure| format!("peers: {failure}")),
                );
            }
            Err(error) => results.failures.push(format!("peers: {error:#}")),
        }
    }

    if let Some(processor) = processor.filter(|_| wants(Phase::Recovery)) {
        match guarded(async move { recovery::recovery_rows(&processor).await }).await {
            Ok(rows) if rows.is_empty() => results.notes.push(
                "Recovery (issue 7, part 3) gave no rows (hook `recovery::recovery_rows`), so it is not in the table."
                    .to_string(),
            ),
            Ok(rows) => results.rows.extend(rows),
            Err(error) => results.failures.push(format!("recovery: {error:#}")),
        }
    }

    let mut report = table::render(&results.rows);
    report.push_str("\n\n");
    if let Some(peers) = &results.peers {
        writeln!(report, "Peers side by side:\n\n{peers}\n")?;
    }
    for note in &results.notes {
        writeln!(report, "- {note}")?;
    }
    for failure in &results.failures {
        writeln!(report, "- **FAILED** {failure}")?;
    }
    println!("{report}");
    std::fs::write(out.join("bench.md"), &report)?;

    let png = out.join("bench.png");
    let rss: Vec<chart::RssSeries<'_>> = results
        .memory
        .iter()
        .flat_map(|(_, bounded, unbounded)| [bounded, unbounded])
        .map(|run| chart::RssSeries {
            label: format!("{} (capacity {})", run.label, run.capacity),
            points: &run.samples,
        })
        .collect();
    chart::draw(&rss, RSS_TARGET_MB, &results.throughput_bars, &png)?;
    eprintln!(
        "bench: wrote {} and {}",
        out.join("bench.md").display(),
        png.display()
    );
    for failure in &results.failures {
        eprintln!("bench: FAILED {failure}");
    }
    Ok(results.failures.is_empty())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rdkafka=off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("bench: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
