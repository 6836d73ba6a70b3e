//! The engine's model of one tree: the metadata of every object (no file content, only its
//! hash and size), indexed by id and by (parent, name).
//!
//! What always holds: every entry of the name index points at an object that has that name
//! (an object may have several: hard links; a folder has one); the root folder ([`ObjectId::ROOT`]) is always present and never in the name index.
//! A checked apply ([`Tree::apply_transaction`]) follows the tree rules of [`crate::rules`],
//! the ones the server's storage role follows: base versions, parent exists and is a folder,
//! names free, no cycles, only empty folders deleted, content ops only on files whose current
//! hash is the op's base hash; it changes nothing when it refuses.

use std::collections::{BTreeMap, HashMap};

use crate::changelog::{empty_hash, ContentHash, Name, ObjectId, ObjectKind, Op, OpKind, Version};
use crate::rules::{self, Effect, Facts, TreeView};

/// Why an op does not apply to a tree (the server would refuse it with 409).
pub use crate::rules::RuleError as TreeError;

/// Everything the engine knows about one object (what a snapshot entry of the server holds,
/// minus the content itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectState {
    pub id: ObjectId,
    /// The folder holding the object (the root's parent is the root).
    pub parent: ObjectId,
    /// The entry name in `parent` (empty only for the root).
    pub name: Name,
    /// The object's other names (hard links), sorted; `(parent, name)` is always the least
    /// of all its names, so every device that applies the same ops holds the same first
    /// name. Empty for folders and for most files.
    pub links: Vec<(ObjectId, Name)>,
    pub kind: ObjectKind,
    pub mode: u32,
    pub mtime_ns: i64,
    /// BLAKE3 of the content (files; the empty hash for folders and symlinks).
    pub hash: ContentHash,
    pub size: u64,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The object's version: in the server-known tree, the server's; in the local tree, the
    /// server's plus one per pending local op on it (the base version of the next local op).
    pub version: Version,
    /// The version at which the content last changed (the `?version=` to fetch it by).
    pub content_version: Version,
}

impl ObjectState {
    /// The root folder before any op touched it.
    pub fn root() -> ObjectState {
        ObjectState {
            id: ObjectId::ROOT,
            parent: ObjectId::ROOT,
            name: Name(Vec::new()),
            links: Vec::new(),
            kind: ObjectKind::Directory,
            mode: 0o755,
            mtime_ns: 0,
            hash: empty_hash(),
            size: 0,
            xattrs: BTreeMap::new(),
            version: 0,
            content_version: 0,
        }
    }

    /// The object a `Create` makes (see [`rules::NewObject`]), at `version`.
    pub fn created(id: ObjectId, new: &rules::NewObject<'_>, version: Version) -> ObjectState {
        ObjectState {
            id,
            parent: new.parent,
            name: new.name.clone(),
            links: Vec::new(),
            kind: new.kind.clone(),
            mode: new.mode,
            mtime_ns: new.mtime_ns,
            hash: empty_hash(),
            size: 0,
            xattrs: BTreeMap::new(),
            version,
            content_version: version,
        }
    }

    /// Whether the object is a folder.
    pub fn is_dir(&self) -> bool {
        self.kind == ObjectKind::Directory
    }

    /// Whether the object is a regular file.
    pub fn is_file(&self) -> bool {
        self.kind == ObjectKind::File
    }

    /// Every name of the object, the first one first.
    pub fn names(&self) -> impl Iterator<Item = (ObjectId, &Name)> {
        std::iter::once((self.parent, &self.name)).chain(self.links.iter().map(|(p, n)| (*p, n)))
    }

    /// How many names the object has.
    pub fn name_count(&self) -> usize {
        1 + self.links.len()
    }

    /// Whether `name` in `parent` is one of the object's names.
    pub fn has_name(&self, parent: ObjectId, name: &Name) -> bool {
        self.names().any(|(p, n)| p == parent && n == name)
    }

    /// Replaces the object's names (at least one) and puts them in canonical order.
    pub fn set_names(&mut self, mut names: Vec<(ObjectId, Name)>) {
        names.sort();
        names.dedup();
        if names.is_empty() {
            return;
        }
        let first = names.remove(0);
        self.parent = first.0;
        self.name = first.1;
        self.links = names;
    }
}

