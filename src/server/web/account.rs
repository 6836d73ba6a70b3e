//! Signing in and out, the user's devices (list, revoke) and the password change on the web.
//!
//! What always holds: a sign-in is charged to the API's login limits (per address and per user)
//! before its password is checked on the password threads, exactly as `POST /v1/login`; a
//! password change does the same with the old password, then revokes every device token and
//! every other web session of the user.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Form;
use maud::html;
use serde::Deserialize;

use super::pages::{self, Nav};
use super::seen::ONLINE_WITHIN;
use super::{cookie_token, html, see_other, see_other_with, session_cookie, WebResult, WebUser};
use crate::server::api::admin::revoke;
use crate::server::api::device::same_user;
use crate::server::api::{check_name, now_ms};
use crate::server::auth::{check_password, new_password_hash};
use crate::server::error::ApiError;
use crate::server::AppState;

#[derive(Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    user: String,
    #[serde(default)]
    password: String,
}

#[derive(Deserialize, Default)]
pub struct NoticeQuery {
    notice: Option<String>,
}

#[derive(Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

#[derive(Deserialize)]
pub struct PasswordForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    old_password: String,
    #[serde(default)]
    new_password: String,
    #[serde(default)]
    repeat: String,
}

/// `GET /web/login`.
pub async fn login_page(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    if cookie_token(&headers).is_some_and(|t| state.web.get(t).is_some()) {
        return see_other("/web/files");
    }
    html(StatusCode::OK, pages::login(None, ""))
}

/// `POST /web/login`: the user's password, checked as the API's login does.
pub async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Form(f): Form<LoginForm>,
) -> WebResult {
    let refused = |status: StatusCode, msg: &str| {
        Ok::<_, super::WebError>(html(status, pages::login(Some(msg), &f.user)))
    };
    if check_name("user", &f.user).is_err() {
        return refused(StatusCode::UNAUTHORIZED, "Wrong user or password.");
    }
    let client = peer.ip();
    // Counted before anything costly, against the same limits as `POST /v1/login`.
    let charge = match state.logins.try_login(client, &f.user) {
        Ok(c) => c,
        Err(r) => {
            tracing::info!(%client, user = %f.user, "web sign-in refused before the password check: {r}");
            let e: ApiError = r.into();
            let mut resp = super::WebError(e).into_response();
            *resp.body_mut() = pages::login(
                Some("Too many sign-in attempts: wait a minute and try again."),
                &f.user,
            )
            .into_string()
            .into();
            return Ok(resp);
        }
    };
    let user = state.backend.get_user(f.user.clone()).await?;
    let hash = user.as_ref().map(|u| u.password_hash.as_str());
    if !check_password(&state, &f.password, hash).await? {
        tracing::warn!(%client, user = %f.user, "web sign-in failed: wrong user or password");
        return refused(StatusCode::UNAUTHORIZED, "Wrong user or password.");
    }
    state.logins.succeeded(charge);
    let user = user.ok_or(ApiError::Unauthorized)?;
    let token = state.web.start(&user.name, &user.password_hash)?;
    tracing::info!(%client, user = %user.name, "web sign-in");
    let mut resp = see_other("/web/files");
    resp.headers_mut()
        .insert(header::SET_COOKIE, session_cookie(&state, Some(&token)));
    Ok(resp)
}

/// `POST /web/logout`.
pub async fn logout(
    u: WebUser,
    State(state): State<AppState>,
    Form(f): Form<CsrfForm>,
) -> WebResult {
    u.check_csrf(&f.csrf)?;
    state.web.end(&u.key);
    tracing::info!(user = %u.user, "web sign-out");
    let mut resp = see_other("/web/login");
    resp.headers_mut()
        .insert(header::SET_COOKIE, session_cookie(&state, None));
    Ok(resp)
}

