//! The blob's entry trampoline.
//!
//! The dumper starts a blob with `rip` at the blob's first byte, `rsp` at the
//! top of the blob's stack and `rdi` at the blob's control block. The
//! trampoline aligns the stack as the C ABI expects at a call, calls the
//! blob's `extern "C" fn blob_main(ctl: *mut u8) -> !`, and traps if it ever
//! returns:
//!
//! ```text
//!   48 83 e4 f0        and  rsp, -16
//!   e8 xx xx xx xx     call blob_main
//!   0f 0b              ud2
//! ```

/// Emit the entry trampoline into `.text.entry` (the linker script puts it at offset 0).
#[macro_export]
macro_rules! blob_entry {
    ($main:ident) => {
        core::arch::global_asm!(
            ".pushsection .text.entry, \"ax\"",
            ".globl pdump_blob_entry",
            "pdump_blob_entry:",
            "and rsp, -16",
            concat!("call ", stringify!($main)),
            "ud2",
            ".popsection",
        );
    };
}

/// The trampoline's bytes with the call displacement zeroed (checked by golden tests).
pub const ENTRY_PREFIX: [u8; 5] = [0x48, 0x83, 0xe4, 0xf0, 0xe8];
