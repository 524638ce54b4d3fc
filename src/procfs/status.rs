//! `/proc/PID/status`: identity, credentials, signal masks, namespaces' pids.

use std::path::Path;

use super::{parse_err, proc_path, read_text, task_path, ProcError, Result};
use crate::image::model;

/// The fields of `/proc/PID/status` pdump uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// `Name` (the comm, unescaped).
    pub name: String,
    /// `State`: the letter (`R`, `S`, `D`, `T`, `t`, `Z`, `X`, `I`, ...).
    pub state: char,
    /// `Tgid`.
    pub tgid: i32,
    /// `Pid` (the thread id for a task's status).
    pub pid: i32,
    /// `PPid`.
    pub ppid: i32,
    /// `TracerPid` (0 when not traced).
    pub tracer_pid: i32,
    /// `Uid`: real, effective, saved, filesystem.
    pub uid: [u32; 4],
    /// `Gid`: real, effective, saved, filesystem.
    pub gid: [u32; 4],
    /// `Groups`: supplementary groups.
    pub groups: Vec<u32>,
    /// `NSpid`: the pid on every pid-namespace level, outermost (the reader's) first.
    pub ns_pid: Vec<i32>,
    /// `NStgid`.
    pub ns_tgid: Vec<i32>,
    /// `NSpgid`.
    pub ns_pgid: Vec<i32>,
    /// `NSsid`.
    pub ns_sid: Vec<i32>,
    /// `Umask` (absent for tasks without an `fs_struct`: zombies, some kernel threads).
    pub umask: Option<u32>,
    /// `SigBlk`: blocked signals (bit N-1 is signal N).
    pub sig_blk: u64,
    /// `SigPnd`: signals pending for this thread.
    pub sig_pnd: u64,
    /// `ShdPnd`: signals pending for the thread group.
    pub shd_pnd: u64,
    /// `SigIgn`: ignored signals.
    pub sig_ign: u64,
    /// `SigCgt`: caught signals.
    pub sig_cgt: u64,
    /// `CapInh`, `CapPrm`, `CapEff`, `CapBnd`, `CapAmb`.
    pub caps: [u64; 5],
    /// `NoNewPrivs`.
    pub no_new_privs: bool,
    /// `Seccomp`: 0 none, 1 strict, 2 filter.
    pub seccomp: u32,
    /// `Threads`: threads in the thread group.
    pub threads: u32,
    /// `RssAnon` + `RssShmem` in bytes: the resident pages a dump may have
    /// to write (None where the task has no mm: zombies, kernel threads).
    pub rss_anon_shmem: Option<u64>,
}

/// Reads `/proc/PID/status`.
pub fn status(pid: i32) -> Result<Status> {
    let path = proc_path(pid, "status");
    parse_status(pid, &path, &read_text(pid, &path)?)
}

/// Reads `/proc/PID/task/TID/status` (per-thread masks, `Pid` = TID).
pub fn task_status(pid: i32, tid: i32) -> Result<Status> {
    let path = task_path(pid, tid, "status");
    parse_status(pid, &path, &read_text(pid, &path)?)
}

/// The credentials part of a [`Status`].
pub fn creds(st: &Status) -> model::Creds {
    model::Creds {
        uid: st.uid,
        gid: st.gid,
        groups: st.groups.clone(),
        caps: st.caps,
        no_new_privs: st.no_new_privs,
        seccomp: st.seccomp,
    }
}

