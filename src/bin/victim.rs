//! `pdump-victim`: self-checking victim processes for pdump's integration
//! tests.
//!
//! Tests seize these processes, inject code into them, dump them (and later
//! kill and restore them) and then need the victim to *prove* it continued
//! exactly: any silent corruption of memory, registers (general purpose,
//! x87, SSE/AVX/AVX-512 and opmask registers, MXCSR and the x87 control
//! word), signal handlers, signal mask, alternate signal stack, file
//! descriptors or syscall-restart semantics makes the victim report failure.
//!
//! # Protocol
//!
//! `pdump-victim MODE [ARGS...]`
//!
//! * After initialisation every mode prints exactly one line
//!   `READY <pid> <extra...>` to stdout and flushes it.
//! * At start every mode sets the signal mask of the main thread (inherited
//!   by every thread it creates) to exactly `{SIGUSR2}` (`threads` mode:
//!   `{SIGUSR2, SIGTERM}`, see there).
//! * Long-running modes (`loop`, `stopme`, `zmm`, `threads`, `pattern`,
//!   `fds`, `timers`) install a SIGTERM handler with
//!   `SA_RESTART | SA_ONSTACK`, running on an alternate signal stack (a
//!   separate 64 KiB anonymous mapping installed with `sigaltstack`), which
//!   only sets an atomic flag and records whether it really ran on that
//!   alternate stack. The test ends a run with SIGTERM; the victim then runs
//!   a FINAL full verification and prints `OK <details>` and exits 0, or
//!   prints `FAIL <what>` and exits 1. The final verification always
//!   includes: the signal mask of every thread is unchanged (raw
//!   `rt_sigprocmask` query), the SIGTERM action (handler, flags, restorer,
//!   mask; raw `rt_sigaction` query) is bit-identical to what the kernel
//!   reported right after installation, the alternate signal stack of every
//!   thread that installed one is unchanged, and the SIGTERM handler ran on
//!   the alternate stack.
//! * Any failure noticed earlier prints `FAIL <what>` and exits 1 at once.
//! * `FAIL` lines and `OK` lines go to stdout; nothing else is printed there.
//!
//! Numbers in hex are printed as `0x` followed by lowercase hex digits.
//!
//! # Modes
//!
//! * `loop`: an 8 MiB heap buffer (2^20 u64 words, word `i` initially
//!   `splitmix64(0x100F ^ i)`); a single-threaded tight loop modifies one
//!   word per iteration (index from an xorshift64 PRNG) and maintains a
//!   position-weighted running checksum incrementally; every 2^20 iterations
//!   it recomputes the full checksum; loop-carried sentinel values (kept in
//!   registers behind optimisation barriers) are checked every iteration.
//!   `READY <pid> <buf_hex> <buf_bytes>`; final `OK iterations=<n>`.
//! * `stopme`: like `loop`, but right after READY it raises SIGSTOP on
//!   itself once (the test sends SIGCONT, later SIGTERM). Same output.
//! * `zmm`: the main thread and one extra thread each load zmm0..zmm31,
//!   k1..k7, the eight x87 stack registers, r12..r15, MXCSR and the x87
//!   control word with per-thread distinct known values in ONE inline-asm
//!   block which then loops forever comparing every register with its
//!   expected value (batches of 65536 full checks between polls of the
//!   SIGTERM flag in memory), so the registers hold their values at whatever
//!   moment the task is seized. The main thread writes its READY line from
//!   inside that asm block (a raw `write` syscall) after both threads have
//!   loaded their registers. `READY <pid> avx512`, or `READY <pid>
//!   ymm-fallback` without AVX-512F/BW (or with `PDUMP_VICTIM_FORCE_YMM=1`),
//!   in which case ymm0..ymm15 (full 256 bits) are used instead and there
//!   are no opmask registers. Final `OK checks=<n>` (sum over both threads).
//! * `threads [N]` (default 8): N worker threads, each with its own
//!   counter, a thread-local value and a 512-word stack buffer holding a
//!   pattern, verifying continuously and bumping a shared atomic total; the
//!   main thread waits in `rt_sigsuspend` for SIGTERM (every thread's mask
//!   is `{SIGUSR2, SIGTERM}`, the main thread unblocks SIGTERM only inside
//!   `rt_sigsuspend`), then stops and joins the workers and checks that the
//!   per-thread counters add up to the total. Every worker also installs and
//!   finally verifies its own alternate stack and mask.
//!   `READY <pid> <N>`; final `OK threads=<N>`.
//! * `sleep [MS]` (default 2000): READY, then ONE `nanosleep(MS)` (raw libc
//!   call with a remainder pointer; any error, EINTR included, is a FAIL),
//!   measuring CLOCK_MONOTONIC around it; prints `SLEPT <elapsed_ms>` and
//!   exits 0. No SIGTERM handler. `READY <pid> <MS>`.
//! * `read`: READY, then ONE blocking `read(0, buf, 64)` (raw libc call;
//!   EINTR, any other error, or end of file is a FAIL); prints `GOT <bytes
//!   as text, whitespace-trimmed>` and exits 0. No SIGTERM handler.
//!   `READY <pid>`.
//! * `pattern [PAGES] [SEED]` (defaults 256 and 1; decimal or `0x` hex):
//!   maps `PAGES + 16` pages anonymous private read-write memory with
//!   `MADV_NOHUGEPAGE`, then makes the last 16 pages read-only, so that they
//!   form a separate mapping right after the first `PAGES` pages; the
//!   pattern is written as defined by [`pattern_page_kind`] and
//!   [`pattern_word`]. The 16-page read-only region is never touched.
//!   `READY <pid> <base_hex> <PAGES> <untouched_base_hex>`, then waits for
//!   SIGTERM; the final check verifies with `mincore` that every
//!   untouched page (every 7th, and the 16-page region) is still not
//!   present and every other page is present, that the two regions still
//!   have permissions `rw-p` and `r--p`, and the content of every touched
//!   page. Final `OK pages=<PAGES>`.
//! * `fds`: opens, in this order: (1) a regular file
//!   `$PDUMP_VICTIM_DIR/pdump-victim-<pid>-regular` (directory default
//!   `/tmp`), O_RDWR, 1000 bytes (byte k = `(k * 31 + 7) as u8`), offset
//!   123; (2) `...-unlinked`, O_RDWR, holding `unlinked-data` (offset 13),
//!   then unlinked; (3) the directory, O_RDONLY|O_DIRECTORY|O_CLOEXEC;
//!   (4) `/dev/null` O_RDWR; (5) `/dev/zero` O_RDONLY; (6) and (7) the read
//!   and write ends of a pipe holding `buffered` (8 bytes); (8) a FIFO
//!   `...-fifo` (mkfifo) opened O_RDWR holding `fifo-data`; (9) an eventfd
//!   (EFD_NONBLOCK) with count 42; (10) a memfd `victim-memfd`
//!   (MFD_CLOEXEC) of 3 pages, u64 word j = `splitmix64(0x3E3F_D000 ^ j)`,
//!   offset 5000. `READY <pid> <fd1> ... <fd10>` in that order. On SIGTERM
//!   it verifies offsets, sizes, contents (reading the pipe, FIFO and
//!   eventfd), file status and descriptor flags, the identity of every file
//!   (`/proc/self/fd` link, inode), removes the regular file and the FIFO
//!   and prints `OK fds=10`.
//! * `timers`: SIGALRM handler with `setitimer(ITIMER_REAL)` at a 100 ms
//!   interval, and a SIGUSR1 `SA_SIGINFO` handler fed by a POSIX timer
//!   (`timer_create(CLOCK_MONOTONIC)`, SIGEV_SIGNAL, 50 ms interval, whose
//!   `sigev_value` must arrive in every signal); both handlers count ticks.
//!   The main thread polls in 50 ms `nanosleep`s. On SIGTERM it checks that
//!   both counters still advance (each by at least 2 more ticks, waiting up
//!   to 10 s for that), that both timers still have their intervals, and
//!   that all three actions are unchanged. `READY <pid>`; final
//!   `OK alrm=<n> usr1=<n>`.
//!
//! # Self-test of the checks
//!
//! With `PDUMP_VICTIM_SELFTEST_CORRUPT` set (and not `0`), a victim
//! corrupts its own state right after READY so tests can prove that the
//! checks work:
//! * `loop`, `stopme`: any value flips one bit of the buffer behind the
//!   checksum's back (detected within 2^20 iterations: FAIL, exit 1).
//! * `pattern`: `touch` reads one word of page 0 (must stay non-present),
//!   `touch-extra` reads one word of the read-only region, any other value
//!   flips one bit of the first pattern page; detected by the final check.
//! * `zmm`: `1`/`zmm` flips bit 511 of zmm31 (ymm-fallback: bit 255 of
//!   ymm15), `k` bit 63 of k7, `mxcsr` the DAZ bit of MXCSR, `fcw` a
//!   rounding-control bit of the x87 control word, `gpr` bit 0 of r15,
//!   `x87` the sign of st(3). The main thread applies it inside its asm
//!   loop after READY; detected immediately (FAIL, exit 1).

use std::arch::asm;
use std::ffi::{c_int, c_void, CString};
use std::fmt::Display;
use std::io::Write;
use std::mem::{offset_of, zeroed};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr::{null, null_mut, read_volatile, write_volatile};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

const PAGE: usize = 4096;

// ---------------------------------------------------------------------------
// Shared definitions (the tests re-implement these)
// ---------------------------------------------------------------------------

