//! Readers of `/proc/PID/*`.
//!
//! Every function takes the pid (and the tid where the file is per thread)
//! of the task to read and returns typed data, or a [`ProcError`] naming the
//! operation, the pid, the path and the cause. Nothing here changes the
//! state of the task that is read: files are only read, pipe contents are
//! copied with `tee(2)`, files shared with the task are read with `pread`.
//!
//! | module | files |
//! |---|---|
//! | [`status`](status()) | `status` |
//! | [`stat`](stat()) | `stat`, `task/TID/stat` |
//! | [`smaps`], [`maps`](maps()) | `smaps`, `maps` |
//! | [`Pagemap`] | `pagemap` (`PAGEMAP_SCAN` ioctl or 8-byte entries) |
//! | [`limits`], [`auxv`], [`timers`], ... | the small files |
//! | [`fds`](fds()) | `fd/`, `fdinfo/` |
//! | [`unix_sockets`] | unix sockets (`NETLINK_SOCK_DIAG`), their queued data |
//!
//! Most of `/proc/PID` is only fully readable by a task that may ptrace the
//! target (the mm bounds in `stat`, `auxv`, `personality`, `pagemap`, the
//! magic links of `fd/`); pdump runs as root.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

mod fds;
mod maps;
mod misc;
mod pagemap;
mod pidfd;
mod stat;
mod status;
#[cfg(test)]
mod testutil;
mod unix;

pub use fds::{fds, fds_with, pipe_data, MAX_SOCKET_QUEUE};
pub use maps::{classify, maps, maps_self, maps_until, smaps, strip_deleted};
pub use misc::{
    auxv, children, cmdline, comm, coredump_filter, limits, personality, readlink_cwd,
    readlink_exe, readlink_root, threads, timers, RLIMIT_NAMES,
};
pub use pagemap::{present_ranges, Pagemap, ScanMethod, PAGE_IS_PRESENT, PAGE_IS_SWAPPED};
pub use pidfd::PidFd;
pub use stat::{is_kernel_thread, mm_bounds, stat, task_stat, Stat, PF_KTHREAD};
pub use status::{creds, status, status_self, task_status, Status};
pub use unix::{
    unix_socket, unix_sockets, unix_sockets_in, SockDiagError, UnixError, UnixInfo, RCV_SHUTDOWN,
    SEND_SHUTDOWN, TCP_CLOSE, TCP_ESTABLISHED, TCP_LISTEN,
};

/// Result alias of this module.
pub type Result<T, E = ProcError> = std::result::Result<T, E>;

