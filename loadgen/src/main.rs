//! `loadgen`: sends valid events and a fraction of poison to Kafka, then
//! prints the ledger as the last line on stdout.

use clap::Parser;
use loadgen::LoadgenConfig;

/// Send events (and poison) to Kafka; the last stdout line is a JSON ledger:
/// {"sent","valid","poison","poison_by_kind","elapsed_s","rate"}.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version, about)]
struct Flags {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
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
    let config = LoadgenConfig {
        brokers: flags.brokers,
        topic: flags.topic,
        count: flags.count,
        rate: flags.rate,
        poison_rate: flags.poison_rate,
        seed: flags.seed,
        producers: flags.producers,
        progress: true,
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
