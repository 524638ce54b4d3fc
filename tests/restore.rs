//! Restore round trips: dump (kill), restore, and let the victim check its
//! own state (memory checksums, registers, counters, timers, fds, ids);
//! trees with sessions, groups, zombies, threads and nested pid namespaces
//! compared level by level with /proc before the dump; failures that must
//! leave nothing behind.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::root_or_skip;
use crate::tree::{proc_tree, ProcTask};
use crate::util::{only_stdio, pdump, pdump_bin, tempdir, Victim};

const RESTORED: (&str, &str) = ("PDUMP_VICTIM_RESTORED_ROOT", "1");

/// Spawn `mode`, then dump (kill) and restore it `cycles` times; return the
/// running restored victim.
fn cycles(mode: &str, args: &[&str], cycles: usize) -> Victim {
    // stderr: not the test's own (a log file that grows is a changed file).
    let mut v = Victim::spawn_stderr(mode, args, &[RESTORED], Stdio::null());
    for c in 0..cycles {
        let dir = tempdir(&format!("restore-{mode}-{c}"));
        let pid = v.dump_kill(&dir);
        v = Victim::restore(&dir, pid, &[]);
        assert_eq!(v.pid, pid);
        let st = v.state();
        assert!(st != 'Z' && st != 'X', "restored {mode} is {st}");
        let _ = std::fs::remove_dir_all(&dir);
    }
    v
}

fn ok(v: Victim, prefix: &str) {
    let l = v.finish();
    assert!(l.starts_with(prefix), "restored victim said {l:?}");
}

#[test]
fn loop_victim_twice() {
    root_or_skip!();
    let v = cycles("loop", &[], 2);
    std::thread::sleep(Duration::from_millis(100));
    ok(v, "OK");
}

#[test]
fn threads_victim_twice() {
    root_or_skip!();
    ok(cycles("threads", &["8"], 2), "OK threads=8");
}

#[test]
fn zmm_registers_twice() {
    root_or_skip!();
    ok(cycles("zmm", &[], 2), "OK");
}

#[test]
fn pattern_memory_twice() {
    root_or_skip!();
    ok(cycles("pattern", &["2000", "11"], 2), "OK pages=2000");
}

#[test]
fn protnone_pages_twice() {
    root_or_skip!();
    ok(cycles("protnone", &[], 2), "OK");
}

#[test]
fn timers_and_signal_handlers_twice() {
    root_or_skip!();
    ok(cycles("timers", &[], 2), "OK alrm=");
}

#[test]
fn interrupted_sleep_restarts_with_the_time_left() {
    root_or_skip!();
    let v = Victim::spawn_stderr("sleep", &["2000"], &[RESTORED], Stdio::null());
    std::thread::sleep(Duration::from_millis(300));
    let dir = tempdir("restore-sleep");
    let pid = v.dump_kill(&dir);
    let mut v = Victim::restore(&dir, pid, &[]);
    v.expect_slept_2s("across a dump and a restore");
}

