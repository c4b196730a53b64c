//! A traced CPython process, read from outside: which interpreter it runs and where its runtime state is (for
//! the eBPF side to walk its frames), and its code objects, read from its memory with `process_vm_readv`, so
//! that each (code object, position) pair the probes recorded becomes a `file:function:line` frame.
//!
//! The version's offsets are checked against the live process before a frame is trusted: a code object must
//! have the interpreter's own `PyCode_Type` as its type. A frame whose code object cannot be read keeps its
//! place in the stack as [`UNREADABLE_FRAME`], and is counted.
//!
//! The target is not trusted: every read of its memory is bounded ([`MAX_READ`]), names are read up to
//! [`MAX_NAME_BYTES`] and marked with [`TRUNCATED_MARK`] when cut, line tables up to [`MAX_LINE_TABLE_BYTES`],
//! and each cut is counted, so that a 1 MB `co_filename` neither costs a megabyte nor loses its frame.

use std::{collections::HashMap, io, sync::Arc};

use serde::Serialize;
use tracer_common::{CODE_HEADER_BYTES, PY_FRAME_READ_MAX, PY_NO_OFFSET, PyFrame, PyProcess};

use super::{
    lines::{self, Format},
    offsets::Offsets,
};
use crate::{
    decode::CodeCopy,
    procs::{Frame, Registry, maps::Mapping, module::Module},
};

/// The most bytes of a name (file name, function name, qualified name) read: longer names are cut and marked.
pub const MAX_NAME_BYTES: usize = 4 << 10;

/// The most bytes of a line table read: one of a million-line module is about this size. A longer one is cut,
/// and instructions past the cut have no line.
pub const MAX_LINE_TABLE_BYTES: usize = 1 << 20;

/// The largest single read of a target's memory: the largest thing read is a line table. The lengths come from
/// the target (and, from 3.13, so do the offsets): a read longer than this is refused before any buffer exists.
pub const MAX_READ: usize = MAX_LINE_TABLE_BYTES;

/// The most bytes of code objects cached per process: a few thousand ordinary ones, or 32 with the longest line
/// tables. When full, the cache is emptied and code objects are read again as frames need them.
pub const MAX_CACHED_CODE_BYTES: usize = 32 << 20;

/// The most code objects whose header the kernel copied is remembered per process (see [`Reader::remember`]),
/// 40 bytes each. When full, the older half goes: those of stacks named long ago.
pub const MAX_COPIED_HEADERS: usize = 1 << 16;

/// How much of an object's start is compared with the kernel's copy before the rest of it is read from the
/// process: its header (type, size or length, hash) and more.
const COPY_CHECK_BYTES: usize = 64;

/// Ends a name cut at [`MAX_NAME_BYTES`].
pub const TRUNCATED_MARK: &str = "…(truncated)";

/// The function of a Python frame whose code object could not be read.
pub const UNREADABLE_FRAME: &str = "<unreadable Python frame>";

/// Reads `len` bytes at `addr` in process `pid`; at most [`MAX_READ`].
pub fn read_memory(pid: u32, addr: u64, len: usize) -> io::Result<Vec<u8>> {
    if len > MAX_READ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a read of {len} bytes of process memory is more than the {MAX_READ} allowed"),
        ));
    }
    let mut buf = vec![0u8; len];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: len,
    };
    // On libc: rustix has no process_vm_readv.
    // SAFETY: one local iovec over our own buffer of `len` bytes; the remote one is only read by the kernel.
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != len {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short read"));
    }
    Ok(buf)
}

fn u64_at(bytes: &[u8], offset: u64) -> Option<u64> {
    let start = usize::try_from(offset).ok()?;
    Some(u64::from_ne_bytes(
        bytes.get(start..start + 8)?.try_into().ok()?,
    ))
}

fn u32_at(bytes: &[u8], offset: u64) -> Option<u32> {
    let start = usize::try_from(offset).ok()?;
    Some(u32::from_ne_bytes(
        bytes.get(start..start + 4)?.try_into().ok()?,
    ))
}

/// What alloctrace found out about a process's Python.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PythonInfo {
    /// `3.11`.
    pub version: String,
    /// The object holding the interpreter: the executable, or `libpython3.X.so`.
    pub path: String,
    /// `null` when Python frames are read; else why not.
    pub unsupported: Option<String>,
}

/// One CPython interpreter in a traced process.
#[derive(Clone, Debug)]
pub struct Interpreter {
    pub info: PythonInfo,
    minor: u8,
    /// `None` when the version is not supported (`info.unsupported` says why).
    offsets: Option<Offsets>,
    /// Address of `_PyRuntime` in the process.
    runtime: u64,
    /// Address of `PyCode_Type` in the process, the type every code object points to.
    code_type: u64,
}

impl Interpreter {
    /// A CPython 3.`minor` with these offsets, whose `PyCode_Type` is at `code_type`: for `fuzz/python_reader`.
    #[doc(hidden)]
    pub fn for_fuzzing(minor: u8, offsets: Offsets, code_type: u64) -> Self {
        let (version, path, unsupported) = (format!("3.{minor}"), String::new(), None);
        let info = PythonInfo {
            version,
            path,
            unsupported,
        };
        Self {
            info,
            minor,
            offsets: Some(offsets),
            runtime: 0,
            code_type,
        }
    }

