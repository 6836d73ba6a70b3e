//! The embedded backend: RocksDB (one column family per record kind) plus a content folder of
//! chunk files under `--data DIR`.
//!
//! Layout: `DIR/db/` (RocksDB), `DIR/chunks/ab/abcdef...` (chunk files named by BLAKE3 hex).
//! Keys are prefixed by `user\0` (user names never hold NUL), so removing a user is one range
//! delete per column family. What always holds: every commit is one `WriteBatch` written with
//! `sync = true`; chunk files are written, fsynced and renamed into place (and their folder
//! fsynced) before any commit that names them; the per-user lock serialises commits.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};

use super::{
    AppendRecord, Backend, BackendError, BoxFut, ChunkId, CommitBatch, DeviceRecord, DirEntries,
    HeadEvent, HistoryEntry, ObjectState, ShareRecord, TokenRecord, UserLock, UserRecord,
};

const CF_META: &str = "meta";
const CF_USERS: &str = "users";
const CF_DEVICES: &str = "devices";
const CF_TOKENS: &str = "tokens";
const CF_LOG: &str = "log";
const CF_OBJECTS: &str = "objects";
const CF_CHILDREN: &str = "children";
const CF_HISTORY: &str = "history";
const CF_IDEM: &str = "idempotency";
/// Share links by token hash.
const CF_SHARES: &str = "shares";
const ALL_CFS: [&str; 10] = [
    CF_META,
    CF_USERS,
    CF_DEVICES,
    CF_TOKENS,
    CF_LOG,
    CF_OBJECTS,
    CF_CHILDREN,
    CF_HISTORY,
    CF_IDEM,
    CF_SHARES,
];
/// Column families whose keys start with `user\0`.
const USER_CFS: [&str; 7] = [
    CF_DEVICES,
    CF_LOG,
    CF_OBJECTS,
    CF_CHILDREN,
    CF_HISTORY,
    CF_IDEM,
    CF_META,
];

/// One RocksDB key and value.
type KeyValue = (Vec<u8>, Vec<u8>);

const ADMIN_KEY: &[u8] = b"\0admin_token_hash";

/// The embedded RocksDB backend.
pub struct Embedded {
    inner: Arc<Inner>,
}

struct Inner {
    db: DB,
    chunk_dir: PathBuf,
    locks: parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Held while a user or device record is checked and written (create, remove, device,
    /// password), so each is one step against the others.
    accounts: parking_lot::Mutex<()>,
    events: tokio::sync::broadcast::Sender<HeadEvent>,
}

/// Creates a folder (and its missing parents) readable by the server's user only: it holds
/// users' content.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn db_err(e: rocksdb::Error) -> BackendError {
    BackendError::Db(e.to_string())
}

fn prefix(user: &str) -> Vec<u8> {
    let mut k = user.as_bytes().to_vec();
    k.push(0);
    k
}

fn key(user: &str, rest: &[&[u8]]) -> Vec<u8> {
    let mut k = prefix(user);
    for r in rest {
        k.extend_from_slice(r);
    }
    k
}

