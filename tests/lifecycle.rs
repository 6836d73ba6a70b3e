//! The mount daemon's life cycle (issue 16, item 6): an unmount lets go of the home before a
//! new mount needs it, a stop under load ends within a bound, a second signal or the
//! shutdown deadline ends it anyway without losing what was acknowledged, and a home in use
//! by a live mount is refused at once.
//!
//! The bounds here (30 s) are liveness bounds that tell "stops" from "hangs", not speed
//! figures.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::replay::{created_names, outbox};
use common::{is_mounted, run, Mounted};

/// How long a stopping daemon may take before a test calls it hung.
const STOP_BOUND: Duration = Duration::from_secs(30);

/// Whether `pid` still runs (a zombie has exited: it holds nothing any more).
fn running(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

/// Waits up to `limit` for `pid` to end; how long it took, or `None` if it still runs.
fn wait_exit(pid: i32, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while running(pid) {
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(start.elapsed())
}

/// The names of a thread of `pid` using the CPU now (over 50% in a 500 ms sample).
fn busy_threads(pid: i32) -> Vec<String> {
    let ticks = |pid: i32| -> Vec<(String, u64)> {
        let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|t| {
                let stat = fs::read_to_string(t.path().join("stat")).ok()?;
                let (head, rest) = stat.rsplit_once(')')?;
                let name = head.split_once('(')?.1.to_string();
                let f: Vec<&str> = rest.split_whitespace().collect();
                let cpu = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
                Some((format!("{name}/{}", t.file_name().to_string_lossy()), cpu))
            })
            .collect()
    };
    let before = ticks(pid);
    std::thread::sleep(Duration::from_millis(500));
    let after = ticks(pid);
    // 100 ticks a second: over 25 ticks in 500 ms is over half a core.
    after
        .into_iter()
        .filter(|(n, t)| {
            before
                .iter()
                .find(|(m, _)| m == n)
                .is_some_and(|(_, b)| t - b > 25)
        })
        .map(|(n, _)| n)
        .collect()
}

fn content(i: usize) -> Vec<u8> {
    format!("file {i} ").repeat(100 + i).into_bytes()
}

/// (a) `fusermount3 -u`, then at once a new mount of the same home: ten times in a row.
#[test]
fn a_mount_right_after_fusermount_waits_for_the_previous_daemon() {
    let mut m = Mounted::new();
    for i in 0..10 {
        fs::write(m.path(&format!("f{i}")), content(i)).unwrap();
        let out = Command::new("fusermount3")
            .arg("-u")
            .arg(&m.mp)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "fusermount3 -u: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // No pause: the previous daemon is most likely still sealing and closing its store.
        m.mount();
        for j in 0..=i {
            assert_eq!(
                fs::read(m.path(&format!("f{j}"))).unwrap(),
                content(j),
                "f{j} after remount {i}"
            );
        }
    }
    let log = fs::read_to_string(m.home.join("mount.log")).unwrap();
    let ended = format!("unmounted {}", m.mp.display());
    assert_eq!(log.matches(&ended).count(), 10, "every daemon ended");
}

/// (b) `deltadrive unmount` returns only once the daemon has exited; the next mount works.
#[test]
fn unmount_returns_once_the_daemon_has_exited() {
    let mut m = Mounted::new();
    for i in 0..10 {
        fs::write(m.path(&format!("f{i}")), content(i)).unwrap();
        let pid = m.daemon_pid().expect("pid file");
        let out = run(&["unmount", m.mp.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "unmount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if running(pid) {
            m.dump_logs();
            panic!("unmount {i} returned while its daemon (pid {pid}) still runs");
        }
        assert!(
            !m.home.join("mount.pid").exists(),
            "the pid file outlived the daemon"
        );
        m.mount();
        for j in 0..=i {
            assert_eq!(fs::read(m.path(&format!("f{j}"))).unwrap(), content(j));
        }
    }
}

/// What the load of (c) and (d) left behind.
struct Load {
    stop: Arc<AtomicBool>,
    big: std::thread::JoinHandle<Option<u64>>,
    small: std::thread::JoinHandle<Vec<String>>,
}

const BIG_CHUNK: usize = 256 << 10;
/// The big file's size when the writer gets to finish it (64 MiB).
const BIG_CHUNKS: u64 = 256;

fn big_chunk(n: u64) -> Vec<u8> {
    let mut c = vec![(n % 251) as u8; BIG_CHUNK];
    c[..8].copy_from_slice(&n.to_le_bytes());
    c
}

/// A writer streaming a big file and another creating many small files in `mp`, until
/// they are done, fail (the mount went away) or are told to stop. The big writer returns
/// the size it closed the file at (`None` if writing or closing failed); the small one the
/// names of the files it wrote and closed.
fn start_load(mp: &Path) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    fs::create_dir(mp.join("small")).unwrap();
    let big = {
        let p = mp.join("big.bin");
        std::thread::spawn(move || {
            let mut f = File::create(&p).ok()?;
            let mut n = 0;
            while n < BIG_CHUNKS {
                f.write_all(&big_chunk(n)).ok()?;
                n += 1;
            }
            f.sync_all().ok()?;
            drop(f);
            Some(n * BIG_CHUNK as u64)
        })
    };
    let small = {
        let dir = mp.join("small");
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut done = Vec::new();
            for i in 0..3000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let name = format!("s{i:05}");
                // Once the mount is detached, `small/` is gone from this path: creating
                // fails and the writer stops.
                let ok = File::create(dir.join(&name))
                    .and_then(|mut f| f.write_all(name.as_bytes()))
                    .is_ok();
                if !ok {
                    break;
                }
                done.push(name);
            }
            done
        })
    };
    Load { stop, big, small }
}

