//! A target that makes ever new stacks while holding nothing must not make the tracer grow without bound: the
//! table of stacks has a limit, and what passes it is counted, never hidden.

use alloctrace_tests::{
    assert_tracer_rss_bounded, require_root, sites_through, trace_json, workload,
};

#[test]
fn a_flood_of_distinct_stacks_is_bounded_and_counted() {
    require_root();
    let flood = workload("hostile_stacks");
    let report = trace_json(&["leaks", "--top", "5"], &[flood.as_os_str()]);
    assert_tracer_rss_bounded(&report, "65,536 distinct stacks");
    // Every path freed what it allocated.
    for site in sites_through(&report, "leaf") {
        assert_eq!(site["live_bytes"], 0, "{site:#}");
    }
    // Past the table's limit, the stacks not kept are said to be lost.
    let bounded = trace_json(
        &["leaks", "--top", "5", "--max-stacks", "1000"],
        &[flood.as_os_str()],
    );
    let lost = &bounded["lost"];
    assert!(lost["stacks"].as_u64().unwrap() > 60_000, "{lost:#}");
    assert_eq!(bounded["complete"], false);
}
