//! `cargo xtask test`: setup, the unit tests (no root), then the integration tests in `tests/`, which load real
//! probes into this kernel and so run as root. They find the binary through `ALLOCTRACE`.

use std::{
    fs::File,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{as_root, build, check, packages, root};

/// What the integration tests run besides glibc: other allocators, preloaded or built in, setpriv for the
/// not-root test, a Docker engine for containers, Prometheus to scrape the agent, Go for `go tool pprof`,
/// headless Chromium for the HTML page, and glibc's separate debug files for source lines in libc.
const TEST_PACKAGES: [&str; 10] = [
    "libc6-dbg",
    "libjemalloc2",
    "libtcmalloc-minimal4",
    "libmimalloc2.0",
    "musl-tools",
    "util-linux",
    "docker.io",
    // `go tool pprof` reads the pprof output; headless Chromium loads the HTML page.
    "golang-go",
    "chromium",
    "prometheus",
];

/// How long dockerd may take to answer once started.
const DOCKERD_START: Duration = Duration::from_secs(60);

fn docker_answers() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts a Docker engine when none answers: without iptables or a bridge (no network is needed, and this
/// machine's sandbox allows neither), logging to `target/dockerd.log`. Returns the engine it started, if any.
fn ensure_dockerd() -> anyhow::Result<Option<Child>> {
    if docker_answers() {
        return Ok(None);
    }
    let log_path = root().join("target/dockerd.log");
    let log =
        File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    eprintln!("xtask: starting dockerd (log: {})", log_path.display());
    let mut dockerd = as_root("dockerd")?
        .args(["--iptables=false", "--bridge=none"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("cannot start dockerd")?;
    let started = Instant::now();
    while started.elapsed() < DOCKERD_START {
        if docker_answers() {
            return Ok(Some(dockerd));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let _ = dockerd.kill();
    bail!(
        "dockerd did not answer within {DOCKERD_START:?}: see {}",
        log_path.display()
    )
}

pub fn run(filter: Option<String>) -> anyhow::Result<()> {
    let alloctrace = build::run()?;
    check(
        Command::new("cargo")
            .args([
                "test",
                "--release",
                "--package",
                "tracer",
                "--package",
                "tracer-common",
                "--package",
                "xtask",
            ])
            .current_dir(root()),
    )?;
    packages::ensure(&TEST_PACKAGES, "the integration tests")?;
    let dockerd = ensure_dockerd()?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut integration = as_root(cargo)?;
    integration
        .args(["test", "--release", "--package", "alloctrace-tests", "--"])
        .args(filter)
        .env("ALLOCTRACE", &alloctrace)
        .current_dir(root());
    let result = check(&mut integration);
    // An engine this task started is stopped again: nothing is left running behind the tests.
    if let Some(mut dockerd) = dockerd {
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(dockerd.id() as libc::pid_t, libc::SIGTERM) };
        let _ = dockerd.wait();
    }
    result
}
