//! The sync engine's durable state beside the local tree: the server-known tree at the
//! cursor (one record per object), the cursor, and the journal of a remote apply whose
//! content files are being swapped.
//!
//! What always holds:
//! - The server tree, the cursor and the outbox change only together with the local tree,
//!   in one write batch (the apply of one remote transaction), so after a crash
//!   `Engine::restore` sees a state where the local tree is the server tree plus the outbox.
//! - Content files are replaced by rename before that batch commits. The journal, written
//!   with fsync before the first rename, lists each replaced file and where its previous
//!   content was kept; the apply's batch deletes it. A journal found at open means the batch
//!   never committed: the previous contents go back ([`Store::roll_back_apply_journal`]).

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::changelog::{Name, ObjectId, ObjectKind};
use crate::engine::ObjectState;

use super::sync_state::R;
use super::{Batch, Result, Store, StoreError};

pub(super) const CF_SERVER: &str = "server";
const META_CURSOR: &[u8] = b"sync_cursor";
const META_JOURNAL: &[u8] = b"apply_journal";

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// Encodes one server-tree object: layout 1, or layout 2 (layout 1 followed by the other
/// names) for an object with several names.
pub fn encode_server_object(s: &ObjectState) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + s.name.0.len());
    out.push(if s.links.is_empty() { 1 } else { 2 });
    out.extend_from_slice(&s.id.0);
    out.extend_from_slice(&s.parent.0);
    put_bytes(&mut out, &s.name.0);
    match &s.kind {
        ObjectKind::File => out.push(1),
        ObjectKind::Directory => out.push(2),
        ObjectKind::Symlink { target } => {
            out.push(3);
            put_bytes(&mut out, target);
        }
    }
    out.extend_from_slice(&s.mode.to_le_bytes());
    out.extend_from_slice(&(s.mtime_ns as u64).to_le_bytes());
    out.extend_from_slice(&s.hash);
    out.extend_from_slice(&s.size.to_le_bytes());
    out.extend_from_slice(&s.version.to_le_bytes());
    out.extend_from_slice(&s.content_version.to_le_bytes());
    out.extend_from_slice(&(s.xattrs.len() as u32).to_le_bytes());
    for (k, v) in &s.xattrs {
        put_bytes(&mut out, k);
        put_bytes(&mut out, v);
    }
    if !s.links.is_empty() {
        out.extend_from_slice(&(s.links.len() as u32).to_le_bytes());
        for (parent, name) in &s.links {
            out.extend_from_slice(&parent.0);
            put_bytes(&mut out, &name.0);
        }
    }
    out
}

/// Decodes what [`encode_server_object`] wrote.
///
/// # Errors
/// The record is truncated or of an unknown layout.
pub fn decode_server_object(b: &[u8]) -> Result<ObjectState> {
    let mut r = R(b);
    let layout = r.u8()?;
    if layout != 1 && layout != 2 {
        return Err(StoreError::Corrupt("unknown server tree layout".into()));
    }
    let id = ObjectId(r.arr()?);
    let parent = ObjectId(r.arr()?);
    let name = Name(r.bytes()?);
    let kind = match r.u8()? {
        1 => ObjectKind::File,
        2 => ObjectKind::Directory,
        3 => ObjectKind::Symlink { target: r.bytes()? },
        k => return Err(StoreError::Corrupt(format!("unknown object kind {k}"))),
    };
    let mode = r.u32()?;
    let mtime_ns = r.u64()? as i64;
    let hash = r.arr()?;
    let size = r.u64()?;
    let version = r.u64()?;
    let content_version = r.u64()?;
    let n = r.u32()? as usize;
    let mut xattrs = BTreeMap::new();
    for _ in 0..n {
        let k = r.bytes()?;
        xattrs.insert(k, r.bytes()?);
    }
    let mut links = Vec::new();
    if layout == 2 {
        let n = r.u32()? as usize;
        for _ in 0..n.min(1 << 16) {
            let p = ObjectId(r.arr()?);
            links.push((p, Name(r.bytes()?)));
        }
    }
    Ok(ObjectState {
        id,
        parent,
        name,
        links,
        kind,
        mode,
        mtime_ns,
        hash,
        size,
        xattrs,
        version,
        content_version,
    })
}

/// One content file an apply replaced: `path` now holds the new content, `kept` the
/// previous one (`None`: there was none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalEntry {
    pub path: PathBuf,
    pub kept: Option<PathBuf>,
}

