//! Source lines of Python frames, for tracebacks that show the code as Python's own do. A file is read from
//! the target's own root (`/proc/PID/root`, resolved as the process resolves it: a container's files are its
//! own, and so are the targets of its absolute symlinks) or, for a relative path, beneath its working
//! directory, while the process is alive; a process on the host that has gone is read at the path itself.
//! What cannot be read (gone, too big, not a regular file, `<frozen …>`, `<string>`) is skipped quietly.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::Read as _,
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
};

use crate::os;

/// Files larger than this are not read: no source file is, and a target could name any file.
const MAX_FILE_BYTES: u64 = 8 << 20;
/// Files kept in memory; past it, lines are looked up in files read again each time.
const MAX_FILES: usize = 256;

/// Where a process's files are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Root {
    pub pid: u32,
    /// On the host, its paths are the host's: they can be read there once the process is gone.
    pub on_host: bool,
}

/// Files read so far, each split in lines; `None` for one that could not be read.
#[derive(Default)]
pub struct Sources {
    files: HashMap<(u32, String), Option<Vec<String>>>,
}

impl Sources {
    /// Line `line` (from 1) of `file` as `root`'s process sees it, stripped of its indentation, as Python's
    /// traceback prints it; `None` when the file cannot be read or has no such line, or the line is blank.
    pub fn line(&mut self, root: Root, file: &str, line: u32) -> Option<String> {
        let key = (root.pid, file.to_owned());
        let read_now;
        let lines = match self.files.get(&key) {
            Some(lines) => lines.as_ref(),
            None if self.files.len() < MAX_FILES => {
                let lines = self.files.entry(key).or_insert_with(|| read(root, file));
                lines.as_ref()
            }
            None => {
                read_now = read(root, file);
                read_now.as_ref()
            }
        }?;
        let text = lines
            .get(usize::try_from(line).ok()?.checked_sub(1)?)?
            .trim();
        (!text.is_empty()).then(|| text.to_owned())
    }
}

/// `file` located (`O_PATH`, nothing opened yet): inside the process's root, as the process resolves it, or
/// beneath its working directory for a relative path; then, for a process on the host, at the path itself.
/// A relative path is resolved beneath the working directory (`RESOLVE_BENEATH`: no `..` out of it, no
/// absolute symlink), since no resolution starts there and takes absolute links from the root: one that would
/// leave it is not read, rather than read from alloctrace's root.
fn locate(root: Root, file: &str) -> Option<File> {
    let path = Path::new(file);
    if path.is_absolute() {
        let inside = os::open_root(root.pid).and_then(|dir| os::locate_in_root(&dir, path));
        let on_host = || {
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH)
                .open(path)
        };
        match inside {
            Ok(located) => Some(located),
            Err(_) if root.on_host => on_host().ok(),
            Err(_) => None,
        }
    } else if !file.starts_with('<') {
        let cwd = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(format!("/proc/{}/cwd", root.pid))
            .ok()?;
        os::locate_beneath(&cwd, path).ok()
    } else {
        None
    }
}

fn read(root: Root, file: &str) -> Option<Vec<String>> {
    let located = locate(root, file)?;
    let metadata = located.metadata().ok()?;
    if !metadata.is_file() || metadata.len() > MAX_FILE_BYTES {
        return None;
    }
    let mut bytes = Vec::new();
    os::reopen_for_reading(&located)
        .ok()?
        .take(MAX_FILE_BYTES)
        .read_to_end(&mut bytes)
        .ok()?;
    Some(
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(str::to_owned)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn this_process(on_host: bool) -> Root {
        Root {
            pid: std::process::id(),
            on_host,
        }
    }

    #[test]
    fn lines_are_read_through_the_process_root_and_stripped() {
        let dir = std::env::temp_dir().join(format!("alloctrace-source-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("etl.py");
        fs::write(&file, "def load():\n    rows = [0] * 10  # here\n\n").unwrap();
        let path = file.to_str().unwrap();
        let mut sources = Sources::default();
        assert_eq!(
            sources.line(this_process(false), path, 2).as_deref(),
            Some("rows = [0] * 10  # here")
        );
        assert_eq!(sources.line(this_process(false), path, 3), None, "blank");
        assert_eq!(
            sources.line(this_process(false), path, 9),
            None,
            "past the end"
        );
        assert_eq!(sources.line(this_process(false), path, 0), None);
        fs::remove_dir_all(&dir).unwrap();
        // Read once, kept: the file's removal does not change what was read.
        assert_eq!(
            sources.line(this_process(false), path, 1).as_deref(),
            Some("def load():")
        );
    }

    #[test]
    fn a_relative_path_is_read_beneath_the_working_directory_only() {
        // Cargo runs unit tests in the crate's folder.
        let cwd = std::env::current_dir().unwrap();
        let first = fs::read_to_string(cwd.join("src/lib.rs")).unwrap();
        let first = first.lines().next().unwrap().trim();
        let mut sources = Sources::default();
        assert_eq!(
            sources
                .line(this_process(false), "src/lib.rs", 1)
                .as_deref(),
            Some(first)
        );
        // `..` would leave it: not read, rather than resolved against alloctrace's own root.
        assert!(cwd.join("../Cargo.toml").is_file());
        assert_eq!(sources.line(this_process(false), "../Cargo.toml", 1), None);
    }

    #[test]
    fn what_cannot_be_read_is_skipped() {
        let mut sources = Sources::default();
        for file in [
            "/nonexistent/x.py",
            "<frozen importlib._bootstrap>",
            "<string>",
            "/proc",
        ] {
            assert_eq!(sources.line(this_process(true), file, 1), None, "{file}");
        }
        let gone = Root {
            pid: u32::MAX,
            on_host: false,
        };
        assert_eq!(
            sources.line(gone, "/etc/passwd", 1),
            None,
            "not on the host"
        );
        assert!(
            Sources::default()
                .line(
                    Root {
                        on_host: true,
                        ..gone
                    },
                    "/etc/passwd",
                    1
                )
                .is_some(),
            "a host process's path, read there"
        );
    }
}
