//! Files on demand: online-only content fetched by range when it is read, pinned files kept
//! local, and the least recently used content evicted under a cache size.
//!
//! What it owns: the per-inode fetch locks, the last-use times of content, and the link to
//! the server ([`RemoteContent`], set by the sync driver).
//!
//! What always holds:
//! - Bytes are served only from pieces the store marks present ([`crate::store::absent`]);
//!   a missing piece is fetched by exact version (`?version=`) before the read is answered,
//!   so a file never mixes two versions. When every piece is present the whole content must
//!   have the recorded hash, or the pieces are dropped and the read fails with `EIO`.
//! - A file is made entirely local before it can be changed (opened for writing, truncated
//!   to a non-zero size), so capture computes its delta against complete content.
//! - Offline, an online-only file fails to open at once with `EIO` and a log line naming it;
//!   nothing waits for the network to come back.
//! - Eviction never touches a file that is open, pinned (itself or a folder above it), or
//!   has changes the server has not acknowledged.
//! - This is the one part of `fs/` that waits on the network, and only for reads of content
//!   that is not here.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fuser::Errno;
use parking_lot::Mutex;

use super::errors::FsResult;
use super::FsCore;
use crate::changelog::ObjectId;
use crate::delta::hash_tree::LeafHashes;
use crate::delta::{self, BlockSignature};
use crate::store::absent::{AbsentContent, CHUNK, INODE_ABSENT, INODE_PINNED};
use crate::store::{FileKind, Inode, ROOT_INO};

/// The extended attribute that pins (`1`) or unpins (`0`) a file or folder; local to this
/// device, never synced, not listed.
pub const PIN_XATTR: &[u8] = b"user.deltadrive.pinned";

/// A read that misses fetches at least this much ahead (sequential readers then wait once
/// every few MiB, not at every piece).
const READAHEAD: u64 = 4 * CHUNK;
/// The largest range one request fetches.
const MAX_FETCH: u64 = 16 * CHUNK;
/// Files larger than this are hashed when complete but get no leaf hashes or signature
/// (their first edit after hydration is sent against a fetched signature... or whole).
const MAX_PREVIOUS_STATE: u64 = crate::fs::apply::MAX_APPLY_CONTENT;

/// How the mount treats content it does not have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OnDemand {
    /// Local content of unpinned files above this many bytes is evicted, least recently
    /// used first.
    pub cache_bytes: u64,
}

/// The server side of online-only content, implemented by the sync driver.
pub trait RemoteContent: Send + Sync {
    /// Whether the server answered the last request.
    fn online(&self) -> bool;
    /// Bytes `[start, end)` of `object` at `version`; fails fast when offline.
    ///
    /// # Errors
    /// A one-line reason (unreachable, refused, short answer).
    fn fetch(
        &self,
        object: ObjectId,
        version: u64,
        start: u64,
        end: u64,
    ) -> Result<Vec<u8>, String>;
}

/// Local and online-only totals, for `status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ContentCounts {
    pub local_files: u64,
    pub local_bytes: u64,
    pub online_only_files: u64,
    /// Bytes of online-only files that are not on this device.
    pub online_only_bytes: u64,
}

/// Counts local and online-only files of a store: `None` unless it is mounted on demand or
/// has online-only files (the count reads every inode).
///
/// # Errors
/// The store cannot be read.
pub fn content_counts(store: &crate::store::Store) -> crate::store::Result<Option<ContentCounts>> {
    if !store.on_demand_mode()? && !store.has_absent()? {
        return Ok(None);
    }
    let absent: HashMap<u64, AbsentContent> = store.absent_all()?.into_iter().collect();
    let mut c = ContentCounts::default();
    store.for_each_inode(|i| {
        if i.kind == FileKind::File && i.nlink > 0 {
            match absent.get(&i.ino) {
                Some(r) if i.flags & INODE_ABSENT != 0 => {
                    c.online_only_files += 1;
                    c.online_only_bytes += r.size - r.present_bytes();
                }
                _ => {
                    c.local_files += 1;
                    c.local_bytes += i.size;
                }
            }
        }
        true
    })?;
    Ok(Some(c))
}

