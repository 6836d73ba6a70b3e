//! The engine's model of one tree: the metadata of every object (no file content, only its
//! hash and size), indexed by id and by (parent, name).
//!
//! What always holds: every entry of the name index points at an object that has that name
//! (an object may have several: hard links; a folder has one); the root folder ([`ObjectId::ROOT`]) is always present and never in the name index.
//! A checked apply ([`Tree::apply_transaction`]) enforces the same rules as the server's
//! storage role (`src/server/storage.rs`): base versions, parent exists and is a folder, names
//! free, no cycles, only empty folders deleted, content ops only on files whose current hash is
//! the op's base hash; it changes nothing when it refuses.

use std::collections::{BTreeMap, HashMap};

use crate::changelog::{empty_hash, ContentHash, Name, ObjectId, ObjectKind, Op, OpKind, Version};

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

    /// Adds a name (kept canonical).
    pub fn add_name(&mut self, parent: ObjectId, name: Name) {
        let mut all: Vec<(ObjectId, Name)> = self.names().map(|(p, n)| (p, n.clone())).collect();
        all.push((parent, name));
        self.set_names(all);
    }

    /// Removes a name, unless it is the last one (kept canonical).
    pub fn remove_name(&mut self, parent: ObjectId, name: &Name) {
        let all: Vec<(ObjectId, Name)> = self
            .names()
            .filter(|(p, n)| !(*p == parent && *n == name))
            .map(|(p, n)| (p, n.clone()))
            .collect();
        self.set_names(all);
    }
}

/// Why an op does not apply to a tree (the server would refuse it with 409).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    #[error("object {object}: stale base version {base} (current {current})")]
    StaleBase {
        object: ObjectId,
        base: Version,
        current: Version,
    },
    #[error("object {0} does not exist")]
    Missing(ObjectId),
    #[error("object {0} already exists")]
    Exists(ObjectId),
    #[error("parent {0} does not exist or is not a folder")]
    BadParent(ObjectId),
    #[error("name {name} is taken in folder {parent}")]
    NameTaken { parent: ObjectId, name: Name },
    #[error("moving {0} would put a folder inside itself")]
    Cycle(ObjectId),
    #[error("folder {0} is not empty")]
    NotEmpty(ObjectId),
    #[error("object {0} is not a file")]
    NotAFile(ObjectId),
    #[error("object {0}: the content op's base hash is not the current content")]
    BaseHash(ObjectId),
    #[error("the root folder cannot be created, renamed, written or deleted")]
    Root,
    #[error("object {0} is a folder: a folder has exactly one name")]
    FolderLink(ObjectId),
    #[error("object {object} has no name {name} in folder {parent}")]
    NoSuchName {
        object: ObjectId,
        parent: ObjectId,
        name: Name,
    },
    #[error("object {0}: its last name goes with a delete, not an unlink")]
    LastName(ObjectId),
    #[error("object {0} has several names: one of them moves by link and unlink")]
    SeveralNames(ObjectId),
}

impl TreeError {
    /// The object the refusal is about.
    pub fn object(&self) -> Option<ObjectId> {
        match self {
            TreeError::StaleBase { object, .. } | TreeError::NoSuchName { object, .. } => {
                Some(*object)
            }
            TreeError::Missing(o)
            | TreeError::Exists(o)
            | TreeError::Cycle(o)
            | TreeError::NotEmpty(o)
            | TreeError::NotAFile(o)
            | TreeError::BaseHash(o)
            | TreeError::FolderLink(o)
            | TreeError::LastName(o)
            | TreeError::SeveralNames(o)
            | TreeError::BadParent(o) => Some(*o),
            TreeError::NameTaken { .. } | TreeError::Root => None,
        }
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
        let current = self.version(op.object);
        if current != op.base_version {
            return Err(TreeError::StaleBase {
                object: op.object,
                base: op.base_version,
                current,
            });
        }
        self.check_op(op)?;
        self.force_op(op);
        Ok(())
    }

