//! Every way a process takes memory, counted once and exactly: the whole allocator family and realloc's edge
//! cases, anonymous mmap/munmap/mremap and brk (raw syscalls too), no double counting of an allocator's own
//! mappings, a process on jemalloc, and the tracer at scale and under an event storm.

use std::{ffi::OsStr, path::Path, process::Command};

use alloctrace_tests::{
    alloctrace, assert_sites_exact, json_report, live, require_root, site, sites_through,
    trace_json, workload, workload_built_by,
};

const PAGE: u64 = 4096;

#[test]
fn every_family_member_and_realloc_edge_case_is_exact() {
    require_root();
    let family = workload("family");
    let report = trace_json(&["leaks", "--top", "1000"], &[family.as_os_str()]);
    for (kind, function, bytes) in [
        ("reallocarray", "reallocarray_site", 1000),
        ("posix_memalign", "posix_memalign_site", 3000),
        ("aligned_alloc", "aligned_alloc_site", 4096),
        ("valloc", "valloc_site", 5000),
        ("pvalloc", "pvalloc_site", 5000),
        ("realloc", "realloc_null_site", 300),
        ("realloc", "realloc_shrink_site", 40),
        ("realloc", "realloc_move_site", 1 << 20),
        ("malloc", "realloc_fail_site", 600),
    ] {
        let s = site(&report, kind, function);
        assert_eq!(live(s), (bytes, 1), "{kind} in {function}: {s:#}");
    }
    // glibc 2.36's memalign and aligned_alloc are one function: its calls carry the name probed first.
    let memalign: Vec<_> = sites_through(&report, "memalign_site");
    assert_eq!(memalign.len(), 1, "{report:#}");
    assert!(["aligned_alloc", "memalign"].contains(&memalign[0]["kind"].as_str().unwrap()));
    assert_eq!(live(memalign[0]), (2000, 1));
    // Sites that hold nothing at exit are not listed: the freed, the realloc'd-away, free(NULL).
    for function in ["realloc_zero_site", "free_null_site"] {
        assert!(
            sites_through(&report, function).is_empty(),
            "{function}: {report:#}"
        );
    }
    for s in sites_through(&report, "realloc_shrink_site") {
        assert!(
            s["kind"] == "realloc",
            "the malloc it shrank holds nothing: {s:#}"
        );
    }
    // free's probe is past its NULL check: 1000 free(NULL) calls cost no event.
    let free = &report["allocators"][0]["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["function"] == "free")
        .expect("free is probed")["entry_offset"];
    assert!(free.as_u64().unwrap() > 0, "{report:#}");
    assert_eq!(report["lost"]["events"], 0);
}

#[test]
fn mapped_memory_is_exact_and_never_counted_twice() {
    require_root();
    let mapped = workload("mapped");
    let report = trace_json(&["leaks", "--top", "1000"], &[mapped.as_os_str()]);
    let one = |function: &str| {
        let sites = sites_through(&report, function);
        assert_eq!(sites.len(), 1, "one site through {function}: {report:#}");
        sites[0]
    };
    for (function, kind, bytes, pieces) in [
        ("mmap_site", "mmap", 4 * PAGE, 1),
        ("partial_site", "mmap", 6 * PAGE, 2),
        // The range keeps the site that mapped it, moved and grown.
        ("remap_site", "mmap", 5 * PAGE, 1),
        ("raw_syscall_site", "mmap", 3 * PAGE, 1),
        // glibc maps 2 MiB itself: counted once, as the malloc.
        ("big_malloc_site", "malloc", 2 << 20, 1),
    ] {
        let s = one(function);
        assert_eq!(s["kind"], kind, "{s:#}");
        assert_eq!(live(s), (bytes, pieces), "{function}: {s:#}");
    }
    assert!(
        sites_through(&report, "file_site").is_empty(),
        "files are not heap"
    );
    let brk: Vec<_> = report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["kind"] == "brk")
        .collect();
    assert_eq!(brk.len(), 1, "{report:#}");
    assert_eq!(live(brk[0]), (6000, 1), "sbrk(10000) then sbrk(-4000)");
    assert_eq!(report["lost"]["events"], 0);
}

#[test]
fn preloaded_allocators_are_probed_where_the_calls_bind() {
    require_root();
    let sites = workload("sites");
    for (library, package) in [
        ("libjemalloc.so.2", "libjemalloc2"),
        ("libtcmalloc_minimal.so.4", "libtcmalloc-minimal4"),
        ("libmimalloc.so.2", "libmimalloc2.0"),
    ] {
        let path = Path::new("/usr/lib/x86_64-linux-gnu").join(library);
        assert!(
            path.exists(),
            "{} is missing: apt-get install {package} (cargo xtask test installs it)",
            path.display()
        );
        let out = Command::new(alloctrace())
            .args(["leaks", "--format", "json", "--top", "100", "--"])
            .arg(&sites)
            .env("LD_PRELOAD", &path)
            .output()
            .unwrap();
        let report = json_report(&out);
        let probed = report["allocators"][0]["path"].as_str().unwrap();
        assert!(probed.ends_with(library), "{library}: probed {probed}");
        assert_sites_exact(&report, report["processes"][0]["pid"].as_u64().unwrap());
    }
}

