//! The dump-time parasite: runs inside a frozen task, serves the dumper's
//! commands over the shared area, and cures the task on its own if the dumper
//! dies. No allocation, no std, no floating point (the target's FPU state is
//! left untouched).
#![no_std]
#![no_main]
#![deny(clippy::undocumented_unsafe_blocks)]

use core::sync::atomic::AtomicU64;
use core::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};

use core::sync::atomic::AtomicI32;

use pdump_arch::native::syscall::{fork_onto, nr, sigreturn, syscall6};
use pdump_parasite::{cmd, role, state, Control, Misc, TimerVal, CTL_MAGIC, MAX_PIPES};

pdump_arch::blob_entry!(blob_main);

const EINTR: i64 = 4;
const EAGAIN: i64 = 11;
const O_CLOEXEC: u64 = 0o2000000;
const F_SETPIPE_SZ: u64 = 1031;
const FUTEX_WAKE: u64 = 1;

#[inline(always)]
fn sys(n: u64, a: &[u64]) -> i64 {
    let mut args = [0u64; 6];
    args[..a.len()].copy_from_slice(a);
    // SAFETY: every call site passes pointers into the shared area (mapped
    // for the blob's whole life) or plain integers.
    unsafe { syscall6(n, args) }
}

fn wake(word: &core::sync::atomic::AtomicU32) {
    sys(
        nr::FUTEX,
        &[word as *const _ as u64, FUTEX_WAKE, i32::MAX as u64],
    );
}

/// Close every fd the blob still holds.
fn close_all(ctl: &Control) {
    for fd in [
        &ctl.cmd_rfd,
        &ctl.cmd_wfd,
        &ctl.snap_rfd,
        &ctl.snap_wfd,
        &ctl.sync_wfd,
    ] {
        let f = fd.swap(-1, SeqCst);
        if f >= 0 {
            sys(nr::CLOSE, &[f as u64]);
        }
    }
    close_pipes(ctl);
}

fn close_pipes(ctl: &Control) {
    for p in ctl.pipe_fds.iter() {
        for fd in p.iter() {
            let f = fd.swap(-1, SeqCst);
            if f >= 0 {
                sys(nr::CLOSE, &[f as u64]);
            }
        }
    }
    ctl.npipes.store(0, SeqCst);
}

/// The dumper is gone: close our fds and return into the task's own state.
/// The snapshot (a fork of the task) exits instead: it never runs task code.
fn self_cure(ctl: &Control) -> ! {
    ctl.state.store(state::SELF_CURE, SeqCst);
    if ctl.role != role::PARASITE {
        snapshot_exit(ctl, 0);
    }
    close_all(ctl);
    // A snapshot exits at end of file on its command pipe, which we just
    // closed (the dumper's end is gone): reap it, so nothing is left.
    let snap = ctl.snap_pid.swap(0, SeqCst);
    if snap > 0 {
        loop {
            let r = sys(nr::WAIT4, &[snap as u64, 0, WCLONE, 0]);
            if r != -EINTR {
                break;
            }
        }
    }
    // SAFETY: the dumper wrote a complete rt_sigframe with the task's original
    // registers, xstate, mask and altstack at `cure_frame` before starting us.
    unsafe { sigreturn(ctl.cure_frame) }
}

fn data<T>(ctl: &Control) -> *mut T {
    ctl.data_addr as *mut T
}

