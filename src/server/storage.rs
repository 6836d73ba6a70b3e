//! The storage role's service layer: one ordered log per user and the current state of every
//! object, kept by checking and applying each appended change log.
//!
//! What always holds: an append is validated whole against the server's current state under the
//! user's commit lock, then committed in one backend batch; so the log has no gaps, every stored
//! transaction applied cleanly to the state before it, and a refused append changes nothing.
//! The tree rules (base versions, parent exists and is a folder, names free, no folder cycles,
//! only empty folders deleted, content ops only on files, delta base hashes) are
//! [`crate::rules`]'s, read over the append's overlay of the backend's state; refusals leave here
//! as [`AppendError`] and `server/api/` words them for HTTP. Checked here: the content size cap
//! and that each write's result is the content it claims. Wake-ups of long polls go through a per-user `watch` channel, fed by this
//! process's appends and by the backend's head events (appends made through other replicas).

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;

use crate::changelog::limits::{MAX_BODY_LEN, MAX_OPS_PER_LOG};
use crate::changelog::{
    decode_changelog, empty_hash, encode_transaction, validate, ChangeLog, ContentHash, Delta,
    Name, ObjectId, ObjectKind, Op, OpKind,
};
use crate::delta::DeltaError;
use crate::rules::{self, ContentChange, Effect, Facts, Kind, RuleError, TreeView};

use super::backend::{
    AppendRecord, Backend, ChunkId, CommitBatch, DirEntries, HeadEvent, HistoryEntry, ObjectState,
    StoredKind,
};
use super::content::{read_range, Content};
use super::error::ApiError;
use super::limits::{AppendLimits, MemoryBudget, Reservation, Spend, WorkBudget, OP_WORK_BYTES};

pub use super::content::CHUNK_SIZE;

/// Limits and retention of the storage role.
#[derive(Clone, Debug)]
pub struct StorageConfig {
    /// The largest file content the server keeps, in bytes.
    pub max_object_bytes: u64,
    /// How many versions of each file's content are kept.
    pub history_versions: usize,
    /// The work and memory bounds of appends.
    pub limits: AppendLimits,
}

/// Why an append was refused. Nothing of it was stored.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// An op does not apply to the user's tree: it breaks a tree rule.
    #[error("transaction {transaction}, object {object}: {rule}")]
    Refused {
        transaction: usize,
        object: ObjectId,
        rule: RuleError,
    },
    /// Ops whose base version is not the server's current version of their object (each a
    /// [`RuleError::StaleBase`]); the device pulls, rebases and sends again.
    #[error("stale base version")]
    Stale(Vec<RuleError>),
    /// Anything else, already an HTTP answer (undecodable, invalid, over a budget, internal).
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl From<super::backend::BackendError> for AppendError {
    fn from(e: super::backend::BackendError) -> Self {
        AppendError::Api(e.into())
    }
}

/// Why one op was refused (the caller says which transaction).
enum OpRefusal {
    Rule(RuleError),
    Api(ApiError),
}

impl From<RuleError> for OpRefusal {
    fn from(e: RuleError) -> Self {
        OpRefusal::Rule(e)
    }
}

impl From<ApiError> for OpRefusal {
    fn from(e: ApiError) -> Self {
        OpRefusal::Api(e)
    }
}

/// The storage service shared by all requests.
pub struct Storage {
    backend: Arc<dyn Backend>,
    config: StorageConfig,
    heads: Arc<Heads>,
    memory: Arc<MemoryBudget>,
}

/// The wake-up channels of the users with long polls in this process.
type Heads = parking_lot::Mutex<HashMap<String, watch::Sender<u64>>>;

fn notify_heads(heads: &Heads, user: &str, head: u64) {
    let heads = heads.lock();
    if let Some(tx) = heads.get(user) {
        tx.send_replace(head);
    }
}

