//! Infection: the parasite blob inside a seized process, and its cure.
//!
//! ```text
//!  1. stub in, thread 0 pointed at it (remote.rs)
//!  2. remote mmap(MAP_SHARED|MAP_ANONYMOUS, rwx)   -> area in the task
//!     the dumper maps the same shmem object through /proc/PID/map_files
//!  3. blob copied and relocated into the area, control block and cure frame
//!     written (protocol in pdump_parasite)
//!  4. stub out; thread 0 jumps to the blob, which creates the command pipe;
//!     the dumper takes the pipe's write end with pidfd_getfd
//!  5. commands: args in the control block, a byte on the pipe, futex back
//!  6. cure: FINI, PTRACE_INTERRUPT, remote close + munmap, registers, xstate
//!     and mask put back in the signal-path stop; the task is as before
//! ```
//!
//! The shared area is a shmem object created by the task itself (an anonymous
//! shared mapping is a memfd without an fd): no fd of ours ever enters the
//! task's table, so a dumper killed during infection cannot leave one there.
//! If the dumper dies while the blob runs, the blob reads EOF on the command
//! pipe, closes its fds and returns through the cure frame into the task's
//! own registers, xstate and signal mask; only the inert area stays mapped.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let seized = pdump::ptrace::Seized::seize(1234)?;
//! let mut p = pdump::infect::Parasite::infect(&seized)?;
//! let pid = p.syscall(39 /* getpid */, &[])?;
//! p.cure()?;
//! # let _ = pid; Ok(()) }
//! ```

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering::{Acquire, Release, SeqCst};
use std::time::{Duration, Instant};

use memmap2::MmapMut;
use pdump_arch::native::syscall::nr;
use pdump_arch::{AltStack, Arch, Native};
use pdump_parasite::{cmd, role, state, Control, Layout, Misc, CTL_MAGIC, PROTOCOL_VERSION};

use crate::blob::{Blob, PARASITE};
use crate::ptrace::{PtraceError, Seized, Stop};
use crate::remote::{RemoteError, RemoteThread, Stub, ThreadSnapshot};

/// Errors of infection and of parasite commands.
#[derive(Debug, thiserror::Error)]
pub enum InfectError {
    /// Remote execution failed.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// ptrace failed.
    #[error(transparent)]
    Ptrace(#[from] PtraceError),
    /// A remote syscall returned an error.
    #[error("pid {pid}: remote {what} failed")]
    RemoteSyscall {
        /// The process.
        pid: i32,
        /// Which syscall.
        what: &'static str,
        /// errno
        #[source]
        source: nix::Error,
    },
    /// Mapping the shared area in the dumper failed.
    #[error("pid {pid}: mapping the parasite area {path} in the dumper")]
    MapArea {
        /// The process.
        pid: i32,
        /// map_files path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The blob did not answer in time.
    #[error("pid {pid}: the parasite did not answer command {cmd} within {secs} s")]
    Timeout {
        /// The process.
        pid: i32,
        /// Command.
        cmd: u32,
        /// Seconds waited.
        secs: u64,
    },
    /// The blob stopped or faulted.
    #[error("pid {pid}: the parasite stopped ({what})")]
    Crashed {
        /// The process.
        pid: i32,
        /// What happened.
        what: String,
    },
    /// pidfd_open / pidfd_getfd failed.
    #[error("pid {pid}: taking fd {fd} with pidfd_getfd")]
    GetFd {
        /// The process.
        pid: i32,
        /// The fd in the task.
        fd: i32,
        /// errno
        #[source]
        source: nix::Error,
    },
    /// Writing the command pipe failed.
    #[error("pid {pid}: writing the parasite's command pipe")]
    Doorbell {
        /// The process.
        pid: i32,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A parasite command returned an error.
    #[error("pid {pid}: parasite command {what} failed")]
    Command {
        /// The process.
        pid: i32,
        /// Command.
        what: &'static str,
        /// errno
        #[source]
        source: nix::Error,
    },
    /// Taking over the copy-on-write snapshot failed.
    #[error("pid {pid}: taking over its snapshot (pid {ns_pid} in its namespace)")]
    Snapshot {
        /// The process.
        pid: i32,
        /// The snapshot's pid in the process's pid namespace.
        ns_pid: i32,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The cure frame could not be built.
    #[error("pid {pid}: cannot build the cure frame ({what})")]
    Frame {
        /// The process.
        pid: i32,
        /// Why.
        what: String,
    },
}

type Result<T> = std::result::Result<T, InfectError>;

pub(crate) fn errno_of(r: i64) -> nix::Error {
    nix::Error::from_raw((-r) as i32)
}

/// The parasite living inside one seized process.
pub struct Parasite<'a> {
    // Declared before `local`: a held guard must be released while the
    // shared area is still mapped (fields drop in declaration order).
    guard: Option<guard::Held>,
    seized: &'a Seized,
    pid: i32,
    tid: i32,
    snapshot: ThreadSnapshot,
    area: u64,
    layout: Layout,
    local: MmapMut,
    cmd_w: Option<File>,
    seq: u32,
    running: bool,
    mapped: bool,
}

/// A parasite left serving in its task while the dumper holds no borrow
/// of the [`Seized`] (see [`Parasite::park`]). Take it back with
/// [`ParkedParasite::resume`] to cure the task. Dropped without that, its
/// command pipe closes and the blob cures the task on its own (it sees the
/// end of the pipe): kill the task first where it must not run on.
pub struct ParkedParasite {
    guard: Option<guard::Held>,
    pid: i32,
    tid: i32,
    snapshot: ThreadSnapshot,
    area: u64,
    layout: Layout,
    /// The dumper's map of the shared area: dropped while parked unless a
    /// guard lives in it (a tree of many processes would otherwise keep
    /// the touched pages of every area mapped), mapped again on resume.
    local: Option<MmapMut>,
    cmd_w: Option<File>,
    seq: u32,
    running: bool,
    mapped: bool,
}

impl std::fmt::Debug for ParkedParasite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParkedParasite")
            .field("pid", &self.pid)
            .field("area", &self.area)
            .finish()
    }
}

impl ParkedParasite {
    /// The task's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The parasite again, in `seized` (the process it was parked from).
    /// Fails only if its shared area cannot be mapped again; the blob then
    /// cures the task on its own once this is dropped.
    pub fn resume(self, seized: &Seized) -> Result<Parasite<'_>> {
        assert_eq!(seized.pid(), self.pid, "resumed in another process");
        let local = match self.local {
            Some(l) => l,
            None => map_area(self.pid, self.area, self.layout.size)?,
        };
        Ok(Parasite {
            guard: self.guard,
            seized,
            pid: self.pid,
            tid: self.tid,
            snapshot: self.snapshot,
            area: self.area,
            layout: self.layout,
            local,
            cmd_w: self.cmd_w,
            seq: self.seq,
            running: self.running,
            mapped: self.mapped,
        })
    }
}

