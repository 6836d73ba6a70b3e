//! Remote applies in phases (decision 0017), end to end with real processes: content is
//! staged with no lock held, so a slow or stalled server never stops a writer in the mount;
//! a big file never sits whole in the daemon's memory; a file larger than the free disk space
//! waits with a status line instead of failing the daemon.
//!
//! Device `b` talks to the server through a proxy of the test ([`common::proxy`]) that paces
//! and holds what the server sends: the assertions are about what happens while a transfer
//! is held, never about how long something took. On a failure every test prints the logs of
//! the server and of both mounts.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::status_json;
use common::proxy::Proxy;
use common::server::TestServer;
use common::{run, Mounted};

/// How long a change may take to arrive (shared, slow machines).
const LIMIT: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

/// Deterministic, incompressible-enough bytes: `len` of them for `seed`, by 1 MiB pieces.
fn pattern(seed: u64, piece: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ piece.wrapping_add(1);
    (0..MIB as usize / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

/// Writes `mib` MiB of [`pattern`] to `p`; returns the content's BLAKE3 hash.
fn write_big(p: &Path, seed: u64, mib: u64) -> blake3::Hash {
    let mut f = fs::File::create(p).unwrap();
    let mut h = blake3::Hasher::new();
    for i in 0..mib {
        let b = pattern(seed, i);
        f.write_all(&b).unwrap();
        h.update(&b);
    }
    f.sync_all().unwrap();
    h.finalize()
}

fn hash_of(p: &Path) -> Option<blake3::Hash> {
    let mut f = fs::File::open(p).ok()?;
    let mut h = blake3::Hasher::new();
    std::io::copy(&mut f, &mut h).ok()?;
    Some(h.finalize())
}

/// The peak resident memory (`VmHWM`) of process `pid`, in bytes.
fn peak_rss(pid: i32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only probes.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// A server, device `a` (writes, talks to the server directly) and device `b` (receives,
/// through `proxy` when there is one).
struct Pair {
    srv: TestServer,
    proxy: Option<Proxy>,
    a: Mounted,
    b: Mounted,
}

impl Pair {
    /// `b_home_setup` runs on b's home path before its login (to mount a small disk there).
    fn new(b_args: &[&str], proxied: bool, b_home_setup: impl FnOnce(&Path)) -> Pair {
        let srv = TestServer::start();
        let mut a = Mounted::unmounted(&["--quiet-ms", "100"]);
        srv.login(&a.home, "ann", "writer");
        a.mount();
        let mut args = vec!["--quiet-ms", "100"];
        args.extend_from_slice(b_args);
        let mut b = Mounted::unmounted(&args);
        b_home_setup(&b.home);
        srv.login(&b.home, "ann", "reader");
        let proxy = proxied.then(|| {
            let p = Proxy::start(&srv.url);
            // The device's login names the server: make it name the proxy instead.
            let dj = b.home.join("device.json");
            let text = fs::read_to_string(&dj).unwrap();
            fs::write(&dj, text.replace(&srv.url, &p.url)).unwrap();
            p
        });
        b.mount();
        Pair { srv, proxy, a, b }
    }

    fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("a proxied pair")
    }

    fn fail(&self, what: &str) -> ! {
        if let Some(p) = &self.proxy {
            p.release();
        }
        self.srv.print_logs();
        self.a.dump_logs();
        self.b.dump_logs();
        panic!("{what}");
    }

    fn wait(&self, what: &str, ok: impl Fn() -> bool) {
        let start = Instant::now();
        while !ok() {
            if start.elapsed() > LIMIT {
                self.fail(&format!("{what}: not within {LIMIT:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn check(&self, cond: bool, what: &str) {
        if !cond {
            self.fail(what);
        }
    }

    /// `n` files of 4 KiB created, written and closed in b's mount, in another thread;
    /// waits for them while `still` holds and fails if they are not done by then.
    fn small_writes_finish_while(&self, tag: &str, n: usize, still: impl Fn() -> bool) {
        let root = self.b.mp.clone();
        let tag_owned = tag.to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for i in 0..n {
                let p = root.join(format!("{tag_owned}-{i}.txt"));
                let mut f = fs::File::create(&p).unwrap();
                f.write_all(&[i as u8; 4096]).unwrap();
                drop(f);
            }
            let _ = tx.send(());
        });
        // Generous: a create+write+close takes milliseconds; a writer stopped behind the
        // transfer never finishes while it is held.
        let give = Duration::from_secs(20);
        let start = Instant::now();
        loop {
            if rx.try_recv().is_ok() {
                break;
            }
            if start.elapsed() > give {
                self.fail(&format!(
                    "{n} small writes in b's mount did not finish within {give:?} while the \
                     transfer was held"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.check(
            still(),
            "the transfer was still held when the small writes finished",
        );
        for i in 0..n {
            let p = self.b.path(&format!("{tag}-{i}.txt"));
            self.check(
                fs::read(&p)
                    .map(|b| b == vec![i as u8; 4096])
                    .unwrap_or(false),
                &format!("{} has what was written", p.display()),
            );
        }
    }
}

/// A pinned folder on an on-demand device keeps its files local: their content is read
/// from the server before the apply (with today's main, under the metadata lock).
fn pinned_pair() -> (Pair, PathBuf) {
    let t = Pair::new(&["--on-demand"], true, |_| {});
    fs::create_dir(t.a.path("big")).unwrap();
    t.wait("the folder arrives", || t.b.path("big").is_dir());
    let out = run(&["pin", t.b.path("big").to_str().unwrap()]);
    t.check(
        out.status.success(),
        &format!("pin: {}", String::from_utf8_lossy(&out.stderr)),
    );
    let target = t.b.path("big/file.bin");
    (t, target)
}

#[test]
fn small_writes_go_on_while_a_big_file_arrives_over_a_slow_link() {
    let (t, target) = pinned_pair();
    let p = t.proxy();
    // A slow link, and every answer held once it has sent 4 MiB: a big transfer is held
    // half-way, while small answers (pulls of light entries, long polls) go through.
    p.pace(16 * MIB);
    p.hold(4 * MIB);
    let want = write_big(&t.a.path("big/file.bin"), 1, 48);
    t.wait("b's transfer of the big file is under way and held", || {
        p.held() > 0
    });
    t.small_writes_finish_while("during", 20, || p.held() > 0);
    p.release();
    t.wait("the big file arrives whole", || {
        hash_of(&target) == Some(want)
    });
    t.check(
        fs::metadata(&target).map(|m| m.len()).unwrap_or(0) == 48 * MIB,
        "its size",
    );
}

#[test]
fn a_stalled_server_stops_no_writer_and_the_apply_completes_once_it_answers() {
    let (t, target) = pinned_pair();
    let p = t.proxy();
    p.hold(MIB);
    let want = write_big(&t.a.path("big/file.bin"), 2, 40);
    t.wait("b's transfer is under way and stalled", || p.held() > 0);
    // From now on a new connection gets no answer at all (accepted, never answered).
    p.hold(0);
    // Longer than the client's read timeout (20 s): the stalled request fails and is tried
    // again on a new connection, which stalls too; writers go on throughout.
    let until = Instant::now() + Duration::from_secs(26);
    let mut round = 0;
    while Instant::now() < until {
        t.small_writes_finish_while(&format!("stall{round}"), 5, || p.held() > 0);
        round += 1;
        std::thread::sleep(Duration::from_secs(2));
    }
    let log = fs::read_to_string(t.b.home.join("mount.log")).unwrap_or_default();
    t.check(
        log.contains("reading change") || log.contains("retrying"),
        "the stalled request failed on its read timeout and was retried",
    );
    t.check(hash_of(&target) != Some(want), "not applied while stalled");
    p.release();
    t.wait("the apply completes once the server answers", || {
        hash_of(&target) == Some(want)
    });
}

#[test]
fn applying_a_big_file_keeps_the_daemon_memory_bounded() {
    let t = Pair::new(&[], false, |_| {});
    let mib = 512;
    let want = write_big(&t.a.path("huge.bin"), 3, mib);
    let target = t.b.path("huge.bin");
    // Every change of it is on the server once a is idle and has pulled its own changes
    // back; b has it once its cursor is there too and the content matches.
    t.wait("b has applied every change of it", || {
        let a_cursor = status_json(&t.a.home)["cursor"]
            .as_u64()
            .unwrap_or(u64::MAX);
        common::cluster::idle(&t.a.home)
            && status_json(&t.b.home)["cursor"].as_u64().unwrap_or(0) >= a_cursor
            && hash_of(&target) == Some(want)
    });
    t.check(hash_of(&target) == Some(want), "its content");
    let pid = t.b.daemon_pid().expect("b's daemon pid");
    let peak = peak_rss(pid);
    eprintln!("b's daemon peak RSS applying {mib} MiB: {} MiB", peak / MIB);
    // Today a pulled page's delta bytes (one 32 MiB write per transaction of a big file)
    // are still held a few times over; the file itself never is (main held it twice).
    t.check(
        peak > 0 && peak < 320 * MIB,
        &format!(
            "b's daemon peaked at {} MiB of memory applying a {mib} MiB file",
            peak / MIB
        ),
    );
}

/// A small tmpfs mounted on a path, unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(p: &Path, size: &str) -> SmallDisk {
        fs::create_dir_all(p).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(p)
            .status()
            .expect("mount tmpfs");
        assert!(st.success(), "mounting a tmpfs needs root");
        SmallDisk(p.to_path_buf())
    }

    fn grow(&self, size: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .expect("remount tmpfs");
        assert!(st.success(), "remount");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_file_larger_than_the_free_space_waits_with_a_status_line() {
    let mut disk = None;
    let t = Pair::new(&[], false, |home| {
        disk = Some(SmallDisk::mount(home, "96m"));
    });
    let disk = disk.unwrap();
    let want = write_big(&t.a.path("too-big.bin"), 4, 80);
    fs::write(t.a.path("after.txt"), b"later change").unwrap();
    let pid = t.b.daemon_pid().expect("b's daemon pid");
    t.wait("b says it waits for space", || {
        status_json(&t.b.home)["waiting"]
            .as_str()
            .is_some_and(|w| w.contains("too-big.bin") && w.contains("does not fit"))
    });
    let out = run(&["status", "--home", t.b.home.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    t.check(
        text.contains("waiting:") && text.contains("too-big.bin"),
        &format!("`status` shows the line:\n{text}"),
    );
    std::thread::sleep(Duration::from_secs(3));
    t.check(alive(pid), "b's daemon stays up");
    t.check(
        !t.b.path("too-big.bin").exists(),
        "nothing of the refused change is applied",
    );
    // Room made: it is received at a later try.
    disk.grow("512m");
    let target = t.b.path("too-big.bin");
    t.wait("the file arrives once it fits", || {
        hash_of(&target) == Some(want) && t.b.path("after.txt").exists()
    });
    t.wait("the waiting line is gone", || {
        status_json(&t.b.home)["waiting"].is_null()
    });
    t.check(alive(pid), "the same daemon received it");
}
