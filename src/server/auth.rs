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

/// The hash a password is checked against when the user does not exist, so the answer takes as
/// long as for a wrong password.
const NO_USER_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

/// The longest password accepted (longer ones are refused without hashing).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// Checks `password` against `hash` (or against a fixed hash when there is no user) on the
/// password threads.
///
/// # Errors
/// `TooManyRequests` when the password threads' queue is full.
pub async fn check_password(
    state: &AppState,
    password: &str,
    hash: Option<&str>,
) -> Result<bool, ApiError> {
    if password.len() > MAX_PASSWORD_BYTES {
        return Ok(false);
    }
    let (pw, known) = (password.to_string(), hash.is_some());
    let hash = hash.unwrap_or(NO_USER_HASH).to_string();
    let ok = state
        .passwords
        .run(move || verify_password(&pw, &hash))
        .await?;
    Ok(ok && known)
}

/// Hashes a new password on the password threads, after checking its length (8 to 1024 bytes).
///
/// # Errors
/// `BadRequest` for a password too short or too long; `TooManyRequests` when the password
/// threads' queue is full.
pub async fn new_password_hash(state: &AppState, password: &str) -> Result<String, ApiError> {
    if password.len() < 8 || password.len() > MAX_PASSWORD_BYTES {
        return Err(ApiError::BadRequest(
            "the password must be 8 to 1024 bytes".into(),
        ));
    }
    let pw = password.to_string();
    state.passwords.run(move || hash_password(&pw)).await?
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
            Some(t) => {
                state.seen.touch(&t.user, &t.device, super::api::now_ms());
                Ok(DeviceAuth {
                    user: t.user,
                    device: t.device,
                    device_id: t.device_id,
                })
            }
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
