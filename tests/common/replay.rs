//! The outbox of a mount, decoded and replayed onto an empty tree with the tree rules the
//! server and the engine share (`deltadrive::rules`, through `deltadrive::engine::Tree`), to
//! compare with the mounted tree.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use deltadrive::changelog::{decode_transaction, ObjectId, ObjectKind, OpKind, Transaction};
use deltadrive::rules::ContentChange;
use deltadrive::store::Store;

use super::Mounted;

/// The outbox of a home, decoded (works while the daemon runs: read-only open).
pub fn outbox(home: &Path) -> Vec<Transaction> {
    let s = Store::open_read_only(&home.join("db"), &home.join("content")).expect("open store");
    s.outbox()
        .unwrap()
        .into_iter()
        .map(|(_, b)| decode_transaction(&b).expect("outbox entries decode"))
        .collect()
}

/// Objects with pending (unsealed) changes in a home.
pub fn pending(home: &Path) -> usize {
    let s = Store::open_read_only(&home.join("db"), &home.join("content")).expect("open store");
    s.pending().unwrap().len()
}

#[derive(Clone, Debug)]
pub struct Obj {
    pub parent: ObjectId,
    pub name: Vec<u8>,
    /// Other names (hard links).
    pub links: Vec<(ObjectId, Vec<u8>)>,
    pub kind: ObjectKind,
    pub content: Vec<u8>,
    pub version: u64,
}

/// Applies transactions to a model of the server's tree, with the rules the server and the
/// engine share (`deltadrive::rules`, through `deltadrive::engine::Tree`), and keeps each
/// file's content.
pub fn replay(txs: &[Transaction]) -> HashMap<ObjectId, Obj> {
    let mut tree = deltadrive::engine::Tree::new();
    let mut content: HashMap<ObjectId, Vec<u8>> = HashMap::new();
    for tx in txs {
        for op in &tx.ops {
            tree.apply_op(op)
                .unwrap_or_else(|e| panic!("the server would refuse {op:?}: {e}"));
            match &op.kind {
                OpKind::Create { .. } => {
                    content.insert(op.object, Vec::new());
                }
                OpKind::Delete => {
                    content.remove(&op.object);
                }
                kind => {
                    if let Some(change) = ContentChange::of(kind) {
                        let c = content.entry(op.object).or_default();
                        *c = change
                            .apply_to(op.object, std::mem::take(c), 1 << 32)
                            .unwrap_or_else(|e| panic!("content op does not apply: {e}"));
                    }
                }
            }
        }
    }
    tree.objects()
        .filter(|o| o.id != ObjectId::ROOT)
        .map(|o| {
            (
                o.id,
                Obj {
                    parent: o.parent,
                    name: o.name.0.clone(),
                    links: o.links.iter().map(|(p, n)| (*p, n.0.clone())).collect(),
                    kind: o.kind.clone(),
                    content: content.get(&o.id).cloned().unwrap_or_default(),
                    version: o.version,
                },
            )
        })
        .collect()
}

/// A tree: path → Some(content) for files, None for folders, Some(target) for symlinks.
pub type Tree = BTreeMap<String, Option<Vec<u8>>>;

/// The tree of a replayed model.
pub fn model_tree(m: &HashMap<ObjectId, Obj>) -> Tree {
    // Folders have one name; a file may have several (each is a path of the tree).
    let path_of = |parent: ObjectId, name: &[u8]| {
        let mut parts = vec![String::from_utf8_lossy(name).into_owned()];
        let mut id = parent;
        while id != ObjectId::ROOT {
            let o = &m[&id];
            parts.push(String::from_utf8_lossy(&o.name).into_owned());
            id = o.parent;
        }
        parts.reverse();
        parts.join("/")
    };
    let mut out = BTreeMap::new();
    for o in m.values() {
        let v = match &o.kind {
            ObjectKind::Directory => None,
            ObjectKind::File => Some(o.content.clone()),
            ObjectKind::Symlink { target } => Some(target.clone()),
        };
        let names = std::iter::once((o.parent, o.name.as_slice()))
            .chain(o.links.iter().map(|(p, n)| (*p, n.as_slice())));
        for (parent, name) in names {
            let path = path_of(parent, name);
            assert!(
                out.insert(path.clone(), v.clone()).is_none(),
                "two objects at {path} after replay"
            );
        }
    }
    out
}

