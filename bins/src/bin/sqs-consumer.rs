//! `sqs-consumer`: stores orders from SQS; the broker redrives the poison.

use stream_bins::config::{parse_or_exit, SqsConsumerConfig};

#[tokio::main]
async fn main() {
    let flags: SqsConsumerConfig = parse_or_exit();
    let (arguments, metrics_addr) = flags.validate().unwrap_or_else(|config_error| {
        eprintln!("error: {config_error}");
        std::process::exit(2);
    });
    stream_bins::run_service(metrics_addr, || stream_bins::sqs_consumer::run(arguments)).await
}
