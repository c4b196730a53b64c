//! `cargo xtask build`: setup, then the release build of `alloctrace` (its build script builds the eBPF
//! programs with nightly and embeds them).

use std::{path::PathBuf, process::Command};

use crate::{check, root, setup};

/// Builds and returns the path of the binary.
pub fn run() -> anyhow::Result<PathBuf> {
    setup::run()?;
    check(
        Command::new("cargo")
            .args(["build", "--release", "--package", "tracer"])
            .current_dir(root()),
    )?;
    Ok(root().join("target/release/alloctrace"))
}
