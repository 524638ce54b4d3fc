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
//! ([`model::PageRun::zero`]), which have no bytes in the page file. The
//! CRC32C of each data run is computed from the bytes as they pass (no second
//! pass over the file); runs that continue across chunks are merged with
//! `crc32c_combine`.
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
        // 1. The bytes, in segment order.
        let mut at = 0usize;
        for s in &c.segs {
            let dst = &mut self.buf[at..at + s.len as usize];
            if s.via_mem {
                if !sh.aborted() {
                    let mem = sh.mem.as_ref().expect("opened when the plan reads memory");
                    mem.read_exact_at(dst, s.addr)
                        .map_err(|e| sh.io_err(s.addr, s.addr + s.len, e))?;
                }
            } else {
                read_chunk_part(sh, pipe, dst, c.idx, s)?;
            }
            at += s.len as usize;
        }
        if sh.aborted() {
            return Ok(());
        }

        // 2. Zero and data parts, with the CRC32C of each data part.
        self.subs.clear();
        let mut at = 0usize;
        for s in &c.segs {
            for k in 0..(s.len / PAGE) as usize {
                let p = at + k * PAGE as usize;
                let zero = is_zero_page(&self.buf[p..p + PAGE as usize]);
                match self.subs.last_mut() {
                    Some(l)
                        if l.zero == zero
                            && l.vma == s.vma
                            && l.at + (l.npages * PAGE) as usize == p
                            && l.addr + l.npages * PAGE == s.addr + (k as u64) * PAGE =>
                    {
                        l.npages += 1
                    }
                    _ => self.subs.push(Sub {
                        vma: s.vma,
                        addr: s.addr + k as u64 * PAGE,
                        npages: 1,
                        zero,
                        at: p,
                        crc: 0,
                    }),
                }
            }
            at += s.len as usize;
        }
        for s in self.subs.iter_mut().filter(|s| !s.zero) {
            s.crc = crc32c::crc32c(&self.buf[s.at..s.at + (s.npages * PAGE) as usize]);
        }

        // 3. Our turn: file offsets in address order, runs merged.
        let base = {
            let mut o = sh.order.lock().unwrap_or_else(|p| p.into_inner());
            while o.next != c.idx {
                if sh.aborted() {
                    return Ok(());
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
                match o.runs.last_mut() {
                    Some((vma, r))
                        if *vma == s.vma
                            && r.zero == s.zero
                            && r.addr + r.len() == s.addr
                            && r.offset + r.file_len() == offset =>
                    {
                        if !s.zero {
                            r.crc32c = crc32c::crc32c_combine(r.crc32c, s.crc, len as usize);
                        }
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

        // 4. The data parts, in one write.
        let parts: Vec<&[u8]> = self
            .subs
            .iter()
            .filter(|s| !s.zero)
            .map(|s| &self.buf[s.at..s.at + (s.npages * PAGE) as usize])
            .collect();
        let first = c.segs[0].addr;
        let last = c.segs.last().map_or(first, |s| s.addr + s.len);
        pwritev_all(
            sh.file,
            &parts,
            crate::image::format::PAGES_DATA_OFFSET + base,
        )
        .map_err(|e| sh.io_err(first, last, e))?;
        Ok(())
    }
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
}

fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
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
    let npipes = drainers.max(2);
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

    // Post chunk `c`; returns the command's sequence number (None: nothing
    // to vmsplice, or failed: recorded).
    let post = |parasite: &mut Parasite<'_>, c: &Chunk| -> Option<u32> {
        let iovs = c.iovs();
        if iovs.is_empty() {
            return None;
        }
        match parasite.post_vmsplice(c.pipe, &iovs) {
            Ok(seq) => Some(seq),
            Err(e) => {
                sh.fail(inf("vmsplice")(e));
                None
            }
        }
    };
    // Wait for the command of chunk `idx`, which asked for `want` bytes.
    let wait = |parasite: &Parasite<'_>, idx: u64, want: u64, seq: Option<u32>| {
        if let Some(seq) = seq {
            match parasite.wait_done(seq, pdump_parasite::cmd::VMSPLICE) {
                Ok(got) if got == want as i64 => {}
                Ok(got) => sh.fail(DumpError::ShortSplice { pid, got, want }),
                Err(e) => {
                    sh.fail(inf("vmsplice")(e));
                    sh.completed.store(u64::MAX, Ordering::SeqCst);
                    return;
                }
            }
        }
        sh.completed.fetch_max(idx + 1, Ordering::SeqCst);
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
            if let Some((pc, seq)) = &prev {
                wait(parasite, pc.idx, pc.pipe_bytes(), *seq);
            }
            let seq = post(parasite, &c);
            if let Some((pc, _)) = prev.take() {
                d.chunk(&sh, &pipes[pc.pipe], &pc);
            }
            prev = Some((c, seq));
        }
        if let Some((pc, seq)) = prev.take() {
            wait(parasite, pc.idx, pc.pipe_bytes(), seq);
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
            for c in chunks {
                if sh.aborted() {
                    break;
                }
                let seq = post(parasite, &c);
                let (idx, want, d) = (c.idx, c.pipe_bytes(), c.pipe % drainers);
                // The drainer must have the chunk before its command can
                // finish (it empties the pipe as the parasite fills it).
                if txs[d].send(c).is_err() {
                    sh.fail(DumpError::Worker { index: d });
                }
                wait(parasite, idx, want, seq);
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
    })
}

fn drain_loop(sh: &Shared<'_>, pipes: &[File], rx: Receiver<Chunk>, cap: usize) {
    let mut d = Drainer::new(cap);
    while let Ok(c) = rx.recv() {
        d.chunk(sh, &pipes[c.pipe], &c);
    }
}
