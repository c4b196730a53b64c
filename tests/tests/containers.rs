//! Containers chosen by name: started after the tracer, each traced from its first moments in its own libc,
//! exactly, and each site attributed to its own container. A container's files are read inside it, even
//! through its absolute symlinks.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
};

use alloctrace_tests::{
    SITES_EXPECTED, docker, interrupt, live, pyenv_prefix, ready::alloctrace_with_ready_fd,
    require_root, site, start_tracing_pid, workload, workspace,
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

/// Runs `command`, failing with its stderr.
fn run(command: &mut Command) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `source` built as `-O1 -g` with the build id `build_id` (hex), to `binary`.
fn build_with_build_id(source: &Path, binary: &Path, build_id: &str) {
    run(Command::new("cc")
        .args(["-O1", "-g", "-fno-omit-frame-pointer", "-pthread"])
        .arg(format!("-Wl,--build-id=0x{build_id}"))
        .arg("-o")
        .arg(binary)
        .arg(source));
}

/// Splits `binary`'s DWARF off into `debug_file`, stripping it from the binary (its symbol table stays).
fn split_debug(binary: &Path, debug_file: &Path) {
    run(Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(binary)
        .arg(debug_file));
    run(Command::new("objcopy").arg("--strip-debug").arg(binary));
}

/// A program in a container whose DWARF is a separate debug file, found under the container's
/// `/usr/lib/debug/.build-id` through an absolute symlink (as distributions that link their debug files
/// there do). The link's target path exists on the host too, holding a debug file of the same build id from
/// other sources: a path followed against the host's root names the frames wrongly. The frames are named
/// from the container's file.
#[test]
fn a_containers_absolute_symlinks_are_followed_inside_the_container() {
    require_root();
    docker::require_docker();
    let image = image();
    let dir = std::env::temp_dir().join(format!("alloctrace-symlinks-{}", std::process::id()));
    let (bin, container_debug, linked, debug_root, decoy) = (
        dir.join("bin"),
        dir.join("container-debug"),
        dir.join("linked"),
        dir.join("usr-lib-debug"),
        dir.join("decoy"),
    );
    let build_id = format!("{:08x}{}", std::process::id(), "5ca1ab1e".repeat(4));
    let id_link = debug_root.join(format!(
        ".build-id/{}/{}.debug",
        &build_id[..2],
        &build_id[2..]
    ));
    for d in [
        &bin,
        &container_debug,
        &linked,
        &decoy,
        id_link.parent().unwrap(),
    ] {
        std::fs::create_dir_all(d).unwrap();
    }
    // The container's program and its debug file, from the workload's source.
    let source = workspace().join("tests/workloads/sites.c");
    build_with_build_id(&source, &bin.join("sites"), &build_id);
    split_debug(&bin.join("sites"), &container_debug.join("sites.debug"));
    // The host's file at the link's target: the same build id, built from a copy of the source moved down by
    // three lines.
    let moved = decoy.join("sites.c");
    let text_before_moving = std::fs::read_to_string(&source).unwrap();
    std::fs::write(&moved, format!("\n\n\n{text_before_moving}")).unwrap();
    build_with_build_id(&moved, &decoy.join("sites"), &build_id);
    split_debug(&decoy.join("sites"), &linked.join("sites.debug"));
    std::os::unix::fs::symlink(linked.join("sites.debug"), &id_link).unwrap();

    let name = format!("alloctrace-symlinks-{}", std::process::id());
    let mount = |from: &Path, to: &Path| format!("{}:{}:ro", from.display(), to.display());
    let mut container = Command::new("docker")
        .args(["run", "-i", "--rm", "--network", "none", "--name", &name])
        .args(["-v", &mount(&bin, Path::new("/w"))])
        .args(["-v", &mount(&debug_root, Path::new("/usr/lib/debug"))])
        // Inside, the link's target is the container's own debug file.
        .args(["-v", &mount(&container_debug, &linked)])
        .arg(&image)
        .args(["/w/sites", "--wait", "--linger"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(container.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    let pid = docker::container_pid(&name);
    let report_path = dir.join("report.json");
    let tracer = start_tracing_pid(
        &["leaks", "--format", "json", "--top", "0"],
        pid,
        &report_path,
    );
    writeln!(container.stdin.as_mut().unwrap()).unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "allocated\n");
    // Reported while the container runs: its root is there to be read.
    interrupt(tracer);
    writeln!(container.stdin.as_mut().unwrap()).unwrap();
    assert!(container.wait().unwrap().success());
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    for (kind, function, text) in [
        ("malloc", "leak_site", "void leak_site"),
        ("calloc", "calloc_site", "void calloc_site"),
    ] {
        let frame = &site(&report, kind, function)["stack"][0];
        let expected_line = 1 + text_before_moving
            .lines()
            .position(|l| l.contains(text))
            .unwrap_or_else(|| panic!("no line of sites.c contains {text:?}"))
            as u64;
        assert_eq!(
            (frame["file"].as_str(), frame["line"].as_u64()),
            (source.to_str(), Some(expected_line)),
            "{function} named from the host's file, not the container's: {frame:#}"
        );
    }
}
