//! A device's home folder (`--home H` or `DELTADRIVE_HOME`): one device's config and state,
//! so that several devices can run on one machine.
//!
//! Layout (everything a device keeps lives below it):
//! - `db/`        the RocksDB store (metadata, previous state, outbox, cursors)
//! - `content/`   file content, one file per object, named by object id
//! - `device.json` the device's login: server URL, user, device name, token (0600)
//! - `mount.log`  the mount daemon's log when it runs in the background
//! - `mount.pid`  the pid of the running mount daemon
//! - `daemon.lock` locked (flock) by the daemon that owns the home, from before its store
//!   opens until after the store is closed: the kernel lets go of it when the process ends,
//!   however it ends
//!
//! What always holds: at most one daemon (mount or watch) owns a home. A second one that
//! finds the lock taken either waits, bounded, for a previous daemon that is finishing, or
//! is refused at once when the holder is live ([`Home::lock`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why a daemon could not take its home.
#[derive(Debug, thiserror::Error)]
pub enum HomeLockError {
    /// A live daemon owns the home (`holder` says which, for the message).
    #[error(
        "the home folder {home} is in use by {holder}; a home serves one folder at a time: \
         stop that one first (deltadrive unmount, or SIGTERM to a watch), or use another --home"
    )]
    InUse { home: PathBuf, holder: String },
    /// The previous daemon was still finishing when the wait ran out.
    #[error(
        "the home folder {home} is still in use by a deltadrive process that did not \
         finish within {} s{}",
        waited.as_secs(),
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    StillBusy {
        home: PathBuf,
        pid: Option<u32>,
        waited: Duration,
    },
    #[error("cannot lock the home folder {home}: {source}")]
    Io {
        home: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Who holds a home's lock, as far as the pid file and the mount table tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// Serving a folder: a new daemon is refused at once. The text names it.
    Live(String),
    /// Starting or finishing (or unknown): a new daemon waits for it.
    Passing(Option<u32>),
}

/// A daemon's ownership of its home: the lock on `daemon.lock`, released when dropped (or
/// by the kernel when the process ends).
#[derive(Debug)]
pub struct HomeLock {
    _file: std::fs::File,
}

