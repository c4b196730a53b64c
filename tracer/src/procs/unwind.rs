//! Stacks through code built without frame pointers. At a mapping system call made outside the allocator, the
//! kernel sends a window of the user stack and the registers ([`tracer_common::StackWindowEvent`]); this module
//! unwinds it with the call frame information (`.eh_frame`) of the objects the process maps, through `framehop`
//! (the unwinder of the samply profiler). libc's `mmap` and `sbrk` keep no frame pointer, so the kernel's
//! frame-pointer walk loses their caller; the CFI does not.
//!
//! Only what unwinding needs is read of an object: its section headers and names, and the bytes of `.eh_frame`,
//! within a budget per file ([`MAX_UNWIND_READ_BYTES`]). `.eh_frame_hdr` is not used: its table could lead the
//! unwinder to entries the check of the CFI never walked (`UnwindSections::checked_fdes`), so
//! framehop indexes `.eh_frame` by the same walk. `.text` is located but not read:
//! framehop reads instructions only for Mach-O and PE objects, whose CFI does not cover prologues. The
//! sections are cached by content ([`ObjectKey::content`]: the build id, else device and inode, so a file that
//! reuses a gone file's inode is read afresh, and one library in a hundred containers of an image is read once)
//! and shared by every process that maps it; the cache is bounded in entries and bytes and counts what it
//! evicts.
//!
//! The same CFI says where the kernel's frame-pointer walk can be trusted ([`FrameRule`]): the walk's next
//! frame is read through `rbp`, which is a frame pointer only where a function's CFA is `rbp + 16`. The answer
//! is cached per object and address.

use std::{
    collections::HashMap,
    fs::File,
    ops::{Deref, Range},
    sync::Arc,
};

use framehop::{
    ExplicitModuleSectionInfo, FrameAddress, MayAllocateDuringUnwind, Unwinder as _, UnwinderNative,
};
use object::{
    Endianness, ReadRef,
    elf::FileHeader64,
    read::elf::{FileHeader as _, SectionHeader as _},
};

use super::{
    module::BoundedFile,
    module_cache::{ContentKey, ObjectKey},
};

/// The most bytes read from one object to unwind through it: its section headers and names, and `.eh_frame`. libpython's `.eh_frame` is about 300 KiB and libLLVM's about 6 MiB; more is refused.
pub const MAX_UNWIND_READ_BYTES: u64 = 32 << 20;

/// The most objects whose unwind sections are kept (and failures remembered).
pub const MAX_UNWIND_OBJECTS: usize = 1024;

/// The most bytes of unwind sections kept for all objects.
pub const MAX_UNWIND_BYTES: usize = 64 << 20;
const _: () = assert!(MAX_UNWIND_READ_BYTES as usize <= MAX_UNWIND_BYTES);

/// The most processes whose unwinder (the objects added to it) is kept between events; past it, all are
/// dropped and made again as events come.
pub const MAX_UNWIND_PROCESSES: usize = 1024;

/// The most frames one unwind yields: as many as a stack record of the kernel's holds.
pub const MAX_UNWOUND_FRAMES: usize = tracer_common::MAX_STACK_DEPTH;

/// The most answers of [`Unwinding::frame_rule`] kept (per object and address); past it they are all
/// dropped, and counted as evicted.
pub const MAX_FRAME_RULES: usize = 1 << 16;

/// The most bytes of call frame instructions (an FDE's and its CIE's) evaluated for a [`FrameRule`]; the
/// code of a longer FDE is taken as not covered ([`FrameRule::Unknown`]).
pub const MAX_FRAME_RULE_CFI_BYTES: usize = 64 << 10;

/// Bytes of a section, shared by the framehop modules made from them in every process that maps the object.
#[derive(Clone, Debug, Default)]
pub struct SectionBytes(Arc<[u8]>);

impl Deref for SectionBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// A section's place in the object's own addresses, and its bytes.
#[derive(Clone, Debug)]
struct Section {
    address: Range<u64>,
    bytes: SectionBytes,
}

/// Where one FDE's code lies (object addresses), and the FDE's offset in `.eh_frame`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FdeSpan {
    start: u64,
    end: u64,
    offset: usize,
}

/// What the CFI says of the frame-pointer register at one address of an object's code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameRule {
    /// The frame pointer is this function's (x86-64: CFA = `rbp + 16`; aarch64: CFA from `x29`): the
    /// frame-pointer walk finds its caller.
    FramePointer,
    /// The frame pointer is not this function's: what it holds, and so every frame the walk finds past this
    /// one, is whatever the code left there.
    NoFramePointer,
    /// The return address is undefined: the outermost frame (`_start`, a thread's start).
    Outermost,
    /// No CFI covers the address (or the object has none): the walk is taken as it is.
    Unknown,
}

/// What framehop needs of an ELF object to unwind through its code, and where each FDE of its CFI lies.
#[derive(Clone, Debug, Default)]
pub struct UnwindSections {
    eh_frame: Option<Section>,
    /// The FDEs of `eh_frame`, by start address: found when the CFI is checked, for [`FrameRule`]s.
    fdes: Vec<FdeSpan>,
    /// Where `.text` and `.got` are: CFI may give addresses relative to them.
    text: Option<Range<u64>>,
    got: Option<Range<u64>>,
}