/// Forwards the backend's head events to the wake-up channels until the backend goes away.
async fn forward_head_events(
    mut rx: tokio::sync::broadcast::Receiver<HeadEvent>,
    heads: std::sync::Weak<Heads>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let ev = rx.recv().await;
        let Some(heads) = heads.upgrade() else { return };
        match ev {
            Ok(HeadEvent::Moved { user, head }) => notify_heads(&heads, &user, head),
            // Maybe missed: wake every waiter; each re-reads its head.
            Ok(HeadEvent::Resync) | Err(RecvError::Lagged(_)) => {
                for tx in heads.lock().values() {
                    tx.send_modify(|_| {});
                }
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// The root folder's state before any op touched it.
fn root_state() -> ObjectState {
    ObjectState {
        id: ObjectId::ROOT.0,
        parent: ObjectId::ROOT.0,
        name: Vec::new(),
        links: Vec::new(),
        kind: StoredKind::Directory,
        version: 0,
        mode: 0o755,
        mtime_ns: 0,
        size: 0,
        hash: empty_hash(),
        chunks: Vec::new(),
        chunk_cvs: Some(Vec::new()),
        xattrs: BTreeMap::new(),
        seq: 0,
    }
}

/// A directory entry: (parent, name).
type EntryKey = ([u8; 16], Vec<u8>);

/// Every name of an object, the first one first.
fn names_of(s: &ObjectState) -> impl Iterator<Item = EntryKey> + '_ {
    std::iter::once((s.parent, s.name.clone())).chain(s.links.iter().cloned())
}

/// The objects an append reads and changes, over the backend's committed state.
struct Overlay<'a> {
    backend: &'a dyn Backend,
    user: &'a str,
    /// Committed state as first read (None: absent).
    original: HashMap<[u8; 16], Option<ObjectState>>,
    /// State after the ops applied so far (None: absent).
    current: HashMap<[u8; 16], Option<ObjectState>>,
    /// Directory entries added or removed so far: (parent, name) → child.
    entries: HashMap<EntryKey, Option<[u8; 16]>>,
    /// Committed entries of folders read so far.
    listed: HashMap<[u8; 16], DirEntries>,
    /// New content of files written so far (new chunks held in memory until the commit).
    content: HashMap<[u8; 16], Content>,
    /// Content changes to record in history: object → (version, time, device).
    history: Vec<([u8; 16], u64, i64, String)>,
}

impl<'a> Overlay<'a> {
    async fn get(&mut self, id: [u8; 16]) -> Result<Option<ObjectState>, ApiError> {
        if let Some(s) = self.current.get(&id) {
            return Ok(s.clone());
        }
        let mut s = self.backend.get_object(self.user.to_string(), id).await?;
        if s.is_none() && id == ObjectId::ROOT.0 {
            s = Some(root_state());
        }
        self.original.insert(id, s.clone());
        self.current.insert(id, s.clone());
        Ok(s)
    }

    fn set(&mut self, id: [u8; 16], s: Option<ObjectState>) {
        self.current.insert(id, s);
    }

    /// Reads the committed entries of folder `dir` (once).
    async fn list(&mut self, dir: [u8; 16]) -> Result<(), ApiError> {
        if !self.listed.contains_key(&dir) {
            let l = self
                .backend
                .list_children(self.user.to_string(), dir)
                .await?;
            self.listed.insert(dir, l);
        }
        Ok(())
    }

    /// Loads what the tree rules read to check `op`: the object, the folder it goes into and
    /// that folder's entries, the folder chain above it for a move, a folder's entries for
    /// its delete.
    async fn load_for(&mut self, op: &Op) -> Result<(), ApiError> {
        let id = op.object.0;
        let object = self.get(id).await?;
        let into = match &op.kind {
            OpKind::Create { parent, .. } | OpKind::Link { parent, .. } => Some(parent.0),
            OpKind::Rename { new_parent, .. } => Some(new_parent.0),
            OpKind::Delete => {
                if matches!(&object, Some(s) if s.kind == StoredKind::Directory) {
                    self.list(id).await?;
                }
                None
            }
            _ => None,
        };
        let Some(dir) = into else { return Ok(()) };
        if matches!(self.get(dir).await?, Some(s) if s.kind == StoredKind::Directory) {
            self.list(dir).await?;
        }
        if matches!(op.kind, OpKind::Rename { .. }) {
            let mut at = dir;
            for _ in 0..=rules::MAX_DEPTH {
                if at == ObjectId::ROOT.0 || at == id {
                    break;
                }
                match self.get(at).await? {
                    Some(folder) => at = folder.parent,
                    None => break,
                }
            }
        }
        Ok(())
    }

    /// The file's content after the ops applied so far (cheap to clone: chunks are shared).
    async fn content_of(&self, s: &ObjectState) -> Result<Content, ApiError> {
        match self.content.get(&s.id) {
            Some(c) => Ok(c.clone()),
            None => Content::load(self.backend, s).await,
        }
    }

    /// Records `content` as the file's new content in `s`, which becomes its state.
    fn set_content(&mut self, mut s: ObjectState, content: Content, hash: ContentHash) {
        s.size = content.size();
        s.hash = hash;
        s.chunks = content.chunk_ids();
        s.chunk_cvs = Some(content.chunk_cvs().to_vec());
        self.content.insert(s.id, content);
        self.set(s.id, Some(s));
    }
}

/// The overlay as the tree rules read it: only what [`Overlay::load_for`] loaded. A read of
/// anything else (a bug of `load_for`) is noted in `missed`, and the append fails.
struct OverlayView<'o, 'a> {
    ov: &'o Overlay<'a>,
    missed: Cell<bool>,
}

impl<'o, 'a> OverlayView<'o, 'a> {
    fn new(ov: &'o Overlay<'a>) -> Self {
        OverlayView {
            ov,
            missed: Cell::new(false),
        }
    }

    /// The answer of `f` over the overlay, or an internal error if it read what was not loaded.
    fn read<T>(ov: &Overlay<'_>, f: impl FnOnce(&OverlayView<'_, '_>) -> T) -> Result<T, ApiError> {
        let view = OverlayView::new(ov);
        let out = f(&view);
        if view.missed.get() {
            return Err(ApiError::Internal(
                "the tree rules read state the append had not loaded".into(),
            ));
        }
        Ok(out)
    }

    fn state(&self, id: ObjectId) -> Option<&'o ObjectState> {
        match self.ov.current.get(&id.0) {
            Some(s) => s.as_ref(),
            None => {
                self.missed.set(true);
                None
            }
        }
    }

    fn listing(&self, dir: ObjectId) -> &'o [(Vec<u8>, [u8; 16])] {
        match self.ov.listed.get(&dir.0) {
            Some(l) => l,
            None => {
                self.missed.set(true);
                &[]
            }
        }
    }
}

