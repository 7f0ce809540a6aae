//! A real Prometheus (Debian's package) scraping a real processor with the
//! project's rules file: the recorded SLI `sli:success:ratio5m` agrees, within
//! 0.001, with the ratio computed from the sinks and the dead-letter topic.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_port, http_get, url_encode, wait_until, KillOnDrop, TestEnv};

/// The first sample's value of an instant query, if any.
fn query(prometheus: &str, expression: &str) -> Option<f64> {
    let (status, body) = http_get(
        prometheus,
        &format!("/api/v1/query?query={}", url_encode(expression)),
    )
    .ok()?;
    if status != 200 {
        return None;
    }
    let answer: serde_json::Value = serde_json::from_str(&body).ok()?;
    answer["data"]["result"][0]["value"][1]
        .as_str()?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recorded_sli_matches_the_sinks_and_the_dlq() {
    let prometheus_binary =
        std::env::var("PROMETHEUS_BIN").unwrap_or_else(|_| "/usr/bin/prometheus".to_string());
    assert!(
        std::path::Path::new(&prometheus_binary).exists(),
        "{prometheus_binary} missing: scripts/check-observability.sh installs Debian's prometheus package"
    );
    let env = TestEnv::new("promlive", 3).await;
    let metrics_port = free_port();
    let processor = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_processor"))
            .args([
                "--brokers",
                &env.config.brokers.servers,
                "--group",
                &env.config.group_id,
                "--topic",
                &env.config.topic,
                "--dlq-topic",
                &env.config.dlq_topic,
                "--postgres-url",
                &env.config.postgres_url,
                "--clickhouse-url",
                &env.config.clickhouse_url,
                "--clickhouse-database",
                &env.config.clickhouse_database,
                "--metrics-addr",
                &format!("127.0.0.1:{metrics_port}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start processor"),
    );

    let directory = std::env::temp_dir().join(common::unique_name("prometheus"));
    std::fs::create_dir_all(&directory).unwrap();
    let rules = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../observability/prometheus/rules.yml"
    );
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\nscrape_configs:\n  - job_name: processor\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
    );
    std::fs::write(directory.join("prometheus.yml"), config).unwrap();
    let prometheus_address = format!("127.0.0.1:{}", free_port());
    let _prometheus = KillOnDrop(
        Command::new(&prometheus_binary)
            .arg(format!(
                "--config.file={}",
                directory.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                directory.join("data").display()
            ))
            .arg(format!("--web.listen-address={prometheus_address}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus"),
    );

    // Prometheus has scraped the processor's counters while they are still 0,
    // so the rates cover every event.
    wait_until(
        "prometheus to scrape the processor at zero",
        Duration::from_secs(60),
        || async {
            query(&prometheus_address, "stream_events_processed_total") == Some(0.0)
                && query(&prometheus_address, "sum(stream_dlq_messages_total)") == Some(0.0)
        },
    )
    .await;

    let ledger = env.produce(20_000, 0.005, 77).await;
    env.wait_for_catch_up(Duration::from_secs(120)).await;
    let report = stream_bins::report::gather(&env.connections())
        .await
        .unwrap();
    assert!(report.accounted_for(), "{}", report.render());
    assert_eq!(report.postgres_rows as u64, ledger.valid);
    let from_sinks =
        report.postgres_rows as f64 / (report.postgres_rows as f64 + report.dead_lettered as f64);

    // Wait for Prometheus to have scraped the final counts and evaluated the rule.
    wait_until(
        "prometheus to see every event",
        Duration::from_secs(60),
        || async {
            query(&prometheus_address, "stream_events_processed_total") == Some(ledger.valid as f64)
                && query(&prometheus_address, "sum(stream_dlq_messages_total)")
                    == Some(ledger.poison as f64)
        },
    )
    .await;
    // ...and to have evaluated the rule after that scrape.
    let final_scrape = query(
        &prometheus_address,
        "timestamp(stream_events_processed_total)",
    )
    .expect("scrape time");
    wait_until(
        "the rule to be evaluated past the final scrape",
        Duration::from_secs(30),
        || async {
            query(&prometheus_address, "timestamp(sli:success:ratio5m)")
                .is_some_and(|evaluated| evaluated > final_scrape)
        },
    )
    .await;
    let recorded = query(&prometheus_address, "sli:success:ratio5m").expect("sli recorded");
    assert!(
        (recorded - from_sinks).abs() <= 0.001,
        "recorded SLI {recorded} vs {from_sinks} from the sinks and the DLQ"
    );

    // The live view reads the same figures; without a terminal it prints plain lines.
    let watch = Command::new(env!("CARGO_BIN_EXE_streamctl"))
        .args([
            "watch",
            "--prometheus",
            &prometheus_address,
            "--iterations",
            "2",
        ])
        .output()
        .expect("run streamctl watch");
    let lines = String::from_utf8_lossy(&watch.stdout);
    assert!(watch.status.success(), "{lines}");
    assert_eq!(lines.lines().count(), 2, "{lines}");
    let last_line = lines.lines().last().unwrap();
    assert!(last_line.starts_with("up=1 "), "{last_line}");
    assert!(
        last_line.contains(&format!("sli={recorded:.4}")),
        "{last_line}"
    );
    assert!(
        last_line.contains("mailboxes[dlq_writer=0/8 parser=0/8 sink=0/8]"),
        "{last_line}"
    );

    // A chart of the run, from the same Prometheus.
    let chart_path = directory.join("run.png");
    let start = final_scrape - 60.0;
    stream_bins::chart::chart_from_prometheus(
        &prometheus_address,
        start,
        final_scrape + 1.0,
        &[(final_scrape - 5.0, "mark".to_string())],
        &chart_path,
    )
    .expect("chart");
    let png = std::fs::read(&chart_path).expect("chart written");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000);
    drop(processor);
    let _ = std::fs::remove_dir_all(&directory);
}
