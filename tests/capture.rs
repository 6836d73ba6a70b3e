//! Change capture through a real mount: edits made through the kernel become the expected
//! ops in the outbox, and replaying the outbox onto an empty previous state reproduces
//! the mounted tree byte for byte.

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;

use common::replay::{assert_replay_matches_except, kinds, object_of, ops_on, outbox, settle};
use common::Mounted;
use deltadrive::changelog::{Delta, OpKind, Transaction};

/// The mounted tree equals the replayed outbox (nothing excluded).
fn assert_replay_matches(m: &Mounted) -> Vec<Transaction> {
    assert_replay_matches_except(m, &|_| false)
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

#[test]
fn in_place_edits_travel_as_their_bytes() {
    let mut m = Mounted::new();
    let p = m.path("db.bin");
    fs::write(&p, data(3 << 20, 1)).unwrap();
    settle(&mut m);
    let before = outbox(&m.home).len();

    // Each edit is sealed at its close; FUSE delivers the close (RELEASE) asynchronously, so
    // wait for it before the next edit, or the two coalesce into one delta (also correct).
    let sealed = |n: usize| {
        let start = std::time::Instant::now();
        while outbox(&m.home).len() < n {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(20),
                "edit {n} not sealed"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    // One byte in the middle: a Ranges delta of one byte.
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(b"Z", 1_500_000).unwrap();
    drop(f);
    sealed(before + 1);
    // Append.
    let mut f = OpenOptions::new().append(true).open(&p).unwrap();
    f.write_all(b"appended tail").unwrap();
    drop(f);
    sealed(before + 2);
    // Truncate.
    OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    sealed(before + 3);
    settle(&mut m);

    let txs = assert_replay_matches(&m);
    let obj = object_of(&txs, "db.bin");
    let writes: Vec<&Delta> = txs[before..]
        .iter()
        .flat_map(|t| &t.ops)
        .filter(|o| o.object == obj)
        .filter_map(|o| match &o.kind {
            OpKind::Write { delta, .. } => Some(delta),
            _ => None,
        })
        .collect();
    assert_eq!(
        writes.len(),
        3,
        "one write per close: {:?}",
        writes
            .iter()
            .map(|d| deltadrive::delta::Strategy::of(d))
            .collect::<Vec<_>>()
    );
    match writes[0] {
        Delta::Ranges { ranges, .. } => {
            assert_eq!(ranges.len(), 1);
            assert_eq!(ranges[0].0, 1_500_000);
            assert_eq!(ranges[0].1, b"Z");
        }
        d => panic!(
            "in-place edit should be a Ranges delta, got {:?}",
            std::mem::discriminant(d)
        ),
    }
    match writes[1] {
        Delta::Ranges { ranges, new_size } => {
            assert_eq!(*new_size, (3 << 20) + 13);
            assert_eq!(ranges.iter().map(|(_, b)| b.len()).sum::<usize>(), 13);
        }
        _ => panic!("append should be a Ranges delta"),
    }
    match writes[2] {
        Delta::Ranges { ranges, new_size } => {
            assert_eq!(*new_size, 2 << 20);
            assert!(ranges.is_empty());
        }
        _ => panic!("truncate should be a Ranges delta with no bytes"),
    }
}

#[test]
fn thousands_of_scattered_writes_travel_as_their_bytes() {
    // A database's page writes between two syncs: 8,000 separate 16-byte writes. Past the
    // old limit of 4,096 dirty ranges the file counted as rewritten and went as an rsync
    // delta of most of its blocks.
    let mut m = Mounted::new();
    let p = m.path("pages.db");
    fs::write(&p, data(16 << 20, 5)).unwrap();
    settle(&mut m);
    let before = outbox(&m.home).len();
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    for i in 0..8_000u64 {
        f.write_all_at(&[(i % 251) as u8 ^ 0x5a; 16], i * 2048 + 7)
            .unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    settle(&mut m);

    let txs = assert_replay_matches(&m);
    let obj = object_of(&txs, "pages.db");
    let sent: Vec<(usize, usize)> = ops_on(&txs[before..], obj)
        .iter()
        .filter_map(|k| match k {
            OpKind::Write {
                delta: Delta::Ranges { ranges, .. },
                ..
            } => Some((ranges.len(), ranges.iter().map(|(_, b)| b.len()).sum())),
            OpKind::Write { .. } => panic!("expected Ranges writes, got {:?}", kinds(&[*k])),
            _ => None,
        })
        .collect();
    let (ranges, bytes) = sent
        .iter()
        .fold((0, 0), |(r, b), (r2, b2)| (r + r2, b + b2));
    assert_eq!(bytes, 8_000 * 16, "exactly the written bytes travel");
    assert_eq!(ranges, 8_000);
}

#[test]
fn temp_file_and_rename_is_an_edit_of_the_original() {
    let mut m = Mounted::new();
    fs::create_dir(m.path("docs")).unwrap();
    fs::write(m.path("docs/report.txt"), data(200_000, 2)).unwrap();
    settle(&mut m);
    let before = outbox(&m.home).len();

    // gedit / VS Code: write a temp file, fsync it, rename it over the original.
    let mut new = data(200_000, 2);
    new.splice(100_000..100_000, b"inserted paragraph".iter().copied());
    let tmp = m.path("docs/.goutputstream-XYZ123");
    let mut f = fs::File::create(&tmp).unwrap();
    f.write_all(&new).unwrap();
    f.sync_all().unwrap();
    drop(f);
    fs::rename(&tmp, m.path("docs/report.txt")).unwrap();
    settle(&mut m);

    let txs = assert_replay_matches(&m);
    assert_small_rsync_edit_of(&txs[before..], &txs, "report.txt");
    assert_eq!(fs::read(m.path("docs/report.txt")).unwrap(), new);
}

/// After an editor's save: no create or delete (the temp file was never announced on its
/// own), and the original object took a small rsync Write.
fn assert_small_rsync_edit_of(after_save: &[Transaction], all: &[Transaction], name: &str) {
    let after: Vec<&OpKind> = after_save
        .iter()
        .flat_map(|t| &t.ops)
        .map(|o| &o.kind)
        .collect();
    assert!(
        after
            .iter()
            .all(|k| !matches!(k, OpKind::Create { .. } | OpKind::Delete)),
        "no create or delete: {:?}",
        kinds(&after)
    );
    let obj = object_of(all, name);
    match ops_on(after_save, obj)
        .iter()
        .find(|k| matches!(k, OpKind::Write { .. }))
    {
        Some(OpKind::Write {
            delta: Delta::Rsync(d),
            ..
        }) => {
            assert!(
                d.len() < 20_000,
                "rsync delta of an insertion is small: {} bytes",
                d.len()
            )
        }
        other => panic!(
            "expected an rsync Write on the original object, got {:?}",
            other.map(|k| kinds(&[*k]))
        ),
    }
}

#[test]
fn a_temp_file_written_slowly_is_still_an_edit_of_the_original() {
    // An editor that creates its temp file, then takes longer than the quiet period to
    // write and fsync it (a big file), then renames it over the original.
    let mut m = Mounted::new();
    fs::write(m.path("big.txt"), data(300_000, 4)).unwrap();
    settle(&mut m);
    let before = outbox(&m.home).len();

    let mut new = data(300_000, 4);
    new.splice(150_000..150_000, b"a new paragraph".iter().copied());
    let tmp = m.path("big.txt.tmp");
    let mut f = fs::File::create(&tmp).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1200));
    f.write_all(&new[..100_000]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1200));
    f.write_all(&new[100_000..]).unwrap();
    f.sync_all().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1200));
    drop(f);
    fs::rename(&tmp, m.path("big.txt")).unwrap();
    settle(&mut m);

    let txs = assert_replay_matches(&m);
    assert_small_rsync_edit_of(&txs[before..], &txs, "big.txt");
    assert_eq!(fs::read(m.path("big.txt")).unwrap(), new);
}