#[derive(Debug, thiserror::Error)]
pub enum UnwindSectionsError {
    #[error("not a 64-bit ELF object: {0}")]
    NotElf64(object::read::Error),
    #[error("its section headers cannot be read: {0}")]
    Sections(object::read::Error),
}

impl UnwindSections {
    /// Reads the unwind sections of the ELF object in `data`: its header, section headers and their names, and
    /// only the bytes of `.eh_frame` (never its symbol tables, code or DWARF).
    pub fn parse<'data, R: ReadRef<'data>>(data: R) -> Result<Self, UnwindSectionsError> {
        let header =
            FileHeader64::<Endianness>::parse(data).map_err(UnwindSectionsError::NotElf64)?;
        let endian = header.endian().map_err(UnwindSectionsError::NotElf64)?;
        let sections = header
            .sections(endian, data)
            .map_err(UnwindSectionsError::Sections)?;
        let place = |name: &[u8]| {
            let (_, section) = sections.section_by_name(endian, name)?;
            let start = section.sh_addr(endian);
            Some((section, start..start.checked_add(section.sh_size(endian))?))
        };
        // A section whose bytes cannot be read (past the file's end, or past the budget) is left out: framehop
        // then unwinds that object's code by frame pointer, as the kernel did.
        let with_bytes = |name: &[u8]| {
            let (section, address) = place(name)?;
            let bytes = section.data(endian, data).ok()?;
            (!bytes.is_empty()).then(|| Section {
                address,
                bytes: SectionBytes(bytes.into()),
            })
        };
        let mut sections = Self {
            eh_frame: with_bytes(b".eh_frame"),
            text: place(b".text").map(|(_, address)| address),
            got: place(b".got").map(|(_, address)| address),
            fdes: Vec::new(),
        };
        match sections.checked_fdes() {
            Some(fdes) => sections.fdes = fdes,
            None => sections.eh_frame = None,
        }
        Ok(sections)
    }

    /// Whether every DWARF expression of the CFI only branches forward (see [`Self::checked_fdes`]).
    #[cfg(test)]
    fn expressions_terminate(&self) -> bool {
        self.checked_fdes().is_some()
    }

    /// The FDEs of the CFI sorted by address, or `None` when it is refused: unless every DWARF expression of
    /// the CFI only branches forward. framehop evaluates the expressions a
    /// rule needs with gimli, which bounds neither the steps nor the stack of an evaluation: an object whose
    /// CFI holds a `DW_OP_skip` back to itself (or a loop pushing values) would hold the tracer forever or
    /// exhaust its memory. Without a backward branch an evaluation ends within its expression's length. The
    /// walk is the one framehop indexes `.eh_frame` by (it is given no `.eh_frame_hdr`), and each FDE's CIE is
    /// checked wherever it lies. An object whose CFI does not parse is refused too. Checked once per file,
    /// when it is read.
    fn checked_fdes(&self) -> Option<Vec<FdeSpan>> {
        use gimli::{
            CallFrameInstruction, CieOrFde, EhFrame, LittleEndian, Operation, UnwindSection as _,
        };
        let Some(eh_frame) = &self.eh_frame else {
            return Some(Vec::new());
        };
        let section = EhFrame::new(&eh_frame.bytes[..], LittleEndian);
        let bases = self.bases();
        let forward_only = |mut instructions: gimli::CallFrameInstructionIter<'_, _>,
                            encoding: gimli::Encoding|
         -> gimli::Result<bool> {
            while let Some(instruction) = instructions.next()? {
                let expression = match instruction {
                    CallFrameInstruction::DefCfaExpression { expression }
                    | CallFrameInstruction::Expression { expression, .. }
                    | CallFrameInstruction::ValExpression { expression, .. } => expression,
                    _ => continue,
                };
                let mut operations = expression.get(&section)?.operations(encoding);
                while let Some(operation) = operations.next()? {
                    if let Operation::Skip { target } | Operation::Bra { target } = operation
                        && target < 0
                    {
                        return Ok(false);
                    }
                }
            }
            Ok(true)
        };
        let check = || -> gimli::Result<Option<Vec<FdeSpan>>> {
            let mut fdes = Vec::new();
            let mut entries = section.entries(&bases);
            while let Some(entry) = entries.next()? {
                let terminates = match entry {
                    CieOrFde::Cie(cie) => {
                        forward_only(cie.instructions(&section, &bases), cie.encoding())?
                    }
                    CieOrFde::Fde(partial) => {
                        // Its CIE may lie anywhere, off the walk: its instructions are checked here too.
                        let fde = partial.parse(EhFrame::cie_from_offset)?;
                        let cie = fde.cie();
                        // A frame rule evaluates the FDE's instructions and its CIE's: bounded, so that no
                        // object can make one take long (real ones are a few hundred bytes).
                        if fde.entry_len() + cie.entry_len() <= MAX_FRAME_RULE_CFI_BYTES {
                            fdes.push(FdeSpan {
                                start: fde.initial_address(),
                                end: fde.end_address(),
                                offset: fde.offset(),
                            });
                        }
                        forward_only(cie.instructions(&section, &bases), cie.encoding())?
                            && forward_only(fde.instructions(&section, &bases), cie.encoding())?
                    }
                };
                if !terminates {
                    return Ok(None);
                }
            }
            fdes.sort_unstable_by_key(|f| f.start);
            Ok(Some(fdes))
        };
        check().ok().flatten()
    }

