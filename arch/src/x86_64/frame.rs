//! The x86_64 `rt_sigframe`, built by the dumper and consumed by `rt_sigreturn`.
//!
//! A cure by `rt_sigreturn` restores every general-purpose register, the
//! flags, the full xstate (x87/SSE/AVX/AVX-512...), the signal mask and the
//! alternate signal stack in one syscall. pdump uses it as the fallback that a
//! task takes on its own when the dumper dies.
//!
//! ```text
//!  frame+0    pretcode (unused: overwritten by the stub's `push`)
//!  frame+8    struct ucontext  { uc_flags, uc_link, uc_stack (24), uc_mcontext (256), uc_sigmask (8) }
//!  frame+312  struct siginfo   (128 bytes, zero)
//!  frame+440  padding up to a 64-byte aligned address
//!  fpstate    xsave area exactly as PTRACE_GETREGSET(NT_X86_XSTATE) returned it,
//!             its sw_reserved bytes carrying FP_XSTATE_MAGIC1 and the sizes
//!  fpstate+xstate_size   FP_XSTATE_MAGIC2 (4 bytes)
//! ```

use super::regs::UserRegs;
use crate::{AltStack, ArchError, FrameLayout};

const UC_FP_XSTATE: u64 = 0x1;
const UC_SIGCONTEXT_SS: u64 = 0x2;
const UC_STRICT_RESTORE_SS: u64 = 0x4;
/// `FP_XSTATE_MAGIC1`, in the xsave area's software-reserved bytes.
pub const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
/// `FP_XSTATE_MAGIC2`, right after the xstate.
pub const FP_XSTATE_MAGIC2: u32 = 0x4650_5845;
/// Offset of `struct _fpx_sw_bytes` in the xsave area.
pub const SW_BYTES_OFFSET: usize = 464;

const UCONTEXT_OFF: usize = 8;
const UC_STACK_OFF: usize = UCONTEXT_OFF + 16;
const MCONTEXT_OFF: usize = UCONTEXT_OFF + 40;
const SIGMASK_OFF: usize = MCONTEXT_OFF + 256;
const SIGINFO_OFF: usize = SIGMASK_OFF + 8;
const HEADER_END: usize = SIGINFO_OFF + 128;

/// Check an `NT_X86_XSTATE` regset buffer and return its size. ptrace puts
/// the task's XCR0 in the first software-reserved word (not the signal-frame
/// magic), so the size is the buffer's length.
pub fn xstate_size(xstate: &[u8]) -> Result<usize, ArchError> {
    if xstate.len() < 576 || !xstate.len().is_multiple_of(64) {
        return Err(ArchError::BadFpState);
    }
    Ok(xstate.len())
}

/// The XCR0 feature mask recorded by ptrace in the xsave area.
pub fn xstate_features(xstate: &[u8]) -> u64 {
    u64::from_le_bytes(
        xstate[SW_BYTES_OFFSET..SW_BYTES_OFFSET + 8]
            .try_into()
            .unwrap(),
    )
}

/// Bytes a frame needs for an xstate of `xstate_len` bytes, placed at any address.
pub fn frame_size(xstate_len: usize) -> usize {
    HEADER_END + 64 + xstate_len + 4
}

fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Build an `rt_sigframe` into `buf`, which will live at address `frame_addr`
/// in the task. `regs` must already be the registers to resume with (apply
/// the syscall restart first), `xstate` the `NT_X86_XSTATE` regset bytes.
pub fn build(
    buf: &mut [u8],
    frame_addr: u64,
    regs: &UserRegs,
    sigmask: u64,
    altstack: AltStack,
    xstate: &[u8],
) -> Result<FrameLayout, ArchError> {
    let xsize = xstate_size(xstate)?;
    let fp_addr = (frame_addr + HEADER_END as u64 + 63) & !63;
    let fp_off = (fp_addr - frame_addr) as usize;
    let need = fp_off + xsize + 4;
    if buf.len() < need {
        return Err(ArchError::FrameBufferTooSmall { need });
    }
    buf[..need].fill(0);
    put_u64(
        buf,
        UCONTEXT_OFF,
        UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS,
    );
    // uc_stack: ss_sp, ss_flags (int + pad), ss_size
    put_u64(buf, UC_STACK_OFF, altstack.sp);
    buf[UC_STACK_OFF + 8..UC_STACK_OFF + 12].copy_from_slice(&altstack.flags.to_le_bytes());
    put_u64(buf, UC_STACK_OFF + 16, altstack.size);
    // struct sigcontext_64
    let m = MCONTEXT_OFF;
    let words = [
        regs.r8,
        regs.r9,
        regs.r10,
        regs.r11,
        regs.r12,
        regs.r13,
        regs.r14,
        regs.r15,
        regs.rdi,
        regs.rsi,
        regs.rbp,
        regs.rbx,
        regs.rdx,
        regs.rax,
        regs.rcx,
        regs.rsp,
        regs.rip,
        regs.eflags,
    ];
    for (i, w) in words.iter().enumerate() {
        put_u64(buf, m + i * 8, *w);
    }
    // cs, gs, fs, ss as u16
    let segs = [
        regs.cs as u16,
        regs.gs as u16,
        regs.fs as u16,
        regs.ss as u16,
    ];
    for (i, s) in segs.iter().enumerate() {
        buf[m + 144 + i * 2..m + 146 + i * 2].copy_from_slice(&s.to_le_bytes());
    }
    // err, trapno, oldmask, cr2 stay zero; fpstate pointer:
    put_u64(buf, m + 184, fp_addr);
    put_u64(buf, SIGMASK_OFF, sigmask);
    buf[fp_off..fp_off + xsize].copy_from_slice(&xstate[..xsize]);
    // The signal frame's software bytes: magic, sizes and the feature mask.
    let sw = fp_off + SW_BYTES_OFFSET;
    let xfeatures = xstate_features(xstate);
    buf[sw..sw + 48].fill(0);
    buf[sw..sw + 4].copy_from_slice(&FP_XSTATE_MAGIC1.to_le_bytes());
    buf[sw + 4..sw + 8].copy_from_slice(&((xsize + 4) as u32).to_le_bytes());
    buf[sw + 8..sw + 16].copy_from_slice(&xfeatures.to_le_bytes());
    buf[sw + 16..sw + 20].copy_from_slice(&(xsize as u32).to_le_bytes());
    buf[fp_off + xsize..fp_off + xsize + 4].copy_from_slice(&FP_XSTATE_MAGIC2.to_le_bytes());
    Ok(FrameLayout {
        size: need,
        sp_at_sigreturn: frame_addr + 8,
    })
}
