//! `restore_files`: a dumped victim's fds recreated by `FileTable::open` in
//! this (controller) process and installed in forked children, checked
//! there with raw syscalls, and across children with `kcmp`.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::Stdio;

use pdump::image::model::{FdEntry, FdKind};
use pdump::image::Checkpoint;
use pdump::restore_files::{external_keys, FileOptions, FileTable, FilesError};

use crate::root_or_skip;
use crate::util::{assert_ok, dump_subtree, pdump, tempdir, Victim};

/// What a child checks about one of its fds after `install`.
#[derive(Debug, Default)]
struct Check {
    fd: i32,
    cloexec: bool,
    /// F_GETFL, compared under `flags_mask`.
    flags: i32,
    flags_mask: i32,
    link: Link,
    pos: Option<i64>,
    /// FIONREAD of a pipe or FIFO read end.
    buffered: Option<i32>,
    /// Bytes read (consumed) from the fd.
    read: Option<Vec<u8>>,
    /// Bytes peeked at the head of a socket's queue.
    peek: Option<Vec<u8>>,
    /// The eventfd count read.
    eventfd: Option<u64>,
    /// memfd contents (pread) and seals.
    memfd: Option<(Vec<u8>, i32)>,
}

#[derive(Debug, Default)]
enum Link {
    #[default]
    Any,
    Exact(Vec<u8>),
    /// Starts and ends with these.
    Around(Vec<u8>, Vec<u8>),
    /// Links to what this other fd links to.
    SameAs(i32),
}

/// `/proc/self/fd/N` as a C string in `buf`, without allocating.
fn fd_path(fd: i32, buf: &mut [u8; 32]) -> *const libc::c_char {
    let prefix = b"/proc/self/fd/";
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 12];
    let (mut n, mut i) = (fd as u32, digits.len());
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let d = &digits[i..];
    buf[prefix.len()..prefix.len() + d.len()].copy_from_slice(d);
    buf[prefix.len() + d.len()] = 0;
    buf.as_ptr().cast()
}

/// readlink of `/proc/self/fd/N` into `out`; the length, or -1.
fn link_of(fd: i32, out: &mut [u8; 512]) -> isize {
    let mut p = [0u8; 32];
    // SAFETY: a NUL-terminated path and a buffer of its stated size.
    unsafe { libc::readlink(fd_path(fd, &mut p), out.as_mut_ptr().cast(), out.len()) }
}

