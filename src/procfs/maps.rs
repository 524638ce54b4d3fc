//! `/proc/PID/smaps` and `/proc/PID/maps`: the task's mappings.
//!
//! A mapping line is `start-end perms offset major:minor inode   path`, all
//! numbers hex except the inode. The path is everything after the padding
//! that follows the inode: it may contain spaces, ends with `" (deleted)"`
//! when the file was unlinked, and has newlines escaped as `\012` by the
//! kernel. It is kept exactly as printed ([`model::Vma::path`]); use
//! [`strip_deleted`] for the file's name.

use std::path::Path;

use super::{parse_err, proc_path, read_text, Result};
use crate::image::model::{self, VmaKind};

/// Reads `/proc/PID/smaps` (in one pass, streamed: memory does not grow
/// with the text, about 1.2 KiB per mapping) into every mapping with its
/// `VmFlags`. Page runs are left empty.
pub fn smaps(pid: i32) -> Result<Vec<model::Vma>> {
    let path = proc_path(pid, "smaps");
    let file = std::fs::File::open(&path).map_err(|source| super::ProcError::Read {
        pid,
        path: path.clone(),
        source,
    })?;
    parse_smaps_from(
        pid,
        &path,
        std::io::BufReader::with_capacity(64 << 10, file),
    )
}

/// Reads `/proc/PID/maps`: like [`smaps`] but without `VmFlags`, and much
/// cheaper for the kernel (no page-table walk). For callers that only need
/// ranges, protections and backing.
pub fn maps(pid: i32) -> Result<Vec<model::Vma>> {
    let path = proc_path(pid, "maps");
    parse_maps(pid, &path, &read_text(pid, &path)?)
}

/// Reads `/proc/self/maps` (right in any pid namespace, where
/// `/proc/<getpid()>` may name another process).
pub fn maps_self() -> Result<Vec<model::Vma>> {
    let path = Path::new("/proc/self/maps");
    parse_maps(0, path, &read_text(0, path)?)
}

/// Reads `/proc/PID/maps` up to and including the first mapping for which
/// `last` holds (all of it if none does): for callers that look for one
/// mapping near the start of a long list.
pub fn maps_until(pid: i32, mut last: impl FnMut(&model::Vma) -> bool) -> Result<Vec<model::Vma>> {
    use std::io::BufRead;
    let path = proc_path(pid, "maps");
    let err = |source| super::ProcError::Read {
        pid,
        path: path.clone(),
        source,
    };
    let file = std::fs::File::open(&path).map_err(err)?;
    let mut r = std::io::BufReader::with_capacity(16 << 10, file);
    let mut out = Vec::new();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if r.read_until(b'\n', &mut buf).map_err(err)? == 0 {
            break;
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end_matches('\n');
        if line.is_empty() {
            continue;
        }
        match parse_header(line) {
            Some(Ok(v)) => {
                let stop = last(&v);
                out.push(v);
                if stop {
                    break;
                }
            }
            Some(Err(what)) => return Err(parse_err(pid, &path, what, line)),
            None => return Err(parse_err(pid, &path, "a mapping line", line)),
        }
    }
    Ok(out)
}

/// Splits a trailing `" (deleted)"` off a mapping's or fd's path: the name
/// the file had, and whether it was unlinked.
pub fn strip_deleted(path: &str) -> (&str, bool) {
    match path.strip_suffix(" (deleted)") {
        Some(p) => (p, true),
        None => (path, false),
    }
}

