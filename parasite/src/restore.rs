//! The restorer's protocol: what `pdump restore` hands the restorer blob.
//!
//! Two areas are involved:
//!
//! * [`Shared`], one `MAP_SHARED` area the controller maps before it forks
//!   the tree, so every restored task inherits it at the same address. It
//!   holds the controller's guard (a robust futex: the kernel marks it
//!   owner-dead if the controller dies), the phase word the controller
//!   advances, the counter the tasks bump when they finish a phase, the
//!   first failure, and one [`TaskSlot`] per task.
//! * A private area per task: the blob image, then [`RestoreArgs`] and every
//!   array it points to, the rt_sigframes of its threads and their stacks.
//!   The task builds it itself (it is a fork of the controller, running
//!   pdump's own code) and jumps into the blob with the args' address.
//!
//! All pointers are absolute addresses in the task. Every struct is
//! `repr(C)` with explicit padding so host and blob agree byte for byte.

use core::sync::atomic::{AtomicI32, AtomicU32};

/// Version of this layout; the host checks the blob was built with it.
pub const RESTORE_PROTOCOL_VERSION: u32 = 1;
/// Most pid-namespace levels a `set_tid` array can name (the kernel's limit).
pub const MAX_LEVELS: usize = 32;
/// `siginfo_t` bytes.
pub const SIGINFO_BYTES: usize = 128;

/// Phases the controller announces in [`Shared::phase`].
pub mod phase {
    /// Tasks are being created; each reports when its children exist.
    pub const CREATE: u32 = 0;
    /// Process-group leaders make their groups.
    pub const PGID_LEADERS: u32 = 1;
    /// Members join their groups.
    pub const PGID_MEMBERS: u32 = 2;
    /// Zombies exit (the controller waits until each is one).
    pub const ZOMBIES: u32 = 3;
    /// The others set up fs state and fds and enter the blob.
    pub const RESTORE: u32 = 4;
    /// Every thread of every task waits at the barrier; the controller has
    /// seized them all: return into the dumped registers.
    pub const GO: u32 = 5;
    /// The restore failed: every task exits.
    pub const ABORT: u32 = 100;
}

/// Steps a task reports in [`TaskSlot::step`] (and a failure names).
pub mod step {
    /// Created, not yet set up.
    pub const CREATED: u32 = 1;
    /// Creating its children.
    pub const CHILDREN: u32 = 2;
    /// Setting its process group.
    pub const PGID: u32 = 3;
    /// cwd, root, umask, personality.
    pub const FS: u32 = 4;
    /// Installing its fds.
    pub const FDS: u32 = 5;
    /// Preparing the restorer (opening mapped files, building frames).
    pub const PREPARE: u32 = 6;
    /// In the blob: unmapping pdump.
    pub const UNMAP: u32 = 10;
    /// Moving vdso/vvar.
    pub const VDSO: u32 = 11;
    /// Creating the mappings.
    pub const MAP: u32 = 12;
    /// Reading pages.
    pub const PAGES: u32 = 13;
    /// Setting protections and madvise flags.
    pub const PROTECT: u32 = 14;
    /// prctl(PR_SET_MM_MAP).
    pub const MM: u32 = 15;
    /// Signal actions.
    pub const SIGACTIONS: u32 = 16;
    /// itimers.
    pub const ITIMERS: u32 = 17;
    /// Creating threads.
    pub const THREADS: u32 = 18;
    /// POSIX timers.
    pub const TIMERS: u32 = 19;
    /// Resource limits.
    pub const RLIMITS: u32 = 20;
    /// Pending signals.
    pub const PENDING: u32 = 21;
    /// Credentials.
    pub const CREDS: u32 = 22;
    /// rseq.
    pub const RSEQ: u32 = 23;
    /// TLS registers.
    pub const TLS: u32 = 24;
    /// At the barrier.
    pub const BARRIER: u32 = 25;
    /// A zombie exiting.
    pub const ZOMBIE: u32 = 26;