/// SplitMix64 finaliser, as in the reference implementation:
/// `z = x + 0x9E3779B97F4A7C15; z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
/// z = (z ^ (z >> 27)) * 0x94D049BB133111EB; z ^ (z >> 31)`, all wrapping.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What `pattern` mode puts into one page.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PageKind {
    /// Never written nor read: must stay non-present (`i % 7 == 0`).
    Untouched,
    /// Explicitly written with zeros: present, all zero (`i % 5 == 0`,
    /// `i % 7 != 0`).
    Zero,
    /// Every u64 word `j` (0..512, native little endian) is
    /// [`pattern_word`]`(seed, i, j)`.
    Pattern,
}

/// The kind of page `i` (0-based) in `pattern` mode.
pub fn pattern_page_kind(i: u64) -> PageKind {
    if i.is_multiple_of(7) {
        PageKind::Untouched
    } else if i.is_multiple_of(5) {
        PageKind::Zero
    } else {
        PageKind::Pattern
    }
}

/// Word `j` (0..512) of pattern page `i`: `splitmix64(seed ^ (i * 512 + j))`
/// (wrapping arithmetic).
pub fn pattern_word(seed: u64, i: u64, j: u64) -> u64 {
    splitmix64(seed ^ i.wrapping_mul(512).wrapping_add(j))
}

// ---------------------------------------------------------------------------
// Output and small helpers
// ---------------------------------------------------------------------------

fn emit(line: &str) {
    let out = std::io::stdout();
    let mut l = out.lock();
    let _ = writeln!(l, "{line}");
    let _ = l.flush();
}

fn fail(msg: impl Display) -> ! {
    emit(&format!("FAIL {msg}"));
    // SAFETY: _exit has no preconditions; stdout was flushed above.
    unsafe { libc::_exit(1) }
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn getpid() -> i32 {
    // SAFETY: no preconditions.
    unsafe { libc::getpid() }
}

fn corrupt_request() -> Option<String> {
    match std::env::var("PDUMP_VICTIM_SELFTEST_CORRUPT") {
        Ok(v) if !v.is_empty() && v != "0" => Some(v),
        _ => None,
    }
}

fn parse_num(s: Option<&String>, default: u64, what: &str) -> u64 {
    let Some(s) = s else { return default };
    let r = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.unwrap_or_else(|_| {
        eprintln!("pdump-victim: bad {what} {s:?}");
        std::process::exit(2)
    })
}

/// Hide a value from the optimiser while keeping it in a register.
#[inline(always)]
fn opaque(mut x: u64) -> u64 {
    // SAFETY: an empty asm block that only "modifies" a register operand.
    unsafe { asm!("/* {0} */", inout(reg) x, options(nomem, nostack, preserves_flags)) };
    x
}

fn monotonic_ns() -> u128 {
    // SAFETY: plain clock_gettime into a local.
    let mut ts: libc::timespec = unsafe { zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

/// Sleep up to `ms` milliseconds; an interrupting signal just ends it early.
fn nap(ms: u64) {
    let ts = libc::timespec {
        tv_sec: (ms / 1000) as _,
        tv_nsec: ((ms % 1000) * 1_000_000) as _,
    };
    // SAFETY: valid timespec; the remainder is not wanted.
    unsafe { libc::nanosleep(&ts, null_mut()) };
}

// ---------------------------------------------------------------------------
// Signal state: mask, SIGTERM action, alternate stack
// ---------------------------------------------------------------------------

fn sigbit(sig: c_int) -> u64 {
    1u64 << (sig - 1)
}

/// Set this thread's blocked mask exactly (raw syscall: no libc filtering).
fn set_mask(mask: u64) {
    // SAFETY: valid pointer to an 8-byte kernel sigset.
    let r = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &mask as *const u64,
            null_mut::<u64>(),
            8usize,
        )
    };
    if r != 0 {
        fail(format!("rt_sigprocmask(SETMASK): {}", errno()));
    }
}

fn get_mask() -> u64 {
    let mut cur = 0u64;
    // SAFETY: valid pointer to an 8-byte kernel sigset.
    let r = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_BLOCK,
            null::<u64>(),
            &mut cur as *mut u64,
            8usize,
        )
    };
    if r != 0 {
        fail(format!("rt_sigprocmask(query): {}", errno()));
    }
    cur
}

/// The kernel's `struct sigaction` on x86_64, as `rt_sigaction` reports it.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
struct KSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

fn query_action(sig: c_int) -> KSigaction {
    let mut k = KSigaction::default();
    // SAFETY: valid out pointer of the kernel layout, sigsetsize 8.
    let r = unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            null::<KSigaction>(),
            &mut k as *mut _,
            8usize,
        )
    };
    if r != 0 {
        fail(format!("rt_sigaction({sig}) query: {}", errno()));
    }
    k
}