/// In the forked child: 0 if every check holds, else `(fd + 1) << 8 | what`.
/// Raw syscalls on stack buffers only (the parent is multi-threaded).
fn run_checks(checks: &[Check], base: RawFd) -> u64 {
    let fail = |fd: i32, what: u64| ((fd as u64 + 1) << 8) | what;
    for c in checks {
        let fd = c.fd;
        // SAFETY: fcntl queries on our own fds.
        let (fdfl, fl) = unsafe {
            (
                libc::fcntl(fd, libc::F_GETFD),
                libc::fcntl(fd, libc::F_GETFL),
            )
        };
        if fdfl < 0 {
            return fail(fd, 1);
        }
        if (fdfl & libc::FD_CLOEXEC != 0) != c.cloexec {
            return fail(fd, 2);
        }
        if fl & c.flags_mask != c.flags & c.flags_mask {
            return fail(fd, 3) | ((fl as u64) << 32);
        }
        let mut l = [0u8; 512];
        let n = link_of(fd, &mut l);
        if n < 0 {
            return fail(fd, 4);
        }
        let l = &l[..n as usize];
        let ok = match &c.link {
            Link::Any => true,
            Link::Exact(x) => l == &x[..],
            Link::Around(a, z) => l.starts_with(a) && l.ends_with(z) && l.len() > a.len() + z.len(),
            Link::SameAs(other) => {
                let mut o = [0u8; 512];
                let m = link_of(*other, &mut o);
                m >= 0 && &o[..m as usize] == l
            }
        };
        if !ok {
            return fail(fd, 5);
        }
        if let Some(pos) = c.pos {
            // SAFETY: lseek on our own fd.
            if unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) } != pos {
                return fail(fd, 6);
            }
        }
        if let Some(want) = c.buffered {
            let mut n: libc::c_int = -1;
            // SAFETY: FIONREAD writes one int.
            if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } < 0 || n != want {
                return fail(fd, 7);
            }
        }
        let mut buf = [0u8; 4096];
        if let Some(want) = &c.read {
            // SAFETY: reads into a stack buffer.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n != want.len() as isize || buf[..want.len()] != want[..] {
                return fail(fd, 8);
            }
        }
        if let Some(want) = &c.peek {
            let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT;
            // SAFETY: peeks into a stack buffer.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), want.len(), flags) };
            if n != want.len() as isize || buf[..want.len()] != want[..] {
                return fail(fd, 9);
            }
        }
        if let Some(want) = c.eventfd {
            let mut v = [0u8; 8];
            // SAFETY: reads 8 bytes into a stack buffer.
            if unsafe { libc::read(fd, v.as_mut_ptr().cast(), 8) } != 8
                || u64::from_ne_bytes(v) != want
            {
                return fail(fd, 10);
            }
        }
        if let Some((contents, seals)) = &c.memfd {
            // SAFETY: F_GET_SEALS takes no argument.
            if unsafe { libc::fcntl(fd, libc::F_GET_SEALS) } != *seals {
                return fail(fd, 11);
            }
            // SAFETY: fstat into a zeroed stack struct.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            if unsafe { libc::fstat(fd, &mut st) } < 0 || st.st_size != contents.len() as i64 {
                return fail(fd, 12);
            }
            for (i, chunk) in contents.chunks(buf.len()).enumerate() {
                let off = (i * buf.len()) as libc::off_t;
                // SAFETY: preads into a stack buffer.
                let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), chunk.len(), off) };
                if n != chunk.len() as isize || &buf[..chunk.len()] != chunk {
                    return fail(fd, 13);
                }
            }
        }
    }
    // Nothing else below base.
    for fd in 0..base {
        // SAFETY: F_GETFD only queries.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0 && !checks.iter().any(|c| c.fd == fd) {
            return fail(fd, 14);
        }
    }
    0
}

/// A pipe whose ends are at `min` or above.
fn high_pipe(min: RawFd) -> (OwnedFd, OwnedFd) {
    let mut p = [0; 2];
    // SAFETY: room for two fds.
    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let hoist = |fd: RawFd| {
        // SAFETY: dup to a free fd >= min, then close the original.
        unsafe {
            let n = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min);
            assert!(n >= min);
            libc::close(fd);
            OwnedFd::from_raw_fd(n)
        }
    };
    (hoist(p[0]), hoist(p[1]))
}

/// A forked child that installed the fds of one dumped process and ran
/// its checks; it stays alive (for kcmp) until released.
struct Kid {
    pid: i32,
    report: OwnedFd,
    go: Option<OwnedFd>,
}

