//! The sync driver: the I/O side of the sync engine ([`crate::engine`]), run beside the
//! mount. It executes the engine's actions (upload the outbox, pull and long-poll the
//! user's log, apply remote transactions into the mounted tree) and feeds their outcomes
//! back in.
//!
//! What always holds:
//! - The engine and the store change together: a remote transaction is applied under the
//!   file system's metadata lock, after every pending local change was sealed, in one write
//!   batch with the engine's durable state (`crate::fs::apply`). Local transactions go to the
//!   engine under the same lock before their outbox write commits ([`CommitSink`]).
//! - No lock is held while the network is awaited (decision 0017). Before pulled
//!   transactions are applied, the step is tried on a snapshot of the engine; the content
//!   its applies need is staged on disk with no lock held ([`stage`]), then the step runs
//!   for real and its applies only link staged files into place. An apply that still finds
//!   content missing changes nothing: the engine is rebuilt from the store, the content is
//!   staged, and the transaction is pulled again.
//! - If the two ever disagree (an apply that cannot be executed, a commit that failed after
//!   the engine accepted it), the engine is rebuilt from the store, which is always a
//!   consistent state, and pulls again.
//! - An outbox entry leaves the store only when the server's log holds it (the engine sees
//!   it come back, or the server acknowledged the append right after the cursor).
//! - Kernel caches are invalidated after the lock is released (fuser's notifier must not
//!   wait on a request that waits for the lock).

mod notify;
mod report;
pub mod stage;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

pub use report::SyncReport;

use crate::changelog::payload::strip;
use crate::changelog::{
    decode_transaction, encode_changelog_checked, ChangeLog, ObjectId, OpKind, Transaction,
};
use crate::client::{Client, ClientError, DeviceConfig};
use crate::engine::{Action, Engine, EngineConfig, PersistedState, Refusal, RequestId};
use crate::fs::apply::{ApplyError, ContentNeed, Invalidation, StagedContent};
use crate::fs::capture::CommitSink;
use crate::fs::FsCore;
use crate::home::Home;
use crate::store::Store;

/// Entries asked for per pull.
const PULL_PAGE: usize = 500;
/// How long one long poll waits on the server.
const LONG_POLL: Duration = Duration::from_secs(25);
/// Times a pulled page is tried on a snapshot and its content staged before it is given up
/// (and pulled again after the engine's back-off).
const STAGE_ROUNDS: usize = 3;
/// How long a device whose disk cannot hold a remote file waits before pulling it again.
const SPACE_RETRY: Duration = Duration::from_secs(15);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Rebuilds the engine from what the store holds.
///
/// # Errors
/// The store cannot be read or its outbox does not apply to its server tree.
pub fn restore_engine(store: &Store, config: EngineConfig) -> anyhow::Result<Engine> {
    // The engine holds transactions without their delta bytes (`changelog::payload`).
    let mut outbox = Vec::new();
    let mut bad = None;
    store.for_each_outbox(|_, enc| match decode_transaction(enc) {
        Ok(tx) => {
            outbox.push(strip(&tx));
            true
        }
        Err(e) => {
            bad = Some(e);
            false
        }
    })?;
    if let Some(e) = bad {
        return Err(e.into());
    }
    let state = PersistedState {
        cursor: store.sync_cursor()?,
        server_tree: store.server_tree()?,
        outbox,
    };
    Ok(Engine::restore(config, state)?)
}

/// State shared by the driver, the capture layer and `Syncer`'s owner.
struct Shared {
    engine: Mutex<Engine>,
    config: EngineConfig,
    store: Arc<Store>,
    online: AtomicBool,
    wake: tokio::sync::Notify,
    stop: AtomicBool,
    report: Mutex<SyncReport>,
    home: Home,
}

impl Shared {
    /// Replaces the engine by one rebuilt from the store (see the module docs).
    fn recover(&self, engine: &mut Engine, why: &str) {
        tracing::warn!("sync state rebuilt from the store: {why}");
        match restore_engine(&self.store, self.config.clone()) {
            Ok(mut e) => {
                e.handle_connectivity(now_ms(), self.online.load(Ordering::Relaxed));
                *engine = e;
            }
            Err(e) => tracing::error!("rebuilding the sync state failed: {e:#}"),
        }
        self.wake.notify_one();
    }
}