/// Undoes the escaping of `Name:` (`\n` and `\\`, and the other C escapes
/// `seq_escape` may produce).
fn unescape_name(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('f') => out.push('\x0c'),
            Some('v') => out.push('\x0b'),
            Some('a') => out.push('\x07'),
            Some('e') => out.push('\x1b'),
            Some('\\') => out.push('\\'),
            Some('"') => out.push('"'),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// Parses the text of a `status` file.
/// Reads `/proc/self/status` (right in any pid namespace).
pub fn status_self() -> Result<Status> {
    let path = Path::new("/proc/self/status");
    parse_status(0, path, &read_text(0, path)?)
}

pub(crate) fn parse_status(pid: i32, path: &Path, text: &str) -> Result<Status> {
    let mut st = Status::default();
    // Fields that must be there: status has had all of these since 2.6.
    let mut seen = Seen::default();
    // NS* lines exist since 4.1; without them the task's only level is ours.
    let mut ns_seen = false;

    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        // The value is separated by a tab; `Name` must keep its spaces.
        let value = value.strip_prefix('\t').unwrap_or(value);
        let bad = |what| parse_err(pid, path, what, line);
        match key {
            "Name" => {
                st.name = unescape_name(value);
                seen.name = true;
            }
            "State" => {
                st.state = value
                    .trim_start()
                    .chars()
                    .next()
                    .ok_or_else(|| bad("a state letter"))?;
                seen.state = true;
            }
            "Tgid" => st.tgid = num(value).ok_or_else(|| bad("a tgid"))?,
            "Pid" => {
                st.pid = num(value).ok_or_else(|| bad("a pid"))?;
                seen.pid = true;
            }
            "PPid" => st.ppid = num(value).ok_or_else(|| bad("a ppid"))?,
            "TracerPid" => st.tracer_pid = num(value).ok_or_else(|| bad("a pid"))?,
            "Uid" => {
                st.uid = four(value).ok_or_else(|| bad("four uids"))?;
                seen.uid = true;
            }
            "Gid" => {
                st.gid = four(value).ok_or_else(|| bad("four gids"))?;
                seen.gid = true;
            }
            "Groups" => st.groups = list(value).ok_or_else(|| bad("a list of gids"))?,
            "NSpid" => {
                st.ns_pid = list(value).ok_or_else(|| bad("a list of pids"))?;
                ns_seen = true;
            }
            "NStgid" => st.ns_tgid = list(value).ok_or_else(|| bad("a list of pids"))?,
            "NSpgid" => st.ns_pgid = list(value).ok_or_else(|| bad("a list of pids"))?,
            "NSsid" => st.ns_sid = list(value).ok_or_else(|| bad("a list of pids"))?,
            "Umask" => {
                st.umask =
                    Some(u32::from_str_radix(value.trim(), 8).map_err(|_| bad("an octal umask"))?)
            }
            "SigPnd" => st.sig_pnd = hex(value).ok_or_else(|| bad("a hex mask"))?,
            "ShdPnd" => st.shd_pnd = hex(value).ok_or_else(|| bad("a hex mask"))?,
            "SigBlk" => {
                st.sig_blk = hex(value).ok_or_else(|| bad("a hex mask"))?;
                seen.sig_blk = true;
            }
            "SigIgn" => st.sig_ign = hex(value).ok_or_else(|| bad("a hex mask"))?,
            "SigCgt" => st.sig_cgt = hex(value).ok_or_else(|| bad("a hex mask"))?,
            "CapInh" | "CapPrm" | "CapEff" | "CapBnd" | "CapAmb" => {
                let i = ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"]
                    .iter()
                    .position(|k| *k == key)
                    .unwrap_or(0);
                st.caps[i] = hex(value).ok_or_else(|| bad("a hex capability set"))?;
            }
            "NoNewPrivs" => st.no_new_privs = num::<u32>(value).ok_or_else(|| bad("0 or 1"))? != 0,
            "Seccomp" => st.seccomp = num(value).ok_or_else(|| bad("a seccomp mode"))?,
            "Threads" => st.threads = num(value).ok_or_else(|| bad("a thread count"))?,
            "RssAnon" | "RssShmem" => {
                let kb: u64 = value
                    .trim()
                    .strip_suffix("kB")
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or_else(|| bad("a size in kB"))?;
                st.rss_anon_shmem = Some(st.rss_anon_shmem.unwrap_or(0) + kb * 1024);
            }
            _ => {}
        }
    }

    let missing = |field| ProcError::MissingField {
        pid,
        path: path.to_owned(),
        field,
    };
    for (ok, field) in [
        (seen.name, "Name"),
        (seen.state, "State"),
        (seen.pid, "Pid"),
        (seen.uid, "Uid"),
        (seen.gid, "Gid"),
        (seen.sig_blk, "SigBlk"),
    ] {
        if !ok {
            return Err(missing(field));
        }
    }
    if !ns_seen {
        st.ns_pid = vec![st.pid];
        st.ns_tgid = vec![st.tgid];
    }
    Ok(st)
}

#[derive(Default)]
struct Seen {
    name: bool,
    state: bool,
    pid: bool,
    uid: bool,
    gid: bool,
    sig_blk: bool,
}

fn num<T: std::str::FromStr>(s: &str) -> Option<T> {
    s.trim().parse().ok()
}

