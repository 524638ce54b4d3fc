//! `pdump-victim`: self-checking victim processes for pdump's integration
//! tests.
//!
//! Tests seize these processes, inject code into them, dump them (and later
//! kill and restore them) and then need the victim to *prove* it continued
//! exactly: any silent corruption of memory, registers (general purpose,
//! x87, SSE/AVX/AVX-512 and opmask registers, MXCSR and the x87 control
//! word), signal handlers, signal mask, alternate signal stack, file
//! descriptors or syscall-restart semantics makes the victim report failure.
//!
//! # Protocol
//!
//! `pdump-victim MODE [ARGS...]`
//!
//! * After initialisation every mode prints exactly one line
//!   `READY <pid> <extra...>` to stdout and flushes it.
//! * At start every mode sets the signal mask of the main thread (inherited
//!   by every thread it creates) to exactly `{SIGUSR2}` (`threads` mode:
//!   `{SIGUSR2, SIGTERM}`, see there).
//! * Long-running modes (`loop`, `stopme`, `zmm`, `threads`, `pattern`,
//!   `fds`, `timers`) install a SIGTERM handler with
//!   `SA_RESTART | SA_ONSTACK`, running on an alternate signal stack (a
//!   separate 64 KiB anonymous mapping installed with `sigaltstack`), which
//!   only sets an atomic flag and records whether it really ran on that
//!   alternate stack. The test ends a run with SIGTERM; the victim then runs
//!   a FINAL full verification and prints `OK <details>` and exits 0, or
//!   prints `FAIL <what>` and exits 1. The final verification always
//!   includes: the signal mask of every thread is unchanged (raw
//!   `rt_sigprocmask` query), the SIGTERM action (handler, flags, restorer,
//!   mask; raw `rt_sigaction` query) is bit-identical to what the kernel
//!   reported right after installation, the alternate signal stack of every
//!   thread that installed one is unchanged, and the SIGTERM handler ran on
//!   the alternate stack.
//! * Any failure noticed earlier prints `FAIL <what>` and exits 1 at once.
//! * `FAIL` lines and `OK` lines go to stdout; nothing else is printed there.
//!
//! Numbers in hex are printed as `0x` followed by lowercase hex digits.
//!
//! # Modes
//!
//! * `loop`: an 8 MiB heap buffer (2^20 u64 words, word `i` initially
//!   `splitmix64(0x100F ^ i)`); a single-threaded tight loop modifies one
//!   word per iteration (index from an xorshift64 PRNG) and maintains a
//!   position-weighted running checksum incrementally; every 2^20 iterations
//!   it recomputes the full checksum; loop-carried sentinel values (kept in
//!   registers behind optimisation barriers) are checked every iteration.
//!   `READY <pid> <buf_hex> <buf_bytes>`; final `OK iterations=<n>`.
//! * `stopme`: like `loop`, but right after READY it raises SIGSTOP on
//!   itself once (the test sends SIGCONT, later SIGTERM). Same output.
//! * `zmm`: the main thread and one extra thread each load zmm0..zmm31,
//!   k1..k7, the eight x87 stack registers, r12..r15, MXCSR and the x87
//!   control word with per-thread distinct known values in ONE inline-asm
//!   block which then loops forever comparing every register with its
//!   expected value (batches of 65536 full checks between polls of the
//!   SIGTERM flag in memory), so the registers hold their values at whatever
//!   moment the task is seized. The main thread writes its READY line from
//!   inside that asm block (a raw `write` syscall) after both threads have
//!   loaded their registers. `READY <pid> avx512`, or `READY <pid>
//!   ymm-fallback` without AVX-512F/BW (or with `PDUMP_VICTIM_FORCE_YMM=1`),
//!   in which case ymm0..ymm15 (full 256 bits) are used instead and there
//!   are no opmask registers. Final `OK checks=<n>` (sum over both threads).
//! * `threads [N]` (default 8): N worker threads, each with its own
//!   counter, a thread-local value and a 512-word stack buffer holding a
//!   pattern, verifying continuously and bumping a shared atomic total; the
//!   main thread waits in `rt_sigsuspend` for SIGTERM (every thread's mask
//!   is `{SIGUSR2, SIGTERM}`, the main thread unblocks SIGTERM only inside
//!   `rt_sigsuspend`), then stops and joins the workers and checks that the
//!   per-thread counters add up to the total. Every worker also installs and
//!   finally verifies its own alternate stack and mask.
//!   `READY <pid> <N>`; final `OK threads=<N>`.
//! * `sleep [MS]` (default 2000): READY, then ONE `nanosleep(MS)` (raw libc
//!   call with a remainder pointer; any error, EINTR included, is a FAIL),
//!   measuring CLOCK_MONOTONIC around it; prints `SLEPT <elapsed_ms>` and
//!   exits 0. No SIGTERM handler. `READY <pid> <MS>`.
//! * `read`: READY, then ONE blocking `read(0, buf, 64)` (raw libc call;
//!   EINTR, any other error, or end of file is a FAIL); prints `GOT <bytes
//!   as text, whitespace-trimmed>` and exits 0. No SIGTERM handler.
//!   `READY <pid>`.
//! * `pattern [PAGES] [SEED]` (defaults 256 and 1; decimal or `0x` hex):
//!   maps `PAGES + 16` pages anonymous private read-write memory with
//!   `MADV_NOHUGEPAGE`, then makes the last 16 pages read-only, so that they
//!   form a separate mapping right after the first `PAGES` pages; the
//!   pattern is written as defined by [`pattern_page_kind`] and
//!   [`pattern_word`]. The 16-page read-only region is never touched.
//!   `READY <pid> <base_hex> <PAGES> <untouched_base_hex>`, then waits for
//!   SIGTERM; the final check verifies with `mincore` that every
//!   untouched page (every 7th, and the 16-page region) is still not
//!   present and every other page is present, that the two regions still
//!   have permissions `rw-p` and `r--p`, and the content of every touched
//!   page. Final `OK pages=<PAGES>`.
//! * `fds`: opens, in this order: (1) a regular file
//!   `$PDUMP_VICTIM_DIR/pdump-victim-<pid>-regular` (directory default
//!   `/tmp`), O_RDWR, 1000 bytes (byte k = `(k * 31 + 7) as u8`), offset
//!   123; (2) `...-unlinked`, O_RDWR, holding `unlinked-data` (offset 13),
//!   then unlinked; (3) the directory, O_RDONLY|O_DIRECTORY|O_CLOEXEC;
//!   (4) `/dev/null` O_RDWR; (5) `/dev/zero` O_RDONLY; (6) and (7) the read
//!   and write ends of a pipe holding `buffered` (8 bytes); (8) a FIFO
//!   `...-fifo` (mkfifo) opened O_RDWR holding `fifo-data`; (9) an eventfd
//!   (EFD_NONBLOCK) with count 42; (10) a memfd `victim-memfd`
//!   (MFD_CLOEXEC) of 3 pages, u64 word j = `splitmix64(0x3E3F_D000 ^ j)`,
//!   offset 5000. `READY <pid> <fd1> ... <fd10>` in that order. On SIGTERM
//!   it verifies offsets, sizes, contents (reading the pipe, FIFO and
//!   eventfd), file status and descriptor flags, the identity of every file
//!   (`/proc/self/fd` link, inode), removes the regular file and the FIFO
//!   and prints `OK fds=10`.
//! * `bigfiles [MIB]` (default 256): a memfd `victim-big` (MFD_CLOEXEC,
//!   sealable, `F_SEAL_SHRINK`) of MIB MiB, an unlinked file
//!   `$PDUMP_VICTIM_DIR/pdump-victim-<pid>-bigunlinked` of MIB/16 MiB (at
//!   least 1), both made of 1 MiB chunks where chunk `c` is zero (a hole,
//!   never written) if `c % 8 == 3`, else word j =
//!   `splitmix64(SEED ^ c << 20 ^ j)` (a seed per file), left at offsets
//!   12345 and 777; and a pipe (`F_SETPIPE_SZ` 1 MiB) holding 1 MiB.
//!   `READY <pid> <memfd> <unlinked fd> <pipe read end> <MIB>`. On SIGTERM
//!   it checks sizes, offsets, seals and every byte, and prints
//!   `OK bigfiles=<MIB>`.
//! * `timers`: SIGALRM handler with `setitimer(ITIMER_REAL)` at a 100 ms
//!   interval, and a SIGUSR1 `SA_SIGINFO` handler fed by a POSIX timer
//!   (`timer_create(CLOCK_MONOTONIC)`, SIGEV_SIGNAL, 50 ms interval, whose
//!   `sigev_value` must arrive in every signal); both handlers count ticks.
//!   The main thread polls in 50 ms `nanosleep`s. On SIGTERM it checks that
//!   both counters still advance (each by at least 2 more ticks, waiting up
//!   to 10 s for that), that both timers still have their intervals, and
//!   that all three actions are unchanged. `READY <pid>`; final
//!   `OK alrm=<n> usr1=<n>`.
//! * `core [N]` (default 3): for ELF core tests with gdb. Writes
//!   `splitmix64(0xC0DE_0000_0000 ^ pid)` into the global
//!   `PDUMP_CORE_GLOBAL` (`#[no_mangle]`, a `u64`) and a 64-word heap block
//!   (word j = `splitmix64(0xC0DE_1000_0000 ^ pid << 8 ^ j)`) whose address
//!   is in the global `PDUMP_CORE_HEAP`; starts N threads that each block in
//!   a futex wait (`core_block`) called from a frame of their own
//!   (`core_stack_alpha`, `_beta`, `_gamma` for thread index 0, 1, 2 mod 3,
//!   each holding a checked local pattern) under `core_thread_entry`; the
//!   main thread waits for SIGTERM in `rt_sigsuspend` inside
//!   `core_main_wait`. READY only once every thread sits in its futex wait:
//!   `READY <pid> <N> <global_addr_hex> <heap_addr_hex>`. On SIGTERM it
//!   releases and joins the threads and checks their stack patterns, the
//!   global, the heap block and the signal state. Final `OK threads=<N>`.
//! * `cow [PAGES] [OPTS]` (default 1024; OPTS a comma list of `watchdog`,
//!   `slow`, `private`): a writer for copy-on-write snapshot tests. Five mappings: a
//!   1-page private header, and four regions of PAGES pages each: R0 private
//!   anonymous, R1 `MAP_SHARED | MAP_ANONYMOUS`, R2 private with
//!   `MADV_DONTFORK`, R3 private with `MADV_WIPEONFORK` (all
//!   `MADV_NOHUGEPAGE`). Global page `k` (0..4*PAGES) is page `k % PAGES` of
//!   region `k / PAGES`. Generation `g` of page `k` is [`cow_word`]`(g, k, j)`
//!   in word `j` (word 0 is `g`, word 1 is `k`). Setup writes generation 0
//!   everywhere; then the main thread writes, for `c = 0, 1, 2, ...`, page
//!   `c % (4*PAGES)` with generation `c / (4*PAGES) + 1` and only then stores
//!   `c + 1` into header word 0 (the cursor; header word 1 is PAGES). So a
//!   snapshot with cursor `C` holds in page `k`: generation
//!   `C / (4*PAGES) + 1` if `k < C % (4*PAGES)`, the generation before that if
//!   `k > C % (4*PAGES)`, and either of the two at `k == C % (4*PAGES)` (the
//!   page being written). With `slow` it writes one page per millisecond;
//!   with `private` R1, R2 and R3 are plain private anonymous memory too.
//!   A SIGCHLD handler counts signals; after every pass, and at the end, the
//!   victim requires that no SIGCHLD arrived and that `waitpid(-1, WNOHANG)`
//!   and `waitid(P_ALL, WEXITED | WSTOPPED | WCONTINUED | WNOHANG)` fail with
//!   ECHILD (it has no children). With `watchdog` a second thread (SIGTERM
//!   blocked) ticks every 100 µs (`clock_nanosleep`) and records the longest
//!   gap between two ticks (a stop of the process shows up as one).
//!   `READY <pid> <header_hex> <r0_hex> <r1_hex> <r2_hex> <r3_hex> <PAGES>`;
//!   on SIGTERM it stops writing, checks every page against the cursor, that
//!   R1 is still shared and R2/R3 still carry `dc`/`wf` in smaps, and prints
//!   `OK cursor=<C> maxgap_us=<longest gap, 0 without watchdog>`.
//! * `tree SPEC` / `tree-preset NAME`: a whole process tree built from a
//!   compact spec, every member alive and self-checking; see
//!   [Process trees](#process-trees-tree-and-tree-preset) below.
//! * Benchmark workloads (`cargo bench`), each with a watchdog thread that
//!   ticks every millisecond and records its longest gap between ticks (the
//!   longest stop the process saw; printed as `GAP <us>` lines as they
//!   happen when `PDUMP_VICTIM_GAPS=1`, and as `maxgap_us=` in the final
//!   line). All use `MADV_NOHUGEPAGE` mappings and `pattern_word` data, and
//!   check everything on SIGTERM:
//!   * `fill [MIB] [none|half] [SEED] [private|shared]` (1024, none, 1,
//!     private): MIB MiB (`shared`: `MAP_SHARED | MAP_ANONYMOUS`), every page
//!     present; with `half`, the 64 KiB groups for which
//!     `fill_page_is_zero` holds are written with zeros. `READY <pid>
//!     <base_hex> <pages> <zero_pages>`; final `OK pages= zero= maxgap_us=`.
//!     The final check wants every data page present with its pattern and
//!     every zero page reading zero, present or not (a restorer may leave
//!     zero pages unmapped).
//!   * `sparse [MAPPED_MIB] [TOUCHED_MIB] [SEED]` (65536, 256, 1): a
//!     MAP_NORESERVE mapping with single pages touched at scattered places
//!     (`sparse_page`); the final check also counts present pages.
//!     `READY <pid> <base_hex> <mapped_pages> <touched_pages>`.
//!   * `maps [N] [SEED]` (50000, 1): N one-page mappings, alternately `rw-p`
//!     and `r--p`; `READY <pid> <base_hex> <N>`.
//!   * `writer [MIB]` (256): the main thread rewrites the buffer pass after
//!     pass at full speed, checking each page's previous contents first.
//!     `READY <pid> <base_hex> <pages>`; final `OK passes= maxgap_us=`.
//!
//!   With `PDUMP_VICTIM_GAPS=1`, the root of a `tree`/`tree-preset` also
//!   starts a watchdog (one more thread) after its READY line.
//!
//! # Process trees (`tree` and `tree-preset`)
//!
//! `pdump-victim tree SPEC` (the spec is one argument; several are joined
//! with spaces) builds a process tree; `pdump-victim tree-preset NAME` does
//! the same with a ready-made spec.
//!
//! ## Grammar
//!
//! ```text
//! spec := node
//! node := 'p' [ '[' flag { ',' flag } ']' ] [ '(' { node } ')' ]
//! flag := 'ns' | 'setsid' | 'pgid=self' | 'pgid=parent' | 'pgid=' K
//!       | 'zombie=' N | 'threads=' N | 'stopped'
//!       | 'pipe' | 'sockpair' | 'sharedfile'
//! ```
//!
//! Whitespace may appear between nodes, around parentheses and around
//! flags (children need no separator: `p(pp)` is `p(p p)`). Nodes are
//! numbered in DFS pre-order: a node's index is the position of its `p`
//! among all `p`s of the spec, the root is node 0. A flag may appear once
//! per node. Example:
//! `p[setsid](p[pgid=parent] p[ns](p(p[zombie=7]) p[threads=3]) p[stopped])`.
//!
//! * `ns`: the node is the init (pid 1) of a new pid namespace: its parent
//!   calls `unshare(CLONE_NEWPID)`, forks it and goes back to its own
//!   namespace with `setns` (so the parent's `pid_for_children` is
//!   unchanged and later siblings are not in the new namespace). `ns`
//!   inside `ns` nests (depth 2, 3, ...; at most 24). A namespace init gets
//!   signals from inside its namespace only if it has a handler; every
//!   member has a SIGTERM handler (inherited from the root). A root with
//!   `ns`: the started process stays OUTSIDE the tree as a launcher (the
//!   root's parent); it forwards a SIGTERM it gets to the root and exits
//!   with the root's exit status (128 + signal if it was killed); the root
//!   itself prints READY/OK/FAIL. READY's pid is then the root's, not the
//!   started process's; the JSON's `launcher` field holds the latter.
//! * `setsid`: `setsid()` (the root needs not to be a group leader, as in a
//!   child started by `std::process::Command`).
//! * `pgid=self`: `setpgid(0, 0)`.
//! * `pgid=parent`: `setpgid(0, getpgid(getppid()))`: joins the parent's
//!   current process group whoever leads it (with the brief's
//!   `setpgid(0, getppid())` it would fail unless the parent leads its
//!   group). As the parent sets up its own session and group BEFORE it
//!   forks its children, this is an explicit re-join of the inherited
//!   group, checked with `getpgrp()`.
//! * `pgid=K`: joins the process group of node K, which must be an earlier
//!   sibling not created with `setsid` (so the group is in the same
//!   session); the group's leader may be a sibling, or even a zombie
//!   sibling (`sessions` preset: a live process in a group whose leader is
//!   a zombie).
//! * `zombie=N` (0..=255): the node sets itself up (session, group),
//!   reports, and exits with status N; its parent confirms that with
//!   `waitid(WEXITED | WNOWAIT)` before the tree is READY and never reaps it
//!   until the final check. No member ever calls `wait` on a zombie child
//!   before SIGTERM, namespace inits included, so a zombie whose parent is
//!   an `ns` init does stay a zombie here. Note however that a
//!   conventional init (or a restorer that substitutes its own) would reap
//!   it: the presets therefore give every zombie in a child namespace a
//!   NON-init parent (`p[ns](p(p[zombie=3]))`). `ns,zombie=N` is a zombie
//!   that was the init of its own (now dead) namespace. A zombie has no
//!   children, threads, stop, pipe, socketpair or shared file.
//! * `threads=N` (1..=1024): N extra threads, started after all children
//!   exist (the forks happen single-threaded); each bumps a thread-local
//!   counter mirrored by a local one every ~10 ms. Their mask is
//!   `{SIGUSR2, SIGTERM}` so SIGTERM always runs on the main thread.
//! * `stopped`: the node stops right after it has reported (its subtree is
//!   complete): it sends itself SIGSTOP, except a namespace init (which
//!   cannot stop itself): its parent sends the SIGSTOP from the parent
//!   namespace. Either way the parent waits with `waitid(WSTOPPED |
//!   WNOWAIT)` until it is stopped, so the tree is READY only with every
//!   `stopped` member in state T. The exception is a `stopped` ROOT: it
//!   stops itself right AFTER printing READY, so the test must wait for its
//!   state T (`/proc/<pid>/stat`, or `waitid(WSTOPPED)` as its parent)
//!   before it looks at it or sends SIGCONT. A root with both `ns` and
//!   `stopped` is refused. THE TEST MUST SEND SIGCONT to every `stopped` member before
//!   the SIGTERM (SIGCONT to all members is fine too). The parent notes
//!   `CLD_CONTINUED` (`waitid(WCONTINUED | WNOHANG | WNOWAIT)` about every
//!   64 ms and at SIGTERM); a `stopped` child without one at SIGTERM is a
//!   FAIL (and is killed at once instead of being waited for). Whether the
//!   member is still stopped after a dump or restore is for the test to
//!   check in /proc (state T); the victim cannot see it.
//! * `pipe`: a pipe between the node and its parent: the parent keeps the
//!   write end, the node the read end, with `ping\n` (5 bytes) buffered.
//! * `sockpair`: a `socketpair(AF_UNIX, SOCK_STREAM)`; the parent sent
//!   `hello` on its end, not yet read.
//! * `sharedfile`: the parent creates `$PDUMP_VICTIM_DIR/pdump-victim-tree-
//!   <16 random hex digits>-<node index>` (directory default `/tmp`; 200
//!   bytes, byte k = `(k * 13 + idx * 7 + 1) as u8`), O_RDWR, offset 77,
//!   and forks the node with that fd: ONE open file description (one
//!   offset) shared by both. The parent removes the file at the end.
//!
//! Refused specs (exit status 2, message on stderr): a root with `zombie`,
//! `pipe`, `sockpair`, `sharedfile`, `pgid=parent` or `pgid=K`; `setsid`
//! with `pgid=`; `ns` with `pgid=parent` or `pgid=K`; the zombie
//! restrictions above; more than 4096 nodes.
//!
//! Presets (`tree-preset NAME`):
//! * `small`: `p(p p)`.
//! * `sessions` (12 nodes, no namespaces): `p[setsid](p[pgid=self](p
//!   p[pgid=parent]) p[pgid=1](p[setsid](p[pgid=self] p)) p[setsid,zombie=5]
//!   p[pgid=self,zombie=4] p[pgid=9] p[pgid=1,stopped])`: three levels of
//!   sessions and groups, a group joined by a sibling's child, a zombie
//!   session leader, a zombie group leader with a live member, a stopped
//!   member of a sibling's group.
//! * `ns1` (11 nodes): `p[setsid](p[ns](p[threads=2](p[zombie=3]) p[stopped]
//!   p[setsid](p[pgid=self] p[pgid=parent])) p[threads=2] p[pgid=self](p))`.
//! * `ns2` (14 nodes, depth 2): `p[setsid](p[ns](p(p[zombie=3])
//!   p[pgid=self](p[ns](p[threads=2](p[zombie=7]) p[stopped] p[setsid](p
//!   p[pgid=self,threads=2])) p[stopped])) p[threads=3])`.
//! * `ns3` (19 nodes, depth 3): `p[setsid](p[ns,setsid](p[threads=2](p[zombie=1])
//!   p[ns](p[pgid=self](p[zombie=2] p[stopped]) p[ns](p(p[zombie=3])
//!   p[threads=3] p[stopped] p[setsid](p)) p[ns,stopped](p) p[ns,zombie=9]))
//!   p[stopped])`.
//!
//!   In the `ns*` presets every child namespace has a zombie with a non-init
//!   parent, threads and a stopped task; a namespace init that does not call
//!   `setsid` inherits its parent's session and group, so sessions and
//!   groups span levels (inside they read as 0, see below) and groups made
//!   inside a namespace (`pgid=self`) span the levels below. `ns3` also has
//!   a stopped namespace init and a zombie namespace init.
//! * `ipc` (11 nodes): `p(p[pipe](p[sockpair] p[sharedfile,pipe])
//!   p[sockpair,sharedfile](p[pipe,sockpair,sharedfile]) p[ns](p[pipe]
//!   p[sockpair](p[sharedfile])) p[ns,pipe,sockpair,sharedfile])`: also
//!   across a namespace boundary.
//! * `wide200`: a root with 10 children with 19 children each (201
//!   processes), nothing else.
//! * `threads64`: `p[threads=63]`: one process of 64 threads.
//!
//! ## Setup and READY
//!
//! Every member is forked by its parent, one child after the other; each
//! child gets a report pipe (child: write end, parent: read end), closes
//! every other plumbing fd it inherited, and replaces its fds 0, 1, 2 with
//! its own open of `/dev/null`: only the root (and a launcher) keeps the
//! test's stdio. A member sets up its session/group, then its children
//! (each one's subtree fully set up and reported before the next fork;
//! zombies exited, stopped ones stopped), then its threads, then writes its
//! own record and its subtree's up the report pipe. No sleeps: the root
//! prints READY when its last child has reported. Then every member runs a
//! light loop: one step of a 4 KiB buffer walk with a running checksum
//! (full recompute every 256 steps, a never-written per-node tag word) and
//! a counter pair, then `nanosleep` of 1 ms (in trees of more than 20
//! members one ms per 10 members: 20 ms for `wide200`). About every 64 ms
//! it also checks whether its parent is gone (its report pipe's write end
//! polls POLLERR); then it SIGKILLs its children and exits 3, so a killed
//! member leaves no orphans behind (a stopped member cannot notice, though).
//!
//! The root prints ONE line `READY <rootpid> <json>`, `<json>` without a
//! raw space (spaces in strings are `\u0020`), so the line has exactly
//! three space-separated words. `<rootpid>` is the root's pid in the
//! namespace the test started the victim in. The JSON:
//!
//! ```text
//! {"spec":"<spec>","members":<n>,["launcher":<pid>,]"nodes":[<node>,...]}
//! <node> = {"idx":i,"parent":<idx or -1>,"flags":"<flags as written>",
//!   "nsdepth":d,"state":"running"|"stopped"|"zombie",
//!   "pid":p,"ppid":pp,"pgid":g,"sid":s,"pid_in_parent_ns":q,"tids":[t,...]
//!   [,"exit_status":N] [,"up_fds":[own,parent's]] [,"pipe_fds":[own,parent's]]
//!   [,"sock_fds":[own,parent's]] [,"file_fd":f,"file":"<path>"]}
//! ```
//!
//! `nodes` is in DFS order (`nodes[i].idx == i`). `pid`, `ppid`, `pgid`,
//! `sid` and `tids` (main thread first) are what the member sees of ITSELF
//! inside its own pid namespace (`getpid`, `getppid`, `getpgrp`,
//! `getsid(0)`, `gettid`): ids of tasks outside that namespace read as 0
//! (a namespace init has `ppid` 0; a session or group inherited from an
//! outer level has `sid`/`pgid` 0). A zombie's values were taken just before
//! it exited. `pid_in_parent_ns` is the node's pid in its PARENT's pid
//! namespace (from `fork`'s return value; for the root: `<rootpid>`); it
//! equals `pid` unless the node is an `ns` init. `nsdepth` is the number of
//! pid namespaces between the root's parent's namespace and the node's (the
//! root: 0, or 1 with `ns`). `*_fds` give the fd numbers of the node's end
//! and of its parent's end (`up_fds`: the report pipe, absent for the
//! root); `file_fd` is the same number in both.
//!
//! Mapping to outer pids (how a test joins this with /proc, read from the
//! test's namespace = the root's parent's): `outer(0) = <rootpid>`; for a
//! node X with parent P, `outer(X)` is the child of `outer(P)` (in
//! `/proc/<outer(P)>/task/*/children`, zombies included, or `PPid:` in
//! `/proc/*/status`) whose `NSpid` entry number `nodes[P].nsdepth`
//! (0-based) equals `X.pid_in_parent_ns`. Then X's `NSpid`, `NSpgid`,
//! `NSsid` lines have `X.nsdepth + 1` entries and entry `X.nsdepth` equals
//! X's `pid`, `pgid`, `sid` (0 where hidden there too); the `NStgid`
//! entries of X's threads at that level are `tids`.
//!
//! ## SIGTERM, results
//!
//! The test sends SIGCONT to the `stopped` members, then SIGTERM to the
//! ROOT only. Every member, on SIGTERM (the handler only sets a flag):
//! 1. for each child: a `stopped` child must have shown `CLD_CONTINUED`;
//!    the parent appends `pong\n` to a `pipe` child's pipe and sends
//!    `world` on a `sockpair` child's socket, then forwards SIGTERM;
//! 2. collects each child's result from its report pipe (`OK <count>` or
//!    `FAIL <idx> <what>`; end of file is `died without a result (killed by
//!    signal 9)` etc.; the deadline is 40 s minus 2 s per tree level, at
//!    least 5 s, after which the child is SIGKILLed); after a child's OK it
//!    checks its own ends: the socket holds exactly `back!` (sent by the
//!    child), its pipe end is empty (the child drained it, so it is the same
//!    pipe), its shared-file offset is 78 (moved by the child, so the open
//!    file is shared); each zombie child must still be reported by
//!    `waitid(WEXITED | WNOHANG | WNOWAIT)` with status N;
//! 3. checks itself: pid, ppid, pgid, sid and main tid equal the READY
//!    values, the buffer and counter, the threads (same tids, each counter
//!    advances by 2 more within 10 s, then they stop and join: thread-local
//!    counter, tid and mask unchanged), its report pipe end is still a
//!    pipe's write end, a `pipe` end holds exactly `ping\npong\n` (10
//!    bytes), a `sockpair` end exactly `helloworld` (then it sends
//!    `back!`), a `sharedfile` fd has offset 77, size and content right and
//!    O_RDWR (then it moves the offset to 78), and the common signal state
//!    (mask, SIGTERM action, alternate stack, handler ran on it);
//! 4. reaps its children (a child that said OK must exit 0, a zombie with
//!    N), removes its shared files, and reports `OK <count>` (nodes of its
//!    subtree verified, zombies included) or the failure with the LOWEST
//!    node index found in its subtree, then exits 0 or 1.
//!
//! The root prints `OK tree=<number of nodes>` (every node, zombies
//! included; `threads64`: `OK tree=1`) and exits 0, or `FAIL <node index>
//! <what>` and exits 1. A failure a member notices before SIGTERM (its
//! checksum) is reported up at once and the member exits (the root prints
//! it at once; others' parents pass it on at SIGTERM). SIGTERM before READY,
//! SIGTERM to members other than the root, or no SIGCONT for `stopped`
//! members are not supported. SIGCHLD is reset to SIG_DFL at start (an
//! inherited SIG_IGN would make the kernel reap the zombies).
//!
//! With `PDUMP_VICTIM_RESTORED_ROOT=1` (tests that restore the tree), the
//! root does not compare its parent, session and group, which lie outside
//! the tree and cannot come back with it.
//!
//! # Self-test of the checks
//!
//! With `PDUMP_VICTIM_SELFTEST_CORRUPT` set (and not `0`), a victim
//! corrupts its own state right after READY so tests can prove that the
//! checks work:
//! * `loop`, `stopme`: any value flips one bit of the buffer behind the
//!   checksum's back (detected within 2^20 iterations: FAIL, exit 1).
//! * `pattern`: `touch` reads one word of page 0 (must stay non-present),
//!   `touch-extra` reads one word of the read-only region, any other value
//!   flips one bit of the first pattern page; detected by the final check.
//! * `zmm`: `1`/`zmm` flips bit 511 of zmm31 (ymm-fallback: bit 255 of
//!   ymm15), `k` bit 63 of k7, `mxcsr` the DAZ bit of MXCSR, `fcw` a
//!   rounding-control bit of the x87 control word, `gpr` bit 0 of r15,
//!   `x87` the sign of st(3). The main thread applies it inside its asm
//!   loop after READY; detected immediately (FAIL, exit 1).
//! * `tree`, `tree-preset`: `node=K` flips one bit of node K's buffer
//!   (detected within 256 loop steps: `FAIL K buffer checksum ...`).

