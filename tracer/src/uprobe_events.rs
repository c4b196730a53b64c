//! Allocator uprobes shared by every traced process, so that a process's probes come down in microseconds.
//!
//! A uprobe made through the perf PMU (what `perf_event_open` of type `uprobe` gives, and aya's attach) is a
//! kernel event of its own, and closing it waits for an RCU grace period while holding the kernel's
//! `event_mutex`: removals are serialized host-wide, and every attach waits behind them. A fork storm exiting
//! thousands of children then held alloctrace's next attach in `D` state for minutes. So each probe point
//! (file, offset, entry or return) is one tracefs uprobe event instead (`uprobe_events`, in a group of this
//! run's own), and each traced process gets a perf event on it with its pid as target: the kernel puts
//! breakpoints only in the address spaces of those targets. Closing a process's perf event while others remain
//! on the event needs no grace period. The BPF program sits on one more perf event per probe point, whose
//! target is a helper process that never runs allocator code, so that it stays for the whole trace; only those
//! and the events themselves cost grace periods, at the end: a number bounded by the allocator files, not by
//! the processes traced.
//!
//! The helper also cleans up once alloctrace and its teardown are gone, however alloctrace ended (a panic,
//! SIGKILL): it waits for the end of a pipe whose only writers are alloctrace and its teardown process. If
//! alloctrace begins to exit before saying that it has released every process it held (stopped before their
//! first instruction until attached), the helper turns holding off and continues every stopped process of the
//! traced set, which it reads from the kernel's `TARGETS` map: at once, not after alloctrace's descriptors have
//! closed, which takes a grace period per perf event. Then it removes the group.

use std::{
    collections::HashMap,
    ffi::CString,
    fs::OpenOptions,
    io::Write as _,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    os::unix::fs::MetadataExt as _,
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};

/// `PERF_TYPE_TRACEPOINT`.
const PERF_TYPE_TRACEPOINT: u32 = 2;
/// `PERF_FLAG_FD_CLOEXEC`.
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// `PERF_EVENT_IOC_SET_BPF`: `_IOW('$', 8, u32)`.
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;

/// The first 64 bytes of `struct perf_event_attr` (`PERF_ATTR_SIZE_VER0`): all a tracepoint event needs.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

const _: () = assert!(size_of::<PerfEventAttr>() == 64);

/// A perf event on tracepoint `id` for process `pid` only, enabled. On libc: rustix has no perf_event_open.
fn open_event(id: u64, pid: u32) -> std::io::Result<OwnedFd> {
    let attr = PerfEventAttr {
        kind: PERF_TYPE_TRACEPOINT,
        size: size_of::<PerfEventAttr>() as u32,
        config: id,
        sample_period: 1,
        wakeup_events: 1,
        ..PerfEventAttr::default()
    };
    // SAFETY: a valid attribute struct of the size it says; pid, any CPU, no group, close-on-exec.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &raw const attr,
            pid as libc::pid_t,
            -1,
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// One probe point: its tracefs event and the perf event that carries the program.
struct Point {
    id: u64,
    _program_holder: OwnedFd,
}

/// What identifies a probe point: the file (device, inode), the offset, and whether it is a return probe.
type PointKey = (u64, u64, u64, bool);

pub struct UprobeEvents {
    tracefs: &'static str,
    group: String,
    points: HashMap<PointKey, Point>,
    /// The helper: the target of the program holders, and the one that removes the group at the end.
    helper: libc::pid_t,
    /// Kept open while alloctrace (or its teardown) runs: its end tells the helper to clean up.
    alive: OwnedFd,
}

/// The kernel maps the helper needs to release held processes: the traced set (`TARGETS`, pid → flags) and
/// the switch of holding (`HOLDING`, index 0).
pub struct HeldMaps<'a> {
    pub targets: BorrowedFd<'a>,
    pub holding: BorrowedFd<'a>,
}

/// How long the helper tries to remove the group once alloctrace is gone: the perf events on it close as the
/// teardown goes, each of the last ones after a grace period.
const REMOVAL_TRIES: u32 = 6000;
const REMOVAL_PAUSE: Duration = Duration::from_millis(50);

