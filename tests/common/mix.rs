//! The seeded random mix of name operations (create, write, mkdir, rmdir, link, unlink,
//! rename over files and empty folders, exchange, chmod, symlink) that the names and watch
//! tests run on a real tree, and the name-by-name view of a tree (inode grouping included)
//! they compare across devices.
//!
//! `DELTADRIVE_NAMES_SEED` picks seeds (`7`, `4,9,17` or `1..40`, end excluded) and
//! `DELTADRIVE_NAMES_OPS` the operations per device and seed (default 300).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

use super::cluster::walk;
use super::renameat2;

/// One name of a mounted tree, as these tests compare it across devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Name {
    Dir {
        mode: u32,
    },
    File {
        mode: u32,
        size: u64,
        hash: String,
        nlink: u64,
        /// Every name of the tree on the same inode, this one included.
        names: Vec<String>,
    },
    Symlink {
        target: PathBuf,
        nlink: u64,
        names: Vec<String>,
    },
}

/// The tree under `root`, name by name, with the inode grouping of every non-folder.
pub fn names(root: &Path) -> BTreeMap<String, Name> {
    let all = walk(root);
    let mut by_ino: HashMap<u64, Vec<String>> = HashMap::new();
    for (rel, _, md) in &all {
        if !md.is_dir() {
            by_ino.entry(md.ino()).or_default().push(rel.clone());
        }
    }
    for v in by_ino.values_mut() {
        v.sort();
    }
    all.into_iter()
        .map(|(rel, p, md)| {
            let ft = md.file_type();
            let name = if ft.is_dir() {
                Name::Dir {
                    mode: md.mode() & 0o7777,
                }
            } else if ft.is_symlink() {
                Name::Symlink {
                    target: fs::read_link(&p).unwrap_or_default(),
                    nlink: md.nlink(),
                    names: by_ino[&md.ino()].clone(),
                }
            } else {
                Name::File {
                    mode: md.mode() & 0o7777,
                    size: md.len(),
                    hash: hash(&fs::read(&p).unwrap_or_default()),
                    nlink: md.nlink(),
                    names: by_ino[&md.ino()].clone(),
                }
            };
            (rel, name)
        })
        .collect()
}

pub fn hash(b: &[u8]) -> String {
    blake3::hash(b).to_hex().to_string()
}

/// Seeds from `DELTADRIVE_NAMES_SEED` (`7`, `4,9,17` or `1..40`), else `default`.
pub fn seeds(default: &[u64]) -> Vec<u64> {
    let Ok(v) = std::env::var("DELTADRIVE_NAMES_SEED") else {
        return default.to_vec();
    };
    if let Some((a, b)) = v.split_once("..") {
        let (a, b): (u64, u64) = (a.trim().parse().unwrap(), b.trim().parse().unwrap());
        return (a..b).collect();
    }
    v.split(',')
        .map(|s| s.trim().parse().expect("DELTADRIVE_NAMES_SEED: numbers"))
        .collect()
}

pub fn ops_per_seed() -> usize {
    std::env::var("DELTADRIVE_NAMES_OPS")
        .map(|v| v.parse().expect("DELTADRIVE_NAMES_OPS: a number"))
        .unwrap_or(300)
}

/// Prints the seed and how to replay it when the test fails while this is alive.
pub struct ReplayHint(String);

impl Drop for ReplayHint {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.0);
        }
    }
}

/// The errors the kernel may legally give a random operation on a random name.
pub const LEGAL: [i32; 8] = [
    libc::ENOENT,
    libc::EEXIST,
    libc::ENOTEMPTY,
    libc::ENOTDIR,
    libc::EISDIR,
    libc::EINVAL,
    libc::EPERM,
    libc::ELOOP,
];

/// A seeded random mix of operations on names below one folder of a mount.
pub struct Mix {
    rng: StdRng,
    root: PathBuf,
    /// Every operation with its outcome, printed on a failure.
    pub log: Vec<String>,
}

pub const PARTS: [&str; 5] = ["a", "b", "c", "d", "e"];
pub const MODES: [u32; 6] = [0o600, 0o644, 0o640, 0o755, 0o700, 0o444];

impl Mix {
    pub fn new(seed: u64, root: PathBuf) -> Mix {
        Mix {
            rng: StdRng::seed_from_u64(seed),
            root,
            log: Vec::new(),
        }
    }

    /// A new name in a random existing folder (at most 3 levels deep), from a small
    /// alphabet so that operations collide often.
    fn fresh(&mut self, names: &[(String, bool)]) -> String {
        let dirs: Vec<&str> = std::iter::once("")
            .chain(
                names
                    .iter()
                    .filter(|(n, dir)| *dir && n.matches('/').count() < 2)
                    .map(|(n, _)| n.as_str()),
            )
            .collect();
        let dir = *dirs.choose(&mut self.rng).unwrap();
        let part = *PARTS.choose(&mut self.rng).unwrap();
        if dir.is_empty() {
            part.to_string()
        } else {
            format!("{dir}/{part}")
        }
    }

    /// An existing name most of the time, else a fresh one.
    fn existing(&mut self, names: &[(String, bool)]) -> String {
        match names.choose(&mut self.rng) {
            Some((n, _)) if self.rng.random_bool(0.85) => n.clone(),
            _ => self.fresh(names),
        }
    }

