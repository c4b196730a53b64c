//! Rebuilds the eBPF programs when bpf-linker changes, and fails early, naming the fix, when it is missing.

use which::which;

fn main() {
    match which("bpf-linker") {
        Ok(linker) => println!("cargo:rerun-if-changed={}", linker.display()),
        Err(err) => panic!("bpf-linker not found ({err}): run `cargo xtask setup`"),
    }
}
