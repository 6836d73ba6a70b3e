//! Deterministic simulation of several devices running the sync engine against an in-memory
//! server that follows the tree rules of `deltadrive::rules` (as `src/server/storage.rs` does),
//! plus one scripted test per row of `SEMANTICS.md`.
//!
//! What it checks (the oracle of `SEMANTICS.md`): at quiescence every device holds the same
//! tree as the server, and every version a device saved is present on every device (as the
//! file or as a copy; contents are unique per save, so presence is by content hash), or was
//! deleted by an op of a device that had seen it, or had a later version saved over it by a
//! device that had seen it (the same device's next save, or an edit on top of it, of the file
//! or of its conflicted copy). After every batch of actions it also checks that the durable
//! state the I/O side persisted from the actions alone equals the engine's, and that the store
//! equals the engine's local tree.
//!
//! Replay a seed: `DELTADRIVE_SIM_SEED=N cargo test --test simulation`; run more seeds:
//! `DELTADRIVE_SIM_SEEDS=N`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use deltadrive::changelog::{
    empty_hash, ContentHash, Delta, Name, ObjectId, ObjectKind, Op, OpKind, Transaction,
};
use deltadrive::engine::{
    Action, ContentSource, Engine, EngineConfig, LocalChange, ObjectState, PersistedState,
    RequestId, ServerChange,
};
use deltadrive::rules::{self, ContentChange, Effect, Facts, TreeView};

// ---------------------------------------------------------------- randomness

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn id(&mut self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.next().to_le_bytes());
        b[8..].copy_from_slice(&self.next().to_le_bytes());
        b
    }
}

fn hash(content: &[u8]) -> ContentHash {
    *blake3::hash(content).as_bytes()
}

fn name(s: &str) -> Name {
    Name::new(s.as_bytes().to_vec()).expect("test names are valid")
}

// ---------------------------------------------------------------- the server model

/// One object on the simulated server (or in a device's local store): metadata and content.
#[derive(Clone, Debug, PartialEq)]
struct Obj {
    parent: ObjectId,
    name: Name,
    /// Other names (hard links), sorted; (parent, name) is the least name.
    links: Vec<(ObjectId, Name)>,
    kind: ObjectKind,
    mode: u32,
    mtime_ns: i64,
    content: Vec<u8>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    version: u64,
}

fn root_obj() -> Obj {
    obj_of(&ObjectState::root(), Vec::new())
}

type Objects = BTreeMap<ObjectId, Obj>;

fn names(o: &Obj) -> Vec<(ObjectId, Name)> {
    let mut v = vec![(o.parent, o.name.clone())];
    v.extend(o.links.iter().cloned());
    v
}

fn has_name(o: &Obj, parent: ObjectId, n: &Name) -> bool {
    (o.parent == parent && o.name == *n) || o.links.iter().any(|(p, m)| *p == parent && m == n)
}

/// Sets an object's names, the least first (as the engine and the server keep them).
fn set_names(o: &mut Obj, mut v: Vec<(ObjectId, Name)>) {
    v.sort();
    v.dedup();
    let (p, n) = v.remove(0);
    o.parent = p;
    o.name = n;
    o.links = v;
}

fn name_taken(objs: &Objects, parent: ObjectId, n: &Name) -> bool {
    objs.iter()
        .any(|(id, o)| *id != ObjectId::ROOT && has_name(o, parent, n))
}

fn within(objs: &Objects, mut at: ObjectId, ancestor: ObjectId) -> bool {
    for _ in 0..=objs.len() {
        if at == ancestor {
            return true;
        }
        if at == ObjectId::ROOT {
            return false;
        }
        match objs.get(&at) {
            Some(o) => at = o.parent,
            None => return false,
        }
    }
    true
}

/// The simulated objects as the tree rules read them.
struct View<'a>(&'a Objects);

impl TreeView for View<'_> {
    fn object(&self, id: ObjectId) -> Option<Facts> {
        self.0.get(&id).map(|o| Facts {
            kind: (&o.kind).into(),
            version: o.version,
            parent: o.parent,
            names: 1 + o.links.len(),
        })
    }

    fn child(&self, parent: ObjectId, n: &Name) -> Option<ObjectId> {
        self.0
            .iter()
            .find(|(id, o)| **id != ObjectId::ROOT && has_name(o, parent, n))
            .map(|(id, _)| *id)
    }

    fn has_children(&self, dir: ObjectId) -> bool {
        self.0
            .iter()
            .any(|(id, o)| *id != ObjectId::ROOT && names(o).iter().any(|(p, _)| *p == dir))
    }

    fn names(&self, id: ObjectId) -> Vec<(ObjectId, Name)> {
        self.0.get(&id).map(names).unwrap_or_default()
    }

    fn content_hash(&self, id: ObjectId) -> Option<ContentHash> {
        self.0.get(&id).map(|o| hash(&o.content))
    }
}

/// Largest content the simulation builds.
const MAX_CONTENT: usize = 1 << 20;

/// Applies one op as the server does: checked by the tree rules, then their effect on the
/// simulated objects. Unchanged on error.
fn server_apply(objs: &mut Objects, op: &Op) -> Result<(), String> {
    let id = op.object;
    let v = op.new_version;
    match rules::check_all(op, &View(objs)).map_err(|e| e.to_string())? {
        Effect::Create(new) => {
            objs.insert(id, obj_of(&ObjectState::created(id, &new, v), Vec::new()));
        }
        Effect::Delete => {
            objs.remove(&id);
        }
        effect => {
            let o = objs
                .get_mut(&id)
                .ok_or("the rules found an object that is not here")?;
            match effect {
                Effect::Content(c) => {
                    o.content = c
                        .apply_to(id, o.content.clone(), MAX_CONTENT)
                        .map_err(|e| e.to_string())?;
                }
                Effect::Names(change) => set_names(o, change.after),
                Effect::Attr(a) => a.apply(&mut o.mode, &mut o.mtime_ns),
                Effect::Xattr(x) => x.apply(&mut o.xattrs),
                Effect::Create(_) | Effect::Delete => {}
            }
            o.version = v;
        }
    }
    Ok(())
}

struct Server {
    objects: Objects,
    log: Vec<Transaction>,
    keys: HashMap<String, (Vec<Transaction>, u64, u64)>,
    /// Every content ever stored, by hash (history, for fetches).
    blobs: HashMap<ContentHash, Vec<u8>>,
}

enum AppendOutcome {
    Stored(u64, u64),
    Conflict(String),
}

impl Server {
    fn new() -> Server {
        let mut objects = BTreeMap::new();
        objects.insert(ObjectId::ROOT, root_obj());
        let mut blobs = HashMap::new();
        blobs.insert(empty_hash(), Vec::new());
        Server {
            objects,
            log: Vec::new(),
            keys: HashMap::new(),
            blobs,
        }
    }

    fn head(&self) -> u64 {
        self.log.len() as u64
    }

    fn append(&mut self, key: &str, txs: &[Transaction]) -> AppendOutcome {
        if let Some((body, f, l)) = self.keys.get(key) {
            if body.as_slice() == txs {
                return AppendOutcome::Stored(*f, *l);
            }
            return AppendOutcome::Conflict("idempotency key reused with another body".into());
        }
        let mut objs = self.objects.clone();
        let mut blobs = Vec::new();
        for tx in txs {
            for op in &tx.ops {
                if let Err(e) = server_apply(&mut objs, op) {
                    return AppendOutcome::Conflict(e);
                }
                if let Some(o) = objs.get(&op.object) {
                    blobs.push(o.content.clone());
                }
            }
        }
        for b in blobs {
            self.blobs.insert(hash(&b), b);
        }
        self.objects = objs;
        let first = self.head() + 1;
        self.log.extend(txs.iter().cloned());
        let last = self.head();
        self.keys
            .insert(key.to_string(), (txs.to_vec(), first, last));
        AppendOutcome::Stored(first, last)
    }