/// The on-demand state of a mount.
#[derive(Default)]
pub(super) struct OnDemandState {
    remote: Mutex<Option<Arc<dyn RemoteContent>>>,
    /// One lock per inode being fetched, so two readers of a piece fetch it once.
    fetching: Mutex<HashMap<u64, Arc<Mutex<()>>>>,
    /// Last use of each inode's content (ms since the epoch), for eviction.
    last_used: Mutex<HashMap<u64, u64>>,
    pub(super) fetched_bytes: std::sync::atomic::AtomicU64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn eio(what: impl std::fmt::Display) -> Errno {
    tracing::error!("{what}");
    Errno::EIO
}

impl FsCore {
    /// Connects online-only content to the server (the sync driver does this at start).
    pub fn set_remote(&self, remote: Arc<dyn RemoteContent>) {
        *self.ondemand.remote.lock() = Some(remote);
    }

    /// Bytes of online-only content fetched since the mount started.
    pub fn fetched_bytes(&self) -> u64 {
        self.ondemand.fetched_bytes.load(Ordering::Relaxed)
    }

    pub(super) fn touch_content(&self, ino: u64) {
        if self.options.on_demand.is_some() {
            self.ondemand.last_used.lock().insert(ino, now_ms());
        }
    }

    fn fetch_lock(&self, ino: u64) -> Arc<Mutex<()>> {
        self.ondemand
            .fetching
            .lock()
            .entry(ino)
            .or_default()
            .clone()
    }

    /// Whether the file or a folder above it is pinned.
    pub(super) fn is_pinned(&self, inode: &Inode) -> FsResult<bool> {
        let mut i = inode.clone();
        for _ in 0..4096 {
            if i.flags & INODE_PINNED != 0 {
                return Ok(true);
            }
            if i.ino == ROOT_INO || i.nlink == 0 {
                return Ok(false);
            }
            i = self.inode(i.parent)?;
        }
        Ok(false)
    }

    /// An online-only file about to be opened: refused at once when offline; its content
    /// file sized; made entirely local first when it is opened for writing.
    pub(super) fn open_absent(&self, i: &Inode, write: bool) -> FsResult<()> {
        let online = self.ondemand.remote.lock().as_ref().map(|r| r.online());
        if online != Some(true) {
            let name = String::from_utf8_lossy(&i.name);
            tracing::error!(
                "cannot open {name:?}: its content is online-only and the server cannot be \
                 reached"
            );
            return Err(Errno::EIO);
        }
        let file = self.store.open_content(i.ino, true)?;
        if file.metadata()?.len() != i.size {
            file.set_len(i.size)?;
        }
        if write {
            self.make_local(i.ino, 0, i.size, &file, true)?;
        }
        Ok(())
    }

    /// Makes `[start, end)` of inode `ino`'s content local (with read-ahead); with `all`,
    /// the whole file. Nothing to do for a local file.
    pub(super) fn make_local(
        &self,
        ino: u64,
        start: u64,
        end: u64,
        file: &File,
        all: bool,
    ) -> FsResult<()> {
        let lock = self.fetch_lock(ino);
        let _l = lock.lock();
        let Some(mut rec) = self.store.absent(ino)? else {
            return Ok(());
        };
        let (from, to) = if all {
            (0, rec.size)
        } else {
            (start, end.max(start.saturating_add(READAHEAD)))
        };
        // Read-ahead only where the asked range itself misses something.
        if !all && rec.missing(start, end, MAX_FETCH).is_empty() {
            return Ok(());
        }
        let runs = rec.missing(from, to, MAX_FETCH);
        if !runs.is_empty() {
            let remote = self.ondemand.remote.lock().clone();
            let Some(remote) = remote else {
                return Err(eio(format_args!(
                    "inode {ino}: online-only content but no server connection"
                )));
            };
            let name = self
                .store
                .get_inode(ino)?
                .map(|i| i.name)
                .unwrap_or_default();
            let name = String::from_utf8_lossy(&name);
            for (a, b) in runs {
                let bytes = remote
                    .fetch(rec.object, rec.version, a, b)
                    .map_err(|e| eio(format_args!("fetching {name:?} bytes {a}..{b}: {e}")))?;
                if bytes.len() as u64 != b - a {
                    return Err(eio(format_args!(
                        "fetching {name:?} bytes {a}..{b}: the server sent {} bytes",
                        bytes.len()
                    )));
                }
                file.write_all_at(&bytes, a)?;
                self.ondemand
                    .fetched_bytes
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                for c in a / CHUNK..b.div_ceil(CHUNK) {
                    rec.mark(c);
                }
                tracing::debug!("fetched {name:?} bytes {a}..{b}");
            }
        }
        if rec.complete() {
            self.finish_local(ino, rec, file)
        } else {
            let _g = self.lock();
            if self.store.absent(ino)?.map(|r| r.version) == Some(rec.version) {
                let mut b = self.store.batch();
                b.put_absent(ino, &rec);
                self.store.commit(b, false)?;
            }
            Ok(())
        }
    }

