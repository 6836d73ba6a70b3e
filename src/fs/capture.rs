//! Change capture: from what the kernel told us to transactions in the outbox.
//!
//! Every mutating request marks the objects it changed as pending (in the same batch as
//! the change) and, for writes, records the dirty byte ranges in memory. Sealing turns
//! pending objects into one transaction by comparing each object's current state with its
//! previous state (`objstate`): what was created, moved, rewritten, edited in place,
//! re-moded or deleted since it was last announced. Intermediate states never travel, so
//! bursts coalesce.
//!
//! When sealing happens (the commit points):
//! - a content edit of an already-announced file: at its close after writing and at fsync;
//! - everything else (new files, deletes, renames, folders): once the whole tree has been
//!   quiet for `quiet` (default 300 ms), and after at most `max_delay` of continuous
//!   activity. A file open for writing is not quiet until it is closed (at most
//!   `MAX_UNSEALED`), and its quiet period starts again at close. Waiting is what lets an editor's save pattern — write a temp file, rename it
//!   over the original; or rename the original away, write a new file, delete the old —
//!   be recognised: a new file that ends up where an announced file was (deleted or moved
//!   away) takes over that file's object id, and the change travels as an edit of it.
//!
//! What always holds: the outbox entry, the advanced `objstate`, the signatures and the
//! cleared `pending` marks commit in one batch, under the file system's metadata lock.
//! An object whose current path is ignored (`.deltaignore`, built-in temporary-file
//! patterns) is never announced: see [`ignored`].

mod aside;
mod ignored;
mod order;

pub use aside::{AsideNote, Refused};

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::changelog::{
    empty_hash, ContentHash, Delta, Name, ObjectId, ObjectKind, Op, OpKind, Transaction,
};
use crate::delta::hash_tree::LeafHashes;
use crate::delta::{self, BlockSignature, ChoiceContext, DirtyRanges, Strategy, WriteKind};
use crate::store::{
    Batch, FileKind, Inode, ObjectState, PendingFlags, Store, StoreError, SyncKind, ROOT_INO,
};

/// Largest payload put in one transaction; bigger new content is split into several.
const MAX_TX_PAYLOAD: u64 = 48 << 20;
/// Largest `Whole` delta; bigger files travel as ranges or rsync deltas.
const MAX_WHOLE: u64 = 32 << 20;
/// Largest file whose rewrites travel as rsync deltas (the new content is read whole into
/// memory to diff it) and whose signature is kept.
const MAX_RSYNC: u64 = 4 << 30;
/// Dirty ranges kept per file before the file counts as rewritten: half of what one delta
/// may carry (a shrink adds one), about 1 MiB of memory for a file at the limit. Random
/// page writes of a database stay byte-precise up to here; at 4,096 a run of 16,384 random
/// 4 KiB writes into 256 MiB went as a 172 MB rsync delta after a 4.6 s seal.
const MAX_DIRTY_RANGES: usize = (crate::changelog::limits::MAX_RANGES_PER_DELTA / 2) as usize;

/// Where sealed transactions go before they commit: the sync engine checks each against
/// its local tree and queues it for upload.
pub trait CommitSink: Send + Sync {
    /// Called under the metadata lock, before the outbox write commits, with the
    /// transactions in order. On `Err` nothing is committed and the objects stay pending.
    ///
    /// # Errors
    /// A transaction does not apply to the engine's local tree (the sink recovers its state
    /// from the store; the sealer sets the refused object aside).
    fn local_commit(&self, txs: &[Transaction]) -> Result<(), Refused>;

    /// The outbox write failed after [`CommitSink::local_commit`] accepted its transactions.
    fn commit_failed(&self);
}

/// Capture state shared by the FUSE threads and the sealer.
pub struct Capture {
    sink: std::sync::OnceLock<std::sync::Arc<dyn CommitSink>>,
    device: String,
    quiet: Duration,
    max_delay: Duration,
    dirty: Mutex<HashMap<u64, DirtyRanges>>,
    pending: Mutex<HashMap<ObjectId, PendingFlags>>,
    /// When each pending object first and last changed since it was last sealed.
    changed: Mutex<HashMap<ObjectId, (Instant, Instant)>>,
    activity: Mutex<Activity>,
    /// Open write handles per inode: a file open for writing is still being written.
    writers: Mutex<HashMap<u64, usize>>,
    ignore: crate::ignore::Ignore,
    /// Pending objects whose change the engine refused: they wait, with back-off, while
    /// every other change goes on (see [`aside`]).
    aside: Mutex<aside::Aside>,
}

/// Seal rounds in one seal call: each refused round sets one object aside.
const MAX_SEAL_ROUNDS: usize = 8;

/// How a seal round ended.
enum Sealed {
    /// This many transactions went to the outbox.
    Done(usize),
    /// The engine refused the transaction; an object was set aside; nothing committed.
    Refused,
}

/// New files, renames and deletes still changing after this long are sealed anyway.
const MAX_UNSEALED: Duration = Duration::from_secs(60);

struct Activity {
    last_change: Instant,
    oldest_unsealed: Option<Instant>,
}

fn sync_kind(k: FileKind) -> Option<SyncKind> {
    match k {
        FileKind::File => Some(SyncKind::File),
        FileKind::Directory => Some(SyncKind::Directory),
        FileKind::Symlink => Some(SyncKind::Symlink),
        _ => None,
    }
}