impl std::fmt::Debug for Parasite<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parasite")
            .field("pid", &self.pid)
            .field("area", &self.area)
            .finish()
    }
}

/// The blob's guard: a robust futex held by the dumper thread.
///
/// While the blob waits without a pipe to watch, the dumper thread holds
/// `Control::guard` (its tid in the word) with the word linked into the
/// thread's robust futex list. If the thread dies (SIGKILL included), the
/// kernel's exit path sets FUTEX_OWNER_DIED in the word and wakes the blob,
/// which then cures the task on its own. No pid is involved, so it works for
/// tasks in any pid namespace.
pub(crate) mod guard {
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};

    /// `struct robust_list_head`.
    #[repr(C)]
    struct Head {
        list: u64,
        futex_offset: i64,
        pending: u64,
    }

    thread_local! {
        static HEAD: Box<std::cell::UnsafeCell<Head>> =
            Box::new(std::cell::UnsafeCell::new(Head { list: 0, futex_offset: 0, pending: 0 }));
    }

    /// A held guard; release it with [`Held::release`] (also on drop).
    pub struct Held {
        word: *const AtomicU32,
        prev_head: u64,
        prev_len: usize,
        released: bool,
    }

    /// Hold `word` (in the shared area) with `entry` (also in the shared area)
    /// as this thread's robust-list entry.
    pub fn hold(word: &AtomicU32, entry: &AtomicU64) -> Held {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        word.store(tid, SeqCst);
        let mut prev_head = 0u64;
        let mut prev_len = 0usize;
        // SAFETY: get_robust_list for the calling thread writes one pointer
        // and one length into locals we own.
        unsafe {
            libc::syscall(
                libc::SYS_get_robust_list,
                0,
                &mut prev_head as *mut u64,
                &mut prev_len as *mut usize,
            )
        };
        HEAD.with(|h| {
            let head = h.get();
            let head_addr = head as u64;
            let entry_addr = entry as *const AtomicU64 as u64;
            // The list is circular: the entry points back at the head.
            entry.store(head_addr, SeqCst);
            // SAFETY: the head is this thread's own, boxed (stable address),
            // and only the kernel reads it, at this thread's exit.
            unsafe {
                (*head).list = entry_addr;
                (*head).futex_offset = word as *const AtomicU32 as i64 - entry_addr as i64;
                (*head).pending = 0;
                libc::syscall(libc::SYS_set_robust_list, head, std::mem::size_of::<Head>());
            }
        });
        Held {
            word,
            prev_head,
            prev_len,
            released: false,
        }
    }

    impl Held {
        /// Unlink the guard, give the previous robust list back, and wake the blob.
        pub fn release(mut self) {
            self.do_release();
        }

        fn do_release(&mut self) {
            if self.released {
                return;
            }
            self.released = true;
            HEAD.with(|h| {
                let head = h.get();
                // SAFETY: as in `hold`; an empty list points at itself.
                unsafe {
                    (*head).list = head as u64;
                    libc::syscall(libc::SYS_set_robust_list, self.prev_head, self.prev_len);
                }
            });
            // SAFETY: `word` points into the shared area, which the Parasite
            // keeps mapped for longer than any guard it holds.
            let word = unsafe { &*self.word };
            word.store(0, SeqCst);
            // SAFETY: FUTEX_WAKE on a shared word; the kernel only reads it.
            unsafe {
                libc::syscall(libc::SYS_futex, self.word, libc::FUTEX_WAKE, i32::MAX);
            }
        }
    }

    impl Drop for Held {
        fn drop(&mut self) {
            self.do_release();
        }
    }
}

