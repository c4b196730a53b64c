//! When the agent escalates a container from its watch tier to the exact tier (allocator uprobes), and which
//! processes get them. Pure: each tick it is handed every watched container's memory cgroup usage and limit (the
//! same numbers `/metrics` exports) and the time, and answers which containers to escalate and which to relax;
//! [`assign`] then says which processes get the uprobes, bounded in number host-wide.
//!
//! A container escalates past `--escalate-at` percent of its limit, or when it grew faster than
//! `--escalate-rate` over the last [`WINDOW`] (the only trigger for a container without a limit). It relaxes
//! once it has been escalated for [`MIN_ESCALATED`] and is both [`HYSTERESIS_POINTS`] below the threshold and
//! growing at under half the rate: a container hovering at the threshold does not attach and detach every tick.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    time::{Duration, Instant},
};

use super::metrics::Memory;

/// Growth is measured over this long: what a container grew within it, divided by it.
pub const WINDOW: Duration = Duration::from_secs(10);
/// A container stays escalated at least this long: its processes' uprobes see what it does next.
pub const MIN_ESCALATED: Duration = Duration::from_secs(10);
/// Percentage points below `--escalate-at` a container must fall to relax.
pub const HYSTERESIS_POINTS: u32 = 10;

/// When containers escalate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// Percent of the memory cgroup's limit (`--escalate-at`).
    pub at_percent: u32,
    /// Bytes per second of growth over [`WINDOW`] (`--escalate-rate`).
    pub rate: u64,
}

/// What a container's memory cgroup says at a tick, as the log lines give it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reading {
    pub usage: u64,
    pub limit: Option<u64>,
    /// Growth over the last [`WINDOW`], per second (negative when it shrank).
    pub rate: f64,
}

impl Reading {
    /// Usage in percent of the limit; `None` without one.
    pub fn percent(&self) -> Option<f64> {
        self.limit
            .filter(|&limit| limit > 0)
            .map(|limit| self.usage as f64 * 100.0 / limit as f64)
    }
}

/// Why a container escalated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// Past `--escalate-at` percent of its limit.
    Limit,
    /// Growing faster than `--escalate-rate`.
    Rate,
}

/// A container's change at a tick, by its key (the container id).
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub container: String,
    pub reading: Reading,
}

/// What a tick decided.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decisions {
    pub escalate: Vec<(Change, Trigger)>,
    /// Containers that fell back, and containers gone (their reading the last one seen).
    pub relax: Vec<Change>,
}

/// One container's recent usage and escalation.
struct Tracked {
    /// `(time, usage)` over the last [`WINDOW`], oldest first.
    samples: VecDeque<(Instant, u64)>,
    escalated_since: Option<Instant>,
    last: Reading,
}

pub struct Policy {
    thresholds: Thresholds,
    containers: HashMap<String, Tracked>,
}

impl Policy {
    pub fn new(thresholds: Thresholds) -> Self {
        Self {
            thresholds,
            containers: HashMap::new(),
        }
    }

