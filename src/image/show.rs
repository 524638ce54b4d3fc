//! `pdump show`: human-readable and JSON renderings of a checkpoint.

use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use super::format::{FORMAT_MAJOR, FORMAT_MINOR};
use super::model::{FdKind, ProcessImage, SigAction, ThreadState, TimerValue, Vma, VmaKind};
use super::{Checkpoint, ImageError, PAGE_SIZE};

/// Names of the general-purpose register words of the build target, in
/// regset order, where the arch layer provides them; empty otherwise (words
/// are then shown by index). The one place in this module that depends on
/// the target.
fn gpr_names() -> &'static [&'static str] {
    <pdump_arch::Native as pdump_arch::Arch>::GPR_NAMES
}

/// The name of general-purpose register word `i` of a thread with `n` words.
fn gpr_name(i: usize, n: usize) -> String {
    let names = gpr_names();
    match names.get(i) {
        Some(name) if names.len() == n => (*name).to_string(),
        _ => format!("gpr[{i}]"),
    }
}

/// Appends a line to a `String` (writing to a `String` cannot fail).
macro_rules! line {
    ($out:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
}

/// A human-readable summary of the checkpoint.
pub fn render_text(cp: &Checkpoint) -> String {
    let mut out = String::new();
    let inv = &cp.inventory;
    line!(out, "checkpoint {}", cp.dir.display());
    line!(
        out,
        "  format {FORMAT_MAJOR}.{FORMAT_MINOR}, written by pdump {}, arch {}, kernel {}",
        inv.pdump_version,
        inv.arch,
        inv.kernel
    );
    line!(
        out,
        "  created {} (unix), root pid {}, {} process(es) {:?}, page size {}, tree {}",
        inv.created_unix,
        inv.root_pid,
        inv.processes.len(),
        inv.processes,
        inv.page_size,
        if inv.leave_running {
            "left running"
        } else {
            "stopped after dump"
        }
    );
    render_tree(&mut out, inv);
    for p in &cp.processes {
        out.push('\n');
        render_process(&mut out, p);
    }
    out
}

/// The task table of the seeds: every task in DFS order with its ids in the
/// root's pid namespace and its pid on every nested level.
fn render_tree(out: &mut String, inv: &crate::image::model::Inventory) {
    use crate::image::model::{DumpMode, TaskState};
    line!(
        out,
        "  mode {}",
        match inv.mode {
            DumpMode::Container => "container (nothing shared with the outside)",
            DumpMode::SubTree => "sub-tree (resources shared with the outside are reported)",
        }
    );
    if !inv.tree.is_empty() {
        line!(
            out,
            "\ntree ({} tasks, ids in the root task's pid namespace):",
            inv.tree.len()
        );
        line!(
            out,
            "  {:>7} {:>7} {:>7} {:>7} {:>7} {:>5}  {:<22} {:<10} flags",
            "pid",
            "tgid",
            "ppid",
            "pgid",
            "sid",
            "depth",
            "pids per level",
            "state"
        );
        for t in &inv.tree {
            let levels = t
                .vpids
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("/");
            let state = match t.state {
                TaskState::Alive => "alive".to_string(),
                TaskState::Stopped => "stopped".to_string(),
                TaskState::Zombie { exit_code } => format!("zombie({exit_code:#x})"),
            };
            let mut flags = Vec::new();
            if t.pidns_init {
                flags.push("pidns-init".to_string());
            }
            if t.child_subreaper {
                flags.push("subreaper".to_string());
            }
            if !t.threads.is_empty() {
                flags.push(format!("+{} threads", t.threads.len()));
            }
            line!(
                out,
                "  {:>7} {:>7} {:>7} {:>7} {:>7} {:>5}  {:<22} {:<10} {}",
                t.pid,
                t.tgid,
                t.ppid,
                t.pgid,
                t.sid,
                t.depth,
                levels,
                state,
                flags.join(" ")
            );
        }
    }
    if !inv.leaks.is_empty() {
        line!(
            out,
            "\nshared with tasks outside the tree ({}):",
            inv.leaks.len()
        );
        for l in &inv.leaks {
            line!(
                out,
                "  {}: inside {:?}, outside {:?}",
                l.resource,
                l.inside,
                l.outside
            );
        }
    }
    if !inv.files.is_empty() {
        line!(out, "\nfiles shared by several fds ({}):", inv.files.len());
        for f in &inv.files {
            line!(out, "  #{} flags {:#o} {}", f.id, f.flags, fd_kind(&f.kind));
        }
    }
}

fn render_process(out: &mut String, p: &ProcessImage) {
    line!(out, "process {} ({:?})", p.pid, p.comm);
    line!(out, "  ppid {}  pgid {}  sid {}", p.ppid, p.pgid, p.sid);
    line!(out, "  exe     {}", p.exe);
    line!(out, "  cmdline {}", p.cmdline.join(" "));
    line!(out, "  cwd     {}", p.cwd);
    line!(out, "  root    {}", p.root);
    line!(
        out,
        "  umask {:04o}  personality {:#x}  coredump_filter {:#x}",
        p.umask,
        p.personality,
        p.coredump_filter
    );
    let c = &p.creds;
    line!(
        out,
        "  uid {}/{}/{}/{}  gid {}/{}/{}/{}  groups {:?}",
        c.uid[0],
        c.uid[1],
        c.uid[2],
        c.uid[3],
        c.gid[0],
        c.gid[1],
        c.gid[2],
        c.gid[3],
        c.groups
    );
    line!(
        out,
        "  caps inh {:#x} prm {:#x} eff {:#x} bnd {:#x} amb {:#x}  no_new_privs {}  seccomp {}",
        c.caps[0],
        c.caps[1],
        c.caps[2],
        c.caps[3],
        c.caps[4],
        c.no_new_privs,
        c.seccomp
    );
    let m = &p.mm;
    line!(
        out,
        "  mm code {:#x}-{:#x} data {:#x}-{:#x} brk {:#x}-{:#x} stack {:#x} args {:#x}-{:#x} env {:#x}-{:#x}",
        m.start_code,
        m.end_code,
        m.start_data,
        m.end_data,
        m.start_brk,
        m.brk,
        m.start_stack,
        m.arg_start,
        m.arg_end,
        m.env_start,
        m.env_end
    );
    line!(out, "  auxv {} entries", p.auxv.len());
    if !p.rlimits.is_empty() {
        line!(out, "  rlimits:");
        for r in &p.rlimits {
            line!(
                out,
                "    {:<26} soft {:<20} hard {}",
                r.name,
                limit(r.soft),
                limit(r.hard)
            );
        }
    }

    line!(out, "  threads ({}):", p.threads.len());
    for t in &p.threads {
        render_thread(out, t);
    }

    let custom: Vec<(usize, &SigAction)> = p
        .sigactions
        .iter()
        .enumerate()
        .filter(|(_, a)| **a != SigAction::default())
        .collect();
    if custom.is_empty() {
        line!(out, "  signal actions: all default");
    } else {
        line!(out, "  signal actions (not default):");
        for (i, a) in custom {
            let signo = i as i32 + 1;
            let handler = match a.handler {
                0 => "SIG_DFL".to_string(),
                1 => "SIG_IGN".to_string(),
                h => format!("{h:#x}"),
            };
            line!(
                out,
                "    {:<10} handler {handler} flags {:#x} restorer {:#x} mask {:#x}",
                signal_name(signo),
                a.flags,
                a.restorer,
                a.mask
            );
        }
    }
    if !p.shared_pending.is_empty() {
        line!(
            out,
            "  process-wide pending signals: {}",
            p.shared_pending.len()
        );
    }

    const ITIMERS: [&str; 3] = ["ITIMER_REAL", "ITIMER_VIRTUAL", "ITIMER_PROF"];
    let armed: Vec<String> = p
        .itimers
        .iter()
        .enumerate()
        .filter(|(_, v)| **v != TimerValue::default())
        .map(|(i, v)| {
            let name = ITIMERS.get(i).copied().unwrap_or("itimer");
            format!("{name} {}", timer(v))
        })
        .collect();
    if armed.is_empty() {
        line!(out, "  itimers: none armed");
    } else {
        line!(out, "  itimers: {}", armed.join(", "));
    }
    for t in &p.posix_timers {
        line!(
            out,
            "  posix timer {} clock {} signal {} notify {} tid {} value {:#x}: {} overrun {}",
            t.id,
            t.clock,
            t.signo,
            t.notify,
            t.notify_tid,
            t.sigev_value,
            timer(&t.value),
            t.overrun
        );
    }

    let dumped: u64 = p
        .vmas
        .iter()
        .flat_map(|v| &v.pages)
        .map(|r| r.npages)
        .fold(0u64, u64::saturating_add);
    let zero: u64 = p
        .vmas
        .iter()
        .flat_map(|v| &v.pages)
        .filter(|r| r.zero)
        .map(|r| r.npages)
        .fold(0u64, u64::saturating_add);
    line!(
        out,
        "  mappings ({}, {} pages dumped, {} of them zero (not stored) = {} bytes in {}):",
        p.vmas.len(),
        dumped,
        zero,
        p.pages_bytes,
        if p.pages_file.is_empty() {
            "-"
        } else {
            &p.pages_file
        }
    );
    line!(
        out,
        "    {:<33} {:<4} {:<8} {:<5} {:<8} {:>15} {:<10} path",
        "address",
        "perm",
        "offset",
        "dev",
        "inode",
        "pages dump/all",
        "kind"
    );
    for v in &p.vmas {
        render_vma(out, v);
    }

    line!(out, "  fds ({}):", p.fds.len());
    for f in &p.fds {
        line!(
            out,
            "    {:>4} {}{} flags {:#o}",
            f.fd,
            fd_kind(&f.kind),
            if f.cloexec { " cloexec" } else { "" },
            f.flags
        );
    }
}

fn render_thread(out: &mut String, t: &ThreadState) {
    let mut extra = String::new();
    if t.stopped {
        extra.push_str(" stopped");
    }
    if t.clear_tid != 0 {
        let _ = write!(extra, " clear-tid {:#x}", t.clear_tid);
    }
    if let Some(nr) = t.restart_syscall {
        let _ = write!(extra, " restart-syscall {nr}");
    }
    line!(
        out,
        "    thread {} ({:?}) sigmask {:#x} pending {}{extra}",
        t.tid,
        t.comm,
        t.sigmask,
        t.pending.len()
    );
    if t.altstack.flags & libc::SS_DISABLE == 0 {
        line!(
            out,
            "      altstack {:#x} size {:#x} flags {:#x}",
            t.altstack.sp,
            t.altstack.size,
            t.altstack.flags
        );
    }
    if let Some(r) = &t.rseq {
        line!(
            out,
            "      rseq {:#x} len {} sig {:#x} flags {:#x}",
            r.abi_pointer,
            r.abi_size,
            r.signature,
            r.flags
        );
    }
    for (row, words) in t.gpr.chunks(4).enumerate() {
        let mut s = String::from("     ");
        for (j, w) in words.iter().enumerate() {
            let _ = write!(s, " {:>8} {w:#018x}", gpr_name(row * 4 + j, t.gpr.len()));
        }
        line!(out, "{s}");
    }
    line!(out, "      fpregs {} bytes", t.fpregs.len());
}

fn render_vma(out: &mut String, v: &Vma) {
    let perm = format!(
        "{}{}{}{}",
        if v.prot & libc::PROT_READ as u32 != 0 {
            'r'
        } else {
            '-'
        },
        if v.prot & libc::PROT_WRITE as u32 != 0 {
            'w'
        } else {
            '-'
        },
        if v.prot & libc::PROT_EXEC as u32 != 0 {
            'x'
        } else {
            '-'
        },
        if v.shared { 's' } else { 'p' }
    );
    let dumped = v
        .pages
        .iter()
        .map(|r| r.npages)
        .fold(0u64, u64::saturating_add);
    let total = v.end.saturating_sub(v.start) / PAGE_SIZE;
    line!(
        out,
        "    {:016x}-{:016x} {perm} {:08x} {:02x}:{:02x} {:<8} {:>15} {:<10} {}",
        v.start,
        v.end,
        v.offset,
        v.dev.0,
        v.dev.1,
        v.inode,
        format!("{dumped}/{total}"),
        vma_kind(&v.kind),
        v.path.as_deref().unwrap_or("")
    );
    if !v.vm_flags.is_empty() {
        line!(out, "      VmFlags: {}", v.vm_flags);
    }
}

fn vma_kind(k: &VmaKind) -> &'static str {
    match k {
        VmaKind::Anon => "anon",
        VmaKind::Heap => "heap",
        VmaKind::Stack => "stack",
        VmaKind::Vdso => "vdso",
        VmaKind::Vvar => "vvar",
        VmaKind::VvarVclock => "vvar_vclock",
        VmaKind::Vsyscall => "vsyscall",
        VmaKind::File => "file",
        VmaKind::Shmem => "shmem",
    }
}

