//! The order of a seal's name changes: every op must apply, in turn, to the tree the engine
//! holds (and the server after it), although the kernel changed the tree in one go.
//!
//! A seal knows where each pending object was announced (its previous names) and where it
//! is now. The steps that give or take names — deletes, creates, renames, links, unlinks —
//! are ordered by a small model of the announced tree: a step runs once what it needs holds
//! there (its folder exists, its name is free, a folder it deletes is empty, a move makes no
//! cycle, an object keeps at least one name). So `mv -T d1 d2` over an empty `d2` is the
//! delete of `d2` then the rename; `rmdir d; mkdir d` is the delete then the create; a
//! rename over a file deletes the file first. When steps wait on each other in a ring (an
//! exchange of two names, a rotation of three), one object moves to a temporary name first;
//! the transaction applies whole on every device, so nobody ever sees that name.
//!
//! What always holds: the model only tracks names held by pending objects. Every name a step
//! gives is a name the object has in the local tree, where no other object is, so names held
//! by objects that are not pending never block a step. A step that cannot be ordered (its
//! folder will not exist, say) is emitted last anyway: the engine refuses the transaction
//! and the seal sets the object aside (see [`super::Capture::set_aside`]).

use std::collections::{HashMap, HashSet};

use super::{op, Item, Sealer, TxBuilder};
use crate::changelog::{Name, ObjectId, OpKind};
use crate::store::{Batch, FileKind, ObjectState, StoreError, SyncKind};

/// A place: (folder, name).
type Place = (ObjectId, Vec<u8>);

/// A step of a seal that gives or takes a name.
#[derive(Clone, Debug)]
enum Step {
    Delete(usize),
    Create { item: usize, place: Place },
    Rename { item: usize, place: Place },
    Link { item: usize, place: Place },
    Unlink { item: usize, place: Place },
}

impl Step {
    fn item(&self) -> usize {
        match self {
            Step::Delete(i) => *i,
            Step::Create { item, .. }
            | Step::Rename { item, .. }
            | Step::Link { item, .. }
            | Step::Unlink { item, .. } => *item,
        }
    }
}

/// The announced tree as far as the pending objects go.
#[derive(Default)]
struct Model {
    holder: HashMap<Place, ObjectId>,
    names: HashMap<ObjectId, Vec<Place>>,
    children: HashMap<ObjectId, usize>,
    /// The folder holding each pending folder.
    dir_parent: HashMap<ObjectId, ObjectId>,
    /// Pending objects: whether they exist in the model now.
    exists: HashMap<ObjectId, bool>,
}

impl Model {
    fn add(&mut self, obj: ObjectId, place: Place) {
        *self.children.entry(place.0).or_insert(0) += 1;
        self.names.entry(obj).or_default().push(place.clone());
        self.holder.insert(place, obj);
    }

    fn remove(&mut self, obj: ObjectId, place: &Place) {
        if self.holder.get(place) == Some(&obj) {
            self.holder.remove(place);
        }
        if let Some(v) = self.names.get_mut(&obj) {
            if let Some(i) = v.iter().position(|p| p == place) {
                v.remove(i);
                if let Some(n) = self.children.get_mut(&place.0) {
                    *n = n.saturating_sub(1);
                }
            }
        }
    }

    fn free(&self, place: &Place, me: ObjectId) -> bool {
        self.holder.get(place).is_none_or(|o| *o == me)
    }

    fn name_count(&self, obj: ObjectId) -> usize {
        self.names.get(&obj).map_or(0, Vec::len)
    }
}

/// The state of an object being sealed: its announced state, or the one its create made.
fn state_of<'s>(
    items: &'s mut [Item],
    created: &'s mut HashMap<usize, ObjectState>,
    i: usize,
) -> Option<&'s mut ObjectState> {
    match created.get_mut(&i) {
        Some(s) => Some(s),
        None => items[i].state.as_mut(),
    }
}

