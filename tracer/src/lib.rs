//! alloctrace: traces the allocations of running processes with eBPF uprobes and names the stacks that hold
//! memory. The binary (`main.rs`) parses arguments and calls [`trace`]; the modules below are the pipeline:
//! probes → decode → procs (process registry, symbols) → aggregate → report → output.

pub mod agent;
pub mod aggregate;
pub mod cli;
pub mod decode;
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
