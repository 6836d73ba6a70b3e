//! Ignore rules and the sync status attribute, through real mounts: ignored paths never reach
//! the outbox, rules added or removed later take effect, the trash is a delete and a restore
//! is a create, editors' temp files keep their save patterns edits, and
//! `user.deltadrive.status` says what is ignored, waiting or synced.

mod common;

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::replay::{
    all_ops, assert_replay_matches_except, created_names, kinds, object_of, ops_on, outbox,
    pending, settle,
};
use common::server::TestServer;
use common::Mounted;
use deltadrive::changelog::OpKind;

const STATUS: &str = "user.deltadrive.status";

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn getxattr(p: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let (cp, cn) = (cpath(p), CString::new(name).unwrap());
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the length passed.
    let n = unsafe { libc::getxattr(cp.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// The sync status attribute of a path.
fn status(p: &Path) -> String {
    String::from_utf8(getxattr(p, STATUS).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

fn setxattr(p: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let (cp, cn) = (cpath(p), CString::new(name).unwrap());
    // SAFETY: valid C strings and a value of the length passed.
    let rc = unsafe {
        libc::setxattr(
            cp.as_ptr(),
            cn.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn removexattr(p: &Path, name: &str) -> std::io::Result<()> {
    let (cp, cn) = (cpath(p), CString::new(name).unwrap());
    // SAFETY: valid C strings.
    if unsafe { libc::removexattr(cp.as_ptr(), cn.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn listxattr(p: &Path) -> Vec<String> {
    let cp = cpath(p);
    let mut buf = vec![0u8; 4096];
    // SAFETY: a valid C string and a buffer of the length passed.
    let n = unsafe { libc::listxattr(cp.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "listxattr: {}", std::io::Error::last_os_error());
    buf[..n as usize]
        .split(|&c| c == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn deletes(txs: &[deltadrive::changelog::Transaction]) -> usize {
    all_ops(txs)
        .iter()
        .filter(|o| matches!(o.kind, OpKind::Delete))
        .count()
}

#[test]
fn ignored_paths_never_reach_the_outbox() {
    let mut m = Mounted::new();
    fs::write(m.path(".deltaignore"), "*.log\nbuild/\n").unwrap();
    fs::create_dir_all(m.path("build/deep")).unwrap();
    fs::write(m.path("build/out.bin"), data(100_000, 1)).unwrap();
    fs::write(m.path("build/deep/x.o"), b"object").unwrap();
    fs::create_dir(m.path("src")).unwrap();
    fs::write(m.path("src/main.rs"), b"fn main() {}\n").unwrap();
    fs::write(m.path("src/run.log"), b"a log line\n").unwrap();
    fs::write(m.path("app.log"), b"started\n").unwrap();
    fs::write(m.path("src/.main.rs.swp"), b"vim swap").unwrap();
    fs::write(m.path("#main.rs#"), b"emacs auto-save").unwrap();
    settle(&mut m);
    // Ignored files keep changing: still nothing travels.
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(m.path("app.log"))
        .unwrap();
    f.write_all(b"more\n").unwrap();
    f.sync_all().unwrap();
    drop(f);
    fs::write(m.path("build/deep/y.o"), b"another").unwrap();
    settle(&mut m);

    let skip =
        |p: &str| p.ends_with(".log") || p == "build" || p.ends_with(".swp") || p == "#main.rs#";
    let txs = assert_replay_matches_except(&m, &skip);
    assert_eq!(
        sorted(created_names(&txs)),
        [".deltaignore", "main.rs", "src"],
        "only what the rules let through is announced"
    );
    assert_eq!(pending(&m.home), 0, "ignored objects leave nothing pending");
    assert_eq!(fs::read(m.path("app.log")).unwrap(), b"started\nmore\n");
    assert_eq!(status(&m.path("app.log")), "ignored");
    assert_eq!(status(&m.path("build")), "ignored");
    assert_eq!(status(&m.path("build/deep/x.o")), "ignored");
    assert_eq!(status(&m.path("src/.main.rs.swp")), "ignored");
}

#[test]
fn rules_added_later_stop_syncing_and_removing_them_syncs_again() {
    let mut m = Mounted::new();
    fs::write(m.path("a.log"), b"first").unwrap();
    fs::write(m.path("notes.txt"), b"notes").unwrap();
    fs::create_dir_all(m.path("logs/2024")).unwrap();
    fs::write(m.path("logs/2024/1.txt"), b"one").unwrap();
    fs::write(m.path("logs/top.txt"), b"top").unwrap();
    settle(&mut m);
    let before = outbox(&m.home).len();
    let notes = object_of(&outbox(&m.home), "notes.txt");

    fs::write(m.path(".deltaignore"), "*.log\nlogs/\n").unwrap();
    settle(&mut m);
    let skip = |p: &str| p.ends_with(".log") || p == "logs";
    let txs = assert_replay_matches_except(&m, &skip);
    let after = &txs[before..];
    assert_eq!(created_names(after), [".deltaignore"]);
    assert_eq!(
        deletes(after),
        5,
        "a.log and logs/ with its content leave the synced tree: {:?}",
        kinds(&all_ops(after).iter().map(|o| &o.kind).collect::<Vec<_>>())
    );
    assert!(ops_on(after, notes).is_empty(), "notes.txt is untouched");
    assert_eq!(fs::read(m.path("logs/2024/1.txt")).unwrap(), b"one");
    assert_eq!(status(&m.path("a.log")), "ignored");
    assert_eq!(status(&m.path("logs/top.txt")), "ignored");

    // They are local files now.
    let n = outbox(&m.home).len();
    fs::write(m.path("a.log"), b"second").unwrap();
    fs::write(m.path("logs/new.txt"), b"new").unwrap();
    settle(&mut m);
    assert_eq!(
        outbox(&m.home).len(),
        n,
        "edits of ignored files stay local"
    );

    // Without the rules they sync again, as new objects with their current content.
    fs::remove_file(m.path(".deltaignore")).unwrap();
    settle(&mut m);
    let txs = assert_replay_matches_except(&m, &|_| false);
    assert_eq!(
        sorted(created_names(&txs[n..])),
        ["1.txt", "2024", "a.log", "logs", "new.txt", "top.txt"]
    );
    assert_ne!(object_of(&txs[n..], "a.log"), object_of(&txs, "a.log"));
}

#[test]
fn rules_in_a_subfolder_apply_below_it_only() {
    let mut m = Mounted::new();
    fs::create_dir_all(m.path("web/node_modules/lib")).unwrap();
    fs::write(m.path("web/.deltaignore"), "node_modules/\n*.tmp\n").unwrap();
    fs::write(m.path("web/node_modules/lib/index.js"), b"js").unwrap();
    fs::write(m.path("web/a.tmp"), b"t").unwrap();
    fs::write(m.path("b.tmp"), b"t").unwrap();
    fs::create_dir(m.path("node_modules")).unwrap();
    settle(&mut m);
    let skip = |p: &str| p == "web/node_modules" || p == "web/a.tmp";
    let txs = assert_replay_matches_except(&m, &skip);
    assert_eq!(
        sorted(created_names(&txs)),
        [".deltaignore", "b.tmp", "node_modules", "web"]
    );
    // The rule file moved away: its folder's rules go with it.
    fs::rename(m.path("web/.deltaignore"), m.path("web/rules.txt")).unwrap();
    settle(&mut m);
    assert_replay_matches_except(&m, &|_| false);
}

#[test]
fn trash_is_a_delete_and_restoring_is_a_create() {
    let mut m = Mounted::new();
    fs::create_dir(m.path("docs")).unwrap();
    let report = data(50_000, 3);
    fs::write(m.path("docs/report.txt"), &report).unwrap();
    fs::create_dir_all(m.path("proj/sub")).unwrap();
    fs::write(m.path("proj/a.txt"), b"a").unwrap();
    fs::write(m.path("proj/sub/b.txt"), b"b").unwrap();
    settle(&mut m);
    let before = outbox(&m.home).len();
    let report_id = object_of(&outbox(&m.home), "report.txt");

    // What `gio trash` does on a mount: move into TOPDIR/.Trash-UID/files, note the origin.
    fs::create_dir_all(m.path(".Trash-0/files")).unwrap();
    fs::create_dir_all(m.path(".Trash-0/info")).unwrap();
    fs::rename(
        m.path("docs/report.txt"),
        m.path(".Trash-0/files/report.txt"),
    )
    .unwrap();
    fs::write(
        m.path(".Trash-0/info/report.txt.trashinfo"),
        "[Trash Info]\nPath=docs/report.txt\n",
    )
    .unwrap();
    fs::rename(m.path("proj"), m.path(".Trash-0/files/proj")).unwrap();
    settle(&mut m);
    let skip = |p: &str| p.starts_with(".Trash-0");
    let txs = assert_replay_matches_except(&m, &skip);
    let after = &txs[before..];
    assert!(
        created_names(after).is_empty(),
        "nothing in the trash travels"
    );
    assert_eq!(ops_on(after, report_id).len(), 1);
    assert!(matches!(ops_on(after, report_id)[0], OpKind::Delete));
    assert_eq!(deletes(after), 5, "report.txt, proj, sub, a.txt, b.txt");
    assert_eq!(status(&m.path(".Trash-0/files/proj/sub/b.txt")), "ignored");

    // Restore both.
    let before = txs.len();
    fs::rename(
        m.path(".Trash-0/files/report.txt"),
        m.path("docs/report.txt"),
    )
    .unwrap();
    fs::remove_file(m.path(".Trash-0/info/report.txt.trashinfo")).unwrap();
    fs::rename(m.path(".Trash-0/files/proj"), m.path("proj")).unwrap();
    settle(&mut m);
    let txs = assert_replay_matches_except(&m, &skip);
    let after = &txs[before..];
    assert_eq!(
        sorted(created_names(after)),
        ["a.txt", "b.txt", "proj", "report.txt", "sub"]
    );
    assert_ne!(object_of(after, "report.txt"), report_id, "a new object");
    assert_eq!(fs::read(m.path("docs/report.txt")).unwrap(), report);
}

#[test]
fn editor_temp_files_stay_local_and_saves_stay_edits() {
    // A short quiet period, so seals run between the steps of each save.
    let mut m = Mounted::with_args(&["--quiet-ms", "100"]);
    fs::create_dir(m.path("docs")).unwrap();
    fs::write(m.path("docs/report.txt"), data(200_000, 2)).unwrap();
    fs::write(m.path("notes.md"), data(100_000, 3)).unwrap();
    settle(&mut m);
    let txs = outbox(&m.home);
    let before = txs.len();
    let (report, notes) = (object_of(&txs, "report.txt"), object_of(&txs, "notes.md"));

    // gedit: write .goutputstream-XXXXXX, fsync, rename it over the original.
    let mut new = data(200_000, 2);
    new.splice(100_000..100_000, b"inserted paragraph".iter().copied());
    let tmp = m.path("docs/.goutputstream-XYZ123");
    let mut f = fs::File::create(&tmp).unwrap();
    f.write_all(&new).unwrap();
    f.sync_all().unwrap();
    drop(f);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        outbox(&m.home).len(),
        before,
        "the temp file does not travel"
    );
    assert_eq!(pending(&m.home), 0, "nor does it stay pending");
    fs::rename(&tmp, m.path("docs/report.txt")).unwrap();

    // vim: swap file and its write test first, then backup, write, delete the backup.
    fs::write(m.path(".notes.md.swp"), b"swap").unwrap();
    fs::write(m.path("4913"), b"").unwrap();
    fs::remove_file(m.path("4913")).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    fs::rename(m.path("notes.md"), m.path("notes.md~")).unwrap();
    let mut notes_new = data(100_000, 3);
    notes_new[50_000] = b'!';
    fs::write(m.path("notes.md"), &notes_new).unwrap();
    fs::remove_file(m.path("notes.md~")).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    fs::remove_file(m.path(".notes.md.swp")).unwrap();
    settle(&mut m);

    let txs = assert_replay_matches_except(&m, &|_| false);
    let after: Vec<&OpKind> = all_ops(&txs[before..]).iter().map(|o| &o.kind).collect();
    assert!(
        after.iter().all(|k| !matches!(
            k,
            OpKind::Create { .. } | OpKind::Delete | OpKind::Rename { .. }
        )),
        "each save is one edit: {:?}",
        kinds(&after)
    );
    for obj in [report, notes] {
        assert!(ops_on(&txs[before..], obj)
            .iter()
            .any(|k| matches!(k, OpKind::Write { .. })));
    }
    assert_eq!(fs::read(m.path("docs/report.txt")).unwrap(), new);
}

#[test]
fn a_partial_download_travels_once_finished() {
    let mut m = Mounted::with_args(&["--quiet-ms", "100"]);
    let part = m.path("movie.mp4.part");
    let mut f = fs::File::create(&part).unwrap();
    f.write_all(&data(300_000, 4)).unwrap();
    f.sync_all().unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        outbox(&m.home).is_empty(),
        "the partial file does not travel"
    );
    f.write_all(&data(300_000, 5)).unwrap();
    drop(f);
    fs::rename(&part, m.path("movie.mp4")).unwrap();
    settle(&mut m);
    let txs = assert_replay_matches_except(&m, &|_| false);
    assert_eq!(created_names(&txs), ["movie.mp4"]);
}

#[test]
fn status_attribute_is_computed_read_only_and_not_listed() {
    // A long quiet period: a new file stays pending until the unmount seals it.
    let mut m = Mounted::with_args(&["--quiet-ms", "5000"]);
    let f = m.path("f.txt");
    fs::write(&f, b"hello").unwrap();
    assert_eq!(status(&f), "pending", "right after the write");
    fs::write(m.path("x.swp"), b"swap").unwrap();
    assert_eq!(status(&m.path("x.swp")), "ignored");
    fs::create_dir(m.path("build")).unwrap();
    fs::write(m.path("build/a.o"), b"o").unwrap();
    fs::write(m.path(".deltaignore"), "build/\n").unwrap();
    assert_eq!(status(&m.path("build")), "ignored", "rules apply at once");
    assert_eq!(status(&m.path("build/a.o")), "ignored");
    assert_eq!(status(&m.mp), "pending", "the root speaks for the device");

    // Read-only, and not listed.
    let err = setxattr(&f, STATUS, b"synced").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    let err = removexattr(&f, STATUS).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    setxattr(&f, "user.note", b"kept").unwrap();
    assert_eq!(listxattr(&f), ["user.note"]);
    assert!(listxattr(&m.path("build")).is_empty());

    // Reading it marks nothing and sends nothing.
    settle(&mut m);
    let n = outbox(&m.home).len();
    for _ in 0..20 {
        for p in ["f.txt", "x.swp", "build", "build/a.o", ".deltaignore"] {
            status(&m.path(p));
        }
        status(&m.mp);
    }
    assert_eq!(pending(&m.home), 0);
    settle(&mut m);
    let txs = outbox(&m.home);
    assert_eq!(txs.len(), n, "reads of the status made no change");
    assert!(
        !all_ops(&txs).iter().any(|o| matches!(
            &o.kind,
            OpKind::SetXattr { name, .. } if name.starts_with(b"user.deltadrive.")
        )),
        "the status is never synced as an attribute"
    );
    // Without a server nothing is acknowledged: what was sealed still waits.
    assert_eq!(status(&f), "pending");
    let conflicted = m.path("f (conflicted copy laptop 2025-01-02 030405).txt");
    fs::write(&conflicted, b"theirs").unwrap();
    assert_eq!(status(&conflicted), "pending");
}

#[test]
fn status_turns_synced_once_the_server_has_the_change() {
    let srv = TestServer::start();
    let mut m = Mounted::new();
    m.unmount();
    srv.login(&m.home, "ann", "laptop");
    m.mount();
    fs::create_dir(m.path("docs")).unwrap();
    fs::write(m.path("docs/a.txt"), b"hello, server").unwrap();
    fs::write(m.path("docs/a.txt~"), b"backup").unwrap();
    let start = Instant::now();
    let paths = [m.path("docs/a.txt"), m.path("docs"), m.mp.clone()];
    while paths.iter().any(|p| status(p) != "synced") {
        if start.elapsed() > Duration::from_secs(60) {
            srv.print_logs();
            panic!(
                "not synced within 60 s: {:?}",
                paths.iter().map(|p| status(p)).collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(status(&m.path("docs/a.txt~")), "ignored");
    // A name that looks like a conflicted copy does not make one: `conflict` comes from the
    // record of the copies the engine made (tests/sync.rs), so a hand-made one syncs as usual.
    let lookalike = m.path("docs/a (conflicted copy phone 2025-01-02 030405).txt");
    fs::write(&lookalike, b"theirs").unwrap();
    let start = Instant::now();
    while status(&lookalike) != "synced" {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the look-alike reads {}",
            status(&lookalike)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_rule_change_survives_a_crash_before_its_seal() {
    let mut m = Mounted::new();
    fs::write(m.path("a.log"), b"log").unwrap();
    fs::write(m.path("b.txt"), b"b").unwrap();
    settle(&mut m);
    let before = outbox(&m.home).len();
    m.unmount();
    m.extra_args = vec!["--quiet-ms".into(), "60000".into()];
    m.mount();
    fs::write(m.path(".deltaignore"), "*.log\n").unwrap();
    m.crash();
    m.extra_args.clear();
    m.mount();
    settle(&mut m);
    let txs = assert_replay_matches_except(&m, &|p| p.ends_with(".log"));
    assert_eq!(created_names(&txs[before..]), [".deltaignore"]);
    assert_eq!(deletes(&txs[before..]), 1, "a.log leaves the synced tree");
    assert_eq!(fs::read(m.path("a.log")).unwrap(), b"log");
}
