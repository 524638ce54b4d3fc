//! Restore: `pdump restore DIR` brings a dumped tree back with the same pids
//! on every pid-namespace level.
//!
//! The controller (this process, single-threaded while it forks) reads and
//! checks the images, plans the tree ([`plan`]), opens every file object the
//! tree uses, maps a shared area and creates the root with clone3. Every
//! task then runs [`task`]'s code: it creates its own children (clone3 with
//! a `set_tid` array: its pid on every level at once), takes part in the
//! session/group phases, restores its fs state and fds, and jumps into the
//! restorer blob, which rebuilds the address space and per-process state,
//! creates the threads and waits at the barrier. The controller seizes every
//! thread there, opens the barrier, lets each thread return through
//! `rt_sigreturn` into its dumped registers, unmaps the blob's area and the
//! shared area from every task with one remote syscall each, and detaches:
//! the whole tree resumes together.
//!
//! Any failure (a pid taken, a missing file, a failing syscall in the blob,
//! a task that died) kills every task created so far; the error names the
//! task and the step.

pub mod plan;
mod task;

pub use crate::restore_files as files;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use pdump_arch::{Arch, Native};
use pdump_parasite::restore::{phase, step, Shared, TaskSlot};

use crate::image::model::{PageRun, VmaKind};
use crate::image::{Checkpoint, PAGE_SIZE};
use crate::ptrace::{Seized, Stop};
use files::{FileOptions, FileTable};
use plan::Plan;

/// How to restore.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// Keep the caller's session and process group, and give the tree the
    /// caller's stdin/stdout/stderr where the root's were outside the tree.
    pub shell_job: bool,
    /// External objects mapped to fds of this process (`pipe:[INODE]` -> fd).
    pub inherit: Vec<(String, RawFd)>,
    /// Restore even if a regular file's size changed since the dump.
    pub allow_size_change: bool,
    /// Skip checking every page run's CRC32C before creating anything.
    pub no_verify: bool,
}

