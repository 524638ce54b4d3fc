//! Copy-on-write snapshots: the task is frozen while its state is captured,
//! not while its pages are written (`DumpOptions::cow`, the default with
//! `--leave-running`).
//!
//! ```text
//!  frozen:  infect ─ MISC, altstacks ─ page pipe ─ FORK: the blob forks the
//!           task (exit signal 0) onto its own stack and control block; the
//!           child drops every inherited fd, leaves the session, then the
//!           blob answers ─ pages of MAP_SHARED, MADV_DONTFORK and
//!           MADV_WIPEONFORK areas (which the child does not hold as they
//!           were) from the task into a spill file ─ cure
//!  running: (the whole tree is released) ─ the snapshot vmsplices the other
//!           pages into the page pipe, the dumper splices them into
//!           pages-PID.img in address order, copying the spilled runs in
//!           between ─ CRCs ─ the snapshot exits on end of file ─ the dumper
//!           briefly seizes the task again to reap it (wait4 __WCLONE)
//! ```
//!
//! The image is the same as without a snapshot: runs in address order at the
//! same offsets. Why a single `clone` with exit signal 0, and what is visible
//! to the task, is in `docs/architecture.md` ("Copy-on-write snapshot").

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::{Acquire, Release, SeqCst};
use std::time::{Duration, Instant};

use memmap2::MmapMut;
use pdump_arch::native::syscall::nr;
use pdump_parasite::{cmd, Control, Layout};

use crate::dump::{DumpError, DumpOptions, PagePolicy};
use crate::image::{self, model};
use crate::infect::{InfectError, Parasite};
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

/// Something that vmsplices pages into a page pipe on command: the parasite
/// (frozen task) or the snapshot.
pub trait Splice {
    /// Start vmsplicing `iovs` into page pipe `pipe`; the command's sequence number.
    fn post_vmsplice(&mut self, pipe: usize, iovs: &[(u64, u64)]) -> Result<u32, InfectError>;
    /// Whether command `seq` finished.
    fn poll_done(&self, seq: u32) -> bool;
    /// Wait for command `seq`; its raw result.
    fn wait_done(&self, seq: u32, command: u32) -> Result<i64, InfectError>;
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
        Splice::wait_done(self, seq, command)
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

impl Splice for Snapshot {
    fn post_vmsplice(&mut self, pipe: usize, iovs: &[(u64, u64)]) -> Result<u32, InfectError> {
        assert!(iovs.len() <= pdump_parasite::MAX_IOVS);
        {
            let d = self.data_mut();
            for (i, (a, l)) in iovs.iter().enumerate() {
                d[i * 16..i * 16 + 8].copy_from_slice(&a.to_le_bytes());
                d[i * 16 + 8..i * 16 + 16].copy_from_slice(&l.to_le_bytes());
            }
        }
        self.post(cmd::VMSPLICE, &[pipe as u64, iovs.len() as u64])
    }

    fn poll_done(&self, seq: u32) -> bool {
        self.ctl().done_seq.load(Acquire) == seq
    }

    fn wait_done(&self, seq: u32, command: u32) -> Result<i64, InfectError> {
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

/// Runs of one mapping taken while the task was frozen, in the spill file.
#[derive(Debug)]
struct Spilled {
    vma_start: u64,
    /// (address, pages, offset in the spill file)
    runs: Vec<(u64, u64, u64)>,
}

/// What the frozen phase leaves for the drain.
#[derive(Debug)]
pub struct Pending {
    pid: i32,
    snapshot: Snapshot,
    pipe: File,
    spill_path: PathBuf,
    spill: File,
    spilled: Vec<Spilled>,
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

/// Batches of pages moved by a [`Splice`] source through the page pipe into
/// a file at explicit offsets.
struct Writer<'a> {
    pid: i32,
    pipe: &'a File,
    file: &'a File,
    path: &'a Path,
    /// File position of data offset 0.
    base: u64,
    /// Data offset of the next byte.
    offset: u64,
    batch: Vec<(u64, u64)>,
    batch_bytes: u64,
    batch_limit: u64,
}

impl Writer<'_> {
    fn push(&mut self, src: &mut dyn Splice, addr: u64, len: u64) -> Result<(), DumpError> {
        self.batch.push((addr, len));
        self.batch_bytes += len;
        if self.batch.len() >= pdump_parasite::MAX_IOVS || self.batch_bytes >= self.batch_limit {
            self.flush(src)?;
        }
        Ok(())
    }

    fn flush(&mut self, src: &mut dyn Splice) -> Result<(), DumpError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let pid = self.pid;
        let inf = |source| DumpError::Infect {
            pid,
            step: "vmsplice",
            source,
        };
        let (start, end) = (
            self.batch[0].0,
            self.batch.last().map(|b| b.0 + b.1).unwrap_or(0),
        );
        let seq = src.post_vmsplice(0, &self.batch).map_err(inf)?;
        let want = self.batch_bytes;
        let moved = crate::dump::splice_exact(
            self.pipe.as_raw_fd(),
            self.file.as_raw_fd(),
            self.base + self.offset,
            want,
            || src.poll_done(seq),
        )
        .map_err(|source| DumpError::Pages {
            pid,
            start,
            end,
            path: self.path.to_path_buf(),
            source,
        })?;
        let got = src.wait_done(seq, cmd::VMSPLICE).map_err(inf)?;
        if got != want as i64 || moved != want {
            return Err(DumpError::ShortSplice { pid, got, want });
        }
        self.offset += want;
        self.batch.clear();
        self.batch_bytes = 0;
        Ok(())
    }

