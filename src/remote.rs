//! Running syscalls inside a seized task.
//!
//! The arch's syscall stub (8 bytes on x86_64) is swapped into the task's
//! text at an address the task does not execute again (its ELF entry point,
//! `AT_ENTRY`), a thread's registers are pointed at it, and the thread is
//! stepped with PTRACE_SYSCALL to the exit of that one syscall. Before the
//! first remote syscall the thread gets an `rt_sigframe` with its own
//! registers, xstate and signal mask below its stack's red zone: should the
//! dumper die while the thread is pointed at the stub, the bytes after the
//! `syscall` instruction return through that frame into the task's own state.
//!
//! ```text
//!   thread stack (grows down)
//!   ...................................  original rsp
//!   128-byte red zone (untouched)
//!   rt_sigframe + xstate (cure frame)    frame_addr ... (64-byte aligned fpstate)
//!                                        injected rsp = frame_addr + 8
//! ```
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use pdump::{ptrace::Seized, remote::{RemoteThread, Stub}};
//! let seized = Seized::seize(1234)?;
//! let tid = seized.threads()[0].tid;
//! let saved = pdump::remote::ThreadSnapshot::take(&seized, tid)?;
//! let stub = Stub::install(&seized)?;
//! let mut rt = RemoteThread::begin(&seized, &stub, &saved)?;
//! let pid_inside = rt.syscall(39 /* getpid */, &[])?;
//! rt.end()?;
//! stub.remove()?;
//! # let _ = pid_inside; Ok(()) }
//! ```

use pdump_arch::native::UserRegs;
use pdump_arch::{AltStack, Arch, Native, SyscallArgs};

use crate::procfs;
use crate::ptrace::{PtraceError, Seized, Stop, ALL_SIGNALS};

