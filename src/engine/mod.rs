//! The sync engine: one device's state machine between its local tree and the user's ordered
//! log on the server. No I/O and no clock: the caller feeds events in with the current time
//! (`handle_*(now_ms, ..)`) and pulls work out ([`Engine::poll_action`],
//! [`Engine::poll_timeout`]), like quinn-proto. See `docs/sync-engine.md`.
//!
//! What the engine owns: the server-known tree at the cursor (S), the cursor, the pending
//! local transactions (the outbox, O), and the local tree L = S + O (derived). What always
//! holds: every outbox transaction applies with the server's checks on S after the ones
//! before it; L is exactly S with O applied; every change to the durable state (cursor, S, O)
//! leaves the engine in one [`Action::Apply`], which the I/O side persists atomically together
//! with the change to its local tree; the engine is deterministic given its seed and inputs.

pub mod names;
mod rebase;
mod refusal;
pub mod tree;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use crate::changelog::{
    empty_hash, ContentHash, Delta, ObjectId, ObjectKind, Op, OpKind, Transaction, Version,
};

pub use names::{conflicted_copy_name, format_timestamp, SeededRng};
pub use tree::{ObjectState, Tree, TreeError};

use rebase::{rebase, Prior, RebaseInput};
pub use refusal::{Refusal, SetAside, REFUSALS_BEFORE_ASIDE};

/// How the engine behaves; chosen by the I/O side.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// This device's name (transactions, conflicted-copy names).
    pub device: String,
    /// Seeds the engine's ids and backoff jitter (use a random seed in production, a fixed
    /// one in tests).
    pub seed: u64,
    /// At most this many transactions per upload.
    pub upload_batch: usize,
    /// First retry delay after a failure, in milliseconds.
    pub backoff_base_ms: u64,
    /// Longest retry delay, in milliseconds.
    pub backoff_max_ms: u64,
}

impl EngineConfig {
    /// Defaults for `device`: batches of 64, retries from 500 ms up to 60 s.
    pub fn new(device: impl Into<String>, seed: u64) -> EngineConfig {
        EngineConfig {
            device: device.into(),
            seed,
            upload_batch: 64,
            backoff_base_ms: 500,
            backoff_max_ms: 60_000,
        }
    }
}

/// The engine's durable state, as the I/O side persisted it; [`Engine::restore`] rebuilds the
/// engine from it after a restart or crash.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PersistedState {
    /// The last server sequence applied.
    pub cursor: u64,
    /// The server-known tree at `cursor` (every [`Action::Apply`]'s `server_changes`).
    pub server_tree: Vec<ObjectState>,
    /// The pending local transactions, oldest first.
    pub outbox: Vec<Transaction>,
}

/// Names one request the engine asked for, so that late answers to abandoned requests are
/// recognised and ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// A change to the server-known tree (persist it with the cursor).
#[derive(Clone, Debug, PartialEq)]
pub enum ServerChange {
    Put(ObjectState),
    Remove(ObjectId),
}

/// Where the new content of a locally changed file comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum ContentSource {
    /// The content stays as it is.
    Unchanged,
    /// Apply these `Write`/`Truncate` ops, in order, to the current local content (its hash is
    /// the first op's base; an object new to the tree starts empty).
    Ops(Vec<OpKind>),
    /// Fetch the content from the server (`GET /v1/objects/{id}/content?version=V`) and check
    /// its hash: the local content diverged, or applying the delta failed.
    Fetch { version: Version, hash: ContentHash },
}

/// A change to the local tree: the object's final state.
#[derive(Clone, Debug, PartialEq)]
pub enum LocalChange {
    Put {
        state: Box<ObjectState>,
        content: ContentSource,
    },
    Remove(ObjectId),
}

/// A new local object whose content is the current local content of `source` (read before
/// the apply's other changes): a conflicted copy, or a file deleted remotely that comes back
/// with the local edit (then `target.id == source`).
#[derive(Clone, Debug, PartialEq)]
pub struct ContentCopy {
    pub source: ObjectId,
    pub source_hash: ContentHash,
    pub source_size: u64,
    /// The state of the object to create (its `version` is filled by the transaction).
    pub target: ObjectState,
    /// The id of the transaction that uploads it.
    pub transaction_id: [u8; 16],
}

