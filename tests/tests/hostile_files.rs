//! Files and memory a hostile process controls: mappings of a device, of a sparse file of gigabytes and of an ELF
//! whose headers claim a gigabyte symbol table, which the tracer must not read whole (its memory stays within
//! 256 MiB); and a Python function whose `co_filename` is 1.2 MB, whose frame must stay in the stack with its
//! file name cut and marked, and its bytes exact.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use alloctrace_tests::{
    alloctrace, assert_tracer_rss_bounded, json_report, pyenv_prefix,
    ready::alloctrace_with_ready_fd, require_root, workload, workspace,
};
use serde_json::Value;

/// A folder of files for one test, removed when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = workspace().join(format!(
            "target/workloads/hostile-{name}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts the `hostile_files` workload mapping `file`, traces it by pid for 2 s and returns the report.
fn trace_a_process_mapping(file: &Path) -> Value {
    require_root();
    let mut target = Command::new(workload("hostile_files"))
        .arg(file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(target.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(
        line,
        "ready\n",
        "the workload could not map {}",
        file.display()
    );
    let out = Command::new(alloctrace())
        .args(["leaks", "--format", "json", "--duration", "2", "-p"])
        .arg(target.id().to_string())
        .output()
        .unwrap();
    drop(target.stdin.take());
    assert!(target.wait().unwrap().success());
    json_report(&out)
}

/// The run ended with a report, within the memory bound, and the process's own objects were still read.
fn assert_bounded(report: &Value, what: &str) {
    assert_tracer_rss_bounded(report, what);
    let allocator = report["allocators"][0]["path"].as_str().unwrap();
    assert!(allocator.contains("libc.so"), "{report:#}");
}

#[test]
fn a_mapping_of_dev_zero_is_not_read() {
    assert_bounded(
        &trace_a_process_mapping(Path::new("/dev/zero")),
        "a PROT_EXEC mapping of /dev/zero",
    );
}

#[test]
fn a_mapping_of_a_sparse_file_of_three_gigabytes_is_not_read() {
    let scratch = Scratch::new("sparse");
    let sparse = scratch.0.join("sparse.so");
    File::create(&sparse).unwrap().set_len(3 << 30).unwrap();
    assert_bounded(
        &trace_a_process_mapping(&sparse),
        "a mapping of a sparse 3 GiB file",
    );
}

/// An ELF header and three section headers (none, `.symtab`, `.strtab`) whose symbol table claims the rest of a
/// 2 GiB sparse file: what a parser reading every range it is told to would allocate and read.
fn forged_elf(path: &Path) {
    const FILE: u64 = 2 << 30;
    const TABLES: u64 = 4096;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&3u16.to_le_bytes()); // e_type: ET_DYN
    elf.extend_from_slice(&62u16.to_le_bytes()); // e_machine: x86-64
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_entry
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_shoff: right after this header
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [64u16, 56, 0, 64, 3, 0] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        elf.extend_from_slice(&half.to_le_bytes());
    }
    let section = |kind: u32, offset: u64, size: u64, link: u32, entsize: u64| {
        let mut header = Vec::new();
        header.extend_from_slice(&0u32.to_le_bytes()); // sh_name
        header.extend_from_slice(&kind.to_le_bytes());
        header.extend_from_slice(&0u64.to_le_bytes()); // sh_flags
        header.extend_from_slice(&0u64.to_le_bytes()); // sh_addr
        header.extend_from_slice(&offset.to_le_bytes());
        header.extend_from_slice(&size.to_le_bytes());
        header.extend_from_slice(&link.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes()); // sh_info
        header.extend_from_slice(&8u64.to_le_bytes()); // sh_addralign
        header.extend_from_slice(&entsize.to_le_bytes());
        header
    };
    let symbols = (FILE - 2 * TABLES) / 24 * 24;
    elf.extend(section(0, 0, 0, 0, 0));
    elf.extend(section(2, TABLES, symbols, 2, 24)); // SHT_SYMTAB, its names in section 2
    elf.extend(section(3, TABLES, 16, 0, 0)); // SHT_STRTAB
    let mut file = File::create(path).unwrap();
    file.write_all(&elf).unwrap();
    file.set_len(FILE).unwrap();
}

