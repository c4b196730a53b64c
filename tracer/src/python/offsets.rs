//! Offsets of CPython's internal structures, per version: where the tracer finds a thread's frames, a frame's
//! code object and position, a code object's names and line table, and the characters of a `str` or `bytes`,
//! reading another process's memory. x86-64 (LP64: pointers, `long` and `Py_ssize_t` are 8 bytes) and default
//! builds with the GIL only; free-threaded builds (3.13t) lay out objects and frames differently and are refused.
//!
//! 3.8–3.12 come from tables ([`Offsets::for_version`]) whose numbers are the `offsetof`/`sizeof` of these
//! headers, as installed with each interpreter (`include/python3.X/...`):
//!
//! | structure | 3.8 | 3.9, 3.10 | 3.11, 3.12 |
//! |---|---|---|---|
//! | `_PyRuntimeState` | `internal/pycore_pystate.h` | `internal/pycore_runtime.h` | same |
//! | `PyInterpreterState` (`struct _is`) | `internal/pycore_pystate.h` | `internal/pycore_interp.h` | same |
//! | `PyThreadState` (`struct _ts`), `_PyCFrame` | `cpython/pystate.h` | same | same |
//! | frame | `PyFrameObject`, `frameobject.h` | `cpython/frameobject.h` | `_PyInterpreterFrame`, `internal/pycore_frame.h` |
//! | `PyCodeObject` | `code.h` | `cpython/code.h` | same |
//! | `PyASCIIObject`, `PyCompactUnicodeObject` | `cpython/unicodeobject.h` | same | same |
//! | `PyBytesObject` | `bytesobject.h` | `cpython/bytesobject.h` | same |
//!
//! 3.13 publishes its own offsets in `_Py_DebugOffsets`, the first member of `_PyRuntime` (declared in
//! `internal/pycore_runtime.h`, filled by `_Py_DebugOffsets_INIT` in `internal/pycore_runtime_init.h`), read by
//! [`Offsets::from_debug_offsets`]. One number is not published there and is derived from 3.13's headers:
//! `PyCompactUnicodeObject` is `PyASCIIObject` plus `utf8_length` and `utf8` (16 bytes; `cpython/unicodeobject.h`), which must agree with the
//! published `sizeof(PyUnicodeObject)` less its 8-byte data pointer. 3.14 inserted members into the middle of
//! `_Py_DebugOffsets` (`interpreter_state.threads_main`, ...), so only 3.13's layout is accepted.
//!
//! For reading strings: the `state` bit-fields are, from the low bit, `interned:2`, `kind:3` (1, 2 or 4 bytes per
//! character), `compact:1`, `ascii:1`, the same in 3.8–3.13. Compact ASCII strings keep their characters at
//! [`Offsets::unicode_ascii_data`], other compact strings at [`Offsets::unicode_compact_data`]; code objects'
//! names and file names are always compact. Both kinds of data end with a NUL character.
//!
//! Every number is proven against the interpreters themselves: `test_data/python/offsets_check.py` runs inside
//! each one and compares what it reads at each offset (through `/proc/self/mem`) with what the interpreter's own
//! API reports — the thread list and its thread ids, the whole frame chain of this thread and of a parked one
//! against `sys._getframe()` / `sys._current_frames()` including every suspended frame's `f_lasti`, generator and
//! shim frame owners, a subinterpreter at the head of the interpreter list, code object fields, `co_code_adaptive`,
//! strings of each kind and bytes. On 3.13 it also parses `_Py_DebugOffsets` itself and compares. The tests below
//! run it for every version, and against a fixture of 3.13's `_Py_DebugOffsets`.

use serde::Serialize;

