//! Thin, safe wrappers over OS facilities: signals, the `--ready-fd` descriptor, pidfds, and paths resolved
//! inside a process's root. SIGINT (Ctrl-C), SIGTERM (`timeout`, systemd, `kubectl delete`) and SIGHUP (a closed
//! terminal) all mean "stop and report", never "die without a report". The `--ready-fd` protocol's lines (one
//! JSON object each, its first key naming the event) are all defined here, so that their shapes are pinned by one
//! test and documented in one place (README).

use std::{
    fs::{File, OpenOptions},
    io::{self, Write as _},
    os::{
        fd::{AsFd, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::fs::{FileTypeExt as _, OpenOptionsExt as _},
    },
    path::Path,
    sync::Mutex,
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::{mpsc::UnboundedSender, watch},
};

/// Whether a stop signal has arrived, from the task that listens for them. Its sender lives as long as the
/// runtime that runs that task.
static STOP: Mutex<Option<watch::Receiver<bool>>> = Mutex::new(None);

/// The root directory of process `pid` (`/proc/PID/root`), held open (`O_PATH`): it stays usable once the
/// process is gone, and paths inside it are resolved with [`locate_in_root`].
pub fn open_root(pid: u32) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(format!("/proc/{pid}/root"))
}

/// Locates `path` inside the directory `root` as the kernel resolves it for a process whose root that is:
/// `..` stops at it and absolute symlinks start from it (`RESOLVE_IN_ROOT`), so a container's
/// `/usr/lib/x.so -> /opt/x.so` is its own `/opt/x.so`, never the host's. A plain open of
/// `/proc/PID/root/usr/lib/x.so` follows such a link from alloctrace's root instead. Magic links
/// (`/proc/PID/fd/N`, `/proc/PID/root`), which lead anywhere, are refused (`RESOLVE_NO_MAGICLINKS`). The
/// descriptor is `O_PATH`: nothing is opened, so a FIFO or a device put there is never acted on; check what it
/// is, then [`reopen_for_reading`].
pub fn locate_in_root(root: impl AsFd, path: &Path) -> io::Result<File> {
    use rustix::fs::{Mode, OFlags, ResolveFlags, openat2};
    let located = openat2(
        root,
        path,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )?;
    Ok(File::from(located))
}

/// Locates the relative `path` beneath the directory `dir` (`RESOLVE_BENEATH`): a path or symlink that would
/// leave it (`..` above it, an absolute symlink) is refused, as are magic links. `O_PATH`, as
/// [`locate_in_root`].
pub fn locate_beneath(dir: impl AsFd, path: &Path) -> io::Result<File> {
    use rustix::fs::{Mode, OFlags, ResolveFlags, openat2};
    let located = openat2(
        dir,
        path,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    )?;
    Ok(File::from(located))
}

/// Opens for reading the file an `O_PATH` descriptor names, through that descriptor: no path is resolved
/// again, so one swapped since it was checked cannot slip in another file.
pub fn reopen_for_reading(located: &File) -> io::Result<File> {
    File::open(format!("/proc/self/fd/{}", located.as_raw_fd()))
}

/// Takes over SIGINT, SIGTERM and SIGHUP from now on: from here none of them ends the process, and the first
/// one makes [`stop_requested`] resolve, even if it arrives before anything waits for it (while probes are
/// being attached, say). Call it at startup, inside the runtime that runs the trace; calling it again does
/// nothing.
pub fn catch_stop_signals() -> io::Result<()> {
    let mut stop = STOP.lock().unwrap_or_else(|e| e.into_inner());
    // A listener whose runtime has gone can no longer hear anything: replace it.
    if stop.as_ref().is_some_and(|rx| rx.has_changed().is_ok()) {
        return Ok(());
    }
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
            _ = hangup.recv() => {}
        }
        let _ = tx.send(true);
        // Kept open, so that a closed channel means a runtime that has gone, never a stop.
        tx.closed().await;
    });
    *stop = Some(rx);
    Ok(())
}

