//! The command protocol shared by pdump's host side and its parasite blob.
//!
//! The dumper maps one shared-memory area into the target and into itself.
//! Both sides address it only through this module, so the two can never
//! disagree on an offset:
//!
//! ```text
//!   area + 0           blob: text, rodata, data, bss (relocated by the dumper)
//!   area + ctl_off     Control: command slot, futex words, fds the blob holds
//!   area + snap_ctl_off  the copy-on-write snapshot's Control (see cmd::FORK)
//!   area + frame_off   the cure frame (rt_sigframe + full xstate) the blob
//!                      returns through when the dumper dies
//!   area + data_off    data buffer: iovecs in, gathered state out
//!   area + stack_off   the blob's stack (grows down from area + snap_stack_off)
//!   area + snap_stack_off  the snapshot's stack (grows down from area + size)
//! ```
//!
//! Commands: the dumper fills [`Control::cmd`] and [`Control::args`], bumps
//! [`Control::cmd_seq`] and writes one byte into the command pipe; the blob
//! reads the byte, runs the command, stores the result, publishes
//! `done_seq = cmd_seq` and wakes the futex on it. The dumper holds the only
//! write end of the command pipe, so when the dumper dies the blob reads EOF
//! and cures the task by itself. Where the blob waits without that pipe
//! (the handshake, after FINI) it waits on [`Control::guard`], a robust futex
//! of the dumper thread, which the kernel marks owner-dead if the dumper dies.
#![no_std]
#![warn(missing_docs)]

use core::sync::atomic::{AtomicI32, AtomicU32, AtomicU64};

pub mod restore;

/// "PDPARAS1"
pub const CTL_MAGIC: u64 = 0x3153_4152_4150_4450;
/// Protocol version; the host refuses a blob of another version.
pub const PROTOCOL_VERSION: u32 = 5;

/// The comm (`/proc/PID/comm`) of a copy-on-write snapshot.
pub const SNAPSHOT_COMM: &str = "pdump-snapshot";

/// Page size of the area layout.
pub const PAGE: usize = 4096;
/// Bytes reserved for the cure frame (an x86 AMX xstate is ~11 KiB).
pub const FRAME_BYTES: usize = 16 * 1024;
/// Bytes of the data buffer.
pub const DATA_BYTES: usize = 256 * 1024;
/// Bytes of the blob's stack.
pub const STACK_BYTES: usize = 64 * 1024;
/// Most fds the blob may hold at once (command pipe + page pipes).
pub const MAX_FDS: usize = 34;
/// Most page pipes.
pub const MAX_PIPES: usize = 16;
/// Most POSIX timers queried by one `CMD_MISC`.
pub const MAX_TIMERS: usize = 64;
/// Most iovecs per `CMD_VMSPLICE` (they live in the data buffer).
pub const MAX_IOVS: usize = DATA_BYTES / 16;

/// Handshake states in [`Control::state`].
pub mod state {
    /// The dumper wrote the control block; the blob has not run yet.
    pub const LOADED: u32 = 0;
    /// The blob created the command pipe and published its fds.
    pub const READY: u32 = 1;
    /// The dumper took the write end; the blob closes its copy.
    pub const TAKEN: u32 = 2;
    /// The blob serves commands.
    pub const SERVING: u32 = 3;
    /// The blob is curing the task on its own (the dumper is gone).
    pub const SELF_CURE: u32 = 4;
}

/// Who serves a control block, in [`Control::role`].
pub mod role {
    /// The parasite in the task: when the dumper dies it cures the task.
    pub const PARASITE: u32 = 0;
    /// The copy-on-write snapshot (a fork of the task, see [`crate::cmd::FORK`]):
    /// when the dumper dies it exits. It never returns into the task's code.
    pub const SNAPSHOT: u32 = 1;
}