impl Load {
    fn finish(self) -> (Option<u64>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        (self.big.join().unwrap(), self.small.join().unwrap())
    }
}

/// Checks that everything the load closed is in `mp`: the small files it wrote, and the big
/// file whole if its writer closed it.
fn check_load(mp: &Path, big: Option<u64>, small: &[String]) {
    for name in small {
        assert_eq!(
            fs::read(mp.join("small").join(name)).unwrap_or_default(),
            name.as_bytes(),
            "small/{name}"
        );
    }
    if let Some(size) = big {
        let got = fs::read(mp.join("big.bin")).unwrap();
        assert_eq!(got.len() as u64, size, "big.bin size");
        for (n, chunk) in got.chunks(BIG_CHUNK).enumerate() {
            assert!(chunk == big_chunk(n as u64), "big.bin chunk {n} differs");
        }
    }
}

/// Waits for the daemon `pid` to stop; fails with its log and any thread still busy.
fn expect_exit(m: &Mounted, pid: i32, what: &str) -> Duration {
    match wait_exit(pid, STOP_BOUND) {
        Some(took) => took,
        None => {
            let busy = busy_threads(pid);
            m.dump_logs();
            panic!("{what}: the daemon (pid {pid}) still runs after {STOP_BOUND:?}; busy threads: {busy:?}");
        }
    }
}

