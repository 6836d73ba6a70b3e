//! Ignore rules at sealing time: an object whose current path is ignored is never announced.
//!
//! A seal compares each pending object with what was last announced about it; this step
//! runs between the save-pattern identity transfer and the building of ops, and turns the
//! items into what the rules allow:
//! - ignored and never announced (a swap file, a `.goutputstream-*` before its rename, a
//!   file in `build/`): dropped, its pending mark cleared; no op.
//! - ignored but announced (moved into `.Trash-0/files/`, or matched by a rule added
//!   later): announced as a Delete, with every announced object below it (children first, in
//!   the same transaction). The local inode takes a fresh object id: it is a local file
//!   now, and if it ever syncs again it is a new object.
//! - not ignored and never announced: a Create as usual; a folder also brings every
//!   unannounced, unignored object below it that is not pending on its own (restored from
//!   the trash, or un-ignored by a rule change: their pending marks were dropped while they
//!   were ignored).
//! - a `.deltaignore` among the items (created, edited, moved or deleted): every object
//!   below its folder whose announced state disagrees with the new rules joins the seal.
//!
//! Early seals (close, fsync) leave all of this to the periodic seal, which waits for the
//! quiet period: an ignored object there returns "not now".
//!
//! Matching never reads more than the pending objects' parent chains, except when a folder
//! changes sides (a walk of its subtree) or a rule file changes (a walk below its folder,
//! through announced folders only).

use std::collections::{HashMap, HashSet};

use super::{sync_kind, Item, Sealer};
use crate::changelog::ObjectId;
use crate::ignore::{Scope, RULE_FILE};
use crate::store::{Batch, FileKind, Inode, PendingFlags, StoreError, SyncKind, ROOT_INO};

