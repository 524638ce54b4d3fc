//! pidfds: a stable handle on a task, and copies of its file descriptors.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// A pidfd (`pidfd_open(2)`), closed on drop.
#[derive(Debug)]
pub struct PidFd {
    pid: i32,
    fd: OwnedFd,
}

impl PidFd {
    /// `pidfd_open(pid, 0)`.
    pub fn open(pid: i32) -> io::Result<Self> {
        // SAFETY: pidfd_open takes two integers and returns a new fd or -1.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let raw = RawFd::try_from(r).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
        // SAFETY: the kernel just returned `raw` as a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(PidFd { pid, fd })
    }

    /// The pid this pidfd was opened for.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// `pidfd_getfd(pidfd, target_fd, 0)`: a new fd in this process that
    /// refers to the same open file description as the task's `target_fd`
    /// (so it shares the file offset and status flags; use `pread`), with
    /// `O_CLOEXEC` set. Needs ptrace access to the task.
    pub fn get_fd(&self, target_fd: i32) -> io::Result<OwnedFd> {
        // SAFETY: pidfd_getfd takes an fd we own and two integers and returns
        // a new fd or -1.
        let r =
            unsafe { libc::syscall(libc::SYS_pidfd_getfd, self.fd.as_raw_fd(), target_fd, 0u32) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let raw = RawFd::try_from(r).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
        // SAFETY: the kernel just returned `raw` as a new fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }
}

impl AsFd for PidFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn getfd_of_self() {
        let me = std::process::id() as i32;
        let p = PidFd::open(me).unwrap();
        assert_eq!(p.pid(), me);
        let dup = p.get_fd(p.as_raw_fd()).unwrap();
        assert_ne!(dup.as_raw_fd(), p.as_raw_fd());
        assert!(p.get_fd(-1).is_err());
    }
}