fn prefix_end(user: &str) -> Vec<u8> {
    let mut k = user.as_bytes().to_vec();
    k.push(1);
    k
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, BackendError> {
    serde_json::to_vec(v).map_err(|e| BackendError::Corrupt(e.to_string()))
}

fn from_json<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, BackendError> {
    serde_json::from_slice(b).map_err(|e| BackendError::Corrupt(e.to_string()))
}

fn head_key(user: &str) -> Vec<u8> {
    key(user, &[b"head"])
}

impl Embedded {
    /// Opens (creating if needed) the backend in `dir`.
    ///
    /// # Errors
    /// The folder cannot be created or RocksDB cannot open it (e.g. another server holds it).
    pub fn open(dir: &Path) -> Result<Embedded, BackendError> {
        let chunk_dir = dir.join("chunks");
        private_dir(&chunk_dir)?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cfs = ALL_CFS
            .iter()
            .map(|n| ColumnFamilyDescriptor::new(*n, Options::default()));
        let db = DB::open_cf_descriptors(&opts, dir.join("db"), cfs).map_err(db_err)?;
        Ok(Embedded {
            inner: Arc::new(Inner {
                db,
                chunk_dir,
                locks: parking_lot::Mutex::new(HashMap::new()),
                accounts: parking_lot::Mutex::new(()),
                events: tokio::sync::broadcast::channel(1024).0,
            }),
        })
    }

    fn blocking<T, F>(&self, f: F) -> BoxFut<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, BackendError> + Send + 'static,
    {
        let inner = self.inner.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&inner))
                .await
                .map_err(|e| BackendError::Db(format!("blocking task failed: {e}")))?
        })
    }
}

impl Inner {
    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, BackendError> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| BackendError::Db(format!("missing column family {name}")))
    }

    fn get(&self, cf: &str, k: &[u8]) -> Result<Option<Vec<u8>>, BackendError> {
        self.db.get_cf(self.cf(cf)?, k).map_err(db_err)
    }

    fn sync_write(&self, batch: WriteBatch) -> Result<(), BackendError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo).map_err(db_err)
    }

    fn scan_prefix(&self, cf: &str, p: &[u8]) -> Result<Vec<KeyValue>, BackendError> {
        let mut out = Vec::new();
        let it = self
            .db
            .iterator_cf(self.cf(cf)?, IteratorMode::From(p, Direction::Forward));
        for item in it {
            let (k, v) = item.map_err(db_err)?;
            if !k.starts_with(p) {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn head(&self, user: &str) -> Result<u64, BackendError> {
        match self.get(CF_META, &head_key(user))? {
            None => Ok(0),
            Some(b) => {
                let arr: [u8; 8] = b
                    .as_slice()
                    .try_into()
                    .map_err(|_| BackendError::Corrupt("head".into()))?;
                Ok(u64::from_be_bytes(arr))
            }
        }
    }

    /// Every token record of `user` (by hash). Tokens are few (one per device), so a scan.
    fn token_records_of(&self, user: &str) -> Result<Vec<(String, TokenRecord)>, BackendError> {
        let mut out = Vec::new();
        for (k, v) in self.scan_prefix(CF_TOKENS, b"")? {
            let t: TokenRecord = from_json(&v)?;
            if t.user == user {
                out.push((String::from_utf8_lossy(&k).into_owned(), t));
            }
        }
        Ok(out)
    }

    /// The share links of `user`. Links are few, so a scan (as tokens).
    fn shares_of(&self, user: &str) -> Result<Vec<ShareRecord>, BackendError> {
        let mut out = Vec::new();
        for (_, v) in self.scan_prefix(CF_SHARES, b"")? {
            let l: ShareRecord = from_json(&v)?;
            if l.user == user {
                out.push(l);
            }
        }
        Ok(out)
    }

    /// The token hashes of `user` (of one device, if given).
    fn tokens_of(&self, user: &str, device: Option<&str>) -> Result<Vec<String>, BackendError> {
        Ok(self
            .token_records_of(user)?
            .into_iter()
            .filter(|(_, t)| device.is_none_or(|d| t.device == d))
            .map(|(h, _)| h)
            .collect())
    }

    fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        let h = hex::encode(id);
        self.chunk_dir.join(&h[..2]).join(&h)
    }

    fn put_chunk(&self, id: &ChunkId, bytes: &[u8]) -> Result<(), BackendError> {
        let path = self.chunk_path(id);
        if path.exists() {
            return Ok(());
        }
        let dir = path
            .parent()
            .ok_or_else(|| BackendError::Corrupt("chunk path".into()))?;
        if !dir.exists() {
            private_dir(dir)?;
            std::fs::File::open(&self.chunk_dir)?.sync_all()?;
        }
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            hex::encode(id),
            rand::random::<u64>()
        ));
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    }

    fn commit(&self, user: &str, b: CommitBatch) -> Result<(), BackendError> {
        let found = self.head(user)?;
        if found != b.expected_head {
            return Err(BackendError::HeadMoved {
                expected: b.expected_head,
                found,
            });
        }
        let mut wb = WriteBatch::default();
        let log = self.cf(CF_LOG)?;
        let objects = self.cf(CF_OBJECTS)?;
        let children = self.cf(CF_CHILDREN)?;
        let history = self.cf(CF_HISTORY)?;
        let mut last = b.expected_head;
        for (seq, bytes) in &b.entries {
            if *seq != last + 1 {
                return Err(BackendError::Corrupt(format!("sequence gap at {seq}")));
            }
            last = *seq;
            wb.put_cf(log, key(user, &[&seq.to_be_bytes()]), bytes);
        }
        for id in &b.delete_objects {
            wb.delete_cf(objects, key(user, &[id]));
        }
        for o in &b.put_objects {
            wb.put_cf(objects, key(user, &[&o.id]), to_json(o)?);
        }
        for (parent, name) in &b.delete_children {
            wb.delete_cf(children, key(user, &[parent, name]));
        }
        for (parent, name, child) in &b.put_children {
            wb.put_cf(children, key(user, &[parent, name]), child);
        }
        let mut touched: HashMap<[u8; 16], Vec<u64>> = HashMap::new();
        for (id, h) in &b.history {
            wb.put_cf(
                history,
                key(user, &[id, &h.version.to_be_bytes()]),
                to_json(h)?,
            );
            touched.entry(*id).or_default().push(h.version);
        }
        for (id, new_versions) in touched {
            let mut versions: Vec<u64> = self
                .scan_prefix(CF_HISTORY, &key(user, &[&id]))?
                .iter()
                .filter_map(|(k, _)| k.len().checked_sub(8).map(|s| &k[s..]))
                .filter_map(|s| <[u8; 8]>::try_from(s).ok())
                .map(u64::from_be_bytes)
                .collect();
            versions.extend(new_versions);
            versions.sort_unstable();
            versions.dedup();
            let keep = b.history_keep.max(1);
            if versions.len() > keep {
                for v in &versions[..versions.len() - keep] {
                    wb.delete_cf(history, key(user, &[&id, &v.to_be_bytes()]));
                }
            }
        }
        wb.put_cf(self.cf(CF_META)?, head_key(user), last.to_be_bytes());
        let (k, rec) = &b.idempotency;
        wb.put_cf(self.cf(CF_IDEM)?, key(user, &[k.as_bytes()]), to_json(rec)?);
        self.sync_write(wb)
    }
}