    /// Every piece is here: check the whole content and make the file local.
    fn finish_local(&self, ino: u64, rec: AbsentContent, file: &File) -> FsResult<()> {
        file.sync_data()?;
        let keep_state = rec.size <= MAX_PREVIOUS_STATE;
        let mut content = Vec::new();
        let hash = if keep_state {
            content = vec![0u8; rec.size as usize];
            file.read_exact_at(&mut content, 0)?;
            *blake3::hash(&content).as_bytes()
        } else {
            let mut h = blake3::Hasher::new();
            let mut buf = vec![0u8; CHUNK as usize];
            let mut off = 0;
            while off < rec.size {
                let n = (rec.size - off).min(CHUNK) as usize;
                file.read_exact_at(&mut buf[..n], off)?;
                h.update(&buf[..n]);
                off += n as u64;
            }
            *h.finalize().as_bytes()
        };
        let _g = self.lock();
        let mut b = self.store.batch();
        if hash != rec.hash {
            // Drop every piece: the next read fetches them again.
            let fresh = AbsentContent::new(rec.object, rec.version, rec.hash, rec.size);
            if self.store.absent(ino)?.map(|r| r.version) == Some(rec.version) {
                b.put_absent(ino, &fresh);
                self.store.commit(b, false)?;
            }
            return Err(eio(format_args!(
                "the fetched content of inode {ino} does not have its hash; fetching again at \
                 the next read"
            )));
        }
        let Some(mut i) = self.store.get_inode(ino)? else {
            return Ok(());
        };
        if self.store.absent(ino)?.map(|r| r.version) != Some(rec.version) {
            return Ok(());
        }
        i.flags &= !INODE_ABSENT;
        b.put_inode(&i);
        b.delete_absent(ino);
        let synced = self
            .store
            .object_state(&i.object)?
            .is_some_and(|s| s.hash == rec.hash);
        if keep_state && synced {
            b.put_leaves(&i.object, &LeafHashes::of(&content).encode());
            if rec.size > delta::strategy::SMALL_FILE_MAX {
                b.put_signature(&i.object, &BlockSignature::calculate(&content).to_bytes());
            } else {
                b.delete_signature(&i.object);
            }
        }
        self.store.commit(b, false)?;
        tracing::debug!(
            "{:?} is local now ({} bytes)",
            String::from_utf8_lossy(&i.name),
            rec.size
        );
        Ok(())
    }

    /// Sets or clears the pin of a file or folder (`user.deltadrive.pinned`).
    pub(super) fn set_pinned(&self, ino: u64, value: &[u8]) -> FsResult<()> {
        let pin = match value {
            b"1" | b"1\n" | b"true" | b"yes" => true,
            b"0" | b"0\n" | b"false" | b"no" | b"" => false,
            _ => return Err(Errno::EINVAL),
        };
        let _g = self.lock();
        let mut i = self.inode(ino)?;
        if !matches!(i.kind, FileKind::File | FileKind::Directory) {
            return Err(Errno::EINVAL);
        }
        if pin {
            i.flags |= INODE_PINNED;
        } else {
            i.flags &= !INODE_PINNED;
        }
        let mut b = self.store.batch();
        b.put_inode(&i);
        self.store.commit(b, false)?;
        Ok(())
    }

