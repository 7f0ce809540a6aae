//! Recovery on the real services: kill any actor or the whole process, lose
//! nothing, store nothing twice. Every test ends with `streamctl audit`'s
//! reconciliation: produced = stored + dead-lettered, zero duplicates in
//! PostgreSQL, ClickHouse and the dead-letter topic.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};
use stream_actors::faults::Faults;
use stream_supervisor::{start_pipeline_with, KillMode, PipelineExit, RestartPolicy, ACTORS};

/// Rows in the scratch PostgreSQL `events` table (0 before it exists).
async fn stored(env: &TestEnv) -> i64 {
    stream_bins::inspect::postgres_counts(&env.config.postgres_url, &env.config.topic)
        .await
        .map(|counts| counts.rows)
        .unwrap_or(0)
}

async fn last_checkpoint_at(env: &TestEnv) -> f64 {
    stream_bins::inspect::last_checkpoint_at(&env.config.postgres_url).await
}

fn now_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_sigkills_during_a_200k_run_lose_nothing_and_store_nothing_twice() {
    const EVENTS: u64 = 200_000;
    let env = TestEnv::new("sigkill", 6).await;
    // The run: loadgen at a steady rate while the processor is killed.
    let production = env.produce_in_background(EVENTS, 12_000, 0.005, 5);
    // Random moments: five kill points spread over the run, by rows stored.
    let mut rng = rand::rngs::StdRng::seed_from_u64(2026);
    let mut targets: Vec<i64> = (0..5)
        .map(|_| rng.gen_range(5_000..(EVENTS as i64 * 9 / 10)))
        .collect();
    targets.sort_unstable();
    let mut consumed_total = 0.0;
    let mut recoveries = Vec::new();
    // Static membership, as in Kubernetes (the pod name): the restarted
    // process takes its partitions back without waiting for the session
    // timeout to evict the killed one.
    let member = [("KAFKA_GROUP_INSTANCE_ID", "sigkill-0")];
    let mut processor = ProcessorProcess::start(&env, &member);
    processor.wait_ready(Duration::from_secs(60));
    for (kill, target) in targets.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(240);
        while stored(&env).await < *target {
            assert!(
                Instant::now() < deadline,
                "kill {kill}: {target} rows never stored:\n{}",
                processor.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        consumed_total += processor
            .metric("stream_events_consumed_total")
            .unwrap_or(0.0);
        processor.kill9();
        let killed_at = now_seconds();
        // Restarted at once, as an orchestrator would; timed to its first commit.
        processor = ProcessorProcess::start(&env, &member);
        let deadline = Instant::now() + Duration::from_secs(60);
        while last_checkpoint_at(&env).await <= killed_at {
            assert!(
                Instant::now() < deadline,
                "no commit after kill {kill}:\n{}",
                processor.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        recoveries.push(now_seconds() - killed_at);
        eprintln!(
            "kill {}: SIGKILL at {target} rows stored; first new commit {:.2} s later",
            kill + 1,
            recoveries.last().unwrap()
        );
    }
    let ledger = production.await.expect("loadgen task");
    assert_eq!(ledger.sent, EVENTS);
    env.wait_for_catch_up(Duration::from_secs(600)).await;
    consumed_total += processor
        .metric("stream_events_consumed_total")
        .unwrap_or(0.0);
    assert_eq!(processor.terminate(Duration::from_secs(60)), Some(0));

    let audit = audit(&env).await;
    eprintln!("{}", audit.render());
    eprintln!(
        "recovery (SIGKILL -> first new commit), seconds: {:?}; records consumed {} for {} produced: about {:.0} re-delivered per kill",
        recoveries
            .iter()
            .map(|seconds| format!("{seconds:.2}"))
            .collect::<Vec<_>>(),
        consumed_total,
        EVENTS,
        (consumed_total - EVENTS as f64).max(0.0) / 5.0
    );
    assert_clean(&audit, &ledger);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_actor_killed_and_made_to_panic_mid_batch_recovers_without_loss_or_duplicates() {
    let env = TestEnv::new("actorkill", 3).await;
    let mut config = env.config.clone();
    config.batch_size = 500;
    let policy = RestartPolicy {
        max_restarts: 100,
        ..RestartPolicy::default()
    };
    let pipeline = start_pipeline_with(config, policy, Arc::new(Faults::none()))
        .await
        .expect("pipeline starts");
    let mut ledger = loadgen::Ledger::default();
    let mut seed = 100;
    let mut restarts_seen = Vec::new();
    for round in 0..2 {
        for actor in ACTORS {
            for mode in [KillMode::Kill, KillMode::Panic] {
                let before = pipeline.status().await.expect("status").generation;
                if mode == KillMode::Panic {
                    pipeline.kill(actor, mode).await.expect("armed");
                }
                // Records in flight: the kill lands mid-batch.
                seed += 1;
                let batch = env.produce(3_000, 0.02, seed).await;
                if mode == KillMode::Kill {
                    pipeline.kill(actor, mode).await.expect("killed");
                }
                ledger.sent += batch.sent;
                ledger.valid += batch.valid;
                ledger.poison += batch.poison;
                let started = Instant::now();
                wait_until(
                    &format!("restart after {mode:?} of {actor} (round {round})"),
                    Duration::from_secs(60),
                    || async {
                        pipeline
                            .status()
                            .await
                            .is_ok_and(|status| status.ready && status.generation > before)
                    },
                )
                .await;
                restarts_seen.push((actor, mode, started.elapsed()));
            }
        }
    }
    env.wait_for_catch_up(Duration::from_secs(300)).await;
    let status = pipeline.status().await.expect("status");
    for actor in ACTORS {
        assert!(
            status.restarts[actor] >= 4,
            "{actor} restarts {:?}",
            status.restarts
        );
    }
    assert_eq!(pipeline.shutdown().await, PipelineExit::Stopped);
    for (actor, mode, took) in &restarts_seen {
        eprintln!("{mode:?} {actor}: running again after {took:?}");
    }
    let audit = audit(&env).await;
    eprintln!("{}", audit.render());
    assert_clean(&audit, &ledger);
}

/// Runs the processor with a crash point until it aborts there, then again
/// without it until caught up; returns the audit and the ledger.
async fn crash_and_recover(
    env: &TestEnv,
    crash_at: &str,
    extra: &[(&str, &str)],
) -> (stream_bins::audit::Audit, loadgen::Ledger) {
    let (audit, ledger, _) = crash_and_recover_logged(env, crash_at, extra).await;
    (audit, ledger)
}

/// [`crash_and_recover`], also returning the recovering processor's log.
async fn crash_and_recover_logged(
    env: &TestEnv,
    crash_at: &str,
    extra: &[(&str, &str)],
) -> (stream_bins::audit::Audit, loadgen::Ledger, String) {
    let ledger = env.produce(30_000, 0.01, 31).await;
    let mut with_crash: Vec<(&str, &str)> = vec![("STREAM_CRASH_AT", crash_at)];
    with_crash.extend_from_slice(extra);
    let mut crashing = ProcessorProcess::start(env, &with_crash);
    let code = crashing.wait_exit(Duration::from_secs(120));
    let log = std::fs::read_to_string(&crashing.log).unwrap_or_default();
    assert!(
        code.is_none() && log.contains("STREAM_CRASH_AT: aborting"),
        "expected an abort at {crash_at}, got exit {code:?}:\n{}",
        crashing.log_tail()
    );
    let mut recovering = ProcessorProcess::start(env, extra);
    recovering.wait_ready(Duration::from_secs(60));
    env.wait_for_catch_up(Duration::from_secs(300)).await;
    assert_eq!(recovering.terminate(Duration::from_secs(60)), Some(0));
    let log = std::fs::read_to_string(&recovering.log).unwrap_or_default();
    (audit(env).await, ledger, log)
}

/// The numbers the recovering processor logged when it resolved the DLQ
/// index's intents without confirmation: (found delivered, not delivered).
fn resolved_intents(log: &str) -> (u64, u64) {
    let line = log
        .lines()
        .find(|line| line.contains("resolved dead-letter intents without confirmation"))
        .unwrap_or_else(|| panic!("no intent resolution in the log:\n{log}"));
    // Without the terminal colours, if any.
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            plain.push(c);
        }
    }
    let line = plain;
    let field = |name: &str| -> u64 {
        let start = line.find(&format!("{name}=")).expect(name) + name.len() + 1;
        line[start..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|digits| digits.parse().ok())
            .expect(name)
    };
    (field("found_delivered"), field("not_delivered"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_dead_letters_delivery_before_its_confirmation_dead_letters_nothing_twice(
) {
    let env = TestEnv::new("crashdlqok", 3).await;
    let (audit, ledger, log) = crash_and_recover_logged(&env, "after_dlq_delivery:2", &[]).await;
    eprintln!("{}", audit.render());
    assert_clean(&audit, &ledger);
    let (found, lost) = resolved_intents(&log);
    assert!(
        found > 0 && lost == 0,
        "found {found}, not delivered {lost}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_dead_letter_intent_before_the_produce_loses_no_dead_letter() {
    let env = TestEnv::new("crashdlqin", 3).await;
    let (audit, ledger, log) = crash_and_recover_logged(&env, "after_dlq_intent:2", &[]).await;
    eprintln!("{}", audit.render());
    assert_clean(&audit, &ledger);
    let (found, lost) = resolved_intents(&log);
    assert!(
        found == 0 && lost > 0,
        "found {found}, not delivered {lost}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_database_write_before_the_checkpoint_stores_nothing_twice() {
    let env = TestEnv::new("crashdb", 3).await;
    let (audit, ledger) = crash_and_recover(&env, "after_db_write:3", &[]).await;
    eprintln!("{}", audit.render());
    assert_clean(&audit, &ledger);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_checkpoint_before_the_kafka_commit_stores_nothing_twice() {
    let env = TestEnv::new("crashckpt", 3).await;
    let (audit, ledger) = crash_and_recover(&env, "after_checkpoint:2", &[]).await;
    eprintln!("{}", audit.render());
    assert_clean(&audit, &ledger);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_without_dedup_the_same_crash_shows_duplicates() {
    // The same crash with dedup off: the audit must see the replayed batch
    // twice. If it did not, the tests above would prove nothing.
    let env = TestEnv::new("nodedup", 3).await;
    let (audit, _) = crash_and_recover(
        &env,
        "after_db_write:3",
        &[("STREAM_UNSAFE_DISABLE_DEDUP", "true")],
    )
    .await;
    eprintln!("{}", audit.render());
    assert!(!audit.clean(), "{}", audit.render());
    assert!(audit.total.duplicated > 0, "{}", audit.render());
    assert_eq!(audit.total.missing, 0, "{}", audit.render());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processors_share_the_work_and_one_killed_hands_over_without_loss() {
    let env = TestEnv::new("twoproc", 6).await;
    let mut first = ProcessorProcess::start(&env, &[]);
    let mut second = ProcessorProcess::start(&env, &[]);
    first.wait_ready(Duration::from_secs(60));
    second.wait_ready(Duration::from_secs(60));
    let production = env.produce_in_background(100_000, 10_000, 0.01, 77);
    // Both members work: each has consumed something before one dies.
    wait_until(
        "both processors consuming",
        Duration::from_secs(120),
        || {
            let (a, b) = (
                first.metric("stream_events_consumed_total").unwrap_or(0.0),
                second.metric("stream_events_consumed_total").unwrap_or(0.0),
            );
            async move { a > 0.0 && b > 0.0 }
        },
    )
    .await;
    first.kill9();
    let ledger = production.await.expect("loadgen task");
    env.wait_for_catch_up(Duration::from_secs(300)).await;
    assert_eq!(second.terminate(Duration::from_secs(60)), Some(0));
    let audit = audit(&env).await;
    eprintln!("{}", audit.render());
    assert_clean(&audit, &ledger);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_three_with_rolling_sigkills_while_loadgen_runs_loses_nothing() {
    const EVENTS: u64 = 150_000;
    let env = TestEnv::new("rolling", 6).await;
    let ids = ["rolling-0", "rolling-1", "rolling-2"];
    let start = |id: &str| ProcessorProcess::start(&env, &[("KAFKA_GROUP_INSTANCE_ID", id)]);
    let mut members: Vec<ProcessorProcess> = ids.iter().map(|id| start(id)).collect();
    for member in &mut members {
        member.wait_ready(Duration::from_secs(60));
    }
    let production = env.produce_in_background(EVENTS, 6_000, 0.01, 303);
    // Two rounds: each member SIGKILLed once per round and restarted at
    // once with its own group.instance.id, at points spread over the run.
    let kills = 2 * ids.len();
    for kill in 0..kills {
        let target = (EVENTS as i64 * 8 / 10) * (kill as i64 + 1) / (kills as i64 + 1);
        let deadline = Instant::now() + Duration::from_secs(240);
        while stored(&env).await < target {
            assert!(
                Instant::now() < deadline,
                "kill {kill}: {target} rows never stored"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let index = kill % ids.len();
        members[index].kill9();
        members[index] = start(ids[index]);
        members[index].wait_ready(Duration::from_secs(60));
        eprintln!(
            "kill {}: {} SIGKILLed at {target} rows stored and restarted",
            kill + 1,
            ids[index]
        );
    }
    let ledger = production.await.expect("loadgen task");
    assert_eq!(ledger.sent, EVENTS);
    env.wait_for_catch_up(Duration::from_secs(300)).await;
    for member in &mut members {
        assert_eq!(member.terminate(Duration::from_secs(60)), Some(0));
    }
    let audit = audit(&env).await;
    eprintln!("{}", audit.render());
    assert_clean(&audit, &ledger);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_stopped_for_20s_pauses_intake_and_everything_arrives_afterwards() {
    let env = TestEnv::new("dbdown", 3).await;
    let mut processor = ProcessorProcess::start(&env, &[]);
    processor.wait_ready(Duration::from_secs(60));
    let production = env.produce_in_background(60_000, 2_000, 0.01, 9);
    wait_until("some rows stored", Duration::from_secs(60), || async {
        stored(&env).await > 5_000
    })
    .await;
    let rss_mb = |pid: u32| -> f64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find(|line| line.starts_with("VmRSS:"))
                    .and_then(|line| line.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
            .map(|kb| kb / 1024.0)
            .unwrap_or(0.0)
    };
    let mut clickhouse = Outage::begin("clickhouse");
    let outage = Instant::now();
    let rows_at_stop = stored(&env).await;
    let rss_at_stop = rss_mb(processor.child.id());
    let mut rss_max = rss_at_stop;
    // During the outage: the breaker opens, nothing passes the sink, no
    // valid event is dead-lettered, the process stays up and small.
    let mut breaker_opened = false;
    while outage.elapsed() < Duration::from_secs(20) {
        assert!(
            processor.child.try_wait().unwrap().is_none(),
            "processor died during the outage:\n{}",
            processor.log_tail()
        );
        breaker_opened |= processor
            .metric("stream_circuit_breaker_state")
            .is_some_and(|state| state >= 2.0);
        rss_max = rss_max.max(rss_mb(processor.child.id()));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        breaker_opened,
        "breaker never opened:\n{}",
        processor.log_tail()
    );
    let rows_during = stored(&env).await;
    // PostgreSQL may take the one batch in hand before ClickHouse fails it.
    assert!(
        rows_during - rows_at_stop <= 2 * 2000,
        "intake did not pause: {rows_at_stop} -> {rows_during}"
    );
    clickhouse.end();
    let ledger = production.await.expect("loadgen task");
    env.wait_for_catch_up(Duration::from_secs(300)).await;
    assert_eq!(
        processor.metric("stream_circuit_breaker_state"),
        Some(0.0),
        "breakers closed again"
    );
    assert_eq!(processor.terminate(Duration::from_secs(60)), Some(0));
    let audit = audit(&env).await;
    eprintln!("{}", audit.render());
    assert_clean(&audit, &ledger);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamctl_kill_restarts_from_the_checkpoint_and_past_the_intensity_the_process_exits_1() {
    let env = TestEnv::new("adminkill", 3).await;
    let mut processor = ProcessorProcess::start(
        &env,
        &[("MAX_RESTARTS", "2"), ("RESTART_WINDOW_SECS", "600")],
    );
    processor.wait_ready(Duration::from_secs(60));
    let ledger = env.produce(20_000, 0.01, 21).await;
    wait_until("some rows stored", Duration::from_secs(60), || async {
        stored(&env).await > 2_000
    })
    .await;
    let admin_args = processor.admin_args();
    let streamctl = |arguments: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_streamctl"))
            .args(arguments)
            .args(&admin_args)
            .output()
            .expect("streamctl runs")
    };
    // An actor kill: the supervisor restarts the pipeline from the checkpoint.
    let killed_at = now_seconds();
    let kill = streamctl(&["kill", "sink"]);
    assert!(kill.status.success(), "{kill:?}");
    assert_eq!(String::from_utf8_lossy(&kill.stdout).trim(), "killed sink");
    wait_until("generation 2 ready", Duration::from_secs(60), || {
        let status = http_get(&processor.admin, "/status");
        let ready = matches!(http_get(&processor.admin, "/readyz"), Ok((200, _)));
        async move {
            ready
                && status.is_ok_and(|(_, body)| {
                    serde_json::from_str::<serde_json::Value>(&body)
                        .is_ok_and(|json| json["generation"] == 2 && json["restarts"]["sink"] == 1)
                })
        }
    })
    .await;
    let restarted_at = now_seconds();
    wait_until(
        "a commit by the new generation",
        Duration::from_secs(60),
        || async { last_checkpoint_at(&env).await > restarted_at },
    )
    .await;
    eprintln!(
        "actor kill (sink): running again {:.2} s and first new commit {:.2} s after the kill",
        restarted_at - killed_at,
        now_seconds() - killed_at
    );
    let status = streamctl(&["status"]);
    assert!(status.status.success());
    assert!(String::from_utf8_lossy(&status.stdout).contains("\"ready\":true"));
    let unknown = streamctl(&["kill", "nobody"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stdout).contains("no actor named"));

    env.wait_for_catch_up(Duration::from_secs(120)).await;
    let audit = audit(&env).await;
    assert_clean(&audit, &ledger);

    // Restart intensity 2: the third failure escalates and the process exits 1.
    for actor in ["parser", "committer"] {
        wait_until(
            "ready before the next kill",
            Duration::from_secs(60),
            || {
                let ready = matches!(http_get(&processor.admin, "/readyz"), Ok((200, _)));
                async move { ready }
            },
        )
        .await;
        assert!(streamctl(&["kill", actor]).status.success());
    }
    assert_eq!(
        processor.wait_exit(Duration::from_secs(60)),
        Some(1),
        "{}",
        processor.log_tail()
    );
    assert!(processor.log_tail().contains("more than 2 restarts"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dlq_index_holds_intents_and_confirmations_and_is_pruned_below_the_checkpoint() {
    use std::collections::HashMap;
    use stream_actors::models::SourcePosition;
    use stream_actors::storage::{CheckpointStore, DlqIndex};
    let env = TestEnv::new("dlqindex", 2).await;
    let config = &env.config;
    let limit = Duration::from_secs(10);
    let checkpoints = CheckpointStore::connect(&config.postgres_url, limit)
        .await
        .expect("checkpoint store");
    let index = DlqIndex::connect(&config.postgres_url, limit, &config.group_id, &config.topic)
        .await
        .expect("dlq index");
    let at = |partition, offset| SourcePosition { partition, offset };
    index
        .intend(&[at(0, 5), at(0, 9), at(1, 3)], &[70, 80], &[])
        .await
        .expect("intend");
    // A second intent for a position keeps the first one's scan start; the
    // same statement confirms what was delivered before.
    index
        .intend(&[at(0, 9)], &[75, 85], &[at(0, 5)])
        .await
        .expect("intend");
    let everything = HashMap::from([(0, 0), (1, 0)]);
    let mut found: Vec<(i32, i64, bool, Vec<i64>)> = index
        .lookup(&everything)
        .await
        .expect("lookup")
        .into_iter()
        .map(|entry| {
            let SourcePosition { partition, offset } = entry.position;
            (partition, offset, entry.confirmed, entry.scan_from)
        })
        .collect();
    found.sort();
    assert_eq!(
        found,
        vec![
            (0, 5, true, vec![70, 80]),
            (0, 9, false, vec![70, 80]),
            (1, 3, false, vec![70, 80]),
        ]
    );
    // A floor leaves out what lies below it; another group sees nothing.
    let past = index
        .lookup(&HashMap::from([(0, 6)]))
        .await
        .expect("lookup");
    assert_eq!(past.len(), 1, "{past:?}");
    let other = DlqIndex::connect(&config.postgres_url, limit, "another-group", &config.topic)
        .await
        .expect("dlq index");
    assert!(other.lookup(&everything).await.expect("lookup").is_empty());
    // Confirming on its own (a look-up's), then forgetting: only
    // unconfirmed intents go.
    index.confirm(&[at(0, 5)]).await.expect("confirm");
    index.forget(&[at(0, 5), at(1, 3)]).await.expect("forget");
    assert_eq!(index.lookup(&everything).await.expect("lookup").len(), 2);
    // Pruning drops what the checkpoint has passed.
    checkpoints
        .persist(&config.group_id, &config.topic, &[(0, 6)])
        .await
        .expect("persist");
    assert_eq!(index.prune().await.expect("prune"), 1);
    let left = index.lookup(&everything).await.expect("lookup");
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].position, at(0, 9));
}
