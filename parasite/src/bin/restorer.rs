//! The restorer: runs in every restored task after pdump's own code has set
//! up its fds and built this task's private area. It replaces the address
//! space with the dumped one, restores the process-wide state, creates the
//! threads with their ids on every pid-namespace level, waits with every
//! thread of the tree at the barrier and returns each thread into its
//! dumped registers through `rt_sigreturn`.
//!
//! Any failure is recorded in the shared area (task, step, errno) and the
//! task exits; the controller then kills everything it created. No
//! allocation, no std, no floating point.
#![no_std]
#![no_main]
#![deny(clippy::undocumented_unsafe_blocks)]

use core::sync::atomic::Ordering::SeqCst;

use pdump_arch::native::syscall::{clone3_thread, nr, set_tls, sigreturn, syscall6};
use pdump_parasite::restore::{
    madv, phase, step, CloneArgs, KSigAction, Range, RestoreArgs, RlimitDesc, RunDesc, Shared,
    SigInfo, Special, ThreadDesc, TimerDesc, VmaDesc,
};

pdump_arch::blob_entry!(restorer_main);

const MAP_FIXED: u64 = 0x10;
const MREMAP_MAYMOVE: u64 = 1;
const MREMAP_FIXED: u64 = 2;
const FUTEX_WAIT: u64 = 0;
const FUTEX_WAKE: u64 = 1;
const FUTEX_OWNER_DIED: u32 = 0x4000_0000;
const EINTR: i64 = 4;
const EAGAIN: i64 = 11;
const ETIMEDOUT: i64 = 110;
const PR_SET_PDEATHSIG: u64 = 1;
const PR_SET_NAME: u64 = 15;
const PR_SET_KEEPCAPS: u64 = 8;
const PR_SET_MM: u64 = 35;
const PR_SET_MM_MAP: u64 = 14;
const PR_SET_NO_NEW_PRIVS: u64 = 38;
const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
const SIG_IGN: u64 = 1;
const SIGKILL: u64 = 9;
const SIGSTOP: u64 = 19;
const CLONE_VM: u64 = 0x100;
const CLONE_FS: u64 = 0x200;
const CLONE_FILES: u64 = 0x400;
const CLONE_SIGHAND: u64 = 0x800;
const CLONE_THREAD: u64 = 0x10000;
const CLONE_SYSVSEM: u64 = 0x40000;
const MADV_DONTFORK: u64 = 10;
const MADV_DONTDUMP: u64 = 16;
const MADV_WIPEONFORK: u64 = 18;
const MADV_HUGEPAGE: u64 = 14;
const MADV_NOHUGEPAGE: u64 = 15;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[inline(always)]
fn sys(n: u64, a: &[u64]) -> i64 {
    let mut args = [0u64; 6];
    args[..a.len()].copy_from_slice(a);
    // SAFETY: every call site passes pointers into the task's private area or
    // the shared area (both kept mapped for the blob's whole life), addresses
    // of mappings it creates, or plain integers.
    unsafe { syscall6(n, args) }
}

/// A slice of `T` from a span the host built in the area.
fn items<T>(s: pdump_parasite::restore::Span) -> &'static [T] {
    if s.len == 0 {
        return &[];
    }
    // SAFETY: the host wrote `len` properly aligned `T`s at `ptr` inside the
    // task's private area, which stays mapped while the blob runs.
    unsafe { core::slice::from_raw_parts(s.ptr as *const T, s.len as usize) }
}

struct Ctx {
    args: &'static RestoreArgs,
    shared: &'static Shared,
}

impl Ctx {
    fn at(&self, s: u32) {
        self.shared
            .slot(self.args.task as usize)
            .step
            .store(s, SeqCst);
    }

