//! What the tracer needs from the host, checked before anything is loaded, each failure one line that says
//! what to do.

use std::{ffi::CString, path::Path};

use anyhow::bail;

/// Where tracefs is mounted on current systems, and where the kernel documents mounting it.
const TRACEFS: &str = "/sys/kernel/tracing";

pub fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
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

/// Tracepoints are found through tracefs, which a fresh host may not mount: mount it, or say how.
pub fn ensure_tracefs() -> anyhow::Result<()> {
    let mounted = |root: &str| Path::new(root).join("events").is_dir();
    if mounted(TRACEFS) || mounted("/sys/kernel/debug/tracing") {
        return Ok(());
    }
    let target = CString::new(TRACEFS).expect("no NUL in a constant");
    let fstype = CString::new("tracefs").expect("no NUL in a constant");
    let source = CString::new("nodev").expect("no NUL in a constant");
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 || !mounted(TRACEFS) {
        let err = std::io::Error::last_os_error();
        bail!(
            "tracefs is not mounted and mounting it failed ({err}): run `mount -t tracefs nodev {TRACEFS}`"
        );
    }
    Ok(())
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads, so ages compare with event times.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
