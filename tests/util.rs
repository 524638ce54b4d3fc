//! Test harness: the root check, victims, and running the pdump binary.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// The one place that decides whether a test needing root and kernel
/// features runs. Outside CI it skips loudly; with CI=true it must run.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: CI=true but not running as root: this test must not skip in CI");
    }
    eprintln!("\n!!!!! SKIPPED {test}: needs root (ptrace of other processes, /proc/PID/map_files) !!!!!\n");
    false
}

/// Skip (return early) unless root; see [`require_root`].
#[macro_export]
macro_rules! root_or_skip {
    () => {
        if !$crate::util::require_root(module_path!()) {
            return;
        }
    };
}

/// The pdump binary.
pub fn pdump_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pdump")
}

/// Run pdump with arguments.
pub fn pdump(args: &[&str]) -> Output {
    Command::new(pdump_bin())
        .args(args)
        .output()
        .expect("running pdump")
}

/// `pdump dump -t PID -D DIR -R --subtree`: dump a tree, leave it running,
/// report (not refuse) what it shares with the outside.
pub fn dump_subtree(pid: i32, dir: &Path) -> Output {
    pdump(&[
        "dump",
        "-t",
        &pid.to_string(),
        "-D",
        dir.to_str().unwrap(),
        "-R",
        "--subtree",
    ])
}

