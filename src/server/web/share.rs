//! Share links: a read-only link to a file or folder of the signed-in user, with an optional
//! expiry and password, listed and revocable on `/web/shares`; opened by anyone at `/s/TOKEN`.
//!
//! What always holds: the link's token is random (256 bits), shown once and kept only as its
//! hash, on the backend ([`ShareRecord`]), so every replica sees the same links and a revoke is
//! immediate; a visitor reaches only the shared object and, for a folder, what is below it (every
//! id asked for is walked up to the shared folder); an expired, revoked or orphaned link is
//! refused; a password is checked like a sign-in (the login limits, keyed by the link, and the
//! password threads) and unlocks the link for that browser with a cookie bound to the link and
//! its password, so a revoke or a new link never inherits it.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Form;
use maud::html;
use serde::Deserialize;

use super::pages::{self, layout, Nav};
use super::{encode_query, html, see_other, see_other_with, WebError, WebResult, WebUser};
use crate::changelog::ObjectId;
use crate::server::api::storage::serve_content;
use crate::server::api::{now_ms, public_base};
use crate::server::auth::{check_password, hash_token, new_password_hash, new_token};
use crate::server::backend::{BackendError, ObjectState, ShareRecord, StoredKind};
use crate::server::error::ApiError;
use crate::server::AppState;

/// The cookie that unlocks password-protected links in a browser.
const UNLOCK_COOKIE: &str = "dd_share";

#[derive(Deserialize)]
pub struct NewShare {
    #[serde(default)]
    csrf: String,
    /// How long the link works (empty: until revoked).
    #[serde(default)]
    expires_in: String,
    /// `minutes`, `hours` or `days` (also `seconds`).
    #[serde(default)]
    expires_unit: String,
    /// Empty: no password.
    #[serde(default)]
    password: String,
}

#[derive(Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

#[derive(Deserialize)]
pub struct NoticeQuery {
    notice: Option<String>,
}

#[derive(Deserialize)]
pub struct DirQuery {
    dir: Option<String>,
}

#[derive(Deserialize)]
pub struct FileQuery {
    file: Option<String>,
}

#[derive(Deserialize)]
pub struct UnlockForm {
    #[serde(default)]
    password: String,
}

fn show(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

fn expiry(f: &NewShare, now: i64) -> Result<Option<i64>, ApiError> {
    let n = f.expires_in.trim();
    if n.is_empty() {
        return Ok(None);
    }
    let n: i64 = n
        .parse()
        .ok()
        .filter(|n| (1..=100_000).contains(n))
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "the expiry {n:?} is not a whole number from 1 to 100000"
            ))
        })?;
    let unit: i64 = match f.expires_unit.as_str() {
        "seconds" => 1_000,
        "minutes" => 60_000,
        "hours" => 3_600_000,
        "" | "days" => 86_400_000,
        other => {
            return Err(ApiError::BadRequest(format!(
                "unknown expiry unit {other:?}: minutes, hours or days"
            )))
        }
    };
    Ok(Some(now + n * unit))
}

/// `POST /web/object/{id}/share`: makes a link and shows it (once).
pub async fn create(
    u: WebUser,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Form(f): Form<NewShare>,
) -> WebResult {
    u.check_csrf(&f.csrf)?;
    let id = ObjectId::from_hex(&id)
        .ok_or_else(|| ApiError::NotFound(format!("no file or folder {id:?} in your tree")))?;
    let o = state
        .backend
        .get_object(u.user.clone(), id.0)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no file or folder {id} in your tree")))?;
    if matches!(o.kind, StoredKind::Symlink { .. }) {
        return Err(ApiError::BadRequest("a symbolic link cannot be shared".into()).into());
    }
    let now = now_ms();
    let expires_ms = expiry(&f, now)?;
    let password_hash = if f.password.is_empty() {
        None
    } else {
        Some(new_password_hash(&state, &f.password).await?)
    };
    let token = new_token();
    let rec = ShareRecord {
        hash: hash_token(&token),
        user: u.user.clone(),
        object: o.id,
        created_ms: now,
        expires_ms,
        password_hash,
    };
    match state.backend.put_share(rec).await {
        Ok(()) => {}
        Err(BackendError::NotFound) => return Err(ApiError::Unauthorized.into()),
        Err(e) => return Err(e.into()),
    }
    tracing::info!(user = %u.user, object = %id, "share link created");
    let link = format!("{}/s/{token}", public_base(&state, &headers, &uri));
    let body = html! {
        h1 { "Link to " (show(&o.name)) }
        p { "Anyone with this link can see and download "
            @if o.kind == StoredKind::Directory { "this folder and everything in it" } @else { "this file" }
            ", without signing in"
            @if expires_ms.is_some() { ", until " (pages::time(expires_ms.unwrap_or(0))) }
            "." }
        p.notice role="status" { "Copy it now: it is shown only once. You can revoke it on the "
            a href="/web/shares" { "Links" } " page." }
        label for="share-url" { "Link" }
        input #share-url .wide type="text" readonly value=(link);
        p { a href={"/web/file/" (id)} { "Back" } }
    };
    Ok(u.page(StatusCode::OK, "Share link", Nav::Shares, None, body))
}

