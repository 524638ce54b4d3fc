//! What runs inside every restored task before the restorer blob: pdump's
//! own code in a single-threaded fork of the controller. It creates the
//! task's children with their ids, rebuilds sessions and groups phase by
//! phase, restores cwd/root/umask and the fds, builds the task's private
//! area (the blob, its arguments, the threads' rt_sigframes and stacks) and
//! jumps into the blob. Nothing here returns: a failure is recorded in the
//! shared area and the task exits.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::SeqCst;

use pdump_arch::{Arch, Native};
use pdump_parasite::restore::{
    madv, phase, step, CredsDesc, KSigAction, MmMap, Range, RestoreArgs, RlimitDesc, RunDesc,
    Shared, SigInfo, Span, Special, ThreadDesc, TimerDesc, TimerSpec, VmaDesc, MAX_LEVELS,
    RESTORE_PROTOCOL_VERSION, SIGINFO_BYTES, THREAD_STACK_BYTES,
};

use super::plan::PlanTask;
use super::Controller;
use crate::image::model::{ProcessImage, VmFlag, Vma, VmaKind};
use crate::image::PAGE_SIZE;

const EEXIST: i32 = 17;

/// A failure inside a task: the step, the errno and a detail.
pub(crate) struct Fail {
    step: u32,
    errno: i32,
    detail: u64,
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn fail(step: u32, detail: u64) -> Fail {
    Fail {
        step,
        errno: errno(),
        detail,
    }
}

fn check(step: u32, r: libc::c_long, detail: u64) -> Result<libc::c_long, Fail> {
    if r < 0 {
        Err(fail(step, detail))
    } else {
        Ok(r)
    }
}

/// Create a task with clone3 (fork-like: the child returns 0 on a copy of
/// this stack). Returns the child's pid as this task sees it.
pub(crate) fn clone_task(t: &PlanTask) -> Result<i32, Fail> {
    let mut flags = 0u64;
    if t.session_helper.is_some() {
        // Created by its session's helper, as a child of the helper's parent.
        flags |= libc::CLONE_PARENT as u64;
    }
    if t.newpid {
        flags |= libc::CLONE_NEWPID as u64;
    }
    let args = pdump_parasite::restore::CloneArgs {
        flags,
        // clone3 refuses one with CLONE_PARENT: the child then takes its
        // creator's own exit signal (the helper's SIGCHLD).
        exit_signal: if t.session_helper.is_some() {
            0
        } else {
            libc::SIGCHLD as u64
        },
        set_tid: t.set_tid.as_ptr() as u64,
        set_tid_size: t.set_tid.len() as u64,
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM and without a stack is fork: the child
    // continues on a private copy of this stack. The caller is single-threaded.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const _,
            std::mem::size_of_val(&args),
        )
    };
    if r < 0 {
        let e = errno();
        return Err(Fail {
            step: step::CHILDREN,
            errno: e,
            detail: t.entry.vpids.first().copied().unwrap_or(0) as u64,
        });
    }
    Ok(r as i32)
}

/// The body of every created task. Never returns.
pub(crate) fn run(ctl: &Controller, idx: usize) -> ! {
    let shared = ctl.shared();
    let r = run_inner(ctl, idx);
    let f = match r {
        Ok(never) => match never {},
        Err(f) => f,
    };
    let tid = std::process::id() as i32;
    shared.fail(idx as u32, f.step, f.errno, tid, f.detail);
    shared.counter.fetch_add(1, SeqCst);
    futex_wake(&shared.counter);
    futex_wake(&shared.phase);
    // SAFETY: _exit ends this task without running anything of the parent's.
    unsafe { libc::_exit(1) }
}

fn futex_wake(word: &std::sync::atomic::AtomicU32) {
    // SAFETY: FUTEX_WAKE on a word of the shared area; the kernel only reads it.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word as *const _,
            libc::FUTEX_WAKE,
            i32::MAX,
        )
    };
}

/// Wait until the controller announces `want`; exit on abort or if the
/// controller died.
fn wait_phase(shared: &Shared, want: u32) {
    loop {
        let p = shared.phase.load(SeqCst);
        if p == phase::ABORT || shared.guard.load(SeqCst) & 0x4000_0000 != 0 {
            // SAFETY: leaving the task; nothing else to undo.
            unsafe { libc::_exit(1) };
        }
        if p >= want {
            return;
        }
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 200_000_000,
        };
        // SAFETY: FUTEX_WAIT on a shared word with a timeout we own.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                &shared.phase as *const _,
                libc::FUTEX_WAIT,
                p,
                &ts as *const libc::timespec,
            )
        };
    }
}

fn done_phase(shared: &Shared) {
    shared.counter.fetch_add(1, SeqCst);
    futex_wake(&shared.counter);
}

