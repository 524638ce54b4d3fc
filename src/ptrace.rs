//! Seizing processes with ptrace.
//!
//! [`Seized`] holds every thread of one process in a ptrace stop (PTRACE_SEIZE
//! then PTRACE_INTERRUPT), so nothing in it runs and nobody else can resume it
//! (a task has one tracer). Dropping it detaches every thread: tasks that were
//! in a group stop (SIGSTOP) before stay stopped, the others continue, and a
//! task that was interrupted in a blocking syscall restarts it exactly as if
//! it had never been stopped (the restart happens in the kernel's signal path,
//! where PTRACE_INTERRUPT parks the task).
//!
//! ```no_run
//! # fn main() -> Result<(), pdump::Error> {
//! let pid = 1234;
//! let seized = pdump::ptrace::Seized::seize(pid)?;
//! for t in seized.threads() {
//!     let regs = seized.regs(t.tid)?;
//!     println!("{} ip={:#x}", t.tid, pdump_arch::native::UserRegs::to_words(&regs)[16]);
//! }
//! drop(seized); // everything runs again
//! # Ok(()) }
//! ```

use std::collections::BTreeSet;

use pdump_arch::{native::UserRegs, Arch, Native};

use crate::procfs;

/// Errors of ptrace operations; each names the thread and the operation.
#[derive(Debug, thiserror::Error)]
pub enum PtraceError {
    /// No such process.
    #[error("no process with pid {pid}")]
    NoSuchProcess {
        /// The pid.
        pid: i32,
    },
    /// The pid is pdump itself.
    #[error("pid {pid} is pdump itself")]
    SelfTarget {
        /// The pid.
        pid: i32,
    },
    /// A zombie cannot be seized.
    #[error("pid {pid} is a zombie (it exited; only its parent can reap it)")]
    Zombie {
        /// The pid.
        pid: i32,
    },
    /// A kernel thread has no user state to dump.
    #[error("pid {pid} is a kernel thread")]
    KernelThread {
        /// The pid.
        pid: i32,
    },
    /// Another tracer (a debugger) holds the task.
    #[error("pid {pid} is already traced by pid {tracer} (a debugger?); detach it first")]
    AlreadyTraced {
        /// The traced task.
        pid: i32,
        /// Its tracer.
        tracer: i32,
    },
    /// A ptrace request failed.
    #[error("ptrace {op} of thread {tid}")]
    Request {
        /// The request.
        op: &'static str,
        /// The thread.
        tid: i32,
        /// errno
        #[source]
        source: nix::Error,
    },
    /// waitpid failed.
    #[error("waiting for thread {tid}")]
    Wait {
        /// The thread.
        tid: i32,
        /// errno
        #[source]
        source: nix::Error,
    },
    /// The thread died while seized.
    #[error("thread {tid} exited or was killed while seized (status {status:#x})")]
    Died {
        /// The thread.
        tid: i32,
        /// Raw wait status.
        status: i32,
    },
    /// The thread stopped in a way pdump did not ask for.
    #[error("thread {tid} stopped unexpectedly ({what})")]
    UnexpectedStop {
        /// The thread.
        tid: i32,
        /// What was seen.
        what: String,
    },
    /// Reading /proc failed while seizing.
    #[error(transparent)]
    Proc(#[from] procfs::ProcError),
}

type Result<T> = std::result::Result<T, PtraceError>;

/// What waitpid reported for a traced thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// PTRACE_EVENT_STOP: interrupt (sig = SIGTRAP) or group stop (sig = SIGSTOP etc.).
    Event {
        /// The signal of the stop.
        sig: i32,
    },
    /// A syscall entry or exit stop (PTRACE_O_TRACESYSGOOD).
    Syscall,
    /// A signal-delivery stop for `sig`.
    Signal {
        /// The signal.
        sig: i32,
    },
    /// Another ptrace event (clone, exec...).
    OtherEvent {
        /// The event number.
        event: i32,
    },
    /// The thread is gone.
    Exited {
        /// Raw status.
        status: i32,
    },
}

