//! `struct user_pt_regs`.

/// `struct user_pt_regs` as `PTRACE_GETREGSET(NT_PRSTATUS)` fills it on aarch64.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserRegs {
    /// x0..x30
    pub regs: [u64; 31],
    /// Stack pointer.
    pub sp: u64,
    /// Program counter.
    pub pc: u64,
    /// PSTATE.
    pub pstate: u64,
}
