//! `/proc/PID/maps`: which file (device + inode) backs each range of a process's address space.
//!
//! The kernel writes the file, but the process chooses what it shows: up to `vm.max_map_count` mappings (65,530
//! by default), each with a path of up to 4 KiB in any bytes. So a snapshot is bounded ([`MAX_MAPS_BYTES`]), and
//! a path that is not UTF-8 is kept lossily rather than failing the whole snapshot. Parsed here rather than by
//! procfs: the bound and the lossy paths are what matters, in a dozen lines a dependency would not shorten.

use std::{
    fs::File,
    io::{self, BufRead, BufReader},
    path::PathBuf,
};

/// The most bytes of `/proc/PID/maps` read for one snapshot: a large JVM or browser process has 30,000 mappings
/// of about 100 bytes each. A longer one (tens of thousands of mappings of 4 KiB paths) is refused.
pub const MAX_MAPS_BYTES: u64 = 32 << 20;

/// A file that can be mapped: its device and inode, the identity uprobes and caches key on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
}

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub executable: bool,
    /// Offset in the file of the byte at `start`.
    pub file_offset: u64,
    /// The backing file, `None` for anonymous memory and pseudo-files such as `[heap]`.
    pub file: Option<FileId>,
    /// The path as the kernel prints it (in the process's mount namespace), or a pseudo-name.
    pub path: String,
}

impl Mapping {
    pub fn contains(&self, addr: u64) -> bool {
        (self.start..self.end).contains(&addr)
    }

    /// `/proc/PID/map_files/…`: opens the mapped file even when it lives in another mount namespace
    /// (a container) or was deleted since it was mapped.
    pub fn map_file_path(&self, pid: u32) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{pid}/map_files/{:x}-{:x}",
            self.start, self.end
        ))
    }
}

/// The address space of a process, sorted by address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Maps {
    pub mappings: Vec<Mapping>,
}

impl Maps {
    pub fn from_pid(pid: u32) -> io::Result<Self> {
        Self::from_reader(BufReader::new(File::open(format!("/proc/{pid}/maps"))?))
    }

    pub fn from_reader(reader: impl BufRead) -> io::Result<Self> {
        // One byte past the bound tells a snapshot of exactly the bound from a longer one.
        let mut reader = reader.take(MAX_MAPS_BYTES + 1);
        let mut mappings = Vec::new();
        let mut line = Vec::new();
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            if reader.limit() == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the memory map is longer than {MAX_MAPS_BYTES} bytes"),
                ));
            }
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches('\n');
            if line.trim().is_empty() {
                continue;
            }
            mappings.push(parse_line(line).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected maps line: {line:?}"),
                )
            })?);
        }
        Ok(Self { mappings })
    }

    pub fn find(&self, addr: u64) -> Option<&Mapping> {
        let idx = self.mappings.partition_point(|m| m.end <= addr);
        self.mappings.get(idx).filter(|m| m.contains(addr))
    }

    /// The distinct files mapped, each with its first mapping, in address order.
    pub fn files(&self) -> Vec<&Mapping> {
        let mut seen = std::collections::HashSet::new();
        self.mappings
            .iter()
            .filter(|m| m.file.is_some_and(|id| seen.insert(id)))
            .collect()
    }
}

fn parse_line(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, ' ');
    let (start, end) = fields.next()?.split_once('-')?;
    let perms = fields.next()?.as_bytes();
    let file_offset = u64::from_str_radix(fields.next()?, 16).ok()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let inode: u64 = fields.next()?.parse().ok()?;
    let path = fields.next().unwrap_or("").trim_start().to_owned();
    let file = (inode != 0).then(|| -> Option<FileId> {
        Some(FileId {
            dev_major: u32::from_str_radix(major, 16).ok()?,
            dev_minor: u32::from_str_radix(minor, 16).ok()?,
            inode,
        })
    });
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        executable: perms.get(2) == Some(&b'x'),
        file_offset,
        file: file.flatten(),
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_that_is_not_utf8_is_kept_lossily() {
        let text = b"7f0000000000-7f0000001000 r-xp 00000000 fe:01 42      /tmp/\xff\xfe.so\n\
                     7f0000001000-7f0000002000 rw-p 00000000 00:00 0 \n";
        let maps = Maps::from_reader(&text[..]).unwrap();
        assert_eq!(maps.mappings.len(), 2);
        assert_eq!(maps.mappings[0].path, "/tmp/\u{fffd}\u{fffd}.so");
        assert!(maps.mappings[0].executable);
    }

    #[test]
    fn a_snapshot_longer_than_the_bound_is_refused() {
        let line = format!(
            "7f0000000000-7f0000001000 r-xp 00000000 fe:01 42 /{}\n",
            "d".repeat(4000)
        );
        let lines = (MAX_MAPS_BYTES as usize).div_ceil(line.len());
        let err = Maps::from_reader(line.repeat(lines).as_bytes()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(Maps::from_reader(line.repeat(lines - 1).as_bytes()).is_ok());
    }

    #[test]
    fn parses_real_maps() {
        let maps = Maps::from_reader(&include_bytes!("../../test_data/maps_python3")[..]).unwrap();
        let exe = &maps.mappings[0];
        assert_eq!(exe.start, 0x55d0c1e4b000);
        assert_eq!(exe.path, "/usr/bin/python3.11");
        assert_eq!(
            exe.file,
            Some(FileId {
                dev_major: 0xfd,
                dev_minor: 1,
                inode: 1319089
            })
        );
        let text = maps.find(0x55d0c1f00000).unwrap();
        assert!(text.executable);
        assert_eq!(text.file_offset, 0x6d000);
        let heap = maps.mappings.iter().find(|m| m.path == "[heap]").unwrap();
        assert_eq!(heap.file, None);
        let deleted = maps
            .mappings
            .iter()
            .find(|m| m.path.ends_with("(deleted)"))
            .unwrap();
        assert_eq!(deleted.path, "/tmp/lib with space.so (deleted)");
        assert!(maps.find(0x10).is_none());
        let files: Vec<_> = maps.files().iter().map(|m| m.path.as_str()).collect();
        assert_eq!(
            files,
            [
                "/usr/bin/python3.11",
                "/usr/lib/x86_64-linux-gnu/libc.so.6",
                "/tmp/lib with space.so (deleted)",
                "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
            ]
        );
    }
}