    /// What the eBPF side needs to walk this process's frames; `None` when they cannot be read.
    pub fn bpf_config(&self) -> Option<PyProcess> {
        let o = self.offsets.as_ref()?;
        let narrow = |v: u64| u32::try_from(v).unwrap_or(PY_NO_OFFSET);
        Some(PyProcess {
            // 3.13 takes its offsets from the target itself: a sum that overflows is a lie, not an address.
            interpreters_head: self.runtime.checked_add(o.runtime_interpreters_head)?,
            interp_threads_head: narrow(o.interp_threads_head),
            tstate_next: narrow(o.tstate_next),
            tstate_thread_id: narrow(o.tstate_thread_id),
            tstate_frame: narrow(o.tstate_frame),
            cframe_current_frame: o.cframe_current_frame.map_or(PY_NO_OFFSET, narrow),
            frame_back: narrow(o.frame_back),
            frame_code: narrow(o.frame_code),
            frame_globals: o.frame_globals.map_or(PY_NO_OFFSET, narrow),
            frame_instr: narrow(o.frame_instr),
            frame_instr_is_pointer: u32::from(o.frame_instr_is_pointer),
            frame_owner: o.frame_owner.map_or(PY_NO_OFFSET, narrow),
            frame_read_size: narrow(frame_read_size(o)?),
            code_filename: narrow(o.code_filename),
            code_name: narrow(o.code_qualname.unwrap_or(o.code_name)),
            code_linetable: narrow(o.code_linetable),
            code_firstlineno: narrow(o.code_firstlineno),
            // 0 (nothing copied) when the fields lie past what the kernel copies.
            code_header_len: code_header_len(o).map_or(0, narrow),
            _pad: 0,
        })
    }
}

/// The bytes from a code object's start that hold the fields naming it; `None` past [`CODE_HEADER_BYTES`].
fn code_header_len(o: &Offsets) -> Option<u64> {
    let len = [
        o.code_filename,
        o.code_name,
        o.code_qualname.unwrap_or(0),
        o.code_linetable,
        o.code_firstlineno,
    ]
    .into_iter()
    .max()?
    .checked_add(8)?;
    (len <= CODE_HEADER_BYTES as u64).then_some(len)
}

/// The bytes from a frame's start that cover the fields the eBPF side reads, rounded up to a whole word;
/// `None` when they would not fit its buffer.
fn frame_read_size(o: &Offsets) -> Option<u64> {
    let last_byte = [
        o.frame_back.saturating_add(8),
        o.frame_code.saturating_add(8),
        o.frame_globals.map_or(0, |f| f.saturating_add(8)),
        o.frame_instr.saturating_add(8),
        o.frame_owner.map_or(0, |f| f.saturating_add(1)),
    ]
    .into_iter()
    .max()?;
    let size = last_byte.checked_next_multiple_of(8)?;
    (size <= PY_FRAME_READ_MAX as u64).then_some(size)
}

/// `python3.11`, `libpython3.11.so.1.0`, `libpython3.13t.so` → (3, 11, free-threaded).
fn version_from_name(path: &str) -> Option<(u8, u8, bool)> {
    let name = path.rsplit('/').next()?;
    let rest = name
        .strip_prefix("libpython")
        .or_else(|| name.strip_prefix("python"))?;
    let (major, rest) = rest.split_once('.')?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let free_threaded = rest[digits.len()..].starts_with('t');
    Some((major.parse().ok()?, digits.parse().ok()?, free_threaded))
}

/// The address in process memory of an ELF address of `module`, mapped (in part) by `mapping`.
fn runtime_address(module: &Module, mapping: &Mapping, elf_address: u64) -> Option<u64> {
    let mapped_at = module.address_of_file_offset(mapping.file_offset)?;
    Some(
        elf_address
            .wrapping_sub(mapped_at)
            .wrapping_add(mapping.start),
    )
}

/// Looks for a CPython interpreter in process `pid`: the object that defines `_PyRuntime`. `None` when it is
/// not a Python process (or its interpreter is not mapped yet: a shared libpython is mapped by the loader).
pub fn detect(registry: &mut Registry, pid: u32) -> Option<Interpreter> {
    let maps = registry.maps(pid)?.clone();
    for mapping in maps.files() {
        let Some(module) = registry.module(pid, mapping) else {
            continue;
        };
        let Some(runtime_elf) = module.data_symbol("_PyRuntime") else {
            continue;
        };
        let runtime = runtime_address(&module, mapping, runtime_elf)?;
        let code_type = module
            .data_symbol("PyCode_Type")
            .and_then(|a| runtime_address(&module, mapping, a))
            .unwrap_or(0);
        return Some(interpreter(pid, &module, mapping, runtime, code_type));
    }
    None
}

