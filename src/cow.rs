//! Copy-on-write snapshots: the task is frozen while its state is captured,
//! not while its pages are written (`DumpOptions::cow`, the default with
//! `--leave-running`).
//!
//! ```text
//!  frozen:  infect ─ MISC, altstacks ─ FORK: the blob forks the task (exit
//!           signal 0) onto its own stack and control block; the child drops
//!           every inherited fd, leaves the session, then the blob answers ─
//!           pages of MAP_SHARED, MADV_DONTFORK and MADV_WIPEONFORK areas
//!           (which the child does not hold as they were) streamed from the
//!           task into a spill file (crate::pagestream: zero runs, CRCs) ─
//!           cure
//!  running: (the whole tree is released) ─ the snapshot makes its page
//!           pipes (PIPES) and is streamed like a frozen task
//!           (crate::pagestream: several pipes and drainer threads, zero
//!           runs, CRC32C inline), the spilled runs read back from the spill
//!           file in their place ─ the snapshot exits on end of file ─ the
//!           dumper briefly seizes the task again to reap it (wait4 __WCLONE)
//! ```
//!
//! The image is the same as without a snapshot: runs in address order, zero
//! runs for zero pages. Why a single `clone` with exit signal 0, and what is
//! visible to the task, is in `docs/architecture.md` ("Copy-on-write
//! snapshot").

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::{Acquire, Release, SeqCst};
use std::time::{Duration, Instant};

use memmap2::MmapMut;
use pdump_arch::native::syscall::nr;
use pdump_parasite::{cmd, Control, Layout};

use crate::dump::{DumpError, DumpOptions};
use crate::image::{self, model};
use crate::infect::{InfectError, Parasite};
use crate::pagestream::{self, PageSource};
use crate::procfs;
use crate::ptrace::{PtraceError, Seized};
use crate::remote::{RemoteError, RemoteThread, Stub, ThreadSnapshot};

/// Errors of the snapshot's own steps.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Opening a pidfd of the snapshot failed.
    #[error("snapshot {pid}: pidfd_open")]
    PidFd {
        /// The snapshot (dumper's pid namespace).
        pid: i32,
        /// errno
        #[source]
        source: std::io::Error,
    },
    /// The snapshot did not exit after its command pipe was closed.
    #[error("snapshot {pid}: still running {secs} s after end of file on its command pipe")]
    NoExit {
        /// The snapshot.
        pid: i32,
        /// Seconds waited.
        secs: u64,
    },
    /// Seizing the task again to reap its snapshot failed.
    #[error("pid {pid}: seizing it again to reap its snapshot")]
    ReapSeize {
        /// The task.
        pid: i32,
        /// Cause.
        #[source]
        source: PtraceError,
    },
    /// The remote wait4 that reaps the snapshot failed to run.
    #[error("pid {pid}: remote wait4 for its snapshot {ns_pid}")]
    ReapRemote {
        /// The task.
        pid: i32,
        /// The snapshot's pid in the task's pid namespace.
        ns_pid: i32,
        /// Cause.
        #[source]
        source: RemoteError,
    },
    /// The remote wait4 returned an error or nothing.
    #[error("pid {pid}: wait4 for its snapshot {ns_pid} returned {ret}")]
    ReapResult {
        /// The task.
        pid: i32,
        /// The snapshot's pid in the task's pid namespace.
        ns_pid: i32,
        /// The raw result.
        ret: i64,
    },
}

/// The copy-on-write snapshot of one task: a child of the task (exit signal
/// 0) running the blob on its own control block, driven by the dumper over
/// its own command pipe. Dropping it ends it (end of file: it exits; killed
/// if it does not); [`Snapshot::finish`] also reaps it.
pub struct Snapshot {
    victim: i32,
    pid: i32,
    ns_pid: i32,
    pidfd: OwnedFd,
    local: MmapMut,
    layout: Layout,
    cmd_w: Option<File>,
    seq: u32,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("victim", &self.victim)
            .field("pid", &self.pid)
            .field("ns_pid", &self.ns_pid)
            .finish()
    }
}