/// A restored tree.
#[derive(Clone, Debug)]
pub struct Restored {
    /// The root's pid (in this process's pid namespace); it is our child.
    pub root_pid: i32,
    /// Every restored task, in tree order (zombies included).
    pub pids: Vec<i32>,
}

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The images are for another architecture.
    #[error("{dir}: the checkpoint is for {found}, this is {here}")]
    Arch {
        /// Directory.
        dir: PathBuf,
        /// The images' arch.
        found: String,
        /// Ours.
        here: &'static str,
    },
    /// The tree cannot be rebuilt as dumped.
    #[error("{dir}: cannot plan the tree")]
    Plan {
        /// Directory.
        dir: PathBuf,
        /// Cause.
        #[source]
        source: plan::PlanError,
    },
    /// A pid the tree needs is in use.
    #[error("pid {pid} (task {task} of the checkpoint) is already in use: stop that process or restore elsewhere")]
    PidTaken {
        /// The pid in use.
        pid: i32,
        /// The dumped task that needs it.
        task: i32,
    },
    /// Opening the tree's files failed.
    #[error("restoring the checkpoint's files")]
    Files(#[source] files::FilesError),
    /// Shared memory could not be rebuilt.
    #[error("pid {pid}: shared memory at {addr:#x} (inode {inode}): {what}")]
    Shmem {
        /// Task.
        pid: i32,
        /// Mapping start.
        addr: u64,
        /// Inode of the object.
        inode: u64,
        /// What failed.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A controller-side syscall failed.
    #[error("restore: {op}")]
    Sys {
        /// The operation.
        op: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A task failed at a step.
    #[error("task {pid} failed while {step} (tid {tid}, detail {detail:#x})")]
    Task {
        /// The dumped pid.
        pid: i32,
        /// The step.
        step: &'static str,
        /// The thread that failed.
        tid: i32,
        /// The address / signal / pid involved.
        detail: u64,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// A task died during the restore.
    #[error("task {pid} (pid {seen}) died while {step}")]
    Died {
        /// The dumped pid.
        pid: i32,
        /// Its pid here.
        seen: i32,
        /// The step it was at.
        step: &'static str,
    },
    /// Nothing happened for too long.
    #[error("restore stalled in phase {phase}: {done} of {want} tasks done after {secs} s")]
    Stalled {
        /// Phase.
        phase: u32,
        /// Tasks done.
        done: u32,
        /// Tasks expected.
        want: u32,
        /// Seconds waited.
        secs: u64,
    },
    /// Seizing or resuming the restored threads failed.
    #[error("task {pid}: the final resume")]
    Resume {
        /// The task.
        pid: i32,
        /// Cause.
        #[source]
        source: crate::ptrace::PtraceError,
    },
    /// A remote syscall in a restored task failed.
    #[error("task {pid}: unmapping the restorer")]
    Remote {
        /// The task.
        pid: i32,
        /// Cause.
        #[source]
        source: crate::remote::RemoteError,
    },
    /// Unmapping the restorer from a task failed.
    #[error("task {pid}: unmapping the restorer at {addr:#x} returned {ret}")]
    Unmap {
        /// The task.
        pid: i32,
        /// Address.
        addr: u64,
        /// Raw result.
        ret: i64,
    },
}

fn sys_err(op: &'static str) -> RestoreError {
    RestoreError::Sys {
        op,
        source: std::io::Error::last_os_error(),
    }
}

/// Whether a page run holds no data (all zero pages, [`PageRun::zero`]).
pub(crate) fn run_is_zero(r: &PageRun) -> bool {
    r.zero
}

/// Everything the tasks share with the controller (they are its forks).
pub(crate) struct Controller {
    pub(crate) ckpt: Checkpoint,
    pub(crate) plan: Plan,
    pub(crate) files: FileTable,
    pub(crate) shared_addr: u64,
    pub(crate) shared_len: u64,
    shmem: Vec<(u64, OwnedFd)>,
}

impl Controller {
    pub(crate) fn shared(&self) -> &Shared {
        // SAFETY: mapped for the controller's whole life (and inherited by
        // every task at the same address), initialised before any fork.
        unsafe { &*(self.shared_addr as *const Shared) }
    }

    pub(crate) fn shmem_fd(&self, inode: u64) -> Option<RawFd> {
        self.shmem
            .iter()
            .find(|(i, _)| *i == inode)
            .map(|(_, f)| f.as_raw_fd())
            .or_else(|| self.files.memfd(inode))
    }

    fn slot(&self, i: usize) -> &TaskSlot {
        self.shared().slot(i)
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        // SAFETY: the area was mapped by `restore` with this length.
        unsafe {
            libc::munmap(
                self.shared_addr as *mut libc::c_void,
                self.shared_len as usize,
            )
        };
    }
}

/// Restore the checkpoint in `opts.dir`. On success the tree runs and the
/// root is a child of this process.
pub fn restore(opts: &RestoreOptions) -> crate::Result<Restored> {
    let ckpt = Checkpoint::open(&opts.dir)?;
    if !opts.no_verify {
        ckpt.verify_pages()?;
    }
    if ckpt.inventory.arch != Native::NAME {
        return Err(RestoreError::Arch {
            dir: opts.dir.clone(),
            found: ckpt.inventory.arch.clone(),
            here: Native::NAME,
        }
        .into());
    }
    let pids: Vec<i32> = ckpt.processes.iter().map(|p| p.pid).collect();
    let plan = Plan::new(&ckpt.inventory.tree, &pids, opts.shell_job).map_err(|source| {
        RestoreError::Plan {
            dir: opts.dir.clone(),
            source,
        }
    })?;
    check_pids_free(&plan)?;
    let mut fopts = FileOptions {
        allow_size_change: opts.allow_size_change,
        inherit: opts.inherit.clone(),
    };
    if opts.shell_job {
        add_stdio_inherits(&ckpt, &mut fopts);
    }
    let files = FileTable::open(&ckpt, &fopts).map_err(RestoreError::Files)?;
    let shmem = shmem_objects(&ckpt, files.base())?;
    let n = plan.tasks.len();
    let shared_len = (Shared::size(n) as u64 + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
    let mut avoid: Vec<(u64, u64)> = ckpt
        .processes
        .iter()
        .flat_map(|p| p.vmas.iter().map(|v| (v.start, v.end)))
        .collect();
    if let Ok(own) = crate::procfs::maps_self() {
        avoid.extend(own.iter().map(|v| (v.start, v.end)));
    }
    let at = task::find_hole(shared_len, &avoid).map_err(|_| RestoreError::Sys {
        op: "find room for the shared area",
        source: std::io::Error::from_raw_os_error(libc::ENOMEM),
    })?;
    // SAFETY: MAP_FIXED_NOREPLACE never replaces a mapping; the area is ours.
    let p = unsafe {
        libc::mmap(
            at as *mut libc::c_void,
            shared_len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(sys_err("mmap the shared area").into());
    }
    // SAFETY: fresh zeroed memory of at least `Shared::size(n)` bytes; the
    // header's other fields are atomics whose zero value is valid.
    unsafe { (*(p as *mut Shared)).ntasks = n as u32 };
    let ctl = Controller {
        ckpt,
        plan,
        files,
        shared_addr: p as u64,
        shared_len,
        shmem,
    };
    let guard = crate::infect::guard::hold(&ctl.shared().guard, &ctl.shared().guard_entry);
    let r = run_controller(&ctl);
    drop(guard);
    match r {
        Ok(restored) => Ok(restored),
        Err(e) => {
            abort(&ctl);
            Err(e.into())
        }
    }
}

/// With `--shell-job`, the root's fds 0-2 that lead outside the tree (a
/// pipe to the caller, say) become the caller's own 0-2.
fn add_stdio_inherits(ckpt: &Checkpoint, fopts: &mut FileOptions) {
    let Some(root) = ckpt.processes.first() else {
        return;
    };
    for e in root.fds.iter().filter(|e| e.fd <= 2) {
        let kind = match &e.kind {
            crate::image::model::FdKind::Shared { file_id } => ckpt
                .inventory
                .files
                .iter()
                .find(|f| f.id == *file_id)
                .map(|f| f.kind.clone())
                .unwrap_or_default(),
            k => k.clone(),
        };
        if let crate::image::model::FdKind::Pipe { inode, .. } = kind {
            let key = format!("pipe:[{inode}]");
            if !fopts.inherit.iter().any(|(k, _)| *k == key) {
                fopts.inherit.push((key, e.fd));
            }
        }
    }
}

fn check_pids_free(plan: &Plan) -> Result<(), RestoreError> {
    if plan.tasks.first().is_some_and(|t| t.newpid) {
        return Ok(()); // every fixed id is inside a namespace we create
    }
    for t in &plan.tasks {
        let ids = std::iter::once(t.entry.vpids[0])
            .chain(t.entry.threads.iter().filter_map(|l| l.first().copied()));
        for pid in ids {
            // A task of a just-killed tree may still be waiting to be reaped.
            let start = Instant::now();
            while proc_state(pid) == 'Z' && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(2));
            }
            if Path::new(&format!("/proc/{pid}")).exists() {
                return Err(RestoreError::PidTaken {
                    pid,
                    task: t.entry.pid,
                });
            }
        }
    }
    Ok(())
}

/// Shared anonymous memory (and SysV/`/dev/zero` shared mappings): one
/// memfd per object, filled from the first task that dumped its pages.
fn shmem_objects(ckpt: &Checkpoint, base: RawFd) -> Result<Vec<(u64, OwnedFd)>, RestoreError> {
    let mut out: Vec<(u64, OwnedFd)> = Vec::new();
    for p in &ckpt.processes {
        for v in p.vmas.iter().filter(|v| {
            v.shared
                && (v.kind == VmaKind::Shmem
                    || (v.kind == VmaKind::File
                        && v.path.as_deref().is_some_and(|s| s.ends_with(" (deleted)"))))
        }) {
            let err = |what: &str| RestoreError::Shmem {
                pid: p.pid,
                addr: v.start,
                inode: v.inode,
                what: what.into(),
                source: std::io::Error::last_os_error(),
            };
            let fd = match out.iter().find(|(i, _)| *i == v.inode) {
                Some((_, f)) => f.as_raw_fd(),
                None => {
                    // SAFETY: memfd_create with a constant name.
                    let raw =
                        unsafe { libc::memfd_create(c"pdump-shmem".as_ptr(), libc::MFD_CLOEXEC) };
                    if raw < 0 {
                        return Err(err("memfd_create"));
                    }
                    // SAFETY: fcntl/close on the fd we just created.
                    let high = unsafe {
                        let h = libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, base);
                        libc::close(raw);
                        h
                    };
                    if high < 0 {
                        return Err(err("move the memfd"));
                    }
                    // SAFETY: a new fd only we hold.
                    out.push((v.inode, unsafe { OwnedFd::from_raw_fd(high) }));
                    high
                }
            };
            let end = v.offset + (v.end - v.start);
            // SAFETY: fstat into a struct we own.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            unsafe { libc::fstat(fd, &mut st) };
            if (st.st_size as u64) < end {
                // SAFETY: ftruncate on our memfd.
                if unsafe { libc::ftruncate(fd, end as i64) } < 0 {
                    return Err(err("ftruncate"));
                }
            }
            if v.pages.is_empty() {
                continue;
            }
            let pages = match ckpt.pages(p) {
                Ok(Some(r)) => r,
                _ => continue,
            };
            for r in &v.pages {
                if run_is_zero(r) {
                    continue;
                }
                let data = pages.read_run(r).map_err(|e| RestoreError::Shmem {
                    pid: p.pid,
                    addr: r.addr,
                    inode: v.inode,
                    what: e.to_string(),
                    source: std::io::Error::from_raw_os_error(libc::EIO),
                })?;
                let off = v.offset + (r.addr - v.start);
                use std::os::unix::fs::FileExt;
                // SAFETY: borrow the memfd as a File without taking ownership.
                let f = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
                f.write_all_at(&data, off).map_err(|_| err("write pages"))?;
            }
        }
    }
    Ok(out)
}

fn futex_wait(word: &std::sync::atomic::AtomicU32, val: u32, ms: u64) {
    let ts = libc::timespec {
        tv_sec: (ms / 1000) as i64,
        tv_nsec: ((ms % 1000) * 1_000_000) as i64,
    };
    // SAFETY: FUTEX_WAIT on a shared word with a timeout we own.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word as *const _,
            libc::FUTEX_WAIT,
            val,
            &ts as *const libc::timespec,
        )
    };
}

