//! Seize, remote syscalls, infect and cure against self-checking victims.

use pdump::infect::Parasite;
use pdump::ptrace::Seized;
use pdump::remote::ThreadSnapshot;

use crate::root_or_skip;
use crate::util::Victim;

const CYCLES: usize = 1000;

fn maps(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap()
}

fn fd_table(pid: i32) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let link = std::fs::read_link(e.path())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            (e.file_name().to_string_lossy().into_owned(), link)
        })
        .collect();
    v.sort();
    v
}

/// One infect/cure cycle; asserts the task is exactly as before (every
/// thread's registers, xstate and mask; maps; fd table).
fn cycle(pid: i32, check_exact: bool) {
    let seized = Seized::seize(pid).expect("seize");
    let before: Vec<ThreadSnapshot> = seized
        .threads()
        .iter()
        .map(|t| ThreadSnapshot::take(&seized, t.tid).unwrap())
        .collect();
    let (maps0, fds0) = if check_exact {
        (maps(pid), fd_table(pid))
    } else {
        Default::default()
    };
    let mut p = Parasite::infect(&seized).expect("infect");
    assert_eq!(
        p.syscall(pdump_arch::native::syscall::nr::GETPID, &[])
            .unwrap(),
        pid as i64
    );
    p.cure().expect("cure");
    if check_exact {
        for b in &before {
            let a = ThreadSnapshot::take(&seized, b.tid).unwrap();
            assert_eq!(
                a.regs, b.regs,
                "thread {} registers changed by infect/cure",
                b.tid
            );
            assert_eq!(a.sigmask, b.sigmask, "thread {} mask changed", b.tid);
            assert!(a.fpregs == b.fpregs, "thread {} xstate changed", b.tid);
        }
        assert_eq!(maps(pid), maps0, "maps changed by infect/cure");
        assert_eq!(fd_table(pid), fds0, "fd table changed by infect/cure");
    }
    seized.detach().unwrap();
}

fn cycles(v: &Victim, n: usize) {
    for i in 0..n {
        cycle(v.pid, i % 50 == 0);
    }
}

#[test]
fn infect_cure_loop_victim() {
    root_or_skip!();
    let v = Victim::spawn("loop", &[]);
    cycles(&v, CYCLES);
    v.finish();
}

#[test]
fn infect_cure_zmm_victim() {
    root_or_skip!();
    let v = Victim::spawn("zmm", &[]);
    cycles(&v, CYCLES);
    v.finish();
}

#[test]
fn infect_cure_threads_victim() {
    root_or_skip!();
    let v = Victim::spawn("threads", &["8"]);
    cycles(&v, CYCLES);
    v.finish();
}

#[test]
fn infect_cure_nanosleep_restarts() {
    root_or_skip!();
    let mut v = Victim::spawn("sleep", &["2000"]);
    // As many cycles as fit well inside the sleep; the sleep must still last ~2 s in total.
    let start = std::time::Instant::now();
    let mut n = 0;
    while start.elapsed() < std::time::Duration::from_millis(1200) && n < CYCLES {
        cycle(v.pid, n % 50 == 0);
        n += 1;
    }
    assert!(n > 10, "only {n} cycles");
    v.expect_slept_2s(&format!("after {n} infect/cure cycles"));
}

#[test]
fn infect_cure_blocked_read_restarts() {
    root_or_skip!();
    let mut v = Victim::spawn("read", &[]);
    cycles(&v, CYCLES);
    v.write(b"hello\n");
    assert_eq!(v.line(), "GOT hello");
    v.expect_exit_ok();
}