/// Install a handler through libc (which supplies the restorer) and return
/// the kernel's view of the result.
fn install_handler(sig: c_int, handler: usize, flags: c_int) -> KSigaction {
    // SAFETY: sigaction with a zeroed struct and a valid extern "C" handler.
    unsafe {
        let mut sa: libc::sigaction = zeroed();
        sa.sa_sigaction = handler;
        sa.sa_flags = flags;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(sig, &sa, null_mut()) != 0 {
            fail(format!("sigaction({sig}): {}", errno()));
        }
    }
    query_action(sig)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct AltStack {
    sp: usize,
    size: usize,
    flags: i32,
}

const ALTSTACK_SIZE: usize = 64 * 1024;

fn query_altstack() -> AltStack {
    // SAFETY: query only, into a local.
    let mut ss: libc::stack_t = unsafe { zeroed() };
    if unsafe { libc::sigaltstack(null(), &mut ss) } != 0 {
        fail(format!("sigaltstack query: {}", errno()));
    }
    AltStack {
        sp: ss.ss_sp as usize,
        size: ss.ss_size,
        flags: ss.ss_flags,
    }
}

/// Give the calling thread its own alternate signal stack (a separate
/// mapping) and return the kernel's view of it.
fn install_altstack() -> AltStack {
    // SAFETY: fresh anonymous mapping, then sigaltstack on it (never freed).
    unsafe {
        let p = libc::mmap(
            null_mut(),
            ALTSTACK_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            fail(format!("mmap altstack: {}", errno()));
        }
        let ss = libc::stack_t {
            ss_sp: p,
            ss_flags: 0,
            ss_size: ALTSTACK_SIZE,
        };
        if libc::sigaltstack(&ss, null_mut()) != 0 {
            fail(format!("sigaltstack: {}", errno()));
        }
    }
    query_altstack()
}

/// Set by the SIGTERM handler.
static TERM: AtomicBool = AtomicBool::new(false);
/// 0: the SIGTERM handler never ran; 1: it ran on the alternate stack;
/// 2: it ran at least once somewhere else.
static TERM_ALT: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_term(_sig: c_int) {
    // Only async-signal-safe work: one sigaltstack query and atomics.
    // SAFETY: query into a local.
    let mut ss: libc::stack_t = unsafe { zeroed() };
    let ok = unsafe { libc::sigaltstack(null(), &mut ss) } == 0;
    let here = &ss as *const libc::stack_t as usize;
    let lo = ss.ss_sp as usize;
    let on = ok && (ss.ss_flags & libc::SS_ONSTACK) != 0 && here >= lo && here < lo + ss.ss_size;
    TERM_ALT.fetch_max(if on { 1 } else { 2 }, Ordering::SeqCst);
    TERM.store(true, Ordering::SeqCst);
}

fn term_requested() -> bool {
    TERM.load(Ordering::SeqCst)
}

/// Wait for SIGTERM in short `nanosleep`s (no lost-wakeup race).
fn wait_for_term() {
    while !term_requested() {
        nap(100);
    }
}

/// Per-thread signal state that must survive.
fn verify_thread(what: &str, mask: u64, alt: &AltStack) -> Result<(), String> {
    let cur = get_mask();
    if cur != mask {
        return Err(format!("{what}: signal mask {cur:#x}, expected {mask:#x}"));
    }
    let a = query_altstack();
    if a != *alt {
        return Err(format!("{what}: sigaltstack {a:x?}, expected {alt:x?}"));
    }
    Ok(())
}

/// The process-wide and main-thread signal state set up by [`common_init`].
struct Common {
    mask: u64,
    alt: AltStack,
    term: KSigaction,
}

/// Block exactly `{SIGUSR2} | extra` in the calling (main) thread, give it an
/// alternate stack and install the SIGTERM handler on it.
fn common_init(extra_mask: u64) -> Common {
    let mask = sigbit(libc::SIGUSR2) | extra_mask;
    set_mask(mask);
    let alt = install_altstack();
    let term = install_handler(
        libc::SIGTERM,
        on_term as *const () as usize,
        libc::SA_RESTART | libc::SA_ONSTACK,
    );
    Common { mask, alt, term }
}

impl Common {
    /// The final check of the signal state (call from the main thread, after
    /// SIGTERM arrived).
    fn verify(&self) -> Result<(), String> {
        verify_thread("main thread", self.mask, &self.alt)?;
        let t = query_action(libc::SIGTERM);
        if t != self.term {
            return Err(format!("SIGTERM action {t:x?}, expected {:x?}", self.term));
        }
        match TERM_ALT.load(Ordering::SeqCst) {
            1 => Ok(()),
            0 => Err("SIGTERM handler never ran".into()),
            _ => Err("SIGTERM handler ran off the alternate signal stack".into()),
        }
    }
}

// ---------------------------------------------------------------------------
// loop / stopme
// ---------------------------------------------------------------------------

const LOOP_WORDS: usize = 1 << 20;
const LOOP_FULL_CHECK: u64 = (1 << 20) - 1;

fn loop_weight(i: usize) -> u64 {
    (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1
}

/// (position-weighted sum, xor) of the buffer.
fn loop_checksums(buf: &[u64]) -> (u64, u64) {
    let mut s = 0u64;
    let mut x = 0u64;
    for (i, &w) in buf.iter().enumerate() {
        s = s.wrapping_add(w.wrapping_mul(loop_weight(i)));
        x ^= w;
    }
    (s, x)
}

/// The `loop` mode state carried between bursts.
#[derive(Clone, Copy)]
struct LoopState {
    rng: u64,
    iters: u64,
    /// Always `!iters`.
    down: u64,
    /// Sentinels rotated every iteration: always `s0 ^ s1 == sx`.
    s0: u64,
    s1: u64,
    sx: u64,
    /// Running checksums of the buffer (see [`loop_checksums`]).
    sum: u64,
    xor: u64,
}

#[cold]
#[inline(never)]
fn loop_sentinel_failure(st: &LoopState) -> String {
    format!(
        "loop: register sentinels corrupted at iteration {}: down={:#x} s0={:#x} s1={:#x} sx={:#x} rng={:#x}",
        st.iters, st.down, st.s0, st.s1, st.sx, st.rng
    )
}

/// Run iterations until the next multiple of 2^20 or until SIGTERM
/// (returns `true`). Everything lives in registers in here; the sentinels
/// are checked every iteration.
#[inline(never)]
fn loop_burst(buf: &mut [u64], state: &mut LoopState) -> Result<bool, String> {
    assert_eq!(buf.len(), LOOP_WORDS);
    let LoopState {
        mut rng,
        mut iters,
        mut down,
        mut s0,
        mut s1,
        mut sx,
        mut sum,
        mut xor,
    } = *state;
    let mut term = false;
    loop {
        if term_requested() {
            term = true;
            break;
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let idx = (rng >> 20) as usize & (LOOP_WORDS - 1);
        let old = buf[idx];
        let new = old.rotate_left(9) ^ rng;
        buf[idx] = new;
        sum = sum.wrapping_add(new.wrapping_sub(old).wrapping_mul(loop_weight(idx)));
        xor ^= old ^ new;
        iters += 1;
        down = opaque(down).wrapping_sub(1);
        s0 = opaque(s0).rotate_left(1);
        s1 = opaque(s1).rotate_left(1);
        sx = opaque(sx).rotate_left(1);
        if iters ^ down != u64::MAX || s0 ^ s1 != sx || rng == 0 {
            *state = LoopState {
                rng,
                iters,
                down,
                s0,
                s1,
                sx,
                sum,
                xor,
            };
            return Err(loop_sentinel_failure(state));
        }
        if iters & LOOP_FULL_CHECK == 0 {
            break;
        }
    }
    *state = LoopState {
        rng,
        iters,
        down,
        s0,
        s1,
        sx,
        sum,
        xor,
    };
    Ok(term)
}

fn mode_loop(stop_self: bool) -> Result<String, String> {
    let common = common_init(0);
    let mut buf: Vec<u64> = (0..LOOP_WORDS)
        .map(|i| splitmix64(0x100F ^ i as u64))
        .collect();
    let (sum, xor) = loop_checksums(&buf);
    emit(&format!(
        "READY {} {:#x} {}",
        getpid(),
        buf.as_ptr() as usize,
        LOOP_WORDS * 8
    ));
    if corrupt_request().is_some() {
        // SAFETY: in-bounds element of our own buffer.
        unsafe {
            let p = buf.as_mut_ptr().add(12345);
            write_volatile(p, read_volatile(p) ^ (1 << 17));
        }
    }
    if stop_self {
        // SAFETY: raise has no preconditions.
        unsafe { libc::raise(libc::SIGSTOP) };
    }

    let mut st = LoopState {
        rng: opaque(0x2545_F491_4F6C_DD1D),
        iters: 0,
        down: u64::MAX,
        s0: 0x0123_4567_89AB_CDEF,
        s1: 0xF0E1_D2C3_B4A5_9687,
        sx: 0x0123_4567_89AB_CDEF ^ 0xF0E1_D2C3_B4A5_9687,
        sum,
        xor,
    };
    loop {
        let term = loop_burst(&mut buf, &mut st)?;
        let (s, x) = loop_checksums(&buf);
        if (s, x) != (st.sum, st.xor) {
            return Err(format!(
                "loop: {}buffer checksum ({s:#x}, {x:#x}) != running ({:#x}, {:#x}) at iteration {}",
                if term { "final " } else { "" },
                st.sum,
                st.xor,
                st.iters
            ));
        }
        if term {
            break;
        }
    }
    if st.iters ^ st.down != u64::MAX || st.s0 ^ st.s1 != st.sx {
        return Err(format!("final check: {}", loop_sentinel_failure(&st)));
    }
    let iters = st.iters;
    common.verify()?;
    Ok(format!("OK iterations={iters}"))
}

// ---------------------------------------------------------------------------
// zmm
// ---------------------------------------------------------------------------

/// Everything one thread's register loop needs, addressed from r8.
#[repr(C, align(64))]
struct RegCtx {
    /// Expected zmm0..31 (ymm mode: the first 4 words of 0..15).
    zmm: [[u64; 8]; 32],
    /// Expected k1..k7 at index 1..7.
    k: [u64; 8],
    /// Expected st(0)..st(7).
    st: [f64; 8],
    /// Expected r12..r15.
    gpr: [u64; 4],
    /// Self-test: xor mask for zmm31 (bit 511).
    onebit_z: [u64; 8],
    /// Self-test: xor mask for ymm15 (bit 255).
    onebit_y: [u64; 4],
    /// ymm store scratch (fallback mode).
    scratch: [u64; 4],
    mxcsr: u32,
    /// Expected x87 control word (low 16 bits).
    fcw: u32,
    scr_mxcsr: u32,
    scr_fcw: u32,
    orig_mxcsr: u32,
    orig_fcw: u32,
    /// Set to 1 by the asm once the registers are loaded.
    started: AtomicU32,
    /// Self-test corruption request (taken with xchg by the asm).
    corrupt: AtomicU32,
}

const ZMM_BATCH: u32 = 1 << 16;

impl RegCtx {
    fn new(t: u64) -> Box<RegCtx> {
        let mut zmm = [[0u64; 8]; 32];
        for (i, r) in zmm.iter_mut().enumerate() {
            for (l, w) in r.iter_mut().enumerate() {
                *w = splitmix64(0x5A5A_0000_0000 ^ (t << 16) ^ ((i as u64) << 4) ^ l as u64);
            }
        }
        let mut k = [0u64; 8];
        for (i, w) in k.iter_mut().enumerate().skip(1) {
            *w = splitmix64(0x6B6B_0000_0000 ^ (t << 16) ^ i as u64);
        }
        let mut st = [0f64; 8];
        for (i, v) in st.iter_mut().enumerate() {
            // Exact small values: 1.5 * (t * 100 + i + 1), negated for odd i.
            let m = 1.5 * (t * 100 + i as u64 + 1) as f64;
            *v = if i % 2 == 1 { -m } else { m };
        }
        let mut gpr = [0u64; 4];
        for (i, w) in gpr.iter_mut().enumerate() {
            *w = splitmix64(0x7C7C_0000_0000 ^ (t << 16) ^ i as u64);
        }
        Box::new(RegCtx {
            zmm,
            k,
            st,
            gpr,
            onebit_z: [0, 0, 0, 0, 0, 0, 0, 1 << 63],
            onebit_y: [0, 0, 0, 1 << 63],
            scratch: [0; 4],
            // All exceptions masked, FTZ, DAZ, rounding toward zero (t=0)
            // or toward +inf (t=1).
            mxcsr: if t == 0 { 0xFFC0 } else { 0xDFC0 },
            // All exceptions masked, double precision, rounding toward
            // +inf (t=0) or toward zero (t=1).
            fcw: if t == 0 { 0x0A7F } else { 0x0E7F },
            scr_mxcsr: 0,
            scr_fcw: 0,
            orig_mxcsr: 0,
            orig_fcw: 0,
            started: AtomicU32::new(0),
            corrupt: AtomicU32::new(0),
        })
    }
}

/// Runs the AVX-512 register loop until SIGTERM or a mismatch. Returns
/// (0 or the id of the mismatching register, number of full checks).
///
/// # Safety
/// The CPU must support AVX-512F and AVX-512BW; `ctx` must stay valid.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn reg_loop_avx512(ctx: *mut RegCtx, ready: &[u8]) -> (u32, u64) {
    let code: u32;
    let checks: u64;
    // SAFETY: all registers the block changes are declared; MXCSR and the
    // x87 control word are restored and the x87 stack emptied on exit.
    unsafe {
        asm!(
            "stmxcsr dword ptr [r8 + {o_omx}]",
            "fnstcw word ptr [r8 + {o_ofcw}]",
            "fninit",
            "fldcw word ptr [r8 + {o_fcw}]",
            "ldmxcsr dword ptr [r8 + {o_mx}]",
            ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
            r"vmovdqu64 zmm\i, zmmword ptr [r8 + \i*64]",
            ".endr",
            ".irp i, 1,2,3,4,5,6,7",
            r"kmovq k\i, qword ptr [r8 + {o_k} + \i*8]",
            ".endr",
            ".irp i, 7,6,5,4,3,2,1,0",
            r"fld qword ptr [r8 + {o_st} + \i*8]",
            ".endr",
            "mov dword ptr [r8 + {o_started}], 1",
            "test rdx, rdx",
            "jz 2f",
            "mov eax, 1",
            "mov edi, 1",
            "syscall",
            "2:",
            "mov r12, qword ptr [r8 + {o_gpr}]",
            "mov r13, qword ptr [r8 + {o_gpr} + 8]",
            "mov r14, qword ptr [r8 + {o_gpr} + 16]",
            "mov r15, qword ptr [r8 + {o_gpr} + 24]",
            "xor edx, edx",
            // batch loop
            "3:",
            "mov ecx, {batch}",
            "4:",
            ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
            r"mov r11d, 0x100 + \i",
            r"vpcmpeqd k0, zmm\i, zmmword ptr [r8 + \i*64]",
            "kortestw k0, k0",
            "jnc 9f",
            ".endr",
            ".irp i, 1,2,3,4,5,6,7",
            r"mov r11d, 0x200 + \i",
            r"kmovq rax, k\i",
            r"cmp rax, qword ptr [r8 + {o_k} + \i*8]",
            "jne 9f",
            ".endr",
            ".irp i, 12,13,14,15",
            r"mov r11d, 0x500 + \i",
            r"cmp r\i, qword ptr [r8 + {o_gpr} + (\i - 12)*8]",
            "jne 9f",
            ".endr",
            "mov r11d, 0x300",
            "stmxcsr dword ptr [r8 + {o_smx}]",
            "mov eax, dword ptr [r8 + {o_smx}]",
            "cmp eax, dword ptr [r8 + {o_mx}]",
            "jne 9f",
            "mov r11d, 0x400",
            "fnstcw word ptr [r8 + {o_sfcw}]",
            "movzx eax, word ptr [r8 + {o_sfcw}]",
            "cmp eax, dword ptr [r8 + {o_fcw}]",
            "jne 9f",
            ".irp i, 0,1,2,3,4,5,6,7",
            r"mov r11d, 0x600 + \i",
            r"fxch st(\i)",
            r"fcom qword ptr [r8 + {o_st} + \i*8]",
            "fnstsw ax",
            r"fxch st(\i)",
            "and ah, 0x45",
            "cmp ah, 0x40",
            "jne 9f",
            ".endr",
            "inc rdx",
            "dec ecx",
            "jnz 4b",
            // poll SIGTERM, then the self-test request
            "cmp byte ptr [r9], 0",
            "jne 8f",
            "xor eax, eax",
            "xchg eax, dword ptr [r8 + {o_corrupt}]",
            "test eax, eax",
            "jz 3b",
            "cmp eax, 2",
            "jne 5f",
            "kmovq rax, k7",
            "btc rax, 63",
            "kmovq k7, rax",
            "jmp 3b",
            "5:",
            "cmp eax, 3",
            "jne 5f",
            "stmxcsr dword ptr [r8 + {o_smx}]",
            "xor dword ptr [r8 + {o_smx}], 0x40",
            "ldmxcsr dword ptr [r8 + {o_smx}]",
            "jmp 3b",
            "5:",
            "cmp eax, 4",
            "jne 5f",
            "fnstcw word ptr [r8 + {o_sfcw}]",
            "xor word ptr [r8 + {o_sfcw}], 0x800",
            "fldcw word ptr [r8 + {o_sfcw}]",
            "jmp 3b",
            "5:",
            "cmp eax, 5",
            "jne 5f",
            "btc r15, 0",
            "jmp 3b",
            "5:",
            "cmp eax, 6",
            "jne 5f",
            "fxch st(3)",
            "fchs",
            "fxch st(3)",
            "jmp 3b",
            "5:",
            "vpxorq zmm31, zmm31, zmmword ptr [r8 + {o_onebit_z}]",
            "jmp 3b",
            "8:",
            "xor eax, eax",
            "jmp 7f",
            "9:",
            "mov eax, r11d",
            "7:",
            ".rept 8",
            "fstp st(0)",
            ".endr",
            "fldcw word ptr [r8 + {o_ofcw}]",
            "ldmxcsr dword ptr [r8 + {o_omx}]",
            "vzeroupper",
            o_omx = const offset_of!(RegCtx, orig_mxcsr),
            o_ofcw = const offset_of!(RegCtx, orig_fcw),
            o_mx = const offset_of!(RegCtx, mxcsr),
            o_fcw = const offset_of!(RegCtx, fcw),
            o_smx = const offset_of!(RegCtx, scr_mxcsr),
            o_sfcw = const offset_of!(RegCtx, scr_fcw),
            o_k = const offset_of!(RegCtx, k),
            o_st = const offset_of!(RegCtx, st),
            o_gpr = const offset_of!(RegCtx, gpr),
            o_started = const offset_of!(RegCtx, started),
            o_corrupt = const offset_of!(RegCtx, corrupt),
            o_onebit_z = const offset_of!(RegCtx, onebit_z),
            batch = const ZMM_BATCH,
            in("r8") ctx,
            in("r9") TERM.as_ptr(),
            inout("rsi") ready.as_ptr() => _,
            inout("rdx") ready.len() => checks,
            out("rax") code,
            out("rcx") _, out("rdi") _, out("r11") _,
            out("r12") _, out("r13") _, out("r14") _, out("r15") _,
            out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
            out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
            out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
            out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _,
            out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _,
            out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
            out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _,
            out("zmm28") _, out("zmm29") _, out("zmm30") _, out("zmm31") _,
            out("k0") _, out("k1") _, out("k2") _, out("k3") _,
            out("k4") _, out("k5") _, out("k6") _, out("k7") _,
            out("st(0)") _, out("st(1)") _, out("st(2)") _, out("st(3)") _,
            out("st(4)") _, out("st(5)") _, out("st(6)") _, out("st(7)") _,
            options(nostack),
        );
    }
    (code, checks)
}

/// Fallback without AVX-512: ymm0..15 (full 256 bits), no opmask registers.
///
/// # Safety
/// The CPU must support AVX; `ctx` must stay valid.
#[target_feature(enable = "avx")]
unsafe fn reg_loop_ymm(ctx: *mut RegCtx, ready: &[u8]) -> (u32, u64) {
    let code: u32;
    let checks: u64;
    // SAFETY: as in reg_loop_avx512.
    unsafe {
        asm!(
            "stmxcsr dword ptr [r8 + {o_omx}]",
            "fnstcw word ptr [r8 + {o_ofcw}]",
            "fninit",
            "fldcw word ptr [r8 + {o_fcw}]",
            "ldmxcsr dword ptr [r8 + {o_mx}]",
            ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
            r"vmovdqu ymm\i, ymmword ptr [r8 + \i*64]",
            ".endr",
            ".irp i, 7,6,5,4,3,2,1,0",
            r"fld qword ptr [r8 + {o_st} + \i*8]",
            ".endr",
            "mov dword ptr [r8 + {o_started}], 1",
            "test rdx, rdx",
            "jz 2f",
            "mov eax, 1",
            "mov edi, 1",
            "syscall",
            "2:",
            "mov r12, qword ptr [r8 + {o_gpr}]",
            "mov r13, qword ptr [r8 + {o_gpr} + 8]",
            "mov r14, qword ptr [r8 + {o_gpr} + 16]",
            "mov r15, qword ptr [r8 + {o_gpr} + 24]",
            "xor edx, edx",
            "3:",
            "mov ecx, {batch}",
            "4:",
            ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
            r"mov r11d, 0x700 + \i",
            r"vmovdqu ymmword ptr [r8 + {o_scr}], ymm\i",
            "mov rax, qword ptr [r8 + {o_scr}]",
            r"cmp rax, qword ptr [r8 + \i*64]",
            "jne 9f",
            "mov rax, qword ptr [r8 + {o_scr} + 8]",
            r"cmp rax, qword ptr [r8 + \i*64 + 8]",
            "jne 9f",
            "mov rax, qword ptr [r8 + {o_scr} + 16]",
            r"cmp rax, qword ptr [r8 + \i*64 + 16]",
            "jne 9f",
            "mov rax, qword ptr [r8 + {o_scr} + 24]",
            r"cmp rax, qword ptr [r8 + \i*64 + 24]",
            "jne 9f",
            ".endr",
            ".irp i, 12,13,14,15",
            r"mov r11d, 0x500 + \i",
            r"cmp r\i, qword ptr [r8 + {o_gpr} + (\i - 12)*8]",
            "jne 9f",
            ".endr",
            "mov r11d, 0x300",
            "stmxcsr dword ptr [r8 + {o_smx}]",
            "mov eax, dword ptr [r8 + {o_smx}]",
            "cmp eax, dword ptr [r8 + {o_mx}]",
            "jne 9f",
            "mov r11d, 0x400",
            "fnstcw word ptr [r8 + {o_sfcw}]",
            "movzx eax, word ptr [r8 + {o_sfcw}]",
            "cmp eax, dword ptr [r8 + {o_fcw}]",
            "jne 9f",
            ".irp i, 0,1,2,3,4,5,6,7",
            r"mov r11d, 0x600 + \i",
            r"fxch st(\i)",
            r"fcom qword ptr [r8 + {o_st} + \i*8]",
            "fnstsw ax",
            r"fxch st(\i)",
            "and ah, 0x45",
            "cmp ah, 0x40",
            "jne 9f",
            ".endr",
            "inc rdx",
            "dec ecx",
            "jnz 4b",
            "cmp byte ptr [r9], 0",
            "jne 8f",
            "xor eax, eax",
            "xchg eax, dword ptr [r8 + {o_corrupt}]",
            "test eax, eax",
            "jz 3b",
            "cmp eax, 3",
            "jne 5f",
            "stmxcsr dword ptr [r8 + {o_smx}]",
            "xor dword ptr [r8 + {o_smx}], 0x40",
            "ldmxcsr dword ptr [r8 + {o_smx}]",
            "jmp 3b",
            "5:",
            "cmp eax, 4",
            "jne 5f",
            "fnstcw word ptr [r8 + {o_sfcw}]",
            "xor word ptr [r8 + {o_sfcw}], 0x800",
            "fldcw word ptr [r8 + {o_sfcw}]",
            "jmp 3b",
            "5:",
            "cmp eax, 5",
            "jne 5f",
            "btc r15, 0",
            "jmp 3b",
            "5:",
            "cmp eax, 6",
            "jne 5f",
            "fxch st(3)",
            "fchs",
            "fxch st(3)",
            "jmp 3b",
            "5:",
            "vxorps ymm15, ymm15, ymmword ptr [r8 + {o_onebit_y}]",
            "jmp 3b",
            "8:",
            "xor eax, eax",
            "jmp 7f",
            "9:",
            "mov eax, r11d",
            "7:",
            ".rept 8",
            "fstp st(0)",
            ".endr",
            "fldcw word ptr [r8 + {o_ofcw}]",
            "ldmxcsr dword ptr [r8 + {o_omx}]",
            "vzeroupper",
            o_omx = const offset_of!(RegCtx, orig_mxcsr),
            o_ofcw = const offset_of!(RegCtx, orig_fcw),
            o_mx = const offset_of!(RegCtx, mxcsr),
            o_fcw = const offset_of!(RegCtx, fcw),
            o_smx = const offset_of!(RegCtx, scr_mxcsr),
            o_sfcw = const offset_of!(RegCtx, scr_fcw),
            o_st = const offset_of!(RegCtx, st),
            o_gpr = const offset_of!(RegCtx, gpr),
            o_scr = const offset_of!(RegCtx, scratch),
            o_started = const offset_of!(RegCtx, started),
            o_corrupt = const offset_of!(RegCtx, corrupt),
            o_onebit_y = const offset_of!(RegCtx, onebit_y),
            batch = const ZMM_BATCH,
            in("r8") ctx,
            in("r9") TERM.as_ptr(),
            inout("rsi") ready.as_ptr() => _,
            inout("rdx") ready.len() => checks,
            out("rax") code,
            out("rcx") _, out("rdi") _, out("r11") _,
            out("r12") _, out("r13") _, out("r14") _, out("r15") _,
            out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
            out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
            out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
            out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
            out("st(0)") _, out("st(1)") _, out("st(2)") _, out("st(3)") _,
            out("st(4)") _, out("st(5)") _, out("st(6)") _, out("st(7)") _,
            options(nostack),
        );
    }
    (code, checks)
}

fn reg_name(code: u32) -> String {
    let i = code & 0xFF;
    match code >> 8 {
        1 => format!("zmm{i}"),
        2 => format!("k{i}"),
        3 => "MXCSR".into(),
        4 => "x87 control word".into(),
        5 => format!("r{i}"),
        6 => format!("st({i})"),
        7 => format!("ymm{i}"),
        _ => format!("register code {code:#x}"),
    }
}

fn run_regs(ctx: usize, avx512: bool, ready: &[u8]) -> (u32, u64) {
    let ctx = ctx as *mut RegCtx;
    // SAFETY: the features were checked by the caller; ctx is leaked.
    unsafe {
        if avx512 {
            reg_loop_avx512(ctx, ready)
        } else {
            reg_loop_ymm(ctx, ready)
        }
    }
}

fn mode_zmm() -> Result<String, String> {
    let common = common_init(0);
    let forced = std::env::var("PDUMP_VICTIM_FORCE_YMM").is_ok_and(|v| !v.is_empty() && v != "0");
    let avx512 = !forced
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw");
    if !avx512 && !std::arch::is_x86_feature_detected!("avx") {
        return Err("zmm: the CPU supports neither AVX-512 nor AVX".into());
    }
    let corrupt = corrupt_request().map(|v| match v.as_str() {
        "k" if avx512 => 2,
        "mxcsr" => 3,
        "fcw" => 4,
        "gpr" => 5,
        "x87" => 6,
        _ => 1,
    });
    let ctx_main: &'static RegCtx = Box::leak(RegCtx::new(0));
    let ctx_worker: &'static RegCtx = Box::leak(RegCtx::new(1));
    if let Some(c) = corrupt {
        ctx_main.corrupt.store(c, Ordering::SeqCst);
    }
    let wptr = ctx_worker as *const RegCtx as usize;
    let mask = common.mask;
    let worker = std::thread::Builder::new()
        .name("zmm-worker".into())
        .spawn(move || {
            let alt = install_altstack();
            let (code, checks) = run_regs(wptr, avx512, &[]);
            if code != 0 {
                fail(format!("zmm: worker thread: {} corrupted", reg_name(code)));
            }
            verify_thread("zmm worker thread", mask, &alt).map(|()| checks)
        })
        .map_err(|e| format!("zmm: spawn: {e}"))?;
    while ctx_worker.started.load(Ordering::SeqCst) == 0 {
        if worker.is_finished() {
            return Err("zmm: worker thread ended before loading its registers".into());
        }
        std::thread::yield_now();
    }
    let note = if avx512 { "avx512" } else { "ymm-fallback" };
    let ready = format!("READY {} {}\n", getpid(), note);
    let (code, checks_main) =
        run_regs(ctx_main as *const RegCtx as usize, avx512, ready.as_bytes());
    if code != 0 {
        return Err(format!("zmm: main thread: {} corrupted", reg_name(code)));
    }
    let checks_worker = worker
        .join()
        .map_err(|_| "zmm: worker panicked".to_string())??;
    if checks_main == 0 || checks_worker == 0 {
        return Err(format!(
            "zmm: no complete checks (main {checks_main}, worker {checks_worker})"
        ));
    }
    common.verify()?;
    Ok(format!("OK checks={}", checks_main + checks_worker))
}

// ---------------------------------------------------------------------------
// threads
// ---------------------------------------------------------------------------

thread_local! {
    static TLS_VAL: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn thread_stack_word(idx: usize, j: usize) -> u64 {
    splitmix64(0x57AC_0000_0000 ^ ((idx as u64) << 20) ^ j as u64)
}

struct ThreadsShared {
    stop: AtomicBool,
    started: AtomicUsize,
    total: AtomicU64,
    counts: Vec<AtomicU64>,
}

fn thread_worker(idx: usize, sh: &ThreadsShared, mask: u64) -> u64 {
    let alt = install_altstack();
    let tls_expect = opaque(splitmix64(0x7EAD_0000 ^ idx as u64));
    TLS_VAL.with(|c| c.set(tls_expect));
    let mut stackbuf = [0u64; 512];
    for (j, w) in stackbuf.iter_mut().enumerate() {
        // SAFETY: a valid element of a local array.
        unsafe { write_volatile(w, thread_stack_word(idx, j)) };
    }
    let verify_stack = |buf: &[u64; 512], what: &str| {
        for (j, w) in buf.iter().enumerate() {
            // SAFETY: a valid element of a local array.
            let v = unsafe { read_volatile(w) };
            if v != thread_stack_word(idx, j) {
                fail(format!(
                    "threads: thread {idx}: {what}: stack word {j} is {v:#x}"
                ));
            }
        }
    };
    let mut counter = 0u64;
    sh.started.fetch_add(1, Ordering::SeqCst);
    while !sh.stop.load(Ordering::Acquire) {
        counter += 1;
        sh.counts[idx].store(counter, Ordering::Relaxed);
        sh.total.fetch_add(1, Ordering::Relaxed);
        let j = counter as usize & 511;
        // SAFETY: a valid element of a local array.
        let v = unsafe { read_volatile(&stackbuf[j]) };
        if v != thread_stack_word(idx, j) {
            fail(format!(
                "threads: thread {idx}: stack word {j} is {v:#x} at iteration {counter}"
            ));
        }
        // SAFETY: the cell belongs to this thread.
        let t = TLS_VAL.with(|c| unsafe { read_volatile(c.as_ptr()) });
        if t != tls_expect {
            fail(format!(
                "threads: thread {idx}: thread-local value {t:#x}, expected {tls_expect:#x}"
            ));
        }
        if counter & 4095 == 0 {
            verify_stack(&stackbuf, "periodic check");
            let c = sh.counts[idx].load(Ordering::Relaxed);
            if c != counter {
                fail(format!(
                    "threads: thread {idx}: shared counter {c}, local {counter}"
                ));
            }
        }
    }
    verify_stack(&stackbuf, "final check");
    if let Err(e) = verify_thread(&format!("threads: thread {idx}"), mask, &alt) {
        fail(e);
    }
    counter
}

fn mode_threads(n: usize) -> Result<String, String> {
    if n == 0 {
        return Err("threads: N must be at least 1".into());
    }
    let common = common_init(sigbit(libc::SIGTERM));
    let sh = Arc::new(ThreadsShared {
        stop: AtomicBool::new(false),
        started: AtomicUsize::new(0),
        total: AtomicU64::new(0),
        counts: (0..n).map(|_| AtomicU64::new(0)).collect(),
    });
    let mut handles = Vec::new();
    for idx in 0..n {
        let sh = sh.clone();
        let mask = common.mask;
        let h = std::thread::Builder::new()
            .name(format!("victim-{idx}"))
            .spawn(move || thread_worker(idx, &sh, mask))
            .map_err(|e| format!("threads: spawn: {e}"))?;
        handles.push(h);
    }
    while sh.started.load(Ordering::SeqCst) != n {
        if handles.iter().any(|h| h.is_finished()) {
            return Err("threads: a worker ended before starting".into());
        }
        std::thread::yield_now();
    }
    emit(&format!("READY {} {}", getpid(), n));
    let suspend_mask = sigbit(libc::SIGUSR2);
    while !term_requested() {
        // SAFETY: valid pointer to an 8-byte kernel sigset.
        unsafe { libc::syscall(libc::SYS_rt_sigsuspend, &suspend_mask as *const u64, 8usize) };
    }
    sh.stop.store(true, Ordering::Release);
    let mut sum = 0u64;
    for (idx, h) in handles.into_iter().enumerate() {
        let c = h
            .join()
            .map_err(|_| format!("threads: thread {idx} panicked"))?;
        let shared = sh.counts[idx].load(Ordering::SeqCst);
        if c != shared {
            return Err(format!(
                "threads: thread {idx}: counter {c}, shared slot {shared}"
            ));
        }
        if c == 0 {
            return Err(format!("threads: thread {idx} never ran"));
        }
        sum += c;
    }
    let total = sh.total.load(Ordering::SeqCst);
    if sum != total {
        return Err(format!(
            "threads: per-thread counters add up to {sum}, shared total is {total}"
        ));
    }
    common.verify()?;
    Ok(format!("OK threads={n}"))
}

// ---------------------------------------------------------------------------
// sleep, read
// ---------------------------------------------------------------------------

fn mode_sleep(ms: u64) -> Result<String, String> {
    set_mask(sigbit(libc::SIGUSR2));
    emit(&format!("READY {} {}", getpid(), ms));
    let req = libc::timespec {
        tv_sec: (ms / 1000) as _,
        tv_nsec: ((ms % 1000) * 1_000_000) as _,
    };
    // SAFETY: plain zeroed timespec.
    let mut rem: libc::timespec = unsafe { zeroed() };
    let t0 = monotonic_ns();
    // SAFETY: valid request and remainder pointers.
    let r = unsafe { libc::nanosleep(&req, &mut rem) };
    let e = errno();
    let t1 = monotonic_ns();
    if r != 0 {
        return Err(format!(
            "sleep: nanosleep returned {r}: {e} (remaining {}.{:09} s, after {} ms)",
            rem.tv_sec,
            rem.tv_nsec,
            (t1 - t0) / 1_000_000
        ));
    }
    Ok(format!("SLEPT {}", (t1 - t0) / 1_000_000))
}

fn mode_read() -> Result<String, String> {
    set_mask(sigbit(libc::SIGUSR2));
    emit(&format!("READY {}", getpid()));
    let mut buf = [0u8; 64];
    // SAFETY: valid buffer of 64 bytes.
    let r = unsafe { libc::read(0, buf.as_mut_ptr().cast(), 64) };
    if r < 0 {
        return Err(format!("read: read(0) failed: {}", errno()));
    }
    if r == 0 {
        return Err("read: read(0) returned end of file".into());
    }
    Ok(format!(
        "GOT {}",
        String::from_utf8_lossy(&buf[..r as usize]).trim()
    ))
}

// ---------------------------------------------------------------------------
// pattern
// ---------------------------------------------------------------------------

const PATTERN_EXTRA_PAGES: usize = 16;

/// The permissions of the mapping containing `addr`, from /proc/self/maps.
fn maps_perms(addr: usize) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    for l in maps.lines() {
        let mut it = l.split_whitespace();
        let range = it.next()?;
        let perms = it.next()?;
        let (a, b) = range.split_once('-')?;
        let a = usize::from_str_radix(a, 16).ok()?;
        let b = usize::from_str_radix(b, 16).ok()?;
        if a <= addr && addr < b {
            return Some(perms.to_string());
        }
    }
    None
}

fn mode_pattern(pages: usize, seed: u64) -> Result<String, String> {
    if pages == 0 {
        return Err("pattern: PAGES must be at least 1".into());
    }
    let common = common_init(0);
    let total = (pages + PATTERN_EXTRA_PAGES) * PAGE;
    // SAFETY: fresh anonymous mapping, only used through raw pointers below.
    let base = unsafe {
        let p = libc::mmap(
            null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(format!("pattern: mmap: {}", errno()));
        }
        if libc::madvise(p, total, libc::MADV_NOHUGEPAGE) != 0 {
            return Err(format!("pattern: madvise(NOHUGEPAGE): {}", errno()));
        }
        if libc::mprotect(
            p.cast::<u8>().add(pages * PAGE).cast(),
            PATTERN_EXTRA_PAGES * PAGE,
            libc::PROT_READ,
        ) != 0
        {
            return Err(format!("pattern: mprotect: {}", errno()));
        }
        p as usize
    };
    let extra = base + pages * PAGE;
    let word = |i: usize, j: usize| (base + i * PAGE + j * 8) as *mut u64;
    for i in 0..pages {
        let val: Option<fn(u64, u64, u64) -> u64> = match pattern_page_kind(i as u64) {
            PageKind::Untouched => continue,
            PageKind::Zero => None,
            PageKind::Pattern => Some(pattern_word),
        };
        for j in 0..PAGE / 8 {
            let v = val.map_or(0, |f| f(seed, i as u64, j as u64));
            // SAFETY: inside our read-write mapping.
            unsafe { write_volatile(word(i, j), v) };
        }
    }
    emit(&format!(
        "READY {} {:#x} {} {:#x}",
        getpid(),
        base,
        pages,
        extra
    ));
    if let Some(c) = corrupt_request() {
        // SAFETY: addresses inside our mapping.
        unsafe {
            match c.as_str() {
                "touch" => {
                    read_volatile(word(0, 0));
                }
                "touch-extra" => {
                    read_volatile((extra + 3 * PAGE) as *const u64);
                }
                _ => {
                    let i = (0..pages)
                        .find(|&i| pattern_page_kind(i as u64) == PageKind::Pattern)
                        .or_else(|| {
                            (0..pages).find(|&i| pattern_page_kind(i as u64) == PageKind::Zero)
                        });
                    if let Some(i) = i {
                        write_volatile(word(i, 0), read_volatile(word(i, 0)) ^ 1);
                    }
                }
            }
        }
    }
    wait_for_term();

    // Residency first: nothing below may read an untouched page.
    let n = pages + PATTERN_EXTRA_PAGES;
    let mut vec = vec![0u8; n];
    // SAFETY: base..base+total is our mapping; vec has one byte per page.
    if unsafe { libc::mincore(base as *mut c_void, total, vec.as_mut_ptr()) } != 0 {
        return Err(format!("pattern: mincore: {}", errno()));
    }
    for (i, &v) in vec.iter().enumerate() {
        let present = v & 1 != 0;
        let want = i < pages && pattern_page_kind(i as u64) != PageKind::Untouched;
        if present != want {
            let what = if i >= pages {
                format!("page {} of the untouched region", i - pages)
            } else {
                format!("{:?} page {i}", pattern_page_kind(i as u64))
            };
            return Err(format!(
                "pattern: {what} is {}present",
                if present { "" } else { "not " }
            ));
        }
    }
    match (
        maps_perms(base).as_deref(),
        maps_perms(extra).as_deref(),
        maps_perms(base + pages * PAGE - 1).as_deref(),
    ) {
        (Some("rw-p"), Some("r--p"), Some("rw-p")) => {}
        other => {
            return Err(format!(
                "pattern: mapping permissions {other:?}, expected rw-p and r--p"
            ))
        }
    }
    for i in 0..pages {
        let kind = pattern_page_kind(i as u64);
        if kind == PageKind::Untouched {
            continue;
        }
        for j in 0..PAGE / 8 {
            // SAFETY: a present page of our mapping.
            let v = unsafe { read_volatile(word(i, j)) };
            let want = if kind == PageKind::Zero {
                0
            } else {
                pattern_word(seed, i as u64, j as u64)
            };
            if v != want {
                return Err(format!(
                    "pattern: page {i} ({kind:?}) word {j} is {v:#x}, expected {want:#x}"
                ));
            }
        }
    }
    common.verify()?;
    Ok(format!("OK pages={pages}"))
}

// ---------------------------------------------------------------------------
// fds
// ---------------------------------------------------------------------------

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn check_fd(r: c_int, what: &str) -> Result<c_int, String> {
    if r < 0 {
        Err(format!("fds: {what}: {}", errno()))
    } else {
        Ok(r)
    }
}

fn write_all(fd: c_int, data: &[u8], what: &str) -> Result<(), String> {
    // SAFETY: valid buffer.
    let r = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    if r != data.len() as isize {
        return Err(format!("fds: write {what}: returned {r}: {}", errno()));
    }
    Ok(())
}

fn fstat(fd: c_int, what: &str) -> Result<libc::stat, String> {
    // SAFETY: valid out pointer.
    let mut st: libc::stat = unsafe { zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(format!("fds: fstat {what}: {}", errno()));
    }
    Ok(st)
}

fn stat_path(p: &Path) -> Result<libc::stat, String> {
    let c = cpath(p);
    // SAFETY: valid path and out pointer.
    let mut st: libc::stat = unsafe { zeroed() };
    if unsafe { libc::stat(c.as_ptr(), &mut st) } != 0 {
        return Err(format!("fds: stat {}: {}", p.display(), errno()));
    }
    Ok(st)
}

fn fd_link(fd: c_int) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn offset(fd: c_int) -> i64 {
    // SAFETY: lseek has no memory preconditions.
    unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) }
}

