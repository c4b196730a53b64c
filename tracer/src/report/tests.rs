//! The report builders on a trace made by hand, where every number is known: a leak, a lingering mapping and
//! a churning site in two processes, one of them in a container.

use std::sync::Arc;

use tracer_common::{
    AllocFn, COUNT_SCALE, EventHeader, LiveBlock, LiveKey, SiteCounters, SiteKey, SizeKey,
};

use super::{
    GroupBy,
    large::{self, LargeOptions},
    leaks::{self, LeaksOptions},
    verdict::Verdict,
};
use crate::{
    aggregate::{HeapTables, Ledger, Site, Sites},
    model::{Losses, ProcessReport, Trace},
    procs::{Frame, ProcessInfo, container::Container},
    sampling::Sampling,
};

const S: u64 = 1_000_000_000;
/// The host process: it leaks 1000-byte blocks and maps a 1 MiB table.
pub const WORKER: u32 = 100;
/// The containerized process: it churns 64-byte blocks.
pub const ETL: u32 = 200;
/// Where the 1 MiB table is mapped.
pub const TABLE_ADDR: u64 = 0x7f00_0000_0000;
/// What the caller measured of alloctrace's own memory, passed through untouched.
pub const TRACER_RSS: u64 = 12_345_678;

/// A native frame without debug information: nothing for a report or a writer to read from disk.
pub fn native(function: &str) -> Arc<Frame> {
    Arc::new(Frame::native(
        Some(function.to_owned()),
        Some("/usr/bin/worker".to_owned()),
        Some(0x1000),
    ))
}

pub fn etl_container() -> Container {
    Container {
        id: "c0ffee".repeat(10) + "c0ff",
        name: Some("etl".to_owned()),
        runtime: "docker",
        cgroup: "/docker/c0ffee".to_owned(),
        pod_uid: None,
        qos_class: None,
    }
}

/// Ten seconds of trace: `leak_site` (pid 100, malloc) allocated six blocks of 1000 bytes, one every quarter
/// of the window among them, and freed two; `load_table` (pid 100, mmap) mapped 1 MiB at 2 s; `parse_row`
/// (pid 200, in container `etl`, malloc) allocated and freed 2000 blocks of 64 bytes.
pub fn trace() -> Trace {
    let mut sites = Sites::default();
    let leak = sites.intern(Site {
        pid: WORKER,
        func: AllocFn::Malloc,
        frames: Arc::new([native("leak_site"), native("main")]),
    });
    let table = sites.intern(Site {
        pid: WORKER,
        func: AllocFn::Mmap,
        frames: Arc::new([native("load_table"), native("main")]),
    });
    let churn = sites.intern(Site {
        pid: ETL,
        func: AllocFn::Malloc,
        frames: Arc::new([native("parse_row"), native("main")]),
    });
    let leak_key = SiteKey {
        tgid: WORKER,
        func: AllocFn::Malloc as u32,
        stack_id: 1,
    };
    let churn_key = SiteKey {
        tgid: ETL,
        func: AllocFn::Malloc as u32,
        stack_id: 3,
    };
    let block = |addr: u64, ts_ns: u64| {
        let key = LiveKey {
            tgid: WORKER,
            _pad: 0,
            addr,
        };
        let block = LiveBlock {
            size: 1000,
            stack_id: 1,
            ts_ns,
            func: AllocFn::Malloc as u32,
            _pad: 0,
        };
        (key, block)
    };
    let tables = HeapTables {
        sites: vec![
            (
                leak_key,
                SiteCounters {
                    allocated_count: 6 * COUNT_SCALE,
                    allocated_bytes: 6000,
                    freed_count: 2 * COUNT_SCALE,
                    freed_bytes: 2000,
                    smallest: 1000,
                    largest: 1000,
                },
            ),
            (
                churn_key,
                SiteCounters {
                    allocated_count: 2000 * COUNT_SCALE,
                    allocated_bytes: 2000 * 64,
                    freed_count: 2000 * COUNT_SCALE,
                    freed_bytes: 2000 * 64,
                    smallest: 64,
                    largest: 64,
                },
            ),
        ],
        sizes: vec![
            (
                SizeKey {
                    site: leak_key,
                    size_class: 1000,
                },
                6,
            ),
            (
                SizeKey {
                    site: churn_key,
                    size_class: 64,
                },
                2000,
            ),
        ],
        blocks: vec![
            block(0x1000, S),
            block(0x2000, 3 * S + S / 2),
            block(0x3000, 6 * S),
            block(0x4000, 9 * S),
        ],
    };
    let sampling = Sampling::exact();
    let mut ledger = Ledger::with_page_size(4096);
    ledger.set_heap(&tables, &sampling, |key| match key.stack_id {
        1 => leak,
        _ => churn,
    });
    let mapping = EventHeader {
        pid: WORKER,
        tid: WORKER,
        ts_ns: 2 * S,
        ..EventHeader::default()
    };
    ledger.mapped(&mapping, TABLE_ADDR, 1 << 20, table);
    let process = |pid: u32, comm: &str, container: Option<Container>| ProcessReport {
        info: ProcessInfo {
            pid,
            ns_pid: None,
            comm: comm.to_owned(),
            cmdline: vec![comm.to_owned()],
            container,
            task: None,
        },
        exit: None,
        python: None,
    };
    Trace {
        ledger,
        sites,
        processes: vec![
            process(WORKER, "worker", None),
            process(ETL, "etl-job", Some(etl_container())),
        ],
        allocators: Vec::new(),
        lost: Losses::default(),
        duration_s: 10.0,
        window: (0, 10 * S),
        sampling,
        unknown_frees: 0,
        unseen_frees: 0,
        unreadable_python_frames: 0,
        cache_evictions: Default::default(),
        history: Default::default(),
    }
}

