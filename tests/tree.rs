//! Process trees and nested pid namespaces: the dumped task table must match,
//! level by level, what /proc said before the dump; every member must go on
//! running (self-checking victims report OK at the end).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pdump::image::model::TaskState;
use pdump::image::Checkpoint;

use crate::root_or_skip;
use crate::util::{assert_ok, dump_subtree, pdump, tempdir};

/// What /proc says of one task.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ProcTask {
    pub nspid: Vec<i32>,
    pub nstgid: Vec<i32>,
    pub nspgid: Vec<i32>,
    pub nssid: Vec<i32>,
    pub state: char,
    pub threads: usize,
    /// Field 52 of /proc/PID/stat (the wait status of a zombie).
    pub exit_code: i32,
    /// /proc/PID/comm.
    pub comm: String,
}

fn field(status: &str, name: &str) -> Vec<i32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.split_whitespace().map(|x| x.parse().unwrap()).collect())
        .unwrap_or_default()
}

fn read_task(pid: i32) -> Option<ProcTask> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let state = s
        .lines()
        .find_map(|l| l.strip_prefix("State:"))
        .map(|v| v.trim().chars().next().unwrap())?;
    Some(ProcTask {
        nspid: field(&s, "NSpid:"),
        nstgid: field(&s, "NStgid:"),
        nspgid: field(&s, "NSpgid:"),
        nssid: field(&s, "NSsid:"),
        state,
        threads: field(&s, "Threads:").first().copied().unwrap_or(1) as usize,
        comm: std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim_end_matches('\n')
            .to_string(),
        exit_code: std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|st| {
                st[st.rfind(')')? + 2..]
                    .split_whitespace()
                    .nth(49)
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0),
    })
}

fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in rd.flatten() {
            let p = t.path().join("children");
            out.extend(
                std::fs::read_to_string(p)
                    .unwrap_or_default()
                    .split_whitespace()
                    .map(|x| x.parse::<i32>().unwrap()),
            );
        }
    }
    out.sort();
    out
}

/// The tree under `root` as /proc shows it (pid -> task), walked independently of pdump.
pub(crate) fn proc_tree(root: i32) -> BTreeMap<i32, ProcTask> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        if let Some(t) = read_task(p) {
            out.insert(p, t);
            stack.extend(children(p));
        }
    }
    out
}

struct Tree {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
    root: i32,
}