#[test]
fn stopped_task_stays_stopped() {
    root_or_skip!();
    let v = Victim::spawn_stderr("loop", &[], &[RESTORED], Stdio::null());
    v.signal(libc::SIGSTOP);
    while v.state() != 'T' {
        std::thread::sleep(Duration::from_millis(1));
    }
    let dir = tempdir("restore-stopped");
    let pid = v.dump_kill(&dir);
    let v = Victim::restore(&dir, pid, &[]);
    let start = Instant::now();
    while v.state() != 'T' {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "not stopped after restore"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    v.signal(libc::SIGCONT);
    ok(v, "OK");
}

#[test]
fn same_images_restore_again_after_the_first_copy_exited() {
    root_or_skip!();
    let v = Victim::spawn_stderr("pattern", &["300", "5"], &[RESTORED], Stdio::null());
    let dir = tempdir("restore-again");
    let pid = v.dump_kill(&dir);
    for _ in 0..2 {
        let v = Victim::restore(&dir, pid, &[]);
        ok(v, "OK pages=300");
    }
}

#[test]
fn python_interpreter_in_a_loop() {
    root_or_skip!();
    if Command::new("python3").arg("-c").arg("1").status().is_err() {
        panic!("python3 is needed for this test");
    }
    // Counts, keeps a checksum of a 4 MiB bytearray it rewrites, and after
    // SIGTERM (checked between iterations) checks both and prints OK.
    let script = r#"
import os, signal, sys, zlib
buf = bytearray(4 << 20)
n = 0
crc = zlib.crc32(buf)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
print("READY %d" % os.getpid(), flush=True)
while not stop:
    i = (n * 4099) % len(buf)
    buf[i] = (buf[i] + 1) & 255
    crc = zlib.crc32(buf)
    n += 1
ok = zlib.crc32(buf) == crc and n > 0
print(("OK" if ok else "FAIL") + " n=%d" % n, flush=True)
sys.exit(0 if ok else 1)
"#;
    let mut child = only_stdio(&mut Command::new("python3"))
        .args(["-c", script])
        .env("PYTHONUNBUFFERED", "1")
        .stderr(Stdio::null())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut l = String::new();
    out.read_line(&mut l).unwrap();
    assert!(l.starts_with("READY"), "{l}");
    std::thread::sleep(Duration::from_millis(300));
    let dir = tempdir("restore-python");
    let o = pdump(&["dump", "-t", &pid.to_string(), "-D", dir.to_str().unwrap()]);
    crate::util::assert_ok(&o, "dump python");
    let _ = child.wait();
    let v = Victim::restore(&dir, pid, &[]);
    std::thread::sleep(Duration::from_millis(300));
    // And once more: dump the restored interpreter and restore it again.
    let dir2 = tempdir("restore-python-2");
    v.dump_kill(&dir2);
    let v = Victim::restore(&dir2, pid, &[]);
    std::thread::sleep(Duration::from_millis(300));
    ok(v, "OK n=");
}

/// A self-checking tree: /proc before the dump, dump (kill), restore, the
/// same ids, states and exit codes on every level, then its own checks.
fn tree_round_trip(name: &str, cycles: usize) {
    let mut child = only_stdio(&mut Command::new(env!("CARGO_BIN_EXE_pdump-victim")))
        .args(["tree-preset", name])
        .env(RESTORED.0, RESTORED.1)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut l = String::new();
    out.read_line(&mut l).unwrap();
    let root: i32 = l.split_whitespace().nth(1).unwrap().parse().unwrap();
    let before = proc_tree(root);
    let mut restored: Option<std::process::Child> = None;
    let mut out: Box<dyn BufRead> = Box::new(out);
    for c in 0..cycles {
        let dir = tempdir(&format!("restore-tree-{name}-{c}"));
        wait_untraced(root);
        let o = pdump(&["dump", "-t", &root.to_string(), "-D", dir.to_str().unwrap()]);
        if !o.status.success() {
            if let Some(mut r) = restored.take() {
                let mut rest = String::new();
                let _ = out.read_to_string(&mut rest);
                let mut err = String::new();
                let _ = r.stderr.take().map(|mut e| e.read_to_string(&mut err));
                panic!(
                    "cycle {c}: the restored root is gone ({:?}); it printed {rest:?}; restore said {err:?}",
                    r.wait()
                );
            }
        }
        crate::util::assert_ok(&o, "dump the tree");
        match restored.take() {
            Some(mut r) => {
                let _ = r.wait();
            }
            None => {
                let _ = child.wait();
            }
        }
        let mut r = crate::util::restore_running(&dir, root, &[], false);
        out = Box::new(BufReader::new(r.stdout.take().unwrap()));
        restored = Some(r);
        wait_like(root, &before);
        let after = proc_tree(root);
        compare(&before, &after);
        let _ = std::fs::remove_dir_all(&dir);
    }
    for (pid, t) in proc_tree(root) {
        if t.state == 'T' {
            // SAFETY: a signal to a member of this test's tree.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }
    // SAFETY: as above.
    unsafe { libc::kill(root, libc::SIGTERM) };
    let mut l = String::new();
    out.read_line(&mut l).unwrap();
    assert!(
        l.starts_with("OK tree="),
        "the restored tree's own checks: {l}"
    );
    let st = restored.unwrap().wait().unwrap();
    assert!(st.success(), "restored root exited {st}");
}

/// Wait (up to 10 s) until no member of the tree under `root` is traced.
fn wait_untraced(root: i32) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10)
        && proc_tree(root).keys().any(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status"))
                .unwrap_or_default()
                .lines()
                .any(|l| l.starts_with("TracerPid:") && l.trim_end() != "TracerPid:\t0")
        })
    {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Wait until every task of `before` is back and untraced.
fn wait_like(root: i32, before: &std::collections::BTreeMap<i32, ProcTask>) {
    let start = Instant::now();
    loop {
        let now = proc_tree(root);
        let traced = now.keys().any(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status"))
                .unwrap_or_default()
                .lines()
                .any(|l| l.starts_with("TracerPid:") && l.trim_end() != "TracerPid:\t0")
        });
        // A stopped task stops right after its detach.
        let stops = now.iter().all(|(p, t)| {
            before
                .get(p)
                .is_some_and(|b| (b.state == 'T') == (t.state == 'T'))
        });
        if now.len() == before.len() && !traced && now.keys().eq(before.keys()) && stops {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "restored tree never matched: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn compare(
    before: &std::collections::BTreeMap<i32, ProcTask>,
    after: &std::collections::BTreeMap<i32, ProcTask>,
) {
    for (pid, b) in before {
        let a = after
            .get(pid)
            .unwrap_or_else(|| panic!("task {pid} not restored"));
        assert_eq!(a.nspid, b.nspid, "pid {pid}: NSpid");
        assert_eq!(a.nstgid, b.nstgid, "pid {pid}: NStgid");
        if *pid != *before.keys().next().unwrap() || b.nssid[0] != *pid {
            assert_eq!(a.nspgid, b.nspgid, "pid {pid}: NSpgid");
            assert_eq!(a.nssid, b.nssid, "pid {pid}: NSsid");
        }
        assert_eq!(a.state == 'Z', b.state == 'Z', "pid {pid}: zombie");
        assert_eq!(a.state == 'T', b.state == 'T', "pid {pid}: stopped");
        assert_eq!(a.threads, b.threads, "pid {pid}: threads");
        assert_eq!(a.comm, b.comm, "pid {pid}: name");
        if b.state == 'Z' {
            assert_eq!(a.exit_code, b.exit_code, "pid {pid}: exit status");
        }
    }
}

#[test]
fn tree_with_sessions_groups_zombies_and_stopped_tasks() {
    root_or_skip!();
    tree_round_trip("sessions", 2);
}

#[test]
fn tree_with_pid_namespaces_depth_2() {
    root_or_skip!();
    tree_round_trip("ns2", 2);
}

#[test]
fn tree_with_pid_namespaces_depth_3() {
    root_or_skip!();
    tree_round_trip("ns3", 2);
}

#[test]
fn tree_with_threads_and_a_namespace() {
    root_or_skip!();
    tree_round_trip("ns1", 1);
}

fn gone(pids: &[i32]) -> bool {
    pids.iter()
        .all(|p| !Path::new(&format!("/proc/{p}")).exists())
}

#[test]
fn a_pid_in_use_is_refused_and_nothing_is_created() {
    root_or_skip!();
    let v = Victim::spawn("loop", &[]);
    let dir = tempdir("restore-taken");
    let o = pdump(&[
        "dump",
        "-t",
        &v.pid.to_string(),
        "-D",
        dir.to_str().unwrap(),
        "-R",
    ]);
    crate::util::assert_ok(&o, "dump -R");
    let o = pdump(&["restore", "-D", dir.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("pid {} ", v.pid)) && err.contains("already in use"),
        "{err}"
    );
    ok(v, "OK");
}

#[test]
fn a_failure_inside_the_tree_kills_everything_it_created() {
    root_or_skip!();
    // Run the tree from a copy of the victim binary, then remove the copy:
    // every task fails to map its executable in the restorer's preparation.
    let bin_dir = tempdir("restore-fail-bin");
    let copy = bin_dir.join("victim-copy");
    std::fs::copy(env!("CARGO_BIN_EXE_pdump-victim"), &copy).unwrap();
    let mut child = only_stdio(&mut Command::new(&copy))
        .args(["tree-preset", "small"])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut l = String::new();
    out.read_line(&mut l).unwrap();
    let root: i32 = l.split_whitespace().nth(1).unwrap().parse().unwrap();
    let pids: Vec<i32> = proc_tree(root).keys().copied().collect();
    let dir = tempdir("restore-fail");
    let o = pdump(&["dump", "-t", &root.to_string(), "-D", dir.to_str().unwrap()]);
    crate::util::assert_ok(&o, "dump");
    let _ = child.wait();
    std::fs::remove_file(&copy).unwrap();
    let start = Instant::now();
    while !gone(&pids) && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let o = pdump(&["restore", "-D", dir.to_str().unwrap(), "--shell-job"]);
    assert!(
        !o.status.success(),
        "restore without the executable succeeded"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("task ") && err.contains("preparing the restorer"),
        "{err}"
    );
    assert!(gone(&pids), "a failed restore left tasks: {pids:?}");
}

#[test]
fn controller_killed_at_any_point_leaves_nothing() {
    root_or_skip!();
    let mut child = only_stdio(&mut Command::new(env!("CARGO_BIN_EXE_pdump-victim")))
        .args(["tree-preset", "small"])
        .env(RESTORED.0, RESTORED.1)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut l = String::new();
    out.read_line(&mut l).unwrap();
    let root: i32 = l.split_whitespace().nth(1).unwrap().parse().unwrap();
    let pids: Vec<i32> = proc_tree(root).keys().copied().collect();
    let dir = tempdir("restore-fault");
    let o = pdump(&["dump", "-t", &root.to_string(), "-D", dir.to_str().unwrap()]);
    crate::util::assert_ok(&o, "dump");
    let _ = child.wait();
    // How many fault points a whole restore passes. (The restored tree
    // keeps pdump's stdout and stderr: never wait for their end.)
    let errf = dir.join("stderr");
    let restore = |env: (&str, String)| {
        Command::new(pdump_bin())
            .args(["restore", "-D", dir.to_str().unwrap(), "--shell-job"])
            .env(env.0, env.1)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&errf).unwrap())
            .status()
            .unwrap()
    };
    let st = restore(("PDUMP_FAULT_REPORT", "1".into()));
    let err = std::fs::read_to_string(&errf).unwrap();
    assert!(st.success(), "restore: {err}");
    let n: u64 = err
        .lines()
        .find_map(|l| l.strip_prefix("fault points: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no fault report: {err}"));
    for &p in pids.iter().rev() {
        // SAFETY: kill the restored tree of this test.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    let wait_gone = |what: &str| {
        let start = Instant::now();
        while !gone(&pids) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{what}: tasks left: {:?}",
                pids.iter()
                    .filter(|p| Path::new(&format!("/proc/{p}")).exists())
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_gone("after the full restore");
    assert!(n >= 4, "only {n} fault points");
    let step = (n / 12).max(1);
    let mut at = 1;
    while at <= n {
        let st = restore(("PDUMP_FAULT_KILL_AT", at.to_string()));
        // Either everything it created is gone, or (killed after the tree
        // was released) everything runs, untraced: nothing in between.
        let start = Instant::now();
        loop {
            let alive: Vec<i32> = pids
                .iter()
                .copied()
                .filter(|p| Path::new(&format!("/proc/{p}")).exists())
                .collect();
            if alive.is_empty() {
                break;
            }
            let running = alive.len() == pids.len()
                && alive.iter().all(|p| {
                    let s =
                        std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
                    s.contains("TracerPid:\t0") && !s.contains("State:\tZ")
                });
            if running && (st.success() || start.elapsed() > Duration::from_millis(500)) {
                for &p in pids.iter().rev() {
                    // SAFETY: as above.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "controller killed at fault point {at} of {n}: left {alive:?} of {pids:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        wait_gone(&format!("controller killed at fault point {at} of {n}"));
        at += step;
    }
}

#[test]
fn demo_dumps_restores_and_shows_the_workload_continuing() {
    root_or_skip!();
    let dir = tempdir("restore-demo");
    let o = pdump(&["demo", "-D", dir.to_str().unwrap()]);
    crate::util::assert_ok(&o, "pdump demo");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("(after the restore)") && out.contains("continued after dump + restore"),
        "{out}"
    );
}

#[test]
fn four_gib_process_twice() {
    root_or_skip!();
    // 1 Mi pages: every 7th never touched, every 5th zero, the rest a
    // per-page pattern the victim checks page by page at the end.
    ok(cycles("pattern", &["1048576", "3"], 2), "OK pages=1048576");
}

#[test]
fn pipes_socketpairs_and_shared_files_between_tree_members() {
    root_or_skip!();
    // Buffered pipe data, queued socketpair data and shared offsets between
    // members (and across a pid namespace), checked by the tree itself.
    tree_round_trip("ipc", 2);
}

#[test]
fn files_at_offsets_and_every_fd_kind_twice() {
    root_or_skip!();
    // Regular and unlinked files at offsets, a directory, /dev/null,
    // /dev/zero, a pipe and a FIFO with data, an eventfd and a memfd.
    ok(cycles("fds", &[], 2), "OK fds=10");
}

/// `VmHWM` of a process, in KiB.
fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[test]
fn large_memfd_unlinked_file_and_pipe_round_trip_in_bounded_memory() {
    root_or_skip!();
    // A 256 MiB memfd (1/8 holes), a 16 MiB unlinked file and 1 MiB in a
    // pipe, each checked byte for byte by the victim after the restore.
    // Neither the dumper nor the restore controller may hold them: their
    // peak RSS must stay far below the memfd's size.
    const MIB: u64 = 256;
    const LIMIT_KIB: u64 = 64 << 10;
    let vdir = tempdir("bigfiles-victim");
    let v = Victim::spawn_stderr(
        "bigfiles",
        &[&MIB.to_string()],
        &[RESTORED, ("PDUMP_VICTIM_DIR", vdir.to_str().unwrap())],
        Stdio::null(),
    );
    let pid = v.pid;
    let memfd: i32 = v.ready[0].parse().unwrap();
    let dir = tempdir("restore-bigfiles");
    let out = Command::new(pdump_bin())
        .args(["dump", "-t", &pid.to_string(), "-D", dir.to_str().unwrap()])
        .env("PDUMP_REPORT_HWM", "1")
        .output()
        .unwrap();
    crate::util::assert_ok(&out, "pdump dump (kill)");
    drop(v); // killed by the dump: reaped here
    let err = String::from_utf8_lossy(&out.stderr);
    let dump_hwm: u64 = err
        .lines()
        .find_map(|l| l.strip_prefix("peak RSS (VmHWM):"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM line in {err}"));
    assert!(
        dump_hwm < LIMIT_KIB,
        "dumper peak RSS {dump_hwm} KiB with a {MIB} MiB memfd"
    );

    // The contents went into the file-data file, holes as holes.
    let cp = pdump::image::Checkpoint::open(&dir).unwrap();
    cp.verify_pages().unwrap();
    let e = cp.processes[0].fds.iter().find(|e| e.fd == memfd).unwrap();
    let pdump::image::model::FdKind::Memfd { contents, .. } = &e.kind else {
        panic!("{e:?}")
    };
    assert_eq!(contents.len, MIB << 20);
    let data = dir.join(&contents.file);
    let meta = std::fs::metadata(&data).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < meta.len() - (MIB << 20) / 16,
        "{} is not sparse: {meta:?}",
        data.display()
    );

    let v = Victim::restore(&dir, pid, &[]);
    let restore_hwm = vm_hwm_kib(v.child.id());
    assert!(
        restore_hwm < LIMIT_KIB,
        "restore controller peak RSS {restore_hwm} KiB with a {MIB} MiB memfd"
    );
    ok(v, &format!("OK bigfiles={MIB}"));
    eprintln!("bigfiles {MIB} MiB: dumper peak RSS {dump_hwm} KiB, restore {restore_hwm} KiB");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&vdir);
}

#[test]
fn a_group_whose_leader_is_gone_is_made_by_a_helper() {
    root_or_skip!();
    // The root (a child subreaper) forks L, L makes its own group and forks
    // M, L exits and is reaped: M stays in L's group, whose leader is gone.
    // After SIGTERM the root checks M's group through M's exit status.
    let script = r#"
import ctypes, os, signal, sys, time
ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
r, w = os.pipe()
l = os.fork()
if l == 0:
    os.setpgid(0, 0)
    m = os.fork()
    if m == 0:
        g = os.getpgrp()
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0 if os.getpgrp() == g else 3))
        os.write(w, b"%d %d\n" % (os.getpid(), g))
        while True:
            time.sleep(0.05)
    os._exit(0)
os.waitpid(l, 0)
m, g = map(int, os.read(r, 100).split())
print("READY %d %d %d" % (os.getpid(), m, g), flush=True)
while not stop:
    time.sleep(0.05)
os.kill(m, signal.SIGTERM)
_, st = os.waitpid(m, 0)
ok = os.waitstatus_to_exitcode(st) == 0
print(("OK" if ok else "FAIL") + " member status %d" % st, flush=True)
sys.exit(0 if ok else 1)
"#;
    let mut child = only_stdio(&mut Command::new("python3"))
        .args(["-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut l = String::new();
    out.read_line(&mut l).unwrap();
    let w: Vec<i32> = l
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(w.len(), 3, "{l}");
    let (m, g) = (w[1], w[2]);
    assert!(
        !Path::new(&format!("/proc/{g}")).exists(),
        "the leader is still there"
    );
    let dir = tempdir("restore-pgid-helper");
    let o = pdump(&["dump", "-t", &pid.to_string(), "-D", dir.to_str().unwrap()]);
    crate::util::assert_ok(&o, "dump");
    let _ = child.wait();
    let v = Victim::restore(&dir, pid, &[]);
    let now = std::fs::read_to_string(format!("/proc/{m}/stat")).unwrap();
    let pgrp: i32 = now[now.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(pgrp, g, "member {m} is in group {pgrp}, was {g}");
    assert!(
        !Path::new(&format!("/proc/{g}")).exists(),
        "the helper is left"
    );
    ok(v, "OK member");
}

#[test]
fn a_session_whose_leader_is_gone_is_led_by_a_helper() {
    root_or_skip!();
    // The root (a child subreaper) forks L, L calls setsid and forks M, L
    // exits and is reaped: M is in L's session and group, whose leader is
    // gone. M checks both after SIGTERM, reported through its exit status.
    let script = r#"
import ctypes, os, signal, sys, time
ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
r, w = os.pipe()
l = os.fork()
if l == 0:
    os.setsid()
    m = os.fork()
    if m == 0:
        s, g = os.getsid(0), os.getpgrp()
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0 if (os.getsid(0), os.getpgrp()) == (s, g) else 3))
        os.write(w, b"%d %d\n" % (os.getpid(), s))
        while True:
            time.sleep(0.05)
    os._exit(0)
os.waitpid(l, 0)
m, s = map(int, os.read(r, 100).split())
print("READY %d %d %d" % (os.getpid(), m, s), flush=True)
while not stop:
    time.sleep(0.05)
os.kill(m, signal.SIGTERM)
_, st = os.waitpid(m, 0)
ok = os.waitstatus_to_exitcode(st) == 0
print(("OK" if ok else "FAIL") + " member status %d" % st, flush=True)
sys.exit(0 if ok else 1)
"#;
    let mut child = only_stdio(&mut Command::new("python3"))
        .args(["-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut l = String::new();
    out.read_line(&mut l).unwrap();
    let w: Vec<i32> = l
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(w.len(), 3, "{l}");
    let (m, s) = (w[1], w[2]);
    let dir = tempdir("restore-session-helper");
    let o = pdump(&["dump", "-t", &pid.to_string(), "-D", dir.to_str().unwrap()]);
    crate::util::assert_ok(&o, "dump");
    let _ = child.wait();
    let v = Victim::restore(&dir, pid, &[]);
    let now = std::fs::read_to_string(format!("/proc/{m}/stat")).unwrap();
    let f: Vec<i32> = now[now.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .skip(1)
        .take(3)
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(f, vec![pid, s, s], "member {m}: (ppid, pgrp, session)");
    assert!(
        !Path::new(&format!("/proc/{s}")).exists(),
        "the helper is left"
    );
    ok(v, "OK member");
}
