//! A process frozen in time, for debuggers: threads and registers, mappings,
//! memory, and an ELF core file.
//!
//! A [`Snapshot`] comes from a live process ([`Snapshot::take`]: the normal
//! dump path into a private temporary directory, the process left running)
//! or from a checkpoint directory ([`Snapshot::open`]). Its memory is what
//! the process would read at each address:
//!
//! * pages in the dump's page image (anonymous memory, written copies of
//!   private file pages, shared memory);
//! * pages of file mappings that are not in the image (never written, or a
//!   shared file mapping): the mapped file itself, at the mapping's offset;
//! * the vDSO, captured next to the dump (it is never in the page image);
//! * anything else (anonymous memory never touched, a deleted file): zero.
//!
//! [`Snapshot::pieces`] is the one place that decides where the bytes of an
//! address range come from; everything else (reading memory, writing a
//! core) goes through it.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use pdump_arch::{Arch, Native};

use crate::dump::{dump_process, DumpOptions};
use crate::elfcore::{CoreError, CoreOptions, CoreSummary};
use crate::image::format::PAGES_DATA_OFFSET;
use crate::image::model::{Inventory, PageRun, ProcessImage, ThreadState, Vma, VmaKind};
use crate::image::{Checkpoint, PagesReader};

type Result<T> = std::result::Result<T, CoreError>;

/// How to capture a live process.
#[derive(Clone, Debug, Default)]
pub struct SnapshotOptions {
    /// Directory for the temporary images (default: the system temp dir).
    /// They are deleted as soon as they are open, but they need the space
    /// of the process's memory while the dump runs: pick the file system the
    /// core goes to rather than a tmpfs.
    pub work_dir: Option<PathBuf>,
}

/// Where the bytes of one stretch of a mapping come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The page image, at this byte offset of the page file.
    Pages(u64),
    /// The mapped file, at this byte offset.
    File(u64),
    /// Bytes captured next to the dump (the vDSO): capture index, offset.
    Captured(usize, usize),
    /// Zero bytes.
    Zero,
}

/// A stretch `[addr, addr + len)` of one mapping and where its bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// First address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Where the bytes are.
    pub src: Source,
}

/// One thread of a snapshot.
#[derive(Clone, Copy, Debug)]
pub struct Thread<'a> {
    state: &'a ThreadState,
}

impl<'a> Thread<'a> {
    /// Thread id.
    pub fn tid(&self) -> i32 {
        self.state.tid
    }

    /// `comm` of the thread.
    pub fn comm(&self) -> &'a str {
        &self.state.comm
    }

    /// General-purpose registers, named as the arch names them (x86_64:
    /// `user_regs_struct` order, `rip`, `rsp`, `fs_base`, ...).
    pub fn registers(&self) -> impl Iterator<Item = (&'static str, u64)> + 'a {
        Native::GPR_NAMES
            .iter()
            .copied()
            .zip(self.state.gpr.iter().copied())
    }

    /// One register by name.
    pub fn register(&self, name: &str) -> Option<u64> {
        self.registers().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// The raw extended state (x86_64: the `NT_X86_XSTATE` XSAVE area).
    pub fn xstate(&self) -> &'a [u8] {
        &self.state.fpregs
    }

    /// The full recorded state.
    pub fn state(&self) -> &'a ThreadState {
        self.state
    }
}

/// Bytes of a mapping captured outside the page image.
#[derive(Clone, Debug)]
struct Captured {
    start: u64,
    bytes: Vec<u8>,
}

/// A process's threads, registers and memory at one moment.
#[derive(Debug)]
pub struct Snapshot {
    inventory: Inventory,
    process: ProcessImage,
    pages: Option<PagesReader>,
    /// A live core in the making: the dumped pages are already in the core
    /// file (see [`Snapshot::write_live_core`]), not in a page image.
    in_core: Option<InCore>,
    captured: Vec<Captured>,
}

/// Pages streamed straight into a core file: those of mapping `i` start at
/// `regions[i]` (the mapping's start address there).
#[derive(Debug)]
pub(crate) struct InCore {
    pub(crate) file: File,
    pub(crate) path: PathBuf,
    pub(crate) regions: Vec<Option<u64>>,
}

