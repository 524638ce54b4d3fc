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
//! * [`image`]: read, validate and render checkpoint images;
//! * [`procfs`]: the `/proc` readers everything else uses.
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod blob;
pub mod check;
pub mod dump;
pub mod error;
pub mod fault;
pub mod image;
pub mod infect;
pub mod procfs;
pub mod ptrace;
pub mod remote;

pub use error::{Error, Result};
