//! A traced CPython process, read from outside: which interpreter it runs and where its runtime state is (for
//! the eBPF side to walk its frames), and its code objects, read from its memory with `process_vm_readv`, so
//! that each (code object, position) pair the probes recorded becomes a `file:function:line` frame.
//!
//! The version's offsets are checked against the live process before a frame is trusted: a code object must
//! have the interpreter's own `PyCode_Type` as its type, or its frame is left out of the stack.

use std::{collections::HashMap, io, sync::Arc};

use serde::Serialize;
use tracer_common::{PY_FRAME_READ_MAX, PY_NO_OFFSET, PyFrame, PyProcess};

use super::{
    lines::{self, Format},
    offsets::Offsets,
};
use crate::procs::{Frame, Registry, maps::Mapping, module::Module};

/// Longest string or line table read from a target: code objects are small; a larger length is corruption.
const MAX_READ: usize = 1 << 20;

/// Reads `len` bytes at `addr` in process `pid`.
pub fn read_memory(pid: u32, addr: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: len,
    };
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
    /// What the eBPF side needs to walk this process's frames; `None` when they cannot be read.
    pub fn bpf_config(&self) -> Option<PyProcess> {
        let o = self.offsets.as_ref()?;
        let narrow = |v: u64| u32::try_from(v).unwrap_or(PY_NO_OFFSET);
        Some(PyProcess {
            interpreters_head: self.runtime + o.runtime_interpreters_head,
            interp_threads_head: narrow(o.interp_threads_head),
            tstate_next: narrow(o.tstate_next),
            tstate_thread_id: narrow(o.tstate_thread_id),
            tstate_frame: narrow(o.tstate_frame),
            cframe_current_frame: o.cframe_current_frame.map_or(PY_NO_OFFSET, narrow),
            frame_back: narrow(o.frame_back),
            frame_code: narrow(o.frame_code),
            frame_instr: narrow(o.frame_instr),
            frame_instr_is_pointer: u32::from(o.frame_instr_is_pointer),
            frame_owner: o.frame_owner.map_or(PY_NO_OFFSET, narrow),
            frame_read_size: narrow(frame_read_size(o)?),
            _pad: 0,
        })
    }
}

/// The bytes from a frame's start that cover the fields the eBPF side reads, rounded up to a whole word;
/// `None` when they would not fit its buffer.
fn frame_read_size(o: &Offsets) -> Option<u64> {
    let last_byte = [
        o.frame_back + 8,
        o.frame_code + 8,
        o.frame_instr + 8,
        o.frame_owner.map_or(0, |f| f + 1),
    ]
    .into_iter()
    .max()?;
    let size = last_byte.div_ceil(8) * 8;
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
    filename: String,
    /// The qualified name where the version has one.
    name: String,
    first_line: u32,
    line_table: Vec<u8>,
    /// The addresses of its file and name strings, and its first line: what tells it from a code object
    /// later allocated at the same address.
    identity: [u64; 3],
}

/// What a code object's header says, read on every look-up.
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
}

impl Reader {
    pub fn new(pid: u32, interpreter: Interpreter) -> Self {
        Self {
            pid,
            interpreter,
            codes: HashMap::new(),
        }
    }

    pub fn info(&self) -> &PythonInfo {
        &self.interpreter.info
    }

    pub fn interpreter(&self) -> &Interpreter {
        &self.interpreter
    }

    fn string(&self, object: u64) -> Option<String> {
        let o = self.interpreter.offsets.as_ref()?;
        let header = read_memory(self.pid, object, o.unicode_compact_data as usize).ok()?;
        let length = usize::try_from(u64_at(&header, o.unicode_length)?).ok()?;
        let state = u32_at(&header, o.unicode_state)?;
        let (kind, compact, ascii) = (
            (state >> 2) & 7,
            (state >> 5) & 1 == 1,
            (state >> 6) & 1 == 1,
        );
        if !compact || length > MAX_READ / 4 {
            return None;
        }
        let (data, width) = if ascii {
            (o.unicode_ascii_data, 1)
        } else {
            (o.unicode_compact_data, kind as usize)
        };
        let bytes = read_memory(self.pid, object + data, length * width).ok()?;
        Some(match width {
            1 => bytes.iter().map(|&b| char::from(b)).collect(),
            2 => char::decode_utf16(
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_ne_bytes([c[0], c[1]])),
            )
            .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
            .collect(),
            4 => bytes
                .chunks_exact(4)
                .map(|c| {
                    char::from_u32(u32::from_ne_bytes([c[0], c[1], c[2], c[3]])).unwrap_or('?')
                })
                .collect(),
            _ => return None,
        })
    }

    fn bytes(&self, object: u64) -> Option<Vec<u8>> {
        let o = self.interpreter.offsets.as_ref()?;
        let header = read_memory(self.pid, object, o.bytes_data as usize).ok()?;
        let size = usize::try_from(u64_at(&header, o.bytes_size)?).ok()?;
        if size > MAX_READ {
            return None;
        }
        read_memory(self.pid, object + o.bytes_data, size).ok()
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
        self.codes.insert(address, Arc::clone(&code));
        Some(code)
    }

    /// The fields of a code object's header, if it is one.
    fn code_header(&self, address: u64) -> Option<CodeHeader> {
        let o = self.interpreter.offsets.as_ref()?;
        let fields = [
            o.code_filename,
            o.code_name,
            o.code_qualname.unwrap_or(0),
            o.code_firstlineno,
            o.code_linetable,
        ];
        let len = fields.iter().max().copied().unwrap_or(0) + 8;
        let header = read_memory(self.pid, address, len as usize).ok()?;
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

    fn read_code(&self, header: CodeHeader) -> Option<Code> {
        let [filename, name, first_line] = header.identity;
        Some(Code {
            filename: self.string(filename)?,
            name: self.string(name)?,
            first_line: u32::try_from(first_line).ok()?,
            line_table: self.bytes(header.line_table)?,
            identity: header.identity,
        })
    }

    /// Names a frame the probes recorded; `None` for an interpreter shim or a code object that cannot be read.
    pub fn frame(&mut self, recorded: &PyFrame) -> Option<Frame> {
        let code_start = self.interpreter.offsets.as_ref()?.code_code_adaptive;
        if recorded.code == 0 {
            return None;
        }
        let code = self.code(recorded.code)?;
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
                .map(|i| i * 2),
            // A pointer into the code object's own bytecode; before it, a frame that has not started (3.11/3.12
            // point one code unit before the bytecode).
            _ => code_start.and_then(|start| {
                u32::try_from(recorded.instr.checked_sub(recorded.code + start)?).ok()
            }),
        };
        let line = match (offset, Format::for_version(3, minor)) {
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

    fn native(function: &str) -> Frame {
        Frame {
            function: Some(function.to_owned()),
            module: Some("/usr/bin/python3.11".to_owned()),
            offset: Some(0x10),
            function_offset: 4,
            file: None,
            line: None,
            lang: "native",
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