fn encode_journal(entries: &[JournalEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        put_bytes(&mut out, e.path.as_os_str().as_encoded_bytes());
        match &e.kept {
            Some(k) => {
                out.push(1);
                put_bytes(&mut out, k.as_os_str().as_encoded_bytes());
            }
            None => out.push(0),
        }
    }
    out
}

fn decode_journal(b: &[u8]) -> Result<Vec<JournalEntry>> {
    use std::os::unix::ffi::OsStringExt;
    let mut r = R(b);
    let n = r.u32()? as usize;
    let mut out = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let path = PathBuf::from(std::ffi::OsString::from_vec(r.bytes()?));
        let kept = match r.u8()? {
            0 => None,
            _ => Some(PathBuf::from(std::ffi::OsString::from_vec(r.bytes()?))),
        };
        out.push(JournalEntry { path, kept });
    }
    Ok(out)
}

impl Store {
    /// The server-known tree as the last apply left it.
    ///
    /// # Errors
    /// A record cannot be read.
    pub fn server_tree(&self) -> Result<Vec<ObjectState>> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_SERVER), rocksdb::IteratorMode::Start)
        {
            let (_, v) = item?;
            out.push(decode_server_object(&v)?);
        }
        Ok(out)
    }

    /// One object of the server-known tree.
    ///
    /// # Errors
    /// The record cannot be read.
    pub fn server_object(&self, id: &crate::changelog::ObjectId) -> Result<Option<ObjectState>> {
        match self.db.get_pinned_cf(self.cf(CF_SERVER), id.0)? {
            Some(v) => Ok(Some(decode_server_object(&v)?)),
            None => Ok(None),
        }
    }

    /// The last server sequence applied (0: none).
    ///
    /// # Errors
    /// The record cannot be read.
    pub fn sync_cursor(&self) -> Result<u64> {
        match self.db.get_cf(self.cf(super::CF_META), META_CURSOR)? {
            Some(v) => Ok(u64::from_le_bytes(v.as_slice().try_into().map_err(
                |_| StoreError::Corrupt("cursor has the wrong length".into()),
            )?)),
            None => Ok(0),
        }
    }

    /// Writes the journal of an apply about to replace content files (fsynced).
    ///
    /// # Errors
    /// The write failed; no file may be replaced then.
    pub fn write_apply_journal(&self, entries: &[JournalEntry]) -> Result<()> {
        let mut b = self.batch();
        b.wb.put_cf(
            self.cf(super::CF_META),
            META_JOURNAL,
            encode_journal(entries),
        );
        self.commit(b, true)
    }

    /// Puts back the content an interrupted apply replaced, and forgets its journal. Run at
    /// open, before anything reads content.
    ///
    /// # Errors
    /// A file could not be restored (the journal is kept for the next attempt).
    pub fn roll_back_apply_journal(&self) -> Result<()> {
        let Some(v) = self.db.get_cf(self.cf(super::CF_META), META_JOURNAL)? else {
            return Ok(());
        };
        let entries = decode_journal(&v)?;
        let mut lost = Vec::new();
        for e in entries.iter().rev() {
            match &e.kept {
                Some(k) if k.exists() => std::fs::rename(k, &e.path)?,
                // No `.old` and no `.new` left: the swap happened and the previous content
                // is gone. Not silent: logged, and reported once the rest is restored.
                Some(k) if !k.with_extension("new").exists() => {
                    tracing::error!(
                        file = %e.path.display(),
                        "cannot roll back: the previous content {} is missing",
                        k.display()
                    );
                    lost.push(e.path.display().to_string());
                }
                // The swap never reached this file: it still holds its previous content.
                Some(_) => {}
                None => match std::fs::remove_file(&e.path) {
                    Ok(()) => {}
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(err) => return Err(err.into()),
                },
            }
        }
        let mut b = self.batch();
        b.wb.delete_cf(self.cf(super::CF_META), META_JOURNAL);
        self.commit(b, true)?;
        tracing::warn!(
            "rolled back {} content file(s) of a remote change interrupted by a crash",
            entries.len()
        );
        if !lost.is_empty() {
            return Err(super::StoreError::Corrupt(format!(
                "rolling back an interrupted apply: the previous content of {} is missing",
                lost.join(", ")
            )));
        }
        Ok(())
    }

    /// A folder for staging content, emptied at open.
    pub fn staging_dir(&self) -> PathBuf {
        self.content_dir.join("staging")
    }

    /// A folder for remote content fetched or built before an apply (phase one of
    /// `fs::apply`), named by content hash; on the content files' file system, so a staged
    /// file is linked into place.
    pub fn incoming_dir(&self) -> PathBuf {
        self.content_dir.join("incoming")
    }
}

