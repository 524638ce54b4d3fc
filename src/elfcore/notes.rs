//! The notes of a Linux x86_64 core file, as the kernel's `fs/binfmt_elf.c`
//! and gdb's `gcore` write them: `NT_PRSTATUS` per thread, `NT_PRPSINFO`,
//! `NT_SIGINFO`, `NT_AUXV`, `NT_FILE`, `NT_FPREGSET`, `NT_X86_XSTATE` and
//! `NT_X86_XSAVE_LAYOUT`. Every descriptor is built from the process image.

use object::elf::NoteHeader64;
use object::write::WritableBuffer;
use object::{Endianness, U32};

use super::xsave;
use crate::image::model::{ProcessImage, ThreadState, Vma, VmaKind};

/// `NT_PRSTATUS`: `struct elf_prstatus`.
pub const NT_PRSTATUS: u32 = 1;
/// `NT_PRFPREG` / `NT_FPREGSET`: the 512-byte FXSAVE area.
pub const NT_FPREGSET: u32 = 2;
/// `NT_PRPSINFO`: `struct elf_prpsinfo`.
pub const NT_PRPSINFO: u32 = 3;
/// `NT_AUXV`: the auxiliary vector.
pub const NT_AUXV: u32 = 6;
/// `NT_SIGINFO`: the `siginfo_t` of the signal that caused the dump.
pub const NT_SIGINFO: u32 = 0x5349_4749;
/// `NT_FILE`: the file-backed mappings.
pub const NT_FILE: u32 = 0x4649_4c45;
/// `NT_X86_XSTATE`: the XSAVE area.
pub const NT_X86_XSTATE: u32 = 0x202;
/// `NT_X86_XSAVE_LAYOUT`: where each XSAVE component is in `NT_X86_XSTATE`.
pub const NT_X86_XSAVE_LAYOUT: u32 = 0x205;

/// Size of `struct elf_prstatus` on x86_64.
pub const PRSTATUS_SIZE: usize = 336;
/// Offset of `pr_reg` (the `user_regs_struct`) in it.
pub const PRSTATUS_REG_OFFSET: usize = 112;
/// Size of `struct elf_prpsinfo` on x86_64.
pub const PRPSINFO_SIZE: usize = 136;
/// Size of a `siginfo_t`.
pub const SIGINFO_SIZE: usize = 128;
/// Words in an x86_64 `elf_gregset_t` (`user_regs_struct`).
pub const GREGS: usize = 27;
/// Size of the FXSAVE legacy area.
pub const FXSAVE_SIZE: usize = 512;

/// One note: owner name, type, descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// Owner: `CORE` or `LINUX`.
    pub name: &'static str,
    /// `n_type`.
    pub n_type: u32,
    /// Descriptor bytes.
    pub desc: Vec<u8>,
}

fn put<const N: usize>(buf: &mut [u8], at: usize, bytes: [u8; N]) {
    buf[at..at + N].copy_from_slice(&bytes);
}

/// Bit mask of the signals in raw 128-byte siginfos.
fn sigmask_of(infos: &[Vec<u8>]) -> u64 {
    infos
        .iter()
        .filter_map(|i| i.get(..4))
        .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")))
        .filter(|s| (1..=64).contains(s))
        .fold(0, |m, s| m | 1u64 << (s - 1))
}

