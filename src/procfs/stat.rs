//! `/proc/PID/stat`: scheduling identity and the address-space bounds.

use std::path::Path;

use super::{maps, parse_err, proc_path, read_text, task_path, Result};
use crate::image::model::{self, VmaKind};

/// `PF_KTHREAD` in the `flags` field: the task is a kernel thread.
pub const PF_KTHREAD: u32 = 0x0020_0000;

/// The fields of `/proc/PID/stat` pdump uses (field numbers as in proc(5)).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stat {
    /// (1) pid (the tid for a task's stat).
    pub pid: i32,
    /// (2) comm, without the parentheses.
    pub comm: String,
    /// (3) state letter.
    pub state: char,
    /// (4) parent pid.
    pub ppid: i32,
    /// (5) process group.
    pub pgrp: i32,
    /// (6) session.
    pub session: i32,
    /// (7) controlling terminal (encoded device number, 0 for none).
    pub tty_nr: i32,
    /// (8) foreground process group of the terminal (-1 for none).
    pub tpgid: i32,
    /// (9) `PF_*` flags.
    pub flags: u32,
    /// (20) threads in the group.
    pub num_threads: u32,
    /// (22) start time after boot, in clock ticks.
    pub start_time: u64,
    /// (38) signal sent to the parent when the task dies.
    pub exit_signal: i32,
    /// (26) start of the text.
    pub start_code: u64,
    /// (27) end of the text.
    pub end_code: u64,
    /// (28) bottom of the stack.
    pub start_stack: u64,
    /// (45) start of initialised and uninitialised data.
    pub start_data: u64,
    /// (46) end of data.
    pub end_data: u64,
    /// (47) start of the heap (`brk` area).
    pub start_brk: u64,
    /// (48) start of argv.
    pub arg_start: u64,
    /// (49) end of argv.
    pub arg_end: u64,
    /// (50) start of the environment.
    pub env_start: u64,
    /// (51) end of the environment.
    pub env_end: u64,
}

impl Stat {
    /// True for a kernel thread (`PF_KTHREAD`).
    pub fn is_kernel_thread(&self) -> bool {
        self.flags & PF_KTHREAD != 0
    }

    /// The address-space bounds, with `brk` given by the caller.
    ///
    /// `stat` does not show the current `brk`. The best value `/proc`
    /// offers is the end of the `[heap]` mapping, which is the current brk
    /// rounded up to a page; without a heap mapping the heap is empty and
    /// `brk == start_brk`. Pass `heap_end` = the `[heap]` VMA's end, or
    /// `None`. (The exact value is `brk(0)` run inside the task.)
    pub fn mm_bounds(&self, heap_end: Option<u64>) -> model::MmBounds {
        model::MmBounds {
            start_code: self.start_code,
            end_code: self.end_code,
            start_data: self.start_data,
            end_data: self.end_data,
            start_brk: self.start_brk,
            brk: heap_end.unwrap_or(self.start_brk),
            start_stack: self.start_stack,
            arg_start: self.arg_start,
            arg_end: self.arg_end,
            env_start: self.env_start,
            env_end: self.env_end,
        }
    }
}

/// Reads `/proc/PID/stat`.
pub fn stat(pid: i32) -> Result<Stat> {
    let path = proc_path(pid, "stat");
    parse_stat(pid, &path, &read_text(pid, &path)?)
}

/// Reads `/proc/PID/task/TID/stat`.
pub fn task_stat(pid: i32, tid: i32) -> Result<Stat> {
    let path = task_path(pid, tid, "stat");
    parse_stat(pid, &path, &read_text(pid, &path)?)
}

/// True when `pid` is a kernel thread (`PF_KTHREAD` in its `stat` flags).
pub fn is_kernel_thread(pid: i32) -> Result<bool> {
    Ok(stat(pid)?.is_kernel_thread())
}

/// The memory-map bounds of `pid`: `stat` fields 26-28 and 45-51, and
/// `brk` from the end of the `[heap]` mapping in `/proc/PID/maps` (or
/// `start_brk` when there is no heap; see [`Stat::mm_bounds`]).
pub fn mm_bounds(pid: i32) -> Result<model::MmBounds> {
    let st = stat(pid)?;
    let heap_end = maps(pid)?
        .iter()
        .find(|v| v.kind == VmaKind::Heap)
        .map(|v| v.end);
    Ok(st.mm_bounds(heap_end))
}

