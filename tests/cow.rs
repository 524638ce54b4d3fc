//! Copy-on-write snapshots (`dump -R`, the default; `--no-cow` turns it off).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use pdump::image::Checkpoint;

use crate::root_or_skip;
use crate::util::{assert_ok, pdump, pdump_bin, tempdir, Victim};

fn dump(pid: i32, dir: &Path, extra: &[&str]) {
    let pid = pid.to_string();
    // Every process through a snapshot, small ones too.
    let mut args = vec![
        "dump",
        "-t",
        &pid,
        "-D",
        dir.to_str().unwrap(),
        "-R",
        "--cow-min-size",
        "0",
    ];
    args.extend(extra);
    let out = pdump(&args);
    assert_ok(&out, &format!("pdump {args:?}"));
}

/// Every dumped page of the first process: address to bytes.
fn pages_of(dir: &Path) -> BTreeMap<u64, Vec<u8>> {
    let cp = Checkpoint::open(dir).expect("open checkpoint");
    cp.verify_pages().expect("page checksums");
    let p = &cp.processes[0];
    let mut out = BTreeMap::new();
    // Through PagesReader: zero runs have no bytes in the file.
    if let Some(pages) = cp.pages(p).unwrap() {
        for r in p.vmas.iter().flat_map(|v| &v.pages) {
            pages
                .for_each_page(r, |addr, page| {
                    out.insert(addr, page.to_vec());
                })
                .unwrap();
        }
    }
    out
}

/// Pids of the children of every thread of `pid`, with their state letter
/// and exit signal (/proc/PID/stat fields 3 and 38).
fn children(pid: i32) -> Vec<(i32, char, i32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().file_name();
        let list =
            std::fs::read_to_string(format!("/proc/{pid}/task/{}/children", t.to_string_lossy()))
                .unwrap_or_default();
        for c in list.split_whitespace() {
            let c: i32 = c.parse().unwrap();
            let Ok(st) = std::fs::read_to_string(format!("/proc/{c}/stat")) else {
                continue;
            };
            let f: Vec<&str> = st[st.rfind(')').unwrap() + 2..].split(' ').collect();
            out.push((c, f[0].chars().next().unwrap(), f[35].parse().unwrap()));
        }
    }
    out
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

/// `cow` victim: word `j` of global page `k` at generation `g`.
fn cow_word(g: u64, k: u64, j: u64) -> u64 {
    match j {
        0 => g,
        1 => k,
        _ => splitmix64((g << 40) ^ (k << 9) ^ j),
    }
}

fn cow_page(g: u64, k: u64) -> Vec<u8> {
    (0..512u64)
        .flat_map(|j| cow_word(g, k, j).to_le_bytes())
        .collect()
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}

/// Check a `cow` victim's image: every page of the four regions holds the
/// generation the header's cursor says (one moment: the fork for private
/// memory, the same freeze for shared, DONTFORK and WIPEONFORK memory).
/// Returns the cursor.
/// The cow victim's cursor (the first word of its header page), live.
fn live_cursor(pid: i32, header: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut w = [0u8; 8];
    mem.read_exact_at(&mut w, header).unwrap();
    u64::from_le_bytes(w)
}

fn check_cow_image(v: &Victim, dir: &Path) -> u64 {
    let header = hex(&v.ready[0]);
    let regions: Vec<u64> = (1..5).map(|i| hex(&v.ready[i])).collect();
    let npages: u64 = v.ready[5].parse().unwrap();
    let pages = pages_of(dir);
    let h = pages.get(&header).expect("header page dumped");
    let c = u64::from_le_bytes(h[..8].try_into().unwrap());
    assert_eq!(u64::from_le_bytes(h[8..16].try_into().unwrap()), npages);
    let total = 4 * npages;
    let (full, rem) = (c / total, c % total);
    for k in 0..total {
        let addr = regions[(k / npages) as usize] + (k % npages) * 4096;
        let got = pages
            .get(&addr)
            .unwrap_or_else(|| panic!("page {k} at {addr:#x} (region {}) missing", k / npages));
        let want = if k < rem { full + 1 } else { full };
        if k == rem {
            // The page being written at the freeze: each word old or new.
            for (j, w) in got.chunks(8).enumerate() {
                let w = u64::from_le_bytes(w.try_into().unwrap());
                let j = j as u64;
                assert!(
                    w == cow_word(full, k, j) || w == cow_word(full + 1, k, j),
                    "page {k} (being written) word {j} is {w:#x}"
                );
            }
            continue;
        }
        let gen = u64::from_le_bytes(got[..8].try_into().unwrap());
        assert!(
            *got == cow_page(want, k),
            "page {k} (region {}) holds generation {gen}, the cursor {c} says {want}",
            k / npages
        );
    }
    c
}

