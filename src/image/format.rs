//! The framed file format every image file uses.
//!
//! ```text
//!  offset  size  field            (all little-endian)
//!  ------  ----  ----------------------------------------------------------
//!       0     4  magic            b"PD" + kind byte + arch byte
//!       4     2  format major
//!       6     2  format minor
//!       8     4  flags            FLAG_* bits; unknown bits are rejected
//!      12     4  reserved         zero
//!      16     8  payload_len      bytes of payload
//!      24     4  payload CRC32C   0 in page files (see FLAG_RUN_CRCS)
//!      28     4  header CRC32C    over bytes 0..28
//!      32   ...  payload          postcard-encoded model (inventory, core)
//!
//!  page file:  header (32) | zero padding to 4096 | page data (payload_len bytes)
//! ```
//!
//! A reader checks, in this order: the file is at least a header long, the
//! magic (kind, then arch), the version, the header CRC, reserved bits and
//! flags, `payload_len` against the per-kind limit (before allocating
//! anything), the file size against `payload_len`, the payload CRC, and
//! finally decodes the payload with postcard from exactly that slice.
//!
//! Compatibility rule: a reader accepts files of its own major version and
//! any minor version up to its own; it rejects another major version or a
//! newer minor version. Writers always write [`FORMAT_MAJOR`].[`FORMAT_MINOR`].
//!
//! The arch half of the magic comes from [`ARCH_CODE`], the only place in the
//! image code that depends on the build target.

use std::cell::Cell;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::ImageError;

/// Current major format version. Readers reject any other major.
pub const FORMAT_MAJOR: u16 = 6;
/// Current minor format version. Readers reject newer minors of their major.
pub const FORMAT_MINOR: u16 = 0;

/// Size of the fixed header at the start of every image file.
pub const HEADER_SIZE: usize = 32;
/// Offset of the page data in a page file (the header page is padded with zeros).
pub const PAGES_DATA_OFFSET: u64 = 4096;

/// Flag bit: the payload CRC field is 0 and per-record CRC32Cs live in the
/// process core image ([`super::model::PageRun::crc32c`],
/// [`super::model::Blob::crc32c`]). Set in page and file-data files only.
pub const FLAG_RUN_CRCS: u32 = 1 << 0;

/// Largest inventory payload a reader accepts.
pub const MAX_INVENTORY_PAYLOAD: u64 = 16 << 20;
/// Largest process core image payload a reader accepts.
pub const MAX_CORE_PAYLOAD: u64 = 1 << 30;

/// Arch code in the magic: the low byte of the ELF `e_machine` of the build
/// target (x86_64: 62 = 0x3e, aarch64: 183 = 0xb7). The one place that picks it.
pub const ARCH_CODE: u8 = {
    let machine = <pdump_arch::Native as pdump_arch::Arch>::ELF_MACHINE;
    assert!(
        machine <= 0xff,
        "ELF machine number must fit the magic's arch byte"
    );
    machine as u8
};

/// Arch codes pdump knows, for error messages about foreign images.
pub const KNOWN_ARCH_CODES: &[(u8, &str)] = &[(62, "x86_64"), (183, "aarch64")];

/// The name of an arch code, if known.
pub fn arch_name(code: u8) -> Option<&'static str> {
    KNOWN_ARCH_CODES
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, n)| *n)
}

/// The kinds of image file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// `inventory.img`.
    Inventory,
    /// `core-<pid>.img`.
    Core,
    /// `pages-<pid>.img`.
    Pages,
    /// `files-<pid>.img`: contents of files and pipes ([`super::model::Blob`]).
    FileData,
}

impl FileKind {
    /// Every kind.
    pub const ALL: [FileKind; 4] = [
        FileKind::Inventory,
        FileKind::Core,
        FileKind::Pages,
        FileKind::FileData,
    ];

    /// The kind byte of the magic.
    pub const fn code(self) -> u8 {
        match self {
            FileKind::Inventory => b'I',
            FileKind::Core => b'C',
            FileKind::Pages => b'P',
            FileKind::FileData => b'F',
        }
    }