use std::arch::asm;
use std::ffi::{c_int, c_void, CString};
use std::fmt::Display;
use std::io::Write;
use std::mem::{offset_of, zeroed};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr::{null, null_mut, read_volatile, write_volatile};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

const PAGE: usize = 4096;

// ---------------------------------------------------------------------------
// Shared definitions (the tests re-implement these)
// ---------------------------------------------------------------------------

/// SplitMix64 finaliser, as in the reference implementation:
/// `z = x + 0x9E3779B97F4A7C15; z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
/// z = (z ^ (z >> 27)) * 0x94D049BB133111EB; z ^ (z >> 31)`, all wrapping.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What `pattern` mode puts into one page.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PageKind {
    /// Never written nor read: must stay non-present (`i % 7 == 0`).
    Untouched,
    /// Explicitly written with zeros: present, all zero (`i % 5 == 0`,
    /// `i % 7 != 0`).
    Zero,
    /// Every u64 word `j` (0..512, native little endian) is
    /// [`pattern_word`]`(seed, i, j)`.
    Pattern,
}

/// The kind of page `i` (0-based) in `pattern` mode.
pub fn pattern_page_kind(i: u64) -> PageKind {
    if i.is_multiple_of(7) {
        PageKind::Untouched
    } else if i.is_multiple_of(5) {
        PageKind::Zero
    } else {
        PageKind::Pattern
    }
}

/// Word `j` (0..512) of pattern page `i`: `splitmix64(seed ^ (i * 512 + j))`
/// (wrapping arithmetic).
pub fn pattern_word(seed: u64, i: u64, j: u64) -> u64 {
    splitmix64(seed ^ i.wrapping_mul(512).wrapping_add(j))
}

// ---------------------------------------------------------------------------
// Output and small helpers
// ---------------------------------------------------------------------------

fn emit(line: &str) {
    let out = std::io::stdout();
    let mut l = out.lock();
    let _ = writeln!(l, "{line}");
    let _ = l.flush();
}

fn fail(msg: impl Display) -> ! {
    emit(&format!("FAIL {msg}"));
    // SAFETY: _exit has no preconditions; stdout was flushed above.
    unsafe { libc::_exit(1) }
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn getpid() -> i32 {
    // SAFETY: no preconditions.
    unsafe { libc::getpid() }
}

fn corrupt_request() -> Option<String> {
    match std::env::var("PDUMP_VICTIM_SELFTEST_CORRUPT") {
        Ok(v) if !v.is_empty() && v != "0" => Some(v),
        _ => None,
    }
}

fn parse_num(s: Option<&String>, default: u64, what: &str) -> u64 {
    let Some(s) = s else { return default };
    let r = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.unwrap_or_else(|_| {
        eprintln!("pdump-victim: bad {what} {s:?}");
        std::process::exit(2)
    })
}

/// Hide a value from the optimiser while keeping it in a register.
#[inline(always)]
fn opaque(mut x: u64) -> u64 {
    // SAFETY: an empty asm block that only "modifies" a register operand.
    unsafe { asm!("/* {0} */", inout(reg) x, options(nomem, nostack, preserves_flags)) };
    x
}

fn monotonic_ns() -> u128 {
    // SAFETY: plain clock_gettime into a local.
    let mut ts: libc::timespec = unsafe { zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

/// Sleep up to `ms` milliseconds; an interrupting signal just ends it early.
fn nap(ms: u64) {
    let ts = libc::timespec {
        tv_sec: (ms / 1000) as _,
        tv_nsec: ((ms % 1000) * 1_000_000) as _,
    };
    // SAFETY: valid timespec; the remainder is not wanted.
    unsafe { libc::nanosleep(&ts, null_mut()) };
}

// ---------------------------------------------------------------------------
// Signal state: mask, SIGTERM action, alternate stack
// ---------------------------------------------------------------------------

fn sigbit(sig: c_int) -> u64 {
    1u64 << (sig - 1)
}

/// Set this thread's blocked mask exactly (raw syscall: no libc filtering).
fn set_mask(mask: u64) {
    // SAFETY: valid pointer to an 8-byte kernel sigset.
    let r = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &mask as *const u64,
            null_mut::<u64>(),
            8usize,
        )
    };
    if r != 0 {
        fail(format!("rt_sigprocmask(SETMASK): {}", errno()));
    }
}

fn get_mask() -> u64 {
    let mut cur = 0u64;
    // SAFETY: valid pointer to an 8-byte kernel sigset.
    let r = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_BLOCK,
            null::<u64>(),
            &mut cur as *mut u64,
            8usize,
        )
    };
    if r != 0 {
        fail(format!("rt_sigprocmask(query): {}", errno()));
    }
    cur
}

/// The kernel's `struct sigaction` on x86_64, as `rt_sigaction` reports it.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
struct KSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

fn query_action(sig: c_int) -> KSigaction {
    let mut k = KSigaction::default();
    // SAFETY: valid out pointer of the kernel layout, sigsetsize 8.
    let r = unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            null::<KSigaction>(),
            &mut k as *mut _,
            8usize,
        )
    };
    if r != 0 {
        fail(format!("rt_sigaction({sig}) query: {}", errno()));
    }
    k
}

