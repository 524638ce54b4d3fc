//! `/proc/PID/pagemap`: which pages of a range are present or swapped.
//!
//! Two ways to ask:
//!
//! * the `PAGEMAP_SCAN` ioctl (Linux 6.7+) on the open pagemap file, which
//!   returns runs of pages with the same categories: few syscalls and no
//!   per-page copying;
//! * reading the file's 8-byte entries, one per page (bit 63 present, bit
//!   62 swapped), for older kernels.
//!
//! [`Pagemap`] keeps the file open, and remembers whether the ioctl works,
//! for the many mappings of one task.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::{page_size, proc_path, ProcError, Result};

/// `PAGE_IS_PRESENT` category of `PAGEMAP_SCAN` (uapi `linux/fs.h`).
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// `PAGE_IS_SWAPPED` category of `PAGEMAP_SCAN` (uapi `linux/fs.h`).
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;

/// `struct pm_scan_arg` (uapi `linux/fs.h`).
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region` (uapi `linux/fs.h`).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 = ioc_iowr(b'f', 16, std::mem::size_of::<PmScanArg>());

const fn ioc_iowr(ty: u8, nr: u8, size: usize) -> u64 {
    // _IOC(_IOC_READ|_IOC_WRITE, type, nr, size) on x86 and arm64 (generic ioctl encoding).
    (3u64 << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}

const _: () = assert!(std::mem::size_of::<PmScanArg>() == 96);
const _: () = assert!(PAGEMAP_SCAN == 0xC060_6610);

/// Pagemap entry bit: page present in RAM.
const PM_PRESENT: u64 = 1 << 63;
/// Pagemap entry bit: page swapped out.
const PM_SWAPPED: u64 = 1 << 62;
/// Pagemap entry bit 61: the page is a file page or shared anonymous.
const PM_FILE: u64 = 1 << 61;

/// Regions asked from the kernel per `PAGEMAP_SCAN` call.
const SCAN_VEC_LEN: usize = 1024;
/// Entries read per `pread` of the pagemap file (512 KiB).
const READ_CHUNK_ENTRIES: usize = 64 * 1024;

/// How [`Pagemap`] finds the pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanMethod {
    /// `PAGEMAP_SCAN` ioctl.
    Ioctl,
    /// 8-byte entries read from the file.
    Read,
}

/// An open `/proc/PID/pagemap`, for the present pages of many ranges.
#[derive(Debug)]
pub struct Pagemap {
    pid: i32,
    path: PathBuf,
    file: File,
    method: ScanMethod,
}

impl Pagemap {
    /// Opens `/proc/PID/pagemap`. The ioctl is tried first and the reader
    /// falls back to reading entries if the kernel lacks it.
    pub fn open(pid: i32) -> Result<Self> {
        let path = proc_path(pid, "pagemap");
        let file = File::open(&path).map_err(|source| ProcError::Open {
            pid,
            path: path.clone(),
            source,
        })?;
        Ok(Pagemap {
            pid,
            path,
            file,
            method: ScanMethod::Ioctl,
        })
    }

    /// The method the next call will use (`Ioctl` until the kernel has
    /// answered `ENOTTY` to it). A range the ioctl refuses (`EINVAL`,
    /// `EFAULT`) is read entry by entry without changing the method.
    pub fn method(&self) -> ScanMethod {
        self.method
    }

    /// Forces a method (the fallback still applies to `Ioctl`).
    pub fn set_method(&mut self, method: ScanMethod) {
        self.method = method;
    }

    /// The present or swapped pages of `[start, end)` as runs of
    /// `(address, number of pages)`, in address order, adjacent runs merged.
    /// `start` and `end` are rounded out to pages.
    pub fn present_ranges(&mut self, start: u64, end: u64) -> Result<Vec<(u64, u64)>> {
        let Some((start, end)) = page_span(start, end) else {
            return Ok(Vec::new());
        };
        if self.method == ScanMethod::Ioctl {
            match self.scan(start, end) {
                Err(ProcError::PagemapScan { source, .. }) => match source.raw_os_error() {
                    // No such ioctl: this kernel predates it, stop trying.
                    Some(libc::ENOTTY) => {
                        log::debug!(
                            "pid {}: no PAGEMAP_SCAN ({source}); reading pagemap",
                            self.pid
                        );
                        self.method = ScanMethod::Read;
                    }
                    // Refused for this range (EFAULT above the user address
                    // space, such as [vsyscall]) or this argument layout.
                    Some(libc::EINVAL) | Some(libc::EFAULT) | Some(libc::EOPNOTSUPP) => {}
                    _ => {
                        return Err(ProcError::PagemapScan {
                            pid: self.pid,
                            start,
                            end,
                            source,
                        })
                    }
                },
                other => return other,
            }
        }
        self.read_entries(start, end)
    }

    /// Like [`Pagemap::present_ranges`], but with the `PAGEMAP_SCAN` ioctl
    /// only: its failure is returned, never worked around (for probes).
    pub fn present_ranges_ioctl(&self, start: u64, end: u64) -> Result<Vec<(u64, u64)>> {
        let page = page_size();
        self.scan(
            start & !(page - 1),
            end.saturating_add(page - 1) & !(page - 1),
        )
    }

    /// `PAGEMAP_SCAN` over `[start, end)` (page-aligned).
    fn scan(&self, start: u64, end: u64) -> Result<Vec<(u64, u64)>> {
        let page = page_size();
        let mut regions = vec![PageRegion::default(); SCAN_VEC_LEN];
        let mut runs = Runs::default();
        let mut from = start;
        while from < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                start: from,
                end,
                vec: regions.as_mut_ptr() as u64,
                vec_len: regions.len() as u64,
                category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                ..PmScanArg::default()
            };
            // SAFETY: `arg` is a valid pm_scan_arg whose `vec` points at
            // `regions.len()` writable page_region structs that outlive the
            // call; the kernel writes only `walk_end` and those structs.
            let n = unsafe {
                libc::ioctl(
                    self.file.as_raw_fd(),
                    PAGEMAP_SCAN as libc::Ioctl,
                    &mut arg as *mut PmScanArg,
                )
            };
            if n < 0 {
                return Err(ProcError::PagemapScan {
                    pid: self.pid,
                    start: from,
                    end,
                    source: std::io::Error::last_os_error(),
                });
            }
            let n = (n as usize).min(regions.len());
            for r in &regions[..n] {
                // When `regions` fills up in the middle of a page table,
                // Linux 6.18 can set `walk_end` back to the start of that
                // table although it already reported regions past it; the
                // next call reports them again. Keep each page once.
                let start = r.start.max(runs.end(page));
                if r.end > start {
                    runs.push(start, (r.end - start) / page, page);
                }
            }
            // walk_end == end when the whole range was walked; it only
            // stops early when `regions` is full. Guard against a kernel
            // that makes no progress.
            if arg.walk_end <= from {
                break;
            }
            from = arg.walk_end;
        }
        Ok(runs.0)
    }

    /// Reads 8-byte entries for `[start, end)` (page-aligned).
    fn read_entries(&self, start: u64, end: u64) -> Result<Vec<(u64, u64)>> {
        self.entries_where(start, end, |e| e & (PM_PRESENT | PM_SWAPPED) != 0)
    }

    /// The anonymous pages of a private file mapping in `[start, end)`: its
    /// pages the task wrote (copies), as runs. A present page counts when
    /// it is not a file page (bit 61 clear); a swapped page always does (a
    /// file page is dropped, never swapped).
    pub fn anon_ranges(&self, start: u64, end: u64) -> Result<Vec<(u64, u64)>> {
        let Some((start, end)) = page_span(start, end) else {
            return Ok(Vec::new());
        };
        self.entries_where(start, end, |e| {
            (e & PM_PRESENT != 0 && e & PM_FILE == 0) || e & PM_SWAPPED != 0
        })
    }

    /// The runs of pages of `[start, end)` (page-aligned) whose 8-byte
    /// entry `keep` accepts.
    fn entries_where(
        &self,
        start: u64,
        end: u64,
        keep: impl Fn(u64) -> bool,
    ) -> Result<Vec<(u64, u64)>> {
        let page = page_size();
        let mut runs = Runs::default();
        // Sized to the range: most ranges are small, and a zeroed 512 KiB
        // buffer per call cost more than reading them.
        let cap = ((end - start) / page).min(READ_CHUNK_ENTRIES as u64) as usize;
        let mut buf = vec![0u8; cap * 8];
        let mut addr = start;
        while addr < end {
            let npages = ((end - addr) / page).min(READ_CHUNK_ENTRIES as u64) as usize;
            let offset = addr / page * 8;
            let want = &mut buf[..npages * 8];
            let got = self.pread_full(want, offset)?;
            let entries = got / 8;
            for (i, e) in want[..entries * 8].chunks_exact(8).enumerate() {
                let e = u64::from_ne_bytes(e.try_into().unwrap_or([0; 8]));
                if keep(e) {
                    runs.push(addr + i as u64 * page, 1, page);
                }
            }
            if entries < npages {
                // Past the end of the address space the kernel has no entries.
                break;
            }
            addr += npages as u64 * page;
        }
        Ok(runs.0)
    }

    /// `pread` until `buf` is full or end of file; returns the bytes read.
    fn pread_full(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(ProcError::PagemapRead {
                        pid: self.pid,
                        path: self.path.clone(),
                        offset: offset + done as u64,
                        source,
                    })
                }
            }
        }
        Ok(done)
    }
}

/// The present or swapped pages of `pid` in `[start, end)` as runs of
/// `(address, number of pages)`. Opens pagemap for one range; use
/// [`Pagemap`] for many.
pub fn present_ranges(pid: i32, start: u64, end: u64) -> Result<Vec<(u64, u64)>> {
    Pagemap::open(pid)?.present_ranges(start, end)
}

/// `[start, end)` rounded out to whole pages; None when it holds no page.
fn page_span(start: u64, end: u64) -> Option<(u64, u64)> {
    let page = page_size();
    let start = start & !(page - 1);
    let end = end
        .checked_add(page - 1)
        .map_or(!(page - 1), |e| e & !(page - 1));
    (end > start).then_some((start, end))
}

/// Runs of pages, merging a run that starts where the last one ended.
#[derive(Default)]
struct Runs(Vec<(u64, u64)>);

impl Runs {
    /// One past the last page so far (0 when empty).
    fn end(&self, page: u64) -> u64 {
        self.0.last().map_or(0, |&(a, n)| a + n * page)
    }

    fn push(&mut self, addr: u64, npages: u64, page: u64) {
        if let Some(last) = self.0.last_mut() {
            if last.0 + last.1 * page == addr {
                last.1 += npages;
                return;
            }
        }
        self.0.push((addr, npages));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An anonymous private mapping of `pages` pages, unmapped on drop.
    struct Mapping {
        addr: *mut u8,
        len: usize,
    }

    impl Mapping {
        fn new(pages: usize) -> Self {
            let len = pages * page_size() as usize;
            // SAFETY: a fresh anonymous mapping; no existing memory is touched.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(addr, libc::MAP_FAILED);
            // No (multi-size) THP: one touch must fault in exactly one page.
            // SAFETY: `addr..addr+len` is the mapping just made.
            let r = unsafe { libc::madvise(addr, len, libc::MADV_NOHUGEPAGE) };
            assert_eq!(r, 0);
            Mapping {
                addr: addr.cast(),
                len,
            }
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: unmapping the mapping this value owns.
            unsafe { libc::munmap(self.addr.cast(), self.len) };
        }
    }

    #[test]
    fn ioctl_and_read_agree() {
        let page = page_size();
        let m = Mapping::new(64);
        for i in (0..64).step_by(3) {
            // SAFETY: page i of the mapping is inside it and writable.
            unsafe { m.addr.add(i * page as usize).write_volatile(1) };
        }
        let start = m.addr as u64;
        let end = start + m.len as u64;
        let me = std::process::id() as i32;

        let mut pm = Pagemap::open(me).unwrap();
        let by_ioctl = pm.present_ranges(start, end).unwrap();
        let ioctl_worked = pm.method() == ScanMethod::Ioctl;
        pm.set_method(ScanMethod::Read);
        let by_read = pm.present_ranges(start, end).unwrap();

        let expected: Vec<(u64, u64)> = (0..64u64)
            .step_by(3)
            .map(|i| (start + i * page, 1))
            .collect();
        assert_eq!(by_read, expected);
        assert_eq!(by_ioctl, expected);
        // Kernel 6.7+ has the ioctl; say so if this one lacks it.
        eprintln!("PAGEMAP_SCAN used: {ioctl_worked}");

        // Contiguous runs merge; a sub-range is clipped.
        for i in 0..8 {
            // SAFETY: pages 0..8 are inside the mapping.
            unsafe { m.addr.add(i * page as usize).write_volatile(2) };
        }
        pm.set_method(ScanMethod::Ioctl);
        let a = pm.present_ranges(start + page, start + 10 * page).unwrap();
        pm.set_method(ScanMethod::Read);
        let b = pm.present_ranges(start + page, start + 10 * page).unwrap();
        // Pages 1..8 (touched twice over) and 9 (every third).
        assert_eq!(a, vec![(start + page, 7), (start + 9 * page, 1)]);
        assert_eq!(a, b);
        assert!(present_ranges(me, start, start).unwrap().is_empty());
    }

    #[test]
    fn anon_ranges_are_the_written_pages_of_a_private_file_mapping() {
        use std::io::Write;
        let page = page_size() as usize;
        let path = std::env::temp_dir().join(format!("pdump-anon-{}", std::process::id()));
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![7u8; 8 * page]).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        // SAFETY: a fresh private mapping of a file we own; only it is touched.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let base = addr as *mut u8;
        // Read pages 0 and 5 (file pages), write pages 2, 3 and 6 (copies).
        // SAFETY: every page touched lies inside the 8-page mapping.
        unsafe {
            assert_eq!(base.read_volatile(), 7);
            assert_eq!(base.add(5 * page).read_volatile(), 7);
            for i in [2, 3, 6] {
                base.add(i * page).write_volatile(1);
            }
        }
        let start = addr as u64;
        let pm = Pagemap::open(std::process::id() as i32).unwrap();
        let runs = pm.anon_ranges(start, start + 8 * page as u64).unwrap();
        // SAFETY: unmapping the mapping made above.
        unsafe { libc::munmap(addr, 8 * page) };
        let _ = std::fs::remove_file(&path);
        let p = page as u64;
        assert_eq!(runs, vec![(start + 2 * p, 2), (start + 6 * p, 1)]);
    }

    #[test]
    fn many_regions_need_several_ioctls() {
        // More isolated pages than one PAGEMAP_SCAN call returns.
        let page = page_size();
        let pages = SCAN_VEC_LEN * 2 + 20;
        let m = Mapping::new(pages * 2);
        for i in 0..pages {
            // SAFETY: page 2*i is inside the mapping.
            unsafe { m.addr.add(2 * i * page as usize).write_volatile(1) };
        }
        let me = std::process::id() as i32;
        let start = m.addr as u64;
        let end = start + m.len as u64;
        let mut pm = Pagemap::open(me).unwrap();
        let a = pm.present_ranges(start, end).unwrap();
        pm.set_method(ScanMethod::Read);
        let b = pm.present_ranges(start, end).unwrap();
        assert_eq!(a.len(), pages);
        assert_eq!(a, b);
    }
}
