//! The dumper is SIGKILLed in over 200 dump sessions; the victim must always
//! continue correctly (its own checks) and never stay traced.
//!
//! Kill points are pdump's fault points (every ptrace request, task memory
//! write and parasite command, see `src/fault.rs`). Each victim gets one
//! session per fault point of a whole dump, so every step is hit: seizing,
//! remote syscalls, infection, the blob's handshake, page streaming, cure and
//! detach (loop ~46 points, 4 threads ~128, zmm ~50), through a copy-on-write
//! snapshot and, for a small victim, copied while frozen.

use std::os::unix::process::ExitStatusExt;
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

/// `pdump dump -R` of `pid`; `cow_min_size` is passed as `--cow-min-size`
/// (`"0"`: through a copy-on-write snapshot whatever the victim's size;
/// `None`: the default, which copies a victim under 1 MiB while frozen).
fn dump_cmd(pid: i32, dir: &std::path::Path, cow_min_size: Option<&str>) -> Command {
    let mut c = Command::new(pdump_bin());
    c.args([
        "dump",
        "-t",
        &pid.to_string(),
        "-D",
        dir.to_str().unwrap(),
        "-R",
    ]);
    if let Some(m) = cow_min_size {
        c.args(["--cow-min-size", m]);
    }
    c
}

/// Run `dump` with `PDUMP_FAULT_REPORT=1`: it must succeed; returns its
/// output and the number of fault points it passed (more than 20).
fn probe(mut dump: Command) -> (std::process::Output, u64) {
    let probe = dump.env("PDUMP_FAULT_REPORT", "1").output().unwrap();
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
    (probe, total)
}

/// Run `dump` SIGKILLed at fault point `at` of `total`: it must die of it
/// (or have finished); `what` names the session in failures.
fn killed_at(mut dump: Command, at: u64, total: u64, what: &str) {
    let out = dump
        .env("PDUMP_FAULT_KILL_AT", at.to_string())
        .stdout(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.signal() == Some(libc::SIGKILL) || out.status.success(),
        "{what} (kill at {at}/{total}): {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sessions(mode: &str, args: &[&str], cow_min_size: Option<&str>) {
    let v = Victim::spawn(mode, args);
    let fds_before = fd_table(v.pid);
    let base = tempdir(&format!("fault-{mode}"));
    // How many fault points does a whole dump pass?
    let (probe, total) = probe(dump_cmd(v.pid, &base.join("probe"), cow_min_size));
    // The path the sessions take: a snapshot, or a copy while frozen.
    let summary = String::from_utf8_lossy(&probe.stdout);
    assert_eq!(
        summary.contains("through copy-on-write snapshots"),
        cow_min_size == Some("0"),
        "{summary}"
    );
    for i in 0..total {
        let at = i + 1;
        let dir = base.join(format!("d{i}"));
        killed_at(
            dump_cmd(v.pid, &dir, cow_min_size),
            at,
            total,
            &format!("session {i}"),
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
    let out = dump_cmd(v.pid, &last, cow_min_size).output().unwrap();
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
    sessions("loop", &[], Some("0"));
}

#[test]
fn dumper_killed_at_fault_points_threads_victim() {
    root_or_skip!();
    sessions("threads", &["4"], Some("0"));
}

#[test]
fn dumper_killed_at_fault_points_zmm_victim() {
    root_or_skip!();
    sessions("zmm", &[], Some("0"));
}

/// The same victim as above (four threads, about 200 KiB resident) with the
/// default `--cow-min-size`: copied while frozen, its pages read through
/// /proc/PID/mem without page pipes (`pagestream::small_plan`).
#[test]
fn dumper_killed_at_fault_points_small_victim_copied_while_frozen() {
    root_or_skip!();
    sessions("threads", &["4"], None);
}

/// Kill mode: a dump parks each process's parasite until it kills the
/// tree. A dumper SIGKILLed at any fault point (all come before the kill)
/// leaves the victim running on exactly as it was: not traced, not
/// stopped, its fds as before, its own final check passing (a parked blob
/// sees its command pipe close and cures the task alone).
#[test]
fn kill_mode_dumper_killed_at_fault_points() {
    root_or_skip!();
    let base = tempdir("fault-kill");
    let dump = |pid: i32, dir: &std::path::Path| {
        let mut c = Command::new(pdump_bin());
        c.args(["dump", "-t", &pid.to_string(), "-D", dir.to_str().unwrap()]);
        c
    };
    let v = Victim::spawn("threads", &["4"]);
    let (_, total) = probe(dump(v.pid, &base.join("probe")));
    drop(v); // killed by the dump; reaped here
    let (mut survived, mut killed) = (0, 0);
    for at in 1..=total {
        let mut v = Victim::spawn("threads", &["4"]);
        let fds_before = fd_table(v.pid);
        let dir = base.join(format!("d{at}"));
        killed_at(dump(v.pid, &dir), at, total, "kill mode");
        // Dead (killed by the dump) or alive and untraced within a while.
        let mut alive = true;
        for _ in 0..500 {
            match std::fs::read_to_string(format!("/proc/{}/stat", v.pid)) {
                Ok(s) if s[s.rfind(')').unwrap() + 2..].starts_with('Z') => {
                    alive = false;
                    break;
                }
                Ok(_) if tracer_of(v.pid) == 0 => break,
                Ok(_) => std::thread::sleep(Duration::from_millis(1)),
                Err(_) => {
                    alive = false;
                    break;
                }
            }
        }
        if alive {
            assert_eq!(tracer_of(v.pid), 0, "kill at {at}/{total}: still traced");
            std::thread::sleep(Duration::from_millis(20));
            assert_ne!(v.state(), 't', "kill at {at}/{total}: left in a trace stop");
            assert_eq!(
                fd_table(v.pid),
                fds_before,
                "kill at {at}/{total}: fds left in the victim"
            );
            v.finish();
            survived += 1;
        } else {
            let st = v.child.wait().unwrap();
            assert_eq!(
                st.signal(),
                Some(libc::SIGKILL),
                "kill at {at}/{total}: the victim ended otherwise: {st}"
            );
            killed += 1;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    // Every fault point comes before the tree is killed (the kill itself
    // is none), so each victim must have survived, its parasite cured by
    // itself once the dumper was gone.
    assert_eq!(
        (survived, killed),
        (total, 0),
        "{survived} survived, {killed} killed"
    );
    let _ = std::fs::remove_dir_all(&base);
}
