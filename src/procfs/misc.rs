//! The small files of `/proc/PID`: limits, auxv, personality, comm,
//! cmdline, links, threads, children, POSIX timers.

use std::path::{Path, PathBuf};

use super::{
    parse_err, proc_path, read_bytes, read_link, read_numeric_dir, read_text, task_path, Result,
};
use crate::image::model;

/// The names `/proc/PID/limits` prints, indexed by `RLIMIT_*` number
/// (the kernel prints them in this order).
pub const RLIMIT_NAMES: [&str; 16] = [
    "Max cpu time",          // RLIMIT_CPU
    "Max file size",         // RLIMIT_FSIZE
    "Max data size",         // RLIMIT_DATA
    "Max stack size",        // RLIMIT_STACK
    "Max core file size",    // RLIMIT_CORE
    "Max resident set",      // RLIMIT_RSS
    "Max processes",         // RLIMIT_NPROC
    "Max open files",        // RLIMIT_NOFILE
    "Max locked memory",     // RLIMIT_MEMLOCK
    "Max address space",     // RLIMIT_AS
    "Max file locks",        // RLIMIT_LOCKS
    "Max pending signals",   // RLIMIT_SIGPENDING
    "Max msgqueue size",     // RLIMIT_MSGQUEUE
    "Max nice priority",     // RLIMIT_NICE
    "Max realtime priority", // RLIMIT_RTPRIO
    "Max realtime timeout",  // RLIMIT_RTTIME
];

/// Reads `/proc/PID/limits`: every resource limit, in the file's order,
/// `unlimited` as `u64::MAX`. Values are raw (seconds for CPU time,
/// microseconds for the realtime timeout, bytes, counts).
pub fn limits(pid: i32) -> Result<Vec<model::Rlimit>> {
    let path = proc_path(pid, "limits");
    parse_limits(pid, &path, &read_text(pid, &path)?)
}

pub(crate) fn parse_limits(pid: i32, path: &Path, text: &str) -> Result<Vec<model::Rlimit>> {
    let mut out = Vec::new();
    for (row, line) in text.lines().skip(1).enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what| parse_err(pid, path, what, line);
        let (name, resource, rest) = match RLIMIT_NAMES
            .iter()
            .enumerate()
            .find(|(_, n)| line.starts_with(*n))
        {
            Some((i, n)) => (n.to_string(), i as u32, &line[n.len()..]),
            None => {
                // A name this table lacks (a newer kernel): the name is what
                // precedes the two values, the resource its row.
                let toks: Vec<&str> = line.split_whitespace().collect();
                let units = toks
                    .last()
                    .is_some_and(|t| *t != "unlimited" && t.parse::<u64>().is_err());
                let nvals = 2 + usize::from(units);
                if toks.len() <= nvals {
                    return Err(bad("a limit name and two values"));
                }
                let name = toks[..toks.len() - nvals].join(" ");
                let at = line.find(toks[toks.len() - nvals]).unwrap_or(line.len());
                (name, row as u32, &line[at..])
            }
        };
        let mut vals = rest.split_whitespace();
        let mut value = || -> Result<u64> {
            match vals.next() {
                Some("unlimited") => Ok(u64::MAX),
                Some(v) => v.parse().map_err(|_| bad("a number or `unlimited`")),
                None => Err(bad("a soft and a hard limit")),
            }
        };
        let soft = value()?;
        let hard = value()?;
        out.push(model::Rlimit {
            name,
            resource,
            soft,
            hard,
        });
    }
    Ok(out)
}

/// Reads `/proc/PID/auxv`: the `(type, value)` pairs up to, not including,
/// the terminating `AT_NULL`.
pub fn auxv(pid: i32) -> Result<Vec<(u64, u64)>> {
    let path = proc_path(pid, "auxv");
    let bytes = read_bytes(pid, &path)?;
    let mut out = Vec::new();
    for pair in bytes.chunks_exact(16) {
        let (k, v) = pair.split_at(8);
        let k = u64::from_ne_bytes(k.try_into().unwrap_or([0; 8]));
        let v = u64::from_ne_bytes(v.try_into().unwrap_or([0; 8]));
        if k == libc::AT_NULL {
            break;
        }
        out.push((k, v));
    }
    Ok(out)
}