pub fn leaks_options(group_by: GroupBy) -> LeaksOptions {
    LeaksOptions {
        min_age_ns: 0,
        min_size: 512 << 10,
        top: 10,
        group_by,
    }
}

fn function(stack: &[Frame]) -> &str {
    stack[0].function.as_deref().unwrap_or("")
}

#[test]
fn leaks_ranks_sites_by_live_bytes_and_judges_each() {
    let report = leaks::build(&trace(), &leaks_options(GroupBy::Stack), TRACER_RSS);
    assert_eq!(report.header.command, "leaks");
    assert_eq!(report.header.tracer_max_rss_bytes, TRACER_RSS);
    assert!(report.header.complete);
    assert_eq!(report.header.processes.len(), 2);
    assert_eq!(report.live_bytes, (1 << 20) + 4000);
    assert_eq!(report.live_count, 5);
    assert_eq!(report.site_count, 3);
    assert_eq!(
        (report.allocated_bytes, report.allocated_count),
        ((1 << 20) + 6000 + 2000 * 64, 1 + 6 + 2000)
    );
    assert!(report.groups.is_empty());
    let rows: Vec<_> = report
        .sites
        .iter()
        .map(|s| {
            (
                function(&s.stack),
                s.pid,
                s.kind,
                s.live_bytes,
                s.live_count,
                s.verdict,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("load_table", WORKER, "mmap", 1 << 20, 1, Verdict::Lingering),
            ("leak_site", WORKER, "malloc", 4000, 4, Verdict::Leak),
            ("parse_row", ETL, "malloc", 0, 0, Verdict::Churn),
        ]
    );
    let [table, leak, churn] = &report.sites[..] else {
        panic!("three sites")
    };
    assert_eq!(
        table.verdict_reason,
        "a block of 1048576 bytes has been alive for 8.0 s"
    );
    assert_eq!(table.oldest_age_s, 8.0);
    assert_eq!((table.total_bytes, table.total_count), (1 << 20, 1));
    assert_eq!(
        leak.verdict_reason,
        "4 blocks allocated all through the trace are still live (67% of 6 never freed)"
    );
    assert_eq!((leak.total_bytes, leak.total_count), (6000, 6));
    assert_eq!((leak.freed_bytes, leak.freed_count), (2000, 2));
    assert_eq!(leak.oldest_age_s, 9.0);
    assert_eq!(leak.alloc_rate_per_s, 0.6);
    assert_eq!(leak.live_bytes_error, None);
    let sizes = &leak.size_histogram;
    assert_eq!(
        (sizes.count, sizes.min, sizes.p50, sizes.p99, sizes.max),
        (6, 1000, 1000, 1000, 1000)
    );
    assert_eq!(
        churn.verdict_reason,
        "allocates 200 blocks/s and frees 100% of them"
    );
    assert_eq!(churn.container, Some(etl_container()));
    assert_eq!((churn.freed_bytes, churn.freed_count), (128_000, 2000));
}

#[test]
fn leaks_counts_only_blocks_old_enough_but_judges_them_all() {
    let options = LeaksOptions {
        min_age_ns: 5 * S,
        ..leaks_options(GroupBy::Stack)
    };
    let report = leaks::build(&trace(), &options, TRACER_RSS);
    // Born by 5 s: the mapping (2 s) and two of the leak's blocks (1 s, 3.5 s).
    assert_eq!(report.live_bytes, (1 << 20) + 2000);
    assert_eq!(report.live_count, 3);
    let leak = &report.sites[1];
    assert_eq!((leak.live_bytes, leak.live_count), (2000, 2));
    assert_eq!(leak.verdict, Verdict::Leak);
}

#[test]
fn leaks_sums_groups_by_process_and_by_container() {
    let by_process = leaks::build(&trace(), &leaks_options(GroupBy::Process), 0);
    let groups: Vec<_> = by_process
        .groups
        .iter()
        .map(|g| (g.key.as_str(), g.pid, g.live_bytes, g.live_count, g.members))
        .collect();
    assert_eq!(
        groups,
        [
            ("pid 100 worker", Some(WORKER), (1 << 20) + 4000, 5, 2),
            ("pid 200 etl-job", Some(ETL), 0, 0, 1),
        ]
    );
    let by_container = leaks::build(&trace(), &leaks_options(GroupBy::Container), 0);
    let groups: Vec<_> = by_container
        .groups
        .iter()
        .map(|g| {
            (
                g.key.as_str(),
                g.live_bytes,
                g.members,
                g.container.is_some(),
            )
        })
        .collect();
    assert_eq!(
        groups,
        [("host", (1 << 20) + 4000, 2, false), ("etl", 0, 1, true)]
    );
}

#[test]
fn leaks_top_cuts_the_list_not_the_totals() {
    let options = LeaksOptions {
        top: 1,
        ..leaks_options(GroupBy::Stack)
    };
    let report = leaks::build(&trace(), &options, 0);
    assert_eq!(report.sites.len(), 1);
    assert_eq!(report.site_count, 3);
    assert_eq!(report.live_bytes, (1 << 20) + 4000);
}

#[test]
fn large_lists_live_objects_biggest_then_by_address() {
    let options = LargeOptions {
        min_size: 1000,
        min_age_ns: 0,
        top: 3,
        group_by: GroupBy::Process,
    };
    let report = large::build(&trace(), &options, TRACER_RSS);
    assert_eq!(report.header.command, "large");
    assert_eq!(report.header.tracer_max_rss_bytes, TRACER_RSS);
    assert_eq!(report.object_count, 5);
    assert_eq!(report.object_bytes, (1 << 20) + 4000);
    let objects: Vec<_> = report
        .objects
        .iter()
        .map(|o| (function(&o.stack), o.kind, o.address, o.size, o.age_s))
        .collect();
    assert_eq!(
        objects,
        [
            ("load_table", "mmap", TABLE_ADDR, 1 << 20, 8.0),
            ("leak_site", "malloc", 0x1000, 1000, 9.0),
            ("leak_site", "malloc", 0x2000, 1000, 6.5),
        ]
    );
    let groups: Vec<_> = report
        .groups
        .iter()
        .map(|g| (g.key.as_str(), g.live_bytes, g.live_count, g.members))
        .collect();
    assert_eq!(groups, [("pid 100 worker", (1 << 20) + 4000, 5, 5)]);
}

#[test]
fn large_leaves_out_objects_too_small_or_too_young() {
    let options = LargeOptions {
        min_size: 1001,
        min_age_ns: 0,
        top: 20,
        group_by: GroupBy::Stack,
    };
    let report = large::build(&trace(), &options, 0);
    assert_eq!((report.object_count, report.object_bytes), (1, 1 << 20));
    let options = LargeOptions {
        min_size: 0,
        min_age_ns: 7 * S,
        top: 20,
        group_by: GroupBy::Stack,
    };
    let report = large::build(&trace(), &options, 0);
    // At least 7 s old: born by 3 s, the block of 1 s and the mapping of 2 s.
    assert_eq!(
        (report.object_count, report.object_bytes),
        (2, (1 << 20) + 1000)
    );
}
