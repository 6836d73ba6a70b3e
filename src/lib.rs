//! deltadrive: a FUSE-mounted synchronized folder.
//!
//! One folder a concept (see `docs/architecture.md`):
//! - [`changelog`]: the universal change-log format. Pure.
//! - [`delta`]: delta strategies (dirty ranges, rsync, whole file) and their selection. Pure.
//! - [`store`]: the device's RocksDB store behind a narrow facade.
//! - [`fs`]: the fuser adapter over the store.
//! - [`cli`]: the command-line contract; `main.rs` stays thin.

pub mod changelog;
pub mod cli;
pub mod delta;
pub mod fs;
pub mod home;
pub mod logging;
pub mod store;