/// One seized thread.
#[derive(Clone, Debug)]
pub struct Thread {
    /// Thread id (global pid namespace as seen by pdump).
    pub tid: i32,
    /// The thread was in a group stop (SIGSTOP/SIGTSTP...) when seized.
    pub was_stopped: bool,
}

/// The signal mask of "block everything".
pub const ALL_SIGNALS: u64 = u64::MAX;

/// Every thread of a process, held in ptrace stops.
#[derive(Debug)]
pub struct Seized {
    pid: i32,
    threads: Vec<Thread>,
    detached: bool,
}

fn req(op: &'static str, tid: i32, r: libc::c_long) -> Result<libc::c_long> {
    if r == -1 {
        Err(PtraceError::Request {
            op,
            tid,
            source: nix::Error::last(),
        })
    } else {
        Ok(r)
    }
}

/// Raw ptrace call.
fn ptrace_raw(request: libc::c_uint, tid: i32, addr: usize, data: usize) -> libc::c_long {
    crate::fault::point();
    // SAFETY: ptrace with an integer request; callers pass addr/data that the
    // given request interprets as plain integers or as pointers to buffers
    // they own and size correctly.
    unsafe {
        libc::ptrace(
            request,
            tid,
            addr as *mut libc::c_void,
            data as *mut libc::c_void,
        )
    }
}

/// Wait for a state change of one traced thread.
pub fn wait_stop(tid: i32) -> Result<Stop> {
    wait_stop_flags(tid, 0).map(|s| s.expect("blocking wait returns a status"))
}

/// Like [`wait_stop`], but with extra waitpid flags (WNOHANG: `None` if nothing happened).
pub fn wait_stop_flags(tid: i32, flags: i32) -> Result<Option<Stop>> {
    let mut status = 0i32;
    loop {
        // SAFETY: waitpid writes one int to `status`, which we own.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL | flags) };
        if r == -1 {
            let e = nix::Error::last();
            if e == nix::Error::EINTR {
                continue;
            }
            return Err(PtraceError::Wait { tid, source: e });
        }
        if r == 0 {
            return Ok(None);
        }
        break;
    }
    if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
        return Ok(Some(Stop::Exited { status }));
    }
    if !libc::WIFSTOPPED(status) {
        return Err(PtraceError::UnexpectedStop {
            tid,
            what: format!("status {status:#x}"),
        });
    }
    let sig = libc::WSTOPSIG(status);
    let event = status >> 16;
    Ok(Some(if event == libc::PTRACE_EVENT_STOP {
        Stop::Event { sig }
    } else if event != 0 {
        Stop::OtherEvent { event }
    } else if sig == libc::SIGTRAP | 0x80 {
        Stop::Syscall
    } else {
        Stop::Signal { sig }
    }))
}

fn is_group_stop_sig(sig: i32) -> bool {
    matches!(
        sig,
        libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
    )
}

impl Seized {
    /// Seize and interrupt every thread of process `pid`, re-scanning
    /// `/proc/PID/task` until no new thread appears. On error every thread
    /// already seized is released untouched.
    pub fn seize(pid: i32) -> Result<Seized> {
        let me = std::process::id() as i32;
        if pid == me {
            return Err(PtraceError::SelfTarget { pid });
        }
        let st = match procfs::status(pid) {
            Ok(st) => st,
            Err(_) if !std::path::Path::new(&format!("/proc/{pid}")).exists() => {
                return Err(PtraceError::NoSuchProcess { pid })
            }
            Err(e) => return Err(e.into()),
        };
        if st.tgid == me {
            return Err(PtraceError::SelfTarget { pid });
        }
        if st.tgid != pid {
            // A thread id: dump its whole process.
            return Seized::seize(st.tgid);
        }
        if st.state == 'Z' || st.state == 'X' {
            return Err(PtraceError::Zombie { pid });
        }
        if procfs::is_kernel_thread(pid)? {
            return Err(PtraceError::KernelThread { pid });
        }
        if st.tracer_pid != 0 {
            return Err(PtraceError::AlreadyTraced {
                pid,
                tracer: st.tracer_pid,
            });
        }
        let mut seized = Seized {
            pid,
            threads: Vec::new(),
            detached: false,
        };
        let mut known: BTreeSet<i32> = BTreeSet::new();
        loop {
            let tids = match procfs::threads(pid) {
                Ok(t) => t,
                Err(_) if known.is_empty() => return Err(PtraceError::NoSuchProcess { pid }),
                Err(e) => return Err(e.into()),
            };
            let new: Vec<i32> = tids.into_iter().filter(|t| !known.contains(t)).collect();
            if new.is_empty() {
                break;
            }
            for tid in new {
                known.insert(tid);
                if let Some(t) = seized.seize_thread(tid)? {
                    seized.threads.push(t);
                }
            }
        }
        if seized.threads.is_empty() {
            return Err(PtraceError::NoSuchProcess { pid });
        }
        // Leader first, then by tid.
        seized.threads.sort_by_key(|t| (t.tid != pid, t.tid));
        Ok(seized)
    }

