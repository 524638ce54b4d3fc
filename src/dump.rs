//! Dumping a process tree into a checkpoint directory.
//!
//! ```text
//!  collect the tree (DFS, pid on every pid-ns level, zombies)
//!  ─ seize every process, re-collect, seize the newcomers, until stable
//!  ─ leaks: resources shared with the outside (container mode refuses)
//!  ─ per process, in parallel on a pool of worker threads (the thread that
//!    seized a task is its tracer and does all its ptrace work):
//!      snapshot regs/xstate/mask/pending/rseq ─ read /proc (VMAs, fds, creds,
//!      limits, ...) ─ refuse unsupported fds ─ infect ─ MISC (sigactions,
//!      itimers, timers, altstack, subreaper) ─ other threads' altstacks ─
//!      pages: the parasite vmsplices present pages into a page pipe, the
//!      worker splices them into pages-PID.img ─ cure (still seized)
//!  ─ files shared between processes become one object each
//!  ─ core-PID.img per process, inventory.img last
//!  ─ release: detach everything (--leave-running) or kill the tree
//! ```
//!
//! Any error releases every task untouched (workers cure and detach on drop)
//! and leaves no inventory behind, so a failed dump is never mistaken for a
//! checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossbeam::channel::{unbounded, Receiver, Sender};
use pdump_arch::{Arch, Native};

use crate::image::{self, model};
use crate::infect::{InfectError, Parasite, ParkedParasite};
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
    /// Collecting the tree failed.
    #[error("collecting the process tree of {root}")]
    Tree {
        /// The root.
        root: i32,
        /// Cause.
        #[source]
        source: crate::tree::TreeError,
    },
    /// The tree kept changing while it was being seized.
    #[error("the tree of {root} kept changing after {rounds} rounds of seizing")]
    Unstable {
        /// The root.
        root: i32,
        /// Rounds tried.
        rounds: usize,
    },
    /// Looking for leaks failed, or container mode found some.
    #[error("checking the tree of {root} for resources shared with the outside")]
    Leaks {
        /// The root.
        root: i32,
        /// Cause.
        #[source]
        source: crate::leaks::LeakError,
    },
    /// Matching files shared between processes failed.
    #[error("matching files shared between the tree's processes")]
    Share {
        /// Cause.
        #[source]
        source: crate::fdshare::ShareError,
    },
    /// A mapping's `VmFlags` changed between the read of `smaps` before the
    /// freeze and the snapshot's fork (see `crate::cow::check_flags`): the
    /// dump is made again with `smaps` read while frozen.
    #[error(
        "pid {pid}: mapping {start:#x}-{end:#x} {what} since its smaps was read before the freeze"
    )]
    FlagsChanged {
        /// The process.
        pid: i32,
        /// First byte of the mapping.
        start: u64,
        /// One past its last byte.
        end: u64,
        /// What the snapshot showed.
        what: &'static str,
    },
    /// A step of the copy-on-write snapshot failed.
    #[error("pid {pid}: {step}")]
    Snapshot {
        /// The process.
        pid: i32,
        /// Step.
        step: &'static str,
        /// Cause.
        #[source]
        source: crate::cow::SnapshotError,
    },
    /// A dump worker thread died.
    #[error("dump worker {index} died")]
    Worker {
        /// The worker.
        index: usize,
    },
    /// A helper thread could not be started.
    #[error("starting the {what} thread")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, DumpError>;

/// Dump workers per CPU by default: a worker mostly waits for its tasks.
pub const WORKERS_PER_CPU: usize = 4;

/// How to dump.
#[derive(Clone, Debug)]
pub struct DumpOptions {
    /// Image directory (created if missing).
    pub dir: PathBuf,
    /// Leave the tree running after the dump (else it is killed).
    pub leave_running: bool,
    /// Page pipe size (bytes; capped by /proc/sys/fs/pipe-max-size).
    pub pipe_size: usize,
    /// Threads that move a big process's pages (0: automatic, the CPUs not
    /// busy with other processes; small processes use their tracer thread).
    pub page_threads: usize,
    /// Find zero pages and CRC32Cs in the dumper (every page is copied
    /// through it) rather than in the parasite. The parasite does it where
    /// the CPU has a CRC32 instruction (x86_64 with SSE4.2), unless this is
    /// set; the CLI sets it with `PDUMP_DUMPER_SCAN=1`.
    pub dumper_scan: bool,
    /// Container mode (refuse any leak): `None` picks it when the root is the
    /// init of a pid namespace, sub-tree mode otherwise.
    pub container: Option<bool>,
    /// Worker threads that seize and dump processes (0:
    /// [`WORKERS_PER_CPU`] per CPU, at least 2 CPUs counted; never more
    /// than processes). Snapshot drains and image writes use one thread
    /// per CPU.
    pub workers: usize,
    /// With `leave_running`: freeze only while the state is captured; a
    /// copy-on-write snapshot (a fork of each process) is drained after the
    /// tree runs again (see `crate::cow`). Ignored when the tree is killed.
    pub cow: bool,
    /// With `cow`: a process with less resident anonymous and shmem memory
    /// than this is copied while frozen instead (its copy costs less than
    /// a snapshot's fork, drain and reap); 0: every process through a
    /// snapshot.
    pub cow_min_bytes: u64,
}

