//! Source locations of native frames from DWARF: function, file and line, inlined calls as frames of their own.
//! The DWARF is the object's own, or a separate debug file found the way gdb finds one (by build id under
//! `/usr/lib/debug/.build-id`, or by `.gnu_debuglink` beside the object and under `/usr/lib/debug`), looked up
//! inside the process's own root as the process would resolve it (a container's files are its image's, and so
//! are the targets of its absolute symlinks). Lookups go through `addr2line` (gimli).
//!
//! A frame is named while its process lives, with a [`DebugSource`]: the object kept open. Its DWARF is read
//! only when a report is written, for the frames the report shows ([`resolve`]), one object at a time and
//! dropped after: a CPython built with `-g` has 13 MiB of it, and its parsed units grow with every address
//! looked up, which the trace itself never needs.
//!
//! The object comes from a traced process, which alloctrace does not trust: only the sections a lookup needs
//! are read, within [`MAX_DEBUG_BYTES`] (a compressed section is measured by what it claims once inflated,
//! before it is inflated), and a separate debug file is opened as objects are (a regular file, bounded in size).

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashMap},
    fs::File,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use gimli::{EndianArcSlice, RunTimeEndian, SectionId};
use object::{Object as _, ObjectSection as _};

use super::{
    Frame,
    module::{BoundedFile, open_object_in_root},
};

/// The most bytes of DWARF kept for one object. A CPython built with `-g` has about 13 MiB of the sections read
/// here; an object claiming more gets no source locations (its frames keep their symbol names).
pub const MAX_DEBUG_BYTES: u64 = 64 << 20;

/// The most objects kept open for their DWARF at once (each is a descriptor): a target that maps ever new
/// files gets source lines for the first ones only.
pub const MAX_DEBUG_SOURCES: usize = 1024;

/// [`DebugSource`]s alive now.
static DEBUG_SOURCES_OPEN: AtomicUsize = AtomicUsize::new(0);

/// Ids of [`DebugSource`]s, in the order they were made.
static DEBUG_SOURCE_IDS: AtomicU64 = AtomicU64::new(0);

/// The most frames one address expands to (the function and the calls inlined into it, innermost first).
const MAX_INLINED_FRAMES: usize = 16;

/// Where separate debug files live, inside a process's root.
const DEBUG_DIR: &str = "/usr/lib/debug";

type Reader = EndianArcSlice<RunTimeEndian>;

/// One frame of an address's source location: the function (inlined or not), its file and line.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SourceFrame {
    function: Option<String>,
    file: Option<String>,
    line: Option<u32>,
}

/// Where a module's DWARF can be read when a report needs it: the object, still open (a container's file may
/// be unreachable by path once its process is gone), its name, and the root of the process that mapped it, for
/// a separate debug file. Frames of the module share it; it is compared by identity.
pub struct DebugSource {
    id: u64,
    file: File,
    path: String,
    /// The root of the process that mapped it, held open: once the process is gone (a command alloctrace
    /// started exits before its report), `/proc/PID/root` is gone with it, this directory is not.
    root: File,
}

impl DebugSource {
    /// `root` is the mapping process's root directory ([`crate::os::open_root`]). `None` once
    /// [`MAX_DEBUG_SOURCES`] are open.
    pub fn new(file: File, path: &str, root: File) -> Option<Arc<Self>> {
        if DEBUG_SOURCES_OPEN.fetch_add(1, Ordering::Relaxed) >= MAX_DEBUG_SOURCES {
            DEBUG_SOURCES_OPEN.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Arc::new(Self {
            id: DEBUG_SOURCE_IDS.fetch_add(1, Ordering::Relaxed),
            file,
            path: path.to_owned(),
            root,
        }))
    }
}

