//! Ring-buffer records (bytes written by `tracer-ebpf`) into [`Event`]s.

use std::mem::offset_of;

use tracer_common::{
    ALLOC_BY_ALLOCATOR, AllocEvent, AllocFn, CodeEvent, EventHeader, EventKind, ExecEvent,
    FaultEvent, ForkEvent, FreeEvent, LibraryMappedEvent, MAX_PY_FRAMES, MAX_STACK_DEPTH, OomEvent,
    PyFrame, PyStatus, StackEvent, StackWindowEvent, UserRegs,
};

/// One decoded record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Alloc {
        header: EventHeader,
        func: AllocFn,
        addr: u64,
        size: u64,
        stack_id: u64,
        /// A `brk` made inside an allocator call.
        by_allocator: bool,
    },
    Free {
        header: EventHeader,
        func: AllocFn,
        addr: u64,
        /// Length of an unmapped range; 0 for heap blocks.
        size: u64,
    },
    Stack {
        header: EventHeader,
        stack_id: u64,
        frames: Vec<u64>,
        /// `frames[1]` is a guess at the caller of a system call's libc wrapper.
        guessed_caller: bool,
        /// The Python frames, innermost first, when the process is a traced CPython.
        python: PythonStack,
    },
    Exec {
        header: EventHeader,
        /// Stopped before its new image ran: to be continued once attached.
        held: bool,
    },
    /// A process whose interpreter is looked for mapped a library, and is stopped until userspace has looked.
    LibraryMapped {
        header: EventHeader,
        held: bool,
    },
    Fork {
        header: EventHeader,
        parent_pid: u32,
        child_pid: u32,
        /// Stopped before its first instruction: to be continued once attached.
        held: bool,
    },
    /// The user stack at a mapping system call, to unwind in userspace: see [`StackWindow`].
    StackWindow(Box<StackWindow>),
    /// A code object of a new Python stack and the objects that name it, copied as they were then.
    Code(Box<CodeCopy>),
    Oom(OomEvent),
    /// A sampled write fault (the watch tier): the page of `addr` was made resident by stack `stack_id`, and
    /// stands for `weight` such faults.
    Fault {
        header: EventHeader,
        addr: u64,
        stack_id: u64,
        weight: u32,
    },
}

/// A code object of a new Python stack, with its file name, its name and its line table, each copied from the
/// object's start (see `tracer_common::CodeEvent`): `(address, bytes)`, none empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeCopy {
    pub header: EventHeader,
    /// The code object's address.
    pub code: u64,
    pub objects: Vec<(u64, Vec<u8>)>,
}

/// A window of the user stack at a mapping system call made outside the allocator, sent just before that
/// call's [`Event::Alloc`] by the same thread, which carries `stack_id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackWindow {
    pub header: EventHeader,
    /// The kernel's id of the stack below, which the allocation record that follows carries.
    pub stack_id: u64,
    /// The stack as the kernel took it: the frame-pointer walk, innermost first.
    pub frames: Vec<u64>,
    /// As in [`Event::Stack`]: `frames[1]` is the word on top of the stack.
    pub guessed_caller: bool,
    pub python: PythonStack,
    pub regs: UserRegs,
    /// The user stack from `regs.sp` up.
    pub bytes: Vec<u8>,
}

/// The Python side of a stack record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PythonStack {
    pub status: PyStatus,
    /// Innermost first; a frame with code 0 is an interpreter shim, to skip.
    pub frames: Vec<PyFrame>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than its {kind:?} layout")]
    Short { kind: Option<EventKind>, len: usize },
    #[error("unknown record kind {0}")]
    UnknownKind(u32),
    #[error("unknown allocator function {0}")]
    UnknownFunction(u32),
    #[error("unknown Python stack status {0}")]
    UnknownPyStatus(u32),
}

/// Reads a `T` from the front of `bytes`, which the ring buffer does not align.
fn read<T: bytemuck::Pod>(bytes: &[u8], kind: Option<EventKind>) -> Result<T, DecodeError> {
    let record = bytes.get(..size_of::<T>()).ok_or(DecodeError::Short {
        kind,
        len: bytes.len(),
    })?;
    Ok(bytemuck::pod_read_unaligned(record))
}

fn func(value: u32) -> Result<AllocFn, DecodeError> {
    AllocFn::try_from(value).map_err(|_| DecodeError::UnknownFunction(value))
}

