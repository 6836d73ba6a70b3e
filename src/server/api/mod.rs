//! The HTTP API (documented route by route in `docs/http-api.md`): the router, shared request
//! checks (names, JSON and body rejections mapped to [`ApiError`]), health and metrics.
//!
//! What always holds: every handler authenticates through an extractor before touching data, and a
//! device reaches only the user its token belongs to (the user never comes from the URL).

pub mod admin;
pub mod device;
pub mod storage;

use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put, MethodRouter};
use axum::Router;

use super::error::ApiError;
use super::AppState;

/// Builds the router with every route, the body limits and the metrics middleware.
pub fn router(state: AppState) -> Router {
    let limit = state.config.max_request_bytes;
    let json = state.config.access.max_json_bytes;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route(
            "/v1/admin/users",
            json_route(post(admin::add_user), json).get(admin::list_users),
        )
        .route("/v1/admin/users/{user}", delete(admin::remove_user))
        .route(
            "/v1/admin/users/{user}/password",
            json_route(put(admin::set_password), json),
        )
        .route("/v1/admin/users/{user}/devices", get(admin::list_devices))
        .route(
            "/v1/admin/users/{user}/devices/{device}",
            delete(admin::revoke_device),
        )
        .route("/v1/login", json_route(post(device::login), json))
        .route(
            "/v1/password",
            json_route(post(device::change_password), json),
        )
        .route("/v1/me", get(device::me))
        .route("/v1/storage", get(device::storage_location))
        .route("/v1/devices", get(device::list_devices))
        .route("/v1/devices/{device}", delete(device::revoke_device))
        .route("/v1/log", post(storage::append).get(storage::read_log))
        .route("/v1/log/wait", get(storage::wait))
        .route("/v1/snapshot", get(storage::snapshot))
        .route("/v1/objects/{id}/content", get(storage::content))
        .route("/v1/objects/{id}/history", get(storage::history))
        .merge(super::web::router(&state))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            super::metrics::track,
        ))
        .with_state(state)
}

/// A route with a JSON body: bodies over `limit` are refused with 413, by their
/// `Content-Length` before anything else runs (authentication included), and while being read
/// when they come chunked.
fn json_route(route: MethodRouter<AppState>, limit: usize) -> MethodRouter<AppState> {
    route
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(limit, json_body_limit))
}

async fn json_body_limit(State(limit): State<usize>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return ApiError::TooLarge(limit).into_response();
    }
    next.run(req).await
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
}

/// Maps a body rejection (too large, unreadable) to an [`ApiError`].
pub fn body_error(e: BytesRejection, limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge(limit)
    } else {
        ApiError::BadRequest(format!("cannot read the request body: {}", e.body_text()))
    }
}

/// Maps a JSON rejection to an [`ApiError`].
pub fn json_error(e: JsonRejection, limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge(limit)
    } else {
        ApiError::BadRequest(format!("bad JSON body: {}", e.body_text()))
    }
}

/// Checks a user or device name: 1..=64 characters of `A-Z a-z 0-9 . _ -`, not starting with `.`.
pub fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "invalid {what} name {name:?}: use 1 to 64 of A-Z a-z 0-9 . _ - (not starting with .)"
        )))
    }
}

/// The base URL a device should use for this server's storage: `--public-url`, else the
/// host the request named (the `Host` header in HTTP/1, the URI's authority in HTTP/2, where
/// there is no `Host` header).
pub fn public_base(state: &AppState, headers: &HeaderMap, uri: &axum::http::Uri) -> String {
    if let Some(u) = &state.config.public_url {
        return u.trim_end_matches('/').to_string();
    }
    let scheme = if state.config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .unwrap_or("localhost");
    format!("{scheme}://{host}")
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