/// Install a handler through libc (which supplies the restorer) and return
/// the kernel's view of the result.
fn install_handler(sig: c_int, handler: usize, flags: c_int) -> KSigaction {
    // SAFETY: sigaction with a zeroed struct and a valid extern "C" handler.
    unsafe {
        let mut sa: libc::sigaction = zeroed();
        sa.sa_sigaction = handler;
        sa.sa_flags = flags;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(sig, &sa, null_mut()) != 0 {
            fail(format!("sigaction({sig}): {}", errno()));
        }
    }
    query_action(sig)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct AltStack {
    sp: usize,
    size: usize,
    flags: i32,
}

const ALTSTACK_SIZE: usize = 64 * 1024;

fn query_altstack() -> AltStack {
    // SAFETY: query only, into a local.
    let mut ss: libc::stack_t = unsafe { zeroed() };
    if unsafe { libc::sigaltstack(null(), &mut ss) } != 0 {
        fail(format!("sigaltstack query: {}", errno()));
    }
    AltStack {
        sp: ss.ss_sp as usize,
        size: ss.ss_size,
        flags: ss.ss_flags,
    }
}

/// Give the calling thread its own alternate signal stack (a separate
/// mapping) and return the kernel's view of it.
fn install_altstack() -> AltStack {
    // SAFETY: fresh anonymous mapping, then sigaltstack on it (never freed).
    unsafe {
        let p = libc::mmap(
            null_mut(),
            ALTSTACK_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            fail(format!("mmap altstack: {}", errno()));
        }
        let ss = libc::stack_t {
            ss_sp: p,
            ss_flags: 0,
            ss_size: ALTSTACK_SIZE,
        };
        if libc::sigaltstack(&ss, null_mut()) != 0 {
            fail(format!("sigaltstack: {}", errno()));
        }
    }
    query_altstack()
}

/// Set by the SIGTERM handler.
static TERM: AtomicBool = AtomicBool::new(false);
/// 0: the SIGTERM handler never ran; 1: it ran on the alternate stack;
/// 2: it ran at least once somewhere else.
static TERM_ALT: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_term(_sig: c_int) {
    // Only async-signal-safe work: one sigaltstack query and atomics.
    // SAFETY: query into a local.
    let mut ss: libc::stack_t = unsafe { zeroed() };
    let ok = unsafe { libc::sigaltstack(null(), &mut ss) } == 0;
    let here = &ss as *const libc::stack_t as usize;
    let lo = ss.ss_sp as usize;
    let on = ok && (ss.ss_flags & libc::SS_ONSTACK) != 0 && here >= lo && here < lo + ss.ss_size;
    TERM_ALT.fetch_max(if on { 1 } else { 2 }, Ordering::SeqCst);
    TERM.store(true, Ordering::SeqCst);
}

fn term_requested() -> bool {
    TERM.load(Ordering::SeqCst)
}

/// Wait for SIGTERM in short `nanosleep`s (no lost-wakeup race).
fn wait_for_term() {
    while !term_requested() {
        nap(100);
    }
}

/// Per-thread signal state that must survive.
fn verify_thread(what: &str, mask: u64, alt: &AltStack) -> Result<(), String> {
    let cur = get_mask();
    if cur != mask {
        return Err(format!("{what}: signal mask {cur:#x}, expected {mask:#x}"));
    }
    let a = query_altstack();
    if a != *alt {
        return Err(format!("{what}: sigaltstack {a:x?}, expected {alt:x?}"));
    }
    Ok(())
}

/// The process-wide and main-thread signal state set up by [`common_init`].
struct Common {
    mask: u64,
    alt: AltStack,
    term: KSigaction,
}

/// Block exactly `{SIGUSR2} | extra` in the calling (main) thread, give it an
/// alternate stack and install the SIGTERM handler on it.
fn common_init(extra_mask: u64) -> Common {
    let mask = sigbit(libc::SIGUSR2) | extra_mask;
    set_mask(mask);
    let alt = install_altstack();
    let term = install_handler(
        libc::SIGTERM,
        on_term as *const () as usize,
        libc::SA_RESTART | libc::SA_ONSTACK,
    );
    Common { mask, alt, term }
}

impl Common {
    /// The final check of the signal state (call from the main thread, after
    /// SIGTERM arrived).
    fn verify(&self) -> Result<(), String> {
        verify_thread("main thread", self.mask, &self.alt)?;
        let t = query_action(libc::SIGTERM);
        if t != self.term {
            return Err(format!("SIGTERM action {t:x?}, expected {:x?}", self.term));
        }
        match TERM_ALT.load(Ordering::SeqCst) {
            1 => Ok(()),
            0 => Err("SIGTERM handler never ran".into()),
            _ => Err("SIGTERM handler ran off the alternate signal stack".into()),
        }
    }
}

// ---------------------------------------------------------------------------
// loop / stopme
// ---------------------------------------------------------------------------

const LOOP_WORDS: usize = 1 << 20;
const LOOP_FULL_CHECK: u64 = (1 << 20) - 1;

fn loop_weight(i: usize) -> u64 {
    (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1
}

/// (position-weighted sum, xor) of the buffer.
fn loop_checksums(buf: &[u64]) -> (u64, u64) {
    let mut s = 0u64;
    let mut x = 0u64;
    for (i, &w) in buf.iter().enumerate() {
        s = s.wrapping_add(w.wrapping_mul(loop_weight(i)));
        x ^= w;
    }
    (s, x)
}

/// The `loop` mode state carried between bursts.
#[derive(Clone, Copy)]
struct LoopState {
    rng: u64,
    iters: u64,
    /// Always `!iters`.
    down: u64,
    /// Sentinels rotated every iteration: always `s0 ^ s1 == sx`.
    s0: u64,
    s1: u64,
    sx: u64,
    /// Running checksums of the buffer (see [`loop_checksums`]).
    sum: u64,
    xor: u64,
}

#[cold]
#[inline(never)]
fn loop_sentinel_failure(st: &LoopState) -> String {
    format!(
        "loop: register sentinels corrupted at iteration {}: down={:#x} s0={:#x} s1={:#x} sx={:#x} rng={:#x}",
        st.iters, st.down, st.s0, st.s1, st.sx, st.rng
    )
}

/// Run iterations until the next multiple of 2^20 or until SIGTERM
/// (returns `true`). Everything lives in registers in here; the sentinels
/// are checked every iteration.
#[inline(never)]
fn loop_burst(buf: &mut [u64], state: &mut LoopState) -> Result<bool, String> {
    assert_eq!(buf.len(), LOOP_WORDS);
    let LoopState {
        mut rng,
        mut iters,
        mut down,
        mut s0,
        mut s1,
        mut sx,
        mut sum,
        mut xor,
    } = *state;
    let mut term = false;
    loop {
        if term_requested() {
            term = true;
            break;
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let idx = (rng >> 20) as usize & (LOOP_WORDS - 1);
        let old = buf[idx];
        let new = old.rotate_left(9) ^ rng;
        buf[idx] = new;
        sum = sum.wrapping_add(new.wrapping_sub(old).wrapping_mul(loop_weight(idx)));
        xor ^= old ^ new;
        iters += 1;
        down = opaque(down).wrapping_sub(1);
        s0 = opaque(s0).rotate_left(1);
        s1 = opaque(s1).rotate_left(1);
        sx = opaque(sx).rotate_left(1);
        if iters ^ down != u64::MAX || s0 ^ s1 != sx || rng == 0 {
            *state = LoopState {
                rng,
                iters,
                down,
                s0,
                s1,
                sx,
                sum,
                xor,
            };
            return Err(loop_sentinel_failure(state));
        }
        if iters & LOOP_FULL_CHECK == 0 {
            break;
        }
    }
    *state = LoopState {
        rng,
        iters,
        down,
        s0,
        s1,
        sx,
        sum,
        xor,
    };
    Ok(term)
}

fn mode_loop(stop_self: bool) -> Result<String, String> {
    let common = common_init(0);
    let mut buf: Vec<u64> = (0..LOOP_WORDS)
        .map(|i| splitmix64(0x100F ^ i as u64))
        .collect();
    let (sum, xor) = loop_checksums(&buf);
    emit(&format!(
        "READY {} {:#x} {}",
        getpid(),
        buf.as_ptr() as usize,
        LOOP_WORDS * 8
    ));
    if corrupt_request().is_some() {
        // SAFETY: in-bounds element of our own buffer.
        unsafe {
            let p = buf.as_mut_ptr().add(12345);
            write_volatile(p, read_volatile(p) ^ (1 << 17));
        }
    }
    if stop_self {
        // SAFETY: raise has no preconditions.
        unsafe { libc::raise(libc::SIGSTOP) };
    }

    let mut st = LoopState {
        rng: opaque(0x2545_F491_4F6C_DD1D),
        iters: 0,
        down: u64::MAX,
        s0: 0x0123_4567_89AB_CDEF,
        s1: 0xF0E1_D2C3_B4A5_9687,
        sx: 0x0123_4567_89AB_CDEF ^ 0xF0E1_D2C3_B4A5_9687,
        sum,
        xor,
    };
    loop {
        let term = loop_burst(&mut buf, &mut st)?;
        let (s, x) = loop_checksums(&buf);
        if (s, x) != (st.sum, st.xor) {
            return Err(format!(
                "loop: {}buffer checksum ({s:#x}, {x:#x}) != running ({:#x}, {:#x}) at iteration {}",
                if term { "final " } else { "" },
                st.sum,
                st.xor,
                st.iters
            ));
        }
        if term {
            break;
        }
    }
    if st.iters ^ st.down != u64::MAX || st.s0 ^ st.s1 != st.sx {
        return Err(format!("final check: {}", loop_sentinel_failure(&st)));
    }
    let iters = st.iters;
    common.verify()?;
    Ok(format!("OK iterations={iters}"))
}

// ---------------------------------------------------------------------------
// zmm
// ---------------------------------------------------------------------------

/// Everything one thread's register loop needs, addressed from r8.
#[repr(C, align(64))]
struct RegCtx {
    /// Expected zmm0..31 (ymm mode: the first 4 words of 0..15).
    zmm: [[u64; 8]; 32],
    /// Expected k1..k7 at index 1..7.
    k: [u64; 8],
    /// Expected st(0)..st(7).
    st: [f64; 8],
    /// Expected r12..r15.
    gpr: [u64; 4],
    /// Self-test: xor mask for zmm31 (bit 511).
    onebit_z: [u64; 8],
    /// Self-test: xor mask for ymm15 (bit 255).
    onebit_y: [u64; 4],
    /// ymm store scratch (fallback mode).
    scratch: [u64; 4],
    mxcsr: u32,
    /// Expected x87 control word (low 16 bits).
    fcw: u32,
    scr_mxcsr: u32,
    scr_fcw: u32,
    orig_mxcsr: u32,
    orig_fcw: u32,
    /// Set to 1 by the asm once the registers are loaded.
    started: AtomicU32,
    /// Self-test corruption request (taken with xchg by the asm).
    corrupt: AtomicU32,
}

const ZMM_BATCH: u32 = 1 << 16;

impl RegCtx {
    fn new(t: u64) -> Box<RegCtx> {
        let mut zmm = [[0u64; 8]; 32];
        for (i, r) in zmm.iter_mut().enumerate() {
            for (l, w) in r.iter_mut().enumerate() {
                *w = splitmix64(0x5A5A_0000_0000 ^ (t << 16) ^ ((i as u64) << 4) ^ l as u64);
            }
        }
        let mut k = [0u64; 8];
        for (i, w) in k.iter_mut().enumerate().skip(1) {
            *w = splitmix64(0x6B6B_0000_0000 ^ (t << 16) ^ i as u64);
        }
        let mut st = [0f64; 8];
        for (i, v) in st.iter_mut().enumerate() {
            // Exact small values: 1.5 * (t * 100 + i + 1), negated for odd i.
            let m = 1.5 * (t * 100 + i as u64 + 1) as f64;
            *v = if i % 2 == 1 { -m } else { m };
        }
        let mut gpr = [0u64; 4];
        for (i, w) in gpr.iter_mut().enumerate() {
            *w = splitmix64(0x7C7C_0000_0000 ^ (t << 16) ^ i as u64);
        }
        Box::new(RegCtx {
            zmm,
            k,
            st,
            gpr,
            onebit_z: [0, 0, 0, 0, 0, 0, 0, 1 << 63],
            onebit_y: [0, 0, 0, 1 << 63],
            scratch: [0; 4],
            // All exceptions masked, FTZ, DAZ, rounding toward zero (t=0)
            // or toward +inf (t=1).
            mxcsr: if t == 0 { 0xFFC0 } else { 0xDFC0 },
            // All exceptions masked, double precision, rounding toward
            // +inf (t=0) or toward zero (t=1).
            fcw: if t == 0 { 0x0A7F } else { 0x0E7F },
            scr_mxcsr: 0,
            scr_fcw: 0,
            orig_mxcsr: 0,
            orig_fcw: 0,
            started: AtomicU32::new(0),
            corrupt: AtomicU32::new(0),
        })
    }
}

/// Runs the AVX-512 register loop until SIGTERM or a mismatch. Returns
/// (0 or the id of the mismatching register, number of full checks).
///
/// # Safety
/// The CPU must support AVX-512F and AVX-512BW; `ctx` must stay valid.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn reg_loop_avx512(ctx: *mut RegCtx, ready: &[u8]) -> (u32, u64) {
    let code: u32;
    let checks: u64;
    // SAFETY: all registers the block changes are declared; MXCSR and the
    // x87 control word are restored and the x87 stack emptied on exit.
    unsafe {
        asm!(
            "stmxcsr dword ptr [r8 + {o_omx}]",
            "fnstcw word ptr [r8 + {o_ofcw}]",
            "fninit",
            "fldcw word ptr [r8 + {o_fcw}]",
            "ldmxcsr dword ptr [r8 + {o_mx}]",
            ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
            r"vmovdqu64 zmm\i, zmmword ptr [r8 + \i*64]",
            ".endr",
            ".irp i, 1,2,3,4,5,6,7",
            r"kmovq k\i, qword ptr [r8 + {o_k} + \i*8]",
            ".endr",
            ".irp i, 7,6,5,4,3,2,1,0",
            r"fld qword ptr [r8 + {o_st} + \i*8]",
            ".endr",
            "mov dword ptr [r8 + {o_started}], 1",
            "test rdx, rdx",
            "jz 2f",
            "mov eax, 1",
            "mov edi, 1",
            "syscall",
            "2:",
            "mov r12, qword ptr [r8 + {o_gpr}]",
            "mov r13, qword ptr [r8 + {o_gpr} + 8]",
            "mov r14, qword ptr [r8 + {o_gpr} + 16]",
            "mov r15, qword ptr [r8 + {o_gpr} + 24]",
            "xor edx, edx",
            // batch loop
            "3:",
            "mov ecx, {batch}",
            "4:",
            ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
            r"mov r11d, 0x100 + \i",
            r"vpcmpeqd k0, zmm\i, zmmword ptr [r8 + \i*64]",
            "kortestw k0, k0",
            "jnc 9f",
            ".endr",
            ".irp i, 1,2,3,4,5,6,7",
            r"mov r11d, 0x200 + \i",
            r"kmovq rax, k\i",
            r"cmp rax, qword ptr [r8 + {o_k} + \i*8]",
            "jne 9f",
            ".endr",
            ".irp i, 12,13,14,15",
            r"mov r11d, 0x500 + \i",
            r"cmp r\i, qword ptr [r8 + {o_gpr} + (\i - 12)*8]",
            "jne 9f",
            ".endr",
            "mov r11d, 0x300",
            "stmxcsr dword ptr [r8 + {o_smx}]",
            "mov eax, dword ptr [r8 + {o_smx}]",
            "cmp eax, dword ptr [r8 + {o_mx}]",
            "jne 9f",
            "mov r11d, 0x400",
            "fnstcw word ptr [r8 + {o_sfcw}]",
            "movzx eax, word ptr [r8 + {o_sfcw}]",
            "cmp eax, dword ptr [r8 + {o_fcw}]",
            "jne 9f",
            ".irp i, 0,1,2,3,4,5,6,7",
            r"mov r11d, 0x600 + \i",
            r"fxch st(\i)",
            r"fcom qword ptr [r8 + {o_st} + \i*8]",
            "fnstsw ax",
            r"fxch st(\i)",
            "and ah, 0x45",
            "cmp ah, 0x40",
            "jne 9f",
            ".endr",
            "inc rdx",
            "dec ecx",
            "jnz 4b",
            // poll SIGTERM, then the self-test request
            "cmp byte ptr [r9], 0",
            "jne 8f",
            "xor eax, eax",
            "xchg eax, dword ptr [r8 + {o_corrupt}]",
            "test eax, eax",
            "jz 3b",
            "cmp eax, 2",
            "jne 5f",
            "kmovq rax, k7",
            "btc rax, 63",
            "kmovq k7, rax",
            "jmp 3b",
            "5:",
            "cmp eax, 3",
            "jne 5f",
            "stmxcsr dword ptr [r8 + {o_smx}]",
            "xor dword ptr [r8 + {o_smx}], 0x40",
            "ldmxcsr dword ptr [r8 + {o_smx}]",
            "jmp 3b",
            "5:",
            "cmp eax, 4",
            "jne 5f",
            "fnstcw word ptr [r8 + {o_sfcw}]",
            "xor word ptr [r8 + {o_sfcw}], 0x800",
            "fldcw word ptr [r8 + {o_sfcw}]",
            "jmp 3b",
            "5:",
            "cmp eax, 5",
            "jne 5f",
            "btc r15, 0",
            "jmp 3b",
            "5:",
            "cmp eax, 6",
            "jne 5f",
            "fxch st(3)",
            "fchs",
            "fxch st(3)",
            "jmp 3b",
            "5:",
            "vpxorq zmm31, zmm31, zmmword ptr [r8 + {o_onebit_z}]",
            "jmp 3b",
            "8:",
            "xor eax, eax",
            "jmp 7f",
            "9:",
            "mov eax, r11d",
            "7:",
            ".rept 8",
            "fstp st(0)",
            ".endr",
            "fldcw word ptr [r8 + {o_ofcw}]",
            "ldmxcsr dword ptr [r8 + {o_omx}]",
            "vzeroupper",
            o_omx = const offset_of!(RegCtx, orig_mxcsr),
            o_ofcw = const offset_of!(RegCtx, orig_fcw),
            o_mx = const offset_of!(RegCtx, mxcsr),
            o_fcw = const offset_of!(RegCtx, fcw),
            o_smx = const offset_of!(RegCtx, scr_mxcsr),
            o_sfcw = const offset_of!(RegCtx, scr_fcw),
            o_k = const offset_of!(RegCtx, k),
            o_st = const offset_of!(RegCtx, st),
            o_gpr = const offset_of!(RegCtx, gpr),
            o_started = const offset_of!(RegCtx, started),
            o_corrupt = const offset_of!(RegCtx, corrupt),
            o_onebit_z = const offset_of!(RegCtx, onebit_z),
            batch = const ZMM_BATCH,
            in("r8") ctx,
            in("r9") TERM.as_ptr(),
            inout("rsi") ready.as_ptr() => _,
            inout("rdx") ready.len() => checks,
            out("rax") code,
            out("rcx") _, out("rdi") _, out("r11") _,
            out("r12") _, out("r13") _, out("r14") _, out("r15") _,
            out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
            out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
            out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
            out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _,
            out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _,
            out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
            out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _,
            out("zmm28") _, out("zmm29") _, out("zmm30") _, out("zmm31") _,
            out("k0") _, out("k1") _, out("k2") _, out("k3") _,
            out("k4") _, out("k5") _, out("k6") _, out("k7") _,
            out("st(0)") _, out("st(1)") _, out("st(2)") _, out("st(3)") _,
            out("st(4)") _, out("st(5)") _, out("st(6)") _, out("st(7)") _,
            options(nostack),
        );
    }
    (code, checks)
}

/// Fallback without AVX-512: ymm0..15 (full 256 bits), no opmask registers.
///
/// # Safety
/// The CPU must support AVX; `ctx` must stay valid.
#[target_feature(enable = "avx")]
unsafe fn reg_loop_ymm(ctx: *mut RegCtx, ready: &[u8]) -> (u32, u64) {
    let code: u32;
    let checks: u64;
    // SAFETY: as in reg_loop_avx512.
    unsafe {
        asm!(
            "stmxcsr dword ptr [r8 + {o_omx}]",
            "fnstcw word ptr [r8 + {o_ofcw}]",
            "fninit",
            "fldcw word ptr [r8 + {o_fcw}]",
            "ldmxcsr dword ptr [r8 + {o_mx}]",
            ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
            r"vmovdqu ymm\i, ymmword ptr [r8 + \i*64]",
            ".endr",
            ".irp i, 7,6,5,4,3,2,1,0",
            r"fld qword ptr [r8 + {o_st} + \i*8]",
            ".endr",
            "mov dword ptr [r8 + {o_started}], 1",
            "test rdx, rdx",
            "jz 2f",
            "mov eax, 1",
            "mov edi, 1",
            "syscall",
            "2:",
            "mov r12, qword ptr [r8 + {o_gpr}]",
            "mov r13, qword ptr [r8 + {o_gpr} + 8]",
            "mov r14, qword ptr [r8 + {o_gpr} + 16]",
            "mov r15, qword ptr [r8 + {o_gpr} + 24]",
            "xor edx, edx",
            "3:",
            "mov ecx, {batch}",
            "4:",
            ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
            r"mov r11d, 0x700 + \i",
            r"vmovdqu ymmword ptr [r8 + {o_scr}], ymm\i",
            "mov rax, qword ptr [r8 + {o_scr}]",
            r"cmp rax, qword ptr [r8 + \i*64]",
            "jne 9f",
            "mov rax, qword ptr [r8 + {o_scr} + 8]",
            r"cmp rax, qword ptr [r8 + \i*64 + 8]",
            "jne 9f",
            "mov rax, qword ptr [r8 + {o_scr} + 16]",
            r"cmp rax, qword ptr [r8 + \i*64 + 16]",
            "jne 9f",
            "mov rax, qword ptr [r8 + {o_scr} + 24]",
            r"cmp rax, qword ptr [r8 + \i*64 + 24]",
            "jne 9f",
            ".endr",
            ".irp i, 12,13,14,15",
            r"mov r11d, 0x500 + \i",
            r"cmp r\i, qword ptr [r8 + {o_gpr} + (\i - 12)*8]",
            "jne 9f",
            ".endr",
            "mov r11d, 0x300",
            "stmxcsr dword ptr [r8 + {o_smx}]",
            "mov eax, dword ptr [r8 + {o_smx}]",
            "cmp eax, dword ptr [r8 + {o_mx}]",
            "jne 9f",
            "mov r11d, 0x400",
            "fnstcw word ptr [r8 + {o_sfcw}]",
            "movzx eax, word ptr [r8 + {o_sfcw}]",
            "cmp eax, dword ptr [r8 + {o_fcw}]",
            "jne 9f",
            ".irp i, 0,1,2,3,4,5,6,7",
            r"mov r11d, 0x600 + \i",
            r"fxch st(\i)",
            r"fcom qword ptr [r8 + {o_st} + \i*8]",
            "fnstsw ax",
            r"fxch st(\i)",
            "and ah, 0x45",
            "cmp ah, 0x40",
            "jne 9f",
            ".endr",
            "inc rdx",
            "dec ecx",
            "jnz 4b",
            "cmp byte ptr [r9], 0",
            "jne 8f",
            "xor eax, eax",
            "xchg eax, dword ptr [r8 + {o_corrupt}]",
            "test eax, eax",
            "jz 3b",
            "cmp eax, 3",
            "jne 5f",
            "stmxcsr dword ptr [r8 + {o_smx}]",
            "xor dword ptr [r8 + {o_smx}], 0x40",
            "ldmxcsr dword ptr [r8 + {o_smx}]",
            "jmp 3b",
            "5:",
            "cmp eax, 4",
            "jne 5f",
            "fnstcw word ptr [r8 + {o_sfcw}]",
            "xor word ptr [r8 + {o_sfcw}], 0x800",
            "fldcw word ptr [r8 + {o_sfcw}]",
            "jmp 3b",
            "5:",
            "cmp eax, 5",
            "jne 5f",
            "btc r15, 0",
            "jmp 3b",
            "5:",
            "cmp eax, 6",
            "jne 5f",
            "fxch st(3)",
            "fchs",
            "fxch st(3)",
            "jmp 3b",
            "5:",
            "vxorps ymm15, ymm15, ymmword ptr [r8 + {o_onebit_y}]",
            "jmp 3b",
            "8:",
            "xor eax, eax",
            "jmp 7f",
            "9:",
            "mov eax, r11d",
            "7:",
            ".rept 8",
            "fstp st(0)",
            ".endr",
            "fldcw word ptr [r8 + {o_ofcw}]",
            "ldmxcsr dword ptr [r8 + {o_omx}]",
            "vzeroupper",
            o_omx = const offset_of!(RegCtx, orig_mxcsr),
            o_ofcw = const offset_of!(RegCtx, orig_fcw),
            o_mx = const offset_of!(RegCtx, mxcsr),
            o_fcw = const offset_of!(RegCtx, fcw),
            o_smx = const offset_of!(RegCtx, scr_mxcsr),
            o_sfcw = const offset_of!(RegCtx, scr_fcw),
            o_st = const offset_of!(RegCtx, st),
            o_gpr = const offset_of!(RegCtx, gpr),
            o_scr = const offset_of!(RegCtx, scratch),
            o_started = const offset_of!(RegCtx, started),
            o_corrupt = const offset_of!(RegCtx, corrupt),
            o_onebit_y = const offset_of!(RegCtx, onebit_y),
            batch = const ZMM_BATCH,
            in("r8") ctx,
            in("r9") TERM.as_ptr(),
            inout("rsi") ready.as_ptr() => _,
            inout("rdx") ready.len() => checks,
            out("rax") code,
            out("rcx") _, out("rdi") _, out("r11") _,
            out("r12") _, out("r13") _, out("r14") _, out("r15") _,
            out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
            out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
            out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
            out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
            out("st(0)") _, out("st(1)") _, out("st(2)") _, out("st(3)") _,
            out("st(4)") _, out("st(5)") _, out("st(6)") _, out("st(7)") _,
            options(nostack),
        );
    }
    (code, checks)
}

fn reg_name(code: u32) -> String {
    let i = code & 0xFF;
    match code >> 8 {
        1 => format!("zmm{i}"),
        2 => format!("k{i}"),
        3 => "MXCSR".into(),
        4 => "x87 control word".into(),
        5 => format!("r{i}"),
        6 => format!("st({i})"),
        7 => format!("ymm{i}"),
        _ => format!("register code {code:#x}"),
    }
}

fn run_regs(ctx: usize, avx512: bool, ready: &[u8]) -> (u32, u64) {
    let ctx = ctx as *mut RegCtx;
    // SAFETY: the features were checked by the caller; ctx is leaked.
    unsafe {
        if avx512 {
            reg_loop_avx512(ctx, ready)
        } else {
            reg_loop_ymm(ctx, ready)
        }
    }
}

fn mode_zmm() -> Result<String, String> {
    let common = common_init(0);
    let forced = std::env::var("PDUMP_VICTIM_FORCE_YMM").is_ok_and(|v| !v.is_empty() && v != "0");
    let avx512 = !forced
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw");
    if !avx512 && !std::arch::is_x86_feature_detected!("avx") {
        return Err("zmm: the CPU supports neither AVX-512 nor AVX".into());
    }
    let corrupt = corrupt_request().map(|v| match v.as_str() {
        "k" if avx512 => 2,
        "mxcsr" => 3,
        "fcw" => 4,
        "gpr" => 5,
        "x87" => 6,
        _ => 1,
    });
    let ctx_main: &'static RegCtx = Box::leak(RegCtx::new(0));
    let ctx_worker: &'static RegCtx = Box::leak(RegCtx::new(1));
    if let Some(c) = corrupt {
        ctx_main.corrupt.store(c, Ordering::SeqCst);
    }
    let wptr = ctx_worker as *const RegCtx as usize;
    let mask = common.mask;
    let worker = std::thread::Builder::new()
        .name("zmm-worker".into())
        .spawn(move || {
            let alt = install_altstack();
            let (code, checks) = run_regs(wptr, avx512, &[]);
            if code != 0 {
                fail(format!("zmm: worker thread: {} corrupted", reg_name(code)));
            }
            verify_thread("zmm worker thread", mask, &alt).map(|()| checks)
        })
        .map_err(|e| format!("zmm: spawn: {e}"))?;
    while ctx_worker.started.load(Ordering::SeqCst) == 0 {
        if worker.is_finished() {
            return Err("zmm: worker thread ended before loading its registers".into());
        }
        std::thread::yield_now();
    }
    let note = if avx512 { "avx512" } else { "ymm-fallback" };
    let ready = format!("READY {} {}\n", getpid(), note);
    let (code, checks_main) =
        run_regs(ctx_main as *const RegCtx as usize, avx512, ready.as_bytes());
    if code != 0 {
        return Err(format!("zmm: main thread: {} corrupted", reg_name(code)));
    }
    let checks_worker = worker
        .join()
        .map_err(|_| "zmm: worker panicked".to_string())??;
    if checks_main == 0 || checks_worker == 0 {
        return Err(format!(
            "zmm: no complete checks (main {checks_main}, worker {checks_worker})"
        ));
    }
    common.verify()?;
    Ok(format!("OK checks={}", checks_main + checks_worker))
}

// ---------------------------------------------------------------------------
// threads
// ---------------------------------------------------------------------------

thread_local! {
    static TLS_VAL: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn thread_stack_word(idx: usize, j: usize) -> u64 {
    splitmix64(0x57AC_0000_0000 ^ ((idx as u64) << 20) ^ j as u64)
}

struct ThreadsShared {
    stop: AtomicBool,
    started: AtomicUsize,
    total: AtomicU64,
    counts: Vec<AtomicU64>,
}

fn thread_worker(idx: usize, sh: &ThreadsShared, mask: u64) -> u64 {
    let alt = install_altstack();
    let tls_expect = opaque(splitmix64(0x7EAD_0000 ^ idx as u64));
    TLS_VAL.with(|c| c.set(tls_expect));
    let mut stackbuf = [0u64; 512];
    for (j, w) in stackbuf.iter_mut().enumerate() {
        // SAFETY: a valid element of a local array.
        unsafe { write_volatile(w, thread_stack_word(idx, j)) };
    }
    let verify_stack = |buf: &[u64; 512], what: &str| {
        for (j, w) in buf.iter().enumerate() {
            // SAFETY: a valid element of a local array.
            let v = unsafe { read_volatile(w) };
            if v != thread_stack_word(idx, j) {
                fail(format!(
                    "threads: thread {idx}: {what}: stack word {j} is {v:#x}"
                ));
            }
        }
    };
    let mut counter = 0u64;
    sh.started.fetch_add(1, Ordering::SeqCst);
    while !sh.stop.load(Ordering::Acquire) {
        counter += 1;
        sh.counts[idx].store(counter, Ordering::Relaxed);
        sh.total.fetch_add(1, Ordering::Relaxed);
        let j = counter as usize & 511;
        // SAFETY: a valid element of a local array.
        let v = unsafe { read_volatile(&stackbuf[j]) };
        if v != thread_stack_word(idx, j) {
            fail(format!(
                "threads: thread {idx}: stack word {j} is {v:#x} at iteration {counter}"
            ));
        }
        // SAFETY: the cell belongs to this thread.
        let t = TLS_VAL.with(|c| unsafe { read_volatile(c.as_ptr()) });
        if t != tls_expect {
            fail(format!(
                "threads: thread {idx}: thread-local value {t:#x}, expected {tls_expect:#x}"
            ));
        }
        if counter & 4095 == 0 {
            verify_stack(&stackbuf, "periodic check");
            let c = sh.counts[idx].load(Ordering::Relaxed);
            if c != counter {
                fail(format!(
                    "threads: thread {idx}: shared counter {c}, local {counter}"
                ));
            }
        }
    }
    verify_stack(&stackbuf, "final check");
    if let Err(e) = verify_thread(&format!("threads: thread {idx}"), mask, &alt) {
        fail(e);
    }
    counter
}

fn mode_threads(n: usize) -> Result<String, String> {
    if n == 0 {
        return Err("threads: N must be at least 1".into());
    }
    let common = common_init(sigbit(libc::SIGTERM));
    let sh = Arc::new(ThreadsShared {
        stop: AtomicBool::new(false),
        started: AtomicUsize::new(0),
        total: AtomicU64::new(0),
        counts: (0..n).map(|_| AtomicU64::new(0)).collect(),
    });
    let mut handles = Vec::new();
    for idx in 0..n {
        let sh = sh.clone();
        let mask = common.mask;
        let h = std::thread::Builder::new()
            .name(format!("victim-{idx}"))
            .spawn(move || thread_worker(idx, &sh, mask))
            .map_err(|e| format!("threads: spawn: {e}"))?;
        handles.push(h);
    }
    while sh.started.load(Ordering::SeqCst) != n {
        if handles.iter().any(|h| h.is_finished()) {
            return Err("threads: a worker ended before starting".into());
        }
        std::thread::yield_now();
    }
    emit(&format!("READY {} {}", getpid(), n));
    let suspend_mask = sigbit(libc::SIGUSR2);
    while !term_requested() {
        // SAFETY: valid pointer to an 8-byte kernel sigset.
        unsafe { libc::syscall(libc::SYS_rt_sigsuspend, &suspend_mask as *const u64, 8usize) };
    }
    sh.stop.store(true, Ordering::Release);
    let mut sum = 0u64;
    for (idx, h) in handles.into_iter().enumerate() {
        let c = h
            .join()
            .map_err(|_| format!("threads: thread {idx} panicked"))?;
        let shared = sh.counts[idx].load(Ordering::SeqCst);
        if c != shared {
            return Err(format!(
                "threads: thread {idx}: counter {c}, shared slot {shared}"
            ));
        }
        if c == 0 {
            return Err(format!("threads: thread {idx} never ran"));
        }
        sum += c;
    }
    let total = sh.total.load(Ordering::SeqCst);
    if sum != total {
        return Err(format!(
            "threads: per-thread counters add up to {sum}, shared total is {total}"
        ));
    }
    common.verify()?;
    Ok(format!("OK threads={n}"))
}

// ---------------------------------------------------------------------------
// sleep, read
// ---------------------------------------------------------------------------

fn mode_sleep(ms: u64) -> Result<String, String> {
    set_mask(sigbit(libc::SIGUSR2));
    emit(&format!("READY {} {}", getpid(), ms));
    let req = libc::timespec {
        tv_sec: (ms / 1000) as _,
        tv_nsec: ((ms % 1000) * 1_000_000) as _,
    };
    // SAFETY: plain zeroed timespec.
    let mut rem: libc::timespec = unsafe { zeroed() };
    let t0 = monotonic_ns();
    // SAFETY: valid request and remainder pointers.
    let r = unsafe { libc::nanosleep(&req, &mut rem) };
    let e = errno();
    let t1 = monotonic_ns();
    if r != 0 {
        return Err(format!(
            "sleep: nanosleep returned {r}: {e} (remaining {}.{:09} s, after {} ms)",
            rem.tv_sec,
            rem.tv_nsec,
            (t1 - t0) / 1_000_000
        ));
    }
    Ok(format!("SLEPT {}", (t1 - t0) / 1_000_000))
}

fn mode_read() -> Result<String, String> {
    set_mask(sigbit(libc::SIGUSR2));
    emit(&format!("READY {}", getpid()));
    let mut buf = [0u8; 64];
    // SAFETY: valid buffer of 64 bytes.
    let r = unsafe { libc::read(0, buf.as_mut_ptr().cast(), 64) };
    if r < 0 {
        return Err(format!("read: read(0) failed: {}", errno()));
    }
    if r == 0 {
        return Err("read: read(0) returned end of file".into());
    }
    Ok(format!(
        "GOT {}",
        String::from_utf8_lossy(&buf[..r as usize]).trim()
    ))
}

// ---------------------------------------------------------------------------
// pattern
// ---------------------------------------------------------------------------

const PATTERN_EXTRA_PAGES: usize = 16;

/// The permissions of the mapping containing `addr`, from /proc/self/maps.
fn maps_perms(addr: usize) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    for l in maps.lines() {
        let mut it = l.split_whitespace();
        let range = it.next()?;
        let perms = it.next()?;
        let (a, b) = range.split_once('-')?;
        let a = usize::from_str_radix(a, 16).ok()?;
        let b = usize::from_str_radix(b, 16).ok()?;
        if a <= addr && addr < b {
            return Some(perms.to_string());
        }
    }
    None
}

fn mode_pattern(pages: usize, seed: u64) -> Result<String, String> {
    if pages == 0 {
        return Err("pattern: PAGES must be at least 1".into());
    }
    let common = common_init(0);
    let total = (pages + PATTERN_EXTRA_PAGES) * PAGE;
    // SAFETY: fresh anonymous mapping, only used through raw pointers below.
    let base = unsafe {
        let p = libc::mmap(
            null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(format!("pattern: mmap: {}", errno()));
        }
        if libc::madvise(p, total, libc::MADV_NOHUGEPAGE) != 0 {
            return Err(format!("pattern: madvise(NOHUGEPAGE): {}", errno()));
        }
        if libc::mprotect(
            p.cast::<u8>().add(pages * PAGE).cast(),
            PATTERN_EXTRA_PAGES * PAGE,
            libc::PROT_READ,
        ) != 0
        {
            return Err(format!("pattern: mprotect: {}", errno()));
        }
        p as usize
    };
    let extra = base + pages * PAGE;
    let word = |i: usize, j: usize| (base + i * PAGE + j * 8) as *mut u64;
    for i in 0..pages {
        let val: Option<fn(u64, u64, u64) -> u64> = match pattern_page_kind(i as u64) {
            PageKind::Untouched => continue,
            PageKind::Zero => None,
            PageKind::Pattern => Some(pattern_word),
        };
        for j in 0..PAGE / 8 {
            let v = val.map_or(0, |f| f(seed, i as u64, j as u64));
            // SAFETY: inside our read-write mapping.
            unsafe { write_volatile(word(i, j), v) };
        }
    }
    emit(&format!(
        "READY {} {:#x} {} {:#x}",
        getpid(),
        base,
        pages,
        extra
    ));
    if let Some(c) = corrupt_request() {
        // SAFETY: addresses inside our mapping.
        unsafe {
            match c.as_str() {
                "touch" => {
                    read_volatile(word(0, 0));
                }
                "touch-extra" => {
                    read_volatile((extra + 3 * PAGE) as *const u64);
                }
                _ => {
                    let i = (0..pages)
                        .find(|&i| pattern_page_kind(i as u64) == PageKind::Pattern)
                        .or_else(|| {
                            (0..pages).find(|&i| pattern_page_kind(i as u64) == PageKind::Zero)
                        });
                    if let Some(i) = i {
                        write_volatile(word(i, 0), read_volatile(word(i, 0)) ^ 1);
                    }
                }
            }
        }
    }
    wait_for_term();

    // Residency first: nothing below may read an untouched page.
    let n = pages + PATTERN_EXTRA_PAGES;
    let mut vec = vec![0u8; n];
    // SAFETY: base..base+total is our mapping; vec has one byte per page.
    if unsafe { libc::mincore(base as *mut c_void, total, vec.as_mut_ptr()) } != 0 {
        return Err(format!("pattern: mincore: {}", errno()));
    }
    for (i, &v) in vec.iter().enumerate() {
        let present = v & 1 != 0;
        let want = i < pages && pattern_page_kind(i as u64) != PageKind::Untouched;
        if present != want {
            let what = if i >= pages {
                format!("page {} of the untouched region", i - pages)
            } else {
                format!("{:?} page {i}", pattern_page_kind(i as u64))
            };
            return Err(format!(
                "pattern: {what} is {}present",
                if present { "" } else { "not " }
            ));
        }
    }
    match (
        maps_perms(base).as_deref(),
        maps_perms(extra).as_deref(),
        maps_perms(base + pages * PAGE - 1).as_deref(),
    ) {
        (Some("rw-p"), Some("r--p"), Some("rw-p")) => {}
        other => {
            return Err(format!(
                "pattern: mapping permissions {other:?}, expected rw-p and r--p"
            ))
        }
    }
    for i in 0..pages {
        let kind = pattern_page_kind(i as u64);
        if kind == PageKind::Untouched {
            continue;
        }
        for j in 0..PAGE / 8 {
            // SAFETY: a present page of our mapping.
            let v = unsafe { read_volatile(word(i, j)) };
            let want = if kind == PageKind::Zero {
                0
            } else {
                pattern_word(seed, i as u64, j as u64)
            };
            if v != want {
                return Err(format!(
                    "pattern: page {i} ({kind:?}) word {j} is {v:#x}, expected {want:#x}"
                ));
            }
        }
    }
    common.verify()?;
    Ok(format!("OK pages={pages}"))
}

// ---------------------------------------------------------------------------
// cow
// ---------------------------------------------------------------------------

/// Word `j` of global page `k` at generation `g` in `cow` mode.
pub fn cow_word(g: u64, k: u64, j: u64) -> u64 {
    match j {
        0 => g,
        1 => k,
        _ => splitmix64((g << 40) ^ (k << 9) ^ j),
    }
}

static COW_SIGCHLD: AtomicU64 = AtomicU64::new(0);

extern "C" fn cow_on_chld(_sig: c_int) {
    COW_SIGCHLD.fetch_add(1, Ordering::SeqCst);
}

/// No SIGCHLD so far, and wait() sees no child.
fn cow_no_children(when: &str) -> Result<(), String> {
    let n = COW_SIGCHLD.load(Ordering::SeqCst);
    if n != 0 {
        return Err(format!("cow: {n} SIGCHLD {when}"));
    }
    // SAFETY: waitpid with a null status pointer.
    let r = unsafe { libc::waitpid(-1, null_mut(), libc::WNOHANG) };
    if r != -1 || errno().raw_os_error() != Some(libc::ECHILD) {
        return Err(format!(
            "cow: waitpid(-1) returned {r} ({}) {when}",
            errno()
        ));
    }
    // SAFETY: waitid into a zeroed local siginfo.
    let mut si: libc::siginfo_t = unsafe { zeroed() };
    let r = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &mut si,
            libc::WEXITED | libc::WSTOPPED | libc::WCONTINUED | libc::WNOHANG,
        )
    };
    if r != -1 || errno().raw_os_error() != Some(libc::ECHILD) {
        return Err(format!(
            "cow: waitid(P_ALL) returned {r} ({}) {when}",
            errno()
        ));
    }
    Ok(())
}