/// A temporary image directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    /// A new directory in `opts.work_dir` (default: the temp dir).
    fn new(pid: i32, opts: &SnapshotOptions) -> Result<TempDir> {
        static N: AtomicU32 = AtomicU32::new(0);
        let base = opts.work_dir.clone().unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!(
            ".pdump-snapshot-{pid}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).map_err(|source| CoreError::TempDir {
            path: dir.clone(),
            source,
        })?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Snapshot {
    /// Capture the live process `pid` (every thread) through the dump path,
    /// leaving it running. The temporary images are deleted before this
    /// returns (the snapshot keeps its page file open).
    ///
    /// ```no_run
    /// use pdump::{CoreOptions, Snapshot, SnapshotOptions};
    ///
    /// # fn main() -> Result<(), pdump::Error> {
    /// let snap = Snapshot::take(1234, &SnapshotOptions::default())?;
    /// for t in snap.threads() {
    ///     println!("{} rip={:#x}", t.tid(), t.register("rip").unwrap_or(0));
    /// }
    /// snap.write_core("core.1234".as_ref(), &CoreOptions::default())?;
    /// # Ok(()) }
    /// ```
    pub fn take(pid: i32, opts: &SnapshotOptions) -> Result<Snapshot> {
        let tmp = TempDir::new(pid, opts)?;
        let dopts = DumpOptions {
            dir: tmp.0.clone(),
            leave_running: true,
            ..DumpOptions::default()
        };
        dump_process(pid, &dopts).map_err(|source| CoreError::Capture {
            pid,
            source: Box::new(source),
        })?;
        let mut snap = Self::open_impl(&tmp.0, Some(pid), false)?;
        drop(tmp); // the page file stays readable through the open reader
        snap.capture_vdso_of(pid);
        Ok(snap)
    }

    /// Open the root process of the checkpoint in `dir` (page data checked
    /// against its checksums).
    pub fn open(dir: &Path) -> Result<Snapshot> {
        Self::open_impl(dir, None, true)
    }

    /// Open process `pid` of the checkpoint in `dir`.
    pub fn open_pid(dir: &Path, pid: i32) -> Result<Snapshot> {
        Self::open_impl(dir, Some(pid), true)
    }

    fn open_impl(dir: &Path, pid: Option<i32>, verify: bool) -> Result<Snapshot> {
        let image = |source| CoreError::Image {
            path: dir.to_path_buf(),
            source,
        };
        let cp = Checkpoint::open(dir).map_err(image)?;
        let pid = pid.unwrap_or(cp.inventory.root_pid);
        let process = cp
            .process(pid)
            .cloned()
            .ok_or_else(|| CoreError::NoProcess {
                dir: dir.to_path_buf(),
                pid,
            })?;
        let pages = cp.pages(&process).map_err(image)?;
        if verify {
            if let Some(pages) = &pages {
                for r in process.vmas.iter().flat_map(|v| &v.pages) {
                    pages.verify_run(r).map_err(image)?;
                }
            }
        }
        let mut snap = Snapshot {
            inventory: cp.inventory,
            process,
            pages,
            in_core: None,
            captured: Vec::new(),
        };
        if verify {
            snap.capture_own_vdso();
        }
        Ok(snap)
    }

    /// Read the vDSO of the live process (it is never in the page image).
    fn capture_vdso_of(&mut self, pid: i32) {
        let Ok(mem) = File::open(format!("/proc/{pid}/mem")) else {
            return;
        };
        self.capture_vdso(&mem);
    }

    /// For a checkpoint taken on this very kernel, the vDSO is the one this
    /// process has: same kernel release, same size.
    fn capture_own_vdso(&mut self) {
        let same_kernel = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy() == self.inventory.kernel)
            .unwrap_or(false);
        if !same_kernel {
            return;
        }
        let Ok(maps) = crate::procfs::maps(std::process::id() as i32) else {
            return;
        };
        let Some(own) = maps.iter().find(|v| v.kind == VmaKind::Vdso) else {
            return;
        };
        let own_len = own.end - own.start;
        let Ok(mem) = File::open("/proc/self/mem") else {
            return;
        };
        let mut bytes = vec![0u8; own_len as usize];
        if mem.read_exact_at(&mut bytes, own.start).is_err() {
            return;
        }
        if let Some(v) = self
            .process
            .vmas
            .iter()
            .find(|v| v.kind == VmaKind::Vdso && v.end - v.start == own_len)
        {
            self.captured.push(Captured {
                start: v.start,
                bytes,
            });
        }
    }

    fn capture_vdso(&mut self, mem: &File) {
        for v in self.process.vmas.iter().filter(|v| v.kind == VmaKind::Vdso) {
            let mut bytes = vec![0u8; (v.end - v.start) as usize];
            if mem.read_exact_at(&mut bytes, v.start).is_ok() {
                self.captured.push(Captured {
                    start: v.start,
                    bytes,
                });
            }
        }
    }

    /// Thread-group id.
    pub fn pid(&self) -> i32 {
        self.process.pid
    }

    /// The whole process image (ids, creds, auxv, fds, signal state, ...).
    pub fn process(&self) -> &ProcessImage {
        &self.process
    }

    /// The checkpoint's inventory (arch, kernel, tree).
    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    /// Every thread, the thread-group leader first.
    pub fn threads(&self) -> impl Iterator<Item = Thread<'_>> {
        self.process.threads.iter().map(|state| Thread { state })
    }

    /// Every mapping, in address order.
    pub fn mappings(&self) -> &[Vma] {
        &self.process.vmas
    }

    /// The mapping holding `addr`.
    pub fn mapping_at(&self, addr: u64) -> Option<&Vma> {
        let vmas = &self.process.vmas;
        let i = vmas.partition_point(|v| v.end <= addr);
        vmas.get(i).filter(|v| v.start <= addr)
    }

    /// Where the data of a dumped page run is: the offset of its bytes in
    /// the page file. This is the only function that interprets a
    /// [`PageRun`]; `None` means "no bytes stored, the pages are zero".
    fn run_data(&self, v: &Vma, run: &PageRun) -> Option<u64> {
        if let Some(c) = &self.in_core {
            let i = self.process.vmas.partition_point(|x| x.start < v.start);
            return c
                .regions
                .get(i)
                .copied()
                .flatten()
                .map(|r| r + (run.addr - v.start));
        }
        self.pages.as_ref()?;
        Some(PAGES_DATA_OFFSET + run.offset)
    }

    /// Where memory the page image does not hold comes from.
    fn unstored(&self, v: &Vma, addr: u64) -> Source {
        if let Some((i, c)) = self
            .captured
            .iter()
            .enumerate()
            .find(|(_, c)| c.start <= addr && addr < c.start + c.bytes.len() as u64)
        {
            return Source::Captured(i, (addr - c.start) as usize);
        }
        match (&v.kind, v.path.as_deref()) {
            (VmaKind::File, Some(p)) if !p.ends_with(" (deleted)") => {
                Source::File(v.offset + (addr - v.start))
            }
            _ => Source::Zero,
        }
    }

    /// Split `[start, end)` of mapping `v` into pieces with one source each:
    /// the one place that decides where memory comes from.
    pub fn pieces(&self, v: &Vma, start: u64, end: u64) -> Vec<Piece> {
        let (start, end) = (start.max(v.start), end.min(v.end));
        let mut out: Vec<Piece> = Vec::new();
        let mut push = |addr: u64, len: u64, src: Source| {
            if len > 0 {
                out.push(Piece { addr, len, src });
            }
        };
        // Gaps between runs take their bytes from `unstored`, which is
        // uniform per source except for captured ranges (handled by
        // splitting at their bounds).
        let gap = |from: u64, to: u64, push: &mut dyn FnMut(u64, u64, Source)| {
            let mut a = from;
            while a < to {
                let src = self.unstored(v, a);
                let next = match src {
                    Source::Captured(i, off) => {
                        (a + (self.captured[i].bytes.len() - off) as u64).min(to)
                    }
                    _ => self
                        .captured
                        .iter()
                        .map(|c| c.start)
                        .filter(|&s| s > a && s < to)
                        .min()
                        .unwrap_or(to),
                };
                push(a, next - a, src);
                a = next;
            }
        };
        let page = crate::image::PAGE_SIZE;
        let mut at = start;
        for r in &v.pages {
            let (rs, re) = (r.addr, r.addr + r.npages * page);
            if re <= at || rs >= end {
                continue;
            }
            gap(at, rs.max(at), &mut push);
            let s = rs.max(at);
            let e = re.min(end);
            let src = match self.run_data(v, r) {
                Some(off) => Source::Pages(off + (s - rs)),
                None => Source::Zero,
            };
            push(s, e - s, src);
            at = e;
        }
        gap(at, end, &mut push);
        out
    }

    /// The page file (if the process has page data).
    pub(crate) fn pages_file(&self) -> Option<(&File, &Path)> {
        if let Some(c) = &self.in_core {
            return Some((&c.file, &c.path));
        }
        self.pages.as_ref().map(|p| (p.file(), p.path()))
    }

    /// The core file the pages were streamed into, if this is a live core
    /// in the making.
    pub(crate) fn in_core(&self) -> Option<&InCore> {
        self.in_core.as_ref()
    }

    /// Bytes captured outside the page image.
    pub(crate) fn captured(&self, index: usize, offset: usize, len: usize) -> &[u8] {
        &self.captured[index].bytes[offset..offset + len]
    }

    /// Read `buf.len()` bytes of memory at `addr`, as the process would see
    /// them. Fails on an address no mapping covers.
    pub fn read_memory(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        let mut files: HashMap<String, Option<File>> = HashMap::new();
        let mut done = 0usize;
        while done < buf.len() {
            let a = addr + done as u64;
            let v = self.mapping_at(a).ok_or(CoreError::Unmapped {
                pid: self.process.pid,
                addr: a,
                len: (buf.len() - done) as u64,
            })?;
            let end = v.end.min(addr + buf.len() as u64);
            for p in self.pieces(v, a, end) {
                let off = (p.addr - addr) as usize;
                let dst = &mut buf[off..off + p.len as usize];
                self.read_piece(v, &p, dst, &mut files)?;
            }
            done = (end - addr) as usize;
        }
        Ok(())
    }

    fn read_piece(
        &self,
        v: &Vma,
        p: &Piece,
        dst: &mut [u8],
        files: &mut HashMap<String, Option<File>>,
    ) -> Result<()> {
        match p.src {
            Source::Zero => dst.fill(0),
            Source::Captured(i, off) => dst.copy_from_slice(self.captured(i, off, dst.len())),
            Source::Pages(off) => {
                let (file, path) = self.pages_file().expect("Pages source without a page file");
                file.read_exact_at(dst, off)
                    .map_err(|source| CoreError::ReadPages {
                        path: path.to_path_buf(),
                        addr: p.addr,
                        source,
                    })?;
            }
            Source::File(off) => {
                let path = v.path.clone().unwrap_or_default();
                let f = files
                    .entry(path.clone())
                    .or_insert_with(|| open_mapped(&path));
                let n = match f {
                    Some(f) => {
                        read_full_at(f, dst, off).map_err(|source| CoreError::ReadMapped {
                            path: PathBuf::from(&path),
                            addr: p.addr,
                            source,
                        })?
                    }
                    None => 0,
                };
                dst[n..].fill(0); // past the end of the file (or no file)
            }
        }
        Ok(())
    }

    /// Write an ELF core file of this snapshot to `path`.
    pub fn write_core(&self, path: &Path, opts: &CoreOptions) -> Result<CoreSummary> {
        crate::elfcore::write_core(self, path, opts)
    }

    /// Write an ELF core of the live process `pid` to `path`, leaving it
    /// running: [`Snapshot::take`] then [`Snapshot::write_core`], but the
    /// pages go once, from the copy-on-write snapshot straight to their
    /// place in the core (no page image in between). The process is stopped
    /// only while its state is captured and the snapshot forked.
    /// `work.work_dir` holds the few other temporary files (fd contents).
    ///
    /// ```no_run
    /// use pdump::{CoreOptions, Snapshot, SnapshotOptions};
    ///
    /// # fn main() -> Result<(), pdump::Error> {
    /// let s = Snapshot::write_live_core(
    ///     1234,
    ///     "core.1234".as_ref(),
    ///     &CoreOptions::default(),
    ///     &SnapshotOptions::default(),
    /// )?;
    /// println!("{} threads, {} bytes of memory", s.threads, s.data_bytes);
    /// # Ok(()) }
    /// ```
    pub fn write_live_core(
        pid: i32,
        path: &Path,
        opts: &CoreOptions,
        work: &SnapshotOptions,
    ) -> Result<CoreSummary> {
        match Self::live_core(pid, path, opts, work, true) {
            Err(CoreError::Capture { source, .. })
                if matches!(*source, crate::dump::DumpError::FlagsChanged { .. }) =>
            {
                log::warn!("{source}: capturing again, reading smaps while frozen");
                Self::live_core(pid, path, opts, work, false)
            }
            r => r,
        }
    }

    fn live_core(
        pid: i32,
        path: &Path,
        opts: &CoreOptions,
        work: &SnapshotOptions,
        pre_read: bool,
    ) -> Result<CoreSummary> {
        let tmp_dir = TempDir::new(pid, work)?;
        let dopts = DumpOptions {
            dir: tmp_dir.0.clone(),
            leave_running: true,
            cow: true,
            // The pages go from the snapshot into the core: every process
            // needs one.
            cow_min_bytes: 0,
            ..DumpOptions::default()
        };
        let capture = |source| CoreError::Capture {
            pid,
            source: Box::new(source),
        };
        let mut c = crate::dump::capture(pid, &dopts, true, pre_read).map_err(capture)?;
        let mut process = c.images.pop().ok_or(CoreError::NoProcess {
            dir: tmp_dir.0.clone(),
            pid,
        })?;
        let pending = c.pending.take(pid);
        drop(c);

        // Every mapping whose pages may be streamed gets its whole size,
        // in address order, behind the headers; the filter decides later
        // what the core keeps (the rest is punched out again).
        let mut at = crate::elfcore::header_len(&process);
        let regions: Vec<Option<u64>> = process
            .vmas
            .iter()
            .map(|v| {
                (crate::dump::policy(v) != crate::dump::PagePolicy::None).then(|| {
                    at = at.div_ceil(crate::image::PAGE_SIZE) * crate::image::PAGE_SIZE;
                    let r = at;
                    at += v.end - v.start;
                    r
                })
            })
            .collect();
        let tmp = crate::elfcore::temp_path(path);
        let out = crate::elfcore::create_temp(&tmp)?;
        if let Some(p) = pending {
            let starts: Vec<u64> = process.vmas.iter().map(|v| v.start).collect();
            let place = |i: usize, addr: u64| {
                regions[i].expect("a page of a mapping that streams none") + (addr - starts[i])
            };
            let target = crate::cow::Target {
                file: &out,
                path: &tmp,
                place: &place,
            };
            if let Err(e) =
                crate::cow::drain_into(p, &mut process, &tmp_dir.0, &dopts, Some(target))
            {
                let _ = std::fs::remove_file(&tmp);
                return Err(capture(e));
            }
        }
        let mut snap = Snapshot {
            inventory: Inventory {
                pdump_version: env!("CARGO_PKG_VERSION").to_string(),
                arch: Native::NAME.to_string(),
                kernel: nix::sys::utsname::uname()
                    .map(|u| u.release().to_string_lossy().into_owned())
                    .unwrap_or_default(),
                root_pid: pid,
                processes: vec![pid],
                leave_running: true,
                page_size: crate::image::PAGE_SIZE as u32,
                ..Inventory::default()
            },
            process,
            pages: None,
            in_core: Some(InCore {
                file: out.try_clone().map_err(|source| CoreError::Create {
                    path: tmp.clone(),
                    source,
                })?,
                path: tmp.clone(),
                regions,
            }),
            captured: Vec::new(),
        };
        snap.capture_vdso_of(pid);
        crate::elfcore::finish_core(&snap, &out, &tmp, path, opts)
    }
}

/// Open a mapped file for reading; `None` (logged) if it is gone, so its
/// pages read as zero.
pub(crate) fn open_mapped(path: &str) -> Option<File> {
    match File::open(path) {
        Ok(f) => Some(f),
        Err(e) => {
            log::warn!("{path}: {e}: its unsaved pages read as zero");
            None
        }
    }
}

/// `pread` until `buf` is full or the file ends; the bytes read.
pub(crate) fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
