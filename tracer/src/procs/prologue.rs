//! Where on an allocator function a uprobe costs least. On x86-64 the kernel emulates a probed `push` (about
//! 0.5 µs a hit here) but must single-step most other instructions (about 13 µs): glibc's `free` begins with
//! `test %rdi,%rdi; je …`, so a probe on its first byte costs 25 times one a few bytes further, on the `push`
//! that starts the non-NULL path. This module decodes a function's first instructions and moves the probe
//! forward only over instructions that provably do not matter: `endbr64`, nops, and the `test %rdi,%rdi; je`
//! of `free`'s NULL check, whose skipped path is `free(NULL)`, a no-op. The new point must be a `push` of a
//! 64-bit register, reached once per call; anything else keeps `+0`.
//!
//! Only entry-only probes can move: a return probe must sit on the first instruction, where the return address
//! is on top of the stack, so functions probed at return pay for their first instruction anyway.
//!
//! x86-64 only (the module is built for it alone): elsewhere probes stay on their first instruction.

use std::{fs::File, os::unix::fs::FileExt as _};

use iced_x86::{Code, Decoder, DecoderOptions, Mnemonic, OpKind, Register};

/// How many bytes to look at: the skippable prologue is a few instructions long.
pub const WINDOW: usize = 32;

/// The first [`WINDOW`] bytes of the function at `offset` in `file` (fewer at the file's end), and nothing else
/// of the file.
pub fn read_function_start(file: &File, offset: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0; WINDOW];
    let mut filled = 0;
    while filled < WINDOW {
        match file.read_at(&mut buf[filled..], offset + filled as u64)? {
            0 => break,
            n => filled += n,
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

/// The offset from the start of `free` (or a function with the same contract: NULL is a no-op, the pointer is
/// in `%rdi`) to probe at. `code` holds the function's first bytes.
pub fn free_probe_offset(code: &[u8]) -> u64 {
    /// What the prologue has shown so far.
    enum Seen {
        Nothing,
        NullTest,
        NullCheck,
    }
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut seen = Seen::Nothing;
    while decoder.can_decode() {
        let insn = decoder.decode();
        let null_test = insn.code() == Code::Test_rm64_r64
            && insn.op0_register() == Register::RDI
            && insn.op1_register() == Register::RDI;
        seen = match (seen, insn.mnemonic()) {
            (Seen::Nothing, Mnemonic::Endbr64 | Mnemonic::Nop) => Seen::Nothing,
            (Seen::Nothing, Mnemonic::Test) if null_test => Seen::NullTest,
            (Seen::NullTest, Mnemonic::Je) if insn.op0_kind() == OpKind::NearBranch64 => {
                Seen::NullCheck
            }
            (Seen::NullCheck, Mnemonic::Push)
                if insn.op0_kind() == OpKind::Register && is_gpr64(insn.op0_register()) =>
            {
                return insn.ip();
            }
            _ => return 0,
        };
    }
    0
}

fn is_gpr64(register: Register) -> bool {
    (Register::RAX as u32..=Register::R15 as u32).contains(&(register as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_frees_null_check_to_its_push() {
        // glibc 2.36 free: test %rdi,%rdi; je +0xbf; push %rbp
        let code = [
            0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0, 0, 0, 0x55, 0x48, 0x8d, 0x77, 0xf0,
        ];
        assert_eq!(free_probe_offset(&code), 9);
        // With CET: endbr64 first.
        let cet = [&[0xf3, 0x0f, 0x1e, 0xfa][..], &code].concat();
        assert_eq!(free_probe_offset(&cet), 13);
    }

    #[test]
    fn a_push_first_stays_at_zero() {
        assert_eq!(free_probe_offset(&[0x41, 0x54, 0x55, 0x53]), 0);
    }

    #[test]
    fn anything_else_keeps_the_start() {
        // A flag-setting compare is not the NULL check.
        let cmp = [0x80, 0x3d, 0x71, 0x0e, 0x14, 0, 0, 0x74, 0x07, 0x55];
        assert_eq!(free_probe_offset(&cmp), 0);
        // A register write before the push.
        assert_eq!(free_probe_offset(&[0x48, 0x89, 0xf0, 0x55]), 0);
        // A NULL test of another register.
        assert_eq!(free_probe_offset(&[0x48, 0x85, 0xf6, 0x74, 0x02, 0x55]), 0);
        // The test without its jump.
        assert_eq!(free_probe_offset(&[0x48, 0x85, 0xff, 0x55]), 0);
        // Truncated or empty code.
        assert_eq!(free_probe_offset(&[0x48, 0x85, 0xff, 0x0f, 0x84]), 0);
        assert_eq!(free_probe_offset(&[]), 0);
    }
}