/// The child `ns_pid` (pid in the task's namespace) of thread `tid` of
/// `pid`, as a pid of the dumper's namespace.
pub fn find_child(pid: i32, tid: i32, ns_pid: i32) -> std::io::Result<i32> {
    let list = std::fs::read_to_string(procfs::task_path(pid, tid, "children"))?;
    let level = ns_level(pid)?;
    for c in list
        .split_whitespace()
        .filter_map(|w| w.parse::<i32>().ok())
    {
        if ns_pid_at(c, level) == Some(ns_pid) {
            return Ok(c);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("no child with pid {ns_pid} (in its namespace) under {pid}/{tid}"),
    ))
}

/// The `NSpid` entries of `pid` (its pid in our namespace first).
fn ns_pids(pid: i32) -> Option<Vec<i32>> {
    let st = std::fs::read_to_string(procfs::proc_path(pid, "status")).ok()?;
    let l = st.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    l.split_whitespace().map(|v| v.parse().ok()).collect()
}

/// The index in `NSpid` of `pid`'s own pid namespace, where the pids its
/// syscalls (clone, wait4, kill) use are read. Its children may live one
/// namespace deeper (after `unshare(CLONE_NEWPID)`), so they are matched
/// at this index, not by their last entry.
fn ns_level(pid: i32) -> std::io::Result<usize> {
    ns_pids(pid)
        .and_then(|v| v.len().checked_sub(1))
        .ok_or_else(|| std::io::Error::other(format!("no NSpid for {pid}")))
}

/// `pid`'s pid at namespace index `level` of `NSpid`.
fn ns_pid_at(pid: i32, level: usize) -> Option<i32> {
    ns_pids(pid)?.get(level).copied()
}

fn futex_wait(word: &std::sync::atomic::AtomicU32, val: u32, ms: u64) {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: (ms * 1_000_000) as i64,
    };
    // SAFETY: FUTEX_WAIT on a word inside our shared mapping with a relative
    // timeout; the kernel only reads the word.
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

