//! The tree rules, written once: whether one op of a change log applies to a tree, and what it
//! changes there.
//!
//! Every copy of a user's tree follows these rules: the server's storage role over the committed
//! state (`server/storage.rs`), the engine's trees (`engine/tree.rs`), and the tests' models
//! (`tests/simulation.rs`; `tests/common/replay.rs` through the engine). Each keeps its own data
//! structure, seen through [`TreeView`], and its own way of changing it, told by [`Effect`].
//! Pure: no I/O, no locks, no clock, no async (the server loads what a check reads first).
//!
//! What always holds, for a tree that held it before an op [`check`] accepted and whose
//! [`Effect`] was applied: every name points at exactly one object and every object has at
//! least one name (the root folder none); a folder has exactly one name, lives in a folder and
//! is never inside itself; a folder is deleted only when empty; content changes only on files,
//! from the content the op was made against. A refusal is a [`RuleError`]: the server answers
//! it with 409 (`server/api/`), the engine refuses the transaction with it.

use std::fmt;

use crate::changelog::{ContentHash, Delta, Name, ObjectId, ObjectKind, Op, OpKind, Version};

pub mod content;

#[cfg(test)]
mod tests;

/// How far a folder chain is followed before the tree is taken as broken.
pub const MAX_DEPTH: usize = 100_000;

/// The kind of an object, as the rules see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Directory,
    Symlink,
}

impl From<&ObjectKind> for Kind {
    fn from(k: &ObjectKind) -> Kind {
        match k {
            ObjectKind::File => Kind::File,
            ObjectKind::Directory => Kind::Directory,
            ObjectKind::Symlink { .. } => Kind::Symlink,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::File => "file",
            Kind::Directory => "directory",
            Kind::Symlink => "symlink",
        })
    }
}

/// Which content op met something that is not a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentOp {
    Write,
    Truncate,
}

/// What the rules need to know of one object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Facts {
    pub kind: Kind,
    /// The object's current version (the base the next op on it must name).
    pub version: Version,
    /// The folder of its first name (the root's parent is the root).
    pub parent: ObjectId,
    /// How many names it has (1 for folders; more for a file with hard links).
    pub names: usize,
}

/// A tree as the rules read it. The root folder ([`ObjectId::ROOT`]) is always present, as a
/// folder, and has no name.
pub trait TreeView {
    /// The object's facts; `None` when it does not exist.
    fn object(&self, id: ObjectId) -> Option<Facts>;
    /// The object named `name` in folder `parent`.
    fn child(&self, parent: ObjectId, name: &Name) -> Option<ObjectId>;
    /// Whether folder `dir` holds at least one name.
    fn has_children(&self, dir: ObjectId) -> bool;
    /// Every name of the object, in any order (only read for `Rename`, `Link`, `Unlink`).
    fn names(&self, id: ObjectId) -> Vec<(ObjectId, Name)>;
    /// The hash of a file's current content (only read for `Write`).
    fn content_hash(&self, id: ObjectId) -> Option<ContentHash>;
}