    /// Record the failure and leave: the controller kills the tree.
    fn fail(&self, s: u32, ret: i64, detail: u64) -> ! {
        let tid = sys(nr::GETTID, &[]) as i32;
        self.shared
            .fail(self.args.task, s, (-ret) as i32, tid, detail);
        self.shared.counter.fetch_add(1, SeqCst);
        wake(&self.shared.counter);
        wake(&self.shared.phase);
        sys(nr::EXIT_GROUP, &[1]);
        loop {
            core::hint::spin_loop();
        }
    }

    fn check(&self, s: u32, ret: i64, detail: u64) -> i64 {
        if ret < 0 {
            self.fail(s, ret, detail);
        }
        ret
    }
}

fn wake(word: &core::sync::atomic::AtomicU32) {
    sys(
        nr::FUTEX,
        &[word as *const _ as u64, FUTEX_WAKE, i32::MAX as u64],
    );
}

/// Wait until the controller announces `want` (or more). Exits if the
/// controller died (its guard turned owner-dead) or the restore aborted.
fn wait_phase(ctx: &Ctx, want: u32) {
    let ts: [i64; 2] = [0, 200_000_000];
    loop {
        let p = ctx.shared.phase.load(SeqCst);
        if p == phase::ABORT {
            sys(nr::EXIT_GROUP, &[1]);
        }
        if p >= want {
            return;
        }
        if ctx.shared.guard.load(SeqCst) & FUTEX_OWNER_DIED != 0 {
            sys(nr::EXIT_GROUP, &[1]);
        }
        let r = sys(
            nr::FUTEX,
            &[
                &ctx.shared.phase as *const _ as u64,
                FUTEX_WAIT,
                p as u64,
                ts.as_ptr() as u64,
            ],
        );
        if r < 0 && r != -EINTR && r != -EAGAIN && r != -ETIMEDOUT {
            ctx.fail(step::BARRIER, r, 0);
        }
    }
}

/// Read exactly `len` bytes at `off` of `fd` into `addr`.
fn pread_all(ctx: &Ctx, fd: i32, mut addr: u64, mut len: u64, mut off: u64) {
    while len > 0 {
        let r = sys(nr::PREAD64, &[fd as u64, addr, len, off]);
        if r == -EINTR {
            continue;
        }
        if r <= 0 {
            ctx.fail(step::PAGES, if r == 0 { -5 } else { r }, addr);
        }
        addr += r as u64;
        off += r as u64;
        len -= r as u64;
    }
}

fn zero(addr: u64, len: u64) {
    // SAFETY: the range lies in a mapping this blob just created writable.
    unsafe { core::ptr::write_bytes(addr as *mut u8, 0, len as usize) };
}