/// Classifies a mapping by its path as `/proc/PID/maps` prints it, its
/// inode and whether it is `MAP_SHARED`.
///
/// * `[heap]`, `[stack]`, `[vdso]`, `[vvar]`, `[vvar_vclock]`, `[vsyscall]`:
///   their own kinds;
/// * shared memory ([`VmaKind::Shmem`]): `/dev/zero (deleted)` (a shared
///   anonymous mapping), `/SYSV...` (SysV shm), `/memfd:...` (private or
///   shared: the memfd's contents must be dumped either way),
///   `[anon_shmem:NAME]`, and shared mappings of `/dev/shm/*`;
/// * any other path with an inode: [`VmaKind::File`];
/// * no path, `[anon:NAME]` and other pseudo-names: [`VmaKind::Anon`].
pub fn classify(path: Option<&str>, inode: u64, shared: bool) -> VmaKind {
    let Some(p) = path else {
        return VmaKind::Anon;
    };
    match p {
        "[heap]" => return VmaKind::Heap,
        "[stack]" => return VmaKind::Stack,
        "[vdso]" => return VmaKind::Vdso,
        "[vvar]" => return VmaKind::Vvar,
        "[vvar_vclock]" => return VmaKind::VvarVclock,
        "[vsyscall]" => return VmaKind::Vsyscall,
        _ => {}
    }
    if p.starts_with("[anon_shmem:") {
        return VmaKind::Shmem;
    }
    if p.starts_with('[') {
        // "[stack:TID]" of old kernels, "[anon:NAME]", "[uprobes]", ...
        return if p.starts_with("[stack") {
            VmaKind::Stack
        } else {
            VmaKind::Anon
        };
    }
    if p == "/dev/zero (deleted)" || p.starts_with("/SYSV") || p.starts_with("/memfd:") {
        return VmaKind::Shmem;
    }
    if shared && p.starts_with("/dev/shm/") {
        return VmaKind::Shmem;
    }
    if inode != 0 || p.starts_with('/') {
        VmaKind::File
    } else {
        VmaKind::Anon
    }
}

/// Parses a mapping header line; `None` when the line is not one (an smaps
/// `Key: value` line).
fn parse_header(line: &str) -> Option<std::result::Result<model::Vma, &'static str>> {
    let (range, rest) = split_token(line);
    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    Some(parse_header_rest(start, end, rest))
}

fn parse_header_rest(
    start: u64,
    end: u64,
    rest: &str,
) -> std::result::Result<model::Vma, &'static str> {
    if end < start {
        return Err("start <= end");
    }
    let (perms, rest) = split_token(rest);
    let (offset, rest) = split_token(rest);
    let (dev, rest) = split_token(rest);
    let (inode, rest) = split_token(rest);
    let p = perms.as_bytes();
    if p.len() != 4 {
        return Err("4 permission letters");
    }
    let mut prot = 0u32;
    if p[0] == b'r' {
        prot |= libc::PROT_READ as u32;
    }
    if p[1] == b'w' {
        prot |= libc::PROT_WRITE as u32;
    }
    if p[2] == b'x' {
        prot |= libc::PROT_EXEC as u32;
    }
    let shared = match p[3] {
        b's' => true,
        b'p' => false,
        _ => return Err("`p` or `s` as the 4th permission letter"),
    };
    let offset = u64::from_str_radix(offset, 16).map_err(|_| "a hex offset")?;
    let (maj, min) = dev.split_once(':').ok_or("a major:minor device")?;
    let dev = (
        u32::from_str_radix(maj, 16).map_err(|_| "a hex major")?,
        u32::from_str_radix(min, 16).map_err(|_| "a hex minor")?,
    );
    let inode = inode.parse().map_err(|_| "a decimal inode")?;
    let path = rest.trim_start_matches(' ');
    let path = (!path.is_empty()).then(|| path.to_owned());
    let kind = classify(path.as_deref(), inode, shared);
    Ok(model::Vma {
        start,
        end,
        prot,
        shared,
        offset,
        dev,
        inode,
        path,
        kind,
        vm_flags: model::VmFlags::default(),
        pages: Vec::new(),
    })
}

/// The first space-separated token and the remainder after it (with the
/// separating spaces still there).
fn split_token(s: &str) -> (&str, &str) {
    let s = s.trim_start_matches(' ');
    match s.find(' ') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    }
}

