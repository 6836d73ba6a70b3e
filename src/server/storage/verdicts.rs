//! The engine's tree and the server's storage role give the same verdict on random op
//! sequences. Both follow `crate::rules`, each over its own data structure (the engine's
//! indexed tree; the append's overlay of the backend's objects and folder listings), so a
//! disagreement is a bug of one of the views or of what a caller does with an effect.

use std::collections::HashMap;
use std::sync::Arc;

use proptest::prelude::*;

use crate::changelog::{
    empty_hash, encode_changelog, ChangeLog, ContentHash, Delta, Name, ObjectId, ObjectKind, Op,
    OpKind, Transaction, Version,
};
use crate::engine::Tree;
use crate::server::backend::memory::Memory;
use crate::server::backend::Backend;
use crate::server::limits::AppendLimits;
use crate::server::storage::{AppendError, Storage, StorageConfig};

/// One op to make, as drawn: what it is, on which object, into which folder, under which name,
/// whether its base is made wrong on purpose, and the byte its content is made of.
#[derive(Clone, Debug)]
struct Draw {
    what: u8,
    object: u8,
    folder: u8,
    name: u8,
    wrong: u8,
    byte: u8,
}

fn draw() -> impl Strategy<Value = Draw> {
    (0u8..13, 1u8..7, 0u8..7, 0u8..5, 0u8..12, any::<u8>()).prop_map(
        |(what, object, folder, name, wrong, byte)| Draw {
            what,
            object,
            folder,
            name,
            wrong,
            byte,
        },
    )
}

fn id(k: u8) -> ObjectId {
    if k == 0 {
        ObjectId::ROOT
    } else {
        ObjectId([k; 16])
    }
}

fn hash(b: &[u8]) -> ContentHash {
    *blake3::hash(b).as_bytes()
}

/// The op a draw makes in a transaction, given the tree with the transaction's earlier ops
/// applied (where they apply) and the versions those ops made (ops on one object chain within
/// a transaction, else the change-log validation refuses the whole log before any tree rule).
/// Mostly ops on objects and folders that exist, so that many appends are accepted; now and
/// then a missing or wrong one, a stale base or a wrong base hash.
fn make(d: &Draw, work: &Tree, chain: &HashMap<ObjectId, Version>) -> Option<Op> {
    let objects: Vec<&crate::engine::ObjectState> = {
        let mut v: Vec<_> = work.objects().filter(|o| o.id != ObjectId::ROOT).collect();
        v.sort_by_key(|o| o.id);
        v
    };
    let pick = |k: u8, from: &[ObjectId]| {
        if from.is_empty() || d.wrong == 2 {
            id(k)
        } else {
            from[usize::from(k) % from.len()]
        }
    };
    let ids: Vec<ObjectId> = objects.iter().map(|o| o.id).collect();
    let mut dirs: Vec<ObjectId> = vec![ObjectId::ROOT];
    dirs.extend(objects.iter().filter(|o| o.is_dir()).map(|o| o.id));
    // Now and then the objects and folders this transaction touched already: a folder made,
    // filled and deleted in one append, say.
    let recent: Vec<ObjectId> = {
        let mut v: Vec<ObjectId> = chain
            .keys()
            .copied()
            .filter(|i| work.contains(*i))
            .collect();
        v.sort();
        v
    };
    let recent_dirs: Vec<ObjectId> = recent
        .iter()
        .copied()
        .filter(|i| work.get(*i).is_some_and(|o| o.is_dir()))
        .collect();
    let (ids, dirs) = if (4..7).contains(&d.wrong) && !recent.is_empty() {
        let dirs = if recent_dirs.is_empty() {
            dirs
        } else {
            recent_dirs
        };
        (recent, dirs)
    } else {
        (ids, dirs)
    };
    let mut object = pick(d.object, &ids);
    let mut folder = pick(d.folder, &dirs);
    if d.what <= 3 {
        // A create: of an id that is not there yet (or, now and then, of one that is).
        object = (1..=8)
            .map(|k| id((d.object + k) % 8 + 1))
            .find(|i| d.wrong == 2 || !work.contains(*i))?;
        if chain.contains_key(&object) {
            return None;
        }
    }
    if folder == object {
        folder = ObjectId::ROOT;
    }
    let name = Name(vec![b'a' + d.name]);
    let current = chain
        .get(&object)
        .copied()
        .unwrap_or_else(|| work.version(object));
    // A stale base now and then, except where the chain fixes it.
    let base = if d.wrong == 0 && !chain.contains_key(&object) {
        current + 1
    } else {
        current
    };
    let kind = match d.what {
        0..=3 => {
            let kind = match d.what {
                0 | 1 => ObjectKind::File,
                2 => ObjectKind::Directory,
                _ => ObjectKind::Symlink {
                    target: b"t".to_vec(),
                },
            };
            return Some(Op {
                object,
                base_version: 0,
                new_version: 1,
                kind: OpKind::Create {
                    parent: folder,
                    name,
                    kind,
                    mode: 0o644,
                    mtime_ns: i64::from(d.byte),
                },
            });
        }
        4 | 5 => OpKind::Rename {
            new_parent: folder,
            new_name: name,
        },
        6 => OpKind::Delete,
        7 => OpKind::Link {
            parent: folder,
            name,
        },
        8 => {
            // One of its names, mostly.
            let names: Vec<_> = work
                .get(object)
                .map(|o| o.names().collect())
                .unwrap_or_default();
            match names.get(usize::from(d.name)) {
                Some((p, n)) if d.wrong != 3 => OpKind::Unlink {
                    parent: *p,
                    name: (*n).clone(),
                },
                _ => OpKind::Unlink {
                    parent: folder,
                    name,
                },
            }
        }
        9 => {
            let content = vec![d.byte; usize::from(d.byte % 5)];
            let base_hash = match work.get(object) {
                Some(o) if d.wrong != 1 => o.hash,
                _ => hash(b"not the content"),
            };
            OpKind::Write {
                base_hash,
                new_hash: hash(&content),
                new_size: content.len() as u64,
                delta: Delta::Whole(content),
            }
        }
        10 => OpKind::Truncate {
            new_size: 0,
            new_hash: empty_hash(),
        },
        11 => OpKind::SetAttr {
            mode: Some(0o600 | u32::from(d.byte % 8)),
            mtime_ns: None,
        },
        _ => OpKind::SetXattr {
            name: b"user.k".to_vec(),
            value: vec![d.byte],
        },
    };
    Some(Op {
        object,
        base_version: base,
        new_version: base + 1,
        kind,
    })
}

