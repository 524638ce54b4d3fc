//! Collecting the process tree of a dump (architecture, "Dump pipeline" step 1).
//!
//! [`collect`] walks `/proc/PID/task/TID/children` of *every* thread from a
//! root process down and returns the tree in DFS order (the root, then each
//! child's whole subtree, children ordered by their pid in pdump's view),
//! each process described by
//! a [`TaskEntry`]: the seeds' data model (seed 002: pid, tgid, ppid in one
//! DFS array; seed 000: pgid, sid, the pid-namespace depth relative to the
//! root task's namespace and the pid on every nested level; seed 001: those
//! come from the `NSpid`/`NStgid`/`NSpgid`/`NSsid` lines of `/proc/PID/status`).
//!
//! # Levels
//!
//! The `NS*` lines of a task's `status` list its ids on every pid-namespace
//! level from the namespace of the `/proc` mount that is read (pdump's view,
//! index 0) down to the task's own namespace (the last element). The root
//! task's own level is therefore `root_level = len(root.NSpid) - 1`, and for a
//! task of the tree:
//!
//! * `vpids = NSpid[root_level..]` (`vtgids`, `vpgids`, `vsids` likewise);
//! * `depth = len(NSpid) - 1 - root_level`;
//! * `tgid`, `pgid`, `sid` are the values at `root_level`; `ppid` is the
//!   parent's tgid at `root_level` (for the root: 0 when its parent is not in
//!   the root's namespace);
//! * `pid` stays pdump's own view (`NSpid[0]`): it names the images.
//!
//! The kernel prints 0 in `NSpgid`/`NSsid` on every level where the group or
//! session leader has no pid (a leader in an ancestor namespace of that
//! level), e.g. `NSpgid: 1214 0` for a task of a child namespace whose group
//! leader stayed outside. Those zeros are kept as they are: they are exactly
//! what `getpgrp()`/`getsid(0)` return inside that namespace.
//!
//! # Foreign tasks
//!
//! Seed 000 refuses "foreign" tasks: tasks whose pid namespace is not the
//! root's or a descendant of it (in particular an *ancestor* namespace, where
//! the task has no pid in the root's namespace at all). [`collect`] checks
//! both halves for every task:
//!
//! 1. `len(NSpid) > root_level` ([`classify_levels`]): the task has a pid in
//!    the root's namespace, i.e. its namespace is not an ancestor;
//! 2. walking `depth` times up with the `NS_GET_PARENT` ioctl from
//!    `/proc/PID/ns/pid` reaches the root's namespace (the seed's
//!    `while (pidns != root) pidns = pidns->parent` loop), i.e. it is not a
//!    namespace of another branch at the same or a deeper level. This is done
//!    once per distinct namespace.
//!
//! On Linux neither can fail for a task reached through `children` links,
//! which is why no live test produces one. A new task's namespace is its
//! creator's `pid_ns_for_children`, which `unshare` only sets to a new *child*
//! of the creator's active namespace and `setns` only to a descendant of it;
//! its parent is the creator, or with `CLONE_PARENT` the creator's parent,
//! whose namespace is an ancestor of the creator's too; threads cannot differ
//! (`CLONE_THREAD` is refused once `pid_ns_for_children` differs). Reparenting
//! on exit only moves children to another thread of the same process, to a
//! subreaper of the exiting parent's own namespace or to that namespace's
//! init (`find_new_reaper` stops at the namespace boundary). So a parent's
//! namespace is always its child's or an ancestor of it, and every
//! descendant of the root is in the root's namespace or below. The checks
//! stay as a guard: they make the seed's rule explicit and turn any breach
//! (a kernel change, a `/proc` of an unexpected namespace) into a clear error
//! instead of a wrong image.
//!
//! # Races
//!
//! The tree is read from a live system. A task that vanishes while it is
//! read (`ENOENT`/`ESRCH`) is skipped, not an error; a child whose `PPid` is
//! no longer the process that listed it (it was reparented, or its pid was
//! reused) is skipped too. Callers seize what they got and re-scan until the
//! tree is stable: [`collect_stable`] and [`diff`].
//!
//! # What `/proc` does not tell
//!
//! * `child_subreaper` (`PR_SET_CHILD_SUBREAPER`) is not visible in `/proc`;
//!   it is left `false` here and filled in by the dumper from inside the task
//!   (`prctl(PR_GET_CHILD_SUBREAPER)` run by the parasite).
//! * A task in group stop shows `T` and is [`TaskState::Stopped`]. Once
//!   seized by pdump it shows `t` (ptrace stop) and reads as
//!   [`TaskState::Alive`]: the dumper must keep the state of its first,
//!   pre-seize collection for the tasks it found stopped.
//! * A process whose leader thread exited while other threads run has a
//!   zombie leader (`State: Z`) but is alive: it is recorded alive (stopped
//!   when all its live threads are in group stop), only a process with no
//!   thread left is a zombie.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use crate::image::model::{TaskEntry, TaskState};
use crate::procfs::{self, ProcError, Status};

/// A collected process tree.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree {
    /// The root process, as pdump sees it (its pid in `/proc`'s namespace).
    pub root: i32,
    /// The root task's own pid-namespace level in `/proc`'s view
    /// (`len(root.NSpid) - 1`; 0 when the root is in `/proc`'s namespace).
    pub root_level: usize,
    /// Every process of the tree in DFS order from the root (root first, then
    /// each child's whole subtree, children ordered by pid), zombies included.
    pub tasks: Vec<TaskEntry>,
}

impl Tree {
    /// Every process, as pdump sees it, in DFS order.
    pub fn pids(&self) -> Vec<i32> {
        self.tasks.iter().map(|t| t.pid).collect()
    }

    /// The processes that are not zombies (those that can be seized), in DFS order.
    pub fn alive(&self) -> Vec<i32> {
        self.tasks
            .iter()
            .filter(|t| !matches!(t.state, TaskState::Zombie { .. }))
            .map(|t| t.pid)
            .collect()
    }

    /// The entry of process `pid` (pdump's view).
    pub fn get(&self, pid: i32) -> Option<&TaskEntry> {
        self.tasks.iter().find(|t| t.pid == pid)
    }

    /// The children of process `pid` (pdump's view) in the tree, in DFS order
    /// (by pid). Empty when `pid` is not in the tree.
    ///
    /// Parents are matched by their pid in the root's namespace (`ppid` against
    /// `tgid`), which every task of a collected tree has.
    pub fn children_of(&self, pid: i32) -> Vec<i32> {
        let Some(parent) = self.get(pid) else {
            return Vec::new();
        };
        self.tasks
            .iter()
            .filter(|t| t.pid != self.root && t.ppid == parent.tgid)
            .map(|t| t.pid)
            .collect()
    }

    /// The parent of process `pid` in the tree (`None` for the root and for
    /// pids not in the tree).
    pub fn parent_of(&self, pid: i32) -> Option<i32> {
        let task = self.get(pid)?;
        if pid == self.root {
            return None;
        }
        self.tasks
            .iter()
            .find(|t| t.tgid == task.ppid)
            .map(|t| t.pid)
    }

    /// What two collections are compared on by [`collect_stable`]: each
    /// process with its threads and whether it is a zombie.
    fn shape(&self) -> BTreeSet<(i32, Vec<Vec<i32>>, bool)> {
        self.tasks
            .iter()
            .map(|t| {
                let mut threads = t.threads.clone();
                threads.sort_unstable();
                let zombie = matches!(t.state, TaskState::Zombie { .. });
                (t.pid, threads, zombie)
            })
            .collect()
    }
}

/// Why a task of the tree is foreign to the root's pid namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Foreign {
    /// Its namespace is an ancestor of the root's: it has fewer pid levels in
    /// `/proc`'s view than the root, hence no pid in the root's namespace.
    AncestorNamespace {
        /// Length of its `NSpid`.
        task_levels: usize,
        /// Length of the root's `NSpid`.
        root_levels: usize,
    },
    /// At the root's level its namespace is another one than the root's (a
    /// namespace of another branch).
    OtherNamespace {
        /// Inode of the task's namespace at the root's level.
        pidns: u64,
        /// Inode of the root's namespace.
        root_pidns: u64,
    },
}

impl fmt::Display for Foreign {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Foreign::AncestorNamespace {
                task_levels,
                root_levels,
            } => write!(
                f,
                "its pid namespace is an ancestor of the root's ({task_levels} pid level(s) \
                 in pdump's view, the root has {root_levels}), so it has no pid there"
            ),
            Foreign::OtherNamespace { pidns, root_pidns } => write!(
                f,
                "at the root's level it is in pid namespace pid:[{pidns}], not the root's \
                 pid:[{root_pidns}]"
            ),
        }
    }
}

