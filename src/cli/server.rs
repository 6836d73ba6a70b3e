//! `deltadrive server`: parses the server's flags into a [`ServerConfig`] and runs it on a
//! multi-threaded tokio runtime.

use std::time::Duration;

use anyhow::Context;

use super::ServerArgs;
use crate::server::backend::postgres_s3::PostgresS3Config;
use crate::server::limits::AppendLimits;
use crate::server::storage::StorageConfig;
use crate::server::{BackendConfig, ServerConfig};

/// Runs the server until SIGTERM/SIGINT.
pub fn server(args: ServerArgs) -> anyhow::Result<()> {
    let backend = match (args.data, args.metadata, args.objects) {
        (Some(data), None, None) => BackendConfig::Embedded { data },
        (None, Some(metadata), Some(objects)) => {
            let secret = match &args.s3_secret_access_key_file {
                Some(f) => Some(
                    std::fs::read_to_string(f)
                        .with_context(|| format!("cannot read {}", f.display()))?
                        .trim()
                        .to_string(),
                ),
                None => None,
            };
            BackendConfig::PostgresS3(PostgresS3Config {
                metadata,
                schema: args.metadata_schema,
                objects,
                s3_endpoint: args.s3_endpoint,
                s3_region: args.s3_region,
                s3_access_key_id: args.s3_access_key_id,
                s3_secret_access_key: secret,
            })
        }
        _ => anyhow::bail!(
            "give either --data DIR (embedded backend) or --metadata URL with --objects              s3://BUCKET (scale-out backend)"
        ),
    };
    let config = ServerConfig {
        listen: args.listen,
        backend,
        admin_token_file: args.admin_token_file,
        tls: args.tls_cert.zip(args.tls_key),
        max_request_bytes: args.max_request_bytes,
        storage: StorageConfig {
            max_object_bytes: args.max_object_bytes,
            history_versions: args.history_versions.max(1),
            limits: AppendLimits {
                work_bytes: args.max_append_work_bytes,
                memory_bytes: args.append_memory_bytes,
                memory_wait: Duration::from_millis(args.append_memory_wait_ms),
                max_rsync_bytes: args.max_rsync_bytes,
            },
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