enum Never {}

fn run_inner(ctl: &Controller, idx: usize) -> Result<Never, Fail> {
    let shared = ctl.shared();
    let slot = shared.slot(idx);
    let t = &ctl.plan.tasks[idx];
    // Die with the parent until the restore is done.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    // SAFETY: a full mask for this thread; nothing is unblocked again before
    // the blob's rt_sigreturn sets the dumped mask.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
    }
    slot.created.store(self_pid(), SeqCst);
    slot.step.store(step::CREATED, SeqCst);
    unregister_rseq();
    if t.setsid {
        // SAFETY: setsid has no arguments.
        check(step::CREATED, unsafe { libc::setsid() } as libc::c_long, 0)?;
    }
    if t.pgid_leader {
        // A group of its own needs nobody else: make it before the children
        // exist, so they are born in it (a leader's group cannot be joined
        // from a pid namespace below, where the leader is invisible).
        // SAFETY: setpgid with integer arguments.
        let r = unsafe { libc::setpgid(0, 0) };
        check(step::PGID, r as libc::c_long, 0)?;
    }
    slot.step.store(step::CHILDREN, SeqCst);
    let helper = match &t.pgid_helper {
        Some(ids) => Some(pgid_helper(shared, ids)?),
        None => None,
    };
    let mut session_helpers = Vec::new();
    for &c in &t.children {
        let Some(ids) = &ctl.plan.tasks[c].session_helper else {
            continue;
        };
        if session_helpers.iter().any(|(i, _)| i == ids) {
            continue;
        }
        let h = session_helper(ctl, t, ids)?;
        session_helpers.push((ids.clone(), h));
    }
    for &c in t
        .children
        .iter()
        .filter(|&&c| ctl.plan.tasks[c].session_helper.is_none())
    {
        let pid = clone_task(&ctl.plan.tasks[c])?;
        if pid == 0 {
            run(ctl, c);
        }
        // The child's pid on this task's level must be the dumped one.
        let child = &ctl.plan.tasks[c].entry;
        let want = child.vpids.get(t.entry.vpids.len() - 1).copied();
        if want.is_some_and(|w| w != pid) {
            return Err(Fail {
                step: step::CHILDREN,
                errno: EEXIST,
                detail: child.vpids[0] as u64,
            });
        }
    }
    done_phase(shared);
    wait_phase(shared, phase::PGID_LEADERS);
    slot.step.store(step::PGID, SeqCst);
    done_phase(shared);
    wait_phase(shared, phase::PGID_MEMBERS);
    // SAFETY: getpgrp has no arguments.
    if let Some(g) = t.join_pgid.filter(|&g| g != unsafe { libc::getpgrp() }) {
        // SAFETY: setpgid with integer arguments.
        let r = unsafe { libc::setpgid(0, g) };
        check(step::PGID, r as libc::c_long, g as u64)?;
    }
    done_phase(shared);
    wait_phase(shared, phase::ZOMBIES);
    for &(_, h) in &session_helpers {
        let mut st = 0;
        // SAFETY: waitpid on our own child, writing one int we own.
        let r = unsafe { libc::waitpid(h, &mut st, libc::__WALL) };
        check(step::CHILDREN, r as libc::c_long, h as u64)?;
    }
    if let Some(h) = helper {
        // Every member has joined: the helper exits; reap it (its group
        // lives on with them).
        let mut st = 0;
        // SAFETY: waitpid on our own child, writing one int we own.
        let r = unsafe { libc::waitpid(h, &mut st, libc::__WALL) };
        check(step::PGID, r as libc::c_long, h as u64)?;
    }
    if let Some(status) = t.zombie {
        slot.step.store(step::ZOMBIE, SeqCst);
        set_name(&t.entry.comm);
        exit_as_zombie(status);
    }
    wait_phase(shared, phase::RESTORE);
    let img = &ctl.ckpt.processes[t.image.expect("a live task has an image")];
    slot.step.store(step::FS, SeqCst);
    restore_fs(img)?;
    slot.step.store(step::FDS, SeqCst);
    ctl.files.install(img.pid).map_err(|_| fail(step::FDS, 0))?;
    slot.step.store(step::PREPARE, SeqCst);
    let (entry, sp, args) = prepare(ctl, idx, img)?;
    // SAFETY: `prepare` loaded the restorer at `entry` in a private area
    // with its stack below `sp` and its arguments at `args`; nothing of this
    // task's current stack is used again.
    unsafe { pdump_arch::native::syscall::jump_to_blob(entry, sp, args) }
}

