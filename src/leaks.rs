//! Leak detection (dump pipeline step 3): the resources the dumped tree
//! shares with tasks outside it.
//!
//! Seed 003 calls such a shared resource a "leak": whatever an outside task
//! can still change while the tree is frozen is dumped live, so the image may
//! not be coherent. pdump's container mode ([`DumpMode::Container`])
//! refuses any leak ([`refuse_if_leaks`]); sub-tree mode
//! ([`DumpMode::SubTree`]) dumps anyway and records every leak in the image
//! ([`Leak`], [`render`]).
//!
//! [`DumpMode::Container`]: crate::image::model::DumpMode::Container
//! [`DumpMode::SubTree`]: crate::image::model::DumpMode::SubTree
//!
//! [`find_leaks`] compares every live thread of the tree with every thread
//! of every other user-space process on the system (kernel threads and pdump
//! itself are skipped; tasks that exit meanwhile are ignored):
//!
//! | resource | how it is identified |
//! |---|---|
//! | namespaces (cgroup, ipc, mnt, net, pid, time, user, uts) | the nsfs inode number `readlink` shows for `/proc/PID/task/TID/ns/KIND` (`pid_for_children` and `time_for_children` count as the pid and time namespace) |
//! | address space (`CLONE_VM` without `CLONE_THREAD`) | `kcmp(KCMP_VM)` |
//! | fs struct (`CLONE_FS`) | `kcmp(KCMP_FS)` |
//! | files table (`CLONE_FILES`) | `kcmp(KCMP_FILES)` |
//! | SysV semaphore undo list (`CLONE_SYSVSEM`) | `kcmp(KCMP_SYSVSEM)`, only for tasks that have one |
//! | open files (the same `struct file`, not merely the same inode) | `kcmp(KCMP_FILE)` on the fds whose `dev`/`ino` match |
//! | attached SysV shm segments | `/SYSV` lines of `/proc/PID/maps`, `nattch` of `/proc/sysvipc/shm` in the tree's ipc namespace |
//!
//! `kcmp` does not only say "equal": it orders the kernel objects (by an
//! obfuscated but injective image of their addresses). The tree's objects of
//! each kind are therefore kept in a sorted list of distinct objects, and
//! every outside task is placed in it by binary search: with `k` distinct
//! tree objects of a kind, a task costs at most `ceil(log2(k + 1))` calls
//! per kind instead of `k`.
//!
//! With a sub-tree of the init namespaces every namespace is shared with the
//! rest of the system; that is correct, and reported.
//!
//! Limits: the check is as exact as `/proc` and `kcmp` are, for a tree that
//! stays frozen while it runs. Outside tasks pdump may not inspect (`EACCES`
//! or `EPERM`, e.g. a non-dumpable init of a VM) are listed in
//! [`LeakStats::uninspected`] and logged, not treated as errors. Files an
//! outside task only maps (no fd) are not compared. An fd-level leak is not
//! reported for an outside task that shares the tree's whole files table:
//! the files-table leak already covers every one of its fds. SysV shm
//! holders are searched among the outside tasks of the segment's ipc
//! namespace; attachments `nattch` counts but no such task explains (a task
//! that attached and then left the namespace) are reported as a number.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{CStr, CString};
use std::fmt::Write as _;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::image::model::Leak;
use crate::procfs::{self, ProcError};

/// How many pids of one side of a leak [`render`] shows before "+N more".
const RENDER_PIDS: usize = 8;
/// How many pids of one side of a leak the [`LeakError::Leaks`] message shows.
const ERROR_PIDS: usize = 32;

/// The `/proc/PID/ns` links compared, each with the namespace kind it names.
/// `pid_for_children` and `time_for_children` name the namespace the task's
/// next children will be in: a task that entered a namespace that way shares it.
const NS_LINKS: [(&CStr, &str); 10] = [
    (c"user", "user"),
    (c"mnt", "mnt"),
    (c"pid", "pid"),
    (c"pid_for_children", "pid"),
    (c"net", "net"),
    (c"ipc", "ipc"),
    (c"uts", "uts"),
    (c"cgroup", "cgroup"),
    (c"time", "time"),
    (c"time_for_children", "time"),
];

/// The order in which namespace leaks are listed.
const NS_ORDER: [&str; 8] = ["user", "mnt", "pid", "net", "ipc", "uts", "cgroup", "time"];

