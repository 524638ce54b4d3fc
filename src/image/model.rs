//! The data model of a checkpoint: what every image file holds, as Rust types.
//!
//! Everything here is plain data (serde), written with postcard inside the
//! framed files of [`super::format`] and rendered by `pdump show`.

use serde::{Deserialize, Serialize};

/// `inventory.img`: one per checkpoint directory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// pdump's version that wrote the checkpoint.
    pub pdump_version: String,
    /// `uname -m` of the dumped tasks.
    pub arch: String,
    /// `uname -r` at dump time (restore needs the same kernel ABI).
    pub kernel: String,
    /// Seconds since the epoch when the dump finished.
    pub created_unix: u64,
    /// The root task of the dump.
    pub root_pid: i32,
    /// Every dumped process (tgid), in DFS order from the root.
    pub processes: Vec<i32>,
    /// Whether the tree was left running after the dump.
    pub leave_running: bool,
    /// Page size of the dumping machine.
    pub page_size: u32,
    /// Whole-container (strict) or sub-tree dump.
    pub mode: DumpMode,
    /// Every task of the tree in DFS order from the root, zombies included.
    pub tree: Vec<TaskEntry>,
    /// Resources shared with tasks outside the tree (sub-tree mode only;
    /// container mode refuses to dump when there is any).
    pub leaks: Vec<Leak>,
    /// Open files held by several processes of the tree (one object, many
    /// [`FdKind::Shared`] references).
    pub files: Vec<FileObject>,
}

/// An open file description shared by several fds of the tree.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileObject {
    /// Id referenced by [`FdKind::Shared`].
    pub id: u64,
    /// `flags:` of the description (O_* open flags).
    pub flags: u32,
    /// What it is (never `Shared`).
    pub kind: FdKind,
}

/// The two sides of the seeds' debate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DumpMode {
    /// A sub-tree: dumped even if it shares resources with the outside; every leak is reported.
    #[default]
    SubTree,
    /// A whole container: any leak refuses the dump.
    Container,
}

/// The state of a task when the tree was collected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    /// Running or sleeping.
    #[default]
    Alive,
    /// In a group stop (SIGSTOP/SIGTSTP...).
    Stopped,
    /// Exited, not yet reaped by its parent.
    Zombie {
        /// The wait status its parent will see (`exit_code` field of /proc/PID/stat).
        exit_code: i32,
    },
}

/// One task of the dumped tree: the seeds' data model (pid, tgid, ppid, pgid,
/// sid in the root task's pid namespace, the depth below that namespace, and
/// the pid on every nested level).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskEntry {
    /// The pid as pdump saw it (the pid namespace of its /proc); names the images.
    pub pid: i32,
    /// Thread-group id, parent, process group and session, in the root task's
    /// pid namespace (0 where that task is not visible there, e.g. a parent
    /// outside the tree).
    pub tgid: i32,
    /// Parent.
    pub ppid: i32,
    /// Process group.
    pub pgid: i32,
    /// Session.
    pub sid: i32,
    /// Pid-namespace levels between the root task's namespace and the task's own (0 = same).
    pub depth: u32,
    /// The task's pid on every level from the root task's namespace down to its own
    /// (`NSpid` from the root's level on): `vpids[0] == pid in the root's ns`.
    pub vpids: Vec<i32>,
    /// `NStgid` from the root's level on.
    pub vtgids: Vec<i32>,
    /// `NSpgid` from the root's level on (0 where the group leader is invisible).
    pub vpgids: Vec<i32>,
    /// `NSsid` from the root's level on.
    pub vsids: Vec<i32>,
    /// Alive, stopped or zombie.
    pub state: TaskState,
    /// Threads other than the leader, with their tids on every level.
    pub threads: Vec<Vec<i32>>,
    /// PR_SET_CHILD_SUBREAPER is set.
    pub child_subreaper: bool,
    /// The task is the init (first task) of a pid namespace the tree creates.
    pub pidns_init: bool,
    /// Inode of the task's pid namespace (`/proc/PID/ns/pid`).
    pub pidns: u64,
    /// The main thread's name (`comm`). A live task's comes back with its
    /// threads; a zombie is given it before it exits.
    pub comm: String,
}