/// Reads `/proc/PID/personality` (hex).
pub fn personality(pid: i32) -> Result<u32> {
    read_hex(pid, "personality")
}

/// Reads `/proc/PID/coredump_filter` (hex).
pub fn coredump_filter(pid: i32) -> Result<u32> {
    read_hex(pid, "coredump_filter")
}

fn read_hex(pid: i32, name: &str) -> Result<u32> {
    let path = proc_path(pid, name);
    let text = read_text(pid, &path)?;
    u32::from_str_radix(text.trim(), 16)
        .map_err(|_| parse_err(pid, &path, "a hex number", text.trim()))
}

/// Reads `/proc/PID/task/TID/comm` (without the trailing newline).
pub fn comm(pid: i32, tid: i32) -> Result<String> {
    let path = task_path(pid, tid, "comm");
    let mut s = read_text(pid, &path)?;
    if s.ends_with('\n') {
        s.pop();
    }
    Ok(s)
}

/// Reads `/proc/PID/cmdline`: the arguments, split at NULs (invalid UTF-8
/// replaced). Empty for kernel threads and zombies.
pub fn cmdline(pid: i32) -> Result<Vec<String>> {
    let path = proc_path(pid, "cmdline");
    let bytes = read_bytes(pid, &path)?;
    let bytes = bytes.strip_suffix(b"\0").unwrap_or(&bytes);
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    Ok(bytes
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect())
}

/// The target of `/proc/PID/cwd`.
pub fn readlink_cwd(pid: i32) -> Result<PathBuf> {
    read_link(pid, &proc_path(pid, "cwd"))
}

/// The target of `/proc/PID/root`.
pub fn readlink_root(pid: i32) -> Result<PathBuf> {
    read_link(pid, &proc_path(pid, "root"))
}

/// The target of `/proc/PID/exe` (with `" (deleted)"` if the binary was unlinked).
pub fn readlink_exe(pid: i32) -> Result<PathBuf> {
    read_link(pid, &proc_path(pid, "exe"))
}

/// Every thread of `pid` (from `/proc/PID/task`), sorted, the leader first.
pub fn threads(pid: i32) -> Result<Vec<i32>> {
    let mut tids = read_numeric_dir(pid, &proc_path(pid, "task"))?;
    if let Some(i) = tids.iter().position(|&t| t == pid) {
        tids.remove(i);
        tids.insert(0, pid);
    }
    Ok(tids)
}

/// The children of thread `tid` of `pid` (`/proc/PID/task/TID/children`).
/// A process's children are spread over the threads that created them.
pub fn children(pid: i32, tid: i32) -> Result<Vec<i32>> {
    let path = task_path(pid, tid, "children");
    let text = read_text(pid, &path)?;
    text.split_whitespace()
        .map(|t| t.parse().map_err(|_| parse_err(pid, &path, "a pid", t)))
        .collect()
}

/// Reads `/proc/PID/timers`: the POSIX timers with their id, clock, signal,
/// `sigev_value` and notification. `value` and `overrun` are left zero
/// (they come from `timer_gettime`/`timer_getoverrun` inside the task).
///
/// The kernel prints `notify: KIND/pid.N` or `notify: KIND/tid.N`, where
/// KIND is `signal`, `thread` or `none`; `tid` means `SIGEV_THREAD_ID`.
/// [`model::PosixTimer::notify`] gets KIND and `notify_tid` gets N for `tid`
/// (it stays 0 for `pid`).
pub fn timers(pid: i32) -> Result<Vec<model::PosixTimer>> {
    let path = proc_path(pid, "timers");
    parse_timers(pid, &path, &read_text(pid, &path)?)
}