impl ContentCopy {
    /// The transaction that uploads the copy, given the content read from `source`. The I/O
    /// side appends it to the outbox in the apply's write batch, then passes it to
    /// [`Engine::handle_local_commit`].
    pub fn transaction(&self, device: &str, time_ms: i64, content: Vec<u8>) -> Transaction {
        let t = &self.target;
        let id = t.id;
        let mut ops = vec![Op {
            object: id,
            base_version: 0,
            new_version: 1,
            kind: OpKind::Create {
                parent: t.parent,
                name: t.name.clone(),
                kind: ObjectKind::File,
                mode: t.mode,
                mtime_ns: t.mtime_ns,
            },
        }];
        let new_hash = *blake3::hash(&content).as_bytes();
        if new_hash != empty_hash() {
            ops.push(Op {
                object: id,
                base_version: 1,
                new_version: 2,
                kind: OpKind::Write {
                    base_hash: empty_hash(),
                    new_hash,
                    new_size: content.len() as u64,
                    delta: Delta::Whole(content),
                },
            });
        }
        for (name, value) in &t.xattrs {
            let base = ops.len() as u64;
            ops.push(Op {
                object: id,
                base_version: base,
                new_version: base + 1,
                kind: OpKind::SetXattr {
                    name: name.clone(),
                    value: value.clone(),
                },
            });
        }
        Transaction {
            id: self.transaction_id,
            device: device.to_string(),
            time_ms,
            ops,
        }
    }
}

/// One remote transaction's effect on the device: persist all of it in one write batch.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalApply {
    /// The new cursor (the remote transaction's sequence number).
    pub cursor: u64,
    /// The remote transaction as the server stored it (for history and logs).
    pub transaction: Transaction,
    /// Changes to the server-known tree.
    pub server_changes: Vec<ServerChange>,
    /// Copies to make first, reading each source's content before any other change.
    pub copies: Vec<ContentCopy>,
    /// The final state of each local object that changed: apply as one batch (removals and
    /// puts describe the end state; intermediate name clashes do not matter).
    pub local_changes: Vec<LocalChange>,
    /// Outbox transactions the server acknowledged by storing them: remove from the front.
    pub acknowledged: Vec<[u8; 16]>,
    /// The rest of the outbox, rebased (`None`: unchanged). Copy transactions go after it.
    pub outbox: Option<Vec<Transaction>>,
    /// A retry after [`Engine::handle_apply_failed`]: every content is fetched whole.
    pub heal: bool,
}

impl LocalApply {
    /// The same apply without the delta bytes of its transaction and its ops (hashes and
    /// sizes kept): what the engine keeps to heal it, never tens of MiB.
    pub fn without_payloads(&self) -> LocalApply {
        LocalApply {
            cursor: self.cursor,
            transaction: crate::changelog::payload::strip(&self.transaction),
            server_changes: self.server_changes.clone(),
            copies: self.copies.clone(),
            local_changes: self
                .local_changes
                .iter()
                .map(|c| match c {
                    LocalChange::Put {
                        state,
                        content: ContentSource::Ops(ops),
                    } => LocalChange::Put {
                        state: state.clone(),
                        content: ContentSource::Ops(
                            ops.iter()
                                .map(crate::changelog::payload::strip_kind)
                                .collect(),
                        ),
                    },
                    other => other.clone(),
                })
                .collect(),
            acknowledged: self.acknowledged.clone(),
            outbox: self.outbox.clone(),
            heal: self.heal,
        }
    }
}

/// What the engine asks the I/O side to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// `POST /v1/log` with these transactions and `Idempotency-Key: idempotency_key`.
    Upload {
        request: RequestId,
        idempotency_key: String,
        transactions: Vec<Transaction>,
    },
    /// `GET /v1/log?after=after`.
    Pull { request: RequestId, after: u64 },
    /// `GET /v1/log/wait?after=after`.
    LongPoll { request: RequestId, after: u64 },
    /// Abandon a long poll (its answer will be ignored anyway).
    CancelLongPoll { request: RequestId },
    /// Apply a remote transaction to the local tree and persist the engine's state.
    Apply(Box<LocalApply>),
}