    /// A name for a step, for errors.
    pub fn name(s: u32) -> &'static str {
        match s {
            0 => "not created",
            CREATED => "created",
            CHILDREN => "creating children",
            PGID => "setting the process group",
            FS => "restoring cwd/root/umask/personality",
            FDS => "restoring fds",
            PREPARE => "preparing the restorer",
            UNMAP => "unmapping pdump",
            VDSO => "moving vdso/vvar",
            MAP => "mapping memory",
            PAGES => "reading pages",
            PROTECT => "setting protections",
            MM => "prctl(PR_SET_MM_MAP)",
            SIGACTIONS => "restoring signal actions",
            ITIMERS => "restoring itimers",
            THREADS => "creating threads",
            TIMERS => "restoring POSIX timers",
            RLIMITS => "restoring rlimits",
            PENDING => "queueing pending signals",
            CREDS => "restoring credentials",
            RSEQ => "registering rseq",
            TLS => "setting TLS",
            BARRIER => "waiting at the barrier",
            ZOMBIE => "exiting as a zombie",
            _ => "unknown step",
        }
    }
}

/// The controller's shared area (followed by `ntasks` [`TaskSlot`]s).
#[repr(C)]
pub struct Shared {
    /// The controller's guard word (robust futex, its tid while alive).
    pub guard: AtomicU32,
    /// Padding.
    pub _pad0: u32,
    /// The controller's robust-list entry for `guard`.
    pub guard_entry: core::sync::atomic::AtomicU64,
    /// The phase (futex word), see [`phase`].
    pub phase: AtomicU32,
    /// Tasks bump this when they finish the current phase (futex word).
    pub counter: AtomicU32,
    /// Nonzero once something failed.
    pub failed: AtomicU32,
    /// The failing task's index.
    pub fail_task: AtomicU32,
    /// The failing step.
    pub fail_step: AtomicU32,
    /// The failing errno (positive).
    pub fail_errno: AtomicI32,
    /// The failing thread (as the task sees it) or 0.
    pub fail_tid: AtomicI32,
    /// An extra detail (the address, the signal, the fd) or 0.
    pub fail_detail: core::sync::atomic::AtomicU64,
    /// Number of task slots after this header.
    pub ntasks: u32,
    /// Padding.
    pub _pad1: u32,
}

/// One task's slot in the shared area.
#[repr(C)]
pub struct TaskSlot {
    /// Set by the parent once the task exists (its pid in the controller's namespace).
    pub created: AtomicI32,
    /// The step the task is at (see [`step`]).
    pub step: AtomicU32,
    /// The task's private area (for the controller's final unmap).
    pub area: core::sync::atomic::AtomicU64,
    /// Its length.
    pub area_len: core::sync::atomic::AtomicU64,
}

impl Shared {
    /// Bytes of the header plus `ntasks` slots.
    pub const fn size(ntasks: usize) -> usize {
        core::mem::size_of::<Shared>() + ntasks * core::mem::size_of::<TaskSlot>()
    }

    /// Task slot `i`.
    pub fn slot(&self, i: usize) -> &TaskSlot {
        debug_assert!(i < self.ntasks as usize);
        // SAFETY: the area holds `ntasks` slots right after the header (the
        // controller sized it with `Shared::size`), and slots are atomics.
        unsafe {
            &*((self as *const Shared as *const u8).add(core::mem::size_of::<Shared>())
                as *const TaskSlot)
                .add(i)
        }
    }

    /// Record the first failure (later ones are dropped).
    pub fn fail(&self, task: u32, step: u32, errno: i32, tid: i32, detail: u64) {
        use core::sync::atomic::Ordering::SeqCst;
        if self.failed.compare_exchange(0, 1, SeqCst, SeqCst).is_ok() {
            self.fail_task.store(task, SeqCst);
            self.fail_step.store(step, SeqCst);
            self.fail_errno.store(errno, SeqCst);
            self.fail_tid.store(tid, SeqCst);
            self.fail_detail.store(detail, SeqCst);
        }
    }
}

