//! File-data files (`files-<pid>.img`): the bytes of memfds, unlinked files
//! and pipe buffers of one process, which the model only points at
//! ([`Blob`]).
//!
//! ```text
//! 0        32                    4096                       4096 + payload_len
//! | header | zero padding        | data (payload_len bytes) ...               |
//! ```
//!
//! The layout is a page file's ([`FileKind::FileData`], `RUN_CRCS` set,
//! payload CRC 0): each blob is `len` bytes at data offset `offset`, checked
//! by its own CRC32C. Blobs follow each other without padding. Both sides
//! move the bytes through one [`CHUNK`]-sized buffer, so a 1 GiB memfd costs
//! the dumper and the restorer 1 MiB, not 1 GiB; holes of the source file
//! (`SEEK_DATA`/`SEEK_HOLE`) and all-zero chunks are not written, so a sparse
//! memfd stays sparse in the image.

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{self, FileKind, PAGES_DATA_OFFSET};
use super::model::Blob;
use super::{inconsistent, io_err, open_paged, partial_path, ImageError};

/// Bytes moved per read and write when storing or reading back a blob.
pub const CHUNK: usize = 1 << 20;

/// Name of the file-data file of process `pid`.
pub fn file_data_name(pid: i32) -> String {
    format!("files-{pid}.img")
}

/// Where the contents read from a task's files go: each call stores one
/// blob and says where it is.
pub trait DataSink {
    /// Store file `src` from offset 0 to its size at the time of the call
    /// (read with `pread`; the file's holes are found with
    /// `lseek(SEEK_DATA/SEEK_HOLE)`, which moves `src`'s offset: pass a
    /// description of your own, never one shared with the task).
    fn store_file(&mut self, src: &File) -> io::Result<Blob>;

    /// Store everything `src` yields until end of file.
    fn store_stream(&mut self, src: &mut dyn Read) -> io::Result<Blob>;
}

/// Writes the file-data file of one process, created on the first
/// non-empty blob (a process without any leaves no file). It lives under
/// a hidden temporary name until [`DataWriter::finish`]; dropped
/// unfinished, it removes that file.
#[derive(Debug)]
pub struct DataWriter {
    /// The final path, `dir/files-<pid>.img`.
    path: PathBuf,
    name: String,
    file: Option<File>,
    /// Data bytes so far.
    len: u64,
    buf: Vec<u8>,
    finished: bool,
}

impl DataWriter {
    /// A writer for `dir/files-<pid>.img` (nothing is created yet).
    pub fn new(dir: &Path, pid: i32) -> DataWriter {
        let name = file_data_name(pid);
        DataWriter {
            path: dir.join(&name),
            name,
            file: None,
            len: 0,
            buf: Vec::new(),
            finished: false,
        }
    }

    /// Bytes of data stored so far.
    pub fn data_len(&self) -> u64 {
        self.len
    }

    /// The partial file and the chunk buffer, made the first time.
    fn open(&mut self) -> io::Result<(&File, &mut [u8])> {
        if self.file.is_none() {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(partial_path(&self.path))?;
            f.set_len(PAGES_DATA_OFFSET)?;
            self.file = Some(f);
            self.buf = vec![0u8; CHUNK];
        }
        Ok((self.file.as_ref().expect("just made"), &mut self.buf))
    }

    fn blob(&self, offset: u64, len: u64, crc32c: u32) -> Blob {
        Blob {
            file: self.name.clone(),
            offset,
            len,
            crc32c,
        }
    }

    /// Write the header and move the file to its final name (nothing if no
    /// blob was stored). Does not fsync.
    pub fn finish(mut self) -> Result<(), ImageError> {
        self.finished = true;
        let Some(f) = self.file.as_ref() else {
            return Ok(());
        };
        let path = &self.path;
        f.set_len(PAGES_DATA_OFFSET + self.len)
            .map_err(io_err("truncate", path))?;
        f.write_all_at(&format::file_data_header(self.len).to_bytes(), 0)
            .map_err(io_err("write", path))?;
        std::fs::rename(partial_path(path), path).map_err(io_err("rename", path))
    }
}

impl Drop for DataWriter {
    fn drop(&mut self) {
        if self.file.is_some() && !self.finished {
            let _ = std::fs::remove_file(partial_path(&self.path));
        }
    }
}