    /// Human-readable name.
    pub const fn name(self) -> &'static str {
        match self {
            FileKind::Inventory => "inventory",
            FileKind::Core => "process core image",
            FileKind::Pages => "page file",
            FileKind::FileData => "file-data file",
        }
    }

    /// The magic of this kind for the build target's arch.
    pub const fn magic(self) -> u32 {
        magic_for(self, ARCH_CODE)
    }

    /// Largest payload a reader accepts for this kind (`u64::MAX`: bounded by
    /// the file size only, as page data is never read whole).
    pub const fn max_payload(self) -> u64 {
        match self {
            FileKind::Inventory => MAX_INVENTORY_PAYLOAD,
            FileKind::Core => MAX_CORE_PAYLOAD,
            FileKind::Pages | FileKind::FileData => u64::MAX,
        }
    }

    /// The flags a file of this kind must carry.
    pub const fn flags(self) -> u32 {
        match self {
            FileKind::Pages | FileKind::FileData => FLAG_RUN_CRCS,
            _ => 0,
        }
    }

    /// Offset of the payload in the file.
    pub const fn payload_offset(self) -> u64 {
        match self {
            FileKind::Pages | FileKind::FileData => PAGES_DATA_OFFSET,
            _ => HEADER_SIZE as u64,
        }
    }
}

/// The magic of a file kind for an arch code: bytes `P`, `D`, kind, arch,
/// read as a little-endian `u32`.
pub const fn magic_for(kind: FileKind, arch_code: u8) -> u32 {
    u32::from_le_bytes([b'P', b'D', kind.code(), arch_code])
}

/// Describe a magic value found in a file, for error messages.
pub fn describe_magic(magic: u32) -> String {
    let [p, d, k, a] = magic.to_le_bytes();
    if p != b'P' || d != b'D' {
        return "not a pdump image".to_string();
    }
    let kind = FileKind::ALL.iter().find(|f| f.code() == k);
    let arch = arch_name(a).map_or_else(|| format!("arch code {a:#04x}"), str::to_string);
    match kind {
        Some(kind) => format!("a pdump {} for {arch}", kind.name()),
        None => format!("a pdump image of unknown kind {k:#04x} for {arch}"),
    }
}

/// The fixed 32-byte header, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Magic (kind and arch).
    pub magic: u32,
    /// Major format version.
    pub major: u16,
    /// Minor format version.
    pub minor: u16,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Payload length in bytes.
    pub payload_len: u64,
    /// CRC32C of the payload (0 in page files).
    pub payload_crc: u32,
    /// CRC32C of bytes 0..28.
    pub header_crc: u32,
}

/// Byte offsets of the header fields, for error reports.
pub mod offsets {
    /// `magic`.
    pub const MAGIC: u64 = 0;
    /// `major`.
    pub const MAJOR: u64 = 4;
    /// `flags`.
    pub const FLAGS: u64 = 8;
    /// `reserved`.
    pub const RESERVED: u64 = 12;
    /// `payload_len`.
    pub const PAYLOAD_LEN: u64 = 16;
    /// `payload_crc`.
    pub const PAYLOAD_CRC: u64 = 24;
    /// `header_crc`.
    pub const HEADER_CRC: u64 = 28;
}

impl Header {
    /// A header for a payload of this kind, written by this version.
    pub fn new(kind: FileKind, payload_len: u64, payload_crc: u32) -> Self {
        let mut h = Header {
            magic: kind.magic(),
            major: FORMAT_MAJOR,
            minor: FORMAT_MINOR,
            flags: kind.flags(),
            reserved: 0,
            payload_len,
            payload_crc,
            header_crc: 0,
        };
        h.header_crc = crc32c::crc32c(&h.to_bytes()[..offsets::HEADER_CRC as usize]);
        h
    }