fn futex_wake(word: &std::sync::atomic::AtomicU32) {
    // SAFETY: FUTEX_WAKE on a shared word.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word as *const _,
            libc::FUTEX_WAKE,
            i32::MAX,
        )
    };
}

fn set_phase(ctl: &Controller, p: u32) {
    let s = ctl.shared();
    s.counter.store(0, SeqCst);
    s.phase.store(p, SeqCst);
    futex_wake(&s.phase);
}

/// The scheduler state of a pid here ('?' if gone).
fn proc_state(pid: i32) -> char {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').and_then(|i| s[i + 2..].chars().next()))
        .unwrap_or('?')
}

fn task_error(ctl: &Controller) -> RestoreError {
    let s = ctl.shared();
    let i = s.fail_task.load(SeqCst) as usize;
    let pid = ctl.plan.tasks.get(i).map(|t| t.entry.pid).unwrap_or(-1);
    let errno = s.fail_errno.load(SeqCst);
    let st = s.fail_step.load(SeqCst);
    let detail = s.fail_detail.load(SeqCst);
    if st == step::CHILDREN && errno == libc::EEXIST {
        return RestoreError::PidTaken {
            pid: detail as i32,
            task: detail as i32,
        };
    }
    RestoreError::Task {
        pid,
        step: step::name(st),
        tid: s.fail_tid.load(SeqCst),
        detail,
        source: std::io::Error::from_raw_os_error(errno),
    }
}

