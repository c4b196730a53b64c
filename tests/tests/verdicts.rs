//! Verdicts on workloads built to be each one, and the `large` command.

use alloctrace_tests::{require_root, site, trace_json, workload};

#[test]
fn each_site_gets_the_verdict_it_was_built_for() {
    require_root();
    let verdicts = workload("verdicts");
    let report = trace_json(&["leaks", "--top", "1000"], &[verdicts.as_os_str()]);
    for (function, verdict) in [
        ("leak_site", "leak"),
        ("lingering_site", "lingering"),
        ("churn_site", "churn"),
        ("steady_site", "steady"),
    ] {
        let s = site(&report, "malloc", function);
        assert_eq!(s["verdict"], verdict, "{function}: {s:#}");
        assert!(!s["verdict_reason"].as_str().unwrap().is_empty());
    }
    let leak = site(&report, "malloc", "leak_site");
    assert_eq!(
        (leak["live_count"].as_u64(), leak["live_bytes"].as_u64()),
        (Some(60), Some(60_000))
    );
    let h = &leak["size_histogram"];
    assert_eq!(
        (h["count"].as_u64(), h["p50"].as_u64(), h["max"].as_u64()),
        (Some(60), Some(1000), Some(1000))
    );
    let churn = site(&report, "malloc", "churn_site");
    assert_eq!(churn["total_count"], 12_000);
    assert_eq!(churn["freed_count"], 12_000);
    assert!(
        churn["alloc_rate_per_s"].as_f64().unwrap() > 1000.0,
        "{churn:#}"
    );
}

#[test]
fn large_lists_big_live_objects_with_address_age_and_stack() {
    require_root();
    let sites = workload("sites");
    let report = trace_json(&["large", "--min-size", "1MiB"], &[sites.as_os_str()]);
    assert_eq!(report["command"], "large");
    let objects = report["objects"].as_array().unwrap();
    assert_eq!(
        objects.len(),
        1,
        "only the 8 MiB block is 1 MiB or more: {report:#}"
    );
    let object = &objects[0];
    assert_eq!(object["size"], 8 << 20);
    assert_eq!(object["kind"], "malloc");
    assert!(object["address"].as_str().unwrap().starts_with("0x"));
    // Allocated early, kept to the end: about as old as the trace.
    let age = object["age_s"].as_f64().unwrap();
    let duration = report["duration_s"].as_f64().unwrap();
    assert!(
        age > 0.0 && age <= duration,
        "age {age} in a trace of {duration}"
    );
    assert_eq!(object["stack"][0]["function"], "large_site");
    // Lower the bar and the mappings of the dynamic loader show up too, biggest first.
    let report = trace_json(
        &["large", "--min-size", "4KiB", "--top", "100"],
        &[sites.as_os_str()],
    );
    let sizes: Vec<u64> = report["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["size"].as_u64().unwrap())
        .collect();
    assert!(
        sizes.len() > 1 && sizes.windows(2).all(|w| w[0] >= w[1]),
        "{sizes:?}"
    );
}
