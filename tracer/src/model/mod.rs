//! The data every stage shares: a finished trace (the ledger, its sites, the processes and how they ended, what
//! was lost), as the session hands it to the report builders. Plain data: nothing here reads the machine, so a
//! report can be built from a trace made by hand.

pub mod history;

use serde::Serialize;

use crate::{
    aggregate::{Ledger, Sites},
    procs::{ProcessInfo, allocator::Allocator},
    python::runtime::PythonInfo,
    sampling::Sampling,
};

use history::History;

/// What a finished trace gathered: the input of every report.
pub struct Trace {
    pub ledger: Ledger,
    pub sites: Sites,
    pub processes: Vec<ProcessReport>,
    pub allocators: Vec<AllocatorReport>,
    pub lost: Losses,
    pub duration_s: f64,
    /// `[start, end]` of the trace in `bpf_ktime_get_ns` time.
    pub window: (u64, u64),
    /// How allocations were recorded: every one, or sampled by bytes.
    pub sampling: Sampling,
    /// Frees of blocks allocated before the trace began (exact traces only).
    pub unknown_frees: u64,
    /// Blocks found released only because their address was handed out again.
    pub unseen_frees: u64,
    /// Python frames whose code object could not be read.
    pub unreadable_python_frames: u64,
    /// What the bounded caches of modules and code objects evicted.
    pub cache_evictions: CacheEvictions,
    /// Each process's live bytes, sampled through the trace and at its end.
    pub history: History,
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
