//! An ELF object a process maps (executable or shared library): its function symbols, for naming stack frames,
//! and its loadable segments, for turning file offsets into the addresses symbols use. Stripped objects load
//! fine: what `.dynsym` still holds is used, and frames without a symbol are shown as module + offset.

use std::{collections::HashMap, fs, path::Path};

use object::{Object as _, ObjectSegment as _, ObjectSymbol as _, SymbolKind};

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not an ELF object alloctrace can read: {source}")]
    Parse {
        path: String,
        source: object::read::Error,
    },
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

/// The parts of an ELF object alloctrace uses.
#[derive(Debug)]
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
}

impl Module {
    /// Reads `open_path` (which may be a `/proc/PID/map_files` link); `path` is the name reports use.
    pub fn load(open_path: &Path, path: &str) -> Result<Self, ModuleError> {
        let data = fs::read(open_path).map_err(|source| ModuleError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&data, path)
    }

    pub fn parse(data: &[u8], path: &str) -> Result<Self, ModuleError> {
        let file = object::File::parse(data).map_err(|source| ModuleError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let defined = || {
            file.dynamic_symbols()
                .map(|s| (s, true))
                .chain(file.symbols().map(|s| (s, false)))
                .filter(|(s, _)| s.is_definition() && s.address() != 0)
        };
        let data = defined()
            .filter(|(s, _)| s.kind() == SymbolKind::Data)
            .filter_map(|(s, _)| Some((s.name().ok()?.to_owned(), s.address())))
            .collect();
        let mut symbols: Vec<Symbol> = defined()
            .filter(|(s, _)| s.kind() == SymbolKind::Text)
            .filter_map(|(s, dynamic)| {
                Some(Symbol {
                    address: s.address(),
                    size: s.size(),
                    name: s.name().ok()?.to_owned(),
                    dynamic,
                })
            })
            .collect();
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
        let segments = file
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
        Ok(Self {
            path: path.to_owned(),
            symbols,
            data,
            by_name,
            segments,
        })
    }

    /// The ELF address (what symbols and `addr2line` use) of a byte at `file_offset` in the file.
    pub fn address_of_file_offset(&self, file_offset: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| (s.file_offset..s.file_offset + s.file_size).contains(&file_offset))
            .map(|s| file_offset - s.file_offset + s.address)
    }

    /// The file offset of an ELF address: where uprobes are placed.
    pub fn file_offset_of_address(&self, address: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| (s.address..s.address + s.file_size).contains(&address))
            .map(|s| address - s.address + s.file_offset)
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
    fn finds_libc_exports() {
        let libc = Module::load(Path::new("/lib/x86_64-linux-gnu/libc.so.6"), "libc").unwrap();
        let malloc = libc.exported_function("malloc").unwrap();
        // The public name is shown, not an internal alias at the same address.
        assert_eq!(libc.function_at(malloc), Some(("malloc", 0)));
        assert!(libc.file_offset_of_address(malloc).is_some());
        assert_eq!(libc.exported_function("no_such_function_here"), None);
    }

    #[test]
    fn rejects_what_is_not_elf() {
        let err = Module::parse(b"#!/bin/sh\n", "script").unwrap_err();
        assert!(err.to_string().starts_with("script is not an ELF object"));
    }
}
