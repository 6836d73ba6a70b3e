//! Device routes: log in (user + password → a device token), who am I, where my storage lives,
//! list and revoke my user's devices, change my password. What always holds: a login is counted
//! against its address and user before its password is checked; it writes the device record
//! under the user's lock, after checking the user is still the one whose password it checked;
//! a re-login under an existing device name issues a new token and revokes every older one of
//! the device in the same batch.

use std::net::SocketAddr;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::admin::{revoke, DeviceView};
use super::{check_name, json_error, now_ms, public_base};
use crate::server::auth::{check_password, hash_token, new_password_hash, new_token, DeviceAuth};
use crate::server::backend::{BackendError, DeviceRecord, UserRecord};
use crate::server::error::ApiError;
use crate::server::AppState;

#[derive(Deserialize)]
pub struct LoginRequest {
    pub user: String,
    pub password: String,
    pub device: String,
}

#[derive(Serialize, Deserialize)]
pub struct LoginResponse {
    pub token: String,
    pub device_id: String,
    pub storage_url: String,
}

pub async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Result<Json<LoginRequest>, JsonRejection>,
) -> Result<Json<LoginResponse>, ApiError> {
    let Json(req) = body.map_err(|e| json_error(e, state.config.access.max_json_bytes))?;
    check_name("user", &req.user)?;
    check_name("device", &req.device)?;
    let client = peer.ip();
    // Counted before anything costly: over the limit, no backend call and no hashing.
    let charge = state.logins.try_login(client, &req.user).inspect_err(|r| {
        tracing::info!(%client, user = %req.user, "login refused before the password check: {r}");
    })?;
    let user = state.backend.get_user(req.user.clone()).await?;
    let hash = user.as_ref().map(|u| u.password_hash.as_str());
    if !check_password(&state, &req.password, hash).await? {
        tracing::warn!(%client, user = %req.user, device = %req.device, "login failed: wrong user or password");
        return Err(ApiError::Unauthorized);
    }
    state.logins.succeeded(charge);
    let checked = user.ok_or(ApiError::Unauthorized)?;
    // Under the user's lock: a revoke, a password change or a removal of the user is either
    // wholly before this login (and seen here) or wholly after it.
    let _lock = state.backend.lock_user(req.user.clone()).await?;
    if !same_user(&state, &checked).await? {
        tracing::warn!(%client, user = %req.user, "login refused: the user was removed or its password changed meanwhile");
        return Err(ApiError::Unauthorized);
    }
    let token = new_token();
    let existing = state
        .backend
        .get_device(req.user.clone(), req.device.clone())
        .await?;
    let now = now_ms();
    let (rec, old) = match existing {
        Some(mut d) => {
            let old = d.token_hash.replace(hash_token(&token));
            d.last_login_ms = now;
            (d, old)
        }
        None => (
            DeviceRecord {
                user: req.user.clone(),
                name: req.device.clone(),
                id: hex::encode(rand::random::<[u8; 16]>()),
                token_hash: Some(hash_token(&token)),
                created_ms: now,
                last_login_ms: now,
            },
            None,
        ),
    };
    let device_id = rec.id.clone();
    match state.backend.put_device(rec, old).await {
        Ok(()) => {}
        Err(BackendError::NotFound) => return Err(ApiError::Unauthorized),
        Err(e) => return Err(e.into()),
    }
    tracing::info!(%client, user = %req.user, device = %req.device, "device logged in");
    Ok(Json(LoginResponse {
        token,
        device_id,
        storage_url: public_base(&state, &headers, &uri),
    }))
}

/// Whether the user still exists as `checked` was read: same creation time, same password.
pub async fn same_user(state: &AppState, checked: &UserRecord) -> Result<bool, ApiError> {
    Ok(state
        .backend
        .get_user(checked.name.clone())
        .await?
        .is_some_and(|u| {
            u.created_ms == checked.created_ms && u.password_hash == checked.password_hash
        }))
}

#[derive(Deserialize)]
pub struct PasswordChange {
    pub old_password: String,
    pub new_password: String,
}

/// `POST /v1/password`: a device changes its user's password, giving the old one; every other
/// device of the user is logged out, this one keeps its token.
pub async fn change_password(
    auth: DeviceAuth,
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<Json<PasswordChange>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Json(req) = body.map_err(|e| json_error(e, state.config.access.max_json_bytes))?;
    let client = peer.ip();
    // The old password is a guess like a login's: the same limits.
    let charge = state.logins.try_login(client, &auth.user)?;
    let user = state
        .backend
        .get_user(auth.user.clone())
        .await?
        .ok_or(ApiError::Unauthorized)?;
    if !check_password(&state, &req.old_password, Some(&user.password_hash)).await? {
        tracing::warn!(%client, user = %auth.user, device = %auth.device, "password change refused: wrong old password");
        return Err(ApiError::Unauthorized);
    }
    state.logins.succeeded(charge);
    let hash = new_password_hash(&state, &req.new_password).await?;
    let _lock = state.backend.lock_user(auth.user.clone()).await?;
    if !same_user(&state, &user).await? {
        return Err(ApiError::Conflict(
            "the password was changed meanwhile; try again".into(),
        ));
    }
    state
        .backend
        .set_password(auth.user.clone(), hash, Some(auth.device.clone()))
        .await?;
    tracing::info!(%client, user = %auth.user, device = %auth.device, "password changed; other devices logged out");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, Deserialize)]
pub struct Me {
    pub user: String,
    pub device: String,
    pub device_id: String,
}

pub async fn me(auth: DeviceAuth) -> Json<Me> {
    Json(Me {
        user: auth.user,
        device: auth.device,
        device_id: auth.device_id,
    })
}

#[derive(Serialize, Deserialize)]
pub struct StorageLocation {
    pub storage_url: String,
}

pub async fn storage_location(
    _auth: DeviceAuth,
    State(state): State<AppState>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Json<StorageLocation> {
    Json(StorageLocation {
        storage_url: public_base(&state, &headers, &uri),
    })
}

pub async fn list_devices(
    auth: DeviceAuth,
    State(state): State<AppState>,
) -> Result<Json<Vec<DeviceView>>, ApiError> {
    let ds = state.backend.list_devices(auth.user).await?;
    Ok(Json(ds.into_iter().map(DeviceView::from).collect()))
}

pub async fn revoke_device(
    auth: DeviceAuth,
    State(state): State<AppState>,
    Path(device): Path<String>,
) -> Result<StatusCode, ApiError> {
    revoke(&state, &auth.user, &device).await?;
    Ok(StatusCode::NO_CONTENT)
}