/// Seconds and nanoseconds as the change log's nanoseconds.
fn mtime_ns(i: &Inode) -> i64 {
    i.mtime.as_nanos()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Capture {
    /// Capture state for a store, with the pending marks a previous run left.
    ///
    /// # Errors
    /// Reading the pending marks failed.
    pub fn load(store: &Store, device: String, quiet: Duration) -> Result<Capture, StoreError> {
        let pending: HashMap<_, _> = store.pending()?.into_iter().collect();
        let has_pending = !pending.is_empty();
        let now = Instant::now();
        Ok(Capture {
            sink: std::sync::OnceLock::new(),
            device,
            quiet,
            max_delay: Duration::from_secs(5).max(quiet * 4),
            dirty: Mutex::new(HashMap::new()),
            changed: Mutex::new(HashMap::new()),
            pending: Mutex::new(pending),
            activity: Mutex::new(Activity {
                last_change: now,
                oldest_unsealed: has_pending.then_some(now),
            }),
            writers: Mutex::new(HashMap::new()),
            ignore: crate::ignore::Ignore::new(),
            aside: Mutex::new(aside::Aside::default()),
        })
    }

    /// Marks `inode`'s object as changed, in the batch that changes it.
    pub fn touch(&self, b: &mut Batch<'_>, inode: &Inode, rewritten: bool) {
        if sync_kind(inode.kind).is_none() || inode.ino == ROOT_INO {
            return;
        }
        let mut p = self.pending.lock();
        let old = p.get(&inode.object).copied();
        let flags = PendingFlags {
            rewritten: rewritten || old.is_some_and(|f| f.rewritten),
        };
        if old != Some(flags) {
            b.set_pending(&inode.object, flags);
            p.insert(inode.object, flags);
        }
        drop(p);
        let now = Instant::now();
        self.changed
            .lock()
            .entry(inode.object)
            .and_modify(|(_, last)| *last = now)
            .or_insert((now, now));
        let mut a = self.activity.lock();
        a.last_change = now;
        a.oldest_unsealed.get_or_insert(now);
    }

    /// Records bytes written in place. Returns true when the file has so many separate
    /// dirty ranges that it should count as rewritten.
    pub fn wrote(&self, ino: u64, offset: u64, len: u64) -> bool {
        let mut d = self.dirty.lock();
        let r = d.entry(ino).or_default();
        r.insert(offset, len);
        r.range_count() > MAX_DIRTY_RANGES
    }

    /// Records a size change (truncate, fallocate past the end).
    pub fn resized(&self, ino: u64, size: u64) {
        self.dirty.lock().entry(ino).or_default().truncate(size);
    }

    /// Forgets an inode's dirty ranges (it is gone).
    pub fn forget(&self, ino: u64) {
        self.dirty.lock().remove(&ino);
    }

    /// Sends sealed transactions through `sink` from now on.
    pub fn set_sink(&self, sink: std::sync::Arc<dyn CommitSink>) {
        let _ = self.sink.set(sink);
    }

    /// Forgets that an object is pending (a remote change removed it; the caller clears the
    /// stored mark in its batch).
    pub fn drop_pending(&self, object: &ObjectId) {
        self.pending.lock().remove(object);
        self.changed.lock().remove(object);
    }

    /// Whether anything is pending.
    pub fn any_pending(&self) -> bool {
        !self.pending.lock().is_empty()
    }

    /// How many objects are pending (changed since their last seal).
    pub fn pending_count(&self) -> usize {
        self.pending.lock().len()
    }

    /// Whether sealing everything is due: quiet long enough, or busy for too long.
    pub fn due(&self) -> bool {
        let a = self.activity.lock();
        match a.oldest_unsealed {
            None => false,
            Some(oldest) => {
                a.last_change.elapsed() >= self.quiet || oldest.elapsed() >= self.max_delay
            }
        }
    }

    /// Whether a pending object may be sealed now by a periodic seal: it has been quiet
    /// long enough, or it has been changing for too long. (Unknown objects, pending since a
    /// previous run, are quiet.)
    fn settled(&self, object: &ObjectId, ino: Option<u64>) -> bool {
        let changed = self.changed.lock().get(object).copied();
        if ino.is_some_and(|i| self.writers.lock().contains_key(&i)) {
            // Still open for writing: an editor writes its temp file (and fsyncs it, which
            // for a big file outlasts the quiet period), closes it and only then renames it
            // over the original. Announcing it earlier would send its whole content as a
            // new file instead of a delta of the original.
            return changed.is_some_and(|(first, _)| first.elapsed() >= MAX_UNSEALED);
        }
        match changed {
            None => true,
            Some((first, last)) => last.elapsed() >= self.quiet || first.elapsed() >= MAX_UNSEALED,
        }
    }

    /// A handle of `ino` was opened for writing.
    pub fn writer_opened(&self, ino: u64) {
        *self.writers.lock().entry(ino).or_insert(0) += 1;
    }

    /// A write handle of `ino` (now the inode of `object`) was closed. The object's quiet
    /// period starts again: the rename that follows a temp file's close comes within it.
    pub fn writer_closed(&self, ino: u64, object: ObjectId) {
        let mut w = self.writers.lock();
        if let Some(n) = w.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                w.remove(&ino);
            }
        }
        drop(w);
        let now = Instant::now();
        if let Some((_, last)) = self.changed.lock().get_mut(&object) {
            *last = now;
        }
        let mut a = self.activity.lock();
        if a.oldest_unsealed.is_some() {
            a.last_change = now;
        }
    }

    /// After a periodic seal: what is still pending waits another round.
    pub fn rearm(&self) {
        let empty = self.pending.lock().is_empty();
        let mut a = self.activity.lock();
        a.oldest_unsealed = if empty { None } else { Some(Instant::now()) };
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    /// The device's ignore rules.
    pub fn ignore(&self) -> &crate::ignore::Ignore {
        &self.ignore
    }
}