/// Commands.
pub mod cmd {
    /// Do nothing; answers with 0 (liveness check).
    pub const NOP: u32 = 0;
    /// Run syscall `args[0]` with `args[1..7]`; the result is the raw return value.
    pub const SYSCALL: u32 = 1;
    /// Gather signal actions, itimers, the leader's altstack and POSIX timers into [`crate::Misc`].
    pub const MISC: u32 = 2;
    /// Create `args[0]` page pipes of `args[1]` bytes each; fds go to [`crate::Control::pipe_fds`].
    pub const PIPES: u32 = 3;
    /// vmsplice `args[1]` iovecs from the data buffer into page pipe `args[0]`.
    /// The result is the number of bytes moved (or -errno).
    pub const VMSPLICE: u32 = 4;
    /// Close every fd the blob holds, answer, then wait on the guard until the
    /// dumper stops the task (or cure it alone if the dumper dies).
    pub const FINI: u32 = 5;
    /// Fork a copy-on-write snapshot of the task. `args[0]`: address of the
    /// snapshot's control block (filled by the dumper, role
    /// [`crate::role::SNAPSHOT`]); `args[1]`: the top of its stack; `args[2]`:
    /// the highest fd number the child closes one by one if `close_range` is
    /// refused. The blob creates the snapshot's command pipe (both ends in
    /// [`Control::snap_rfd`]/[`Control::snap_wfd`], the dumper takes the write
    /// end) and a sync pipe, and forks with exit signal 0 (no SIGCHLD, not
    /// seen by `wait()` without `__WALL`). The child closes every fd it
    /// inherited but its command pipe and the sync pipe (page pipes
    /// included: it makes its own), leaves the task's session (`setsid`),
    /// publishes `state = SERVING` and closes the sync pipe last; the blob
    /// waits for that end of file, so the task never runs while the child
    /// still holds one of its files. The result is the child's pid in the
    /// task's pid namespace, or -errno (a child that failed was already
    /// reaped). The snapshot then serves NOP, PIPES (in its own fd table;
    /// the dumper takes the read ends from it), VMSPLICE, VMSPLICE_SCAN and
    /// FINI (it exits) on its own control block, with the same data buffer
    /// as the parasite (idle once the task is cured), and exits at end of
    /// file on its command pipe.
    pub const FORK: u32 = 6;
    /// Like [`VMSPLICE`], but first split the `args[1]` iovecs (whole pages)
    /// into runs of zero and non-zero pages with the CRC32C of each non-zero
    /// run ([`crate::ScanRun`], written after the iovecs, see
    /// [`crate::scan_runs_offset`]), then vmsplice only the non-zero runs
    /// into page pipe `args[0]`. The result is the number of bytes moved
    /// (or -errno: -E2BIG when the runs do not fit the data buffer, -ENOSYS
    /// without a CRC32C instruction).
    pub const VMSPLICE_SCAN: u32 = 7;
}

/// One run of [`cmd::VMSPLICE_SCAN`]: pages of one iovec, all zero or all
/// non-zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanRun {
    /// First byte.
    pub addr: u64,
    /// Pages.
    pub npages: u32,
    /// 1 if every byte is zero (nothing is vmspliced for it), else 0.
    pub zero: u32,
    /// CRC32C (Castagnoli, as `crc32c::crc32c`) of the run's bytes; 0 for a
    /// zero run.
    pub crc: u32,
    /// Index of the iovec it belongs to.
    pub iov: u32,
}

/// Where [`cmd::VMSPLICE_SCAN`] puts its output in the data buffer, for
/// `niov` iovecs: a `u64` count of runs, then the [`ScanRun`]s.
pub const fn scan_runs_offset(niov: usize) -> usize {
    niov * 16
}

/// Most [`ScanRun`]s that fit after `niov` iovecs (the blob also needs 16
/// bytes per non-zero run for the iovecs it vmsplices).
pub const fn max_scan_runs(niov: usize) -> usize {
    let left = DATA_BYTES.saturating_sub(scan_runs_offset(niov) + 8);
    left / (core::mem::size_of::<ScanRun>() + 16)
}

/// The control block at `area + ctl_off`.
#[repr(C)]
pub struct Control {
    /// [`CTL_MAGIC`]
    pub magic: u64,
    /// [`PROTOCOL_VERSION`]
    pub version: u32,
    /// Handshake state (futex word), see [`state`].
    pub state: AtomicU32,
    /// The dumper's pid (in the dumper's pid namespace; informational).
    pub dumper_pid: i32,
    /// The guard: a robust futex the dumper thread holds (its tid) while the
    /// blob waits without a pipe to watch (handshake, after FINI). When the
    /// dumper thread dies the kernel sets FUTEX_OWNER_DIED and wakes the blob.
    pub guard: AtomicU32,
    /// The dumper's robust-list entry for [`Control::guard`] (a pointer in
    /// the dumper's mapping of this area; only the dumper's kernel exit path reads it).
    pub guard_entry: AtomicU64,
    /// Command sequence number, bumped by the dumper per command.
    pub cmd_seq: AtomicU32,
    /// Last finished command (futex word the dumper waits on).
    pub done_seq: AtomicU32,
    /// The command, see [`cmd`].
    pub cmd: AtomicU32,
    /// Command arguments.
    pub args: [AtomicU64; 8],
    /// Command result (`-errno` on failure).
    pub ret: AtomicU64,
    /// Address (in the task) of the cure frame.
    pub cure_frame: u64,
    /// Address (in the task) of the area.
    pub area_addr: u64,
    /// Size of the area.
    pub area_size: u64,
    /// Read end of the command pipe (in the task's fd table).
    pub cmd_rfd: AtomicI32,
    /// Write end of the command pipe, until the dumper took it.
    pub cmd_wfd: AtomicI32,
    /// Page pipe fds: `[read, write]` per pipe.
    pub pipe_fds: [[AtomicI32; 2]; MAX_PIPES],
    /// Number of page pipes.
    pub npipes: AtomicU32,
    /// [`role`] of whoever serves this block.
    pub role: u32,
    /// Padding.
    pub _pad: u32,
    /// Address (in the task) of the data buffer this block's commands use.
    pub data_addr: u64,
    /// The snapshot's command pipe (parasite's block): read end, until FINI.
    pub snap_rfd: AtomicI32,
    /// The snapshot's command pipe (parasite's block): write end, until FINI.
    pub snap_wfd: AtomicI32,
    /// Snapshot's block: the write end of the sync pipe it closes when ready.
    pub sync_wfd: AtomicI32,
    /// Snapshot's block: the highest fd to close one by one without `close_range`.
    pub close_max: AtomicI32,
    /// Parasite's block: the snapshot's pid (task's namespace) once forked,
    /// else 0. A parasite that cures itself (the dumper died) reaps it first.
    pub snap_pid: AtomicI32,
}

