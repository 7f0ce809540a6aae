//! What a peer's process costs: CPU seconds (`utime + stime` in
//! `/proc/<pid>/stat`) and resident set (`VmRSS`), sampled on a thread with
//! wall-clock times, so the CPU spent between two instants read elsewhere
//! (the first and the last row's `stored_at`) can be taken from the samples.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often the sampler reads `/proc`.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// One reading of a process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Seconds since the Unix epoch.
    pub at: f64,
    /// CPU seconds the process has used (user + system), all its threads.
    pub cpu_seconds: f64,
    /// Resident set, MB.
    pub rss_mb: f64,
}

/// Seconds since the Unix epoch, now.
pub fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs_f64())
        .unwrap_or_default()
}

/// `utime + stime` from the text of `/proc/<pid>/stat`, in clock ticks. The
/// command name (field 2) is in parentheses and may hold spaces, so fields
/// are counted after its closing parenthesis: state is field 3, utime 14,
/// stime 15.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A reading of `pid`, or `None` once it is gone.
pub fn sample(pid: u32) -> Option<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu_seconds = cpu_ticks(&stat)? as f64 / ticks_per_second;
    let rss_mb = crate::memory::rss_mb(pid)?;
    Some(Sample {
        at: now_epoch(),
        cpu_seconds,
        rss_mb,
    })
}

/// Samples one process on a thread until [`Monitor::finish`] or its exit.
pub struct Monitor {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Monitor {
    /// Starts sampling `pid`; stops by itself after `limit`.
    pub fn start(pid: u32, limit: Duration) -> Monitor {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, samples) = (stop.clone(), samples.clone());
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < limit {
                    let Some(reading) = sample(pid) else { break };
                    samples.lock().expect("samples lock").push(reading);
                    std::thread::sleep(SAMPLE_EVERY);
                }
            })
        };
        Monitor {
            stop,
            samples,
            thread,
        }
    }

    /// The latest reading so far.
    pub fn last(&self) -> Option<Sample> {
        self.samples.lock().expect("samples lock").last().copied()
    }

    /// Takes one last reading (the process must still run for it), stops the
    /// thread and returns every reading.
    pub fn finish(self, pid: u32) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        let mut samples = std::mem::take(&mut *self.samples.lock().expect("samples lock"));
        samples.extend(sample(pid));
        samples
    }
}

/// The CPU seconds used at `at`, interpolated between the readings around it
/// (the first or last reading outside their span).
pub fn cpu_at(samples: &[Sample], at: f64) -> Option<f64> {
    let after = samples.iter().position(|reading| reading.at >= at);
    match after {
        None => samples.last().map(|reading| reading.cpu_seconds),
        Some(0) => samples.first().map(|reading| reading.cpu_seconds),
        Some(index) => {
            let (before, after) = (samples[index - 1], samples[index]);
            let span = after.at - before.at;
            let fraction = if span > 0.0 {
                (at - before.at) / span
            } else {
                1.0
            };
            Some(before.cpu_seconds + fraction * (after.cpu_seconds - before.cpu_seconds))
        }
    }
}

/// The highest resident set among the readings, MB.
pub fn peak_rss_mb(samples: &[Sample]) -> f64 {
    samples
        .iter()
        .map(|reading| reading.rss_mb)
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_utime_and_stime_past_a_command_name_with_spaces_and_parentheses() {
        let stat =
            "4242 (java (a) b) S 1 4242 4242 0 -1 4194560 123 0 0 0 250 50 0 0 20 0 40 0 100 0 0";
        assert_eq!(cpu_ticks(stat), Some(300));
        assert_eq!(cpu_ticks("4242 (x) S 1"), None);
    }

    #[test]
    fn this_process_has_a_reading() {
        let reading = sample(std::process::id()).expect("own /proc");
        assert!(reading.rss_mb > 1.0, "{reading:?}");
        assert!(reading.cpu_seconds >= 0.0);
    }

    #[test]
    fn cpu_is_interpolated_between_readings() {
        let at = |at: f64, cpu_seconds: f64| Sample {
            at,
            cpu_seconds,
            rss_mb: at,
        };
        let samples = [at(10.0, 1.0), at(11.0, 2.0), at(12.0, 4.0)];
        assert_eq!(cpu_at(&samples, 11.5), Some(3.0));
        assert_eq!(cpu_at(&samples, 9.0), Some(1.0));
        assert_eq!(cpu_at(&samples, 13.0), Some(4.0));
        assert_eq!(cpu_at(&[], 13.0), None);
        assert_eq!(peak_rss_mb(&samples), 12.0);
    }
}
