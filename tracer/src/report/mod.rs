//! Reports: what a trace found, as plain data that every output format renders the same way.

pub mod history;
pub mod large;
pub mod leaks;
pub mod oom;
pub mod verdict;

use serde::Serialize;

use crate::{
    aggregate::{Site, SiteId},
    procs::container::Container,
    procs::{Frame, ProcessInfo, allocator::Allocator},
    python::runtime::PythonInfo,
    trace::Trace,
};

/// How `--group-by` sums a report up: by process, by container, or not at all (each stack its own site).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupBy {
    Process,
    Container,
    #[default]
    Stack,
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

/// Data lost on the way from the probes to the report, one counter per way it can be lost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Losses {
    /// Records the ring buffer had no room for: allocations or frees never seen.
    pub events: u64,
    /// Calls not recorded because the kernel's table of calls in flight was full.
    pub untracked_calls: u64,
    /// Blocks not kept because the kernel's table of live blocks was full (`--max-live-blocks`).
    pub untracked_blocks: u64,
    /// Allocations not counted because the kernel's table of sites was full.
    pub untracked_sites: u64,
    /// Sizes missing from a site's histogram because the kernel's table of sizes was full.
    pub histogram_sizes: u64,
    /// Allocations recorded without their stack (the kernel could not take it, or its record was lost).
    pub stacks: u64,
    /// Records userspace could not decode.
    pub undecodable: u64,
    /// Processes chosen for the trace (children, exec'd images, name or container matches) that could not be
    /// attached to: what they allocated is missing.
    pub untraced_processes: u64,
}

/// What the tracer's bounded caches evicted to stay within their bounds. Not a loss: an evicted entry is read
/// again when it is needed (from a process that is still alive).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CacheEvictions {
    /// ELF objects (symbol tables) dropped from the cache of modules.
    pub modules: u64,
    /// Python code objects dropped from the caches of code objects.
    pub python_code_objects: u64,
}

impl CacheEvictions {
    pub fn total(&self) -> u64 {
        self.modules + self.python_code_objects
    }
}

impl Losses {
    pub fn total(&self) -> u64 {
        self.events
            + self.untracked_calls
            + self.untracked_blocks
            + self.untracked_sites
            + self.histogram_sizes
            + self.stacks
            + self.undecodable
            + self.untraced_processes
    }
}

/// How a traced process ended, when it did during the trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// It exited, but it was not alloctrace's child, so its status is not known.
    Exited,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProcessReport {
    #[serde(flatten)]
    pub info: ProcessInfo,
    /// How it ended, if it did during the trace.
    pub exit: Option<Exit>,
    /// The CPython interpreter it runs, if any, and whether its frames are read.
    pub python: Option<PythonInfo>,
}

/// Where a process's probes went.
#[derive(Clone, Debug, Serialize)]
pub struct AllocatorReport {
    pub pid: u32,
    #[serde(flatten)]
    pub allocator: Allocator,
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
    pub fn new(command: &'static str, trace: &Trace) -> Self {
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
            tracer_max_rss_bytes: crate::system::max_rss_bytes(),
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