    /// Encode (the stored `header_crc` is written as is).
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&self.magic.to_le_bytes());
        b[4..6].copy_from_slice(&self.major.to_le_bytes());
        b[6..8].copy_from_slice(&self.minor.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.reserved.to_le_bytes());
        b[16..24].copy_from_slice(&self.payload_len.to_le_bytes());
        b[24..28].copy_from_slice(&self.payload_crc.to_le_bytes());
        b[28..32].copy_from_slice(&self.header_crc.to_le_bytes());
        b
    }

    /// Decode without validating anything.
    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Self {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let lo = u64::from(u32_at(16));
        let hi = u64::from(u32_at(20));
        Header {
            magic: u32_at(0),
            major: u16_at(4),
            minor: u16_at(6),
            flags: u32_at(8),
            reserved: u32_at(12),
            payload_len: lo | (hi << 32),
            payload_crc: u32_at(24),
            header_crc: u32_at(28),
        }
    }

    /// Validate a raw header of a file of `kind` at `path`: magic, version,
    /// header CRC, reserved, flags and the per-kind payload limit.
    pub fn validate(
        raw: &[u8; HEADER_SIZE],
        kind: FileKind,
        path: &Path,
    ) -> Result<Header, ImageError> {
        let h = Header::from_bytes(raw);
        let expected = kind.magic();
        if h.magic != expected {
            let [p, d, k, a] = h.magic.to_le_bytes();
            if p == b'P' && d == b'D' && k == kind.code() {
                return Err(ImageError::WrongArch {
                    path: path.to_path_buf(),
                    offset: offsets::MAGIC + 3,
                    found: a,
                    expected: ARCH_CODE,
                });
            }
            return Err(ImageError::BadMagic {
                path: path.to_path_buf(),
                offset: offsets::MAGIC,
                found: h.magic,
                expected,
            });
        }
        if h.major != FORMAT_MAJOR || h.minor > FORMAT_MINOR {
            return Err(ImageError::Version {
                path: path.to_path_buf(),
                offset: offsets::MAJOR,
                major: h.major,
                minor: h.minor,
                supported_major: FORMAT_MAJOR,
                supported_minor: FORMAT_MINOR,
            });
        }
        let computed = crc32c::crc32c(&raw[..offsets::HEADER_CRC as usize]);
        if computed != h.header_crc {
            return Err(ImageError::Checksum {
                path: path.to_path_buf(),
                offset: 0,
                len: offsets::HEADER_CRC,
                what: "header",
                stored: h.header_crc,
                computed,
            });
        }
        if h.reserved != 0 {
            return Err(ImageError::BadHeader {
                path: path.to_path_buf(),
                offset: offsets::RESERVED,
                what: format!("reserved field is {:#x}, must be 0", h.reserved),
            });
        }
        if h.flags != kind.flags() {
            return Err(ImageError::Flags {
                path: path.to_path_buf(),
                offset: offsets::FLAGS,
                found: h.flags,
                expected: kind.flags(),
            });
        }
        if kind.flags() & FLAG_RUN_CRCS != 0 && h.payload_crc != 0 {
            return Err(ImageError::BadHeader {
                path: path.to_path_buf(),
                offset: offsets::PAYLOAD_CRC,
                what: format!(
                    "payload CRC field of a {} is {:#010x}, must be 0",
                    kind.name(),
                    h.payload_crc
                ),
            });
        }
        if h.payload_len > kind.max_payload() {
            return Err(ImageError::TooLarge {
                path: path.to_path_buf(),
                offset: offsets::PAYLOAD_LEN,
                len: h.payload_len,
                limit: kind.max_payload(),
            });
        }
        Ok(h)
    }
}

/// Encode `value` as a complete framed file of `kind` (header + payload).
/// Fails if the payload would exceed what a reader accepts.
pub fn encode<T: Serialize>(kind: FileKind, value: &T, path: &Path) -> Result<Vec<u8>, ImageError> {
    let mut buf = postcard::to_extend(value, vec![0u8; HEADER_SIZE]).map_err(|source| {
        ImageError::Encode {
            path: path.to_path_buf(),
            source,
        }
    })?;
    let payload_len = (buf.len() - HEADER_SIZE) as u64;
    if payload_len > kind.max_payload() {
        return Err(ImageError::TooLarge {
            path: path.to_path_buf(),
            offset: offsets::PAYLOAD_LEN,
            len: payload_len,
            limit: kind.max_payload(),
        });
    }
    let crc = crc32c::crc32c(&buf[HEADER_SIZE..]);
    buf[..HEADER_SIZE].copy_from_slice(&Header::new(kind, payload_len, crc).to_bytes());
    Ok(buf)
}