/// A resource the tree shares with tasks outside it (seed 003: a "leak").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leak {
    /// What is shared, e.g. "net namespace net:[4026531840]", "mm", "file /tmp/x (fd 3)".
    pub resource: String,
    /// Tree tasks holding it (pids as pdump sees them).
    pub inside: Vec<i32>,
    /// Tasks outside the tree holding it (pids as pdump sees them).
    pub outside: Vec<i32>,
}

/// `core-PID.img`: one per process (thread group).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessImage {
    /// Thread-group id.
    pub pid: i32,
    /// Parent pid.
    pub ppid: i32,
    /// Process group.
    pub pgid: i32,
    /// Session.
    pub sid: i32,
    /// `/proc/PID/comm` of the leader.
    pub comm: String,
    /// `/proc/PID/exe` target.
    pub exe: String,
    /// Command line, NUL-separated arguments split.
    pub cmdline: Vec<String>,
    /// `/proc/PID/cwd` target.
    pub cwd: String,
    /// `/proc/PID/root` target.
    pub root: String,
    /// File mode creation mask.
    pub umask: u32,
    /// `/proc/PID/personality`.
    pub personality: u32,
    /// Credentials.
    pub creds: Creds,
    /// Resource limits, in `/proc/PID/limits` order.
    pub rlimits: Vec<Rlimit>,
    /// The auxiliary vector as (type, value) pairs.
    pub auxv: Vec<(u64, u64)>,
    /// Memory-map bounds from `/proc/PID/stat`.
    pub mm: MmBounds,
    /// `/proc/PID/coredump_filter`.
    pub coredump_filter: u32,
    /// Every thread, the leader first.
    pub threads: Vec<ThreadState>,
    /// Signal dispositions of signals 1..=64 (index 0 is signal 1).
    pub sigactions: Vec<SigAction>,
    /// Signals pending for the whole process (each a raw 128-byte siginfo).
    pub shared_pending: Vec<Vec<u8>>,
    /// ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF.
    pub itimers: Vec<TimerValue>,
    /// POSIX timers.
    pub posix_timers: Vec<PosixTimer>,
    /// Every mapping, in address order.
    pub vmas: Vec<Vma>,
    /// Open file descriptors.
    pub fds: Vec<FdEntry>,
    /// Name of the page-data file in the checkpoint directory.
    pub pages_file: String,
    /// Total bytes of page data in `pages_file` (after its header page).
    pub pages_bytes: u64,
}

/// Credentials from `/proc/PID/status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Creds {
    /// Real, effective, saved, filesystem uid.
    pub uid: [u32; 4],
    /// Real, effective, saved, filesystem gid.
    pub gid: [u32; 4],
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// CapInh, CapPrm, CapEff, CapBnd, CapAmb.
    pub caps: [u64; 5],
    /// `NoNewPrivs`.
    pub no_new_privs: bool,
    /// `Seccomp` mode (0 none, 1 strict, 2 filter).
    pub seccomp: u32,
}

/// One resource limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// Name as `/proc/PID/limits` prints it ("Max open files").
    pub name: String,
    /// `RLIMIT_*` number.
    pub resource: u32,
    /// Soft limit (`u64::MAX` for unlimited).
    pub soft: u64,
    /// Hard limit (`u64::MAX` for unlimited).
    pub hard: u64,
}

/// Address-space bounds from `/proc/PID/stat` (fields 26-28, 45-51) and prctl.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct MmBounds {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
}

