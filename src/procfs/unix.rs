//! Unix domain sockets: what `NETLINK_SOCK_DIAG` says about them, and the
//! data queued on them, copied without consuming it.
//!
//! [`unix_sockets`] dumps every unix socket of a network namespace in one
//! netlink exchange (`unix_diag_req` with `NLM_F_DUMP`): inode, type, state,
//! peer inode, bound name, the file of a path-bound socket, queue lengths
//! and shutdown state. A tree dumper calls it once and hands the map to
//! [`fds_with`](super::fds_with); [`fds`](super::fds) alone asks about each
//! socket by inode. A socket of another network namespace (the task's, when
//! it differs from pdump's) is looked up there: `SIOCGSKNS` gives the
//! socket's namespace, a short-lived thread `setns`es into it and opens the
//! sock_diag socket, which keeps answering for that namespace.
//!
//! The queued data is read through a `pidfd_getfd` copy of the task's fd
//! with `MSG_PEEK`, which leaves it queued:
//!
//! * `SO_PEEK_OFF` is saved, set to 0 so that successive peeks walk the
//!   queue (byte by byte for streams, datagram after datagram otherwise),
//!   and set back to the saved value (-1, "off", unless the task uses it);
//! * a stream socket is only peeked while `SIOCINQ` says bytes remain past
//!   the peek offset: a stream peek that finds nothing takes the socket's
//!   pending error (`sock_error()` clears `sk_err`);
//! * a datagram or seqpacket socket with a pending error (`POLLERR`) is
//!   refused: every datagram receive, peeks included, takes `sk_err` first;
//! * `MSG_OOB | MSG_PEEK` tells (without consuming it) whether an
//!   out-of-band byte is pending; such a socket is refused;
//! * no control buffer is passed (a credentials-sized one if `SO_PASSCRED`
//!   is on), so file descriptors in flight (`SCM_RIGHTS`) are never
//!   installed into pdump; `scm_fds:` in fdinfo and `MSG_CTRUNC` both refuse
//!   such sockets.
//!
//! What peeking cannot avoid: a zero-length datagram, once peeked, is marked
//! (`skb->peeked`) and later peeks *with an offset* skip it (plain reads and
//! plain peeks do not). A second dump of the same socket, or one after the
//! task peeked such a datagram itself, misses it. Peeking also wakes
//! writers blocked on the socket's peer queue (they re-check and sleep again).

use std::collections::HashMap;
use std::io;
use std::mem::{size_of, size_of_val, zeroed};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};

use super::{ProcError, MAX_SOCKET_QUEUE};
use crate::image::model::FdKind;

/// `SOCK_DIAG_BY_FAMILY`: the netlink message type of sock_diag requests.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `UDIAG_SHOW_NAME`: ask for the bound name.
pub const UDIAG_SHOW_NAME: u32 = 0x01;
/// `UDIAG_SHOW_VFS`: ask for the device and inode of a path-bound socket.
pub const UDIAG_SHOW_VFS: u32 = 0x02;
/// `UDIAG_SHOW_PEER`: ask for the peer's inode.
pub const UDIAG_SHOW_PEER: u32 = 0x04;
/// `UDIAG_SHOW_RQLEN`: ask for the queue lengths.
pub const UDIAG_SHOW_RQLEN: u32 = 0x10;
/// What pdump asks sock_diag for (the shutdown state always comes).
const SHOW: u32 = UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_VFS: u16 = 1;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_RQLEN: u16 = 4;
const UNIX_DIAG_SHUTDOWN: u16 = 6;
/// `INET_DIAG_NOCOOKIE`: either half of a wildcard cookie.
const NO_COOKIE: u32 = u32::MAX;
/// `sizeof(struct nlmsghdr)`.
const NLMSG_HDRLEN: usize = 16;
/// `sizeof(struct unix_diag_req)`.
const UNIX_DIAG_REQ_LEN: usize = 24;
/// `sizeof(struct unix_diag_msg)`.
const UNIX_DIAG_MSG_LEN: usize = 16;
/// Receive buffer for netlink replies: the kernel builds dump batches of at
/// most 32 KiB.
const NL_BUF: usize = 64 << 10;
/// `SO_PASSPIDFD` (Linux 6.5), not in every libc.
const SO_PASSPIDFD: libc::c_int = 76;

/// `sk_state` of a connected socket.
pub const TCP_ESTABLISHED: u8 = 1;
/// `sk_state` of an unconnected socket.
pub const TCP_CLOSE: u8 = 7;
/// `sk_state` of a listening socket.
pub const TCP_LISTEN: u8 = 10;
/// `sk_shutdown` bit: no more receiving (`SHUT_RD`, or the peer's `SHUT_WR`).
pub const RCV_SHUTDOWN: u32 = 1;
/// `sk_shutdown` bit: no more sending.
pub const SEND_SHUTDOWN: u32 = 2;

/// What `NETLINK_SOCK_DIAG` says about one unix socket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnixInfo {
    /// The socket's inode (`socket:[INODE]`).
    pub inode: u64,
    /// `SOCK_STREAM`, `SOCK_DGRAM` or `SOCK_SEQPACKET`.
    pub sock_type: i32,
    /// `sk_state`: [`TCP_ESTABLISHED`], [`TCP_CLOSE`] or [`TCP_LISTEN`].
    pub state: u8,
    /// The peer's inode; 0 without a peer, and also when the peer has no
    /// inode any more (closed) or not yet (a connection not yet accepted).
    pub peer_inode: u64,
    /// The bound name: a path without its terminating NUL, or an abstract
    /// name starting with a NUL byte; empty if unbound.
    pub name: Vec<u8>,
    /// For a socket bound to a path: `(device, inode)` of the socket file.
    pub vfs: Option<(u32, u64)>,
    /// `SIOCINQ`: bytes queued to read (stream, seqpacket), the first
    /// datagram's length (dgram), connections waiting (listening).
    pub rqueue: u32,
    /// `SIOCOUTQ`: send-buffer memory in use; the backlog when listening.
    pub wqueue: u32,
    /// `sk_shutdown`: [`RCV_SHUTDOWN`] | [`SEND_SHUTDOWN`].
    pub shutdown: u32,
    /// The socket cookie.
    pub cookie: u64,
}

impl UnixInfo {
    /// Whether the socket listens for connections.
    pub fn listening(&self) -> bool {
        self.state == TCP_LISTEN
    }
}