fn do_misc(ctl: &Control) -> i64 {
    // SAFETY: the data buffer is DATA_BYTES long, Misc fits (checked at compile
    // time in the protocol crate), and only this thread touches it during the command.
    let m: &mut Misc = unsafe { &mut *data::<Misc>(ctl) };
    for sig in 1..=64u64 {
        let i = (sig - 1) as usize;
        m.sigaction_ret[i] = sys(
            nr::RT_SIGACTION,
            &[sig, 0, &mut m.sigactions[i] as *mut _ as u64, 8],
        );
    }
    for (which, t) in m.itimers.iter_mut().enumerate() {
        let r = sys(nr::GETITIMER, &[which as u64, t as *mut TimerVal as u64]);
        if r < 0 {
            return r;
        }
    }
    let mut ss = [0u64; 3];
    let r = sys(nr::SIGALTSTACK, &[0, ss.as_mut_ptr() as u64]);
    if r < 0 {
        return r;
    }
    m.altstack = ss;
    let n = (m.ntimers as usize).min(m.timer_ids.len());
    for i in 0..n {
        let id = m.timer_ids[i] as u64;
        let r = sys(
            nr::TIMER_GETTIME,
            &[id, &mut m.timers[i] as *mut TimerVal as u64],
        );
        if r < 0 {
            return r;
        }
        m.timer_overrun[i] = sys(nr::TIMER_GETOVERRUN, &[id]);
    }
    // Two more answers the dumper needs from inside, in the same round trip.
    const PR_GET_CHILD_SUBREAPER: u64 = 37;
    const PR_GET_TID_ADDRESS: u64 = 40;
    m.subreaper = 0;
    m.subreaper_ret = sys(
        nr::PRCTL,
        &[PR_GET_CHILD_SUBREAPER, &mut m.subreaper as *mut i32 as u64],
    );
    m.tid_address = 0;
    m.tid_address_ret = sys(
        nr::PRCTL,
        &[PR_GET_TID_ADDRESS, &mut m.tid_address as *mut u64 as u64],
    );
    0
}

fn do_pipes(ctl: &Control, n: u64, size: u64) -> i64 {
    if n as usize > MAX_PIPES {
        return -22;
    }
    close_pipes(ctl);
    for i in 0..n as usize {
        let mut fds = [0i32; 2];
        let r = sys(nr::PIPE2, &[fds.as_mut_ptr() as u64, O_CLOEXEC]);
        if r < 0 {
            return r;
        }
        ctl.pipe_fds[i][0].store(fds[0], SeqCst);
        ctl.pipe_fds[i][1].store(fds[1], SeqCst);
        ctl.npipes.store(i as u32 + 1, SeqCst);
        if size > 0 {
            let r = sys(nr::FCNTL, &[fds[1] as u64, F_SETPIPE_SZ, size]);
            if r < 0 {
                return r;
            }
        }
    }
    0
}

const FUTEX_WAIT: u64 = 0;
const FUTEX_WAITERS: u32 = 0x8000_0000;
const FUTEX_OWNER_DIED: u32 = 0x4000_0000;

/// Wait while the dumper holds the guard. True when it released it, false
/// when the kernel marked it owner-dead (the dumper thread died). The guard
/// is a robust futex of the dumper's thread, so this works whatever pid
/// namespace the task is in (no pid of the dumper is needed). An untimed
/// FUTEX_WAIT never touches the task's restart block.
fn wait_guard(ctl: &Control) -> bool {
    loop {
        let v = ctl.guard.load(Acquire);
        if v == 0 {
            return true;
        }
        if v & FUTEX_OWNER_DIED != 0 {
            return false;
        }
        if v & FUTEX_WAITERS == 0
            && ctl
                .guard
                .compare_exchange(v, v | FUTEX_WAITERS, SeqCst, SeqCst)
                .is_err()
        {
            continue;
        }
        sys(
            nr::FUTEX,
            &[
                &ctl.guard as *const _ as u64,
                FUTEX_WAIT,
                (v | FUTEX_WAITERS) as u64,
                0,
            ],
        );
    }
}

#[repr(C)]
struct PollFd {
    fd: i32,
    events: i16,
    revents: i16,
}

const POLLIN: i16 = 0x1;
const POLLOUT: i16 = 0x4;
const POLLERR: i16 = 0x8;
const POLLHUP: i16 = 0x10;
const SPLICE_F_NONBLOCK: u64 = 2;

