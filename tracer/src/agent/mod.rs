//! `alloctrace agent`: the host's always-on process. It runs the session's watch tier (no uprobes: sampled page
//! faults and the mapping calls, see [`crate::trace::watch`]) over every container's processes, or those a
//! selector names, until SIGTERM or SIGINT; writes a post-mortem file (and its flame graph) for each OOM kill of
//! a watched process; and serves `/metrics`, `/debug/pprof/heap` and `/healthz` over HTTP. A container near its
//! memory limit, or growing fast, is escalated to the exact tier: its biggest processes get the allocator
//! uprobes until it falls back ([`escalation`]), and an escalated victim's post-mortem names what they saw. It
//! says one line on stderr per notable event: ready, a container seen, an escalation and its end, an OOM kill,
//! events lost; and, on `--ready-fd`, a JSON line for each that a supervisor or test waits on (ready, an
//! escalation and its end, each post-mortem file written).

pub mod escalation;
pub mod heap;
pub mod http;
pub mod metrics;

use std::{
    collections::{HashMap, HashSet},
    fs,
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    os::{self, EscalationCause, FileKind, RelaxCause},
    output::{Format, flamegraph, profile::Profile},
    procs::container::Container,
    report::oom::OomRecord,
    trace::{self, Escalate, TraceConfig, Watch, WatchTick},
};
use escalation::{Candidate, Change, Policy, Thresholds, Trigger};
use metrics::{Memory, Metrics};

/// What the agent runs with, besides the processes it watches.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Where post-mortem files go.
    pub dir: PathBuf,
    pub listen: SocketAddr,
    /// One write fault in this many is sampled.
    pub fault_every: u32,
    /// Most sampled pages held at once.
    pub max_samples: usize,
    /// How long a container's series stay exported after its last process is gone.
    pub series_ttl: Duration,
    /// When and how far containers escalate to the exact tier; `None`: never (no uprobe program is loaded).
    /// Its sampling is the session's ([`TraceConfig::sample_every`]).
    pub escalation: Option<EscalationOptions>,
}

#[derive(Clone, Copy, Debug)]
pub struct EscalationOptions {
    pub thresholds: Thresholds,
    /// Most processes that have the uprobes at once, host-wide.
    pub max_processes: usize,
}

/// The agent's escalations: the policy, and what it has said.
struct Escalations {
    policy: Policy,
    max_processes: usize,
    /// Processes whose escalation failed (no allocator found, say): not tried again while they live.
    refused: HashSet<u32>,
    /// Escalated containers whose cap was said, until they relax.
    capped_said: HashSet<String>,
}