/// Whether the process behind `pidfd` has exited, waiting up to `ms`.
fn exited(pidfd: &OwnedFd, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd we own.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

impl Snapshot {
    /// Take over the snapshot `pid` (dumper's namespace; `ns_pid` in the
    /// task's) of task `victim`; `local` maps the shared area, `cmd_w` is
    /// the write end of the snapshot's command pipe.
    pub fn new(
        victim: i32,
        pid: i32,
        ns_pid: i32,
        local: MmapMut,
        layout: Layout,
        cmd_w: File,
    ) -> std::io::Result<Snapshot> {
        let pidfd = crate::infect::pidfd_open(pid).map_err(std::io::Error::from)?;
        Ok(Snapshot {
            victim,
            pid,
            ns_pid,
            pidfd,
            local,
            layout,
            cmd_w: Some(cmd_w),
            seq: 0,
        })
    }

    /// The snapshot's pid (dumper's namespace).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The snapshot's pid in the task's namespace.
    pub fn ns_pid(&self) -> i32 {
        self.ns_pid
    }

    fn ctl(&self) -> &Control {
        // SAFETY: the snapshot's control block lies inside the mapping at a
        // page-aligned offset, Control is repr(C) of atomics and plain words
        // (valid for any bit pattern), and the mapping lives as long as `self`.
        unsafe { &*(self.local.as_ptr().add(self.layout.snap_ctl_off) as *const Control) }
    }

    /// The data buffer its commands use (the parasite's: idle once the
    /// task is cured).
    fn data_mut(&mut self) -> &mut [u8] {
        let off = self.layout.data_off;
        &mut self.local[off..off + pdump_parasite::DATA_BYTES]
    }

    fn gone(&self, what: &str) -> InfectError {
        InfectError::Crashed {
            pid: self.pid,
            what: format!("snapshot of {} {what}", self.victim),
        }
    }

    /// Send a command; its sequence number.
    pub fn post(&mut self, command: u32, args: &[u64]) -> Result<u32, InfectError> {
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
            source: std::io::Error::new(std::io::ErrorKind::NotConnected, "snapshot finished"),
        })?;
        pipe.write_all(&[1])
            .map_err(|source| InfectError::Doorbell { pid, source })?;
        Ok(seq)
    }

    /// Send a command and wait for its result.
    pub fn command(&mut self, command: u32, args: &[u64]) -> Result<i64, InfectError> {
        let seq = self.post(command, args)?;
        self.wait_done(seq, command)
    }

    /// Wait for command `seq` to finish; its raw result.
    pub fn wait_done(&self, seq: u32, command: u32) -> Result<i64, InfectError> {
        let start = Instant::now();
        loop {
            let done = self.ctl().done_seq.load(Acquire);
            if done == seq {
                return Ok(self.ctl().ret.load(Acquire) as i64);
            }
            if exited(&self.pidfd, 0) {
                return Err(self.gone("exited"));
            }
            if start.elapsed() > Duration::from_secs(120) {
                return Err(InfectError::Timeout {
                    pid: self.pid,
                    cmd: command,
                    secs: 120,
                });
            }
            futex_wait(&self.ctl().done_seq, done, 50);
        }
    }

    /// Create `n` page pipes of `size` bytes in the snapshot (its own fd
    /// table) and take their read ends.
    pub fn page_pipes(&mut self, n: usize, size: usize) -> Result<Vec<File>, InfectError> {
        let pid = self.pid;
        let r = self.command(cmd::PIPES, &[n as u64, size as u64])?;
        if r < 0 {
            return Err(InfectError::Command {
                pid,
                what: "PIPES",
                source: crate::infect::errno_of(r),
            });
        }
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let fd = self.ctl().pipe_fds[i][0].load(SeqCst);
            let f = crate::infect::pidfd_getfd(&self.pidfd, fd)
                .map_err(|source| InfectError::GetFd { pid, fd, source })?;
            out.push(File::from(f));
        }
        Ok(out)
    }

    /// End the snapshot (end of file on its command pipe: it exits), wait
    /// for its exit, and reap it by a remote `wait4` in its parent task,
    /// which is seized again for that (a stop of a few hundred µs). A task
    /// that is gone (or reaped the snapshot itself with `__WALL`) is fine.
    pub fn finish(mut self) -> Result<(), SnapshotError> {
        self.end()?;
        reap(self.victim, self.ns_pid)
    }

    fn end(&mut self) -> Result<(), SnapshotError> {
        self.cmd_w = None;
        if exited(&self.pidfd, 10_000) {
            return Ok(());
        }
        self.kill();
        if exited(&self.pidfd, 10_000) {
            return Ok(());
        }
        Err(SnapshotError::NoExit {
            pid: self.pid,
            secs: 20,
        })
    }

    fn kill(&self) {
        // SAFETY: pidfd_send_signal with a pidfd we own and no siginfo.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_fd().as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }
}

impl PageSource for Snapshot {
    fn mem_pid(&self) -> i32 {
        self.pid
    }

    fn page_pipes(&mut self, n: usize, size: usize) -> Result<Vec<File>, InfectError> {
        Snapshot::page_pipes(self, n, size)
    }

    fn post_vmsplice(
        &mut self,
        pipe: usize,
        iovs: &[(u64, u64)],
        scan: bool,
    ) -> Result<u32, InfectError> {
        crate::infect::write_iovs(self.data_mut(), iovs);
        let command = if scan {
            cmd::VMSPLICE_SCAN
        } else {
            cmd::VMSPLICE
        };
        self.post(command, &[pipe as u64, iovs.len() as u64])
    }

    fn wait_done(&self, seq: u32, command: u32) -> Result<i64, InfectError> {
        Snapshot::wait_done(self, seq, command)
    }

    fn scan_runs(&mut self, niov: usize) -> Vec<pdump_parasite::ScanRun> {
        crate::infect::read_scan_runs(self.data_mut(), niov)
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if self.cmd_w.is_some() {
            self.cmd_w = None;
            if !exited(&self.pidfd, 2000) {
                self.kill();
            }
        }
    }
}