/// One object being sealed.
struct Item {
    object: ObjectId,
    flags: PendingFlags,
    inode: Option<Inode>,
    state: Option<ObjectState>,
    /// The inode's names that travel, as (folder inode, name), when some of its names are
    /// ignored (`None`: all of them).
    names: Option<Vec<(u64, Vec<u8>)>>,
}

/// Transactions under construction: ops and their payload, split when large.
struct TxBuilder {
    device: String,
    done: Vec<Vec<Op>>,
    ops: Vec<Op>,
    payload: u64,
}

impl TxBuilder {
    fn push(&mut self, op: Op) {
        let size = match &op.kind {
            OpKind::Write { delta, .. } => match delta {
                Delta::Whole(b) | Delta::Rsync(b) => b.len() as u64,
                Delta::Ranges { ranges, .. } => ranges.iter().map(|(_, b)| b.len() as u64).sum(),
            },
            _ => 64,
        };
        if self.payload + size > MAX_TX_PAYLOAD && !self.ops.is_empty() {
            self.done.push(std::mem::take(&mut self.ops));
            self.payload = 0;
        }
        self.payload += size;
        self.ops.push(op);
    }

    fn finish(mut self) -> Vec<Transaction> {
        if !self.ops.is_empty() {
            self.done.push(self.ops);
        }
        let time_ms = now_ms();
        self.done
            .into_iter()
            .map(|ops| Transaction {
                id: rand::random(),
                device: self.device.clone(),
                time_ms,
                ops,
            })
            .collect()
    }
}

fn op(object: ObjectId, st: &mut ObjectState, kind: OpKind) -> Op {
    let base = st.version;
    st.version += 1;
    Op {
        object,
        base_version: base,
        new_version: base + 1,
        kind,
    }
}

fn read_exact(file: &std::fs::File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    file.read_exact_at(buf, offset)
}

/// The sealer: reads the store and content files under the metadata lock.
pub struct Sealer<'a> {
    pub store: &'a Store,
    pub capture: &'a Capture,
}