/// Why the engine refused an input.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("local transaction does not apply to the local tree: {0}")]
    InvalidLocalTransaction(TreeError),
    #[error("persisted outbox does not apply to the persisted server tree: {0}")]
    InconsistentState(TreeError),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Request {
    Pull,
    Upload,
    LongPoll,
}

/// The sync engine of one device. A clone is a snapshot: the sync driver tries a step on
/// one and keeps the original when the step's applies need content staged first.
#[derive(Clone)]
pub struct Engine {
    config: EngineConfig,
    server: Tree,
    cursor: u64,
    outbox: Vec<Transaction>,
    local: Tree,
    rng: SeededRng,
    now_ms: i64,
    online: bool,
    known_head: u64,
    need_pull: bool,
    in_flight: Option<(RequestId, Request)>,
    /// An upload whose outcome is unknown (network failure): resent as it is.
    unconfirmed: Option<(String, Vec<Transaction>)>,
    next_request: u64,
    failures: u32,
    retry_at: Option<u64>,
    conflicts_without_progress: u32,
    /// The next upload holds the head transaction alone (a batch was refused).
    head_only: bool,
    /// The head transaction refused alone with a clash, and how many times in a row.
    refused: Option<([u8; 16], u32)>,
    last_apply: Option<LocalApply>,
    /// Ids of local transactions dropped by rebases.
    retired: HashSet<[u8; 16]>,
    /// Copy transactions the last apply asked for and the I/O side has not committed yet:
    /// remote entries wait in `backlog` until they are in the outbox.
    awaiting_copies: HashSet<[u8; 16]>,
    backlog: VecDeque<(u64, Transaction)>,
    actions: VecDeque<Action>,
}

impl Engine {
    /// A new device with an empty tree at cursor 0.
    pub fn new(config: EngineConfig) -> Engine {
        let rng = SeededRng::new(config.seed);
        Engine {
            config,
            server: Tree::new(),
            cursor: 0,
            outbox: Vec::new(),
            local: Tree::new(),
            rng,
            now_ms: 0,
            online: true,
            known_head: 0,
            need_pull: true,
            in_flight: None,
            unconfirmed: None,
            next_request: 1,
            failures: 0,
            retry_at: None,
            conflicts_without_progress: 0,
            head_only: false,
            refused: None,
            last_apply: None,
            retired: HashSet::new(),
            awaiting_copies: HashSet::new(),
            backlog: VecDeque::new(),
            actions: VecDeque::new(),
        }
    }

    /// Rebuilds the engine from its persisted state (after a restart or a crash). The local
    /// tree is the server tree with the outbox applied; the I/O side's store holds exactly it.
    ///
    /// # Errors
    /// [`EngineError::InconsistentState`] if the outbox does not apply to the server tree.
    pub fn restore(config: EngineConfig, state: PersistedState) -> Result<Engine, EngineError> {
        let mut e = Engine::new(config);
        e.server = Tree::from_objects(state.server_tree);
        e.cursor = state.cursor;
        e.known_head = state.cursor;
        let mut local = e.server.clone();
        for tx in &state.outbox {
            local
                .apply_transaction(&tx.ops)
                .map_err(EngineError::InconsistentState)?;
        }
        e.local = local;
        e.outbox = state.outbox;
        Ok(e)
    }

    /// The durable state, as the I/O side should hold it after executing every action.
    pub fn persisted_state(&self) -> PersistedState {
        PersistedState {
            cursor: self.cursor,
            server_tree: self.server.sorted_objects(),
            outbox: self.outbox.clone(),
        }
    }

    pub fn device(&self) -> &str {
        &self.config.device
    }

    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    pub fn outbox(&self) -> &[Transaction] {
        &self.outbox
    }

    /// The local tree (server-known tree plus the outbox).
    pub fn local_tree(&self) -> &Tree {
        &self.local
    }

    /// The server-known tree at the cursor.
    pub fn server_tree(&self) -> &Tree {
        &self.server
    }

    /// The base version the next local op on `id` must carry (0: absent, a `Create`).
    pub fn local_version(&self, id: ObjectId) -> Version {
        self.local.version(id)
    }