/// Reap snapshot `ns_pid` of task `pid`: seize the task, run `wait4(ns_pid,
/// NULL, WNOHANG | __WCLONE)` in its first thread, release it.
pub fn reap(pid: i32, ns_pid: i32) -> Result<(), SnapshotError> {
    const WCLONE: u64 = 0x8000_0000;
    let seized = match Seized::seize(pid) {
        Ok(s) => s,
        // Gone: its children went to its reaper, which reaps them.
        Err(PtraceError::NoSuchProcess { .. }) | Err(PtraceError::Zombie { .. }) => return Ok(()),
        Err(source) => return Err(SnapshotError::ReapSeize { pid, source }),
    };
    let rem = |source| SnapshotError::ReapRemote {
        pid,
        ns_pid,
        source,
    };
    let tid = seized.threads()[0].tid;
    let snap = ThreadSnapshot::take(&seized, tid)
        .map_err(|source| SnapshotError::ReapSeize { pid, source })?;
    let stub = Stub::install(&seized).map_err(rem)?;
    let mut rt = RemoteThread::begin(&seized, &stub, &snap).map_err(rem)?;
    let r = rt
        .syscall(
            nr::WAIT4,
            &[ns_pid as u64, 0, libc::WNOHANG as u64 | WCLONE, 0],
        )
        .map_err(rem)?;
    rt.end().map_err(rem)?;
    stub.remove().map_err(rem)?;
    seized
        .detach()
        .map_err(|source| SnapshotError::ReapSeize { pid, source })?;
    if r == ns_pid as i64 || r == -(libc::ECHILD as i64) {
        Ok(())
    } else {
        Err(SnapshotError::ReapResult {
            pid,
            ns_pid,
            ret: r,
        })
    }
}

/// Whether a fork child does not hold this mapping as the task does: shared
/// mappings (the child would see the task's later writes), MADV_DONTFORK
/// (absent in the child) and MADV_WIPEONFORK (empty in the child).
pub fn fork_unsafe(v: &model::Vma) -> bool {
    v.shared
        || v.vm_flags
            .contains_any(&[model::VmFlag::DontCopy, model::VmFlag::WipeOnFork])
}

/// Flags a fork child does not inherit from its parent's mappings (mlock,
/// userfaultfd registration): they are taken from smaps read before the
/// freeze, the rest from the snapshot's own smaps.
const NOT_INHERITED: &[model::VmFlag] = &[
    model::VmFlag::Locked,
    model::VmFlag::LockOnFault,
    model::VmFlag::UffdMissing,
    model::VmFlag::UffdWp,
    model::VmFlag::UffdMinor,
];

fn same_mapping(a: &model::Vma, b: &model::Vma) -> bool {
    (a.start, a.end, a.prot, a.shared, a.offset, a.dev, a.inode)
        == (b.start, b.end, b.prot, b.shared, b.offset, b.dev, b.inode)
        && a.path == b.path
}

/// Give `vmas` (from `/proc/PID/maps`, read while frozen) the `VmFlags` of
/// the same mappings in `pre_read` (`smaps` read before the freeze). False
/// when a mapping is not there as it is now (then read smaps while frozen).
/// Both lists are in address order.
pub fn flags_from(vmas: &mut [model::Vma], pre_read: &[model::Vma]) -> bool {
    let mut j = 0;
    for v in vmas.iter_mut() {
        while j < pre_read.len() && pre_read[j].start < v.start {
            j += 1;
        }
        match pre_read.get(j) {
            Some(h) if same_mapping(v, h) => v.vm_flags = h.vm_flags.clone(),
            _ => return false,
        }
    }
    true
}

