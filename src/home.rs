//! A device's home folder (`--home H` or `DELTADRIVE_HOME`): one device's config and state,
//! so that several devices can run on one machine.
//!
//! Layout (everything a device keeps lives below it):
//! - `db/`        the RocksDB store (metadata, previous state, outbox, cursors)
//! - `content/`   file content, one file per object, named by object id
//! - `device.json` the device's login: server URL, user, device name, token (0600)
//! - `mount.log`  the mount daemon's log when it runs in the background
//! - `mount.pid`  the pid of the running mount daemon

use std::path::{Path, PathBuf};

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