    fn entries_after(&self, after: u64, limit: usize) -> Vec<(u64, Transaction)> {
        self.log
            .iter()
            .enumerate()
            .skip(after as usize)
            .take(limit)
            .map(|(i, t)| (i as u64 + 1, t.clone()))
            .collect()
    }
}

// ---------------------------------------------------------------- a device

/// A version of a file's content saved by a device (the oracle's unit).
#[derive(Clone, Debug)]
struct Saved {
    device: usize,
    object: ObjectId,
    hash: ContentHash,
    /// The contents this object had ever had on the saving device before this save.
    seen_before: HashSet<ContentHash>,
}

struct Device {
    name: String,
    engine: Engine,
    /// What the I/O side persisted, maintained from the actions only.
    persisted: PersistedState,
    server_tree: BTreeMap<ObjectId, ObjectState>,
    /// The local tree with content (the store).
    store: Objects,
    online: bool,
    requests: VecDeque<Action>,
    /// Hashes each object ever had on this device.
    seen: HashMap<ObjectId, HashSet<ContentHash>>,
    restarts: u64,
}

struct World {
    rng: Rng,
    now: u64,
    server: Server,
    devices: Vec<Device>,
    saved: Vec<Saved>,
    /// (content hashes the deleting device had seen for the object) per delete.
    deletes_seen: Vec<HashSet<ContentHash>>,
    faults: bool,
    counter: u64,
    checks: u64,
    trace: bool,
}

const START_MS: u64 = 1_700_000_000_000;

impl World {
    fn new(seed: u64, devices: usize) -> World {
        let mut w = World {
            rng: Rng(seed),
            now: START_MS,
            server: Server::new(),
            devices: Vec::new(),
            saved: Vec::new(),
            deletes_seen: Vec::new(),
            faults: false,
            counter: 0,
            checks: 0,
            trace: std::env::var("DELTADRIVE_SIM_TRACE").is_ok(),
        };
        for i in 0..devices {
            let dev_name = format!("dev{i}");
            let engine = Engine::new(EngineConfig::new(dev_name.clone(), seed ^ (i as u64 + 1)));
            let mut store = BTreeMap::new();
            store.insert(ObjectId::ROOT, root_obj());
            w.devices.push(Device {
                name: dev_name,
                engine,
                persisted: PersistedState::default(),
                server_tree: BTreeMap::new(),
                store,
                online: true,
                requests: VecDeque::new(),
                seen: HashMap::new(),
                restarts: 0,
            });
        }
        for d in 0..devices {
            w.set_online(d, true);
        }
        w
    }

    fn new_id(&mut self) -> ObjectId {
        ObjectId(self.rng.id())
    }

    fn unique_content(&mut self, d: usize) -> Vec<u8> {
        self.counter += 1;
        let n = self.rng.below(40);
        let mut c = format!("dev{d} version {} ", self.counter).into_bytes();
        c.extend(std::iter::repeat_n(b'x', n));
        c
    }

    // ----- executing actions (the I/O side)

    fn pump(&mut self, d: usize) {
        let mut guard = 0;
        while let Some(action) = self.devices[d].engine.poll_action() {
            guard += 1;
            assert!(guard < 100_000, "device {d} emits actions forever");
            if self.trace {
                eprintln!("[{}] dev{d} action {}", self.now, describe(&action));
            }
            match action {
                Action::Upload { .. } | Action::Pull { .. } | Action::LongPoll { .. } => {
                    self.devices[d].requests.push_back(action);
                }
                Action::CancelLongPoll { request } => {
                    self.devices[d]
                        .requests
                        .retain(|a| request_id(a) != Some(request));
                }
                Action::Apply(apply) => {
                    let fail = self.faults
                        && apply.local_changes.iter().any(|c| {
                            matches!(
                                c,
                                LocalChange::Put {
                                    content: ContentSource::Ops(ops),
                                    ..
                                } if !ops.is_empty()
                            )
                        })
                        && self.rng.chance(10);
                    if fail {
                        let now = self.now;
                        self.devices[d]
                            .engine
                            .handle_apply_failed(now, apply.cursor);
                        continue;
                    }
                    self.execute_apply(d, *apply);
                }
            }
        }
        self.check_persisted(d);
    }

    fn execute_apply(&mut self, d: usize, apply: deltadrive::engine::LocalApply) {
        let now = self.now;
        let dev = &mut self.devices[d];
        // Copies read their source content before anything changes.
        let copy_contents: Vec<Vec<u8>> = apply
            .copies
            .iter()
            .map(|c| {
                let content = dev
                    .store
                    .get(&c.source)
                    .map(|o| o.content.clone())
                    .expect("copy source exists locally");
                assert_eq!(hash(&content), c.source_hash, "copy source content");
                content
            })
            .collect();
        let mut store = dev.store.clone();
        for change in &apply.local_changes {
            if let LocalChange::Remove(id) = change {
                store.remove(id);
            }
        }
        for change in &apply.local_changes {
            if let LocalChange::Put { state, content } = change {
                let old = store.get(&state.id).map(|o| o.content.clone());
                let new_content = match content {
                    ContentSource::Unchanged => old.unwrap_or_default(),
                    ContentSource::Ops(ops) => {
                        let mut c = old.unwrap_or_default();
                        for change in ops.iter().filter_map(ContentChange::of) {
                            c = change
                                .apply_to(state.id, c, MAX_CONTENT)
                                .expect("remote content ops apply to the local content");
                        }
                        c
                    }
                    ContentSource::Fetch { hash: h, .. } => self
                        .server
                        .blobs
                        .get(h)
                        .cloned()
                        .expect("server has the fetched version"),
                };
                if state.is_file() {
                    assert_eq!(hash(&new_content), state.hash, "content of {}", state.id);
                }
                store.insert(state.id, obj_of(state, new_content));
            }
        }
        let mut copy_txs = Vec::new();
        for (c, content) in apply.copies.iter().zip(copy_contents) {
            let tx = c.transaction(&dev.name, now as i64, content.clone());
            let mut o = obj_of(&c.target, content);
            o.version = tx.ops.last().map(|op| op.new_version).unwrap_or(1);
            store.insert(c.target.id, o);
            copy_txs.push(tx);
        }
        dev.store = store;
        for (id, o) in &dev.store {
            dev.seen.entry(*id).or_default().insert(hash(&o.content));
        }
        // Durable engine state, in the same batch.
        dev.persisted.cursor = apply.cursor;
        for ch in &apply.server_changes {
            match ch {
                ServerChange::Put(s) => {
                    dev.server_tree.insert(s.id, s.clone());
                }
                ServerChange::Remove(id) => {
                    dev.server_tree.remove(id);
                }
            }
        }
        for id in &apply.acknowledged {
            assert_eq!(
                dev.persisted.outbox.first().map(|t| t.id),
                Some(*id),
                "acknowledged transaction is the outbox front"
            );
            dev.persisted.outbox.remove(0);
        }
        if let Some(rest) = &apply.outbox {
            dev.persisted.outbox = rest.clone();
        }
        dev.persisted.outbox.extend(copy_txs.iter().cloned());
        for tx in copy_txs {
            dev.engine
                .handle_local_commit(now, tx)
                .expect("copy transaction applies");
        }
    }

