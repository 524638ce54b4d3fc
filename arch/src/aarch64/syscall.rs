//! aarch64 syscall numbers (asm-generic) and raw syscalls.

/// Syscall numbers used by pdump and its blobs.
#[allow(missing_docs)]
pub mod nr {
    pub const READ: u64 = 63;
    pub const WRITE: u64 = 64;
    pub const CLOSE: u64 = 57;
    pub const MMAP: u64 = 222;
    pub const MPROTECT: u64 = 226;
    pub const MUNMAP: u64 = 215;
    pub const RT_SIGACTION: u64 = 134;
    pub const RT_SIGPROCMASK: u64 = 135;
    pub const RT_SIGRETURN: u64 = 139;
    pub const SCHED_YIELD: u64 = 124;
    pub const MREMAP: u64 = 216;
    pub const MADVISE: u64 = 233;
    pub const GETITIMER: u64 = 102;
    pub const GETPID: u64 = 172;
    pub const EXIT: u64 = 93;
    pub const KILL: u64 = 129;
    pub const FCNTL: u64 = 25;
    pub const GETPPID: u64 = 173;
    pub const SIGALTSTACK: u64 = 132;
    pub const PRCTL: u64 = 167;
    pub const GETTID: u64 = 178;
    pub const FUTEX: u64 = 98;
    pub const RESTART_SYSCALL: u64 = 128;
    pub const TIMER_GETTIME: u64 = 108;
    pub const TIMER_GETOVERRUN: u64 = 109;
    pub const EXIT_GROUP: u64 = 94;
    pub const TGKILL: u64 = 131;
    pub const PPOLL: u64 = 73;
    pub const VMSPLICE: u64 = 75;
    pub const PIPE2: u64 = 59;
    pub const PIDFD_OPEN: u64 = 434;
    pub const CLONE: u64 = 220;
    pub const WAIT4: u64 = 260;
    pub const SETSID: u64 = 157;
    pub const PREAD64: u64 = 67;
    pub const SETITIMER: u64 = 103;
    pub const SETGROUPS: u64 = 159;
    pub const SETRESUID: u64 = 147;
    pub const SETRESGID: u64 = 149;
    pub const SETFSUID: u64 = 151;
    pub const SETFSGID: u64 = 152;
    pub const CAPSET: u64 = 91;
    pub const RT_SIGQUEUEINFO: u64 = 138;
    pub const TIMER_CREATE: u64 = 107;
    pub const TIMER_SETTIME: u64 = 110;
    pub const RT_TGSIGQUEUEINFO: u64 = 240;
    pub const PRLIMIT64: u64 = 261;
    pub const RSEQ: u64 = 293;
    pub const CLONE3: u64 = 435;
    pub const CLOSE_RANGE: u64 = 436;
    pub const SET_TID_ADDRESS: u64 = 96;
}

/// Raw syscall with up to six arguments.
///
/// # Safety
/// The caller upholds the contract of syscall `nr`.
#[inline(always)]
pub unsafe fn syscall6(nr: u64, a: [u64; 6]) -> i64 {
    let ret: i64;
    // SAFETY: `svc #0` clobbers nothing but x0; the caller vouches for the arguments.
    unsafe {
        core::arch::asm!(
            "svc #0",
            in("x8") nr,
            inlateout("x0") a[0] as i64 => ret,
            in("x1") a[1], in("x2") a[2], in("x3") a[3], in("x4") a[4], in("x5") a[5],
            options(nostack),
        );
    }
    ret
}

/// Jump into `rt_sigreturn` with the frame at `frame`. Never returns.
///
/// # Safety
/// `frame` must point at a complete, valid `rt_sigframe` for this task.
#[inline(always)]
pub unsafe fn sigreturn(frame: u64) -> ! {
    // SAFETY: the caller guarantees the frame; the kernel replaces every register.
    unsafe {
        core::arch::asm!(
            "mov sp, {sp}",
            "mov x8, #139",
            "svc #0",
            "brk #0",
            sp = in(reg) frame,
            options(noreturn),
        );
    }
}

