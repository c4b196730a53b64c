//! The private copy of the allocator's library that every configuration runs its workload on, reached through
//! `LD_LIBRARY_PATH`, because of two limits of Debian's bpftrace 0.17. Its uprobes are not scoped to a process,
//! even with `-c` or `-p`: on the system's libc they would fire in every process on the host, slowing the host
//! and the bench with it. And it refuses a probe inside a function, having no disassembler to check the
//! instruction boundary (`--unsafe` does not help), where alloctrace probes `free` past its NULL check. So the
//! copy gets a symbol at each of alloctrace's entry points, `alloctrace_<function>_entry`, which bpftrace can
//! probe by name. The copy's code is the library's, byte for byte, and every alloctrace run checks that it
//! probes the copy at the places it chose on the original.

use std::{
    collections::BTreeSet,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

use super::{
    process::{read_report, remove_stale, run_captured},
    workloads::Workload,
};
use crate::{as_root, check};

/// Where alloctrace puts one function's probes, from its JSON report.
#[derive(Debug, PartialEq)]
pub struct Placement {
    pub function: String,
    /// ELF virtual address of the function's start, where its return probe goes.
    pub address: u64,
    pub file_offset: u64,
    /// Bytes past the start where its entry probe goes.
    pub entry_offset: u64,
}

impl Placement {
    /// The symbol the bench adds to its copy of the library at the entry probe.
    pub fn entry_symbol(&self) -> String {
        format!("alloctrace_{}_entry", self.function)
    }
}

pub struct Library {
    pub dir: PathBuf,
    pub path: PathBuf,
    pub placements: Vec<Placement>,
}

impl Library {
    /// `LD_LIBRARY_PATH=DIR`, for `env`: sudo and bpftrace's `-c` would not pass the variable on otherwise.
    pub fn env_assignment(&self) -> OsString {
        let mut assignment = OsString::from("LD_LIBRARY_PATH=");
        assignment.push(&self.dir);
        assignment
    }
}

/// Finds where alloctrace probes the workload's allocator with a short run, then makes the copy of that
/// library, with a symbol at each entry probe.
pub fn library(alloctrace: &Path, workload: &Workload, work: &Path) -> anyhow::Result<Library> {
    let report_path = work.join("placements.json");
    remove_stale(&report_path)?;
    let mut command = as_root(alloctrace)?;
    command
        .args(["leaks", "--format", "json", "-o"])
        .arg(&report_path)
        .arg("--")
        .args(workload.command(workload.placement_iterations));
    let outcome = run_captured(&mut command, &work.join("placements.log"))?;
    if !outcome.status.success() {
        bail!(
            "alloctrace's short run of the {} workload failed ({}):\n{}",
            workload.key,
            outcome.status,
            outcome.tail()
        );
    }
    let (original, placements) = allocator(&read_report(&report_path)?)?;
    let dir = work.join("lib");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(
        original
            .file_name()
            .with_context(|| format!("{} has no file name", original.display()))?,
    );
    let mut objcopy = Command::new("objcopy");
    for placement in &placements {
        objcopy.arg("--add-symbol").arg(format!(
            "{}={:#x},global,function",
            placement.entry_symbol(),
            placement.address + placement.entry_offset
        ));
    }
    check(objcopy.arg(&original).arg(&path))?;
    let names: Vec<String> = placements.iter().map(Placement::entry_symbol).collect();
    size_added_symbols(&path, &names)?;
    Ok(Library {
        dir,
        path,
        placements,
    })
}

/// The traced process's allocator library and the places alloctrace probed in it.
pub fn allocator(report: &Value) -> anyhow::Result<(PathBuf, Vec<Placement>)> {
    let pid = &report["processes"][0]["pid"];
    let allocator = report["allocators"]
        .as_array()
        .and_then(|all| all.iter().find(|a| a["pid"] == *pid))
        .context("alloctrace's report names no allocator for the workload")?;
    let path = allocator["path"]
        .as_str()
        .context("allocator without a path")?;
    let hex = |probe: &Value, key: &str| {
        probe[key]
            .as_str()
            .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
            .with_context(|| format!("probe without a hex {key}: {probe}"))
    };
    let placements = allocator["probes"]
        .as_array()
        .context("allocator without probes")?
        .iter()
        .map(|probe| {
            Ok(Placement {
                function: probe["function"]
                    .as_str()
                    .with_context(|| format!("probe without a function: {probe}"))?
                    .to_owned(),
                address: hex(probe, "address")?,
                file_offset: hex(probe, "file_offset")?,
                entry_offset: probe["entry_offset"]
                    .as_u64()
                    .with_context(|| format!("probe without an entry_offset: {probe}"))?,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok((PathBuf::from(path), placements))
}

/// objcopy adds symbols of size 0, where bpftrace 0.17 refuses any probe ("Offset outside the function
/// bounds"): this gives the named ones a size of one byte, in the copy's `.symtab`.
fn size_added_symbols(path: &Path, names: &[String]) -> anyhow::Result<()> {
    const SHT_SYMTAB: u64 = 2;
    let mut elf = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    ensure!(
        elf.starts_with(b"\x7fELF\x02\x01"),
        "{} is not a 64-bit little-endian ELF file",
        path.display()
    );
    let shoff = field(&elf, 0x28, 8)?;
    let shentsize = field(&elf, 0x3a, 2)?;
    let header = |index: u64| shoff + index * shentsize;
    let mut symtab = None;
    for index in 0..field(&elf, 0x3c, 2)? {
        if field(&elf, header(index) + 4, 4)? == SHT_SYMTAB {
            symtab = Some(header(index));
        }
    }
    let symtab =
        symtab.with_context(|| format!("objcopy left no .symtab in {}", path.display()))?;
    let (start, size) = (
        field(&elf, symtab + 0x18, 8)?,
        field(&elf, symtab + 0x20, 8)?,
    );
    let entry_size = field(&elf, symtab + 0x38, 8)?;
    ensure!(entry_size >= 24, "{}: odd .symtab entries", path.display());
    let strtab = field(&elf, header(field(&elf, symtab + 0x28, 4)?) + 0x18, 8)?;
    let mut missing: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    for entry in (start..start + size).step_by(entry_size as usize) {
        let name_at = (strtab + field(&elf, entry, 4)?) as usize;
        let name = elf
            .get(name_at..)
            .and_then(|rest| rest.split(|&b| b == 0).next())
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        if missing.remove(name.as_ref()) {
            let st_size = (entry + 16) as usize;
            elf.get_mut(st_size..st_size + 8)
                .context("truncated ELF file")?
                .copy_from_slice(&1u64.to_le_bytes());
        }
    }
    ensure!(
        missing.is_empty(),
        "objcopy did not add {missing:?} to {}",
        path.display()
    );
    fs::write(path, elf).with_context(|| format!("cannot write {}", path.display()))
}

/// A little-endian field of `len` bytes at `at`.
fn field(elf: &[u8], at: u64, len: usize) -> anyhow::Result<u64> {
    let bytes = usize::try_from(at)
        .ok()
        .and_then(|at| elf.get(at..at + len))
        .context("truncated ELF file")?;
    Ok(bytes
        .iter()
        .rev()
        .fold(0, |value, &byte| value << 8 | u64::from(byte)))
}
