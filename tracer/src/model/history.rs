//! Memory over time: each traced process's live bytes, sampled through the whole trace, for the charts of
//! reports. Bounded: past [`MAX_POINTS`] samples a process keeps every other one and samples half as often, so
//! a trace of days costs as much as one of minutes and still spans its whole length.

use std::collections::BTreeMap;

use serde::Serialize;

/// Most samples kept per process.
pub const MAX_POINTS: usize = 1024;

/// One process's live bytes over the trace.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ProcessMemory {
    pub pid: u32,
    /// Oldest first.
    pub samples: Vec<MemorySample>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct MemorySample {
    /// Seconds since the trace began.
    pub seconds: f64,
    pub live_bytes: u64,
}

/// Samples as they are taken: (`bpf_ktime_get_ns` time, live bytes) per pid.
#[derive(Clone, Debug, Default)]
pub struct History {
    processes: BTreeMap<u32, Points>,
}

#[derive(Clone, Debug, Default)]
struct Points {
    points: Vec<(u64, u64)>,
    /// Keeps one offered sample in this many (doubled at each thinning).
    stride: u64,
    offered: u64,
}

impl History {
    /// Records `pid`'s live bytes at `at_ns`.
    pub fn record(&mut self, at_ns: u64, pid: u32, live_bytes: u64) {
        let p = self.processes.entry(pid).or_insert(Points {
            stride: 1,
            ..Points::default()
        });
        p.offered += 1;
        if !(p.offered - 1).is_multiple_of(p.stride) {
            return;
        }
        if p.points.len() == MAX_POINTS {
            let kept: Vec<(u64, u64)> = p.points.iter().copied().step_by(2).collect();
            p.points = kept;
            p.stride *= 2;
            p.offered = 1;
        }
        p.points.push((at_ns, live_bytes));
    }

    /// Records a last sample, whatever the stride: the value at the trace's end. Samples taken after that end
    /// (the trace ends when its last target exits, and was read for a while after) go, so that time only moves
    /// forward.
    pub fn record_last(&mut self, at_ns: u64, pid: u32, live_bytes: u64) {
        let p = self.processes.entry(pid).or_insert(Points {
            stride: 1,
            ..Points::default()
        });
        p.points.retain(|&(at, _)| at <= at_ns);
        p.points.push((at_ns, live_bytes));
    }

    /// Drops what was recorded of `pid`: the agent, which runs for days, keeps no gone process's history.
    pub fn forget(&mut self, pid: u32) {
        self.processes.remove(&pid);
    }

    /// Every process's samples, as seconds since `start_ns`.
    pub fn by_process(&self, start_ns: u64) -> Vec<ProcessMemory> {
        self.processes
            .iter()
            .map(|(&pid, p)| ProcessMemory {
                pid,
                samples: p
                    .points
                    .iter()
                    .map(|&(at, live_bytes)| MemorySample {
                        seconds: at.saturating_sub(start_ns) as f64 / 1e9,
                        live_bytes,
                    })
                    .collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_kept_in_order_per_process() {
        let mut h = History::default();
        h.record(1_000_000_000, 7, 10);
        h.record(1_000_000_000, 8, 20);
        h.record(2_000_000_000, 7, 30);
        h.record_last(2_500_000_000, 7, 40);
        let by = h.by_process(1_000_000_000);
        assert_eq!(by.len(), 2);
        assert_eq!(by[0].pid, 7);
        let points: Vec<(f64, u64)> = by[0]
            .samples
            .iter()
            .map(|s| (s.seconds, s.live_bytes))
            .collect();
        assert_eq!(points, [(0.0, 10), (1.0, 30), (1.5, 40)]);
    }

    #[test]
    fn samples_taken_after_the_end_go_with_the_last_one() {
        let mut h = History::default();
        h.record(1_000_000_000, 7, 10);
        h.record(3_000_000_000, 7, 30);
        h.record_last(2_000_000_000, 7, 20);
        let points: Vec<(f64, u64)> = h.by_process(1_000_000_000)[0]
            .samples
            .iter()
            .map(|s| (s.seconds, s.live_bytes))
            .collect();
        assert_eq!(points, [(0.0, 10), (1.0, 20)]);
    }

    #[test]
    fn a_long_trace_is_thinned_but_spans_its_whole_length() {
        let mut h = History::default();
        let n = 10 * MAX_POINTS as u64;
        for i in 0..n {
            h.record(i, 1, i);
        }
        let samples = &h.by_process(0)[0].samples;
        assert!(samples.len() <= MAX_POINTS, "{}", samples.len());
        assert!(samples.len() >= MAX_POINTS / 2, "{}", samples.len());
        assert_eq!(samples[0].live_bytes, 0);
        let last = samples.last().unwrap().live_bytes;
        assert!(last >= n - 16, "{last}");
        // Evenly spaced: every gap is the same stride.
        let gaps: Vec<u64> = samples
            .windows(2)
            .map(|w| w[1].live_bytes - w[0].live_bytes)
            .collect();
        assert!(gaps.windows(2).all(|g| g[0] == g[1]), "{gaps:?}");
    }
}