/// Open a pidfd.
pub fn pidfd_open(pid: i32) -> std::result::Result<OwnedFd, nix::Error> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r < 0 {
        return Err(nix::Error::last());
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// Duplicate fd `fd` of the process behind `pidfd` into the dumper.
pub fn pidfd_getfd(pidfd: &OwnedFd, fd: i32) -> std::result::Result<OwnedFd, nix::Error> {
    // SAFETY: pidfd_getfd takes a pidfd, an fd number and flags, returns a new fd.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if r < 0 {
        return Err(nix::Error::last());
    }
    // SAFETY: a new fd that only we hold.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

impl<'a> Parasite<'a> {
    /// Infect the seized process: the blob runs in its first thread (the leader).
    pub fn infect(seized: &'a Seized) -> Result<Parasite<'a>> {
        let tid = seized.threads()[0].tid;
        let snapshot = ThreadSnapshot::take(seized, tid)?;
        Self::infect_with(seized, snapshot, &PARASITE)
    }

    /// [`Parasite::infect`] with the leader's state already taken (nothing
    /// has run in it since): saves reading its registers and xstate again.
    pub(crate) fn infect_taken(seized: &'a Seized, leader: ThreadSnapshot) -> Result<Parasite<'a>> {
        assert_eq!(
            leader.tid,
            seized.threads()[0].tid,
            "not the leader's state"
        );
        Self::infect_with(seized, leader, &PARASITE)
    }

    fn infect_with(
        seized: &'a Seized,
        snapshot: ThreadSnapshot,
        blob: &Blob,
    ) -> Result<Parasite<'a>> {
        let pid = seized.pid();
        let tid = snapshot.tid;
        let layout = Layout::new(blob.mem_size);
        let stub = Stub::install(seized)?;
        let mut rt = RemoteThread::begin(seized, &stub, &snapshot)?;
        let prot = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
        let flags = (libc::MAP_SHARED | libc::MAP_ANONYMOUS) as u64;
        let area = rt.syscall(nr::MMAP, &[0, layout.size as u64, prot, flags, u64::MAX, 0])?;
        if area < 0 {
            drop(rt);
            let _ = stub.remove();
            return Err(InfectError::RemoteSyscall {
                pid,
                what: "mmap",
                source: errno_of(area),
            });
        }
        let area = area as u64;
        let mut guard = AreaGuard {
            rt: Some(rt),
            area,
            size: layout.size as u64,
            pid,
        };
        let local = map_area(pid, area, layout.size)?;
        let mut p = Parasite {
            seized,
            pid,
            tid,
            snapshot: snapshot.clone(),
            area,
            layout,
            local,
            cmd_w: None,
            seq: 0,
            running: false,
            mapped: true,
            guard: None,
        };
        blob.load_into(&mut p.local[..blob.mem_size], area);
        p.write_control();
        p.write_cure_frame()?;
        // Start the blob from the syscall-exit stop of the mmap.
        let rt = guard.rt.take().expect("remote thread present");
        let regs = rt.regs_for_blob(
            area,
            area + layout.snap_stack_off as u64,
            area + layout.ctl_off as u64,
        );
        rt.into_blob(&regs)?;
        std::mem::forget(guard);
        stub.remove()?;
        p.hold_guard();
        p.running = true;
        seized.cont(tid, 0)?;
        // From here on, Drop cures the task.
        p.handshake()?;
        Ok(p)
    }

    fn ctl(&self) -> &Control {
        // SAFETY: the control block lies inside the mapping at a page-aligned
        // offset, Control is repr(C) of atomics and plain words (valid for
        // any bit pattern), and the mapping lives as long as `self`.
        unsafe { &*(self.local.as_ptr().add(self.layout.ctl_off) as *const Control) }
    }

    fn write_control(&mut self) {
        self.write_control_at(self.layout.ctl_off, role::PARASITE);
    }

    /// Fill the control block at `off` for a blob of role `who`.
    fn write_control_at(&mut self, off: usize, who: u32) {
        let size = std::mem::size_of::<Control>();
        self.local[off..off + size].fill(0);
        let area = self.area;
        let layout = self.layout;
        let ctl_ptr = self.local[off..].as_mut_ptr() as *mut Control;
        // SAFETY: in bounds (the layout reserves a page-rounded slot), aligned
        // (page offset), and nobody else uses the block yet (the blob has not
        // started).
        let ctl = unsafe { &mut *ctl_ptr };
        ctl.magic = CTL_MAGIC;
        ctl.version = PROTOCOL_VERSION;
        ctl.dumper_pid = std::process::id() as i32;
        ctl.cure_frame = area + layout.frame_off as u64;
        ctl.area_addr = area;
        ctl.area_size = layout.size as u64;
        ctl.role = who;
        ctl.data_addr = area + layout.data_off as u64;
        ctl.cmd_rfd.store(-1, SeqCst);
        ctl.cmd_wfd.store(-1, SeqCst);
        ctl.snap_rfd.store(-1, SeqCst);
        ctl.snap_wfd.store(-1, SeqCst);
        ctl.sync_wfd.store(-1, SeqCst);
        for p in ctl.pipe_fds.iter() {
            p[0].store(-1, SeqCst);
            p[1].store(-1, SeqCst);
        }
        ctl.state.store(state::LOADED, SeqCst);
    }

    fn write_cure_frame(&mut self) -> Result<()> {
        let mut regs = self.snapshot.regs;
        Native::apply_restart(&mut regs);
        let off = self.layout.frame_off;
        let buf = &mut self.local[off..off + pdump_parasite::FRAME_BYTES];
        Native::build_frame(
            buf,
            self.area + off as u64,
            &regs,
            self.snapshot.sigmask,
            AltStack::KEEP,
            &self.snapshot.fpregs,
        )
        .map_err(|e| InfectError::Frame {
            pid: self.pid,
            what: format!("{e:?}"),
        })?;
        Ok(())
    }

    /// Check the blob is alive while waiting: a stop or death of its thread is an error.
    fn check_alive(&self) -> Result<()> {
        match crate::ptrace::wait_stop_flags(self.tid, libc::WNOHANG)? {
            None => Ok(()),
            Some(Stop::Exited { status }) => Err(PtraceError::Died {
                tid: self.tid,
                status,
            }
            .into()),
            Some(other) => Err(InfectError::Crashed {
                pid: self.pid,
                what: format!("{other:?}"),
            }),
        }
    }

    fn futex_wait(word: &std::sync::atomic::AtomicU32, val: u32, ms: u64) {
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: (ms * 1_000_000) as i64,
        };
        // SAFETY: FUTEX_WAIT on a word inside our shared mapping with a
        // relative timeout; the kernel only reads the word.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                word as *const _ as *const u32,
                libc::FUTEX_WAIT,
                val,
                &ts as *const libc::timespec,
            );
        }
    }

    /// Wait (futex on the state word, checking the blob's thread) until the
    /// blob reaches handshake state `want`.
    fn wait_state(&self, want: u32, start: Instant, what: &str) -> Result<()> {
        loop {
            let st = self.ctl().state.load(Acquire);
            if st == want {
                return Ok(());
            }
            if st == state::SELF_CURE {
                return Err(InfectError::Crashed {
                    pid: self.pid,
                    what: what.into(),
                });
            }
            self.check_alive()?;
            if start.elapsed() > Duration::from_secs(10) {
                return Err(InfectError::Timeout {
                    pid: self.pid,
                    cmd: u32::MAX,
                    secs: 10,
                });
            }
            Self::futex_wait(&self.ctl().state, st, 20);
        }
    }

    fn handshake(&mut self) -> Result<()> {
        let start = Instant::now();
        self.wait_state(state::READY, start, "blob could not create its pipe")?;
        let wfd = self.ctl().cmd_wfd.load(SeqCst);
        let pidfd = pidfd_open(self.pid).map_err(|source| InfectError::GetFd {
            pid: self.pid,
            fd: -1,
            source,
        })?;
        let w = pidfd_getfd(&pidfd, wfd).map_err(|source| InfectError::GetFd {
            pid: self.pid,
            fd: wfd,
            source,
        })?;
        self.cmd_w = Some(File::from(w));
        self.ctl().state.store(state::TAKEN, Release);
        if let Some(g) = self.guard.take() {
            g.release();
        }
        // Commands may be posted at once: the blob reads the doorbell once
        // it serves. Only holding the guard again (FINI) must wait until
        // the blob is past it (`past_guard`).
        Ok(())
    }

    /// Wait until the blob is past the guard released by the handshake:
    /// holding it again (FINI) before the blob saw it released would leave
    /// both waiting.
    fn past_guard(&self) -> Result<()> {
        self.wait_state(
            state::SERVING,
            Instant::now(),
            "blob cured itself during the handshake",
        )
    }

    fn hold_guard(&mut self) {
        let off = self.layout.ctl_off;
        // SAFETY: as in `ctl()`: the control block is valid for the mapping's life.
        let ctl = unsafe { &*(self.local.as_ptr().add(off) as *const Control) };
        self.guard = Some(guard::hold(&ctl.guard, &ctl.guard_entry));
    }

    /// Send a command and wait for its result.
    pub fn command(&mut self, command: u32, args: &[u64]) -> Result<i64> {
        let seq = self.post(command, args)?;
        self.wait_done(seq, command)
    }

    /// Send a command without waiting (pair with [`Parasite::wait_done`]).
    pub fn post(&mut self, command: u32, args: &[u64]) -> Result<u32> {
        crate::fault::point();
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        {
            let ctl = self.ctl();
            for (i, a) in ctl.args.iter().enumerate() {
                a.store(args.get(i).copied().unwrap_or(0), SeqCst);
            }
            ctl.cmd.store(command, SeqCst);
            ctl.cmd_seq.store(seq, Release);
        }
        let pid = self.pid;
        let pipe = self.cmd_w.as_mut().ok_or_else(|| InfectError::Doorbell {
            pid,
            source: std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the blob is not serving commands",
            ),
        })?;
        pipe.write_all(&[1])
            .map_err(|source| InfectError::Doorbell { pid, source })?;
        Ok(seq)
    }

    /// Whether command `seq` has finished (no waiting).
    pub fn poll_done(&self, seq: u32) -> bool {
        self.ctl().done_seq.load(Acquire) == seq
    }

    /// Wait for command `seq` to finish; returns its raw result.
    pub fn wait_done(&self, seq: u32, command: u32) -> Result<i64> {
        let start = Instant::now();
        loop {
            let done = self.ctl().done_seq.load(Acquire);
            if done == seq {
                return Ok(self.ctl().ret.load(Acquire) as i64);
            }
            self.check_alive()?;
            if start.elapsed() > Duration::from_secs(120) {
                return Err(InfectError::Timeout {
                    pid: self.pid,
                    cmd: command,
                    secs: 120,
                });
            }
            Self::futex_wait(&self.ctl().done_seq, done, 50);
        }
    }

    /// Run a syscall inside the task through the parasite (fast path: no
    /// ptrace round trips). Returns the raw result (`-errno` on failure).
    pub fn syscall(&mut self, nr: u64, args: &[u64]) -> Result<i64> {
        let mut a = [0u64; 7];
        a[0] = nr;
        for (i, v) in args.iter().take(6).enumerate() {
            a[i + 1] = *v;
        }
        self.command(cmd::SYSCALL, &a)
    }

    /// The area's address in the task.
    pub fn area(&self) -> u64 {
        self.area
    }

    /// The data buffer, as the dumper sees it.
    pub fn data_mut(&mut self) -> &mut [u8] {
        let off = self.layout.data_off;
        &mut self.local[off..off + pdump_parasite::DATA_BYTES]
    }

    /// The data buffer's address in the task.
    pub fn data_addr(&self) -> u64 {
        self.area + self.layout.data_off as u64
    }

    /// Gather signal actions, itimers, the leader's altstack and the given POSIX timers.
    pub fn misc(&mut self, timer_ids: &[i32]) -> Result<Misc> {
        let n = timer_ids.len().min(pdump_parasite::MAX_TIMERS);
        {
            let m = self.misc_mut();
            m.ntimers = n as u32;
            m.timer_ids[..n].copy_from_slice(&timer_ids[..n]);
        }
        let r = self.command(cmd::MISC, &[])?;
        if r < 0 {
            return Err(InfectError::Command {
                pid: self.pid,
                what: "MISC",
                source: errno_of(r),
            });
        }
        Ok(*self.misc_mut())
    }

    fn misc_mut(&mut self) -> &mut Misc {
        let p = self.data_mut().as_mut_ptr() as *mut Misc;
        // SAFETY: the data buffer is DATA_BYTES long (Misc fits, asserted in
        // the protocol crate), page aligned, and the blob is idle between
        // commands, so we are its only user now.
        unsafe { &mut *p }
    }

    /// Create `n` page pipes of `size` bytes in the task and take their read ends.
    pub fn page_pipes(&mut self, n: usize, size: usize) -> Result<Vec<File>> {
        let r = self.command(cmd::PIPES, &[n as u64, size as u64])?;
        if r < 0 {
            return Err(InfectError::Command {
                pid: self.pid,
                what: "PIPES",
                source: errno_of(r),
            });
        }
        let pidfd = pidfd_open(self.pid).map_err(|source| InfectError::GetFd {
            pid: self.pid,
            fd: -1,
            source,
        })?;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let fd = self.ctl().pipe_fds[i][0].load(SeqCst);
            let f = pidfd_getfd(&pidfd, fd).map_err(|source| InfectError::GetFd {
                pid: self.pid,
                fd,
                source,
            })?;
            out.push(File::from(f));
        }
        Ok(out)
    }

    /// Start vmsplicing `iovs` (address, length) into page pipe `pipe`.
    /// Returns the command's sequence number for [`Parasite::wait_done`].
    pub fn post_vmsplice(&mut self, pipe: usize, iovs: &[(u64, u64)]) -> Result<u32> {
        write_iovs(self.data_mut(), iovs);
        self.post(cmd::VMSPLICE, &[pipe as u64, iovs.len() as u64])
    }

    /// Fork a copy-on-write snapshot of the task (`cmd::FORK`): a child
    /// process holding the task's memory as it is now, serving page commands
    /// on its own control block (it makes its own page pipes when drained).
    /// Call before the cure. `max_fd` is the highest fd of the task (the
    /// child closes every inherited fd).
    ///
    /// On error nothing is left: a child that was created is killed and
    /// reaped through the blob.
    pub fn fork_snapshot(&mut self, max_fd: i32) -> Result<crate::cow::Snapshot> {
        let pid = self.pid;
        let snap_off = self.layout.snap_ctl_off;
        self.write_control_at(snap_off, role::SNAPSHOT);
        let snap_addr = self.area + snap_off as u64;
        let stack_top = self.area + self.layout.size as u64;
        let close_max = (max_fd.max(0) as u64) + 64;
        let r = self.command(cmd::FORK, &[snap_addr, stack_top, close_max])?;
        if r < 0 {
            return Err(InfectError::Command {
                pid,
                what: "FORK",
                source: errno_of(r),
            });
        }
        let ns_pid = r as i32;
        match self.adopt_snapshot(ns_pid) {
            Ok(s) => Ok(s),
            Err(e) => {
                self.abort_snapshot(ns_pid);
                Err(e)
            }
        }
    }

    fn adopt_snapshot(&mut self, ns_pid: i32) -> Result<crate::cow::Snapshot> {
        let pid = self.pid;
        let wfd = self.ctl().snap_wfd.load(SeqCst);
        let pidfd = pidfd_open(pid).map_err(|source| InfectError::GetFd {
            pid,
            fd: -1,
            source,
        })?;
        let w = pidfd_getfd(&pidfd, wfd).map_err(|source| InfectError::GetFd {
            pid,
            fd: wfd,
            source,
        })?;
        let child = crate::cow::find_child(pid, self.tid, ns_pid).map_err(|source| {
            InfectError::Snapshot {
                pid,
                ns_pid,
                source,
            }
        })?;
        let local = map_area(pid, self.area, self.layout.size)?;
        crate::cow::Snapshot::new(pid, child, ns_pid, local, self.layout, File::from(w)).map_err(
            |source| InfectError::Snapshot {
                pid,
                ns_pid,
                source,
            },
        )
    }

    /// Kill the snapshot `ns_pid` and reap it through the blob (error paths
    /// before the cure): nothing is left of it.
    pub fn abort_snapshot(&mut self, ns_pid: i32) {
        const WCLONE: u64 = 0x8000_0000;
        self.ctl().snap_pid.store(0, SeqCst);
        let _ = self.syscall(nr::KILL, &[ns_pid as u64, libc::SIGKILL as u64]);
        if let Err(e) = self.syscall(nr::WAIT4, &[ns_pid as u64, 0, WCLONE, 0]) {
            log::error!("pid {}: reaping its snapshot {ns_pid}: {e}", self.pid);
        }
    }

    /// Start a [`pdump_parasite::cmd::VMSPLICE_SCAN`] of `iovs` (whole
    /// pages) into page pipe `pipe`: only non-zero pages are vmspliced; read
    /// the runs with [`Parasite::scan_runs`] once it is done.
    pub fn post_vmsplice_scan(&mut self, pipe: usize, iovs: &[(u64, u64)]) -> Result<u32> {
        write_iovs(self.data_mut(), iovs);
        self.post(cmd::VMSPLICE_SCAN, &[pipe as u64, iovs.len() as u64])
    }

    /// The runs a finished [`Parasite::post_vmsplice_scan`] of `niov`
    /// iovecs found (empty if its count is out of bounds).
    pub fn scan_runs(&mut self, niov: usize) -> Vec<pdump_parasite::ScanRun> {
        read_scan_runs(self.data_mut(), niov)
    }

    /// Leave the blob serving in the task without curing it, releasing the
    /// borrow of the [`Seized`]: a dump that kills its tree saves the cure
    /// (a stop and a remote munmap per task) when it succeeds, and resumes
    /// and cures every parked parasite when it fails.
    pub fn park(self) -> ParkedParasite {
        let me = std::mem::ManuallyDrop::new(self);
        // SAFETY: `me` is never used or dropped again; each field is moved
        // out exactly once (the `Seized` borrow is just forgotten).
        let (guard, snapshot, local, cmd_w) = unsafe {
            (
                std::ptr::read(&me.guard),
                std::ptr::read(&me.snapshot),
                std::ptr::read(&me.local),
                std::ptr::read(&me.cmd_w),
            )
        };
        ParkedParasite {
            // A held guard is linked into this thread's robust list from
            // inside the local map: keep the map then.
            local: guard.is_some().then_some(local),
            guard,
            pid: me.pid,
            tid: me.tid,
            snapshot,
            area: me.area,
            layout: me.layout,
            cmd_w,
            seq: me.seq,
            running: me.running,
            mapped: me.mapped,
        }
    }

    /// Cure the task: it continues exactly as it was when seized (still
    /// seized: dropping the [`Seized`] lets it run).
    pub fn cure(mut self) -> Result<()> {
        self.cure_inner()
    }

    fn cure_inner(&mut self) -> Result<()> {
        if !self.mapped {
            return Ok(());
        }
        let s = self.seized;
        if self.running {
            if self.cmd_w.is_some() {
                if self.guard.is_none() {
                    self.past_guard()?;
                    self.hold_guard();
                }
                let r = self.command(cmd::FINI, &[])?;
                if r < 0 {
                    return Err(InfectError::Command {
                        pid: self.pid,
                        what: "FINI",
                        source: errno_of(r),
                    });
                }
            }
            // Stop the blob (spinning after FINI, or in its read() if FINI
            // could not be sent); nothing is pending, so nothing restarts.
            s.interrupt(self.tid)?;
            match crate::ptrace::wait_stop(self.tid)? {
                Stop::Event { .. } => {}
                Stop::Exited { status } => {
                    return Err(PtraceError::Died {
                        tid: self.tid,
                        status,
                    }
                    .into())
                }
                other => {
                    return Err(InfectError::Crashed {
                        pid: self.pid,
                        what: format!("{other:?} while stopping"),
                    })
                }
            }
            self.running = false;
        }
        // After FINI the blob holds no fd. If FINI could not be sent (the
        // blob never finished its handshake), close what it published.
        let mut fds: Vec<i32> = vec![
            self.ctl().cmd_rfd.load(SeqCst),
            self.ctl().cmd_wfd.load(SeqCst),
            self.ctl().snap_rfd.load(SeqCst),
            self.ctl().snap_wfd.load(SeqCst),
        ];
        for p in self.ctl().pipe_fds.iter() {
            fds.push(p[0].load(SeqCst));
            fds.push(p[1].load(SeqCst));
        }
        self.cmd_w = None;
        let stub = Stub::install(s)?;
        let snapshot = self.snapshot.clone();
        let mut rt = RemoteThread::begin(s, &stub, &snapshot)?;
        for fd in fds.into_iter().filter(|&fd| fd >= 0) {
            rt.syscall(nr::CLOSE, &[fd as u64])?;
        }
        let r = rt.syscall(nr::MUNMAP, &[self.area, self.layout.size as u64])?;
        if r < 0 {
            return Err(InfectError::RemoteSyscall {
                pid: self.pid,
                what: "munmap",
                source: errno_of(r),
            });
        }
        self.mapped = false;
        rt.end()?;
        stub.remove()?;
        if let Some(g) = self.guard.take() {
            g.release();
        }
        Ok(())
    }
}