/// A tree of objects with a name index.
#[derive(Clone, Debug)]
pub struct Tree {
    objects: HashMap<ObjectId, ObjectState>,
    entries: HashMap<(ObjectId, Name), ObjectId>,
    children: HashMap<ObjectId, usize>,
}

impl Default for Tree {
    fn default() -> Self {
        Tree::new()
    }
}

impl PartialEq for Tree {
    fn eq(&self, other: &Self) -> bool {
        self.objects == other.objects
    }
}

impl Tree {
    /// A tree holding only the root folder.
    pub fn new() -> Tree {
        let mut objects = HashMap::new();
        objects.insert(ObjectId::ROOT, ObjectState::root());
        Tree {
            objects,
            entries: HashMap::new(),
            children: HashMap::new(),
        }
    }

    /// A tree from its objects (the root is added if absent). Entries whose parent is missing
    /// are kept as they are: the tree is trusted (it was persisted by the engine's actions).
    pub fn from_objects(objects: impl IntoIterator<Item = ObjectState>) -> Tree {
        let mut t = Tree::new();
        for o in objects {
            t.put(o);
        }
        t
    }

    pub fn get(&self, id: ObjectId) -> Option<&ObjectState> {
        self.objects.get(&id)
    }

    pub fn contains(&self, id: ObjectId) -> bool {
        self.objects.contains_key(&id)
    }

    /// The current version of `id` (0 when absent).
    pub fn version(&self, id: ObjectId) -> Version {
        self.objects.get(&id).map(|o| o.version).unwrap_or(0)
    }

    /// The child named `name` in `parent`.
    pub fn lookup(&self, parent: ObjectId, name: &Name) -> Option<ObjectId> {
        self.entries.get(&(parent, name.clone())).copied()
    }

    /// Number of children of a folder.
    pub fn child_count(&self, dir: ObjectId) -> usize {
        self.children.get(&dir).copied().unwrap_or(0)
    }

    /// Every object, root included, in no particular order.
    pub fn objects(&self) -> impl Iterator<Item = &ObjectState> {
        self.objects.values()
    }

    /// Every object sorted by id (a stable order for persistence and comparison).
    pub fn sorted_objects(&self) -> Vec<ObjectState> {
        let mut v: Vec<ObjectState> = self.objects.values().cloned().collect();
        v.sort_by_key(|o| o.id);
        v
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.len() <= 1
    }

    /// Whether `ancestor` is `id` or one of its folders (walking up at most `len` steps).
    pub fn is_within(&self, id: ObjectId, ancestor: ObjectId) -> bool {
        let mut at = id;
        for _ in 0..=self.objects.len() {
            if at == ancestor {
                return true;
            }
            if at == ObjectId::ROOT {
                return false;
            }
            match self.objects.get(&at) {
                Some(o) => at = o.parent,
                None => return false,
            }
        }
        false
    }

    /// Depth below the root (the root is 0); bounded by the tree size.
    pub fn depth(&self, id: ObjectId) -> usize {
        let mut at = id;
        let mut d = 0;
        while at != ObjectId::ROOT && d <= self.objects.len() {
            match self.objects.get(&at) {
                Some(o) => at = o.parent,
                None => break,
            }
            d += 1;
        }
        d
    }

    /// Inserts or replaces an object, keeping the indexes right.
    pub fn put(&mut self, o: ObjectState) {
        if o.id == ObjectId::ROOT {
            self.objects.insert(o.id, o);
            return;
        }
        self.remove(o.id);
        for (parent, name) in o.names() {
            self.entries.insert((parent, name.clone()), o.id);
            *self.children.entry(parent).or_insert(0) += 1;
        }
        self.objects.insert(o.id, o);
    }

