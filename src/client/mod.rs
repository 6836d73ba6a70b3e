//! The reqwest client of the server's HTTP API (`docs/http-api.md`), used by `admin` and
//! `login` and by the sync engine, and [`DeviceConfig`], the device's login kept in
//! `H/device.json` (mode 0600).
//!
//! What always holds: every non-2xx answer becomes a [`ClientError::Api`] carrying the status
//! and the server's one-line message; TLS uses rustls with the ring provider. No request can
//! hang on a stalled connection: every read waits at most [`READ_TIMEOUT`] for the next bytes
//! (the long poll, which is silent by design, has its own client and a total timeout), and
//! every request has a total timeout sized to what it carries.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::{Method, RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::home::Home;

/// Longest wait for the next bytes of an answer: a stalled connection fails after this and
/// the caller retries on a new one.
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);
/// Total time of a request that carries little (JSON, small pages).
const SMALL_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// The slowest transfer rate a sized request is given time for (total timeouts of appends,
/// log pages and content: 120 s plus the bytes at this rate).
const MIN_RATE: u64 = 256 << 10;

/// Total timeout of a request moving `bytes`.
pub fn sized_timeout(bytes: u64) -> Duration {
    SMALL_REQUEST_TIMEOUT + Duration::from_secs(bytes / MIN_RATE)
}

/// Failures talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("server answered {status}: {message}")]
    Api {
        status: StatusCode,
        message: String,
        /// The raw JSON body (e.g. the `stale` list of a 409).
        body: Option<serde_json::Value>,
    },
    #[error("cannot reach the server: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("bad answer from the server: {0}")]
    Decode(String),
    #[error("{0}")]
    Config(String),
    /// Writing fetched content to a local file failed.
    #[error("writing fetched content: {0}")]
    Io(#[from] std::io::Error),
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A user as listed by the admin API.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UserInfo {
    pub name: String,
    pub created_ms: i64,
}

/// A device as listed by the API.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub name: String,
    pub id: String,
    pub revoked: bool,
    pub created_ms: i64,
    pub last_login_ms: i64,
}

/// The answer to a login.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoginInfo {
    pub token: String,
    pub device_id: String,
    pub storage_url: String,
}

/// The sequence numbers an append got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendResult {
    pub first_seq: u64,
    pub last_seq: u64,
}

/// One page of the log: entries (seq, encoded transaction) and the head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogPage {
    pub head: u64,
    /// Each entry is a slice of the answer's one buffer (no copy).
    pub entries: Vec<(u64, bytes::Bytes)>,
}

/// Splits the binary framing of `GET /v1/log` (u64 BE seq, u32 BE len, bytes; repeated)
/// into slices of `body`.
pub fn parse_log_frames(body: &bytes::Bytes) -> Result<Vec<(u64, bytes::Bytes)>, ClientError> {
    let mut b: &[u8] = body;
    let mut out = Vec::new();
    while !b.is_empty() {
        if b.len() < 12 {
            return Err(ClientError::Decode("truncated log frame header".into()));
        }
        let seq = u64::from_be_bytes(
            b[..8]
                .try_into()
                .map_err(|_| ClientError::Decode("seq".into()))?,
        );
        let len = u32::from_be_bytes(
            b[8..12]
                .try_into()
                .map_err(|_| ClientError::Decode("len".into()))?,
        ) as usize;
        b = &b[12..];
        if b.len() < len {
            return Err(ClientError::Decode("truncated log frame".into()));
        }
        let at = body.len() - b.len();
        out.push((seq, body.slice(at..at + len)));
        b = &b[len..];
    }
    Ok(out)
}

/// A client of one server, with an optional bearer token.
#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    /// For the long poll only: no read timeout (it is silent until the head moves).
    http_wait: reqwest::Client,
}

