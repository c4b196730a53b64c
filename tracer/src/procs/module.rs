//! An ELF object a process maps (executable or shared library): its function symbols, for naming stack frames,
//! and its loadable segments, for turning file offsets into the addresses symbols use. Stripped objects load
//! fine: what `.dynsym` still holds is used, and frames without a symbol are shown as module + offset.
//!
//! The files come from traced processes, which alloctrace (running as root) does not trust: a process can map a
//! device, a sparse file of any size, or an ELF whose headers claim sections of gigabytes. So only regular files
//! are opened, checked on the opened descriptor, only the ranges the parser asks for are read (never the whole
//! file), within a budget per file, and the symbols kept are bounded too; what is cut is counted.
//!
//! The ELF structures are read by the `object` crate (bounds-checked, made for untrusted input) through
//! [`BoundedFile`]. blazesym is not used: it works on a memory map of the whole file, and a file its owner
//! truncates while it is mapped kills the reader with `SIGBUS`. The index below (one name per address, chosen
//! as reports want it, and names → addresses for probes) is kept by hand: `object`'s `SymbolMap` keeps an
//! arbitrary name per address, no sizes, and no look-up by name.

use std::{
    cell::Cell,
    collections::HashMap,
    fs::{File, OpenOptions},
    ops::Range,
    os::{fd::AsFd, unix::fs::OpenOptionsExt as _},
    path::Path,
};

use object::{Object as _, ObjectSegment as _, ObjectSymbol as _, ReadCache, ReadRef, SymbolKind};

use crate::os;

/// The largest file opened as an object. The biggest real libraries (libLLVM, libxul with symbols) are a few
/// hundred MiB; a larger "object" is a sparse file made to be large.
pub const MAX_OBJECT_FILE_BYTES: u64 = 2 << 30;

/// The most bytes read from one object: headers, symbol and string tables. A libpython with its full symbol
/// table needs under 2 MiB; a file whose tables exceed this is refused rather than read.
pub const MAX_OBJECT_READ_BYTES: u64 = 64 << 20;

/// The most symbols (functions and data) kept per object: libpython has 15,000, libLLVM about 60,000.
pub const MAX_SYMBOLS: usize = 1 << 18;

/// The most bytes of symbol names kept per object (each name is stored twice: by address and by name).
pub const MAX_SYMBOL_NAME_BYTES: usize = 16 << 20;

/// The most bytes read to find an object's build id: its ELF header, program headers and note segments, a few
/// hundred bytes in real objects.
const MAX_BUILD_ID_READ_BYTES: u64 = 64 << 10;

/// The most bytes of a build id kept: linkers write 20 (SHA-1), 16 (MD5, UUID) or 8; a longer note is cut.
pub const MAX_BUILD_ID_BYTES: usize = 32;

/// An object's GNU build id (`NT_GNU_BUILD_ID`), at most [`MAX_BUILD_ID_BYTES`] of it.
pub type BuildId = Box<[u8]>;

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a regular file")]
    NotRegular { path: String },
    #[error(
        "{path} is {size} bytes, more than the {MAX_OBJECT_FILE_BYTES} alloctrace reads objects of"
    )]
    TooLarge { path: String, size: u64 },
    #[error("{path} is not an ELF object alloctrace can read: {source}")]
    Parse {
        path: String,
        source: object::read::Error,
    },
}

/// Opens `path` for reading as an object: a regular file of at most [`MAX_OBJECT_FILE_BYTES`]. The path is
/// first opened `O_PATH`, which opens nothing (a device or a FIFO a container swapped in is never opened, so
/// never acted on), and the type and size are checked on that descriptor; only a regular file is then opened
/// for reading, through that same descriptor, so a path swapped between the check and the open cannot slip
/// anything else in. A path inside a process's root is opened with [`open_object_in_root`].
pub fn open_object(path: &Path, name: &str) -> Result<File, ModuleError> {
    let located = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)
        .map_err(|source| read_error(name, source))?;
    checked_object(&located, name)
}