    /// Whether nothing is left to do but wait for remote changes: online, outbox empty,
    /// nothing to pull, no apply to retry.
    pub fn is_idle(&self) -> bool {
        self.online
            && self.outbox.is_empty()
            && self.unconfirmed.is_none()
            && !self.need_pull
            && self.known_head <= self.cursor
            && self.actions.is_empty()
            && self.awaiting_copies.is_empty()
            && self.backlog.is_empty()
            && matches!(self.in_flight, None | Some((_, Request::LongPoll)))
    }

    /// The next action to execute, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        let action = self.actions.pop_front()?;
        if let Action::Apply(apply) = &action {
            // Kept for a heal, which fetches every changed content whole: without the ops'
            // delta bytes (they can be tens of MiB).
            self.last_apply = Some(apply.without_payloads());
        }
        Some(action)
    }

    /// When [`Engine::handle_timeout`] should be called next (ms), if at all.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.retry_at
    }

    /// Time passed: retries whose backoff expired go out.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.tick(now_ms);
        self.drive(now_ms);
    }

    /// The network came or went. Going offline abandons the request in flight (its answer
    /// will be ignored); coming back resets the backoff.
    pub fn handle_connectivity(&mut self, now_ms: u64, online: bool) {
        self.tick(now_ms);
        if online && !self.online {
            self.failures = 0;
            self.retry_at = None;
        }
        self.online = online;
        if !online {
            self.in_flight = None;
        }
        self.drive(now_ms);
    }

    /// A local transaction was committed by the capture layer. Call it under the same lock as
    /// the outbox write, before committing that write: on `Err` do not commit it.
    ///
    /// # Errors
    /// [`EngineError::InvalidLocalTransaction`] if it does not apply to the local tree (wrong
    /// base version: take it from [`Engine::local_version`]).
    pub fn handle_local_commit(&mut self, now_ms: u64, tx: Transaction) -> Result<(), EngineError> {
        self.tick(now_ms);
        self.local
            .apply_transaction(&tx.ops)
            .map_err(EngineError::InvalidLocalTransaction)?;
        let id = tx.id;
        self.outbox.push(tx);
        if self.awaiting_copies.remove(&id) && self.awaiting_copies.is_empty() {
            while self.awaiting_copies.is_empty() {
                let Some((seq, remote)) = self.backlog.pop_front() else {
                    break;
                };
                self.process_remote(seq, remote);
            }
        }
        if let Some((request, Request::LongPoll)) = self.in_flight {
            self.in_flight = None;
            self.actions.push_back(Action::CancelLongPoll { request });
        }
        self.drive(now_ms);
        Ok(())
    }

    /// Entries after the cursor arrived (`GET /v1/log`), with the head the server reported.
    pub fn handle_pulled(
        &mut self,
        now_ms: u64,
        request: RequestId,
        entries: Vec<(u64, Transaction)>,
        head: u64,
    ) {
        self.tick(now_ms);
        if !self.finish(request, Request::Pull) {
            return;
        }
        self.failures = 0;
        self.known_head = self.known_head.max(head);
        let got_any = !entries.is_empty();
        for (seq, tx) in entries {
            self.process_remote(seq, tx);
        }
        self.need_pull = got_any && self.cursor < self.known_head;
        if !got_any {
            // The server has nothing after the cursor: its head is the cursor.
            self.known_head = self.cursor;
        }
        self.drive(now_ms);
    }

    /// The long poll answered with the server's head.
    pub fn handle_long_poll(&mut self, now_ms: u64, request: RequestId, head: u64) {
        self.tick(now_ms);
        if !self.finish(request, Request::LongPoll) {
            return;
        }
        self.failures = 0;
        if head > self.cursor {
            self.known_head = self.known_head.max(head);
            self.need_pull = true;
        }
        self.drive(now_ms);
    }

    /// The server stored the uploaded batch as sequences `first_seq..=last_seq`.
    pub fn handle_upload_acked(
        &mut self,
        now_ms: u64,
        request: RequestId,
        first_seq: u64,
        last_seq: u64,
    ) {
        self.tick(now_ms);
        if !self.finish(request, Request::Upload) {
            return;
        }
        self.failures = 0;
        self.conflicts_without_progress = 0;
        self.head_only = false;
        self.refused = None;
        let batch = self.unconfirmed.take().map(|(_, b)| b).unwrap_or_default();
        self.known_head = self.known_head.max(last_seq);
        let count = last_seq.saturating_sub(first_seq) + 1;
        if first_seq == self.cursor + 1 && count <= batch.len() as u64 {
            // Nobody appended in between: what the server stored is the log right after the
            // cursor. The I/O side may send a prefix of the batch (it cuts large batches by
            // bytes); the rest stays in the outbox and goes in the next upload.
            for (i, tx) in batch.into_iter().take(count as usize).enumerate() {
                self.process_remote(first_seq + i as u64, tx);
            }
        } else {
            self.need_pull = true;
        }
        self.drive(now_ms);
    }

    /// The server refused the upload with 409 naming stale base versions: pull, rebase,
    /// retry. (Other refusals: [`Engine::handle_upload_refused`].)
    pub fn handle_upload_conflict(&mut self, now_ms: u64, request: RequestId) {
        let aside = self.handle_upload_refused(now_ms, request, Refusal::Stale);
        debug_assert!(aside.is_none());
    }

    /// A request failed without an answer (network, timeout, 5xx): retry after a backoff. An
    /// upload is retried with the same body and idempotency key.
    pub fn handle_request_failed(&mut self, now_ms: u64, request: RequestId) {
        self.tick(now_ms);
        let Some((id, _)) = &self.in_flight else {
            return;
        };
        if *id != request {
            return;
        }
        self.in_flight = None;
        self.back_off(now_ms);
        self.drive(now_ms);
    }

    /// The apply of the transaction at `seq` failed on the device and was rolled back: it is
    /// emitted again with every content fetched whole from the server.
    pub fn handle_apply_failed(&mut self, now_ms: u64, seq: u64) {
        self.tick(now_ms);
        let Some(last) = &self.last_apply else { return };
        if last.cursor != seq {
            return;
        }
        let mut heal = last.clone();
        heal.heal = true;
        for change in &mut heal.local_changes {
            if let LocalChange::Put { state, content } = change {
                if state.is_file() && *content != ContentSource::Unchanged {
                    *content = ContentSource::Fetch {
                        version: state.content_version,
                        hash: state.hash,
                    };
                }
            }
        }
        self.actions.push_front(Action::Apply(Box::new(heal)));
    }

    fn tick(&mut self, now_ms: u64) {
        self.now_ms = i64::try_from(now_ms).unwrap_or(i64::MAX);
        if let Some(at) = self.retry_at {
            if now_ms >= at {
                self.retry_at = None;
            }
        }
    }

    fn finish(&mut self, request: RequestId, kind: Request) -> bool {
        match &self.in_flight {
            Some((id, k)) if *id == request && *k == kind => {
                self.in_flight = None;
                true
            }
            _ => false,
        }
    }

    fn back_off(&mut self, now_ms: u64) {
        self.failures = self.failures.saturating_add(1);
        let exp = self.failures.min(20) - 1;
        let delay = self
            .config
            .backoff_base_ms
            .saturating_mul(1u64 << exp)
            .min(self.config.backoff_max_ms);
        let jittered = self.rng.between(delay / 2, delay);
        self.retry_at = Some(now_ms.saturating_add(jittered.max(1)));
    }

    fn new_request(&mut self, kind: Request) -> RequestId {
        let id = RequestId(self.next_request);
        self.next_request += 1;
        self.in_flight = Some((id, kind));
        id
    }

    /// Starts the next request if none is in flight.
    fn drive(&mut self, now_ms: u64) {
        if !self.online || self.in_flight.is_some() || !self.awaiting_copies.is_empty() {
            return;
        }
        if let Some(at) = self.retry_at {
            if now_ms < at {
                return;
            }
            self.retry_at = None;
        }
        if let Some((key, batch)) = self.unconfirmed.clone() {
            let request = self.new_request(Request::Upload);
            self.actions.push_back(Action::Upload {
                request,
                idempotency_key: key,
                transactions: batch,
            });
        } else if self.need_pull || self.known_head > self.cursor {
            let request = self.new_request(Request::Pull);
            self.actions.push_back(Action::Pull {
                request,
                after: self.cursor,
            });
        } else if let Some(first) = self.outbox.first() {
            let key = hex::encode(first.id);
            let most = if self.head_only {
                1
            } else {
                self.config.upload_batch.max(1)
            };
            let n = self.outbox.len().min(most);
            let batch: Vec<Transaction> = self.outbox[..n].to_vec();
            self.unconfirmed = Some((key.clone(), batch.clone()));
            let request = self.new_request(Request::Upload);
            self.actions.push_back(Action::Upload {
                request,
                idempotency_key: key,
                transactions: batch,
            });
        } else {
            let request = self.new_request(Request::LongPoll);
            self.actions.push_back(Action::LongPoll {
                request,
                after: self.cursor,
            });
        }
    }

    /// Applies the remote transaction at `seq` (the next one after the cursor): to the
    /// server-known tree, then to the local tree through a rebase of the outbox.
    fn process_remote(&mut self, seq: u64, tx: Transaction) {
        if !self.awaiting_copies.is_empty() {
            self.backlog.push_back((seq, tx));
            return;
        }
        if seq <= self.cursor {
            return;
        }
        if seq != self.cursor + 1 {
            self.need_pull = true;
            return;
        }
        self.conflicts_without_progress = 0;
        let own = self.outbox.first().map(|t| t.id == tx.id).unwrap_or(false);
        let touched: BTreeSet<ObjectId> = tx.ops.iter().map(|o| o.object).collect();
        let mut before: HashMap<ObjectId, Option<ObjectState>> = touched
            .iter()
            .map(|id| (*id, self.server.get(*id).cloned()))
            .collect();
        // The state the pending ops were made against, for the touched objects.
        let mut prior_overrides = before.clone();
        if own && self.outbox[0] != tx {
            let mut p = self.server.clone();
            for op in &self.outbox[0].ops {
                p.force_op(op);
            }
            for op in self.outbox[0].ops.iter().chain(tx.ops.iter()) {
                prior_overrides.insert(op.object, p.get(op.object).cloned());
            }
        }
        for op in &tx.ops {
            self.server.force_op(op);
        }
        let server_changes: Vec<ServerChange> = touched
            .iter()
            .map(|id| match self.server.get(*id) {
                Some(s) => ServerChange::Put(s.clone()),
                None => ServerChange::Remove(*id),
            })
            .collect();
        self.cursor = seq;
        let mut acknowledged = Vec::new();
        if own {
            let mine = self.outbox.remove(0);
            acknowledged.push(mine.id);
            if mine == tx {
                // Our own change came back as we sent it: the local tree already holds it.
                self.emit_apply(
                    seq,
                    tx,
                    server_changes,
                    Vec::new(),
                    Vec::new(),
                    acknowledged,
                    None,
                );
                return;
            }
            for op in &mine.ops {
                before.entry(op.object).or_insert(None);
            }
        }
        // A transaction we dropped after sending it may have been stored after all: it is
        // remote truth like any other.
        self.retired.remove(&tx.id);
        let pending_ids: BTreeSet<ObjectId> = self
            .outbox
            .iter()
            .flat_map(|t| t.ops.iter().map(|o| o.object))
            .collect();
        if self.outbox.is_empty() && !own {
            // Nothing pending: the local tree takes the remote change as it is.
            let old: HashMap<ObjectId, Option<ObjectState>> = touched
                .iter()
                .map(|id| (*id, self.local.get(*id).cloned()))
                .collect();
            for op in &tx.ops {
                self.local.force_op(op);
            }
            let local_changes = diff(
                |id| old.get(&id).cloned().flatten(),
                &self.local,
                touched.iter().copied(),
                &HashSet::new(),
                &tx,
                &before,
            );
            self.emit_apply(
                seq,
                tx,
                server_changes,
                Vec::new(),
                local_changes,
                acknowledged,
                None,
            );
            return;
        }
        let r = rebase(
            RebaseInput {
                new_base: &self.server,
                prior: Prior {
                    overrides: &prior_overrides,
                    fallback: &self.server,
                },
                pending: &self.outbox,
                local: &self.local,
                device: &self.config.device,
                now_ms: self.now_ms,
            },
            &mut self.rng,
        );
        self.retired.extend(r.dropped.iter().copied());
        let (new_local, new_outbox, copies) = (r.local, r.outbox, r.copies);
        let mut candidates: BTreeSet<ObjectId> = touched.clone();
        candidates.extend(pending_ids);
        candidates.extend(before.keys().copied());
        candidates.extend(r.also_touched);
        for t in &new_outbox {
            candidates.extend(t.ops.iter().map(|o| o.object));
        }
        let copy_targets: HashSet<ObjectId> = copies.iter().map(|c| c.target.id).collect();
        let old_local = &self.local;
        let local_changes = diff(
            |id| old_local.get(id).cloned(),
            &new_local,
            candidates.into_iter(),
            &copy_targets,
            &tx,
            &before,
        );
        let outbox_change = if new_outbox != self.outbox {
            Some(new_outbox.clone())
        } else {
            None
        };
        self.outbox = new_outbox;
        self.local = new_local;
        self.emit_apply(
            seq,
            tx,
            server_changes,
            copies,
            local_changes,
            acknowledged,
            outbox_change,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn emit_apply(
        &mut self,
        seq: u64,
        transaction: Transaction,
        server_changes: Vec<ServerChange>,
        copies: Vec<ContentCopy>,
        local_changes: Vec<LocalChange>,
        acknowledged: Vec<[u8; 16]>,
        outbox: Option<Vec<Transaction>>,
    ) {
        self.awaiting_copies
            .extend(copies.iter().map(|c| c.transaction_id));
        let apply = LocalApply {
            cursor: seq,
            transaction,
            server_changes,
            copies,
            local_changes,
            acknowledged,
            outbox,
            heal: false,
        };
        self.actions.push_back(Action::Apply(Box::new(apply)));
    }
}

/// The local changes turning `old` into `new` over the candidate objects (copy targets are
/// left to their [`ContentCopy`]).
fn diff(
    old: impl Fn(ObjectId) -> Option<ObjectState>,
    new: &Tree,
    candidates: impl Iterator<Item = ObjectId>,
    skip: &HashSet<ObjectId>,
    tx: &Transaction,
    server_before: &HashMap<ObjectId, Option<ObjectState>>,
) -> Vec<LocalChange> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for id in candidates {
        if skip.contains(&id) || !seen.insert(id) {
            continue;
        }
        let before = old(id);
        match (before.as_ref(), new.get(id)) {
            (None, None) => {}
            (Some(_), None) => out.push(LocalChange::Remove(id)),
            (b, Some(n)) => {
                if b == Some(n) {
                    continue;
                }
                out.push(LocalChange::Put {
                    state: Box::new(n.clone()),
                    content: content_source(b, n, tx, server_before),
                });
            }
        }
    }
    out
}

