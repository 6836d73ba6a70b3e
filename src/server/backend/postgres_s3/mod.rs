//! The scale-out backend: PostgreSQL for every record (users, devices, tokens, the log index and
//! heads, object states, directory entries, history, idempotency records) and S3-compatible
//! object storage (`object_store`) for log payloads and content chunks. Any number of stateless
//! server replicas share one database (schema) and one bucket (prefix).
//!
//! What always holds:
//! - write order: a commit PUTs its log payloads (and the service PUT its chunks) before the
//!   metadata transaction that names them commits, so a committed row never points at a missing
//!   object; an append is acknowledged only after that transaction commits;
//! - the per-user commit lock is a PostgreSQL session advisory lock, held on a dedicated
//!   connection for as long as the [`UserLock`] lives (SIGKILL of a replica ends the session and
//!   so releases it); the commit itself re-checks the head under `SELECT ... FOR UPDATE` on the
//!   user's head row, so even a lost lock can never create a gap or a duplicate sequence;
//! - every commit sends `NOTIFY` (delivered at commit) on the schema's channel; each replica keeps
//!   one listening connection that re-LISTENs after a reconnect and then announces
//!   [`HeadEvent::Resync`], so no wake-up is lost across replicas;
//! - schema migrations are versioned (`schema_migrations`), each in its own transaction, under an
//!   advisory lock, so replicas starting together migrate once.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::sync::broadcast;

use super::{
    AppendRecord, Backend, BackendError, BoxFut, ChunkId, CommitBatch, DeviceRecord, DirEntries,
    HeadEvent, HistoryEntry, ObjectState, ShareRecord, TokenRecord, UserLock, UserRecord,
};

/// How to reach the database and the bucket.
#[derive(Clone, Debug, Default)]
pub struct PostgresS3Config {
    /// `postgres://...` URL or `key=value` connection string (tokio-postgres syntax).
    pub metadata: String,
    /// The schema holding the tables (created if missing); lower-case letters, digits, `_`.
    pub schema: String,
    /// `s3://BUCKET[/PREFIX]`.
    pub objects: String,
    /// Endpoint of an S3-compatible server (default: AWS, or `AWS_ENDPOINT_URL`).
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub s3_access_key_id: Option<String>,
    pub s3_secret_access_key: Option<String>,
    /// The database password (from a file or the environment; never on the command line).
    pub password: Option<String>,
    /// PEM file of the CA that signed the database's certificate: TLS is then required and the
    /// certificate verified against it, host name included (libpq's `verify-full`). Without it,
    /// TLS (when the URL's `sslmode` asks or allows it) is verified against the system's roots.
    pub ca_file: Option<std::path::PathBuf>,
}

/// The TLS connector for the database: always verifying the server's certificate chain and
/// host name, against `ca_file` or the system's roots.
fn tls_connector(
    ca_file: Option<&std::path::Path>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, BackendError> {
    crate::server::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(f) => {
            let pem = std::fs::read(f).map_err(|e| {
                BackendError::Db(format!("--metadata-ca-file {}: {e}", f.display()))
            })?;
            let mut n = 0;
            for cert in <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| {
                    BackendError::Db(format!("--metadata-ca-file {}: {e}", f.display()))
                })?;
                roots.add(cert).map_err(|e| {
                    BackendError::Db(format!("--metadata-ca-file {}: {e}", f.display()))
                })?;
                n += 1;
            }
            if n == 0 {
                return Err(BackendError::Db(format!(
                    "--metadata-ca-file {}: no certificate in it",
                    f.display()
                )));
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// Versioned schema migrations: (version, SQL). Append only; never edit an applied one.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
     CREATE TABLE users (name text PRIMARY KEY, record text NOT NULL);
     CREATE TABLE devices (user_name text NOT NULL, name text NOT NULL, record text NOT NULL,
         PRIMARY KEY (user_name, name));
     CREATE TABLE tokens (hash text PRIMARY KEY, user_name text NOT NULL, record text NOT NULL);
     CREATE INDEX tokens_user ON tokens (user_name);
     CREATE TABLE heads (user_name text PRIMARY KEY, head bigint NOT NULL);
     CREATE TABLE log (user_name text NOT NULL, seq bigint NOT NULL, object_key text NOT NULL,
         size bigint NOT NULL, PRIMARY KEY (user_name, seq));
     CREATE TABLE objects (user_name text NOT NULL, id bytea NOT NULL, record text NOT NULL,
         PRIMARY KEY (user_name, id));
     CREATE TABLE children (user_name text NOT NULL, parent bytea NOT NULL, name bytea NOT NULL,
         child bytea NOT NULL, PRIMARY KEY (user_name, parent, name));
     CREATE TABLE history (user_name text NOT NULL, id bytea NOT NULL, version bigint NOT NULL,
         record text NOT NULL, PRIMARY KEY (user_name, id, version));
     CREATE TABLE idempotency (user_name text NOT NULL, key text NOT NULL, record text NOT NULL,
         PRIMARY KEY (user_name, key));",
    ),
    (
        2,
        "CREATE TABLE shares (hash text PRIMARY KEY, user_name text NOT NULL,
             created_ms bigint NOT NULL, record text NOT NULL);
         CREATE INDEX shares_user ON shares (user_name);",
    ),
];

/// First key of the two-key advisory lock taken while migrating (the second is the schema's).
const MIGRATION_LOCK: i32 = 0x6464_6d67;

