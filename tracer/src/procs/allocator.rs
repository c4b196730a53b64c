//! Which object a process's `malloc` calls bind to, and where in that file each allocator function starts:
//! the places uprobes go. Never a hard-coded path: for a running process the objects come from its
//! `/proc/PID/maps`; for a command about to start, from its dynamic loader's own `--list` resolution.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
};

use anyhow::{Context as _, anyhow, bail};
use tracer_common::AllocFn;

use serde::Serialize;

#[cfg(target_arch = "x86_64")]
use super::prologue;
use super::{
    Registry,
    maps::FileId,
    module::{self, Module},
};

/// The functions an allocator must provide for alloctrace to account for it; the rest of [`AllocFn::ALLOCATOR`] is
/// probed where the object defines it.
const REQUIRED: [AllocFn; 4] = [
    AllocFn::Malloc,
    AllocFn::Calloc,
    AllocFn::Realloc,
    AllocFn::Free,
];

/// One allocator function and where its probes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ProbePoint {
    #[serde(rename = "function", serialize_with = "func_name")]
    pub func: AllocFn,
    /// The function's ELF address.
    #[serde(serialize_with = "crate::procs::hex")]
    pub address: u64,
    /// The file offset of the function's first byte: where return probes go.
    #[serde(serialize_with = "crate::procs::hex")]
    pub file_offset: u64,
    /// Bytes past the start where the entry probe goes (see [`super::prologue`]).
    pub entry_offset: u64,
}

fn func_name<S: serde::Serializer>(func: &AllocFn, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(func.name())
}

/// An allocator object and its probe points.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Allocator {
    /// The path uprobes are attached through (it may be a `/proc/PID/map_files` link).
    #[serde(skip)]
    pub attach_path: PathBuf,
    /// The object's path as reports show it.
    pub path: String,
    #[serde(skip)]
    pub file: Option<FileId>,
    pub probes: Vec<ProbePoint>,
}

impl Allocator {
    /// `Some` when `module` defines every required function. Functions that share an address with one listed
    /// before them (glibc's `aligned_alloc` is `memalign`) are probed once, under the first name.
    fn from_module(
        module: &Module,
        attach_path: PathBuf,
        file: Option<FileId>,
        exported_only: bool,
    ) -> Option<Self> {
        let find = |func: AllocFn| {
            let address = if exported_only {
                module.exported_function(func.name())
            } else {
                module.defined_function(func.name())
            }?;
            Some(ProbePoint {
                func,
                address,
                file_offset: module.file_offset_of_address(address)?,
                entry_offset: 0,
            })
        };
        if !REQUIRED.iter().all(|&func| find(func).is_some()) {
            return None;
        }
        let mut probes: Vec<ProbePoint> = Vec::new();
        for point in AllocFn::ALLOCATOR.into_iter().filter_map(find) {
            if !probes.iter().any(|p| p.address == point.address) {
                probes.push(point);
            }
        }
        Some(Self {
            attach_path,
            path: module.path.clone(),
            file,
            probes,
        })
    }

    /// Moves entry-only probes to their cheapest correct instruction, reading the functions' first bytes (and
    /// nothing else of the file).
    #[cfg(target_arch = "x86_64")]
    fn place_probes(mut self) -> anyhow::Result<Self> {
        let file = module::open_object(&self.attach_path, &self.path)?;
        for point in &mut self.probes {
            if point.func == AllocFn::Free {
                let code = prologue::read_function_start(&file, point.file_offset)
                    .with_context(|| format!("cannot read {}", self.path))?;
                point.entry_offset = prologue::free_probe_offset(&code);
            }
        }
        Ok(self)
    }
}

/// The decoder of `free`'s first instructions reads x86-64's: elsewhere every probe stays on its function's
/// first instruction, which is correct, and costs what the kernel makes a probe there cost.
#[cfg(not(target_arch = "x86_64"))]
impl Allocator {
    fn place_probes(self) -> anyhow::Result<Self> {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            log::warn!(
                "free is probed at its first instruction: the decoder that finds a cheaper one reads x86-64 code only"
            );
        });
        Ok(self)
    }
}

/// Objects in the order the dynamic linker searches them for a symbol: the executable (whose own definitions
/// win even when it exports nothing, as in a static binary), then preloaded and needed libraries, with the C
/// library last so that an allocator linked or preloaded in front of it (jemalloc, tcmalloc, mimalloc) wins.
fn pick(candidates: Vec<(Arc<Module>, PathBuf, Option<FileId>)>) -> Option<Allocator> {
    let is_libc = |path: &str| {
        let name = path.rsplit('/').next().unwrap_or(path);
        name.starts_with("libc.so") || name.starts_with("libc-") || name.starts_with("ld-musl")
    };
    let (libc, others): (Vec<_>, Vec<_>) = candidates
        .into_iter()
        .enumerate()
        .partition(|(_, (m, ..))| is_libc(&m.path));
    others
        .into_iter()
        .chain(libc)
        .find_map(|(position, (module, attach_path, file))| {
            Allocator::from_module(&module, attach_path, file, position != 0)
        })
}

