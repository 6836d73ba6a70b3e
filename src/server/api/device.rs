//! Device routes: log in (user + password → a device token), who am I, where my storage lives,
//! list and revoke my user's devices. What always holds: a re-login under an existing device
//! name issues a new token and revokes the old one in the same batch.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::admin::{revoke, DeviceView};
use super::{check_name, json_error, now_ms, public_base};
use crate::server::auth::{hash_token, new_token, verify_password, DeviceAuth};
use crate::server::backend::DeviceRecord;
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
    headers: HeaderMap,
    body: Result<Json<LoginRequest>, JsonRejection>,
) -> Result<Json<LoginResponse>, ApiError> {
    let Json(req) = body.map_err(|e| json_error(e, state.config.max_request_bytes))?;
    check_name("user", &req.user)?;
    check_name("device", &req.device)?;
    let denied = || ApiError::Unauthorized;
    let user = state.backend.get_user(req.user.clone()).await?;
    let hash = user
        .as_ref()
        .map(|u| u.password_hash.clone())
        // Verify against a fixed hash when the user is unknown, so timing tells nothing.
        .unwrap_or_else(|| "$argon2id$v=19$m=19456,t=2,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into());
    let pw = req.password.clone();
    let ok = tokio::task::spawn_blocking(move || verify_password(&pw, &hash))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    if user.is_none() || !ok {
        tracing::info!(user = %req.user, "login refused");
        return Err(denied());
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
    state.backend.put_device(rec, old).await?;
    tracing::info!(user = %req.user, device = %req.device, "device logged in");
    Ok(Json(LoginResponse {
        token,
        device_id,
        storage_url: public_base(&state, &headers),
    }))
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
    headers: HeaderMap,
) -> Json<StorageLocation> {
    Json(StorageLocation {
        storage_url: public_base(&state, &headers),
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
