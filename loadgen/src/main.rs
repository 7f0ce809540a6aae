//! `loadgen`: sends valid events and a fraction of poison to Kafka (or orders
//! to SQS with `loadgen sqs`), then prints the ledger as the last stdout line.

use clap::{Parser, Subcommand};
use loadgen::{LoadgenConfig, ValueFormat};

/// Send events (and poison) to Kafka, each with a W3C `traceparent` header
/// (a sampled trace of its own); the last stdout line is a JSON ledger:
/// {"sent","valid","poison","poison_by_kind","elapsed_s","rate"}.
/// `loadgen sqs` sends orders to an SQS queue instead.
#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Flags {
    #[command(subcommand)]
    command: Option<Command>,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// How to reach them: TLS and SASL.
    #[command(flatten)]
    kafka_security: stream_actors::kafka::KafkaSecurityArgs,
    /// Target topic (must exist).
    #[arg(long, env = "KAFKA_TOPIC", default_value = "events")]
    topic: String,
    /// Records to send.
    #[arg(long, env = "LOADGEN_COUNT", default_value_t = 100_000)]
    count: u64,
    /// Records per second in total; 0 sends as fast as possible.
    #[arg(long, env = "LOADGEN_RATE", default_value_t = 0)]
    rate: u64,
    /// Fraction of records that are poison (0..=1).
    #[arg(long, env = "LOADGEN_POISON_RATE", default_value_t = 0.005)]
    poison_rate: f64,
    /// RNG seed; the same seed sends the same records.
    #[arg(long, env = "LOADGEN_SEED", default_value_t = 1)]
    seed: u64,
    /// Producer actors sharing the work (1..=64).
    #[arg(long, env = "LOADGEN_PRODUCERS", default_value_t = 2)]
    producers: usize,
    /// How each value is written: `json` (the events as the pipeline reads
    /// them) or `connect-json` (the same events in Kafka Connect's
    /// JsonConverter envelope with their schema, for JDBC sink connectors;
    /// malformed poison stays malformed).
    #[arg(long, env = "LOADGEN_FORMAT", value_enum, default_value_t = ValueFormat::Json)]
    format: ValueFormat,
    /// Serve Prometheus `/metrics` (loadgen_sent_total by kind) on this address; empty: off.
    #[arg(long, env = "METRICS_ADDR", default_value = "")]
    metrics_addr: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send orders (and a fraction of poison) to an SQS queue; the last stdout
    /// line is a JSON ledger {"sent","valid","poison","elapsed_s","rate"}.
    Sqs {
        /// SQS endpoint URL.
        #[arg(long, env = "SQS_ENDPOINT", default_value = "http://127.0.0.1:4566")]
        sqs_endpoint: String,
        /// SQS region.
        #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
        sqs_region: String,
        /// The queue (must exist: `streamctl sqs setup`).
        #[arg(long, env = "SQS_QUEUE", default_value = "orders")]
        queue: String,
        /// Orders to send.
        #[arg(long, default_value_t = 100)]
        count: u64,
        /// Fraction of poison orders (0..=1).
        #[arg(long, default_value_t = 0.05)]
        poison_rate: f64,
        /// RNG seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

async fn run_sqs(command: Command) -> i32 {
    let Command::Sqs {
        sqs_endpoint,
        sqs_region,
        queue,
        count,
        poison_rate,
        seed,
    } = command;
    if !(0.0..=1.0).contains(&poison_rate) {
        eprintln!("error: invalid setting --poison-rate: must be within 0..=1, got {poison_rate}");
        return 2;
    }
    if count == 0 {
        eprintln!("error: invalid setting --count: must be at least 1");
        return 2;
    }
    let settings = stream_actors::sqs::SqsSettings {
        endpoint: sqs_endpoint,
        region: sqs_region,
        access_key_id: std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_else(|_| "test".to_string()),
        secret_access_key: std::env::var("AWS_SECRET_ACCESS_KEY")
            .unwrap_or_else(|_| "test".to_string()),
    };
    match loadgen::sqs::run(&settings, &queue, count, poison_rate, seed).await {
        Ok(ledger) => {
            eprintln!(
                "loadgen: done: {} orders sent ({} valid, {} poison)",
                ledger.sent, ledger.valid, ledger.poison
            );
            println!(
                "{}",
                serde_json::to_string(&ledger).expect("ledger serializes")
            );
            0
        }
        Err(error) => {
            eprintln!("error: {error}");
            1
        }
    }
}

#[tokio::main]
async fn main() {
    let flags = match Flags::try_parse() {
        Ok(flags) => flags,
        Err(clap_error) => {
            use clap::error::ErrorKind;
            if matches!(
                clap_error.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) {
                let _ = clap_error.print();
                std::process::exit(0);
            }
            let rendered = clap_error.render().to_string();
            eprintln!(
                "{}",
                rendered.lines().next().unwrap_or("error: bad arguments")
            );
            std::process::exit(2);
        }
    };
    if !flags.metrics_addr.trim().is_empty() {
        let Ok(address) = flags.metrics_addr.parse::<std::net::SocketAddr>() else {
            eprintln!(
                "error: invalid setting --metrics-addr (METRICS_ADDR): {:?} is not an address like 127.0.0.1:9465",
                flags.metrics_addr
            );
            std::process::exit(2);
        };
        if let Err(error) = metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(address)
            .install()
        {
            eprintln!("error: cannot serve metrics on --metrics-addr {address}: {error}");
            std::process::exit(2);
        }
    }
    if let Some(command) = flags.command {
        std::process::exit(run_sqs(command).await);
    }
    let brokers = match flags.kafka_security.resolve(&flags.brokers) {
        Ok(brokers) => brokers,
        Err(setting_error) => {
            eprintln!("error: {setting_error}");
            std::process::exit(2);
        }
    };
    let config = LoadgenConfig {
        brokers,
        topic: flags.topic,
        count: flags.count,
        rate: flags.rate,
        poison_rate: flags.poison_rate,
        seed: flags.seed,
        producers: flags.producers,
        progress: true,
        format: flags.format,
    };
    if let Err(config_error) = config.validate() {
        eprintln!("error: {config_error}");
        std::process::exit(2);
    }
    match loadgen::run(&config).await {
        Ok(ledger) => {
            eprintln!(
                "loadgen: done: {} sent ({} valid, {} poison) in {:.1}s, {:.0}/s",
                ledger.sent, ledger.valid, ledger.poison, ledger.elapsed_s, ledger.rate
            );
            println!(
                "{}",
                serde_json::to_string(&ledger).expect("ledger serializes")
            );
        }
        Err(run_error) => {
            eprintln!("error: {run_error}");
            std::process::exit(1);
        }
    }
}
