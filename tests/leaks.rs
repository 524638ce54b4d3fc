//! Leak detection (seeds 003/004): strict container mode refuses a tree that
//! shares anything with the outside, naming each leak, and changes nothing;
//! sub-tree mode dumps and reports the same list in the summary, `show` and
//! `show --json`.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::root_or_skip;
use crate::util::{assert_ok, dump_subtree, pdump, tempdir};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: killing the process group of a child we spawned with setsid.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Run `sh -c script` in its own session; returns it once it printed one line.
fn sh(script: &str) -> (Proc, String) {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new("sh");
    c.args(["-c", script])
        .stdout(Stdio::piped())
        .stdin(Stdio::null());
    // SAFETY: setsid in the child before exec; async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = c.spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (Proc(child), line.trim().to_string())
}

fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect()
}

/// The first child of `parent` once it has exec'd `comm` (polls /proc).
fn child_running(parent: i32, comm: &str) -> i32 {
    for _ in 0..5000 {
        if let Some(&c) = children(parent).first() {
            let name = std::fs::read_to_string(format!("/proc/{c}/comm")).unwrap_or_default();
            // Settled: blocked in its sleep (clock_nanosleep / nanosleep), not still starting up.
            let sys = std::fs::read_to_string(format!("/proc/{c}/syscall")).unwrap_or_default();
            let nr = sys.split_whitespace().next().unwrap_or("");
            if name.trim() == comm && (nr == "230" || nr == "35") {
                return c;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("no child of {parent} running {comm}");
}

/// Dump `root` in both modes; container mode must refuse naming `expect`
/// (a substring of some leak's resource, and `outside` among its outside
/// pids); sub-tree mode must dump and report the same leak.
fn both_modes(root: i32, expect: &str, outside: i32) {
    let maps_before = std::fs::read_to_string(format!("/proc/{root}/maps")).unwrap();
    let dir = tempdir("leak");
    // With -R (the check runs before any process is dumped) and in kill
    // mode (it runs alongside the dumps, whose parasites are then cured):
    // refused either way, and the tree is left running as it was.
    for leave_running in [true, false] {
        let root_s = root.to_string();
        let mut args = vec!["dump", "-t", &root_s, "-D", dir.to_str().unwrap()];
        if leave_running {
            args.push("-R");
        }
        args.push("--container");
        let out = pdump(&args);
        assert!(
            !out.status.success(),
            "container mode accepted a leaking tree ({args:?})"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(expect),
            "container refusal does not name {expect:?}: {err}"
        );
        assert!(
            err.contains(&outside.to_string()),
            "refusal does not name outside pid {outside}: {err}"
        );
        assert!(
            !dir.join("inventory.img").exists(),
            "a refused dump left an inventory"
        );
        assert_eq!(
            std::fs::read_to_string(format!("/proc/{root}/maps")).unwrap(),
            maps_before,
            "{args:?}"
        );
        let st = std::fs::read_to_string(format!("/proc/{root}/status")).unwrap();
        assert!(st.contains("TracerPid:\t0"), "refused tree still traced");
        assert!(
            !st.contains("State:\tZ"),
            "a refused kill-mode dump killed the tree"
        );
    }

    let out = dump_subtree(root, &dir);
    assert_ok(&out, "sub-tree dump");
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains(expect),
        "summary does not report {expect:?}: {summary}"
    );
    let show = pdump(&["show", dir.to_str().unwrap()]);
    assert_ok(&show, "show");
    assert!(String::from_utf8_lossy(&show.stdout).contains(expect));
    let json = pdump(&["show", dir.to_str().unwrap(), "--json"]);
    let j: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let leaks = j["inventory"]["leaks"].as_array().expect("leaks in json");
    let l = leaks
        .iter()
        .find(|l| l["resource"].as_str().unwrap().contains(expect))
        .unwrap_or_else(|| panic!("json lacks leak {expect:?}: {leaks:?}"));
    assert!(l["outside"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p.as_i64() == Some(outside as i64)));
    assert!(l["inside"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p.as_i64() == Some(root as i64)));
}

#[test]
fn leak_file_shared_with_a_process_outside_the_tree() {
    root_or_skip!();
    // The shell (outside) keeps fd 7 open; its child (the tree) inherited it.
    let (p, _) = sh("exec 7</etc/passwd; sleep 1000 & echo ready; wait");
    let outside = p.0.id() as i32;
    let root = child_running(outside, "sleep");
    both_modes(root, "/etc/passwd", outside);
    // Sub-tree mode in kill mode (the check alongside the dumps): the same
    // leak is reported, and the tree is killed.
    let dir = tempdir("leak-kill");
    let root_s = root.to_string();
    let out = pdump(&[
        "dump",
        "-t",
        &root_s,
        "-D",
        dir.to_str().unwrap(),
        "--subtree",
    ]);
    assert_ok(&out, "kill-mode sub-tree dump");
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("/etc/passwd"), "{summary}");
    assert!(summary.contains("killed"), "{summary}");
    let show = pdump(&["show", dir.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&show.stdout).contains("/etc/passwd"));
}

/// The tree lives in its own `kind` namespace (unshare); an outside process
/// joins it (nsenter): that namespace is a leak.
fn namespace_joined_from_outside(kind: &str) {
    let (t, _) = sh(&format!("unshare --{kind} sleep 1000 & echo ready; wait"));
    let root = child_running(t.0.id() as i32, "sleep");
    let (o, _) = sh(&format!(
        "nsenter --{kind}=/proc/{root}/ns/{kind} sleep 1000 & echo ready; wait"
    ));
    let outside = child_running(o.0.id() as i32, "sleep");
    both_modes(root, &format!("{kind} namespace"), outside);
}

#[test]
fn leak_net_namespace_joined_from_outside() {
    root_or_skip!();
    namespace_joined_from_outside("net");
}

#[test]
fn leak_ipc_namespace_joined_from_outside() {
    root_or_skip!();
    namespace_joined_from_outside("ipc");
}

#[test]
fn leak_mm_shared_by_clone_vm_with_a_process_outside_the_tree() {
    root_or_skip!();
    let mut v = crate::util::Victim::spawn("clonevm", &[]);
    let child: i32 = v.ready[0].parse().unwrap();
    // The tree is the CLONE_VM child alone; its parent (outside) shares its mm.
    both_modes(child, "mm (address space)", v.pid);
    // Both still run: the parent checks the child kept counting.
    v.signal(libc::SIGTERM);
    let last = v.expect_exit_ok();
    assert!(last.starts_with("OK count="), "{last}");
}
