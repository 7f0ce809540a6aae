//! `streamctl`: look at what the pipeline did.

use std::time::Duration;

use clap::{Parser, Subcommand};
use stream_bins::config::{parse_or_exit, ConnectionArgs};

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
}

#[tokio::main]
async fn main() {
    let streamctl: Streamctl = parse_or_exit();
    let code = match streamctl.command {
        Command::Report {
            connections,
            wait_secs,
            json,
        } => {
            if let Err(config_error) = connections.validate() {
                eprintln!("error: {config_error}");
                std::process::exit(2);
            }
            match report(&connections, wait_secs, json).await {
                Ok(code) => code,
                Err(report_error) => {
                    eprintln!("error: {report_error:#}");
                    1
                }
            }
        }
    };
    std::process::exit(code);
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