    /// The eviction pass: while local content of unpinned files exceeds the cache size,
    /// the least recently used file that is closed, synced and unpinned goes online-only.
    /// Returns the bytes freed.
    ///
    /// # Errors
    /// The store cannot be read or written.
    pub fn evict(&self) -> crate::store::Result<u64> {
        let Some(od) = self.options.on_demand else {
            return Ok(0);
        };
        // Candidates: local files, with their size and last use.
        let mut local: Vec<(u64, u64, u64)> = Vec::new();
        let mut total = 0u64;
        let absent: HashMap<u64, u64> = self
            .store
            .absent_all()?
            .into_iter()
            .map(|(ino, r)| (ino, r.present_bytes()))
            .collect();
        {
            let used = self.ondemand.last_used.lock();
            self.store.for_each_inode(|i| {
                if i.kind == FileKind::File && i.nlink > 0 {
                    let t = used
                        .get(&i.ino)
                        .copied()
                        .unwrap_or((i.atime.as_nanos().max(i.mtime.as_nanos()) / 1_000_000) as u64);
                    match absent.get(&i.ino) {
                        // Pieces of a partly read online-only file count and can go too.
                        Some(present) => {
                            total += present;
                            if *present > 0 {
                                local.push((t, i.ino, *present));
                            }
                        }
                        None => {
                            total += i.size;
                            local.push((t, i.ino, i.size));
                        }
                    }
                }
                true
            })?;
        }
        if total <= od.cache_bytes {
            return Ok(0);
        }
        local.sort_unstable();
        let mut freed = 0u64;
        for (_, ino, size) in local {
            if total <= od.cache_bytes {
                break;
            }
            if size == 0 {
                continue;
            }
            match self.evict_one(ino) {
                Ok(true) => {
                    total = total.saturating_sub(size);
                    freed += size;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!("evicting inode {ino}: {e:?}"),
            }
        }
        if freed > 0 {
            tracing::info!(
                "evicted {freed} bytes of content (cache size {})",
                od.cache_bytes
            );
        }
        Ok(freed)
    }

    /// Makes one local file online-only if it may be (not open, not pinned, synced), or drops
    /// the fetched pieces of a partly read online-only file that is not open.
    fn evict_one(&self, ino: u64) -> FsResult<bool> {
        let _g = self.lock();
        let Some(mut i) = self.store.get_inode(ino)? else {
            return Ok(false);
        };
        if i.kind == FileKind::File && i.nlink > 0 && !self.is_open(ino) && !self.is_pinned(&i)? {
            if let Some(mut rec) = self.store.absent(ino)? {
                // A partly read online-only file: drop its pieces, unless they are being
                // fetched right now (an open for writing makes a file whole before its
                // handle counts as open).
                let lock = self.fetch_lock(ino);
                let Some(_fetching) = lock.try_lock() else {
                    return Ok(false);
                };
                rec.present.iter_mut().for_each(|b| *b = 0);
                let mut b = self.store.batch();
                b.put_absent(ino, &rec);
                self.store.commit(b, true)?;
                self.drop_local_bytes(ino, i.size)?;
                return Ok(true);
            }
        }
        if i.kind != FileKind::File
            || i.nlink == 0
            || i.flags & INODE_ABSENT != 0
            || self.is_open(ino)
            || self.is_pinned(&i)?
            || self.capture.has_pending(&i.object)
            || self.store.outbox_touches(&i.object)?
        {
            return Ok(false);
        }
        let Some(server) = self.store.server_object(&i.object)? else {
            return Ok(false);
        };
        let Some(prev) = self.store.object_state(&i.object)? else {
            return Ok(false);
        };
        if server.hash != prev.hash || server.size != i.size {
            return Ok(false);
        }
        let rec = AbsentContent::new(i.object, server.content_version, server.hash, i.size);
        i.flags |= INODE_ABSENT;
        let mut b = self.store.batch();
        b.put_inode(&i);
        b.put_absent(ino, &rec);
        self.store.commit(b, true)?;
        // The bytes go only after the record says they are not here.
        self.drop_local_bytes(ino, i.size)?;
        self.replaced.lock().insert(ino);
        Ok(true)
    }

    /// Frees the content file's bytes (it stays, sparse, at `size`); called once the store
    /// records that no piece of it is present.
    fn drop_local_bytes(&self, ino: u64, size: u64) -> FsResult<()> {
        let file = self.store.open_content(ino, true)?;
        file.set_len(0)?;
        file.set_len(size)?;
        self.ondemand.last_used.lock().remove(&ino);
        Ok(())
    }
}
