//! What alloctrace reads from this machine's own programs, proven on them: the CPython layout tables against
//! every pyenv interpreter 3.8–3.13 and Debian's `python3` (each checks the numbers from inside itself), glibc's
//! `malloc` and `free` as alloctrace finds and probes them, and the kernel's `task_struct` layout from its BTF.
//! These were unit tests once; they need this machine's interpreters, libc build and kernel, so they run here,
//! with the other tests of the real machine, and `cargo test` stays hermetic.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use alloctrace_tests::workspace;
use tracer::{
    procs::{module::Module, prologue},
    python::offsets::Offsets,
    system,
};

/// Glibc's shared library, where Debian's multiarch layout puts it.
const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";

/// `offsets_check.py`: given a version and a table of offsets, checks each against the live interpreter that
/// runs it.
fn check_script() -> PathBuf {
    workspace().join("tracer/test_data/python/offsets_check.py")
}

/// `~/.pyenv/versions/3.<minor>.<patch>/bin/python3.<minor>`, the newest patch release installed. A missing
/// interpreter fails the test: these numbers are only as good as their proof.
fn pyenv_python(minor: u8) -> PathBuf {
    let home = std::env::var_os("HOME").expect("HOME is set");
    let versions = Path::new(&home).join(".pyenv/versions");
    let prefix = format!("3.{minor}.");
    let newest = std::fs::read_dir(&versions)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            // Only plain releases: "3.13.0t" (free-threaded) and the like are other interpreters.
            let patch: u32 = name.strip_prefix(&prefix)?.parse().ok()?;
            Some((patch, entry.path()))
        })
        .max();
    let python = newest.map(|(_, dir)| dir.join(format!("bin/python3.{minor}")));
    match python {
        Some(python) if python.is_file() => python,
        _ => panic!(
            "CPython 3.{minor} is not installed: no {}/3.{minor}.*/bin/python3.{minor}",
            versions.display()
        ),
    }
}

/// Runs `offsets_check.py` with `offsets` in `python`, which must be CPython 3.`minor`, and fails the test with
/// the script's report unless every check passed.
fn assert_proven(python: &Path, minor: u8, offsets: &Offsets) {
    let document = serde_json::json!({ "version": [3, minor], "offsets": offsets });
    let output = Command::new(python)
        .arg(check_script())
        .arg(document.to_string())
        .output()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", python.display()));
    assert!(
        output.status.success(),
        "{} rejects the 3.{minor} offsets ({}):\n{}{}",
        python.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn assert_table_proven(minor: u8) {
    let offsets = Offsets::for_version(3, minor).expect("a table");
    assert_proven(&pyenv_python(minor), minor, &offsets);
}

#[test]
fn machine_python_table_3_8_matches_the_interpreter() {
    assert_table_proven(8);
}

#[test]
fn machine_python_table_3_9_matches_the_interpreter() {
    assert_table_proven(9);
}

#[test]
fn machine_python_table_3_10_matches_the_interpreter() {
    assert_table_proven(10);
}

#[test]
fn machine_python_table_3_11_matches_the_interpreter() {
    assert_table_proven(11);
}

#[test]
fn machine_python_table_3_12_matches_the_interpreter() {
    assert_table_proven(12);
}

/// Debian's interpreter is one static executable (no libpython3.11.so), built by another toolchain.
#[test]
fn machine_python_table_3_11_matches_debians_python3() {
    let python = Path::new("/usr/bin/python3");
    assert!(
        python.is_file(),
        "Debian's {} is not installed",
        python.display()
    );
    assert_proven(python, 11, &Offsets::for_version(3, 11).expect("a table"));
}

/// The live 3.13 interpreter's own `_Py_DebugOffsets`, parsed by alloctrace, then proven by the script inside it.
#[test]
fn machine_python_debug_offsets_of_the_live_3_13_are_proven() {
    let python = pyenv_python(13);
    let dump = Command::new(&python)
        .arg(check_script())
        .args(["--dump-debug-offsets", "-"])
        .output()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", python.display()));
    assert!(
        dump.status.success(),
        "{} --dump-debug-offsets: {}",
        python.display(),
        String::from_utf8_lossy(&dump.stderr)
    );
    let offsets = Offsets::from_debug_offsets(&dump.stdout).expect("3.13's _Py_DebugOffsets");
    assert_proven(&python, 13, &offsets);
}

#[test]
fn machine_glibc_exports_malloc_under_its_public_name() {
    let libc = Module::load(Path::new(LIBC), "libc").expect("glibc");
    let malloc = libc.exported_function("malloc").unwrap();
    // The public name is shown, not an internal alias at the same address.
    assert_eq!(libc.function_at(malloc), Some(("malloc", 0)));
    assert!(libc.file_offset_of_address(malloc).is_some());
    assert_eq!(libc.exported_function("no_such_function_here"), None);
}

#[test]
fn machine_glibc_free_is_probed_past_its_null_check() {
    use std::os::unix::fs::FileExt as _;
    let libc = Module::load(Path::new(LIBC), "libc").expect("glibc");
    let free = libc.exported_function("free").unwrap();
    let start = libc.file_offset_of_address(free).unwrap();
    let mut code = [0; prologue::WINDOW];
    std::fs::File::open(LIBC)
        .unwrap()
        .read_exact_at(&mut code, start)
        .unwrap();
    assert_ne!(
        prologue::free_probe_offset(&code),
        0,
        "glibc's free should be probed after its NULL check"
    );
}

#[test]
fn machine_kernel_btf_gives_the_thread_pointer_in_task_struct() {
    let offset = system::task_fsbase_offset().unwrap();
    // Deep inside task_struct (thread_struct comes last), and 8-byte aligned.
    assert!(
        offset > 1024 && offset < 64 * 1024 && offset.is_multiple_of(8),
        "{offset}"
    );
}