/// Why an op does not apply to a tree. The messages are the device's (engine logs, set-aside
/// reasons); the server words its 409 bodies in `server/api/`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
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
    /// `found`: what the parent is when it is not a folder (`None`: it does not exist).
    #[error("parent {parent} does not exist or is not a folder")]
    BadParent {
        parent: ObjectId,
        found: Option<Kind>,
    },
    #[error("name {name} is taken in folder {parent}")]
    NameTaken { parent: ObjectId, name: Name },
    #[error("moving {0} would put a folder inside itself")]
    Cycle(ObjectId),
    /// The new parent's folder chain reaches an object that does not exist (a broken tree).
    #[error("moving {object}: folder {missing} on the path does not exist")]
    BrokenPath { object: ObjectId, missing: ObjectId },
    /// The new parent's folder chain is longer than [`MAX_DEPTH`] (a broken tree).
    #[error("moving {0}: the folder chain is too deep")]
    TooDeep(ObjectId),
    #[error("folder {0} is not empty")]
    NotEmpty(ObjectId),
    #[error("object {object} is not a file")]
    NotAFile {
        object: ObjectId,
        kind: Kind,
        op: ContentOp,
    },
    #[error("object {0}: the content op's base hash is not the current content")]
    BaseHash(ObjectId),
    /// `action` says what the op wanted of the root ("be created", "lose its name", ...).
    #[error("the root folder cannot be created, renamed, written or deleted")]
    Root { action: &'static str },
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

impl RuleError {
    /// The object the refusal is about.
    pub fn object(&self) -> Option<ObjectId> {
        match self {
            RuleError::StaleBase { object, .. }
            | RuleError::NoSuchName { object, .. }
            | RuleError::NotAFile { object, .. }
            | RuleError::BrokenPath { object, .. } => Some(*object),
            RuleError::BadParent { parent, .. } => Some(*parent),
            RuleError::Missing(o)
            | RuleError::Exists(o)
            | RuleError::Cycle(o)
            | RuleError::TooDeep(o)
            | RuleError::NotEmpty(o)
            | RuleError::BaseHash(o)
            | RuleError::FolderLink(o)
            | RuleError::LastName(o)
            | RuleError::SeveralNames(o) => Some(*o),
            RuleError::NameTaken { .. } | RuleError::Root { .. } => None,
        }
    }
}

/// A new object, as a `Create` makes it (no content yet, version = the op's new version).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewObject<'op> {
    pub parent: ObjectId,
    pub name: &'op Name,
    pub kind: &'op ObjectKind,
    pub mode: u32,
    pub mtime_ns: i64,
}

/// A name in a folder: (folder, name).
pub type NameIn = (ObjectId, Name);

/// An object's names before and after a `Rename`, `Link` or `Unlink`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameChange {
    /// Its names before, sorted.
    pub before: Vec<(ObjectId, Name)>,
    /// Its names after, sorted: the first is the one every tree keeps as its first name (its
    /// parent and name), the others are its links. Empty only in the unchecked effect of an
    /// unlink of the last name (which [`check`] refuses).
    pub after: Vec<(ObjectId, Name)>,
}

impl NameChange {
    /// The first name after the change, and the others (hard links), sorted.
    pub fn split(&self) -> Option<(&NameIn, &[NameIn])> {
        self.after.split_first()
    }

    /// Names the object had and no longer has.
    pub fn removed(&self) -> impl Iterator<Item = &(ObjectId, Name)> {
        self.before.iter().filter(|n| !self.after.contains(n))
    }

    /// Names the object did not have and now has.
    pub fn added(&self) -> impl Iterator<Item = &(ObjectId, Name)> {
        self.after.iter().filter(|n| !self.before.contains(n))
    }
}

/// A file's new content, as a `Write` or `Truncate` describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentChange<'op> {
    /// A delta against the content whose hash is `base_hash`.
    Write {
        base_hash: &'op ContentHash,
        delta: &'op Delta,
        new_size: u64,
        new_hash: &'op ContentHash,
    },
    /// The content cut or extended with zeros to `new_size`.
    Truncate {
        new_size: u64,
        new_hash: &'op ContentHash,
    },
}

impl ContentChange<'_> {
    pub fn new_size(&self) -> u64 {
        match self {
            ContentChange::Write { new_size, .. } | ContentChange::Truncate { new_size, .. } => {
                *new_size
            }
        }
    }

    pub fn new_hash(&self) -> &ContentHash {
        match self {
            ContentChange::Write { new_hash, .. } | ContentChange::Truncate { new_hash, .. } => {
                new_hash
            }
        }
    }
}

/// Attributes an op sets (`None`: unchanged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttrChange {
    pub mode: Option<u32>,
    pub mtime_ns: Option<i64>,
}

impl AttrChange {
    /// Sets the attributes the change names.
    pub fn apply(&self, mode: &mut u32, mtime_ns: &mut i64) {
        if let Some(m) = self.mode {
            *mode = m;
        }
        if let Some(t) = self.mtime_ns {
            *mtime_ns = t;
        }
    }
}

/// An extended attribute set (`value` given) or removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XattrChange<'op> {
    pub name: &'op [u8],
    pub value: Option<&'op [u8]>,
}