/// Per-thread state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ThreadState {
    /// Thread id.
    pub tid: i32,
    /// `/proc/PID/task/TID/comm`.
    pub comm: String,
    /// General-purpose registers as the arch's regset words (x86_64: user_regs_struct order).
    pub gpr: Vec<u64>,
    /// The extended FPU/SIMD regset bytes (x86_64: NT_X86_XSTATE, full xsave area).
    pub fpregs: Vec<u8>,
    /// Blocked signals.
    pub sigmask: u64,
    /// Signals pending for this thread only (raw 128-byte siginfo each).
    pub pending: Vec<Vec<u8>>,
    /// Alternate signal stack.
    pub altstack: AltStack,
    /// rseq registration, if any.
    pub rseq: Option<Rseq>,
    /// The syscall the thread was interrupted in, if it must be restarted.
    pub restart_syscall: Option<u64>,
    /// Whether the task was in group stop (SIGSTOP) before the dump.
    pub stopped: bool,
    /// The thread's `clear_child_tid` address (`set_tid_address`), which
    /// pthread_join waits on; 0 if none.
    pub clear_tid: u64,
}

/// `stack_t`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AltStack {
    /// `ss_sp`
    pub sp: u64,
    /// `ss_flags` (SS_DISABLE = 2)
    pub flags: i32,
    /// `ss_size`
    pub size: u64,
}

/// `PTRACE_GET_RSEQ_CONFIGURATION`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rseq {
    /// Address of `struct rseq`.
    pub abi_pointer: u64,
    /// Its registered length.
    pub abi_size: u32,
    /// The signature.
    pub signature: u32,
    /// Flags.
    pub flags: u32,
}

/// A signal disposition (kernel `struct sigaction`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigAction {
    /// Handler (0 = SIG_DFL, 1 = SIG_IGN).
    pub handler: u64,
    /// SA_* flags.
    pub flags: u64,
    /// Restorer.
    pub restorer: u64,
    /// Mask while handling.
    pub mask: u64,
}

/// An interval timer or POSIX timer value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerValue {
    /// Interval, nanoseconds.
    pub interval_ns: u64,
    /// Time to next expiry, nanoseconds (0 = disarmed).
    pub value_ns: u64,
}

/// A POSIX timer (`timer_create`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PosixTimer {
    /// Timer id.
    pub id: i32,
    /// Clock id.
    pub clock: i32,
    /// Signal number delivered.
    pub signo: i32,
    /// Notification ("signal", "thread", "none") as `/proc/PID/timers` says.
    pub notify: String,
    /// Target thread for SIGEV_THREAD_ID.
    pub notify_tid: i32,
    /// `sigev_value`.
    pub sigev_value: u64,
    /// Current value.
    pub value: TimerValue,
    /// Overrun count.
    pub overrun: i64,
}

/// What backs a mapping.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmaKind {
    /// Private or shared anonymous memory.
    #[default]
    Anon,
    /// `[heap]`
    Heap,
    /// `[stack]`
    Stack,
    /// `[vdso]`
    Vdso,
    /// `[vvar]`
    Vvar,
    /// `[vvar_vclock]`
    VvarVclock,
    /// `[vsyscall]`
    Vsyscall,
    /// A file mapping (the path is in [`Vma::path`]).
    File,
    /// Shared memory (`/dev/zero (deleted)`, `/SYSV...`, memfd).
    Shmem,
}

/// One mapping.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vma {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// PROT_READ | PROT_WRITE | PROT_EXEC bits.
    pub prot: u32,
    /// True for MAP_SHARED.
    pub shared: bool,
    /// File offset (bytes).
    pub offset: u64,
    /// Device, as `major:minor` numbers.
    pub dev: (u32, u32),
    /// Inode.
    pub inode: u64,
    /// Path or pseudo-name as `/proc/PID/maps` prints it.
    pub path: Option<String>,
    /// Kind.
    pub kind: VmaKind,
    /// VmFlags from smaps.
    pub vm_flags: VmFlags,
    /// Runs of dumped pages.
    pub pages: Vec<PageRun>,
}