/// A failed collection: one variant per failing operation, each naming the
/// pid and the path it concerns. A task that vanishes meanwhile is not an
/// error (it is skipped).
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// The root task does not exist (or exited before it could be read).
    #[error("the root task {root} does not exist ({path})")]
    RootGone {
        /// The root.
        root: i32,
        /// The file that could not be read.
        path: PathBuf,
        /// The cause (`ENOENT`/`ESRCH`), when a read failed.
        #[source]
        source: Option<ProcError>,
    },
    /// The root given is a thread, not a thread-group leader.
    #[error("pid {pid} is a thread of process {tgid}: the root of a tree must be a process")]
    NotALeader {
        /// The pid given.
        pid: i32,
        /// Its thread group.
        tgid: i32,
    },
    /// Reading `/proc/PID/status` or `/proc/PID/task/TID/status` failed.
    #[error("reading the status of pid {pid} ({path})")]
    Status {
        /// The process.
        pid: i32,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: ProcError,
    },
    /// Listing `/proc/PID/task` failed.
    #[error("listing the threads of pid {pid} ({path})")]
    Threads {
        /// The process.
        pid: i32,
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: ProcError,
    },
    /// Reading `/proc/PID/task/TID/children` failed.
    #[error("reading the children of thread {tid} of pid {pid} ({path})")]
    Children {
        /// The process.
        pid: i32,
        /// The thread.
        tid: i32,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: ProcError,
    },
    /// Reading `/proc/PID/stat` of a zombie (for its exit code) failed.
    #[error("reading the exit code of zombie {pid} ({path})")]
    ExitCode {
        /// The zombie.
        pid: i32,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A `/proc` file read fine but does not have the expected content.
    #[error("pid {pid}: unexpected content in {path}: {what}")]
    Malformed {
        /// The process.
        pid: i32,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// `stat`/`open` of `/proc/PID/ns/pid` failed.
    #[error("reading the pid namespace of pid {pid} ({path})")]
    PidNamespace {
        /// The process.
        pid: i32,
        /// The link.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Walking up the pid namespaces with `NS_GET_PARENT` failed (`EPERM`
    /// when the namespace is not below pdump's own).
    #[error("pid {pid}: NS_GET_PARENT from {path} ({step} level(s) up)")]
    NamespaceParent {
        /// The process.
        pid: i32,
        /// Its namespace link.
        path: PathBuf,
        /// How many levels up the failing call was.
        step: u32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A task of the tree is not in the root's pid namespace or a descendant.
    #[error(
        "pid {pid} in the tree of root {root} is a foreign task: {reason}; \
         tasks from an ancestor or unrelated pid namespace cannot be dumped"
    )]
    ForeignTask {
        /// The task.
        pid: i32,
        /// The root of the tree.
        root: i32,
        /// Why.
        reason: Foreign,
    },
    /// [`collect_stable`] saw the tree change in every one of its rounds.
    #[error("the tree of root {root} was still changing after {rounds} collections")]
    Unstable {
        /// The root.
        root: i32,
        /// Collections made.
        rounds: usize,
    },
}

/// Where a task's pid namespace lies relative to the root task's, from the
/// lengths of their `NSpid` lines (both read through the same `/proc`): the
/// task's depth below the root's namespace, or [`Foreign::AncestorNamespace`]
/// when it has fewer levels than the root (no pid in the root's namespace).
///
/// This is the length half of the foreign-task check; [`collect`] adds the
/// identity half (the namespace found `depth` levels up is the root's).
pub fn classify_levels(root_nspid: &[i32], task_nspid: &[i32]) -> Result<u32, Foreign> {
    classify(root_nspid.len(), task_nspid.len())
}

/// [`classify_levels`] on the lengths.
fn classify(root_levels: usize, task_levels: usize) -> Result<u32, Foreign> {
    if root_levels == 0 || task_levels < root_levels {
        return Err(Foreign::AncestorNamespace {
            task_levels,
            root_levels,
        });
    }
    Ok(u32::try_from(task_levels - root_levels).unwrap_or(u32::MAX))
}

/// Collects the tree rooted at process `root` (pdump's view) from `/proc`.
///
/// See the [module documentation](self) for what each entry holds and how
/// races are handled.
pub fn collect(root: i32) -> Result<Tree, TreeError> {
    Collector::new(root)?.run()
}

/// Collects the tree until two consecutive collections agree on every
/// process, its threads and whether it is a zombie (at most `max_rounds`
/// collections, at least 2), and returns the last one.
///
/// Meant for after seizing: the dumper seizes what [`collect`] found, calls
/// this (or [`collect`] and [`diff`]) to find what was forked meanwhile,
/// seizes those, and so on; once everything is seized nothing can change.
pub fn collect_stable(root: i32, max_rounds: usize) -> Result<Tree, TreeError> {
    let rounds = max_rounds.max(2);
    let mut prev = collect(root)?;
    for _ in 1..rounds {
        let next = collect(root)?;
        if next.shape() == prev.shape() {
            return Ok(next);
        }
        prev = next;
    }
    Err(TreeError::Unstable { root, rounds })
}

/// The processes (pdump's view) in `after` that are not in `before` (new),
/// in `after`'s DFS order, and those in `before` that are not in `after`
/// (gone), in `before`'s order.
pub fn diff(before: &Tree, after: &Tree) -> (Vec<i32>, Vec<i32>) {
    let old: HashSet<i32> = before.tasks.iter().map(|t| t.pid).collect();
    let now: HashSet<i32> = after.tasks.iter().map(|t| t.pid).collect();
    let new = after
        .pids()
        .into_iter()
        .filter(|p| !old.contains(p))
        .collect();
    let gone = before
        .pids()
        .into_iter()
        .filter(|p| !now.contains(p))
        .collect();
    (new, gone)
}

/// A pid namespace: device and inode of its nsfs file.
type NsId = (u64, u64);

/// What one process looks like in `/proc`, before it becomes a [`TaskEntry`].
struct RawTask {
    status: Status,
    /// `NSpid` of every live non-leader thread, in tid order.
    threads: Vec<Vec<i32>>,
    /// Children of every thread, sorted by pid, deduplicated.
    children: Vec<i32>,
    state: TaskState,
    /// `/proc/PID/ns/pid`, open.
    ns_file: File,
    ns: NsId,
}

/// State of one collection.
struct Collector {
    root: i32,
    root_status: Status,
    root_level: usize,
    root_ns: NsId,
    /// Namespaces already checked to be the root's or below it.
    checked: HashSet<NsId>,
}

/// `ENOENT`/`ESRCH`: the task went away.
fn io_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH))
}

/// The `(dev, ino)` of an open namespace file.
fn ns_id_of(f: &File) -> io::Result<NsId> {
    let m = f.metadata()?;
    Ok((m.dev(), m.ino()))
}

impl Collector {
    fn new(root: i32) -> Result<Self, TreeError> {
        let path = procfs::proc_path(root, "status");
        let root_status = match procfs::status(root) {
            Ok(st) => st,
            Err(e) if e.is_gone() => {
                return Err(TreeError::RootGone {
                    root,
                    path,
                    source: Some(e),
                })
            }
            Err(source) => {
                return Err(TreeError::Status {
                    pid: root,
                    path,
                    source,
                })
            }
        };
        if root_status.tgid != root {
            return Err(TreeError::NotALeader {
                pid: root,
                tgid: root_status.tgid,
            });
        }
        let Some(root_level) = root_status.ns_pid.len().checked_sub(1) else {
            return Err(TreeError::Malformed {
                pid: root,
                path,
                what: "an empty NSpid line".into(),
            });
        };
        let ns_path = procfs::proc_path(root, "ns/pid");
        let root_ns = File::open(&ns_path)
            .and_then(|f| ns_id_of(&f))
            .map_err(|source| {
                if io_gone(&source) {
                    TreeError::RootGone {
                        root,
                        path: ns_path.clone(),
                        source: None,
                    }
                } else {
                    TreeError::PidNamespace {
                        pid: root,
                        path: ns_path.clone(),
                        source,
                    }
                }
            })?;
        let checked = HashSet::from([root_ns]);
        Ok(Collector {
            root,
            root_status,
            root_level,
            root_ns,
            checked,
        })
    }

