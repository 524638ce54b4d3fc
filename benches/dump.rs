//! `cargo bench`: pdump on memory-heavy workloads, next to a
//! process_vm_readv copy of the same memory to the same disk (the
//! reference), CRIU and gdb's `gcore` when they are installed, all measured
//! in the same run.
//!
//! Needs root. Every workload is a self-checking `pdump-victim` mode (it
//! verifies all its memory when it ends, so a dump that corrupted it fails
//! the bench) with a watchdog thread that reports the longest stop it saw
//! (`GAP` lines). Memory is warmed before every timed run (this host takes
//! free memory back after ~2 s idle, which makes first touches ~4x slower),
//! and the order of pdump and the reference alternates between rounds.
//!
//! Arguments (after `--`) select workloads by name substring; environment:
//! `PDUMP_BENCH_QUICK=1` (smaller sizes), `PDUMP_BENCH_ROUNDS=N`
//! (timed rounds per method, default 2, best reported), `PDUMP_BENCH_DIR`
//! (where images go, default the temp dir), `PDUMP_BENCH_CRIU` (the CRIU
//! binary, default `criu` on PATH; its `--version` is printed in the header).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use pdump::infect::Parasite;
use pdump::ptrace::Seized;

fn victim_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pdump-victim")
}

fn pdump_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pdump")
}

/// A running victim; its stdout lines arrive with their arrival time.
struct Victim {
    child: std::process::Child,
    pid: i32,
    lines: Receiver<(Instant, String)>,
    gone: bool,
}