/// Wait until page pipe `fd` has room. Uses ppoll without a timeout, which
/// never touches the task's restart block. Cures the task if the dumper died.
fn wait_writable(ctl: &Control, fd: u64) {
    let cmd = ctl.cmd_rfd.load(Relaxed);
    let mut p = [
        PollFd {
            fd: fd as i32,
            events: POLLOUT,
            revents: 0,
        },
        PollFd {
            fd: cmd,
            events: POLLIN,
            revents: 0,
        },
    ];
    let r = sys(nr::PPOLL, &[p.as_mut_ptr() as u64, 2, 0, 0, 8]);
    if r > 0 && p[1].revents & (POLLHUP | POLLERR) != 0 {
        self_cure(ctl);
    }
}

#[repr(C)]
struct Iovec {
    base: u64,
    len: u64,
}

fn do_vmsplice(ctl: &Control, pipe: u64, niov: u64) -> i64 {
    if pipe >= ctl.npipes.load(SeqCst) as u64 || niov as usize > pdump_parasite::MAX_IOVS {
        return -22;
    }
    vmsplice_iovs(ctl, pipe, data::<Iovec>(ctl), niov as usize)
}

/// vmsplice `niov` iovecs at `iov` (inside the data buffer; advanced as
/// they are taken) into page pipe `pipe` (checked by the caller).
fn vmsplice_iovs(ctl: &Control, pipe: u64, iov: *mut Iovec, niov: usize) -> i64 {
    let niov = niov as u64;
    let fd = ctl.pipe_fds[pipe as usize][1].load(SeqCst) as u64;
    let mut idx = 0usize;
    let mut total: i64 = 0;
    while idx < niov as usize {
        // SAFETY: idx < niov <= MAX_IOVS, inside the data buffer.
        let cur = unsafe { iov.add(idx) };
        let cnt = (niov as usize - idx).min(1024);
        let r = sys(
            nr::VMSPLICE,
            &[fd, cur as u64, cnt as u64, SPLICE_F_NONBLOCK],
        );
        if r == -EINTR {
            continue;
        }
        if r == -EAGAIN {
            // The pipe is full: wait until the dumper drains it, or until the
            // command pipe reports that the dumper is gone (a blocking
            // vmsplice would wait forever then: we hold the read end too).
            wait_writable(ctl, fd);
            continue;
        }
        if r < 0 {
            return r;
        }
        total += r;
        // Advance over what was taken, possibly partway into an iovec.
        let mut left = r as u64;
        while left > 0 {
            // SAFETY: as above; we only walk iovecs the dumper wrote.
            let v = unsafe { &mut *iov.add(idx) };
            if left >= v.len {
                left -= v.len;
                idx += 1;
            } else {
                v.base += left;
                v.len -= left;
                left = 0;
            }
        }
        // Skip empty iovecs so a zero-length tail cannot stall the loop.
        // SAFETY: bounds checked by the loop condition.
        while idx < niov as usize && unsafe { (*iov.add(idx)).len } == 0 {
            idx += 1;
        }
    }
    total
}

const WCLONE: u64 = 0x8000_0000;
const EINVAL: i64 = 22;
const ECHILD: i64 = 10;

