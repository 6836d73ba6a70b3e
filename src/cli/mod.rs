//! The command-line contract (`docs/cli.md`): scripts and tests rely on it, so names and
//! flags change only with a decision record. Each subcommand's handler lives in its own
//! file here and stays thin: it parses, calls into the owning module, prints one clear line
//! on error and exits non-zero.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub mod admin;
pub mod docs;
pub mod history;
pub mod login;
pub mod mount;
pub mod pin;
pub mod server;

/// A synced folder for Linux: FUSE-mounted, byte-precise deltas, writable offline.
#[derive(Parser, Debug)]
#[command(name = "deltadrive", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where a device keeps its config and state.
#[derive(Args, Debug, Clone)]
pub struct HomeArg {
    /// The device's home folder (config and state of one device) [default: ~/.local/share/deltadrive]
    #[arg(long, env = "DELTADRIVE_HOME", value_name = "H")]
    pub home: Option<PathBuf>,
}

// Parsed once per process: the server's many flags make its variant large, and that costs
// nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the storage and management server
    Server(ServerArgs),
    /// Administer users and devices on a server (needs the admin token)
    Admin(AdminArgs),
    /// Log this device in to a server and remember its token in the home folder
    Login(LoginArgs),
    /// Change the password of this device's user (other devices must log in again)
    Passwd(PasswdArgs),
    /// Mount the synced folder (returns once the mount is ready)
    Mount(mount::MountArgs),
    /// Unmount a synced folder (also while files in it are open)
    Unmount(mount::UnmountArgs),
    /// Sync a plain folder, watching it for changes
    Watch(WatchArgs),
    /// Show pending uploads, last sync, conflicts and whether the server is reachable
    Status(StatusArgs),
    /// List the earlier versions of a file kept by the server
    History(HistoryArgs),
    /// Bring back an earlier version of a file
    Restore(RestoreArgs),
    /// Wait until this device has sent and received every change (a progress bar on a terminal)
    Wait(WaitArgs),
    /// Keep a file or folder's content on this device (files on demand) and fetch it now
    Pin(pin::PinArgs),
    /// Let a pinned file or folder's content be evicted when the cache needs room
    Unpin(pin::UnpinArgs),
    /// Write the man pages (deltadrive.1 and one per subcommand) into a folder
    #[command(hide = true)]
    Man(docs::ManArgs),
    /// List the transactions waiting in this device's outbox (op kinds and versions)
    #[command(hide = true)]
    Outbox(StatusArgs),
    /// Print a shell completion script
    #[command(hide = true)]
    Completions(docs::CompletionsArgs),
}