/// Runs the agent until a stop signal.
pub async fn run(targets: &TraceConfig, options: &AgentOptions) -> anyhow::Result<()> {
    fs::create_dir_all(&options.dir)
        .with_context(|| format!("cannot create {}", options.dir.display()))?;
    let metrics = Arc::new(Mutex::new(Metrics::new(options.series_ttl)));
    let heap_profile = Arc::new(Mutex::new(Profile::default()));
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("cannot listen on {}", options.listen))?;
    let listening = listener.local_addr()?;
    tokio::spawn(http::serve(
        listener,
        Arc::clone(&metrics),
        Arc::clone(&heap_profile),
    ));

    let every_container =
        targets.comms.is_empty() && targets.containers.is_empty() && targets.cgroups.is_empty();
    let mut ready = false;
    let mut lost_said = 0;
    let mut escalations = options.escalation.map(|escalation| Escalations {
        policy: Policy::new(escalation.thresholds),
        max_processes: escalation.max_processes,
        refused: HashSet::new(),
        capped_said: HashSet::new(),
    });
    let mut on_tick = |tick: &WatchTick, escalate: &mut dyn Escalate| {
        let now = Instant::now();
        // Read once, for the series and the escalation policy alike.
        let memory = memory_cgroups(tick);
        let seen = lock(&metrics).update(tick, &memory, now);
        *lock(&heap_profile) = heap::profile(tick, options.fault_every);
        if !ready {
            ready = true;
            let pids: Vec<u32> = tick.processes.iter().map(|p| p.pid).collect();
            if let Err(err) = os::say_ready(&os::Ready::watching(&pids, listening.to_string())) {
                log::warn!("cannot write to --ready-fd: {err}");
            }
            // Said once the probes are on and the running processes marked: what starts from now is watched.
            log::info!(
                "agent ready: watching {} processes, serving http://{listening}, post-mortems in {}",
                tick.processes.len(),
                options.dir.display()
            );
        }
        for container in seen {
            log::info!("container {container} seen");
        }
        if tick.lost_events > lost_said {
            log::warn!(
                "{} events lost ({} since the start): memory is underestimated",
                tick.lost_events - lost_said,
                tick.lost_events
            );
            lost_said = tick.lost_events;
        }
        if let Some(escalations) = &mut escalations {
            escalations.tick(tick, &memory, escalate, &metrics, now);
        }
    };
    let dir = options.dir.clone();
    let mut on_oom = |record: &OomRecord| -> anyhow::Result<()> {
        // Every kill on the host reaches the sink; only a watched victim's has what the agent saw.
        if !record.traced {
            return Ok(());
        }
        lock(&metrics).oom_kill(record, Instant::now());
        match write_post_mortem(&dir, record) {
            Ok(path) => log::warn!(
                "OOM kill of pid {} ({}) in {}: {}",
                record.victim.pid,
                record.victim.comm,
                container_label(record),
                path.display()
            ),
            // The agent goes on: the next kill may be written.
            Err(err) => log::warn!("OOM kill of pid {}: {err:#}", record.victim.pid),
        }
        Ok(())
    };
    let trace = trace::watch(
        targets,
        &mut on_oom,
        Watch {
            fault_every: options.fault_every,
            max_samples: options.max_samples,
            every_container,
            escalation: options.escalation.is_some(),
            on_tick: &mut on_tick,
        },
    )
    .await?;
    trace.finish();
    Ok(())
}

/// The memory cgroups of the tick's containers, by cgroup path, each read once.
fn memory_cgroups(tick: &WatchTick) -> HashMap<String, Memory> {
    let mut memory = HashMap::new();
    for container in tick.processes.iter().filter_map(|p| p.container.as_ref()) {
        if !memory.contains_key(&container.cgroup)
            && let Some(read) = Memory::from_sys(&container.cgroup)
        {
            memory.insert(container.cgroup.clone(), read);
        }
    }
    memory
}

