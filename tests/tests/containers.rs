//! Containers chosen by name: started after the tracer, each traced from its first moments in its own libc,
//! exactly, and each site attributed to its own container.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
};

use alloctrace_tests::{
    SITES_EXPECTED, docker, live, pyenv_prefix, ready::alloctrace_with_ready_fd, require_root,
    workload, workspace,
};
use serde_json::Value;

/// An image of pyenv's 3.12, with a libc and a loader of its own.
fn image() -> String {
    docker::python_image(&pyenv_prefix("3.12"), "3.12")
}

#[test]
fn two_containers_started_after_the_tracer_are_traced_exactly_by_name() {
    require_root();
    docker::require_docker();
    let image = image();
    let sites = workload("sites");
    let names: Vec<String> = ["a", "b"]
        .iter()
        .map(|s| format!("alloctrace-{s}-{}", std::process::id()))
        .collect();
    let report_path =
        std::env::temp_dir().join(format!("alloctrace-containers-{}.json", std::process::id()));
    let (mut command, mut ready) = alloctrace_with_ready_fd();
    let mut tracer = command
        .args([
            "leaks",
            "--format",
            "json",
            "--top",
            "200",
            "--group-by",
            "container",
            "-o",
        ])
        .arg(&report_path)
        .args(names.iter().flat_map(|n| ["--container", n.as_str()]))
        .spawn()
        .unwrap();
    ready.wait_ready();
    let mut line = String::new();
    // Both started after the tracer, allocating only once told to.
    let workloads = workspace().join("target/workloads");
    let mut containers = Vec::new();
    for name in &names {
        let mut container = Command::new("docker")
            .args([
                "run",
                "-i",
                "--rm",
                "--network",
                "none",
                "--name",
                name,
                "-v",
            ])
            .arg(format!("{}:/w:ro", workloads.display()))
            .arg(&image)
            .arg(Path::new("/w").join(sites.file_name().unwrap()))
            .arg("--wait")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(container.stdout.take().unwrap());
        line.clear();
        out.read_line(&mut line).unwrap();
        assert_eq!(line, "ready\n");
        containers.push((container, docker::container_pid(name)));
    }
    // Each container's process is announced once its probes are in place.
    let pids: Vec<u32> = containers.iter().map(|(_, pid)| *pid).collect();
    ready.wait_attached(&pids);
    for (container, _) in &mut containers {
        writeln!(container.stdin.as_mut().unwrap()).unwrap();
        container.wait().unwrap();
    }
    // SAFETY: signalling the child we spawned and have not reaped.
    unsafe { libc::kill(tracer.id() as libc::pid_t, libc::SIGINT) };
    assert!(tracer.wait().unwrap().success());
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    std::fs::remove_file(&report_path).unwrap();
    assert_eq!(report["complete"], true, "{report:#}");
    // Summed by container: each holds at least its workload's sites.
    let held: u64 = SITES_EXPECTED.iter().map(|(_, _, bytes, _)| bytes).sum();
    for name in &names {
        let group = report["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["key"] == name.as_str())
            .unwrap_or_else(|| panic!("no group for {name}: {report:#}"));
        assert!(group["live_bytes"].as_u64().unwrap() >= held, "{group:#}");
        assert_eq!(group["container"]["name"], name.as_str());
    }
    for ((_, pid), name) in containers.iter().zip(&names) {
        for (kind, function, bytes, count) in SITES_EXPECTED {
            let site = report["sites"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| {
                    s["pid"] == *pid && s["kind"] == kind && s["stack"][0]["function"] == function
                })
                .unwrap_or_else(|| panic!("no {kind} site in {function} of {name}: {report:#}"));
            assert_eq!(live(site), (bytes, count), "{name}: {site:#}");
            assert_eq!(site["container"]["name"], name.as_str(), "{site:#}");
        }
    }
}