#[test]
fn vim_like_save_is_an_edit_of_the_original() {
    let mut m = Mounted::new();
    fs::write(m.path("notes.md"), data(100_000, 3)).unwrap();
    settle(&mut m);
    let before = outbox(&m.home).len();

    // vim (backupcopy=no): rename the original to a backup, write a new file, delete the backup;
    // a swap file comes and goes meanwhile.
    fs::write(m.path(".notes.md.swp"), b"swap").unwrap();
    fs::rename(m.path("notes.md"), m.path("notes.md~")).unwrap();
    let mut new = data(100_000, 3);
    new[50_000] = b'!';
    fs::write(m.path("notes.md"), &new).unwrap();
    fs::remove_file(m.path("notes.md~")).unwrap();
    fs::remove_file(m.path(".notes.md.swp")).unwrap();
    settle(&mut m);

    let txs = assert_replay_matches(&m);
    let obj = object_of(&txs, "notes.md");
    let after: Vec<&OpKind> = txs[before..]
        .iter()
        .flat_map(|t| &t.ops)
        .map(|o| &o.kind)
        .collect();
    assert!(
        after.iter().all(|k| !matches!(
            k,
            OpKind::Create { .. } | OpKind::Delete | OpKind::Rename { .. }
        )),
        "the save is one edit: {:?}",
        kinds(&after)
    );
    assert!(ops_on(&txs[before..], obj)
        .iter()
        .any(|k| matches!(k, OpKind::Write { .. })));
}