/// `cmd::FORK`: fork the copy-on-write snapshot (see the protocol crate).
fn do_fork(ctl: &Control, snap_addr: u64, stack_top: u64, close_max: u64) -> i64 {
    let off = snap_addr.wrapping_sub(ctl.area_addr);
    let size = core::mem::size_of::<Control>() as u64;
    if off >= ctl.area_size
        || off + size > ctl.area_size
        || snap_addr % 8 != 0
        || stack_top % 16 != 0
        || stack_top <= ctl.area_addr
        || stack_top > ctl.area_addr + ctl.area_size
    {
        return -EINVAL;
    }
    // SAFETY: checked above to lie inside the shared area, aligned; Control
    // is atomics and plain words, valid for any bit pattern.
    let snap: &Control = unsafe { &*(snap_addr as *const Control) };
    if snap.magic != CTL_MAGIC || snap.role != role::SNAPSHOT {
        return -EINVAL;
    }
    if ctl.snap_rfd.load(SeqCst) >= 0 || ctl.snap_wfd.load(SeqCst) >= 0 {
        return -EINVAL; // one snapshot per infection
    }
    let mut c = [0i32; 2];
    let r = sys(nr::PIPE2, &[c.as_mut_ptr() as u64, O_CLOEXEC]);
    if r < 0 {
        return r;
    }
    ctl.snap_rfd.store(c[0], SeqCst);
    ctl.snap_wfd.store(c[1], SeqCst);
    let mut sync = [0i32; 2];
    let r = sys(nr::PIPE2, &[sync.as_mut_ptr() as u64, O_CLOEXEC]);
    if r < 0 {
        return r;
    }
    snap.cmd_rfd.store(c[0], SeqCst);
    snap.sync_wfd.store(sync[1], SeqCst);
    snap.close_max
        .store(close_max.min(i32::MAX as u64) as i32, SeqCst);
    // No page pipes: the snapshot makes its own when the dumper drains it
    // (PIPES), so nothing of the task's fd table outlives the fork.
    for p in snap.pipe_fds.iter() {
        p[0].store(-1, SeqCst);
        p[1].store(-1, SeqCst);
    }
    snap.npipes.store(0, SeqCst);
    snap.state.store(state::LOADED, SeqCst);
    snap.ret.store(0, SeqCst);
    // SAFETY: the snapshot's stack lies in the shared area (checked above),
    // nothing else uses it, and `snapshot_main` never returns.
    let pid = unsafe { fork_onto(stack_top, snapshot_main, snap_addr) };
    sys(nr::CLOSE, &[sync[1] as u64]);
    if pid < 0 {
        sys(nr::CLOSE, &[sync[0] as u64]);
        return pid;
    }
    // End of file once the child has closed everything it inherited (it
    // closes the sync pipe last) or died.
    let mut b = 0u8;
    loop {
        let r = sys(nr::READ, &[sync[0] as u64, &mut b as *mut u8 as u64, 1]);
        if r == -EINTR || r > 0 {
            continue;
        }
        break;
    }
    sys(nr::CLOSE, &[sync[0] as u64]);
    if snap.state.load(Acquire) != state::SERVING {
        // It failed before serving: reap it, so nothing is left behind.
        sys(nr::WAIT4, &[pid as u64, 0, WCLONE, 0]);
        let e = snap.ret.load(Acquire) as i64;
        return if e < 0 { e } else { -ECHILD };
    }
    ctl.snap_pid.store(pid as i32, SeqCst);
    pid
}

const PR_SET_NAME: u64 = 15;
/// The snapshot's comm (`pdump_parasite::SNAPSHOT_COMM`, NUL-terminated).
static SNAPSHOT_NAME: [u8; 15] = *b"pdump-snapshot\0";

/// The snapshot's tid (set by the snapshot itself; the blob's statics are
/// in the shared area, so this is how the panic handler tells the two apart).
static SNAPSHOT_TID: AtomicI32 = AtomicI32::new(0);

fn snapshot_exit(ctl: &Control, code: i64) -> ! {
    if code < 0 {
        ctl.ret.store(code as u64, SeqCst);
    }
    loop {
        sys(nr::EXIT_GROUP, &[0]);
    }
}

/// Close every fd in `lo..=hi`: `close_range`, or one by one up to `max`
/// when it is refused (an old kernel or a seccomp filter).
fn close_gap(lo: i64, hi: i64, max: i64) {
    if lo > hi {
        return;
    }
    if sys(nr::CLOSE_RANGE, &[lo as u64, hi as u64, 0]) == 0 {
        return;
    }
    let mut fd = lo;
    while fd <= hi.min(max) {
        sys(nr::CLOSE, &[fd as u64]);
        fd += 1;
    }
}