macro_rules! vm_flag_table {
    ($($(#[$doc:meta])* $name:ident = $code:literal,)*) => {
        /// One `VmFlags` code of `/proc/PID/smaps` that pdump knows. The
        /// declaration order is the bit number in [`VmFlags`] and part of the
        /// image format: codes are only ever appended.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum VmFlag {
            $($(#[$doc])* $name,)*
        }

        impl VmFlag {
            /// Every known code, in bit order.
            pub const ALL: &'static [VmFlag] = &[$(VmFlag::$name,)*];

            /// The two-letter code smaps prints.
            pub const fn code(self) -> &'static str {
                match self {
                    $(VmFlag::$name => $code,)*
                }
            }
        }
    };
}

vm_flag_table! {
    /// `rd`: readable.
    Read = "rd",
    /// `wr`: writable.
    Write = "wr",
    /// `ex`: executable.
    Exec = "ex",
    /// `sh`: shared.
    Shared = "sh",
    /// `mr`: may read.
    MayRead = "mr",
    /// `mw`: may write.
    MayWrite = "mw",
    /// `me`: may execute.
    MayExec = "me",
    /// `ms`: may share.
    MayShare = "ms",
    /// `gd`: grows down (MAP_GROWSDOWN).
    GrowsDown = "gd",
    /// `pf`: pure PFN range (VM_PFNMAP).
    PfnMap = "pf",
    /// `dw`: writes to the mapped file denied (before Linux 5.19).
    DenyWrite = "dw",
    /// `lo`: pages locked in memory.
    Locked = "lo",
    /// `io`: memory-mapped I/O.
    Io = "io",
    /// `sr`: MADV_SEQUENTIAL.
    SeqRead = "sr",
    /// `rr`: MADV_RANDOM.
    RandRead = "rr",
    /// `dc`: MADV_DONTFORK.
    DontCopy = "dc",
    /// `de`: not expanded on mremap.
    DontExpand = "de",
    /// `lf`: locked on fault (MLOCK_ONFAULT).
    LockOnFault = "lf",
    /// `ac`: accounted.
    Account = "ac",
    /// `nr`: no swap reserved (MAP_NORESERVE).
    NoReserve = "nr",
    /// `ht`: hugetlb.
    HugeTlb = "ht",
    /// `sf`: synchronous page faults (MAP_SYNC).
    Sync = "sf",
    /// `ar`: architecture specific.
    Arch1 = "ar",
    /// `wf`: MADV_WIPEONFORK.
    WipeOnFork = "wf",
    /// `dd`: MADV_DONTDUMP.
    DontDump = "dd",
    /// `bt`: arm64 BTI guarded.
    Bti = "bt",
    /// `sd`: soft dirty.
    SoftDirty = "sd",
    /// `mm`: mixed map.
    MixedMap = "mm",
    /// `hg`: MADV_HUGEPAGE.
    HugePage = "hg",
    /// `nh`: MADV_NOHUGEPAGE.
    NoHugePage = "nh",
    /// `mg`: MADV_MERGEABLE.
    Mergeable = "mg",
    /// `um`: userfaultfd missing-page tracking.
    UffdMissing = "um",
    /// `uw`: userfaultfd write-protect tracking.
    UffdWp = "uw",
    /// `mt`: arm64 MTE tags enabled.
    Mte = "mt",
    /// `ui`: userfaultfd minor-fault tracking.
    UffdMinor = "ui",
    /// `ss`: shadow stack.
    ShadowStack = "ss",
    /// `sl`: sealed (mseal).
    Sealed = "sl",
    /// `dp`: droppable (MAP_DROPPABLE).
    Droppable = "dp",
    /// `gu`: grows up (parisc, ia64).
    GrowsUp = "gu",
    /// `nl`: non-linear (before Linux 4.0).
    NonLinear = "nl",
    /// `mp`: MPX bounds tables (before Linux 5.6).
    Mpx = "mp",
}

/// The `VmFlags:` line of a mapping's smaps entry: a bit set over
/// [`VmFlag`] (bit `n` is `VmFlag::ALL[n]`), 8 bytes where a list of
/// strings took hundreds. Codes this pdump does not know are not dropped:
/// they are kept verbatim in [`VmFlags::unknown`] (allocated only when
/// there are any), shown by `pdump show`, and left alone by restore, which
/// only acts on the codes it knows.
///
/// Encoding: postcard (and any non-human-readable serde format) gets
/// `bits: u64, unknown: Option<String>`; JSON gets the list of codes
/// (`["rd", "wr", ...]`), known codes in bit order, then the unknown ones.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct VmFlags {
    bits: u64,
    unknown: Option<Box<str>>,
}

impl VmFlags {
    /// The bits that name a [`VmFlag`].
    const KNOWN: u64 = if VmFlag::ALL.len() >= 64 {
        u64::MAX
    } else {
        (1u64 << VmFlag::ALL.len()) - 1
    };

    /// Parses the codes after `VmFlags:` (separated by whitespace).
    pub fn parse(text: &str) -> VmFlags {
        let mut f = VmFlags::default();
        let mut unknown = String::new();
        for code in text.split_whitespace() {
            match VmFlag::ALL.iter().find(|k| k.code() == code) {
                Some(&k) => f.insert(k),
                None => {
                    if !unknown.is_empty() {
                        unknown.push(' ');
                    }
                    unknown.push_str(code);
                }
            }
        }
        if !unknown.is_empty() {
            f.unknown = Some(unknown.into_boxed_str());
        }
        f
    }

    /// A set of known codes.
    pub fn from_flags(flags: &[VmFlag]) -> VmFlags {
        let mut f = VmFlags::default();
        for &k in flags {
            f.insert(k);
        }
        f
    }

    /// Whether `flag` is set.
    pub fn contains(&self, flag: VmFlag) -> bool {
        self.bits & (1u64 << flag as u8) != 0
    }

    /// Whether any of `flags` is set.
    pub fn contains_any(&self, flags: &[VmFlag]) -> bool {
        flags.iter().any(|&f| self.contains(f))
    }

    /// Sets `flag`.
    pub fn insert(&mut self, flag: VmFlag) {
        self.bits |= 1u64 << flag as u8;
    }

    /// Clears `flag`.
    pub fn remove(&mut self, flag: VmFlag) {
        self.bits &= !(1u64 << flag as u8);
    }

    /// The known flags as bits (bit `n` is `VmFlag::ALL[n]`).
    pub fn bits(&self) -> u64 {
        self.bits
    }

    /// The codes pdump does not know, space separated, in smaps order.
    pub fn unknown(&self) -> Option<&str> {
        self.unknown.as_deref()
    }

    /// No code at all.
    pub fn is_empty(&self) -> bool {
        self.bits == 0 && self.unknown.is_none()
    }

    /// Every code: the known ones in bit order, then the unknown ones.
    pub fn codes(&self) -> impl Iterator<Item = &str> + '_ {
        VmFlag::ALL
            .iter()
            .filter(|&&k| self.contains(k))
            .map(|k| k.code())
            .chain(self.unknown.as_deref().unwrap_or("").split_whitespace())
    }
}