    fn check_persisted(&mut self, d: usize) {
        // The full comparison is costly: do it on every 8th batch of actions and at the end.
        self.checks += 1;
        if self.checks % 8 != 0 && !self.trace {
            let dev = &self.devices[d];
            assert_eq!(
                dev.persisted.cursor,
                dev.engine.cursor(),
                "dev{d}: persisted cursor"
            );
            assert_eq!(
                dev.persisted.outbox,
                dev.engine.outbox(),
                "dev{d}: persisted outbox"
            );
            return;
        }
        let dev = &mut self.devices[d];
        dev.persisted.server_tree = dev.server_tree.values().cloned().collect();
        let engine_state = dev.engine.persisted_state();
        let mut mine = dev.persisted.clone();
        let root_default = ObjectState::root();
        mine.server_tree
            .retain(|o| o.id != ObjectId::ROOT || *o != root_default);
        let mut theirs = engine_state;
        theirs
            .server_tree
            .retain(|o| o.id != ObjectId::ROOT || *o != root_default);
        assert_eq!(mine.cursor, theirs.cursor, "dev{d}: persisted cursor");
        assert_eq!(mine.outbox, theirs.outbox, "dev{d}: persisted outbox");
        assert_eq!(
            mine.server_tree, theirs.server_tree,
            "dev{d}: persisted server tree"
        );
        // The store holds exactly the engine's local tree.
        let local = dev.engine.local_tree();
        assert_eq!(local.len(), dev.store.len(), "dev{d}: local tree size");
        for (id, o) in &dev.store {
            let s = local
                .get(*id)
                .unwrap_or_else(|| panic!("dev{d}: {id} missing in engine"));
            assert_eq!(
                (s.parent, &s.name, &s.kind, s.mode, s.mtime_ns, &s.xattrs, s.version),
                (o.parent, &o.name, &o.kind, o.mode, o.mtime_ns, &o.xattrs, o.version),
                "dev{d}: metadata of {id}"
            );
            if o.kind == ObjectKind::File {
                assert_eq!(s.hash, hash(&o.content), "dev{d}: content of {id}");
            }
        }
    }

    // ----- the network

    fn deliver(&mut self, d: usize) {
        let Some(req) = self.devices[d].requests.pop_front() else {
            return;
        };
        let now = self.now;
        if !self.devices[d].online {
            if let Some(r) = request_id(&req) {
                self.devices[d].engine.handle_request_failed(now, r);
            }
            self.pump(d);
            return;
        }
        match req {
            Action::Upload {
                request,
                idempotency_key,
                transactions,
            } => {
                if self.faults && self.rng.chance(8) {
                    // Lost before the server saw it.
                    self.devices[d].engine.handle_request_failed(now, request);
                } else {
                    let outcome = self.server.append(&idempotency_key, &transactions);
                    if self.faults && self.rng.chance(5) {
                        // A duplicate delivery: answered from the idempotency record.
                        let _ = self.server.append(&idempotency_key, &transactions);
                    }
                    if self.faults && self.rng.chance(8) {
                        // Stored, but the answer was lost.
                        self.devices[d].engine.handle_request_failed(now, request);
                    } else {
                        match outcome {
                            AppendOutcome::Stored(f, l) => self.devices[d]
                                .engine
                                .handle_upload_acked(now, request, f, l),
                            AppendOutcome::Conflict(why) => {
                                if self.trace {
                                    eprintln!("[{now}] dev{d} upload refused: {why}");
                                }
                                self.devices[d].engine.handle_upload_conflict(now, request)
                            }
                        }
                    }
                }
            }
            Action::Pull { request, after } => {
                if self.faults && self.rng.chance(5) {
                    self.devices[d].engine.handle_request_failed(now, request);
                } else {
                    let limit = 1 + self.rng.below(6);
                    let entries = self.server.entries_after(after, limit);
                    let head = self.server.head();
                    self.devices[d]
                        .engine
                        .handle_pulled(now, request, entries, head);
                }
            }
            Action::LongPoll { request, after } => {
                let head = self.server.head();
                if head > after || self.rng.chance(20) {
                    self.devices[d].engine.handle_long_poll(now, request, head);
                } else {
                    self.devices[d]
                        .requests
                        .push_back(Action::LongPoll { request, after });
                }
            }
            _ => {}
        }
        self.pump(d);
    }

    fn timeouts(&mut self) {
        let now = self.now;
        for d in 0..self.devices.len() {
            if let Some(at) = self.devices[d].engine.poll_timeout() {
                if at <= now {
                    self.devices[d].engine.handle_timeout(now);
                    self.pump(d);
                }
            }
        }
    }

    fn set_online(&mut self, d: usize, online: bool) {
        let now = self.now;
        self.devices[d].online = online;
        if !online {
            self.devices[d].requests.clear();
        }
        self.devices[d].engine.handle_connectivity(now, online);
        self.pump(d);
    }

    fn restart(&mut self, d: usize) {
        let dev = &mut self.devices[d];
        dev.restarts += 1;
        dev.requests.clear();
        dev.persisted.server_tree = dev.server_tree.values().cloned().collect();
        let seed = self.rng.next();
        dev.engine = Engine::restore(
            EngineConfig::new(dev.name.clone(), seed),
            dev.persisted.clone(),
        )
        .expect("persisted state restores");
        let online = dev.online;
        let now = self.now;
        dev.engine.handle_connectivity(now, online);
        self.pump(d);
    }

    // ----- local changes (the capture layer)

    fn commit(&mut self, d: usize, ops: Vec<Op>) {
        if ops.is_empty() {
            return;
        }
        let now = self.now;
        let tx = Transaction {
            id: self.rng.id(),
            device: self.devices[d].name.clone(),
            time_ms: now as i64,
            ops,
        };
        if self.trace {
            eprintln!("[{now}] dev{d} commit {}", describe_ops(&tx));
        }
        let dev = &mut self.devices[d];
        let mut store = dev.store.clone();
        for op in &tx.ops {
            server_apply(&mut store, op)
                .unwrap_or_else(|e| panic!("dev{d}: local op refused: {e}"));
        }
        dev.engine
            .handle_local_commit(now, tx.clone())
            .unwrap_or_else(|e| panic!("dev{d}: engine refused a local commit: {e}"));
        // Saved versions and what deletes had seen.
        for op in &tx.ops {
            match &op.kind {
                OpKind::Write { new_hash, .. } | OpKind::Truncate { new_hash, .. } => {
                    let seen_before = dev.seen.get(&op.object).cloned().unwrap_or_default();
                    self.saved.push(Saved {
                        device: d,
                        object: op.object,
                        hash: *new_hash,
                        seen_before,
                    });
                    dev.seen.entry(op.object).or_default().insert(*new_hash);
                }
                // An unlink counts too: when the other names go meanwhile, the rebase turns
                // it into the delete of the last name, made with what this device had seen.
                OpKind::Delete | OpKind::Unlink { .. } => {
                    let seen = dev.seen.get(&op.object).cloned().unwrap_or_default();
                    self.deletes_seen.push(seen);
                }
                _ => {}
            }
        }
        dev.store = store;
        for (id, o) in &dev.store {
            dev.seen.entry(*id).or_default().insert(hash(&o.content));
        }
        dev.persisted.outbox.push(tx);
        self.pump(d);
    }

    /// `rm -r` of `id`: everything below it goes, children first. A file below it that also
    /// has a name outside loses only the names inside (unlinks), as on a disk.
    fn remove_ops(&self, d: usize, id: ObjectId) -> Vec<Op> {
        let store = &self.devices[d].store;
        let mut order = Vec::new();
        collect_post_order(store, id, &mut order);
        let dirs: HashSet<ObjectId> = order
            .iter()
            .copied()
            .filter(|x| store[x].kind == ObjectKind::Directory)
            .collect();
        let mut ops = Vec::new();
        for x in order {
            let o = &store[&x];
            let v = self.version(d, x);
            let all = names(o);
            let inside: Vec<(ObjectId, Name)> = all
                .iter()
                .filter(|(p, _)| dirs.contains(p))
                .cloned()
                .collect();
            let kinds: Vec<OpKind> = if x != id && inside.len() < all.len() {
                inside
                    .into_iter()
                    .map(|(parent, name)| OpKind::Unlink { parent, name })
                    .collect()
            } else {
                vec![OpKind::Delete]
            };
            for (v, kind) in (v..).zip(kinds) {
                ops.push(Op {
                    object: x,
                    base_version: v,
                    new_version: v + 1,
                    kind,
                });
            }
        }
        ops
    }

