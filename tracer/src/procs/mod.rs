//! The process registry: for each traced process its identity (comm, command line), the last address-space
//! snapshot read from `/proc`, and the ELF objects it maps, loaded once per file (device + inode + build id)
//! and shared by every process that maps them. Stack frames are named here, while the process is alive, so
//! that a report made after it exits still names them.

pub mod airflow;
pub mod allocator;
pub mod container;
pub mod debuginfo;
pub mod docker;
pub mod maps;
pub mod module;
pub mod module_cache;
#[cfg(target_arch = "x86_64")]
pub mod prologue;
pub mod unwind;

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use airflow::TaskIdentity;
use container::Container;
use docker::DockerNames;
use maps::{FileId, Mapping, Maps};
use module::{BuildId, Module};
use module_cache::{ModuleCache, ObjectKey};
use serde::Serialize;

/// One stack frame as reports show it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Frame {
    /// The function's symbol, when the object has one for this address.
    pub function: Option<String>,
    /// The object's path, as the process mapped it.
    pub module: Option<String>,
    /// The return address inside the module, as an ELF address (what `addr2line -e MODULE` takes), or the
    /// raw address when no module maps it; `None` for Python frames.
    #[serde(serialize_with = "hex_or_null")]
    pub offset: Option<u64>,
    /// Offset from the start of `function`; 0 where unknown (a name from the DWARF, not the symbol table).
    #[serde(skip)]
    pub function_offset: u64,
    /// The source file and line, from the module's DWARF (native frames) or the code object (Python's).
    pub file: Option<String>,
    pub line: Option<u32>,
    pub lang: &'static str,
    /// A native call the compiler inlined into the frame after it: at the same address, in the same function
    /// symbol, named from the DWARF.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub inlined: bool,
    /// Where a native frame's file and line can be read when a report shows it ([`debuginfo::resolve`]).
    #[serde(skip)]
    pub source: Option<Arc<debuginfo::DebugSource>>,
}

pub(crate) fn hex<S: serde::Serializer>(value: &u64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format!("{value:#x}"))
}

fn hex_or_null<S: serde::Serializer>(
    value: &Option<u64>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(value) => hex(value, serializer),
        None => serializer.serialize_none(),
    }
}

impl Frame {
    /// Bytes it takes: the frame, and its strings.
    pub fn heap_bytes(&self) -> usize {
        let text = |s: &Option<String>| s.as_ref().map_or(0, String::capacity);
        size_of::<Self>() + text(&self.function) + text(&self.module) + text(&self.file)
    }

    /// A frame of Python code.
    pub fn python(function: String, file: String, line: Option<u32>) -> Self {
        Self {
            function: Some(function),
            module: None,
            offset: None,
            function_offset: 0,
            file: Some(file),
            line,
            lang: "python",
            inlined: false,
            source: None,
        }
    }

    /// A frame of native code at `offset` in `module`, as the symbol tables name it (or not): file and line come
    /// later, from DWARF, when a report is written.
    pub fn native(function: Option<String>, module: Option<String>, offset: Option<u64>) -> Self {
        Self {
            function,
            module,
            offset,
            function_offset: 0,
            file: None,
            line: None,
            lang: "native",
            inlined: false,
            source: None,
        }
    }

    /// Stands for the outermost Python frames of a stack deeper than a record holds
    /// ([`tracer_common::MAX_PY_FRAMES`]): a Python frame with no file.
    pub fn outer_python_frames_missing() -> Self {
        Self {
            function: Some(format!(
                "(outer frames not captured: deeper than {})",
                tracer_common::MAX_PY_FRAMES
            )),
            module: None,
            offset: None,
            function_offset: 0,
            file: None,
            line: None,
            lang: "python",
            inlined: false,
            source: None,
        }
    }

    /// Ends a native stack whose unwind ran out of the stack window the kernel copied
    /// ([`tracer_common::STACK_WINDOW_BYTES`]) where the frame-pointer walk could not take over: its callers
    /// are not known.
    pub fn outer_frames_not_unwound() -> Self {
        let function = format!(
            "(outer frames not unwound: past the {} KiB stack window)",
            tracer_common::STACK_WINDOW_BYTES >> 10
        );
        Self::native(Some(function), None, None)
    }

