//! The dumper is SIGKILLed in over 200 dump sessions; the victim must always
//! continue correctly (its own checks) and never stay traced.
//!
//! Kill points are pdump's fault points (every ptrace request, task memory
//! write and parasite command, see `src/fault.rs`). Each victim gets one
//! session per fault point of a whole dump, so every step is hit: seizing,
//! remote syscalls, infection, the blob's handshake, page streaming, cure and
//! detach (loop ~46 points, 4 threads ~128, zmm ~50).

use std::process::Command;
use std::time::Duration;

use crate::root_or_skip;
use crate::util::{pdump_bin, tempdir, Victim};

fn tracer_of(pid: i32) -> i32 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap()
}

fn fd_table(pid: i32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            format!(
                "{} -> {:?}",
                e.file_name().to_string_lossy(),
                std::fs::read_link(e.path()).ok()
            )
        })
        .collect();
    v.sort();
    v
}

fn dump_cmd(pid: i32, dir: &std::path::Path) -> Command {
    let mut c = Command::new(pdump_bin());
    c.args([
        "dump",
        "-t",
        &pid.to_string(),
        "-D",
        dir.to_str().unwrap(),
        "-R",
        // The copy-on-write path (fork, snapshot drain, reap) even for
        // these small victims.
        "--cow-min-size",
        "0",
    ]);
    c
}

fn sessions(mode: &str, args: &[&str]) {
    let v = Victim::spawn(mode, args);
    let fds_before = fd_table(v.pid);
    let base = tempdir(&format!("fault-{mode}"));
    // How many fault points does a whole dump pass?
    let probe = dump_cmd(v.pid, &base.join("probe"))
        .env("PDUMP_FAULT_REPORT", "1")
        .output()
        .unwrap();
    assert!(
        probe.status.success(),
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let err = String::from_utf8_lossy(&probe.stderr);
    let total: u64 = err
        .lines()
        .find_map(|l| l.strip_prefix("fault points: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no fault point count in {err:?}"));
    assert!(total > 20, "only {total} fault points");
    for i in 0..total {
        let at = i + 1;
        let dir = base.join(format!("d{i}"));
        let out = dump_cmd(v.pid, &dir)
            .env("PDUMP_FAULT_KILL_AT", at.to_string())
            .stdout(std::process::Stdio::null())
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert!(
            out.status.signal() == Some(libc::SIGKILL) || out.status.success(),
            "session {i} (kill at {at}/{total}): {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        for _ in 0..200 {
            if tracer_of(v.pid) == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            tracer_of(v.pid),
            0,
            "session {i} (kill at {at}/{total}): victim still traced"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    // A whole dump after all that holds the victim alone: the snapshots the
    // killed dumpers left (exiting, or zombies) are no members of its tree.
    let last = base.join("last");
    let out = dump_cmd(v.pid, &last).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cp = pdump::image::Checkpoint::open(&last).unwrap();
    assert_eq!(cp.inventory.processes, vec![v.pid], "the last dump's tree");
    assert_eq!(cp.inventory.tree.len(), 1, "the last dump's tree");
    std::thread::sleep(Duration::from_millis(50));
    assert_ne!(v.state(), 't', "victim left in a trace stop");
    assert_eq!(
        fd_table(v.pid),
        fds_before,
        "a killed dumper left fds in the victim"
    );
    let _ = std::fs::remove_dir_all(&base);
    v.finish();
}

#[test]
fn dumper_killed_at_fault_points_loop_victim() {
    root_or_skip!();
    sessions("loop", &[]);
}

#[test]
fn dumper_killed_at_fault_points_threads_victim() {
    root_or_skip!();
    sessions("threads", &["4"]);
}

#[test]
fn dumper_killed_at_fault_points_zmm_victim() {
    root_or_skip!();
    sessions("zmm", &[]);
}
