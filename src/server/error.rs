//! The one error type of the HTTP API: [`ApiError`] turns every failure into a status code and a
//! JSON body `{"error": "clear message"}` (plus `stale` for stale-base conflicts). Internal
//! failures are logged once here and shown to the client only as "internal error".

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::backend::BackendError;

/// One op whose base version is not the server's current version of its object.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct StaleOp {
    /// The object id, hex.
    pub object: String,
    /// The base version the op was made against.
    pub expected: u64,
    /// The server's current version (0: the object does not exist).
    pub current: u64,
}

/// Every way a request can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("missing or invalid token")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("stale base version")]
    Stale(Vec<StaleOp>),
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    RangeNotSatisfiable(String),
    /// Over a per-request limit of work or memory (413): smaller requests would pass.
    #[error("{0}")]
    OverLimit(String),
    /// The server's shared budget stayed full (503 with `Retry-After`): try again later.
    #[error("{0}")]
    Busy(String),
    /// Over a rate or concurrency limit: 429 with `Retry-After`.
    #[error("{message}")]
    TooManyRequests {
        message: String,
        retry_after_secs: u64,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) | ApiError::Stale(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) | ApiError::OverLimit(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::RangeNotSatisfiable(_) => StatusCode::RANGE_NOT_SATISFIABLE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

#[derive(Serialize)]
struct Body {
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    stale: Option<Vec<StaleOp>>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let retry_after = match &self {
            ApiError::TooManyRequests {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            ApiError::Busy(_) => Some(super::limits::RETRY_AFTER_SECS),
            _ => None,
        };
        let (error, stale) = match self {
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "request failed");
                ("internal error".to_string(), None)
            }
            ApiError::Stale(ops) => {
                tracing::info!(stale = ops.len(), "append refused: stale base version");
                ("stale base version".to_string(), Some(ops))
            }
            other => {
                tracing::info!(status = status.as_u16(), error = %other, "request refused");
                (other.to_string(), None)
            }
        };
        let mut resp = (status, Json(Body { error, stale })).into_response();
        if let Some(secs) = retry_after {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
        resp
    }
}