/// Where things are in one CPython version's structures (byte offsets).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Offsets {
    // _PyRuntimeState
    /// `_PyRuntime.interpreters.head`: the newest interpreter (the main one unless subinterpreters exist).
    pub runtime_interpreters_head: u64,
    // PyInterpreterState
    /// `tstate_head` (≤3.10) / `threads.head` (3.11+): the newest thread state.
    pub interp_threads_head: u64,
    // PyThreadState
    /// `next`: the next (older) thread state of the same interpreter.
    pub tstate_next: u64,
    /// `interp`: the interpreter the thread state belongs to.
    pub tstate_interp: u64,
    /// `thread_id`: the `pthread_self()` of the thread (an `unsigned long`).
    pub tstate_thread_id: u64,
    /// 3.8–3.10: `frame` (`PyFrameObject *`); 3.11/3.12: `cframe` (`_PyCFrame *`, follow it with
    /// [`Offsets::cframe_current_frame`]); 3.13: `current_frame` (`_PyInterpreterFrame *`).
    pub tstate_frame: u64,
    /// 3.11/3.12 only: `_PyCFrame.current_frame`, the top `_PyInterpreterFrame`.
    pub cframe_current_frame: Option<u64>,
    // The frame: PyFrameObject (≤3.10), _PyInterpreterFrame (3.11+)
    /// `f_back` (≤3.10) / `previous` (3.11+): the calling frame, NULL at the bottom.
    pub frame_back: u64,
    /// `f_code` (≤3.12) / `f_executable` (3.13, a code object or, in a shim frame, `None`).
    pub frame_code: u64,
    /// The frame's globals (`f_globals`): with the code object, what tells a module's frames from another
    /// module's whose code object was later made at the same address (a module's is freed once imported).
    /// `None` where the interpreter does not publish it (3.13's `_Py_DebugOffsets`) and the layout is not the
    /// known one.
    pub frame_globals: Option<u64>,
    /// ≤3.10: `f_lasti`, an `int`: a byte offset into `co_code` in 3.8/3.9, an instruction (2-byte code unit)
    /// index in 3.10, -1 before the first instruction. 3.11/3.12: `prev_instr`, a pointer to the code unit before
    /// the next instruction (possibly an inline cache entry, or one unit before `co_code_adaptive` in a frame that
    /// has not started). 3.13: `instr_ptr`, the instruction executing or about to.
    pub frame_instr: u64,
    /// Whether [`Offsets::frame_instr`] holds a pointer into `co_code_adaptive` (3.11+) rather than an `int`.
    pub frame_instr_is_pointer: bool,
    /// 3.11+: the `owner` char. 3.12+ put a shim frame with owner 3 (`FRAME_OWNED_BY_CSTACK`) at each entry from
    /// C into the interpreter: it is no Python function (3.12's has a real code object, 3.13's has `None`) and is
    /// skipped. 3.11 has no shim frames and never uses 3.
    pub frame_owner: Option<u64>,
    // PyCodeObject
    /// `co_filename` (`str`).
    pub code_filename: u64,
    /// `co_name` (`str`).
    pub code_name: u64,
    /// 3.11+: `co_qualname` (`str`).
    pub code_qualname: Option<u64>,
    /// `co_firstlineno` (`int`).
    pub code_firstlineno: u64,
    /// `co_lnotab` (≤3.9) / `co_linetable` (3.10+): a `bytes` object, in that version's format.
    pub code_linetable: u64,
    /// 3.11+: `co_code_adaptive`, the bytecode inside the code object, where the frames' instruction pointers
    /// point.
    pub code_code_adaptive: Option<u64>,
    // str and bytes objects
    /// `PyASCIIObject.state`: the bit-fields described in the module documentation.
    pub unicode_state: u64,
    /// `sizeof(PyASCIIObject)`: where the characters of a compact ASCII string start.
    pub unicode_ascii_data: u64,
    /// `sizeof(PyCompactUnicodeObject)`: where the characters of a compact non-ASCII string start.
    pub unicode_compact_data: u64,
    /// `PyASCIIObject.length`: the number of characters (`Py_ssize_t`).
    pub unicode_length: u64,
    /// `PyBytesObject.ob_base.ob_size`: the number of bytes (`Py_ssize_t`).
    pub bytes_size: u64,
    /// `PyBytesObject.ob_sval`: the bytes, followed by a NUL.
    pub bytes_data: u64,
}

/// 3.8 and 3.9 have the same layout for everything read here.
const PY3_8_AND_3_9: Offsets = Offsets {
    runtime_interpreters_head: 32,
    interp_threads_head: 8,
    tstate_next: 8,
    tstate_interp: 16,
    tstate_thread_id: 176,
    tstate_frame: 24,
    cframe_current_frame: None,
    frame_back: 24,
    frame_code: 32,
    frame_globals: Some(48),
    frame_instr: 104,
    frame_instr_is_pointer: false,
    frame_owner: None,
    code_filename: 104,
    code_name: 112,
    code_qualname: None,
    code_firstlineno: 40,
    code_linetable: 120,
    code_code_adaptive: None,
    unicode_state: 32,
    unicode_ascii_data: 48,
    unicode_compact_data: 72,
    unicode_length: 16,
    bytes_size: 16,
    bytes_data: 32,
};