impl Client {
    /// A client of `base` (e.g. `https://host:8443`), trusting `ca_cert` (PEM) if given.
    ///
    /// # Errors
    /// The CA file cannot be read or parsed, or the TLS set-up fails.
    pub fn new(
        base: &str,
        token: Option<String>,
        ca_cert: Option<&Path>,
    ) -> Result<Client, ClientError> {
        crate::server::install_crypto_provider();
        let builder = || {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .pool_idle_timeout(Duration::from_secs(60))
        };
        let mut b = builder().read_timeout(READ_TIMEOUT);
        let mut w = builder();
        if let Some(ca) = ca_cert {
            let pem = std::fs::read(ca)
                .map_err(|e| ClientError::Config(format!("cannot read {}: {e}", ca.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                ClientError::Config(format!("bad CA certificate {}: {e}", ca.display()))
            })?;
            for c in certs {
                b = b.add_root_certificate(c.clone());
                w = w.add_root_certificate(c);
            }
        }
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            http: b.build()?,
            http_wait: w.build()?,
        })
    }

    /// The same client with another token.
    pub fn with_token(&self, token: impl Into<String>) -> Client {
        Client {
            base: self.base.clone(),
            token: Some(token.into()),
            http: self.http.clone(),
            http_wait: self.http_wait.clone(),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// A request with the default total timeout (callers moving many bytes replace it).
    fn req(&self, method: Method, path: &str) -> RequestBuilder {
        let r = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .timeout(SMALL_REQUEST_TIMEOUT);
        self.auth(r)
    }

    fn auth(&self, r: RequestBuilder) -> RequestBuilder {
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn check(resp: reqwest::Response) -> Result<reqwest::Response, ClientError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let body: Option<serde_json::Value> = serde_json::from_str(&text).ok();
        let message = body
            .as_ref()
            .and_then(|v| v.get("error"))
            .and_then(|e| e.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| text.chars().take(200).collect());
        Err(ClientError::Api {
            status,
            message,
            body,
        })
    }

    async fn json<T: DeserializeOwned>(r: RequestBuilder) -> Result<T, ClientError> {
        let resp = Self::check(r.send().await?).await?;
        resp.json()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))
    }

    async fn empty(r: RequestBuilder) -> Result<(), ClientError> {
        Self::check(r.send().await?).await.map(|_| ())
    }

    pub async fn health(&self) -> Result<(), ClientError> {
        Self::empty(self.req(Method::GET, "/healthz")).await
    }

    pub async fn add_user(&self, name: &str, password: &str) -> Result<UserInfo, ClientError> {
        Self::json(
            self.req(Method::POST, "/v1/admin/users")
                .json(&serde_json::json!({"name": name, "password": password})),
        )
        .await
    }

    pub async fn list_users(&self) -> Result<Vec<UserInfo>, ClientError> {
        Self::json(self.req(Method::GET, "/v1/admin/users")).await
    }

    pub async fn remove_user(&self, name: &str) -> Result<(), ClientError> {
        Self::empty(self.req(Method::DELETE, &format!("/v1/admin/users/{name}"))).await
    }

    pub async fn admin_list_devices(&self, user: &str) -> Result<Vec<DeviceInfo>, ClientError> {
        Self::json(self.req(Method::GET, &format!("/v1/admin/users/{user}/devices"))).await
    }

    pub async fn admin_revoke_device(&self, user: &str, device: &str) -> Result<(), ClientError> {
        Self::empty(self.req(
            Method::DELETE,
            &format!("/v1/admin/users/{user}/devices/{device}"),
        ))
        .await
    }

    pub async fn login(
        &self,
        user: &str,
        password: &str,
        device: &str,
    ) -> Result<LoginInfo, ClientError> {
        Self::json(
            self.req(Method::POST, "/v1/login")
                .json(&serde_json::json!({"user": user, "password": password, "device": device})),
        )
        .await
    }

    /// Sets a user's password (admin token); every device of the user is logged out.
    pub async fn set_password(&self, user: &str, password: &str) -> Result<(), ClientError> {
        Self::empty(
            self.req(Method::PUT, &format!("/v1/admin/users/{user}/password"))
                .json(&serde_json::json!({"password": password})),
        )
        .await
    }

    /// Changes the password of this device's user (device token); the user's other devices
    /// are logged out, this one keeps its token.
    pub async fn change_password(&self, old: &str, new: &str) -> Result<(), ClientError> {
        Self::empty(
            self.req(Method::POST, "/v1/password")
                .json(&serde_json::json!({"old_password": old, "new_password": new})),
        )
        .await
    }

    pub async fn me(&self) -> Result<serde_json::Value, ClientError> {
        Self::json(self.req(Method::GET, "/v1/me")).await
    }

    pub async fn list_devices(&self) -> Result<Vec<DeviceInfo>, ClientError> {
        Self::json(self.req(Method::GET, "/v1/devices")).await
    }

    pub async fn revoke_device(&self, device: &str) -> Result<(), ClientError> {
        Self::empty(self.req(Method::DELETE, &format!("/v1/devices/{device}"))).await
    }

    /// Appends an encoded change log under an idempotency key.
    pub async fn append(
        &self,
        idempotency_key: &str,
        encoded: Vec<u8>,
    ) -> Result<AppendResult, ClientError> {
        Self::json(
            self.req(Method::POST, "/v1/log")
                .timeout(sized_timeout(encoded.len() as u64))
                .header("idempotency-key", idempotency_key)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(encoded),
        )
        .await
    }

    /// The log entries after `after` (one page of at most `limit`).
    pub async fn read_log(&self, after: u64, limit: usize) -> Result<LogPage, ClientError> {
        self.read_log_as(after, limit, false).await
    }

    /// [`Client::read_log`]; with `light`, writes come without their delta bytes.
    pub async fn read_log_as(
        &self,
        after: u64,
        limit: usize,
        light: bool,
    ) -> Result<LogPage, ClientError> {
        let light = u8::from(light);
        let resp = Self::check(
            self.req(
                Method::GET,
                &format!("/v1/log?after={after}&limit={limit}&light={light}"),
            )
            // A page holds at most 64 MiB of stored bytes (the server's light page bound).
            .timeout(sized_timeout(64 << 20))
            .send()
            .await?,
        )
        .await?;
        let head = resp
            .headers()
            .get("deltadrive-head")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| ClientError::Decode("missing Deltadrive-Head header".into()))?;
        // Read into one buffer of the announced size: growing one by doubling would hold up
        // to three times a page of tens of MiB at once.
        let mut buf = bytes::BytesMut::with_capacity(
            resp.content_length()
                .unwrap_or(0)
                .min(crate::changelog::limits::MAX_BODY_LEN) as usize,
        );
        let mut resp = resp;
        while let Some(chunk) = resp.chunk().await? {
            buf.extend_from_slice(&chunk);
        }
        let bytes = buf.freeze();
        Ok(LogPage {
            head,
            entries: parse_log_frames(&bytes)?,
        })
    }

    /// Long poll: returns the head once it is past `after`, or at the timeout.
    pub async fn wait(&self, after: u64, timeout: Duration) -> Result<u64, ClientError> {
        #[derive(Deserialize)]
        struct Head {
            head: u64,
        }
        let ms = timeout.as_millis();
        let r = self.http_wait.get(format!(
            "{}/v1/log/wait?after={after}&timeout_ms={ms}",
            self.base
        ));
        let h: Head = Self::json(self.auth(r).timeout(timeout + Duration::from_secs(30))).await?;
        Ok(h.head)
    }

    pub async fn snapshot(&self) -> Result<serde_json::Value, ClientError> {
        Self::json(self.req(Method::GET, "/v1/snapshot")).await
    }

    /// An object's content (current, or `version`), optionally a byte range `[start, end]`.
    pub async fn content(
        &self,
        object_hex: &str,
        version: Option<u64>,
        range: Option<(u64, u64)>,
    ) -> Result<Vec<u8>, ClientError> {
        let mut path = format!("/v1/objects/{object_hex}/content");
        if let Some(v) = version {
            path.push_str(&format!("?version={v}"));
        }
        let mut r = self.req(Method::GET, &path);
        if let Some((a, b)) = range {
            r = r
                .header(reqwest::header::RANGE, format!("bytes={a}-{b}"))
                .timeout(sized_timeout(b.saturating_sub(a) + 1));
        } else {
            r = r.timeout(sized_timeout(crate::changelog::limits::MAX_DELTA_LEN));
        }
        let resp = Self::check(r.send().await?).await?;
        Ok(resp.bytes().await?.to_vec())
    }

    /// Streams the content of `object_hex` at `version`, which must be `len` bytes, to
    /// `sink` chunk by chunk as it arrives (never held whole). The length is checked against
    /// the answer's `Content-Length` before any byte is read and against what arrives.
    ///
    /// # Errors
    /// Transport errors (including the read and total timeouts), a non-2xx answer, a length
    /// other than `len` ([`ClientError::Decode`]), or the sink's error.
    pub async fn content_to(
        &self,
        object_hex: &str,
        version: u64,
        len: u64,
        mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<u64, ClientError> {
        let r = self
            .req(
                Method::GET,
                &format!("/v1/objects/{object_hex}/content?version={version}"),
            )
            .timeout(sized_timeout(len));
        let mut resp = Self::check(r.send().await?).await?;
        if let Some(declared) = resp.content_length() {
            if declared != len {
                return Err(ClientError::Decode(format!(
                    "the server sends {declared} bytes of content where the change says {len}"
                )));
            }
        }
        let mut got = 0u64;
        while let Some(chunk) = resp.chunk().await? {
            got += chunk.len() as u64;
            if got > len {
                return Err(ClientError::Decode(format!(
                    "the server sends more than the {len} bytes the change says"
                )));
            }
            sink(&chunk)?;
        }
        if got != len {
            return Err(ClientError::Decode(format!(
                "the content ended after {got} of {len} bytes"
            )));
        }
        Ok(got)
    }

    pub async fn history(&self, object_hex: &str) -> Result<serde_json::Value, ClientError> {
        Self::json(self.req(Method::GET, &format!("/v1/objects/{object_hex}/history"))).await
    }
}

