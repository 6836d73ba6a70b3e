//! Rebasing the pending local transactions onto a new server state: the conflict rules of
//! `SEMANTICS.md`, as one pure function.
//!
//! Inputs: the server-known tree after a remote transaction (`new_base`, S'), the state each
//! object had when the pending ops were made (`prior`, P), the pending transactions (O, built
//! on P) and the local tree before (L = P + O). Output: pending transactions O' that the server
//! would accept on S' in order, the local tree L' = S' + O', and the content copies the I/O side
//! must make (conflicted copies, and files deleted remotely that come back with a local edit).
//!
//! What always holds: every transaction of O' applies with the server's checks on S' after the
//! ones before it (ops that would not are dropped, never sent to be refused); every pending
//! content change is either kept in O' or carried by a [`ContentCopy`]; objects and
//! transactions are named by the engine's seeded generator only.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::changelog::{
    empty_hash, ContentHash, Name, ObjectId, ObjectKind, Op, OpKind, Transaction,
};

use super::names::{conflicted_copy_name, SeededRng};
use super::tree::{is_content_op, ObjectState, Tree};
use super::ContentCopy;

/// The state each object had when the pending ops were made: `overrides` where it differs
/// from `fallback` (the new server-known tree).
pub(crate) struct Prior<'a> {
    pub overrides: &'a HashMap<ObjectId, Option<ObjectState>>,
    pub fallback: &'a Tree,
}

impl Prior<'_> {
    fn get(&self, id: ObjectId) -> Option<&ObjectState> {
        match self.overrides.get(&id) {
            Some(s) => s.as_ref(),
            None => self.fallback.get(id),
        }
    }
}

/// The result of a rebase.
pub(crate) struct Rebased {
    pub outbox: Vec<Transaction>,
    pub local: Tree,
    pub copies: Vec<ContentCopy>,
    /// Ids of pending transactions dropped whole (every op was resolved away).
    pub dropped: Vec<[u8; 16]>,
    /// Objects whose local state may have changed beyond the pending ops' own objects.
    pub also_touched: Vec<ObjectId>,
}

pub(crate) struct RebaseInput<'a> {
    pub new_base: &'a Tree,
    pub prior: Prior<'a>,
    pub pending: &'a [Transaction],
    pub local: &'a Tree,
    pub device: &'a str,
    pub now_ms: i64,
}

