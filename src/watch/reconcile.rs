//! Keeping a plain folder and the device's store in step: a three-way comparison of the
//! folder, the store and what both held when they last agreed (one [`Rec`] per synced
//! object, kept in the store's meta column family under `watch/`).
//!
//! One pass ([`Reconciler::reconcile`]) does both directions:
//! 1. import: what changed in the folder since its record (new, edited, renamed — found by
//!    the local inode number —, deleted) goes into the store through [`FsCore`]'s own
//!    operations, so the capture layer turns it into ordinary change-log transactions. On
//!    FAT-like folders ([`Caps`]) the identity is the recorded path instead and an edit is
//!    found by a content hash as well, since inode numbers and mtimes mean little there;
//! 2. export: what changed in the store since its record (remote applies) is written into
//!    the folder: new content through a temp file in the same folder, fsync, rename over.
//!
//! What always holds:
//! - A local change is never overwritten: a file changed on both sides is imported as a
//!   conflicted copy (a new file) before the store's version is written over it; a local
//!   file that changed while being read is left for the next pass.
//! - Names: the store keeps every name as the log has it; the folder holds its adapted local
//!   name ([`super::names`]), recorded in the object's record.
//! - The adapter's own files (temp files, probes) start with [`TMP_PREFIX`] and are never
//!   imported.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use fuser::{Errno, OpenFlags, RenameFlags, TimeOrNow};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::names::{self, NameRules};
use crate::fs::{Caller, FsCore};
use crate::store::{FileKind, Inode, ROOT_INO};

/// Names the adapter uses for its own files in the folder; never synced.
pub const TMP_PREFIX: &str = ".deltadrive-tmp-";
/// The meta key range of the records.
const KEY_PREFIX: &[u8] = b"watch/rec/";
/// Bytes compared (and written when different) at a time when importing content.
const BLOCK: usize = 64 << 10;

/// What the folder's file system can hold.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    pub names: NameRules,
    /// chmod sticks (not on vfat).
    pub modes: bool,
    pub symlinks: bool,
    /// Local inode numbers identify files (not on FAT-like folders: fusefat hands out
    /// numbers that are not tied to the file and may be reused): otherwise an entry's
    /// identity is its recorded local path, and a rename is seen as a delete and a create.
    pub inos: bool,
    /// Size and mtime cannot be trusted to change with the content (FAT-like folders:
    /// fusefat keeps no mtime on write, vfat's mtime has 2 s steps): a content hash
    /// (BLAKE3) is kept in the record and compared when the cheap signals are equal.
    pub hash: bool,
    /// Hard links (not on FAT-like folders): a file with several names in the store has
    /// them here as hard links; otherwise each further name is a separate copy.
    pub links: bool,
}

/// The store's side of a record: enough to tell that the store changed the object.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
struct Stamp {
    ctime: i64,
    mtime: i64,
    size: u64,
    perm: u16,
    target: Vec<u8>,
}

/// One object as the folder and the store last agreed on it.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct Rec {
    /// Its place in the store (folder inode, name as in the change log).
    parent: u64,
    name: Vec<u8>,
    /// Its name in the local folder of `parent`.
    local: Vec<u8>,
    kind: u8,
    l_ino: u64,
    l_size: u64,
    l_mtime: i64,
    l_mode: u32,
    l_target: Vec<u8>,
    /// BLAKE3 of the local content as last agreed (files, with [`Caps::hash`] only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    l_hash: Vec<u8>,
    stamp: Stamp,
    /// The file's other names (hard links), as last agreed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    extra: Vec<Extra>,
}

/// A further name of a file with several names, as the folder and the store last agreed.
/// Where the folder has hard links it is one (`l_ino` is the file's); elsewhere it is a
/// copy with its own local state, kept in step with the store object both ways.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
struct Extra {
    parent: u64,
    name: Vec<u8>,
    local: Vec<u8>,
    l_ino: u64,
    l_size: u64,
    l_mtime: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    l_hash: Vec<u8>,
    /// The store's state the copy was last written from or read into (copies only).
    stamp: Stamp,
}

impl Extra {
    fn set_local(&mut self, l: &Local) {
        self.l_ino = l.ino;
        self.l_size = l.size;
        self.l_mtime = l.mtime;
        self.l_hash = l.hash.map(|h| h.to_vec()).unwrap_or_default();
    }

    /// A copy edited here since it was last agreed.
    fn copy_changed(&self, l: &Local) -> bool {
        l.ino != self.l_ino
            || l.size != self.l_size
            || l.mtime != self.l_mtime
            || l.hash
                .is_some_and(|h| !self.l_hash.is_empty() && self.l_hash != h)
    }
}

/// Whether store inode `i` has the name `name` in folder `parent`.
fn has_name(i: &Inode, parent: u64, name: &[u8]) -> bool {
    i.names().any(|(p, n)| p == parent && n == name)
}

/// The store name a record stands for: its own while the object still has it, else the
/// object's first name (renamed in the store since).
fn store_name(r: &Rec, i: &Inode) -> (u64, Vec<u8>) {
    if has_name(i, r.parent, &r.name) {
        (r.parent, r.name.clone())
    } else {
        (i.parent, i.name.clone())
    }
}

fn kind_code(k: FileKind) -> u8 {
    match k {
        FileKind::Directory => 1,
        FileKind::Symlink => 2,
        _ => 0,
    }
}

fn ns(t: crate::store::Timespec) -> i64 {
    t.secs * 1_000_000_000 + i64::from(t.nsec)
}

fn stamp(i: &Inode) -> Stamp {
    if i.kind == FileKind::Directory {
        // A folder's times change with its children: only its mode is its own.
        return Stamp {
            perm: i.perm,
            ..Stamp::default()
        };
    }
    Stamp {
        ctime: ns(i.ctime),
        mtime: ns(i.mtime),
        size: i.size,
        perm: i.perm,
        target: i.symlink.clone(),
    }
}

/// A stamp no inode has: the store is taken as changed at the next pass.
fn stale_stamp() -> Stamp {
    Stamp {
        ctime: i64::MIN,
        ..Stamp::default()
    }
}

/// A local entry as `lstat` shows it.
#[derive(Clone, Debug)]
struct Local {
    ino: u64,
    kind: FileKind,
    size: u64,
    mtime: i64,
    mode: u32,
    uid: u32,
    gid: u32,
    target: Vec<u8>,
    /// BLAKE3 of the content, when asked for (files only).
    hash: Option<[u8; 32]>,
}

/// What `lstat` shows of `path`; with `hash`, a file's content is hashed too.
fn local_of(path: &Path, inos: bool, hash: bool) -> std::io::Result<Local> {
    let md = std::fs::symlink_metadata(path)?;
    let ino = if inos {
        md.ino()
    } else {
        let h = blake3::hash(path.as_os_str().as_bytes());
        u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or_default())
    };
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        FileKind::Directory
    } else if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_file() {
        FileKind::File
    } else {
        // Sockets, fifos, devices: not synced from a plain folder.
        return Err(std::io::Error::other("not a file, folder or symlink"));
    };
    let target = if kind == FileKind::Symlink {
        std::fs::read_link(path)?.as_os_str().as_bytes().to_vec()
    } else {
        Vec::new()
    };
    let hash = if hash && kind == FileKind::File {
        let mut h = blake3::Hasher::new();
        h.update_reader(File::open(path)?)?;
        Some(*h.finalize().as_bytes())
    } else {
        None
    };
    Ok(Local {
        ino,
        kind,
        size: if kind == FileKind::File { md.len() } else { 0 },
        mtime: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        target,
        hash,
    })
}

impl Rec {
    fn local_changed(&self, l: &Local) -> bool {
        if l.ino != self.l_ino || kind_code(l.kind) != self.kind || l.mode != self.l_mode {
            return true;
        }
        match l.kind {
            FileKind::File => {
                l.size != self.l_size
                    || l.mtime != self.l_mtime
                    || l.hash
                        .is_some_and(|h| !self.l_hash.is_empty() && self.l_hash != h)
            }
            FileKind::Symlink => l.target != self.l_target,
            _ => false,
        }
    }

    fn store_changed(&self, i: &Inode) -> bool {
        stamp(i) != self.stamp
    }

    fn set_local(&mut self, l: &Local) {
        self.kind = kind_code(l.kind);
        self.l_ino = l.ino;
        self.l_size = l.size;
        self.l_mtime = l.mtime;
        self.l_mode = l.mode;
        self.l_target = l.target.clone();
        self.l_hash = l.hash.map(|h| h.to_vec()).unwrap_or_default();
    }
}

fn errno(what: &str, e: Errno) -> anyhow::Error {
    anyhow!("{what}: {e:?}")
}