#[no_mangle]
extern "C" fn restorer_main(args: *const RestoreArgs) -> ! {
    // SAFETY: the host jumped here with the address of the args it built in
    // this task's private area, which stays mapped while the blob runs.
    let args: &'static RestoreArgs = unsafe { &*args };
    // SAFETY: the shared area was mapped by the controller before the fork and
    // is kept mapped (never in the unmap list).
    let shared: &'static Shared = unsafe { &*(args.shared as *const Shared) };
    let ctx = Ctx { args, shared };

    // 1. Remove pdump: every old mapping but this area, the shared area and
    //    the special mappings (moved next).
    ctx.at(step::UNMAP);
    for r in items::<Range>(args.unmap) {
        ctx.check(
            step::UNMAP,
            sys(nr::MUNMAP, &[r.start, r.end - r.start]),
            r.start,
        );
    }
    // 2. vdso, vvar, vvar_vclock to their dumped addresses, through a
    //    scratch range so that no move lands on one not yet moved.
    ctx.at(step::VDSO);
    let specials = items::<Special>(args.specials);
    let mut off = 0;
    for s in specials {
        let tmp = args.scratch + off;
        ctx.check(
            step::VDSO,
            sys(
                nr::MREMAP,
                &[s.cur, s.len, s.len, MREMAP_MAYMOVE | MREMAP_FIXED, tmp],
            ),
            s.cur,
        );
        off += s.len;
    }
    off = 0;
    for s in specials {
        let tmp = args.scratch + off;
        if tmp != s.target {
            ctx.check(
                step::VDSO,
                sys(
                    nr::MREMAP,
                    &[tmp, s.len, s.len, MREMAP_MAYMOVE | MREMAP_FIXED, s.target],
                ),
                s.target,
            );
        }
        off += s.len;
    }
    // 3. Every mapping, writable where pages go.
    ctx.at(step::MAP);
    let vmas = items::<VmaDesc>(args.vmas);
    for v in vmas {
        let r = sys(
            nr::MMAP,
            &[
                v.start,
                v.end - v.start,
                v.map_prot as u64,
                v.flags | MAP_FIXED,
                v.fd as u64,
                v.pgoff,
            ],
        );
        ctx.check(step::MAP, r, v.start);
    }
    // 4. Pages: one read from the image straight into place.
    ctx.at(step::PAGES);
    for r in items::<RunDesc>(args.runs) {
        if r.zero != 0 {
            zero(r.addr, r.len);
        } else {
            pread_all(&ctx, args.pages_fd, r.addr, r.len, r.file_off);
        }
    }
    // 5. Final protections and madvise flags.
    ctx.at(step::PROTECT);
    for v in vmas {
        let len = v.end - v.start;
        if v.map_prot != v.prot {
            ctx.check(
                step::PROTECT,
                sys(nr::MPROTECT, &[v.start, len, v.prot as u64]),
                v.start,
            );
        }
        for (bit, advice) in [
            (madv::DONTFORK, MADV_DONTFORK),
            (madv::WIPEONFORK, MADV_WIPEONFORK),
            (madv::DONTDUMP, MADV_DONTDUMP),
            (madv::HUGEPAGE, MADV_HUGEPAGE),
            (madv::NOHUGEPAGE, MADV_NOHUGEPAGE),
        ] {
            if v.madv & bit != 0 {
                ctx.check(
                    step::PROTECT,
                    sys(nr::MADVISE, &[v.start, len, advice]),
                    v.start,
                );
            }
        }
    }
    // 6. mm bounds (brk, arg/env, auxv) and /proc/PID/exe.
    ctx.at(step::MM);
    if args.set_mm != 0 {
        let mm = &args.mm;
        ctx.check(
            step::MM,
            sys(
                nr::PRCTL,
                &[
                    PR_SET_MM,
                    PR_SET_MM_MAP,
                    mm as *const _ as u64,
                    core::mem::size_of_val(mm) as u64,
                ],
            ),
            0,
        );
    }
    // 7. Signal actions; setting SIG_IGN first drops whatever pdump's own
    //    code left pending (a zombie child's SIGCHLD, say).
    ctx.at(step::SIGACTIONS);
    for sig in 1..=64u64 {
        if sig == SIGKILL || sig == SIGSTOP || args.sigaction_mask & (1 << (sig - 1)) == 0 {
            continue;
        }
        let ign = KSigAction {
            handler: SIG_IGN,
            ..KSigAction::default()
        };
        ctx.check(
            step::SIGACTIONS,
            sys(nr::RT_SIGACTION, &[sig, &ign as *const _ as u64, 0, 8]),
            sig,
        );
        let act = &args.sigactions[(sig - 1) as usize];
        ctx.check(
            step::SIGACTIONS,
            sys(nr::RT_SIGACTION, &[sig, act as *const _ as u64, 0, 8]),
            sig,
        );
    }
    // 8. itimers.
    ctx.at(step::ITIMERS);
    for (which, t) in args.itimers.iter().enumerate() {
        if t.value_sec != 0 || t.value_frac != 0 || t.interval_sec != 0 || t.interval_frac != 0 {
            ctx.check(
                step::ITIMERS,
                sys(nr::SETITIMER, &[which as u64, t as *const _ as u64, 0]),
                which as u64,
            );
        }
    }
    // 9. Threads, each with its ids on every level.
    ctx.at(step::THREADS);
    let threads = items::<ThreadDesc>(args.threads);
    for t in threads.iter().filter(|t| t.leader == 0) {
        let ca = CloneArgs {
            flags: CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM,
            stack: t.stack_top - STACK_BYTES,
            stack_size: STACK_BYTES,
            set_tid: t.set_tid.as_ptr() as u64,
            set_tid_size: t.nlevels as u64,
            ..CloneArgs::default()
        };
        // SAFETY: `ca` is a complete clone_args with this thread's own stack
        // in the private area; `thread_main` never returns.
        let r = unsafe {
            clone3_thread(
                &ca as *const _ as u64,
                core::mem::size_of::<CloneArgs>() as u64,
                thread_main,
                t as *const ThreadDesc as u64,
            )
        };
        ctx.check(step::THREADS, r, t.set_tid[0] as u64);
    }
    // 10. POSIX timers with their ids (the threads they may target exist now).
    ctx.at(step::TIMERS);
    let timers = items::<TimerDesc>(args.timers);
    if !timers.is_empty() {
        ctx.check(
            step::TIMERS,
            sys(nr::PRCTL, &[PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0]),
            0,
        );
        for t in timers {
            let mut id: i32 = t.id;
            ctx.check(
                step::TIMERS,
                sys(
                    nr::TIMER_CREATE,
                    &[
                        t.clock as u64,
                        t.sigev.as_ptr() as u64,
                        &mut id as *mut i32 as u64,
                    ],
                ),
                t.id as u64,
            );
            if id != t.id {
                ctx.fail(step::TIMERS, -17, t.id as u64);
            }
            ctx.check(
                step::TIMERS,
                sys(
                    nr::TIMER_SETTIME,
                    &[id as u64, 0, &t.value as *const _ as u64, 0],
                ),
                t.id as u64,
            );
        }
        ctx.check(
            step::TIMERS,
            sys(nr::PRCTL, &[PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0]),
            0,
        );
    }
    // 11. Resource limits.
    ctx.at(step::RLIMITS);
    for l in items::<RlimitDesc>(args.rlimits) {
        ctx.check(
            step::RLIMITS,
            sys(
                nr::PRLIMIT64,
                &[0, l.resource, &l.cur as *const u64 as u64, 0],
            ),
            l.resource,
        );
    }
    // 12. Signals pending for the whole process (all signals are blocked).
    ctx.at(step::PENDING);
    let pid = sys(nr::GETPID, &[]) as u64;
    for si in items::<SigInfo>(args.shared_pending) {
        let sig = si.bytes[0] as u64;
        ctx.check(
            step::PENDING,
            sys(nr::RT_SIGQUEUEINFO, &[pid, sig, si.bytes.as_ptr() as u64]),
            sig,
        );
    }
    // No fd of pdump's survives; the parent's death no longer matters.
    sys(
        nr::CLOSE_RANGE,
        &[args.close_from as u64, u32::MAX as u64, 0],
    );
    sys(nr::PRCTL, &[PR_SET_PDEATHSIG, 0]);
    let leader = threads
        .iter()
        .find(|t| t.leader != 0)
        .unwrap_or_else(|| ctx.fail(step::THREADS, -22, 0));
    finish_thread(&ctx, leader)
}