impl CommitSink for Shared {
    fn local_commit(&self, txs: &[Transaction]) -> Result<(), crate::fs::capture::Refused> {
        let mut e = self.engine.lock();
        for (n, tx) in txs.iter().enumerate() {
            if let Err(err) = e.handle_local_commit(now_ms(), strip(tx)) {
                tracing::debug!("a local change does not apply to the sync state: {err}");
                if n > 0 {
                    self.recover(&mut e, "a local transaction was refused");
                }
                let object = match &err {
                    crate::engine::EngineError::InvalidLocalTransaction(t)
                    | crate::engine::EngineError::InconsistentState(t) => {
                        t.object().or_else(|| name_taker(tx, t))
                    }
                };
                return Err(crate::fs::capture::Refused {
                    object,
                    message: err.to_string(),
                });
            }
        }
        self.wake.notify_one();
        Ok(())
    }

    fn commit_failed(&self) {
        let mut e = self.engine.lock();
        self.recover(&mut e, "the store refused a local commit");
    }
}

/// The op of `tx` that wanted the name a [`TreeError::NameTaken`] refusal names.
fn name_taker(tx: &Transaction, err: &crate::engine::TreeError) -> Option<ObjectId> {
    let crate::engine::TreeError::NameTaken { parent, name } = err else {
        return None;
    };
    tx.ops.iter().find_map(|op| {
        let (p, n) = match &op.kind {
            OpKind::Create { parent, name, .. } | OpKind::Link { parent, name } => (parent, name),
            OpKind::Rename {
                new_parent,
                new_name,
            } => (new_parent, new_name),
            _ => return None,
        };
        (p == parent && n == name).then_some(op.object)
    })
}

/// How long a stopping driver waits for its runtime's leftover tasks.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// The running sync driver; stops when [`Syncer::stop`] is called.
pub struct Syncer {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Where the driver sends what the kernel must forget.
pub type Invalidate = Box<dyn Fn(&[Invalidation]) + Send + Sync>;

/// Runs before pulled transactions are applied, outside the metadata lock: a source that
/// finds local changes by looking (the watched folder) brings them into the store first, so
/// the engine's conflict rules see them.
pub type BeforeApply = Box<dyn Fn() + Send + Sync>;

impl Syncer {
    /// Builds the engine from the store and hooks it into the capture layer. Without a
    /// login the engine only queues local changes (nothing is sent until `deltadrive
    /// login`); with one, the driver thread starts.
    ///
    /// # Errors
    /// The store's sync state is unreadable, or the login names an unusable server.
    pub fn start(
        core: Arc<FsCore>,
        home: &Home,
        device: String,
        invalidate: Invalidate,
    ) -> anyhow::Result<Syncer> {
        Self::start_with(core, home, device, invalidate, None)
    }

    /// [`Syncer::start`] with a hook run before each apply of pulled transactions.
    ///
    /// # Errors
    /// As [`Syncer::start`].
    pub fn start_with(
        core: Arc<FsCore>,
        home: &Home,
        device: String,
        invalidate: Invalidate,
        before_apply: Option<BeforeApply>,
    ) -> anyhow::Result<Syncer> {
        let store = Arc::clone(core.store());
        let config = EngineConfig::new(device, rand::random());
        let logged_in = home.device_file().exists();
        // The file system and its sealer run already: under the metadata lock (which every
        // seal takes) no transaction can reach the outbox between reading it here and the
        // sink being attached, where the engine would never hear of it.
        let shared = {
            let _meta = core.lock();
            let mut engine = restore_engine(&store, config.clone())?;
            engine.handle_connectivity(now_ms(), false);
            let shared = Arc::new(Shared {
                engine: Mutex::new(engine),
                config,
                store,
                online: AtomicBool::new(false),
                wake: tokio::sync::Notify::new(),
                stop: AtomicBool::new(false),
                report: Mutex::new(SyncReport::load(home)),
                home: home.clone(),
            });
            core.capture()
                .set_sink(Arc::clone(&shared) as Arc<dyn CommitSink>);
            shared
        };
        if !logged_in {
            tracing::info!("not logged in: changes stay in the outbox until `deltadrive login`");
            return Ok(Syncer {
                shared,
                thread: None,
            });
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dc = DeviceConfig::load(home)?;
        let client = dc.client()?;
        tracing::info!("syncing with {}", dc.storage_url);
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("sync".into())
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .thread_name("sync-io")
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!("sync cannot start: {e}");
                            return;
                        }
                    };
                    core.set_remote(Arc::new(ServerContent {
                        client: client.clone(),
                        handle: rt.handle().clone(),
                        shared: Arc::clone(&shared),
                    }));
                    stage::Stager {
                        client: &client,
                        store: &shared.store,
                    }
                    .clear();
                    let driver = Driver {
                        shared,
                        core,
                        client,
                        invalidate,
                        before_apply,
                        staged: Mutex::new(StagedContent::new()),
                        to_remove: Mutex::new(Vec::new()),
                    };
                    rt.block_on(driver.run());
                    // Tasks still running (an abandoned request, a name lookup on the
                    // blocking pool) must not hold the stop up: they are given a moment,
                    // then left behind.
                    rt.shutdown_timeout(STOP_GRACE);
                })?
        };
        Ok(Syncer {
            shared,
            thread: Some(thread),
        })
    }

    /// Stops after the request in flight is abandoned; the store keeps everything.
    pub fn stop(mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.notify_one();
    }
}