impl std::fmt::Display for VmFlags {
    /// The codes separated by spaces, as smaps prints them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, c) in self.codes().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(c)?;
        }
        Ok(())
    }
}

impl Serialize for VmFlags {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeSeq, SerializeTuple};
        if s.is_human_readable() {
            let mut seq = s.serialize_seq(None)?;
            for c in self.codes() {
                seq.serialize_element(c)?;
            }
            seq.end()
        } else {
            let mut t = s.serialize_tuple(2)?;
            t.serialize_element(&self.bits)?;
            t.serialize_element(&self.unknown.as_deref())?;
            t.end()
        }
    }
}

impl<'de> Deserialize<'de> for VmFlags {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<VmFlags, D::Error> {
        if d.is_human_readable() {
            let codes = Vec::<String>::deserialize(d)?;
            return Ok(VmFlags::parse(&codes.join(" ")));
        }
        let (bits, unknown) = <(u64, Option<String>)>::deserialize(d)?;
        if bits & !VmFlags::KNOWN != 0 {
            return Err(serde::de::Error::custom(format!(
                "VmFlags bits {:#x} name no known code",
                bits & !VmFlags::KNOWN
            )));
        }
        if unknown.as_deref().is_some_and(|u| {
            u.split_whitespace().next().is_none() || u.split(' ').any(str::is_empty)
        }) {
            return Err(serde::de::Error::custom(
                "VmFlags unknown codes are not space-separated codes",
            ));
        }
        Ok(VmFlags {
            bits,
            unknown: unknown.map(String::into_boxed_str),
        })
    }
}

