//! `Module::parse`: the ELF objects a traced process maps (its executable and libraries), read for their
//! symbols and segments, both from memory and through the byte-budgeted `BoundedFile` alloctrace reads files with.
#![no_main]

use std::{
    fs::File,
    io::{Seek, Write},
    os::fd::FromRawFd,
};

use libfuzzer_sys::fuzz_target;
use tracer::procs::module::{BoundedFile, Module};

/// Asks what the tracer asks of a parsed object, at addresses the object itself names.
fn query(module: &Module) {
    let _ = module.symbols_cut();
    for name in ["malloc", "free", "_PyRuntime", "PyCode_Type", ""] {
        let _ = module.exported_function(name);
        let _ = module.defined_function(name);
        let _ = module.data_symbol(name);
    }
    for address in [0, 1, 0x1000, 0x40_0000, u64::MAX] {
        let _ = module.function_at(address);
        let _ = module.file_offset_of_address(address);
        let _ = module.address_of_file_offset(address);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(module) = Module::parse(data, "fuzz") {
        query(&module);
    }
    // SAFETY: memfd_create with a NUL-terminated name; a fresh fd this File then owns.
    let fd = unsafe { libc::memfd_create(c"fuzz-elf".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create failed");
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(data).unwrap();
    file.rewind().unwrap();
    // A small budget, so that the refusal path is reached as well as the whole parse.
    let budget = data.first().map_or(0, |&b| u64::from(b) << 8);
    for budget in [budget, 1 << 20] {
        let file = BoundedFile::new(file.try_clone().unwrap(), budget);
        if let Ok(module) = Module::parse(&file, "fuzz") {
            query(&module);
        }
    }
});
