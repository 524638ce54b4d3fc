//! XSAVE area layouts: reading the `NT_X86_XSTATE` bytes ptrace gave us and
//! rewriting them in the layout debuggers expect.
//!
//! ptrace returns the xstate in the *standard* (non-compacted) XSAVE format,
//! but the offset of each state component in that format is whatever CPUID
//! leaf 0xD says on the dumping CPU. Intel CPUs place AVX-512 after the MPX
//! components (opmask at 1088, ZMM_Hi256 at 1152, Hi16_ZMM at 1664, PKRU at
//! 2688); AMD Zen CPUs have no MPX and place them right after AVX (832, 896,
//! 1408, PKRU at 2432). gdb up to 13 hard-codes the Intel offsets and sizes
//! (it even ignores an xstate note shorter than the Intel size), so it shows
//! garbage or nothing for zmm/k registers of an AMD core. gdb 14+ and the
//! kernel's own cores (6.x) use the `NT_X86_XSAVE_LAYOUT` note instead.
//!
//! pdump writes the xstate in the Intel layout (every debugger reads it, old
//! and new) and adds an `NT_X86_XSAVE_LAYOUT` note describing exactly that
//! layout, so a reader that honours the note gets the same answer.

/// The x87/SSE legacy area plus the XSAVE header: identical in every layout.
pub const LEGACY_AND_HEADER: usize = 576;

/// Offset of the XCR0 word ptrace stores in the software-reserved bytes.
pub const XCR0_OFFSET: usize = 464;

/// Offset of `XCOMP_BV` in the XSAVE header (0 in the standard format).
const XCOMP_BV_OFFSET: usize = 520;

/// One state component of an XSAVE layout (`struct x86_xfeat_component`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Component {
    /// XSAVE feature number (2 = AVX, 5 = opmask, 9 = PKRU, ...).
    pub feature: u32,
    /// Size in bytes.
    pub size: u32,
    /// Offset from the start of the XSAVE area.
    pub offset: u32,
    /// CPUID.(0xD, feature).ECX flags (bit 1: 64-byte aligned when compacted).
    pub flags: u32,
}

/// Where every extended (feature 2 and above) user state component lives in
/// a standard-format XSAVE area.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Components in feature order.
    pub components: Vec<Component>,
}

/// Which well-known layout a table describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vendor {
    Intel,
    Amd,
}

/// (feature, offset, size) of the fixed layouts.
fn fixed(vendor: Vendor, feature: u32) -> Option<(u32, u32)> {
    match (vendor, feature) {
        (_, 2) => Some((576, 256)),
        (Vendor::Intel, 3) => Some((960, 64)),
        (Vendor::Intel, 4) => Some((1024, 64)),
        (Vendor::Intel, 5) => Some((1088, 64)),
        (Vendor::Intel, 6) => Some((1152, 512)),
        (Vendor::Intel, 7) => Some((1664, 1024)),
        (Vendor::Intel, 9) => Some((2688, 8)),
        (Vendor::Intel, 17) => Some((2752, 64)),
        (Vendor::Intel, 18) => Some((2816, 8192)),
        (Vendor::Amd, 5) => Some((832, 64)),
        (Vendor::Amd, 6) => Some((896, 512)),
        (Vendor::Amd, 7) => Some((1408, 1024)),
        (Vendor::Amd, 9) => Some((2432, 8)),
        _ => None,
    }
}

/// The extended user features (bit 2 and up) of an XCR0 value.
fn extended_features(xcr0: u64) -> impl Iterator<Item = u32> {
    (2..64u32).filter(move |&i| xcr0 >> i & 1 == 1)
}