#[test]
fn cow_and_frozen_dumps_of_the_pattern_victim_are_identical() {
    root_or_skip!();
    let v = Victim::spawn("pattern", &["300", "0x4242"]);
    let base = tempdir("cow-pattern");
    dump(v.pid, &base.join("cow"), &[]);
    dump(v.pid, &base.join("frozen"), &["--no-cow"]);
    let a = pages_of(&base.join("cow"));
    let b = pages_of(&base.join("frozen"));
    // The same pages are present (the stack and libc data may change
    // between the two dumps: the victim wakes up every 100 ms).
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "dumped page addresses"
    );
    // The pattern mapping, page by page, against the known pattern.
    let start = hex(&v.ready[0]);
    for i in 0..300u64 {
        let addr = start + i * 4096;
        let want = if i % 7 == 0 {
            None
        } else if i % 5 == 0 {
            Some(vec![0u8; 4096])
        } else {
            Some(
                (0..512u64)
                    .flat_map(|j| splitmix64(0x4242 ^ (i * 512 + j)).to_le_bytes())
                    .collect::<Vec<u8>>(),
            )
        };
        assert!(
            a.get(&addr) == want.as_ref(),
            "page {i}: copy-on-write image"
        );
        assert!(b.get(&addr) == want.as_ref(), "page {i}: frozen image");
    }
    assert!(
        !std::fs::read_dir(base.join("cow")).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with('.')),
        "the spill file was left behind"
    );
    assert_eq!(children(v.pid), vec![], "the snapshot was not reaped");
    let _ = std::fs::remove_dir_all(&base);
    v.finish();
}