/// Emit the aarch64 entry trampoline (x0 = control block, sp = stack top).
#[macro_export]
macro_rules! blob_entry {
    ($main:ident) => {
        core::arch::global_asm!(
            ".pushsection .text.entry, \"ax\"",
            ".globl pdump_blob_entry",
            "pdump_blob_entry:",
            "mov x9, sp",
            "and x9, x9, #~15",
            "mov sp, x9",
            concat!("bl ", stringify!($main)),
            "brk #1",
            ".popsection",
        );
    };
}

/// Create a thread with `clone3`; the new thread calls `entry(arg)` on its
/// own stack and never returns; the caller gets the raw result.
///
/// # Safety
/// `args` must be a valid `clone_args` whose stack is mapped and unused, and
/// `entry` must never return.
#[inline(always)]
pub unsafe fn clone3_thread(args: u64, size: u64, entry: extern "C" fn(u64) -> !, arg: u64) -> i64 {
    let ret: i64;
    // SAFETY: the child starts on its own stack with a copy of x21/x22 and
    // calls `entry(arg)`, never falling through into the parent's code.
    unsafe {
        core::arch::asm!(
            "svc #0",
            "cbnz x0, 2f",
            "mov x0, x21",
            "blr x22",
            "brk #2",
            "2:",
            in("x8") nr::CLONE3,
            inlateout("x0") args as i64 => ret,
            in("x1") size,
            in("x21") arg, in("x22") entry as usize as u64,
            options(nostack),
        );
    }
    ret
}

/// Switch to the stack `sp` and jump to a blob's entry with its argument.
///
/// # Safety
/// `entry` must be a loaded blob's entry, `sp` the top of a stack it may use.
#[inline(always)]
pub unsafe fn jump_to_blob(entry: u64, sp: u64, arg: u64) -> ! {
    // SAFETY: the caller guarantees the blob and its stack.
    unsafe {
        core::arch::asm!(
            "mov sp, {sp}",
            "br {entry}",
            sp = in(reg) sp,
            entry = in(reg) entry,
            in("x0") arg,
            options(noreturn),
        );
    }
}

/// Set the calling thread's TLS register (`tpidr_el0`; the second word is unused).
pub fn set_tls(tls: [u64; 2]) -> i64 {
    // SAFETY: writing tpidr_el0 changes only this thread's thread pointer.
    unsafe { core::arch::asm!("msr tpidr_el0, {}", in(reg) tls[0]) };
    0
}

/// Fork the calling task onto a fresh stack: `clone(0, stack_top)`, which is
/// `fork()` with exit signal 0 (the parent gets no SIGCHLD, and `wait()`
/// without `__WALL`/`__WCLONE` never sees the child). The child starts with
/// `sp = stack_top` and calls `entry(arg)`; the parent gets the child's pid
/// (in its own pid namespace) or `-errno`.
///
/// # Safety
/// `stack_top` must be the 16-byte aligned top of memory that nothing but the
/// child uses as a stack, and `entry` must never return.
#[inline(always)]
pub unsafe fn fork_onto(stack_top: u64, entry: extern "C" fn(u64) -> !, arg: u64) -> i64 {
    let ret: i64;
    // SAFETY: in the parent `svc #0` clobbers x0 only. The child continues
    // at the next instruction with x0 = 0 and sp = stack_top (the caller
    // vouches for that stack); it never returns into this function's frame:
    // it calls `entry`, which does not return.
    unsafe {
        core::arch::asm!(
            "svc #0",
            "cbnz x0, 2f",
            "mov x29, xzr",
            "mov x0, x20",
            "blr x21",
            "brk #2",
            "2:",
            in("x8") nr::CLONE,
            inlateout("x0") 0i64 => ret,
            in("x1") stack_top, in("x2") 0u64, in("x3") 0u64, in("x4") 0u64,
            in("x20") arg, in("x21") entry as usize as u64,
            options(nostack),
        );
    }
    ret
}
