//! Streaming a process's pages into its page file.
//!
//! ```text
//!  plan: present runs of every dumped VMA (PAGEMAP_SCAN), cut into chunks
//!        of one pipe's capacity, numbered 0, 1, 2, ...
//!  coordinator (the process's tracer thread, or the snapshot's drain
//!        worker):
//!        chunk j -> VMSPLICE command into page pipe j % P, wait for it,
//!        hand chunk j to drainer j % D
//!  drainers (D threads, or the coordinator itself for small processes):
//!        read chunk j from its pipe (pages of PROT_NONE mappings from
//!        /proc/PID/mem, spilled pages from the side file), find the zero
//!        pages, CRC32C the others, take the ticket of chunk j (in order:
//!        file offsets follow addresses), pwritev the non-zero pages at
//!        their offsets
//! ```
//!
//! The pages come from a [`PageSource`]: the parasite in a frozen task, or
//! the copy-on-write snapshot of a task that runs again (`crate::cow`),
//! which serves the same commands on its own control block. A plan may
//! also hold pages the snapshot does not have as the task had them (shared,
//! MADV_DONTFORK, MADV_WIPEONFORK mappings): those were streamed from the
//! frozen task into a side file (the spill) and come back from it
//! ([`Src::File`], [`Src::Zero`], see [`plan_from_runs`]).
//!
//! Chunks never exceed a pipe's capacity, so a VMSPLICE command into an
//! emptied pipe never blocks, and the coordinator can post the next chunk
//! while drainers are busy with earlier ones. Memory held: one chunk buffer
//! per drainer and the list of page runs, whatever the size of the target.
//!
//! Zero pages are detected in the data and become zero runs
//! ([`PageRun::zero`]), which have no bytes in the page file. The
//! CRC32C of each data run is computed from the bytes as they pass (no second
//! pass over the file). Zero runs continue across chunks; data runs end at
//! chunk boundaries (at most 1 MiB each).
//!
//! Failure never hangs: a drainer waiting for data stops when the chunk's
//! command has finished and its pipe is empty (a short vmsplice), and after
//! any error the drainers keep emptying their pipes (discarding) until the
//! commands already posted are done, while the coordinator posts no more.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crossbeam::channel::{bounded, Receiver};

use crate::dump::DumpError;
use crate::image::model::PageRun;
use crate::infect::InfectError;
use pdump_parasite::ScanRun;

const PAGE: u64 = pdump_arch::PAGE_SIZE as u64;

/// Processes with fewer bytes to dump than this are streamed by their
/// tracer thread alone (no drainer threads).
pub const THREADED_MIN_BYTES: u64 = 16 << 20;

/// Processes being dumped right now (for the number of drainer threads a
/// big process may take).
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// Counts a process as being dumped while it lives.
pub struct ActiveGuard(());

impl ActiveGuard {
    /// Count one more process being dumped.
    pub fn new() -> ActiveGuard {
        ACTIVE.fetch_add(1, Ordering::SeqCst);
        ActiveGuard(())
    }
}

impl Default for ActiveGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Something that moves a process's pages into page pipes on command: the
/// parasite in a frozen task ([`crate::infect::Parasite`]) or a task's
/// copy-on-write snapshot ([`crate::cow::Snapshot`]). Both run the same blob
/// and speak the same protocol (`pdump_parasite::cmd`).
pub trait PageSource {
    /// The process whose memory the plan's addresses name (its
    /// `/proc/PID/mem` is read for [`Src::Mem`] runs).
    fn mem_pid(&self) -> i32;
    /// Create `n` page pipes of `size` bytes in the source and take their
    /// read ends (replacing any earlier ones).
    fn page_pipes(&mut self, n: usize, size: usize) -> Result<Vec<File>, InfectError>;
    /// Start a VMSPLICE (or, with `scan`, a VMSPLICE_SCAN) of `iovs` into
    /// page pipe `pipe`; the command's sequence number.
    fn post_vmsplice(
        &mut self,
        pipe: usize,
        iovs: &[(u64, u64)],
        scan: bool,
    ) -> Result<u32, InfectError>;
    /// Wait for command `seq` (`command`, for the error); its raw result.
    fn wait_done(&self, seq: u32, command: u32) -> Result<i64, InfectError>;
    /// The runs a finished VMSPLICE_SCAN of `niov` iovecs found.
    fn scan_runs(&mut self, niov: usize) -> Vec<ScanRun>;
}

/// Where the bytes of a [`PlanRun`] come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Src {
    /// vmspliced by the [`PageSource`] into a page pipe.
    Pipe,
    /// Read through the source's /proc/PID/mem (the mapping is not
    /// readable, so vmsplice cannot take its pages; or, in scan mode, its
    /// pages may change under the parasite: see [`guard_plan`]).
    Mem,
    /// Read from the side file at this byte offset.
    File(u64),
    /// All zero, known without reading (a zero run of the side file).
    Zero,
}

impl Src {
    /// The same source `by` bytes further on.
    fn advanced(self, by: u64) -> Src {
        match self {
            Src::File(off) => Src::File(off + by),
            s => s,
        }
    }

    /// Whether the drainer reads these bytes into its buffer itself (with
    /// `scan`, the parasite has already looked at what is in the pipe).
    fn buffered(self, scan: bool) -> bool {
        match self {
            Src::Pipe => !scan,
            Src::Mem | Src::File(_) => true,
            Src::Zero => false,
        }
    }
}

/// Pages of one VMA, contiguous in memory, to be dumped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanRun {
    /// Index of the VMA.
    pub vma: usize,
    /// First byte.
    pub addr: u64,
    /// Bytes (a multiple of the page size).
    pub len: u64,
    /// Where the bytes come from.
    pub src: Src,
}