impl Drop for DebugSource {
    fn drop(&mut self) {
        DEBUG_SOURCES_OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

impl PartialEq for DebugSource {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for DebugSource {}

impl std::hash::Hash for DebugSource {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

impl PartialOrd for DebugSource {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for DebugSource {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.id.cmp(&other.id)
    }
}

impl std::fmt::Debug for DebugSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DebugSource")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Gives the native frames of `stacks` that have a [`DebugSource`] their file and line, and a frame before each
/// for every call inlined at their address. Each object's DWARF is read once, for all its frames, and dropped
/// before the next object's is read.
pub fn resolve<'a>(stacks: impl IntoIterator<Item = &'a mut Vec<Frame>>) {
    let mut stacks: Vec<&mut Vec<Frame>> = stacks.into_iter().collect();
    let mut wanted: BTreeMap<Arc<DebugSource>, BTreeSet<u64>> = BTreeMap::new();
    for frame in stacks.iter().flat_map(|stack| stack.iter()) {
        if let (Some(source), Some(address), None) = (&frame.source, frame.offset, &frame.file) {
            wanted
                .entry(Arc::clone(source))
                .or_default()
                .insert(lookup_address(address));
        }
    }
    let mut found: HashMap<(u64, u64), Vec<SourceFrame>> = HashMap::new();
    for (source, addresses) in wanted {
        let Some(info) = DebugInfo::load(&source.file, &source.path, &source.root) else {
            continue;
        };
        for address in addresses {
            found.insert((source.id, address), info.frames(address));
        }
    }
    if found.is_empty() {
        return;
    }
    for stack in &mut stacks {
        let mut resolved = Vec::with_capacity(stack.len());
        for frame in stack.drain(..) {
            let sources = match (&frame.source, frame.offset) {
                (Some(source), Some(address)) => found.get(&(source.id, lookup_address(address))),
                _ => None,
            };
            let Some((outermost, inlined)) = sources.and_then(|s| s.split_last()) else {
                resolved.push(frame);
                continue;
            };
            resolved.extend(inlined.iter().map(|source| Frame {
                function: source.function.clone(),
                function_offset: 0,
                file: source.file.clone(),
                line: source.line,
                inlined: true,
                ..frame.clone()
            }));
            resolved.push(Frame {
                // The symbol table's name is the one reports have always shown; the DWARF's where it has none.
                function: frame.function.clone().or(outermost.function.clone()),
                file: outermost.file.clone(),
                line: outermost.line,
                ..frame
            });
        }
        **stack = resolved;
    }
}

/// The address a frame's line is looked up at: a return address can sit just past its function's end (a call
/// to a function that never returns), so the call instruction's last byte.
fn lookup_address(address: u64) -> u64 {
    address.saturating_sub(1)
}

/// An object's DWARF, ready for look-ups.
struct DebugInfo {
    /// `addr2line` parses units lazily, as look-ups need them.
    context: addr2line::Context<Reader>,
}

impl DebugInfo {
    /// The DWARF of the object `file` (already opened as an object, with `path` its name in reports), or of its
    /// separate debug file inside `root`; `None` when neither has any, or it is over [`MAX_DEBUG_BYTES`].
    fn load(file: &File, path: &str, root: &File) -> Option<Self> {
        let object_file = BoundedFile::new(file.try_clone().ok()?, MAX_DEBUG_BYTES);
        let object = object::File::parse(&object_file).ok()?;
        if object.section_by_name(".debug_info").is_some() {
            return Self::from_object(&object);
        }
        let build_id = object.build_id().ok().flatten().map(<[u8]>::to_vec);
        let link = object
            .gnu_debuglink()
            .ok()
            .flatten()
            .map(|(name, _crc)| String::from_utf8_lossy(name).into_owned());
        for candidate in separate_candidates(path, build_id.as_deref(), link.as_deref()) {
            let Ok(debug_file) =
                open_object_in_root(root, &candidate, &candidate.to_string_lossy())
            else {
                continue;
            };
            let debug_file = BoundedFile::new(debug_file, MAX_DEBUG_BYTES);
            let Ok(debug) = object::File::parse(&debug_file) else {
                continue;
            };
            // A debug file of another build would name the wrong lines: its build id must be the object's.
            let matches = match &build_id {
                Some(id) => debug.build_id().ok().flatten() == Some(id.as_slice()),
                None => true,
            };
            if matches && let Some(info) = Self::from_object(&debug) {
                return Some(info);
            }
        }
        None
    }

    /// Reads the sections `addr2line` needs from `object`, within [`MAX_DEBUG_BYTES`] in all.
    fn from_object<'data>(object: &object::File<'data, &'data BoundedFile>) -> Option<Self> {
        let endian = if object.is_little_endian() {
            RunTimeEndian::Little
        } else {
            RunTimeEndian::Big
        };
        let mut budget = MAX_DEBUG_BYTES;
        let mut failed = false;
        let mut load = |id: SectionId| -> Result<Reader, gimli::Error> {
            let data = match object.section_by_name(id.name()) {
                // Location lists are not needed to name a line, and are large: not read.
                Some(section) if id != SectionId::DebugLocLists && id != SectionId::DebugLoc => {
                    match section_bytes(&section, &mut budget) {
                        Some(data) => data,
                        None => {
                            failed = true;
                            Cow::Borrowed(&[][..])
                        }
                    }
                }
                _ => Cow::Borrowed(&[][..]),
            };
            Ok(EndianArcSlice::new(Arc::from(data.as_ref()), endian))
        };
        let dwarf = gimli::Dwarf::load(&mut load).ok()?;
        if failed {
            return None;
        }
        let context = addr2line::Context::from_dwarf(dwarf).ok()?;
        Some(Self { context })
    }

    /// The frames at `address` (an ELF address of the object), innermost first: the calls inlined there, then
    /// the function that contains them. Empty where the DWARF does not cover the address.
    fn frames(&self, address: u64) -> Vec<SourceFrame> {
        let Ok(mut frames) = self.context.find_frames(address).skip_all_loads() else {
            return Vec::new();
        };
        let mut found = Vec::new();
        while let Ok(Some(frame)) = frames.next() {
            if found.len() == MAX_INLINED_FRAMES {
                break;
            }
            let function = frame
                .function
                .as_ref()
                .and_then(|f| f.demangle().ok())
                .map(Cow::into_owned);
            let (file, line) = frame
                .location
                .map_or((None, None), |l| (l.file.map(str::to_owned), l.line));
            found.push(SourceFrame {
                function,
                file,
                line,
            });
        }
        found
    }
}

/// A section's bytes, inflated when compressed, charged against `budget`; `None` when over it or unreadable.
fn section_bytes<'data>(
    section: &object::Section<'data, '_, &'data BoundedFile>,
    budget: &mut u64,
) -> Option<Cow<'data, [u8]>> {
    // What a compressed section says it inflates to is checked before anything is inflated.
    let size = section.compressed_data().ok()?.uncompressed_size;
    *budget = budget.checked_sub(size)?;
    section.uncompressed_data().ok()
}

