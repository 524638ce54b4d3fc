//! Deterministic fault injection, for tests of "a dumper killed at any moment
//! leaves the task as it was".
//!
//! Every ptrace request, write into a task's memory, parasite command and
//! chunk of streamed pages is a fault point. With `PDUMP_FAULT_KILL_AT=N` in the environment, pdump
//! SIGKILLs itself at its Nth fault point; with `PDUMP_FAULT_REPORT=1` the CLI
//! prints the number of fault points it passed to stderr at exit. Without
//! these variables a fault point costs one relaxed atomic increment.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static COUNT: AtomicU64 = AtomicU64::new(0);
static KILL_AT: OnceLock<Option<u64>> = OnceLock::new();

/// Pass a fault point.
#[inline]
pub fn point() {
    let n = COUNT.fetch_add(1, Ordering::Relaxed) + 1;
    let at = KILL_AT.get_or_init(|| {
        std::env::var("PDUMP_FAULT_KILL_AT")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if *at == Some(n) {
        // SAFETY: raising SIGKILL on ourselves; nothing to uphold.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// Fault points passed so far.
pub fn count() -> u64 {
    COUNT.load(Ordering::Relaxed)
}