impl Sealer<'_> {
    fn object_of(&self, ino: u64) -> Result<ObjectId, StoreError> {
        Ok(self
            .store
            .get_inode(ino)?
            .map(|i| i.object)
            .unwrap_or(ObjectId::ROOT))
    }

    fn load(&self, only: Option<ObjectId>) -> Result<Vec<Item>, StoreError> {
        let objects: Vec<(ObjectId, PendingFlags)> = match only {
            Some(o) => self
                .capture
                .pending
                .lock()
                .get(&o)
                .map(|f| vec![(o, *f)])
                .unwrap_or_default(),
            None => self
                .capture
                .pending
                .lock()
                .iter()
                .map(|(o, f)| (*o, *f))
                .collect(),
        };
        let mut items = Vec::with_capacity(objects.len());
        for (object, flags) in objects {
            let inode = match self.store.ino_of_object(&object)? {
                Some(ino) => self
                    .store
                    .get_inode(ino)?
                    .filter(|i| i.nlink > 0 && i.object == object),
                None => None,
            };
            let state = self.store.object_state(&object)?;
            items.push(Item {
                object,
                flags,
                inode,
                state,
                names: None,
            });
        }
        Ok(items)
    }

    /// Seals pending changes into outbox transactions; `only` restricts it to one announced,
    /// live object (a content edit at close or fsync). Returns the transactions written.
    ///
    /// # Errors
    /// Reading content or the store failed; nothing was committed then.
    pub fn seal(&self, only: Option<ObjectId>) -> Result<usize, StoreError> {
        self.seal_with(only, true)
    }

    /// A periodic seal: like [`Sealer::seal`] of everything, but an object still changing
    /// waits (a file being written, the halves of a save pattern), unless it is an
    /// announced file whose edit in place cannot be part of a save pattern.
    pub fn seal_settled(&self) -> Result<usize, StoreError> {
        self.seal_with(None, false)
    }

    fn seal_with(&self, only: Option<ObjectId>, all: bool) -> Result<usize, StoreError> {
        let (wall, cpu) = (Instant::now(), thread_cpu());
        // A refused seal sets one object aside and tries again without it; a handful of
        // rounds each time, the rest at the next seal.
        let mut n = 0;
        for _ in 0..MAX_SEAL_ROUNDS {
            match self.seal_inner(only, all)? {
                Sealed::Done(k) => {
                    n = k;
                    break;
                }
                Sealed::Refused => continue,
            }
        }
        if n > 0 {
            tracing::debug!(
                "sealed {n} transaction(s) in {:.2} ms ({:.2} ms CPU)",
                wall.elapsed().as_secs_f64() * 1e3,
                (thread_cpu() - cpu).as_secs_f64() * 1e3
            );
        }
        Ok(n)
    }

    fn seal_inner(&self, only: Option<ObjectId>, all: bool) -> Result<Sealed, StoreError> {
        let mut items = self.load(only)?;
        // Where every pending object was announced: names that objects left out of this
        // seal still hold.
        let announced: Vec<(ObjectId, ObjectState)> = items
            .iter()
            .filter_map(|i| Some((i.object, i.state.clone()?)))
            .collect();
        // Objects set aside wait for their next try.
        {
            let aside = self.capture.aside.lock();
            items.retain(|i| !aside.waiting(&i.object));
        }
        if !all {
            self.keep_settled(&mut items)?;
        }
        if let Some(o) = only {
            // An early seal only takes a live, announced object that kept its names.
            let in_place = |i: &Item| match (&i.inode, &i.state) {
                (Some(inode), Some(st)) => {
                    let mut now = Vec::with_capacity(1 + inode.links.len());
                    for (p, n) in inode.names() {
                        match self.object_of(p) {
                            Ok(o) => now.push((o, n.to_vec())),
                            Err(_) => return false,
                        }
                    }
                    now.sort();
                    let mut was: Vec<(ObjectId, Vec<u8>)> =
                        st.names().map(|(p, n)| (p, n.to_vec())).collect();
                    was.sort();
                    now == was
                }
                _ => false,
            };
            if !items.iter().all(|i| i.object == o && in_place(i)) {
                return Ok(Sealed::Done(0));
            }
        }
        if items.is_empty() {
            return Ok(Sealed::Done(0));
        }
        let mut b = self.store.batch();
        // Ids a new file gave up when it took over an announced file's identity.
        let mut retired = Vec::new();
        self.transfer_identities(&mut items, &mut b, &mut retired)?;
        // Ignored objects whose pending marks go with no op.
        let mut dropped = Vec::new();
        if !self.apply_ignore(&mut items, only, &mut b, &mut dropped)? {
            return Ok(Sealed::Done(0));
        }

        let mut tx = TxBuilder {
            device: self.capture.device.clone(),
            done: Vec::new(),
            ops: Vec::new(),
            payload: 0,
        };
        for it in &items {
            b.clear_pending(&it.object);
        }
        // Names first, in an order that applies (deletes, creates, moves, links); then
        // every surviving object's content and attributes.
        let item_objects: HashSet<ObjectId> = items.iter().map(|i| i.object).collect();
        let announced: Vec<(ObjectId, ObjectState)> = announced
            .into_iter()
            .filter(|(o, _)| !item_objects.contains(o))
            .collect();
        let created = self.order_names(&mut items, &announced, &mut tx, &mut b)?;
        let mut created: Vec<(usize, ObjectState)> = created.into_iter().collect();
        created.sort_by_key(|(i, _)| *i);
        for (i, mut st) in created {
            let it = &items[i];
            if let Some(inode) = &it.inode {
                if st.kind == SyncKind::File && inode.size > 0 {
                    self.write_rewritten(it.object, inode, &mut st, &mut tx, &mut b)?;
                }
                self.seal_xattrs(it.object, inode, &mut st, &mut tx)?;
                self.capture.forget(inode.ino);
            }
            b.put_object_state(&it.object, &st);
        }
        for it in items.iter_mut() {
            if it.state.is_some() && it.inode.is_some() {
                self.seal_edit(it, &mut tx, &mut b)?;
            }
        }
        let txs = tx.finish();
        let n = txs.len();
        for t in &txs {
            b.push_outbox(t)?;
        }
        let sink = self.capture.sink.get().filter(|_| !txs.is_empty());
        if let Some(sink) = sink {
            if let Err(refused) = sink.local_commit(&txs) {
                // Nothing is committed: the objects stay pending, and the one the engine
                // refused waits aside so that everything else goes on syncing.
                self.set_aside(&items, &txs, refused);
                return Ok(Sealed::Refused);
            }
        }
        if let Err(e) = self.store.commit(b, false) {
            if let Some(sink) = sink {
                sink.commit_failed();
            }
            return Err(e);
        }
        {
            let mut p = self.capture.pending.lock();
            let sealed: Vec<ObjectId> = items
                .iter()
                .map(|it| it.object)
                .chain(retired.iter().copied())
                .chain(dropped.iter().copied())
                .collect();
            self.capture.settle_aside(&sealed);
            let mut changed = self.capture.changed.lock();
            for o in sealed {
                p.remove(&o);
                changed.remove(&o);
            }
            if p.is_empty() {
                self.capture.activity.lock().oldest_unsealed = None;
            }
        }
        Ok(Sealed::Done(n))
    }

    /// Drops items a periodic seal must not take yet: unsettled ones (except in-place edits
    /// of announced files that stay where they were), and new items whose folder is new and
    /// not sealed with them.
    fn keep_settled(&self, items: &mut Vec<Item>) -> Result<(), StoreError> {
        let mut keep = Vec::with_capacity(items.len());
        for it in items.drain(..) {
            let in_place_edit = match (&it.inode, &it.state) {
                (Some(i), Some(st)) => self.object_of(i.parent)? == st.parent && i.name == st.name,
                _ => false,
            };
            if in_place_edit
                || self
                    .capture
                    .settled(&it.object, it.inode.as_ref().map(|i| i.ino))
            {
                keep.push(it);
            }
        }
        // A new object needs its folder announced, or created in this same seal.
        loop {
            let kept: std::collections::HashSet<ObjectId> = keep.iter().map(|i| i.object).collect();
            let before = keep.len();
            let mut next = Vec::with_capacity(keep.len());
            for it in keep {
                let ok = match (&it.inode, &it.state) {
                    (Some(i), None) => {
                        let parent = self.object_of(i.parent)?;
                        parent == ObjectId::ROOT
                            || kept.contains(&parent)
                            || self.store.object_state(&parent)?.is_some()
                    }
                    _ => true,
                };
                if ok {
                    next.push(it);
                }
            }
            keep = next;
            if keep.len() == before {
                break;
            }
        }
        *items = keep;
        Ok(())
    }

    /// How deep an announced object is in the announced tree (its previous state's parents).
    fn announced_depth(&self, st: &ObjectState) -> Result<u32, StoreError> {
        let mut depth = 1;
        let mut parent = st.parent;
        while parent != ObjectId::ROOT && depth < 4096 {
            match self.store.object_state(&parent)? {
                Some(p) => parent = p.parent,
                None => break,
            }
            depth += 1;
        }
        Ok(depth)
    }

    fn depth(&self, mut ino: u64) -> Result<u32, StoreError> {
        let mut d = 0;
        while ino != ROOT_INO && d < 4096 {
            ino = self
                .store
                .get_inode(ino)?
                .map(|i| i.parent)
                .unwrap_or(ROOT_INO);
            d += 1;
        }
        Ok(d)
    }

    /// The editors' save patterns: a new file where an announced file was (deleted, or moved
    /// away) takes over that file's object id, so the change travels as an edit.
    fn transfer_identities(
        &self,
        items: &mut Vec<Item>,
        b: &mut Batch<'_>,
        retired: &mut Vec<ObjectId>,
    ) -> Result<(), StoreError> {
        // Indexed by the place each announced file was at, so a seal of many new files stays
        // linear. Items taken over are marked and dropped at the end (indexes stay valid).
        type Place = (ObjectId, Vec<u8>);
        let mut donors: HashMap<Place, usize> = HashMap::new();
        let mut moved_away: HashMap<Place, usize> = HashMap::new();
        let mut new_files = Vec::new();
        for (idx, it) in items.iter().enumerate() {
            match (&it.inode, &it.state) {
                (None, Some(st)) if st.kind == SyncKind::File => {
                    donors.entry((st.parent, st.name.clone())).or_insert(idx);
                }
                (Some(i), Some(st)) if st.kind == SyncKind::File && i.kind == FileKind::File => {
                    moved_away
                        .entry((st.parent, st.name.clone()))
                        .or_insert(idx);
                }
                (Some(i), None) if i.kind == FileKind::File => new_files.push(idx),
                _ => {}
            }
        }
        let mut removed = vec![false; items.len()];
        for n in new_files {
            let Some(inode) = items[n].inode.clone() else {
                continue;
            };
            let parent = self.object_of(inode.parent)?;
            let place = (parent, inode.name.clone());
            // A deleted announced file that lived here.
            if let Some(d) = donors.remove(&place).filter(|d| !removed[*d]) {
                let donor_obj = items[d].object;
                let state = items[d].state.take();
                let mut moved = inode.clone();
                moved.object = donor_obj;
                b.put_inode(&moved);
                b.clear_pending(&items[n].object);
                b.delete_object_index(&items[n].object);
                retired.push(items[n].object);
                items[n].object = donor_obj;
                items[n].state = state;
                items[n].inode = Some(moved);
                items[n].flags.rewritten = true;
                removed[d] = true;
                continue;
            }
            // An announced file that was moved away from here and still lives elsewhere.
            let candidate = moved_away.get(&place).copied().filter(|m| {
                !removed[*m]
                    && items[*m].state.is_some()
                    && items[*m]
                        .inode
                        .as_ref()
                        .is_some_and(|i| i.parent != inode.parent || i.name != inode.name)
            });
            if let Some(m) = candidate {
                moved_away.remove(&place);
                let old_obj = items[m].object;
                let fresh = ObjectId::random();
                let Some(mut old_inode) = items[m].inode.clone() else {
                    continue;
                };
                old_inode.object = fresh;
                let mut new_inode = inode.clone();
                new_inode.object = old_obj;
                b.put_inode(&old_inode);
                b.put_inode(&new_inode);
                b.clear_pending(&items[n].object);
                b.delete_object_index(&items[n].object);
                retired.push(items[n].object);
                let state = items[m].state.take();
                // The moved-away file becomes a new object with the old content.
                items[m].object = fresh;
                items[m].inode = Some(old_inode);
                items[m].flags.rewritten = true;
                items[n].object = old_obj;
                items[n].state = state;
                items[n].inode = Some(new_inode);
                items[n].flags.rewritten = true;
            }
        }
        let mut idx = 0;
        items.retain(|_| {
            let keep = !removed[idx];
            idx += 1;
            keep
        });
        Ok(())
    }

    fn seal_delete(&self, it: &Item, tx: &mut TxBuilder, b: &mut Batch<'_>) {
        if let Some(st) = &it.state {
            let mut st = st.clone();
            tx.push(op(it.object, &mut st, OpKind::Delete));
            b.delete_object_state(&it.object);
        }
    }

    /// The Create op of a new object at `place` (its first name); its content and
    /// attributes follow later in the seal. Returns the object's announced state, which the
    /// caller stores once the seal's other ops on it are made.
    fn seal_create(
        &self,
        it: &Item,
        place: &(ObjectId, Vec<u8>),
        tx: &mut TxBuilder,
        _b: &mut Batch<'_>,
    ) -> Result<Option<ObjectState>, StoreError> {
        let Some(inode) = &it.inode else {
            return Ok(None);
        };
        let Some(kind) = sync_kind(inode.kind) else {
            return Ok(None);
        };
        let Ok(name) = Name::new(place.1.clone()) else {
            tracing::warn!(
                "not syncing {:?}: its name cannot travel",
                String::from_utf8_lossy(&place.1)
            );
            return Ok(None);
        };
        let parent = place.0;
        let mut st = ObjectState {
            version: 0,
            kind,
            parent,
            name: place.1.clone(),
            links: Vec::new(),
            mode: u32::from(inode.perm),
            mtime_ns: mtime_ns(inode),
            hash: empty_hash(),
            size: 0,
            strategy: 0,
            last_ratio_permille: 0,
            xattrs: Vec::new(),
        };
        let okind = match kind {
            SyncKind::File => ObjectKind::File,
            SyncKind::Directory => ObjectKind::Directory,
            SyncKind::Symlink => ObjectKind::Symlink {
                target: inode.symlink.clone(),
            },
        };
        tx.push(op(
            it.object,
            &mut st,
            OpKind::Create {
                parent,
                name,
                kind: okind,
                mode: u32::from(inode.perm),
                mtime_ns: mtime_ns(inode),
            },
        ));
        Ok(Some(st))
    }

    fn seal_edit(
        &self,
        it: &mut Item,
        tx: &mut TxBuilder,
        b: &mut Batch<'_>,
    ) -> Result<(), StoreError> {
        let (Some(inode), Some(mut st)) = (it.inode.clone(), it.state.clone()) else {
            return Ok(());
        };
        if st.kind == SyncKind::File {
            let dirty = self.capture.dirty.lock().remove(&inode.ino);
            if it.flags.rewritten || (dirty.is_none() && inode.size != st.size) {
                self.write_rewritten(it.object, &inode, &mut st, tx, b)?;
            } else if let Some(d) = dirty.filter(|d| !d.is_empty() || inode.size != st.size) {
                self.write_in_place(it.object, &inode, &mut st, &d, tx, b)?;
            }
        }
        let mode = u32::from(inode.perm);
        // Folder mtimes follow their content on every device; they do not travel.
        let mt = if st.kind == SyncKind::Directory {
            st.mtime_ns
        } else {
            mtime_ns(&inode)
        };
        if mode != st.mode || mt != st.mtime_ns {
            let kind = OpKind::SetAttr {
                mode: (mode != st.mode).then_some(mode),
                mtime_ns: (mt != st.mtime_ns).then_some(mt),
            };
            tx.push(op(it.object, &mut st, kind));
            st.mode = mode;
            st.mtime_ns = mt;
        }
        self.seal_xattrs(it.object, &inode, &mut st, tx)?;
        b.put_object_state(&it.object, &st);
        it.state = Some(st);
        Ok(())
    }

    fn seal_xattrs(
        &self,
        object: ObjectId,
        inode: &Inode,
        st: &mut ObjectState,
        tx: &mut TxBuilder,
    ) -> Result<(), StoreError> {
        let mut now: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for n in self.store.list_xattrs(inode.ino)? {
            if n.starts_with(b"user.deltadrive.") {
                continue;
            }
            if let Some(v) = self.store.get_xattr(inode.ino, &n)? {
                now.push((n, v));
            }
        }
        for (n, v) in &now {
            if !st.xattrs.iter().any(|(on, ov)| on == n && ov == v) {
                tx.push(op(
                    object,
                    st,
                    OpKind::SetXattr {
                        name: n.clone(),
                        value: v.clone(),
                    },
                ));
            }
        }
        for (on, _) in st.xattrs.clone() {
            if !now.iter().any(|(n, _)| *n == on) {
                tx.push(op(object, st, OpKind::RemoveXattr { name: on }));
            }
        }
        st.xattrs = now;
        Ok(())
    }

    /// The file's content changed in unknown places: rsync against its signature, or whole;
    /// new leaf hashes and signature from one read of the file.
    fn write_rewritten(
        &self,
        object: ObjectId,
        inode: &Inode,
        st: &mut ObjectState,
        tx: &mut TxBuilder,
        b: &mut Batch<'_>,
    ) -> Result<(), StoreError> {
        let file = self.store.open_content(inode.ino, true)?;
        let size = inode.size;
        let signature = if st.size > delta::strategy::SMALL_FILE_MAX {
            self.store
                .signature(&object)?
                .and_then(|s| BlockSignature::from_bytes(&s, st.size).ok())
        } else {
            None
        };
        let strategy = delta::choose(&ChoiceContext {
            file_size: size,
            last_strategy: Strategy::from_u8(st.strategy),
            write_kind: WriteKind::Rewritten,
            dirty_bytes: size,
            has_signature: signature.is_some() && st.version > 0,
            last_delta_ratio: (st.strategy != 0)
                .then_some(f64::from(st.last_ratio_permille) / 1000.0),
        });
        let base_hash = st.hash;
        if size > MAX_WHOLE && !(strategy == Strategy::Rsync && size <= MAX_RSYNC) {
            // Too big to hold at once: send it as growing ranges, one chunk per op.
            return self.write_chunked(object, inode, &file, st, tx, b);
        }
        let mut content = vec![0u8; size as usize];
        read_exact(&file, 0, &mut content)?;
        let new_hash: ContentHash = *blake3::hash(&content).as_bytes();
        let delta = match (strategy, &signature) {
            (Strategy::Rsync, Some(sig)) if st.version > 0 => {
                let d = delta::rsync_delta(sig, &content);
                tracing::debug!(
                    "rsync delta of {} ({size} bytes, base {} bytes): {:?} bytes",
                    object.to_hex(),
                    st.size,
                    d.as_ref().map(delta_len)
                );
                match d {
                    Ok(d) if delta_len(&d) < size as usize => d,
                    _ => Delta::Whole(content.clone()),
                }
            }
            _ => {
                tracing::debug!(
                    "whole content of {} ({size} bytes): strategy {strategy:?}, signature {}",
                    object.to_hex(),
                    signature.is_some()
                );
                Delta::Whole(content.clone())
            }
        };
        if delta_len(&delta) as u64 > MAX_WHOLE {
            // The rsync delta found little to reuse (a big file rewritten with new bytes):
            // one op would carry more than a change log takes. Send it in chunks instead.
            drop(delta);
            drop(content);
            return self.write_chunked(object, inode, &file, st, tx, b);
        }
        let delta_size = delta_len(&delta);
        // A new file's first content has no base: that is no choice worth remembering.
        let chosen = if base_hash == empty_hash() {
            0
        } else {
            Strategy::of(&delta).as_u8()
        };
        tx.push(op(
            object,
            st,
            OpKind::Write {
                base_hash,
                new_hash,
                new_size: size,
                delta,
            },
        ));
        st.strategy = chosen;
        st.last_ratio_permille = ratio(delta_size, size);
        st.hash = new_hash;
        st.size = size;
        self.store_previous(object, &content, st, b);
        Ok(())
    }

    /// Content too big to hold at once, sent as ranges of its data: holes of a sparse file
    /// are not sent (a `Ranges` delta extends with zeros). Each op covers whole 1 MiB leaves,
    /// so every intermediate version's hash is exact: the leaves sent so far, zeros after.
    fn write_chunked(
        &self,
        object: ObjectId,
        inode: &Inode,
        file: &std::fs::File,
        st: &mut ObjectState,
        tx: &mut TxBuilder,
        b: &mut Batch<'_>,
    ) -> Result<(), StoreError> {
        use crate::delta::hash_tree::LEAF_LEN;
        let size = inode.size;
        let mut base_hash = st.hash;
        if st.size != 0 {
            // Cut the base first, so old bytes never show through the holes.
            let cut = Delta::Ranges {
                new_size: 0,
                ranges: Vec::new(),
            };
            let empty = empty_hash();
            tx.push(op(
                object,
                st,
                OpKind::Write {
                    base_hash,
                    new_hash: empty,
                    new_size: 0,
                    delta: cut,
                },
            ));
            base_hash = empty;
        }
        // The leaves of all-zero content of the final size; data leaves replace them op by op.
        let mut leaves = LeafHashes::default();
        leaves
            .update(size, [(0, size)], |_, buf: &mut [u8]| {
                buf.fill(0);
                Ok::<(), io::Error>(())
            })
            .map_err(StoreError::Io)?;
        let extents = data_extents(file, size)?;
        // Leaf indexes that hold data, in order.
        let mut data_leaves: Vec<u64> = Vec::new();
        for (off, len) in &extents {
            for l in off / LEAF_LEN..(off + len).div_ceil(LEAF_LEN) {
                if data_leaves.last() != Some(&l) {
                    data_leaves.push(l);
                }
            }
        }
        let per_op = (MAX_WHOLE / LEAF_LEN).max(1) as usize;
        let mut groups: Vec<&[u64]> = data_leaves.chunks(per_op).collect();
        if groups.is_empty() {
            groups.push(&[]);
        }
        for group in groups {
            let mut ranges = Vec::new();
            for &l in group {
                let start = l * LEAF_LEN;
                let end = (start + LEAF_LEN).min(size);
                for (off, len) in &extents {
                    let (a, z) = ((*off).max(start), (off + len).min(end));
                    if a < z {
                        let mut buf = vec![0u8; (z - a) as usize];
                        read_exact(file, a, &mut buf)?;
                        ranges.push((a, buf));
                    }
                }
            }
            leaves
                .update(
                    size,
                    group.iter().map(|l| (l * LEAF_LEN, LEAF_LEN)),
                    |i, buf| read_exact(file, i * LEAF_LEN, buf),
                )
                .map_err(StoreError::Io)?;
            let new_hash = leaves.root_with(|| {
                let mut v = vec![0u8; size as usize];
                let _ = read_exact(file, 0, &mut v);
                v
            });
            let delta = Delta::Ranges {
                new_size: size,
                ranges,
            };
            tx.push(op(
                object,
                st,
                OpKind::Write {
                    base_hash,
                    new_hash,
                    new_size: size,
                    delta,
                },
            ));
            base_hash = new_hash;
        }
        // A signature lets a later whole rewrite travel as an rsync delta; past MAX_RSYNC
        // such rewrites travel as ranges of their data instead.
        if size <= MAX_RSYNC {
            let mut sig =
                BlockSignature::calculate_with_block_size(&[], delta::block_size_for(size));
            sig.update_blocks(size, [(0, size)], |o, buf| read_exact(file, o, buf))
                .map_err(StoreError::Io)?;
            b.put_signature(&object, &sig.to_bytes());
        } else {
            b.delete_signature(&object);
        }
        st.hash = base_hash;
        st.size = size;
        st.strategy = Strategy::Ranges.as_u8();
        st.last_ratio_permille = 1000;
        b.put_leaves(&object, &leaves.encode());
        Ok(())
    }

    /// An in-place edit with known dirty ranges: send just those bytes; update the leaf
    /// hashes and signature blocks they touch.
    fn write_in_place(
        &self,
        object: ObjectId,
        inode: &Inode,
        st: &mut ObjectState,
        dirty: &DirtyRanges,
        tx: &mut TxBuilder,
        b: &mut Batch<'_>,
    ) -> Result<(), StoreError> {
        let file = self.store.open_content(inode.ino, true)?;
        let size = inode.size;
        let to_send = dirty.to_send(size);
        let dirty_bytes: u64 = to_send.iter().map(|(_, l)| l).sum();
        let strategy = delta::choose(&ChoiceContext {
            file_size: size,
            last_strategy: Strategy::from_u8(st.strategy),
            write_kind: WriteKind::InPlace,
            dirty_bytes,
            has_signature: false,
            last_delta_ratio: None,
        });
        if strategy != Strategy::Ranges || size <= delta::strategy::SMALL_FILE_MAX {
            return self.write_rewritten(object, inode, st, tx, b);
        }
        let leaves = self
            .store
            .leaves(&object)?
            .and_then(|l| LeafHashes::decode(&l).ok())
            .filter(|l| l.len() == st.size);
        let Some(mut leaves) = leaves else {
            return self.write_rewritten(object, inode, st, tx, b);
        };
        let delta = match delta::ranges_delta(dirty, size, |o, buf| read_exact(&file, o, buf)) {
            Ok(d) => d,
            Err(_) => return self.write_rewritten(object, inode, st, tx, b),
        };
        leaves
            .update(size, to_send.iter().copied(), |i, buf| {
                read_exact(&file, i * crate::delta::hash_tree::LEAF_LEN, buf)
            })
            .map_err(StoreError::Io)?;
        let new_hash = leaves.root_with(|| {
            let mut v = vec![0u8; size as usize];
            let _ = read_exact(&file, 0, &mut v);
            v
        });
        if let Some(sig) = self.store.signature(&object)? {
            if let Ok(mut sig) = BlockSignature::from_bytes(&sig, st.size) {
                sig.update_blocks(size, to_send.iter().copied(), |o, buf| {
                    read_exact(&file, o, buf)
                })
                .map_err(StoreError::Io)?;
                b.put_signature(&object, &sig.to_bytes());
            }
        }
        let delta_size = delta_len(&delta);
        let base_hash = st.hash;
        tx.push(op(
            object,
            st,
            OpKind::Write {
                base_hash,
                new_hash,
                new_size: size,
                delta,
            },
        ));
        st.strategy = Strategy::Ranges.as_u8();
        st.last_ratio_permille = ratio(delta_size, size);
        st.hash = new_hash;
        st.size = size;
        b.put_leaves(&object, &leaves.encode());
        Ok(())
    }

    /// Keeps the previous state of content just sent: leaf hashes, and for files that may
    /// take deltas, the rsync signature.
    fn store_previous(
        &self,
        object: ObjectId,
        content: &[u8],
        st: &ObjectState,
        b: &mut Batch<'_>,
    ) {
        b.put_leaves(&object, &LeafHashes::of(content).encode());
        if st.size > delta::strategy::SMALL_FILE_MAX {
            b.put_signature(&object, &BlockSignature::calculate(content).to_bytes());
        } else {
            b.delete_signature(&object);
        }
    }
}

