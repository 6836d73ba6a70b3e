//! Admin routes (Bearer admin token): create, list and remove users; list and revoke devices.
//! What always holds: removing a user removes their devices, tokens and data in one batch.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{check_name, json_error, now_ms};
use crate::server::auth::{new_password_hash, AdminAuth};
use crate::server::backend::{BackendError, DeviceRecord, UserRecord};
use crate::server::error::ApiError;
use crate::server::AppState;

#[derive(Deserialize)]
pub struct NewUser {
    pub name: String,
    pub password: String,
}

#[derive(Serialize)]
pub struct UserView {
    pub name: String,
    pub created_ms: i64,
}

#[derive(Serialize)]
pub struct DeviceView {
    pub name: String,
    pub id: String,
    pub revoked: bool,
    pub created_ms: i64,
    pub last_login_ms: i64,
}

impl From<DeviceRecord> for DeviceView {
    fn from(d: DeviceRecord) -> Self {
        DeviceView {
            revoked: d.token_hash.is_none(),
            name: d.name,
            id: d.id,
            created_ms: d.created_ms,
            last_login_ms: d.last_login_ms,
        }
    }
}

pub async fn add_user(
    _: AdminAuth,
    State(state): State<AppState>,
    body: Result<Json<NewUser>, JsonRejection>,
) -> Result<(StatusCode, Json<UserView>), ApiError> {
    let Json(u) = body.map_err(|e| json_error(e, state.config.access.max_json_bytes))?;
    check_name("user", &u.name)?;
    let hash = new_password_hash(&state, &u.password).await?;
    let rec = UserRecord {
        name: u.name.clone(),
        password_hash: hash,
        created_ms: now_ms(),
    };
    match state.backend.create_user(rec).await {
        Ok(()) => {}
        Err(BackendError::AlreadyExists) => {
            return Err(ApiError::Conflict(format!(
                "user {} already exists",
                u.name
            )))
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(user = %u.name, "user created");
    Ok((
        StatusCode::CREATED,
        Json(UserView {
            name: u.name,
            created_ms: now_ms(),
        }),
    ))
}

pub async fn list_users(
    _: AdminAuth,
    State(state): State<AppState>,
) -> Result<Json<Vec<UserView>>, ApiError> {
    let users = state.backend.list_users().await?;
    Ok(Json(
        users
            .into_iter()
            .map(|u| UserView {
                name: u.name,
                created_ms: u.created_ms,
            })
            .collect(),
    ))
}

pub async fn remove_user(
    _: AdminAuth,
    State(state): State<AppState>,
    Path(user): Path<String>,
) -> Result<StatusCode, ApiError> {
    check_name("user", &user)?;
    let _lock = state.backend.lock_user(user.clone()).await?;
    match state.backend.delete_user(user.clone()).await {
        Ok(()) => {}
        Err(BackendError::NotFound) => return Err(ApiError::NotFound(format!("no user {user}"))),
        Err(e) => return Err(e.into()),
    }
    state.storage.forget(&user);
    tracing::info!(%user, "user removed");
    Ok(StatusCode::NO_CONTENT)
}

pub async fn list_devices(
    _: AdminAuth,
    State(state): State<AppState>,
    Path(user): Path<String>,
) -> Result<Json<Vec<DeviceView>>, ApiError> {
    check_name("user", &user)?;
    if state.backend.get_user(user.clone()).await?.is_none() {
        return Err(ApiError::NotFound(format!("no user {user}")));
    }
    let ds = state.backend.list_devices(user).await?;
    Ok(Json(ds.into_iter().map(DeviceView::from).collect()))
}

#[derive(Deserialize)]
pub struct NewPassword {
    pub password: String,
}

/// `PUT /v1/admin/users/{user}/password`: sets a user's password and logs out every device.
pub async fn set_password(
    _: AdminAuth,
    State(state): State<AppState>,
    Path(user): Path<String>,
    body: Result<Json<NewPassword>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    check_name("user", &user)?;
    let Json(p) = body.map_err(|e| json_error(e, state.config.access.max_json_bytes))?;
    let hash = new_password_hash(&state, &p.password).await?;
    let _lock = state.backend.lock_user(user.clone()).await?;
    match state.backend.set_password(user.clone(), hash, None).await {
        Ok(()) => {}
        Err(BackendError::NotFound) => return Err(ApiError::NotFound(format!("no user {user}"))),
        Err(e) => return Err(e.into()),
    }
    tracing::info!(%user, "password set by the admin; every device logged out");
    Ok(StatusCode::NO_CONTENT)
}

/// Revokes a device's token at once (shared with the device route), under the user's lock so a
/// login cannot slip a token in between; the backend drops every token of the device.
pub async fn revoke(state: &AppState, user: &str, device: &str) -> Result<(), ApiError> {
    check_name("device", device)?;
    let _lock = state.backend.lock_user(user.to_string()).await?;
    let mut d = state
        .backend
        .get_device(user.to_string(), device.to_string())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no device {device} for user {user}")))?;
    let old = d.token_hash.take();
    match state.backend.put_device(d, old).await {
        Ok(()) => {}
        Err(BackendError::NotFound) => {
            return Err(ApiError::NotFound(format!(
                "no device {device} for user {user}"
            )))
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(%user, %device, "device revoked");
    Ok(())
}

pub async fn revoke_device(
    _: AdminAuth,
    State(state): State<AppState>,
    Path((user, device)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    check_name("user", &user)?;
    revoke(&state, &user, &device).await?;
    Ok(StatusCode::NO_CONTENT)
}