/// Online-only content, fetched by range for reads on the mount (files on demand).
struct ServerContent {
    client: Client,
    handle: tokio::runtime::Handle,
    shared: Arc<Shared>,
}

/// How long one range fetch for a read may take.
const RANGE_FETCH_TIMEOUT: Duration = Duration::from_secs(60);

impl crate::fs::ondemand::RemoteContent for ServerContent {
    fn online(&self) -> bool {
        self.shared.online.load(Ordering::Relaxed)
    }

    fn fetch(
        &self,
        object: crate::changelog::ObjectId,
        version: u64,
        start: u64,
        end: u64,
    ) -> Result<Vec<u8>, String> {
        if !self.online() {
            return Err("the server cannot be reached".into());
        }
        if end <= start {
            return Ok(Vec::new());
        }
        let hex = hex::encode(object.0);
        let req = self
            .client
            .content(&hex, Some(version), Some((start, end - 1)));
        match self
            .handle
            .block_on(async { tokio::time::timeout(RANGE_FETCH_TIMEOUT, req).await })
        {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(e)) => Err(describe(&e)),
            Err(_) => Err(format!(
                "no answer within {} s",
                RANGE_FETCH_TIMEOUT.as_secs()
            )),
        }
    }
}

/// The outcome of one request, fed back into the engine.
enum Outcome {
    Uploaded {
        first: u64,
        last: u64,
    },
    UploadRefused(Refusal),
    Pulled {
        entries: Vec<(u64, Transaction)>,
        head: u64,
    },
    Head(u64),
    Failed(String),
}

struct Driver {
    shared: Arc<Shared>,
    core: Arc<FsCore>,
    client: Client,
    invalidate: Invalidate,
    before_apply: Option<BeforeApply>,
    /// Content staged for applies (phase one), by hash.
    staged: Mutex<StagedContent>,
    /// Replaced content files to remove once the lock is released.
    to_remove: Mutex<Vec<std::path::PathBuf>>,
}

/// Applies whose content must be staged first, with what each needs.
type Needs = Vec<(crate::engine::LocalApply, Vec<ContentNeed>)>;

type InFlight = (RequestId, tokio::task::JoinHandle<Outcome>);