/// Resolves once SIGINT, SIGTERM or SIGHUP has arrived since [`catch_stop_signals`] (which it calls, for a
/// caller that did not), at once if one already has.
pub async fn stop_requested() -> io::Result<()> {
    loop {
        catch_stop_signals()?;
        let mut stop = STOP
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .expect("set by catch_stop_signals");
        if stop.wait_for(|&stopped| stopped).await.is_ok() {
            return Ok(());
        }
    }
}

/// The descriptor `--ready-fd` named, until [`close_ready_fd`] (or a write that fails).
static READY: Mutex<Option<File>> = Mutex::new(None);

/// Takes the descriptor `--ready-fd` names. `main` calls it first thing, before anything opens a descriptor of
/// its own (the runtime does): a number that is not open then fails at once, and one alloctrace opened itself
/// can never be taken for it. The standard streams are refused: they would never be closed, so their reader
/// would never see the trace end. The descriptor is made close-on-exec (the command alloctrace starts does not
/// inherit it). A pipe is written without blocking, through an open file description of alloctrace's own (so
/// that the flag cannot reach whoever shares the inherited one, a shell's terminal say): a reader that stops
/// reading can never stall the trace.
pub fn claim_ready_fd(fd: RawFd) -> anyhow::Result<()> {
    if fd < 0 {
        bail!("--ready-fd {fd}: not a file descriptor");
    }
    if fd <= 2 {
        bail!("--ready-fd {fd}: a standard stream; give a descriptor of its own, 3 or more");
    }
    // SAFETY: fcntl takes any number; a closed one is an error (EBADF).
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        bail!(
            "--ready-fd {fd}: not an open file descriptor ({})",
            io::Error::last_os_error()
        );
    }
    // SAFETY: the descriptor is open, and nothing else in this process owns it: it was inherited, `main`
    // claiming it before the runtime opens anything.
    let inherited = unsafe { File::from_raw_fd(fd) };
    let is_pipe = inherited
        .metadata()
        .is_ok_and(|meta| meta.file_type().is_fifo());
    let own_pipe_end = is_pipe
        .then(|| {
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(format!("/proc/self/fd/{fd}"))
                .ok()
        })
        .flatten();
    *READY.lock().unwrap_or_else(|e| e.into_inner()) = Some(own_pipe_end.unwrap_or(inherited));
    Ok(())
}

/// The ready line `--ready-fd` receives first.
#[derive(Serialize)]
pub struct Ready<'a> {
    ready: bool,
    /// `tracing`, or `watching` for the agent.
    mode: &'static str,
    /// The processes traced (or watched) from the start: those named with `-p`, the command started, and the
    /// running processes chosen by name, container or cgroup whose allocator was already mapped (the others
    /// come as `attached` lines).
    pids: &'a [u32],
    /// Where the agent serves its HTTP endpoints.
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<String>,
}

impl<'a> Ready<'a> {
    /// A trace's ready line.
    pub fn tracing(pids: &'a [u32]) -> Self {
        Self {
            ready: true,
            mode: "tracing",
            pids,
            listen: None,
        }
    }

    /// The agent's ready line.
    pub fn watching(pids: &'a [u32], listen: String) -> Self {
        Self {
            ready: true,
            mode: "watching",
            pids,
            listen: Some(listen),
        }
    }
}

/// A line `--ready-fd` receives for each process whose allocator probes go on.
#[derive(Serialize)]
struct Attached {
    attached: u32,
}

/// A line `--ready-fd` receives for each process whose Python frames are read from now on.
#[derive(Serialize)]
struct PythonFrames<'a> {
    python_frames: u32,
    /// The interpreter's version, major.minor: `3.12`.
    version: &'a str,
    /// The parent whose interpreter a forked child inherited; absent for a process found by its own exec or at
    /// the start.
    #[serde(skip_serializing_if = "Option::is_none")]
    forked_by: Option<u32>,
}

/// A container's memory cgroup as an escalation line gives it: the reading the agent's decision was made on.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct MemoryReading {
    pub usage_bytes: u64,
    /// `None` (JSON `null`) for a container without a limit.
    pub limit_bytes: Option<u64>,
    /// Growth over the agent's window, per second; negative when it shrank.
    pub growth_bytes_per_second: i64,
}