/// The copy-on-write snapshot: a fork of the task, entered on its own stack
/// with its own control block. It never returns into the task's code.
extern "C" fn snapshot_main(arg: u64) -> ! {
    // SAFETY: the parent passes the address of the snapshot's control block
    // inside the shared area, which this process keeps mapped until it exits.
    let ctl: &Control = unsafe { &*(arg as *const Control) };
    SNAPSHOT_TID.store(sys(nr::GETTID, &[]) as i32, SeqCst);
    // Drop every file of the task: holding one would change what the task
    // sees (a pipe that never reports EOF, a lock never released). Only the
    // command pipe and the sync pipe stay.
    let sync = ctl.sync_wfd.load(SeqCst);
    let cmd_rfd = ctl.cmd_rfd.load(SeqCst) as i64;
    let keep = if cmd_rfd < sync as i64 {
        [cmd_rfd, sync as i64]
    } else {
        [sync as i64, cmd_rfd]
    };
    let max = ctl.close_max.load(SeqCst) as i64;
    let mut lo = 0i64;
    for &k in keep.iter() {
        if k < 0 {
            continue;
        }
        close_gap(lo, k - 1, max);
        lo = k + 1;
    }
    close_gap(lo, u32::MAX as i64, max);
    // Leave the task's session and process group: a SIGSTOP to the task's
    // group must not stop us (the task would get SIGCHLD for it).
    sys(nr::SETSID, &[]);
    // A name to tell it by: a later dump reaps a snapshot whose dumper died.
    sys(nr::PRCTL, &[PR_SET_NAME, SNAPSHOT_NAME.as_ptr() as u64]);
    ctl.state.store(state::SERVING, Release);
    ctl.sync_wfd.store(-1, SeqCst);
    sys(nr::CLOSE, &[sync as u64]);

    loop {
        let mut b = 0u8;
        let r = sys(
            nr::READ,
            &[
                ctl.cmd_rfd.load(Relaxed) as u64,
                &mut b as *mut u8 as u64,
                1,
            ],
        );
        if r == -EINTR {
            continue;
        }
        if r <= 0 {
            snapshot_exit(ctl, 0); // EOF: the dumper is done or died
        }
        let seq = ctl.cmd_seq.load(Acquire);
        let a = |i: usize| ctl.args[i].load(Relaxed);
        let ret = match ctl.cmd.load(Acquire) {
            cmd::NOP => 0,
            cmd::PIPES => do_pipes(ctl, a(0), a(1)),
            cmd::VMSPLICE => do_vmsplice(ctl, a(0), a(1)),
            cmd::VMSPLICE_SCAN => do_vmsplice_scan(ctl, a(0), a(1)),
            cmd::FINI => {
                ctl.ret.store(0, Relaxed);
                ctl.done_seq.store(seq, Release);
                wake(&ctl.done_seq);
                snapshot_exit(ctl, 0);
            }
            _ => -38, // ENOSYS
        };
        ctl.ret.store(ret as u64, Relaxed);
        ctl.done_seq.store(seq, Release);
        wake(&ctl.done_seq);
    }
}

/// Whether this CPU has the CRC32 instruction (SSE4.2: CPUID.1:ECX bit 20).
#[cfg(target_arch = "x86_64")]
fn have_crc32() -> bool {
    // SAFETY: CPUID leaf 1 exists on every x86_64 CPU.
    let r = unsafe { core::arch::x86_64::__cpuid(1) };
    r.ecx & (1 << 20) != 0
}