/// After the resume: check flags that came from smaps read before the
/// freeze against `snap` (the snapshot's smaps, the mappings as they were
/// at the fork). A mapping that was not spilled (`spilled[i]`, as the
/// frozen phase judged by [`fork_unsafe`]) must be in the snapshot as it
/// is, without `MADV_DONTFORK` (the snapshot would lack it) or
/// `MADV_WIPEONFORK` (it would hold none of its pages): else
/// [`DumpError::FlagsChanged`], and the dump is made again. Its flags are
/// then the snapshot's, but for the ones a child does not inherit (mlock,
/// userfaultfd), which keep the pre-read's. Spilled mappings keep theirs.
pub fn check_flags(
    pid: i32,
    vmas: &mut [model::Vma],
    spilled: &[bool],
    snap: &[model::Vma],
) -> Result<(), DumpError> {
    use model::VmFlag;
    let changed = |v: &model::Vma, what| DumpError::FlagsChanged {
        pid,
        start: v.start,
        end: v.end,
        what,
    };
    let mut j = 0;
    for (v, &sp) in vmas.iter_mut().zip(spilled) {
        if sp {
            continue;
        }
        while j < snap.len() && snap[j].start < v.start {
            j += 1;
        }
        let s = match snap.get(j) {
            Some(s) if same_mapping(v, s) => s,
            _ => return Err(changed(v, "is not in the snapshot (MADV_DONTFORK?)")),
        };
        if s.vm_flags
            .contains_any(&[VmFlag::DontCopy, VmFlag::WipeOnFork])
        {
            return Err(changed(v, "was made MADV_DONTFORK or MADV_WIPEONFORK"));
        }
        let mut flags = s.vm_flags.clone();
        for &f in NOT_INHERITED {
            if v.vm_flags.contains(f) {
                flags.insert(f);
            } else {
                flags.remove(f);
            }
        }
        v.vm_flags = flags;
    }
    Ok(())
}

/// What the frozen phase leaves for the drain.
#[derive(Debug)]
pub struct Pending {
    pid: i32,
    snapshot: Snapshot,
    spill_path: PathBuf,
    /// The spill file, if anything was spilled.
    spill: Option<File>,
    /// The spilled runs (VMA index, run at its data offset in the spill
    /// file), in address order.
    spilled: Vec<(usize, model::PageRun)>,
    /// rseq areas of the task's threads (see [`pagestream::guard_plan`]).
    volatile: Vec<(u64, u64)>,
    /// The mappings' flags came from smaps read before the freeze: check
    /// them against the snapshot's ([`check_flags`]).
    flags_pre_read: bool,
}

impl Pending {
    /// The snapshot.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// End and reap the snapshot and remove the spill file (used when the
    /// dump failed: nothing is left behind).
    pub fn abandon(self) {
        let _ = std::fs::remove_file(&self.spill_path);
        let pid = self.pid;
        if let Err(e) = self.snapshot.finish() {
            log::error!("pid {pid}: ending its snapshot: {e}");
        }
    }
}

/// Frozen phase, after MISC and before the cure: fork the snapshot and
/// stream the mappings it does not hold as they are (see [`fork_unsafe`])
/// from the task into a spill file in the image directory. `volatile`: the
/// threads' rseq areas. On error the snapshot is killed and reaped through
/// the blob: nothing is left.
pub fn capture(
    seized: &Seized,
    parasite: &mut Parasite<'_>,
    vmas: &[model::Vma],
    volatile: Vec<(u64, u64)>,
    max_fd: i32,
    flags_pre_read: bool,
    opts: &DumpOptions,
) -> Result<Pending, DumpError> {
    let pid = seized.pid();
    let inf = |step| move |source| DumpError::Infect { pid, step, source };
    let t0 = Instant::now();
    let snapshot = parasite
        .fork_snapshot(max_fd)
        .map_err(inf("forking the snapshot"))?;
    let forked = t0.elapsed();
    let ns_pid = snapshot.ns_pid();
    let spill_path = opts.dir.join(format!(".spill-{pid}"));
    let r = spill(parasite, pid, vmas, &volatile, &spill_path, opts);
    log::debug!(
        "pid {pid}: snapshot {} forked in {:.2} ms, spilled in {:.2} ms",
        snapshot.pid(),
        forked.as_secs_f64() * 1e3,
        (t0.elapsed() - forked).as_secs_f64() * 1e3
    );
    match r {
        Ok(sp) => {
            let (spill, spilled) = match sp {
                Some((f, runs)) => (Some(f), runs),
                None => (None, Vec::new()),
            };
            Ok(Pending {
                pid,
                snapshot,
                spill_path,
                spill,
                spilled,
                volatile,
                flags_pre_read,
            })
        }
        Err(e) => {
            let _ = std::fs::remove_file(&spill_path);
            drop(snapshot);
            parasite.abort_snapshot(ns_pid);
            Err(e)
        }
    }
}

/// The spill file and its runs (VMA index, run at its offset there).
type Spill = (File, Vec<(usize, model::PageRun)>);