/// One chunk: at most a pipe's capacity of bytes.
#[derive(Debug, Default)]
struct Chunk {
    idx: u64,
    pipe: usize,
    segs: Vec<PlanRun>,
    bytes: u64,
    /// Parasite scan mode: the runs the parasite found in the pipe segments
    /// (only the non-zero ones are in the pipe), once its command is done.
    scan: Option<Vec<ScanRun>>,
}

impl Chunk {
    fn iovs(&self) -> Vec<(u64, u64)> {
        self.segs
            .iter()
            .filter(|s| s.src == Src::Pipe)
            .map(|s| (s.addr, s.len))
            .collect()
    }

    fn pipe_bytes(&self) -> u64 {
        self.segs
            .iter()
            .filter(|s| s.src == Src::Pipe)
            .map(|s| s.len)
            .sum()
    }
}

/// Cuts the plan into chunks of at most `cap` bytes (and `max_iovs` pipe
/// segments).
struct Chunker<'a> {
    runs: &'a [PlanRun],
    pos: usize,
    done_in_run: u64,
    cap: u64,
    max_iovs: usize,
    next: u64,
    npipes: usize,
}

impl Iterator for Chunker<'_> {
    type Item = Chunk;

    fn next(&mut self) -> Option<Chunk> {
        let mut c = Chunk {
            idx: self.next,
            pipe: (self.next % self.npipes as u64) as usize,
            scan: None,
            ..Chunk::default()
        };
        let mut iovs = 0;
        while self.pos < self.runs.len() && c.bytes < self.cap && iovs < self.max_iovs {
            let r = self.runs[self.pos];
            let take = (r.len - self.done_in_run).min(self.cap - c.bytes);
            c.segs.push(PlanRun {
                addr: r.addr + self.done_in_run,
                len: take,
                src: r.src.advanced(self.done_in_run),
                ..r
            });
            if r.src == Src::Pipe {
                iovs += 1;
            }
            c.bytes += take;
            self.done_in_run += take;
            if self.done_in_run == r.len {
                self.pos += 1;
                self.done_in_run = 0;
            }
        }
        if c.segs.is_empty() {
            return None;
        }
        self.next += 1;
        Some(c)
    }
}

/// Where a page goes in a file laid out by address (an ELF core): the file
/// offset of the page at address `addr` of VMA `vma` (index in the plan).
pub type Place<'a> = &'a (dyn Fn(usize, u64) -> u64 + Sync);

/// State shared by the coordinator and the drainers of one process.
struct Shared<'a> {
    pid: i32,
    path: &'a Path,
    file: &'a File,
    mem: Option<File>,
    /// The side file of [`Src::File`] runs.
    side: Option<&'a File>,
    /// Where data goes: back to back from `PAGES_DATA_OFFSET` (a page
    /// file), or at the offset this gives a page (a core file).
    place: Option<Place<'a>>,
    /// Set on the first error: stop writing, keep emptying pipes.
    abort: AtomicBool,
    /// Commands finished (chunk index + 1 of the last one finished), or
    /// `u64::MAX` when the coordinator stopped waiting for any.
    completed: AtomicU64,
    order: Mutex<Order>,
    turn: Condvar,
    error: Mutex<Option<DumpError>>,
}

/// The in-order part: file offsets and the run list.
#[derive(Default)]
struct Order {
    /// The chunk whose turn it is.
    next: u64,
    /// Data bytes assigned so far.
    offset: u64,
    /// (VMA index, run), in address order.
    runs: Vec<(usize, PageRun)>,
}

impl Shared<'_> {
    fn fail(&self, e: DumpError) {
        self.abort.store(true, Ordering::SeqCst);
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(e);
        drop(slot);
        self.turn.notify_all();
    }

    fn aborted(&self) -> bool {
        self.abort.load(Ordering::SeqCst)
    }

    fn io_err(&self, start: u64, end: u64, source: std::io::Error) -> DumpError {
        DumpError::Pages {
            pid: self.pid,
            start,
            end,
            path: self.path.to_path_buf(),
            source,
        }
    }
}

/// A part of a chunk with one zero-ness, inside one segment.
#[derive(Clone, Copy, Debug)]
struct Sub {
    vma: usize,
    addr: u64,
    npages: u64,
    zero: bool,
    /// The bytes are in the pipe (else at `at` in the chunk buffer).
    from_pipe: bool,
    /// Offset in the chunk buffer.
    at: usize,
    crc: u32,
}

/// Whether a page is all zero (stops at the first non-zero 64 bytes).
pub fn is_zero_page(page: &[u8]) -> bool {
    page.chunks(64).all(|block| {
        block.chunks(8).fold(0u64, |acc, w| {
            let mut b = [0u8; 8];
            b[..w.len()].copy_from_slice(w);
            acc | u64::from_ne_bytes(b)
        }) == 0
    })
}

/// A drainer's working memory.
struct Drainer {
    /// Grown on demand up to `cap` (a chunk): a small process whose pages
    /// all come through a pipe in scan mode never touches it, and a 1 MiB
    /// zeroed allocation per process (its page faults, its unmapping) was
    /// a good part of dumping a small process.
    buf: Vec<u8>,
    cap: usize,
    subs: Vec<Sub>,
}

impl Drainer {
    fn new(cap: usize) -> Drainer {
        Drainer {
            buf: Vec::new(),
            cap,
            subs: Vec::new(),
        }
    }