/// Write `iovs` (address, length) as the blob's iovecs at the start of its
/// data buffer `d` (for VMSPLICE and VMSPLICE_SCAN).
pub(crate) fn write_iovs(d: &mut [u8], iovs: &[(u64, u64)]) {
    assert!(iovs.len() <= pdump_parasite::MAX_IOVS);
    for (i, (a, l)) in iovs.iter().enumerate() {
        d[i * 16..i * 16 + 8].copy_from_slice(&a.to_le_bytes());
        d[i * 16 + 8..i * 16 + 16].copy_from_slice(&l.to_le_bytes());
    }
}

/// The runs a finished VMSPLICE_SCAN of `niov` iovecs left in the blob's
/// data buffer `d` (empty if its count is out of bounds).
pub(crate) fn read_scan_runs(d: &[u8], niov: usize) -> Vec<pdump_parasite::ScanRun> {
    let off = pdump_parasite::scan_runs_offset(niov);
    let max = pdump_parasite::max_scan_runs(niov);
    let word = |o: usize| u64::from_le_bytes(d[o..o + 8].try_into().expect("8 bytes"));
    let n = word(off) as usize;
    if n > max {
        return Vec::new();
    }
    let size = std::mem::size_of::<pdump_parasite::ScanRun>();
    (0..n)
        .map(|i| {
            let o = off + 8 + i * size;
            let w32 =
                |k: usize| u32::from_le_bytes(d[o + k..o + k + 4].try_into().expect("4 bytes"));
            pdump_parasite::ScanRun {
                addr: word(o),
                npages: w32(8),
                zero: w32(12),
                crc: w32(16),
                iov: w32(20),
            }
        })
        .collect()
}

