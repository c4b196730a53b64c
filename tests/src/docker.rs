//! Real containers for the tests: images built locally (no registry is reachable) from files of this machine,
//! so that each container has its own copies of libc and libpython — different files from the host's, as in
//! every real image.

use std::{
    path::Path,
    process::{Command, Stdio},
    sync::Mutex,
};

/// Fails the test, saying why, when no Docker engine answers.
pub fn require_docker() {
    let info = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    let ok = info.as_ref().is_ok_and(|out| out.status.success());
    assert!(
        ok,
        "no Docker engine answers (`docker info` failed): cargo xtask test installs docker.io and starts dockerd"
    );
}

/// The shared objects `binary` loads, as `ldd` resolves them on this machine.
fn libraries(binary: &Path) -> Vec<String> {
    let out = Command::new("ldd").arg(binary).output().expect("ldd");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|word| word.starts_with('/'))
        .map(str::to_owned)
        .collect()
}

/// Serializes image builds: parallel tests would race on the same tag.
static BUILD: Mutex<()> = Mutex::new(());

/// An image holding pyenv's CPython `prefix` (interpreter, shared libpython, standard library without its
/// tests) and the system libraries it needs, at the same paths as on the host. Built once per tag.
pub fn python_image(prefix: &Path, version: &str) -> String {
    let tag = format!("alloctrace-test-python{version}");
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let exists = Command::new("docker")
        .args(["image", "inspect", &tag])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if exists.is_ok_and(|s| s.success()) {
        return tag;
    }
    let python = prefix.join(format!("bin/python{version}"));
    let libpython = prefix.join(format!("lib/libpython{version}.so.1.0"));
    let stdlib = prefix.join(format!("lib/python{version}"));
    let mut paths: Vec<String> = [&python, &libpython, &stdlib]
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    paths.extend(libraries(&python));
    paths.extend(libraries(&libpython));
    paths.sort();
    paths.dedup();
    let relative: Vec<&str> = paths.iter().map(|p| p.trim_start_matches('/')).collect();
    // -h stores what links point to: the image gets files of its own, not links into the host's.
    let mut tar = Command::new("tar")
        .args(["-C", "/", "-chf", "-"])
        .args([
            "--exclude=*/test",
            "--exclude=*/tests",
            "--exclude=*/idlelib",
            "--exclude=*/tkinter",
        ])
        .args([
            "--exclude=*/ensurepip",
            "--exclude=*/site-packages",
            "--exclude=__pycache__",
        ])
        .args(&relative)
        .stdout(Stdio::piped())
        .spawn()
        .expect("tar");
    let import = Command::new("docker")
        .args(["import", "-", &tag])
        .stdin(tar.stdout.take().unwrap())
        .output()
        .expect("docker import");
    assert!(tar.wait().unwrap().success(), "tar failed building {tag}");
    assert!(
        import.status.success(),
        "docker import failed: {}",
        String::from_utf8_lossy(&import.stderr)
    );
    tag
}

fn inspect(name: &str, format: &str) -> String {
    let out = Command::new("docker")
        .args(["inspect", "--format", format, name])
        .output()
        .expect("docker inspect");
    assert!(
        out.status.success(),
        "docker inspect {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The host pid of container `name`'s first process, once Docker has started it (`docker run` returns before).
pub fn started_container_pid(name: &str) -> u32 {
    let started = std::time::Instant::now();
    loop {
        let out = Command::new("docker")
            .args(["inspect", "--format", "{{.State.Pid}}", name])
            .output()
            .expect("docker inspect");
        let pid: u32 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        if pid != 0 {
            return pid;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "container {name} never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The host pid of a running container's first process.
pub fn container_pid(name: &str) -> u32 {
    inspect(name, "{{.State.Pid}}")
        .parse()
        .unwrap_or_else(|_| panic!("no pid for container {name}"))
}

/// A running container's full id.
pub fn container_id(name: &str) -> String {
    inspect(name, "{{.Id}}")
}
