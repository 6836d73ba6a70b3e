//! `deltadrive server`: parses the server's flags into a [`ServerConfig`] and runs it on a
//! multi-threaded tokio runtime.

use std::time::Duration;

use anyhow::Context;

use super::ServerArgs;
use crate::server::access::AccessConfig;
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
            let password = match &args.metadata_password_file {
                Some(f) => Some(super::admin::read_secret(f)?),
                None => std::env::var("DELTADRIVE_METADATA_PASSWORD")
                    .ok()
                    .filter(|p| !p.is_empty()),
            };
            BackendConfig::PostgresS3(PostgresS3Config {
                password,
                ca_file: args.metadata_ca_file,
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
        access: AccessConfig {
            login_per_address_per_minute: args.login_tries_per_address,
            login_per_user_per_minute: args.login_tries_per_user,
            password_threads: args.password_threads,
            password_queue: args.password_queue,
            max_json_bytes: args.max_json_bytes,
            header_read_timeout: Duration::from_secs(args.header_read_timeout_secs),
            idle_timeout: Duration::from_secs(args.idle_timeout_secs),
            max_connections: args.max_connections,
        },
    };
    anyhow::ensure!(
        config.access.idle_timeout >= config.max_wait + Duration::from_secs(10),
        "--idle-timeout-secs must be at least --max-wait-ms plus 10 s, or long polls are cut"
    );
    if let Some(u) = &config.public_url {
        let parsed = reqwest::Url::parse(u).with_context(|| format!("--public-url {u}"))?;
        anyhow::ensure!(
            matches!(parsed.scheme(), "http" | "https") && parsed.host().is_some(),
            "--public-url {u}: give http(s)://HOST[:PORT]"
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(crate::server::run(config))
}
