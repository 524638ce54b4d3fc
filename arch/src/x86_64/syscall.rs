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
    pub const CLONE: u64 = 56;
    pub const WAIT4: u64 = 61;
    pub const SETSID: u64 = 112;
    pub const PREAD64: u64 = 17;
    pub const SETITIMER: u64 = 38;
    pub const SETGROUPS: u64 = 116;
    pub const SETRESUID: u64 = 117;
    pub const SETRESGID: u64 = 119;
    pub const SETFSUID: u64 = 122;
    pub const SETFSGID: u64 = 123;
    pub const CAPSET: u64 = 126;
    pub const RT_SIGQUEUEINFO: u64 = 129;
    pub const TIMER_CREATE: u64 = 222;
    pub const TIMER_SETTIME: u64 = 223;
    pub const RT_TGSIGQUEUEINFO: u64 = 297;
    pub const PRLIMIT64: u64 = 302;
    pub const RSEQ: u64 = 334;
    pub const CLONE3: u64 = 435;
    pub const CLOSE_RANGE: u64 = 436;
    pub const SET_TID_ADDRESS: u64 = 218;
    pub const NANOSLEEP: u64 = 35;
    pub const CLOCK_NANOSLEEP: u64 = 230;
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

/// Create a thread with `clone3` (`args` is a `struct clone_args` of `size`
/// bytes with a stack). The new thread calls `entry(arg)` on that stack and
/// never returns; the caller gets the raw result (tid or `-errno`).
///
/// # Safety
/// `args` must be a valid `clone_args` whose stack is mapped and unused, and
/// `entry` must never return.
#[inline(always)]
pub unsafe fn clone3_thread(args: u64, size: u64, entry: extern "C" fn(u64) -> !, arg: u64) -> i64 {
    let ret: i64;
    // SAFETY: the child starts on its own stack (set in `args`) with a copy of
    // every register but rax/rsp: it aligns the stack and calls `entry(arg)`
    // from r12/r13, never falling through into the parent's code.
    unsafe {
        core::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "and rsp, -16",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") CLONE3_NR as i64 => ret,
            in("rdi") args, in("rsi") size,
            in("r12") arg, in("r13") entry as usize as u64,
            lateout("rcx") _, lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

const CLONE3_NR: u64 = nr::CLONE3;

/// Switch to the stack `sp` and jump to a blob's entry with its argument.
///
/// # Safety
/// `entry` must be a loaded blob's entry, `sp` the top of a stack it may use.
#[inline(always)]
pub unsafe fn jump_to_blob(entry: u64, sp: u64, arg: u64) -> ! {
    // SAFETY: the caller guarantees the blob and its stack; nothing of the
    // current stack is used after the jump.
    unsafe {
        core::arch::asm!(
            "mov rsp, {sp}",
            "jmp {entry}",
            sp = in(reg) sp,
            entry = in(reg) entry,
            in("rdi") arg,
            options(noreturn),
        );
    }
}

/// Set the calling thread's TLS registers (`fs_base`, `gs_base`).
pub fn set_tls(tls: [u64; 2]) -> i64 {
    const ARCH_SET_GS: u64 = 0x1001;
    const ARCH_SET_FS: u64 = 0x1002;
    // SAFETY: arch_prctl with integer arguments changes only this thread's bases.
    let r = unsafe { syscall6(nr::ARCH_PRCTL, [ARCH_SET_FS, tls[0], 0, 0, 0, 0]) };
    if r < 0 {
        return r;
    }
    // SAFETY: as above.
    unsafe { syscall6(nr::ARCH_PRCTL, [ARCH_SET_GS, tls[1], 0, 0, 0, 0]) }
}

/// Fork the calling task onto a fresh stack: `clone(0, stack_top)`, which is
/// `fork()` with exit signal 0 (the parent gets no SIGCHLD, and `wait()`
/// without `__WALL`/`__WCLONE` never sees the child). The child starts with
/// `rsp = stack_top` and calls `entry(arg)`; the parent gets the child's pid
/// (in its own pid namespace) or `-errno`.
///
/// # Safety
/// `stack_top` must be the 16-byte aligned top of memory that nothing but the
/// child uses as a stack, and `entry` must never return.
#[inline(always)]
pub unsafe fn fork_onto(stack_top: u64, entry: extern "C" fn(u64) -> !, arg: u64) -> i64 {
    let ret: i64;
    // SAFETY: in the parent the `syscall` clobbers rcx and r11 only. The
    // child continues at the next instruction with rax = 0 and rsp =
    // stack_top (the caller vouches for that stack); it never returns into
    // this function's frame: it calls `entry`, which does not return.
    unsafe {
        core::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") nr::CLONE as i64 => ret,
            in("rdi") 0u64, in("rsi") stack_top, in("rdx") 0u64,
            in("r10") 0u64, in("r8") 0u64,
            in("r12") arg, in("r13") entry as usize as u64,
            lateout("rcx") _, lateout("r11") _,
            options(nostack),
        );
    }
    ret
}