impl Default for DumpOptions {
    fn default() -> Self {
        DumpOptions {
            dir: PathBuf::from("."),
            leave_running: true,
            pipe_size: 1 << 20,
            page_threads: 0,
            dumper_scan: std::env::var_os("PDUMP_DUMPER_SCAN").is_some_and(|v| v == "1"),
            container: None,
            workers: 0,
            cow: true,
            cow_min_bytes: crate::pagestream::SMALL_PLAN_BYTES,
        }
    }
}

/// What a dump did.
#[derive(Clone, Debug, Default)]
pub struct DumpSummary {
    /// Root pid.
    pub pid: i32,
    /// Processes dumped (zombies not counted).
    pub processes: usize,
    /// Zombies recorded.
    pub zombies: usize,
    /// Threads dumped.
    pub threads: usize,
    /// Mappings recorded.
    pub vmas: usize,
    /// Pages written.
    pub pages: u64,
    /// Container (strict) mode.
    pub container: bool,
    /// Resources shared with the outside (sub-tree mode).
    pub leaks: Vec<model::Leak>,
    /// Processes whose pages came from a copy-on-write snapshot (the
    /// others were copied while frozen).
    pub snapshots: usize,
    /// Time the tree was frozen.
    pub frozen: Duration,
    /// Total time.
    pub total: Duration,
}

fn ns(sec: i64, sub: i64, sub_per_sec: i64) -> u64 {
    (sec.max(0) as u64) * 1_000_000_000 + (sub.max(0) as u64) * (1_000_000_000 / sub_per_sec as u64)
}

/// What a worker produced for one process.
struct ProcessDump {
    img: model::ProcessImage,
    child_subreaper: bool,
    /// The copy-on-write snapshot still to drain.
    cow: Option<crate::cow::Pending>,
}

enum Job {
    Seize(i32),
    /// Dump a seized process: its smaps as read before the freeze (see
    /// [`pre_read_smaps`]), and whether its pages come from a copy-on-write
    /// snapshot.
    Dump(i32, Option<Vec<model::Vma>>, bool),
    Release {
        kill: bool,
    },
}

enum Reply {
    Seized(i32, Result<()>),
    Dumped(i32, Box<Result<ProcessDump>>),
    Released(Result<()>),
}

/// A dump worker: the tracer of the processes it seized.
struct Worker {
    tx: Option<Sender<Job>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

fn worker_loop(rx: Receiver<Job>, tx: Sender<Reply>, opts: DumpOptions) {
    let mut owned: BTreeMap<i32, Seized> = BTreeMap::new();
    // Kill mode: parasites left in their dumped tasks, cured only if the
    // dump fails (a successful one kills the tasks).
    let mut parked: BTreeMap<i32, ParkedParasite> = BTreeMap::new();
    while let Ok(job) = rx.recv() {
        match job {
            Job::Seize(pid) => {
                let r = Seized::seize(pid)
                    .map(|s| {
                        owned.insert(pid, s);
                    })
                    .map_err(|source| DumpError::Ptrace {
                        pid,
                        step: "seizing",
                        source,
                    });
                let _ = tx.send(Reply::Seized(pid, r));
            }
            Job::Dump(pid, hint, cow) => {
                let r = match owned.get(&pid) {
                    Some(s) => dump_one(s, &opts, hint, cow),
                    None => Err(DumpError::Ptrace {
                        pid,
                        step: "dumping",
                        source: PtraceError::NoSuchProcess { pid },
                    }),
                };
                let r = r.map(|(d, p)| {
                    if let Some(p) = p {
                        parked.insert(pid, p);
                    }
                    d
                });
                let _ = tx.send(Reply::Dumped(pid, Box::new(r)));
            }
            Job::Release { kill } => {
                let mut result = Ok(());
                for (pid, s) in std::mem::take(&mut owned) {
                    let r = if kill {
                        let r = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        )
                        .map_err(|source| DumpError::Kill { pid, source });
                        // Killed: its parasite goes with it (closing the
                        // command pipe now cannot let the blob run on).
                        drop(parked.remove(&pid));
                        s.forget();
                        r
                    } else if let Err(e) = cure_parked(&mut parked, &s) {
                        Err(e)
                    } else {
                        s.detach().map_err(|source| DumpError::Ptrace {
                            pid,
                            step: "detaching",
                            source,
                        })
                    };
                    if result.is_ok() {
                        result = r;
                    }
                }
                let _ = tx.send(Reply::Released(result));
            }
        }
    }
    // Channel closed (dump failed or finished): every parked parasite is
    // cured, then every Seized left detaches on drop.
    for s in owned.values() {
        if let Err(e) = cure_parked(&mut parked, s) {
            log::error!("{e}");
        }
    }
}