/// `GET /web/devices`: the user's devices, when each was last seen and whether it is online.
pub async fn devices(
    u: WebUser,
    State(state): State<AppState>,
    q: Query<NoticeQuery>,
) -> WebResult {
    let mut ds = state.backend.list_devices(u.user.clone()).await?;
    ds.sort_by(|a, b| a.name.cmp(&b.name));
    let now = now_ms();
    let csrf = &u.session.csrf;
    let body = html! {
        h1 { "Devices" }
        p.muted { "Devices logged in to your folder. Revoking one signs it out: it must log in again with your password." }
        @if ds.is_empty() {
            p.muted { "No device has logged in yet." }
        } @else {
            table.listing {
                caption.sr { "Your devices" }
                thead { tr {
                    th scope="col" { "Device" } th scope="col" { "Last seen" } th scope="col" { "Status" }
                    th scope="col" { span.sr { "Actions" } }
                } }
                tbody {
                    @for d in &ds {
                        @let seen = state.seen.last(&u.user, &d.name);
                        @let revoked = d.token_hash.is_none();
                        @let online = !revoked && seen.is_some_and(|t| now - t < ONLINE_WITHIN.as_millis() as i64);
                        tr {
                            td { (d.name) }
                            td { @match seen {
                                Some(t) => (pages::time(t)),
                                None => { "logged in " (pages::time(d.last_login_ms)) },
                            } }
                            td { @if revoked { "revoked" } @else if online { strong { "online" } } @else { "offline" } }
                            td {
                                @if !revoked {
                                    form method="post" action={"/web/devices/" (d.name) "/revoke"} data-confirm={"Revoke " (d.name) "?"} {
                                        input type="hidden" name="csrf" value=(csrf);
                                        button.danger type="submit" aria-label={"Revoke " (d.name)} { "Revoke" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(u.page(
        StatusCode::OK,
        "Devices",
        Nav::Devices,
        q.notice.as_deref(),
        body,
    ))
}

/// `POST /web/devices/{device}/revoke`.
pub async fn revoke_device(
    u: WebUser,
    State(state): State<AppState>,
    Path(device): Path<String>,
    Form(f): Form<CsrfForm>,
) -> WebResult {
    u.check_csrf(&f.csrf)?;
    revoke(&state, &u.user, &device).await?;
    Ok(see_other_with(
        "/web/devices",
        &format!("Revoked {device}: it is signed out."),
    ))
}

/// `GET /web/password`.
pub async fn password_page(u: WebUser, q: Query<NoticeQuery>) -> Response {
    password_form(&u, StatusCode::OK, q.notice.as_deref(), None)
}

fn password_form(
    u: &WebUser,
    status: StatusCode,
    notice: Option<&str>,
    error: Option<&str>,
) -> Response {
    let csrf = &u.session.csrf;
    let body = html! {
        h1 { "Change your password" }
        p.muted { "Every device is signed out and must log in again with the new password; other browsers are signed out too." }
        @if let Some(e) = error { p.error role="alert" { (e) } }
        form.card method="post" action="/web/password" {
            input type="hidden" name="csrf" value=(csrf);
            label for="old" { "Current password" }
            input #old type="password" name="old_password" autocomplete="current-password" required;
            label for="new" { "New password (8 characters or more)" }
            input #new type="password" name="new_password" autocomplete="new-password" minlength="8" required;
            label for="repeat" { "New password again" }
            input #repeat type="password" name="repeat" autocomplete="new-password" minlength="8" required;
            button type="submit" { "Change password" }
        }
    };
    u.page(status, "Password", Nav::Password, notice, body)
}

/// `POST /web/password`: the old password is checked like a sign-in (same limits); every device
/// token and every other session of the user ends.
pub async fn change_password(
    u: WebUser,
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Form(f): Form<PasswordForm>,
) -> WebResult {
    u.check_csrf(&f.csrf)?;
    if f.new_password != f.repeat {
        return Ok(password_form(
            &u,
            StatusCode::BAD_REQUEST,
            None,
            Some("The two new passwords differ."),
        ));
    }
    let client = peer.ip();
    let charge = state
        .logins
        .try_login(client, &u.user)
        .map_err(ApiError::from)?;
    let user = state
        .backend
        .get_user(u.user.clone())
        .await?
        .ok_or(ApiError::Unauthorized)?;
    if !check_password(&state, &f.old_password, Some(&user.password_hash)).await? {
        tracing::warn!(%client, user = %u.user, "web password change refused: wrong old password");
        return Ok(password_form(
            &u,
            StatusCode::UNAUTHORIZED,
            None,
            Some("The current password is wrong."),
        ));
    }
    state.logins.succeeded(charge);
    let hash = match new_password_hash(&state, &f.new_password).await {
        Ok(h) => h,
        Err(ApiError::BadRequest(m)) => {
            return Ok(password_form(&u, StatusCode::BAD_REQUEST, None, Some(&m)))
        }
        Err(e) => return Err(e.into()),
    };
    let _lock = state.backend.lock_user(u.user.clone()).await?;
    if !same_user(&state, &user).await? {
        return Err(
            ApiError::Conflict("the password was changed meanwhile; try again".into()).into(),
        );
    }
    state
        .backend
        .set_password(u.user.clone(), hash.clone(), None)
        .await?;
    state.web.password_changed(&u.user, &u.key, &hash);
    tracing::info!(%client, user = %u.user, "password changed on the web; devices logged out");
    Ok(see_other_with(
        "/web/password",
        "Password changed. Every device must log in again with the new password.",
    ))
}