/// 3.10 dropped `PyFrameObject.f_stacktop` and friends, which moved `f_lasti`; `co_linetable` (a new format)
/// took `co_lnotab`'s place.
const PY3_10: Offsets = Offsets {
    frame_instr: 96,
    ..PY3_8_AND_3_9
};

/// 3.11: frames became `_PyInterpreterFrame`s reached through `tstate->cframe`, `_PyRuntimeState` gained
/// `_initialized` before `interpreters`, and the code object was reorganised around `co_code_adaptive`.
const PY3_11: Offsets = Offsets {
    runtime_interpreters_head: 40,
    interp_threads_head: 16,
    tstate_next: 8,
    tstate_interp: 16,
    tstate_thread_id: 152,
    tstate_frame: 56,
    cframe_current_frame: Some(8),
    frame_back: 48,
    frame_code: 32,
    frame_globals: Some(8),
    frame_instr: 56,
    frame_instr_is_pointer: true,
    frame_owner: Some(69),
    code_filename: 112,
    code_name: 120,
    code_qualname: Some(128),
    code_firstlineno: 72,
    code_linetable: 136,
    code_code_adaptive: Some(184),
    unicode_state: 32,
    unicode_ascii_data: 48,
    unicode_compact_data: 72,
    unicode_length: 16,
    bytes_size: 16,
    bytes_data: 32,
};

/// 3.12: `PyInterpreterState` starts with its eval state, `_PyCFrame` lost `use_tracing`, `_PyInterpreterFrame`
/// put `f_code` and `previous` first and gained `return_offset`, and `PyASCIIObject` lost `wstr`.
const PY3_12: Offsets = Offsets {
    runtime_interpreters_head: 40,
    interp_threads_head: 72,
    tstate_next: 8,
    tstate_interp: 16,
    tstate_thread_id: 136,
    tstate_frame: 56,
    cframe_current_frame: Some(0),
    frame_back: 8,
    frame_code: 0,
    frame_globals: Some(24),
    frame_instr: 56,
    frame_instr_is_pointer: true,
    frame_owner: Some(70),
    code_filename: 112,
    code_name: 120,
    code_qualname: Some(128),
    code_firstlineno: 68,
    code_linetable: 136,
    code_code_adaptive: Some(192),
    unicode_state: 32,
    unicode_ascii_data: 40,
    unicode_compact_data: 56,
    unicode_length: 16,
    bytes_size: 16,
    bytes_data: 32,
};

/// `_PyInterpreterFrame.f_globals` in 3.13's layout: after `f_executable`, `previous` and `f_funcobj`.
const KNOWN_3_13_FRAME_GLOBALS: u64 = 24;

/// Why a `_Py_DebugOffsets` cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum OffsetsError {
    #[error(
        "_Py_DebugOffsets takes {} bytes, got {len}",
        Offsets::DEBUG_OFFSETS_SIZE
    )]
    Truncated { len: usize },
    #[error("no _Py_DebugOffsets: _PyRuntime starts with {0:?}, not the cookie \"xdebugpy\"")]
    NoCookie([u8; 8]),
    #[error("CPython {major}.{minor}: only 3.13's _Py_DebugOffsets layout is known")]
    UnsupportedVersion { major: u8, minor: u8 },
    #[error(
        "free-threaded CPython is not supported: its objects and frames are laid out otherwise"
    )]
    FreeThreaded,
    #[error("_Py_DebugOffsets puts {field} at {offset}, outside its {size}-byte structure")]
    Implausible {
        field: &'static str,
        offset: u64,
        size: u64,
    },
}

