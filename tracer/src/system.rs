//! What the tracer needs from the host, checked before anything is loaded, each failure one line that says
//! what to do.

use std::path::Path;

use anyhow::{Context as _, bail};

/// Where tracefs is mounted on current systems, and where the kernel documents mounting it.
const TRACEFS: &str = "/sys/kernel/tracing";

pub fn require_root() -> anyhow::Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!(
            "alloctrace needs root (it loads eBPF programs and reads other processes' memory maps): run it with sudo"
        );
    }
    Ok(())
}

pub fn require_uprobes() -> anyhow::Result<()> {
    if !Path::new("/sys/bus/event_source/devices/uprobe/type").exists() {
        bail!(
            "this kernel has no uprobe support (CONFIG_UPROBE_EVENTS is off): alloctrace cannot probe allocators here"
        );
    }
    Ok(())
}

/// Where tracefs is mounted, if it is.
pub fn tracefs() -> Option<&'static str> {
    [TRACEFS, "/sys/kernel/debug/tracing"]
        .into_iter()
        .find(|root| Path::new(root).join("events").is_dir())
}

/// Tracepoints are found through tracefs, which a fresh host may not mount: mount it, or say how.
pub fn ensure_tracefs() -> anyhow::Result<()> {
    if tracefs().is_some() {
        return Ok(());
    }
    let mounted = rustix::mount::mount(
        "nodev",
        TRACEFS,
        "tracefs",
        rustix::mount::MountFlags::empty(),
        None,
    );
    let failure = match mounted {
        Err(err) => Some(std::io::Error::from(err).to_string()),
        Ok(()) if tracefs().is_none() => Some(format!("no events under {TRACEFS}")),
        Ok(()) => None,
    };
    if let Some(err) = failure {
        bail!(
            "tracefs is not mounted and mounting it failed ({err}): run `mount -t tracefs nodev {TRACEFS}`"
        );
    }
    Ok(())
}

/// The offset of `field` in a tracepoint's records, from its `format` file.
pub fn tracepoint_field_offset(category: &str, event: &str, field: &str) -> anyhow::Result<u32> {
    let root = tracefs().context("tracefs is not mounted")?;
    let path = format!("{root}/events/{category}/{event}/format");
    let format = std::fs::read_to_string(&path).with_context(|| {
        format!("cannot read {path}: this kernel lacks the tracepoint {category}:{event}")
    })?;
    field_offset(&format, field).with_context(|| format!("{path} has no field {field}"))
}

/// `field:pid_t child_pid; offset:20; size:4;…` (tab-separated) → 20.
fn field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let declaration = line.trim().strip_prefix("field:")?.split(';').next()?;
        let name = declaration.rsplit([' ', '*']).next()?;
        let name = name.split('[').next()?;
        if name != field {
            return None;
        }
        let offset = line.split("offset:").nth(1)?.split(';').next()?;
        offset.trim().parse().ok()
    })
}

/// The offset of `thread.fsbase` in the kernel's `struct task_struct`, from its BTF: where the eBPF side finds
/// a thread's pointer (what CPython records as a thread state's `thread_id`). x86-64's: on aarch64 the thread
/// pointer (`tpidr_el0`) is not what glibc's `pthread_self()` returns.
#[cfg(target_arch = "x86_64")]
pub fn task_fsbase_offset() -> anyhow::Result<u32> {
    use btf_rs::{Btf, Type};
    const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
    // Read whole (5 MiB here) and parsed from memory: parsed from the file, the parser seeks before each type,
    // 126,000 system calls on this kernel's BTF, which doubled the parse's time (0.2 s of CPU against 0.1 s).
    let bytes = std::fs::read(VMLINUX)
        .with_context(|| format!("cannot read the kernel's BTF at {VMLINUX}"))?;
    let btf = Btf::from_bytes(&bytes)
        .with_context(|| format!("cannot parse the kernel's BTF at {VMLINUX}"))?;
    let member_offset = |parent: &str, field: &str| -> anyhow::Result<(u32, Type)> {
        let types = btf.resolve_types_by_name(parent)?;
        let Some(Type::Struct(s)) = types.into_iter().find(|t| matches!(t, Type::Struct(_))) else {
            bail!("the kernel's BTF has no struct {parent}");
        };
        for member in &s.members {
            if btf.resolve_name(member).is_ok_and(|name| name == field) {
                return Ok((member.bit_offset() / 8, btf.resolve_chained_type(member)?));
            }
        }
        bail!("the kernel's struct {parent} has no member {field}")
    };
    let (thread, thread_type) = member_offset("task_struct", "thread")?;
    let thread_struct = match thread_type {
        Type::Struct(s) => btf.resolve_name(&s)?,
        _ => bail!("task_struct.thread is not a struct"),
    };
    let (fsbase, _) = member_offset(&thread_struct, "fsbase")?;
    Ok(thread + fsbase)
}

/// Raises this process's soft limit on open files to its hard limit.
pub fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    // `None` is unlimited.
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        // Best effort: the limit it had stays otherwise.
        let _ = setrlimit(Resource::Nofile, limit);
    }
}

/// This process's peak resident memory.
pub fn max_rss_bytes() -> u64 {
    // On libc: rustix has no getrusage.
    // SAFETY: getrusage fills the struct it is given; zeroes are a valid starting value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    // Linux reports kibibytes.
    u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads, so ages compare with event times.
pub fn monotonic_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_field_offsets_of_a_format_file() {
        let format = include_str!("../test_data/sched_process_fork.format");
        assert_eq!(field_offset(format, "child_pid"), Some(20));
        assert_eq!(field_offset(format, "parent_pid"), Some(12));
        assert_eq!(field_offset(format, "parent_comm"), Some(8));
        assert_eq!(field_offset(format, "common_pid"), Some(4));
        assert_eq!(field_offset(format, "no_such_field"), None);
        // Before Linux 6.x the names were fixed arrays.
        let old = "\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        assert_eq!(field_offset(old, "parent_comm"), Some(8));
        assert_eq!(field_offset(old, "child_pid"), Some(44));
    }
}