/// The PostgreSQL + S3 backend.
pub struct PostgresS3 {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    /// Connections that hold user locks (kept apart so lock waiters never starve queries).
    lock_pool: Pool,
    store: Arc<dyn ObjectStore>,
    schema: String,
    channel: String,
    events: broadcast::Sender<HeadEvent>,
    /// Per-process queue in front of the database lock: one waiting connection per user.
    local_locks: parking_lot::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

fn pg(e: tokio_postgres::Error) -> BackendError {
    match e.as_db_error() {
        Some(d) => BackendError::Db(format!(
            "postgres: {} (SQLSTATE {})",
            d.message(),
            d.code().code()
        )),
        // The cause (a missing password, a certificate refused) is in the source only.
        None => match std::error::Error::source(&e) {
            Some(cause) => BackendError::Db(format!("postgres: {e}: {cause}")),
            None => BackendError::Db(format!("postgres: {e}")),
        },
    }
}

fn pool_err(e: deadpool_postgres::PoolError) -> BackendError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg(e),
        other => BackendError::Db(format!("postgres pool: {other}")),
    }
}

fn store_err(e: object_store::Error) -> BackendError {
    match e {
        object_store::Error::NotFound { .. } => BackendError::NotFound,
        other => BackendError::Db(format!("object storage: {other}")),
    }
}