/// A failed operation of the leak check. Tasks that exit while they are
/// looked at are not errors: they are skipped.
#[derive(Debug, thiserror::Error)]
pub enum LeakError {
    /// Listing the processes in `/proc` failed.
    #[error("listing the processes in /proc")]
    ListProc {
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Listing a `/proc/PID/...` directory (`task/`, `fd/`) failed.
    #[error("listing {path} of pid {pid}")]
    ReadDir {
        /// The process.
        pid: i32,
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading a `/proc` file of a task failed (`stat`).
    #[error("reading /proc for the leak check")]
    Proc(#[from] ProcError),
    /// Reading a `/proc/PID/...` file (`maps`) failed.
    #[error("reading {path} of pid {pid}")]
    Read {
        /// The process.
        pid: i32,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `statx` through a magic link (`fd/N`), `readlink` of a namespace
    /// link (`ns/KIND`) or opening their directory failed.
    #[error("stat or readlink of {path} (pid {pid})")]
    Stat {
        /// The process.
        pid: i32,
        /// The link.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A `kcmp` call failed.
    #[error(
        "kcmp({kind}) of tid {tid1} (pid {pid1}) idx {idx1} and tid {tid2} (pid {pid2}) idx {idx2}"
    )]
    Kcmp {
        /// `KCMP_VM`, `KCMP_FILE`, ...
        kind: &'static str,
        /// Process of the first task.
        pid1: i32,
        /// First task.
        tid1: i32,
        /// Its fd (`KCMP_FILE`), else 0.
        idx1: u64,
        /// Process of the second task.
        pid2: i32,
        /// Second task.
        tid2: i32,
        /// Its fd (`KCMP_FILE`), else 0.
        idx2: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Starting the probe thread (pdump's reference task without a SysV
    /// semaphore undo list) failed.
    #[error("starting the leak-check probe thread")]
    ProbeThread {
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `unshare(CLONE_SYSVSEM)` in the probe thread failed.
    #[error("unshare(CLONE_SYSVSEM) in the leak-check probe thread")]
    Unshare {
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Opening a tree task's ipc namespace to read its shm table failed.
    #[error("opening {path} (ipc namespace of pid {pid})")]
    OpenNs {
        /// The tree process.
        pid: i32,
        /// The `ns/ipc` link.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Entering a tree task's ipc namespace (in a helper thread) failed.
    #[error("setns into {path} (ipc namespace of pid {pid})")]
    Setns {
        /// The tree process.
        pid: i32,
        /// The `ns/ipc` link.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading `/proc/sysvipc/shm` in a tree task's ipc namespace failed.
    #[error("reading /proc/sysvipc/shm in the ipc namespace of pid {pid}")]
    ShmTable {
        /// The tree process.
        pid: i32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Container mode: the tree shares resources with outside tasks.
    #[error("{}", leaks_message(.leaks))]
    Leaks {
        /// Every leak found.
        leaks: Vec<Leak>,
    },
}

/// What one run of [`find_leaks_with_stats`] did: the cost of the check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeakStats {
    /// Live threads of the tree examined.
    pub tree_tasks: usize,
    /// Outside user-space processes examined.
    pub outside_processes: usize,
    /// Their threads.
    pub outside_tasks: usize,
    /// Outside fds looked at (stat of `/proc/PID/task/TID/fd/N`).
    pub outside_fds: usize,
    /// `kcmp` calls made.
    pub kcmp_calls: u64,
    /// `statx` calls on fd links and `readlink` calls on namespace links.
    pub stat_calls: u64,
    /// `/proc/PID/maps` files read (tree and outside, for SysV shm).
    pub maps_read: usize,
    /// Outside processes pdump was not allowed to inspect (`EACCES`/`EPERM`),
    /// sorted: resources they share with the tree cannot be seen.
    pub uninspected: Vec<i32>,
    /// Wall-clock time of the check.
    pub elapsed: Duration,
}

/// Finds every resource the tree shares with a task outside it.
///
/// `tree` holds the pids (as this `/proc` shows them) of every live process
/// of the dumped tree (thread-group leaders, zombies excluded); the tree
/// should be frozen. Returns one [`Leak`] per shared resource, with sorted
/// `inside` and `outside` pid lists, namespaces first, then address space,
/// fs, files table, semaphore undo list, open files and shm segments.
pub fn find_leaks(tree: &[i32]) -> Result<Vec<Leak>, LeakError> {
    find_leaks_with_stats(tree).map(|(leaks, _)| leaks)
}

/// [`find_leaks`], also returning what the check cost.
pub fn find_leaks_with_stats(tree: &[i32]) -> Result<(Vec<Leak>, LeakStats), LeakError> {
    let start = Instant::now();
    std::thread::scope(|scope| {
        // The probe thread is a task with no SysV semaphore undo list
        // (unshare(CLONE_SYSVSEM) drops it): kcmp(KCMP_SYSVSEM) compares
        // the raw pointers, so two tasks without a list compare equal, and
        // only a comparison with a known-empty task tells them apart.
        let (tid_tx, tid_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("pdump-leak-probe".into())
            .spawn_scoped(scope, move || {
                // SAFETY: unshare(CLONE_SYSVSEM) only detaches this thread
                // from its semaphore undo list; it touches no memory of ours.
                let r = unsafe { libc::unshare(libc::CLONE_SYSVSEM) };
                let res = if r == 0 {
                    Ok(gettid())
                } else {
                    Err(io::Error::last_os_error())
                };
                let _ = tid_tx.send(res);
                // Stay alive until the check is over (the sender is dropped).
                let _ = stop_rx.recv();
            })
            .map_err(|source| LeakError::ProbeThread { source })?;
        let probe_tid = tid_rx
            .recv()
            .map_err(|_| LeakError::ProbeThread {
                source: io::Error::other("the probe thread exited early"),
            })?
            .map_err(|source| LeakError::Unshare { source })?;
        let mut scan = Scanner::new(tree, probe_tid);
        let result = scan.run();
        drop(stop_tx);
        let mut stats = scan.stats;
        stats.kcmp_calls = scan.kcmp.calls;
        stats.uninspected = scan.uninspected.into_iter().collect();
        stats.elapsed = start.elapsed();
        if !stats.uninspected.is_empty() {
            log::warn!(
                "leak check: not allowed to inspect outside pids {}",
                fmt_pids(&stats.uninspected, Some(ERROR_PIDS))
            );
        }
        result.map(|leaks| (leaks, stats))
    })
}

/// Container mode: `Ok` when there is no leak, else [`LeakError::Leaks`]
/// listing every one.
pub fn refuse_if_leaks(leaks: &[Leak]) -> Result<(), LeakError> {
    if leaks.is_empty() {
        Ok(())
    } else {
        Err(LeakError::Leaks {
            leaks: leaks.to_vec(),
        })
    }
}

/// The CLI summary of the leaks of a dump: one line per leak, long pid
/// lists shortened.
pub fn render(leaks: &[Leak]) -> String {
    if leaks.is_empty() {
        return "no resources shared with tasks outside the tree\n".to_owned();
    }
    let mut out = format!(
        "{} resource{} shared with tasks outside the tree:\n",
        leaks.len(),
        if leaks.len() == 1 { "" } else { "s" }
    );
    for leak in leaks {
        let _ = writeln!(out, "  {}", leak_line(leak, Some(RENDER_PIDS)));
    }
    out
}

/// The message of [`LeakError::Leaks`].
fn leaks_message(leaks: &[Leak]) -> String {
    let mut out = format!(
        "container mode: the tree shares {} resource{} with tasks outside it:",
        leaks.len(),
        if leaks.len() == 1 { "" } else { "s" }
    );
    for leak in leaks {
        let _ = write!(out, "\n{}", leak_line(leak, Some(ERROR_PIDS)));
    }
    out
}

/// "resource: inside [..], outside [..]".
fn leak_line(leak: &Leak, limit: Option<usize>) -> String {
    format!(
        "{}: inside {}, outside {}",
        leak.resource,
        fmt_pids(&leak.inside, limit),
        fmt_pids(&leak.outside, limit)
    )
}

/// `[1, 2, 3]`, or `[1, 2, +5 more]` past `limit` pids.
fn fmt_pids(pids: &[i32], limit: Option<usize>) -> String {
    let shown = limit.map_or(pids.len(), |l| l.min(pids.len()));
    let mut out = String::from("[");
    for (i, pid) in pids[..shown].iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{pid}");
    }
    if shown < pids.len() {
        let _ = write!(
            out,
            "{}+{} more",
            if shown > 0 { ", " } else { "" },
            pids.len() - shown
        );
    }
    out.push(']');
    out
}

/// The calling thread's tid.
fn gettid() -> i32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    i32::try_from(tid).unwrap_or(-1)
}

/// `ENOENT`/`ESRCH`/`EBADF`: the task or the fd went away.
fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ESRCH | libc::EBADF)
    )
}

/// `EACCES`/`EPERM`: pdump may not look at the task.
fn is_denied(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM))
}

/// The same for a [`ProcError`].
fn proc_gone(e: &ProcError) -> bool {
    e.io_error().is_some_and(is_gone)
}

/// The same for a [`ProcError`].
fn proc_denied(e: &ProcError) -> bool {
    e.io_error().is_some_and(is_denied)
}

/// The numeric entries of a directory, sorted.
fn list_numeric(path: &str) -> io::Result<Vec<i32>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let name = entry?.file_name();
        if let Some(n) = std::str::from_utf8(name.as_bytes())
            .ok()
            .and_then(|s| s.parse().ok())
        {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// `(dev, ino)` of what `path` (a magic link) points to, by
/// `statx(AT_STATX_DONT_SYNC)`: a network or FUSE file system is not asked
/// (its server may be a frozen task of the tree).
fn statx_id(path: &str) -> io::Result<(u64, u64)> {
    let c = CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    statx_at(libc::AT_FDCWD, &c)
}

/// [`statx_id`] of `name` in the directory `dir` (or the cwd for
/// `AT_FDCWD`): with a directory fd, `/proc/PID/task/TID/...` is walked
/// once per directory rather than once per link.
fn statx_at(dir: RawFd, name: &CStr) -> io::Result<(u64, u64)> {
    let mut st = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `name` is NUL-terminated, `dir` is AT_FDCWD or an fd the
    // caller keeps open, and `st` is a writable statx buffer that outlives
    // the call.
    let r = unsafe {
        libc::statx(
            dir,
            name.as_ptr(),
            libc::AT_STATX_DONT_SYNC,
            libc::STATX_INO,
            st.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statx succeeded and filled the buffer (it started zeroed anyway).
    let st = unsafe { st.assume_init() };
    let dev = (u64::from(st.stx_dev_major) << 32) | u64::from(st.stx_dev_minor);
    Ok((dev, st.stx_ino))
}

/// The inode number of the namespace `name` links to in the `ns/`
/// directory `dir`, from the link's text (`net:[4026531840]`). Every
/// namespace is an inode of the one nsfs super block, so the number alone
/// identifies it; `readlink` is much cheaper than `stat` here (it does not
/// materialise the nsfs dentry).
fn ns_ino_at(dir: RawFd, name: &CStr) -> io::Result<u64> {
    let mut buf = [0u8; 64];
    // SAFETY: `name` is NUL-terminated, `dir` an fd the caller keeps open,
    // and `buf` is writable for its whole length.
    let n = unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let text = &buf[..n as usize];
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.split_once(":["))
        .and_then(|(_, rest)| rest.strip_suffix(']'))
        .and_then(|ino| ino.parse().ok())
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

/// An `O_PATH` fd of a directory, for [`statx_at`] and [`ns_ino_at`].
fn open_dir(path: &str) -> io::Result<OwnedFd> {
    let c = CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is NUL-terminated; open returns a new fd or -1.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned `fd` as a new fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The kinds of kernel objects `kcmp` compares here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `KCMP_FILE`: a `struct file` (idx = fd).
    File,
    /// `KCMP_VM`: the address space.
    Vm,
    /// `KCMP_FILES`: the fd table.
    Files,
    /// `KCMP_FS`: cwd, root, umask.
    Fs,
    /// `KCMP_SYSVSEM`: the SysV semaphore undo list.
    Sysvsem,
}

impl Kind {
    /// The `kcmp` type number.
    fn code(self) -> libc::c_int {
        match self {
            Kind::File => 0,
            Kind::Vm => 1,
            Kind::Files => 2,
            Kind::Fs => 3,
            Kind::Sysvsem => 6,
        }
    }

    /// The constant's name, for errors.
    fn name(self) -> &'static str {
        match self {
            Kind::File => "KCMP_FILE",
            Kind::Vm => "KCMP_VM",
            Kind::Files => "KCMP_FILES",
            Kind::Fs => "KCMP_FS",
            Kind::Sysvsem => "KCMP_SYSVSEM",
        }
    }

    /// How a leak of this per-task object is named.
    fn label(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Vm => "mm (address space)",
            Kind::Files => "files table",
            Kind::Fs => "fs (cwd, root, umask)",
            Kind::Sysvsem => "SysV semaphore undo list",
        }
    }
}

/// The per-task objects compared, in report order.
const TASK_KINDS: [Kind; 4] = [Kind::Vm, Kind::Fs, Kind::Files, Kind::Sysvsem];

/// One side of a `kcmp` call: a task and, for `KCMP_FILE`, its fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Obj {
    /// The process (for paths and errors).
    pid: i32,
    /// The task compared.
    tid: i32,
    /// The fd (`KCMP_FILE`), else 0.
    idx: u64,
}

/// The `kcmp` syscall, counted.
#[derive(Default)]
struct Kcmp {
    /// Calls made.
    calls: u64,
}

impl Kcmp {
    /// `kcmp(a.tid, b.tid, kind, a.idx, b.idx)`: 0 equal, 1 when a's object
    /// orders before b's, 2 after, 3 different but unordered.
    fn call(&mut self, kind: Kind, a: Obj, b: Obj) -> io::Result<i64> {
        self.calls += 1;
        // SAFETY: kcmp takes five integers and reads or writes no memory of
        // this process.
        let r = unsafe {
            libc::syscall(
                libc::SYS_kcmp,
                a.tid as libc::c_long,
                b.tid as libc::c_long,
                kind.code() as libc::c_long,
                a.idx as libc::c_ulong,
                b.idx as libc::c_ulong,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }
}

/// The [`LeakError::Kcmp`] for a failed call.
fn kcmp_error(kind: Kind, a: Obj, b: Obj, source: io::Error) -> LeakError {
    LeakError::Kcmp {
        kind: kind.name(),
        pid1: a.pid,
        tid1: a.tid,
        idx1: a.idx,
        pid2: b.pid,
        tid2: b.tid,
        idx2: b.idx,
        source,
    }
}

/// One distinct kernel object held by the tree.
struct Class {
    /// A tree task (and fd) holding it: the one compared with.
    rep: Obj,
    /// Tree processes holding it.
    inside: BTreeSet<i32>,
    /// Outside processes holding it.
    outside: BTreeSet<i32>,
}

/// Where an object is in a [`Classes`] list.
enum Slot {
    /// It is the object of this class.
    Found(usize),
    /// It is a new object, which belongs at this position.
    Missing(usize),
}

/// The distinct objects of one kind the tree holds, sorted by `kcmp` order.
struct Classes {
    /// What they are.
    kind: Kind,
    /// The classes, in `kcmp` order while `ordered`.
    list: Vec<Class>,
    /// False once `kcmp` answered "different, unordered" (3): from then on
    /// the list is searched linearly.
    ordered: bool,
}

impl Classes {
    fn new(kind: Kind) -> Self {
        Classes {
            kind,
            list: Vec::new(),
            ordered: true,
        }
    }

    /// Finds the class of `probe`'s object: binary search by `kcmp` order
    /// (`ceil(log2(len + 1))` calls at most), linear if the kernel ever
    /// refuses an order.
    fn locate(&mut self, kcmp: &mut Kcmp, probe: Obj) -> io::Result<Slot> {
        if self.ordered {
            let (mut lo, mut hi) = (0, self.list.len());
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                match kcmp.call(self.kind, self.list[mid].rep, probe)? {
                    0 => return Ok(Slot::Found(mid)),
                    1 => lo = mid + 1,
                    2 => hi = mid,
                    _ => {
                        self.ordered = false;
                        break;
                    }
                }
            }
            if self.ordered {
                return Ok(Slot::Missing(lo));
            }
        }
        for (i, class) in self.list.iter().enumerate() {
            if kcmp.call(self.kind, class.rep, probe)? == 0 {
                return Ok(Slot::Found(i));
            }
        }
        Ok(Slot::Missing(self.list.len()))
    }

    /// Adds a tree object held by the processes `inside`.
    fn insert(&mut self, kcmp: &mut Kcmp, obj: Obj, inside: &BTreeSet<i32>) -> io::Result<usize> {
        match self.locate(kcmp, obj)? {
            Slot::Found(i) => {
                self.list[i].inside.extend(inside);
                Ok(i)
            }
            Slot::Missing(pos) => {
                self.list.insert(
                    pos,
                    Class {
                        rep: obj,
                        inside: inside.clone(),
                        outside: BTreeSet::new(),
                    },
                );
                Ok(pos)
            }
        }
    }
}

/// A namespace the tree is in.
struct NsShare {
    /// `net`, `pid`, ...
    kind: &'static str,
    /// Its inode (the number in `net:[...]`).
    ino: u64,
    /// Tree processes in it.
    inside: BTreeSet<i32>,
    /// Outside processes in it.
    outside: BTreeSet<i32>,
}

/// A SysV shm segment the tree has attached, identified by its ipc
/// namespace, the shm file system's device and its id.
struct Segment {
    /// Its key (`/SYSV%08x`).
    key: u32,
    /// Tree processes mapping it.
    inside: BTreeSet<i32>,
    /// Tree VMAs mapping it (what `nattch` counts).
    tree_vmas: u64,
    /// A tree task in the segment's ipc namespace (for `setns`).
    owner: (i32, i32),
    /// The namespace's inode, for the report.
    ns_ino: u64,
    /// Outside processes mapping it.
    outside: BTreeSet<i32>,
    /// Attachments counted by `nattch` that no task found explains.
    unattributed: u64,
}

/// A `/SYSV` mapping of a `maps` file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SysvMap {
    /// The segment's key.
    key: u32,
    /// Device of the mapping (major << 32 | minor).
    dev: u64,
    /// The segment id (the inode number of the mapping).
    shmid: i64,
}

/// The `/SYSV%08x` mappings of a `maps` text.
fn parse_sysv_maps(text: &str) -> Vec<SysvMap> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut fields = line.splitn(6, ' ');
        let (Some(_range), Some(_perms), Some(_off), Some(dev), Some(ino), Some(path)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            continue;
        };
        let Some(hex) = path.trim_start().strip_prefix("/SYSV") else {
            continue;
        };
        let Some(key) = hex.get(..8).and_then(|h| u32::from_str_radix(h, 16).ok()) else {
            continue;
        };
        let Some((major, minor)) = dev.split_once(':') else {
            continue;
        };
        let (Ok(major), Ok(minor), Ok(shmid)) = (
            u64::from_str_radix(major, 16),
            u64::from_str_radix(minor, 16),
            ino.parse::<i64>(),
        ) else {
            continue;
        };
        out.push(SysvMap {
            key,
            dev: (major << 32) | minor,
            shmid,
        });
    }
    out
}

/// `shmid -> nattch` from the text of `/proc/sysvipc/shm`
/// (`key shmid perms size cpid lpid nattch ...`).
fn parse_shm_table(text: &str) -> HashMap<i64, u64> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_ascii_whitespace().collect();
            Some((f.get(1)?.parse().ok()?, f.get(6)?.parse().ok()?))
        })
        .collect()
}

