//! Store tests against a real RocksDB in a temp folder.

use super::*;

fn sample(ino: u64) -> Inode {
    Inode {
        ino,
        object: ObjectId::random(),
        kind: FileKind::File,
        perm: 0o4755,
        uid: 1000,
        gid: 100,
        nlink: 1,
        size: 5 << 30,
        atime: Timespec {
            secs: -5,
            nsec: 999_999_999,
        },
        mtime: Timespec {
            secs: 1_700_000_000,
            nsec: 123_456_789,
        },
        ctime: Timespec::now(),
        crtime: Timespec::now(),
        rdev: 0x0801,
        parent: ROOT_INO,
        flags: 0,
        symlink: b"target/with/slashes".to_vec(),
        name: b"a name".to_vec(),
        links: Vec::new(),
    }
}

#[test]
fn inode_record_round_trips() {
    let i = sample(42);
    assert_eq!(Inode::decode(42, &i.encode()).unwrap(), i);
    assert_eq!(i.encode()[0], 1, "one name: the layout older builds read");
    // Several names (hard links) keep every one of them.
    let mut linked = sample(43);
    linked.add_link(9, b"second");
    linked.add_link(ROOT_INO, b"third name");
    linked.nlink = 3;
    let enc = linked.encode();
    assert_eq!(enc[0], 2);
    let back = Inode::decode(43, &enc).unwrap();
    assert_eq!(back, linked);
    for cut in 0..enc.len() {
        let _ = Inode::decode(43, &enc[..cut]);
    }
}

#[test]
fn removing_the_first_name_promotes_the_oldest_other_link() {
    let mut i = sample(5);
    i.add_link(7, b"b");
    i.add_link(8, b"c");
    assert!(i.remove_link(ROOT_INO, b"a name"));
    assert_eq!((i.parent, i.name.as_slice()), (7, &b"b"[..]));
    assert_eq!(i.links, vec![(8, b"c".to_vec())]);
    assert!(!i.remove_link(ROOT_INO, b"a name"), "already gone");
    i.move_link(8, b"c", 9, b"d");
    let names: Vec<(u64, Vec<u8>)> = i.names().map(|(p, n)| (p, n.to_vec())).collect();
    assert_eq!(names, vec![(7, b"b".to_vec()), (9, b"d".to_vec())]);
}

#[test]
fn truncated_inode_record_is_an_error_not_a_panic() {
    let enc = sample(7).encode();
    for cut in 0..INODE_PREFIX_FOR_TEST {
        assert!(Inode::decode(7, &enc[..cut]).is_err(), "cut at {cut}");
    }
}
const INODE_PREFIX_FOR_TEST: usize = 1 + 16 + 1 + 2 + 4 + 4 + 4 + 8 + 48 + 4 + 8 + 4 + 4 + 19;

#[test]
fn timespec_before_epoch_round_trips() {
    let t = Timespec {
        secs: -3,
        nsec: 250,
    };
    assert_eq!(Timespec::from_system(t.to_system()), t);
}

#[test]
fn store_persists_across_reopen_and_creates_root_once() {
    let dir = tempfile::tempdir().unwrap();
    let (db, content) = (dir.path().join("db"), dir.path().join("content"));
    let ino;
    {
        let s = Store::open(&db, &content, 0, 0).unwrap();
        let root = s.get_inode(ROOT_INO).unwrap().unwrap();
        assert_eq!(root.kind, FileKind::Directory);
        let mut b = s.batch();
        ino = s.allocate_ino(&mut b);
        let mut i = sample(ino);
        i.parent = ROOT_INO;
        b.put_inode(&i);
        b.put_dirent(ROOT_INO, b"hello", ino, FileKind::File);
        b.put_xattr(ino, b"user.k", b"v");
        s.commit(b, true).unwrap();
    }
    let s = Store::open(&db, &content, 5, 5).unwrap();
    assert_eq!(
        s.get_inode(ROOT_INO).unwrap().unwrap().uid,
        0,
        "root created once"
    );
    assert_eq!(
        s.lookup(ROOT_INO, b"hello").unwrap(),
        Some((ino, FileKind::File))
    );
    assert_eq!(
        s.get_xattr(ino, b"user.k").unwrap().as_deref(),
        Some(&b"v"[..])
    );
    let mut b = s.batch();
    let next = s.allocate_ino(&mut b);
    assert!(next > ino, "inode numbers are never reused after reopen");
}