    /// The buffer, at least `n` bytes long.
    fn buf_at_least(&mut self, n: usize) -> &mut Vec<u8> {
        if self.buf.len() < n {
            self.buf.resize(n, 0);
        }
        &mut self.buf
    }

    /// Move chunk `c` from its pipe (of `pipes`: none when the plan has no
    /// [`Src::Pipe`] run) into the file. Errors go to `sh.fail`; after
    /// one, only empties the pipe.
    fn chunk(&mut self, sh: &Shared<'_>, pipes: &[File], c: &Chunk) {
        if let Err(e) = self.chunk_inner(sh, pipes.get(c.pipe), c) {
            sh.fail(e);
        }
    }

    fn chunk_inner(
        &mut self,
        sh: &Shared<'_>,
        pipe: Option<&File>,
        c: &Chunk,
    ) -> Result<(), DumpError> {
        if sh.aborted() {
            return self.discard(sh, pipe, c);
        }
        let first = c.segs.first().map_or(0, |s| s.addr);
        let no_pipe = || {
            sh.io_err(
                first,
                first,
                std::io::Error::other("a chunk reads a page pipe the stream did not make"),
            )
        };
        // 1. The bytes the dumper looks at, in segment order: pages of
        // unreadable mappings, spilled pages, and in copy mode everything.
        let scan = c.scan.is_some();
        let need: u64 = c
            .segs
            .iter()
            .filter(|s| s.src.buffered(scan))
            .map(|s| s.len)
            .sum();
        self.buf_at_least(need as usize);
        let mut at = 0usize;
        for s in c.segs.iter().filter(|s| s.src.buffered(scan)) {
            let dst = &mut self.buf[at..at + s.len as usize];
            match s.src {
                Src::Mem => {
                    let mem = sh.mem.as_ref().expect("opened when the plan reads memory");
                    mem.read_exact_at(dst, s.addr)
                        .map_err(|e| sh.io_err(s.addr, s.addr + s.len, e))?;
                }
                Src::File(off) => {
                    let side = sh.side.ok_or_else(|| {
                        sh.io_err(
                            s.addr,
                            s.addr + s.len,
                            std::io::Error::other("the plan reads a side file it was not given"),
                        )
                    })?;
                    side.read_exact_at(dst, off)
                        .map_err(|e| sh.io_err(s.addr, s.addr + s.len, e))?;
                }
                _ => read_chunk_part(sh, pipe.ok_or_else(no_pipe)?, dst, c.idx, s)?,
            }
            at += s.len as usize;
        }

        // 2. Zero and data parts with the CRC32C of each data part: from
        // the parasite's runs, or found here.
        self.subs.clear();
        let mut at = 0usize;
        let mut iov = 0u32;
        for s in &c.segs {
            if s.src == Src::Zero {
                self.subs.push(Sub {
                    vma: s.vma,
                    addr: s.addr,
                    npages: s.len / PAGE,
                    zero: true,
                    from_pipe: false,
                    at: 0,
                    crc: 0,
                });
                continue;
            }
            if let (Some(runs), Src::Pipe) = (&c.scan, s.src) {
                let mut next = s.addr;
                for r in runs.iter().filter(|r| r.iov == iov) {
                    if r.addr != next || r.npages == 0 {
                        return Err(sh.io_err(
                            s.addr,
                            s.addr + s.len,
                            std::io::Error::other("the parasite's page runs do not tile the range"),
                        ));
                    }
                    next = r.addr + r.npages as u64 * PAGE;
                    self.subs.push(Sub {
                        vma: s.vma,
                        addr: r.addr,
                        npages: r.npages as u64,
                        zero: r.zero != 0,
                        from_pipe: true,
                        at: 0,
                        crc: r.crc,
                    });
                }
                if next != s.addr + s.len {
                    return Err(sh.io_err(
                        s.addr,
                        s.addr + s.len,
                        std::io::Error::other("the parasite's page runs do not tile the range"),
                    ));
                }
                iov += 1;
                continue;
            }
            if s.src == Src::Pipe {
                iov += 1;
            }
            let first = self.subs.len();
            for k in 0..(s.len / PAGE) as usize {
                let p = at + k * PAGE as usize;
                let zero = is_zero_page(&self.buf[p..p + PAGE as usize]);
                let same_seg = self.subs.len() > first;
                match self.subs.last_mut() {
                    Some(l) if same_seg && l.zero == zero => l.npages += 1,
                    _ => self.subs.push(Sub {
                        vma: s.vma,
                        addr: s.addr + k as u64 * PAGE,
                        npages: 1,
                        zero,
                        from_pipe: false,
                        at: p,
                        crc: 0,
                    }),
                }
            }
            at += s.len as usize;
        }
        for s in self.subs.iter_mut().filter(|s| !s.zero && !s.from_pipe) {
            s.crc = crc32c::crc32c(&self.buf[s.at..s.at + (s.npages * PAGE) as usize]);
        }

        // 3. Our turn: file offsets in address order, runs merged.
        let base = {
            let mut o = sh.order.lock().unwrap_or_else(|p| p.into_inner());
            while o.next != c.idx {
                if sh.aborted() {
                    drop(o);
                    return match c.scan {
                        Some(_) => self.discard(sh, pipe, c),
                        None => Ok(()),
                    };
                }
                o = sh
                    .turn
                    .wait_timeout(o, Duration::from_millis(50))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            let base = o.offset;
            for s in &self.subs {
                let len = s.npages * PAGE;
                let offset = o.offset;
                if !s.zero {
                    o.offset += len;
                }
                // Zero runs continue across chunks; data runs do not (their
                // CRCs would have to be combined under this lock, which costs
                // tens of microseconds per chunk): a data run spans at most
                // one chunk, 1 MiB.
                match o.runs.last_mut() {
                    Some((vma, r))
                        if *vma == s.vma
                            && r.zero
                            && s.zero
                            && r.addr + r.len() == s.addr
                            && r.offset == offset =>
                    {
                        r.npages += s.npages;
                    }
                    _ => o.runs.push((
                        s.vma,
                        PageRun {
                            addr: s.addr,
                            npages: s.npages,
                            offset,
                            crc32c: s.crc,
                            zero: s.zero,
                        },
                    )),
                }
            }
            o.next += 1;
            base
        };
        sh.turn.notify_all();

        // 4. The data parts, back to back from `base` (or each where `place`
        // puts it): runs of parts from the buffer in one pwritev, runs of
        // parts in the pipe (scan mode) in one splice.
        let first = c.segs[0].addr;
        let last = c.segs.last().map_or(first, |s| s.addr + s.len);
        let mut off = crate::image::format::PAGES_DATA_OFFSET + base;
        let data: Vec<Sub> = self.subs.iter().filter(|s| !s.zero).copied().collect();
        let placed = |s: &Sub| sh.place.map(|p| p(s.vma, s.addr));
        let follows = |a: &Sub, b: &Sub| match sh.place {
            Some(p) => p(b.vma, b.addr) == p(a.vma, a.addr) + a.npages * PAGE,
            None => true,
        };
        for group in data.chunk_by(|a, b| a.from_pipe == b.from_pipe && follows(a, b)) {
            if let Some(at) = placed(&group[0]) {
                off = at;
            }
            let len: u64 = group.iter().map(|s| s.npages * PAGE).sum();
            if group[0].from_pipe {
                splice_all(pipe.ok_or_else(no_pipe)?, sh.file, off, len)
                    .map_err(|e| sh.io_err(first, last, e))?;
            } else {
                let parts: Vec<&[u8]> = group
                    .iter()
                    .map(|s| &self.buf[s.at..s.at + (s.npages * PAGE) as usize])
                    .collect();
                pwritev_all(sh.file, &parts, off).map_err(|e| sh.io_err(first, last, e))?;
            }
            off += len;
        }
        Ok(())
    }

    /// After an error: empty the pipe of what the parasite put there for
    /// chunk `c`, so that it never waits for room.
    fn discard(
        &mut self,
        sh: &Shared<'_>,
        pipe: Option<&File>,
        c: &Chunk,
    ) -> Result<(), DumpError> {
        let Some(pipe) = pipe else {
            return Ok(()); // nothing was put in a pipe
        };
        let moved = match &c.scan {
            Some(runs) => runs
                .iter()
                .filter(|r| r.zero == 0)
                .map(|r| r.npages as u64 * PAGE)
                .sum(),
            None => c.pipe_bytes(),
        };
        let mut left = moved as usize;
        let cap = self.cap;
        self.buf_at_least(cap.min(left));
        while left > 0 {
            let n = left.min(self.buf.len());
            let seg = c.segs[0];
            match read_chunk_part(sh, pipe, &mut self.buf[..n], c.idx, &seg) {
                Ok(()) => left -= n,
                Err(_) => break, // short or closed: nothing more will come
            }
        }
        Ok(())
    }
}

/// Move exactly `len` bytes from `pipe` (already holding them) into `file`
/// at `off`.
fn splice_all(pipe: &File, file: &File, mut off: u64, len: u64) -> std::io::Result<()> {
    let mut left = len;
    while left > 0 {
        let mut o = off as libc::loff_t;
        // SAFETY: splice between two fds we own; `o` is a valid loff_t.
        let n = unsafe {
            libc::splice(
                pipe.as_raw_fd(),
                std::ptr::null_mut(),
                file.as_raw_fd(),
                &mut o,
                left as usize,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "page pipe closed",
            ));
        }
        left -= n as u64;
        off += n as u64;
        crate::fault::point(); // mid-chunk
    }
    Ok(())
}

