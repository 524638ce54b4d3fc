//! x86_64: the one architecture built and tested on this machine.

pub mod entry;
pub mod frame;
pub mod regs;
pub mod stub;
pub mod syscall;

pub use regs::UserRegs;

use crate::{Arch, SyscallArgs};

/// The x86_64 implementation of [`Arch`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Impl;

/// `-ERESTARTSYS` and friends, as seen in `rax` of a task stopped in a syscall.
pub const ERESTARTSYS: i64 = 512;
/// Restart only if no handler ran.
pub const ERESTARTNOINTR: i64 = 513;
/// Restart if no handler; `-EINTR` otherwise.
pub const ERESTARTNOHAND: i64 = 514;
/// Restart through `restart_syscall` and the task's restart block.
pub const ERESTART_RESTARTBLOCK: i64 = 516;

impl Arch for Impl {
    type Regs = UserRegs;
    const NAME: &'static str = "x86_64";
    const ELF_MACHINE: u16 = 62; // EM_X86_64
    const FP_REGSET: u32 = 0x202; // NT_X86_XSTATE
    const SYSCALL_STUB: &'static [u8] = &stub::SYSCALL_STUB;
    const STUB_AFTER_SYSCALL: usize = 2;
    const NR_RT_SIGRETURN: u64 = syscall::nr::RT_SIGRETURN;
    const NR_RESTART_SYSCALL: u64 = syscall::nr::RESTART_SYSCALL;

    fn ip(r: &UserRegs) -> u64 {
        r.rip
    }
    fn set_ip(r: &mut UserRegs, ip: u64) {
        r.rip = ip;
    }
    fn sp(r: &UserRegs) -> u64 {
        r.rsp
    }
    fn set_sp(r: &mut UserRegs, sp: u64) {
        r.rsp = sp;
    }
    fn tls(r: &UserRegs) -> u64 {
        r.fs_base
    }
    fn tls_words(r: &UserRegs) -> [u64; 2] {
        [r.fs_base, r.gs_base]
    }
    fn set_syscall(r: &mut UserRegs, c: &SyscallArgs) {
        r.rax = c.nr;
        r.rdi = c.args[0];
        r.rsi = c.args[1];
        r.rdx = c.args[2];
        r.r10 = c.args[3];
        r.r8 = c.args[4];
        r.r9 = c.args[5];
        r.orig_rax = u64::MAX;
    }
    fn syscall_ret(r: &UserRegs) -> i64 {
        r.rax as i64
    }
    fn set_entry_arg(r: &mut UserRegs, arg: u64) {
        r.rdi = arg;
    }
    fn interrupted_syscall(r: &UserRegs) -> Option<u64> {
        if (r.orig_rax as i64) < 0 {
            return None;
        }
        match -(r.rax as i64) {
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND | ERESTART_RESTARTBLOCK => {
                Some(r.orig_rax)
            }
            _ => None,
        }
    }
    fn apply_restart(r: &mut UserRegs) {
        if let Some(nr) = Self::interrupted_syscall(r) {
            r.rax = if -(r.rax as i64) == ERESTART_RESTARTBLOCK {
                syscall::nr::RESTART_SYSCALL
            } else {
                nr
            };
            r.rip -= 2; // back onto the `syscall` instruction
        }
        r.orig_rax = u64::MAX;
    }
    fn restart_in_new_task(r: &mut UserRegs) {
        if Self::interrupted_syscall(r).is_some() && -(r.rax as i64) == ERESTART_RESTARTBLOCK {
            const TIMER_ABSTIME: u64 = 1;
            match r.orig_rax {
                // nanosleep(req, rem): the kernel wrote the time left to rem.
                syscall::nr::NANOSLEEP if r.rsi != 0 => r.rdi = r.rsi,
                // clock_nanosleep(clock, flags, req, rem), relative.
                syscall::nr::CLOCK_NANOSLEEP if r.rdx & TIMER_ABSTIME == 0 && r.r10 != 0 => {
                    r.rdx = r.r10
                }
                _ => {}
            }
            r.rax = r.orig_rax;
            r.rip -= 2;
            r.orig_rax = u64::MAX;
            return;
        }
        Self::apply_restart(r)
    }
    fn clear_syscall(r: &mut UserRegs) {
        r.orig_rax = u64::MAX;
    }

    const GPR_NAMES: &'static [&'static str] = &UserRegs::NAMES;
    fn gpr_to_words(r: &UserRegs, out: &mut [u64]) {
        out[..27].copy_from_slice(&r.to_words());
    }
    fn gpr_from_words(w: &[u64]) -> UserRegs {
        let mut a = [0u64; 27];
        let n = w.len().min(27);
        a[..n].copy_from_slice(&w[..n]);
        UserRegs::from_words(&a)
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
