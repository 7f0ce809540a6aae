//! Memory under backpressure: the `processor` binary, run as a subprocess on a
//! scratch corner of the services, drains a backlog already in the topic
//! while a thread samples its resident set (`VmRSS` in `/proc/<pid>/status`)
//! every [`SAMPLE_EVERY`].
//!
//! Each [`Scenario`] drains the same backlog twice (each drain with its own
//! group, databases and dead-letter topic): with the default mailbox
//! capacity, and with the bound effectively lifted (a capacity of 100,000
//! messages, the largest `--mailbox-capacity` accepts: each message carries a
//! batch of up to `--batch-size` records, so the bound never bites on a
//! backlog of a million; and the largest `--max-in-flight-bytes`, 2 GiB). Memory only queues where a stage is slower than the
//! one before it, so besides the default settings there is a slow-sink
//! scenario (a small `--batch-size`: many more store round trips per event)
//! in which the consumer outruns the sink: there the lifted bound is the
//! negative control that shows the growth the bound prevents.
//!
//! "Flat": the peak RSS of the second half of the drain (by time) exceeds the
//! peak of the first half by at most max(10 MB, 10 % of the peak). RSS on a
//! bounded drain is not a constant line (the allocator returns and takes back
//! whole batches, 20-30 MB steps), so this compares peaks, which a growth
//! with the events processed keeps raising and an oscillation does not.
//!
//! While it drains, the processor's `/metrics` is scraped every half second
//! for `stream_in_flight_records` (records consumed and not yet acknowledged)
//! and `stream_mailbox_depth`: their peaks show whether the bound was hit.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use stream_bins::scratch::{self, TestEnv};

/// How often RSS is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(150);

/// The most a drain may take before the bench gives up.
const DRAIN_DEADLINE: Duration = Duration::from_secs(1200);

/// Processor settings both drains of a pair share.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// What it is, for the table.
    pub name: String,
    /// Extra processor flags.
    pub flags: Vec<String>,
    /// Whether its lifted-bound drain is the negative control (the consumer
    /// outruns the sink, so without the bound records pile up).
    pub control: bool,
}

/// One drain.
#[derive(Debug, Clone)]
pub struct MemoryRun {
    /// "bounded" or "unbounded", and the scenario.
    pub label: String,
    /// `--mailbox-capacity` it ran with.
    pub capacity: usize,
    /// Records in the backlog.
    pub events: u64,
    /// Seconds from the processor's start until the checkpoint reached the end.
    pub seconds: f64,
    /// (seconds since start, RSS in MB), until caught up.
    pub samples: Vec<(f64, f64)>,
    /// Highest `stream_in_flight_records` scraped.
    pub max_in_flight: f64,
    /// Highest `stream_mailbox_depth` of any actor scraped.
    pub max_mailbox_depth: f64,
}

impl MemoryRun {
    /// Peak RSS, MB.
    pub fn peak_mb(&self) -> f64 {
        self.samples.iter().map(|(_, mb)| *mb).fold(0.0, f64::max)
    }

    /// Peak RSS of the second half of the drain minus that of the first half, MB.
    pub fn growth_mb(&self) -> f64 {
        let Some(&(end, _)) = self.samples.last() else {
            return f64::NAN;
        };
        if self.samples.len() < 4 {
            return f64::NAN;
        }
        let peak = |first_half: bool| {
            self.samples
                .iter()
                .filter(|(time, _)| (*time < end / 2.0) == first_half)
                .map(|(_, mb)| *mb)
                .fold(0.0, f64::max)
        };
        peak(false) - peak(true)
    }

    /// Whether RSS stayed flat (see the module docs).
    pub fn flat(&self) -> bool {
        let growth = self.growth_mb();
        growth.is_finite() && growth <= self.flat_limit_mb()
    }

    /// The most [`MemoryRun::growth_mb`] may be for a flat drain, MB.
    pub fn flat_limit_mb(&self) -> f64 {
        (0.1 * self.peak_mb()).max(10.0)
    }
}

/// `VmRSS` of `pid` in MB, or `None` once the process is gone.
pub(crate) fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kilobytes: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kilobytes / 1024.0)
}

/// A sampler thread: (seconds since `started`, RSS MB) every [`SAMPLE_EVERY`]
/// until stopped, the process is gone, or the deadline passes.
fn spawn_sampler(
    pid: u32,
    started: Instant,
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(f64, f64)>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) && started.elapsed() < DRAIN_DEADLINE * 2 {
            let Some(mb) = rss_mb(pid) else { break };
            samples
                .lock()
                .expect("samples lock")
                .push((started.elapsed().as_secs_f64(), mb));
            std::thread::sleep(SAMPLE_EVERY);
        }
    })
}