/// Read `dst.len()` bytes of chunk `idx` from `pipe`. Waits in 50 ms polls;
/// gives up (short read) when the chunk's command has finished and the pipe
/// is empty.
fn read_chunk_part(
    sh: &Shared<'_>,
    pipe: &File,
    dst: &mut [u8],
    idx: u64,
    seg: &PlanRun,
) -> Result<(), DumpError> {
    let fd = pipe.as_raw_fd();
    let mut got = 0usize;
    while got < dst.len() {
        let finished = sh.completed.load(Ordering::SeqCst) > idx;
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own.
        let r = unsafe { libc::poll(&mut pfd, 1, if finished { 0 } else { 50 }) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(sh.io_err(seg.addr, seg.addr + seg.len, e));
        }
        if r == 0 {
            if finished {
                return Err(DumpError::ShortSplice {
                    pid: sh.pid,
                    got: got as i64,
                    want: dst.len() as u64,
                });
            }
            continue;
        }
        let want = dst.len() - got;
        // SAFETY: reading into the unfilled tail of `dst`, which we own.
        let n = unsafe { libc::read(fd, dst[got..].as_mut_ptr().cast(), want) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
                _ => return Err(sh.io_err(seg.addr, seg.addr + seg.len, e)),
            }
        }
        if n == 0 {
            return Err(sh.io_err(
                seg.addr,
                seg.addr + seg.len,
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "page pipe closed"),
            ));
        }
        got += n as usize;
        crate::fault::point(); // mid-chunk: the parasite may be inside vmsplice
    }
    Ok(())
}