fn interpreter(
    pid: u32,
    module: &Module,
    mapping: &Mapping,
    runtime: u64,
    code_type: u64,
) -> Interpreter {
    let named = version_from_name(&module.path);
    // 3.11+ says its version in memory; older ones are known by the file's name.
    let in_memory = module
        .data_symbol("Py_Version")
        .and_then(|a| runtime_address(module, mapping, a))
        .and_then(|a| read_memory(pid, a, 4).ok())
        .and_then(|b| u32_at(&b, 0))
        .map(|hex| ((hex >> 24) as u8, (hex >> 16) as u8));
    let (major, minor) = in_memory
        .or(named.map(|(major, minor, _)| (major, minor)))
        .unwrap_or((0, 0));
    let free_threaded = named.is_some_and(|(_, _, t)| t);
    let mut info = PythonInfo {
        version: format!("{major}.{minor}"),
        path: module.path.clone(),
        unsupported: None,
    };
    let offsets = if free_threaded {
        Err("free-threaded builds are not supported: their objects have another layout".to_owned())
    } else if (major, minor) >= (3, 13) {
        read_memory(pid, runtime, Offsets::DEBUG_OFFSETS_SIZE)
            .map_err(|e| format!("cannot read _Py_DebugOffsets: {e}"))
            .and_then(|debug| Offsets::from_debug_offsets(&debug).map_err(|e| e.to_string()))
    } else {
        Offsets::for_version(major, minor)
            .ok_or_else(|| format!("CPython {major}.{minor} is not supported"))
    };
    let offsets = match offsets {
        Ok(_) if code_type == 0 => Err("the interpreter defines no PyCode_Type symbol".to_owned()),
        other => other,
    };
    let offsets = offsets
        .map_err(|reason| info.unsupported = Some(reason))
        .ok();
    Interpreter {
        info,
        minor,
        offsets,
        runtime,
        code_type,
    }
}

/// A code object, read once.
#[derive(Debug)]
struct Code {
    /// Whether the line table was cut at [`MAX_LINE_TABLE_BYTES`].
    line_table_truncated: bool,
    filename: String,
    /// The qualified name where the version has one.
    name: String,
    first_line: u32,
    line_table: Vec<u8>,
    /// The addresses of its file and name strings, and its first line: what tells it from a code object
    /// later allocated at the same address.
    identity: [u64; 3],
}

impl Code {
    /// The bytes it holds, for the cache's bound.
    fn cost(&self) -> usize {
        size_of::<Self>() + self.filename.len() + self.name.len() + self.line_table.len()
    }
}

/// What a code object's header says, read on every look-up.
#[derive(Clone)]
struct CodeHeader {
    identity: [u64; 3],
    line_table: u64,
}

/// Reads Python strings, bytes and code objects out of a process, and names frames; caches code objects by
/// address.
pub struct Reader {
    pid: u32,
    interpreter: Interpreter,
    codes: HashMap<u64, Arc<Code>>,
    /// What [`Reader::codes`] holds, by [`Code::cost`].
    cached_bytes: usize,
    evicted_codes: u64,
    truncated_names: u64,
    truncated_line_tables: u64,
    unreadable_frames: u64,
    /// The kernel's copy being read by [`Reader::remember`]: the code object and the objects that name it,
    /// each `(address, bytes from its start)`. Empty otherwise.
    copy: Vec<(u64, Vec<u8>)>,
    /// What the kernel's copies said of each code object's header, by address, with the order they came in:
    /// what a frame names is checked against it rather than against the process's memory, where the code object
    /// may since have been freed and another made at its address (see [`Reader::remember`]).
    copied_headers: HashMap<u64, (u64, CodeHeader)>,
    headers_copied: u64,
}

/// A string or bytes object's content, possibly cut.
struct Read<T> {
    value: T,
    truncated: bool,
}

impl Reader {
    pub fn new(pid: u32, interpreter: Interpreter) -> Self {
        Self {
            pid,
            interpreter,
            codes: HashMap::new(),
            cached_bytes: 0,
            evicted_codes: 0,
            truncated_names: 0,
            truncated_line_tables: 0,
            unreadable_frames: 0,
            copy: Vec::new(),
            copied_headers: HashMap::new(),
            headers_copied: 0,
        }
    }

    /// Takes the kernel's copy of a code object and of the objects that name it, made while a frame of it ran
    /// (and sent before the stacks that name it): the code object is read from it at once into the cache of
    /// code objects, whatever the process has done with it since (a module's code object is freed once its
    /// import is done, and its address reused). What the copy said of its header is kept: a frame that names the
    /// address is checked against it, not against what the process holds there now.
    pub fn remember(&mut self, copy: &CodeCopy) {
        self.copy.clone_from(&copy.objects);
        if let Some(header) = self.read_code_header(copy.code) {
            if self.copied_headers.len() >= MAX_COPIED_HEADERS {
                // The newer half stays: the older ones' stacks were named long ago.
                let newer = self.headers_copied - MAX_COPIED_HEADERS as u64 / 2;
                self.copied_headers.retain(|_, (order, _)| *order > newer);
            }
            self.headers_copied += 1;
            self.copied_headers
                .insert(copy.code, (self.headers_copied, header));
            let _ = self.code(copy.code);
        }
        self.copy.clear();
    }

    /// The `len` bytes at `address`: from the copy being read when it holds them all, else from the process.
    fn read(&self, address: u64, len: usize) -> io::Result<Vec<u8>> {
        match self.copied(address, len) {
            Some(copied) => Ok(copied.to_vec()),
            None => read_memory(self.pid, address, len),
        }
    }

    /// At most `len` bytes at `address`, and whether fewer. The copy being read holds the start of the
    /// longest names and line tables only: the rest is read from the process while the object there still
    /// starts as the copy does; else (freed, or its memory reused) what the copy holds, cut.
    fn read_at_most(&self, address: u64, len: usize) -> Option<(Vec<u8>, bool)> {
        if let Some(copied) = self.copied(address, len) {
            return Some((copied.to_vec(), false));
        }
        let Some((base, bytes)) = self
            .copy
            .iter()
            .find(|(base, bytes)| (*base..*base + bytes.len() as u64).contains(&address))
        else {
            return read_memory(self.pid, address, len)
                .ok()
                .map(|bytes| (bytes, false));
        };
        let check = bytes.len().min(COPY_CHECK_BYTES);
        let unchanged =
            read_memory(self.pid, *base, check).is_ok_and(|live| live == bytes[..check]);
        if unchanged && let Ok(live) = read_memory(self.pid, address, len) {
            return Some((live, false));
        }
        let from = usize::try_from(address - base).ok()?;
        Some((bytes[from..].to_vec(), true))
    }

