//! Starts a command to trace from its first instruction. The child is forked and held at a gate until the
//! probes are attached for its pid; then it execs. It is ptraced only for `PTRACE_EVENT_EXIT`: held at its exit,
//! before its address space is torn down, while the tracer drains the ring buffer and names the last stacks.
//! Signals reach it unchanged, and it is never stopped otherwise.
//!
//! On libc, not rustix: rustix has no fork and no ptrace, and the child between fork and exec must make only
//! raw system calls on descriptors prepared before the fork.

use std::{
    ffi::{CString, OsString},
    io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    sync::mpsc,
};

use anyhow::{Context as _, anyhow, bail};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::model::Exit;

/// What happens to the child, in order.
#[derive(Debug)]
pub enum ChildEvent {
    /// `execve` failed: the command never ran.
    ExecFailed(io::Error),
    /// The child is held at its exit, its memory still mapped, until the sender is used or dropped.
    Exiting(mpsc::Sender<()>),
    Exited(Exit),
}

pub struct Child {
    pub pid: u32,
    release: mpsc::Sender<()>,
    pub events: UnboundedReceiver<ChildEvent>,
}

impl Child {
    /// Lets the child exec the command. Dropping a `Child` without releasing it kills the child.
    pub fn release(self) -> UnboundedReceiver<ChildEvent> {
        // The supervising thread is alive until the child is reaped: a send cannot fail before that.
        let _ = self.release.send(());
        self.events
    }
}