    fn version(&self, d: usize, id: ObjectId) -> u64 {
        self.devices[d].engine.local_version(id)
    }

    fn pick(&mut self, d: usize, f: impl Fn(&ObjectId, &Obj) -> bool) -> Option<ObjectId> {
        let ids: Vec<ObjectId> = self.devices[d]
            .store
            .iter()
            .filter(|(id, o)| f(id, o))
            .map(|(id, _)| *id)
            .collect();
        if ids.is_empty() {
            None
        } else {
            Some(ids[self.rng.below(ids.len())])
        }
    }

    fn write_op(&self, d: usize, id: ObjectId, base: u64, content: Vec<u8>) -> Op {
        let old = &self.devices[d].store[&id].content;
        Op {
            object: id,
            base_version: base,
            new_version: base + 1,
            kind: OpKind::Write {
                base_hash: hash(old),
                new_hash: hash(&content),
                new_size: content.len() as u64,
                delta: Delta::Whole(content),
            },
        }
    }

    fn create_file_ops(&mut self, parent: ObjectId, n: Name, content: Vec<u8>) -> Vec<Op> {
        let id = self.new_id();
        let now = self.now as i64;
        vec![
            Op {
                object: id,
                base_version: 0,
                new_version: 1,
                kind: OpKind::Create {
                    parent,
                    name: n,
                    kind: ObjectKind::File,
                    mode: 0o644,
                    mtime_ns: now,
                },
            },
            Op {
                object: id,
                base_version: 1,
                new_version: 2,
                kind: OpKind::Write {
                    base_hash: empty_hash(),
                    new_hash: hash(&content),
                    new_size: content.len() as u64,
                    delta: Delta::Whole(content),
                },
            },
        ]
    }

    fn random_user_op(&mut self, d: usize) {
        const FILE_NAMES: [&str; 5] = ["a", "b", "c.txt", "d.txt", "e.md"];
        const DIR_NAMES: [&str; 3] = ["x", "y", "z"];
        let roll = self.rng.below(100);
        let dirs = |_: &ObjectId, o: &Obj| o.kind == ObjectKind::Directory;
        let files = |id: &ObjectId, o: &Obj| *id != ObjectId::ROOT && o.kind == ObjectKind::File;
        let ops: Vec<Op> = if roll < 20 {
            let Some(parent) = self.pick(d, dirs) else {
                return;
            };
            let n = name(FILE_NAMES[self.rng.below(FILE_NAMES.len())]);
            if name_taken(&self.devices[d].store, parent, &n) {
                return;
            }
            let content = self.unique_content(d);
            self.create_file_ops(parent, n, content)
        } else if roll < 30 {
            let Some(parent) = self.pick(d, dirs) else {
                return;
            };
            let n = name(DIR_NAMES[self.rng.below(DIR_NAMES.len())]);
            if name_taken(&self.devices[d].store, parent, &n) {
                return;
            }
            let id = self.new_id();
            vec![Op {
                object: id,
                base_version: 0,
                new_version: 1,
                kind: OpKind::Create {
                    parent,
                    name: n,
                    kind: ObjectKind::Directory,
                    mode: 0o755,
                    mtime_ns: 0,
                },
            }]
        } else if roll < 55 {
            // An edit, sometimes through an editor's save pattern (captured as an edit plus a
            // new mtime of the same object), sometimes a truncate.
            let Some(id) = self.pick(d, files) else {
                return;
            };
            let base = self.version(d, id);
            if self.rng.chance(15) {
                let mut c = self.devices[d].store[&id].content.clone();
                let n = c.len() / 2;
                c.truncate(n);
                vec![Op {
                    object: id,
                    base_version: base,
                    new_version: base + 1,
                    kind: OpKind::Truncate {
                        new_size: n as u64,
                        new_hash: hash(&c),
                    },
                }]
            } else {
                let content = self.unique_content(d);
                let mut ops = vec![self.write_op(d, id, base, content)];
                if self.rng.chance(40) {
                    ops.push(Op {
                        object: id,
                        base_version: base + 1,
                        new_version: base + 2,
                        kind: OpKind::SetAttr {
                            mode: None,
                            mtime_ns: Some(self.now as i64),
                        },
                    });
                }
                ops
            }
        } else if roll < 67 {
            // Delete a file or a folder with everything in it.
            let Some(id) = self.pick(d, |id, _| *id != ObjectId::ROOT) else {
                return;
            };
            self.remove_ops(d, id)
        } else if roll < 82 {
            let Some(id) = self.pick(d, |id, _| *id != ObjectId::ROOT) else {
                return;
            };
            let Some(target) = self.pick(d, dirs) else {
                return;
            };
            let store = &self.devices[d].store;
            if within(store, target, id) {
                return;
            }
            let is_dir = store[&id].kind == ObjectKind::Directory;
            let pool: &[&str] = if is_dir { &DIR_NAMES } else { &FILE_NAMES };
            let n = name(pool[self.rng.below(pool.len())]);
            if name_taken(store, target, &n) {
                return;
            }
            let v = self.version(d, id);
            let o = &store[&id];
            if o.links.is_empty() {
                vec![Op {
                    object: id,
                    base_version: v,
                    new_version: v + 1,
                    kind: OpKind::Rename {
                        new_parent: target,
                        new_name: n,
                    },
                }]
            } else {
                // One name of several moves: a link of the new name, an unlink of the old.
                let all = names(o);
                let (op_, on) = all[self.rng.below(all.len())].clone();
                vec![
                    Op {
                        object: id,
                        base_version: v,
                        new_version: v + 1,
                        kind: OpKind::Link {
                            parent: target,
                            name: n,
                        },
                    },
                    Op {
                        object: id,
                        base_version: v + 1,
                        new_version: v + 2,
                        kind: OpKind::Unlink {
                            parent: op_,
                            name: on,
                        },
                    },
                ]
            }
        } else if roll < 87 {
            // Hard links: a second name for a file, or one of several names taken away.
            let Some(id) = self.pick(d, files) else {
                return;
            };
            let store = &self.devices[d].store;
            let o = &store[&id];
            let v = self.version(d, id);
            if !o.links.is_empty() && self.rng.chance(50) {
                let all = names(o);
                let (parent, n) = all[self.rng.below(all.len())].clone();
                vec![Op {
                    object: id,
                    base_version: v,
                    new_version: v + 1,
                    kind: OpKind::Unlink { parent, name: n },
                }]
            } else {
                let Some(target) = self.pick(d, dirs) else {
                    return;
                };
                let n = name(FILE_NAMES[self.rng.below(FILE_NAMES.len())]);
                if name_taken(&self.devices[d].store, target, &n) {
                    return;
                }
                vec![Op {
                    object: id,
                    base_version: v,
                    new_version: v + 1,
                    kind: OpKind::Link {
                        parent: target,
                        name: n,
                    },
                }]
            }
        } else if roll < 91 {
            let Some(id) = self.pick(d, |_, _| true) else {
                return;
            };
            let modes = [0o644, 0o600, 0o755, 0o700];
            let v = self.version(d, id);
            vec![Op {
                object: id,
                base_version: v,
                new_version: v + 1,
                kind: OpKind::SetAttr {
                    mode: Some(modes[self.rng.below(modes.len())]),
                    mtime_ns: None,
                },
            }]
        } else {
            let Some(id) = self.pick(d, |_, _| true) else {
                return;
            };
            let v = self.version(d, id);
            let key = format!("user.k{}", self.rng.below(2)).into_bytes();
            let kind = if self.rng.chance(70) {
                OpKind::SetXattr {
                    name: key,
                    value: format!("v{}", self.rng.below(100)).into_bytes(),
                }
            } else {
                OpKind::RemoveXattr { name: key }
            };
            vec![Op {
                object: id,
                base_version: v,
                new_version: v + 1,
                kind,
            }]
        };
        self.commit(d, ops);
    }