/// How the local content of a changed object is produced: the remote ops when they chain from
/// the local content, else a fetch.
fn content_source(
    old: Option<&ObjectState>,
    new: &ObjectState,
    tx: &Transaction,
    server_before: &HashMap<ObjectId, Option<ObjectState>>,
) -> ContentSource {
    if !new.is_file() {
        return ContentSource::Unchanged;
    }
    let old_hash = old.filter(|o| o.is_file()).map(|o| o.hash);
    if old_hash == Some(new.hash) {
        return ContentSource::Unchanged;
    }
    if old.is_none() && new.hash == empty_hash() {
        return ContentSource::Ops(Vec::new());
    }
    // Walk the remote ops on this object from the server's content before them.
    let mut hash = server_before
        .get(&new.id)
        .and_then(|s| s.as_ref())
        .map(|s| s.hash);
    let mut start = hash;
    let mut ops = Vec::new();
    for op in tx.ops.iter().filter(|o| o.object == new.id) {
        match &op.kind {
            OpKind::Create { .. } => {
                hash = Some(empty_hash());
                start = hash;
                ops.clear();
            }
            OpKind::Delete => {
                hash = None;
                ops.clear();
            }
            OpKind::Write {
                base_hash,
                new_hash,
                ..
            } => {
                if hash != Some(*base_hash) {
                    hash = None;
                }
                hash = hash.map(|_| *new_hash);
                ops.push(op.kind.clone());
            }
            OpKind::Truncate { new_hash, .. } => {
                hash = hash.map(|_| *new_hash);
                ops.push(op.kind.clone());
            }
            _ => {}
        }
    }
    let local_start = old_hash.unwrap_or_else(empty_hash);
    if !ops.is_empty() && start == Some(local_start) && hash == Some(new.hash) {
        ContentSource::Ops(ops)
    } else {
        ContentSource::Fetch {
            version: new.content_version,
            hash: new.hash,
        }
    }
}
