//! `/proc/PID/fd` and `/proc/PID/fdinfo`: the task's open files.
//!
//! Each fd is classified by its magic link's target and a `stat` through
//! it, and the state a restore needs is collected without changing the
//! task: positions come from fdinfo; the contents of unlinked files and
//! memfds are read with `pread` through a description of pdump's own (a
//! reopen of `/proc/PID/fd/N`: a copy made with `pidfd_getfd` would share
//! the task's file offset); the data buffered in a pipe is copied with
//! `tee(2)`, which leaves it in the pipe. Contents and pipe data are not
//! held in memory: they are streamed into a [`DataSink`] (the dump's
//! file-data file), which returns where they went ([`Blob`]); unix
//! sockets are described by sock_diag, and the data queued on them is
//! peeked without consuming it.
//!
//! fdinfo on Linux 6.18 looks like
//!
//! ```text
//! pos:    0
//! flags:  02004002          (octal O_* flags; O_CLOEXEC 02000000 = close-on-exec)
//! mnt_id: 17
//! ino:    1038
//! eventfd-count:                7     (hex)
//! eventfd-id: 1
//! eventfd-semaphore: 1
//! ```

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::{
    maps::strip_deleted,
    parse_err, proc_path, read_link, read_numeric_dir, read_text,
    unix::{socket_kind, SocketFd, UnixInfo},
    PidFd, ProcError, Result,
};
use crate::image::model::{Blob, FdEntry, FdKind};
use crate::image::DataSink;

/// The most bytes queued on a unix socket that pdump keeps in the model
/// (peeked data is held in memory): 256 MiB. More fails with
/// [`UnixError::QueueTooLarge`](super::unix::UnixError::QueueTooLarge).
/// File contents and pipe data have no such limit: they are streamed.
pub const MAX_SOCKET_QUEUE: u64 = 256 << 20;

/// What `/proc/PID/fdinfo/N` says.
#[derive(Debug, Default)]
struct FdInfo {
    pos: u64,
    flags: u32,
    /// `KEY: VALUE` lines other than the common ones, e.g. `eventfd-count`.
    extra: HashMap<String, String>,
}

fn fdinfo(pid: i32, fd: i32) -> Result<FdInfo> {
    let path = proc_path(pid, &format!("fdinfo/{fd}"));
    let text = read_text(pid, &path)?;
    let mut info = FdInfo::default();
    let (mut pos, mut flags) = (false, false);
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "pos" => {
                info.pos = value
                    .parse()
                    .map_err(|_| parse_err(pid, &path, "a position", line))?;
                pos = true;
            }
            "flags" => {
                info.flags = u32::from_str_radix(value, 8)
                    .map_err(|_| parse_err(pid, &path, "octal flags", line))?;
                flags = true;
            }
            _ => {
                info.extra.insert(key.to_owned(), value.to_owned());
            }
        }
    }
    for (seen, field) in [(pos, "pos"), (flags, "flags")] {
        if !seen {
            return Err(ProcError::MissingField { pid, path, field });
        }
    }
    Ok(info)
}

/// A pidfd of the task, opened the first time one is needed, and where
/// contents go.
struct Task<'d> {
    pid: i32,
    pidfd: Option<PidFd>,
    data: &'d mut dyn DataSink,
    /// Contents already stored, by (device, inode): a file open on several
    /// fds of the task is stored once.
    stored: HashMap<(u64, u64), Blob>,
}

impl Task<'_> {
    fn pidfd(&mut self) -> Result<&PidFd> {
        let pid = self.pid;
        let p = match self.pidfd.take() {
            Some(p) => p,
            None => PidFd::open(pid).map_err(|source| ProcError::PidfdOpen { pid, source })?,
        };
        Ok(self.pidfd.insert(p))
    }

    /// A copy of the task's `fd` (`pidfd_getfd`).
    fn get_fd(&mut self, fd: i32) -> Result<File> {
        let pid = self.pid;
        let dup = self
            .pidfd()?
            .get_fd(fd)
            .map_err(|source| ProcError::PidfdGetfd { pid, fd, source })?;
        Ok(File::from(dup))
    }
}