    // ----- driving

    fn step(&mut self, writes: bool) {
        self.now += 1 + self.rng.below(700) as u64;
        let n = self.devices.len();
        let d = self.rng.below(n);
        let roll = self.rng.below(100);
        if writes && roll < 35 {
            self.random_user_op(d);
        } else if roll < 85 {
            self.deliver(d);
        } else if self.faults && roll < 92 {
            let online = !self.devices[d].online;
            self.set_online(d, online);
        } else if self.faults && roll < 95 {
            self.restart(d);
        }
        self.timeouts();
    }

    fn quiesce(&mut self) {
        self.faults = false;
        for d in 0..self.devices.len() {
            if !self.devices[d].online {
                self.set_online(d, true);
            }
        }
        for round in 0..200_000 {
            let settled = self.devices.iter().all(|dev| {
                dev.engine.is_idle()
                    && dev.engine.cursor() == self.server.head()
                    && dev
                        .requests
                        .iter()
                        .all(|a| matches!(a, Action::LongPoll { .. }))
            });
            if settled {
                return;
            }
            self.now += 1 + self.rng.below(300) as u64;
            let d = round % self.devices.len();
            self.deliver(d);
            if let Some(at) = self.devices[d].engine.poll_timeout() {
                self.now = self.now.max(at);
            }
            self.timeouts();
        }
        panic!("no quiescence after 200000 rounds");
    }

    // ----- the oracle

    fn check_converged(&mut self) {
        for d in 0..self.devices.len() {
            self.checks = 7;
            self.check_persisted(d);
        }
        let server = &self.server.objects;
        for (d, dev) in self.devices.iter().enumerate() {
            assert_eq!(dev.engine.outbox().len(), 0, "dev{d}: outbox empty");
            let mut mine = dev.store.clone();
            let mut theirs = server.clone();
            // The root's version is not tracked locally unless an op touched it.
            if let (Some(a), Some(b)) = (
                mine.get_mut(&ObjectId::ROOT),
                theirs.get_mut(&ObjectId::ROOT),
            ) {
                a.version = 0;
                b.version = 0;
            }
            if mine != theirs {
                let ls = listing(&mine);
                let ss = listing(&theirs);
                panic!(
                    "dev{d}'s tree differs from the server:\n device: {ls:#?}\n server: {ss:#?}"
                );
            }
        }
    }

    fn check_nothing_lost(&self) {
        let present: HashSet<ContentHash> = self
            .server
            .objects
            .values()
            .filter(|o| o.kind == ObjectKind::File)
            .map(|o| hash(&o.content))
            .collect();
        let deleted_seen: HashSet<ContentHash> =
            self.deletes_seen.iter().flatten().copied().collect();
        for v in &self.saved {
            if present.contains(&v.hash) || deleted_seen.contains(&v.hash) {
                continue;
            }
            // A later version saved over it by a device that had seen it (the same device's next
            // save, or an edit made on top of it, of the file or of its conflicted copy).
            let superseded = self
                .saved
                .iter()
                .any(|w| w.hash != v.hash && w.seen_before.contains(&v.hash));
            assert!(
                superseded,
                "lost: a version saved by dev{} of {} (hash {}) is on no device",
                v.device,
                v.object,
                hex::encode(&v.hash[..6])
            );
        }
    }
}

fn obj_of(s: &ObjectState, content: Vec<u8>) -> Obj {
    Obj {
        parent: s.parent,
        name: s.name.clone(),
        links: s.links.clone(),
        kind: s.kind.clone(),
        mode: s.mode,
        mtime_ns: s.mtime_ns,
        content,
        xattrs: s.xattrs.clone(),
        version: s.version,
    }
}

fn collect_post_order(store: &Objects, id: ObjectId, out: &mut Vec<ObjectId>) {
    let children: Vec<ObjectId> = store
        .iter()
        .filter(|(c, o)| **c != ObjectId::ROOT && names(o).iter().any(|(p, _)| *p == id))
        .map(|(c, _)| *c)
        .collect();
    for c in children {
        collect_post_order(store, c, out);
    }
    // A file with two names in the tree is visited once.
    if !out.contains(&id) {
        out.push(id);
    }
}

fn describe_ops(tx: &Transaction) -> String {
    let mut out = format!("tx {}:", hex::encode(&tx.id[..4]));
    for op in &tx.ops {
        let what = match &op.kind {
            OpKind::Create {
                parent, name, kind, ..
            } => format!("create {:?} {name} in {}", kind, &parent.to_hex()[..8]),
            OpKind::Write { new_hash, .. } => format!("write {}", hex::encode(&new_hash[..6])),
            OpKind::Truncate { new_hash, .. } => {
                format!("truncate {}", hex::encode(&new_hash[..6]))
            }
            OpKind::Rename {
                new_parent,
                new_name,
            } => {
                format!("rename to {new_name} in {}", &new_parent.to_hex()[..8])
            }
            OpKind::Delete => "delete".into(),
            OpKind::SetAttr { .. } => "setattr".into(),
            OpKind::SetXattr { .. } | OpKind::RemoveXattr { .. } => "xattr".into(),
            OpKind::Link { parent, name } => format!("link {}/{name}", &parent.to_hex()[..6]),
            OpKind::Unlink { parent, name } => format!("unlink {}/{name}", &parent.to_hex()[..6]),
        };
        out.push_str(&format!(
            " [{} v{}->{} {what}]",
            &op.object.to_hex()[..8],
            op.base_version,
            op.new_version
        ));
    }
    out
}

fn request_id(a: &Action) -> Option<RequestId> {
    match a {
        Action::Upload { request, .. }
        | Action::Pull { request, .. }
        | Action::LongPoll { request, .. }
        | Action::CancelLongPoll { request } => Some(*request),
        Action::Apply(_) => None,
    }
}

fn describe(a: &Action) -> String {
    match a {
        Action::Upload {
            idempotency_key,
            transactions,
            ..
        } => format!(
            "upload {} txs key {}",
            transactions.len(),
            &idempotency_key[..8]
        ),
        Action::Pull { after, .. } => format!("pull after {after}"),
        Action::LongPoll { after, .. } => format!("long poll after {after}"),
        Action::CancelLongPoll { .. } => "cancel long poll".into(),
        Action::Apply(x) => format!(
            "apply seq {} remote {} | local {:?} | copies {:?} | outbox {}",
            x.cursor,
            describe_ops(&x.transaction),
            x.local_changes
                .iter()
                .map(|c| match c {
                    LocalChange::Put { state, .. } => format!(
                        "put {} {} {}",
                        &state.id.to_hex()[..8],
                        state.name,
                        hex::encode(&state.hash[..6])
                    ),
                    LocalChange::Remove(id) => format!("remove {}", &id.to_hex()[..8]),
                })
                .collect::<Vec<_>>(),
            x.copies
                .iter()
                .map(|c| format!(
                    "{} -> {} {}",
                    &c.source.to_hex()[..8],
                    &c.target.id.to_hex()[..8],
                    c.target.name
                ))
                .collect::<Vec<_>>(),
            match &x.outbox {
                Some(o) => o.iter().map(describe_ops).collect::<Vec<_>>().join(" ; "),
                None => "kept".into(),
            }
        ),
    }
}

