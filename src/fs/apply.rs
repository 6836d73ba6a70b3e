//! Applying one remote transaction to the mounted tree: the adapter between the sync
//! engine's [`LocalApply`] and the store.
//!
//! An apply runs in two phases (decision 0017). Phase one, outside every lock, is the sync
//! driver's: it asks [`FsCore::content_needs`] which new content cannot be built here from
//! local bytes cheaply (content to fetch, deltas of big files, delta bytes a light pull left
//! out) and stages each on disk, named by its hash ([`StagedContent`]). Phase two is
//! [`FsCore::apply_remote`], under the metadata lock: it only checks, journals, swaps
//! (staged files are linked into place, never copied through memory) and commits. It never
//! touches the network; content it needs that was not staged fails the apply unchanged.
//!
//! What always holds:
//! - All or nothing. New content is built and checked in staging files first; then a
//!   journal (fsynced) names each content file about to be replaced; then the files are
//!   swapped by rename; then one write batch commits the metadata, the engine's state
//!   (server tree, cursor, outbox) and clears the journal. A failure before the batch
//!   commits puts the previous content back; a crash there is rolled back at the next open
//!   ([`crate::store::Store::roll_back_apply_journal`]).
//! - Runs under the file system's metadata lock with nothing pending (the caller seals
//!   first), so the engine's local tree and the store agree on every object it touches.
//! - A file open on this device keeps its content file open: the rename leaves that handle
//!   on the previous content until it is closed; new opens see the new version.
//! - What the kernel cached about every changed inode and entry is invalidated afterwards
//!   (the caller sends [`Invalidation`]s outside the lock).

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::PathBuf;

use crate::changelog::payload::PayloadIndex;
use crate::changelog::{ContentHash, ObjectId, ObjectKind, OpKind, Transaction, Version};
use crate::delta::hash_tree::LeafHashes;
use crate::delta::{self, BlockSignature};
use crate::engine::{self, ContentSource, LocalApply, LocalChange, ServerChange};
use crate::store::absent::{AbsentContent, INODE_ABSENT};
use crate::store::engine_state::JournalEntry;
use crate::store::{
    FileKind, Inode, ObjectState as PrevState, Store, StoreError, SyncKind, Timespec, ROOT_INO,
};

use super::FsCore;

/// From this many staged files on, an apply makes them durable with one `syncfs`.
const SYNCFS_FROM: usize = 16;

/// Largest file content an apply builds in memory.
pub const MAX_APPLY_CONTENT: u64 = 4 << 30;

/// What the kernel must forget after an apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invalidation {
    /// The attributes and cached pages of an inode.
    Inode(u64),
    /// A name in a folder (it appeared, disappeared or points elsewhere).
    Entry { parent: u64, name: Vec<u8> },
}

/// Why an apply could not be done. Nothing of it was kept.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The content could not be built from the local content and the remote ops (the local
    /// content differs from what the engine expects, or a delta is corrupt): heal by
    /// fetching.
    #[error("content of {object}: {reason}")]
    Content { object: ObjectId, reason: String },
    /// Content could not be fetched from the server.
    #[error("fetching the content of {object}: {reason}")]
    Fetch { object: ObjectId, reason: String },
    /// The store or the disk failed (disk full, I/O error).
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The result of a successful apply.
#[derive(Debug, Default)]
pub struct Applied {
    /// The copy transactions now in the outbox, to hand to the engine in order.
    pub copies: Vec<Transaction>,
    pub invalidations: Vec<Invalidation>,
    /// Conflicted copies made by this apply (their names).
    pub conflicted: Vec<Vec<u8>>,
    /// Replaced content files, no longer named by anything: the caller removes them after
    /// releasing the lock (unlinking a big file takes time).
    pub to_remove: Vec<PathBuf>,
}

/// Files from this size on are never built in memory under the lock: their new content is
/// staged by the driver first.
pub const STAGE_FROM: u64 = 1 << 20;

/// New content staged on disk by phase one, already checked against its hash.
#[derive(Debug)]
pub struct StagedFile {
    /// The file, on the same file system as the content files (it is linked into place).
    pub path: PathBuf,
    pub size: u64,
    /// The content's 1 MiB leaf hashes (the capture layer's previous state).
    pub leaves: LeafHashes,
    /// Its rsync signature, for content over [`delta::strategy::SMALL_FILE_MAX`].
    pub signature: Option<BlockSignature>,
}

/// Staged content by content hash (content of a hash is the same whatever object has it).
pub type StagedContent = HashMap<ContentHash, StagedFile>;

/// New content an apply needs staged before it can run under the lock.
#[derive(Clone, Debug)]
pub struct ContentNeed {
    pub object: ObjectId,
    /// The file's name, for messages.
    pub name: Vec<u8>,
    pub hash: ContentHash,
    pub size: u64,
    /// The version to fetch whole (`GET /v1/objects/{id}/content?version=V`).
    pub version: Version,
    /// Built by the apply's ops over the local content (else fetched whole).
    pub from_delta: bool,
    /// The inode whose content is the ops' base, if the object is here.
    pub base_ino: Option<u64>,
    /// The ops came from a light pull: their delta bytes must be read from the log first.
    pub light: bool,
}