/// Errors of remote execution.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// ptrace failed.
    #[error(transparent)]
    Ptrace(#[from] PtraceError),
    /// /proc failed.
    #[error(transparent)]
    Proc(#[from] procfs::ProcError),
    /// No executable mapping to put the stub in.
    #[error("pid {pid}: no executable mapping to place the syscall stub in")]
    NoStubPlace {
        /// The process.
        pid: i32,
    },
    /// The cure frame could not be built.
    #[error("thread {tid}: cannot build the cure frame ({what})")]
    Frame {
        /// The thread.
        tid: i32,
        /// Why.
        what: String,
    },
    /// Writing the task's memory failed.
    #[error("thread {tid}: writing {len} bytes at {addr:#x} of its memory")]
    WriteMem {
        /// The thread.
        tid: i32,
        /// Address.
        addr: u64,
        /// Length.
        len: usize,
        /// errno
        #[source]
        source: std::io::Error,
    },
    /// Reading the task's memory failed.
    #[error("thread {tid}: reading {len} bytes at {addr:#x} of its memory")]
    ReadMem {
        /// The thread.
        tid: i32,
        /// Address.
        addr: u64,
        /// Length.
        len: usize,
        /// errno
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, RemoteError>;

/// The state of a thread as seized, to return it to exactly.
#[derive(Clone, Debug)]
pub struct ThreadSnapshot {
    /// The thread.
    pub tid: i32,
    /// General-purpose registers.
    pub regs: UserRegs,
    /// Extended FPU state.
    pub fpregs: Vec<u8>,
    /// Blocked signals.
    pub sigmask: u64,
}

impl ThreadSnapshot {
    /// Read a stopped thread's registers, xstate and mask.
    pub fn take(seized: &Seized, tid: i32) -> std::result::Result<Self, PtraceError> {
        Ok(ThreadSnapshot {
            tid,
            regs: seized.regs(tid)?,
            fpregs: seized.fpregs(tid)?,
            sigmask: seized.sigmask(tid)?,
        })
    }

    /// Put the thread back exactly as snapshotted (it must be in a stop
    /// inside the kernel's signal path, so an interrupted syscall restarts).
    ///
    /// The registers go back last: until then the thread still points at the
    /// stub, whose fallback `rt_sigreturn` restores mask and xstate too, so a
    /// dumper killed between two of these calls leaves a consistent task.
    pub fn restore(&self, seized: &Seized) -> std::result::Result<(), PtraceError> {
        seized.set_sigmask(self.tid, self.sigmask)?;
        seized.set_fpregs(self.tid, &self.fpregs)?;
        seized.set_regs(self.tid, &self.regs)
    }
}

/// The syscall stub, swapped into one process's text.
#[derive(Debug)]
pub struct Stub {
    /// Where it is.
    pub addr: u64,
    pid: i32,
    saved: Vec<u8>,
    installed: bool,
}

/// Write `data` at `addr` in `pid`'s memory (via /proc/PID/mem, which also
/// reaches read-only pages of a task we trace).
pub fn write_mem(pid: i32, addr: u64, data: &[u8]) -> Result<()> {
    crate::fault::point();
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .map_err(|source| RemoteError::WriteMem {
            tid: pid,
            addr,
            len: data.len(),
            source,
        })?;
    f.write_all_at(data, addr)
        .map_err(|source| RemoteError::WriteMem {
            tid: pid,
            addr,
            len: data.len(),
            source,
        })
}

/// Read `buf.len()` bytes at `addr` of `pid`'s memory (via /proc/PID/mem).
pub fn read_mem(pid: i32, addr: u64, buf: &mut [u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f =
        std::fs::File::open(format!("/proc/{pid}/mem")).map_err(|source| RemoteError::ReadMem {
            tid: pid,
            addr,
            len: buf.len(),
            source,
        })?;
    f.read_exact_at(buf, addr)
        .map_err(|source| RemoteError::ReadMem {
            tid: pid,
            addr,
            len: buf.len(),
            source,
        })
}

/// Read the memory of a process fast: `process_vm_readv` (one copy, no
/// ptrace stop needed), falling back to /proc/PID/mem for pages the task
/// cannot read itself (PROT_NONE), which a tracer may.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let seized = pdump::ptrace::Seized::seize(1234)?;
/// let rsp = seized.regs(1234)?.rsp;
/// let mut top_of_stack = [0u8; 64];
/// pdump::remote::read_memory(1234, rsp, &mut top_of_stack)?;
/// # Ok(()) }
/// ```
pub fn read_memory(pid: i32, addr: u64, buf: &mut [u8]) -> Result<()> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: one local iovec over `buf`, which we own mutably, and one
    // remote range the kernel checks against the target's mappings.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if n >= 0 && n as usize == buf.len() {
        return Ok(());
    }
    read_mem(pid, addr, buf)
}

impl Stub {
    /// Choose the stub's place in the seized process and swap the stub in.
    pub fn install(seized: &Seized) -> Result<Stub> {
        let pid = seized.pid();
        let addr = Self::place(pid)?;
        Self::install_at(pid, addr)
    }

    /// Swap the stub in at a given address of process `pid` (which we trace).
    pub fn install_at(pid: i32, addr: u64) -> Result<Stub> {
        let code = Native::SYSCALL_STUB;
        let mut saved = vec![0u8; code.len()];
        read_mem(pid, addr, &mut saved)?;
        write_mem(pid, addr, code)?;
        Ok(Stub {
            addr,
            pid,
            saved,
            installed: true,
        })
    }

    /// The ELF entry point if it lies in an executable file mapping (never
    /// executed again after start-up), else the start of the first executable
    /// file mapping, else of any executable mapping but vsyscall.
    ///
    /// Reads `/proc/PID/maps` only up to the entry point's mapping when it
    /// qualifies (a task may have tens of thousands of mappings).
    pub fn place(pid: i32) -> Result<u64> {
        let is_file =
            |v: &crate::image::model::Vma| v.path.as_deref().is_some_and(|p| p.starts_with('/'));
        let stub_len = Native::SYSCALL_STUB.len() as u64;
        if let Ok(auxv) = procfs::auxv(pid) {
            if let Some(&(_, entry)) = auxv.iter().find(|(k, _)| *k == libc::AT_ENTRY) {
                let head = procfs::maps_until(pid, |v| v.end >= entry + stub_len)?;
                let ok = head.iter().any(|v| {
                    v.prot & 4 != 0 && is_file(v) && v.start <= entry && entry + stub_len <= v.end
                });
                if ok {
                    return Ok(entry);
                }
            }
        }
        let vmas = procfs::maps(pid)?;
        vmas.iter()
            .find(|v| v.prot & 4 != 0 && is_file(v))
            .or_else(|| {
                vmas.iter()
                    .find(|v| v.prot & 4 != 0 && v.path.as_deref() != Some("[vsyscall]"))
            })
            .map(|v| v.start)
            .ok_or(RemoteError::NoStubPlace { pid })
    }

    /// Swap the original bytes back.
    pub fn remove(mut self) -> Result<()> {
        self.restore()
    }

    fn restore(&mut self) -> Result<()> {
        if !self.installed {
            return Ok(());
        }
        write_mem(self.pid, self.addr, &self.saved)?;
        self.installed = false;
        Ok(())
    }

    /// Give up on restoring (the process is gone).
    pub fn forget(mut self) {
        self.installed = false;
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        let _ = self.restore();
    }
}

/// A thread pointed at the stub, ready to run syscalls.
#[derive(Debug)]
pub struct RemoteThread<'a> {
    seized: &'a Seized,
    tid: i32,
    stub: u64,
    frame_sp: u64,
    regs: UserRegs,
    snapshot: &'a ThreadSnapshot,
    active: bool,
}

/// Bytes below the stack pointer that the ABI lets the task use (red zone).
const RED_ZONE: u64 = 128;

impl<'a> RemoteThread<'a> {
    /// Prepare thread `snapshot.tid` (stopped) for remote syscalls through `stub`.
    pub fn begin(seized: &'a Seized, stub: &Stub, snapshot: &'a ThreadSnapshot) -> Result<Self> {
        let tid = snapshot.tid;
        let mut cure = snapshot.regs;
        Native::apply_restart(&mut cure);
        let size = Native::frame_size(snapshot.fpregs.len()) as u64;
        let frame_addr = (Native::sp(&snapshot.regs) - RED_ZONE - size) & !63;
        let mut buf = vec![0u8; size as usize];
        let layout = Native::build_frame(
            &mut buf,
            frame_addr,
            &cure,
            snapshot.sigmask,
            AltStack::KEEP,
            &snapshot.fpregs,
        )
        .map_err(|e| RemoteError::Frame {
            tid,
            what: format!("{e:?}"),
        })?;
        write_mem(seized.pid(), frame_addr, &buf[..layout.size])?;
        let mut rt = RemoteThread {
            seized,
            tid,
            stub: stub.addr,
            frame_sp: layout.sp_at_sigreturn,
            regs: snapshot.regs,
            snapshot,
            active: true,
        };
        Native::clear_syscall(&mut rt.regs);
        Native::set_ip(&mut rt.regs, rt.stub);
        Native::set_sp(&mut rt.regs, rt.frame_sp);
        seized.set_regs(tid, &rt.regs)?;
        seized.set_sigmask(tid, ALL_SIGNALS)?;
        Ok(rt)
    }

    /// The thread.
    pub fn tid(&self) -> i32 {
        self.tid
    }

    /// Run one syscall in the thread; returns the raw result (`-errno` on failure).
    pub fn syscall(&mut self, nr: u64, args: &[u64]) -> Result<i64> {
        let s = self.seized;
        let mut regs = self.regs;
        Native::set_syscall(&mut regs, &SyscallArgs::new(nr, args));
        Native::set_ip(&mut regs, self.stub);
        Native::set_sp(&mut regs, self.frame_sp);
        s.set_regs(self.tid, &regs)?;
        let mut exits = 0;
        let mut entered = false;
        while exits == 0 {
            s.cont_syscall(self.tid)?;
            match crate::ptrace::wait_stop(self.tid)? {
                Stop::Syscall => {
                    if entered {
                        exits += 1;
                    } else {
                        entered = true;
                    }
                }
                Stop::Event { .. } | Stop::OtherEvent { .. } => {
                    // A group stop or a stray interrupt: keep going.
                }
                Stop::Signal { sig } => {
                    return Err(PtraceError::UnexpectedStop {
                        tid: self.tid,
                        what: format!("signal {sig} during remote syscall {nr}"),
                    }
                    .into())
                }
                Stop::Exited { status } => {
                    return Err(PtraceError::Died {
                        tid: self.tid,
                        status,
                    }
                    .into())
                }
            }
        }
        let after = s.regs(self.tid)?;
        Ok(Native::syscall_ret(&after))
    }

    /// Registers to start a blob: the caller sets ip/sp/arg and resumes.
    pub fn regs_for_blob(&self, entry: u64, stack_top: u64, arg: u64) -> UserRegs {
        let mut r = self.regs;
        Native::clear_syscall(&mut r);
        Native::set_ip(&mut r, entry);
        Native::set_sp(&mut r, stack_top);
        Native::set_entry_arg(&mut r, arg);
        r
    }

    /// Hand the thread over to a blob: no more remote syscalls on this
    /// object, the caller owns the thread's registers from now on.
    pub fn into_blob(mut self, regs: &UserRegs) -> Result<()> {
        self.seized.set_regs(self.tid, regs)?;
        self.active = false;
        Ok(())
    }

    /// Park the thread in a PTRACE_EVENT_STOP inside the kernel's signal path
    /// and put its snapshot back, so an interrupted syscall restarts exactly.
    pub fn end(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        if !self.active {
            return Ok(());
        }
        self.active = false;
        park(self.seized, self.tid)?;
        self.snapshot.restore(self.seized)?;
        Ok(())
    }
}

impl Drop for RemoteThread<'_> {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// From any ptrace stop, move a thread into a PTRACE_EVENT_STOP (the stop in
/// the kernel's signal path, after which a restored interrupted syscall
/// restarts).
pub fn park(seized: &Seized, tid: i32) -> std::result::Result<(), PtraceError> {
    seized.interrupt(tid)?;
    seized.cont(tid, 0)?;
    loop {
        match crate::ptrace::wait_stop(tid)? {
            Stop::Event { .. } => return Ok(()),
            Stop::Exited { status } => return Err(PtraceError::Died { tid, status }),
            Stop::Syscall | Stop::OtherEvent { .. } => seized.cont(tid, 0)?,
            Stop::Signal { sig } => {
                return Err(PtraceError::UnexpectedStop {
                    tid,
                    what: format!("signal {sig} while parking"),
                })
            }
        }
    }
}