impl Driver {
    async fn run(self) {
        let shared = Arc::clone(&self.shared);
        // Online until a request says otherwise: the engine pulls first.
        shared.online.store(true, Ordering::Relaxed);
        let mut pending_actions = self
            .step(false, |e| e.handle_connectivity(now_ms(), true))
            .await;
        let mut inflight: Option<InFlight> = None;
        loop {
            if shared.stop.load(Ordering::Relaxed) {
                if let Some((_, h)) = inflight.take() {
                    h.abort();
                }
                break;
            }
            pending_actions.extend(self.step(false, |_| {}).await);
            for action in pending_actions.drain(..) {
                match action {
                    Action::CancelLongPoll { request } => {
                        if inflight.as_ref().is_some_and(|(r, _)| *r == request) {
                            if let Some((_, h)) = inflight.take() {
                                h.abort();
                            }
                        }
                    }
                    other => {
                        if let Some((_, h)) = inflight.take() {
                            h.abort();
                        }
                        inflight = self.start_request(other);
                    }
                }
            }
            let timeout = shared.engine.lock().poll_timeout();
            let sleep = match timeout {
                Some(at) => Duration::from_millis(at.saturating_sub(now_ms())),
                None => Duration::from_secs(1),
            };
            let wait_request = async {
                match inflight.as_mut() {
                    Some((_, h)) => Some(h.await),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = wait_request => {
                    let Some((request, _)) = inflight.take() else { continue };
                    let outcome = match r {
                        Some(Ok(o)) => o,
                        Some(Err(e)) => Outcome::Failed(format!("request task: {e}")),
                        None => continue,
                    };
                    let actions = self.feed(request, outcome).await;
                    pending_actions.extend(actions);
                }
                _ = shared.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {
                    if timeout.is_some_and(|at| now_ms() >= at) {
                        pending_actions.extend(self.step(false, |e| e.handle_timeout(now_ms())).await);
                    }
                }
            }
        }
    }

    fn start_request(&self, action: Action) -> Option<InFlight> {
        let client = self.client.clone();
        let r = match action {
            Action::Upload {
                request,
                idempotency_key,
                transactions,
            } => {
                let transactions = match self.with_payloads(&transactions) {
                    Ok(t) => t,
                    Err(e) => {
                        let msg = format!("reading the outbox for an upload: {e:#}");
                        return Some((request, tokio::spawn(async move { Outcome::Failed(msg) })));
                    }
                };
                let n = transactions.len();
                let h = tokio::spawn(async move {
                    let body = match encode_changelog_checked(&ChangeLog { transactions }) {
                        Ok(b) => b,
                        Err(e) => return Outcome::Failed(format!("encoding the upload: {e}")),
                    };
                    tracing::debug!("uploading {n} transaction(s), {} bytes", body.len());
                    match client.append(&idempotency_key, body).await {
                        Ok(r) => Outcome::Uploaded {
                            first: r.first_seq,
                            last: r.last_seq,
                        },
                        Err(e) => match refusal(&e) {
                            Some(r) => Outcome::UploadRefused(r),
                            None => Outcome::Failed(describe(&e)),
                        },
                    }
                });
                (request, h)
            }
            Action::Pull { request, after } => {
                // Files on demand: content arrives by range when read, so pulls leave out
                // the delta bytes (single entries are read whole for files kept local).
                let light = self.core.options_on_demand();
                let h = tokio::spawn(async move {
                    match client.read_log_as(after, PULL_PAGE, light).await {
                        Ok(page) => {
                            let mut entries = Vec::with_capacity(page.entries.len());
                            for (seq, bytes) in page.entries {
                                match decode_transaction(&bytes) {
                                    Ok(tx) => entries.push((seq, tx)),
                                    Err(e) => {
                                        return Outcome::Failed(format!(
                                            "log entry {seq} is unreadable: {e}"
                                        ))
                                    }
                                }
                            }
                            Outcome::Pulled {
                                entries,
                                head: page.head,
                            }
                        }
                        Err(e) => Outcome::Failed(describe(&e)),
                    }
                });
                (request, h)
            }
            Action::LongPoll { request, after } => {
                let h = tokio::spawn(async move {
                    match client.wait(after, LONG_POLL).await {
                        Ok(head) => Outcome::Head(head),
                        Err(e) => Outcome::Failed(describe(&e)),
                    }
                });
                (request, h)
            }
            Action::CancelLongPoll { .. } | Action::Apply(_) => return None,
        };
        Some(r)
    }
}

/// Most delta bytes sent in one append (at least one transaction goes).
const MAX_UPLOAD_BYTES: u64 = 8 << 20;

impl Driver {
    /// The full transactions (with their delta bytes, from the store's outbox) of an upload
    /// batch, which is a prefix of the outbox; cut to [`MAX_UPLOAD_BYTES`]. A shorter batch
    /// is acknowledged for what it holds; the engine pulls and sees the rest still pending.
    fn with_payloads(&self, light: &[Transaction]) -> anyhow::Result<Vec<Transaction>> {
        let mut out = Vec::with_capacity(light.len());
        let mut bytes = 0u64;
        let mut err = None;
        self.shared.store.for_each_outbox(|_, enc| {
            let Some(want) = light.get(out.len()) else {
                return false;
            };
            match decode_transaction(enc) {
                Ok(tx) if tx.id == want.id && strip(&tx) == *want => {
                    // What it weighs in the upload's body before compression (a
                    // compressible 32 MiB write is a few KiB compressed).
                    let len = crate::changelog::declared_body_len(enc)
                        .unwrap_or(enc.len() as u64)
                        .max(enc.len() as u64);
                    if !out.is_empty() && bytes + len > MAX_UPLOAD_BYTES {
                        return false;
                    }
                    bytes += len;
                    out.push(tx);
                    true
                }
                Ok(tx) => {
                    err = Some(anyhow::anyhow!(
                        "outbox entry {} is not the engine's next transaction {}",
                        hex::encode(tx.id),
                        hex::encode(want.id)
                    ));
                    false
                }
                Err(e) => {
                    err = Some(e.into());
                    false
                }
            }
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        if out.is_empty() {
            anyhow::bail!("the outbox is empty but the engine has transactions to send");
        }
        Ok(out)
    }
}

impl Driver {
    /// `a` with the delta bytes its light pull left out, read from the log entry itself.
    async fn with_delta_bytes(
        &self,
        a: &crate::engine::LocalApply,
    ) -> anyhow::Result<crate::engine::LocalApply> {
        use crate::changelog::OpKind;
        use crate::engine::{ContentSource, LocalChange};
        let page = self.client.read_log_as(a.cursor - 1, 1, false).await?;
        let Some((seq, bytes)) = page.entries.into_iter().next() else {
            anyhow::bail!("the server has no entry {}", a.cursor);
        };
        anyhow::ensure!(
            seq == a.cursor,
            "the server sent entry {seq}, not {}",
            a.cursor
        );
        let tx = decode_transaction(&bytes)?;
        anyhow::ensure!(
            tx.id == a.transaction.id,
            "entry {seq} is another transaction"
        );
        let tx_id = tx.id;
        let index = crate::changelog::payload::PayloadIndex::new([tx]);
        let mut out = a.clone();
        for ch in &mut out.local_changes {
            let LocalChange::Put {
                state,
                content: ContentSource::Ops(ops),
            } = ch
            else {
                continue;
            };
            for op in ops {
                if let OpKind::Write {
                    base_hash,
                    new_hash,
                    delta,
                    ..
                } = op
                {
                    if let Some(d) = index.delta(tx_id, state.id, *base_hash, *new_hash) {
                        *delta = d.clone();
                    }
                }
            }
        }
        Ok(out)
    }
}

/// The ops building the new content of `object` in `a`.
fn ops_of(a: &crate::engine::LocalApply, object: ObjectId) -> Option<Vec<&OpKind>> {
    a.local_changes.iter().find_map(|c| match c {
        crate::engine::LocalChange::Put {
            state,
            content: crate::engine::ContentSource::Ops(ops),
        } if state.id == object => Some(ops.iter().collect()),
        _ => None,
    })
}

/// How the server refused an append, if it did: a 409 is a stale base (it lists them) or a
/// clash with its tree; 400, 413 and 422 say that this change log will never be taken as
/// it is. Anything else (401, 429, 5xx, no answer) is a failure to retry.
fn refusal(e: &ClientError) -> Option<Refusal> {
    let ClientError::Api {
        status,
        message,
        body,
    } = e
    else {
        return None;
    };
    use reqwest::StatusCode as S;
    match *status {
        S::CONFLICT if body.as_ref().is_some_and(|b| b.get("stale").is_some()) => {
            Some(Refusal::Stale)
        }
        S::CONFLICT => Some(Refusal::Conflict(message.clone())),
        S::BAD_REQUEST | S::PAYLOAD_TOO_LARGE | S::UNPROCESSABLE_ENTITY => {
            Some(Refusal::Final(format!("{status}: {message}")))
        }
        _ => None,
    }
}

fn describe(e: &ClientError) -> String {
    match e.status() {
        Some(s) => format!("the server answered {s}: {e}"),
        None => format!("the server is unreachable: {e}"),
    }
}

impl Driver {
    /// Runs `f` on the engine under the metadata lock (after sealing everything pending
    /// when `seal`), executes every apply the engine asks for, and returns the requests to
    /// start. Kernel caches are invalidated after the lock is released.
    async fn step(&self, seal: bool, f: impl FnOnce(&mut Engine)) -> Vec<Action> {
        self.step_with(seal, false, f).await
    }

    /// [`Driver::step`]; with `drop_staged`, staged content this step did not use is removed
    /// (it was staged for this very step).
    async fn step_with(
        &self,
        seal: bool,
        drop_staged: bool,
        f: impl FnOnce(&mut Engine),
    ) -> Vec<Action> {
        let (actions, invalidations, deferred) = tokio::task::block_in_place(|| {
            let guard = self.core.sync_lock(seal);
            let mut e = self.shared.engine.lock();
            f(&mut e);
            let mut net = Vec::new();
            let mut inval = Vec::new();
            let mut deferred = Needs::new();
            while let Some(action) = e.poll_action() {
                match action {
                    Action::Apply(a) => self.execute(&guard, &mut e, &a, &mut inval, &mut deferred),
                    other => net.push(other),
                }
            }
            {
                let mut r = self.shared.report.lock();
                r.observe(&e);
                r.fetched_bytes = self.core.fetched_bytes();
            }
            (net, inval, deferred)
        });
        if !invalidations.is_empty() {
            (self.invalidate)(&invalidations);
        }
        for p in std::mem::take(&mut *self.to_remove.lock()) {
            let _ = std::fs::remove_file(p);
        }
        if drop_staged {
            for (_, f) in self.staged.lock().drain() {
                let _ = std::fs::remove_file(&f.path);
            }
        }
        if !deferred.is_empty() {
            // The engine was rebuilt and pulls again: the content is here by then.
            let _ = self.stage_all(deferred, &[]).await;
        }
        self.save_report();
        actions
    }

    /// Tries `f` on a snapshot of the engine (under the lock, after sealing with `seal`) and
    /// returns what the applies it asks for need staged; the engine itself is not changed.
    fn needs_of(&self, seal: bool, f: impl FnOnce(&mut Engine)) -> Needs {
        tokio::task::block_in_place(|| {
            let guard = self.core.sync_lock(seal);
            let mut dry = self.shared.engine.lock().clone();
            f(&mut dry);
            let staged = self.staged.lock();
            let mut needs = Needs::new();
            while let Some(action) = dry.poll_action() {
                let Action::Apply(a) = action else { continue };
                match guard.content_needs(&a, &staged) {
                    Ok(n) if n.is_empty() => {}
                    Ok(n) => needs.push((*a, n)),
                    Err(err) => {
                        tracing::warn!("listing the content change {} needs: {err}", a.cursor)
                    }
                }
            }
            needs
        })
    }

    /// Phase one: stages every need, with no lock held. Updates the report. The delta bytes
    /// of an apply come from `pulled` (the entries it was planned from, when its plan was
    /// made on light copies), else from the apply itself, else from the server's log.
    async fn stage_all(
        &self,
        list: Needs,
        pulled: &[(u64, Transaction)],
    ) -> Result<(), stage::StageError> {
        let stager = stage::Stager {
            client: &self.client,
            store: &self.shared.store,
        };
        let mut result = Ok(());
        'applies: for (a, needs) in list {
            // A light pull left the delta bytes out: read them from the log entry.
            let full = if needs.iter().any(|n| n.light) {
                match self.with_delta_bytes(&a).await {
                    Ok(f) => Some(f),
                    Err(err) => {
                        tracing::info!("reading change {} in full: {err}", a.cursor);
                        None
                    }
                }
            } else {
                None
            };
            for n in &needs {
                if self.staged.lock().contains_key(&n.hash) {
                    continue;
                }
                let entry = pulled.iter().find(|(s, _)| *s == a.cursor).map(|(_, t)| t);
                let ops = match (n.from_delta, n.light, entry) {
                    (false, _, _) => None,
                    (true, true, _) => full.as_ref().and_then(|f| ops_of(f, n.object)),
                    (true, false, Some(tx)) => Some(
                        tx.ops
                            .iter()
                            .filter(|op| op.object == n.object)
                            .filter(|op| {
                                matches!(op.kind, OpKind::Write { .. } | OpKind::Truncate { .. })
                            })
                            .map(|op| &op.kind)
                            .collect(),
                    ),
                    (true, false, None) => ops_of(&a, n.object),
                };
                let started = std::time::Instant::now();
                match stager.stage(n, ops).await {
                    Ok(file) => {
                        tracing::debug!(
                            "staged {:?} ({} bytes) in {:.1} ms",
                            String::from_utf8_lossy(&n.name),
                            n.size,
                            started.elapsed().as_secs_f64() * 1e3
                        );
                        self.staged.lock().insert(n.hash, file);
                    }
                    Err(err) => {
                        result = Err(err);
                        break 'applies;
                    }
                }
            }
        }
        {
            let mut r = self.shared.report.lock();
            match &result {
                Ok(()) => r.waiting = None,
                Err(err @ stage::StageError::NoSpace { .. }) => {
                    tracing::warn!("{err}");
                    r.waiting = Some(err.to_string());
                    r.last_error = Some(err.to_string());
                }
                Err(err) => {
                    tracing::warn!("{err}");
                    r.last_error = Some(err.to_string());
                }
            }
        }
        self.save_report();
        result
    }

    fn save_report(&self) {
        let r = self.shared.report.lock().clone();
        r.save(&self.shared.home);
    }

    /// Executes one apply; on failure either asks the engine to heal (content) or rebuilds
    /// the engine from the store (anything else).
    fn execute(
        &self,
        guard: &crate::fs::SyncGuard<'_>,
        e: &mut Engine,
        a: &crate::engine::LocalApply,
        inval: &mut Vec<Invalidation>,
        deferred: &mut Needs,
    ) {
        let device = e.device().to_string();
        let started = std::time::Instant::now();
        let staged = self.staged.lock();
        match guard.content_needs(a, &staged) {
            Ok(needs) if !needs.is_empty() => {
                // Not staged (a heal, or an apply of a step that was not tried first): change
                // nothing, stage it with no lock held, and let the engine pull it again.
                tracing::info!(
                    "remote change {} waits for {} file(s) of content to be staged",
                    a.cursor,
                    needs.len()
                );
                deferred.push((a.clone(), needs));
                self.shared
                    .recover(e, "an apply waits for content to be staged");
                return;
            }
            _ => {}
        }
        match guard.apply(a, &device, now_ms() as i64, &staged) {
            Ok(applied) => {
                tracing::debug!(
                    "applied seq {} from {} ({} op(s), {} change(s)) in {:.2} ms",
                    a.cursor,
                    a.transaction.device,
                    a.transaction.ops.len(),
                    a.local_changes.len(),
                    started.elapsed().as_secs_f64() * 1e3
                );
                inval.extend(applied.invalidations);
                self.to_remove.lock().extend(applied.to_remove);
                if !applied.conflicted.is_empty() {
                    let mut r = self.shared.report.lock();
                    let mut names = Vec::new();
                    for name in &applied.conflicted {
                        let name = String::from_utf8_lossy(name).into_owned();
                        tracing::warn!("conflicting edits: kept this device's version as {name:?}");
                        r.add_conflict(name.clone(), now_ms() as i64);
                        names.push(name);
                    }
                    notify::conflicts(&names);
                }
                for tx in applied.copies {
                    if let Err(err) = e.handle_local_commit(now_ms(), strip(&tx)) {
                        self.shared
                            .recover(e, &format!("a conflicted copy was refused: {err}"));
                        return;
                    }
                }
            }
            Err(ApplyError::Content { object, reason }) if !a.heal => {
                tracing::warn!(
                    "remote change {} could not be applied to {object} ({reason}); fetching whole content",
                    a.cursor
                );
                e.handle_apply_failed(now_ms(), a.cursor);
            }
            Err(err) => {
                tracing::error!("remote change {} could not be applied: {err}", a.cursor);
                self.shared.report.lock().last_error =
                    Some(format!("applying remote change {}: {err}", a.cursor));
                self.shared.recover(e, "an apply failed");
                // Give the disk or the network a moment before pulling it again.
                self.pause(e, Duration::from_secs(5));
            }
        }
    }

    /// Keeps the engine offline for `d` (no request goes out), then online again.
    fn pause(&self, e: &mut Engine, d: Duration) {
        e.handle_connectivity(now_ms(), false);
        let shared = Arc::clone(&self.shared);
        tokio::runtime::Handle::current().spawn(async move {
            tokio::time::sleep(d).await;
            shared.engine.lock().handle_connectivity(now_ms(), true);
            shared.wake.notify_one();
        });
    }

    /// Feeds a request's outcome to the engine.
    async fn feed(&self, request: RequestId, outcome: Outcome) -> Vec<Action> {
        let online = !matches!(outcome, Outcome::Failed(_));
        self.shared.online.store(online, Ordering::Relaxed);
        {
            let mut r = self.shared.report.lock();
            r.online = Some(online);
            match &outcome {
                Outcome::Failed(msg) => r.last_error = Some(msg.clone()),
                Outcome::UploadRefused(_) => {}
                _ => r.last_error = None,
            }
            match &outcome {
                Outcome::Uploaded { last, .. } => {
                    r.last_upload_ms = Some(now_ms() as i64);
                    r.server_seq = Some(*last);
                    r.head = r.head.max(*last);
                }
                Outcome::Pulled { head, .. } | Outcome::Head(head) => r.head = r.head.max(*head),
                _ => {}
            }
        }
        let settles = matches!(outcome, Outcome::Uploaded { .. } | Outcome::Pulled { .. });
        let actions = self.answer(request, outcome).await;
        if settles && self.core.capture().has_refused() {
            // Changes the server refused before and has now (or that nothing is left of),
            // judged under the metadata lock, where a seal is never halfway.
            tokio::task::block_in_place(|| {
                let _guard = self.core.sync_lock(false);
                let e = self.shared.engine.lock();
                self.core.capture().settle_refused(|o| {
                    e.outbox()
                        .iter()
                        .any(|t| t.ops.iter().any(|op| op.object == *o))
                });
            });
        }
        actions
    }

    async fn answer(&self, request: RequestId, outcome: Outcome) -> Vec<Action> {
        match outcome {
            Outcome::Uploaded { first, last } => {
                self.step(false, |e| {
                    e.handle_upload_acked(now_ms(), request, first, last)
                })
                .await
            }
            Outcome::UploadRefused(Refusal::Stale) => {
                tracing::info!("upload refused as stale; pulling and rebasing");
                self.step(false, |e| e.handle_upload_conflict(now_ms(), request))
                    .await
            }
            Outcome::UploadRefused(refusal) => {
                tracing::info!("upload refused: {refusal:?}");
                // Under the metadata lock: a refusal for good takes the head transaction out
                // of the outbox, in the engine and in the store together.
                self.step(false, |e| {
                    let Some(aside) = e.handle_upload_refused(now_ms(), request, refusal) else {
                        return;
                    };
                    let capture = self.core.capture();
                    if let Err(err) = capture.set_aside_refused(self.core.store(), &aside) {
                        self.shared
                            .recover(e, &format!("setting a refused change aside: {err}"));
                    }
                })
                .await
            }
            Outcome::Pulled { entries, head } => {
                let seal = !entries.is_empty();
                if let (true, Some(hook)) = (seal, &self.before_apply) {
                    tokio::task::block_in_place(hook);
                }
                if let Some(last) = entries.last() {
                    tracing::debug!(
                        "pulled {} entr(ies) up to {}, head {head}",
                        entries.len(),
                        last.0
                    );
                }
                let pulled = |e: &mut Engine, entries: Vec<(u64, Transaction)>| {
                    // Our own transactions coming back: the engine compares them with its
                    // outbox, which holds them without their bytes.
                    let mine: std::collections::HashSet<[u8; 16]> =
                        e.outbox().iter().map(|t| t.id).collect();
                    let entries = entries
                        .into_iter()
                        .map(|(seq, tx)| {
                            if mine.contains(&tx.id) {
                                (seq, strip(&tx))
                            } else {
                                (seq, tx)
                            }
                        })
                        .collect();
                    e.handle_pulled(now_ms(), request, entries, head)
                };
                // Phase one: the content these entries need, staged with no lock held.
                let mut rounds = 0;
                while seal && rounds <= STAGE_ROUNDS {
                    // The engine plans without delta bytes (hashes and sizes decide): the try
                    // gets light copies, staging reads the bytes from `entries`.
                    let needs = self.needs_of(seal, |e| {
                        pulled(e, entries.iter().map(|(s, t)| (*s, strip(t))).collect())
                    });
                    if needs.is_empty() {
                        break;
                    }
                    rounds += 1;
                    let staged = if rounds > STAGE_ROUNDS {
                        // Still missing after every round: the plan keeps changing.
                        Ok(())
                    } else {
                        self.stage_all(needs, &entries).await
                    };
                    if rounds > STAGE_ROUNDS || staged.is_err() {
                        let no_space = matches!(staged, Err(stage::StageError::NoSpace { .. }));
                        // Pulled again after the engine's back-off; a disk too full to
                        // receive waits longer (each try pulls the entries again).
                        return self
                            .step(false, |e| {
                                e.handle_request_failed(now_ms(), request);
                                if no_space {
                                    self.pause(e, SPACE_RETRY);
                                }
                            })
                            .await;
                    }
                }
                self.step_with(seal, seal, |e| pulled(e, entries)).await
            }
            Outcome::Head(head) => {
                self.step(false, |e| e.handle_long_poll(now_ms(), request, head))
                    .await
            }
            Outcome::Failed(msg) => {
                tracing::info!("sync request failed: {msg}");
                self.step(false, |e| e.handle_request_failed(now_ms(), request))
                    .await
            }
        }
    }
}
