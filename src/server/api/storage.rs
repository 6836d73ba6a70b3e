//! Storage routes (Bearer device token; the user always comes from the token): append a change
//! log, read the log (binary framing), long-poll for new entries, the current tree, object
//! content (with `Range`) and history.
//!
//! Log framing of `GET /v1/log`: for each entry, `u64` big-endian sequence number, `u32`
//! big-endian length, then that many bytes of one encoded transaction. The head sequence is in
//! the `Deltadrive-Head` header.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};

use super::body_error;
use crate::changelog::ObjectId;
use crate::rules::{ContentOp, RuleError};
use crate::server::auth::DeviceAuth;
use crate::server::backend::{ChunkId, StoredKind};
use crate::server::content::{read_range, stream_range, CHUNK_SIZE};
use crate::server::error::{ApiError, StaleOp};
use crate::server::storage::AppendError;
use crate::server::AppState;

/// The header carrying the user's head sequence.
pub const HEAD_HEADER: &str = "deltadrive-head";
/// Most entries one `GET /v1/log` returns.
pub const MAX_LIMIT: usize = 10_000;
/// Most payload bytes one `GET /v1/log` returns (beyond its first entry).
pub const MAX_PAGE_BYTES: usize = 16 << 20;
/// Stored bytes read for one light page (what is sent is much smaller).
pub const MAX_LIGHT_PAGE_BYTES: usize = 64 << 20;

/// `POST /v1/log`. The body's memory is reserved from the appends' memory budget before the
/// body is read (its `Content-Length`, or the largest body accepted when it has none).
pub async fn append(
    auth: DeviceAuth,
    State(state): State<AppState>,
    headers: HeaderMap,
    request: Request,
) -> Result<Json<AppendView>, ApiError> {
    let key = headers
        .get("idempotency-key")
        .ok_or_else(|| ApiError::BadRequest("the Idempotency-Key header is required".into()))?
        .to_str()
        .map_err(|_| ApiError::BadRequest("the Idempotency-Key header is not ASCII".into()))?
        .to_string();
    if key.is_empty() || key.len() > 128 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::BadRequest(
            "the Idempotency-Key must be 1 to 128 printable ASCII characters".into(),
        ));
    }
    let limit = state.config.max_request_bytes;
    let length = match headers.get(header::CONTENT_LENGTH) {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| {
                ApiError::BadRequest("the Content-Length header is not a number".into())
            })?,
        None => limit as u64,
    };
    if length > limit as u64 {
        return Err(ApiError::TooLarge(limit));
    }
    let mut memory = state.storage.memory_budget().reservation();
    memory.grow(length, "its body").await?;
    let body = Bytes::from_request(request, &state)
        .await
        .map_err(|e: BytesRejection| body_error(e, limit))?;
    let rec = state
        .storage
        .append_reserved(&auth.user, &auth.device, &key, body, memory)
        .await?;
    state
        .metrics
        .appended((rec.last_seq + 1).saturating_sub(rec.first_seq) as usize);
    tracing::debug!(user = %auth.user, device = %auth.device, first = rec.first_seq, last = rec.last_seq, "appended");
    Ok(Json(AppendView {
        first_seq: rec.first_seq,
        last_seq: rec.last_seq,
    }))
}

/// The answer to an append.
#[derive(Serialize, Deserialize)]
pub struct AppendView {
    pub first_seq: u64,
    pub last_seq: u64,
}

#[derive(Deserialize)]
pub struct LogQuery {
    #[serde(default)]
    pub after: u64,
    pub limit: Option<usize>,
    /// `light=1`: every write without its delta bytes (hashes and sizes kept), for devices
    /// that fetch content by range when it is read (files on demand).
    #[serde(default)]
    pub light: u8,
}

fn head_header(head: u64) -> (header::HeaderName, HeaderValue) {
    (
        header::HeaderName::from_static(HEAD_HEADER),
        HeaderValue::from(head),
    )
}