/// What the server holds of one object, beside what the engine's tree holds of it.
fn same_object(engine: &crate::engine::ObjectState, server: &super::ObjectState) -> bool {
    let names = |p: &ObjectId, n: &Name| (p.0, n.0.clone());
    engine.parent.0 == server.parent
        && engine.name.0 == server.name
        && engine
            .links
            .iter()
            .map(|(p, n)| names(p, n))
            .collect::<Vec<_>>()
            == server.links
        && engine.version == server.version
        && engine.hash == server.hash
        && engine.size == server.size
        && engine.mode == server.mode
        && engine.mtime_ns == server.mtime_ns
        && engine.xattrs == server.xattrs
        && crate::rules::Kind::from(&engine.kind)
            == match server.kind {
                super::StoredKind::File => crate::rules::Kind::File,
                super::StoredKind::Directory => crate::rules::Kind::Directory,
                super::StoredKind::Symlink { .. } => crate::rules::Kind::Symlink,
            }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    /// Appends of 1 to 4 ops drawn at random (creates, moves, deletes, links, unlinks, writes,
    /// truncates, attributes; stale bases and wrong base hashes now and then) are accepted by
    /// the server exactly when the engine's tree accepts them, refused for the same rule, and
    /// leave the same objects on both.
    #[test]
    fn the_engine_and_the_server_give_the_same_verdicts(
        appends in proptest::collection::vec(proptest::collection::vec(draw(), 1..6), 1..40),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let backend = Arc::new(Memory::new());
            let storage = Storage::new(
                backend.clone(),
                StorageConfig {
                    max_object_bytes: 1 << 20,
                    history_versions: 2,
                    limits: AppendLimits::default(),
                },
            );
            let mut tree = Tree::new();
            let mut accepted = 0;
            for (k, draws) in appends.iter().enumerate() {
                let mut chain = HashMap::new();
                let mut ops = Vec::new();
                let mut work = tree.clone();
                for d in draws {
                    if let Some(op) = make(d, &work, &chain) {
                        chain.insert(op.object, op.new_version);
                        // What applies shapes the next ops; the verdict is taken below.
                        let _ = work.apply_op(&op);
                        ops.push(op);
                    }
                }
                if ops.is_empty() {
                    continue;
                }
                let mut next = tree.clone();
                let engine = next.apply_transaction(&ops);
                let body = encode_changelog(&ChangeLog {
                    transactions: vec![Transaction {
                        id: [k as u8; 16],
                        device: "d".into(),
                        time_ms: 0,
                        ops: ops.clone(),
                    }],
                });
                let server = storage.append("u", "d", &format!("k{k}"), body.into()).await;
                match (&engine, &server) {
                    (Ok(()), Ok(_)) => {
                        tree = next;
                        accepted += 1;
                    }
                    (Err(e), Err(AppendError::Stale(stale))) => {
                        prop_assert_eq!(stale.first(), Some(e), "{:?}", ops);
                    }
                    (Err(e), Err(AppendError::Refused { rule, .. })) => {
                        prop_assert_eq!(rule, e, "{:?}", ops);
                    }
                    _ => prop_assert!(
                        false,
                        "the engine says {:?}, the server {:?}, to {:?}",
                        engine,
                        server,
                        ops
                    ),
                }
            }
            let (head, objects) = backend.snapshot("u".into()).await.expect("snapshot");
            prop_assert_eq!(head, accepted);
            let server: HashMap<ObjectId, _> = objects
                .into_iter()
                .filter(|o| o.id != ObjectId::ROOT.0)
                .map(|o| (ObjectId(o.id), o))
                .collect();
            prop_assert_eq!(server.len() + 1, tree.len());
            for (id, s) in &server {
                let e = tree.get(*id);
                prop_assert!(
                    e.is_some_and(|e| same_object(e, s)),
                    "object {}: engine {:?}, server {:?}",
                    id,
                    e,
                    s
                );
            }
            Ok(())
        })?;
    }
}