    /// Write the pages of `v` (policy `pol`) as found in process `from`,
    /// through `src`; the runs with their data offsets.
    fn vma(
        &mut self,
        src: &mut dyn Splice,
        from: i32,
        pagemap: &mut procfs::Pagemap,
        v: &model::Vma,
        pol: PagePolicy,
    ) -> Result<Vec<(u64, u64, u64)>, DumpError> {
        let pid = self.pid;
        let page = pdump_arch::PAGE_SIZE as u64;
        let pages_err = |start, end, path: &Path| {
            let path = path.to_path_buf();
            move |source| DumpError::Pages {
                pid,
                start,
                end,
                path,
                source,
            }
        };
        let runs = match pol {
            PagePolicy::AnonOnly => crate::dump::anon_ranges(from, v.start, v.end)
                .map_err(pages_err(v.start, v.end, self.path))?,
            _ => pagemap
                .present_ranges(v.start, v.end)
                .map_err(|source| DumpError::Proc {
                    pid,
                    step: "scanning pagemap",
                    source,
                })?,
        };
        let readable = v.prot & 1 != 0;
        let mut out = Vec::with_capacity(runs.len());
        for (addr, n) in runs {
            let len = n * page;
            out.push((addr, n, self.offset + self.batch_bytes));
            if readable {
                self.push(src, addr, len)?;
            } else {
                // PROT_NONE: vmsplice cannot pin these; /proc/PID/mem can.
                self.flush(src)?;
                crate::dump::copy_unreadable(from, addr, len, self.file, self.base + self.offset)
                    .map_err(pages_err(addr, addr + len, self.path))?;
                self.offset += len;
            }
        }
        Ok(out)
    }
}

/// Frozen phase, after MISC and before the cure: fork the snapshot and copy
/// the mappings it does not hold as they are (see [`fork_unsafe`]) from the
/// task into a spill file in the image directory. On error the snapshot is
/// killed and reaped through the blob: nothing is left.
pub fn capture(
    seized: &Seized,
    parasite: &mut Parasite<'_>,
    vmas: &[model::Vma],
    max_fd: i32,
    opts: &DumpOptions,
) -> Result<Pending, DumpError> {
    let pid = seized.pid();
    let inf = |step| move |source| DumpError::Infect { pid, step, source };
    let pipe_size = opts.pipe_size.min(crate::dump::pipe_max_size());
    let mut pipes = parasite
        .page_pipes(1, pipe_size)
        .map_err(inf("creating page pipes"))?;
    let pipe = pipes.remove(0);
    let t0 = Instant::now();
    let snapshot = parasite
        .fork_snapshot(max_fd)
        .map_err(inf("forking the snapshot"))?;
    let forked = t0.elapsed();
    let ns_pid = snapshot.ns_pid();
    let spill_path = opts.dir.join(format!(".spill-{pid}"));
    let r = spill(parasite, pid, &pipe, vmas, &spill_path, opts);
    log::debug!(
        "pid {pid}: snapshot {} forked in {:.2} ms, spilled in {:.2} ms",
        snapshot.pid(),
        forked.as_secs_f64() * 1e3,
        (t0.elapsed() - forked).as_secs_f64() * 1e3
    );
    match r {
        Ok((spill, spilled)) => Ok(Pending {
            pid,
            snapshot,
            pipe,
            spill_path,
            spill,
            spilled,
        }),
        Err(e) => {
            let _ = std::fs::remove_file(&spill_path);
            drop(snapshot);
            parasite.abort_snapshot(ns_pid);
            Err(e)
        }
    }
}

fn spill(
    parasite: &mut Parasite<'_>,
    pid: i32,
    pipe: &File,
    vmas: &[model::Vma],
    path: &Path,
    opts: &DumpOptions,
) -> Result<(File, Vec<Spilled>), DumpError> {
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
    let mut spilled = Vec::new();
    let mut pagemap = procfs::Pagemap::open(pid).map_err(|source| DumpError::Proc {
        pid,
        step: "opening pagemap",
        source,
    })?;
    let mut w = Writer {
        pid,
        pipe,
        file: &file,
        path,
        base: 0,
        offset: 0,
        batch: Vec::new(),
        batch_bytes: 0,
        batch_limit: opts.batch_bytes,
    };
    for v in vmas.iter().filter(|v| fork_unsafe(v)) {
        let pol = crate::dump::policy(v);
        if pol == PagePolicy::None {
            continue;
        }
        let runs = w.vma(parasite, pid, &mut pagemap, v, pol)?;
        spilled.push(Spilled {
            vma_start: v.start,
            runs,
        });
    }
    w.flush(parasite)?;
    Ok((file, spilled))
}

/// Copy `len` bytes from `from` at `src_off` to `to` at `dst_off`
/// (copy_file_range, or pread/pwrite where the file system refuses it).
fn copy_range(from: &File, src_off: u64, to: &File, dst_off: u64, len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let (mut s, mut d, mut left) = (src_off as i64, dst_off as i64, len);
    while left > 0 {
        // SAFETY: two fds we own, offsets in locals we own.
        let n = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                &mut s,
                to.as_raw_fd(),
                &mut d,
                left as usize,
                0,
            )
        };
        if n > 0 {
            left -= n as u64;
            continue;
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "spill file ends early",
            ));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EXDEV)
            | Some(libc::ENOSYS)
            | Some(libc::EINVAL)
            | Some(libc::EOPNOTSUPP) => {
                let mut buf = vec![0u8; left.min(1 << 20) as usize];
                while left > 0 {
                    let k = left.min(buf.len() as u64) as usize;
                    from.read_exact_at(&mut buf[..k], s as u64)?;
                    to.write_all_at(&buf[..k], d as u64)?;
                    s += k as i64;
                    d += k as i64;
                    left -= k as u64;
                }
            }
            _ => return Err(e),
        }
    }
    Ok(())
}

