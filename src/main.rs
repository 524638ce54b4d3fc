//! The `pdump` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pdump::dump::DumpOptions;

mod cli;

/// Checkpoint/restore for Linux process trees.
#[derive(Parser, Debug)]
#[command(name = "pdump", version, about, args_conflicts_with_subcommands = true)]
struct Args {
    /// Short form: dump the tree of PID into ./pdump-PID and leave it running.
    pid: Option<i32>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Dump the process tree rooted at a pid into an image directory.
    Dump {
        /// The process to dump.
        #[arg(short = 't', long = "tree")]
        pid: i32,
        /// The image directory.
        #[arg(short = 'D', long = "images-dir")]
        dir: PathBuf,
        /// Leave the tree running after the dump (default: kill it).
        #[arg(short = 'R', long)]
        leave_running: bool,
        /// Container mode: refuse to dump if anything is shared with tasks
        /// outside the tree (default when the root is a pid-namespace init).
        #[arg(long, conflicts_with = "subtree")]
        container: bool,
        /// Sub-tree mode: dump even if resources are shared with the outside,
        /// and report each of them (default otherwise).
        #[arg(long)]
        subtree: bool,
        /// Dump worker threads (default 0: four per CPU, at least 8; a
        /// worker mostly waits for its tasks to run).
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// With --leave-running: keep the tree frozen while its pages are
        /// written, instead of draining a copy-on-write snapshot (a fork of
        /// each process) after it runs again.
        #[arg(long)]
        no_cow: bool,
        /// With --leave-running: a process with less resident anonymous
        /// and shared memory than this (bytes) is copied while frozen, as
        /// a snapshot would cost more than the copy; 0: every process
        /// through a snapshot.
        #[arg(long, value_name = "BYTES", default_value_t = pdump::pagestream::SMALL_PLAN_BYTES)]
        cow_min_size: u64,
    },
    /// Restore a dumped tree with the same pids; prints the root's pid.
    Restore {
        /// The image directory.
        #[arg(short = 'D', long = "images-dir")]
        dir: PathBuf,
        /// Write the root's pid into this file.
        #[arg(long)]
        pidfile: Option<PathBuf>,
        /// Attach to the current terminal: keep this session and process
        /// group, and give the root this process's stdin/stdout/stderr where
        /// its own led outside the tree.
        #[arg(long)]
        shell_job: bool,
        /// Wait for the root to exit and exit with its status.
        #[arg(long)]
        wait: bool,
        /// Map an external object to an fd of pdump, CRIU style: `FD:pipe:[INODE]`.
        #[arg(long = "inherit-fd", value_name = "FD:KEY")]
        inherit_fd: Vec<String>,
        /// Restore even if a regular file's size changed since the dump.
        #[arg(long)]
        allow_file_size_change: bool,
        /// Skip checking every page's checksum before creating anything.
        #[arg(long)]
        no_verify: bool,
    },
    /// Write an ELF core file (for gdb/lldb) of a live process, left
    /// running, or of a process of a checkpoint directory.
    Core {
        /// A pid (live process) or a checkpoint directory.
        target: String,
        /// Output file (default: ./core.PID, like gcore).
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
        /// coredump_filter bits (hex) instead of the process's own.
        #[arg(long, value_parser = parse_hex)]
        filter: Option<u32>,
        /// With a directory: which process of the checkpoint (default: its root).
        #[arg(long)]
        pid: Option<i32>,
    },
    /// Show what an image directory holds.
    Show {
        /// The image directory.
        dir: PathBuf,
        /// Machine-readable JSON with every field.
        #[arg(long)]
        json: bool,
        /// With --json: list every dumped page with its CRC32C.
        #[arg(long)]
        pages: bool,
    },
    /// Which kernel features pdump uses, and whether this kernel has them.
    Check {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Spawn a sample workload, dump it and show that it continued.
    Demo {
        /// Where to put the images (default: a fresh directory under the system temp dir).
        #[arg(short = 'D', long = "images-dir")]
        dir: Option<PathBuf>,
    },
    /// The demo's workload (internal).
    #[command(hide = true)]
    DemoWorkload,
}

fn parse_hex(s: &str) -> Result<u32, String> {
    let digits = s.trim_start_matches("0x").trim_start_matches("0X");
    u32::from_str_radix(digits, 16).map_err(|e| format!("{s:?} is not a hex number: {e}"))
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    let result = match (args.pid, args.cmd) {
        (Some(pid), None) => cli::dump(
            pid,
            PathBuf::from(format!("pdump-{pid}")),
            DumpOptions::default(),
        ),
        (
            None,
            Some(Cmd::Dump {
                pid,
                dir,
                leave_running,
                container,
                subtree,
                workers,
                no_cow,
                cow_min_size,
            }),
        ) => {
            let container = match (container, subtree) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            };
            let opts = DumpOptions {
                leave_running,
                container,
                workers,
                cow: !no_cow,
                cow_min_bytes: cow_min_size,
                ..DumpOptions::default()
            };
            cli::dump(pid, dir, opts)
        }
        (
            None,
            Some(Cmd::Restore {
                dir,
                pidfile,
                shell_job,
                wait,
                inherit_fd,
                allow_file_size_change,
                no_verify,
            }),
        ) => cli::restore(cli::RestoreArgs {
            dir,
            pidfile,
            shell_job,
            wait,
            inherit_fd,
            allow_size_change: allow_file_size_change,
            no_verify,
        }),
        (
            None,
            Some(Cmd::Core {
                target,
                output,
                filter,
                pid,
            }),
        ) => cli::core(&target, output, filter, pid),
        (None, Some(Cmd::Show { dir, json, pages })) => cli::show(&dir, json, pages),
        (None, Some(Cmd::Check { json })) => cli::check(json),
        (None, Some(Cmd::Demo { dir })) => cli::demo(dir),
        (None, Some(Cmd::DemoWorkload)) => cli::demo_workload(),
        _ => {
            use clap::CommandFactory;
            let _ = Args::command().print_help();
            return ExitCode::from(2);
        }
    };
    if std::env::var_os("PDUMP_FAULT_REPORT").is_some() {
        eprintln!("fault points: {}", pdump::fault::count());
    }
    if std::env::var_os("PDUMP_REPORT_HWM").is_some() {
        // The peak RSS of this program's own address space (getrusage's
        // ru_maxrss also counts the parent's, when it spawned us with vfork).
        let hwm = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .map(|v| v.trim().to_string())
            })
            .unwrap_or_default();
        eprintln!("peak RSS (VmHWM): {hwm}");
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            cli::print_error(e.as_ref());
            ExitCode::FAILURE
        }
    }
}
