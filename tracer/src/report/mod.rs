//! Reports: what a trace found, as plain data that every output format renders the same way.

pub mod large;
pub mod leaks;
pub mod oom;
#[cfg(test)]
pub(crate) mod tests;
pub mod verdict;

use serde::Serialize;

use crate::{
    aggregate::{Site, SiteId},
    model::{AllocatorReport, CacheEvictions, Losses, ProcessReport, Trace, history},
    procs::{Frame, container::Container},
};

/// How `--group-by` sums a report up: by process, by container, or not at all (each stack its own site).
/// (`cli` spells it for clap.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GroupBy {
    Process,
    Container,
    #[default]
    Stack,
}

impl GroupBy {
    pub const ALL: [Self; 3] = [Self::Process, Self::Container, Self::Stack];

    /// Its name, as `--group-by` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Process => "process",
            Self::Container => "container",
            Self::Stack => "stack",
        }
    }
}

/// Memory summed over the sites (or objects) of one process or container.
#[derive(Clone, Debug, Serialize)]
pub struct Group {
    /// `pid 4242 python3`, a container's name (or id), or `host`.
    pub key: String,
    pub pid: Option<u32>,
    pub container: Option<Container>,
    pub live_bytes: u64,
    pub live_count: u64,
    /// Sites (for `leaks`) or objects (for `large`) summed.
    pub members: usize,
}

/// Sums `(pid, live bytes, live count)` items into groups, most live bytes first; none for [`GroupBy::Stack`].
pub fn group(
    header: &Header,
    by: GroupBy,
    items: impl Iterator<Item = (u32, u64, u64)>,
) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for (pid, bytes, count) in items {
        let (key, group_pid, container) = match by {
            GroupBy::Stack => return Vec::new(),
            GroupBy::Process => (
                format!("pid {pid} {}", header.comm(pid)),
                Some(pid),
                header.container(pid),
            ),
            GroupBy::Container => {
                let container = header.container(pid);
                let key = container.as_ref().map_or_else(
                    || "host".to_owned(),
                    |c| c.name.clone().unwrap_or_else(|| c.id.clone()),
                );
                (key, None, container)
            }
        };
        match groups.iter_mut().find(|g| g.key == key) {
            Some(g) => {
                g.live_bytes += bytes;
                g.live_count += count;
                g.members += 1;
            }
            None => groups.push(Group {
                key,
                pid: group_pid,
                container,
                live_bytes: bytes,
                live_count: count,
                members: 1,
            }),
        }
    }
    groups.sort_by(|a, b| (b.live_bytes, &a.key).cmp(&(a.live_bytes, &b.key)));
    groups
}

/// What every report says about the trace itself.
#[derive(Clone, Debug, Serialize)]
pub struct Header {
    pub schema: u32,
    pub command: &'static str,
    pub duration_s: f64,
    pub lost: Losses,
    /// False when any data was lost: the numbers are then lower bounds.
    pub complete: bool,
    /// Frees of blocks allocated before the trace began: normal for `--pid`, not a loss.
    pub frees_of_untraced_blocks: u64,
    /// Blocks found freed only because the allocator handed their address out again (a release alloctrace
    /// does not probe, or a lost record).
    pub frees_not_seen: u64,
    pub processes: Vec<ProcessReport>,
    pub allocators: Vec<AllocatorReport>,
    /// alloctrace's own peak resident memory: what tracing these processes cost.
    pub tracer_max_rss_bytes: u64,
    /// Python frames whose code object could not be read, shown as `<unreadable Python frame>`: mostly a
    /// module's top-level code, freed once its import is done, before alloctrace read it. Not a loss of memory
    /// accounting (the allocation and its other frames are there), so not in `lost`.
    pub unreadable_python_frames: u64,
    /// What the tracer's caches evicted to stay within their bounds (read again when needed).
    pub cache_evictions: CacheEvictions,
    /// `--sample-every`: allocations were sampled, one every this many bytes on average, and weighted; `null`
    /// when every allocation was recorded.
    pub sampled_every_bytes: Option<u64>,
    /// Each process's live bytes over the trace (every 250 ms, thinned on long traces), and at its end.
    pub memory_over_time: Vec<history::ProcessMemory>,
}

impl Header {
    /// The header of `trace`'s report; `tracer_max_rss_bytes` is alloctrace's peak resident memory, as the
    /// caller measured it when the trace ended.
    pub fn new(command: &'static str, trace: &Trace, tracer_max_rss_bytes: u64) -> Self {
        Self {
            schema: 1,
            command,
            duration_s: trace.duration_s,
            lost: trace.lost,
            complete: trace.lost.total() == 0,
            frees_of_untraced_blocks: trace.unknown_frees,
            frees_not_seen: trace.unseen_frees,
            processes: trace.processes.clone(),
            allocators: trace.allocators.clone(),
            tracer_max_rss_bytes,
            sampled_every_bytes: (!trace.sampling.is_exact()).then_some(trace.sampling.interval),
            unreadable_python_frames: trace.unreadable_python_frames,
            cache_evictions: trace.cache_evictions,
            memory_over_time: trace.history.by_process(trace.window.0),
        }
    }

    /// The container of a traced process.
    pub fn container(&self, pid: u32) -> Option<Container> {
        self.processes
            .iter()
            .find(|p| p.info.pid == pid)
            .and_then(|p| p.info.container.clone())
    }

    /// The name of a traced process, for text reports.
    pub fn comm(&self, pid: u32) -> &str {
        self.processes
            .iter()
            .find(|p| p.info.pid == pid)
            .map_or("", |p| p.info.comm.as_str())
    }
}

/// The name reports give a site's kind: the allocator function or system call.
pub fn kind(site: &Site) -> &'static str {
    site.func.name()
}

/// A site's stack, as reports show it.
pub fn stack(trace: &Trace, site: SiteId) -> Vec<Frame> {
    trace
        .sites
        .get(site)
        .frames
        .iter()
        .map(|f| Frame::clone(f))
        .collect()
}
