//! `deltadrive server`: parses the server's flags into a [`ServerConfig`] and runs it on a
//! multi-threaded tokio runtime.

use std::time::Duration;

use anyhow::Context;

use super::ServerArgs;
use crate::server::storage::StorageConfig;
use crate::server::ServerConfig;

/// Runs the server until SIGTERM/SIGINT.
pub fn server(args: ServerArgs) -> anyhow::Result<()> {
    let data = args
        .data
        .context("--data DIR is required (the embedded backend keeps everything there)")?;
    let config = ServerConfig {
        listen: args.listen,
        data,
        tls: args.tls_cert.zip(args.tls_key),
        max_request_bytes: args.max_request_bytes,
        storage: StorageConfig {
            max_object_bytes: args.max_object_bytes,
            history_versions: args.history_versions.max(1),
        },
        max_wait: Duration::from_millis(args.max_wait_ms),
        public_url: args.public_url,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(crate::server::run(config))
}