impl Layout {
    fn from_table(vendor: Vendor, xcr0: u64) -> Option<Layout> {
        let components = extended_features(xcr0)
            .map(|f| {
                fixed(vendor, f).map(|(offset, size)| Component {
                    feature: f,
                    size,
                    offset,
                    flags: 0,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Layout { components })
    }

    /// The Intel layout of the features in `xcr0` (the one gdb <= 13
    /// hard-codes), if every feature has a known Intel offset.
    pub fn intel(xcr0: u64) -> Option<Layout> {
        Self::from_table(Vendor::Intel, xcr0)
    }

    /// The AMD Zen layout (no MPX) of the features in `xcr0`.
    pub fn amd(xcr0: u64) -> Option<Layout> {
        Self::from_table(Vendor::Amd, xcr0)
    }

    /// The layout of this CPU (CPUID leaf 0xD), for the features in `xcr0`.
    #[cfg(target_arch = "x86_64")]
    pub fn host(xcr0: u64) -> Option<Layout> {
        let components = extended_features(xcr0)
            .map(|f| {
                // Leaf 0xD exists wherever XSAVE does, and ptrace only
                // reports an XCR0 with extended features on such CPUs.
                let r = std::arch::x86_64::__cpuid_count(0xd, f);
                // A supervisor component (or an unknown leaf) has no
                // standard-format offset.
                (r.eax != 0 && r.ebx != 0).then_some(Component {
                    feature: f,
                    size: r.eax,
                    offset: r.ebx,
                    flags: r.ecx,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Layout { components })
    }

    /// The layout of this CPU (only x86_64 has one).
    #[cfg(not(target_arch = "x86_64"))]
    pub fn host(_xcr0: u64) -> Option<Layout> {
        None
    }

    /// Bytes of a standard-format area in this layout.
    pub fn size(&self) -> usize {
        self.components
            .iter()
            .map(|c| (c.offset + c.size) as usize)
            .max()
            .unwrap_or(0)
            .max(LEGACY_AND_HEADER)
    }

    /// Whether every component lies inside `len` bytes, past the header,
    /// without overlapping another.
    fn fits(&self, len: usize) -> bool {
        let mut spans: Vec<(usize, usize)> = self
            .components
            .iter()
            .map(|c| (c.offset as usize, (c.offset + c.size) as usize))
            .collect();
        spans.sort();
        spans.windows(2).all(|w| w[0].1 <= w[1].0)
            && spans
                .iter()
                .all(|&(s, e)| s >= LEGACY_AND_HEADER && e <= len)
    }

    /// Recognise the layout of a standard-format XSAVE area of `len` bytes
    /// whose XCR0 is `xcr0`: this CPU's layout if the size matches (the usual
    /// case: dumped here), else the Intel or AMD layout of that size.
    pub fn detect(xcr0: u64, len: usize) -> Option<Layout> {
        [Self::host(xcr0), Self::intel(xcr0), Self::amd(xcr0)]
            .into_iter()
            .flatten()
            .find(|l| l.size() == len && l.fits(len))
    }

    /// The `NT_X86_XSAVE_LAYOUT` note descriptor: one 16-byte
    /// `x86_xfeat_component` (type, size, offset, flags) per component.
    pub fn note_desc(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * self.components.len());
        for c in &self.components {
            for w in [c.feature, c.size, c.offset, c.flags] {
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
        out
    }
}

/// The XCR0 ptrace recorded in an xstate buffer (0 if it is too short).
pub fn xcr0(xstate: &[u8]) -> u64 {
    xstate
        .get(XCR0_OFFSET..XCR0_OFFSET + 8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .unwrap_or(0)
}

/// Rewrite a standard-format XSAVE area from layout `from` into layout `to`
/// (same features): the legacy area and header are copied as they are
/// (`XCOMP_BV` cleared), each component moves to its new offset.
pub fn convert(xstate: &[u8], from: &Layout, to: &Layout) -> Vec<u8> {
    let mut out = vec![0u8; to.size()];
    let n = LEGACY_AND_HEADER.min(xstate.len());
    out[..n].copy_from_slice(&xstate[..n]);
    if out.len() >= XCOMP_BV_OFFSET + 8 {
        out[XCOMP_BV_OFFSET..XCOMP_BV_OFFSET + 8].fill(0);
    }
    for src in &from.components {
        let Some(dst) = to.components.iter().find(|c| c.feature == src.feature) else {
            continue;
        };
        let len = src.size.min(dst.size) as usize;
        let (s, d) = (src.offset as usize, dst.offset as usize);
        if let Some(bytes) = xstate.get(s..s + len) {
            out[d..d + len].copy_from_slice(bytes);
        }
    }
    out
}

/// What goes into a core for one thread's xstate: the bytes and the layout
/// they are in.
pub fn for_core(xstate: &[u8]) -> (Vec<u8>, Option<Layout>) {
    let features = xcr0(xstate);
    let Some(from) = Layout::detect(features, xstate.len()) else {
        log::warn!(
            "xstate of {} bytes with XCR0 {features:#x}: unknown layout, written as it is",
            xstate.len()
        );
        return (xstate.to_vec(), None);
    };
    match Layout::intel(features) {
        Some(to) if to != from => (convert(xstate, &from, &to), Some(to)),
        _ => (xstate.to_vec(), Some(from)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An AVX-512 xstate (XCR0 0xe7) in the AMD layout with recognisable bytes.
    fn amd_area() -> Vec<u8> {
        let l = Layout::amd(0xe7).unwrap();
        let mut b = vec![0u8; l.size()];
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i % 251) as u8;
        }
        b[XCR0_OFFSET..XCR0_OFFSET + 8].copy_from_slice(&0xe7u64.to_le_bytes());
        b
    }

    #[test]
    fn sizes_of_the_fixed_layouts() {
        assert_eq!(Layout::amd(0xe7).unwrap().size(), 2432);
        assert_eq!(Layout::amd(0x2e7).unwrap().size(), 2440);
        assert_eq!(Layout::intel(0xe7).unwrap().size(), 2688);
        assert_eq!(Layout::intel(0x2e7).unwrap().size(), 2696);
        assert_eq!(Layout::intel(0x2ff).unwrap().size(), 2696);
        assert_eq!(Layout::intel(0x7).unwrap().size(), 832);
        assert_eq!(Layout::intel(0x3).unwrap().size(), LEGACY_AND_HEADER);
        assert!(Layout::amd(0x1f).is_none(), "AMD has no MPX");
        assert!(Layout::intel(1 << 19).is_none(), "unknown feature");
    }

    #[test]
    fn amd_to_intel_moves_every_component() {
        let a = amd_area();
        let (from, to) = (Layout::amd(0xe7).unwrap(), Layout::intel(0xe7).unwrap());
        assert_eq!(Layout::detect(0xe7, a.len()).unwrap().size(), 2432);
        let out = convert(&a, &from, &to);
        assert_eq!(out.len(), 2688);
        assert_eq!(out[..512], a[..512]);
        assert_eq!(xcr0(&out), 0xe7);
        // ymm_h, opmask, ZMM_Hi256, Hi16_ZMM.
        for (src, dst, len) in [
            (576, 576, 256),
            (832, 1088, 64),
            (896, 1152, 512),
            (1408, 1664, 1024),
        ] {
            assert_eq!(out[dst..dst + len], a[src..src + len], "component at {src}");
        }
        // The MPX hole stays zero.
        assert!(out[960..1088].iter().all(|&b| b == 0));
        // And back.
        let back = convert(&out, &to, &from);
        assert_eq!(back[576..], a[576..]);
    }

    #[test]
    fn for_core_converts_amd_and_keeps_intel() {
        let a = amd_area();
        let (out, layout) = for_core(&a);
        assert_eq!(out.len(), 2688);
        assert_eq!(layout.unwrap(), Layout::intel(0xe7).unwrap());
        let (again, _) = for_core(&out);
        assert_eq!(again, out, "an Intel-layout area is left as it is");
    }

    #[test]
    fn layout_note_lists_type_size_offset_flags() {
        let d = Layout::intel(0x207).unwrap().note_desc();
        let words: Vec<u32> = d
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(words, [2, 256, 576, 0, 9, 8, 2688, 0]);
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn host_layout_matches_ptrace_size() {
        // CPUID.(0xD,0).EBX is the standard-format size for the enabled XCR0;
        // our host layout must agree for the features CPUID enumerates.
        // Leaf 0xD on a CPU without XSAVE returns zeros, handled below.
        let r = std::arch::x86_64::__cpuid_count(0xd, 0);
        let supported = u64::from(r.eax) | u64::from(r.edx) << 32;
        if supported & 4 == 0 {
            return; // no AVX: nothing to lay out
        }
        let l = Layout::host(supported).unwrap();
        assert!(l.fits(l.size()));
        assert!(l.size() <= r.ecx as usize);
    }
}