fn cow_map(pages: usize, flags: c_int, advice: Option<c_int>) -> Result<usize, String> {
    // SAFETY: a fresh anonymous mapping, used through raw pointers only.
    unsafe {
        let p = libc::mmap(
            null_mut(),
            pages * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(format!("cow: mmap: {}", errno()));
        }
        if libc::madvise(p, pages * PAGE, libc::MADV_NOHUGEPAGE) != 0 {
            return Err(format!("cow: madvise(NOHUGEPAGE): {}", errno()));
        }
        if let Some(a) = advice {
            if libc::madvise(p, pages * PAGE, a) != 0 {
                return Err(format!("cow: madvise({a}): {}", errno()));
            }
        }
        Ok(p as usize)
    }
}

/// The VmFlags of the smaps entry starting at `addr`.
fn vm_flags(addr: usize) -> Option<String> {
    let s = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let head = format!("{addr:x}-");
    let mut inside = false;
    for l in s.lines() {
        if l.starts_with(&head) {
            inside = true;
        } else if inside {
            if let Some(f) = l.strip_prefix("VmFlags:") {
                return Some(f.trim().to_string());
            }
        }
    }
    None
}

fn mode_cow(pages: usize, opts: &str) -> Result<String, String> {
    if pages == 0 {
        return Err("cow: PAGES must be at least 1".into());
    }
    let watchdog = opts.split(',').any(|o| o == "watchdog");
    let slow = opts.split(',').any(|o| o == "slow");
    let private = opts.split(',').any(|o| o == "private");
    let common = common_init(0);
    install_handler(
        libc::SIGCHLD,
        cow_on_chld as *const () as usize,
        libc::SA_RESTART,
    );
    let header = cow_map(1, libc::MAP_PRIVATE, None)?;
    let regions = if private {
        [
            cow_map(pages, libc::MAP_PRIVATE, None)?,
            cow_map(pages, libc::MAP_PRIVATE, None)?,
            cow_map(pages, libc::MAP_PRIVATE, None)?,
            cow_map(pages, libc::MAP_PRIVATE, None)?,
        ]
    } else {
        [
            cow_map(pages, libc::MAP_PRIVATE, None)?,
            cow_map(pages, libc::MAP_SHARED, None)?,
            cow_map(pages, libc::MAP_PRIVATE, Some(libc::MADV_DONTFORK))?,
            cow_map(pages, libc::MAP_PRIVATE, Some(libc::MADV_WIPEONFORK))?,
        ]
    };
    let total = 4 * pages as u64;
    let page_addr =
        |k: u64| regions[(k / pages as u64) as usize] + (k % pages as u64) as usize * PAGE;
    let write_page = |k: u64, g: u64| {
        let p = page_addr(k) as *mut u64;
        for j in (0..512u64).rev() {
            // SAFETY: inside one of our read-write mappings.
            unsafe { write_volatile(p.add(j as usize), cow_word(g, k, j)) };
        }
    };
    let cursor = header as *mut u64;
    for k in 0..total {
        write_page(k, 0);
    }
    // SAFETY: the header mapping is ours.
    unsafe {
        write_volatile(cursor, 0);
        write_volatile(cursor.add(1), pages as u64);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let maxgap = Arc::new(AtomicU64::new(0));
    let dog = if watchdog {
        let (stop, maxgap) = (stop.clone(), maxgap.clone());
        set_mask(common.mask | sigbit(libc::SIGTERM) | sigbit(libc::SIGCHLD));
        let h = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                let ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 100_000,
                };
                let mut last = monotonic_ns();
                while !stop.load(Ordering::Relaxed) {
                    // SAFETY: a relative sleep with a local timespec.
                    unsafe { libc::clock_nanosleep(libc::CLOCK_MONOTONIC, 0, &ts, null_mut()) };
                    let now = monotonic_ns();
                    let gap = (now - last) as u64;
                    maxgap.fetch_max(gap, Ordering::Relaxed);
                    last = now;
                }
            })
            .map_err(|e| format!("cow: spawn: {e}"))?;
        set_mask(common.mask);
        Some(h)
    } else {
        None
    };
    emit(&format!(
        "READY {} {:#x} {:#x} {:#x} {:#x} {:#x} {}",
        getpid(),
        header,
        regions[0],
        regions[1],
        regions[2],
        regions[3],
        pages
    ));
    let mut c = 0u64;
    while !term_requested() {
        let k = c % total;
        write_page(k, c / total + 1);
        c += 1;
        // SAFETY: the header mapping is ours.
        unsafe { std::ptr::write_volatile(cursor, c) };
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
        if k == total - 1 {
            cow_no_children("during the run")?;
        }
        if slow {
            nap(1);
        }
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(h) = dog {
        h.join().map_err(|_| "cow: watchdog panicked".to_string())?;
    }
    // Every page as the cursor says (no page is being written now).
    let full = c / total;
    let rem = c % total;
    for k in 0..total {
        let g = if k < rem { full + 1 } else { full };
        let p = page_addr(k) as *const u64;
        for j in 0..512u64 {
            // SAFETY: inside one of our mappings.
            let v = unsafe { read_volatile(p.add(j as usize)) };
            if v != cow_word(g, k, j) {
                return Err(format!(
                    "cow: page {k} word {j} is {v:#x}, expected {:#x} (generation {g}, cursor {c})",
                    cow_word(g, k, j)
                ));
            }
        }
    }
    match maps_perms(regions[1]).as_deref() {
        Some("rw-s") => {}
        Some("rw-p") if private => {}
        other => return Err(format!("cow: shared region has permissions {other:?}")),
    }
    for (i, flag) in [(2, "dc"), (3, "wf")].into_iter().filter(|_| !private) {
        let f = vm_flags(regions[i]).unwrap_or_default();
        if !f.split_whitespace().any(|x| x == flag) {
            return Err(format!("cow: region {i} lost VmFlag {flag} ({f})"));
        }
    }
    cow_no_children("at the end")?;
    common.verify()?;
    Ok(format!(
        "OK cursor={c} maxgap_us={}",
        maxgap.load(Ordering::Relaxed) / 1000
    ))
}

// ---------------------------------------------------------------------------
// fds
// ---------------------------------------------------------------------------

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn check_fd(r: c_int, what: &str) -> Result<c_int, String> {
    if r < 0 {
        Err(format!("fds: {what}: {}", errno()))
    } else {
        Ok(r)
    }
}

fn write_all(fd: c_int, data: &[u8], what: &str) -> Result<(), String> {
    // SAFETY: valid buffer.
    let r = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    if r != data.len() as isize {
        return Err(format!("fds: write {what}: returned {r}: {}", errno()));
    }
    Ok(())
}

fn fstat(fd: c_int, what: &str) -> Result<libc::stat, String> {
    // SAFETY: valid out pointer.
    let mut st: libc::stat = unsafe { zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(format!("fds: fstat {what}: {}", errno()));
    }
    Ok(st)
}

fn stat_path(p: &Path) -> Result<libc::stat, String> {
    let c = cpath(p);
    // SAFETY: valid path and out pointer.
    let mut st: libc::stat = unsafe { zeroed() };
    if unsafe { libc::stat(c.as_ptr(), &mut st) } != 0 {
        return Err(format!("fds: stat {}: {}", p.display(), errno()));
    }
    Ok(st)
}

fn fd_link(fd: c_int) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn offset(fd: c_int) -> i64 {
    // SAFETY: lseek has no memory preconditions.
    unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) }
}

fn pread_exact(fd: c_int, len: usize, what: &str) -> Result<Vec<u8>, String> {
    let mut v = vec![0u8; len];
    // SAFETY: valid buffer of len bytes.
    let r = unsafe { libc::pread(fd, v.as_mut_ptr().cast(), len, 0) };
    if r != len as isize {
        return Err(format!("fds: pread {what}: returned {r}: {}", errno()));
    }
    Ok(v)
}

fn read_exact(fd: c_int, len: usize, what: &str) -> Result<Vec<u8>, String> {
    let mut v = vec![0u8; len];
    // SAFETY: valid buffer of len bytes.
    let r = unsafe { libc::read(fd, v.as_mut_ptr().cast(), len) };
    if r != len as isize {
        return Err(format!("fds: read {what}: returned {r}: {}", errno()));
    }
    Ok(v)
}

fn fionread(fd: c_int, what: &str) -> Result<usize, String> {
    let mut n: c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } != 0 {
        return Err(format!("fds: FIONREAD {what}: {}", errno()));
    }
    Ok(n as usize)
}

fn fd_flags(fd: c_int) -> (c_int, c_int) {
    // SAFETY: fcntl queries.
    unsafe {
        (
            libc::fcntl(fd, libc::F_GETFL),
            libc::fcntl(fd, libc::F_GETFD),
        )
    }
}

fn regular_content() -> Vec<u8> {
    (0..1000u32).map(|k| (k * 31 + 7) as u8).collect()
}

fn memfd_content() -> Vec<u8> {
    (0..3 * PAGE / 8)
        .flat_map(|j| splitmix64(0x3E3F_D000 ^ j as u64).to_le_bytes())
        .collect()
}

const MEMFD_OFFSET: i64 = 5000;

struct Fds {
    dir: PathBuf,
    reg_path: PathBuf,
    unl_path: PathBuf,
    fifo_path: PathBuf,
    reg: c_int,
    unl: c_int,
    dfd: c_int,
    null: c_int,
    zero: c_int,
    pr: c_int,
    pw: c_int,
    fifo: c_int,
    efd: c_int,
    mfd: c_int,
}

fn open_fds() -> Result<Fds, String> {
    let dir = std::env::var_os("PDUMP_VICTIM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let dir = std::fs::canonicalize(&dir)
        .map_err(|e| format!("fds: directory {}: {e}", dir.display()))?;
    let pid = getpid();
    let reg_path = dir.join(format!("pdump-victim-{pid}-regular"));
    let unl_path = dir.join(format!("pdump-victim-{pid}-unlinked"));
    let fifo_path = dir.join(format!("pdump-victim-{pid}-fifo"));
    for p in [&reg_path, &unl_path, &fifo_path] {
        let _ = std::fs::remove_file(p);
    }
    let rw_create = libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC;
    // SAFETY: all calls below get valid NUL-terminated paths and buffers.
    unsafe {
        let reg = check_fd(
            libc::open(cpath(&reg_path).as_ptr(), rw_create, 0o644),
            "open regular",
        )?;
        write_all(reg, &regular_content(), "regular")?;
        if libc::lseek(reg, 123, libc::SEEK_SET) != 123 {
            return Err(format!("fds: lseek regular: {}", errno()));
        }
        let unl = check_fd(
            libc::open(cpath(&unl_path).as_ptr(), rw_create, 0o600),
            "open unlinked",
        )?;
        write_all(unl, b"unlinked-data", "unlinked")?;
        if libc::unlink(cpath(&unl_path).as_ptr()) != 0 {
            return Err(format!("fds: unlink: {}", errno()));
        }
        let dfd = check_fd(
            libc::open(
                cpath(&dir).as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            ),
            "open directory",
        )?;
        let null = check_fd(
            libc::open(c"/dev/null".as_ptr(), libc::O_RDWR),
            "open /dev/null",
        )?;
        let zero = check_fd(
            libc::open(c"/dev/zero".as_ptr(), libc::O_RDONLY),
            "open /dev/zero",
        )?;
        let mut p = [0 as c_int; 2];
        check_fd(libc::pipe(p.as_mut_ptr()), "pipe")?;
        write_all(p[1], b"buffered", "pipe")?;
        check_fd(libc::mkfifo(cpath(&fifo_path).as_ptr(), 0o600), "mkfifo")?;
        let fifo = check_fd(
            libc::open(cpath(&fifo_path).as_ptr(), libc::O_RDWR),
            "open fifo",
        )?;
        write_all(fifo, b"fifo-data", "fifo")?;
        let efd = check_fd(libc::eventfd(42, libc::EFD_NONBLOCK), "eventfd")?;
        let mfd = check_fd(
            libc::memfd_create(c"victim-memfd".as_ptr(), libc::MFD_CLOEXEC),
            "memfd_create",
        )?;
        write_all(mfd, &memfd_content(), "memfd")?;
        if libc::lseek(mfd, MEMFD_OFFSET, libc::SEEK_SET) != MEMFD_OFFSET {
            return Err(format!("fds: lseek memfd: {}", errno()));
        }
        Ok(Fds {
            dir,
            reg_path,
            unl_path,
            fifo_path,
            reg,
            unl,
            dfd,
            null,
            zero,
            pr: p[0],
            pw: p[1],
            fifo,
            efd,
            mfd,
        })
    }
}

fn expect<T: PartialEq + std::fmt::Debug>(what: &str, got: T, want: T) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("fds: {what}: {got:?}, expected {want:?}"))
    }
}

fn verify_fds(f: &Fds) -> Result<(), String> {
    let acc = |fd| fd_flags(fd).0 & libc::O_ACCMODE;
    let cloexec = |fd| fd_flags(fd).1 & libc::FD_CLOEXEC;

    // (1) regular file
    let st = fstat(f.reg, "regular")?;
    let pst = stat_path(&f.reg_path)?;
    expect(
        "regular file identity",
        (st.st_dev, st.st_ino),
        (pst.st_dev, pst.st_ino),
    )?;
    expect(
        "regular file link",
        fd_link(f.reg),
        f.reg_path.display().to_string(),
    )?;
    expect("regular file offset", offset(f.reg), 123)?;
    expect("regular file size", st.st_size, 1000)?;
    expect("regular file access mode", acc(f.reg), libc::O_RDWR)?;
    expect("regular file cloexec", cloexec(f.reg), 0)?;
    expect(
        "regular file content",
        pread_exact(f.reg, 1000, "regular")?,
        regular_content(),
    )?;

    // (2) unlinked file
    let st = fstat(f.unl, "unlinked")?;
    expect("unlinked file nlink", st.st_nlink, 0)?;
    expect("unlinked file size", st.st_size, 13)?;
    expect("unlinked file offset", offset(f.unl), 13)?;
    expect("unlinked file access mode", acc(f.unl), libc::O_RDWR)?;
    expect(
        "unlinked file link",
        fd_link(f.unl),
        format!("{} (deleted)", f.unl_path.display()),
    )?;
    expect(
        "unlinked file content",
        pread_exact(f.unl, 13, "unlinked")?,
        b"unlinked-data".to_vec(),
    )?;

    // (3) directory
    let st = fstat(f.dfd, "directory")?;
    let pst = stat_path(&f.dir)?;
    expect("directory type", st.st_mode & libc::S_IFMT, libc::S_IFDIR)?;
    expect(
        "directory identity",
        (st.st_dev, st.st_ino),
        (pst.st_dev, pst.st_ino),
    )?;
    expect(
        "directory link",
        fd_link(f.dfd),
        f.dir.display().to_string(),
    )?;
    expect("directory cloexec", cloexec(f.dfd), libc::FD_CLOEXEC)?;

    // (4) /dev/null, (5) /dev/zero
    let st = fstat(f.null, "/dev/null")?;
    expect("/dev/null type", st.st_mode & libc::S_IFMT, libc::S_IFCHR)?;
    expect("/dev/null rdev", st.st_rdev, libc::makedev(1, 3))?;
    expect("/dev/null access mode", acc(f.null), libc::O_RDWR)?;
    write_all(f.null, b"x", "/dev/null").map_err(|e| format!("{e} (/dev/null)"))?;
    let st = fstat(f.zero, "/dev/zero")?;
    expect("/dev/zero type", st.st_mode & libc::S_IFMT, libc::S_IFCHR)?;
    expect("/dev/zero rdev", st.st_rdev, libc::makedev(1, 5))?;
    expect("/dev/zero access mode", acc(f.zero), libc::O_RDONLY)?;
    expect(
        "/dev/zero content",
        read_exact(f.zero, 16, "/dev/zero")?,
        vec![0u8; 16],
    )?;

    // (6), (7) pipe
    let sr = fstat(f.pr, "pipe read end")?;
    let sw = fstat(f.pw, "pipe write end")?;
    expect(
        "pipe read end type",
        sr.st_mode & libc::S_IFMT,
        libc::S_IFIFO,
    )?;
    expect(
        "pipe ends are one pipe",
        (sr.st_dev, sr.st_ino),
        (sw.st_dev, sw.st_ino),
    )?;
    expect("pipe read end access mode", acc(f.pr), libc::O_RDONLY)?;
    expect("pipe write end access mode", acc(f.pw), libc::O_WRONLY)?;
    expect("pipe buffered bytes", fionread(f.pr, "pipe")?, 8)?;
    expect(
        "pipe content",
        read_exact(f.pr, 8, "pipe")?,
        b"buffered".to_vec(),
    )?;
    write_all(f.pw, b"again", "pipe")?;
    expect("pipe bytes after a new write", fionread(f.pr, "pipe")?, 5)?;
    expect(
        "pipe new content",
        read_exact(f.pr, 5, "pipe")?,
        b"again".to_vec(),
    )?;

    // (8) FIFO
    let st = fstat(f.fifo, "fifo")?;
    let pst = stat_path(&f.fifo_path)?;
    expect("fifo type", st.st_mode & libc::S_IFMT, libc::S_IFIFO)?;
    expect(
        "fifo identity",
        (st.st_dev, st.st_ino),
        (pst.st_dev, pst.st_ino),
    )?;
    expect(
        "fifo link",
        fd_link(f.fifo),
        f.fifo_path.display().to_string(),
    )?;
    expect("fifo access mode", acc(f.fifo), libc::O_RDWR)?;
    expect("fifo buffered bytes", fionread(f.fifo, "fifo")?, 9)?;
    expect(
        "fifo content",
        read_exact(f.fifo, 9, "fifo")?,
        b"fifo-data".to_vec(),
    )?;

    // (9) eventfd
    expect(
        "eventfd link",
        fd_link(f.efd),
        "anon_inode:[eventfd]".to_string(),
    )?;
    expect(
        "eventfd O_NONBLOCK",
        fd_flags(f.efd).0 & libc::O_NONBLOCK,
        libc::O_NONBLOCK,
    )?;
    let c = read_exact(f.efd, 8, "eventfd")?;
    expect(
        "eventfd count",
        u64::from_ne_bytes(c.try_into().unwrap()),
        42,
    )?;

    // (10) memfd
    let st = fstat(f.mfd, "memfd")?;
    expect(
        "memfd link",
        fd_link(f.mfd),
        "/memfd:victim-memfd (deleted)".to_string(),
    )?;
    expect("memfd size", st.st_size, 3 * PAGE as i64)?;
    expect("memfd offset", offset(f.mfd), MEMFD_OFFSET)?;
    expect("memfd cloexec", cloexec(f.mfd), libc::FD_CLOEXEC)?;
    expect(
        "memfd content",
        pread_exact(f.mfd, 3 * PAGE, "memfd")? == memfd_content(),
        true,
    )?;
    Ok(())
}

