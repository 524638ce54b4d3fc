//! `pdump check`: which kernel features pdump uses are present.
//!
//! Every probe exercises the feature (a real `PTRACE_SEIZE` of a forked
//! child, a real `PAGEMAP_SCAN`, ...) instead of guessing from the kernel
//! version or config, so the answer holds for this kernel, this
//! configuration and these privileges. Probes leave nothing behind: forked
//! children are killed and reaped, fds closed, mappings unmapped.

use std::ffi::CStr;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use serde::Serialize;

use crate::procfs::{self, Pagemap, PidFd};

/// One probed kernel feature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Feature {
    /// What was probed (the kernel's name for it).
    pub name: String,
    /// Whether it works here.
    pub present: bool,
    /// What the probe saw: a size, a limit, or the error.
    pub detail: String,
}

impl Feature {
    fn new(name: &str, present: bool, detail: impl Into<String>) -> Self {
        Feature {
            name: name.to_owned(),
            present,
            detail: detail.into(),
        }
    }

    fn from_result(name: &str, r: io::Result<String>) -> Self {
        match r {
            Ok(detail) => Feature::new(name, true, detail),
            Err(e) => Feature::new(name, false, e.to_string()),
        }
    }
}

/// Probes every kernel feature pdump uses, in a fixed order.
pub fn kernel_features() -> Vec<Feature> {
    let mut out = ptrace_features();
    out.push(Feature::from_result("pidfd_open", probe_pidfd_open()));
    out.push(Feature::from_result("pidfd_getfd", probe_pidfd_getfd()));
    out.push(Feature::from_result(
        "process_vm_readv",
        probe_process_vm_readv(),
    ));
    out.push(Feature::from_result("vmsplice+splice", probe_vmsplice()));
    out.push(Feature::from_result("F_SETPIPE_SZ", probe_pipe_size()));
    out.push(Feature::from_result("memfd_create", probe_memfd()));
    out.push(Feature::from_result("PAGEMAP_SCAN", probe_pagemap_scan()));
    out.push(Feature::from_result("PROCMAP_QUERY", probe_procmap_query()));
    out.push(Feature::from_result("kcmp", probe_kcmp()));
    out.push(probe_clone3());
    out.push(Feature::from_result("userfaultfd", probe_userfaultfd()));
    out.push(Feature::from_result("soft-dirty", probe_soft_dirty()));
    out.push(Feature::from_result("map_files", probe_map_files()));
    out.push(Feature::from_result("task children", probe_task_children()));
    out.push(probe_checkpoint_restore());
    out.push(Feature::from_result("time namespace", probe_time_ns()));
    out
}

/// A table of the features for `pdump check`.
pub fn render(features: &[Feature]) -> String {
    let w = features
        .iter()
        .map(|f| f.name.len())
        .chain(std::iter::once("FEATURE".len()))
        .max()
        .unwrap_or(0);
    let mut s = format!("{:<w$}  PRESENT  DETAIL\n", "FEATURE");
    for f in features {
        let yes = if f.present { "yes" } else { "no" };
        s.push_str(format!("{:<w$}  {yes:<7}  {}", f.name, f.detail).trim_end());
        s.push('\n');
    }
    let missing = features.iter().filter(|f| !f.present).count();
    s.push_str(&format!(
        "{} of {} features present\n",
        features.len() - missing,
        features.len()
    ));
    s
}

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

/// Wraps a raw fd returned by a syscall, or the errno.
fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(last_err());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned `fd` as a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(last_err());
    }
    Ok((owned(fds[0].into())?, owned(fds[1].into())?))
}

fn memfd(name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated; memfd_create returns a new fd or -1.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    owned(fd.into())
}

/// A forked child that is killed and reaped on drop (with `__WALL`, so a
/// traced child is reaped too).
struct Child(libc::pid_t);

impl Child {
    /// Forks; the child runs `f` and `_exit`s with its result. `f` runs in a
    /// copy of a possibly multithreaded process, so it must only make
    /// async-signal-safe calls (raw syscalls; no allocation, no locks).
    fn fork(f: impl FnOnce() -> i32) -> io::Result<Child> {
        // SAFETY: fork has no memory-safety preconditions; the child only
        // runs `f`, which is async-signal-safe by this function's contract,
        // then _exit.
        match unsafe { libc::fork() } {
            -1 => Err(last_err()),
            0 => {
                let code = f();
                // SAFETY: _exit ends the child without running Rust or libc teardown.
                unsafe { libc::_exit(code) }
            }
            pid => Ok(Child(pid)),
        }
    }

