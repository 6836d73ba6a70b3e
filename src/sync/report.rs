//! What `deltadrive status` shows about sync, written by the driver to `H/sync.json`.

use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::home::Home;

/// Conflicted copies kept in the report (the newest).
const MAX_CONFLICTS: usize = 100;

/// A conflicted copy this device made.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ConflictNote {
    pub name: String,
    pub time_ms: i64,
}

/// The driver's view of sync, saved after every step.
#[derive(Serialize, Deserialize, Default, Debug, Clone)]
pub struct SyncReport {
    /// When the server last acknowledged an append, ms since the Unix epoch.
    pub last_upload_ms: Option<i64>,
    /// The server's sequence number of the last acknowledged transaction.
    pub server_seq: Option<u64>,
    /// The last refusal or failure, if the last attempt failed.
    pub last_error: Option<String>,
    /// Whether the last request reached the server.
    #[serde(default)]
    pub online: Option<bool>,
    /// The last server sequence applied here.
    #[serde(default)]
    pub cursor: u64,
    /// The newest server sequence this device has heard of.
    #[serde(default)]
    pub head: u64,
    /// Local transactions the server has not stored yet.
    #[serde(default)]
    pub outbox: u64,
    /// When this device last had nothing to send and nothing to receive.
    #[serde(default)]
    pub last_sync_ms: Option<i64>,
    /// Conflicted copies made on this device, oldest first.
    #[serde(default)]
    pub conflicts: Vec<ConflictNote>,
    /// Files on demand: bytes of online-only content fetched since the mount started.
    #[serde(default)]
    pub fetched_bytes: u64,
    /// Remote content that cannot be received yet and why (a file larger than the free
    /// disk space); retried with back-off, cleared once it is received.
    #[serde(default)]
    pub waiting: Option<String>,
}

impl SyncReport {
    pub fn load(home: &Home) -> SyncReport {
        std::fs::read(home.root().join("sync.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn save(&self, home: &Home) {
        let path = home.root().join("sync.json");
        let tmp = path.with_extension("json.tmp");
        if let Ok(b) = serde_json::to_vec_pretty(self) {
            if std::fs::write(&tmp, b).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
        }
    }

    /// Takes the engine's progress.
    pub fn observe(&mut self, e: &Engine) {
        self.cursor = e.cursor();
        self.outbox = e.outbox().len() as u64;
        if e.is_idle() {
            self.last_sync_ms = Some(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0),
            );
        }
    }

    pub fn add_conflict(&mut self, name: String, time_ms: i64) {
        self.conflicts.push(ConflictNote { name, time_ms });
        if self.conflicts.len() > MAX_CONFLICTS {
            let extra = self.conflicts.len() - MAX_CONFLICTS;
            self.conflicts.drain(..extra);
        }
    }
}