/// Checks that the storage URL a server named keeps the device's token where it was given: the
/// same host and port as `server_url`, and HTTPS if the login was over HTTPS. A server behind a
/// TLS proxy without `--public-url` names `http://` storage: that is refused, never followed.
///
/// # Errors
/// `Config` naming both URLs and what differs.
pub fn check_storage_url(server_url: &str, storage_url: &str) -> Result<(), ClientError> {
    let parse = |what: &str, u: &str| {
        reqwest::Url::parse(u).map_err(|e| ClientError::Config(format!("bad {what} URL {u}: {e}")))
    };
    let (server, storage) = (parse("server", server_url)?, parse("storage", storage_url)?);
    let refuse = |why: &str| {
        Err(ClientError::Config(format!(
            "refusing storage URL {storage_url} for server {server_url}: {why}; the server \
             should be started with --public-url {}",
            server_url.trim_end_matches('/')
        )))
    };
    if !matches!(storage.scheme(), "http" | "https") {
        return refuse("not an http(s) URL");
    }
    if server.scheme() == "https" && storage.scheme() != "https" {
        return refuse("it would send the device token over plain HTTP");
    }
    if server.host_str().map(str::to_ascii_lowercase)
        != storage.host_str().map(str::to_ascii_lowercase)
        || server.port_or_known_default() != storage.port_or_known_default()
    {
        return refuse("it names another host");
    }
    Ok(())
}