    /// The `len` bytes at `address`, when one object of the copy being read holds them all.
    fn copied(&self, address: u64, len: usize) -> Option<&[u8]> {
        self.copy.iter().find_map(|(base, bytes)| {
            let from = usize::try_from(address.checked_sub(*base)?).ok()?;
            bytes.get(from..from.checked_add(len)?)
        })
    }

    /// Names cut at [`MAX_NAME_BYTES`], once per code object read (a code object is read once, and again only
    /// when its address is reused).
    pub fn truncated_names(&self) -> u64 {
        self.truncated_names
    }

    /// Line tables cut at [`MAX_LINE_TABLE_BYTES`], once per code object read.
    pub fn truncated_line_tables(&self) -> u64 {
        self.truncated_line_tables
    }

    /// Code objects dropped from the cache to keep it within [`MAX_CACHED_CODE_BYTES`] (they are read again).
    pub fn evicted_codes(&self) -> u64 {
        self.evicted_codes
    }

    /// Frames shown as [`UNREADABLE_FRAME`]: their code object could not be read (freed, or not a code object).
    pub fn unreadable_frames(&self) -> u64 {
        self.unreadable_frames
    }

    pub fn info(&self) -> &PythonInfo {
        &self.interpreter.info
    }

    pub fn interpreter(&self) -> &Interpreter {
        &self.interpreter
    }

    /// A compact `str` object's characters, the first [`MAX_NAME_BYTES`] of them.
    fn string(&self, object: u64) -> Option<Read<String>> {
        let o = self.interpreter.offsets.as_ref()?;
        let header = self.read(object, o.unicode_compact_data as usize).ok()?;
        let length = usize::try_from(u64_at(&header, o.unicode_length)?).ok()?;
        let state = u32_at(&header, o.unicode_state)?;
        let (kind, compact, ascii) = (
            (state >> 2) & 7,
            (state >> 5) & 1 == 1,
            (state >> 6) & 1 == 1,
        );
        if !compact {
            return None;
        }
        let (data, width) = if ascii {
            (o.unicode_ascii_data, 1)
        } else {
            (o.unicode_compact_data, kind as usize)
        };
        if ![1, 2, 4].contains(&width) {
            return None;
        }
        let read = length.min(MAX_NAME_BYTES / width);
        let (bytes, cut) = self.read_at_most(object.checked_add(data)?, read * width)?;
        let read = if cut { bytes.len() / width } else { read };
        let mut value: String = match width {
            1 => bytes.iter().map(|&b| char::from(b)).collect(),
            2 => char::decode_utf16(
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_ne_bytes([c[0], c[1]])),
            )
            .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
            .collect(),
            _ => bytes
                .chunks_exact(4)
                .map(|c| {
                    char::from_u32(u32::from_ne_bytes([c[0], c[1], c[2], c[3]])).unwrap_or('?')
                })
                .collect(),
        };
        let truncated = read < length;
        if truncated {
            value.push_str(TRUNCATED_MARK);
        }
        Some(Read { value, truncated })
    }

    /// A `bytes` object's content, the first [`MAX_LINE_TABLE_BYTES`] of it.
    fn bytes(&self, object: u64) -> Option<Read<Vec<u8>>> {
        let o = self.interpreter.offsets.as_ref()?;
        let header = self.read(object, o.bytes_data as usize).ok()?;
        let size = usize::try_from(u64_at(&header, o.bytes_size)?).ok()?;
        let read = size.min(MAX_LINE_TABLE_BYTES);
        let (value, cut) = self.read_at_most(object.checked_add(o.bytes_data)?, read)?;
        let value = if cut {
            value[..value.len().min(read)].to_vec()
        } else {
            value
        };
        Some(Read {
            truncated: value.len() < size,
            value,
        })
    }

    /// The code object at `address`. The cache is checked against the object's identity each time (a code
    /// object can be freed and its address reused by another), and failures are not cached (a read can fail
    /// for a moment).
    fn code(&mut self, address: u64) -> Option<Arc<Code>> {
        let header = self.code_header(address)?;
        if let Some(cached) = self.codes.get(&address)
            && cached.identity == header.identity
        {
            return Some(Arc::clone(cached));
        }
        let code = Arc::new(self.read_code(header)?);
        if self.cached_bytes + code.cost() > MAX_CACHED_CODE_BYTES {
            self.evicted_codes += self.codes.len() as u64;
            self.codes.clear();
            self.cached_bytes = 0;
        }
        self.cached_bytes += code.cost();
        if let Some(replaced) = self.codes.insert(address, Arc::clone(&code)) {
            self.cached_bytes -= replaced.cost();
        }
        Some(code)
    }

    /// The fields of a code object's header, if it is one: as the kernel's copy of it said, if it copied one.
    fn code_header(&self, address: u64) -> Option<CodeHeader> {
        if let Some((_, header)) = self.copied_headers.get(&address) {
            return Some(header.clone());
        }
        self.read_code_header(address)
    }

    /// The fields of a code object's header, read from the copy being read or the process.
    fn read_code_header(&self, address: u64) -> Option<CodeHeader> {
        let o = self.interpreter.offsets.as_ref()?;
        let len = code_header_len(o)?;
        let header = self.read(address, len as usize).ok()?;
        // ob_type: a recycled address or wrong offsets would not point at PyCode_Type.
        if u64_at(&header, 8)? != self.interpreter.code_type {
            return None;
        }
        let name = u64_at(&header, o.code_qualname.unwrap_or(o.code_name))?;
        let filename = u64_at(&header, o.code_filename)?;
        let first_line = u32_at(&header, o.code_firstlineno)?;
        Some(CodeHeader {
            identity: [filename, name, u64::from(first_line)],
            line_table: u64_at(&header, o.code_linetable)?,
        })
    }

    fn read_code(&mut self, header: CodeHeader) -> Option<Code> {
        let [filename, name, first_line] = header.identity;
        let filename = self.string(filename)?;
        let name = self.string(name)?;
        let line_table = self.bytes(header.line_table)?;
        let first_line = u32::try_from(first_line).ok()?;
        self.truncated_names += u64::from(filename.truncated) + u64::from(name.truncated);
        self.truncated_line_tables += u64::from(line_table.truncated);
        Some(Code {
            filename: filename.value,
            name: name.value,
            first_line,
            line_table_truncated: line_table.truncated,
            line_table: line_table.value,
            identity: header.identity,
        })
    }

    /// Names a frame the probes recorded; `None` for an interpreter shim. A frame whose code object cannot be
    /// read is [`UNREADABLE_FRAME`], counted in [`Reader::unreadable_frames`].
    pub fn frame(&mut self, recorded: &PyFrame) -> Option<Frame> {
        let code_start = self.interpreter.offsets.as_ref()?.code_code_adaptive;
        if recorded.code == 0 {
            return None;
        }
        let Some(code) = self.code(recorded.code) else {
            self.unreadable_frames += 1;
            return Some(unreadable_frame());
        };
        let minor = self.interpreter.minor;
        let offset = match minor {
            // f_lasti: a byte offset; -1 before the first instruction.
            8 | 9 => u32::try_from(recorded.instr)
                .ok()
                .filter(|&i| i != u32::MAX),
            // f_lasti counts 2-byte code units.
            10 => u32::try_from(recorded.instr)
                .ok()
                .filter(|&i| i != u32::MAX)
                .and_then(|i| i.checked_mul(2)),
            // A pointer into the code object's own bytecode; before it, a frame that has not started (3.11/3.12
            // point one code unit before the bytecode).
            _ => code_start.and_then(|start| {
                u32::try_from(recorded.instr.checked_sub(recorded.code + start)?).ok()
            }),
        };
        let line = match (offset, Format::for_version(3, minor)) {
            // co_lnotab gives its last line to every offset past its end: past a cut, that would be a guess.
            (Some(offset), Some(Format::Lnotab))
                if code.line_table_truncated && offset >= lnotab_covers(&code.line_table) =>
            {
                None
            }
            (Some(offset), Some(format)) => {
                lines::line_at(format, code.first_line, &code.line_table, offset)
            }
            _ => Some(code.first_line),
        };
        Some(Frame::python(
            code.name.clone(),
            code.filename.clone(),
            line,
        ))
    }
}