    fn content(&mut self) -> Vec<u8> {
        let len = if self.rng.random_bool(0.1) {
            self.rng.random_range(10_000..300_000)
        } else {
            self.rng.random_range(0..3000)
        };
        let mut v = vec![0u8; len];
        self.rng.fill(&mut v[..]);
        v
    }

    /// Runs `n` operations; an error the kernel may legally give is an outcome, any other
    /// error is returned with the operation.
    pub fn run(&mut self, n: usize) -> Result<(), String> {
        for _ in 0..n {
            let (what, r) = self.step();
            let outcome = match &r {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("{e}"),
            };
            self.log.push(format!("{what} -> {outcome}"));
            if let Err(e) = r {
                if !e.raw_os_error().is_some_and(|c| LEGAL.contains(&c)) {
                    return Err(format!("{what}: unexpected error {e}"));
                }
            }
        }
        Ok(())
    }

    fn step(&mut self) -> (String, std::io::Result<()>) {
        // The names there are now (what the other device's mix did included).
        // A watcher's own temp files (written, then renamed over a name) are not the user's:
        // writing into one while the watcher fills it is no user action.
        let names: Vec<(String, bool)> = walk(&self.root)
            .into_iter()
            .filter(|(rel, _, _)| !rel.contains(".deltadrive-tmp-"))
            .map(|(rel, _, md)| (rel, md.is_dir()))
            .collect();
        let roll = self.rng.random_range(0..100);
        // New names for create, mkdir and symlink; existing ones (or new) for the rest,
        // the second name of link and rename half the time over an existing one.
        let x = match roll {
            0..=13 | 28..=37 | 94..=95 => self.fresh(&names),
            _ => self.existing(&names),
        };
        let y = if self.rng.random_bool(0.5) {
            self.existing(&names)
        } else {
            self.fresh(&names)
        };
        let (px, py) = (self.root.join(&x), self.root.join(&y));
        match roll {
            0..=13 => {
                let body = self.content();
                let r = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .open(&px)
                    .and_then(|mut f| f.write_all(&body));
                (format!("create {x} ({} bytes)", body.len()), r)
            }
            14..=27 => {
                let body = self.content();
                let how = self.rng.random_range(0..4);
                let at = self.rng.random_range(0..4000u64);
                let r = fs::OpenOptions::new()
                    .write(true)
                    .truncate(how == 0)
                    .append(how == 1)
                    .open(&px)
                    .and_then(|f| match how {
                        2 => f.set_len(at),
                        3 => std::os::unix::fs::FileExt::write_all_at(&f, &body, at),
                        _ => (&f).write_all(&body),
                    });
                let kind = ["rewrite", "append", "truncate", "write at"][how];
                (format!("{kind} {x} ({} bytes at {at})", body.len()), r)
            }
            28..=37 => (format!("mkdir {x}"), fs::create_dir(&px)),
            38..=43 => (format!("rmdir {x}"), fs::remove_dir(&px)),
            44..=55 => (format!("link {x} {y}"), fs::hard_link(&px, &py)),
            56..=64 => (format!("unlink {x}"), fs::remove_file(&px)),
            65..=78 => (format!("rename {x} {y}"), fs::rename(&px, &py)),
            79..=84 => (
                format!("exchange {x} {y}"),
                renameat2(&px, &py, libc::RENAME_EXCHANGE)
                    .map_err(std::io::Error::from_raw_os_error),
            ),
            85..=87 => (
                format!("rename-noreplace {x} {y}"),
                renameat2(&px, &py, libc::RENAME_NOREPLACE)
                    .map_err(std::io::Error::from_raw_os_error),
            ),
            88..=93 => {
                let mode = *MODES.choose(&mut self.rng).unwrap();
                (
                    format!("chmod {mode:o} {x}"),
                    fs::set_permissions(&px, fs::Permissions::from_mode(mode)),
                )
            }
            94..=95 => {
                // A relative target without `..`: it never points out of the mix's folder.
                let target = self.fresh(&names);
                (
                    format!("symlink {target} {x}"),
                    std::os::unix::fs::symlink(&target, &px),
                )
            }
            _ => {
                // A pause lets a seal run between operations.
                let ms = self.rng.random_range(100..400);
                std::thread::sleep(Duration::from_millis(ms));
                (format!("pause {ms} ms"), Ok(()))
            }
        }
    }
}

/// `target`: the test binary (`names`, `watch`); `test`: the test's name.
pub fn replay_hint(target: &str, test: &str, seed: u64, ops: usize) -> ReplayHint {
    ReplayHint(format!(
        "random mix failed with seed {seed}, {ops} operations; replay with:\n  \
         DELTADRIVE_NAMES_SEED={seed} DELTADRIVE_NAMES_OPS={ops} \
         cargo test --test {target} -- --test-threads 1 --exact {test}"
    ))
}

/// Prints the operations of a mix (on a failure only: the test's output is captured).
pub fn print_ops(label: &str, log: &[String]) {
    eprintln!("--- operations of {label} ---");
    for (i, l) in log.iter().enumerate() {
        eprintln!("{i:4} {l}");
    }
}
