//! The architecture layer shared by pdump's host side and its parasite blob.
//!
//! Generic code never names an architecture: it uses [`Arch`] through the
//! [`Native`] alias, which is chosen in exactly one place below. Each supported
//! architecture lives in its own folder with the same file set:
//!
//! * `regs.rs`    – the ptrace general-purpose register layout and accessors,
//! * `syscall.rs` – syscall numbers and raw syscall instructions (for the blob),
//! * `stub.rs`    – the injected syscall stub bytes,
//! * `frame.rs`   – the `rt_sigframe` layout used to cure a task by `rt_sigreturn`,
//! * `entry.rs`   – the blob's entry trampoline.
//!
//! An architecture that is not compiled in is a `compile_error!`, not a panic.
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

#[cfg(target_arch = "aarch64")]
#[path = "aarch64/mod.rs"]
pub mod aarch64;
#[cfg(target_arch = "x86_64")]
#[path = "x86_64/mod.rs"]
pub mod x86_64;

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("pdump supports x86_64 and aarch64 only");

/// The architecture pdump is built for. The only place that picks one.
#[cfg(target_arch = "aarch64")]
pub use self::aarch64 as native;
/// The architecture pdump is built for. The only place that picks one.
#[cfg(target_arch = "x86_64")]
pub use self::x86_64 as native;

/// The implementation of [`Arch`] for the build target.
pub type Native = native::Impl;

/// Size of a page on every architecture pdump supports today.
pub const PAGE_SIZE: usize = 4096;

/// Typed syscall argument slots: an argument cannot be put in the wrong register.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallArgs {
    /// Syscall number.
    pub nr: u64,
    /// Up to six arguments, in ABI order.
    pub args: [u64; 6],
}

impl SyscallArgs {
    /// A syscall with its arguments; missing arguments are zero.
    pub fn new(nr: u64, args: &[u64]) -> Self {
        let mut a = [0u64; 6];
        let n = if args.len() < 6 { args.len() } else { 6 };
        a[..n].copy_from_slice(&args[..n]);
        SyscallArgs { nr, args: a }
    }
}

/// Errors of the arch layer (no allocation, no std).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArchError {
    /// The destination buffer of a sigframe is too small.
    FrameBufferTooSmall {
        /// Bytes needed.
        need: usize,
    },
    /// The extended FPU state has an unexpected size or header.
    BadFpState,
}

/// What every architecture provides. Generic host code and the parasite use
/// only this contract.
pub trait Arch {
    /// The general-purpose register set as `PTRACE_GETREGSET(NT_PRSTATUS)` returns it.
    type Regs: Copy + Default + core::fmt::Debug;
    /// Short name, as in `uname -m`.
    const NAME: &'static str;
    /// ELF `e_machine` value.
    const ELF_MACHINE: u16;
    /// The note type of the extended FPU/SIMD regset (NT_X86_XSTATE, NT_PRFPREG, ...).
    const FP_REGSET: u32;
    /// The injected syscall stub: run one syscall, then fall back to
    /// `rt_sigreturn` (never reached while the dumper is alive). A multiple of
    /// 8 bytes, so it is swapped with whole ptrace words.
    const SYSCALL_STUB: &'static [u8];
    /// Offset inside [`Arch::SYSCALL_STUB`] right after the syscall instruction.
    const STUB_AFTER_SYSCALL: usize;
    /// Syscall number of `rt_sigreturn`.
    const NR_RT_SIGRETURN: u64;
    /// Syscall number of `restart_syscall`.
    const NR_RESTART_SYSCALL: u64;

    /// Instruction pointer.
    fn ip(regs: &Self::Regs) -> u64;
    /// Set the instruction pointer.
    fn set_ip(regs: &mut Self::Regs, ip: u64);
    /// Stack pointer.
    fn sp(regs: &Self::Regs) -> u64;
    /// Set the stack pointer.
    fn set_sp(regs: &mut Self::Regs, sp: u64);
    /// Thread pointer (TLS base: fs_base on x86_64, tpidr_el0 on aarch64).
    fn tls(regs: &Self::Regs) -> u64;
    /// Every TLS register the kernel keeps outside the signal frame, as the
    /// blob's `set_tls` takes them (x86_64: fs_base, gs_base).
    fn tls_words(regs: &Self::Regs) -> [u64; 2];
    /// Load a syscall and its arguments into the registers.
    fn set_syscall(regs: &mut Self::Regs, call: &SyscallArgs);
    /// The syscall return value after the syscall ran.
    fn syscall_ret(regs: &Self::Regs) -> i64;
    /// Put the first argument of a function call (the blob's entry) in place.
    fn set_entry_arg(regs: &mut Self::Regs, arg: u64);
    /// If the registers were taken while the task was inside an interrupted,
    /// restartable syscall, return the syscall number.
    fn interrupted_syscall(regs: &Self::Regs) -> Option<u64>;
    /// Turn registers stopped in an interrupted syscall into the registers the
    /// kernel would resume with when it restarts it (no handler runs). Used for
    /// `rt_sigreturn`-based cure, which cannot restart a syscall by itself.
    fn apply_restart(regs: &mut Self::Regs);
    /// Like [`Arch::apply_restart`], for registers resumed in a NEW task
    /// (restore), where the kernel's restart block is gone: a syscall that
    /// would restart through `restart_syscall` is restarted from its own
    /// arguments instead (a relative sleep with the remaining time the
    /// kernel wrote back), so it neither fails with EINTR nor sleeps twice.
    fn restart_in_new_task(regs: &mut Self::Regs) {
        Self::apply_restart(regs)
    }
    /// Mark the registers as "not in a syscall" so the kernel's restart logic
    /// leaves injected registers alone.
    fn clear_syscall(regs: &mut Self::Regs);

    /// Names of the general-purpose registers, in regset order.
    const GPR_NAMES: &'static [&'static str];
    /// The registers as words, in regset order (`out` has `GPR_NAMES.len()` words).
    fn gpr_to_words(regs: &Self::Regs, out: &mut [u64]);
    /// Registers from words in regset order.
    fn gpr_from_words(words: &[u64]) -> Self::Regs;

    /// Bytes an `rt_sigframe` needs for an FPU regset of `fp_len` bytes.
    fn frame_size(fp_len: usize) -> usize;
    /// Build an `rt_sigframe` into `buf`, which will live at `frame_addr` in
    /// the task: `regs` are the registers to resume with (syscall restart
    /// already applied), `fp` the arch's FPU regset as ptrace returned it.
    fn build_frame(
        buf: &mut [u8],
        frame_addr: u64,
        regs: &Self::Regs,
        sigmask: u64,
        altstack: AltStack,
        fp: &[u8],
    ) -> Result<FrameLayout, ArchError>;
}

/// The alternate signal stack a frame reinstates (`stack_t`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AltStack {
    /// `ss_sp`
    pub sp: u64,
    /// `ss_flags`
    pub flags: i32,
    /// `ss_size`
    pub size: u64,
}

impl AltStack {
    /// A value `rt_sigreturn` rejects and so leaves the thread's real
    /// alternate stack untouched (a mode outside {0, SS_ONSTACK, SS_DISABLE}).
    pub const KEEP: AltStack = AltStack {
        sp: 0,
        flags: 3,
        size: 0,
    };
}

/// Offsets and sizes of a frame built by [`Arch::build_frame`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameLayout {
    /// Total bytes used from the frame start.
    pub size: usize,
    /// The stack pointer to set before executing the `rt_sigreturn` syscall.
    pub sp_at_sigreturn: u64,
}