fn pread_exact(fd: c_int, len: usize, what: &str) -> Result<Vec<u8>, String> {
    let mut v = vec![0u8; len];
    // SAFETY: valid buffer of len bytes.
    let r = unsafe { libc::pread(fd, v.as_mut_ptr().cast(), len, 0) };
    if r != len as isize {
        return Err(format!("fds: pread {what}: returned {r}: {}", errno()));
    }
    Ok(v)
}

fn read_exact(fd: c_int, len: usize, what: &str) -> Result<Vec<u8>, String> {
    let mut v = vec![0u8; len];
    // SAFETY: valid buffer of len bytes.
    let r = unsafe { libc::read(fd, v.as_mut_ptr().cast(), len) };
    if r != len as isize {
        return Err(format!("fds: read {what}: returned {r}: {}", errno()));
    }
    Ok(v)
}

fn fionread(fd: c_int, what: &str) -> Result<usize, String> {
    let mut n: c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } != 0 {
        return Err(format!("fds: FIONREAD {what}: {}", errno()));
    }
    Ok(n as usize)
}

fn fd_flags(fd: c_int) -> (c_int, c_int) {
    // SAFETY: fcntl queries.
    unsafe {
        (
            libc::fcntl(fd, libc::F_GETFL),
            libc::fcntl(fd, libc::F_GETFD),
        )
    }
}