/// Stream the pages of the fork-unsafe mappings from the frozen task into
/// the spill file at `path` (laid out like a page file: data from
/// `PAGES_DATA_OFFSET`). None when there is nothing to spill (no file).
fn spill(
    parasite: &mut Parasite<'_>,
    pid: i32,
    vmas: &[model::Vma],
    volatile: &[(u64, u64)],
    path: &Path,
    opts: &DumpOptions,
) -> Result<Option<Spill>, DumpError> {
    let mut plan = crate::dump::page_plan(pid, pid, vmas, fork_unsafe)?;
    if plan.is_empty() {
        return Ok(None);
    }
    let sopts = crate::dump::stream_options(opts);
    if pagestream::scan_mode(&sopts) {
        plan = pagestream::guard_plan(plan, |i| vmas[i].shared, volatile);
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|source| DumpError::Pages {
            pid,
            start: 0,
            end: 0,
            path: path.to_path_buf(),
            source,
        })?;
    let streamed = pagestream::stream(pid, parasite, &plan, &file, path, None, sopts)?;
    Ok(Some((file, streamed.runs)))
}

/// Running phase: write `img`'s pages file from the snapshot (and the spill
/// file), in address order with zero runs and CRCs, end and reap the
/// snapshot.
pub fn drain(
    p: Pending,
    img: &mut model::ProcessImage,
    dir: &Path,
    opts: &DumpOptions,
) -> Result<(), DumpError> {
    drain_into(p, img, dir, opts, None)
}

/// A file laid out by address that a snapshot drains into instead of a
/// page file (a live core: `crate::elfcore`).
pub(crate) struct Target<'a> {
    /// The file.
    pub file: &'a File,
    /// Its name, for errors.
    pub path: &'a Path,
    /// Where each page goes.
    pub place: pagestream::Place<'a>,
}