#[test]
fn list_dir_stays_within_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("db"), &dir.path().join("c"), 0, 0).unwrap();
    let mut b = s.batch();
    b.put_dirent(255, b"a", 1000, FileKind::File);
    b.put_dirent(256, b"b", 1001, FileKind::File);
    b.put_dirent(256, b"c", 1002, FileKind::Directory);
    b.put_dirent(257, b"d", 1003, FileKind::File);
    s.commit(b, false).unwrap();
    let names: Vec<_> = s
        .list_dir(256)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec![b"b".to_vec(), b"c".to_vec()]);
    assert!(s.dir_is_empty(258).unwrap());
    assert!(!s.dir_is_empty(257).unwrap());
}

#[test]
fn orphans_are_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (db, content) = (dir.path().join("db"), dir.path().join("content"));
    let object;
    let ino;
    {
        let s = Store::open(&db, &content, 0, 0).unwrap();
        let mut b = s.batch();
        ino = s.allocate_ino(&mut b);
        let mut i = sample(ino);
        i.nlink = 0;
        object = i.object;
        b.put_inode(&i);
        b.mark_orphan(ino);
        s.commit(b, true).unwrap();
        s.open_content(ino, true).unwrap();
        assert!(s.content_path(ino).exists());
    }
    let s = Store::open(&db, &content, 0, 0).unwrap();
    assert_eq!(s.ino_of_object(&object).unwrap(), None);
    assert!(!s.content_path(ino).exists());
}

fn tx_on(objects: &[ObjectId]) -> crate::changelog::Transaction {
    use crate::changelog::{Op, OpKind, Transaction};
    let mut ops: Vec<Op> = Vec::new();
    for o in objects {
        let base = 1 + ops.iter().filter(|op| op.object == *o).count() as u64;
        ops.push(Op {
            object: *o,
            base_version: base,
            new_version: base + 1,
            kind: OpKind::SetAttr {
                mode: Some(0o600),
                mtime_ns: None,
            },
        });
    }
    Transaction {
        id: rand::random(),
        device: "d".into(),
        time_ms: 1,
        ops,
    }
}

#[test]
fn outbox_index_follows_pushes_and_removals() {
    let dir = tempfile::tempdir().unwrap();
    let (db, content) = (dir.path().join("db"), dir.path().join("content"));
    let (a, b, c) = (ObjectId::random(), ObjectId::random(), ObjectId::random());
    let (s1, s2) = {
        let s = Store::open(&db, &content, 0, 0).unwrap();
        assert!(s.outbox_is_empty().unwrap());
        let mut batch = s.batch();
        let s1 = batch.push_outbox(&tx_on(&[a, b, a])).unwrap();
        let s2 = batch.push_outbox(&tx_on(&[b])).unwrap();
        s.commit(batch, false).unwrap();
        assert!(s.outbox_touches(&a).unwrap() && s.outbox_touches(&b).unwrap());
        assert!(!s.outbox_touches(&c).unwrap());
        assert!(!s.outbox_is_empty().unwrap());
        let mut batch = s.batch();
        batch.remove_outbox(s1);
        s.commit(batch, false).unwrap();
        assert!(!s.outbox_touches(&a).unwrap());
        assert!(s.outbox_touches(&b).unwrap());
        (s1, s2)
    };
    assert!(s1 < s2);
    // Across a reopen, and read-only beside nothing.
    let s = Store::open(&db, &content, 0, 0).unwrap();
    assert!(s.outbox_touches(&b).unwrap() && !s.outbox_touches(&a).unwrap());
    let mut batch = s.batch();
    batch.remove_outbox(s2);
    s.commit(batch, false).unwrap();
    assert!(!s.outbox_touches(&b).unwrap());
    assert!(s.outbox_is_empty().unwrap());
    drop(s);
    let r = Store::open_read_only(&db, &content).unwrap();
    assert!(r.outbox_is_empty().unwrap());
}

#[test]
fn an_outbox_from_before_the_index_is_indexed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (db, content) = (dir.path().join("db"), dir.path().join("content"));
    let a = ObjectId::random();
    {
        let s = Store::open(&db, &content, 0, 0).unwrap();
        let mut batch = s.batch();
        batch.push_outbox(&tx_on(&[a])).unwrap();
        s.commit(batch, false).unwrap();
        // As an older build left it: no index, no marker.
        let cf = s.cf(sync_state::CF_OUTBOX_OBJECTS);
        let keys: Vec<Box<[u8]>> =
            s.db.iterator_cf(cf, rocksdb::IteratorMode::Start)
                .map(|i| i.unwrap().0)
                .collect();
        assert!(!keys.is_empty());
        for k in keys {
            s.db.delete_cf(cf, k).unwrap();
        }
        s.db.delete_cf(s.cf(CF_META), b"outbox_indexed").unwrap();
        assert!(!s.outbox_touches(&a).unwrap());
    }
    let s = Store::open(&db, &content, 0, 0).unwrap();
    assert!(s.outbox_touches(&a).unwrap());
}