/// Running phase: write `img`'s pages file from the snapshot (and the spill
/// file), in address order, compute the run CRCs, end and reap the snapshot.
pub fn drain(
    p: Pending,
    img: &mut model::ProcessImage,
    dir: &Path,
    opts: &DumpOptions,
) -> Result<(), DumpError> {
    let pid = p.pid;
    let mut p = p;
    let r = drain_pages(&mut p, img, dir, opts);
    let _ = std::fs::remove_file(&p.spill_path);
    let Pending { snapshot, .. } = p;
    let ended = snapshot.finish().map_err(|source| DumpError::Snapshot {
        pid,
        step: "ending the snapshot",
        source,
    });
    r?;
    ended?;
    crate::dump::checksum_runs(dir, img).map_err(|source| DumpError::Image { pid, source })
}

fn drain_pages(
    p: &mut Pending,
    img: &mut model::ProcessImage,
    dir: &Path,
    opts: &DumpOptions,
) -> Result<(), DumpError> {
    let Pending {
        pid,
        snapshot: src,
        pipe,
        spill,
        spilled,
        ..
    } = p;
    let pid = *pid;
    let from = src.pid();
    let path = dir.join(image::pages_file_name(pid));
    let file =
        image::create_pages_file(dir, pid).map_err(|source| DumpError::Image { pid, source })?;
    let mut pagemap = procfs::Pagemap::open(from).map_err(|source| DumpError::Proc {
        pid,
        step: "opening the snapshot's pagemap",
        source,
    })?;
    let mut w = Writer {
        pid,
        pipe,
        file: &file,
        path: &path,
        base: 4096, // the page file header
        offset: 0,
        batch: Vec::new(),
        batch_bytes: 0,
        batch_limit: opts.batch_bytes,
    };
    let page = pdump_arch::PAGE_SIZE as u64;
    for v in img.vmas.iter_mut() {
        v.pages.clear();
        let pol = crate::dump::policy(v);
        if pol == PagePolicy::None {
            continue;
        }
        let runs = if fork_unsafe(v) {
            let Some(sp) = spilled.iter().find(|s| s.vma_start == v.start) else {
                continue;
            };
            w.flush(src)?;
            let mut out = Vec::with_capacity(sp.runs.len());
            for &(addr, n, soff) in &sp.runs {
                let len = n * page;
                copy_range(spill, soff, &file, w.base + w.offset, len).map_err(|source| {
                    DumpError::Pages {
                        pid,
                        start: addr,
                        end: addr + len,
                        path: path.clone(),
                        source,
                    }
                })?;
                out.push((addr, n, w.offset));
                w.offset += len;
            }
            out
        } else {
            w.vma(src, from, &mut pagemap, v, pol)?
        };
        v.pages = runs
            .into_iter()
            .map(|(addr, npages, offset)| model::PageRun {
                addr,
                npages,
                offset,
                crc32c: 0,
                zero: false,
            })
            .collect();
    }
    w.flush(src)?;
    img.pages_bytes = w.offset;
    image::finish_pages_file(&file, &path, w.offset)
        .map_err(|source| DumpError::Image { pid, source })
}

/// The snapshots of a tree dump still to drain. Dropping the set (a failed
/// dump) ends and reaps every snapshot left in it.
#[derive(Debug, Default)]
pub struct PendingSet {
    items: Vec<(i32, Pending)>,
}

impl PendingSet {
    /// Add the snapshot of process `pid`.
    pub fn insert(&mut self, pid: i32, p: Pending) {
        self.items.push((pid, p));
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
