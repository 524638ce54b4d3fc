//! aarch64: built in CI (cross), not yet exercised on hardware.

pub mod frame;
pub mod regs;
pub mod syscall;

pub use regs::UserRegs;

use crate::{Arch, SyscallArgs};

/// The aarch64 implementation of [`Arch`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Impl;

/// The stub: `svc #0`, then the dead-dumper fallback `mov x8, #139; svc #0`
/// (rt_sigreturn with the frame at `sp`), then `brk #0`.
pub const SYSCALL_STUB: [u8; 16] = [
    0x01, 0x00, 0x00, 0xd4, // svc #0
    0x68, 0x11, 0x80, 0xd2, // mov x8, #139
    0x01, 0x00, 0x00, 0xd4, // svc #0
    0x00, 0x00, 0x20, 0xd4, // brk #0
];

const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;

impl Arch for Impl {
    type Regs = UserRegs;
    const NAME: &'static str = "aarch64";
    const ELF_MACHINE: u16 = 183; // EM_AARCH64
    const FP_REGSET: u32 = 0x2; // NT_PRFPREG
    const SYSCALL_STUB: &'static [u8] = &SYSCALL_STUB;
    const STUB_AFTER_SYSCALL: usize = 4;
    const NR_RT_SIGRETURN: u64 = syscall::nr::RT_SIGRETURN;
    const NR_RESTART_SYSCALL: u64 = syscall::nr::RESTART_SYSCALL;

    fn ip(r: &UserRegs) -> u64 {
        r.pc
    }
    fn set_ip(r: &mut UserRegs, ip: u64) {
        r.pc = ip;
    }
    fn sp(r: &UserRegs) -> u64 {
        r.sp
    }
    fn set_sp(r: &mut UserRegs, sp: u64) {
        r.sp = sp;
    }
    fn tls_words(_r: &UserRegs) -> [u64; 2] {
        [0, 0]
    }
    fn tls(_r: &UserRegs) -> u64 {
        0 // TPIDR_EL0 is its own regset (NT_ARM_TLS)
    }
    fn set_syscall(r: &mut UserRegs, c: &SyscallArgs) {
        r.regs[8] = c.nr;
        r.regs[..6].copy_from_slice(&c.args);
    }
    fn syscall_ret(r: &UserRegs) -> i64 {
        r.regs[0] as i64
    }
    fn set_entry_arg(r: &mut UserRegs, arg: u64) {
        r.regs[0] = arg;
    }
    fn interrupted_syscall(r: &UserRegs) -> Option<u64> {
        match -(r.regs[0] as i64) {
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND | ERESTART_RESTARTBLOCK => {
                Some(r.regs[8])
            }
            _ => None,
        }
    }
    fn apply_restart(r: &mut UserRegs) {
        // aarch64 keeps the original x0 in the kernel (orig_x0); the host
        // passes it in through NT_ARM_SYSTEM_CALL handling. Restart by number:
        if let Some(nr) = Self::interrupted_syscall(r) {
            if -(r.regs[0] as i64) == ERESTART_RESTARTBLOCK {
                r.regs[8] = syscall::nr::RESTART_SYSCALL;
            } else {
                r.regs[8] = nr;
            }
            r.pc -= 4;
        }
    }
    fn clear_syscall(_r: &mut UserRegs) {}

    const GPR_NAMES: &'static [&'static str] = &[
        "x0", "x1", "x2", "x3", "x4", "x5", "x6", "x7", "x8", "x9", "x10", "x11", "x12", "x13",
        "x14", "x15", "x16", "x17", "x18", "x19", "x20", "x21", "x22", "x23", "x24", "x25", "x26",
        "x27", "x28", "x29", "x30", "sp", "pc", "pstate",
    ];
    fn gpr_to_words(r: &UserRegs, out: &mut [u64]) {
        out[..31].copy_from_slice(&r.regs);
        out[31] = r.sp;
        out[32] = r.pc;
        out[33] = r.pstate;
    }
    fn gpr_from_words(w: &[u64]) -> UserRegs {
        let mut r = UserRegs::default();
        for (i, v) in w.iter().take(34).enumerate() {
            match i {
                0..=30 => r.regs[i] = *v,
                31 => r.sp = *v,
                32 => r.pc = *v,
                _ => r.pstate = *v,
            }
        }
        r
    }
    fn frame_size(fp_len: usize) -> usize {
        frame::frame_size(fp_len)
    }
    fn build_frame(
        buf: &mut [u8],
        frame_addr: u64,
        regs: &UserRegs,
        sigmask: u64,
        altstack: crate::AltStack,
        fp: &[u8],
    ) -> Result<crate::FrameLayout, crate::ArchError> {
        frame::build(buf, frame_addr, regs, sigmask, altstack, fp)
    }
}