/// Wait until `want` tasks reported the current phase; watch for failures
/// and dead tasks.
fn wait_counter(ctl: &Controller, want: u32) -> Result<(), RestoreError> {
    let s = ctl.shared();
    let start = Instant::now();
    let mut last = 0;
    let mut last_change = Instant::now();
    loop {
        if s.failed.load(SeqCst) != 0 {
            return Err(task_error(ctl));
        }
        let c = s.counter.load(SeqCst);
        if c >= want {
            return Ok(());
        }
        if c != last {
            last = c;
            last_change = Instant::now();
        }
        check_alive(ctl)?;
        if last_change.elapsed() > Duration::from_secs(60) {
            return Err(RestoreError::Stalled {
                phase: s.phase.load(SeqCst),
                done: c,
                want,
                secs: start.elapsed().as_secs(),
            });
        }
        futex_wait(&s.counter, c, 50);
    }
}

fn check_alive(ctl: &Controller) -> Result<(), RestoreError> {
    let zombies_done = ctl.shared().phase.load(SeqCst) >= phase::ZOMBIES;
    for (i, t) in ctl.plan.tasks.iter().enumerate() {
        let pid = ctl.slot(i).created.load(SeqCst);
        if pid <= 0 || (t.zombie.is_some() && zombies_done) {
            continue;
        }
        let st = proc_state(pid);
        if st == 'Z' || st == 'X' || st == '?' {
            if ctl.shared().failed.load(SeqCst) != 0 {
                return Err(task_error(ctl));
            }
            return Err(RestoreError::Died {
                pid: t.entry.pid,
                seen: pid,
                step: step::name(ctl.slot(i).step.load(SeqCst)),
            });
        }
    }
    Ok(())
}

