//! Streaming a process's pages into its page file.
//!
//! ```text
//!  plan: present runs of every dumped VMA (PAGEMAP_SCAN), cut into chunks
//!        of one pipe's capacity, numbered 0, 1, 2, ...
//!  coordinator (the process's tracer thread):
//!        chunk j -> VMSPLICE command into page pipe j % P, wait for it,
//!        hand chunk j to drainer j % D
//!  drainers (D threads, or the coordinator itself for small processes):
//!        read chunk j from its pipe (pages of PROT_NONE mappings from
//!        /proc/PID/mem), find the zero pages, CRC32C the others, take the
//!        ticket of chunk j (in order: file offsets follow addresses),
//!        pwritev the non-zero pages at their offsets
//! ```
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
use crate::infect::Parasite;
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

/// Pages of one VMA, contiguous in memory, to be dumped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanRun {
    /// Index of the VMA.
    pub vma: usize,
    /// First byte.
    pub addr: u64,
    /// Bytes (a multiple of the page size).
    pub len: u64,
    /// Read through /proc/PID/mem (the mapping is not readable, so vmsplice
    /// cannot take its pages).
    pub via_mem: bool,
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
            .filter(|s| !s.via_mem)
            .map(|s| (s.addr, s.len))
            .collect()
    }

    fn pipe_bytes(&self) -> u64 {
        self.segs.iter().filter(|s| !s.via_mem).map(|s| s.len).sum()
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
                ..r
            });
            if !r.via_mem {
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

/// State shared by the coordinator and the drainers of one process.
struct Shared<'a> {
    pid: i32,
    path: &'a Path,
    file: &'a File,
    mem: Option<File>,
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
    buf: Vec<u8>,
    subs: Vec<Sub>,
}

impl Drainer {
    fn new(cap: usize) -> Drainer {
        Drainer {
            buf: vec![0u8; cap],
            subs: Vec::new(),
        }
    }

    /// Move chunk `c` from `pipe` into the file. Errors go to `sh.fail`;
    /// after one, only empties the pipe.
    fn chunk(&mut self, sh: &Shared<'_>, pipe: &File, c: &Chunk) {
        if let Err(e) = self.chunk_inner(sh, pipe, c) {
            sh.fail(e);
        }
    }