#[test]
fn cow_image_is_the_moment_of_the_fork_while_the_victim_writes() {
    root_or_skip!();
    let v = Victim::spawn("cow", &["512"]);
    let base = tempdir("cow-gen");
    let mut last = 0;
    for i in 0..5 {
        let dir = base.join(format!("d{i}"));
        dump(v.pid, &dir, &[]);
        let c = check_cow_image(&v, &dir);
        assert!(c > last, "the victim did not write between dumps");
        last = c;
        // The next dump must see new writes: wait until the victim (which
        // may not have had a CPU since) moved its cursor on.
        let header = hex(&v.ready[0]);
        let start = std::time::Instant::now();
        while live_cursor(v.pid, header) <= c {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(20),
                "the victim stopped writing after dump {i}"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(children(v.pid), vec![], "the snapshot was not reaped");
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let _ = std::fs::remove_dir_all(&base);
    // Its own checks: memory consistent, no SIGCHLD, wait() saw no child,
    // the shared region still shared, DONTFORK/WIPEONFORK still set.
    let ok = v.finish();
    let end: u64 = ok
        .split_whitespace()
        .find_map(|w| w.strip_prefix("cursor="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(end > last, "the victim stopped writing after the dumps");
}

#[test]
fn flags_set_after_the_smaps_pre_read_are_caught_and_the_dump_made_again() {
    root_or_skip!();
    // smaps is read before the freeze; the hook drops MADV_DONTFORK and
    // MADV_WIPEONFORK from that read, as if they had been set between the
    // read and the freeze. The snapshot shows them: the dump is made again,
    // reading smaps while frozen, and holds the moment of that freeze.
    let v = Victim::spawn("cow", &["256"]);
    let dir = tempdir("cow-stale-smaps");
    let out = Command::new(pdump_bin())
        .args(["dump", "-t", &v.pid.to_string(), "-D"])
        .arg(&dir)
        .args(["-R", "--cow-min-size", "0"])
        .env("PDUMP_TEST_STALE_SMAPS", "1")
        .output()
        .unwrap();
    assert_ok(&out, "dump with a stale smaps pre-read");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("dumping again, reading smaps while frozen"),
        "the changed flags were not noticed: {err}"
    );
    check_cow_image(&v, &dir);
    let cp = Checkpoint::open(&dir).unwrap();
    let flags = |addr: u64| {
        cp.processes[0]
            .vmas
            .iter()
            .find(|m| m.start == addr)
            .map(|m| m.vm_flags.to_string())
            .unwrap()
    };
    assert!(
        flags(hex(&v.ready[3])).contains("dc"),
        "{}",
        flags(hex(&v.ready[3]))
    );
    assert!(
        flags(hex(&v.ready[4])).contains("wf"),
        "{}",
        flags(hex(&v.ready[4]))
    );
    assert_eq!(children(v.pid), vec![], "a snapshot was not reaped");
    let _ = std::fs::remove_dir_all(&dir);
    v.finish();
}

#[test]
fn cow_tree_with_pid_namespace_init_and_stopped_members() {
    root_or_skip!();
    // The root is the init of a pid namespace: its snapshot's parent is the
    // init itself; every member's own final check passes.
    let v = Victim::spawn("tree-preset", &["ns1"]);
    let dir = tempdir("cow-ns1");
    let root = v.pid.to_string();
    let out = crate::util::pdump(&[
        "dump",
        "-t",
        &root,
        "-D",
        dir.to_str().unwrap(),
        "-R",
        "--subtree",
        "--cow-min-size",
        "0",
    ]);
    assert_ok(&out, "dump of ns1 with snapshots");
    let cp = Checkpoint::open(&dir).unwrap();
    cp.verify_pages().unwrap();
    for p in &cp.processes {
        let c = children(p.pid);
        assert!(
            c.iter().all(|&(_, _, sig)| sig != 0),
            "pid {}: a snapshot (exit signal 0) was left: {c:?}",
            p.pid
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    // SIGCONT for the stopped members, then SIGTERM to the root (tree protocol).
    for p in &cp.processes {
        // SAFETY: kill with pids of the victim tree.
        unsafe { libc::kill(p.pid, libc::SIGCONT) };
    }
    v.finish();
}

fn maps(pid: i32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn fds(pid: i32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            format!(
                "{:?} -> {:?}",
                e.file_name(),
                std::fs::read_link(e.path()).ok()
            )
        })
        .collect();
    v.sort();
    v
}

fn traced(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .map(|v| v.trim() != "0")
        .unwrap()
}

#[test]
fn cow_dumper_killed_at_every_fault_point() {
    root_or_skip!();
    let v = Victim::spawn("cow", &["64"]);
    let maps_before = maps(v.pid);
    let fds_before = fds(v.pid);
    let base = tempdir("cow-fault");
    let run = |dir: &Path, kill_at: Option<u64>| {
        let mut c = Command::new(pdump_bin());
        c.args([
            "dump",
            "-t",
            &v.pid.to_string(),
            "-D",
            dir.to_str().unwrap(),
            "-R",
            "--cow-min-size",
            "0",
        ]);
        match kill_at {
            Some(n) => c.env("PDUMP_FAULT_KILL_AT", n.to_string()),
            None => c.env("PDUMP_FAULT_REPORT", "1"),
        };
        c.output().unwrap()
    };
    let probe = run(&base.join("probe"), None);
    assert_ok(&probe, "probe dump");
    let err = String::from_utf8_lossy(&probe.stderr);
    let total: u64 = err
        .lines()
        .find_map(|l| l.strip_prefix("fault points: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no fault point count in {err:?}"));
    check_cow_image(&v, &base.join("probe"));
    let mut zombies = 0;
    for at in 1..=total {
        let dir = base.join(format!("d{at}"));
        let out = run(&dir, Some(at));
        use std::os::unix::process::ExitStatusExt;
        assert!(
            out.status.signal() == Some(libc::SIGKILL) || out.status.success(),
            "kill at {at}: {}",
            out.status
        );
        // The snapshot ends on end of file at once; the task is released.
        let mut settled = false;
        for _ in 0..400 {
            if !traced(v.pid) && children(v.pid).iter().all(|c| c.1 == 'Z') {
                settled = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            settled,
            "kill at {at}/{total}: still traced or a live snapshot: {:?}",
            children(v.pid)
        );
        // A snapshot whose dumper died before reaping it stays a zombie with
        // exit signal 0 (invisible to the victim's wait(), see
        // docs/architecture.md); nothing else may be left.
        let c = children(v.pid);
        assert!(
            c.iter().all(|&(_, st, sig)| st == 'Z' && sig == 0),
            "kill at {at}: {c:?}"
        );
        zombies = c.len();
        if out.status.success() {
            check_cow_image(&v, &dir);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    // A dump that gets as far as the parasite reaps what earlier killed
    // dumpers left (the zombies are named pdump-snapshot).
    let last = base.join("last");
    assert_ok(&run(&last, None), "a clean dump after the killed ones");
    assert_eq!(children(v.pid), vec![], "leftover snapshots not reaped");
    assert_eq!(fds(v.pid), fds_before, "a killed dumper left fds");
    // The only mapping a killed dumper may leave is the inert parasite area
    // of a blob that cured itself (rwxs, shared anonymous memory).
    for m in maps(v.pid) {
        if !maps_before.contains(&m) {
            assert!(
                m.split_whitespace().nth(1) == Some("rwxs") && m.contains("/dev/zero"),
                "unexpected mapping left: {m}"
            );
        }
    }
    eprintln!("{total} fault points, {zombies} unreaped snapshot zombies");
    let _ = std::fs::remove_dir_all(&base);
    // Memory consistent, no SIGCHLD, wait() never saw a child.
    v.finish();
}

/// `-R` copies a process with less resident anonymous and shmem memory than
/// `--cow-min-size` (default 1 MiB) while frozen, and drains the others
/// from a copy-on-write snapshot; the summary says how many went through a
/// snapshot. Every image holds the moment of its freeze, no snapshot is
/// left, and the victims' own checks pass.
#[test]
fn cow_min_size_picks_a_frozen_copy_or_a_snapshot() {
    root_or_skip!();
    let resident = |pid: i32| -> u64 {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        st.lines()
            .filter(|l| l.starts_with("RssAnon:") || l.starts_with("RssShmem:"))
            .map(|l| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024)
            .sum()
    };
    let base = tempdir("cow-min-size");
    let run = |pid: i32, name: &str, min: Option<&str>| -> String {
        let dir = base.join(name);
        let pid_s = pid.to_string();
        let mut args = vec!["dump", "-t", &pid_s, "-D", dir.to_str().unwrap(), "-R"];
        if let Some(m) = min {
            args.extend(["--cow-min-size", m]);
        }
        let out = pdump(&args);
        assert_ok(&out, &format!("pdump {args:?}"));
        assert_eq!(children(pid), vec![], "a snapshot was left");
        Checkpoint::open(&dir).unwrap().verify_pages().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let snapshot = "left running (1 of the processes through copy-on-write snapshots)";

    // The cow victim: 4 x 512 pages written (8 MiB), over the default.
    let v = Victim::spawn("cow", &["512"]);
    assert!(resident(v.pid) >= 1 << 20);
    for (name, min, through_snapshot) in [
        ("default", None, true),
        ("all", Some("0"), true),
        ("frozen", Some("1073741824"), false),
    ] {
        let out = run(v.pid, name, min);
        assert_eq!(out.contains(snapshot), through_snapshot, "{name}: {out}");
        assert!(out.contains("left running"), "{name}: {out}");
        check_cow_image(&v, &base.join(name));
    }
    v.finish();

    // A small process: the child of a two-process tree victim (a few
    // hundred KiB), dumped alone.
    let t = Victim::spawn("tree", &["p(p)"]);
    let small = pdump::tree::collect(t.pid).unwrap().children_of(t.pid)[0];
    assert!(resident(small) < 1 << 20, "the tree's members are small");
    let out = run(small, "small", None);
    assert!(!out.contains("copy-on-write"), "small: {out}");
    let out = run(small, "small-all", Some("0"));
    assert!(out.contains(snapshot), "small, --cow-min-size 0: {out}");
    t.finish();
    let _ = std::fs::remove_dir_all(&base);
}