fn run_controller(ctl: &Controller) -> Result<Restored, RestoreError> {
    let n = ctl.plan.tasks.len() as u32;
    let root = match task::clone_task(&ctl.plan.tasks[0]) {
        Ok(0) => task::run(ctl, 0),
        Ok(pid) => pid,
        Err(_) => {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EEXIST) {
                return Err(RestoreError::PidTaken {
                    pid: ctl.plan.tasks[0].entry.vpids[0],
                    task: ctl.plan.tasks[0].entry.pid,
                });
            }
            return Err(RestoreError::Sys {
                op: "clone3 the root",
                source: e,
            });
        }
    };
    ctl.slot(0).created.store(root, SeqCst);
    crate::fault::point();
    wait_counter(ctl, n)?;
    crate::fault::point();
    set_phase(ctl, phase::PGID_LEADERS);
    wait_counter(ctl, n)?;
    crate::fault::point();
    set_phase(ctl, phase::PGID_MEMBERS);
    wait_counter(ctl, n)?;
    crate::fault::point();
    set_phase(ctl, phase::ZOMBIES);
    // Every zombie must be one before the others restore their signal
    // state (which drops the SIGCHLD its exit queued).
    let start = Instant::now();
    for (i, t) in ctl.plan.tasks.iter().enumerate() {
        if t.zombie.is_none() {
            continue;
        }
        let pid = ctl.slot(i).created.load(SeqCst);
        while proc_state(pid) != 'Z' {
            if ctl.shared().failed.load(SeqCst) != 0 {
                return Err(task_error(ctl));
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(RestoreError::Died {
                    pid: t.entry.pid,
                    seen: pid,
                    step: "becoming a zombie",
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let live: Vec<usize> = ctl.plan.live().collect();
    crate::fault::point();
    set_phase(ctl, phase::RESTORE);
    wait_counter(ctl, live.len() as u32)?;
    crate::fault::point();
    finish(ctl, &live)?;
    Ok(Restored {
        root_pid: root,
        pids: (0..ctl.plan.tasks.len())
            .map(|i| ctl.slot(i).created.load(SeqCst))
            .collect(),
    })
}

const PTRACE_GET_SYSCALL_INFO: libc::c_uint = 0x420e;

/// The syscall-stop kind (1 entry, 2 exit) and the entry's number.
fn syscall_info(tid: i32) -> (u8, u64) {
    let mut buf = [0u64; 11];
    // SAFETY: the kernel writes at most the size we pass into our buffer.
    let r = unsafe {
        libc::ptrace(
            PTRACE_GET_SYSCALL_INFO,
            tid,
            std::mem::size_of_val(&buf),
            buf.as_mut_ptr(),
        )
    };
    if r < 0 {
        return (0, 0);
    }
    ((buf[0] & 0xff) as u8, buf[3])
}

/// Run a traced thread until it has returned from `rt_sigreturn`.
fn run_to_sigreturn(s: &Seized, pid: i32, tid: i32) -> Result<(), RestoreError> {
    let err = |source| RestoreError::Resume { pid, source };
    let mut in_sigreturn = false;
    loop {
        s.cont_syscall(tid).map_err(err)?;
        match crate::ptrace::wait_stop(tid).map_err(err)? {
            Stop::Syscall => {
                let (op, nr) = syscall_info(tid);
                if op == 1 {
                    in_sigreturn = nr == Native::NR_RT_SIGRETURN;
                } else if op == 2 && in_sigreturn {
                    return Ok(());
                }
            }
            Stop::Exited { status } => {
                return Err(err(crate::ptrace::PtraceError::Died { tid, status }))
            }
            _ => {}
        }
    }
}

/// Unmap `ranges` from a restored task (its leader stopped after its
/// `rt_sigreturn`) with the dump's remote-syscall machinery: a syscall stub
/// swapped into its text and a cure frame below its stack pointer, so that
/// if pdump dies halfway the thread returns into its restored registers on
/// its own.
fn unmap_remote(s: &Seized, pid: i32, ranges: &[(u64, u64)]) -> Result<(), RestoreError> {
    let err = |source: crate::remote::RemoteError| RestoreError::Remote { pid, source };
    let snap = crate::remote::ThreadSnapshot::take(s, pid)
        .map_err(|source| RestoreError::Resume { pid, source })?;
    let stub = crate::remote::Stub::install(s).map_err(err)?;
    let mut rt = crate::remote::RemoteThread::begin(s, &stub, &snap).map_err(err)?;
    for &(addr, len) in ranges {
        let ret = rt.syscall(munmap_nr(), &[addr, len]).map_err(err)?;
        if ret != 0 {
            return Err(RestoreError::Unmap { pid, addr, ret });
        }
    }
    rt.end().map_err(err)?;
    stub.remove().map_err(err)?;
    Ok(())
}

/// The barrier: seize every thread, let them return into their registers,
/// unmap the restorer and the shared area, detach them all.
fn finish(ctl: &Controller, live: &[usize]) -> Result<(), RestoreError> {
    let mut seized = Vec::new();
    for &i in live {
        let pid = ctl.slot(i).created.load(SeqCst);
        let s = Seized::seize(pid).map_err(|source| RestoreError::Resume {
            pid: ctl.plan.tasks[i].entry.pid,
            source,
        })?;
        seized.push((i, pid, s));
    }
    crate::fault::point();
    set_phase(ctl, phase::GO);
    for (_, pid, s) in &seized {
        for t in s.threads() {
            run_to_sigreturn(s, *pid, t.tid)?;
        }
    }
    for (i, pid, s) in &seized {
        let slot = ctl.slot(*i);
        unmap_remote(
            s,
            *pid,
            &[
                (ctl.shared_addr, ctl.shared_len),
                (slot.area.load(SeqCst), slot.area_len.load(SeqCst)),
            ],
        )?;
        if ctl.plan.tasks[*i].stopped {
            // SAFETY: kill with a pid we created; the stop takes effect when
            // the task is detached.
            unsafe { libc::kill(*pid, libc::SIGSTOP) };
        }
    }
    let mut stopped = Vec::new();
    for (i, pid, s) in seized {
        let _ = s.detach();
        if ctl.plan.tasks[i].stopped {
            stopped.push(pid);
        }
    }
    // Return only once the stopped tasks are (the SIGSTOP acts on detach).
    let start = Instant::now();
    while stopped.iter().any(|&p| proc_state(p) != 'T') && start.elapsed() < Duration::from_secs(2)
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

fn munmap_nr() -> u64 {
    pdump_arch::native::syscall::nr::MUNMAP
}

/// Kill everything created so far and wait until it is gone.
fn abort(ctl: &Controller) {
    let s = ctl.shared();
    s.phase.store(phase::ABORT, SeqCst);
    futex_wake(&s.phase);
    let pids: Vec<i32> = (0..ctl.plan.tasks.len())
        .map(|i| ctl.slot(i).created.load(SeqCst))
        .filter(|&p| p > 0)
        .collect();
    for &p in &pids {
        // SAFETY: kill with pids this restore created.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    if let Some(&root) = pids.first() {
        let mut st = 0;
        // SAFETY: reap our own child.
        unsafe { libc::waitpid(root, &mut st, libc::__WALL) };
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5)
        && pids.iter().any(|&p| !matches!(proc_state(p), '?'))
    {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Wait for the restored root (our child) and return its wait status.
pub fn wait_root(pid: i32) -> std::io::Result<i32> {
    let mut st = 0;
    loop {
        // SAFETY: waitpid writes one int we own.
        let r = unsafe { libc::waitpid(pid, &mut st, 0) };
        if r == pid {
            return Ok(st);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}
