//! Syscall numbers and raw syscall instructions.

/// x86_64 syscall numbers used by pdump and its blobs.
#[allow(missing_docs)]
pub mod nr {
    pub const READ: u64 = 0;
    pub const WRITE: u64 = 1;
    pub const CLOSE: u64 = 3;
    pub const MMAP: u64 = 9;
    pub const MPROTECT: u64 = 10;
    pub const MUNMAP: u64 = 11;
    pub const RT_SIGACTION: u64 = 13;
    pub const RT_SIGPROCMASK: u64 = 14;
    pub const RT_SIGRETURN: u64 = 15;
    pub const SCHED_YIELD: u64 = 24;
    pub const MREMAP: u64 = 25;
    pub const MADVISE: u64 = 28;
    pub const GETITIMER: u64 = 36;
    pub const GETPID: u64 = 39;
    pub const EXIT: u64 = 60;
    pub const KILL: u64 = 62;
    pub const FCNTL: u64 = 72;
    pub const GETPPID: u64 = 110;
    pub const SIGALTSTACK: u64 = 131;
    pub const PRCTL: u64 = 157;
    pub const ARCH_PRCTL: u64 = 158;
    pub const GETTID: u64 = 186;
    pub const FUTEX: u64 = 202;
    pub const RESTART_SYSCALL: u64 = 219;
    pub const TIMER_GETTIME: u64 = 224;
    pub const TIMER_GETOVERRUN: u64 = 225;
    pub const EXIT_GROUP: u64 = 231;
    pub const TGKILL: u64 = 234;
    pub const PPOLL: u64 = 271;
    pub const VMSPLICE: u64 = 278;
    pub const PIPE2: u64 = 293;
    pub const PIDFD_OPEN: u64 = 434;
}

/// Raw syscall with up to six arguments. Returns the raw result (`-errno` on error).
///
/// # Safety
/// The caller upholds whatever contract the syscall `nr` has for its arguments
/// (valid pointers, lengths, fds).
#[inline(always)]
pub unsafe fn syscall6(nr: u64, a: [u64; 6]) -> i64 {
    let ret: i64;
    // SAFETY: the `syscall` instruction clobbers rcx and r11 only; the caller
    // vouches for the arguments.
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") nr as i64 => ret,
            in("rdi") a[0], in("rsi") a[1], in("rdx") a[2],
            in("r10") a[3], in("r8") a[4], in("r9") a[5],
            lateout("rcx") _, lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// Jump into `rt_sigreturn` with the frame at `frame` (the frame's first word is
/// the unused return address slot). Never returns.
///
/// # Safety
/// `frame` must point at a complete, valid `rt_sigframe` for this task.
#[inline(always)]
pub unsafe fn sigreturn(frame: u64) -> ! {
    // SAFETY: the caller guarantees the frame; the kernel replaces every
    // register from it, so nothing after the syscall runs.
    unsafe {
        core::arch::asm!(
            "mov rsp, {sp}",
            "mov eax, 15",
            "syscall",
            "ud2",
            sp = in(reg) frame + 8,
            options(noreturn),
        );
    }
}
