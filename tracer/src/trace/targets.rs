//! The session's target policy: which processes are traced (pids, names, containers, cgroups, a command and
//! their children), when their probes go on, their Python runtimes, and their exits.

use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::MetadataExt as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use tokio::sync::mpsc::UnboundedSender;

use crate::{
    model::{AllocatorReport, Exit},
    os::{has_exited, pidfd, resume, watch_exit},
    probes::Probes,
    procs::{
        Registry,
        allocator::{self, Allocator},
        container::{self, Selector},
        maps::FileId,
    },
    python::runtime::{self, Reader},
};
use tracer_common::PyProcess;

use super::{
    accounting::{Discovery, State, lock},
    warn,
};

/// The session's targets and how they are doing.
pub(super) struct Targets {
    pub(super) probes: Probes,
    pub(super) exits_tx: UnboundedSender<u32>,
    /// Every process traced, in the order it was found.
    pub(super) order: Vec<u32>,
    /// The allocator files probed for each process.
    pub(super) probed: HashMap<u32, HashSet<Option<FileId>>>,
    pub(super) exited: HashMap<u32, Exit>,
    pub(super) allocators: Vec<AllocatorReport>,
    /// The command alloctrace started, until its exec is seen.
    pub(super) spawned_exec: Option<u32>,
    /// `--comm` names, as the kernel keeps them (their first 15 bytes, which need not be UTF-8).
    pub(super) comms: Vec<Vec<u8>>,
    /// `--container` and `--cgroup`.
    pub(super) selector: Selector,
    /// Whether CPython processes get their Python frames read (`--no-python-frames`).
    pub(super) python_frames: bool,
    /// Processes that may yet map an interpreter (a shared libpython is mapped by the loader after exec), and
    /// until when to look.
    pub(super) python_pending: HashMap<u32, Instant>,
    /// Processes that exec'd, until their allocator is mapped (or the window passes).
    pub(super) allocator_pending: HashMap<u32, Instant>,
    /// Processes chosen for the trace that could not be attached to (gone at once, no allocator found).
    pub(super) untraced: u64,
    /// The watch tier: targets are marked for the tracepoints only, never given uprobes.
    pub(super) watching: bool,
    /// Every process in a container is chosen (the agent, unless a selector narrows it).
    pub(super) every_container: bool,
}

/// How long a probe that read "holding" just before it was turned off may take to announce what it held.
pub(super) const HOLD_SETTLE: Duration = Duration::from_millis(20);

/// Most bytes the named stacks may take (`--max-stacks` bounds their number): a target that makes ever new deep
/// stacks stays within it.
pub(super) const STACK_MEMORY: usize = 64 << 20;

/// Most threads whose unwound stack waits for its allocation record (see `State::unwound_ids`).
pub(super) const MAX_UNWOUND_THREADS: usize = 65536;

/// How long after its exec a process is watched for its allocator and interpreter to be mapped, and how often.
pub(super) const PENDING_WINDOW: Duration = Duration::from_secs(5);
pub(super) const PENDING_INTERVAL: Duration = Duration::from_millis(5);

impl Targets {
    /// Whether a process that is not a target yet is chosen by name (`--comm`), container or cgroup.
    pub(super) fn chosen(&mut self, registry: &mut Registry, pid: u32) -> bool {
        // Bytes: a name the kernel cut inside a UTF-8 character is no string.
        let named = std::fs::read(format!("/proc/{pid}/comm")).is_ok_and(|comm| {
            let comm = comm.strip_suffix(b"\n").unwrap_or(&comm);
            self.comms.iter().any(|c| c == comm)
        });
        if named {
            return true;
        }
        if self.every_container {
            return container::of_pid(pid).is_some();
        }
        if self.selector.is_empty() {
            return false;
        }
        let mut container = container::of_pid(pid);
        if let Some(container) = container.as_mut() {
            registry.name_container(container);
        }
        self.selector
            .matches(container.as_ref(), container::path_of_pid(pid).as_deref())
    }