/// The tree as sorted `path → description` lines.
fn listing(objs: &Objects) -> Vec<String> {
    let mut out = Vec::new();
    for (id, whole) in objs {
        if *id == ObjectId::ROOT {
            continue;
        }
        for (parent, n) in names(whole) {
            let o = whole;
            let mut path = vec![n.to_string()];
            let mut at = parent;
            let mut steps = 0;
            while at != ObjectId::ROOT && steps < objs.len() {
                match objs.get(&at) {
                    Some(p) => {
                        path.push(p.name.to_string());
                        at = p.parent;
                    }
                    None => {
                        path.push("?".into());
                        break;
                    }
                }
                steps += 1;
            }
            path.reverse();
            let what = match &o.kind {
                ObjectKind::Directory => "/".to_string(),
                ObjectKind::File => format!(" = {:?}", String::from_utf8_lossy(&o.content)),
                ObjectKind::Symlink { .. } => " -> link".to_string(),
            };
            let shared = if o.links.is_empty() {
                String::new()
            } else {
                format!(" (one of {} names)", o.links.len() + 1)
            };
            out.push(format!("{}{what}{shared}", path.join("/")));
        }
    }
    out.sort();
    out
}

// ---------------------------------------------------------------- the simulation

fn run_seed(seed: u64, ops: usize) {
    let mut w = World::new(seed, 3);
    w.faults = true;
    for _ in 0..ops {
        w.step(true);
    }
    w.quiesce();
    w.check_converged();
    w.check_nothing_lost();
}

#[test]
fn simulation_converges_and_loses_nothing() {
    let ops: usize = std::env::var("DELTADRIVE_SIM_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1500);
    let seeds: Vec<u64> = match std::env::var("DELTADRIVE_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("DELTADRIVE_SIM_SEED is a number")],
        Err(_) => {
            let n: u64 = std::env::var("DELTADRIVE_SIM_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(200);
            (1..=n).collect()
        }
    };
    // Seeds are independent: spread them over the cores, each thread in seed order.
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(seeds.len().max(1));
    let failed: Vec<u64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let mine: Vec<u64> = seeds.iter().copied().skip(t).step_by(threads).collect();
                scope.spawn(move || {
                    mine.into_iter()
                        .find(|seed| std::panic::catch_unwind(|| run_seed(*seed, ops)).is_err())
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().ok().flatten())
            .collect()
    });
    if let Some(seed) = failed.iter().min() {
        panic!(
            "simulation failed with seed {seed} (all failing: {failed:?}); replay with \
             DELTADRIVE_SIM_SEED={seed} DELTADRIVE_SIM_TRACE=1 cargo test --test simulation simulation_"
        );
    }
}

// ---------------------------------------------------------------- one test per SEMANTICS.md row

/// Scripted user actions by path, for the table tests.
impl World {
    fn resolve(&self, d: usize, path: &str) -> ObjectId {
        let mut at = ObjectId::ROOT;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            let n = name(part);
            at = *self.devices[d]
                .store
                .iter()
                .find(|(id, o)| **id != ObjectId::ROOT && has_name(o, at, &n))
                .unwrap_or_else(|| panic!("dev{d}: no {path}"))
                .0;
        }
        at
    }

    fn split(&self, d: usize, path: &str) -> (ObjectId, Name) {
        match path.rsplit_once('/') {
            Some((dir, base)) => (self.resolve(d, dir), name(base)),
            None => (ObjectId::ROOT, name(path)),
        }
    }

    fn mkfile(&mut self, d: usize, path: &str, content: &str) {
        let (parent, n) = self.split(d, path);
        let ops = self.create_file_ops(parent, n, content.as_bytes().to_vec());
        self.commit(d, ops);
    }

    fn mkdir(&mut self, d: usize, path: &str) {
        let (parent, n) = self.split(d, path);
        let id = self.new_id();
        let op = Op {
            object: id,
            base_version: 0,
            new_version: 1,
            kind: OpKind::Create {
                parent,
                name: n,
                kind: ObjectKind::Directory,
                mode: 0o755,
                mtime_ns: 0,
            },
        };
        self.commit(d, vec![op]);
    }

    fn edit(&mut self, d: usize, path: &str, content: &str) {
        let id = self.resolve(d, path);
        let base = self.version(d, id);
        let op = self.write_op(d, id, base, content.as_bytes().to_vec());
        self.commit(d, vec![op]);
    }

    /// An editor's save: new content and a new mtime of the same object, in one transaction.
    fn save(&mut self, d: usize, path: &str, content: &str) {
        let id = self.resolve(d, path);
        let base = self.version(d, id);
        let write = self.write_op(d, id, base, content.as_bytes().to_vec());
        let touch = Op {
            object: id,
            base_version: base + 1,
            new_version: base + 2,
            kind: OpKind::SetAttr {
                mode: None,
                mtime_ns: Some(self.now as i64),
            },
        };
        self.commit(d, vec![write, touch]);
    }

    fn remove(&mut self, d: usize, path: &str) {
        let id = self.resolve(d, path);
        let ops = self.remove_ops(d, id);
        self.commit(d, ops);
    }

    fn rename(&mut self, d: usize, path: &str, to: &str) {
        let id = self.resolve(d, path);
        let (new_parent, new_name) = self.split(d, to);
        let v = self.version(d, id);
        let op = Op {
            object: id,
            base_version: v,
            new_version: v + 1,
            kind: OpKind::Rename {
                new_parent,
                new_name,
            },
        };
        self.commit(d, vec![op]);
    }

    /// `ln path to`: one more name for the file at `path`.
    fn link(&mut self, d: usize, path: &str, to: &str) {
        let id = self.resolve(d, path);
        let (parent, n) = self.split(d, to);
        let v = self.version(d, id);
        let op = Op {
            object: id,
            base_version: v,
            new_version: v + 1,
            kind: OpKind::Link { parent, name: n },
        };
        self.commit(d, vec![op]);
    }

    /// `rm path` of one of several names: the name goes, the file stays.
    fn unlink(&mut self, d: usize, path: &str) {
        let id = self.resolve(d, path);
        let (parent, n) = self.split(d, path);
        let v = self.version(d, id);
        let op = Op {
            object: id,
            base_version: v,
            new_version: v + 1,
            kind: OpKind::Unlink { parent, name: n },
        };
        self.commit(d, vec![op]);
    }

    fn chmod(&mut self, d: usize, path: &str, mode: u32) {
        let id = self.resolve(d, path);
        let v = self.version(d, id);
        let op = Op {
            object: id,
            base_version: v,
            new_version: v + 1,
            kind: OpKind::SetAttr {
                mode: Some(mode),
                mtime_ns: None,
            },
        };
        self.commit(d, vec![op]);
    }

    fn setxattr(&mut self, d: usize, path: &str, key: &str, value: &str) {
        let id = self.resolve(d, path);
        let v = self.version(d, id);
        let op = Op {
            object: id,
            base_version: v,
            new_version: v + 1,
            kind: OpKind::SetXattr {
                name: key.as_bytes().to_vec(),
                value: value.as_bytes().to_vec(),
            },
        };
        self.commit(d, vec![op]);
    }

    /// Runs the online devices until they are idle (offline ones keep their changes).
    fn sync_online(&mut self) {
        for round in 0..10_000 {
            let settled = self.devices.iter().all(|dev| {
                !dev.online
                    || (dev.engine.is_idle()
                        && dev.engine.cursor() == self.server.head()
                        && dev
                            .requests
                            .iter()
                            .all(|a| matches!(a, Action::LongPoll { .. })))
            });
            if settled {
                return;
            }
            self.now += 10;
            self.deliver(round % self.devices.len());
            self.timeouts();
        }
        panic!("online devices do not settle");
    }

    /// The tree every device holds (checked equal on all of them), conflicted-copy times cut.
    fn outcome(&mut self) -> Vec<String> {
        self.quiesce();
        self.check_converged();
        self.check_nothing_lost();
        listing(&self.devices[0].store)
            .into_iter()
            .map(|l| cut_copy_time(&l))
            .collect()
    }

    fn attrs(&self, path: &str) -> (u32, BTreeMap<Vec<u8>, Vec<u8>>) {
        let id = self.resolve(0, path);
        let o = &self.devices[0].store[&id];
        (o.mode, o.xattrs.clone())
    }
}