/// A failed `NETLINK_SOCK_DIAG` exchange about unix sockets.
#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    /// `socket(AF_NETLINK, SOCK_DGRAM, NETLINK_SOCK_DIAG)` failed.
    #[error("opening a NETLINK_SOCK_DIAG socket")]
    Socket(#[source] io::Error),
    /// `setns` into the network namespace to query failed.
    #[error("entering the network namespace to query")]
    SetNs(#[source] io::Error),
    /// Sending the `unix_diag_req` failed.
    #[error("sending a unix_diag request")]
    Send(#[source] io::Error),
    /// Receiving the replies failed.
    #[error("receiving unix_diag replies")]
    Recv(#[source] io::Error),
    /// The kernel answered the request with an error.
    #[error("sock_diag refused the unix_diag request")]
    Kernel(#[source] io::Error),
    /// A reply did not have the expected shape.
    #[error("malformed unix_diag reply: {0}")]
    Malformed(&'static str),
}

impl SockDiagError {
    /// The underlying I/O error, if any.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            SockDiagError::Socket(e)
            | SockDiagError::SetNs(e)
            | SockDiagError::Send(e)
            | SockDiagError::Recv(e)
            | SockDiagError::Kernel(e) => Some(e),
            SockDiagError::Malformed(_) => None,
        }
    }
}

/// A failed operation on one unix socket fd of a task: one variant per
/// operation, each naming the pid and the fd.
#[derive(Debug, thiserror::Error)]
pub enum UnixError {
    /// Asking sock_diag about the socket failed.
    #[error("pid {pid}: asking sock_diag about fd {fd} (socket:[{inode}])")]
    Diag {
        /// The task.
        pid: i32,
        /// The task's fd.
        fd: i32,
        /// The socket's inode.
        inode: u64,
        /// The cause.
        #[source]
        source: SockDiagError,
    },
    /// sock_diag does not know the socket in its network namespace.
    #[error("pid {pid}: sock_diag knows no unix socket socket:[{inode}] (fd {fd})")]
    NotFound {
        /// The task.
        pid: i32,
        /// The task's fd.
        fd: i32,
        /// The socket's inode.
        inode: u64,
    },
    /// `ioctl(SIOCGSKNS)` (the socket's network namespace) failed.
    #[error("pid {pid}: SIOCGSKNS on socket fd {fd}")]
    Netns {
        /// The task.
        pid: i32,
        /// The task's fd.
        fd: i32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `getsockopt` failed.
    #[error("pid {pid}: getsockopt({opt}) on socket fd {fd}")]
    GetSockOpt {
        /// The task.
        pid: i32,
        /// The task's fd.
        fd: i32,
        /// The option.
        opt: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `setsockopt(SO_PEEK_OFF)` failed: setting it to 0 before peeking,
    /// or setting it back to `value` afterwards (the socket then keeps a
    /// peek offset the task did not set).
    #[error("pid {pid}: setsockopt(SO_PEEK_OFF, {value}) on unix socket fd {fd}")]
    SetPeekOff {
        /// The task.
        pid: i32,
        /// The task's fd.
        fd: i32,
        /// The value that could not be set.
        value: i32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `ioctl(SIOCINQ)` failed.
    #[error("pid {pid}: SIOCINQ on unix socket fd {fd}")]
    InQueue {
        /// The task.
        pid: i32,
        /// The task's fd.
        fd: i32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `poll` failed.
    #[error("pid {pid}: poll on unix socket fd {fd}")]
    Poll {
        /// The task.
        pid: i32,
        /// The task's fd.
        fd: i32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `recvmsg(MSG_PEEK)` failed.
    #[error("pid {pid}: peeking at the data queued on unix socket fd {fd}")]
    Peek {
        /// The task.
        pid: i32,
        /// The task's fd.
        fd: i32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The queue changed while it was peeked (the task, or a peer outside
    /// the dump, was not frozen).
    #[error("pid {pid}: unix socket fd {fd}: {expected} bytes queued, {got} peeked")]
    QueueChanged {
        /// The task.
        pid: i32,
        /// The task's fd.
        fd: i32,
        /// Bytes announced.
        expected: usize,
        /// Bytes peeked.
        got: usize,
    },
    /// More data is queued than pdump keeps inline.
    #[error("pid {pid}: unix socket fd {fd} has more than {limit} bytes queued")]
    QueueTooLarge {
        /// The task.
        pid: i32,
        /// The task's fd.
        fd: i32,
        /// The limit ([`MAX_SOCKET_QUEUE`]).
        limit: u64,
    },
}

impl UnixError {
    /// The task the failed operation concerned.
    pub fn pid(&self) -> i32 {
        match self {
            UnixError::Diag { pid, .. }
            | UnixError::NotFound { pid, .. }
            | UnixError::Netns { pid, .. }
            | UnixError::GetSockOpt { pid, .. }
            | UnixError::SetPeekOff { pid, .. }
            | UnixError::InQueue { pid, .. }
            | UnixError::Poll { pid, .. }
            | UnixError::Peek { pid, .. }
            | UnixError::QueueChanged { pid, .. }
            | UnixError::QueueTooLarge { pid, .. } => *pid,
        }
    }

    /// The underlying I/O error, if the failure came from one.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            UnixError::Diag { source, .. } => source.io_error(),
            UnixError::Netns { source, .. }
            | UnixError::GetSockOpt { source, .. }
            | UnixError::SetPeekOff { source, .. }
            | UnixError::InQueue { source, .. }
            | UnixError::Poll { source, .. }
            | UnixError::Peek { source, .. } => Some(source),
            UnixError::NotFound { .. }
            | UnixError::QueueChanged { .. }
            | UnixError::QueueTooLarge { .. } => None,
        }
    }
}

/// Every unix socket of pdump's network namespace, by inode (one
/// `NLM_F_DUMP` request).
///
/// Socket inodes are unique across namespaces, so maps of several
/// namespaces ([`unix_sockets_in`]) can be merged.
pub fn unix_sockets() -> Result<HashMap<u64, UnixInfo>, SockDiagError> {
    let sock = diag_socket()?;
    Ok(by_inode(diag_request(sock.as_fd(), None)?))
}

/// Every unix socket of the network namespace `netns` (an fd of
/// `/proc/PID/ns/net`, or from `SIOCGSKNS`), by inode.
pub fn unix_sockets_in(netns: BorrowedFd<'_>) -> Result<HashMap<u64, UnixInfo>, SockDiagError> {
    let sock = diag_socket_in(netns)?;
    Ok(by_inode(diag_request(sock.as_fd(), None)?))
}

/// What sock_diag says about the unix socket `inode` of pdump's network
/// namespace; `None` if there is none.
pub fn unix_socket(inode: u64) -> Result<Option<UnixInfo>, SockDiagError> {
    let sock = diag_socket()?;
    exact(sock.as_fd(), inode)
}

fn by_inode(list: Vec<UnixInfo>) -> HashMap<u64, UnixInfo> {
    list.into_iter().map(|i| (i.inode, i)).collect()
}

fn exact(sock: BorrowedFd<'_>, inode: u64) -> Result<Option<UnixInfo>, SockDiagError> {
    // The request carries a 32-bit inode; sockfs inodes fit.
    let Ok(ino) = u32::try_from(inode) else {
        return Ok(None);
    };
    Ok(diag_request(sock, Some(ino))?.into_iter().next())
}

fn diag_socket() -> Result<OwnedFd, SockDiagError> {
    // SAFETY: socket takes three integers and returns a new fd or -1.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(SockDiagError::Socket(io::Error::last_os_error()));
    }
    // SAFETY: the kernel just returned `fd` as a new fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a sock_diag socket in the network namespace `netns`: a thread
/// enters the namespace, opens the socket and ends; the socket keeps
/// answering for that namespace.
fn diag_socket_in(netns: BorrowedFd<'_>) -> Result<OwnedFd, SockDiagError> {
    let ns: RawFd = netns.as_raw_fd();
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns takes an fd (borrowed for the whole scope) and a
            // flag; it moves only this short-lived thread into the namespace.
            if unsafe { libc::setns(ns, libc::CLONE_NEWNET) } < 0 {
                return Err(SockDiagError::SetNs(io::Error::last_os_error()));
            }
            diag_socket()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Sends one `unix_diag_req` (a dump of every socket, or the socket `ino`)
/// and collects the replies.
fn diag_request(sock: BorrowedFd<'_>, ino: Option<u32>) -> Result<Vec<UnixInfo>, SockDiagError> {
    static SEQ: AtomicU32 = AtomicU32::new(1);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let flags = libc::NLM_F_REQUEST as u16
        | if ino.is_none() {
            libc::NLM_F_DUMP as u16
        } else {
            0
        };

    let mut req = Vec::with_capacity(NLMSG_HDRLEN + UNIX_DIAG_REQ_LEN);
    // struct nlmsghdr
    req.extend_from_slice(&((NLMSG_HDRLEN + UNIX_DIAG_REQ_LEN) as u32).to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&flags.to_ne_bytes());
    req.extend_from_slice(&seq.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    // struct unix_diag_req
    req.push(libc::AF_UNIX as u8);
    req.push(0); // sdiag_protocol
    req.extend_from_slice(&0u16.to_ne_bytes());
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // udiag_states: all
    req.extend_from_slice(&ino.unwrap_or(0).to_ne_bytes());
    req.extend_from_slice(&SHOW.to_ne_bytes());
    req.extend_from_slice(&NO_COOKIE.to_ne_bytes());
    req.extend_from_slice(&NO_COOKIE.to_ne_bytes());

    // SAFETY: an all-zero sockaddr_nl is valid; it addresses the kernel.
    let mut kernel: libc::sockaddr_nl = unsafe { zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    loop {
        // SAFETY: `req` and `kernel` are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                req.as_ptr().cast(),
                req.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(SockDiagError::Send(e));
        }
    }

    let mut out = Vec::new();
    let mut buf = vec![0u8; NL_BUF];
    loop {
        let (n, msg_flags) =
            recv_into(sock.as_raw_fd(), &mut buf, 0, None).map_err(SockDiagError::Recv)?;
        if msg_flags & libc::MSG_TRUNC != 0 {
            return Err(SockDiagError::Malformed("reply truncated"));
        }
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            if rest.len() < NLMSG_HDRLEN {
                return Err(SockDiagError::Malformed("short netlink header"));
            }
            let len = u32_at(rest, 0) as usize;
            let kind = u16::from_ne_bytes([rest[4], rest[5]]);
            let msg_seq = u32_at(rest, 8);
            if len < NLMSG_HDRLEN || len > rest.len() {
                return Err(SockDiagError::Malformed("netlink message length"));
            }
            let payload = &rest[NLMSG_HDRLEN..len];
            rest = &rest[align4(len).min(rest.len())..];
            if msg_seq != seq {
                continue; // not ours (cannot happen on a fresh socket)
            }
            match i32::from(kind) {
                libc::NLMSG_DONE => {
                    // The payload is the dump's final status.
                    if payload.len() >= 4 && i32_at(payload, 0) < 0 {
                        let errno = -i32_at(payload, 0);
                        return Err(SockDiagError::Kernel(io::Error::from_raw_os_error(errno)));
                    }
                    return Ok(out);
                }
                libc::NLMSG_ERROR => {
                    if payload.len() < 4 {
                        return Err(SockDiagError::Malformed("short NLMSG_ERROR"));
                    }
                    let errno = -i32_at(payload, 0);
                    match errno {
                        0 => continue, // an acknowledgement
                        libc::ENOENT if ino.is_some() => return Ok(out),
                        _ => {
                            return Err(SockDiagError::Kernel(io::Error::from_raw_os_error(errno)))
                        }
                    }
                }
                _ if kind == SOCK_DIAG_BY_FAMILY => {
                    out.push(parse_unix_diag_msg(payload)?);
                    if ino.is_some() {
                        // An exact request gets one reply and no NLMSG_DONE.
                        return Ok(out);
                    }
                }
                _ => return Err(SockDiagError::Malformed("unexpected netlink message type")),
            }
        }
    }
}

/// Parses a `struct unix_diag_msg` and its attributes.
fn parse_unix_diag_msg(p: &[u8]) -> Result<UnixInfo, SockDiagError> {
    if p.len() < UNIX_DIAG_MSG_LEN {
        return Err(SockDiagError::Malformed("short unix_diag_msg"));
    }
    if p[0] != libc::AF_UNIX as u8 {
        return Err(SockDiagError::Malformed("udiag_family is not AF_UNIX"));
    }
    let mut info = UnixInfo {
        sock_type: i32::from(p[1]),
        state: p[2],
        inode: u64::from(u32_at(p, 4)),
        cookie: u64::from(u32_at(p, 8)) | (u64::from(u32_at(p, 12)) << 32),
        ..UnixInfo::default()
    };
    let mut off = UNIX_DIAG_MSG_LEN;
    while off + 4 <= p.len() {
        let len = usize::from(u16::from_ne_bytes([p[off], p[off + 1]]));
        let kind = u16::from_ne_bytes([p[off + 2], p[off + 3]]) & 0x3fff;
        if len < 4 || off + len > p.len() {
            return Err(SockDiagError::Malformed("attribute length"));
        }
        let data = &p[off + 4..off + len];
        let need = |n: usize| {
            if data.len() < n {
                Err(SockDiagError::Malformed("short attribute"))
            } else {
                Ok(())
            }
        };
        match kind {
            UNIX_DIAG_NAME => {
                info.name = data.to_vec();
                // A path name is stored with its terminating NUL.
                if info.name.first().is_some_and(|&b| b != 0) && info.name.last() == Some(&0) {
                    info.name.pop();
                }
            }
            UNIX_DIAG_VFS => {
                need(8)?;
                info.vfs = Some((u32_at(data, 4), u64::from(u32_at(data, 0))));
            }
            UNIX_DIAG_PEER => {
                need(4)?;
                info.peer_inode = u64::from(u32_at(data, 0));
            }
            UNIX_DIAG_RQLEN => {
                need(8)?;
                info.rqueue = u32_at(data, 0);
                info.wqueue = u32_at(data, 4);
            }
            UNIX_DIAG_SHUTDOWN => {
                need(1)?;
                info.shutdown = u32::from(data[0]);
            }
            _ => {}
        }
        off += align4(len);
    }
    Ok(info)
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn i32_at(b: &[u8], at: usize) -> i32 {
    u32_at(b, at) as i32
}

/// `recvmsg` into `buf`, with an optional control buffer; retries on
/// `EINTR`. Returns the byte count (the full datagram length with
/// `MSG_TRUNC`) and the returned `msg_flags`.
fn recv_into(
    sock: RawFd,
    buf: &mut [u8],
    flags: libc::c_int,
    control: Option<&mut [u64]>,
) -> io::Result<(usize, libc::c_int)> {
    let (ctl_ptr, ctl_len) = match control {
        Some(c) => (c.as_mut_ptr().cast::<libc::c_void>(), size_of_val(c)),
        None => (std::ptr::null_mut(), 0),
    };
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: an all-zero msghdr is valid (no name, no control).
        let mut msg: libc::msghdr = unsafe { zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = ctl_ptr;
        msg.msg_controllen = ctl_len;
        // SAFETY: `msg` points to `iov` (which describes `buf`) and to the
        // control buffer, all valid and writable for the call.
        let n = unsafe { libc::recvmsg(sock, &mut msg, flags) };
        if n >= 0 {
            return Ok((n as usize, msg.msg_flags));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn getsockopt_int(sock: RawFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid out pointers of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            sock,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

fn set_peek_off(sock: RawFd, v: libc::c_int) -> io::Result<()> {
    // SAFETY: `v` is a valid int for the length given.
    let r = unsafe {
        libc::setsockopt(
            sock,
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn family_name(domain: libc::c_int) -> String {
    match domain {
        libc::AF_INET => "inet".into(),
        libc::AF_INET6 => "inet6".into(),
        libc::AF_NETLINK => "netlink".into(),
        libc::AF_PACKET => "packet".into(),
        libc::AF_VSOCK => "vsock".into(),
        libc::AF_ALG => "alg".into(),
        libc::AF_BLUETOOTH => "bluetooth".into(),
        libc::AF_TIPC => "tipc".into(),
        libc::AF_XDP => "xdp".into(),
        d => format!("family {d}"),
    }
}

fn type_name(ty: libc::c_int) -> String {
    match ty {
        libc::SOCK_STREAM => "stream".into(),
        libc::SOCK_DGRAM => "dgram".into(),
        libc::SOCK_SEQPACKET => "seqpacket".into(),
        t => format!("type-{t}"),
    }
}

/// One socket fd of a task, as [`socket_kind`] needs it.
pub(crate) struct SocketFd<'a> {
    /// The task.
    pub pid: i32,
    /// The task's fd.
    pub fd: i32,
    /// The socket inode from the `socket:[INODE]` link.
    pub inode: u64,
    /// The link target, for messages.
    pub link: &'a str,
    /// A `pidfd_getfd` copy of the fd (same open file description).
    pub sock: BorrowedFd<'a>,
    /// `scm_fds:` from fdinfo (fds in flight in the receive queue), if shown.
    pub scm_fds: Option<u32>,
}

impl SocketFd<'_> {
    fn raw(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn unsupported(&self, what: String) -> ProcError {
        ProcError::UnsupportedFd {
            pid: self.pid,
            fd: self.fd,
            kind: format!("{what} {}", self.link),
        }
    }

    fn opt(&self, opt: libc::c_int, name: &'static str) -> Result<libc::c_int, UnixError> {
        getsockopt_int(self.raw(), opt).map_err(|source| UnixError::GetSockOpt {
            pid: self.pid,
            fd: self.fd,
            opt: name,
            source,
        })
    }

    fn peek_err(&self, source: io::Error) -> UnixError {
        UnixError::Peek {
            pid: self.pid,
            fd: self.fd,
            source,
        }
    }

    /// `SIOCINQ`.
    fn inq(&self) -> Result<usize, UnixError> {
        let mut n: libc::c_int = 0;
        // SAFETY: SIOCINQ (FIONREAD) writes one int to the valid pointer.
        let r = unsafe { libc::ioctl(self.raw(), libc::FIONREAD, &mut n as *mut libc::c_int) };
        if r < 0 {
            return Err(UnixError::InQueue {
                pid: self.pid,
                fd: self.fd,
                source: io::Error::last_os_error(),
            });
        }
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// `poll` with a zero timeout: the ready events, no waiting, nothing
    /// registered.
    fn poll(&self, events: libc::c_short) -> Result<libc::c_short, UnixError> {
        let mut p = libc::pollfd {
            fd: self.raw(),
            events,
            revents: 0,
        };
        loop {
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut p, 1, 0) };
            if r >= 0 {
                return Ok(p.revents);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(UnixError::Poll {
                    pid: self.pid,
                    fd: self.fd,
                    source: e,
                });
            }
        }
    }

    /// Where the socket's sock_diag entry is: in `known`, else asked by
    /// inode in pdump's namespace, else in the socket's own namespace.
    fn info(&self, known: &HashMap<u64, UnixInfo>) -> Result<UnixInfo, UnixError> {
        if let Some(i) = known.get(&self.inode) {
            return Ok(i.clone());
        }
        let diag = |source| UnixError::Diag {
            pid: self.pid,
            fd: self.fd,
            inode: self.inode,
            source,
        };
        if let Some(i) = unix_socket(self.inode).map_err(diag)? {
            return Ok(i);
        }
        // SAFETY: SIOCGSKNS takes no argument and returns a new fd or -1.
        let ns = unsafe { libc::ioctl(self.raw(), libc::SIOCGSKNS) };
        if ns < 0 {
            return Err(UnixError::Netns {
                pid: self.pid,
                fd: self.fd,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: the kernel just returned `ns` as a new fd nothing else owns.
        let ns = unsafe { OwnedFd::from_raw_fd(ns) };
        let sock = diag_socket_in(ns.as_fd()).map_err(diag)?;
        exact(sock.as_fd(), self.inode)
            .map_err(diag)?
            .ok_or(UnixError::NotFound {
                pid: self.pid,
                fd: self.fd,
                inode: self.inode,
            })
    }
}

/// Classifies a socket fd: a unix socket becomes [`FdKind::UnixSocket`]
/// with its queued data; anything else (other families, listening sockets,
/// fds in flight, out-of-band data, a pending error on a datagram socket
/// with data queued) is [`ProcError::UnsupportedFd`].
pub(crate) fn socket_kind(
    s: &SocketFd<'_>,
    known: &HashMap<u64, UnixInfo>,
) -> Result<FdKind, ProcError> {
    let domain = s.opt(libc::SO_DOMAIN, "SO_DOMAIN")?;
    if domain != libc::AF_UNIX {
        return Err(s.unsupported(format!("{} socket", family_name(domain))));
    }
    let ty = s.opt(libc::SO_TYPE, "SO_TYPE")?;
    let tname = type_name(ty);
    let info = s.info(known)?;
    if info.listening() || s.opt(libc::SO_ACCEPTCONN, "SO_ACCEPTCONN")? != 0 {
        return Err(s.unsupported(format!("unix {tname} socket listening")));
    }
    if let Some(n @ 1..) = s.scm_fds {
        return Err(s.unsupported(format!(
            "unix {tname} socket with {n} fds in flight (SCM_RIGHTS)"
        )));
    }
    let queued = match ty {
        libc::SOCK_STREAM => peek_stream(s, &tname)?,
        libc::SOCK_DGRAM | libc::SOCK_SEQPACKET => peek_datagrams(s, &tname, ty, &info)?,
        _ => return Err(s.unsupported(format!("unix {tname} socket"))),
    };
    Ok(FdKind::UnixSocket {
        inode: s.inode,
        peer_inode: info.peer_inode,
        sock_type: ty,
        name: info.name,
        queued,
        shutdown: info.shutdown,
    })
}

/// Why a peek loop stopped early.
enum Refused {
    /// `MSG_CTRUNC`: control data (fds in flight, ...) pdump cannot keep.
    ControlData,
}

/// Saves `SO_PEEK_OFF`, sets it to 0; [`PeekOff::restore`] (or drop) sets
/// the saved value back.
struct PeekOff<'a> {
    s: &'a SocketFd<'a>,
    saved: libc::c_int,
    restored: bool,
}

impl<'a> PeekOff<'a> {
    fn start(s: &'a SocketFd<'a>) -> Result<Self, UnixError> {
        let saved = s.opt(libc::SO_PEEK_OFF, "SO_PEEK_OFF")?;
        set_peek_off(s.raw(), 0).map_err(|source| UnixError::SetPeekOff {
            pid: s.pid,
            fd: s.fd,
            value: 0,
            source,
        })?;
        Ok(PeekOff {
            s,
            saved,
            restored: false,
        })
    }

    fn restore(mut self) -> Result<(), UnixError> {
        self.restored = true;
        set_peek_off(self.s.raw(), self.saved).map_err(|source| UnixError::SetPeekOff {
            pid: self.s.pid,
            fd: self.s.fd,
            value: self.saved,
            source,
        })
    }
}

impl Drop for PeekOff<'_> {
    fn drop(&mut self) {
        if !self.restored {
            let _ = set_peek_off(self.s.raw(), self.saved);
        }
    }
}

/// A control buffer for the peeks: none, unless the socket receives
/// credentials (`SO_PASSCRED`), which a missing buffer would turn into
/// `MSG_CTRUNC`; then room for exactly one `SCM_CREDENTIALS`, so that fds
/// in flight and pidfds still find no room and are never installed here.
fn control_buffer(s: &SocketFd<'_>) -> Result<Option<[u64; 4]>, UnixError> {
    // CMSG_SPACE(sizeof(struct ucred)) = 16 + 16.
    const _: () = assert!(size_of::<[u64; 4]>() == 32 && size_of::<libc::ucred>() == 12);
    Ok((s.opt(libc::SO_PASSCRED, "SO_PASSCRED")? != 0).then_some([0u64; 4]))
}

/// Whether `SO_PASSPIDFD` is on (it cannot be on before Linux 6.5).
fn passes_pidfd(s: &SocketFd<'_>) -> Result<bool, UnixError> {
    match getsockopt_int(s.raw(), SO_PASSPIDFD) {
        Ok(v) => Ok(v != 0),
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(false),
        Err(source) => Err(UnixError::GetSockOpt {
            pid: s.pid,
            fd: s.fd,
            opt: "SO_PASSPIDFD",
            source,
        }),
    }
}

fn refused(s: &SocketFd<'_>, tname: &str, why: Refused) -> Result<ProcError, UnixError> {
    Ok(match why {
        Refused::ControlData if passes_pidfd(s)? => s.unsupported(format!(
            "unix {tname} socket with SO_PASSPIDFD and data queued"
        )),
        Refused::ControlData => s.unsupported(format!(
            "unix {tname} socket with control messages queued (SCM_RIGHTS, ...)"
        )),
    })
}

/// The bytes queued on a stream socket, as one entry (none if empty).
fn peek_stream(s: &SocketFd<'_>, tname: &str) -> Result<Vec<Vec<u8>>, ProcError> {
    let inq = s.inq()?;
    if inq == 0 {
        return Ok(Vec::new());
    }
    if inq as u64 > MAX_SOCKET_QUEUE {
        return Err(UnixError::QueueTooLarge {
            pid: s.pid,
            fd: s.fd,
            limit: MAX_SOCKET_QUEUE,
        }
        .into());
    }
    // An out-of-band byte: `MSG_OOB | MSG_PEEK` returns it without taking
    // it, or EINVAL when there is none (or SO_OOBINLINE is on, and it
    // reads inline).
    let mut one = [0u8; 1];
    match recv_into(
        s.raw(),
        &mut one,
        libc::MSG_OOB | libc::MSG_PEEK | libc::MSG_DONTWAIT,
        None,
    ) {
        Ok(_) => return Err(s.unsupported(format!("unix {tname} socket with out-of-band data"))),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {}
        Err(e) => return Err(s.peek_err(e).into()),
    }

    let mut control = control_buffer(s)?;
    let mut buf = vec![0u8; inq];
    let mut got = 0;
    let guard = PeekOff::start(s)?;
    let walk = (|| {
        // Only while bytes remain past the offset: a peek that finds the
        // queue empty would take the socket's pending error.
        while got < inq {
            let (n, flags) = recv_into(
                s.raw(),
                &mut buf[got..],
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
                control.as_mut().map(|c| &mut c[..]),
            )
            .map_err(|e| s.peek_err(e))?;
            if flags & libc::MSG_CTRUNC != 0 {
                return Ok(Some(Refused::ControlData));
            }
            if n == 0 {
                break;
            }
            got += n;
        }
        Ok::<_, UnixError>(None)
    })();
    guard.restore()?;
    if let Some(why) = walk? {
        return Err(refused(s, tname, why)?);
    }
    if got != inq {
        return Err(UnixError::QueueChanged {
            pid: s.pid,
            fd: s.fd,
            expected: inq,
            got,
        }
        .into());
    }
    Ok(vec![buf])
}

/// The datagrams (or seqpackets) queued on a socket, one entry each.
fn peek_datagrams(
    s: &SocketFd<'_>,
    tname: &str,
    ty: libc::c_int,
    info: &UnixInfo,
) -> Result<Vec<Vec<u8>>, ProcError> {
    let seqpacket = ty == libc::SOCK_SEQPACKET;
    let ev = s.poll(libc::POLLIN | libc::POLLRDHUP)?;
    // POLLIN: something queued, or receiving shut down.
    if ev & libc::POLLIN == 0 || (seqpacket && info.state != TCP_ESTABLISHED) {
        return Ok(Vec::new());
    }
    if ev & libc::POLLERR != 0 {
        // Any datagram receive, a peek too, would take the error first.
        return Err(s.unsupported(format!("unix {tname} socket with a pending error")));
    }
    let rcv_shutdown = ev & libc::POLLRDHUP != 0;
    // A seqpacket socket whose receiving is shut down answers 0 (EOF) when
    // the queue is exhausted, like a zero-length packet: SIOCINQ (all the
    // queued bytes) tells the two apart, except for zero-length packets at
    // the very end of such a queue, which are not seen.
    let total = if seqpacket && rcv_shutdown {
        s.inq()?
    } else {
        0
    };

    let mut control = control_buffer(s)?;
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut bytes = 0usize;
    let guard = PeekOff::start(s)?;
    let walk = (|| {
        let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_TRUNC;
        loop {
            // The next datagram's length (MSG_TRUNC, empty buffer): the
            // peek offset moves by the 0 bytes copied.
            let (len, f) = match recv_into(
                s.raw(),
                &mut [],
                flags,
                control.as_mut().map(|c| &mut c[..]),
            ) {
                Ok(r) => r,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ENOTCONN)) => break,
                Err(e) => return Err(s.peek_err(e)),
            };
            if f & libc::MSG_CTRUNC != 0 {
                return Ok(Some(Refused::ControlData));
            }
            if len == 0 {
                if seqpacket && rcv_shutdown && bytes >= total {
                    break; // EOF
                }
                // A zero-length datagram: peeking it marked it, the next
                // peek at this offset goes past it.
                out.push(Vec::new());
                continue;
            }
            bytes += len;
            if bytes as u64 > MAX_SOCKET_QUEUE {
                return Err(UnixError::QueueTooLarge {
                    pid: s.pid,
                    fd: s.fd,
                    limit: MAX_SOCKET_QUEUE,
                });
            }
            let mut data = vec![0u8; len];
            let (n, f) = recv_into(
                s.raw(),
                &mut data,
                flags,
                control.as_mut().map(|c| &mut c[..]),
            )
            .map_err(|e| s.peek_err(e))?;
            if f & libc::MSG_CTRUNC != 0 {
                return Ok(Some(Refused::ControlData));
            }
            if n != len {
                return Err(UnixError::QueueChanged {
                    pid: s.pid,
                    fd: s.fd,
                    expected: len,
                    got: n,
                });
            }
            out.push(data);
        }
        Ok(None)
    })();
    guard.restore()?;
    if let Some(why) = walk? {
        return Err(refused(s, tname, why)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fdshare::family::{Family, Step};
    use crate::image::data::MemSink;
    use crate::procfs::{fds, fds_with};

    fn inode_of(fd: i32) -> u64 {
        // SAFETY: a zeroed stat is a valid out buffer.
        let mut st: libc::stat = unsafe { zeroed() };
        // SAFETY: fstat on our own fd with a valid out pointer.
        assert_eq!(unsafe { libc::fstat(fd, &mut st) }, 0);
        st.st_ino
    }

    #[test]
    fn diag_reports_pairs_names_and_shutdown() {
        let mut sv = [0; 2];
        // SAFETY: `sv` has room for two fds.
        let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sv.as_mut_ptr()) };
        assert_eq!(r, 0);
        // SAFETY: plain syscalls on our own fds.
        unsafe {
            libc::write(sv[0], b"abc".as_ptr().cast(), 3);
            libc::shutdown(sv[0], libc::SHUT_WR);
        }
        let (a, b) = (inode_of(sv[0]), inode_of(sv[1]));
        let all = unix_sockets().unwrap();
        let (ia, ib) = (&all[&a], &all[&b]);
        assert_eq!((ia.peer_inode, ib.peer_inode), (b, a));
        assert_eq!(
            (ia.sock_type, ia.state),
            (libc::SOCK_STREAM, TCP_ESTABLISHED)
        );
        assert_eq!((ia.shutdown, ib.shutdown), (SEND_SHUTDOWN, RCV_SHUTDOWN));
        assert_eq!(ib.rqueue, 3);
        assert!(ia.name.is_empty() && ia.vfs.is_none());
        assert_eq!(unix_socket(b).unwrap().as_ref(), Some(ib));
        assert_eq!(unix_socket(u64::from(u32::MAX) + 5).unwrap(), None);
        // SAFETY: closing our own fds.
        unsafe {
            libc::close(sv[0]);
            libc::close(sv[1]);
        }
    }

    /// Binds `fd` to `name` (`sun_path` bytes, abstract if starting with NUL).
    fn bind(fd: i32, name: &[u8]) -> i32 {
        // SAFETY: a zeroed sockaddr_un is valid.
        let mut sa: libc::sockaddr_un = unsafe { zeroed() };
        sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in sa.sun_path.iter_mut().zip(name) {
            *d = *s as libc::c_char;
        }
        let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + name.len();
        // SAFETY: `sa` is valid for `len` bytes.
        unsafe {
            libc::bind(
                fd,
                (&sa as *const libc::sockaddr_un).cast(),
                len as libc::socklen_t,
            )
        }
    }

    #[test]
    fn names_seqpackets_and_shutdown_survive_the_dump() {
        let dir = std::env::temp_dir().join(format!("pdump-unix-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sock");
        let path_bytes = path.to_str().unwrap().as_bytes().to_vec();
        let mut abstract_name = b"\0pdump-test-".to_vec();
        abstract_name.extend_from_slice(std::process::id().to_string().as_bytes());

        let fam = Family::spawn(false, |step| {
            let mut bad = 0;
            // SAFETY: raw syscalls on this (forked) process's own fds, with
            // buffers on its stack and names made before fork.
            unsafe {
                match step {
                    Step::Parent => {
                        let d = libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM, 0);
                        bind(d, &path_bytes);
                        libc::dup2(d, 10);
                        let a = libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM, 0);
                        bind(a, &abstract_name);
                        libc::dup2(a, 11);
                        let mut sv = [0; 2];
                        libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, sv.as_mut_ptr());
                        libc::dup2(sv[0], 12);
                        libc::dup2(sv[1], 13);
                        for m in [&b"ab"[..], b"", b"cde"] {
                            libc::send(12, m.as_ptr().cast(), m.len(), 0);
                        }
                        libc::shutdown(12, libc::SHUT_WR);
                        for fd in [d, a, sv[0], sv[1]] {
                            libc::close(fd);
                        }
                    }
                    Step::CheckParent => {
                        let mut buf = [0u8; 8];
                        for (i, want) in [&b"ab"[..], b"", b"cde"].into_iter().enumerate() {
                            let n = libc::recv(13, buf.as_mut_ptr().cast(), 8, libc::MSG_DONTWAIT);
                            if n != want.len() as isize || &buf[..want.len()] != want {
                                bad |= 1 << i;
                            }
                        }
                        // Then EOF (receiving is shut down).
                        if libc::recv(13, buf.as_mut_ptr().cast(), 8, libc::MSG_DONTWAIT) != 0 {
                            bad |= 8;
                        }
                        if getsockopt_int(13, libc::SO_PEEK_OFF).ok() != Some(-1) {
                            bad |= 16;
                        }
                    }
                    _ => {}
                }
            }
            bad
        });
        let entries = fds(fam.parent, &mut MemSink::default()).unwrap();
        let by = |fd: i32| &entries.iter().find(|e| e.fd == fd).unwrap().kind;
        let FdKind::UnixSocket {
            name, sock_type, ..
        } = by(10)
        else {
            panic!("{:?}", by(10))
        };
        assert_eq!((name, *sock_type), (&path_bytes, libc::SOCK_DGRAM));
        let FdKind::UnixSocket { name, .. } = by(11) else {
            panic!("{:?}", by(11))
        };
        assert_eq!(name, &abstract_name);
        let (
            FdKind::UnixSocket {
                inode: i12,
                peer_inode: p12,
                shutdown: s12,
                queued: q12,
                ..
            },
            FdKind::UnixSocket {
                inode: i13,
                peer_inode: p13,
                shutdown: s13,
                queued: q13,
                sock_type,
                ..
            },
        ) = (by(12), by(13))
        else {
            panic!("{entries:?}")
        };
        assert_eq!((*p12, *p13), (*i13, *i12));
        assert_eq!((*s12, *s13), (SEND_SHUTDOWN, RCV_SHUTDOWN));
        assert_eq!(*sock_type, libc::SOCK_SEQPACKET);
        assert!(q12.is_empty());
        assert_eq!(q13, &vec![b"ab".to_vec(), vec![], b"cde".to_vec()]);
        assert_eq!(fam.finish(), (0, 0));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn refused_sockets_name_fd_and_kind() {
        type Setup = fn() -> i32;
        let cases: [(Setup, &str); 5] = [
            (
                || {
                    // SAFETY: socket takes integers.
                    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) }
                },
                "inet socket",
            ),
            (
                || {
                    // SAFETY: socket takes integers.
                    unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0) }
                },
                "netlink socket",
            ),
            (
                || {
                    // SAFETY: socket/listen take integers; bind gets a valid address.
                    unsafe {
                        let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                        // An autobind name: bind with just the family.
                        bind(s, b"");
                        libc::listen(s, 4);
                        s
                    }
                },
                "unix stream socket listening",
            ),
            (
                || {
                    let mut sv = [0; 2];
                    // SAFETY: socketpair fills `sv`; sendmsg gets a valid
                    // header with one SCM_RIGHTS fd in an aligned buffer.
                    unsafe {
                        libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sv.as_mut_ptr());
                        let mut ctl = [0u64; 3];
                        let mut iov = libc::iovec {
                            iov_base: b"x".as_ptr() as *mut _,
                            iov_len: 1,
                        };
                        let mut msg: libc::msghdr = zeroed();
                        msg.msg_iov = &mut iov;
                        msg.msg_iovlen = 1;
                        msg.msg_control = ctl.as_mut_ptr().cast();
                        msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
                        let c = libc::CMSG_FIRSTHDR(&msg);
                        (*c).cmsg_level = libc::SOL_SOCKET;
                        (*c).cmsg_type = libc::SCM_RIGHTS;
                        (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
                        *libc::CMSG_DATA(c).cast::<i32>() = 0;
                        libc::sendmsg(sv[0], &msg, 0);
                        sv[1]
                    }
                },
                "fds in flight (SCM_RIGHTS)",
            ),
            (
                || {
                    let mut sv = [0; 2];
                    // SAFETY: socketpair fills `sv`; send reads a static buffer.
                    unsafe {
                        libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sv.as_mut_ptr());
                        // "a" in band, "b" out of band.
                        libc::send(sv[0], b"ab".as_ptr().cast(), 2, libc::MSG_OOB);
                    }
                    sv[1]
                },
                "unix stream socket with out-of-band data",
            ),
        ];
        for (setup, kind) in cases {
            let fam = Family::spawn(false, |step| {
                if step == Step::Parent {
                    let fd = setup();
                    // SAFETY: moving our own fd.
                    unsafe {
                        libc::dup2(fd, 30);
                        libc::close(fd);
                    }
                }
                0
            });
            let err = fds(fam.parent, &mut MemSink::default()).unwrap_err();
            let msg = err.to_string();
            let ProcError::UnsupportedFd { pid, fd, kind: k } = &err else {
                panic!("{err:?}")
            };
            assert_eq!((*pid, *fd), (fam.parent, 30));
            assert!(
                k.contains(kind) && k.contains("socket:["),
                "{k:?} vs {kind:?}"
            );
            assert!(msg.contains("fd 30") && msg.contains(kind), "{msg}");
        }
    }

    #[test]
    fn pending_error_refuses_dgram_and_is_kept() {
        let fam = Family::spawn(false, |step| {
            let mut bad = 0;
            // SAFETY: raw syscalls on our own fds with stack buffers.
            unsafe {
                match step {
                    Step::Parent => {
                        let mut sv = [0; 2];
                        libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM, 0, sv.as_mut_ptr());
                        libc::send(sv[0], b"x".as_ptr().cast(), 1, 0);
                        libc::send(sv[1], b"y".as_ptr().cast(), 1, 0);
                        // Disconnecting sv[0] (with data queued) from its
                        // mutual peer sets ECONNRESET on sv[1], whose
                        // queue keeps "x".
                        let mut sa: libc::sockaddr = zeroed();
                        sa.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
                        libc::connect(sv[0], &sa, size_of::<libc::sockaddr>() as u32);
                        libc::dup2(sv[1], 30);
                        libc::close(sv[1]);
                    }
                    Step::CheckParent => {
                        let mut b = [0u8; 4];
                        let n = libc::recv(30, b.as_mut_ptr().cast(), 4, libc::MSG_DONTWAIT);
                        if n != -1 || *libc::__errno_location() != libc::ECONNRESET {
                            bad |= 1;
                        }
                        let n = libc::recv(30, b.as_mut_ptr().cast(), 4, libc::MSG_DONTWAIT);
                        if n != 1 || b[0] != b'x' {
                            bad |= 2;
                        }
                    }
                    _ => {}
                }
            }
            bad
        });
        match fds(fam.parent, &mut MemSink::default()) {
            Err(ProcError::UnsupportedFd { fd: 30, kind, .. }) => {
                assert!(kind.contains("pending error"), "{kind}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(fam.finish(), (0, 0));
    }

    #[test]
    fn credential_passing_sockets_are_peeked() {
        let fam = Family::spawn(false, |step| {
            let mut bad = 0;
            let mut buf = [0u8; 16];
            let one: libc::c_int = 1;
            // SAFETY: raw syscalls on our own fds with stack buffers.
            unsafe {
                match step {
                    Step::Parent => {
                        for (ty, at) in [(libc::SOCK_STREAM, 30), (libc::SOCK_DGRAM, 32)] {
                            let mut sv = [0; 2];
                            libc::socketpair(libc::AF_UNIX, ty, 0, sv.as_mut_ptr());
                            libc::setsockopt(
                                sv[1],
                                libc::SOL_SOCKET,
                                libc::SO_PASSCRED,
                                (&one as *const libc::c_int).cast(),
                                4,
                            );
                            libc::send(sv[0], b"cred".as_ptr().cast(), 4, 0);
                            libc::send(sv[0], b"ential".as_ptr().cast(), 6, 0);
                            libc::dup2(sv[0], at);
                            libc::dup2(sv[1], at + 1);
                            libc::close(sv[0]);
                            libc::close(sv[1]);
                        }
                    }
                    Step::CheckParent => {
                        let n = libc::recv(31, buf.as_mut_ptr().cast(), 16, libc::MSG_DONTWAIT);
                        if n != 10 || &buf[..10] != b"credential" {
                            bad |= 1;
                        }
                        for (i, want) in [&b"cred"[..], b"ential"].into_iter().enumerate() {
                            let n = libc::recv(33, buf.as_mut_ptr().cast(), 16, libc::MSG_DONTWAIT);
                            if n != want.len() as isize || &buf[..want.len()] != want {
                                bad |= 2 << i;
                            }
                        }
                    }
                    _ => {}
                }
            }
            bad
        });
        let entries = fds(fam.parent, &mut MemSink::default()).unwrap();
        let queued = |fd: i32| match &entries.iter().find(|e| e.fd == fd).unwrap().kind {
            FdKind::UnixSocket { queued, .. } => queued.clone(),
            k => panic!("{k:?}"),
        };
        assert_eq!(queued(31), vec![b"credential".to_vec()]);
        assert_eq!(queued(33), vec![b"cred".to_vec(), b"ential".to_vec()]);
        assert_eq!(fam.finish(), (0, 0));
    }

    #[test]
    fn sockets_of_another_netns_and_the_shared_map_agree() {
        let fam = Family::spawn(false, |step| {
            if step == Step::Parent {
                let mut sv = [0; 2];
                // SAFETY: raw syscalls; `sv` has room for two fds.
                unsafe {
                    if libc::unshare(libc::CLONE_NEWNET) != 0 {
                        return 1;
                    }
                    libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sv.as_mut_ptr());
                    libc::write(sv[0], b"in-ns".as_ptr().cast(), 5);
                    libc::dup2(sv[0], 30);
                    libc::dup2(sv[1], 31);
                }
            }
            0
        });
        let known = unix_sockets().unwrap();
        let alone = fds(fam.parent, &mut MemSink::default()).unwrap();
        let with = fds_with(fam.parent, &known, &mut MemSink::default()).unwrap();
        assert_eq!(alone, with);
        let e31 = alone.iter().find(|e| e.fd == 31).unwrap();
        let FdKind::UnixSocket { inode, queued, .. } = &e31.kind else {
            panic!("{e31:?}")
        };
        assert!(!known.contains_key(inode), "another namespace's socket");
        assert_eq!(queued, &vec![b"in-ns".to_vec()]);
        assert_eq!(fam.finish(), (0, 0));
    }
}