/// Where a separate debug file may be, in the order gdb looks: by build id, then by debug link beside the
/// object, in its `.debug` folder, and under the global debug folder. Paths are inside the process's root.
fn separate_candidates(path: &str, build_id: Option<&[u8]>, link: Option<&str>) -> Vec<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(id) = build_id.filter(|id| id.len() >= 2) {
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        candidates.push(PathBuf::from(format!(
            "{DEBUG_DIR}/.build-id/{}/{}.debug",
            &hex[..2],
            &hex[2..]
        )));
    }
    // A link is a file name: one with a slash (or `..`) would leave the folders it is looked up in.
    let link = link.filter(|l| !l.is_empty() && !l.contains('/') && *l != "..");
    if let Some(link) = link {
        let dir = Path::new(path).parent().unwrap_or(Path::new("/"));
        let relative = dir.strip_prefix("/").unwrap_or(dir);
        candidates.push(dir.join(link));
        candidates.push(dir.join(".debug").join(link));
        candidates.push(Path::new(DEBUG_DIR).join(relative).join(link));
    }
    candidates
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separate_debug_files_are_looked_up_by_build_id_then_by_link_inside_the_root() {
        let candidates = separate_candidates(
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            Some(&[0xab, 0xcd, 0xef]),
            Some("libc.so.6.debug"),
        );
        let candidates: Vec<String> = candidates
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            candidates,
            [
                "/usr/lib/debug/.build-id/ab/cdef.debug",
                "/usr/lib/x86_64-linux-gnu/libc.so.6.debug",
                "/usr/lib/x86_64-linux-gnu/.debug/libc.so.6.debug",
                "/usr/lib/debug/usr/lib/x86_64-linux-gnu/libc.so.6.debug",
            ]
        );
    }

    #[test]
    fn a_debug_link_that_names_another_folder_is_not_followed() {
        for link in ["../../etc/shadow", "..", "a/b", ""] {
            let candidates = separate_candidates("/usr/lib/x.so", None, Some(link));
            assert!(candidates.is_empty(), "{link}: {candidates:?}");
        }
    }
}