/// Opens `path` as [`open_object`] does, resolved inside the directory `root` (a process's root, see
/// [`os::open_root`]) as that process resolves it: a container's absolute symlinks lead to its own files, never
/// the host's (see [`os::locate_in_root`]).
pub fn open_object_in_root(root: impl AsFd, path: &Path, name: &str) -> Result<File, ModuleError> {
    let located = os::locate_in_root(root, path).map_err(|source| read_error(name, source))?;
    checked_object(&located, name)
}

fn read_error(name: &str, source: std::io::Error) -> ModuleError {
    ModuleError::Read {
        path: name.to_owned(),
        source,
    }
}

/// The object `located` (an `O_PATH` descriptor) names, opened for reading once it is found to be a regular file
/// of at most [`MAX_OBJECT_FILE_BYTES`].
fn checked_object(located: &File, name: &str) -> Result<File, ModuleError> {
    let read_error = |source| read_error(name, source);
    let meta = located.metadata().map_err(read_error)?;
    if !meta.file_type().is_file() {
        return Err(ModuleError::NotRegular {
            path: name.to_owned(),
        });
    }
    if meta.len() > MAX_OBJECT_FILE_BYTES {
        return Err(ModuleError::TooLarge {
            path: name.to_owned(),
            size: meta.len(),
        });
    }
    os::reopen_for_reading(located).map_err(read_error)
}

/// An object file read on demand: the parser's reads go through a cache (each range is read once), and they stop
/// with an error once `budget` bytes have been asked for, before any buffer is allocated for them.
pub struct BoundedFile {
    cache: ReadCache<File>,
    remaining: Cell<u64>,
}

impl BoundedFile {
    pub fn new(file: File, budget: u64) -> Self {
        Self {
            cache: ReadCache::new(file),
            remaining: Cell::new(budget),
        }
    }

    fn spend(&self, size: u64) -> Result<(), ()> {
        let remaining = self.remaining.get().checked_sub(size).ok_or(())?;
        self.remaining.set(remaining);
        Ok(())
    }
}

impl<'a> ReadRef<'a> for &'a BoundedFile {
    fn len(self) -> Result<u64, ()> {
        ReadRef::len(&self.cache)
    }

    fn read_bytes_at(self, offset: u64, size: u64) -> Result<&'a [u8], ()> {
        self.spend(size)?;
        self.cache.read_bytes_at(offset, size)
    }

    /// `ReadCache` reads at most 4 KiB looking for the delimiter (names longer than that are refused): charged
    /// for what it returns.
    fn read_bytes_at_until(self, range: Range<u64>, delimiter: u8) -> Result<&'a [u8], ()> {
        let bytes = self.cache.read_bytes_at_until(range, delimiter)?;
        self.spend(bytes.len() as u64)?;
        Ok(bytes)
    }
}

/// The build id of an ELF object, from its note segments (`PT_NOTE`): what the loader maps, so stripped objects
/// keep it. `None` for an object without one, and for what is not a 64-bit ELF object.
pub fn build_id<'data, R: ReadRef<'data>>(data: R) -> Option<BuildId> {
    use object::{
        elf::{ELF_NOTE_GNU, FileHeader64, NT_GNU_BUILD_ID},
        read::elf::{FileHeader as _, ProgramHeader as _},
    };
    let header = FileHeader64::<object::Endianness>::parse(data).ok()?;
    let endian = header.endian().ok()?;
    for segment in header.program_headers(endian, data).ok()? {
        let Ok(Some(mut notes)) = segment.notes(endian, data) else {
            continue;
        };
        while let Ok(Some(note)) = notes.next() {
            if note.name() == ELF_NOTE_GNU && note.n_type(endian) == NT_GNU_BUILD_ID {
                let desc = note.desc();
                return Some(desc[..desc.len().min(MAX_BUILD_ID_BYTES)].into());
            }
        }
    }
    None
}