/// Write all of `parts`, back to back, at `off`.
fn pwritev_all(file: &File, parts: &[&[u8]], mut off: u64) -> std::io::Result<()> {
    let mut iov: Vec<libc::iovec> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect();
    let mut first = 0usize;
    while first < iov.len() {
        let cnt = (iov.len() - first).min(1024);
        // SAFETY: the iovecs point into `parts`, alive and unchanged for the
        // call; the kernel only reads them.
        let n = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                iov[first..].as_ptr(),
                cnt as libc::c_int,
                off as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        off += n as u64;
        let mut left = n as usize;
        while left > 0 {
            let v = &mut iov[first];
            if left >= v.iov_len {
                left -= v.iov_len;
                first += 1;
            } else {
                // SAFETY: advancing inside the same slice by `left < iov_len` bytes.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(left) }.cast();
                v.iov_len -= left;
                left = 0;
            }
        }
    }
    Ok(())
}

/// How to stream.
#[derive(Clone, Copy, Debug)]
pub struct StreamOptions {
    /// Page pipe size asked for (bytes).
    pub pipe_size: usize,
    /// Drainer threads (0: automatic).
    pub threads: usize,
    /// Find zero pages and CRCs in the dumper, reading every page through
    /// it (copy mode), even where the parasite could (scan mode).
    pub dumper_scan: bool,
}

/// Whether the parasite can find zero pages and CRCs itself (scan mode):
/// it needs the CRC32 instruction (x86_64 with SSE4.2).
pub fn parasite_can_scan() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("sse4.2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// What was streamed.
#[derive(Debug, Default)]
pub struct Streamed {
    /// (VMA index, run) in address order.
    pub runs: Vec<(usize, PageRun)>,
    /// Bytes of page data written.
    pub data_len: u64,
    /// Drainer threads used (0: the tracer thread alone).
    pub threads: usize,
    /// Page pipes used.
    pub pipes: usize,
    /// The parasite found zero pages and CRCs (else the dumper did).
    pub parasite_scan: bool,
}

fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// Whether `stream` will let the parasite find zero pages and CRCs (scan
/// mode) with these options.
pub fn scan_mode(opts: &StreamOptions) -> bool {
    !opts.dumper_scan && parasite_can_scan()
}

/// Prepare a plan for scan mode, where the parasite computes a page's CRC
/// before the page is copied into the file: a page that changes in between
/// would not match its CRC. In a frozen task that can happen to
///
/// * shared mappings (another process may write them), and
/// * each thread's rseq area (`volatile`: address and length), which the
///   kernel rewrites (cpu id, mm_cid) whenever the thread the parasite runs
///   on is scheduled;
///
/// so those pages are read by the dumper (through /proc/PID/mem), which
/// computes the CRC of exactly what it writes. A copy-on-write snapshot (a
/// fork of the task) inherits the rseq registration of the thread that
/// forked it, so the kernel rewrites that area in the snapshot too; its
/// shared mappings are not in its plan (they come from the spill).
///
/// Only [`Src::Pipe`] runs are changed.
pub fn guard_plan(
    plan: Vec<PlanRun>,
    shared: impl Fn(usize) -> bool,
    volatile: &[(u64, u64)],
) -> Vec<PlanRun> {
    let mut pages: Vec<(u64, u64)> = volatile
        .iter()
        .filter(|(_, len)| *len > 0)
        .map(|&(a, len)| (a & !(PAGE - 1), (a + len + PAGE - 1) & !(PAGE - 1)))
        .collect();
    pages.sort_unstable();
    let mut out = Vec::with_capacity(plan.len());
    for r in plan {
        if r.src != Src::Pipe {
            out.push(r);
            continue;
        }
        if shared(r.vma) {
            out.push(PlanRun { src: Src::Mem, ..r });
            continue;
        }
        let mut at = r.addr;
        let end = r.addr + r.len;
        for &(s, e) in &pages {
            let (s, e) = (s.max(at), e.min(end));
            if s >= e {
                continue;
            }
            if s > at {
                out.push(PlanRun {
                    addr: at,
                    len: s - at,
                    ..r
                });
            }
            out.push(PlanRun {
                addr: s,
                len: e - s,
                src: Src::Mem,
                ..r
            });
            at = e;
        }
        if at < end {
            out.push(PlanRun {
                addr: at,
                len: end - at,
                ..r
            });
        }
    }
    out
}

/// The plan that writes `runs` (the output of a [`stream`] into a side
/// file, in address order) again: data runs read from the side file
/// ([`Src::File`] at their offsets there), zero runs as [`Src::Zero`].
/// Contiguous runs of one kind are joined (the stream ended its data runs
/// at its chunk boundaries), so the new stream cuts them where a stream of
/// the whole process would.
pub fn plan_from_runs(runs: &[(usize, PageRun)]) -> Vec<PlanRun> {
    let mut out: Vec<PlanRun> = Vec::with_capacity(runs.len());
    for &(vma, r) in runs {
        let src = if r.zero {
            Src::Zero
        } else {
            Src::File(crate::image::format::PAGES_DATA_OFFSET + r.offset)
        };
        if let Some(l) = out.last_mut() {
            let joins = match (l.src, src) {
                (Src::Zero, Src::Zero) => true,
                (Src::File(a), Src::File(b)) => a + l.len == b,
                _ => false,
            };
            if joins && l.vma == vma && l.addr + l.len == r.addr {
                l.len += r.len();
                continue;
            }
        }
        out.push(PlanRun {
            vma,
            addr: r.addr,
            len: r.len(),
            src,
        });
    }
    out
}

/// Two plans of disjoint sets of VMAs, each in address order, as one.
pub fn merge_plans(a: Vec<PlanRun>, b: Vec<PlanRun>) -> Vec<PlanRun> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    loop {
        let take_a = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => (x.vma, x.addr) <= (y.vma, y.addr),
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        out.extend(if take_a { a.next() } else { b.next() });
    }
    out
}

