//! The consumer's place in its group, as librdkafka's statistics report it
//! (the `cgrp` object, every `statistics.interval.ms`), and what readiness
//! makes of it.
//!
//! A processor is ready when it consumes: it has joined the group and holds
//! partitions, or it is a settled member with none because the group has
//! more members than the topic has partitions. It is not ready while it
//! joins, while it waits for its partitions, or when the consumer has
//! stopped polling (no statistics for [`SILENT_AFTER`]).
//!
//! A settled member with no partitions is asked about once more: under the
//! cooperative protocol a new member is settled, empty-handed, between the
//! round that admits it and the round that hands it the partitions the
//! others gave up. [`current`] tells the two apart by asking the
//! coordinator how many members the group has ([`settle_unassigned`]).
//!
//! A member that holds partitions stays ready through a rebalance: under the
//! cooperative-sticky assignor it keeps consuming what it keeps while the
//! group moves the rest. So a scale-out (a new member joins, every member
//! rebalances) turns no existing pod unready; only the new pod is unready,
//! until its partitions arrive.

use std::fmt;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};

use super::CheckpointingContext;
use crate::committer::REVOKE_DRAIN_DEADLINE;

/// No statistics for this long means the consumer is not polling: a
/// revocation settles for at most [`REVOKE_DRAIN_DEADLINE`] (plus the call's
/// own 2 s margin) inside a poll, and statistics come every second otherwise.
pub const SILENT_AFTER: Duration = Duration::from_secs(REVOKE_DRAIN_DEADLINE.as_secs() + 5);

/// librdkafka's group state in its last statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupState {
    /// The group handler's state (`up` once the coordinator is known).
    pub state: String,
    /// Its join state (`steady` between rebalances; `wait-join`,
    /// `wait-sync`, `wait-assign-call`, ... during one).
    pub join_state: String,
    /// Partitions assigned to this member now.
    pub partitions: i32,
    /// Partitions of the source topic.
    pub topic_partitions: usize,
    /// When these statistics arrived.
    pub seen: Instant,
}

/// What the last group state says about this member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// No statistics yet: the client is new, or there is none.
    Unknown,
    /// Holds partitions; `rebalancing` while the group rebalances (it keeps
    /// consuming what it holds).
    Consuming {
        /// Partitions held.
        partitions: i32,
        /// Whether a rebalance is under way.
        rebalancing: bool,
    },
    /// A settled member with no partitions, not yet told why (see
    /// [`settle_unassigned`]): not ready.
    Unassigned {
        /// Partitions of the source topic.
        topic_partitions: usize,
    },
    /// A settled member with no partitions: the group has more members than
    /// the topic has partitions.
    Idle {
        /// Members of the group.
        members: usize,
        /// Partitions of the source topic.
        topic_partitions: usize,
    },
    /// A settled member with no partitions in a group with no more members
    /// than partitions: its partitions are on their way (the next
    /// cooperative round), or the group is rebalancing.
    AwaitingPartitions {
        /// What the coordinator said of the group.
        group: String,
    },
    /// Joining the group, or waiting for its assignment.
    Joining {
        /// librdkafka's group state.
        state: String,
        /// librdkafka's join state.
        join_state: String,
    },
    /// No statistics for this long: the consumer is not polling.
    Silent(Duration),
}

impl Membership {
    /// What `state`, last seen at `state.seen`, says at `now`.
    pub fn of(state: Option<&GroupState>, now: Instant) -> Membership {
        let Some(state) = state else {
            return Membership::Unknown;
        };
        let age = now.saturating_duration_since(state.seen);
        if age > SILENT_AFTER {
            return Membership::Silent(age);
        }
        let steady = state.state == "up" && state.join_state == "steady";
        if state.partitions > 0 {
            Membership::Consuming {
                partitions: state.partitions,
                rebalancing: !steady,
            }
        } else if steady {
            Membership::Unassigned {
                topic_partitions: state.topic_partitions,
            }
        } else {
            Membership::Joining {
                state: state.state.clone(),
                join_state: state.join_state.clone(),
            }
        }
    }

    /// Whether the member consumes (or stands by, settled, with nothing to
    /// consume): readiness.
    pub fn ready(&self) -> bool {
        matches!(self, Membership::Consuming { .. } | Membership::Idle { .. })
    }

    /// Partitions held (0 unless consuming).
    pub fn partitions(&self) -> i32 {
        match self {
            Membership::Consuming { partitions, .. } => *partitions,
            _ => 0,
        }
    }
}

impl fmt::Display for Membership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Membership::Unknown => write!(f, "not in the group yet (no group state reported)"),
            Membership::Consuming {
                partitions,
                rebalancing: false,
            } => write!(f, "consuming {partitions} partition(s)"),
            Membership::Consuming {
                partitions,
                rebalancing: true,
            } => write!(
                f,
                "consuming {partitions} partition(s) while the group rebalances"
            ),
            Membership::Unassigned { .. } => {
                write!(f, "a settled member with no partitions (not yet asked why)")
            }
            Membership::Idle {
                members,
                topic_partitions,
            } => write!(
                f,
                "standing by with no partitions: the group has {members} members for {topic_partitions} partitions"
            ),
            Membership::AwaitingPartitions { group } => {
                write!(f, "waiting for its partitions ({group})")
            }
            Membership::Joining { state, join_state } => write!(
                f,
                "joining the group, no partitions yet (group state {state}, join state {join_state})"
            ),
            Membership::Silent(age) => write!(
                f,
                "no group state for {:.0} s: the consumer is not polling",
                age.as_secs_f64()
            ),
        }
    }
}