impl UprobeEvents {
    /// Starts the helper, which keeps the two maps of `held` and closes every other descriptor it inherits.
    /// First removes the groups of earlier runs that are gone and whose helper died with them.
    pub fn new(tracefs: &'static str, held: &HeldMaps<'_>) -> anyhow::Result<Self> {
        remove_stale_groups(tracefs);
        // A group of this run's own: the pid, and the time, for a pid used again.
        let group = format!(
            "alloctrace_{}_{:x}",
            std::process::id(),
            crate::system::monotonic_ns()
        );
        let removal = format!("-:{group}/\n");
        let control = CString::new(format!("{tracefs}/uprobe_events")).expect("no NUL");
        let mut fds = [0; 2];
        // SAFETY: a valid two-element out-array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error()).context("cannot create a pipe");
        }
        let [read_end, write_end] = fds;
        let helper_fds = HelperFds {
            tracer: std::process::id(),
            alive: read_end,
            targets: held.targets.as_raw_fd(),
            holding: held.holding.as_raw_fd(),
        };
        // On libc: rustix has no fork, and the helper's own calls must stay raw after it.
        // SAFETY: the child only makes system calls (close_range, read, bpf, open, write, kill, nanosleep,
        // _exit) on data prepared before the fork; it touches no lock and no allocator.
        let helper = unsafe { libc::fork() };
        if helper == 0 {
            // SAFETY: as above.
            unsafe { helper_main(&helper_fds, &control, removal.as_bytes()) }
        }
        // SAFETY: the helper's end, which this process does not use.
        unsafe { libc::close(read_end) };
        // SAFETY: ours from pipe2, owned by nothing else.
        let alive = unsafe { OwnedFd::from_raw_fd(write_end) };
        if helper < 0 {
            return Err(std::io::Error::last_os_error()).context("cannot fork the uprobe helper");
        }
        Ok(Self {
            tracefs,
            group,
            points: HashMap::new(),
            helper,
            alive,
        })
    }

    /// Tells the helper that every process alloctrace held has been continued and none will be held again:
    /// it has nothing to release when alloctrace exits.
    pub fn all_held_released(&self) {
        // SAFETY: one byte from a valid buffer to our pipe.
        unsafe { libc::write(self.alive.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
    }

    /// A perf event for `pid` on the probe point at `offset` of `path` (a return probe when `ret`), with
    /// `program` run at each hit. The point is made the first time it is asked for.
    pub fn open(
        &mut self,
        path: &Path,
        offset: u64,
        ret: bool,
        program: BorrowedFd<'_>,
        pid: u32,
    ) -> anyhow::Result<OwnedFd> {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let meta = file.metadata()?;
        let key = (meta.dev(), meta.ino(), offset, ret);
        if !self.points.contains_key(&key) {
            let point = self.make_point(&file, offset, ret, program)?;
            self.points.insert(key, point);
        }
        let id = self.points[&key].id;
        open_event(id, pid).with_context(|| format!("cannot open a perf event for pid {pid}"))
    }

    fn make_point(
        &self,
        file: &std::fs::File,
        offset: u64,
        ret: bool,
        program: BorrowedFd<'_>,
    ) -> anyhow::Result<Point> {
        let event = format!("p{}", self.points.len());
        // Named through the open descriptor: the kernel resolves the link to the very file, whatever bytes its
        // path holds (a target's paths may carry spaces or newlines) and wherever it is mounted.
        let definition = format!(
            "{}:{}/{event} /proc/self/fd/{}:{offset:#x}\n",
            if ret { 'r' } else { 'p' },
            self.group,
            file.as_raw_fd()
        );
        let control = format!("{}/uprobe_events", self.tracefs);
        OpenOptions::new()
            .append(true)
            .open(&control)
            .and_then(|mut f| f.write_all(definition.as_bytes()))
            .with_context(|| format!("cannot define a uprobe in {control}"))?;
        let id_path = format!("{}/events/{}/{event}/id", self.tracefs, self.group);
        let id: u64 = std::fs::read_to_string(&id_path)
            .with_context(|| format!("cannot read {id_path}"))?
            .trim()
            .parse()
            .with_context(|| format!("{id_path} is not a number"))?;
        let holder = open_event(id, self.helper as u32)
            .context("cannot open the perf event that carries a uprobe's program")?;
        // SAFETY: an ioctl on our perf event with a program descriptor as its integer argument.
        if unsafe {
            libc::ioctl(
                holder.as_raw_fd(),
                PERF_EVENT_IOC_SET_BPF,
                program.as_raw_fd(),
            )
        } != 0
        {
            bail!(
                "cannot attach a program to a uprobe: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(Point {
            id,
            _program_holder: holder,
        })
    }

    /// The helper's pid: the target of the program holders (so not a process to trace).
    pub fn helper(&self) -> u32 {
        self.helper as u32
    }
}

impl Drop for UprobeEvents {
    /// Closes the probe points (each after a grace period) and removes the group at once, not waiting for the
    /// helper; the helper's own removal then finds nothing to do.
    fn drop(&mut self) {
        let points: Vec<Point> = self.points.drain().map(|(_, p)| p).collect();
        std::thread::scope(|scope| {
            for point in points {
                scope.spawn(move || drop(point));
            }
        });
        let control = format!("{}/uprobe_events", self.tracefs);
        let _ = OpenOptions::new()
            .append(true)
            .open(control)
            .and_then(|mut f| f.write_all(format!("-:{}/\n", self.group).as_bytes()));
    }
}

/// The uprobe groups of alloctrace runs whose process is gone, in the text of `uprobe_events`
/// (`p:alloctrace_PID_TIME/EVENT PATH:OFFSET` lines), each once.
fn stale_groups(events: &str, alive: impl Fn(u32) -> bool) -> Vec<&str> {
    let mut stale: Vec<&str> = Vec::new();
    for line in events.lines() {
        let Some(group) = line
            .get(2..)
            .and_then(|rest| rest.split('/').next())
            .filter(|group| group.starts_with("alloctrace_"))
        else {
            continue;
        };
        let pid = group
            .strip_prefix("alloctrace_")
            .and_then(|rest| rest.split('_').next())
            .and_then(|pid| pid.parse().ok());
        if pid.is_some_and(|pid| !alive(pid)) && !stale.contains(&group) {
            stale.push(group);
        }
    }
    stale
}

/// Removes what runs killed together with their helper left defined (unused: their perf events closed with
/// them). A group still in use elsewhere (a run in another pid namespace) is busy, and stays.
fn remove_stale_groups(tracefs: &str) {
    let control = format!("{tracefs}/uprobe_events");
    let Ok(events) = std::fs::read_to_string(&control) else {
        return;
    };
    let alive = |pid: u32| Path::new(&format!("/proc/{pid}")).exists();
    for group in stale_groups(&events, alive) {
        let _ = OpenOptions::new()
            .append(true)
            .open(&control)
            .and_then(|mut f| f.write_all(format!("-:{group}/\n").as_bytes()));
    }
}

/// The descriptors the helper keeps, and alloctrace's pid.
struct HelperFds {
    tracer: u32,
    alive: libc::c_int,
    targets: libc::c_int,
    holding: libc::c_int,
}

/// `bpf(2)` commands, and the attribute layout of the map element commands.
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value_or_next_key: u64,
    flags: u64,
}