fn mode_fds() -> Result<String, String> {
    let common = common_init(0);
    let f = open_fds()?;
    emit(&format!(
        "READY {} {} {} {} {} {} {} {} {} {} {}",
        getpid(),
        f.reg,
        f.unl,
        f.dfd,
        f.null,
        f.zero,
        f.pr,
        f.pw,
        f.fifo,
        f.efd,
        f.mfd
    ));
    wait_for_term();
    let r = verify_fds(&f);
    let _ = std::fs::remove_file(&f.reg_path);
    let _ = std::fs::remove_file(&f.fifo_path);
    r?;
    common.verify()?;
    Ok("OK fds=10".into())
}

// ---------------------------------------------------------------------------
// bigfiles
// ---------------------------------------------------------------------------

const BIG_CHUNK: usize = 1 << 20;
/// Offsets the `bigfiles` fds are left at.
const BIG_MEMFD_POS: i64 = 12_345;
const BIG_UNLINKED_POS: i64 = 777;

/// Chunk `c` of a `bigfiles` file (`seed` names the file): all zero (never
/// written, a hole) when `c % 8 == 3`, else u64 word j =
/// `splitmix64(seed ^ c << 20 ^ j)`.
fn big_chunk(seed: u64, c: u64, out: &mut [u8]) {
    if c % 8 == 3 {
        out.fill(0);
        return;
    }
    for (j, w) in out.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&splitmix64(seed ^ (c << 20) ^ j as u64).to_le_bytes());
    }
}

/// Fill `fd` with `chunks` [`big_chunk`]s of `seed`, leaving the zero ones
/// as holes.
fn big_fill(fd: c_int, seed: u64, chunks: u64) -> Result<(), String> {
    let mut buf = vec![0u8; BIG_CHUNK];
    // SAFETY: ftruncate takes integers.
    if unsafe { libc::ftruncate(fd, (chunks * BIG_CHUNK as u64) as libc::off_t) } != 0 {
        return Err(format!("bigfiles: ftruncate: {}", errno()));
    }
    for c in (0..chunks).filter(|c| c % 8 != 3) {
        big_chunk(seed, c, &mut buf);
        // SAFETY: writes from a valid buffer.
        let r = unsafe {
            libc::pwrite(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                (c * BIG_CHUNK as u64) as libc::off_t,
            )
        };
        if r != buf.len() as isize {
            return Err(format!("bigfiles: pwrite: {}", errno()));
        }
    }
    Ok(())
}

/// Check size, offset and every chunk of a [`big_fill`]ed file.
fn big_check(what: &str, fd: c_int, seed: u64, chunks: u64, pos: i64) -> Result<(), String> {
    // SAFETY: an all-zero stat is valid; fstat and lseek take our fd.
    let mut st: libc::stat = unsafe { zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(format!("bigfiles: {what}: fstat: {}", errno()));
    }
    expect(
        &format!("{what} size"),
        st.st_size as u64,
        chunks * BIG_CHUNK as u64,
    )?;
    // SAFETY: lseek takes integers.
    expect(
        &format!("{what} offset"),
        unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) },
        pos,
    )?;
    let (mut got, mut want) = (vec![0u8; BIG_CHUNK], vec![0u8; BIG_CHUNK]);
    for c in 0..chunks {
        // SAFETY: reads into a valid buffer.
        let r = unsafe {
            libc::pread(
                fd,
                got.as_mut_ptr().cast(),
                got.len(),
                (c * BIG_CHUNK as u64) as libc::off_t,
            )
        };
        if r != got.len() as isize {
            return Err(format!(
                "bigfiles: {what}: pread chunk {c}: {r}: {}",
                errno()
            ));
        }
        big_chunk(seed, c, &mut want);
        if got != want {
            return Err(format!("bigfiles: {what}: chunk {c} differs"));
        }
    }
    Ok(())
}

fn mode_bigfiles(mib: u64) -> Result<String, String> {
    const MEMFD_SEED: u64 = 0x6D65_6D66_0000_0000;
    const UNL_SEED: u64 = 0x756E_6C6B_0000_0000;
    const PIPE_SEED: u64 = 0x7069_7065_0000_0000;
    let common = common_init(0);
    let dir = std::env::var_os("PDUMP_VICTIM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let unl_path = dir.join(format!("pdump-victim-{}-bigunlinked", getpid()));
    let unl_chunks = (mib / 16).max(1);
    let mut pipe_data = vec![0u8; BIG_CHUNK];
    big_chunk(PIPE_SEED, 0, &mut pipe_data);
    // SAFETY: raw syscalls with valid pointers; every fd is checked.
    let (mfd, unl, pr) = unsafe {
        let mfd = check_fd(
            libc::memfd_create(
                c"victim-big".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            ),
            "memfd_create",
        )?;
        big_fill(mfd, MEMFD_SEED, mib)?;
        libc::lseek(mfd, BIG_MEMFD_POS, libc::SEEK_SET);
        if libc::fcntl(mfd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) != 0 {
            return Err(format!("bigfiles: F_ADD_SEALS: {}", errno()));
        }
        let c = std::ffi::CString::new(unl_path.as_os_str().as_encoded_bytes())
            .map_err(|e| e.to_string())?;
        let unl = check_fd(
            libc::open(
                c.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
                0o600,
            ),
            "open the unlinked file",
        )?;
        big_fill(unl, UNL_SEED, unl_chunks)?;
        libc::unlink(c.as_ptr());
        libc::lseek(unl, BIG_UNLINKED_POS, libc::SEEK_SET);
        let mut p = [0; 2];
        if libc::pipe2(p.as_mut_ptr(), libc::O_NONBLOCK) != 0
            || libc::fcntl(p[1], libc::F_SETPIPE_SZ, BIG_CHUNK as c_int) < BIG_CHUNK as c_int
        {
            return Err(format!("bigfiles: pipe of 1 MiB: {}", errno()));
        }
        write_all(p[1], &pipe_data, "pipe")?;
        (mfd, unl, p[0])
    };
    emit(&format!("READY {} {mfd} {unl} {pr} {mib}", getpid()));
    wait_for_term();
    big_check("memfd", mfd, MEMFD_SEED, mib, BIG_MEMFD_POS)?;
    // SAFETY: F_GET_SEALS takes no argument.
    let seals = unsafe { libc::fcntl(mfd, libc::F_GET_SEALS) };
    expect("memfd seals", seals, libc::F_SEAL_SHRINK)?;
    big_check("unlinked file", unl, UNL_SEED, unl_chunks, BIG_UNLINKED_POS)?;
    let mut got = vec![0u8; BIG_CHUNK + 1];
    // SAFETY: reads into a valid buffer (non-blocking pipe).
    let n = unsafe { libc::read(pr, got.as_mut_ptr().cast(), got.len()) };
    expect("pipe bytes", n, BIG_CHUNK as isize)?;
    if got[..BIG_CHUNK] != pipe_data[..] {
        return Err("bigfiles: pipe data differs".into());
    }
    common.verify()?;
    Ok(format!("OK bigfiles={mib}"))
}

// ---------------------------------------------------------------------------
// timers
// ---------------------------------------------------------------------------

static ALRM: AtomicU64 = AtomicU64::new(0);
static USR1: AtomicU64 = AtomicU64::new(0);
static USR1_BAD: AtomicU64 = AtomicU64::new(0);
const TIMER_COOKIE: usize = 0x7157_C00C;

extern "C" fn on_alrm(_sig: c_int) {
    ALRM.fetch_add(1, Ordering::SeqCst);
}

extern "C" fn on_usr1(_sig: c_int, info: *mut libc::siginfo_t, _uc: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let ok = unsafe {
        (*info).si_code == libc::SI_TIMER && (*info).si_value().sival_ptr as usize == TIMER_COOKIE
    };
    if ok {
        USR1.fetch_add(1, Ordering::SeqCst);
    } else {
        USR1_BAD.fetch_add(1, Ordering::SeqCst);
    }
}

fn mode_timers() -> Result<String, String> {
    let common = common_init(0);
    let alrm_act = install_handler(
        libc::SIGALRM,
        on_alrm as *const () as usize,
        libc::SA_RESTART,
    );
    let usr1_act = install_handler(
        libc::SIGUSR1,
        on_usr1 as *const () as usize,
        libc::SA_RESTART | libc::SA_SIGINFO,
    );
    let ms = |n: i64| libc::timespec {
        tv_sec: 0,
        tv_nsec: n * 1_000_000,
    };
    let us = |n: i64| libc::timeval {
        tv_sec: 0,
        tv_usec: n * 1000,
    };
    // SAFETY: timer_create/settime and setitimer with valid local structs.
    let timer = unsafe {
        let mut sev: libc::sigevent = zeroed();
        sev.sigev_notify = libc::SIGEV_SIGNAL;
        sev.sigev_signo = libc::SIGUSR1;
        sev.sigev_value = libc::sigval {
            sival_ptr: TIMER_COOKIE as *mut c_void,
        };
        let mut t: libc::timer_t = null_mut();
        if libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut t) != 0 {
            return Err(format!("timers: timer_create: {}", errno()));
        }
        let its = libc::itimerspec {
            it_interval: ms(50),
            it_value: ms(50),
        };
        if libc::timer_settime(t, 0, &its, null_mut()) != 0 {
            return Err(format!("timers: timer_settime: {}", errno()));
        }
        let itv = libc::itimerval {
            it_interval: us(100),
            it_value: us(100),
        };
        if libc::setitimer(libc::ITIMER_REAL, &itv, null_mut()) != 0 {
            return Err(format!("timers: setitimer: {}", errno()));
        }
        t
    };
    emit(&format!("READY {}", getpid()));
    let (mut la, mut lu) = (0, 0);
    let check_progress = |la: &mut u64, lu: &mut u64| -> Result<(), String> {
        let (a, u) = (ALRM.load(Ordering::SeqCst), USR1.load(Ordering::SeqCst));
        if a < *la || u < *lu {
            return Err(format!(
                "timers: tick counters went backwards: alrm {la}->{a}, usr1 {lu}->{u}"
            ));
        }
        let bad = USR1_BAD.load(Ordering::SeqCst);
        if bad != 0 {
            return Err(format!(
                "timers: {bad} SIGUSR1 signals without the timer's si_code/sigev_value"
            ));
        }
        (*la, *lu) = (a, u);
        Ok(())
    };
    while !term_requested() {
        nap(50);
        check_progress(&mut la, &mut lu)?;
    }
    // The timers must still fire: two more ticks of each (liveness bound 10 s).
    let (a0, u0) = (la, lu);
    let start = monotonic_ns();
    while la < a0 + 2 || lu < u0 + 2 {
        if monotonic_ns() - start > 10_000_000_000 {
            return Err(format!(
                "timers: timers stopped firing: alrm {a0}->{la}, usr1 {u0}->{lu} in 10 s"
            ));
        }
        nap(10);
        check_progress(&mut la, &mut lu)?;
    }
    // SAFETY: queries into locals; the timer id is ours.
    unsafe {
        let mut itv: libc::itimerval = zeroed();
        if libc::getitimer(libc::ITIMER_REAL, &mut itv) != 0 {
            return Err(format!("timers: getitimer: {}", errno()));
        }
        if (itv.it_interval.tv_sec, itv.it_interval.tv_usec) != (0, 100_000) {
            return Err(format!(
                "timers: ITIMER_REAL interval {:?}",
                (itv.it_interval.tv_sec, itv.it_interval.tv_usec)
            ));
        }
        let mut its: libc::itimerspec = zeroed();
        if libc::timer_gettime(timer, &mut its) != 0 {
            return Err(format!("timers: timer_gettime: {}", errno()));
        }
        if (its.it_interval.tv_sec, its.it_interval.tv_nsec) != (0, 50_000_000) {
            return Err(format!(
                "timers: POSIX timer interval {:?}",
                (its.it_interval.tv_sec, its.it_interval.tv_nsec)
            ));
        }
    }
    for (sig, want, name) in [
        (libc::SIGALRM, alrm_act, "SIGALRM"),
        (libc::SIGUSR1, usr1_act, "SIGUSR1"),
    ] {
        let got = query_action(sig);
        if got != want {
            return Err(format!(
                "timers: {name} action {got:x?}, expected {want:x?}"
            ));
        }
    }
    common.verify()?;
    Ok(format!("OK alrm={la} usr1={lu}"))
}

// ---------------------------------------------------------------------------
// tree, tree-preset: spec, parser, presets
// ---------------------------------------------------------------------------

/// How a tree node sets its process group (the `pgid=` flag).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
enum TreePgid {
    /// No flag: keep the group inherited from the parent.
    #[default]
    Inherit,
    /// `pgid=self`: `setpgid(0, 0)`.
    Own,
    /// `pgid=parent`: `setpgid(0, getpgid(getppid()))`.
    Parent,
    /// `pgid=K`: join the process group of node K, an earlier sibling.
    Node(usize),
}

/// The flags of one tree node (see the module documentation).
#[derive(Clone, Debug, Default)]
struct TreeFlags {
    ns: bool,
    setsid: bool,
    pgid: TreePgid,
    zombie: Option<u8>,
    threads: usize,
    stopped: bool,
    pipe: bool,
    sockpair: bool,
    sharedfile: bool,
}

/// One node of a parsed tree spec; nodes are numbered in DFS pre-order.
#[derive(Clone, Debug)]
struct TreeNode {
    parent: Option<usize>,
    children: Vec<usize>,
    flags: TreeFlags,
    /// The flags as written (trimmed, joined with `,`).
    flags_text: String,
    /// Depth in the process tree (the root has 0).
    depth: usize,
    /// Number of pid namespaces between the namespace the victim was
    /// started in and the node's own one (`ns` nodes count themselves).
    nsdepth: usize,
}

/// A parsed and validated tree spec.
struct TreeSpec {
    text: String,
    nodes: Vec<TreeNode>,
}

const TREE_MAX_NODES: usize = 4096;
const TREE_MAX_THREADS: usize = 1024;
/// The kernel allows 32 pid-namespace levels; leave room for the levels
/// the victim may already run in.
const TREE_MAX_NSDEPTH: usize = 24;

/// Recursive-descent parser of the tree grammar.
struct SpecParser<'a> {
    s: &'a [u8],
    pos: usize,
    nodes: Vec<TreeNode>,
}

impl SpecParser<'_> {
    fn ws(&mut self) {
        while self
            .s
            .get(self.pos)
            .is_some_and(|c| c.is_ascii_whitespace())
        {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn err(&self, what: &str) -> String {
        format!("tree spec: {what} at byte {}", self.pos)
    }

    /// `node := 'p' [ '[' flags ']' ] [ '(' node* ')' ]`
    fn node(&mut self, parent: Option<usize>) -> Result<usize, String> {
        self.ws();
        if self.peek() != Some(b'p') {
            return Err(self.err("expected 'p'"));
        }
        self.pos += 1;
        if self.nodes.len() >= TREE_MAX_NODES {
            return Err(self.err(&format!("more than {TREE_MAX_NODES} nodes")));
        }
        let s = self.s;
        let mut flags = TreeFlags::default();
        let mut texts: Vec<&str> = Vec::new();
        if self.peek() == Some(b'[') {
            self.pos += 1;
            let start = self.pos;
            while self.peek().is_some_and(|c| c != b']') {
                self.pos += 1;
            }
            if self.peek() != Some(b']') {
                return Err(self.err("unterminated '['"));
            }
            let inner = std::str::from_utf8(&s[start..self.pos])
                .map_err(|_| self.err("flags are not UTF-8"))?;
            self.pos += 1;
            for tok in inner.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                let key = tok.split('=').next().unwrap_or(tok);
                if texts.iter().any(|t| t.split('=').next() == Some(key)) {
                    return Err(self.err(&format!("flag {key:?} given twice")));
                }
                parse_tree_flag(&mut flags, tok).map_err(|e| self.err(&e))?;
                texts.push(tok);
            }
        }
        let idx = self.nodes.len();
        let (depth, nsdepth) = match parent {
            Some(p) => (self.nodes[p].depth + 1, self.nodes[p].nsdepth),
            None => (0, 0),
        };
        let nsdepth = nsdepth + flags.ns as usize;
        self.nodes.push(TreeNode {
            parent,
            children: Vec::new(),
            flags,
            flags_text: texts.join(","),
            depth,
            nsdepth,
        });
        self.ws();
        if self.peek() == Some(b'(') {
            self.pos += 1;
            loop {
                self.ws();
                match self.peek() {
                    Some(b')') => {
                        self.pos += 1;
                        break;
                    }
                    None => return Err(self.err("unterminated '('")),
                    Some(_) => {
                        let c = self.node(Some(idx))?;
                        self.nodes[idx].children.push(c);
                    }
                }
            }
        }
        Ok(idx)
    }
}

fn parse_tree_flag(f: &mut TreeFlags, tok: &str) -> Result<(), String> {
    let num = |v: &str| {
        v.parse::<usize>()
            .map_err(|_| format!("bad number in flag {tok:?}"))
    };
    match tok {
        "ns" => f.ns = true,
        "setsid" => f.setsid = true,
        "stopped" => f.stopped = true,
        "pipe" => f.pipe = true,
        "sockpair" => f.sockpair = true,
        "sharedfile" => f.sharedfile = true,
        "pgid=self" => f.pgid = TreePgid::Own,
        "pgid=parent" => f.pgid = TreePgid::Parent,
        _ => {
            if let Some(v) = tok.strip_prefix("pgid=") {
                f.pgid = TreePgid::Node(num(v)?);
            } else if let Some(v) = tok.strip_prefix("zombie=") {
                let n = num(v)?;
                if n > 255 {
                    return Err(format!("{tok:?}: exit status above 255"));
                }
                f.zombie = Some(n as u8);
            } else if let Some(v) = tok.strip_prefix("threads=") {
                let n = num(v)?;
                if n == 0 || n > TREE_MAX_THREADS {
                    return Err(format!("{tok:?}: need 1..={TREE_MAX_THREADS} threads"));
                }
                f.threads = n;
            } else {
                return Err(format!("unknown flag {tok:?}"));
            }
        }
    }
    Ok(())
}

/// The combinations the victim refuses (each explained in the module
/// documentation).
fn validate_tree(nodes: &[TreeNode]) -> Result<(), String> {
    for (i, n) in nodes.iter().enumerate() {
        let f = &n.flags;
        let bad = |what: &str| Err(format!("tree spec: node {i} [{}]: {what}", n.flags_text));
        if i == 0 {
            if f.zombie.is_some() {
                return bad("the root cannot be a zombie");
            }
            if f.pipe || f.sockpair || f.sharedfile {
                return bad("the root has no parent to share a pipe/socketpair/file with");
            }
            if matches!(f.pgid, TreePgid::Parent | TreePgid::Node(_)) {
                return bad("the root cannot join a parent's or sibling's group");
            }
            if f.ns && f.stopped {
                return bad("a root that is a pid-namespace init cannot stop itself");
            }
        }
        if f.zombie.is_some()
            && (!n.children.is_empty()
                || f.threads > 0
                || f.stopped
                || f.pipe
                || f.sockpair
                || f.sharedfile)
        {
            return bad("a zombie has no children, threads, stop, pipe, socketpair or shared file");
        }
        if f.setsid && f.pgid != TreePgid::Inherit {
            return bad(
                "setsid and pgid= exclude each other (a session leader cannot change its group)",
            );
        }
        if f.ns && matches!(f.pgid, TreePgid::Parent | TreePgid::Node(_)) {
            return bad("a pid-namespace init cannot see its parent's or sibling's group");
        }
        if let TreePgid::Node(k) = f.pgid {
            if k >= i || nodes[k].parent != n.parent {
                return bad(&format!("pgid={k}: node {k} is not an earlier sibling"));
            }
            if nodes[k].flags.setsid {
                return bad(&format!(
                    "pgid={k}: node {k} is in another session (setsid)"
                ));
            }
        }
        if n.nsdepth > TREE_MAX_NSDEPTH {
            return bad(&format!(
                "pid namespaces nested deeper than {TREE_MAX_NSDEPTH}"
            ));
        }
    }
    Ok(())
}

fn parse_tree_spec(text: &str) -> Result<TreeSpec, String> {
    let mut p = SpecParser {
        s: text.as_bytes(),
        pos: 0,
        nodes: Vec::new(),
    };
    p.node(None)?;
    p.ws();
    if p.pos != p.s.len() {
        return Err(p.err("trailing characters after the root node"));
    }
    validate_tree(&p.nodes)?;
    Ok(TreeSpec {
        text: text.trim().to_string(),
        nodes: p.nodes,
    })
}

/// The specs of `tree-preset NAME` (see the module documentation).
fn tree_preset(name: &str) -> Option<String> {
    Some(match name {
        "small" => "p(p p)".into(),
        "sessions" => "p[setsid](p[pgid=self](p p[pgid=parent]) p[pgid=1](p[setsid](p[pgid=self] p)) \
                       p[setsid,zombie=5] p[pgid=self,zombie=4] p[pgid=9] p[pgid=1,stopped])"
            .into(),
        "ns1" => "p[setsid](p[ns](p[threads=2](p[zombie=3]) p[stopped] p[setsid](p[pgid=self] p[pgid=parent])) \
                  p[threads=2] p[pgid=self](p))"
            .into(),
        "ns2" => "p[setsid](p[ns](p(p[zombie=3]) p[pgid=self](p[ns](p[threads=2](p[zombie=7]) p[stopped] \
                  p[setsid](p p[pgid=self,threads=2])) p[stopped])) p[threads=3])"
            .into(),
        "ns3" => "p[setsid](p[ns,setsid](p[threads=2](p[zombie=1]) p[ns](p[pgid=self](p[zombie=2] p[stopped]) \
                  p[ns](p(p[zombie=3]) p[threads=3] p[stopped] p[setsid](p)) p[ns,stopped](p) p[ns,zombie=9])) \
                  p[stopped])"
            .into(),
        "ipc" => "p(p[pipe](p[sockpair] p[sharedfile,pipe]) p[sockpair,sharedfile](p[pipe,sockpair,sharedfile]) \
                  p[ns](p[pipe] p[sockpair](p[sharedfile])) p[ns,pipe,sockpair,sharedfile])"
            .into(),
        "wide200" => {
            let leaf = vec!["p"; 19].join(" ");
            let mid = vec![format!("p({leaf})"); 10].join(" ");
            format!("p({mid})")
        }
        "threads64" => "p[threads=63]".into(),
        _ => return None,
    })
}

/// The names `tree-preset` accepts.
const TREE_PRESETS: &[&str] = &[
    "small",
    "sessions",
    "ns1",
    "ns2",
    "ns3",
    "ipc",
    "wide200",
    "threads64",
];

// ---------------------------------------------------------------------------
// tree: plumbing helpers
// ---------------------------------------------------------------------------

/// A failure: (node index it is about, what).
type TreeErr = (usize, String);

fn gettid() -> i32 {
    // SAFETY: no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// `(pid, ppid, pgid, sid, tid)` as seen in the caller's pid namespace
/// (0 where the kernel hides an id of another namespace).
fn tree_ids() -> (i32, i32, i32, i32, i32) {
    // SAFETY: plain id queries without preconditions.
    unsafe {
        (
            libc::getpid(),
            libc::getppid(),
            libc::getpgrp(),
            libc::getsid(0),
            gettid(),
        )
    }
}

fn close_fd(fd: c_int) {
    if fd >= 0 {
        // SAFETY: closing a descriptor this process owns.
        unsafe { libc::close(fd) };
    }
}

fn tree_pipe() -> Result<(c_int, c_int), String> {
    let mut p = [0 as c_int; 2];
    // SAFETY: valid out array of two ints.
    if unsafe { libc::pipe(p.as_mut_ptr()) } != 0 {
        return Err(format!("pipe: {}", errno()));
    }
    Ok((p[0], p[1]))
}

/// Write everything (pipes may take a long message in parts).
fn tree_write_all(fd: c_int, mut data: &[u8], what: &str) -> Result<(), String> {
    while !data.is_empty() {
        // SAFETY: valid buffer.
        let r = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if r < 0 {
            let e = errno();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(format!("write {what}: {e}"));
        }
        data = &data[r as usize..];
    }
    Ok(())
}

/// Read exactly `len` bytes with ONE `read` (the data is known to be there).
fn tree_read_exact(fd: c_int, len: usize, what: &str) -> Result<Vec<u8>, String> {
    let mut v = vec![0u8; len];
    // SAFETY: valid buffer of len bytes.
    let r = unsafe { libc::read(fd, v.as_mut_ptr().cast(), len) };
    if r != len as isize {
        return Err(format!("read {what}: returned {r}: {}", errno()));
    }
    Ok(v)
}

fn tree_fionread(fd: c_int, what: &str) -> Result<usize, String> {
    let mut n: c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } != 0 {
        return Err(format!("FIONREAD {what}: {}", errno()));
    }
    Ok(n as usize)
}

