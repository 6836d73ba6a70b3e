//! Changes set aside: a local change the sync engine refuses never wedges the others.
//!
//! When the engine refuses a sealed transaction (it would not apply to the tree the server
//! holds), nothing of that seal is committed; the object the refusal names is set aside and
//! the seal runs again without it, so every other change still syncs. A set-aside object
//! stays pending in the store (a restart retries it), is tried again after a back-off that
//! doubles from 1 s up to 5 minutes, is logged once when set aside (and again only at each
//! doubling), and is listed by `deltadrive status` until a seal takes it.
//!
//! A transaction the SERVER refuses for good (`crate::engine::SetAside`: over its limits, a
//! change it will never take as it is) ends the same way: it leaves the outbox, its objects
//! become pending again against the state the server holds (so their next seal carries base
//! versions the server accepts, content whole), and they wait with the same back-off. Such
//! an entry stays listed after a seal took it again, until the server has it (or nothing of
//! it is left to send), so its back-off keeps growing while the server keeps refusing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Capture, Item, Sealer};
use crate::changelog::payload::PayloadIndex;
use crate::changelog::{ObjectId, OpKind, Transaction};
use crate::store::{PendingFlags, Store, StoreError};

/// Longest wait between two tries of a set-aside change.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Why the sync engine refused a local transaction.
#[derive(Clone, Debug)]
pub struct Refused {
    /// The object the refusal is about, when it names one.
    pub object: Option<ObjectId>,
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// What `status` shows of one set-aside change.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AsideNote {
    /// The object's path in the synced folder (as it was when set aside).
    pub path: String,
    /// Why it cannot sync.
    pub reason: String,
    /// How many times it was tried.
    pub attempts: u32,
    /// When it was first set aside, ms since the Unix epoch.
    pub since_ms: i64,
}

struct Entry {
    note: AsideNote,
    retry_at: Instant,
    /// The server refused it (not the engine): settled when the server has it.
    server: bool,
}

/// The set-aside objects of one capture.
#[derive(Default)]
pub(super) struct Aside {
    entries: HashMap<ObjectId, Entry>,
    /// Bumped at every change, so the report is rewritten only when it changed.
    generation: u64,
}

impl Aside {
    /// Sets `object` aside (again): one more try counted, the back-off doubled, logged when
    /// the count is a power of two.
    fn put(&mut self, object: ObjectId, path: String, reason: &str, server: bool) {
        let attempts = self.entries.get(&object).map_or(0, |e| e.note.attempts) + 1;
        let since_ms = self
            .entries
            .get(&object)
            .map_or_else(now_ms, |e| e.note.since_ms);
        let wait = Duration::from_secs(1 << attempts.saturating_sub(1).min(9)).min(MAX_BACKOFF);
        let who = if server { "the server" } else { "sync" };
        if attempts.is_power_of_two() {
            tracing::warn!(
                "a change to {path} cannot sync and is set aside (try {attempts}, next in {} s); \
                 everything else goes on syncing; {who} refused it: {reason}",
                wait.as_secs(),
            );
        } else {
            tracing::debug!("{path} is still set aside: {reason}");
        }
        let server = server || self.entries.get(&object).is_some_and(|e| e.server);
        self.entries.insert(
            object,
            Entry {
                note: AsideNote {
                    path,
                    reason: reason.to_string(),
                    attempts,
                    since_ms,
                },
                retry_at: Instant::now() + wait,
                server,
            },
        );
        self.generation += 1;
    }