type Params<'a> = &'a [&'a (dyn tokio_postgres::types::ToSql + Sync)];

// Statements are prepared once per connection (deadpool's statement cache), so each later use
// is one round trip instead of two.
async fn exec_c<C: GenericClient + Sync>(
    c: &C,
    sql: &str,
    p: Params<'_>,
) -> Result<u64, tokio_postgres::Error> {
    let st = c.prepare_cached(sql).await?;
    c.execute(&st, p).await
}

async fn query_c<C: GenericClient + Sync>(
    c: &C,
    sql: &str,
    p: Params<'_>,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let st = c.prepare_cached(sql).await?;
    c.query(&st, p).await
}

async fn query_one_c<C: GenericClient + Sync>(
    c: &C,
    sql: &str,
    p: Params<'_>,
) -> Result<tokio_postgres::Row, tokio_postgres::Error> {
    let st = c.prepare_cached(sql).await?;
    c.query_one(&st, p).await
}

async fn query_opt_c<C: GenericClient + Sync>(
    c: &C,
    sql: &str,
    p: Params<'_>,
) -> Result<Option<tokio_postgres::Row>, tokio_postgres::Error> {
    let st = c.prepare_cached(sql).await?;
    c.query_opt(&st, p).await
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String, BackendError> {
    serde_json::to_string(v).map_err(|e| BackendError::Corrupt(e.to_string()))
}

fn from_json<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, BackendError> {
    serde_json::from_str(s).map_err(|e| BackendError::Corrupt(e.to_string()))
}

fn i64_of(v: u64) -> Result<i64, BackendError> {
    i64::try_from(v).map_err(|_| BackendError::Corrupt(format!("{v} out of range")))
}

fn u64_of(v: i64) -> Result<u64, BackendError> {
    u64::try_from(v).map_err(|_| BackendError::Corrupt(format!("{v} out of range")))
}

fn id16(b: &[u8]) -> Result<[u8; 16], BackendError> {
    b.try_into()
        .map_err(|_| BackendError::Corrupt("object id".into()))
}

fn chunk_path(id: &ChunkId) -> ObjPath {
    let h = hex::encode(id);
    ObjPath::from(format!("chunks/{}/{h}", &h[..2]))
}

fn log_prefix(user: &str) -> ObjPath {
    ObjPath::from(format!("log/{}", hex::encode(user.as_bytes())))
}

/// Payload keys carry a hash of the bytes, so two writers of one sequence (only possible after
/// a lost lock, and then refused at commit) never overwrite each other's object.
fn log_path(user: &str, seq: u64, bytes: &[u8]) -> String {
    format!(
        "log/{}/{seq:016x}-{}",
        hex::encode(user.as_bytes()),
        &blake3::hash(bytes).to_hex()[..16]
    )
}

/// Checks a schema name (it ends up in SQL identifiers and a connection option).
fn valid_schema(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 40
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Builds the object store from `s3://BUCKET[/PREFIX]`, flags and the usual AWS variables.
fn open_store(c: &PostgresS3Config) -> Result<Arc<dyn ObjectStore>, BackendError> {
    let rest = c.objects.strip_prefix("s3://").ok_or_else(|| {
        BackendError::Db(format!(
            "--objects must look like s3://BUCKET[/PREFIX], not {:?}",
            c.objects
        ))
    })?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(BackendError::Db("--objects names no bucket".into()));
    }
    // object_store's reqwest client uses the process's rustls provider (ring).
    crate::server::install_crypto_provider();
    let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
    if let Some(e) = &c.s3_endpoint {
        b = b.with_endpoint(e);
        if e.starts_with("http://") {
            b = b.with_allow_http(true);
        }
    }
    if let Some(r) = &c.s3_region {
        b = b.with_region(r);
    }
    if let Some(k) = &c.s3_access_key_id {
        b = b.with_access_key_id(k);
    }
    if let Some(k) = &c.s3_secret_access_key {
        b = b.with_secret_access_key(k);
    }
    let s3 = b
        .build()
        .map_err(|e| BackendError::Db(format!("object storage: {e}")))?;
    let prefix = prefix.trim_matches('/');
    Ok(if prefix.is_empty() {
        Arc::new(s3)
    } else {
        Arc::new(object_store::prefix::PrefixStore::new(s3, prefix))
    })
}

impl PostgresS3 {
    /// Connects to the database and the bucket, migrates the schema and starts listening for
    /// other replicas' appends.
    ///
    /// # Errors
    /// A bad URL or schema name, an unreachable database or bucket, a failed migration.
    pub async fn open(c: &PostgresS3Config) -> Result<PostgresS3, BackendError> {
        if !valid_schema(&c.schema) {
            return Err(BackendError::Db(format!(
                "schema name {:?}: use 1-40 lower-case letters, digits or _",
                c.schema
            )));
        }
        let mut cfg = tokio_postgres::Config::from_str(&c.metadata)
            .map_err(|e| BackendError::Db(format!("--metadata: {e}")))?;
        cfg.options(format!("-c search_path={}", c.schema))
            .application_name("deltadrive")
            .connect_timeout(Duration::from_secs(10))
            .keepalives_idle(Duration::from_secs(30));
        if let Some(pw) = &c.password {
            cfg.password(pw.as_bytes());
        }
        if c.ca_file.is_some() {
            cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
        }
        let tls = tls_connector(c.ca_file.as_deref())?;
        let mgr = |cfg: &tokio_postgres::Config| {
            Manager::from_config(
                cfg.clone(),
                tls.clone(),
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            )
        };
        let build = |size: usize| {
            Pool::builder(mgr(&cfg))
                .max_size(size)
                .wait_timeout(Some(Duration::from_secs(60)))
                .create_timeout(Some(Duration::from_secs(10)))
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .build()
                .map_err(|e| BackendError::Db(format!("postgres pool: {e}")))
        };
        let pool = build(16)?;
        let lock_pool = build(32)?;
        let store = open_store(c)?;
        migrate(&pool, &c.schema).await?;
        // Fail at start, not at the first append, when the bucket is unreachable or read-only.
        store
            .put(
                &ObjPath::from("deltadrive-probe"),
                PutPayload::from_static(b"deltadrive"),
            )
            .await
            .map_err(|e| {
                BackendError::Db(format!("object storage {} is not writable: {e}", c.objects))
            })?;
        let channel = format!("deltadrive_heads_{}", c.schema);
        let (events, _) = broadcast::channel(4096);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        // The LISTEN session is named after the schema, so operators (and tests) can find it.
        let mut listen_cfg = cfg.clone();
        listen_cfg.application_name(format!("deltadrive-listen-{}", c.schema));
        let listener = tokio::spawn(listen_loop(
            listen_cfg,
            tls,
            channel.clone(),
            events.clone(),
            ready_tx,
        ));
        match tokio::time::timeout(Duration::from_secs(30), ready_rx).await {
            Ok(Ok(())) => {}
            _ => {
                listener.abort();
                return Err(BackendError::Db(
                    "cannot LISTEN for other replicas' appends".into(),
                ));
            }
        }
        Ok(PostgresS3 {
            inner: Arc::new(Inner {
                pool,
                lock_pool,
                store,
                schema: c.schema.clone(),
                channel,
                events,
                local_locks: parking_lot::Mutex::new(Default::default()),
                listener,
            }),
        })
    }

    fn run<T, F, Fut>(&self, f: F) -> BoxFut<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, BackendError>> + Send + 'static,
    {
        let inner = self.inner.clone();
        Box::pin(f(inner))
    }
}

/// Applies the missing migrations, once, under an advisory lock.
async fn migrate(pool: &Pool, schema: &str) -> Result<(), BackendError> {
    let mut c = pool.get().await.map_err(pool_err)?;
    let key2 = i32::from_be_bytes(
        blake3::hash(schema.as_bytes()).as_bytes()[..4]
            .try_into()
            .unwrap_or([0; 4]),
    );
    exec_c(
        &c,
        "SELECT pg_advisory_lock($1, $2)",
        &[&MIGRATION_LOCK, &key2],
    )
    .await
    .map_err(pg)?;
    let result = async {
        c.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
             CREATE TABLE IF NOT EXISTS schema_migrations (
                 version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());"
        ))
        .await
        .map_err(pg)?;
        let done: Vec<i32> = query_c(&c, "SELECT version FROM schema_migrations", &[])
            .await
            .map_err(pg)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for (version, sql) in MIGRATIONS {
            if done.contains(version) {
                continue;
            }
            let tx = c.transaction().await.map_err(pg)?;
            tx.batch_execute(sql).await.map_err(pg)?;
            exec_c(
                &tx,
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .await
            .map_err(pg)?;
            tx.commit().await.map_err(pg)?;
            tracing::info!(version, schema, "applied schema migration");
        }
        Ok::<(), BackendError>(())
    }
    .await;
    match exec_c(
        &c,
        "SELECT pg_advisory_unlock($1, $2)",
        &[&MIGRATION_LOCK, &key2],
    )
    .await
    {
        Ok(_) => {}
        // Never return a connection that may still hold the lock to the pool.
        Err(_) => drop(Object::take(c)),
    }
    result
}

/// Keeps one connection LISTENing on `channel`, turning notifications into head events; after
/// every (re)connect it announces `Resync`, since appends may have happened while deaf.
async fn listen_loop(
    cfg: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    channel: String,
    events: broadcast::Sender<HeadEvent>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(100);
    loop {
        match cfg.connect(tls.clone()).await {
            Ok((client, mut conn)) => {
                let (ntx, mut nrx) = tokio::sync::mpsc::unbounded_channel::<String>();
                let driver = tokio::spawn(async move {
                    let mut messages =
                        futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
                    while let Some(m) = messages.next().await {
                        match m {
                            Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                                if ntx.send(n.payload().to_string()).is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "LISTEN connection failed");
                                return;
                            }
                        }
                    }
                });
                if let Err(e) = client.batch_execute(&format!("LISTEN \"{channel}\"")).await {
                    tracing::warn!(error = %e, "LISTEN failed");
                    driver.abort();
                } else {
                    backoff = Duration::from_millis(100);
                    let _ = events.send(HeadEvent::Resync);
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                    let mut health = tokio::time::interval(Duration::from_secs(15));
                    health.tick().await;
                    loop {
                        tokio::select! {
                            p = nrx.recv() => match p {
                                Some(p) => {
                                    if let Some((head, user)) = p.split_once(' ') {
                                        if let Ok(head) = head.parse() {
                                            let _ = events.send(HeadEvent::Moved {
                                                user: user.to_string(),
                                                head,
                                            });
                                        }
                                    }
                                }
                                None => break,
                            },
                            _ = health.tick() => {
                                let ok = tokio::time::timeout(
                                    Duration::from_secs(10),
                                    client.simple_query("SELECT 1"),
                                )
                                .await;
                                if !matches!(ok, Ok(Ok(_))) {
                                    break;
                                }
                            }
                        }
                    }
                    driver.abort();
                    tracing::warn!("lost the LISTEN connection; reconnecting");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot connect the LISTEN connection"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// A held database user lock; dropping it unlocks (or, failing that, closes the session).
struct PgUserLock {
    conn: Option<Object>,
    key: i64,
    local: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for PgUserLock {
    fn drop(&mut self) {
        let (Some(conn), local, key) = (self.conn.take(), self.local.take(), self.key) else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if exec_c(&conn, "SELECT pg_advisory_unlock($1)", &[&key])
                        .await
                        .is_err()
                    {
                        drop(Object::take(conn));
                    }
                    drop(local);
                });
            }
            Err(_) => drop(Object::take(conn)),
        }
    }
}

/// A connection waiting for a lock: if the wait is abandoned it is closed, never pooled, so a
/// lock granted after the caller left dies with its session.
struct Pending(Option<Object>);

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(o) = self.0.take() {
            drop(Object::take(o));
        }
    }
}

