//! Names sync exactly (issue 15): hard links, renames over files and folders, exchanges and
//! folders removed and made again, made on one device's real mount, end the same on a second
//! device of the same user (its own `--home`, its own mount), name by name: type, mode, size
//! and content, symlink target, and which names share an inode (a hard link stays a hard link
//! there, with the same link count). No local change may wedge sync: after each case a later
//! change still travels and `status` shows nothing stuck.
//!
//! The last two tests run a seeded random mix of create, write, mkdir, rmdir, link, unlink,
//! rename (also over files and empty folders), exchange, chmod and symlink, on one device and
//! then on both at once, and compare the trees once they settle. CI runs a few fixed seeds;
//! run more by hand:
//!
//! ```text
//! DELTADRIVE_NAMES_SEED=1..40 DELTADRIVE_NAMES_OPS=1000 \
//!   cargo test --test names -- --test-threads 1 a_random_mix
//! ```
//!
//! `DELTADRIVE_NAMES_SEED` is a seed, a list (`4,9,17`) or a range (`1..40`, end excluded);
//! `DELTADRIVE_NAMES_OPS` is the number of operations per device and seed (default 300).
//! A failure prints the seed, the replay command and every operation with its outcome.
//!
//! On a failure every test prints the logs of the server and of every mount.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::cluster::{idle, status_json, Cluster};
use common::mix::{hash, names, ops_per_seed, print_ops, replay_hint, seeds, Mix, Name};
use common::renameat2;

/// Waits until every device shows the same names with nothing left to seal or send, checks
/// that every link count is the number of names on the inode, and returns the tree.
fn settle(c: &Cluster, what: &str) -> BTreeMap<String, Name> {
    let t = c.converge_by(what, names);
    for (rel, n) in &t {
        if let Name::File { nlink, names, .. } | Name::Symlink { nlink, names, .. } = n {
            if *nlink != names.len() as u64 {
                c.fail(&format!(
                    "{what}: {rel} has link count {nlink} but the names {names:?}"
                ));
            }
        }
    }
    t
}

/// The names of a tree that start with `prefix`.
fn under<'a>(t: &'a BTreeMap<String, Name>, prefix: &str) -> Vec<&'a str> {
    t.keys()
        .filter(|k| k.starts_with(prefix))
        .map(String::as_str)
        .collect()
}

/// The names sharing an inode with `rel` in a settled tree (panics if it is a folder).
fn group<'a>(t: &'a BTreeMap<String, Name>, rel: &str) -> &'a [String] {
    match t.get(rel) {
        Some(Name::File { names, .. } | Name::Symlink { names, .. }) => names,
        other => panic!("{rel} is not a file: {other:?}"),
    }
}

/// No device is stuck: nothing unsealed or unsent, nothing set aside, and no mount log says
/// that a local change did not apply to its own tree.
fn assert_nothing_stuck(c: &Cluster, what: &str) {
    for (i, d) in c.devices.iter().enumerate() {
        let st = status_json(&d.home);
        let set_aside = st
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.contains("aside") || k.contains("stuck"))
            .any(|(_, v)| {
                v.as_array().is_some_and(|a| !a.is_empty())
                    || v.as_u64().is_some_and(|n| n > 0)
                    || v["count"].as_u64().is_some_and(|n| n > 0)
            });
        if !idle(&d.home) || set_aside {
            c.fail(&format!("{what}: dev{i} is not idle: {st}"));
        }
        let log = fs::read_to_string(d.home.join("mount.log")).unwrap_or_default();
        if let Some(line) = log.lines().find(|l| {
            l.contains("does not apply to the local tree") || l.contains("local store is corrupt")
        }) {
            c.fail(&format!("{what}: dev{i} could not seal a change: {line}"));
        }
    }
}