    /// Takes every watched container's memory cgroup at `now` (by container id); a container missing from
    /// `memory` is gone: relaxed if it was escalated, and forgotten.
    pub fn tick(&mut self, now: Instant, memory: &HashMap<String, Memory>) -> Decisions {
        let mut decisions = Decisions::default();
        self.containers.retain(|key, tracked| {
            if memory.contains_key(key) {
                return true;
            }
            if tracked.escalated_since.is_some() {
                decisions.relax.push(Change {
                    container: key.clone(),
                    reading: tracked.last,
                });
            }
            false
        });
        let Thresholds { at_percent, rate } = self.thresholds;
        for (key, memory) in memory {
            let tracked = self.containers.entry(key.clone()).or_insert(Tracked {
                samples: VecDeque::new(),
                escalated_since: None,
                last: Reading {
                    usage: memory.usage,
                    limit: memory.limit,
                    rate: 0.0,
                },
            });
            while tracked
                .samples
                .front()
                .is_some_and(|&(at, _)| now.duration_since(at) > WINDOW)
            {
                tracked.samples.pop_front();
            }
            tracked.samples.push_back((now, memory.usage));
            // What it grew within the window, over the whole window: a young container's rate is never
            // overestimated from one short step.
            let oldest = tracked.samples.front().map_or(memory.usage, |&(_, u)| u);
            let reading = Reading {
                usage: memory.usage,
                limit: memory.limit,
                rate: (memory.usage as f64 - oldest as f64) / WINDOW.as_secs_f64(),
            };
            tracked.last = reading;
            let percent = reading.percent();
            let change = || Change {
                container: key.clone(),
                reading,
            };
            match tracked.escalated_since {
                None => {
                    let trigger = if percent.is_some_and(|p| p >= f64::from(at_percent)) {
                        Some(Trigger::Limit)
                    } else if reading.rate >= rate as f64 {
                        Some(Trigger::Rate)
                    } else {
                        None
                    };
                    if let Some(trigger) = trigger {
                        tracked.escalated_since = Some(now);
                        decisions.escalate.push((change(), trigger));
                    }
                }
                Some(since) => {
                    let floor = f64::from(at_percent.saturating_sub(HYSTERESIS_POINTS));
                    let below = percent.is_none_or(|p| p < floor);
                    let slow = reading.rate < rate as f64 / 2.0;
                    if now.duration_since(since) >= MIN_ESCALATED && below && slow {
                        tracked.escalated_since = None;
                        decisions.relax.push(change());
                    }
                }
            }
        }
        // One order from tick to tick, whatever the map's.
        decisions
            .escalate
            .sort_by(|a, b| a.0.container.cmp(&b.0.container));
        decisions
            .relax
            .sort_by(|a, b| a.container.cmp(&b.container));
        decisions
    }

    /// The containers escalated now, by key.
    pub fn escalated(&self) -> HashSet<&str> {
        self.containers
            .iter()
            .filter(|(_, tracked)| tracked.escalated_since.is_some())
            .map(|(key, _)| key.as_str())
            .collect()
    }
}

/// A watched process, as [`assign`] weighs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub pid: u32,
    /// Its container's key.
    pub container: &'a str,
    pub resident_bytes: u64,
    /// It has the uprobes now.
    pub escalated: bool,
}

/// Which processes get the uprobes, and which lose them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assignment {
    /// Per container (in order of its biggest process), the pids to attach to.
    pub attach: Vec<(String, Vec<u32>)>,
    /// Escalated processes whose container is not escalated (any more).
    pub detach: Vec<u32>,
    /// Per container, processes left out because `max` processes have the uprobes.
    pub capped: Vec<(String, Vec<u32>)>,
}

