//! `deltadrive server`: the storage and management server (axum over HTTP or HTTPS).
//!
//! Owns the process: opens the backend (embedded RocksDB under `--data DIR`, or PostgreSQL + S3
//! with `--metadata`/`--objects`), writes the admin token file (0600) at first start, serves the
//! API (`api`) and the web side (`web`) on the same port, and shuts down gracefully on SIGTERM/SIGINT. What always holds: the API layer
//! reaches storage only through [`backend::Backend`] and the [`storage::Storage`] service, so a
//! second backend needs no change above the trait.

pub mod access;
pub mod api;
pub mod auth;
pub mod backend;
pub mod content;
pub mod error;
pub mod limits;
pub mod metrics;
pub mod storage;
pub mod web;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use backend::Backend;
use metrics::Metrics;
use storage::{Storage, StorageConfig};

/// Where the server keeps its state.
#[derive(Clone, Debug)]
pub enum BackendConfig {
    /// RocksDB and a content folder under this folder.
    Embedded { data: PathBuf },
    /// PostgreSQL for metadata, S3-compatible object storage for payloads and chunks.
    PostgresS3(backend::postgres_s3::PostgresS3Config),
}

/// Everything the server is started with.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: String,
    pub backend: BackendConfig,
    /// Where the admin token is written at first start (default for the embedded backend:
    /// `DATA/admin.token`; required for the scale-out backend).
    pub admin_token_file: Option<PathBuf>,
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The largest request body accepted (413 beyond).
    pub max_request_bytes: usize,
    pub storage: StorageConfig,
    /// The longest a long poll waits.
    pub max_wait: Duration,
    /// The base URL devices are told to use for storage; default: the URL they logged in with.
    pub public_url: Option<String>,
    /// Limits facing strangers: login tries, password checks, JSON bodies, connections.
    pub access: access::AccessConfig,
}

/// State shared by every request.
#[derive(Clone)]
pub struct AppState {
    pub backend: Arc<dyn Backend>,
    pub storage: Arc<Storage>,
    pub metrics: Arc<Metrics>,
    pub config: Arc<ServerConfig>,
    /// Login tries per address and per user.
    pub logins: Arc<access::LoginLimiter>,
    /// The threads that hash and check passwords.
    pub passwords: Arc<access::PasswordPool>,
    /// The web side's sessions (in memory, see `web::session`).
    pub web: Arc<web::session::Sessions>,
    /// When each device was last seen by this process (the web's device page).
    pub seen: Arc<web::seen::Seen>,
}

/// Installs the ring crypto provider for rustls (once per process; later calls do nothing).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Writes the admin token file at first start and records its hash.
async fn ensure_admin_token(backend: &dyn Backend, config: &ServerConfig) -> anyhow::Result<()> {
    if backend.admin_token_hash().await?.is_some() {
        return Ok(());
    }
    use std::os::unix::fs::OpenOptionsExt;
    let path = match (&config.admin_token_file, &config.backend) {
        (Some(p), _) => p.clone(),
        (None, BackendConfig::Embedded { data }) => data.join("admin.token"),
        (None, BackendConfig::PostgresS3(_)) => anyhow::bail!(
            "the database holds no admin token yet: give --admin-token-file F for the first start"
        ),
    };
    let token = auth::new_token();
    let mut tmp = path.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    writeln!(f, "{token}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    backend
        .set_admin_token_hash(auth::hash_token(&token))
        .await?;
    // Two replicas starting at once on an empty database: the last hash written wins, and only
    // the file of that token is valid.
    if backend.admin_token_hash().await?.as_deref() != Some(auth::hash_token(&token).as_str()) {
        anyhow::bail!(
            "another replica set the admin token at the same time; {} is not valid: start again",
            path.display()
        );
    }
    tracing::info!(path = %path.display(), "wrote the admin token");
    Ok(())
}

/// Runs the server until SIGTERM or SIGINT.
///
/// # Errors
/// The data folder or backend cannot be opened, the address cannot be bound, TLS files are bad.
pub async fn run(config: ServerConfig) -> anyhow::Result<()> {
    install_crypto_provider();
    let backend: Arc<dyn Backend> = match &config.backend {
        BackendConfig::Embedded { data } => {
            std::os::unix::fs::DirBuilderExt::mode(
                std::fs::DirBuilder::new().recursive(true),
                0o700,
            )
            .create(data)
            .with_context(|| format!("cannot create {}", data.display()))?;
            Arc::new(
                backend::embedded::Embedded::open(data)
                    .with_context(|| format!("cannot open the backend in {}", data.display()))?,
            )
        }
        BackendConfig::PostgresS3(c) => Arc::new(
            backend::postgres_s3::PostgresS3::open(c)
                .await
                .context("cannot open the PostgreSQL + S3 backend")?,
        ),
    };
    ensure_admin_token(backend.as_ref(), &config).await?;
    let state = AppState {
        storage: Arc::new(Storage::new(backend.clone(), config.storage.clone())),
        backend,
        metrics: Arc::new(Metrics::default()),
        config: Arc::new(config.clone()),
        logins: Arc::new(access::LoginLimiter::new(&config.access)),
        passwords: Arc::new(
            access::PasswordPool::new(config.access.password_threads, config.access.password_queue)
                .context("cannot start the password threads")?,
        ),
        web: Arc::default(),
        seen: Arc::default(),
    };
    let app = api::router(state);

    let listener = std::net::TcpListener::bind(&config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr: SocketAddr = listener.local_addr()?;
    let handle = axum_server::Handle::new();
    let h = handle.clone();
    // Handlers are installed here, before READY=1: a stop right after the start is a clean
    // shutdown, not the default action of SIGTERM.
    let shutdown = shutdown_signal();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        h.graceful_shutdown(Some(Duration::from_secs(10)));
    });
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    println!("deltadrive server listening on {scheme}://{addr}");
    let _ = std::io::stdout().flush();
    let where_ = match &config.backend {
        BackendConfig::Embedded { data } => data.display().to_string(),
        BackendConfig::PostgresS3(c) => format!("postgres schema {} + {}", c.schema, c.objects),
    };
    tracing::info!(%addr, scheme, backend = %where_, "listening");
    // The socket is bound: connections queue from here on, so a unit `Type=notify` may
    // start what depends on the server.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    // The client address reaches handlers (login limits, the log of failed logins).
    let svc = app.into_make_service_with_connect_info::<SocketAddr>();
    let guarded = access::Guarded::new(
        axum_server::accept::DefaultAcceptor,
        config.access.max_connections,
        config.access.idle_timeout,
    );
    match &config.tls {
        Some((cert, key)) => {
            let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                .await
                .context("cannot load the TLS certificate and key")?;
            let mut server = axum_server::from_tcp(listener)?
                .acceptor(axum_server::tls_rustls::RustlsAcceptor::new(tls).acceptor(guarded))
                // A connection that never sends a byte: hyper's header timeout starts only
                // once the protocol is known.
                .first_request_timeout(config.access.header_read_timeout);
            server
                .http_builder()
                .http1()
                .header_read_timeout(config.access.header_read_timeout);
            server.handle(handle).serve(svc).await?;
        }
        None => {
            let mut server = axum_server::from_tcp(listener)?
                .acceptor(guarded)
                .first_request_timeout(config.access.header_read_timeout);
            server
                .http_builder()
                .http1()
                .header_read_timeout(config.access.header_read_timeout);
            server.handle(handle).serve(svc).await?;
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Installs the SIGTERM/SIGINT handlers now; the future completes on the first of them.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let streams = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        match streams {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! {
                    _ = t.recv() => {}
                    _ = i.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
