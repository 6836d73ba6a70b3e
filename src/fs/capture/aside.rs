//! Changes set aside: a local change the sync engine refuses never wedges the others.
//!
//! When the engine refuses a sealed transaction (it would not apply to the tree the server
//! holds), nothing of that seal is committed; the object the refusal names is set aside and
//! the seal runs again without it, so every other change still syncs. A set-aside object
//! stays pending in the store (a restart retries it), is tried again after a back-off that
//! doubles from 1 s up to 5 minutes, is logged once when set aside (and again only at each
//! doubling), and is listed by `deltadrive status` until a seal takes it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Capture, Item, Sealer};
use crate::changelog::{ObjectId, OpKind, Transaction};

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
}

/// The set-aside objects of one capture.
#[derive(Default)]
pub(super) struct Aside {
    entries: HashMap<ObjectId, Entry>,
    /// Bumped at every change, so the report is rewritten only when it changed.
    generation: u64,
}

impl Aside {
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

    /// Objects that are gone for good (a remote change removed them): nothing to retry.
    pub fn forget_aside(&self, object: &ObjectId) {
        let mut a = self.aside.lock();
        if a.entries.remove(object).is_some() {
            a.generation += 1;
        }
    }
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
            let attempts = a.entries.get(&o).map_or(0, |e| e.note.attempts) + 1;
            let since_ms = a.entries.get(&o).map_or_else(now_ms, |e| e.note.since_ms);
            let wait = Duration::from_secs(1 << attempts.saturating_sub(1).min(9)).min(MAX_BACKOFF);
            if attempts.is_power_of_two() {
                tracing::warn!(
                    "a change to {path} cannot sync and is set aside (try {attempts}, next in \
                     {} s); everything else goes on syncing: {}",
                    wait.as_secs(),
                    refused.message
                );
            } else {
                tracing::debug!("{path} is still set aside: {}", refused.message);
            }
            a.entries.insert(
                o,
                Entry {
                    note: AsideNote {
                        path,
                        reason: refused.message.clone(),
                        attempts,
                        since_ms,
                    },
                    retry_at: Instant::now() + wait,
                },
            );
        }
        a.generation += 1;
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