/// CRC32C of `len` bytes (a multiple of 8) at `p`, continuing `crc` (as
/// `crc32c::crc32c_append`). The CRC32 instruction works on general-purpose
/// registers only: no FPU/SIMD state is touched.
#[cfg(target_arch = "x86_64")]
fn crc32c_append(crc: u32, p: *const u64, len: usize) -> u32 {
    let mut c = !crc as u64;
    for i in 0..len / 8 {
        // SAFETY: `p` points at `len` readable bytes of the task (the caller
        // passes pages of an iovec the dumper listed as present).
        unsafe {
            core::arch::asm!(
                "crc32 {c}, qword ptr [{p}]",
                c = inout(reg) c,
                p = in(reg) p.add(i),
                options(nostack, readonly),
            )
        };
    }
    !(c as u32)
}

/// Whether the page at `p` is all zero (stops at the first non-zero word).
fn page_is_zero(p: *const u64) -> bool {
    // SAFETY: a whole readable page of the task, as above.
    (0..PAGE / 8).all(|i| unsafe { core::ptr::read_volatile(p.add(i)) } == 0)
}

const PAGE: usize = 4096;

fn do_vmsplice_scan(ctl: &Control, pipe: u64, niov: u64) -> i64 {
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (ctl, pipe, niov);
        -38 // ENOSYS
    }
    #[cfg(target_arch = "x86_64")]
    {
        if pipe >= ctl.npipes.load(SeqCst) as u64 || niov as usize > pdump_parasite::MAX_IOVS {
            return -22;
        }
        if !have_crc32() {
            return -38;
        }
        let niov = niov as usize;
        let max = pdump_parasite::max_scan_runs(niov);
        let base = data::<u8>(ctl);
        let iov = data::<Iovec>(ctl);
        // SAFETY: offsets inside the data buffer (max_scan_runs keeps the
        // runs and the iovecs built below inside it).
        let count = unsafe { base.add(pdump_parasite::scan_runs_offset(niov)) } as *mut u64;
        // SAFETY: as above.
        let runs = unsafe { count.add(1) } as *mut pdump_parasite::ScanRun;
        let mut n = 0usize;
        for k in 0..niov {
            // SAFETY: k < niov, inside the data buffer.
            let v = unsafe { &*iov.add(k) };
            if v.base % PAGE as u64 != 0 || v.len % PAGE as u64 != 0 {
                return -22;
            }
            for pg in 0..(v.len / PAGE as u64) as usize {
                let addr = v.base + (pg * PAGE) as u64;
                let p = addr as *const u64;
                let zero = page_is_zero(p);
                // SAFETY: n < max runs, inside the data buffer.
                let last = if n > 0 {
                    Some(unsafe { &mut *runs.add(n - 1) })
                } else {
                    None
                };
                match last {
                    Some(r) if r.iov == k as u32 && (r.zero != 0) == zero => {
                        r.npages += 1;
                        if !zero {
                            r.crc = crc32c_append(r.crc, p, PAGE);
                        }
                    }
                    _ => {
                        if n == max {
                            return -7; // E2BIG
                        }
                        // SAFETY: n < max, inside the data buffer.
                        unsafe {
                            runs.add(n).write(pdump_parasite::ScanRun {
                                addr,
                                npages: 1,
                                zero: zero as u32,
                                crc: if zero { 0 } else { crc32c_append(0, p, PAGE) },
                                iov: k as u32,
                            })
                        };
                        n += 1;
                    }
                }
            }
        }
        // SAFETY: inside the data buffer.
        unsafe { count.write(n as u64) };
        // The non-zero runs as iovecs, after the runs.
        // SAFETY: max_scan_runs leaves 16 bytes per run after them.
        let out = unsafe { runs.add(max) } as *mut Iovec;
        let mut m = 0usize;
        for i in 0..n {
            // SAFETY: i < n <= max.
            let r = unsafe { &*runs.add(i) };
            if r.zero == 0 {
                // SAFETY: m <= i < max iovecs fit after the runs.
                unsafe {
                    out.add(m).write(Iovec {
                        base: r.addr,
                        len: r.npages as u64 * PAGE as u64,
                    })
                };
                m += 1;
            }
        }
        vmsplice_iovs(ctl, pipe, out, m)
    }
}