fn tree_fstat(fd: c_int, what: &str) -> Result<libc::stat, String> {
    // SAFETY: a plain C struct for which all-zero bytes are valid.
    let mut st: libc::stat = unsafe { zeroed() };
    // SAFETY: valid out pointer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(format!("fstat {what} (fd {fd}): {}", errno()));
    }
    Ok(st)
}

/// Check that `fd` is a pipe end opened with access mode `acc`.
fn tree_check_pipe_end(fd: c_int, acc: c_int, what: &str) -> Result<(), String> {
    let st = tree_fstat(fd, what)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFIFO {
        return Err(format!(
            "{what} (fd {fd}) is not a pipe (mode {:#o})",
            st.st_mode
        ));
    }
    let (fl, _) = fd_flags(fd);
    if fl & libc::O_ACCMODE != acc {
        return Err(format!("{what} (fd {fd}): file status flags {fl:#x}"));
    }
    Ok(())
}

/// `waitid(P_PID, pid, flags)`, retried on EINTR; `Some((si_code,
/// si_status))`, or `None` where WNOHANG found nothing to report.
fn tree_waitid(pid: i32, flags: c_int) -> Result<Option<(i32, i32)>, String> {
    loop {
        // SAFETY: zeroed siginfo out parameter; the si_* accessors read the
        // union members waitid fills in.
        unsafe {
            let mut info: libc::siginfo_t = zeroed();
            if libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) != 0 {
                let e = errno();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(format!("waitid({pid}): {e}"));
            }
            if info.si_pid() == 0 {
                return Ok(None);
            }
            return Ok(Some((info.si_code, info.si_status())));
        }
    }
}

/// What became of a child that stopped talking (for FAIL messages).
fn tree_child_status(pid: i32) -> String {
    match tree_waitid(pid, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT) {
        Ok(Some((libc::CLD_EXITED, s))) => format!("exited with status {s}"),
        Ok(Some((_, s))) => format!("killed by signal {s}"),
        Ok(None) => "still running".into(),
        Err(e) => e,
    }
}

/// Reap one child (blocking, EINTR retried); its raw wait status.
fn tree_reap(pid: i32) -> Result<c_int, String> {
    loop {
        let mut st: c_int = 0;
        // SAFETY: valid out pointer.
        let r = unsafe { libc::waitpid(pid, &mut st, 0) };
        if r == pid {
            return Ok(st);
        }
        let e = errno();
        if r < 0 && e.raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return Err(format!("waitpid({pid}): returned {r}: {e}"));
    }
}

fn tree_describe_status(st: c_int) -> String {
    if libc::WIFEXITED(st) {
        format!("exited with status {}", libc::WEXITSTATUS(st))
    } else if libc::WIFSIGNALED(st) {
        format!("killed by signal {}", libc::WTERMSIG(st))
    } else {
        format!("wait status {st:#x}")
    }
}

/// The write end of our report pipe lost its reader: the parent is gone.
fn tree_parent_gone(up: c_int) -> bool {
    let mut p = libc::pollfd {
        fd: up,
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no timeout.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r == 1 && p.revents & (libc::POLLERR | libc::POLLNVAL) != 0
}

/// Reads `\n`-terminated lines from a report pipe with a deadline.
struct LineReader {
    fd: c_int,
    buf: Vec<u8>,
    eof: bool,
}

impl LineReader {
    /// The next line without its `\n`; `Ok(None)` at end of file.
    fn line(&mut self, deadline_ns: u128) -> Result<Option<String>, String> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let l: Vec<u8> = self.buf.drain(..=pos).collect();
                return Ok(Some(String::from_utf8_lossy(&l[..pos]).into_owned()));
            }
            if self.eof {
                return Ok(None);
            }
            let now = monotonic_ns();
            if now >= deadline_ns {
                return Err("timed out".into());
            }
            let ms = ((deadline_ns - now) / 1_000_000).clamp(1, 1000) as c_int;
            let mut p = libc::pollfd {
                fd: self.fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut p, 1, ms) } <= 0 {
                continue;
            }
            let mut chunk = [0u8; 4096];
            // SAFETY: valid buffer.
            let r = unsafe { libc::read(self.fd, chunk.as_mut_ptr().cast(), chunk.len()) };
            if r < 0 {
                let e = errno();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(format!("read: {e}"));
            }
            if r == 0 {
                self.eof = true;
            }
            self.buf.extend_from_slice(&chunk[..r as usize]);
        }
    }
}

/// Parse `FAIL <idx> <what>`.
fn tree_parse_fail(line: &str, fallback: usize) -> Option<TreeErr> {
    let rest = line.strip_prefix("FAIL ")?;
    let (k, what) = rest.split_once(' ').unwrap_or((rest, ""));
    Some(match k.parse() {
        Ok(k) => (k, what.to_string()),
        Err(_) => (fallback, rest.to_string()),
    })
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// Make sure fds 0, 1 and 2 are open, so no pipe of ours lands there.
fn tree_fix_stdio() {
    for fd in 0..3 {
        // SAFETY: fcntl query; open of a constant path.
        unsafe {
            if libc::fcntl(fd, libc::F_GETFD) < 0 {
                let n = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                if n >= 0 && n != fd {
                    libc::dup2(n, fd);
                    libc::close(n);
                }
            }
        }
    }
}

/// Give this member its own `/dev/null` as fds 0, 1 and 2.
fn tree_null_stdio() {
    // SAFETY: open of a constant path, dup2 onto the standard fds.
    unsafe {
        let n = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if n >= 0 {
            for fd in 0..3 {
                libc::dup2(n, fd);
            }
            if n > 2 {
                libc::close(n);
            }
        }
    }
}

/// Byte k of the `sharedfile` file of node `idx`.
fn tree_file_content(idx: usize) -> Vec<u8> {
    (0..TREE_FILE_LEN)
        .map(|k| (k * 13 + idx * 7 + 1) as u8)
        .collect()
}

const TREE_FILE_LEN: usize = 200;
const TREE_FILE_OFFSET: i64 = 77;

/// Create the `sharedfile` file for child `idx`: 200 bytes, offset 77.
fn tree_create_file(idx: usize) -> Result<(c_int, PathBuf), String> {
    let dir = std::env::var_os("PDUMP_VICTIM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let mut rnd = [0u8; 8];
    // SAFETY: valid 8-byte buffer.
    if unsafe { libc::getrandom(rnd.as_mut_ptr().cast(), 8, 0) } != 8 {
        return Err(format!("getrandom: {}", errno()));
    }
    let path = dir.join(format!(
        "pdump-victim-tree-{:016x}-{idx}",
        u64::from_ne_bytes(rnd)
    ));
    let c = cpath(&path);
    // SAFETY: valid path.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
            0o600 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(format!("open {}: {}", path.display(), errno()));
    }
    tree_write_all(fd, &tree_file_content(idx), "shared file")?;
    // SAFETY: lseek has no memory preconditions.
    if unsafe { libc::lseek(fd, TREE_FILE_OFFSET, libc::SEEK_SET) } != TREE_FILE_OFFSET {
        return Err(format!("lseek shared file: {}", errno()));
    }
    Ok((fd, path))
}

fn tree_send(fd: c_int, data: &[u8], what: &str) -> Result<(), String> {
    // SAFETY: valid buffer.
    let r = unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_DONTWAIT) };
    if r != data.len() as isize {
        return Err(format!("send {what}: returned {r}: {}", errno()));
    }
    Ok(())
}

/// Serialise a string as a JSON string literal without any raw space
/// (so that the READY line splits into exactly three words).
fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) <= 0x20 || c as u32 == 0x7f => {
                o.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

// ---------------------------------------------------------------------------
// tree: records
// ---------------------------------------------------------------------------

/// What one member reports about itself at setup: ids as seen INSIDE its
/// own pid namespace, its pid in its parent's namespace (`outer`, filled in
/// by the parent from `fork`'s return value) and its plumbing fds.
#[derive(Clone, Debug, Default)]
struct TreeRec {
    idx: usize,
    pid: i32,
    ppid: i32,
    pgid: i32,
    sid: i32,
    outer: i32,
    /// Main thread first.
    tids: Vec<i32>,
    /// (this member's fd, its parent's fd); -1 where absent.
    up: (i32, i32),
    pipe: (i32, i32),
    sock: (i32, i32),
    /// The `sharedfile` fd: the same number in the member and its parent.
    file: i32,
    path: String,
}

impl TreeRec {
    /// `R idx pid ppid pgid sid outer up.0 up.1 pipe.0 pipe.1 sock.0 sock.1
    /// file tids(comma-separated) path(hex or -)` (internal to the victim).
    fn to_line(&self) -> String {
        let tids: Vec<String> = self.tids.iter().map(|t| t.to_string()).collect();
        let path: String = self.path.bytes().map(|b| format!("{b:02x}")).collect();
        format!(
            "R {} {} {} {} {} {} {} {} {} {} {} {} {} {} {}",
            self.idx,
            self.pid,
            self.ppid,
            self.pgid,
            self.sid,
            self.outer,
            self.up.0,
            self.up.1,
            self.pipe.0,
            self.pipe.1,
            self.sock.0,
            self.sock.1,
            self.file,
            tids.join(","),
            if path.is_empty() { "-".into() } else { path }
        )
    }

    fn parse(line: &str) -> Option<TreeRec> {
        let w: Vec<&str> = line.split(' ').collect();
        if w.len() != 16 || w[0] != "R" {
            return None;
        }
        let n: Vec<i32> = w[1..14]
            .iter()
            .map(|x| x.parse::<i32>().ok())
            .collect::<Option<_>>()?;
        let tids = w[14]
            .split(',')
            .map(|t| t.parse::<i32>().ok())
            .collect::<Option<Vec<_>>>()?;
        let path = if w[15] == "-" {
            String::new()
        } else {
            let bytes = (0..w[15].len() / 2)
                .map(|i| u8::from_str_radix(w[15].get(2 * i..2 * i + 2)?, 16).ok())
                .collect::<Option<Vec<u8>>>()?;
            String::from_utf8_lossy(&bytes).into_owned()
        };
        Some(TreeRec {
            idx: usize::try_from(n[0]).ok()?,
            pid: n[1],
            ppid: n[2],
            pgid: n[3],
            sid: n[4],
            outer: n[5],
            up: (n[6], n[7]),
            pipe: (n[8], n[9]),
            sock: (n[10], n[11]),
            file: n[12],
            tids,
            path,
        })
    }
}

/// The JSON document of the READY line (no raw spaces; see the module
/// documentation for the fields).
fn tree_json(spec: &TreeSpec, recs: &[TreeRec], launcher: i32) -> String {
    let mut o = format!(
        "{{\"spec\":{},\"members\":{}",
        json_str(&spec.text),
        spec.nodes.len()
    );
    if launcher > 0 {
        o.push_str(&format!(",\"launcher\":{launcher}"));
    }
    o.push_str(",\"nodes\":[");
    for (i, r) in recs.iter().enumerate() {
        let n = &spec.nodes[r.idx];
        let f = &n.flags;
        if i > 0 {
            o.push(',');
        }
        let state = if f.zombie.is_some() {
            "zombie"
        } else if f.stopped {
            "stopped"
        } else {
            "running"
        };
        let tids: Vec<String> = r.tids.iter().map(|t| t.to_string()).collect();
        o.push_str(&format!(
            "{{\"idx\":{},\"parent\":{},\"flags\":{},\"nsdepth\":{},\"state\":\"{state}\",\
             \"pid\":{},\"ppid\":{},\"pgid\":{},\"sid\":{},\"pid_in_parent_ns\":{},\"tids\":[{}]",
            r.idx,
            n.parent.map_or(-1, |p| p as i64),
            json_str(&n.flags_text),
            n.nsdepth,
            r.pid,
            r.ppid,
            r.pgid,
            r.sid,
            r.outer,
            tids.join(",")
        ));
        if let Some(z) = f.zombie {
            o.push_str(&format!(",\"exit_status\":{z}"));
        }
        for (name, (a, b)) in [("up_fds", r.up), ("pipe_fds", r.pipe), ("sock_fds", r.sock)] {
            if a >= 0 {
                o.push_str(&format!(",\"{name}\":[{a},{b}]"));
            }
        }
        if r.file >= 0 {
            o.push_str(&format!(
                ",\"file_fd\":{},\"file\":{}",
                r.file,
                json_str(&r.path)
            ));
        }
        o.push('}');
    }
    o.push_str("]}");
    o
}

// ---------------------------------------------------------------------------
// tree: per-member work and threads
// ---------------------------------------------------------------------------

const TREE_WORDS: usize = 512;

/// The sleep per loop iteration of every member: 1 ms, or one ms per 10
/// members in bigger trees (20 ms for `wide200`), so that the whole tree
/// stays light.
fn tree_nap_ms(spec: &TreeSpec) -> u64 {
    (spec.nodes.len() as u64 / 10).max(1)
}

/// A member's light self-check: a 4 KiB buffer modified one word per
/// iteration with a running position-weighted checksum (full recompute
/// every 256 iterations), word 0 a never-modified per-node tag, and a
/// counter pair (`iters ^ down == !0`).
struct TreeWork {
    idx: usize,
    buf: Vec<u64>,
    rng: u64,
    iters: u64,
    down: u64,
    sum: u64,
}

fn tree_word(idx: usize, j: usize) -> u64 {
    splitmix64(0x7EE0_0000_0000 ^ ((idx as u64) << 16) ^ j as u64)
}

impl TreeWork {
    fn new(idx: usize) -> TreeWork {
        let buf: Vec<u64> = (0..TREE_WORDS).map(|j| tree_word(idx, j)).collect();
        let mut w = TreeWork {
            idx,
            buf,
            rng: splitmix64(idx as u64) | 1,
            iters: 0,
            down: u64::MAX,
            sum: 0,
        };
        w.sum = w.full();
        w
    }

    fn full(&self) -> u64 {
        self.buf.iter().enumerate().fold(0u64, |s, (i, &w)| {
            s.wrapping_add(w.wrapping_mul(loop_weight(i)))
        })
    }

    fn step(&mut self) -> Result<(), String> {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let j = 1 + (self.rng >> 32) as usize % (TREE_WORDS - 1);
        let old = self.buf[j];
        let new = old.rotate_left(11) ^ self.rng;
        self.buf[j] = new;
        self.sum = self
            .sum
            .wrapping_add(new.wrapping_sub(old).wrapping_mul(loop_weight(j)));
        self.iters += 1;
        self.down = opaque(self.down).wrapping_sub(1);
        if self.iters ^ self.down != u64::MAX || self.rng == 0 {
            return Err(format!(
                "counter pair corrupted: iters={} down={:#x} rng={:#x}",
                self.iters, self.down, self.rng
            ));
        }
        if self.iters.is_multiple_of(256) {
            self.verify()?;
        }
        Ok(())
    }

    fn verify(&self) -> Result<(), String> {
        let s = self.full();
        if s != self.sum {
            return Err(format!(
                "buffer checksum {s:#x}, running {:#x} (iteration {})",
                self.sum, self.iters
            ));
        }
        if self.buf[0] != tree_word(self.idx, 0) {
            return Err(format!(
                "buffer tag {:#x} (not node {}'s)",
                self.buf[0], self.idx
            ));
        }
        Ok(())
    }
}

thread_local! {
    static TREE_TLS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

struct TreeThreadsShared {
    stop: AtomicBool,
    started: AtomicUsize,
    progress: Vec<AtomicU64>,
    tids: Vec<std::sync::atomic::AtomicI32>,
}

/// The extra threads of a `threads=N` member.
struct TreeThreads {
    sh: Arc<TreeThreadsShared>,
    handles: Vec<std::thread::JoinHandle<Result<u64, String>>>,
}

/// One extra thread: a thread-local counter mirrored by a local one, both
/// bumped every ~10 ms; at the end its tid and signal mask must be unchanged.
fn tree_thread(k: usize, sh: &TreeThreadsShared, mask: u64) -> Result<u64, String> {
    let tid = gettid();
    sh.tids[k].store(tid, Ordering::SeqCst);
    TREE_TLS.with(|c| c.set(0));
    let mut count = 0u64;
    sh.started.fetch_add(1, Ordering::SeqCst);
    while !sh.stop.load(Ordering::Acquire) {
        count += 1;
        let t = TREE_TLS.with(|c| {
            let v = opaque(c.get()) + 1;
            c.set(v);
            v
        });
        if t != count {
            return Err(format!(
                "thread {k}: thread-local counter {t}, expected {count}"
            ));
        }
        sh.progress[k].store(count, Ordering::Release);
        nap(10);
    }
    if gettid() != tid {
        return Err(format!("thread {k}: tid {} now, {tid} at start", gettid()));
    }
    let m = get_mask();
    if m != mask {
        return Err(format!(
            "thread {k}: signal mask {m:#x}, expected {mask:#x}"
        ));
    }
    Ok(count)
}

impl TreeThreads {
    /// Start `n` threads with SIGTERM blocked in them (so the handler always
    /// runs on the main thread and its alternate stack).
    fn start(n: usize, mask: u64) -> Result<TreeThreads, String> {
        let tmask = mask | sigbit(libc::SIGTERM);
        let sh = Arc::new(TreeThreadsShared {
            stop: AtomicBool::new(false),
            started: AtomicUsize::new(0),
            progress: (0..n).map(|_| AtomicU64::new(0)).collect(),
            tids: (0..n)
                .map(|_| std::sync::atomic::AtomicI32::new(0))
                .collect(),
        });
        set_mask(tmask);
        let mut handles = Vec::new();
        for k in 0..n {
            let sh = sh.clone();
            let h = std::thread::Builder::new()
                .name(format!("tree-{k}"))
                .stack_size(256 * 1024)
                .spawn(move || tree_thread(k, &sh, tmask));
            match h {
                Ok(h) => handles.push(h),
                Err(e) => {
                    set_mask(mask);
                    return Err(format!("spawning thread {k}: {e}"));
                }
            }
        }
        set_mask(mask);
        while sh.started.load(Ordering::SeqCst) != n {
            if handles.iter().any(|h| h.is_finished()) {
                return Err("a thread ended before starting".into());
            }
            std::thread::yield_now();
        }
        Ok(TreeThreads { sh, handles })
    }

    fn tids(&self) -> Vec<i32> {
        self.sh
            .tids
            .iter()
            .map(|t| t.load(Ordering::SeqCst))
            .collect()
    }

    /// Every thread must still make progress (2 more iterations within
    /// 10 s); then stop and join them all.
    fn check_and_stop(self) -> Result<(), String> {
        let p0: Vec<u64> = self
            .sh
            .progress
            .iter()
            .map(|p| p.load(Ordering::Acquire))
            .collect();
        let start = monotonic_ns();
        let mut res = Ok(());
        for (k, p) in self.sh.progress.iter().enumerate() {
            while p.load(Ordering::Acquire) < p0[k] + 2 {
                if monotonic_ns() - start > 10_000_000_000 || self.handles[k].is_finished() {
                    res = Err(format!(
                        "thread {k} made no progress after SIGTERM (counter {})",
                        p.load(Ordering::Acquire)
                    ));
                    break;
                }
                nap(2);
            }
            if res.is_err() {
                break;
            }
        }
        self.sh.stop.store(true, Ordering::Release);
        for (k, h) in self.handles.into_iter().enumerate() {
            let r = h.join().map_err(|_| format!("thread {k} panicked"))?;
            let c = r?;
            let p = self.sh.progress[k].load(Ordering::Acquire);
            if c != p {
                return Err(format!("thread {k}: counter {c}, published {p}"));
            }
        }
        res
    }
}

// ---------------------------------------------------------------------------
// tree: members
// ---------------------------------------------------------------------------

/// A parent's handle on one child node.
struct TreeLink {
    idx: usize,
    /// The child's pid in the parent's pid namespace (`fork`'s result).
    pid: i32,
    /// The report pipe's read end.
    rd: LineReader,
    /// The parent's ends of `pipe`, `sockpair`, `sharedfile` (-1: none).
    pipe_w: c_int,
    sock: c_int,
    file: c_int,
    path: Option<PathBuf>,
    /// A `stopped` child was seen continued (`CLD_CONTINUED`).
    cont_seen: bool,
}

/// A member's own ends of what it shares with its parent (-1: none), and
/// the parent's fd numbers of the other ends (for the READY line).
#[derive(Clone, Copy)]
struct TreeOwn {
    up: c_int,
    up_parent: c_int,
    pipe: c_int,
    pipe_parent: c_int,
    sock: c_int,
    sock_parent: c_int,
    file: c_int,
}

impl TreeOwn {
    const NONE: TreeOwn = TreeOwn {
        up: -1,
        up_parent: -1,
        pipe: -1,
        pipe_parent: -1,
        sock: -1,
        sock_parent: -1,
        file: -1,
    };
}

/// One live member of the tree (any node but a zombie after its exit).
struct TreeMember<'a> {
    spec: &'a TreeSpec,
    idx: usize,
    common: &'a Common,
    own: TreeOwn,
    path: Option<PathBuf>,
    /// For `pgid=K`: node K's pid (in this member's namespace).
    sib_pid: i32,
    /// For a root that is a pid-namespace init: the launcher's pid.
    launcher: i32,
    links: Vec<TreeLink>,
    /// This member's record first, then its subtree's, in DFS order.
    recs: Vec<TreeRec>,
    work: TreeWork,
    threads: Option<TreeThreads>,
}

impl<'a> TreeMember<'a> {
    fn new(spec: &'a TreeSpec, idx: usize, common: &'a Common, own: TreeOwn) -> Self {
        TreeMember {
            spec,
            idx,
            common,
            own,
            path: None,
            sib_pid: -1,
            launcher: -1,
            links: Vec::new(),
            recs: Vec::new(),
            work: TreeWork::new(idx),
            threads: None,
        }
    }

    fn is_root(&self) -> bool {
        self.idx == 0
    }

    fn flags(&self) -> &'a TreeFlags {
        &self.spec.nodes[self.idx].flags
    }

    /// Send one line up: the root prints it, others write it to the parent.
    fn report(&self, line: &str) -> Result<(), String> {
        if self.is_root() {
            emit(line);
            Ok(())
        } else {
            tree_write_all(self.own.up, format!("{line}\n").as_bytes(), "report pipe")
        }
    }

    fn kill_children(&self) {
        for l in &self.links {
            if self.spec.nodes[l.idx].flags.zombie.is_none() {
                // SAFETY: kill of our own child.
                unsafe { libc::kill(l.pid, libc::SIGKILL) };
            }
        }
    }

    /// Report a failure at once, kill our children, exit 1.
    fn die(&self, k: usize, what: &str) -> ! {
        self.kill_children();
        let _ = self.report(&format!("FAIL {k} {}", one_line(what)));
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(1) }
    }

    /// Every fd of ours that a new child must close.
    fn held_fds(&self) -> Vec<c_int> {
        let o = &self.own;
        let mut v = vec![o.up, o.pipe, o.sock, o.file];
        for l in &self.links {
            v.extend([l.rd.fd, l.pipe_w, l.sock, l.file]);
        }
        v.retain(|&fd| fd >= 0);
        v
    }

    /// Session and group, children (one after the other, each fully set up
    /// before the next), threads, own record.
    fn setup(&mut self, outer: i32) -> Result<(), TreeErr> {
        let me = self.idx;
        let spec = self.spec;
        let node = &spec.nodes[me];
        let f = &node.flags;
        let err = |what: String| (me, what);
        // SAFETY: session/group syscalls without memory arguments.
        unsafe {
            if f.setsid && libc::setsid() < 0 {
                return Err(err(format!("setsid: {}", errno())));
            }
            let target = match f.pgid {
                TreePgid::Inherit => None,
                TreePgid::Own => Some(0),
                TreePgid::Parent => Some(libc::getpgid(libc::getppid())),
                TreePgid::Node(_) => Some(libc::getpgid(self.sib_pid)),
            };
            if let Some(g) = target {
                if g < 0 || (g == 0 && f.pgid != TreePgid::Own) {
                    return Err(err(format!(
                        "pgid: target group {g} not visible: {}",
                        errno()
                    )));
                }
                if libc::setpgid(0, g) != 0 {
                    return Err(err(format!("setpgid(0, {g}): {}", errno())));
                }
                let now = libc::getpgrp();
                if now != if g == 0 { libc::getpid() } else { g } {
                    return Err(err(format!("pgid is {now} after setpgid(0, {g})")));
                }
            }
        }
        let mut sub = Vec::new();
        for &c in &node.children {
            let sib = match spec.nodes[c].flags.pgid {
                TreePgid::Node(k) => self.links.iter().find(|l| l.idx == k).map_or(-1, |l| l.pid),
                _ => -1,
            };
            let held = self.held_fds();
            let (link, recs) = tree_spawn(spec, c, self.common, &held, sib)?;
            self.links.push(link);
            sub.extend(recs);
        }
        let mut tids = vec![gettid()];
        if f.threads > 0 {
            let t = TreeThreads::start(f.threads, self.common.mask).map_err(err)?;
            tids.extend(t.tids());
            self.threads = Some(t);
        }
        let (pid, ppid, pgid, sid, _) = tree_ids();
        let o = &self.own;
        self.recs.push(TreeRec {
            idx: me,
            pid,
            ppid,
            pgid,
            sid,
            outer,
            tids,
            up: (o.up, o.up_parent),
            pipe: (o.pipe, o.pipe_parent),
            sock: (o.sock, o.sock_parent),
            file: o.file,
            path: self
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        });
        self.recs.extend(sub);
        Ok(())
    }

    /// Tell the parent (or the test) that the subtree is ready.
    fn ready(&self) -> Result<(), String> {
        if self.is_root() {
            if self.recs.len() != self.spec.nodes.len() {
                return Err(format!(
                    "{} records for {} nodes",
                    self.recs.len(),
                    self.spec.nodes.len()
                ));
            }
            for (i, r) in self.recs.iter().enumerate() {
                if r.idx != i {
                    return Err(format!("record {i} is node {}'s", r.idx));
                }
            }
            let json = tree_json(self.spec, &self.recs, self.launcher);
            emit(&format!("READY {} {json}", self.recs[0].outer));
            if std::env::var("PDUMP_VICTIM_GAPS").as_deref() == Ok("1") {
                // Benchmarks: the root measures its stops (one more thread).
                start_watchdog(sigbit(libc::SIGUSR2));
            }
            Ok(())
        } else {
            let mut msg = String::new();
            for r in &self.recs {
                msg.push_str(&r.to_line());
                msg.push('\n');
            }
            msg.push_str("END\n");
            tree_write_all(self.own.up, msg.as_bytes(), "report pipe")
        }
    }

    /// Note `stopped` children that have been continued since.
    fn poll_continued(&mut self) {
        let spec = self.spec;
        for l in self.links.iter_mut() {
            if spec.nodes[l.idx].flags.stopped && !l.cont_seen {
                if let Ok(Some((libc::CLD_CONTINUED, _))) =
                    tree_waitid(l.pid, libc::WCONTINUED | libc::WNOHANG | libc::WNOWAIT)
                {
                    l.cont_seen = true;
                }
            }
        }
    }

    /// The light self-checking loop, until SIGTERM: one step per
    /// [`tree_nap_ms`]; about every 64 ms it checks for a dead parent and
    /// for continued `stopped` children.
    fn run(&mut self) {
        let ms = tree_nap_ms(self.spec);
        let every = (64 / ms).max(1);
        while !term_requested() {
            if let Err(e) = self.work.step() {
                self.die(self.idx, &e);
            }
            if self.work.iters.is_multiple_of(every) {
                if self.own.up >= 0 && tree_parent_gone(self.own.up) {
                    // Orphaned (the parent died): nobody is left to report to.
                    self.kill_children();
                    // SAFETY: _exit has no preconditions.
                    unsafe { libc::_exit(3) };
                }
                self.poll_continued();
            }
            nap(ms);
        }
    }

    /// The checks of this member's own state after SIGTERM.
    fn self_check(&mut self) -> Result<(), String> {
        let r = &self.recs[0];
        let mut now = tree_ids();
        let then = (r.pid, r.ppid, r.pgid, r.sid, r.tids[0]);
        if self.own.up < 0 && restored_root() {
            // A restored root has a new parent, and a session and group of
            // its own (or its caller's) where they were outside the tree.
            now = (now.0, then.1, then.2, then.3, now.4);
        }
        if now != then {
            return Err(format!(
                "(pid, ppid, pgid, sid, tid) is {now:?}, was {then:?} at READY"
            ));
        }
        self.work.verify()?;
        if let Some(t) = self.threads.take() {
            let tids = t.tids();
            if tids[..] != r.tids[1..] {
                return Err(format!("thread ids {tids:?}, were {:?}", &r.tids[1..]));
            }
            t.check_and_stop()?;
        }
        let o = self.own;
        if o.up >= 0 {
            tree_check_pipe_end(o.up, libc::O_WRONLY, "report pipe")?;
        }
        if o.pipe >= 0 {
            tree_check_pipe_end(o.pipe, libc::O_RDONLY, "pipe")?;
            let n = tree_fionread(o.pipe, "pipe")?;
            if n != 10 {
                return Err(format!("pipe (fd {}) holds {n} bytes, expected 10", o.pipe));
            }
            let d = tree_read_exact(o.pipe, 10, "pipe")?;
            if d != b"ping\npong\n" {
                return Err(format!("pipe data {:?}", String::from_utf8_lossy(&d)));
            }
        }
        if o.sock >= 0 {
            let mut ty: c_int = 0;
            let mut len = std::mem::size_of::<c_int>() as libc::socklen_t;
            // SAFETY: valid out pointers of the right size.
            let r = unsafe {
                libc::getsockopt(
                    o.sock,
                    libc::SOL_SOCKET,
                    libc::SO_TYPE,
                    (&mut ty as *mut c_int).cast(),
                    &mut len,
                )
            };
            if r != 0 || ty != libc::SOCK_STREAM {
                return Err(format!("socket (fd {}): SO_TYPE {ty}: {}", o.sock, errno()));
            }
            let n = tree_fionread(o.sock, "socket")?;
            if n != 10 {
                return Err(format!(
                    "socket (fd {}) holds {n} bytes, expected 10",
                    o.sock
                ));
            }
            let d = tree_read_exact(o.sock, 10, "socket")?;
            if d != b"helloworld" {
                return Err(format!("socket data {:?}", String::from_utf8_lossy(&d)));
            }
            tree_send(o.sock, b"back!", "socket")?;
        }
        if o.file >= 0 {
            let off = offset(o.file);
            if off != TREE_FILE_OFFSET {
                return Err(format!(
                    "shared file (fd {}) offset {off}, expected 77",
                    o.file
                ));
            }
            let st = tree_fstat(o.file, "shared file")?;
            if st.st_size != TREE_FILE_LEN as i64 {
                return Err(format!("shared file size {}", st.st_size));
            }
            let mut v = vec![0u8; TREE_FILE_LEN];
            // SAFETY: valid buffer.
            let n = unsafe { libc::pread(o.file, v.as_mut_ptr().cast(), v.len(), 0) };
            let parent = self.spec.nodes[self.idx].parent.unwrap_or(0);
            if n != TREE_FILE_LEN as isize || v != tree_file_content(self.idx) {
                return Err(format!(
                    "shared file content wrong (pread {n}; parent {parent})"
                ));
            }
            let (fl, _) = fd_flags(o.file);
            if fl & libc::O_ACCMODE != libc::O_RDWR {
                return Err(format!("shared file status flags {fl:#x}"));
            }
            // Move the shared offset: the parent checks it sees 78.
            // SAFETY: lseek has no memory preconditions.
            if unsafe { libc::lseek(o.file, TREE_FILE_OFFSET + 1, libc::SEEK_SET) } != 78 {
                return Err(format!("lseek shared file: {}", errno()));
            }
        }
        self.common.verify()
    }

    /// After SIGTERM: forward it, collect the children's results, check
    /// zombies and ourselves, reap, report. Returns the number of verified
    /// nodes of this subtree, or the failure with the lowest node index.
    fn finish(&mut self) -> Result<u64, TreeErr> {
        let spec = self.spec;
        let mut fails: Vec<TreeErr> = Vec::new();
        let mut count = 0u64;
        self.poll_continued();
        let mut given_up = vec![false; self.links.len()];
        for (i, l) in self.links.iter().enumerate() {
            let cf = &spec.nodes[l.idx].flags;
            if cf.zombie.is_some() {
                continue;
            }
            let dead = !matches!(
                tree_waitid(l.pid, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT),
                Ok(None)
            );
            if cf.stopped && !l.cont_seen && !dead {
                // Still stopped (no SIGCONT before SIGTERM), or it never
                // was: either way it cannot answer as it should.
                fails.push((
                    l.idx,
                    "stopped member: no CLD_CONTINUED (not continued before SIGTERM, or not stopped when SIGCONT came)".into(),
                ));
                // SAFETY: kill of our own child.
                unsafe { libc::kill(l.pid, libc::SIGKILL) };
                given_up[i] = true;
                continue;
            }
            if l.pipe_w >= 0 {
                if let Err(e) = tree_write_all(l.pipe_w, b"pong\n", "pipe") {
                    fails.push((l.idx, e));
                }
            }
            if l.sock >= 0 {
                if let Err(e) = tree_send(l.sock, b"world", "socket") {
                    fails.push((l.idx, e));
                }
            }
            // SAFETY: kill of our own child.
            if unsafe { libc::kill(l.pid, libc::SIGTERM) } != 0 {
                fails.push((l.idx, format!("kill({}, SIGTERM): {}", l.pid, errno())));
            }
        }
        let depth = spec.nodes[self.idx].depth as u128;
        let deadline = monotonic_ns()
            + 40_000_000_000u128
                .saturating_sub(depth * 2_000_000_000)
                .max(5_000_000_000);
        let mut reported_ok = vec![false; self.links.len()];
        for (i, l) in self.links.iter_mut().enumerate() {
            let cf = &spec.nodes[l.idx].flags;
            if let Some(z) = cf.zombie {
                match tree_waitid(l.pid, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT) {
                    Ok(Some((libc::CLD_EXITED, s))) if s == z as i32 => count += 1,
                    other => fails.push((
                        l.idx,
                        format!(
                            "zombie (pid {}): waitid says {other:?}, expected exit {z}",
                            l.pid
                        ),
                    )),
                }
                continue;
            }
            if given_up[i] {
                continue;
            }
            match l.rd.line(deadline) {
                Ok(Some(line)) => {
                    if let Some(n) = line.strip_prefix("OK ").and_then(|n| n.parse::<u64>().ok()) {
                        count += n;
                        reported_ok[i] = true;
                        if let Err(e) = tree_parent_post_check(l) {
                            fails.push((l.idx, e));
                        }
                    } else if let Some(f) = tree_parse_fail(&line, l.idx) {
                        fails.push(f);
                    } else {
                        fails.push((l.idx, format!("bad result line {line:?}")));
                    }
                }
                Ok(None) => fails.push((
                    l.idx,
                    format!("died without a result ({})", tree_child_status(l.pid)),
                )),
                Err(e) => {
                    // SAFETY: kill of our own child.
                    unsafe { libc::kill(l.pid, libc::SIGKILL) };
                    fails.push((l.idx, format!("no result after SIGTERM: {e}")));
                }
            }
        }
        match self.self_check() {
            Ok(()) => count += 1,
            Err(e) => fails.push((self.idx, e)),
        }
        for (i, l) in self.links.iter().enumerate() {
            let want = match spec.nodes[l.idx].flags.zombie {
                Some(z) => Some(z as i32),
                None if reported_ok[i] => Some(0),
                None => None,
            };
            match tree_reap(l.pid) {
                Ok(st) => {
                    if let Some(w) = want {
                        if !libc::WIFEXITED(st) || libc::WEXITSTATUS(st) != w {
                            fails.push((
                                l.idx,
                                format!("{}, expected exit status {w}", tree_describe_status(st)),
                            ));
                        }
                    }
                }
                Err(e) => fails.push((l.idx, e)),
            }
            if let Some(p) = &l.path {
                let _ = std::fs::remove_file(p);
            }
        }
        match fails.into_iter().min_by_key(|f| f.0) {
            None => Ok(count),
            Some(f) => Err(f),
        }
    }
}