fn regular_content() -> Vec<u8> {
    (0..1000u32).map(|k| (k * 31 + 7) as u8).collect()
}

fn memfd_content() -> Vec<u8> {
    (0..3 * PAGE / 8)
        .flat_map(|j| splitmix64(0x3E3F_D000 ^ j as u64).to_le_bytes())
        .collect()
}

const MEMFD_OFFSET: i64 = 5000;

struct Fds {
    dir: PathBuf,
    reg_path: PathBuf,
    unl_path: PathBuf,
    fifo_path: PathBuf,
    reg: c_int,
    unl: c_int,
    dfd: c_int,
    null: c_int,
    zero: c_int,
    pr: c_int,
    pw: c_int,
    fifo: c_int,
    efd: c_int,
    mfd: c_int,
}

fn open_fds() -> Result<Fds, String> {
    let dir = std::env::var_os("PDUMP_VICTIM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let dir = std::fs::canonicalize(&dir)
        .map_err(|e| format!("fds: directory {}: {e}", dir.display()))?;
    let pid = getpid();
    let reg_path = dir.join(format!("pdump-victim-{pid}-regular"));
    let unl_path = dir.join(format!("pdump-victim-{pid}-unlinked"));
    let fifo_path = dir.join(format!("pdump-victim-{pid}-fifo"));
    for p in [&reg_path, &unl_path, &fifo_path] {
        let _ = std::fs::remove_file(p);
    }
    let rw_create = libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC;
    // SAFETY: all calls below get valid NUL-terminated paths and buffers.
    unsafe {
        let reg = check_fd(
            libc::open(cpath(&reg_path).as_ptr(), rw_create, 0o644),
            "open regular",
        )?;
        write_all(reg, &regular_content(), "regular")?;
        if libc::lseek(reg, 123, libc::SEEK_SET) != 123 {
            return Err(format!("fds: lseek regular: {}", errno()));
        }
        let unl = check_fd(
            libc::open(cpath(&unl_path).as_ptr(), rw_create, 0o600),
            "open unlinked",
        )?;
        write_all(unl, b"unlinked-data", "unlinked")?;
        if libc::unlink(cpath(&unl_path).as_ptr()) != 0 {
            return Err(format!("fds: unlink: {}", errno()));
        }
        let dfd = check_fd(
            libc::open(
                cpath(&dir).as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            ),
            "open directory",
        )?;
        let null = check_fd(
            libc::open(c"/dev/null".as_ptr(), libc::O_RDWR),
            "open /dev/null",
        )?;
        let zero = check_fd(
            libc::open(c"/dev/zero".as_ptr(), libc::O_RDONLY),
            "open /dev/zero",
        )?;
        let mut p = [0 as c_int; 2];
        check_fd(libc::pipe(p.as_mut_ptr()), "pipe")?;
        write_all(p[1], b"buffered", "pipe")?;
        check_fd(libc::mkfifo(cpath(&fifo_path).as_ptr(), 0o600), "mkfifo")?;
        let fifo = check_fd(
            libc::open(cpath(&fifo_path).as_ptr(), libc::O_RDWR),
            "open fifo",
        )?;
        write_all(fifo, b"fifo-data", "fifo")?;
        let efd = check_fd(libc::eventfd(42, libc::EFD_NONBLOCK), "eventfd")?;
        let mfd = check_fd(
            libc::memfd_create(c"victim-memfd".as_ptr(), libc::MFD_CLOEXEC),
            "memfd_create",
        )?;
        write_all(mfd, &memfd_content(), "memfd")?;
        if libc::lseek(mfd, MEMFD_OFFSET, libc::SEEK_SET) != MEMFD_OFFSET {
            return Err(format!("fds: lseek memfd: {}", errno()));
        }
        Ok(Fds {
            dir,
            reg_path,
            unl_path,
            fifo_path,
            reg,
            unl,
            dfd,
            null,
            zero,
            pr: p[0],
            pw: p[1],
            fifo,
            efd,
            mfd,
        })
    }
}

fn expect<T: PartialEq + std::fmt::Debug>(what: &str, got: T, want: T) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("fds: {what}: {got:?}, expected {want:?}"))
    }
}