/// The kernel's `struct sigaction` as `rt_sigaction` exchanges it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KSigaction {
    /// Handler address, or 0 (SIG_DFL) / 1 (SIG_IGN).
    pub handler: u64,
    /// SA_* flags.
    pub flags: u64,
    /// Restorer (SA_RESTORER).
    pub restorer: u64,
    /// Blocked during the handler.
    pub mask: u64,
}

/// `struct itimerval` / `struct itimerspec` as four words.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimerVal {
    /// Interval seconds.
    pub interval_sec: i64,
    /// Interval micro- (itimer) or nanoseconds (POSIX timer).
    pub interval_sub: i64,
    /// Value seconds.
    pub value_sec: i64,
    /// Value micro- (itimer) or nanoseconds (POSIX timer).
    pub value_sub: i64,
}

/// What `CMD_MISC` gathers, at `area + data_off`. The dumper fills
/// `timer_ids`/`ntimers` before the command.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Misc {
    /// Signal actions of signals 1..=64 (index 0 is signal 1).
    pub sigactions: [KSigaction; 64],
    /// Result of each `rt_sigaction` (0 or -errno; SIGKILL/SIGSTOP give -EINVAL).
    pub sigaction_ret: [i64; 64],
    /// ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF.
    pub itimers: [TimerVal; 3],
    /// The calling thread's alternate signal stack: sp, flags, size.
    pub altstack: [u64; 3],
    /// Number of POSIX timers asked for.
    pub ntimers: u32,
    /// Padding.
    pub _pad: u32,
    /// POSIX timer ids to query.
    pub timer_ids: [i32; MAX_TIMERS],
    /// `timer_gettime` results.
    pub timers: [TimerVal; MAX_TIMERS],
    /// `timer_getoverrun` results.
    pub timer_overrun: [i64; MAX_TIMERS],
    /// `prctl(PR_GET_CHILD_SUBREAPER)`: its result (0 or -errno).
    pub subreaper_ret: i64,
    /// The child-subreaper flag it read.
    pub subreaper: i32,
    /// Padding.
    pub _pad2: u32,
    /// `prctl(PR_GET_TID_ADDRESS)` of the blob's thread (the leader): its
    /// result (0 or -errno).
    pub tid_address_ret: i64,
    /// The leader's `clear_child_tid` address it read.
    pub tid_address: u64,
}

/// Where each part of the area lives, computed identically on both sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Offset of [`Control`].
    pub ctl_off: usize,
    /// Offset of the copy-on-write snapshot's [`Control`].
    pub snap_ctl_off: usize,
    /// Offset of the cure frame.
    pub frame_off: usize,
    /// Offset of the data buffer.
    pub data_off: usize,
    /// Offset of the stack's lowest byte.
    pub stack_off: usize,
    /// Offset of the snapshot's stack's lowest byte (its top is `size`).
    pub snap_stack_off: usize,
    /// Total size of the area.
    pub size: usize,
}

const fn page_up(n: usize) -> usize {
    (n + PAGE - 1) & !(PAGE - 1)
}

impl Layout {
    /// The layout for a blob whose loaded image (with bss) is `blob_len` bytes.
    pub const fn new(blob_len: usize) -> Layout {
        let ctl_off = page_up(blob_len);
        let snap_ctl_off = ctl_off + page_up(core::mem::size_of::<Control>());
        let frame_off = snap_ctl_off + page_up(core::mem::size_of::<Control>());
        let data_off = frame_off + FRAME_BYTES;
        let stack_off = data_off + DATA_BYTES;
        let snap_stack_off = stack_off + STACK_BYTES;
        let size = snap_stack_off + STACK_BYTES;
        Layout {
            ctl_off,
            snap_ctl_off,
            frame_off,
            data_off,
            stack_off,
            snap_stack_off,
            size,
        }
    }
}

const _: () = assert!(core::mem::size_of::<Misc>() <= DATA_BYTES);