    /// The base addresses the CFI's pointers are relative to.
    fn bases(&self) -> gimli::BaseAddresses {
        let start = |range: &Option<Range<u64>>| range.as_ref().map_or(0, |r| r.start);
        gimli::BaseAddresses::default()
            .set_eh_frame(self.eh_frame.as_ref().map_or(0, |s| s.address.start))
            .set_text(start(&self.text))
            .set_got(start(&self.got))
    }

    /// What the CFI says of the frame pointer at `address` (an object address; a return address's caller is
    /// looked up at the call, one byte before it). Reads only the one FDE that covers it.
    pub fn frame_rule(&self, address: u64) -> FrameRule {
        use gimli::{
            CfaRule, EhFrame, EhFrameOffset, LittleEndian, RegisterRule, UnwindSection as _,
        };
        let Some(eh_frame) = &self.eh_frame else {
            return FrameRule::Unknown;
        };
        // FDEs do not overlap in an object a linker made; in one that was made otherwise, the last to start
        // before the address is asked.
        let at = self.fdes.partition_point(|f| f.start <= address);
        let Some(span) = at.checked_sub(1).map(|at| self.fdes[at]) else {
            return FrameRule::Unknown;
        };
        if address >= span.end {
            return FrameRule::Unknown;
        }
        let section = EhFrame::new(&eh_frame.bytes[..], LittleEndian);
        let bases = self.bases();
        let rule = || -> gimli::Result<FrameRule> {
            let fde = section.fde_from_offset(
                &bases,
                EhFrameOffset(span.offset),
                EhFrame::cie_from_offset,
            )?;
            let mut context = gimli::UnwindContext::new();
            let row = fde.unwind_info_for_address(&section, &bases, &mut context, address)?;
            let return_address = fde.cie().return_address_register();
            if row.register(return_address) == Some(RegisterRule::Undefined) {
                return Ok(FrameRule::Outermost);
            }
            Ok(match *row.cfa() {
                CfaRule::RegisterAndOffset { register, offset }
                    if is_frame_pointer(register, offset) =>
                {
                    FrameRule::FramePointer
                }
                _ => FrameRule::NoFramePointer,
            })
        };
        rule().unwrap_or(FrameRule::Unknown)
    }

    /// Reads the unwind sections of an opened object (see [`super::module::open_object`]), within
    /// [`MAX_UNWIND_READ_BYTES`].
    pub fn load(file: File) -> Result<Self, UnwindSectionsError> {
        Self::parse(&BoundedFile::new(file, MAX_UNWIND_READ_BYTES))
    }

    /// Whether the object has call frame information at all.
    pub fn has_cfi(&self) -> bool {
        self.eh_frame.is_some()
    }

    /// Bytes it takes in memory.
    pub fn heap_bytes(&self) -> usize {
        let bytes = |s: &Option<Section>| s.as_ref().map_or(0, |s| s.bytes.len());
        size_of::<Self>() + bytes(&self.eh_frame) + self.fdes.capacity() * size_of::<FdeSpan>()
    }

    /// The framehop module of this object, mapped at `base` (the process address of the object's address 0)
    /// with its code at `code`.
    pub fn module(
        &self,
        name: &str,
        code: Range<u64>,
        base: u64,
    ) -> framehop::Module<SectionBytes> {
        let info = ExplicitModuleSectionInfo {
            base_svma: 0,
            text_svma: self.text.clone(),
            got_svma: self.got.clone(),
            eh_frame_svma: self.eh_frame.as_ref().map(|s| s.address.clone()),
            eh_frame: self.eh_frame.as_ref().map(|s| s.bytes.clone()),
            ..Default::default()
        };
        framehop::Module::new(name.to_owned(), code, base, info)
    }
}

/// Where an address of the process lies in an object: what the unwinder needs to add that object.
pub struct ModuleAt {
    /// What its unwind sections are cached by.
    pub key: ObjectKey,
    /// The path as the process maps it, for messages.
    pub name: String,
    /// The executable mapping that holds the address.
    pub code: Range<u64>,
    /// The process address of the object's address 0.
    pub base: u64,
    /// Opens the object (through the process's `map_files` when it is not alloctrace's own file).
    pub open: Box<dyn FnOnce() -> Option<File>>,
}

