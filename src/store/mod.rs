//! The device's local store: RocksDB for metadata, one content file per object.
//!
//! What it owns: inodes, directory entries, extended attributes and counters (and, as the
//! sync issues land, the previous-state signatures, the outbox and the sync cursors), in
//! RocksDB column families; file content in `content/xx/<object id>` files.
//!
//! What always holds:
//! - Every metadata change is one RocksDB [`Batch`], so a crash leaves the store at a batch
//!   boundary, never in between (RocksDB's WAL is written before `commit` returns, so a
//!   killed process loses nothing committed; [`Store::commit`] with `sync` also survives
//!   power loss).
//! - Content is written to the content file before the metadata that makes it visible is
//!   committed; a content file may be longer than the inode's size after a crash, never
//!   shorter than what a committed size promises after an fsync.
//! - An inode with `nlink == 0` is an orphan (unlinked while open) and is listed under
//!   `orphan/`; [`Store::open`] removes orphans left by a crash.

pub mod absent;
mod codec;
pub mod engine_state;
pub mod sync_state;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};

use crate::changelog::ObjectId;
pub use codec::{FileKind, Inode, Timespec};
pub use sync_state::{ObjectState, PendingFlags, SyncKind};

/// Inode number of the root folder (FUSE's fixed root id).
pub const ROOT_INO: u64 = 1;

const CF_INODES: &str = "inodes";
const CF_DIRENTS: &str = "dirents";
const CF_XATTRS: &str = "xattrs";
const CF_OBJECTS: &str = "objects";
const CF_META: &str = "meta";
const ALL_CFS: [&str; 13] = [
    CF_INODES,
    CF_DIRENTS,
    CF_XATTRS,
    CF_OBJECTS,
    CF_META,
    sync_state::CF_OBJSTATE,
    sync_state::CF_PENDING,
    sync_state::CF_OUTBOX,
    sync_state::CF_SIGNATURES,
    sync_state::CF_LEAVES,
    engine_state::CF_SERVER,
    sync_state::CF_OUTBOX_OBJECTS,
    absent::CF_ABSENT,
];

const META_NEXT_INO: &[u8] = b"next_ino";
const META_FORMAT: &[u8] = b"format";
const ORPHAN_PREFIX: &[u8] = b"orphan/";
/// The on-disk layout version this build reads and writes.
const FORMAT_VERSION: u32 = 1;

/// Errors of the local store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("local store database: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("local store I/O: {0}")]
    Io(#[from] io::Error),
    #[error("local store is corrupt: {0}")]
    Corrupt(String),
    #[error(
        "local store format {found} is not supported by this build (it reads {FORMAT_VERSION})"
    )]
    Format { found: u32 },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The device's store. Cheap to share (`Arc`); all methods take `&self`.
pub struct Store {
    db: DB,
    content_dir: PathBuf,
    next_ino: AtomicU64,
    next_outbox: AtomicU64,
}

/// A group of metadata changes that commit together or not at all.
pub struct Batch<'a> {
    store: &'a Store,
    wb: WriteBatch,
    /// Files the batch makes unreferenced, removed once it has committed (a crash before
    /// that leaves them to the orphan sweep at the next open).
    unlink_after: Vec<PathBuf>,
}

/// A directory entry as listed by [`Store::list_dir`].
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
    pub kind: FileKind,
}

fn dirent_key(parent: u64, name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + name.len());
    k.extend_from_slice(&parent.to_be_bytes());
    k.extend_from_slice(name);
    k
}

fn xattr_key(ino: u64, name: &[u8]) -> Vec<u8> {
    dirent_key(ino, name)
}

