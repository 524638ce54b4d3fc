//! Open files shared by several fds of a dumped tree.
//!
//! Two fds share an open file description (one `struct file`: one offset,
//! one set of status flags) after `dup`, after `fork`, or after passing an
//! fd over a unix socket. A restore must recreate one description and give
//! it to every holder, so [`share_files`] turns each such group into one
//! [`FileObject`] referenced by [`FdKind::Shared`].
//!
//! Candidates are fds of the same kind and identity (path, inode) and the
//! same status flags; `kcmp(KCMP_FILE)` decides. `kcmp` also orders the
//! kernel's file pointers (obfuscated, but a total order), so each class of
//! candidates is sorted with it and split into runs of equal files:
//! `O(n log n)` calls per class, not one per pair.
//!
//! Every task must stay frozen (and its fds unchanged) between
//! [`procfs::fds`](crate::procfs::fds) and this call.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::io;

use crate::image::model::{Blob, FdKind, FileObject, ProcessImage};

/// `KCMP_FILE`.
const KCMP_FILE: libc::c_int = 0;

/// A failure to find the shared open files of a dump.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// `kcmp(pid1, pid2, KCMP_FILE, fd1, fd2)` failed (a task exited or
    /// closed the fd since it was listed: it was not frozen).
    #[error("kcmp(KCMP_FILE) of fd {fd1} of pid {pid1} and fd {fd2} of pid {pid2}")]
    Kcmp {
        /// The first task.
        pid1: i32,
        /// Its fd.
        fd1: i32,
        /// The second task.
        pid2: i32,
        /// Its fd.
        fd2: i32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An fd already refers to a shared file object: the images were
    /// already processed.
    #[error("fd {fd} of pid {pid} already refers to shared file {file_id}")]
    AlreadyShared {
        /// The task.
        pid: i32,
        /// The fd.
        fd: i32,
        /// The id it refers to.
        file_id: u64,
    },
}

/// Position of an fd: (index in `procs`, index in its `fds`).
type At = (usize, usize);

/// Finds the fds of `procs` (all frozen) that refer to the same open file
/// description, and moves each group of two or more into one
/// [`FileObject`]: the members' kinds become [`FdKind::Shared`] with the
/// object's id (1, 2, ... in order of each group's first fd, by process
/// then fd order); the object's flags are the description's (`O_CLOEXEC`,
/// a per-fd flag, removed).
///
/// Before that, the data buffered in a pipe or FIFO, which
/// [`procfs::fds`](crate::procfs::fds) records in every process holding an
/// end, is kept once per pipe: on the first fd (process, then fd order)
/// holding a read end, else on the first fd holding it at all; the copies
/// elsewhere are emptied. Unix socket queues need nothing: each end's queue
/// is its own.
pub fn share_files(procs: &mut [ProcessImage]) -> Result<Vec<FileObject>, ShareError> {
    for p in procs.iter() {
        for e in &p.fds {
            if let FdKind::Shared { file_id } = e.kind {
                return Err(ShareError::AlreadyShared {
                    pid: p.pid,
                    fd: e.fd,
                    file_id,
                });
            }
        }
    }
    keep_pipe_data_once(procs);
    let groups = shared_groups(procs)?;

    let mut files = Vec::with_capacity(groups.len());
    for (i, members) in groups.into_iter().enumerate() {
        let id = i as u64 + 1;
        let (p0, f0) = members[0];
        let flags = procs[p0].fds[f0].flags & !(libc::O_CLOEXEC as u32);
        let mut kind =
            std::mem::replace(&mut procs[p0].fds[f0].kind, FdKind::Shared { file_id: id });
        for &(p, f) in &members[1..] {
            let other =
                std::mem::replace(&mut procs[p].fds[f].kind, FdKind::Shared { file_id: id });
            // The members are one description, hence one pipe end; the
            // buffered data, if kept on this pipe end, stays with it.
            if let (
                FdKind::Pipe { data, .. } | FdKind::Fifo { data, .. },
                FdKind::Pipe { data: d, .. } | FdKind::Fifo { data: d, .. },
            ) = (&mut kind, other)
            {
                if data.is_empty() {
                    *data = d;
                }
            }
        }
        files.push(FileObject { id, flags, kind });
    }
    Ok(files)
}