/// The data extents of a file (SEEK_DATA/SEEK_HOLE), or the whole range where the file
/// system cannot tell.
fn data_extents(file: &std::fs::File, size: u64) -> Result<Vec<(u64, u64)>, StoreError> {
    use std::os::unix::io::AsRawFd;
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0i64;
    while (pos as u64) < size {
        // SAFETY: a valid open fd; lseek only moves this fd's offset, which nobody else uses.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Ok(vec![(0, size)]);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 {
            size as i64
        } else {
            hole.min(size as i64)
        };
        if end > data {
            out.push((data as u64, (end - data) as u64));
        }
        pos = end.max(data + 1);
    }
    Ok(out)
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_THREAD_CPUTIME_ID needs nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn delta_len(d: &Delta) -> usize {
    match d {
        Delta::Whole(b) | Delta::Rsync(b) => b.len(),
        Delta::Ranges { ranges, .. } => ranges.iter().map(|(_, b)| b.len() + 12).sum(),
    }
}

fn ratio(delta: usize, size: u64) -> u32 {
    if size == 0 {
        return 1000;
    }
    ((delta as u64 * 1000) / size).min(u64::from(u32::MAX)) as u32
}

impl Capture {
    /// Whether `object` has unsealed changes (for the status xattr and tests).
    pub fn has_pending(&self, object: &ObjectId) -> bool {
        self.pending.lock().contains_key(object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changed_now(c: &Capture, object: ObjectId) {
        let now = Instant::now();
        c.changed.lock().insert(object, (now, now));
        let mut a = c.activity.lock();
        a.last_change = now;
        a.oldest_unsealed.get_or_insert(now);
    }

    #[test]
    fn a_file_open_for_writing_does_not_settle_and_its_quiet_period_restarts_at_close() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), &dir.path().join("c"), 0, 0).unwrap();
        let quiet = Duration::from_millis(40);
        let c = Capture::load(&store, "dev".into(), quiet).unwrap();
        let (tmp, other) = (ObjectId::random(), ObjectId::random());
        let (tmp_ino, other_ino) = (7, 8);
        changed_now(&c, tmp);
        changed_now(&c, other);
        c.writer_opened(tmp_ino);
        std::thread::sleep(quiet * 3);
        // Written slowly, or a long fsync: the open file is not settled, the closed one is.
        assert!(
            !c.settled(&tmp, Some(tmp_ino)),
            "a file open for writing is being written"
        );
        assert!(c.settled(&other, Some(other_ino)));
        c.writer_closed(tmp_ino, tmp);
        // Closed just now: the rename that follows has a quiet period.
        assert!(
            !c.settled(&tmp, Some(tmp_ino)),
            "the quiet period restarts at close"
        );
        assert!(
            !c.due(),
            "the tree is not quiet right after a pending file's close"
        );
        std::thread::sleep(quiet * 2);
        assert!(c.settled(&tmp, Some(tmp_ino)));
        assert!(c.due());
        // Two write handles: settled only after both close.
        c.writer_opened(tmp_ino);
        c.writer_opened(tmp_ino);
        c.writer_closed(tmp_ino, tmp);
        std::thread::sleep(quiet * 2);
        assert!(!c.settled(&tmp, Some(tmp_ino)));
        c.writer_closed(tmp_ino, tmp);
        std::thread::sleep(quiet * 2);
        assert!(c.settled(&tmp, Some(tmp_ino)));
    }
}