impl Kid {
    fn spawn(table: &FileTable, dumped: i32, checks: &[Check]) -> Kid {
        let (report_r, report_w) = high_pipe(table.base());
        let (go_r, go_w) = high_pipe(table.base());
        let (rr, rw) = (report_r.as_raw_fd(), report_w.as_raw_fd());
        let (gr, gw) = (go_r.as_raw_fd(), go_w.as_raw_fd());
        // SAFETY: fork; the child calls install (documented to allocate
        // nothing) and raw syscalls only, then _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: closes this child's copies of the parent's ends.
            unsafe {
                libc::close(rr);
                libc::close(gw);
            }
            let r: u64 = match table.install(dumped) {
                Ok(()) => run_checks(checks, table.base()),
                Err(_) => u64::MAX,
            };
            let b = r.to_ne_bytes();
            // SAFETY: raw syscalls with stack buffers; _exit ends the child.
            unsafe {
                libc::write(rw, b.as_ptr().cast(), 8);
                let mut x = 0u8;
                libc::read(gr, (&mut x as *mut u8).cast(), 1);
                libc::_exit(0);
            }
        }
        Kid {
            pid,
            report: report_r,
            go: Some(go_w),
        }
    }

    /// The child's check result (0: all good).
    fn result(&self) -> u64 {
        let mut p = libc::pollfd {
            fd: self.report.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        assert_eq!(
            unsafe { libc::poll(&mut p, 1, 20_000) },
            1,
            "no report in 20 s"
        );
        let mut b = [0u8; 8];
        // SAFETY: reads into a stack buffer.
        let n = unsafe { libc::read(self.report.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
        assert_eq!(n, 8, "the child died");
        u64::from_ne_bytes(b)
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        // A byte, not EOF: later kids hold copies of this pipe's write end.
        if let Some(go) = self.go.take() {
            // SAFETY: writes one byte from a static buffer.
            unsafe { libc::write(go.as_raw_fd(), b"g".as_ptr().cast(), 1) };
        }
        let mut st = 0;
        // SAFETY: reaps our own child (which exits once `go` is closed).
        unsafe { libc::waitpid(self.pid, &mut st, 0) };
    }
}

fn explain(r: u64) -> String {
    const WHAT: [&str; 15] = [
        "",
        "fd missing",
        "FD_CLOEXEC differs",
        "status flags differ",
        "readlink failed",
        "link target differs",
        "offset differs",
        "buffered byte count differs",
        "read data differs",
        "queued data differs",
        "eventfd count differs",
        "memfd seals differ",
        "memfd size differs",
        "memfd contents differ",
        "an fd the image does not list is open",
    ];
    if r == u64::MAX {
        return "install failed".into();
    }
    let what = WHAT.get((r & 0xff) as usize).unwrap_or(&"?");
    format!(
        "fd {}: {what} (F_GETFL {:#o})",
        ((r & 0xffff_ffff) >> 8) as i64 - 1,
        r >> 32
    )
}

fn kcmp_file(pid1: i32, fd1: i32, pid2: i32, fd2: i32) -> i64 {
    // SAFETY: kcmp takes integers.
    unsafe { libc::syscall(libc::SYS_kcmp, pid1, pid2, 0, fd1, fd2) }
}

/// The victim's fd links, read while it runs.
fn links(pid: i32) -> HashMap<i32, Vec<u8>> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let fd: i32 = e.file_name().to_str().unwrap().parse().unwrap();
            let l = std::fs::read_link(e.path()).unwrap();
            (fd, l.into_os_string().into_encoded_bytes())
        })
        .collect()
}

/// The kind of an entry, shared objects resolved.
fn kind_of<'a>(cp: &'a Checkpoint, e: &'a FdEntry) -> (&'a FdKind, u32) {
    match e.kind {
        FdKind::Shared { file_id } => {
            let o = cp.inventory.files.iter().find(|o| o.id == file_id).unwrap();
            (&o.kind, o.flags)
        }
        _ => (&e.kind, e.flags),
    }
}

/// `inherit` for every external pipe: a fresh pipe of this process each
/// (kept in `keep`), and the inode of each.
fn inherit_all(cp: &Checkpoint, keep: &mut Vec<OwnedFd>) -> (FileOptions, HashMap<String, u64>) {
    let mut opts = FileOptions::default();
    let mut inodes = HashMap::new();
    for key in external_keys(&cp.inventory, &cp.processes).unwrap() {
        let (r, w) = high_pipe(3);
        let ino = std::fs::metadata(format!("/proc/self/fd/{}", r.as_raw_fd()))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap();
        opts.inherit.push((key.clone(), w.as_raw_fd()));
        inodes.insert(key, ino);
        keep.extend([r, w]);
    }
    (opts, inodes)
}