    /// Running processes chosen by name, container or cgroup.
    pub(super) fn running_chosen(&mut self, registry: &mut Registry) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let own = std::process::id();
        let pids: Vec<u32> = entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != own)
            .collect();
        pids.into_iter()
            .filter(|&pid| self.chosen(registry, pid))
            .collect()
    }

    /// Looks for CPython in `pid`; when found, its frames are walked from now on. Not found in a process that
    /// just exec'd (`loading`: its loader may map libpython any moment): looked for again until
    /// [`PENDING_WINDOW`] has passed.
    pub(super) fn detect_python(&mut self, state: &mut State, pid: u32, loading: bool) {
        if !self.python_frames {
            return;
        }
        // Watched, a process is not held at exec: its frames are read the sooner the better, and what else is
        // known of it (its container's name) is read after. Looked at again while it loads (each library it
        // maps stops it), only its address space is read: what else is known of it was read at its exec.
        if self.watching || self.python_pending.contains_key(&pid) {
            state.registry.refresh_maps(pid);
        } else {
            state.registry.refresh(pid);
        }
        match runtime::detect(&mut state.registry, pid) {
            Some(interpreter) => {
                self.python_pending.remove(&pid);
                self.probes.python_settled(pid);
                // Looked for again before the record that settled it was handled: its frames are walked
                // already, and said once. An exec forgets the reader, so a new image is looked at afresh.
                if lock(&state.pythons).contains_key(&pid) {
                    return;
                }
                let config = interpreter.bpf_config();
                let info = interpreter.info.clone();
                // The reader before the kernel walks the frames: the first stack walked is named with it, on
                // the ring reader's thread, however soon it comes.
                lock(&state.pythons).insert(pid, Reader::new(pid, interpreter));
                match config {
                    Some(config) => match self.add_python(pid, &config, &info.version, None) {
                        Err(err) => warn(format_args!("no Python frames for pid {pid}: {err:#}")),
                        // The agent says so (the trace says which processes it traces): its Python
                        // frames are read from now on.
                        Ok(()) if self.watching => {
                            log::info!("watching Python {} in pid {pid}", info.version);
                        }
                        Ok(()) => {}
                    },
                    None => warn(format_args!(
                        "no Python frames for pid {pid}: {}",
                        info.unsupported.as_deref().unwrap_or("unsupported")
                    )),
                }
            }
            None if loading => {
                self.python_pending
                    .entry(pid)
                    .or_insert_with(|| Instant::now() + PENDING_WINDOW);
                if !self.watching {
                    self.probes.await_python(pid);
                }
            }
            None => self.probes.python_settled(pid),
        }
    }

    /// Has the kernel walk `pid`'s Python frames from now on, and says so on `--ready-fd` (in both tiers: a
    /// script or test waits for it before the process allocates what it wants named by its Python line).
    fn add_python(
        &mut self,
        pid: u32,
        config: &PyProcess,
        version: &str,
        forked_by: Option<u32>,
    ) -> anyhow::Result<()> {
        self.probes.add_python(pid, config)?;
        if let Err(err) = crate::os::say_python_frames(pid, version, forked_by) {
            warn(format_args!("cannot write to --ready-fd: {err}"));
        }
        Ok(())
    }

    /// Retries detection for the processes still pending, and gives up on those whose window has passed: after
    /// this last look, so that a process is never given up on without a look once its window is over (the
    /// event loop may have been busy through the whole window, on a loaded machine).
    pub(super) fn detect_pending_pythons(&mut self, state: &mut State) {
        let now = Instant::now();
        let pending: Vec<(u32, Instant)> =
            self.python_pending.iter().map(|(&p, &t)| (p, t)).collect();
        for (pid, until) in pending {
            self.detect_python(state, pid, true);
            if until <= now && self.python_pending.remove(&pid).is_some() {
                self.probes.python_settled(pid);
            }
        }
    }

    pub(super) fn running(&self) -> usize {
        self.order.len() - self.exited.len()
    }

    /// Attaches the allocator probes for `pid` (once per allocator file) and records it as a target.
    pub(super) fn attach(&mut self, pid: u32, allocator: Allocator) -> anyhow::Result<()> {
        let probed = self.probed.entry(pid).or_default();
        if !probed.insert(allocator.file) {
            return Ok(());
        }
        self.probes.attach(pid, &allocator)?;
        log::info!("tracing pid {pid} through {}", allocator.path);
        if let Err(err) = crate::os::say_attached(pid) {
            warn(format_args!("cannot write to --ready-fd: {err}"));
        }
        self.allocators.push(AllocatorReport { pid, allocator });
        Ok(())
    }

    /// Starts watching a new target's exit.
    pub(super) fn track(&mut self, pid: u32) -> anyhow::Result<()> {
        if self.order.contains(&pid) {
            return Ok(());
        }
        self.order.push(pid);
        match pidfd(pid) {
            Ok(fd) if !has_exited(&fd) => watch_exit(pid, fd, self.exits_tx.clone()),
            // Gone already: it still counts, with what it did while traced.
            _ => {
                self.exited.insert(pid, Exit::Exited);
                Ok(())
            }
        }
    }

    /// A process found after the start (a fork of a target, an exec, or a `--comm` match): trace it, or say why
    /// not. A fork has its parent's interpreter at the same addresses; an exec starts a new image.
    pub(super) fn follow(&mut self, state: &mut State, discovery: Discovery) {
        match discovery {
            // A child forked once holding was off (the trace is ending) is left alone: traced from its first
            // instruction, or not at all, never from some point in its life. The watch tier holds nothing and
            // follows every child (a task runner forks the task, a prefork worker its workers).
            Discovery::Forked {
                parent,
                child,
                held,
            } => {
                if held || self.watching {
                    self.follow_fork(state, parent, child);
                }
                if held {
                    resume(child);
                }
            }
            // Its loader mapped a library: looked at for CPython before any of the library's code runs.
            Discovery::LibraryMapped { pid, held } => {
                if self.python_pending.contains_key(&pid) {
                    self.detect_python(state, pid, true);
                } else {
                    self.probes.python_settled(pid);
                }
                if held {
                    resume(pid);
                }
            }
            Discovery::Execed { pid, ts_ns, held } => {
                // Its old address space is gone, and the blocks in it.
                if !self.watching
                    && let Err(err) = self.probes.forget_blocks(pid, ts_ns)
                {
                    warn(format_args!("{err:#}"));
                }
                lock(&state.pythons).remove(&pid);
                let _ = self.probes.remove_python(pid);
                // Before anything slow: a shared libpython is mapped within milliseconds, and looked for
                // from then on.
                self.detect_python(state, pid, true);
                // Watched, it needs nothing more than its exit followed. An escalated one's uprobes were on its
                // old image's allocator: off, until the agent escalates it again.
                if self.watching {
                    if state.escalated.remove(&pid).is_some() {
                        self.probes.detach(pid);
                        if let Err(err) = self.probes.forget_heap(pid) {
                            warn(format_args!("{err:#}"));
                        }
                        warn(format_args!(
                            "pid {pid} replaced its image: its allocator uprobes are off"
                        ));
                    }
                    self.watch(state, pid);
                    return;
                }
                if self.spawned_exec == Some(pid) {
                    // The command alloctrace started, whose allocator was found from this very executable.
                    self.spawned_exec = None;
                    return;
                }
                if held {
                    let attached = self.attach_held(state, pid);
                    resume(pid);
                    match attached {
                        Ok(()) => return,
                        Err(err) => warn(format_args!(
                            "pid {pid} is attached to once its loader has run: {err:#}"
                        )),
                    }
                }
                // Its allocator is the one it maps, through its own mount namespace (a container's): found
                // once its loader has mapped it.
                self.allocator_pending
                    .entry(pid)
                    .or_insert_with(|| Instant::now() + PENDING_WINDOW);
                self.attach_pending_allocators(state);
            }
        }
    }

    /// Attaches to a process stopped at its exec, before its new image has run: its allocator is the one its
    /// loader will bind (`ld.so --list`), and its executable's symbols are read now, so that its stacks are
    /// named even if it exits at once. Only for a process that sees the files alloctrace sees.
    pub(super) fn attach_held(&mut self, state: &mut State, pid: u32) -> anyhow::Result<()> {
        let namespace =
            |pid: &str| std::fs::metadata(format!("/proc/{pid}/ns/mnt")).map(|m| m.ino());
        if namespace(&pid.to_string())? != namespace("self")? {
            bail!("it runs in another mount namespace");
        }
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
        let allocator = allocator::for_command(&mut state.registry, &exe)?;
        state.registry.refresh(pid);
        read_objects(state, pid);
        self.attach(pid, allocator)?;
        self.track(pid)
    }

    /// A fork has its parent's address space: its allocator, its interpreter, its task.
    pub(super) fn follow_fork(&mut self, state: &mut State, parent: u32, child: u32) {
        if !std::path::Path::new(&format!("/proc/{child}")).exists() {
            // Gone before its record was read: what it did while traced is already counted. Watched, the pages
            // it touched meanwhile go with it.
            if self.watching {
                state.gone.push(child);
            }
            return;
        }
        let interpreter = lock(&state.pythons)
            .get(&parent)
            .map(|reader| reader.interpreter().clone());
        if let Some(interpreter) = interpreter {
            let config = interpreter.bpf_config();
            let version = interpreter.info.version.clone();
            // The reader before the kernel walks the frames, as for an exec'd interpreter.
            lock(&state.pythons).insert(child, Reader::new(child, interpreter));
            if let Some(config) = config
                && self
                    .add_python(child, &config, &version, Some(parent))
                    .is_ok()
                && self.watching
            {
                // As for an exec'd interpreter: the agent says whose frames it reads from now on.
                log::info!("watching Python {version} in pid {child}, forked by pid {parent}");
            }
        }
        if self.watching {
            self.watch(state, child);
            state.registry.inherit_task(child, parent);
            return;
        }
        let allocator = self
            .allocators
            .iter()
            .rev()
            .find(|a| a.pid == parent)
            .map(|a| Ok(a.allocator.clone()))
            .unwrap_or_else(|| allocator::for_pid(&mut state.registry, child));
        state.registry.refresh(child);
        state.registry.inherit_task(child, parent);
        let result = allocator
            .and_then(|allocator| self.attach(child, allocator))
            .and_then(|()| self.track(child));
        if let Err(err) = result {
            // It may have exited already; the trace goes on for the others.
            self.untraced += 1;
            warn(format_args!("not tracing pid {child}: {err:#}"));
        }
    }

    /// Watches `pid` (the watch tier): marked for the tracepoints, its identity read, its exit followed.
    pub(super) fn watch(&mut self, state: &mut State, pid: u32) {
        let _ = self.probes.add_target(pid);
        state.registry.refresh(pid);
        if let (Some(resident), Some(heap_end)) =
            (&mut state.resident, state.registry.heap_end(pid))
        {
            resident.set_break(pid, heap_end);
        }
        if let Err(err) = self.track(pid) {
            self.untraced += 1;
            warn(format_args!("not watching pid {pid}: {err:#}"));
        }
        if self.exited.contains_key(&pid) {
            state.gone.push(pid);
        }
    }

    /// Attaches to the processes whose allocator has been mapped since their exec; gives up on those that
    /// map none within [`PENDING_WINDOW`].
    pub(super) fn attach_pending_allocators(&mut self, state: &mut State) {
        let now = Instant::now();
        let pending: Vec<(u32, Instant)> = self
            .allocator_pending
            .iter()
            .map(|(&p, &t)| (p, t))
            .collect();
        for (pid, until) in pending {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                self.allocator_pending.remove(&pid);
                continue;
            }
            match allocator::for_pid(&mut state.registry, pid) {
                Ok(allocator) => {
                    self.allocator_pending.remove(&pid);
                    // Its allocator is mapped, and so is a shared libpython (the loader maps it first): the
                    // interpreter is found before the process is announced as traced.
                    if self.python_pending.contains_key(&pid) {
                        self.detect_python(state, pid, true);
                    }
                    read_objects(state, pid);
                    let result = self.attach(pid, allocator).and_then(|()| self.track(pid));
                    if let Err(err) = result {
                        self.untraced += 1;
                        warn(format_args!("not tracing pid {pid}: {err:#}"));
                    }
                }
                Err(err) if until <= now => {
                    self.allocator_pending.remove(&pid);
                    self.untraced += 1;
                    warn(format_args!("not tracing pid {pid}: {err:#}"));
                }
                // Its loader has not mapped the allocator yet.
                Err(_) => {}
            }
        }
    }
}