fn fd_kind(k: &FdKind) -> String {
    let end = |w: bool| if w { "write end" } else { "read end" };
    match k {
        FdKind::Unknown => "unknown".to_string(),
        FdKind::Regular {
            path,
            pos,
            size,
            mode,
            unlinked_contents,
        } => {
            let unlinked = match unlinked_contents {
                Some(c) => format!(" (unlinked, {} bytes kept)", c.len),
                None => String::new(),
            };
            format!("file {path}{unlinked} pos {pos} size {size} mode {mode:o}")
        }
        FdKind::Directory { path, pos } => format!("dir {path} pos {pos}"),
        FdKind::DevNull => "/dev/null".to_string(),
        FdKind::DevZero => "/dev/zero".to_string(),
        FdKind::Pipe {
            inode,
            write_end,
            data,
        } => format!(
            "pipe:[{inode}] {} ({} bytes buffered)",
            end(*write_end),
            data.len
        ),
        FdKind::Fifo {
            path,
            inode,
            write_end,
            data,
        } => format!(
            "fifo {path} inode {inode} {} ({} bytes buffered)",
            end(*write_end),
            data.len
        ),
        FdKind::EventFd { count, efd_flags } => {
            format!("eventfd count {count} flags {efd_flags:#x}")
        }
        FdKind::Memfd {
            name,
            inode,
            pos,
            contents,
            seals,
        } => format!(
            "memfd:{name} inode {inode} pos {pos} size {} seals {seals:#x}",
            contents.len
        ),
        FdKind::Shared { file_id } => format!("shared file object #{file_id}"),
        FdKind::UnixSocket {
            inode,
            peer_inode,
            sock_type,
            name,
            queued,
            shutdown,
        } => {
            let ty = match *sock_type {
                1 => "stream",
                2 => "dgram",
                5 => "seqpacket",
                _ => "other",
            };
            format!(
                "unix {ty} socket:[{inode}] peer [{peer_inode}] name {:?} {} bytes queued in {} message(s) shutdown {shutdown}",
                String::from_utf8_lossy(name),
                queued.iter().map(Vec::len).sum::<usize>(),
                queued.len()
            )
        }
    }
}

