//! What the device knows about sync: the previous state of every announced object, the
//! objects changed since they were last announced, and the outbox of transactions to
//! upload.
//!
//! What always holds:
//! - `objstate` holds, per object the server knows about (or will, once the outbox is
//!   uploaded), its version, location, attributes, content hash and size as of the last
//!   op this device put in the outbox or applied from the server: the "previous state" that
//!   deltas are made against. `leaves` and `signatures` hold the 1 MiB leaf hashes and the
//!   rsync block signature of that content, updated block by block.
//! - `pending` names every object changed since; it is written in the same batch as the
//!   change itself, so a crash never loses the fact that something must be sent.
//! - The outbox is keyed by a local sequence that only grows; an entry is written in the
//!   same batch as the `objstate` it advances.
//! - An outbox entry longer than [`OUTBOX_INLINE_MAX`] keeps its bytes in a file of its own,
//!   `content/outbox/<seq>`, written and fsynced before the batch that references it
//!   commits; the entry's value then names the file's length and BLAKE3 hash, which are
//!   checked when it is read. A file no entry references (a crash between the two) is
//!   removed at the next open. Big payloads so never pass through RocksDB's write batch,
//!   WAL, memtable and flush: four copies of every byte of a big file's upload.
//! - `outbox_objects` indexes the outbox by object (which entries touch which objects), so
//!   "is this object still waiting for the server" needs no decoding of payloads. It changes
//!   in the same batch as the outbox: write the outbox only through
//!   [`Batch::push_outbox`] and [`Batch::remove_outbox`].

use crate::changelog::{ContentHash, ObjectId, Transaction};

use super::{Batch, Result, Store, StoreError};

pub(super) const CF_OBJSTATE: &str = "objstate";
pub(super) const CF_PENDING: &str = "pending";
pub(super) const CF_OUTBOX: &str = "outbox";
pub(super) const CF_SIGNATURES: &str = "signatures";
pub(super) const CF_LEAVES: &str = "leaves";
pub(super) const CF_OUTBOX_OBJECTS: &str = "outbox_objects";
const META_OUTBOX_NEXT: &[u8] = b"outbox_next";
/// Longest outbox entry kept inline in RocksDB; longer ones go to a payload file.
pub(super) const OUTBOX_INLINE_MAX: usize = 256 << 10;
/// Starts the value of an outbox entry whose bytes are in a payload file: then the
/// payload's length (u64 LE) and BLAKE3 hash. An encoded transaction starts with `DDTX`.
const PAYLOAD_MARK: &[u8; 8] = b"DDOBFILE";
const PAYLOAD_REF_LEN: usize = 8 + 8 + 32;

/// The length and hash of the payload file an outbox value refers to, if it refers to one.
fn payload_ref(value: &[u8]) -> Option<(u64, [u8; 32])> {
    if value.len() != PAYLOAD_REF_LEN || !value.starts_with(PAYLOAD_MARK) {
        return None;
    }
    let len = u64::from_le_bytes(value[8..16].try_into().ok()?);
    Some((len, value[16..].try_into().ok()?))
}
/// Set once the outbox entries written before `outbox_objects` existed are indexed.
const META_OUTBOX_INDEXED: &[u8] = b"outbox_indexed";