pub async fn read_log(
    auth: DeviceAuth,
    State(state): State<AppState>,
    q: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = q.limit.unwrap_or(1000).clamp(1, MAX_LIMIT);
    let head = state.backend.head(auth.user.clone()).await?;
    let light = q.light != 0;
    let page_bytes = if light {
        MAX_LIGHT_PAGE_BYTES
    } else {
        MAX_PAGE_BYTES
    };
    let mut entries = state
        .backend
        .read_log(auth.user, q.after, limit, page_bytes)
        .await?;
    if light {
        for (seq, bytes) in &mut entries {
            let tx = crate::changelog::decode_transaction(bytes).map_err(|e| {
                ApiError::Internal(format!("log entry {seq} cannot be decoded: {e}"))
            })?;
            *bytes = crate::changelog::encode_transaction(&crate::changelog::payload::light(&tx));
        }
    }
    let mut out = Vec::with_capacity(entries.iter().map(|(_, b)| b.len() + 12).sum());
    for (seq, bytes) in entries {
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(&bytes);
    }
    let [h] = [head_header(head)];
    Ok((
        [
            h,
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
        ],
        out,
    )
        .into_response())
}

#[derive(Deserialize)]
pub struct WaitQuery {
    #[serde(default)]
    pub after: u64,
    pub timeout_ms: Option<u64>,
}

#[derive(Serialize, Deserialize)]
pub struct HeadView {
    pub head: u64,
}

pub async fn wait(
    auth: DeviceAuth,
    State(state): State<AppState>,
    q: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<HeadView>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let timeout = Duration::from_millis(q.timeout_ms.unwrap_or(30_000)).min(state.config.max_wait);
    let _gauge = state.metrics.long_poll();
    // Subscribe before reading the head so no append between the two is missed.
    let mut rx = state.storage.subscribe(&auth.user);
    let head = state.backend.head(auth.user.clone()).await?;
    if head > q.after {
        return Ok(Json(HeadView { head }));
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {
                let head = state.backend.head(auth.user.clone()).await?;
                if head > q.after {
                    return Ok(Json(HeadView { head }));
                }
            }
            // Channel dropped (user removed) or timed out: answer with the current head.
            Ok(Err(_)) | Err(_) => {
                let head = state.backend.head(auth.user.clone()).await?;
                return Ok(Json(HeadView { head }));
            }
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ObjectView {
    pub id: String,
    pub parent: String,
    /// The name as UTF-8 (lossy); `name_hex` is exact.
    pub name: String,
    pub name_hex: String,
    /// `file`, `directory` or `symlink`.
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub target_hex: Option<String>,
    pub version: u64,
    pub mode: u32,
    pub mtime_ns: i64,
    pub size: u64,
    pub hash: String,
    pub seq: u64,
    /// Extended attributes: name hex → value hex.
    pub xattrs: std::collections::BTreeMap<String, String>,
    /// The object's other names (hard links): `[parent hex, name hex]` each.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub links: Vec<[String; 2]>,
}

#[derive(Serialize, Deserialize)]
pub struct SnapshotView {
    pub head: u64,
    pub objects: Vec<ObjectView>,
}

pub async fn snapshot(
    auth: DeviceAuth,
    State(state): State<AppState>,
) -> Result<Json<SnapshotView>, ApiError> {
    let (head, objects) = state.backend.snapshot(auth.user).await?;
    let objects = objects
        .into_iter()
        .map(|o| {
            let (kind, target_hex) = match &o.kind {
                StoredKind::File => ("file", None),
                StoredKind::Directory => ("directory", None),
                StoredKind::Symlink { target } => ("symlink", Some(hex::encode(target))),
            };
            ObjectView {
                id: hex::encode(o.id),
                parent: hex::encode(o.parent),
                name: String::from_utf8_lossy(&o.name).into_owned(),
                name_hex: hex::encode(&o.name),
                kind: kind.to_string(),
                target_hex,
                version: o.version,
                mode: o.mode,
                mtime_ns: o.mtime_ns,
                size: o.size,
                hash: hex::encode(o.hash),
                seq: o.seq,
                xattrs: o
                    .xattrs
                    .iter()
                    .map(|(k, v)| (hex::encode(k), hex::encode(v)))
                    .collect(),
                links: o
                    .links
                    .iter()
                    .map(|(p, n)| [hex::encode(p), hex::encode(n)])
                    .collect(),
            }
        })
        .collect();
    Ok(Json(SnapshotView { head, objects }))
}

#[derive(Deserialize)]
pub struct ContentQuery {
    pub version: Option<u64>,
}

fn parse_id(s: &str) -> Result<ObjectId, ApiError> {
    ObjectId::from_hex(s).ok_or_else(|| {
        ApiError::BadRequest(format!("invalid object id {s:?}: expected 32 hex digits"))
    })
}

/// Parses a single `bytes=a-b`, `bytes=a-` or `bytes=-n` range against `size`: [start, end).
fn parse_range(v: &str, size: u64) -> Result<(u64, u64), ApiError> {
    let bad = || {
        ApiError::RangeNotSatisfiable(format!(
            "unsupported or unsatisfiable range {v:?} (size {size})"
        ))
    };
    let spec = v.trim().strip_prefix("bytes=").ok_or_else(bad)?;
    if spec.contains(',') {
        return Err(bad());
    }
    let (a, b) = spec.split_once('-').ok_or_else(bad)?;
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| bad())?;
        (size.saturating_sub(n), size)
    } else {
        let s: u64 = a.parse().map_err(|_| bad())?;
        let e = if b.is_empty() {
            size
        } else {
            b.parse::<u64>()
                .map_err(|_| bad())?
                .saturating_add(1)
                .min(size)
        };
        (s, e)
    };
    if start >= end {
        return Err(bad());
    }
    Ok((start, end))
}

