//! The agent's tests' shared pieces: starting `alloctrace agent` and reading its log line by line, asking its
//! HTTP endpoints, and what it holds from outside: its resident memory (`/proc/PID/status`), the BPF programs,
//! maps and links it holds (`/proc/PID/fdinfo`), whether the kernel still has them, its helper process, and the
//! uprobe events of its group in tracefs.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    path::PathBuf,
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::mpsc::{Receiver, RecvTimeoutError, channel},
    time::{Duration, Instant},
};

use crate::{
    docker, pyenv_prefix,
    ready::{ReadyPipe, alloctrace_with_ready_fd},
};

/// Generous bounds for things that take a fraction of a second on an idle machine: the tests share two cores.
pub const STARTUP: Duration = Duration::from_secs(180);
pub const EVENT: Duration = Duration::from_secs(90);

/// The OOM victim: waits for a line, then appends 1 MiB bytearrays until it is killed. Line 5 holds it all.
pub const HOG: &str = "import sys
def hog():
    held = []
    while True:
        held.append(bytearray(1 << 20))
print('ready', flush=True)
sys.stdin.readline()
hog()
";

/// Lines a child writes on one of its streams, read on a thread of their own, kept for failure messages.
pub struct Lines {
    pub receiver: Receiver<String>,
    pub seen: Vec<String>,
    what: &'static str,
}

impl Lines {
    pub fn new(stream: impl std::io::Read + Send + 'static, what: &'static str) -> Self {
        let (sender, receiver) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            receiver,
            seen: Vec::new(),
            what,
        }
    }

    /// The first line from now on that `wanted` accepts; fails after `bound`, with everything read.
    pub fn wait_for(&mut self, bound: Duration, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + bound;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.receiver.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if wanted(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "{} did not say it within {bound:?}:\n{}",
                        self.what,
                        self.seen.join("\n")
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("{} ended:\n{}", self.what, self.seen.join("\n"))
                }
            }
        }
    }

    /// Everything said so far, those lines no wait has read yet with them: for a failure message.
    pub fn said(&mut self) -> String {
        while let Ok(line) = self.receiver.try_recv() {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }
}

/// Kills and reaps a child when the test ends, whichever way.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Python task (pyenv's 3.12) in a container of its own, with a memory limit: its stdin, stdout lines, and
/// host pid. It is started once it says `ready`; the container is removed when it is dropped.
pub struct Task {
    pub name: String,
    stdin: ChildStdin,
    pub stdout: Lines,
    pub pid: u32,
    pub id: String,
    child: Reaped,
}

impl Task {
    pub fn start(image: &str, name: String, memory_mib: u32, script: &str) -> Self {
        let python = pyenv_prefix("3.12").join("bin/python3.12");
        let mut child = Command::new("docker")
            .args(["run", "-i", "--network", "none", "--name", &name])
            .arg(format!("--memory={memory_mib}m"))
            .arg(format!("--memory-swap={memory_mib}m"))
            .arg(image)
            .arg(&python)
            .args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker run");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = Lines::new(child.stdout.take().unwrap(), "the container");
        stdout.wait_for(EVENT, |line| line == "ready");
        let (pid, id) = (docker::container_pid(&name), docker::container_id(&name));
        Self {
            name,
            stdin,
            stdout,
            pid,
            id,
            child: Reaped(child),
        }
    }

    /// Sends it a line: what its script waits for to go on.
    pub fn go(&mut self) {
        writeln!(self.stdin).unwrap();
    }

    /// Has a step-driven task take a step (a line of its own language), and waits until it says `done`.
    pub fn step(&mut self, command: &str) {
        self.send(command);
        self.stdout.wait_for(EVENT, |l| l == "done");
    }

    /// Sends a step-driven task a line, without waiting for its answer (a step it may not live through).
    pub fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").unwrap();
    }

    /// Waits for the container to end (`docker run` to return), at most `bound`.
    pub fn wait_exit(&mut self, bound: Duration) -> ExitStatus {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "container {} still runs after {bound:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The agent, once it says on `--ready-fd` that it is ready.
pub struct Agent {
    /// Killed and reaped when dropped, if the test fails before it stops the agent.
    pub process: Reaped,
    /// Its stderr, for failure messages: the tests wait on `events`, not on its wording.
    pub log: Lines,
    /// Its `--ready-fd`, the lines before the ready line kept.
    pub events: ReadyPipe,
    /// Where it serves HTTP.
    pub listen: String,
}

impl Agent {
    pub fn pid(&self) -> u32 {
        self.process.0.id()
    }

    /// Stops it as systemd or `kubectl delete` does, with SIGTERM, and checks that it exits 0.
    pub fn stop(mut self) {
        // SAFETY: signalling the child we spawned and have not reaped.
        unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) };
        let status = self.process.0.wait().unwrap();
        assert!(status.success(), "{status}: {}", self.log.said());
    }
}