/// A run of contiguous present pages.
///
/// A data run (`zero == false`) is `npages * 4096` bytes of the page file
/// at data offset `offset`, checked by `crc32c`. A zero run (`zero == true`)
/// has no bytes in the page file: its content is all zero; its `offset` is
/// where it would be in the data (the end of the data run before it, so
/// runs stay in file order) and its `crc32c` is 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    /// Address of the first page.
    pub addr: u64,
    /// Number of pages.
    pub npages: u64,
    /// Byte offset of the run in the page file's data (after the header page).
    pub offset: u64,
    /// CRC32C of the run's bytes (0 for a zero run).
    pub crc32c: u32,
    /// Every page of the run is all zero; nothing is stored for it.
    pub zero: bool,
}

impl PageRun {
    /// Bytes of the run in memory.
    pub fn len(&self) -> u64 {
        self.npages.saturating_mul(pdump_arch::PAGE_SIZE as u64)
    }

    /// Whether the run has no pages (never true in a valid image).
    pub fn is_empty(&self) -> bool {
        self.npages == 0
    }

    /// Bytes the run occupies in the page file (0 for a zero run).
    pub fn file_len(&self) -> u64 {
        if self.zero {
            0
        } else {
            self.len()
        }
    }
}

impl FdKind {
    /// The bytes this kind keeps in a file-data file, if any (unlinked
    /// file contents, memfd contents, pipe and FIFO data).
    pub fn blob(&self) -> Option<&Blob> {
        match self {
            FdKind::Regular {
                unlinked_contents, ..
            } => unlinked_contents.as_ref(),
            FdKind::Pipe { data, .. } | FdKind::Fifo { data, .. } => Some(data),
            FdKind::Memfd { contents, .. } => Some(contents),
            _ => None,
        }
    }
}

/// Bytes kept outside the model, in a file-data file of the checkpoint
/// (`files-<pid>.img`): contents of memfds and unlinked files, data buffered
/// in pipes. They are streamed there at dump time and back at restore, so
/// neither side holds them in memory. An empty blob (`len == 0`) names no
/// file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Blob {
    /// Name of the file-data file in the checkpoint directory ("" if empty).
    pub file: String,
    /// Byte offset of the data in that file's data (after its header page).
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// CRC32C of the bytes (0 if empty).
    pub crc32c: u32,
}

impl Blob {
    /// No bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One open file descriptor.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdEntry {
    /// The fd number.
    pub fd: i32,
    /// FD_CLOEXEC.
    pub cloexec: bool,
    /// `flags:` from fdinfo (O_* open flags, octal there).
    pub flags: u32,
    /// What it is.
    pub kind: FdKind,
}