impl Inner {
    fn lock_key(&self, user: &str) -> i64 {
        let h = blake3::hash(format!("{}/{user}", self.schema).as_bytes());
        i64::from_be_bytes(h.as_bytes()[..8].try_into().unwrap_or([0; 8]))
    }

    async fn conn(&self) -> Result<Object, BackendError> {
        self.pool.get().await.map_err(pool_err)
    }

    async fn head(&self, user: &str) -> Result<u64, BackendError> {
        let c = self.conn().await?;
        let row = query_opt_c(&c, "SELECT head FROM heads WHERE user_name = $1", &[&user])
            .await
            .map_err(pg)?;
        row.map_or(Ok(0), |r| u64_of(r.get(0)))
    }

    async fn commit(&self, user: &str, b: CommitBatch) -> Result<u64, BackendError> {
        // Payloads first, durably; then the rows that name them.
        let mut last = b.expected_head;
        let mut rows = Vec::with_capacity(b.entries.len());
        for (seq, bytes) in &b.entries {
            if *seq != last + 1 {
                return Err(BackendError::Corrupt(format!("sequence gap at {seq}")));
            }
            last = *seq;
            rows.push((*seq, log_path(user, *seq, bytes), bytes.len()));
        }
        let puts: Vec<(ObjPath, PutPayload)> = b
            .entries
            .iter()
            .zip(&rows)
            .map(|((_, bytes), (_, key, _))| {
                (ObjPath::from(key.as_str()), PutPayload::from(bytes.clone()))
            })
            .collect();
        futures_util::stream::iter(puts)
            .map(|(key, payload)| {
                let store = self.store.clone();
                async move { store.put(&key, payload).await.map_err(store_err) }
            })
            .buffer_unordered(8)
            .try_collect::<Vec<_>>()
            .await?;

        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(pg)?;
        exec_c(
            &tx,
            "INSERT INTO heads (user_name, head) VALUES ($1, 0) ON CONFLICT DO NOTHING",
            &[&user],
        )
        .await
        .map_err(pg)?;
        let found = u64_of(
            query_one_c(
                &tx,
                "SELECT head FROM heads WHERE user_name = $1 FOR UPDATE",
                &[&user],
            )
            .await
            .map_err(pg)?
            .get(0),
        )?;
        if found != b.expected_head {
            return Err(BackendError::HeadMoved {
                expected: b.expected_head,
                found,
            });
        }
        for (seq, key, size) in &rows {
            exec_c(
                &tx,
                "INSERT INTO log (user_name, seq, object_key, size) VALUES ($1, $2, $3, $4)",
                &[&user, &i64_of(*seq)?, key, &i64_of(*size as u64)?],
            )
            .await
            .map_err(pg)?;
        }
        for id in &b.delete_objects {
            exec_c(
                &tx,
                "DELETE FROM objects WHERE user_name = $1 AND id = $2",
                &[&user, &id.as_slice()],
            )
            .await
            .map_err(pg)?;
        }
        for o in &b.put_objects {
            exec_c(
                &tx,
                "INSERT INTO objects (user_name, id, record) VALUES ($1, $2, $3)
                 ON CONFLICT (user_name, id) DO UPDATE SET record = EXCLUDED.record",
                &[&user, &o.id.as_slice(), &to_json(o)?],
            )
            .await
            .map_err(pg)?;
        }
        for (parent, name) in &b.delete_children {
            exec_c(
                &tx,
                "DELETE FROM children WHERE user_name = $1 AND parent = $2 AND name = $3",
                &[&user, &parent.as_slice(), name],
            )
            .await
            .map_err(pg)?;
        }
        for (parent, name, child) in &b.put_children {
            exec_c(
                &tx,
                "INSERT INTO children (user_name, parent, name, child) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (user_name, parent, name) DO UPDATE SET child = EXCLUDED.child",
                &[&user, &parent.as_slice(), name, &child.as_slice()],
            )
            .await
            .map_err(pg)?;
        }
        let mut touched: Vec<[u8; 16]> = Vec::new();
        for (id, h) in &b.history {
            exec_c(
                &tx,
                "INSERT INTO history (user_name, id, version, record) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (user_name, id, version) DO UPDATE SET record = EXCLUDED.record",
                &[&user, &id.as_slice(), &i64_of(h.version)?, &to_json(h)?],
            )
            .await
            .map_err(pg)?;
            if !touched.contains(id) {
                touched.push(*id);
            }
        }
        let keep = i64_of(b.history_keep.max(1) as u64)?;
        for id in &touched {
            exec_c(
                &tx,
                "DELETE FROM history WHERE user_name = $1 AND id = $2 AND version < (
                     SELECT min(version) FROM (
                         SELECT version FROM history WHERE user_name = $1 AND id = $2
                         ORDER BY version DESC LIMIT $3) AS kept)",
                &[&user, &id.as_slice(), &keep],
            )
            .await
            .map_err(pg)?;
        }
        exec_c(
            &tx,
            "UPDATE heads SET head = $2 WHERE user_name = $1",
            &[&user, &i64_of(last)?],
        )
        .await
        .map_err(pg)?;
        let (k, rec) = &b.idempotency;
        exec_c(
            &tx,
            "INSERT INTO idempotency (user_name, key, record) VALUES ($1, $2, $3)
             ON CONFLICT (user_name, key) DO UPDATE SET record = EXCLUDED.record",
            &[&user, k, &to_json(rec)?],
        )
        .await
        .map_err(pg)?;
        // Delivered to every listening replica when (and only if) the transaction commits.
        exec_c(
            &tx,
            "SELECT pg_notify($1, $2)",
            &[&self.channel, &format!("{last} {user}")],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(last)
    }