/// The allocator a running process uses.
pub fn for_pid(registry: &mut Registry, pid: u32) -> anyhow::Result<Allocator> {
    registry.refresh(pid);
    let maps = registry
        .maps(pid)
        .cloned()
        .with_context(|| format!("cannot read the memory map of process {pid}"))?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let mut files: Vec<_> = maps.files().into_iter().cloned().collect();
    // The executable first: its definitions take precedence over every library's.
    if let Some(pos) = files
        .iter()
        .position(|m| exe.as_deref() == Some(Path::new(&m.path)))
    {
        let exe = files.remove(pos);
        files.insert(0, exe);
    }
    let candidates = files
        .iter()
        .filter_map(|mapping| {
            let module = registry.module(pid, mapping)?;
            Some((module, super::open_path(pid, mapping), mapping.file))
        })
        .collect();
    pick(candidates)
        .ok_or_else(|| {
            anyhow!("process {pid} maps no object that defines malloc, calloc, realloc and free (a static binary that was stripped?)")
        })?
        .place_probes()
}

/// The allocator a command will use once started: its executable, and the libraries its dynamic loader
/// resolves for it (`ld.so --list`, which loads no program code), in the loader's order.
///
/// The objects read on the way are left in `registry`'s cache: the process maps them moments later, and
/// finding its interpreter then must not wait for a 20 MiB libpython to be parsed again.
pub fn for_command(registry: &mut Registry, exe: &Path) -> anyhow::Result<Allocator> {
    let exe_module = load(exe)?;
    let interpreter = interpreter(exe)?;
    let mut candidates = vec![(exe_module, exe.to_path_buf(), super::file_id(exe))];
    if let Some(interpreter) = interpreter {
        let output = Command::new(&interpreter)
            .arg("--list")
            .arg(exe)
            .output()
            .with_context(|| format!("cannot run the dynamic loader {interpreter}"))?;
        if !output.status.success() {
            bail!(
                "the dynamic loader cannot resolve the libraries of {}: {}",
                exe.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        for path in listed_libraries(&String::from_utf8_lossy(&output.stdout)) {
            let path = PathBuf::from(path);
            if let Ok(module) = load(&path) {
                let file = super::file_id(&path);
                candidates.push((module, path, file));
            }
        }
    }
    for (module, _, file) in &candidates {
        if let Some(file) = file {
            registry.insert_module(*file, Arc::clone(module));
        }
    }
    pick(candidates)
        .ok_or_else(|| {
            anyhow!(
                "{} uses no object that defines malloc, calloc, realloc and free (a static binary that was stripped?)",
                exe.display()
            )
        })?
        .place_probes()
}

fn load(path: &Path) -> anyhow::Result<Arc<Module>> {
    Ok(Arc::new(Module::load(path, &path.to_string_lossy())?))
}

/// The `PT_INTERP` path of an ELF executable: `None` for a static one. Reads its header and program headers only.
fn interpreter(exe: &Path) -> anyhow::Result<Option<String>> {
    use object::read::elf::{FileHeader as _, ProgramHeader as _};
    let name = exe.to_string_lossy();
    let file = module::open_object(exe, &name)?;
    // The header, the program headers and a path: a few KiB.
    let data = &module::BoundedFile::new(file, 1 << 20);
    let Ok(header) = object::elf::FileHeader64::<object::Endianness>::parse(data) else {
        return Ok(None);
    };
    let Ok(endian) = header.endian() else {
        return Ok(None);
    };
    let headers = header.program_headers(endian, data).unwrap_or_default();
    Ok(headers.iter().find_map(|ph| {
        (ph.p_type(endian) == object::elf::PT_INTERP)
            .then(|| ph.data(endian, data).ok())
            .flatten()
            .map(|bytes| {
                String::from_utf8_lossy(bytes.split(|&b| b == 0).next().unwrap_or(&[])).into_owned()
            })
    }))
}

/// Library paths in `ld.so --list` output, in order: lines `name => /path (0x…)` and `/path (0x…)`.
fn listed_libraries(listing: &str) -> Vec<&str> {
    listing
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = line.split_once("=> ").map_or(line, |(_, rest)| rest);
            let path = path.rsplit_once(" (").map_or(path, |(p, _)| p).trim();
            path.starts_with('/').then_some(path)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_loader_listing() {
        let listing = "\tlinux-vdso.so.1 (0x00007ffd6c5f2000)\n\
                       \tlibjemalloc.so.2 => /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 (0x00007f0c1a000000)\n\
                       \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0c19e00000)\n\
                       \tlibmissing.so => not found\n\
                       \t/lib64/ld-linux-x86-64.so.2 (0x00007f0c1a3f0000)\n";
        assert_eq!(
            listed_libraries(listing),
            [
                "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }

    #[test]
    fn a_dynamic_command_uses_libc() {
        let mut registry = Registry::default();
        let allocator = for_command(&mut registry, Path::new("/bin/true")).unwrap();
        assert!(allocator.path.contains("libc.so"), "{}", allocator.path);
        let names: Vec<&str> = allocator.probes.iter().map(|p| p.func.name()).collect();
        // glibc 2.36's aligned_alloc is memalign: one probe, under the first name.
        assert_eq!(
            names,
            [
                "malloc",
                "calloc",
                "realloc",
                "free",
                "reallocarray",
                "posix_memalign",
                "aligned_alloc",
                "valloc",
                "pvalloc"
            ]
        );
    }

    #[test]
    fn a_running_process_uses_libc() {
        let mut registry = Registry::default();
        let allocator = for_pid(&mut registry, std::process::id()).unwrap();
        assert!(allocator.path.contains("libc.so"), "{}", allocator.path);
        let free = allocator
            .probes
            .iter()
            .find(|p| p.func == AllocFn::Free)
            .unwrap();
        assert_ne!(free.file_offset, 0);
        assert_ne!(free.entry_offset, 0, "free is probed past its NULL check");
    }
}
