//! `cargo bench --bench core`: time to write an ELF core of a live 1 GiB
//! process with pdump (`Snapshot::take` + `write_core`, the process left
//! running) next to gdb's `gcore` of the same process in the same run, A/B
//! order alternating, after a warm-up round that is not reported.
//!
//! Needs root; gcore is skipped (and said so) when gdb is not installed.
//! `PDUMP_BENCH_MIB` sets the victim size (default 1024).

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pdump::{CoreOptions, Snapshot, SnapshotOptions};

struct Victim {
    child: std::process::Child,
    pid: i32,
}

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(args: &[&str]) -> Victim {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pdump-victim"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn pdump-victim");
    let mut l = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut l)
        .unwrap();
    assert!(l.starts_with("READY"), "victim said {l:?}");
    let pid = child.id() as i32;
    Victim { child, pid }
}

/// (time, apparent size, allocated bytes) of one pdump core.
fn pdump_core(pid: i32, dir: &Path) -> (Duration, u64, u64) {
    let path = dir.join("core.pdump");
    let t = Instant::now();
    let opts = SnapshotOptions {
        work_dir: Some(dir.to_path_buf()),
    };
    let snap = Snapshot::take(pid, &opts).expect("Snapshot::take");
    snap.write_core(&path, &CoreOptions::default())
        .expect("write_core");
    drop(snap);
    let el = t.elapsed();
    let m = std::fs::metadata(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    (el, m.len(), m.blocks() * 512)
}

/// The same with gcore (gdb attaches, writes, detaches).
fn gcore(pid: i32, dir: &Path) -> Option<(Duration, u64, u64)> {
    let prefix = dir.join("core.gcore");
    let t = Instant::now();
    let out = Command::new("gcore")
        .arg("-o")
        .arg(&prefix)
        .arg(pid.to_string())
        .output()
        .ok()?;
    let el = t.elapsed();
    let path = dir.join(format!("core.gcore.{pid}"));
    if !out.status.success() || !path.exists() {
        eprintln!("gcore failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let m = std::fs::metadata(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    Some((el, m.len(), m.blocks() * 512))
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("pdump benches need root; skipping");
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mib: usize = std::env::var("PDUMP_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    // gcore is a script around gdb with no --version.
    let have_gcore = Command::new("gdb")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        && std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("gcore").exists()));
    if !have_gcore {
        eprintln!("gcore (gdb) is not installed: only pdump is timed");
    }
    // Same disk as the victim's binary, not a tmpfs.
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("core-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pages = (mib << 20) / 4096;
    let v = spawn(&["pattern", &pages.to_string(), "11"]);
    let gb = (mib as f64) / 1024.0 * 1.073_741_824;
    println!(
        "core of a live {mib} MiB process (pdump-victim pattern), {}",
        dir.display()
    );
    println!("| round | pdump core s | GB/s | size MiB | allocated MiB | gcore s | GB/s | size MiB | allocated MiB | gcore/pdump time |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for round in 0..4 {
        let (p, g) = if round % 2 == 1 {
            let p = pdump_core(v.pid, &dir);
            (p, have_gcore.then(|| gcore(v.pid, &dir)).flatten())
        } else {
            let g = have_gcore.then(|| gcore(v.pid, &dir)).flatten();
            (pdump_core(v.pid, &dir), g)
        };
        if round == 0 {
            continue; // warm-up
        }
        let mb = |b: u64| b as f64 / (1 << 20) as f64;
        let gcol = match g {
            Some((t, len, alloc)) => format!(
                "{:.3} | {:.2} | {:.0} | {:.0} | {:.1}",
                t.as_secs_f64(),
                gb / t.as_secs_f64(),
                mb(len),
                mb(alloc),
                t.as_secs_f64() / p.0.as_secs_f64()
            ),
            None => "- | - | - | - | -".into(),
        };
        println!(
            "| {round} | {:.3} | {:.2} | {:.0} | {:.0} | {gcol} |",
            p.0.as_secs_f64(),
            gb / p.0.as_secs_f64(),
            mb(p.1),
            mb(p.2),
        );
    }
    drop(v);
    stop_times(mib, &dir, have_gcore);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The process's longest stop, as its own watchdog thread (a tick every
/// 100 us) measured it, while it writes its memory and a core is taken:
/// pdump core (copy-on-write snapshot: stopped for the capture and the
/// fork only), gcore (stopped for the whole copy), and nothing at all (the
/// machine's own noise), each on a fresh `cow` victim of the same size.
fn stop_times(mib: usize, dir: &Path, have_gcore: bool) {
    let pages = ((mib << 20) / 4096 / 4).to_string();
    let run = |what: &str| -> Option<(f64, f64)> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pdump-victim"))
            .args(["cow", &pages, "watchdog,private"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn pdump-victim cow");
        let pid = child.id() as i32;
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut l = String::new();
        out.read_line(&mut l).unwrap();
        assert!(l.starts_with("READY"), "cow victim said {l:?}");
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        let ok = match what {
            "pdump core" => {
                pdump_core(pid, dir);
                true
            }
            "gcore" => gcore(pid, dir).is_some(),
            _ => {
                std::thread::sleep(Duration::from_millis(500));
                true
            }
        };
        let el = t.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(200));
        // SAFETY: a signal to the victim this bench spawned.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let mut last = String::new();
        let mut line = String::new();
        while out.read_line(&mut line).unwrap_or(0) > 0 {
            last = std::mem::take(&mut line);
        }
        let _ = child.wait();
        let gap: f64 = last
            .split_whitespace()
            .find_map(|w| w.strip_prefix("maxgap_us="))
            .and_then(|v| v.parse().ok())?;
        ok.then_some((el, gap / 1000.0))
    };
    println!();
    println!("longest stop of a live {mib} MiB process writing its memory (its own watchdog)");
    println!("| what | time s | longest stop ms | per GiB ms |");
    println!("|---|---|---|---|");
    let mut whats = vec!["nothing (noise)", "pdump core"];
    if have_gcore {
        whats.push("gcore");
    }
    for what in whats {
        match run(what) {
            Some((t, gap)) => println!(
                "| {what} | {t:.3} | {gap:.1} | {:.1} |",
                gap / (mib as f64 / 1024.0)
            ),
            None => println!("| {what} | failed | - | - |"),
        }
    }
}