/// `NAME (conflicted copy DEV YYYY-MM-DD HHMMSS).EXT` → `NAME (conflicted copy DEV).EXT`.
fn cut_copy_time(line: &str) -> String {
    let mut out = line.to_string();
    while let Some(i) = out.find("(conflicted copy ") {
        let rest = &out[i + "(conflicted copy ".len()..];
        let Some(close) = rest.find(')') else { break };
        let inner = &rest[..close];
        let dev = inner.split(' ').next().unwrap_or("").to_string();
        let replaced = format!("(conflicted-copy {dev})");
        out = format!("{}{}{}", &out[..i], replaced, &rest[close + 1..]);
    }
    out.replace("(conflicted-copy ", "(conflicted copy ")
}

/// Three synced devices holding `setup`; then `first` runs on dev0 and reaches the server
/// while dev1 is offline and runs `second`; then everyone syncs.
fn row(
    setup: impl FnOnce(&mut World),
    first: impl FnOnce(&mut World),
    second: impl FnOnce(&mut World),
) -> World {
    let mut w = World::new(7, 3);
    setup(&mut w);
    w.quiesce();
    w.set_online(1, false);
    first(&mut w);
    w.sync_online();
    second(&mut w);
    w
}

fn lines(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

fn with_f(w: &mut World) {
    w.mkfile(0, "f.txt", "v0");
}

#[test]
fn row_edit_edit_keeps_the_second_as_a_conflicted_copy() {
    let mut w = row(
        with_f,
        |w| w.edit(0, "f.txt", "a1"),
        |w| w.edit(1, "f.txt", "b1"),
    );
    assert_eq!(
        w.outcome(),
        lines(&["f.txt = \"a1\"", "f (conflicted copy dev1).txt = \"b1\""])
    );
}

#[test]
fn row_edit_then_delete_keeps_the_edit() {
    let mut w = row(
        with_f,
        |w| w.edit(0, "f.txt", "a1"),
        |w| w.remove(1, "f.txt"),
    );
    assert_eq!(w.outcome(), lines(&["f.txt = \"a1\""]));
}

#[test]
fn row_delete_then_edit_brings_the_file_back() {
    let mut w = row(
        with_f,
        |w| w.remove(0, "f.txt"),
        |w| w.edit(1, "f.txt", "b1"),
    );
    assert_eq!(w.outcome(), lines(&["f.txt = \"b1\""]));
}

#[test]
fn row_delete_delete_is_gone() {
    let mut w = row(with_f, |w| w.remove(0, "f.txt"), |w| w.remove(1, "f.txt"));
    assert_eq!(w.outcome(), Vec::<String>::new());
}

#[test]
fn row_rename_rename_first_wins() {
    let mut w = row(
        with_f,
        |w| w.rename(0, "f.txt", "x.txt"),
        |w| w.rename(1, "f.txt", "y.txt"),
    );
    assert_eq!(w.outcome(), lines(&["x.txt = \"v0\""]));
}

#[test]
fn row_rename_and_edit_both_apply() {
    let mut w = row(
        with_f,
        |w| w.rename(0, "f.txt", "x.txt"),
        |w| w.edit(1, "f.txt", "b1"),
    );
    assert_eq!(w.outcome(), lines(&["x.txt = \"b1\""]));
}

#[test]
fn row_create_create_same_path_renames_the_second() {
    let mut w = row(
        |_| {},
        |w| w.mkfile(0, "p.txt", "a"),
        |w| w.mkfile(1, "p.txt", "b"),
    );
    assert_eq!(
        w.outcome(),
        lines(&["p.txt = \"a\"", "p (conflicted copy dev1).txt = \"b\""])
    );
}

#[test]
fn row_create_create_equal_contents_merge() {
    let mut w = row(
        |_| {},
        |w| w.mkfile(0, "p.txt", "same"),
        |w| w.mkfile(1, "p.txt", "same"),
    );
    assert_eq!(w.outcome(), lines(&["p.txt = \"same\""]));
}

#[test]
fn row_mkdir_mkdir_makes_one_folder_with_both_children() {
    let mut w = row(
        |_| {},
        |w| {
            w.mkdir(0, "D");
            w.mkfile(0, "D/a.txt", "a");
        },
        |w| {
            w.mkdir(1, "D");
            w.mkfile(1, "D/b.txt", "b");
        },
    );
    assert_eq!(
        w.outcome(),
        lines(&["D/", "D/a.txt = \"a\"", "D/b.txt = \"b\""])
    );
}

fn with_folder(w: &mut World) {
    w.mkdir(0, "D");
    w.mkfile(0, "D/old.txt", "old");
    w.mkfile(0, "D/keep.txt", "k0");
    w.mkdir(0, "D/sub");
    w.mkfile(0, "D/sub/deep.txt", "deep");
}

#[test]
fn row_delete_folder_vs_create_inside_brings_back_only_the_creation() {
    let mut w = row(
        with_folder,
        |w| w.remove(0, "D"),
        |w| w.mkfile(1, "D/new.txt", "n"),
    );
    assert_eq!(w.outcome(), lines(&["D/", "D/new.txt = \"n\""]));
}

#[test]
fn row_delete_folder_vs_edit_inside_brings_back_only_the_edit() {
    let mut w = row(
        with_folder,
        |w| w.remove(0, "D"),
        |w| w.edit(1, "D/sub/deep.txt", "deep2"),
    );
    assert_eq!(
        w.outcome(),
        lines(&["D/", "D/sub/", "D/sub/deep.txt = \"deep2\""])
    );
}

#[test]
fn row_move_a_into_b_vs_b_into_a_keeps_the_first() {
    let mut w = row(
        |w| {
            w.mkdir(0, "A");
            w.mkdir(0, "B");
            w.mkfile(0, "A/a.txt", "a");
            w.mkfile(0, "B/b.txt", "b");
        },
        |w| w.rename(0, "A", "B/A"),
        |w| w.rename(1, "B", "A/B"),
    );
    assert_eq!(
        w.outcome(),
        lines(&["B/", "B/A/", "B/A/a.txt = \"a\"", "B/b.txt = \"b\""])
    );
}

#[test]
fn row_chmod_xattr_and_edit_both_apply() {
    let mut w = row(
        with_f,
        |w| {
            w.chmod(0, "f.txt", 0o600);
            w.setxattr(0, "f.txt", "user.tag", "red");
        },
        |w| w.edit(1, "f.txt", "b1"),
    );
    assert_eq!(w.outcome(), lines(&["f.txt = \"b1\""]));
    let (mode, xattrs) = w.attrs("f.txt");
    assert_eq!(mode, 0o600);
    assert_eq!(xattrs.get(b"user.tag".as_slice()), Some(&b"red".to_vec()));
}

#[test]
fn row_chmod_chmod_and_xattr_xattr_first_wins_per_attribute() {
    let mut w = row(
        |w| {
            with_f(w);
            w.setxattr(0, "f.txt", "user.other", "0");
        },
        |w| {
            w.chmod(0, "f.txt", 0o600);
            w.setxattr(0, "f.txt", "user.tag", "first");
        },
        |w| {
            w.chmod(1, "f.txt", 0o700);
            w.setxattr(1, "f.txt", "user.tag", "second");
            w.setxattr(1, "f.txt", "user.other", "second");
        },
    );
    assert_eq!(w.outcome(), lines(&["f.txt = \"v0\""]));
    let (mode, xattrs) = w.attrs("f.txt");
    assert_eq!(mode, 0o600);
    assert_eq!(xattrs.get(b"user.tag".as_slice()), Some(&b"first".to_vec()));
    // An attribute the first device did not touch takes the second device's change.
    assert_eq!(
        xattrs.get(b"user.other".as_slice()),
        Some(&b"second".to_vec())
    );
}

#[test]
fn row_link_then_edit_through_the_first_name_is_one_file_with_the_edit() {
    let mut w = row(
        with_f,
        |w| w.link(0, "f.txt", "n.txt"),
        |w| w.edit(1, "f.txt", "b1"),
    );
    assert_eq!(
        w.outcome(),
        lines(&[
            "f.txt = \"b1\" (one of 2 names)",
            "n.txt = \"b1\" (one of 2 names)"
        ])
    );
}

#[test]
fn row_unlink_one_name_vs_edit_through_the_other_keeps_the_file_with_the_edit() {
    let mut w = row(
        |w| {
            with_f(w);
            w.link(0, "f.txt", "n.txt");
        },
        |w| w.unlink(0, "f.txt"),
        |w| w.edit(1, "n.txt", "b1"),
    );
    assert_eq!(w.outcome(), lines(&["n.txt = \"b1\""]));
}

#[test]
fn row_same_new_name_for_two_files_keeps_the_first_and_copies_the_second() {
    let mut w = row(
        |w| {
            with_f(w);
            w.mkfile(0, "g.txt", "g0");
        },
        |w| w.link(0, "f.txt", "n.txt"),
        |w| w.link(1, "g.txt", "n.txt"),
    );
    assert_eq!(
        w.outcome(),
        lines(&[
            "f.txt = \"v0\" (one of 2 names)",
            "n.txt = \"v0\" (one of 2 names)",
            "g.txt = \"g0\" (one of 2 names)",
            "n (conflicted copy dev1).txt = \"g0\" (one of 2 names)",
        ])
    );
}

#[test]
fn row_rename_one_name_over_another_vs_delete_keeps_one_name() {
    // rename(N, F) where both name one file changes nothing (POSIX); the other device's
    // delete of F then leaves the file with the one name N.
    let mut w = row(
        |w| {
            with_f(w);
            w.link(0, "f.txt", "n.txt");
        },
        |_| {},
        |w| w.unlink(1, "f.txt"),
    );
    assert_eq!(w.outcome(), lines(&["n.txt = \"v0\""]));
}

#[test]
fn a_delete_takes_every_name_also_one_added_meanwhile() {
    let mut w = row(
        with_f,
        |w| w.link(0, "f.txt", "n.txt"),
        |w| w.remove(1, "f.txt"),
    );
    assert_eq!(w.outcome(), Vec::<String>::new());
}

#[test]
fn a_rename_of_a_file_that_gained_a_name_moves_the_name_it_knew() {
    let mut w = row(
        with_f,
        |w| w.link(0, "f.txt", "n.txt"),
        |w| w.rename(1, "f.txt", "g.txt"),
    );
    assert_eq!(
        w.outcome(),
        lines(&[
            "g.txt = \"v0\" (one of 2 names)",
            "n.txt = \"v0\" (one of 2 names)"
        ])
    );
}

#[test]
fn row_twice_edited_before_sending_ends_with_the_last_version() {
    let mut w = row(
        with_f,
        |_| {},
        |w| {
            w.edit(1, "f.txt", "b1");
            w.edit(1, "f.txt", "b2");
        },
    );
    assert_eq!(w.outcome(), lines(&["f.txt = \"b2\""]));
}

#[test]
fn own_changes_and_editor_saves_never_make_conflicted_copies() {
    let mut w = World::new(11, 3);
    with_f(&mut w);
    w.quiesce();
    for i in 0..5 {
        let d = i % 3;
        w.save(d, "f.txt", &format!("save {i}"));
        w.sync_online();
    }
    // Saves made while the device's own earlier save is still unsent.
    w.save(2, "f.txt", "save 5");
    w.save(2, "f.txt", "save 6");
    assert_eq!(w.outcome(), lines(&["f.txt = \"save 6\""]));
}

#[test]
fn restart_mid_sync_resumes_from_the_persisted_state() {
    let mut w = World::new(13, 3);
    with_folder(&mut w);
    w.quiesce();
    w.set_online(1, false);
    w.edit(0, "D/keep.txt", "a1");
    w.sync_online();
    w.edit(1, "D/keep.txt", "b1");
    w.restart(1);
    w.set_online(1, true);
    w.restart(0);
    assert_eq!(
        w.outcome(),
        lines(&[
            "D/",
            "D/keep (conflicted copy dev1).txt = \"b1\"",
            "D/keep.txt = \"a1\"",
            "D/old.txt = \"old\"",
            "D/sub/",
            "D/sub/deep.txt = \"deep\"",
        ])
    );
}

/// The I/O side may send only a prefix of an upload batch (it cuts batches by bytes): the
/// acknowledged prefix is applied at once and the rest goes in the next upload.
#[test]
fn an_upload_acknowledged_for_a_prefix_keeps_the_rest_pending() {
    let mut e = Engine::new(EngineConfig::new("dev", 7));
    e.handle_connectivity(0, true);
    let Some(Action::Pull { request, .. }) = e.poll_action() else {
        panic!("a new engine pulls first")
    };
    e.handle_pulled(1, request, Vec::new(), 0);
    while e.poll_action().is_some() {}
    let mut ids = Vec::new();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let tx = Transaction {
            id: [i as u8 + 1; 16],
            device: "dev".into(),
            time_ms: 0,
            ops: vec![Op {
                object: ObjectId([i as u8 + 10; 16]),
                base_version: 0,
                new_version: 1,
                kind: OpKind::Create {
                    parent: ObjectId::ROOT,
                    name: Name::new(name.as_bytes().to_vec()).unwrap(),
                    kind: ObjectKind::File,
                    mode: 0o644,
                    mtime_ns: 0,
                },
            }],
        };
        ids.push(tx.id);
        e.handle_local_commit(2, tx).unwrap();
    }
    let next_upload = |e: &mut Engine| loop {
        match e.poll_action() {
            Some(Action::Upload {
                request,
                transactions,
                ..
            }) => break (request, transactions),
            Some(_) => continue,
            None => panic!("no upload"),
        }
    };
    // The first commit went out alone; acknowledge it whole.
    let (request, sent) = next_upload(&mut e);
    assert_eq!(sent.len(), 1);
    e.handle_upload_acked(3, request, 1, 1);
    // The other two go together; the server stores only the first of them.
    let (request, sent) = next_upload(&mut e);
    assert_eq!(sent.len(), 2);
    e.handle_upload_acked(4, request, 2, 2);
    assert_eq!(e.cursor(), 2, "the stored prefix is applied at once");
    assert_eq!(e.outbox().len(), 1);
    assert_eq!(e.outbox()[0].id, ids[2]);
    let (_, sent) = next_upload(&mut e);
    assert_eq!(sent.len(), 1, "the rest goes out next");
    assert_eq!(sent[0].id, ids[2]);
}