/// (c) Unmount while one writer streams a big file and another creates many small files:
/// the daemon ends within the bound, and after a remount everything closed before is there
/// and syncs to a second device.
#[test]
fn unmount_under_load_stops_in_bounded_time_and_keeps_what_was_closed() {
    let mut c = Cluster::new(2);
    c.converge("empty");
    let mp = c.devices[0].mp.clone();
    let pid = c.devices[0].daemon_pid().unwrap();
    let load = start_load(&mp);
    std::thread::sleep(Duration::from_secs(2));
    let out = run(&["unmount", mp.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "unmount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let took = expect_exit(&c.devices[0], pid, "unmount under load");
    let (big, small) = load.finish();
    eprintln!(
        "daemon ended {took:?} after the unmount returned; {} small files, big file {big:?}",
        small.len()
    );
    assert!(!small.is_empty(), "the small-file writer wrote nothing");
    assert!(!is_mounted(&mp));
    // What the writers left in the bare folder under the mount (nothing, normally) must not
    // be mistaken for synced files.
    clear_folder(&mp);
    c.devices[0].mount();
    check_load(&mp, big, &small);
    c.converge("after the unmount under load");
    check_load(&c.devices[1].mp, big, &small);
}

fn clear_folder(p: &PathBuf) {
    for e in fs::read_dir(p).unwrap().flatten() {
        let _ = fs::remove_dir_all(e.path()).or_else(|_| fs::remove_file(e.path()));
    }
}

/// (d) SIGTERM under the same load: the daemon ends within the bound and nothing closed
/// before is lost.
#[test]
fn sigterm_under_load_stops_in_bounded_time_and_keeps_what_was_closed() {
    let mut m = Mounted::new();
    let pid = m.daemon_pid().unwrap();
    let load = start_load(&m.mp);
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: plain signal to our own daemon.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let took = expect_exit(&m, pid, "SIGTERM under load");
    let (big, small) = load.finish();
    eprintln!(
        "daemon ended {took:?} after SIGTERM; {} small files, big file {big:?}",
        small.len()
    );
    assert!(!small.is_empty(), "the small-file writer wrote nothing");
    let mp = m.mp.clone();
    clear_folder(&mp);
    m.mount();
    check_load(&m.mp, big, &small);
}

/// (e) A home in use by a live mount is refused at once on a second mount point, with a
/// message naming the mount that holds it; the first mount goes on working.
#[test]
fn a_second_mount_of_a_home_in_use_is_refused_at_once() {
    let m = Mounted::new();
    let other = m.dir.path().join("other");
    fs::create_dir(&other).unwrap();
    let start = Instant::now();
    let out = run(&[
        "mount",
        other.to_str().unwrap(),
        "--home",
        m.home.to_str().unwrap(),
    ]);
    let took = start.elapsed();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "a second mount of the home succeeded"
    );
    assert!(!is_mounted(&other));
    let pid = m.daemon_pid().unwrap();
    assert!(
        err.contains(&format!(
            "is in use by the deltadrive mount of {} (pid {pid})",
            m.mp.display()
        )),
        "unclear refusal: {err}"
    );
    // Refused, not made to wait for the holder (which would take the whole 30 s wait).
    assert!(
        took < Duration::from_secs(20),
        "refused only after {took:?}"
    );
    fs::write(m.path("still.txt"), b"works").unwrap();
    assert_eq!(fs::read(m.path("still.txt")).unwrap(), b"works");
}

/// Mounts with a quiet period that keeps every new file unsealed, writes and fsyncs files,
/// keeps one open for writing (so an unmount cannot complete) and stops the daemon with
/// SIGTERM. Returns the mount, the daemon's pid and the open file.
fn stuck_stop() -> (Mounted, i32, File) {
    let m = Mounted::with_args(&["--quiet-ms", "600000"]);
    for i in 0..5 {
        let mut f = File::create(m.path(&format!("unsealed{i}"))).unwrap();
        f.write_all(&content(i)).unwrap();
        f.sync_all().unwrap();
    }
    let mut open = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(m.path("held-open"))
        .unwrap();
    open.write_all(b"acknowledged").unwrap();
    open.sync_all().unwrap();
    let pid = m.daemon_pid().unwrap();
    // SAFETY: plain signal to our own daemon.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    (m, pid, open)
}

/// After a cut-short stop: a new mount seals what the last one left and the data is whole.
fn check_after_cut_short_stop(m: &mut Mounted, log_says: &str) {
    let log = fs::read_to_string(m.home.join("mount.log")).unwrap();
    assert!(log.contains(log_says), "the log does not say {log_says:?}");
    assert!(
        log.contains("change(s) not sealed yet"),
        "the log does not say what was pending"
    );
    assert!(outbox(&m.home).is_empty(), "sealed before the stop");
    let _ = Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(&m.mp)
        .status();
    m.extra_args.clear();
    m.mount();
    for i in 0..5 {
        assert_eq!(
            fs::read(m.path(&format!("unsealed{i}"))).unwrap(),
            content(i)
        );
    }
    assert_eq!(fs::read(m.path("held-open")).unwrap(), b"acknowledged");
    // Sealed at this start (the default quiet period), without any new change.
    let start = Instant::now();
    loop {
        let mut names = created_names(&outbox(&m.home));
        names.sort();
        if names
            == [
                "held-open",
                "unsealed0",
                "unsealed1",
                "unsealed2",
                "unsealed3",
                "unsealed4",
            ]
        {
            break;
        }
        if start.elapsed() > STOP_BOUND {
            m.dump_logs();
            panic!("not sealed after the restart: {names:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A second SIGTERM ends a stop that waits (here for a file still open) at once, saying
/// what was pending; the next start seals it.
#[test]
fn a_second_sigterm_ends_a_waiting_stop_at_once() {
    let (mut m, pid, open) = stuck_stop();
    // The first signal detached the busy mount; the daemon waits for the open file.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(running(pid), "the daemon did not wait for the open file");
    // SAFETY: plain signal to our own daemon.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    expect_exit(&m, pid, "second SIGTERM");
    drop(open);
    check_after_cut_short_stop(&mut m, "received SIGTERM again");
}

/// Without a second signal, the shutdown deadline ends a stop that cannot finish.
#[test]
fn the_shutdown_deadline_ends_a_stop_that_cannot_finish() {
    let (mut m, pid, open) = stuck_stop();
    expect_exit(&m, pid, "shutdown deadline");
    drop(open);
    check_after_cut_short_stop(&mut m, "still stopping after 20 s");
}
