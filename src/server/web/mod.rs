//! The web side of `deltadrive server` (`/web/...`, documented in `docs/web.md`): server-rendered
//! pages (maud, compiled into the binary with their CSS and script) where a user signs in with
//! their password, browses their tree, downloads, uploads, makes folders, renames and deletes,
//! sees a file's versions and restores one, lists and revokes devices, changes the password,
//! and makes read-only share links that anyone opens at `/s/TOKEN` (`share`).
//!
//! What always holds:
//! - every page and action but the sign-in form, the static assets and a share link's own
//!   pages (`/s/...`, which reach only what the link shares) needs a live session
//!   ([`WebUser`]); the user always comes from the session, never from the URL, and objects
//!   are looked up in that user's tree only;
//! - every POST but the sign-in carries the session's CSRF token, checked before anything else;
//! - the sign-in goes through the API's login limits and password threads (`access`, `auth`);
//! - every change is a change log appended through [`crate::server::storage::Storage`] with the
//!   same checks, limits and history as a device's append, so every device receives it.

mod account;
mod files;
mod pages;
pub mod seen;
pub mod session;
mod share;

use axum::extract::{DefaultBodyLimit, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use super::error::ApiError;
use super::AppState;
use session::{same_token, Session};

/// The cookie holding the session token.
pub const COOKIE: &str = "dd_session";
/// The device name web changes carry in the log and in history.
pub const WEB_DEVICE: &str = "web";

const STYLE: &str = include_str!("assets/style.css");
const SCRIPT: &str = include_str!("assets/app.js");

/// The web routes (merged into the API router, so they share its port, TLS, connection limits
/// and metrics).
pub fn router(state: &AppState) -> Router<AppState> {
    let form = state.config.access.max_json_bytes;
    let small = |r: axum::routing::MethodRouter<AppState>| r.layer(DefaultBodyLimit::max(form));
    Router::new()
        .route("/web", get(|| async { Redirect::to("/web/files") }))
        .route("/web/", get(|| async { Redirect::to("/web/files") }))
        .route("/web/static/style.css", get(style))
        .route("/web/static/app.js", get(script))
        .route(
            "/web/login",
            small(get(account::login_page).post(account::login)),
        )
        .route("/web/logout", small(post(account::logout)))
        .route("/web/files", get(files::root))
        .route("/web/files/{id}", get(files::folder))
        .route("/web/files/{id}/upload", post(files::upload))
        .route("/web/files/{id}/mkdir", small(post(files::mkdir)))
        .route("/web/file/{id}", get(files::file_page))
        .route("/web/file/{id}/download", get(files::download))
        .route("/web/file/{id}/restore", small(post(files::restore)))
        .route("/web/object/{id}/rename", small(post(files::rename)))
        .route("/web/object/{id}/delete", small(post(files::delete)))
        .route("/web/object/{id}/share", small(post(share::create)))
        .route("/web/shares", get(share::list))
        .route("/web/shares/{hash}/revoke", small(post(share::revoke)))
        .route("/s/{token}", get(share::visit))
        .route("/s/{token}/download", get(share::download))
        .route("/s/{token}/unlock", small(post(share::unlock)))
        .route("/web/devices", get(account::devices))
        .route(
            "/web/devices/{device}/revoke",
            small(post(account::revoke_device)),
        )
        .route(
            "/web/password",
            small(get(account::password_page).post(account::change_password)),
        )
        .layer(axum::middleware::from_fn(security_headers))
}

/// Headers every web answer carries: no framing, no sniffing, no referrer, scripts and styles
/// only from this server, pages not cached.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// A signed-in user (the session of the request's cookie).
#[derive(Clone, Debug)]
pub struct WebUser {
    pub user: String,
    /// The session's key (its token hash).
    pub key: String,
    pub session: Session,
}

impl WebUser {
    /// A signed-in page: `body` in the frame with this user's navigation (`nav` current).
    pub fn page(
        &self,
        status: StatusCode,
        title: &str,
        nav: pages::Nav,
        notice: Option<&str>,
        body: maud::Markup,
    ) -> Response {
        html(
            status,
            pages::layout(
                title,
                Some((&self.user, &self.session.csrf, nav)),
                notice,
                body,
            ),
        )
    }

    /// Checks the CSRF token a form posted.
    ///
    /// # Errors
    /// `Forbidden` when it is missing or not this session's.
    pub fn check_csrf(&self, given: &str) -> Result<(), WebError> {
        if same_token(given, &self.session.csrf) {
            Ok(())
        } else {
            tracing::warn!(user = %self.user, "web form refused: bad CSRF token");
            Err(ApiError::Forbidden(
                "this form is out of date or did not come from this site (bad CSRF token): \
                 reload the page and try again"
                    .into(),
            )
            .into())
        }
    }
}

/// The session token of the request's cookie.
fn cookie_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

/// A request without a live session: pages and actions send the browser to the sign-in.
pub struct SignIn;

impl IntoResponse for SignIn {
    fn into_response(self) -> Response {
        Redirect::to("/web/login").into_response()
    }
}

impl FromRequestParts<AppState> for WebUser {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let token = cookie_token(&parts.headers).ok_or_else(|| SignIn.into_response())?;
        let (key, session) = state.web.get(token).ok_or_else(|| SignIn.into_response())?;
        // The user must still exist with the password the session began with.
        let user = state
            .backend
            .get_user(session.user.clone())
            .await
            .map_err(|e| WebError::from(ApiError::from(e)).into_response())?;
        if user.is_none_or(|u| u.password_hash != session.password_hash) {
            state.web.end(&key);
            return Err(SignIn.into_response());
        }
        Ok(WebUser {
            user: session.user.clone(),
            key,
            session,
        })
    }
}