/// How an unwind ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnwindEnd {
    /// The outermost frame was reached (a null return address, or the CFI of `_start` says it ends there).
    Complete,
    /// The unwind needed stack past the window the kernel copied: the outer frames are not in it.
    WindowEnded,
    /// The unwinder could go no further (code without CFI whose frame pointer leads nowhere).
    Stopped,
    /// [`MAX_UNWOUND_FRAMES`] frames were unwound.
    TooDeep,
}

/// The frames an unwind found, innermost first: the instruction pointer, then return addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unwound {
    pub frames: Vec<u64>,
    pub end: UnwindEnd,
    /// Where the frames of the kernel's frame-pointer walk begin, when they completed the unwind
    /// ([`complete_from_walk`]).
    pub walked_from: Option<usize>,
}

/// `frames` after the kernel's frame-pointer walk where the unwind ran out of window: when the last unwound
/// return address is one of the walk's frames, the walk's frames past it are the callers the window did not
/// hold (the walk found them from a frame pointer that code with frame pointers had kept). Returns whether the
/// frames were completed so.
pub fn complete_from_walk(frames: &mut Vec<u64>, walk: &[u64]) -> bool {
    let Some(&last) = frames.last().filter(|_| frames.len() > 1) else {
        return false;
    };
    let Some(at) = walk.iter().position(|&ip| ip == last) else {
        return false;
    };
    let room = MAX_UNWOUND_FRAMES.saturating_sub(frames.len());
    frames.extend(walk[at + 1..].iter().take(room));
    true
}

/// A stack id for an unwound stack, from the kernel's id of the same event (which covers its Python frames)
/// and the unwound frames: the same callers give the same id, other callers another. Odd, as the kernel's ids
/// are (0 means "no stack").
pub fn unwound_stack_id(kernel_id: u64, frames: &[u64]) -> u64 {
    // FNV-1a over the words: stable across runs and builds, unlike std's hasher.
    let mut id: u64 = 0xcbf2_9ce4_8422_2325 ^ kernel_id.rotate_left(17);
    for &frame in frames {
        for byte in frame.to_le_bytes() {
            id = (id ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3);
        }
    }
    id | 1
}

struct Entry {
    /// `None`: the object could not be read, and is not tried again for every event.
    sections: Option<Arc<UnwindSections>>,
    last_used: u64,
}

/// One process's unwinder: the objects added to it so far, by the executable mapping each was added for
/// (also those found to have no CFI, not looked up again).
#[derive(Default)]
struct ProcessUnwinder {
    unwinder: UnwinderNative<SectionBytes, MayAllocateDuringUnwind>,
    added: Vec<Range<u64>>,
}

/// The unwind sections of the objects processes map, each process's unwinder, and the unwinders' cache of
/// rules. A process's unwinder is kept between its events (finding an object costs a `stat` of its path, and
/// the rules found are only reused by the same unwinder) until its address space is read again
/// ([`Unwinding::forget`]).
pub struct Unwinding {
    /// By content: the same library in many containers is read once.
    objects: HashMap<ContentKey, Entry>,
    processes: HashMap<u32, ProcessUnwinder>,
    bytes: usize,
    uses: u64,
    evicted: u64,
    rules: framehop::CacheNative<MayAllocateDuringUnwind>,
    /// What the CFI says of the frame pointer, per object and address (see [`Unwinding::frame_rule`]).
    frame_rules: HashMap<(ContentKey, u64), FrameRule>,
}

impl Default for Unwinding {
    fn default() -> Self {
        Self {
            objects: HashMap::new(),
            processes: HashMap::new(),
            bytes: 0,
            uses: 0,
            evicted: 0,
            rules: framehop::CacheNative::new(),
            frame_rules: HashMap::new(),
        }
    }
}

impl Unwinding {
    /// What the CFI of `file` says of the frame pointer at its address `address` (see
    /// [`UnwindSections::frame_rule`]), its sections read through `open` when they are not cached. Asked once
    /// per object and address: stacks come back to the same return addresses.
    pub fn frame_rule(
        &mut self,
        key: ObjectKey,
        open: Box<dyn FnOnce() -> Option<File>>,
        address: u64,
    ) -> FrameRule {
        let asked = (key.content(), address);
        if let Some(&rule) = self.frame_rules.get(&asked) {
            return rule;
        }
        let rule = self
            .sections(&key, open)
            .map_or(FrameRule::Unknown, |sections| sections.frame_rule(address));
        // An object that could not be opened now is asked again next time, as `sections` does.
        if !self.objects.contains_key(&asked.0) {
            return rule;
        }
        if self.frame_rules.len() >= MAX_FRAME_RULES {
            self.evicted += self.frame_rules.len() as u64;
            self.frame_rules.clear();
        }
        self.frame_rules.insert(asked, rule);
        rule
    }

    /// Objects evicted to stay within [`MAX_UNWIND_OBJECTS`] and [`MAX_UNWIND_BYTES`], and answers of
    /// [`Unwinding::frame_rule`] dropped past [`MAX_FRAME_RULES`].
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Drops what was added to `pid`'s unwinder: its address space was read again (a library may have been
    /// unloaded, another mapped at its place), or it is gone.
    pub fn forget(&mut self, pid: u32) {
        self.processes.remove(&pid);
    }