/// The native frames and the Python side of a stack record.
fn stack_parts(e: &StackEvent) -> Result<(Vec<u64>, PythonStack), DecodeError> {
    let depth = (e.depth as usize).min(MAX_STACK_DEPTH);
    let py_depth = (e.py_depth as usize).min(MAX_PY_FRAMES);
    let python = PythonStack {
        status: PyStatus::try_from(e.py_status)
            .map_err(|_| DecodeError::UnknownPyStatus(e.py_status))?,
        frames: e.py_frames[..py_depth].to_vec(),
    };
    Ok((e.frames[..depth].to_vec(), python))
}

impl TryFrom<&[u8]> for Event {
    type Error = DecodeError;

    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        let header: EventHeader = read(bytes, None)?;
        let kind =
            EventKind::try_from(header.kind).map_err(|_| DecodeError::UnknownKind(header.kind))?;
        Ok(match kind {
            EventKind::Alloc => {
                let e: AllocEvent = read(bytes, Some(kind))?;
                Self::Alloc {
                    header,
                    func: func(e.func)?,
                    addr: e.addr,
                    size: e.size,
                    stack_id: e.stack_id,
                    by_allocator: e.flags & ALLOC_BY_ALLOCATOR != 0,
                }
            }
            EventKind::Free => {
                let e: FreeEvent = read(bytes, Some(kind))?;
                Self::Free {
                    header,
                    func: func(e.func)?,
                    addr: e.addr,
                    size: e.size,
                }
            }
            EventKind::Stack => {
                let e: StackEvent = read(bytes, Some(kind))?;
                let (frames, python) = stack_parts(&e)?;
                Self::Stack {
                    header,
                    stack_id: e.stack_id,
                    frames,
                    guessed_caller: e.guessed_caller != 0,
                    python,
                }
            }
            EventKind::StackWindow => {
                // Too large to copy onto the stack whole: read in its parts.
                if bytes.len() < size_of::<StackWindowEvent>() {
                    return Err(DecodeError::Short {
                        kind: Some(kind),
                        len: bytes.len(),
                    });
                }
                let stack: StackEvent = read(bytes, Some(kind))?;
                let (frames, python) = stack_parts(&stack)?;
                let regs: UserRegs =
                    read(&bytes[offset_of!(StackWindowEvent, regs)..], Some(kind))?;
                let len: u32 = read(&bytes[offset_of!(StackWindowEvent, len)..], Some(kind))?;
                let window =
                    &bytes[offset_of!(StackWindowEvent, bytes)..size_of::<StackWindowEvent>()];
                Self::StackWindow(Box::new(StackWindow {
                    header,
                    stack_id: stack.stack_id,
                    frames,
                    guessed_caller: stack.guessed_caller != 0,
                    python,
                    regs,
                    bytes: window[..(len as usize).min(window.len())].to_vec(),
                }))
            }
            EventKind::Exec => {
                let e: ExecEvent = read(bytes, Some(kind))?;
                Self::Exec {
                    header,
                    held: e.held != 0,
                }
            }
            EventKind::Code => {
                let e: CodeEvent = read(bytes, Some(kind))?;
                let copied = |addr: u64, bytes: &[u8], len: u32| {
                    let len = (len as usize).min(bytes.len());
                    (addr != 0 && len > 0).then(|| (addr, bytes[..len].to_vec()))
                };
                Self::Code(Box::new(CodeCopy {
                    header,
                    code: e.code,
                    objects: [
                        copied(e.code, &e.code_bytes, e.code_len),
                        copied(e.filename, &e.filename_bytes, e.filename_len),
                        copied(e.name, &e.name_bytes, e.name_len),
                        copied(e.line_table, &e.line_table_bytes, e.line_table_len),
                    ]
                    .into_iter()
                    .flatten()
                    .collect(),
                }))
            }
            EventKind::LibraryMapped => {
                let e: LibraryMappedEvent = read(bytes, Some(kind))?;
                Self::LibraryMapped {
                    header,
                    held: e.held != 0,
                }
            }
            EventKind::Oom => Self::Oom(read(bytes, Some(kind))?),
            EventKind::Fault => {
                let e: FaultEvent = read(bytes, Some(kind))?;
                Self::Fault {
                    header,
                    addr: e.addr,
                    stack_id: e.stack_id,
                    weight: e.weight,
                }
            }
            EventKind::Fork => {
                let e: ForkEvent = read(bytes, Some(kind))?;
                Self::Fork {
                    header,
                    parent_pid: e.parent_pid,
                    child_pid: e.child_pid,
                    held: e.held != 0,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use bytemuck::bytes_of;

    use super::*;

    fn header(kind: EventKind) -> EventHeader {
        EventHeader {
            kind: kind as u32,
            pid: 4242,
            tid: 4243,
            _pad: 0,
            ts_ns: 123_456_789,
            cgroup_id: 77,
        }
    }

    #[test]
    fn alloc_round_trips() {
        let record = AllocEvent {
            header: header(EventKind::Alloc),
            func: AllocFn::Calloc as u32,
            flags: 0,
            addr: 0x5555_0000_1000,
            size: 4096,
            stack_id: 0xabcd,
        };
        assert_eq!(
            Event::try_from(bytes_of(&record)),
            Ok(Event::Alloc {
                header: record.header,
                func: AllocFn::Calloc,
                addr: 0x5555_0000_1000,
                size: 4096,
                stack_id: 0xabcd,
                by_allocator: false,
            })
        );
    }

    #[test]
    fn brk_by_the_allocator_and_fork_round_trip() {
        let record = AllocEvent {
            header: header(EventKind::Alloc),
            func: AllocFn::Brk as u32,
            flags: ALLOC_BY_ALLOCATOR,
            addr: 0x60_0000,
            ..Default::default()
        };
        let Ok(Event::Alloc {
            func,
            by_allocator,
            addr,
            ..
        }) = Event::try_from(bytes_of(&record))
        else {
            panic!("not an allocation");
        };
        assert_eq!((func, by_allocator, addr), (AllocFn::Brk, true, 0x60_0000));
        let fork = ForkEvent {
            header: header(EventKind::Fork),
            child_pid: 99,
            parent_pid: 98,
            held: 1,
            _pad: 0,
        };
        assert_eq!(
            Event::try_from(bytes_of(&fork)),
            Ok(Event::Fork {
                header: fork.header,
                parent_pid: 98,
                child_pid: 99,
                held: true,
            })
        );
    }

    #[test]
    fn free_and_exec_round_trip() {
        let record = FreeEvent {
            header: header(EventKind::Free),
            func: AllocFn::Munmap as u32,
            _pad: 0,
            addr: 0x1000,
            size: 8192,
        };
        assert_eq!(
            Event::try_from(bytes_of(&record)),
            Ok(Event::Free {
                header: record.header,
                func: AllocFn::Munmap,
                addr: 0x1000,
                size: 8192,
            })
        );
        let exec = ExecEvent {
            header: header(EventKind::Exec),
            held: 1,
            _pad: 0,
        };
        assert_eq!(
            Event::try_from(bytes_of(&exec)),
            Ok(Event::Exec {
                header: exec.header,
                held: true
            })
        );
        let mapped = LibraryMappedEvent {
            header: header(EventKind::LibraryMapped),
            held: 1,
            _pad: 0,
        };
        assert_eq!(
            Event::try_from(bytes_of(&mapped)),
            Ok(Event::LibraryMapped {
                header: mapped.header,
                held: true
            })
        );
    }

    #[test]
    fn fault_and_madvise_round_trip() {
        let record = FaultEvent {
            header: header(EventKind::Fault),
            addr: 0x7f12_3456_7890,
            stack_id: 0xfeed,
            weight: 16,
            _pad: 0,
        };
        assert_eq!(
            Event::try_from(bytes_of(&record)),
            Ok(Event::Fault {
                header: record.header,
                addr: 0x7f12_3456_7890,
                stack_id: 0xfeed,
                weight: 16,
            })
        );
        assert_eq!(
            Event::try_from(&bytes_of(&record)[..48]),
            Err(DecodeError::Short {
                kind: Some(EventKind::Fault),
                len: 48
            })
        );
        let madvise = FreeEvent {
            header: header(EventKind::Free),
            func: AllocFn::Madvise as u32,
            _pad: 0,
            addr: 0x7000_0000,
            size: 1 << 20,
        };
        assert_eq!(
            Event::try_from(bytes_of(&madvise)),
            Ok(Event::Free {
                header: madvise.header,
                func: AllocFn::Madvise,
                addr: 0x7000_0000,
                size: 1 << 20,
            })
        );
    }

    #[test]
    fn stack_window_round_trips_with_only_the_bytes_read() {
        let mut frames = [0u64; MAX_STACK_DEPTH];
        frames[..2].copy_from_slice(&[0x7f00_0010, 0x5555_0020]);
        let mut record = StackWindowEvent {
            stack: StackEvent {
                header: header(EventKind::StackWindow),
                stack_id: 0x51,
                depth: 2,
                guessed_caller: 1,
                frames,
                py_depth: 0,
                py_status: PyStatus::NotPython as u32,
                py_frames: [PyFrame::default(); MAX_PY_FRAMES],
            },
            regs: UserRegs {
                ip: 0x7f00_0010,
                sp: 0x7ffc_0000,
                fp: 0x7ffc_0100,
                lr: 0,
            },
            len: 24,
            _pad: 0,
            bytes: [0xee; tracer_common::STACK_WINDOW_BYTES],
        };
        record.bytes[..24].copy_from_slice(&[7; 24]);
        let Ok(Event::StackWindow(window)) = Event::try_from(bytes_of(&record)) else {
            panic!("not a stack window");
        };
        assert_eq!(
            *window,
            StackWindow {
                header: record.stack.header,
                stack_id: 0x51,
                frames: vec![0x7f00_0010, 0x5555_0020],
                guessed_caller: true,
                python: PythonStack {
                    status: PyStatus::NotPython,
                    frames: Vec::new(),
                },
                regs: record.regs,
                bytes: vec![7; 24],
            }
        );
        // A length past the window is cut to it; a record cut short is refused.
        record.len = u32::MAX;
        let Ok(Event::StackWindow(window)) = Event::try_from(bytes_of(&record)) else {
            panic!("not a stack window");
        };
        assert_eq!(window.bytes.len(), tracer_common::STACK_WINDOW_BYTES);
        let whole = bytes_of(&record);
        assert_eq!(
            Event::try_from(&whole[..whole.len() - 1]),
            Err(DecodeError::Short {
                kind: Some(EventKind::StackWindow),
                len: whole.len() - 1
            })
        );
    }

    #[test]
    fn stack_keeps_only_its_depth() {
        let mut frames = [0u64; MAX_STACK_DEPTH];
        frames[..3].copy_from_slice(&[0x10, 0x20, 0x30]);
        let mut py_frames = [PyFrame::default(); MAX_PY_FRAMES];
        py_frames[0] = PyFrame {
            code: 0x7f00_1000,
            instr: 42,
            globals: 0x7f00_2000,
        };
        let record = StackEvent {
            header: header(EventKind::Stack),
            stack_id: 9,
            depth: 3,
            guessed_caller: 1,
            frames,
            py_depth: 1,
            py_status: PyStatus::Read as u32,
            py_frames,
        };
        let Ok(Event::Stack {
            frames,
            stack_id,
            guessed_caller,
            python,
            ..
        }) = Event::try_from(bytes_of(&record))
        else {
            panic!("not a stack");
        };
        assert_eq!(python.status, PyStatus::Read);
        assert_eq!(python.frames, [py_frames[0]]);
        assert_eq!(
            (stack_id, frames, guessed_caller),
            (9, vec![0x10, 0x20, 0x30], true)
        );
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        let record = AllocEvent {
            header: header(EventKind::Alloc),
            ..Default::default()
        };
        assert_eq!(
            Event::try_from(&bytes_of(&record)[..40]),
            Err(DecodeError::Short {
                kind: Some(EventKind::Alloc),
                len: 40
            })
        );
        // Function 0 is no allocator entry point: the derived table refuses it as the hand-written one did.
        assert_eq!(
            Event::try_from(bytes_of(&record)),
            Err(DecodeError::UnknownFunction(0))
        );
        let unknown = EventHeader {
            kind: 99,
            ..Default::default()
        };
        assert_eq!(
            Event::try_from(bytes_of(&unknown)),
            Err(DecodeError::UnknownKind(99))
        );
        assert!(matches!(
            Event::try_from(&[0u8; 3][..]),
            Err(DecodeError::Short { kind: None, len: 3 })
        ));
    }
}