/// Encode `value` as a framed file of `kind` into `out`, an empty file,
/// streamed through a 64 KiB buffer: the payload from byte 32 on, then the
/// header at byte 0 once the payload's length and CRC are known. Memory
/// does not grow with the payload (a core image with tens of thousands of
/// mappings is megabytes). Fails like [`encode`], as soon as the payload
/// passes the kind's limit; the caller removes the partial file.
pub fn write_framed<T: Serialize>(
    kind: FileKind,
    value: &T,
    out: &std::fs::File,
    path: &Path,
) -> Result<(), ImageError> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let io_err = |op| {
        move |source| ImageError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    let mut w = Framing {
        out: std::io::BufWriter::with_capacity(64 << 10, out),
        len: 0,
        crc: 0,
        limit: kind.max_payload(),
        error: None,
    };
    w.out
        .write_all(&[0u8; HEADER_SIZE])
        .map_err(io_err("write"))?;
    let r = postcard::to_io(value, &mut w)
        .map(|_| ())
        .and_then(|()| w.flush().map_err(|_| postcard::Error::SerializeBufferFull));
    match (r, w.error.take()) {
        (_, Some(FramingError::TooLarge)) => {
            return Err(ImageError::TooLarge {
                path: path.to_path_buf(),
                offset: offsets::PAYLOAD_LEN,
                len: w.len,
                limit: w.limit,
            })
        }
        (_, Some(FramingError::Io(e))) => return Err(io_err("write")(e)),
        (Err(source), None) => {
            return Err(ImageError::Encode {
                path: path.to_path_buf(),
                source,
            })
        }
        (Ok(()), None) => {}
    }
    let (len, crc) = (w.len, w.crc);
    drop(w);
    out.write_all_at(&Header::new(kind, len, crc).to_bytes(), 0)
        .map_err(io_err("write"))
}

/// Why [`Framing`] refused a write.
enum FramingError {
    TooLarge,
    Io(std::io::Error),
}

/// The payload writer of [`write_framed`]: counts and checksums what
/// passes, refuses to pass the limit, keeps the first error (postcard
/// reports a failed write without its cause).
struct Framing<W> {
    out: W,
    len: u64,
    crc: u32,
    limit: u64,
    error: Option<FramingError>,
}

impl<W: std::io::Write> std::io::Write for Framing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.error.is_some() {
            return Err(std::io::Error::other("an earlier write failed"));
        }
        if self.len + buf.len() as u64 > self.limit {
            self.len += buf.len() as u64;
            self.error = Some(FramingError::TooLarge);
            return Err(std::io::Error::other("payload over the limit"));
        }
        match self.out.write_all(buf) {
            Ok(()) => {
                self.len += buf.len() as u64;
                self.crc = crc32c::crc32c_append(self.crc, buf);
                Ok(buf.len())
            }
            Err(e) => {
                let r = std::io::Error::new(e.kind(), e.to_string());
                self.error = Some(FramingError::Io(e));
                Err(r)
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.error.is_some() {
            return Err(std::io::Error::other("an earlier write failed"));
        }
        self.out.flush().inspect_err(|e| {
            self.error = Some(FramingError::Io(std::io::Error::new(
                e.kind(),
                e.to_string(),
            )));
        })
    }
}

/// Decode a complete framed file of `kind` held in memory.
pub fn decode<T: DeserializeOwned>(
    kind: FileKind,
    bytes: &[u8],
    path: &Path,
) -> Result<T, ImageError> {
    let raw: &[u8; HEADER_SIZE] = bytes
        .get(..HEADER_SIZE)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| ImageError::Truncated {
            path: path.to_path_buf(),
            offset: bytes.len() as u64,
            need: HEADER_SIZE as u64,
        })?;
    let h = Header::validate(raw, kind, path)?;
    let body = &bytes[HEADER_SIZE..];
    check_payload_size(&h, body.len() as u64, path)?;
    decode_payload(&h, body, path)
}

/// Check the bytes present after the header against `payload_len`.
pub(crate) fn check_payload_size(h: &Header, present: u64, path: &Path) -> Result<(), ImageError> {
    let start = HEADER_SIZE as u64;
    if present < h.payload_len {
        return Err(ImageError::Truncated {
            path: path.to_path_buf(),
            offset: start + present,
            need: start + h.payload_len,
        });
    }
    if present > h.payload_len {
        return Err(ImageError::TrailingBytes {
            path: path.to_path_buf(),
            offset: start + h.payload_len,
            count: present - h.payload_len,
        });
    }
    Ok(())
}