    /// Unwinds the stack `stack` of `pid` (the user stack from `regs.sp` up) from `regs`. `module_at` says which
    /// object holds a code address; objects are added to the process's unwinder as frames first reach them.
    pub fn unwind(
        &mut self,
        pid: u32,
        regs: &tracer_common::UserRegs,
        stack: &[u8],
        mut module_at: impl FnMut(u64) -> Option<ModuleAt>,
    ) -> Unwound {
        if self.processes.len() >= MAX_UNWIND_PROCESSES && !self.processes.contains_key(&pid) {
            self.processes.clear();
        }
        let mut process = self.processes.remove(&pid).unwrap_or_default();
        let ProcessUnwinder { unwinder, added } = &mut process;
        let window = regs.sp..regs.sp.saturating_add(stack.len() as u64);
        let mut read_stack = |address: u64| -> Result<u64, ()> {
            if !window.contains(&address) {
                return Err(());
            }
            let at = (address - regs.sp) as usize;
            let word = stack.get(at..at + 8).ok_or(())?;
            Ok(u64::from_le_bytes(word.try_into().map_err(|_| ())?))
        };
        let mut unwind_regs = start_registers(regs);
        let mut frames = Vec::new();
        let mut address = FrameAddress::from_instruction_pointer(regs.ip);
        let end = loop {
            frames.push(address.address());
            if frames.len() >= MAX_UNWOUND_FRAMES {
                break UnwindEnd::TooDeep;
            }
            let lookup = address.address_for_lookup();
            if !added.iter().any(|code| code.contains(&lookup))
                && let Some(module) = module_at(lookup)
            {
                added.push(module.code.clone());
                if let Some(sections) = self.sections(&module.key, module.open) {
                    unwinder.add_module(sections.module(&module.name, module.code, module.base));
                }
            }
            match unwinder.unwind_frame(address, &mut unwind_regs, &mut self.rules, &mut read_stack)
            {
                Ok(Some(return_address)) => match FrameAddress::from_return_address(return_address)
                {
                    Some(next) => address = next,
                    None => break UnwindEnd::Complete,
                },
                Ok(None) => break UnwindEnd::Complete,
                Err(framehop::Error::CouldNotReadStack(at)) if at >= window.end => {
                    break UnwindEnd::WindowEnded;
                }
                Err(_) => break UnwindEnd::Stopped,
            }
        };
        self.processes.insert(pid, process);
        Unwound {
            frames,
            end,
            walked_from: None,
        }
    }

    /// The unwind sections of the object `key`, read through `open` when they are not cached.
    fn sections(
        &mut self,
        key: &ObjectKey,
        open: Box<dyn FnOnce() -> Option<File>>,
    ) -> Option<Arc<UnwindSections>> {
        let key = key.content();
        self.uses += 1;
        if let Some(entry) = self.objects.get_mut(&key) {
            entry.last_used = self.uses;
            return entry.sections.clone();
        }
        // An object that cannot be opened now (its process gone, say) is not remembered: another process may
        // open it later. One that cannot be parsed is, as having no usable CFI.
        let sections = open()?;
        let sections = UnwindSections::load(sections)
            .ok()
            .filter(UnwindSections::has_cfi)
            .map(Arc::new);
        let bytes = sections.as_ref().map_or(0, |s| s.heap_bytes());
        while !self.objects.is_empty()
            && (self.objects.len() >= MAX_UNWIND_OBJECTS || self.bytes + bytes > MAX_UNWIND_BYTES)
        {
            self.evict_oldest();
        }
        // Never more than the bound: an object is read within MAX_UNWIND_READ_BYTES, half of it.
        self.bytes += bytes;
        let entry = Entry {
            sections: sections.clone(),
            last_used: self.uses,
        };
        self.objects.insert(key, entry);
        sections
    }

    fn evict_oldest(&mut self) {
        let Some(oldest) = self
            .objects
            .iter()
            .min_by_key(|(_, e)| e.last_used)
            .map(|(key, _)| key.clone())
        else {
            return;
        };
        if let Some(entry) = self.objects.remove(&oldest) {
            self.bytes -= entry.sections.map_or(0, |s| s.heap_bytes());
            self.evicted += 1;
            // The processes' unwinders share the sections they were given: dropped too, so that what the cache
            // let go is freed (and the bound holds).
            self.processes.clear();
        }
    }
}

/// Whether a CFA of `register + offset` says the frame pointer is the function's own: on x86-64 `rbp + 16`
/// (the saved `rbp` at `rbp`, the return address above it), on aarch64 `x29` plus the frame record's place
/// (the saved `x29` and `x30` at `x29`, whatever the frame's size).
#[cfg(target_arch = "x86_64")]
fn is_frame_pointer(register: gimli::Register, offset: i64) -> bool {
    register == gimli::X86_64::RBP && offset == 16
}

