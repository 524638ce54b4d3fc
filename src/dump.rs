//! Dumping one process into a checkpoint directory.
//!
//! ```text
//!  seize all threads ─ snapshot regs/xstate/mask/pending/rseq ─ read /proc
//!  (VMAs, fds, creds, limits, ...) ─ refuse unsupported fds (task untouched)
//!  ─ infect ─ MISC (sigactions, itimers, timers, altstack) ─ altstacks of the
//!  other threads (remote syscalls) ─ pages: parasite vmsplices present pages
//!  into page pipes, dumper threads splice them into pages-PID.img
//!  ─ cure ─ detach (or kill) ─ checksums ─ core-PID.img, inventory.img
//! ```

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pdump_arch::{Arch, Native};

use crate::image::{self, model};
use crate::infect::{InfectError, Parasite};
use crate::procfs;
use crate::ptrace::{PtraceError, Seized};
use crate::remote::{RemoteError, RemoteThread, Stub, ThreadSnapshot};

/// Errors of a dump. Each names the process and the step.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// Seizing or talking to the task failed.
    #[error("pid {pid}: {step}")]
    Ptrace {
        /// The process.
        pid: i32,
        /// Step.
        step: &'static str,
        /// Cause.
        #[source]
        source: PtraceError,
    },
    /// Reading /proc failed.
    #[error("pid {pid}: {step}")]
    Proc {
        /// The process.
        pid: i32,
        /// Step.
        step: &'static str,
        /// Cause.
        #[source]
        source: procfs::ProcError,
    },
    /// Infection or a parasite command failed.
    #[error("pid {pid}: {step}")]
    Infect {
        /// The process.
        pid: i32,
        /// Step.
        step: &'static str,
        /// Cause.
        #[source]
        source: InfectError,
    },
    /// A remote syscall failed.
    #[error("pid {pid}: {step}")]
    Remote {
        /// The process.
        pid: i32,
        /// Step.
        step: &'static str,
        /// Cause.
        #[source]
        source: RemoteError,
    },
    /// Writing images failed.
    #[error("pid {pid}: writing images")]
    Image {
        /// The process.
        pid: i32,
        /// Cause.
        #[source]
        source: image::ImageError,
    },
    /// Moving pages failed.
    #[error("pid {pid}: moving pages of {start:#x}-{end:#x} into {path}")]
    Pages {
        /// The process.
        pid: i32,
        /// Range.
        start: u64,
        /// Range end.
        end: u64,
        /// Image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The parasite moved fewer bytes than asked.
    #[error("pid {pid}: the parasite moved {got} of {want} bytes")]
    ShortSplice {
        /// The process.
        pid: i32,
        /// Bytes moved.
        got: i64,
        /// Bytes asked.
        want: u64,
    },
    /// Creating the image directory failed.
    #[error("creating the image directory {path}")]
    Dir {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Killing the tree after the dump failed.
    #[error("pid {pid}: killing it after the dump")]
    Kill {
        /// The process.
        pid: i32,
        /// errno.
        #[source]
        source: nix::Error,
    },
}

type Result<T> = std::result::Result<T, DumpError>;

/// How to dump.
#[derive(Clone, Debug)]
pub struct DumpOptions {
    /// Image directory (created if missing).
    pub dir: PathBuf,
    /// Leave the tree running after the dump (else it is killed).
    pub leave_running: bool,
    /// Page pipe size (bytes; capped by /proc/sys/fs/pipe-max-size).
    pub pipe_size: usize,
    /// Largest batch of pages per parasite command (bytes).
    pub batch_bytes: u64,
}

impl Default for DumpOptions {
    fn default() -> Self {
        DumpOptions {
            dir: PathBuf::from("."),
            leave_running: true,
            pipe_size: 1 << 20,
            batch_bytes: 64 << 20,
        }
    }
}

/// What a dump did.
#[derive(Clone, Debug, Default)]
pub struct DumpSummary {
    /// Root pid.
    pub pid: i32,
    /// Threads dumped.
    pub threads: usize,
    /// Mappings recorded.
    pub vmas: usize,
    /// Pages written.
    pub pages: u64,
    /// Time the task was frozen.
    pub frozen: Duration,
    /// Total time.
    pub total: Duration,
}

fn ns(sec: i64, sub: i64, sub_per_sec: i64) -> u64 {
    (sec.max(0) as u64) * 1_000_000_000 + (sub.max(0) as u64) * (1_000_000_000 / sub_per_sec as u64)
}

/// Dump process `pid` (all its threads) into `opts.dir`.
pub fn dump_process(pid: i32, opts: &DumpOptions) -> Result<DumpSummary> {
    let t0 = Instant::now();
    std::fs::create_dir_all(&opts.dir).map_err(|source| DumpError::Dir {
        path: opts.dir.clone(),
        source,
    })?;
    let ptr = |step| move |source| DumpError::Ptrace { pid, step, source };
    let prc = |step| move |source| DumpError::Proc { pid, step, source };
    let seized = Seized::seize(pid).map_err(ptr("seizing"))?;
    let pid = seized.pid();
    let frozen_at = Instant::now();

    // Everything from outside first: a refusal leaves the task untouched.
    let mut threads = Vec::new();
    let mut snapshots = Vec::new();
    for t in seized.threads() {
        let snap = ThreadSnapshot::take(&seized, t.tid).map_err(ptr("reading registers"))?;
        let mut gpr = snap.regs;
        let restart = Native::interrupted_syscall(&gpr);
        let _ = &mut gpr;
        threads.push(model::ThreadState {
            tid: t.tid,
            comm: procfs::comm(pid, t.tid).unwrap_or_default(),
            gpr: {
                let mut w = vec![0u64; Native::GPR_NAMES.len()];
                Native::gpr_to_words(&snap.regs, &mut w);
                w
            },
            fpregs: snap.fpregs.clone(),
            sigmask: snap.sigmask,
            pending: seized
                .pending(t.tid, false)
                .map_err(ptr("reading pending signals"))?,
            altstack: model::AltStack::default(),
            rseq: seized.rseq(t.tid).map_err(ptr("reading rseq"))?,
            restart_syscall: restart,
            stopped: t.was_stopped,
        });
        snapshots.push(snap);
    }
    let shared_pending = seized
        .pending(pid, true)
        .map_err(ptr("reading shared pending signals"))?;
    let status = procfs::status(pid).map_err(prc("reading status"))?;
    let stat = procfs::stat(pid).map_err(prc("reading stat"))?;
    let mut vmas = procfs::smaps(pid).map_err(prc("reading smaps"))?;
    let fds = procfs::fds(pid).map_err(prc("reading fds"))?;
    let mut timers = procfs::timers(pid).map_err(prc("reading timers"))?;
    let mut proc_img = model::ProcessImage {
        pid,
        ppid: stat.ppid,
        pgid: stat.pgrp,
        sid: stat.session,
        comm: procfs::comm(pid, pid).unwrap_or_default(),
        exe: procfs::readlink_exe(pid)
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        cmdline: procfs::cmdline(pid).unwrap_or_default(),
        cwd: procfs::readlink_cwd(pid)
            .map_err(prc("reading cwd"))?
            .display()
            .to_string(),
        root: procfs::readlink_root(pid)
            .map_err(prc("reading root"))?
            .display()
            .to_string(),
        umask: status.umask.unwrap_or(0o022),
        personality: procfs::personality(pid).map_err(prc("reading personality"))?,
        creds: procfs::creds(&status),
        rlimits: procfs::limits(pid).map_err(prc("reading limits"))?,
        auxv: procfs::auxv(pid).map_err(prc("reading auxv"))?,
        mm: stat.mm_bounds(
            vmas.iter()
                .find(|v| v.kind == model::VmaKind::Heap)
                .map(|v| v.end),
        ),
        coredump_filter: procfs::coredump_filter(pid).unwrap_or(0x33),
        threads,
        sigactions: Vec::new(),
        shared_pending,
        itimers: Vec::new(),
        posix_timers: Vec::new(),
        vmas: Vec::new(),
        fds,
        pages_file: image::pages_file_name(pid),
        pages_bytes: 0,
    };

    // Inside: the parasite.
    let inf = |step| move |source| DumpError::Infect { pid, step, source };
    let mut parasite = Parasite::infect(&seized).map_err(inf("infecting"))?;
    let ids: Vec<i32> = timers.iter().map(|t| t.id).collect();
    let misc = parasite.misc(&ids).map_err(inf("gathering signal state"))?;
    proc_img.sigactions = misc
        .sigactions
        .iter()
        .map(|a| model::SigAction {
            handler: a.handler,
            flags: a.flags,
            restorer: a.restorer,
            mask: a.mask,
        })
        .collect();
    proc_img.itimers = misc
        .itimers
        .iter()
        .map(|t| model::TimerValue {
            interval_ns: ns(t.interval_sec, t.interval_sub, 1_000_000),
            value_ns: ns(t.value_sec, t.value_sub, 1_000_000),
        })
        .collect();
    for (i, t) in timers
        .iter_mut()
        .enumerate()
        .take(pdump_parasite::MAX_TIMERS)
    {
        let v = misc.timers[i];
        t.value = model::TimerValue {
            interval_ns: ns(v.interval_sec, v.interval_sub, 1_000_000_000),
            value_ns: ns(v.value_sec, v.value_sub, 1_000_000_000),
        };
        t.overrun = misc.timer_overrun[i];
    }
    proc_img.posix_timers = timers;
    proc_img.threads[0].altstack = model::AltStack {
        sp: misc.altstack[0],
        flags: misc.altstack[1] as i32,
        size: misc.altstack[2],
    };
    thread_altstacks(&seized, &mut parasite, &snapshots, &mut proc_img)?;

    // Pages.
    let (runs_bytes, pages) = dump_pages(&seized, &mut parasite, &mut vmas, &opts.dir, opts)?;
    proc_img.vmas = vmas;
    proc_img.pages_bytes = runs_bytes;

    parasite.cure().map_err(inf("curing"))?;
    let frozen = frozen_at.elapsed();
    if opts.leave_running {
        seized.detach().map_err(ptr("detaching"))?;
    } else {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .map_err(|source| DumpError::Kill { pid, source })?;
        seized.forget();
    }

    let img = |source| DumpError::Image { pid, source };
    checksum_runs(&opts.dir, &mut proc_img).map_err(img)?;
    image::write_process(&opts.dir, &proc_img).map_err(img)?;
    let inv = model::Inventory {
        pdump_version: env!("CARGO_PKG_VERSION").to_string(),
        arch: Native::NAME.to_string(),
        kernel: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        root_pid: pid,
        processes: vec![pid],
        leave_running: opts.leave_running,
        page_size: pdump_arch::PAGE_SIZE as u32,
        ..Default::default()
    };
    image::write_inventory(&opts.dir, &inv).map_err(img)?;
    Ok(DumpSummary {
        pid,
        threads: proc_img.threads.len(),
        vmas: proc_img.vmas.len(),
        pages,
        frozen,
        total: t0.elapsed(),
    })
}

/// Query the alternate signal stack of every thread but the blob's own.
fn thread_altstacks(
    seized: &Seized,
    parasite: &mut Parasite<'_>,
    snapshots: &[ThreadSnapshot],
    img: &mut model::ProcessImage,
) -> Result<()> {
    if snapshots.len() < 2 {
        return Ok(());
    }
    let pid = seized.pid();
    let rem = |step| move |source| DumpError::Remote { pid, step, source };
    let stub = Stub::install(seized).map_err(rem("installing the syscall stub"))?;
    let addr = parasite.data_addr();
    for (i, snap) in snapshots.iter().enumerate().skip(1) {
        let mut rt = RemoteThread::begin(seized, &stub, snap).map_err(rem("preparing a thread"))?;
        let r = rt
            .syscall(pdump_arch::native::syscall::nr::SIGALTSTACK, &[0, addr])
            .map_err(rem("sigaltstack in a thread"))?;
        rt.end().map_err(rem("parking a thread"))?;
        if r == 0 {
            let d = parasite.data_mut();
            let w = |o: usize| u64::from_le_bytes(d[o..o + 8].try_into().expect("8 bytes"));
            img.threads[i].altstack = model::AltStack {
                sp: w(0),
                flags: w(8) as i32,
                size: w(16),
            };
        }
    }
    stub.remove().map_err(rem("removing the syscall stub"))?;
    Ok(())
}

/// Which pages of a mapping are written: none for mappings the restorer
/// recreates from elsewhere (vdso, vvar, shared file mappings, I/O maps),
/// anonymous copies only for private file mappings, every present page for
/// the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PagePolicy {
    None,
    Present,
    AnonOnly,
}

