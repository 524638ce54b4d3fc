//! Single-process checkpoints of self-checking victims through the CLI.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use pdump::image::Checkpoint;

use crate::root_or_skip;
use crate::util::{assert_ok, pdump, tempdir, Victim};

fn dump_r(pid: i32, dir: &Path) {
    let out = pdump(&[
        "dump",
        "-t",
        &pid.to_string(),
        "-D",
        dir.to_str().unwrap(),
        "--leave-running",
    ]);
    assert_ok(&out, "pdump dump --leave-running");
}

/// Dump a victim 50 times with --leave-running; every checkpoint must open
/// and verify; the victim must then pass its own final checks.
fn dump_50(v: &Victim, name: &str) {
    let base = tempdir(name);
    for i in 0..50 {
        let dir = base.join(format!("d{i}"));
        dump_r(v.pid, &dir);
        if i % 10 == 0 {
            let cp = Checkpoint::open(&dir).expect("open checkpoint");
            cp.verify_pages().expect("page checksums");
            let p = &cp.processes[0];
            assert_eq!(p.pid, v.pid);
            assert!(!p.threads.is_empty() && !p.vmas.is_empty());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn dump_loop_victim_50_times() {
    root_or_skip!();
    let v = Victim::spawn("loop", &[]);
    dump_50(&v, "loop");
    v.finish();
}

#[test]
fn dump_zmm_victim_50_times() {
    root_or_skip!();
    let v = Victim::spawn("zmm", &[]);
    dump_50(&v, "zmm");
    v.finish();
}

#[test]
fn dump_threads_victim_50_times() {
    root_or_skip!();
    let v = Victim::spawn("threads", &["8"]);
    dump_50(&v, "threads");
    let dir = tempdir("threads-one");
    dump_r(v.pid, &dir);
    let cp = Checkpoint::open(&dir).unwrap();
    assert_eq!(cp.processes[0].threads.len(), 9, "main + 8 threads");
    v.finish();
}

#[test]
fn dump_sleeping_victim_keeps_sleep_semantics() {
    root_or_skip!();
    let mut v = Victim::spawn("sleep", &["2000"]);
    let base = tempdir("sleep");
    for i in 0..50 {
        let dir = base.join(format!("d{i}"));
        dump_r(v.pid, &dir);
        std::fs::remove_dir_all(&dir).unwrap();
    }
    v.expect_slept_2s("across 50 dumps");
}

#[test]
fn dump_blocked_reader_50_times() {
    root_or_skip!();
    let mut v = Victim::spawn("read", &[]);
    dump_50(&v, "read");
    v.write(b"hello\n");
    assert_eq!(v.line(), "GOT hello");
    v.expect_exit_ok();
}

#[test]
fn dump_stopped_victim_stays_stopped() {
    root_or_skip!();
    let v = Victim::spawn("stopme", &[]);
    for _ in 0..200 {
        if v.state() == 'T' {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(v.state(), 'T');
    dump_50(&v, "stopped");
    let dir = tempdir("stopped-one");
    dump_r(v.pid, &dir);
    let cp = Checkpoint::open(&dir).unwrap();
    assert!(
        cp.processes[0].threads[0].stopped,
        "the image records the stop"
    );
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(v.state(), 'T');
    v.signal(libc::SIGCONT);
    v.finish();
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

/// The pattern victim's page `i` (see src/bin/victim.rs): None if never touched.
fn pattern_page(i: u64, seed: u64) -> Option<Vec<u8>> {
    if i.is_multiple_of(7) {
        return None;
    }
    if i.is_multiple_of(5) {
        return Some(vec![0u8; 4096]);
    }
    let mut p = Vec::with_capacity(4096);
    for j in 0..512u64 {
        p.extend_from_slice(&splitmix64(seed ^ (i * 512 + j)).to_le_bytes());
    }
    Some(p)
}

#[test]
fn show_json_matches_known_memory_pattern_page_by_page() {
    root_or_skip!();
    let pages = 300u64;
    let seed = 0x1234u64;
    let v = Victim::spawn("pattern", &[&pages.to_string(), &seed.to_string()]);
    let base = u64::from_str_radix(v.ready[0].trim_start_matches("0x"), 16).unwrap();
    let untouched = u64::from_str_radix(v.ready[2].trim_start_matches("0x"), 16).unwrap();
    let dir = tempdir("pattern");
    dump_r(v.pid, &dir);
    let out = pdump(&["show", dir.to_str().unwrap(), "--json", "--pages"]);
    assert_ok(&out, "pdump show --json --pages");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vmas = j["processes"][0]["vmas"].as_array().expect("vmas array");
    let mut seen = std::collections::HashMap::new();
    for vma in vmas {
        if let Some(list) = vma["page_list"].as_array() {
            for p in list {
                seen.insert(
                    p["addr"].as_u64().unwrap(),
                    (p["crc32c"].as_u64().unwrap(), p["zero"].as_bool().unwrap()),
                );
            }
        }
    }
    for i in 0..pages {
        let addr = base + i * 4096;
        match pattern_page(i, seed) {
            None => assert!(
                !seen.contains_key(&addr),
                "page {i} was never touched but was dumped"
            ),
            Some(data) => {
                let (crc, zero) = seen
                    .get(&addr)
                    .unwrap_or_else(|| panic!("page {i} at {addr:#x} missing"));
                assert_eq!(*crc as u32, crc32c::crc32c(&data), "page {i} content");
                assert_eq!(*zero, data.iter().all(|&b| b == 0), "page {i} zero flag");
            }
        }
    }
    for i in 0..16 {
        assert!(
            !seen.contains_key(&(untouched + i * 4096)),
            "untouched mapping page {i} dumped"
        );
    }
    // The text rendering works too.
    let out = pdump(&["show", dir.to_str().unwrap()]);
    assert_ok(&out, "pdump show");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("process {}", v.pid)));
    v.finish();
}

#[test]
fn dump_records_fds_of_every_supported_kind() {
    root_or_skip!();
    let vdir = tempdir("fds-victim");
    let v = Victim::spawn_env("fds", &[], &[("PDUMP_VICTIM_DIR", vdir.to_str().unwrap())]);
    let dir = tempdir("fds");
    dump_r(v.pid, &dir);
    let cp = Checkpoint::open(&dir).unwrap();
    let fds = &cp.processes[0].fds;
    use pdump::image::model::FdKind;
    let nums: Vec<i32> = v.ready.iter().map(|s| s.parse().unwrap()).collect();
    let get = |n: i32| {
        &fds.iter()
            .find(|f| f.fd == n)
            .unwrap_or_else(|| panic!("fd {n} missing"))
            .kind
    };
    assert!(matches!(
        get(nums[0]),
        FdKind::Regular {
            pos: 123,
            size: 1000,
            unlinked_contents: None,
            ..
        }
    ));
    match get(nums[1]) {
        FdKind::Regular {
            unlinked_contents: Some(c),
            ..
        } => assert_eq!(cp.read_blob(c).unwrap(), b"unlinked-data"),
        k => panic!("unlinked file: {k:?}"),
    }
    assert!(matches!(get(nums[2]), FdKind::Directory { .. }));
    assert!(matches!(get(nums[3]), FdKind::DevNull));
    assert!(matches!(get(nums[4]), FdKind::DevZero));
    let pipe_data: Vec<u8> = [nums[5], nums[6]]
        .iter()
        .filter_map(|&n| match get(n) {
            FdKind::Pipe { data, .. } if !data.is_empty() => Some(cp.read_blob(data).unwrap()),
            _ => None,
        })
        .next()
        .expect("pipe data recorded");
    assert_eq!(pipe_data, b"buffered");
    match get(nums[7]) {
        FdKind::Fifo { data, .. } => assert_eq!(cp.read_blob(data).unwrap(), b"fifo-data"),
        k => panic!("fifo: {k:?}"),
    }
    assert!(matches!(get(nums[8]), FdKind::EventFd { count: 42, .. }));
    match get(nums[9]) {
        FdKind::Memfd { name, contents, .. } => {
            assert_eq!(name, "victim-memfd");
            assert_eq!(contents.len, 3 * 4096);
            let bytes = cp.read_blob(contents).unwrap();
            assert_eq!(bytes.len(), 3 * 4096);
        }
        k => panic!("memfd: {k:?}"),
    }
    // Dumping read nothing out of the pipes: the victim re-reads them.
    v.finish();
}

#[test]
fn unsupported_fd_refuses_and_leaves_task_untouched() {
    root_or_skip!();
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import socket,os,sys,time\ns=socket.socket()\nprint('READY',os.getpid(),s.fileno(),flush=True)\nsys.stdin.readline()\nprint('ALIVE',flush=True)",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut l = String::new();
    std::io::BufRead::read_line(&mut out, &mut l).unwrap();
    let w: Vec<&str> = l.split_whitespace().collect();
    let (pid, sockfd) = (w[1], w[2]);
    let maps_before = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let dir = tempdir("socket");
    let o = pdump(&["dump", "-t", pid, "-D", dir.to_str().unwrap(), "-R"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("fd {sockfd}")) && err.contains("socket"),
        "error must name the fd and its kind: {err}"
    );
    assert_eq!(
        err.matches("error:").count(),
        1,
        "the chain is printed once: {err}"
    );
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap(),
        maps_before
    );
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"go\n").unwrap();
    l.clear();
    std::io::BufRead::read_line(&mut out, &mut l).unwrap();
    assert_eq!(l.trim(), "ALIVE");
    assert!(child.wait().unwrap().success());
}

#[test]
fn dump_without_leave_running_kills_and_short_form_leaves_running() {
    root_or_skip!();
    let mut v = Victim::spawn("loop", &[]);
    let dir = tempdir("kill");
    let out = pdump(&[
        "dump",
        "-t",
        &v.pid.to_string(),
        "-D",
        dir.to_str().unwrap(),
    ]);
    assert_ok(&out, "pdump dump");
    let st = v.child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    Checkpoint::open(&dir).unwrap().verify_pages().unwrap();

    let v = Victim::spawn("loop", &[]);
    let cwd = tempdir("short");
    let out = Command::new(crate::util::pdump_bin())
        .arg(v.pid.to_string())
        .current_dir(&cwd)
        .output()
        .unwrap();
    assert_ok(&out, "pdump PID");
    Checkpoint::open(&cwd.join(format!("pdump-{}", v.pid))).unwrap();
    v.finish();
}

#[test]
fn dump_records_timers_and_handlers() {
    root_or_skip!();
    let v = Victim::spawn("timers", &[]);
    std::thread::sleep(Duration::from_millis(300));
    let dir = tempdir("timers");
    dump_r(v.pid, &dir);
    let cp = Checkpoint::open(&dir).unwrap();
    let p = &cp.processes[0];
    assert_eq!(
        p.itimers[0].interval_ns, 100_000_000,
        "ITIMER_REAL interval"
    );
    assert!(p.itimers[0].value_ns > 0 && p.itimers[0].value_ns <= 100_000_000);
    assert_eq!(p.posix_timers.len(), 1);
    assert_eq!(p.posix_timers[0].value.interval_ns, 50_000_000);
    assert_eq!(p.posix_timers[0].signo, libc::SIGUSR1);
    assert!(
        p.sigactions[libc::SIGALRM as usize - 1].handler > 1,
        "SIGALRM handler recorded"
    );
    assert!(
        p.sigactions[libc::SIGTERM as usize - 1].handler > 1,
        "SIGTERM handler recorded"
    );
    assert!(p.threads[0].altstack.size > 0, "altstack recorded");
    assert!(p.threads[0].rseq.is_some(), "glibc registers rseq");
    assert_ne!(
        p.threads[0].sigmask & (1 << (libc::SIGUSR2 - 1)),
        0,
        "SIGUSR2 blocked"
    );
    v.finish();
}

#[test]
fn show_reports_corrupt_and_truncated_images_with_file_and_offset() {
    root_or_skip!();
    let v = Victim::spawn("loop", &[]);
    let dir = tempdir("corrupt");
    dump_r(v.pid, &dir);
    let pid = v.pid;
    v.finish();
    let core = dir.join(format!("core-{pid}.img"));
    let pages = dir.join(format!("pages-{pid}.img"));
    let good_core = std::fs::read(&core).unwrap();
    let good_pages = std::fs::read(&pages).unwrap();
    let names_offset = |e: &str| e.contains("offset") || e.contains("byte");
    let show = |what: &str| {
        let out = pdump(&["show", dir.to_str().unwrap()]);
        assert!(
            !out.status.success(),
            "{what}: show accepted a damaged image"
        );
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!err.contains("panicked"), "{what}: pdump panicked: {err}");
        err
    };
    // A flipped payload byte in the core image.
    let mut b = good_core.clone();
    let mid = b.len() / 2;
    b[mid] ^= 0x40;
    std::fs::write(&core, &b).unwrap();
    let err = show("flipped core byte");
    assert!(
        err.contains(core.to_str().unwrap()),
        "names the file: {err}"
    );
    assert!(names_offset(&err), "names the offset: {err}");
    // A truncated core image.
    std::fs::write(&core, &good_core[..good_core.len() - 100]).unwrap();
    let err = show("truncated core");
    assert!(
        err.contains(core.to_str().unwrap()) && names_offset(&err),
        "{err}"
    );
    std::fs::write(&core, &good_core).unwrap();
    // Page data: `show` checks structure, `show --json --pages` reads the data.
    let mut p = good_pages.clone();
    p[4096 + 10] ^= 1;
    std::fs::write(&pages, &p).unwrap();
    let out = pdump(&["show", dir.to_str().unwrap(), "--json", "--pages"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(pages.to_str().unwrap()) && names_offset(&err),
        "{err}"
    );
    // A truncated pages file.
    std::fs::write(&pages, &good_pages[..good_pages.len() / 2]).unwrap();
    let err = show("truncated pages");
    assert!(err.contains(pages.to_str().unwrap()), "{err}");
}

/// Present pages of a PROT_NONE mapping cannot be vmspliced: pdump copies
/// them through /proc/PID/mem; their content must match page by page.
#[test]
fn unreadable_mapping_pages_are_dumped() {
    root_or_skip!();
    let v = Victim::spawn("protnone", &[]);
    let base = u64::from_str_radix(v.ready[0].trim_start_matches("0x"), 16).unwrap();
    let dir = tempdir("protnone");
    dump_r(v.pid, &dir);
    let out = pdump(&["show", dir.to_str().unwrap(), "--json", "--pages"]);
    assert_ok(&out, "show --json --pages");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut seen = std::collections::HashMap::new();
    for vma in j["processes"][0]["vmas"].as_array().unwrap() {
        for p in vma["page_list"].as_array().into_iter().flatten() {
            seen.insert(
                p["addr"].as_u64().unwrap(),
                p["crc32c"].as_u64().unwrap() as u32,
            );
        }
    }
    for i in 0..8u64 {
        let mut page = Vec::with_capacity(4096);
        for w in 0..512u64 {
            page.extend_from_slice(&splitmix64(7 ^ (i * 512 + w)).to_le_bytes());
        }
        let crc = seen
            .get(&(base + i * 4096))
            .unwrap_or_else(|| panic!("page {i} not dumped"));
        assert_eq!(*crc, crc32c::crc32c(&page), "page {i} content");
    }
    v.finish();
}