/// `GET /web/shares`: the user's links.
pub async fn list(u: WebUser, State(state): State<AppState>, q: Query<NoticeQuery>) -> WebResult {
    let shares = state.backend.list_shares(u.user.clone()).await?;
    let now = now_ms();
    let mut rows = Vec::new();
    for l in shares {
        let o = state.backend.get_object(u.user.clone(), l.object).await?;
        rows.push((l, o));
    }
    let csrf = &u.session.csrf;
    let body = html! {
        h1 { "Links" }
        p.muted { "Read-only links to your files and folders. Make one from a file's or a folder's page." }
        @if rows.is_empty() {
            p.muted { "You have no links." }
        } @else {
            table.listing {
                caption.sr { "Your links" }
                thead { tr {
                    th scope="col" { "To" } th scope="col" { "Made" } th scope="col" { "Expires" }
                    th scope="col" { "Password" } th scope="col" { span.sr { "Actions" } }
                } }
                tbody {
                    @for (l, o) in &rows {
                        tr {
                            td { @match o {
                                Some(o) if o.kind == StoredKind::Directory => a href={"/web/files/" (hex::encode(o.id))} { (show(&o.name)) "/" },
                                Some(o) => a href={"/web/file/" (hex::encode(o.id))} { (show(&o.name)) },
                                None => "(deleted)",
                            } }
                            td { (pages::time(l.created_ms)) }
                            td { @match l.expires_ms {
                                None => "never",
                                Some(t) if t <= now => { "expired " (pages::time(t)) },
                                Some(t) => (pages::time(t)),
                            } }
                            td { @if l.password_hash.is_some() { "yes" } @else { "no" } }
                            td {
                                form method="post" action={"/web/shares/" (l.hash) "/revoke"} data-confirm="Revoke this link?" {
                                    input type="hidden" name="csrf" value=(csrf);
                                    button.danger type="submit" aria-label={"Revoke the link to " (o.as_ref().map(|o| show(&o.name)).unwrap_or_default())} { "Revoke" }
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
        "Links",
        Nav::Shares,
        q.notice.as_deref(),
        body,
    ))
}

/// `POST /web/shares/{hash}/revoke`.
pub async fn revoke(
    u: WebUser,
    State(state): State<AppState>,
    Path(hash): Path<String>,
    Form(f): Form<CsrfForm>,
) -> WebResult {
    u.check_csrf(&f.csrf)?;
    match state.backend.delete_share(u.user.clone(), hash).await {
        Ok(()) => {}
        Err(BackendError::NotFound) => {
            return Err(ApiError::NotFound("no such link of yours".into()).into())
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(user = %u.user, "share link revoked");
    Ok(see_other_with(
        "/web/shares",
        "Revoked the link: it no longer works.",
    ))
}

/// The form pieces of a share on a file's or folder's page.
pub fn share_form(csrf: &str, id: &str) -> maud::Markup {
    html! {
        form method="post" action={"/web/object/" (id) "/share"} aria-labelledby="share-title" {
            strong #share-title { "Share a read-only link" }
            input type="hidden" name="csrf" value=(csrf);
            label for="expires_in" { "Expires after (empty: never)" }
            input #expires_in type="number" name="expires_in" min="1" max="100000" inputmode="numeric";
            label for="expires_unit" { "Unit" }
            select #expires_unit name="expires_unit" {
                option value="days" selected { "days" }
                option value="hours" { "hours" }
                option value="minutes" { "minutes" }
            }
            label for="share_password" { "Password (optional, 8 characters or more)" }
            input #share_password type="password" name="password" autocomplete="new-password" minlength="8";
            button type="submit" { "Create link" }
        }
    }
}

// ---- the visitor's side ----

/// What a visitor may not see, as a page (always 404: a visitor learns nothing about links
/// that do not work, but the message).
fn gone(message: &str) -> WebError {
    WebError(ApiError::NotFound(message.to_string()))
}

fn cookie_name(l: &ShareRecord) -> String {
    format!("{UNLOCK_COOKIE}_{}", &l.hash[..16])
}

fn unlock_value(state: &AppState, l: &ShareRecord) -> String {
    state.web.bind(&format!(
        "{}\0{}",
        l.hash,
        l.password_hash.as_deref().unwrap_or("")
    ))
}

fn unlocked(state: &AppState, headers: &HeaderMap, l: &ShareRecord) -> bool {
    let want = unlock_value(state, l);
    let name = cookie_name(l);
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .any(|(k, v)| k == name && super::session::same_token(v, &want))
}

enum Opened {
    Open(ShareRecord, ObjectState),
    Locked(ShareRecord, ObjectState),
}

/// The link of `token` and what it shares, if it works.
async fn open(state: &AppState, token: &str, headers: &HeaderMap) -> Result<Opened, WebError> {
    let missing = "This link does not exist or was revoked.";
    if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(gone(missing));
    }
    let l = state
        .backend
        .get_share(hash_token(token))
        .await?
        .ok_or_else(|| gone(missing))?;
    if l.expires_ms.is_some_and(|t| t <= now_ms()) {
        return Err(gone("This link has expired."));
    }
    if state.backend.get_user(l.user.clone()).await?.is_none() {
        return Err(gone(missing));
    }
    let o = state
        .backend
        .get_object(l.user.clone(), l.object)
        .await?
        .ok_or_else(|| gone("What this link shared was deleted."))?;
    if l.password_hash.is_some() && !unlocked(state, headers, &l) {
        return Ok(Opened::Locked(l, o));
    }
    Ok(Opened::Open(l, o))
}

fn locked_page(token: &str, o: &ObjectState, status: StatusCode, error: Option<&str>) -> Response {
    html(
        status,
        layout(
            "Shared with you",
            None,
            None,
            html! {
                h1 { (show(&o.name)) }
                p { "This link has a password." }
                @if let Some(e) = error { p.error role="alert" { (e) } }
                form.card method="post" action={"/s/" (token) "/unlock"} {
                    label for="share-password" { "Password" }
                    input #share-password type="password" name="password" required autofocus;
                    button type="submit" { "Open" }
                }
            },
        ),
    )
}

/// Whether `id` is `top` or below it (walking up at most 256 folders).
async fn inside(
    state: &AppState,
    user: &str,
    top: [u8; 16],
    id: [u8; 16],
) -> Result<bool, ApiError> {
    let mut at = id;
    for _ in 0..256 {
        if at == top {
            return Ok(true);
        }
        if at == ObjectId::ROOT.0 {
            return Ok(false);
        }
        match state.backend.get_object(user.to_string(), at).await? {
            Some(o) => at = o.parent,
            None => return Ok(false),
        }
    }
    Ok(false)
}

/// `GET /s/{token}[?dir=ID]`: the shared file, or a folder of the shared tree.
pub async fn visit(
    State(state): State<AppState>,
    Path(token): Path<String>,
    Query(q): Query<DirQuery>,
    headers: HeaderMap,
) -> WebResult {
    let (l, top) = match open(&state, &token, &headers).await? {
        Opened::Open(l, o) => (l, o),
        Opened::Locked(_, o) => return Ok(locked_page(&token, &o, StatusCode::UNAUTHORIZED, None)),
    };
    let base = format!("/s/{token}");
    if top.kind != StoredKind::Directory {
        let body = html! {
            h1 { (show(&top.name)) }
            p { "Shared with you: " (pages::size(top.size)) ", modified " (pages::time(top.mtime_ns.div_euclid(1_000_000))) "." }
            p { a.button href={(base) "/download"} download { "Download" } }
        };
        return Ok(html(
            StatusCode::OK,
            layout("Shared with you", None, None, body),
        ));
    }
    let dir = match q.dir.as_deref() {
        None => top.clone(),
        Some(d) => {
            let id = ObjectId::from_hex(d).ok_or_else(|| gone("No such folder in this link."))?;
            if !inside(&state, &l.user, top.id, id.0).await? {
                return Err(gone("No such folder in this link."));
            }
            state
                .backend
                .get_object(l.user.clone(), id.0)
                .await?
                .filter(|o| o.kind == StoredKind::Directory)
                .ok_or_else(|| gone("No such folder in this link."))?
        }
    };
    let mut rows = Vec::new();
    for (name, child) in state
        .backend
        .list_children(l.user.clone(), dir.id)
        .await?
        .into_iter()
        .take(5_000)
    {
        if let Some(o) = state.backend.get_object(l.user.clone(), child).await? {
            rows.push((name, o));
        }
    }
    rows.sort_by(|a, b| {
        (a.1.kind != StoredKind::Directory, &a.0).cmp(&(b.1.kind != StoredKind::Directory, &b.0))
    });
    let body = html! {
        @if dir.id != top.id {
            p { a href=(base) { "Back to " (show(&top.name)) } }
        }
        h1 { (show(&dir.name)) }
        p.muted { "Shared with you, read-only." }
        @if rows.is_empty() { p.muted { "This folder is empty." } } @else {
            table.listing {
                thead { tr { th scope="col" { "Name" } th scope="col" { "Size" } th scope="col" { "Modified" } } }
                tbody {
                    @for (name, o) in &rows {
                        @let oid = hex::encode(o.id);
                        tr {
                            @match &o.kind {
                                StoredKind::Directory => {
                                    td { a href={(base) "?dir=" (oid)} { (show(name)) "/" } }
                                    td { "folder" }
                                }
                                StoredKind::File => {
                                    td { a href={(base) "/download?file=" (oid)} download { (show(name)) } }
                                    td { (pages::size(o.size)) }
                                }
                                StoredKind::Symlink { .. } => {
                                    td { (show(name)) } td { "link" }
                                }
                            }
                            td { (pages::time(o.mtime_ns.div_euclid(1_000_000))) }
                        }
                    }
                }
            }
        }
    };
    Ok(html(
        StatusCode::OK,
        layout("Shared with you", None, None, body),
    ))
}

/// `GET /s/{token}/download[?file=ID]`: the shared file, or a file of the shared folder, with
/// `Range`.
pub async fn download(
    State(state): State<AppState>,
    Path(token): Path<String>,
    Query(q): Query<FileQuery>,
    headers: HeaderMap,
) -> WebResult {
    let (l, top) = match open(&state, &token, &headers).await? {
        Opened::Open(l, o) => (l, o),
        Opened::Locked(_, o) => return Ok(locked_page(&token, &o, StatusCode::UNAUTHORIZED, None)),
    };
    let none = || gone("No such file in this link.");
    let file = match q.file.as_deref() {
        None => top,
        Some(f) => {
            let id = ObjectId::from_hex(f).ok_or_else(none)?;
            if top.kind != StoredKind::Directory || !inside(&state, &l.user, top.id, id.0).await? {
                return Err(none());
            }
            state
                .backend
                .get_object(l.user.clone(), id.0)
                .await?
                .ok_or_else(none)?
        }
    };
    if file.kind != StoredKind::File {
        return Err(none());
    }
    let mut resp = serve_content(&state, l.user.clone(), ObjectId(file.id), None, &headers).await?;
    let name = show(&file.name);
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename*=UTF-8''{}",
        encode_query(&name)
    )) {
        resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    Ok(resp)
}

/// `POST /s/{token}/unlock`: the link's password, checked as a sign-in is.
pub async fn unlock(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(token): Path<String>,
    headers: HeaderMap,
    Form(f): Form<UnlockForm>,
) -> WebResult {
    let (l, o) = match open(&state, &token, &headers).await? {
        Opened::Open(..) => return Ok(see_other(&format!("/s/{token}"))),
        Opened::Locked(l, o) => (l, o),
    };
    let client = peer.ip();
    let key = format!("share:{}", &l.hash[..16]);
    let charge = state
        .logins
        .try_login(client, &key)
        .map_err(ApiError::from)?;
    if !check_password(&state, &f.password, l.password_hash.as_deref()).await? {
        tracing::warn!(%client, "share link: wrong password");
        return Ok(locked_page(
            &token,
            &o,
            StatusCode::UNAUTHORIZED,
            Some("Wrong password."),
        ));
    }
    state.logins.succeeded(charge);
    let secure = if state.config.tls.is_some() {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{}={}; HttpOnly; SameSite=Strict; Path=/s/; Max-Age=86400{secure}",
        cookie_name(&l),
        unlock_value(&state, &l)
    );
    let mut resp = see_other(&format!("/s/{token}"));
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(resp)
}