pub(crate) fn parse_timers(pid: i32, path: &Path, text: &str) -> Result<Vec<model::PosixTimer>> {
    let mut out: Vec<model::PosixTimer> = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let bad = |what| parse_err(pid, path, what, line);
        let (key, value) = line.split_once(':').ok_or_else(|| bad("`key: value`"))?;
        let value = value.trim();
        if key == "ID" {
            out.push(model::PosixTimer {
                id: value.parse().map_err(|_| bad("a timer id"))?,
                ..Default::default()
            });
            continue;
        }
        let t = out.last_mut().ok_or_else(|| bad("`ID:` first"))?;
        match key {
            "signal" => {
                let (sig, val) = value.split_once('/').ok_or_else(|| bad("SIGNO/VALUE"))?;
                t.signo = sig.parse().map_err(|_| bad("a signal number"))?;
                let val = val.trim_start_matches("0x");
                t.sigev_value = u64::from_str_radix(val, 16).map_err(|_| bad("a hex value"))?;
            }
            "notify" => {
                let (kind, target) = value.split_once('/').ok_or_else(|| bad("KIND/pid.N"))?;
                let (who, n) = target.split_once('.').ok_or_else(|| bad("KIND/pid.N"))?;
                let n: i32 = n.parse().map_err(|_| bad("a pid"))?;
                t.notify = kind.to_owned();
                t.notify_tid = match who {
                    "tid" => n,
                    "pid" => 0,
                    _ => return Err(bad("`pid.N` or `tid.N`")),
                };
            }
            "ClockID" => t.clock = value.parse().map_err(|_| bad("a clock id"))?,
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_sample_and_self() {
        let text = "\
Limit                     Soft Limit           Hard Limit           Units     
Max cpu time              unlimited            unlimited            seconds   
Max file size             unlimited            unlimited            bytes     
Max data size             unlimited            unlimited            bytes     
Max stack size            8388608              unlimited            bytes     
Max core file size        0                    unlimited            bytes     
Max resident set          unlimited            unlimited            bytes     
Max processes             385463               385463               processes 
Max open files            1024                 524288               files     
Max locked memory         8388608              8388608              bytes     
Max address space         unlimited            unlimited            bytes     
Max file locks            unlimited            unlimited            locks     
Max pending signals       385463               385463               signals   
Max msgqueue size         819200               819200               bytes     
Max nice priority         0                    0                    
Max realtime priority     0                    0                    
Max realtime timeout      unlimited            unlimited            us        
Max future thing          5                    6                    things    
";
        let l = parse_limits(1, Path::new("limits"), text).unwrap();
        assert_eq!(l.len(), 17);
        assert_eq!(l[3].resource as usize, libc::RLIMIT_STACK as usize);
        assert_eq!((l[3].soft, l[3].hard), (8388608, u64::MAX));
        assert_eq!(l[7].name, "Max open files");
        assert_eq!(l[7].resource as usize, libc::RLIMIT_NOFILE as usize);
        assert_eq!((l[7].soft, l[7].hard), (1024, 524288));
        assert_eq!(l[13].resource as usize, libc::RLIMIT_NICE as usize);
        assert_eq!(l[15].resource as usize, libc::RLIMIT_RTTIME as usize);
        assert_eq!(l[16].name, "Max future thing");
        assert_eq!((l[16].resource, l[16].soft, l[16].hard), (16, 5, 6));
        assert!(parse_limits(1, Path::new("l"), "hdr\nMax open files 1\n").is_err());

        let me = std::process::id() as i32;
        let mine = limits(me).unwrap();
        assert_eq!(mine.len(), 16);
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `rl` is a valid rlimit to fill.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) }, 0);
        let nofile = &mine[libc::RLIMIT_NOFILE as usize];
        assert_eq!((nofile.soft, nofile.hard), (rl.rlim_cur, rl.rlim_max));
        for (i, l) in mine.iter().enumerate() {
            assert_eq!(l.resource as usize, i);
        }
    }

    #[test]
    fn timers_sample() {
        let text = "\
ID: 0
signal: 14/0000000000000000
notify: signal/pid.1234
ClockID: 0
ID: 1
signal: 10/00000000deadbeef
notify: signal/tid.1240
ClockID: 1
ID: 2
signal: 0/0000000000000000
notify: none/pid.1234
ClockID: 7
";
        let t = parse_timers(1234, Path::new("timers"), text).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!((t[0].id, t[0].signo, t[0].clock), (0, 14, 0));
        assert_eq!((t[0].notify.as_str(), t[0].notify_tid), ("signal", 0));
        assert_eq!((t[1].signo, t[1].sigev_value), (10, 0xdeadbeef));
        assert_eq!((t[1].notify.as_str(), t[1].notify_tid), ("signal", 1240));
        assert_eq!(t[1].clock, 1);
        assert_eq!(t[2].notify, "none");
        assert_eq!(t[2].clock, 7);
        assert!(parse_timers(1, Path::new("t"), "signal: 1/0\n").is_err());
        assert!(parse_timers(1, Path::new("t"), "ID: 0\nnotify: signal/who.3\n").is_err());
    }

    #[test]
    fn self_small_files() {
        let me = std::process::id() as i32;
        let av = auxv(me).unwrap();
        assert!(av.iter().any(|&(k, _)| k == libc::AT_PAGESZ));
        let pagesz = av.iter().find(|&&(k, _)| k == libc::AT_PAGESZ).unwrap().1;
        assert_eq!(pagesz, crate::procfs::page_size());
        assert_eq!(personality(me).unwrap() & 0xff, 0); // PER_LINUX
        let _ = coredump_filter(me).unwrap();
        assert!(!comm(me, me).unwrap().is_empty());
        let args = cmdline(me).unwrap();
        assert_eq!(args.len(), std::env::args().count());
        assert_eq!(readlink_cwd(me).unwrap(), std::env::current_dir().unwrap());
        assert_eq!(readlink_root(me).unwrap(), PathBuf::from("/"));
        assert_eq!(readlink_exe(me).unwrap(), std::env::current_exe().unwrap());
        let tids = threads(me).unwrap();
        assert_eq!(tids[0], me);
        assert!(tids[1..].windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn children_and_timers_of_a_child() {
        use crate::procfs::testutil::Forked;
        // Prepared before fork: the child only makes raw syscalls.
        // SAFETY: sigevent is plain data; all-zero is a valid value.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = libc::SIGUSR2;
        sev.sigev_value = libc::sigval {
            sival_ptr: 0x1234 as *mut libc::c_void,
        };
        let child = Forked::spawn(move |ready| {
            let mut sev = sev;
            // SAFETY: gettid has no preconditions.
            sev.sigev_notify_thread_id = unsafe { libc::gettid() };
            let mut id: libc::c_int = 0;
            // SAFETY: valid sigevent and timer-id pointers on our stack.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_timer_create,
                    libc::CLOCK_MONOTONIC,
                    &sev as *const libc::sigevent,
                    &mut id as *mut libc::c_int,
                )
            };
            if r != 0 {
                return 3;
            }
            ready();
            Forked::park()
        });
        let me = std::process::id() as i32;
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        assert!(children(me, tid).unwrap().contains(&child.pid));
        let t = timers(child.pid).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].signo, libc::SIGUSR2);
        assert_eq!(t[0].sigev_value, 0x1234);
        assert_eq!(t[0].notify, "signal");
        assert_eq!(t[0].notify_tid, child.pid);
        assert_eq!(t[0].clock, libc::CLOCK_MONOTONIC);
        assert_eq!(threads(child.pid).unwrap(), vec![child.pid]);
    }
}