    fn seize_thread(&self, tid: i32) -> Result<Option<Thread>> {
        let opts = libc::PTRACE_O_TRACESYSGOOD as usize;
        if ptrace_raw(libc::PTRACE_SEIZE, tid, 0, opts) == -1 {
            let e = nix::Error::last();
            return match e {
                nix::Error::ESRCH => Ok(None), // exited meanwhile
                nix::Error::EPERM => {
                    let tracer = procfs::status(tid).map(|s| s.tracer_pid).unwrap_or(0);
                    if tracer != 0 {
                        Err(PtraceError::AlreadyTraced { pid: tid, tracer })
                    } else {
                        Err(PtraceError::Request {
                            op: "SEIZE",
                            tid,
                            source: e,
                        })
                    }
                }
                _ => Err(PtraceError::Request {
                    op: "SEIZE",
                    tid,
                    source: e,
                }),
            };
        }
        // From here on, the thread is ours: any error must detach it.
        let guard = DetachGuard(tid);
        req(
            "INTERRUPT",
            tid,
            ptrace_raw(libc::PTRACE_INTERRUPT, tid, 0, 0),
        )?;
        loop {
            match wait_stop(tid)? {
                Stop::Event { sig } => {
                    std::mem::forget(guard);
                    return Ok(Some(Thread {
                        tid,
                        was_stopped: is_group_stop_sig(sig),
                    }));
                }
                Stop::Signal { sig } => {
                    // A signal was being delivered: let it be delivered (its
                    // handler frame is set up, no user code runs before the
                    // pending interrupt stops the thread).
                    req(
                        "CONT",
                        tid,
                        ptrace_raw(libc::PTRACE_CONT, tid, 0, sig as usize),
                    )?;
                }
                Stop::Syscall | Stop::OtherEvent { .. } => {
                    req("CONT", tid, ptrace_raw(libc::PTRACE_CONT, tid, 0, 0))?;
                }
                Stop::Exited { .. } => {
                    std::mem::forget(guard);
                    return Ok(None);
                }
            }
        }
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The seized threads, leader first.
    pub fn threads(&self) -> &[Thread] {
        &self.threads
    }

    /// General-purpose registers of a stopped thread.
    pub fn regs(&self, tid: i32) -> Result<UserRegs> {
        let mut regs = UserRegs::default();
        let mut iov = libc::iovec {
            iov_base: &mut regs as *mut UserRegs as *mut libc::c_void,
            iov_len: std::mem::size_of::<UserRegs>(),
        };
        req(
            "GETREGSET(NT_PRSTATUS)",
            tid,
            ptrace_raw(
                libc::PTRACE_GETREGSET,
                tid,
                1,
                &mut iov as *mut libc::iovec as usize,
            ),
        )?;
        Ok(regs)
    }

    /// Set the general-purpose registers of a stopped thread.
    pub fn set_regs(&self, tid: i32, regs: &UserRegs) -> Result<()> {
        let mut copy = *regs;
        let mut iov = libc::iovec {
            iov_base: &mut copy as *mut UserRegs as *mut libc::c_void,
            iov_len: std::mem::size_of::<UserRegs>(),
        };
        req(
            "SETREGSET(NT_PRSTATUS)",
            tid,
            ptrace_raw(
                libc::PTRACE_SETREGSET,
                tid,
                1,
                &mut iov as *mut libc::iovec as usize,
            ),
        )?;
        Ok(())
    }

    /// The extended FPU/SIMD state (x86_64: the full XSAVE area, AVX-512 included).
    pub fn fpregs(&self, tid: i32) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        req(
            "GETREGSET(fp)",
            tid,
            ptrace_raw(
                libc::PTRACE_GETREGSET,
                tid,
                Native::FP_REGSET as usize,
                &mut iov as *mut libc::iovec as usize,
            ),
        )?;
        buf.truncate(iov.iov_len);
        Ok(buf)
    }

