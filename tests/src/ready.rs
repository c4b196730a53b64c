//! alloctrace's machine-readable signal, `--ready-fd`: a test starts alloctrace with the write end of a pipe as
//! that descriptor, and reads from it, as JSON lines, when tracing has begun and what happened since (a process
//! attached, its Python frames read, a container escalated or relaxed, a file written), instead of the wording of
//! stderr.

use std::{
    fs::File,
    io::{BufRead as _, BufReader},
    os::{
        fd::{FromRawFd as _, OwnedFd, RawFd},
        unix::process::CommandExt as _,
    },
    path::PathBuf,
    process::Command,
    sync::mpsc::{Receiver, RecvTimeoutError, channel},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::alloctrace;

/// Generous: on an idle machine alloctrace is ready in well under a second, but the tests share two cores.
pub const READY_BOUND: Duration = Duration::from_secs(180);
/// Generous likewise, for an event that follows something a test did (a container started, memory allocated).
pub const EVENT_BOUND: Duration = Duration::from_secs(180);

/// The read end of alloctrace's `--ready-fd` pipe, read on a thread of its own.
pub struct ReadyPipe {
    /// The lines read, once reading has started.
    lines: Option<Receiver<Value>>,
    /// The parent's copy of the write end, closed once alloctrace has it, so that the pipe ends with alloctrace.
    write: Option<OwnedFd>,
    read: Option<File>,
    /// Every line read so far, in the order said.
    said: Vec<Value>,
    /// Which lines of `said` a wait for an event has returned: each is returned once, so that waiting twice for
    /// the same kind of event waits for two of them.
    taken: Vec<bool>,
}

/// `alloctrace --ready-fd N` (with no other argument yet), N the write end of a new pipe that only this
/// command's child inherits; and that pipe's read end.
pub fn alloctrace_with_ready_fd() -> (Command, ReadyPipe) {
    let mut fds: [RawFd; 2] = [0; 2];
    // SAFETY: pipe2 fills the two-element array. Close-on-exec: no other child of the test inherits either end.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just made, and nothing else owns them.
    let (read, write) = unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let write_fd = fds[1];
    let mut command = Command::new(alloctrace());
    // What alloctrace says on stderr is what the tests read: the caller's RUST_LOG must not change it.
    command.env_remove("RUST_LOG");
    command.arg("--ready-fd").arg(write_fd.to_string());
    // SAFETY: between fork and exec the child only calls fcntl, which is async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            // alloctrace inherits the write end, under the number it was told.
            if libc::fcntl(write_fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    (
        command,
        ReadyPipe {
            lines: None,
            write: Some(write),
            read: Some(read),
            said: Vec::new(),
            taken: Vec::new(),
        },
    )
}

impl ReadyPipe {
    /// Starts reading, once alloctrace has been spawned: the parent's write end is closed first, so that the
    /// pipe ends when alloctrace closes it or exits.
    fn start(&mut self) {
        let Some(read) = self.read.take() else {
            return;
        };
        drop(self.write.take());
        let (sender, receiver) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(read).lines() {
                let Ok(line) = line else { break };
                let value: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("--ready-fd line {line:?} is not JSON: {e}"));
                // Read to the end even once the test has stopped listening: alloctrace never finds the pipe
                // closed under it, and says nothing about it on stderr.
                let _ = sender.send(value);
            }
        });
        self.lines = Some(receiver);
    }

    /// Reads the next line into [`Self::said`], within `deadline`; fails saying `what` was awaited, and what was
    /// said.
    fn read_next(&mut self, deadline: Instant, what: &str) {
        self.start();
        let lines = self.lines.as_ref().expect("started");
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                self.said.push(line);
                self.taken.push(false);
            }
            Err(RecvTimeoutError::Timeout) => {
                panic!(
                    "alloctrace did not say {what} on --ready-fd in time; it said:\n{}",
                    self.said_text()
                )
            }
            Err(RecvTimeoutError::Disconnected) => {
                panic!(
                    "alloctrace closed --ready-fd (it ended) before it said {what}; it said:\n{}",
                    self.said_text()
                )
            }
        }
    }

    /// Waits until alloctrace closes the descriptor (its trace is over, every file said written), reading every
    /// line it says until then.
    pub fn wait_closed(&mut self) {
        self.start();
        let deadline = Instant::now() + EVENT_BOUND;
        loop {
            let lines = self.lines.as_ref().expect("started");
            match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    self.said.push(line);
                    self.taken.push(false);
                }
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "alloctrace did not close --ready-fd in time; it said:\n{}",
                    self.said_text()
                ),
            }
        }
    }

    /// Every line read so far, in the order alloctrace said them.
    pub fn said(&self) -> &[Value] {
        &self.said
    }

    fn said_text(&self) -> String {
        self.said
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits for the ready line, once alloctrace has been spawned, and returns it: `mode`, `pids` and, for the
    /// agent, `listen`. The lines said before it stay in [`Self::said`].
    pub fn wait_ready(&mut self) -> Value {
        let deadline = Instant::now() + READY_BOUND;
        let mut read = 0;
        loop {
            if let Some(line) = self.said[read..].iter().find(|line| line["ready"] == true) {
                return line.clone();
            }
            read = self.said.len();
            self.read_next(deadline, "it is ready");
        }
    }

    /// Waits until every pid of `pids` has been attached (its allocator probes are on), said before or now.
    pub fn wait_attached(&mut self, pids: &[u32]) {
        let deadline = Instant::now() + READY_BOUND;
        loop {
            let attached = |pid: &u32| self.said.iter().any(|line| line["attached"] == *pid);
            let Some(missing) = pids.iter().find(|pid| !attached(pid)) else {
                return;
            };
            let what = format!("pid {missing} is attached");
            self.read_next(deadline, &what);
        }
    }

    /// The first line `wanted` accepts that no wait for an event has returned yet, among the lines said before
    /// or from now on, within [`EVENT_BOUND`]: lines about several processes at once come in no known order.
    /// Fails saying `what` was awaited.
    pub fn wait_event(&mut self, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + EVENT_BOUND;
        let mut read = 0;
        loop {
            let found = (read..self.said.len()).find(|&i| !self.taken[i] && wanted(&self.said[i]));
            if let Some(index) = found {
                self.taken[index] = true;
                return self.said[index].clone();
            }
            read = self.said.len();
            self.read_next(deadline, what);
        }
    }

    /// Waits until alloctrace reads `pid`'s Python frames (it found the interpreter at exec or at the start),
    /// and returns the interpreter's version.
    pub fn wait_python_frames(&mut self, pid: u32) -> String {
        let line = self.wait_event(&format!("it reads pid {pid}'s Python frames"), |line| {
            line["python_frames"] == pid && line.get("forked_by").is_none()
        });
        version(&line)
    }

    /// Waits until alloctrace reads the Python frames of a child `parent` forked, and returns the child's pid and
    /// its interpreter's version.
    pub fn wait_python_frames_forked_by(&mut self, parent: u32) -> (u32, String) {
        let line = self.wait_event(
            &format!("it reads the Python frames of a child of pid {parent}"),
            |line| line["python_frames"].is_u64() && line["forked_by"] == parent,
        );
        let child = line["python_frames"].as_u64().unwrap() as u32;
        (child, version(&line))
    }

    /// Waits until alloctrace has written, complete, a file of `kind` in `format` (about OOM victim `pid`, for an
    /// OOM record), and returns its path.
    pub fn wait_wrote(&mut self, kind: &str, format: &str, pid: Option<u32>) -> PathBuf {
        let what = format!("it wrote a {kind} in {format} (pid {pid:?})");
        let line = self.wait_event(&what, |line| {
            line["wrote"].is_string()
                && line["kind"] == kind
                && line["format"] == format
                && line["pid"].as_u64() == pid.map(u64::from)
        });
        PathBuf::from(line["wrote"].as_str().unwrap())
    }
}

/// A `python_frames` line's version.
fn version(line: &Value) -> String {
    line["version"]
        .as_str()
        .unwrap_or_else(|| panic!("a python_frames line names the version: {line}"))
        .to_owned()
}