/// Check the payload CRC and decode the payload (exactly `payload_len` bytes).
pub(crate) fn decode_payload<T: DeserializeOwned>(
    h: &Header,
    payload: &[u8],
    path: &Path,
) -> Result<T, ImageError> {
    let start = HEADER_SIZE as u64;
    let computed = crc32c::crc32c(payload);
    if computed != h.payload_crc {
        return Err(ImageError::Checksum {
            path: path.to_path_buf(),
            offset: start,
            len: payload.len() as u64,
            what: "payload",
            stored: h.payload_crc,
            computed,
        });
    }
    let pos = Cell::new(0usize);
    let result = {
        let mut de = postcard::Deserializer::from_flavor(Tracked {
            data: payload,
            pos: &pos,
        });
        T::deserialize(&mut de)
    };
    let value = result.map_err(|source| ImageError::Decode {
        path: path.to_path_buf(),
        offset: start + pos.get() as u64,
        source,
    })?;
    let used = pos.get();
    if used != payload.len() {
        return Err(ImageError::TrailingBytes {
            path: path.to_path_buf(),
            offset: start + used as u64,
            count: (payload.len() - used) as u64,
        });
    }
    Ok(value)
}

/// A postcard input flavor over a slice that records how far decoding got,
/// so a decode error can name the byte offset where it failed.
struct Tracked<'de> {
    data: &'de [u8],
    pos: &'de Cell<usize>,
}

impl<'de> postcard::de_flavors::Flavor<'de> for Tracked<'de> {
    type Remainder = usize;
    type Source = &'de [u8];

    fn pop(&mut self) -> postcard::Result<u8> {
        let p = self.pos.get();
        let b = *self
            .data
            .get(p)
            .ok_or(postcard::Error::DeserializeUnexpectedEnd)?;
        self.pos.set(p + 1);
        Ok(b)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.data.len().saturating_sub(self.pos.get()))
    }

    fn try_take_n(&mut self, ct: usize) -> postcard::Result<&'de [u8]> {
        let p = self.pos.get();
        let end = p
            .checked_add(ct)
            .ok_or(postcard::Error::DeserializeUnexpectedEnd)?;
        let s = self
            .data
            .get(p..end)
            .ok_or(postcard::Error::DeserializeUnexpectedEnd)?;
        self.pos.set(end);
        Ok(s)
    }

    fn finalize(self) -> postcard::Result<usize> {
        Ok(self.pos.get())
    }
}

/// The header of a page file holding `data_len` bytes of page data.
pub fn pages_header(data_len: u64) -> Header {
    Header::new(FileKind::Pages, data_len, 0)
}