impl Escalations {
    /// Decides and carries out a tick's escalations, counts them in `metrics` with the processes that have the
    /// uprobes after it, then says each: whoever reads a line finds the series already there.
    fn tick(
        &mut self,
        tick: &WatchTick,
        memory: &HashMap<String, Memory>,
        escalate: &mut dyn Escalate,
        metrics: &Mutex<Metrics>,
        now: Instant,
    ) {
        let mut lines: Vec<String> = Vec::new();
        // The tick's `--ready-fd` lines, said with its log lines.
        let mut signals: Vec<Box<dyn FnOnce() -> std::io::Result<()>>> = Vec::new();
        let containers: HashMap<&str, &Container> = tick
            .processes
            .iter()
            .filter_map(|p| p.container.as_ref())
            .map(|c| (c.id.as_str(), c))
            .collect();
        let by_container: HashMap<String, Memory> = containers
            .iter()
            .filter_map(|(id, c)| Some(((*id).to_owned(), *memory.get(&c.cgroup)?)))
            .collect();
        let decisions = self.policy.tick(now, &by_container);
        let escalated = self.policy.escalated();
        self.refused
            .retain(|pid| tick.processes.iter().any(|p| p.pid == *pid));
        self.capped_said
            .retain(|id| escalated.contains(id.as_str()));
        let candidates: Vec<Candidate<'_>> = tick
            .processes
            .iter()
            .filter(|p| !self.refused.contains(&p.pid))
            .filter_map(|p| {
                Some(Candidate {
                    pid: p.pid,
                    container: p.container.as_ref()?.id.as_str(),
                    resident_bytes: p.resident_bytes,
                    escalated: p.escalated,
                })
            })
            .collect();
        let assignment = escalation::assign(&candidates, &escalated, self.max_processes);
        let mut count = tick.processes.iter().filter(|p| p.escalated).count();
        let container_of = |pid: u32| {
            candidates
                .iter()
                .find(|c| c.pid == pid)
                .map(|c| c.container)
        };
        let mut relaxed: HashMap<&str, Vec<u32>> = HashMap::new();
        for &pid in &assignment.detach {
            if let Err(err) = escalate.relax(pid) {
                lines.push(format!("relaxing pid {pid}: {err:#}"));
            }
            count -= 1;
            if let Some(container) = container_of(pid) {
                relaxed.entry(container).or_default().push(pid);
            }
        }
        for change in &decisions.relax {
            let pids = relaxed
                .remove(change.container.as_str())
                .unwrap_or_default();
            let container = containers.get(change.container.as_str()).copied();
            lines.push(format!(
                "relaxed container {}: {}; pids {}",
                label(container, &change.container),
                describe(change),
                list(&pids)
            ));
            // The policy relaxes a container it was given no reading of as gone, and only such a one.
            let why = if by_container.contains_key(&change.container) {
                RelaxCause::FellBack
            } else {
                RelaxCause::Gone
            };
            let said = said_change(container, change, why, pids);
            signals.push(Box::new(move || os::say_relaxed(&said)));
        }
        let mut attached: HashMap<&str, Vec<u32>> = HashMap::new();
        for (container, pids) in &assignment.attach {
            for &pid in pids {
                match escalate.escalate(pid) {
                    Ok(()) => {
                        count += 1;
                        attached.entry(container.as_str()).or_default().push(pid);
                    }
                    Err(err) => {
                        self.refused.insert(pid);
                        lines.push(format!(
                            "cannot escalate pid {pid} of container {}: {err:#}",
                            label(containers.get(container.as_str()).copied(), container)
                        ));
                    }
                }
            }
        }
        for (change, trigger) in &decisions.escalate {
            let container = containers.get(change.container.as_str()).copied();
            if let Some(container) = container {
                lock(metrics).escalated(container, now);
            }
            let pids = attached
                .remove(change.container.as_str())
                .unwrap_or_default();
            let (why, cause) = match trigger {
                Trigger::Limit => ("past --escalate-at", EscalationCause::Limit),
                Trigger::Rate => ("growing faster than --escalate-rate", EscalationCause::Rate),
            };
            lines.push(format!(
                "escalated container {} ({why}): {}; pids {}",
                label(container, &change.container),
                describe(change),
                list(&pids)
            ));
            let said = said_change(container, change, cause, pids);
            signals.push(Box::new(move || os::say_escalated(&said)));
        }
        // Processes that joined a container escalated before.
        let mut joined: Vec<(&str, Vec<u32>)> = attached.into_iter().collect();
        joined.sort();
        for (id, pids) in joined {
            let container = containers.get(id).copied();
            lines.push(format!(
                "escalated container {}: more processes; pids {}",
                label(container, id),
                list(&pids)
            ));
            let said = os::ContainerChange {
                id: id.to_owned(),
                name: container.and_then(|c| c.name.clone()),
                why: EscalationCause::Joined,
                pids,
                memory: None,
            };
            signals.push(Box::new(move || os::say_escalated(&said)));
        }
        for (id, pids) in &assignment.capped {
            if self.capped_said.insert(id.clone()) {
                let container = containers.get(id.as_str()).copied();
                lines.push(format!(
                    "capped container {}: pids {} stay in the watch tier: {} processes have the uprobes (--max-escalated)",
                    label(container, id),
                    list(pids),
                    self.max_processes
                ));
                let (id, name, pids) = (
                    id.clone(),
                    container.and_then(|c| c.name.clone()),
                    pids.clone(),
                );
                let max = self.max_processes;
                signals.push(Box::new(move || {
                    os::say_capped(&id, name.as_deref(), &pids, max)
                }));
            }
        }
        lock(metrics).set_escalated_processes(count);
        for line in lines {
            log::info!("{line}");
        }
        for signal in signals {
            if let Err(err) = signal() {
                log::warn!("cannot write to --ready-fd: {err}");
            }
        }
    }
}