#[cfg(target_arch = "aarch64")]
fn is_frame_pointer(register: gimli::Register, offset: i64) -> bool {
    register == gimli::AArch64::X29 && offset >= 16
}

/// framehop's registers at the start of an unwind: x86-64 starts from `ip`, `sp` and `bp`; aarch64 from `lr`,
/// `sp` and `fp` (its first frame's return address may still be in `lr`).
#[cfg(target_arch = "x86_64")]
fn start_registers(regs: &tracer_common::UserRegs) -> framehop::UnwindRegsNative {
    framehop::UnwindRegsNative::new(regs.ip, regs.sp, regs.fp)
}

#[cfg(target_arch = "aarch64")]
fn start_registers(regs: &tracer_common::UserRegs) -> framehop::UnwindRegsNative {
    framehop::UnwindRegsNative::new(regs.lr, regs.sp, regs.fp)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{
        super::{
            maps::{FileId, Maps},
            module::Module,
        },
        *,
    };

    fn this_binary() -> UnwindSections {
        let file = File::open("/proc/self/exe").unwrap();
        UnwindSections::load(file).expect("the test binary has unwind sections")
    }

    #[test]
    fn reads_the_cfi_sections_of_an_elf_object() {
        let sections = this_binary();
        let eh_frame = sections.eh_frame.as_ref().expect(".eh_frame");
        assert_eq!(
            eh_frame.address.end - eh_frame.address.start,
            eh_frame.bytes.len() as u64
        );
        assert!(sections.text.is_some());
        assert!(sections.has_cfi());
        assert!(sections.heap_bytes() > eh_frame.bytes.len());
    }

    /// `.eh_frame` of one CIE (code alignment 1, data alignment -8, return address in register 16) and one
    /// FDE for 0x1000..0x1010 whose only rule is a CFA expression of `expression`.
    fn eh_frame_with_cfa_expression(expression: &[u8]) -> Vec<u8> {
        // DW_CFA_def_cfa_expression
        let mut instructions = vec![0x0f, expression.len() as u8];
        instructions.extend(expression);
        eh_frame_with_instructions(&instructions)
    }

    /// `.eh_frame` as above, whose FDE's call frame instructions are `instructions`.
    fn eh_frame_with_instructions(instructions: &[u8]) -> Vec<u8> {
        let mut cie = vec![0, 0, 0, 0, 1, b'z', b'R', 0, 1, 0x78, 16, 1, 0x1b];
        while !(cie.len() + 4).is_multiple_of(8) {
            cie.push(0); // DW_CFA_nop
        }
        let mut frame = (cie.len() as u32).to_le_bytes().to_vec();
        frame.extend(&cie);
        let fde_start = frame.len();
        // pc_begin is pcrel (sdata4): from its own place in the section, at 0x2000 + fde_start + 8.
        let pc_begin = (0x1000i64 - (0x2000 + fde_start as i64 + 8)) as i32;
        let mut fde = ((fde_start + 4) as u32).to_le_bytes().to_vec();
        fde.extend(pc_begin.to_le_bytes());
        fde.extend(0x10u32.to_le_bytes());
        fde.push(0); // no augmentation data
        fde.extend(instructions);
        while !(fde.len() + 4).is_multiple_of(8) {
            fde.push(0);
        }
        frame.extend((fde.len() as u32).to_le_bytes());
        frame.extend(fde);
        frame.extend([0, 0, 0, 0]);
        frame
    }

    fn sections_with(eh_frame: Vec<u8>) -> UnwindSections {
        let mut sections = UnwindSections {
            eh_frame: Some(Section {
                address: 0x2000..0x2000 + eh_frame.len() as u64,
                bytes: SectionBytes(eh_frame.into()),
            }),
            ..Default::default()
        };
        sections.fdes = sections.checked_fdes().unwrap_or_default();
        sections
    }

    #[test]
    fn the_cfi_says_where_the_frame_pointer_is_the_functions_own() {
        const DEF_CFA: u8 = 0x0c;
        const ADVANCE_LOC_4: u8 = 0x44;
        const UNDEFINED: u8 = 0x07;
        #[cfg(target_arch = "x86_64")]
        let (frame_pointer, stack_pointer) = (6, 7);
        #[cfg(target_arch = "aarch64")]
        let (frame_pointer, stack_pointer) = (29, 31);
        // The shape of a prologue: CFA = sp + 8 at the entry, the frame pointer's own from 0x1004 on.
        let prologue = sections_with(eh_frame_with_instructions(&[
            DEF_CFA,
            stack_pointer,
            8,
            ADVANCE_LOC_4,
            DEF_CFA,
            frame_pointer,
            16,
        ]));
        assert_eq!(prologue.fdes.len(), 1);
        assert_eq!(prologue.frame_rule(0x1000), FrameRule::NoFramePointer);
        assert_eq!(prologue.frame_rule(0x1003), FrameRule::NoFramePointer);
        assert_eq!(prologue.frame_rule(0x1004), FrameRule::FramePointer);
        assert_eq!(prologue.frame_rule(0x100f), FrameRule::FramePointer);
        // Outside every FDE: the walk is taken as it is.
        assert_eq!(prologue.frame_rule(0x0fff), FrameRule::Unknown);
        assert_eq!(prologue.frame_rule(0x1010), FrameRule::Unknown);
        // Code built without frame pointers: CFA = sp + 16 all through.
        let omitted = sections_with(eh_frame_with_instructions(&[DEF_CFA, stack_pointer, 16]));
        assert_eq!(omitted.frame_rule(0x1008), FrameRule::NoFramePointer);
        // `_start`: the return address is undefined, the stack ends there.
        let start = sections_with(eh_frame_with_instructions(&[
            DEF_CFA,
            stack_pointer,
            8,
            UNDEFINED,
            16,
        ]));
        assert_eq!(start.frame_rule(0x1000), FrameRule::Outermost);
        // An object without CFI says nothing.
        assert_eq!(
            UnwindSections::default().frame_rule(0x1000),
            FrameRule::Unknown
        );
        // Nor does an FDE of more instructions than a rule may evaluate (nops after its rule).
        let mut long = vec![DEF_CFA, frame_pointer, 16];
        long.resize(MAX_FRAME_RULE_CFI_BYTES, 0);
        let long = sections_with(eh_frame_with_instructions(&long));
        assert!(long.has_cfi());
        assert_eq!(long.frame_rule(0x1008), FrameRule::Unknown);
    }

    #[test]
    fn cfi_whose_expressions_could_loop_is_refused() {
        // DW_OP_breg7 8 (rsp + 8): the usual shape, kept.
        assert!(sections_with(eh_frame_with_cfa_expression(&[0x77, 8])).expressions_terminate());
        // A forward DW_OP_skip over one DW_OP_nop, kept.
        assert!(
            sections_with(eh_frame_with_cfa_expression(&[0x2f, 1, 0, 0x96, 0x77, 8]))
                .expressions_terminate()
        );
        // DW_OP_skip -3: back to itself, forever.
        assert!(
            !sections_with(eh_frame_with_cfa_expression(&[0x2f, 0xfd, 0xff]))
                .expressions_terminate()
        );
        // DW_OP_lit1, DW_OP_bra -3: a loop that pushes as it goes.
        assert!(
            !sections_with(eh_frame_with_cfa_expression(&[0x31, 0x28, 0xfd, 0xff]))
                .expressions_terminate()
        );
        // Bytes that are no CFI at all.
        assert!(!sections_with(vec![0xff; 64]).expressions_terminate());
        // The test binary's own CFI passes.
        assert!(this_binary().has_cfi());
    }

    #[test]
    fn reads_nothing_past_its_budget() {
        let file = File::open("/proc/self/exe").unwrap();
        // Enough for the headers, not for .eh_frame: the object loads without its CFI, rather than failing or
        // reading on.
        let sections = UnwindSections::parse(&BoundedFile::new(file, 64 << 10)).unwrap();
        assert!(sections.eh_frame.is_none());
    }

    #[test]
    fn refuses_what_is_not_a_64_bit_elf() {
        assert!(matches!(
            UnwindSections::parse(&b"#!/bin/sh\n"[..]),
            Err(UnwindSectionsError::NotElf64(_))
        ));
        let mut elf32 = [0u8; 64];
        elf32[..5].copy_from_slice(b"\x7fELF\x01");
        assert!(UnwindSections::parse(&elf32[..]).is_err());
    }

    /// A function of this binary that makes a stack of its own, and whose frames the CFI describes.
    #[inline(never)]
    fn capture(depth: u32) -> (tracer_common::UserRegs, Vec<u8>) {
        if depth > 0 {
            let result = capture(depth - 1);
            std::hint::black_box(&result);
            return result;
        }
        let (ip, sp, fp): (u64, u64, u64);
        // SAFETY: reads the instruction pointer, stack pointer and frame pointer; writes nothing.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::asm!("lea {ip}, [rip]", "mov {sp}, rsp", "mov {fp}, rbp",
                ip = out(reg) ip, sp = out(reg) sp, fp = out(reg) fp)
        };
        #[cfg(target_arch = "aarch64")]
        unsafe {
            std::arch::asm!("adr {ip}, .", "mov {sp}, sp", "mov {fp}, x29",
                ip = out(reg) ip, sp = out(reg) sp, fp = out(reg) fp)
        };
        // SAFETY: this thread's own stack, from its stack pointer: 4 KiB of it is mapped above (the callers).
        let stack = unsafe { std::slice::from_raw_parts(sp as *const u8, 4096) }.to_vec();
        let regs = tracer_common::UserRegs { ip, sp, fp, lr: 0 };
        (regs, stack)
    }

    /// This process's address space and its executable's symbols, to find its own frames.
    struct ThisProcess {
        maps: Maps,
        exe: String,
        module: Module,
    }

    impl ThisProcess {
        fn new() -> Self {
            Self {
                maps: Maps::from_pid(std::process::id()).unwrap(),
                exe: std::fs::read_link("/proc/self/exe")
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
                module: Module::load(Path::new("/proc/self/exe"), "self").unwrap(),
            }
        }

        /// The ELF address of `address` in the executable.
        fn elf_address(&self, address: u64) -> Option<u64> {
            let mapping = self.maps.find(address)?;
            (mapping.path == self.exe && mapping.executable).then_some(())?;
            self.module
                .address_of_file_offset(address - mapping.start + mapping.file_offset)
        }

        /// The unwinder's view of the executable: the only module it is given.
        fn module_at(&self, address: u64) -> Option<ModuleAt> {
            let mapping = self.maps.find(address)?;
            Some(ModuleAt {
                key: ObjectKey {
                    file: mapping.file?,
                    build_id: None,
                },
                name: mapping.path.clone(),
                code: mapping.start..mapping.end,
                base: address - self.elf_address(address)?,
                open: Box::new(|| File::open("/proc/self/exe").ok()),
            })
        }

        fn in_capture(&self, address: u64) -> bool {
            self.elf_address(address)
                .and_then(|at| self.module.function_at(at - 1))
                .is_some_and(|(name, _)| name.contains("capture"))
        }
    }

    #[test]
    fn unwinds_this_threads_own_stack_through_its_cfi() {
        let (regs, stack) = capture(3);
        let this = ThisProcess::new();
        let mut unwinding = Unwinding::default();
        let unwound = unwinding.unwind(1, &regs, &stack, |address| this.module_at(address));
        // The first frame is in `capture`, then three returns into it, then one into this test.
        assert!(unwound.frames.len() >= 5, "{unwound:x?}");
        let in_capture: Vec<bool> = unwound.frames[..5]
            .iter()
            .map(|&ip| this.in_capture(ip))
            .collect();
        assert_eq!(in_capture, [true, true, true, true, false], "{unwound:x?}");
        assert_eq!(unwinding.objects.len(), 1);
    }

    #[test]
    fn sections_are_read_once_per_build_id_and_afresh_for_a_reused_inode() {
        let key = |build_id: &[u8]| ObjectKey {
            file: FileId {
                dev_major: 0,
                dev_minor: 77,
                inode: 42,
            },
            build_id: Some(build_id.into()),
        };
        // Counts the objects actually opened.
        let opened = std::rc::Rc::new(std::cell::Cell::new(0));
        let open = || -> Box<dyn FnOnce() -> Option<File>> {
            let opened = std::rc::Rc::clone(&opened);
            Box::new(move || {
                opened.set(opened.get() + 1);
                File::open("/proc/self/exe").ok()
            })
        };
        let mut unwinding = Unwinding::default();
        let first = unwinding.sections(&key(&[1; 20]), open()).unwrap();
        assert!(Arc::ptr_eq(
            &first,
            &unwinding
                .sections(&key(&[1; 20]), Box::new(|| panic!("cached")))
                .unwrap()
        ));
        // An overlay's device and inode, reused by another container's file: not the first one's sections.
        let newcomer = unwinding.sections(&key(&[2; 20]), open()).unwrap();
        assert!(!Arc::ptr_eq(&first, &newcomer));
        assert_eq!((opened.get(), unwinding.objects.len()), (2, 2));
        // The first one's build id in another container (another overlay device): its sections, not read again.
        let mut elsewhere = key(&[1; 20]);
        elsewhere.file.dev_minor = 78;
        let shared = unwinding
            .sections(&elsewhere, Box::new(|| panic!("shared by content")))
            .unwrap();
        assert!(Arc::ptr_eq(&first, &shared));
    }

    #[test]
    fn a_window_that_ends_early_says_so() {
        let (regs, stack) = capture(3);
        let this = ThisProcess::new();
        let unwound =
            Unwinding::default().unwind(1, &regs, &stack[..16], |address| this.module_at(address));
        assert_eq!(unwound.end, UnwindEnd::WindowEnded, "{unwound:x?}");
    }

    #[test]
    fn the_walk_completes_an_unwind_from_its_last_return_address() {
        let mut frames = vec![0x10, 0x20, 0x30];
        assert!(complete_from_walk(
            &mut frames,
            &[0x10, 0x99, 0x30, 0x40, 0x50]
        ));
        assert_eq!(frames, [0x10, 0x20, 0x30, 0x40, 0x50]);
        let mut lost = vec![0x10, 0x20];
        assert!(!complete_from_walk(&mut lost, &[0x10, 0x99]));
        assert_eq!(lost, [0x10, 0x20]);
        // The first frame alone says nothing of where the walk continues.
        let mut first = vec![0x10];
        assert!(!complete_from_walk(&mut first, &[0x10, 0x20]));
    }

    #[test]
    fn ids_tell_callers_apart_and_are_stable() {
        let a = unwound_stack_id(7, &[1, 2, 3]);
        assert_eq!(a, unwound_stack_id(7, &[1, 2, 3]));
        assert_ne!(a, unwound_stack_id(7, &[1, 2, 4]));
        assert_ne!(a, unwound_stack_id(9, &[1, 2, 3]));
        assert_eq!(a & 1, 1);
    }
}