impl XattrChange<'_> {
    /// Changes `xattrs` as the op says.
    pub fn apply(&self, xattrs: &mut std::collections::BTreeMap<Vec<u8>, Vec<u8>>) {
        match self.value {
            Some(v) => {
                xattrs.insert(self.name.to_vec(), v.to_vec());
            }
            None => {
                xattrs.remove(self.name);
            }
        }
    }
}

/// What an op changes in a tree. Every effect but [`Effect::Delete`] leaves the object at the
/// op's new version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect<'op> {
    /// A new object with one name.
    Create(NewObject<'op>),
    /// The object's names change (`Rename`, `Link`, `Unlink`).
    Names(NameChange),
    /// The object goes, with every name it has.
    Delete,
    /// The file's content changes.
    Content(ContentChange<'op>),
    Attr(AttrChange),
    Xattr(XattrChange<'op>),
}

/// Checks the op's base version against the object's current version (0: absent).
///
/// # Errors
/// [`RuleError::StaleBase`].
pub fn check_base(op: &Op, view: &impl TreeView) -> Result<(), RuleError> {
    let current = view.object(op.object).map_or(0, |o| o.version);
    if current != op.base_version {
        return Err(RuleError::StaleBase {
            object: op.object,
            base: op.base_version,
            current,
        });
    }
    Ok(())
}

/// Checks the base version, then [`check`].
///
/// # Errors
/// The first rule the op breaks.
pub fn check_all<'op>(op: &'op Op, view: &impl TreeView) -> Result<Effect<'op>, RuleError> {
    check_base(op, view)?;
    check(op, view)
}

/// Whether `op` applies to the tree, everything but its base version (see [`check_base`]),
/// and what it changes there.
///
/// # Errors
/// The first rule the op breaks, in this order: the root folder, the object's existence and
/// kind, the parent, the name, then cycles, emptiness, names and base hashes.
pub fn check<'op>(op: &'op Op, view: &impl TreeView) -> Result<Effect<'op>, RuleError> {
    let id = op.object;
    let root = |action| {
        if id == ObjectId::ROOT {
            Err(RuleError::Root { action })
        } else {
            Ok(())
        }
    };
    let existing = || view.object(id).ok_or(RuleError::Missing(id));
    match &op.kind {
        OpKind::Create { parent, name, .. } => {
            root("be created")?;
            if view.object(id).is_some() {
                return Err(RuleError::Exists(id));
            }
            check_parent(view, *parent)?;
            check_free(view, *parent, name)?;
        }
        OpKind::Write { base_hash, .. } => {
            let s = existing()?;
            check_file(id, &s, ContentOp::Write)?;
            if view.content_hash(id).as_ref() != Some(base_hash) {
                return Err(RuleError::BaseHash(id));
            }
        }
        OpKind::Truncate { .. } => check_file(id, &existing()?, ContentOp::Truncate)?,
        OpKind::Rename {
            new_parent,
            new_name,
        } => {
            root("be renamed")?;
            let s = existing()?;
            if s.names > 1 {
                return Err(RuleError::SeveralNames(id));
            }
            check_parent(view, *new_parent)?;
            if view.names(id) != [(*new_parent, new_name.clone())] {
                check_free(view, *new_parent, new_name)?;
            }
            check_no_cycle(view, id, *new_parent)?;
        }
        OpKind::Delete => {
            root("be deleted")?;
            let s = existing()?;
            if s.kind == Kind::Directory && view.has_children(id) {
                return Err(RuleError::NotEmpty(id));
            }
        }
        OpKind::SetAttr { .. } | OpKind::SetXattr { .. } | OpKind::RemoveXattr { .. } => {
            existing()?;
        }
        OpKind::Link { parent, name } => {
            root("have another name")?;
            if existing()?.kind == Kind::Directory {
                return Err(RuleError::FolderLink(id));
            }
            check_parent(view, *parent)?;
            check_free(view, *parent, name)?;
        }
        OpKind::Unlink { parent, name } => {
            root("lose its name")?;
            let s = existing()?;
            if !view.names(id).iter().any(|(p, n)| p == parent && n == name) {
                return Err(RuleError::NoSuchName {
                    object: id,
                    parent: *parent,
                    name: name.clone(),
                });
            }
            if s.names < 2 {
                return Err(RuleError::LastName(id));
            }
        }
    }
    Ok(effect(op, view))
}