impl Sealer<'_> {
    /// The names an item travels under now, as places: every name of its inode that is not
    /// ignored and can travel.
    fn current_places(
        &self,
        it: &Item,
        objects: &mut HashMap<u64, ObjectId>,
    ) -> Result<Vec<Place>, StoreError> {
        let Some(inode) = &it.inode else {
            return Ok(Vec::new());
        };
        let names: Vec<(u64, Vec<u8>)> = match &it.names {
            Some(n) => n.clone(),
            None => inode.names().map(|(p, n)| (p, n.to_vec())).collect(),
        };
        let mut out = Vec::with_capacity(names.len());
        for (parent, name) in names {
            if Name::check(&name).is_err() {
                tracing::warn!(
                    "not syncing the name {:?}: it cannot travel",
                    String::from_utf8_lossy(&name)
                );
                continue;
            }
            let p = match objects.get(&parent) {
                Some(o) => *o,
                None => {
                    let o = self.object_of(parent)?;
                    objects.insert(parent, o);
                    o
                }
            };
            out.push((p, name));
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Whether folder `dir` exists in the model (pending folders), or was announced.
    fn folder_exists(
        &self,
        model: &Model,
        dir: ObjectId,
        cache: &mut HashMap<ObjectId, bool>,
    ) -> Result<bool, StoreError> {
        if dir == ObjectId::ROOT {
            return Ok(true);
        }
        if let Some(e) = model.exists.get(&dir) {
            return Ok(*e && model.dir_parent.contains_key(&dir));
        }
        if let Some(e) = cache.get(&dir) {
            return Ok(*e);
        }
        let e = self
            .store
            .object_state(&dir)?
            .is_some_and(|s| s.kind == SyncKind::Directory);
        cache.insert(dir, e);
        Ok(e)
    }

    /// Whether `dir` is `obj` or inside it, in the model.
    fn within(&self, model: &Model, dir: ObjectId, obj: ObjectId) -> Result<bool, StoreError> {
        let mut at = dir;
        for _ in 0..4096 {
            if at == obj {
                return Ok(true);
            }
            if at == ObjectId::ROOT {
                return Ok(false);
            }
            at = match model.dir_parent.get(&at) {
                Some(p) => *p,
                None => match self.store.object_state(&at)? {
                    Some(s) => s.parent,
                    None => return Ok(false),
                },
            };
        }
        Ok(false)
    }

    /// Emits the name-changing ops of a seal in an order that applies (see the module doc).
    /// `announced` holds the announced states of pending objects that are not items of this
    /// seal: their names stay taken. Returns the states of the objects created (the caller
    /// stores them) and the items whose steps could not all be ordered.
    pub(super) fn order_names(
        &self,
        items: &mut [Item],
        announced: &[(ObjectId, ObjectState)],
        tx: &mut TxBuilder,
        b: &mut Batch<'_>,
    ) -> Result<HashMap<usize, ObjectState>, StoreError> {
        let mut model = Model::default();
        for (obj, st) in announced.iter().map(|(o, s)| (*o, s)).chain(
            items
                .iter()
                .filter_map(|it| Some((it.object, it.state.as_ref()?))),
        ) {
            if model.exists.contains_key(&obj) {
                continue;
            }
            model.exists.insert(obj, true);
            for (p, n) in st.names() {
                model.add(obj, (p, n.to_vec()));
            }
            if st.kind == SyncKind::Directory {
                model.dir_parent.insert(obj, st.parent);
            }
        }

        // The steps, in the order a pass tries them: deletes of files and unlinks free
        // names; folders are created parents first; moves and new names; new files; folder
        // deletes deepest first.
        let mut objects: HashMap<u64, ObjectId> = HashMap::new();
        let mut frees = Vec::new();
        let mut dir_creates = Vec::new();
        let mut moves = Vec::new();
        let mut file_creates = Vec::new();
        let mut dir_deletes = Vec::new();
        for (i, it) in items.iter().enumerate() {
            let places = self.current_places(it, &mut objects)?;
            match (&it.inode, &it.state) {
                (None, Some(st)) => {
                    if st.kind == SyncKind::Directory {
                        dir_deletes.push((self.announced_depth(st)?, Step::Delete(i)));
                    } else {
                        frees.push(Step::Delete(i));
                    }
                }
                (Some(inode), None) => {
                    let Some(first) = places.first().cloned() else {
                        continue;
                    };
                    let create = Step::Create {
                        item: i,
                        place: first,
                    };
                    if inode.kind == FileKind::Directory {
                        dir_creates.push((self.depth(inode.ino)?, create));
                    } else {
                        file_creates.push(create);
                    }
                    for place in places.into_iter().skip(1) {
                        moves.push(Step::Link { item: i, place });
                    }
                }
                (Some(_), Some(st)) => {
                    if places.is_empty() {
                        continue;
                    }
                    let mut before: Vec<Place> = st.names().map(|(p, n)| (p, n.to_vec())).collect();
                    before.sort();
                    if before == places {
                        continue;
                    }
                    if before.len() == 1 && places.len() == 1 {
                        moves.push(Step::Rename {
                            item: i,
                            place: places[0].clone(),
                        });
                        continue;
                    }
                    for place in places.iter().filter(|p| !before.contains(p)) {
                        moves.push(Step::Link {
                            item: i,
                            place: place.clone(),
                        });
                    }
                    for place in before.into_iter().filter(|p| !places.contains(p)) {
                        frees.push(Step::Unlink { item: i, place });
                    }
                }
                (None, None) => {}
            }
        }
        dir_creates.sort_by_key(|(d, _)| *d);
        dir_deletes.sort_by_key(|(d, _)| std::cmp::Reverse(*d));
        let mut steps: Vec<Step> = frees
            .into_iter()
            .chain(dir_creates.into_iter().map(|(_, s)| s))
            .chain(moves)
            .chain(file_creates)
            .chain(dir_deletes.into_iter().map(|(_, s)| s))
            .collect();

        let mut created: HashMap<usize, ObjectState> = HashMap::new();
        let mut folders: HashMap<ObjectId, bool> = HashMap::new();
        let mut moved_aside: HashSet<ObjectId> = HashSet::new();
        while !steps.is_empty() {
            let before = steps.len();
            let mut waiting = Vec::with_capacity(steps.len());
            for step in steps {
                if self.ready(&step, items, &model, &mut folders)? {
                    self.emit(step, items, &mut created, &mut model, tx, b)?;
                } else {
                    waiting.push(step);
                }
            }
            steps = waiting;
            if steps.is_empty() || steps.len() < before {
                continue;
            }
            // Nothing could run: steps wait on each other in a ring. Move one object that
            // holds a wanted name and will move anyway to a temporary name, and go on.
            if let Some(holder) = self.ring_breaker(&steps, items, &model, &moved_aside) {
                moved_aside.insert(items[holder].object);
                let obj = items[holder].object;
                let Some(place) = model.names.get(&obj).and_then(|v| v.first()).cloned() else {
                    break;
                };
                let temp = format!(
                    ".deltadrive-move-{}",
                    hex::encode(rand::random::<[u8; 6]>())
                );
                self.emit(
                    Step::Rename {
                        item: holder,
                        place: (place.0, temp.into_bytes()),
                    },
                    items,
                    &mut created,
                    &mut model,
                    tx,
                    b,
                )?;
                continue;
            }
            // No ring to break: emit the rest as they are; the engine judges them.
            tracing::debug!("{} name change(s) could not be ordered", steps.len());
            for step in std::mem::take(&mut steps) {
                self.emit(step, items, &mut created, &mut model, tx, b)?;
            }
        }
        Ok(created)
    }

    fn ready(
        &self,
        step: &Step,
        items: &[Item],
        model: &Model,
        folders: &mut HashMap<ObjectId, bool>,
    ) -> Result<bool, StoreError> {
        let obj = items[step.item()].object;
        Ok(match step {
            Step::Delete(i) => match &items[*i].state {
                Some(st) if st.kind == SyncKind::Directory => {
                    model.children.get(&obj).copied().unwrap_or(0) == 0
                }
                _ => true,
            },
            Step::Create { place, .. } => {
                model.free(place, obj) && self.folder_exists(model, place.0, folders)?
            }
            Step::Rename { place, .. } => {
                let is_dir = items[step.item()]
                    .state
                    .as_ref()
                    .is_some_and(|s| s.kind == SyncKind::Directory);
                model.free(place, obj)
                    && self.folder_exists(model, place.0, folders)?
                    && !(is_dir && self.within(model, place.0, obj)?)
            }
            Step::Link { place, .. } => {
                model.exists.get(&obj).copied().unwrap_or(false)
                    && model.free(place, obj)
                    && self.folder_exists(model, place.0, folders)?
            }
            Step::Unlink { .. } => model.name_count(obj) >= 2,
        })
    }

    /// An item to move aside to break a ring: one holding a name a waiting step wants, with
    /// a single name and a rename of its own still to come (so its final place is set later).
    fn ring_breaker(
        &self,
        steps: &[Step],
        items: &[Item],
        model: &Model,
        moved_aside: &HashSet<ObjectId>,
    ) -> Option<usize> {
        let renaming: HashMap<ObjectId, usize> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Rename { item, .. } => Some((items[*item].object, *item)),
                _ => None,
            })
            .collect();
        steps.iter().find_map(|s| {
            let (Step::Create { item, place }
            | Step::Rename { item, place }
            | Step::Link { item, place }) = s
            else {
                return None;
            };
            let holder = *model.holder.get(place)?;
            if holder == items[*item].object || moved_aside.contains(&holder) {
                return None;
            }
            let h = *renaming.get(&holder)?;
            (model.name_count(holder) == 1).then_some(h)
        })
    }

    fn emit(
        &self,
        step: Step,
        items: &mut [Item],
        created: &mut HashMap<usize, ObjectState>,
        model: &mut Model,
        tx: &mut TxBuilder,
        b: &mut Batch<'_>,
    ) -> Result<(), StoreError> {
        let i = step.item();
        let obj = items[i].object;
        match step {
            Step::Delete(_) => {
                self.seal_delete(&items[i], tx, b);
                for place in model.names.remove(&obj).unwrap_or_default() {
                    if model.holder.get(&place) == Some(&obj) {
                        model.holder.remove(&place);
                    }
                    if let Some(n) = model.children.get_mut(&place.0) {
                        *n = n.saturating_sub(1);
                    }
                }
                model.exists.insert(obj, false);
                model.dir_parent.remove(&obj);
            }
            Step::Create { place, .. } => {
                if let Some(st) = self.seal_create(&items[i], &place, tx, b)? {
                    if st.kind == SyncKind::Directory {
                        model.dir_parent.insert(obj, place.0);
                    }
                    model.exists.insert(obj, true);
                    model.add(obj, place);
                    created.insert(i, st);
                }
            }
            Step::Rename { place, .. } => {
                let Some(st) = state_of(items, created, i) else {
                    return Ok(());
                };
                let Ok(name) = Name::new(place.1.clone()) else {
                    return Ok(());
                };
                tx.push(op(
                    obj,
                    st,
                    OpKind::Rename {
                        new_parent: place.0,
                        new_name: name,
                    },
                ));
                st.parent = place.0;
                st.name = place.1.clone();
                st.links.clear();
                let is_dir = st.kind == SyncKind::Directory;
                for old in model.names.get(&obj).cloned().unwrap_or_default() {
                    model.remove(obj, &old);
                }
                if is_dir {
                    model.dir_parent.insert(obj, place.0);
                }
                model.add(obj, place);
            }
            Step::Link { place, .. } => {
                let Some(st) = state_of(items, created, i) else {
                    return Ok(());
                };
                let Ok(name) = Name::new(place.1.clone()) else {
                    return Ok(());
                };
                tx.push(op(
                    obj,
                    st,
                    OpKind::Link {
                        parent: place.0,
                        name,
                    },
                ));
                let mut names: Vec<Place> = st.names().map(|(p, n)| (p, n.to_vec())).collect();
                names.push(place.clone());
                st.set_names(names);
                model.add(obj, place);
            }
            Step::Unlink { place, .. } => {
                let Some(st) = state_of(items, created, i) else {
                    return Ok(());
                };
                let Ok(name) = Name::new(place.1.clone()) else {
                    return Ok(());
                };
                tx.push(op(
                    obj,
                    st,
                    OpKind::Unlink {
                        parent: place.0,
                        name,
                    },
                ));
                let names: Vec<Place> = st
                    .names()
                    .filter(|(p, n)| !(*p == place.0 && *n == place.1.as_slice()))
                    .map(|(p, n)| (p, n.to_vec()))
                    .collect();
                st.set_names(names);
                model.remove(obj, &place);
            }
        }
        Ok(())
    }
}