    /// Waits for the child to exit; its exit code or `128 + signal`.
    fn wait(self) -> io::Result<i32> {
        let mut status = 0;
        // SAFETY: `status` is a valid out pointer.
        let r = unsafe { libc::waitpid(self.0, &mut status, libc::__WALL) };
        let res = if r == self.0 {
            Ok(if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            })
        } else {
            Err(last_err())
        };
        std::mem::forget(self);
        res
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let mut status = 0;
        // SAFETY: kill and waitpid on our own child; `status` is a valid out pointer.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
            libc::waitpid(self.0, &mut status, libc::__WALL);
        }
    }
}

/// In a forked child: sleeps until killed.
fn park() -> ! {
    loop {
        // SAFETY: pause has no preconditions.
        unsafe { libc::pause() };
    }
}

fn ptrace(
    req: libc::c_uint,
    pid: libc::pid_t,
    addr: usize,
    data: usize,
) -> io::Result<libc::c_long> {
    // SAFETY: every caller passes, for `req`, an `addr`/`data` pair that is
    // either an integer or points at a live buffer of the size the request
    // writes.
    let r = unsafe {
        libc::ptrace(
            req,
            pid,
            addr as *mut libc::c_void,
            data as *mut libc::c_void,
        )
    };
    if r < 0 {
        Err(last_err())
    } else {
        Ok(r)
    }
}

/// The extended register set probed with `PTRACE_GETREGSET`.
#[cfg(target_arch = "x86_64")]
const XSTATE: (&str, usize) = ("PTRACE_GETREGSET NT_X86_XSTATE", 0x202);
#[cfg(not(target_arch = "x86_64"))]
const XSTATE: (&str, usize) = ("PTRACE_GETREGSET NT_PRFPREG", 2);

const PTRACE_EVENT_STOP: i32 = 128;

/// Seizes a forked child and probes the ptrace requests pdump uses on it.
fn ptrace_features() -> Vec<Feature> {
    const SEIZE: &str = "PTRACE_SEIZE+INTERRUPT";
    const RSEQ: &str = "PTRACE_GET_RSEQ_CONFIGURATION";
    const PEEK: &str = "PTRACE_PEEKSIGINFO";
    let all_absent = |why: String| {
        [SEIZE, XSTATE.0, RSEQ, PEEK]
            .iter()
            .map(|n| Feature::new(n, false, why.clone()))
            .collect()
    };
    let child = match Child::fork(|| park()) {
        Ok(c) => c,
        Err(e) => return all_absent(format!("fork: {e}")),
    };
    let pid = child.0;
    if let Err(e) = ptrace(libc::PTRACE_SEIZE, pid, 0, 0) {
        return all_absent(format!("PTRACE_SEIZE: {e}"));
    }
    if let Err(e) = ptrace(libc::PTRACE_INTERRUPT, pid, 0, 0) {
        return all_absent(format!("PTRACE_INTERRUPT: {e}"));
    }
    let mut status = 0;
    // SAFETY: `status` is a valid out pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
    if r != pid {
        return all_absent(format!("waitpid after PTRACE_INTERRUPT: {}", last_err()));
    }
    if !libc::WIFSTOPPED(status) || status >> 16 != PTRACE_EVENT_STOP {
        return all_absent(format!(
            "PTRACE_INTERRUPT gave wait status {status:#x}, not PTRACE_EVENT_STOP"
        ));
    }
    let mut out = vec![Feature::new(SEIZE, true, "child seized and stopped")];

    let mut buf = vec![0u8; 64 * 1024];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    out.push(Feature::from_result(
        XSTATE.0,
        ptrace(
            libc::PTRACE_GETREGSET,
            pid,
            XSTATE.1,
            &mut iov as *mut libc::iovec as usize,
        )
        .map(|_| format!("{} bytes", iov.iov_len)),
    ));

    // struct ptrace_rseq_configuration { u64 rseq_abi_pointer; u32 rseq_abi_size, signature, flags, pad; }
    let mut rseq = [0u64; 4];
    out.push(Feature::from_result(
        RSEQ,
        ptrace(
            libc::PTRACE_GET_RSEQ_CONFIGURATION,
            pid,
            std::mem::size_of_val(&rseq),
            rseq.as_mut_ptr() as usize,
        )
        .map(|_| {
            if rseq[0] == 0 {
                "works; no rseq area registered".to_owned()
            } else {
                format!(
                    "rseq area at {:#x}, {} bytes",
                    rseq[0],
                    rseq[1] & 0xffff_ffff
                )
            }
        }),
    ));

    // struct ptrace_peeksiginfo_args { u64 off; u32 flags; s32 nr; }
    let args: [u64; 2] = [0, 1u64 << 32];
    let mut si = [0u8; 128];
    out.push(Feature::from_result(
        PEEK,
        ptrace(
            libc::PTRACE_PEEKSIGINFO,
            pid,
            args.as_ptr() as usize,
            si.as_mut_ptr() as usize,
        )
        .map(|n| format!("works; {n} signal(s) pending in the probe child")),
    ));
    drop(child);
    out
}

