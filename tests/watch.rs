//! `deltadrive watch DIR` end to end: a real server process, a watched plain folder (a device
//! of its own home) and a real FUSE mount of the same user. Every change on either side must
//! show up on the other; changes made while the watcher was stopped are found at its start;
//! a watched folder on vfat keeps names it cannot hold under adapted names; a file with
//! several names is hard links in a watched folder, separate copies on vfat.
//!
//! On a failure every test prints the logs of the server, the watcher and the mount.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::mix::{names, ops_per_seed, print_ops, replay_hint, seeds, Mix};
use common::server::TestServer;
use common::{bin, run, wait_gone, Mounted};

/// How long a change may take to travel (shared, slow machines; no timing is asserted).
const LIMIT: Duration = Duration::from_secs(60);

/// A home running `deltadrive watch` on a folder; stops it (SIGTERM, then SIGKILL) on drop.
struct Watched {
    _tmp: tempfile::TempDir,
    home: PathBuf,
    dir: PathBuf,
    running: bool,
}

impl Watched {
    /// A fresh home and an empty folder, not watched yet.
    fn new() -> Watched {
        let tmp = tempfile::Builder::new()
            .prefix("deltadrive-watch")
            .tempdir()
            .unwrap();
        let home = tmp.path().join("home");
        let dir = tmp.path().join("folder");
        fs::create_dir_all(&dir).unwrap();
        Watched {
            _tmp: tmp,
            home,
            dir,
            running: false,
        }
    }