/// clone3 as fork with `ids` (innermost first) as the child's pid on every
/// level: the helper's pid in the parent, 0 in the helper.
fn fork_with_ids(ids: &[i32], at: u32) -> Result<i32, Fail> {
    let args = pdump_parasite::restore::CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: ids.as_ptr() as u64,
        set_tid_size: ids.len() as u64,
        ..Default::default()
    };
    // SAFETY: clone3 as fork (no CLONE_VM, no stack); single-threaded caller.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const _,
            std::mem::size_of_val(&args),
        )
    };
    if r < 0 {
        return Err(Fail {
            step: at,
            errno: errno(),
            detail: ids.first().copied().unwrap_or(0) as u64,
        });
    }
    Ok(r as i32)
}

/// Create the helper that leads a session whose leader is gone: it takes
/// the session's ids, calls setsid, creates the children of `t` that belong
/// to that session (with CLONE_PARENT: they are `t`'s children), and exits
/// once every zombie-phase is reached. Returns its pid.
fn session_helper(ctl: &Controller, t: &PlanTask, ids: &[i32]) -> Result<i32, Fail> {
    let shared = ctl.shared();
    let r = fork_with_ids(ids, step::CHILDREN)?;
    if r > 0 {
        return Ok(r);
    }
    // SAFETY: prctl and setsid take integers.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::setsid() < 0 {
            libc::_exit(1);
        }
    }
    for &c in &t.children {
        if ctl.plan.tasks[c].session_helper.as_deref() != Some(ids) {
            continue;
        }
        match clone_task(&ctl.plan.tasks[c]) {
            Ok(0) => run(ctl, c),
            Ok(_) => {}
            Err(f) => {
                let tid = std::process::id() as i32;
                shared.fail(c as u32, f.step, f.errno, tid, f.detail);
                futex_wake(&shared.counter);
                // SAFETY: leaving the helper.
                unsafe { libc::_exit(1) };
            }
        }
    }
    wait_phase(shared, phase::ZOMBIES);
    // SAFETY: as above.
    unsafe { libc::_exit(0) }
}

/// Create the helper that makes a group whose leader is gone: it takes the
/// group's ids, makes its group, and exits once the members joined (the
/// controller announced ZOMBIES). Returns its pid.
fn pgid_helper(shared: &Shared, ids: &[i32]) -> Result<i32, Fail> {
    let r = fork_with_ids(ids, step::PGID)?;
    if r == 0 {
        // SAFETY: prctl and setpgid take integers; _exit ends the helper.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::setpgid(0, 0) != 0 {
                libc::_exit(1);
            }
        }
        wait_phase(shared, phase::ZOMBIES);
        // SAFETY: as above.
        unsafe { libc::_exit(0) };
    }
    // Make the group from this side too, so that it exists before any
    // member tries to join it, however late the helper gets to run.
    // SAFETY: setpgid on our own child, which has not exec'd.
    let g = unsafe { libc::setpgid(r, r) };
    check(step::PGID, g as libc::c_long, r as u64)?;
    Ok(r)
}