fn verify_fds(f: &Fds) -> Result<(), String> {
    let acc = |fd| fd_flags(fd).0 & libc::O_ACCMODE;
    let cloexec = |fd| fd_flags(fd).1 & libc::FD_CLOEXEC;

    // (1) regular file
    let st = fstat(f.reg, "regular")?;
    let pst = stat_path(&f.reg_path)?;
    expect(
        "regular file identity",
        (st.st_dev, st.st_ino),
        (pst.st_dev, pst.st_ino),
    )?;
    expect(
        "regular file link",
        fd_link(f.reg),
        f.reg_path.display().to_string(),
    )?;
    expect("regular file offset", offset(f.reg), 123)?;
    expect("regular file size", st.st_size, 1000)?;
    expect("regular file access mode", acc(f.reg), libc::O_RDWR)?;
    expect("regular file cloexec", cloexec(f.reg), 0)?;
    expect(
        "regular file content",
        pread_exact(f.reg, 1000, "regular")?,
        regular_content(),
    )?;

    // (2) unlinked file
    let st = fstat(f.unl, "unlinked")?;
    expect("unlinked file nlink", st.st_nlink, 0)?;
    expect("unlinked file size", st.st_size, 13)?;
    expect("unlinked file offset", offset(f.unl), 13)?;
    expect("unlinked file access mode", acc(f.unl), libc::O_RDWR)?;
    expect(
        "unlinked file link",
        fd_link(f.unl),
        format!("{} (deleted)", f.unl_path.display()),
    )?;
    expect(
        "unlinked file content",
        pread_exact(f.unl, 13, "unlinked")?,
        b"unlinked-data".to_vec(),
    )?;

    // (3) directory
    let st = fstat(f.dfd, "directory")?;
    let pst = stat_path(&f.dir)?;
    expect("directory type", st.st_mode & libc::S_IFMT, libc::S_IFDIR)?;
    expect(
        "directory identity",
        (st.st_dev, st.st_ino),
        (pst.st_dev, pst.st_ino),
    )?;
    expect(
        "directory link",
        fd_link(f.dfd),
        f.dir.display().to_string(),
    )?;
    expect("directory cloexec", cloexec(f.dfd), libc::FD_CLOEXEC)?;

    // (4) /dev/null, (5) /dev/zero
    let st = fstat(f.null, "/dev/null")?;
    expect("/dev/null type", st.st_mode & libc::S_IFMT, libc::S_IFCHR)?;
    expect("/dev/null rdev", st.st_rdev, libc::makedev(1, 3))?;
    expect("/dev/null access mode", acc(f.null), libc::O_RDWR)?;
    write_all(f.null, b"x", "/dev/null").map_err(|e| format!("{e} (/dev/null)"))?;
    let st = fstat(f.zero, "/dev/zero")?;
    expect("/dev/zero type", st.st_mode & libc::S_IFMT, libc::S_IFCHR)?;
    expect("/dev/zero rdev", st.st_rdev, libc::makedev(1, 5))?;
    expect("/dev/zero access mode", acc(f.zero), libc::O_RDONLY)?;
    expect(
        "/dev/zero content",
        read_exact(f.zero, 16, "/dev/zero")?,
        vec![0u8; 16],
    )?;

    // (6), (7) pipe
    let sr = fstat(f.pr, "pipe read end")?;
    let sw = fstat(f.pw, "pipe write end")?;
    expect(
        "pipe read end type",
        sr.st_mode & libc::S_IFMT,
        libc::S_IFIFO,
    )?;
    expect(
        "pipe ends are one pipe",
        (sr.st_dev, sr.st_ino),
        (sw.st_dev, sw.st_ino),
    )?;
    expect("pipe read end access mode", acc(f.pr), libc::O_RDONLY)?;
    expect("pipe write end access mode", acc(f.pw), libc::O_WRONLY)?;
    expect("pipe buffered bytes", fionread(f.pr, "pipe")?, 8)?;
    expect(
        "pipe content",
        read_exact(f.pr, 8, "pipe")?,
        b"buffered".to_vec(),
    )?;
    write_all(f.pw, b"again", "pipe")?;
    expect("pipe bytes after a new write", fionread(f.pr, "pipe")?, 5)?;
    expect(
        "pipe new content",
        read_exact(f.pr, 5, "pipe")?,
        b"again".to_vec(),
    )?;

    // (8) FIFO
    let st = fstat(f.fifo, "fifo")?;
    let pst = stat_path(&f.fifo_path)?;
    expect("fifo type", st.st_mode & libc::S_IFMT, libc::S_IFIFO)?;
    expect(
        "fifo identity",
        (st.st_dev, st.st_ino),
        (pst.st_dev, pst.st_ino),
    )?;
    expect(
        "fifo link",
        fd_link(f.fifo),
        f.fifo_path.display().to_string(),
    )?;
    expect("fifo access mode", acc(f.fifo), libc::O_RDWR)?;
    expect("fifo buffered bytes", fionread(f.fifo, "fifo")?, 9)?;
    expect(
        "fifo content",
        read_exact(f.fifo, 9, "fifo")?,
        b"fifo-data".to_vec(),
    )?;

    // (9) eventfd
    expect(
        "eventfd link",
        fd_link(f.efd),
        "anon_inode:[eventfd]".to_string(),
    )?;
    expect(
        "eventfd O_NONBLOCK",
        fd_flags(f.efd).0 & libc::O_NONBLOCK,
        libc::O_NONBLOCK,
    )?;
    let c = read_exact(f.efd, 8, "eventfd")?;
    expect(
        "eventfd count",
        u64::from_ne_bytes(c.try_into().unwrap()),
        42,
    )?;

    // (10) memfd
    let st = fstat(f.mfd, "memfd")?;
    expect(
        "memfd link",
        fd_link(f.mfd),
        "/memfd:victim-memfd (deleted)".to_string(),
    )?;
    expect("memfd size", st.st_size, 3 * PAGE as i64)?;
    expect("memfd offset", offset(f.mfd), MEMFD_OFFSET)?;
    expect("memfd cloexec", cloexec(f.mfd), libc::FD_CLOEXEC)?;
    expect(
        "memfd content",
        pread_exact(f.mfd, 3 * PAGE, "memfd")? == memfd_content(),
        true,
    )?;
    Ok(())
}

