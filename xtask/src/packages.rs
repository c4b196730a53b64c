//! Debian packages that tests and the bench need, installed only where missing: a fresh machine has none of
//! them, and its package lists may be absent or stale, so `apt-get update` runs only when an install needs it.

use std::process::Command;

use anyhow::Context as _;

use crate::{as_root, check};

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

/// Installs whichever of `packages` is missing; `why` says what needs them, for the log and the error.
pub fn ensure(packages: &[&str], why: &str) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {} for {why}", missing.join(" "));
    let install = || -> anyhow::Result<()> {
        check(
            as_root("apt-get")?
                .args(["install", "-y", "-q"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    if install().is_err() {
        check(as_root("apt-get")?.args(["update", "-q"]))
            .and_then(|()| install())
            .with_context(|| format!("cannot install {} for {why}", missing.join(" ")))?;
    }
    Ok(())
}
