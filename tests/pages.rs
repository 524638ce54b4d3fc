//! Page streaming: zero runs, inline CRC32C, several pipes and drainer
//! threads, in both modes (zero pages and CRCs found by the parasite, or by
//! the dumper with `PDUMP_DUMPER_SCAN=1`), checked page by page, from a
//! frozen task (`--no-cow`) and from a copy-on-write snapshot (`-R`).

use std::process::{Command, Stdio};

use pdump::image::Checkpoint;

use crate::root_or_skip;
use crate::util::{assert_ok, pdump_bin, tempdir, Victim};

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

/// Page `i` of `pdump-victim fill MIB half SEED` (see src/bin/victim.rs).
fn fill_page(seed: u64, i: u64) -> Vec<u8> {
    if splitmix64(seed ^ !(i / 16)) & 1 == 0 {
        return vec![0u8; 4096];
    }
    let mut p = Vec::with_capacity(4096);
    for j in 0..512u64 {
        p.extend_from_slice(&splitmix64(seed ^ (i * 512 + j)).to_le_bytes());
    }
    p
}

/// `pdump dump -R`: from a copy-on-write snapshot with `cow`, else frozen
/// (`--no-cow`).
fn dump_with(pid: i32, dir: &std::path::Path, dumper_scan: bool, cow: bool) {
    let pid = pid.to_string();
    let mut args = vec!["dump", "-t", &pid, "-D", dir.to_str().unwrap(), "-R"];
    if !cow {
        args.push("--no-cow");
    }
    let out = Command::new(pdump_bin())
        .args(&args)
        .env("PDUMP_DUMPER_SCAN", if dumper_scan { "1" } else { "0" })
        .output()
        .unwrap();
    assert_ok(&out, &format!("pdump {args:?}"));
}

fn dump(pid: i32, dir: &std::path::Path, dumper_scan: bool) {
    dump_with(pid, dir, dumper_scan, false)
}

/// How [`half_zero`] dumps.
#[derive(Clone, Copy)]
struct Mode {
    /// `PDUMP_DUMPER_SCAN=1`.
    dumper_scan: bool,
    /// From a copy-on-write snapshot (else frozen).
    cow: bool,
    /// The victim's memory is `MAP_SHARED` (spilled while frozen in a
    /// snapshot dump).
    shared: bool,
}

