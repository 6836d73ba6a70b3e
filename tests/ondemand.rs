//! Files on demand, end to end: a real server, a device that writes (a normal mount) and a
//! device mounted with `--on-demand` (the whole tree, content fetched by range when read),
//! each a real `deltadrive` process with its own home.
//!
//! On a failure every test prints the logs of the server and of both mounts.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::server::TestServer;
use common::{run, Mounted};

/// How long a change may take to arrive (shared, slow machines; speed is the benchmark
/// harness's business).
const LIMIT: Duration = Duration::from_secs(90);
const MIB: u64 = 1 << 20;

struct Pair {
    srv: TestServer,
    /// The device that writes (a normal mount).
    a: Mounted,
    /// The on-demand device.
    b: Mounted,
}

impl Pair {
    /// A server and device `a`, mounted; `b` is logged in but not mounted yet.
    fn new(b_args: &[&str]) -> Pair {
        let srv = TestServer::start();
        let mut a = Mounted::unmounted(&["--quiet-ms", "100"]);
        srv.login(&a.home, "ann", "writer");
        a.mount();
        let mut args = vec!["--quiet-ms", "100", "--on-demand"];
        args.extend_from_slice(b_args);
        let b = Mounted::unmounted(&args);
        srv.login(&b.home, "ann", "reader");
        Pair { srv, a, b }
    }

