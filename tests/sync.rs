//! Sync end to end: a real server process and two or three real mounts (separate homes)
//! logged in as devices of one user. Every change made through one mount must show up,
//! byte for byte and with its attributes, through the others, without a remount; offline
//! and conflicting changes must converge without losing a saved version.
//!
//! On a failure every test prints the logs of the server and of every mount.

mod common;

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use common::cluster::{pending, status_json, tree, xattr_get, xattr_set, Cluster, Entry};
use common::run;

fn write_at(p: &Path, offset: u64, data: &[u8]) {
    let f = fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(data, offset).unwrap();
}

#[test]
fn changes_flow_both_ways_and_show_without_a_remount() {
    let c = Cluster::new(2);
    // A -> B: folders, files, a symlink, modes, xattrs.
    fs::create_dir_all(c.p(0, "docs/deep/er")).unwrap();
    fs::write(c.p(0, "docs/a.txt"), b"hello from a").unwrap();
    fs::write(c.p(0, "docs/deep/er/b.bin"), vec![7u8; 300_000]).unwrap();
    std::os::unix::fs::symlink("docs/a.txt", c.p(0, "link")).unwrap();
    fs::set_permissions(c.p(0, "docs/a.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    xattr_set(&c.p(0, "docs/a.txt"), "user.tag", b"blue");
    let t = c.converge("create on A");
    assert!(
        matches!(t.get("docs/a.txt"), Some(Entry::File { mode: 0o600, .. })),
        "{t:?}"
    );
    assert_eq!(fs::read(c.p(1, "link")).unwrap(), b"hello from a");
    assert_eq!(
        xattr_get(&c.p(1, "docs/a.txt"), "user.tag").as_deref(),
        Some(&b"blue"[..])
    );

    // B reads a file (the kernel caches it), A changes it in place: B must see the new bytes.
    let before = fs::read(c.p(1, "docs/deep/er/b.bin")).unwrap();
    assert_eq!(before.len(), 300_000);
    write_at(&c.p(0, "docs/deep/er/b.bin"), 1000, b"XYZ");
    c.wait("in-place edit visible on B", || {
        fs::read(c.p(1, "docs/deep/er/b.bin"))
            .unwrap_or_default()
            .get(1000..1003)
            == Some(b"XYZ")
    });

    // B -> A: in-place edit, append, truncate, temp+rename, move across folders, delete.
    write_at(&c.p(1, "docs/a.txt"), 0, b"HELLO");
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(c.p(1, "docs/deep/er/b.bin"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"appended").unwrap();
    drop(f);
    fs::write(c.p(1, "docs/trunc.txt"), b"0123456789").unwrap();
    c.converge("edits on B");
    fs::OpenOptions::new()
        .write(true)
        .open(c.p(1, "docs/trunc.txt"))
        .unwrap()
        .set_len(4)
        .unwrap();
    fs::write(c.p(1, "docs/.a.txt.tmp"), b"saved by an editor").unwrap();
    fs::rename(c.p(1, "docs/.a.txt.tmp"), c.p(1, "docs/a.txt")).unwrap();
    fs::create_dir(c.p(1, "moved")).unwrap();
    fs::rename(c.p(1, "docs/deep"), c.p(1, "moved/deep")).unwrap();
    fs::remove_file(c.p(1, "link")).unwrap();
    fs::set_permissions(c.p(1, "docs"), fs::Permissions::from_mode(0o750)).unwrap();
    let t = c.converge("edits on B");
    assert_eq!(
        fs::read(c.p(0, "docs/a.txt")).unwrap(),
        b"saved by an editor"
    );
    assert_eq!(fs::read(c.p(0, "docs/trunc.txt")).unwrap(), b"0123");
    let b = fs::read(c.p(0, "moved/deep/er/b.bin")).unwrap();
    assert_eq!(b.len(), 300_008);
    assert_eq!(&b[1000..1003], b"XYZ");
    assert!(b.ends_with(b"appended"));
    assert!(!c.p(0, "link").exists() && !c.p(0, "docs/deep").exists());
    assert!(
        matches!(t.get("docs"), Some(Entry::Dir { mode: 0o750, .. })),
        "{t:?}"
    );

    // 1,000 small files from A, then a whole tree removed on B.
    fs::create_dir(c.p(0, "many")).unwrap();
    for i in 0..1000 {
        fs::write(c.p(0, &format!("many/f{i:04}")), format!("file {i}")).unwrap();
    }
    let t = c.converge("1,000 files from A");
    assert_eq!(t.keys().filter(|k| k.starts_with("many/")).count(), 1000);
    assert_eq!(
        fs::read_to_string(c.p(1, "many/f0999")).unwrap(),
        "file 999"
    );
    fs::remove_dir_all(c.p(1, "moved")).unwrap();
    fs::remove_dir_all(c.p(1, "many")).unwrap();
    let t = c.converge("rm -r on B");
    assert!(
        !t.keys()
            .any(|k| k.starts_with("many") || k.starts_with("moved")),
        "{t:?}"
    );
}

/// Names in `dir` that contain `needle`.
fn names_with(dir: &Path, needle: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(needle))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn offline_edits_on_both_sides_converge_without_losing_a_version() {
    let mut c = Cluster::new(2);
    fs::write(c.p(0, "report.txt"), b"version 0").unwrap();
    fs::write(c.p(0, "plan.txt"), b"plan 0").unwrap();
    fs::write(c.p(0, "notes.txt"), b"notes 0").unwrap();
    fs::create_dir(c.p(0, "shared")).unwrap();
    fs::write(c.p(0, "shared/x.txt"), b"x").unwrap();
    c.converge("initial tree");

    // The server goes away; both devices keep working.
    c.srv.kill9();
    fs::write(c.p(0, "report.txt"), b"version A, longer").unwrap();
    fs::write(c.p(1, "report.txt"), b"version B").unwrap();
    fs::remove_file(c.p(0, "plan.txt")).unwrap();
    fs::write(c.p(1, "plan.txt"), b"plan edited on B").unwrap();
    fs::write(c.p(0, "notes.txt"), b"notes edited on A").unwrap();
    fs::remove_file(c.p(1, "notes.txt")).unwrap();
    fs::write(c.p(0, "only-a.txt"), b"new on A").unwrap();
    fs::write(c.p(1, "only-b.txt"), b"new on B").unwrap();
    fs::write(c.p(1, "shared/y.txt"), b"y").unwrap();
    // Both offline edits are saved locally and waiting.
    c.wait("changes queued on both devices", || {
        pending(&c.devices[0].home) > 0 && pending(&c.devices[1].home) > 0
    });
    let st = status_json(&c.devices[1].home);
    assert!(st["pending_uploads"]["bytes"].as_u64().unwrap() > 0, "{st}");

    c.srv.restart_same_port();
    let t = c.converge("after reconnecting");
    // edit/edit: one version at the path, the other in a conflicted copy, on both devices.
    let copies = names_with(&c.p(0, ""), "report (conflicted copy");
    assert_eq!(copies.len(), 1, "{t:#?}");
    let at_path = fs::read(c.p(0, "report.txt")).unwrap();
    let in_copy = fs::read(c.p(0, &copies[0])).unwrap();
    let mut both = vec![at_path, in_copy];
    both.sort();
    assert_eq!(
        both,
        vec![b"version A, longer".to_vec(), b"version B".to_vec()]
    );
    // edit beats delete, in both orders.
    assert_eq!(fs::read(c.p(0, "plan.txt")).unwrap(), b"plan edited on B");
    assert_eq!(fs::read(c.p(1, "notes.txt")).unwrap(), b"notes edited on A");
    assert_eq!(fs::read(c.p(1, "only-a.txt")).unwrap(), b"new on A");
    assert_eq!(fs::read(c.p(0, "only-b.txt")).unwrap(), b"new on B");
    assert_eq!(fs::read(c.p(0, "shared/y.txt")).unwrap(), b"y");
    // The device that made the copy says so.
    let conflicts: usize = (0..2)
        .map(|d| {
            status_json(&c.devices[d].home)["conflicts"]
                .as_array()
                .map(|a| a.len())
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(conflicts, 1);
    // The copy reads `conflict` where it was made (a record, not its name), `synced` on the
    // device that received it; renaming it settles it.
    let maker = (0..2)
        .find(|d| {
            status_json(&c.devices[*d].home)["conflicts"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
        })
        .unwrap();
    let st = |d: usize, rel: &str| xattr_get(&c.p(d, rel), "user.deltadrive.status");
    assert_eq!(st(maker, &copies[0]).as_deref(), Some(&b"conflict"[..]));
    assert_eq!(st(1 - maker, &copies[0]).as_deref(), Some(&b"synced"[..]));
    fs::rename(c.p(maker, &copies[0]), c.p(maker, "report-theirs.txt")).unwrap();
    assert_ne!(
        st(maker, "report-theirs.txt").as_deref(),
        Some(&b"conflict"[..])
    );
    // ...and the desktop was told (org.freedesktop.Notifications.Notify through gdbus).
    let said = fs::read_to_string(c.pw.path().join("notifications")).unwrap_or_default();
    assert!(
        said.contains("org.freedesktop.Notifications.Notify") && said.contains("conflicted copy"),
        "no desktop notification: {said:?}"
    );
}

#[test]
fn a_crashed_client_delivers_its_outbox_once_and_uploads_survive_a_server_restart() {
    let mut c = Cluster::new(2);
    c.converge("empty");
    // Changes queue while the server is down, then the client is killed with -9.
    c.srv.kill9();
    fs::create_dir(c.p(0, "queued")).unwrap();
    for i in 0..20 {
        fs::write(c.p(0, &format!("queued/f{i}")), format!("queued {i}")).unwrap();
    }
    c.wait("queued", || pending(&c.devices[0].home) > 0);
    c.devices[0].crash();
    c.srv.restart_same_port();
    c.devices[0].mount();
    let t = c.converge("after the crash");
    assert_eq!(t.keys().filter(|k| k.starts_with("queued/")).count(), 20);

    // A big upload with the server killed and restarted in the middle.
    let big: Vec<u8> = (0..24u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(c.p(1, "big.bin"), &big).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    c.srv.restart_same_port();
    c.converge("big file after a server restart");
    assert!(
        fs::read(c.p(0, "big.bin")).unwrap() == big,
        "big.bin differs on A"
    );

    // No transaction is stored twice: every transaction id appears once in the log.
    let dc = deltadrive::client::DeviceConfig::load(
        &deltadrive::home::Home::resolve(Some(&c.devices[0].home)).unwrap(),
    )
    .unwrap();
    let client = dc.client().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let page = rt.block_on(client.read_log(0, 10_000)).unwrap();
    let mut ids = std::collections::HashSet::new();
    for (seq, bytes) in page.entries {
        let tx = deltadrive::changelog::decode_transaction(&bytes).unwrap();
        assert!(ids.insert(tx.id), "transaction at seq {seq} stored twice");
    }
}

#[test]
fn a_new_device_receives_the_whole_tree() {
    let mut c = Cluster::new(1);
    fs::create_dir_all(c.p(0, "a/b/c")).unwrap();
    for i in 0..200 {
        fs::write(c.p(0, &format!("a/b/c/f{i}")), vec![i as u8; 5000]).unwrap();
    }
    fs::write(c.p(0, "a/top.txt"), b"top").unwrap();
    fs::write(c.p(0, "a/top.txt"), b"top, edited").unwrap();
    fs::remove_file(c.p(0, "a/b/c/f0")).unwrap();
    c.converge("one device");
    c.add_device("late");
    // `wait` returns once the new device has everything.
    let out = run(&[
        "wait",
        "--home",
        c.devices[1].home.to_str().unwrap(),
        "--timeout-secs",
        "60",
    ]);
    if !out.status.success() {
        c.fail(&format!(
            "wait failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    assert_eq!(
        tree(&c.devices[1].mp),
        tree(&c.devices[0].mp),
        "wait returned before the tree arrived"
    );
    let t = c.converge("the new device caught up");
    assert_eq!(t.keys().filter(|k| k.starts_with("a/b/c/f")).count(), 199);
    assert_eq!(fs::read(c.p(1, "a/top.txt")).unwrap(), b"top, edited");
    // And it is a full peer: its change goes back.
    fs::write(c.p(1, "a/from-late.txt"), b"hi").unwrap();
    c.converge("change from the new device");
}

#[test]
fn an_open_file_keeps_its_content_and_writes_after_a_remote_change_are_kept() {
    let c = Cluster::new(2);
    fs::write(c.p(0, "held.txt"), b"original content").unwrap();
    c.converge("initial");
    // B holds the file open; A replaces its content.
    let held = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(c.p(1, "held.txt"))
        .unwrap();
    let mut buf = [0u8; 16];
    held.read_exact_at(&mut buf, 0).unwrap();
    fs::write(c.p(0, "held.txt"), b"new content from A").unwrap();
    c.wait("A's version visible on B to a new open", || {
        fs::read(c.p(1, "held.txt")).unwrap_or_default() == b"new content from A"
    });
    // The open handle still reads what it opened.
    let mut buf = [0u8; 16];
    held.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"original content");
    // Writes through it are not lost: at close they become a conflicted copy.
    held.write_all_at(b"B's late edit", 0).unwrap();
    drop(held);
    let t = c.converge("after the stale handle closed");
    assert_eq!(fs::read(c.p(0, "held.txt")).unwrap(), b"new content from A");
    let copies = names_with(&c.p(0, ""), "held (conflicted copy");
    assert_eq!(copies.len(), 1, "{t:#?}");
    assert_eq!(fs::read(c.p(0, &copies[0])).unwrap(), b"B's late editent");
}

#[test]
fn history_lists_versions_and_restore_brings_one_back_everywhere() {
    let c = Cluster::new(2);
    for v in 1..=3 {
        fs::write(c.p(0, "doc.txt"), format!("version {v} of the document")).unwrap();
        c.converge("a new version");
    }
    let path = c.p(1, "doc.txt");
    let home = c.devices[1].home.to_str().unwrap().to_string();
    let out = run(&["history", path.to_str().unwrap(), "--home", &home]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        c.fail(&format!(
            "history failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    assert!(text.contains("(current)"), "{text}");
    // Each version names the device whose token saved it (the server's record).
    assert!(
        text.lines().filter(|l| l.contains("  dev0  ")).count() >= 3,
        "{text}"
    );
    // The oldest version listed is the first save.
    let versions: Vec<u64> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(versions.len(), 3, "{text}");
    let first = versions.iter().min().unwrap().to_string();
    let out = run(&[
        "restore",
        path.to_str().unwrap(),
        "--version",
        &first,
        "--home",
        &home,
    ]);
    if !out.status.success() {
        c.fail(&format!(
            "restore failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    c.converge("after restore");
    assert_eq!(
        fs::read_to_string(c.p(0, "doc.txt")).unwrap(),
        "version 1 of the document"
    );
    // Bad input: an unknown version changes nothing and says which exist.
    let out = run(&[
        "restore",
        path.to_str().unwrap(),
        "--version",
        "999",
        "--home",
        &home,
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not kept"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fs::read_to_string(c.p(1, "doc.txt")).unwrap(),
        "version 1 of the document"
    );
}

#[test]
fn an_apply_that_does_not_fit_the_local_content_heals_by_fetching() {
    let c = Cluster::new(2);
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(c.p(0, "data.bin"), &body).unwrap();
    c.converge("initial");
    // Damage B's content file behind the file system's back (bit rot, a bad disk).
    let ino = fs::metadata(c.p(1, "data.bin")).unwrap().ino();
    let content = c.devices[1]
        .home
        .join("content")
        .join(format!("{:02x}", ino & 0xff))
        .join(format!("{ino:016x}"));
    write_at(&content, 5000, b"rot");
    // A's small edit arrives as a delta that does not fit B's content: B must fetch.
    write_at(&c.p(0, "data.bin"), 100, b"edit");
    let mut want = body.clone();
    want[100..104].copy_from_slice(b"edit");
    c.wait("B healed", || {
        fs::read(c.p(1, "data.bin")).unwrap_or_default() == want
    });
    let log = fs::read_to_string(c.devices[1].home.join("mount.log")).unwrap();
    assert!(
        log.contains("fetching whole content"),
        "the heal is not in B's log"
    );
    c.converge("after healing");
}

#[test]
fn ignored_files_and_the_trash_stay_on_their_device() {
    let c = Cluster::new(2);
    fs::create_dir(c.p(0, "docs")).unwrap();
    fs::write(c.p(0, "docs/report.txt"), b"report").unwrap();
    fs::write(c.p(0, ".deltaignore"), b"*.log\n").unwrap();
    c.converge("create on A");
    assert_eq!(fs::read(c.p(1, ".deltaignore")).unwrap(), b"*.log\n");

    // Ignored files stay where they were made; what comes after them travels.
    fs::write(c.p(0, "a.log"), b"log").unwrap();
    fs::write(c.p(0, "docs/.report.txt.swp"), b"swap").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    fs::write(c.p(0, "docs/later.txt"), b"later").unwrap();
    c.wait("later.txt reaches B", || c.p(1, "docs/later.txt").exists());
    assert!(!c.p(1, "a.log").exists());
    assert!(!c.p(1, "docs/.report.txt.swp").exists());

    // Into the trash on A: gone from B. Back from the trash: back on B.
    fs::create_dir_all(c.p(0, ".Trash-0/files")).unwrap();
    fs::rename(
        c.p(0, "docs/report.txt"),
        c.p(0, ".Trash-0/files/report.txt"),
    )
    .unwrap();
    c.wait("the trashed file leaves B", || {
        !c.p(1, "docs/report.txt").exists()
    });
    assert!(!c.p(1, ".Trash-0").exists(), "the trash stays on A");
    fs::rename(
        c.p(0, ".Trash-0/files/report.txt"),
        c.p(0, "docs/report.txt"),
    )
    .unwrap();
    c.wait("the restored file is back on B", || {
        fs::read(c.p(1, "docs/report.txt")).ok().as_deref() == Some(&b"report"[..])
    });
}

#[test]
fn a_remote_delete_never_takes_a_local_ignored_file() {
    let c = Cluster::new(2);
    fs::write(c.p(0, ".deltaignore"), b"*.log\n").unwrap();
    fs::create_dir(c.p(0, "proj")).unwrap();
    fs::write(c.p(0, "proj/a.txt"), b"synced").unwrap();
    c.converge("initial");
    // A keeps a local-only file in the folder; B deletes the folder.
    fs::write(c.p(0, "proj/build.log"), b"only on A").unwrap();
    c.wait("the log stays local", || pending(&c.devices[0].home) == 0);
    fs::remove_dir_all(c.p(1, "proj")).unwrap();
    c.wait("the delete reached A", || !c.p(0, "proj/a.txt").exists());
    c.wait("both devices idle", || {
        pending(&c.devices[0].home) == 0 && pending(&c.devices[1].home) == 0
    });
    assert_eq!(fs::read(c.p(0, "proj/build.log")).unwrap(), b"only on A");
    assert!(!c.p(1, "proj/build.log").exists());
}

fn gio(args: &[&str]) {
    let out = std::process::Command::new("gio")
        .args(args)
        .output()
        .expect("gio (package libglib2.0-bin)");
    assert!(
        out.status.success(),
        "gio {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_file_managers_copy_move_and_trash_sync_to_another_device() {
    let c = Cluster::new(2);
    // gio copy of a tree, file by file as file managers do, into the mount.
    let src = tempfile::tempdir().unwrap();
    for d in ["photos", "photos/2026"] {
        fs::create_dir_all(src.path().join(d)).unwrap();
        gio(&["mkdir", "-p", c.p(0, d).to_str().unwrap()]);
    }
    for i in 0..40 {
        let rel = if i % 2 == 0 {
            format!("photos/p{i}.jpg")
        } else {
            format!("photos/2026/p{i}.jpg")
        };
        fs::write(src.path().join(&rel), vec![i as u8; 20_000 + i]).unwrap();
        gio(&[
            "copy",
            "--preserve",
            src.path().join(&rel).to_str().unwrap(),
            c.p(0, &rel).to_str().unwrap(),
        ]);
    }
    gio(&[
        "move",
        c.p(0, "photos/2026").to_str().unwrap(),
        c.p(0, "album-2026").to_str().unwrap(),
    ]);
    let t = c.converge("gio copy and move");
    assert_eq!(t.keys().filter(|k| k.ends_with(".jpg")).count(), 40);
    assert_eq!(
        fs::read(c.p(1, "album-2026/p1.jpg")).unwrap(),
        vec![1u8; 20_001]
    );
    // gio info works on a synced file and shows the sync state attribute.
    let out = std::process::Command::new("gio")
        .args([
            "info",
            "-a",
            "xattr::*,standard::size",
            c.p(1, "photos/p0.jpg").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&out.stdout);
    assert!(info.contains("standard::size: 20000"), "{info}");
    // gio trash: the file goes to a local .Trash-0 that never syncs; the deletion does.
    gio(&["trash", c.p(1, "photos/p0.jpg").to_str().unwrap()]);
    c.wait("the trashed file is gone on A", || {
        !c.p(0, "photos/p0.jpg").exists()
    });
    assert!(c.p(1, ".Trash-0/files/p0.jpg").exists());
    assert!(!c.p(0, ".Trash-0").exists(), "the trash folder travelled");
    // Restoring it (moving it back) syncs it back.
    fs::rename(c.p(1, ".Trash-0/files/p0.jpg"), c.p(1, "photos/p0.jpg")).unwrap();
    c.wait("the restored file is back on A", || {
        fs::read(c.p(0, "photos/p0.jpg"))
            .map(|b| b.len())
            .unwrap_or(0)
            == 20_000
    });
}

/// A file read over and over on one device while another device grows it by a byte at a
/// time: every version arrives whole. An open racing the apply read the old size, then
/// opened the new content and cut it to that size ("a crash can leave content past the
/// committed size"), so the receiving device kept the new bytes minus the last one.
#[test]
fn a_file_read_in_a_loop_while_it_grows_elsewhere_arrives_whole() {
    let c = Cluster::new(2);
    let (a, b) = (c.p(0, "probe.txt"), c.p(1, "probe.txt"));
    fs::write(&a, b"probe start\n").unwrap();
    c.wait("the first version", || {
        fs::read(&b).ok().as_deref() == Some(&b"probe start\n"[..])
    });
    for i in 0..20 {
        let data = format!("probe {i:06}{}\n", "+".repeat(i));
        {
            use std::io::Write;
            let mut f = fs::OpenOptions::new().write(true).open(&a).unwrap();
            f.write_all(data.as_bytes()).unwrap();
        }
        // Read as fast as a poller does, so that opens race the apply.
        let start = std::time::Instant::now();
        loop {
            if fs::read(&b).ok().as_deref() == Some(data.as_bytes()) {
                break;
            }
            if start.elapsed() > std::time::Duration::from_secs(30) {
                let got = fs::read(&b).unwrap_or_default();
                c.fail(&format!(
                    "version {i} did not arrive whole: {:?} (want {data:?})",
                    String::from_utf8_lossy(&got)
                ));
            }
            std::thread::sleep(std::time::Duration::from_micros(500));
        }
    }
}