    /// Whether the server would accept `op` structurally (everything but the base version).
    ///
    /// # Errors
    /// Why it would refuse.
    pub fn check_op(&self, op: &Op) -> Result<(), TreeError> {
        let id = op.object;
        let is_root = id == ObjectId::ROOT;
        let existing = self.objects.get(&id);
        match &op.kind {
            OpKind::Create { parent, name, .. } => {
                if is_root {
                    return Err(TreeError::Root);
                }
                if existing.is_some() {
                    return Err(TreeError::Exists(id));
                }
                self.check_parent(*parent)?;
                if self.lookup(*parent, name).is_some() {
                    return Err(TreeError::NameTaken {
                        parent: *parent,
                        name: name.clone(),
                    });
                }
            }
            OpKind::Write { base_hash, .. } => {
                let s = existing.ok_or(TreeError::Missing(id))?;
                if !s.is_file() {
                    return Err(TreeError::NotAFile(id));
                }
                if s.hash != *base_hash {
                    return Err(TreeError::BaseHash(id));
                }
            }
            OpKind::Truncate { .. } => {
                let s = existing.ok_or(TreeError::Missing(id))?;
                if !s.is_file() {
                    return Err(TreeError::NotAFile(id));
                }
            }
            OpKind::Rename {
                new_parent,
                new_name,
            } => {
                if is_root {
                    return Err(TreeError::Root);
                }
                let s = existing.ok_or(TreeError::Missing(id))?;
                if s.name_count() > 1 {
                    return Err(TreeError::SeveralNames(id));
                }
                self.check_parent(*new_parent)?;
                let same = s.parent == *new_parent && s.name == *new_name;
                if !same && self.lookup(*new_parent, new_name).is_some() {
                    return Err(TreeError::NameTaken {
                        parent: *new_parent,
                        name: new_name.clone(),
                    });
                }
                if self.is_within(*new_parent, id) {
                    return Err(TreeError::Cycle(id));
                }
            }
            OpKind::Delete => {
                if is_root {
                    return Err(TreeError::Root);
                }
                let s = existing.ok_or(TreeError::Missing(id))?;
                if s.is_dir() && self.child_count(id) > 0 {
                    return Err(TreeError::NotEmpty(id));
                }
            }
            OpKind::SetAttr { .. } | OpKind::SetXattr { .. } | OpKind::RemoveXattr { .. } => {
                if existing.is_none() {
                    return Err(TreeError::Missing(id));
                }
            }
            OpKind::Link { parent, name } => {
                if is_root {
                    return Err(TreeError::Root);
                }
                let s = existing.ok_or(TreeError::Missing(id))?;
                if s.is_dir() {
                    return Err(TreeError::FolderLink(id));
                }
                self.check_parent(*parent)?;
                if self.lookup(*parent, name).is_some() {
                    return Err(TreeError::NameTaken {
                        parent: *parent,
                        name: name.clone(),
                    });
                }
            }
            OpKind::Unlink { parent, name } => {
                if is_root {
                    return Err(TreeError::Root);
                }
                let s = existing.ok_or(TreeError::Missing(id))?;
                if !s.has_name(*parent, name) {
                    return Err(TreeError::NoSuchName {
                        object: id,
                        parent: *parent,
                        name: name.clone(),
                    });
                }
                if s.name_count() < 2 {
                    return Err(TreeError::LastName(id));
                }
            }
        }
        Ok(())
    }

    fn check_parent(&self, parent: ObjectId) -> Result<(), TreeError> {
        match self.objects.get(&parent) {
            Some(p) if p.is_dir() => Ok(()),
            _ => Err(TreeError::BadParent(parent)),
        }
    }

    /// Applies an op without checks (the server already accepted it); ops on a missing object
    /// other than `Create` only move its version.
    pub fn force_op(&mut self, op: &Op) {
        let id = op.object;
        let version = op.new_version;
        match &op.kind {
            OpKind::Create {
                parent,
                name,
                kind,
                mode,
                mtime_ns,
            } => {
                self.put(ObjectState {
                    id,
                    parent: *parent,
                    name: name.clone(),
                    links: Vec::new(),
                    kind: kind.clone(),
                    mode: *mode,
                    mtime_ns: *mtime_ns,
                    hash: empty_hash(),
                    size: 0,
                    xattrs: BTreeMap::new(),
                    version,
                    content_version: version,
                });
            }
            OpKind::Delete => {
                self.remove(id);
            }
            OpKind::Rename {
                new_parent,
                new_name,
            } => {
                if let Some(mut s) = self.objects.get(&id).cloned() {
                    s.parent = *new_parent;
                    s.name = new_name.clone();
                    s.version = version;
                    self.put(s);
                }
            }
            OpKind::Link { parent, name } => {
                if let Some(mut s) = self.objects.get(&id).cloned() {
                    s.add_name(*parent, name.clone());
                    s.version = version;
                    self.put(s);
                }
            }
            OpKind::Unlink { parent, name } => {
                if let Some(mut s) = self.objects.get(&id).cloned() {
                    s.remove_name(*parent, name);
                    s.version = version;
                    self.put(s);
                }
            }
            other => {
                if let Some(s) = self.objects.get_mut(&id) {
                    s.version = version;
                    match other {
                        OpKind::Write {
                            new_hash, new_size, ..
                        } => {
                            s.hash = *new_hash;
                            s.size = *new_size;
                            s.content_version = version;
                        }
                        OpKind::Truncate { new_size, new_hash } => {
                            s.hash = *new_hash;
                            s.size = *new_size;
                            s.content_version = version;
                        }
                        OpKind::SetAttr { mode, mtime_ns } => {
                            if let Some(m) = mode {
                                s.mode = *m;
                            }
                            if let Some(t) = mtime_ns {
                                s.mtime_ns = *t;
                            }
                        }
                        OpKind::SetXattr { name, value } => {
                            s.xattrs.insert(name.clone(), value.clone());
                        }
                        OpKind::RemoveXattr { name } => {
                            s.xattrs.remove(name);
                        }
                        OpKind::Create { .. }
                        | OpKind::Delete
                        | OpKind::Rename { .. }
                        | OpKind::Link { .. }
                        | OpKind::Unlink { .. } => {}
                    }
                }
            }
        }
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