    fn chunk_inner(&mut self, sh: &Shared<'_>, pipe: &File, c: &Chunk) -> Result<(), DumpError> {
        if sh.aborted() {
            return self.discard(sh, pipe, c);
        }
        // 1. The bytes the dumper looks at, in segment order: pages of
        // unreadable mappings, and in copy mode everything.
        let mut at = 0usize;
        for s in c.segs.iter().filter(|s| s.via_mem || c.scan.is_none()) {
            let dst = &mut self.buf[at..at + s.len as usize];
            if s.via_mem {
                let mem = sh.mem.as_ref().expect("opened when the plan reads memory");
                mem.read_exact_at(dst, s.addr)
                    .map_err(|e| sh.io_err(s.addr, s.addr + s.len, e))?;
            } else {
                read_chunk_part(sh, pipe, dst, c.idx, s)?;
            }
            at += s.len as usize;
        }

        // 2. Zero and data parts with the CRC32C of each data part: from
        // the parasite's runs, or found here.
        self.subs.clear();
        let mut at = 0usize;
        let mut iov = 0u32;
        for s in &c.segs {
            if let (Some(runs), false) = (&c.scan, s.via_mem) {
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
            if !s.via_mem {
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

        // 4. The data parts, back to back from `base`: runs of parts from
        // the buffer in one pwritev, runs of parts in the pipe (scan mode) in
        // one splice.
        let first = c.segs[0].addr;
        let last = c.segs.last().map_or(first, |s| s.addr + s.len);
        let mut off = crate::image::format::PAGES_DATA_OFFSET + base;
        let data: Vec<Sub> = self.subs.iter().filter(|s| !s.zero).copied().collect();
        for group in data.chunk_by(|a, b| a.from_pipe == b.from_pipe) {
            let len: u64 = group.iter().map(|s| s.npages * PAGE).sum();
            if group[0].from_pipe {
                splice_all(pipe, sh.file, off, len).map_err(|e| sh.io_err(first, last, e))?;
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
    fn discard(&mut self, sh: &Shared<'_>, pipe: &File, c: &Chunk) -> Result<(), DumpError> {
        let moved = match &c.scan {
            Some(runs) => runs
                .iter()
                .filter(|r| r.zero == 0)
                .map(|r| r.npages as u64 * PAGE)
                .sum(),
            None => c.pipe_bytes(),
        };
        let mut left = moved as usize;
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
/// computes the CRC of exactly what it writes.
pub fn guard_plan(
    plan: Vec<PlanRun>,
    shared: impl Fn(usize) -> bool,
    volatile: &[(u64, u64)],
) -> Vec<PlanRun> {
    let guard = PlanGuard::new(volatile);
    let mut out = Vec::with_capacity(plan.len());
    for r in plan {
        guard.push(r, shared(r.vma), &mut out);
    }
    out
}

/// [`guard_plan`] one run at a time, so a plan is built guarded without a
/// second copy of it (a run per mapping with tens of thousands of them).
#[derive(Debug)]
pub struct PlanGuard {
    /// Page-aligned `[start, end)` of the volatile areas, sorted.
    pages: Vec<(u64, u64)>,
}

impl PlanGuard {
    /// The guard for the rseq areas `volatile` (address and length).
    pub fn new(volatile: &[(u64, u64)]) -> PlanGuard {
        let mut pages: Vec<(u64, u64)> = volatile
            .iter()
            .filter(|(_, len)| *len > 0)
            .map(|&(a, len)| (a & !(PAGE - 1), (a + len + PAGE - 1) & !(PAGE - 1)))
            .collect();
        pages.sort_unstable();
        PlanGuard { pages }
    }

    /// Append run `r` (of a shared mapping if `shared`) to `out`, split
    /// where the dumper must read it itself.
    pub fn push(&self, r: PlanRun, shared: bool, out: &mut Vec<PlanRun>) {
        if r.via_mem || shared {
            out.push(PlanRun { via_mem: true, ..r });
            return;
        }
        let mut at = r.addr;
        let end = r.addr + r.len;
        for &(s, e) in &self.pages {
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
                via_mem: true,
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

/// Stream the pages of `plan` (address order) into `file` (made by
/// [`crate::image::create_pages_file`]) through the parasite's page pipes.
pub fn stream(
    pid: i32,
    parasite: &mut Parasite<'_>,
    plan: &[PlanRun],
    file: &File,
    path: &Path,
    opts: StreamOptions,
) -> Result<Streamed, DumpError> {
    let total: u64 = plan.iter().map(|r| r.len).sum();
    if total == 0 {
        return Ok(Streamed::default());
    }
    let mem = if plan.iter().any(|r| r.via_mem) {
        Some(
            File::open(format!("/proc/{pid}/mem")).map_err(|source| DumpError::Pages {
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
    let pipes = parasite
        .page_pipes(npipes, opts.pipe_size)
        .map_err(inf("creating page pipes"))?;
    // The capacity the kernel gave (a power of two of pages): chunks fit it.
    let cap = pipes
        .iter()
        .map(|p| {
            // SAFETY: F_GETPIPE_SZ on a pipe fd we own.
            unsafe { libc::fcntl(p.as_raw_fd(), libc::F_GETPIPE_SZ) }
        })
        .min()
        .filter(|&c| c >= PAGE as i32)
        .unwrap_or(PAGE as i32) as u64;
    let sh = Shared {
        pid,
        path,
        file,
        mem,
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
    let post = |parasite: &mut Parasite<'_>, c: &Chunk| -> Option<u32> {
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
            parasite.post_vmsplice_scan(c.pipe, &iovs)
        } else {
            parasite.post_vmsplice(c.pipe, &iovs)
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
    let wait = |parasite: &mut Parasite<'_>, c: &mut Chunk, seq: Option<u32>| {
        let want = c.pipe_bytes();
        if let Some(seq) = seq {
            match parasite.wait_done(seq, cmd) {
                Ok(got) if scan && got >= 0 => {
                    let niov = c.segs.iter().filter(|s| !s.via_mem).count();
                    let runs = parasite.scan_runs(niov);
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
                wait(parasite, pc, *seq);
            }
            let seq = post(parasite, &c);
            if let Some((pc, _)) = prev.take() {
                d.chunk(&sh, &pipes[pc.pipe], &pc);
            }
            prev = Some((c, seq));
        }
        if let Some((mut pc, seq)) = prev.take() {
            wait(parasite, &mut pc, seq);
            d.chunk(&sh, &pipes[pc.pipe], &pc);
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
                let seq = post(parasite, &c);
                let d = c.pipe % drainers;
                if scan {
                    // The runs are known once the command is done; the pipe
                    // has room as the drainers empty earlier chunks.
                    wait(parasite, &mut c, seq);
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
                    wait(parasite, &mut probe, seq);
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
        d.chunk(sh, &pipes[c.pipe], &c);
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
            via_mem: false,
        };
        let plan = vec![run(0, 0x10000, 8), run(1, 0x40000, 2), run(2, 0x50000, 1)];
        // rseq areas of two threads: one inside page 3 of run 0, one
        // straddling pages 6 and 7 of it.
        let vol = [(0x13020, 32), (0x16ff0, 32)];
        let g = guard_plan(plan, |vma| vma == 1, &vol);
        let got: Vec<(usize, u64, u64, bool)> = g
            .iter()
            .map(|r| (r.vma, r.addr, r.len / PAGE, r.via_mem))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 0x10000, 3, false),
                (0, 0x13000, 1, true),
                (0, 0x14000, 2, false),
                (0, 0x16000, 2, true),
                (1, 0x40000, 2, true),
                (2, 0x50000, 1, false),
            ]
        );
    }

    #[test]
    fn chunks_tile_the_plan_within_capacity() {
        let run = |vma, addr, pages, via_mem| PlanRun {
            vma,
            addr,
            len: pages * PAGE,
            via_mem,
        };
        let plan = [
            run(0, 0x10000, 3, false),
            run(1, 0x20000, 10, true),
            run(2, 0x40000, 1, false),
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
        // 14 pages in chunks of at most 4.
        assert_eq!(chunks.len(), 4);
        let mut seen = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            assert_eq!(c.idx, i as u64);
            assert_eq!(c.pipe, i % 3);
            assert!(c.bytes <= 4 * PAGE);
            assert_eq!(c.bytes, c.segs.iter().map(|s| s.len).sum::<u64>());
            for s in &c.segs {
                for k in 0..s.len / PAGE {
                    seen.push((s.vma, s.addr + k * PAGE, s.via_mem));
                }
            }
        }
        let want: Vec<_> = plan
            .iter()
            .flat_map(|r| (0..r.len / PAGE).map(move |k| (r.vma, r.addr + k * PAGE, r.via_mem)))
            .collect();
        assert_eq!(seen, want);
        assert_eq!(chunks[0].iovs(), vec![(0x10000, 3 * PAGE)]);
        assert_eq!(chunks[0].pipe_bytes(), 3 * PAGE);
    }
}