/// Rebases `input.pending` onto `input.new_base` (see the module documentation).
pub(crate) fn rebase(input: RebaseInput<'_>, rng: &mut SeededRng) -> Rebased {
    let s1 = input.new_base;
    let prior = &input.prior;
    let local = input.local;

    // Pass 1: what the pending ops touch.
    let mut content_pending: BTreeSet<ObjectId> = BTreeSet::new();
    let mut wanted_parents: BTreeSet<ObjectId> = BTreeSet::new();
    for tx in input.pending {
        for op in &tx.ops {
            if is_content_op(&op.kind) {
                content_pending.insert(op.object);
            }
            match &op.kind {
                OpKind::Create { parent, .. } => {
                    wanted_parents.insert(*parent);
                }
                OpKind::Rename { new_parent, .. } => {
                    wanted_parents.insert(*new_parent);
                }
                OpKind::Link { parent, .. } => {
                    wanted_parents.insert(*parent);
                }
                _ => {}
            }
        }
    }
    // Edit/edit: the remote changed the content under a pending local edit.
    let content_conflict: BTreeSet<ObjectId> = content_pending
        .iter()
        .copied()
        .filter(|x| match (prior.get(*x), s1.get(*x)) {
            (Some(p), Some(now)) => now.is_file() && p.is_file() && now.hash != p.hash,
            _ => false,
        })
        .collect();
    // Delete/edit: the remote deleted a file the device edited; it comes back.
    let resurrect_files: BTreeSet<ObjectId> = content_pending
        .iter()
        .copied()
        .filter(|x| {
            prior.get(*x).is_some()
                && !s1.contains(*x)
                && local.get(*x).map(|l| l.is_file()).unwrap_or(false)
        })
        .collect();
    // Delete folder / create inside: the folders the surviving local work needs come back.
    let gone = |d: ObjectId| d != ObjectId::ROOT && !s1.contains(d) && prior.get(d).is_some();
    let mut need_dirs: BTreeSet<ObjectId> = wanted_parents
        .iter()
        .copied()
        .filter(|d| gone(*d))
        .collect();
    for x in &resurrect_files {
        let mut at = local.get(*x).map(|o| o.parent);
        let mut steps = 0;
        while let Some(a) = at {
            if a == ObjectId::ROOT || steps > local.len() {
                break;
            }
            if gone(a) {
                need_dirs.insert(a);
            }
            at = local.get(a).map(|o| o.parent);
            steps += 1;
        }
    }
    let mut queue: Vec<ObjectId> = need_dirs.iter().copied().collect();
    while let Some(d) = queue.pop() {
        if let Some(p) = prior.get(d) {
            if gone(p.parent) && need_dirs.insert(p.parent) {
                queue.push(p.parent);
            }
        }
    }
    need_dirs.retain(|d| prior.get(*d).map(|p| p.is_dir()).unwrap_or(false));

    let mut w = s1.clone();
    let mut outbox = Vec::new();
    let mut dropped = Vec::new();
    let mut also_touched: Vec<ObjectId> = Vec::new();
    let copy_name =
        |w: &Tree, parent: ObjectId, name: &Name, reserved: &HashSet<(ObjectId, Name)>| {
            let mut attempt = 1;
            loop {
                let n = conflicted_copy_name(name, input.device, input.now_ms, attempt);
                if w.lookup(parent, &n).is_none() && !reserved.contains(&(parent, n.clone())) {
                    return n;
                }
                attempt += 1;
            }
        };
    let no_reserved: HashSet<(ObjectId, Name)> = HashSet::new();

    // Folders that come back go first, parents before children, at their last server place.
    if !need_dirs.is_empty() {
        let depth = |d: ObjectId| {
            let mut n = 0usize;
            let mut at = d;
            while let Some(p) = prior.get(at) {
                if !need_dirs.contains(&p.parent) || n > need_dirs.len() {
                    break;
                }
                at = p.parent;
                n += 1;
            }
            n
        };
        let mut order: Vec<ObjectId> = need_dirs.iter().copied().collect();
        order.sort_by_key(|d| (depth(*d), *d));
        let mut ops = Vec::new();
        for d in order {
            let Some(p) = prior.get(d).cloned() else {
                continue;
            };
            let parent = if w.get(p.parent).map(|o| o.is_dir()).unwrap_or(false) {
                p.parent
            } else {
                ObjectId::ROOT
            };
            let name = if w.lookup(parent, &p.name).is_some() {
                copy_name(&w, parent, &p.name, &no_reserved)
            } else {
                p.name.clone()
            };
            let mut dir_ops = vec![Op {
                object: d,
                base_version: 0,
                new_version: 1,
                kind: OpKind::Create {
                    parent,
                    name,
                    kind: ObjectKind::Directory,
                    mode: p.mode,
                    mtime_ns: p.mtime_ns,
                },
            }];
            for (k, v) in &p.xattrs {
                let base = dir_ops.len() as u64;
                dir_ops.push(Op {
                    object: d,
                    base_version: base,
                    new_version: base + 1,
                    kind: OpKind::SetXattr {
                        name: k.clone(),
                        value: v.clone(),
                    },
                });
            }
            if w.apply_transaction(&dir_ops).is_ok() {
                also_touched.push(d);
                ops.extend(dir_ops);
            }
        }
        if !ops.is_empty() {
            outbox.push(Transaction {
                id: rng.id_bytes(),
                device: input.device.to_string(),
                time_ms: input.now_ms,
                ops,
            });
        }
    }

    // Pass 2: replay every pending op on the new state, resolving each conflict.
    let mut merged: HashMap<ObjectId, ObjectId> = HashMap::new();
    let mut merged_files: HashSet<ObjectId> = HashSet::new();
    let mut late_conflicts: BTreeSet<ObjectId> = BTreeSet::new();
    let mut chain: HashMap<ObjectId, ContentHash> = HashMap::new();
    let map = |merged: &HashMap<ObjectId, ObjectId>, id: ObjectId| *merged.get(&id).unwrap_or(&id);
    for tx in input.pending {
        let mut ops = Vec::new();
        for op in &tx.ops {
            let original = op.object;
            if resurrect_files.contains(&original) {
                continue;
            }
            // The content this op was made against, in the original order of the pending ops.
            let made_on = *chain.entry(original).or_insert_with(|| {
                prior
                    .get(original)
                    .map(|p| p.hash)
                    .unwrap_or_else(empty_hash)
            });
            match &op.kind {
                OpKind::Create { .. } => {
                    chain.insert(original, empty_hash());
                }
                OpKind::Write { new_hash, .. } | OpKind::Truncate { new_hash, .. } => {
                    chain.insert(original, *new_hash);
                }
                _ => {}
            }
            if is_content_op(&op.kind)
                && (content_conflict.contains(&original)
                    || merged_files.contains(&original)
                    || late_conflicts.contains(&original))
            {
                continue;
            }
            if matches!(op.kind, OpKind::Truncate { .. })
                && w.get(original).map(|o| o.hash) != Some(made_on)
            {
                // A truncate carries no base hash: it only replays on the content it cut.
                late_conflicts.insert(original);
                continue;
            }
            let object = map(&merged, original);
            let p = prior.get(object);
            let now = s1.get(object);
            let kinds: Vec<OpKind> = match &op.kind {
                OpKind::Create {
                    parent,
                    name,
                    kind,
                    mode,
                    mtime_ns,
                } => {
                    let parent = map(&merged, *parent);
                    let parent = if w.get(parent).map(|o| o.is_dir()).unwrap_or(false) {
                        parent
                    } else {
                        ObjectId::ROOT
                    };
                    let mut name = name.clone();
                    if let Some(other) = w.lookup(parent, &name) {
                        let other_state = w.get(other);
                        let remote_made = s1.contains(other);
                        match (kind, other_state) {
                            // mkdir/mkdir: one folder holding both children.
                            (ObjectKind::Directory, Some(o)) if o.is_dir() && remote_made => {
                                merged.insert(original, other);
                                also_touched.push(other);
                                continue;
                            }
                            // create/create with equal contents: one file.
                            (ObjectKind::File, Some(o))
                                if o.is_file()
                                    && remote_made
                                    && local
                                        .get(original)
                                        .map(|l| l.is_file() && l.hash == o.hash)
                                        .unwrap_or(false) =>
                            {
                                merged.insert(original, other);
                                merged_files.insert(original);
                                also_touched.push(other);
                                continue;
                            }
                            _ => name = copy_name(&w, parent, &name, &no_reserved),
                        }
                    }
                    vec![OpKind::Create {
                        parent,
                        name,
                        kind: kind.clone(),
                        mode: *mode,
                        mtime_ns: *mtime_ns,
                    }]
                }
                OpKind::Rename {
                    new_parent,
                    new_name,
                } => {
                    if let (Some(p), Some(n)) = (p, now) {
                        // rename/rename: the first (remote) wins. The name this device moved
                        // is gone from the server's object: the remote moved or removed it.
                        if !n.has_name(p.parent, &p.name) {
                            continue;
                        }
                    }
                    let Some(cur) = w.get(object) else { continue };
                    let new_parent = map(&merged, *new_parent);
                    if !w.get(new_parent).map(|o| o.is_dir()).unwrap_or(false) {
                        continue;
                    }
                    // Move A into B vs B into A: the second move is dropped.
                    if w.is_within(new_parent, object) {
                        continue;
                    }
                    let mut new_name = new_name.clone();
                    let same = cur.parent == new_parent && cur.name == new_name;
                    if !same {
                        if let Some(other) = w.lookup(new_parent, &new_name) {
                            if other != object {
                                new_name = copy_name(&w, new_parent, &new_name, &no_reserved);
                            }
                        }
                    }
                    if cur.name_count() > 1 {
                        // The remote gave the file more names meanwhile: this device's move
                        // is of the one name it knew, as link and unlink.
                        let (old_parent, old_name) = match p {
                            Some(p) => (p.parent, p.name.clone()),
                            None => (cur.parent, cur.name.clone()),
                        };
                        if cur.has_name(new_parent, &new_name) {
                            continue;
                        }
                        let mut kinds = vec![OpKind::Link {
                            parent: new_parent,
                            name: new_name,
                        }];
                        if cur.has_name(old_parent, &old_name) {
                            kinds.push(OpKind::Unlink {
                                parent: old_parent,
                                name: old_name,
                            });
                        }
                        kinds
                    } else {
                        vec![OpKind::Rename {
                            new_parent,
                            new_name,
                        }]
                    }
                }
                OpKind::Link { parent, name } => {
                    let Some(cur) = w.get(object) else { continue };
                    if cur.is_dir() {
                        continue;
                    }
                    let parent = map(&merged, *parent);
                    let parent = if w.get(parent).map(|o| o.is_dir()).unwrap_or(false) {
                        parent
                    } else {
                        ObjectId::ROOT
                    };
                    let mut name = name.clone();
                    match w.lookup(parent, &name) {
                        Some(other) if other == object => continue,
                        // Two devices gave the same name to different files: the first
                        // keeps it, the second gets a conflicted-copy name.
                        Some(_) => name = copy_name(&w, parent, &name, &no_reserved),
                        None => {}
                    }
                    vec![OpKind::Link { parent, name }]
                }
                OpKind::Unlink { parent, name } => {
                    let Some(cur) = w.get(object) else { continue };
                    let parent = map(&merged, *parent);
                    if !cur.has_name(parent, name) {
                        continue;
                    }
                    if cur.name_count() < 2 {
                        // The remote took the file's other names away meanwhile: this one is
                        // its last. An unlink never deletes: the file stays under it, so no
                        // version anyone saved can go with it.
                        continue;
                    }
                    vec![OpKind::Unlink {
                        parent,
                        name: name.clone(),
                    }]
                }
                OpKind::Delete => {
                    let Some(cur) = w.get(object) else { continue };
                    // Edit beats delete: the remote changed the content the delete saw (or
                    // made the object anew, as when two devices resurrect the same file).
                    if let Some(n) = now {
                        if n.is_file() && p.map(|p| p.hash != n.hash).unwrap_or(true) {
                            continue;
                        }
                    }
                    if cur.is_dir() && w.child_count(object) > 0 {
                        continue;
                    }
                    // A delete takes every name, also names the remote added meanwhile: the
                    // file is gone here, with its content (an edit still beats it, above).
                    vec![OpKind::Delete]
                }
                OpKind::SetAttr { mode, mtime_ns } => {
                    let (mut mode, mut mtime_ns) = (*mode, *mtime_ns);
                    if let (Some(p), Some(n)) = (p, now) {
                        // chmod/chmod: the first wins per attribute.
                        if p.mode != n.mode {
                            mode = None;
                        }
                        if p.mtime_ns != n.mtime_ns {
                            mtime_ns = None;
                        }
                    }
                    if mode.is_none() && mtime_ns.is_none() {
                        continue;
                    }
                    vec![OpKind::SetAttr { mode, mtime_ns }]
                }
                OpKind::SetXattr { name, .. } | OpKind::RemoveXattr { name } => {
                    if let (Some(p), Some(n)) = (p, now) {
                        if p.xattrs.get(name) != n.xattrs.get(name) {
                            continue;
                        }
                    }
                    vec![op.kind.clone()]
                }
                OpKind::Write { .. } | OpKind::Truncate { .. } => vec![op.kind.clone()],
            };
            for kind in kinds {
                let base = w.version(object);
                let new_op = Op {
                    object,
                    base_version: base,
                    new_version: base + 1,
                    kind,
                };
                match w.apply_op(&new_op) {
                    Ok(()) => ops.push(new_op),
                    Err(_) => {
                        if is_content_op(&new_op.kind) {
                            late_conflicts.insert(original);
                        }
                    }
                }
            }
        }
        if ops.is_empty() {
            dropped.push(tx.id);
        } else {
            outbox.push(Transaction {
                id: tx.id,
                device: tx.device.clone(),
                time_ms: tx.time_ms,
                ops,
            });
        }
    }
    also_touched.extend(merged.keys().copied());

    // Content copies: conflicted copies of local edits, and edited files that come back.
    let mut copies = Vec::new();
    let mut reserved: HashSet<(ObjectId, Name)> = HashSet::new();
    let conflicts: BTreeSet<ObjectId> = content_conflict.union(&late_conflicts).copied().collect();
    for x in conflicts {
        let Some(mine) = local.get(x) else { continue };
        let Some(theirs) = w.get(x) else { continue };
        if mine.hash == theirs.hash || !mine.is_file() {
            continue;
        }
        let parent = theirs.parent;
        let name = copy_name(&w, parent, &theirs.name, &reserved);
        reserved.insert((parent, name.clone()));
        copies.push(copy_of(mine, rng.id_bytes(), parent, name, rng.id_bytes()));
    }
    for x in &resurrect_files {
        let Some(mine) = local.get(*x) else { continue };
        let parent = if w.get(mine.parent).map(|o| o.is_dir()).unwrap_or(false) {
            mine.parent
        } else {
            ObjectId::ROOT
        };
        let name = if w.lookup(parent, &mine.name).is_some()
            || reserved.contains(&(parent, mine.name.clone()))
        {
            copy_name(&w, parent, &mine.name, &reserved)
        } else {
            mine.name.clone()
        };
        reserved.insert((parent, name.clone()));
        copies.push(copy_of(mine, x.0, parent, name, rng.id_bytes()));
    }

    Rebased {
        outbox,
        local: w,
        copies,
        dropped,
        also_touched,
    }
}

fn copy_of(
    mine: &ObjectState,
    target_id: [u8; 16],
    parent: ObjectId,
    name: Name,
    transaction_id: [u8; 16],
) -> ContentCopy {
    ContentCopy {
        source: mine.id,
        source_hash: mine.hash,
        source_size: mine.size,
        target: ObjectState {
            id: ObjectId(target_id),
            parent,
            name,
            links: Vec::new(),
            kind: ObjectKind::File,
            mode: mine.mode,
            mtime_ns: mine.mtime_ns,
            hash: mine.hash,
            size: mine.size,
            xattrs: mine.xattrs.clone(),
            version: 0,
            content_version: 0,
        },
        transaction_id,
    }
}