/// Reads `/proc/sysvipc/shm` as seen from the ipc namespace of tree task
/// `(pid, tid)`: directly when pdump is in it, else from a short-lived
/// thread that enters it (namespaces are per thread).
fn read_shm_table(pid: i32, tid: i32, own: bool) -> Result<HashMap<i64, u64>, LeakError> {
    const TABLE: &str = "/proc/sysvipc/shm";
    if own {
        let text =
            std::fs::read_to_string(TABLE).map_err(|source| LeakError::ShmTable { pid, source })?;
        return Ok(parse_shm_table(&text));
    }
    let path = PathBuf::from(format!("/proc/{pid}/task/{tid}/ns/ipc"));
    let ns = std::fs::File::open(&path).map_err(|source| LeakError::OpenNs {
        pid,
        path: path.clone(),
        source,
    })?;
    let joined = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("pdump-leak-ipcns".into())
            .spawn_scoped(scope, || {
                // SAFETY: setns on an fd we own; it only changes this
                // helper thread's ipc namespace (and drops its semaphore
                // undo list), which ends with the thread.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWIPC) } != 0 {
                    return Err(LeakError::Setns {
                        pid,
                        path: path.clone(),
                        source: io::Error::last_os_error(),
                    });
                }
                std::fs::read_to_string(TABLE).map_err(|source| LeakError::ShmTable { pid, source })
            })
            .map_err(|source| LeakError::ProbeThread { source })
            .map(|h| h.join())
    })?;
    let text = joined.unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
    Ok(parse_shm_table(&text))
}