/// Cure the parasite parked in `s`, if any.
fn cure_parked(parked: &mut BTreeMap<i32, ParkedParasite>, s: &Seized) -> Result<()> {
    let pid = s.pid();
    match parked.remove(&pid) {
        Some(p) => p
            .resume(s)
            .and_then(|p| p.cure())
            .map_err(|source| DumpError::Infect {
                pid,
                step: "curing",
                source,
            }),
        None => Ok(()),
    }
}

struct Pool {
    workers: Vec<Worker>,
    rx: Receiver<Reply>,
    owner: HashMap<i32, usize>,
    next: usize,
}

impl Pool {
    fn new(n: usize, opts: &DumpOptions) -> Pool {
        let (rtx, rx) = unbounded();
        let workers = (0..n)
            .map(|i| {
                let (tx, jrx) = unbounded();
                let rtx = rtx.clone();
                let opts = opts.clone();
                let handle = std::thread::Builder::new()
                    .name(format!("pdump-worker-{i}"))
                    .spawn(move || worker_loop(jrx, rtx, opts))
                    .expect("spawning a dump worker");
                Worker {
                    tx: Some(tx),
                    handle: Some(handle),
                }
            })
            .collect();
        Pool {
            workers,
            rx,
            owner: HashMap::new(),
            next: 0,
        }
    }

    fn send(&self, w: usize, job: Job) -> Result<()> {
        self.workers[w]
            .tx
            .as_ref()
            .and_then(|t| t.send(job).ok())
            .ok_or(DumpError::Worker { index: w })
    }

    fn recv(&self) -> Result<Reply> {
        self.rx
            .recv()
            .map_err(|_| DumpError::Worker { index: usize::MAX })
    }