impl Drop for Tree {
    fn drop(&mut self) {
        // Kill every member (SIGCONT first for stopped ones), leaves first.
        let all: Vec<i32> = proc_tree(self.root).keys().copied().collect();
        for p in all.iter().rev() {
            // SAFETY: signals to processes of a tree this test created.
            unsafe {
                libc::kill(*p, libc::SIGKILL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn victim() -> &'static str {
    env!("CARGO_BIN_EXE_pdump-victim")
}

/// Start `sh -c script` as the tree's root, wait until `victims` READY lines
/// arrived and the tree has `members` tasks, `zombies` of them zombies.
fn build(script: &str, victims: usize, members: usize, zombies: usize) -> Tree {
    let mut child = Command::new("sh")
        .args(["-c", script])
        .env("V", victim())
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let root = child.id() as i32;
    let mut out = BufReader::new(child.stdout.take().unwrap());
    for _ in 0..victims {
        let mut l = String::new();
        out.read_line(&mut l).unwrap();
        assert!(l.starts_with("READY"), "member said {l:?}");
    }
    let mut tree = Tree { child, out, root };
    for _ in 0..5000 {
        let t = proc_tree(root);
        if t.len() >= members
            && t.values().filter(|x| x.state == 'Z').count() == zombies
            && all_settled(root)
        {
            return tree;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let t = proc_tree(tree.root);
    tree.root = root;
    panic!("tree never reached {members} members: {t:?}");
}

/// No member is still a shell about to exec (comm "sh" with a single child that is transient).
fn all_settled(root: i32) -> bool {
    proc_tree(root).iter().all(|(p, t)| {
        let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
        t.state != 'R' || comm.trim() != "unshare"
    })
}

/// Dump the tree and compare the recorded table with /proc, level by level.
fn dump_and_compare(tree: &Tree, name: &str) -> Checkpoint {
    let before = proc_tree(tree.root);
    let root_level = before[&tree.root].nspid.len() - 1;
    let dir = tempdir(name);
    let out = dump_subtree(tree.root, &dir);
    assert_ok(&out, "pdump dump of a tree");
    let cp = Checkpoint::open(&dir).unwrap();
    cp.verify_pages().unwrap();
    let inv = &cp.inventory;
    let recorded: BTreeMap<i32, &pdump::image::model::TaskEntry> =
        inv.tree.iter().map(|t| (t.pid, t)).collect();
    assert_eq!(
        recorded.keys().copied().collect::<Vec<_>>(),
        before.keys().copied().collect::<Vec<_>>(),
        "the dumped tree has exactly the tasks /proc showed"
    );
    // DFS order: every task comes after its parent.
    for (i, t) in inv.tree.iter().enumerate().skip(1) {
        let parent = std::fs::read_to_string(format!("/proc/{}/status", t.pid))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("PPid:"))
                    .map(|v| v.trim().parse::<i32>().unwrap())
            });
        if let Some(pp) = parent {
            if let Some(pi) = inv.tree.iter().position(|x| x.pid == pp) {
                assert!(pi < i, "task {} listed before its parent {pp}", t.pid);
            }
        }
    }
    for (pid, p) in &before {
        let r = recorded[pid];
        let lv = |v: &Vec<i32>| v[root_level.min(v.len())..].to_vec();
        assert_eq!(r.vpids, lv(&p.nspid), "pid {pid}: pids per level");
        assert_eq!(r.vtgids, lv(&p.nstgid), "pid {pid}: tgids per level");
        assert_eq!(r.vpgids, lv(&p.nspgid), "pid {pid}: pgids per level");
        assert_eq!(r.vsids, lv(&p.nssid), "pid {pid}: sids per level");
        assert_eq!(
            r.depth as usize,
            p.nspid.len() - 1 - root_level,
            "pid {pid}: depth"
        );
        assert_eq!(
            r.pgid, p.nspgid[root_level],
            "pid {pid}: pgid in the root's namespace"
        );
        assert_eq!(
            r.sid, p.nssid[root_level],
            "pid {pid}: sid in the root's namespace"
        );
        assert_eq!(r.threads.len() + 1, p.threads.max(1), "pid {pid}: threads");
        match (p.state, r.state) {
            ('Z', TaskState::Zombie { exit_code }) => {
                assert_eq!(exit_code, p.exit_code, "pid {pid}: exit status");
                assert_ne!(exit_code, 0, "pid {pid}: the zombies here exit non-zero");
            }
            ('T', TaskState::Stopped) => {}
            ('S' | 'R' | 'D', TaskState::Alive) => {}
            (s, r) => panic!("pid {pid}: /proc state {s} recorded as {r:?}"),
        }
        assert_eq!(
            r.pidns_init,
            *p.nspid.last().unwrap() == 1,
            "pid {pid}: pid-namespace init"
        );
    }
    // After the dump every member is as before.
    let after = proc_tree(tree.root);
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "members changed"
    );
    let class = |c: char| match c {
        'Z' | 'T' => c,
        _ => 'A', // running or sleeping: scheduling, not state
    };
    for (pid, p) in &after {
        assert_eq!(
            class(p.state),
            class(before[pid].state),
            "pid {pid} state changed by the dump"
        );
    }
    cp
}

/// SIGTERM every self-checking member; each must print OK.
fn finish(mut tree: Tree, victims: usize) {
    let all = proc_tree(tree.root);
    for (pid, t) in &all {
        if t.state == 'T' {
            // SAFETY: a signal to a member of this test's tree.
            unsafe { libc::kill(*pid, libc::SIGCONT) };
        }
    }
    for pid in all.keys() {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "pdump-victim" {
            // SAFETY: as above.
            unsafe { libc::kill(*pid, libc::SIGTERM) };
        }
    }
    let mut oks = 0;
    while oks < victims {
        let mut l = String::new();
        assert!(
            tree.out.read_line(&mut l).unwrap() > 0,
            "tree output ended after {oks} OKs"
        );
        assert!(!l.starts_with("FAIL"), "member failed: {l}");
        if l.starts_with("OK") {
            oks += 1;
        }
    }
}

/// A pid namespace `depth` levels deep under a plain root, with at every level:
/// a self-checking member, a new session, a process group, a zombie (exit 3)
/// whose parent is not the namespace init, and a multi-threaded member.
fn nested_script(depth: usize) -> (String, usize, usize) {
    let mut inner = String::from("$V threads 2 & sh -c '(exit 3) & exec sleep 1000' & wait");
    // Every level below gets the same zombie-making member.
    let mut victims = 1;
    let mut members = 4; // sh, threads victim, sleep, zombie
    for _ in 0..depth {
        inner = format!(
            "$V loop & setsid $V loop & sh -c '(exit 3) & exec $V loop' & unshare --pid --fork sh -c \"{}\" & wait",
            inner.replace('\\', "\\\\").replace('"', "\\\"")
        );
        victims += 3;
        members += 6; // sh, 3 victims, a zombie, unshare (+ the nested sh counted inside)
    }
    (inner, victims, members)
}

fn nested(depth: usize) {
    let (script, victims, members) = nested_script(depth);
    let tree = build(&script, victims, members, depth + 1);
    let cp = dump_and_compare(&tree, &format!("ns{depth}"));
    let max_depth = cp.inventory.tree.iter().map(|t| t.depth).max().unwrap();
    assert_eq!(max_depth as usize, depth, "namespaces {depth} levels deep");
    assert!(cp
        .inventory
        .tree
        .iter()
        .any(|t| matches!(t.state, TaskState::Zombie { .. }) && t.depth as usize == depth));
    assert!(cp.inventory.tree.iter().filter(|t| t.pidns_init).count() >= depth);
    finish(tree, victims);
}

#[test]
fn tree_with_pid_namespaces_one_level_deep() {
    root_or_skip!();
    nested(1);
}

#[test]
fn tree_with_pid_namespaces_two_levels_deep() {
    root_or_skip!();
    nested(2);
}

#[test]
fn tree_with_pid_namespaces_three_levels_deep() {
    root_or_skip!();
    nested(3);
}

#[test]
fn tree_with_sessions_groups_threads_and_a_stopped_task() {
    root_or_skip!();
    let script = "$V loop & setsid $V threads 3 & (setsid sh -c '$V loop & exec $V stopme') & \
                  sh -c '(exit 3) & exec $V loop' & wait";
    let tree = build(script, 5, 7, 1);
    // Wait for the stopped member to be in its stop.
    for _ in 0..2000 {
        if proc_tree(tree.root).values().any(|t| t.state == 'T') {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let cp = dump_and_compare(&tree, "sessions");
    assert!(cp
        .inventory
        .tree
        .iter()
        .any(|t| t.state == TaskState::Stopped));
    let sids: std::collections::BTreeSet<i32> = cp.inventory.tree.iter().map(|t| t.sid).collect();
    assert!(sids.len() >= 3, "several sessions recorded: {sids:?}");
    finish(tree, 5);
}

/// A self-checking `pdump-victim tree-preset` tree: dump it, compare with
/// /proc, then let it verify itself (ids, buffers, pipes, sockets, shared
/// file offsets, zombies) and report OK.
fn preset(name: &str) -> Checkpoint {
    let mut child = Command::new(victim())
        .args(["tree-preset", name])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut l = String::new();
    out.read_line(&mut l).unwrap();
    let w: Vec<&str> = l.split_whitespace().collect();
    assert_eq!(w.first(), Some(&"READY"), "{l}");
    let root: i32 = w[1].parse().unwrap();
    let tree = Tree { child, out, root };
    let cp = dump_and_compare(&tree, name);
    finish_preset(tree);
    cp
}

fn finish_preset(mut tree: Tree) {
    for (pid, t) in proc_tree(tree.root) {
        if t.state == 'T' {
            // SAFETY: a signal to a member of this test's tree.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }
    // SAFETY: as above.
    unsafe { libc::kill(tree.root, libc::SIGTERM) };
    let mut l = String::new();
    tree.out.read_line(&mut l).unwrap();
    assert!(
        l.starts_with("OK tree="),
        "the tree's own checks after the dump: {l}"
    );
}

#[test]
fn self_checking_tree_three_namespace_levels() {
    root_or_skip!();
    let cp = preset("ns3");
    assert_eq!(cp.inventory.tree.iter().map(|t| t.depth).max(), Some(3));
}

#[test]
fn pipes_socketpairs_and_shared_files_between_tree_members() {
    root_or_skip!();
    use pdump::image::model::FdKind;
    let cp = preset("ipc");
    // Shared open files: one object, references from several processes.
    let mut refs: BTreeMap<u64, std::collections::BTreeSet<i32>> = BTreeMap::new();
    for p in &cp.processes {
        for f in &p.fds {
            if let FdKind::Shared { file_id } = f.kind {
                refs.entry(file_id).or_default().insert(p.pid);
            }
        }
    }
    assert!(!cp.inventory.files.is_empty(), "no shared file objects");
    assert!(
        refs.values().any(|pids| pids.len() >= 2),
        "no object referenced by two processes: {refs:?}"
    );
    for o in &cp.inventory.files {
        assert!(refs.contains_key(&o.id), "object {} unreferenced", o.id);
        assert!(!matches!(o.kind, FdKind::Shared { .. }));
    }
    // Socketpairs: both ends inside, cross-linked by inode.
    let kind_of = |k: &FdKind| -> Option<(u64, u64)> {
        match k {
            FdKind::UnixSocket {
                inode, peer_inode, ..
            } => Some((*inode, *peer_inode)),
            _ => None,
        }
    };
    let mut socks = Vec::new();
    for p in &cp.processes {
        for f in &p.fds {
            let k = match &f.kind {
                FdKind::Shared { file_id } => {
                    &cp.inventory
                        .files
                        .iter()
                        .find(|o| o.id == *file_id)
                        .unwrap()
                        .kind
                }
                k => k,
            };
            if let Some(s) = kind_of(k) {
                socks.push((p.pid, s));
            }
        }
    }
    assert!(!socks.is_empty(), "no unix sockets recorded");
    for (pid, (ino, peer)) in &socks {
        assert!(
            socks.iter().any(|(_, (i, _))| i == peer),
            "pid {pid} socket {ino}: peer {peer} not in the tree"
        );
    }
    // Pipe data is recorded once per pipe.
    let mut data_per_pipe: BTreeMap<u64, usize> = BTreeMap::new();
    let all_kinds = cp
        .processes
        .iter()
        .flat_map(|p| p.fds.iter().map(|f| &f.kind))
        .chain(cp.inventory.files.iter().map(|o| &o.kind));
    for k in all_kinds {
        if let FdKind::Pipe { inode, data, .. } = k {
            if !data.is_empty() {
                *data_per_pipe.entry(*inode).or_default() += 1;
            }
        }
    }
    assert!(!data_per_pipe.is_empty(), "no buffered pipe data recorded");
    assert!(
        data_per_pipe.values().all(|&n| n == 1),
        "pipe data recorded more than once: {data_per_pipe:?}"
    );
}

#[test]
fn child_subreaper_is_recorded() {
    root_or_skip!();
    let script = "import ctypes, os, sys, time\n\
                  ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)\n\
                  pid = os.fork()\n\
                  if pid == 0:\n    time.sleep(1000)\n\
                  print('READY', os.getpid(), pid, flush=True)\n\
                  sys.stdin.readline()";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdout(Stdio::piped())
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut l = String::new();
    out.read_line(&mut l).unwrap();
    let w: Vec<i32> = l
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    let dir = tempdir("subreaper");
    let o = dump_subtree(w[0], &dir);
    assert_ok(&o, "dump");
    let cp = Checkpoint::open(&dir).unwrap();
    let root = cp.inventory.tree.iter().find(|t| t.pid == w[0]).unwrap();
    let kid = cp.inventory.tree.iter().find(|t| t.pid == w[1]).unwrap();
    assert!(root.child_subreaper, "PR_SET_CHILD_SUBREAPER recorded");
    assert!(!kid.child_subreaper);
    // SAFETY: killing processes this test spawned.
    unsafe { libc::kill(w[1], libc::SIGKILL) };
    let _ = child.kill();
    let _ = child.wait();
}

/// One member holds an fd pdump cannot dump (an inet socket): the whole dump
/// fails naming it, no inventory is left, and every member of the tree is
/// released exactly as it was (not traced, same maps, same fds, self-checks OK).
#[test]
fn failed_tree_dump_releases_every_member_untouched() {
    root_or_skip!();
    failed_tree_dump(true);
}

/// The same without `-R`: members already dumped keep their parasite until
/// the dump succeeds (then they are killed with it); this one fails, so
/// each is cured and released as it was, and none is killed.
#[test]
fn failed_kill_mode_tree_dump_cures_and_releases_every_member() {
    root_or_skip!();
    failed_tree_dump(false);
}

fn failed_tree_dump(leave_running: bool) {
    let script = "$V loop & $V threads 2 & python3 -c \"import socket,time,os; s=socket.socket(); \
                  print('READY', os.getpid(), s.fileno(), flush=True); time.sleep(1000)\" & wait";
    let tree = build(script, 3, 4, 0);
    let before = proc_tree(tree.root);
    let snap = |p: i32| {
        let maps = std::fs::read_to_string(format!("/proc/{p}/maps")).unwrap_or_default();
        let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{p}/fd"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        fds.sort();
        (maps, fds)
    };
    let state0: BTreeMap<i32, _> = before.keys().map(|&p| (p, snap(p))).collect();
    let dir = tempdir("failed-tree");
    let out = if leave_running {
        dump_subtree(tree.root, &dir)
    } else {
        let root = tree.root.to_string();
        pdump(&[
            "dump",
            "-t",
            &root,
            "-D",
            dir.to_str().unwrap(),
            "--subtree",
        ])
    };
    assert!(
        !out.status.success(),
        "a tree with an inet socket was dumped"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("inet"), "the error names the socket: {err}");
    assert!(
        !dir.join("inventory.img").exists(),
        "a failed dump left an inventory"
    );
    for (&p, s0) in &state0 {
        let st = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap();
        assert!(
            st.contains("TracerPid:\t0"),
            "pid {p} still traced after a failed dump"
        );
        assert_eq!(&snap(p), s0, "pid {p} changed by a failed dump");
    }
    finish(tree, 2);
}