/// Why an outside task could not be examined further.
enum Stop {
    /// It exited: skip it.
    Gone,
    /// pdump may not inspect it: note it and skip it.
    Denied,
    /// A real failure.
    Fatal(LeakError),
}

impl From<LeakError> for Stop {
    fn from(e: LeakError) -> Self {
        Stop::Fatal(e)
    }
}

/// Sorts an outside-task I/O error.
fn outside_err(e: io::Error, fatal: impl FnOnce(io::Error) -> LeakError) -> Stop {
    if is_gone(&e) {
        Stop::Gone
    } else if is_denied(&e) {
        Stop::Denied
    } else {
        Stop::Fatal(fatal(e))
    }
}

/// The state of one leak check.
struct Scanner {
    /// pdump's own pid: never an outside task.
    me: i32,
    /// The tree's processes.
    tree: BTreeSet<i32>,
    /// A thread of pdump without a semaphore undo list.
    probe_tid: i32,
    kcmp: Kcmp,
    stats: LeakStats,
    uninspected: BTreeSet<i32>,
    /// The tree's namespaces by inode number.
    ns: HashMap<u64, NsShare>,
    /// Ipc namespace inode of each live tree task, by tid.
    tree_ipc: HashMap<i32, u64>,
    /// One sorted list per [`TASK_KINDS`] entry.
    classes: Vec<Classes>,
    /// The tree's open files by `(dev, ino)`, each split into distinct
    /// `struct file`s.
    files: HashMap<(u64, u64), Classes>,
    /// The tree's SysV shm segments by (ipc namespace, dev, shmid).
    segments: BTreeMap<(u64, u64, i64), Segment>,
}

impl Scanner {
    fn new(tree: &[i32], probe_tid: i32) -> Self {
        Scanner {
            me: i32::try_from(std::process::id()).unwrap_or(-1),
            tree: tree.iter().copied().collect(),
            probe_tid,
            kcmp: Kcmp::default(),
            stats: LeakStats::default(),
            uninspected: BTreeSet::new(),
            ns: HashMap::new(),
            tree_ipc: HashMap::new(),
            classes: TASK_KINDS.iter().map(|&k| Classes::new(k)).collect(),
            files: HashMap::new(),
            segments: BTreeMap::new(),
        }
    }

    fn run(&mut self) -> Result<Vec<Leak>, LeakError> {
        let tasks = self.tree_tasks()?;
        self.stats.tree_tasks = tasks.len();
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        for &(pid, tid) in &tasks {
            self.tree_task(pid, tid)?;
        }
        self.tree_files()?;
        self.tree_segments(&tasks)?;
        let procs = list_numeric("/proc").map_err(|source| LeakError::ListProc { source })?;
        for pid in procs {
            if pid == self.me || self.tree.contains(&pid) {
                continue;
            }
            match self.outside_process(pid) {
                Ok(()) | Err(Stop::Gone) => {}
                Err(Stop::Denied) => {
                    self.uninspected.insert(pid);
                }
                Err(Stop::Fatal(e)) => return Err(e),
            }
        }
        self.outside_segments()?;
        Ok(self.leaks())
    }