    /// Set the extended FPU/SIMD state.
    pub fn set_fpregs(&self, tid: i32, fp: &[u8]) -> Result<()> {
        let mut copy = fp.to_vec();
        let mut iov = libc::iovec {
            iov_base: copy.as_mut_ptr() as *mut libc::c_void,
            iov_len: copy.len(),
        };
        req(
            "SETREGSET(fp)",
            tid,
            ptrace_raw(
                libc::PTRACE_SETREGSET,
                tid,
                Native::FP_REGSET as usize,
                &mut iov as *mut libc::iovec as usize,
            ),
        )?;
        Ok(())
    }

    /// The blocked-signal mask of a stopped thread.
    pub fn sigmask(&self, tid: i32) -> Result<u64> {
        let mut mask = 0u64;
        req(
            "GETSIGMASK",
            tid,
            ptrace_raw(
                libc::PTRACE_GETSIGMASK,
                tid,
                8,
                &mut mask as *mut u64 as usize,
            ),
        )?;
        Ok(mask)
    }

    /// Set the blocked-signal mask of a stopped thread.
    pub fn set_sigmask(&self, tid: i32, mask: u64) -> Result<()> {
        let m = mask;
        req(
            "SETSIGMASK",
            tid,
            ptrace_raw(libc::PTRACE_SETSIGMASK, tid, 8, &m as *const u64 as usize),
        )?;
        Ok(())
    }

    /// Pending signals, without dequeuing them: the thread's own queue, or the
    /// process-wide one with `shared`. Each entry is a raw 128-byte siginfo.
    pub fn pending(&self, tid: i32, shared: bool) -> Result<Vec<Vec<u8>>> {
        #[repr(C)]
        struct PeekArgs {
            off: u64,
            flags: u32,
            nr: i32,
        }
        let mut out = Vec::new();
        loop {
            let args = PeekArgs {
                off: out.len() as u64,
                flags: shared as u32,
                nr: 32,
            };
            let mut buf = vec![0u8; 128 * 32];
            let n = req(
                "PEEKSIGINFO",
                tid,
                ptrace_raw(
                    libc::PTRACE_PEEKSIGINFO,
                    tid,
                    &args as *const PeekArgs as usize,
                    buf.as_mut_ptr() as usize,
                ),
            )? as usize;
            for i in 0..n {
                out.push(buf[i * 128..(i + 1) * 128].to_vec());
            }
            if n < 32 {
                return Ok(out);
            }
        }
    }

    /// The thread's rseq registration (PTRACE_GET_RSEQ_CONFIGURATION).
    pub fn rseq(&self, tid: i32) -> Result<Option<crate::image::model::Rseq>> {
        #[repr(C)]
        #[derive(Default)]
        struct RseqConf {
            rseq_abi_pointer: u64,
            rseq_abi_size: u32,
            signature: u32,
            flags: u32,
            pad: u32,
        }
        let mut c = RseqConf::default();
        const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
        req(
            "GET_RSEQ_CONFIGURATION",
            tid,
            ptrace_raw(
                PTRACE_GET_RSEQ_CONFIGURATION,
                tid,
                std::mem::size_of::<RseqConf>(),
                &mut c as *mut RseqConf as usize,
            ),
        )?;
        Ok(
            (c.rseq_abi_pointer != 0).then_some(crate::image::model::Rseq {
                abi_pointer: c.rseq_abi_pointer,
                abi_size: c.rseq_abi_size,
                signature: c.signature,
                flags: c.flags,
            }),
        )
    }