/// A container as the log names it: `name (id prefix)`, or the id prefix.
fn label(container: Option<&Container>, id: &str) -> String {
    let short: String = id.chars().take(12).collect();
    match container.and_then(|c| c.name.as_deref()) {
        Some(name) => format!("{name} ({short})"),
        None => short,
    }
}

/// A container's change as its `--ready-fd` line gives it.
fn said_change<Cause>(
    container: Option<&Container>,
    change: &Change,
    why: Cause,
    pids: Vec<u32>,
) -> os::ContainerChange<Cause> {
    let reading = &change.reading;
    os::ContainerChange {
        id: change.container.clone(),
        name: container.and_then(|c| c.name.clone()),
        why,
        pids,
        memory: Some(os::MemoryReading {
            usage_bytes: reading.usage,
            limit_bytes: reading.limit,
            growth_bytes_per_second: reading.rate.round() as i64,
        }),
    }
}

/// A container's memory as the escalation lines give it.
fn describe(change: &Change) -> String {
    let mib = |bytes: f64| bytes / f64::from(1 << 20);
    let reading = &change.reading;
    let usage = match (reading.limit, reading.percent()) {
        (Some(limit), Some(percent)) => format!(
            "{:.1} MiB, {percent:.0}% of its {:.1} MiB limit",
            mib(reading.usage as f64),
            mib(limit as f64)
        ),
        _ => format!("{:.1} MiB, no limit", mib(reading.usage as f64)),
    };
    format!("{usage}, growing {:.1} MiB/s", mib(reading.rate))
}

fn list(pids: &[u32]) -> String {
    if pids.is_empty() {
        return "none".to_owned();
    }
    pids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The container's name (or id) a record names, or `host`.
fn container_label(record: &OomRecord) -> String {
    match &record.container {
        Some(container) => container
            .name
            .clone()
            .unwrap_or_else(|| container.id.chars().take(12).collect()),
        None => "host".to_owned(),
    }
}

/// Writes `DIR/oom-<UTC time>-<container or host>-<pid>.json`, and beside it the flame graph of what the victim
/// held (the same name, `.svg`), each whole or not at all (through a temporary file renamed into place), and
/// returns the record's path. The flame graph goes first: whoever sees the record finds its picture there.
fn write_post_mortem(dir: &Path, record: &OomRecord) -> anyhow::Result<PathBuf> {
    let time: String = record.time.chars().filter(|c| *c != ':').collect();
    let container: String = container_label(record)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = format!("oom-{time}-{container}-{}", record.victim.pid);
    let graph = dir.join(format!("{name}.svg"));
    write_whole(&graph, |file| {
        flamegraph::write_svg(&Profile::from_oom(record), file)?;
        Ok(())
    })?;
    say_wrote(&graph, Format::Flamegraph, record);
    let path = dir.join(format!("{name}.json"));
    write_whole(&path, |file| {
        serde_json::to_writer_pretty(&mut *file, record)?;
        file.write_all(b"\n")?;
        Ok(())
    })?;
    say_wrote(&path, Format::Json, record);
    Ok(path)
}

/// Says on `--ready-fd` that a post-mortem file of `record` is in place.
fn say_wrote(path: &Path, format: Format, record: &OomRecord) {
    if let Err(err) = os::say_wrote(
        path,
        FileKind::OomRecord,
        format.name(),
        Some(record.victim.pid),
    ) {
        log::warn!("cannot write to --ready-fd: {err}");
    }
}

/// Writes `path` through a temporary file beside it, renamed into place once `write` is done and synced.
fn write_whole(
    path: &Path,
    write: impl FnOnce(&mut fs::File) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let partial = path.with_file_name(format!(".{name}.partial"));
    let mut file = fs::File::create(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    write(&mut file)?;
    file.sync_all()?;
    fs::rename(&partial, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Locks what the session's callbacks share with the HTTP server. Neither panics while holding it.
fn lock<T>(shared: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}
