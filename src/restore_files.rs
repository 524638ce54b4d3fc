//! Restore of open files: the fd part of `pdump restore`.
//!
//! The restore controller (single-threaded) opens every open file
//! description the checkpoint needs with [`FileTable::open`], at fds at or
//! above [`FileTable::base`], all `O_CLOEXEC`; every restored task is a fork
//! descendant of the controller, inherits them, and calls
//! [`FileTable::install`] with its dumped pid: each of its fds is `dup3`ed
//! to its number with its `FD_CLOEXEC` flag, every other fd below `base()`
//! is closed. The caller closes the table's fds (`>= base()`) later.
//!
//! What is recreated, and how:
//!
//! | kind | how |
//! |---|---|
//! | [`FileObject`] (shared description) | opened once; every [`FdKind::Shared`] fd gets a dup of it (one offset, one set of status flags) |
//! | regular file | `open` of the path with the recorded access mode and status flags (never `O_CREAT`/`O_TRUNC`), `lseek` to the position; a changed size is refused unless [`FileOptions::allow_size_change`] |
//! | unlinked regular file | a file created under its old name and unlinked at once when that name is free (else an `O_TMPFILE`) in the original directory (or the nearest existing ancestor) with the recorded contents and mode, reopened through `/proc/self/fd/N` with the recorded flags; fds with the same path, mode and contents share one inode |
//! | directory | `open(O_DIRECTORY)`, `lseek` |
//! | `/dev/null`, `/dev/zero` | `open` with the recorded flags |
//! | pipe | one `pipe2` per inode, the buffered data written back (`F_SETPIPE_SZ` if it needs more room); each description is the pipe's own end or a reopen of `/proc/self/fd/N` with the recorded flags |
//! | external pipe (one end in the tree) | reopened from the controller fd [`FileOptions::inherit`] maps `pipe:[INODE]` to; its data is left as it is |
//! | FIFO | an `O_RDWR` holder opened by path (never blocks), the data written once, each end reopened through the holder |
//! | eventfd | `eventfd` with the count and `EFD_SEMAPHORE` |
//! | memfd | `memfd_create(MFD_ALLOW_SEALING)` once per inode, contents written, each description reopened through `/proc/self/fd/N`, the seals added last ([`FileTable::memfd`] gives the object for shared mappings) |
//! | unix socketpair | `socketpair` per pair; the data queued on each end sent again from its peer (one `send` per recorded message), then `shutdown` as recorded |
//!
//! Refused with a clear [`FilesError`]: unknown kinds, a pipe with one end
//! outside the tree and no `inherit` for it, unix sockets that are bound
//! to a name or whose peer is not in the tree.
//!
//! Limits: the buffered data of an external pipe or of a FIFO is not
//! checked against what is in it now (a FIFO still held outside the tree
//! gets the recorded data once more); `SO_SNDBUF` of a socket may be raised
//! to hold its peer's queued data; unlinked files are told apart by path,
//! mode and contents only.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::image::model::{Blob, FdKind, FileObject, Inventory, ProcessImage};
use crate::image::{data::CHUNK, Checkpoint, DataReader, ImageError};

/// The kernel's `O_LARGEFILE` (the libc constant is 0 on 64-bit targets;
/// `open` sets the kernel's bit, `pipe2` does not).
#[cfg(target_arch = "aarch64")]
pub const KERNEL_O_LARGEFILE: i32 = 0o400000;
/// The kernel's `O_LARGEFILE` (the libc constant is 0 on 64-bit targets;
/// `open` sets the kernel's bit, `pipe2` does not).
#[cfg(not(target_arch = "aarch64"))]
pub const KERNEL_O_LARGEFILE: i32 = 0o100000;
/// `__O_TMPFILE` (without `O_DIRECTORY`).
const O_TMPFILE_BIT: i32 = libc::O_TMPFILE & !libc::O_DIRECTORY;
/// The open flags that must never be replayed: they create, truncate, or
/// belong to the fd, not the description.
/// `O_NOFOLLOW` too: recorded paths are resolved, and `/proc/self/fd/N` is a link.
const NEVER: i32 = libc::O_CREAT
    | libc::O_EXCL
    | libc::O_TRUNC
    | libc::O_CLOEXEC
    | O_TMPFILE_BIT
    | libc::O_NOFOLLOW;
/// The status flags `F_SETFL` can change (`O_ASYNC` is left alone: it
/// needs an owner, which is not restored here).
const SETFL: i32 = libc::O_APPEND | libc::O_NONBLOCK | libc::O_DIRECT | libc::O_NOATIME;
/// fds the table may open beyond its descriptions at once.
const SLACK: u64 = 64;

/// Restore options for files.
#[derive(Clone, Debug, Default)]
pub struct FileOptions {
    /// Restore even if a regular file's size differs from the recorded one
    /// (default: refuse).
    pub allow_size_change: bool,
    /// External objects (one end of a pipe not in the tree, e.g. a pipe to
    /// the caller) mapped to fds of the controller: key like CRIU's
    /// `pipe:[INODE]` -> fd number in the controller.
    pub inherit: Vec<(String, RawFd)>,
}

/// The fd an error is about: the dumped pid and fd number (the first
/// holder, for a description shared by several) and what it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FdRef {
    /// The dumped process.
    pub pid: i32,
    /// Its fd.
    pub fd: i32,
    /// The kind and path, e.g. `regular file /tmp/x`, `pipe:[123] write end`.
    pub what: String,
}

impl fmt::Display for FdRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fd {} of pid {} ({})", self.fd, self.pid, self.what)
    }
}