fn file_kind(k: &ObjectKind) -> FileKind {
    match k {
        ObjectKind::File => FileKind::File,
        ObjectKind::Directory => FileKind::Directory,
        ObjectKind::Symlink { .. } => FileKind::Symlink,
    }
}

fn sync_kind(k: &ObjectKind) -> SyncKind {
    match k {
        ObjectKind::File => SyncKind::File,
        ObjectKind::Directory => SyncKind::Directory,
        ObjectKind::Symlink { .. } => SyncKind::Symlink,
    }
}

fn timespec(ns: i64) -> Timespec {
    Timespec {
        secs: ns.div_euclid(1_000_000_000),
        nsec: ns.rem_euclid(1_000_000_000) as u32,
    }
}

/// The engine's view of an object as the capture layer's previous state.
pub(crate) fn prev_state(s: &engine::ObjectState, old: Option<&PrevState>) -> PrevState {
    PrevState {
        version: s.version,
        kind: sync_kind(&s.kind),
        parent: s.parent,
        name: s.name.0.clone(),
        links: s.links.iter().map(|(p, n)| (*p, n.0.clone())).collect(),
        mode: s.mode,
        mtime_ns: s.mtime_ns,
        hash: s.hash,
        size: s.size,
        strategy: old.map(|o| o.strategy).unwrap_or(0),
        last_ratio_permille: old.map(|o| o.last_ratio_permille).unwrap_or(0),
        xattrs: s
            .xattrs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

fn read_content(store: &Store, ino: u64, size_hint: u64) -> Result<Vec<u8>, ApplyError> {
    if size_hint > MAX_APPLY_CONTENT {
        return Err(ApplyError::Content {
            object: ObjectId::ROOT,
            reason: format!("{size_hint} bytes is more than an apply builds in memory"),
        });
    }
    match std::fs::read(store.content_path(ino)) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

/// Applies the `Write`/`Truncate` ops of a remote transaction to `base` (as the rules of
/// [`crate::rules::content`] build content).
fn apply_ops(object: ObjectId, mut content: Vec<u8>, ops: &[OpKind]) -> Result<Vec<u8>, String> {
    let limit = usize::try_from(MAX_APPLY_CONTENT).unwrap_or(usize::MAX);
    for change in ops.iter().filter_map(crate::rules::ContentChange::of) {
        content = change
            .apply_to(object, content, limit)
            .map_err(|e| e.to_string())?;
    }
    Ok(content)
}

/// New content of one file in an apply.
enum NewContent {
    /// Built under the lock (small files, conflicted copies).
    Bytes(Vec<u8>),
    /// Staged on disk by phase one.
    File(PathBuf),
}

struct Staged {
    ino: u64,
    object: ObjectId,
    content: NewContent,
    leaves: LeafHashes,
    signature: Option<BlockSignature>,
}

impl Staged {
    fn bytes(ino: u64, object: ObjectId, content: Vec<u8>) -> Staged {
        let leaves = LeafHashes::of(&content);
        let signature = (content.len() as u64 > delta::strategy::SMALL_FILE_MAX)
            .then(|| BlockSignature::calculate(&content));
        Staged {
            ino,
            object,
            content: NewContent::Bytes(content),
            leaves,
            signature,
        }
    }
}

impl FsCore {
    /// Applies one remote transaction (see the module docs). Call with the metadata lock
    /// held ([`FsCore::sync_lock`]) and nothing pending.
    ///
    /// # Errors
    /// [`ApplyError`]; nothing was changed then.
    pub(crate) fn apply_remote(
        &self,
        a: &LocalApply,
        device: &str,
        now_ms: i64,
        staged_content: &StagedContent,
    ) -> Result<Applied, ApplyError> {
        let store = &*self.store;
        let mut out = Applied::default();
        let now = Timespec::now();

        // 1. Copies read their source before anything changes.
        let mut copy_content = Vec::with_capacity(a.copies.len());
        for c in &a.copies {
            let content = match store.ino_of_object(&c.source)? {
                Some(ino) => {
                    if store.absent(ino)?.is_some() {
                        // A copy keeps local changes, and changed files are always local.
                        return Err(ApplyError::Content {
                            object: c.source,
                            reason: "the source of a copy is online-only".into(),
                        });
                    }
                    read_content(store, ino, c.source_size)?
                }
                None => Vec::new(),
            };
            copy_content.push(content);
        }

        // 2. New content, built and checked in memory.
        let mut inos: HashMap<ObjectId, u64> = HashMap::new();
        let mut inodes: HashMap<u64, Inode> = HashMap::new();
        let mut new_objects: Vec<ObjectId> = Vec::new();
        let mut reinoded: HashSet<ObjectId> = HashSet::new();
        let mut orphaned: Vec<Inode> = Vec::new();
        let mut b = store.batch();
        let mut staged: Vec<Staged> = Vec::new();
        // Files on demand: files whose new content stays on the server, with their records.
        let mut online_only: HashMap<u64, AbsentContent> = HashMap::new();
        for ch in &a.local_changes {
            let LocalChange::Put { state, content } = ch else {
                continue;
            };
            let existing = match store.ino_of_object(&state.id)? {
                Some(ino) => store.get_inode(ino)?.filter(|i| i.object == state.id),
                None => None,
            };
            let replaces_content = state.is_file() && *content != ContentSource::Unchanged;
            let (ino, base) = match existing {
                // A file open here keeps its inode and content for its open handles (like
                // a file renamed over on a local disk); the new version gets a new inode.
                Some(i) if replaces_content && self.is_open(i.ino) => {
                    let new_ino = store.allocate_ino(&mut b);
                    let mut ni = i.clone();
                    ni.ino = new_ino;
                    inodes.insert(new_ino, ni);
                    reinoded.insert(state.id);
                    let base = Some((i.ino, i.size));
                    orphaned.push(i);
                    (new_ino, base)
                }
                Some(i) => {
                    let ino = i.ino;
                    let base = Some((ino, i.size));
                    inodes.insert(ino, i);
                    (ino, base)
                }
                None => {
                    let ino = store.allocate_ino(&mut b);
                    new_objects.push(state.id);
                    (ino, None)
                }
            };
            inos.insert(state.id, ino);
            if !state.is_file() {
                continue;
            }
            if *content != ContentSource::Unchanged && self.keeps_online_only(a, state)? {
                online_only.insert(
                    ino,
                    AbsentContent::new(state.id, state.content_version, state.hash, state.size),
                );
                continue;
            }
            // A delta needs the previous content: fetch whole if it is not here.
            let base_absent = match base {
                Some((base_ino, _)) => store.absent(base_ino)?.is_some(),
                None => false,
            };
            let fetch_whole = ContentSource::Fetch {
                version: state.content_version,
                hash: state.hash,
            };
            let content = match content {
                ContentSource::Ops(_) if base_absent => &fetch_whole,
                other => other,
            };
            if let Some(f) = staged_content
                .get(&state.hash)
                .filter(|f| f.size == state.size && f.path.exists())
            {
                staged.push(Staged {
                    ino,
                    object: state.id,
                    content: NewContent::File(f.path.clone()),
                    leaves: f.leaves.clone(),
                    signature: f.signature.clone(),
                });
                continue;
            }
            let unstaged = |reason: &str| ApplyError::Fetch {
                object: state.id,
                reason: format!("{reason}: its content was not staged"),
            };
            let bytes = match content {
                ContentSource::Unchanged => continue,
                ContentSource::Ops(_) if self.options.on_demand.is_some() => {
                    return Err(unstaged("a light pull carries no delta bytes"));
                }
                ContentSource::Ops(ops) => {
                    let base = match base {
                        Some((base_ino, size)) => {
                            read_content(store, base_ino, state.size.max(size))?
                        }
                        None => Vec::new(),
                    };
                    apply_ops(state.id, base, ops).map_err(|reason| ApplyError::Content {
                        object: state.id,
                        reason,
                    })?
                }
                ContentSource::Fetch { .. } => {
                    return Err(unstaged("it comes from the server"));
                }
            };
            check_hash(state.id, &bytes, &state.hash)?;
            staged.push(Staged::bytes(ino, state.id, bytes));
        }

        // 3. Metadata: removals, then moves and new objects, in one batch.
        let mut removed_inos: Vec<Inode> = Vec::new();
        // Entries as they will be after the batch: (parent ino, name) -> ino (None: gone).
        let mut entries: HashMap<(u64, Vec<u8>), Option<u64>> = HashMap::new();
        let mut parents_touched: HashSet<u64> = HashSet::new();
        let mut nlink_delta: HashMap<u64, i64> = HashMap::new();
        let kept = self.folders_to_keep(a)?;
        for ch in &a.local_changes {
            let LocalChange::Remove(id) = ch else {
                continue;
            };
            let Some(ino) = store.ino_of_object(id)? else {
                continue;
            };
            let Some(i) = store.get_inode(ino)?.filter(|i| i.object == *id) else {
                continue;
            };
            if kept.contains(id) {
                // It holds local files the remote change does not know (ignored ones): the
                // folder stays, as a new object announced again at the next seal.
                let mut k = i.clone();
                k.object = ObjectId::random();
                k.ctime = now;
                b.delete_object_index(id);
                b.put_inode(&k);
                b.delete_object_state(id);
                b.clear_pending(id);
                self.capture.drop_pending(id);
                self.capture.touch(&mut b, &k, false);
                tracing::warn!(
                    "a remote change deleted folder {:?}, which holds files this device does \
                     not sync; the folder stays here",
                    String::from_utf8_lossy(&i.name)
                );
                continue;
            }
            for (parent, name) in i.names() {
                b.delete_dirent(parent, name);
                entries.insert((parent, name.to_vec()), None);
                parents_touched.insert(parent);
                if i.kind == FileKind::Directory {
                    *nlink_delta.entry(parent).or_insert(0) -= 1;
                }
                out.invalidations.push(Invalidation::Entry {
                    parent,
                    name: name.to_vec(),
                });
            }
            b.delete_object_state(id);
            b.clear_pending(id);
            self.capture.drop_pending(id);
            removed_inos.push(i);
        }
        // Detach every moved object from its old place first.
        let mut placements: Vec<(ObjectId, u64, Vec<u8>)> = Vec::new();
        for ch in &a.local_changes {
            let LocalChange::Put { state, .. } = ch else {
                continue;
            };
            if state.id == ObjectId::ROOT {
                continue;
            }
            let ino = inos[&state.id];
            // Every name the object has (a file may have several: hard links).
            let mut want: Vec<(u64, Vec<u8>)> = Vec::with_capacity(state.name_count());
            for (parent, name) in state.names() {
                want.push((self.resolve_parent(parent, &inos)?, name.0.clone()));
            }
            if let Some(i) = inodes.get(&ino) {
                let mut have: Vec<(u64, Vec<u8>)> =
                    i.names().map(|(p, n)| (p, n.to_vec())).collect();
                have.sort();
                let mut sorted = want.clone();
                sorted.sort();
                if have == sorted && !reinoded.contains(&state.id) {
                    continue;
                }
                for (parent, name) in i.names() {
                    b.delete_dirent(parent, name);
                    entries.insert((parent, name.to_vec()), None);
                    parents_touched.insert(parent);
                    out.invalidations.push(Invalidation::Entry {
                        parent,
                        name: name.to_vec(),
                    });
                    if i.kind == FileKind::Directory {
                        *nlink_delta.entry(parent).or_insert(0) -= 1;
                    }
                }
            }
            for (parent_ino, name) in want {
                placements.push((state.id, parent_ino, name));
            }
        }
        for ch in &a.local_changes {
            let LocalChange::Put { state, .. } = ch else {
                continue;
            };
            let ino = inos[&state.id];
            let (parent_ino, name) = if state.id == ObjectId::ROOT {
                (ROOT_INO, Vec::new())
            } else {
                (
                    self.resolve_parent(state.parent, &inos)?,
                    state.name.0.clone(),
                )
            };
            let mut i = inodes.remove(&ino).unwrap_or_else(|| {
                self.fresh_inode(ino, state.id, file_kind(&state.kind), parent_ino, now)
            });
            if i.kind != file_kind(&state.kind) {
                return Err(ApplyError::Content {
                    object: state.id,
                    reason: "the object changed its kind".into(),
                });
            }
            i.perm = (state.mode & REMOTE_MODE_BITS) as u16;
            if !state.is_dir() {
                i.mtime = timespec(state.mtime_ns);
            }
            i.ctime = now;
            match &state.kind {
                ObjectKind::File => i.size = state.size,
                ObjectKind::Symlink { target } => {
                    i.symlink = target.clone();
                    i.size = target.len() as u64;
                }
                ObjectKind::Directory => {}
            }
            i.parent = parent_ino;
            i.name = name;
            i.links.clear();
            for (parent, name) in state.links.iter() {
                i.links
                    .push((self.resolve_parent(*parent, &inos)?, name.0.clone()));
            }
            if i.kind != FileKind::Directory {
                i.nlink = state.name_count() as u32;
            }
            if let Some(rec) = online_only.get(&ino) {
                i.flags |= INODE_ABSENT;
                b.put_absent(ino, rec);
                // The previous state of content that is not here is built when it arrives.
                b.delete_leaves(&state.id);
                b.delete_signature(&state.id);
                self.capture.forget(ino);
            } else if staged.iter().any(|s| s.ino == ino) && i.flags & INODE_ABSENT != 0 {
                i.flags &= !INODE_ABSENT;
                b.delete_absent(ino);
            }
            // Xattrs: exactly the engine's set.
            let current: HashSet<Vec<u8>> = store.list_xattrs(ino)?.into_iter().collect();
            for n in &current {
                if !state.xattrs.contains_key(n) {
                    b.delete_xattr(ino, n);
                }
            }
            for (n, v) in &state.xattrs {
                b.put_xattr(ino, n, v);
            }
            inodes.insert(ino, i);
            let old = store.object_state(&state.id)?;
            b.put_object_state(&state.id, &prev_state(state, old.as_ref()));
            b.clear_pending(&state.id);
            out.invalidations.push(Invalidation::Inode(ino));
        }
        // Copies: new objects (or a file coming back under its own id).
        let mut copy_txs = Vec::with_capacity(a.copies.len());
        for (c, content) in a.copies.iter().zip(copy_content) {
            let tx = c.transaction(device, now_ms, content.clone());
            let existing = match store.ino_of_object(&c.target.id)? {
                Some(ino) => store.get_inode(ino)?.filter(|i| i.object == c.target.id),
                None => None,
            };
            let parent_ino = self.resolve_parent(c.target.parent, &inos)?;
            let mut i = match existing {
                Some(i) => {
                    for (parent, name) in i.names() {
                        if parent != parent_ino || name != c.target.name.0.as_slice() {
                            b.delete_dirent(parent, name);
                            entries.insert((parent, name.to_vec()), None);
                            parents_touched.insert(parent);
                            out.invalidations.push(Invalidation::Entry {
                                parent,
                                name: name.to_vec(),
                            });
                        }
                    }
                    i
                }
                None => {
                    let ino = store.allocate_ino(&mut b);
                    self.fresh_inode(ino, c.target.id, FileKind::File, parent_ino, now)
                }
            };
            if c.target.id != c.source {
                i.flags |= crate::store::absent::INODE_CONFLICT;
            }
            i.perm = (c.target.mode & REMOTE_MODE_BITS) as u16;
            i.mtime = timespec(c.target.mtime_ns);
            i.ctime = now;
            i.size = content.len() as u64;
            i.parent = parent_ino;
            i.name = c.target.name.0.clone();
            i.links.clear();
            i.nlink = 1;
            for n in store.list_xattrs(i.ino)? {
                if !c.target.xattrs.contains_key(&n) {
                    b.delete_xattr(i.ino, &n);
                }
            }
            for (n, v) in &c.target.xattrs {
                b.put_xattr(i.ino, n, v);
            }
            let mut st = c.target.clone();
            st.version = tx.ops.len() as u64;
            st.hash = *blake3::hash(&content).as_bytes();
            st.size = content.len() as u64;
            b.put_object_state(&st.id, &prev_state(&st, None));
            b.clear_pending(&st.id);
            placements.push((st.id, parent_ino, st.name.0.clone()));
            inos.insert(st.id, i.ino);
            out.invalidations.push(Invalidation::Inode(i.ino));
            if c.target.id != c.source {
                out.conflicted.push(c.target.name.0.clone());
            }
            staged.push(Staged::bytes(i.ino, st.id, content));
            inodes.insert(i.ino, i);
            copy_txs.push(tx);
        }
        // Place every moved or new object; a local-only entry in the way steps aside.
        for (id, parent_ino, name) in &placements {
            let ino = inos[id];
            let taken = match entries.get(&(*parent_ino, name.clone())) {
                Some(Some(other)) => Some(*other),
                Some(None) => None,
                None => store.lookup(*parent_ino, name)?.map(|(i, _)| i),
            };
            if let Some(other) = taken.filter(|o| *o != ino) {
                self.step_aside(&mut b, other, *parent_ino, name, &mut entries, &mut out)?;
            }
            let i = &inodes[&ino];
            b.put_dirent(*parent_ino, name, ino, i.kind);
            entries.insert((*parent_ino, name.clone()), Some(ino));
            parents_touched.insert(*parent_ino);
            if i.kind == FileKind::Directory {
                *nlink_delta.entry(*parent_ino).or_insert(0) += 1;
            }
            out.invalidations.push(Invalidation::Entry {
                parent: *parent_ino,
                name: name.clone(),
            });
        }
        for old in &orphaned {
            // Only its open handles hold it now; the last close removes it.
            let mut o = old.clone();
            o.nlink = 0;
            o.ctime = now;
            b.put_inode(&o);
            b.mark_orphan(o.ino);
            out.invalidations.push(Invalidation::Inode(o.ino));
        }
        // After the orphans: the object index must name the new inodes.
        for i in inodes.values() {
            b.put_inode(i);
        }
        for p in &parents_touched {
            let mut pi = match inodes.get(p) {
                Some(i) => i.clone(),
                None => match store.get_inode(*p)? {
                    Some(i) => i,
                    None => continue,
                },
            };
            if removed_inos.iter().any(|r| r.ino == *p) {
                continue;
            }
            let d = nlink_delta.get(p).copied().unwrap_or(0);
            pi.nlink = (i64::from(pi.nlink) + d).max(2) as u32;
            pi.mtime = now;
            pi.ctime = now;
            b.put_inode(&pi);
            out.invalidations.push(Invalidation::Inode(*p));
        }
        let mut delete_content = Vec::new();
        for i in &removed_inos {
            if i.kind == FileKind::Directory || !self.is_open(i.ino) {
                b.delete_inode(i)?;
                self.capture.forget(i.ino);
                delete_content.push(i.ino);
            } else {
                let mut orphan = i.clone();
                orphan.nlink = 0;
                orphan.ctime = now;
                b.put_inode(&orphan);
                b.delete_object_index(&i.object);
                b.mark_orphan(i.ino);
                // Writes through its open handles are kept as a copy at close.
                orphaned.push(i.clone());
            }
            out.invalidations.push(Invalidation::Inode(i.ino));
        }
        for s in &staged {
            self.capture.forget(s.ino);
            b.put_leaves(&s.object, &s.leaves.encode());
            match &s.signature {
                Some(sig) => b.put_signature(&s.object, &sig.to_bytes()),
                None => b.delete_signature(&s.object),
            }
        }

        // 4. The engine's state.
        if !a.acknowledged.is_empty() || a.outbox.is_some() {
            // Only the acknowledged front is read unless the whole outbox is replaced.
            let seqs = store.outbox_seqs(if a.outbox.is_some() {
                usize::MAX
            } else {
                a.acknowledged.len()
            })?;
            let drop_n = if a.outbox.is_some() {
                seqs.len()
            } else {
                a.acknowledged.len().min(seqs.len())
            };
            for s in &seqs[..drop_n] {
                b.remove_outbox(*s);
            }
            if let Some(rest) = &a.outbox {
                // The engine's rebased outbox carries no delta bytes: take them from the
                // entries it replaces (a rebase renumbers versions, never a write's hashes).
                let wanted: HashSet<[u8; 16]> = rest.iter().map(|t| t.id).collect();
                let mut full = Vec::new();
                let mut bad = None;
                store.for_each_outbox(|_, enc| {
                    match crate::changelog::decode_transaction(enc) {
                        Ok(t) if wanted.contains(&t.id) => full.push(t),
                        Ok(_) => {}
                        Err(e) => bad = Some(e.to_string()),
                    }
                    true
                })?;
                if let Some(e) = bad {
                    return Err(StoreError::Corrupt(format!("outbox entry unreadable: {e}")).into());
                }
                let index = PayloadIndex::new(full);
                for t in rest {
                    let filled = index.fill(t).ok_or_else(|| {
                        StoreError::Corrupt(format!(
                            "the bytes of rebased transaction {} are not in the outbox",
                            hex::encode(t.id)
                        ))
                    })?;
                    b.push_outbox(&filled)?;
                }
            }
        }
        for t in &copy_txs {
            b.push_outbox(t)?;
        }
        for sc in &a.server_changes {
            match sc {
                ServerChange::Put(s) => b.put_server_object(s),
                ServerChange::Remove(id) => b.delete_server_object(id),
            }
        }
        b.set_sync_cursor(a.cursor);

        // 5. Swap content files (journaled), then commit.
        let swapped = self.swap_content(&staged)?;
        if !swapped.is_empty() {
            b.clear_apply_journal();
        }
        if let Err(e) = store.commit(b, true) {
            if let Err(e2) = store.roll_back_apply_journal() {
                tracing::error!("rolling back content after a failed apply failed: {e2}");
            }
            return Err(e.into());
        }
        for e in &swapped {
            if let Some(k) = &e.kept {
                out.to_remove.push(k.clone());
            }
        }
        for s in &staged {
            // The staged file is linked into place: its staging name must go, so that the
            // content file is no longer reachable under a hash its writes will change.
            if let NewContent::File(p) = &s.content {
                let _ = std::fs::remove_file(p);
            }
        }
        for ino in delete_content {
            let _ = store.remove_content(ino);
        }
        for ino in online_only.keys() {
            // Whatever an earlier version left in the content file is not served any more
            // (no piece is marked present): free its space.
            if let Ok(f) = store.open_content(*ino, false) {
                let _ = f.set_len(0);
            }
        }
        {
            let mut replaced = self.replaced.lock();
            replaced.extend(online_only.keys().copied());
            let mut gens = self.content_gen.lock();
            for s in &staged {
                replaced.insert(s.ino);
                *gens.entry(s.ino).or_insert(0) += 1;
            }
            for o in &orphaned {
                *gens.entry(o.ino).or_insert(0) += 1;
            }
        }
        out.copies = copy_txs;
        Ok(out)
    }

    /// Phase one's list: the new content of `a` that must be staged before it can apply
    /// under the lock (see the module docs), leaving out what `staged` holds already.
    ///
    /// # Errors
    /// The store cannot be read.
    pub(crate) fn content_needs(
        &self,
        a: &LocalApply,
        staged: &StagedContent,
    ) -> Result<Vec<ContentNeed>, ApplyError> {
        let store = &*self.store;
        let light = self.options.on_demand.is_some();
        let mut out = Vec::new();
        for ch in &a.local_changes {
            let LocalChange::Put { state, content } = ch else {
                continue;
            };
            if !state.is_file()
                || *content == ContentSource::Unchanged
                || staged.contains_key(&state.hash)
                || out.iter().any(|n: &ContentNeed| n.hash == state.hash)
                || self.keeps_online_only(a, state)?
            {
                continue;
            }
            let base = match store.ino_of_object(&state.id)? {
                Some(ino) => store.get_inode(ino)?.filter(|i| i.object == state.id),
                None => None,
            };
            let base_absent = match &base {
                Some(i) => store.absent(i.ino)?.is_some(),
                None => false,
            };
            let base_size = base.as_ref().map_or(0, |i| i.size);
            let from_delta = match content {
                ContentSource::Ops(_) if !base_absent => {
                    if !light && state.size.max(base_size) < STAGE_FROM {
                        continue;
                    }
                    true
                }
                _ => false,
            };
            out.push(ContentNeed {
                object: state.id,
                name: state.name.0.clone(),
                hash: state.hash,
                size: state.size,
                version: state.content_version,
                light: light && from_delta,
                from_delta,
                base_ino: base.map(|i| i.ino),
            });
        }
        Ok(out)
    }

    /// Files on demand: whether new content for the file `state` stays on the server until
    /// it is read (an on-demand mount, and neither the file nor a folder above it pinned).
    pub(crate) fn keeps_online_only(
        &self,
        a: &LocalApply,
        state: &engine::ObjectState,
    ) -> Result<bool, ApplyError> {
        if self.options.on_demand.is_none() {
            return Ok(false);
        }
        let mut id = state.id;
        for _ in 0..4096 {
            if let Some(ino) = self.store.ino_of_object(&id)? {
                if let Some(i) = self.store.get_inode(ino)?.filter(|i| i.object == id) {
                    return Ok(!self.is_pinned(&i).map_err(|_| ApplyError::Content {
                        object: id,
                        reason: "a folder above it is missing".into(),
                    })?);
                }
            }
            // New here: its folder may be new too, in this very change.
            let parent = a.local_changes.iter().find_map(|c| match c {
                LocalChange::Put { state: s, .. } if s.id == id => Some(s.parent),
                _ => None,
            });
            match parent {
                Some(p) if p != id => id = p,
                _ => return Ok(true),
            }
        }
        Ok(true)
    }

    /// Whether applying `a` needs the delta bytes of its writes (some file it changes is
    /// kept local here).
    pub(crate) fn needs_delta_bytes(&self, a: &LocalApply) -> Result<bool, ApplyError> {
        for ch in &a.local_changes {
            if let LocalChange::Put {
                state,
                content: ContentSource::Ops(_),
            } = ch
            {
                if !self.keeps_online_only(a, state)? {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// A new inode for an object arriving from another device, owned like the root folder.
    fn fresh_inode(
        &self,
        ino: u64,
        object: ObjectId,
        kind: FileKind,
        parent: u64,
        now: Timespec,
    ) -> Inode {
        let root = self.store.get_inode(ROOT_INO).ok().flatten();
        Inode {
            ino,
            object,
            kind,
            perm: 0,
            uid: root.as_ref().map(|r| r.uid).unwrap_or(0),
            gid: root.as_ref().map(|r| r.gid).unwrap_or(0),
            nlink: if kind == FileKind::Directory { 2 } else { 1 },
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            rdev: 0,
            parent,
            flags: 0,
            symlink: Vec::new(),
            name: Vec::new(),
            links: Vec::new(),
        }
    }

    /// Folders the apply removes that still hold an entry the apply neither removes nor
    /// moves away (a local file no other device knows, such as an ignored one).
    fn folders_to_keep(&self, a: &LocalApply) -> Result<HashSet<ObjectId>, ApplyError> {
        let store = &*self.store;
        let removed: HashSet<ObjectId> = a
            .local_changes
            .iter()
            .filter_map(|c| match c {
                LocalChange::Remove(id) => Some(*id),
                LocalChange::Put { .. } => None,
            })
            .collect();
        let moved_to: HashMap<ObjectId, ObjectId> = a
            .local_changes
            .iter()
            .filter_map(|c| match c {
                LocalChange::Put { state, .. } => Some((state.id, state.parent)),
                LocalChange::Remove(_) => None,
            })
            .collect();
        let mut dirs: Vec<(ObjectId, Vec<ObjectId>)> = Vec::new();
        for id in &removed {
            let Some(ino) = store.ino_of_object(id)? else {
                continue;
            };
            let Some(i) = store.get_inode(ino)? else {
                continue;
            };
            if i.kind != FileKind::Directory || i.object != *id {
                continue;
            }
            let mut children = Vec::new();
            for e in store.list_dir(ino)? {
                if let Some(c) = store.get_inode(e.ino)? {
                    children.push(c.object);
                }
            }
            dirs.push((*id, children));
        }
        let mut kept = HashSet::new();
        loop {
            let mut changed = false;
            for (id, children) in &dirs {
                if kept.contains(id) {
                    continue;
                }
                let stays = children.iter().any(|c| {
                    let removed_here = removed.contains(c) && !kept.contains(c);
                    let moved_away = moved_to.get(c).is_some_and(|p| p != id);
                    !removed_here && !moved_away
                });
                if stays {
                    kept.insert(*id);
                    changed = true;
                }
            }
            if !changed {
                return Ok(kept);
            }
        }
    }

    fn resolve_parent(
        &self,
        parent: ObjectId,
        inos: &HashMap<ObjectId, u64>,
    ) -> Result<u64, ApplyError> {
        if parent == ObjectId::ROOT {
            return Ok(ROOT_INO);
        }
        if let Some(i) = inos.get(&parent) {
            return Ok(*i);
        }
        self.store
            .ino_of_object(&parent)?
            .ok_or_else(|| ApplyError::Content {
                object: parent,
                reason: "parent folder missing on this device".into(),
            })
    }

    /// Moves a local entry that is not part of the apply (an ignored or not yet announced
    /// file) out of the way, to a free name beside it; it stays pending.
    fn step_aside(
        &self,
        b: &mut crate::store::Batch<'_>,
        ino: u64,
        parent: u64,
        name: &[u8],
        entries: &mut HashMap<(u64, Vec<u8>), Option<u64>>,
        out: &mut Applied,
    ) -> Result<(), ApplyError> {
        let Some(mut i) = self.store.get_inode(ino)? else {
            return Ok(());
        };
        let mut n = 1;
        let new_name = loop {
            let mut cand = name.to_vec();
            cand.extend_from_slice(format!(" (local {n})").as_bytes());
            let free = match entries.get(&(parent, cand.clone())) {
                Some(e) => e.is_none(),
                None => self.store.lookup(parent, &cand)?.is_none(),
            };
            if free {
                break cand;
            }
            n += 1;
        };
        tracing::warn!(
            "a remote change takes the name {:?}; the local entry there is now {:?}",
            String::from_utf8_lossy(name),
            String::from_utf8_lossy(&new_name)
        );
        b.delete_dirent(parent, name);
        b.put_dirent(parent, &new_name, ino, i.kind);
        entries.insert((parent, new_name.clone()), Some(ino));
        if i.names().any(|(p, n)| p == parent && n == name) {
            i.move_link(parent, name, parent, &new_name);
            i.ctime = Timespec::now();
            b.put_inode(&i);
        }
        self.capture.touch(b, &i, false);
        out.invalidations.push(Invalidation::Entry {
            parent,
            name: new_name,
        });
        out.invalidations.push(Invalidation::Inode(ino));
        Ok(())
    }

    /// Writes staged content and swaps it in, journaled; returns the journal.
    fn swap_content(&self, staged: &[Staged]) -> Result<Vec<JournalEntry>, ApplyError> {
        if staged.is_empty() {
            return Ok(Vec::new());
        }
        let store = &*self.store;
        let dir = store.staging_dir();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        let mut files = Vec::with_capacity(staged.len());
        // Many files (an initial sync applies thousands in one transaction): one syncfs
        // makes them all durable in one journal commit, where an fdatasync each cost
        // a commit per file (a third of the applying daemon's CPU).
        let one_sync = staged.len() >= SYNCFS_FROM;
        let mut linked: HashSet<&PathBuf> = HashSet::new();
        for s in staged {
            let path: PathBuf = dir.join(format!("{:016x}.new", s.ino));
            let _ = std::fs::remove_file(&path);
            match &s.content {
                NewContent::Bytes(content) => {
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(&path)?;
                    write_sparse(&f, content)?;
                    if !one_sync {
                        f.sync_data()?;
                    }
                }
                // Staged files were made durable when staged. A second file with the same
                // content gets its own copy (two content files never share an inode).
                NewContent::File(p) if linked.insert(p) => std::fs::hard_link(p, &path)?,
                NewContent::File(p) => {
                    std::fs::copy(p, &path)?;
                    std::fs::File::open(&path)?.sync_data()?;
                }
            }
            files.push(path);
        }
        if one_sync {
            let d = std::fs::File::open(&dir)?;
            // SAFETY: syncfs takes a valid open descriptor, which `d` holds for the call.
            if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&d)) } != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
        }
        let mut journal = Vec::with_capacity(staged.len());
        for s in staged {
            let path = store.content_path(s.ino);
            let kept = path
                .exists()
                .then(|| dir.join(format!("{:016x}.old", s.ino)));
            journal.push(JournalEntry { path, kept });
        }
        store.write_apply_journal(&journal)?;
        let result = (|| -> Result<(), ApplyError> {
            for ((e, new), _) in journal.iter().zip(&files).zip(staged) {
                if let Some(k) = &e.kept {
                    let _ = std::fs::remove_file(k);
                    std::fs::hard_link(&e.path, k)?;
                }
                if let Some(parent) = e.path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::rename(new, &e.path)?;
            }
            // The links and renames are durable before the commit clears the journal.
            sync_dirs(
                journal
                    .iter()
                    .filter_map(|e| e.path.parent())
                    .chain([dir.as_path()]),
            )?;
            Ok(())
        })();
        if let Err(e) = result {
            if let Err(e2) = store.roll_back_apply_journal() {
                tracing::error!("rolling back content after a failed apply failed: {e2}");
            }
            return Err(e);
        }
        Ok(journal)
    }
}

/// The mode bits a remote change may set: permissions and sticky, never setuid or setgid (the
/// format carries `0o7777`; another device must not make a program run as this device's user).
pub const REMOTE_MODE_BITS: u32 = 0o1777;

/// Fsyncs each folder once: a rename or link in it is durable after this.
fn sync_dirs<'a>(dirs: impl IntoIterator<Item = &'a std::path::Path>) -> std::io::Result<()> {
    let mut done = std::collections::BTreeSet::new();
    for d in dirs {
        if done.insert(d) {
            std::fs::File::open(d)?.sync_all()?;
        }
    }
    Ok(())
}

fn check_hash(object: ObjectId, content: &[u8], hash: &ContentHash) -> Result<(), ApplyError> {
    if blake3::hash(content).as_bytes() != hash {
        return Err(ApplyError::Content {
            object,
            reason: "the content does not have the expected hash".into(),
        });
    }
    Ok(())
}

/// Writes `content`, leaving runs of zeros of 64 KiB and more as holes.
fn write_sparse(f: &std::fs::File, content: &[u8]) -> std::io::Result<()> {
    const BLOCK: usize = 64 << 10;
    let mut off = 0;
    while off < content.len() {
        let end = (off + BLOCK).min(content.len());
        let chunk = &content[off..end];
        if chunk.len() < BLOCK || chunk.iter().any(|b| *b != 0) {
            f.write_all_at(chunk, off as u64)?;
        }
        off = end;
    }
    f.set_len(content.len() as u64)
}