/// What `op` changes, without checking it (an op the server already accepted). The names of
/// an absent object are taken as none.
pub fn effect<'op>(op: &'op Op, view: &impl TreeView) -> Effect<'op> {
    let names = || {
        let mut v = view.names(op.object);
        v.sort();
        v
    };
    let (before, mut after) = match &op.kind {
        // The first name moves (an object with other names only moves so unchecked).
        OpKind::Rename {
            new_parent,
            new_name,
        } => {
            let before = names();
            let mut after: Vec<(ObjectId, Name)> = before.iter().skip(1).cloned().collect();
            after.push((*new_parent, new_name.clone()));
            (before, after)
        }
        OpKind::Link { parent, name } => {
            let before = names();
            let mut after = before.clone();
            after.push((*parent, name.clone()));
            (before, after)
        }
        OpKind::Unlink { parent, name } => {
            let before = names();
            let after = before
                .iter()
                .filter(|(p, n)| !(p == parent && n == name))
                .cloned()
                .collect();
            (before, after)
        }
        other => match effect_of_kind(other) {
            Some(e) => return e,
            None => unreachable!("the ops that change names are matched above"),
        },
    };
    after.sort();
    after.dedup();
    Effect::Names(NameChange { before, after })
}

/// The effect of an op that does not change names (`None` for `Rename`, `Link`, `Unlink`).
fn effect_of_kind(kind: &OpKind) -> Option<Effect<'_>> {
    Some(match kind {
        OpKind::Create {
            parent,
            name,
            kind,
            mode,
            mtime_ns,
        } => Effect::Create(NewObject {
            parent: *parent,
            name,
            kind,
            mode: *mode,
            mtime_ns: *mtime_ns,
        }),
        OpKind::Write {
            base_hash,
            new_hash,
            new_size,
            delta,
        } => Effect::Content(ContentChange::Write {
            base_hash,
            delta,
            new_size: *new_size,
            new_hash,
        }),
        OpKind::Truncate { new_size, new_hash } => Effect::Content(ContentChange::Truncate {
            new_size: *new_size,
            new_hash,
        }),
        OpKind::Delete => Effect::Delete,
        OpKind::SetAttr { mode, mtime_ns } => Effect::Attr(AttrChange {
            mode: *mode,
            mtime_ns: *mtime_ns,
        }),
        OpKind::SetXattr { name, value } => Effect::Xattr(XattrChange {
            name,
            value: Some(value),
        }),
        OpKind::RemoveXattr { name } => Effect::Xattr(XattrChange { name, value: None }),
        OpKind::Rename { .. } | OpKind::Link { .. } | OpKind::Unlink { .. } => return None,
    })
}

fn check_file(id: ObjectId, s: &Facts, op: ContentOp) -> Result<(), RuleError> {
    if s.kind != Kind::File {
        return Err(RuleError::NotAFile {
            object: id,
            kind: s.kind,
            op,
        });
    }
    Ok(())
}

fn check_parent(view: &impl TreeView, parent: ObjectId) -> Result<(), RuleError> {
    match view.object(parent) {
        Some(p) if p.kind == Kind::Directory => Ok(()),
        found => Err(RuleError::BadParent {
            parent,
            found: found.map(|p| p.kind),
        }),
    }
}

fn check_free(view: &impl TreeView, parent: ObjectId, name: &Name) -> Result<(), RuleError> {
    if view.child(parent, name).is_some() {
        return Err(RuleError::NameTaken {
            parent,
            name: name.clone(),
        });
    }
    Ok(())
}

/// The new parent must not be the object or inside it.
fn check_no_cycle(
    view: &impl TreeView,
    id: ObjectId,
    new_parent: ObjectId,
) -> Result<(), RuleError> {
    let mut at = new_parent;
    let mut steps = 0usize;
    while at != ObjectId::ROOT {
        if at == id {
            return Err(RuleError::Cycle(id));
        }
        let folder = view.object(at).ok_or(RuleError::BrokenPath {
            object: id,
            missing: at,
        })?;
        at = folder.parent;
        steps += 1;
        if steps > MAX_DEPTH {
            return Err(RuleError::TooDeep(id));
        }
    }
    Ok(())
}