    /// Removes an object (never the root) and its name entry.
    pub fn remove(&mut self, id: ObjectId) -> Option<ObjectState> {
        if id == ObjectId::ROOT {
            return None;
        }
        let old = self.objects.remove(&id)?;
        for (parent, name) in old.names() {
            let key = (parent, name.clone());
            if self.entries.get(&key) == Some(&id) {
                self.entries.remove(&key);
            }
            if let Some(n) = self.children.get_mut(&parent) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.children.remove(&parent);
                }
            }
        }
        Some(old)
    }

    /// Restores the state an object had (`None`: absent).
    fn restore(&mut self, id: ObjectId, state: Option<ObjectState>) {
        match state {
            Some(s) => self.put(s),
            None => {
                self.remove(id);
            }
        }
    }

    /// Applies all ops of a transaction with the server's checks, or none of them.
    ///
    /// # Errors
    /// The first op that the server would refuse; the tree is unchanged.
    pub fn apply_transaction(&mut self, ops: &[Op]) -> Result<(), TreeError> {
        let mut undo: Vec<(ObjectId, Option<ObjectState>)> = Vec::with_capacity(ops.len());
        for op in ops {
            undo.push((op.object, self.objects.get(&op.object).cloned()));
            if let Err(e) = self.apply_op(op) {
                for (id, prev) in undo.into_iter().rev() {
                    self.restore(id, prev);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Applies one op with the server's checks; unchanged on error.
    ///
    /// # Errors
    /// Why the server would refuse the op.
    pub fn apply_op(&mut self, op: &Op) -> Result<(), TreeError> {
        let effect = rules::check_all(op, self)?;
        self.apply_effect(op, effect);
        Ok(())
    }

    /// Whether the server would accept `op` structurally (everything but the base version).
    ///
    /// # Errors
    /// Why it would refuse.
    pub fn check_op(&self, op: &Op) -> Result<(), TreeError> {
        rules::check(op, self).map(|_| ())
    }

    /// Applies an op without checks (the server already accepted it); ops on a missing object
    /// other than `Create` only move its version.
    pub fn force_op(&mut self, op: &Op) {
        let effect = rules::effect(op, self);
        self.apply_effect(op, effect);
    }

    /// Changes the tree as the rules say `op` does.
    fn apply_effect(&mut self, op: &Op, effect: Effect<'_>) {
        let id = op.object;
        let version = op.new_version;
        match effect {
            Effect::Create(new) => self.put(ObjectState::created(id, &new, version)),
            Effect::Delete => {
                self.remove(id);
            }
            Effect::Names(change) => {
                if let Some(mut s) = self.objects.get(&id).cloned() {
                    s.set_names(change.after);
                    s.version = version;
                    self.put(s);
                }
            }
            Effect::Content(c) => {
                if let Some(s) = self.objects.get_mut(&id) {
                    s.hash = *c.new_hash();
                    s.size = c.new_size();
                    s.version = version;
                    s.content_version = version;
                }
            }
            Effect::Attr(a) => {
                if let Some(s) = self.objects.get_mut(&id) {
                    a.apply(&mut s.mode, &mut s.mtime_ns);
                    s.version = version;
                }
            }
            Effect::Xattr(x) => {
                if let Some(s) = self.objects.get_mut(&id) {
                    x.apply(&mut s.xattrs);
                    s.version = version;
                }
            }
        }
    }
}

/// The engine's tree as the rules read it.
impl TreeView for Tree {
    fn object(&self, id: ObjectId) -> Option<Facts> {
        self.objects.get(&id).map(|o| Facts {
            kind: (&o.kind).into(),
            version: o.version,
            parent: o.parent,
            names: o.name_count(),
        })
    }

    fn child(&self, parent: ObjectId, name: &Name) -> Option<ObjectId> {
        self.lookup(parent, name)
    }

    fn has_children(&self, dir: ObjectId) -> bool {
        self.child_count(dir) > 0
    }

    fn names(&self, id: ObjectId) -> Vec<(ObjectId, Name)> {
        self.objects.get(&id).map_or_else(Vec::new, |o| {
            o.names().map(|(p, n)| (p, n.clone())).collect()
        })
    }

    fn content_hash(&self, id: ObjectId) -> Option<ContentHash> {
        self.objects.get(&id).map(|o| o.hash)
    }
}

/// Whether an op changes a file's content.
pub fn is_content_op(kind: &OpKind) -> bool {
    matches!(kind, OpKind::Write { .. } | OpKind::Truncate { .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(object: ObjectId, base: Version, kind: OpKind) -> Op {
        Op {
            object,
            base_version: base,
            new_version: base + 1,
            kind,
        }
    }

    fn n(s: &str) -> Name {
        Name::new(s.as_bytes().to_vec()).expect("valid")
    }

    fn create(id: ObjectId, parent: ObjectId, name: &str, kind: ObjectKind) -> Op {
        op(
            id,
            0,
            OpKind::Create {
                parent,
                name: n(name),
                kind,
                mode: 0o644,
                mtime_ns: 0,
            },
        )
    }

    #[test]
    fn names_link_unlink_and_stay_canonical_whatever_their_order() {
        let f = ObjectId([1; 16]);
        let d = ObjectId([2; 16]);
        let mut t = Tree::new();
        t.apply_op(&create(d, ObjectId::ROOT, "d", ObjectKind::Directory))
            .unwrap();
        t.apply_op(&create(f, ObjectId::ROOT, "z", ObjectKind::File))
            .unwrap();
        let link = |base, parent, name: &str| {
            op(
                f,
                base,
                OpKind::Link {
                    parent,
                    name: n(name),
                },
            )
        };
        t.apply_op(&link(1, d, "b")).unwrap();
        t.apply_op(&link(2, ObjectId::ROOT, "a")).unwrap();
        let s = t.get(f).unwrap();
        assert_eq!((s.parent, s.name.clone()), (ObjectId::ROOT, n("a")));
        assert_eq!(s.name_count(), 3);
        assert_eq!(t.lookup(d, &n("b")), Some(f));
        assert_eq!(t.child_count(d), 1);
        // A name that is taken, a folder's second name, a rename of several names: refused.
        assert!(matches!(
            t.apply_op(&link(3, ObjectId::ROOT, "d")),
            Err(TreeError::NameTaken { .. })
        ));
        assert!(matches!(
            t.apply_op(&op(
                d,
                1,
                OpKind::Link {
                    parent: ObjectId::ROOT,
                    name: n("d2")
                }
            )),
            Err(TreeError::FolderLink(_))
        ));
        assert!(matches!(
            t.apply_op(&op(
                f,
                3,
                OpKind::Rename {
                    new_parent: ObjectId::ROOT,
                    new_name: n("y")
                }
            )),
            Err(TreeError::SeveralNames(_))
        ));
        // The folder holding a name is not empty.
        assert!(matches!(
            t.apply_op(&op(d, 1, OpKind::Delete)),
            Err(TreeError::NotEmpty(_))
        ));
        let unlink = |base, parent, name: &str| {
            op(
                f,
                base,
                OpKind::Unlink {
                    parent,
                    name: n(name),
                },
            )
        };
        t.apply_op(&unlink(3, ObjectId::ROOT, "a")).unwrap();
        assert_eq!(t.get(f).unwrap().name, n("z"));
        assert_eq!(t.lookup(ObjectId::ROOT, &n("a")), None);
        assert!(matches!(
            t.apply_op(&unlink(4, ObjectId::ROOT, "a")),
            Err(TreeError::NoSuchName { .. })
        ));
        t.apply_op(&unlink(4, d, "b")).unwrap();
        assert!(matches!(
            t.apply_op(&unlink(5, ObjectId::ROOT, "z")),
            Err(TreeError::LastName(_))
        ));
        assert_eq!(t.child_count(d), 0);
        t.apply_op(&op(d, 1, OpKind::Delete)).unwrap();
        // Delete takes every name.
        t.apply_op(&link(5, ObjectId::ROOT, "w")).unwrap();
        t.apply_op(&op(f, 6, OpKind::Delete)).unwrap();
        assert_eq!(t.lookup(ObjectId::ROOT, &n("w")), None);
        assert_eq!(t.lookup(ObjectId::ROOT, &n("z")), None);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_refused_link_changes_nothing() {
        let f = ObjectId([1; 16]);
        let mut t = Tree::new();
        t.apply_op(&create(f, ObjectId::ROOT, "f", ObjectKind::File))
            .unwrap();
        let before = t.clone();
        let bad = [
            op(
                f,
                1,
                OpKind::Link {
                    parent: ObjectId::ROOT,
                    name: n("g"),
                },
            ),
            op(
                f,
                2,
                OpKind::Link {
                    parent: ObjectId([9; 16]),
                    name: n("h"),
                },
            ),
        ];
        assert!(t.apply_transaction(&bad).is_err());
        assert_eq!(t, before);
        assert_eq!(t.lookup(ObjectId::ROOT, &n("g")), None);
    }
}
