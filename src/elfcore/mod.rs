//! ELF core files of a [`Snapshot`], for gdb, lldb and any tool that reads
//! kernel or `gcore` cores.
//!
//! The file is laid out as the kernel lays out its cores: the ELF header,
//! one `PT_NOTE` then one `PT_LOAD` per mapping (in address order), the
//! notes (see [`notes`]), then each segment's data at a page-aligned offset.
//! The ELF header and program headers are written with the `object` crate's
//! ELF writer; segment data is copied from the page image or the mapped file
//! with `copy_file_range`, and pages with no data stay holes (a sparse file).
//!
//! Which mappings have their contents in the file follows
//! `/proc/PID/coredump_filter` as recorded at dump time (or
//! [`CoreOptions::filter`]), with the kernel's rules (`vma_dump_size` in
//! `fs/coredump.c`):
//!
//! | mapping | included when |
//! |---|---|
//! | vDSO | always |
//! | `VM_DONTDUMP`, `VM_IO`, vvar, vsyscall | never |
//! | hugetlb | bit 5 (private) / bit 6 (shared) |
//! | shared, file deleted or shared memory | bit 1 (anonymous shared) |
//! | shared file | bit 3 (file-backed shared) |
//! | private with written pages, anonymous with pages | bit 0 (anonymous private): the whole mapping |
//! | private file | bit 2 (file-backed private); else with bit 4 the first page if it is an ELF header |
//!
//! Every mapping gets a `PT_LOAD` header; one that is not included has
//! `p_filesz == 0`.

pub mod notes;
pub mod xsave;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use object::elf;
use object::write::elf::{FileHeader, ProgramHeader, Writer};
use object::write::WritableBuffer;
use object::Endianness;

use crate::image::model::{VmFlag, Vma, VmaKind};
use crate::image::PAGE_SIZE;
use crate::snapshot::{open_mapped, read_full_at, Snapshot, Source};

