//! Ignore rules: which paths of the synced tree stay on this device.
//!
//! Two sources, matched with gitignore syntax (the `ignore` crate): `.deltaignore` files at
//! any folder level of the synced tree, each applying below its folder, and built-in patterns
//! for temporary files (editors' swap and lock files, partial downloads, trash folders). The
//! precedence rules are in [`rules`]; what users get is in `docs/ignore.md`.
//!
//! What it owns: a cache of each folder's parsed `.deltaignore`, keyed by the folder's inode.
//!
//! What always holds:
//! - Rules are read from the mounted tree itself, through the store (the rule file's
//!   content file), so what a device ignores is what its tree says, including a rule file
//!   that arrived from another device.
//! - A cached rule file is used only while its stamp (inode, size, mtime, ctime) is the one
//!   it was read at; any change of the file, a new one, a removed or renamed one, is seen at
//!   the next question. Nobody has to invalidate the cache.
//! - Asking never changes the store.

pub mod rules;

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::store::{FileKind, Inode, Store, StoreError, Timespec, ROOT_INO};
pub use rules::{RuleFile, Scope, BUILTIN, RULE_FILE};

/// Largest rule file read; a bigger one is read up to this size (and a warning logged).
const MAX_RULE_FILE: u64 = 1 << 20;
/// Cached folders kept before the cache is emptied (it refills from the store).
const MAX_CACHED: usize = 1 << 16;
/// Parent chains longer than this are taken as broken (a corrupt chain must not loop).
const MAX_DEPTH: usize = 4096;

/// What a cached rule file was read at.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    ino: u64,
    size: u64,
    mtime: Timespec,
    ctime: Timespec,
}

struct Cached {
    /// None: the folder had no rule file.
    stamp: Option<Stamp>,
    rules: Option<Arc<RuleFile>>,
}

/// The device's ignore rules over its store.
pub struct Ignore {
    builtin: RuleFile,
    cache: Mutex<HashMap<u64, Cached>>,
}

impl Default for Ignore {
    fn default() -> Self {
        Self::new()
    }
}

impl Ignore {
    pub fn new() -> Ignore {
        Ignore {
            builtin: RuleFile::builtin(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The stamp of folder `dir`'s rule file, None when it has none (or it is not a file).
    fn stamp(store: &Store, dir: u64) -> Result<Option<Stamp>, StoreError> {
        let Some((ino, FileKind::File)) = store.lookup(dir, RULE_FILE)? else {
            return Ok(None);
        };
        Ok(store.get_inode(ino)?.map(|i| Stamp {
            ino,
            size: i.size,
            mtime: i.mtime,
            ctime: i.ctime,
        }))
    }

    /// The rules of folder `dir`'s own `.deltaignore`, from the cache while it is current.
    ///
    /// # Errors
    /// Reading the store failed. (An unreadable content file is logged and counts as no rules.)
    pub fn rules_of(&self, store: &Store, dir: u64) -> Result<Option<Arc<RuleFile>>, StoreError> {
        let stamp = Self::stamp(store, dir)?;
        if let Some(c) = self.cache.lock().get(&dir) {
            if c.stamp == stamp {
                return Ok(c.rules.clone());
            }
        }
        let rules = stamp.map(|s| Arc::new(Self::read(store, dir, s)));
        let mut cache = self.cache.lock();
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(
            dir,
            Cached {
                stamp,
                rules: rules.clone(),
            },
        );
        Ok(rules)
    }

    fn read(store: &Store, dir: u64, s: Stamp) -> RuleFile {
        if s.size > MAX_RULE_FILE {
            tracing::warn!(
                "the .deltaignore of folder inode {dir} is {} bytes: only its first {MAX_RULE_FILE} are read",
                s.size
            );
        }
        let want = s.size.min(MAX_RULE_FILE);
        let mut text = Vec::with_capacity(want as usize);
        let r = store
            .open_content(s.ino, false)
            .map_err(|e| e.to_string())
            .and_then(|f| {
                f.take(want)
                    .read_to_end(&mut text)
                    .map_err(|e| e.to_string())
            });
        match r {
            Ok(_) => {}
            // A rule file created but never written has no content file yet.
            Err(_) if s.size == 0 => {}
            Err(e) => {
                tracing::warn!("cannot read the .deltaignore of folder inode {dir}: {e}");
                text.clear();
            }
        }
        let (rules, problems) = RuleFile::parse(&text);
        for p in problems {
            tracing::warn!("the .deltaignore of folder inode {dir}, {p}");
        }
        rules
    }

    /// The scope of rules inside folder `dir` (walks its parents up to the root).
    ///
    /// # Errors
    /// Reading the store failed.
    pub fn scope_of(&self, store: &Store, dir: u64) -> Result<Scope, StoreError> {
        let mut chain = Vec::new();
        let mut at = dir;
        while at != ROOT_INO {
            // A folder chain that does not reach the root (a store damaged by hand) ignores
            // nothing but the built-in names: ignoring would announce deletes.
            let Some(i) = store.get_inode(at)? else {
                return Ok(Scope::root(None));
            };
            if chain.len() >= MAX_DEPTH {
                return Ok(Scope::root(None));
            }
            at = i.parent;
            chain.push(i);
        }
        let mut scope = Scope::root(self.rules_of(store, ROOT_INO)?);
        for i in chain.iter().rev() {
            scope = self.enter(store, &scope, i.ino, &i.name)?;
        }
        Ok(scope)
    }

    /// The scope inside folder `dir`, named `name`, a child of the folder of `scope`.
    ///
    /// # Errors
    /// Reading the store failed.
    pub fn enter(
        &self,
        store: &Store,
        scope: &Scope,
        dir: u64,
        name: &[u8],
    ) -> Result<Scope, StoreError> {
        let rules = if scope.ignored() {
            None
        } else {
            self.rules_of(store, dir)?
        };
        Ok(scope.enter(&self.builtin, name, rules))
    }

    /// Whether the entry `name` of the folder of `scope` is ignored.
    pub fn is_ignored_in(&self, scope: &Scope, name: &[u8], is_dir: bool) -> bool {
        scope.is_ignored(&self.builtin, name, is_dir)
    }

    /// Whether `inode`'s current path is ignored (itself or a folder above it).
    ///
    /// # Errors
    /// Reading the store failed.
    pub fn is_ignored(&self, store: &Store, inode: &Inode) -> Result<bool, StoreError> {
        if inode.ino == ROOT_INO {
            return Ok(false);
        }
        let scope = self.scope_of(store, inode.parent)?;
        Ok(self.is_ignored_in(&scope, &inode.name, inode.kind == FileKind::Directory))
    }
}