/// A transaction whose encoding is longer than the inline limit: a write of random bytes.
fn long_tx() -> crate::changelog::Transaction {
    use crate::changelog::{empty_hash, Delta, Op, OpKind, Transaction};
    use rand::RngCore;
    let mut bytes = vec![0u8; sync_state::OUTBOX_INLINE_MAX * 3];
    rand::rng().fill_bytes(&mut bytes);
    let new_hash = *blake3::hash(&bytes).as_bytes();
    Transaction {
        id: rand::random(),
        device: "d".into(),
        time_ms: 1,
        ops: vec![Op {
            object: ObjectId::random(),
            base_version: 1,
            new_version: 2,
            kind: OpKind::Write {
                base_hash: empty_hash(),
                new_hash,
                new_size: bytes.len() as u64,
                delta: Delta::Whole(bytes),
            },
        }],
    }
}

/// A store whose outbox holds one committed long entry.
fn store_with_long_entry(db: &Path, content: &Path) -> Arc<Store> {
    let s = Store::open(db, content, 0, 0).unwrap();
    let mut batch = s.batch();
    batch.push_outbox(&long_tx()).unwrap();
    s.commit(batch, false).unwrap();
    s
}

fn payload_files(content: &Path) -> Vec<std::path::PathBuf> {
    match std::fs::read_dir(content.join("outbox")) {
        Ok(d) => d.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn a_long_outbox_entry_lives_in_a_payload_file_and_reads_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (db, content) = (dir.path().join("db"), dir.path().join("content"));
    let (long, short) = (long_tx(), tx_on(&[ObjectId::random()]));
    let (long_enc, short_enc) = (
        crate::changelog::encode_transaction(&long),
        crate::changelog::encode_transaction(&short),
    );
    assert!(long_enc.len() > sync_state::OUTBOX_INLINE_MAX);
    let s = Store::open(&db, &content, 0, 0).unwrap();
    let mut batch = s.batch();
    let s1 = batch.push_outbox(&long).unwrap();
    batch.push_outbox(&short).unwrap();
    s.commit(batch, false).unwrap();
    assert_eq!(
        payload_files(&content).len(),
        1,
        "only the long entry has a file"
    );
    let read: Vec<Vec<u8>> = s.outbox().unwrap().into_iter().map(|(_, v)| v).collect();
    assert_eq!(read, vec![long_enc.clone(), short_enc.clone()]);
    assert_eq!(
        s.outbox_size().unwrap(),
        (2, (long_enc.len() + short_enc.len()) as u64),
        "sizes count the payload, not its reference"
    );
    // Read-only, as `status` reads it.
    drop(s);
    let r = Store::open_read_only(&db, &content).unwrap();
    assert_eq!(r.outbox_size().unwrap().0, 2);
    assert_eq!(r.outbox().unwrap()[0].1, long_enc);
    drop(r);
    // Survives a reopen; removal deletes the file with the entry.
    let s = Store::open(&db, &content, 0, 0).unwrap();
    assert_eq!(s.outbox().unwrap()[0].1, long_enc);
    let mut batch = s.batch();
    batch.remove_outbox(s1);
    s.commit(batch, false).unwrap();
    assert!(payload_files(&content).is_empty());
    assert_eq!(s.outbox().unwrap().len(), 1);
}

#[test]
fn a_payload_file_no_entry_refers_to_is_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (db, content) = (dir.path().join("db"), dir.path().join("content"));
    {
        let s = store_with_long_entry(&db, &content);
        // A crash after the payload was written, before its batch committed.
        let mut lost = s.batch();
        lost.push_outbox(&long_tx()).unwrap();
        drop(lost);
        assert_eq!(payload_files(&content).len(), 2);
    }
    let s = Store::open(&db, &content, 0, 0).unwrap();
    assert_eq!(payload_files(&content).len(), 1, "the orphan is gone");
    assert_eq!(s.outbox().unwrap().len(), 1, "the committed entry is kept");
}

#[test]
fn a_damaged_payload_file_is_an_error_not_other_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (db, content) = (dir.path().join("db"), dir.path().join("content"));
    let s = store_with_long_entry(&db, &content);
    let file = payload_files(&content).pop().unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let err = s.outbox().unwrap_err().to_string();
    assert!(err.contains("not the payload that was written"), "{err}");
    std::fs::write(&file, &bytes[..10]).unwrap();
    assert!(s.outbox().is_err(), "a truncated payload is an error too");
    std::fs::remove_file(&file).unwrap();
    assert!(s.outbox().is_err(), "a missing payload is an error too");
}
