//! alloctrace's machine-readable signal, `--ready-fd`: a test starts alloctrace with the write end of a pipe as
//! that descriptor, and reads from it, as JSON lines, when tracing has begun and which processes were attached
//! since, instead of the wording of stderr.

use std::{
    fs::File,
    io::{BufRead as _, BufReader},
    os::{
        fd::{FromRawFd as _, OwnedFd, RawFd},
        unix::process::CommandExt as _,
    },
    process::Command,
    sync::mpsc::{Receiver, RecvTimeoutError, channel},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::alloctrace;

/// Generous: on an idle machine alloctrace is ready in well under a second, but the tests share two cores.
pub const READY_BOUND: Duration = Duration::from_secs(180);

/// The read end of alloctrace's `--ready-fd` pipe, read on a thread of its own.
pub struct ReadyPipe {
    /// The lines read, once reading has started.
    lines: Option<Receiver<Value>>,
    /// The parent's copy of the write end, closed once alloctrace has it, so that the pipe ends with alloctrace.
    write: Option<OwnedFd>,
    read: Option<File>,
    /// Pids attached so far, in the order said.
    pub attached: Vec<u32>,
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
            attached: Vec::new(),
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

    /// The next line, within `deadline`; fails saying `what` was awaited.
    fn next(&mut self, deadline: Instant, what: &str) -> Value {
        self.start();
        let lines = self.lines.as_ref().expect("started");
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => {
                panic!("alloctrace did not say {what} on --ready-fd within {READY_BOUND:?}")
            }
            Err(RecvTimeoutError::Disconnected) => {
                panic!("alloctrace closed --ready-fd (it ended) before it said {what}")
            }
        }
    }

    /// Waits for the ready line, once alloctrace has been spawned, and returns it: `mode`, `pids` and, for the
    /// agent, `listen`.
    pub fn wait_ready(&mut self) -> Value {
        let deadline = Instant::now() + READY_BOUND;
        loop {
            let line = self.next(deadline, "it is ready");
            if line["ready"] == true {
                return line;
            }
            self.note(&line);
        }
    }

    /// Waits until every pid of `pids` has been attached (its allocator probes are on), said before or now.
    pub fn wait_attached(&mut self, pids: &[u32]) {
        let deadline = Instant::now() + READY_BOUND;
        while let Some(missing) = pids.iter().find(|pid| !self.attached.contains(pid)) {
            let line = self.next(deadline, &format!("pid {missing} is attached"));
            self.note(&line);
        }
    }

    /// Keeps what an `attached` line says.
    fn note(&mut self, line: &Value) {
        if let Some(pid) = line["attached"].as_u64() {
            self.attached.push(pid as u32);
        }
    }
}