    fn run(mut self) -> Result<Tree, TreeError> {
        let mut tasks: Vec<TaskEntry> = Vec::new();
        let mut seen = HashSet::new();
        // (pid, index of its parent in `tasks`), popped in DFS order.
        let mut stack: Vec<(i32, Option<usize>)> = vec![(self.root, None)];
        while let Some((pid, parent)) = stack.pop() {
            if !seen.insert(pid) {
                continue; // reparented within the tree while we read it
            }
            let listed_by = parent.map(|i| tasks[i].pid);
            let raw = match self.read_task(pid, listed_by)? {
                Some(raw) => raw,
                None if parent.is_none() => {
                    return Err(TreeError::RootGone {
                        root: pid,
                        path: procfs::proc_path(pid, "status"),
                        source: None,
                    })
                }
                None => continue,
            };
            let ppid = match parent {
                Some(i) => tasks[i].tgid,
                None => self.root_ppid(),
            };
            let entry = make_entry(
                self.root,
                self.root_level,
                &raw.status,
                ppid,
                raw.threads,
                raw.state,
                raw.ns.1,
                parent.is_none(),
            )?;
            if !self.check_ns(pid, entry.depth, &raw.ns_file, raw.ns)? {
                continue;
            }
            let index = tasks.len();
            tasks.push(entry);
            stack.extend(raw.children.iter().rev().map(|&c| (c, Some(index))));
        }
        Ok(Tree {
            root: self.root,
            root_level: self.root_level,
            tasks,
        })
    }

    /// The root's parent's tgid in the root's namespace, 0 when it has none
    /// there (it is in an ancestor namespace, or it went away).
    fn root_ppid(&self) -> i32 {
        let ppid = self.root_status.ppid;
        if ppid <= 0 {
            return 0;
        }
        let Ok(parent) = procfs::status(ppid) else {
            return 0;
        };
        let same_ns = File::open(procfs::proc_path(ppid, "ns/pid"))
            .and_then(|f| ns_id_of(&f))
            .is_ok_and(|ns| ns == self.root_ns);
        match parent.ns_tgid.get(self.root_level) {
            Some(&tgid) if same_ns => tgid,
            _ => 0,
        }
    }

    /// Reads one process; `None` when it vanished, is a dump's copy-on-write
    /// snapshot (one a killed dumper left: see [`is_snapshot`]), is not a process, or is no
    /// longer a child of `listed_by` (the process whose `children` listed it).
    fn read_task(&self, pid: i32, listed_by: Option<i32>) -> Result<Option<RawTask>, TreeError> {
        let status_path = || procfs::proc_path(pid, "status");
        let status = match procfs::status(pid) {
            Ok(st) => st,
            Err(e) if e.is_gone() => return Ok(None),
            Err(source) => {
                return Err(TreeError::Status {
                    pid,
                    path: status_path(),
                    source,
                })
            }
        };
        if status.tgid != pid || status.state == 'X' {
            return Ok(None);
        }
        if listed_by.is_some_and(|p| p != status.ppid) {
            return Ok(None);
        }
        if listed_by.is_some() && is_snapshot(pid, &status.name) {
            log::debug!("pid {pid}: a copy-on-write snapshot of a dump, not a member");
            return Ok(None);
        }

        let tids = match procfs::threads(pid) {
            Ok(t) => t,
            Err(e) if e.is_gone() => return Ok(None),
            Err(source) => {
                return Err(TreeError::Threads {
                    pid,
                    path: procfs::proc_path(pid, "task"),
                    source,
                })
            }
        };
        let mut threads = Vec::new();
        let mut thread_states = Vec::new();
        for &tid in tids.iter().filter(|&&t| t != pid) {
            match procfs::task_status(pid, tid) {
                Ok(ts) if matches!(ts.state, 'Z' | 'X') => {} // exiting thread
                Ok(ts) => {
                    threads.push(ts.ns_pid);
                    thread_states.push(ts.state);
                }
                Err(e) if e.is_gone() => {}
                Err(source) => {
                    return Err(TreeError::Status {
                        pid,
                        path: procfs::task_path(pid, tid, "status"),
                        source,
                    })
                }
            }
        }

        let mut children = Vec::new();
        for &tid in &tids {
            match procfs::children(pid, tid) {
                Ok(c) => children.extend(c),
                Err(e) if e.is_gone() => {}
                Err(source) => {
                    return Err(TreeError::Children {
                        pid,
                        tid,
                        path: procfs::task_path(pid, tid, "children"),
                        source,
                    })
                }
            }
        }
        children.sort_unstable();
        children.dedup();

        let state = match status.state {
            'Z' if threads.is_empty() => match read_exit_code(pid)? {
                Some(exit_code) => TaskState::Zombie { exit_code },
                None => return Ok(None),
            },
            // The leader exited, other threads run: the process is alive.
            'Z' if thread_states.iter().all(|&s| s == 'T') => TaskState::Stopped,
            'Z' => TaskState::Alive,
            'T' => TaskState::Stopped,
            _ => TaskState::Alive,
        };

        let ns_path = procfs::proc_path(pid, "ns/pid");
        let ns_err = |source: io::Error| TreeError::PidNamespace {
            pid,
            path: ns_path.clone(),
            source,
        };
        let ns_file = match File::open(&ns_path) {
            Ok(f) => f,
            Err(e) if io_gone(&e) => return Ok(None),
            Err(e) => return Err(ns_err(e)),
        };
        let ns = ns_id_of(&ns_file).map_err(ns_err)?;

        let mut threads_from_root = Vec::with_capacity(threads.len());
        for t in threads {
            match t.get(self.root_level..) {
                Some(levels) if t.len() == status.ns_pid.len() => {
                    threads_from_root.push(levels.to_vec())
                }
                _ => {
                    return Err(TreeError::Malformed {
                        pid,
                        path: procfs::proc_path(pid, "task"),
                        what: format!(
                            "a thread with NSpid {t:?}, the leader has {:?}",
                            status.ns_pid
                        ),
                    })
                }
            }
        }
        Ok(Some(RawTask {
            status,
            threads: threads_from_root,
            children,
            state,
            ns_file,
            ns,
        }))
    }

    /// Checks that namespace `ns` of task `pid`, `depth` levels below the
    /// root's, is the root's namespace or a descendant of it (the identity
    /// half of the foreign-task check). `Ok(false)`: the task vanished.
    fn check_ns(
        &mut self,
        pid: i32,
        depth: u32,
        ns_file: &File,
        ns: NsId,
    ) -> Result<bool, TreeError> {
        if self.checked.contains(&ns) {
            return Ok(true);
        }
        let path = procfs::proc_path(pid, "ns/pid");
        let mut current: Option<OwnedFd> = None;
        for step in 1..=depth {
            let fd = current
                .as_ref()
                .map_or(ns_file.as_raw_fd(), |f| f.as_raw_fd());
            // SAFETY: NS_GET_PARENT takes no argument and returns a new fd
            // (or -1); `fd` is an open nsfs file owned by this function's
            // caller or by `current`.
            let parent = unsafe { libc::ioctl(fd, libc::NS_GET_PARENT) };
            if parent < 0 {
                let source = io::Error::last_os_error();
                if io_gone(&source) {
                    return Ok(false);
                }
                return Err(TreeError::NamespaceParent {
                    pid,
                    path,
                    step,
                    source,
                });
            }
            // SAFETY: `parent` is a new fd the ioctl just returned; nothing
            // else owns it.
            current = Some(unsafe { OwnedFd::from_raw_fd(parent) });
        }
        let at_root_level = match current {
            Some(fd) => ns_id_of(&File::from(fd)).map_err(|source| TreeError::PidNamespace {
                pid,
                path: path.clone(),
                source,
            })?,
            None => ns,
        };
        if at_root_level != self.root_ns {
            return Err(TreeError::ForeignTask {
                pid,
                root: self.root,
                reason: Foreign::OtherNamespace {
                    pidns: at_root_level.1,
                    root_pidns: self.root_ns.1,
                },
            });
        }
        self.checked.insert(ns);
        Ok(true)
    }
}

/// Builds the entry of one process from its `status` (pdump's view), the
/// root's level, its parent's tgid in the root's namespace, its threads'
/// pids from the root's level on, its state and its pid-namespace inode.
/// Pure: the level arithmetic of the [module documentation](self).
#[allow(clippy::too_many_arguments)]
fn make_entry(
    root: i32,
    root_level: usize,
    st: &Status,
    ppid: i32,
    threads: Vec<Vec<i32>>,
    state: TaskState,
    pidns: u64,
    is_root: bool,
) -> Result<TaskEntry, TreeError> {
    let pid = st.pid;
    let malformed = |what: String| TreeError::Malformed {
        pid,
        path: procfs::proc_path(pid, "status"),
        what,
    };
    let levels = st.ns_pid.len();
    for (name, v) in [
        ("NStgid", &st.ns_tgid),
        ("NSpgid", &st.ns_pgid),
        ("NSsid", &st.ns_sid),
    ] {
        if v.len() != levels {
            return Err(malformed(format!(
                "{name} has {} level(s), NSpid {levels}",
                v.len()
            )));
        }
    }
    let depth = classify(root_level + 1, levels).map_err(|reason| TreeError::ForeignTask {
        pid,
        root,
        reason,
    })?;
    let vpids = st.ns_pid[root_level..].to_vec();
    let vtgids = st.ns_tgid[root_level..].to_vec();
    let vpgids = st.ns_pgid[root_level..].to_vec();
    let vsids = st.ns_sid[root_level..].to_vec();
    let own_pid = *vpids.last().unwrap_or(&0);
    Ok(TaskEntry {
        pid: st.ns_pid[0],
        tgid: vtgids[0],
        ppid,
        pgid: vpgids[0],
        sid: vsids[0],
        depth,
        vpids,
        vtgids,
        vpgids,
        vsids,
        state,
        threads,
        child_subreaper: false,
        pidns_init: own_pid == 1 && (depth > 0 || is_root),
        pidns,
        comm: st.name.clone(),
    })
}

