//! ELF cores (`pdump core`, `pdump::Snapshot`) checked with gdb against the
//! live process: threads, backtraces, registers (zmm included), globals and
//! heap; the process keeps running and passes its own checks afterwards.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};
use object::Endianness;
use pdump::image::Checkpoint;
use pdump::{CoreOptions, Snapshot, SnapshotOptions};

use crate::root_or_skip;
use crate::util::{assert_ok, pdump, tempdir, Victim};

const VICTIM: &str = env!("CARGO_BIN_EXE_pdump-victim");

/// gdb is needed to read the cores; outside CI a missing gdb skips loudly,
/// with CI=true it fails (.ci/run installs it).
fn require_gdb(test: &str) -> bool {
    let ok = Command::new("gdb")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: CI=true but gdb is not installed");
        }
        eprintln!("\n!!!!! SKIPPED {test}: gdb is not installed !!!!!\n");
    }
    ok
}

macro_rules! gdb_or_skip {
    () => {
        root_or_skip!();
        if !require_gdb(module_path!()) {
            return;
        }
    };
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Run gdb in batch mode on the victim binary and a core (or attached to a
/// live pid); `cmds` are gdb commands. Sections are delimited with
/// `echo @@NAME` markers; returns the whole output.
fn gdb(target: &GdbTarget, cmds: &[String]) -> String {
    let mut c = Command::new("gdb");
    c.args(["-nx", "--batch"]);
    for pre in ["set pagination off", "set width 0", "set confirm off"] {
        c.args(["-ex", pre]);
    }
    if let GdbTarget::Live(pid) = target {
        c.args(["-p", &pid.to_string()]);
    }
    for cmd in cmds {
        c.args(["-ex", cmd]);
    }
    c.arg(VICTIM);
    if let GdbTarget::Core(path) = target {
        c.arg(path);
    }
    let out = c.output().expect("running gdb");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("@@END"),
        "gdb did not run every command ({}):\n{text}",
        out.status
    );
    text
}

enum GdbTarget<'a> {
    Live(i32),
    Core(&'a Path),
}

/// The text between `@@name` and the next `@@` marker.
fn section<'a>(text: &'a str, name: &str) -> &'a str {
    let start = text
        .find(&format!("@@{name}\n"))
        .unwrap_or_else(|| panic!("no section {name} in gdb output:\n{text}"))
        + name.len()
        + 3;
    let end = text[start..].find("@@").map_or(text.len(), |e| start + e);
    &text[start..end]
}

/// Hex numbers (0x...) in a piece of gdb output, in order.
fn hex_words(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_alphanumeric())
        .filter_map(|t| t.strip_prefix("0x"))
        .filter_map(|h| u64::from_str_radix(h, 16).ok())
        .collect()
}

/// What gdb shows of one thread.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct GdbThread {
    /// Function names of the backtrace, innermost first.
    frames: Vec<String>,
    rip: u64,
    rsp: u64,
}

/// What gdb shows of a process: `info threads` LWPs and per-LWP backtraces
/// and registers.
#[derive(Debug, Default)]
struct GdbView {
    info_threads: Vec<i32>,
    threads: BTreeMap<i32, GdbThread>,
    raw: String,
}

/// The LWP in a `Thread N (... (LWP X)...)` header or `info threads` line.
fn lwp_of(line: &str) -> Option<i32> {
    let i = line.find("(LWP ")? + 5;
    let rest = &line[i..];
    rest[..rest.find(')')?].trim().parse().ok()
}

/// The function name of a backtrace line `#N  [0xADDR in ]NAME (...) ...`.
fn frame_name(line: &str) -> Option<String> {
    let rest = line.strip_prefix('#')?;
    let rest = rest.trim_start_matches(|c: char| c.is_ascii_digit()).trim();
    let rest = match rest.split_once(" in ") {
        Some((addr, r)) if addr.starts_with("0x") => r,
        _ => rest,
    };
    Some(rest.split(" (").next()?.trim().to_string())
}