fn probe_pidfd_open() -> io::Result<String> {
    PidFd::open(std::process::id() as i32)?;
    Ok("works".into())
}

fn probe_pidfd_getfd() -> io::Result<String> {
    let p = PidFd::open(std::process::id() as i32)?;
    p.get_fd(p.as_raw_fd())?;
    Ok("works".into())
}

fn probe_process_vm_readv() -> io::Result<String> {
    let src: u64 = 0x5eed_f00d_dead_beef;
    let mut dst: u64 = 0;
    let local = libc::iovec {
        iov_base: (&mut dst as *mut u64).cast(),
        iov_len: 8,
    };
    let remote = libc::iovec {
        iov_base: (&src as *const u64).cast_mut().cast(),
        iov_len: 8,
    };
    // SAFETY: both iovecs describe 8 live bytes of this process; the
    // kernel writes only into `dst`.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(last_err());
    }
    if n != 8 || dst != src {
        return Err(io::Error::other(format!("read {n} bytes, value {dst:#x}")));
    }
    Ok("works".into())
}

fn probe_vmsplice() -> io::Result<String> {
    let (r, w) = pipe()?;
    let page = procfs::page_size() as usize;
    let data: Vec<u8> = (0..page).map(|i| (i % 251) as u8).collect();
    let iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: `iov` describes `data`, which outlives the pipe's use of it
    // (it is spliced out below before `data` is dropped).
    let n = unsafe { libc::vmsplice(w.as_raw_fd(), &iov, 1, 0) };
    if n < 0 {
        return Err(io::Error::other(format!("vmsplice: {}", last_err())));
    }
    let m = memfd(c"pdump-check-splice")?;
    // SAFETY: splice between two fds we own, null offsets (use file positions).
    let s = unsafe {
        libc::splice(
            r.as_raw_fd(),
            std::ptr::null_mut(),
            m.as_raw_fd(),
            std::ptr::null_mut(),
            n as usize,
            0,
        )
    };
    if s < 0 {
        return Err(io::Error::other(format!("splice: {}", last_err())));
    }
    let f = fs::File::from(m);
    let mut back = vec![0u8; page];
    f.read_exact_at(&mut back, 0)?;
    if back != data {
        return Err(io::Error::other("spliced data differs"));
    }
    Ok(format!("{s} bytes through a pipe"))
}

fn probe_pipe_size() -> io::Result<String> {
    let max: i32 = fs::read_to_string("/proc/sys/fs/pipe-max-size")?
        .trim()
        .parse()
        .map_err(|_| io::Error::other("unreadable /proc/sys/fs/pipe-max-size"))?;
    let (_r, w) = pipe()?;
    // SAFETY: F_SETPIPE_SZ takes an int.
    let got = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, max) };
    if got < 0 {
        return Err(io::Error::other(format!(
            "F_SETPIPE_SZ {max}: {}",
            last_err()
        )));
    }
    Ok(format!("pipe-max-size {max} bytes, set {got}"))
}

fn probe_memfd() -> io::Result<String> {
    let m = memfd(c"pdump-check")?;
    // SAFETY: ftruncate and fcntl on an fd we own.
    let seals = unsafe {
        if libc::ftruncate(m.as_raw_fd(), 4096) < 0 {
            return Err(last_err());
        }
        libc::fcntl(m.as_raw_fd(), libc::F_GET_SEALS)
    };
    if seals < 0 {
        return Err(io::Error::other(format!("F_GET_SEALS: {}", last_err())));
    }
    Ok("works, with sealing".into())
}