fn mode_fds() -> Result<String, String> {
    let common = common_init(0);
    let f = open_fds()?;
    emit(&format!(
        "READY {} {} {} {} {} {} {} {} {} {} {}",
        getpid(),
        f.reg,
        f.unl,
        f.dfd,
        f.null,
        f.zero,
        f.pr,
        f.pw,
        f.fifo,
        f.efd,
        f.mfd
    ));
    wait_for_term();
    let r = verify_fds(&f);
    let _ = std::fs::remove_file(&f.reg_path);
    let _ = std::fs::remove_file(&f.fifo_path);
    r?;
    common.verify()?;
    Ok("OK fds=10".into())
}

// ---------------------------------------------------------------------------
// timers
// ---------------------------------------------------------------------------

static ALRM: AtomicU64 = AtomicU64::new(0);
static USR1: AtomicU64 = AtomicU64::new(0);
static USR1_BAD: AtomicU64 = AtomicU64::new(0);
const TIMER_COOKIE: usize = 0x7157_C00C;

extern "C" fn on_alrm(_sig: c_int) {
    ALRM.fetch_add(1, Ordering::SeqCst);
}

extern "C" fn on_usr1(_sig: c_int, info: *mut libc::siginfo_t, _uc: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let ok = unsafe {
        (*info).si_code == libc::SI_TIMER && (*info).si_value().sival_ptr as usize == TIMER_COOKIE
    };
    if ok {
        USR1.fetch_add(1, Ordering::SeqCst);
    } else {
        USR1_BAD.fetch_add(1, Ordering::SeqCst);
    }
}

