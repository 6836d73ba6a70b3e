//! deltadrive: a FUSE-mounted synchronized folder.
//!
//! One folder a concept (see `docs/architecture.md`):
//! - [`changelog`]: the universal change-log format. Pure.
//! - [`delta`]: delta strategies (dirty ranges, rsync, whole file) and their selection. Pure.
//! - [`rules`]: the tree rules (does an op apply to a tree, what it changes), once. Pure.
//! - [`engine`]: the sync state machine: local and remote changes in, actions out. No I/O.
//! - [`store`]: the device's RocksDB store behind a narrow facade.
//! - [`fs`]: the fuser adapter over the store.
//! - [`ignore`]: `.deltaignore` files and built-in patterns: what stays on the device.
//! - [`sync`]: the I/O side of sync (today: the outbox uploader).
//! - [`cli`]: the command-line contract; `main.rs` stays thin.
//! - [`server`]: the storage and management server (axum, embedded RocksDB backend).
//! - [`client`]: the reqwest client of the server's API and the device's login.

pub mod changelog;
pub mod cli;
pub mod client;
pub mod delta;
pub mod engine;
pub mod fs;
pub mod home;
pub mod ignore;
pub mod logging;
pub mod rules;
pub mod server;
pub mod store;
pub mod sync;
pub mod watch;