/// The blob's main function, entered from the arch trampoline with the
/// control block's address.
#[no_mangle]
pub extern "C" fn blob_main(ctl: *mut Control) -> ! {
    // SAFETY: the dumper passes the address of the control block inside the
    // shared area, which stays mapped until the blob is gone.
    let ctl: &Control = unsafe { &*ctl };
    CTL.store(ctl as *const Control as u64, SeqCst);

    // Handshake: create the command pipe, let the dumper take the write end.
    let mut fds = [0i32; 2];
    if sys(nr::PIPE2, &[fds.as_mut_ptr() as u64, O_CLOEXEC]) < 0 {
        self_cure(ctl);
    }
    ctl.cmd_rfd.store(fds[0], SeqCst);
    ctl.cmd_wfd.store(fds[1], SeqCst);
    ctl.state.store(state::READY, Release);
    wake(&ctl.state);
    // Wait until the dumper took the write end (it releases the guard) or
    // died (the kernel marks the guard owner-dead).
    if !wait_guard(ctl) {
        self_cure(ctl);
    }
    let w = ctl.cmd_wfd.swap(-1, SeqCst);
    sys(nr::CLOSE, &[w as u64]);
    ctl.state.store(state::SERVING, Release);
    wake(&ctl.state);

    loop {
        let mut b = 0u8;
        let r = sys(
            nr::READ,
            &[
                ctl.cmd_rfd.load(Relaxed) as u64,
                &mut b as *mut u8 as u64,
                1,
            ],
        );
        if r == -EINTR {
            continue;
        }
        if r <= 0 {
            self_cure(ctl); // EOF: the dumper died
        }
        let seq = ctl.cmd_seq.load(Acquire);
        let a = |i: usize| ctl.args[i].load(Relaxed);
        let ret = match ctl.cmd.load(Acquire) {
            cmd::NOP => 0,
            cmd::SYSCALL => sys(a(0), &[a(1), a(2), a(3), a(4), a(5), a(6)]),
            cmd::MISC => do_misc(ctl),
            cmd::PIPES => do_pipes(ctl, a(0), a(1)),
            cmd::VMSPLICE => do_vmsplice(ctl, a(0), a(1)),
            cmd::FORK => do_fork(ctl, a(0), a(1), a(2)),
            cmd::VMSPLICE_SCAN => do_vmsplice_scan(ctl, a(0), a(1)),
            cmd::FINI => {
                // Close every fd we hold (the task's fd table is back to what
                // it was), answer, and wait on the guard (held by the dumper
                // since before FINI) to be stopped by the dumper; if it dies
                // instead, the kernel marks the guard owner-dead.
                close_all(ctl);
                ctl.ret.store(0, Relaxed);
                ctl.done_seq.store(seq, Release);
                wake(&ctl.done_seq);
                // Either way, waking up here means nobody will stop us: the
                // dumper died (owner-dead) or gave up (released): cure alone.
                wait_guard(ctl);
                self_cure(ctl);
            }
            _ => -38, // ENOSYS
        };
        ctl.ret.store(ret as u64, Relaxed);
        ctl.done_seq.store(seq, Release);
        wake(&ctl.done_seq);
    }
}

/// The control block, for the panic handler.
static CTL: AtomicU64 = AtomicU64::new(0);

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // A bug in the blob must not leave the task stuck or with a changed
    // signal disposition (a trap would reset it): cure the task instead.
    // The snapshot must never run task code: it exits.
    let me = sys(nr::GETTID, &[]) as i32;
    if me == SNAPSHOT_TID.load(SeqCst) {
        loop {
            sys(nr::EXIT_GROUP, &[127]);
        }
    }
    let c = CTL.load(SeqCst);
    if c != 0 {
        // SAFETY: CTL is set to the control block once, at entry.
        self_cure(unsafe { &*(c as *const Control) });
    }
    loop {
        sys(nr::EXIT, &[127]);
    }
}