/// [`drain`], into `target` if given (then no page file is made, and the
/// runs' offsets are only their order).
pub(crate) fn drain_into(
    p: Pending,
    img: &mut model::ProcessImage,
    dir: &Path,
    opts: &DumpOptions,
    target: Option<Target<'_>>,
) -> Result<(), DumpError> {
    // Counted as a process being dumped: drains running side by side share
    // the CPUs' drainer threads.
    let _active = pagestream::ActiveGuard::new();
    let pid = p.pid;
    let mut p = p;
    let t0 = Instant::now();
    let r = drain_pages(&mut p, img, dir, opts, target);
    log::debug!(
        "pid {pid}: snapshot {} drained in {:.2} ms",
        p.snapshot.pid(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    let _ = std::fs::remove_file(&p.spill_path);
    let Pending { snapshot, .. } = p;
    let ended = snapshot.finish().map_err(|source| DumpError::Snapshot {
        pid,
        step: "ending the snapshot",
        source,
    });
    r?;
    ended
}

fn drain_pages(
    p: &mut Pending,
    img: &mut model::ProcessImage,
    dir: &Path,
    opts: &DumpOptions,
    target: Option<Target<'_>>,
) -> Result<(), DumpError> {
    let pid = p.pid;
    let from = p.snapshot.pid();
    let own_file;
    let (file, path, place) = match target {
        Some(t) => (t.file, t.path.to_path_buf(), Some(t.place)),
        None => {
            own_file = image::create_pages_file(dir, pid)
                .map_err(|source| DumpError::Image { pid, source })?;
            (&own_file, dir.join(image::pages_file_name(pid)), None)
        }
    };
    // Which mappings were spilled (fork-unsafe by the flags used while
    // frozen), before check_flags corrects any flag.
    let spilled: Vec<bool> = img.vmas.iter().map(fork_unsafe).collect();
    // The snapshot's smaps, read while the pages stream (it walks page
    // tables: CPU time, no stop).
    let snap_smaps = p
        .flags_pre_read
        .then(|| std::thread::spawn(move || procfs::smaps(from)));
    // The snapshot's own pages, and the spilled ones in their place.
    let own = crate::dump::page_plan(pid, from, &img.vmas, |v| !fork_unsafe(v))?;
    let mut plan = pagestream::merge_plans(own, pagestream::plan_from_runs(&p.spilled));
    let sopts = crate::dump::stream_options(opts);
    if pagestream::scan_mode(&sopts) {
        plan = pagestream::guard_plan(plan, |i| img.vmas[i].shared, &p.volatile);
    }
    let streamed = pagestream::stream_placed(
        pid,
        &mut p.snapshot,
        &plan,
        file,
        &path,
        p.spill.as_ref(),
        place,
        sopts,
    )?;
    drop(plan);
    if let Some(h) = snap_smaps {
        let snap = h
            .join()
            .expect("smaps reader panicked")
            .map_err(|source| DumpError::Proc {
                pid,
                step: "reading its snapshot's smaps",
                source,
            })?;
        check_flags(pid, &mut img.vmas, &spilled, &snap)?;
    }
    crate::dump::install_runs(&mut img.vmas, streamed.runs);
    img.pages_bytes = streamed.data_len;
    if place.is_some() {
        return Ok(());
    }
    image::finish_pages_file(file, &path, streamed.data_len)
        .map_err(|source| DumpError::Image { pid, source })
}

/// The snapshots of a tree dump still to drain. Dropping the set (a failed
/// dump) ends and reaps every snapshot left in it.
#[derive(Debug, Default)]
pub struct PendingSet {
    items: Vec<(i32, Pending)>,
}

impl PendingSet {
    /// Snapshots waiting to be drained.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Add the snapshot of process `pid`.
    pub fn insert(&mut self, pid: i32, p: Pending) {
        self.items.push((pid, p));
    }

    /// Take out the snapshot of process `pid`.
    pub(crate) fn take(&mut self, pid: i32) -> Option<Pending> {
        let i = self.items.iter().position(|(p, _)| *p == pid)?;
        Some(self.items.remove(i).1)
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Drain every snapshot into its process's image (`images`, matched by
    /// pid), `workers` at a time. Every snapshot is ended and reaped, also
    /// when one fails; the first error is returned.
    pub fn drain(
        &mut self,
        images: &mut [model::ProcessImage],
        dir: &Path,
        opts: &DumpOptions,
        workers: usize,
    ) -> Result<(), DumpError> {
        let items = std::mem::take(&mut self.items);
        if items.is_empty() {
            return Ok(());
        }
        let (jtx, jrx) = crossbeam::channel::unbounded();
        for (pid, p) in items {
            let idx = images.iter().position(|i| i.pid == pid);
            let img = idx.map(|i| std::mem::take(&mut images[i]));
            let _ = jtx.send((idx, img, p));
        }
        drop(jtx);
        let n = workers.max(1).min(jrx.len());
        let (rtx, rrx) = crossbeam::channel::unbounded();
        std::thread::scope(|sc| {
            for _ in 0..n {
                let (jrx, rtx) = (jrx.clone(), rtx.clone());
                sc.spawn(move || {
                    while let Ok((idx, img, p)) = jrx.recv() {
                        let Some(mut img) = img else {
                            p.abandon();
                            continue;
                        };
                        let r = drain(p, &mut img, dir, opts);
                        let _ = rtx.send((idx, img, r));
                    }
                });
            }
        });
        drop(rtx);
        let mut first = Ok(());
        for (idx, img, r) in rrx.iter() {
            if let Some(i) = idx {
                images[i] = img;
            }
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

impl Drop for PendingSet {
    fn drop(&mut self) {
        for (_, p) in std::mem::take(&mut self.items) {
            p.abandon();
        }
    }
}

/// Reap the snapshots a killed dumper left as zombies under the task (a
/// snapshot that exited after its parent was cured and before the dumper
/// reaped it): children in state Z with exit signal 0 and comm
/// [`pdump_parasite::SNAPSHOT_COMM`], reaped by `wait4` through the parasite.
/// Returns how many were reaped.
pub fn reap_leftovers(parasite: &mut Parasite<'_>, pid: i32) -> Result<usize, InfectError> {
    const WCLONE: u64 = 0x8000_0000;
    let mut n = 0;
    let Ok(level) = ns_level(pid) else {
        return Ok(0);
    };
    for t in procfs::threads(pid).unwrap_or_default() {
        for c in procfs::children(pid, t).unwrap_or_default() {
            let Ok(st) = std::fs::read_to_string(procfs::proc_path(c, "stat")) else {
                continue;
            };
            let Some(close) = st.rfind(')') else { continue };
            let comm = st.find('(').map(|o| &st[o + 1..close]).unwrap_or("");
            let f: Vec<&str> = st[close + 2..].split(' ').collect();
            if comm != pdump_parasite::SNAPSHOT_COMM
                || f.first() != Some(&"Z")
                || f.get(35) != Some(&"0")
            {
                continue;
            }
            let Some(ns_pid) = ns_pid_at(c, level) else {
                continue;
            };
            let r = parasite.syscall(
                nr::WAIT4,
                &[ns_pid as u64, 0, libc::WNOHANG as u64 | WCLONE, 0],
            )?;
            if r == ns_pid as i64 {
                n += 1;
            }
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{VmFlags, Vma};

    fn vma(start: u64, flags: &str) -> Vma {
        Vma {
            start,
            end: start + 0x1000,
            prot: 3,
            vm_flags: VmFlags::parse(flags),
            ..Vma::default()
        }
    }

    #[test]
    fn flags_come_from_the_pre_read_only_where_every_mapping_matches() {
        let pre = vec![vma(0x1000, "rd wr dc"), vma(0x3000, "rd wr lo")];
        let mut now = vec![vma(0x1000, ""), vma(0x3000, "")];
        assert!(flags_from(&mut now, &pre));
        assert_eq!(now[0].vm_flags.to_string(), "rd wr dc");
        assert_eq!(now[1].vm_flags.to_string(), "rd wr lo");
        // A new mapping, a changed one (protections), a missing one.
        assert!(!flags_from(&mut [vma(0x2000, "")], &pre));
        let mut prot = vec![vma(0x1000, ""), vma(0x3000, "")];
        prot[1].prot = 1;
        assert!(!flags_from(&mut prot, &pre));
        assert!(!flags_from(&mut [vma(0x5000, "")], &pre));
    }

    #[test]
    fn the_snapshot_decides_but_for_flags_a_child_does_not_inherit() {
        // Pre-read: mapping 0 mlocked, 1 plain, 2 DONTFORK (spilled).
        let mut vmas = vec![
            vma(0x1000, "rd lo"),
            vma(0x2000, "rd"),
            vma(0x3000, "rd dc"),
        ];
        let spilled: Vec<bool> = vmas.iter().map(fork_unsafe).collect();
        assert_eq!(spilled, [false, false, true]);
        // The child: no lock (not inherited), 1 got MADV_HUGEPAGE before the
        // fork, 2 absent (DONTFORK), an extra mapping (the parasite's).
        let snap = vec![vma(0x1000, "rd"), vma(0x2000, "rd hg"), vma(0x9000, "rd")];
        check_flags(7, &mut vmas, &spilled, &snap).unwrap();
        assert_eq!(vmas[0].vm_flags.to_string(), "rd lo");
        assert_eq!(vmas[1].vm_flags.to_string(), "rd hg");
        assert_eq!(vmas[2].vm_flags.to_string(), "rd dc");
    }

    #[test]
    fn dontfork_or_wipeonfork_set_after_the_pre_read_is_an_error() {
        let mut vmas = vec![vma(0x1000, "rd"), vma(0x2000, "rd")];
        let spilled = [false, false];
        // Absent from the snapshot: MADV_DONTFORK since the read.
        let e = check_flags(7, &mut vmas, &spilled, &[vma(0x2000, "rd")]).unwrap_err();
        assert!(
            matches!(
                e,
                DumpError::FlagsChanged {
                    pid: 7,
                    start: 0x1000,
                    ..
                }
            ),
            "{e}"
        );
        // In the snapshot, but MADV_WIPEONFORK: its pages are not there.
        let snap = vec![vma(0x1000, "rd"), vma(0x2000, "rd wf")];
        let e = check_flags(7, &mut vmas, &spilled, &snap).unwrap_err();
        assert!(
            matches!(e, DumpError::FlagsChanged { start: 0x2000, .. }),
            "{e}"
        );
    }
}