/// The mounted tree, without the paths `skip` says (and nothing below a skipped folder).
pub fn disk_tree(root: &Path, skip: &dyn Fn(&str) -> bool) -> Tree {
    fn walk(root: &Path, dir: &Path, skip: &dyn Fn(&str) -> bool, out: &mut Tree) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if skip(&rel) {
                continue;
            }
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                out.insert(rel, None);
                walk(root, &p, skip, out);
            } else if ft.is_symlink() {
                let t = fs::read_link(&p).unwrap().into_os_string();
                out.insert(rel, Some(t.into_encoded_bytes()));
            } else {
                out.insert(rel, Some(fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, skip, &mut out);
    out
}

fn summary(t: &Tree) -> Vec<String> {
    t.iter()
        .map(|(k, v)| {
            format!(
                "{k}: {:?}",
                v.as_ref()
                    .map(|c| (c.len(), blake3::hash(c).to_hex()[..8].to_string()))
            )
        })
        .collect()
}

/// Replays the outbox and asserts it gives the mounted tree less the `skip`ped paths.
pub fn assert_replay_matches_except(m: &Mounted, skip: &dyn Fn(&str) -> bool) -> Vec<Transaction> {
    let txs = outbox(&m.home);
    for (i, t) in txs.iter().enumerate() {
        let ops: Vec<&OpKind> = t.ops.iter().map(|o| &o.kind).collect();
        eprintln!("outbox[{i}]: {:?}", kinds(&ops));
    }
    let model = model_tree(&replay(&txs));
    let disk = disk_tree(&m.mp, skip);
    assert_eq!(
        summary(&model),
        summary(&disk),
        "replaying the outbox reproduces the mounted tree"
    );
    txs
}

/// Op kinds without payloads, for assertion messages.
pub fn kinds(ops: &[&OpKind]) -> Vec<String> {
    ops.iter()
        .map(|k| match k {
            OpKind::Create { name, .. } => format!("Create({name})"),
            OpKind::Write {
                new_size, delta, ..
            } => format!(
                "Write({new_size}, {:?})",
                deltadrive::delta::Strategy::of(delta)
            ),
            OpKind::Rename { new_name, .. } => format!("Rename({new_name})"),
            OpKind::Delete => "Delete".into(),
            other => format!("{:?}", std::mem::discriminant(*other)),
        })
        .collect()
}

/// All ops of some transactions, flattened.
pub fn all_ops(txs: &[Transaction]) -> Vec<&deltadrive::changelog::Op> {
    txs.iter().flat_map(|t| &t.ops).collect()
}

/// The names created by some transactions.
pub fn created_names(txs: &[Transaction]) -> Vec<String> {
    all_ops(txs)
        .iter()
        .filter_map(|o| match &o.kind {
            OpKind::Create { name, .. } => Some(String::from_utf8_lossy(&name.0).into_owned()),
            _ => None,
        })
        .collect()
}

/// The object created under `name` (the first such Create).
pub fn object_of(txs: &[Transaction], name: &str) -> ObjectId {
    all_ops(txs)
        .iter()
        .find_map(|o| match &o.kind {
            OpKind::Create { name: n, .. } if n.0 == name.as_bytes() => Some(o.object),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Create of {name}"))
}

/// The ops on one object.
pub fn ops_on(txs: &[Transaction], object: ObjectId) -> Vec<&OpKind> {
    all_ops(txs)
        .into_iter()
        .filter(|o| o.object == object)
        .map(|o| &o.kind)
        .collect()
}

/// Unmounts (sealing everything left) and mounts again.
pub fn settle(m: &mut Mounted) {
    m.unmount();
    m.mount();
}
