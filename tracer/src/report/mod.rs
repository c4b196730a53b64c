//! Reports: what a trace found, as plain data that every output format renders the same way.

pub mod leaks;

use serde::Serialize;

/// Data lost on the way from the probes to the report, one counter per way it can be lost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Losses {
    /// Records the ring buffer had no room for: allocations or frees never seen.
    pub events: u64,
    /// Allocator calls not recorded because the kernel's table of calls in flight was full.
    pub untracked_calls: u64,
    /// Allocations recorded without their stack (the kernel could not take it, or its record was lost).
    pub stacks: u64,
    /// Records userspace could not decode.
    pub undecodable: u64,
}

impl Losses {
    pub fn total(&self) -> u64 {
        self.events + self.untracked_calls + self.stacks + self.undecodable
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