/// Lists the open fds of `pid`, sorted by number, with what a restore
/// needs of each (see [`FdKind`]). The contents of unlinked files and
/// memfds and the data buffered in pipes are stored in `data` (once per
/// inode), one bounded buffer at a time.
///
/// Data buffered in a pipe or FIFO is recorded once per pipe (per inode)
/// among this task's fds: on its read end if the task has one, else on the
/// first of its fds. Callers that dump several tasks sharing a pipe must
/// keep one copy.
///
/// Unix sockets become [`FdKind::UnixSocket`]: each is looked up in
/// sock_diag by inode ([`fds_with`] takes the sock_diag dump of a whole
/// tree instead), and the data queued on it is peeked through a
/// `pidfd_getfd` copy with `SO_PEEK_OFF`, which is set back afterwards.
/// Sockets that peeking would change or whose queue cannot be recorded are
/// refused: listening ones, fds in flight (`SCM_RIGHTS`), out-of-band data,
/// a pending error on a datagram socket with data queued.
///
/// Fails with [`ProcError::UnsupportedFd`] on the first fd of a kind pdump
/// cannot restore (other sockets, listening unix sockets, unix sockets with
/// fds in flight, epoll, signalfd, timerfd, inotify, ttys and other
/// devices, other anonymous inodes, ...), naming the fd and the kind.
pub fn fds(pid: i32, data: &mut dyn DataSink) -> Result<Vec<FdEntry>> {
    fds_with(pid, &HashMap::new(), data)
}

/// [`fds`], with what sock_diag says about unix sockets taken from `unix`
/// (from [`unix_sockets`](super::unix_sockets), called once per dump);
/// sockets missing there are looked up one by one, in their own network
/// namespace.
pub fn fds_with(
    pid: i32,
    unix: &HashMap<u64, UnixInfo>,
    data: &mut dyn DataSink,
) -> Result<Vec<FdEntry>> {
    let mut task = Task {
        pid,
        pidfd: None,
        data,
        stored: HashMap::new(),
    };
    let mut out = Vec::new();
    for fd in read_numeric_dir(pid, &proc_path(pid, "fd"))? {
        out.push(describe(&mut task, fd, unix)?);
    }

    // One copy of the buffered data per pipe, on its read end if present.
    let mut hosts: Vec<(u64, usize)> = Vec::new();
    for (i, e) in out.iter().enumerate() {
        let Some((inode, write_end)) = pipe_of(&e.kind) else {
            continue;
        };
        match hosts.iter_mut().find(|(ino, _)| *ino == inode) {
            Some(h) => {
                let host_is_write = pipe_of(&out[h.1].kind).is_some_and(|(_, w)| w);
                if host_is_write && !write_end {
                    h.1 = i;
                }
            }
            None => hosts.push((inode, i)),
        }
    }
    for (_, i) in hosts {
        let fd = out[i].fd;
        let write_end = pipe_of(&out[i].kind).is_some_and(|(_, w)| w);
        let blob = capture_pipe(&mut task, fd, write_end)?;
        match &mut out[i].kind {
            FdKind::Pipe { data, .. } | FdKind::Fifo { data, .. } => *data = blob,
            _ => {}
        }
    }
    Ok(out)
}

/// The data buffered in the pipe or FIFO behind fd `fd` of `pid`, copied
/// into `data` without consuming it. `write_end`: whether `fd` is a write
/// end (it is then read through a new read end opened via `/proc/PID/fd/N`).
pub fn pipe_data(pid: i32, fd: i32, write_end: bool, data: &mut dyn DataSink) -> Result<Blob> {
    capture_pipe(
        &mut Task {
            pid,
            pidfd: None,
            data,
            stored: HashMap::new(),
        },
        fd,
        write_end,
    )
}

fn pipe_of(kind: &FdKind) -> Option<(u64, bool)> {
    match kind {
        FdKind::Pipe {
            inode, write_end, ..
        }
        | FdKind::Fifo {
            inode, write_end, ..
        } => Some((*inode, *write_end)),
        _ => None,
    }
}