/// Plans of at most this many bytes are read by the dumper through
/// /proc/PID/mem ([`small_plan`]).
pub const SMALL_PLAN_BYTES: u64 = 1 << 20;

/// A plan of at most [`SMALL_PLAN_BYTES`] read by the dumper through
/// /proc/PID/mem instead of page pipes: for a small process, making the
/// pipes in the task and taking them over (a parasite command, a pidfd and
/// two pidfd_getfd) and a command per chunk cost more than copying its few
/// pages once more (a tree of 200 processes of ~250 KiB each spent about a
/// third of its page dumping there). Larger plans are returned unchanged.
pub fn small_plan(plan: Vec<PlanRun>) -> Vec<PlanRun> {
    let total: u64 = plan.iter().map(|r| r.len).sum();
    if total > SMALL_PLAN_BYTES {
        return plan;
    }
    plan.into_iter()
        .map(|r| match r.src {
            Src::Pipe => PlanRun { src: Src::Mem, ..r },
            _ => r,
        })
        .collect()
}

/// Drainer threads for `bytes` of pages: none below [`THREADED_MIN_BYTES`],
/// else the CPUs not busy with other processes' dumps (at least one).
fn drainers_for(bytes: u64, asked: usize) -> usize {
    if asked > 0 {
        return asked.min(pdump_parasite::MAX_PIPES);
    }
    if bytes < THREADED_MIN_BYTES {
        return 0;
    }
    let others = ACTIVE.load(Ordering::SeqCst).saturating_sub(1);
    cpus()
        .saturating_sub(others)
        .clamp(1, pdump_parasite::MAX_PIPES)
}

/// Stream the pages of `plan` (address order) of process `pid` into `file`
/// (made by [`crate::image::create_pages_file`], or a side file: data at
/// [`crate::image::format::PAGES_DATA_OFFSET`] on) through `src`'s page
/// pipes; `side` is the file [`Src::File`] runs read.
pub fn stream(
    pid: i32,
    src: &mut dyn PageSource,
    plan: &[PlanRun],
    file: &File,
    path: &Path,
    side: Option<&File>,
    opts: StreamOptions,
) -> Result<Streamed, DumpError> {
    stream_placed(pid, src, plan, file, path, side, None, opts)
}