/// The parent's checks after a child reported OK: the socket's way back,
/// the shared file offset the child moved, the pipe the child emptied.
fn tree_parent_post_check(l: &TreeLink) -> Result<(), String> {
    if l.pipe_w >= 0 {
        tree_check_pipe_end(l.pipe_w, libc::O_WRONLY, "parent's pipe end")?;
        let n = tree_fionread(l.pipe_w, "parent's pipe end")?;
        if n != 0 {
            return Err(format!(
                "parent's pipe end (fd {}) still holds {n} bytes: not the child's pipe",
                l.pipe_w
            ));
        }
    }
    if l.sock >= 0 {
        let n = tree_fionread(l.sock, "parent's socket")?;
        if n != 5 {
            return Err(format!(
                "parent's socket (fd {}) holds {n} bytes, expected 5",
                l.sock
            ));
        }
        let d = tree_read_exact(l.sock, 5, "parent's socket")?;
        if d != b"back!" {
            return Err(format!(
                "parent's socket data {:?}",
                String::from_utf8_lossy(&d)
            ));
        }
    }
    if l.file >= 0 {
        let off = offset(l.file);
        if off != TREE_FILE_OFFSET + 1 {
            return Err(format!(
                "parent's shared file (fd {}) offset {off}, expected 78: the open file is not shared",
                l.file
            ));
        }
    }
    Ok(())
}

/// Create child node `ci`: its plumbing, `fork` (after `unshare(CLONE_NEWPID)`
/// for `ns`, then back to our own namespace for later children), wait for
/// its subtree's report, then for it to become a zombie or stop.
fn tree_spawn(
    spec: &TreeSpec,
    ci: usize,
    common: &Common,
    held: &[c_int],
    sib_pid: i32,
) -> Result<(TreeLink, Vec<TreeRec>), TreeErr> {
    let cf = &spec.nodes[ci].flags;
    let err = |what: String| (ci, what);
    let (up_r, up_w) = tree_pipe().map_err(err)?;
    let (pipe_r, pipe_w) = if cf.pipe {
        let (r, w) = tree_pipe().map_err(err)?;
        tree_write_all(w, b"ping\n", "pipe").map_err(err)?;
        (r, w)
    } else {
        (-1, -1)
    };
    let (sock_p, sock_c) = if cf.sockpair {
        let mut sv = [0 as c_int; 2];
        // SAFETY: valid out array of two ints.
        if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sv.as_mut_ptr()) } != 0 {
            return Err(err(format!("socketpair: {}", errno())));
        }
        tree_send(sv[0], b"hello", "socket").map_err(err)?;
        (sv[0], sv[1])
    } else {
        (-1, -1)
    };
    let (file, path) = if cf.sharedfile {
        let (fd, p) = tree_create_file(ci).map_err(err)?;
        (fd, Some(p))
    } else {
        (-1, None)
    };
    let nsfd = if cf.ns {
        // SAFETY: open of a constant path; unshare without memory arguments.
        unsafe {
            let fd = libc::open(
                c"/proc/self/ns/pid".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            );
            if fd < 0 {
                return Err(err(format!("open /proc/self/ns/pid: {}", errno())));
            }
            if libc::unshare(libc::CLONE_NEWPID) != 0 {
                return Err(err(format!("unshare(CLONE_NEWPID): {}", errno())));
            }
            fd
        }
    } else {
        -1
    };
    // SAFETY: this process is single-threaded here (threads are started
    // only after all children exist), so the child may run arbitrary code.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        for fd in held.iter().copied().chain([up_r, pipe_w, sock_p, nsfd]) {
            close_fd(fd);
        }
        tree_null_stdio();
        TERM.store(false, Ordering::SeqCst);
        TERM_ALT.store(0, Ordering::SeqCst);
        let own = TreeOwn {
            up: up_w,
            up_parent: up_r,
            pipe: pipe_r,
            pipe_parent: pipe_w,
            sock: sock_c,
            sock_parent: sock_p,
            file,
        };
        let mut m = TreeMember::new(spec, ci, common, own);
        m.path = path;
        m.sib_pid = sib_pid;
        tree_member_main(m, -1)
    }
    let fork_err = errno();
    if nsfd >= 0 {
        // SAFETY: setns with our own descriptor; back to the namespace we
        // are in, so later children are born there.
        let r = unsafe { libc::setns(nsfd, libc::CLONE_NEWPID) };
        let e = errno();
        close_fd(nsfd);
        if r != 0 {
            return Err(err(format!("setns back to our pid namespace: {e}")));
        }
    }
    if pid < 0 {
        return Err(err(format!("fork: {fork_err}")));
    }
    for fd in [up_w, pipe_r, sock_c] {
        close_fd(fd);
    }
    let mut link = TreeLink {
        idx: ci,
        pid,
        rd: LineReader {
            fd: up_r,
            buf: Vec::new(),
            eof: false,
        },
        pipe_w,
        sock: sock_p,
        file,
        path,
        cont_seen: false,
    };
    let kill_it = |what: TreeErr| {
        // SAFETY: kill of our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        what
    };
    let deadline = monotonic_ns() + 120_000_000_000;
    let mut recs = Vec::new();
    loop {
        match link.rd.line(deadline) {
            Ok(Some(l)) if l == "END" => break,
            Ok(Some(l)) => {
                if let Some(f) = tree_parse_fail(&l, ci) {
                    return Err(kill_it(f));
                }
                match TreeRec::parse(&l) {
                    Some(r) => recs.push(r),
                    None => return Err(kill_it(err(format!("bad setup line {l:?}")))),
                }
            }
            Ok(None) => {
                return Err(err(format!(
                    "died during setup ({})",
                    tree_child_status(pid)
                )))
            }
            Err(e) => return Err(kill_it(err(format!("setup report: {e}")))),
        }
    }
    match recs.first_mut() {
        Some(r) if r.idx == ci => r.outer = pid,
        _ => {
            return Err(kill_it(err(
                "setup report does not start with the child".into()
            )))
        }
    }
    if let Some(z) = cf.zombie {
        match tree_waitid(pid, libc::WEXITED | libc::WNOWAIT) {
            Ok(Some((libc::CLD_EXITED, s))) if s == z as i32 => {}
            other => {
                return Err(err(format!(
                    "zombie: waitid says {other:?}, expected exit {z}"
                )))
            }
        }
    }
    if cf.stopped {
        if cf.ns {
            // A pid-namespace init cannot stop itself; from the parent's
            // namespace SIGSTOP is forced.
            // SAFETY: kill of our own child.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
        match tree_waitid(pid, libc::WSTOPPED | libc::WEXITED | libc::WNOWAIT) {
            Ok(Some((libc::CLD_STOPPED, libc::SIGSTOP))) => {}
            other => {
                return Err(kill_it(err(format!(
                    "stop: waitid says {other:?}, expected a SIGSTOP stop"
                ))))
            }
        }
    }
    Ok((link, recs))
}

/// The life of one member after `fork` (never returns): setup, READY report,
/// then exit (`zombie`) or stop (`stopped`), the loop, the final checks.
fn tree_member_main(mut m: TreeMember, outer: i32) -> ! {
    let f = m.flags();
    if let Err((k, what)) = m.setup(outer) {
        m.die(k, &what);
    }
    if let Err(e) = m.ready() {
        m.die(m.idx, &e);
    }
    if let Some(z) = f.zombie {
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(z as c_int) };
    }
    if f.stopped && !f.ns {
        // SAFETY: kill of ourselves.
        if unsafe { libc::kill(libc::getpid(), libc::SIGSTOP) } != 0 {
            m.die(m.idx, &format!("kill(self, SIGSTOP): {}", errno()));
        }
    }
    let target = corrupt_request().and_then(|v| v.strip_prefix("node=")?.parse::<usize>().ok());
    if target == Some(m.idx) {
        // Self-test: one bit behind the running checksum's back.
        m.work.buf[5] ^= 1 << 17;
    }
    m.run();
    let res = m.finish();
    let (line, code) = match (res, m.is_root()) {
        (Ok(n), true) if n == m.spec.nodes.len() as u64 => (format!("OK tree={n}"), 0),
        (Ok(n), true) => (
            format!("FAIL 0 verified {n} nodes of {}", m.spec.nodes.len()),
            1,
        ),
        (Ok(n), false) => (format!("OK {n}"), 0),
        (Err((k, what)), _) => (format!("FAIL {k} {}", one_line(&what)), 1),
    };
    let _ = m.report(&line);
    // SAFETY: _exit has no preconditions; the root's line was flushed.
    unsafe { libc::_exit(code) }
}