    async fn read_log(
        &self,
        user: &str,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, BackendError> {
        let c = self.conn().await?;
        let rows = query_c(
            &c,
            "SELECT seq, object_key, size FROM log WHERE user_name = $1 AND seq > $2
                 ORDER BY seq LIMIT $3",
            &[&user, &i64_of(after)?, &i64_of(limit as u64)?],
        )
        .await
        .map_err(pg)?;
        drop(c);
        let mut wanted = Vec::new();
        let mut bytes = 0usize;
        for r in &rows {
            let size = usize::try_from(r.get::<_, i64>(2)).unwrap_or(usize::MAX);
            if !wanted.is_empty() && bytes.saturating_add(size) > max_bytes {
                break;
            }
            bytes = bytes.saturating_add(size);
            wanted.push((u64_of(r.get(0))?, r.get::<_, String>(1)));
        }
        futures_util::stream::iter(wanted)
            .map(|(seq, key)| {
                let store = self.store.clone();
                async move {
                    let b = store
                        .get(&ObjPath::from(key.as_str()))
                        .await
                        .map_err(|e| match e {
                            object_store::Error::NotFound { .. } => BackendError::Corrupt(format!(
                                "log payload {key} missing from object storage"
                            )),
                            other => store_err(other),
                        })?
                        .bytes()
                        .await
                        .map_err(store_err)?;
                    Ok::<_, BackendError>((seq, b.to_vec()))
                }
            })
            .buffered(16)
            .try_collect()
            .await
    }

    async fn delete_user(&self, name: &str) -> Result<(), BackendError> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let n = exec_c(&tx, "DELETE FROM users WHERE name = $1", &[&name])
            .await
            .map_err(pg)?;
        if n == 0 {
            return Err(BackendError::NotFound);
        }
        for table in [
            "devices",
            "tokens",
            "heads",
            "log",
            "objects",
            "children",
            "history",
            "idempotency",
            "shares",
        ] {
            exec_c(
                &tx,
                &format!("DELETE FROM {table} WHERE user_name = $1"),
                &[&name],
            )
            .await
            .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)?;
        drop(c);
        // The payloads after the rows: nothing references them any more. Best effort; a
        // failure leaves unreferenced objects, never a dangling row.
        let prefix = log_prefix(name);
        let paths = self
            .store
            .list(Some(&prefix))
            .map_ok(|m| m.location)
            .boxed();
        let mut deleted = self.store.delete_stream(paths);
        while let Some(r) = deleted.next().await {
            if let Err(e) = r {
                tracing::warn!(error = %e, user = name, "cannot delete a log payload");
            }
        }
        Ok(())
    }
}