/// A later change still travels (sync is not wedged): `size` bytes written on device 0.
fn a_later_file_still_arrives(c: &Cluster, rel: &str, size: usize) {
    let body: Vec<u8> = (0..size as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    fs::write(c.p(0, rel), &body).unwrap();
    let t = settle(c, &format!("{rel} written after it"));
    assert!(
        matches!(t.get(rel), Some(Name::File { hash: h, .. }) if *h == hash(&body)),
        "{rel}: {:?}",
        t.get(rel)
    );
    assert_nothing_stuck(c, rel);
}

#[test]
fn link_then_unlink_of_the_first_name_leaves_the_second_name_everywhere() {
    let c = Cluster::new(2);
    // Quickly, as `echo x > orig; ln orig final; rm orig` does: one seal sees it all.
    fs::create_dir(c.p(0, "quick")).unwrap();
    fs::write(c.p(0, "quick/orig"), b"x\n").unwrap();
    fs::hard_link(c.p(0, "quick/orig"), c.p(0, "quick/final")).unwrap();
    fs::remove_file(c.p(0, "quick/orig")).unwrap();
    // Slowly: each step reaches the other device before the next.
    fs::create_dir(c.p(0, "slow")).unwrap();
    fs::write(c.p(0, "slow/orig"), b"slow content").unwrap();
    settle(&c, "the first name");
    fs::hard_link(c.p(0, "slow/orig"), c.p(0, "slow/final")).unwrap();
    let t = settle(&c, "the second name");
    assert_eq!(group(&t, "slow/orig"), ["slow/final", "slow/orig"]);
    fs::remove_file(c.p(0, "slow/orig")).unwrap();
    let t = settle(&c, "the first name removed");
    assert_eq!(
        under(&t, ""),
        ["quick", "quick/final", "slow", "slow/final"]
    );
    assert_eq!(fs::read(c.p(1, "quick/final")).unwrap(), b"x\n");
    assert_eq!(fs::read(c.p(1, "slow/final")).unwrap(), b"slow content");
    // The remaining name is an ordinary file: an edit on B comes back to A.
    fs::write(c.p(1, "quick/final"), b"edited on B").unwrap();
    settle(&c, "an edit of the remaining name");
    assert_eq!(fs::read(c.p(0, "quick/final")).unwrap(), b"edited on B");
    assert_nothing_stuck(&c, "after link and unlink");
}

#[test]
fn a_temp_name_linked_to_a_normal_name_arrives_under_the_normal_name() {
    let c = Cluster::new(2);
    fs::write(c.p(0, ".deltaignore"), b"*.tmp\n").unwrap();
    settle(&c, "the rules");
    // A `.deltaignore` temp name and a built-in one (`*.part`), each linked to a normal name.
    fs::write(c.p(0, "x.tmp"), b"made under a temp name").unwrap();
    fs::hard_link(c.p(0, "x.tmp"), c.p(0, "x.txt")).unwrap();
    fs::write(c.p(0, "movie.part"), vec![3u8; 100_000]).unwrap();
    fs::hard_link(c.p(0, "movie.part"), c.p(0, "movie.mkv")).unwrap();
    c.wait("the normal names reach B", || {
        fs::read(c.p(1, "x.txt")).ok().as_deref() == Some(&b"made under a temp name"[..])
            && fs::read(c.p(1, "movie.mkv")).ok() == Some(vec![3u8; 100_000])
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(!c.p(1, "x.tmp").exists(), "an ignored name travelled");
    assert!(!c.p(1, "movie.part").exists(), "an ignored name travelled");
    // Unlinking the temp names changes nothing on B.
    fs::remove_file(c.p(0, "x.tmp")).unwrap();
    fs::remove_file(c.p(0, "movie.part")).unwrap();
    let t = settle(&c, "temp names unlinked");
    assert_eq!(under(&t, ""), [".deltaignore", "movie.mkv", "x.txt"]);

    // Maildir delivery: write in tmp/, link into new/, unlink from tmp/, five times quickly.
    for d in ["Maildir", "Maildir/tmp", "Maildir/new", "Maildir/cur"] {
        fs::create_dir(c.p(0, d)).unwrap();
    }
    for i in 0..5 {
        let (tmp, new) = (
            format!("Maildir/tmp/{i}.M1P2.host"),
            format!("Maildir/new/{i}.M1P2.host"),
        );
        fs::write(c.p(0, &tmp), format!("Subject: message {i}\n\nbody {i}\n")).unwrap();
        fs::hard_link(c.p(0, &tmp), c.p(0, &new)).unwrap();
        fs::remove_file(c.p(0, &tmp)).unwrap();
    }
    let t = settle(&c, "maildir delivery");
    assert_eq!(under(&t, "Maildir/tmp/"), Vec::<&str>::new());
    assert_eq!(under(&t, "Maildir/new/").len(), 5, "{t:#?}");
    for i in 0..5 {
        assert_eq!(
            fs::read_to_string(c.p(1, &format!("Maildir/new/{i}.M1P2.host"))).unwrap(),
            format!("Subject: message {i}\n\nbody {i}\n")
        );
    }
    // The reader moves a message from new/ to cur/ the same way.
    fs::hard_link(
        c.p(1, "Maildir/new/0.M1P2.host"),
        c.p(1, "Maildir/cur/0.M1P2.host:2,S"),
    )
    .unwrap();
    fs::remove_file(c.p(1, "Maildir/new/0.M1P2.host")).unwrap();
    let t = settle(&c, "a message read on B");
    assert_eq!(under(&t, "Maildir/cur/"), ["Maildir/cur/0.M1P2.host:2,S"]);
    assert_nothing_stuck(&c, "after temp names");
}

#[test]
fn cp_al_makes_hard_links_on_every_device_and_an_edit_shows_through_every_name() {
    let c = Cluster::new(2);
    fs::create_dir_all(c.p(0, "dir/sub")).unwrap();
    fs::write(c.p(0, "dir/f"), b"first file").unwrap();
    fs::write(c.p(0, "dir/g"), vec![9u8; 200_000]).unwrap();
    fs::write(c.p(0, "dir/sub/h"), b"in a subfolder").unwrap();
    settle(&c, "the folder");
    let out = Command::new("cp")
        .arg("-al")
        .arg(c.p(0, "dir"))
        .arg(c.p(0, "dir2"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = settle(&c, "cp -al");
    assert_eq!(
        under(&t, "dir"),
        [
            "dir",
            "dir/f",
            "dir/g",
            "dir/sub",
            "dir/sub/h",
            "dir2",
            "dir2/f",
            "dir2/g",
            "dir2/sub",
            "dir2/sub/h"
        ]
    );
    assert_eq!(group(&t, "dir/sub/h"), ["dir/sub/h", "dir2/sub/h"]);
    // On B, `stat` shows one inode with two links for both names.
    for f in ["f", "g", "sub/h"] {
        let (a, b) = (
            fs::metadata(c.p(1, &format!("dir/{f}"))).unwrap(),
            fs::metadata(c.p(1, &format!("dir2/{f}"))).unwrap(),
        );
        assert_eq!(
            (a.ino(), a.nlink()),
            (b.ino(), 2),
            "dir/{f} and dir2/{f} on B"
        );
    }
    // An edit through dir2/f on B shows through dir/f on B at once, and reaches A as both.
    fs::write(c.p(1, "dir2/f"), b"edited through the second name on B").unwrap();
    assert_eq!(
        fs::read(c.p(1, "dir/f")).unwrap(),
        b"edited through the second name on B"
    );
    let t = settle(&c, "an edit through the second name");
    for name in ["dir/f", "dir2/f"] {
        assert_eq!(
            fs::read(c.p(0, name)).unwrap(),
            b"edited through the second name on B",
            "{name} on A"
        );
    }
    assert_eq!(group(&t, "dir/f"), ["dir/f", "dir2/f"]);
    assert_nothing_stuck(&c, "after cp -al");
}

#[test]
fn a_folder_renamed_over_an_empty_folder_never_wedges_sync() {
    let c = Cluster::new(2);
    // `mkdir -p d1/x d2; mv -T d1 d2`, all before the first seal.
    fs::create_dir_all(c.p(0, "d1/x")).unwrap();
    fs::create_dir(c.p(0, "d2")).unwrap();
    fs::write(c.p(0, "d1/x/f"), b"in the moved folder").unwrap();
    fs::rename(c.p(0, "d1"), c.p(0, "d2")).unwrap();
    let t = settle(&c, "mv -T d1 d2");
    assert_eq!(under(&t, ""), ["d2", "d2/x", "d2/x/f"]);
    // The same once both folders are on B.
    fs::create_dir_all(c.p(0, "e1/x")).unwrap();
    fs::create_dir(c.p(0, "e2")).unwrap();
    settle(&c, "e1 and e2");
    fs::rename(c.p(0, "e1"), c.p(0, "e2")).unwrap();
    let t = settle(&c, "mv -T e1 e2");
    assert_eq!(under(&t, "e"), ["e2", "e2/x"]);
    a_later_file_still_arrives(&c, "after-the-rename.bin", 8 << 20);
}

/// `mkdir d; sleep 1.5; rmdir d; mkdir d`, then `mkdir -p d/e; touch d/e/f; sleep 1.5;
/// rm -rf d; mkdir d; touch d/g` (the "clean and recreate" of build scripts), in `at`.
fn recreate_folders(c: &Cluster, at: &str) {
    let d = c.p(0, at);
    fs::create_dir(&d).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    fs::remove_dir(&d).unwrap();
    fs::create_dir(&d).unwrap();
    fs::create_dir_all(d.join("e")).unwrap();
    fs::write(d.join("e/f"), b"").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    fs::remove_dir_all(&d).unwrap();
    fs::create_dir(&d).unwrap();
    fs::write(d.join("g"), b"").unwrap();
}

#[test]
fn a_folder_removed_and_made_again_never_wedges_sync() {
    let mut c = Cluster::new(2);
    recreate_folders(&c, "d");
    let t = settle(&c, "d made again");
    assert_eq!(under(&t, ""), ["d", "d/g"]);
    a_later_file_still_arrives(&c, "later.txt", 1000);
    // Again, with A unmounted right after (its seal then runs at the next mount).
    recreate_folders(&c, "r");
    c.devices[0].unmount();
    c.devices[0].mount();
    let t = settle(&c, "r made again, then a remount");
    assert_eq!(under(&t, "r"), ["r", "r/g"]);
    a_later_file_still_arrives(&c, "after-the-remount.txt", 1000);
}

#[test]
fn renames_the_kernel_accepts_sync_exactly() {
    let c = Cluster::new(2);
    let setup = |at: &str| {
        for d in ["", "/folder", "/other"] {
            fs::create_dir(c.p(0, &format!("{at}{d}"))).unwrap();
        }
        for (f, body) in [
            ("/file", "file"),
            ("/folder/inside", "inside"),
            ("/other/o", "o"),
            ("/a", "a"),
            ("/b", "b"),
            ("/c", "c"),
            ("/keep", "keep"),
        ] {
            fs::write(c.p(0, &format!("{at}{f}")), body).unwrap();
        }
    };
    let renames = |at: &str| {
        let p = |r: &str| c.p(0, &format!("{at}/{r}"));
        // A file and a folder trade places, then two folders, then two files.
        renameat2(&p("file"), &p("folder"), libc::RENAME_EXCHANGE).unwrap();
        renameat2(&p("file"), &p("other"), libc::RENAME_EXCHANGE).unwrap();
        renameat2(&p("a"), &p("b"), libc::RENAME_EXCHANGE).unwrap();
        // RENAME_NOREPLACE: refused over a name, done to a free one.
        assert_eq!(
            renameat2(&p("c"), &p("keep"), libc::RENAME_NOREPLACE),
            Err(libc::EEXIST)
        );
        renameat2(&p("c"), &p("c2"), libc::RENAME_NOREPLACE).unwrap();
        // A file over a file.
        fs::rename(p("b"), p("keep")).unwrap();
    };
    // All before the first seal, then each one after the other device has the setup.
    setup("fast");
    renames("fast");
    setup("slow");
    settle(&c, "the setup");
    renames("slow");
    let t = settle(&c, "the renames");
    for at in ["fast", "slow"] {
        let want: Vec<String> = [
            "",
            "/a",
            "/c2",
            "/file",
            "/file/o",
            "/folder",
            "/keep",
            "/other",
            "/other/inside",
        ]
        .iter()
        .map(|r| format!("{at}{r}"))
        .collect();
        assert_eq!(under(&t, at), want, "{at}");
        // What each name holds now: the folders traded places twice, `b` went over `keep`.
        for (name, body) in [
            ("folder", "file"),
            ("file/o", "o"),
            ("other/inside", "inside"),
            ("keep", "a"),
            ("a", "b"),
            ("c2", "c"),
        ] {
            assert_eq!(
                fs::read_to_string(c.p(1, &format!("{at}/{name}"))).unwrap(),
                body,
                "{at}/{name} on B"
            );
        }
    }
    a_later_file_still_arrives(&c, "later.txt", 1000);
}

/// Runs git in `dir` with its own identity and no user or system configuration.
fn git(home: &Path, dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "safe.directory=*", "-c", "gc.auto=0"])
        .args(args)
        .current_dir(dir)
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "Ann Test")
        .env("GIT_AUTHOR_EMAIL", "ann@example.org")
        .env("GIT_COMMITTER_NAME", "Ann Test")
        .env("GIT_COMMITTER_EMAIL", "ann@example.org")
        .env("GIT_AUTHOR_DATE", "2026-01-02T03:04:05Z")
        .env("GIT_COMMITTER_DATE", "2026-01-02T03:04:05Z")
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_git_working_copy_passes_fsck_on_the_other_device() {
    let c = Cluster::new(2);
    let home = tempfile::tempdir().unwrap();
    let (a, b) = (c.p(0, "proj"), c.p(1, "proj"));
    fs::create_dir(&a).unwrap();
    let g = |args: &[&str]| git(home.path(), &a, args);
    g(&["init", "-q", "-b", "main"]);
    fs::create_dir(a.join("src")).unwrap();
    for i in 0..6 {
        fs::write(a.join("README"), format!("readme, revision {i}\n")).unwrap();
        fs::write(
            a.join(format!("src/m{i}.rs")),
            format!("pub fn f{i}() {{}}\n").repeat(50),
        )
        .unwrap();
        g(&["add", "-A"]);
        g(&["commit", "-q", "-m", &format!("commit {i} on main")]);
    }
    g(&["checkout", "-q", "-b", "feature"]);
    for i in 0..3 {
        fs::write(a.join("src/feature.rs"), format!("// feature step {i}\n")).unwrap();
        g(&["add", "-A"]);
        g(&["commit", "-q", "-m", &format!("feature step {i}")]);
    }
    g(&["checkout", "-q", "main"]);
    g(&["branch", "-q", "spare"]);
    g(&["merge", "-q", "--no-ff", "-m", "merge feature", "feature"]);
    g(&["tag", "-a", "v1", "-m", "version 1"]);
    g(&["gc", "-q", "--aggressive"]);
    g(&["repack", "-q", "-ad"]);
    g(&["prune"]);
    // Loose objects again after the packing.
    fs::write(a.join("after-gc.txt"), "written after gc\n").unwrap();
    g(&["add", "-A"]);
    g(&["commit", "-q", "-m", "after gc"]);
    g(&["branch", "-D", "spare"]);
    settle(&c, "the repository");

    let gb = |args: &[&str]| git(home.path(), &b, args);
    gb(&["fsck", "--full", "--strict", "--no-dangling"]);
    let log = ["log", "--all", "--format=%H %P %s"];
    assert_eq!(gb(&log), g(&log));
    assert_eq!(gb(&["show-ref"]), g(&["show-ref"]));
    assert_eq!(
        gb(&["status", "--porcelain"]),
        "",
        "the working copy on B is not clean"
    );
    // B works on it too; A sees a sound repository.
    fs::write(b.join("from-b.txt"), "committed on B\n").unwrap();
    gb(&["add", "-A"]);
    gb(&["commit", "-q", "-m", "commit on B"]);
    settle(&c, "a commit on B");
    g(&["fsck", "--full", "--strict", "--no-dangling"]);
    assert_eq!(g(&log), gb(&log));
    assert_nothing_stuck(&c, "after git");
}

// ---- the random mix ----

#[test]
fn a_random_mix_on_one_device_ends_the_same_on_the_other() {
    let c = Cluster::new(2);
    let n = ops_per_seed();
    for seed in seeds(&[1, 2]) {
        let _hint = replay_hint(
            "names",
            "a_random_mix_on_one_device_ends_the_same_on_the_other",
            seed,
            n,
        );
        let at = format!("mix-{seed}");
        fs::create_dir(c.p(0, &at)).unwrap();
        let mut mix = Mix::new(seed, c.p(0, &at));
        let r = mix.run(n);
        print_ops(&format!("seed {seed} on dev0"), &mix.log);
        if let Err(e) = r {
            c.fail(&e);
        }
        settle(&c, &format!("seed {seed}"));
        assert_nothing_stuck(&c, &format!("seed {seed}"));
    }
    a_later_file_still_arrives(&c, "later.txt", 1000);
}

#[test]
fn a_random_mix_on_both_devices_at_once_ends_the_same_on_both() {
    let c = Cluster::new(2);
    let n = ops_per_seed();
    for seed in seeds(&[3]) {
        let _hint = replay_hint(
            "names",
            "a_random_mix_on_both_devices_at_once_ends_the_same_on_both",
            seed,
            n,
        );
        let at = format!("both-{seed}");
        fs::create_dir(c.p(0, &at)).unwrap();
        c.wait("the mix's folder reaches B", || c.p(1, &at).is_dir());
        let mut mixes = [
            Mix::new(seed, c.p(0, &at)),
            Mix::new(seed ^ 0x5eed_0000_0000, c.p(1, &at)),
        ];
        let results: Vec<Result<(), String>> = std::thread::scope(|s| {
            let handles: Vec<_> = mixes
                .iter_mut()
                .map(|m| s.spawn(move || m.run(n)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, m) in mixes.iter().enumerate() {
            print_ops(&format!("seed {seed} on dev{i}"), &m.log);
        }
        for r in results {
            if let Err(e) = r {
                c.fail(&e);
            }
        }
        // Conflicted copies are allowed: they are names like any other, on both devices.
        settle(&c, &format!("seed {seed} on both"));
        assert_nothing_stuck(&c, &format!("seed {seed} on both"));
    }
    a_later_file_still_arrives(&c, "later.txt", 1000);
}
