//! What each alloctrace run's report must show for its numbers to count: the whole list of sites, and Python
//! frames where its configuration reads them and none where it does not. With Python frames, the CPython
//! loop's report must hold every allocation of the loop with all its Python frames; the other Python workloads,
//! whose allocations are not known in advance, must have sites with frames of their script.

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

/// The exact Python stack of a loop's allocations.
#[derive(Clone)]
pub struct PythonLoop {
    /// The function whose loop allocates: the innermost Python frame of the loop's stacks.
    pub function: &'static str,
    /// Python frames at each allocation.
    pub depth: usize,
    /// Allocations (captured stacks) per iteration.
    pub stacks_per_iteration: u64,
}

/// With Python frames (`expected`), the report of a run of `file` has its sites with Python frames, all the
/// loop's allocations when `exact` gives the loop and its iterations; without, no frame of any site is Python.
pub fn check_python_frames(
    report: &Value,
    expected: bool,
    file: &str,
    exact: Option<(&PythonLoop, u64)>,
) -> anyhow::Result<()> {
    let sites = report["sites"]
        .as_array()
        .context("the report has no sites")?;
    ensure!(
        report["site_count"].as_u64() == Some(sites.len() as u64),
        "the report lists {} of its {} sites",
        sites.len(),
        report["site_count"]
    );
    if !expected {
        if let Some(site) = sites.iter().find(|site| !python_frames(site).is_empty()) {
            bail!(
                "--no-python-frames, yet a site has Python frames: {}",
                site["stack"]
            );
        }
        return Ok(());
    }
    let interpreter = &report["processes"][0]["python"];
    ensure!(
        interpreter.is_object() && interpreter["unsupported"].is_null(),
        "alloctrace did not read the interpreter's frames: `python` is {interpreter}"
    );
    let Some((python_loop, iterations)) = exact else {
        ensure!(
            sites
                .iter()
                .any(|site| python_frames(site).iter().any(|f| f["file"] == file)),
            "no site has a Python frame of {file}"
        );
        return Ok(());
    };
    let mut allocations = 0;
    let mut loop_sites = 0;
    for site in sites {
        let frames = python_frames(site);
        let Some(innermost) = frames.first() else {
            continue;
        };
        if innermost["function"] != python_loop.function || innermost["file"] != file {
            continue;
        }
        let names: Vec<String> = frames
            .iter()
            .map(|f| format!("{}:{}", f["function"], f["line"]))
            .collect();
        ensure!(
            frames.len() == python_loop.depth,
            "a site of the loop has {} Python frames, not {}: {}",
            frames.len(),
            python_loop.depth,
            names.join(" < ")
        );
        loop_sites += 1;
        allocations += site["total_count"]
            .as_u64()
            .context("a site without a total_count")?;
    }
    let expected_allocations = iterations * python_loop.stacks_per_iteration;
    // Lost records (shown in the table) leave fewer allocations, but never none.
    let lost = report["lost"]
        .as_object()
        .is_some_and(|lost| lost.values().any(|n| n.as_u64() != Some(0)));
    ensure!(
        allocations == expected_allocations
            || lost && (1..expected_allocations).contains(&allocations),
        "{allocations} allocations in {loop_sites} sites of the loop with Python frames ({file}:{}), not {}: the \
         others were recorded without them, or the loop allocates differently",
        python_loop.function,
        expected_allocations
    );
    Ok(())
}

fn python_frames(site: &Value) -> Vec<&Value> {
    site["stack"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|frame| frame["lang"] == "python")
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const FILE: &str = "/bench/alloc_loop.py";

    fn python_loop() -> PythonLoop {
        PythonLoop {
            function: "allocate",
            depth: 3,
            stacks_per_iteration: 2,
        }
    }

    fn exact(report: &Value, expected: bool) -> anyhow::Result<()> {
        check_python_frames(report, expected, FILE, Some((&python_loop(), 10)))
    }

    /// A report with a native-only site, and the loop's two sites with these Python frames (innermost first).
    fn report(loop_frames: &[&str], counts: [u64; 2], lost: u64) -> Value {
        let python: Vec<Value> = loop_frames
            .iter()
            .map(|f| json!({"lang": "python", "function": f, "file": FILE, "line": 1}))
            .collect();
        let site = |count: u64| {
            let mut stack = vec![json!({"lang": "native", "function": "malloc"})];
            stack.extend(python.iter().cloned());
            json!({"total_count": count, "stack": stack})
        };
        json!({
            "lost": {"events": lost, "stacks": 0},
            "processes": [{"python": {"version": "3.11", "unsupported": null}}],
            "site_count": 3,
            "sites": [
                {"total_count": 7, "stack": [{"lang": "native", "function": "calloc"}]},
                site(counts[0]),
                site(counts[1]),
            ],
        })
    }

    #[test]
    fn python_frames_of_every_allocation_pass() {
        let frames = ["allocate", "main", "<module>"];
        exact(&report(&frames, [10, 10], 0), true).unwrap();
        // Lost records leave fewer allocations.
        exact(&report(&frames, [10, 9], 1), true).unwrap();
    }

    #[test]
    fn missing_or_shallow_python_frames_fail() {
        let check = |frames: &[&str], counts, lost| exact(&report(frames, counts, lost), true);
        // No loop site: none has Python frames.
        assert!(check(&[], [10, 10], 0).is_err());
        assert!(check(&["allocate", "main"], [10, 10], 0).is_err());
        // Some allocations recorded without their Python frames.
        assert!(check(&["allocate", "main", "<module>"], [10, 9], 0).is_err());
    }

    #[test]
    fn python_frames_fail_without_python_frames() {
        let check = |frames: &[&str]| exact(&report(frames, [10, 10], 0), false);
        check(&[]).unwrap();
        assert!(check(&["allocate", "main", "<module>"]).is_err());
    }

    #[test]
    fn a_cut_report_fails() {
        let mut cut = report(&["allocate", "main", "<module>"], [10, 10], 0);
        cut["site_count"] = json!(4);
        assert!(exact(&cut, true).is_err());
    }

    #[test]
    fn frames_of_the_script_pass_when_the_loop_is_not_known() {
        let seen = |report: &Value, file: &str| check_python_frames(report, true, file, None);
        seen(&report(&["decode", "<module>"], [3, 2], 0), FILE).unwrap();
        assert!(seen(&report(&["decode", "<module>"], [3, 2], 0), "/other.py").is_err());
        assert!(seen(&report(&[], [3, 2], 0), FILE).is_err());
    }
}