impl Victim {
    fn spawn(args: &[String]) -> Victim {
        let mut child = Command::new(victim_bin())
            .args(args)
            .env("PDUMP_VICTIM_GAPS", "1")
            // Restore rows: the restored root's parent, session and group lie
            // outside the tree and cannot come back with it.
            .env("PDUMP_VICTIM_RESTORED_ROOT", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn pdump-victim");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send((Instant::now(), l)).is_err() {
                    break;
                }
            }
        });
        let (_, l) = lines
            .recv_timeout(Duration::from_secs(600))
            .expect("victim READY line");
        assert!(l.starts_with("READY"), "victim {args:?} said {l:?}");
        let pid: i32 = l.split_whitespace().nth(1).unwrap().parse().unwrap();
        Victim {
            child,
            pid,
            lines,
            gone: false,
        }
    }

    /// The longest stop the victim reported since `t0` (after a short wait
    /// for its watchdog to wake up and say so); `None` if it reported none
    /// (no stop of 3 ms or more).
    fn gap_since(&self, t0: Instant) -> Option<Duration> {
        std::thread::sleep(Duration::from_millis(60));
        let mut max = None;
        while let Ok((t, l)) = self.lines.try_recv() {
            if let Some(us) = l.strip_prefix("GAP ") {
                let d = Duration::from_micros(us.trim().parse().unwrap_or(0));
                if t >= t0 {
                    max = max.max(Some(d));
                }
            } else {
                panic!("victim {} said {l:?} while running", self.pid);
            }
        }
        max
    }

    /// SIGTERM, then its final self-check must say OK.
    fn finish(mut self) {
        // SAFETY: kill with the pid of our child.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((_, l)) if l.starts_with("GAP") => continue,
                Ok((_, l)) if l.starts_with("OK") => break,
                Ok((_, l)) => panic!("victim {} failed its self-check: {l}", self.pid),
                Err(e) => panic!("victim {}: no final line ({e})", self.pid),
            }
        }
        let _ = self.child.wait();
        self.gone = true;
    }

    /// The victim was killed by a dump: reap it.
    fn reap(mut self) {
        let _ = self.child.wait();
        self.gone = true;
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        if !self.gone {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Write back dirty pages, then allocate, touch and free `bytes` so the
/// host hands the memory to us before timing.
fn warm(bytes: usize) {
    // Write back every dirty page first: an earlier run's files (CRIU's
    // image, kept until its restore) must not be flushed under this one,
    // which would then meet the dirty limits early.
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    let mut v = vec![0u8; bytes];
    for i in (0..bytes).step_by(4096) {
        v[i] = 1;
    }
    std::hint::black_box(&v);
}

/// Disk space of every file under `p` (allocated blocks: a core's holes and
/// a sparse page file count nothing).
fn du(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => std::fs::read_dir(p)
            .map(|d| d.flatten().map(|e| du(&e.path())).sum())
            .unwrap_or(0),
        Ok(m) => m.blocks() * 512,
        Err(_) => 0,
    }
}

/// One measured run.
#[derive(Clone, Debug, Default)]
struct Run {
    wall: Duration,
    /// The target's longest stop, as it measured it.
    stop: Stop,
    /// Peak RSS of the dumping process (KiB), where it is a child.
    rss_kib: Option<u64>,
    image: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
enum Stop {
    #[default]
    None,
    Gap(Duration),
    Killed,
}

/// Run a command to completion as a child; wall time and its peak RSS in
/// KiB: the `peak RSS (VmHWM): N kB` line it printed (pdump does with
/// `PDUMP_REPORT_HWM=1`), else getrusage's ru_maxrss, which counts this
/// bench's own peak too when the child was spawned with vfork (so it is
/// only an upper bound for other tools).
fn timed_child(mut cmd: Command) -> Result<(Duration, u64), String> {
    let err = tempfile("stderr");
    cmd.stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).map_err(|e| e.to_string())?);
    let t = Instant::now();
    let child = cmd.spawn().map_err(|e| format!("spawn {cmd:?}: {e}"))?;
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid out-parameter.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child; `status` and `ru` are out-parameters.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    let wall = t.elapsed();
    std::mem::forget(child); // reaped above
    let msg = std::fs::read_to_string(&err).unwrap_or_default();
    discard(&err);
    let hwm = msg
        .lines()
        .find_map(|l| l.strip_prefix("peak RSS (VmHWM):"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
    if r < 0 || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        let last = msg
            .lines()
            .rfind(|l| l.contains("Error") || l.contains("error"))
            .or_else(|| msg.lines().next_back())
            .unwrap_or("")
            .to_string();
        return Err(format!("exit status {status:#x}: {last}"));
    }
    Ok((wall, hwm.unwrap_or(ru.ru_maxrss as u64)))
}

fn tempfile(tag: &str) -> PathBuf {
    base_dir().join(format!("{tag}-{}", std::process::id()))
}

fn base_dir() -> PathBuf {
    std::env::var_os("PDUMP_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

/// Where used images go until the bench ends. Unlinking files makes ext4
/// slow to create new ones for the next ~10 s: its inode allocator skips
/// the inodes freed in the last seconds, reading each one's inode block
/// (creating a file in a directory of /tmp went from 17 us to 300 us right
/// after 400 files had been removed there). Removing a run's images would
/// charge the next timed run, and more so for a tool that writes more
/// files (CRIU writes about eight per process, pdump two). Used files are
/// emptied instead (their blocks and page cache are freed) and moved here;
/// the directory is removed when the bench ends.
fn trash_dir() -> PathBuf {
    base_dir().join(format!("pdump-bench-{}-trash", std::process::id()))
}

/// Empty `path` (a file, or a directory of them) and move it to
/// [`trash_dir`]; remove it if it cannot be moved.
fn discard(path: &Path) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    fn empty(path: &Path) {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return;
        };
        if meta.is_dir() {
            for e in std::fs::read_dir(path).into_iter().flatten().flatten() {
                empty(&e.path());
            }
        } else if meta.is_file() && meta.len() > 0 {
            if let Ok(f) = std::fs::OpenOptions::new().write(true).open(path) {
                let _ = f.set_len(0);
            }
        }
    }
    if std::fs::symlink_metadata(path).is_err() {
        return;
    }
    empty(path);
    let trash = trash_dir();
    let _ = std::fs::create_dir_all(&trash);
    let dest = trash.join(NEXT.fetch_add(1, Ordering::Relaxed).to_string());
    if std::fs::rename(path, &dest).is_err() {
        let _ = std::fs::remove_dir_all(path);
        let _ = std::fs::remove_file(path);
    }
}

/// Wait (up to a minute) until creating a file in the image directory is
/// quick again: a test suite or an earlier bench that just removed
/// thousands of files there leaves ext4 creating files at 300-800 us each
/// for the next 10-30 s (see [`trash_dir`]). Returns the cost per file
/// when it stopped waiting.
fn settle_fs() -> Duration {
    let probe = trash_dir().join("settle");
    let mut round = 0;
    loop {
        let dir = probe.join(round.to_string());
        let _ = std::fs::create_dir_all(&dir);
        let n = 50;
        let t = Instant::now();
        for i in 0..n {
            let _ = std::fs::File::create(dir.join(i.to_string()));
        }
        let per = t.elapsed() / n;
        round += 1;
        if per < Duration::from_micros(100) || round > 30 {
            return per;
        }
        if round == 1 {
            eprintln!(
                "bench: creating a file takes {per:?} here (files were just removed): waiting"
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Removes [`trash_dir`] when the bench ends (or panics).
struct TrashGuard;

impl Drop for TrashGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(trash_dir());
    }
}

/// The reference: copy every present page of every process of the tree of
/// `pids` with process_vm_readv (4 MiB at a time) into one file.
fn reference_copy(pids: &[i32], path: &Path) -> (Duration, u64) {
    use std::io::Write;
    let t = Instant::now();
    let mut f = std::fs::File::create(path).unwrap();
    let mut buf = vec![0u8; 4 << 20];
    let mut total = 0u64;
    for &pid in pids {
        let vmas = pdump::procfs::maps(pid).unwrap();
        let mut pm = pdump::procfs::Pagemap::open(pid).unwrap();
        for v in vmas.iter().filter(|v| v.prot & 1 != 0 && !v.shared) {
            for (addr, n) in pm.present_ranges(v.start, v.end).unwrap_or_default() {
                let mut off = 0u64;
                let len = n * 4096;
                while off < len {
                    let chunk = (len - off).min(buf.len() as u64) as usize;
                    let local = libc::iovec {
                        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
                        iov_len: chunk,
                    };
                    let remote = libc::iovec {
                        iov_base: (addr + off) as *mut libc::c_void,
                        iov_len: chunk,
                    };
                    // SAFETY: one local buffer we own and one remote range.
                    let r = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
                    if r <= 0 {
                        break;
                    }
                    f.write_all(&buf[..r as usize]).unwrap();
                    off += r as u64;
                    total += r as u64;
                }
            }
        }
    }
    f.flush().unwrap();
    (t.elapsed(), total)
}

/// What the installed pdump can do besides dumping (by its `--help`).
#[derive(Clone, Copy, Debug)]
struct Features {
    restore: bool,
    core: bool,
}

fn features() -> Features {
    let out = Command::new(pdump_bin())
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let has = |cmd: &str| {
        out.lines()
            .any(|l| l.split_whitespace().next() == Some(cmd))
    };
    Features {
        restore: has("restore"),
        core: has("core"),
    }
}

/// The CRIU binary to compare with: `PDUMP_BENCH_CRIU`, else `criu` on PATH.
fn criu_bin() -> String {
    std::env::var("PDUMP_BENCH_CRIU").unwrap_or_else(|_| "criu".into())
}

/// A CRIU that runs: its binary and the version `criu --version` reports.
#[derive(Clone, Debug)]
struct Criu {
    bin: String,
    version: String,
}

fn criu() -> Option<Criu> {
    let bin = criu_bin();
    let out = Command::new(&bin)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .unwrap_or(text.trim())
        .trim()
        .to_string();
    Some(Criu { bin, version })
}

/// The reason in a CRIU log: its first error line with a reason (not
/// "exited, status=1", nor the harmless failure to raise its own
/// RLIMIT_NOFILE without CAP_SYS_RESOURCE), else `fallback`.
fn criu_error(log: &Path, fallback: String) -> String {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Error") && !l.contains("exited, status") && !l.contains("rlimit:"))
        .map(|l| l.to_string())
        .unwrap_or(fallback)
}

fn installed(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A workload: a victim mode and how to treat it.
struct Workload {
    name: &'static str,
    args: Vec<String>,
    /// Bytes to warm before each timed run (about the image size).
    warm: usize,
    /// A process tree (gcore dumps one process only).
    tree: bool,
    /// Why gcore is not run, if it is not.
    no_gcore: Option<&'static str>,
    /// Also time pdump with `PDUMP_DUMPER_SCAN=1`.
    copy_mode: bool,
}

fn workloads(quick: bool) -> Vec<Workload> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let (g1, g4) = if quick { (256, 1024) } else { (1024, 4096) };
    let (sp_map, sp_touch) = if quick { (16384, 64) } else { (65536, 256) };
    let nmaps = if quick { 10_000 } else { 50_000 };
    let w = |name, args: Vec<String>, warm: usize| Workload {
        name,
        args,
        warm,
        tree: false,
        no_gcore: None,
        copy_mode: false,
    };
    vec![
        w("1g", s(&["fill", &g1.to_string(), "none"]), g1 << 20),
        w(
            "1g-halfzero",
            s(&["fill", &g1.to_string(), "half"]),
            g1 << 20,
        ),
        Workload {
            copy_mode: true,
            ..w("4g", s(&["fill", &g4.to_string(), "none"]), g4 << 20)
        },
        Workload {
            copy_mode: true,
            ..w(
                "4g-halfzero",
                s(&["fill", &g4.to_string(), "half"]),
                g4 << 20,
            )
        },
        Workload {
            no_gcore: Some("gcore writes every mapped byte (64 GiB)"),
            ..w(
                "sparse64g",
                s(&["sparse", &sp_map.to_string(), &sp_touch.to_string()]),
                sp_touch << 20,
            )
        },
        w("maps50k", s(&["maps", &nmaps.to_string()]), nmaps * 4096),
        Workload {
            tree: true,
            no_gcore: Some("a tree (gcore dumps one process)"),
            ..w("tree200", s(&["tree-preset", "wide200"]), 256 << 20)
        },
        Workload {
            no_gcore: None,
            ..w("threads64", s(&["tree-preset", "threads64"]), 64 << 20)
        },
        w("writer1g", s(&["writer", &g1.to_string()]), g1 << 20),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    PdumpR,
    PdumpRCopy,
    Reference,
}

/// Best (shortest wall) of several runs.
fn best(runs: &[Run]) -> Option<Run> {
    runs.iter().min_by_key(|r| r.wall).cloned()
}

/// Results of one workload.
#[derive(Default)]
struct Results {
    bytes: u64,
    pdump_r: Vec<Run>,
    pdump_copy: Vec<Run>,
    pdump_kill: Vec<Run>,
    reference: Vec<Run>,
    criu: Option<Result<Run, String>>,
    /// `criu restore` of CRIU's -R image once the victim has exited, checked
    /// by the restored victim.
    criu_restore: Option<Result<Run, String>>,
    /// `pdump restore` of the kill-mode image, checked by the restored victim.
    restore: Option<Result<Run, String>>,
    /// `pdump core` of the live victim.
    core: Option<Result<Run, String>>,
    gcore: Option<Result<Run, String>>,
}

fn pdump_dump(
    pid: i32,
    dir: &Path,
    leave_running: bool,
    tree: bool,
    dumper_scan: bool,
) -> Result<Run, String> {
    discard(dir);
    let mut c = Command::new(pdump_bin());
    c.args(["dump", "-t", &pid.to_string(), "-D", dir.to_str().unwrap()])
        .env("PDUMP_REPORT_HWM", "1")
        .env("PDUMP_DUMPER_SCAN", if dumper_scan { "1" } else { "0" });
    if leave_running {
        c.arg("-R");
        if dumper_scan {
            // The frozen path's copy mode (the snapshot path has its own).
            c.arg("--no-cow");
        }
    }
    if tree {
        c.arg("--subtree");
    }
    let (wall, rss) = timed_child(c)?;
    Ok(Run {
        wall,
        rss_kib: Some(rss),
        image: du(dir),
        ..Run::default()
    })
}

fn pids_of(root: i32, tree: bool) -> Vec<i32> {
    if tree {
        pdump::tree::collect(root).unwrap().alive()
    } else {
        vec![root]
    }
}

fn run_workload(
    w: &Workload,
    rounds: usize,
    tools: (Option<&Criu>, bool),
    feats: Features,
) -> Results {
    let mut res = Results::default();
    let dir = base_dir().join(format!("pdump-bench-{}-{}", std::process::id(), w.name));
    let criu_dir = base_dir().join(format!(
        "pdump-bench-{}-{}-criu",
        std::process::id(),
        w.name
    ));
    let ref_path = base_dir().join(format!("pdump-bench-{}-ref.bin", std::process::id()));
    let v = Victim::spawn(&w.args);
    let pids = pids_of(v.pid, w.tree);
    let tree = w.tree;
    // pdump, the reference (and on big single processes pdump with the
    // dumper finding zero pages and CRCs, for comparison) take turns; the
    // order is reversed every other round.
    let mut methods = vec![Method::PdumpR, Method::Reference];
    if w.copy_mode {
        methods.push(Method::PdumpRCopy);
    }
    for round in 0..rounds {
        let mut order = methods.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        for m in order {
            warm(w.warm);
            let t0 = Instant::now();
            let mut run = match m {
                Method::PdumpR | Method::PdumpRCopy => {
                    pdump_dump(v.pid, &dir, true, tree, m == Method::PdumpRCopy)
                        .unwrap_or_else(|e| panic!("{}: pdump dump -R failed: {e}", w.name))
                }
                Method::Reference => {
                    let (wall, bytes) = reference_copy(&pids, &ref_path);
                    res.bytes = bytes;
                    Run {
                        wall,
                        image: du(&ref_path),
                        ..Run::default()
                    }
                }
            };
            run.stop = v.gap_since(t0).map_or(Stop::None, Stop::Gap);
            if m != Method::Reference {
                verify(&dir, w.name);
            }
            discard(&dir);
            discard(&ref_path);
            match m {
                Method::PdumpR => res.pdump_r.push(run),
                Method::PdumpRCopy => res.pdump_copy.push(run),
                Method::Reference => res.reference.push(run),
            }
        }
    }
    let (criu, has_gcore) = tools;
    // CRIU's -R image stays (in its own directory) until the victim has
    // exited, then it is restored: the victim's stdout, a pipe to this
    // bench, becomes a new pipe through `--inherit-fd`.
    let mut criu_image = None;
    if let Some(criu) = criu {
        warm(w.warm);
        discard(&criu_dir);
        std::fs::create_dir_all(&criu_dir).unwrap();
        let stdout = std::fs::read_link(format!("/proc/{}/fd/1", v.pid))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut c = Command::new(&criu.bin);
        c.args([
            "dump",
            "-t",
            &v.pid.to_string(),
            "-D",
            criu_dir.to_str().unwrap(),
        ])
        .args(["--leave-running", "--shell-job", "-o", "dump.log"]);
        let t0 = Instant::now();
        // (ru_maxrss would count this bench's own peak: see timed_child.)
        let r = timed_child(c).map(|(wall, _)| Run {
            wall,
            image: du(&criu_dir),
            ..Run::default()
        });
        let r = r.map(|mut run| {
            run.stop = v.gap_since(t0).map_or(Stop::None, Stop::Gap);
            run
        });
        // CRIU logs its reason in dump.log.
        let r = r.map_err(|e| criu_error(&criu_dir.join("dump.log"), e));
        let _ = v.gap_since(Instant::now());
        if r.is_ok() {
            criu_image = Some(stdout);
        } else {
            discard(&criu_dir);
        }
        res.criu = Some(r);
    }
    if feats.core && !w.tree {
        warm(w.warm);
        discard(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let core = dir.join("core");
        let mut c = Command::new(pdump_bin());
        c.args(["core", &v.pid.to_string(), "-o", core.to_str().unwrap()])
            .env("PDUMP_REPORT_HWM", "1");
        let t0 = Instant::now();
        let r = timed_child(c).map(|(wall, rss)| Run {
            wall,
            rss_kib: Some(rss),
            image: du(&dir),
            stop: v.gap_since(t0).map_or(Stop::None, Stop::Gap),
        });
        // The core must hold every thread (gdb reads it in tests/core.rs).
        let threads = std::fs::read_dir(format!("/proc/{}/task", v.pid))
            .map(|d| d.count())
            .unwrap_or(0);
        let r = r.and_then(|run| match check_core(&core, threads) {
            Ok(()) => Ok(run),
            Err(e) => Err(format!("bad core: {e}")),
        });
        res.core = Some(r);
        discard(&dir);
    }
    if has_gcore && w.no_gcore.is_none() {
        warm(w.warm);
        discard(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = Command::new("gcore");
        c.args(["-o", dir.join("core").to_str().unwrap(), &v.pid.to_string()]);
        let t0 = Instant::now();
        let r = timed_child(c).map(|(wall, _)| Run {
            wall,
            image: du(&dir),
            stop: v.gap_since(t0).map_or(Stop::None, Stop::Gap),
            ..Run::default()
        });
        res.gcore = Some(r);
        discard(&dir);
    }
    v.finish();
    if let (Some(criu), Some(stdout)) = (criu, criu_image) {
        warm(w.warm);
        res.criu_restore = Some(criu_restore_and_check(criu, &criu_dir, &pids, &stdout));
        discard(&criu_dir);
    }

    // Kill mode: a fresh victim per round, then, where pdump has `restore`,
    // the last round's image restored and the restored victim's own final
    // check.
    for round in 0..rounds {
        let v = Victim::spawn(&w.args);
        let pids = pids_of(v.pid, w.tree);
        warm(w.warm);
        let mut run = pdump_dump(v.pid, &dir, false, tree, false)
            .unwrap_or_else(|e| panic!("{}: pdump dump failed: {e}", w.name));
        run.stop = Stop::Killed;
        v.reap();
        verify(&dir, w.name);
        if feats.restore && round + 1 == rounds {
            warm(w.warm);
            res.restore = Some(pdump_restore_and_check(&dir, &pids));
        }
        discard(&dir);
        res.pdump_kill.push(run);
    }
    res
}

/// A core file must be an ELF core with one `NT_PRSTATUS` per thread and a
/// `PT_LOAD` per mapping (gdb reads pdump's cores in `tests/core.rs`).
fn check_core(path: &Path, threads: usize) -> Result<(), String> {
    use goblin::elf::{header::ET_CORE, program_header::PT_LOAD, Elf};
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    // SAFETY: a read-only map of a file this bench wrote and nobody changes.
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| e.to_string())?;
    let elf = Elf::parse_header(&map).map_err(|e| e.to_string())?;
    if elf.e_type != ET_CORE {
        return Err(format!("e_type {}", elf.e_type));
    }
    let elf = Elf::parse(&map).map_err(|e| e.to_string())?;
    let loads = elf
        .program_headers
        .iter()
        .filter(|p| p.p_type == PT_LOAD)
        .count();
    let prstatus = elf
        .iter_note_headers(&map)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|n| n.n_type == 1 && n.name == "CORE")
        .count();
    if loads == 0 || prstatus != threads {
        return Err(format!(
            "{loads} PT_LOAD, {prstatus} NT_PRSTATUS for {threads} threads"
        ));
    }
    Ok(())
}

/// Every image a timed run wrote must open and pass its page checksums
/// (after the timing).
fn verify(dir: &Path, name: &str) {
    if let Err(e) = pdump::image::Checkpoint::open(dir).and_then(|c| c.verify_pages()) {
        panic!("{name}: the checkpoint in {} is bad: {e}", dir.display());
    }
}

/// `pdump restore --shell-job` of the checkpoint in `dir` (whose processes
/// were `pids`, now dead); see `restore_and_check`.
fn pdump_restore_and_check(dir: &Path, pids: &[i32]) -> Result<Run, String> {
    let pidfile = tempfile("restore-pid");
    let mut cmd = Command::new(pdump_bin());
    cmd.args(["restore", "-D", dir.to_str().unwrap(), "--shell-job"])
        .arg("--pidfile")
        .arg(&pidfile)
        .env("PDUMP_REPORT_HWM", "1");
    restore_and_check(cmd, &pidfile, pids, &|stderr| {
        let last = stderr
            .lines()
            .find(|l| l.starts_with("error"))
            .unwrap_or("");
        last.trim_start_matches("error: ").to_string()
    })
}

/// `criu restore --shell-job -d` of CRIU's image in `dir` (whose processes
/// were `pids`, now dead); `stdout` is what the dumped root's fd 1 was
/// (`pipe:[INODE]`): the restored tree gets the restore's stdout in its
/// place. See `restore_and_check`.
fn criu_restore_and_check(
    criu: &Criu,
    dir: &Path,
    pids: &[i32],
    stdout: &str,
) -> Result<Run, String> {
    let pidfile = tempfile("criu-restore-pid");
    discard(&pidfile);
    let mut cmd = Command::new(&criu.bin);
    cmd.args(["restore", "-D", dir.to_str().unwrap(), "--shell-job", "-d"])
        .args(["-o", "restore.log", "--pidfile"])
        .arg(&pidfile);
    if stdout.starts_with("pipe:") {
        cmd.args(["--inherit-fd", &format!("fd[1]:{stdout}")]);
    }
    let log = dir.join("restore.log");
    restore_and_check(cmd, &pidfile, pids, &|stderr| {
        let last = stderr.lines().next_back().unwrap_or("").to_string();
        criu_error(&log, last)
    })
}

/// Run a restore `cmd` of processes that were `pids` (waiting until they
/// are gone); its stdout is a pipe we read, which the restored root writes
/// into, and it writes the root's pid to `pidfile`. After SIGTERM the
/// restored victim's final self-check must say OK. Returns the restore's
/// wall time and peak RSS (where it prints `peak RSS (VmHWM)`, as pdump
/// does); `why` makes the reason of a failed restore from its stderr.
fn restore_and_check(
    mut cmd: Command,
    pidfile: &Path,
    pids: &[i32],
    why: &dyn Fn(&str) -> String,
) -> Result<Run, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids
        .iter()
        .any(|p| Path::new(&format!("/proc/{p}")).exists())
    {
        if Instant::now() > deadline {
            return Err("the dumped processes did not go away".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let err = tempfile("restore-stderr");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&err).map_err(|e| e.to_string())?);
    let t = Instant::now();
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    let out = child.stdout.take().expect("piped stdout");
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid out-parameter.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child; `status` and `ru` are out-parameters.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    let wall = t.elapsed();
    std::mem::forget(child); // reaped above
    let msg = std::fs::read_to_string(&err).unwrap_or_default();
    discard(&err);
    let rss = msg
        .lines()
        .find_map(|l| l.strip_prefix("peak RSS (VmHWM):"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
    if r < 0 || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(why(&msg));
    }
    // The restorer wrote the root's pid; the restored victim writes the rest.
    let root: i32 = std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or("no root pid from the restore's pidfile")?;
    discard(pidfile);
    let (tx, lines) = channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    // SAFETY: kill with the pid the restore reported.
    unsafe { libc::kill(root, libc::SIGTERM) };
    loop {
        match lines.recv_timeout(Duration::from_secs(600)) {
            Ok(l) if l.starts_with("OK") => break,
            Ok(l) if l.starts_with("FAIL") => {
                let l: String = l.chars().take(100).collect();
                return Err(format!("the restored victim's check: {l}"));
            }
            Ok(_) => continue, // the root's pid, GAP lines
            Err(_) => return Err("the restored victim never reported".into()),
        }
    }
    Ok(Run {
        wall,
        rss_kib: rss,
        ..Run::default()
    })
}

fn fmt_stop(s: Stop) -> String {
    match s {
        Stop::None => "<3".into(),
        Stop::Gap(d) => format!("{:.0}", d.as_secs_f64() * 1e3),
        Stop::Killed => "killed".into(),
    }
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1u64 << 20) as f64)
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("pdump benches need root; skipping");
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let quick = std::env::var("PDUMP_BENCH_QUICK").as_deref() == Ok("1");
    let rounds: usize = std::env::var("PDUMP_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let feats = features();
    let criu = criu();
    let has_gcore = installed("gcore");
    let t_all = Instant::now();
    let _trash = TrashGuard;
    let create = settle_fs();

    // seize + infect + cure per task.
    let v = Victim::spawn(&["loop".to_string()]);
    let n = 300;
    let t = Instant::now();
    for _ in 0..n {
        let s = Seized::seize(v.pid).unwrap();
        let p = Parasite::infect(&s).unwrap();
        p.cure().unwrap();
        s.detach().unwrap();
    }
    let per = t.elapsed() / n;
    let _ = v.gap_since(t);
    v.finish();

    let mut table = Vec::new();
    for w in workloads(quick) {
        if !filters.is_empty() && !filters.iter().any(|f| w.name.contains(f.as_str())) {
            continue;
        }
        eprintln!("bench: {} ...", w.name);
        let t = Instant::now();
        let r = run_workload(&w, rounds, (criu.as_ref(), has_gcore), feats);
        eprintln!(
            "bench: {} done in {:.1} s",
            w.name,
            t.elapsed().as_secs_f64()
        );
        table.push((w, r));
    }

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    println!(
        "\npdump benchmarks: {} CPUs ({cpu}), Linux {kernel}, images in {}; best of {rounds} alternating round(s) (kill mode: {rounds} fresh victims; criu, gcore: one run){}\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        base_dir().display(),
        if quick { ", QUICK sizes" } else { "" }
    );
    match &criu {
        Some(c) => println!("CRIU: {} (`{} --version`)", c.version, c.bin),
        None => println!(
            "CRIU: not found (`{} --version` did not run; set PDUMP_BENCH_CRIU)",
            criu_bin()
        ),
    }
    println!(
        "seize+infect+cure per task: {:.3} ms (mean of {n}); creating a file in the image directory: {:.0} us\n",
        per.as_secs_f64() * 1e3,
        create.as_secs_f64() * 1e6
    );
    println!("| workload | method | wall s | GB/s | target's longest stop ms | dumper peak RSS MiB | image MiB | x ref | x criu | x gcore | restore s |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let na_restore = "n/a";
    for (w, r) in &table {
        let refr = best(&r.reference);
        let criu = r.criu.as_ref().and_then(|c| c.as_ref().ok()).cloned();
        let gcore = r.gcore.as_ref().and_then(|c| c.as_ref().ok()).cloned();
        let gbps = |run: &Run| r.bytes as f64 / run.wall.as_secs_f64() / 1e9;
        let ratio = |run: &Run, other: &Option<Run>| match other {
            Some(o) => format!("{:.2}", o.wall.as_secs_f64() / run.wall.as_secs_f64()),
            None => "-".into(),
        };
        let row = |method: &str, run: &Run, restore: &str| {
            println!(
                "| {} | {method} | {:.3} | {:.2} | {} | {} | {} | {} | {} | {} | {} |",
                w.name,
                run.wall.as_secs_f64(),
                gbps(run),
                fmt_stop(run.stop),
                run.rss_kib.map_or("-".into(), |k| mib(k * 1024)),
                mib(run.image),
                ratio(run, &refr),
                ratio(run, &criu),
                ratio(run, &gcore),
                restore,
            );
        };
        if let Some(b) = best(&r.pdump_r) {
            row("pdump -R", &b, "-");
        }
        if let Some(b) = best(&r.pdump_copy) {
            row("pdump -R --no-cow, dumper scan", &b, "-");
        }
        if let Some(b) = best(&r.pdump_kill) {
            let restore = match &r.restore {
                Some(Ok(rr)) => format!(
                    "{:.3} (OK, {} MiB)",
                    rr.wall.as_secs_f64(),
                    rr.rss_kib.map_or("-".into(), |k| mib(k * 1024))
                ),
                Some(Err(e)) => format!("failed: {}", e.replace('|', "/")),
                None => na_restore.to_string(),
            };
            row("pdump (kill)", &b, &restore);
        }
        match (&r.core, w.tree) {
            (Some(Ok(c)), _) => row("pdump core", c, "-"),
            (Some(Err(e)), _) => println!(
                "| {} | pdump core | failed: {} | | | | | | | | |",
                w.name,
                e.replace('|', "/")
            ),
            (None, true) => println!(
                "| {} | pdump core | skipped: a tree (a core holds one process) | | | | | | | | |",
                w.name
            ),
            (None, false) => println!("| {} | pdump core | n/a | | | | | | | | |", w.name),
        }
        if let Some(b) = &refr {
            row("process_vm_readv ref", b, "-");
        }
        match &r.criu {
            Some(Ok(c)) => {
                let restore = match &r.criu_restore {
                    Some(Ok(rr)) => format!("{:.3} (OK)", rr.wall.as_secs_f64()),
                    Some(Err(e)) => format!("failed: {}", e.replace('|', "/")),
                    None => "-".to_string(),
                };
                row("criu dump -R", c, &restore)
            }
            Some(Err(e)) => println!(
                "| {} | criu dump -R | failed: {} | | | | | | | | |",
                w.name,
                e.replace('|', "/")
            ),
            None => println!(
                "| {} | criu dump -R | not installed | | | | | | | | |",
                w.name
            ),
        }
        match (&r.gcore, w.no_gcore) {
            (Some(Ok(g)), _) => row("gcore", g, "-"),
            (Some(Err(e)), _) => println!(
                "| {} | gcore | failed: {} | | | | | | | | |",
                w.name,
                e.replace('|', "/")
            ),
            (None, Some(why)) => {
                println!("| {} | gcore | skipped: {why} | | | | | | | | |", w.name)
            }
            (None, None) => println!("| {} | gcore | not installed | | | | | | | | |", w.name),
        }
    }
    println!(
        "\nmemory per workload (bytes the reference copied): {}",
        table
            .iter()
            .map(|(w, r)| format!("{} {} MiB", w.name, mib(r.bytes)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "bench time: {:.0} s; x ref / x criu / x gcore = that tool's wall time / this row's (above 1: faster)",
        t_all.elapsed().as_secs_f64()
    );
}