/// A root with `ns`: this process stays outside the tree as its launcher
/// (the root's parent), forwards SIGTERM to it and exits with its status.
fn tree_launch(spec: &TreeSpec, common: &Common) -> ! {
    let (r, w) = tree_pipe().unwrap_or_else(|e| fail(format!("0 {e}")));
    // SAFETY: unshare without memory arguments.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        fail(format!("0 unshare(CLONE_NEWPID): {}", errno()));
    }
    // SAFETY: single-threaded here.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        fail(format!("0 fork: {}", errno()));
    }
    if pid == 0 {
        close_fd(w);
        let mut b = [0u8; 8];
        let got = tree_read_exact(r, 8, "launcher pipe").unwrap_or_else(|e| fail(format!("0 {e}")));
        b.copy_from_slice(&got);
        close_fd(r);
        TERM.store(false, Ordering::SeqCst);
        TERM_ALT.store(0, Ordering::SeqCst);
        let outer = i32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        let mut m = TreeMember::new(spec, 0, common, TreeOwn::NONE);
        m.launcher = i32::from_ne_bytes([b[4], b[5], b[6], b[7]]);
        tree_member_main(m, outer)
    }
    close_fd(r);
    let mut msg = pid.to_ne_bytes().to_vec();
    msg.extend(getpid().to_ne_bytes());
    if let Err(e) = tree_write_all(w, &msg, "launcher pipe") {
        fail(format!("0 {e}"));
    }
    close_fd(w);
    let mut forwarded = false;
    loop {
        let mut st: c_int = 0;
        // SAFETY: valid out pointer.
        let rr = unsafe { libc::waitpid(pid, &mut st, 0) };
        if rr == pid {
            let code = if libc::WIFEXITED(st) {
                libc::WEXITSTATUS(st)
            } else {
                128 + libc::WTERMSIG(st)
            };
            std::process::exit(code);
        }
        if errno().raw_os_error() != Some(libc::EINTR) {
            std::process::exit(125);
        }
        if term_requested() && !forwarded {
            forwarded = true;
            // SAFETY: kill of our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
}

/// `tree SPEC`.
fn mode_tree(text: &str) -> ! {
    let spec = parse_tree_spec(text).unwrap_or_else(|e| {
        eprintln!("pdump-victim: {e}");
        std::process::exit(2)
    });
    tree_fix_stdio();
    // Zombies must stay: SIGCHLD must not be ignored (that is inherited
    // across exec and would make the kernel reap them).
    // SAFETY: resetting a disposition to its default.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
    let common = common_init(0);
    if spec.nodes[0].flags.ns {
        tree_launch(&spec, &common)
    }
    tree_member_main(TreeMember::new(&spec, 0, &common, TreeOwn::NONE), getpid())
}

/// `tree-preset NAME`.
fn mode_tree_preset(name: Option<&String>) -> ! {
    let spec = name.and_then(|n| tree_preset(n)).unwrap_or_else(|| {
        eprintln!(
            "pdump-victim: tree-preset needs one of: {}",
            TREE_PRESETS.join(" ")
        );
        std::process::exit(2)
    });
    mode_tree(&spec)
}

// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// protnone
// ---------------------------------------------------------------------------

/// `protnone`: 8 pages of `pattern_word(7, i, j)`, of which pages 2..6 are
/// then made PROT_NONE (present but unreadable: a dumper cannot vmsplice
/// them). Prints `READY <pid> <base_hex>`; on SIGTERM makes them readable
/// again and checks every word: `OK pages=8`.
fn mode_protnone() -> Result<String, String> {
    let common = common_init(0);
    const PAGES: usize = 8;
    // SAFETY: a fresh private anonymous mapping we own.
    let base = unsafe {
        libc::mmap(
            null_mut(),
            PAGES * 4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err("mmap failed".into());
    }
    let words = base as *mut u64;
    for i in 0..PAGES {
        for j in 0..512 {
            // SAFETY: inside the mapping just created.
            unsafe { write_volatile(words.add(i * 512 + j), pattern_word(7, i as u64, j as u64)) };
        }
    }
    // SAFETY: pages 2..6 of our own mapping.
    if unsafe {
        libc::mprotect(
            (base as usize + 2 * 4096) as *mut c_void,
            4 * 4096,
            libc::PROT_NONE,
        )
    } != 0
    {
        return Err("mprotect failed".into());
    }
    emit(&format!("READY {} {:#x}", getpid(), base as usize));
    wait_for_term();
    // SAFETY: as above.
    unsafe { libc::mprotect(base, PAGES * 4096, libc::PROT_READ | libc::PROT_WRITE) };
    for i in 0..PAGES {
        for j in 0..512 {
            // SAFETY: inside the (now readable) mapping.
            let w = unsafe { read_volatile(words.add(i * 512 + j)) };
            if w != pattern_word(7, i as u64, j as u64) {
                return Err(format!("page {i} word {j} changed"));
            }
        }
    }
    common.verify()?;
    Ok(format!("OK pages={PAGES}"))
}

// ---------------------------------------------------------------------------
// clonevm
// ---------------------------------------------------------------------------

/// Counter bumped by the CLONE_VM child, read by the parent (same memory).
static CLONEVM_COUNTER: AtomicU64 = AtomicU64::new(0);

extern "C" fn clonevm_child(_arg: *mut libc::c_void) -> c_int {
    loop {
        CLONEVM_COUNTER.fetch_add(1, Ordering::SeqCst);
        // SAFETY: a plain 1 ms sleep with a local timespec.
        unsafe {
            let ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 1_000_000,
            };
            libc::nanosleep(&ts, null_mut());
        }
    }
}

/// `clonevm`: a child created with CLONE_VM but not CLONE_THREAD (its own
/// process sharing this address space: an "mm" leak when only one of the
/// two is dumped). Prints `READY <pid> <child pid>`; on SIGTERM the parent
/// checks the child kept counting, kills it and prints `OK count=<n>`.
fn mode_clonevm() -> Result<String, String> {
    let common = common_init(0);
    const STACK: usize = 256 * 1024;
    let stack = vec![0u8; STACK];
    // SAFETY: the child runs `clonevm_child` on `stack`, which lives until the
    // child is killed and reaped below; CLONE_VM shares only memory.
    let child = unsafe {
        let top = (stack.as_ptr() as usize + STACK) & !15;
        libc::clone(
            clonevm_child,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::SIGCHLD,
            null_mut(),
        )
    };
    if child < 0 {
        return Err(format!(
            "clone(CLONE_VM) failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    emit(&format!("READY {} {}", getpid(), child));
    wait_for_term();
    let a = CLONEVM_COUNTER.load(Ordering::SeqCst);
    nap(50);
    let b = CLONEVM_COUNTER.load(Ordering::SeqCst);
    // SAFETY: kill and reap our own child.
    unsafe {
        libc::kill(child, libc::SIGKILL);
        libc::waitpid(child, null_mut(), 0);
    }
    drop(stack);
    common.verify()?;
    if b <= a {
        return Err(format!("the CLONE_VM child stopped counting ({a} -> {b})"));
    }
    Ok(format!("OK count={b}"))
}

// ---------------------------------------------------------------------------
// core
// ---------------------------------------------------------------------------

/// `core`: a global written at run time (checked in ELF cores by gdb).
#[no_mangle]
pub static PDUMP_CORE_GLOBAL: AtomicU64 = AtomicU64::new(0);
/// `core`: the address of the heap block.
#[no_mangle]
pub static PDUMP_CORE_HEAP: AtomicU64 = AtomicU64::new(0);

const CORE_HEAP_WORDS: usize = 64;

fn core_global_value(pid: i32) -> u64 {
    splitmix64(0xC0DE_0000_0000 ^ pid as u64)
}

fn core_heap_word(pid: i32, j: usize) -> u64 {
    splitmix64(0xC0DE_1000_0000 ^ ((pid as u64) << 8) ^ j as u64)
}

/// Block in FUTEX_WAIT until `word` is non-zero.
#[inline(never)]
fn core_block(word: &AtomicU32) {
    while word.load(Ordering::SeqCst) == 0 {
        // SAFETY: a futex wait on a live atomic word.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                0u32,
                null::<libc::timespec>(),
            )
        };
    }
}

/// A frame of its own with a local pattern, checked after `core_block`
/// returns (so the call is not a tail call and the frame stays).
macro_rules! core_stack_fn {
    ($name:ident, $salt:expr) => {
        #[inline(never)]
        fn $name(idx: usize, word: &AtomicU32) -> Result<(), String> {
            let mut buf = [0u64; 64];
            for (j, w) in buf.iter_mut().enumerate() {
                // SAFETY: a valid element of a local array.
                unsafe { write_volatile(w, splitmix64($salt ^ ((idx as u64) << 8) ^ j as u64)) };
            }
            core_block(std::hint::black_box(word));
            for (j, w) in buf.iter().enumerate() {
                // SAFETY: a valid element of a local array.
                let v = unsafe { read_volatile(w) };
                if v != splitmix64($salt ^ ((idx as u64) << 8) ^ j as u64) {
                    return Err(format!(
                        "core: thread {idx}: {}: stack word {j} is {v:#x}",
                        stringify!($name)
                    ));
                }
            }
            Ok(())
        }
    };
}
core_stack_fn!(core_stack_alpha, 0xA1FA_0000);
core_stack_fn!(core_stack_beta, 0xBE7A_0000);
core_stack_fn!(core_stack_gamma, 0x6A33_0000);

#[inline(never)]
fn core_thread_entry(idx: usize, word: &AtomicU32, mask: u64) -> Result<(), String> {
    let alt = install_altstack();
    let r = match idx % 3 {
        0 => core_stack_alpha(idx, word),
        1 => core_stack_beta(idx, word),
        _ => core_stack_gamma(idx, word),
    };
    r?;
    verify_thread(&format!("core: thread {idx}"), mask, &alt)
}

/// The main thread's wait for SIGTERM, in a frame of its own.
#[inline(never)]
fn core_main_wait() -> u64 {
    let suspend_mask = sigbit(libc::SIGUSR2);
    let mut rounds = 0u64;
    while !term_requested() {
        // SAFETY: valid pointer to an 8-byte kernel sigset.
        unsafe { libc::syscall(libc::SYS_rt_sigsuspend, &suspend_mask as *const u64, 8usize) };
        rounds += 1;
    }
    std::hint::black_box(rounds)
}

fn mode_core(n: usize) -> Result<String, String> {
    let common = common_init(sigbit(libc::SIGTERM));
    let pid = getpid();
    PDUMP_CORE_GLOBAL.store(core_global_value(pid), Ordering::SeqCst);
    let heap: Box<[u64; CORE_HEAP_WORDS]> =
        Box::new(std::array::from_fn(|j| core_heap_word(pid, j)));
    let heap_addr = heap.as_ptr() as u64;
    PDUMP_CORE_HEAP.store(heap_addr, Ordering::SeqCst);
    let release: &'static AtomicU32 = Box::leak(Box::new(AtomicU32::new(0)));
    let mut handles = Vec::new();
    for idx in 0..n {
        let mask = common.mask;
        let h = std::thread::Builder::new()
            .name(format!("core-{idx}"))
            .spawn(move || core_thread_entry(idx, release, mask))
            .map_err(|e| format!("core: spawn: {e}"))?;
        handles.push(h);
    }
    // Every worker is in its futex wait (state S in the wait channel) before READY.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let waiting = std::fs::read_dir("/proc/self/task")
            .map_err(|e| format!("core: /proc/self/task: {e}"))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy() != pid.to_string())
            .filter(|e| {
                std::fs::read_to_string(e.path().join("wchan"))
                    .is_ok_and(|w| w.starts_with("futex"))
            })
            .count();
        if waiting == n {
            break;
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "core: only {waiting} of {n} threads reached their futex wait"
            ));
        }
        nap(5);
    }
    emit(&format!(
        "READY {pid} {n} {:#x} {heap_addr:#x}",
        &PDUMP_CORE_GLOBAL as *const AtomicU64 as u64
    ));
    core_main_wait();
    release.store(1, Ordering::SeqCst);
    // SAFETY: a futex wake on a live atomic word.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            release.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            i32::MAX,
        )
    };
    for (idx, h) in handles.into_iter().enumerate() {
        h.join()
            .map_err(|_| format!("core: thread {idx} panicked"))??;
    }
    let g = PDUMP_CORE_GLOBAL.load(Ordering::SeqCst);
    if g != core_global_value(pid) {
        return Err(format!("core: global is {g:#x}"));
    }
    if PDUMP_CORE_HEAP.load(Ordering::SeqCst) != heap_addr {
        return Err("core: heap pointer changed".into());
    }
    for (j, &w) in heap.iter().enumerate() {
        if w != core_heap_word(pid, j) {
            return Err(format!("core: heap word {j} is {w:#x}"));
        }
    }
    common.verify()?;
    Ok(format!("OK threads={n}"))
}

// ---------------------------------------------------------------------------
// Benchmark workloads: fill / sparse / maps / writer
// ---------------------------------------------------------------------------

/// The longest gap (ns) the watchdog thread saw between two of its ticks.
static MAX_GAP_NS: AtomicU64 = AtomicU64::new(0);

/// Start the watchdog: a thread that ticks every millisecond and records
/// the longest gap between ticks (a process frozen by a dumper sees one as
/// long as the freeze). With `PDUMP_VICTIM_GAPS=1` it prints `GAP <us>` for
/// every gap of 3 ms or more as soon as it wakes up from it. Its mask blocks
/// SIGTERM so the handler always runs on the main thread.
fn start_watchdog(mask: u64) {
    let print = std::env::var("PDUMP_VICTIM_GAPS").as_deref() == Ok("1");
    std::thread::spawn(move || {
        set_mask(mask | sigbit(libc::SIGTERM));
        let mut last = monotonic_ns();
        loop {
            nap(1);
            let now = monotonic_ns();
            let gap = (now - last) as u64;
            last = now;
            MAX_GAP_NS.fetch_max(gap, Ordering::SeqCst);
            if print && gap >= 3_000_000 {
                emit(&format!("GAP {}", gap / 1000));
            }
        }
    });
}

fn max_gap_us() -> u64 {
    MAX_GAP_NS.load(Ordering::SeqCst) / 1000
}

/// A private anonymous read-write mapping of `bytes` (no transparent huge
/// pages, so every page is its own 4 KiB page).
fn bench_map(bytes: usize, noreserve: bool) -> Result<usize, String> {
    bench_map_with(bytes, noreserve, false)
}

/// [`bench_map`], `MAP_SHARED` with `shared`.
fn bench_map_with(bytes: usize, noreserve: bool, shared: bool) -> Result<usize, String> {
    let extra = if noreserve { libc::MAP_NORESERVE } else { 0 };
    let kind = if shared {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    };
    // SAFETY: fresh anonymous mapping, only used through raw pointers.
    unsafe {
        let p = libc::mmap(
            null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            kind | libc::MAP_ANONYMOUS | extra,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(format!("mmap of {bytes} bytes: {}", errno()));
        }
        if libc::madvise(p, bytes, libc::MADV_NOHUGEPAGE) != 0 {
            return Err(format!("madvise(NOHUGEPAGE): {}", errno()));
        }
        Ok(p as usize)
    }
}

/// Fill page `i` at `addr` with the pattern of `seed`.
fn fill_page(addr: usize, seed: u64, i: u64) {
    let p = addr as *mut u64;
    for j in 0..(PAGE / 8) {
        // SAFETY: `addr` is a writable page of one of our mappings.
        unsafe { write_volatile(p.add(j), pattern_word(seed, i, j as u64)) };
    }
}

/// Whether page `i` at `addr` holds the pattern of `seed`.
fn page_has_pattern(addr: usize, seed: u64, i: u64) -> bool {
    let p = addr as *const u64;
    // SAFETY: `addr` is a readable, present page of one of our mappings.
    (0..PAGE / 8).all(|j| unsafe { read_volatile(p.add(j)) } == pattern_word(seed, i, j as u64))
}

fn page_is_zero(addr: usize) -> bool {
    let p = addr as *const u64;
    // SAFETY: as above.
    (0..PAGE / 8).all(|j| unsafe { read_volatile(p.add(j)) } == 0)
}

/// Present pages of `[addr, addr + bytes)` (mincore).
fn present_pages(addr: usize, bytes: usize) -> Result<usize, String> {
    let mut total = 0usize;
    let step = 1usize << 30;
    let mut vec = vec![0u8; step / PAGE];
    let mut off = 0;
    while off < bytes {
        let n = (bytes - off).min(step);
        // SAFETY: a range of our mapping; `vec` has a byte per page of it.
        if unsafe { libc::mincore((addr + off) as *mut c_void, n, vec.as_mut_ptr()) } != 0 {
            return Err(format!("mincore: {}", errno()));
        }
        total += vec[..n / PAGE].iter().filter(|&&v| v & 1 != 0).count();
        off += n;
    }
    Ok(total)
}

/// Whether page `i` of `fill ... half` is a zero page: pages come in groups
/// of 16 (64 KiB), each group zero or data by `splitmix64(seed ^ !(i / 16))`.
pub fn fill_page_is_zero(seed: u64, i: u64) -> bool {
    splitmix64(seed ^ !(i / 16)) & 1 == 0
}

/// `fill MIB [none|half] [SEED] [private|shared]`: MIB MiB of incompressible
/// memory (private or shared anonymous), every page present; with `half`,
/// about half the pages (in 64 KiB groups, see [`fill_page_is_zero`]) are
/// written with zeros instead.
fn mode_fill(mib: usize, zeros: &str, seed: u64, sharing: &str) -> Result<String, String> {
    let half = match zeros {
        "none" => false,
        "half" => true,
        _ => return Err(format!("fill: zeros must be none or half, not {zeros:?}")),
    };
    let shared = match sharing {
        "private" => false,
        "shared" => true,
        _ => return Err(format!("fill: must be private or shared, not {sharing:?}")),
    };
    let common = common_init(0);
    let bytes = mib << 20;
    let pages = bytes / PAGE;
    let base = bench_map_with(bytes, false, shared)?;
    let mut zero = 0u64;
    for i in 0..pages as u64 {
        let a = base + i as usize * PAGE;
        if half && fill_page_is_zero(seed, i) {
            // SAFETY: inside our mapping: makes the page present, all zero.
            unsafe { write_volatile(a as *mut u64, 0) };
            zero += 1;
        } else {
            fill_page(a, seed, i);
        }
    }
    start_watchdog(common.mask);
    emit(&format!("READY {} {base:#x} {pages} {zero}", getpid()));
    wait_for_term();
    common.verify()?;
    // Zero pages need not be present: a restorer may leave them unmapped
    // (they read as zero either way); every data page must be, and the
    // content check below reads each of them.
    let present = present_pages(base, bytes)?;
    if present < pages - zero as usize || present > pages {
        return Err(format!(
            "fill: {present} of {pages} pages present, {zero} zero"
        ));
    }
    for i in 0..pages as u64 {
        let a = base + i as usize * PAGE;
        let ok = if half && fill_page_is_zero(seed, i) {
            page_is_zero(a)
        } else {
            page_has_pattern(a, seed, i)
        };
        if !ok {
            return Err(format!("fill: page {i} at {a:#x} changed"));
        }
    }
    Ok(format!(
        "OK pages={pages} zero={zero} maxgap_us={}",
        max_gap_us()
    ))
}

/// Page touched in slot `k` of `sparse`: one page at a random place in each
/// of `touched` equal slots of the mapping.
pub fn sparse_page(seed: u64, k: u64, slot_pages: u64) -> u64 {
    k * slot_pages + splitmix64(seed ^ k) % slot_pages
}

/// `sparse MAPPED_MIB TOUCHED_MIB [SEED]`: a MAP_NORESERVE mapping of
/// MAPPED_MIB MiB of which TOUCHED_MIB MiB of single pages, scattered (see
/// [`sparse_page`]), hold the pattern.
fn mode_sparse(mapped_mib: usize, touched_mib: usize, seed: u64) -> Result<String, String> {
    let common = common_init(0);
    let bytes = mapped_mib << 20;
    let touched = ((touched_mib << 20) / PAGE) as u64;
    let total = (bytes / PAGE) as u64;
    if touched == 0 || touched > total {
        return Err("sparse: need 0 < TOUCHED <= MAPPED".into());
    }
    let slot = total / touched;
    let base = bench_map(bytes, true)?;
    for k in 0..touched {
        let i = sparse_page(seed, k, slot);
        fill_page(base + i as usize * PAGE, seed, i);
    }
    start_watchdog(common.mask);
    emit(&format!("READY {} {base:#x} {total} {touched}", getpid()));
    wait_for_term();
    common.verify()?;
    let present = present_pages(base, bytes)?;
    if present as u64 != touched {
        return Err(format!(
            "sparse: {present} pages present, {touched} touched"
        ));
    }
    for k in 0..touched {
        let i = sparse_page(seed, k, slot);
        if !page_has_pattern(base + i as usize * PAGE, seed, i) {
            return Err(format!("sparse: page {i} changed"));
        }
    }
    Ok(format!("OK touched={touched} maxgap_us={}", max_gap_us()))
}

/// `maps N [SEED]`: N one-page mappings in a row, each holding the pattern,
/// alternately read-write and read-only so that none merge.
fn mode_maps(n: usize, seed: u64) -> Result<String, String> {
    let common = common_init(0);
    let base = bench_map(n * PAGE, false)?;
    for i in 0..n {
        let a = base + i * PAGE;
        fill_page(a, seed, i as u64);
        if i % 2 == 1 {
            // SAFETY: one page of our mapping.
            if unsafe { libc::mprotect(a as *mut c_void, PAGE, libc::PROT_READ) } != 0 {
                return Err(format!("maps: mprotect: {}", errno()));
            }
        }
    }
    // Mappings overlapping ours (a thread stack mapped right below may
    // merge with the first page, but never adds a mapping inside).
    let count = || -> Result<usize, String> {
        let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| e.to_string())?;
        Ok(maps
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(|r| r.split_once('-'))
            .filter_map(|(a, b)| {
                Some((
                    usize::from_str_radix(a, 16).ok()?,
                    usize::from_str_radix(b, 16).ok()?,
                ))
            })
            .filter(|&(a, b)| a < base + n * PAGE && b > base)
            .count())
    };
    start_watchdog(common.mask);
    let before = count()?;
    if before != n {
        return Err(format!("maps: {before} mappings, expected {n}"));
    }
    emit(&format!("READY {} {base:#x} {n}", getpid()));
    wait_for_term();
    common.verify()?;
    let after = count()?;
    if after != n {
        return Err(format!(
            "maps: {after} mappings after the dump, expected {n}"
        ));
    }
    for i in 0..n {
        let a = base + i * PAGE;
        if !page_has_pattern(a, seed, i as u64) {
            return Err(format!("maps: page {i} changed"));
        }
        let want = if i % 2 == 1 { "r--p" } else { "rw-p" };
        if i % 4096 == 0 || i + 1 == n {
            let got = maps_perms(a);
            if got.as_deref() != Some(want) {
                return Err(format!(
                    "maps: page {i} has permissions {got:?}, expected {want}"
                ));
            }
        }
    }
    Ok(format!("OK maps={n} maxgap_us={}", max_gap_us()))
}

/// Word `j` of page `i` after pass `g` of `writer`.
fn writer_word(g: u64, i: u64, j: u64) -> u64 {
    (g << 40) ^ (i << 9) ^ j
}

/// `writer MIB`: the main thread rewrites MIB MiB at full speed, pass after
/// pass; before rewriting a page it checks the page's first and last words
/// from the previous pass. On SIGTERM it finishes the pass and checks the
/// whole buffer.
fn mode_writer(mib: usize) -> Result<String, String> {
    let common = common_init(0);
    let bytes = mib << 20;
    let pages = (bytes / PAGE) as u64;
    let base = bench_map(bytes, false)?;
    let word = |i: u64, j: u64| (base + i as usize * PAGE + j as usize * 8) as *mut u64;
    let write_page = |g: u64, i: u64| {
        for j in 0..(PAGE / 8) as u64 {
            // SAFETY: inside our mapping.
            unsafe { write_volatile(word(i, j), writer_word(g, i, j)) };
        }
    };
    for i in 0..pages {
        write_page(0, i);
    }
    start_watchdog(common.mask);
    emit(&format!("READY {} {base:#x} {pages}", getpid()));
    let mut g = 0u64;
    while !term_requested() {
        g += 1;
        for i in 0..pages {
            let last = (PAGE / 8) as u64 - 1;
            // SAFETY: inside our mapping.
            let (a, b) = unsafe { (read_volatile(word(i, 0)), read_volatile(word(i, last))) };
            if a != writer_word(g - 1, i, 0) || b != writer_word(g - 1, i, last) {
                return Err(format!("writer: page {i} changed under pass {g}"));
            }
            write_page(g, i);
        }
    }
    common.verify()?;
    for i in 0..pages {
        for j in 0..(PAGE / 8) as u64 {
            // SAFETY: inside our mapping.
            if unsafe { read_volatile(word(i, j)) } != writer_word(g, i, j) {
                return Err(format!("writer: page {i} word {j} wrong after pass {g}"));
            }
        }
    }
    Ok(format!("OK passes={g} maxgap_us={}", max_gap_us()))
}

fn usage() -> ! {
    eprintln!(
        "usage: pdump-victim MODE [ARGS]\n\
         modes: loop | stopme | zmm | threads [N] | sleep [MS] | read | pattern [PAGES] [SEED] | fds | bigfiles [MIB] | timers\n       \
         | tree SPEC | tree-preset NAME | clonevm | protnone | core [N] | cow [PAGES] [watchdog,slow,private]\n       \
         | fill [MIB] [none|half] [SEED] [private|shared] | sparse [MAPPED_MIB] [TOUCHED_MIB] [SEED] | maps [N] [SEED] | writer [MIB]"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(mode) = args.get(1) else { usage() };
    let res = match mode.as_str() {
        "loop" => mode_loop(false),
        "stopme" => mode_loop(true),
        "zmm" => mode_zmm(),
        "threads" => mode_threads(parse_num(args.get(2), 8, "N") as usize),
        "sleep" => mode_sleep(parse_num(args.get(2), 2000, "MS")),
        "read" => mode_read(),
        "pattern" => mode_pattern(
            parse_num(args.get(2), 256, "PAGES") as usize,
            parse_num(args.get(3), 1, "SEED"),
        ),
        "fds" => mode_fds(),
        "bigfiles" => mode_bigfiles(parse_num(args.get(2), 256, "MIB").max(1)),
        "timers" => mode_timers(),
        "tree" => mode_tree(&args[2..].join(" ")),
        "tree-preset" => mode_tree_preset(args.get(2)),
        "clonevm" => mode_clonevm(),
        "protnone" => mode_protnone(),
        "core" => mode_core(parse_num(args.get(2), 3, "N") as usize),
        "cow" => mode_cow(
            parse_num(args.get(2), 1024, "PAGES") as usize,
            args.get(3).map(String::as_str).unwrap_or(""),
        ),
        "fill" => mode_fill(
            parse_num(args.get(2), 1024, "MIB") as usize,
            args.get(3).map_or("none", String::as_str),
            parse_num(args.get(4), 1, "SEED"),
            args.get(5).map_or("private", String::as_str),
        ),
        "sparse" => mode_sparse(
            parse_num(args.get(2), 65536, "MAPPED_MIB") as usize,
            parse_num(args.get(3), 256, "TOUCHED_MIB") as usize,
            parse_num(args.get(4), 1, "SEED"),
        ),
        "maps" => mode_maps(
            parse_num(args.get(2), 50_000, "N") as usize,
            parse_num(args.get(3), 1, "SEED"),
        ),
        "writer" => mode_writer(parse_num(args.get(2), 256, "MIB") as usize),
        _ => usage(),
    };
    match res {
        Ok(line) => {
            emit(&line);
            std::process::exit(0)
        }
        Err(e) => fail(e),
    }
}

/// `PDUMP_VICTIM_RESTORED_ROOT=1`: the test restores this tree, so the
/// root's parent, session and group (outside the tree) may differ.
fn restored_root() -> bool {
    std::env::var("PDUMP_VICTIM_RESTORED_ROOT").is_ok_and(|v| v == "1")
}
