//! Stacks through code built without frame pointers: a mapping system call made outside the allocator sends a
//! window of the user stack, which alloctrace unwinds with the modules' `.eh_frame`. An application function
//! that calls libc's `sbrk` or `mmap` is named in its stack (the frame-pointer walk stops inside libc), with
//! its exact bytes; two callers of the same wrapper are two sites; and a Python process keeps its Python
//! frames, merged into a native stack that now reaches the interpreter's entry point. Allocator calls keep the
//! kernel's frame-pointer walk, cut where the CFI says a frame keeps no frame pointer: the noise past it
//! neither splits a site nor names callers that never called.

use serde_json::Value;

use alloctrace_tests::{
    live, optimized_workload, pyenv_prefix, require_root, sites_through, trace_json,
    workload_without_frame_pointers, workspace,
};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// The functions of a site's stack, innermost first (`?` for a frame without a name).
fn functions(site: &Value) -> Vec<&str> {
    site["stack"]
        .as_array()
        .expect("a stack")
        .iter()
        .map(|f| f["function"].as_str().unwrap_or("?"))
        .collect()
}

#[test]
fn unwind_names_the_callers_of_libc_mapping_wrappers_with_their_bytes() {
    require_root();
    let program = optimized_workload("unwind");
    let report = trace_json(&["leaks", "--top", "1000"], &[program.as_os_str()]);
    for (function, kind, wrapper, bytes) in [
        ("grow_break", "brk", "sbrk", MIB),
        ("grow_break_more", "brk", "sbrk", 3 * MIB),
        ("map_directly", "mmap", "mmap", 5 * PAGE),
    ] {
        let sites = sites_through(&report, function);
        assert_eq!(sites.len(), 1, "one site through {function}: {report:#}");
        let site = sites[0];
        assert_eq!(site["kind"], kind, "{site:#}");
        assert_eq!(live(site), (bytes, 1), "{function}: {site:#}");
        // libc's frames, then the application's: the function, called by main.
        let stack = functions(site);
        let at = stack.iter().position(|&f| f == function).unwrap();
        assert!(at > 0, "{function} is not the innermost frame: {stack:?}");
        let libc = &site["stack"][at - 1]["module"];
        assert!(
            libc.as_str().is_some_and(|m| m.contains("libc.so")),
            "{function} is called from libc's {wrapper}: {site:#}"
        );
        assert!(
            stack[..at].iter().any(|f| f.contains(wrapper)),
            "{wrapper} is in the stack: {stack:?}"
        );
        assert_eq!(stack.get(at + 1), Some(&"main"), "{stack:?}");
        let caller = &site["stack"][at];
        assert!(
            caller["file"]
                .as_str()
                .is_some_and(|f| f.ends_with("unwind.c")),
            "{caller:#}"
        );
    }
    assert_eq!(report["lost"]["events"], 0, "{report:#}");
}

#[test]
fn unwind_keeps_python_frames_merged_into_the_native_stack() {
    require_root();
    let python = pyenv_prefix("3.11").join("bin/python3.11");
    let script = workspace().join("tests/workloads/pymapped.py");
    let report = trace_json(
        &["leaks", "--top", "1000"],
        &[python.as_os_str(), script.as_os_str()],
    );
    let sites = sites_through(&report, "map_pages");
    let mapped: Vec<&&Value> = sites.iter().filter(|s| s["kind"] == "mmap").collect();
    assert_eq!(mapped.len(), 1, "one mmap site in map_pages: {report:#}");
    let site = mapped[0];
    assert_eq!(live(site), (5 * PAGE, 1), "{site:#}");
    let stack = site["stack"].as_array().unwrap();
    let first_python = stack
        .iter()
        .position(|f| f["lang"] == "python")
        .expect("Python frames");
    let source = std::fs::read_to_string(&script).unwrap();
    let line = source
        .lines()
        .position(|l| l.contains("marker: map"))
        .unwrap() as u64
        + 1;
    assert_eq!(stack[first_python]["function"], "map_pages", "{site:#}");
    assert_eq!(stack[first_python]["line"], line, "{site:#}");
    assert_eq!(stack[first_python + 1]["function"], "<module>", "{site:#}");
    // The unwind went through the interpreter's C frames to its entry point, past the Python frames: the
    // frame-pointer walk stops in libc's mmap.
    let names = functions(site);
    assert!(
        names[first_python..].contains(&"Py_RunMain"),
        "the native stack reaches Py_RunMain: {names:?}"
    );
    assert_eq!(report["lost"]["events"], 0, "{report:#}");
}

/// The frame that ends a stack cut at a function without a frame pointer.
const NOT_WALKED: &str = "(outer frames not walked: the last frame keeps no frame pointer)";

#[test]
fn unwind_cuts_the_walk_at_a_function_without_a_frame_pointer() {
    require_root();
    let program = workload_without_frame_pointers("nofp");
    let report = trace_json(&["leaks", "--top", "1000"], &[program.as_os_str()]);
    // `allocate` is called 3,000 times from one caller with 100 bytes and 2,000 times from another with 1,000,
    // and keeps every block. Its frame pointer is not its own: the walk past it read what its callers left in
    // rbp, which made two sites named after functions that never called.
    let sites: Vec<&Value> = sites_through(&report, "allocate")
        .into_iter()
        .filter(|s| s["kind"] == "malloc")
        .collect();
    assert_eq!(
        sites.len(),
        1,
        "one malloc site through allocate: {report:#}"
    );
    let site = sites[0];
    assert_eq!(live(site), (3000 * 100 + 2000 * 1000, 5000), "{site:#}");
    assert_eq!(site["total_count"], 5000, "{site:#}");
    assert_eq!(functions(site), ["allocate", NOT_WALKED], "{site:#}");
    let marker = &site["stack"][1];
    assert!(
        marker["module"].is_null() && marker["offset"].is_null() && marker["lang"] == "native",
        "{marker:#}"
    );
    assert_eq!(report["lost"]["events"], 0, "{report:#}");
    assert_eq!(report["complete"], true, "{report:#}");
}

#[test]
fn unwind_walks_code_with_frame_pointers_to_the_first_function_without() {
    require_root();
    // The same program built with frame pointers: each caller is its own site, walked through `main` up to
    // glibc's `__libc_start_call_main`, which keeps none.
    let program = optimized_workload("nofp");
    let report = trace_json(&["leaks", "--top", "1000"], &[program.as_os_str()]);
    for (caller, bytes, count) in [
        ("from_first", 3000 * 100, 3000),
        ("from_second", 2000 * 1000, 2000),
    ] {
        let sites = sites_through(&report, caller);
        assert_eq!(sites.len(), 1, "one site through {caller}: {report:#}");
        let site = sites[0];
        assert_eq!(live(site), (bytes, count), "{site:#}");
        let stack = functions(site);
        assert_eq!(stack.len(), 5, "{site:#}");
        assert_eq!(stack[..3], ["allocate", caller, "main"], "{site:#}");
        assert!(
            site["stack"][3]["module"]
                .as_str()
                .is_some_and(|m| m.contains("libc.so")),
            "main is called from libc: {site:#}"
        );
        assert_eq!(stack[4], NOT_WALKED, "{site:#}");
    }
    assert_eq!(report["lost"]["events"], 0, "{report:#}");
}
