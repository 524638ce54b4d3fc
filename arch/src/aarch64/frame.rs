//! The aarch64 `rt_sigframe`: siginfo, then `struct ucontext` whose mcontext
//! holds the GPRs and a record list (`fpsimd_context`, then the terminator).
//!
//! ```text
//!  frame+0     struct siginfo (128)
//!  frame+128   uc_flags (8), uc_link (8), uc_stack (24), uc_sigmask (8), pad to 128+168
//!  frame+304   struct sigcontext: fault_address, regs[31], sp, pc, pstate, __reserved[4096]
//!                __reserved: fpsimd_context { head{magic,size}, fpsr, fpcr, vregs[32] (16 each) }, then a null record
//! ```

use super::regs::UserRegs;
use crate::{AltStack, ArchError, FrameLayout};

/// `FPSIMD_MAGIC`
pub const FPSIMD_MAGIC: u32 = 0x4650_8001;
const SIGINFO: usize = 128;
const UC_STACK: usize = SIGINFO + 16;
const UC_SIGMASK: usize = SIGINFO + 40;
const MCONTEXT: usize = SIGINFO + 176; // 16-byte aligned sigcontext
const RESERVED: usize = MCONTEXT + 8 + 31 * 8 + 24;
const FPSIMD_SIZE: usize = 16 + 8 + 32 * 16;
const TOTAL: usize = MCONTEXT + 8 + 31 * 8 + 24 + 4096;

/// Bytes a frame needs.
pub fn frame_size(_fp_len: usize) -> usize {
    TOTAL + 16
}

/// Build a frame. `fp` is the `user_fpsimd_state` (vregs, fpsr, fpcr) as NT_PRFPREG returns it.
pub fn build(
    buf: &mut [u8],
    frame_addr: u64,
    regs: &UserRegs,
    sigmask: u64,
    altstack: AltStack,
    fp: &[u8],
) -> Result<FrameLayout, ArchError> {
    if buf.len() < TOTAL {
        return Err(ArchError::FrameBufferTooSmall { need: TOTAL });
    }
    if fp.len() < 32 * 16 + 8 {
        return Err(ArchError::BadFpState);
    }
    buf[..TOTAL].fill(0);
    buf[UC_STACK..UC_STACK + 8].copy_from_slice(&altstack.sp.to_le_bytes());
    buf[UC_STACK + 8..UC_STACK + 12].copy_from_slice(&altstack.flags.to_le_bytes());
    buf[UC_STACK + 16..UC_STACK + 24].copy_from_slice(&altstack.size.to_le_bytes());
    buf[UC_SIGMASK..UC_SIGMASK + 8].copy_from_slice(&sigmask.to_le_bytes());
    let mut off = MCONTEXT + 8;
    for r in regs
        .regs
        .iter()
        .chain([regs.sp, regs.pc, regs.pstate].iter())
    {
        buf[off..off + 8].copy_from_slice(&r.to_le_bytes());
        off += 8;
    }
    let f = RESERVED;
    buf[f..f + 4].copy_from_slice(&FPSIMD_MAGIC.to_le_bytes());
    buf[f + 4..f + 8].copy_from_slice(&(FPSIMD_SIZE as u32).to_le_bytes());
    // user_fpsimd_state: vregs[32] then fpsr, fpcr; fpsimd_context: fpsr, fpcr, vregs
    buf[f + 8..f + 16].copy_from_slice(&fp[512..520]);
    buf[f + 16..f + 16 + 512].copy_from_slice(&fp[..512]);
    Ok(FrameLayout {
        size: TOTAL,
        sp_at_sigreturn: frame_addr,
    })
}