/// `NT_PRSTATUS` of one thread: no current signal, its pending and blocked
/// signals, the process's ids, and its general-purpose registers.
pub fn prstatus(p: &ProcessImage, t: &ThreadState) -> Note {
    let mut d = vec![0u8; PRSTATUS_SIZE];
    // pr_info (si_signo, si_code, si_errno) and pr_cursig stay 0: the
    // process was not killed by a signal, it was captured while running.
    put(&mut d, 16, sigmask_of(&t.pending).to_le_bytes()); // pr_sigpend
    put(&mut d, 24, t.sigmask.to_le_bytes()); // pr_sighold
    put(&mut d, 32, t.tid.to_le_bytes()); // pr_pid
    put(&mut d, 36, p.ppid.to_le_bytes());
    put(&mut d, 40, p.pgid.to_le_bytes());
    put(&mut d, 44, p.sid.to_le_bytes());
    // pr_utime .. pr_cstime (48..112): not recorded in the image.
    for (i, w) in t.gpr.iter().take(GREGS).enumerate() {
        put(&mut d, PRSTATUS_REG_OFFSET + 8 * i, w.to_le_bytes());
    }
    let fpvalid = i32::from(!t.fpregs.is_empty());
    put(
        &mut d,
        PRSTATUS_REG_OFFSET + 8 * GREGS,
        fpvalid.to_le_bytes(),
    );
    Note {
        name: "CORE",
        n_type: NT_PRSTATUS,
        desc: d,
    }
}

/// `NT_PRPSINFO`: state, ids, uid/gid, command name and arguments.
pub fn prpsinfo(p: &ProcessImage) -> Note {
    let mut d = vec![0u8; PRPSINFO_SIZE];
    // pr_state / pr_sname as the kernel computes them ("RSDTZW").
    let stopped = p.threads.first().is_some_and(|t| t.stopped);
    let (state, sname) = if stopped { (3u8, b'T') } else { (1u8, b'S') };
    d[0] = state;
    d[1] = sname;
    put(&mut d, 16, p.creds.uid[0].to_le_bytes());
    put(&mut d, 20, p.creds.gid[0].to_le_bytes());
    put(&mut d, 24, p.pid.to_le_bytes());
    put(&mut d, 28, p.ppid.to_le_bytes());
    put(&mut d, 32, p.pgid.to_le_bytes());
    put(&mut d, 36, p.sid.to_le_bytes());
    let fname = p.comm.as_bytes();
    let n = fname.len().min(15);
    d[40..40 + n].copy_from_slice(&fname[..n]);
    // pr_psargs: the arguments joined by spaces, at most 79 bytes + NUL.
    let args = p.cmdline.join(" ");
    let n = args.len().min(79);
    d[56..56 + n].copy_from_slice(&args.as_bytes()[..n]);
    Note {
        name: "CORE",
        n_type: NT_PRPSINFO,
        desc: d,
    }
}

/// `NT_SIGINFO`: an all-zero siginfo (no signal caused this core).
pub fn siginfo() -> Note {
    Note {
        name: "CORE",
        n_type: NT_SIGINFO,
        desc: vec![0u8; SIGINFO_SIZE],
    }
}

/// `NT_AUXV`: the (type, value) pairs, terminated by `AT_NULL`.
pub fn auxv(p: &ProcessImage) -> Note {
    let mut d = Vec::with_capacity(16 * (p.auxv.len() + 1));
    for &(k, v) in p.auxv.iter().take_while(|(k, _)| *k != 0) {
        d.extend_from_slice(&k.to_le_bytes());
        d.extend_from_slice(&v.to_le_bytes());
    }
    d.extend_from_slice(&[0u8; 16]);
    Note {
        name: "CORE",
        n_type: NT_AUXV,
        desc: d,
    }
}

/// Whether a mapping has a file behind it (`vma->vm_file`): file mappings
/// and shared memory (memfd, SysV, `/dev/zero` shared), not `[heap]` & co.
pub fn has_file(v: &Vma) -> bool {
    match v.kind {
        VmaKind::File => true,
        VmaKind::Shmem => v.path.as_deref().is_some_and(|p| !p.starts_with('[')),
        _ => false,
    }
}