/// How often the helper looks whether alloctrace has begun to exit.
const TRACER_CHECK: Duration = Duration::from_millis(20);

/// How long after holding is turned off a probe that read it on may still stop its process.
const HOLD_SETTLE: Duration = Duration::from_millis(20);

/// The helper's life: wait until no one holds the pipe's write end (alloctrace and its teardown are gone, and
/// with them every perf event on the group, soon); release the held processes unless told they were; then
/// remove the group, retrying while its events are busy.
///
/// # Safety
/// Called in the child of a fork: it makes system calls only, on memory prepared before the fork.
unsafe fn helper_main(fds: &HelperFds, control: &CString, removal: &[u8]) -> ! {
    // SAFETY: plain system calls on integers and on buffers that live in this process's copy of the memory.
    unsafe {
        let mut kept = [fds.alive, fds.targets, fds.holding];
        kept.sort_unstable();
        let mut from = 0;
        for fd in kept {
            if fd > from {
                libc::syscall(libc::SYS_close_range, from as u32, (fd - 1) as u32, 0u32);
            }
            from = fd + 1;
        }
        libc::syscall(libc::SYS_close_range, from as u32, u32::MAX, 0u32);
        // Until the pipe's end, or, before alloctrace said it released what it held, until alloctrace begins
        // to exit: its descriptors (the pipe among them) close only after its perf events, seconds later.
        let mut released = false;
        let mut byte = 0u8;
        loop {
            let mut poll = libc::pollfd {
                fd: fds.alive,
                events: libc::POLLIN,
                revents: 0,
            };
            let ready = libc::poll(&mut poll, 1, TRACER_CHECK.as_millis() as libc::c_int);
            if ready == 0 {
                if !released && is_exiting(fds.tracer) {
                    break;
                }
                continue;
            }
            let n = libc::read(fds.alive, (&raw mut byte).cast(), 1);
            if n == 1 {
                released = true;
            } else if n == 0 || (n < 0 && *libc::__errno_location() != libc::EINTR) {
                break;
            }
        }
        libc::close(fds.alive);
        if !released {
            release_held(fds);
        }
        libc::close(fds.targets);
        libc::close(fds.holding);
        let pause = libc::timespec {
            tv_sec: 0,
            tv_nsec: REMOVAL_PAUSE.as_nanos() as libc::c_long,
        };
        for _ in 0..REMOVAL_TRIES {
            let fd = libc::open(control.as_ptr(), libc::O_WRONLY | libc::O_APPEND);
            if fd < 0 {
                break;
            }
            let written = libc::write(fd, removal.as_ptr().cast(), removal.len());
            let errno = *libc::__errno_location();
            libc::close(fd);
            // Removed, or nothing left to remove (alloctrace removed it itself).
            if written >= 0 || errno == libc::ENOENT {
                break;
            }
            libc::nanosleep(&pause, std::ptr::null_mut());
        }
        libc::_exit(0)
    }
}

