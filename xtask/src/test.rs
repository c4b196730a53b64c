//! `cargo xtask test`: setup, the unit tests (no root), then the integration tests in `tests/`, which load real
//! probes into this kernel and so run as root. They find the binary through `ALLOCTRACE`.

use std::process::Command;

use crate::{as_root, build, check, packages, root};

/// What the integration tests run besides glibc: other allocators, preloaded or built in, and setpriv for the
/// not-root test.
const TEST_PACKAGES: [&str; 5] = [
    "libjemalloc2",
    "libtcmalloc-minimal4",
    "libmimalloc2.0",
    "musl-tools",
    "util-linux",
];

pub fn run(filter: Option<String>) -> anyhow::Result<()> {
    let alloctrace = build::run()?;
    packages::ensure(&TEST_PACKAGES, "the integration tests")?;
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
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut integration = as_root(cargo)?;
    integration
        .args(["test", "--release", "--package", "alloctrace-tests", "--"])
        .args(filter)
        .env("ALLOCTRACE", &alloctrace)
        .current_dir(root());
    check(&mut integration)
}
