//! `cargo bench`: seize+infect+cure cost per task, and dump throughput of a
//! memory-heavy victim next to a process_vm_readv copy of the same memory to
//! the same disk, measured in the same run (A/B alternated, memory warmed).
//!
//! Needs root. `PDUMP_BENCH_MIB` sets the victim size (default 1024).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pdump::dump::{dump_process, dump_tree, DumpOptions};
use pdump::infect::Parasite;
use pdump::ptrace::Seized;

fn victim_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pdump-victim")
}

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
    let mut child = Command::new(victim_bin())
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

/// Allocate, touch and free `bytes` so the host hands the memory to us before timing.
fn warm(bytes: usize) {
    let mut v = vec![0u8; bytes];
    for i in (0..bytes).step_by(4096) {
        v[i] = 1;
    }
    std::hint::black_box(&v);
}

/// The reference: copy every present page of the victim with process_vm_readv
/// into a file on the same disk.
fn reference_copy(pid: i32, path: &std::path::Path) -> (Duration, u64) {
    let t = Instant::now();
    let vmas = pdump::procfs::maps(pid).unwrap();
    let mut pm = pdump::procfs::Pagemap::open(pid).unwrap();
    let mut f = std::fs::File::create(path).unwrap();
    let mut buf = vec![0u8; 4 << 20];
    let mut total = 0u64;
    for v in vmas.iter().filter(|v| v.prot & 1 != 0 && !v.shared) {
        for (addr, n) in pm.present_ranges(v.start, v.end).unwrap_or_default() {
            let mut off = 0u64;
            let len = n * 4096;
            while off < len {
                let chunk = (len - off).min(buf.len() as u64) as usize;
                let local = libc::iovec {
                    iov_base: buf.as_mut_ptr() as *mut libc::c_void,
                    iov_len: chunk,
                };
                let remote = libc::iovec {
                    iov_base: (addr + off) as *mut libc::c_void,
                    iov_len: chunk,
                };
                // SAFETY: one local buffer we own and one remote range.
                let r = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
                if r <= 0 {
                    break;
                }
                f.write_all(&buf[..r as usize]).unwrap();
                off += r as u64;
                total += r as u64;
            }
        }
    }
    f.flush().unwrap();
    (t.elapsed(), total)
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
    let tmp = std::env::temp_dir().join(format!("pdump-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();

    // 1. seize + infect + cure per task.
    let v = spawn(&["loop"]);
    let n = 300;
    let t = Instant::now();
    for _ in 0..n {
        let s = Seized::seize(v.pid).unwrap();
        let p = Parasite::infect(&s).unwrap();
        p.cure().unwrap();
        s.detach().unwrap();
    }
    let per = t.elapsed() / n;
    drop(v);

    // 2. dump throughput of a memory-heavy victim vs process_vm_readv.
    warm(mib << 20);
    let pages = (mib << 20) / 4096;
    let v = spawn(&["pattern", &pages.to_string(), "7"]);
    let mut rows = Vec::new();
    // Round 0 warms the page cache and the disk path for both and is not reported;
    // then A/B alternate which goes first.
    for round in 0..4 {
        let dir = tmp.join(format!("dump-{round}"));
        let _ = std::fs::remove_dir_all(&dir);
        let opts = DumpOptions {
            dir: dir.clone(),
            leave_running: true,
            ..DumpOptions::default()
        };
        let ref_path = tmp.join("ref.bin");
        let (s, (rt, rbytes)) = if round % 2 == 1 {
            let s = dump_process(v.pid, &opts).unwrap();
            (s, reference_copy(v.pid, &ref_path))
        } else {
            let r = reference_copy(v.pid, &ref_path);
            (dump_process(v.pid, &opts).unwrap(), r)
        };
        if round > 0 {
            rows.push((s.total, s.frozen, s.pages * 4096, rt, rbytes));
        }
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(&ref_path);
    }
    drop(v);
    let _ = std::fs::remove_dir_all(&tmp);

    // 3. Trees: a 200-process tree and a 64-thread process, against copying
    // the same processes' memory with process_vm_readv in the same run.
    let mut tree_rows = Vec::new();
    for preset in ["wide200", "threads64"] {
        let v = spawn(&["tree-preset", preset]);
        let tree = pdump::tree::collect(v.pid).unwrap();
        let pids = tree.alive();
        let mut best = (Duration::MAX, Duration::MAX, Duration::MAX, 0usize, 0usize);
        for round in 0..3 {
            let dir = tmp.join(format!("tree-{preset}-{round}"));
            let t = Instant::now();
            let opts = DumpOptions {
                dir: dir.clone(),
                leave_running: true,
                container: Some(false),
                ..DumpOptions::default()
            };
            let s = dump_tree(v.pid, &opts).unwrap();
            let dt = t.elapsed();
            let t = Instant::now();
            for p in &pids {
                reference_copy(*p, &tmp.join("ref.bin"));
            }
            let rt = t.elapsed();
            if dt < best.0 {
                best = (dt, s.frozen, rt, s.processes, s.threads);
            }
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::remove_file(tmp.join("ref.bin"));
        }
        tree_rows.push((preset, best));
        drop(v);
    }

    println!("\npdump benchmarks (same run, same disk; {mib} MiB victim)\n");
    println!(
        "seize+infect+cure per task: {:.3} ms (mean of {n})",
        per.as_secs_f64() * 1e3
    );
    println!();
    println!("| round | pdump dump s | GB/s | frozen s | process_vm_readv copy s | GB/s | pdump/ref throughput |");
    println!("|---|---|---|---|---|---|---|");
    for (i, (dt, fz, b, rt, rb)) in rows.iter().enumerate() {
        let g = *b as f64 / dt.as_secs_f64() / 1e9;
        let rg = *rb as f64 / rt.as_secs_f64() / 1e9;
        println!(
            "| {i} | {:.3} | {:.2} | {:.3} | {:.3} | {:.2} | {:.2} |",
            dt.as_secs_f64(),
            g,
            fz.as_secs_f64(),
            rt.as_secs_f64(),
            rg,
            g / rg
        );
    }
    println!();
    println!("| tree | processes | threads | pdump dump s (best of 3) | frozen s | process_vm_readv of every process s | pdump/ref time |");
    println!("|---|---|---|---|---|---|---|");
    for (name, (dt, fz, rt, procs, threads)) in &tree_rows {
        println!(
            "| {name} | {procs} | {threads} | {:.3} | {:.3} | {:.3} | {:.2} |",
            dt.as_secs_f64(),
            fz.as_secs_f64(),
            rt.as_secs_f64(),
            dt.as_secs_f64() / rt.as_secs_f64()
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