fn policy(v: &model::Vma) -> PagePolicy {
    use model::VmaKind::*;
    if v.vm_flags
        .iter()
        .any(|f| f == "io" || f == "pf" || f == "dd")
    {
        return PagePolicy::None;
    }
    match v.kind {
        Vdso | Vvar | VvarVclock | Vsyscall => PagePolicy::None,
        File if v.shared => PagePolicy::None,
        File => PagePolicy::AnonOnly,
        _ => PagePolicy::Present,
    }
}

fn dump_pages(
    seized: &Seized,
    parasite: &mut Parasite<'_>,
    vmas: &mut [model::Vma],
    dir: &Path,
    opts: &DumpOptions,
) -> Result<(u64, u64)> {
    let pid = seized.pid();
    let prc = |step| move |source| DumpError::Proc { pid, step, source };
    let img = |source| DumpError::Image { pid, source };
    let inf = |step| move |source| DumpError::Infect { pid, step, source };
    let path = dir.join(image::pages_file_name(pid));
    let file = image::create_pages_file(dir, pid).map_err(img)?;
    let mut pagemap = procfs::Pagemap::open(pid).map_err(prc("opening pagemap"))?;
    let pipe_size = opts.pipe_size.min(pipe_max_size());
    let pipes = parasite
        .page_pipes(1, pipe_size)
        .map_err(inf("creating page pipes"))?;
    let pipe = &pipes[0];
    let page = pdump_arch::PAGE_SIZE as u64;
    let mut offset: u64 = 0; // data offset in the pages file
    let mut npages: u64 = 0;

    // Batches of (addr, len) that the parasite vmsplices in one command.
    let mut batch: Vec<(u64, u64)> = Vec::new();
    let mut batch_bytes = 0u64;
    let flush = |batch: &mut Vec<(u64, u64)>,
                 batch_bytes: &mut u64,
                 offset: &mut u64,
                 parasite: &mut Parasite<'_>|
     -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let (start, end) = (batch[0].0, batch.last().map(|b| b.0 + b.1).unwrap_or(0));
        let seq = parasite.post_vmsplice(0, batch).map_err(inf("vmsplice"))?;
        let moved = splice_exact(
            pipe.as_raw_fd(),
            file.as_raw_fd(),
            4096 + *offset,
            *batch_bytes,
            || parasite.poll_done(seq),
        )
        .map_err(|source| DumpError::Pages {
            pid,
            start,
            end,
            path: path.clone(),
            source,
        })?;
        let got = parasite
            .wait_done(seq, pdump_parasite::cmd::VMSPLICE)
            .map_err(inf("vmsplice"))?;
        if got != *batch_bytes as i64 || moved != *batch_bytes {
            return Err(DumpError::ShortSplice {
                pid,
                got,
                want: *batch_bytes,
            });
        }
        *offset += *batch_bytes;
        batch.clear();
        *batch_bytes = 0;
        Ok(())
    };

    for v in vmas.iter_mut() {
        let pol = policy(v);
        if pol == PagePolicy::None {
            continue;
        }
        let runs = match pol {
            PagePolicy::AnonOnly => {
                anon_ranges(pid, v.start, v.end).map_err(|source| DumpError::Pages {
                    pid,
                    start: v.start,
                    end: v.end,
                    path: path.clone(),
                    source,
                })?
            }
            _ => pagemap
                .present_ranges(v.start, v.end)
                .map_err(prc("scanning pagemap"))?,
        };
        let readable = v.prot & 1 != 0;
        for (addr, n) in runs {
            let len = n * page;
            v.pages.push(model::PageRun {
                addr,
                npages: n,
                offset: offset + batch_bytes,
                crc32c: 0,
            });
            npages += n;
            if readable {
                batch.push((addr, len));
                batch_bytes += len;
                if batch.len() >= pdump_parasite::MAX_IOVS || batch_bytes >= opts.batch_bytes {
                    flush(&mut batch, &mut batch_bytes, &mut offset, parasite)?;
                }
            } else {
                // PROT_NONE etc.: vmsplice cannot pin these; read them
                // through /proc/PID/mem (which may) after the batch so far.
                flush(&mut batch, &mut batch_bytes, &mut offset, parasite)?;
                copy_unreadable(pid, addr, len, &file, 4096 + offset).map_err(|source| {
                    DumpError::Pages {
                        pid,
                        start: addr,
                        end: addr + len,
                        path: path.clone(),
                        source,
                    }
                })?;
                offset += len;
            }
        }
    }
    flush(&mut batch, &mut batch_bytes, &mut offset, parasite)?;
    drop(pipes);
    image::finish_pages_file(&file, &path, offset).map_err(img)?;
    Ok((offset, npages))
}

