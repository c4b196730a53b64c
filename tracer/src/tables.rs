//! Reads and prunes the kernel's hash maps in bulk (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_DELETE_BATCH`): a table of
//! a million live blocks is read in a few hundred system calls rather than two per entry. aya 0.14 has no batch
//! operations, so this is the one place that calls `bpf(2)` itself.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use bytemuck::Pod;

/// `enum bpf_cmd` values (include/uapi/linux/bpf.h), stable since Linux 5.6.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Entries asked for per call. A hash map's batch never splits a bucket, and a call fails with `ENOSPC` when one
/// bucket holds more than it asks: the size is then doubled.
const BATCH_ENTRIES: usize = 4096;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// On libc: neither aya 0.14 nor rustix offers the batched map look-ups.
fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr` prefix of the size passed; the kernel reads and writes only it and
    // the buffers it points to, which the callers size for `count` entries.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Calls `each` with every entry of a hash map, as `(key, values)`: one value, or one per possible CPU for a
/// per-CPU map (`per_cpu`, the number of possible CPUs). Entries added or removed while it reads may or may not
/// be seen.
pub fn for_each<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    per_cpu: Option<usize>,
    mut each: impl FnMut(K, &[V]),
) -> io::Result<()> {
    let cpus = per_cpu.unwrap_or(1);
    // Per-CPU values are padded to 8 bytes each.
    let stride = if per_cpu.is_some() {
        size_of::<V>().next_multiple_of(8)
    } else {
        size_of::<V>()
    };
    let mut values_of_entry: Vec<V> = Vec::with_capacity(cpus);
    let mut batch_entries = BATCH_ENTRIES;
    let mut position: u32 = 0;
    let mut first = true;
    loop {
        let mut keys: Vec<K> = vec![K::zeroed(); batch_entries];
        let mut values: Vec<u8> = vec![0; batch_entries * cpus * stride];
        let mut next: u32 = 0;
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &position as *const u32 as u64
            },
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: batch_entries as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let done = match result {
            Ok(()) => false,
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => true,
            Err(err) if err.raw_os_error() == Some(libc::ENOSPC) && attr.count == 0 => {
                batch_entries *= 2;
                continue;
            }
            Err(err) => return Err(err),
        };
        let count = attr.count as usize;
        for (i, &key) in keys.iter().take(count).enumerate() {
            values_of_entry.clear();
            values_of_entry.extend((0..cpus).map(|cpu| {
                let at = (i * cpus + cpu) * stride;
                bytemuck::pod_read_unaligned::<V>(&values[at..at + size_of::<V>()])
            }));
            each(key, &values_of_entry);
        }
        if done {
            return Ok(());
        }
        position = next;
        first = false;
    }
}

/// Removes these keys from a hash map; keys already gone are skipped.
pub fn delete<K: Pod>(map: BorrowedFd<'_>, keys: &[K]) -> io::Result<()> {
    for chunk in keys.chunks(BATCH_ENTRIES) {
        let mut attr = BatchAttr {
            keys: chunk.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        match bpf(BPF_MAP_DELETE_BATCH, &mut attr) {
            Ok(()) => {}
            // The batch stops at a missing key: delete the rest one call further on.
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {
                let deleted = attr.count as usize;
                if deleted + 1 < chunk.len() {
                    delete(map, &chunk[deleted + 1..])?;
                }
            }
            Err(err) => return Err(err),
        }
    }
    Ok(())
}