    fn fail(&self, what: &str) -> ! {
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

    /// Waits until device `m` has sent everything it has.
    fn uploaded(&self, m: &Mounted) {
        self.wait("uploaded", || {
            let s = status(&m.home);
            s["pending_uploads"]["count"] == 0 && s["unsealed_changes"] == 0
        });
    }
}

fn status(home: &Path) -> serde_json::Value {
    let out = run(&["status", "--json", "--home", home.to_str().unwrap()]);
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn sync_status(p: &Path) -> String {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new("user.deltadrive.status").unwrap();
    let mut buf = vec![0u8; 64];
    // SAFETY: valid strings and buffer.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return format!("error {}", std::io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Deterministic content: every 4 KiB block starts with its own offset, the rest zeros
/// (compressible, so a 1 GiB file is cheap to upload, yet every block is distinct).
fn block(offset: u64) -> [u8; 4096] {
    let mut b = [0u8; 4096];
    b[..8].copy_from_slice(&offset.to_le_bytes());
    b[8..16].copy_from_slice(&(!offset).to_le_bytes());
    b
}

fn write_patterned(path: &Path, size: u64) {
    let mut f = File::create(path).unwrap();
    let mut buf = Vec::with_capacity(MIB as usize);
    let mut off = 0;
    while off < size {
        buf.clear();
        while (buf.len() as u64) < MIB && off + (buf.len() as u64) < size {
            buf.extend_from_slice(&block(off + buf.len() as u64));
        }
        let n = (buf.len() as u64).min(size - off) as usize;
        f.write_all(&buf[..n]).unwrap();
        off += n as u64;
    }
    f.sync_all().unwrap();
}

fn fetched(home: &Path) -> u64 {
    status(home)["fetched_bytes"].as_u64().unwrap_or(0)
}

fn file_hash(p: &Path) -> std::io::Result<String> {
    Ok(blake3::hash(&fs::read(p)?).to_hex().to_string())
}

#[test]
fn a_new_device_lists_a_1_gib_file_at_once_and_a_far_read_fetches_little() {
    let mut t = Pair::new(&[]);
    write_patterned(&t.a.path("big.bin"), 1 << 30);
    t.uploaded(&t.a);

    // The writer sealed the file as several transactions: the reader has the final version
    // once it has applied as far as the writer's cursor.
    let head = status(&t.a.home)["cursor"].as_u64().unwrap_or(0);
    let started = Instant::now();
    t.b.mount();
    let big = t.b.path("big.bin");
    t.wait("the 1 GiB file listed on the on-demand device", || {
        fs::metadata(&big).is_ok_and(|m| m.len() == 1 << 30)
            && status(&t.b.home)["cursor"].as_u64().unwrap_or(0) >= head
    });
    eprintln!("listed after {:?}", started.elapsed());
    let md = fs::metadata(&big).unwrap();
    t.check(
        md.blocks() * 512 < MIB,
        &format!("an online-only file uses no disk ({} blocks)", md.blocks()),
    );
    t.check(
        sync_status(&big) == "online-only",
        &format!("status {}", sync_status(&big)),
    );
    let s = status(&t.b.home);
    t.check(
        s["content"]["online_only_files"] == 1 && s["content"]["online_only_bytes"] == (1u64 << 30),
        &format!("status counts online-only content: {s}"),
    );

    // A 4 KiB read at 900 MiB: the right bytes, and only a few MiB fetched.
    let before = fetched(&t.b.home);
    let f = File::open(&big).unwrap();
    let mut buf = [0u8; 4096];
    let off = 900 * MIB;
    f.read_exact_at(&mut buf, off).unwrap();
    t.check(
        buf == block(off),
        "the bytes read at 900 MiB are the file's",
    );
    drop(f);
    t.wait("the fetch counted", || fetched(&t.b.home) > before);
    let got = fetched(&t.b.home) - before;
    eprintln!("a 4 KiB read at 900 MiB fetched {got} bytes");
    t.check(
        got <= 8 * MIB,
        &format!("a 4 KiB read fetched {got} bytes (at most a few MiB expected)"),
    );
    t.check(
        sync_status(&big) == "online-only",
        "still online-only: most of it is not here",
    );
}

#[test]
fn an_edit_of_an_online_only_file_syncs_as_a_small_delta() {
    let mut t = Pair::new(&[]);
    write_patterned(&t.a.path("doc.bin"), 48 * MIB);
    t.uploaded(&t.a);
    t.b.mount();
    let doc = t.b.path("doc.bin");
    t.wait("listed", || {
        fs::metadata(&doc).is_ok_and(|m| m.len() == 48 * MIB)
    });
    t.check(
        sync_status(&doc) == "online-only",
        "online-only before the edit",
    );

    let bytes_in = |srv: &TestServer| -> u64 {
        let out = std::process::Command::new("curl")
            .args(["-s", &format!("{}/metrics", srv.url)])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with("deltadrive_http_request_bytes_total"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let before = bytes_in(&t.srv);
    {
        let f = OpenOptions::new().write(true).open(&doc).unwrap();
        f.write_all_at(b"EDITED", 20 * MIB + 3).unwrap();
    }
    t.uploaded(&t.b);
    let a_doc = t.a.path("doc.bin");
    t.wait("the edit arrives on the writer", || {
        let mut b = [0u8; 6];
        File::open(&a_doc)
            .and_then(|f| f.read_exact_at(&mut b, 20 * MIB + 3))
            .is_ok()
            && &b == b"EDITED"
    });
    let sent = bytes_in(&t.srv) - before;
    eprintln!("the edit of an online-only 48 MiB file sent {sent} request bytes to the server");
    t.check(
        sent < 256 * 1024,
        &format!("a 6-byte edit uploaded {sent} bytes (a small delta expected)"),
    );
    t.check(
        file_hash(&doc).unwrap() == file_hash(&a_doc).unwrap(),
        "both devices have the same content",
    );
    t.check(
        sync_status(&doc) == "synced",
        &format!("local after the edit: {}", sync_status(&doc)),
    );
}

#[test]
fn pin_unpin_and_eviction_under_a_100_mib_cache() {
    let mut t = Pair::new(&["--cache-size", "100M"]);
    fs::create_dir(t.a.path("set")).unwrap();
    for i in 0..5 {
        write_patterned(&t.a.path(&format!("set/f{i}.bin")), 40 * MIB + i);
    }
    t.uploaded(&t.a);
    t.b.mount();
    let f = |i: u64| t.b.path(&format!("set/f{i}.bin"));
    t.wait("all listed", || {
        (0..5).all(|i| fs::metadata(f(i)).is_ok_and(|m| m.len() == 40 * MIB + i))
    });
    let want: Vec<String> = (0..5)
        .map(|i| file_hash(&t.a.path(&format!("set/f{i}.bin"))).unwrap())
        .collect();

    // Reading whole files makes them local; past 100 MiB the least recently used file
    // goes, unless it is open.
    let read_whole = |i: u64| {
        t.check(
            file_hash(&f(i)).unwrap() == want[i as usize],
            "content read on demand is the file's",
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let held = File::open(f(0)).unwrap();
    read_whole(0);
    read_whole(1);
    read_whole(2);
    t.wait("evicted down to the cache size", || {
        let s = status(&t.b.home);
        s["content"]["local_bytes"].as_u64().unwrap_or(u64::MAX) <= 100 * MIB
    });
    t.check(
        sync_status(&f(0)) == "synced",
        "the least recently used file is open: it stays",
    );
    t.check(
        sync_status(&f(1)) == "online-only",
        "the next least recently used file was evicted",
    );
    t.check(sync_status(&f(2)) == "synced", "the newest stays local");
    drop(held);
    read_whole(3);
    t.wait("evicted down to the cache size again", || {
        sync_status(&f(0)) == "online-only"
    });
    t.check(
        sync_status(&f(2)) == "synced" && sync_status(&f(3)) == "synced",
        "recently used files stay",
    );
    t.check(
        file_hash(&f(0)).unwrap() == want[0] && file_hash(&f(1)).unwrap() == want[1],
        "evicted files read back whole",
    );

    // Pinning the folder fetches everything and keeps it, over the cache size.
    let out = run(&["pin", t.b.path("set").to_str().unwrap()]);
    t.check(
        out.status.success(),
        &format!("pin: {}", String::from_utf8_lossy(&out.stderr)),
    );
    std::thread::sleep(Duration::from_secs(5));
    for i in 0..5 {
        t.check(
            sync_status(&f(i)) == "synced",
            &format!("pinned f{i} is local: {}", sync_status(&f(i))),
        );
    }
    let s = status(&t.b.home);
    t.check(
        s["content"]["local_bytes"].as_u64().unwrap_or(0) > 200 * MIB,
        &format!("pinned content stays over the cache size: {s}"),
    );
    // A new file in a pinned folder arrives with its content.
    write_patterned(&t.a.path("set/new.bin"), 3 * MIB);
    let new = t.b.path("set/new.bin");
    t.wait("a new file in a pinned folder arrives local", || {
        fs::metadata(&new).is_ok() && sync_status(&new) == "synced"
    });

    // Unpinned, it is evicted again down to the cache size.
    let out = run(&["unpin", t.b.path("set").to_str().unwrap()]);
    t.check(out.status.success(), "unpin");
    t.wait("evicted after unpin", || {
        status(&t.b.home)["content"]["local_bytes"]
            .as_u64()
            .unwrap_or(u64::MAX)
            <= 100 * MIB
    });

    // Pin outside a mount: one clear line, nothing changed.
    let plain = tempfile::tempdir().unwrap();
    let out = run(&["pin", plain.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    t.check(
        !out.status.success() && err.contains("not inside a mounted synced folder"),
        &format!("pin outside a mount: {err}"),
    );
}

#[test]
fn offline_an_online_only_file_fails_to_open_at_once_and_local_content_still_works() {
    let mut t = Pair::new(&[]);
    fs::write(t.a.path("remote.txt"), b"only on the server").unwrap();
    fs::write(t.a.path("kept.txt"), b"read before going offline").unwrap();
    t.uploaded(&t.a);
    t.b.mount();
    let remote = t.b.path("remote.txt");
    let kept = t.b.path("kept.txt");
    t.wait("listed", || {
        fs::metadata(&remote).is_ok() && fs::metadata(&kept).is_ok()
    });
    t.check(
        fs::read(&kept).unwrap() == b"read before going offline",
        "read while online",
    );

    t.srv.kill9();
    t.wait("the on-demand device notices it is offline", || {
        fs::read_to_string(t.b.home.join("sync.json"))
            .is_ok_and(|s| s.contains("\"online\": false"))
    });
    let started = Instant::now();
    let r = File::open(&remote);
    let took = started.elapsed();
    eprintln!("offline open of an online-only file failed after {took:?}");
    match r {
        Err(e) => t.check(
            e.raw_os_error() == Some(libc::EIO),
            &format!("EIO expected, got {e}"),
        ),
        Ok(_) => t.fail("an online-only file opened while offline"),
    }
    // Generous bound: the point is that it never waits for the network.
    t.check(took < Duration::from_secs(5), &format!("took {took:?}"));
    let log = fs::read_to_string(t.b.home.join("mount.log")).unwrap_or_default();
    t.check(
        log.contains("remote.txt") && log.contains("online-only"),
        "the log names the file",
    );
    // Local content and writes keep working offline.
    t.check(
        fs::read(&kept).unwrap() == b"read before going offline",
        "local content reads offline",
    );
    fs::write(t.b.path("offline-new.txt"), b"written offline").unwrap();

    t.srv.restart_same_port();
    t.wait("online again: the file opens", || {
        fs::read(&remote).is_ok_and(|c| c == b"only on the server")
    });
    let a_new = t.a.path("offline-new.txt");
    t.wait("the offline write arrives", || {
        fs::read(&a_new).is_ok_and(|c| c == b"written offline")
    });
    let e = File::open(t.b.path("missing.txt")).unwrap_err();
    t.check(e.kind() == ErrorKind::NotFound, "a missing file is ENOENT");
}