/// What a candidate for sharing is: fds with different identities cannot
/// be one open file description.
#[derive(Debug, PartialEq, Eq, Hash)]
enum Identity<'a> {
    Regular(&'a str),
    Directory(&'a str),
    DevNull,
    DevZero,
    Pipe(u64),
    Fifo(&'a str, u64),
    EventFd,
    Memfd(u64),
    UnixSocket(u64),
}

fn identity(kind: &FdKind) -> Option<Identity<'_>> {
    Some(match kind {
        FdKind::Regular { path, .. } => Identity::Regular(path),
        FdKind::Directory { path, .. } => Identity::Directory(path),
        FdKind::DevNull => Identity::DevNull,
        FdKind::DevZero => Identity::DevZero,
        FdKind::Pipe { inode, .. } => Identity::Pipe(*inode),
        FdKind::Fifo { path, inode, .. } => Identity::Fifo(path, *inode),
        FdKind::EventFd { .. } => Identity::EventFd,
        FdKind::Memfd { inode, .. } => Identity::Memfd(*inode),
        FdKind::UnixSocket { inode, .. } => Identity::UnixSocket(*inode),
        FdKind::Unknown | FdKind::Shared { .. } => return None,
    })
}

/// The groups of two or more fds sharing a description, each sorted by
/// position, ordered by their first member.
fn shared_groups(procs: &[ProcessImage]) -> Result<Vec<Vec<At>>, ShareError> {
    let mut classes: HashMap<(Identity<'_>, u32), Vec<At>> = HashMap::new();
    for (pi, p) in procs.iter().enumerate() {
        for (fi, e) in p.fds.iter().enumerate() {
            if let Some(id) = identity(&e.kind) {
                let flags = e.flags & !(libc::O_CLOEXEC as u32);
                classes.entry((id, flags)).or_default().push((pi, fi));
            }
        }
    }
    let same = |a: At, b: At| {
        let (pa, pb) = (&procs[a.0], &procs[b.0]);
        kcmp_file(pa.pid, pa.fds[a.1].fd, pb.pid, pb.fds[b.1].fd)
    };

    let mut groups = Vec::new();
    for (_, mut members) in classes {
        if members.len() < 2 {
            continue;
        }
        merge_sort_by(&mut members, same)?;
        let mut run = vec![members[0]];
        for w in members.windows(2) {
            if same(w[0], w[1])? == Ordering::Equal {
                run.push(w[1]);
            } else {
                groups.push(std::mem::replace(&mut run, vec![w[1]]));
            }
        }
        groups.push(run);
    }
    groups.retain(|g| g.len() >= 2);
    for g in &mut groups {
        g.sort_unstable();
    }
    groups.sort_unstable_by_key(|g| g[0]);
    Ok(groups)
}

/// `kcmp(pid1, pid2, KCMP_FILE, fd1, fd2)` as an ordering of the two
/// `struct file`s (equal: the same open file description).
fn kcmp_file(pid1: i32, fd1: i32, pid2: i32, fd2: i32) -> Result<Ordering, ShareError> {
    let err = |source| ShareError::Kcmp {
        pid1,
        fd1,
        pid2,
        fd2,
        source,
    };
    // SAFETY: kcmp takes five integers and only compares kernel objects.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid1, pid2, KCMP_FILE, fd1, fd2) };
    match r {
        0 => Ok(Ordering::Equal),
        1 => Ok(Ordering::Less),
        2 => Ok(Ordering::Greater),
        -1 => Err(err(io::Error::last_os_error())),
        r => Err(err(io::Error::other(format!("kcmp answered {r}")))),
    }
}

/// A stable merge sort whose comparison may fail (the first failure is
/// returned; the order of `v` is then unspecified).
fn merge_sort_by<T: Copy, E>(
    v: &mut [T],
    mut cmp: impl FnMut(T, T) -> Result<Ordering, E>,
) -> Result<(), E> {
    let mut buf = v.to_vec();
    let mut width = 1;
    while width < v.len() {
        let mut start = 0;
        while start < v.len() {
            let mid = (start + width).min(v.len());
            let end = (start + 2 * width).min(v.len());
            let (mut i, mut j, mut k) = (start, mid, start);
            while i < mid && j < end {
                if cmp(v[j], v[i])? == Ordering::Less {
                    buf[k] = v[j];
                    j += 1;
                } else {
                    buf[k] = v[i];
                    i += 1;
                }
                k += 1;
            }
            buf[k..k + (mid - i)].copy_from_slice(&v[i..mid]);
            k += mid - i;
            buf[k..k + (end - j)].copy_from_slice(&v[j..end]);
            start = end;
        }
        v.copy_from_slice(&buf);
        width *= 2;
    }
    Ok(())
}

/// Keeps the data buffered in each pipe or FIFO on one fd of the dump.
fn keep_pipe_data_once(procs: &mut [ProcessImage]) {
    #[derive(PartialEq, Eq, Hash)]
    enum PipeKey {
        Pipe(u64),
        Fifo(String, u64),
    }
    struct Host {
        at: At,
        read_end: bool,
        data: Blob,
    }
    let mut hosts: Vec<Host> = Vec::new();
    let mut index: HashMap<PipeKey, usize> = HashMap::new();
    for (pi, p) in procs.iter_mut().enumerate() {
        for (fi, e) in p.fds.iter_mut().enumerate() {
            let (key, write_end, data) = match &mut e.kind {
                FdKind::Pipe {
                    inode,
                    write_end,
                    data,
                } => (PipeKey::Pipe(*inode), *write_end, data),
                FdKind::Fifo {
                    path,
                    inode,
                    write_end,
                    data,
                } => (PipeKey::Fifo(path.clone(), *inode), *write_end, data),
                _ => continue,
            };
            let data = std::mem::take(data);
            let h = *index.entry(key).or_insert_with(|| {
                hosts.push(Host {
                    at: (pi, fi),
                    read_end: !write_end,
                    data: Blob::default(),
                });
                hosts.len() - 1
            });
            let host = &mut hosts[h];
            if !host.read_end && !write_end {
                host.at = (pi, fi);
                host.read_end = true;
            }
            if host.data.is_empty() {
                host.data = data;
            }
        }
    }
    for h in hosts {
        if let FdKind::Pipe { data, .. } | FdKind::Fifo { data, .. } =
            &mut procs[h.at.0].fds[h.at.1].kind
        {
            *data = h.data;
        }
    }
}

#[cfg(test)]
pub(crate) mod family {
    //! Test helper: a forked process holding state for a dump, optionally
    //! with a forked child of its own; synchronized with pipes.

    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// Which part of the test body runs.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Step {
        /// In the parent, before the child is forked (inherited state).
        Shared,
        /// In the parent, after the fork.
        Parent,
        /// In the child.
        Child,
        /// In the parent, after the dump: returns 0 if all is as before.
        CheckParent,
        /// In the child, after the dump: returns 0 if all is as before.
        CheckChild,
    }

    /// The parent's and child's end of the report pipe and of the go pipe.
    const REPORT_FD: i32 = 200;
    const GO_FD: i32 = 201;

    /// The forked parent (and child); killed and reaped on drop.
    pub(crate) struct Family {
        /// The forked process.
        pub parent: i32,
        /// Its forked child (0 if none).
        pub child: i32,
        report: OwnedFd,
        go: OwnedFd,
        reaped: bool,
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut p = [0; 2];
        // SAFETY: `p` has room for two fds.
        assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: pipe2 just returned these fds, owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
    }

    /// In a forked process: one 8-byte message (atomic in a pipe).
    fn send(tag: u8, value: i32) {
        let mut m = [0u8; 8];
        m[0] = tag;
        m[4..].copy_from_slice(&value.to_ne_bytes());
        // SAFETY: writes a stack buffer to our report pipe.
        unsafe { libc::write(REPORT_FD, m.as_ptr().cast(), 8) };
    }

    /// In a forked process: waits for one byte on the go pipe.
    fn wait_go() {
        let mut b = 0u8;
        loop {
            // SAFETY: reads one byte into a stack variable.
            let n = unsafe { libc::read(GO_FD, (&mut b as *mut u8).cast(), 1) };
            if n == 1 {
                return;
            }
            if n == 0 {
                // SAFETY: _exit never returns; the test is gone.
                unsafe { libc::_exit(99) };
            }
        }
    }

    impl Family {
        /// Forks the parent, which runs `body(Shared)`, forks the child if
        /// `with_child`, then runs `body(Parent)` while the child runs
        /// `body(Child)`; returns when both are ready. Their fds 0-2 are
        /// /dev/null, 200 and 201 the sync pipes, nothing else is open.
        ///
        /// `body` runs in forked processes of a multithreaded one: raw
        /// syscalls only, no allocation, no locks, no panics.
        pub(crate) fn spawn(with_child: bool, body: impl Fn(Step) -> i32) -> Family {
            let (report_r, report_w) = pipe();
            let (go_r, go_w) = pipe();
            let (rw, gr) = (report_w.as_raw_fd(), go_r.as_raw_fd());
            // SAFETY: fork; the child makes only raw syscalls (and `body`,
            // which must too) and ends with _exit.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork failed");
            if pid == 0 {
                // SAFETY: raw syscalls on this new process's own fds.
                unsafe {
                    let r = libc::fcntl(rw, libc::F_DUPFD, 300);
                    let g = libc::fcntl(gr, libc::F_DUPFD, 300);
                    libc::dup2(r, REPORT_FD);
                    libc::dup2(g, GO_FD);
                    libc::close_range(3, REPORT_FD as u32 - 1, 0);
                    libc::close_range(GO_FD as u32 + 1, u32::MAX, 0);
                    let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                    for fd in 0..3 {
                        libc::dup2(null, fd);
                    }
                    libc::close(null);
                }
                body(Step::Shared);
                let child = if with_child {
                    // SAFETY: as above.
                    unsafe { libc::fork() }
                } else {
                    0
                };
                if with_child && child == 0 {
                    body(Step::Child);
                    send(b'c', 0);
                    wait_go();
                    send(b'C', body(Step::CheckChild));
                    // SAFETY: ends the child.
                    unsafe { libc::_exit(0) };
                }
                send(b'k', child);
                body(Step::Parent);
                send(b'p', 0);
                wait_go();
                send(b'P', body(Step::CheckParent));
                if child > 0 {
                    let mut st = 0;
                    // SAFETY: reaps our child; `st` is a valid out pointer.
                    unsafe { libc::waitpid(child, &mut st, 0) };
                }
                // SAFETY: ends the parent.
                unsafe { libc::_exit(0) };
            }
            drop((report_w, go_r));
            let mut fam = Family {
                parent: pid,
                child: 0,
                report: report_r,
                go: go_w,
                reaped: false,
            };
            for _ in 0..2 + usize::from(with_child) {
                match fam.recv() {
                    (b'k', v) => {
                        assert!(v >= 0, "fork in the test parent failed");
                        fam.child = v;
                    }
                    (b'p' | b'c', _) => {}
                    m => panic!("unexpected report {m:?}"),
                }
            }
            fam
        }

        /// Next report, within 20 s.
        fn recv(&self) -> (u8, i32) {
            let mut p = libc::pollfd {
                fd: self.report.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut p, 1, 20_000) };
            assert!(r == 1, "no report from the test processes within 20 s");
            let mut m = [0u8; 8];
            // SAFETY: reads into a stack buffer.
            let n = unsafe { libc::read(self.report.as_raw_fd(), m.as_mut_ptr().cast(), 8) };
            assert_eq!(n, 8, "the test processes died");
            (m[0], i32::from_ne_bytes([m[4], m[5], m[6], m[7]]))
        }

        /// Lets the processes run their checks; returns the parent's and
        /// the child's results (0 for no child) and reaps them.
        pub(crate) fn finish(mut self) -> (i32, i32) {
            let n = if self.child > 0 { 2 } else { 1 };
            // SAFETY: writes `n` bytes of a static buffer to our pipe.
            let w = unsafe { libc::write(self.go.as_raw_fd(), b"gg".as_ptr().cast(), n) };
            assert_eq!(w, n as isize);
            let (mut parent, mut child) = (None, None);
            for _ in 0..n {
                match self.recv() {
                    (b'P', v) => parent = Some(v),
                    (b'C', v) => child = Some(v),
                    m => panic!("unexpected report {m:?}"),
                }
            }
            let mut st = 0;
            // SAFETY: reaps our child; `st` is a valid out pointer.
            unsafe { libc::waitpid(self.parent, &mut st, 0) };
            self.reaped = true;
            (parent.unwrap_or(-1), child.unwrap_or(0))
        }
    }

    impl Drop for Family {
        fn drop(&mut self) {
            if self.reaped {
                return;
            }
            // SAFETY: kill and waitpid on processes this test forked.
            unsafe {
                if self.child > 0 {
                    libc::kill(self.child, libc::SIGKILL);
                }
                libc::kill(self.parent, libc::SIGKILL);
                let mut st = 0;
                libc::waitpid(self.parent, &mut st, 0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::family::{Family, Step};
    use super::*;
    use crate::image::data::MemSink;
    use crate::image::model::FdEntry;
    use crate::procfs::{fds, fds_with, unix_sockets};
    use std::ffi::CString;

    fn image(pid: i32, fds: Vec<FdEntry>) -> ProcessImage {
        ProcessImage {
            pid,
            fds,
            ..Default::default()
        }
    }

    fn kind(p: &ProcessImage, fd: i32) -> &FdKind {
        &p.fds.iter().find(|e| e.fd == fd).unwrap().kind
    }

    /// In a forked process: moves `fd` to `to`.
    fn mv(fd: i32, to: i32) {
        if fd != to {
            // SAFETY: raw syscalls on the calling process's own fds.
            unsafe {
                libc::dup2(fd, to);
                libc::close(fd);
            }
        }
    }

    #[test]
    fn inherited_and_duped_files_and_pipe_data_once() {
        let dir = std::env::temp_dir().join(format!("pdump-share-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f");
        std::fs::write(&file, [1u8; 200]).unwrap();
        let cfile = CString::new(file.to_str().unwrap()).unwrap();

        let fam = Family::spawn(true, |step| {
            let mut bad = 0;
            let mut buf = [0u8; 16];
            // SAFETY: raw syscalls on the forked processes' own fds, with
            // stack buffers and a path made before fork.
            unsafe {
                match step {
                    Step::Shared => {
                        let f = libc::open(cfile.as_ptr(), libc::O_RDWR);
                        libc::lseek(f, 77, libc::SEEK_SET);
                        mv(f, 3);
                        let mut p = [0; 2];
                        libc::pipe2(p.as_mut_ptr(), 0);
                        libc::write(p[1], b"buffered".as_ptr().cast(), 8);
                        mv(p[0], 6);
                        mv(p[1], 7);
                        libc::pipe2(p.as_mut_ptr(), libc::O_NONBLOCK);
                        libc::write(p[1], b"q-data".as_ptr().cast(), 6);
                        mv(p[0], 8);
                        mv(p[1], 9);
                    }
                    Step::Parent => {
                        libc::dup2(3, 4);
                        libc::close(6);
                    }
                    Step::Child => {
                        // The same file, another description.
                        mv(libc::open(cfile.as_ptr(), libc::O_RDWR), 5);
                        libc::close(7);
                    }
                    Step::CheckParent => {
                        if libc::lseek(4, 0, libc::SEEK_CUR) != 77 {
                            bad |= 1;
                        }
                    }
                    Step::CheckChild => {
                        if libc::lseek(3, 0, libc::SEEK_CUR) != 77 {
                            bad |= 1;
                        }
                        if libc::read(6, buf.as_mut_ptr().cast(), 16) != 8
                            || &buf[..8] != b"buffered"
                        {
                            bad |= 2;
                        }
                        if libc::read(8, buf.as_mut_ptr().cast(), 16) != 6 || &buf[..6] != b"q-data"
                        {
                            bad |= 4;
                        }
                    }
                }
            }
            bad
        });

        let mut sink = MemSink::default();
        let mut procs = vec![
            image(fam.parent, fds(fam.parent, &mut sink).unwrap()),
            image(fam.child, fds(fam.child, &mut sink).unwrap()),
        ];
        // Before: each process recorded the data of the pipes it holds.
        assert!(
            matches!(kind(&procs[0], 7), FdKind::Pipe { data, .. } if sink.bytes(data) == b"buffered")
        );
        assert!(
            matches!(kind(&procs[1], 6), FdKind::Pipe { data, .. } if sink.bytes(data) == b"buffered")
        );
        let before = procs.clone();
        let files = share_files(&mut procs).unwrap();
        // Deterministic.
        let mut again = before.clone();
        assert_eq!(share_files(&mut again).unwrap(), files);
        assert_eq!(again, procs);

        // /dev/null 0-2, the file, the q pipe's two ends, the two sync pipes.
        let ids: Vec<u64> = files.iter().map(|f| f.id).collect();
        assert_eq!(ids, vec![1, 2, 3, 4, 5, 6]);
        let (p, c) = (&procs[0], &procs[1]);
        for fd in 0..3 {
            assert_eq!(kind(p, fd), &FdKind::Shared { file_id: 1 });
            assert_eq!(kind(c, fd), &FdKind::Shared { file_id: 1 });
        }
        assert_eq!(files[0].kind, FdKind::DevNull);
        assert_eq!(files[0].flags & libc::O_ACCMODE as u32, libc::O_RDWR as u32);

        // The inherited file (and the parent's dup of it): one description.
        for (img, fd) in [(p, 3), (p, 4), (c, 3)] {
            assert_eq!(kind(img, fd), &FdKind::Shared { file_id: 2 }, "fd {fd}");
        }
        match &files[1].kind {
            FdKind::Regular { path, pos, .. } => {
                assert_eq!(path, file.to_str().unwrap());
                assert_eq!(*pos, 77);
            }
            k => panic!("{k:?}"),
        }
        // The child's own open of the same file is not shared.
        assert!(matches!(kind(c, 5), FdKind::Regular { pos: 0, .. }));

        // A pipe with one end in each process: data once, on the read end.
        assert_eq!(
            kind(p, 7),
            &FdKind::Pipe {
                inode: match kind(c, 6) {
                    FdKind::Pipe { inode, .. } => *inode,
                    k => panic!("{k:?}"),
                },
                write_end: true,
                data: Blob::default()
            }
        );
        assert!(
            matches!(kind(c, 6), FdKind::Pipe { write_end: false, data, .. } if sink.bytes(data) == b"buffered")
        );
        // A pipe whose both ends both processes hold: two objects, the data
        // on the read end's.
        for (img, fd, id) in [(p, 8, 3), (c, 8, 3), (p, 9, 4), (c, 9, 4)] {
            assert_eq!(kind(img, fd), &FdKind::Shared { file_id: id });
        }
        assert!(
            matches!(&files[2].kind, FdKind::Pipe { write_end: false, data, .. } if sink.bytes(data) == b"q-data")
        );
        assert!(
            matches!(&files[3].kind, FdKind::Pipe { write_end: true, data, .. } if data.is_empty())
        );
        assert_ne!(files[2].flags & libc::O_NONBLOCK as u32, 0);

        // Each pipe's data appears exactly once in the whole dump.
        let mut copies: HashMap<u64, usize> = HashMap::new();
        let all = procs
            .iter()
            .flat_map(|p| p.fds.iter().map(|e| &e.kind))
            .chain(files.iter().map(|f| &f.kind));
        for k in all {
            if let FdKind::Pipe { inode, data, .. } = k {
                *copies.entry(*inode).or_default() += usize::from(!data.is_empty());
            }
        }
        assert_eq!(
            copies.values().filter(|&&n| n == 1).count(),
            2,
            "{copies:?}"
        );
        assert!(copies.values().all(|&n| n <= 1), "{copies:?}");

        assert!(matches!(
            share_files(&mut procs),
            Err(ShareError::AlreadyShared {
                fd: 0,
                file_id: 1,
                ..
            })
        ));
        assert_eq!(fam.finish(), (0, 0), "the dump changed the processes");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn socketpairs_between_processes() {
        let fam = Family::spawn(true, |step| {
            let mut bad = 0;
            let mut buf = [0u8; 64];
            // SAFETY: raw syscalls on the forked processes' own fds, with
            // stack buffers.
            unsafe {
                let recv = |fd: i32, buf: &mut [u8; 64]| {
                    libc::recv(fd, buf.as_mut_ptr().cast(), 64, libc::MSG_DONTWAIT)
                };
                let peek_off = |fd: i32| {
                    let mut v = 0i32;
                    let mut l = 4u32;
                    libc::getsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_PEEK_OFF,
                        (&mut v as *mut i32).cast(),
                        &mut l,
                    );
                    v
                };
                match step {
                    Step::Shared => {
                        let mut sv = [0; 2];
                        libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sv.as_mut_ptr());
                        mv(sv[0], 10);
                        mv(sv[1], 11);
                        libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM, 0, sv.as_mut_ptr());
                        mv(sv[0], 12);
                        mv(sv[1], 13);
                    }
                    Step::Parent => {
                        libc::close(11);
                        libc::close(13);
                        libc::send(12, b"one".as_ptr().cast(), 3, 0);
                        libc::send(12, b"second!".as_ptr().cast(), 7, 0);
                    }
                    Step::Child => {
                        libc::close(10);
                        libc::close(12);
                        libc::send(11, b"hello".as_ptr().cast(), 5, 0);
                    }
                    Step::CheckParent => {
                        if recv(10, &mut buf) != 5 || &buf[..5] != b"hello" {
                            bad |= 1;
                        }
                        // Nothing more: EAGAIN, or EOF once the child's end
                        // is closed (it may be, under load).
                        if recv(10, &mut buf) > 0 {
                            bad |= 2;
                        }
                        if peek_off(10) != -1 || peek_off(12) != -1 {
                            bad |= 4;
                        }
                    }
                    Step::CheckChild => {
                        if recv(13, &mut buf) != 3 || &buf[..3] != b"one" {
                            bad |= 1;
                        }
                        if recv(13, &mut buf) != 7 || &buf[..7] != b"second!" {
                            bad |= 2;
                        }
                        if recv(13, &mut buf) != -1 {
                            bad |= 4;
                        }
                        if peek_off(11) != -1 || peek_off(13) != -1 {
                            bad |= 8;
                        }
                    }
                }
            }
            bad
        });

        let known = unix_sockets().unwrap();
        let mem = MemSink::default;
        let pf = fds_with(fam.parent, &known, &mut mem()).unwrap();
        let cf = fds_with(fam.child, &known, &mut mem()).unwrap();
        // Peeking is repeatable, and the one-by-one lookups agree.
        assert_eq!(fds(fam.parent, &mut mem()).unwrap(), pf);
        assert_eq!(fds(fam.child, &mut mem()).unwrap(), cf);
        let mut procs = vec![image(fam.parent, pf), image(fam.child, cf)];
        let sock = |img: &ProcessImage, fd| match kind(img, fd).clone() {
            FdKind::UnixSocket {
                inode,
                peer_inode,
                sock_type,
                name,
                queued,
                shutdown,
            } => {
                assert!(name.is_empty());
                assert_eq!(shutdown, 0);
                (inode, peer_inode, sock_type, queued)
            }
            k => panic!("fd {fd}: {k:?}"),
        };
        let (s10, s11) = (sock(&procs[0], 10), sock(&procs[1], 11));
        assert_eq!((s10.1, s11.1), (s11.0, s10.0), "stream peers cross-linked");
        assert_eq!((s10.2, s11.2), (libc::SOCK_STREAM, libc::SOCK_STREAM));
        assert_eq!(s10.3, vec![b"hello".to_vec()]);
        assert!(s11.3.is_empty());
        let (s12, s13) = (sock(&procs[0], 12), sock(&procs[1], 13));
        assert_eq!((s12.1, s13.1), (s13.0, s12.0), "dgram peers cross-linked");
        assert_eq!((s12.2, s13.2), (libc::SOCK_DGRAM, libc::SOCK_DGRAM));
        assert!(s12.3.is_empty());
        assert_eq!(s13.3, vec![b"one".to_vec(), b"second!".to_vec()]);

        // Each end is held by one process: no shared object for them.
        let files = share_files(&mut procs).unwrap();
        assert!(files
            .iter()
            .all(|f| !matches!(f.kind, FdKind::UnixSocket { .. })));
        assert!(matches!(kind(&procs[0], 10), FdKind::UnixSocket { .. }));
        assert_eq!(fam.finish(), (0, 0), "the dump consumed queued data");
    }

    #[test]
    fn merge_sort_is_a_stable_sort_and_stops_on_error() {
        let mut v: Vec<(u8, usize)> = [5u8, 1, 4, 1, 3, 9, 2, 6, 5, 3, 5]
            .into_iter()
            .enumerate()
            .map(|(i, x)| (x, i))
            .collect();
        let mut want = v.clone();
        want.sort_by_key(|p| p.0);
        merge_sort_by(&mut v, |a, b| Ok::<_, ()>(a.0.cmp(&b.0))).unwrap();
        assert_eq!(v, want);
        assert_eq!(merge_sort_by(&mut v, |_, _| Err::<Ordering, _>(7)), Err(7));
    }
}