/// The build id of the object at `open_path` (see [`build_id`]), reading its headers and notes only, within
/// [`MAX_BUILD_ID_READ_BYTES`].
pub fn read_build_id(open_path: &Path, name: &str) -> Option<BuildId> {
    let file = BoundedFile::new(open_object(open_path, name).ok()?, MAX_BUILD_ID_READ_BYTES);
    build_id(&file)
}

/// The build id of the object at `path` inside the directory `root` (see [`open_object_in_root`]).
pub fn read_build_id_in_root(root: impl AsFd, path: &Path, name: &str) -> Option<BuildId> {
    let file = open_object_in_root(root, path, name).ok()?;
    build_id(&BoundedFile::new(file, MAX_BUILD_ID_READ_BYTES))
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Symbol {
    address: u64,
    size: u64,
    name: String,
    /// Exported (in `.dynsym`), so other objects can bind to it.
    dynamic: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    file_offset: u64,
    file_size: u64,
    address: u64,
}

/// The parts of an ELF object alloctrace uses. Two are equal when they name every address alike.
#[derive(Debug, PartialEq, Eq)]
pub struct Module {
    /// The path reports show: the one the process mapped it from.
    pub path: String,
    /// Function symbols sorted by address, one name per address.
    symbols: Vec<Symbol>,
    /// Data symbols (`_PyRuntime`, `PyCode_Type`…) by name → address.
    data: HashMap<String, u64>,
    /// Every function name defined here (aliases included) → (address, exported).
    by_name: HashMap<String, (u64, bool)>,
    segments: Vec<Segment>,
    /// What the registry's cache knows it by, with its file (see [`super::module_cache::ObjectKey`]).
    build_id: Option<BuildId>,
    /// Symbols not kept because the object has more than [`MAX_SYMBOLS`] or [`MAX_SYMBOL_NAME_BYTES`].
    symbols_cut: u64,
    /// What the tables above take in memory, about: what the registry's cache of modules charges for it.
    heap_bytes: usize,
}

impl Module {
    /// Reads `open_path` (which may be a `/proc/PID/map_files` link); `path` is the name reports use.
    pub fn load(open_path: &Path, path: &str) -> Result<Self, ModuleError> {
        let file = BoundedFile::new(open_object(open_path, path)?, MAX_OBJECT_READ_BYTES);
        Self::parse(&file, path)
    }

    pub fn parse<'data, R: ReadRef<'data>>(data: R, path: &str) -> Result<Self, ModuleError> {
        let file = object::File::parse(data).map_err(|source| ModuleError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let build_id = build_id(data);
        let mut kept = KeptSymbols::default();
        let defined = file
            .dynamic_symbols()
            .map(|s| (s, true))
            .chain(file.symbols().map(|s| (s, false)))
            .filter(|(s, _)| s.is_definition() && s.address() != 0);
        // Exported symbols come first, so a cut keeps the ones other objects (and alloctrace) look up by name.
        let mut data = HashMap::new();
        let mut symbols: Vec<Symbol> = Vec::new();
        for (s, dynamic) in defined {
            let kind = s.kind();
            if kind != SymbolKind::Text && kind != SymbolKind::Data {
                continue;
            }
            let Ok(name) = s.name() else { continue };
            if !kept.admit(name) {
                continue;
            }
            if kind == SymbolKind::Data {
                data.insert(name.to_owned(), s.address());
            } else {
                symbols.push(Symbol {
                    address: s.address(),
                    size: s.size(),
                    name: name.to_owned(),
                    dynamic,
                });
            }
        }
        let mut by_name: HashMap<String, (u64, bool)> = HashMap::new();
        for s in &symbols {
            let entry = by_name
                .entry(s.name.clone())
                .or_insert((s.address, s.dynamic));
            entry.1 |= s.dynamic;
        }
        // One name per address, for reports: exported before local, public (`malloc`) before internal aliases
        // (`__libc_malloc`), then name order, so that reports are stable.
        symbols.sort_by(|a, b| {
            let key = |s: &Symbol| {
                (
                    s.address,
                    !s.dynamic,
                    s.name.starts_with('_'),
                    s.name.clone(),
                )
            };
            key(a).cmp(&key(b))
        });
        symbols.dedup_by_key(|s| s.address);
        let segments: Vec<Segment> = file
            .segments()
            .map(|seg| {
                let (file_offset, file_size) = seg.file_range();
                Segment {
                    file_offset,
                    file_size,
                    address: seg.address(),
                }
            })
            .collect();
        // A hash map entry costs its key and value, a control byte, and the slack of a table at most 7/8 full.
        let map_entry =
            |name: &String, value: usize| (size_of::<String>() + value + 1) * 8 / 7 + name.len();
        let heap_bytes = size_of::<Self>()
            + path.len()
            + symbols.capacity() * size_of::<Symbol>()
            + symbols.iter().map(|s| s.name.capacity()).sum::<usize>()
            + data
                .keys()
                .map(|name| map_entry(name, size_of::<u64>()))
                .sum::<usize>()
            + by_name
                .keys()
                .map(|name| map_entry(name, size_of::<(u64, bool)>()))
                .sum::<usize>()
            + segments.capacity() * size_of::<Segment>();
        Ok(Self {
            path: path.to_owned(),
            symbols,
            data,
            by_name,
            heap_bytes: heap_bytes + build_id.as_ref().map_or(0, |id| id.len()),
            segments,
            build_id,
            symbols_cut: kept.cut,
        })
    }

    /// About how many bytes of memory the module takes: its symbol tables, names and segments.
    pub fn heap_bytes(&self) -> usize {
        self.heap_bytes
    }

    /// The object's build id, when it has one.
    pub fn build_id(&self) -> Option<&BuildId> {
        self.build_id.as_ref()
    }

    /// How many of the object's symbols were not kept because of [`MAX_SYMBOLS`] and
    /// [`MAX_SYMBOL_NAME_BYTES`]: frames in their functions are named by a neighbour or by module + offset.
    pub fn symbols_cut(&self) -> u64 {
        self.symbols_cut
    }

    /// The ELF address (what symbols and `addr2line` use) of a byte at `file_offset` in the file.
    pub fn address_of_file_offset(&self, file_offset: u64) -> Option<u64> {
        // Segments come from the object's program headers: their sums may overflow.
        self.segments.iter().find_map(|s| {
            let into = file_offset
                .checked_sub(s.file_offset)
                .filter(|&d| d < s.file_size)?;
            into.checked_add(s.address)
        })
    }

    /// The file offset of an ELF address: where uprobes are placed.
    pub fn file_offset_of_address(&self, address: u64) -> Option<u64> {
        self.segments.iter().find_map(|s| {
            let into = address
                .checked_sub(s.address)
                .filter(|&d| d < s.file_size)?;
            into.checked_add(s.file_offset)
        })
    }

    /// The function containing `address`, and the offset into it.
    pub fn function_at(&self, address: u64) -> Option<(&str, u64)> {
        let idx = self.symbols.partition_point(|s| s.address <= address);
        let symbol = self.symbols.get(idx.checked_sub(1)?)?;
        let offset = address - symbol.address;
        // Symbols without a size (hand-written assembly) cover up to the next symbol.
        let covered = symbol.size == 0 || offset < symbol.size;
        covered.then_some((symbol.name.as_str(), offset))
    }

    /// The address of an exported function: the one other objects bind to when they call `name`.
    pub fn exported_function(&self, name: &str) -> Option<u64> {
        self.by_name
            .get(name)
            .filter(|(_, exported)| *exported)
            .map(|&(address, _)| address)
    }

    /// The address of a data object defined here (a variable), exported or not.
    pub fn data_symbol(&self, name: &str) -> Option<u64> {
        self.data.get(name).copied()
    }

    /// The address of a function defined here, exported or not (a static executable exports nothing).
    pub fn defined_function(&self, name: &str) -> Option<u64> {
        self.by_name.get(name).map(|&(address, _)| address)
    }
}

/// Counts the symbols kept from one object against [`MAX_SYMBOLS`] and [`MAX_SYMBOL_NAME_BYTES`].
#[derive(Default)]
struct KeptSymbols {
    count: usize,
    name_bytes: usize,
    cut: u64,
}

impl KeptSymbols {
    /// Whether a symbol named `name` fits; one that does not is counted as cut.
    fn admit(&mut self, name: &str) -> bool {
        if self.count < MAX_SYMBOLS && self.name_bytes + name.len() <= MAX_SYMBOL_NAME_BYTES {
            self.count += 1;
            self.name_bytes += name.len();
            true
        } else {
            self.cut += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test binary itself is an ELF object with a symbol table: a real file to check against.
    fn this_binary() -> Module {
        let exe = std::env::current_exe().unwrap();
        Module::load(&exe, "test").unwrap()
    }

    #[test]
    fn names_a_function_from_its_own_address() {
        let module = this_binary();
        let maps = crate::procs::maps::Maps::from_pid(std::process::id()).unwrap();
        let pc = names_a_function_from_its_own_address as *const () as u64;
        let mapping = maps.find(pc).unwrap();
        let file_offset = pc - mapping.start + mapping.file_offset;
        let address = module.address_of_file_offset(file_offset).unwrap();
        assert_eq!(module.file_offset_of_address(address), Some(file_offset));
        let (name, offset) = module.function_at(address).unwrap();
        assert!(
            name.contains("names_a_function_from_its_own_address"),
            "{name}"
        );
        assert_eq!(offset, 0);
        let (_, inside) = module.function_at(address + 1).unwrap();
        assert_eq!(inside, 1);
    }

    #[test]
    fn opens_only_regular_files() {
        let refused = |path: &Path| open_object(path, "target").unwrap_err().to_string();
        assert_eq!(
            refused(Path::new("/dev/zero")),
            "target is not a regular file"
        );
        let dir = std::env::temp_dir().join(format!("alloctrace-module-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(refused(&dir), "target is not a regular file");
        // A FIFO would block an open for reading until a writer came: it is neither waited on nor read.
        let fifo = dir.join("fifo");
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        assert_eq!(refused(&fifo), "target is not a regular file");
        // A sparse file one byte over the bound costs nothing to make.
        let huge = dir.join("huge");
        File::create(&huge)
            .unwrap()
            .set_len(MAX_OBJECT_FILE_BYTES + 1)
            .unwrap();
        assert!(refused(&huge).starts_with("target is 2147483649 bytes"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_path_inside_a_root_resolves_as_its_process_would() {
        use std::io::Read as _;
        let read = |file: File| {
            let mut text = String::new();
            { file }.read_to_string(&mut text).unwrap();
            text
        };
        // A directory used as a container's root, whose /usr/lib/libfoo.so is an absolute symlink to a path
        // that the host has too, with another file.
        let host = std::env::temp_dir().join(format!("alloctrace-in-root-{}", std::process::id()));
        let root = host.join("root");
        let target = host.join("libfoo.so");
        let inside = root.join(target.strip_prefix("/").unwrap());
        std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::fs::write(&target, "the host's").unwrap();
        std::fs::write(&inside, "the container's").unwrap();
        std::os::unix::fs::symlink(&target, root.join("usr/lib/libfoo.so")).unwrap();
        let dir = File::open(&root).unwrap();
        let in_root = |path: &str| open_object_in_root(&dir, Path::new(path), "libfoo.so");
        assert_eq!(
            read(in_root("/usr/lib/libfoo.so").unwrap()),
            "the container's"
        );
        // `..` stops at the root, as it does for the process.
        let climbing = format!("/../../../..{}", target.display());
        assert_eq!(read(in_root(&climbing).unwrap()), "the container's");
        // A magic link, which could lead anywhere, is refused: in a root that has a /proc (the test's own).
        let exe = open_object_in_root(File::open("/").unwrap(), Path::new("/proc/self/exe"), "exe");
        assert!(
            matches!(&exe, Err(ModuleError::Read { source, .. }) if source.raw_os_error() == Some(libc::ELOOP)),
            "{exe:?}"
        );
        assert!(open_object(Path::new("/proc/self/exe"), "exe").is_ok());
        // What a plain open through the root's path reads: the host's file.
        let through_path = open_object(&root.join("usr/lib/libfoo.so"), "libfoo.so").unwrap();
        assert_eq!(read(through_path), "the host's");
        std::fs::remove_dir_all(&host).unwrap();
    }

    #[test]
    fn reads_only_what_it_parses_within_its_budget() {
        let exe = std::env::current_exe().unwrap();
        let size = std::fs::metadata(&exe).unwrap().len();
        let open = || File::open(&exe).unwrap();
        // The symbol tables of this test binary are a small part of it (most of it is code and debug info).
        let file = BoundedFile::new(open(), size / 4);
        let module = Module::parse(&file, "test").unwrap();
        assert!(module.defined_function("main").is_some());
        assert!(file.remaining.get() > 0);
        // With too small a budget the parse fails; nothing past the budget is allocated or read.
        let starved = BoundedFile::new(open(), 4096);
        let err = Module::parse(&starved, "test").unwrap_err();
        assert!(
            err.to_string().starts_with("test is not an ELF object"),
            "{err}"
        );
        assert!(starved.read_bytes_at(0, 4097).is_err());
    }

    #[test]
    fn keeps_a_bounded_number_of_symbols_and_counts_the_rest() {
        let mut kept = KeptSymbols::default();
        for _ in 0..MAX_SYMBOLS {
            assert!(kept.admit("f"));
        }
        assert!(!kept.admit("f"));
        assert_eq!(kept.cut, 1);
        let mut kept = KeptSymbols::default();
        assert!(kept.admit(&"x".repeat(MAX_SYMBOL_NAME_BYTES - 1)));
        assert!(!kept.admit("ab"));
        assert!(kept.admit("a"));
        assert!(!kept.admit("a"));
        assert_eq!((kept.count, kept.cut), (2, 2));
    }

    #[test]
    fn segments_at_the_top_of_the_address_space_do_not_overflow() {
        // Found by fuzz/elf_module: program headers whose address or offset plus size passes u64::MAX.
        let mut module = this_binary();
        module.segments = vec![Segment {
            file_offset: 0x1000,
            file_size: 0x2000,
            address: u64::MAX - 0xfff,
        }];
        assert_eq!(module.file_offset_of_address(u64::MAX), Some(0x1fff));
        assert_eq!(module.address_of_file_offset(0x1fff), Some(u64::MAX));
        assert_eq!(module.address_of_file_offset(0x2000), None);
        module.segments = vec![Segment {
            file_offset: u64::MAX - 0xfff,
            file_size: 0x2000,
            address: 0x1000,
        }];
        assert_eq!(module.address_of_file_offset(u64::MAX), Some(0x1fff));
        assert_eq!(module.file_offset_of_address(0x2000), None);
    }

    #[test]
    fn the_build_id_is_read_from_the_headers_and_notes_alone() {
        let exe = std::env::current_exe().unwrap();
        let id = read_build_id(&exe, "test").expect("the test binary has a build id");
        assert_eq!(this_binary().build_id(), Some(&id));
        // A linker's id: SHA-1, MD5 or a UUID, well within what is kept.
        assert!(matches!(id.len(), 8 | 16 | 20), "{id:?}");
        let file = BoundedFile::new(File::open(&exe).unwrap(), MAX_BUILD_ID_READ_BYTES);
        assert_eq!(build_id(&file), Some(id));
        assert!(
            file.remaining.get() > MAX_BUILD_ID_READ_BYTES - 4096,
            "read a page at most"
        );
        assert_eq!(build_id(&b"#!/bin/sh\n"[..]), None);
    }

    #[test]
    fn rejects_what_is_not_elf() {
        let err = Module::parse(&b"#!/bin/sh\n"[..], "script").unwrap_err();
        assert!(err.to_string().starts_with("script is not an ELF object"));
    }
}
