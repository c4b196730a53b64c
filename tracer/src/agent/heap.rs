//! The agent's heap profile, served at `/debug/pprof/heap`: what each watched process's pages hold, by the stack
//! that made them resident, labelled with its process, container and Airflow task. It is rebuilt at every tick
//! from the watch tier's ledger, bounded to [`WATCH_STACKS`](crate::trace::WATCH_STACKS) stacks per process,
//! and is the profile Grafana Alloy's `pyroscope.scrape` and the Parca server scrape.

use crate::{
    output::profile::{Labels, Profile, ProfileSample, Values},
    trace::WatchTick,
};

/// The profile of one tick. Values are the ledger's estimates (each sampled page counts for the pages it
/// stands for); `inuse_objects` counts pages.
pub fn profile(tick: &WatchTick, fault_every: u32) -> Profile {
    let mut samples = Vec::new();
    for process in &tick.processes {
        let labels = Labels {
            pid: process.pid,
            comm: process.comm.clone(),
            kind: "page",
            container: process
                .container
                .as_ref()
                .map(|c| c.name.clone().unwrap_or_else(|| c.id.clone())),
            container_id: process.container.as_ref().map(|c| c.id.clone()),
            dag_id: process.task.as_ref().map(|t| t.dag_id.clone()),
            task_id: process.task.as_ref().map(|t| t.task_id.clone()),
        };
        samples.extend(process.stacks.iter().map(|stack| ProfileSample {
            frames: stack.stack.clone(),
            labels: labels.clone(),
            values: Values {
                inuse_bytes: stack.live_bytes,
                inuse_objects: stack.live_count,
                ..Values::default()
            },
            verdict: None,
        }));
    }
    let mut profile = Profile {
        samples,
        alloc_known: false,
        ..Profile::default()
    };
    let held = profile.totals().inuse_bytes;
    profile.title = format!(
        "alloctrace agent: {held} bytes made resident by {} watched processes (one write fault in {fault_every} sampled)",
        tick.processes.len()
    );
    profile
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        output::profile::tests::native,
        report::oom::TopStack,
        trace::{WatchTick, WatchedProcess},
    };

    #[test]
    fn each_stack_of_each_process_is_a_sample_with_its_labels() {
        let stack = |bytes: u64, function: &str| TopStack {
            live_bytes: bytes,
            live_count: bytes / 4096,
            stack: vec![native(Some(function), "/usr/bin/python3", 0x1000)],
        };
        let tick = WatchTick {
            processes: vec![WatchedProcess {
                pid: 42,
                comm: "python3".to_owned(),
                container: None,
                task: None,
                resident_bytes: 3 << 20,
                escalated: false,
                stacks: vec![stack(2 << 20, "hog"), stack(1 << 20, "load")],
            }],
            lost_events: 0,
        };
        let profile = profile(&tick, 16);
        assert_eq!(profile.samples.len(), 2);
        assert_eq!(profile.totals().inuse_bytes, 3 << 20);
        assert_eq!(profile.totals().inuse_objects, 768);
        assert!(!profile.alloc_known);
        let first = &profile.samples[0];
        assert_eq!(
            (first.labels.pid, first.labels.comm.as_str()),
            (42, "python3")
        );
        assert_eq!(first.frames[0].function.as_deref(), Some("hog"));
        assert!(profile.title.contains("3145728 bytes"), "{}", profile.title);
    }
}