    /// Ends a native stack cut where the kernel's frame-pointer walk stopped being one: the last frame's
    /// function keeps no frame pointer, so its callers are not known (see [`Registry::symbolize`]).
    pub fn outer_frames_not_walked() -> Self {
        Self::native(
            Some("(outer frames not walked: the last frame keeps no frame pointer)".to_owned()),
            None,
            None,
        )
    }

    pub fn is_python(&self) -> bool {
        self.lang == "python"
    }
}

/// Which frames of a native stack the kernel's frame-pointer walk found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Walk {
    /// All past the first (past a system call's guessed caller).
    FramePointer,
    /// Those from this index on: an unwind completed by the walk.
    From(usize),
    /// None: the first frame alone (Python frames name the callers), or a stack unwound with the CFI.
    None,
}

/// What a report says about a process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProcessInfo {
    /// The host's pid.
    pub pid: u32,
    /// The pid inside the process's own pid namespace (a container's), when it differs from `pid`.
    pub ns_pid: Option<u32>,
    pub comm: String,
    pub cmdline: Vec<String>,
    /// The container it runs in, `null` on the host.
    pub container: Option<Container>,
    /// The Airflow task it runs, if it is one (or was forked by one).
    pub task: Option<TaskIdentity>,
}

impl ProcessInfo {
    /// Reads comm, command line, pid namespace, container and task; `None` once the process is gone. Names are
    /// bytes a process chooses (`prctl(PR_SET_NAME)`, any argv): what is not UTF-8 is converted lossily, never
    /// a reason to drop the field.
    pub fn from_pid(pid: u32) -> Option<Self> {
        let comm = fs::read(format!("/proc/{pid}/comm")).ok()?;
        let comm = comm.strip_suffix(b"\n").unwrap_or(&comm);
        let cmdline: Vec<String> = read_bounded(format!("/proc/{pid}/cmdline"))
            .ok()?
            .split(|&b| b == 0)
            .filter(|arg| !arg.is_empty())
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect();
        Some(Self {
            pid,
            ns_pid: ns_pid(pid).filter(|&ns| ns != pid),
            comm: String::from_utf8_lossy(comm).into_owned(),
            task: airflow::of_pid(pid, &cmdline),
            cmdline,
            container: container::of_pid(pid),
        })
    }
}

