//! The `leaks` report: sites ranked by the memory they still hold.

use serde::Serialize;

use super::{Exit, Losses};
use crate::{
    aggregate::{LiveTable, Sites},
    procs::{Frame, ProcessInfo, allocator::Allocator},
};

#[derive(Clone, Debug, Serialize)]
pub struct LeaksReport {
    pub schema: u32,
    pub command: &'static str,
    pub duration_s: f64,
    /// Only blocks at least this old count as live.
    pub min_age_s: f64,
    pub lost: Losses,
    /// False when any data was lost: the numbers below are then lower bounds.
    pub complete: bool,
    /// Outstanding memory in all sites (before `--top`).
    pub live_bytes: u64,
    pub live_count: u64,
    /// Sites holding memory (before `--top`).
    pub site_count: usize,
    /// Frees of blocks allocated before the trace began: normal for `--pid`, not a loss.
    pub frees_of_untraced_blocks: u64,
    pub processes: Vec<ProcessReport>,
    /// Where the probes of each traced process went.
    pub allocators: Vec<AllocatorReport>,
    pub sites: Vec<SiteReport>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AllocatorReport {
    pub pid: u32,
    #[serde(flatten)]
    pub allocator: Allocator,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProcessReport {
    #[serde(flatten)]
    pub info: ProcessInfo,
    /// How it ended, if it did during the trace.
    pub exit: Option<Exit>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SiteReport {
    pub pid: u32,
    /// The allocator function called.
    pub kind: &'static str,
    pub live_bytes: u64,
    pub live_count: u64,
    pub total_bytes: u64,
    pub total_count: u64,
    pub oldest_age_s: f64,
    /// Innermost first.
    pub stack: Vec<Frame>,
}

/// What a report is built from.
pub struct LeaksInput<'a> {
    pub table: &'a LiveTable,
    pub sites: &'a Sites,
    pub processes: Vec<ProcessReport>,
    pub allocators: Vec<AllocatorReport>,
    pub lost: Losses,
    pub duration_s: f64,
    /// `bpf_ktime_get_ns` time the report is made at.
    pub now_ns: u64,
    pub min_age_ns: u64,
    pub top: usize,
}

pub fn build(input: LeaksInput<'_>) -> LeaksReport {
    let born_by = input.now_ns.saturating_sub(input.min_age_ns);
    let mut sites: Vec<SiteReport> = input
        .table
        .live_by_site(born_by)
        .into_iter()
        .map(|(id, live)| {
            let site = input.sites.get(id);
            let totals = input.table.totals(id);
            SiteReport {
                pid: site.pid,
                kind: site.func.name(),
                live_bytes: live.bytes,
                live_count: live.count,
                total_bytes: totals.bytes,
                total_count: totals.count,
                oldest_age_s: input.now_ns.saturating_sub(live.oldest_ns) as f64 / 1e9,
                stack: site.frames.clone(),
            }
        })
        .collect();
    // Most live bytes first; ties broken so that the order never depends on hashing.
    sites.sort_by(|a, b| {
        (b.live_bytes, b.live_count, a.pid, a.kind, &a.stack).cmp(&(
            a.live_bytes,
            a.live_count,
            b.pid,
            b.kind,
            &b.stack,
        ))
    });
    let live_bytes = sites.iter().map(|s| s.live_bytes).sum();
    let live_count = sites.iter().map(|s| s.live_count).sum();
    let site_count = sites.len();
    sites.truncate(input.top);
    LeaksReport {
        schema: 1,
        command: "leaks",
        duration_s: input.duration_s,
        min_age_s: input.min_age_ns as f64 / 1e9,
        lost: input.lost,
        complete: input.lost.total() == 0,
        live_bytes,
        live_count,
        site_count,
        frees_of_untraced_blocks: input.table.unknown_frees,
        processes: input.processes,
        allocators: input.allocators,
        sites,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::Site;
    use tracer_common::AllocFn;

    fn at(ts_ns: u64) -> tracer_common::EventHeader {
        tracer_common::EventHeader {
            pid: 1,
            tid: 1,
            ts_ns,
            ..Default::default()
        }
    }

    fn frame(function: &str) -> Frame {
        Frame {
            function: Some(function.to_owned()),
            module: Some("/app".to_owned()),
            offset: 0x1139,
            function_offset: 4,
            file: None,
            line: None,
            lang: "native",
        }
    }

    #[test]
    fn ranks_sites_by_live_bytes_and_applies_top_and_min_age() {
        let mut sites = Sites::default();
        let mut table = LiveTable::default();
        let small = sites.intern(Site {
            pid: 1,
            func: AllocFn::Malloc,
            frames: vec![frame("small")],
        });
        let big = sites.intern(Site {
            pid: 1,
            func: AllocFn::Calloc,
            frames: vec![frame("big")],
        });
        table.allocated(&at(1_000_000_000), AllocFn::Malloc, 0x10, 100, small);
        table.allocated(&at(2_000_000_000), AllocFn::Calloc, 0x20, 5000, big);
        table.allocated(&at(2_900_000_000), AllocFn::Calloc, 0x30, 5000, big);
        let input = |min_age_ns, top| LeaksInput {
            table: &table,
            sites: &sites,
            processes: vec![],
            allocators: vec![],
            lost: Losses::default(),
            duration_s: 3.0,
            now_ns: 3_000_000_000,
            min_age_ns,
            top,
        };
        let report = build(input(0, 10));
        assert_eq!(report.site_count, 2);
        assert_eq!((report.live_bytes, report.live_count), (10_100, 3));
        assert_eq!(report.sites[0].kind, "calloc");
        assert_eq!(
            (report.sites[0].live_bytes, report.sites[0].live_count),
            (10_000, 2)
        );
        assert!((report.sites[0].oldest_age_s - 1.0).abs() < 1e-9);
        assert!(report.complete);

        let aged = build(input(500_000_000, 10));
        assert_eq!(aged.sites[0].live_bytes, 5000);
        assert_eq!(build(input(0, 1)).sites.len(), 1);

        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["sites"][0]["stack"][0]["offset"], "0x1139");
        assert_eq!(json["sites"][0]["stack"][0]["lang"], "native");
        assert!(json["sites"][0]["stack"][0]["file"].is_null());
        assert_eq!(json["lost"]["events"], 0);
    }
}