/// Bytes of every blob thread's stack (the host reserves them).
const STACK_BYTES: u64 = pdump_parasite::restore::THREAD_STACK_BYTES as u64;

extern "C" fn thread_main(desc: u64) -> ! {
    // SAFETY: the leader passed the address of this thread's descriptor in
    // the private area.
    let t: &'static ThreadDesc = unsafe { &*(desc as *const ThreadDesc) };
    // SAFETY: the host stored the address of the task's args in every
    // descriptor; both live in the private area.
    let args: &'static RestoreArgs = unsafe { &*(t.args as *const RestoreArgs) };
    // SAFETY: as in `restorer_main`.
    let shared: &'static Shared = unsafe { &*(args.shared as *const Shared) };
    finish_thread(&Ctx { args, shared }, t)
}

/// Per-thread state, the barrier, and the return into the dumped registers.
fn finish_thread(ctx: &Ctx, t: &ThreadDesc) -> ! {
    let args = ctx.args;
    // Credentials are per thread for raw syscalls: every thread sets its own.
    let c = &args.creds;
    if c.set != 0 {
        let keep = c.uid[1] != 0;
        if keep {
            ctx.check(step::CREDS, sys(nr::PRCTL, &[PR_SET_KEEPCAPS, 1]), 0);
        }
        let groups = items::<u32>(c.groups);
        ctx.check(
            step::CREDS,
            sys(nr::SETGROUPS, &[groups.len() as u64, c.groups.ptr]),
            0,
        );
        ctx.check(
            step::CREDS,
            sys(
                nr::SETRESGID,
                &[c.gid[0] as u64, c.gid[1] as u64, c.gid[2] as u64],
            ),
            c.gid[1] as u64,
        );
        sys(nr::SETFSGID, &[c.gid[3] as u64]);
        ctx.check(
            step::CREDS,
            sys(
                nr::SETRESUID,
                &[c.uid[0] as u64, c.uid[1] as u64, c.uid[2] as u64],
            ),
            c.uid[1] as u64,
        );
        sys(nr::SETFSUID, &[c.uid[3] as u64]);
        let hdr: [u32; 2] = [LINUX_CAPABILITY_VERSION_3, 0];
        let data: [u32; 6] = [
            c.caps[0] as u32,
            c.caps[1] as u32,
            c.caps[2] as u32,
            (c.caps[0] >> 32) as u32,
            (c.caps[1] >> 32) as u32,
            (c.caps[2] >> 32) as u32,
        ];
        ctx.check(
            step::CREDS,
            sys(nr::CAPSET, &[hdr.as_ptr() as u64, data.as_ptr() as u64]),
            0,
        );
        if keep {
            sys(nr::PRCTL, &[PR_SET_KEEPCAPS, 0]);
        }
        if c.no_new_privs != 0 {
            ctx.check(
                step::CREDS,
                sys(nr::PRCTL, &[PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0]),
                0,
            );
        }
    }
    if t.clear_tid != 0 {
        sys(nr::SET_TID_ADDRESS, &[t.clear_tid]);
    }
    if t.comm[0] != 0 {
        sys(nr::PRCTL, &[PR_SET_NAME, t.comm.as_ptr() as u64]);
    }
    if t.rseq != 0 {
        ctx.check(
            step::RSEQ,
            sys(nr::RSEQ, &[t.rseq, t.rseq_len as u64, 0, t.rseq_sig as u64]),
            t.rseq,
        );
    }
    let tid = sys(nr::GETTID, &[]) as u64;
    let pid = sys(nr::GETPID, &[]) as u64;
    for si in items::<SigInfo>(t.pending) {
        let sig = si.bytes[0] as u64;
        ctx.check(
            step::PENDING,
            sys(
                nr::RT_TGSIGQUEUEINFO,
                &[pid, tid, sig, si.bytes.as_ptr() as u64],
            ),
            sig,
        );
    }
    ctx.check(step::TLS, set_tls(t.tls), 0);
    // The barrier: the last thread of the task reports the task ready.
    let n = items::<ThreadDesc>(args.threads).len() as u32;
    if args.threads_ready.fetch_add(1, SeqCst) + 1 == n {
        ctx.at(step::BARRIER);
        ctx.shared.counter.fetch_add(1, SeqCst);
        wake(&ctx.shared.counter);
    }
    wait_phase(ctx, phase::GO);
    // SAFETY: the host built a complete rt_sigframe for this thread (its
    // dumped registers, full xstate, mask and altstack) at `frame`.
    unsafe { sigreturn(t.frame) }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    sys(nr::EXIT_GROUP, &[127]);
    loop {
        core::hint::spin_loop();
    }
}