/// This task's pid as the controller sees it (the /proc mount's namespace).
fn self_pid() -> i32 {
    std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

/// glibc registers an rseq area in its TLS, which the blob unmaps: the
/// kernel would write into it at the next preemption. Unregister it.
fn unregister_rseq() {
    extern "C" {
        static __rseq_offset: isize;
        static __rseq_size: u32;
    }
    // SAFETY: glibc (2.35+) exports both as read-only after start-up.
    let (off, size) = unsafe { (__rseq_offset, __rseq_size) };
    if size == 0 {
        return;
    }
    let tp: u64;
    // SAFETY: reading the thread pointer has no side effects.
    unsafe {
        #[cfg(target_arch = "x86_64")]
        std::arch::asm!("mov {}, fs:0", out(reg) tp);
        #[cfg(target_arch = "aarch64")]
        std::arch::asm!("mrs {}, tpidr_el0", out(reg) tp);
    }
    let area = (tp as i64 + off as i64) as u64;
    const RSEQ_SIG: u32 = if cfg!(target_arch = "x86_64") {
        0x5305_3053
    } else {
        0xd428_bc00
    };
    for len in [32u32, size, 1024] {
        // SAFETY: unregistering names the area glibc registered; the kernel
        // checks it matches and otherwise fails without effect.
        let r = unsafe { libc::syscall(libc::SYS_rseq, area, len, 1, RSEQ_SIG) };
        if r == 0 {
            return;
        }
    }
}

/// PR_SET_NAME: the kernel takes up to 15 bytes and a NUL.
fn set_name(comm: &str) {
    let mut name = [0u8; 16];
    let b = comm.as_bytes();
    let n = b.len().min(15);
    name[..n].copy_from_slice(&b[..n]);
    // SAFETY: prctl reads a NUL-terminated string of at most 16 bytes we own.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
}

fn exit_as_zombie(status: i32) -> ! {
    let sig = status & 0x7f;
    if sig != 0 {
        // SAFETY: a zombie-to-be kills itself with its recorded signal: no
        // core dump, default action, signal unblocked.
        unsafe {
            libc::prctl(libc::PR_SET_DUMPABLE, 0);
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::syscall(
                libc::SYS_tgkill,
                libc::getpid(),
                libc::syscall(libc::SYS_gettid),
                sig,
            );
        }
    }
    // SAFETY: exit_group with the recorded code.
    unsafe { libc::syscall(libc::SYS_exit_group, (status >> 8) & 0xff) };
    unreachable!("exit_group returned")
}

fn cstr(s: &str) -> CString {
    CString::new(s.as_bytes()).unwrap_or_default()
}

fn restore_fs(img: &ProcessImage) -> Result<(), Fail> {
    if !img.root.is_empty() && img.root != "/" {
        let r = cstr(&img.root);
        // SAFETY: a NUL-terminated path.
        let r = unsafe { libc::chroot(r.as_ptr()) };
        check(step::FS, r as libc::c_long, 0)?;
    }
    if !img.cwd.is_empty() {
        let c = cstr(&img.cwd);
        // SAFETY: a NUL-terminated path.
        let r = unsafe { libc::chdir(c.as_ptr()) };
        check(step::FS, r as libc::c_long, 1)?;
    }
    // SAFETY: umask and personality take integers.
    unsafe {
        libc::umask(img.umask as libc::mode_t);
        libc::personality(img.personality as libc::c_ulong);
    }
    Ok(())
}

/// A bump allocator over the task's private area.
struct Area {
    base: u64,
    len: u64,
    used: u64,
}

impl Area {
    fn alloc(&mut self, size: u64, align: u64) -> Result<u64, Fail> {
        let at = (self.base + self.used + align - 1) & !(align - 1);
        if at + size > self.base + self.len {
            return Err(Fail {
                step: step::PREPARE,
                errno: libc::ENOMEM,
                detail: size,
            });
        }
        self.used = at + size - self.base;
        Ok(at)
    }

    fn put<T: Copy>(&mut self, v: &[T]) -> Result<Span, Fail> {
        let size = std::mem::size_of_val(v) as u64;
        let at = self.alloc(size.max(1), std::mem::align_of::<T>().max(8) as u64)?;
        // SAFETY: `at` is inside the area (checked by alloc), aligned for T,
        // and the area is mapped read-write by this task.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), at as *mut T, v.len()) };
        Ok(Span {
            ptr: at,
            len: v.len() as u64,
        })
    }
}

/// Move an fd at or above `base` (out of the way of the restored fds).
fn high_fd(fd: i32, base: i32) -> Result<i32, Fail> {
    // SAFETY: fcntl/close on an fd this task owns.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, base) };
    // SAFETY: as above.
    unsafe { libc::close(fd) };
    if n < 0 {
        return Err(fail(step::PREPARE, fd as u64));
    }
    Ok(n)
}

fn open_high(path: &str, flags: i32, base: i32, what: u64) -> Result<i32, Fail> {
    let p = cstr(path);
    // SAFETY: a NUL-terminated path.
    let fd = unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(fail(step::PREPARE, what));
    }
    high_fd(fd, base)
}

fn is_special(k: &VmaKind) -> bool {
    matches!(k, VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock)
}

fn madv_bits(v: &Vma) -> u32 {
    [
        (VmFlag::DontCopy, madv::DONTFORK),
        (VmFlag::WipeOnFork, madv::WIPEONFORK),
        (VmFlag::DontDump, madv::DONTDUMP),
        (VmFlag::HugePage, madv::HUGEPAGE),
        (VmFlag::NoHugePage, madv::NOHUGEPAGE),
    ]
    .into_iter()
    .filter(|&(f, _)| v.vm_flags.contains(f))
    .fold(0, |m, (_, bit)| m | bit)
}

fn ns_to_spec(interval_ns: u64, value_ns: u64, frac_div: u64) -> TimerSpec {
    TimerSpec {
        interval_sec: (interval_ns / 1_000_000_000) as i64,
        interval_frac: ((interval_ns % 1_000_000_000) / frac_div) as i64,
        value_sec: (value_ns / 1_000_000_000) as i64,
        value_frac: ((value_ns % 1_000_000_000) / frac_div) as i64,
    }
}

fn siginfos(list: &[Vec<u8>]) -> Vec<SigInfo> {
    list.iter()
        .map(|b| {
            let mut bytes = [0u8; SIGINFO_BYTES];
            let n = b.len().min(SIGINFO_BYTES);
            bytes[..n].copy_from_slice(&b[..n]);
            SigInfo { bytes }
        })
        .collect()
}