impl TreeView for OverlayView<'_, '_> {
    fn object(&self, id: ObjectId) -> Option<Facts> {
        self.state(id).map(|s| Facts {
            kind: match s.kind {
                StoredKind::File => Kind::File,
                StoredKind::Directory => Kind::Directory,
                StoredKind::Symlink { .. } => Kind::Symlink,
            },
            version: s.version,
            parent: ObjectId(s.parent),
            names: 1 + s.links.len(),
        })
    }

    fn child(&self, parent: ObjectId, name: &Name) -> Option<ObjectId> {
        if let Some(entry) = self.ov.entries.get(&(parent.0, name.0.clone())) {
            return entry.map(ObjectId);
        }
        let listing = self.listing(parent);
        listing
            .iter()
            .find(|(n, _)| *n == name.0)
            .map(|(_, c)| ObjectId(*c))
    }

    fn has_children(&self, dir: ObjectId) -> bool {
        let entries = &self.ov.entries;
        entries.iter().any(|((p, _), c)| *p == dir.0 && c.is_some())
            || self
                .listing(dir)
                .iter()
                .any(|(n, _)| !matches!(entries.get(&(dir.0, n.clone())), Some(None)))
    }

    fn names(&self, id: ObjectId) -> Vec<(ObjectId, Name)> {
        self.state(id).map_or_else(Vec::new, |s| {
            names_of(s).map(|(p, n)| (ObjectId(p), Name(n))).collect()
        })
    }

    fn content_hash(&self, id: ObjectId) -> Option<ContentHash> {
        self.state(id).map(|s| s.hash)
    }
}

fn check_size(size: u64, cap: u64) -> Result<(), ApiError> {
    if size > cap {
        return Err(ApiError::Unprocessable(format!(
            "file size {size} exceeds the server's limit of {cap} bytes"
        )));
    }
    Ok(())
}