/// Why a container's processes got the allocator uprobes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EscalationCause {
    /// Past `--escalate-at` percent of its memory limit.
    Limit,
    /// Growing faster than `--escalate-rate`.
    Rate,
    /// Processes of a container escalated before, which had not had them yet (new, or under the cap before).
    Joined,
}

/// Why a container's processes lost the allocator uprobes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RelaxCause {
    /// Below `--escalate-at` by the hysteresis, growing slowly, and escalated long enough.
    FellBack,
    /// No memory cgroup reading any more: its processes are gone.
    Gone,
}

/// What a change of a container's tier names: its id, its name when known, and the processes it concerns.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ContainerChange<Cause> {
    /// The container's full id: the line's first key.
    #[serde(skip)]
    pub id: String,
    pub name: Option<String>,
    pub why: Cause,
    pub pids: Vec<u32>,
    /// The reading that decided it; absent for [`EscalationCause::Joined`], which no reading decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryReading>,
}

/// A line `--ready-fd` receives when the agent escalates a container: `pids` got the allocator uprobes.
#[derive(Serialize)]
struct Escalated<'a> {
    escalated: &'a str,
    #[serde(flatten)]
    change: &'a ContainerChange<EscalationCause>,
}

/// A line `--ready-fd` receives when an escalated container relaxes: `pids` lost the allocator uprobes.
#[derive(Serialize)]
struct Relaxed<'a> {
    relaxed: &'a str,
    #[serde(flatten)]
    change: &'a ContainerChange<RelaxCause>,
}

/// A line `--ready-fd` receives, once per escalation, when processes of an escalated container stay in the
/// watch tier because `--max-escalated` processes have the uprobes.
#[derive(Serialize)]
struct Capped<'a> {
    capped: &'a str,
    name: Option<&'a str>,
    pids: &'a [u32],
    max_escalated: usize,
}

/// What kind of file a `wrote` line names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// A trace's report (`leaks`, `large`, `-o FILE`), complete.
    Report,
    /// An OOM kill's record: `oom`'s file per kill or its `-o FILE` with the record appended, or the agent's
    /// post-mortem and its flame graph.
    OomRecord,
}

/// A line `--ready-fd` receives for each file alloctrace has written, once it is complete on disk.
#[derive(Serialize)]
struct Wrote<'a> {
    wrote: &'a Path,
    kind: FileKind,
    /// The output format's name (`json`, `flamegraph`, …), as `--format` takes it.
    format: &'a str,
    /// The OOM victim's pid, for an OOM record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
}

/// Writes `line` as one JSON line to the `--ready-fd` descriptor, if one was claimed. A reader that has gone, or
/// that does not read (its pipe full), gets no more lines, and is not an error for the trace: the error is
/// returned for the caller to say.
fn say(line: &impl Serialize) -> io::Result<()> {
    let mut ready = READY.lock().unwrap_or_else(|e| e.into_inner());
    let Some(file) = ready.as_mut() else {
        return Ok(());
    };
    let mut bytes = serde_json::to_vec(line)?;
    bytes.push(b'\n');
    let written = file.write_all(&bytes);
    if written.is_err() {
        *ready = None;
    }
    written
}

/// Says on the `--ready-fd` descriptor that tracing has begun: what the targets do from now on is seen.
pub fn say_ready(ready: &Ready<'_>) -> io::Result<()> {
    say(ready)
}

/// Says on the `--ready-fd` descriptor that `pid`'s allocator probes are on.
pub fn say_attached(pid: u32) -> io::Result<()> {
    say(&Attached { attached: pid })
}

/// Says on the `--ready-fd` descriptor that `pid`'s Python frames are read from now on, with its interpreter's
/// `version`; `forked_by` the parent it inherited them from, for a forked child.
pub fn say_python_frames(pid: u32, version: &str, forked_by: Option<u32>) -> io::Result<()> {
    say(&PythonFrames {
        python_frames: pid,
        version,
        forked_by,
    })
}

/// Says on the `--ready-fd` descriptor that a container's processes got the allocator uprobes.
pub fn say_escalated(change: &ContainerChange<EscalationCause>) -> io::Result<()> {
    say(&Escalated {
        escalated: &change.id,
        change,
    })
}