/// Build the private area and return (entry, stack top, args address).
fn prepare(ctl: &Controller, idx: usize, img: &ProcessImage) -> Result<(u64, u64, u64), Fail> {
    let t = &ctl.plan.tasks[idx];
    let base_fd = ctl.files.base();
    let blob = &crate::blob::RESTORER;
    let nthreads = img.threads.len().max(1) as u64;
    let fp_len = img
        .threads
        .iter()
        .map(|t| t.fpregs.len())
        .max()
        .unwrap_or(0);
    let frame_bytes = (Native::frame_size(fp_len) as u64 + 128 + 63) & !63;
    let blob_bytes = (blob.mem_size as u64 + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
    let nruns: u64 = img.vmas.iter().map(|v| v.pages.len() as u64).sum();
    let auxv_bytes = (img.auxv.len() as u64 + 1) * 16;
    let arrays = std::mem::size_of::<RestoreArgs>() as u64
        + img.vmas.len() as u64 * (std::mem::size_of::<VmaDesc>() as u64 + 16)
        + nruns * std::mem::size_of::<RunDesc>() as u64
        + nthreads * std::mem::size_of::<ThreadDesc>() as u64
        + img
            .threads
            .iter()
            .map(|t| t.pending.len() as u64)
            .sum::<u64>()
            * 128
        + img.shared_pending.len() as u64 * 128
        + img.posix_timers.len() as u64 * std::mem::size_of::<TimerDesc>() as u64
        + img.rlimits.len() as u64 * 24
        + img.creds.groups.len() as u64 * 4
        + auxv_bytes
        + 64 * 1024;
    let cur = own_maps()?;
    let len = (blob_bytes
        + arrays
        + nthreads * (frame_bytes + THREAD_STACK_BYTES as u64 + 64)
        + PAGE_SIZE
        - 1)
        & !(PAGE_SIZE - 1);
    // The area must avoid the dumped mappings and what is mapped now.
    let mut avoid: Vec<(u64, u64)> = img.vmas.iter().map(|v| (v.start, v.end)).collect();
    avoid.extend(cur.iter().map(|v| (v.start, v.end)));
    avoid.push((ctl.shared_addr, ctl.shared_addr + ctl.shared_len));
    let addr = map_hole(
        len,
        &avoid,
        libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
    )?;
    avoid.push((addr, addr + len));
    let mut area = Area {
        base: addr,
        len,
        used: 0,
    };
    // The blob, relocated for this address.
    // SAFETY: the area was just mapped read-write for `len >= blob_bytes` bytes.
    let dst = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, blob.mem_size) };
    blob.load_into(dst, addr);
    area.used = blob_bytes;
    let args_addr = area.alloc(std::mem::size_of::<RestoreArgs>() as u64, 64)?;

    // Current mappings to remove, specials to move.
    let mut unmap = Vec::new();
    let mut specials = Vec::new();
    for v in &cur {
        if v.kind == VmaKind::Vsyscall {
            continue;
        }
        if (v.start >= addr && v.end <= addr + len)
            || (v.start >= ctl.shared_addr && v.end <= ctl.shared_addr + ctl.shared_len)
        {
            continue;
        }
        if is_special(&v.kind) {
            let target = img.vmas.iter().find(|d| d.kind == v.kind).ok_or(Fail {
                step: step::VDSO,
                errno: libc::ENOENT,
                detail: v.start,
            })?;
            if target.end - target.start != v.end - v.start {
                return Err(Fail {
                    step: step::VDSO,
                    errno: libc::EINVAL,
                    detail: target.start,
                });
            }
            specials.push(Special {
                cur: v.start,
                len: v.end - v.start,
                target: target.start,
            });
            continue;
        }
        unmap.push(Range {
            start: v.start,
            end: v.end,
        });
    }
    let special_len: u64 = specials.iter().map(|s| s.len).sum();
    let mut avoid2 = avoid.clone();
    avoid2.extend(specials.iter().map(|s| (s.target, s.target + s.len)));
    let scratch = find_hole(special_len.max(PAGE_SIZE), &avoid2)?;

    // Mappings, files, pages.
    let pages_fd = match ctl.ckpt.pages(img) {
        Ok(Some(p)) => {
            // SAFETY: dup of an fd the reader owns.
            let fd = unsafe { libc::dup(p.file().as_raw_fd()) };
            if fd < 0 {
                return Err(fail(step::PREPARE, 0));
            }
            high_fd(fd, base_fd)?
        }
        Ok(None) => -1,
        Err(_) => {
            return Err(Fail {
                step: step::PREPARE,
                errno: libc::EIO,
                detail: 0,
            })
        }
    };
    let mut files: Vec<(String, bool, i32)> = Vec::new();
    let mut vmas = Vec::new();
    let mut runs = Vec::new();
    for v in &img.vmas {
        if is_special(&v.kind) || v.kind == VmaKind::Vsyscall {
            continue;
        }
        let mut flags = if v.shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        } as u64;
        if v.vm_flags.contains(VmFlag::GrowsDown) {
            flags |= libc::MAP_GROWSDOWN as u64;
        }
        if v.vm_flags.contains(VmFlag::NoReserve) {
            flags |= libc::MAP_NORESERVE as u64;
        }
        let mut fd = -1;
        let mut fill = !v.pages.is_empty();
        let path = v.path.as_deref().unwrap_or("");
        let (name, deleted) = crate::procfs::strip_deleted(path);
        match v.kind {
            VmaKind::File if !deleted => {
                let write = v.shared && v.prot & libc::PROT_WRITE as u32 != 0;
                fd = match files.iter().find(|(p, w, _)| p == name && *w == write) {
                    Some(&(_, _, fd)) => fd,
                    None => {
                        let f = open_high(
                            name,
                            if write { libc::O_RDWR } else { libc::O_RDONLY },
                            base_fd,
                            v.start,
                        )?;
                        files.push((name.to_string(), write, f));
                        f
                    }
                };
                if v.shared {
                    fill = false;
                }
            }
            VmaKind::Shmem | VmaKind::File if v.shared => {
                fd = match ctl.shmem_fd(v.inode) {
                    Some(fd) => fd,
                    None => {
                        return Err(Fail {
                            step: step::PREPARE,
                            errno: libc::ENOENT,
                            detail: v.start,
                        })
                    }
                };
                fill = false;
            }
            VmaKind::File => {
                // A private mapping of an unlinked file: its pages that were
                // never written are gone with the file.
                return Err(Fail {
                    step: step::PREPARE,
                    errno: libc::ENOENT,
                    detail: v.start,
                });
            }
            _ => {
                flags |= libc::MAP_ANONYMOUS as u64;
            }
        }
        let prot = v.prot;
        let map_prot = if fill {
            prot | (libc::PROT_READ | libc::PROT_WRITE) as u32
        } else {
            prot
        };
        vmas.push(VmaDesc {
            start: v.start,
            end: v.end,
            flags,
            pgoff: if fd >= 0 { v.offset } else { 0 },
            prot,
            map_prot,
            fd,
            madv: madv_bits(v),
        });
        if fill {
            for r in &v.pages {
                // Zero runs were present pages: the restorer writes their
                // zeros (in an anonymous mapping too, so that they are
                // present again, as the dumped task had them).
                let zero = crate::restore::run_is_zero(r);
                runs.push(RunDesc {
                    addr: r.addr,
                    len: r.npages * PAGE_SIZE,
                    file_off: crate::image::PAGES_DATA_OFFSET + r.offset,
                    zero: zero as u32,
                    _pad: 0,
                });
            }
        }
    }
    vmas.sort_by_key(|v| v.start);

    // The exe link and the mm bounds.
    let (exe_name, exe_deleted) = crate::procfs::strip_deleted(&img.exe);
    // The kernel refuses to switch /proc/PID/exe away from a file still
    // mapped; when the task runs pdump's own binary it is already right.
    let same_exe = {
        use std::os::unix::fs::MetadataExt;
        match (
            std::fs::metadata(exe_name),
            std::fs::metadata("/proc/self/exe"),
        ) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    };
    let exe_fd = if !exe_deleted && !exe_name.is_empty() && !same_exe {
        open_high(exe_name, libc::O_RDONLY, base_fd, 0).unwrap_or(-1)
    } else {
        -1
    };
    let mut auxv: Vec<u64> = img.auxv.iter().flat_map(|&(k, v)| [k, v]).collect();
    auxv.extend([0, 0]);
    let auxv_span = area.put(&auxv)?;
    let m = &img.mm;
    let mm = MmMap {
        start_code: m.start_code,
        end_code: m.end_code,
        start_data: m.start_data,
        end_data: m.end_data,
        start_brk: m.start_brk,
        brk: m.brk,
        start_stack: m.start_stack,
        arg_start: m.arg_start,
        arg_end: m.arg_end,
        env_start: m.env_start,
        env_end: m.env_end,
        auxv: auxv_span.ptr,
        auxv_size: (auxv.len() * 8) as u32,
        exe_fd: exe_fd as u32,
    };
    let set_mm = (m.start_code != 0 || m.end_code != 0) as u32;

    // Signal actions.
    let mut sigactions = [KSigAction::default(); 64];
    let mut sigaction_mask = 0u64;
    for (i, a) in img.sigactions.iter().enumerate().take(64) {
        let sig = i + 1;
        if sig == libc::SIGKILL as usize || sig == libc::SIGSTOP as usize {
            continue;
        }
        sigactions[i] = KSigAction {
            handler: a.handler,
            flags: a.flags,
            restorer: a.restorer,
            mask: a.mask,
        };
        sigaction_mask |= 1 << i;
    }
    let mut itimers = [TimerSpec::default(); 3];
    for (i, t) in img.itimers.iter().enumerate().take(3) {
        itimers[i] = ns_to_spec(t.interval_ns, t.value_ns, 1000);
    }
    let mut timers = Vec::new();
    for pt in &img.posix_timers {
        let mut sigev = [0u8; 64];
        sigev[..8].copy_from_slice(&pt.sigev_value.to_le_bytes());
        sigev[8..12].copy_from_slice(&pt.signo.to_le_bytes());
        let notify: i32 = match pt.notify.as_str() {
            "signal" => libc::SIGEV_SIGNAL,
            "none" => libc::SIGEV_NONE,
            "thread" => libc::SIGEV_SIGNAL | libc::SIGEV_THREAD_ID,
            _ => libc::SIGEV_SIGNAL,
        };
        let notify = if pt.notify_tid != 0 && pt.notify == "thread" {
            notify
        } else {
            notify & !libc::SIGEV_THREAD_ID
        };
        sigev[12..16].copy_from_slice(&notify.to_le_bytes());
        // The target thread, on the task's own level.
        let tid = own_tid(ctl, t, img, pt.notify_tid);
        sigev[16..20].copy_from_slice(&tid.to_le_bytes());
        timers.push(TimerDesc {
            id: pt.id,
            clock: pt.clock,
            sigev,
            value: ns_to_spec(pt.value.interval_ns, pt.value.value_ns, 1),
        });
    }
    let rlimits: Vec<RlimitDesc> = img
        .rlimits
        .iter()
        .filter(|l| {
            let mut cur = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit writes one struct we own.
            unsafe { libc::getrlimit(l.resource as _, &mut cur) };
            cur.rlim_cur != l.soft || cur.rlim_max != l.hard
        })
        .map(|l| RlimitDesc {
            resource: l.resource as u64,
            cur: l.soft,
            max: l.hard,
        })
        .collect();
    let creds = creds_desc(&mut area, img)?;

    // Threads: descriptors, frames, stacks.
    let mut descs = Vec::new();
    let entry_threads = &t.entry.threads;
    for (i, th) in img.threads.iter().enumerate() {
        let levels: Vec<i32> = entry_threads
            .iter()
            .find(|l| l.first() == Some(&th.tid))
            .or_else(|| entry_threads.get(i))
            .cloned()
            .unwrap_or_else(|| vec![th.tid]);
        let mut set_tid = [0i32; MAX_LEVELS];
        for (k, id) in levels.iter().rev().enumerate().take(MAX_LEVELS) {
            set_tid[k] = *id;
        }
        let mut regs = Native::gpr_from_words(&th.gpr);
        Native::restart_in_new_task(&mut regs);
        let frame = area.alloc(frame_bytes, 64)?;
        // SAFETY: the frame lies inside the writable area (alloc checked it).
        let buf = unsafe { std::slice::from_raw_parts_mut(frame as *mut u8, frame_bytes as usize) };
        Native::build_frame(
            buf,
            frame,
            &regs,
            th.sigmask,
            pdump_arch::AltStack {
                sp: th.altstack.sp,
                flags: th.altstack.flags,
                size: th.altstack.size,
            },
            &th.fpregs,
        )
        .map_err(|_| Fail {
            step: step::PREPARE,
            errno: libc::EINVAL,
            detail: th.tid as u64,
        })?;
        let stack = area.alloc(THREAD_STACK_BYTES as u64, 64)?;
        let pending = area.put(&siginfos(&th.pending))?;
        let (rseq, rseq_len, rseq_sig) = match th.rseq {
            Some(r) if r.abi_pointer != 0 => (r.abi_pointer, r.abi_size, r.signature),
            _ => (0, 0, 0),
        };
        descs.push(ThreadDesc {
            set_tid,
            nlevels: levels.len() as u32,
            leader: (i == 0) as u32,
            frame,
            stack_top: stack + THREAD_STACK_BYTES as u64,
            tls: Native::tls_words(&regs),
            rseq,
            rseq_len,
            rseq_sig,
            pending,
            args: args_addr,
            clear_tid: th.clear_tid,
            comm: {
                let mut c = [0u8; 16];
                let b = th.comm.as_bytes();
                let n = b.len().min(15);
                c[..n].copy_from_slice(&b[..n]);
                c
            },
        });
    }
    let args = RestoreArgs {
        version: RESTORE_PROTOCOL_VERSION,
        task: idx as u32,
        shared: ctl.shared_addr,
        shared_len: ctl.shared_len,
        area: addr,
        area_len: len,
        unmap: area.put(&unmap)?,
        specials: area.put(&specials)?,
        scratch,
        vmas: area.put(&vmas)?,
        runs: area.put(&runs)?,
        pages_fd,
        set_mm,
        mm,
        sigactions,
        sigaction_mask,
        itimers,
        timers: area.put(&timers)?,
        shared_pending: area.put(&siginfos(&img.shared_pending))?,
        rlimits: area.put(&rlimits)?,
        threads: area.put(&descs)?,
        threads_ready: std::sync::atomic::AtomicU32::new(0),
        creds,
        close_from: base_fd as u32,
        _pad: 0,
    };
    // SAFETY: `args_addr` was allocated in the area for one RestoreArgs.
    unsafe { std::ptr::write(args_addr as *mut RestoreArgs, args) };
    let slot = ctl.shared().slot(idx);
    slot.area.store(addr, SeqCst);
    slot.area_len.store(len, SeqCst);
    let leader_stack = descs.first().map(|d| d.stack_top).unwrap_or(0);
    Ok((addr, leader_stack, args_addr))
}

