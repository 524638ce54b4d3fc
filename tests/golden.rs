//! Golden tests: every byte sequence pdump injects, decoded with iced-x86.

use iced_x86::{
    Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter, Mnemonic, OpKind, Register,
};

fn disasm(bytes: &[u8], ip: u64) -> Vec<String> {
    let mut d = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
    let mut f = IntelFormatter::new();
    let mut out = Vec::new();
    let mut ins = Instruction::default();
    while d.can_decode() {
        d.decode_out(&mut ins);
        let mut s = String::new();
        f.format(&ins, &mut s);
        out.push(s);
    }
    out
}

#[test]
fn syscall_stub_bytes_and_disassembly() {
    let stub = pdump_arch::native::stub::SYSCALL_STUB;
    assert_eq!(stub, [0x0f, 0x05, 0x6a, 0x0f, 0x58, 0x0f, 0x05, 0xcc]);
    assert_eq!(stub.len(), 8, "the stub is one ptrace word");
    assert_eq!(
        disasm(&stub, 0),
        ["syscall", "push 0Fh", "pop rax", "syscall", "int3"]
    );
    // The fallback path pushes 15 = rt_sigreturn.
    assert_eq!(pdump_arch::native::syscall::nr::RT_SIGRETURN, 15);
    use pdump_arch::Arch;
    assert_eq!(pdump_arch::Native::STUB_AFTER_SYSCALL, 2);
}

#[test]
fn blob_entry_trampoline() {
    let img = pdump::blob::PARASITE.image;
    assert_eq!(&img[..5], &pdump_arch::native::entry::ENTRY_PREFIX);
    let lines = disasm(&img[..11], 0);
    assert_eq!(lines[0], "and rsp,0FFFFFFFFFFFFFFF0h");
    assert!(lines[1].starts_with("call "), "{lines:?}");
    assert_eq!(lines[2], "ud2");
    // The call lands inside the blob.
    let rel = i32::from_le_bytes(img[5..9].try_into().unwrap()) as i64;
    let target = 9 + rel;
    assert!(
        target > 0 && (target as usize) < img.len(),
        "call target {target:#x}"
    );
}

/// The parasite must not touch the task's FPU/SIMD state: no instruction in
/// the blob may name an x87/MMX/SSE/AVX register (the bare target is soft-float).
#[test]
fn blob_uses_no_simd_registers() {
    let blob = &pdump::blob::PARASITE;
    let mut d = Decoder::with_ip(64, &blob.image[..blob.text_len], 0, DecoderOptions::NONE);
    let mut ins = Instruction::default();
    let mut text_end = blob.text_len;
    // Stop at the first run of padding after text (rodata follows at a 64-byte boundary).
    while d.can_decode() {
        let pos = d.position();
        d.decode_out(&mut ins);
        if ins.is_invalid() {
            text_end = pos;
            break;
        }
        for i in 0..ins.op_count() {
            if ins.op_kind(i) == OpKind::Register {
                let r = ins.op_register(i);
                assert!(
                    !(r.is_xmm() || r.is_ymm() || r.is_zmm() || r.is_mm() || r.is_st() || r.is_k()),
                    "blob instruction at {:#x} uses {:?}: {}",
                    ins.ip(),
                    r,
                    ins
                );
            }
        }
        assert!(
            !matches!(
                ins.mnemonic(),
                Mnemonic::Fxsave | Mnemonic::Xsave | Mnemonic::Xrstor | Mnemonic::Fxrstor
            ),
            "blob saves/restores FPU state at {:#x}",
            ins.ip()
        );
    }
    assert!(text_end > 64, "decoded only {text_end} bytes");
    let _ = Register::None;
}

#[test]
fn blob_relocations_are_inside_the_image() {
    let blob = &pdump::blob::PARASITE;
    assert!(blob.mem_size <= 256 * 1024);
    for &(off, addend) in blob.relocs {
        assert!((off as usize) + 8 <= blob.mem_size);
        assert!(
            (addend as usize) <= blob.mem_size,
            "addend {addend:#x} outside the blob"
        );
    }
    // Loading at two bases differs exactly at the relocations.
    let mut a = vec![0u8; blob.mem_size];
    let mut b = vec![0u8; blob.mem_size];
    blob.load_into(&mut a, 0x1000_0000);
    blob.load_into(&mut b, 0x2000_0000);
    let diff: Vec<usize> = (0..blob.mem_size).filter(|&i| a[i] != b[i]).collect();
    for i in diff {
        assert!(blob
            .relocs
            .iter()
            .any(|&(o, _)| (o as usize..o as usize + 8).contains(&i)));
    }
}

#[test]
fn sigframe_layout() {
    use pdump_arch::native::frame;
    // A minimal xsave area as ptrace returns it: legacy 512 + header 64, XCR0 in sw_reserved.
    let mut x = vec![0u8; 576];
    x[464..472].copy_from_slice(&0x7u64.to_le_bytes());
    let regs = pdump_arch::native::UserRegs {
        rip: 0x401000,
        rsp: 0x7ffd_0000,
        rax: 7,
        cs: 0x33,
        ss: 0x2b,
        ..Default::default()
    };
    let mut buf = vec![0u8; frame::frame_size(x.len())];
    let base = 0x7ffc_1008u64;
    let l = frame::build(&mut buf, base, &regs, 0xdead, Default::default(), &x).unwrap();
    assert_eq!(l.sp_at_sigreturn, base + 8);
    let w = |o: usize| u64::from_le_bytes(buf[o..o + 8].try_into().unwrap());
    assert_eq!(
        w(8),
        0x7,
        "uc_flags: FP_XSTATE | SIGCONTEXT_SS | STRICT_RESTORE_SS"
    );
    let mc = 8 + 40;
    assert_eq!(w(mc + 13 * 8), 7, "rax");
    assert_eq!(w(mc + 15 * 8), 0x7ffd_0000, "rsp");
    assert_eq!(w(mc + 16 * 8), 0x401000, "rip");
    assert_eq!(w(mc + 256), 0xdead, "uc_sigmask");
    let fp = w(mc + 184);
    assert_eq!(fp % 64, 0, "fpstate is 64-byte aligned");
    let fo = (fp - base) as usize;
    assert_eq!(
        u32::from_le_bytes(buf[fo + 576..fo + 580].try_into().unwrap()),
        frame::FP_XSTATE_MAGIC2
    );
    let sw = fo + 464;
    assert_eq!(
        u32::from_le_bytes(buf[sw..sw + 4].try_into().unwrap()),
        frame::FP_XSTATE_MAGIC1
    );
    assert_eq!(
        u32::from_le_bytes(buf[sw + 4..sw + 8].try_into().unwrap()),
        580,
        "extended_size"
    );
    assert_eq!(
        u64::from_le_bytes(buf[sw + 8..sw + 16].try_into().unwrap()),
        7,
        "xfeatures"
    );
    assert_eq!(
        u32::from_le_bytes(buf[sw + 16..sw + 20].try_into().unwrap()),
        576,
        "xstate_size"
    );
}