fn describe(task: &mut Task<'_>, fd: i32, unix: &HashMap<u64, UnixInfo>) -> Result<FdEntry> {
    let pid = task.pid;
    let link_path = proc_path(pid, &format!("fd/{fd}"));
    let link = read_link(pid, &link_path)?;
    let link = link.to_string_lossy().into_owned();
    let info = fdinfo(pid, fd)?;
    let accmode = info.flags & libc::O_ACCMODE as u32;
    let write_end = accmode == libc::O_WRONLY as u32;
    let unsupported = |kind: String| ProcError::UnsupportedFd { pid, fd, kind };
    let entry = |kind| FdEntry {
        fd,
        cloexec: info.flags & libc::O_CLOEXEC as u32 != 0,
        flags: info.flags,
        kind,
    };

    if let Some(inode) = link
        .strip_prefix("pipe:[")
        .and_then(|s| s.strip_suffix(']'))
    {
        let inode = inode
            .parse()
            .map_err(|_| parse_err(pid, &link_path, "pipe:[INODE]", &link))?;
        return Ok(entry(FdKind::Pipe {
            inode,
            write_end,
            data: Blob::default(),
        }));
    }
    if link == "anon_inode:[eventfd]" {
        let path = proc_path(pid, &format!("fdinfo/{fd}"));
        let count = info
            .extra
            .get("eventfd-count")
            .ok_or(ProcError::MissingField {
                pid,
                path: path.clone(),
                field: "eventfd-count",
            })?;
        let count = u64::from_str_radix(count, 16)
            .map_err(|_| parse_err(pid, &path, "a hex eventfd-count", count))?;
        // `eventfd-semaphore` exists since Linux 6.8; before, EFD_SEMAPHORE
        // cannot be seen from outside and is taken as clear.
        let sem = info
            .extra
            .get("eventfd-semaphore")
            .is_some_and(|v| v.trim() == "1");
        let efd_flags = (u32::from(sem) * libc::EFD_SEMAPHORE as u32)
            | (info.flags & (libc::O_NONBLOCK | libc::O_CLOEXEC) as u32);
        return Ok(entry(FdKind::EventFd { count, efd_flags }));
    }
    if let Some(inode) = link
        .strip_prefix("socket:[")
        .and_then(|s| s.strip_suffix(']'))
    {
        let inode = inode
            .parse()
            .map_err(|_| parse_err(pid, &link_path, "socket:[INODE]", &link))?;
        let dup = task.get_fd(fd)?;
        let sock = SocketFd {
            pid,
            fd,
            inode,
            link: &link,
            sock: dup.as_fd(),
            scm_fds: info.extra.get("scm_fds").and_then(|v| v.parse().ok()),
        };
        return socket_kind(&sock, unix).map(entry);
    }
    if !link.starts_with('/') {
        // anon_inode:[eventpoll], anon_inode:inotify,
        // anon_inode:[pidfd], net:[N] (namespace fds), ...
        return Err(unsupported(link));
    }

    let meta = std::fs::metadata(&link_path).map_err(|source| ProcError::FdStat {
        pid,
        fd,
        path: link_path.clone(),
        source,
    })?;
    let ft = meta.file_type();
    if ft.is_char_device() || ft.is_block_device() {
        let (maj, min) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
        return match (ft.is_char_device(), maj, min) {
            (true, 1, 3) => Ok(entry(FdKind::DevNull)),
            (true, 1, 5) => Ok(entry(FdKind::DevZero)),
            (true, ..) => Err(unsupported(format!("char device {maj}:{min} {link}"))),
            _ => Err(unsupported(format!("block device {maj}:{min} {link}"))),
        };
    }
    if ft.is_dir() {
        return Ok(entry(FdKind::Directory {
            path: link,
            pos: info.pos,
        }));
    }
    if ft.is_fifo() {
        return Ok(entry(FdKind::Fifo {
            path: link,
            inode: meta.ino(),
            write_end,
            data: Blob::default(),
        }));
    }
    if !ft.is_file() {
        let what = if ft.is_socket() {
            "socket"
        } else {
            "special file"
        };
        return Err(unsupported(format!("{what} {link}")));
    }

    if meta.nlink() == 0 {
        if let Some(name) = link.strip_prefix("/memfd:") {
            let name = strip_deleted(name).0.to_owned();
            return memfd(task, fd, &link, &meta, name, info.pos).map(entry);
        }
    }
    let (name, suffix) = strip_deleted(&link);
    // " (deleted)" may also be part of a real name: then the full link
    // target exists and is this very file.
    let really_named = suffix
        && std::fs::metadata(&link).is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino());
    let unlinked = meta.nlink() == 0 || (suffix && !really_named);
    let path = if unlinked { name } else { link.as_str() }.to_owned();
    let unlinked_contents = if unlinked {
        Some(store_contents(task, fd, &link, &meta)?)
    } else {
        None
    };
    Ok(entry(FdKind::Regular {
        path,
        pos: info.pos,
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        unlinked_contents,
    }))
}