fn probe_pagemap_scan() -> io::Result<String> {
    let pm = Pagemap::open(std::process::id() as i32).map_err(io::Error::other)?;
    let local = 0u64;
    let addr = std::hint::black_box(&local) as *const u64 as u64;
    let runs = pm
        .present_ranges_ioctl(addr, addr + 1)
        .map_err(|e| match e {
            procfs::ProcError::PagemapScan { source, .. } => source,
            e => io::Error::other(e),
        })?;
    if runs.is_empty() {
        return Err(io::Error::other(
            "a touched stack page was not reported present",
        ));
    }
    Ok("works".into())
}

/// `struct procmap_query` (uapi `linux/fs.h`, Linux 6.11).
#[repr(C)]
#[derive(Default)]
struct ProcmapQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}

/// `_IOWR('f', 17, struct procmap_query)`.
const PROCMAP_QUERY: u64 =
    (3 << 30) | ((std::mem::size_of::<ProcmapQuery>() as u64) << 16) | ((b'f' as u64) << 8) | 17;
const _: () = assert!(PROCMAP_QUERY == 0xC068_6611);

fn probe_procmap_query() -> io::Result<String> {
    let maps = fs::File::open("/proc/self/maps")?;
    let local = 0u64;
    let addr = std::hint::black_box(&local) as *const u64 as u64;
    let mut q = ProcmapQuery {
        size: std::mem::size_of::<ProcmapQuery>() as u64,
        query_addr: addr,
        ..Default::default()
    };
    // SAFETY: `q` is a valid procmap_query with no name or build-id buffers;
    // the kernel writes only into `q`.
    let r = unsafe {
        libc::ioctl(
            maps.as_raw_fd(),
            PROCMAP_QUERY as libc::Ioctl,
            &mut q as *mut ProcmapQuery,
        )
    };
    if r < 0 {
        return Err(last_err());
    }
    if !(q.vma_start..q.vma_end).contains(&addr) {
        return Err(io::Error::other(
            "returned a mapping that does not hold the address",
        ));
    }
    Ok(format!(
        "stack mapping {:#x}-{:#x} found",
        q.vma_start, q.vma_end
    ))
}

fn probe_kcmp() -> io::Result<String> {
    const KCMP_FILE: libc::c_long = 0;
    let (r, w) = pipe()?;
    // SAFETY: dup of an fd we own.
    let d = owned(unsafe { libc::dup(r.as_raw_fd()) }.into())?;
    let me = libc::c_long::from(std::process::id() as i32);
    let kcmp = |a: &OwnedFd, b: &OwnedFd| {
        // SAFETY: kcmp takes only integers.
        unsafe {
            libc::syscall(
                libc::SYS_kcmp,
                me,
                me,
                KCMP_FILE,
                a.as_raw_fd() as libc::c_long,
                b.as_raw_fd() as libc::c_long,
            )
        }
    };
    let same = kcmp(&r, &d);
    if same < 0 {
        return Err(last_err());
    }
    let other = kcmp(&r, &w);
    if same != 0 || other == 0 {
        return Err(io::Error::other(format!(
            "KCMP_FILE answered {same} for a dup and {other} for another file"
        )));
    }
    Ok("works".into())
}