/// The header of a file-data file holding `data_len` bytes of data.
pub fn file_data_header(data_len: u64) -> Header {
    Header::new(FileKind::FileData, data_len, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_differs_per_kind_and_arch() {
        let x86 = 62u8;
        let arm = 183u8;
        let mut all = Vec::new();
        for k in FileKind::ALL {
            all.push(magic_for(k, x86));
            all.push(magic_for(k, arm));
        }
        let mut dedup = all.clone();
        dedup.sort_unstable();
        dedup.dedup();
        assert_eq!(all.len(), dedup.len());
        assert_eq!(magic_for(FileKind::Inventory, x86), 0x3e49_4450);
        assert_eq!(magic_for(FileKind::Core, arm), 0xb743_4450);
        assert_eq!(FileKind::Core.magic(), magic_for(FileKind::Core, ARCH_CODE));
        assert_eq!(
            arch_name(ARCH_CODE),
            Some(<pdump_arch::Native as pdump_arch::Arch>::NAME)
        );
    }

    #[test]
    fn header_round_trip_and_crc() {
        let h = Header::new(FileKind::Core, 0x1_2345_6789, 0xdead_beef);
        let b = h.to_bytes();
        assert_eq!(Header::from_bytes(&b), h);
        assert_eq!(
            Header::validate(&b, FileKind::Inventory, Path::new("x")).ok(),
            None
        );
        // payload_len over the core limit: the header is fine, the limit is not.
        assert!(matches!(
            Header::validate(&b, FileKind::Core, Path::new("x")),
            Err(ImageError::TooLarge { offset: 16, .. })
        ));
        let ok = Header::new(FileKind::Core, 10, 1).to_bytes();
        assert!(Header::validate(&ok, FileKind::Core, Path::new("x")).is_ok());
    }

    #[test]
    fn streamed_write_equals_encode() {
        let dir = std::env::temp_dir().join(format!("pdump-framed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        // Payloads around the 64 KiB buffer size.
        for n in [0usize, 1, 65_000, 200_000] {
            let value: Vec<u32> = (0..n as u32)
                .map(|i| i.wrapping_mul(2_654_435_761))
                .collect();
            let f = std::fs::File::create(&path).unwrap();
            write_framed(FileKind::Core, &value, &f, &path).unwrap();
            let want = encode(FileKind::Core, &value, &path).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), want, "{n}");
            assert_eq!(
                decode::<Vec<u32>>(FileKind::Core, &want, &path).unwrap(),
                value
            );
        }
        // Over the limit: refused once the limit is passed, not at the end.
        let big = vec![7u8; (MAX_INVENTORY_PAYLOAD + 1) as usize];
        let f = std::fs::File::create(&path).unwrap();
        let e = write_framed(FileKind::Inventory, &big, &f, &path).unwrap_err();
        assert!(matches!(e, ImageError::TooLarge { .. }), "{e}");
        assert!(std::fs::metadata(&path).unwrap().len() <= MAX_INVENTORY_PAYLOAD + 32);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn compat_rule() {
        let p = Path::new("x");
        let with = |major: u16, minor: u16| {
            let mut h = Header::new(FileKind::Inventory, 0, crc32c::crc32c(&[]));
            h.major = major;
            h.minor = minor;
            h.header_crc = crc32c::crc32c(&h.to_bytes()[..28]);
            Header::validate(&h.to_bytes(), FileKind::Inventory, p)
        };
        for minor in 0..=FORMAT_MINOR {
            assert!(with(FORMAT_MAJOR, minor).is_ok());
        }
        assert!(matches!(
            with(FORMAT_MAJOR, FORMAT_MINOR + 1),
            Err(ImageError::Version { offset: 4, .. })
        ));
        assert!(matches!(
            with(FORMAT_MAJOR + 1, 0),
            Err(ImageError::Version { .. })
        ));
        assert!(matches!(
            with(FORMAT_MAJOR - 1, 0),
            Err(ImageError::Version { .. })
        ));
    }

    #[test]
    fn decode_reports_offsets() {
        let p = Path::new("f");
        let v: (u32, String, Vec<u64>) = (7, "hello".into(), vec![1, 2, 300]);
        let bytes = encode(FileKind::Inventory, &v, p).unwrap();
        let back: (u32, String, Vec<u64>) = decode(FileKind::Inventory, &bytes, p).unwrap();
        assert_eq!(back, v);
        // Re-frame a cut payload with valid CRCs: decoding must fail inside it.
        let payload = &bytes[HEADER_SIZE..bytes.len() - 2];
        let mut cut = Header::new(
            FileKind::Inventory,
            payload.len() as u64,
            crc32c::crc32c(payload),
        )
        .to_bytes()
        .to_vec();
        cut.extend_from_slice(payload);
        match decode::<(u32, String, Vec<u64>)>(FileKind::Inventory, &cut, p) {
            Err(ImageError::Decode { offset, .. }) => {
                assert!(
                    offset >= HEADER_SIZE as u64 && offset <= cut.len() as u64,
                    "{offset}"
                )
            }
            other => panic!("{other:?}"),
        }
        // Extra bytes inside a valid frame.
        let mut payload = bytes[HEADER_SIZE..].to_vec();
        payload.push(0);
        let mut extra = Header::new(
            FileKind::Inventory,
            payload.len() as u64,
            crc32c::crc32c(&payload),
        )
        .to_bytes()
        .to_vec();
        extra.extend_from_slice(&payload);
        assert!(matches!(
            decode::<(u32, String, Vec<u64>)>(FileKind::Inventory, &extra, p),
            Err(ImageError::TrailingBytes { count: 1, .. })
        ));
    }
}