/// [`stream`], with each data page written where `place` says instead of
/// back to back (the run list's offsets are then the data's order, not its
/// place in `file`).
#[allow(clippy::too_many_arguments)]
pub fn stream_placed(
    pid: i32,
    src: &mut dyn PageSource,
    plan: &[PlanRun],
    file: &File,
    path: &Path,
    side: Option<&File>,
    place: Option<Place<'_>>,
    opts: StreamOptions,
) -> Result<Streamed, DumpError> {
    let total: u64 = plan.iter().map(|r| r.len).sum();
    if total == 0 {
        return Ok(Streamed::default());
    }
    let mem_pid = src.mem_pid();
    let mem = if plan.iter().any(|r| r.src == Src::Mem) {
        Some(
            File::open(format!("/proc/{mem_pid}/mem")).map_err(|source| DumpError::Pages {
                pid,
                start: 0,
                end: 0,
                path: path.to_path_buf(),
                source,
            })?,
        )
    } else {
        None
    };
    let drainers = drainers_for(total, opts.threads);
    // Twice as many pipes as drainers: the parasite fills a pipe whose
    // drainer is not splicing from it at the same time (they would contend
    // for the pipe's lock).
    let npipes = (drainers * 2).clamp(2, pdump_parasite::MAX_PIPES);
    let inf = |step| move |source| DumpError::Infect { pid, step, source };
    // A plan read entirely by the dumper (see `small_plan`) needs no pipe.
    let pipes = if plan.iter().any(|r| r.src == Src::Pipe) {
        src.page_pipes(npipes, opts.pipe_size)
            .map_err(inf("creating page pipes"))?
    } else {
        Vec::new()
    };
    // The capacity the kernel gave (a power of two of pages): chunks fit it.
    let cap = if pipes.is_empty() {
        (opts.pipe_size as u64 / PAGE).max(1) * PAGE
    } else {
        pipes
            .iter()
            .map(|p| {
                // SAFETY: F_GETPIPE_SZ on a pipe fd we own.
                unsafe { libc::fcntl(p.as_raw_fd(), libc::F_GETPIPE_SZ) }
            })
            .min()
            .filter(|&c| c >= PAGE as i32)
            .unwrap_or(PAGE as i32) as u64
    };
    log::trace!("pid {pid}: {npipes} page pipes of {cap} bytes, {total} bytes to stream");
    let sh = Shared {
        pid,
        path,
        file,
        mem,
        side,
        place,
        abort: AtomicBool::new(false),
        completed: AtomicU64::new(0),
        order: Mutex::new(Order::default()),
        turn: Condvar::new(),
        error: Mutex::new(None),
    };
    let chunks = Chunker {
        runs: plan,
        pos: 0,
        done_in_run: 0,
        cap,
        max_iovs: pdump_parasite::MAX_IOVS,
        next: 0,
        npipes,
    };

    let scan = scan_mode(&opts);
    let cmd = if scan {
        pdump_parasite::cmd::VMSPLICE_SCAN
    } else {
        pdump_parasite::cmd::VMSPLICE
    };
    // Post chunk `c`; returns the command's sequence number (None: nothing
    // to vmsplice, or failed: recorded).
    let post = |src: &mut dyn PageSource, c: &Chunk| -> Option<u32> {
        let iovs = c.iovs();
        if iovs.is_empty() {
            return None;
        }
        let r = if scan {
            if iovs.len() > pdump_parasite::max_scan_runs(iovs.len()) / 2 {
                // Never with chunks of a pipe's capacity; keeps the blob's
                // output inside its buffer.
                sh.fail(inf("vmsplice")(crate::infect::InfectError::Command {
                    pid,
                    what: "VMSPLICE_SCAN",
                    source: nix::errno::Errno::E2BIG,
                }));
                return None;
            }
            src.post_vmsplice(c.pipe, &iovs, true)
        } else {
            src.post_vmsplice(c.pipe, &iovs, false)
        };
        match r {
            Ok(seq) => Some(seq),
            Err(e) => {
                sh.fail(inf("vmsplice")(e));
                None
            }
        }
    };
    // Wait for the command of chunk `c`: it must have moved all its pipe
    // bytes (copy mode) or all the non-zero ones it reports (scan mode,
    // whose runs are fetched into `c.scan`).
    let wait = |src: &mut dyn PageSource, c: &mut Chunk, seq: Option<u32>| {
        let want = c.pipe_bytes();
        if let Some(seq) = seq {
            match src.wait_done(seq, cmd) {
                Ok(got) if scan && got >= 0 => {
                    let niov = c.segs.iter().filter(|s| s.src == Src::Pipe).count();
                    let runs = src.scan_runs(niov);
                    let data: u64 = runs
                        .iter()
                        .filter(|r| r.zero == 0)
                        .map(|r| r.npages as u64 * PAGE)
                        .sum();
                    let pages: u64 = runs.iter().map(|r| r.npages as u64 * PAGE).sum();
                    if data != got as u64 || pages != want {
                        sh.fail(DumpError::ShortSplice { pid, got, want });
                    }
                    c.scan = Some(runs);
                }
                Ok(got) if !scan && got == want as i64 => {}
                Ok(got) => {
                    sh.fail(DumpError::ShortSplice { pid, got, want });
                    if scan {
                        c.scan = Some(Vec::new());
                    }
                }
                Err(e) => {
                    sh.fail(inf("vmsplice")(e));
                    sh.completed.store(u64::MAX, Ordering::SeqCst);
                    return;
                }
            }
        } else if scan {
            c.scan = Some(Vec::new());
        }
        sh.completed.fetch_max(c.idx + 1, Ordering::SeqCst);
    };

    if drainers == 0 {
        // The tracer thread alone, two pipes: the parasite fills one while
        // this thread empties the other.
        let mut d = Drainer::new(cap as usize);
        let mut prev: Option<(Chunk, Option<u32>)> = None;
        for c in chunks {
            if sh.aborted() {
                break;
            }
            if let Some((pc, seq)) = &mut prev {
                wait(src, pc, *seq);
            }
            let seq = post(src, &c);
            if let Some((pc, _)) = prev.take() {
                d.chunk(&sh, &pipes, &pc);
            }
            prev = Some((c, seq));
        }
        if let Some((mut pc, seq)) = prev.take() {
            wait(src, &mut pc, seq);
            d.chunk(&sh, &pipes, &pc);
        }
    } else {
        std::thread::scope(|s| {
            let mut txs = Vec::new();
            for i in 0..drainers {
                let (tx, rx) = bounded::<Chunk>(4);
                txs.push(tx);
                let sh = &sh;
                let pipes = &pipes;
                std::thread::Builder::new()
                    .name(format!("pdump-pages-{i}"))
                    .spawn_scoped(s, move || drain_loop(sh, pipes, rx, cap as usize))
                    .expect("spawning a page drainer");
            }
            for mut c in chunks {
                if sh.aborted() {
                    break;
                }
                let seq = post(src, &c);
                let d = c.pipe % drainers;
                if scan {
                    // The runs are known once the command is done; the pipe
                    // has room as the drainers empty earlier chunks.
                    wait(src, &mut c, seq);
                    if txs[d].send(c).is_err() {
                        sh.fail(DumpError::Worker { index: d });
                    }
                } else {
                    // The drainer must have the chunk before its command can
                    // finish (it empties the pipe as the parasite fills it).
                    let (idx, pipe, segs) = (c.idx, c.pipe, c.segs.clone());
                    if txs[d].send(c).is_err() {
                        sh.fail(DumpError::Worker { index: d });
                    }
                    let mut probe = Chunk {
                        idx,
                        pipe,
                        segs,
                        ..Chunk::default()
                    };
                    wait(src, &mut probe, seq);
                }
            }
            drop(txs);
        });
    }
    drop(pipes);
    if let Some(e) = sh.error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let o = sh.order.into_inner().unwrap_or_else(|p| p.into_inner());
    Ok(Streamed {
        runs: o.runs,
        data_len: o.offset,
        threads: drainers,
        pipes: npipes,
        parasite_scan: scan,
    })
}