/// A failure to recreate the open files of a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The image holds an fd of no known kind.
    #[error("{at}: unknown kind of file, cannot be restored")]
    Unknown {
        /// The fd.
        at: FdRef,
    },
    /// An fd refers to a shared file object the inventory does not hold (or
    /// that is itself a reference).
    #[error("{at}: refers to shared file {file_id}, which the inventory does not hold")]
    MissingObject {
        /// The fd.
        at: FdRef,
        /// The missing [`FileObject::id`].
        file_id: u64,
    },
    /// A pipe with only one end in the tree, and no inherited fd for it.
    #[error(
        "{at}: the other end of {key} is outside the dumped tree: \
         pass --inherit-fd FD:{key} (an fd of that pipe) or --shell-job"
    )]
    External {
        /// The fd.
        at: FdRef,
        /// `pipe:[INODE]`.
        key: String,
    },
    /// A unix socket that cannot be restored.
    #[error("{at}: unix socket socket:[{inode}] is not supported: {why}")]
    UnsupportedSocket {
        /// The fd.
        at: FdRef,
        /// The socket's inode.
        inode: u64,
        /// Why.
        why: String,
    },
    /// Opening a path failed.
    #[error("{at}: open {path}")]
    Open {
        /// The fd.
        at: FdRef,
        /// What was opened (maybe `/proc/self/fd/N`).
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A regular file's size changed since the dump.
    #[error(
        "{at}: {path} is {now} bytes now but was {recorded} bytes at dump time \
         (allow_size_change restores it anyway)"
    )]
    SizeChanged {
        /// The fd.
        at: FdRef,
        /// The file.
        path: PathBuf,
        /// The size in the image.
        recorded: u64,
        /// The size now.
        now: u64,
    },
    /// The path is no longer the kind of file it was.
    #[error("{at}: {path} is no longer a {expected}")]
    WrongType {
        /// The fd.
        at: FdRef,
        /// The path.
        path: PathBuf,
        /// What it was.
        expected: &'static str,
    },
    /// `lseek` to the recorded position failed.
    #[error("{at}: seek to {pos}")]
    Seek {
        /// The fd.
        at: FdRef,
        /// The position.
        pos: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `F_SETFL` failed.
    #[error("{at}: set status flags {flags:#o}")]
    SetFlags {
        /// The fd.
        at: FdRef,
        /// The flags.
        flags: i32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Recreating an unlinked file failed.
    #[error("{at}: recreate the unlinked file in {dir}: {op}")]
    Unlinked {
        /// The fd.
        at: FdRef,
        /// The directory it is recreated in.
        dir: PathBuf,
        /// What failed.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The recorded contents or buffered data of a file could not be read
    /// back from the checkpoint's file-data file.
    #[error("{at}: reading its recorded data")]
    Data {
        /// The fd.
        at: FdRef,
        /// The cause.
        #[source]
        source: ImageError,
    },
    /// Creating or filling a pipe failed.
    #[error("{at}: pipe:[{inode}]: {op}")]
    Pipe {
        /// The fd.
        at: FdRef,
        /// The dumped pipe's inode.
        inode: u64,
        /// What failed.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Filling a FIFO failed.
    #[error("{at}: FIFO {path}: {op}")]
    Fifo {
        /// The fd.
        at: FdRef,
        /// The FIFO.
        path: PathBuf,
        /// What failed.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Creating an eventfd failed.
    #[error("{at}: eventfd: {op}")]
    EventFd {
        /// The fd.
        at: FdRef,
        /// What failed.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Creating, filling or sealing a memfd failed.
    #[error("{at}: memfd {name:?}: {op}")]
    Memfd {
        /// The fd.
        at: FdRef,
        /// The memfd's name.
        name: String,
        /// What failed.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Creating a socketpair, re-queueing its data or shutting it down failed.
    #[error("{at}: unix socket socket:[{inode}]: {op}")]
    Socket {
        /// The fd.
        at: FdRef,
        /// The dumped socket's inode.
        inode: u64,
        /// What failed.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An inherited fd could not be used.
    #[error("inherited fd {fd} for {key}: {op}")]
    Inherit {
        /// The key.
        key: String,
        /// The controller's fd.
        fd: RawFd,
        /// What failed.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// RLIMIT_NOFILE's hard limit is too low for the table.
    #[error(
        "restoring fds up to {max_fd} with {count} open files needs RLIMIT_NOFILE {needed}, \
         above its hard limit {hard}"
    )]
    Rlimit {
        /// The highest fd number of any image.
        max_fd: i32,
        /// The number of fds the table opens.
        count: u64,
        /// The soft limit needed.
        needed: u64,
        /// The hard limit.
        hard: u64,
    },
    /// `setrlimit(RLIMIT_NOFILE)` or `getrlimit` failed.
    #[error("raise RLIMIT_NOFILE to {want}")]
    SetRlimit {
        /// The soft limit wanted.
        want: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Moving a table fd to `base()` or above failed.
    #[error("{at}: move fd {fd} to {base} or above")]
    Hoist {
        /// The fd.
        at: FdRef,
        /// The table's fd.
        fd: RawFd,
        /// The base.
        base: RawFd,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// [`FileTable::install`] for a pid the checkpoint does not hold.
    #[error("pid {pid} is not a process of the checkpoint")]
    NoSuchProcess {
        /// The pid.
        pid: i32,
    },
    /// `dup3` of a table fd to the fd number failed.
    #[error("install fd {fd} of pid {pid} (dup3 of fd {from})")]
    Dup {
        /// The dumped pid.
        pid: i32,
        /// The fd number.
        fd: i32,
        /// The table's fd.
        from: RawFd,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `close_range` of the fds the image does not list failed.
    #[error("close fds {first}..={last} in pid {pid}")]
    Close {
        /// The dumped pid.
        pid: i32,
        /// The first fd closed.
        first: u32,
        /// The last fd closed.
        last: u32,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// What an fd is, for messages.
fn describe(kind: &FdKind, flags: u32) -> String {
    let acc = match flags as i32 & libc::O_ACCMODE {
        libc::O_RDONLY => "read-only",
        libc::O_WRONLY => "write-only",
        _ => "read-write",
    };
    match kind {
        FdKind::Unknown => "unknown".into(),
        FdKind::Regular {
            path,
            unlinked_contents,
            ..
        } => match unlinked_contents {
            Some(_) => format!("unlinked regular file {path}, {acc}"),
            None => format!("regular file {path}, {acc}"),
        },
        FdKind::Directory { path, .. } => format!("directory {path}"),
        FdKind::DevNull => format!("/dev/null, {acc}"),
        FdKind::DevZero => format!("/dev/zero, {acc}"),
        FdKind::Pipe {
            inode, write_end, ..
        } => format!("pipe:[{inode}] {}", end(*write_end)),
        FdKind::Fifo {
            path, write_end, ..
        } => format!("FIFO {path} {}", end(*write_end)),
        FdKind::EventFd { .. } => "eventfd".into(),
        FdKind::Memfd { name, .. } => format!("memfd:{name}"),
        FdKind::Shared { file_id } => format!("shared file {file_id}"),
        FdKind::UnixSocket { inode, .. } => format!("unix socket socket:[{inode}]"),
    }
}

fn end(write_end: bool) -> &'static str {
    if write_end {
        "write end"
    } else {
        "read end"
    }
}

// ---------------------------------------------------------------------------
// Planning (pure)
// ---------------------------------------------------------------------------

/// One open file description to create.
#[derive(Debug)]
struct Desc<'a> {
    /// The first fd holding it.
    at: FdRef,
    /// Its `flags:` (O_CLOEXEC removed).
    flags: u32,
    /// What it is (never `Shared`).
    kind: &'a FdKind,
}

/// The pipes of the images: which ends the tree holds, and the data.
#[derive(Debug, Default, PartialEq, Eq)]
struct PipeUse<'a> {
    read: bool,
    write: bool,
    data: Option<&'a Blob>,
}

/// What [`plan`] makes of the images.
#[derive(Debug)]
struct Plan<'a> {
    descs: Vec<Desc<'a>>,
    /// Per dumped pid: (fd, index in `descs`, cloexec), sorted by fd.
    installs: HashMap<i32, Vec<(i32, usize, bool)>>,
    /// The highest fd number of any image (-1 if none).
    max_fd: i32,
    pipes: BTreeMap<u64, PipeUse<'a>>,
    /// FIFO data by (path, inode).
    fifo_data: HashMap<(&'a str, u64), &'a Blob>,
    /// Unix sockets: inode -> index in `descs`.
    sockets: BTreeMap<u64, usize>,
}

impl Plan<'_> {
    /// The pipes with only one end in the tree: `pipe:[INODE]` and the
    /// first fd holding each.
    fn externals(&self) -> Vec<(String, &FdRef)> {
        let mut out = Vec::new();
        for (inode, u) in &self.pipes {
            if u.read != u.write {
                let at = self
                    .descs
                    .iter()
                    .find(|d| matches!(d.kind, FdKind::Pipe { inode: i, .. } if i == inode))
                    .map(|d| &d.at)
                    .expect("a pipe in the plan has a description");
                out.push((format!("pipe:[{inode}]"), at));
            }
        }
        out
    }
}

fn plan<'a>(inv: &'a Inventory, procs: &'a [ProcessImage]) -> Result<Plan<'a>, FilesError> {
    let objects: HashMap<u64, &FileObject> = inv.files.iter().map(|o| (o.id, o)).collect();
    let mut descs: Vec<Desc<'a>> = Vec::new();
    let mut object_desc: HashMap<u64, usize> = HashMap::new();
    let mut installs: HashMap<i32, Vec<(i32, usize, bool)>> = HashMap::new();
    let mut max_fd = -1;
    for p in procs {
        let list = installs.entry(p.pid).or_default();
        for e in &p.fds {
            let at = || FdRef {
                pid: p.pid,
                fd: e.fd,
                what: describe(&e.kind, e.flags),
            };
            max_fd = max_fd.max(e.fd);
            let idx = match &e.kind {
                FdKind::Unknown => return Err(FilesError::Unknown { at: at() }),
                FdKind::Shared { file_id } => match object_desc.get(file_id) {
                    Some(&i) => i,
                    None => {
                        let o = objects
                            .get(file_id)
                            .filter(|o| !matches!(o.kind, FdKind::Shared { .. }))
                            .ok_or_else(|| FilesError::MissingObject {
                                at: at(),
                                file_id: *file_id,
                            })?;
                        let at = FdRef {
                            what: format!("shared file {file_id}: {}", describe(&o.kind, o.flags)),
                            ..at()
                        };
                        if o.kind == FdKind::Unknown {
                            return Err(FilesError::Unknown { at });
                        }
                        descs.push(Desc {
                            at,
                            flags: o.flags & !(libc::O_CLOEXEC as u32),
                            kind: &o.kind,
                        });
                        object_desc.insert(*file_id, descs.len() - 1);
                        descs.len() - 1
                    }
                },
                kind => {
                    descs.push(Desc {
                        at: at(),
                        flags: e.flags & !(libc::O_CLOEXEC as u32),
                        kind,
                    });
                    descs.len() - 1
                }
            };
            list.push((e.fd, idx, e.cloexec));
        }
        list.sort_by_key(|&(fd, ..)| fd);
    }

    let mut pipes: BTreeMap<u64, PipeUse<'a>> = BTreeMap::new();
    let mut fifo_data: HashMap<(&'a str, u64), &'a Blob> = HashMap::new();
    let mut sockets: BTreeMap<u64, usize> = BTreeMap::new();
    for (i, d) in descs.iter().enumerate() {
        match d.kind {
            FdKind::Pipe {
                inode,
                write_end,
                data,
            } => {
                let u = pipes.entry(*inode).or_default();
                if *write_end {
                    u.write = true;
                } else {
                    u.read = true;
                }
                if u.data.is_none_or(Blob::is_empty) {
                    u.data = Some(data);
                }
            }
            FdKind::Fifo {
                path, inode, data, ..
            } => {
                let slot = fifo_data.entry((path.as_str(), *inode)).or_insert(data);
                if slot.is_empty() {
                    *slot = data;
                }
            }
            FdKind::UnixSocket { inode, .. } => {
                sockets.entry(*inode).or_insert(i);
            }
            _ => {}
        }
    }
    for &i in sockets.values() {
        let d = &descs[i];
        let FdKind::UnixSocket {
            inode,
            peer_inode,
            sock_type,
            name,
            ..
        } = d.kind
        else {
            unreachable!("only sockets are in `sockets`")
        };
        let bad = |why: String| FilesError::UnsupportedSocket {
            at: d.at.clone(),
            inode: *inode,
            why,
        };
        if !name.is_empty() {
            return Err(bad(format!(
                "it is bound to the name {:?} (only unnamed socketpairs are restored)",
                String::from_utf8_lossy(name)
            )));
        }
        if *peer_inode == 0 {
            return Err(bad("it is not connected".into()));
        }
        let Some(&pi) = sockets.get(peer_inode) else {
            return Err(bad(format!(
                "its peer socket:[{peer_inode}] is outside the dumped tree"
            )));
        };
        match descs[pi].kind {
            FdKind::UnixSocket {
                peer_inode: back,
                sock_type: t,
                ..
            } if back == inode && t == sock_type => {}
            _ => {
                return Err(bad(format!(
                    "its peer socket:[{peer_inode}] is not connected back to it with the same type"
                )))
            }
        }
        if ![libc::SOCK_STREAM, libc::SOCK_DGRAM, libc::SOCK_SEQPACKET].contains(sock_type) {
            return Err(bad(format!("socket type {sock_type}")));
        }
    }
    Ok(Plan {
        descs,
        installs,
        max_fd,
        pipes,
        fifo_data,
        sockets,
    })
}

/// The external objects of the images that need [`FileOptions::inherit`]
/// (`pipe:[INODE]`, sorted by inode), without opening anything.
pub fn external_keys(inv: &Inventory, procs: &[ProcessImage]) -> Result<Vec<String>, FilesError> {
    Ok(plan(inv, procs)?
        .externals()
        .into_iter()
        .map(|(k, _)| k)
        .collect())
}

/// The lowest fd the table uses for images whose highest fd is `max_fd`.
fn base_for(max_fd: i32) -> RawFd {
    (max_fd + 1).max(3)
}

// ---------------------------------------------------------------------------
// Opening (controller side)
// ---------------------------------------------------------------------------

/// Every open file description of a checkpoint, open in the controller at
/// fds `>= base()`, all `O_CLOEXEC`; see the [module](self) documentation.
#[derive(Debug)]
pub struct FileTable {
    base: RawFd,
    /// One per description.
    descs: Vec<OwnedFd>,
    /// Per dumped pid: (fd, table fd, cloexec), sorted by fd.
    installs: HashMap<i32, Vec<(i32, RawFd, bool)>>,
    /// memfd objects by dumped inode.
    memfds: HashMap<u64, OwnedFd>,
    externals: Vec<String>,
}

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
}

/// `open(2)` with `O_CLOEXEC`.
fn open_raw(path: &Path, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let c = cstring(path)?;
    // SAFETY: a valid NUL-terminated path; open has no other pointers.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        return Err(last_err());
    }
    // SAFETY: open just returned this fd, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn proc_self_fd(fd: RawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{fd}"))
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out pointer.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(last_err());
    }
    Ok(st)
}

/// Writes all of `data` to `fd` (a non-blocking pipe or FIFO).
fn write_all(fd: RawFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: writes from a valid slice.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n < 0 {
            let e = last_err();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        data = &data[n as usize..];
    }
    Ok(())
}

/// Why streaming a blob somewhere failed.
enum Fill {
    /// Reading it back from the checkpoint.
    Data(ImageError),
    /// Writing it.
    Io(io::Error),
}

/// Streams `blob` (from its file-data file in `dir`) into `sink`, one
/// [`CHUNK`] at a time: `sink(offset in the blob, bytes)`. The blob's
/// CRC32C is checked at its end.
fn stream_blob(
    dir: &Path,
    blob: &Blob,
    mut sink: impl FnMut(u64, &[u8]) -> io::Result<()>,
) -> Result<(), Fill> {
    if blob.is_empty() {
        return Ok(());
    }
    let data = DataReader::open(dir, &blob.file).map_err(Fill::Data)?;
    let mut r = data.reader(blob).map_err(Fill::Data)?;
    let mut buf = vec![0u8; CHUNK.min(blob.len as usize)];
    loop {
        let at = r.position();
        let n = r.read_chunk(&mut buf).map_err(Fill::Data)?;
        if n == 0 {
            return Ok(());
        }
        sink(at, &buf[..n]).map_err(Fill::Io)?;
    }
}

/// Fills the (empty) regular file or memfd `f` with `blob`: its size
/// first, then the chunks that are not all zero (holes stay holes).
impl Fill {
    /// The error of fd `at`: a bad checkpoint as such, a write as `io` says.
    fn at(self, at: &FdRef, io: impl FnOnce(io::Error) -> FilesError) -> FilesError {
        match self {
            Fill::Data(source) => FilesError::Data {
                at: at.clone(),
                source,
            },
            Fill::Io(e) => io(e),
        }
    }
}

fn fill_file(dir: &Path, blob: &Blob, f: &File) -> Result<(), Fill> {
    f.set_len(blob.len).map_err(Fill::Io)?;
    stream_blob(dir, blob, |at, bytes| {
        if bytes.iter().all(|&b| b == 0) {
            return Ok(());
        }
        f.write_all_at(bytes, at)
    })
}

/// Whether two blobs hold the same bytes (compared a chunk at a time).
fn same_bytes(dir: &Path, a: &Blob, b: &Blob) -> Result<bool, ImageError> {
    if a == b {
        return Ok(true);
    }
    if a.len != b.len || a.crc32c != b.crc32c {
        return Ok(false);
    }
    let (da, db) = (
        DataReader::open(dir, &a.file)?,
        DataReader::open(dir, &b.file)?,
    );
    let (mut ra, mut rb) = (da.reader(a)?, db.reader(b)?);
    let n = CHUNK.min(a.len as usize);
    let (mut ba, mut bb) = (vec![0u8; n], vec![0u8; n]);
    loop {
        let k = ra.read_chunk(&mut ba)?;
        if rb.read_chunk(&mut bb[..k.max(1)])? != k || ba[..k] != bb[..k] {
            return Ok(false);
        }
        if k == 0 {
            return Ok(true);
        }
    }
}

/// Makes the pipe behind `fd` hold at least `len` bytes.
fn pipe_room(fd: RawFd, len: usize) -> io::Result<()> {
    // SAFETY: F_GETPIPE_SZ takes no argument.
    let cap = unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) };
    if cap < 0 {
        return Err(last_err());
    }
    if len > cap as usize {
        let want = libc::c_int::try_from(len).map_err(|_| io::Error::other("too much data"))?;
        // SAFETY: F_SETPIPE_SZ takes an int size.
        if unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, want) } < 0 {
            return Err(last_err());
        }
    }
    Ok(())
}

/// Raises RLIMIT_NOFILE's soft limit to `needed` if it is lower.
fn ensure_nofile(max_fd: i32, count: u64, needed: u64) -> Result<(), FilesError> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a valid out pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } < 0 {
        return Err(FilesError::SetRlimit {
            want: needed,
            source: last_err(),
        });
    }
    if rl.rlim_cur >= needed {
        return Ok(());
    }
    if rl.rlim_max < needed {
        return Err(FilesError::Rlimit {
            max_fd,
            count,
            needed,
            hard: rl.rlim_max,
        });
    }
    rl.rlim_cur = needed;
    // SAFETY: `rl` is a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) } < 0 {
        return Err(FilesError::SetRlimit {
            want: needed,
            source: last_err(),
        });
    }
    Ok(())
}