#[test]
fn a_mapping_of_an_elf_claiming_a_two_gigabyte_symbol_table_is_not_read() {
    let scratch = Scratch::new("forged");
    let forged = scratch.0.join("forged.so");
    forged_elf(&forged);
    assert_bounded(
        &trace_a_process_mapping(&forged),
        "a mapping of an ELF claiming a 2 GiB symbol table",
    );
}

/// The most bytes CPython adds to a bytearray's payload (object header, trailing NUL, alignment).
const OVERHEAD: u64 = 128;

/// Runs the long-`co_filename` workload on CPython `3.X`, traced by pid, and checks the site of its allocations.
fn long_file_name(version: &str) {
    require_root();
    let python = pyenv_prefix(version).join(format!("bin/python{version}"));
    let mut target = Command::new(&python)
        .arg(workspace().join("tests/workloads/hostile_files_long_filename.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(target.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "waiting\n");
    let report = std::env::temp_dir().join(format!(
        "alloctrace-long-filename-{}-{version}.json",
        std::process::id()
    ));
    let (mut command, mut ready) = alloctrace_with_ready_fd();
    let tracer = command
        .args(["leaks", "--format", "json", "--top", "0", "-o"])
        .arg(&report)
        .arg("-p")
        .arg(target.id().to_string())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    ready.wait_ready();
    writeln!(target.stdin.as_mut().unwrap(), "go").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    // SAFETY: signalling the child we spawned and have not reaped.
    unsafe { libc::kill(tracer.id() as libc::pid_t, libc::SIGINT) };
    let output = tracer.wait_with_output().unwrap();
    drop(target.stdin.take());
    target.wait().unwrap();
    assert!(
        output.status.success(),
        "alloctrace failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(&report).unwrap();
    std::fs::remove_file(&report).unwrap();
    let report: Value = serde_json::from_str(&text).unwrap();
    assert!(
        report["processes"][0]["python"]["unsupported"].is_null(),
        "{:#}",
        report["processes"]
    );
    // The site whose innermost Python frame is the function's allocating line, holding the most there.
    let site = report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["stack"]
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["lang"] == "python")
                .is_some_and(|f| {
                    f["function"] == "allocate_with_a_long_file_name" && f["line"] == 5
                })
        })
        .max_by_key(|s| s["live_bytes"].as_u64())
        .unwrap_or_else(|| panic!("no site at allocate_with_a_long_file_name:5: {report:#}"));
    let frame = site["stack"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["lang"] == "python")
        .unwrap();
    let file = frame["file"].as_str().unwrap();
    assert_eq!(
        file,
        format!("{}…(truncated)", "A".repeat(4096)),
        "the file name is cut at 4 KiB and marked"
    );
    let (count, payload) = (5, 1_000_000);
    let live = site["live_bytes"].as_u64().unwrap();
    assert_eq!(site["live_count"], count, "{site:#}");
    assert!(
        live >= count * payload && live <= count * (payload + OVERHEAD),
        "{count} bytearrays of {payload} bytes, within {OVERHEAD} bytes of overhead each; got {live}: {site:#}"
    );
    // The caller's frame follows: nothing was dropped in between.
    let python: Vec<&str> = site["stack"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["lang"] == "python")
        .map(|f| f["function"].as_str().unwrap())
        .collect();
    assert_eq!(
        python[..2],
        ["allocate_with_a_long_file_name", "main"],
        "{site:#}"
    );
    assert_eq!(report["complete"], true, "{report:#}");
    assert_tracer_rss_bounded(&report, &format!("a 1.2 MB co_filename on {version}"));
}

#[test]
fn a_python_frame_with_a_megabyte_file_name_is_kept_cut_and_marked_3_8() {
    long_file_name("3.8");
}

#[test]
fn a_python_frame_with_a_megabyte_file_name_is_kept_cut_and_marked_3_12() {
    long_file_name("3.12");
}

#[test]
fn a_python_frame_with_a_megabyte_file_name_is_kept_cut_and_marked_3_13() {
    long_file_name("3.13");
}