/// clone3 and its `set_tid` (Linux 5.5), probed without creating a task:
/// `set_tid_size` above the 32 pid-namespace levels is refused with
/// `EINVAL` by a kernel that knows `set_tid`, with `E2BIG` (unknown
/// non-zero tail of `struct clone_args`) by one that does not, and clone3
/// itself is `ENOSYS` where missing.
fn probe_clone3() -> Feature {
    const NAME: &str = "clone3 set_tid";
    // struct clone_args up to set_tid_size (CLONE_ARGS_SIZE_VER1 = 80 bytes):
    // flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size,
    // tls, set_tid, set_tid_size.
    let mut args = [0u64; 10];
    args[4] = libc::SIGCHLD as u64;
    let dummy = [0i32; 33];
    args[8] = dummy.as_ptr() as u64;
    args[9] = 33;
    // SAFETY: `args` is 80 readable bytes; with set_tid_size > 32 the kernel
    // rejects the call before creating anything, and an older kernel rejects
    // the unknown fields: no task is created either way.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            args.as_ptr(),
            std::mem::size_of_val(&args),
        )
    };
    let err = last_err();
    let ns_last_pid = fs::metadata("/proc/sys/kernel/ns_last_pid").is_ok();
    let ns = if ns_last_pid {
        "ns_last_pid present"
    } else {
        "no ns_last_pid"
    };
    match (r, err.raw_os_error()) {
        (-1, Some(libc::EINVAL)) => Feature::new(NAME, true, format!("clone3 with set_tid; {ns}")),
        (-1, Some(libc::E2BIG)) => {
            Feature::new(NAME, false, format!("clone3 without set_tid; {ns}"))
        }
        (-1, Some(libc::ENOSYS)) => Feature::new(NAME, false, format!("no clone3; {ns}")),
        (-1, _) => Feature::new(NAME, false, format!("clone3: {err}; {ns}")),
        // Cannot happen (see SAFETY); a child would be running our code.
        (0, _) => {
            // SAFETY: we are the impossible child: leave at once.
            unsafe { libc::_exit(0) }
        }
        (pid, _) => {
            drop(Child(pid as libc::pid_t));
            Feature::new(NAME, false, "clone3 accepted an invalid set_tid_size")
        }
    }
}

fn probe_userfaultfd() -> io::Result<String> {
    const UFFD_USER_MODE_ONLY: libc::c_long = 1;
    let flags = libc::c_long::from(libc::O_CLOEXEC | libc::O_NONBLOCK);
    // SAFETY: userfaultfd takes flags and returns a new fd or -1.
    let mut fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY) };
    if fd < 0 && last_err().raw_os_error() == Some(libc::EINVAL) {
        // Before 5.11 there is no UFFD_USER_MODE_ONLY.
        // SAFETY: as above.
        fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    }
    let fd = owned(fd)?;
    // struct uffdio_api { u64 api; u64 features; u64 ioctls; }, UFFDIO_API = _IOWR(0xAA, 0x3F, 24 bytes).
    const UFFDIO_API: u64 = (3 << 30) | (24 << 16) | (0xAA << 8) | 0x3F;
    let mut api = [0xAAu64, 0, 0];
    // SAFETY: `api` is a valid uffdio_api the kernel fills.
    if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as libc::Ioctl, api.as_mut_ptr()) } < 0 {
        return Err(io::Error::other(format!("UFFDIO_API: {}", last_err())));
    }
    Ok(format!("features {:#x}", api[1]))
}

/// Soft-dirty tracking: clear a forked child's soft-dirty bits through
/// `clear_refs`, let it write one page, and look for pagemap bit 55.
fn probe_soft_dirty() -> io::Result<String> {
    const PM_SOFT_DIRTY: u64 = 1 << 55;
    let page = procfs::page_size();
    // SAFETY: a fresh private anonymous page.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            page as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err(last_err());
    }
    struct Unmap(*mut libc::c_void, usize);
    impl Drop for Unmap {
        fn drop(&mut self) {
            // SAFETY: unmapping the page mapped above, no longer used.
            unsafe { libc::munmap(self.0, self.1) };
        }
    }
    let _unmap = Unmap(mem, page as usize);
    let p = mem.cast::<u8>();
    // SAFETY: `p` is the start of the writable page just mapped.
    unsafe { p.write_volatile(1) };

    let (go_r, go_w) = pipe()?;
    let (done_r, done_w) = pipe()?;
    let (gr, dw) = (go_r.as_raw_fd(), done_w.as_raw_fd());
    let child = Child::fork(|| {
        let mut b = 0u8;
        // SAFETY: raw syscalls on inherited fds and the inherited page.
        unsafe {
            if libc::read(gr, (&mut b as *mut u8).cast(), 1) != 1 {
                return 1;
            }
            p.write_volatile(2);
            libc::write(dw, (&b as *const u8).cast(), 1);
        }
        park()
    })?;
    drop(go_r);
    drop(done_w);
    let pid = child.0;
    fs::write(format!("/proc/{pid}/clear_refs"), "4")
        .map_err(|e| io::Error::other(format!("writing 4 to clear_refs: {e}")))?;
    let entry = || -> io::Result<u64> {
        let f = fs::File::open(format!("/proc/{pid}/pagemap"))?;
        let mut e = [0u8; 8];
        f.read_exact_at(&mut e, mem as u64 / page * 8)?;
        Ok(u64::from_ne_bytes(e))
    };
    let cleared = entry()?;
    let b = 1u8;
    // SAFETY: write of one byte from a live local to our pipe.
    unsafe { libc::write(go_w.as_raw_fd(), (&b as *const u8).cast(), 1) };
    let mut back = 0u8;
    // SAFETY: read of one byte into a live local from our pipe.
    if unsafe { libc::read(done_r.as_raw_fd(), (&mut back as *mut u8).cast(), 1) } != 1 {
        return Err(io::Error::other("probe child did not write its page"));
    }
    let written = entry()?;
    drop(child);
    if written & PM_SOFT_DIRTY == 0 {
        return Err(io::Error::other(
            "pagemap bit 55 stays clear after a write (no CONFIG_MEM_SOFT_DIRTY)",
        ));
    }
    if cleared & PM_SOFT_DIRTY != 0 {
        return Err(io::Error::other("clear_refs 4 did not clear bit 55"));
    }
    Ok("cleared by clear_refs, set again by a write".into())
}