#[test]
fn libreoffice_like_save_is_an_edit_and_lock_files_never_travel() {
    let mut m = Mounted::new();
    fs::write(m.path("budget.ods"), data(300_000, 4)).unwrap();
    settle(&mut m);
    let before = outbox(&m.home).len();

    // LibreOffice: a lock file, a temp file in the same folder, rename the original to a
    // backup name, rename the temp over, delete the backup and the lock.
    fs::write(m.path(".~lock.budget.ods#"), b"user,host").unwrap();
    let mut new = data(300_000, 4);
    for i in (0..new.len()).step_by(10_000) {
        new[i] ^= 0xff;
    }
    fs::write(m.path("lu12345abc.tmp"), &new).unwrap();
    fs::rename(m.path("budget.ods"), m.path("budget.ods.bak")).unwrap();
    fs::rename(m.path("lu12345abc.tmp"), m.path("budget.ods")).unwrap();
    fs::remove_file(m.path("budget.ods.bak")).unwrap();
    fs::remove_file(m.path(".~lock.budget.ods#")).unwrap();
    settle(&mut m);

    let txs = assert_replay_matches(&m);
    let after: Vec<&OpKind> = txs[before..]
        .iter()
        .flat_map(|t| &t.ops)
        .map(|o| &o.kind)
        .collect();
    assert!(
        after.iter().all(|k| !matches!(
            k,
            OpKind::Create { .. } | OpKind::Delete | OpKind::Rename { .. }
        )),
        "the save is one edit: {:?}",
        kinds(&after)
    );
    let obj = object_of(&txs, "budget.ods");
    assert!(ops_on(&txs[before..], obj)
        .iter()
        .any(|k| matches!(k, OpKind::Write { .. })));
}