impl Storage {
    /// The service over `backend`; inside a tokio runtime it also starts forwarding the
    /// backend's head events (other replicas' appends) to long polls.
    pub fn new(backend: Arc<dyn Backend>, config: StorageConfig) -> Storage {
        let heads: Arc<Heads> = Arc::default();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(forward_head_events(
                backend.head_events(),
                Arc::downgrade(&heads),
            ));
        }
        let memory = Arc::new(MemoryBudget::new(
            config.limits.memory_bytes,
            config.limits.memory_wait,
        ));
        Storage {
            backend,
            config,
            heads,
            memory,
        }
    }

    /// A receiver of the user's head (the value is only a wake-up hint: re-read the head).
    pub fn subscribe(&self, user: &str) -> watch::Receiver<u64> {
        self.heads
            .lock()
            .entry(user.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    fn notify(&self, user: &str, head: u64) {
        notify_heads(&self.heads, user, head);
    }

    /// Forgets the wake-up channel of a removed user.
    pub fn forget(&self, user: &str) {
        self.heads.lock().remove(user);
    }

    /// The memory budget shared by every append of this process.
    pub fn memory_budget(&self) -> &Arc<MemoryBudget> {
        &self.memory
    }

    /// Appends an encoded change log to `user`'s log, sent by `device` (the token's device),
    /// reserving the body's memory first; see [`Storage::append_reserved`].
    ///
    /// # Errors
    /// As [`Storage::append_reserved`].
    pub async fn append(
        &self,
        user: &str,
        device: &str,
        idempotency_key: &str,
        body: Bytes,
    ) -> Result<AppendRecord, AppendError> {
        let mut memory = self.memory.reservation();
        memory.grow(body.len() as u64, "its body").await?;
        self.append_reserved(user, device, idempotency_key, body, memory)
            .await
    }

    /// Appends an encoded change log to `user`'s log, all transactions or none. `memory`
    /// already holds the body's bytes; the append reserves what else it holds (the decoded
    /// log, delta results, new chunks) before it allocates it, and charges its work to the
    /// per-append budget before doing it. Decoding and hashing run on blocking threads. History
    /// records name `device` and the server's time, not what the change log claims.
    ///
    /// # Errors
    /// [`AppendError::Stale`] and [`AppendError::Refused`] when the log does not apply to the
    /// user's tree; else (as HTTP) 400 undecodable, 422 invalid, 409 a reused idempotency key,
    /// 413 over the work budget or larger than the whole memory budget, 503 when the memory
    /// budget stayed full.
    pub async fn append_reserved(
        &self,
        user: &str,
        device: &str,
        idempotency_key: &str,
        body: Bytes,
        mut memory: Reservation,
    ) -> Result<AppendRecord, AppendError> {
        memory
            .grow(decode_memory(&body), "decoding its change log")
            .await?;
        let (log, body_hash) = tokio::task::spawn_blocking(move || {
            let hash = *blake3::hash(&body).as_bytes();
            let log = decode_changelog(&body)
                .map_err(|e| ApiError::BadRequest(format!("cannot decode change log: {e}")))
                .and_then(|log| {
                    validate(&log)
                        .map_err(|e| ApiError::Unprocessable(format!("invalid change log: {e}")))?;
                    Ok(log)
                });
            (log, hash)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("decoding task failed: {e}")))?;
        let log = log?;
        let _lock = self.backend.lock_user(user.to_string()).await?;
        if let Some(rec) = self
            .backend
            .idempotency(user.to_string(), idempotency_key.to_string())
            .await?
        {
            if rec.body_hash != body_hash {
                return Err(ApiError::Conflict(
                    "this Idempotency-Key was already used for a different change log".into(),
                )
                .into());
            }
            return Ok(rec);
        }
        if log.transactions.is_empty() {
            return Err(
                ApiError::Unprocessable("the change log holds no transaction".into()).into(),
            );
        }
        let mut spend = Spend {
            work: WorkBudget::new(self.config.limits.work_bytes),
            memory,
        };
        let ops: u64 = log.transactions.iter().map(|t| t.ops.len() as u64).sum();
        spend
            .work
            .charge(ops.saturating_mul(OP_WORK_BYTES), &format!("its {ops} ops"))?;
        let head = self.backend.head(user.to_string()).await?;
        let (mut batch, chunks) = self
            .check_and_apply(user, device, head, &log, &mut spend)
            .await?;
        let rec = AppendRecord {
            first_seq: head + 1,
            last_seq: head + log.transactions.len() as u64,
            body_hash,
        };
        batch.idempotency = (idempotency_key.to_string(), rec);
        // Content first, durably; then the metadata that names it.
        self.backend.put_chunks(chunks).await?;
        self.backend.commit(user.to_string(), batch).await?;
        self.notify(user, rec.last_seq);
        tracing::debug!(
            user,
            work = spend.work.spent(),
            memory = spend.memory.bytes(),
            "append applied"
        );
        Ok(rec)
    }

    async fn check_and_apply(
        &self,
        user: &str,
        device: &str,
        head: u64,
        log: &ChangeLog,
        spend: &mut Spend,
    ) -> Result<(CommitBatch, Vec<(ChunkId, Bytes)>), AppendError> {
        let now = now_ms();
        let mut ov = Overlay {
            backend: self.backend.as_ref(),
            user,
            original: HashMap::new(),
            current: HashMap::new(),
            entries: HashMap::new(),
            listed: HashMap::new(),
            content: HashMap::new(),
            history: Vec::new(),
        };
        let mut stale: Vec<RuleError> = Vec::new();
        let mut first_error: Option<AppendError> = None;
        let mut entries = Vec::with_capacity(log.transactions.len());
        for (i, tx) in log.transactions.iter().enumerate() {
            let seq = head + 1 + i as u64;
            for op in &tx.ops {
                // After an op failed, the versions of the next ones cannot be judged: the
                // failure is the answer, not a stale base.
                if first_error.is_some() {
                    break;
                }
                ov.get(op.object.0).await?;
                if let Err(e) = OverlayView::read(&ov, |v| rules::check_base(op, v))? {
                    stale.push(e);
                    continue;
                }
                if !stale.is_empty() {
                    continue;
                }
                if let Err(e) = self.apply_op(&mut ov, op, seq, now, device, spend).await {
                    let at = |m: String| format!("transaction {i}, object {}: {m}", op.object);
                    first_error = Some(match e {
                        OpRefusal::Rule(rule) => AppendError::Refused {
                            transaction: i,
                            object: op.object,
                            rule,
                        },
                        OpRefusal::Api(ApiError::Conflict(m)) => ApiError::Conflict(at(m)).into(),
                        OpRefusal::Api(ApiError::Unprocessable(m)) => {
                            ApiError::Unprocessable(at(m)).into()
                        }
                        OpRefusal::Api(other) => other.into(),
                    });
                }
            }
            entries.push((seq, encode_transaction(tx)));
        }
        if !stale.is_empty() {
            return Err(AppendError::Stale(stale));
        }
        if let Some(e) = first_error {
            return Err(e);
        }

        let mut batch = CommitBatch {
            expected_head: head,
            entries,
            history_keep: self.config.history_versions,
            ..CommitBatch::default()
        };
        for (id, now) in &ov.current {
            let before = ov.original.get(id).cloned().flatten();
            if before.as_ref() == now.as_ref() {
                continue;
            }
            if let Some(b) = &before {
                if *id != ObjectId::ROOT.0 {
                    batch.delete_children.extend(names_of(b));
                }
            }
            match now {
                Some(n) => {
                    if *id != ObjectId::ROOT.0 {
                        batch
                            .put_children
                            .extend(names_of(n).map(|(p, name)| (p, name, n.id)));
                    }
                    batch.put_objects.push(n.clone());
                }
                None => batch.delete_objects.push(*id),
            }
        }
        // The chunks made for the final content of every file still there (the chunk lists are
        // already in the states); intermediate ones of a file written twice are dropped.
        let mut chunks = Vec::new();
        let mut seen = HashSet::new();
        for (id, content) in &ov.content {
            if matches!(ov.current.get(id), Some(Some(_))) {
                chunks.extend(content.new_chunks().filter(|(c, _)| seen.insert(*c)));
            }
        }
        // History: the version each content change produced (the final content of a file
        // changed twice in one append is recorded at its last version).
        let mut last: HashMap<[u8; 16], (u64, i64, String)> = HashMap::new();
        for (id, v, t, d) in &ov.history {
            last.insert(*id, (*v, *t, d.clone()));
        }
        for (id, (version, time_ms, device)) in last {
            if let Some(Some(o)) = ov.current.get(&id) {
                batch.history.push((
                    id,
                    HistoryEntry {
                        version,
                        size: o.size,
                        hash: o.hash,
                        time_ms,
                        device,
                        seq: o.seq,
                        chunks: o.chunks.clone(),
                    },
                ));
            }
        }
        Ok((batch, chunks))
    }

    /// Checks `op` with the tree rules over the overlay, then applies what they say it changes.
    async fn apply_op(
        &self,
        ov: &mut Overlay<'_>,
        op: &Op,
        seq: u64,
        time_ms: i64,
        device: &str,
        spend: &mut Spend,
    ) -> Result<(), OpRefusal> {
        let id = op.object.0;
        ov.load_for(op).await?;
        let effect = OverlayView::read(ov, |v| rules::check(op, v))??;
        let existing = ov.get(id).await?;
        if let Effect::Create(new) = &effect {
            let s = ObjectState {
                id,
                parent: new.parent.0,
                name: new.name.0.clone(),
                links: Vec::new(),
                kind: match new.kind {
                    ObjectKind::File => StoredKind::File,
                    ObjectKind::Directory => StoredKind::Directory,
                    ObjectKind::Symlink { target } => StoredKind::Symlink {
                        target: target.clone(),
                    },
                },
                version: op.new_version,
                mode: new.mode,
                mtime_ns: new.mtime_ns,
                size: 0,
                hash: empty_hash(),
                chunks: Vec::new(),
                chunk_cvs: Some(Vec::new()),
                xattrs: BTreeMap::new(),
                seq,
            };
            ov.entries.insert((s.parent, s.name.clone()), Some(id));
            if s.kind == StoredKind::File {
                ov.history
                    .push((id, op.new_version, time_ms, device.to_string()));
            }
            ov.set(id, Some(s));
            return Ok(());
        }
        // Every other op is on an object the rules found.
        let mut s = existing.ok_or_else(|| ApiError::Internal("checked object vanished".into()))?;
        s.version = op.new_version;
        s.seq = seq;
        match effect {
            Effect::Create(_) => {}
            Effect::Content(change) => {
                check_size(change.new_size(), self.config.max_object_bytes)?;
                let content = match change {
                    ContentChange::Write {
                        delta, new_size, ..
                    } => {
                        let content = self.apply_delta(ov, &s, delta, new_size, spend).await?;
                        check_result(&content, change.new_hash(), new_size)?;
                        content
                    }
                    ContentChange::Truncate { new_size, new_hash } => {
                        let mut c = ov.content_of(&s).await?;
                        c.apply_ranges(self.backend.as_ref(), new_size, &[], spend)
                            .await?;
                        if c.hash()? != *new_hash {
                            return Err(ApiError::Unprocessable(
                                "the truncated content does not match the op's new hash".into(),
                            )
                            .into());
                        }
                        c
                    }
                };
                ov.set_content(s, content, *change.new_hash());
                ov.history
                    .push((id, op.new_version, time_ms, device.to_string()));
            }
            Effect::Names(change) => {
                for (p, n) in change.removed() {
                    ov.entries.insert((p.0, n.0.clone()), None);
                }
                for (p, n) in change.added() {
                    ov.entries.insert((p.0, n.0.clone()), Some(id));
                }
                if let Some(((parent, name), links)) = change.split() {
                    s.parent = parent.0;
                    s.name = name.0.clone();
                    s.links = links.iter().map(|(p, n)| (p.0, n.0.clone())).collect();
                }
                ov.set(id, Some(s));
            }
            Effect::Delete => {
                for key in names_of(&s) {
                    ov.entries.insert(key, None);
                }
                ov.content.remove(&id);
                ov.set(id, None);
            }
            Effect::Attr(change) => {
                change.apply(&mut s.mode, &mut s.mtime_ns);
                ov.set(id, Some(s));
            }
            Effect::Xattr(change) => {
                change.apply(&mut s.xattrs);
                ov.set(id, Some(s));
            }
        }
        Ok(())
    }

    /// A `Write` op's new content: `Ranges` patches only the chunks it touches; `Whole` needs
    /// no base; `Rsync` reads the whole base, so its base and result are capped by
    /// [`AppendLimits::max_rsync_bytes`], and it may produce no more than the op's `new_size`.
    /// The base is the file's current content, whose hash the caller checked against the op's
    /// base hash. The result is not checked here. Work and memory are charged to `spend` first.
    async fn apply_delta(
        &self,
        ov: &Overlay<'_>,
        s: &ObjectState,
        delta: &Delta,
        new_size: u64,
        spend: &mut Spend,
    ) -> Result<Content, ApiError> {
        match delta {
            Delta::Whole(bytes) => {
                if bytes.len() as u64 != new_size {
                    return Err(delta_error(DeltaError::ResultSizeMismatch {
                        expected: new_size,
                        actual: bytes.len() as u64,
                    }));
                }
                spend
                    .charge(new_size, new_size, "a whole-content write")
                    .await?;
                Content::from_bytes(Bytes::copy_from_slice(bytes)).await
            }
            Delta::Ranges {
                new_size: size,
                ranges,
            } => {
                if *size != new_size {
                    return Err(delta_error(DeltaError::ResultSizeMismatch {
                        expected: new_size,
                        actual: *size,
                    }));
                }
                let mut c = ov.content_of(s).await?;
                c.apply_ranges(self.backend.as_ref(), *size, ranges, spend)
                    .await?;
                Ok(c)
            }
            Delta::Rsync(rsync) => {
                let cap = self.config.limits.max_rsync_bytes;
                let base_size = ov.content.get(&s.id).map_or(s.size, Content::size);
                for (what, size) in [("base", base_size), ("result", new_size)] {
                    if size > cap {
                        return Err(ApiError::OverLimit(format!(
                            "an rsync delta's {what} of {size} bytes is over the server's \
                             limit of {cap} bytes for rsync deltas: send ranges or the whole \
                             content"
                        )));
                    }
                }
                // Read the base, apply, hash the result: the base, a copy of the delta for the
                // blocking thread and the result are held at once.
                spend
                    .charge(
                        base_size.saturating_add(new_size.saturating_mul(2)),
                        base_size
                            .saturating_add(new_size)
                            .saturating_add(rsync.len() as u64),
                        "an rsync delta",
                    )
                    .await?;
                let backend = self.backend.as_ref();
                // Stored content is read as is, without computing chaining values it may lack.
                let base = match ov.content.get(&s.id) {
                    Some(c) => c.read_all(backend).await?,
                    None => read_range(backend, &s.chunks, s.size, 0, s.size).await?,
                };
                // The op says how large the result is: a delta producing more is refused as
                // soon as it passes that, whatever the server's file size limit.
                let limit = usize::try_from(new_size).unwrap_or(usize::MAX);
                let delta = delta.clone();
                let out =
                    tokio::task::spawn_blocking(move || crate::delta::apply(&base, &delta, limit))
                        .await
                        .map_err(|e| ApiError::Internal(format!("delta task failed: {e}")))?
                        .map_err(delta_error)?;
                if out.len() as u64 != new_size {
                    return Err(delta_error(DeltaError::ResultSizeMismatch {
                        expected: new_size,
                        actual: out.len() as u64,
                    }));
                }
                Content::from_bytes(Bytes::from(out)).await
            }
        }
    }
}

/// Milliseconds since the Unix epoch, by the server's clock.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The memory decoding `body` may take besides the body itself: the decompressed body its
/// header declares (at most [`MAX_BODY_LEN`]) and the decoded log (the payloads again, and
/// about 160 bytes per op, an op taking at least 19 bytes encoded). Nothing for a body that is
/// not a change log: the decoder refuses it at once.
fn decode_memory(body: &[u8]) -> u64 {
    // The header (docs/change-log-format.md): magic, version, reserved, then the body length.
    if body.get(..4) != Some(&crate::changelog::encoding::CHANGELOG_MAGIC[..]) {
        return 0;
    }
    let Some(len) = body.get(8..16).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
        return 0;
    };
    let declared = u64::from_le_bytes(len).min(MAX_BODY_LEN);
    let ops = (declared / 19).min(MAX_OPS_PER_LOG);
    declared
        .saturating_mul(2)
        .saturating_add(ops.saturating_mul(160))
}

fn delta_error(e: DeltaError) -> ApiError {
    ApiError::Unprocessable(format!("cannot apply delta: {e}"))
}

/// Checks that a `Write` op's result is the content the op describes.
fn check_result(content: &Content, new_hash: &ContentHash, new_size: u64) -> Result<(), ApiError> {
    if content.size() != new_size {
        return Err(delta_error(DeltaError::ResultSizeMismatch {
            expected: new_size,
            actual: content.size(),
        }));
    }
    let actual = content.hash()?;
    if actual != *new_hash {
        return Err(delta_error(DeltaError::ResultHashMismatch {
            expected: hex::encode(new_hash),
            actual: hex::encode(actual),
        }));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod verdicts;