fn id16(b: &[u8]) -> Result<[u8; 16], BackendError> {
    b.try_into()
        .map_err(|_| BackendError::Corrupt("object id".into()))
}

impl Backend for Embedded {
    fn admin_token_hash(&self) -> BoxFut<'_, Option<String>> {
        self.blocking(|i| {
            Ok(i.get(CF_META, ADMIN_KEY)?
                .map(|b| String::from_utf8_lossy(&b).into_owned()))
        })
    }

    fn set_admin_token_hash(&self, hash: String) -> BoxFut<'_, ()> {
        self.blocking(move |i| {
            let mut wb = WriteBatch::default();
            wb.put_cf(i.cf(CF_META)?, ADMIN_KEY, hash.as_bytes());
            i.sync_write(wb)
        })
    }

    fn create_user(&self, user: UserRecord) -> BoxFut<'_, ()> {
        self.blocking(move |i| {
            let _g = i.accounts.lock();
            if i.get(CF_USERS, user.name.as_bytes())?.is_some() {
                return Err(BackendError::AlreadyExists);
            }
            let mut wb = WriteBatch::default();
            wb.put_cf(i.cf(CF_USERS)?, user.name.as_bytes(), to_json(&user)?);
            i.sync_write(wb)
        })
    }

    fn get_user(&self, name: String) -> BoxFut<'_, Option<UserRecord>> {
        self.blocking(move |i| {
            i.get(CF_USERS, name.as_bytes())?
                .map(|b| from_json(&b))
                .transpose()
        })
    }

    fn list_users(&self) -> BoxFut<'_, Vec<UserRecord>> {
        self.blocking(|i| {
            i.scan_prefix(CF_USERS, b"")?
                .iter()
                .map(|(_, v)| from_json(v))
                .collect()
        })
    }

    fn delete_user(&self, name: String) -> BoxFut<'_, ()> {
        self.blocking(move |i| {
            let _g = i.accounts.lock();
            if i.get(CF_USERS, name.as_bytes())?.is_none() {
                return Err(BackendError::NotFound);
            }
            let mut wb = WriteBatch::default();
            for h in i.tokens_of(&name, None)? {
                wb.delete_cf(i.cf(CF_TOKENS)?, h.as_bytes());
            }
            for cf in USER_CFS {
                wb.delete_range_cf(i.cf(cf)?, prefix(&name), prefix_end(&name));
            }
            for l in i.shares_of(&name)? {
                wb.delete_cf(i.cf(CF_SHARES)?, l.hash.as_bytes());
            }
            wb.delete_cf(i.cf(CF_USERS)?, name.as_bytes());
            i.sync_write(wb)
        })
    }

    fn put_device(&self, device: DeviceRecord, old_token_hash: Option<String>) -> BoxFut<'_, ()> {
        self.blocking(move |i| {
            let _g = i.accounts.lock();
            if i.get(CF_USERS, device.user.as_bytes())?.is_none() {
                return Err(BackendError::NotFound);
            }
            let mut wb = WriteBatch::default();
            let tokens = i.cf(CF_TOKENS)?;
            if let Some(old) = old_token_hash {
                wb.delete_cf(tokens, old.as_bytes());
            }
            for h in i.tokens_of(&device.user, Some(&device.name))? {
                wb.delete_cf(tokens, h.as_bytes());
            }
            if let Some(h) = &device.token_hash {
                let t = TokenRecord {
                    user: device.user.clone(),
                    device: device.name.clone(),
                    device_id: device.id.clone(),
                };
                wb.put_cf(tokens, h.as_bytes(), to_json(&t)?);
            }
            wb.put_cf(
                i.cf(CF_DEVICES)?,
                key(&device.user, &[device.name.as_bytes()]),
                to_json(&device)?,
            );
            i.sync_write(wb)
        })
    }

    fn set_password(
        &self,
        user: String,
        password_hash: String,
        keep: Option<String>,
    ) -> BoxFut<'_, ()> {
        self.blocking(move |i| {
            let _g = i.accounts.lock();
            let mut rec: UserRecord = match i.get(CF_USERS, user.as_bytes())? {
                Some(b) => from_json(&b)?,
                None => return Err(BackendError::NotFound),
            };
            rec.password_hash = password_hash;
            let mut wb = WriteBatch::default();
            wb.put_cf(i.cf(CF_USERS)?, user.as_bytes(), to_json(&rec)?);
            let tokens = i.cf(CF_TOKENS)?;
            for (h, t) in i.token_records_of(&user)? {
                if keep.as_deref() != Some(t.device.as_str()) {
                    wb.delete_cf(tokens, h.as_bytes());
                }
            }
            for (k, v) in i.scan_prefix(CF_DEVICES, &prefix(&user))? {
                let mut d: DeviceRecord = from_json(&v)?;
                if keep.as_deref() != Some(d.name.as_str()) && d.token_hash.take().is_some() {
                    wb.put_cf(i.cf(CF_DEVICES)?, k, to_json(&d)?);
                }
            }
            i.sync_write(wb)
        })
    }

    fn get_device(&self, user: String, device: String) -> BoxFut<'_, Option<DeviceRecord>> {
        self.blocking(move |i| {
            i.get(CF_DEVICES, &key(&user, &[device.as_bytes()]))?
                .map(|b| from_json(&b))
                .transpose()
        })
    }

    fn list_devices(&self, user: String) -> BoxFut<'_, Vec<DeviceRecord>> {
        self.blocking(move |i| {
            i.scan_prefix(CF_DEVICES, &prefix(&user))?
                .iter()
                .map(|(_, v)| from_json(v))
                .collect()
        })
    }

    fn lookup_token(&self, hash: String) -> BoxFut<'_, Option<TokenRecord>> {
        self.blocking(move |i| {
            i.get(CF_TOKENS, hash.as_bytes())?
                .map(|b| from_json(&b))
                .transpose()
        })
    }

    fn put_share(&self, share: ShareRecord) -> BoxFut<'_, ()> {
        self.blocking(move |i| {
            let _g = i.accounts.lock();
            if i.get(CF_USERS, share.user.as_bytes())?.is_none() {
                return Err(BackendError::NotFound);
            }
            let mut wb = WriteBatch::default();
            wb.put_cf(i.cf(CF_SHARES)?, share.hash.as_bytes(), to_json(&share)?);
            i.sync_write(wb)
        })
    }

    fn get_share(&self, hash: String) -> BoxFut<'_, Option<ShareRecord>> {
        self.blocking(move |i| {
            i.get(CF_SHARES, hash.as_bytes())?
                .map(|b| from_json(&b))
                .transpose()
        })
    }

    fn list_shares(&self, user: String) -> BoxFut<'_, Vec<ShareRecord>> {
        self.blocking(move |i| {
            let mut v = i.shares_of(&user)?;
            v.sort_by(|a, b| (a.created_ms, &a.hash).cmp(&(b.created_ms, &b.hash)));
            Ok(v)
        })
    }

    fn delete_share(&self, user: String, hash: String) -> BoxFut<'_, ()> {
        self.blocking(move |i| {
            let _g = i.accounts.lock();
            let found: Option<ShareRecord> = i
                .get(CF_SHARES, hash.as_bytes())?
                .map(|b| from_json(&b))
                .transpose()?;
            if found.is_none_or(|l| l.user != user) {
                return Err(BackendError::NotFound);
            }
            let mut wb = WriteBatch::default();
            wb.delete_cf(i.cf(CF_SHARES)?, hash.as_bytes());
            i.sync_write(wb)
        })
    }

    fn lock_user(&self, user: String) -> BoxFut<'_, UserLock> {
        let m = self
            .inner
            .locks
            .lock()
            .entry(user)
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
            .clone();
        Box::pin(async move {
            let g = m.lock_owned().await;
            Ok(Box::new(g) as UserLock)
        })
    }

    fn head(&self, user: String) -> BoxFut<'_, u64> {
        self.blocking(move |i| i.head(&user))
    }

    fn idempotency(&self, user: String, k: String) -> BoxFut<'_, Option<AppendRecord>> {
        self.blocking(move |i| {
            i.get(CF_IDEM, &key(&user, &[k.as_bytes()]))?
                .map(|b| from_json(&b))
                .transpose()
        })
    }

    fn get_object(&self, user: String, id: [u8; 16]) -> BoxFut<'_, Option<ObjectState>> {
        self.blocking(move |i| {
            i.get(CF_OBJECTS, &key(&user, &[&id]))?
                .map(|b| from_json(&b))
                .transpose()
        })
    }

    fn list_children(&self, user: String, dir: [u8; 16]) -> BoxFut<'_, DirEntries> {
        self.blocking(move |i| {
            let p = key(&user, &[&dir]);
            i.scan_prefix(CF_CHILDREN, &p)?
                .into_iter()
                .map(|(k, v)| Ok((k[p.len()..].to_vec(), id16(&v)?)))
                .collect()
        })
    }

    fn commit(&self, user: String, batch: CommitBatch) -> BoxFut<'_, ()> {
        self.blocking(move |i| {
            let head = batch
                .entries
                .last()
                .map_or(batch.expected_head, |(s, _)| *s);
            i.commit(&user, batch)?;
            let _ = i.events.send(HeadEvent::Moved { user, head });
            Ok(())
        })
    }

    fn read_log(
        &self,
        user: String,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFut<'_, Vec<(u64, Vec<u8>)>> {
        self.blocking(move |i| {
            let p = prefix(&user);
            let start = key(&user, &[&after.saturating_add(1).to_be_bytes()]);
            let it = i.db.iterator_cf(
                i.cf(CF_LOG)?,
                IteratorMode::From(&start, Direction::Forward),
            );
            let mut out = Vec::new();
            let mut bytes = 0usize;
            for item in it {
                let (k, v) = item.map_err(db_err)?;
                if !k.starts_with(&p) || out.len() >= limit {
                    break;
                }
                if !out.is_empty() && bytes + v.len() > max_bytes {
                    break;
                }
                let seq = <[u8; 8]>::try_from(&k[p.len()..])
                    .map_err(|_| BackendError::Corrupt("log key".into()))?;
                bytes += v.len();
                out.push((u64::from_be_bytes(seq), v.to_vec()));
            }
            Ok(out)
        })
    }

    fn snapshot(&self, user: String) -> BoxFut<'_, (u64, Vec<ObjectState>)> {
        self.blocking(move |i| {
            let snap = i.db.snapshot();
            let head = match snap
                .get_cf(i.cf(CF_META)?, head_key(&user))
                .map_err(db_err)?
            {
                None => 0,
                Some(b) => u64::from_be_bytes(
                    b.as_slice()
                        .try_into()
                        .map_err(|_| BackendError::Corrupt("head".into()))?,
                ),
            };
            let p = prefix(&user);
            let mut out = Vec::new();
            for item in snap.iterator_cf(
                i.cf(CF_OBJECTS)?,
                IteratorMode::From(&p, Direction::Forward),
            ) {
                let (k, v) = item.map_err(db_err)?;
                if !k.starts_with(&p) {
                    break;
                }
                out.push(from_json(&v)?);
            }
            Ok((head, out))
        })
    }

    fn history(&self, user: String, id: [u8; 16]) -> BoxFut<'_, Vec<HistoryEntry>> {
        self.blocking(move |i| {
            i.scan_prefix(CF_HISTORY, &key(&user, &[&id]))?
                .iter()
                .map(|(_, v)| from_json(v))
                .collect()
        })
    }

    fn put_chunks(&self, chunks: Vec<(ChunkId, bytes::Bytes)>) -> BoxFut<'_, ()> {
        self.blocking(move |i| {
            for (id, bytes) in &chunks {
                i.put_chunk(id, bytes)?;
            }
            Ok(())
        })
    }

    fn head_events(&self) -> tokio::sync::broadcast::Receiver<HeadEvent> {
        self.inner.events.subscribe()
    }

    fn get_chunk(&self, id: ChunkId) -> BoxFut<'_, Vec<u8>> {
        self.blocking(move |i| match std::fs::read(i.chunk_path(&id)) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(BackendError::NotFound),
            Err(e) => Err(e.into()),
        })
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_backend_conformance_suite() {
        let dir = tempfile::tempdir().expect("temp dir");
        let b = super::Embedded::open(dir.path()).expect("open");
        crate::server::backend::conformance::run(&b).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_open_of_the_same_folder_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let _b = super::Embedded::open(dir.path()).expect("open");
        assert!(super::Embedded::open(dir.path()).is_err());
    }
}