/// `_Py_DebugOffsets` as 3.13 declares it, in 8-byte words: the cookie, then `uint64_t` members in
/// declaration order. Only the members read here are named; a structure's `size` comes first in its group.
mod word {
    pub const VERSION: usize = 1;
    pub const FREE_THREADED: usize = 2;
    pub const RUNTIME_SIZE: usize = 3;
    pub const RUNTIME_INTERPRETERS_HEAD: usize = 5;
    pub const INTERP_SIZE: usize = 6;
    pub const INTERP_THREADS_HEAD: usize = 9;
    pub const TSTATE_SIZE: usize = 19;
    pub const TSTATE_NEXT: usize = 21;
    pub const TSTATE_INTERP: usize = 22;
    pub const TSTATE_CURRENT_FRAME: usize = 23;
    pub const TSTATE_THREAD_ID: usize = 24;
    pub const FRAME_SIZE: usize = 28;
    pub const FRAME_PREVIOUS: usize = 29;
    pub const FRAME_EXECUTABLE: usize = 30;
    pub const FRAME_INSTR_PTR: usize = 31;
    pub const FRAME_OWNER: usize = 33;
    pub const CODE_SIZE: usize = 34;
    pub const CODE_FILENAME: usize = 35;
    pub const CODE_NAME: usize = 36;
    pub const CODE_QUALNAME: usize = 37;
    pub const CODE_LINETABLE: usize = 38;
    pub const CODE_FIRSTLINENO: usize = 39;
    pub const CODE_CO_CODE_ADAPTIVE: usize = 43;
    pub const BYTES_SIZE: usize = 64;
    pub const BYTES_OB_SIZE: usize = 65;
    pub const BYTES_OB_SVAL: usize = 66;
    pub const UNICODE_SIZE: usize = 67;
    pub const UNICODE_STATE: usize = 68;
    pub const UNICODE_LENGTH: usize = 69;
    pub const UNICODE_ASCIIOBJECT_SIZE: usize = 70;
    /// Every member, up to the last (`gc.collecting`).
    pub const COUNT: usize = 73;
}

/// `PyCompactUnicodeObject` adds `Py_ssize_t utf8_length` and `char *utf8` to `PyASCIIObject` (3.12+).
const COMPACT_UNICODE_EXTRA: u64 = 16;
/// `PyUnicodeObject` adds the `data` union (a pointer) to `PyCompactUnicodeObject`.
const UNICODE_DATA_POINTER: u64 = 8;

impl Offsets {
    /// How many bytes of `_PyRuntime` [`Offsets::from_debug_offsets`] reads: the whole of 3.13's
    /// `_Py_DebugOffsets`.
    pub const DEBUG_OFFSETS_SIZE: usize = word::COUNT * 8;

    /// The table for CPython `major.minor`, 3.8 to 3.12; `None` for other versions (3.13 publishes its offsets:
    /// see [`Offsets::from_debug_offsets`]).
    pub fn for_version(major: u8, minor: u8) -> Option<Self> {
        match (major, minor) {
            (3, 8 | 9) => Some(PY3_8_AND_3_9),
            (3, 10) => Some(PY3_10),
            (3, 11) => Some(PY3_11),
            (3, 12) => Some(PY3_12),
            _ => None,
        }
    }

    /// The offsets a 3.13 interpreter publishes in the `_Py_DebugOffsets` at the start of its `_PyRuntime`
    /// (`debug` holds its first [`Offsets::DEBUG_OFFSETS_SIZE`] bytes, as read from the process). Refuses other versions, whose layout
    /// differs, free-threaded builds, and offsets that fall outside the structure sizes published beside them.
    pub fn from_debug_offsets(debug: &[u8]) -> Result<Self, OffsetsError> {
        let Some(debug) = debug.get(..Self::DEBUG_OFFSETS_SIZE) else {
            return Err(OffsetsError::Truncated { len: debug.len() });
        };
        let words: Vec<u64> = debug
            .chunks_exact(8)
            .map(|chunk| u64::from_le_bytes(chunk.try_into().expect("chunks of 8 bytes")))
            .collect();
        let cookie: [u8; 8] = debug[..8].try_into().expect("8 bytes");
        if &cookie != b"xdebugpy" {
            return Err(OffsetsError::NoCookie(cookie));
        }
        // PY_VERSION_HEX: major, minor, micro, release level and serial, a byte or less each.
        let version = words[word::VERSION];
        let (major, minor) = ((version >> 24) as u8, (version >> 16) as u8);
        if (major, minor) != (3, 13) {
            return Err(OffsetsError::UnsupportedVersion { major, minor });
        }
        if words[word::FREE_THREADED] != 0 {
            return Err(OffsetsError::FreeThreaded);
        }
        // A member read at `index`, checked to lie inside the structure whose size is at `size`.
        let inside = |field: &'static str, index: usize, size: usize| {
            let (offset, size) = (words[index], words[size]);
            if offset < size {
                Ok(offset)
            } else {
                Err(OffsetsError::Implausible {
                    field,
                    offset,
                    size,
                })
            }
        };
        let tstate = |field, index| inside(field, index, word::TSTATE_SIZE);
        let frame = |field, index| inside(field, index, word::FRAME_SIZE);
        let code = |field, index| inside(field, index, word::CODE_SIZE);
        let bytes = |field, index| inside(field, index, word::BYTES_SIZE);
        let unicode = |field, index| inside(field, index, word::UNICODE_SIZE);