/// Takes an exclusive `flock` on `file` without waiting: false when another open file
/// description holds it. (`File::try_lock` does the same from Rust 1.89, above our MSRV.)
fn try_flock(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open fd; flock only changes the lock on its open file description.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// How often a waiting daemon tries the lock again.
const LOCK_POLL: Duration = Duration::from_millis(50);

/// The resolved home folder of one device.
#[derive(Clone, Debug)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// `explicit` (from `--home` or `DELTADRIVE_HOME`, which clap merges), else
    /// `$XDG_DATA_HOME/deltadrive`, else `~/.local/share/deltadrive`.
    pub fn resolve(explicit: Option<&Path>) -> anyhow::Result<Home> {
        let root = match explicit {
            Some(p) => p.to_path_buf(),
            None => {
                if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
                    PathBuf::from(x).join("deltadrive")
                } else if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
                    PathBuf::from(h).join(".local/share/deltadrive")
                } else {
                    anyhow::bail!("no --home given and neither DELTADRIVE_HOME nor HOME is set")
                }
            }
        };
        let root = if root.is_absolute() {
            root
        } else {
            std::env::current_dir()?.join(root)
        };
        Ok(Home { root })
    }

    /// Creates the folder (0700) if it does not exist yet.
    pub fn create(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(|e| anyhow::anyhow!("cannot create home {}: {e}", self.root.display()))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn db_dir(&self) -> PathBuf {
        self.root.join("db")
    }
    pub fn content_dir(&self) -> PathBuf {
        self.root.join("content")
    }
    pub fn device_file(&self) -> PathBuf {
        self.root.join("device.json")
    }
    pub fn mount_log(&self) -> PathBuf {
        self.root.join("mount.log")
    }
    /// The log of a background `deltadrive watch`.
    pub fn watch_log(&self) -> PathBuf {
        self.root.join("watch.log")
    }

    pub fn pid_file(&self) -> PathBuf {
        self.root.join("mount.pid")
    }

    /// Locked by the daemon that owns this home (see the module docs).
    pub fn lock_file(&self) -> PathBuf {
        self.root.join("daemon.lock")
    }

    /// Takes the home for a daemon. When another process holds it, `holder` says who: a
    /// live daemon is refused at once; one starting or finishing (an unmount the kernel
    /// already reported done while the daemon still seals and closes its store) is waited
    /// for, up to `wait`, with one log line.
    ///
    /// # Errors
    /// [`HomeLockError::InUse`] for a live holder, [`HomeLockError::StillBusy`] when the
    /// wait ran out, [`HomeLockError::Io`] when the lock file cannot be opened.
    pub fn lock(
        &self,
        wait: Duration,
        holder: impl Fn(&Home) -> Holder,
    ) -> Result<HomeLock, HomeLockError> {
        let io = |source| HomeLockError::Io {
            home: self.root.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.lock_file())
            .map_err(io)?;
        let start = Instant::now();
        let mut told = false;
        loop {
            match try_flock(&file) {
                Ok(true) => {
                    if told {
                        tracing::info!(
                            "the previous daemon of this home finished after {} ms",
                            start.elapsed().as_millis()
                        );
                    }
                    return Ok(HomeLock { _file: file });
                }
                Ok(false) => {}
                Err(e) => return Err(io(e)),
            }
            let pid = match holder(self) {
                Holder::Live(holder) => {
                    return Err(HomeLockError::InUse {
                        home: self.root.clone(),
                        holder,
                    })
                }
                Holder::Passing(pid) => pid,
            };
            if start.elapsed() >= wait {
                return Err(HomeLockError::StillBusy {
                    home: self.root.clone(),
                    pid,
                    waited: wait,
                });
            }
            if !told {
                tracing::info!(
                    "waiting for the previous daemon of this home to finish{} (up to {} s)",
                    pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
                    wait.as_secs()
                );
                told = true;
            }
            std::thread::sleep(LOCK_POLL);
        }
    }

    /// Local changes that cannot sync and wait aside (written by the running daemon).
    pub fn set_aside_file(&self) -> PathBuf {
        self.root.join("set-aside.json")
    }

    /// Writes the set-aside changes for `status` (removes the file when there are none).
    pub fn save_set_aside(&self, notes: &[crate::fs::capture::AsideNote]) {
        let path = self.set_aside_file();
        if notes.is_empty() {
            let _ = std::fs::remove_file(&path);
            return;
        }
        let tmp = path.with_extension("json.tmp");
        if let Ok(b) = serde_json::to_vec_pretty(notes) {
            if std::fs::write(&tmp, b).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
        }
    }

    /// The set-aside changes the daemon last wrote.
    pub fn load_set_aside(&self) -> Vec<crate::fs::capture::AsideNote> {
        std::fs::read(self.set_aside_file())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// How a running `watch` keeps hard links in its folder (written at its start).
    pub fn watch_folder_file(&self) -> PathBuf {
        self.root.join("watch-folder.json")
    }

    /// Records how the watched folder holds files with several names, for `status`.
    pub fn save_watch_folder(&self, info: &WatchFolderInfo) {
        let path = self.watch_folder_file();
        let tmp = path.with_extension("json.tmp");
        if let Ok(b) = serde_json::to_vec_pretty(info) {
            if std::fs::write(&tmp, b).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
        }
    }

    /// What the running `watch` last recorded about its folder.
    pub fn load_watch_folder(&self) -> Option<WatchFolderInfo> {
        std::fs::read(self.watch_folder_file())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }
}

/// How a watched folder holds a file with several names.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct WatchFolderInfo {
    /// `"hard links"` where the folder's file system has them, else `"separate copies"`.
    pub hard_links: String,
}
