//! Credentials: random 256-bit tokens (shown once, kept only as BLAKE3 hashes), argon2 password
//! hashes, and the axum extractors that authenticate a request. Every request looks its token
//! up in the backend: nothing is cached, so a revoked token is refused at once.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::error::ApiError;
use super::AppState;

/// A fresh random token: 64 hex characters (256 bits).
pub fn new_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// The stored form of a token: BLAKE3, hex.
pub fn hash_token(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

/// An argon2id PHC string of `password`.
///
/// # Errors
/// Only if argon2 refuses its inputs (never for ordinary passwords).
pub fn hash_password(password: &str) -> Result<String, ApiError> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt =
        SaltString::encode_b64(&salt_bytes).map_err(|e| ApiError::Internal(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// Whether `password` matches the PHC string `hash`.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

fn bearer(parts: &Parts) -> Option<&str> {
    let v = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let t = v.strip_prefix("Bearer ")?.trim();
    (!t.is_empty()).then_some(t)
}

/// The caller holds the admin token.
pub struct AdminAuth;

/// The caller is a device of `user`.
#[derive(Clone, Debug)]
pub struct DeviceAuth {
    pub user: String,
    pub device: String,
    pub device_id: String,
}

impl FromRequestParts<AppState> for AdminAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or(ApiError::Unauthorized)?;
        let hash = hash_token(token);
        if state.backend.admin_token_hash().await?.as_deref() == Some(hash.as_str()) {
            return Ok(AdminAuth);
        }
        if state.backend.lookup_token(hash).await?.is_some() {
            return Err(ApiError::Forbidden(
                "this route needs the admin token".into(),
            ));
        }
        Err(ApiError::Unauthorized)
    }
}

impl FromRequestParts<AppState> for DeviceAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or(ApiError::Unauthorized)?;
        let hash = hash_token(token);
        match state.backend.lookup_token(hash.clone()).await? {
            Some(t) => Ok(DeviceAuth {
                user: t.user,
                device: t.device,
                device_id: t.device_id,
            }),
            None => {
                if state.backend.admin_token_hash().await?.as_deref() == Some(hash.as_str()) {
                    Err(ApiError::Forbidden(
                        "this route needs a device token".into(),
                    ))
                } else {
                    Err(ApiError::Unauthorized)
                }
            }
        }
    }
}
