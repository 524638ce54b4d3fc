//! # pdump
//!
//! Checkpoint/restore of Linux process trees from user space: seize a task
//! with ptrace, run syscalls inside it, inject a small parasite blob that
//! gathers state from inside, stream its memory out with `vmsplice`, and
//! write a documented image directory.
//!
//! The library is what the `pdump` binary is built on; debuggers and tools
//! can use the same pieces:
//!
//! * [`ptrace`]: seize and interrupt every thread of a process, read and
//!   write registers, with every task left exactly as found on drop;
//! * [`remote`]: run any syscall inside a seized task;
//! * [`infect`]: map the parasite into a task, send it commands, cure it;
//! * [`dump`]: write a checkpoint directory;
//! * [`snapshot`], [`elfcore`]: a process's threads, registers and memory,
//!   live or from a checkpoint, and ELF core files of it for debuggers;
//! * [`image`]: read, validate and render checkpoint images;
//! * [`procfs`]: the `/proc` readers everything else uses;
//! * [`restore_files`]: recreate a checkpoint's open files and install a
//!   restored task's fds.
//!
//! Every fallible call returns a typed error naming the pid, path or thread
//! and the failing operation; [`Error`] wraps them all.
//!
//! ```no_run
//! use pdump::{infect::Parasite, ptrace::Seized, remote};
//!
//! # fn main() -> Result<(), pdump::Error> {
//! let pid = 1234;
//! // Freeze every thread; dropping `seized` lets the process run again.
//! let seized = Seized::seize(pid)?;
//! let regs = seized.regs(pid)?;              // general-purpose registers
//! let xstate = seized.fpregs(pid)?;          // full XSAVE area (AVX-512 included)
//! let mut word = [0u8; 8];
//! remote::read_memory(pid, regs.rsp, &mut word)?;
//!
//! // Run syscalls inside the process through the parasite, then cure it:
//! // registers, xstate, signal mask, maps and fds are exactly as before.
//! let mut parasite = Parasite::infect(&seized)?;
//! let inside_pid = parasite.syscall(39 /* getpid */, &[])?;
//! assert_eq!(inside_pid, pid as i64);
//! parasite.cure()?;
//! drop(seized);
//!
//! // Or write a checkpoint directory, leaving the process running.
//! let opts = pdump::dump::DumpOptions { dir: "ckpt".into(), ..Default::default() };
//! let summary = pdump::dump::dump_process(pid, &opts)?;
//! let cp = pdump::image::Checkpoint::open(&opts.dir)?;
//! cp.verify_pages()?;
//! # let _ = (xstate, summary); Ok(()) }
//! ```
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod blob;
pub mod check;
pub mod cow;
pub mod dump;
pub mod elfcore;
pub mod error;
pub mod fault;
pub mod fdshare;
pub mod image;
pub mod infect;
pub mod leaks;
pub mod pagestream;
pub mod procfs;
pub mod ptrace;
pub mod remote;
pub mod restore;
pub mod restore_files;
pub mod snapshot;
pub mod tree;

pub use elfcore::{CoreError, CoreOptions, CoreSummary};
pub use error::{Error, Result};
pub use snapshot::{Snapshot, SnapshotOptions};