impl Backend for PostgresS3 {
    fn admin_token_hash(&self) -> BoxFut<'_, Option<String>> {
        self.run(move |i| async move {
            let c = i.conn().await?;
            Ok(query_opt_c(
                &c,
                "SELECT value FROM meta WHERE key = 'admin_token_hash'",
                &[],
            )
            .await
            .map_err(pg)?
            .map(|r| r.get(0)))
        })
    }

    fn set_admin_token_hash(&self, hash: String) -> BoxFut<'_, ()> {
        self.run(move |i| async move {
            let c = i.conn().await?;
            exec_c(
                &c,
                "INSERT INTO meta (key, value) VALUES ('admin_token_hash', $1)
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                &[&hash],
            )
            .await
            .map_err(pg)?;
            Ok(())
        })
    }

    fn create_user(&self, user: UserRecord) -> BoxFut<'_, ()> {
        self.run(move |i| async move {
            let c = i.conn().await?;
            let n = exec_c(
                &c,
                "INSERT INTO users (name, record) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&user.name, &to_json(&user)?],
            )
            .await
            .map_err(pg)?;
            if n == 0 {
                return Err(BackendError::AlreadyExists);
            }
            Ok(())
        })
    }

    fn get_user(&self, name: String) -> BoxFut<'_, Option<UserRecord>> {
        self.run(move |i| async move {
            let c = i.conn().await?;
            query_opt_c(&c, "SELECT record FROM users WHERE name = $1", &[&name])
                .await
                .map_err(pg)?
                .map(|r| from_json(r.get(0)))
                .transpose()
        })
    }

    fn list_users(&self) -> BoxFut<'_, Vec<UserRecord>> {
        self.run(move |i| async move {
            let c = i.conn().await?;
            query_c(
                &c,
                "SELECT record FROM users ORDER BY name COLLATE \"C\"",
                &[],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| from_json(r.get(0)))
            .collect()
        })
    }

    fn delete_user(&self, name: String) -> BoxFut<'_, ()> {
        self.run(move |i| async move { i.delete_user(&name).await })
    }

    fn put_device(&self, device: DeviceRecord, old_token_hash: Option<String>) -> BoxFut<'_, ()> {
        self.run(move |i| async move {
            let mut c = i.conn().await?;
            let tx = c.transaction().await.map_err(pg)?;
            // The user row is locked until the commit: a removal of the user waits for this
            // transaction, or went first and leaves no row to find.
            if query_opt_c(
                &tx,
                "SELECT 1 FROM users WHERE name = $1 FOR SHARE",
                &[&device.user],
            )
            .await
            .map_err(pg)?
            .is_none()
            {
                return Err(BackendError::NotFound);
            }
            if let Some(old) = old_token_hash {
                exec_c(&tx, "DELETE FROM tokens WHERE hash = $1", &[&old])
                    .await
                    .map_err(pg)?;
            }
            exec_c(
                &tx,
                "DELETE FROM tokens WHERE user_name = $1 AND record::jsonb ->> 'device' = $2",
                &[&device.user, &device.name],
            )
            .await
            .map_err(pg)?;
            if let Some(h) = &device.token_hash {
                let t = TokenRecord {
                    user: device.user.clone(),
                    device: device.name.clone(),
                    device_id: device.id.clone(),
                };
                exec_c(
                    &tx,
                    "INSERT INTO tokens (hash, user_name, record) VALUES ($1, $2, $3)
                     ON CONFLICT (hash) DO UPDATE SET user_name = EXCLUDED.user_name,
                         record = EXCLUDED.record",
                    &[h, &device.user, &to_json(&t)?],
                )
                .await
                .map_err(pg)?;
            }
            exec_c(
                &tx,
                "INSERT INTO devices (user_name, name, record) VALUES ($1, $2, $3)
                 ON CONFLICT (user_name, name) DO UPDATE SET record = EXCLUDED.record",
                &[&device.user, &device.name, &to_json(&device)?],
            )
            .await
            .map_err(pg)?;
            tx.commit().await.map_err(pg)
        })
    }

    fn set_password(
        &self,
        user: String,
        password_hash: String,
        keep: Option<String>,
    ) -> BoxFut<'_, ()> {
        self.run(move |i| async move {
            let mut c = i.conn().await?;
            let tx = c.transaction().await.map_err(pg)?;
            let Some(row) = query_opt_c(
                &tx,
                "SELECT record FROM users WHERE name = $1 FOR UPDATE",
                &[&user],
            )
            .await
            .map_err(pg)?
            else {
                return Err(BackendError::NotFound);
            };
            let mut rec: UserRecord = from_json(row.get(0))?;
            rec.password_hash = password_hash;
            exec_c(
                &tx,
                "UPDATE users SET record = $2 WHERE name = $1",
                &[&user, &to_json(&rec)?],
            )
            .await
            .map_err(pg)?;
            exec_c(
                &tx,
                "DELETE FROM tokens WHERE user_name = $1
                 AND ($2::text IS NULL OR record::jsonb ->> 'device' <> $2)",
                &[&user, &keep],
            )
            .await
            .map_err(pg)?;
            let devices = query_c(
                &tx,
                "SELECT name, record FROM devices WHERE user_name = $1 FOR UPDATE",
                &[&user],
            )
            .await
            .map_err(pg)?;
            for r in devices {
                let name: String = r.get(0);
                let mut d: DeviceRecord = from_json(r.get(1))?;
                if keep.as_deref() != Some(name.as_str()) && d.token_hash.take().is_some() {
                    exec_c(
                        &tx,
                        "UPDATE devices SET record = $3 WHERE user_name = $1 AND name = $2",
                        &[&user, &name, &to_json(&d)?],
                    )
                    .await
                    .map_err(pg)?;
                }
            }
            tx.commit().await.map_err(pg)
        })
    }

    fn get_device(&self, user: String, device: String) -> BoxFut<'_, Option<DeviceRecord>> {
        self.run(move |i| async move {
            let c = i.conn().await?;
            query_opt_c(
                &c,
                "SELECT record FROM devices WHERE user_name = $1 AND name = $2",
                &[&user, &device],
            )
            .await
            .map_err(pg)?
            .map(|r| from_json(r.get(0)))
            .transpose()
        })
    }

    fn list_devices(&self, user: String) -> BoxFut<'_, Vec<DeviceRecord>> {
        self.run(move |i| async move {
            let c = i.conn().await?;
            query_c(
                &c,
                "SELECT record FROM devices WHERE user_name = $1 ORDER BY name COLLATE \"C\"",
                &[&user],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| from_json(r.get(0)))
            .collect()
        })
    }

    fn lookup_token(&self, hash: String) -> BoxFut<'_, Option<TokenRecord>> {
        self.run(move |i| async move {
            let c = i.conn().await?;
            query_opt_c(&c, "SELECT record FROM tokens WHERE hash = $1", &[&hash])
                .await
                .map_err(pg)?
                .map(|r| from_json(r.get(0)))
                .transpose()
        })
    }

    fn put_share(&self, share: ShareRecord) -> BoxFut<'_, ()> {
        self.run(move |i| async move {
            let mut c = i.conn().await?;
            let tx = c.transaction().await.map_err(pg)?;
            // As put_device: the user row is held until the commit, so a removal of the user
            // cannot leave a link behind.
            if query_opt_c(
                &tx,
                "SELECT 1 FROM users WHERE name = $1 FOR SHARE",
                &[&share.user],
            )
            .await
            .map_err(pg)?
            .is_none()
            {
                return Err(BackendError::NotFound);
            }
            exec_c(
                &tx,
                "INSERT INTO shares (hash, user_name, created_ms, record) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (hash) DO UPDATE SET user_name = $2, created_ms = $3, record = $4",
                &[
                    &share.hash,
                    &share.user,
                    &share.created_ms,
                    &to_json(&share)?,
                ],
            )
            .await
            .map_err(pg)?;
            tx.commit().await.map_err(pg)
        })
    }

    fn get_share(&self, hash: String) -> BoxFut<'_, Option<ShareRecord>> {
        self.run(move |i| async move {
            let c = i.conn().await?;
            query_opt_c(&c, "SELECT record FROM shares WHERE hash = $1", &[&hash])
                .await
                .map_err(pg)?
                .map(|r| from_json(r.get(0)))
                .transpose()
        })
    }

    fn list_shares(&self, user: String) -> BoxFut<'_, Vec<ShareRecord>> {
        self.run(move |i| async move {
            let c = i.conn().await?;
            query_c(
                &c,
                "SELECT record FROM shares WHERE user_name = $1 ORDER BY created_ms, hash",
                &[&user],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| from_json(r.get(0)))
            .collect()
        })
    }

    fn delete_share(&self, user: String, hash: String) -> BoxFut<'_, ()> {
        self.run(move |i| async move {
            let c = i.conn().await?;
            let n = exec_c(
                &c,
                "DELETE FROM shares WHERE hash = $1 AND user_name = $2",
                &[&hash, &user],
            )
            .await
            .map_err(pg)?;
            if n == 0 {
                return Err(BackendError::NotFound);
            }
            Ok(())
        })
    }

    fn lock_user(&self, user: String) -> BoxFut<'_, UserLock> {
        self.run(move |i| async move {
            let m = i
                .local_locks
                .lock()
                .entry(user.clone())
                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
                .clone();
            let local = m.lock_owned().await;
            let key = i.lock_key(&user);
            let mut pending = Pending(Some(i.lock_pool.get().await.map_err(pool_err)?));
            if let Some(c) = &pending.0 {
                exec_c(c, "SELECT pg_advisory_lock($1)", &[&key])
                    .await
                    .map_err(pg)?;
            }
            Ok(Box::new(PgUserLock {
                conn: pending.0.take(),
                key,
                local: Some(local),
            }) as UserLock)
        })
    }

    fn head(&self, user: String) -> BoxFut<'_, u64> {
        self.run(move |i| async move { i.head(&user).await })
    }

    fn idempotency(&self, user: String, key: String) -> BoxFut<'_, Option<AppendRecord>> {
        self.run(move |i| async move {
            let c = i.conn().await?;
            query_opt_c(
                &c,
                "SELECT record FROM idempotency WHERE user_name = $1 AND key = $2",
                &[&user, &key],
            )
            .await
            .map_err(pg)?
            .map(|r| from_json(r.get(0)))
            .transpose()
        })
    }

    fn get_object(&self, user: String, id: [u8; 16]) -> BoxFut<'_, Option<ObjectState>> {
        self.run(move |i| async move {
            let c = i.conn().await?;
            query_opt_c(
                &c,
                "SELECT record FROM objects WHERE user_name = $1 AND id = $2",
                &[&user, &id.as_slice()],
            )
            .await
            .map_err(pg)?
            .map(|r| from_json(r.get(0)))
            .transpose()
        })
    }

    fn list_children(&self, user: String, dir: [u8; 16]) -> BoxFut<'_, DirEntries> {
        self.run(move |i| async move {
            let c = i.conn().await?;
            query_c(
                &c,
                "SELECT name, child FROM children WHERE user_name = $1 AND parent = $2
                 ORDER BY name",
                &[&user, &dir.as_slice()],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| Ok((r.get::<_, Vec<u8>>(0), id16(r.get::<_, &[u8]>(1))?)))
            .collect()
        })
    }

    fn commit(&self, user: String, batch: CommitBatch) -> BoxFut<'_, ()> {
        self.run(move |i| async move {
            let head = i.commit(&user, batch).await?;
            // This replica's own receivers hear the NOTIFY too; this only makes it prompt.
            let _ = i.events.send(HeadEvent::Moved { user, head });
            Ok(())
        })
    }

    fn read_log(
        &self,
        user: String,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFut<'_, Vec<(u64, Vec<u8>)>> {
        self.run(move |i| async move { i.read_log(&user, after, limit, max_bytes).await })
    }

    fn snapshot(&self, user: String) -> BoxFut<'_, (u64, Vec<ObjectState>)> {
        self.run(move |i| async move {
            let mut c = i.conn().await?;
            let tx = c
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(pg)?;
            let head =
                match query_opt_c(&tx, "SELECT head FROM heads WHERE user_name = $1", &[&user])
                    .await
                    .map_err(pg)?
                {
                    Some(r) => u64_of(r.get(0))?,
                    None => 0,
                };
            let objects = query_c(
                &tx,
                "SELECT record FROM objects WHERE user_name = $1 ORDER BY id",
                &[&user],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| from_json(r.get(0)))
            .collect::<Result<Vec<ObjectState>, _>>()?;
            tx.commit().await.map_err(pg)?;
            Ok((head, objects))
        })
    }

    fn history(&self, user: String, id: [u8; 16]) -> BoxFut<'_, Vec<HistoryEntry>> {
        self.run(move |i| async move {
            let c = i.conn().await?;
            query_c(
                &c,
                "SELECT record FROM history WHERE user_name = $1 AND id = $2 ORDER BY version",
                &[&user, &id.as_slice()],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| from_json(r.get(0)))
            .collect()
        })
    }

    fn put_chunks(&self, chunks: Vec<(ChunkId, bytes::Bytes)>) -> BoxFut<'_, ()> {
        self.run(move |i| async move {
            futures_util::stream::iter(chunks)
                .map(|(id, bytes)| {
                    let store = i.store.clone();
                    async move {
                        store
                            .put(&chunk_path(&id), PutPayload::from(bytes))
                            .await
                            .map_err(store_err)
                    }
                })
                .buffer_unordered(8)
                .try_collect::<Vec<_>>()
                .await?;
            Ok(())
        })
    }

    fn get_chunk(&self, id: ChunkId) -> BoxFut<'_, Vec<u8>> {
        self.run(move |i| async move {
            let r = i.store.get(&chunk_path(&id)).await.map_err(store_err)?;
            Ok(r.bytes().await.map_err(store_err)?.to_vec())
        })
    }

    fn head_events(&self) -> broadcast::Receiver<HeadEvent> {
        self.inner.events.subscribe()
    }
}

