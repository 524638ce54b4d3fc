//! Blobs built by build.rs and the loader that places them in a task.

/// A flattened, position-independent blob.
#[derive(Debug)]
pub struct Blob {
    /// Name, for errors.
    pub name: &'static str,
    /// File-backed bytes, from offset 0; the rest up to `mem_size` is zero (bss).
    pub image: &'static [u8],
    /// Bytes the loaded image occupies (image + bss).
    pub mem_size: usize,
    /// Bytes of code from offset 0 (the executable segment).
    pub text_len: usize,
    /// RELATIVE relocations: (offset, addend); the loader writes `base + addend` at `offset`.
    pub relocs: &'static [(u64, u64)],
}

include!(concat!(env!("OUT_DIR"), "/blobs.rs"));

impl Blob {
    /// Copy the blob into `dst` (at least `mem_size` bytes) as if loaded at `base`.
    pub fn load_into(&self, dst: &mut [u8], base: u64) {
        assert!(dst.len() >= self.mem_size);
        dst[..self.image.len()].copy_from_slice(self.image);
        dst[self.image.len()..self.mem_size].fill(0);
        for &(off, addend) in self.relocs {
            let off = off as usize;
            dst[off..off + 8].copy_from_slice(&(base + addend).to_le_bytes());
        }
    }
}