/// The value of an unlabelled metric, or the highest value over its labels.
pub(crate) fn scrape_max(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(f64::max)
}

/// Sends SIGTERM, waits up to 60 s for the drain and exit, kills otherwise.
pub(crate) fn terminate(child: &mut Child) -> anyhow::Result<std::process::ExitStatus> {
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) on the pid of a child this process spawned and has not reaped.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let asked = Instant::now();
    while asked.elapsed() < Duration::from_secs(60) {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill()?;
    let status = child.wait()?;
    anyhow::bail!("pid {pid} did not exit within 60 s of SIGTERM (killed: {status})")
}

/// Drains the backlog of `env` with `processor` at `capacity`.
async fn drain(
    processor: &Path,
    env: &TestEnv,
    events: u64,
    label: &str,
    capacity: usize,
    flags: &[String],
    log: &Path,
) -> anyhow::Result<MemoryRun> {
    let admin = format!("127.0.0.1:{}", scratch::free_port());
    let log_file =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    // The lifted bound lifts the byte budget too (its largest value).
    let budget: &[&str] = if label == "unbounded" {
        &["--max-in-flight-bytes", "2147483648"]
    } else {
        &[]
    };
    let mut child = Command::new(processor)
        .args(env.processor_flags())
        .args(["--mailbox-capacity", &capacity.to_string()])
        .args(budget)
        .args(["--metrics-addr", &admin])
        .args(flags)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("cannot start {}", processor.display()))?;
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampler = spawn_sampler(child.id(), started, stop.clone(), samples.clone());

    let connections = env.connections();
    let mut max_in_flight = 0.0_f64;
    let mut max_mailbox_depth = 0.0_f64;
    let mut last_print = Instant::now();
    let outcome: anyhow::Result<f64> = loop {
        if let Some(status) = child.try_wait()? {
            break Err(anyhow::anyhow!(
                "processor ({label}) exited early with {status}; see {}",
                log.display()
            ));
        }
        if started.elapsed() > DRAIN_DEADLINE {
            break Err(anyhow::anyhow!(
                "processor ({label}) did not drain {events} events within {DRAIN_DEADLINE:?}"
            ));
        }
        if let Ok((200, body)) = scratch::http_get(&admin, "/metrics") {
            if let Some(value) = scrape_max(&body, "stream_in_flight_records") {
                max_in_flight = max_in_flight.max(value);
            }
            if let Some(value) = scrape_max(&body, "stream_mailbox_depth") {
                max_mailbox_depth = max_mailbox_depth.max(value);
            }
        }
        let ends = stream_bins::inspect::end_offsets_async(&env.config.brokers, &connections.topic)
            .await?;
        let checkpoint = stream_bins::inspect::checkpoint_offsets(
            &connections.postgres_url,
            &connections.group,
            &connections.topic,
        )
        .await?;
        let lag = stream_bins::report::lag(&ends, &checkpoint);
        if lag == 0 {
            break Ok(started.elapsed().as_secs_f64());
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            let rss = samples
                .lock()
                .expect("samples lock")
                .last()
                .map(|(_, mb)| *mb)
                .unwrap_or_default();
            eprintln!(
                "bench: memory ({label}): lag {lag}, RSS {rss:.0} MB, in flight {max_in_flight:.0} max"
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let status = terminate(&mut child);
    let seconds = outcome?;
    let status = status?;
    anyhow::ensure!(
        status.success(),
        "processor ({label}) exited with {status} after SIGTERM; see {}",
        log.display()
    );
    let report = stream_bins::report::gather(&connections).await?;
    anyhow::ensure!(
        report.accounted_for(),
        "processor ({label}) did not account for every event:\n{}",
        report.render()
    );
    let samples = std::mem::take(&mut *samples.lock().expect("samples lock"));
    let run = MemoryRun {
        label: label.to_string(),
        capacity,
        events,
        seconds,
        samples,
        max_in_flight,
        max_mailbox_depth,
    };
    eprintln!(
        "bench: memory ({label}): drained {events} in {seconds:.1} s, peak RSS {:.0} MB, growth {:+.1} MB, every event accounted for",
        run.peak_mb(),
        run.growth_mb()
    );
    Ok(run)
}

/// A fresh group, databases and dead-letter topic for `topic`.
async fn fresh_env(prefix: &str, topic: &str) -> TestEnv {
    let name = scratch::unique_name(prefix);
    let dlq_topic = format!("{name}_events_dlq");
    scratch::create_topic(&dlq_topic, 3).await;
    TestEnv::with_topics(name, &scratch::brokers(), topic.to_string(), dlq_topic).await
}

/// A file-name-safe form of a label.
fn slug(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect::<String>()
        .split('-')
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

/// Loads a backlog of `events`, then drains it bounded and unbounded in each
/// scenario; returns (bounded, unbounded) per scenario.
pub async fn run(
    processor: &Path,
    events: u64,
    bounded_capacity: usize,
    unbounded_capacity: usize,
    scenarios: &[Scenario],
    logs: &Path,
) -> anyhow::Result<Vec<(Scenario, MemoryRun, MemoryRun)>> {
    let backlog = TestEnv::new("bench_memory", 6).await;
    eprintln!(
        "bench: memory: loading a backlog of {events} events into {}",
        backlog.config.topic
    );
    let ledger = backlog.produce(events, 0.005, 4242).await;
    anyhow::ensure!(
        ledger.sent == events,
        "loadgen delivered {} of {events}",
        ledger.sent
    );
    let topic = backlog.config.topic.clone();
    let mut fresh = Some(backlog);
    let mut results = Vec::new();
    for scenario in scenarios {
        let mut pair = Vec::new();
        for (bound, capacity) in [
            ("bounded", bounded_capacity),
            ("unbounded", unbounded_capacity),
        ] {
            let env = match fresh.take() {
                Some(env) => env,
                None => fresh_env("bench_memory", &topic).await,
            };
            let label = format!("{bound}, {}", scenario.name);
            let log = logs.join(format!("processor-{}.log", slug(&label)));
            pair.push(
                drain(
                    processor,
                    &env,
                    events,
                    &label,
                    capacity,
                    &scenario.flags,
                    &log,
                )
                .await?,
            );
        }
        let unbounded = pair.pop().expect("two drains");
        let bounded = pair.pop().expect("two drains");
        results.push((scenario.clone(), bounded, unbounded));
    }
    Ok(results)
}

/// Builds the processor binary (a no-op when it is up to date) and returns its path.
pub fn build_processor(root: &Path) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    eprintln!("bench: cargo build --release -p stream-bins --bin processor");
    let status = Command::new(cargo)
        .current_dir(root)
        .args([
            "build",
            "--release",
            "-p",
            "stream-bins",
            "--bin",
            "processor",
        ])
        .status()
        .context("cannot run cargo to build the processor")?;
    anyhow::ensure!(status.success(), "building the processor failed: {status}");
    Ok(root.join("target").join("release").join("processor"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_with(mbs: &[f64]) -> MemoryRun {
        MemoryRun {
            label: "test".to_string(),
            capacity: 8,
            events: 0,
            seconds: 0.0,
            samples: mbs
                .iter()
                .enumerate()
                .map(|(index, mb)| (index as f64, *mb))
                .collect(),
            max_in_flight: 0.0,
            max_mailbox_depth: 0.0,
        }
    }

    #[test]
    fn flat_oscillating_and_growing() {
        let flat = run_with(&[20.0, 60.0, 62.0, 61.0, 63.0, 62.0, 61.0, 64.0, 62.0, 63.0]);
        assert!(flat.flat(), "growth {}", flat.growth_mb());
        let oscillating = run_with(&[12.0, 79.0, 71.0, 95.0, 95.0, 67.0, 67.0, 80.0, 95.0, 95.0]);
        assert!(oscillating.flat(), "growth {}", oscillating.growth_mb());
        let growing = run_with(&[
            20.0, 60.0, 80.0, 100.0, 120.0, 140.0, 160.0, 180.0, 200.0, 220.0,
        ]);
        assert!(!growing.flat(), "growth {}", growing.growth_mb());
        assert_eq!(growing.peak_mb(), 220.0);
        assert_eq!(growing.growth_mb(), 220.0 - 120.0);
    }

    #[test]
    fn slugs_are_file_names() {
        assert_eq!(
            slug("bounded, slow sink (--batch-size 100)"),
            "bounded-slow-sink-batch-size-100"
        );
    }

    #[test]
    fn scrapes_labelled_and_plain_metrics() {
        let body = "# HELP x\nstream_in_flight_records 12\nstream_mailbox_depth{actor=\"sink\"} 3\nstream_mailbox_depth{actor=\"parser\"} 7\nstream_mailbox_depth_other 99\n";
        assert_eq!(scrape_max(body, "stream_in_flight_records"), Some(12.0));
        assert_eq!(scrape_max(body, "stream_mailbox_depth"), Some(7.0));
        assert_eq!(scrape_max(body, "missing"), None);
    }
}
