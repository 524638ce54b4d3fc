//! The dumper is SIGKILLed at random points of 200 dump sessions; the victim
//! must always continue correctly (its own checks) and never stay traced.

use std::process::Command;
use std::time::Duration;

use crate::root_or_skip;
use crate::util::{pdump_bin, tempdir, Victim};

fn tracer_of(pid: i32) -> i32 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap()
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn sessions(mode: &str, args: &[&str], n: usize, seed: u64) {
    let v = Victim::spawn(mode, args);
    let base = tempdir(&format!("fault-{mode}"));
    // How long does one whole dump take here? Kill points spread over it.
    let t = std::time::Instant::now();
    let ok = Command::new(pdump_bin())
        .args(["dump", "-t", &v.pid.to_string(), "-D", base.join("probe").to_str().unwrap(), "-R"])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let span = t.elapsed().as_micros() as u64 + 1;
    let mut rng = seed;
    for i in 0..n {
        let dir = base.join(format!("d{i}"));
        let mut child = Command::new(pdump_bin())
            .args(["dump", "-t", &v.pid.to_string(), "-D", dir.to_str().unwrap(), "-R"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let delay = xorshift(&mut rng) % span;
        std::thread::sleep(Duration::from_micros(delay));
        let _ = child.kill();
        let _ = child.wait();
        // The tracer is gone, so the kernel detached it; it must not stay traced or stopped.
        for _ in 0..100 {
            if tracer_of(v.pid) == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(tracer_of(v.pid), 0, "session {i}: victim still traced");
        let _ = std::fs::remove_dir_all(&dir);
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_ne!(v.state(), 't', "victim left in a trace stop");
    let _ = std::fs::remove_dir_all(&base);
    v.finish();
}

#[test]
fn dumper_killed_at_random_points_loop_victim() {
    root_or_skip!();
    sessions("loop", &[], 100, 0x9e37_79b9_7f4a_7c15);
}

#[test]
fn dumper_killed_at_random_points_threads_victim() {
    root_or_skip!();
    sessions("threads", &["4"], 50, 0x1234_5678_9abc_def1);
}

#[test]
fn dumper_killed_at_random_points_zmm_victim() {
    root_or_skip!();
    sessions("zmm", &[], 50, 0x0bad_cafe_f00d_d00d);
}
