//! The crate's error type: one variant per failing operation, each carrying
//! the pid, path and errno it concerns. Modules with many operations of their
//! own (images, /proc readers) have their own enums, wrapped here.

use std::path::PathBuf;

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can fail in pdump.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `/proc` read failed.
    #[error(transparent)]
    Proc(#[from] crate::procfs::ProcError),
    /// An image could not be written or read.
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    /// Seizing or controlling a task failed.
    #[error(transparent)]
    Ptrace(#[from] crate::ptrace::PtraceError),
    /// A remote syscall failed.
    #[error(transparent)]
    Remote(#[from] crate::remote::RemoteError),
    /// Infection, a parasite command or the cure failed.
    #[error(transparent)]
    Infect(#[from] crate::infect::InfectError),
    /// A dump failed.
    #[error(transparent)]
    Dump(#[from] crate::dump::DumpError),
    /// Collecting the process tree failed.
    #[error(transparent)]
    Tree(#[from] crate::tree::TreeError),
    /// Leak detection failed, or found leaks in container mode.
    #[error(transparent)]
    Leak(#[from] crate::leaks::LeakError),
    /// A restore failed.
    #[error(transparent)]
    Restore(#[from] crate::restore::RestoreError),
    /// Recreating the open files of a checkpoint failed.
    #[error(transparent)]
    Files(#[from] crate::restore_files::FilesError),
    /// A snapshot or an ELF core failed.
    #[error(transparent)]
    Core(#[from] crate::elfcore::CoreError),
    /// I/O on a path.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}