/// Says on the `--ready-fd` descriptor that an escalated container's processes lost the allocator uprobes.
pub fn say_relaxed(change: &ContainerChange<RelaxCause>) -> io::Result<()> {
    say(&Relaxed {
        relaxed: &change.id,
        change,
    })
}

/// Says on the `--ready-fd` descriptor that processes `pids` of escalated container `id` stay in the watch tier:
/// `max_escalated` processes have the uprobes already.
pub fn say_capped(
    id: &str,
    name: Option<&str>,
    pids: &[u32],
    max_escalated: usize,
) -> io::Result<()> {
    say(&Capped {
        capped: id,
        name,
        pids,
        max_escalated,
    })
}

/// Says on the `--ready-fd` descriptor that `path` has been written, complete: a file of `kind` in `format`,
/// about OOM victim `pid` for an OOM record.
pub fn say_wrote(path: &Path, kind: FileKind, format: &str, pid: Option<u32>) -> io::Result<()> {
    // A reader in another directory finds the file all the same.
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    say(&Wrote {
        wrote: &path,
        kind,
        format,
        pid,
    })
}

/// Closes the `--ready-fd` descriptor: its reader sees the end of the trace, every file said written.
pub fn close_ready_fd() {
    READY.lock().unwrap_or_else(|e| e.into_inner()).take();
}

/// A pidfd for `pid`: it refers to that process only, even once its pid is reused.
pub fn pidfd(pid: u32) -> io::Result<OwnedFd> {
    use rustix::process::{Pid, PidfdFlags, pidfd_open};
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or(io::ErrorKind::InvalidInput)?;
    Ok(pidfd_open(pid, PidfdFlags::empty())?)
}

/// True once the process behind a pidfd has exited.
pub fn has_exited(fd: &OwnedFd) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    poll(&mut [PollFd::new(fd, PollFlags::IN)], Some(&now)) == Ok(1)
}

/// Sends `pid` on `exits` when the process exits.
pub fn watch_exit(pid: u32, fd: OwnedFd, exits: UnboundedSender<u32>) -> anyhow::Result<()> {
    // SAFETY: the AsyncFd owns the pidfd, which stays open, and the same, for the AsyncFd's whole life.
    let fd = unsafe { AsyncFd::register(fd) }
        .map_err(io::Error::from)
        .context("cannot watch a pidfd")?;
    tokio::spawn(async move {
        let _ = fd.readable().await;
        let _ = exits.send(pid);
    });
    Ok(())
}