/// Reads the objects `pid` maps now (in its last snapshot), while it is certainly alive: a process in another
/// mount namespace is read through its own `map_files`, which go with it, and it may exit before its first stack
/// is named. Cached by file, they name its stacks whenever they come.
fn read_objects(state: &mut State, pid: u32) {
    if let Some(maps) = state.registry.maps(pid).cloned() {
        for mapping in maps.mappings.iter().filter(|m| m.executable) {
            let _ = state.registry.module(pid, mapping);
        }
    }
}

/// Attaches to a process that is already running.
pub(super) fn attach_running(
    targets: &mut Targets,
    state: &mut State,
    pid: u32,
) -> anyhow::Result<()> {
    let fd = pidfd(pid).map_err(|e| match e.raw_os_error() {
        Some(libc::ESRCH) => anyhow!("no process with pid {pid}"),
        _ => anyhow!("cannot watch pid {pid}: {e}"),
    })?;
    let allocator = allocator::for_pid(&mut state.registry, pid)
        .with_context(|| format!("cannot find the allocator of pid {pid}"))?;
    // Python frames first: attaching announces the process as traced.
    targets.detect_python(state, pid, false);
    read_objects(state, pid);
    if let Err(err) = targets.attach(pid, allocator) {
        if has_exited(&fd) {
            bail!("process {pid} exited before probes were attached");
        }
        return Err(err);
    }
    if let Some(heap_end) = state.registry.heap_end(pid) {
        state.ledger.set_break(pid, heap_end);
    }
    targets.order.push(pid);
    // Gone right after its probes went on: it is reported with what it did meanwhile.
    if has_exited(&fd) {
        targets.exited.insert(pid, Exit::Exited);
        return Ok(());
    }
    watch_exit(pid, fd, targets.exits_tx.clone())?;
    Ok(())
}