fn orphan_key(ino: u64) -> Vec<u8> {
    let mut k = ORPHAN_PREFIX.to_vec();
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

impl Store {
    /// Opens (creating if needed) the store in `db_dir` with content in `content_dir`,
    /// creates the root folder on first use (owned by `root_uid:root_gid`, mode 0755),
    /// and removes orphans a crash left behind.
    ///
    /// # Errors
    /// The database cannot be opened (for instance another daemon holds its lock), its
    /// format is newer than this build, or the content folder cannot be created.
    pub fn open(
        db_dir: &Path,
        content_dir: &Path,
        root_uid: u32,
        root_gid: u32,
    ) -> Result<Arc<Store>> {
        std::fs::create_dir_all(content_dir)?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_keep_log_file_num(4);
        opts.set_max_total_wal_size(64 << 20);
        opts.increase_parallelism(2);
        let cfs = ALL_CFS.iter().map(|n| {
            let mut o = Options::default();
            o.set_compression_type(rocksdb::DBCompressionType::Zstd);
            ColumnFamilyDescriptor::new(*n, o)
        });
        let db = DB::open_cf_descriptors(&opts, db_dir, cfs)?;
        let store = Store {
            db,
            content_dir: content_dir.to_path_buf(),
            next_ino: AtomicU64::new(ROOT_INO + 1),
            next_outbox: AtomicU64::new(1),
        };
        store.init(root_uid, root_gid)?;
        Ok(Arc::new(store))
    }

    /// Opens the store for reading only, beside a daemon that has it open (for `status` and
    /// inspection). It sees what was committed when it opened.
    ///
    /// # Errors
    /// There is no store in `db_dir`, or it cannot be read.
    pub fn open_read_only(db_dir: &Path, content_dir: &Path) -> Result<Arc<Store>> {
        let opts = Options::default();
        // The daemon may roll its WAL while we list and open the files: try again then.
        let mut attempt = 0;
        let db = loop {
            // A store no daemon of this build has opened yet lacks the newer column families.
            let cfs = DB::list_cf(&opts, db_dir).map(|present| {
                ALL_CFS
                    .into_iter()
                    .filter(|c| present.iter().any(|p| p == c))
                    .collect::<Vec<&str>>()
            });
            match cfs.and_then(|cfs| DB::open_cf_for_read_only(&opts, db_dir, cfs, false)) {
                Ok(db) => break db,
                Err(e) if attempt < 20 && e.to_string().contains("No such file") => {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(25));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let store = Store {
            db,
            content_dir: content_dir.to_path_buf(),
            next_ino: AtomicU64::new(0),
            next_outbox: AtomicU64::new(0),
        };
        Ok(Arc::new(store))
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        // The column families are created at open; their absence is a programming error.
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    fn init(&self, root_uid: u32, root_gid: u32) -> Result<()> {
        let meta = self.cf(CF_META);
        match self.db.get_cf(meta, META_FORMAT)? {
            Some(v) => {
                let found = u32::from_le_bytes(v.as_slice().try_into().map_err(|_| {
                    StoreError::Corrupt("format marker has the wrong length".into())
                })?);
                if found != FORMAT_VERSION {
                    return Err(StoreError::Format { found });
                }
            }
            None => {
                let now = Timespec::now();
                let root = Inode {
                    ino: ROOT_INO,
                    object: ObjectId::ROOT,
                    kind: FileKind::Directory,
                    perm: 0o755,
                    uid: root_uid,
                    gid: root_gid,
                    nlink: 2,
                    size: 0,
                    atime: now,
                    mtime: now,
                    ctime: now,
                    crtime: now,
                    rdev: 0,
                    parent: ROOT_INO,
                    flags: 0,
                    symlink: Vec::new(),
                    name: Vec::new(),
                    links: Vec::new(),
                };
                let mut b = self.batch();
                b.put_inode(&root);
                b.wb.put_cf(meta, META_FORMAT, FORMAT_VERSION.to_le_bytes());
                b.wb.put_cf(meta, META_NEXT_INO, (ROOT_INO + 1).to_le_bytes());
                self.commit(b, true)?;
            }
        }
        let next =
            match self.db.get_cf(meta, META_NEXT_INO)? {
                Some(v) => u64::from_le_bytes(v.as_slice().try_into().map_err(|_| {
                    StoreError::Corrupt("inode counter has the wrong length".into())
                })?),
                None => return Err(StoreError::Corrupt("inode counter missing".into())),
            };
        self.next_ino.store(next, Ordering::SeqCst);
        self.next_outbox
            .store(sync_state::load_outbox_next(self)?, Ordering::SeqCst);
        self.roll_back_apply_journal()?;
        let staging = self.staging_dir();
        if staging.exists() {
            std::fs::remove_dir_all(&staging)?;
        }
        sync_state::index_outbox_once(self)?;
        sync_state::remove_orphan_payloads(self)?;
        self.remove_orphans()
    }

    /// Every key of the meta column family starting with `prefix`, with its value. Adapters
    /// keep their own state there under a prefix of their own (the watched folder:
    /// `watch/`).
    pub fn meta_range(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for item in self.db.prefix_iterator_cf(self.cf(CF_META), prefix) {
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Deletes inodes that were unlinked while open when the last daemon stopped.
    fn remove_orphans(&self) -> Result<()> {
        let meta = self.cf(CF_META);
        let mut orphans = Vec::new();
        for item in self.db.prefix_iterator_cf(meta, ORPHAN_PREFIX) {
            let (k, _) = item?;
            if !k.starts_with(ORPHAN_PREFIX) {
                break;
            }
            let raw: [u8; 8] = k[ORPHAN_PREFIX.len()..]
                .try_into()
                .map_err(|_| StoreError::Corrupt("bad orphan key".into()))?;
            orphans.push(u64::from_be_bytes(raw));
        }
        for ino in orphans {
            let mut b = self.batch();
            if let Some(inode) = self.get_inode(ino)? {
                if inode.nlink == 0 {
                    b.delete_inode(&inode)?;
                    self.remove_content(inode.ino)?;
                }
            }
            b.wb.delete_cf(meta, orphan_key(ino));
            self.commit(b, false)?;
        }
        Ok(())
    }

    /// Starts a batch of metadata changes.
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            store: self,
            wb: WriteBatch::default(),
            unlink_after: Vec::new(),
        }
    }

    /// Commits a batch atomically. With `sync`, the WAL is fsynced before returning.
    ///
    /// # Errors
    /// RocksDB refused the write (disk full, I/O error); nothing of the batch is applied.
    pub fn commit(&self, batch: Batch<'_>, sync: bool) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch.wb, &wo)?;
        for path in batch.unlink_after {
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!("removing {}: {e}", path.display());
                }
            }
        }
        Ok(())
    }

    /// Makes everything committed so far durable (fsyncs the WAL).
    pub fn sync_wal(&self) -> Result<()> {
        self.db.flush_wal(true)?;
        Ok(())
    }

    /// Allocates a fresh inode number. The counter is persisted in the batch that uses it.
    pub fn allocate_ino(&self, batch: &mut Batch<'_>) -> u64 {
        let ino = self.next_ino.fetch_add(1, Ordering::SeqCst);
        let meta = self.cf(CF_META);
        // Callers serialize namespace changes (the file system's metadata lock), so
        // batches commit in allocation order and the stored successor only grows.
        batch
            .wb
            .put_cf(meta, META_NEXT_INO, (ino + 1).to_le_bytes());
        ino
    }

    pub fn get_inode(&self, ino: u64) -> Result<Option<Inode>> {
        match self
            .db
            .get_pinned_cf(self.cf(CF_INODES), ino.to_be_bytes())?
        {
            Some(v) => Ok(Some(Inode::decode(ino, &v)?)),
            None => Ok(None),
        }
    }

    /// The inode that holds `object`, if it exists on this device.
    pub fn ino_of_object(&self, object: &ObjectId) -> Result<Option<u64>> {
        match self.db.get_pinned_cf(self.cf(CF_OBJECTS), object.0)? {
            Some(v) => {
                Ok(Some(u64::from_be_bytes(v.as_ref().try_into().map_err(
                    |_| StoreError::Corrupt("bad object index entry".into()),
                )?)))
            }
            None => Ok(None),
        }
    }

    /// The entry `name` in folder `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<(u64, FileKind)>> {
        match self
            .db
            .get_pinned_cf(self.cf(CF_DIRENTS), dirent_key(parent, name))?
        {
            Some(v) => Ok(Some(codec::decode_dirent(&v)?)),
            None => Ok(None),
        }
    }

    /// All entries of folder `parent`, in name order.
    pub fn list_dir(&self, parent: u64) -> Result<Vec<DirEntry>> {
        let mut out = Vec::new();
        self.scan_dir(parent, |e| {
            out.push(e);
            true
        })?;
        Ok(out)
    }

    /// Whether folder `parent` has no entries.
    pub fn dir_is_empty(&self, parent: u64) -> Result<bool> {
        let mut empty = true;
        self.scan_dir(parent, |_| {
            empty = false;
            false
        })?;
        Ok(empty)
    }

    fn scan_dir(&self, parent: u64, mut f: impl FnMut(DirEntry) -> bool) -> Result<()> {
        let prefix = parent.to_be_bytes();
        let mut ro = rocksdb::ReadOptions::default();
        // The exclusive upper bound is the next parent id.
        if let Some(next) = parent.checked_add(1) {
            ro.set_iterate_upper_bound(next.to_be_bytes().to_vec());
        }
        let iter = self.db.iterator_cf_opt(
            self.cf(CF_DIRENTS),
            ro,
            rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            let (ino, kind) = codec::decode_dirent(&v)?;
            let keep_going = f(DirEntry {
                name: k[8..].to_vec(),
                ino,
                kind,
            });
            if !keep_going {
                break;
            }
        }
        Ok(())
    }

    pub fn get_xattr(&self, ino: u64, name: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_XATTRS), xattr_key(ino, name))?)
    }

    /// Names of all extended attributes of `ino`.
    pub fn list_xattrs(&self, ino: u64) -> Result<Vec<Vec<u8>>> {
        let prefix = ino.to_be_bytes();
        let mut out = Vec::new();
        for item in self.db.prefix_iterator_cf(self.cf(CF_XATTRS), prefix) {
            let (k, _) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.push(k[8..].to_vec());
        }
        Ok(out)
    }

    /// The path of an inode's content file. Content is named by the local inode number,
    /// which never changes, so an object id can move between inodes in one batch (the
    /// editors' save pattern) without touching files (decision 0003).
    pub fn content_path(&self, ino: u64) -> PathBuf {
        self.content_dir
            .join(format!("{:02x}", ino & 0xff))
            .join(format!("{ino:016x}"))
    }

    /// Opens an inode's content file for reading and writing, creating it if asked.
    pub fn open_content(&self, ino: u64, create: bool) -> Result<File> {
        let path = self.content_path(ino);
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .mode(0o600)
                .open(p)
        };
        match open(&path) {
            Ok(f) => Ok(f),
            Err(e) if create && e.kind() == io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                Ok(open(&path)?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Removes an inode's content file (absent is fine).
    pub fn remove_content(&self, ino: u64) -> Result<()> {
        match std::fs::remove_file(self.content_path(ino)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Space of the disk that holds the content: (block size, blocks, free, available, files, free files).
    pub fn disk_space(&self) -> io::Result<libc::statvfs> {
        let c = std::ffi::CString::new(self.content_dir.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
        let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st)
    }
}

impl Batch<'_> {
    /// Writes (creates or replaces) an inode record and its object index entry.
    pub fn put_inode(&mut self, inode: &Inode) {
        self.wb.put_cf(
            self.store.cf(CF_INODES),
            inode.ino.to_be_bytes(),
            inode.encode(),
        );
        self.wb.put_cf(
            self.store.cf(CF_OBJECTS),
            inode.object.0,
            inode.ino.to_be_bytes(),
        );
    }

    /// Deletes an inode record, its object index entry and all its xattrs.
    ///
    /// # Errors
    /// Listing the xattrs failed.
    pub fn delete_inode(&mut self, inode: &Inode) -> Result<()> {
        self.wb
            .delete_cf(self.store.cf(CF_INODES), inode.ino.to_be_bytes());
        self.wb.delete_cf(self.store.cf(CF_OBJECTS), inode.object.0);
        self.delete_absent(inode.ino);
        for name in self.store.list_xattrs(inode.ino)? {
            self.wb
                .delete_cf(self.store.cf(CF_XATTRS), xattr_key(inode.ino, &name));
        }
        Ok(())
    }

    /// Removes an object id from the object index (its inode took another id).
    pub fn delete_object_index(&mut self, object: &ObjectId) {
        self.wb.delete_cf(self.store.cf(CF_OBJECTS), object.0);
    }

    pub fn put_dirent(&mut self, parent: u64, name: &[u8], ino: u64, kind: FileKind) {
        self.wb.put_cf(
            self.store.cf(CF_DIRENTS),
            dirent_key(parent, name),
            codec::encode_dirent(ino, kind),
        );
    }

    pub fn delete_dirent(&mut self, parent: u64, name: &[u8]) {
        self.wb
            .delete_cf(self.store.cf(CF_DIRENTS), dirent_key(parent, name));
    }

    pub fn put_xattr(&mut self, ino: u64, name: &[u8], value: &[u8]) {
        self.wb
            .put_cf(self.store.cf(CF_XATTRS), xattr_key(ino, name), value);
    }

    pub fn delete_xattr(&mut self, ino: u64, name: &[u8]) {
        self.wb
            .delete_cf(self.store.cf(CF_XATTRS), xattr_key(ino, name));
    }

    /// Marks an inode as unlinked-but-open, so a crash before its last close removes it.
    pub fn mark_orphan(&mut self, ino: u64) {
        self.wb.put_cf(self.store.cf(CF_META), orphan_key(ino), []);
    }

    pub fn clear_orphan(&mut self, ino: u64) {
        self.wb.delete_cf(self.store.cf(CF_META), orphan_key(ino));
    }

    /// Sets a key of an adapter's own range of the meta column family (see
    /// [`Store::meta_range`]).
    pub fn put_meta(&mut self, key: &[u8], value: &[u8]) {
        self.wb.put_cf(self.store.cf(CF_META), key, value);
    }

    pub fn delete_meta(&mut self, key: &[u8]) {
        self.wb.delete_cf(self.store.cf(CF_META), key);
    }
}

#[cfg(test)]
mod tests;