fn signal_name(signo: i32) -> String {
    match nix::sys::signal::Signal::try_from(signo) {
        Ok(s) => s.as_str().to_string(),
        Err(_) => format!("signal {signo}"),
    }
}

fn limit(v: u64) -> String {
    if v == u64::MAX {
        "unlimited".to_string()
    } else {
        v.to_string()
    }
}

fn timer(v: &TimerValue) -> String {
    format!("value {}ns interval {}ns", v.value_ns, v.interval_ns)
}

/// A complete machine-readable rendering: the whole model as serde
/// serializes it, plus, for convenience, `"regs"` (register name to value)
/// under every thread where the arch names its registers, and (with
/// `with_pages`) a `"page_list"` under every VMA: one
/// `{ "addr", "crc32c", "zero" }` object per dumped page, computed from the
/// page data (each run's checksum is verified on the way).
pub fn render_json(cp: &Checkpoint, with_pages: bool) -> Result<Value, ImageError> {
    let mut processes = Vec::with_capacity(cp.processes.len());
    for p in &cp.processes {
        let mut pv = to_value(cp, p)?;
        if let Some(threads) = pv.get_mut("threads").and_then(Value::as_array_mut) {
            for (tv, t) in threads.iter_mut().zip(&p.threads) {
                add_regs(tv, t);
            }
        }
        if with_pages {
            let pages = cp.pages(p)?;
            if let Some(vmas) = pv.get_mut("vmas").and_then(Value::as_array_mut) {
                for (vv, v) in vmas.iter_mut().zip(&p.vmas) {
                    let mut list = Vec::new();
                    if let Some(pages) = &pages {
                        for r in &v.pages {
                            pages.for_each_page(r, |addr, page| {
                                list.push(json!({
                                    "addr": addr,
                                    "crc32c": crc32c::crc32c(page),
                                    "zero": page.iter().all(|&b| b == 0),
                                }));
                            })?;
                        }
                    }
                    if let Some(obj) = vv.as_object_mut() {
                        obj.insert("page_list".to_string(), Value::Array(list));
                    }
                }
            }
        }
        processes.push(pv);
    }
    Ok(json!({
        "dir": cp.dir.to_string_lossy(),
        "format": { "major": FORMAT_MAJOR, "minor": FORMAT_MINOR },
        "inventory": to_value(cp, &cp.inventory)?,
        "processes": processes,
    }))
}