/// The id of dumped thread `tid` (dumper level) on the task's own level.
fn own_tid(ctl: &Controller, t: &PlanTask, img: &ProcessImage, tid: i32) -> i32 {
    let _ = (ctl, img);
    t.entry
        .threads
        .iter()
        .find(|l| l.first() == Some(&tid))
        .and_then(|l| l.last().copied())
        .unwrap_or(tid)
}

fn creds_desc(area: &mut Area, img: &ProcessImage) -> Result<CredsDesc, Fail> {
    let c = &img.creds;
    let mut d = CredsDesc {
        set: 0,
        no_new_privs: c.no_new_privs as u32,
        uid: c.uid,
        gid: c.gid,
        groups: area.put(&c.groups)?,
        // [inh, prm, eff, bnd, amb] -> [eff, prm, inh]
        caps: [c.caps[2], c.caps[1], c.caps[0]],
    };
    if c.seccomp != 0 {
        return Err(Fail {
            step: step::CREDS,
            errno: libc::EOPNOTSUPP,
            detail: c.seccomp as u64,
        });
    }
    // Only when they differ from the controller's (the common case is equal).
    let me = crate::procfs::status_self().ok();
    let same = me.is_some_and(|s| {
        s.uid == c.uid && s.gid == c.gid && s.groups == c.groups && s.caps[..3] == c.caps[..3]
    });
    if !same || c.no_new_privs {
        d.set = 1;
    }
    Ok(d)
}