pub async fn content(
    auth: DeviceAuth,
    State(state): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<ContentQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let id = parse_id(&id)?;
    serve_content(&state, auth.user, id, q.version, &headers).await
}

/// The content of `user`'s object `id` (its current version, or a kept `version`), the part
/// named by the request's `Range` header if any, streamed when it spans several chunks. Used by
/// the API and by the web side's downloads.
///
/// # Errors
/// 404 for an unknown object or a version not kept, 400 for a folder, 416 for a bad range.
pub async fn serve_content(
    state: &AppState,
    user: String,
    id: ObjectId,
    version: Option<u64>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let current = state.backend.get_object(user.clone(), id.0).await?;
    let (size, hash, chunks): (u64, [u8; 32], Vec<ChunkId>) = match &current {
        Some(o) if version.is_none_or(|v| v == o.version) => {
            if o.kind != StoredKind::File {
                return Err(ApiError::BadRequest(format!("object {id} is not a file")));
            }
            (o.size, o.hash, o.chunks.clone())
        }
        _ => {
            let Some(v) = version else {
                return Err(ApiError::NotFound(format!("no object {id}")));
            };
            let h = state.backend.history(user.clone(), id.0).await?;
            let e = h.into_iter().find(|e| e.version == v).ok_or_else(|| {
                ApiError::NotFound(format!("version {v} of object {id} is not kept"))
            })?;
            (e.size, e.hash, e.chunks)
        }
    };
    let range = match headers.get(header::RANGE) {
        Some(r) => Some(parse_range(
            r.to_str()
                .map_err(|_| ApiError::BadRequest("bad Range header".into()))?,
            size,
        )?),
        None => None,
    };
    let (start, end) = range.unwrap_or((0, size));
    // Only the chunks holding the range are read; a range over several chunks is streamed, so
    // a whole big file is never held in memory.
    let chunk = CHUNK_SIZE as u64;
    let body = if end <= start || start / chunk == (end - 1) / chunk {
        Body::from(read_range(state.backend.as_ref(), &chunks, size, start, end).await?)
    } else {
        let id_hex = id.to_hex();
        let s = stream_range(state.backend.clone(), chunks, size, start, end)
            .await?
            .inspect_err(move |e| {
                tracing::error!(object = %id_hex, error = %e, "content read failed mid-stream");
            });
        Body::from_stream(s)
    };
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", hex::encode(hash))) {
        h.insert(header::ETAG, v);
    }
    if range.is_some() {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {}-{}/{}", start, end - 1, size)) {
            h.insert(header::CONTENT_RANGE, v);
        }
        return Ok((StatusCode::PARTIAL_CONTENT, h, body).into_response());
    }
    Ok((StatusCode::OK, h, body).into_response())
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct VersionView {
    pub version: u64,
    pub size: u64,
    pub hash: String,
    pub time_ms: i64,
    pub device: String,
    pub seq: u64,
}