fn drain_loop(sh: &Shared<'_>, pipes: &[File], rx: Receiver<Chunk>, cap: usize) {
    let mut d = Drainer::new(cap);
    while let Ok(c) = rx.recv() {
        d.chunk(sh, pipes, &c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero_page(&p));
        p[4095] = 1;
        assert!(!is_zero_page(&p));
        p[4095] = 0;
        p[0] = 0x80;
        assert!(!is_zero_page(&p));
    }

    #[test]
    fn guarded_plan_reads_rseq_pages_and_shared_mappings_itself() {
        let run = |vma, addr, pages| PlanRun {
            vma,
            addr,
            len: pages * PAGE,
            src: Src::Pipe,
        };
        let mut plan = vec![run(0, 0x10000, 8), run(1, 0x40000, 2), run(2, 0x50000, 1)];
        // Spilled runs (a snapshot's plan) are left as they are, even over
        // an rseq area.
        plan.push(PlanRun {
            src: Src::File(0x5000),
            ..run(3, 0x60000, 2)
        });
        plan.push(PlanRun {
            src: Src::Zero,
            ..run(3, 0x62000, 1)
        });
        // rseq areas of two threads: one inside page 3 of run 0, one
        // straddling pages 6 and 7 of it; one in the spilled run.
        let vol = [(0x13020, 32), (0x16ff0, 32), (0x61000, 32)];
        let g = guard_plan(plan, |vma| vma == 1 || vma == 3, &vol);
        let got: Vec<(usize, u64, u64, Src)> = g
            .iter()
            .map(|r| (r.vma, r.addr, r.len / PAGE, r.src))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 0x10000, 3, Src::Pipe),
                (0, 0x13000, 1, Src::Mem),
                (0, 0x14000, 2, Src::Pipe),
                (0, 0x16000, 2, Src::Mem),
                (1, 0x40000, 2, Src::Mem),
                (2, 0x50000, 1, Src::Pipe),
                (3, 0x60000, 2, Src::File(0x5000)),
                (3, 0x62000, 1, Src::Zero),
            ]
        );
    }

    #[test]
    fn chunks_tile_the_plan_within_capacity() {
        let run = |vma, addr, pages, src| PlanRun {
            vma,
            addr,
            len: pages * PAGE,
            src,
        };
        let plan = [
            run(0, 0x10000, 3, Src::Pipe),
            run(1, 0x20000, 10, Src::Mem),
            run(2, 0x40000, 1, Src::Pipe),
            run(3, 0x50000, 6, Src::File(0x9000)),
        ];
        let chunks: Vec<Chunk> = Chunker {
            runs: &plan,
            pos: 0,
            done_in_run: 0,
            cap: 4 * PAGE,
            max_iovs: 8,
            next: 0,
            npipes: 3,
        }
        .collect();
        // 20 pages in chunks of at most 4.
        assert_eq!(chunks.len(), 5);
        let mut seen = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            assert_eq!(c.idx, i as u64);
            assert_eq!(c.pipe, i % 3);
            assert!(c.bytes <= 4 * PAGE);
            assert_eq!(c.bytes, c.segs.iter().map(|s| s.len).sum::<u64>());
            for s in &c.segs {
                for k in 0..s.len / PAGE {
                    // A run read from a file is cut with its file offset.
                    let src = match s.src {
                        Src::File(off) => Src::File(off + k * PAGE),
                        other => other,
                    };
                    seen.push((s.vma, s.addr + k * PAGE, src));
                }
            }
        }
        let want: Vec<_> = plan
            .iter()
            .flat_map(|r| {
                (0..r.len / PAGE).map(move |k| {
                    let src = match r.src {
                        Src::File(off) => Src::File(off + k * PAGE),
                        other => other,
                    };
                    (r.vma, r.addr + k * PAGE, src)
                })
            })
            .collect();
        assert_eq!(seen, want);
        assert_eq!(chunks[0].iovs(), vec![(0x10000, 3 * PAGE)]);
        assert_eq!(chunks[0].pipe_bytes(), 3 * PAGE);
    }

    #[test]
    fn spilled_runs_come_back_joined_and_merge_in_address_order() {
        let data_off = crate::image::format::PAGES_DATA_OFFSET;
        let run = |addr, npages, offset, zero| PageRun {
            addr,
            npages,
            offset,
            crc32c: 0,
            zero,
        };
        // What a stream of two shared mappings wrote into a side file: a
        // data run cut at a chunk boundary, zero runs, another mapping.
        let runs = [
            (1, run(0x10000, 2, 0, false)),
            (1, run(0x12000, 3, 2 * PAGE, false)),
            (1, run(0x15000, 1, 5 * PAGE, true)),
            (1, run(0x16000, 1, 5 * PAGE, false)),
            (3, run(0x40000, 2, 6 * PAGE, true)),
            (3, run(0x42000, 1, 6 * PAGE, false)),
        ];
        let p = plan_from_runs(&runs);
        let got: Vec<(usize, u64, u64, Src)> = p
            .iter()
            .map(|r| (r.vma, r.addr, r.len / PAGE, r.src))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, 0x10000, 5, Src::File(data_off)),
                (1, 0x15000, 1, Src::Zero),
                (1, 0x16000, 1, Src::File(data_off + 5 * PAGE)),
                (3, 0x40000, 2, Src::Zero),
                (3, 0x42000, 1, Src::File(data_off + 6 * PAGE)),
            ]
        );
        let own = |vma, addr| PlanRun {
            vma,
            addr,
            len: PAGE,
            src: Src::Pipe,
        };
        let m = merge_plans(vec![own(0, 0x1000), own(2, 0x30000), own(4, 0x50000)], p);
        let order: Vec<(usize, u64)> = m.iter().map(|r| (r.vma, r.addr)).collect();
        assert_eq!(
            order,
            vec![
                (0, 0x1000),
                (1, 0x10000),
                (1, 0x15000),
                (1, 0x16000),
                (2, 0x30000),
                (3, 0x40000),
                (3, 0x42000),
                (4, 0x50000),
            ]
        );
    }
}