        let unicode_ascii_data = unicode("sizeof(PyASCIIObject)", word::UNICODE_ASCIIOBJECT_SIZE)?;
        let unicode_compact_data = unicode_ascii_data.saturating_add(COMPACT_UNICODE_EXTRA);
        // The derived size must leave exactly PyUnicodeObject's data pointer before the published size.
        if unicode_compact_data.checked_add(UNICODE_DATA_POINTER) != Some(words[word::UNICODE_SIZE])
        {
            return Err(OffsetsError::Implausible {
                field: "sizeof(PyCompactUnicodeObject)",
                offset: unicode_compact_data,
                size: words[word::UNICODE_SIZE],
            });
        }
        let frame_back = frame("previous", word::FRAME_PREVIOUS)?;
        let frame_code = frame("f_executable", word::FRAME_EXECUTABLE)?;
        let frame_instr = frame("instr_ptr", word::FRAME_INSTR_PTR)?;
        // Not published: 3.13's `f_globals` follows `f_executable`, `previous` and `f_funcobj`, which only the
        // known layout (the published fields where 3.13.0 has them) is trusted to say.
        let frame_globals = ((frame_code, frame_back, frame_instr) == (0, 8, 56))
            .then_some(KNOWN_3_13_FRAME_GLOBALS);
        Ok(Self {
            runtime_interpreters_head: inside(
                "interpreters.head",
                word::RUNTIME_INTERPRETERS_HEAD,
                word::RUNTIME_SIZE,
            )?,
            interp_threads_head: inside(
                "threads.head",
                word::INTERP_THREADS_HEAD,
                word::INTERP_SIZE,
            )?,
            tstate_next: tstate("PyThreadState.next", word::TSTATE_NEXT)?,
            tstate_interp: tstate("PyThreadState.interp", word::TSTATE_INTERP)?,
            tstate_thread_id: tstate("PyThreadState.thread_id", word::TSTATE_THREAD_ID)?,
            tstate_frame: tstate("PyThreadState.current_frame", word::TSTATE_CURRENT_FRAME)?,
            cframe_current_frame: None,
            frame_back,
            frame_code,
            frame_globals,
            frame_instr,
            frame_instr_is_pointer: true,
            frame_owner: Some(frame("owner", word::FRAME_OWNER)?),
            code_filename: code("co_filename", word::CODE_FILENAME)?,
            code_name: code("co_name", word::CODE_NAME)?,
            code_qualname: Some(code("co_qualname", word::CODE_QUALNAME)?),
            code_firstlineno: code("co_firstlineno", word::CODE_FIRSTLINENO)?,
            code_linetable: code("co_linetable", word::CODE_LINETABLE)?,
            code_code_adaptive: Some(code("co_code_adaptive", word::CODE_CO_CODE_ADAPTIVE)?),
            unicode_state: unicode("state", word::UNICODE_STATE)?,
            unicode_ascii_data,
            unicode_compact_data,
            unicode_length: unicode("length", word::UNICODE_LENGTH)?,
            bytes_size: bytes("ob_size", word::BYTES_OB_SIZE)?,
            bytes_data: bytes("ob_sval", word::BYTES_OB_SVAL)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first 584 bytes of 3.13.0's `_PyRuntime` (pyenv build), written by
    /// `offsets_check.py --dump-debug-offsets`.
    const DEBUG_OFFSETS_3_13: &[u8] =
        include_bytes!("../../test_data/python/offsets-debug-3.13.bin");

    /// What 3.13.0's `_Py_DebugOffsets` says, as `offsets_check.py` verified it on the live interpreter (and as
    /// `offsetof` over its headers gives).
    const EXPECTED_3_13: Offsets = Offsets {
        runtime_interpreters_head: 632,
        interp_threads_head: 7344,
        tstate_next: 8,
        tstate_interp: 16,
        tstate_thread_id: 152,
        tstate_frame: 72,
        cframe_current_frame: None,
        frame_back: 8,
        frame_code: 0,
        frame_globals: Some(24),
        frame_instr: 56,
        frame_instr_is_pointer: true,
        frame_owner: Some(70),
        code_filename: 112,
        code_name: 120,
        code_qualname: Some(128),
        code_firstlineno: 68,
        code_linetable: 136,
        code_code_adaptive: Some(200),
        unicode_state: 32,
        unicode_ascii_data: 40,
        unicode_compact_data: 56,
        unicode_length: 16,
        bytes_size: 16,
        bytes_data: 32,
    };

    #[test]
    fn no_table_outside_3_8_to_3_12() {
        for (major, minor) in [(2, 7), (3, 7), (3, 13), (4, 8)] {
            assert_eq!(Offsets::for_version(major, minor), None, "{major}.{minor}");
        }
    }

    #[test]
    fn debug_offsets_fixture_parses_to_the_verified_values() {
        assert_eq!(
            Offsets::from_debug_offsets(DEBUG_OFFSETS_3_13),
            Ok(EXPECTED_3_13)
        );
    }

    /// The fixture with word `index` replaced by `value`.
    fn doctored(index: usize, value: u64) -> Vec<u8> {
        let mut debug = DEBUG_OFFSETS_3_13.to_vec();
        debug[index * 8..][..8].copy_from_slice(&value.to_le_bytes());
        debug
    }

    #[test]
    fn debug_offsets_of_a_free_threaded_build_are_refused() {
        assert_eq!(
            Offsets::from_debug_offsets(&doctored(word::FREE_THREADED, 1)),
            Err(OffsetsError::FreeThreaded)
        );
    }

    #[test]
    fn debug_offsets_of_other_versions_are_refused() {
        // 3.14.0 final and 3.12.0 final, as PY_VERSION_HEX.
        for (version, minor) in [(0x030e_00f0, 14), (0x030c_00f0, 12)] {
            assert_eq!(
                Offsets::from_debug_offsets(&doctored(word::VERSION, version)),
                Err(OffsetsError::UnsupportedVersion { major: 3, minor })
            );
        }
    }

    #[test]
    fn debug_offsets_without_cookie_or_truncated_are_refused() {
        let mut debug = DEBUG_OFFSETS_3_13.to_vec();
        debug[..8].copy_from_slice(b"notdebug");
        assert_eq!(
            Offsets::from_debug_offsets(&debug),
            Err(OffsetsError::NoCookie(*b"notdebug"))
        );
        let len = Offsets::DEBUG_OFFSETS_SIZE - 1;
        assert_eq!(
            Offsets::from_debug_offsets(&DEBUG_OFFSETS_3_13[..len]),
            Err(OffsetsError::Truncated { len })
        );
    }

    #[test]
    fn debug_offsets_outside_their_structure_are_refused() {
        // sizeof(_PyInterpreterFrame) is 80 in 3.13.
        assert_eq!(
            Offsets::from_debug_offsets(&doctored(word::FRAME_OWNER, 4096)),
            Err(OffsetsError::Implausible {
                field: "owner",
                offset: 4096,
                size: 80,
            })
        );
        // PyUnicodeObject no longer 8 bytes longer than the derived PyCompactUnicodeObject.
        assert!(matches!(
            Offsets::from_debug_offsets(&doctored(word::UNICODE_SIZE, 72)),
            Err(OffsetsError::Implausible {
                field: "sizeof(PyCompactUnicodeObject)",
                ..
            })
        ));
        // Found by fuzz/python_debug_offsets: sizes near u64::MAX overflowed the derived one.
        let mut debug = doctored(word::UNICODE_SIZE, u64::MAX);
        debug[word::UNICODE_ASCIIOBJECT_SIZE * 8..][..8]
            .copy_from_slice(&(u64::MAX - 9).to_le_bytes());
        assert!(matches!(
            Offsets::from_debug_offsets(&debug),
            Err(OffsetsError::Implausible {
                field: "sizeof(PyCompactUnicodeObject)",
                ..
            })
        ));
    }
}