/// `/proc/self/maps`, parsed.
fn own_maps() -> Result<Vec<Vma>, Fail> {
    crate::procfs::maps_self().map_err(|_| Fail {
        step: step::PREPARE,
        errno: libc::EINVAL,
        detail: 0,
    })
}

fn overlaps(a: (u64, u64), list: &[(u64, u64)]) -> bool {
    list.iter().any(|&(s, e)| a.0 < e && s < a.1)
}

/// A free range of `len` bytes outside every range in `avoid`, searched
/// down from high user addresses.
pub(crate) fn find_hole(len: u64, avoid: &[(u64, u64)]) -> Result<u64, Fail> {
    // Below the 47-bit user limit (vsyscall sits far above it).
    const TOP: u64 = 0x7fff_0000_0000;
    let mut ends: Vec<u64> = avoid
        .iter()
        .map(|&(s, _)| s)
        .filter(|&s| s <= TOP)
        .collect();
    ends.push(TOP);
    ends.sort_unstable();
    ends.dedup();
    for &e in ends.iter().rev() {
        if e < len + 0x1000_0000 {
            continue;
        }
        let start = (e - len) & !(PAGE_SIZE - 1);
        if !overlaps((start, start + len), avoid) {
            return Ok(start);
        }
    }
    Err(Fail {
        step: step::PREPARE,
        errno: libc::ENOMEM,
        detail: len,
    })
}

/// Map `len` bytes of private anonymous memory at a hole.
pub(crate) fn map_hole(len: u64, avoid: &[(u64, u64)], prot: i32) -> Result<u64, Fail> {
    let at = find_hole(len, avoid)?;
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
    let p = unsafe {
        libc::mmap(
            at as *mut libc::c_void,
            len as usize,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(fail(step::PREPARE, at));
    }
    Ok(p as u64)
}