/// `NT_FILE`: count, page size, (start, end, offset in pages) per file
/// mapping, then their NUL-terminated names.
pub fn file(vmas: &[Vma], page_size: u64) -> Note {
    let files: Vec<&Vma> = vmas.iter().filter(|v| has_file(v)).collect();
    let mut d = Vec::new();
    d.extend_from_slice(&(files.len() as u64).to_le_bytes());
    d.extend_from_slice(&page_size.to_le_bytes());
    for v in &files {
        for w in [v.start, v.end, v.offset / page_size] {
            d.extend_from_slice(&w.to_le_bytes());
        }
    }
    for v in &files {
        d.extend_from_slice(v.path.as_deref().unwrap_or("").as_bytes());
        d.push(0);
    }
    Note {
        name: "CORE",
        n_type: NT_FILE,
        desc: d,
    }
}

/// The extended-state notes of one thread: `NT_FPREGSET` (the FXSAVE area),
/// `NT_X86_XSTATE` (rewritten in the layout debuggers read, see
/// [`xsave`]) and the layout it is in, if known.
pub fn fpu(t: &ThreadState) -> (Vec<Note>, Option<xsave::Layout>) {
    if t.fpregs.len() < FXSAVE_SIZE {
        return (Vec::new(), None);
    }
    let mut notes = vec![Note {
        name: "CORE",
        n_type: NT_FPREGSET,
        desc: t.fpregs[..FXSAVE_SIZE].to_vec(),
    }];
    let (xstate, layout) = xsave::for_core(&t.fpregs);
    notes.push(Note {
        name: "LINUX",
        n_type: NT_X86_XSTATE,
        desc: xstate,
    });
    (notes, layout)
}

/// `NT_X86_XSAVE_LAYOUT` for `layout`.
pub fn xsave_layout(layout: &xsave::Layout) -> Note {
    Note {
        name: "LINUX",
        n_type: NT_X86_XSAVE_LAYOUT,
        desc: layout.note_desc(),
    }
}

/// Every note of a process, in the kernel's order: the first thread's
/// PRSTATUS, PRPSINFO, SIGINFO, AUXV, FILE and its register sets; then each
/// other thread's PRSTATUS and register sets; the xsave layout last.
pub fn all(p: &ProcessImage, page_size: u64) -> Vec<Note> {
    let mut out = Vec::new();
    let mut layout = None;
    for (i, t) in p.threads.iter().enumerate() {
        out.push(prstatus(p, t));
        if i == 0 {
            out.push(prpsinfo(p));
            out.push(siginfo());
            out.push(auxv(p));
            out.push(file(&p.vmas, page_size));
        }
        let (fp, l) = fpu(t);
        out.extend(fp);
        layout = layout.or(l);
    }
    if let Some(l) = layout.filter(|l| !l.components.is_empty()) {
        out.push(xsave_layout(&l));
    }
    out
}