/// `crc` extended by `n` zero bytes, in O(log n) for large `n`.
pub(crate) fn crc_append_zeros(crc: u32, n: u64) -> u32 {
    const Z: [u8; 4096] = [0; 4096];
    let mut crc = crc;
    let mut blocks = n / Z.len() as u64;
    let mut block = crc32c::crc32c(&Z);
    let mut block_len = Z.len();
    while blocks > 0 {
        if blocks & 1 == 1 {
            crc = crc32c::crc32c_combine(crc, block, block_len);
        }
        blocks >>= 1;
        if blocks > 0 {
            block = crc32c::crc32c_combine(block, block, block_len);
            block_len *= 2;
        }
    }
    crc32c::crc32c_append(crc, &Z[..(n % Z.len() as u64) as usize])
}

/// The next data extent `[start, end)` of `f` at or after `pos`, clipped to
/// `size` (`(size, size)` when there is none); the whole rest when the file
/// system cannot tell holes.
fn data_extent(f: &File, pos: u64, size: u64) -> io::Result<(u64, u64)> {
    let seek = |at: u64, whence| -> io::Result<Option<u64>> {
        let at = libc::off_t::try_from(at).map_err(|_| io::Error::other("offset too large"))?;
        // SAFETY: lseek takes integers; `f` is an open file.
        let r = unsafe { libc::lseek(f.as_raw_fd(), at, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some(at as u64)),
            _ => Err(e),
        }
    };
    let Some(start) = seek(pos, libc::SEEK_DATA)? else {
        return Ok((size, size));
    };
    let start = start.clamp(pos, size);
    let end = match seek(start, libc::SEEK_HOLE)? {
        Some(h) if h > start => h.min(size),
        _ => size,
    };
    Ok((start, end))
}

impl DataSink for DataWriter {
    fn store_file(&mut self, src: &File) -> io::Result<Blob> {
        let size = src.metadata()?.len();
        if size == 0 {
            return Ok(Blob::default());
        }
        let start = self.len;
        let (out, buf) = self.open()?;
        let mut crc = 0u32;
        let mut pos = 0u64;
        while pos < size {
            let (data, hole) = data_extent(src, pos, size)?;
            crc = crc_append_zeros(crc, data - pos);
            let mut at = data;
            while at < hole {
                let n = (hole - at).min(CHUNK as u64) as usize;
                let chunk = &mut buf[..n];
                src.read_exact_at(chunk, at).map_err(|e| {
                    if e.kind() == ErrorKind::UnexpectedEof {
                        io::Error::other(format!("the file shrank below {size} bytes while read"))
                    } else {
                        e
                    }
                })?;
                crc = crc32c::crc32c_append(crc, chunk);
                if chunk.iter().any(|&b| b != 0) {
                    out.write_all_at(chunk, PAGES_DATA_OFFSET + start + at)?;
                }
                at += n as u64;
            }
            pos = hole;
        }
        self.len = start + size;
        Ok(self.blob(start, size, crc))
    }