/// A 40 MiB victim, about half of whose pages are zero: the image holds
/// only the data pages (zero runs have no bytes), every page reads back
/// right through `show --json --pages`, and the run CRCs (computed while
/// streaming) verify. 40 MiB is above the size at which drainer threads and
/// several pipes are used. A snapshot dump leaves the victim running: it
/// checks its own memory, then the image is restored and the restored
/// victim checks it again.
fn half_zero(mode: Mode) {
    let mib = 40u64;
    let seed = 0x5eed;
    let sharing = if mode.shared { "shared" } else { "private" };
    let v = Victim::spawn_stderr(
        "fill",
        &[&mib.to_string(), "half", &seed.to_string(), sharing],
        &[("PDUMP_VICTIM_RESTORED_ROOT", "1")],
        Stdio::null(),
    );
    let base = u64::from_str_radix(v.ready[0].trim_start_matches("0x"), 16).unwrap();
    let pages: u64 = v.ready[1].parse().unwrap();
    let zero: u64 = v.ready[2].parse().unwrap();
    assert!(
        zero > pages / 4 && zero < pages * 3 / 4,
        "{zero} of {pages}"
    );
    let dir = tempdir(&format!(
        "halfzero{}{}{}",
        if mode.dumper_scan { "-dumper" } else { "" },
        if mode.cow { "-cow" } else { "" },
        if mode.shared { "-shared" } else { "" },
    ));
    dump_with(v.pid, &dir, mode.dumper_scan, mode.cow);

    let cp = Checkpoint::open(&dir).unwrap();
    cp.verify_pages().expect("run checksums");
    let p = &cp.processes[0];
    let vma = p
        .vmas
        .iter()
        .find(|m| m.start <= base && base < m.end)
        .expect("the fill mapping");
    // (A thread stack mapped right below may have merged with it.)
    assert_eq!(vma.end, base + pages * 4096);
    // Pages of each kind at or above `base` (a run may start below it).
    let count = |zero: bool| -> u64 {
        vma.pages
            .iter()
            .filter(|r| r.zero == zero)
            .map(|r| {
                let start = r.addr.max(base);
                (r.addr + r.npages * 4096).saturating_sub(start) / 4096
            })
            .sum()
    };
    let (zero_pages, data_pages) = (count(true), count(false));
    assert_eq!(zero_pages, zero, "zero pages recorded as zero runs");
    assert_eq!(data_pages, pages - zero);
    // Nothing stored for zero runs: the page file holds the data pages of
    // every mapping and no more.
    let all_data: u64 = p
        .vmas
        .iter()
        .flat_map(|m| &m.pages)
        .map(|r| r.file_len())
        .sum();
    assert_eq!(p.pages_bytes, all_data);
    assert!(p.pages_bytes < (pages - zero + 512) * 4096);
    let file = std::fs::metadata(dir.join(&p.pages_file)).unwrap().len();
    assert_eq!(file, 4096 + p.pages_bytes);
    // Runs are in address order and their data in file order.
    let mut last_off = 0;
    for r in p.vmas.iter().flat_map(|m| &m.pages) {
        assert!(r.offset >= last_off, "file order");
        last_off = r.offset + r.file_len();
        if r.zero {
            assert_eq!(r.crc32c, 0);
        }
    }

    let out = Command::new(pdump_bin())
        .args(["show", dir.to_str().unwrap(), "--json", "--pages"])
        .output()
        .unwrap();
    assert_ok(&out, "pdump show --json --pages");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vmas = j["processes"][0]["vmas"].as_array().unwrap();
    let jv = vmas
        .iter()
        .find(|m| m["end"].as_u64() == Some(base + pages * 4096))
        .unwrap();
    let list: Vec<_> = jv["page_list"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["addr"].as_u64().unwrap() >= base)
        .collect();
    assert_eq!(list.len() as u64, pages);
    for (i, e) in list.iter().enumerate() {
        let want = fill_page(seed, i as u64);
        assert_eq!(e["addr"].as_u64(), Some(base + i as u64 * 4096));
        assert_eq!(
            e["zero"].as_bool(),
            Some(want.iter().all(|&b| b == 0)),
            "page {i}"
        );
        assert_eq!(
            e["crc32c"].as_u64(),
            Some(crc32c::crc32c(&want) as u64),
            "page {i}"
        );
    }
    let pid = v.pid;
    let last = v.finish();
    assert!(last.contains(&format!("zero={zero}")), "{last}");
    if mode.cow {
        assert!(
            !std::fs::read_dir(&dir).unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('.')),
            "the spill file was left behind"
        );
        // The image is the moment of the dump: the restored victim finds
        // every page as it wrote it.
        let v = Victim::restore(&dir, pid, &[]);
        let last = v.finish();
        assert!(last.contains(&format!("zero={zero}")), "restored: {last}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn half_zero_victim_image_holds_only_data_pages() {
    root_or_skip!();
    half_zero(Mode {
        dumper_scan: false,
        cow: false,
        shared: false,
    });
}

#[test]
fn half_zero_victim_dumper_scan_mode() {
    root_or_skip!();
    half_zero(Mode {
        dumper_scan: true,
        cow: false,
        shared: false,
    });
}

/// The snapshot path streams like the frozen one: zero runs, CRCs, several
/// pipes; the image restores.
#[test]
fn half_zero_victim_cow_image_holds_only_data_pages_and_restores() {
    root_or_skip!();
    half_zero(Mode {
        dumper_scan: false,
        cow: true,
        shared: false,
    });
}

#[test]
fn half_zero_victim_cow_dumper_scan_mode() {
    root_or_skip!();
    half_zero(Mode {
        dumper_scan: true,
        cow: true,
        shared: false,
    });
}

/// Shared memory is spilled while the task is frozen (the snapshot would
/// see the task's later writes): its zero pages become zero runs in the
/// spill and in the image, its data comes back from the spill file.
#[test]
fn half_zero_shared_memory_cow_image_holds_only_data_pages_and_restores() {
    root_or_skip!();
    half_zero(Mode {
        dumper_scan: false,
        cow: true,
        shared: true,
    });
}

/// Many one-page mappings and a sparse mapping: runs split at every mapping
/// boundary, one PAGEMAP_SCAN walk over the span, every page back as it was.
#[test]
fn many_mappings_and_sparse_pages_round_trip() {
    root_or_skip!();
    for (mode, args) in [
        ("maps", vec!["3000", "9"]),
        ("sparse", vec!["4096", "8", "9"]),
    ] {
        let v = Victim::spawn(mode, &args);
        let base = u64::from_str_radix(v.ready[0].trim_start_matches("0x"), 16).unwrap();
        for dumper_scan in [false, true] {
            let dir = tempdir(mode);
            dump(v.pid, &dir, dumper_scan);
            let cp = Checkpoint::open(&dir).unwrap();
            cp.verify_pages().expect("run checksums");
            let p = &cp.processes[0];
            if mode == "maps" {
                let n: u64 = args[0].parse().unwrap();
                let end = base + n * 4096;
                // A thread stack mapped right below may merge with page 0.
                let ours: Vec<_> = p
                    .vmas
                    .iter()
                    .filter(|m| m.start < end && m.end > base)
                    .collect();
                assert_eq!(ours.len() as u64, n, "one VMA per mapping");
                let mut pages: Vec<u64> = ours
                    .iter()
                    .flat_map(|m| &m.pages)
                    .flat_map(|r| (0..r.npages).map(move |k| r.addr + k * 4096))
                    .filter(|&a| a >= base && a < end)
                    .collect();
                pages.sort_unstable();
                let want: Vec<u64> = (0..n).map(|i| base + i * 4096).collect();
                assert_eq!(pages, want);
            } else {
                let touched: u64 = v.ready[2].parse().unwrap();
                let m = p.vmas.iter().find(|m| m.start == base).unwrap();
                let dumped: u64 = m.pages.iter().map(|r| r.npages).sum();
                assert_eq!(dumped, touched);
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }
        v.finish();
    }
}
