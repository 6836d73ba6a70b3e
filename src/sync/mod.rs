//! The sync driver: the I/O side of sync, run beside the mount. Today it uploads the outbox;
//! pulling remote logs and applying them through [`crate::engine`] is the next step (issue #5).
//!
//! What always holds:
//! - An outbox entry leaves the store only after the server acknowledged the append that
//!   carried it (the server stores an acknowledged append durably).
//! - A batch is retried unchanged under the same idempotency key (the first transaction's
//!   id) until the server answers it, so a retry after a lost answer never stores twice.
//! - Failures back off exponentially (capped); the mount never waits on any of this.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::changelog::{decode_transaction, encode_changelog_checked, ChangeLog};
use crate::client::{Client, DeviceConfig};
use crate::home::Home;
use crate::store::Store;

/// Most compressed bytes of outbox entries sent in one append.
const MAX_BATCH_BYTES: u64 = 8 << 20;
/// Most transactions in one append.
const MAX_BATCH_TXS: usize = 256;
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often an idle uploader looks at the outbox.
const IDLE_TICK: Duration = Duration::from_millis(100);

/// What `status` shows about uploads (written to `H/sync.json` after each answer).
#[derive(serde::Serialize, serde::Deserialize, Default, Debug, Clone)]
pub struct SyncReport {
    /// When the server last acknowledged an append, ms since the Unix epoch.
    pub last_upload_ms: Option<i64>,
    /// The server's sequence number of the last acknowledged transaction.
    pub server_seq: Option<u64>,
    /// The last refusal or failure, if the last attempt failed.
    pub last_error: Option<String>,
}

impl SyncReport {
    pub fn load(home: &Home) -> SyncReport {
        std::fs::read(home.root().join("sync.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save(&self, home: &Home) {
        let path = home.root().join("sync.json");
        let tmp = path.with_extension("json.tmp");
        if let Ok(b) = serde_json::to_vec_pretty(self) {
            if std::fs::write(&tmp, b).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
        }
    }
}

struct Batch {
    seqs: Vec<u64>,
    key: String,
    body: Vec<u8>,
}

/// The uploader thread; stops when dropped or [`Uploader::stop`] is called.
pub struct Uploader {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Uploader {
    /// Starts uploading `store`'s outbox when the home holds a login; `None` otherwise
    /// (the mount then works as a local folder and the outbox waits).
    ///
    /// # Errors
    /// The login is unreadable or names an unusable server address.
    pub fn start(store: Arc<Store>, home: &Home) -> anyhow::Result<Option<Uploader>> {
        if !home.device_file().exists() {
            tracing::info!("not logged in: changes stay in the outbox until `deltadrive login`");
            return Ok(None);
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = DeviceConfig::load(home)?;
        let client = config.client()?;
        let stop = Arc::new(AtomicBool::new(false));
        let home = home.clone();
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("uploader".into())
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!("uploader cannot start: {e}");
                            return;
                        }
                    };
                    rt.block_on(run(store, client, home, stop));
                })?
        };
        tracing::info!("uploading changes to {}", config.storage_url);
        Ok(Some(Uploader {
            stop,
            thread: Some(thread),
        }))
    }

    /// Stops after the append in flight, if any, is answered or times out.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn next_batch(store: &Store) -> anyhow::Result<Option<Batch>> {
    let mut seqs = Vec::new();
    let mut txs = Vec::new();
    let mut bytes = 0u64;
    for (seq, enc) in store.outbox()? {
        if !txs.is_empty()
            && (bytes + enc.len() as u64 > MAX_BATCH_BYTES || txs.len() >= MAX_BATCH_TXS)
        {
            break;
        }
        bytes += enc.len() as u64;
        txs.push(decode_transaction(&enc)?);
        seqs.push(seq);
    }
    let Some(first) = txs.first() else {
        return Ok(None);
    };
    let key = hex::encode(first.id);
    let body = encode_changelog_checked(&ChangeLog { transactions: txs })?;
    Ok(Some(Batch { seqs, key, body }))
}

async fn run(store: Arc<Store>, client: Client, home: Home, stop: Arc<AtomicBool>) {
    let mut report = SyncReport::load(&home);
    let mut inflight: Option<Batch> = None;
    let mut backoff = BACKOFF_MIN;
    let mut retry_at = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() < retry_at {
            tokio::time::sleep(IDLE_TICK.min(retry_at - Instant::now())).await;
            continue;
        }
        if inflight.is_none() {
            match next_batch(&store) {
                Ok(Some(b)) => inflight = Some(b),
                Ok(None) => {
                    tokio::time::sleep(IDLE_TICK).await;
                    continue;
                }
                Err(e) => {
                    tracing::error!("reading the outbox failed: {e:#}");
                    retry_at = Instant::now() + BACKOFF_MAX;
                    continue;
                }
            }
        }
        let Some(batch) = inflight.as_ref() else {
            continue;
        };
        match client.append(&batch.key, batch.body.clone()).await {
            Ok(r) => {
                let mut b = store.batch();
                for seq in &batch.seqs {
                    b.remove_outbox(*seq);
                }
                if let Err(e) = store.commit(b, false) {
                    tracing::error!("removing uploaded entries from the outbox failed: {e}");
                }
                tracing::debug!(
                    "uploaded {} transaction(s), {} bytes, server seq {}..={}",
                    batch.seqs.len(),
                    batch.body.len(),
                    r.first_seq,
                    r.last_seq
                );
                report.last_upload_ms = Some(now_ms());
                report.server_seq = Some(r.last_seq);
                report.last_error = None;
                report.save(&home);
                inflight = None;
                backoff = BACKOFF_MIN;
            }
            Err(e) => {
                let refused = e.status().is_some_and(|s| s.is_client_error());
                if refused {
                    tracing::warn!(
                        "the server refused an upload ({e}); it stays in the outbox. Changes made \
                         on another device to the same files need the sync engine to rebase them \
                         (issue #5)"
                    );
                    backoff = BACKOFF_MAX;
                } else {
                    tracing::info!("upload failed ({e}); retrying in {backoff:?}");
                }
                if report.last_error.as_deref() != Some(&e.to_string()) {
                    report.last_error = Some(e.to_string());
                    report.save(&home);
                }
                retry_at = Instant::now() + backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