/// A slice in the task's memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Span {
    /// Address of the first element.
    pub ptr: u64,
    /// Number of elements.
    pub len: u64,
}

/// An address range.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Range {
    /// Start.
    pub start: u64,
    /// End (exclusive).
    pub end: u64,
}

/// A kernel special mapping (vdso, vvar, vvar_vclock) to move.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Special {
    /// Where it is now.
    pub cur: u64,
    /// Its length.
    pub len: u64,
    /// Where it was at dump time.
    pub target: u64,
}

/// madvise flags a VMA gets back ([`VmaDesc::madv`] bits).
pub mod madv {
    /// MADV_DONTFORK.
    pub const DONTFORK: u32 = 1;
    /// MADV_WIPEONFORK.
    pub const WIPEONFORK: u32 = 2;
    /// MADV_DONTDUMP.
    pub const DONTDUMP: u32 = 4;
    /// MADV_HUGEPAGE.
    pub const HUGEPAGE: u32 = 8;
    /// MADV_NOHUGEPAGE.
    pub const NOHUGEPAGE: u32 = 16;
}

/// One mapping to recreate.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VmaDesc {
    /// Start.
    pub start: u64,
    /// End (exclusive).
    pub end: u64,
    /// The mmap flags (MAP_FIXED is added by the blob).
    pub flags: u64,
    /// File offset.
    pub pgoff: u64,
    /// The final protection.
    pub prot: u32,
    /// The protection to map with while pages are filled (the final one
    /// when nothing is filled).
    pub map_prot: u32,
    /// The fd to map (-1 for anonymous).
    pub fd: i32,
    /// [`madv`] bits.
    pub madv: u32,
}

/// A run of dumped pages to read from the pages file.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RunDesc {
    /// Where the pages go.
    pub addr: u64,
    /// Bytes.
    pub len: u64,
    /// Offset in the pages file.
    pub file_off: u64,
    /// 1: the pages are all zero (nothing in the file: write zeros unless
    /// the mapping is anonymous and fresh).
    pub zero: u32,
    /// Padding.
    pub _pad: u32,
}

/// A signal action as `rt_sigaction` takes it (`struct kernel_sigaction`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KSigAction {
    /// sa_handler.
    pub handler: u64,
    /// sa_flags.
    pub flags: u64,
    /// sa_restorer.
    pub restorer: u64,
    /// sa_mask.
    pub mask: u64,
}

/// `struct itimerspec` / `struct itimerval` as two (sec, nsec-or-usec) pairs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TimerSpec {
    /// Interval seconds.
    pub interval_sec: i64,
    /// Interval ns (itimerspec) or us (itimerval).
    pub interval_frac: i64,
    /// Value seconds.
    pub value_sec: i64,
    /// Value ns or us.
    pub value_frac: i64,
}

/// A POSIX timer to recreate with its id.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TimerDesc {
    /// The timer id.
    pub id: i32,
    /// The clock.
    pub clock: i32,
    /// `struct sigevent` (64 bytes).
    pub sigev: [u8; 64],
    /// The time left and the interval.
    pub value: TimerSpec,
}

/// A queued signal: `siginfo_t` (128 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SigInfo {
    /// The raw siginfo bytes (si_signo first).
    pub bytes: [u8; 128],
}

/// A resource limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RlimitDesc {
    /// RLIMIT_*.
    pub resource: u64,
    /// Soft.
    pub cur: u64,
    /// Hard.
    pub max: u64,
}

/// `struct prctl_mm_map`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct MmMap {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub auxv: u64,
    pub auxv_size: u32,
    pub exe_fd: u32,
}