#[derive(Args, Debug)]
pub struct ServerArgs {
    /// Address to listen on, e.g. 127.0.0.1:8080
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// Folder of the embedded backend (RocksDB and content); created if missing
    #[arg(long, value_name = "DIR", conflicts_with_all = ["metadata", "objects"])]
    pub data: Option<PathBuf>,
    /// Scale-out backend: PostgreSQL URL for the metadata (postgres://USER@HOST:PORT/DB)
    #[arg(long, value_name = "URL", requires = "objects")]
    pub metadata: Option<String>,
    /// Scale-out backend: file holding the database password (first line), kept off the command
    /// line and out of the URL [default: the environment variable DELTADRIVE_METADATA_PASSWORD]
    #[arg(long, value_name = "F", requires = "metadata")]
    pub metadata_password_file: Option<PathBuf>,
    /// Scale-out backend: PEM file of the CA of the database's certificate; TLS is then required
    /// and the certificate and host name verified (verify-full). Without it, TLS that the URL's
    /// sslmode allows is verified against the system's roots
    #[arg(long, value_name = "FILE", requires = "metadata")]
    pub metadata_ca_file: Option<PathBuf>,
    /// Scale-out backend: the schema holding the tables (created if missing)
    #[arg(
        long,
        value_name = "NAME",
        default_value = "public",
        requires = "metadata"
    )]
    pub metadata_schema: String,
    /// Scale-out backend: object storage for log payloads and chunks, s3://BUCKET[/PREFIX]
    #[arg(long, value_name = "URL", requires = "metadata")]
    pub objects: Option<String>,
    /// S3-compatible endpoint [default: AWS_ENDPOINT_URL, else AWS]; http:// allows plain HTTP
    #[arg(long, value_name = "URL", requires = "objects")]
    pub s3_endpoint: Option<String>,
    /// S3 region [default: AWS_REGION, else us-east-1]
    #[arg(long, value_name = "R", requires = "objects")]
    pub s3_region: Option<String>,
    /// S3 access key id [default: AWS_ACCESS_KEY_ID]
    #[arg(long, value_name = "ID", requires = "objects")]
    pub s3_access_key_id: Option<String>,
    /// File holding the S3 secret access key [default: AWS_SECRET_ACCESS_KEY]
    #[arg(long, value_name = "F", requires = "objects")]
    pub s3_secret_access_key_file: Option<PathBuf>,
    /// Where the admin token is written at first start (0600) [default: DIR/admin.token];
    /// required for the first start of the scale-out backend
    #[arg(long, value_name = "F")]
    pub admin_token_file: Option<PathBuf>,
    /// TLS certificate chain (PEM); serve HTTPS when given with --tls-key
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM)
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Largest request body accepted, in bytes (413 beyond)
    #[arg(long, value_name = "BYTES", default_value_t = 256 << 20)]
    pub max_request_bytes: usize,
    /// Largest file content the server keeps, in bytes (writes apply chunk by chunk)
    #[arg(long, value_name = "BYTES", default_value_t = 64 << 30)]
    pub max_object_bytes: u64,
    /// How many versions of each file's content the server keeps
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub history_versions: usize,
    /// Most work one append may do, in bytes read, produced and hashed (an op counts 1 KiB;
    /// a truncate that grows a file hashes the zeros it adds); 413 beyond
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 30)]
    pub max_append_work_bytes: u64,
    /// Memory all appends in progress may hold together (bodies, decoded logs, new content),
    /// in bytes; an append that needs more than all of it gets 413
    #[arg(long, value_name = "BYTES", default_value_t = 2 << 30)]
    pub append_memory_bytes: u64,
    /// How long an append waits for memory held by other appends before it gets 503 with
    /// Retry-After, in milliseconds
    #[arg(long, value_name = "MS", default_value_t = 5_000)]
    pub append_memory_wait_ms: u64,
    /// Largest base and result of an rsync delta the server applies, in bytes (both are held
    /// whole in memory); 413 beyond
    #[arg(long, value_name = "BYTES", default_value_t = 512 << 20)]
    pub max_rsync_bytes: u64,
    /// Longest a long poll (`GET /v1/log/wait`) waits, in milliseconds
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    pub max_wait_ms: u64,
    /// The public base URL of this server, told to devices as their storage URL (set it behind
    /// a TLS proxy: https://HOST) [default: derived from the request's Host header]
    #[arg(long, value_name = "URL")]
    pub public_url: Option<String>,
    /// Login tries a minute from one client address (IPv6: one /64), also the burst; over it,
    /// 429 before the password is checked
    #[arg(long, value_name = "N", default_value_t = 30)]
    pub login_tries_per_address: u32,
    /// Login tries a minute for one user name, also the burst (429 beyond)
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub login_tries_per_user: u32,
    /// Threads that check passwords (argon2, ~19 MiB each while running)
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub password_threads: usize,
    /// Password checks that may wait for a thread (429 beyond)
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub password_queue: usize,
    /// Largest JSON request body (login, admin and password routes), in bytes (413 beyond)
    #[arg(long, value_name = "BYTES", default_value_t = 64 << 10)]
    pub max_json_bytes: usize,
    /// Longest wait for a request's headers, in seconds (also closes idle HTTP/1 keep-alive
    /// connections)
    #[arg(long, value_name = "S", default_value_t = 30)]
    pub header_read_timeout_secs: u64,
    /// A connection on which nothing moves for this many seconds is closed (at least the long
    /// poll's --max-wait-ms plus 10 s)
    #[arg(long, value_name = "S", default_value_t = 120)]
    pub idle_timeout_secs: u64,
    /// Open connections at most; further ones are closed at once
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub max_connections: usize,
}

