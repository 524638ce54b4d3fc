//! Checkpoint images: the data model, the on-disk framing, and rendering.
//!
//! A checkpoint is a directory:
//!
//! ```text
//! DIR/inventory.img      Inventory: what was dumped, by whom, for which arch/kernel
//! DIR/core-<pid>.img     ProcessImage of every listed process
//! DIR/pages-<pid>.img    its page data, page aligned (header page + data)
//! DIR/files-<pid>.img    its file contents and pipe data, if any ([`data`])
//! ```
//!
//! Every file is framed by [`format`] (magic per kind and arch, version,
//! CRC32C, size limits); see `docs/image-format.md`. Files are written under
//! a hidden temporary name and renamed into place, so a crashed dump never
//! leaves a half-written file under a final name.
//!
//! Reading validates everything and reports corruption as an [`ImageError`]
//! naming the file and, for content errors, the byte offset; it never panics
//! on bad input.

pub mod data;
pub mod format;
pub mod model;
pub mod show;

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub use data::{file_data_name, BlobRead, DataReader, DataSink, DataWriter};
pub use format::PAGES_DATA_OFFSET;
use format::{FileKind, Header, HEADER_SIZE};
use model::{FdKind, Inventory, PageRun, ProcessImage};

/// Page size the image format is laid out for (run lengths, alignment).
pub const PAGE_SIZE: u64 = pdump_arch::PAGE_SIZE as u64;

/// Name of the inventory file.
pub const INVENTORY_FILE: &str = "inventory.img";

/// Size of one raw siginfo in the model.
const SIGINFO_SIZE: usize = 128;

/// Highest signal number (signals are 1..=64).
const MAX_SIGNALS: usize = 64;

/// Chunk size used when streaming page data for CRC checks.
const STREAM_CHUNK: usize = 1 << 20;