    /// Seize `pids` (spread over the workers); returns the pids that vanished.
    fn seize(&mut self, pids: &[i32]) -> Result<Vec<i32>> {
        for &pid in pids {
            let w = self.next % self.workers.len();
            self.next += 1;
            self.owner.insert(pid, w);
            self.send(w, Job::Seize(pid))?;
        }
        let mut gone = Vec::new();
        let mut first_err = None;
        for _ in pids {
            if let Reply::Seized(pid, r) = self.recv()? {
                match r {
                    Ok(()) => {}
                    Err(DumpError::Ptrace {
                        source: PtraceError::NoSuchProcess { .. },
                        ..
                    })
                    | Err(DumpError::Ptrace {
                        source: PtraceError::Zombie { .. },
                        ..
                    }) => {
                        self.owner.remove(&pid);
                        gone.push(pid);
                    }
                    Err(e) => {
                        self.owner.remove(&pid);
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(gone),
        }
    }

    /// Dump every seized process in parallel. Snapshots of the processes
    /// that were dumped go to `pending` even when another one failed, so
    /// they are ended and reaped after the tree is released.
    fn dump(
        &self,
        order: &[i32],
        pending: &mut crate::cow::PendingSet,
        hints: &mut HashMap<i32, Vec<model::Vma>>,
        cow: &std::collections::HashSet<i32>,
    ) -> Result<HashMap<i32, ProcessDump>> {
        for pid in order {
            let job = Job::Dump(*pid, hints.remove(pid), cow.contains(pid));
            self.send(self.owner[pid], job)?;
        }
        let mut out = HashMap::new();
        let mut first_err = None;
        for _ in order {
            if let Reply::Dumped(pid, r) = self.recv()? {
                match *r {
                    Ok(mut d) => {
                        if let Some(p) = d.cow.take() {
                            pending.insert(pid, p);
                        }
                        out.insert(pid, d);
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    fn release(&self, kill: bool) -> Result<()> {
        for w in 0..self.workers.len() {
            self.send(w, Job::Release { kill })?;
        }
        let mut result = Ok(());
        for _ in 0..self.workers.len() {
            if let Reply::Released(r) = self.recv()? {
                if result.is_ok() {
                    result = r;
                }
            }
        }
        result
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for w in &mut self.workers {
            w.tx = None; // the worker drops its Seized tasks: they run again untouched
        }
        for w in &mut self.workers {
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
    }
}

/// Dump the tree rooted at `root` into `opts.dir`.
pub fn dump_tree(root: i32, opts: &DumpOptions) -> Result<DumpSummary> {
    again_if_flags_changed(|pre_read| dump_impl(root, opts, false, pre_read))
}

/// Dump exactly one process (all its threads, none of its children).
pub fn dump_process(pid: i32, opts: &DumpOptions) -> Result<DumpSummary> {
    again_if_flags_changed(|pre_read| dump_impl(pid, opts, true, pre_read))
}

/// A copy-on-write dump reads `smaps` before the freeze; where a mapping's
/// flags changed before the fork in a way that matters (see
/// `crate::cow::check_flags`), it is made again with `smaps` read while
/// frozen, as without copy-on-write.
fn again_if_flags_changed(dump: impl Fn(bool) -> Result<DumpSummary>) -> Result<DumpSummary> {
    match dump(true) {
        Err(e @ DumpError::FlagsChanged { .. }) => {
            log::warn!("{e}: dumping again, reading smaps while frozen");
            dump(false)
        }
        r => r,
    }
}

/// Whether a process has so little memory to dump (less than
/// `opts.cow_min_bytes` of resident anonymous and shmem pages) that
/// `--leave-running` copies it while frozen instead of through a
/// copy-on-write snapshot: for 200 processes of ~250 KiB each, the
/// snapshots' forks, drains and reaps cost more wall time than the copies.
fn small_process(status: &procfs::Status, opts: &DumpOptions) -> bool {
    status
        .rss_anon_shmem
        .is_some_and(|b| b < opts.cow_min_bytes)
}

/// `/proc/PID/smaps` of each of `pids`, read before the freeze, `workers`
/// at a time (a task that cannot be read is left out: it is read while
/// frozen). With copy-on-write the frozen task's cheap `/proc/PID/maps`
/// takes its flags from here (`smaps` walks every page table entry: about
/// 13 ms per GiB mapped, more than half the freeze otherwise), checked
/// against the snapshot's own `smaps` after the resume.
fn pre_read_smaps(
    pids: &[i32],
    workers: usize,
    opts: &DumpOptions,
) -> HashMap<i32, Vec<model::Vma>> {
    // Test hook: pretend MADV_DONTFORK / MADV_WIPEONFORK were set after this
    // read (the check after the fork must catch it).
    let stale = std::env::var_os("PDUMP_TEST_STALE_SMAPS").is_some();
    let out = std::sync::Mutex::new(HashMap::new());
    let _ = for_each_parallel(pids, workers, |&pid| {
        if procfs::status(pid).is_ok_and(|st| small_process(&st, opts)) {
            return Ok::<(), std::convert::Infallible>(()); // read while frozen
        }
        let Ok(mut vmas) = procfs::smaps(pid) else {
            return Ok(());
        };
        if stale {
            for v in &mut vmas {
                v.vm_flags.remove(model::VmFlag::DontCopy);
                v.vm_flags.remove(model::VmFlag::WipeOnFork);
            }
        }
        out.lock().unwrap().insert(pid, vmas);
        Ok(())
    });
    out.into_inner().unwrap()
}

/// Run `f` on every item of `items` with up to `threads` threads (this one
/// included) taking the next item as they finish one. After the first
/// error no item is started; that error is returned.
fn for_each_parallel<T: Sync, E: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> std::result::Result<(), E> + Sync,
) -> std::result::Result<(), E> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let first_err = std::sync::Mutex::new(None);
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(item) = items.get(i) else { break };
        if let Err(e) = f(item) {
            first_err
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(e);
            next.store(items.len(), Ordering::Relaxed);
        }
    };
    std::thread::scope(|sc| {
        for _ in 1..threads.clamp(1, items.len().max(1)) {
            sc.spawn(work);
        }
        work();
    });
    match first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `pre_read`: with copy-on-write, read `smaps` before the freeze (see
/// [`pre_read_smaps`]).
fn dump_impl(root: i32, opts: &DumpOptions, single: bool, pre_read: bool) -> Result<DumpSummary> {
    let t0 = Instant::now();
    let mut c = capture(root, opts, single, pre_read)?;
    log::debug!("captured: {:?}", t0.elapsed());
    let snapshots = c.pending.len();
    // Copy-on-write: the pages, from the snapshots, while the tree runs.
    c.pending.drain(&mut c.images, &opts.dir, opts, c.workers)?;
    log::debug!("snapshots drained: {:?}", t0.elapsed());
    let c_workers = c.workers;
    let Captured {
        tree,
        order,
        images,
        leaks,
        container,
        frozen,
        files,
        ..
    } = c;

    let mut summary = DumpSummary {
        pid: root,
        processes: images.len(),
        zombies: tree
            .tasks
            .iter()
            .filter(|t| matches!(t.state, model::TaskState::Zombie { .. }))
            .count(),
        container,
        leaks: leaks.clone(),
        snapshots,
        frozen,
        ..Default::default()
    };
    for img in &images {
        summary.threads += img.threads.len();
        summary.vmas += img.vmas.len();
        summary.pages += img
            .vmas
            .iter()
            .flat_map(|v| v.pages.iter())
            .map(|r| r.npages)
            .sum::<u64>();
    }
    write_images(&opts.dir, &images, c_workers)?;
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
        root_pid: root,
        processes: order.clone(),
        leave_running: opts.leave_running,
        page_size: pdump_arch::PAGE_SIZE as u32,
        mode: if container {
            model::DumpMode::Container
        } else {
            model::DumpMode::SubTree
        },
        tree: tree.tasks,
        leaks,
        files,
    };
    image::write_inventory(&opts.dir, &inv)
        .map_err(|source| DumpError::Image { pid: root, source })?;
    summary.total = t0.elapsed();
    log::debug!("images written: {:?}", summary.total);
    Ok(summary)
}

/// Write the core image of every process of `images` into `dir`, with
/// `workers` threads (a tree of small processes spends as long creating and
/// writing their files as dumping them).
fn write_images(dir: &Path, images: &[model::ProcessImage], workers: usize) -> Result<()> {
    for_each_parallel(images, workers, |img| {
        image::write_process(dir, img).map_err(|source| DumpError::Image {
            pid: img.pid,
            source,
        })
    })
}

/// The tree as captured while frozen, released again; with copy-on-write
/// the pages are still in the snapshots (`pending`).
pub(crate) struct Captured {
    tree: crate::tree::Tree,
    order: Vec<i32>,
    /// Per process (in `order`); page runs not yet filled where pending.
    pub(crate) images: Vec<model::ProcessImage>,
    leaks: Vec<model::Leak>,
    container: bool,
    frozen: Duration,
    files: Vec<model::FileObject>,
    /// Dropping it ends and reaps the snapshots.
    pub(crate) pending: crate::cow::PendingSet,
    workers: usize,
}

/// Seize the tree of `root` (or `root` alone), capture its state, release
/// it: [`dump_impl`] up to the pages of copy-on-write snapshots, which are
/// left to the caller (a dump drains them into page files, a live core
/// into the core file).
pub(crate) fn capture(
    root: i32,
    opts: &DumpOptions,
    single: bool,
    pre_read: bool,
) -> Result<Captured> {
    std::fs::create_dir_all(&opts.dir).map_err(|source| DumpError::Dir {
        path: opts.dir.clone(),
        source,
    })?;
    // A stale inventory must not make a failed dump look like a checkpoint.
    let _ = std::fs::remove_file(opts.dir.join(image::INVENTORY_FILE));
    let collect = || -> Result<crate::tree::Tree> {
        let mut t =
            crate::tree::collect(root).map_err(|source| DumpError::Tree { root, source })?;
        if single {
            t.tasks.truncate(1);
        }
        Ok(t)
    };
    let t_collect = Instant::now();
    let mut tree = collect()?;
    log::debug!("tree collected: {:?}", t_collect.elapsed());
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2);
    // A worker mostly waits for its tasks (ptrace stops, parasite commands
    // run by the task): with one per CPU, a tree of 200 small processes
    // left a third of both CPUs idle; four per CPU dump it 10-15% faster.
    let nworkers = if opts.workers > 0 {
        opts.workers
    } else {
        cpus * WORKERS_PER_CPU
    };
    // Declared before the pool, so on an error it is dropped after it: the
    // snapshots are reaped once the workers released the tree.
    let mut pending = crate::cow::PendingSet::default();
    let mut pool = Pool::new(nworkers.min(tree.tasks.len().max(1)), opts);

    let mut hints = if pre_read && opts.leave_running && opts.cow {
        pre_read_smaps(&alive(&tree), cpus, opts)
    } else {
        HashMap::new()
    };

    // Seize, re-collect, seize newcomers, until stable.
    let frozen_at = Instant::now();
    let mut seized: std::collections::BTreeSet<i32> = Default::default();
    let mut rounds = 0;
    loop {
        let new: Vec<i32> = alive(&tree)
            .into_iter()
            .filter(|p| !seized.contains(p))
            .collect();
        if new.is_empty() && rounds > 0 {
            break;
        }
        rounds += 1;
        if rounds > 20 {
            return Err(DumpError::Unstable { root, rounds });
        }
        let gone = pool.seize(&new)?;
        seized.extend(new.iter().filter(|p| !gone.contains(p)));
        tree = collect()?;
    }
    log::debug!(
        "seized {} tasks in {rounds} round(s): {:?}",
        seized.len(),
        frozen_at.elapsed()
    );
    let order: Vec<i32> = alive(&tree);
    seized.retain(|p| order.contains(p)); // exited before we got them: they are zombies now

    // Which processes go through a copy-on-write snapshot: decided on what
    // they hold now, frozen (one that cannot be read is given one).
    let cow: std::collections::HashSet<i32> = if opts.leave_running && opts.cow {
        order
            .iter()
            .copied()
            .filter(|&pid| !procfs::status(pid).is_ok_and(|st| small_process(&st, opts)))
            .collect()
    } else {
        Default::default()
    };

    // Leaks. pdump itself is never an outside task, so what the dump does
    // to the tree (the blob's fds, fds duplicated into pdump) changes
    // nothing the check looks at, except the copy-on-write snapshots: new
    // processes that share the tree's namespaces and, until they close
    // them, its files. Without snapshots the check runs alongside the
    // dumps (it is serial: 45 ms of a 200-process tree); with them, first.
    let root_entry = tree.tasks.first().cloned().unwrap_or_default();
    let container = opts.container.unwrap_or(root_entry.pidns_init);
    let check_leaks = || -> Result<Vec<model::Leak>> {
        let leaks =
            crate::leaks::find_leaks(&order).map_err(|source| DumpError::Leaks { root, source })?;
        log::debug!("leak check done: {:?}", frozen_at.elapsed());
        if container {
            crate::leaks::refuse_if_leaks(&leaks)
                .map_err(|source| DumpError::Leaks { root, source })?;
        }
        Ok(leaks)
    };
    let (leaks, mut dumps) = if !cow.is_empty() {
        let leaks = check_leaks()?;
        (leaks, pool.dump(&order, &mut pending, &mut hints, &cow)?)
    } else {
        let (leaks, dumps) = std::thread::scope(|sc| {
            let check = std::thread::Builder::new()
                .name("pdump-leaks".into())
                .spawn_scoped(sc, check_leaks)
                .map_err(|source| DumpError::Thread {
                    what: "leak check",
                    source,
                })?;
            let dumps = pool.dump(&order, &mut pending, &mut hints, &cow);
            let leaks = check
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            Ok::<_, DumpError>((leaks, dumps))
        })?;
        // A refusal (container mode) wins over a dump error: it is the
        // reason the dump must not happen.
        (leaks?, dumps?)
    };
    log::debug!("processes dumped: {:?}", frozen_at.elapsed());
    let mut images: Vec<model::ProcessImage> = Vec::with_capacity(order.len());
    for pid in &order {
        let d = dumps.remove(pid).expect("every seized process was dumped");
        if let Some(t) = tree.tasks.iter_mut().find(|t| t.pid == *pid) {
            t.child_subreaper = d.child_subreaper;
            // A seized task reads as traced ('t'), not stopped: the group stop
            // we saw while seizing is the truth.
            if d.img.threads.first().is_some_and(|th| th.stopped) {
                t.state = model::TaskState::Stopped;
            }
        }
        images.push(d.img);
    }
    let files =
        crate::fdshare::share_files(&mut images).map_err(|source| DumpError::Share { source })?;

    log::debug!("files shared: {:?}", frozen_at.elapsed());
    // Everything is gathered: release the tree (it runs again, or dies).
    pool.release(!opts.leave_running)?;
    let frozen = frozen_at.elapsed();
    log::debug!("released: {frozen:?}");
    drop(pool);
    Ok(Captured {
        tree,
        order,
        images,
        leaks,
        container,
        frozen,
        files,
        pending,
        workers: cpus,
    })
}

fn alive(tree: &crate::tree::Tree) -> Vec<i32> {
    tree.tasks
        .iter()
        .filter(|t| !matches!(t.state, model::TaskState::Zombie { .. }))
        .map(|t| t.pid)
        .collect()
}

/// Dump one seized process (worker thread: its tracer). The process stays
/// seized; the caller releases it.
fn dump_one(
    seized: &Seized,
    opts: &DumpOptions,
    hint: Option<Vec<model::Vma>>,
    cow: bool,
) -> Result<(ProcessDump, Option<ParkedParasite>)> {
    let _active = crate::pagestream::ActiveGuard::new();
    let pid = seized.pid();
    let ptr = |step| move |source| DumpError::Ptrace { pid, step, source };
    let prc = |step| move |source| DumpError::Proc { pid, step, source };

    // Everything from outside first: a refusal leaves the task untouched.
    let mut threads = Vec::new();
    let mut snapshots = Vec::new();
    for t in seized.threads() {
        let snap = ThreadSnapshot::take(seized, t.tid).map_err(ptr("reading registers"))?;
        let mut gpr = vec![0u64; Native::GPR_NAMES.len()];
        Native::gpr_to_words(&snap.regs, &mut gpr);
        threads.push(model::ThreadState {
            tid: t.tid,
            comm: procfs::comm(pid, t.tid).unwrap_or_default(),
            gpr,
            fpregs: snap.fpregs.clone(),
            sigmask: snap.sigmask,
            pending: seized
                .pending(t.tid, false)
                .map_err(ptr("reading pending signals"))?,
            altstack: model::AltStack::default(),
            rseq: seized.rseq(t.tid).map_err(ptr("reading rseq"))?,
            restart_syscall: Native::interrupted_syscall(&snap.regs),
            stopped: t.was_stopped,
            clear_tid: 0,
        });
        snapshots.push(snap);
    }
    let shared_pending = seized
        .pending(pid, true)
        .map_err(ptr("reading shared pending signals"))?;
    let status = procfs::status(pid).map_err(prc("reading status"))?;
    // Copy-on-write only where there is memory to copy (`cow`, see
    // `small_process`): a small process is dumped while frozen.
    let hint = if cow { hint } else { None };
    let stat = procfs::stat(pid).map_err(prc("reading stat"))?;
    // With copy-on-write and smaps read before the freeze: maps, with the
    // flags from there where every mapping is the same (checked against
    // the snapshot after the fork).
    let pre_read = match hint {
        Some(hint) => {
            let mut vmas = procfs::maps(pid).map_err(prc("reading maps"))?;
            if crate::cow::flags_from(&mut vmas, &hint) {
                Some(vmas)
            } else {
                log::debug!(
                    "pid {pid}: its mappings changed since smaps was read: reading it again"
                );
                None
            }
        }
        None => None,
    };
    let flags_pre_read = pre_read.is_some();
    let mut vmas = match pre_read {
        Some(v) => v,
        None => procfs::smaps(pid).map_err(prc("reading smaps"))?,
    };
    // File contents and pipe data go straight into the file-data file.
    let mut data = image::DataWriter::new(&opts.dir, pid);
    let fds = procfs::fds(pid, &mut data).map_err(prc("reading fds"))?;
    data.finish()
        .map_err(|source| DumpError::Image { pid, source })?;
    let mut timers = procfs::timers(pid).map_err(prc("reading timers"))?;
    let mut proc_img = model::ProcessImage {
        pid,
        ppid: stat.ppid,
        pgid: stat.pgrp,
        sid: stat.session,
        // The leader's (the first thread's) comm, read above.
        comm: threads.first().map(|t| t.comm.clone()).unwrap_or_default(),
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
    let mut parasite =
        Parasite::infect_taken(seized, snapshots[0].clone()).map_err(inf("infecting"))?;
    crate::cow::reap_leftovers(&mut parasite, pid).map_err(inf("reaping leftover snapshots"))?;
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
    // MISC also read the child-subreaper flag and the leader's
    // clear_child_tid address (one round trip for all of it).
    let child_subreaper = misc.subreaper_ret == 0 && misc.subreaper != 0;
    if misc.tid_address_ret == 0 {
        proc_img.threads[0].clear_tid = misc.tid_address;
    }
    thread_altstacks(seized, &mut parasite, &snapshots, &mut proc_img)?;

    // Memory the kernel writes while the parasite (or the snapshot) runs:
    // rseq areas.
    let volatile: Vec<(u64, u64)> = proc_img
        .threads
        .iter()
        .filter_map(|t| t.rseq.as_ref())
        .map(|r| (r.abi_pointer, u64::from(r.abi_size)))
        .collect();
    // Pages: now, or from a copy-on-write snapshot once the tree runs again.
    if cow {
        let max_fd = proc_img.fds.iter().map(|f| f.fd).max().unwrap_or(0);
        let pending = crate::cow::capture(
            seized,
            &mut parasite,
            &vmas,
            volatile,
            max_fd,
            flags_pre_read,
            opts,
        )?;
        proc_img.vmas = vmas;
        parasite.cure().map_err(inf("curing"))?;
        return Ok((
            ProcessDump {
                img: proc_img,
                child_subreaper,
                cow: Some(pending),
            },
            None,
        ));
    }
    let (runs_bytes, _pages) =
        dump_pages(seized, &mut parasite, &mut vmas, &volatile, &opts.dir, opts)?;
    proc_img.vmas = vmas;
    proc_img.pages_bytes = runs_bytes;
    let dump = ProcessDump {
        img: proc_img,
        child_subreaper,
        cow: None,
    };
    if opts.leave_running {
        parasite.cure().map_err(inf("curing"))?;
        Ok((dump, None))
    } else {
        // Killed at the end, cured only if the dump fails.
        Ok((dump, Some(parasite.park())))
    }
}

/// Query the `clear_child_tid` address and the alternate signal stack of
/// every thread but the blob's own (MISC has those).
fn thread_altstacks(
    seized: &Seized,
    parasite: &mut Parasite<'_>,
    snapshots: &[ThreadSnapshot],
    img: &mut model::ProcessImage,
) -> Result<()> {
    const PR_GET_TID_ADDRESS: u64 = 40;
    let pid = seized.pid();
    let rem = |step| move |source| DumpError::Remote { pid, step, source };
    let prctl = pdump_arch::native::syscall::nr::PRCTL;
    let word = |p: &mut Parasite<'_>, off: usize| {
        let d = p.data_mut();
        u64::from_le_bytes(d[off..off + 8].try_into().expect("8 bytes"))
    };
    let addr = parasite.data_addr();
    if snapshots.len() < 2 {
        return Ok(());
    }
    let stub = Stub::install(seized).map_err(rem("installing the syscall stub"))?;
    for (i, snap) in snapshots.iter().enumerate().skip(1) {
        let mut rt = RemoteThread::begin(seized, &stub, snap).map_err(rem("preparing a thread"))?;
        let r = rt
            .syscall(pdump_arch::native::syscall::nr::SIGALTSTACK, &[0, addr])
            .map_err(rem("sigaltstack in a thread"))?;
        let t = rt
            .syscall(prctl, &[PR_GET_TID_ADDRESS, addr + 24])
            .map_err(rem("prctl(PR_GET_TID_ADDRESS) in a thread"))?;
        rt.end().map_err(rem("parking a thread"))?;
        if t == 0 {
            img.threads[i].clear_tid = word(parasite, 24);
        }
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
pub(crate) enum PagePolicy {
    None,
    Present,
    AnonOnly,
}

pub(crate) fn policy(v: &model::Vma) -> PagePolicy {
    use model::VmFlag as F;
    use model::VmaKind::*;
    if v.vm_flags.contains_any(&[F::Io, F::PfnMap, F::DontDump]) {
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
    volatile: &[(u64, u64)],
    dir: &Path,
    opts: &DumpOptions,
) -> Result<(u64, u64)> {
    let pid = seized.pid();
    let img = |source| DumpError::Image { pid, source };
    let path = dir.join(image::pages_file_name(pid));
    let file = image::create_pages_file(dir, pid).map_err(img)?;
    let mut plan = page_plan(pid, pid, vmas, |_| true)?;
    let sopts = stream_options(opts);
    if crate::pagestream::scan_mode(&sopts) {
        plan = crate::pagestream::guard_plan(plan, |i| vmas[i].shared, volatile);
    }
    plan = crate::pagestream::small_plan(plan);
    let streamed = crate::pagestream::stream(pid, parasite, &plan, &file, &path, None, sopts)?;
    drop(plan);
    let npages = install_runs(vmas, streamed.runs);
    image::finish_pages_file(&file, &path, streamed.data_len).map_err(img)?;
    Ok((streamed.data_len, npages))
}

/// How pages are streamed with these dump options.
pub(crate) fn stream_options(opts: &DumpOptions) -> crate::pagestream::StreamOptions {
    crate::pagestream::StreamOptions {
        pipe_size: opts.pipe_size.min(pipe_max_size()),
        threads: opts.page_threads,
        dumper_scan: opts.dumper_scan,
    }
}

/// The plan of process `pid`'s pages as process `from` holds them (the
/// task itself, or its copy-on-write snapshot): every run of pages to dump
/// of the mappings `want` selects, in address order ([`Src::Pipe`], or
/// [`Src::Mem`] for mappings vmsplice cannot take). One pagemap file
/// serves every mapping: one PAGEMAP_SCAN walk for the mappings dumped
/// whole, its entries for the anonymous copies of private file mappings.
///
/// [`Src::Pipe`]: crate::pagestream::Src::Pipe
/// [`Src::Mem`]: crate::pagestream::Src::Mem
pub(crate) fn page_plan(
    pid: i32,
    from: i32,
    vmas: &[model::Vma],
    want: impl Fn(&model::Vma) -> bool,
) -> Result<Vec<crate::pagestream::PlanRun>> {
    use crate::pagestream::{PlanRun, Src};
    let prc = |step| move |source| DumpError::Proc { pid, step, source };
    let mut pagemap = procfs::Pagemap::open(from).map_err(prc("opening pagemap"))?;
    let page = pdump_arch::PAGE_SIZE as u64;
    let dumped = |v: &model::Vma| want(v) && policy(v) != PagePolicy::None;

    // Present pages of every mapping that dumps them all, with one
    // PAGEMAP_SCAN walk over their span (one ioctl per mapping costs about
    // 2 us each with many mappings); mapping by mapping where the ioctl
    // does not take the span.
    let span = vmas
        .iter()
        .filter(|v| dumped(v) && policy(v) == PagePolicy::Present)
        .fold(None, |acc: Option<(u64, u64)>, v| {
            Some(acc.map_or((v.start, v.end), |(a, b)| (a.min(v.start), b.max(v.end))))
        });
    let all = span.and_then(|(lo, hi)| pagemap.present_ranges_ioctl(lo, hi).ok());
    let mut next_run = 0usize;

    let mut plan = Vec::new();
    for (i, v) in vmas.iter().enumerate() {
        if !dumped(v) {
            continue;
        }
        let runs = match (policy(v), &all) {
            (PagePolicy::AnonOnly, _) => pagemap
                .anon_ranges(v.start, v.end)
                .map_err(prc("reading pagemap"))?,
            (_, Some(all)) => clip_runs(all, &mut next_run, v.start, v.end),
            (_, None) => pagemap
                .present_ranges(v.start, v.end)
                .map_err(prc("scanning pagemap"))?,
        };
        // PROT_NONE etc.: vmsplice cannot pin these; they are read through
        // /proc/PID/mem (which may) in their place in the stream.
        let src = if v.prot & 1 == 0 { Src::Mem } else { Src::Pipe };
        plan.extend(runs.into_iter().map(|(addr, n)| PlanRun {
            vma: i,
            addr,
            len: n * page,
            src,
        }));
    }
    Ok(plan)
}

/// Put streamed runs (VMA index, run; address order) into their VMAs, whose
/// run lists are replaced; the number of pages.
pub(crate) fn install_runs(vmas: &mut [model::Vma], runs: Vec<(usize, model::PageRun)>) -> u64 {
    // Exact capacities: with tens of thousands of mappings of a run or two
    // each, `push`'s first allocation (4 runs) would cost 160 bytes apiece.
    let mut per_vma = vec![0usize; vmas.len()];
    for (i, _) in &runs {
        per_vma[*i] += 1;
    }
    for (v, n) in vmas.iter_mut().zip(per_vma) {
        v.pages = Vec::with_capacity(n);
    }
    let mut npages = 0;
    for (i, r) in runs {
        npages += r.npages;
        vmas[i].pages.push(r);
    }
    npages
}

/// The parts of `runs` (sorted `(address, pages)`) inside `[start, end)`;
/// `from` is where to start looking and advances past runs that end before
/// `end` (mappings are visited in address order).
fn clip_runs(runs: &[(u64, u64)], from: &mut usize, start: u64, end: u64) -> Vec<(u64, u64)> {
    let page = pdump_arch::PAGE_SIZE as u64;
    while *from < runs.len() && runs[*from].0 + runs[*from].1 * page <= start {
        *from += 1;
    }
    let mut out = Vec::new();
    for &(a, n) in &runs[*from..] {
        if a >= end {
            break;
        }
        let s = a.max(start);
        let e = (a + n * page).min(end);
        if e > s {
            out.push((s, (e - s) / page));
        }
    }
    out
}

/// /proc/sys/fs/pipe-max-size (1 MiB if unreadable), read once.
pub(crate) fn pipe_max_size() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20)
    })
}