/// A pipe being recreated.
struct PipeRes {
    /// The pipe's own ends while not yet used by a description.
    read: Option<OwnedFd>,
    write: Option<OwnedFd>,
    /// An fd of the pipe to reopen through (own end or inherited fd).
    any: RawFd,
    /// The pipe came from `inherit`.
    inherited: bool,
}

/// The state of [`FileTable::open`] while it runs.
struct Opener<'a, 'p> {
    /// The checkpoint directory (file-data files).
    dir: &'p Path,
    plan: &'p Plan<'a>,
    opts: &'p FileOptions,
    pipes: HashMap<u64, PipeRes>,
    fifos: HashMap<(&'a str, u64), OwnedFd>,
    /// Unlinked files made: path, mode, contents.
    unlinked: Vec<(&'a str, u32, &'a Blob, OwnedFd)>,
    memfds: HashMap<u64, OwnedFd>,
    /// Socket ends made with their peer, not yet taken.
    sockets: HashMap<u64, OwnedFd>,
}

impl<'a> Opener<'a, '_> {
    fn set_flags(&self, at: &FdRef, fd: RawFd, flags: u32) -> Result<(), FilesError> {
        let want = flags as i32 & SETFL;
        // SAFETY: F_GETFL takes no argument.
        let cur = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if cur < 0 || cur & SETFL != want {
            // SAFETY: F_SETFL takes an int of flags.
            if cur < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, (cur & !SETFL) | want) } < 0 {
                return Err(FilesError::SetFlags {
                    at: at.clone(),
                    flags: want,
                    source: last_err(),
                });
            }
        }
        Ok(())
    }

    fn seek(&self, at: &FdRef, fd: RawFd, pos: u64, flags: u32) -> Result<(), FilesError> {
        if flags as i32 & libc::O_PATH != 0 {
            return Ok(());
        }
        let err = |source| FilesError::Seek {
            at: at.clone(),
            pos,
            source,
        };
        let off = libc::off_t::try_from(pos).map_err(|_| err(io::Error::other("too large")))?;
        // SAFETY: lseek takes integers.
        if unsafe { libc::lseek(fd, off, libc::SEEK_SET) } != off {
            return Err(err(last_err()));
        }
        Ok(())
    }

    /// Opens `path` with the description's open flags (`extra` added).
    fn open_as(
        &self,
        at: &FdRef,
        path: &Path,
        flags: u32,
        extra: i32,
    ) -> Result<OwnedFd, FilesError> {
        open_raw(path, (flags as i32 & !NEVER) | extra, 0).map_err(|source| FilesError::Open {
            at: at.clone(),
            path: path.to_owned(),
            source,
        })
    }

    fn open_desc(&mut self, d: &Desc<'a>) -> Result<OwnedFd, FilesError> {
        let at = &d.at;
        let flags = d.flags;
        match d.kind {
            FdKind::Unknown | FdKind::Shared { .. } => Err(FilesError::Unknown { at: at.clone() }),
            FdKind::Regular {
                path,
                pos,
                size,
                mode,
                unlinked_contents,
            } => {
                let flags = flags & !(libc::O_DIRECTORY as u32);
                let fd = match unlinked_contents {
                    None => {
                        let p = Path::new(path);
                        let fd = self.open_as(at, p, flags, 0)?;
                        let st = fstat(fd.as_raw_fd()).map_err(|source| FilesError::Open {
                            at: at.clone(),
                            path: p.to_owned(),
                            source,
                        })?;
                        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                            return Err(FilesError::WrongType {
                                at: at.clone(),
                                path: p.to_owned(),
                                expected: "regular file",
                            });
                        }
                        let now = st.st_size as u64;
                        if now != *size && !self.opts.allow_size_change {
                            return Err(FilesError::SizeChanged {
                                at: at.clone(),
                                path: p.to_owned(),
                                recorded: *size,
                                now,
                            });
                        }
                        fd
                    }
                    Some(contents) => {
                        let tmp = self.unlinked_file(at, path, *mode, contents)?;
                        self.open_as(at, &proc_self_fd(tmp), flags, 0)?
                    }
                };
                self.set_flags(at, fd.as_raw_fd(), flags)?;
                self.seek(at, fd.as_raw_fd(), *pos, flags)?;
                Ok(fd)
            }
            FdKind::Directory { path, pos } => {
                let p = Path::new(path);
                let fd = self.open_as(at, p, flags, libc::O_DIRECTORY)?;
                self.seek(at, fd.as_raw_fd(), *pos, flags)?;
                Ok(fd)
            }
            FdKind::DevNull | FdKind::DevZero => {
                let p = Path::new(if *d.kind == FdKind::DevNull {
                    "/dev/null"
                } else {
                    "/dev/zero"
                });
                let fd = self.open_as(at, p, flags, 0)?;
                self.set_flags(at, fd.as_raw_fd(), flags)?;
                Ok(fd)
            }
            FdKind::Pipe {
                inode, write_end, ..
            } => self.pipe_end(at, *inode, *write_end, flags),
            FdKind::Fifo { path, inode, .. } => {
                let holder = self.fifo(at, path, *inode)?;
                let fd = self.open_as(at, &proc_self_fd(holder), flags, libc::O_NONBLOCK)?;
                self.set_flags(at, fd.as_raw_fd(), flags)?;
                Ok(fd)
            }
            FdKind::EventFd { count, efd_flags } => {
                let err = |op, source| FilesError::EventFd {
                    at: at.clone(),
                    op,
                    source,
                };
                let sem = *efd_flags as i32 & libc::EFD_SEMAPHORE;
                // SAFETY: eventfd takes integers.
                let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | sem) };
                if fd < 0 {
                    return Err(err("eventfd", last_err()));
                }
                // SAFETY: eventfd just returned this fd, owned by nobody else.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                if *count > 0 {
                    let b = count.to_ne_bytes();
                    // SAFETY: writes 8 bytes from a stack buffer.
                    if unsafe { libc::write(fd.as_raw_fd(), b.as_ptr().cast(), 8) } != 8 {
                        return Err(err("set the count", last_err()));
                    }
                }
                self.set_flags(at, fd.as_raw_fd(), flags)?;
                Ok(fd)
            }
            FdKind::Memfd {
                name,
                inode,
                pos,
                contents,
                ..
            } => {
                let base = self.memfd(at, name, *inode, contents)?;
                let fd = self.open_as(at, &proc_self_fd(base), flags, 0)?;
                self.set_flags(at, fd.as_raw_fd(), flags)?;
                self.seek(at, fd.as_raw_fd(), *pos, flags)?;
                Ok(fd)
            }
            FdKind::UnixSocket {
                inode,
                peer_inode,
                sock_type,
                ..
            } => {
                let fd = match self.sockets.remove(inode) {
                    Some(fd) => fd,
                    None => {
                        let mut sv = [0; 2];
                        // SAFETY: `sv` has room for the two fds.
                        let r = unsafe {
                            libc::socketpair(
                                libc::AF_UNIX,
                                *sock_type | libc::SOCK_CLOEXEC,
                                0,
                                sv.as_mut_ptr(),
                            )
                        };
                        if r < 0 {
                            return Err(FilesError::Socket {
                                at: at.clone(),
                                inode: *inode,
                                op: "socketpair",
                                source: last_err(),
                            });
                        }
                        // SAFETY: socketpair just returned these, owned by nobody else.
                        let (a, b) =
                            unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) };
                        self.sockets.insert(*peer_inode, b);
                        a
                    }
                };
                self.set_flags(at, fd.as_raw_fd(), flags)?;
                Ok(fd)
            }
        }
    }

    /// The description of one end of pipe `inode`.
    fn pipe_end(
        &mut self,
        at: &FdRef,
        inode: u64,
        write_end: bool,
        flags: u32,
    ) -> Result<OwnedFd, FilesError> {
        let err = |op, source| FilesError::Pipe {
            at: at.clone(),
            inode,
            op,
            source,
        };
        if !self.pipes.contains_key(&inode) {
            let u = &self.plan.pipes[&inode];
            let key = format!("pipe:[{inode}]");
            let inherited = self.opts.inherit.iter().any(|(k, _)| *k == key);
            // One end outside the tree and not handed in: the other end was
            // closed everywhere (a reader sees EOF after the data, a writer
            // EPIPE), or it was held outside, which a restore cannot bring
            // back: either way the tree gets a fresh pipe with its data.
            if !(inherited || u.read && u.write) {
                log::info!(
                    "{key}: one end outside the tree; restored as a pipe with that end closed"
                );
            }
            let res = if (u.read && u.write) || !inherited {
                let mut p = [0; 2];
                // SAFETY: `p` has room for the two fds.
                if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
                    return Err(err("pipe2", last_err()));
                }
                // SAFETY: pipe2 just returned these, owned by nobody else.
                let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
                let data = u.data.cloned().unwrap_or_default();
                pipe_room(w.as_raw_fd(), data.len as usize)
                    .map_err(|e| err("make room for the buffered data (F_SETPIPE_SZ)", e))?;
                stream_blob(self.dir, &data, |_, b| write_all(w.as_raw_fd(), b)).map_err(|e| {
                    match e {
                        Fill::Data(source) => FilesError::Data {
                            at: at.clone(),
                            source,
                        },
                        Fill::Io(e) => err("write the buffered data", e),
                    }
                })?;
                PipeRes {
                    any: r.as_raw_fd(),
                    read: Some(r),
                    write: Some(w),
                    inherited: false,
                }
            } else {
                let key = format!("pipe:[{inode}]");
                let Some(&(_, fd)) = self.opts.inherit.iter().find(|(k, _)| *k == key) else {
                    return Err(FilesError::External {
                        at: at.clone(),
                        key,
                    });
                };
                // Any open file may stand in for the outside end (a
                // terminal, with --shell-job); it must be open.
                fstat(fd).map_err(|source| FilesError::Inherit {
                    key: key.clone(),
                    fd,
                    op: "fstat",
                    source,
                })?;
                PipeRes {
                    read: None,
                    write: None,
                    any: fd,
                    inherited: true,
                }
            };
            self.pipes.insert(inode, res);
        }
        let res = self.pipes.get_mut(&inode).expect("just inserted");
        let (native, acc) = if write_end {
            (&mut res.write, libc::O_WRONLY)
        } else {
            (&mut res.read, libc::O_RDONLY)
        };
        // The pipe's own end is exactly such a description unless it was
        // reopened (O_LARGEFILE) or has another access mode.
        let own = flags as i32 & (libc::O_ACCMODE | KERNEL_O_LARGEFILE) == acc;
        let fd = match native.take() {
            Some(fd) if own => fd,
            other => {
                *native = other;
                let any = res.any;
                let inherited = res.inherited;
                let path = proc_self_fd(any);
                open_raw(&path, (flags as i32 & !NEVER) | libc::O_NONBLOCK, 0).map_err(
                    |source| {
                        if inherited {
                            FilesError::Inherit {
                                key: format!("pipe:[{inode}]"),
                                fd: any,
                                op: "reopen through /proc/self/fd",
                                source,
                            }
                        } else {
                            FilesError::Open {
                                at: at.clone(),
                                path,
                                source,
                            }
                        }
                    },
                )?
            }
        };
        self.set_flags(at, fd.as_raw_fd(), flags)?;
        Ok(fd)
    }

    /// The O_RDWR holder of a FIFO, opened (and filled) the first time.
    fn fifo(&mut self, at: &FdRef, path: &'a str, inode: u64) -> Result<RawFd, FilesError> {
        if let Some(fd) = self.fifos.get(&(path, inode)) {
            return Ok(fd.as_raw_fd());
        }
        let p = Path::new(path);
        let err = |op, source| FilesError::Fifo {
            at: at.clone(),
            path: p.to_owned(),
            op,
            source,
        };
        let holder =
            open_raw(p, libc::O_RDWR | libc::O_NONBLOCK, 0).map_err(|e| err("open O_RDWR", e))?;
        let st = fstat(holder.as_raw_fd()).map_err(|e| err("fstat", e))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFIFO {
            return Err(FilesError::WrongType {
                at: at.clone(),
                path: p.to_owned(),
                expected: "FIFO",
            });
        }
        let data = self
            .plan
            .fifo_data
            .get(&(path, inode))
            .copied()
            .cloned()
            .unwrap_or_default();
        pipe_room(holder.as_raw_fd(), data.len as usize)
            .map_err(|e| err("make room for the buffered data", e))?;
        stream_blob(self.dir, &data, |_, b| write_all(holder.as_raw_fd(), b)).map_err(
            |e| match e {
                Fill::Data(source) => FilesError::Data {
                    at: at.clone(),
                    source,
                },
                Fill::Io(e) => err("write the buffered data", e),
            },
        )?;
        let raw = holder.as_raw_fd();
        self.fifos.insert((path, inode), holder);
        Ok(raw)
    }

    /// The recreated unlinked file, made the first time.
    fn unlinked_file(
        &mut self,
        at: &FdRef,
        path: &'a str,
        mode: u32,
        contents: &'a Blob,
    ) -> Result<RawFd, FilesError> {
        for (p, m, c, fd) in &self.unlinked {
            if (*p, *m) == (path, mode)
                && same_bytes(self.dir, c, contents).map_err(|source| FilesError::Data {
                    at: at.clone(),
                    source,
                })?
            {
                return Ok(fd.as_raw_fd());
            }
        }
        let name = path.strip_suffix(" (deleted)").unwrap_or(path);
        let mut dir = Path::new(name).parent().unwrap_or(Path::new("/"));
        while !dir.is_dir() {
            dir = dir.parent().unwrap_or(Path::new("/"));
        }
        let err = |op, source| FilesError::Unlinked {
            at: at.clone(),
            dir: dir.to_owned(),
            op,
            source,
        };
        // Under its own name, unlinked at once, where that name is free:
        // /proc/PID/fd then shows "NAME (deleted)" as it did.
        let own = Path::new(name);
        let named = if own.parent() == Some(dir) {
            open_raw(
                own,
                libc::O_CREAT | libc::O_EXCL | libc::O_RDWR,
                mode & 0o7777,
            )
            .ok()
            .filter(|_| std::fs::remove_file(own).is_ok())
        } else {
            None
        };
        let tmpfile = match named {
            Some(fd) => Ok(fd),
            None => open_raw(dir, libc::O_TMPFILE | libc::O_RDWR, mode & 0o7777),
        };
        let fd = match tmpfile {
            Ok(fd) => fd,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR)) => {
                // No O_TMPFILE here: a fresh name, unlinked at once.
                let tmp = dir.join(format!(
                    ".pdump-unlinked-{}-{}",
                    std::process::id(),
                    self.unlinked.len()
                ));
                let fd = open_raw(
                    &tmp,
                    libc::O_CREAT | libc::O_EXCL | libc::O_RDWR,
                    mode & 0o7777,
                )
                .map_err(|e| err("create a temporary file", e))?;
                std::fs::remove_file(&tmp).map_err(|e| err("unlink the temporary file", e))?;
                fd
            }
            Err(e) => return Err(err("open O_TMPFILE", e)),
        };
        // SAFETY: fchmod takes integers (the umask applied to the mode above).
        if unsafe { libc::fchmod(fd.as_raw_fd(), mode & 0o7777) } < 0 {
            return Err(err("fchmod", last_err()));
        }
        let f = File::from(fd);
        fill_file(self.dir, contents, &f)
            .map_err(|e| e.at(at, |e| err("write the contents", e)))?;
        let fd = OwnedFd::from(f);
        let raw = fd.as_raw_fd();
        self.unlinked.push((path, mode, contents, fd));
        Ok(raw)
    }

    /// The memfd object of `inode`, made (and filled) the first time.
    fn memfd(
        &mut self,
        at: &FdRef,
        name: &str,
        inode: u64,
        contents: &Blob,
    ) -> Result<RawFd, FilesError> {
        if let Some(fd) = self.memfds.get(&inode) {
            return Ok(fd.as_raw_fd());
        }
        let err = |op, source| FilesError::Memfd {
            at: at.clone(),
            name: name.to_owned(),
            op,
            source,
        };
        let c = CString::new(name).map_err(|_| {
            err(
                "memfd_create",
                io::Error::new(io::ErrorKind::InvalidInput, "name holds a NUL byte"),
            )
        })?;
        // SAFETY: a valid NUL-terminated name.
        let fd =
            unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(err("memfd_create", last_err()));
        }
        // SAFETY: memfd_create just returned this fd, owned by nobody else.
        let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        fill_file(self.dir, contents, &f)
            .map_err(|e| e.at(at, |e| err("write the contents", e)))?;
        let fd = OwnedFd::from(f);
        let raw = fd.as_raw_fd();
        self.memfds.insert(inode, fd);
        Ok(raw)
    }

    /// After every description exists: socket queues and shutdowns, memfd seals.
    fn finish(&mut self, descs: &[OwnedFd]) -> Result<(), FilesError> {
        let plan = self.plan;
        for &i in plan.sockets.values() {
            let FdKind::UnixSocket {
                inode,
                peer_inode,
                queued,
                ..
            } = plan.descs[i].kind
            else {
                continue;
            };
            let peer = descs[plan.sockets[peer_inode]].as_raw_fd();
            let at = &plan.descs[i].at;
            let err = |op, source| FilesError::Socket {
                at: at.clone(),
                inode: *inode,
                op,
                source,
            };
            let total: usize = queued.iter().map(Vec::len).sum();
            let mut raised = false;
            for m in queued {
                loop {
                    // SAFETY: sends from a valid slice.
                    let n = unsafe {
                        libc::send(
                            peer,
                            m.as_ptr().cast(),
                            m.len(),
                            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                        )
                    };
                    if n == m.len() as isize {
                        break;
                    }
                    let e = if n < 0 {
                        last_err()
                    } else {
                        io::Error::other(format!("sent {n} of {} bytes", m.len()))
                    };
                    if n < 0 && e.kind() == io::ErrorKind::WouldBlock && !raised {
                        // The peer's send buffer is too small for all of it.
                        raised = true;
                        let size =
                            libc::c_int::try_from(2 * total + 65536).unwrap_or(libc::c_int::MAX);
                        // SAFETY: SO_SNDBUFFORCE takes an int.
                        unsafe {
                            libc::setsockopt(
                                peer,
                                libc::SOL_SOCKET,
                                libc::SO_SNDBUFFORCE,
                                (&size as *const libc::c_int).cast(),
                                4,
                            )
                        };
                        continue;
                    }
                    return Err(err("re-queue its data (send from its peer)", e));
                }
            }
        }
        for &i in plan.sockets.values() {
            let FdKind::UnixSocket {
                inode, shutdown, ..
            } = plan.descs[i].kind
            else {
                continue;
            };
            let how = match shutdown & 3 {
                0 => continue,
                1 => libc::SHUT_RD,
                2 => libc::SHUT_WR,
                _ => libc::SHUT_RDWR,
            };
            // SAFETY: shutdown takes integers.
            if unsafe { libc::shutdown(descs[i].as_raw_fd(), how) } < 0 {
                return Err(FilesError::Socket {
                    at: plan.descs[i].at.clone(),
                    inode: *inode,
                    op: "shutdown",
                    source: last_err(),
                });
            }
        }
        let mut sealed = Vec::new();
        for d in &plan.descs {
            if let FdKind::Memfd {
                name, inode, seals, ..
            } = d.kind
            {
                if *seals == 0 || sealed.contains(inode) {
                    continue;
                }
                sealed.push(*inode);
                let fd = self.memfds[inode].as_raw_fd();
                // SAFETY: F_ADD_SEALS takes an int.
                if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, *seals as libc::c_int) } < 0 {
                    return Err(FilesError::Memfd {
                        at: d.at.clone(),
                        name: name.clone(),
                        op: "F_ADD_SEALS",
                        source: last_err(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Moves `fd` to `base` or above (`F_DUPFD_CLOEXEC`).
fn hoist(at: &FdRef, fd: OwnedFd, base: RawFd) -> Result<OwnedFd, FilesError> {
    if fd.as_raw_fd() >= base {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC takes an int.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, base) };
    if n < 0 {
        return Err(FilesError::Hoist {
            at: at.clone(),
            fd: fd.as_raw_fd(),
            base,
            source: last_err(),
        });
    }
    // SAFETY: fcntl just returned this fd, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

impl FileTable {
    /// Controller side: opens everything the images of `ckpt` reference.
    /// Errors name the pid, fd, path and kind.
    pub fn open(ckpt: &Checkpoint, opts: &FileOptions) -> Result<FileTable, FilesError> {
        Self::open_images(&ckpt.dir, &ckpt.inventory, &ckpt.processes, opts)
    }

    /// [`FileTable::open`] from an inventory and process images, whose
    /// file-data files are in `dir`.
    pub fn open_images(
        dir: &Path,
        inv: &Inventory,
        procs: &[ProcessImage],
        opts: &FileOptions,
    ) -> Result<FileTable, FilesError> {
        let plan = plan(inv, procs)?;
        let externals = plan.externals();
        for (key, at) in &externals {
            if !opts.inherit.iter().any(|(k, _)| k == key) {
                log::info!(
                    "fd {} of pid {}: {key} leads outside the tree; restored with that end closed \
                     (--inherit-fd FD:{key} or --shell-job connect it)",
                    at.fd,
                    at.pid
                );
            }
        }
        let externals: Vec<String> = externals.into_iter().map(|(k, _)| k).collect();
        let base = base_for(plan.max_fd);
        let count = plan.descs.len() as u64;
        ensure_nofile(plan.max_fd, count, base as u64 + 2 * count + SLACK)?;

        let mut op = Opener {
            dir,
            plan: &plan,
            opts,
            pipes: HashMap::new(),
            fifos: HashMap::new(),
            unlinked: Vec::new(),
            memfds: HashMap::new(),
            sockets: HashMap::new(),
        };
        // Pipes are reopened through their first fds: nothing is moved
        // (closed) before every description exists.
        let mut descs = Vec::with_capacity(plan.descs.len());
        for d in &plan.descs {
            descs.push(op.open_desc(d)?);
        }
        op.finish(&descs)?;
        let descs = descs
            .into_iter()
            .zip(&plan.descs)
            .map(|(fd, d)| hoist(&d.at, fd, base))
            .collect::<Result<Vec<_>, _>>()?;
        let mut memfds = HashMap::new();
        for (inode, fd) in std::mem::take(&mut op.memfds) {
            let at = FdRef {
                pid: 0,
                fd: -1,
                what: format!("memfd object of inode {inode}"),
            };
            memfds.insert(inode, hoist(&at, fd, base)?);
        }
        let installs = plan
            .installs
            .iter()
            .map(|(&pid, list)| {
                let l = list
                    .iter()
                    .map(|&(fd, i, cloexec)| (fd, descs[i].as_raw_fd(), cloexec))
                    .collect();
                (pid, l)
            })
            .collect();
        Ok(FileTable {
            base,
            descs,
            installs,
            memfds,
            externals,
        })
    }

    /// The lowest fd the table uses; every fd number listed in any image is
    /// below it.
    pub fn base(&self) -> RawFd {
        self.base
    }

    /// The external keys the images needed (and `inherit` gave), e.g. `pipe:[123]`.
    pub fn external_keys(&self) -> &[String] {
        &self.externals
    }

    /// The number of open file descriptions in the table.
    pub fn len(&self) -> usize {
        self.descs.len()
    }

    /// Whether the images hold no fd at all.
    pub fn is_empty(&self) -> bool {
        self.descs.is_empty()
    }

    /// The memfd object with this (dumped) inode, for `MAP_SHARED`
    /// mappings of a memfd, if the table holds one.
    pub fn memfd(&self, inode: u64) -> Option<RawFd> {
        self.memfds.get(&inode).map(AsRawFd::as_raw_fd)
    }

    /// In a restored task (a single-threaded fork of the controller): dups
    /// every fd of the dumped process `pid` to its number with its
    /// `FD_CLOEXEC` flag, then closes every fd below [`base`](Self::base)
    /// that the image does not list. fds `>= base()` stay open.
    ///
    /// Allocates nothing and takes no lock (errors included): it may run
    /// in the fork of a multi-threaded process too.
    pub fn install(&self, pid: i32) -> Result<(), FilesError> {
        let list = self
            .installs
            .get(&pid)
            .ok_or(FilesError::NoSuchProcess { pid })?;
        for &(fd, from, cloexec) in list {
            let flags = if cloexec { libc::O_CLOEXEC } else { 0 };
            // SAFETY: dup3 takes integers; `fd` is below base, `from` a table fd.
            if unsafe { libc::dup3(from, fd, flags) } < 0 {
                return Err(FilesError::Dup {
                    pid,
                    fd,
                    from,
                    source: last_err(),
                });
            }
        }
        let mut next = 0u32;
        let gaps = list
            .iter()
            .map(|&(fd, ..)| fd as u32)
            .chain([self.base as u32]);
        for fd in gaps {
            if fd > next {
                // SAFETY: close_range takes integers; it closes only fds of
                // this process below base that the image does not list.
                if unsafe { libc::close_range(next, fd - 1, 0) } < 0 {
                    return Err(FilesError::Close {
                        pid,
                        first: next,
                        last: fd - 1,
                        source: last_err(),
                    });
                }
            }
            next = next.max(fd + 1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::model::FdEntry;
    use crate::image::tests::TempDir;

    fn entry(fd: i32, flags: i32, kind: FdKind) -> FdEntry {
        FdEntry {
            fd,
            cloexec: false,
            flags: flags as u32,
            kind,
        }
    }

    fn proc(pid: i32, fds: Vec<FdEntry>) -> ProcessImage {
        ProcessImage {
            pid,
            fds,
            ..Default::default()
        }
    }

    fn pipe(inode: u64, write_end: bool, data: Blob) -> FdKind {
        FdKind::Pipe {
            inode,
            write_end,
            data,
        }
    }

    /// A file-data file for the blobs of a test's images.
    struct TestData {
        dir: TempDir,
        w: Option<crate::image::DataWriter>,
    }

    impl TestData {
        fn new(tag: &str) -> TestData {
            let dir = TempDir::new(tag);
            let w = Some(crate::image::DataWriter::new(dir.path(), 1));
            TestData { dir, w }
        }

        fn blob(&mut self, bytes: &[u8]) -> Blob {
            let w = self.w.as_mut().expect("not finished");
            crate::image::DataSink::store_stream(w, &mut &bytes[..]).unwrap()
        }

        /// Finish the file; the directory to restore from.
        fn dir(&mut self) -> &Path {
            if let Some(w) = self.w.take() {
                w.finish().unwrap();
            }
            self.dir.path()
        }
    }

    fn sock(inode: u64, peer_inode: u64, name: &[u8]) -> FdKind {
        FdKind::UnixSocket {
            inode,
            peer_inode,
            sock_type: libc::SOCK_STREAM,
            name: name.to_vec(),
            queued: vec![],
            shutdown: 0,
        }
    }

    #[test]
    fn shared_objects_are_one_description_and_own_fds_their_own() {
        let inv = Inventory {
            files: vec![FileObject {
                id: 1,
                flags: libc::O_RDWR as u32,
                kind: FdKind::DevNull,
            }],
            ..Default::default()
        };
        let procs = vec![
            proc(
                10,
                vec![
                    entry(0, 0, FdKind::Shared { file_id: 1 }),
                    entry(7, libc::O_WRONLY, FdKind::DevNull),
                ],
            ),
            proc(
                11,
                vec![
                    entry(5, 0, FdKind::Shared { file_id: 1 }),
                    entry(7, libc::O_WRONLY, FdKind::DevNull),
                    entry(2, 0, FdKind::Shared { file_id: 1 }),
                ],
            ),
        ];
        let p = plan(&inv, &procs).unwrap();
        assert_eq!(p.descs.len(), 3, "{:?}", p.descs);
        assert_eq!(p.installs[&10], vec![(0, 0, false), (7, 1, false)]);
        assert_eq!(
            p.installs[&11],
            vec![(2, 0, false), (5, 0, false), (7, 2, false)]
        );
        assert_eq!(p.max_fd, 7);
        assert_eq!(base_for(p.max_fd), 8);
        assert_eq!(base_for(-1), 3);
        assert_eq!(p.descs[0].at.what, "shared file 1: /dev/null, read-write");
    }

    #[test]
    fn pipes_with_one_end_in_the_tree_are_external() {
        let mut d = TestData::new("rf-external");
        let data = d.blob(b"data");
        let procs = vec![
            proc(
                10,
                vec![
                    entry(0, libc::O_RDONLY, pipe(100, false, Blob::default())),
                    entry(3, libc::O_WRONLY, pipe(200, true, Blob::default())),
                ],
            ),
            proc(
                11,
                vec![
                    entry(4, libc::O_RDONLY, pipe(200, false, data.clone())),
                    entry(1, libc::O_WRONLY, pipe(300, true, Blob::default())),
                ],
            ),
        ];
        let inv = Inventory::default();
        let p = plan(&inv, &procs).unwrap();
        assert_eq!(
            p.pipes[&200],
            PipeUse {
                read: true,
                write: true,
                data: Some(&data)
            }
        );
        let ext: Vec<(String, i32, i32)> = p
            .externals()
            .into_iter()
            .map(|(k, at)| (k, at.pid, at.fd))
            .collect();
        assert_eq!(
            ext,
            vec![("pipe:[100]".into(), 10, 0), ("pipe:[300]".into(), 11, 1)]
        );
        assert_eq!(
            external_keys(&inv, &procs).unwrap(),
            vec!["pipe:[100]", "pipe:[300]"]
        );
        // Without --inherit-fd they become pipes whose outside end is closed.
        let t = FileTable::open_images(d.dir(), &inv, &procs, &FileOptions::default()).unwrap();
        assert_eq!(t.external_keys(), &["pipe:[100]", "pipe:[300]"]);
    }

    #[test]
    fn sockets_must_be_unnamed_pairs_inside_the_tree() {
        let inv = Inventory::default();
        let ok = vec![
            proc(10, vec![entry(3, libc::O_RDWR, sock(1, 2, b""))]),
            proc(11, vec![entry(4, libc::O_RDWR, sock(2, 1, b""))]),
        ];
        let p = plan(&inv, &ok).unwrap();
        assert_eq!(p.sockets.len(), 2);

        let cases: Vec<(Vec<ProcessImage>, &str)> = vec![
            (
                vec![proc(10, vec![entry(3, libc::O_RDWR, sock(1, 9, b""))])],
                "its peer socket:[9] is outside the dumped tree",
            ),
            (
                vec![proc(10, vec![entry(3, libc::O_RDWR, sock(1, 0, b""))])],
                "not connected",
            ),
            (
                vec![
                    proc(10, vec![entry(3, libc::O_RDWR, sock(1, 2, b"\0abs"))]),
                    proc(11, vec![entry(4, libc::O_RDWR, sock(2, 1, b""))]),
                ],
                "bound to the name",
            ),
            (
                vec![
                    proc(10, vec![entry(3, libc::O_RDWR, sock(1, 2, b""))]),
                    proc(11, vec![entry(4, libc::O_RDWR, sock(2, 5, b""))]),
                ],
                "not connected back",
            ),
        ];
        for (procs, why) in cases {
            let err = plan(&inv, &procs).unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, FilesError::UnsupportedSocket { ref at, inode: 1, .. } if at.pid == 10 && at.fd == 3),
                "{err:?}"
            );
            assert!(msg.contains(why) && msg.contains("fd 3 of pid 10"), "{msg}");
        }
    }

    #[test]
    fn unknown_kinds_and_missing_objects_are_refused() {
        let inv = Inventory::default();
        let procs = vec![proc(10, vec![entry(4, 0, FdKind::Unknown)])];
        assert!(matches!(
            plan(&inv, &procs),
            Err(FilesError::Unknown { at }) if at.pid == 10 && at.fd == 4
        ));
        let procs = vec![proc(10, vec![entry(4, 0, FdKind::Shared { file_id: 3 })])];
        let err = plan(&inv, &procs).unwrap_err();
        assert!(
            matches!(err, FilesError::MissingObject { file_id: 3, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("fd 4 of pid 10"), "{err}");
    }

    #[test]
    fn socketpairs_both_ways_pipe_data_and_eventfd_installed() {
        let us = |inode, peer, t, queued: &[&[u8]], shutdown| FdKind::UnixSocket {
            inode,
            peer_inode: peer,
            sock_type: t,
            name: vec![],
            queued: queued.iter().map(|q| q.to_vec()).collect(),
            shutdown,
        };
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut d = TestData::new("rf-pairs");
        let big_blob = d.blob(&big);
        let (st, dg) = (libc::SOCK_STREAM, libc::SOCK_DGRAM);
        let procs = vec![
            proc(
                10,
                vec![
                    entry(3, libc::O_RDWR, us(1, 2, st, &[b"to-a"], 0)),
                    entry(5, libc::O_RDWR, us(3, 4, dg, &[b"one", b"second"], 1)),
                    entry(7, libc::O_RDONLY, pipe(9, false, big_blob)),
                    entry(
                        9,
                        libc::O_RDWR,
                        FdKind::EventFd {
                            count: 5,
                            efd_flags: libc::EFD_SEMAPHORE as u32,
                        },
                    ),
                ],
            ),
            proc(
                11,
                vec![
                    entry(
                        4,
                        libc::O_RDWR | libc::O_NONBLOCK,
                        us(2, 1, st, &[b"to-b"], 0),
                    ),
                    entry(6, libc::O_RDWR, us(4, 3, dg, &[], 2)),
                    entry(8, libc::O_WRONLY, pipe(9, true, Blob::default())),
                ],
            ),
        ];
        let table = FileTable::open_images(
            d.dir(),
            &Inventory::default(),
            &procs,
            &FileOptions::default(),
        )
        .unwrap();
        assert_eq!((table.base(), table.len()), (10, 7));
        let mut p = [0; 2];
        // SAFETY: room for two fds.
        assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: moves the write end above the table's base.
        let w = unsafe { libc::fcntl(p[1], libc::F_DUPFD_CLOEXEC, 200) };
        // SAFETY: fork; the child calls install (no allocation) and raw
        // syscalls on stack buffers, then _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let mut bad = 0u32;
            // SAFETY: raw syscalls on this child's fds and stack buffers.
            unsafe {
                let recv = |fd: i32, want: &[u8]| {
                    let mut buf = [0u8; 64];
                    let n = libc::recv(fd, buf.as_mut_ptr().cast(), 64, libc::MSG_DONTWAIT);
                    n == want.len() as isize && &buf[..want.len()] == want
                };
                if table.install(10).is_err() {
                    bad |= 1;
                }
                for (fd, want, bit) in [(3, &b"to-a"[..], 2), (5, b"one", 4), (5, b"second", 8)] {
                    if !recv(fd, want) {
                        bad |= bit;
                    }
                }
                let mut n: libc::c_int = 0;
                libc::ioctl(7, libc::FIONREAD, &mut n);
                if n != 200_000 {
                    bad |= 16;
                }
                let mut v = 0u64;
                if libc::read(9, (&mut v as *mut u64).cast(), 8) != 8 || v != 1 {
                    bad |= 32;
                }
                if table.install(11).is_err() {
                    bad |= 1;
                }
                if !recv(4, b"to-b") {
                    bad |= 128;
                }
                if libc::fcntl(4, libc::F_GETFL) & libc::O_NONBLOCK == 0 {
                    bad |= 256;
                }
                let x = b"x".as_ptr().cast();
                // Shut down for writing, as recorded.
                if libc::send(6, x, 1, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) != -1
                    || *libc::__errno_location() != libc::EPIPE
                {
                    bad |= 512;
                }
                if libc::fcntl(3, libc::F_GETFD) != -1 || libc::fcntl(8, libc::F_GETFD) != 0 {
                    bad |= 1024;
                }
                libc::write(w, (&bad as *const u32).cast(), 4);
                libc::_exit(0);
            }
        }
        let mut bad = u32::MAX;
        // SAFETY: reads 4 bytes into `bad`, closes our fds, reaps the child.
        unsafe {
            libc::close(p[1]);
            libc::close(w);
            assert_eq!(libc::read(p[0], (&mut bad as *mut u32).cast(), 4), 4);
            libc::close(p[0]);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        assert_eq!(bad, 0, "failed checks: {bad:#b}");
    }
}