impl Batch<'_> {
    pub fn put_server_object(&mut self, s: &ObjectState) {
        self.wb
            .put_cf(self.store.cf(CF_SERVER), s.id.0, encode_server_object(s));
    }

    pub fn delete_server_object(&mut self, id: &ObjectId) {
        self.wb.delete_cf(self.store.cf(CF_SERVER), id.0);
    }

    pub fn set_sync_cursor(&mut self, cursor: u64) {
        self.wb.put_cf(
            self.store.cf(super::CF_META),
            META_CURSOR,
            cursor.to_le_bytes(),
        );
    }

    /// Ends an apply's journal: its files are final once this batch commits.
    pub fn clear_apply_journal(&mut self) {
        self.wb
            .delete_cf(self.store.cf(super::CF_META), META_JOURNAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_object_round_trips() {
        let mut xattrs = BTreeMap::new();
        xattrs.insert(b"user.a".to_vec(), b"1".to_vec());
        let s = ObjectState {
            id: ObjectId::random(),
            parent: ObjectId::ROOT,
            name: Name(b"link".to_vec()),
            links: Vec::new(),
            kind: ObjectKind::Symlink {
                target: b"../x".to_vec(),
            },
            mode: 0o777,
            mtime_ns: -3,
            hash: [4; 32],
            size: 4,
            xattrs,
            version: 9,
            content_version: 2,
        };
        let enc = encode_server_object(&s);
        assert_eq!(enc[0], 1, "one name: the layout older builds read");
        assert_eq!(decode_server_object(&enc).unwrap(), s);
        assert!(decode_server_object(&enc[..30]).is_err());
        // Several names: layout 2 keeps them all.
        let mut linked = s.clone();
        linked.kind = ObjectKind::File;
        linked.set_names(vec![
            (ObjectId::ROOT, Name(b"b".to_vec())),
            (ObjectId([7; 16]), Name(b"a".to_vec())),
            (ObjectId::ROOT, Name(b"a".to_vec())),
        ]);
        let enc = encode_server_object(&linked);
        assert_eq!(enc[0], 2);
        let back = decode_server_object(&enc).unwrap();
        assert_eq!(back, linked);
        assert_eq!(back.name_count(), 3);
        assert_eq!(
            back.name,
            Name(b"a".to_vec()),
            "the least name is the first"
        );
    }

    #[test]
    fn journal_round_trips() {
        let j = vec![
            JournalEntry {
                path: "/a/b".into(),
                kept: Some("/a/b.old".into()),
            },
            JournalEntry {
                path: "/a/c".into(),
                kept: None,
            },
        ];
        assert_eq!(decode_journal(&encode_journal(&j)).unwrap(), j);
    }

    #[test]
    fn a_rollback_missing_its_previous_content_is_an_error_not_silence() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), &dir.path().join("c"), 0, 0).unwrap();
        let staging = store.staging_dir();
        std::fs::create_dir_all(&staging).unwrap();
        let (swapped, untouched) = (dir.path().join("f1"), dir.path().join("f2"));
        std::fs::write(&swapped, b"new").unwrap();
        std::fs::write(&untouched, b"previous").unwrap();
        // f2's swap never happened (its `.new` is still staged); f1's did, and its `.old` is gone.
        std::fs::write(staging.join("2.new"), b"new").unwrap();
        store
            .write_apply_journal(&[
                JournalEntry {
                    path: swapped.clone(),
                    kept: Some(staging.join("1.old")),
                },
                JournalEntry {
                    path: untouched.clone(),
                    kept: Some(staging.join("2.old")),
                },
            ])
            .unwrap();
        let e = store
            .roll_back_apply_journal()
            .expect_err("a lost previous content");
        assert!(e.to_string().contains("f1"), "{e}");
        assert!(!e.to_string().contains("f2"), "{e}");
        assert_eq!(std::fs::read(&untouched).unwrap(), b"previous");
        // Reported once: the journal is gone, the next open goes on.
        store
            .roll_back_apply_journal()
            .expect("nothing left to roll back");
    }
}
