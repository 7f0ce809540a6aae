//! Replicas that follow the lag: what KEDA does to the processor's
//! Deployment (k8s/base/platform/processor-scaledobject.yaml), done here by
//! hand on the local services. A group of one processor grows to three and
//! shrinks back to one while loadgen writes, and ends with the audit clean.
//!
//! Readiness through the rebalances: a member that holds partitions stays
//! ready while the group moves partitions to newcomers (no flapping), and a
//! newcomer says it is ready only once it holds partitions.
//!
//! The members are static, as in the cluster (group.instance.id = the pod
//! name): a static member that stops does not leave the group, so its
//! partitions move when the session timeout (6 s) has passed.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// The partitions a `/readyz` answer says the member consumes.
fn consuming(answer: &(u16, String)) -> Option<i32> {
    let (code, body) = answer;
    if *code != 200 {
        return None;
    }
    body.split("consuming ")
        .nth(1)?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

/// Each member's `/readyz` answer now (None: no answer).
fn answers(members: &[&ProcessorProcess]) -> Vec<Option<(u16, String)>> {
    members
        .iter()
        .map(|member| http_get(&member.admin, "/readyz").ok())
        .collect()
}

/// Polls until `members` are all ready and hold `total` partitions between
/// them, each at least one; returns the time it took.
async fn wait_for_layout(what: &str, members: &[&ProcessorProcess], total: i32) -> Duration {
    let started = Instant::now();
    wait_until(what, Duration::from_secs(90), || {
        let held: Vec<Option<i32>> = answers(members)
            .iter()
            .map(|answer| answer.as_ref().and_then(consuming))
            .collect();
        async move {
            held.iter().all(|held| held.is_some_and(|held| held >= 1))
                && held.iter().flatten().sum::<i32>() == total
        }
    })
    .await;
    started.elapsed()
}

/// Every `/readyz` answer of some members, taken every 50 ms on a thread of
/// its own until stopped and until it has seen each member consuming (the
/// test's own polls may see that before the watch's next round does).
struct ReadinessWatch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Vec<(u16, String)>>>,
}

impl ReadinessWatch {
    fn start(addresses: Vec<String>) -> ReadinessWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = vec![Vec::new(); addresses.len()];
            // Bounded: the test ends well before 10 minutes.
            let deadline = Instant::now() + Duration::from_secs(600);
            let all_consuming = |seen: &Vec<Vec<(u16, String)>>| {
                seen.iter()
                    .all(|answers| answers.iter().any(|answer| consuming(answer).is_some()))
            };
            while !(stopped.load(Ordering::SeqCst) && all_consuming(&seen))
                && Instant::now() < deadline
            {
                for (index, address) in addresses.iter().enumerate() {
                    if let Ok(answer) = http_get(address, "/readyz") {
                        seen[index].push(answer);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            seen
        });
        ReadinessWatch { stop, thread }
    }

    fn finish(self) -> Vec<Vec<(u16, String)>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("readiness watch")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_scales_from_one_processor_to_three_and_back_under_load_and_loses_nothing() {
    const PARTITIONS: i32 = 6;
    let env = TestEnv::new("scaling", PARTITIONS).await;
    let start = |id: &str| {
        ProcessorProcess::start(
            &env,
            &[
                ("KAFKA_GROUP_INSTANCE_ID", id),
                ("SESSION_TIMEOUT_MS", "6000"),
            ],
        )
    };
    // About 40 s of load at 2,500 events/s: it runs through the scale-out
    // and most of the scale-in.
    let production = env.produce_in_background(100_000, 2_500, 0.005, 1_313);
    let mut first = start("scaling-0");
    first.wait_ready(Duration::from_secs(60));
    wait_for_layout(
        "one member holding all six partitions",
        &[&first],
        PARTITIONS,
    )
    .await;
    wait_until("the first member storing", Duration::from_secs(60), || {
        let processed = first.metric("stream_events_processed_total").unwrap_or(0.0);
        async move { processed > 1_000.0 }
    })
    .await;

    // Scale out: two more replicas, as the HPA adds pods.
    let mut second = start("scaling-1");
    let mut third = start("scaling-2");
    let watch = ReadinessWatch::start(vec![
        first.admin.clone(),
        second.admin.clone(),
        third.admin.clone(),
    ]);
    let out = wait_for_layout(
        "three members sharing the six partitions",
        &[&first, &second, &third],
        PARTITIONS,
    )
    .await;
    for (name, member) in [("second", &second), ("third", &third)] {
        wait_until(
            &format!("the {name} member storing"),
            Duration::from_secs(60),
            || {
                let processed = member
                    .metric("stream_events_processed_total")
                    .unwrap_or(0.0);
                async move { processed > 0.0 }
            },
        )
        .await;
    }
    let seen = watch.finish();
    // The first member kept consuming through both rebalances: never unready.
    let first_unready: Vec<&(u16, String)> =
        seen[0].iter().filter(|(code, _)| *code != 200).collect();
    assert!(
        first_unready.is_empty(),
        "the first member flapped during the scale-out: {first_unready:?}"
    );
    assert!(!seen[0].is_empty(), "no answer from the first member");
    // A newcomer says it is ready only once it holds partitions.
    for (index, answers) in seen.iter().enumerate().skip(1) {
        assert!(
            answers.iter().any(|answer| consuming(answer).is_some()),
            "member {index} never reported partitions: {answers:?}"
        );
        for answer in answers {
            if answer.0 == 200 {
                assert!(
                    consuming(answer).is_some_and(|held| held >= 1),
                    "member {index} ready without partitions: {answer:?}"
                );
            }
        }
        let unready: std::collections::BTreeSet<&str> = answers
            .iter()
            .filter(|(code, _)| *code == 503)
            .map(|(_, body)| body.split(" (").next().unwrap_or(body).trim())
            .collect();
        eprintln!(
            "member {index}: {} readiness answers, {} not ready before its partitions came: {unready:?}",
            answers.len(),
            answers.iter().filter(|(code, _)| *code == 503).count()
        );
    }
    eprintln!("scale-out 1 -> 3: partitions shared {out:.2?} after the new members started");

    // Scale in, one pod at a time as a slow scale-down policy does: SIGTERM
    // drains and persists the checkpoint; the static member's partitions
    // move once its session has timed out.
    let stopped = Instant::now();
    assert_eq!(third.terminate(Duration::from_secs(60)), Some(0));
    wait_for_layout(
        "two members holding the six partitions",
        &[&first, &second],
        PARTITIONS,
    )
    .await;
    eprintln!(
        "scale-in 3 -> 2: the stopped member's partitions held again {:.2?} after its SIGTERM",
        stopped.elapsed()
    );
    let stopped = Instant::now();
    assert_eq!(second.terminate(Duration::from_secs(60)), Some(0));
    wait_for_layout(
        "one member holding all six partitions",
        &[&first],
        PARTITIONS,
    )
    .await;
    eprintln!(
        "scale-in 2 -> 1: the stopped member's partitions held again {:.2?} after its SIGTERM",
        stopped.elapsed()
    );

    let ledger = production.await.expect("loadgen task");
    env.wait_for_catch_up(Duration::from_secs(300)).await;
    assert_eq!(first.terminate(Duration::from_secs(60)), Some(0));
    let audit = audit(&env).await;
    eprintln!("{}", audit.render());
    assert_clean(&audit, &ledger);
}
