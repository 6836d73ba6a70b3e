//! deltadrive: a FUSE-mounted synchronized folder.
//!
//! One folder a concept (see `docs/architecture.md`):
//! - [`changelog`]: the universal change-log format. Pure.
//! - [`delta`]: delta strategies (dirty ranges, rsync, whole file) and their selection. Pure.
//! - [`store`]: the device's RocksDB store behind a narrow facade.
//! - [`fs`]: the fuser adapter over the store.
//! - [`cli`]: the command-line contract; `main.rs` stays thin.
//! - [`server`]: the storage and management server (axum, embedded RocksDB backend).
//! - [`client`]: the reqwest client of the server's API and the device's login.

pub mod changelog;
pub mod cli;
pub mod client;
pub mod delta;
pub mod fs;
pub mod home;
pub mod logging;
pub mod server;
pub mod store;
