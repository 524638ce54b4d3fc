//! Test helper: forked child processes that hold some state for a reader
//! of `/proc` to look at.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A forked child, killed and reaped on drop.
pub(crate) struct Forked {
    /// Its pid.
    pub pid: i32,
    flag: *mut AtomicU32,
    reaped: bool,
}

impl Forked {
    /// Forks; the child runs `f` and `_exit`s with what it returns. `f` gets
    /// a `ready` callback to call once its state is set up; `spawn` returns
    /// after that call (or panics after 10 s, or if the child exited first).
    ///
    /// The test process is multithreaded, so `f` must only make
    /// async-signal-safe calls: raw syscalls, no allocation, no locks.
    pub(crate) fn spawn(f: impl FnOnce(&dyn Fn()) -> i32) -> Forked {
        // SAFETY: a fresh shared anonymous page; no existing memory is touched.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(page, libc::MAP_FAILED);
        let flag = page.cast::<AtomicU32>();
        // SAFETY: fork has no memory-safety preconditions; the child only
        // runs `f` (async-signal-safe by this function's contract) and _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: `flag` points into the shared page mapped above,
            // which stays mapped in the child.
            let ready = || unsafe { (*flag).store(1, Ordering::SeqCst) };
            let code = f(&ready);
            // SAFETY: _exit never returns and skips atexit handlers.
            unsafe { libc::_exit(code) };
        }
        let child = Forked {
            pid,
            flag,
            reaped: false,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // SAFETY: `flag` points into the shared page we own until drop.
            if unsafe { (*child.flag).load(Ordering::SeqCst) } == 1 {
                break;
            }
            let mut status = 0;
            // SAFETY: `status` is a valid out pointer.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            assert!(
                r == 0,
                "child exited before it was ready: status {status:#x}"
            );
            assert!(Instant::now() < deadline, "child not ready after 10 s");
            std::thread::sleep(Duration::from_millis(2));
        }
        child
    }

    /// Sleeps forever (until killed): the end of a child that only holds state.
    pub(crate) fn park() -> ! {
        loop {
            // SAFETY: pause has no preconditions.
            unsafe { libc::pause() };
        }
    }

    /// In the child: blocks `sig` so that [`Forked::wait_signal`] can take it.
    pub(crate) fn block_signal(sig: i32) {
        // SAFETY: a zeroed sigset_t filled by sigemptyset/sigaddset, then
        // handed to sigprocmask; all on our stack.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
    }

    /// In the child: waits for the blocked signal `sig`.
    pub(crate) fn wait_signal(sig: i32) {
        // SAFETY: as in block_signal; sigwaitinfo accepts a null info pointer.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            while libc::sigwaitinfo(&set, std::ptr::null_mut()) != sig {}
        }
    }

    /// Sends `sig` to the child.
    pub(crate) fn kill(&self, sig: i32) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.pid, sig) };
    }

    /// Waits for the child to exit and returns its exit code (or 128 + the
    /// signal that killed it).
    pub(crate) fn wait(mut self) -> i32 {
        let mut status = 0;
        // SAFETY: `status` is a valid out pointer.
        let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
        assert_eq!(r, self.pid);
        self.reaped = true;
        if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        }
    }
}

impl Drop for Forked {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill(libc::SIGKILL);
            let mut status = 0;
            // SAFETY: `status` is a valid out pointer.
            unsafe { libc::waitpid(self.pid, &mut status, 0) };
        }
        // SAFETY: unmapping the page mapped in spawn, no longer used.
        unsafe { libc::munmap(self.flag.cast(), 4096) };
    }
}