/// Parses the text of a `stat` file. The comm may contain spaces and
/// parentheses, so it ends at the *last* `)`.
pub(crate) fn parse_stat(pid: i32, path: &Path, text: &str) -> Result<Stat> {
    let line = text.trim_end_matches('\n');
    let bad = |what| parse_err(pid, path, what, line);
    let open = line.find(" (").ok_or_else(|| bad("`pid (comm)`"))?;
    let close = line.rfind(')').ok_or_else(|| bad("`pid (comm)`"))?;
    if close < open {
        return Err(bad("`pid (comm)`"));
    }
    let pid_field = line[..open]
        .trim()
        .parse()
        .map_err(|_| bad("a pid in field 1"))?;
    let comm = line[open + 2..close].to_owned();
    // rest[0] is field 3.
    let rest: Vec<&str> = line[close + 1..].split_whitespace().collect();
    let field = |n: usize| -> Result<&str> {
        rest.get(n - 3)
            .copied()
            .ok_or_else(|| bad("at least 51 fields"))
    };
    let int = |n: usize| -> Result<i64> {
        field(n)?
            .parse::<i64>()
            .map_err(|_| bad("a number in a numeric field"))
    };
    let uint = |n: usize| -> Result<u64> {
        field(n)?
            .parse::<u64>()
            .map_err(|_| bad("an unsigned number in a numeric field"))
    };
    let i32_of =
        |n: usize| -> Result<i32> { i32::try_from(int(n)?).map_err(|_| bad("a 32-bit number")) };
    let u32_of = |n: usize| -> Result<u32> {
        u32::try_from(uint(n)?).map_err(|_| bad("a 32-bit unsigned number"))
    };
    Ok(Stat {
        pid: pid_field,
        comm,
        state: field(3)?
            .chars()
            .next()
            .ok_or_else(|| bad("a state letter"))?,
        ppid: i32_of(4)?,
        pgrp: i32_of(5)?,
        session: i32_of(6)?,
        tty_nr: i32_of(7)?,
        tpgid: i32_of(8)?,
        flags: u32_of(9)?,
        num_threads: u32_of(20)?,
        start_time: uint(22)?,
        start_code: uint(26)?,
        end_code: uint(27)?,
        start_stack: uint(28)?,
        exit_signal: i32_of(38)?,
        start_data: uint(45)?,
        end_data: uint(46)?,
        start_brk: uint(47)?,
        arg_start: uint(48)?,
        arg_end: uint(49)?,
        env_start: uint(50)?,
        env_end: uint(51)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procfs::ProcError;

    fn sample(comm: &str) -> String {
        let mut f: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
        f[0] = "S".into(); // 3
        f[9 - 3] = "2097216".into(); // flags: PF_KTHREAD | 0x40
        format!("1234 ({comm}) {}\n", f.join(" "))
    }

    #[test]
    fn comm_with_spaces_and_parens() {
        let comm = "a) b (c) )";
        let st = parse_stat(1234, Path::new("x"), &sample(comm)).unwrap();
        assert_eq!(st.pid, 1234);
        assert_eq!(st.comm, comm);
        assert_eq!(st.state, 'S');
        assert_eq!((st.ppid, st.pgrp, st.session), (4, 5, 6));
        assert_eq!(st.num_threads, 20);
        assert_eq!(st.start_time, 22);
        assert_eq!((st.start_code, st.end_code, st.start_stack), (26, 27, 28));
        assert_eq!(st.exit_signal, 38);
        assert_eq!((st.start_data, st.end_data, st.start_brk), (45, 46, 47));
        assert_eq!(
            (st.arg_start, st.arg_end, st.env_start, st.env_end),
            (48, 49, 50, 51)
        );
        assert!(st.is_kernel_thread());
        let mm = st.mm_bounds(None);
        assert_eq!(mm.brk, 47);
        assert_eq!(st.mm_bounds(Some(0x5000)).brk, 0x5000);
    }

    #[test]
    fn truncated_or_garbage() {
        let s = sample("x");
        let cut = &s[..s.len() / 2];
        assert!(matches!(
            parse_stat(1, Path::new("x"), cut),
            Err(ProcError::Parse { .. })
        ));
        assert!(parse_stat(1, Path::new("x"), "").is_err());
        assert!(parse_stat(1, Path::new("x"), "12 x) (").is_err());
        assert!(parse_stat(1, Path::new("x"), &s.replace(" 20 ", " -20 ")).is_err());
    }

    #[test]
    fn reads_self() {
        let me = std::process::id() as i32;
        let st = stat(me).unwrap();
        assert_eq!(st.pid, me);
        assert!(!st.is_kernel_thread());
        assert!(st.start_code > 0 && st.end_code > st.start_code);
        assert!(st.arg_start > 0 && st.arg_end >= st.arg_start);
        // SAFETY: getppid has no preconditions.
        assert_eq!(st.ppid, unsafe { libc::getppid() });
        let mm = mm_bounds(me).unwrap();
        assert!(mm.brk >= mm.start_brk);
        assert!(!is_kernel_thread(me).unwrap());
    }

    #[test]
    fn odd_comm_of_a_child() {
        use crate::procfs::testutil::Forked;
        let child = Forked::spawn(|ready| {
            // SAFETY: PR_SET_NAME reads a NUL-terminated string of <= 16 bytes.
            unsafe { libc::prctl(libc::PR_SET_NAME, c") x (y) z".as_ptr()) };
            ready();
            Forked::park()
        });
        let st = stat(child.pid).unwrap();
        assert_eq!(st.comm, ") x (y) z");
        // SAFETY: getpid has no preconditions.
        assert_eq!(st.ppid, unsafe { libc::getpid() });
        assert_eq!(st.num_threads, 1);
        let tst = task_stat(child.pid, child.pid).unwrap();
        assert_eq!(tst.comm, st.comm);
        assert_eq!(
            crate::procfs::comm(child.pid, child.pid).unwrap(),
            ") x (y) z"
        );
        assert_eq!(crate::procfs::status(child.pid).unwrap().name, ") x (y) z");
    }

    #[test]
    fn kthreadd_is_a_kernel_thread() {
        // pid 2 is kthreadd unless we run in a pid namespace.
        if let Ok(st) = stat(2) {
            if st.comm == "kthreadd" {
                assert!(st.is_kernel_thread());
            }
        }
    }
}