/// Encode notes as a PT_NOTE segment: `Elf64_Nhdr`, name and descriptor,
/// each padded to 4 bytes.
pub fn encode(notes: &[Note]) -> Vec<u8> {
    let e = Endianness::Little;
    let mut out: Vec<u8> = Vec::new();
    for n in notes {
        let hdr = NoteHeader64 {
            n_namesz: U32::new(e, n.name.len() as u32 + 1),
            n_descsz: U32::new(e, n.desc.len() as u32),
            n_type: U32::new(e, object::elf::NoteType(n.n_type)),
        };
        out.write_bytes(object::bytes_of(&hdr));
        out.write_bytes(n.name.as_bytes());
        out.push(0);
        out.resize(out.len().next_multiple_of(4), 0);
        out.write_bytes(&n.desc);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::model::*;

    fn image() -> ProcessImage {
        ProcessImage {
            pid: 100,
            ppid: 1,
            pgid: 100,
            sid: 99,
            comm: "a-rather-long-command-name".into(),
            cmdline: vec!["/bin/prog".into(), "arg".into()],
            creds: Creds {
                uid: [1000, 0, 0, 0],
                gid: [1001, 0, 0, 0],
                ..Default::default()
            },
            auxv: vec![(6, 4096), (33, 0x7fff_0000_0000)],
            threads: vec![
                ThreadState {
                    tid: 100,
                    gpr: (0..27).map(|i| 0x1000 + i).collect(),
                    fpregs: {
                        let mut x = vec![0u8; 2432];
                        x[464] = 0xe7; // XCR0: x87, SSE, AVX, AVX-512
                        x
                    },
                    sigmask: 0x4000,
                    pending: vec![{
                        let mut s = vec![0u8; 128];
                        s[0] = 10; // SIGUSR1
                        s
                    }],
                    ..Default::default()
                },
                ThreadState {
                    tid: 101,
                    gpr: vec![7; 27],
                    ..Default::default()
                },
            ],
            vmas: vec![
                Vma {
                    start: 0x1000,
                    end: 0x3000,
                    offset: 0x2000,
                    kind: VmaKind::File,
                    path: Some("/bin/prog".into()),
                    ..Default::default()
                },
                Vma {
                    start: 0x5000,
                    end: 0x6000,
                    kind: VmaKind::Heap,
                    path: Some("[heap]".into()),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    fn word(d: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(d[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn prstatus_fields() {
        let p = image();
        let d = prstatus(&p, &p.threads[0]).desc;
        assert_eq!(d.len(), PRSTATUS_SIZE);
        assert_eq!(word(&d, 16), 1 << 9, "SIGUSR1 pending");
        assert_eq!(word(&d, 24), 0x4000);
        assert_eq!(
            &d[32..48],
            [100, 0, 0, 0, 1, 0, 0, 0, 100, 0, 0, 0, 99, 0, 0, 0]
        );
        assert_eq!(word(&d, PRSTATUS_REG_OFFSET), 0x1000); // r15
        assert_eq!(word(&d, PRSTATUS_REG_OFFSET + 16 * 8), 0x1010); // rip
        assert_eq!(&d[328..332], [1, 0, 0, 0], "pr_fpvalid");
        let d = prstatus(&p, &p.threads[1]).desc;
        assert_eq!(&d[328..332], [0, 0, 0, 0]);
    }

    #[test]
    fn prpsinfo_fields() {
        let d = prpsinfo(&image()).desc;
        assert_eq!(d.len(), PRPSINFO_SIZE);
        assert_eq!(&d[..2], [1, b'S']);
        assert_eq!(&d[16..28], [232, 3, 0, 0, 233, 3, 0, 0, 100, 0, 0, 0]);
        assert_eq!(&d[40..56], b"a-rather-long-c\0");
        assert_eq!(&d[56..70], b"/bin/prog arg\0");
    }

    #[test]
    fn auxv_is_terminated() {
        let d = auxv(&image()).desc;
        assert_eq!(d.len(), 48);
        assert_eq!(word(&d, 16), 33);
        assert_eq!(&d[32..], [0; 16]);
    }

    #[test]
    fn file_note_lists_file_mappings_only() {
        let d = file(&image().vmas, 4096).desc;
        assert_eq!(word(&d, 0), 1);
        assert_eq!(word(&d, 8), 4096);
        assert_eq!(
            [word(&d, 16), word(&d, 24), word(&d, 32)],
            [0x1000, 0x3000, 2]
        );
        assert_eq!(&d[40..], b"/bin/prog\0");
    }

    #[test]
    fn note_order_and_encoding() {
        let notes = all(&image(), 4096);
        let types: Vec<u32> = notes.iter().map(|n| n.n_type).collect();
        assert_eq!(
            types,
            [
                NT_PRSTATUS,
                NT_PRPSINFO,
                NT_SIGINFO,
                NT_AUXV,
                NT_FILE,
                NT_FPREGSET,
                NT_X86_XSTATE,
                NT_PRSTATUS,
                NT_X86_XSAVE_LAYOUT
            ]
        );
        let enc = encode(&notes[..1]);
        assert_eq!(enc.len(), 12 + 8 + PRSTATUS_SIZE);
        assert_eq!(&enc[..12], [5, 0, 0, 0, 80, 1, 0, 0, 1, 0, 0, 0]);
        assert_eq!(&enc[12..20], b"CORE\0\0\0\0");
    }
}