fn view_commands() -> Vec<String> {
    [
        "set language c",
        "echo @@THREADS\\n",
        "info threads",
        "echo @@BT\\n",
        "thread apply all bt",
        "echo @@REGS\\n",
        "thread apply all info registers rip rsp",
        "echo @@END\\n",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn parse_view(text: String) -> GdbView {
    let mut v = GdbView::default();
    for l in section(&text, "THREADS").lines() {
        let t = l.trim_start().trim_start_matches('*').trim_start();
        if t.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            if let Some(lwp) = lwp_of(t) {
                v.info_threads.push(lwp);
            }
        }
    }
    let mut cur = None;
    for l in section(&text, "BT").lines() {
        if l.starts_with("Thread ") {
            cur = lwp_of(l);
        } else if let (Some(lwp), Some(name)) = (cur, frame_name(l)) {
            v.threads.entry(lwp).or_default().frames.push(name);
        }
    }
    for l in section(&text, "REGS").lines() {
        if l.starts_with("Thread ") {
            cur = lwp_of(l);
        } else if let Some(lwp) = cur {
            let t = v.threads.entry(lwp).or_default();
            let w = hex_words(l);
            if l.starts_with("rip ") {
                t.rip = w[0];
            } else if l.starts_with("rsp ") {
                t.rsp = w[0];
            }
        }
    }
    v.raw = text;
    v
}

fn tids(pid: i32) -> Vec<i32> {
    let mut t: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
        .collect();
    t.sort();
    t
}

/// The victim is running, not traced, not stopped: right away no tracer
/// and no stop, and it settles back into its sleep (a thread just released
/// may be running for a moment while its syscall restarts).
fn assert_running_untraced(pid: i32) {
    let field = |name: &str| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let v = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .to_string();
        (v, status)
    };
    let (tracer, status) = field("TracerPid:");
    assert_eq!(tracer, "0", "still traced:\n{status}");
    let (state, status) = field("State:");
    assert!(!state.starts_with(['t', 'T']), "stopped:\n{status}");
    for _ in 0..200 {
        if field("State:").0.starts_with('S') {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("not back in its sleep after 2 s:\n{}", field("State:").1);
}

/// The `core` victim's globals as gdb reads them from `core`.
fn check_globals(core: &Path, v: &Victim) {
    let pid = v.pid;
    let global_addr = u64::from_str_radix(v.ready[1].trim_start_matches("0x"), 16).unwrap();
    let heap_addr = u64::from_str_radix(v.ready[2].trim_start_matches("0x"), 16).unwrap();
    let cmds: Vec<String> = [
        "set language c",
        "echo @@GLOBAL\\n",
        "x/gx &PDUMP_CORE_GLOBAL",
        "echo @@HEAPPTR\\n",
        "x/gx &PDUMP_CORE_HEAP",
        "echo @@HEAP\\n",
        "x/64gx *(unsigned long *)&PDUMP_CORE_HEAP",
        "echo @@END\\n",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = gdb(&GdbTarget::Core(core), &cmds);
    let g = hex_words(section(&out, "GLOBAL"));
    assert_eq!(g[0], global_addr, "address of the global:\n{out}");
    assert_eq!(
        g[1],
        splitmix64(0xC0DE_0000_0000 ^ pid as u64),
        "the global's value:\n{out}"
    );
    assert_eq!(hex_words(section(&out, "HEAPPTR"))[1], heap_addr);
    // Lines are "ADDR:\tW\tW": drop the addresses.
    let heap: Vec<u64> = section(&out, "HEAP")
        .lines()
        .filter(|l| l.starts_with("0x"))
        .flat_map(|l| hex_words(l).into_iter().skip(1))
        .collect();
    let want: Vec<u64> = (0..64u64)
        .map(|j| splitmix64(0xC0DE_1000_0000 ^ ((pid as u64) << 8) ^ j))
        .collect();
    assert_eq!(heap, want, "the heap block:\n{out}");
}

/// gdb on the core shows what gdb showed on the live process: every thread,
/// the same backtrace function names and the same rip/rsp for each LWP.
fn check_against_live(core: &Path, live: &GdbView, pid: i32, n: usize) {
    let c = parse_view(gdb(&GdbTarget::Core(core), &view_commands()));
    let mut listed = c.info_threads.clone();
    listed.sort();
    assert_eq!(listed, tids(pid), "info threads:\n{}", c.raw);
    assert_eq!(c.info_threads[0], pid, "the leader comes first");
    assert_eq!(c.threads.len(), n + 1);
    for (lwp, lt) in &live.threads {
        let ct = &c.threads[lwp];
        assert_eq!(
            ct.frames, lt.frames,
            "backtrace of LWP {lwp}:\ncore:\n{}\nlive:\n{}",
            c.raw, live.raw
        );
        assert_eq!((ct.rip, ct.rsp), (lt.rip, lt.rsp), "rip/rsp of LWP {lwp}");
        assert!(ct.rip != 0 && ct.rsp != 0);
    }
    // The frames the victim set up are there.
    let main = &c.threads[&pid].frames;
    assert!(
        main.iter().any(|f| f.ends_with("core_main_wait")),
        "{main:?}"
    );
    for (lwp, t) in c.threads.iter().filter(|(l, _)| **l != pid) {
        assert!(
            t.frames.iter().any(|f| f.ends_with("core_block")),
            "LWP {lwp}: {:?}",
            t.frames
        );
        assert!(
            t.frames.iter().any(|f| f.contains("core_stack_")),
            "LWP {lwp}: {:?}",
            t.frames
        );
    }
}

fn live_view(pid: i32) -> GdbView {
    let v = parse_view(gdb(&GdbTarget::Live(pid), &view_commands()));
    assert!(!v.threads.is_empty(), "gdb -p saw no thread:\n{}", v.raw);
    v
}

#[test]
fn live_core_matches_the_live_process_in_gdb() {
    gdb_or_skip!();
    let n = 3;
    let v = Victim::spawn("core", &[&n.to_string()]);
    let live = live_view(v.pid);
    assert_eq!(live.threads.len(), n + 1, "{}", live.raw);
    let dir = tempdir("core-live");
    let core = dir.join(format!("core.{}", v.pid));
    let out = pdump(&["core", &v.pid.to_string(), "-o", core.to_str().unwrap()]);
    assert_ok(&out, "pdump core PID");
    assert_running_untraced(v.pid);
    // Only the core is left behind (the temporary images are gone).
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(left, std::slice::from_ref(&core));
    check_against_live(&core, &live, v.pid, n);
    check_globals(&core, &v);
    let last = v.finish();
    assert_eq!(last, format!("OK threads={n}"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn checkpoint_core_matches_the_live_process_in_gdb() {
    gdb_or_skip!();
    let n = 4;
    let v = Victim::spawn("core", &[&n.to_string()]);
    let live = live_view(v.pid);
    let dir = tempdir("core-dir");
    let ckpt = dir.join("ckpt");
    assert_ok(
        &pdump(&[
            "dump",
            "-t",
            &v.pid.to_string(),
            "-D",
            ckpt.to_str().unwrap(),
            "-R",
        ]),
        "pdump dump -R",
    );
    // Default output name: core.PID in the current directory.
    let out = Command::new(crate::util::pdump_bin())
        .current_dir(&dir)
        .args(["core", "ckpt"])
        .output()
        .unwrap();
    assert_ok(&out, "pdump core DIR");
    let core = dir.join(format!("core.{}", v.pid));
    assert!(core.exists());
    check_against_live(&core, &live, v.pid, n);
    check_globals(&core, &v);
    // rip/rsp in the core are the checkpoint's registers.
    let cp = Checkpoint::open(&ckpt).unwrap();
    let c = parse_view(gdb(&GdbTarget::Core(&core), &view_commands()));
    for t in &cp.processes[0].threads {
        let g = &c.threads[&t.tid];
        assert_eq!((g.rip, g.rsp), (t.gpr[16], t.gpr[19]), "tid {}", t.tid);
    }
    assert_eq!(v.finish(), format!("OK threads={n}"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The values the `zmm` victim's thread `t` (0 main, 1 worker) holds.
fn zmm_expected(t: u64, i: u64) -> Vec<u64> {
    (0..8)
        .map(|l| splitmix64(0x5A5A_0000_0000 ^ (t << 16) ^ (i << 4) ^ l))
        .collect()
}

fn k_expected(t: u64, i: u64) -> u64 {
    splitmix64(0x6B6B_0000_0000 ^ (t << 16) ^ i)
}

fn check_zmm(core: &Path) {
    let mut cmds = Vec::new();
    for thread in [1, 2] {
        cmds.push(format!("echo @@SWITCH{thread}\\n"));
        cmds.push(format!("thread {thread}"));
        for i in [0, 7, 15, 16, 31] {
            cmds.push(format!("echo @@T{thread}ZMM{i}\\n"));
            cmds.push(format!("p/x $zmm{i}.v8_int64"));
        }
        for i in [1, 7] {
            cmds.push(format!("echo @@T{thread}K{i}\\n"));
            cmds.push(format!("p/x $k{i}"));
        }
    }
    cmds.push("echo @@END\\n".into());
    let out = gdb(&GdbTarget::Core(core), &cmds);
    for (thread, t) in [(1, 0u64), (2, 1u64)] {
        for i in [0, 7, 15, 16, 31] {
            let got = hex_words(section(&out, &format!("T{thread}ZMM{i}")));
            assert_eq!(got, zmm_expected(t, i), "thread {thread} zmm{i}:\n{out}");
        }
        for i in [1, 7] {
            let got = hex_words(section(&out, &format!("T{thread}K{i}")));
            assert_eq!(got, [k_expected(t, i)], "thread {thread} k{i}:\n{out}");
        }
    }
}

#[test]
fn zmm_registers_in_live_and_checkpoint_cores() {
    gdb_or_skip!();
    let v = Victim::spawn("zmm", &[]);
    if v.ready[0] != "avx512" {
        eprintln!("no AVX-512 here: zmm registers not checked");
        return;
    }
    let dir = tempdir("core-zmm");
    let live = dir.join("core.live");
    assert_ok(
        &pdump(&["core", &v.pid.to_string(), "-o", live.to_str().unwrap()]),
        "pdump core PID",
    );
    check_zmm(&live);
    let ckpt = dir.join("ckpt");
    assert_ok(
        &pdump(&[
            "dump",
            "-t",
            &v.pid.to_string(),
            "-D",
            ckpt.to_str().unwrap(),
            "-R",
        ]),
        "pdump dump -R",
    );
    let from_dir = dir.join("core.dir");
    assert_ok(
        &pdump(&[
            "core",
            ckpt.to_str().unwrap(),
            "-o",
            from_dir.to_str().unwrap(),
        ]),
        "pdump core DIR",
    );
    check_zmm(&from_dir);
    assert!(v.finish().starts_with("OK checks="));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Program headers of a core: (vaddr, memsz, offset, filesz).
fn loads(bytes: &[u8]) -> Vec<(u64, u64, u64, u64)> {
    let elf = ElfFile64::<Endianness>::parse(bytes).expect("a valid ELF file");
    let e = elf.endian();
    assert_eq!(elf.elf_header().e_type(e), object::elf::ET_CORE);
    elf.elf_program_headers()
        .iter()
        .filter(|p| p.p_type(e) == object::elf::PT_LOAD)
        .map(|p| (p.p_vaddr(e), p.p_memsz(e), p.p_offset(e), p.p_filesz(e)))
        .collect()
}

/// Notes of a core: (name, type, descriptor).
fn notes(bytes: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
    let elf = ElfFile64::<Endianness>::parse(bytes).unwrap();
    let e = elf.endian();
    let mut out = Vec::new();
    for p in elf.elf_program_headers() {
        if let Some(mut it) = p.notes(e, elf.data()).unwrap() {
            while let Some(n) = it.next().unwrap() {
                out.push((
                    String::from_utf8_lossy(n.name()).into_owned(),
                    n.n_type(e).0,
                    n.desc().to_vec(),
                ));
            }
        }
    }
    out
}

#[test]
fn snapshot_api_threads_memory_and_filter() {
    root_or_skip!();
    let v = Victim::spawn("core", &["2"]);
    let dir = tempdir("core-api");
    let opts = SnapshotOptions {
        work_dir: Some(dir.clone()),
    };
    let snap = Snapshot::take(v.pid, &opts).expect("Snapshot::take");
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "images left behind"
    );
    assert_running_untraced(v.pid);
    let tids_snap: Vec<i32> = snap.threads().map(|t| t.tid()).collect();
    assert_eq!(tids_snap[0], v.pid, "leader first");
    let mut sorted = tids_snap.clone();
    sorted.sort();
    assert_eq!(sorted, tids(v.pid));
    for t in snap.threads() {
        let rip = t.register("rip").unwrap();
        let m = snap.mapping_at(rip).expect("rip is mapped");
        assert!(m.prot & 4 != 0, "rip {rip:#x} in a non-executable mapping");
        assert!(snap.mapping_at(t.register("rsp").unwrap()).is_some());
    }
    // Memory: the global (a written page of the executable's data), the heap.
    let global = u64::from_str_radix(v.ready[1].trim_start_matches("0x"), 16).unwrap();
    let heap = u64::from_str_radix(v.ready[2].trim_start_matches("0x"), 16).unwrap();
    let mut w = [0u8; 8];
    snap.read_memory(global, &mut w).unwrap();
    assert_eq!(
        u64::from_le_bytes(w),
        splitmix64(0xC0DE_0000_0000 ^ v.pid as u64)
    );
    let mut block = vec![0u8; 64 * 8];
    snap.read_memory(heap, &mut block).unwrap();
    for (j, c) in block.chunks(8).enumerate() {
        let want = splitmix64(0xC0DE_1000_0000 ^ ((v.pid as u64) << 8) ^ j as u64);
        assert_eq!(
            u64::from_le_bytes(c.try_into().unwrap()),
            want,
            "heap word {j}"
        );
    }
    // Pages of a private file mapping that are not in the image (never
    // written: the executable's headers and read-only data) read from the file.
    let exe = std::fs::read(VICTIM).unwrap();
    let ro = snap
        .mappings()
        .iter()
        .find(|m| m.path.as_deref() == Some(VICTIM) && m.offset == 0)
        .expect("the first mapping of the victim's file");
    assert!(ro.pages.is_empty() && ro.end - ro.start > 4096, "{ro:x?}");
    let mut page = vec![0u8; 4096];
    snap.read_memory(ro.start + 4096, &mut page).unwrap();
    assert_eq!(page, exe[4096..8192]);
    assert!(
        snap.read_memory(0x1000, &mut w).is_err(),
        "page 1 is unmapped"
    );

    // The default filter (0x33) keeps only the ELF header page of a file
    // mapping with no written page; 0x37 includes it whole, from the file.
    let c33 = dir.join("core.33");
    let s = snap.write_core(&c33, &CoreOptions::default()).unwrap();
    assert_eq!(
        (s.threads, s.segments, s.filter),
        (3, snap.mappings().len(), 0x33)
    );
    let c37 = dir.join("core.37");
    snap.write_core(&c37, &CoreOptions { filter: Some(0x37) })
        .unwrap();
    let (b33, b37) = (std::fs::read(&c33).unwrap(), std::fs::read(&c37).unwrap());
    let (l33, l37) = (loads(&b33), loads(&b37));
    assert_eq!(l33.len(), snap.mappings().len());
    for (m, (l, &(vaddr, memsz, ..))) in snap.mappings().iter().zip(l33.iter().zip(&l37)) {
        assert_eq!((l.0, l.1), (m.start, m.end - m.start));
        assert_eq!((vaddr, memsz), (l.0, l.1));
        if !m.pages.is_empty() && !m.shared {
            assert_eq!(l.3, l.1, "{m:x?}: a mapping with written pages is whole");
        }
    }
    let seg = |ls: &[(u64, u64, u64, u64)]| *ls.iter().find(|l| l.0 == ro.start).unwrap();
    let r33 = seg(&l33);
    assert_eq!(r33.3, 4096, "only the ELF header page with 0x33");
    assert_eq!(b33[r33.2 as usize..][..4096], exe[..4096]);
    let r37 = seg(&l37);
    assert_eq!(r37.3, r37.1, "the whole mapping with 0x37");
    assert_eq!(
        b37[r37.2 as usize..][..r37.3 as usize],
        exe[..r37.3 as usize]
    );
    // The heap segment holds the heap block in both.
    for (b, l) in [(&b33, &l33), (&b37, &l37)] {
        let h = l.iter().find(|l| l.0 <= heap && heap < l.0 + l.3).unwrap();
        let at = (h.2 + heap - h.0) as usize;
        assert_eq!(b[at..at + 64 * 8], block[..]);
    }
    // Notes: PRSTATUS per thread (leader first), PRPSINFO, SIGINFO, AUXV,
    // FILE once, FPREGSET and XSTATE per thread, one layout note.
    let ns = notes(&b33);
    let count = |t: u32| ns.iter().filter(|n| n.1 == t).count();
    assert_eq!(count(1), 3);
    assert_eq!(
        [count(3), count(0x5349_4749), count(6), count(0x4649_4c45)],
        [1; 4]
    );
    assert_eq!([count(2), count(0x202)], [3, 3]);
    let first_pid = i32::from_le_bytes(ns[0].2[32..36].try_into().unwrap());
    assert_eq!((ns[0].1, first_pid), (1, v.pid));
    let xstate = &ns.iter().find(|n| n.1 == 0x202).unwrap().2;
    let xcr0 = u64::from_le_bytes(xstate[464..472].try_into().unwrap());
    if let Some(l) = pdump::elfcore::xsave::Layout::intel(xcr0) {
        assert_eq!(
            l.size(),
            xstate.len(),
            "the xstate note is in the Intel layout"
        );
    }
    assert_eq!(count(0x205), usize::from(xcr0 & !3 != 0), "one layout note");

    // The live core (pages streamed straight into their places) has the
    // segments of a core made from a snapshot, with the same bytes for
    // the file header page, the global and the heap; 0x32 leaves anonymous
    // private memory out (the streamed heap is punched out again).
    for (filter, snap_core) in [(0x33, &b33), (0x37, &b37)] {
        let live = dir.join(format!("live.{filter:x}"));
        let s = Snapshot::write_live_core(
            v.pid,
            &live,
            &CoreOptions {
                filter: Some(filter),
            },
            &opts,
        )
        .expect("Snapshot::write_live_core");
        assert_eq!((s.threads, s.filter), (3, filter));
        assert_running_untraced(v.pid);
        let b = std::fs::read(&live).unwrap();
        let (l, ls) = (loads(&b), loads(snap_core));
        let shape =
            |x: &[(u64, u64, u64, u64)]| x.iter().map(|t| (t.0, t.1, t.3)).collect::<Vec<_>>();
        assert_eq!(shape(&l), shape(&ls), "segments with filter {filter:#x}");
        for addr in [ro.start, global, heap] {
            let at = |b: &[u8], l: &[(u64, u64, u64, u64)]| {
                let s = l.iter().find(|s| s.0 <= addr && addr < s.0 + s.3).unwrap();
                b[(s.2 + addr - s.0) as usize..][..256].to_vec()
            };
            assert_eq!(
                at(&b, &l),
                at(snap_core, &ls),
                "{addr:#x}, filter {filter:#x}"
            );
        }
        assert_eq!(notes(&b).len(), ns.len());
    }
    let live = dir.join("live.32");
    Snapshot::write_live_core(v.pid, &live, &CoreOptions { filter: Some(0x32) }, &opts).unwrap();
    let l = loads(&std::fs::read(&live).unwrap());
    let h = l.iter().find(|s| s.0 <= heap && heap < s.0 + s.1).unwrap();
    assert_eq!(h.3, 0, "the heap is left out with 0x32");
    assert!(
        std::fs::read_dir(&dir).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with('.')),
        "temporary files left behind"
    );
    drop(snap);
    assert_eq!(v.finish(), "OK threads=2");
    std::fs::remove_dir_all(&dir).unwrap();
}