#[derive(Args, Debug)]
pub struct AdminArgs {
    /// Server URL, e.g. http://127.0.0.1:8080
    #[arg(long, value_name = "URL")]
    pub server: String,
    /// File holding the admin token (the server writes DIR/admin.token at first start)
    #[arg(long, value_name = "F")]
    pub admin_token_file: PathBuf,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Manage users
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Manage devices
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// Create a user
    Add {
        name: String,
        /// File holding the user's password (first line); without it a random one is printed
        #[arg(long, value_name = "P")]
        password_file: Option<PathBuf>,
    },
    /// List users
    List,
    /// Remove a user and all their data
    Remove { name: String },
    /// Set a user's password; every device of the user must log in again
    SetPassword {
        name: String,
        /// File holding the new password (first line)
        #[arg(long, value_name = "P")]
        password_file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum DeviceCommand {
    /// List a user's devices
    List { user: String },
    /// Revoke a device's token at once
    Revoke { user: String, device: String },
}

#[derive(Args, Debug)]
pub struct LoginArgs {
    /// Server URL, e.g. http://127.0.0.1:8080
    #[arg(long, value_name = "URL")]
    pub server: String,
    /// User name
    #[arg(long, value_name = "NAME")]
    pub user: String,
    /// File holding the password (first line)
    #[arg(long, value_name = "P")]
    pub password_file: PathBuf,
    /// A name for this device, unique among the user's devices
    #[arg(long, value_name = "NAME")]
    pub device: String,
    /// PEM file of a CA to trust for an HTTPS server with a private certificate
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    #[command(flatten)]
    pub home: HomeArg,
}

#[derive(Args, Debug)]
pub struct PasswdArgs {
    /// File holding the current password (first line) [default: prompt]
    #[arg(long, value_name = "F")]
    pub old_password_file: Option<PathBuf>,
    /// File holding the new password (first line) [default: prompt twice]
    #[arg(long, value_name = "F")]
    pub new_password_file: Option<PathBuf>,
    #[command(flatten)]
    pub home: HomeArg,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// The folder to sync (an existing folder; the home folder must not be inside it)
    pub dir: PathBuf,
    #[command(flatten)]
    pub home: HomeArg,
    /// Stay in the foreground instead of returning once the folder is watched
    #[arg(long)]
    pub foreground: bool,
    /// Milliseconds the folder must be quiet before its changes are taken in (and before
    /// new files, renames and deletes are committed as a change)
    #[arg(long, default_value_t = 300, value_name = "MS")]
    pub quiet_ms: u64,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub home: HomeArg,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct HistoryArgs {
    /// A path inside the mounted folder
    pub path: PathBuf,
    #[command(flatten)]
    pub home: HomeArg,
}

// `--version V` is this command's own flag, so the program's `--version` is left off here.
#[derive(Args, Debug)]
#[command(disable_version_flag = true)]
pub struct RestoreArgs {
    /// A path inside the mounted folder
    pub path: PathBuf,
    /// The version to bring back (see `deltadrive history`)
    #[arg(long, value_name = "V")]
    pub version: u64,
    #[command(flatten)]
    pub home: HomeArg,
}

#[derive(Args, Debug)]
pub struct WaitArgs {
    #[command(flatten)]
    pub home: HomeArg,
    /// Give up (exit 1) after this many seconds
    #[arg(long, value_name = "S")]
    pub timeout_secs: Option<u64>,
}

/// Runs one parsed command line; the error is printed as one line by `main`.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Mount(a) => mount::mount(a),
        Command::Unmount(a) => mount::unmount(a),
        Command::Status(a) => mount::status(a),
        Command::Server(a) => server::server(a),
        Command::Admin(a) => admin::admin(a),
        Command::Login(a) => login::login(a),
        Command::Passwd(a) => login::passwd(a),
        Command::Man(a) => docs::man(a),
        Command::Outbox(a) => mount::outbox(a),
        Command::Completions(a) => docs::completions(a),
        Command::Watch(a) => mount::watch(a),
        Command::History(a) => history::history(a),
        Command::Restore(a) => history::restore(a),
        Command::Wait(a) => history::wait(a),
        Command::Pin(a) => pin::pin(a),
        Command::Unpin(a) => pin::unpin(a),
    }
}
/// `1234567` as `1.2 MiB`.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