/// The folder as scanned at the start of a pass (relative paths).
struct Scan {
    by_path: HashMap<PathBuf, Local>,
    /// The least path of each local inode.
    by_ino: HashMap<u64, PathBuf>,
    /// Every path of local inodes with more than one (hard links), in order.
    group: HashMap<u64, Vec<PathBuf>>,
}

fn scan(root: &Path, inos: bool, hash: bool) -> Scan {
    let mut s = Scan {
        by_path: HashMap::new(),
        by_ino: HashMap::new(),
        group: HashMap::new(),
    };
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(root.join(&rel)) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            if name.as_bytes().starts_with(TMP_PREFIX.as_bytes()) {
                continue;
            }
            let r = rel.join(&name);
            let Ok(l) = local_of(&root.join(&r), inos, hash) else {
                continue;
            };
            if l.kind == FileKind::Directory {
                stack.push(r.clone());
            }
            match s.by_ino.get_mut(&l.ino) {
                Some(first) => {
                    let g = s.group.entry(l.ino).or_insert_with(|| vec![first.clone()]);
                    g.push(r.clone());
                    if r < *first {
                        *first = r.clone();
                    }
                }
                None => {
                    s.by_ino.insert(l.ino, r.clone());
                }
            }
            s.by_path.insert(r, l);
        }
    }
    for g in s.group.values_mut() {
        g.sort();
    }
    s
}

fn depth(p: &Path) -> usize {
    p.components().count()
}

fn file_name(p: &Path) -> Vec<u8> {
    p.file_name()
        .map(|n| n.as_bytes().to_vec())
        .unwrap_or_default()
}

fn system_time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// The adapter's state between passes.
struct State {
    recs: HashMap<u64, Rec>,
    dirty: HashSet<u64>,
    /// Folders whose move here this pass's import left to the next pass (their new folder
    /// was still inside them in the store): the export leaves them and what they hold
    /// alone until then, or it would write them back where the store still has them.
    deferred: HashSet<u64>,
}

impl State {
    fn put(&mut self, ino: u64, r: Rec) {
        self.recs.insert(ino, r);
        self.dirty.insert(ino);
    }

    fn remove(&mut self, ino: u64) {
        self.recs.remove(&ino);
        self.dirty.insert(ino);
    }

    /// The local path (relative) of a store object through the records.
    fn path(&self, ino: u64) -> Option<PathBuf> {
        let mut parts = Vec::new();
        let mut cur = ino;
        let mut guard = 0;
        while cur != ROOT_INO {
            let r = self.recs.get(&cur)?;
            parts.push(r.local.clone());
            cur = r.parent;
            guard += 1;
            if guard > 4096 {
                return None;
            }
        }
        let mut p = PathBuf::new();
        for part in parts.iter().rev() {
            p.push(OsStr::from_bytes(part));
        }
        Some(p)
    }

    /// The local path (relative) of store folder `dir` (the root is the empty path).
    fn dir_path(&self, dir: u64) -> Option<PathBuf> {
        if dir == ROOT_INO {
            Some(PathBuf::new())
        } else {
            self.path(dir)
        }
    }

    /// The local path (relative) of a further name.
    fn extra_path(&self, e: &Extra) -> Option<PathBuf> {
        Some(self.dir_path(e.parent)?.join(OsStr::from_bytes(&e.local)))
    }

    /// The store folder of local folder `rel` as the scan shows it (the root, or the
    /// recorded folder whose local inode is there).
    fn dir_path_of(&self, scan: &Scan, rel: &Path) -> Option<u64> {
        if rel.as_os_str().is_empty() {
            return Some(ROOT_INO);
        }
        let l = scan.by_path.get(rel)?;
        self.recs
            .iter()
            .find(|(_, r)| r.kind == 1 && r.l_ino == l.ino)
            .map(|(s, _)| *s)
    }

    /// The store folder for a local folder path, found by the folder's local inode.
    fn store_dir(&self, scan: &Scan, by_lino: &HashMap<u64, u64>, rel: &Path) -> Option<u64> {
        if rel.as_os_str().is_empty() {
            return Some(ROOT_INO);
        }
        let l = scan.by_path.get(rel)?;
        by_lino.get(&l.ino).copied()
    }
}

/// Runs reconcile passes; one at a time.
pub struct Reconciler {
    core: Arc<FsCore>,
    root: PathBuf,
    caps: Caps,
    state: Mutex<State>,
    /// A pass left something for later (a file changing while read, a name collision).
    retry: AtomicBool,
}

impl Reconciler {
    /// Loads the records kept in the store.
    ///
    /// # Errors
    /// The store cannot be read.
    pub fn new(core: Arc<FsCore>, root: PathBuf, caps: Caps) -> anyhow::Result<Reconciler> {
        let mut recs = HashMap::new();
        for (k, v) in core.store().meta_range(KEY_PREFIX)? {
            let Ok(raw) = <[u8; 8]>::try_from(&k[KEY_PREFIX.len()..]) else {
                continue;
            };
            match serde_json::from_slice::<Rec>(&v) {
                Ok(r) => {
                    recs.insert(u64::from_be_bytes(raw), r);
                }
                Err(e) => tracing::warn!("dropping an unreadable watch record: {e}"),
            }
        }
        Ok(Reconciler {
            core,
            root,
            caps,
            state: Mutex::new(State {
                recs,
                dirty: HashSet::new(),
                deferred: HashSet::new(),
            }),
            retry: AtomicBool::new(false),
        })
    }

    /// Whether the last pass left something for a later one (and clears the flag).
    pub fn take_retry(&self) -> bool {
        self.retry.swap(false, Ordering::Relaxed)
    }