    fn start(&mut self) {
        let out = Command::new(bin())
            .arg("watch")
            .arg(&self.dir)
            .arg("--home")
            .arg(&self.home)
            .args(["--quiet-ms", "100"])
            .env("DELTADRIVE_LOG", "debug,fuser=info")
            .output()
            .unwrap();
        if !out.status.success() {
            self.dump_logs();
            panic!("watch failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        self.running = true;
    }

    fn pid(&self) -> Option<i32> {
        let text = fs::read_to_string(self.home.join("mount.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// SIGTERM, and waits until the daemon is gone.
    fn stop(&mut self) {
        let pid = self.pid().expect("watch pid");
        // SAFETY: plain kill of the daemon this test started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        wait_gone(pid, Duration::from_secs(30));
        self.running = false;
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn dump_logs(&self) {
        let log = self.home.join("watch.log");
        eprintln!("===== watch log {} =====", log.display());
        eprintln!(
            "{}",
            fs::read_to_string(&log).unwrap_or_else(|e| format!("(unreadable: {e})"))
        );
        eprintln!("===== end of watch log =====");
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        if self.running {
            if let Some(pid) = self.pid() {
                // SAFETY: our own daemon.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                let start = Instant::now();
                // SAFETY: signal 0 only probes.
                while unsafe { libc::kill(pid, 0) } == 0
                    && start.elapsed() < Duration::from_secs(15)
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                // SAFETY: our own daemon that did not stop.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir,
    File(String),
    Symlink(PathBuf),
}

/// The tree under `root` (relative paths, content hashes), without `skip`ped names.
fn tree(root: &Path) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let Ok(md) = fs::symlink_metadata(&p) else {
                continue;
            };
            let entry = if md.file_type().is_symlink() {
                Entry::Symlink(fs::read_link(&p).unwrap_or_default())
            } else if md.is_dir() {
                stack.push(p.clone());
                Entry::Dir
            } else {
                let content = fs::read(&p).unwrap_or_default();
                Entry::File(blake3::hash(&content).to_hex().to_string())
            };
            out.insert(rel, entry);
        }
    }
    out
}

fn pending(home: &Path) -> u64 {
    let out = run(&["status", "--home", home.to_str().unwrap(), "--json"]);
    if !out.status.success() {
        return u64::MAX;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let count = v["pending_uploads"]["count"].as_u64().unwrap_or(u64::MAX);
    let unsealed = v["unsealed_changes"].as_u64().unwrap_or(u64::MAX);
    count.saturating_add(unsealed)
}

/// A server, one watched folder and one FUSE mount of the same user.
struct Pair {
    srv: TestServer,
    w: Watched,
    m: Mounted,
}

impl Pair {
    /// Logs the folder's home in and starts watching it; mounts a second device.
    fn new(mut w: Watched) -> Pair {
        let srv = TestServer::start();
        srv.login(&w.home, "ann", "watched");
        w.start();
        let mut m = Mounted::unmounted(&["--quiet-ms", "100"]);
        srv.login(&m.home, "ann", "mounted");
        m.mount();
        Pair { srv, w, m }
    }

    fn fail(&self, what: &str) -> ! {
        self.srv.print_logs();
        self.m.dump_logs();
        self.w.dump_logs();
        panic!("{what}");
    }

    /// Waits until the folder and the mount hold the same tree and nothing is left to
    /// send; returns it.
    fn converge(&self, what: &str) -> BTreeMap<String, Entry> {
        let start = Instant::now();
        loop {
            let a = tree(&self.w.dir);
            let b = tree(&self.m.mp);
            if a == b && pending(&self.w.home) == 0 && pending(&self.m.home) == 0 {
                std::thread::sleep(Duration::from_millis(500));
                if tree(&self.w.dir) == a && tree(&self.m.mp) == b {
                    return a;
                }
                continue;
            }
            if start.elapsed() > LIMIT {
                eprintln!("--- watched folder ---\n{a:#?}\n--- mount ---\n{b:#?}");
                self.fail(&format!("{what}: did not converge within {LIMIT:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait(&self, what: &str, ok: impl Fn() -> bool) {
        let start = Instant::now();
        while !ok() {
            if start.elapsed() > LIMIT {
                self.fail(&format!("{what}: not within {LIMIT:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn watched_folder_and_mount_converge_both_ways() {
    let w = Watched::new();
    // Already in the folder before the first start: found by the first scan.
    fs::create_dir_all(w.p("before/deep")).unwrap();
    fs::write(w.p("before/deep/old.txt"), b"there before the watch").unwrap();
    let p = Pair::new(w);
    let t = p.converge("first scan");
    assert!(t.contains_key("before/deep/old.txt"), "{t:?}");

    // Mount → folder: files, nested folders, a symlink, a mode.
    fs::create_dir_all(p.m.path("docs/a/b")).unwrap();
    fs::write(p.m.path("docs/a/b/c.txt"), b"from the mount").unwrap();
    fs::write(p.m.path("docs/x.bin"), vec![3u8; 200_000]).unwrap();
    fs::set_permissions(p.m.path("docs/x.bin"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("docs/x.bin", p.m.path("link")).unwrap();
    p.converge("mount to folder");
    assert_eq!(
        fs::read(p.w.p("docs/a/b/c.txt")).unwrap(),
        b"from the mount"
    );
    assert_eq!(
        fs::metadata(p.w.p("docs/x.bin"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        fs::read_link(p.w.p("link")).unwrap(),
        Path::new("docs/x.bin")
    );

    // Folder → mount: create, edit, mkdir, nested trees.
    fs::create_dir_all(p.w.p("local/one/two")).unwrap();
    fs::write(p.w.p("local/one/two/new.txt"), b"made in the folder").unwrap();
    fs::write(p.w.p("docs/a/b/c.txt"), b"edited in the folder").unwrap();
    p.converge("folder to mount");
    assert_eq!(
        fs::read(p.m.path("local/one/two/new.txt")).unwrap(),
        b"made in the folder"
    );
    assert_eq!(
        fs::read(p.m.path("docs/a/b/c.txt")).unwrap(),
        b"edited in the folder"
    );

    // An in-place edit of a big file in the folder.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(p.w.p("big.bin"), &big).unwrap();
    p.converge("big file");
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .write(true)
            .open(p.w.p("big.bin"))
            .unwrap();
        f.write_all_at(b"PATCHED", 1_500_000).unwrap();
    }
    p.converge("big file edited in place");
    let got = fs::read(p.m.path("big.bin")).unwrap();
    assert_eq!(&got[1_500_000..1_500_007], b"PATCHED");
    assert_eq!(got.len(), big.len());

    // Renames and deletes in the folder, of a file and of a folder with its tree.
    fs::rename(p.w.p("docs/x.bin"), p.w.p("local/moved.bin")).unwrap();
    fs::rename(p.w.p("local/one"), p.w.p("renamed-one")).unwrap();
    fs::remove_file(p.w.p("before/deep/old.txt")).unwrap();
    fs::remove_dir_all(p.w.p("docs/a")).unwrap();
    let t = p.converge("renames and deletes in the folder");
    assert!(t.contains_key("local/moved.bin"), "{t:?}");
    assert!(t.contains_key("renamed-one/two/new.txt"), "{t:?}");
    assert!(!t.contains_key("docs/a"), "{t:?}");
    assert!(!t.contains_key("before/deep/old.txt"), "{t:?}");

    // Renames and deletes on the mount.
    fs::rename(p.m.path("renamed-one"), p.m.path("local/inner")).unwrap();
    fs::remove_file(p.m.path("link")).unwrap();
    fs::rename(p.m.path("big.bin"), p.m.path("local/big.bin")).unwrap();
    let t = p.converge("renames and deletes on the mount");
    assert!(t.contains_key("local/inner/two/new.txt"), "{t:?}");
    assert!(t.contains_key("local/big.bin"), "{t:?}");
    assert!(!t.contains_key("link"), "{t:?}");

    // While the watcher is stopped: a new file, a deleted one, an edited one.
    let Pair { srv, mut w, m } = p;
    w.stop();
    let out = run(&["status", "--home", w.home.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["watching"].is_null(), "{v}");
    fs::write(w.p("while-stopped.txt"), b"written while not watched").unwrap();
    fs::remove_file(w.p("local/moved.bin")).unwrap();
    fs::write(w.p("local/inner/two/new.txt"), b"edited while not watched").unwrap();
    w.start();
    let out = run(&["status", "--home", w.home.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["watching"].as_str().map(PathBuf::from),
        Some(w.dir.canonicalize().unwrap()),
        "{v}"
    );
    let p = Pair { srv, w, m };
    let t = p.converge("changes made while stopped");
    assert!(t.contains_key("while-stopped.txt"), "{t:?}");
    assert!(!t.contains_key("local/moved.bin"), "{t:?}");
    assert_eq!(
        fs::read(p.m.path("local/inner/two/new.txt")).unwrap(),
        b"edited while not watched"
    );
    p.wait("mount sees the deletion", || {
        !p.m.path("local/moved.bin").exists()
    });
}

/// Skips a test that cannot run here, except in CI (`CI` set), where a missing piece is a
/// broken CI machine, not a reason to check less: there it fails.
fn skip(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{why} (CI is set: run packaging/install-deps.sh as root)");
    }
    eprintln!("skipped: {why}");
}

/// A vfat image mounted by the kernel (loop device) or, on kernels without vfat, by
/// fusefat; unmounted on drop.
struct Vfat {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    fuse: bool,
}

impl Vfat {
    fn new() -> Option<Vfat> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            skip("mounting a vfat image needs root");
            return None;
        }
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("vfat.img");
        let dir = tmp.path().join("vfat");
        fs::create_dir_all(&dir).unwrap();
        let ok = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
        assert!(ok(Command::new("truncate").arg("-s").arg("64M").arg(&img)));
        if !ok(Command::new("mkfs.vfat").arg(&img)) {
            panic!("mkfs.vfat failed (install dosfstools: packaging/install-deps.sh)");
        }
        let kernel_vfat = fs::read_to_string("/proc/filesystems")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split_whitespace().last() == Some("vfat"));
        let fuse = if kernel_vfat {
            assert!(
                ok(Command::new("mount")
                    .arg("-o")
                    .arg("loop,uid=0,utf8")
                    .arg(&img)
                    .arg(&dir)),
                "mounting the vfat image"
            );
            false
        } else {
            // This kernel has no vfat: the same on-disk format through FUSE.
            if !ok(Command::new("fusefat")
                .arg("-o")
                .arg("rw+")
                .arg(&img)
                .arg(&dir))
            {
                skip("no vfat in this kernel and no fusefat (apt-get install fusefat)");
                return None;
            }
            true
        };
        Some(Vfat {
            _tmp: tmp,
            dir,
            fuse,
        })
    }
}

impl Drop for Vfat {
    fn drop(&mut self) {
        for _ in 0..50 {
            let ok = if self.fuse {
                Command::new("fusermount3")
                    .arg("-u")
                    .arg(&self.dir)
                    .status()
            } else {
                Command::new("umount").arg(&self.dir).status()
            }
            .map(|s| s.success())
            .unwrap_or(false);
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[test]
fn names_vfat_cannot_hold_are_adapted_and_kept() {
    let Some(vfat) = Vfat::new() else { return };
    let mut w = Watched::new();
    w.dir = vfat.dir.clone();
    let p = Pair::new(w);
    fs::write(p.m.path("a:b?.txt"), b"forbidden characters").unwrap();
    fs::write(p.m.path("Notes.txt"), b"upper case").unwrap();
    fs::write(p.m.path("notes.txt"), b"lower case").unwrap();
    p.wait("adapted names in the vfat folder", || {
        fs::read(p.w.p("a_b_.txt")).ok().as_deref() == Some(&b"forbidden characters"[..])
            && fs::read(p.w.p("Notes.txt")).ok().as_deref() == Some(&b"upper case"[..])
            && fs::read(p.w.p("notes (2).txt")).ok().as_deref() == Some(&b"lower case"[..])
    });
    // Nothing was renamed back on the mount by the adaptation.
    p.wait("settled", || {
        pending(&p.w.home) == 0 && pending(&p.m.home) == 0
    });
    let names: Vec<String> = fs::read_dir(&p.m.mp)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, ["Notes.txt", "a:b?.txt", "notes.txt"], "{names:?}");

    // Edits of adapted files go back under the original names: one of the same size (on
    // fusefat neither size nor mtime moves: only the content tells) and one that grows.
    overwrite(&p.w.p("a_b_.txt"), b"FORBIDDEN CHARACTERS");
    overwrite(&p.w.p("notes (2).txt"), b"lower case, edited on vfat");
    p.wait("edits under the original names", || {
        fs::read(p.m.path("a:b?.txt")).ok().as_deref() == Some(&b"FORBIDDEN CHARACTERS"[..])
            && fs::read(p.m.path("notes.txt")).ok().as_deref()
                == Some(&b"lower case, edited on vfat"[..])
    });
    // And a shrinking one, after the rest has settled.
    p.wait("settled after the edits", || {
        pending(&p.w.home) == 0 && pending(&p.m.home) == 0
    });
    overwrite(&p.w.p("a_b_.txt"), b"short");
    p.wait("a shrinking edit under the original name", || {
        fs::read(p.m.path("a:b?.txt")).ok().as_deref() == Some(&b"short"[..])
    });
    assert_eq!(fs::read(p.w.p("a_b_.txt")).unwrap(), b"short");
    assert_eq!(fs::read(p.m.path("Notes.txt")).unwrap(), b"upper case");
    assert!(!p.m.path("a_b_.txt").exists());
    assert!(!p.m.path("notes (2).txt").exists());
    let Pair { srv, mut w, m } = p;
    w.stop();
    drop((srv, m, w));
    drop(vfat);
}

fn ino(p: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let md = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (md.ino(), md.nlink())
}

/// Whether `paths` are one file (the same inode) with exactly that many names.
fn linked(paths: &[PathBuf]) -> bool {
    use std::os::unix::fs::MetadataExt;
    let mds: Vec<_> = paths.iter().map(fs::symlink_metadata).collect();
    mds.iter().all(|m| {
        m.as_ref().is_ok_and(|m| {
            m.nlink() == paths.len() as u64
                && m.ino() == mds[0].as_ref().map(|f| f.ino()).unwrap_or(0)
        })
    })
}

#[test]
fn hard_links_stay_hard_links_between_a_watched_folder_and_a_mount() {
    let p = Pair::new(Watched::new());
    // Mount → folder: three names of one file, in two folders.
    fs::create_dir_all(p.m.path("m2")).unwrap();
    fs::write(p.m.path("a.txt"), b"one file, three names").unwrap();
    fs::hard_link(p.m.path("a.txt"), p.m.path("b.txt")).unwrap();
    fs::hard_link(p.m.path("a.txt"), p.m.path("m2/c.txt")).unwrap();
    p.converge("links made on the mount");
    let abc = [p.w.p("a.txt"), p.w.p("b.txt"), p.w.p("m2/c.txt")];
    if !linked(&abc) {
        p.fail(&format!(
            "the folder's names are not one file: {:?}",
            abc.iter().map(|x| ino(x)).collect::<Vec<_>>()
        ));
    }
    let out = run(&["status", "--home", p.w.home.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["hard_links"], "hard links", "{v}");

    // Folder → mount: a link made here, then an edit in place through the second name.
    fs::write(p.w.p("x.txt"), b"xxxxxx in the folder").unwrap();
    p.converge("x.txt");
    fs::hard_link(p.w.p("x.txt"), p.w.p("m2/y.txt")).unwrap();
    p.converge("a link made in the folder");
    let xy = [p.m.path("x.txt"), p.m.path("m2/y.txt")];
    assert!(
        linked(&xy),
        "{:?}",
        xy.iter().map(|x| ino(x)).collect::<Vec<_>>()
    );
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .write(true)
            .open(p.w.p("m2/y.txt"))
            .unwrap();
        f.write_all_at(b"EDITED", 0).unwrap();
    }
    p.converge("an edit through the second name");
    assert_eq!(
        fs::read(p.m.path("x.txt")).unwrap(),
        b"EDITED in the folder"
    );
    assert!(linked(&xy));

    // Link, then unlink of the first name (a temp name made final): only the final one.
    fs::remove_file(p.w.p("x.txt")).unwrap();
    let t = p.converge("the first name removed in the folder");
    assert!(!t.contains_key("x.txt"), "{t:?}");
    assert_eq!(ino(&p.m.path("m2/y.txt")).1, 1);
    assert_eq!(
        fs::read(p.m.path("m2/y.txt")).unwrap(),
        b"EDITED in the folder"
    );

    // On the mount: one name removed, then the file rewritten through another.
    fs::remove_file(p.m.path("a.txt")).unwrap();
    p.converge("a name removed on the mount");
    let bc = [p.w.p("b.txt"), p.w.p("m2/c.txt")];
    assert!(
        linked(&bc),
        "{:?}",
        bc.iter().map(|x| ino(x)).collect::<Vec<_>>()
    );
    fs::write(
        p.m.path("b.txt"),
        b"rewritten on the mount, seen through both names",
    )
    .unwrap();
    p.converge("a rewrite on the mount");
    assert!(
        linked(&bc),
        "{:?}",
        bc.iter().map(|x| ino(x)).collect::<Vec<_>>()
    );
    assert_eq!(
        fs::read(p.w.p("m2/c.txt")).unwrap(),
        b"rewritten on the mount, seen through both names"
    );

    // Every name removed on the mount: gone here too, and nothing comes back.
    fs::remove_file(p.m.path("b.txt")).unwrap();
    fs::remove_file(p.m.path("m2/c.txt")).unwrap();
    let t = p.converge("every name removed on the mount");
    assert!(
        !t.contains_key("b.txt") && !t.contains_key("m2/c.txt"),
        "{t:?}"
    );
    std::thread::sleep(Duration::from_secs(1));
    let t = p.converge("still removed");
    assert!(
        !t.contains_key("b.txt") && !t.contains_key("m2/c.txt"),
        "{t:?}"
    );
}

#[test]
fn hard_links_become_copies_on_vfat_and_status_says_so() {
    let Some(vfat) = Vfat::new() else { return };
    let mut w = Watched::new();
    w.dir = vfat.dir.clone();
    let p = Pair::new(w);
    let out = run(&["status", "--home", p.w.home.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["hard_links"], "separate copies", "{v}");
    let out = run(&["status", "--home", p.w.home.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("kept as separate copies"), "{text}");

    fs::write(p.m.path("a.txt"), b"two names on the mount").unwrap();
    fs::hard_link(p.m.path("a.txt"), p.m.path("b.txt")).unwrap();
    p.wait("two copies in the vfat folder", || {
        fs::read(p.w.p("a.txt")).ok().as_deref() == Some(&b"two names on the mount"[..])
            && fs::read(p.w.p("b.txt")).ok().as_deref() == Some(&b"two names on the mount"[..])
    });
    p.wait("settled", || {
        pending(&p.w.home) == 0 && pending(&p.m.home) == 0
    });

    // An edit of one copy is an edit of the file: both names on the mount show it, and
    // the other copy here is rewritten.
    overwrite(&p.w.p("b.txt"), b"EDITED ON VFAT, one file");
    p.wait("the copy's edit on the mount and in the other copy", || {
        fs::read(p.m.path("a.txt")).ok().as_deref() == Some(&b"EDITED ON VFAT, one file"[..])
            && fs::read(p.w.p("a.txt")).ok().as_deref() == Some(&b"EDITED ON VFAT, one file"[..])
    });
    assert!(linked(&[p.m.path("a.txt"), p.m.path("b.txt")]));

    // A copy removed here is that name removed: the file keeps its other one.
    p.wait("settled after the edit", || {
        pending(&p.w.home) == 0 && pending(&p.m.home) == 0
    });
    fs::remove_file(p.w.p("a.txt")).unwrap();
    p.wait("the name removed on the mount", || {
        !p.m.path("a.txt").exists()
    });
    assert_eq!(ino(&p.m.path("b.txt")).1, 1);
    assert_eq!(
        fs::read(p.m.path("b.txt")).unwrap(),
        b"EDITED ON VFAT, one file"
    );
    p.converge("one name left");
    let Pair { srv, mut w, m } = p;
    w.stop();
    drop((srv, m, w));
    drop(vfat);
}

/// Waits until the watched folder and the mount hold the same names (type, mode, content,
/// inode groups and link counts) with nothing left to send; prints both on a failure.
fn converge_names(p: &Pair, what: &str, ops: &[String]) {
    let start = Instant::now();
    loop {
        let a = names(&p.w.dir);
        let b = names(&p.m.mp);
        if a == b && pending(&p.w.home) == 0 && pending(&p.m.home) == 0 {
            std::thread::sleep(Duration::from_millis(500));
            if names(&p.w.dir) == a && names(&p.m.mp) == b {
                return;
            }
            continue;
        }
        if start.elapsed() > LIMIT * 2 {
            print_ops(what, ops);
            for (k, v) in &a {
                if b.get(k) != Some(v) {
                    eprintln!("folder {k}: {v:?}\n mount {k}: {:?}", b.get(k));
                }
            }
            for (k, v) in &b {
                if !a.contains_key(k) {
                    eprintln!("folder {k}: missing\n mount {k}: {v:?}");
                }
            }
            p.fail(&format!("{what}: did not converge within {:?}", LIMIT * 2));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The random mix of the names tests, in a watched folder (ext4 here: hard links are hard
/// links), ends name by name the same on a mount of the same user.
///
/// The mix runs while the watcher is stopped, and the watcher's start finds it all (as after
/// a restart or a long suspend), twice per seed: that is deterministic for a seed. With
/// `DELTADRIVE_WATCH_MIX_LIVE=1` it runs under the running watcher instead, its passes
/// interleaving with the operations; that finds more and is not deterministic (what live
/// seed 11 found is pinned by
/// `a_deleted_symlinks_inode_reused_by_a_new_file_with_two_names`), so it is run by hand:
///
/// ```text
/// DELTADRIVE_NAMES_SEED=1..41 cargo test --test watch -- --test-threads 1 random_mix
/// DELTADRIVE_WATCH_MIX_LIVE=1 DELTADRIVE_NAMES_SEED=1..21 cargo test --test watch -- \
///   --test-threads 1 random_mix
/// ```
#[test]
fn a_random_mix_in_a_watched_folder_ends_the_same_on_a_mount() {
    let live = std::env::var_os("DELTADRIVE_WATCH_MIX_LIVE").is_some();
    let mut p = Pair::new(Watched::new());
    let n = ops_per_seed();
    for seed in seeds(&[5, 6]) {
        let _hint = replay_hint(
            "watch",
            "a_random_mix_in_a_watched_folder_ends_the_same_on_a_mount",
            seed,
            n,
        );
        let at = format!("mix-{seed}");
        fs::create_dir(p.w.p(&at)).unwrap();
        converge_names(&p, &format!("seed {seed}: its folder"), &[]);
        let mut mix = Mix::new(seed, p.w.p(&at));
        for round in 0..2 {
            if !live {
                p.w.stop();
            }
            let r = mix.run(n / 2);
            if !live {
                p.w.start();
            }
            if let Err(e) = r {
                print_ops(&format!("seed {seed}"), &mix.log);
                p.fail(&e);
            }
            converge_names(&p, &format!("seed {seed}, round {round}"), &mix.log);
        }
    }
}

/// Folders that swapped nesting while the watcher was stopped (`mv a/b x; mv a x/a`): the
/// store must never move a folder into one it still holds (the kernel refuses that on a
/// mount; the reconciler's own renames went straight to the store and cut both folders and
/// their content off from the root, seed 14 of the random mix).
#[test]
fn folders_that_swapped_nesting_while_stopped_end_the_same() {
    let mut p = Pair::new(Watched::new());
    fs::create_dir_all(p.w.p("a/b/c")).unwrap();
    fs::write(p.w.p("a/b/c/f"), b"deep").unwrap();
    fs::write(p.w.p("a/g"), b"in a").unwrap();
    converge_names(&p, "a/b/c before", &[]);
    p.w.stop();
    fs::rename(p.w.p("a/b"), p.w.p("x")).unwrap();
    fs::rename(p.w.p("a"), p.w.p("x/a")).unwrap();
    fs::rename(p.w.p("x/c"), p.w.p("x/a/c")).unwrap();
    p.w.start();
    converge_names(&p, "after the nesting swapped", &[]);
    assert_eq!(fs::read(p.m.path("x/a/c/f")).unwrap(), b"deep");
    assert_eq!(fs::read(p.m.path("x/a/g")).unwrap(), b"in a");
    assert!(!p.m.path("a").exists());
}

/// A symlink deleted here whose inode number the folder's file system hands at once to a new
/// file with two names (`rm d/a; echo x > b; ln b d/b/a`, ext4 does reuse it): the new file's
/// names are its own, never further names of the symlink. The reconciler took the inode's
/// names for the symlink's, linked the symlink in the store at `d/b/a`, and then wrote it
/// here as `d/b/a (2)` beside the file, where the new file's name clashed with it for good
/// (live seed 11 of the random mix).
#[test]
fn a_deleted_symlinks_inode_reused_by_a_new_file_with_two_names() {
    use std::os::unix::fs::MetadataExt;
    let mut p = Pair::new(Watched::new());
    fs::create_dir_all(p.w.p("d/b")).unwrap();
    std::os::unix::fs::symlink("a/b", p.w.p("d/a")).unwrap();
    converge_names(&p, "the symlink before", &[]);
    p.w.stop();
    let was = fs::symlink_metadata(p.w.p("d/a")).unwrap().ino();
    fs::remove_file(p.w.p("d/a")).unwrap();
    // ext4 hands out the lowest free inode number of the folder's group: files that got a
    // lower one hold it until the freed number comes, and are removed before the watcher
    // starts (it never sees them).
    let mut fillers = Vec::new();
    let mut reused = false;
    for k in 0..4096 {
        let f = p.w.p(&format!("d/fill-{k}"));
        fs::write(&f, b"a new file").unwrap();
        if fs::metadata(&f).unwrap().ino() == was {
            fs::rename(&f, p.w.p("b")).unwrap();
            reused = true;
            break;
        }
        fillers.push(f);
    }
    for f in fillers {
        fs::remove_file(f).unwrap();
    }
    assert!(
        reused,
        "the folder's file system did not hand out the freed inode number again"
    );
    fs::hard_link(p.w.p("b"), p.w.p("d/b/a")).unwrap();
    p.w.start();
    converge_names(&p, "after the inode was reused", &[]);
    assert!(linked(&[p.m.path("b"), p.m.path("d/b/a")]));
    assert_eq!(fs::read(p.m.path("d/b/a")).unwrap(), b"a new file");
    for gone in ["d/a", "d/b/a (2)"] {
        assert!(fs::symlink_metadata(p.w.p(gone)).is_err(), "{gone} here");
        assert!(
            fs::symlink_metadata(p.m.path(gone)).is_err(),
            "{gone} on the mount"
        );
    }
}

/// Replaces a file's content in place, as an editor saving without a temp file does.
/// fusefat ignores O_TRUNC at open (the old tail would stay behind) and refuses a truncate
/// that does not shrink, so a longer old content is cut after writing instead.
fn overwrite(path: &Path, data: &[u8]) {
    use std::io::Write;
    let old = fs::metadata(path).unwrap().len();
    let mut f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all(data).unwrap();
    if old > data.len() as u64 {
        f.set_len(data.len() as u64).unwrap();
    }
    f.sync_all().unwrap();
}

fn refused(args: &[&str]) -> String {
    let out = run(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    err
}

#[test]
fn bad_folders_are_refused_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let h = home.to_str().unwrap();

    let missing = tmp.path().join("missing");
    let err = refused(&["watch", missing.to_str().unwrap(), "--home", h]);
    assert!(err.contains("does not exist"), "{err}");

    let file = tmp.path().join("file");
    fs::write(&file, b"x").unwrap();
    let err = refused(&["watch", file.to_str().unwrap(), "--home", h]);
    assert!(err.contains("is not a folder"), "{err}");

    let dir = tmp.path().join("dir");
    fs::create_dir(&dir).unwrap();
    let inside = dir.join("home");
    let err = refused(&[
        "watch",
        dir.to_str().unwrap(),
        "--home",
        inside.to_str().unwrap(),
    ]);
    assert!(err.contains("inside the watched folder"), "{err}");
    // The same in the foreground.
    let err = refused(&[
        "watch",
        dir.to_str().unwrap(),
        "--foreground",
        "--home",
        inside.to_str().unwrap(),
    ]);
    assert!(err.contains("inside the watched folder"), "{err}");

    // Nothing was changed: no home made, the folder still empty, the file untouched.
    assert!(!home.exists());
    assert!(!inside.exists());
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
    assert_eq!(fs::read(&file).unwrap(), b"x");
}

#[test]
fn setuid_and_setgid_bits_from_another_device_are_not_applied() {
    let p = Pair::new(Watched::new());
    // Folder → mount and mount → folder, each with the bits another device must not get.
    fs::write(p.w.p("tool"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(p.w.p("tool"), fs::Permissions::from_mode(0o6755)).unwrap();
    fs::write(p.m.path("other"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(p.m.path("other"), fs::Permissions::from_mode(0o4711)).unwrap();
    let sticky = p.m.path("shared");
    fs::create_dir(&sticky).unwrap();
    fs::set_permissions(&sticky, fs::Permissions::from_mode(0o1777)).unwrap();
    p.converge("files with setuid and setgid bits");
    let mode = |path: PathBuf| fs::metadata(path).unwrap().permissions().mode() & 0o7777;
    // The permission bits arrive (they may come a moment after the content)...
    p.wait("the mode of tool reaches the mount", || {
        mode(p.m.path("tool")) & 0o777 == 0o755
    });
    p.wait("the mode of other reaches the folder", || {
        mode(p.w.p("other")) & 0o777 == 0o711
    });
    p.wait("the sticky folder reaches the folder", || {
        mode(p.w.p("shared")) == 0o1777
    });
    // ...the setuid and setgid bits never do; the sticky bit does.
    assert_eq!(
        mode(p.m.path("tool")),
        0o755,
        "setuid/setgid applied on the mount"
    );
    assert_eq!(
        mode(p.w.p("other")),
        0o711,
        "setuid applied on the watched folder"
    );
    // Where they were set they stay.
    assert_eq!(mode(p.w.p("tool")), 0o6755);
    assert_eq!(mode(p.m.path("other")), 0o4711);
}