/// Whether `pid` is the copy-on-write snapshot of a dump (see `crate::cow`):
/// named [`pdump_parasite::SNAPSHOT_COMM`] and created with exit signal 0.
/// A dumper killed mid-dump leaves its snapshot to exit (or as a zombie,
/// reaped by the next dump's parasite): it belongs to no tree.
fn is_snapshot(pid: i32, name: &str) -> bool {
    name == pdump_parasite::SNAPSHOT_COMM && procfs::stat(pid).is_ok_and(|st| st.exit_signal == 0)
}

/// The `exit_code` field (52) of `/proc/PID/stat`: the wait status a zombie's
/// parent will get. `None` when the task vanished.
fn read_exit_code(pid: i32) -> Result<Option<i32>, TreeError> {
    let path = procfs::proc_path(pid, "stat");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if io_gone(&e) => return Ok(None),
        Err(source) => return Err(TreeError::ExitCode { pid, path, source }),
    };
    parse_exit_code(&text)
        .map(Some)
        .ok_or_else(|| TreeError::Malformed {
            pid,
            path,
            what: format!("no exit_code (field 52) in {:?}", text.trim_end()),
        })
}

/// Field 52 of a `stat` line. The comm (field 2) may contain spaces and
/// parentheses, so the fields are counted from after the *last* `)`.
fn parse_exit_code(stat: &str) -> Option<i32> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts with field 3 (the state).
    rest.split_whitespace().nth(52 - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Status` with the given `NS*` lines (pdump's view first).
    fn status(ns_pid: &[i32], ns_pgid: &[i32], ns_sid: &[i32]) -> Status {
        Status {
            state: 'S',
            pid: ns_pid[0],
            tgid: ns_pid[0],
            ns_pid: ns_pid.to_vec(),
            ns_tgid: ns_pid.to_vec(),
            ns_pgid: ns_pgid.to_vec(),
            ns_sid: ns_sid.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn classify_levels_synthetic() {
        // Same namespace as the root, below it, and above it.
        assert_eq!(classify_levels(&[7], &[9]), Ok(0));
        assert_eq!(classify_levels(&[7, 1], &[9, 3]), Ok(0));
        assert_eq!(classify_levels(&[7], &[9, 3, 1]), Ok(2));
        assert_eq!(classify_levels(&[7, 2, 1], &[9, 3, 2, 1]), Ok(1));
        assert_eq!(
            classify_levels(&[7, 2, 1], &[9, 3]),
            Err(Foreign::AncestorNamespace {
                task_levels: 2,
                root_levels: 3
            })
        );
        assert_eq!(
            classify_levels(&[7, 1], &[9]),
            Err(Foreign::AncestorNamespace {
                task_levels: 1,
                root_levels: 2
            })
        );
        assert!(classify_levels(&[], &[1]).is_err());
    }

    #[test]
    fn make_entry_slices_from_the_root_level() {
        // A task two levels below a root that is itself one level below
        // pdump: NSpid 900 (pdump) / 40 (root's ns) / 7 / 1 (its own ns).
        // Its group leader is visible down to level 2, its session leader
        // only in pdump's namespace.
        let st = status(&[900, 40, 7, 1], &[880, 20, 3, 0], &[800, 0, 0, 0]);
        let threads = vec![vec![41, 8, 2]];
        let e = make_entry(5, 1, &st, 33, threads.clone(), TaskState::Alive, 77, false).unwrap();
        assert_eq!(e.pid, 900);
        assert_eq!((e.tgid, e.ppid, e.pgid, e.sid), (40, 33, 20, 0));
        assert_eq!(e.depth, 2);
        assert_eq!(e.vpids, vec![40, 7, 1]);
        assert_eq!(e.vtgids, vec![40, 7, 1]);
        assert_eq!(e.vpgids, vec![20, 3, 0]);
        assert_eq!(e.vsids, vec![0, 0, 0]);
        assert_eq!(e.threads, threads);
        assert_eq!(e.pidns, 77);
        assert!(e.pidns_init, "pid 1 of a namespace below the root's");
        assert!(!e.child_subreaper);

        // Pid 1 at depth 0 is an init only when it is the root itself.
        let st = status(&[900, 1], &[900, 1], &[900, 1]);
        let root = make_entry(900, 1, &st, 0, vec![], TaskState::Alive, 1, true).unwrap();
        assert!(root.pidns_init);
        assert_eq!((root.depth, root.vpids.clone()), (0, vec![1]));
        let st = status(&[901, 2], &[900, 1], &[900, 1]);
        let other = make_entry(900, 1, &st, 1, vec![], TaskState::Stopped, 1, false).unwrap();
        assert!(!other.pidns_init);
        assert_eq!((other.ppid, other.pgid, other.sid), (1, 1, 1));
        assert_eq!(other.state, TaskState::Stopped);
    }

    #[test]
    fn make_entry_refuses_foreign_and_malformed() {
        // Root at level 2; the task has only 2 levels: an ancestor namespace.
        let st = status(&[900, 40], &[900, 40], &[900, 40]);
        let err = make_entry(5, 2, &st, 0, vec![], TaskState::Alive, 1, false).unwrap_err();
        match &err {
            TreeError::ForeignTask { pid, root, reason } => {
                assert_eq!((*pid, *root), (900, 5));
                assert_eq!(
                    *reason,
                    Foreign::AncestorNamespace {
                        task_levels: 2,
                        root_levels: 3
                    }
                );
            }
            other => panic!("expected ForeignTask, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("pid 900") && msg.contains("root 5"), "{msg}");
        assert!(msg.contains("foreign") && msg.contains("ancestor"), "{msg}");

        let st = status(&[900, 40], &[900, 40], &[900]);
        assert!(matches!(
            make_entry(5, 0, &st, 0, vec![], TaskState::Alive, 1, false),
            Err(TreeError::Malformed { pid: 900, .. })
        ));

        let other = TreeError::ForeignTask {
            pid: 3,
            root: 1,
            reason: Foreign::OtherNamespace {
                pidns: 11,
                root_pidns: 12,
            },
        };
        assert!(other.to_string().contains("pid:[11]"));
    }

    #[test]
    fn exit_code_is_field_52() {
        let mut fields: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
        fields[0] = "Z".into();
        fields[49] = "768".into();
        let line = format!("4242 (a) b (c)) {}\n", fields.join(" "));
        assert_eq!(parse_exit_code(&line), Some(768));
        assert_eq!(parse_exit_code("4242 (x) Z 1 2 3\n"), None);
        assert_eq!(parse_exit_code("garbage"), None);
    }

    fn synthetic(entries: &[(i32, i32, bool)]) -> Tree {
        // (pid, ppid, zombie); pids in the root's namespace = pid - 100.
        Tree {
            root: entries[0].0,
            root_level: 1,
            tasks: entries
                .iter()
                .map(|&(pid, ppid, zombie)| TaskEntry {
                    pid,
                    tgid: pid - 100,
                    ppid: if ppid == 0 { 0 } else { ppid - 100 },
                    vpids: vec![pid - 100],
                    state: if zombie {
                        TaskState::Zombie { exit_code: 0 }
                    } else {
                        TaskState::Alive
                    },
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn helpers_and_diff() {
        let a = synthetic(&[
            (110, 0, false),
            (111, 110, false),
            (113, 111, true),
            (112, 110, false),
        ]);
        assert_eq!(a.pids(), vec![110, 111, 113, 112]);
        assert_eq!(a.alive(), vec![110, 111, 112]);
        assert_eq!(a.children_of(110), vec![111, 112]);
        assert_eq!(a.children_of(111), vec![113]);
        assert!(a.children_of(113).is_empty());
        assert!(a.children_of(999).is_empty());
        assert_eq!(a.parent_of(113), Some(111));
        assert_eq!(a.parent_of(110), None);
        assert_eq!(a.get(112).map(|t| t.tgid), Some(12));

        let b = synthetic(&[
            (110, 0, false),
            (111, 110, false),
            (115, 111, false),
            (114, 110, false),
        ]);
        assert_eq!(diff(&a, &b), (vec![115, 114], vec![113, 112]));
        assert_eq!(diff(&a, &a), (vec![], vec![]));
        assert_eq!(a.shape(), a.clone().shape());
        assert_ne!(a.shape(), b.shape());
        // A task that became a zombie changes the shape.
        let c = synthetic(&[
            (110, 0, false),
            (111, 110, false),
            (113, 111, false),
            (112, 110, false),
        ]);
        assert_ne!(a.shape(), c.shape());
    }

    #[test]
    fn root_errors() {
        assert!(matches!(
            collect(i32::MAX),
            Err(TreeError::RootGone { root: i32::MAX, .. })
        ));
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = stop_rx.recv();
        });
        let tid = rx.recv().unwrap();
        let me = std::process::id() as i32;
        let err = collect(tid).unwrap_err();
        stop_tx.send(()).unwrap();
        t.join().unwrap();
        assert!(
            matches!(err, TreeError::NotALeader { pid, tgid } if pid == tid && tgid == me),
            "{err:?}"
        );
    }

    #[test]
    fn collects_self_in_pdump_namespace() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = stop_rx.recv();
        });
        let tid = rx.recv().unwrap();
        let me = std::process::id() as i32;
        // Other tests fork and reap children meanwhile: vanishing tasks are skipped.
        let tree = collect(me);
        stop_tx.send(()).unwrap();
        t.join().unwrap();
        let tree = tree.unwrap();
        let st = procfs::status(me).unwrap();
        assert_eq!(tree.root, me);
        assert_eq!(tree.root_level, st.ns_pid.len() - 1);
        let root = &tree.tasks[0];
        assert_eq!(root.pid, me);
        assert_eq!(root.depth, 0);
        assert_eq!(root.vpids, vec![*st.ns_pid.last().unwrap()]);
        assert_eq!(root.state, TaskState::Alive);
        // The root's level is the test's own: each thread is [its tid].
        assert!(
            root.threads.contains(&vec![tid]),
            "{tid} not in {:?}",
            root.threads
        );
    }

    // ---- Live trees --------------------------------------------------------

    use live::{Fin, Node, Sandbox};

    /// Group or session leader of a tree process, as the test expects it.
    #[derive(Clone, Copy)]
    enum Leader {
        /// The test process's group/session (leader in the test's namespace).
        Outside(i32),
        /// A node of the tree.
        Node(usize),
    }

    fn pg_leader(spec: &[Node], t: usize) -> Leader {
        if spec[t].setsid || spec[t].setpgid {
            Leader::Node(t)
        } else if spec[t].parent == live::TOP {
            // SAFETY: getpgrp has no preconditions.
            Leader::Outside(unsafe { libc::getpgrp() })
        } else {
            pg_leader(spec, spec[t].parent)
        }
    }

    fn sid_leader(spec: &[Node], t: usize) -> Leader {
        if spec[t].setsid {
            Leader::Node(t)
        } else if spec[t].parent == live::TOP {
            // SAFETY: getsid has no preconditions.
            Leader::Outside(unsafe { libc::getsid(0) })
        } else {
            sid_leader(spec, spec[t].parent)
        }
    }

    /// The id of `leader` in namespace `ns` at absolute level `level` (0 =
    /// the test's and /proc's namespace), 0 where it has none.
    fn id_in(sb: &Sandbox, leader: Leader, ns: u64, level: usize) -> i32 {
        match leader {
            Leader::Outside(id) if level == 0 => id,
            Leader::Outside(_) => 0,
            Leader::Node(n) => sb.procs[n]
                .levels
                .iter()
                .find(|l| l.0 == ns)
                .map_or(0, |l| l.1),
        }
    }

    /// Checks the harness's own model against what each process saw from
    /// inside its namespace (getpid, getppid, getpgrp, getsid).
    fn check_inner_view(sb: &Sandbox) {
        let spec = sb.spec;
        for (t, p) in sb.procs.iter().enumerate() {
            let own = p.levels.len() - 1;
            let (ns, pid) = p.levels[own];
            assert_eq!(p.rec.pid, pid, "node {t}: getpid vs relayed pid");
            let ppid = if spec[t].parent == live::TOP {
                std::process::id() as i32
            } else {
                id_in(sb, Leader::Node(spec[t].parent), ns, own)
            };
            assert_eq!(p.rec.ppid, ppid, "node {t}: getppid");
            assert_eq!(
                p.rec.pgid,
                id_in(sb, pg_leader(spec, t), ns, own),
                "node {t}: getpgrp"
            );
            assert_eq!(
                p.rec.sid,
                id_in(sb, sid_leader(spec, t), ns, own),
                "node {t}: getsid"
            );
        }
    }

    /// The table `collect` must produce for the tree rooted at node `root`,
    /// computed from the harness's structure and the relayed pids.
    fn expected(sb: &Sandbox, root: usize) -> Vec<TaskEntry> {
        let spec = sb.spec;
        let rl = sb.procs[root].levels.len() - 1;
        let mut out = Vec::new();
        let mut stack = vec![root];
        while let Some(t) = stack.pop() {
            let levels = &sb.procs[t].levels;
            let own = levels.len() - 1;
            let vpids: Vec<i32> = levels[rl..].iter().map(|l| l.1).collect();
            let depth = (own - rl) as u32;
            let ppid = if t != root {
                sb.procs[spec[t].parent].levels[rl].1
            } else if spec[t].parent == live::TOP {
                std::process::id() as i32
            } else {
                id_in(sb, Leader::Node(spec[t].parent), levels[rl].0, rl)
            };
            let per_level = |leader| -> Vec<i32> {
                (rl..=own)
                    .map(|l| id_in(sb, leader, levels[l].0, l))
                    .collect()
            };
            let vpgids = per_level(pg_leader(spec, t));
            let vsids = per_level(sid_leader(spec, t));
            let mut threads = sb.threads[t].clone();
            threads.sort_by_key(|th| th[0].1);
            let state = match spec[t].fin {
                Fin::Stop => TaskState::Stopped,
                Fin::Exit(code) => TaskState::Zombie {
                    exit_code: code << 8,
                },
                Fin::Pause | Fin::Reap => TaskState::Alive,
            };
            out.push(TaskEntry {
                pid: levels[0].1,
                tgid: vpids[0],
                ppid,
                pgid: vpgids[0],
                sid: vsids[0],
                depth,
                vtgids: vpids.clone(),
                vpids: vpids.clone(),
                vpgids,
                vsids,
                state,
                threads: threads
                    .iter()
                    .map(|th| th[rl..].iter().map(|l| l.1).collect())
                    .collect(),
                child_subreaper: false,
                comm: std::fs::read_to_string(format!("/proc/{}/comm", levels[0].1))
                    .unwrap()
                    .trim_end()
                    .to_string(),
                pidns_init: levels[own].1 == 1 && (depth > 0 || t == root),
                pidns: levels[own].0,
            });
            let mut kids: Vec<usize> = (0..spec.len()).filter(|&k| spec[k].parent == t).collect();
            kids.sort_by_key(|&k| std::cmp::Reverse(sb.procs[k].levels[0].1));
            stack.extend(kids);
        }
        out
    }

    /// Collects the tree of node `root` and compares it, level by level,
    /// with [`expected`].
    fn check_tree(sb: &Sandbox, root: usize) -> Tree {
        let tree = collect(sb.pid(root)).unwrap();
        assert_eq!(tree.root, sb.pid(root));
        assert_eq!(tree.root_level, sb.procs[root].levels.len() - 1);
        assert_eq!(tree.tasks, expected(sb, root), "tree of node {root}");
        tree
    }

    fn entry(tree: &Tree, sb: &Sandbox, node: usize) -> TaskEntry {
        tree.get(sb.pid(node)).cloned().unwrap()
    }

    /// S (test's ns) > H (init of NS1) > A (setsid) > B (init of NS2) > {E,
    /// C (init of NS3) > D (setpgid)}: one to three nested levels, a session
    /// spanning three levels, a group leader three levels down.
    #[test]
    fn nested_namespaces_three_levels() {
        const SPEC: &[Node] = &[
            live::TOP_NODE,
            live::SANDBOX_INIT,
            Node::child_of(1).setsid(),  // 2 A
            Node::child_of(2).new_ns(),  // 3 B: init of NS2
            Node::child_of(3),           // 4 E: NS2
            Node::child_of(3).new_ns(),  // 5 C: init of NS3
            Node::child_of(5).setpgid(), // 6 D: NS3
        ];
        let sb = live::build(SPEC);
        check_inner_view(&sb);
        for root in [0, 1, 2, 3, 5, 6] {
            check_tree(&sb, root);
        }
        let from_s = check_tree(&sb, 0);
        let d = entry(&from_s, &sb, 6);
        assert_eq!(d.depth, 3);
        assert_eq!(d.vpids.len(), 4);
        assert_eq!(d.vpids[3], 2, "second task of NS3");
        assert_eq!(d.vpgids, d.vpids, "D leads its own group on every level");
        let a = entry(&from_s, &sb, 2);
        assert_eq!(
            d.vsids,
            vec![a.vpids[0], a.vpids[1], 0, 0],
            "A's session, invisible in NS2/NS3"
        );
        assert!(entry(&from_s, &sb, 1).pidns_init);
        assert!(entry(&from_s, &sb, 5).pidns_init);
        assert!(!entry(&from_s, &sb, 4).pidns_init);
        assert_eq!(from_s.children_of(sb.pid(3)), {
            let mut v = vec![sb.pid(4), sb.pid(5)];
            v.sort_unstable();
            v
        });

        let from_b = check_tree(&sb, 3);
        assert_eq!(from_b.pids().len(), 4);
        let b = entry(&from_b, &sb, 3);
        assert_eq!(
            (b.ppid, b.sid, b.vpids.clone()),
            (0, 0, vec![1]),
            "A is invisible in NS2"
        );
        assert!(b.pidns_init);
        assert_eq!(entry(&from_b, &sb, 6).depth, 1);

        let from_a = check_tree(&sb, 2);
        let root = &from_a.tasks[0];
        assert!(!root.pidns_init && root.depth == 0 && root.vpids == vec![2]);
        assert_eq!((root.sid, root.pgid), (2, 2));
    }

    /// P (NS1, own group) forks I (init of NS2) and then X and Y into NS2:
    /// two tasks of NS2 whose parent is in NS1 (CRIU's known hard case). X
    /// starts a session in NS2 with a child Z in its own group; Y stays in
    /// P's group, whose leader NS2 cannot see.
    #[test]
    fn parent_in_another_namespace() {
        const SPEC: &[Node] = &[
            live::TOP_NODE,
            live::SANDBOX_INIT,
            Node::child_of(1).setpgid(), // 2 P
            Node::child_of(2).new_ns(),  // 3 I: init of NS2
            Node::child_of(2).setsid(),  // 4 X: NS2, parent P
            Node::child_of(2),           // 5 Y: NS2, parent P
            Node::child_of(4).setpgid(), // 6 Z: X's session, own group
            Node::child_of(3),           // 7 W: child of I
        ];
        let sb = live::build(SPEC);
        check_inner_view(&sb);
        for root in [0, 1, 2, 3, 4, 6] {
            check_tree(&sb, root);
        }
        let from_h = check_tree(&sb, 1);
        let (p, x, y) = (
            entry(&from_h, &sb, 2),
            entry(&from_h, &sb, 4),
            entry(&from_h, &sb, 5),
        );
        assert_eq!(x.ppid, p.tgid);
        assert_eq!(sb.procs[4].rec.ppid, 0, "X sees no parent in NS2");
        // Subtrees are built one after the other: I (1), W (2), X (3), Z (4), Y (5).
        assert_eq!((x.depth, x.vpids[1]), (1, 3));
        assert_eq!(y.vpids[1], 5);
        assert_eq!(y.vpgids, vec![p.tgid, 0], "P's group is invisible in NS2");
        assert_eq!(x.vsids, x.vpids);
        assert!(!x.pidns_init && !y.pidns_init);
        assert_eq!(from_h.children_of(p.pid).len(), 3);

        // Rooted in NS2 at a task whose parent is outside: ppid 0.
        let from_x = check_tree(&sb, 4);
        assert_eq!(from_x.tasks.len(), 2);
        let root = &from_x.tasks[0];
        assert_eq!((root.ppid, root.depth, root.pidns_init), (0, 0, false));
        let from_i = check_tree(&sb, 3);
        assert_eq!((from_i.tasks[0].ppid, from_i.tasks.len()), (0, 2));
    }

    /// Q (NS1, 2 threads) forks from a third, non-leader thread R, the init
    /// of NS2; R has a zombie child (exit 3, not reaped), a stopped child and
    /// a 3-threaded child M with a child K.
    #[test]
    fn zombie_stopped_threads() {
        const SPEC: &[Node] = &[
            live::TOP_NODE,
            live::SANDBOX_INIT,
            Node::child_of(1).threads(2).fork_from_thread(), // 2 Q
            Node::child_of(2).new_ns(),                      // 3 R: init of NS2
            Node::child_of(3).fin(Fin::Exit(3)),             // 4 zombie
            Node::child_of(3).fin(Fin::Stop),                // 5 stopped
            Node::child_of(3).threads(3),                    // 6 M
            Node::child_of(6),                               // 7 K
        ];
        let sb = live::build(SPEC);
        check_inner_view(&sb);
        for root in [1, 2, 3, 6] {
            check_tree(&sb, root);
        }
        let from_h = check_tree(&sb, 1);
        let z = entry(&from_h, &sb, 4);
        assert_eq!(z.state, TaskState::Zombie { exit_code: 3 << 8 });
        assert_eq!((z.depth, z.vpids.len()), (1, 2));
        assert_eq!(entry(&from_h, &sb, 5).state, TaskState::Stopped);
        assert_eq!(entry(&from_h, &sb, 6).threads.len(), 3);
        assert_eq!(entry(&from_h, &sb, 2).threads.len(), 3);
        assert!(entry(&from_h, &sb, 6).threads.iter().all(|t| t.len() == 2));
        assert!(!from_h.alive().contains(&sb.pid(4)));
        assert_eq!(from_h.alive().len(), from_h.tasks.len() - 1);
        // Children of the non-leader thread were found.
        assert_eq!(from_h.children_of(sb.pid(2)), vec![sb.pid(3)]);

        let stable = collect_stable(sb.pid(1), 5).unwrap();
        assert_eq!(stable, from_h);
        let from_r = collect(sb.pid(3)).unwrap();
        let (new, gone) = diff(&from_h, &from_r);
        assert!(new.is_empty());
        assert_eq!(gone, vec![sb.pid(1), sb.pid(2)]);
    }

    /// Live trees: forked processes that build themselves from a spec and
    /// report, for every process and thread, its ids as seen from inside and
    /// its pid on every pid-namespace level.
    ///
    /// The per-level pids do not come from `/proc` (that is what is tested):
    /// each record travels up the tree over `SOCK_SEQPACKET` socketpairs with
    /// `SCM_CREDENTIALS`; every process that relays it receives the sender's
    /// pid translated by the kernel into its own pid namespace, notes it with
    /// its namespace's inode, and passes it on (as root it may send another
    /// task's pid), so the test ends up with the pid on every level.
    ///
    /// The children only make raw syscalls, `pthread_create` and stack
    /// allocations: the test process is multithreaded. The whole tree lives
    /// in a fresh pid namespace (node 1, the sandbox init), so killing that
    /// init kills everything; node 0 (in the test's namespace) reaps.
    mod live {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
        use std::time::{Duration, Instant};

        /// `parent` of the top node (forked by the test).
        pub const TOP: usize = usize::MAX;

        /// What a node does once its subtree is built.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Fin {
            /// Sleep until killed.
            Pause,
            /// `raise(SIGSTOP)` (its parent waits for the stop).
            Stop,
            /// `_exit(code)` (its parent waits with `WNOWAIT`: a zombie).
            Exit(i32),
            /// Reap children until there are none, then exit (node 0).
            Reap,
        }

        /// One process of a test tree.
        #[derive(Clone, Copy, Debug)]
        pub struct Node {
            /// Index of its parent in the spec ([`TOP`] for node 0).
            pub parent: usize,
            /// Its parent calls `unshare(CLONE_NEWPID)` just before forking
            /// it (the parent's later children land in that namespace too).
            pub unshare: bool,
            /// It calls `setsid()` first.
            pub setsid: bool,
            /// It calls `setpgid(0, 0)` first.
            pub setpgid: bool,
            /// Extra threads that just sleep.
            pub threads: usize,
            /// Its children are forked by a non-leader thread.
            pub fork_from_thread: bool,
            /// What it does at the end.
            pub fin: Fin,
        }

        impl Node {
            pub const fn child_of(parent: usize) -> Node {
                Node {
                    parent,
                    unshare: false,
                    setsid: false,
                    setpgid: false,
                    threads: 0,
                    fork_from_thread: false,
                    fin: Fin::Pause,
                }
            }
            pub const fn new_ns(self) -> Node {
                Node {
                    unshare: true,
                    ..self
                }
            }
            pub const fn setsid(self) -> Node {
                Node {
                    setsid: true,
                    ..self
                }
            }
            pub const fn setpgid(self) -> Node {
                Node {
                    setpgid: true,
                    ..self
                }
            }
            pub const fn threads(self, threads: usize) -> Node {
                Node { threads, ..self }
            }
            pub const fn fork_from_thread(self) -> Node {
                Node {
                    fork_from_thread: true,
                    ..self
                }
            }
            pub const fn fin(self, fin: Fin) -> Node {
                Node { fin, ..self }
            }
        }

        /// Node 0 of every spec: forked by the test, in its namespace; reaps.
        pub const TOP_NODE: Node = Node::child_of(TOP).fin(Fin::Reap);
        /// Node 1 of every spec: the init of a fresh namespace holding the rest.
        pub const SANDBOX_INIT: Node = Node::child_of(0).new_ns();

        const KIND_PROC: i32 = 1;
        const KIND_THREAD: i32 = 2;
        const KIND_DONE: i32 = 3;
        const KIND_ERR: i32 = 4;
        const MAX_HOPS: usize = 24;
        const STEPS: [&str; 10] = [
            "setsid",
            "setpgid",
            "unshare",
            "socketpair",
            "fork",
            "relay",
            "wait",
            "pthread_create",
            "pipe",
            "thread",
        ];

        /// A record sent up the tree.
        #[repr(C)]
        #[derive(Clone, Copy, Debug)]
        pub struct Rec {
            kind: i32,
            tag: i32,
            /// gettid() (== pid for a process record).
            pub tid: i32,
            /// getpid(), getppid(), getpgrp(), getsid(0): the inside view.
            pub pid: i32,
            pub ppid: i32,
            pub pgid: i32,
            pub sid: i32,
            step: i32,
            errno: i32,
            nhops: i32,
            hop_ns: [u64; MAX_HOPS],
            hop_pid: [i32; MAX_HOPS],
        }

        impl Rec {
            fn new(kind: i32, tag: usize) -> Rec {
                // SAFETY: these id getters have no preconditions.
                let (tid, pid, ppid, pgid, sid) = unsafe {
                    (
                        libc::gettid(),
                        libc::getpid(),
                        libc::getppid(),
                        libc::getpgrp(),
                        libc::getsid(0),
                    )
                };
                let mut rec = Rec {
                    kind,
                    tag: tag as i32,
                    tid,
                    pid,
                    ppid,
                    pgid,
                    sid,
                    step: -1,
                    errno: 0,
                    nhops: 0,
                    hop_ns: [0; MAX_HOPS],
                    hop_pid: [0; MAX_HOPS],
                };
                rec.push_hop(own_ns(), tid);
                rec
            }

            fn push_hop(&mut self, ns: u64, pid: i32) {
                let i = self.nhops as usize;
                if i < MAX_HOPS {
                    self.hop_ns[i] = ns;
                    self.hop_pid[i] = pid;
                    self.nhops += 1;
                }
            }

            /// (namespace inode, pid) on every level, outermost first.
            fn levels(&self) -> Vec<(u64, i32)> {
                let mut out: Vec<(u64, i32)> = Vec::new();
                for i in 0..self.nhops as usize {
                    let hop = (self.hop_ns[i], self.hop_pid[i]);
                    match out.last() {
                        Some(last) if last.0 == hop.0 => {
                            assert_eq!(last.1, hop.1, "one namespace, two pids: {self:?}")
                        }
                        _ => out.push(hop),
                    }
                }
                out.reverse();
                out
            }
        }

        /// The inode of the calling thread's pid namespace.
        fn own_ns() -> u64 {
            // SAFETY: a zeroed stat buffer filled by stat(2) on a C string.
            unsafe {
                let mut st: libc::stat = std::mem::zeroed();
                if libc::stat(c"/proc/thread-self/ns/pid".as_ptr(), &mut st) == 0 {
                    st.st_ino
                } else {
                    0
                }
            }
        }

        fn errno() -> i32 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        }

        /// Sends `rec` with `SCM_CREDENTIALS` naming `pid` (in the sender's
        /// namespace).
        fn send_rec(fd: RawFd, rec: &Rec, pid: i32) -> bool {
            const SPACE: usize = cmsg_space();
            let mut cbuf = [0u64; 8];
            // SAFETY: msghdr/iovec point at `rec` and `cbuf`, which outlive the
            // call; the cmsg header and data are written inside `cbuf`, which
            // is 8-aligned and larger than CMSG_SPACE(sizeof(ucred)).
            unsafe {
                let mut iov = libc::iovec {
                    iov_base: (rec as *const Rec).cast_mut().cast(),
                    iov_len: std::mem::size_of::<Rec>(),
                };
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = &mut iov;
                msg.msg_iovlen = 1;
                msg.msg_control = cbuf.as_mut_ptr().cast();
                msg.msg_controllen = SPACE;
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_CREDENTIALS;
                (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::ucred>() as u32) as usize;
                let cred = libc::ucred {
                    pid,
                    uid: libc::getuid(),
                    gid: libc::getgid(),
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::ucred>(), cred);
                libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) == std::mem::size_of::<Rec>() as isize
            }
        }

        const fn cmsg_space() -> usize {
            // SAFETY: CMSG_SPACE is pure arithmetic on its argument.
            unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::ucred>() as u32) as usize }
        }

        /// Receives a record and the sender's pid translated into our
        /// namespace. `None` on EOF or error.
        fn recv_rec(fd: RawFd) -> Option<(Rec, i32)> {
            let mut cbuf = [0u64; 8];
            // SAFETY: a zeroed Rec is valid (plain integers); msghdr points at
            // it and at `cbuf`, both outliving the call; the cmsg is read only
            // inside the length the kernel returned.
            unsafe {
                let mut rec: Rec = std::mem::zeroed();
                let mut iov = libc::iovec {
                    iov_base: (&mut rec as *mut Rec).cast(),
                    iov_len: std::mem::size_of::<Rec>(),
                };
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = &mut iov;
                msg.msg_iovlen = 1;
                msg.msg_control = cbuf.as_mut_ptr().cast();
                msg.msg_controllen = std::mem::size_of_val(&cbuf);
                let n = loop {
                    let n = libc::recvmsg(fd, &mut msg, 0);
                    if n >= 0 || errno() != libc::EINTR {
                        break n;
                    }
                };
                if n != std::mem::size_of::<Rec>() as isize {
                    return None;
                }
                let mut c = libc::CMSG_FIRSTHDR(&msg);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_SOCKET
                        && (*c).cmsg_type == libc::SCM_CREDENTIALS
                    {
                        let cred =
                            std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::ucred>());
                        return Some((rec, cred.pid));
                    }
                    c = libc::CMSG_NXTHDR(&msg, c);
                }
                None
            }
        }

        /// A SEQPACKET socketpair whose first end receives credentials.
        fn pair() -> Option<[RawFd; 2]> {
            let mut sv = [0; 2];
            let one: libc::c_int = 1;
            // SAFETY: `sv` and `one` are valid for the calls' out/in pointers.
            unsafe {
                if libc::socketpair(
                    libc::AF_UNIX,
                    libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                    0,
                    sv.as_mut_ptr(),
                ) < 0
                {
                    return None;
                }
                if libc::setsockopt(
                    sv[0],
                    libc::SOL_SOCKET,
                    libc::SO_PASSCRED,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                ) < 0
                {
                    libc::close(sv[0]);
                    libc::close(sv[1]);
                    return None;
                }
            }
            Some(sv)
        }

        /// Reports failing `step` up the tree; returns the exit code.
        fn fail(up: RawFd, tag: usize, step: usize) -> i32 {
            let e = errno();
            let mut rec = Rec::new(KIND_ERR, tag);
            rec.step = step as i32;
            rec.errno = e;
            send_rec(up, &rec, rec.tid);
            1
        }

        fn park() -> ! {
            loop {
                // SAFETY: pause has no preconditions.
                unsafe { libc::pause() };
            }
        }

        fn reap_all() {
            loop {
                let mut st = 0;
                // SAFETY: `st` is a valid out pointer.
                if unsafe { libc::waitpid(-1, &mut st, libc::__WALL) } < 0 && errno() != libc::EINTR
                {
                    return;
                }
            }
        }

        /// The body of a forked node; never returns.
        fn child_main(spec: &'static [Node], me: usize, up: RawFd) -> ! {
            let code = node_main(spec, me, up);
            if spec[me].fin == Fin::Reap {
                reap_all();
            }
            // SAFETY: _exit never returns and runs no atexit handlers.
            unsafe { libc::_exit(code) }
        }

        struct ThreadArg {
            spec: &'static [Node],
            me: usize,
            up: RawFd,
            notify: RawFd,
            builder: bool,
        }

        extern "C" fn thread_main(arg: *mut libc::c_void) -> *mut libc::c_void {
            // SAFETY: `arg` points at a ThreadArg on the stack of node_main,
            // which waits for this thread's notification before going on and
            // never returns while the thread runs (see node_main).
            let a = unsafe { &*arg.cast::<ThreadArg>() };
            let rec = Rec::new(KIND_THREAD, a.me);
            let mut ok = send_rec(a.up, &rec, rec.tid);
            if ok && a.builder {
                ok = build_children(a.spec, a.me, a.up) == 0;
            }
            let byte = [u8::from(ok)];
            // SAFETY: writes one byte from a stack buffer.
            unsafe { libc::write(a.notify, byte.as_ptr().cast(), 1) };
            park()
        }

        fn node_main(spec: &'static [Node], me: usize, up: RawFd) -> i32 {
            let n = spec[me];
            // SAFETY: prctl/setsid/setpgid/pipe/pthread_create/read/raise are
            // called with valid arguments: stack buffers and a ThreadArg that
            // outlives every thread's use of it (threads notify before this
            // function goes on, and it never returns while they run: it parks,
            // or exits the whole process).
            unsafe {
                if me == 1 {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                }
                if n.setsid && libc::setsid() < 0 {
                    return fail(up, me, 0);
                }
                if n.setpgid && libc::setpgid(0, 0) < 0 {
                    return fail(up, me, 1);
                }
                let own = Rec::new(KIND_PROC, me);
                if !send_rec(up, &own, own.pid) {
                    return 1;
                }
                let mut p = [0; 2];
                if libc::pipe(p.as_mut_ptr()) < 0 {
                    return fail(up, me, 8);
                }
                let plain = ThreadArg {
                    spec,
                    me,
                    up,
                    notify: p[1],
                    builder: false,
                };
                let builder = ThreadArg {
                    builder: true,
                    ..plain
                };
                let mut started = 0;
                for i in 0..n.threads + usize::from(n.fork_from_thread) {
                    let arg = if i < n.threads { &plain } else { &builder };
                    let mut t: libc::pthread_t = std::mem::zeroed();
                    let argp = (arg as *const ThreadArg).cast_mut().cast();
                    if libc::pthread_create(&mut t, std::ptr::null(), thread_main, argp) != 0 {
                        return fail(up, me, 7);
                    }
                    started += 1;
                }
                if !n.fork_from_thread && build_children(spec, me, up) != 0 {
                    return 1;
                }
                for _ in 0..started {
                    let mut b = [0u8; 1];
                    if libc::read(p[0], b.as_mut_ptr().cast(), 1) != 1 || b[0] != 1 {
                        return fail(up, me, 9);
                    }
                }
                let done = Rec::new(KIND_DONE, me);
                if !send_rec(up, &done, done.pid) {
                    return 1;
                }
                match n.fin {
                    Fin::Pause => park(),
                    Fin::Stop => {
                        libc::raise(libc::SIGSTOP);
                        park()
                    }
                    Fin::Exit(code) => code,
                    Fin::Reap => 0,
                }
            }
        }

        /// Forks the children of node `me` one by one, relaying each child's
        /// records up until it is done, and waiting for it to stop or exit
        /// when that is its end. Returns 0 or an exit code.
        fn build_children(spec: &'static [Node], me: usize, up: RawFd) -> i32 {
            for (c, child) in spec.iter().enumerate() {
                if child.parent != me {
                    continue;
                }
                // SAFETY: unshare/fork/close/waitpid/waitid with valid
                // arguments; the forked child only runs child_main.
                unsafe {
                    if child.unshare && libc::unshare(libc::CLONE_NEWPID) < 0 {
                        return fail(up, me, 2);
                    }
                    let Some(sv) = pair() else {
                        return fail(up, me, 3);
                    };
                    let pid = libc::fork();
                    if pid < 0 {
                        return fail(up, me, 4);
                    }
                    if pid == 0 {
                        libc::close(sv[0]);
                        libc::close(up);
                        child_main(spec, c, sv[1]);
                    }
                    libc::close(sv[1]);
                    let ok = relay(sv[0], up);
                    libc::close(sv[0]);
                    if !ok {
                        return fail(up, me, 5);
                    }
                    let mut st = 0;
                    let waited = match child.fin {
                        Fin::Stop => {
                            libc::waitpid(pid, &mut st, libc::WUNTRACED) == pid
                                && libc::WIFSTOPPED(st)
                        }
                        Fin::Exit(_) => {
                            let mut info: libc::siginfo_t = std::mem::zeroed();
                            libc::waitid(
                                libc::P_PID,
                                pid as libc::id_t,
                                &mut info,
                                libc::WEXITED | libc::WNOWAIT,
                            ) == 0
                        }
                        Fin::Pause | Fin::Reap => true,
                    };
                    if !waited {
                        return fail(up, me, 6);
                    }
                }
            }
            0
        }

        /// Passes records from a child up, adding our level, until the
        /// child's DONE. False on EOF or a failed send.
        fn relay(from: RawFd, up: RawFd) -> bool {
            let ns = own_ns();
            loop {
                let Some((mut rec, pid)) = recv_rec(from) else {
                    return false;
                };
                if rec.kind == KIND_DONE {
                    return true;
                }
                rec.push_hop(ns, pid);
                if !send_rec(up, &rec, pid) {
                    return false;
                }
            }
        }

        /// A process of a built tree.
        pub struct Proc {
            /// Its own record (inside view).
            pub rec: Rec,
            /// (pid-namespace inode, pid) on every level, outermost (the
            /// test's, which is /proc's) first.
            pub levels: Vec<(u64, i32)>,
        }

        /// A built tree; dropping it kills and reaps every process.
        pub struct Sandbox {
            pub spec: &'static [Node],
            top: i32,
            /// The sandbox init (node 1) as the test sees it, 0 until known.
            init: i32,
            /// Indexed by node.
            pub procs: Vec<Proc>,
            /// Per node, the levels of each non-leader thread.
            pub threads: Vec<Vec<Vec<(u64, i32)>>>,
        }

        impl Sandbox {
            /// Node `n`'s pid as the test (and /proc) sees it.
            pub fn pid(&self, n: usize) -> i32 {
                self.procs[n].levels[0].1
            }
        }

        impl Drop for Sandbox {
            fn drop(&mut self) {
                // Killing the sandbox init kills everything in its namespace
                // and below; node 0 then reaps and exits. Without it (early
                // failure), kill node 0: node 1 has PDEATHSIG = SIGKILL.
                let victim = if self.init > 0 { self.init } else { self.top };
                // SAFETY: kill and waitpid with a valid out pointer.
                unsafe {
                    libc::kill(victim, libc::SIGKILL);
                    let mut st = 0;
                    libc::waitpid(self.top, &mut st, 0);
                }
            }
        }

        /// Builds the tree of `spec` and returns once every node is built
        /// (panics after 10 s or on any failure in the tree).
        pub fn build(spec: &'static [Node]) -> Sandbox {
            assert!(spec.len() >= 2 && spec[0].parent == TOP && spec[1].unshare);
            let me = crate::procfs::status(std::process::id() as i32).unwrap();
            assert_eq!(
                me.ns_pid.len(),
                1,
                "the live tree tests need /proc to be of the test's own pid namespace"
            );
            let sv = pair().expect("socketpair");
            // SAFETY: fork; the child closes every fd but its socket (the
            // test process's other fds belong to other tests) and only runs
            // child_main, which never returns.
            let top = unsafe { libc::fork() };
            assert!(top >= 0, "fork failed");
            if top == 0 {
                // SAFETY: close_range on the ranges around our socket.
                unsafe {
                    libc::close(sv[0]);
                    let s = sv[1] as libc::c_uint;
                    libc::syscall(libc::SYS_close_range, 3u32, s.saturating_sub(1), 0u32);
                    libc::syscall(libc::SYS_close_range, s + 1, u32::MAX, 0u32);
                }
                child_main(spec, 0, sv[1]);
            }
            // SAFETY: sv[0] is ours alone from now on; sv[1] is the child's.
            let mine = unsafe {
                libc::close(sv[1]);
                OwnedFd::from_raw_fd(sv[0])
            };
            let mut sb = Sandbox {
                spec,
                top,
                init: 0,
                procs: Vec::new(),
                threads: vec![Vec::new(); spec.len()],
            };
            let mut procs: Vec<Option<Proc>> = (0..spec.len()).map(|_| None).collect();
            let ns = own_ns();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let mut pfd = libc::pollfd {
                    fd: mine.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) };
                assert!(r != 0, "tree not built after 10 s");
                if r < 0 {
                    continue; // EINTR
                }
                let Some((mut rec, pid)) = recv_rec(mine.as_raw_fd()) else {
                    panic!("the tree's top process went away before the tree was built");
                };
                if rec.kind == KIND_DONE {
                    break;
                }
                rec.push_hop(ns, pid);
                let tag = rec.tag as usize;
                match rec.kind {
                    KIND_PROC => {
                        let levels = rec.levels();
                        if tag == 1 {
                            // From now on the Drop kills the sandbox init.
                            sb.init = levels[0].1;
                        }
                        procs[tag] = Some(Proc { rec, levels });
                    }
                    KIND_THREAD => sb.threads[tag].push(rec.levels()),
                    _ => panic!(
                        "node {tag} failed at {}: errno {}",
                        STEPS.get(rec.step as usize).unwrap_or(&"?"),
                        rec.errno
                    ),
                }
            }
            let all: Option<Vec<Proc>> = procs.into_iter().collect();
            sb.procs = all.expect("a node did not report");
            sb
        }
    }
}