/// Gives the uprobes to the biggest processes (by resident bytes) of the escalated containers, at most `max`
/// processes at once host-wide; an escalated process keeps them while its container is escalated, and loses
/// them when it is not.
pub fn assign(candidates: &[Candidate<'_>], escalated: &HashSet<&str>, max: usize) -> Assignment {
    let mut assignment = Assignment::default();
    let mut kept = 0;
    let mut wanted: Vec<&Candidate<'_>> = Vec::new();
    for candidate in candidates {
        match (candidate.escalated, escalated.contains(candidate.container)) {
            (true, true) => kept += 1,
            (true, false) => assignment.detach.push(candidate.pid),
            (false, true) => wanted.push(candidate),
            (false, false) => {}
        }
    }
    wanted.sort_by_key(|c| (std::cmp::Reverse(c.resident_bytes), c.pid));
    let budget = max.saturating_sub(kept);
    let group = |groups: &mut Vec<(String, Vec<u32>)>, candidate: &Candidate<'_>| match groups
        .iter_mut()
        .find(|(container, _)| container == candidate.container)
    {
        Some((_, pids)) => pids.push(candidate.pid),
        None => groups.push((candidate.container.to_owned(), vec![candidate.pid])),
    };
    for (index, candidate) in wanted.into_iter().enumerate() {
        if index < budget {
            group(&mut assignment.attach, candidate);
        } else {
            group(&mut assignment.capped, candidate);
        }
    }
    assignment.detach.sort_unstable();
    assignment
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn policy() -> Policy {
        Policy::new(Thresholds {
            at_percent: 80,
            rate: 64 * MIB,
        })
    }

    fn memory(entries: &[(&str, u64, Option<u64>)]) -> HashMap<String, Memory> {
        entries
            .iter()
            .map(|&(key, usage, limit)| (key.to_owned(), Memory { usage, limit }))
            .collect()
    }

    fn keys(changes: &[Change]) -> Vec<&str> {
        changes.iter().map(|c| c.container.as_str()).collect()
    }

    fn escalated(decisions: &Decisions) -> Vec<(&str, Trigger)> {
        decisions
            .escalate
            .iter()
            .map(|(c, t)| (c.container.as_str(), *t))
            .collect()
    }

    #[test]
    fn a_container_escalates_at_the_percent_of_its_limit_and_relaxes_ten_points_below_after_ten_seconds()
     {
        let mut policy = policy();
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let limit = Some(100 * MIB);
        assert_eq!(
            policy.tick(at(0), &memory(&[("a", 79 * MIB, limit)])),
            Decisions::default()
        );
        let decisions = policy.tick(at(1), &memory(&[("a", 80 * MIB, limit)]));
        assert_eq!(escalated(&decisions), [("a", Trigger::Limit)]);
        assert_eq!(decisions.escalate[0].0.reading.percent(), Some(80.0));
        assert_eq!(policy.escalated(), HashSet::from(["a"]));
        // Escalated once: not again while it stays up.
        assert_eq!(
            policy.tick(at(2), &memory(&[("a", 90 * MIB, limit)])),
            Decisions::default()
        );
        // Below the threshold but within ten points of it: it stays.
        assert_eq!(
            policy.tick(at(12), &memory(&[("a", 71 * MIB, limit)])),
            Decisions::default()
        );
        // Ten points below, but escalated for less than ten seconds: it would, had it been longer.
        let mut young = self::policy();
        young.tick(at(0), &memory(&[("a", 80 * MIB, limit)]));
        assert_eq!(
            young.tick(at(9), &memory(&[("a", 10 * MIB, limit)])),
            Decisions::default()
        );
        let decisions = young.tick(at(10), &memory(&[("a", 10 * MIB, limit)]));
        assert_eq!(keys(&decisions.relax), ["a"]);
        // The first policy relaxes below 70 %, once its usage has stopped falling fast.
        let decisions = policy.tick(at(13), &memory(&[("a", 69 * MIB, limit)]));
        assert_eq!(keys(&decisions.relax), ["a"]);
        assert!(policy.escalated().is_empty());
        // And escalates again past the threshold.
        let decisions = policy.tick(at(14), &memory(&[("a", 85 * MIB, limit)]));
        assert_eq!(escalated(&decisions), [("a", Trigger::Limit)]);
    }

    #[test]
    fn growth_faster_than_the_rate_over_ten_seconds_escalates_a_container_without_a_limit() {
        let mut policy = policy();
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        // 600 MiB in ten seconds is 60 MiB/s: under 64.
        for s in 0..=10 {
            let decisions = policy.tick(at(s), &memory(&[("a", s * 60 * MIB, None)]));
            assert_eq!(decisions, Decisions::default(), "at {s} s");
        }
        // 64 MiB/s over the last ten seconds: 640 MiB grown since the sample ten seconds ago.
        let decisions = policy.tick(at(11), &memory(&[("a", 60 * MIB + 640 * MIB, None)]));
        assert_eq!(escalated(&decisions), [("a", Trigger::Rate)]);
        assert_eq!(decisions.escalate[0].0.reading.rate, (64 * MIB) as f64);
        // A young container's one big step is measured over the whole window: 300 MiB in its first
        // second is 30 MiB/s, not 300.
        let mut young = self::policy();
        young.tick(at(0), &memory(&[("b", 0, None)]));
        assert_eq!(
            young.tick(at(1), &memory(&[("b", 300 * MIB, None)])),
            Decisions::default()
        );
        // Still growing at half the rate: it stays; slower, it relaxes (no limit to be under).
        let mut usage = 700 * MIB;
        for s in 12..=21 {
            usage += 32 * MIB;
            let decisions = policy.tick(at(s), &memory(&[("a", usage, None)]));
            assert_eq!(decisions, Decisions::default(), "at {s} s");
        }
        let mut relaxed = None;
        for s in 22..=40 {
            usage += 16 * MIB;
            let decisions = policy.tick(at(s), &memory(&[("a", usage, None)]));
            if !decisions.relax.is_empty() {
                relaxed = Some(s);
                break;
            }
        }
        // Once the last ten seconds average under 32 MiB/s.
        assert_eq!(relaxed, Some(22));
    }

    #[test]
    fn a_fast_growing_container_under_its_limit_escalates_and_one_near_its_limit_stays_while_it_grows()
     {
        let mut policy = policy();
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let limit = Some(10_000 * MIB);
        policy.tick(at(0), &memory(&[("a", 0, limit)]));
        let decisions = policy.tick(at(10), &memory(&[("a", 700 * MIB, limit)]));
        assert_eq!(escalated(&decisions), [("a", Trigger::Rate)]);
        // Far under its limit, but still growing at over half the rate: it stays.
        let decisions = policy.tick(at(20), &memory(&[("a", 1100 * MIB, limit)]));
        assert_eq!(decisions, Decisions::default());
        let decisions = policy.tick(at(30), &memory(&[("a", 1100 * MIB, limit)]));
        assert_eq!(keys(&decisions.relax), ["a"]);
    }

    #[test]
    fn a_container_that_is_gone_is_relaxed_and_forgotten() {
        let mut policy = policy();
        let now = Instant::now();
        let limit = Some(100 * MIB);
        policy.tick(
            now,
            &memory(&[("a", 90 * MIB, limit), ("b", 10 * MIB, limit)]),
        );
        let decisions = policy.tick(now + Duration::from_secs(1), &memory(&[]));
        assert_eq!(keys(&decisions.relax), ["a"], "b was never escalated");
        assert_eq!(decisions.relax[0].reading.usage, 90 * MIB);
        assert!(policy.escalated().is_empty());
    }

    fn candidate(pid: u32, container: &str, mib: u64, escalated: bool) -> Candidate<'_> {
        Candidate {
            pid,
            container,
            resident_bytes: mib * MIB,
            escalated,
        }
    }

    #[test]
    fn the_biggest_processes_of_escalated_containers_get_the_uprobes_up_to_the_bound() {
        let candidates = [
            candidate(1, "a", 10, false),
            candidate(2, "a", 300, false),
            candidate(3, "b", 200, false),
            candidate(4, "b", 5, false),
            candidate(5, "c", 999, false),
        ];
        let assignment = assign(&candidates, &HashSet::from(["a", "b"]), 3);
        assert_eq!(
            assignment,
            Assignment {
                attach: vec![("a".into(), vec![2, 1]), ("b".into(), vec![3])],
                detach: vec![],
                capped: vec![("b".into(), vec![4])],
            }
        );
    }

    #[test]
    fn escalated_processes_keep_their_place_and_lose_it_with_their_container() {
        let candidates = [
            candidate(1, "a", 10, true),
            candidate(2, "a", 300, false),
            candidate(3, "b", 200, true),
            candidate(4, "b", 500, false),
        ];
        // b relaxed: 3 loses the uprobes, and its place goes to a's next biggest.
        let assignment = assign(&candidates, &HashSet::from(["a"]), 2);
        assert_eq!(
            assignment,
            Assignment {
                attach: vec![("a".into(), vec![2])],
                detach: vec![3],
                capped: vec![],
            }
        );
        // Both escalated and the bound reached: a bigger newcomer waits, nobody is taken off.
        let assignment = assign(&candidates, &HashSet::from(["a", "b"]), 2);
        assert_eq!(
            assignment,
            Assignment {
                attach: vec![],
                detach: vec![],
                capped: vec![("b".into(), vec![4]), ("a".into(), vec![2])],
            }
        );
    }
}