    /// The live threads of the tree, as (pid, tid).
    fn tree_tasks(&mut self) -> Result<Vec<(i32, i32)>, LeakError> {
        let mut tasks = Vec::new();
        for &pid in &self.tree {
            let path = format!("/proc/{pid}/task");
            let tids = match list_numeric(&path) {
                Ok(t) => t,
                Err(e) if is_gone(&e) => continue,
                Err(source) => {
                    return Err(LeakError::ReadDir {
                        pid,
                        path: path.into(),
                        source,
                    })
                }
            };
            for tid in tids {
                match procfs::task_stat(pid, tid) {
                    // An exited thread has no mm, files or fs any more:
                    // kcmp would see NULL, equal to any other dead task's.
                    Ok(st) if matches!(st.state, 'Z' | 'X' | 'x') => {}
                    Ok(_) => tasks.push((pid, tid)),
                    Err(e) if proc_gone(&e) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(tasks)
    }

    /// Records a live tree thread's namespaces and per-task objects.
    fn tree_task(&mut self, pid: i32, tid: i32) -> Result<(), LeakError> {
        let dir = format!("/proc/{pid}/task/{tid}/ns");
        let dfd = match open_dir(&dir) {
            Ok(fd) => fd,
            Err(e) if is_gone(&e) => return Ok(()),
            Err(source) => {
                return Err(LeakError::Stat {
                    pid,
                    path: dir.into(),
                    source,
                })
            }
        };
        for (link, kind) in NS_LINKS {
            self.stats.stat_calls += 1;
            let id = match ns_ino_at(dfd.as_raw_fd(), link) {
                Ok(id) => id,
                Err(e) if is_gone(&e) => continue,
                Err(source) => {
                    return Err(LeakError::Stat {
                        pid,
                        path: format!("{dir}/{}", link.to_string_lossy()).into(),
                        source,
                    })
                }
            };
            self.ns
                .entry(id)
                .or_insert_with(|| NsShare {
                    kind,
                    ino: id,
                    inside: BTreeSet::new(),
                    outside: BTreeSet::new(),
                })
                .inside
                .insert(pid);
            if link == c"ipc" {
                self.tree_ipc.insert(tid, id);
            }
        }
        let obj = Obj { pid, tid, idx: 0 };
        let inside = BTreeSet::from([pid]);
        for ci in 0..self.classes.len() {
            let kind = self.classes[ci].kind;
            if kind == Kind::Sysvsem {
                let probe = Obj {
                    pid: self.me,
                    tid: self.probe_tid,
                    idx: 0,
                };
                match self.kcmp.call(kind, probe, obj) {
                    Ok(0) => continue, // no undo list: nothing to share
                    Ok(_) => {}
                    Err(e) if is_gone(&e) => return Ok(()),
                    Err(e) => return Err(kcmp_error(kind, probe, obj, e)),
                }
            }
            match self.classes[ci].insert(&mut self.kcmp, obj, &inside) {
                Ok(_) => {}
                Err(e) if is_gone(&e) => return Ok(()),
                Err(e) => {
                    let rep = self.classes[ci].list.first().map_or(obj, |c| c.rep);
                    return Err(kcmp_error(kind, rep, obj, e));
                }
            }
        }
        Ok(())
    }

    /// Splits the open files of every distinct files table of the tree into
    /// distinct `struct file`s, grouped by `(dev, ino)`.
    fn tree_files(&mut self) -> Result<(), LeakError> {
        let tables: Vec<(Obj, BTreeSet<i32>)> = self.classes[TASK_KINDS
            .iter()
            .position(|&k| k == Kind::Files)
            .unwrap_or_default()]
        .list
        .iter()
        .map(|c| (c.rep, c.inside.clone()))
        .collect();
        for (table, inside) in tables {
            let (pid, tid) = (table.pid, table.tid);
            let path = format!("/proc/{pid}/task/{tid}/fd");
            let fds = match list_numeric(&path) {
                Ok(fds) => fds,
                Err(e) if is_gone(&e) => continue,
                Err(source) => {
                    return Err(LeakError::ReadDir {
                        pid,
                        path: path.into(),
                        source,
                    })
                }
            };
            for fd in fds {
                let link = format!("{path}/{fd}");
                self.stats.stat_calls += 1;
                let id = match statx_id(&link) {
                    Ok(id) => id,
                    Err(e) if is_gone(&e) => continue,
                    Err(source) => {
                        return Err(LeakError::Stat {
                            pid,
                            path: link.into(),
                            source,
                        })
                    }
                };
                let obj = Obj {
                    pid,
                    tid,
                    idx: fd as u64,
                };
                let bucket = self
                    .files
                    .entry(id)
                    .or_insert_with(|| Classes::new(Kind::File));
                match bucket.insert(&mut self.kcmp, obj, &inside) {
                    Ok(_) => {}
                    Err(e) if is_gone(&e) => {}
                    Err(e) => {
                        let rep = bucket.list.first().map_or(obj, |c| c.rep);
                        return Err(kcmp_error(Kind::File, rep, obj, e));
                    }
                }
            }
        }
        Ok(())
    }

    /// Finds the SysV shm segments the tree's processes have attached.
    fn tree_segments(&mut self, tasks: &[(i32, i32)]) -> Result<(), LeakError> {
        let mut seen = BTreeSet::new();
        for &(pid, tid) in tasks {
            // maps is per address space: one live thread per process.
            if !seen.insert(pid) {
                continue;
            }
            let Some(&ns) = self.tree_ipc.get(&tid) else {
                continue;
            };
            let path = format!("/proc/{pid}/task/{tid}/maps");
            self.stats.maps_read += 1;
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if is_gone(&e) => continue,
                Err(source) => {
                    return Err(LeakError::Read {
                        pid,
                        path: path.into(),
                        source,
                    })
                }
            };
            for m in parse_sysv_maps(&text) {
                let seg = self
                    .segments
                    .entry((ns, m.dev, m.shmid))
                    .or_insert_with(|| Segment {
                        key: m.key,
                        inside: BTreeSet::new(),
                        tree_vmas: 0,
                        owner: (pid, tid),
                        ns_ino: ns,
                        outside: BTreeSet::new(),
                        unattributed: 0,
                    });
                seg.inside.insert(pid);
                seg.tree_vmas += 1;
            }
        }
        Ok(())
    }

    /// Examines every thread of one outside process.
    fn outside_process(&mut self, pid: i32) -> Result<(), Stop> {
        let st = match procfs::stat(pid) {
            Ok(st) => st,
            Err(e) if proc_gone(&e) => return Err(Stop::Gone),
            Err(e) if proc_denied(&e) => return Err(Stop::Denied),
            Err(e) => return Err(Stop::Fatal(e.into())),
        };
        if st.is_kernel_thread() {
            return Ok(());
        }
        self.stats.outside_processes += 1;
        let path = format!("/proc/{pid}/task");
        let tids = list_numeric(&path).map_err(|e| {
            outside_err(e, |source| LeakError::ReadDir {
                pid,
                path: path.clone().into(),
                source,
            })
        })?;
        // Files tables of this process already scanned fd by fd.
        let mut scanned: Vec<Obj> = Vec::new();
        for tid in tids {
            match self.outside_task(pid, tid, &mut scanned) {
                Ok(()) | Err(Stop::Gone) => {}
                Err(stop) => return Err(stop),
            }
        }
        Ok(())
    }

    /// Compares one outside thread with the tree.
    fn outside_task(&mut self, pid: i32, tid: i32, scanned: &mut Vec<Obj>) -> Result<(), Stop> {
        self.stats.outside_tasks += 1;
        let dir = format!("/proc/{pid}/task/{tid}/ns");
        let dfd = open_dir(&dir).map_err(|e| {
            outside_err(e, |source| LeakError::Stat {
                pid,
                path: dir.clone().into(),
                source,
            })
        })?;
        for (link, _) in NS_LINKS {
            self.stats.stat_calls += 1;
            match ns_ino_at(dfd.as_raw_fd(), link) {
                Ok(id) => {
                    if let Some(share) = self.ns.get_mut(&id) {
                        share.outside.insert(pid);
                    }
                }
                // A zombie thread has no namespaces; a kernel without time
                // namespaces has no such link.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => {
                    return Err(outside_err(e, |source| LeakError::Stat {
                        pid,
                        path: format!("{dir}/{}", link.to_string_lossy()).into(),
                        source,
                    }))
                }
            }
        }
        let obj = Obj { pid, tid, idx: 0 };
        let mut shares_table = false;
        for ci in 0..self.classes.len() {
            let classes = &mut self.classes[ci];
            if classes.list.is_empty() {
                continue;
            }
            match classes.locate(&mut self.kcmp, obj) {
                Ok(Slot::Found(i)) => {
                    classes.list[i].outside.insert(pid);
                    shares_table |= classes.kind == Kind::Files;
                }
                Ok(Slot::Missing(_)) => {}
                Err(e) => {
                    let (kind, rep) = (classes.kind, classes.list[0].rep);
                    return Err(outside_err(e, |source| kcmp_error(kind, rep, obj, source)));
                }
            }
        }
        if self.files.is_empty() || shares_table {
            return Ok(());
        }
        for &other in scanned.iter() {
            match self.kcmp.call(Kind::Files, other, obj) {
                Ok(0) => return Ok(()), // this table was scanned already
                Ok(_) => {}
                Err(e) => {
                    return Err(outside_err(e, |source| {
                        kcmp_error(Kind::Files, other, obj, source)
                    }))
                }
            }
        }
        scanned.push(obj);
        self.outside_fds(pid, tid)
    }

    /// Compares the open files of one outside files table with the tree's.
    fn outside_fds(&mut self, pid: i32, tid: i32) -> Result<(), Stop> {
        let path = format!("/proc/{pid}/task/{tid}/fd");
        let fds = list_numeric(&path).map_err(|e| {
            outside_err(e, |source| LeakError::ReadDir {
                pid,
                path: path.clone().into(),
                source,
            })
        })?;
        let dfd = open_dir(&path).map_err(|e| {
            outside_err(e, |source| LeakError::ReadDir {
                pid,
                path: path.clone().into(),
                source,
            })
        })?;
        for fd in fds {
            self.stats.outside_fds += 1;
            self.stats.stat_calls += 1;
            let name = CString::new(fd.to_string()).expect("digits");
            let probe = Obj {
                pid,
                tid,
                idx: fd as u64,
            };
            let keys: Vec<(u64, u64)> = match statx_at(dfd.as_raw_fd(), &name) {
                Ok(id) if self.files.contains_key(&id) => vec![id],
                Ok(_) => continue,
                Err(e) if is_gone(&e) => continue,
                Err(e) if is_denied(&e) => return Err(Stop::Denied),
                // No identity to filter by: compare with every tree file.
                Err(_) => self.files.keys().copied().collect(),
            };
            for key in keys {
                let Some(bucket) = self.files.get_mut(&key) else {
                    continue;
                };
                match bucket.locate(&mut self.kcmp, probe) {
                    Ok(Slot::Found(i)) => {
                        bucket.list[i].outside.insert(pid);
                        break;
                    }
                    Ok(Slot::Missing(_)) => {}
                    // The fd was closed meanwhile.
                    Err(e) if e.raw_os_error() == Some(libc::EBADF) => break,
                    Err(e) => {
                        let rep = bucket.list[0].rep;
                        return Err(outside_err(e, |source| {
                            kcmp_error(Kind::File, rep, probe, source)
                        }));
                    }
                }
            }
        }
        Ok(())
    }

    /// Finds the outside holders of the tree's shm segments: only when the
    /// segment's `nattch` counts more attachments than the tree's VMAs, and
    /// among the outside processes of the segment's ipc namespace.
    fn outside_segments(&mut self) -> Result<(), LeakError> {
        if self.segments.is_empty() {
            return Ok(());
        }
        self.stats.stat_calls += 1;
        let own_ipc = open_dir("/proc/thread-self/ns")
            .and_then(|d| ns_ino_at(d.as_raw_fd(), c"ipc"))
            .ok();
        let mut tables: HashMap<u64, HashMap<i64, u64>> = HashMap::new();
        let keys: Vec<_> = self.segments.keys().copied().collect();
        for key in keys {
            let (ns, dev, shmid) = key;
            let (pid, tid) = self.segments[&key].owner;
            let table = match tables.entry(ns) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(read_shm_table(pid, tid, own_ipc == Some(ns))?)
                }
            };
            let nattch = table.get(&shmid).copied();
            let tree_vmas = self.segments[&key].tree_vmas;
            if nattch.is_some_and(|n| n <= tree_vmas) {
                continue;
            }
            let candidates: Vec<i32> = self
                .ns
                .get(&ns)
                .map(|s| s.outside.iter().copied().collect())
                .unwrap_or_default();
            let mut found = 0u64;
            let mut holders = BTreeSet::new();
            for cand in candidates {
                let path = format!("/proc/{cand}/maps");
                self.stats.maps_read += 1;
                let text = match std::fs::read_to_string(&path) {
                    Ok(t) => t,
                    Err(e) if is_gone(&e) => continue,
                    Err(e) if is_denied(&e) => {
                        self.uninspected.insert(cand);
                        continue;
                    }
                    Err(source) => {
                        return Err(LeakError::Read {
                            pid: cand,
                            path: path.into(),
                            source,
                        })
                    }
                };
                let n = parse_sysv_maps(&text)
                    .iter()
                    .filter(|m| m.dev == dev && m.shmid == shmid)
                    .count() as u64;
                if n > 0 {
                    holders.insert(cand);
                    found += n;
                }
            }
            let seg = self.segments.get_mut(&key).expect("key from the map");
            seg.outside = holders;
            seg.unattributed = nattch.map_or(0, |n| n.saturating_sub(tree_vmas + found));
        }
        Ok(())
    }

    /// The leaks found, in report order.
    fn leaks(&self) -> Vec<Leak> {
        let mut out = Vec::new();
        let mut ns: Vec<&NsShare> = self.ns.values().filter(|s| !s.outside.is_empty()).collect();
        ns.sort_by_key(|s| {
            (
                NS_ORDER
                    .iter()
                    .position(|&k| k == s.kind)
                    .unwrap_or(NS_ORDER.len()),
                s.ino,
            )
        });
        for s in ns {
            out.push(Leak {
                resource: format!("{} namespace {}:[{}]", s.kind, s.kind, s.ino),
                inside: s.inside.iter().copied().collect(),
                outside: s.outside.iter().copied().collect(),
            });
        }
        for classes in &self.classes {
            let mut shared: Vec<&Class> = classes
                .list
                .iter()
                .filter(|c| !c.outside.is_empty())
                .collect();
            shared.sort_by_key(|c| c.inside.first().copied());
            for c in shared {
                out.push(Leak {
                    resource: format!(
                        "{} of pid {}",
                        classes.kind.label(),
                        c.inside.first().copied().unwrap_or(c.rep.pid)
                    ),
                    inside: c.inside.iter().copied().collect(),
                    outside: c.outside.iter().copied().collect(),
                });
            }
        }
        let mut files: Vec<&Class> = self
            .files
            .values()
            .flat_map(|b| b.list.iter())
            .filter(|c| !c.outside.is_empty())
            .collect();
        files.sort_by_key(|c| (c.rep.pid, c.rep.idx));
        for c in files {
            let link = format!("/proc/{}/task/{}/fd/{}", c.rep.pid, c.rep.tid, c.rep.idx);
            let target = std::fs::read_link(&link)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "?".to_owned());
            out.push(Leak {
                resource: format!("file {target} (pid {} fd {})", c.rep.pid, c.rep.idx),
                inside: c.inside.iter().copied().collect(),
                outside: c.outside.iter().copied().collect(),
            });
        }
        for ((_, _, shmid), seg) in &self.segments {
            if seg.outside.is_empty() && seg.unattributed == 0 {
                continue;
            }
            let mut resource = format!(
                "SysV shm segment shmid {shmid} key {:#010x} in ipc:[{}]",
                seg.key, seg.ns_ino
            );
            if seg.unattributed > 0 {
                let _ = write!(
                    resource,
                    " ({} attachment{} by tasks outside its ipc namespace)",
                    seg.unattributed,
                    if seg.unattributed == 1 { "" } else { "s" }
                );
            }
            out.push(Leak {
                resource,
                inside: seg.inside.iter().copied().collect(),
                outside: seg.outside.iter().copied().collect(),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    //! These tests fork real processes (as root) and check that
    //! [`find_leaks`] reports exactly the sharing they set up. Every child
    //! first closes all its fds, so that nothing it holds is shared with
    //! processes the test harness started concurrently; children talk to
    //! the test through a shared anonymous page and futexes (no fds, no
    //! sleeps). Grandchildren are created with `CLONE_PARENT`, so the test
    //! process kills and reaps all of them.

    use super::*;

    use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU32, Ordering::SeqCst};

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// What children report, in a `MAP_SHARED` anonymous page.
    #[repr(C)]
    struct Board {
        /// Per slot: 0 pending, 1 ready, 2 failed.
        ready: [AtomicU32; 4],
        /// Grandchildren's pids, stored right after they are cloned.
        kids: [AtomicI32; 4],
        /// A value a child reports (a shm id).
        val: AtomicI64,
        /// Why a child failed: step * 1000 + errno.
        err: AtomicI64,
    }

    /// The errno of the last failed libc call (async-signal-safe).
    fn errno() -> i64 {
        // SAFETY: __errno_location returns this thread's errno slot.
        i64::from(unsafe { *libc::__errno_location() })
    }

    /// `Err(step * 1000 + errno)` when a libc call returned a negative value.
    fn check(r: i64, step: i64) -> Result<i64, i64> {
        if r < 0 {
            Err(step * 1000 + errno())
        } else {
            Ok(r)
        }
    }

    fn futex_wake(a: &AtomicU32) {
        // SAFETY: FUTEX_WAKE on a valid, aligned u32 of a shared mapping.
        unsafe { libc::syscall(libc::SYS_futex, a.as_ptr(), libc::FUTEX_WAKE, i32::MAX) };
    }

    fn futex_wait(a: &AtomicU32, val: u32, timeout: Duration) {
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: timeout.as_nanos() as libc::c_long,
        };
        // SAFETY: FUTEX_WAIT on a valid, aligned u32 with a valid timespec;
        // it returns on a wake, a value mismatch or the timeout.
        unsafe { libc::syscall(libc::SYS_futex, a.as_ptr(), libc::FUTEX_WAIT, val, &ts) };
    }

    /// Child side: report `v` in `slot`.
    fn signal(b: &Board, slot: usize, v: u32) {
        b.ready[slot].store(v, SeqCst);
        futex_wake(&b.ready[slot]);
    }

    /// Child side: report a failure in `slot`.
    fn fail(b: &Board, slot: usize, code: i64) {
        b.err.store(code, SeqCst);
        signal(b, slot, 2);
    }

    /// Child side: wait to be killed.
    fn park() -> ! {
        loop {
            // SAFETY: pause has no preconditions.
            unsafe { libc::pause() };
        }
    }

    extern "C" fn park_cb(_: *mut libc::c_void) -> libc::c_int {
        park()
    }

    /// Child side: `clone(flags | CLONE_PARENT | SIGCHLD)` without
    /// `CLONE_VM`, on a copy of the caller's stack like fork: returns the
    /// new pid, 0 in the new task.
    fn clone_fork(flags: libc::c_int) -> i64 {
        let flags = (flags | libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong;
        // SAFETY: without CLONE_VM the new task gets its own copy of the
        // address space (and stack), like fork; it only runs
        // async-signal-safe code afterwards.
        unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) }
    }

    /// Child side: opens a path (no allocation).
    fn open(path: &CStr) -> i64 {
        // SAFETY: a NUL-terminated path.
        i64::from(unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) })
    }

    /// Child side: `open(path)` then `setns(CLONE_NEWIPC)`; returns the fd.
    fn enter_ipc(path: &CStr, step: i64) -> Result<i32, i64> {
        let fd = check(open(path), step)? as i32;
        // SAFETY: setns on the fd just opened.
        let r = unsafe { libc::setns(fd, libc::CLONE_NEWIPC) };
        check(i64::from(r), step + 1)?;
        Ok(fd)
    }

    /// The forked processes of one test, killed and reaped on drop.
    struct Lab {
        board: *mut Board,
        pids: Vec<i32>,
    }

    impl Lab {
        fn new() -> Lab {
            // SAFETY: a fresh shared anonymous page; nothing existing is touched.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            Lab {
                board: p.cast(),
                pids: Vec::new(),
            }
        }

        fn board(&self) -> &Board {
            // SAFETY: the page is mapped (zeroed: a valid Board of atomics)
            // until drop.
            unsafe { &*self.board }
        }

        /// Forks a child that closes all its fds, runs `setup`, reports in
        /// `slot` and waits to be killed; returns once it reported.
        fn spawn(&mut self, slot: usize, setup: impl FnOnce(&Board) -> Result<(), i64>) -> i32 {
            let board = self.board();
            // SAFETY: the child only runs `setup` (raw syscalls, no
            // allocation or locks: the test process is multithreaded) and
            // parks.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork failed");
            if pid == 0 {
                // SAFETY: closing every fd of this fresh child.
                unsafe { libc::close_range(0, u32::MAX, 0) };
                match setup(board) {
                    Ok(()) => signal(board, slot, 1),
                    Err(code) => fail(board, slot, code),
                }
                park()
            }
            self.pids.push(pid);
            self.wait(slot);
            pid
        }

        /// Waits until `slot` is reported ready (10 s at most).
        fn wait(&self, slot: usize) {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match self.board().ready[slot].load(SeqCst) {
                    1 => return,
                    2 => panic!(
                        "child setup failed at step {} errno {}",
                        self.board().err.load(SeqCst) / 1000,
                        self.board().err.load(SeqCst) % 1000
                    ),
                    _ => {}
                }
                assert!(Instant::now() < deadline, "slot {slot} never got ready");
                futex_wait(&self.board().ready[slot], 0, Duration::from_millis(100));
            }
        }

        /// Grandchild `i`'s pid.
        fn kid(&self, i: usize) -> i32 {
            self.board().kids[i].load(SeqCst)
        }
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            let kids: Vec<i32> = (0..4).map(|i| self.kid(i)).filter(|&p| p > 0).collect();
            for &pid in kids.iter().chain(&self.pids) {
                // SAFETY: kill and reap our own children (grandchildren
                // were created with CLONE_PARENT, so they are ours too).
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
            }
            // SAFETY: unmapping the page mapped in `new`; no reference
            // into it outlives `self`.
            unsafe { libc::munmap(self.board.cast(), 4096) };
        }
    }

    /// The leaks that are not namespaces.
    fn others(leaks: &[Leak]) -> Vec<&Leak> {
        leaks
            .iter()
            .filter(|l| !l.resource.contains(" namespace "))
            .collect()
    }

    /// The leak of the namespace of `kind`, if any.
    fn ns_leak<'a>(leaks: &'a [Leak], kind: &str) -> Option<&'a Leak> {
        let prefix = format!("{kind} namespace {kind}:[");
        leaks.iter().find(|l| l.resource.starts_with(&prefix))
    }

    fn me() -> i32 {
        std::process::id() as i32
    }

    #[test]
    fn shared_struct_file_is_a_leak_same_inode_is_not() {
        if !is_root() {
            return;
        }
        let mut lab = Lab::new();
        let null = c"/dev/null";
        let c = lab.spawn(0, |b| {
            let mut p = [0i32; 2];
            // SAFETY: a valid 2-int array.
            check(i64::from(unsafe { libc::pipe2(p.as_mut_ptr(), 0) }), 1)?; // fds 0, 1
            let g = check(clone_fork(0), 2)?;
            if g == 0 {
                // The grandchild inherited both pipe ends; its own
                // /dev/null is the same inode as C's, another struct file.
                match check(open(null), 3) {
                    Ok(_) => signal(b, 1, 1),
                    Err(code) => fail(b, 1, code),
                }
                park()
            }
            b.kids[0].store(g as i32, SeqCst);
            check(open(null), 4)?; // fd 2
            Ok(())
        });
        lab.wait(1);
        let g = lab.kid(0);
        let leaks = find_leaks(&[c]).unwrap();
        let files = others(&leaks);
        assert_eq!(files.len(), 2, "{leaks:#?}");
        for (leak, fd) in files.iter().zip([0, 1]) {
            assert!(
                leak.resource.starts_with("file pipe:[")
                    && leak.resource.ends_with(&format!(" (pid {c} fd {fd})")),
                "{leak:?}"
            );
            assert_eq!(leak.inside, [c]);
            assert_eq!(leak.outside, [g]);
        }
        // Both in the tree: nothing but namespaces is shared.
        let leaks = find_leaks(&[c, g]).unwrap();
        assert!(others(&leaks).is_empty(), "{leaks:#?}");
        let net = ns_leak(&leaks, "net").expect("net namespace shared with the host");
        assert_eq!(net.inside, [c, g]);
    }

    #[test]
    fn shared_mm_is_a_leak() {
        if !is_root() {
            return;
        }
        let mut lab = Lab::new();
        let c = lab.spawn(0, |b| {
            const STACK: usize = 64 << 10;
            // SAFETY: a fresh private anonymous mapping for the clone's stack.
            let stack = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    STACK,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if stack == libc::MAP_FAILED {
                return Err(1000 + errno());
            }
            // SAFETY: the new task runs `park_cb` on its own stack (the top
            // of the mapping above) in our address space and never returns.
            let g = unsafe {
                libc::clone(
                    park_cb,
                    stack.cast::<u8>().add(STACK).cast(),
                    libc::CLONE_VM | libc::CLONE_PARENT | libc::SIGCHLD,
                    std::ptr::null_mut(),
                )
            };
            b.kids[0].store(check(i64::from(g), 2)? as i32, SeqCst);
            Ok(())
        });
        let g = lab.kid(0);
        let leaks = find_leaks(&[c]).unwrap();
        let o = others(&leaks);
        assert_eq!(o.len(), 1, "{leaks:#?}");
        assert_eq!(o[0].resource, format!("mm (address space) of pid {c}"));
        assert_eq!(
            (o[0].inside.as_slice(), o[0].outside.as_slice()),
            (&[c][..], &[g][..])
        );
        let leaks = find_leaks(&[g]).unwrap();
        let o = others(&leaks);
        assert_eq!(o.len(), 1, "{leaks:#?}");
        assert!(o[0].resource.starts_with("mm "), "{leaks:#?}");
        assert_eq!(
            (o[0].inside.as_slice(), o[0].outside.as_slice()),
            (&[g][..], &[c][..])
        );
        assert!(others(&find_leaks(&[c, g]).unwrap()).is_empty());
    }

    #[test]
    fn net_namespace() {
        if !is_root() {
            return;
        }
        let mut lab = Lab::new();
        let isolated = lab.spawn(0, |_| {
            // SAFETY: unshare with a flag, no memory involved.
            check(i64::from(unsafe { libc::unshare(libc::CLONE_NEWNET) }), 1)?;
            Ok(())
        });
        let plain = lab.spawn(1, |_| Ok(()));
        let leaks = find_leaks(&[isolated]).unwrap();
        assert!(ns_leak(&leaks, "net").is_none(), "{leaks:#?}");
        assert!(others(&leaks).is_empty(), "{leaks:#?}");
        // Every other namespace is the host's: shared, and reported.
        for kind in ["user", "mnt", "pid", "ipc", "uts", "cgroup", "time"] {
            let l = ns_leak(&leaks, kind).unwrap_or_else(|| panic!("{kind}: {leaks:#?}"));
            assert_eq!(l.inside, [isolated]);
            assert!(l.outside.contains(&plain));
        }
        let leaks = find_leaks(&[plain]).unwrap();
        let net = ns_leak(&leaks, "net").expect("host netns is shared");
        assert_eq!(net.inside, [plain]);
        assert!(!net.outside.contains(&isolated) && !net.outside.is_empty());
        assert!(!net.outside.contains(&me()), "pdump itself is not outside");
        assert!(others(&leaks).is_empty(), "{leaks:#?}");
    }

    #[test]
    fn ipc_namespace_and_shm_segment() {
        if !is_root() {
            return;
        }
        let mut lab = Lab::new();
        let c = lab.spawn(0, |b| {
            // SAFETY: plain syscalls on values; the segment is attached at
            // an address the kernel picks and only split by mprotect.
            unsafe {
                check(i64::from(libc::unshare(libc::CLONE_NEWIPC)), 1)?;
                let id = check(
                    i64::from(libc::shmget(
                        libc::IPC_PRIVATE,
                        8192,
                        libc::IPC_CREAT | 0o600,
                    )),
                    2,
                )?;
                let addr = libc::shmat(id as i32, std::ptr::null(), 0);
                if addr as isize == -1 {
                    return Err(3000 + errno());
                }
                // Two VMAs, so nattch is 2.
                check(i64::from(libc::mprotect(addr, 4096, libc::PROT_READ)), 4)?;
                b.val.store(id, SeqCst);
            }
            Ok(())
        });
        let shmid = lab.board().val.load(SeqCst) as i32;
        let leaks = find_leaks(&[c]).unwrap();
        assert!(ns_leak(&leaks, "ipc").is_none(), "{leaks:#?}");
        assert!(others(&leaks).is_empty(), "{leaks:#?}");

        let ns = CString::new(format!("/proc/{c}/ns/ipc")).unwrap();
        let joined = lab.spawn(1, |_| {
            enter_ipc(&ns, 1)?;
            Ok(())
        });
        let leaks = find_leaks(&[c]).unwrap();
        let ipc = ns_leak(&leaks, "ipc").expect("ipc namespace shared");
        assert_eq!(
            (ipc.inside.as_slice(), ipc.outside.as_slice()),
            (&[c][..], &[joined][..])
        );
        assert!(
            others(&leaks).is_empty(),
            "joined but not attached: {leaks:#?}"
        );

        let attached = lab.spawn(2, |_| {
            enter_ipc(&ns, 1)?;
            // SAFETY: attaching the segment at a kernel-chosen address.
            if unsafe { libc::shmat(shmid, std::ptr::null(), libc::SHM_RDONLY) } as isize == -1 {
                return Err(3000 + errno());
            }
            Ok(())
        });
        let leaks = find_leaks(&[c]).unwrap();
        let ipc = ns_leak(&leaks, "ipc").unwrap();
        assert_eq!(ipc.outside, [joined, attached]);
        let o = others(&leaks);
        assert_eq!(o.len(), 1, "{leaks:#?}");
        assert!(o[0].resource.starts_with(&format!(
            "SysV shm segment shmid {shmid} key 0x00000000 in ipc:["
        )));
        assert!(!o[0].resource.contains("attachment"), "{leaks:#?}");
        assert_eq!(
            (o[0].inside.as_slice(), o[0].outside.as_slice()),
            (&[c][..], &[attached][..])
        );

        // A task that attaches and goes back to the host ipc namespace is
        // only seen through nattch.
        let host = CString::new(format!("/proc/{}/ns/ipc", me())).unwrap();
        let _moved = lab.spawn(3, |_| {
            let back = check(open(&host), 1)? as i32;
            enter_ipc(&ns, 2)?;
            // SAFETY: attaching the segment, then setns on an fd we opened.
            unsafe {
                if libc::shmat(shmid, std::ptr::null(), libc::SHM_RDONLY) as isize == -1 {
                    return Err(4000 + errno());
                }
                check(i64::from(libc::setns(back, libc::CLONE_NEWIPC)), 5)?;
            }
            Ok(())
        });
        let leaks = find_leaks(&[c]).unwrap();
        assert_eq!(ns_leak(&leaks, "ipc").unwrap().outside, [joined, attached]);
        let o = others(&leaks);
        assert_eq!(o.len(), 1, "{leaks:#?}");
        assert!(
            o[0].resource
                .ends_with("(1 attachment by tasks outside its ipc namespace)"),
            "{leaks:#?}"
        );
        assert_eq!(o[0].outside, [attached]);
    }

    #[test]
    fn shared_files_table_fs_and_semaphore_undo_list() {
        if !is_root() {
            return;
        }
        let mut lab = Lab::new();
        let null = c"/dev/null";
        let c = lab.spawn(0, |b| {
            // SAFETY: plain syscalls; `op` is a valid sembuf array of one.
            unsafe {
                check(i64::from(libc::unshare(libc::CLONE_NEWIPC)), 1)?;
                let id = check(
                    i64::from(libc::semget(libc::IPC_PRIVATE, 1, libc::IPC_CREAT | 0o600)),
                    2,
                )?;
                let mut op = libc::sembuf {
                    sem_num: 0,
                    sem_op: 1,
                    sem_flg: libc::SEM_UNDO as libc::c_short,
                };
                check(i64::from(libc::semop(id as i32, &mut op, 1)), 3)?;
            }
            check(open(null), 4)?;
            let g = check(
                clone_fork(libc::CLONE_FILES | libc::CLONE_FS | libc::CLONE_SYSVSEM),
                5,
            )?;
            if g == 0 {
                park()
            }
            b.kids[0].store(g as i32, SeqCst);
            Ok(())
        });
        let g = lab.kid(0);
        let leaks = find_leaks(&[c]).unwrap();
        let o: Vec<(&str, &[i32], &[i32])> = others(&leaks)
            .iter()
            .map(|l| {
                (
                    l.resource.as_str(),
                    l.inside.as_slice(),
                    l.outside.as_slice(),
                )
            })
            .collect();
        let fs = format!("fs (cwd, root, umask) of pid {c}");
        let files = format!("files table of pid {c}");
        let sem = format!("SysV semaphore undo list of pid {c}");
        assert_eq!(
            o,
            [
                (fs.as_str(), &[c][..], &[g][..]),
                (files.as_str(), &[c][..], &[g][..]),
                (sem.as_str(), &[c][..], &[g][..]),
            ],
            "no per-file leak for a shared table: {leaks:#?}"
        );
        let ipc = ns_leak(&leaks, "ipc").unwrap();
        assert_eq!(
            (ipc.inside.as_slice(), ipc.outside.as_slice()),
            (&[c][..], &[g][..])
        );
    }

    #[test]
    fn semaphore_undo_lists() {
        if !is_root() {
            return;
        }
        let mut lab = Lab::new();
        // fork: neither task has an undo list (kcmp sees two NULLs, equal,
        // and the probe thread tells them apart): nothing shared.
        let forked = lab.spawn(0, |b| {
            let g = check(clone_fork(0), 1)?;
            if g == 0 {
                park()
            }
            b.kids[0].store(g as i32, SeqCst);
            Ok(())
        });
        assert!(others(&find_leaks(&[forked]).unwrap()).is_empty());
        // CLONE_SYSVSEM allocates the list at clone time, before any semop:
        // the two tasks share a real (empty) list.
        let c = lab.spawn(1, |b| {
            let g = check(clone_fork(libc::CLONE_SYSVSEM), 1)?;
            if g == 0 {
                park()
            }
            b.kids[1].store(g as i32, SeqCst);
            Ok(())
        });
        let g = lab.kid(1);
        let leaks = find_leaks(&[c]).unwrap();
        let o = others(&leaks);
        assert_eq!(o.len(), 1, "{leaks:#?}");
        assert_eq!(
            o[0].resource,
            format!("SysV semaphore undo list of pid {c}")
        );
        assert_eq!(
            (o[0].inside.as_slice(), o[0].outside.as_slice()),
            (&[c][..], &[g][..])
        );
    }

    #[test]
    fn vanished_and_empty_trees() {
        if !is_root() {
            return;
        }
        assert_eq!(find_leaks(&[]).unwrap(), []);
        assert_eq!(find_leaks(&[i32::MAX]).unwrap(), []);
    }

    #[test]
    fn cost_report() {
        if !is_root() {
            return;
        }
        let mut lab = Lab::new();
        let null = c"/dev/null";
        let mut tree = Vec::new();
        for slot in 0..4 {
            tree.push(lab.spawn(slot, |_| {
                for _ in 0..8 {
                    check(open(null), 1)?;
                }
                Ok(())
            }));
        }
        let (leaks, stats) = find_leaks_with_stats(&tree).unwrap();
        assert!(others(&leaks).is_empty(), "{leaks:#?}");
        assert_eq!(stats.tree_tasks, 4);
        assert!(stats.outside_processes > 0 && stats.kcmp_calls > 0);
        eprintln!("leak check of {} tree tasks: {stats:?}", tree.len());
    }

    #[test]
    fn messages() {
        let leaks = vec![
            Leak {
                resource: "net namespace net:[4026531840]".into(),
                inside: vec![10],
                outside: (1..=20).collect(),
            },
            Leak {
                resource: "mm (address space) of pid 10".into(),
                inside: vec![10],
                outside: vec![11],
            },
        ];
        assert!(refuse_if_leaks(&[]).is_ok());
        let msg = refuse_if_leaks(&leaks).unwrap_err().to_string();
        let lines: Vec<&str> = msg.lines().collect();
        assert_eq!(lines.len(), 3, "{msg}");
        assert!(lines[0].contains("2 resources"));
        assert!(lines[1].starts_with("net namespace net:[4026531840]: inside [10], outside [1, 2,"));
        assert!(lines[1].ends_with(", 20]"));
        assert_eq!(
            lines[2],
            "mm (address space) of pid 10: inside [10], outside [11]"
        );
        let text = render(&leaks);
        assert!(
            text.contains("outside [1, 2, 3, 4, 5, 6, 7, 8, +12 more]"),
            "{text}"
        );
        assert_eq!(
            render(&[]),
            "no resources shared with tasks outside the tree\n"
        );
        assert_eq!(fmt_pids(&[1, 2], Some(0)), "[+2 more]");
    }

    #[test]
    fn parsers() {
        let maps = "\
7f0000000000-7f0000001000 r--s 00000000 00:01 32769                      /SYSV0000abcd (deleted)
7f0000001000-7f0000002000 rw-s 00001000 00:01 32769                      /SYSV0000abcd (deleted)
7f0000002000-7f0000003000 rw-s 00000000 00:01 5                          /dev/zero (deleted)
7f0000003000-7f0000004000 rw-p 00000000 00:00 0 
";
        let m = parse_sysv_maps(maps);
        assert_eq!(
            m,
            [SysvMap {
                key: 0xabcd,
                dev: 1,
                shmid: 32769
            }; 2]
        );
        let table = "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid      atime      dtime      ctime                   rss                  swap
         0      32769  1600                  8192  1234  1234      3     0     0     0     0 1700000000          0 1700000000                  8192                     0
";
        assert_eq!(parse_shm_table(table), HashMap::from([(32769, 3)]));
    }
}
