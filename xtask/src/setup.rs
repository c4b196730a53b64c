//! `cargo xtask setup`: the eBPF build chain, installed only where missing, so it is cheap to run every time.
//! - rust-src for the nightly toolchain (`-Z build-std=core` for the BPF target);
//! - bpf-linker, built against nightly's own LLVM (there is no prebuilt one for it), rebuilt when the one on
//!   PATH is missing or linked to another LLVM. The LLVM it links is reached through a folder of links under
//!   `~/.local/share/alloctrace/`, recorded as its rpath, so it runs outside cargo too.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::check;

pub fn run() -> anyhow::Result<()> {
    if !output(Command::new("rustup").args(["toolchain", "list"]))?.contains("nightly") {
        check(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if !components.lines().any(|c| c.starts_with("rust-src")) {
        check(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    bpf_linker()
}

fn output(command: &mut Command) -> anyhow::Result<String> {
    let out = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Nightly's LLVM library: its path, and its major version (`libLLVM.so.22.1-rust-…` → 22).
fn nightly_llvm() -> anyhow::Result<(PathBuf, u32)> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let library = std::fs::read_dir(&lib)
        .with_context(|| format!("cannot list {}", lib.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("libLLVM.so.") && !path.is_symlink()
        })
        .with_context(|| format!("nightly ships no libLLVM.so.* in {}", lib.display()))?;
    let name = library.file_name().unwrap_or_default().to_string_lossy();
    let major = name
        .trim_start_matches("libLLVM.so.")
        .split(['.', '-'])
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("cannot read an LLVM version from {name}"))?;
    Ok((library, major))
}

/// The libLLVM file name the installed bpf-linker needs, or `None` when there is no bpf-linker.
fn linked_llvm() -> Option<String> {
    let linker = Command::new("which").arg("bpf-linker").output().ok()?;
    let linker = String::from_utf8_lossy(&linker.stdout).trim().to_owned();
    if linker.is_empty() {
        return None;
    }
    let ldd = Command::new("ldd").arg(&linker).output().ok()?;
    String::from_utf8_lossy(&ldd.stdout)
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with("libLLVM"))
        .and_then(|line| line.split_whitespace().next())
        .map(str::to_owned)
}

const BPF_LINKER_VERSION: &str = "0.13.0";

fn bpf_linker() -> anyhow::Result<()> {
    let (library, major) = nightly_llvm()?;
    let soname = library
        .file_name()
        .context("libLLVM has a file name")?
        .to_string_lossy()
        .into_owned();
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let prefix = Path::new(&home).join(".local/share/alloctrace/llvm");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;
    // Both the generic name (what bpf-linker's build looks for) and the soname (what it loads at run time).
    for name in ["libLLVM.so", soname.as_str()] {
        let link = lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&library, &link)
            .with_context(|| format!("cannot link {}", link.display()))?;
    }
    if linked_llvm().as_deref() == Some(soname.as_str()) {
        return Ok(());
    }
    eprintln!("xtask: building bpf-linker against nightly's LLVM {major} (about a minute)");
    check(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                // The release this recipe was verified with: a newer one may drop the LLVM feature nightly
                // needs.
                "--version",
                BPF_LINKER_VERSION,
                "--force",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix),
    )?;
    match linked_llvm() {
        Some(linked) if linked == soname => Ok(()),
        other => bail!(
            "bpf-linker was installed but links {other:?}, not {soname}: is ~/.cargo/bin on PATH?"
        ),
    }
}