    fn store_stream(&mut self, src: &mut dyn Read) -> io::Result<Blob> {
        let start = self.len;
        let mut len = 0u64;
        let mut crc = 0u32;
        // Nothing is created for an empty stream.
        let mut first = [0u8; 1];
        let n = loop {
            match src.read(&mut first) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        if n == 0 {
            return Ok(Blob::default());
        }
        let (out, buf) = self.open()?;
        out.write_all_at(&first, PAGES_DATA_OFFSET + start)?;
        crc = crc32c::crc32c_append(crc, &first);
        len += 1;
        loop {
            let n = match src.read(buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            out.write_all_at(&buf[..n], PAGES_DATA_OFFSET + start + len)?;
            len += n as u64;
        }
        self.len = start + len;
        Ok(self.blob(start, len, crc))
    }
}

/// A validated file-data file, open for reading blobs.
#[derive(Debug)]
pub struct DataReader {
    path: PathBuf,
    file: File,
    data_len: u64,
}

impl DataReader {
    /// Open and validate `dir/name` (a plain file name, as in [`Blob::file`]).
    pub fn open(dir: &Path, name: &str) -> Result<DataReader, ImageError> {
        if !plain_name(name) {
            return Err(inconsistent(
                dir,
                format!("blob file name {name:?} is not a plain file name"),
            ));
        }
        let path = dir.join(name);
        let (file, data_len) = open_paged(&path, FileKind::FileData)?;
        Ok(DataReader {
            path,
            file,
            data_len,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of data in the file.
    pub fn data_len(&self) -> u64 {
        self.data_len
    }

    /// Check that `blob` lies inside the data; its file offset.
    pub fn check(&self, blob: &Blob) -> Result<u64, ImageError> {
        let offset = PAGES_DATA_OFFSET.saturating_add(blob.offset);
        match blob.offset.checked_add(blob.len) {
            Some(end) if end <= self.data_len => Ok(offset),
            _ => Err(ImageError::BlobOutOfBounds {
                path: self.path.clone(),
                offset,
                len: blob.len,
                data_len: self.data_len,
            }),
        }
    }

    /// A reader of `blob`'s bytes, in order, checked against its CRC32C.
    pub fn reader<'a>(&'a self, blob: &'a Blob) -> Result<BlobRead<'a>, ImageError> {
        self.check(blob)?;
        Ok(BlobRead {
            data: self,
            blob,
            done: 0,
            crc: 0,
        })
    }

    /// Check `blob`'s bounds and CRC32C, streaming it.
    pub fn verify(&self, blob: &Blob) -> Result<(), ImageError> {
        let mut r = self.reader(blob)?;
        let mut buf = vec![0u8; CHUNK.min(blob.len as usize)];
        while r.read_chunk(&mut buf)? > 0 {}
        Ok(())
    }
}

/// Whether `name` names a file directly in the checkpoint directory.
pub(crate) fn plain_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && !name.starts_with('.')
}

/// The bytes of one blob, read in order ([`DataReader::reader`]).
#[derive(Debug)]
pub struct BlobRead<'a> {
    data: &'a DataReader,
    blob: &'a Blob,
    done: u64,
    crc: u32,
}

impl BlobRead<'_> {
    /// Read the next bytes of the blob into `buf` (at most its length);
    /// `Ok(0)` at the end, once the whole blob matched its CRC32C
    /// ([`ImageError::BlobChecksum`] otherwise: the bytes already returned
    /// are then known bad).
    pub fn read_chunk(&mut self, buf: &mut [u8]) -> Result<usize, ImageError> {
        let left = self.blob.len - self.done;
        let offset = PAGES_DATA_OFFSET + self.blob.offset;
        if left == 0 {
            if self.crc != self.blob.crc32c {
                return Err(ImageError::BlobChecksum {
                    path: self.data.path.clone(),
                    offset,
                    len: self.blob.len,
                    stored: self.blob.crc32c,
                    computed: self.crc,
                });
            }
            return Ok(0);
        }
        if buf.is_empty() {
            return Err(io_err("read", &self.data.path)(io::Error::other(
                "empty buffer for a non-empty blob",
            )));
        }
        let n = left.min(buf.len() as u64) as usize;
        let at = offset + self.done;
        self.data
            .file
            .read_exact_at(&mut buf[..n], at)
            .map_err(|source| {
                if source.kind() == ErrorKind::UnexpectedEof {
                    ImageError::Truncated {
                        path: self.data.path.clone(),
                        offset: at,
                        need: PAGES_DATA_OFFSET + self.data.data_len,
                    }
                } else {
                    io_err("read", &self.data.path)(source)
                }
            })?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.done += n as u64;
        Ok(n)
    }

    /// Bytes already returned.
    pub fn position(&self) -> u64 {
        self.done
    }
}

/// Keeps blobs in memory: for tests of code that reads a task's files
/// ([`DataSink`]). The blobs it returns name the file `"mem"` and their
/// offset is an index into [`MemSink::bytes`].
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct MemSink {
    pub(crate) stored: Vec<Vec<u8>>,
}

#[cfg(test)]
impl MemSink {
    /// The bytes of a blob this sink returned (empty for an empty blob).
    pub(crate) fn bytes(&self, b: &Blob) -> &[u8] {
        if b.is_empty() {
            return &[];
        }
        assert_eq!(b.file, "mem");
        &self.stored[b.offset as usize]
    }

    fn keep(&mut self, v: Vec<u8>) -> Blob {
        if v.is_empty() {
            return Blob::default();
        }
        self.stored.push(v);
        let v = self.stored.last().expect("just pushed");
        Blob {
            file: "mem".into(),
            offset: (self.stored.len() - 1) as u64,
            len: v.len() as u64,
            crc32c: crc32c::crc32c(v),
        }
    }
}

#[cfg(test)]
impl DataSink for MemSink {
    fn store_file(&mut self, src: &File) -> io::Result<Blob> {
        let size = src.metadata()?.len();
        let mut v = vec![0u8; size as usize];
        src.read_exact_at(&mut v, 0)?;
        Ok(self.keep(v))
    }

    fn store_stream(&mut self, src: &mut dyn Read) -> io::Result<Blob> {
        let mut v = Vec::new();
        src.read_to_end(&mut v)?;
        Ok(self.keep(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::tests::TempDir;

    #[test]
    fn zeros_crc_matches_the_bytes() {
        for n in [
            0u64,
            1,
            4095,
            4096,
            4097,
            3 * 4096 + 5,
            1 << 20,
            (5 << 20) + 123,
        ] {
            let z = vec![0u8; n as usize];
            for seed in [0u32, 0xdead_beef] {
                assert_eq!(
                    crc_append_zeros(seed, n),
                    crc32c::crc32c_append(seed, &z),
                    "{n}"
                );
            }
        }
    }

    #[test]
    fn blobs_round_trip_sparse_and_streamed() {
        let t = TempDir::new("data");
        // A sparse file: data at 0, a hole, data at 3 MiB + 100, a hole at the end.
        let src_path = t.path().join("src");
        let src = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&src_path)
            .unwrap();
        let a: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8 | 1).collect();
        src.write_all_at(&a, 0).unwrap();
        src.write_all_at(&a, (3 << 20) + 100).unwrap();
        src.set_len(8 << 20).unwrap();
        let mut whole = vec![0u8; 8 << 20];
        src.read_exact_at(&mut whole, 0).unwrap();

        let mut w = DataWriter::new(t.path(), 9);
        assert_eq!(w.store_stream(&mut io::empty()).unwrap(), Blob::default());
        let b1 = w.store_file(&File::open(&src_path).unwrap()).unwrap();
        let piped = b"buffered in a pipe".to_vec();
        let b2 = w.store_stream(&mut &piped[..]).unwrap();
        assert!(!t.path().join(file_data_name(9)).exists());
        w.finish().unwrap();
        assert_eq!((b1.offset, b1.len), (0, 8 << 20));
        assert_eq!((b2.offset, b2.len), (8 << 20, piped.len() as u64));
        assert_eq!(b1.crc32c, crc32c::crc32c(&whole));

        let r = DataReader::open(t.path(), &b1.file).unwrap();
        for (b, want) in [(&b1, &whole), (&b2, &piped)] {
            r.verify(b).unwrap();
            let mut got = Vec::new();
            let mut rd = r.reader(b).unwrap();
            let mut buf = vec![0u8; 777_777];
            loop {
                let n = rd.read_chunk(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(&got, want);
        }
        // The holes stayed holes: far less than 8 MiB allocated.
        let meta = std::fs::metadata(r.path()).unwrap();
        assert!(
            std::os::unix::fs::MetadataExt::blocks(&meta) * 512 < 4 << 20,
            "{meta:?}"
        );

        // Out of bounds and bad checksums are reported.
        let out = Blob {
            len: b2.len + 1,
            ..b2.clone()
        };
        assert!(matches!(
            r.check(&out),
            Err(ImageError::BlobOutOfBounds { .. })
        ));
        let bad = Blob {
            crc32c: b2.crc32c ^ 1,
            ..b2.clone()
        };
        assert!(matches!(
            r.verify(&bad),
            Err(ImageError::BlobChecksum { .. })
        ));
        assert!(DataReader::open(t.path(), "../x").is_err());
    }

    #[test]
    fn unfinished_writer_leaves_nothing() {
        let t = TempDir::new("data-drop");
        let mut w = DataWriter::new(t.path(), 3);
        w.store_stream(&mut &b"x"[..]).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
    }
}