    /// Read one word of the tracee's memory (text included).
    pub fn peek(&self, tid: i32, addr: u64) -> Result<u64> {
        // PEEKTEXT returns the word; -1 is ambiguous, so clear errno first.
        // SAFETY: errno is thread-local; writing it is always allowed.
        unsafe { *libc::__errno_location() = 0 };
        let r = ptrace_raw(libc::PTRACE_PEEKTEXT, tid, addr as usize, 0);
        if r == -1 && nix::Error::last_raw() != 0 {
            return Err(PtraceError::Request {
                op: "PEEKTEXT",
                tid,
                source: nix::Error::last(),
            });
        }
        Ok(r as u64)
    }

    /// Write one word of the tracee's memory (text included).
    pub fn poke(&self, tid: i32, addr: u64, word: u64) -> Result<()> {
        req(
            "POKETEXT",
            tid,
            ptrace_raw(libc::PTRACE_POKETEXT, tid, addr as usize, word as usize),
        )?;
        Ok(())
    }

    /// Resume a thread, delivering `sig` (0 for none).
    pub fn cont(&self, tid: i32, sig: i32) -> Result<()> {
        req(
            "CONT",
            tid,
            ptrace_raw(libc::PTRACE_CONT, tid, 0, sig as usize),
        )?;
        Ok(())
    }

    /// Resume a thread until the next syscall entry or exit.
    pub fn cont_syscall(&self, tid: i32) -> Result<()> {
        req("SYSCALL", tid, ptrace_raw(libc::PTRACE_SYSCALL, tid, 0, 0))?;
        Ok(())
    }

    /// Ask a running (or stopped) thread to stop in PTRACE_EVENT_STOP.
    pub fn interrupt(&self, tid: i32) -> Result<()> {
        req(
            "INTERRUPT",
            tid,
            ptrace_raw(libc::PTRACE_INTERRUPT, tid, 0, 0),
        )?;
        Ok(())
    }

    /// Detach every thread now (also done on drop).
    pub fn detach(mut self) -> Result<()> {
        self.detach_all()
    }

    fn detach_all(&mut self) -> Result<()> {
        if self.detached {
            return Ok(());
        }
        self.detached = true;
        let mut first_err = None;
        for t in &self.threads {
            let r = ptrace_raw(libc::PTRACE_DETACH, t.tid, 0, 0);
            if r == -1 {
                let e = nix::Error::last();
                if e != nix::Error::ESRCH && first_err.is_none() {
                    first_err = Some(PtraceError::Request {
                        op: "DETACH",
                        tid: t.tid,
                        source: e,
                    });
                }
            }
        }
        // A thread that was in a group stop wakes up on detach to stop
        // again (the kernel re-arms the group stop): wait, briefly, until it
        // shows `T` again, so that the caller finds it as it was.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        for t in self.threads.iter().filter(|t| t.was_stopped) {
            while !thread_shows_stopped(t.tid) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Forget the threads without detaching (the caller killed the process).
    pub fn forget(mut self) {
        self.detached = true;
    }
}

impl Drop for Seized {
    fn drop(&mut self) {
        let _ = self.detach_all();
    }
}

/// The thread's /proc state is `T` (group stop), or it is gone.
fn thread_shows_stopped(tid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{tid}/stat")) {
        Ok(s) => s
            .rfind(')')
            .and_then(|i| s[i + 1..].split_whitespace().next())
            .is_none_or(|st| st == "T"),
        Err(_) => true,
    }
}

/// Detaches a freshly seized thread if seizing it fails halfway.
struct DetachGuard(i32);

impl Drop for DetachGuard {
    fn drop(&mut self) {
        ptrace_raw(libc::PTRACE_DETACH, self.0, 0, 0);
    }
}

/// True if the arch says these registers sit in an interrupted, restartable syscall.
pub fn in_restartable_syscall(regs: &UserRegs) -> Option<u64> {
    Native::interrupted_syscall(regs)
}
