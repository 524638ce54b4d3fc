//! Interim fd table (regular files, directories, /dev/null, /dev/zero,
//! pipes): replaced by `restore_files` when it lands.

use std::collections::BTreeMap;
use std::os::fd::RawFd;

use crate::image::model::FdKind;
use crate::image::Checkpoint;

/// Options.
#[derive(Clone, Debug, Default)]
pub struct FileOptions {
    /// Restore files whose size changed.
    pub allow_size_change: bool,
    /// External objects: key (`pipe:[INODE]`) -> the controller's fd.
    pub inherit: Vec<(String, RawFd)>,
}

/// Errors.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// Opening failed.
    #[error("pid {pid} fd {fd}: cannot restore {what}")]
    Open {
        /// Pid.
        pid: i32,
        /// Fd.
        fd: i32,
        /// What.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Unsupported kind.
    #[error("pid {pid} fd {fd}: {what} is not supported by restore yet")]
    Unsupported {
        /// Pid.
        pid: i32,
        /// Fd.
        fd: i32,
        /// What.
        what: String,
    },
}

/// Every object, open in the controller.
#[derive(Debug)]
pub struct FileTable {
    base: RawFd,
    by_pid: BTreeMap<i32, Vec<(RawFd, RawFd, bool)>>,
}

fn high(fd: RawFd, base: RawFd) -> RawFd {
    // SAFETY: fcntl/close on fds we own.
    unsafe {
        let n = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, base);
        libc::close(fd);
        n
    }
}

impl FileTable {
    /// Open everything.
    pub fn open(ckpt: &Checkpoint, opts: &FileOptions) -> Result<FileTable, FilesError> {
        let base = 1000;
        let mut by_pid: BTreeMap<i32, Vec<(RawFd, RawFd, bool)>> = BTreeMap::new();
        let mut pipes: BTreeMap<u64, [RawFd; 2]> = BTreeMap::new();
        for p in &ckpt.processes {
            for e in &p.fds {
                let io = |what: String| {
                    let source = std::io::Error::last_os_error();
                    FilesError::Open {
                        pid: p.pid,
                        fd: e.fd,
                        what,
                        source,
                    }
                };
                let kind = match &e.kind {
                    FdKind::Shared { file_id } => ckpt
                        .inventory
                        .files
                        .iter()
                        .find(|f| f.id == *file_id)
                        .map(|f| f.kind.clone())
                        .unwrap_or_default(),
                    k => k.clone(),
                };
                let flags = (e.flags as i32) & !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL);
                let fd = match &kind {
                    FdKind::Regular { path, pos, .. } | FdKind::Directory { path, pos } => {
                        let c = std::ffi::CString::new(path.as_str()).unwrap_or_default();
                        // SAFETY: a NUL-terminated path.
                        let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
                        if fd < 0 {
                            return Err(io(path.clone()));
                        }
                        // SAFETY: lseek on our fd.
                        unsafe { libc::lseek(fd, *pos as i64, libc::SEEK_SET) };
                        fd
                    }
                    FdKind::DevNull | FdKind::DevZero => {
                        let path = if kind == FdKind::DevNull {
                            c"/dev/null"
                        } else {
                            c"/dev/zero"
                        };
                        // SAFETY: a NUL-terminated path.
                        let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
                        if fd < 0 {
                            return Err(io(format!("{path:?}")));
                        }
                        fd
                    }
                    FdKind::Pipe {
                        inode,
                        write_end,
                        data,
                    } => {
                        let key = format!("pipe:[{inode}]");
                        if let Some(&(_, cfd)) = opts.inherit.iter().find(|(k, _)| *k == key) {
                            // SAFETY: dup of an fd the caller gave us.
                            unsafe { libc::dup(cfd) }
                        } else {
                            let ends = match pipes.get(inode) {
                                Some(e) => *e,
                                None => {
                                    let mut fds = [0; 2];
                                    // SAFETY: pipe2 writes two fds we own.
                                    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0
                                    {
                                        return Err(io(key));
                                    }
                                    pipes.insert(*inode, fds);
                                    fds
                                }
                            };
                            if !data.is_empty() {
                                // SAFETY: write from a buffer we own.
                                unsafe {
                                    libc::write(ends[1], data.as_ptr() as *const _, data.len())
                                };
                            }
                            // SAFETY: dup of our own fd.
                            unsafe { libc::dup(ends[*write_end as usize]) }
                        }
                    }
                    other => {
                        return Err(FilesError::Unsupported {
                            pid: p.pid,
                            fd: e.fd,
                            what: format!("{other:?}").chars().take(40).collect(),
                        })
                    }
                };
                by_pid
                    .entry(p.pid)
                    .or_default()
                    .push((e.fd, high(fd, base), e.cloexec));
            }
        }
        for (_, [r, w]) in pipes {
            // SAFETY: closing our own fds.
            unsafe {
                libc::close(r);
                libc::close(w);
            }
        }
        Ok(FileTable { base, by_pid })
    }

    /// The lowest fd the table uses.
    pub fn base(&self) -> RawFd {
        self.base
    }

    /// Install process `pid`'s fds.
    pub fn install(&self, pid: i32) -> Result<(), FilesError> {
        let list = self.by_pid.get(&pid).cloned().unwrap_or_default();
        for &(target, src, cloexec) in &list {
            let flags = if cloexec { libc::O_CLOEXEC } else { 0 };
            // SAFETY: dup3 between fds of this task.
            if unsafe { libc::dup3(src, target, flags) } < 0 {
                return Err(FilesError::Open {
                    pid,
                    fd: target,
                    what: "dup3".into(),
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        for fd in 0..self.base {
            if !list.iter().any(|&(t, _, _)| t == fd) {
                // SAFETY: closing an fd of this task not in its image.
                unsafe { libc::close(fd) };
            }
        }
        Ok(())
    }

    /// The memfd with this inode.
    pub fn memfd(&self, _inode: u64) -> Option<RawFd> {
        None
    }
}