/// The generic checks of one dumped process's fds.
fn checks_for(
    cp: &Checkpoint,
    pid: i32,
    victim_links: &HashMap<i32, Vec<u8>>,
    inherited: &HashMap<String, u64>,
) -> Vec<Check> {
    let p = cp.process(pid).unwrap();
    let mut out = Vec::new();
    let mut pipe_ends: HashMap<u64, i32> = HashMap::new();
    for e in &p.fds {
        let (kind, flags) = kind_of(cp, e);
        let mut c = Check {
            fd: e.fd,
            cloexec: e.cloexec,
            flags: (flags & !(libc::O_CLOEXEC as u32)) as i32,
            flags_mask: !0,
            ..Default::default()
        };
        let victim = victim_links.get(&e.fd).cloned();
        c.link = victim.clone().map(Link::Exact).unwrap_or_default();
        match kind {
            FdKind::Regular {
                path,
                pos,
                unlinked_contents,
                ..
            } => {
                c.pos = Some(*pos as i64);
                if unlinked_contents.is_some() {
                    let dir = Path::new(path).parent().unwrap().to_str().unwrap();
                    c.link = Link::Around(format!("{dir}/").into_bytes(), b" (deleted)".to_vec());
                }
            }
            FdKind::Directory { pos, .. } => c.pos = Some(*pos as i64),
            FdKind::Pipe {
                inode,
                write_end,
                data,
            } => {
                let key = format!("pipe:[{inode}]");
                if let Some(ino) = inherited.get(&key) {
                    // Reopened through /proc: O_LARGEFILE may differ.
                    c.flags_mask = !pdump::restore_files::KERNEL_O_LARGEFILE;
                    c.link = Link::Exact(format!("pipe:[{ino}]").into_bytes());
                } else {
                    c.link = match pipe_ends.get(inode) {
                        Some(&other) => Link::SameAs(other),
                        None => Link::Around(b"pipe:[".to_vec(), b"]".to_vec()),
                    };
                    pipe_ends.entry(*inode).or_insert(e.fd);
                    if !write_end && !data.is_empty() {
                        c.buffered = Some(data.len as i32);
                    }
                }
            }
            FdKind::Fifo {
                write_end: false,
                data,
                ..
            } if !data.is_empty() => c.buffered = Some(data.len as i32),
            FdKind::UnixSocket { queued, .. } => {
                c.link = Link::Around(b"socket:[".to_vec(), b"]".to_vec());
                if !queued.is_empty() {
                    c.peek = Some(queued.concat());
                }
            }
            FdKind::Memfd {
                pos,
                contents,
                seals,
                ..
            } => {
                c.pos = Some(*pos as i64);
                c.memfd = Some((cp.read_blob(contents).unwrap(), *seals as i32));
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

/// Dumps an `fds` victim (left running, then killed: the restore case);
/// returns the checkpoint, the victim's fd numbers (READY order), its fd
/// links, and the victim's directory.
fn dumped_fds_victim(
    tag: &str,
) -> (
    Checkpoint,
    Vec<i32>,
    HashMap<i32, Vec<u8>>,
    std::path::PathBuf,
) {
    let vdir = tempdir(&format!("{tag}-victim"));
    let v = Victim::spawn_stderr(
        "fds",
        &[],
        &[("PDUMP_VICTIM_DIR", vdir.to_str().unwrap())],
        Stdio::null(),
    );
    let dir = tempdir(tag);
    let pid = v.pid.to_string();
    let out = pdump(&["dump", "-t", &pid, "-D", dir.to_str().unwrap(), "-R"]);
    assert_ok(&out, "pdump dump");
    let nums: Vec<i32> = v.ready.iter().map(|s| s.parse().unwrap()).collect();
    let l = links(v.pid);
    // The original dies (its FIFO and files stay), as before a restore.
    drop(v);
    // The directory stays until the test ends: the file-data file is read
    // when the files are opened.
    let cp = Checkpoint::open(&dir).unwrap();
    (cp, nums, l, vdir)
}

#[test]
fn fds_victim_every_kind_installed() {
    root_or_skip!();
    let (cp, nums, vlinks, vdir) = dumped_fds_victim("rf-fds");
    let p = &cp.processes[0];
    let pid = p.pid;

    // Its stdin and stdout are pipes to this test: external.
    let ino = |fd: i32| match kind_of(&cp, p.fds.iter().find(|e| e.fd == fd).unwrap()).0 {
        FdKind::Pipe { inode, .. } => *inode,
        k => panic!("fd {fd}: {k:?}"),
    };
    let (k0, k1) = (format!("pipe:[{}]", ino(0)), format!("pipe:[{}]", ino(1)));
    // (Pipes this test process inherited from its own caller may be there too.)
    let keys = external_keys(&cp.inventory, &cp.processes).unwrap();
    assert!(keys.contains(&k0) && keys.contains(&k1), "{keys:?}");
    // Without --inherit-fd they open as pipes whose outside end is closed.
    FileTable::open(&cp, &FileOptions::default()).unwrap();
    let mut keep = Vec::new();
    let (opts, inherited) = inherit_all(&cp, &mut keep);
    let table = FileTable::open(&cp, &opts).unwrap();
    assert!(table.base() > *nums.iter().max().unwrap());
    assert_eq!(table.external_keys(), &keys[..]);
    assert_eq!(checks_for(&cp, pid, &vlinks, &inherited).len(), p.fds.len());
    let mut checks = checks_for(&cp, pid, &vlinks, &inherited);
    assert!(checks.len() >= 13, "stdio and the 10 fds");
    // The victim's own data, read back (consumed) in the child.
    let at =
        |checks: &[Check], fd: i32| -> usize { checks.iter().position(|c| c.fd == fd).unwrap() };
    let i = at(&checks, nums[5]);
    checks[i].read = Some(b"buffered".to_vec());
    checks[i].buffered = Some(8);
    let i = at(&checks, nums[6]);
    checks[i].link = Link::SameAs(nums[5]);
    let i = at(&checks, nums[7]);
    checks[i].read = Some(b"fifo-data".to_vec());
    checks[i].buffered = Some(9);
    let i = at(&checks, nums[8]);
    checks[i].eventfd = Some(42);
    let i = at(&checks, nums[9]);
    let (contents, _) = checks[i].memfd.as_ref().unwrap();
    assert_eq!(contents.len(), 3 * 4096);
    assert!(matches!(
        &checks[at(&checks, nums[1])].link,
        Link::Around(..)
    ));
    assert_eq!(checks[at(&checks, nums[0])].pos, Some(123));
    assert_eq!(checks[at(&checks, nums[1])].pos, Some(13));
    assert_eq!(checks[at(&checks, nums[9])].pos, Some(5000));
    assert!(checks[at(&checks, nums[2])].cloexec);
    assert!(checks[at(&checks, nums[9])].cloexec);
    assert!(!checks[at(&checks, nums[0])].cloexec);

    let memfd_inode = match kind_of(&cp, p.fds.iter().find(|e| e.fd == nums[9]).unwrap()).0 {
        FdKind::Memfd { inode, .. } => *inode,
        k => panic!("{k:?}"),
    };
    assert!(table
        .memfd(memfd_inode)
        .is_some_and(|fd| fd >= table.base()));
    assert_eq!(table.memfd(1), None);

    let kid = Kid::spawn(&table, pid, &checks);
    let r = kid.result();
    assert_eq!(r, 0, "{}", explain(r));
    drop(kid);
    assert!(matches!(
        table.install(pid + 1_000_000),
        Err(FilesError::NoSuchProcess { .. })
    ));
    drop(table);
    let _ = std::fs::remove_dir_all(&vdir);
    let _ = std::fs::remove_dir_all(&cp.dir);
}

#[test]
fn changed_size_is_refused_unless_allowed() {
    root_or_skip!();
    let (cp, nums, _, vdir) = dumped_fds_victim("rf-size");
    let p = &cp.processes[0];
    let mut keep = Vec::new();
    let (mut opts, _) = inherit_all(&cp, &mut keep);
    let path = match kind_of(&cp, p.fds.iter().find(|e| e.fd == nums[0]).unwrap()).0 {
        FdKind::Regular { path, .. } => path.clone(),
        k => panic!("{k:?}"),
    };
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all_at_end(b"x");
    let err = FileTable::open(&cp, &opts).unwrap_err();
    let msg = err.to_string();
    match &err {
        FilesError::SizeChanged {
            at,
            path: p2,
            recorded,
            now,
        } => {
            assert_eq!((at.pid, at.fd), (p.pid, nums[0]));
            assert_eq!(p2.to_str().unwrap(), path);
            assert_eq!((*recorded, *now), (1000, 1001));
        }
        e => panic!("{e:?}"),
    }
    let at = format!("fd {} of pid {}", nums[0], p.pid);
    for want in [at.as_str(), path.as_str(), "1000", "1001"] {
        assert!(msg.contains(want), "{msg} lacks {want}");
    }
    opts.allow_size_change = true;
    FileTable::open(&cp, &opts).unwrap();
    let _ = std::fs::remove_dir_all(&vdir);
    let _ = std::fs::remove_dir_all(&cp.dir);
}

trait AppendExt {
    fn write_all_at_end(self, b: &[u8]);
}

impl AppendExt for std::fs::File {
    fn write_all_at_end(mut self, b: &[u8]) {
        std::io::Write::write_all(&mut self, b).unwrap();
    }
}

#[test]
fn ipc_tree_shared_files_pipes_and_socketpairs() {
    root_or_skip!();
    let vdir = tempdir("rf-ipc-victim");
    let v = Victim::spawn_stderr(
        "tree-preset",
        &["ipc"],
        &[("PDUMP_VICTIM_DIR", vdir.to_str().unwrap())],
        Stdio::null(),
    );
    let dir = tempdir("rf-ipc");
    assert_ok(&dump_subtree(v.pid, &dir), "pdump dump");
    let cp = Checkpoint::open(&dir).unwrap();
    assert_eq!(cp.processes.len(), 11);
    let vlinks: HashMap<i32, HashMap<i32, Vec<u8>>> =
        cp.processes.iter().map(|p| (p.pid, links(p.pid))).collect();

    let mut keep = Vec::new();
    let (opts, inherited) = inherit_all(&cp, &mut keep);
    assert!(
        inherited.len() >= 2,
        "the root's stdin and stdout: {inherited:?}"
    );
    let table = FileTable::open(&cp, &opts).unwrap();

    let mut kids = Vec::new();
    for p in &cp.processes {
        let checks = checks_for(&cp, p.pid, &vlinks[&p.pid], &inherited);
        kids.push((p.pid, Kid::spawn(&table, p.pid, &checks)));
    }
    for (pid, kid) in &kids {
        let r = kid.result();
        assert_eq!(r, 0, "pid {pid}: {}", explain(r));
    }

    // Every shared object is one description in every kid holding it,
    // and distinct entries are distinct descriptions.
    let kid_of: HashMap<i32, i32> = kids.iter().map(|(p, k)| (*p, k.pid)).collect();
    let mut holders: HashMap<u64, Vec<(i32, i32)>> = HashMap::new();
    let mut own: Vec<(i32, i32, &FdKind)> = Vec::new();
    for p in &cp.processes {
        for e in &p.fds {
            match e.kind {
                FdKind::Shared { file_id } => {
                    holders.entry(file_id).or_default().push((p.pid, e.fd))
                }
                ref k => own.push((p.pid, e.fd, k)),
            }
        }
    }
    let (mut shared_files, mut socks, mut pipes_checked) = (0, 0, 0);
    for (id, hs) in &holders {
        let kind = &cp
            .inventory
            .files
            .iter()
            .find(|o| o.id == *id)
            .unwrap()
            .kind;
        if hs.iter().any(|(p, _)| *p != hs[0].0) && matches!(kind, FdKind::Regular { pos: 77, .. })
        {
            shared_files += 1;
        }
        for w in hs.windows(2) {
            let ((p1, f1), (p2, f2)) = (w[0], w[1]);
            assert_eq!(
                kcmp_file(kid_of[&p1], f1, kid_of[&p2], f2),
                0,
                "shared file {id}: fd {f1} of {p1} and fd {f2} of {p2}"
            );
        }
    }
    assert!(shared_files >= 5, "the sharedfile nodes: {shared_files}");
    for (i, &(p1, f1, k1)) in own.iter().enumerate() {
        for &(p2, f2, k2) in &own[i + 1..] {
            let same_sock = matches!((k1, k2), (FdKind::UnixSocket { inode: a, .. }, FdKind::UnixSocket { inode: b, .. }) if a == b);
            if !same_sock && std::mem::discriminant(k1) == std::mem::discriminant(k2) {
                assert_ne!(
                    kcmp_file(kid_of[&p1], f1, kid_of[&p2], f2),
                    0,
                    "fd {f1} of {p1} and fd {f2} of {p2} must be distinct: {k1:?}"
                );
            }
        }
        if let FdKind::UnixSocket { queued, .. } = k1 {
            socks += usize::from(queued == &vec![b"hello".to_vec()]);
        }
        if matches!(k1, FdKind::Pipe { data, write_end: false, .. } if cp.read_blob(data).unwrap() == b"ping\n")
        {
            pipes_checked += 1;
        }
    }
    assert!(
        socks >= 5,
        "hello queued on the sockpair nodes' ends: {socks}"
    );
    assert!(
        pipes_checked >= 5,
        "ping buffered for the pipe nodes: {pipes_checked}"
    );
    drop(kids);
    drop(table);
    v.finish();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&vdir);
}