    /// Whether `object` is set aside and its next try has not come yet.
    pub(super) fn waiting(&self, object: &ObjectId) -> bool {
        self.entries
            .get(object)
            .is_some_and(|e| e.retry_at > Instant::now())
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Capture {
    /// The set-aside changes, for `status`, and a number that changes whenever they do.
    pub fn aside_notes(&self) -> (u64, Vec<AsideNote>) {
        let a = self.aside.lock();
        let mut notes: Vec<AsideNote> = a.entries.values().map(|e| e.note.clone()).collect();
        notes.sort_by(|x, y| x.path.cmp(&y.path));
        (a.generation, notes)
    }

    /// Objects a seal took: they are no longer aside.
    pub(super) fn settle_aside(&self, sealed: &[ObjectId]) {
        let mut a = self.aside.lock();
        if a.entries.is_empty() {
            return;
        }
        let mut changed = false;
        for o in sealed {
            if a.entries.get(o).is_some_and(|e| e.server) {
                continue;
            }
            if let Some(e) = a.entries.remove(o) {
                tracing::info!(
                    "the change to {} that was set aside is synced now",
                    e.note.path
                );
                changed = true;
            }
        }
        if changed {
            a.generation += 1;
        }
    }

    /// The server refused a transaction for good and the engine took it out of its outbox
    /// (`aside`): persists that in one batch (the outbox becomes the engine's, every object
    /// whose change left it is pending again against the state the engine's local tree
    /// gives it, its content to be sent whole) and sets aside the object the server's
    /// reason names, or every object of the refused transaction. Call it under the metadata
    /// lock, with the engine's lock held since it returned `aside`.
    ///
    /// # Errors
    /// The store could not be read or written; nothing changed then.
    pub fn set_aside_refused(
        &self,
        store: &Store,
        aside: &crate::engine::SetAside,
    ) -> Result<(), StoreError> {
        let mut seqs = Vec::new();
        let mut full = Vec::new();
        let mut bad = None;
        store.for_each_outbox(|seq, enc| {
            seqs.push(seq);
            match crate::changelog::decode_transaction(enc) {
                Ok(t) => full.push(t),
                Err(e) => bad = Some(e.to_string()),
            }
            bad.is_none()
        })?;
        if let Some(e) = bad {
            return Err(StoreError::Corrupt(format!("outbox entry unreadable: {e}")));
        }
        let mut b = store.batch();
        for s in &seqs {
            b.remove_outbox(*s);
        }
        // The engine's outbox has no delta bytes: the entries it keeps have them.
        let index = PayloadIndex::new(full);
        for t in &aside.outbox {
            let filled = index.fill(t).ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "the bytes of transaction {} are not in the outbox",
                    hex::encode(t.id)
                ))
            })?;
            b.push_outbox(&filled)?;
        }
        let flags = PendingFlags { rewritten: true };
        for (object, state) in &aside.objects {
            match state {
                Some(s) => {
                    let old = store.object_state(object)?;
                    b.put_object_state(object, &crate::fs::apply::prev_state(s, old.as_ref()));
                }
                None => b.delete_object_state(object),
            }
            // Deltas were made against content the server never took: send it whole.
            b.delete_signature(object);
            b.delete_leaves(object);
            b.set_pending(object, flags);
        }
        store.commit(b, true)?;
        let now = Instant::now();
        {
            let mut p = self.pending.lock();
            let mut c = self.changed.lock();
            for (object, _) in &aside.objects {
                p.insert(*object, flags);
                c.entry(*object).or_insert((now, now));
            }
        }
        {
            let mut act = self.activity.lock();
            act.oldest_unsealed.get_or_insert(now);
        }
        let in_refused = |o: &ObjectId| aside.transaction.ops.iter().any(|op| op.object == *o);
        let culprits: Vec<ObjectId> = match named_object(&aside.reason).filter(in_refused) {
            Some(o) => vec![o],
            None => {
                let mut v: Vec<ObjectId> = Vec::new();
                for op in &aside.transaction.ops {
                    if !v.contains(&op.object) {
                        v.push(op.object);
                    }
                }
                v
            }
        };
        let sealer = Sealer {
            store,
            capture: self,
        };
        let items = sealer.load(None)?;
        let mut a = self.aside.lock();
        for o in culprits {
            let path = sealer.path_of_item(items.iter().find(|i| i.object == o));
            a.put(o, path, &aside.reason, true);
        }
        Ok(())
    }

    /// Whether a change the server refused is set aside.
    pub fn has_refused(&self) -> bool {
        self.aside.lock().entries.values().any(|e| e.server)
    }

    /// Settles the entries the server refused whose change is no longer waiting anywhere:
    /// not pending, and not in the outbox (`in_outbox`): the server has it, or a remote
    /// change made it moot.
    pub fn settle_refused(&self, in_outbox: impl Fn(&ObjectId) -> bool) {
        let mut a = self.aside.lock();
        if !a.entries.values().any(|e| e.server) {
            return;
        }
        let pending = self.pending.lock();
        let done: Vec<ObjectId> = a
            .entries
            .iter()
            .filter(|(o, e)| e.server && !pending.contains_key(*o) && !in_outbox(o))
            .map(|(o, _)| *o)
            .collect();
        drop(pending);
        for o in done {
            if let Some(e) = a.entries.remove(&o) {
                tracing::info!(
                    "the change to {} that the server refused is synced now",
                    e.note.path
                );
                a.generation += 1;
            }
        }
    }

    /// Objects that are gone for good (a remote change removed them): nothing to retry.
    pub fn forget_aside(&self, object: &ObjectId) {
        let mut a = self.aside.lock();
        if a.entries.remove(object).is_some() {
            a.generation += 1;
        }
    }
}