/// A failed `/proc` operation: one variant per operation, each naming the
/// pid and the path (or fd) it concerns and the cause.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// Reading a `/proc` file failed.
    #[error("reading {path} of pid {pid}")]
    Read {
        /// The task.
        pid: i32,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Opening a `/proc` file failed.
    #[error("opening {path} of pid {pid}")]
    Open {
        /// The task.
        pid: i32,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Listing a `/proc` directory failed.
    #[error("listing {path} of pid {pid}")]
    ReadDir {
        /// The task.
        pid: i32,
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading a `/proc` symlink (`exe`, `cwd`, `fd/N`, ...) failed.
    #[error("reading link {path} of pid {pid}")]
    ReadLink {
        /// The task.
        pid: i32,
        /// The link.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A line of a `/proc` file did not have the expected shape.
    #[error("pid {pid}: unexpected content in {path}: {what}: {line:?}")]
    Parse {
        /// The task.
        pid: i32,
        /// The file.
        path: PathBuf,
        /// What was expected.
        what: &'static str,
        /// The offending line (or token).
        line: String,
    },
    /// A field that must be present in a `/proc` file was missing.
    #[error("pid {pid}: field {field:?} missing from {path}")]
    MissingField {
        /// The task.
        pid: i32,
        /// The file.
        path: PathBuf,
        /// The field name.
        field: &'static str,
    },
    /// The `PAGEMAP_SCAN` ioctl failed (other than "not supported").
    #[error("PAGEMAP_SCAN of pid {pid} range {start:#x}-{end:#x}")]
    PagemapScan {
        /// The task.
        pid: i32,
        /// Start of the scanned range.
        start: u64,
        /// End of the scanned range.
        end: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading pagemap entries failed.
    #[error("reading {path} of pid {pid} at offset {offset:#x}")]
    PagemapRead {
        /// The task.
        pid: i32,
        /// The pagemap file.
        path: PathBuf,
        /// Byte offset of the read.
        offset: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `pidfd_open` failed.
    #[error("pidfd_open of pid {pid}")]
    PidfdOpen {
        /// The task.
        pid: i32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `pidfd_getfd` (duplicating one of the task's fds into pdump) failed.
    #[error("pidfd_getfd of fd {fd} of pid {pid}")]
    PidfdGetfd {
        /// The task.
        pid: i32,
        /// The task's fd.
        fd: i32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `stat` through `/proc/PID/fd/N` failed.
    #[error("stat of fd {fd} of pid {pid} ({path})")]
    FdStat {
        /// The task.
        pid: i32,
        /// The task's fd.
        fd: i32,
        /// The magic link.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Opening the file behind `/proc/PID/fd/N` failed.
    #[error("opening fd {fd} of pid {pid} through {path}")]
    FdOpen {
        /// The task.
        pid: i32,
        /// The task's fd.
        fd: i32,
        /// The magic link.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Storing the contents of a file the task has open failed (reading
    /// it, or writing the image).
    #[error("storing the contents of fd {fd} of pid {pid} ({path})")]
    FdContents {
        /// The task.
        pid: i32,
        /// The task's fd.
        fd: i32,
        /// The file's path as the task sees it.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Copying the data buffered in a pipe or FIFO failed.
    #[error("copying the data buffered in pipe fd {fd} of pid {pid}")]
    PipeData {
        /// The task.
        pid: i32,
        /// The task's fd.
        fd: i32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `fcntl(F_GET_SEALS)` on a memfd failed.
    #[error("F_GET_SEALS on fd {fd} of pid {pid}")]
    GetSeals {
        /// The task.
        pid: i32,
        /// The task's fd.
        fd: i32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The task has an fd of a kind pdump cannot checkpoint.
    #[error("pid {pid}: fd {fd} is {kind}, which pdump cannot checkpoint")]
    UnsupportedFd {
        /// The task.
        pid: i32,
        /// The task's fd.
        fd: i32,
        /// What it is: the link target (`socket:[123]`,
        /// `anon_inode:[eventpoll]`) or a description (`char device 136:0 /dev/pts/0`).
        kind: String,
    },
    /// An operation on a unix socket fd failed (sock_diag, socket options,
    /// peeking at the queued data).
    #[error(transparent)]
    Unix(#[from] UnixError),
}

impl ProcError {
    /// The pid the failed operation concerned.
    pub fn pid(&self) -> i32 {
        match self {
            ProcError::Read { pid, .. }
            | ProcError::Open { pid, .. }
            | ProcError::ReadDir { pid, .. }
            | ProcError::ReadLink { pid, .. }
            | ProcError::Parse { pid, .. }
            | ProcError::MissingField { pid, .. }
            | ProcError::PagemapScan { pid, .. }
            | ProcError::PagemapRead { pid, .. }
            | ProcError::PidfdOpen { pid, .. }
            | ProcError::PidfdGetfd { pid, .. }
            | ProcError::FdStat { pid, .. }
            | ProcError::FdOpen { pid, .. }
            | ProcError::FdContents { pid, .. }
            | ProcError::PipeData { pid, .. }
            | ProcError::GetSeals { pid, .. }
            | ProcError::UnsupportedFd { pid, .. } => *pid,
            ProcError::Unix(e) => e.pid(),
        }
    }

    /// The underlying I/O error, if the failure came from one.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            ProcError::Read { source, .. }
            | ProcError::Open { source, .. }
            | ProcError::ReadDir { source, .. }
            | ProcError::ReadLink { source, .. }
            | ProcError::PagemapScan { source, .. }
            | ProcError::PagemapRead { source, .. }
            | ProcError::PidfdOpen { source, .. }
            | ProcError::PidfdGetfd { source, .. }
            | ProcError::FdStat { source, .. }
            | ProcError::FdOpen { source, .. }
            | ProcError::FdContents { source, .. }
            | ProcError::PipeData { source, .. }
            | ProcError::GetSeals { source, .. } => Some(source),
            ProcError::Unix(e) => e.io_error(),
            _ => None,
        }
    }

    /// True when the error says the task (or the file) went away meanwhile
    /// (`ENOENT`/`ESRCH`): the task exited or the fd was closed.
    pub fn is_gone(&self) -> bool {
        self.io_error()
            .and_then(io::Error::raw_os_error)
            .is_some_and(|e| e == libc::ENOENT || e == libc::ESRCH)
    }
}

/// `/proc/PID/REL`.
pub fn proc_path(pid: i32, rel: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{rel}"))
}

/// `/proc/PID/task/TID/REL`.
pub fn task_path(pid: i32, tid: i32, rel: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/task/{tid}/{rel}"))
}

/// The system page size.
pub fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no memory-safety preconditions.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
    })
}

/// Reads a whole `/proc` file as bytes.
pub(crate) fn read_bytes(pid: i32, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| ProcError::Read {
        pid,
        path: path.to_owned(),
        source,
    })
}

/// Reads a whole `/proc` file as text (invalid UTF-8 replaced: the files
/// read this way are ASCII except for names, which are kept lossily).
pub(crate) fn read_text(pid: i32, path: &Path) -> Result<String> {
    let bytes = read_bytes(pid, path)?;
    Ok(match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

/// Reads a `/proc` symlink.
pub(crate) fn read_link(pid: i32, path: &Path) -> Result<PathBuf> {
    std::fs::read_link(path).map_err(|source| ProcError::ReadLink {
        pid,
        path: path.to_owned(),
        source,
    })
}

/// Lists the numeric entries of a `/proc` directory (`task/`, `fd/`), sorted.
pub(crate) fn read_numeric_dir(pid: i32, path: &Path) -> Result<Vec<i32>> {
    let err = |source| ProcError::ReadDir {
        pid,
        path: path.to_owned(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(path).map_err(err)? {
        let entry = entry.map_err(err)?;
        if let Some(n) = parse_os_num(&entry.file_name()) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

fn parse_os_num(name: &OsStr) -> Option<i32> {
    std::str::from_utf8(name.as_bytes()).ok()?.parse().ok()
}

/// Builds a [`ProcError::Parse`].
pub(crate) fn parse_err(pid: i32, path: &Path, what: &'static str, line: &str) -> ProcError {
    ProcError::Parse {
        pid,
        path: path.to_owned(),
        what,
        line: line.to_owned(),
    }
}
