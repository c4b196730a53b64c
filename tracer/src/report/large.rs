//! The `large` report: large objects still alive when the trace ends, biggest first, each with its size, age,
//! address and stack.

use serde::Serialize;

use super::{Group, GroupBy, Header, group, kind, stack};
use crate::{
    model::Trace,
    procs::{Frame, container::Container, debuginfo},
};

#[derive(Clone, Debug, Serialize)]
pub struct LargeReport {
    #[serde(flatten)]
    pub header: Header,
    pub min_size: u64,
    pub min_age_s: f64,
    /// Objects listed before `--top` cut the list, and their bytes.
    pub object_count: usize,
    pub object_bytes: u64,
    /// The objects summed by process or container (`--group-by`); empty when grouped by stack.
    pub groups: Vec<Group>,
    pub objects: Vec<LargeObject>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LargeObject {
    pub pid: u32,
    /// The container of the process, `null` on the host.
    pub container: Option<Container>,
    pub kind: &'static str,
    #[serde(serialize_with = "crate::procs::hex")]
    pub address: u64,
    pub size: u64,
    pub age_s: f64,
    /// Innermost first.
    pub stack: Vec<Frame>,
}

pub struct LargeOptions {
    pub min_size: u64,
    pub min_age_ns: u64,
    pub top: usize,
    pub group_by: GroupBy,
}

/// The report of `trace`, a pure function of it; `tracer_max_rss_bytes` is alloctrace's peak resident memory,
/// as the caller measured it. The stacks' source lines are named afterwards
/// ([`LargeReport::name_source_lines`]): that reads the binaries' debug information.
pub fn build(trace: &Trace, options: &LargeOptions, tracer_max_rss_bytes: u64) -> LargeReport {
    let header = Header::new("large", trace, tracer_max_rss_bytes);
    let end = trace.window.1;
    let mut objects: Vec<LargeObject> = trace
        .ledger
        .objects()
        .filter(|o| o.size >= options.min_size && end.saturating_sub(o.ts_ns) >= options.min_age_ns)
        .map(|o| LargeObject {
            pid: o.pid,
            container: header.container(o.pid),
            kind: kind(trace.sites.get(o.site)),
            address: o.addr,
            size: o.size,
            age_s: end.saturating_sub(o.ts_ns) as f64 / 1e9,
            stack: stack(trace, o.site),
        })
        .collect();
    objects.sort_by(|a, b| (b.size, a.pid, a.address).cmp(&(a.size, b.pid, b.address)));
    let object_count = objects.len();
    let object_bytes = objects.iter().map(|o| o.size).sum();
    let groups = group(
        &header,
        options.group_by,
        objects.iter().map(|o| (o.pid, o.size, 1)),
    );
    objects.truncate(options.top);
    LargeReport {
        groups,
        header,
        min_size: options.min_size,
        min_age_s: options.min_age_ns as f64 / 1e9,
        object_count,
        object_bytes,
        objects,
    }
}

impl LargeReport {
    /// Gives the listed stacks' native frames their file and line, from the debug information of their
    /// binaries (read from disk, through the processes' roots).
    pub fn name_source_lines(&mut self) {
        debuginfo::resolve(self.objects.iter_mut().map(|o| &mut o.stack));
    }
}
