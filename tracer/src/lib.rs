//! alloctrace: traces the allocations of running processes with eBPF uprobes and names the stacks that hold
//! memory. The binary (`main.rs`) parses arguments and calls [`trace`]; the modules below are the pipeline:
//! probes → decode → procs (process registry, symbols) → aggregate → report → output.
//!
//! Dependencies point one way. The layers, low to high; a module uses only modules of lower layers, and only
//! `cli` uses clap (the unit tests in `layers.rs` read every file's `crate::`/`super::`/`clap::` paths and fail
//! naming any import that is not downward: `cargo test -p tracer layers`):
//! 1. [`os`], [`system`], [`tables`], [`sampling`], [`decode`], [`ring`]: thin wrappers of the OS, and what
//!    the kernel side shares with userspace;
//! 2. [`uprobe_events`], [`procs`]: the uprobes' bookkeeping; what is known of a process;
//! 3. [`python`], [`aggregate`]: a process's Python runtime; the ledger (pure);
//! 4. [`model`], [`probes`]: the data every stage shares (the finished trace, exits, losses); loading and
//!    attaching the eBPF programs;
//! 5. [`report`], [`spawn`]: report builders, pure functions of the model; the command alloctrace starts;
//! 6. [`output`]: one writer per format;
//! 7. [`trace`]: one trace, from its [`trace::TraceConfig`] to its [`model::Trace`];
//! 8. [`agent`]: the long-running host process;
//! 9. [`cli`], [`logging`]: clap's arguments, converted into the library's own config (no clap argument type
//!    below); the logger every module's messages go through.

pub mod agent;
pub mod aggregate;
pub mod cli;
pub mod decode;
#[cfg(test)]
mod layers;
pub mod logging;
pub mod model;
pub mod os;
pub mod output;
pub mod probes;
pub mod procs;
pub mod python;
pub mod report;
pub mod ring;
pub mod sampling;
pub mod spawn;
pub mod system;
pub mod tables;
pub mod trace;
pub mod uprobe_events;