/// A fresh temporary directory for one test.
pub fn tempdir(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "pdump-test-{}-{}-{}",
        name,
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A running victim program (`pdump-victim MODE ARGS`).
pub struct Victim {
    pub child: Child,
    pub pid: i32,
    /// The words after `READY <pid>`.
    pub ready: Vec<String>,
    pub stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
    /// `child` is `pdump restore --wait` of this victim, not the victim.
    restored: bool,
}

impl Victim {
    pub fn spawn(mode: &str, args: &[&str]) -> Victim {
        Self::spawn_env(mode, args, &[])
    }

    pub fn spawn_env(mode: &str, args: &[&str], env: &[(&str, &str)]) -> Victim {
        Self::spawn_stderr(mode, args, env, Stdio::inherit())
    }

    /// [`Victim::spawn_env`] with the victim's stderr given (e.g.
    /// `Stdio::null()`, so that its fd 2 is not the test's).
    pub fn spawn_stderr(mode: &str, args: &[&str], env: &[(&str, &str)], stderr: Stdio) -> Victim {
        let mut child = only_stdio(&mut Command::new(env!("CARGO_BIN_EXE_pdump-victim")))
            .arg(mode)
            .args(args)
            .envs(env.iter().copied())
            .stderr(stderr)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning victim");
        let pid = child.id() as i32;
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let words: Vec<String> = line.split_whitespace().map(String::from).collect();
        assert_eq!(
            words.first().map(String::as_str),
            Some("READY"),
            "victim {mode} said {line:?}"
        );
        assert_eq!(words[1].parse::<i32>().unwrap(), pid);
        let stdin = child.stdin.take();
        Victim {
            child,
            pid,
            ready: words[2..].to_vec(),
            stdin,
            out,
            restored: false,
        }
    }

    /// Dump this victim with `pdump dump` (kill mode) into `dir` and reap
    /// what was its process (or its `pdump restore --wait`).
    pub fn dump_kill(mut self, dir: &Path) -> i32 {
        let out = pdump(&[
            "dump",
            "-t",
            &self.pid.to_string(),
            "-D",
            dir.to_str().unwrap(),
        ]);
        assert_ok(&out, "pdump dump (kill)");
        let st = self.child.wait().unwrap();
        assert!(
            !st.success(),
            "the dumped victim should have been killed: {st}"
        );
        self.pid
    }

    /// `pdump restore -D DIR --shell-job --wait`: the restored victim
    /// (same pid) talks through pdump's stdin/stdout, which the restore
    /// hands it in place of its old pipes, and pdump exits with its status.
    pub fn restore(dir: &Path, pid: i32, extra: &[&str]) -> Victim {
        let mut child = restore_running(dir, pid, extra, true);
        let out = BufReader::new(child.stdout.take().unwrap());
        let stdin = child.stdin.take();
        Victim {
            child,
            pid,
            ready: Vec::new(),
            stdin,
            out,
            restored: true,
        }
    }

    /// Read the victim's next output line.
    pub fn line(&mut self) -> String {
        let mut l = String::new();
        self.out.read_line(&mut l).unwrap();
        l.trim_end().to_string()
    }

    /// Read the `sleep 2000` victim's `SLEPT <ms>` line and assert the 2 s
    /// sleep lasted about 2 s in total despite `what` (restart semantics).
    pub fn expect_slept_2s(&mut self, what: &str) {
        let l = self.line();
        let ms: u64 = l
            .strip_prefix("SLEPT ")
            .unwrap_or_else(|| panic!("victim said {l:?}"))
            .parse()
            .unwrap();
        assert!(
            (1990..2600).contains(&ms),
            "2 s nanosleep took {ms} ms {what}"
        );
        self.expect_exit_ok();
    }

    /// Write to the victim's stdin.
    pub fn write(&mut self, data: &[u8]) {
        let s = self.stdin.as_mut().unwrap();
        s.write_all(data).unwrap();
        s.flush().unwrap();
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill with a pid we spawned.
        assert_eq!(unsafe { libc::kill(self.pid, sig) }, 0);
    }

    /// The scheduler state letter from /proc/PID/stat.
    pub fn state(&self) -> char {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap();
        let after = &s[s.rfind(')').unwrap() + 2..];
        after.chars().next().unwrap()
    }

    /// End a long-running victim with SIGTERM; assert it reports OK and exits 0.
    pub fn finish(mut self) -> String {
        self.signal(libc::SIGTERM);
        self.expect_exit_ok()
    }

    /// Wait for the victim's last line and exit status; assert success. A
    /// victim that hangs is killed after 60 s so the test fails instead of hanging.
    pub fn expect_exit_ok(&mut self) -> String {
        let pid = self.pid;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d2 = done.clone();
        std::thread::spawn(move || {
            for _ in 0..600 {
                std::thread::sleep(std::time::Duration::from_millis(100));
                if d2.load(Ordering::SeqCst) {
                    return;
                }
            }
            eprintln!("victim {pid} hung for 60 s: killing it");
            // SAFETY: kill with the pid of a child we spawned and have not reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        let r = self.wait_last_line();
        done.store(true, Ordering::SeqCst);
        r
    }

    fn wait_last_line(&mut self) -> String {
        let mut last = String::new();
        loop {
            let l = self.line();
            if l.is_empty() {
                break;
            }
            assert!(!l.starts_with("FAIL"), "victim {} failed: {l}", self.pid);
            last = l;
        }
        let st = self.child.wait().unwrap();
        assert!(
            st.success(),
            "victim {} exited with {st}; last line {last:?}",
            self.pid
        );
        last
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        if self.restored {
            // SAFETY: kill the restored victim this test created (same pid).
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Assert a command succeeded, showing its output otherwise.
pub fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}

/// Give a spawned program only stdin/stdout/stderr: an fd this test process
/// inherited from whatever runs it (a CI runner's pipe) must not leak into
/// victims, whose every fd is dumped and restored.
pub fn only_stdio(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: close_range between fork and exec touches only the child's fds.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        })
    }
}

/// `pdump restore -D DIR --shell-job --wait --pidfile F EXTRA` (stdout
/// piped, stdin piped or null), returned once the restore is done: pdump
/// writes the pidfile only when every restored task runs untraced, and the
/// pid in it must be `pid`.
/// pid_max is 32768 here and the suite spawns thousands of processes, so a
/// pid freed by the dump may briefly belong to another test's process: a
/// restore refused with "already in use" is retried (that is the documented
/// behaviour; the occupant is short-lived).
pub fn restore_running(dir: &Path, pid: i32, extra: &[&str], stdin: bool) -> Child {
    let start = std::time::Instant::now();
    let pidfile = dir.with_extension("restored-pid");
    'attempt: loop {
        let _ = std::fs::remove_file(&pidfile);
        let mut child = Command::new(pdump_bin())
            .args([
                "restore",
                "-D",
                dir.to_str().unwrap(),
                "--shell-job",
                "--wait",
                "--pidfile",
                pidfile.to_str().unwrap(),
            ])
            .args(extra)
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running pdump restore");
        loop {
            if let Ok(s) = std::fs::read_to_string(&pidfile) {
                let _ = std::fs::remove_file(&pidfile);
                assert_eq!(s.trim(), pid.to_string(), "the restored root's pid");
                return child;
            }
            if let Some(st) = child.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                if err.contains("already in use")
                    && start.elapsed() < std::time::Duration::from_secs(60)
                {
                    eprintln!("restore of {pid}: {}; retrying", err.trim());
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    continue 'attempt;
                }
                panic!("pdump restore exited {st} before the victim ran: {err}");
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(90),
                "restore of {pid} did not finish in 90 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}