/// The test database and bucket from the environment that `tests/scaleout-env.sh` sets:
/// `None` when absent, a panic when `DELTADRIVE_TEST_BACKEND=postgres_s3` demands them.
#[cfg(test)]
pub(crate) fn test_config(schema: &str) -> Option<PostgresS3Config> {
    let url = std::env::var("DELTADRIVE_TEST_PG_URL").ok();
    let bucket = std::env::var("DELTADRIVE_TEST_S3_BUCKET").ok();
    let (Some(url), Some(bucket)) = (url, bucket) else {
        assert_ne!(
            std::env::var("DELTADRIVE_TEST_BACKEND").as_deref(),
            Ok("postgres_s3"),
            "DELTADRIVE_TEST_BACKEND=postgres_s3 but DELTADRIVE_TEST_PG_URL / \
             DELTADRIVE_TEST_S3_BUCKET are unset (run under tests/scaleout-env.sh)"
        );
        return None;
    };
    Some(PostgresS3Config {
        metadata: url,
        schema: schema.to_string(),
        objects: format!("s3://{bucket}/{schema}"),
        ..PostgresS3Config::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh_schema() -> String {
        format!("conf_{}", hex::encode(rand::random::<[u8; 6]>()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_backend_conformance_suite() {
        let Some(cfg) = test_config(&fresh_schema()) else {
            eprintln!("skipped: no PostgreSQL/S3 in the environment (tests/scaleout-env.sh)");
            return;
        };
        let b = PostgresS3::open(&cfg).await.expect("open postgres_s3");
        crate::server::backend::conformance::run(&b).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn migrations_from_several_replicas_at_once_apply_once() {
        let Some(cfg) = test_config(&fresh_schema()) else {
            eprintln!("skipped: no PostgreSQL/S3 in the environment (tests/scaleout-env.sh)");
            return;
        };
        let (a, b, c) = tokio::join!(
            PostgresS3::open(&cfg),
            PostgresS3::open(&cfg),
            PostgresS3::open(&cfg)
        );
        let (a, _b, _c) = (a.expect("a"), b.expect("b"), c.expect("c"));
        let conn = a.inner.conn().await.expect("conn");
        let n: i64 = query_one_c(&conn, "SELECT count(*) FROM schema_migrations", &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(n, MIGRATIONS.len() as i64);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_listener_reconnects_resyncs_and_hears_other_replicas_again() {
        let schema = fresh_schema();
        let Some(cfg) = test_config(&schema) else {
            eprintln!("skipped: no PostgreSQL/S3 in the environment (tests/scaleout-env.sh)");
            return;
        };
        let a = PostgresS3::open(&cfg).await.expect("a");
        let b = PostgresS3::open(&cfg).await.expect("b");
        let mut events = a.head_events();
        let conn = b.inner.conn().await.expect("conn");
        let killed: i64 = query_one_c(
            &conn,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE application_name = $1",
            &[&format!("deltadrive-listen-{schema}")],
        )
        .await
        .expect("terminate")
        .get(0);
        assert_eq!(killed, 2, "both replicas' LISTEN sessions");
        async fn next(events: &mut broadcast::Receiver<HeadEvent>) -> HeadEvent {
            tokio::time::timeout(Duration::from_secs(15), events.recv())
                .await
                .expect("an event in time")
                .expect("event")
        }
        assert_eq!(
            next(&mut events).await,
            HeadEvent::Resync,
            "resync after reconnect"
        );
        // Give b's listener time to come back too, then commit through b only.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let batch = CommitBatch {
            expected_head: 0,
            entries: vec![(1, b"payload".to_vec())],
            history_keep: 1,
            idempotency: (
                "k".into(),
                AppendRecord {
                    first_seq: 1,
                    last_seq: 1,
                    body_hash: [0; 32],
                },
            ),
            ..CommitBatch::default()
        };
        b.commit("u".into(), batch).await.expect("commit on b");
        loop {
            match next(&mut events).await {
                HeadEvent::Moved { user, head } if user == "u" => {
                    assert_eq!(head, 1);
                    break;
                }
                _ => {}
            }
        }
        assert_eq!(
            a.read_log("u".into(), 0, 10, 1 << 20).await.expect("read"),
            vec![(1, b"payload".to_vec())],
            "a reads b's payload from object storage"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lock_is_shared_by_replicas_and_an_abandoned_wait_leaks_nothing() {
        let Some(cfg) = test_config(&fresh_schema()) else {
            eprintln!("skipped: no PostgreSQL/S3 in the environment (tests/scaleout-env.sh)");
            return;
        };
        let a = PostgresS3::open(&cfg).await.expect("a");
        let b = PostgresS3::open(&cfg).await.expect("b");
        let g = a.lock_user("u".into()).await.expect("lock on a");
        for _ in 0..3 {
            let w = tokio::time::timeout(Duration::from_millis(200), b.lock_user("u".into())).await;
            assert!(w.is_err(), "replica b waits while a holds the lock");
        }
        drop(g);
        let g = tokio::time::timeout(Duration::from_secs(10), b.lock_user("u".into()))
            .await
            .expect("b gets the lock once a released it")
            .expect("lock on b");
        drop(g);
        tokio::time::timeout(Duration::from_secs(10), a.lock_user("u".into()))
            .await
            .expect("a gets it back: no abandoned wait kept it")
            .expect("lock on a");
    }
}