/// Parses `/proc/PID/maps` text.
pub(crate) fn parse_maps(pid: i32, path: &Path, text: &str) -> Result<Vec<model::Vma>> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        match parse_header(line) {
            Some(Ok(v)) => out.push(v),
            Some(Err(what)) => return Err(parse_err(pid, path, what, line)),
            None => return Err(parse_err(pid, path, "a mapping line", line)),
        }
    }
    Ok(out)
}

/// Parses `/proc/PID/smaps` text: header lines as in `maps`, each followed
/// by `Key: value` lines, the last of which is `VmFlags:`.
#[cfg(test)]
pub(crate) fn parse_smaps(pid: i32, path: &Path, text: &str) -> Result<Vec<model::Vma>> {
    parse_smaps_from(pid, path, text.as_bytes())
}

/// [`parse_smaps`] over a reader, one line at a time. `Key: value` lines
/// start with an upper-case letter (mapping lines with a lower-case hex
/// digit); only `VmFlags:` among them is looked at.
fn parse_smaps_from(
    pid: i32,
    path: &Path,
    mut r: impl std::io::BufRead,
) -> Result<Vec<model::Vma>> {
    let mut out: Vec<model::Vma> = Vec::new();
    let mut buf = Vec::with_capacity(256);
    loop {
        buf.clear();
        let n = r
            .read_until(b'\n', &mut buf)
            .map_err(|source| super::ProcError::Read {
                pid,
                path: path.to_owned(),
                source,
            })?;
        if n == 0 {
            break;
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
        }
        let Some(&first) = buf.first() else { continue };
        if first.is_ascii_uppercase() {
            let Some(flags) = buf.strip_prefix(b"VmFlags:") else {
                continue; // "Rss:   8 kB" and the like.
            };
            let line = String::from_utf8_lossy(&buf);
            let vma = out
                .last_mut()
                .ok_or_else(|| parse_err(pid, path, "a mapping line before VmFlags", &line))?;
            vma.vm_flags = model::VmFlags::parse(&String::from_utf8_lossy(flags));
            continue;
        }
        let line = String::from_utf8_lossy(&buf);
        match parse_header(&line) {
            Some(Ok(v)) => out.push(v),
            Some(Err(what)) => return Err(parse_err(pid, path, what, &line)),
            None => {}
        }
    }
    out.shrink_to_fit();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
560a72d92000-560a72d94000 r--p 00000000 fe:00 247282                     /usr/bin/head
560a72d94000-560a72d9a000 r-xp 00002000 fe:00 247282                     /usr/bin/my prog (x) (deleted)
560a73000000-560a73021000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000001000 rw-s 00000000 00:01 1234                       /dev/zero (deleted)
7f0000001000-7f0000002000 rw-s 00000000 00:01 32770                      /SYSV0000002a (deleted)
7f0000002000-7f0000003000 rw-p 00000000 00:01 55                         /memfd:buf (deleted)
7f0000003000-7f0000004000 rw-s 00000000 00:1a 77                         /dev/shm/ring
7f0000004000-7f0000005000 rw-p 00000000 00:1a 77                         /dev/shm/ring
7f0000005000-7f0000006000 rw-p 00000000 00:00 0 
7f0000006000-7f0000007000 rw-p 00000000 00:00 0                          [anon:jit]
7ffe8722a000-7ffe8724b000 rw-p 00000000 00:00 0                          [stack]
7ffe87300000-7ffe87302000 r--p 00000000 00:00 0                          [vvar]
7ffe87302000-7ffe87303000 r--p 00000000 00:00 0                          [vvar_vclock]
7ffe87303000-7ffe87305000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn parses_and_classifies() {
        let v = parse_maps(1, Path::new("maps"), MAPS).unwrap();
        assert_eq!(v.len(), 15);
        assert_eq!(v[0].start, 0x560a72d92000);
        assert_eq!(v[0].end, 0x560a72d94000);
        assert_eq!(v[0].prot, libc::PROT_READ as u32);
        assert_eq!(v[0].dev, (0xfe, 0));
        assert_eq!(v[0].inode, 247282);
        assert_eq!(v[0].kind, VmaKind::File);
        assert_eq!(v[1].offset, 0x2000);
        assert_eq!(v[1].prot, (libc::PROT_READ | libc::PROT_EXEC) as u32);
        assert_eq!(v[1].path.as_deref(), Some("/usr/bin/my prog (x) (deleted)"));
        assert_eq!(
            strip_deleted(v[1].path.as_deref().unwrap()),
            ("/usr/bin/my prog (x)", true)
        );
        assert_eq!(v[1].kind, VmaKind::File);
        let kinds: Vec<VmaKind> = v.iter().map(|v| v.kind.clone()).collect();
        use VmaKind::*;
        assert_eq!(
            kinds,
            vec![
                File, File, Heap, Shmem, Shmem, Shmem, Shmem, File, Anon, Anon, Stack, Vvar,
                VvarVclock, Vdso, Vsyscall
            ]
        );
        assert!(v[3].shared && !v[2].shared);
        assert_eq!(v[8].path, None);
        assert_eq!(v[14].start, 0xffffffffff600000);
    }

    #[test]
    fn smaps_vmflags() {
        let text = "\
7f0000000000-7f0000001000 rw-p 00000000 00:00 0 
Size:                  4 kB
Rss:                   4 kB
VmFlags: rd wr mr mw me ac sd 
7ffe8722a000-7ffe8724b000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
THPeligible:           0
VmFlags: rd wr mr mw me gd ac 
7ffe8724c000-7ffe8724d000 r--p 00000000 00:00 0 
VmFlags: rd mr zz mw q9 
";
        let v = parse_smaps(1, Path::new("smaps"), text).unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].vm_flags.to_string(), "rd wr mr mw me ac sd");
        assert_eq!(v[0].vm_flags.unknown(), None);
        assert_eq!(v[1].kind, VmaKind::Stack);
        assert!(v[1].vm_flags.contains(model::VmFlag::GrowsDown));
        assert!(!v[0].vm_flags.contains(model::VmFlag::GrowsDown));
        // Codes pdump does not know are kept, in order, after the known ones.
        assert_eq!(v[2].vm_flags.unknown(), Some("zz q9"));
        assert_eq!(v[2].vm_flags.to_string(), "rd mr mw zz q9");
    }

    #[test]
    fn garbage_is_an_error() {
        for bad in [
            "1000-2000 rw 0 00:00 0\n",
            "1000-2000 rw-x 0 00:00 0\n",
            "1000-2000 rw-p zz 00:00 0\n",
            "1000-2000 rw-p 0 0000 0\n",
            "2000-1000 rw-p 0 00:00 0\n",
            "1000-2000 rw-p 0 00:00 x\n",
            "hello\n",
        ] {
            assert!(parse_maps(1, Path::new("m"), bad).is_err(), "{bad}");
        }
        assert!(parse_smaps(1, Path::new("s"), "VmFlags: rd\n").is_err());
    }

    #[test]
    fn self_smaps_matches_maps() {
        let me = std::process::id() as i32;
        let s = smaps(me).unwrap();
        let m = maps(me).unwrap();
        assert!(s.iter().any(|v| v.kind == VmaKind::Stack));
        assert!(s.iter().any(|v| v.kind == VmaKind::Vdso));
        assert!(s.iter().all(|v| !v.vm_flags.is_empty()));
        // The mappings of a multithreaded test process may change between
        // the two reads (thread stacks); the executable's own mappings do not.
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let exe = exe.to_str().unwrap();
        let pick = |v: &[model::Vma]| -> Vec<(u64, u64, u32)> {
            v.iter()
                .filter(|v| v.path.as_deref() == Some(exe))
                .map(|v| (v.start, v.end, v.prot))
                .collect()
        };
        assert!(!pick(&s).is_empty());
        assert_eq!(pick(&s), pick(&m));
    }
}