/// The kinds of fd pdump dumps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum FdKind {
    /// Placeholder for a default value; never written.
    #[default]
    Unknown,
    /// A regular file.
    Regular {
        /// Path (without " (deleted)").
        path: String,
        /// File position.
        pos: u64,
        /// Size at dump time.
        size: u64,
        /// Mode bits.
        mode: u32,
        /// The file was unlinked: where its contents are kept.
        unlinked_contents: Option<Blob>,
    },
    /// A directory.
    Directory {
        /// Path.
        path: String,
        /// Position.
        pos: u64,
    },
    /// `/dev/null`
    DevNull,
    /// `/dev/zero`
    DevZero,
    /// An anonymous pipe end.
    Pipe {
        /// The pipe's inode (both ends share it).
        inode: u64,
        /// True for the write end.
        write_end: bool,
        /// Data buffered in the pipe at dump time (recorded once per pipe).
        data: Blob,
    },
    /// A FIFO end.
    Fifo {
        /// Path of the FIFO.
        path: String,
        /// Its inode.
        inode: u64,
        /// True for the write end.
        write_end: bool,
        /// Buffered data.
        data: Blob,
    },
    /// An eventfd.
    EventFd {
        /// Counter.
        count: u64,
        /// EFD_SEMAPHORE etc.
        efd_flags: u32,
    },
    /// A memfd.
    Memfd {
        /// Name without the "memfd:" prefix.
        name: String,
        /// Inode (fds of one memfd share it).
        inode: u64,
        /// Position.
        pos: u64,
        /// Contents.
        contents: Blob,
        /// F_GET_SEALS.
        seals: u32,
    },
    /// A reference to an open file description held by several fds of the
    /// tree (possibly in several processes): see [`Inventory::files`].
    Shared {
        /// The [`FileObject::id`].
        file_id: u64,
    },
    /// A unix domain socket.
    UnixSocket {
        /// The socket's inode (`socket:[INODE]`).
        inode: u64,
        /// The peer's inode (0 if unconnected).
        peer_inode: u64,
        /// SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET.
        sock_type: i32,
        /// Bound address (abstract names start with a NUL byte), empty if none.
        name: Vec<u8>,
        /// Bytes queued for this end to read (peeked, not consumed); for
        /// datagram sockets each message as its own entry.
        queued: Vec<Vec<u8>>,
        /// SHUT_RD/SHUT_WR state as sock_diag reports it.
        shutdown: u32,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_flags_codes_are_unique_two_letters_and_fit() {
        assert!(VmFlag::ALL.len() <= 64);
        for (i, f) in VmFlag::ALL.iter().enumerate() {
            assert_eq!(*f as usize, i);
            assert_eq!(f.code().len(), 2);
            assert_eq!(
                VmFlag::ALL.iter().filter(|g| g.code() == f.code()).count(),
                1
            );
        }
        // The bit numbers are part of the image format.
        assert_eq!(VmFlags::parse("rd").bits(), 1);
        assert_eq!(VmFlags::parse("gd").bits(), 1 << 8);
        assert_eq!(VmFlags::parse("dd").bits(), 1 << 24);
        assert_eq!(VmFlags::parse("mp").bits(), 1 << 40);
    }

    #[test]
    fn vm_flags_round_trip_postcard_and_json() {
        let text = "rd wr mr mw me ac";
        for f in [
            VmFlags::default(),
            VmFlags::parse(text),
            VmFlags::parse("rd xx mr yy"),
            VmFlags::from_flags(VmFlag::ALL),
        ] {
            let bin = postcard::to_allocvec(&f).unwrap();
            assert_eq!(postcard::from_bytes::<VmFlags>(&bin).unwrap(), f);
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(serde_json::from_str::<VmFlags>(&json).unwrap(), f);
        }
        assert_eq!(
            serde_json::to_string(&VmFlags::parse("xx rd")).unwrap(),
            r#"["rd","xx"]"#
        );
        // bits varint (4 bytes here) + None: no per-code strings.
        assert_eq!(
            postcard::to_allocvec(&VmFlags::parse(text)).unwrap().len(),
            4
        );
        assert_eq!(
            std::mem::size_of::<VmFlags>(),
            std::mem::size_of::<Vec<String>>()
        );
    }

    #[test]
    fn vm_flags_decoding_rejects_unnamed_bits_and_bad_unknowns() {
        let bad = postcard::to_allocvec(&(1u64 << 63, None::<String>)).unwrap();
        assert!(postcard::from_bytes::<VmFlags>(&bad).is_err());
        for u in ["", " ", "a  b", "a "] {
            let bad = postcard::to_allocvec(&(1u64, Some(u))).unwrap();
            assert!(postcard::from_bytes::<VmFlags>(&bad).is_err(), "{u:?}");
        }
    }
}