/// The innermost pid of `NSpid:` in `/proc/PID/status`: the process's pid in its own namespace.
fn ns_pid(pid: u32) -> Option<u32> {
    // Bytes, not a string: its `Name:` line is the comm, which need not be UTF-8.
    let status = fs::read(format!("/proc/{pid}/status")).ok()?;
    String::from_utf8_lossy(&status)
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// Whether `pid` has begun to exit (`PF_EXITING` in the flags of `/proc/PID/stat`) or is gone.
fn is_exiting(pid: u32) -> bool {
    const PF_EXITING: u64 = 0x4;
    let Ok(stat) = fs::read(format!("/proc/{pid}/stat")) else {
        return true;
    };
    stat_flags(&stat).is_none_or(|flags| flags & PF_EXITING != 0)
}

/// The `flags` field of a `/proc/PID/stat` line: the sixth after the comm, whose closing `)` is the last one
/// (a comm may hold spaces and parentheses).
fn stat_flags(stat: &[u8]) -> Option<u64> {
    let after_comm = &stat[stat.iter().rposition(|&b| b == b')')? + 1..];
    std::str::from_utf8(after_comm)
        .ok()?
        .split_whitespace()
        .nth(6)?
        .parse()
        .ok()
}

struct Process {
    info: ProcessInfo,
    maps: Maps,
    /// The build ids of the files of `maps` read so far: once per file and address space, not per frame.
    build_ids: HashMap<FileId, Option<BuildId>>,
}

impl Process {
    fn new(info: ProcessInfo, maps: Maps) -> Self {
        Self {
            info,
            maps,
            build_ids: HashMap::new(),
        }
    }

    /// A new snapshot of the address space: a file it maps now may reuse the device and inode of one it
    /// mapped before, so only the build ids of files still mapped by the same path are kept. Those are kept: a
    /// process read again while it loads, then gone before its stacks are named, could no longer say them.
    fn set_maps(&mut self, maps: Maps) {
        let still_mapped: std::collections::HashSet<(FileId, &str)> = maps
            .mappings
            .iter()
            .filter_map(|m| Some((m.file?, m.path.as_str())))
            .collect();
        let old = &self.maps;
        self.build_ids.retain(|file, _| {
            old.mappings
                .iter()
                .filter(|m| m.file == Some(*file))
                .all(|m| still_mapped.contains(&(*file, m.path.as_str())))
        });
        self.maps = maps;
    }
}

/// Traced processes and the objects they map.
#[derive(Default)]
pub struct Registry {
    processes: HashMap<u32, Process>,
    /// The objects processes map, and those that could not be read (not tried again for every frame).
    modules: ModuleCache,
    /// Where each file's DWARF is read when a report shows its frames: one per file (an [`ObjectKey`]), opened
    /// through a process that maps it, and its separate debug file looked up in that process's root. Not per
    /// module: the cache shares one module between files of equal contents, and one container's debug files
    /// must never name another's frames. At most [`debuginfo::MAX_DEBUG_SOURCES`] (then forgotten, frames keep
    /// theirs).
    debug_sources: HashMap<ObjectKey, Arc<debuginfo::DebugSource>>,
    docker: DockerNames,
    /// The unwind sections of the objects processes map, for stack windows.
    unwinding: unwind::Unwinding,
}

impl Registry {
    /// Starts tracking `pid`, or refreshes what is known of it. Keeps the last snapshot when the process is gone.
    pub fn refresh(&mut self, pid: u32) {
        let mut info = ProcessInfo::from_pid(pid);
        if let Some(container) = info.as_mut().and_then(|i| i.container.as_mut()) {
            self.name_container(container);
        }
        // What was known stays known: a task identity seen once (or inherited) is not lost to a new title, nor
        // a container's name to a Docker daemon that does not answer this time.
        if let (Some(info), Some(known)) = (info.as_mut(), self.processes.get(&pid)) {
            if info.task.is_none() {
                info.task = known.info.task.clone();
            }
            if let (Some(now), Some(known)) = (info.container.as_mut(), &known.info.container)
                && now.id == known.id
                && now.name.is_none()
            {
                now.name = known.name.clone();
            }
        }
        // An exiting process reads as somebody else: no command line, v1 cgroups of `/`, and a v2 cgroup that
        // its container's end deletes. Read after the rest: a process found not exiting was not exiting
        // while it was read. What it was known as while it ran is what the report says.
        if info.is_some() && self.processes.contains_key(&pid) && is_exiting(pid) {
            info = None;
        }
        let maps = Maps::from_pid(pid).ok().filter(|m| !m.mappings.is_empty());
        if maps.is_some() {
            self.unwinding.forget(pid);
        }
        match self.processes.get_mut(&pid) {
            Some(process) => {
                if let Some(info) = info {
                    process.info = info;
                }
                if let Some(maps) = maps {
                    process.set_maps(maps);
                }
            }
            None => {
                let info = info.unwrap_or(ProcessInfo {
                    pid,
                    ..Default::default()
                });
                let maps = maps.unwrap_or_default();
                self.processes.insert(pid, Process::new(info, maps));
            }
        }
    }

    /// Reads `pid`'s address space again, and nothing else: what finding its interpreter needs, without the
    /// slower questions of [`Registry::refresh`] (its container's name is asked of Docker, which may be busy
    /// starting that very container).
    pub fn refresh_maps(&mut self, pid: u32) {
        let Some(maps) = Maps::from_pid(pid).ok().filter(|m| !m.mappings.is_empty()) else {
            return;
        };
        self.unwinding.forget(pid);
        match self.processes.get_mut(&pid) {
            Some(process) => process.set_maps(maps),
            None => {
                let info = ProcessInfo {
                    pid,
                    ..Default::default()
                };
                self.processes.insert(pid, Process::new(info, maps));
            }
        }
    }

    /// The name the container's runtime gives it, when it can be asked (Docker).
    pub fn name_container(&mut self, container: &mut Container) {
        if container.runtime == "docker" && container.name.is_none() {
            container.name = self.docker.name(&container.id);
        }
    }

    /// A forked child runs its parent's task unless it says otherwise.
    pub fn inherit_task(&mut self, child: u32, parent: u32) {
        let inherited = self.info(parent).and_then(|p| p.task.clone());
        if let Some(child) = self.processes.get_mut(&child)
            && child.info.task.is_none()
        {
            child.info.task = inherited;
        }
    }

    /// Records the identity of a spawned command before it execs: its address space is read once it runs.
    pub fn set_info(&mut self, info: ProcessInfo) {
        self.processes
            .insert(info.pid, Process::new(info, Maps::default()));
    }

    /// Forgets a process that is gone (the agent, which runs for days, must not keep every pid it saw).
    pub fn forget(&mut self, pid: u32) {
        self.processes.remove(&pid);
        self.unwinding.forget(pid);
    }

    pub fn info(&self, pid: u32) -> Option<&ProcessInfo> {
        self.processes.get(&pid).map(|p| &p.info)
    }

    pub fn maps(&self, pid: u32) -> Option<&Maps> {
        self.processes.get(&pid).map(|p| &p.maps)
    }

    /// Caches an object loaded before any process mapped it.
    pub fn insert_module(&mut self, file: FileId, module: Arc<Module>) {
        self.modules.insert_loaded(file, module);
    }

    /// What the object behind a mapping is cached by: its file, and the build id read through `pid` (once
    /// per file and snapshot of its address space).
    fn object_key(&mut self, pid: u32, mapping: &Mapping) -> Option<ObjectKey> {
        let file = mapping.file?;
        let known = self
            .processes
            .get(&pid)
            .and_then(|p| p.build_ids.get(&file).cloned());
        let build_id = match known {
            Some(build_id) => build_id,
            None => {
                let build_id = module::read_build_id(&open_path(pid, mapping), &mapping.path);
                if let Some(process) = self.processes.get_mut(&pid) {
                    process.build_ids.insert(file, build_id.clone());
                }
                build_id
            }
        };
        Some(ObjectKey { file, build_id })
    }

    /// The object behind a mapping, loaded once per file (again if the cache's bounds evicted it).
    pub fn module(&mut self, pid: u32, mapping: &Mapping) -> Option<Arc<Module>> {
        let key = self.object_key(pid, mapping)?;
        let open_path = open_path(pid, mapping);
        self.modules.get_or_load(&key, &open_path, || {
            Module::load(&open_path, &mapping.path).ok()
        })
    }

    /// Where the DWARF of a mapping's file is read (see `debug_sources`); `None` when it cannot be opened.
    fn debug_source(&mut self, pid: u32, mapping: &Mapping) -> Option<Arc<debuginfo::DebugSource>> {
        let id = self.object_key(pid, mapping)?;
        if let Some(source) = self.debug_sources.get(&id) {
            return Some(Arc::clone(source));
        }
        if self.debug_sources.len() >= debuginfo::MAX_DEBUG_SOURCES {
            self.debug_sources.clear();
        }
        let file = module::open_object(&open_path(pid, mapping), &mapping.path).ok()?;
        let root = crate::os::open_root(pid).ok()?;
        let source = debuginfo::DebugSource::new(file, &mapping.path, root)?;
        self.debug_sources.insert(id, Arc::clone(&source));
        Some(source)
    }

    /// Objects the caches of modules and of their unwind sections evicted to stay within their bounds
    /// ([`module_cache`], [`unwind`]).
    pub fn evicted_modules(&self) -> u64 {
        self.modules.evicted() + self.unwinding.evicted()
    }

    /// Unwinds a stack window of `pid` with the CFI of the objects it maps. Where the window ran out before the
    /// stack did, the kernel's frame-pointer walk (`walk`) gives the outer frames when it passed through the
    /// last one unwound; else the stack is marked as cut (`Unwound::end`). The address space is read again
    /// when a code address falls outside the last snapshot (a library loaded since).
    pub fn unwind(
        &mut self,
        pid: u32,
        regs: &tracer_common::UserRegs,
        stack: &[u8],
        walk: &[u64],
    ) -> unwind::Unwound {
        if self.maps(pid).and_then(|m| m.find(regs.ip)).is_none() {
            self.refresh(pid);
        }
        let mut unwinding = std::mem::take(&mut self.unwinding);
        let mut unwound = unwinding.unwind(pid, regs, stack, |address| {
            let mapping = self.maps(pid)?.find(address)?.clone();
            if !mapping.executable {
                return None;
            }
            let key = self.object_key(pid, &mapping)?;
            let module = self.module(pid, &mapping)?;
            // From the address itself: a mapping's first page may lie in the segment before its own.
            let elf_address =
                module.address_of_file_offset(address - mapping.start + mapping.file_offset)?;
            let open_path = open_path(pid, &mapping);
            let name = mapping.path.clone();
            Some(unwind::ModuleAt {
                key,
                code: mapping.start..mapping.end,
                base: address.wrapping_sub(elf_address),
                open: Box::new(move || module::open_object(&open_path, &name).ok()),
                name: mapping.path,
            })
        });
        self.unwinding = unwinding;
        let unwound_frames = unwound.frames.len();
        if unwound.end != unwind::UnwindEnd::Complete
            && unwind::complete_from_walk(&mut unwound.frames, walk)
        {
            unwound.end = unwind::UnwindEnd::Complete;
            unwound.walked_from = Some(unwound_frames);
        }
        unwound
    }

    /// The end of the `[heap]` mapping: where the program break is, to a page.
    pub fn heap_end(&self, pid: u32) -> Option<u64> {
        self.maps(pid)?
            .mappings
            .iter()
            .find(|m| m.path == "[heap]")
            .map(|m| m.end)
    }

    /// Names the frames of a user stack. At an allocator's return the first frame is the exact return address
    /// into its caller; at a system call it is inside the libc wrapper, and `guessed_caller` says the second is
    /// the word that was on top of the stack, kept only if it points into executable code. `walk` says which
    /// frames come from the kernel's frame-pointer walk. The stack ends at the first frame that is not in
    /// executable code, and, past the walk's start, at the first frame whose function keeps no frame pointer
    /// there (its CFI says so, [`unwind::FrameRule`]): what the walk found past it is whatever that code left in
    /// `rbp`, noise that differs from call to call and would split one call site into many, or name callers
    /// that never called. Such a stack ends in [`Frame::outer_frames_not_walked`], never silently short.
    /// The snapshot of the address space is refreshed once when a frame falls outside it (a library loaded
    /// since).
    pub fn symbolize(
        &mut self,
        pid: u32,
        frames: &[u64],
        guessed_caller: bool,
        walk: Walk,
    ) -> Vec<Frame> {
        let outside = |maps: Option<&Maps>, ip: u64| maps.and_then(|m| m.find(ip)).is_none();
        if frames.iter().any(|&ip| outside(self.maps(pid), ip)) {
            self.refresh(pid);
        }
        let executable = |registry: &Self, ip: u64| {
            registry
                .maps(pid)
                .and_then(|m| m.find(ip))
                .is_some_and(|m| m.executable)
        };
        let mut frames = frames.to_vec();
        let mut guessed_caller = guessed_caller && frames.len() > 1;
        if guessed_caller && !executable(self, frames[1]) {
            frames.remove(1);
            guessed_caller = false;
        }
        // The first frame whose function decides whether the walk's next frame is its caller: at a system
        // call the guessed caller's (the wrapper leaves the caller's frame pointer as it found it).
        let judged_from = match walk {
            Walk::FramePointer => Some(usize::from(guessed_caller)),
            Walk::From(first_walked) => first_walked.checked_sub(1),
            Walk::None => None,
        };
        let mut named = Vec::with_capacity(frames.len());
        for (depth, &ip) in frames.iter().enumerate() {
            let mapping = self.maps(pid).and_then(|m| m.find(ip)).cloned();
            let executable = mapping.as_ref().is_some_and(|m| m.executable);
            if depth > 0 && !executable {
                break;
            }
            named.push(self.name_frame(pid, ip, mapping.as_ref()));
            let (Some(mapping), Some(judged_from)) = (&mapping, judged_from) else {
                continue;
            };
            if depth < judged_from {
                continue;
            }
            match self.frame_rule(pid, ip, depth == 0, mapping) {
                unwind::FrameRule::NoFramePointer => {
                    named.push(Frame::outer_frames_not_walked());
                    break;
                }
                unwind::FrameRule::Outermost => break,
                unwind::FrameRule::FramePointer | unwind::FrameRule::Unknown => {}
            }
        }
        named
    }

    /// What the CFI says of the frame pointer at frame `ip` of `pid`, in `mapping`: the innermost frame is
    /// where the thread is (a return probe's first frame is where the caller resumes), any other a return
    /// address, looked up at its call (the byte before).
    fn frame_rule(
        &mut self,
        pid: u32,
        ip: u64,
        innermost: bool,
        mapping: &Mapping,
    ) -> unwind::FrameRule {
        let lookup = if innermost { ip } else { ip.wrapping_sub(1) };
        if !mapping.executable || !(mapping.start..mapping.end).contains(&lookup) {
            return unwind::FrameRule::Unknown;
        }
        let Some(key) = self.object_key(pid, mapping) else {
            return unwind::FrameRule::Unknown;
        };
        let Some(address) = self.module(pid, mapping).and_then(|module| {
            module.address_of_file_offset(lookup - mapping.start + mapping.file_offset)
        }) else {
            return unwind::FrameRule::Unknown;
        };
        let open_path = open_path(pid, mapping);
        let name = mapping.path.clone();
        self.unwinding.frame_rule(
            key,
            Box::new(move || module::open_object(&open_path, &name).ok()),
            address,
        )
    }

    /// Names the frame at `ip`: its function from the symbol table, and where its file and line can be read
    /// when a report shows it (the module's [`debuginfo::DebugSource`]).
    fn name_frame(&mut self, pid: u32, ip: u64, mapping: Option<&Mapping>) -> Frame {
        let unnamed = Frame::native(None, mapping.map(|m| m.path.clone()), Some(ip));
        let Some(mapping) = mapping else {
            return unnamed;
        };
        let Some(module) = self.module(pid, mapping) else {
            return Frame {
                offset: Some(ip - mapping.start + mapping.file_offset),
                ..unnamed
            };
        };
        let file_offset = ip - mapping.start + mapping.file_offset;
        let Some(address) = module.address_of_file_offset(file_offset) else {
            return Frame {
                offset: Some(file_offset),
                ..unnamed
            };
        };
        // A return address can sit just past its function's end (a call to a function that never returns):
        // look up the call instruction's last byte.
        let (function, function_offset) = match module.function_at(address.saturating_sub(1)) {
            Some((name, offset)) => (Some(demangle(name)), offset + 1),
            None => (None, 0),
        };
        Frame {
            function,
            offset: Some(address),
            function_offset,
            source: self.debug_source(pid, mapping),
            ..unnamed
        }
    }
}

/// A symbol's name as people read it: Rust and C++ names demangled, C names as they are.
fn demangle(name: &str) -> String {
    addr2line::demangle_auto(std::borrow::Cow::Borrowed(name), None).into_owned()
}

/// Most bytes read of a process's command line or environment: a process can point them at any part of its
/// memory (`prctl(PR_SET_MM)`), so their size is the target's choice.
const PROC_TEXT_MAX: u64 = 1 << 20;

/// Reads at most [`PROC_TEXT_MAX`] bytes of a `/proc` file. By hand rather than through procfs, whose readers
/// take such files whole: their size is the target's choice.
pub fn read_bounded(path: impl AsRef<Path>) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    fs::File::open(path)?
        .take(PROC_TEXT_MAX)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Where alloctrace can open a mapped file: the path itself when it is the same file in alloctrace's own
/// mount namespace, else the process's `map_files` link (containers, deleted files).
pub fn open_path(pid: u32, mapping: &Mapping) -> PathBuf {
    let same_file = mapping
        .file
        .is_some_and(|id| file_id(Path::new(&mapping.path)) == Some(id));
    if same_file {
        PathBuf::from(&mapping.path)
    } else {
        mapping.map_file_path(pid)
    }
}

/// The device and inode of a path, as `/proc/PID/maps` prints them.
pub fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = fs::metadata(path).ok()?;
    let dev = meta.dev();
    Some(FileId {
        dev_major: libc::major(dev),
        dev_minor: libc::minor(dev),
        inode: meta.ino(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_flags_of_a_stat_line_whatever_the_comm() {
        let stat =
            b"4242 (a) b (c) S 1 4242 4242 0 -1 4194564 120 0 0 0 1 2 0 0 20 0 1 0 5 1000 10\n";
        assert_eq!(stat_flags(stat), Some(4_194_564));
        let odd = b"7 (\xff\xfe) R 1 7 7 0 -1 4 0 0 0 0 0 0 0 0 20 0 1 0 5 1000 10\n";
        assert_eq!(stat_flags(odd), Some(4));
        assert_eq!(stat_flags(b"garbage"), None);
    }

    #[test]
    fn this_process_is_not_exiting() {
        assert!(!is_exiting(std::process::id()));
    }
}