impl crate::pagestream::PageSource for Parasite<'_> {
    fn mem_pid(&self) -> i32 {
        self.pid
    }
    fn page_pipes(&mut self, n: usize, size: usize) -> Result<Vec<File>> {
        Parasite::page_pipes(self, n, size)
    }
    fn post_vmsplice(&mut self, pipe: usize, iovs: &[(u64, u64)], scan: bool) -> Result<u32> {
        if scan {
            Parasite::post_vmsplice_scan(self, pipe, iovs)
        } else {
            Parasite::post_vmsplice(self, pipe, iovs)
        }
    }
    fn wait_done(&self, seq: u32, command: u32) -> Result<i64> {
        Parasite::wait_done(self, seq, command)
    }
    fn scan_runs(&mut self, niov: usize) -> Vec<pdump_parasite::ScanRun> {
        Parasite::scan_runs(self, niov)
    }
}

impl Drop for Parasite<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.cure_inner() {
            log::error!("curing pid {}: {e}", self.pid);
        }
        if let Some(g) = self.guard.take() {
            g.release();
        }
    }
}

/// Unmaps the area again if infection fails before the blob runs.
struct AreaGuard<'a> {
    rt: Option<RemoteThread<'a>>,
    area: u64,
    size: u64,
    pid: i32,
}

impl Drop for AreaGuard<'_> {
    fn drop(&mut self) {
        if let Some(mut rt) = self.rt.take() {
            if let Err(e) = rt.syscall(nr::MUNMAP, &[self.area, self.size]) {
                log::error!("pid {}: unmapping the parasite area: {e}", self.pid);
            }
        }
    }
}

pub(crate) fn map_area(pid: i32, area: u64, size: usize) -> Result<MmapMut> {
    let path = format!("/proc/{pid}/map_files/{:x}-{:x}", area, area + size as u64);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|source| InfectError::MapArea {
            pid,
            path: path.clone(),
            source,
        })?;
    // SAFETY: a shared mapping of the shmem object behind the task's area;
    // the task writes it concurrently, which is why every access goes through
    // atomics (control block) or happens while the blob is idle (data).
    unsafe { MmapMut::map_mut(&f) }.map_err(|source| InfectError::MapArea { pid, path, source })
}