pub async fn history(
    auth: DeviceAuth,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Vec<VersionView>>, ApiError> {
    let id = parse_id(&id)?;
    let h = state.backend.history(auth.user, id.0).await?;
    if h.is_empty() {
        return Err(ApiError::NotFound(format!("no history for object {id}")));
    }
    Ok(Json(
        h.into_iter()
            .map(|e| VersionView {
                version: e.version,
                size: e.size,
                hash: hex::encode(e.hash),
                time_ms: e.time_ms,
                device: e.device,
                seq: e.seq,
            })
            .collect(),
    ))
}

/// How the API answers a refused append: stale bases are a 409 whose body lists them (the
/// device pulls, rebases and retries); an op that breaks a tree rule is a 409 saying which
/// transaction, which object and why (422 for ops change-log validation already refuses on
/// the root folder; 500 for a broken stored tree).
impl From<AppendError> for ApiError {
    fn from(e: AppendError) -> ApiError {
        match e {
            AppendError::Api(e) => e,
            AppendError::Stale(refusals) => ApiError::Stale(
                refusals
                    .iter()
                    .filter_map(|r| match r {
                        RuleError::StaleBase {
                            object,
                            base,
                            current,
                        } => Some(StaleOp {
                            object: object.to_hex(),
                            expected: *base,
                            current: *current,
                        }),
                        _ => None,
                    })
                    .collect(),
            ),
            AppendError::Refused {
                transaction,
                object,
                rule,
            } => {
                let at = |m: String| format!("transaction {transaction}, object {object}: {m}");
                match rule {
                    RuleError::Root { action } => {
                        ApiError::Unprocessable(at(format!("the root folder cannot {action}")))
                    }
                    RuleError::TooDeep(_) => ApiError::Internal("folder chain too deep".into()),
                    rule => ApiError::Conflict(at(conflict_message(&rule))),
                }
            }
        }
    }
}

/// The words of a 409 for a broken tree rule.
fn conflict_message(rule: &RuleError) -> String {
    match rule {
        RuleError::StaleBase { .. } => "stale base version".into(),
        RuleError::Missing(_) => "object does not exist".into(),
        RuleError::Exists(_) => "object already exists".into(),
        RuleError::BadParent {
            parent,
            found: None,
        } => format!("parent folder {parent} does not exist"),
        RuleError::BadParent {
            parent,
            found: Some(kind),
        } => format!("parent {parent} is a {kind}, not a folder"),
        RuleError::NameTaken { name, .. } => format!("name {name} is already taken in its folder"),
        RuleError::Cycle(_) => "the move would put a folder inside itself".into(),
        RuleError::BrokenPath { .. } => "a folder on the path does not exist".into(),
        RuleError::TooDeep(_) => "folder chain too deep".into(),
        RuleError::NotEmpty(_) => "delete of a folder that is not empty".into(),
        RuleError::NotAFile {
            kind,
            op: ContentOp::Write,
            ..
        } => format!("write to a {kind}"),
        RuleError::NotAFile {
            kind,
            op: ContentOp::Truncate,
            ..
        } => format!("truncate of a {kind}"),
        RuleError::BaseHash(_) => "the delta's base hash does not match the current content".into(),
        RuleError::Root { action } => format!("the root folder cannot {action}"),
        RuleError::FolderLink(_) => "a folder has exactly one name".into(),
        RuleError::NoSuchName { name, .. } => format!("the object has no name {name} there"),
        RuleError::LastName(_) => "an object's last name goes with a delete, not an unlink".into(),
        RuleError::SeveralNames(_) => {
            "the object has several names: one of them moves by link and unlink".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges_are_parsed_against_the_size() {
        assert_eq!(parse_range("bytes=0-9", 100).unwrap(), (0, 10));
        assert_eq!(parse_range("bytes=90-", 100).unwrap(), (90, 100));
        assert_eq!(parse_range("bytes=-5", 100).unwrap(), (95, 100));
        assert_eq!(parse_range("bytes=50-1000", 100).unwrap(), (50, 100));
        for bad in [
            "bytes=100-",
            "bytes=5-1",
            "items=0-1",
            "bytes=0-1,3-4",
            "bytes=x-1",
            "bytes=-0",
        ] {
            assert!(parse_range(bad, 100).is_err(), "{bad}");
        }
    }
}