#[test]
fn infect_cure_stopped_task_stays_stopped() {
    root_or_skip!();
    let v = Victim::spawn("stopme", &[]);
    for _ in 0..200 {
        if v.state() == 'T' {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(v.state(), 'T');
    cycles(&v, CYCLES);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(v.state(), 'T', "a stopped task must stay stopped");
    v.signal(libc::SIGCONT);
    v.finish();
}

#[test]
fn seize_refuses_bad_targets() {
    root_or_skip!();
    use pdump::ptrace::PtraceError;
    // pdump itself
    let me = std::process::id() as i32;
    assert!(matches!(
        Seized::seize(me),
        Err(PtraceError::SelfTarget { .. })
    ));
    // a missing pid
    assert!(matches!(
        Seized::seize(0x3fff_fff0),
        Err(PtraceError::NoSuchProcess { .. })
    ));
    // a kernel thread (kthreadd is pid 2 in the initial pid namespace)
    if std::fs::read_to_string("/proc/2/comm")
        .map(|c| c.trim() == "kthreadd")
        .unwrap_or(false)
    {
        assert!(matches!(
            Seized::seize(2),
            Err(PtraceError::KernelThread { .. })
        ));
    }
    // a zombie
    let mut z = std::process::Command::new("true").spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(matches!(
        Seized::seize(z.id() as i32),
        Err(PtraceError::Zombie { .. })
    ));
    z.wait().unwrap();
    // a task already traced: the first seize holds it
    let v = Victim::spawn("loop", &[]);
    let first = Seized::seize(v.pid).unwrap();
    match Seized::seize(v.pid) {
        // ptrace is per thread: the tracer is this test's thread.
        Err(PtraceError::AlreadyTraced { tracer, .. }) => {
            assert_eq!(tracer, unsafe { libc::gettid() })
        }
        other => panic!("expected AlreadyTraced, got {other:?}"),
    }
    drop(first);
    v.finish();
}

#[test]
fn remote_syscalls_in_every_thread_restore_text_and_registers() {
    root_or_skip!();
    use pdump::remote::{read_memory, RemoteThread, Stub};
    let v = Victim::spawn("threads", &["3"]);
    let seized = Seized::seize(v.pid).unwrap();
    let place = Stub::place(v.pid).unwrap();
    let mut text0 = [0u8; 16];
    read_memory(v.pid, place, &mut text0).unwrap();
    let snaps: Vec<ThreadSnapshot> = seized
        .threads()
        .iter()
        .map(|t| ThreadSnapshot::take(&seized, t.tid).unwrap())
        .collect();
    let stub = Stub::install(&seized).unwrap();
    assert_eq!(stub.addr, place);
    let mut text1 = [0u8; 8];
    read_memory(v.pid, place, &mut text1).unwrap();
    assert_eq!(
        text1,
        pdump_arch::native::stub::SYSCALL_STUB,
        "stub swapped in"
    );
    for s in &snaps {
        let mut rt = RemoteThread::begin(&seized, &stub, s).unwrap();
        let tid = rt
            .syscall(pdump_arch::native::syscall::nr::GETTID, &[])
            .unwrap();
        assert_eq!(tid, s.tid as i64, "the syscall ran in that very thread");
        let bad = rt
            .syscall(pdump_arch::native::syscall::nr::CLOSE, &[999_999])
            .unwrap();
        assert_eq!(bad, -(libc::EBADF as i64), "errors come back as -errno");
        rt.end().unwrap();
        let after = ThreadSnapshot::take(&seized, s.tid).unwrap();
        assert_eq!(after.regs, s.regs);
        assert_eq!(after.sigmask, s.sigmask);
        assert!(after.fpregs == s.fpregs);
    }
    stub.remove().unwrap();
    let mut text2 = [0u8; 16];
    read_memory(v.pid, place, &mut text2).unwrap();
    assert_eq!(text2, text0, "original text restored");
    drop(seized);
    v.finish();
}

#[test]
fn read_memory_sees_the_victims_pattern() {
    root_or_skip!();
    let v = Victim::spawn("pattern", &["16", "5"]);
    let base = u64::from_str_radix(v.ready[0].trim_start_matches("0x"), 16).unwrap();
    let mut page = vec![0u8; 4096];
    pdump::remote::read_memory(v.pid, base + 4096, &mut page).unwrap();
    let w = u64::from_le_bytes(page[..8].try_into().unwrap());
    // page 1, word 0 = splitmix64(seed ^ 512)
    let mut z = (5u64 ^ 512).wrapping_add(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    assert_eq!(w, z ^ (z >> 31));
    v.finish();
}

#[test]
fn check_lists_kernel_features() {
    root_or_skip!();
    let out = crate::util::pdump(&["check"]);
    crate::util::assert_ok(&out, "pdump check");
    let text = String::from_utf8_lossy(&out.stdout);
    for f in [
        "PTRACE_SEIZE",
        "pidfd_getfd",
        "vmsplice",
        "PAGEMAP_SCAN",
        "PROCMAP_QUERY",
        "clone3",
    ] {
        assert!(
            text.contains(f),
            "pdump check does not mention {f}:\n{text}"
        );
    }
    let out = crate::util::pdump(&["check", "--json"]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let feats = j.as_array().unwrap();
    let get = |name: &str| {
        feats
            .iter()
            .find(|f| f["name"].as_str().unwrap().contains(name))
            .unwrap()
    };
    assert_eq!(get("PTRACE_SEIZE")["present"], true);
    assert_eq!(get("pidfd_getfd")["present"], true);
}

/// Infect and cure back to back, nothing in between: the blob must be past
/// its handshake before the dumper takes the guard again for FINI.
#[test]
fn infect_then_cure_immediately() {
    root_or_skip!();
    let v = Victim::spawn("loop", &[]);
    for _ in 0..300 {
        let seized = Seized::seize(v.pid).unwrap();
        Parasite::infect(&seized).unwrap().cure().unwrap();
        seized.detach().unwrap();
    }
    v.finish();
}