#[test]
fn a_tree_of_changes_replays_exactly() {
    let mut m = Mounted::new();
    fs::create_dir_all(m.path("a/b/c")).unwrap();
    fs::write(m.path("a/b/c/one.txt"), b"one").unwrap();
    fs::write(m.path("a/two.bin"), data(500_000, 5)).unwrap();
    std::os::unix::fs::symlink("b/c/one.txt", m.path("a/link")).unwrap();
    settle(&mut m);
    // Moves across folders, a folder rename, deletes, a mode change, a rewrite, a new tree.
    fs::rename(m.path("a/b/c/one.txt"), m.path("a/one-moved.txt")).unwrap();
    fs::rename(m.path("a/b"), m.path("a/bee")).unwrap();
    fs::remove_file(m.path("a/link")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(m.path("a/two.bin"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(m.path("a/two.bin"), data(400_000, 6)).unwrap();
    fs::create_dir_all(m.path("new/deep/er")).unwrap();
    for i in 0..20 {
        fs::write(m.path(&format!("new/deep/er/f{i}")), format!("file {i}")).unwrap();
    }
    fs::remove_dir(m.path("a/bee/c")).unwrap();
    settle(&mut m);
    assert_replay_matches(&m);
}

#[test]
fn close_commits_an_edit_at_once_and_new_files_wait_for_quiet() {
    // A long quiet period: only close/fsync commit points can produce outbox entries.
    let m = Mounted::with_args(&["--quiet-ms", "60000"]);
    fs::write(m.path("f"), data(100_000, 7)).unwrap();
    assert_eq!(
        outbox(&m.home).len(),
        0,
        "a new file waits for the quiet period"
    );
    drop(m);

    let mut m = Mounted::new();
    fs::write(m.path("f"), data(100_000, 7)).unwrap();
    settle(&mut m);
    let n = outbox(&m.home).len();
    m.unmount();
    m.extra_args = vec!["--quiet-ms".into(), "60000".into()];
    m.mount();
    let f = OpenOptions::new().write(true).open(m.path("f")).unwrap();
    f.write_all_at(b"edit", 10).unwrap();
    drop(f);
    assert_eq!(outbox(&m.home).len(), n + 1, "the close committed the edit");
}

#[test]
fn big_and_sparse_files_travel_as_their_data_and_replay_exactly() {
    let mut m = Mounted::new();
    let p = m.path("disk.img");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    f.set_len(100 << 20).unwrap();
    f.write_all_at(&data(3 << 20, 8), 10 << 20).unwrap();
    f.write_all_at(b"middle", 55 << 20).unwrap();
    f.write_all_at(&data(40 << 20, 9), 58 << 20).unwrap();
    drop(f);
    settle(&mut m);
    let txs = assert_replay_matches(&m);
    let sent: usize = txs
        .iter()
        .flat_map(|t| &t.ops)
        .map(|o| match &o.kind {
            OpKind::Write {
                delta: Delta::Ranges { ranges, .. },
                ..
            } => ranges.iter().map(|(_, b)| b.len()).sum(),
            OpKind::Write {
                delta: Delta::Whole(b) | Delta::Rsync(b),
                ..
            } => b.len(),
            _ => 0,
        })
        .sum();
    assert!(
        sent < 50 << 20,
        "holes are not sent: {sent} bytes for 43 MiB of data"
    );
    // Rewritten whole with different, smaller content: the base is cut first.
    fs::write(&p, data(35 << 20, 10)).unwrap();
    settle(&mut m);
    assert_replay_matches(&m);
}

#[test]
fn a_big_rewrite_with_new_bytes_goes_in_chunks_not_one_oversized_op() {
    // Found by the benchmark: a 1 GiB file rewritten with bytes the rsync delta could not
    // match made one op larger than a change log may carry, and its seal failed for ever.
    let mut m = Mounted::new();
    let p = m.path("video.bin");
    fs::write(&p, data(160 << 20, 11)).unwrap();
    settle(&mut m);
    let before = outbox(&m.home).len();
    // An editor's save: a new file renamed over the old one, every byte different.
    let tmp = m.path(".video.bin.tmp");
    fs::write(&tmp, data(160 << 20, 12)).unwrap();
    fs::rename(&tmp, &p).unwrap();
    settle(&mut m);
    let txs = assert_replay_matches(&m);
    assert!(txs.len() > before, "the rewrite was sealed");
    for op in txs[before..].iter().flat_map(|t| &t.ops) {
        if let OpKind::Write { delta, .. } = &op.kind {
            let len: usize = match delta {
                Delta::Whole(b) | Delta::Rsync(b) => b.len(),
                Delta::Ranges { ranges, .. } => ranges.iter().map(|(_, b)| b.len()).sum(),
            };
            assert!(len <= 32 << 20, "one op carries {len} bytes");
        }
    }
}
