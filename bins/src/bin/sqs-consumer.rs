//! `sqs-consumer`: stores orders from SQS; the broker redrives the poison.

use stream_bins::config::{parse_or_exit, SqsConsumerConfig};

#[tokio::main]
async fn main() {
    let flags: SqsConsumerConfig = parse_or_exit();
    let (arguments, metrics_addr) = match flags.validate() {
        Ok(valid) => valid,
        Err(config_error) => {
            eprintln!("error: {config_error}");
            std::process::exit(2);
        }
    };
    stream_bins::init_tracing();
    if let Some(address) = metrics_addr {
        if let Err(metrics_error) = stream_bins::processor::install_metrics(address) {
            eprintln!("error: {metrics_error}");
            std::process::exit(2);
        }
    }
    match stream_bins::sqs_consumer::run(arguments).await {
        Ok(code) => std::process::exit(code),
        Err(run_error) => {
            eprintln!("error: {run_error:#}");
            std::process::exit(1);
        }
    }
}