/// Starts the agent with `args` and returns it once it says on `--ready-fd` that it is ready.
pub fn start_agent(args: &[&str]) -> Agent {
    let (mut command, mut events) = alloctrace_with_ready_fd();
    let mut process = command
        .arg("agent")
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Lines::new(process.stderr.take().unwrap(), "the agent");
    let process = Reaped(process);
    let said = events.wait_ready();
    assert_eq!(said["mode"], "watching", "{said}");
    let listen = said["listen"]
        .as_str()
        .unwrap_or_else(|| panic!("the agent says where it serves: {said}"))
        .to_owned();
    Agent {
        process,
        log,
        events,
        listen,
    }
}

/// `GET path` on `addr`, the body of a 200 answer.
pub fn get(addr: &str, path: &str) -> String {
    String::from_utf8(get_bytes(addr, path)).expect("a text answer")
}

/// `GET path` on `addr`, the body of a 200 answer, as bytes.
pub fn get_bytes(addr: &str, path: &str) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP answer");
    let head = String::from_utf8_lossy(&answer[..split]);
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    answer[split + 4..].to_vec()
}

/// A fresh directory under the temporary one, for this test process.
pub fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("alloctrace-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A process's resident memory now and at its peak, in bytes: `VmRSS` and `VmHWM` of `/proc/PID/status`.
pub fn resident_bytes(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kib| kib.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status:\n{status}"))
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The kinds of BPF object a process can hold a descriptor of, with the `bpf(2)` command that opens one by id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BpfKind {
    Program,
    Map,
    Link,
}

impl BpfKind {
    /// Its line in `/proc/PID/fdinfo/FD`.
    fn fdinfo_key(self) -> &'static str {
        match self {
            Self::Program => "prog_id:",
            Self::Map => "map_id:",
            Self::Link => "link_id:",
        }
    }

    /// `BPF_PROG_GET_FD_BY_ID`, `BPF_MAP_GET_FD_BY_ID`, `BPF_LINK_GET_FD_BY_ID` (include/uapi/linux/bpf.h).
    fn get_fd_by_id(self) -> libc::c_long {
        match self {
            Self::Program => 13,
            Self::Map => 14,
            Self::Link => 30,
        }
    }
}

/// The BPF objects (kind, id) a process holds descriptors of, from `/proc/PID/fdinfo`.
pub fn bpf_objects(pid: u32) -> Vec<(BpfKind, u32)> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut objects = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
        // A descriptor closed since the listing is no object held.
        let Ok(info) = std::fs::read_to_string(entry.unwrap().path()) else {
            continue;
        };
        for kind in [BpfKind::Program, BpfKind::Map, BpfKind::Link] {
            let id = info
                .lines()
                .find_map(|line| line.strip_prefix(kind.fdinfo_key()))
                .and_then(|id| id.trim().parse().ok());
            if let Some(id) = id {
                objects.push((kind, id));
            }
        }
    }
    objects.sort_by_key(|&(kind, id)| (kind as u8, id));
    objects.dedup();
    objects
}

/// Whether the kernel still has BPF object `id` of `kind`: it opens it by id (root may), or says it has none.
pub fn bpf_object_exists(kind: BpfKind, id: u32) -> bool {
    // `union bpf_attr` for the GET_FD_BY_ID commands: the id, then the next id and flags, unused here.
    let attr: [u32; 4] = [id, 0, 0, 0];
    // SAFETY: bpf(2) reads `size_of_val(&attr)` bytes of a valid buffer and returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            kind.get_fd_by_id(),
            attr.as_ptr(),
            size_of_val(&attr),
        )
    };
    if fd >= 0 {
        // SAFETY: a descriptor just returned to us.
        unsafe { libc::close(fd as i32) };
        return true;
    }
    let err = std::io::Error::last_os_error();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOENT),
        "cannot ask the kernel for {kind:?} {id}: {err}"
    );
    false
}

/// The child processes of `pid` (of every thread of it).
pub fn children(pid: u32) -> Vec<u32> {
    let tasks = format!("/proc/{pid}/task");
    let mut children = Vec::new();
    for task in std::fs::read_dir(&tasks).unwrap_or_else(|e| panic!("{tasks}: {e}")) {
        let path = task.unwrap().path().join("children");
        if let Ok(text) = std::fs::read_to_string(path) {
            children.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    children
}

/// The uprobe events of alloctrace run `pid`'s group (`alloctrace_PID_…`) that tracefs still lists.
pub fn uprobe_events_of(pid: u32) -> Vec<String> {
    let tracefs = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .into_iter()
        .find(|dir| std::path::Path::new(dir).join("uprobe_events").exists())
        .expect("tracefs is mounted (the agent mounts it)");
    let events = std::fs::read_to_string(format!("{tracefs}/uprobe_events")).unwrap();
    let group = format!(":alloctrace_{pid}_");
    events
        .lines()
        .filter(|line| line.contains(&group))
        .map(str::to_owned)
        .collect()
}

/// Waits until `done` holds, asking again every 100 ms; fails after `bound` saying `what` never happened.
pub fn wait_until(bound: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {bound:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