/// Add `"regs": { name: value }` to a thread's JSON where names are known.
fn add_regs(tv: &mut Value, t: &ThreadState) {
    let names = gpr_names();
    if names.is_empty() || names.len() != t.gpr.len() {
        return;
    }
    let regs: Map<String, Value> = names
        .iter()
        .zip(&t.gpr)
        .map(|(n, v)| ((*n).to_string(), Value::from(*v)))
        .collect();
    if let Some(obj) = tv.as_object_mut() {
        obj.insert("regs".to_string(), Value::Object(regs));
    }
}

/// Serialize a model value (cannot fail for the model's types: every map
/// key is a string).
fn to_value<T: serde::Serialize>(cp: &Checkpoint, v: &T) -> Result<Value, ImageError> {
    serde_json::to_value(v).map_err(|e| ImageError::Inconsistent {
        path: cp.dir.clone(),
        what: format!("cannot render as JSON: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::super::model::{Inventory, ProcessImage};
    use super::super::tests::{page_pattern, write_sample, TempDir};
    use super::*;

    #[test]
    fn text_summary_names_everything() {
        let t = TempDir::new("show-text");
        write_sample(t.path(), true);
        let cp = Checkpoint::open(t.path()).unwrap();
        let text = render_text(&cp);
        for needle in [
            "process 100 (\"victim\")",
            "process 101",
            "exe     /usr/bin/victim",
            "cwd     /tmp",
            "uid 0/0/0/0",
            "thread 102 (\"worker-102\")",
            "restart-syscall 230",
            "fpregs 2696 bytes",
            "SIGINT",
            "SIGPIPE",
            "handler SIG_IGN",
            "ITIMER_REAL value 500000ns",
            "posix timer 0",
            "[heap]",
            "[stack]",
            "rw-s",
            "2/33",
            "VmFlags: rd mr mw me",
            "pipe:[4242] write end",
            "(unlinked, 100 bytes kept)",
            "memfd:mem",
            "unlimited",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
        if !gpr_names().is_empty() {
            assert!(text.contains(gpr_names()[0]), "{text}");
        } else {
            assert!(text.contains("gpr[0]"), "{text}");
        }
    }

    #[test]
    fn json_is_complete_and_lists_pages() {
        let t = TempDir::new("show-json");
        let procs = write_sample(t.path(), true);
        let cp = Checkpoint::open(t.path()).unwrap();

        let v = render_json(&cp, false).unwrap();
        let inv: Inventory = serde_json::from_value(v["inventory"].clone()).unwrap();
        assert_eq!(inv, cp.inventory);
        for (pv, (p, _)) in v["processes"].as_array().unwrap().iter().zip(&procs) {
            // The whole model comes back from the JSON (extra keys are ignored).
            let back: ProcessImage = serde_json::from_value(pv.clone()).unwrap();
            assert_eq!(&back, p);
            assert!(pv["vmas"][1].get("page_list").is_none());
        }

        let v = render_json(&cp, true).unwrap();
        let mut seen = 0;
        for (pv, (p, _)) in v["processes"].as_array().unwrap().iter().zip(&procs) {
            for (vv, vma) in pv["vmas"].as_array().unwrap().iter().zip(&p.vmas) {
                let list = vv["page_list"].as_array().unwrap();
                let expect: Vec<u64> = vma
                    .pages
                    .iter()
                    .flat_map(|r| (0..r.npages).map(move |k| r.addr + k * PAGE_SIZE))
                    .collect();
                assert_eq!(list.len(), expect.len());
                for (e, addr) in list.iter().zip(expect) {
                    let page = page_pattern(p.pid, addr);
                    assert_eq!(e["addr"], addr);
                    assert_eq!(e["crc32c"], crc32c::crc32c(&page));
                    assert_eq!(e["zero"], page.iter().all(|&b| b == 0));
                    seen += 1;
                }
            }
            if !gpr_names().is_empty() {
                let t0 = &pv["threads"][0];
                assert_eq!(t0["regs"][gpr_names()[1]], t0["gpr"][1]);
            }
        }
        assert!(seen > 10);
        assert!(v.to_string().contains("\"zero\":true"));
    }
}