fn hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim(), 16).ok()
}

fn list<T: std::str::FromStr>(s: &str) -> Option<Vec<T>> {
    s.split_whitespace().map(|t| t.parse().ok()).collect()
}

fn four(s: &str) -> Option<[u32; 4]> {
    let v: Vec<u32> = list(s)?;
    v.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Name:\ta b\\\\c\\nd\nUmask:\t0027\nState:\tS (sleeping)\nTgid:\t42\nNgid:\t0\n\
Pid:\t43\nPPid:\t1\nTracerPid:\t7\nUid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\nFDSize:\t64\nGroups:\t10 20 \n\
NStgid:\t42\t1\nNSpid:\t43\t2\nNSpgid:\t40\t1\nNSsid:\t40\t1\nRssAnon:\t    1536 kB\n\
RssFile:\t    9000 kB\nRssShmem:\t       8 kB\nThreads:\t3\nSigQ:\t0/1\n\
SigPnd:\t0000000000000001\nShdPnd:\t0000000000000002\nSigBlk:\t0000000000010000\n\
SigIgn:\t0000000000001000\nSigCgt:\t0000000180000000\nCapInh:\t0000000000000000\n\
CapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\n\
CapAmb:\t0000000000000003\nNoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t1\n";

    #[test]
    fn parses_sample() {
        let st = parse_status(42, Path::new("x"), SAMPLE).unwrap();
        assert_eq!(st.name, "a b\\c\nd");
        assert_eq!(st.state, 'S');
        assert_eq!((st.tgid, st.pid, st.ppid, st.tracer_pid), (42, 43, 1, 7));
        assert_eq!(st.uid, [1, 2, 3, 4]);
        assert_eq!(st.gid, [5, 6, 7, 8]);
        assert_eq!(st.groups, vec![10, 20]);
        assert_eq!(st.ns_pid, vec![43, 2]);
        assert_eq!(st.ns_tgid, vec![42, 1]);
        assert_eq!(st.ns_pgid, vec![40, 1]);
        assert_eq!(st.ns_sid, vec![40, 1]);
        assert_eq!(st.umask, Some(0o27));
        assert_eq!(st.sig_pnd, 1);
        assert_eq!(st.shd_pnd, 2);
        assert_eq!(st.sig_blk, 0x10000);
        assert_eq!(st.sig_ign, 0x1000);
        assert_eq!(st.sig_cgt, 0x1_8000_0000);
        assert_eq!(
            st.caps,
            [0, 0x1ff_ffff_ffff, 0x1ff_ffff_ffff, 0x1ff_ffff_ffff, 3]
        );
        assert!(st.no_new_privs);
        assert_eq!(st.seccomp, 2);
        assert_eq!(st.threads, 3);
        assert_eq!(st.rss_anon_shmem, Some((1536 + 8) * 1024));
        let c = creds(&st);
        assert_eq!(c.uid, st.uid);
        assert_eq!(c.groups, vec![10, 20]);
    }

    #[test]
    fn empty_groups_and_missing_fields() {
        let text = SAMPLE.replace("Groups:\t10 20 \n", "Groups:\t \n");
        assert!(parse_status(1, Path::new("x"), &text)
            .unwrap()
            .groups
            .is_empty());
        let text = SAMPLE.replace("Uid:\t1\t2\t3\t4\n", "");
        assert!(matches!(
            parse_status(1, Path::new("x"), &text),
            Err(ProcError::MissingField { field: "Uid", .. })
        ));
        let text = SAMPLE.replace("Uid:\t1\t2\t3\t4\n", "Uid:\t1\t2\n");
        assert!(matches!(
            parse_status(1, Path::new("x"), &text),
            Err(ProcError::Parse { .. })
        ));
    }

    #[test]
    fn reads_self() {
        let me = std::process::id() as i32;
        let st = status(me).unwrap();
        assert_eq!(st.tgid, me);
        assert_eq!(st.pid, me);
        assert!(st.threads >= 1);
        assert_eq!(st.ns_pid.first(), Some(&me));
        assert!(st.umask.is_some());
        assert!(
            st.rss_anon_shmem.is_some_and(|b| b > 0),
            "a running process has anonymous pages"
        );
        // SAFETY: getuid has no preconditions.
        assert_eq!(st.uid[0], unsafe { libc::getuid() });
    }
}