/// The executable `execve` will run for `program`: searched in `PATH` like a shell does.
pub fn resolve_program(program: &OsString) -> anyhow::Result<PathBuf> {
    let program = Path::new(program);
    if program.as_os_str().as_bytes().contains(&b'/') {
        return Ok(program.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
        .with_context(|| format!("command not found: {}", program.display()))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The ELF file that ends up running for `program`: scripts name their interpreter on a `#!` line, and
/// `#!/usr/bin/env NAME` searches `PATH` for NAME.
pub fn executable_image(program: &Path) -> anyhow::Result<PathBuf> {
    let mut current = program.to_path_buf();
    for _ in 0..4 {
        let head = read_head(&current)?;
        let Some(line) = head.strip_prefix(b"#!") else {
            return Ok(current);
        };
        let line =
            String::from_utf8_lossy(line.split(|&b| b == b'\n').next().unwrap_or(&[])).into_owned();
        let mut words = line.split_whitespace();
        let interpreter = words
            .next()
            .with_context(|| format!("{} has an empty #! line", current.display()))?;
        current = match (Path::new(interpreter).file_name(), words.next()) {
            (Some(name), Some(target)) if name == "env" && !target.starts_with('-') => {
                resolve_program(&OsString::from(target))?
            }
            _ => PathBuf::from(interpreter),
        };
    }
    bail!("{}: too many levels of #! interpreters", program.display())
}

fn read_head(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut head = vec![0; 256];
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let n = file.read(&mut head)?;
    head.truncate(n);
    Ok(head)
}

fn cstring(bytes: &[u8]) -> anyhow::Result<CString> {
    CString::new(bytes).map_err(|_| anyhow!("an argument or environment entry contains a NUL byte"))
}

/// Forks `command` (already resolved to `program`), held before exec until [`Child::release`].
pub fn spawn(program: &Path, command: &[OsString]) -> anyhow::Result<Child> {
    let path = cstring(program.as_os_str().as_bytes())?;
    let argv: Vec<CString> = command
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<anyhow::Result<_>>()?;
    let envp: Vec<CString> = std::env::vars_os()
        .map(|(k, v)| cstring(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect::<anyhow::Result<_>>()?;
    let (started_tx, started_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    let (events_tx, events_rx) = unbounded_channel();
    // ptrace requests must come from the thread that attached: one thread owns the child for its whole life.
    std::thread::Builder::new()
        .name("alloctrace-child".into())
        .spawn(move || supervise(path, argv, envp, started_tx, release_rx, events_tx))
        .context("cannot start the thread that supervises the command")?;
    let pid = started_rx
        .recv()
        .context("the supervising thread ended before starting the command")??;
    Ok(Child {
        pid,
        release: release_tx,
        events: events_rx,
    })
}

fn pipe() -> io::Result<[libc::c_int; 2]> {
    let mut fds = [0; 2];
    // SAFETY: a valid two-element out-array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fds)
}

fn supervise(
    path: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    started: mpsc::Sender<anyhow::Result<u32>>,
    release: mpsc::Receiver<()>,
    events: UnboundedSender<ChildEvent>,
) {
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    let (gate, errors) = match (pipe(), pipe()) {
        (Ok(gate), Ok(errors)) => (gate, errors),
        (Err(e), _) | (_, Err(e)) => {
            let _ = started.send(Err(anyhow!("cannot create a pipe: {e}")));
            return;
        }
    };
    // SAFETY: the child only calls async-signal-safe functions (read, execve, write, _exit) on data prepared
    // before the fork.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: as above.
        unsafe {
            let mut byte = 0u8;
            if libc::read(gate[0], (&raw mut byte).cast(), 1) == 1 {
                libc::execve(path.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr());
                let errno = *libc::__errno_location();
                libc::write(
                    errors[1],
                    (&raw const errno).cast(),
                    size_of::<libc::c_int>(),
                );
            }
            libc::_exit(127);
        }
    }
    // SAFETY: closing the child's ends, which this process no longer needs.
    unsafe {
        libc::close(gate[0]);
        libc::close(errors[1]);
    }
    if pid < 0 {
        let _ = started.send(Err(anyhow!("cannot fork: {}", io::Error::last_os_error())));
        return;
    }
    // EXITKILL: a command alloctrace started never outlives it, even if alloctrace panics or is killed.
    let options = libc::PTRACE_O_TRACEEXIT | libc::PTRACE_O_TRACEEXEC | libc::PTRACE_O_EXITKILL;
    // SAFETY: seizing our own child.
    if unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0, options) } != 0 {
        let err = io::Error::last_os_error();
        kill_and_reap(pid);
        let _ = started.send(Err(anyhow!("cannot ptrace the command (pid {pid}): {err}")));
        return;
    }
    let _ = started.send(Ok(pid as u32));
    if release.recv().is_err() {
        kill_and_reap(pid);
        return;
    }
    // SAFETY: one byte from a valid buffer to our pipe; then our end is closed.
    unsafe {
        libc::write(gate[1], [1u8].as_ptr().cast(), 1);
        libc::close(gate[1]);
    }
    watch(pid, errors[0], &events);
    // SAFETY: our end of the error pipe.
    unsafe { libc::close(errors[0]) };
}

fn kill_and_reap(pid: libc::pid_t) {
    // SAFETY: our own child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), libc::__WALL);
    }
}

/// Follows the child's ptrace stops until it is reaped.
fn watch(pid: libc::pid_t, exec_errors: libc::c_int, events: &UnboundedSender<ChildEvent>) {
    let mut execed = false;
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        if unsafe { libc::waitpid(pid, &mut status, libc::__WALL) } < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            let _ = events.send(ChildEvent::Exited(Exit::Exited));
            return;
        }
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            if !execed {
                let mut errno: libc::c_int = 0;
                // SAFETY: reading into a valid int from our pipe.
                let n = unsafe {
                    libc::read(
                        exec_errors,
                        (&raw mut errno).cast(),
                        size_of::<libc::c_int>(),
                    )
                };
                if n == size_of::<libc::c_int>() as isize {
                    let _ =
                        events.send(ChildEvent::ExecFailed(io::Error::from_raw_os_error(errno)));
                }
            }
            let exit = if libc::WIFEXITED(status) {
                Exit::Code(libc::WEXITSTATUS(status))
            } else {
                Exit::Signal(libc::WTERMSIG(status))
            };
            let _ = events.send(ChildEvent::Exited(exit));
            return;
        }
        if !libc::WIFSTOPPED(status) {
            continue;
        }
        let signal = libc::WSTOPSIG(status);
        let mut inject = 0;
        let mut request = libc::PTRACE_CONT;
        match status >> 16 {
            libc::PTRACE_EVENT_EXEC => execed = true,
            libc::PTRACE_EVENT_EXIT => {
                let (ack_tx, ack_rx) = mpsc::channel();
                if events.send(ChildEvent::Exiting(ack_tx)).is_ok() {
                    // Either an acknowledgement or the tracer gave up on it: both let the child go.
                    let _ = ack_rx.recv();
                }
            }
            libc::PTRACE_EVENT_STOP => {
                // A group stop (SIGSTOP, Ctrl-Z): stay stopped, as without a tracer, until SIGCONT.
                if matches!(
                    signal,
                    libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
                ) {
                    request = libc::PTRACE_LISTEN;
                }
            }
            // A signal on its way to the child: deliver it unchanged.
            0 => inject = signal,
            _ => {}
        }
        // SAFETY: resuming our own stopped tracee.
        unsafe { libc::ptrace(request, pid, 0, inject) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_programs_in_path() {
        let sh = resolve_program(&OsString::from("sh")).unwrap();
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{}", sh.display());
        assert_eq!(
            resolve_program(&OsString::from("./x")).unwrap(),
            PathBuf::from("./x")
        );
        let err = resolve_program(&OsString::from("no-such-command-here")).unwrap_err();
        assert_eq!(err.to_string(), "command not found: no-such-command-here");
    }

    #[test]
    fn scripts_run_their_interpreter() {
        let dir = std::env::temp_dir().join(format!("alloctrace-shebang-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let direct = dir.join("direct");
        std::fs::write(&direct, "#!/bin/sh -e\necho hi\n").unwrap();
        assert_eq!(executable_image(&direct).unwrap(), PathBuf::from("/bin/sh"));
        let via_env = dir.join("via_env");
        std::fs::write(&via_env, "#!/usr/bin/env sh\necho hi\n").unwrap();
        assert_eq!(
            executable_image(&via_env).unwrap(),
            resolve_program(&OsString::from("sh")).unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