/// How long the coordinator may take to describe the group.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(2);

/// This member's place in `group_id`, asking the coordinator when it is
/// settled with no partitions. Blocking (at most [`DESCRIBE_TIMEOUT`]).
pub fn current(client: &BaseConsumer<CheckpointingContext>, group_id: &str) -> Membership {
    let membership = client.context().membership();
    let Membership::Unassigned { topic_partitions } = membership else {
        return membership;
    };
    let described = client
        .fetch_group_list(Some(group_id), DESCRIBE_TIMEOUT)
        .map_err(|error| error.to_string())
        .and_then(|list| {
            // Each broker answers for the group; only its coordinator knows
            // the members (the others answer with an error and none).
            list.groups()
                .iter()
                .filter(|group| group.name() == group_id)
                .max_by_key(|group| group.members().len())
                .map(|group| (group.state().to_string(), group.members().len()))
                .ok_or_else(|| format!("the coordinator does not know group {group_id}"))
        });
    settle_unassigned(described, topic_partitions)
}

/// A settled member with no partitions, given what the coordinator said of
/// the group (its state and member count, or why it could not say): idle,
/// and ready, only in a stable group with more members than partitions.
pub fn settle_unassigned(
    described: Result<(String, usize), String>,
    topic_partitions: usize,
) -> Membership {
    match described {
        _ if topic_partitions == 0 => Membership::AwaitingPartitions {
            group: "the topic's partitions are not known yet".to_string(),
        },
        Ok((state, members)) if state == "Stable" && members > topic_partitions => {
            Membership::Idle {
                members,
                topic_partitions,
            }
        }
        Ok((state, members)) => Membership::AwaitingPartitions {
            group: format!(
                "group {state} with {members} members for {topic_partitions} partitions"
            ),
        },
        Err(reason) => Membership::AwaitingPartitions {
            group: format!("the group could not be described: {reason}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(state: &str, join_state: &str, partitions: i32, seen: Instant) -> GroupState {
        GroupState {
            state: state.to_string(),
            join_state: join_state.to_string(),
            partitions,
            topic_partitions: 6,
            seen,
        }
    }

    #[test]
    fn a_member_is_ready_when_it_holds_partitions_or_stands_by_settled() {
        let now = Instant::now();
        let consuming = Membership::of(Some(&state("up", "steady", 3, now)), now);
        assert_eq!(
            consuming,
            Membership::Consuming {
                partitions: 3,
                rebalancing: false
            }
        );
        assert!(consuming.ready());
        assert_eq!(consuming.partitions(), 3);
        let unassigned = Membership::of(Some(&state("up", "steady", 0, now)), now);
        assert_eq!(
            unassigned,
            Membership::Unassigned {
                topic_partitions: 6
            }
        );
        assert!(!unassigned.ready());
        let idle = settle_unassigned(Ok(("Stable".to_string(), 7)), 6);
        assert!(idle.ready(), "{idle}");
        assert!(idle.to_string().contains("7 members for 6 partitions"));
    }

    #[test]
    fn a_settled_member_without_partitions_in_a_small_group_waits_for_them() {
        // Between the cooperative round that admits a new member and the one
        // that hands it partitions, it is settled with none.
        for described in [
            Ok(("Stable".to_string(), 2)),
            Ok(("Stable".to_string(), 6)),
            Ok(("PreparingRebalance".to_string(), 7)),
            Err("timed out".to_string()),
        ] {
            let membership = settle_unassigned(described.clone(), 6);
            assert!(!membership.ready(), "{described:?}: {membership}");
            assert!(membership
                .to_string()
                .starts_with("waiting for its partitions"));
        }
    }

    #[test]
    fn a_member_holding_partitions_stays_ready_through_a_rebalance() {
        let now = Instant::now();
        for join_state in [
            "wait-join",
            "wait-sync",
            "wait-assign-call",
            "wait-unassign-call",
        ] {
            let membership = Membership::of(Some(&state("up", join_state, 2, now)), now);
            assert!(membership.ready(), "{join_state}: {membership}");
            assert!(membership.to_string().contains("rebalances"));
        }
    }

    #[test]
    fn joining_waiting_for_partitions_or_not_polling_is_not_ready() {
        let now = Instant::now();
        assert!(!Membership::of(None, now).ready());
        for (group_state, join_state) in [
            ("init", "init"),
            ("wait-coord", "init"),
            ("up", "wait-join"),
            ("up", "wait-sync"),
            ("up", "wait-assign-call"),
        ] {
            let membership = Membership::of(Some(&state(group_state, join_state, 0, now)), now);
            assert!(!membership.ready(), "{group_state}/{join_state}");
            assert!(membership.to_string().contains(join_state), "{membership}");
        }
        let seen = now - SILENT_AFTER - Duration::from_secs(1);
        let silent = Membership::of(Some(&state("up", "steady", 6, seen)), now);
        assert!(matches!(silent, Membership::Silent(_)));
        assert!(!silent.ready());
        assert!(silent.to_string().contains("not polling"), "{silent}");
    }
}