/// Credentials, set by every thread for itself (raw syscalls are per thread).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CredsDesc {
    /// 1: set them.
    pub set: u32,
    /// 1: PR_SET_NO_NEW_PRIVS.
    pub no_new_privs: u32,
    /// real, effective, saved, fs uid.
    pub uid: [u32; 4],
    /// real, effective, saved, fs gid.
    pub gid: [u32; 4],
    /// Supplementary groups (u32 each).
    pub groups: Span,
    /// Capabilities: effective, permitted, inheritable (64-bit masks).
    pub caps: [u64; 3],
}

/// One thread to return into its dumped state.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ThreadDesc {
    /// The thread's id on every level, innermost first (clone3's `set_tid`).
    pub set_tid: [i32; MAX_LEVELS],
    /// Levels in `set_tid`.
    pub nlevels: u32,
    /// 1 for the thread-group leader (the blob's own thread).
    pub leader: u32,
    /// The rt_sigframe to return through (its first word is the return slot).
    pub frame: u64,
    /// Top of the blob's stack for this thread.
    pub stack_top: u64,
    /// TLS registers (arch `set_tls`).
    pub tls: [u64; 2],
    /// rseq area (0: none), its length and signature.
    pub rseq: u64,
    /// rseq length.
    pub rseq_len: u32,
    /// rseq signature.
    pub rseq_sig: u32,
    /// Signals pending for this thread only ([`SigInfo`]s).
    pub pending: Span,
    /// The [`RestoreArgs`] this thread belongs to.
    pub args: u64,
    /// The thread's name (`comm`, NUL-padded).
    pub comm: [u8; 16],
    /// The `clear_child_tid` address (`set_tid_address`), 0 for none.
    pub clear_tid: u64,
}

/// Bytes of the blob's stack for every thread (the leader's included).
pub const THREAD_STACK_BYTES: usize = 32 * 1024;

/// Everything one task's blob needs.
#[repr(C)]
#[derive(Debug)]
pub struct RestoreArgs {
    /// [`RESTORE_PROTOCOL_VERSION`].
    pub version: u32,
    /// This task's index in the shared area.
    pub task: u32,
    /// The shared area.
    pub shared: u64,
    /// Its length (kept mapped).
    pub shared_len: u64,
    /// This task's private area (blob + args + frames + stacks).
    pub area: u64,
    /// Its length (kept mapped).
    pub area_len: u64,
    /// Current mappings to remove ([`Range`]s).
    pub unmap: Span,
    /// Special mappings to move ([`Special`]s).
    pub specials: Span,
    /// A free range, large enough for all specials, to move them through.
    pub scratch: u64,
    /// Mappings to create ([`VmaDesc`]s), in address order.
    pub vmas: Span,
    /// Page runs ([`RunDesc`]s).
    pub runs: Span,
    /// The pages file.
    pub pages_fd: i32,
    /// 1: apply `mm`.
    pub set_mm: u32,
    /// mm bounds, auxv and exe.
    pub mm: MmMap,
    /// Signal actions for signals 1..=64 (index = signo - 1).
    pub sigactions: [KSigAction; 64],
    /// Bit (signo - 1) set: the action is to be restored.
    pub sigaction_mask: u64,
    /// ITIMER_REAL, _VIRTUAL, _PROF (itimerval: frac in microseconds).
    pub itimers: [TimerSpec; 3],
    /// POSIX timers ([`TimerDesc`]s).
    pub timers: Span,
    /// Signals pending for the whole process ([`SigInfo`]s).
    pub shared_pending: Span,
    /// Resource limits ([`RlimitDesc`]s).
    pub rlimits: Span,
    /// Threads ([`ThreadDesc`]s), the leader first.
    pub threads: Span,
    /// Threads that reached the barrier (futex word).
    pub threads_ready: AtomicU32,
    /// Credentials.
    pub creds: CredsDesc,
    /// Every fd from here up is closed before the barrier.
    pub close_from: u32,
    /// Padding.
    pub _pad: u32,
}

/// `struct clone_args` (clone3).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}