fn memfd(
    task: &mut Task<'_>,
    fd: i32,
    link: &str,
    meta: &std::fs::Metadata,
    name: String,
    pos: u64,
) -> Result<FdKind> {
    let pid = task.pid;
    // A description of our own (also for a write-only fd of the task).
    let own = open_magic(pid, fd, &proc_path(pid, &format!("fd/{fd}")))?;
    // SAFETY: F_GET_SEALS takes no argument and only reads the file's seals.
    let seals = unsafe { libc::fcntl(own.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(ProcError::GetSeals {
            pid,
            fd,
            source: io::Error::last_os_error(),
        });
    }
    let contents = store_contents(task, fd, link, meta)?;
    Ok(FdKind::Memfd {
        name,
        inode: meta.ino(),
        pos,
        contents,
        seals: seals as u32,
    })
}

/// Stores the contents of the file behind fd `fd` (once per inode) through
/// a new read-only description, so neither reading nor looking for holes
/// moves the task's offset.
fn store_contents(
    task: &mut Task<'_>,
    fd: i32,
    link: &str,
    meta: &std::fs::Metadata,
) -> Result<Blob> {
    let pid = task.pid;
    if let Some(b) = task.stored.get(&(meta.dev(), meta.ino())) {
        return Ok(b.clone());
    }
    let f = open_magic(pid, fd, &proc_path(pid, &format!("fd/{fd}")))?;
    let blob = task
        .data
        .store_file(&f)
        .map_err(|source| ProcError::FdContents {
            pid,
            fd,
            path: link.to_owned(),
            source,
        })?;
    task.stored.insert((meta.dev(), meta.ino()), blob.clone());
    Ok(blob)
}

/// Opens the file behind `/proc/PID/fd/N` anew, read-only: a new open file
/// description, so reading it moves no offset of the task's.
fn open_magic(pid: i32, fd: i32, link_path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(link_path)
        .map_err(|source| ProcError::FdOpen {
            pid,
            fd,
            path: link_path.to_owned(),
            source,
        })
}

fn capture_pipe(task: &mut Task<'_>, fd: i32, write_end: bool) -> Result<Blob> {
    let pid = task.pid;
    let src = if write_end {
        // Opening a pipe's magic link for reading gives a new read end of
        // the same pipe (a FIFO's link opens the FIFO).
        open_magic(pid, fd, &proc_path(pid, &format!("fd/{fd}")))?
    } else {
        task.get_fd(fd)?
    };
    let err = |source| ProcError::PipeData { pid, fd, source };
    match tee_copy(src.as_raw_fd()).map_err(err)? {
        Some(copy) => task.data.store_stream(&mut File::from(copy)).map_err(err),
        None => Ok(Blob::default()),
    }
}

/// Copies everything buffered in the pipe read end `src` with `tee(2)`
/// into a new pipe; its read end (the write end closed), or `None` if
/// nothing is buffered.
fn tee_copy(src: i32) -> io::Result<Option<OwnedFd>> {
    let mut avail: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer, which is valid.
    if unsafe { libc::ioctl(src, libc::FIONREAD, &mut avail as *mut libc::c_int) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let avail = usize::try_from(avail).unwrap_or(0);
    if avail == 0 {
        return Ok(None);
    }
    // SAFETY: F_GETPIPE_SZ takes no argument.
    let cap = unsafe { libc::fcntl(src, libc::F_GETPIPE_SZ) };
    if cap < 0 {
        return Err(io::Error::last_os_error());
    }

    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these two new fds, owned by nobody else.
    let (ours_r, ours_w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // Our pipe needs as many slots as the task's: tee copies buffer by buffer.
    // SAFETY: F_GETPIPE_SZ takes no argument.
    let our_cap = unsafe { libc::fcntl(ours_w.as_raw_fd(), libc::F_GETPIPE_SZ) };
    // SAFETY: F_SETPIPE_SZ takes an int size.
    if our_cap < cap && unsafe { libc::fcntl(ours_w.as_raw_fd(), libc::F_SETPIPE_SZ, cap) } < 0 {
        return Err(io::Error::last_os_error());
    }

    // SAFETY: both fds are open pipe ends; tee copies buffer references
    // between them and consumes nothing from `src`.
    let n = unsafe { libc::tee(src, ours_w.as_raw_fd(), avail, libc::SPLICE_F_NONBLOCK) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    if n != avail {
        return Err(io::Error::other(format!(
            "tee copied {n} of the {avail} buffered bytes"
        )));
    }
    drop(ours_w);
    Ok(Some(ours_r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::data::MemSink;
    use crate::procfs::testutil::Forked;
    use std::ffi::CString;
    use std::path::PathBuf;

    /// A scratch directory removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("pdump-fds-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Scratch(p)
        }
        fn c(&self, name: &str) -> CString {
            CString::new(self.0.join(name).to_str().unwrap()).unwrap()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// In a forked child: leaves only 0, 1, 2 open, as /dev/null.
    fn child_reset_fds() {
        // SAFETY: raw syscalls on fds of this (child) process only.
        unsafe {
            libc::close_range(3, u32::MAX, 0);
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
            libc::close(null);
        }
    }

    /// In a forked child: moves `fd` to `to` (without O_CLOEXEC).
    fn child_move(fd: i32, to: i32) {
        // SAFETY: raw syscalls on fds of this (child) process only.
        unsafe {
            libc::dup2(fd, to);
            libc::close(fd);
        }
    }

    #[test]
    fn every_supported_kind() {
        let dir = Scratch::new("kinds");
        std::fs::write(dir.0.join("off.bin"), [7u8; 200]).unwrap();
        let off = dir.c("off.bin");
        let gone = dir.c("gone.bin");
        let fifo = dir.c("fifo");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);

        let child = Forked::spawn(|ready| {
            child_reset_fds();
            // SAFETY: raw syscalls with valid pointers into this child's
            // stack and the CStrings made before fork.
            unsafe {
                let mut p = [0; 2];
                libc::pipe2(p.as_mut_ptr(), 0);
                libc::write(p[1], b"hello".as_ptr().cast(), 5);
                child_move(p[0], 10);
                child_move(p[1], 11);

                let f = libc::open(gone.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o640);
                libc::write(f, b"gone but kept".as_ptr().cast(), 13);
                libc::unlink(gone.as_ptr());
                child_move(f, 12);

                let m = libc::memfd_create(c"pdtest".as_ptr(), libc::MFD_ALLOW_SEALING);
                libc::write(m, b"memfd data".as_ptr().cast(), 10);
                libc::fcntl(m, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK);
                child_move(m, 13);
                // A second description of the same memfd, write-only.
                child_move(libc::open(c"/proc/self/fd/13".as_ptr(), libc::O_WRONLY), 21);

                let e = libc::eventfd(7, libc::EFD_SEMAPHORE | libc::EFD_NONBLOCK);
                child_move(e, 14);

                child_move(libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY), 15);
                child_move(libc::open(c"/dev/zero".as_ptr(), libc::O_RDONLY), 16);

                let d = libc::open(c"/".as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY);
                libc::dup3(d, 17, libc::O_CLOEXEC);
                libc::close(d);

                let o = libc::open(off.as_ptr(), libc::O_RDONLY);
                libc::lseek(o, 123, libc::SEEK_SET);
                child_move(o, 18);

                let q = libc::open(fifo.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK);
                libc::write(q, b"abc".as_ptr().cast(), 3);
                child_move(q, 19);

                let mut w = [0; 2];
                libc::pipe2(w.as_mut_ptr(), 0);
                libc::write(w[1], b"xyz".as_ptr().cast(), 3);
                libc::close(w[0]);
                child_move(w[1], 20);
            }
            Forked::block_signal(libc::SIGUSR1);
            ready();
            Forked::wait_signal(libc::SIGUSR1);
            // Everything must be as it was before the dump.
            let mut bad = 0;
            let mut buf = [0u8; 16];
            // SAFETY: reads into a stack buffer, lseeks on our fds.
            unsafe {
                if libc::read(10, buf.as_mut_ptr().cast(), 16) != 5 || &buf[..5] != b"hello" {
                    bad |= 1;
                }
                if libc::lseek(18, 0, libc::SEEK_CUR) != 123 {
                    bad |= 2;
                }
                if libc::read(19, buf.as_mut_ptr().cast(), 16) != 3 || &buf[..3] != b"abc" {
                    bad |= 4;
                }
                if libc::lseek(13, 0, libc::SEEK_CUR) != 10 {
                    bad |= 8;
                }
                if libc::lseek(12, 0, libc::SEEK_CUR) != 13 {
                    bad |= 16;
                }
            }
            bad
        });

        let mut sink = MemSink::default();
        let fds = fds(child.pid, &mut sink).unwrap();
        let nums: Vec<i32> = fds.iter().map(|e| e.fd).collect();
        assert_eq!(
            nums,
            vec![0, 1, 2, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
        );
        let by = |fd: i32| fds.iter().find(|e| e.fd == fd).unwrap();
        for fd in 0..3 {
            assert_eq!(by(fd).kind, FdKind::DevNull);
        }

        let (r, w) = (by(10), by(11));
        let FdKind::Pipe {
            inode,
            write_end: false,
            data,
        } = &r.kind
        else {
            panic!("fd 10: {r:?}")
        };
        assert_eq!(sink.bytes(data), b"hello");
        assert_eq!(
            w.kind,
            FdKind::Pipe {
                inode: *inode,
                write_end: true,
                data: Blob::default()
            }
        );

        match &by(12).kind {
            FdKind::Regular {
                path,
                pos,
                size,
                mode,
                unlinked_contents,
            } => {
                assert_eq!(path, dir.0.join("gone.bin").to_str().unwrap());
                assert_eq!((*pos, *size, *mode), (13, 13, 0o640));
                assert_eq!(
                    sink.bytes(unlinked_contents.as_ref().unwrap()),
                    b"gone but kept"
                );
            }
            k => panic!("fd 12: {k:?}"),
        }
        match &by(13).kind {
            FdKind::Memfd {
                name,
                pos,
                contents,
                seals,
                ..
            } => {
                assert_eq!(name, "pdtest");
                assert_eq!(*pos, 10);
                assert_eq!(sink.bytes(contents), b"memfd data");
                assert_eq!(*seals, libc::F_SEAL_SHRINK as u32);
                // The other description of the same memfd: stored once.
                match &by(21).kind {
                    FdKind::Memfd { contents: c2, .. } => assert_eq!(c2, contents),
                    k => panic!("fd 21: {k:?}"),
                }
            }
            k => panic!("fd 13: {k:?}"),
        }
        assert_eq!(
            by(14).kind,
            FdKind::EventFd {
                count: 7,
                efd_flags: (libc::EFD_SEMAPHORE | libc::EFD_NONBLOCK) as u32
            }
        );
        assert_eq!(by(15).kind, FdKind::DevNull);
        assert_eq!(by(15).flags & libc::O_ACCMODE as u32, libc::O_WRONLY as u32);
        assert_eq!(by(16).kind, FdKind::DevZero);
        assert_eq!(
            by(17).kind,
            FdKind::Directory {
                path: "/".into(),
                pos: 0
            }
        );
        assert!(by(17).cloexec);
        assert!(!by(16).cloexec);
        match &by(18).kind {
            FdKind::Regular {
                path,
                pos,
                size,
                unlinked_contents,
                ..
            } => {
                assert_eq!(path, dir.0.join("off.bin").to_str().unwrap());
                assert_eq!((*pos, *size), (123, 200));
                assert!(unlinked_contents.is_none());
            }
            k => panic!("fd 18: {k:?}"),
        }
        match &by(19).kind {
            FdKind::Fifo {
                path,
                write_end,
                data,
                ..
            } => {
                assert_eq!(path, dir.0.join("fifo").to_str().unwrap());
                assert!(!write_end);
                assert_eq!(sink.bytes(data), b"abc");
            }
            k => panic!("fd 19: {k:?}"),
        }
        match &by(20).kind {
            FdKind::Pipe {
                write_end, data, ..
            } => {
                assert!(write_end);
                assert_eq!(sink.bytes(data), b"xyz");
            }
            k => panic!("fd 20: {k:?}"),
        }
        // Pipe data once per pipe, each memfd and unlinked file once.
        assert_eq!(sink.stored.len(), 5);
        let b = pipe_data(child.pid, 10, false, &mut sink).unwrap();
        assert_eq!(sink.bytes(&b), b"hello");

        child.kill(libc::SIGUSR1);
        assert_eq!(child.wait(), 0, "the child's fds changed while being read");
    }

    #[test]
    fn unsupported_kinds_name_the_fd() {
        type Setup = fn() -> i32;
        let cases: [(Setup, &str); 4] = [
            (
                // SAFETY: socket takes integers.
                || unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM, 0) },
                "inet6 socket socket:[",
            ),
            (
                // SAFETY: epoll_create1 has no pointer arguments.
                || unsafe { libc::epoll_create1(0) },
                "anon_inode:[eventpoll]",
            ),
            (
                // SAFETY: a valid NUL-terminated path.
                || unsafe { libc::open(c"/dev/urandom".as_ptr(), libc::O_RDONLY) },
                "char device 1:9 /dev/urandom",
            ),
            (
                || {
                    // SAFETY: a zeroed sigset is a valid empty set.
                    let set: libc::sigset_t = unsafe { std::mem::zeroed() };
                    // SAFETY: `set` is valid for the call.
                    unsafe { libc::signalfd(-1, &set, 0) }
                },
                "anon_inode:[signalfd]",
            ),
        ];
        for (setup, kind) in cases {
            let child = Forked::spawn(|ready| {
                child_reset_fds();
                child_move(setup(), 30);
                ready();
                Forked::park()
            });
            let err = fds(child.pid, &mut MemSink::default()).unwrap_err();
            let msg = err.to_string();
            match &err {
                ProcError::UnsupportedFd { pid, fd, kind: k } => {
                    assert_eq!((*pid, *fd), (child.pid, 30));
                    assert!(k.starts_with(kind), "{k:?} vs {kind:?}");
                }
                e => panic!("{e:?}"),
            }
            assert!(msg.contains("fd 30"), "{msg}");
            assert!(msg.contains(kind), "{msg}");
        }
    }

    #[test]
    fn large_sparse_unlinked_file_is_streamed_sparse() {
        let dir = Scratch::new("large");
        let big = dir.c("big");
        let size: u64 = 1 << 30;
        let child = Forked::spawn(|ready| {
            child_reset_fds();
            // SAFETY: a valid path made before fork; writes from a static buffer.
            unsafe {
                let f = libc::open(big.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o600);
                libc::ftruncate(f, size as libc::off_t);
                libc::pwrite(f, b"middle".as_ptr().cast(), 6, (size / 2) as libc::off_t);
                libc::unlink(big.as_ptr());
                libc::lseek(f, 77, libc::SEEK_SET);
                child_move(f, 5);
            }
            Forked::block_signal(libc::SIGUSR1);
            ready();
            Forked::wait_signal(libc::SIGUSR1);
            // SAFETY: lseek on our own fd.
            i32::from(unsafe { libc::lseek(5, 0, libc::SEEK_CUR) } != 77)
        });
        let out = Scratch::new("large-out");
        let mut w = crate::image::DataWriter::new(&out.0, child.pid);
        let fds = fds(child.pid, &mut w).unwrap();
        w.finish().unwrap();
        let e = fds.iter().find(|e| e.fd == 5).unwrap();
        let FdKind::Regular {
            unlinked_contents: Some(b),
            ..
        } = &e.kind
        else {
            panic!("{e:?}")
        };
        assert_eq!((b.offset, b.len), (0, size));
        let mut want = crate::image::data::crc_append_zeros(0, size / 2);
        want = crc32c::crc32c_append(want, b"middle");
        want = crate::image::data::crc_append_zeros(want, size / 2 - 6);
        assert_eq!(b.crc32c, want);
        let r = crate::image::DataReader::open(&out.0, &b.file).unwrap();
        r.verify(b).unwrap();
        // Sparse in the image too.
        let meta = std::fs::metadata(r.path()).unwrap();
        assert!(meta.blocks() * 512 < 8 << 20, "{meta:?}");
        child.kill(libc::SIGUSR1);
        assert_eq!(child.wait(), 0, "the task's offset moved");
    }
}