/// Everything that can go wrong writing or reading an image.
///
/// Every variant names the file; content errors also give the byte offset in
/// that file where the problem was found.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A system call on an image file failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done ("open", "read", "write", "rename", ...).
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file the checkpoint needs does not exist.
    #[error("{}: missing", path.display())]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// The file ends before the data its header announces.
    #[error("{}: truncated: ends at byte {offset}, need {need} bytes", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Where the data ended (the file's length as read).
        offset: u64,
        /// The length the file must have.
        need: u64,
    },
    /// The magic number is not the one of this file kind.
    #[error(
        "{}: bad magic at byte {offset}: found {found:#010x} ({}), expected {expected:#010x}",
        path.display(),
        format::describe_magic(*found)
    )]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// Offset of the magic.
        offset: u64,
        /// What the file holds.
        found: u32,
        /// What this kind must hold.
        expected: u32,
    },
    /// The image was written for another architecture.
    #[error(
        "{}: image is for {} (arch code {found:#04x} at byte {offset}), this pdump is for {}",
        path.display(),
        format::arch_name(*found).unwrap_or("an unknown arch"),
        format::arch_name(*expected).unwrap_or("an unknown arch")
    )]
    WrongArch {
        /// The file.
        path: PathBuf,
        /// Offset of the arch byte of the magic.
        offset: u64,
        /// Arch code found.
        found: u8,
        /// Arch code of this build.
        expected: u8,
    },
    /// The format version is not one this pdump reads.
    #[error(
        "{}: format version {major}.{minor} at byte {offset} is not supported \
         (this pdump reads {supported_major}.0 to {supported_major}.{supported_minor})",
        path.display()
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// Offset of the version.
        offset: u64,
        /// Major version found.
        major: u16,
        /// Minor version found.
        minor: u16,
        /// The major version this pdump reads.
        supported_major: u16,
        /// The newest minor version this pdump reads.
        supported_minor: u16,
    },
    /// A CRC32C does not match.
    #[error(
        "{}: {what} checksum mismatch over bytes {offset}..{}: stored {stored:#010x}, computed {computed:#010x}",
        path.display(),
        offset.saturating_add(*len)
    )]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Start of the checksummed range.
        offset: u64,
        /// Length of the checksummed range.
        len: u64,
        /// "header" or "payload".
        what: &'static str,
        /// The CRC in the file.
        stored: u32,
        /// The CRC of the bytes.
        computed: u32,
    },
    /// The header flags are not the ones of this file kind.
    #[error("{}: flags {found:#x} at byte {offset}, expected {expected:#x}", path.display())]
    Flags {
        /// The file.
        path: PathBuf,
        /// Offset of the flags.
        offset: u64,
        /// Flags found.
        found: u32,
        /// Flags this kind must carry.
        expected: u32,
    },
    /// Another header field is invalid (reserved bits, page-file padding).
    #[error("{}: bad header at byte {offset}: {what}", path.display())]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// Offset of the bad field.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// The payload is larger than a reader accepts for this kind.
    #[error("{}: payload of {len} bytes (field at byte {offset}) exceeds the limit of {limit}", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Offset of the length field.
        offset: u64,
        /// Payload length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// Bytes follow the data the header or the encoding accounts for.
    #[error("{}: {count} unexpected trailing bytes at byte {offset}", path.display())]
    TrailingBytes {
        /// The file.
        path: PathBuf,
        /// Where the unexpected bytes start.
        offset: u64,
        /// How many.
        count: u64,
    },
    /// The payload passed its checksum but does not decode.
    #[error("{}: cannot decode payload at byte {offset}", path.display())]
    Decode {
        /// The file.
        path: PathBuf,
        /// Where decoding failed.
        offset: u64,
        /// The cause.
        #[source]
        source: postcard::Error,
    },
    /// A model could not be encoded.
    #[error("{}: cannot encode", path.display())]
    Encode {
        /// The file being written.
        path: PathBuf,
        /// The cause.
        #[source]
        source: postcard::Error,
    },
    /// A page run lies (partly) outside its page file's data.
    #[error(
        "{}: page run at address {addr:#x} covers bytes {offset}..{} but the file holds data up to byte {}",
        path.display(),
        offset.saturating_add(*len),
        format::PAGES_DATA_OFFSET.saturating_add(*data_len)
    )]
    PageRunOutOfBounds {
        /// The page file.
        path: PathBuf,
        /// File offset of the run.
        offset: u64,
        /// Run length in bytes.
        len: u64,
        /// Bytes of page data in the file.
        data_len: u64,
        /// Address of the run's first page.
        addr: u64,
    },
    /// A page run's data does not match its CRC32C in the core image.
    #[error(
        "{}: page run at address {addr:#x} (bytes {offset}..{}) fails its checksum: \
         stored {stored:#010x}, computed {computed:#010x}",
        path.display(),
        offset.saturating_add(*len)
    )]
    PageRunChecksum {
        /// The page file.
        path: PathBuf,
        /// File offset of the run.
        offset: u64,
        /// Run length in bytes.
        len: u64,
        /// Address of the run's first page.
        addr: u64,
        /// CRC in the core image.
        stored: u32,
        /// CRC of the data.
        computed: u32,
    },
    /// A blob lies (partly) outside its file-data file's data.
    #[error(
        "{}: blob at bytes {offset}..{} lies outside the file's data (which ends at byte {})",
        path.display(),
        offset.saturating_add(*len),
        format::PAGES_DATA_OFFSET.saturating_add(*data_len)
    )]
    BlobOutOfBounds {
        /// The file-data file.
        path: PathBuf,
        /// File offset of the blob.
        offset: u64,
        /// Blob length in bytes.
        len: u64,
        /// Bytes of data in the file.
        data_len: u64,
    },
    /// A blob's data does not match its CRC32C in the image.
    #[error(
        "{}: blob at bytes {offset}..{} fails its checksum: stored {stored:#010x}, computed {computed:#010x}",
        path.display(),
        offset.saturating_add(*len)
    )]
    BlobChecksum {
        /// The file-data file.
        path: PathBuf,
        /// File offset of the blob.
        offset: u64,
        /// Blob length in bytes.
        len: u64,
        /// CRC in the image.
        stored: u32,
        /// CRC of the data.
        computed: u32,
    },
    /// The decoded data contradicts itself or another file.
    #[error("{}: inconsistent image: {what}", path.display())]
    Inconsistent {
        /// The file whose content is wrong.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

impl ImageError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            ImageError::Io { path, .. }
            | ImageError::Missing { path }
            | ImageError::Truncated { path, .. }
            | ImageError::BadMagic { path, .. }
            | ImageError::WrongArch { path, .. }
            | ImageError::Version { path, .. }
            | ImageError::Checksum { path, .. }
            | ImageError::Flags { path, .. }
            | ImageError::BadHeader { path, .. }
            | ImageError::TooLarge { path, .. }
            | ImageError::TrailingBytes { path, .. }
            | ImageError::Decode { path, .. }
            | ImageError::Encode { path, .. }
            | ImageError::PageRunOutOfBounds { path, .. }
            | ImageError::PageRunChecksum { path, .. }
            | ImageError::BlobOutOfBounds { path, .. }
            | ImageError::BlobChecksum { path, .. }
            | ImageError::Inconsistent { path, .. } => path,
        }
    }

    /// The byte offset in [`ImageError::path`] the error points at, for
    /// content errors.
    pub fn offset(&self) -> Option<u64> {
        match self {
            ImageError::Truncated { offset, .. }
            | ImageError::BadMagic { offset, .. }
            | ImageError::WrongArch { offset, .. }
            | ImageError::Version { offset, .. }
            | ImageError::Checksum { offset, .. }
            | ImageError::Flags { offset, .. }
            | ImageError::BadHeader { offset, .. }
            | ImageError::TooLarge { offset, .. }
            | ImageError::TrailingBytes { offset, .. }
            | ImageError::Decode { offset, .. }
            | ImageError::PageRunOutOfBounds { offset, .. }
            | ImageError::PageRunChecksum { offset, .. }
            | ImageError::BlobOutOfBounds { offset, .. }
            | ImageError::BlobChecksum { offset, .. } => Some(*offset),
            ImageError::Io { .. }
            | ImageError::Missing { .. }
            | ImageError::Encode { .. }
            | ImageError::Inconsistent { .. } => None,
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn inconsistent(path: &Path, what: impl Into<String>) -> ImageError {
    ImageError::Inconsistent {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

/// Open an image file for reading; a missing file is [`ImageError::Missing`].
fn open_existing(path: &Path) -> Result<File, ImageError> {
    File::open(path).map_err(|source| {
        if source.kind() == ErrorKind::NotFound {
            ImageError::Missing {
                path: path.to_path_buf(),
            }
        } else {
            ImageError::Io {
                op: "open",
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// Read up to `buf.len()` bytes from the start of `file`; returns how many.
fn read_prefix(file: &File, buf: &mut [u8], path: &Path) -> Result<usize, ImageError> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("read", path)(e)),
        }
    }
    Ok(got)
}

/// Read and validate the 32-byte header of a file of `kind`.
fn read_header(file: &File, kind: FileKind, path: &Path) -> Result<Header, ImageError> {
    let mut raw = [0u8; HEADER_SIZE];
    let got = read_prefix(file, &mut raw, path)?;
    if got < HEADER_SIZE {
        return Err(ImageError::Truncated {
            path: path.to_path_buf(),
            offset: got as u64,
            need: HEADER_SIZE as u64,
        });
    }
    Header::validate(&raw, kind, path)
}

fn file_len(file: &File, path: &Path) -> Result<u64, ImageError> {
    Ok(file.metadata().map_err(io_err("stat", path))?.len())
}

/// Read, check and decode a framed file holding a postcard payload.
fn read_framed<T: serde::de::DeserializeOwned>(
    path: &Path,
    kind: FileKind,
) -> Result<T, ImageError> {
    let file = open_existing(path)?;
    let h = read_header(&file, kind, path)?;
    let present = file_len(&file, path)?.saturating_sub(HEADER_SIZE as u64);
    // Checked against the per-kind limit in `read_header` and against the
    // file size here, before anything is allocated.
    format::check_payload_size(&h, present, path)?;
    let len = usize::try_from(h.payload_len).map_err(|_| ImageError::TooLarge {
        path: path.to_path_buf(),
        offset: format::offsets::PAYLOAD_LEN,
        len: h.payload_len,
        limit: usize::MAX as u64,
    })?;
    let mut payload = vec![0u8; len];
    file.read_exact_at(&mut payload, HEADER_SIZE as u64)
        .map_err(|source| {
            if source.kind() == ErrorKind::UnexpectedEof {
                // The file shrank after it was measured.
                ImageError::Truncated {
                    path: path.to_path_buf(),
                    offset: HEADER_SIZE as u64,
                    need: HEADER_SIZE as u64 + h.payload_len,
                }
            } else {
                io_err("read", path)(source)
            }
        })?;
    format::decode_payload(&h, &payload, path)
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Write `dir/name` through a temporary file and a rename; `fill` writes
/// the contents into the (empty) temporary file.
fn write_atomic(
    dir: &Path,
    name: &str,
    fill: impl FnOnce(&File, &Path) -> Result<(), ImageError>,
) -> Result<(), ImageError> {
    let final_path = dir.join(name);
    let tmp = dir.join(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let f = File::create(&tmp).map_err(io_err("create", &tmp))?;
        fill(&f, &final_path)?;
        drop(f);
        std::fs::rename(&tmp, &final_path).map_err(io_err("rename", &final_path))
    })();
    if result.is_err() {
        // Best effort: never leave the temporary behind.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Name of the core image of process `pid`.
pub fn core_file_name(pid: i32) -> String {
    format!("core-{pid}.img")
}

/// Name of the page file of process `pid`.
pub fn pages_file_name(pid: i32) -> String {
    format!("pages-{pid}.img")
}

/// Write `dir/inventory.img`.
pub fn write_inventory(dir: &Path, inv: &Inventory) -> Result<(), ImageError> {
    write_atomic(dir, INVENTORY_FILE, |f, path| {
        format::write_framed(FileKind::Inventory, inv, f, path)
    })
}

/// Read and validate `dir/inventory.img`.
pub fn read_inventory(dir: &Path) -> Result<Inventory, ImageError> {
    let path = dir.join(INVENTORY_FILE);
    let inv: Inventory = read_framed(&path, FileKind::Inventory)?;
    validate_inventory(&path, &inv)?;
    Ok(inv)
}

/// Write `dir/core-<pid>.img` for `p.pid`.
pub fn write_process(dir: &Path, p: &ProcessImage) -> Result<(), ImageError> {
    let name = core_file_name(p.pid);
    write_atomic(dir, &name, |f, path| {
        format::write_framed(FileKind::Core, p, f, path)
    })
}

/// Read and validate `dir/core-<pid>.img` (the structure of one process:
/// threads, VMAs, page runs; page files are checked by [`Checkpoint::open`]).
pub fn read_process(dir: &Path, pid: i32) -> Result<ProcessImage, ImageError> {
    let path = dir.join(core_file_name(pid));
    let p: ProcessImage = read_framed(&path, FileKind::Core)?;
    if p.pid != pid {
        return Err(inconsistent(
            &path,
            format!("file holds pid {}, expected {pid}", p.pid),
        ));
    }
    validate_process(&path, &p)?;
    Ok(p)
}

/// The temporary name a page file has until [`finish_pages_file`].
fn partial_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.partial"))
}

/// Create (or truncate) the page file of `pid` for writing.
///
/// The file lives under a hidden temporary name until [`finish_pages_file`]
/// renames it to `dir/pages-<pid>.img`, so use the returned `File` (or
/// `try_clone` it) rather than reopening by name. Its first 4096 bytes are
/// zeros (the header page) and its position is at byte 4096: page data written
/// from there on, sequentially or with `pwrite`/`splice` at `4096 + offset`, is
/// the payload, and [`PageRun::offset`] counts from there.
pub fn create_pages_file(dir: &Path, pid: i32) -> Result<File, ImageError> {
    let path = partial_path(&dir.join(pages_file_name(pid)));
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(io_err("create", &path))?;
    f.set_len(PAGES_DATA_OFFSET)
        .map_err(io_err("truncate", &path))?;
    f.seek(SeekFrom::Start(PAGES_DATA_OFFSET))
        .map_err(io_err("seek", &path))?;
    Ok(f)
}

/// Finish a page file made by [`create_pages_file`]: check it holds exactly
/// `data_len` bytes of data, write the final header at offset 0 and move it
/// to its final name `path` (`dir.join(pages_file_name(pid))`). Does not fsync.
pub fn finish_pages_file(file: &File, path: &Path, data_len: u64) -> Result<(), ImageError> {
    let meta = file.metadata().map_err(io_err("stat", path))?;
    let present = meta.len().saturating_sub(PAGES_DATA_OFFSET);
    if meta.len() < PAGES_DATA_OFFSET || present != data_len {
        return Err(inconsistent(
            path,
            format!(
                "page file holds {} bytes ({present} of data), but {data_len} data bytes were announced",
                meta.len()
            ),
        ));
    }
    let header = format::pages_header(data_len).to_bytes();
    file.write_all_at(&header, 0)
        .map_err(io_err("write", path))?;
    // Already in place (same inode under the final name)? Then nothing to move.
    if let Ok(m) = std::fs::metadata(path) {
        if m.dev() == meta.dev() && m.ino() == meta.ino() {
            return Ok(());
        }
    }
    std::fs::rename(partial_path(path), path).map_err(io_err("rename", path))
}

/// Open and validate a file laid out like a page file (header page, then
/// raw data: [`FileKind::Pages`], [`FileKind::FileData`]): header, zero
/// padding of the header page, and a file size of exactly header page +
/// `payload_len`. Returns the file and its data length.
fn open_paged(path: &Path, kind: FileKind) -> Result<(File, u64), ImageError> {
    let file = open_existing(path)?;
    let h = read_header(&file, kind, path)?;
    let len = file_len(&file, path)?;
    let need = PAGES_DATA_OFFSET
        .checked_add(h.payload_len)
        .ok_or_else(|| ImageError::TooLarge {
            path: path.to_path_buf(),
            offset: format::offsets::PAYLOAD_LEN,
            len: h.payload_len,
            limit: u64::MAX - PAGES_DATA_OFFSET,
        })?;
    let mut page = vec![0u8; PAGES_DATA_OFFSET as usize];
    let got = read_prefix(&file, &mut page, path)?;
    if got < page.len() || len < need {
        return Err(ImageError::Truncated {
            path: path.to_path_buf(),
            offset: len,
            need,
        });
    }
    if let Some(i) = page[HEADER_SIZE..].iter().position(|&b| b != 0) {
        return Err(ImageError::BadHeader {
            path: path.to_path_buf(),
            offset: (HEADER_SIZE + i) as u64,
            what: "header page padding is not zero".to_string(),
        });
    }
    if len > need {
        return Err(ImageError::TrailingBytes {
            path: path.to_path_buf(),
            offset: need,
            count: len - need,
        });
    }
    Ok((file, h.payload_len))
}

/// A validated page file, open for reading page runs.
#[derive(Debug)]
pub struct PagesReader {
    path: PathBuf,
    file: File,
    data_len: u64,
}

impl PagesReader {
    /// Open and validate `dir/pages-<pid>.img`.
    pub fn open(dir: &Path, pid: i32) -> Result<PagesReader, ImageError> {
        Self::open_path(&dir.join(pages_file_name(pid)))
    }

    /// Open and validate the page file at `path`: header, zero padding of the
    /// header page, and a file size of exactly header page + `payload_len`.
    pub fn open_path(path: &Path) -> Result<PagesReader, ImageError> {
        let (file, data_len) = open_paged(path, FileKind::Pages)?;
        Ok(PagesReader {
            path: path.to_path_buf(),
            file,
            data_len,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file (page data starts at [`PAGES_DATA_OFFSET`]).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Bytes of page data.
    pub fn data_len(&self) -> u64 {
        self.data_len
    }

    /// Check that `run` lies inside the page data; returns its file offset
    /// (page aligned) and length in bytes.
    ///
    /// A zero run ([`PageRun::zero`]) has no data: its length here is 0 and
    /// only its offset is checked.
    pub fn run_range(&self, run: &PageRun) -> Result<(u64, u64), ImageError> {
        let len = run.file_len();
        let offset = PAGES_DATA_OFFSET.saturating_add(run.offset);
        match run.offset.checked_add(len) {
            Some(end) if end <= self.data_len => Ok((offset, len)),
            _ => Err(ImageError::PageRunOutOfBounds {
                path: self.path.clone(),
                offset,
                len,
                data_len: self.data_len,
                addr: run.addr,
            }),
        }
    }

    /// Read a run's bytes, checking bounds and its CRC32C (a zero run reads
    /// as `npages * 4096` zero bytes).
    pub fn read_run(&self, run: &PageRun) -> Result<Vec<u8>, ImageError> {
        let (offset, len) = self.run_range(run)?;
        if run.zero {
            let len = usize::try_from(run.len()).map_err(|_| ImageError::PageRunOutOfBounds {
                path: self.path.clone(),
                offset,
                len: run.len(),
                data_len: self.data_len,
                addr: run.addr,
            })?;
            return Ok(vec![0u8; len]);
        }
        let len = usize::try_from(len).map_err(|_| ImageError::PageRunOutOfBounds {
            path: self.path.clone(),
            offset,
            len,
            data_len: self.data_len,
            addr: run.addr,
        })?;
        let mut buf = vec![0u8; len];
        self.read_exact(&mut buf, offset)?;
        self.check_crc(run, offset, len as u64, crc32c::crc32c(&buf))?;
        Ok(buf)
    }

    /// Check a run's bounds and CRC32C without holding it in memory.
    pub fn verify_run(&self, run: &PageRun) -> Result<(), ImageError> {
        self.for_each_page(run, |_, _| {})
    }

    /// Call `f(addr, page)` for every page of `run` in order, streaming the
    /// data; the run's CRC32C is checked at the end (pages already passed to
    /// `f` are then known bad if this returns [`ImageError::PageRunChecksum`]).
    /// Every page of a zero run is passed as a page of zeros.
    pub fn for_each_page(
        &self,
        run: &PageRun,
        mut f: impl FnMut(u64, &[u8]),
    ) -> Result<(), ImageError> {
        let (offset, len) = self.run_range(run)?;
        if run.zero {
            static ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];
            for k in 0..run.npages {
                f(run.addr.wrapping_add(k * PAGE_SIZE), &ZERO_PAGE);
            }
            return self.check_crc(run, offset, 0, 0);
        }
        let mut buf = vec![0u8; STREAM_CHUNK.min(len as usize)];
        let mut crc = 0u32;
        let mut done = 0u64;
        while done < len {
            let n = buf.len().min((len - done) as usize);
            let chunk = &mut buf[..n];
            self.read_exact(chunk, offset + done)?;
            crc = crc32c::crc32c_append(crc, chunk);
            for (i, page) in chunk.chunks(PAGE_SIZE as usize).enumerate() {
                f(run.addr.wrapping_add(done + i as u64 * PAGE_SIZE), page);
            }
            done += n as u64;
        }
        self.check_crc(run, offset, len, crc)
    }

    /// Map the page data read-only: byte 0 of the map is byte
    /// [`PAGES_DATA_OFFSET`] of the file, so a run is at `map[run.offset..]`
    /// (page aligned). Check runs with [`PagesReader::run_range`] first.
    pub fn map(&self) -> Result<memmap2::Mmap, ImageError> {
        let len = usize::try_from(self.data_len).map_err(|_| ImageError::TooLarge {
            path: self.path.clone(),
            offset: format::offsets::PAYLOAD_LEN,
            len: self.data_len,
            limit: usize::MAX as u64,
        })?;
        // SAFETY: the map is read-only and private to this process; the file
        // was checked to hold `data_len` bytes after the header page. Image
        // files are not modified while pdump reads them (a concurrent
        // truncation by someone else would fault, as with any mapped file).
        unsafe {
            memmap2::MmapOptions::new()
                .offset(PAGES_DATA_OFFSET)
                .len(len)
                .map(&self.file)
        }
        .map_err(io_err("mmap", &self.path))
    }

    fn read_exact(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        self.file.read_exact_at(buf, offset).map_err(|source| {
            if source.kind() == ErrorKind::UnexpectedEof {
                // The file shrank after it was validated.
                ImageError::Truncated {
                    path: self.path.clone(),
                    offset,
                    need: PAGES_DATA_OFFSET + self.data_len,
                }
            } else {
                io_err("read", &self.path)(source)
            }
        })
    }

    fn check_crc(
        &self,
        run: &PageRun,
        offset: u64,
        len: u64,
        computed: u32,
    ) -> Result<(), ImageError> {
        if computed == run.crc32c {
            Ok(())
        } else {
            Err(ImageError::PageRunChecksum {
                path: self.path.clone(),
                offset,
                len,
                addr: run.addr,
                stored: run.crc32c,
                computed,
            })
        }
    }
}

/// Check an inventory on its own.
fn validate_inventory(path: &Path, inv: &Inventory) -> Result<(), ImageError> {
    if u64::from(inv.page_size) != PAGE_SIZE {
        return Err(inconsistent(
            path,
            format!(
                "page size {} (this format supports {PAGE_SIZE})",
                inv.page_size
            ),
        ));
    }
    if inv.processes.is_empty() {
        return Err(inconsistent(path, "no processes listed"));
    }
    let mut seen = HashSet::new();
    for &pid in &inv.processes {
        if pid <= 0 {
            return Err(inconsistent(
                path,
                format!("invalid pid {pid} in the process list"),
            ));
        }
        if !seen.insert(pid) {
            return Err(inconsistent(path, format!("pid {pid} listed twice")));
        }
    }
    if !seen.contains(&inv.root_pid) {
        return Err(inconsistent(
            path,
            format!("root pid {} is not in the process list", inv.root_pid),
        ));
    }
    Ok(())
}

/// Whether `name` is a plain file name inside the checkpoint directory.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// Check the structure of one process image: threads, signals, VMAs and page
/// runs (sorted, inside their VMA, page aligned, not overlapping in memory or
/// in the page file, inside `pages_bytes`).
pub fn validate_process(path: &Path, p: &ProcessImage) -> Result<(), ImageError> {
    let bad = |what: String| Err(inconsistent(path, what));
    if p.threads.is_empty() {
        return bad("thread list is empty".into());
    }
    let mut tids = HashSet::new();
    for t in &p.threads {
        if !tids.insert(t.tid) {
            return bad(format!("thread {} listed twice", t.tid));
        }
        if let Some(s) = t.pending.iter().find(|s| s.len() != SIGINFO_SIZE) {
            return bad(format!(
                "thread {}: pending siginfo of {} bytes, expected {SIGINFO_SIZE}",
                t.tid,
                s.len()
            ));
        }
    }
    if let Some(s) = p.shared_pending.iter().find(|s| s.len() != SIGINFO_SIZE) {
        return bad(format!(
            "shared pending siginfo of {} bytes, expected {SIGINFO_SIZE}",
            s.len()
        ));
    }
    if p.sigactions.len() > MAX_SIGNALS {
        return bad(format!(
            "{} signal actions, at most {MAX_SIGNALS}",
            p.sigactions.len()
        ));
    }
    if p.pages_file.is_empty() {
        if p.pages_bytes != 0 || p.vmas.iter().any(|v| !v.pages.is_empty()) {
            return bad("page runs listed but no page file named".into());
        }
    } else if !is_plain_name(&p.pages_file) {
        return bad(format!(
            "page file name {:?} is not a plain file name",
            p.pages_file
        ));
    }

    let mut file_ranges = Vec::new();
    let mut prev_end = 0u64;
    for (i, v) in p.vmas.iter().enumerate() {
        if v.start >= v.end || v.start % PAGE_SIZE != 0 || v.end % PAGE_SIZE != 0 {
            return bad(format!(
                "VMA {i} {:#x}-{:#x} is empty or not page aligned",
                v.start, v.end
            ));
        }
        if i > 0 && v.start < prev_end {
            return bad(format!(
                "VMA {i} {:#x}-{:#x} is not above the previous one (ends at {prev_end:#x}): unsorted or overlapping",
                v.start, v.end
            ));
        }
        prev_end = v.end;
        let mut run_end = v.start;
        for (j, r) in v.pages.iter().enumerate() {
            let len = r.npages.checked_mul(PAGE_SIZE);
            let end = len.and_then(|l| r.addr.checked_add(l));
            let Some(end) = end.filter(|_| r.npages > 0 && r.addr % PAGE_SIZE == 0) else {
                return bad(format!(
                    "VMA {:#x}-{:#x}: page run {j} at {:#x} ({} pages) is empty, misaligned or overflows",
                    v.start, v.end, r.addr, r.npages
                ));
            };
            if r.addr < v.start || end > v.end {
                return bad(format!(
                    "page run {j} {:#x}-{end:#x} lies outside its VMA {:#x}-{:#x}",
                    r.addr, v.start, v.end
                ));
            }
            if r.addr < run_end {
                return bad(format!(
                    "page run {j} at {:#x} overlaps or precedes the previous run of VMA {:#x}-{:#x}",
                    r.addr, v.start, v.end
                ));
            }
            run_end = end;
            if r.zero && r.crc32c != 0 {
                return bad(format!(
                    "zero page run at {:#x} has checksum {:#x}, expected 0",
                    r.addr, r.crc32c
                ));
            }
            if r.offset % PAGE_SIZE != 0 {
                return bad(format!(
                    "page run at {:#x}: data offset {:#x} is not page aligned",
                    r.addr, r.offset
                ));
            }
            // `end - addr` is the run length and cannot overflow here; a
            // zero run has no data (only its offset must be inside).
            let file_len = if r.zero { 0 } else { end - r.addr };
            match r.offset.checked_add(file_len) {
                Some(off_end) if off_end <= p.pages_bytes => {
                    if !r.zero {
                        file_ranges.push((r.offset, off_end, r.addr))
                    }
                }
                _ => {
                    return bad(format!(
                        "page run at {:#x}: data {:#x}+{:#x} exceeds the {} bytes of page data",
                        r.addr, r.offset, file_len, p.pages_bytes
                    ))
                }
            }
        }
    }
    file_ranges.sort_unstable();
    for w in file_ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return bad(format!(
                "page runs at {:#x} and {:#x} overlap in the page file",
                w[0].2, w[1].2
            ));
        }
    }
    Ok(())
}

/// A whole checkpoint, read and validated.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// The directory.
    pub dir: PathBuf,
    /// `inventory.img`.
    pub inventory: Inventory,
    /// Every process, in inventory order.
    pub processes: Vec<ProcessImage>,
}

impl Checkpoint {
    /// Read and validate the checkpoint in `dir`: the inventory, the core
    /// image of every listed process, and the header of every page file
    /// and file-data file, including that every page run and every blob
    /// lies inside its file. Page data and blob data themselves are checked
    /// by [`Checkpoint::verify_pages`].
    pub fn open(dir: &Path) -> Result<Checkpoint, ImageError> {
        let inventory = read_inventory(dir)?;
        let mut data: std::collections::HashMap<String, DataReader> = Default::default();
        let mut check_blob = |b: &model::Blob| -> Result<(), ImageError> {
            if b.is_empty() {
                return Ok(());
            }
            if !data.contains_key(&b.file) {
                data.insert(b.file.clone(), DataReader::open(dir, &b.file)?);
            }
            data[&b.file].check(b).map(|_| ())
        };
        for o in &inventory.files {
            o.kind.blob().map_or(Ok(()), &mut check_blob)?;
        }
        let mut processes = Vec::with_capacity(inventory.processes.len());
        for &pid in &inventory.processes {
            let p = read_process(dir, pid)?;
            if let Some(pages) = Self::pages_of(dir, &p)? {
                for r in p.vmas.iter().flat_map(|v| &v.pages) {
                    pages.run_range(r)?;
                }
                if pages.data_len() != p.pages_bytes {
                    return Err(inconsistent(
                        &dir.join(core_file_name(pid)),
                        format!(
                            "pages_bytes is {}, but {} holds {} bytes of page data",
                            p.pages_bytes,
                            p.pages_file,
                            pages.data_len()
                        ),
                    ));
                }
            }
            for e in &p.fds {
                e.kind.blob().map_or(Ok(()), &mut check_blob)?;
            }
            processes.push(p);
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            inventory,
            processes,
        })
    }

    fn pages_of(dir: &Path, p: &ProcessImage) -> Result<Option<PagesReader>, ImageError> {
        if p.pages_file.is_empty() {
            return Ok(None);
        }
        PagesReader::open_path(&dir.join(&p.pages_file)).map(Some)
    }

    /// The process with thread-group id `pid`.
    pub fn process(&self, pid: i32) -> Option<&ProcessImage> {
        self.processes.iter().find(|p| p.pid == pid)
    }

    /// Open the page file of process `p` (`None` if it has no page data).
    pub fn pages(&self, p: &ProcessImage) -> Result<Option<PagesReader>, ImageError> {
        Self::pages_of(&self.dir, p)
    }

    /// Check every page run's and every blob's CRC32C against its data
    /// (streamed, one buffer at a time).
    pub fn verify_pages(&self) -> Result<(), ImageError> {
        for p in &self.processes {
            if let Some(pages) = self.pages(p)? {
                for r in p.vmas.iter().flat_map(|v| &v.pages) {
                    pages.verify_run(r)?;
                }
            }
        }
        let fds = self
            .processes
            .iter()
            .flat_map(|p| p.fds.iter().map(|e| &e.kind));
        for b in self
            .inventory
            .files
            .iter()
            .map(|o| &o.kind)
            .chain(fds)
            .filter_map(FdKind::blob)
            .filter(|b| !b.is_empty())
        {
            self.blob_reader(b)?.verify(b)?;
        }
        Ok(())
    }

    /// Open the file-data file holding `blob` (check the blob's bounds
    /// with [`DataReader::check`] or read it with [`DataReader::reader`]).
    pub fn blob_reader(&self, blob: &model::Blob) -> Result<DataReader, ImageError> {
        DataReader::open(&self.dir, &blob.file)
    }

    /// The bytes of `blob`, checked against its CRC32C, in memory: for
    /// small blobs and tests (restore streams them instead).
    pub fn read_blob(&self, blob: &model::Blob) -> Result<Vec<u8>, ImageError> {
        if blob.is_empty() {
            return Ok(Vec::new());
        }
        let r = self.blob_reader(blob)?;
        let mut rd = r.reader(blob)?;
        let mut out = vec![0u8; usize::try_from(blob.len).unwrap_or(usize::MAX).min(1 << 30)];
        let mut at = 0;
        loop {
            if at == out.len() {
                out.resize(at + data::CHUNK, 0);
            }
            let n = rd.read_chunk(&mut out[at..])?;
            if n == 0 {
                break;
            }
            at += n;
        }
        out.truncate(at);
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! Round trips, corruption of every header field and payload region, and
    //! byte-flip fuzzing. Test fixtures are shared with `show`'s tests.

    use super::format::{offsets, MAX_CORE_PAYLOAD, MAX_INVENTORY_PAYLOAD};
    use super::model::*;
    use super::*;
    use std::ffi::OsStr;

    /// A temporary directory, removed on drop.
    pub(crate) struct TempDir(PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let p = std::env::temp_dir().join(format!(
                "pdump-image-test-{}-{tag}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("create temp dir");
            TempDir(p)
        }

        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The known content of the page at `addr` of process `pid`: every fifth
    /// page is zero, the others a pattern of address, pid and byte index.
    pub(crate) fn page_pattern(pid: i32, addr: u64) -> Vec<u8> {
        let pfn = addr / PAGE_SIZE;
        if pfn % 5 == 3 {
            return vec![0; PAGE_SIZE as usize];
        }
        (0..PAGE_SIZE as usize)
            .map(|i| (i as u8).wrapping_mul(31) ^ (pfn as u8) ^ (pid as u8).rotate_left(3))
            .collect()
    }

    fn vma(start: u64, end: u64, prot: u32, kind: VmaKind, path: Option<&str>) -> Vma {
        Vma {
            start,
            end,
            prot,
            shared: kind == VmaKind::Shmem,
            offset: 0,
            dev: if kind == VmaKind::File {
                (8, 1)
            } else {
                (0, 0)
            },
            inode: if kind == VmaKind::File { 1234 } else { 0 },
            path: path.map(str::to_string),
            kind,
            vm_flags: VmFlags::parse("rd mr mw me"),
            pages: Vec::new(),
        }
    }

    fn thread(tid: i32, fpregs_len: usize) -> ThreadState {
        ThreadState {
            tid,
            comm: format!("worker-{tid}"),
            gpr: (0..27)
                .map(|i| 0x1000_0000_0000 * u64::from(i as u8) + tid as u64)
                .collect(),
            fpregs: (0..fpregs_len)
                .map(|i| (i * 7 + tid as usize) as u8)
                .collect(),
            sigmask: 1 << 9,
            pending: vec![vec![0x5a; 128]],
            altstack: AltStack {
                sp: 0x7f00_0000_0000,
                flags: 0,
                size: 0x4000,
            },
            rseq: Some(Rseq {
                abi_pointer: 0x7f00_0000_1000,
                abi_size: 32,
                signature: 0x5305_3053,
                flags: 0,
            }),
            restart_syscall: if tid % 2 == 0 { Some(230) } else { None },
            stopped: false,
            clear_tid: 0x07f0_0000_02d0,
        }
    }

    /// A realistic process with `nthreads` threads and its page data. With
    /// `big`, threads carry a full 2696-byte xsave area and there are more
    /// VMAs, runs and fds.
    pub(crate) fn sample_process(pid: i32, nthreads: i32, big: bool) -> (ProcessImage, Vec<u8>) {
        let blobs = sample_blobs(pid, big);
        let fp = if big { 2696 } else { 8 };
        let mut vmas = vec![
            vma(
                0x40_0000,
                0x40_2000,
                5,
                VmaKind::File,
                Some("/usr/bin/victim"),
            ),
            vma(0x60_0000, 0x60_3000, 3, VmaKind::Heap, Some("[heap]")),
        ];
        // (vma index, first page index, npages)
        let mut runs = vec![(1usize, 0u64, 2u64), (1, 2, 1)];
        if big {
            vmas.push(vma(
                0x7f00_0000_0000,
                0x7f00_0001_0000,
                3,
                VmaKind::Anon,
                None,
            ));
            vmas.push(vma(
                0x7f00_0010_0000,
                0x7f00_0010_1000,
                3,
                VmaKind::Shmem,
                Some("/dev/zero (deleted)"),
            ));
            vmas.push(vma(
                0x7fff_f7fb_0000,
                0x7fff_f7fb_4000,
                1,
                VmaKind::Vvar,
                Some("[vvar]"),
            ));
            vmas.push(vma(
                0x7fff_f7fb_4000,
                0x7fff_f7fb_6000,
                5,
                VmaKind::Vdso,
                Some("[vdso]"),
            ));
            vmas.push(vma(
                0x7fff_fffd_e000,
                0x7fff_ffff_f000,
                3,
                VmaKind::Stack,
                Some("[stack]"),
            ));
            runs.extend([
                (0, 0, 1),
                (2, 0, 4),
                (2, 8, 1),
                (2, 15, 1),
                (3, 0, 1),
                (6, 31, 2),
            ]);
            runs.sort_unstable();
        }
        let mut data = Vec::new();
        for (vi, first, n) in runs {
            let addr = vmas[vi].start + first * PAGE_SIZE;
            let offset = data.len() as u64;
            let start = data.len();
            for k in 0..n {
                data.extend(page_pattern(pid, addr + k * PAGE_SIZE));
            }
            vmas[vi].pages.push(PageRun {
                addr,
                npages: n,
                offset,
                crc32c: crc32c::crc32c(&data[start..]),
                zero: false,
            });
        }
        // A zero run (no data) on a page that `page_pattern` makes all zero,
        // in the first gap between two runs of a VMA that has one.
        'zero: for v in vmas.iter_mut().filter(|v| v.kind != VmaKind::File) {
            for i in 1..v.pages.len() {
                let (prev, next) = (v.pages[i - 1], v.pages[i]);
                let mut addr = prev.addr + prev.len();
                while addr < next.addr {
                    if (addr / PAGE_SIZE) % 5 == 3 {
                        v.pages.insert(
                            i,
                            PageRun {
                                addr,
                                npages: 1,
                                offset: prev.offset + prev.file_len(),
                                crc32c: 0,
                                zero: true,
                            },
                        );
                        break 'zero;
                    }
                    addr += PAGE_SIZE;
                }
            }
        }
        let mut sigactions = vec![SigAction::default(); 64];
        sigactions[1] = SigAction {
            handler: 0x40_1000,
            flags: 0x0400_0000,
            restorer: 0x40_1100,
            mask: 0,
        };
        sigactions[12] = SigAction {
            handler: 1,
            ..SigAction::default()
        };
        let mut fds = vec![
            FdEntry {
                fd: 0,
                cloexec: false,
                flags: 0o2,
                kind: FdKind::DevNull,
            },
            FdEntry {
                fd: 1,
                cloexec: false,
                flags: 0o1,
                kind: FdKind::Pipe {
                    inode: 4242,
                    write_end: true,
                    data: blobs[0].0.clone(),
                },
            },
        ];
        if big {
            fds.extend([
                FdEntry {
                    fd: 3,
                    cloexec: true,
                    flags: 0o2,
                    kind: FdKind::Regular {
                        path: "/tmp/scratch".into(),
                        pos: 10,
                        size: 100,
                        mode: 0o100644,
                        unlinked_contents: Some(blobs[1].0.clone()),
                    },
                },
                FdEntry {
                    fd: 4,
                    cloexec: true,
                    flags: 0o4000,
                    kind: FdKind::EventFd {
                        count: 3,
                        efd_flags: 1,
                    },
                },
                FdEntry {
                    fd: 5,
                    cloexec: false,
                    flags: 0o2,
                    kind: FdKind::Memfd {
                        name: "mem".into(),
                        inode: 99,
                        pos: 0,
                        contents: blobs[2].0.clone(),
                        seals: 0,
                    },
                },
                FdEntry {
                    fd: 6,
                    cloexec: false,
                    flags: 0o200000,
                    kind: FdKind::Directory {
                        path: "/".into(),
                        pos: 0,
                    },
                },
                FdEntry {
                    fd: 7,
                    cloexec: false,
                    flags: 0,
                    kind: FdKind::Fifo {
                        path: "/tmp/fifo".into(),
                        inode: 77,
                        write_end: false,
                        data: Blob::default(),
                    },
                },
            ]);
        }
        let p = ProcessImage {
            pid,
            ppid: 1,
            pgid: pid,
            sid: pid,
            comm: "victim".into(),
            exe: "/usr/bin/victim".into(),
            cmdline: vec!["victim".into(), "--pattern".into()],
            cwd: "/tmp".into(),
            root: "/".into(),
            umask: 0o022,
            personality: 0,
            creds: Creds {
                uid: [0, 0, 0, 0],
                gid: [0, 0, 0, 0],
                groups: vec![0, 10],
                caps: [0, !0 >> 23, !0 >> 23, !0 >> 23, 0],
                no_new_privs: false,
                seccomp: 0,
            },
            rlimits: vec![
                Rlimit {
                    name: "Max open files".into(),
                    resource: 7,
                    soft: 1024,
                    hard: 4096,
                },
                Rlimit {
                    name: "Max stack size".into(),
                    resource: 3,
                    soft: 8 << 20,
                    hard: u64::MAX,
                },
            ],
            auxv: vec![(6, 4096), (25, 0x7fff_ffff_e000), (0, 0)],
            mm: MmBounds {
                start_code: 0x40_0000,
                end_code: 0x40_2000,
                start_brk: 0x60_0000,
                brk: 0x60_3000,
                start_stack: 0x7fff_ffff_e000,
                ..MmBounds::default()
            },
            coredump_filter: 0x33,
            threads: (0..nthreads).map(|i| thread(pid + i, fp)).collect(),
            sigactions,
            shared_pending: vec![vec![0xa5; 128]],
            itimers: vec![
                TimerValue {
                    interval_ns: 1_000_000,
                    value_ns: 500_000,
                },
                TimerValue::default(),
                TimerValue::default(),
            ],
            posix_timers: vec![PosixTimer {
                id: 0,
                clock: 1,
                signo: 14,
                notify: "signal".into(),
                notify_tid: pid,
                sigev_value: 0xabc,
                value: TimerValue {
                    interval_ns: 0,
                    value_ns: 1_000_000_000,
                },
                overrun: 0,
            }],
            vmas,
            fds,
            pages_file: pages_file_name(pid),
            pages_bytes: data.len() as u64,
        };
        (p, data)
    }

    /// Write a process's core image and page file.
    /// The blobs of [`sample_process`] and their bytes, in file order: pipe
    /// data, then (with `big`) unlinked file contents and memfd contents.
    pub(crate) fn sample_blobs(pid: i32, big: bool) -> Vec<(Blob, Vec<u8>)> {
        let mut bytes = vec![b"buffered".to_vec()];
        if big {
            bytes.push(vec![7; 100]);
            bytes.push(vec![1, 2, 3]);
        }
        let mut offset = 0;
        bytes
            .into_iter()
            .map(|b| {
                let blob = Blob {
                    file: file_data_name(pid),
                    offset,
                    len: b.len() as u64,
                    crc32c: crc32c::crc32c(&b),
                };
                offset += b.len() as u64;
                (blob, b)
            })
            .collect()
    }

    pub(crate) fn write_sample_process(dir: &Path, p: &ProcessImage, data: &[u8]) {
        let big = p.fds.iter().any(|e| matches!(e.kind, FdKind::Memfd { .. }));
        let mut w = DataWriter::new(dir, p.pid);
        for (blob, bytes) in sample_blobs(p.pid, big) {
            assert_eq!(w.store_stream(&mut &bytes[..]).expect("store"), blob);
        }
        w.finish().expect("finish file data");
        let f = create_pages_file(dir, p.pid).expect("create pages");
        f.write_all_at(data, PAGES_DATA_OFFSET)
            .expect("write pages");
        finish_pages_file(&f, &dir.join(pages_file_name(p.pid)), data.len() as u64)
            .expect("finish pages");
        write_process(dir, p).expect("write core");
    }

    pub(crate) fn sample_inventory(pids: &[i32]) -> Inventory {
        Inventory {
            pdump_version: "0.1.0".into(),
            arch: <pdump_arch::Native as pdump_arch::Arch>::NAME.into(),
            kernel: "6.8.0-test".into(),
            created_unix: 1_700_000_000,
            root_pid: pids[0],
            processes: pids.to_vec(),
            leave_running: true,
            page_size: PAGE_SIZE as u32,
            ..Default::default()
        }
    }

    /// Write a two-process checkpoint (pids 100 with 3 threads and 101 with
    /// one) into `dir`.
    pub(crate) fn write_sample(dir: &Path, big: bool) -> Vec<(ProcessImage, Vec<u8>)> {
        let procs = vec![sample_process(100, 3, big), sample_process(101, 1, big)];
        for (p, d) in &procs {
            write_sample_process(dir, p, d);
        }
        write_inventory(dir, &sample_inventory(&[100, 101])).expect("write inventory");
        procs
    }

    fn open_verify(dir: &Path) -> Result<Checkpoint, ImageError> {
        let cp = Checkpoint::open(dir)?;
        cp.verify_pages()?;
        Ok(cp)
    }

    fn copy_dir(from: &Path, to: &Path) {
        for e in std::fs::read_dir(from).expect("read_dir") {
            let e = e.expect("dir entry");
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    }

    /// Copy the fixture, let `f` change `file`'s bytes, and return the error
    /// opening and verifying the copy gives.
    fn corrupt(fixture: &Path, file: &str, f: impl FnOnce(&mut Vec<u8>)) -> ImageError {
        let t = TempDir::new("corrupt");
        copy_dir(fixture, t.path());
        let p = t.path().join(file);
        let mut b = std::fs::read(&p).expect("read");
        f(&mut b);
        std::fs::write(&p, &b).expect("write");
        match open_verify(t.path()) {
            Ok(_) => panic!("corrupt {file} opened fine"),
            Err(e) => {
                // Every error renders without panicking and names the file.
                let msg = e.to_string();
                assert!(msg.contains(file), "{msg}");
                e
            }
        }
    }

    /// Rewrite the header with `f` applied and a valid header CRC.
    fn reheader(b: &mut [u8], f: impl FnOnce(&mut Header)) {
        let mut raw = [0u8; HEADER_SIZE];
        raw.copy_from_slice(&b[..HEADER_SIZE]);
        let mut h = Header::from_bytes(&raw);
        f(&mut h);
        h.header_crc = crc32c::crc32c(&h.to_bytes()[..28]);
        b[..HEADER_SIZE].copy_from_slice(&h.to_bytes());
    }

    /// Replace the payload (everything after the header) and fix both CRCs.
    fn reframe(b: &mut Vec<u8>, payload: &[u8]) {
        b.truncate(HEADER_SIZE);
        b.extend_from_slice(payload);
        let crc = crc32c::crc32c(payload);
        reheader(b, |h| {
            h.payload_len = payload.len() as u64;
            h.payload_crc = crc;
        });
    }

    fn assert_file(e: &ImageError, file: &str) {
        assert_eq!(e.path().file_name(), Some(OsStr::new(file)), "{e}");
    }

    #[test]
    fn zero_runs_have_no_data_and_read_as_zeros() {
        let t = TempDir::new("zero-runs");
        write_sample(t.path(), true);
        let cp = open_verify(t.path()).unwrap();
        let p = &cp.processes[0];
        let z = *p
            .vmas
            .iter()
            .flat_map(|v| &v.pages)
            .find(|r| r.zero)
            .expect("the sample has a zero run");
        assert_eq!((z.file_len(), z.len()), (0, z.npages * PAGE_SIZE));
        let pages = cp.pages(p).unwrap().unwrap();
        assert_eq!(pages.run_range(&z).unwrap().1, 0);
        assert_eq!(pages.read_run(&z).unwrap(), vec![0u8; z.len() as usize]);
        let mut n = 0;
        pages
            .for_each_page(&z, |addr, page| {
                assert_eq!(addr, z.addr + n * PAGE_SIZE);
                assert!(page.iter().all(|&b| b == 0));
                n += 1;
            })
            .unwrap();
        assert_eq!(n, z.npages);
        // A zero run must carry checksum 0.
        let e = open_altered(t.path(), |p| {
            for r in p.vmas.iter_mut().flat_map(|v| v.pages.iter_mut()) {
                if r.zero {
                    r.crc32c = 1;
                }
            }
        });
        assert!(e.to_string().contains("zero page run"), "{e}");
    }

    #[test]
    fn round_trip_every_kind() {
        let t = TempDir::new("roundtrip");
        let procs = write_sample(t.path(), true);
        // Nothing but the final files: no temporaries left behind.
        let mut names: Vec<String> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "core-100.img",
                "core-101.img",
                "files-100.img",
                "files-101.img",
                "inventory.img",
                "pages-100.img",
                "pages-101.img"
            ]
        );

        assert_eq!(
            read_inventory(t.path()).unwrap(),
            sample_inventory(&[100, 101])
        );
        for (p, data) in &procs {
            let back = read_process(t.path(), p.pid).unwrap();
            assert_eq!(&back, p);
            assert_eq!(back.threads[0].fpregs.len(), 2696);
            let pages = PagesReader::open(t.path(), p.pid).unwrap();
            assert_eq!(pages.data_len(), data.len() as u64);
            let map = pages.map().unwrap();
            assert_eq!(&map[..], &data[..]);
            for r in p.vmas.iter().flat_map(|v| &v.pages) {
                let (off, len) = pages.run_range(r).unwrap();
                assert_eq!(off % PAGE_SIZE, 0);
                assert_eq!(len, r.file_len());
                let bytes = pages.read_run(r).unwrap();
                assert_eq!(bytes.len() as u64, r.len());
                if !r.zero {
                    assert_eq!(&map[r.offset as usize..][..len as usize], &bytes[..]);
                }
                for (k, page) in bytes.chunks(PAGE_SIZE as usize).enumerate() {
                    assert_eq!(
                        page,
                        &page_pattern(p.pid, r.addr + k as u64 * PAGE_SIZE)[..]
                    );
                }
            }
            // The page file header is a valid 4096-byte header page.
            let raw = std::fs::read(t.path().join(pages_file_name(p.pid))).unwrap();
            let h = Header::validate(
                raw[..32].try_into().unwrap(),
                FileKind::Pages,
                Path::new("p"),
            )
            .unwrap();
            assert_eq!(h.flags, format::FLAG_RUN_CRCS);
            assert_eq!(h.payload_crc, 0);
            assert_eq!(raw.len() as u64, PAGES_DATA_OFFSET + data.len() as u64);
        }
        let cp = open_verify(t.path()).unwrap();
        assert_eq!(cp.processes.len(), 2);
        assert_eq!(cp.process(101).unwrap(), &procs[1].0);
    }

    #[test]
    fn writes_are_atomic_and_limited() {
        let t = TempDir::new("limits");
        // A pages file is invisible under its final name until finished.
        let f = create_pages_file(t.path(), 7).unwrap();
        assert!(!t.path().join(pages_file_name(7)).exists());
        f.write_all_at(&[1u8; 4096], PAGES_DATA_OFFSET).unwrap();
        let final_path = t.path().join(pages_file_name(7));
        let e = finish_pages_file(&f, &final_path, 8192).unwrap_err();
        assert!(matches!(e, ImageError::Inconsistent { .. }), "{e}");
        assert!(!final_path.exists());
        finish_pages_file(&f, &final_path, 4096).unwrap();
        assert!(final_path.exists());
        // Finishing again in place is harmless.
        finish_pages_file(&f, &final_path, 4096).unwrap();
        assert_eq!(PagesReader::open(t.path(), 7).unwrap().data_len(), 4096);

        // Over the inventory limit: refused at write time, nothing left.
        let mut inv = sample_inventory(&[1]);
        inv.kernel = "x".repeat(MAX_INVENTORY_PAYLOAD as usize + 1);
        let e = write_inventory(t.path(), &inv).unwrap_err();
        assert!(
            matches!(
                e,
                ImageError::TooLarge {
                    limit: MAX_INVENTORY_PAYLOAD,
                    ..
                }
            ),
            "{e}"
        );
        let left: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [OsStr::new("pages-7.img")]);
    }

    #[test]
    fn corruption_is_reported_with_file_and_offset() {
        let fixture = TempDir::new("fixture");
        let procs = write_sample(fixture.path(), true);
        let fx = fixture.path();
        let core = "core-100.img";
        let core_len = std::fs::metadata(fx.join(core)).unwrap().len();
        let payload_len = core_len - HEADER_SIZE as u64;

        // Magic, in every file kind.
        for file in [INVENTORY_FILE, core, "pages-101.img"] {
            let e = corrupt(fx, file, |b| b[1] ^= 0xff);
            assert!(matches!(e, ImageError::BadMagic { offset: 0, .. }), "{e}");
            assert_file(&e, file);
        }
        // A core image where the inventory should be.
        let core_bytes = std::fs::read(fx.join(core)).unwrap();
        let e = corrupt(fx, INVENTORY_FILE, |b| *b = core_bytes.clone());
        assert!(
            matches!(e, ImageError::BadMagic { found, .. } if found == FileKind::Core.magic()),
            "{e}"
        );
        assert!(e.to_string().contains("process core image"), "{e}");
        // The other arch.
        let other = if format::ARCH_CODE == 62 { 183 } else { 62 };
        let e = corrupt(fx, core, |b| b[3] = other);
        assert!(
            matches!(e, ImageError::WrongArch { offset: 3, found, .. } if found == other),
            "{e}"
        );
        assert_file(&e, core);

        // Version: major, newer minor (raw bytes: checked before the header CRC).
        let e = corrupt(fx, core, |b| b[4] ^= 0x01);
        assert!(matches!(e, ImageError::Version { offset: 4, .. }), "{e}");
        let e = corrupt(fx, core, |b| b[6] = b[6].wrapping_add(1));
        assert!(
            matches!(
                e,
                ImageError::Version {
                    offset: 4,
                    minor: 1,
                    ..
                }
            ),
            "{e}"
        );

        // Any other header byte flipped: the header CRC catches it.
        for (i, what) in [
            (8, "flags"),
            (12, "reserved"),
            (16, "len"),
            (23, "len"),
            (24, "pcrc"),
            (29, "hcrc"),
        ] {
            let e = corrupt(fx, core, |b| b[i] ^= 0x10);
            assert!(
                matches!(
                    e,
                    ImageError::Checksum {
                        offset: 0,
                        len: 28,
                        what: "header",
                        ..
                    }
                ),
                "{what}: {e}"
            );
            assert_file(&e, core);
        }
        // The same fields, rewritten with a valid header CRC.
        let e = corrupt(fx, core, |b| reheader(b, |h| h.flags = 2));
        assert!(
            matches!(
                e,
                ImageError::Flags {
                    offset: offsets::FLAGS,
                    found: 2,
                    expected: 0,
                    ..
                }
            ),
            "{e}"
        );
        let e = corrupt(fx, core, |b| reheader(b, |h| h.reserved = 1));
        assert!(
            matches!(
                e,
                ImageError::BadHeader {
                    offset: offsets::RESERVED,
                    ..
                }
            ),
            "{e}"
        );
        let e = corrupt(fx, core, |b| {
            reheader(b, |h| h.payload_len = MAX_CORE_PAYLOAD + 1)
        });
        assert!(
            matches!(
                e,
                ImageError::TooLarge {
                    offset: offsets::PAYLOAD_LEN,
                    limit: MAX_CORE_PAYLOAD,
                    ..
                }
            ),
            "{e}"
        );
        let e = corrupt(fx, INVENTORY_FILE, |b| {
            reheader(b, |h| h.payload_len = u64::MAX)
        });
        assert!(
            matches!(
                e,
                ImageError::TooLarge {
                    limit: MAX_INVENTORY_PAYLOAD,
                    ..
                }
            ),
            "{e}"
        );
        let e = corrupt(fx, core, |b| reheader(b, |h| h.payload_len += 10));
        assert!(
            matches!(e, ImageError::Truncated { offset, need, .. } if offset == core_len && need == core_len + 10),
            "{e}"
        );
        let e = corrupt(fx, core, |b| reheader(b, |h| h.payload_len -= 1));
        assert!(
            matches!(e, ImageError::TrailingBytes { offset, count: 1, .. } if offset == core_len - 1),
            "{e}"
        );
        let e = corrupt(fx, core, |b| reheader(b, |h| h.payload_crc ^= 1));
        assert!(
            matches!(e, ImageError::Checksum { offset: 32, what: "payload", len, .. } if len == payload_len),
            "{e}"
        );

        // Payload bytes at the start, middle and end.
        for at in [HEADER_SIZE, core_len as usize / 2, core_len as usize - 1] {
            let e = corrupt(fx, core, |b| b[at] ^= 0x01);
            assert!(
                matches!(
                    e,
                    ImageError::Checksum {
                        offset: 32,
                        what: "payload",
                        ..
                    }
                ),
                "{at}: {e}"
            );
            assert_file(&e, core);
        }
        // A payload that passes its CRC but ends early: a decode error inside it.
        let e = corrupt(fx, core, |b| {
            let cut = b[HEADER_SIZE..b.len() / 2].to_vec();
            reframe(b, &cut);
        });
        match e {
            ImageError::Decode { offset, .. } => {
                assert!((32..=core_len / 2).contains(&offset), "{offset}")
            }
            e => panic!("{e}"),
        }
        // A payload with a byte too many.
        let e = corrupt(fx, core, |b| {
            let mut p = b[HEADER_SIZE..].to_vec();
            p.push(0);
            reframe(b, &p);
        });
        assert!(
            matches!(e, ImageError::TrailingBytes { offset, count: 1, .. } if offset == core_len),
            "{e}"
        );

        // Truncation: empty, inside the header, inside the payload.
        let e = corrupt(fx, core, Vec::clear);
        assert!(
            matches!(
                e,
                ImageError::Truncated {
                    offset: 0,
                    need: 32,
                    ..
                }
            ),
            "{e}"
        );
        let e = corrupt(fx, INVENTORY_FILE, |b| b.truncate(20));
        assert!(
            matches!(
                e,
                ImageError::Truncated {
                    offset: 20,
                    need: 32,
                    ..
                }
            ),
            "{e}"
        );
        assert_file(&e, INVENTORY_FILE);
        let e = corrupt(fx, core, |b| b.truncate(100));
        assert!(
            matches!(e, ImageError::Truncated { offset: 100, need, .. } if need == core_len),
            "{e}"
        );

        // Page file: header, padding, size, data.
        let pages = "pages-100.img";
        let data_len = procs[0].1.len() as u64;
        let e = corrupt(fx, pages, |b| b[30] ^= 1);
        assert!(
            matches!(
                e,
                ImageError::Checksum {
                    offset: 0,
                    what: "header",
                    ..
                }
            ),
            "{e}"
        );
        assert_file(&e, pages);
        let e = corrupt(fx, pages, |b| reheader(b, |h| h.flags = 0));
        assert!(
            matches!(
                e,
                ImageError::Flags {
                    found: 0,
                    expected: 1,
                    ..
                }
            ),
            "{e}"
        );
        let e = corrupt(fx, pages, |b| reheader(b, |h| h.payload_crc = 5));
        assert!(
            matches!(
                e,
                ImageError::BadHeader {
                    offset: offsets::PAYLOAD_CRC,
                    ..
                }
            ),
            "{e}"
        );
        let e = corrupt(fx, pages, |b| b[100] = 1);
        assert!(
            matches!(e, ImageError::BadHeader { offset: 100, .. }),
            "{e}"
        );
        let e = corrupt(fx, pages, |b| b.truncate(1000));
        assert!(
            matches!(e, ImageError::Truncated { offset: 1000, .. }),
            "{e}"
        );
        let e = corrupt(fx, pages, |b| b.truncate(b.len() - 4096));
        assert!(
            matches!(e, ImageError::Truncated { offset, need, .. }
                if offset == PAGES_DATA_OFFSET + data_len - 4096 && need == PAGES_DATA_OFFSET + data_len),
            "{e}"
        );
        let e = corrupt(fx, pages, |b| b.extend_from_slice(&[0; 4096]));
        assert!(
            matches!(e, ImageError::TrailingBytes { count: 4096, .. }),
            "{e}"
        );
        // Data: one byte in each run flips that run's checksum.
        for r in procs[0]
            .0
            .vmas
            .iter()
            .flat_map(|v| &v.pages)
            .filter(|r| !r.zero)
        {
            let at = (PAGES_DATA_OFFSET + r.offset + r.npages * PAGE_SIZE - 1) as usize;
            let e = corrupt(fx, pages, |b| b[at] ^= 0x80);
            assert!(
                matches!(e, ImageError::PageRunChecksum { offset, addr, .. }
                    if offset == PAGES_DATA_OFFSET + r.offset && addr == r.addr),
                "{e}"
            );
            assert_file(&e, pages);
        }

        // Missing files.
        for file in [INVENTORY_FILE, "core-101.img", "pages-100.img"] {
            let t = TempDir::new("missing");
            copy_dir(fx, t.path());
            std::fs::remove_file(t.path().join(file)).unwrap();
            let e = open_verify(t.path()).unwrap_err();
            assert!(matches!(e, ImageError::Missing { .. }), "{e}");
            assert_file(&e, file);
        }
    }

    /// Write `p` (altered) over process 100 of a copy of the fixture and open it.
    fn open_altered(fixture: &Path, alter: impl FnOnce(&mut ProcessImage)) -> ImageError {
        let t = TempDir::new("altered");
        copy_dir(fixture, t.path());
        let mut p = read_process(t.path(), 100).unwrap();
        alter(&mut p);
        write_process(t.path(), &p).unwrap();
        let e = open_verify(t.path()).unwrap_err();
        let _ = e.to_string();
        e
    }

    #[test]
    fn blobs_are_read_back_and_checked() {
        let fixture = TempDir::new("fixture-blobs");
        write_sample(fixture.path(), true);
        let fx = fixture.path();
        let cp = open_verify(fx).unwrap();
        for p in &cp.processes {
            let blobs = sample_blobs(p.pid, true);
            let got: Vec<Vec<u8>> = p
                .fds
                .iter()
                .filter_map(|e| e.kind.blob())
                .filter(|b| !b.is_empty())
                .map(|b| cp.read_blob(b).unwrap())
                .collect();
            let want: Vec<Vec<u8>> = blobs.into_iter().map(|(_, b)| b).collect();
            assert_eq!(got, want);
        }
        // A flipped data byte fails its blob's checksum.
        let e = corrupt(fx, "files-100.img", |b| b[4096 + 9] ^= 1);
        assert!(matches!(e, ImageError::BlobChecksum { .. }), "{e}");
        assert_file(&e, "files-100.img");
        // A missing or foreign file-data file.
        let e = corrupt(fx, "files-101.img", |b| b[2] = b'P');
        assert!(matches!(e, ImageError::BadMagic { offset: 0, .. }), "{e}");
        // A blob past the end of its file's data, or naming another directory.
        let e = open_altered(fx, |p| {
            if let Some(FdEntry {
                kind: FdKind::Pipe { data, .. },
                ..
            }) = p.fds.get_mut(1)
            {
                data.len += 1 << 20;
            }
        });
        assert!(matches!(e, ImageError::BlobOutOfBounds { .. }), "{e}");
        let e = open_altered(fx, |p| {
            if let Some(FdEntry {
                kind: FdKind::Pipe { data, .. },
                ..
            }) = p.fds.get_mut(1)
            {
                data.file = "../files-100.img".into();
            }
        });
        assert!(matches!(e, ImageError::Inconsistent { .. }), "{e}");
    }

    #[test]
    fn inconsistent_models_are_rejected() {
        let fixture = TempDir::new("fixture-model");
        write_sample(fixture.path(), true);
        let fx = fixture.path();
        let expect = |e: ImageError, file: &str, needle: &str| {
            assert!(matches!(e, ImageError::Inconsistent { .. }), "{e}");
            assert_file(&e, file);
            assert!(e.to_string().contains(needle), "{e}");
        };
        let core = "core-100.img";
        expect(
            open_altered(fx, |p| p.threads.clear()),
            core,
            "thread list is empty",
        );
        expect(
            open_altered(fx, |p| {
                let t = p.threads[0].clone();
                p.threads.push(t)
            }),
            core,
            "listed twice",
        );
        expect(
            open_altered(fx, |p| p.vmas.swap(0, 1)),
            core,
            "unsorted or overlapping",
        );
        expect(
            open_altered(fx, |p| p.vmas[1].end = p.vmas[2].start + PAGE_SIZE),
            core,
            "unsorted or overlapping",
        );
        expect(
            open_altered(fx, |p| p.vmas[1].pages[1].addr = p.vmas[1].end),
            core,
            "outside its VMA",
        );
        expect(
            open_altered(fx, |p| {
                p.vmas[1].pages[1].addr = p.vmas[1].start + PAGE_SIZE
            }),
            core,
            "overlaps",
        );
        expect(
            open_altered(fx, |p| p.vmas[1].pages[1].offset = 0),
            core,
            "overlap in the page file",
        );
        expect(
            open_altered(fx, |p| p.vmas[1].pages[1].offset += 1),
            core,
            "not page aligned",
        );
        expect(
            open_altered(fx, |p| p.vmas[1].pages[1].npages = u64::MAX),
            core,
            "overflows",
        );
        expect(
            open_altered(fx, |p| p.pages_file = "../pages-100.img".into()),
            core,
            "plain file name",
        );
        expect(
            open_altered(fx, |p| p.pages_bytes += PAGE_SIZE),
            core,
            "pages_bytes",
        );
        expect(
            open_altered(fx, |p| p.pages_bytes -= PAGE_SIZE),
            core,
            "exceeds",
        );
        expect(
            open_altered(fx, |p| p.shared_pending.push(vec![0; 3])),
            core,
            "siginfo",
        );
        // A run inside pages_bytes but beyond what the page file holds.
        let e = open_altered(fx, |p| {
            let last_vma = p
                .vmas
                .iter()
                .rposition(|v| v.kind == VmaKind::Anon)
                .unwrap();
            let v = &mut p.vmas[last_vma];
            let addr = v.start + 10 * PAGE_SIZE;
            let at = v.pages.partition_point(|r| r.addr < addr);
            v.pages.insert(
                at,
                PageRun {
                    addr,
                    npages: 1,
                    offset: p.pages_bytes,
                    crc32c: 0,
                    zero: false,
                },
            );
            p.pages_bytes += PAGE_SIZE;
        });
        assert!(
            matches!(e, ImageError::PageRunOutOfBounds { offset, .. } if offset % PAGE_SIZE == 0),
            "{e}"
        );
        assert_file(&e, "pages-100.img");

        // A core image holding another pid.
        let t = TempDir::new("pid");
        copy_dir(fx, t.path());
        std::fs::copy(t.path().join("core-100.img"), t.path().join("core-101.img")).unwrap();
        expect(
            open_verify(t.path()).unwrap_err(),
            "core-101.img",
            "holds pid 100",
        );

        // Inventory contents.
        for (alter, needle) in [
            (
                Box::new(|i: &mut Inventory| i.processes.clear()) as Box<dyn Fn(&mut Inventory)>,
                "no processes",
            ),
            (
                Box::new(|i: &mut Inventory| i.processes.push(100)),
                "listed twice",
            ),
            (Box::new(|i: &mut Inventory| i.root_pid = 5), "root pid"),
            (
                Box::new(|i: &mut Inventory| i.page_size = 65536),
                "page size",
            ),
        ] {
            let t = TempDir::new("inv");
            copy_dir(fx, t.path());
            let mut inv = read_inventory(t.path()).unwrap();
            alter(&mut inv);
            write_inventory(t.path(), &inv).unwrap();
            expect(open_verify(t.path()).unwrap_err(), INVENTORY_FILE, needle);
        }
    }

    #[test]
    fn byte_flips_never_panic() {
        let t = TempDir::new("fuzz");
        let (p, data) = sample_process(100, 1, false);
        write_sample_process(t.path(), &p, &data);
        write_inventory(t.path(), &sample_inventory(&[100])).unwrap();
        assert!(open_verify(t.path()).is_ok());
        let path = t.path().join("core-100.img");
        let orig = std::fs::read(&path).unwrap();

        // Every byte flipped as is: always an error (CRCs).
        for i in 0..orig.len() {
            let mut b = orig.clone();
            b[i] ^= 0xff;
            std::fs::write(&path, &b).unwrap();
            assert!(Checkpoint::open(t.path()).is_err(), "byte {i}");
        }
        // Every truncation: always an error.
        for n in 0..orig.len() {
            std::fs::write(&path, &orig[..n]).unwrap();
            let e = Checkpoint::open(t.path()).unwrap_err();
            assert_eq!(e.path(), path, "{e}");
        }
        // Every payload byte set to edge values with valid CRCs: this reaches
        // the decoder and the validation; either outcome is fine, no panic.
        let mut decoded = 0;
        for i in HEADER_SIZE..orig.len() {
            for v in [0x00u8, 0x01, 0x7f, 0x80, 0xff, orig[i] ^ 0x01] {
                let mut b = orig.clone();
                let mut payload = b[HEADER_SIZE..].to_vec();
                payload[i - HEADER_SIZE] = v;
                reframe(&mut b, &payload);
                std::fs::write(&path, &b).unwrap();
                match Checkpoint::open(t.path()).and_then(|cp| cp.verify_pages().map(|_| cp)) {
                    Ok(cp) => {
                        decoded += 1;
                        let _ = super::show::render_text(&cp);
                        let _ = super::show::render_json(&cp, true);
                    }
                    Err(e) => {
                        let _ = e.to_string();
                        assert!(
                            e.offset().is_none_or(|o| o
                                <= (b.len() as u64).max(PAGES_DATA_OFFSET + data.len() as u64)),
                            "{e}"
                        );
                    }
                }
            }
        }
        assert!(decoded > 0);
    }
}