/// The object a server's refusal names ("transaction 0, object <hex>: ...").
fn named_object(reason: &str) -> Option<ObjectId> {
    let at = reason.find("object ")? + "object ".len();
    let hex: String = reason[at..]
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect();
    ObjectId::from_hex(&hex)
}

impl Sealer<'_> {
    /// After the engine refused a seal's transactions: sets aside the object the refusal
    /// names, or the items that name it as their folder, or, when it names none of them,
    /// every item of the seal.
    pub(super) fn set_aside(&self, items: &[Item], txs: &[Transaction], refused: Refused) {
        let in_seal = |o: &ObjectId| items.iter().any(|i| i.object == *o);
        let mut culprits: Vec<ObjectId> = Vec::new();
        if let Some(o) = refused.object {
            if in_seal(&o) {
                culprits.push(o);
            } else {
                for op in txs.iter().flat_map(|t| &t.ops) {
                    let names_it = match &op.kind {
                        OpKind::Create { parent, .. } | OpKind::Link { parent, .. } => *parent == o,
                        OpKind::Rename { new_parent, .. } => *new_parent == o,
                        _ => false,
                    };
                    if names_it && in_seal(&op.object) && !culprits.contains(&op.object) {
                        culprits.push(op.object);
                    }
                }
            }
        }
        if culprits.is_empty() {
            culprits = items.iter().map(|i| i.object).collect();
        }
        let mut a = self.capture.aside.lock();
        for o in culprits {
            let path = self.path_of_item(items.iter().find(|i| i.object == o));
            a.put(o, path, &refused.message, false);
        }
    }

    /// The path of an item in the synced folder: where it is, or where it was announced.
    fn path_of_item(&self, it: Option<&Item>) -> String {
        let Some(it) = it else {
            return "(unknown)".into();
        };
        let (mut parts, mut dir) = match (&it.inode, &it.state) {
            (Some(i), _) => (vec![i.name.clone()], i.parent),
            (None, Some(st)) => {
                let dir = if st.parent == ObjectId::ROOT {
                    crate::store::ROOT_INO
                } else {
                    match self.store.ino_of_object(&st.parent) {
                        Ok(Some(d)) => d,
                        _ => return format!("/{}", String::from_utf8_lossy(&st.name)),
                    }
                };
                (vec![st.name.clone()], dir)
            }
            (None, None) => return "(unknown)".into(),
        };
        for _ in 0..4096 {
            if dir == crate::store::ROOT_INO {
                break;
            }
            match self.store.get_inode(dir) {
                Ok(Some(d)) => {
                    parts.push(d.name.clone());
                    dir = d.parent;
                }
                _ => break,
            }
        }
        parts.reverse();
        let mut path = String::new();
        for p in parts {
            path.push('/');
            path.push_str(&String::from_utf8_lossy(&p));
        }
        path
    }
}