/// The bytecode offsets a (cut) `co_lnotab` describes: the sum of its offset increments.
fn lnotab_covers(table: &[u8]) -> u32 {
    table.iter().step_by(2).map(|&b| u32::from(b)).sum()
}

/// Stands for a Python frame whose code object could not be read: a Python frame with no file.
fn unreadable_frame() -> Frame {
    Frame {
        function: Some(UNREADABLE_FRAME.to_owned()),
        module: None,
        offset: None,
        function_offset: 0,
        file: None,
        line: None,
        lang: "python",
        inlined: false,
        source: None,
    }
}

/// Where the interpreter's own C frames are: Python frames replace them in a merged stack.
fn is_eval_loop(frame: &Frame) -> bool {
    frame
        .function
        .as_deref()
        .is_some_and(|f| f.starts_with("_PyEval_EvalFrame") || f == "PyEval_EvalFrameEx")
}

/// Merges Python frames (innermost first) into a native stack (innermost first) where the eval loop runs:
/// native frames above the first eval-loop frame (C code Python called, such as an extension's malloc) stay on
/// top, then the Python frames, then native frames below the last eval-loop frame. Without frame pointers the
/// native stack rarely reaches the eval loop: the Python frames then follow the native ones.
pub fn merge(native: Vec<Frame>, python: Vec<Frame>) -> Vec<Frame> {
    if python.is_empty() {
        return native;
    }
    let first = native.iter().position(is_eval_loop);
    let last = native.iter().rposition(is_eval_loop);
    match (first, last) {
        (Some(first), Some(last)) => {
            let mut merged = native[..first].to_vec();
            merged.extend(python);
            merged.extend_from_slice(&native[last + 1..]);
            merged
        }
        _ => native.into_iter().chain(python).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_common::EventHeader;

    #[test]
    fn versions_come_from_the_file_names_cpython_uses() {
        assert_eq!(
            version_from_name("/usr/bin/python3.11"),
            Some((3, 11, false))
        );
        assert_eq!(
            version_from_name("/usr/local/lib/libpython3.9.so.1.0"),
            Some((3, 9, false))
        );
        assert_eq!(
            version_from_name("/usr/lib/libpython3.13t.so"),
            Some((3, 13, true))
        );
        assert_eq!(version_from_name("/usr/bin/python3"), None);
        assert_eq!(version_from_name("/usr/lib/libc.so.6"), None);
    }

    /// CPython 3.12 objects laid out in this process's own memory, read back through `process_vm_readv` as
    /// alloctrace reads a target's.
    struct FakeObjects {
        o: Offsets,
        /// Keeps every object alive (and 8-byte aligned) while its address is used.
        held: Vec<Vec<u64>>,
    }

    impl FakeObjects {
        fn new() -> Self {
            Self {
                o: Offsets::for_version(3, 12).unwrap(),
                held: Vec::new(),
            }
        }

        /// An object of `size` bytes, filled by `fill`; its address.
        fn object(&mut self, size: u64, fill: impl FnOnce(&mut [u8])) -> u64 {
            let mut words = vec![0u64; size.div_ceil(8) as usize + 1];
            // SAFETY: viewing the words' own bytes, within their length.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8)
            };
            fill(bytes);
            let address = words.as_ptr() as u64;
            self.held.push(words);
            address
        }

        /// A compact `str` of `chars` characters of `width` bytes each.
        fn string(&mut self, chars: &[u32], width: usize) -> u64 {
            let o = self.o;
            let data = if width == 1 {
                o.unicode_ascii_data
            } else {
                o.unicode_compact_data
            };
            let state: u32 = (width as u32) << 2 | 1 << 5 | u32::from(width == 1) << 6;
            self.object(data + (chars.len() * width) as u64, |b| {
                let at = |offset: u64| offset as usize;
                b[at(o.unicode_length)..][..8].copy_from_slice(&(chars.len() as u64).to_ne_bytes());
                b[at(o.unicode_state)..][..4].copy_from_slice(&state.to_ne_bytes());
                for (i, &c) in chars.iter().enumerate() {
                    b[at(data) + i * width..][..width].copy_from_slice(&c.to_ne_bytes()[..width]);
                }
            })
        }

        fn ascii(&mut self, text: &str) -> u64 {
            let chars: Vec<u32> = text.bytes().map(u32::from).collect();
            self.string(&chars, 1)
        }

        fn bytes(&mut self, content: &[u8]) -> u64 {
            let o = self.o;
            self.object(o.bytes_data + content.len() as u64, |b| {
                b[o.bytes_size as usize..][..8]
                    .copy_from_slice(&(content.len() as u64).to_ne_bytes());
                b[o.bytes_data as usize..][..content.len()].copy_from_slice(content);
            })
        }

        /// A code object of type `code_type` named `name`, in `filename`, starting at `first_line`, with a line
        /// table of `line_table_len` bytes.
        fn code(
            &mut self,
            code_type: u64,
            filename: u64,
            name: u64,
            first_line: u32,
            line_table_len: usize,
        ) -> u64 {
            let o = self.o;
            let line_table = self.bytes(&vec![0; line_table_len]);
            self.object(o.code_code_adaptive.unwrap(), |b| {
                let mut put = |offset: u64, value: &[u8]| {
                    b[offset as usize..][..value.len()].copy_from_slice(value)
                };
                put(8, &code_type.to_ne_bytes());
                put(o.code_filename, &filename.to_ne_bytes());
                put(o.code_name, &name.to_ne_bytes());
                put(o.code_qualname.unwrap(), &name.to_ne_bytes());
                put(o.code_firstlineno, &first_line.to_ne_bytes());
                put(o.code_linetable, &line_table.to_ne_bytes());
            })
        }

        /// A reader of this process, as a 3.12 interpreter whose `PyCode_Type` is at `code_type`.
        fn reader(&self, code_type: u64) -> Reader {
            let interpreter = Interpreter {
                info: PythonInfo {
                    version: "3.12".to_owned(),
                    path: "python3.12".to_owned(),
                    unsupported: None,
                },
                minor: 12,
                offsets: Some(self.o),
                runtime: 0,
                code_type,
            };
            Reader::new(std::process::id(), interpreter)
        }
    }

    #[test]
    fn reads_of_process_memory_are_bounded() {
        let buffer = vec![0u8; MAX_READ + 1];
        let at = buffer.as_ptr() as u64;
        assert_eq!(
            read_memory(std::process::id(), at, MAX_READ).unwrap().len(),
            MAX_READ
        );
        let err = read_memory(std::process::id(), at, MAX_READ + 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(read_memory(std::process::id(), at, usize::MAX).is_err());
    }

    #[test]
    fn long_names_are_cut_marked_and_counted() {
        let mut objects = FakeObjects::new();
        let reader = objects.reader(0);
        let short = objects.ascii("etl.py");
        let read = reader.string(short).unwrap();
        assert_eq!((read.value.as_str(), read.truncated), ("etl.py", false));
        let exact = objects.ascii(&"a".repeat(MAX_NAME_BYTES));
        assert!(!reader.string(exact).unwrap().truncated);
        let long = objects.ascii(&"A".repeat(1_200_000));
        let read = reader.string(long).unwrap();
        assert!(read.truncated);
        assert_eq!(
            read.value,
            format!("{}{TRUNCATED_MARK}", "A".repeat(MAX_NAME_BYTES))
        );
        // Two-byte characters: as many bytes, half as many characters.
        let wide = objects.string(&vec![0x3b1; 5000], 2);
        let read = reader.string(wide).unwrap();
        assert_eq!(
            read.value,
            format!("{}{TRUNCATED_MARK}", "α".repeat(MAX_NAME_BYTES / 2))
        );
        let table = objects.bytes(&vec![7; MAX_LINE_TABLE_BYTES + 10]);
        let read = reader.bytes(table).unwrap();
        assert_eq!(
            (read.value.len(), read.truncated),
            (MAX_LINE_TABLE_BYTES, true)
        );
    }

    #[test]
    fn a_frame_with_a_long_file_name_keeps_its_place_and_its_function() {
        let mut objects = FakeObjects::new();
        let code_type = objects.object(8, |_| {});
        let filename = objects.ascii(&"A".repeat(1_200_000));
        let name = objects.ascii("allocate");
        let code = objects.code(code_type, filename, name, 12, 0);
        let mut reader = objects.reader(code_type);
        let frame = reader
            .frame(&PyFrame {
                code,
                instr: 0,
                globals: 0,
            })
            .unwrap();
        assert_eq!(frame.function.as_deref(), Some("allocate"));
        assert_eq!(frame.line, Some(12));
        let file = frame.file.unwrap();
        assert!(
            file.ends_with(TRUNCATED_MARK),
            "{}",
            &file[file.len() - 20..]
        );
        assert_eq!(file.len(), MAX_NAME_BYTES + TRUNCATED_MARK.len());
        assert_eq!(reader.truncated_names(), 1);
        // Named again from the cache: the cut is counted once per code object read.
        reader
            .frame(&PyFrame {
                code,
                instr: 0,
                globals: 0,
            })
            .unwrap();
        assert_eq!(reader.truncated_names(), 1);
        assert_eq!(reader.unreadable_frames(), 0);
    }

    /// What the kernel copies of the object at `address`: its first `len` bytes.
    fn copied(address: u64, len: usize) -> (u64, Vec<u8>) {
        (
            address,
            read_memory(std::process::id(), address, len).unwrap(),
        )
    }

    #[test]
    fn a_code_object_freed_after_its_copy_is_named_from_the_copy() {
        let mut objects = FakeObjects::new();
        let code_type = objects.object(8, |_| {});
        let filename = objects.ascii("/dags/etl.py");
        let name = objects.ascii("<module>");
        let code = objects.code(code_type, filename, name, 3, 0);
        let mut reader = objects.reader(code_type);
        // Each object whole, as the kernel copies them (a string's header is read as a non-ASCII one's).
        let string_len = |text: &str| {
            let o = objects.o;
            (o.unicode_ascii_data as usize + text.len()).max(o.unicode_compact_data as usize)
        };
        let whole = [
            (code, code_header_len(&objects.o).unwrap() as usize),
            (filename, string_len("/dags/etl.py")),
            (name, string_len("<module>")),
        ];
        let copy = CodeCopy {
            header: EventHeader::default(),
            code,
            objects: whole.iter().map(|&(a, len)| copied(a, len)).collect(),
        };
        // Freed before the copy is read, and its memory reused by objects of another kind: named from the copy.
        for (address, len) in whole {
            // SAFETY: the fake objects are at least this long, and held by `objects`.
            unsafe { std::ptr::write_bytes(address as *mut u8, 0xa5, len) };
        }
        reader.remember(&copy);
        let frame = reader
            .frame(&PyFrame {
                code,
                instr: 0,
                globals: 0,
            })
            .unwrap();
        assert_eq!(
            (frame.function.as_deref(), frame.file.as_deref(), frame.line),
            (Some("<module>"), Some("/dags/etl.py"), Some(3))
        );
        assert_eq!(reader.unreadable_frames(), 0);
    }

    #[test]
    fn a_name_longer_than_its_copy_is_cut_and_marked_once_freed() {
        let o = Offsets::for_version(3, 12).unwrap();
        let page = 4096;
        // SAFETY: a fresh anonymous mapping, written only within its length, unmapped below.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(address, libc::MAP_FAILED);
        // SAFETY: the mapping's own bytes.
        let bytes = unsafe { std::slice::from_raw_parts_mut(address.cast::<u8>(), page) };
        let state: u32 = 1 << 2 | 1 << 5 | 1 << 6;
        bytes[o.unicode_length as usize..][..8].copy_from_slice(&1000u64.to_ne_bytes());
        bytes[o.unicode_state as usize..][..4].copy_from_slice(&state.to_ne_bytes());
        bytes[o.unicode_ascii_data as usize..][..1000].fill(b'd');
        let filename = address as u64;
        let mut objects = FakeObjects::new();
        let code_type = objects.object(8, |_| {});
        let name = objects.ascii("<module>");
        let code = objects.code(code_type, filename, name, 1, 0);
        let mut reader = objects.reader(code_type);
        let copy = CodeCopy {
            header: EventHeader::default(),
            code,
            objects: vec![
                copied(code, code_header_len(&o).unwrap() as usize),
                copied(filename, o.unicode_compact_data as usize + 100),
            ],
        };
        // Freed before its copy is read: what the copy holds of it, cut and marked.
        // SAFETY: the mapping made above, no longer used.
        assert_eq!(unsafe { libc::munmap(address, page) }, 0);
        reader.remember(&copy);
        let frame = reader
            .frame(&PyFrame {
                code,
                instr: 0,
                globals: 0,
            })
            .unwrap();
        let cut = "d".repeat(o.unicode_compact_data as usize + 100 - o.unicode_ascii_data as usize);
        assert_eq!(
            (frame.function.as_deref(), frame.file),
            (Some("<module>"), Some(format!("{cut}{TRUNCATED_MARK}")))
        );
        assert_eq!(reader.truncated_names(), 1);
    }

    #[test]
    fn a_frame_that_cannot_be_read_is_a_counted_placeholder() {
        let mut objects = FakeObjects::new();
        let code_type = objects.object(8, |_| {});
        let other_type = objects.object(8, |_| {});
        let name = objects.ascii("f");
        // Not a code object (its type is another), and an address nothing maps.
        let not_code = objects.code(other_type, name, name, 1, 0);
        let mut reader = objects.reader(code_type);
        for code in [not_code, 8] {
            let frame = reader
                .frame(&PyFrame {
                    code,
                    instr: 0,
                    globals: 0,
                })
                .unwrap();
            assert_eq!(frame.function.as_deref(), Some(UNREADABLE_FRAME));
            assert!(frame.is_python() && frame.file.is_none());
        }
        assert_eq!(reader.unreadable_frames(), 2);
        // A shim frame (no code object) is no frame at all.
        assert!(
            reader
                .frame(&PyFrame {
                    code: 0,
                    instr: 0,
                    globals: 0
                })
                .is_none()
        );
    }

    #[test]
    fn a_3_10_f_lasti_too_large_to_double_is_read_as_no_offset() {
        // Found by fuzz/python_reader: f_lasti counts 2-byte code units, and a torn one of 2^31 or more overflowed
        // when doubled. Like -1 (not started), it names the code object's first line.
        let o = Offsets::for_version(3, 10).unwrap();
        let mut objects = FakeObjects {
            o,
            held: Vec::new(),
        };
        let code_type = objects.object(8, |_| {});
        let name = objects.ascii("f");
        let table = objects.bytes(&[]);
        let code = objects.object(o.code_linetable + 8, |b| {
            let mut put = |offset: u64, value: &[u8]| {
                b[offset as usize..][..value.len()].copy_from_slice(value)
            };
            put(8, &code_type.to_ne_bytes());
            put(o.code_filename, &name.to_ne_bytes());
            put(o.code_name, &name.to_ne_bytes());
            put(o.code_firstlineno, &7u32.to_ne_bytes());
            put(o.code_linetable, &table.to_ne_bytes());
        });
        let interpreter = Interpreter::for_fuzzing(10, o, code_type);
        let mut reader = Reader::new(std::process::id(), interpreter);
        let frame = reader
            .frame(&PyFrame {
                code,
                instr: 1 << 31,
                globals: 0,
            })
            .unwrap();
        assert_eq!(
            (frame.function.as_deref(), frame.line),
            (Some("f"), Some(7))
        );
    }

    #[test]
    fn an_lnotab_covers_the_sum_of_its_offset_increments() {
        assert_eq!(lnotab_covers(&[6, 1, 8, 2, 4]), 18);
    }

    #[test]
    fn the_code_cache_is_bounded_and_counts_what_it_evicts() {
        let mut objects = FakeObjects::new();
        let code_type = objects.object(8, |_| {});
        let name = objects.ascii("f");
        let codes: Vec<u64> = (0..40)
            .map(|line| objects.code(code_type, name, name, line, MAX_LINE_TABLE_BYTES))
            .collect();
        let mut reader = objects.reader(code_type);
        for &code in &codes {
            let frame = reader
                .frame(&PyFrame {
                    code,
                    instr: 0,
                    globals: 0,
                })
                .unwrap();
            assert_eq!(frame.function.as_deref(), Some("f"));
            assert!(reader.cached_bytes <= MAX_CACHED_CODE_BYTES);
        }
        // 40 MiB of line tables through a 32 MiB cache: emptied once, when the 32nd did not fit.
        assert_eq!(reader.evicted_codes(), 31);
        assert_eq!(reader.codes.len(), 9);
    }

    fn native(function: &str) -> Frame {
        Frame {
            function_offset: 4,
            ..Frame::native(
                Some(function.to_owned()),
                Some("/usr/bin/python3.11".to_owned()),
                Some(0x10),
            )
        }
    }

    fn python(function: &str, line: u32) -> Frame {
        Frame::python(function.to_owned(), "/app/etl.py".to_owned(), Some(line))
    }

    #[test]
    fn python_frames_replace_the_eval_loop() {
        let merged = merge(
            vec![
                native("PyObject_Malloc"),
                native("_PyEval_EvalFrameDefault"),
                native("_PyEval_EvalFrameDefault"),
                native("main"),
            ],
            vec![python("inner", 42), python("outer", 7)],
        );
        let names: Vec<_> = merged.iter().map(|f| f.function.clone().unwrap()).collect();
        assert_eq!(names, ["PyObject_Malloc", "inner", "outer", "main"]);
    }

    #[test]
    fn without_the_eval_loop_python_frames_follow() {
        let merged = merge(vec![native("PyObject_Malloc")], vec![python("inner", 42)]);
        assert_eq!(merged.len(), 2);
        assert!(merged[1].is_python());
        assert_eq!(merge(vec![native("malloc_site")], vec![]).len(), 1);
    }
}