/// `outbox_objects` key of an outbox entry: its objects, 16 bytes each.
fn index_seq_key(seq: u64) -> [u8; 9] {
    let mut k = [b's'; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// `outbox_objects` key saying that entry `seq` touches `object` (empty value).
fn index_object_key(object: &ObjectId, seq: u64) -> [u8; 25] {
    let mut k = [b'o'; 25];
    k[1..17].copy_from_slice(&object.0);
    k[17..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The objects a transaction touches, each once.
fn tx_objects(tx: &Transaction) -> Vec<ObjectId> {
    let mut out: Vec<ObjectId> = Vec::new();
    for op in &tx.ops {
        if !out.contains(&op.object) {
            out.push(op.object);
        }
    }
    out
}

/// The kind of an announced object, as the change log knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncKind {
    File = 1,
    Directory = 2,
    Symlink = 3,
}

/// The previous state of one object: what the last op about it said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectState {
    pub version: u64,
    pub kind: SyncKind,
    pub parent: ObjectId,
    pub name: Vec<u8>,
    /// The other names it was announced with (hard links), sorted.
    pub links: Vec<(ObjectId, Vec<u8>)>,
    pub mode: u32,
    pub mtime_ns: i64,
    pub hash: ContentHash,
    pub size: u64,
    /// The delta strategy that served it last (`delta::Strategy::as_u8`), 0 if none.
    pub strategy: u8,
    /// Size of the last delta per byte of file, in thousandths.
    pub last_ratio_permille: u32,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Why an object is pending.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PendingFlags {
    /// Its content changed in ways not recorded as ranges (rewritten, or ranges lost in a
    /// crash): send it against its signature or whole.
    pub rewritten: bool,
}

struct W(Vec<u8>);
impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
}

pub(super) struct R<'a>(pub(super) &'a [u8]);
impl<'a> R<'a> {
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(StoreError::Corrupt("sync record too short".into()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    pub(super) fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub(super) fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    pub(super) fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
    pub(super) fn bytes(&mut self) -> Result<Vec<u8>> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    pub(super) fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
}

impl ObjectState {
    fn encode(&self) -> Vec<u8> {
        let mut w = W(Vec::with_capacity(128));
        // Layout 2 adds the other names at the end; one name stays layout 1.
        w.u8(if self.links.is_empty() { 1 } else { 2 });
        w.u64(self.version);
        w.u8(self.kind as u8);
        w.0.extend_from_slice(&self.parent.0);
        w.bytes(&self.name);
        w.u32(self.mode);
        w.u64(self.mtime_ns as u64);
        w.0.extend_from_slice(&self.hash);
        w.u64(self.size);
        w.u8(self.strategy);
        w.u32(self.last_ratio_permille);
        w.u32(self.xattrs.len() as u32);
        for (n, v) in &self.xattrs {
            w.bytes(n);
            w.bytes(v);
        }
        if !self.links.is_empty() {
            w.u32(self.links.len() as u32);
            for (p, n) in &self.links {
                w.0.extend_from_slice(&p.0);
                w.bytes(n);
            }
        }
        w.0
    }

    /// Every announced name, the first one first.
    pub fn names(&self) -> impl Iterator<Item = (ObjectId, &[u8])> {
        std::iter::once((self.parent, self.name.as_slice()))
            .chain(self.links.iter().map(|(p, n)| (*p, n.as_slice())))
    }

    /// Sets the announced names (at least one): the least first, as the engine keeps them.
    pub fn set_names(&mut self, mut names: Vec<(ObjectId, Vec<u8>)>) {
        names.sort();
        names.dedup();
        if names.is_empty() {
            return;
        }
        let first = names.remove(0);
        self.parent = first.0;
        self.name = first.1;
        self.links = names;
    }

    fn decode(b: &[u8]) -> Result<ObjectState> {
        let mut r = R(b);
        let layout = r.u8()?;
        if layout != 1 && layout != 2 {
            return Err(StoreError::Corrupt("unknown object state layout".into()));
        }
        let version = r.u64()?;
        let kind = match r.u8()? {
            1 => SyncKind::File,
            2 => SyncKind::Directory,
            3 => SyncKind::Symlink,
            k => return Err(StoreError::Corrupt(format!("unknown sync kind {k}"))),
        };
        let parent = ObjectId(r.arr()?);
        let name = r.bytes()?;
        let mode = r.u32()?;
        let mtime_ns = r.u64()? as i64;
        let hash = r.arr()?;
        let size = r.u64()?;
        let strategy = r.u8()?;
        let last_ratio_permille = r.u32()?;
        let n = r.u32()? as usize;
        let mut xattrs = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            xattrs.push((r.bytes()?, r.bytes()?));
        }
        let mut links = Vec::new();
        if layout == 2 {
            let n = r.u32()? as usize;
            for _ in 0..n.min(1 << 16) {
                let p = ObjectId(r.arr()?);
                links.push((p, r.bytes()?));
            }
        }
        Ok(ObjectState {
            version,
            kind,
            parent,
            name,
            links,
            mode,
            mtime_ns,
            hash,
            size,
            strategy,
            last_ratio_permille,
            xattrs,
        })
    }
}

impl Store {
    pub fn object_state(&self, object: &ObjectId) -> Result<Option<ObjectState>> {
        match self.db.get_pinned_cf(self.cf(CF_OBJSTATE), object.0)? {
            Some(v) => Ok(Some(ObjectState::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Every pending object with its flags.
    pub fn pending(&self) -> Result<Vec<(ObjectId, PendingFlags)>> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_PENDING), rocksdb::IteratorMode::Start)
        {
            let (k, v) = item?;
            let id: [u8; 16] = k
                .as_ref()
                .try_into()
                .map_err(|_| StoreError::Corrupt("bad pending key".into()))?;
            out.push((
                ObjectId(id),
                PendingFlags {
                    rewritten: v.first() == Some(&1),
                },
            ));
        }
        Ok(out)
    }

    pub fn pending_flags(&self, object: &ObjectId) -> Result<Option<PendingFlags>> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_PENDING), object.0)?
            .map(|v| PendingFlags {
                rewritten: v.first() == Some(&1),
            }))
    }

    pub fn signature(&self, object: &ObjectId) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_SIGNATURES), object.0)?)
    }

    pub fn leaves(&self, object: &ObjectId) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_LEAVES), object.0)?)
    }

    /// The outbox in order: (local sequence, encoded transaction).
    pub fn outbox(&self) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        self.for_each_outbox(|seq, v| {
            out.push((seq, v.to_vec()));
            true
        })?;
        Ok(out)
    }

    /// Calls `f` with each outbox entry in order (sequence, encoded transaction) until it
    /// returns `false`; entries are read one at a time.
    ///
    /// # Errors
    /// The outbox cannot be read.
    pub fn for_each_outbox(&self, mut f: impl FnMut(u64, &[u8]) -> bool) -> Result<()> {
        for item in self
            .db
            .iterator_cf(self.cf(CF_OUTBOX), rocksdb::IteratorMode::Start)
        {
            let (k, v) = item?;
            let seq = u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("bad outbox key".into()))?,
            );
            let go = match payload_ref(&v) {
                Some((len, hash)) => f(seq, &self.read_payload(seq, len, &hash)?),
                None => f(seq, &v),
            };
            if !go {
                break;
            }
        }
        Ok(())
    }

    /// Where the bytes of a long outbox entry are kept.
    pub(super) fn payload_dir(&self) -> std::path::PathBuf {
        self.content_dir.join("outbox")
    }

    fn payload_path(&self, seq: u64) -> std::path::PathBuf {
        self.payload_dir().join(format!("{seq:016x}"))
    }

    fn read_payload(&self, seq: u64, len: u64, hash: &[u8; 32]) -> Result<Vec<u8>> {
        let path = self.payload_path(seq);
        let bytes = std::fs::read(&path).map_err(|e| {
            StoreError::Corrupt(format!("outbox entry {seq}: {}: {e}", path.display()))
        })?;
        if bytes.len() as u64 != len || blake3::hash(&bytes).as_bytes() != hash {
            return Err(StoreError::Corrupt(format!(
                "outbox entry {seq}: {} is not the payload that was written ({} bytes, {len} expected)",
                path.display(),
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    /// The local sequences of the first `n` outbox entries, oldest first.
    ///
    /// # Errors
    /// The outbox cannot be read.
    pub fn outbox_seqs(&self, n: usize) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        let mut it = self.db.raw_iterator_cf(self.cf(CF_OUTBOX));
        it.seek_to_first();
        while it.valid() && out.len() < n {
            let k = it.key().unwrap_or_default();
            out.push(u64::from_be_bytes(
                k.try_into()
                    .map_err(|_| StoreError::Corrupt("bad outbox key".into()))?,
            ));
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// Whether an outbox entry (a transaction the server has not acknowledged yet) touches
    /// `object`.
    pub fn outbox_touches(&self, object: &ObjectId) -> Result<bool> {
        let Some(cf) = self.db.cf_handle(CF_OUTBOX_OBJECTS) else {
            return Ok(false); // a read-only open of a store from before the index
        };
        let prefix = &index_object_key(object, 0)[..17];
        for item in self.db.prefix_iterator_cf(cf, prefix) {
            let (k, _) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            let seq = u64::from_be_bytes(k[17..].try_into().unwrap_or_default());
            // The entry's own key goes with the entry; a stale object key is harmless.
            if self.db.get_pinned_cf(cf, index_seq_key(seq))?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether the outbox is empty (without reading its payloads).
    pub fn outbox_is_empty(&self) -> Result<bool> {
        let Some(cf) = self.db.cf_handle(CF_OUTBOX_OBJECTS) else {
            return Ok(self.outbox_size()?.0 == 0);
        };
        match self.db.prefix_iterator_cf(cf, b"s").next() {
            Some(item) => Ok(!item?.0.starts_with(b"s")),
            None => Ok(true),
        }
    }

    /// Number of entries and bytes waiting in the outbox.
    pub fn outbox_size(&self) -> Result<(u64, u64)> {
        let mut n = 0;
        let mut bytes = 0;
        for item in self
            .db
            .iterator_cf(self.cf(CF_OUTBOX), rocksdb::IteratorMode::Start)
        {
            let (_, v) = item?;
            n += 1;
            bytes += payload_ref(&v).map_or(v.len() as u64, |(len, _)| len);
        }
        Ok((n, bytes))
    }
}

impl Batch<'_> {
    pub fn put_object_state(&mut self, object: &ObjectId, st: &ObjectState) {
        self.wb
            .put_cf(self.store.cf(CF_OBJSTATE), object.0, st.encode());
    }

    /// Forgets an object's previous state (it was deleted and the deletion is in the outbox).
    pub fn delete_object_state(&mut self, object: &ObjectId) {
        self.wb.delete_cf(self.store.cf(CF_OBJSTATE), object.0);
        self.wb.delete_cf(self.store.cf(CF_SIGNATURES), object.0);
        self.wb.delete_cf(self.store.cf(CF_LEAVES), object.0);
    }

    pub fn set_pending(&mut self, object: &ObjectId, flags: PendingFlags) {
        self.wb.put_cf(
            self.store.cf(CF_PENDING),
            object.0,
            [u8::from(flags.rewritten)],
        );
    }

    pub fn clear_pending(&mut self, object: &ObjectId) {
        self.wb.delete_cf(self.store.cf(CF_PENDING), object.0);
    }

    pub fn put_signature(&mut self, object: &ObjectId, sig: &[u8]) {
        self.wb.put_cf(self.store.cf(CF_SIGNATURES), object.0, sig);
    }

    pub fn delete_signature(&mut self, object: &ObjectId) {
        self.wb.delete_cf(self.store.cf(CF_SIGNATURES), object.0);
    }

    pub fn put_leaves(&mut self, object: &ObjectId, leaves: &[u8]) {
        self.wb.put_cf(self.store.cf(CF_LEAVES), object.0, leaves);
    }

    pub fn delete_leaves(&mut self, object: &ObjectId) {
        self.wb.delete_cf(self.store.cf(CF_LEAVES), object.0);
    }

    /// Appends a transaction to the outbox; returns its local sequence.
    ///
    /// # Errors
    /// The transaction breaks the change log's limits (it would never be accepted).
    pub fn push_outbox(&mut self, tx: &Transaction) -> Result<u64> {
        let bytes = crate::changelog::encode_transaction_checked(tx)
            .map_err(|e| StoreError::Corrupt(format!("outbox transaction not encodable: {e}")))?;
        let seq = self
            .store
            .next_outbox
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if bytes.len() > OUTBOX_INLINE_MAX {
            let value = self.write_payload(seq, &bytes)?;
            self.wb
                .put_cf(self.store.cf(CF_OUTBOX), seq.to_be_bytes(), value);
        } else {
            self.wb
                .put_cf(self.store.cf(CF_OUTBOX), seq.to_be_bytes(), bytes);
        }
        self.index_outbox(seq, &tx_objects(tx));
        self.wb.put_cf(
            self.store.cf(super::CF_META),
            META_OUTBOX_NEXT,
            (seq + 1).to_le_bytes(),
        );
        Ok(seq)
    }

    /// Writes a long entry's bytes to its payload file, durably (the batch that references
    /// it may commit with a synced WAL); returns the outbox value that refers to it.
    fn write_payload(&mut self, seq: u64, bytes: &[u8]) -> Result<Vec<u8>> {
        use std::io::Write;
        let dir = self.store.payload_dir();
        let created = !dir.exists();
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(&dir)?;
        let path = self.store.payload_path(seq);
        let mut f = std::os::unix::fs::OpenOptionsExt::mode(
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true),
            0o600,
        )
        .open(&path)?;
        f.write_all(bytes)?;
        f.sync_data()?;
        std::fs::File::open(&dir)?.sync_all()?;
        if created {
            if let Some(parent) = dir.parent() {
                std::fs::File::open(parent)?.sync_all()?;
            }
        }
        let mut value = Vec::with_capacity(PAYLOAD_REF_LEN);
        value.extend_from_slice(PAYLOAD_MARK);
        value.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        value.extend_from_slice(blake3::hash(bytes).as_bytes());
        Ok(value)
    }

    /// Removes an uploaded transaction from the outbox.
    pub fn remove_outbox(&mut self, seq: u64) {
        self.wb
            .delete_cf(self.store.cf(CF_OUTBOX), seq.to_be_bytes());
        self.unlink_after.push(self.store.payload_path(seq));
        let cf = self.store.cf(CF_OUTBOX_OBJECTS);
        match self.store.db.get_pinned_cf(cf, index_seq_key(seq)) {
            Ok(Some(v)) => {
                for id in v.chunks_exact(16) {
                    let id = ObjectId(id.try_into().unwrap_or_default());
                    self.wb.delete_cf(cf, index_object_key(&id, seq));
                }
            }
            Ok(None) => {}
            // The object keys stay behind; without their entry key they say nothing.
            Err(e) => tracing::warn!("reading the outbox index of entry {seq}: {e}"),
        }
        self.wb.delete_cf(cf, index_seq_key(seq));
    }

    fn index_outbox(&mut self, seq: u64, objects: &[ObjectId]) {
        let cf = self.store.cf(CF_OUTBOX_OBJECTS);
        let mut ids = Vec::with_capacity(objects.len() * 16);
        for o in objects {
            ids.extend_from_slice(&o.0);
            self.wb.put_cf(cf, index_object_key(o, seq), []);
        }
        self.wb.put_cf(cf, index_seq_key(seq), ids);
    }
}

/// Indexes outbox entries written before `outbox_objects` existed (once per store).
pub(super) fn index_outbox_once(store: &Store) -> Result<()> {
    let meta = store.cf(super::CF_META);
    if store.db.get_pinned_cf(meta, META_OUTBOX_INDEXED)?.is_some() {
        return Ok(());
    }
    let mut b = store.batch();
    for (seq, bytes) in store.outbox()? {
        match crate::changelog::decode_transaction(&bytes) {
            Ok(tx) => b.index_outbox(seq, &tx_objects(&tx)),
            Err(e) => return Err(StoreError::Corrupt(format!("outbox entry {seq}: {e}"))),
        }
    }
    b.wb.put_cf(meta, META_OUTBOX_INDEXED, []);
    store.commit(b, true)
}

/// Loads the outbox counter at open.
/// Removes payload files no outbox entry refers to: written for a batch that never
/// committed, or left when a crash came between an entry's removal and its file's.
pub(super) fn remove_orphan_payloads(store: &Store) -> Result<()> {
    let dir = store.payload_dir();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let referenced = match u64::from_str_radix(&name.to_string_lossy(), 16) {
            Ok(seq) => store
                .db
                .get_pinned_cf(store.cf(CF_OUTBOX), seq.to_be_bytes())?
                .is_some_and(|v| payload_ref(&v).is_some()),
            Err(_) => false,
        };
        if !referenced {
            tracing::debug!("removing orphan outbox payload {}", entry.path().display());
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

pub(super) fn load_outbox_next(store: &Store) -> Result<u64> {
    match store
        .db
        .get_cf(store.cf(super::CF_META), META_OUTBOX_NEXT)?
    {
        Some(v) => Ok(u64::from_le_bytes(v.as_slice().try_into().map_err(
            |_| StoreError::Corrupt("outbox counter has the wrong length".into()),
        )?)),
        None => Ok(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_state_round_trips() {
        let st = ObjectState {
            version: 7,
            kind: SyncKind::File,
            parent: ObjectId::random(),
            name: b"report.odt".to_vec(),
            links: Vec::new(),
            mode: 0o644,
            mtime_ns: -5,
            hash: [9; 32],
            size: 1 << 33,
            strategy: 2,
            last_ratio_permille: 12,
            xattrs: vec![(b"user.a".to_vec(), b"1".to_vec())],
        };
        assert_eq!(ObjectState::decode(&st.encode()).unwrap(), st);
        assert_eq!(st.encode()[0], 1, "one name: the layout older builds read");
        assert!(ObjectState::decode(&st.encode()[..20]).is_err());
        let mut linked = st.clone();
        linked.set_names(vec![
            (ObjectId::ROOT, b"z".to_vec()),
            (ObjectId::ROOT, b"a".to_vec()),
        ]);
        assert_eq!(linked.name, b"a".to_vec());
        assert_eq!(linked.encode()[0], 2);
        assert_eq!(ObjectState::decode(&linked.encode()).unwrap(), linked);
    }
}
