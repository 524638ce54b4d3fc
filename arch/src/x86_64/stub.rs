//! The 8-byte syscall stub swapped into the target's text for remote syscalls.
//!
//! ```text
//!   0: 0f 05      syscall          <- the remote syscall; the dumper stops the
//!                                     task at its exit with PTRACE_SYSCALL
//!   2: 6a 0f      push 0xf         \
//!   4: 58         pop  rax          } only reached if the dumper died: rt_sigreturn
//!   5: 0f 05      syscall          /  through the frame below the injected rsp,
//!   7: cc         int3                back into the task's own registers
//! ```
//!
//! The dumper sets `rsp` to `frame + 8` before every remote syscall, where
//! `frame` holds an `rt_sigframe` with the task's original state. `push`/`pop`
//! leave `rsp` unchanged, so `rt_sigreturn` finds the frame at `rsp - 8`.

/// The stub, exactly 8 bytes so it is swapped with one ptrace word.
pub const SYSCALL_STUB: [u8; 8] = [0x0f, 0x05, 0x6a, 0x0f, 0x58, 0x0f, 0x05, 0xcc];
const _: () = assert!(SYSCALL_STUB.len() == 8);