    /// One pass both ways; errors are logged (the next pass tries again).
    pub fn reconcile(&self) {
        let mut st = self.state.lock();
        let started = std::time::Instant::now();
        if let Err(e) = self.import(&mut st) {
            tracing::error!("watch: importing local changes failed: {e:#}");
            self.retry.store(true, Ordering::Relaxed);
        }
        if let Err(e) = self.export(&mut st) {
            tracing::error!("watch: writing remote changes into the folder failed: {e:#}");
            self.retry.store(true, Ordering::Relaxed);
        }
        if let Err(e) = self.persist(&mut st) {
            tracing::error!("watch: saving the folder's records failed: {e:#}");
        }
        tracing::debug!(
            "watch: reconciled in {:.1} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
    }

    fn persist(&self, st: &mut State) -> anyhow::Result<()> {
        if st.dirty.is_empty() {
            return Ok(());
        }
        let store = self.core.store();
        let mut b = store.batch();
        for ino in st.dirty.drain() {
            let mut key = KEY_PREFIX.to_vec();
            key.extend_from_slice(&ino.to_be_bytes());
            match st.recs.get(&ino) {
                Some(r) => b.put_meta(&key, &serde_json::to_vec(r)?),
                None => b.delete_meta(&key),
            }
        }
        store.commit(b, false)?;
        Ok(())
    }

    fn live_inode(&self, ino: u64) -> anyhow::Result<Option<Inode>> {
        Ok(self
            .core
            .store()
            .get_inode(ino)?
            .filter(|i| i.nlink > 0 || i.ino == ROOT_INO))
    }

    fn caller(l: &Local) -> Caller {
        Caller {
            uid: l.uid,
            gid: l.gid,
            pid: 0,
        }
    }

    /// Gives store inode `s` the local entry's mode.
    fn chmod(&self, l: &Local, s: u64) -> Result<crate::store::Inode, Errno> {
        self.core.do_setattr(
            &Self::caller(l),
            s,
            Some(l.mode),
            None,
            None,
            None,
            None,
            None,
            None,
        )
    }

    // ----- folder → store -----

    fn import(&self, st: &mut State) -> anyhow::Result<()> {
        st.deferred.clear();
        let scan = scan(&self.root, self.caps.inos, self.caps.hash);
        // Which record each local inode belongs to. A record claims its inode only while an
        // entry of its kind has it: the inode of something deleted here is free for a new
        // entry (file systems reuse inode numbers at once).
        let mut by_lino: HashMap<u64, u64> = HashMap::new();
        for (s, r) in &st.recs {
            // A copy standing for a further name is that object's, not a new file.
            for e in &r.extra {
                let held = st
                    .extra_path(e)
                    .and_then(|p| scan.by_path.get(&p))
                    .is_some_and(|l| l.ino == e.l_ino);
                if held {
                    by_lino.insert(e.l_ino, *s);
                }
            }
            let held = scan
                .by_ino
                .get(&r.l_ino)
                .and_then(|p| scan.by_path.get(p))
                .is_some_and(|l| kind_code(l.kind) == r.kind);
            if held {
                by_lino.insert(r.l_ino, *s);
            }
        }

        // 1. New local folders, parents first.
        let mut new: Vec<&PathBuf> = scan
            .by_path
            .iter()
            .filter(|(_, l)| !by_lino.contains_key(&l.ino))
            .map(|(p, _)| p)
            .collect();
        new.sort_by_key(|p| (depth(p), (*p).clone()));
        for rel in new
            .iter()
            .filter(|p| scan.by_path[**p].kind == FileKind::Directory)
        {
            let l = &scan.by_path[*rel];
            if let Some(s) = self.import_new(st, &scan, &by_lino, rel, l, false)? {
                by_lino.insert(l.ino, s);
            }
        }

        // 2. Known objects: renames and edits (shallow first), then deletes (deep first).
        let mut known: Vec<(usize, u64)> = st
            .recs
            .keys()
            .filter_map(|s| st.path(*s).map(|p| (depth(&p), *s)))
            .collect();
        known.sort_unstable();
        let mut gone = Vec::new();
        for (_, s) in known {
            // Further names first: the record's own name may go to one of them.
            if let Err(e) = self.import_names(st, &scan, &mut by_lino, s) {
                tracing::warn!("watch: the names of a file with several: {e:#}; again later");
                self.retry.store(true, Ordering::Relaxed);
            }
            // Computed now: a folder renamed earlier in this loop moved its children.
            let (Some(rec), Some(path)) = (st.recs.get(&s).cloned(), st.path(s)) else {
                continue;
            };
            let (l_ino, kind) = (rec.l_ino, rec.kind);
            let same = |p: &Path| {
                scan.by_path
                    .get(p)
                    .is_some_and(|l| l.ino == l_ino && kind_code(l.kind) == kind)
            };
            let mut rec = rec;
            let now_at = if same(&path) {
                Some(path.clone())
            } else if let Some(p) = scan.by_ino.get(&rec.l_ino).filter(|p| same(p)) {
                Some(p.clone())
            } else {
                // Replaced by a new local inode of the same kind (an editor's save: write a
                // temp file, rename it over): the same object, edited.
                match scan.by_path.get(&path) {
                    Some(l)
                        if kind_code(l.kind) == rec.kind
                            && l.kind != FileKind::Directory
                            && !by_lino.contains_key(&l.ino) =>
                    {
                        by_lino.remove(&rec.l_ino);
                        by_lino.insert(l.ino, s);
                        rec.l_ino = l.ino;
                        rec.l_size = u64::MAX;
                        Some(path.clone())
                    }
                    _ => None,
                }
            };
            let Some(at) = now_at else {
                gone.push((path, s));
                continue;
            };
            let inode = self.live_inode(s)?;
            let Some(inode) = inode else {
                // Deleted in the store: an edit made here since beats the delete.
                if rec.local_changed(&scan.by_path[&at]) {
                    st.remove(s);
                    by_lino.remove(&rec.l_ino);
                    let l = scan.by_path[&at].clone();
                    if let Some(n) = self.import_new(st, &scan, &by_lino, &at, &l, false)? {
                        by_lino.insert(l.ino, n);
                    }
                }
                continue;
            };
            let store_was_changed = rec.store_changed(&inode);
            let mut inode = inode;
            if at != path {
                // Moved or renamed here.
                let parent_rel = at.parent().unwrap_or(Path::new(""));
                let Some(new_parent) = st.store_dir(&scan, &by_lino, parent_rel) else {
                    self.retry.store(true, Ordering::Relaxed);
                    continue;
                };
                let local_name = file_name(&at);
                let (from_parent, from_name) = store_name(&rec, &inode);
                let to_name = if local_name == rec.local {
                    from_name.clone()
                } else {
                    local_name.clone()
                };
                let noop = new_parent == from_parent && to_name == from_name;
                if !noop && self.inside(s, new_parent)? {
                    // Its new folder is still inside it in the store: the move of that
                    // folder out of it (deeper, later in this pass) goes first.
                    tracing::debug!(
                        "watch: {} moves into a folder the store still has inside it; \
                         after that folder's own move",
                        path.display()
                    );
                    self.retry.store(true, Ordering::Relaxed);
                    st.deferred.insert(s);
                    continue;
                }
                let rename = || {
                    if noop {
                        return Ok(());
                    }
                    self.core.do_rename(
                        from_parent,
                        OsStr::from_bytes(&from_name),
                        new_parent,
                        OsStr::from_bytes(&to_name),
                        RenameFlags::RENAME_NOREPLACE,
                    )
                };
                let mut renamed = rename();
                if renamed.is_err() {
                    // Two entries that swapped places here (`RENAME_EXCHANGE`, or `mv`
                    // through a third name): the same exchange in the store.
                    if self.exchange_in_store(st, &scan, s, &rec, &inode, &path, &at)? {
                        continue;
                    }
                    // A ring of moves (a to b, b to c, c to a): the object still holding the
                    // name steps aside; its own turn (now or in the next pass) moves it on to
                    // where it went here.
                    if self.free_name(st, &scan, s, new_parent, &to_name, &at)? {
                        renamed = rename();
                    }
                }
                if let Err(e) = renamed {
                    tracing::warn!(
                        "watch: cannot rename {} in the store ({e:?}); trying again later",
                        path.display()
                    );
                    self.retry.store(true, Ordering::Relaxed);
                    continue;
                }
                inode = self
                    .live_inode(s)?
                    .ok_or_else(|| anyhow!("renamed inode vanished"))?;
                rec.parent = new_parent;
                rec.name = to_name;
                rec.local = local_name;
                rec.stamp = if store_was_changed {
                    stale_stamp()
                } else {
                    stamp(&inode)
                };
                st.put(s, rec.clone());
            }
            let l = scan.by_path[&at].clone();
            if !rec.local_changed(&l) {
                continue;
            }
            let abs = self.root.join(&at);
            match l.kind {
                FileKind::File if store_was_changed => {
                    // Changed on both sides: keep this side's version as a conflicted copy;
                    // the store's version is written over the file by the export below.
                    if self.import_conflicted_copy(&inode, &abs, &l)? {
                        rec.set_local(&l);
                        st.put(s, rec);
                    }
                }
                FileKind::File => {
                    // Where mtimes do not move on write, one that did not move says nothing.
                    let keep_mtime = !self.caps.hash || l.mtime != rec.l_mtime;
                    if self.import_content(s, &abs, &l, keep_mtime)? {
                        let i = self
                            .live_inode(s)?
                            .ok_or_else(|| anyhow!("inode vanished"))?;
                        rec.set_local(&l);
                        rec.stamp = stamp(&i);
                        st.put(s, rec);
                    }
                }
                FileKind::Directory => {
                    if self.caps.modes && l.mode != u32::from(inode.perm) {
                        self.chmod(&l, s).map_err(|e| errno("chmod", e))?;
                    }
                    let i = self
                        .live_inode(s)?
                        .ok_or_else(|| anyhow!("inode vanished"))?;
                    rec.set_local(&l);
                    if !store_was_changed {
                        rec.stamp = stamp(&i);
                    }
                    st.put(s, rec);
                }
                _ => {
                    // A symlink's target changed: symlinks are immutable, so replace it.
                    let (p, n) = store_name(&rec, &inode);
                    self.core
                        .do_unlink(p, OsStr::from_bytes(&n), false)
                        .map_err(|e| errno("unlink", e))?;
                    st.remove(s);
                    by_lino.remove(&rec.l_ino);
                    if let Some(n) = self.import_new(st, &scan, &by_lino, &at, &l, false)? {
                        by_lino.insert(l.ino, n);
                    }
                }
            }
        }
        gone.sort_by_key(|(p, _)| std::cmp::Reverse((depth(p), p.clone())));
        for (path, s) in gone {
            let Some(rec) = st.recs.get(&s).cloned() else {
                continue;
            };
            let Some(inode) = self.live_inode(s)? else {
                st.remove(s);
                continue;
            };
            if rec.kind != 1 && rec.store_changed(&inode) {
                // Changed in the store since: the export puts the new version back.
                tracing::debug!(
                    "watch: {} deleted here but changed in the store since ({:?} then, {:?} now)",
                    path.display(),
                    rec.stamp,
                    stamp(&inode)
                );
                continue;
            }
            let dir = rec.kind == 1;
            let (p, n) = store_name(&rec, &inode);
            match self.core.do_unlink(p, OsStr::from_bytes(&n), dir) {
                Ok(()) => {
                    tracing::debug!("watch: {} deleted here", path.display());
                    st.remove(s);
                }
                // A folder that got new content from elsewhere comes back (export).
                Err(e) if e == Errno::ENOTEMPTY => {}
                Err(e) => return Err(errno("delete", e)),
            }
        }

        // 3. New local files and symlinks.
        for rel in new
            .iter()
            .filter(|p| scan.by_path[**p].kind != FileKind::Directory)
        {
            let l = &scan.by_path[*rel];
            if by_lino.contains_key(&l.ino) {
                continue;
            }
            if let Some(s) = self.import_new(st, &scan, &by_lino, rel, l, true)? {
                by_lino.insert(l.ino, s);
                if scan.group.contains_key(&l.ino) {
                    // A new file with several names here: its other names at once.
                    self.import_names(st, &scan, &mut by_lino, s)?;
                }
            }
        }

        // 4. New local folders whose name a store object still held in step 1 (it was not
        //    deleted or moved by this pass): the local folder takes the name, and the store
        //    object, absent here, is kept under a conflicted-copy name.
        for rel in new
            .iter()
            .filter(|p| scan.by_path[**p].kind == FileKind::Directory)
        {
            let l = &scan.by_path[*rel];
            if by_lino.contains_key(&l.ino) {
                continue;
            }
            if let Some(s) = self.import_new(st, &scan, &by_lino, rel, l, true)? {
                by_lino.insert(l.ino, s);
            }
        }
        Ok(())
    }

    /// Whether store folder `dir` is `ino` or inside it: moving `ino` there would put a
    /// folder inside itself. On a mount the kernel refuses such a rename before it reaches
    /// the store; the reconciler's own renames must not make one either (a cycle cut off
    /// from the root, whose content the store then loses and the engine refuses).
    fn inside(&self, ino: u64, dir: u64) -> anyhow::Result<bool> {
        let store = self.core.store();
        let mut d = dir;
        // Deeper than any real tree: a cycle already there counts as inside.
        for _ in 0..100_000 {
            if d == ino {
                return Ok(true);
            }
            if d == ROOT_INO {
                return Ok(false);
            }
            match store.get_inode(d)? {
                Some(i) if i.kind == FileKind::Directory => d = i.parent,
                _ => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Frees the store name `name` in folder `parent`, held by object `o` that has no local
    /// entry under it (a new object from another device, or one deleted here but changed in
    /// the store since), for a new local entry of that name: `o` goes to a conflicted-copy
    /// name, and the export writes it there. Returns false (nothing done) when `o` is here.
    fn move_aside(
        &self,
        st: &mut State,
        scan: &Scan,
        o: u64,
        parent: u64,
        name: &[u8],
    ) -> anyhow::Result<bool> {
        // Whether `name` is one of `o`'s further names (a hard link) rather than its own.
        let further = match (st.recs.get(&o), self.live_inode(o)?) {
            (Some(r), Some(i)) => store_name(r, &i) != (parent, name.to_vec()),
            _ => false,
        };
        if let Some(r) = st.recs.get(&o) {
            let here = if further {
                // That name is here only if this folder's entry of that name is the file.
                r.extra.iter().any(|e| {
                    e.parent == parent
                        && e.name == name
                        && st.extra_path(e).is_some_and(|p| {
                            scan.by_path.get(&p).is_some_and(|l| {
                                kind_code(l.kind) == r.kind
                                    && (l.ino == r.l_ino || l.ino == e.l_ino)
                            })
                        })
                })
            } else {
                st.path(o).is_some_and(|p| {
                    scan.by_path
                        .get(&p)
                        .is_some_and(|l| l.ino == r.l_ino && kind_code(l.kind) == r.kind)
                })
            };
            if here {
                return Ok(false);
            }
        }
        let changed_before = match (st.recs.get(&o), self.live_inode(o)?) {
            (Some(r), Some(i)) => r.store_changed(&i),
            _ => true,
        };
        let aside = self.core.free_conflicted_copy_name(parent, name)?;
        if let Err(e) = self.core.do_rename(
            parent,
            OsStr::from_bytes(name),
            parent,
            OsStr::from_bytes(&aside),
            RenameFlags::RENAME_NOREPLACE,
        ) {
            tracing::debug!("watch: cannot move the store's object aside: {e:?}");
            return Ok(false);
        }
        tracing::info!(
            "watch: {:?} was taken by a new local entry; the store's object there is kept as {:?}",
            String::from_utf8_lossy(name),
            String::from_utf8_lossy(&aside)
        );
        if let (true, Some(mut r)) = (further, st.recs.get(&o).cloned()) {
            // The export makes the file's new name here (and records it).
            r.extra.retain(|e| !(e.parent == parent && e.name == name));
            st.put(o, r);
        } else if let Some(mut r) = st.recs.get(&o).cloned() {
            r.parent = parent;
            r.name = aside.clone();
            r.local = aside;
            // A change in the store before this rename is still one to write back here;
            // the rename itself is not.
            if let Some(now) = self.live_inode(o)? {
                r.stamp = if changed_before {
                    stale_stamp()
                } else {
                    stamp(&now)
                };
            }
            st.put(o, r);
        }
        Ok(true)
    }

    /// Frees store name `name` in folder `parent` for object `s` moving there (to local
    /// `at`): the object there, which is not at `at` here, goes to a conflicted-copy name
    /// ([`Reconciler::move_aside`]); if it moved here too, its own turn (now or in the next
    /// pass) moves it on from there. Returns whether the name is free now.
    fn free_name(
        &self,
        st: &mut State,
        scan: &Scan,
        s: u64,
        parent: u64,
        name: &[u8],
        at: &Path,
    ) -> anyhow::Result<bool> {
        let store = self.core.store();
        let Some((t, _)) = store.lookup(parent, name)? else {
            return Ok(true);
        };
        if t == s {
            return Ok(false);
        }
        if let Some(trec) = st.recs.get(&t) {
            if scan
                .by_path
                .get(at)
                .is_some_and(|l| l.ino == trec.l_ino && kind_code(l.kind) == trec.kind)
            {
                return Ok(false);
            }
        }
        self.move_aside(st, scan, t, parent, name)
    }

    /// When recorded object `s` went from `path` to `at` here and the object recorded at
    /// `at` went to `path`, exchanges the two in the store and moves both records; returns
    /// whether it did. Their contents and modes are left to the rest of the pass.
    #[allow(clippy::too_many_arguments)]
    fn exchange_in_store(
        &self,
        st: &mut State,
        scan: &Scan,
        s: u64,
        rec: &Rec,
        inode: &Inode,
        path: &Path,
        at: &Path,
    ) -> anyhow::Result<bool> {
        let (Some(parent_at), Some(parent_path)) = (
            at.parent().and_then(|p| st.dir_path_of(scan, p)),
            path.parent().and_then(|p| st.dir_path_of(scan, p)),
        ) else {
            return Ok(false);
        };
        let Some((t, _)) = self.core.store().lookup(parent_at, &file_name(at))? else {
            return Ok(false);
        };
        let Some(trec) = st.recs.get(&t).cloned() else {
            return Ok(false);
        };
        let swapped = t != s
            && st.path(t).as_deref() == Some(at)
            && scan
                .by_path
                .get(path)
                .is_some_and(|l| l.ino == trec.l_ino && kind_code(l.kind) == trec.kind);
        let Some(tinode) = self.live_inode(t)? else {
            return Ok(false);
        };
        if !swapped || parent_path != store_name(rec, inode).0 {
            return Ok(false);
        }
        let (from_parent, from_name) = store_name(rec, inode);
        let (to_parent, to_name) = store_name(&trec, &tinode);
        if self.inside(s, to_parent)? || self.inside(t, from_parent)? {
            // One holds the other in the store: exchanging them would make a cycle.
            return Ok(false);
        }
        if self
            .core
            .do_rename(
                from_parent,
                OsStr::from_bytes(&from_name),
                to_parent,
                OsStr::from_bytes(&to_name),
                RenameFlags::RENAME_EXCHANGE,
            )
            .is_err()
        {
            return Ok(false);
        }
        tracing::debug!(
            "watch: {} and {} exchanged here",
            path.display(),
            at.display()
        );
        for (o, r, was, p, n, local) in [
            (
                s,
                rec,
                inode,
                to_parent,
                to_name.clone(),
                trec.local.clone(),
            ),
            (
                t,
                &trec,
                &tinode,
                from_parent,
                from_name.clone(),
                rec.local.clone(),
            ),
        ] {
            let mut r = r.clone();
            let changed = r.store_changed(was);
            r.parent = p;
            r.name = n;
            r.local = local;
            if let Some(now) = self.live_inode(o)? {
                r.stamp = if changed { stale_stamp() } else { stamp(&now) };
            }
            st.put(o, r);
        }
        Ok(true)
    }

    /// The further names of file `s` (hard links, or copies where the folder has none):
    /// names gone here leave the store (an unlink never deletes the file: it keeps its other
    /// names), the record moves to another name when its own went, and new local hard links
    /// become store links. On a copy edited here, the object takes its content.
    fn import_names(
        &self,
        st: &mut State,
        scan: &Scan,
        by_lino: &mut HashMap<u64, u64>,
        s: u64,
    ) -> anyhow::Result<()> {
        let Some(mut rec) = st.recs.get(&s).cloned() else {
            return Ok(());
        };
        let links = self.caps.links;
        // The local names of its inode, only while the record claims that inode: a number
        // freed here (the file or symlink deleted) and taken at once by a new entry of
        // another kind groups someone else's names, which must not become this object's.
        let group: &[PathBuf] = if links && rec.kind != 1 && by_lino.get(&rec.l_ino) == Some(&s) {
            scan.group.get(&rec.l_ino).map_or(&[], Vec::as_slice)
        } else {
            &[]
        };
        if rec.extra.is_empty() && group.is_empty() {
            return Ok(());
        }
        let Some(inode) = self.live_inode(s)? else {
            // Gone from the store: the export removes its names here.
            return Ok(());
        };
        let Some(primary) = st.path(s) else {
            return Ok(());
        };
        let store_was_changed = rec.store_changed(&inode);
        let before = stamp(&inode);
        let kind = rec.kind;
        let l_ino = rec.l_ino;
        // Whether the local entry at `p` still is the file (or the copy `e`).
        let holds = |p: &Path, e: Option<&Extra>| {
            scan.by_path.get(p).is_some_and(|l| {
                kind_code(l.kind) == kind
                    && (l.ino == l_ino && (links || e.is_none())
                        || e.is_some_and(|e| l.ino == e.l_ino))
            })
        };
        let store = self.core.store();
        let mut touched = false;

        // 1. Recorded further names gone here.
        let mut kept = Vec::with_capacity(rec.extra.len());
        for e in std::mem::take(&mut rec.extra) {
            let Some(here) = st.extra_path(&e) else {
                kept.push(e);
                continue;
            };
            if holds(&here, Some(&e)) {
                kept.push(e);
                continue;
            }
            if store.lookup(e.parent, &e.name)?.map(|(o, _)| o) == Some(s) {
                match self
                    .core
                    .do_unlink(e.parent, OsStr::from_bytes(&e.name), false)
                {
                    Ok(()) => {}
                    Err(err) if err == Errno::ENOENT => {}
                    Err(err) => {
                        kept.push(e);
                        return Err(errno("unlink of a further name", err));
                    }
                }
                touched = true;
            }
            tracing::debug!("watch: {} (a further name) removed here", here.display());
            if !links {
                by_lino.remove(&e.l_ino);
            }
        }
        rec.extra = kept;

        // 2. The record's own name gone here while a further name still holds the file: that
        //    name becomes the record's own, and the store drops the old one.
        if !holds(&primary, None) {
            let here: Vec<bool> = rec
                .extra
                .iter()
                .map(|e| st.extra_path(e).is_some_and(|p| holds(&p, Some(e))))
                .collect();
            if let Some(k) = here.iter().position(|h| *h) {
                let (p, n) = store_name(&rec, &inode);
                if store.lookup(p, &n)?.map(|(o, _)| o) == Some(s) {
                    self.core
                        .do_unlink(p, OsStr::from_bytes(&n), false)
                        .map_err(|e| errno("unlink of a name", e))?;
                    touched = true;
                }
                let e = rec.extra.remove(k);
                tracing::debug!(
                    "watch: {} removed here; the file keeps its other names",
                    primary.display()
                );
                if !links {
                    by_lino.remove(&rec.l_ino);
                    rec.l_ino = e.l_ino;
                    rec.l_size = e.l_size;
                    rec.l_mtime = e.l_mtime;
                    rec.l_hash = e.l_hash.clone();
                }
                rec.parent = e.parent;
                rec.name = e.name;
                rec.local = e.local;
            }
        }

        // 3. New local hard links: the store links the same names. Where the record's own
        //    name went with no recorded name left, the least path is where the main pass
        //    moves it (a rename), so that one is left to it.
        let primary = st.path(s).unwrap_or(primary);
        let mut st_paths: HashSet<PathBuf> =
            rec.extra.iter().filter_map(|e| st.extra_path(e)).collect();
        st_paths.insert(primary.clone());
        let moving = !holds(&primary, None);
        for (i, p) in group.iter().enumerate() {
            if st_paths.contains(p) || (moving && i == 0) {
                continue;
            }
            let parent_rel = p.parent().unwrap_or(Path::new(""));
            let Some(parent) = st.store_dir(scan, by_lino, parent_rel) else {
                self.retry.store(true, Ordering::Relaxed);
                continue;
            };
            let name = file_name(p);
            match store.lookup(parent, &name)? {
                Some((o, _)) if o == s => {}
                Some(_) => {
                    tracing::warn!(
                        "watch: {} clashes with another object of the same name; trying again later",
                        p.display()
                    );
                    self.retry.store(true, Ordering::Relaxed);
                    continue;
                }
                None => {
                    self.core
                        .do_link(s, parent, OsStr::from_bytes(&name))
                        .map_err(|e| errno("link", e))?;
                    touched = true;
                    tracing::debug!("watch: {} linked here", p.display());
                }
            }
            let l = &scan.by_path[p];
            let mut e = Extra {
                parent,
                name: name.clone(),
                local: name,
                l_ino: 0,
                l_size: 0,
                l_mtime: 0,
                l_hash: Vec::new(),
                stamp: stamp(&inode),
            };
            e.set_local(l);
            rec.extra.push(e);
        }

        // 4. Copies edited here: the object takes the copy's content; the export writes it
        //    to the file's other names.
        if !links {
            for k in 0..rec.extra.len() {
                let e = rec.extra[k].clone();
                let Some(rel) = st.extra_path(&e) else {
                    continue;
                };
                let Some(l) = scan.by_path.get(&rel) else {
                    continue;
                };
                if !e.copy_changed(l) {
                    continue;
                }
                let keep_mtime = !self.caps.hash || l.mtime != e.l_mtime;
                if self.import_content(s, &self.root.join(&rel), l, keep_mtime)? {
                    let i = self
                        .live_inode(s)?
                        .ok_or_else(|| anyhow!("inode vanished"))?;
                    rec.extra[k].set_local(l);
                    rec.extra[k].stamp = stamp(&i);
                    // Written to the record's own name by the export.
                    rec.stamp = stale_stamp();
                    tracing::debug!("watch: {} (a copy) edited here", rel.display());
                }
            }
        }

        // The store changed by this pass alone is not a change to write back here.
        if touched && !store_was_changed && rec.stamp != stale_stamp() {
            if let Some(i) = self.live_inode(s)? {
                rec.stamp = stamp(&i);
                for e in rec.extra.iter_mut().filter(|e| e.stamp == before) {
                    e.stamp = stamp(&i);
                }
            }
        }
        st.put(s, rec);
        Ok(())
    }

    /// Creates (or adopts, when the store already has that name unclaimed) the store object
    /// for a local entry that has no record; returns its store inode.
    fn import_new(
        &self,
        st: &mut State,
        scan: &Scan,
        by_lino: &HashMap<u64, u64>,
        rel: &Path,
        l: &Local,
        take_name: bool,
    ) -> anyhow::Result<Option<u64>> {
        if l.kind == FileKind::Symlink && !self.caps.symlinks {
            return Ok(None);
        }
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        let Some(parent) = st.store_dir(scan, by_lino, parent_rel) else {
            self.retry.store(true, Ordering::Relaxed);
            return Ok(None);
        };
        let name = file_name(rel);
        let store = self.core.store();
        let mut existing = store.lookup(parent, &name)?;
        if let Some((o, kind)) = existing {
            if (kind != l.kind || st.recs.contains_key(&o))
                && take_name
                && self.move_aside(st, scan, o, parent, &name)?
            {
                existing = None;
            }
        }
        let s = match existing {
            Some((s, kind)) => {
                if kind != l.kind || st.recs.contains_key(&s) {
                    // Often the rest of this pass frees the name (the object there moved or
                    // went here too): a later pass tries again.
                    tracing::warn!(
                        "watch: {} clashes with another object of the same name; trying again later",
                        rel.display()
                    );
                    self.retry.store(true, Ordering::Relaxed);
                    return Ok(None);
                }
                // The store already holds it (a record lost in a crash, or a home that was
                // mounted before): adopt it and bring its content in line.
                s
            }
            None => {
                let mode = if self.caps.modes {
                    l.mode
                } else if l.kind == FileKind::Directory {
                    0o755
                } else {
                    0o644
                };
                let i = self
                    .core
                    .make_node(
                        &Self::caller(l),
                        parent,
                        OsStr::from_bytes(&name),
                        l.kind,
                        mode,
                        0,
                        0,
                        &l.target,
                    )
                    .map_err(|e| errno("create", e))?;
                i.ino
            }
        };
        let abs = self.root.join(rel);
        if l.kind == FileKind::File && !self.import_content(s, &abs, l, true)? {
            // Changing while read: the next pass finishes it. Record it anyway, with a
            // local state that differs, so the next pass sees an edit.
            let i = self
                .live_inode(s)?
                .ok_or_else(|| anyhow!("inode vanished"))?;
            let mut r = self.new_rec(parent, &name, &name, l, &i);
            r.l_size = u64::MAX;
            st.put(s, r);
            return Ok(Some(s));
        }
        if existing.is_some() && l.kind == FileKind::Directory && self.caps.modes {
            let _ = self.chmod(l, s);
        }
        let i = self
            .live_inode(s)?
            .ok_or_else(|| anyhow!("inode vanished"))?;
        st.put(s, self.new_rec(parent, &name, &name, l, &i));
        tracing::debug!("watch: {} imported", rel.display());
        Ok(Some(s))
    }

    fn new_rec(&self, parent: u64, name: &[u8], local: &[u8], l: &Local, i: &Inode) -> Rec {
        let mut r = Rec {
            parent,
            name: name.to_vec(),
            local: local.to_vec(),
            kind: 0,
            l_ino: 0,
            l_size: 0,
            l_mtime: 0,
            l_mode: 0,
            l_target: Vec::new(),
            l_hash: Vec::new(),
            stamp: stamp(i),
            extra: Vec::new(),
        };
        r.set_local(l);
        r
    }

    /// Brings the store's content, size, mtime (and mode) of inode `s` to the local file's,
    /// writing only the blocks that differ. Returns false when the file changed while it was
    /// read (the next pass tries again). `keep_mtime`: the local mtime says when the content
    /// was written (false for an edit on a folder whose mtimes do not move on write: the
    /// store then keeps the time of this write).
    fn import_content(
        &self,
        s: u64,
        abs: &Path,
        l: &Local,
        keep_mtime: bool,
    ) -> anyhow::Result<bool> {
        let mut f = match File::open(abs) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.retry.store(true, Ordering::Relaxed);
                return Ok(false);
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", abs.display())),
        };
        let store = self.core.store();
        let inode = store
            .get_inode(s)?
            .ok_or_else(|| anyhow!("inode vanished"))?;
        let theirs = store.open_content(s, true)?;
        let fh = self
            .core
            .do_open(s, OpenFlags(libc::O_RDWR))
            .map_err(|e| errno("open", e))?;
        // What was read is hashed when the scan hashed the file: a change between the scan
        // and this read shows even where size and mtime do not move.
        let mut hasher = l.hash.map(|_| blake3::Hasher::new());
        let result = (|| -> anyhow::Result<()> {
            let mut mine = vec![0u8; BLOCK];
            let mut other = vec![0u8; BLOCK];
            let mut off = 0u64;
            loop {
                let n = read_full(&mut f, &mut mine)?;
                if n == 0 {
                    break;
                }
                if let Some(h) = hasher.as_mut() {
                    h.update(&mine[..n]);
                }
                let m = if off < inode.size {
                    let want = (inode.size - off).min(n as u64) as usize;
                    read_full_at(&theirs, &mut other[..want], off)?
                } else {
                    0
                };
                if m != n || mine[..n] != other[..n] {
                    self.core
                        .do_write(s, fh, off, &mine[..n])
                        .map_err(|e| errno("write", e))?;
                }
                off += n as u64;
            }
            let caller = Self::caller(l);
            let size = (off < inode.size).then_some(off);
            let mode = (self.caps.modes && l.mode != u32::from(inode.perm)).then_some(l.mode);
            let now = store
                .get_inode(s)?
                .ok_or_else(|| anyhow!("inode vanished"))?;
            let mtime = (keep_mtime && ns(now.mtime) != l.mtime)
                .then(|| TimeOrNow::SpecificTime(system_time(l.mtime)));
            if size.is_some() || mode.is_some() || mtime.is_some() {
                self.core
                    .do_setattr(&caller, s, mode, None, None, size, None, mtime, None)
                    .map_err(|e| errno("setattr", e))?;
            }
            Ok(())
        })();
        let released = self.core.do_release(s, fh);
        result?;
        released.map_err(|e| errno("close", e))?;
        let after = local_of(abs, self.caps.inos, false).ok();
        let read_as_scanned = match (hasher, l.hash) {
            (Some(h), Some(want)) => *h.finalize().as_bytes() == want,
            _ => true,
        };
        let stable = read_as_scanned
            && after.is_some_and(|a| a.size == l.size && a.mtime == l.mtime && a.ino == l.ino);
        if !stable {
            tracing::debug!("watch: {} changed while read; again later", abs.display());
            self.retry.store(true, Ordering::Relaxed);
        }
        Ok(stable)
    }

    /// Saves the local file beside the store's object as a conflicted copy (a new object).
    fn import_conflicted_copy(&self, inode: &Inode, abs: &Path, l: &Local) -> anyhow::Result<bool> {
        let name = self
            .core
            .free_conflicted_copy_name(inode.parent, &inode.name)?;
        let i = self
            .core
            .make_node(
                &Self::caller(l),
                inode.parent,
                OsStr::from_bytes(&name),
                FileKind::File,
                if self.caps.modes {
                    l.mode
                } else {
                    u32::from(inode.perm)
                },
                0,
                0,
                &[],
            )
            .map_err(|e| errno("create", e))?;
        let ok = self.import_content(i.ino, abs, l, true)?;
        tracing::warn!(
            "watch: {} changed here and remotely; this device's version is kept as {:?}",
            abs.display(),
            String::from_utf8_lossy(&name)
        );
        Ok(ok)
    }

    // ----- store → folder -----

    fn export(&self, st: &mut State) -> anyhow::Result<()> {
        // 1. Objects gone from the store: remove them here unless changed here since.
        let mut gone: Vec<(PathBuf, u64)> = Vec::new();
        for s in st.recs.keys().copied().collect::<Vec<_>>() {
            if self.live_inode(s)?.is_none() {
                match st.path(s) {
                    Some(p) => gone.push((p, s)),
                    None => st.remove(s),
                }
            }
        }
        gone.sort_by_key(|(p, _)| std::cmp::Reverse((depth(p), p.clone())));
        for (rel, s) in &gone {
            let mut rec = st.recs[s].clone();
            if !rec.extra.is_empty() {
                let gone = std::mem::take(&mut rec.extra);
                rec.extra = self.remove_extras(st, &rec, gone);
                st.put(*s, rec.clone());
            }
            let abs = self.root.join(rel);
            match local_of(&abs, self.caps.inos, self.caps.hash) {
                Ok(l) if l.ino == rec.l_ino && !rec.local_changed(&l) => {
                    let r = if l.kind == FileKind::Directory {
                        std::fs::remove_dir(&abs)
                    } else {
                        std::fs::remove_file(&abs)
                    };
                    match r {
                        Ok(()) => tracing::debug!("watch: {} deleted remotely", rel.display()),
                        Err(e) => {
                            // A folder still holding local files: they are imported next.
                            tracing::debug!("watch: keeping {}: {e}", rel.display());
                            self.retry.store(true, Ordering::Relaxed);
                            continue;
                        }
                    }
                    st.remove(*s);
                }
                Ok(l) if l.ino == rec.l_ino => {
                    // Edited here: the import brings it back as a new object.
                    self.retry.store(true, Ordering::Relaxed);
                }
                _ => st.remove(*s),
            }
        }
        // 2. A record's own name gone from the store while the file keeps a further name:
        //    that name becomes the record's own (and the old one goes here).
        self.export_own_names(st)?;
        // 3. The store's tree, top down; then the further names of files with several.
        self.export_dir(st, ROOT_INO, PathBuf::new())?;
        self.export_names(st)
    }

    fn export_own_names(&self, st: &mut State) -> anyhow::Result<()> {
        let with_extra: Vec<u64> = st
            .recs
            .iter()
            .filter(|(_, r)| !r.extra.is_empty())
            .map(|(s, _)| *s)
            .collect();
        for s in with_extra {
            let Some(inode) = self.live_inode(s)? else {
                continue;
            };
            let Some(mut rec) = st.recs.get(&s).cloned() else {
                continue;
            };
            if has_name(&inode, rec.parent, &rec.name) {
                continue;
            }
            let Some(k) = rec
                .extra
                .iter()
                .position(|e| has_name(&inode, e.parent, &e.name))
            else {
                // Renamed in the store: the tree pass moves it.
                continue;
            };
            if let Some(rel) = st.path(s) {
                let abs = self.root.join(&rel);
                match local_of(&abs, self.caps.inos, self.caps.hash) {
                    Ok(l) if l.ino == rec.l_ino && (self.caps.links || !rec.local_changed(&l)) => {
                        std::fs::remove_file(&abs)
                            .with_context(|| format!("removing {}", abs.display()))?;
                        tracing::debug!("watch: {} removed (a name gone)", rel.display());
                    }
                    Ok(_) => {
                        // Edited here: the next pass imports it first.
                        self.retry.store(true, Ordering::Relaxed);
                        continue;
                    }
                    Err(_) => {}
                }
            }
            let e = rec.extra.remove(k);
            if !self.caps.links {
                rec.l_ino = e.l_ino;
                rec.l_size = e.l_size;
                rec.l_mtime = e.l_mtime;
                rec.l_hash = e.l_hash.clone();
            }
            rec.parent = e.parent;
            rec.name = e.name;
            rec.local = e.local;
            st.put(s, rec);
        }
        Ok(())
    }

    /// Removes the local entries of further names `gone` of `rec`'s file (a copy only when
    /// unchanged here; one changed here is left to the import as a file of its own);
    /// returns the ones that could not be removed.
    fn remove_extras(&self, st: &State, rec: &Rec, gone: Vec<Extra>) -> Vec<Extra> {
        let mut kept = Vec::new();
        for e in gone {
            let Some(rel) = st.extra_path(&e) else {
                continue;
            };
            let abs = self.root.join(&rel);
            let ours = match local_of(&abs, self.caps.inos, self.caps.hash) {
                Ok(l) if self.caps.links => {
                    kind_code(l.kind) == rec.kind && (l.ino == rec.l_ino || l.ino == e.l_ino)
                }
                Ok(l) => {
                    if l.ino == e.l_ino && e.copy_changed(&l) {
                        // Edited here: kept, and imported as a file of its own.
                        self.retry.store(true, Ordering::Relaxed);
                        continue;
                    }
                    l.ino == e.l_ino
                }
                Err(_) => false,
            };
            if ours {
                match std::fs::remove_file(&abs) {
                    Ok(()) => tracing::debug!("watch: {} removed (a name gone)", rel.display()),
                    Err(err) => {
                        tracing::debug!("watch: keeping {}: {err}", rel.display());
                        self.retry.store(true, Ordering::Relaxed);
                        kept.push(e);
                    }
                }
            }
        }
        kept
    }

    /// Brings the further names of every file with several to the store's: removes the
    /// ones it dropped, makes the new ones (hard links to the file, or copies), and writes
    /// copies (or re-links names that a rewrite of the file left on its old content).
    fn export_names(&self, st: &mut State) -> anyhow::Result<()> {
        let candidates: Vec<u64> = st
            .recs
            .iter()
            .filter(|(_, r)| r.kind != 1)
            .map(|(s, _)| *s)
            .collect();
        for s in candidates {
            let Some(inode) = self.live_inode(s)? else {
                continue;
            };
            let Some(mut rec) = st.recs.get(&s).cloned() else {
                continue;
            };
            if inode.links.is_empty() && rec.extra.is_empty() {
                continue;
            }
            if inode.kind == FileKind::Symlink && !self.caps.links {
                continue;
            }
            if !has_name(&inode, rec.parent, &rec.name) {
                // Not moved to its store name yet (a clash): later.
                self.retry.store(true, Ordering::Relaxed);
                continue;
            }
            let Some(prim_rel) = st.path(s) else {
                continue;
            };
            let prim = self.root.join(&prim_rel);
            match local_of(&prim, self.caps.inos, false) {
                Ok(l) if l.ino == rec.l_ino => {}
                _ => {
                    // Changed here since: the next pass imports it first.
                    self.retry.store(true, Ordering::Relaxed);
                    continue;
                }
            }
            let others: Vec<(u64, Vec<u8>)> = inode
                .names()
                .filter(|(p, n)| !(*p == rec.parent && *n == rec.name.as_slice()))
                .map(|(p, n)| (p, n.to_vec()))
                .collect();
            let before = rec.extra.clone();
            // 1. Names the store dropped.
            let (stay, gone): (Vec<Extra>, Vec<Extra>) = std::mem::take(&mut rec.extra)
                .into_iter()
                .partition(|e| others.iter().any(|(p, n)| *p == e.parent && *n == e.name));
            let mut extra = stay;
            extra.extend(self.remove_extras(st, &rec, gone));
            // 2. Names already here: re-linked, or their copy rewritten when the store moved.
            for e in &mut extra {
                let Some(rel) = st.extra_path(e) else {
                    continue;
                };
                let abs = self.root.join(&rel);
                let Ok(l) = local_of(&abs, self.caps.inos, false) else {
                    continue;
                };
                if self.caps.links {
                    if l.ino != rec.l_ino && l.ino == e.l_ino {
                        let tmp = temp_path(&abs);
                        std::fs::hard_link(&prim, &tmp)
                            .and_then(|()| std::fs::rename(&tmp, &abs))
                            .with_context(|| format!("linking {}", abs.display()))?;
                        e.l_ino = rec.l_ino;
                    }
                    e.stamp = stamp(&inode);
                } else if e.stamp != stamp(&inode) {
                    let l = if self.caps.hash {
                        local_of(&abs, self.caps.inos, true)?
                    } else {
                        l
                    };
                    if e.copy_changed(&l) {
                        self.retry.store(true, Ordering::Relaxed);
                        continue;
                    }
                    let l = self.write_file(&inode, &abs)?;
                    e.set_local(&l);
                    e.stamp = stamp(&inode);
                    tracing::debug!("watch: {} (a copy) written from the store", rel.display());
                }
            }
            // 3. New names.
            for (p, n) in &others {
                if extra.iter().any(|e| e.parent == *p && e.name == *n) {
                    continue;
                }
                let Some(dir_rel) = st.dir_path(*p) else {
                    self.retry.store(true, Ordering::Relaxed);
                    continue;
                };
                let abs_dir = self.root.join(&dir_rel);
                let rules = self.caps.names;
                let mut taken: HashSet<Vec<u8>> = HashSet::new();
                if let Ok(rd) = std::fs::read_dir(&abs_dir) {
                    for e in rd.flatten() {
                        taken.insert(names::fold(e.file_name().as_bytes(), rules));
                    }
                }
                // Its own earlier link may be here already (a pass cut short).
                let plain = abs_dir.join(OsStr::from_bytes(n));
                // Where the folder holds every name as it is, a name taken here is taken by
                // an entry made since this pass's import (a further name replaced by a
                // folder between passes): the next import settles who has it. An adapted
                // name would stay here while every other device has the store's.
                let exact = !rules.restricted && !rules.fold_case;
                let local = match local_of(&plain, self.caps.inos, false) {
                    Ok(l) if self.caps.links && l.ino == rec.l_ino => n.clone(),
                    Ok(_) if exact => {
                        self.retry.store(true, Ordering::Relaxed);
                        continue;
                    }
                    Err(_) if exact => n.clone(),
                    _ => names::adapt(n, rules, &|k| taken.contains(k)),
                };
                let abs = abs_dir.join(OsStr::from_bytes(&local));
                let l = if self.caps.links {
                    match local_of(&abs, self.caps.inos, false) {
                        Ok(l) if l.ino == rec.l_ino => l,
                        Ok(_) => {
                            self.retry.store(true, Ordering::Relaxed);
                            continue;
                        }
                        Err(_) => {
                            std::fs::hard_link(&prim, &abs)
                                .with_context(|| format!("linking {}", abs.display()))?;
                            local_of(&abs, self.caps.inos, false)?
                        }
                    }
                } else {
                    if abs.symlink_metadata().is_ok() {
                        self.retry.store(true, Ordering::Relaxed);
                        continue;
                    }
                    self.write_file(&inode, &abs)?
                };
                tracing::debug!(
                    "watch: {} written as a further name{}",
                    dir_rel.join(OsStr::from_bytes(&local)).display(),
                    if self.caps.links { "" } else { " (a copy)" }
                );
                let mut e = Extra {
                    parent: *p,
                    name: n.clone(),
                    local,
                    l_ino: 0,
                    l_size: 0,
                    l_mtime: 0,
                    l_hash: Vec::new(),
                    stamp: stamp(&inode),
                };
                e.set_local(&l);
                extra.push(e);
            }
            if extra != before {
                rec.extra = extra;
                st.put(s, rec);
            }
        }
        Ok(())
    }

    fn export_dir(&self, st: &mut State, dir: u64, rel: PathBuf) -> anyhow::Result<()> {
        let store = self.core.store();
        let rules = self.caps.names;
        let abs_dir = self.root.join(&rel);
        let mut taken: HashSet<Vec<u8>> = HashSet::new();
        if let Ok(rd) = std::fs::read_dir(&abs_dir) {
            for e in rd.flatten() {
                taken.insert(names::fold(e.file_name().as_bytes(), rules));
            }
        }
        let children = store.list_dir(dir)?;
        // Objects that stay where they are keep their local names first.
        let mut placed: HashMap<u64, Vec<u8>> = HashMap::new();
        for c in &children {
            if let Some(r) = st.recs.get(&c.ino) {
                if r.parent == dir && r.name == c.name {
                    placed.insert(c.ino, r.local.clone());
                    taken.insert(names::fold(&r.local, rules));
                }
            }
        }
        for c in &children {
            if st.deferred.contains(&c.ino) {
                continue;
            }
            let Some(inode) = self.live_inode(c.ino)? else {
                continue;
            };
            if inode.kind == FileKind::Symlink && !self.caps.symlinks {
                continue;
            }
            if !matches!(
                inode.kind,
                FileKind::File | FileKind::Directory | FileKind::Symlink
            ) {
                continue;
            }
            if !inode.links.is_empty() {
                // A file with several names is written here once, under its record's name
                // (or, new or renamed, under its first); the others are further names
                // ([`Reconciler::export_names`]).
                let own = match st.recs.get(&c.ino) {
                    Some(r) if has_name(&inode, r.parent, &r.name) => {
                        r.parent == dir && r.name == c.name
                    }
                    _ => inode.parent == dir && inode.name == c.name,
                };
                if !own {
                    continue;
                }
            }
            let local_name = match placed.get(&c.ino) {
                Some(n) => n.clone(),
                None => {
                    // A rename within this folder frees the object's own old name.
                    if let Some(r) = st.recs.get(&c.ino).filter(|r| r.parent == dir) {
                        let own = names::fold(&r.local, rules);
                        if !placed.values().any(|p| names::fold(p, rules) == own) {
                            taken.remove(&own);
                        }
                    }
                    let n = names::adapt(&c.name, rules, &|k| taken.contains(k));
                    taken.insert(names::fold(&n, rules));
                    // Moved or renamed in the store: move the local entry along.
                    if let Some(r) = st.recs.get(&c.ino).cloned() {
                        let old = st.path(c.ino).map(|p| self.root.join(p));
                        let moved = old.as_ref().is_some_and(|o| {
                            local_of(o, self.caps.inos, false).is_ok_and(|l| l.ino == r.l_ino)
                                && std::fs::rename(o, abs_dir.join(OsStr::from_bytes(&n))).is_ok()
                        });
                        let mut r = r;
                        if moved {
                            // Without stable inode numbers the identity is the path.
                            if let Ok(l) = local_of(
                                &abs_dir.join(OsStr::from_bytes(&n)),
                                self.caps.inos,
                                false,
                            ) {
                                r.l_ino = l.ino;
                            }
                        }
                        r.parent = dir;
                        r.name = c.name.clone();
                        r.local = n.clone();
                        if !moved {
                            // Not where it was: written afresh below.
                            r.stamp = stale_stamp();
                        }
                        st.put(c.ino, r);
                    }
                    if n != c.name {
                        tracing::info!(
                            "watch: {:?} is kept here as {:?} (the file system cannot hold the name)",
                            String::from_utf8_lossy(&c.name),
                            String::from_utf8_lossy(&n)
                        );
                    }
                    n
                }
            };
            let child_rel = rel.join(OsStr::from_bytes(&local_name));
            if let Err(e) = self.export_one(st, dir, &c.name, &local_name, &inode, &child_rel) {
                tracing::warn!("watch: cannot write {}: {e:#}", child_rel.display());
                self.retry.store(true, Ordering::Relaxed);
                continue;
            }
            if inode.kind == FileKind::Directory {
                self.export_dir(st, c.ino, child_rel)?;
            }
        }
        Ok(())
    }

    /// Makes the local entry at `rel` match store object `inode` when the store changed it
    /// (or it is new, or missing here).
    fn export_one(
        &self,
        st: &mut State,
        parent: u64,
        name: &[u8],
        local_name: &[u8],
        inode: &Inode,
        rel: &Path,
    ) -> anyhow::Result<()> {
        let abs = self.root.join(rel);
        let rec = st.recs.get(&inode.ino).cloned();
        let here = local_of(&abs, self.caps.inos, false).ok();
        let needs = match (&rec, &here) {
            (_, None) => true,
            (Some(r), Some(l)) if l.ino == r.l_ino => {
                let store_changed = r.store_changed(inode);
                // About to be overwritten: where only the content tells an edit, hash it.
                let hashed = if store_changed && self.caps.hash && l.kind == FileKind::File {
                    match local_of(&abs, self.caps.inos, true) {
                        Ok(h) => Some(h),
                        Err(_) => {
                            self.retry.store(true, Ordering::Relaxed);
                            return Ok(());
                        }
                    }
                } else {
                    None
                };
                if r.local_changed(hashed.as_ref().unwrap_or(l)) {
                    // Edited here after this pass's import: the next pass imports it first.
                    self.retry.store(true, Ordering::Relaxed);
                    return Ok(());
                }
                store_changed
            }
            (None, Some(l))
                if inode.kind == FileKind::Directory && l.kind == FileKind::Directory =>
            {
                true
            }
            (_, Some(_)) => {
                // Something else took the name here meanwhile: never overwrite it; the next
                // pass imports it.
                self.retry.store(true, Ordering::Relaxed);
                return Ok(());
            }
        };
        if !needs {
            return Ok(());
        }
        let l = match inode.kind {
            FileKind::Directory => {
                if here.as_ref().is_none_or(|l| l.kind != FileKind::Directory) {
                    std::fs::create_dir(&abs)
                        .with_context(|| format!("creating {}", abs.display()))?;
                }
                if self.caps.modes {
                    let _ = std::fs::set_permissions(
                        &abs,
                        std::fs::Permissions::from_mode(u32::from(inode.perm)),
                    );
                }
                local_of(&abs, self.caps.inos, false)?
            }
            FileKind::Symlink => {
                let tmp = temp_path(&abs);
                std::os::unix::fs::symlink(OsStr::from_bytes(&inode.symlink), &tmp)?;
                std::fs::rename(&tmp, &abs)?;
                local_of(&abs, self.caps.inos, false)?
            }
            _ => self.write_file(inode, &abs)?,
        };
        tracing::debug!("watch: {} written from the store", rel.display());
        let mut r = self.new_rec(parent, name, local_name, &l, inode);
        r.stamp = stamp(inode);
        // Further names keep their records ([`Reconciler::export_names`] brings them along).
        r.extra = rec.map(|r| r.extra).unwrap_or_default();
        st.put(inode.ino, r);
        Ok(())
    }

    /// Writes the store's content of `inode` over `abs` atomically: a temp file in the same
    /// folder, fsync, mode and mtime, rename over.
    fn write_file(&self, inode: &Inode, abs: &Path) -> anyhow::Result<Local> {
        let tmp = temp_path(abs);
        let r = (|| -> anyhow::Result<()> {
            let mut out =
                File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            let mut copied = 0;
            match File::open(self.core.store().content_path(inode.ino)) {
                Ok(src) => {
                    let mut src = src.take(inode.size);
                    copied = std::io::copy(&mut src, &mut out)
                        .with_context(|| format!("writing {}", tmp.display()))?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            if copied < inode.size {
                // A sparse tail (not every file system can truncate: only when needed).
                out.set_len(inode.size)
                    .with_context(|| format!("sizing {}", tmp.display()))?;
            }
            if self.caps.modes {
                out.set_permissions(std::fs::Permissions::from_mode(u32::from(inode.perm)))?;
            }
            // Some file systems keep no such times (or refuse to set them): the record
            // holds what the file really has.
            if let Err(e) = out.set_modified(system_time(ns(inode.mtime))) {
                tracing::debug!("watch: cannot set the mtime of {}: {e}", abs.display());
            }
            out.sync_all()
                .with_context(|| format!("fsync of {}", tmp.display()))?;
            Ok(())
        })();
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, abs).with_context(|| format!("renaming over {}", abs.display()))?;
        Ok(local_of(abs, self.caps.inos, self.caps.hash)?)
    }
}

fn temp_path(abs: &Path) -> PathBuf {
    let dir = abs.parent().unwrap_or(Path::new("/"));
    dir.join(format!("{TMP_PREFIX}{:016x}", rand::random::<u64>()))
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