/// A device's login, kept in `H/device.json` (mode 0600).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceConfig {
    pub server_url: String,
    pub user: String,
    pub device: String,
    pub device_id: String,
    pub token: String,
    pub storage_url: String,
    /// A private CA to trust (PEM), if the server's certificate needs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
}

impl DeviceConfig {
    /// Reads `H/device.json`.
    ///
    /// # Errors
    /// The device is not logged in (no file) or the file is not valid.
    pub fn load(home: &Home) -> anyhow::Result<DeviceConfig> {
        let path = home.device_file();
        let text = std::fs::read_to_string(&path).map_err(|e| {
            anyhow::anyhow!(
                "cannot read {} (run `deltadrive login` first): {e}",
                path.display()
            )
        })?;
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("invalid {}: {e}", path.display()))
    }

    /// Writes `H/device.json` atomically with mode 0600.
    ///
    /// # Errors
    /// The home folder cannot be created or written.
    pub fn save(&self, home: &Home) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        home.create()?;
        let path = home.device_file();
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
        f.write_all(&serde_json::to_vec_pretty(self)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        Ok(())
    }

    /// A client of this device's storage, with its token.
    ///
    /// # Errors
    /// The storage URL would send the token elsewhere than the server logged in to, or over
    /// plain HTTP after an HTTPS login ([`check_storage_url`]); the CA file cannot be read.
    pub fn client(&self) -> Result<Client, ClientError> {
        check_storage_url(&self.server_url, &self.storage_url)?;
        Client::new(
            &self.storage_url,
            Some(self.token.clone()),
            self.ca_cert.as_deref(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{check_storage_url, DeviceConfig};

    #[test]
    fn a_device_login_that_names_plain_http_storage_is_not_used() {
        let mut d = DeviceConfig {
            server_url: "https://drive.example".into(),
            user: "ann".into(),
            device: "laptop".into(),
            device_id: "00".into(),
            token: "t".into(),
            storage_url: "http://drive.example".into(),
            ca_cert: None,
        };
        let e = d
            .client()
            .err()
            .expect("a downgrade is refused")
            .to_string();
        assert!(e.contains("plain HTTP"), "{e}");
        d.storage_url = "https://drive.example".into();
        assert!(d.client().is_ok());
    }

    #[test]
    fn storage_urls_keep_the_scheme_and_host_of_the_login() {
        let ok = [
            ("https://a.example", "https://a.example"),
            ("https://a.example", "https://A.example:443/"),
            ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
            ("http://127.0.0.1:8080", "https://127.0.0.1:8080"),
        ];
        for (server, storage) in ok {
            check_storage_url(server, storage)
                .unwrap_or_else(|e| panic!("{server} {storage}: {e}"));
        }
        let refused = [
            ("https://a.example", "http://a.example", "plain HTTP"),
            (
                "https://a.example:8443",
                "http://a.example:8443",
                "plain HTTP",
            ),
            ("https://a.example", "https://b.example", "another host"),
            (
                "https://a.example",
                "https://a.example:8443",
                "another host",
            ),
            (
                "http://127.0.0.1:8080",
                "http://127.0.0.1:9090",
                "another host",
            ),
            (
                "https://a.example",
                "file:///etc/passwd",
                "not an http(s) URL",
            ),
        ];
        for (server, storage, why) in refused {
            let e = check_storage_url(server, storage)
                .expect_err(storage)
                .to_string();
            assert!(e.contains(why) && e.contains("--public-url"), "{e}");
        }
    }
}