/// Continues a process the kernel stopped at its exec.
pub fn resume(pid: u32) {
    use rustix::process::{Pid, Signal, kill_process};
    // The process is stopped, so its pid cannot have been reused; one gone needs no signal.
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = kill_process(pid, Signal::CONT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    #[test]
    fn every_kind_of_line_goes_to_the_claimed_descriptor_in_its_shape_until_closed() {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two-element array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // Another holder of the same open file description, as a shell holding its terminal would be.
        // SAFETY: dup of a descriptor this test owns.
        let shared = unsafe { OwnedFd::from_raw_fd(libc::dup(fds[1])) };
        claim_ready_fd(fds[1]).unwrap();
        // SAFETY: F_GETFL on an open descriptor.
        let flags = unsafe { libc::fcntl(shared.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(
            flags & libc::O_NONBLOCK,
            0,
            "the shared description stays blocking"
        );
        drop(shared);
        say_ready(&Ready::tracing(&[7, 8])).unwrap();
        say_attached(9).unwrap();
        say_python_frames(9, "3.12", None).unwrap();
        say_python_frames(11, "3.12", Some(9)).unwrap();
        let memory = MemoryReading {
            usage_bytes: 92_274_688,
            limit_bytes: Some(167_772_160),
            growth_bytes_per_second: -1024,
        };
        say_escalated(&ContainerChange {
            id: "c0ffee".to_owned(),
            name: Some("etl".to_owned()),
            why: EscalationCause::Limit,
            pids: vec![9, 11],
            memory: Some(memory),
        })
        .unwrap();
        say_escalated(&ContainerChange {
            id: "c0ffee".to_owned(),
            name: Some("etl".to_owned()),
            why: EscalationCause::Joined,
            pids: vec![12],
            memory: None,
        })
        .unwrap();
        say_capped("c0ffee", Some("etl"), &[13], 8).unwrap();
        say_relaxed(&ContainerChange {
            id: "beef".to_owned(),
            name: None,
            why: RelaxCause::Gone,
            pids: vec![],
            memory: Some(MemoryReading {
                limit_bytes: None,
                ..memory
            }),
        })
        .unwrap();
        say_wrote(
            Path::new("/var/lib/alloctrace/oom-1-etl-9.json"),
            FileKind::OomRecord,
            "json",
            Some(9),
        )
        .unwrap();
        say_wrote(Path::new("report.html"), FileKind::Report, "html", None).unwrap();
        close_ready_fd();
        // Closed: nothing more is said, and the reader sees the end.
        say_attached(10).unwrap();
        let mut read = String::new();
        // SAFETY: the read end, owned by nothing else.
        unsafe { File::from_raw_fd(fds[0]) }
            .read_to_string(&mut read)
            .unwrap();
        let report = std::env::current_dir().unwrap().join("report.html");
        let expected = [
            r#"{"ready":true,"mode":"tracing","pids":[7,8]}"#.to_owned(),
            r#"{"attached":9}"#.to_owned(),
            r#"{"python_frames":9,"version":"3.12"}"#.to_owned(),
            r#"{"python_frames":11,"version":"3.12","forked_by":9}"#.to_owned(),
            r#"{"escalated":"c0ffee","name":"etl","why":"limit","pids":[9,11],"memory":{"usage_bytes":92274688,"limit_bytes":167772160,"growth_bytes_per_second":-1024}}"#.to_owned(),
            r#"{"escalated":"c0ffee","name":"etl","why":"joined","pids":[12]}"#.to_owned(),
            r#"{"capped":"c0ffee","name":"etl","pids":[13],"max_escalated":8}"#.to_owned(),
            r#"{"relaxed":"beef","name":null,"why":"gone","pids":[],"memory":{"usage_bytes":92274688,"limit_bytes":null,"growth_bytes_per_second":-1024}}"#.to_owned(),
            r#"{"wrote":"/var/lib/alloctrace/oom-1-etl-9.json","kind":"oom_record","format":"json","pid":9}"#.to_owned(),
            format!(
                r#"{{"wrote":"{}","kind":"report","format":"html"}}"#,
                report.display()
            ),
        ];
        assert_eq!(read, expected.map(|line| line + "\n").concat());
    }

    #[test]
    fn a_descriptor_that_is_not_open_is_refused() {
        let err = claim_ready_fd(1 << 20).unwrap_err().to_string();
        assert!(
            err.contains("--ready-fd 1048576: not an open file descriptor"),
            "{err}"
        );
        let err = claim_ready_fd(-1).unwrap_err().to_string();
        assert_eq!(err, "--ready-fd -1: not a file descriptor");
        let err = claim_ready_fd(2).unwrap_err().to_string();
        assert_eq!(
            err,
            "--ready-fd 2: a standard stream; give a descriptor of its own, 3 or more"
        );
    }

    /// Sends `signal` to this process.
    fn raise(signal: libc::c_int) {
        // SAFETY: kill has no memory preconditions; the handler tokio installed turns it into a wake-up.
        assert_eq!(unsafe { libc::kill(libc::getpid(), signal) }, 0);
    }

    /// One test, because the signals and their listener belong to the whole process.
    #[tokio::test]
    async fn sigterm_and_sighup_stop_like_ctrl_c_even_when_sent_before_anything_waits() {
        catch_stop_signals().unwrap();
        // Before anyone waits: remembered, not fatal.
        raise(libc::SIGTERM);
        stop_requested().await.unwrap();
        // A stop stays requested.
        stop_requested().await.unwrap();
        raise(libc::SIGHUP);
        raise(libc::SIGINT);
        stop_requested().await.unwrap();
    }
}