fn mode_timers() -> Result<String, String> {
    let common = common_init(0);
    let alrm_act = install_handler(
        libc::SIGALRM,
        on_alrm as *const () as usize,
        libc::SA_RESTART,
    );
    let usr1_act = install_handler(
        libc::SIGUSR1,
        on_usr1 as *const () as usize,
        libc::SA_RESTART | libc::SA_SIGINFO,
    );
    let ms = |n: i64| libc::timespec {
        tv_sec: 0,
        tv_nsec: n * 1_000_000,
    };
    let us = |n: i64| libc::timeval {
        tv_sec: 0,
        tv_usec: n * 1000,
    };
    // SAFETY: timer_create/settime and setitimer with valid local structs.
    let timer = unsafe {
        let mut sev: libc::sigevent = zeroed();
        sev.sigev_notify = libc::SIGEV_SIGNAL;
        sev.sigev_signo = libc::SIGUSR1;
        sev.sigev_value = libc::sigval {
            sival_ptr: TIMER_COOKIE as *mut c_void,
        };
        let mut t: libc::timer_t = null_mut();
        if libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut t) != 0 {
            return Err(format!("timers: timer_create: {}", errno()));
        }
        let its = libc::itimerspec {
            it_interval: ms(50),
            it_value: ms(50),
        };
        if libc::timer_settime(t, 0, &its, null_mut()) != 0 {
            return Err(format!("timers: timer_settime: {}", errno()));
        }
        let itv = libc::itimerval {
            it_interval: us(100),
            it_value: us(100),
        };
        if libc::setitimer(libc::ITIMER_REAL, &itv, null_mut()) != 0 {
            return Err(format!("timers: setitimer: {}", errno()));
        }
        t
    };
    emit(&format!("READY {}", getpid()));
    let (mut la, mut lu) = (0, 0);
    let check_progress = |la: &mut u64, lu: &mut u64| -> Result<(), String> {
        let (a, u) = (ALRM.load(Ordering::SeqCst), USR1.load(Ordering::SeqCst));
        if a < *la || u < *lu {
            return Err(format!(
                "timers: tick counters went backwards: alrm {la}->{a}, usr1 {lu}->{u}"
            ));
        }
        let bad = USR1_BAD.load(Ordering::SeqCst);
        if bad != 0 {
            return Err(format!(
                "timers: {bad} SIGUSR1 signals without the timer's si_code/sigev_value"
            ));
        }
        (*la, *lu) = (a, u);
        Ok(())
    };
    while !term_requested() {
        nap(50);
        check_progress(&mut la, &mut lu)?;
    }
    // The timers must still fire: two more ticks of each (liveness bound 10 s).
    let (a0, u0) = (la, lu);
    let start = monotonic_ns();
    while la < a0 + 2 || lu < u0 + 2 {
        if monotonic_ns() - start > 10_000_000_000 {
            return Err(format!(
                "timers: timers stopped firing: alrm {a0}->{la}, usr1 {u0}->{lu} in 10 s"
            ));
        }
        nap(10);
        check_progress(&mut la, &mut lu)?;
    }
    // SAFETY: queries into locals; the timer id is ours.
    unsafe {
        let mut itv: libc::itimerval = zeroed();
        if libc::getitimer(libc::ITIMER_REAL, &mut itv) != 0 {
            return Err(format!("timers: getitimer: {}", errno()));
        }
        if (itv.it_interval.tv_sec, itv.it_interval.tv_usec) != (0, 100_000) {
            return Err(format!(
                "timers: ITIMER_REAL interval {:?}",
                (itv.it_interval.tv_sec, itv.it_interval.tv_usec)
            ));
        }
        let mut its: libc::itimerspec = zeroed();
        if libc::timer_gettime(timer, &mut its) != 0 {
            return Err(format!("timers: timer_gettime: {}", errno()));
        }
        if (its.it_interval.tv_sec, its.it_interval.tv_nsec) != (0, 50_000_000) {
            return Err(format!(
                "timers: POSIX timer interval {:?}",
                (its.it_interval.tv_sec, its.it_interval.tv_nsec)
            ));
        }
    }
    for (sig, want, name) in [
        (libc::SIGALRM, alrm_act, "SIGALRM"),
        (libc::SIGUSR1, usr1_act, "SIGUSR1"),
    ] {
        let got = query_action(sig);
        if got != want {
            return Err(format!(
                "timers: {name} action {got:x?}, expected {want:x?}"
            ));
        }
    }
    common.verify()?;
    Ok(format!("OK alrm={la} usr1={lu}"))
}

// ---------------------------------------------------------------------------

fn usage() -> ! {
    eprintln!(
        "usage: pdump-victim MODE [ARGS]\n\
         modes: loop | stopme | zmm | threads [N] | sleep [MS] | read | pattern [PAGES] [SEED] | fds | timers"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(mode) = args.get(1) else { usage() };
    let res = match mode.as_str() {
        "loop" => mode_loop(false),
        "stopme" => mode_loop(true),
        "zmm" => mode_zmm(),
        "threads" => mode_threads(parse_num(args.get(2), 8, "N") as usize),
        "sleep" => mode_sleep(parse_num(args.get(2), 2000, "MS")),
        "read" => mode_read(),
        "pattern" => mode_pattern(
            parse_num(args.get(2), 256, "PAGES") as usize,
            parse_num(args.get(3), 1, "SEED"),
        ),
        "fds" => mode_fds(),
        "timers" => mode_timers(),
        _ => usage(),
    };
    match res {
        Ok(line) => {
            emit(&line);
            std::process::exit(0)
        }
        Err(e) => fail(e),
    }
}
