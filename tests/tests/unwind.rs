//! Stacks through code built without frame pointers: a mapping system call made outside the allocator sends a
//! window of the user stack, which alloctrace unwinds with the modules' `.eh_frame`. An application function
//! that calls libc's `sbrk` or `mmap` is named in its stack (the frame-pointer walk stops inside libc), with
//! its exact bytes; two callers of the same wrapper are two sites; and a Python process keeps its Python
//! frames, merged into a native stack that now reaches the interpreter's entry point.

use serde_json::Value;

use alloctrace_tests::{
    live, optimized_workload, pyenv_prefix, require_root, sites_through, trace_json, workspace,
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