fn probe_map_files() -> io::Result<String> {
    let mut n = 0;
    for e in fs::read_dir("/proc/self/map_files")? {
        let e = e?;
        fs::read_link(e.path())?;
        n += 1;
    }
    if n == 0 {
        return Err(io::Error::other("no entries"));
    }
    Ok(format!("{n} file mappings readable"))
}

fn probe_task_children() -> io::Result<String> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    fs::read_to_string(format!("/proc/self/task/{tid}/children"))?;
    Ok("/proc/PID/task/TID/children readable".into())
}

/// CONFIG_CHECKPOINT_RESTORE shows in the files it adds to /proc.
fn probe_checkpoint_restore() -> Feature {
    let files = [
        "/proc/sys/kernel/ns_last_pid",
        "/proc/self/map_files",
        "/proc/self/timers",
    ];
    let missing: Vec<&str> = files
        .iter()
        .copied()
        .filter(|p| fs::metadata(p).is_err())
        .collect();
    if missing.is_empty() {
        Feature::new(
            "CONFIG_CHECKPOINT_RESTORE",
            true,
            "ns_last_pid, map_files and timers present",
        )
    } else {
        Feature::new(
            "CONFIG_CHECKPOINT_RESTORE",
            false,
            format!("missing {}", missing.join(", ")),
        )
    }
}

/// Time namespaces: a forked child unshares one.
fn probe_time_ns() -> io::Result<String> {
    let child = Child::fork(|| {
        // SAFETY: unshare takes flags only; it changes only this child.
        if unsafe { libc::unshare(libc::CLONE_NEWTIME) } == 0 {
            0
        } else {
            // SAFETY: reading this thread's errno.
            unsafe { *libc::__errno_location() }
        }
    })?;
    match child.wait()? {
        0 => Ok("unshare(CLONE_NEWTIME) works".into()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_run_and_render() {
        let f = kernel_features();
        let names: Vec<&str> = f.iter().map(|f| f.name.as_str()).collect();
        for n in [
            "PTRACE_SEIZE+INTERRUPT",
            "pidfd_open",
            "PAGEMAP_SCAN",
            "clone3 set_tid",
            "soft-dirty",
            "time namespace",
        ] {
            assert!(names.contains(&n), "{n} missing from {names:?}");
        }
        for f in &f {
            eprintln!("{:<32} {:<5} {}", f.name, f.present, f.detail);
        }
        // Present on any kernel pdump supports (5.6+ for pidfd_getfd).
        for must in [
            "PTRACE_SEIZE+INTERRUPT",
            "pidfd_open",
            "pidfd_getfd",
            "memfd_create",
            "process_vm_readv",
            "vmsplice+splice",
        ] {
            let x = f.iter().find(|f| f.name == must).unwrap();
            assert!(x.present, "{must}: {}", x.detail);
        }
        let table = render(&f);
        assert!(table.starts_with("FEATURE"));
        assert_eq!(table.lines().count(), f.len() + 2);
        let json = serde_json::to_string(&f).unwrap();
        assert!(json.contains("\"present\""));
    }

    #[test]
    fn render_shape() {
        let t = render(&[
            Feature::new("a", true, "x"),
            Feature::new("long name", false, ""),
        ]);
        assert_eq!(
            t,
            "FEATURE    PRESENT  DETAIL\na          yes      x\nlong name  no\n1 of 2 features present\n"
        );
    }
}