/// Turns holding off, lets the probes that read it on a moment ago stop their process, then continues every
/// stopped process in the traced set.
///
/// # Safety
/// As [`helper_main`]: system calls only.
unsafe fn release_held(fds: &HelperFds) {
    // SAFETY: bpf(2) with attribute structs that point at this stack frame; open, read, close and kill on
    // integers and stack buffers.
    unsafe {
        let (index, off) = (0u32, 0u32);
        let update = MapElemAttr {
            map_fd: fds.holding as u32,
            _pad: 0,
            key: (&raw const index) as u64,
            value_or_next_key: (&raw const off) as u64,
            flags: 0,
        };
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_ELEM,
            &raw const update,
            size_of::<MapElemAttr>(),
        );
        let settle = libc::timespec {
            tv_sec: 0,
            tv_nsec: HOLD_SETTLE.as_nanos() as libc::c_long,
        };
        libc::nanosleep(&settle, std::ptr::null_mut());
        let mut key = 0u32;
        let mut next = 0u32;
        let mut first = true;
        // Bounded by the map's size; a walk restarted by concurrent deletions cannot loop for ever either.
        for _ in 0..(1 << 20) {
            let get_next = MapElemAttr {
                map_fd: fds.targets as u32,
                _pad: 0,
                key: if first { 0 } else { (&raw const key) as u64 },
                value_or_next_key: (&raw mut next) as u64,
                flags: 0,
            };
            let rc = libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &raw const get_next,
                size_of::<MapElemAttr>(),
            );
            if rc != 0 {
                break;
            }
            first = false;
            key = next;
            if is_stopped(key) {
                libc::kill(key as libc::pid_t, libc::SIGCONT);
            }
        }
    }
}