impl Sealer<'_> {
    /// Applies the ignore rules to the items of a seal (see the module doc). Objects whose
    /// pending marks must go although no op is made are added to `dropped`. Returns false
    /// when an early seal (`only`) must leave its object to a periodic seal.
    pub(super) fn apply_ignore(
        &self,
        items: &mut Vec<Item>,
        only: Option<ObjectId>,
        b: &mut Batch<'_>,
        dropped: &mut Vec<ObjectId>,
    ) -> Result<bool, StoreError> {
        let mut scopes = Scopes::default();
        if only.is_some() {
            for it in items.iter() {
                if !self.rule_folders(it)?.is_empty() {
                    return Ok(false);
                }
                if let Some(i) = &it.inode {
                    if scopes.ignored(self, i)? {
                        return Ok(false);
                    }
                }
            }
            return Ok(true);
        }
        // The live inodes this seal already handles; walks skip them without loading them.
        let mut present: HashSet<u64> = items
            .iter()
            .filter_map(|i| i.inode.as_ref().map(|i| i.ino))
            .collect();
        let mut rule_dirs = Vec::new();
        for it in items.iter() {
            for dir in self.rule_folders(it)? {
                if !rule_dirs.contains(&dir) {
                    rule_dirs.push(dir);
                }
            }
        }
        for dir in rule_dirs {
            self.reconsider(dir, items, &mut present)?;
        }
        let mut out = Vec::with_capacity(items.len());
        for mut it in items.drain(..) {
            let Some(inode) = it.inode.clone() else {
                out.push(it);
                continue;
            };
            // Each name is judged: a file linked from a temporary name to a normal one
            // travels under the normal one; it is ignored only when every name is.
            let ignored = if inode.links.is_empty() {
                scopes.ignored(self, &inode)?
            } else {
                let mut keep = Vec::new();
                for (parent, name) in inode.names() {
                    if !scopes.ignored_at(self, parent, name, false)? {
                        keep.push((parent, name.to_vec()));
                    }
                }
                let none = keep.is_empty();
                it.names = Some(keep);
                none
            };
            match (ignored, it.state.is_some()) {
                (true, false) => {
                    b.clear_pending(&it.object);
                    dropped.push(it.object);
                    self.capture.forget(inode.ino);
                }
                (true, true) => {
                    if inode.kind == FileKind::Directory {
                        self.delete_below(inode.ino, &mut out, &mut present, b)?;
                    }
                    self.make_local(&inode, b);
                    it.inode = None;
                    out.push(it);
                }
                (false, false) if inode.kind == FileKind::Directory => {
                    let scope = scopes.inside(self, &inode)?;
                    out.push(it);
                    self.create_below(inode.ino, scope, &mut out, &mut present)?;
                }
                (false, _) => out.push(it),
            }
        }
        *items = out;
        Ok(true)
    }

    /// The folders whose rules an item changed: where a rule file is now, and where it was
    /// announced (both, when one was moved from a folder to another).
    fn rule_folders(&self, it: &Item) -> Result<Vec<u64>, StoreError> {
        let mut dirs = Vec::new();
        if let Some(i) = it
            .inode
            .as_ref()
            .filter(|i| i.kind == FileKind::File && i.name == RULE_FILE)
        {
            dirs.push(i.parent);
        }
        if let Some(st) = it
            .state
            .as_ref()
            .filter(|st| st.kind == SyncKind::File && st.name == RULE_FILE)
        {
            let dir = if st.parent == ObjectId::ROOT {
                Some(ROOT_INO)
            } else {
                self.store.ino_of_object(&st.parent)?
            };
            if let Some(d) = dir.filter(|d| !dirs.contains(d)) {
                dirs.push(d);
            }
        }
        Ok(dirs)
    }

    /// After folder `dir`'s rules changed: every object below it whose announced state
    /// disagrees with the rules now (announced but ignored, or unannounced and not ignored)
    /// and that is not pending on its own joins the seal. Walks through announced, unignored
    /// folders only: below the others, the items' own handling walks.
    fn reconsider(
        &self,
        dir: u64,
        items: &mut Vec<Item>,
        present: &mut HashSet<u64>,
    ) -> Result<(), StoreError> {
        let Some(d) = self.store.get_inode(dir)? else {
            return Ok(());
        };
        if d.kind != FileKind::Directory || d.nlink == 0 {
            return Ok(());
        }
        let ig = self.capture.ignore();
        let scope = ig.scope_of(self.store, dir)?;
        if scope.ignored() {
            return Ok(());
        }
        let mut stack = vec![(dir, scope)];
        while let Some((d, scope)) = stack.pop() {
            for child in self.children(d, present)? {
                if self.capture.has_pending(&child.object) {
                    continue;
                }
                let is_dir = child.kind == FileKind::Directory;
                let ignored = ig.is_ignored_in(&scope, &child.name, is_dir);
                let state = self.store.object_state(&child.object)?;
                match (ignored, state.is_some()) {
                    (true, true) | (false, false) => {
                        present.insert(child.ino);
                        items.push(Item {
                            object: child.object,
                            flags: PendingFlags { rewritten: true },
                            inode: Some(child),
                            state,
                            names: None,
                        });
                    }
                    (false, true) if is_dir => {
                        let inner = ig.enter(self.store, &scope, child.ino, &child.name)?;
                        stack.push((child.ino, inner));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// An announced folder became ignored: every announced object below it is deleted with
    /// it (the ops are ordered children first when the transaction is built).
    fn delete_below(
        &self,
        dir: u64,
        out: &mut Vec<Item>,
        present: &mut HashSet<u64>,
        b: &mut Batch<'_>,
    ) -> Result<(), StoreError> {
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            // An object that is part of this seal is handled as its own item (it is below an
            // ignored folder, so it is ignored too), and so is what is below it.
            for child in self.children(d, present)? {
                if child.kind == FileKind::Directory {
                    stack.push(child.ino);
                }
                if let Some(state) = self.store.object_state(&child.object)? {
                    present.insert(child.ino);
                    self.make_local(&child, b);
                    out.push(Item {
                        object: child.object,
                        flags: PendingFlags::default(),
                        inode: None,
                        state: Some(state),
                        names: None,
                    });
                }
            }
        }
        Ok(())
    }

    /// An unannounced folder is created: the unannounced, unignored objects below it that
    /// are not pending on their own are created with it.
    fn create_below(
        &self,
        dir: u64,
        scope: Scope,
        out: &mut Vec<Item>,
        present: &mut HashSet<u64>,
    ) -> Result<(), StoreError> {
        let ig = self.capture.ignore();
        let mut stack = vec![(dir, scope)];
        while let Some((d, scope)) = stack.pop() {
            for child in self.children(d, present)? {
                if self.capture.has_pending(&child.object) {
                    continue;
                }
                let is_dir = child.kind == FileKind::Directory;
                if ig.is_ignored_in(&scope, &child.name, is_dir)
                    || self.store.object_state(&child.object)?.is_some()
                {
                    continue;
                }
                present.insert(child.ino);
                if is_dir {
                    let inner = ig.enter(self.store, &scope, child.ino, &child.name)?;
                    stack.push((child.ino, inner));
                }
                out.push(Item {
                    object: child.object,
                    flags: PendingFlags { rewritten: true },
                    inode: Some(child),
                    state: None,
                    names: None,
                });
            }
        }
        Ok(())
    }

    /// The syncable objects whose home is folder `dir` (a second hard link to a file that
    /// lives elsewhere is not one of them), less the inodes in `skip`.
    fn children(&self, dir: u64, skip: &HashSet<u64>) -> Result<Vec<Inode>, StoreError> {
        let mut out = Vec::new();
        for e in self.store.list_dir(dir)? {
            if skip.contains(&e.ino) {
                continue;
            }
            let Some(i) = self.store.get_inode(e.ino)? else {
                continue;
            };
            if i.parent == dir && i.name == e.name && i.nlink > 0 && sync_kind(i.kind).is_some() {
                out.push(i);
            }
        }
        Ok(out)
    }

    /// The inode stops being the announced object (whose Delete is in this seal) and becomes
    /// a local one under a fresh id; should it sync again, it is a new object.
    fn make_local(&self, inode: &Inode, b: &mut Batch<'_>) {
        let mut local = inode.clone();
        local.object = ObjectId::random();
        b.put_inode(&local);
        b.delete_object_index(&inode.object);
        self.capture.forget(inode.ino);
    }
}

/// Scopes of the folders met during one seal, so siblings share their parent chain's work.
#[derive(Default)]
struct Scopes {
    inside: HashMap<u64, Scope>,
}

impl Scopes {
    /// The scope inside folder `dir`.
    fn of(&mut self, s: &Sealer<'_>, dir: u64) -> Result<Scope, StoreError> {
        if let Some(sc) = self.inside.get(&dir) {
            return Ok(sc.clone());
        }
        let sc = s.capture.ignore().scope_of(s.store, dir)?;
        self.inside.insert(dir, sc.clone());
        Ok(sc)
    }

    /// Whether the name `name` in folder `dir` is ignored.
    fn ignored_at(
        &mut self,
        s: &Sealer<'_>,
        dir: u64,
        name: &[u8],
        is_dir: bool,
    ) -> Result<bool, StoreError> {
        let scope = self.of(s, dir)?;
        Ok(s.capture.ignore().is_ignored_in(&scope, name, is_dir))
    }

    /// Whether `inode`'s current path is ignored.
    fn ignored(&mut self, s: &Sealer<'_>, inode: &Inode) -> Result<bool, StoreError> {
        if inode.ino == ROOT_INO {
            return Ok(false);
        }
        let scope = self.of(s, inode.parent)?;
        Ok(s.capture
            .ignore()
            .is_ignored_in(&scope, &inode.name, inode.kind == FileKind::Directory))
    }

    /// The scope inside folder `inode`.
    fn inside(&mut self, s: &Sealer<'_>, inode: &Inode) -> Result<Scope, StoreError> {
        let parent = self.of(s, inode.parent)?;
        let sc = s
            .capture
            .ignore()
            .enter(s.store, &parent, inode.ino, &inode.name)?;
        self.inside.insert(inode.ino, sc.clone());
        Ok(sc)
    }
}
