//! The subcommands behind `main`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use pdump::dump::{dump_tree, DumpOptions};
use pdump::image::{self, show};
use pdump::{CoreOptions, Snapshot, SnapshotOptions};

type CliResult = Result<(), Box<dyn std::error::Error>>;

/// Print an error and its causes once, on one line each.
pub fn print_error(e: &dyn std::error::Error) {
    let mut msg = format!("error: {e}");
    let mut cur = e.source();
    while let Some(c) = cur {
        msg.push_str(&format!("\n  caused by: {c}"));
        cur = c.source();
    }
    let _ = writeln!(std::io::stderr(), "{msg}");
}

fn print(s: &str) -> CliResult {
    let mut out = std::io::stdout().lock();
    match out.write_all(s.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// `pdump dump` / `pdump PID`.
pub fn dump(pid: i32, dir: PathBuf, opts: DumpOptions) -> CliResult {
    let leave_running = opts.leave_running;
    let opts = DumpOptions {
        dir: dir.clone(),
        ..opts
    };
    let s = dump_tree(pid, &opts)?;
    let mut msg = format!(
        "dumped the tree of pid {} ({} processes, {} zombies, {} threads, {} mappings, {} pages) \
         into {} in {:.1} ms (frozen {:.1} ms){}\n",
        s.pid,
        s.processes,
        s.zombies,
        s.threads,
        s.vmas,
        s.pages,
        dir.display(),
        s.total.as_secs_f64() * 1e3,
        s.frozen.as_secs_f64() * 1e3,
        if !leave_running {
            ", killed".to_string()
        } else if s.snapshots > 0 {
            format!(
                ", left running ({} of the processes through copy-on-write snapshots)",
                s.snapshots
            )
        } else {
            ", left running".to_string()
        }
    );
    if s.container {
        msg.push_str("container mode: nothing is shared with tasks outside the tree\n");
    } else if !s.leaks.is_empty() {
        msg.push_str("sub-tree mode: ");
        msg.push_str(&pdump::leaks::render(&s.leaks));
    }
    print(&msg)
}

/// `pdump core PID|DIR`.
pub fn core(
    target: &str,
    output: Option<PathBuf>,
    filter: Option<u32>,
    pid: Option<i32>,
) -> CliResult {
    let dir = Path::new(target);
    let live: Option<i32> = if dir.is_dir() {
        None
    } else {
        Some(
            target
                .parse()
                .map_err(|_| format!("{target:?} is neither a pid nor a checkpoint directory"))?,
        )
    };
    let t0 = std::time::Instant::now();
    let copts = CoreOptions { filter };
    let (out, s) = match live {
        Some(p) => {
            if pid.is_some_and(|x| x != p) {
                return Err("--pid is for checkpoint directories".into());
            }
            let out = output.unwrap_or_else(|| PathBuf::from(format!("core.{p}")));
            let out_dir = out
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            let opts = SnapshotOptions {
                work_dir: Some(out_dir),
            };
            let s = Snapshot::write_live_core(p, &out, &copts, &opts)?;
            (out, s)
        }
        None => {
            let snap = match pid {
                Some(p) => Snapshot::open_pid(dir, p)?,
                None => Snapshot::open(dir)?,
            };
            let out = output.unwrap_or_else(|| PathBuf::from(format!("core.{}", snap.pid())));
            let s = snap.write_core(&out, &copts)?;
            (out, s)
        }
    };
    print(&format!(
        "wrote {} ({} threads, {} mappings, {} with contents, {} bytes of memory, \
         coredump_filter {:#x}) in {:.1} ms{}\n",
        out.display(),
        s.threads,
        s.segments,
        s.segments_with_data,
        s.data_bytes,
        s.filter,
        t0.elapsed().as_secs_f64() * 1e3,
        if live.is_some() {
            ", process left running"
        } else {
            ""
        }
    ))
}

/// `pdump show`.
pub fn show(dir: &Path, json: bool, pages: bool) -> CliResult {
    let cp = image::Checkpoint::open(dir)?;
    if json {
        let v = show::render_json(&cp, pages)?;
        print(&format!("{}\n", serde_json::to_string_pretty(&v)?))
    } else {
        print(&show::render_text(&cp))
    }
}

/// `pdump check`.
pub fn check(json: bool) -> CliResult {
    let f = pdump::check::kernel_features();
    if json {
        print(&format!("{}\n", serde_json::to_string_pretty(&f)?))
    } else {
        print(&pdump::check::render(&f))
    }
}

/// The demo workload: counts and keeps a checksum of its own memory; prints
/// one line per 100 ms tick; exits non-zero on any inconsistency.
pub fn demo_workload() -> CliResult {
    let mut buf = vec![0u64; 1 << 20];
    let mut sum = 0u64;
    let mut tick = 0u64;
    let start = std::time::Instant::now();
    loop {
        for (i, w) in buf.iter_mut().enumerate() {
            let v = (i as u64).wrapping_mul(tick | 1);
            sum = sum.wrapping_sub(*w).wrapping_add(v);
            *w = v;
        }
        let check = buf.iter().fold(0u64, |a, w| a.wrapping_add(*w));
        if check != sum {
            print(&format!(
                "FAIL tick {tick}: checksum {check:#x} != {sum:#x}\n"
            ))?;
            std::process::exit(1);
        }
        print(&format!("tick {tick} checksum {sum:#018x}\n"))?;
        tick += 1;
        let next = Duration::from_millis(100 * tick);
        if let Some(d) = next.checked_sub(start.elapsed()) {
            std::thread::sleep(d);
        }
    }
}

/// `pdump demo`: spawn the workload, dump it (which stops it), restore it
/// from the images with the same pid, and show it continuing where it was.
pub fn demo(dir: Option<PathBuf>) -> CliResult {
    use std::os::unix::fs::MetadataExt;
    let exe = std::env::current_exe()?;
    let dir = dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("pdump-demo-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cmd = Command::new(&exe);
    cmd.arg("demo-workload")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // Only stdin/stdout/stderr: an fd leaked from our own caller (a pipe
    // to who knows what) would make the workload depend on the outside.
    // SAFETY: close_range between fork and exec touches only the child's fds.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id() as i32;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    // The pipe the workload writes to: the restored workload gets a new one
    // in its place (`--inherit-fd 1:pipe:[INODE]`).
    let pipe_ino = std::fs::metadata(format!("/proc/self/fd/{}", {
        use std::os::fd::AsRawFd;
        stdout.as_raw_fd()
    }))?
    .ino();
    let mut lines = BufReader::new(stdout).lines();
    let tick_of = |l: &str| -> Option<u64> { l.split_whitespace().nth(1)?.parse().ok() };
    let mut last = String::new();
    for _ in 0..3 {
        last = lines.next().ok_or("workload exited")??;
        print(&format!("workload[{pid}]: {last}\n"))?;
    }
    let opts = DumpOptions {
        dir: dir.clone(),
        leave_running: false,
        ..DumpOptions::default()
    };
    let s = match dump_tree(pid, &opts) {
        Ok(s) => s,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e.into());
        }
    };
    let status = child.wait()?;
    print(&format!(
        "dumped pid {pid}: {} pages in {:.1} ms, images in {}; the workload is gone ({status})\n",
        s.pages,
        s.total.as_secs_f64() * 1e3,
        dir.display()
    ))?;
    let cp = image::Checkpoint::open(&dir)?;
    cp.verify_pages()?;
    print(&format!(
        "images verified: {} process(es), checksums ok\n",
        cp.processes.len()
    ))?;
    let before = tick_of(&last).ok_or("workload printed no tick")?;
    let pidfile = dir.join("restored.pid");
    let mut restore = Command::new(&exe)
        .args(["restore", "-D"])
        .arg(&dir)
        .arg("--pidfile")
        .arg(&pidfile)
        .arg(format!("--inherit-fd=1:pipe:[{pipe_ino}]"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut rl = BufReader::new(restore.stdout.take().ok_or("no stdout")?).lines();
    let st = restore.wait()?;
    if !st.success() {
        return Err(format!("pdump restore failed ({st})").into());
    }
    let rpid: i32 = std::fs::read_to_string(&pidfile)?.trim().parse()?;
    print(&format!("restored: pid {rpid} (was {pid})\n"))?;
    let mut after = 0;
    let mut shown = 0;
    while shown < 3 {
        let l = rl.next().ok_or("restored workload died")??;
        if l.trim() == rpid.to_string() {
            continue; // pdump restore's own line: the root's pid
        }
        shown += 1;
        if l.starts_with("FAIL") {
            // SAFETY: kill the workload this demo restored.
            unsafe { libc::kill(rpid, libc::SIGKILL) };
            return Err(format!("restored workload reported corruption: {l}").into());
        }
        print(&format!("workload[{rpid}]: {l} (after the restore)\n"))?;
        after = tick_of(&l).unwrap_or(0);
    }
    // SAFETY: kill the workload this demo restored.
    unsafe { libc::kill(rpid, libc::SIGKILL) };
    if rpid != pid || after <= before {
        return Err(format!(
            "restored workload did not continue: pid {rpid}, tick {after} after {before}"
        )
        .into());
    }
    print(&format!(
        "the workload continued after dump + restore: same pid {pid}, tick {before} -> {after}, checksums intact\n"
    ))
}

/// `pdump restore` arguments.
pub struct RestoreArgs {
    pub dir: PathBuf,
    pub pidfile: Option<PathBuf>,
    pub shell_job: bool,
    pub wait: bool,
    pub inherit_fd: Vec<String>,
    pub allow_size_change: bool,
    pub no_verify: bool,
}

/// Parse `FD:KEY` (`3:pipe:[1234]`).
fn parse_inherit(s: &str) -> Result<(String, i32), Box<dyn std::error::Error>> {
    let (fd, key) = s
        .split_once(':')
        .ok_or_else(|| format!("--inherit-fd {s:?}: expected FD:KEY, e.g. 3:pipe:[1234]"))?;
    let fd: i32 = fd
        .parse()
        .map_err(|_| format!("--inherit-fd {s:?}: {fd:?} is not an fd number"))?;
    Ok((key.to_string(), fd))
}

/// `pdump restore`.
pub fn restore(a: RestoreArgs) -> CliResult {
    let inherit = a
        .inherit_fd
        .iter()
        .map(|s| parse_inherit(s))
        .collect::<Result<Vec<_>, _>>()?;
    let opts = pdump::restore::RestoreOptions {
        dir: a.dir,
        shell_job: a.shell_job,
        inherit,
        allow_size_change: a.allow_size_change,
        no_verify: a.no_verify,
    };
    let r = pdump::restore::restore(&opts)?;
    if let Some(p) = &a.pidfile {
        // Written once the whole tree runs untraced, and atomically (a
        // rename), so whoever waits for the file knows the restore is done.
        let mut tmp = p.clone().into_os_string();
        tmp.push(".tmp");
        std::fs::write(&tmp, format!("{}\n", r.root_pid))?;
        std::fs::rename(&tmp, p)?;
    }
    if !a.wait {
        return print(&format!("{}\n", r.root_pid));
    }
    let st = pdump::restore::wait_root(r.root_pid)?;
    let code = if libc::WIFEXITED(st) {
        libc::WEXITSTATUS(st)
    } else {
        128 + libc::WTERMSIG(st)
    };
    std::process::exit(code)
}