/// Errors of snapshots and core files. Each names the pid, path or address
/// and the failing operation.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// Dumping the live process failed (it was left running untouched).
    #[error("capturing pid {pid}")]
    Capture {
        /// The process.
        pid: i32,
        /// Cause.
        #[source]
        source: Box<crate::dump::DumpError>,
    },
    /// Creating the temporary image directory failed.
    #[error("creating the temporary image directory {path}")]
    TempDir {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading the checkpoint failed.
    #[error("reading the checkpoint in {path}")]
    Image {
        /// The checkpoint directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: crate::image::ImageError,
    },
    /// The checkpoint has no such process.
    #[error("the checkpoint in {dir} holds no process {pid}")]
    NoProcess {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The pid asked for.
        pid: i32,
    },
    /// An address no mapping covers.
    #[error("pid {pid}: no mapping at {addr:#x} ({len} bytes asked)")]
    Unmapped {
        /// The process.
        pid: i32,
        /// First unmapped address.
        addr: u64,
        /// Bytes left to read there.
        len: u64,
    },
    /// Reading page data from the page image failed.
    #[error("reading the pages of {addr:#x} from {path}")]
    ReadPages {
        /// The page file.
        path: PathBuf,
        /// Address of the data.
        addr: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading a mapped file failed.
    #[error("reading the pages of {addr:#x} from the mapped file {path}")]
    ReadMapped {
        /// The mapped file.
        path: PathBuf,
        /// Address of the data.
        addr: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Core files are written for x86_64 only.
    #[error("cannot write a core for arch {arch} (only x86_64)")]
    UnsupportedArch {
        /// The checkpoint's arch.
        arch: String,
    },
    /// Creating the core file failed.
    #[error("creating the core file {path}")]
    Create {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing the core file failed.
    #[error("writing {path} at offset {offset}")]
    Write {
        /// The file.
        path: PathBuf,
        /// File offset.
        offset: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The ELF writer refused the layout.
    #[error("laying out the ELF file {path}: {what}")]
    Elf {
        /// The file.
        path: PathBuf,
        /// The writer's message.
        what: String,
    },
}

type Result<T> = std::result::Result<T, CoreError>;

/// How to write a core.
#[derive(Clone, Copy, Debug, Default)]
pub struct CoreOptions {
    /// A `coredump_filter` value to use instead of the process's own.
    pub filter: Option<u32>,
}

/// What a core holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CoreSummary {
    /// Threads (one `NT_PRSTATUS` each).
    pub threads: usize,
    /// `PT_LOAD` segments (one per mapping).
    pub segments: usize,
    /// Segments with contents.
    pub segments_with_data: usize,
    /// Bytes of segment contents (holes included).
    pub data_bytes: u64,
    /// The coredump filter applied.
    pub filter: u32,
}

/// `coredump_filter` bits.
mod filter {
    pub const ANON_PRIVATE: u32 = 1 << 0;
    pub const ANON_SHARED: u32 = 1 << 1;
    pub const MAPPED_PRIVATE: u32 = 1 << 2;
    pub const MAPPED_SHARED: u32 = 1 << 3;
    pub const ELF_HEADERS: u32 = 1 << 4;
    pub const HUGETLB_PRIVATE: u32 = 1 << 5;
    pub const HUGETLB_SHARED: u32 = 1 << 6;
}

fn has_flag(v: &Vma, f: VmFlag) -> bool {
    v.vm_flags.contains(f)
}

/// How many bytes of mapping `v` (from its start) the core holds.
pub fn dump_size(snap: &Snapshot, v: &Vma, filter: u32) -> u64 {
    use filter::*;
    let whole = v.end - v.start;
    let on = |bit: u32| filter & bit != 0;
    match v.kind {
        VmaKind::Vdso => return whole,
        VmaKind::Vvar | VmaKind::VvarVclock | VmaKind::Vsyscall => return 0,
        _ => {}
    }
    if has_flag(v, VmFlag::DontDump) {
        return 0;
    }
    if has_flag(v, VmFlag::HugeTlb) {
        let bit = if v.shared {
            HUGETLB_SHARED
        } else {
            HUGETLB_PRIVATE
        };
        return if on(bit) { whole } else { 0 };
    }
    if has_flag(v, VmFlag::Io) || has_flag(v, VmFlag::PfnMap) {
        return 0;
    }
    let file = notes::has_file(v);
    if v.shared {
        let deleted = v.kind == VmaKind::Shmem
            || !file
            || v.path.as_deref().is_some_and(|p| p.ends_with(" (deleted)"));
        let bit = if deleted { ANON_SHARED } else { MAPPED_SHARED };
        return if on(bit) { whole } else { 0 };
    }
    // Private: pages written since mapping (the kernel's anon_vma) make it
    // "anonymous" memory; the dump holds exactly those pages.
    if !v.pages.is_empty() && on(ANON_PRIVATE) {
        return whole;
    }
    if !file {
        return 0;
    }
    if on(MAPPED_PRIVATE) {
        return whole;
    }
    if on(ELF_HEADERS) && v.offset == 0 && v.prot & 1 != 0 {
        let mut magic = [0u8; 4];
        if snap.read_memory(v.start, &mut magic).is_ok() && magic == *b"\x7fELF" {
            return PAGE_SIZE.min(whole);
        }
    }
    0
}

/// The headers and notes, built by the ELF writer in memory. The writer
/// announces the whole file size up front; segment data never goes through
/// this buffer, so that hint is not followed.
#[derive(Default)]
struct HeaderBuf(Vec<u8>);

impl WritableBuffer for HeaderBuf {
    fn reserve(&mut self, _size: u64) -> std::result::Result<(), ()> {
        Ok(())
    }

    fn write_bytes(&mut self, val: &[u8]) {
        self.0.extend_from_slice(val);
    }
}

/// ELF `p_flags` of a mapping.
fn p_flags(prot: u32) -> elf::ProgramFlags {
    let mut f = 0;
    for (bit, flag) in [(1, elf::PF_R), (2, elf::PF_W), (4, elf::PF_X)] {
        if prot & bit != 0 {
            f |= flag.0;
        }
    }
    elf::ProgramFlags(f)
}

/// Bytes before the first segment: the ELF header, the program headers
/// (one `PT_NOTE`, one `PT_LOAD` per mapping), the notes and, past 65534
/// segments, section header 0. Known before any page is read: a live core
/// streams pages into their places behind it ([`Snapshot::write_live_core`]).
pub(crate) fn header_len(p: &crate::image::model::ProcessImage) -> u64 {
    let note_len = notes::encode(&notes::all(p, PAGE_SIZE)).len() as u64;
    let mut hb = HeaderBuf::default();
    let mut w = Writer::new(Endianness::Little, true, &mut hb);
    reserve_headers(&mut w, p.vmas.len(), note_len);
    w.reserved_len()
}

/// Reserve the header part in `w`; returns the notes' offset and whether
/// the segment count needs section header 0 (`PN_XNUM`).
fn reserve_headers(w: &mut Writer<'_>, nvmas: usize, note_len: u64) -> (u64, bool) {
    w.reserve_file_header();
    let nphdr = 1 + nvmas as u32;
    w.reserve_program_headers(nphdr);
    let notes_off = w.reserve(note_len, 4);
    // More than 65534 segments: e_phnum is PN_XNUM and the real count is in
    // section header 0.
    let xnum = nphdr >= u32::from(elf::PN_XNUM);
    if xnum {
        w.reserve_null_section_index();
        w.reserve_section_headers();
    }
    (notes_off, xnum)
}

fn align_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

/// The temporary file a core is written to, next to `path`.
pub(crate) fn temp_path(path: &Path) -> PathBuf {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    dir.unwrap_or(Path::new(".")).join(format!(
        ".{}.tmp.{}",
        name.unwrap_or_else(|| "core".into()),
        std::process::id()
    ))
}

/// Create (truncate) the temporary core file `tmp`.
pub(crate) fn create_temp(tmp: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .map_err(|source| CoreError::Create {
            path: tmp.to_path_buf(),
            source,
        })
}

/// Write the core of `snap` to `path` (through a temporary file in the same
/// directory, renamed into place when complete).
pub fn write_core(snap: &Snapshot, path: &Path, opts: &CoreOptions) -> Result<CoreSummary> {
    let tmp = temp_path(path);
    let out = create_temp(&tmp)?;
    finish_core(snap, &out, &tmp, path, opts)
}

/// Write everything of `snap`'s core into `out` (the temporary file `tmp`)
/// but the pages already there (a live core's), then rename it to `path`.
/// On error `tmp` is removed.
pub(crate) fn finish_core(
    snap: &Snapshot,
    out: &File,
    tmp: &Path,
    path: &Path,
    opts: &CoreOptions,
) -> Result<CoreSummary> {
    let result = write_into(snap, out, tmp, opts).and_then(|summary| {
        std::fs::rename(tmp, path).map_err(|source| CoreError::Create {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(summary)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

fn write_into(snap: &Snapshot, out: &File, tmp: &Path, opts: &CoreOptions) -> Result<CoreSummary> {
    let arch = &snap.inventory().arch;
    if arch != "x86_64" {
        return Err(CoreError::UnsupportedArch { arch: arch.clone() });
    }
    let p = snap.process();
    let filter = opts.filter.unwrap_or(p.coredump_filter);
    let sizes: Vec<u64> = p.vmas.iter().map(|v| dump_size(snap, v, filter)).collect();
    let note_bytes = notes::encode(&notes::all(p, PAGE_SIZE));

    // Phase 1: the layout. Segments of a live core whose pages were
    // streamed in already have their place; the others follow.
    let mut hb = HeaderBuf::default();
    let mut w = Writer::new(Endianness::Little, true, &mut hb);
    let (notes_off, xnum) = reserve_headers(&mut w, p.vmas.len(), note_bytes.len() as u64);
    let regions = snap.in_core().map(|c| c.regions.as_slice());
    let region = |i: usize| regions.and_then(|r| r.get(i).copied().flatten());
    let mut next = (0..p.vmas.len())
        .filter_map(|i| region(i).map(|r| r + (p.vmas[i].end - p.vmas[i].start)))
        .max()
        .unwrap_or(0)
        .max(w.reserved_len());
    let mut data_offs = Vec::with_capacity(sizes.len());
    for (i, &size) in sizes.iter().enumerate() {
        match region(i) {
            Some(r) => data_offs.push(r),
            None => {
                next = align_up(next, PAGE_SIZE);
                data_offs.push(next);
                next += size;
            }
        }
    }
    let file_len = sizes
        .iter()
        .zip(&data_offs)
        .filter(|(&s, _)| s > 0)
        .map(|(&s, &o)| o + s)
        .max()
        .unwrap_or(0)
        .max(w.reserved_len());

    // Phase 2: headers and notes.
    let elf_err = |e: object::write::Error| CoreError::Elf {
        path: tmp.to_path_buf(),
        what: e.to_string(),
    };
    w.write_file_header(&FileHeader {
        os_abi: elf::ELFOSABI_NONE,
        abi_version: 0,
        e_type: elf::ET_CORE,
        e_machine: elf::EM_X86_64,
        e_entry: 0,
        e_flags: elf::FileFlags(0),
    })
    .map_err(elf_err)?;
    w.write_align_program_headers();
    w.write_program_header(&ProgramHeader {
        p_type: elf::PT_NOTE,
        p_flags: elf::ProgramFlags(0),
        p_offset: notes_off,
        p_vaddr: 0,
        p_paddr: 0,
        p_filesz: note_bytes.len() as u64,
        p_memsz: 0,
        p_align: 4,
    });
    for ((v, &size), &off) in p.vmas.iter().zip(&sizes).zip(&data_offs) {
        w.write_program_header(&ProgramHeader {
            p_type: elf::PT_LOAD,
            p_flags: p_flags(v.prot),
            p_offset: if size > 0 { off } else { 0 },
            p_vaddr: v.start,
            p_paddr: 0,
            p_filesz: size,
            p_memsz: v.end - v.start,
            p_align: PAGE_SIZE,
        });
    }
    w.write_align(4);
    w.write(&note_bytes);
    if xnum {
        w.write_null_section_header();
    }
    drop(w);

    // Phase 3: the file.
    let werr = |offset| {
        let tmp = tmp.to_path_buf();
        move |source| CoreError::Write {
            path: tmp,
            offset,
            source,
        }
    };
    out.write_all_at(&hb.0, 0).map_err(werr(0))?;
    let mut summary = CoreSummary {
        threads: p.threads.len(),
        segments: p.vmas.len(),
        filter,
        ..Default::default()
    };
    for (i, ((v, &size), &off)) in p.vmas.iter().zip(&sizes).zip(&data_offs).enumerate() {
        // Streamed pages past what the core holds of a mapping (the filter
        // left it out, or holds only its ELF header): give the space back.
        if let Some(r) = region(i) {
            let whole = v.end - v.start;
            if size < whole {
                punch_hole(out, r + size, whole - size);
            }
        }
        if size == 0 {
            continue;
        }
        summary.segments_with_data += 1;
        summary.data_bytes += size;
        write_segment(snap, v, size, out, off, tmp)?;
    }
    out.set_len(file_len).map_err(werr(file_len))?;
    Ok(summary)
}

/// Free `[off, off + len)` of `f` (a hole reads as zero); best effort.
fn punch_hole(f: &File, off: u64, len: u64) {
    // SAFETY: fallocate on a file we own; no memory is passed.
    unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
}

/// Copy the first `size` bytes of mapping `v` into `out` at `off`.
fn write_segment(
    snap: &Snapshot,
    v: &Vma,
    size: u64,
    out: &File,
    off: u64,
    out_path: &Path,
) -> Result<()> {
    let mut mapped: Option<Option<File>> = None;
    for piece in snap.pieces(v, v.start, v.start + size) {
        let at = off + (piece.addr - v.start);
        let werr = |source| CoreError::Write {
            path: out_path.to_path_buf(),
            offset: at,
            source,
        };
        match piece.src {
            Source::Zero => {} // a hole
            Source::Captured(i, o) => {
                out.write_all_at(snap.captured(i, o, piece.len as usize), at)
                    .map_err(werr)?;
            }
            // A live core's pages are already in place.
            Source::Pages(_) if snap.in_core().is_some() => {}
            Source::Pages(src_off) => {
                let (pages, pages_path) =
                    snap.pages_file().expect("Pages source without a page file");
                copy_range(pages, src_off, out, at, piece.len).map_err(|e| match e {
                    CopyError::Read(source) => CoreError::ReadPages {
                        path: pages_path.to_path_buf(),
                        addr: piece.addr,
                        source,
                    },
                    CopyError::Write(source) => werr(source),
                })?;
            }
            Source::File(src_off) => {
                let path = v.path.clone().unwrap_or_default();
                let f = mapped.get_or_insert_with(|| open_mapped(&path));
                if let Some(f) = f {
                    // Past the end of the file stays a hole (zero).
                    copy_range(f, src_off, out, at, piece.len).map_err(|e| match e {
                        CopyError::Read(source) => CoreError::ReadMapped {
                            path: PathBuf::from(&path),
                            addr: piece.addr,
                            source,
                        },
                        CopyError::Write(source) => werr(source),
                    })?;
                }
            }
        }
    }
    Ok(())
}

enum CopyError {
    Read(std::io::Error),
    Write(std::io::Error),
}

/// Copy up to `len` bytes from `src` at `src_off` to `dst` at `dst_off`,
/// in the kernel (`copy_file_range`) where it can, else through a buffer.
/// Stops early at the end of `src`; returns the bytes copied.
fn copy_range(
    src: &File,
    mut src_off: u64,
    dst: &File,
    mut dst_off: u64,
    len: u64,
) -> std::result::Result<u64, CopyError> {
    let mut left = len;
    while left > 0 {
        let mut so = src_off as libc::loff_t;
        let mut d_o = dst_off as libc::loff_t;
        let chunk = left.min(1 << 30) as usize;
        // SAFETY: two open fds and two valid loff_t pointers.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut so,
                dst.as_raw_fd(),
                &mut d_o,
                chunk,
                0,
            )
        };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            // Not supported between these files (EXDEV, EINVAL, ...) or a
            // real I/O error: the buffered copy says which side failed.
            return copy_buffered(src, src_off, dst, dst_off, left).map(|k| len - left + k);
        }
        if n == 0 {
            break; // end of the source file
        }
        left -= n as u64;
        src_off += n as u64;
        dst_off += n as u64;
    }
    Ok(len - left)
}

fn copy_buffered(
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    len: u64,
) -> std::result::Result<u64, CopyError> {
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0u64;
    while done < len {
        let want = (len - done).min(buf.len() as u64) as usize;
        let n = read_full_at(src, &mut buf[..want], src_off + done).map_err(CopyError::Read)?;
        if n == 0 {
            break;
        }
        dst.write_all_at(&buf[..n], dst_off + done)
            .map_err(CopyError::Write)?;
        done += n as u64;
        if n < want {
            break;
        }
    }
    Ok(done)
}