/// What follows the comm in `/proc/PID/stat` (the state first), read into `buffer`: `None` once the process is
/// gone. The comm ends at the last `)`: it may hold any bytes.
///
/// # Safety
/// As [`helper_main`]: system calls only, on a stack buffer.
unsafe fn stat_after_comm(pid: u32, buffer: &mut [u8; 512]) -> Option<&[u8]> {
    let mut path = *b"/proc/\0\0\0\0\0\0\0\0\0\0/stat\0";
    let mut digits = [0u8; 10];
    let (mut n, mut value) = (0, pid);
    loop {
        digits[n] = b'0' + (value % 10) as u8;
        n += 1;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    for i in 0..n {
        path[6 + i] = digits[n - 1 - i];
    }
    path[6 + n..6 + n + 6].copy_from_slice(b"/stat\0");
    // SAFETY: a NUL-terminated path and a buffer of the size given.
    let read = unsafe {
        let fd = libc::open(path.as_ptr().cast(), libc::O_RDONLY);
        if fd < 0 {
            return None;
        }
        let read = libc::read(fd, buffer.as_mut_ptr().cast(), buffer.len());
        libc::close(fd);
        read
    };
    let stat = &buffer[..usize::try_from(read).ok()?];
    let close = stat.iter().rposition(|&b| b == b')')?;
    stat.get(close + 1..)
}

/// Whether the process is stopped (state `T`).
///
/// # Safety
/// As [`helper_main`]: system calls only.
unsafe fn is_stopped(pid: u32) -> bool {
    let mut buffer = [0u8; 512];
    // SAFETY: as the function's.
    let after = unsafe { stat_after_comm(pid, &mut buffer) };
    after.and_then(|after| after.get(1)) == Some(&b'T')
}

/// Whether the process has begun to exit (`PF_EXITING`, the seventh field after the comm) or is gone: it may
/// take seconds more to close its descriptors, each perf event after a grace period.
///
/// # Safety
/// As [`helper_main`]: system calls only.
unsafe fn is_exiting(pid: u32) -> bool {
    const PF_EXITING: u64 = 0x4;
    let mut buffer = [0u8; 512];
    // SAFETY: as the function's.
    let Some(after) = (unsafe { stat_after_comm(pid, &mut buffer) }) else {
        return true;
    };
    let flags = after
        .split(|&b| b == b' ')
        .filter(|field| !field.is_empty())
        .nth(6)
        .and_then(|field| {
            field.iter().try_fold(0u64, |value, &digit| {
                digit
                    .is_ascii_digit()
                    .then(|| value.wrapping_mul(10).wrapping_add(u64::from(digit - b'0')))
            })
        });
    flags.is_none_or(|flags| flags & PF_EXITING != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_groups_of_runs_that_are_gone() {
        let events = "p:alloctrace_12_ab/p0 /proc/self/fd/7:0x0000000000098930\n\
                      r:alloctrace_12_ab/p1 /proc/self/fd/7:0x0000000000098930\n\
                      p:alloctrace_34_cd/p0 /proc/self/fd/9:0x0000000000098930\n\
                      p:uprobes/p_bash_0x1 /bin/bash:0x0000000000000001\n\
                      p:alloctrace_x/p0 /bin/true:0x0000000000001000\n";
        assert_eq!(stale_groups(events, |pid| pid == 34), ["alloctrace_12_ab"]);
        assert_eq!(stale_groups(events, |_| true), Vec::<&str>::new());
        assert_eq!(stale_groups("", |_| false), Vec::<&str>::new());
    }

    #[test]
    fn reads_whether_a_process_is_stopped_or_exiting() {
        // SAFETY: system calls only.
        unsafe {
            assert!(!is_stopped(std::process::id()));
            assert!(!is_stopped(u32::MAX));
            assert!(!is_exiting(std::process::id()));
            assert!(is_exiting(u32::MAX), "a process that is gone");
        }
    }

    /// Where the kernel's `struct perf_event_attr` has the fields set here.
    #[test]
    fn the_attribute_struct_is_the_kernels_first_version() {
        assert_eq!(std::mem::offset_of!(PerfEventAttr, config), 8);
        assert_eq!(std::mem::offset_of!(PerfEventAttr, sample_period), 16);
        assert_eq!(std::mem::offset_of!(PerfEventAttr, wakeup_events), 48);
    }
}