#[test]
fn a_program_on_musl_is_probed_in_musl() {
    require_root();
    let sites = workload_built_by("sites", "musl-gcc");
    let report = trace_json(&["leaks", "--top", "100"], &[sites.as_os_str()]);
    let probed = report["allocators"][0]["path"].as_str().unwrap();
    assert!(probed.contains("ld-musl"), "probed {probed}");
    assert_sites_exact(&report, report["processes"][0]["pid"].as_u64().unwrap());
}

#[test]
fn a_million_live_blocks_are_counted_exactly_in_bounded_memory() {
    require_root();
    let many = workload("many");
    let report = trace_json(
        &["leaks", "--top", "3"],
        &[many.as_os_str(), OsStr::new("many"), OsStr::new("1000000")],
    );
    let block = report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["size_histogram"]["max"] == 16)
        .expect("the 16-byte site");
    assert_eq!(live(block), (16_000_000, 1_000_000), "{block:#}");
    assert_eq!(report["lost"]["events"], 0, "{report:#}");
    let rss = report["tracer_max_rss_bytes"].as_u64().unwrap();
    println!("tracer RSS with 1,000,000 live blocks: {} MiB", rss >> 20);
    assert!(
        rss < 512 << 20,
        "the tracer's memory must stay bounded: {rss} bytes"
    );
}

#[test]
fn blocks_freed_by_another_thread_are_exact_past_the_preallocated_table() {
    require_root();
    let many = workload("many");
    // 400,000 blocks: more than the kernel's preallocated table holds (262,144), so that blocks of both live
    // tables are freed by a thread that did not allocate them, while the allocating thread goes on.
    let report = trace_json(
        &["leaks", "--top", "0"],
        &[
            many.as_os_str(),
            OsStr::new("handoff"),
            OsStr::new("400000"),
        ],
    );
    let block = report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["size_histogram"]["max"] == 24)
        .expect("the 24-byte site");
    assert_eq!(live(block), (400 * 24, 400), "{block:#}");
    assert_eq!(block["total_count"], 400_000, "{block:#}");
    assert_eq!(block["freed_count"], 399_600, "{block:#}");
    assert_eq!(report["lost"]["events"], 0, "{report:#}");
}

#[test]
fn a_full_table_of_live_blocks_is_counted_and_said() {
    require_root();
    let many = workload("many");
    let out = Command::new(alloctrace())
        .args([
            "leaks",
            "--max-live-blocks",
            "1000",
            "--format",
            "json",
            "--",
        ])
        .arg(&many)
        .args(["many", "5000"])
        .output()
        .unwrap();
    let report = json_report(&out);
    let untracked = report["lost"]["untracked_blocks"].as_u64().unwrap();
    assert!(untracked >= 4000, "{:#}", report["lost"]);
    assert_eq!(report["complete"], false);
    let text = Command::new(alloctrace())
        .args(["leaks", "--max-live-blocks", "1000", "--"])
        .arg(&many)
        .args(["many", "5000"])
        .output()
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains("blocks untracked (live-block table full)"),
        "{text}"
    );
    assert!(text.contains("WARNING: data was lost"), "{text}");
}

#[test]
fn a_full_ring_buffer_is_counted_and_said() {
    require_root();
    // Python's start-up makes hundreds of stacks in milliseconds: far more than 4 KiB of stack records, which
    // the reader takes every 20 ms (without Python frames, nothing wakes it sooner).
    let out = Command::new(alloctrace())
        .args(["leaks", "--buffer-size", "4KiB", "--no-python-frames", "--"])
        .args([
            "/usr/bin/python3",
            "-c",
            "import json, decimal, email.parser",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("records dropped (ring buffer full)"),
        "{text}"
    );
    assert!(text.contains("WARNING: data was lost"), "{text}");
}

#[test]
fn sampled_live_bytes_are_an_estimate_within_its_error() {
    require_root();
    let many = workload("many");
    let report = trace_json(
        &["leaks", "--top", "3", "--sample-every", "16KiB"],
        &[many.as_os_str(), OsStr::new("many"), OsStr::new("1000000")],
    );
    assert_eq!(report["sampled_every_bytes"], 16 << 10, "{report:#}");
    let site = report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["size_histogram"]["max"] == 16)
        .expect("the 16-byte site");
    let estimate = site["live_bytes"].as_f64().unwrap();
    let error = site["live_bytes_error"].as_f64().unwrap();
    let truth = 16_000_000.0;
    println!("sampled every 16 KiB: {estimate} ± {error} bytes for {truth}");
    // About a thousand samples: a standard error of about 3%. Five of them are missed once in 1.7 million runs.
    assert!(error > 0.0 && error < 0.06 * truth, "{site:#}");
    assert!((estimate - truth).abs() < 5.0 * error, "{site:#}");
    // The 8 MB array of pointers is far above the interval: sampled with certainty, and exact.
    let array = report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["size_histogram"]["max"] == 8_000_000)
        .expect("the array of pointers");
    assert_eq!(live(array), (8_000_000, 1), "{array:#}");
    assert_eq!(report["complete"], true, "{report:#}");
}