/// Present pages of a private file mapping that are anonymous copies
/// (written by the task), as runs: pagemap bit 63 (present) without bit 61
/// (file page or shared anonymous).
fn anon_ranges(pid: i32, start: u64, end: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(format!("/proc/{pid}/pagemap"))?;
    let page = pdump_arch::PAGE_SIZE as u64;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut buf = vec![0u8; 8 * 4096];
    let mut addr = start;
    while addr < end {
        let n = ((end - addr) / page).min(4096) as usize;
        f.read_exact_at(&mut buf[..n * 8], addr / page * 8)?;
        for i in 0..n {
            let e = u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            if e >> 63 & 1 == 1 && e >> 61 & 1 == 0 {
                let a = addr + i as u64 * page;
                match out.last_mut() {
                    Some((s, c)) if *s + *c * page == a => *c += 1,
                    _ => out.push((a, 1)),
                }
            }
        }
        addr += n as u64 * page;
    }
    Ok(out)
}

/// /proc/sys/fs/pipe-max-size (1 MiB if unreadable).
fn pipe_max_size() -> usize {
    std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20)
}

fn copy_unreadable(
    pid: i32,
    addr: u64,
    len: u64,
    file: &std::fs::File,
    at: u64,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        mem.read_exact_at(&mut buf[..n], addr + done)?;
        file.write_all_at(&buf[..n], at + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Move `len` bytes from a pipe into `file` at `off` with splice, while the
/// parasite fills the pipe. Stops early (returning the bytes moved) if the
/// parasite's command finished and the pipe is empty, so a failed vmsplice
/// can never hang the dumper.
fn splice_exact(
    pipe: i32,
    file: i32,
    mut off: u64,
    len: u64,
    mut done: impl FnMut() -> bool,
) -> std::io::Result<u64> {
    let mut left = len;
    while left > 0 {
        let mut o = off as libc::loff_t;
        // SAFETY: splice between two fds we own; `o` is a valid loff_t.
        let n = unsafe {
            libc::splice(
                pipe,
                std::ptr::null_mut(),
                file,
                &mut o,
                left as usize,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => {
                    if done() {
                        // The command ended; drain what is left, then stop.
                        let mut pfd = libc::pollfd {
                            fd: pipe,
                            events: libc::POLLIN,
                            revents: 0,
                        };
                        // SAFETY: one pollfd we own.
                        if unsafe { libc::poll(&mut pfd, 1, 0) } <= 0 {
                            return Ok(len - left);
                        }
                        continue;
                    }
                    let mut pfd = libc::pollfd {
                        fd: pipe,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one pollfd we own; 50 ms timeout.
                    unsafe { libc::poll(&mut pfd, 1, 50) };
                    continue;
                }
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "page pipe closed",
            ));
        }
        left -= n as u64;
        off += n as u64;
        crate::fault::point(); // mid-batch: the parasite is inside vmsplice
    }
    Ok(len)
}

/// Compute every run's CRC32C from the written pages file.
fn checksum_runs(
    dir: &Path,
    img: &mut model::ProcessImage,
) -> std::result::Result<(), image::ImageError> {
    if img.pages_bytes == 0 {
        return Ok(());
    }
    let path = dir.join(&img.pages_file);
    let f = std::fs::File::open(&path).map_err(|source| image::ImageError::Io {
        op: "open",
        path: path.clone(),
        source,
    })?;
    // SAFETY: a private read-only mapping of a file only this dump writes.
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|source| image::ImageError::Io {
        op: "mmap",
        path: path.clone(),
        source,
    })?;
    let page = pdump_arch::PAGE_SIZE as u64;
    for v in img.vmas.iter_mut() {
        for r in v.pages.iter_mut() {
            let s = (4096 + r.offset) as usize;
            let e = s + (r.npages * page) as usize;
            r.crc32c = crc32c::crc32c(&map[s..e]);
        }
    }
    Ok(())
}