/// The `Set-Cookie` value of a session token (empty with `Max-Age=0` to clear it).
pub fn session_cookie(state: &AppState, token: Option<&str>) -> HeaderValue {
    let secure = if state.config.tls.is_some() {
        "; Secure"
    } else {
        ""
    };
    let v = match token {
        Some(t) => format!(
            "{COOKIE}={t}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
            session::LIFETIME.as_secs()
        ),
        None => format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{secure}"),
    };
    HeaderValue::from_str(&v).expect("a cookie of hex and ASCII")
}

/// An [`ApiError`] shown as a page (same status and `Retry-After` as the API's answer).
#[derive(Debug)]
pub struct WebError(pub ApiError);

impl From<ApiError> for WebError {
    fn from(e: ApiError) -> Self {
        WebError(e)
    }
}

impl From<super::backend::BackendError> for WebError {
    fn from(e: super::backend::BackendError) -> Self {
        WebError(e.into())
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let message = match &self.0 {
            ApiError::Internal(_) => "internal error (the server's log has the details)".into(),
            ApiError::Stale(_) => {
                "this changed meanwhile on another device: reload the page and try again".into()
            }
            ApiError::Unauthorized => "wrong user or password".into(),
            other => other.to_string(),
        };
        let status = self.0.status();
        // The API's answer logs the error and carries Retry-After; its JSON body is replaced.
        let mut resp = self.0.into_response();
        *resp.body_mut() = pages::error_page(status, &message).into_string().into();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        resp
    }
}

/// A result of a web handler.
pub type WebResult<T = Response> = Result<T, WebError>;

/// A 303 to `to` (after a POST).
pub fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

/// A 303 to `to` with a notice shown at the top of the page.
pub fn see_other_with(to: &str, notice: &str) -> Response {
    let sep = if to.contains('?') { '&' } else { '?' };
    see_other(&format!("{to}{sep}notice={}", encode_query(notice)))
}

/// Percent-encodes everything but unreserved characters.
pub fn encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Status of a page answer with HTML.
pub fn html(status: StatusCode, markup: maud::Markup) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        markup.into_string(),
    )
        .into_response()
}
