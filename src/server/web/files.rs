//! The user's files on the web: folder listings, a file's page with its versions, downloads
//! (with `Range`), uploads, new folders, renames, deletes and restores.
//!
//! What always holds: objects are looked up in the session user's tree only; every change is one
//! transaction appended through [`Storage::append_reserved`](crate::server::storage::Storage)
//! under device name [`WEB_DEVICE`], with its memory reserved from the appends' budget before the
//! bytes are held; names are checked with the change-log rules before anything is built.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::Form;
use futures_util::{StreamExt, TryStreamExt};
use maud::html;
use serde::Deserialize;

use super::pages::{self, Nav};
use super::{encode_query, see_other_with, WebError, WebResult, WebUser, WEB_DEVICE};
use crate::changelog::limits::MAX_DELTA_LEN;
use crate::changelog::{
    empty_hash, encode_changelog_checked, ChangeLog, Delta, Name, ObjectId, ObjectKind, Op, OpKind,
    Transaction,
};
use crate::server::api::now_ms;
use crate::server::api::storage::serve_content;
use crate::server::backend::{HistoryEntry, ObjectState, StoredKind};
use crate::server::content::read_range;
use crate::server::error::ApiError;
use crate::server::limits::Reservation;
use crate::server::AppState;

/// Most entries one folder page shows.
const MAX_LISTED: usize = 5_000;
/// Most objects one delete of a folder removes (a bigger tree is deleted from a device).
const MAX_DELETE: usize = 10_000;

#[derive(Deserialize, Default)]
pub struct PageQuery {
    notice: Option<String>,
    /// For a deleted file: its name and folder, carried by the link shown after the delete.
    name: Option<String>,
    parent: Option<String>,
}

#[derive(Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

#[derive(Deserialize)]
pub struct NameForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
pub struct VersionForm {
    #[serde(default)]
    csrf: String,
    version: Option<u64>,
    name: Option<String>,
    parent: Option<String>,
}

#[derive(Deserialize)]
pub struct DownloadQuery {
    version: Option<u64>,
}

fn parse_id(s: &str) -> Result<ObjectId, ApiError> {
    ObjectId::from_hex(s)
        .ok_or_else(|| ApiError::NotFound(format!("no file or folder {s:?} in your tree")))
}

/// A name typed or uploaded by the user, checked with the change-log rules.
fn checked_name(name: &str) -> Result<Name, ApiError> {
    Name::new(name.as_bytes().to_vec()).map_err(|why| {
        ApiError::BadRequest(format!(
            "the name {name:?} cannot be used ({why}): a name is 1 to 255 bytes, not . or .., \
             without / or NUL"
        ))
    })
}

fn show(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

async fn object(state: &AppState, user: &str, id: ObjectId) -> Result<ObjectState, ApiError> {
    state
        .backend
        .get_object(user.to_string(), id.0)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no file or folder {id} in your tree")))
}

/// The folders from the root down to `parent` (not included: the root), as (id, name).
async fn crumbs(
    state: &AppState,
    user: &str,
    mut parent: [u8; 16],
) -> Result<Vec<(String, String)>, ApiError> {
    let mut out = Vec::new();
    while parent != ObjectId::ROOT.0 && out.len() < 256 {
        let Some(o) = state.backend.get_object(user.to_string(), parent).await? else {
            break;
        };
        out.push((hex::encode(o.id), show(&o.name)));
        parent = o.parent;
    }
    out.reverse();
    Ok(out)
}

fn breadcrumb(trail: &[(String, String)], last: Option<&str>) -> maud::Markup {
    html! {
        nav.crumbs aria-label="Breadcrumb" {
            ol {
                li { a href="/web/files" { "My files" } }
                @for (id, name) in trail {
                    li { a href={"/web/files/" (id)} { (name) } }
                }
                @if let Some(l) = last {
                    li aria-current="page" { (l) }
                }
            }
        }
    }
}

/// `GET /web/files`: the root folder.
pub async fn root(u: WebUser, State(state): State<AppState>, q: Query<PageQuery>) -> WebResult {
    folder_page(&state, &u, ObjectId::ROOT, q.0).await
}

/// `GET /web/files/{id}`: one folder.
pub async fn folder(
    u: WebUser,
    State(state): State<AppState>,
    Path(id): Path<String>,
    q: Query<PageQuery>,
) -> WebResult {
    folder_page(&state, &u, parse_id(&id)?, q.0).await
}

async fn folder_page(state: &AppState, u: &WebUser, id: ObjectId, q: PageQuery) -> WebResult {
    let (title, trail, this) = if id == ObjectId::ROOT {
        ("My files".to_string(), Vec::new(), None)
    } else {
        let o = object(state, &u.user, id).await?;
        if o.kind != StoredKind::Directory {
            return Ok(super::see_other(&format!("/web/file/{id}")));
        }
        (
            show(&o.name),
            crumbs(state, &u.user, o.parent).await?,
            Some(o),
        )
    };
    let entries = state.backend.list_children(u.user.clone(), id.0).await?;
    let more = entries.len().saturating_sub(MAX_LISTED);
    let mut rows: Vec<(Vec<u8>, ObjectState)> =
        futures_util::stream::iter(entries.into_iter().take(MAX_LISTED))
            .map(|(name, child)| {
                let user = u.user.clone();
                async move {
                    let o = state.backend.get_object(user, child).await?;
                    Ok::<_, ApiError>(o.map(|o| (name, o)))
                }
            })
            .buffered(16)
            .try_filter_map(|x| async move { Ok(x) })
            .try_collect()
            .await?;
    rows.sort_by(|a, b| {
        (a.1.kind != StoredKind::Directory, &a.0).cmp(&(b.1.kind != StoredKind::Directory, &b.0))
    });
    let csrf = &u.session.csrf;
    let idh = id.to_hex();
    let body = html! {
        (breadcrumb(&trail, (id != ObjectId::ROOT).then_some(title.as_str())))
        h1 { (title) }
        @if rows.is_empty() {
            p.muted { "This folder is empty." }
        } @else {
            table.listing {
                caption.sr { "Contents of " (title) }
                thead { tr { th scope="col" { "Name" } th scope="col" { "Size" } th scope="col" { "Modified" } } }
                tbody {
                    @for (name, o) in &rows {
                        @let oid = hex::encode(o.id);
                        tr {
                            @match &o.kind {
                                StoredKind::Directory => {
                                    td { a.folder href={"/web/files/" (oid)} { (show(name)) "/" } }
                                    td { "folder" }
                                }
                                StoredKind::File => {
                                    td { a.file href={"/web/file/" (oid)} { (show(name)) } }
                                    td { (pages::size(o.size)) }
                                }
                                StoredKind::Symlink { target } => {
                                    td { (show(name)) " → " (show(target)) }
                                    td { "link" }
                                }
                            }
                            td { (pages::time(o.mtime_ns.div_euclid(1_000_000))) }
                        }
                    }
                }
            }
            @if more > 0 {
                p.muted { (more) " more entries are not shown." }
            }
        }
        div.actions {
            form.card method="post" action={"/web/files/" (idh) "/upload"} enctype="multipart/form-data" aria-labelledby="upload-title" {
                strong #upload-title { "Upload a file into this folder" }
                input type="hidden" name="csrf" value=(csrf);
                label for="saveas" { "Save as (optional, another name)" }
                input #saveas type="text" name="name" maxlength="255";
                label for="file" { "File" }
                input #file type="file" name="file" required;
                button type="submit" { "Upload" }
            }
            form.card method="post" action={"/web/files/" (idh) "/mkdir"} {
                input type="hidden" name="csrf" value=(csrf);
                label for="newfolder" { "New folder" }
                input #newfolder type="text" name="name" required maxlength="255";
                button type="submit" { "Create folder" }
            }
        }
        @if let Some(o) = &this {
            (object_actions(csrf, o, "folder"))
        }
    };
    Ok(u.page(
        StatusCode::OK,
        &title,
        Nav::Files,
        q.notice.as_deref(),
        body,
    ))
}

fn object_actions(csrf: &str, o: &ObjectState, what: &str) -> maud::Markup {
    let oid = hex::encode(o.id);
    html! {
        section.card aria-labelledby="manage" {
            h2 #manage { "Rename or delete this " (what) }
            form method="post" action={"/web/object/" (oid) "/rename"} {
                input type="hidden" name="csrf" value=(csrf);
                label for="rename" { "New name" }
                input #rename type="text" name="name" required maxlength="255" value=(show(&o.name));
                button type="submit" { "Rename" }
            }
            form method="post" action={"/web/object/" (oid) "/delete"} data-confirm={"Delete " (show(&o.name)) "?"} {
                input type="hidden" name="csrf" value=(csrf);
                button.danger type="submit" { "Delete " (what) }
            }
        }
        section.card aria-label="Share" {
            (super::share::share_form(csrf, &oid))
        }
    }
}

/// `GET /web/file/{id}`: a file, its versions, and what can be done with it. A deleted file
/// whose versions are kept shows them, with a restore that brings it back.
pub async fn file_page(
    u: WebUser,
    State(state): State<AppState>,
    Path(id): Path<String>,
    q: Query<PageQuery>,
) -> WebResult {
    let id = parse_id(&id)?;
    let current = state.backend.get_object(u.user.clone(), id.0).await?;
    let mut versions = state.backend.history(u.user.clone(), id.0).await?;
    versions.sort_by_key(|v| std::cmp::Reverse(v.version));
    let csrf = &u.session.csrf;
    let idh = id.to_hex();
    let (title, trail) = match &current {
        Some(o) if o.kind == StoredKind::Directory => {
            return Ok(super::see_other(&format!("/web/files/{idh}")))
        }
        Some(o) => (show(&o.name), crumbs(&state, &u.user, o.parent).await?),
        None if !versions.is_empty() => (
            q.name.clone().unwrap_or_else(|| "deleted file".into()),
            Vec::new(),
        ),
        None => {
            return Err(ApiError::NotFound(format!("no file or folder {id} in your tree")).into())
        }
    };
    // The current content is the newest kept version (later ops such as attribute changes
    // raise the object's version without a new content version).
    let current_version = current
        .as_ref()
        .and_then(|_| versions.first().map(|v| v.version));
    let body = html! {
        (breadcrumb(&trail, Some(&title)))
        h1 { (title) }
        @if let Some(o) = &current {
            dl.facts {
                dt { "Size" } dd { (pages::size(o.size)) " (" (o.size) " bytes)" }
                dt { "Modified" } dd { (pages::time(o.mtime_ns.div_euclid(1_000_000))) }
                dt { "Version" } dd { (o.version) }
            }
            p { a.button href={"/web/file/" (idh) "/download"} download { "Download" } }
        } @else {
            p.notice role="status" { "This file was deleted. Its kept versions are below: restore one to bring it back." }
        }
        section aria-labelledby="versions" {
            h2 #versions { "Versions" }
            @if versions.is_empty() {
                p.muted { "The server keeps no versions of this file." }
            } @else {
                table.listing {
                    thead { tr {
                        th scope="col" { "Version" } th scope="col" { "Saved" } th scope="col" { "Device" }
                        th scope="col" { "Size" } th scope="col" { span.sr { "Actions" } }
                    } }
                    tbody {
                        @for v in &versions {
                            tr {
                                td { (v.version) @if Some(v.version) == current_version { " (current)" } }
                                td { (pages::time(v.time_ms)) }
                                td { (v.device) }
                                td { (pages::size(v.size)) }
                                td.row-actions {
                                    a href={"/web/file/" (idh) "/download?version=" (v.version)} download
                                        aria-label={"Download version " (v.version)} { "Download" }
                                    @if Some(v.version) != current_version {
                                        form method="post" action={"/web/file/" (idh) "/restore"} {
                                            input type="hidden" name="csrf" value=(csrf);
                                            input type="hidden" name="version" value=(v.version);
                                            @if current.is_none() {
                                                @if let Some(n) = &q.name { input type="hidden" name="name" value=(n); }
                                                @if let Some(p) = &q.parent { input type="hidden" name="parent" value=(p); }
                                            }
                                            button type="submit" aria-label={"Restore version " (v.version)} { "Restore" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if let Some(o) = &current {
            (object_actions(csrf, o, "file"))
        }
    };
    Ok(u.page(
        StatusCode::OK,
        &title,
        Nav::Files,
        q.notice.as_deref(),
        body,
    ))
}

/// `GET /web/file/{id}/download[?version=V]`: the content as an attachment, with `Range`.
pub async fn download(
    u: WebUser,
    State(state): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<DownloadQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> WebResult {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let id = parse_id(&id)?;
    let name = state
        .backend
        .get_object(u.user.clone(), id.0)
        .await?
        .map(|o| show(&o.name))
        .unwrap_or_else(|| format!("{id}"));
    let mut resp = serve_content(&state, u.user.clone(), id, q.version, &headers).await?;
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"{ascii}\"; filename*=UTF-8''{}",
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

/// Appends one transaction of `ops` made on the web, holding `memory` (which already covers
/// whatever content the ops carry).
async fn submit(
    state: &AppState,
    user: &str,
    ops: Vec<Op>,
    mut memory: Reservation,
) -> Result<(), ApiError> {
    let tx = Transaction {
        id: rand::random(),
        device: WEB_DEVICE.to_string(),
        time_ms: now_ms(),
        ops,
    };
    let key = format!("web-{}", hex::encode(tx.id));
    let log = ChangeLog {
        transactions: vec![tx],
    };
    let body = encode_changelog_checked(&log)
        .map_err(|e| ApiError::Unprocessable(format!("this change cannot be made: {e}")))?;
    memory.grow(body.len() as u64, "its change log").await?;
    let rec = state
        .storage
        .append_reserved(user, WEB_DEVICE, &key, Bytes::from(body), memory)
        .await?;
    state.metrics.appended(1);
    tracing::info!(user, seq = rec.last_seq, "web change appended");
    Ok(())
}

fn op(object: ObjectId, base: u64, kind: OpKind) -> Op {
    Op {
        object,
        base_version: base,
        new_version: base + 1,
        kind,
    }
}

/// The ops that make a file named `name` in `parent` hold `content`: a new file, or a new
/// version of the file already there.
async fn write_ops(
    state: &AppState,
    user: &str,
    parent: ObjectId,
    name: &Name,
    content: Vec<u8>,
) -> Result<Vec<Op>, ApiError> {
    if content.len() as u64 > MAX_DELTA_LEN {
        return Err(ApiError::OverLimit(format!(
            "the web takes files up to {MAX_DELTA_LEN} bytes: put bigger ones in a synced folder"
        )));
    }
    let existing = state
        .backend
        .list_children(user.to_string(), parent.0)
        .await?
        .into_iter()
        .find(|(n, _)| n == name.as_bytes());
    let new_hash = *blake3::hash(&content).as_bytes();
    let new_size = content.len() as u64;
    if let Some((_, child)) = existing {
        let o = object(state, user, ObjectId(child)).await?;
        if o.kind != StoredKind::File {
            return Err(ApiError::Conflict(format!(
                "{name} already exists here and is not a file"
            )));
        }
        return Ok(vec![op(
            ObjectId(o.id),
            o.version,
            OpKind::Write {
                base_hash: o.hash,
                new_hash,
                new_size,
                delta: Delta::Whole(content),
            },
        )]);
    }
    let id = ObjectId::random();
    let mut ops = vec![op(
        id,
        0,
        OpKind::Create {
            parent,
            name: name.clone(),
            kind: ObjectKind::File,
            mode: 0o644,
            mtime_ns: now_ms().saturating_mul(1_000_000),
        },
    )];
    if !content.is_empty() {
        ops.push(op(
            id,
            1,
            OpKind::Write {
                base_hash: empty_hash(),
                new_hash,
                new_size,
                delta: Delta::Whole(content),
            },
        ));
    }
    Ok(ops)
}

async fn folder_of(state: &AppState, user: &str, id: ObjectId) -> Result<(), ApiError> {
    if id == ObjectId::ROOT {
        return Ok(());
    }
    match object(state, user, id).await?.kind {
        StoredKind::Directory => Ok(()),
        _ => Err(ApiError::BadRequest(format!("{id} is not a folder"))),
    }
}

fn folder_url(id: [u8; 16]) -> String {
    if id == ObjectId::ROOT.0 {
        "/web/files".into()
    } else {
        format!("/web/files/{}", hex::encode(id))
    }
}

/// `POST /web/files/{id}/upload` (multipart: `csrf` first, then an optional `name` to save the
/// file under, then `file`). The request's memory
/// is reserved from the appends' budget before its body is read.
pub async fn upload(
    u: WebUser,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    mut form: Multipart,
) -> WebResult {
    let parent = parse_id(&id)?;
    let limit = state.config.max_request_bytes as u64;
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(limit);
    if length > limit {
        return Err(ApiError::TooLarge(limit as usize).into());
    }
    let bad = |e: axum::extract::multipart::MultipartError| {
        WebError(if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(limit as usize)
        } else {
            ApiError::BadRequest(format!(
                "cannot read the upload ({}): is its file name made of printable characters?",
                e.body_text()
            ))
        })
    };
    // The CSRF field comes first in the form: nothing of the file is read before it is checked.
    let first = form.next_field().await.map_err(bad)?;
    match first {
        Some(f) if f.name() == Some("csrf") => {
            let given = f.text().await.map_err(bad)?;
            u.check_csrf(&given)?;
        }
        _ => {
            u.check_csrf("")?;
        }
    }
    let mut memory = state.storage.memory_budget().reservation();
    memory.grow(length, "its body").await?;
    let mut file = None;
    let mut save_as = String::new();
    while let Some(f) = form.next_field().await.map_err(bad)? {
        if f.name() == Some("name") {
            save_as = f.text().await.map_err(bad)?;
        } else if f.name() == Some("file") {
            let name = if save_as.is_empty() {
                f.file_name().unwrap_or_default().to_string()
            } else {
                save_as.clone()
            };
            let name = checked_name(&name)?;
            let bytes = f.bytes().await.map_err(bad)?;
            file = Some((name, bytes));
            break;
        }
    }
    let Some((name, bytes)) = file else {
        return Err(ApiError::BadRequest("the upload holds no file: pick one".into()).into());
    };
    folder_of(&state, &u.user, parent).await?;
    let ops = write_ops(&state, &u.user, parent, &name, bytes.to_vec()).await?;
    submit(&state, &u.user, ops, memory).await?;
    Ok(see_other_with(
        &folder_url(parent.0),
        &format!("Uploaded {name} ({}).", pages::size(bytes.len() as u64)),
    ))
}

/// `POST /web/files/{id}/mkdir`.
pub async fn mkdir(
    u: WebUser,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Form(f): Form<NameForm>,
) -> WebResult {
    u.check_csrf(&f.csrf)?;
    let parent = parse_id(&id)?;
    let name = checked_name(&f.name)?;
    folder_of(&state, &u.user, parent).await?;
    let ops = vec![op(
        ObjectId::random(),
        0,
        OpKind::Create {
            parent,
            name: name.clone(),
            kind: ObjectKind::Directory,
            mode: 0o755,
            mtime_ns: now_ms().saturating_mul(1_000_000),
        },
    )];
    submit(
        &state,
        &u.user,
        ops,
        state.storage.memory_budget().reservation(),
    )
    .await?;
    Ok(see_other_with(
        &folder_url(parent.0),
        &format!("Created folder {name}."),
    ))
}

/// `POST /web/object/{id}/rename`: a new name in the same folder.
pub async fn rename(
    u: WebUser,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Form(f): Form<NameForm>,
) -> WebResult {
    u.check_csrf(&f.csrf)?;
    let id = parse_id(&id)?;
    let name = checked_name(&f.name)?;
    if id == ObjectId::ROOT {
        return Err(ApiError::BadRequest("the root folder has no name to change".into()).into());
    }
    let o = object(&state, &u.user, id).await?;
    if !o.links.is_empty() {
        return Err(ApiError::Conflict(
            "this file has several names (hard links): rename it on a device".into(),
        )
        .into());
    }
    let ops = vec![op(
        id,
        o.version,
        OpKind::Rename {
            new_parent: ObjectId(o.parent),
            new_name: name.clone(),
        },
    )];
    submit(
        &state,
        &u.user,
        ops,
        state.storage.memory_budget().reservation(),
    )
    .await?;
    Ok(see_other_with(
        &folder_url(o.parent),
        &format!("Renamed {} to {name}.", show(&o.name)),
    ))
}

/// `POST /web/object/{id}/delete`: a file, or a folder with everything in it, in one
/// transaction. The server keeps the deleted files' versions: the notice links to them.
pub async fn delete(
    u: WebUser,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> WebResult {
    u.check_csrf(&f.csrf)?;
    let id = parse_id(&id)?;
    if id == ObjectId::ROOT {
        return Err(ApiError::BadRequest("the root folder cannot be deleted".into()).into());
    }
    let top = object(&state, &u.user, id).await?;
    // Children before their folder (post-order), so each folder is empty when it goes.
    let mut order: Vec<ObjectState> = Vec::new();
    let mut stack = vec![(top.clone(), false)];
    while let Some((o, expanded)) = stack.pop() {
        if !o.links.is_empty() {
            return Err(ApiError::Conflict(format!(
                "{} has several names (hard links): delete it on a device",
                show(&o.name)
            ))
            .into());
        }
        if o.kind != StoredKind::Directory || expanded {
            order.push(o);
            continue;
        }
        if order.len() + stack.len() > MAX_DELETE {
            return Err(ApiError::OverLimit(format!(
                "this folder holds more than {MAX_DELETE} entries: delete it on a device"
            ))
            .into());
        }
        let children = state.backend.list_children(u.user.clone(), o.id).await?;
        stack.push((o, true));
        for (_, c) in children {
            let child = object(&state, &u.user, ObjectId(c)).await?;
            stack.push((child, false));
        }
    }
    let ops = order
        .iter()
        .map(|o| op(ObjectId(o.id), o.version, OpKind::Delete))
        .collect();
    submit(
        &state,
        &u.user,
        ops,
        state.storage.memory_budget().reservation(),
    )
    .await?;
    let notice = if top.kind == StoredKind::File {
        format!(
            "Deleted {}. Its versions stay on the server: /web/file/{}?name={}&parent={}",
            show(&top.name),
            hex::encode(top.id),
            encode_query(&show(&top.name)),
            hex::encode(top.parent)
        )
    } else {
        format!(
            "Deleted folder {} ({} entries).",
            show(&top.name),
            order.len()
        )
    };
    Ok(see_other_with(&folder_url(top.parent), &notice))
}

/// `POST /web/file/{id}/restore`: makes a kept version the file's content again, as a new
/// version (a deleted file comes back as a new file in its folder, or in the root if the
/// folder is gone).
pub async fn restore(
    u: WebUser,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Form(f): Form<VersionForm>,
) -> WebResult {
    u.check_csrf(&f.csrf)?;
    let id = parse_id(&id)?;
    let version = f
        .version
        .ok_or_else(|| ApiError::BadRequest("which version? (version is missing)".into()))?;
    let kept: BTreeMap<u64, HistoryEntry> = state
        .backend
        .history(u.user.clone(), id.0)
        .await?
        .into_iter()
        .map(|e| (e.version, e))
        .collect();
    let e = kept
        .get(&version)
        .ok_or_else(|| ApiError::NotFound(format!("version {version} of this file is not kept")))?;
    let mut memory = state.storage.memory_budget().reservation();
    memory.grow(e.size, "the restored content").await?;
    let content = read_range(state.backend.as_ref(), &e.chunks, e.size, 0, e.size).await?;
    if *blake3::hash(&content).as_bytes() != e.hash {
        return Err(ApiError::Internal(format!(
            "version {version} of {id} does not match its hash"
        ))
        .into());
    }
    let current = state.backend.get_object(u.user.clone(), id.0).await?;
    let (ops, back_to, name) = match current {
        Some(o) => {
            if o.kind != StoredKind::File {
                return Err(ApiError::BadRequest(format!("{id} is not a file")).into());
            }
            let ops = vec![op(
                id,
                o.version,
                OpKind::Write {
                    base_hash: o.hash,
                    new_hash: e.hash,
                    new_size: e.size,
                    delta: Delta::Whole(content),
                },
            )];
            (ops, format!("/web/file/{id}"), show(&o.name))
        }
        None => {
            let name = checked_name(f.name.as_deref().unwrap_or("restored file"))?;
            let mut parent = f
                .parent
                .as_deref()
                .and_then(ObjectId::from_hex)
                .unwrap_or(ObjectId::ROOT);
            if folder_of(&state, &u.user, parent).await.is_err() {
                parent = ObjectId::ROOT;
            }
            let taken = state
                .backend
                .list_children(u.user.clone(), parent.0)
                .await?
                .iter()
                .any(|(n, _)| n == name.as_bytes());
            let name = if taken {
                checked_name(&format!("{name} (restored {version})"))?
            } else {
                name
            };
            let ops = write_ops(&state, &u.user, parent, &name, content).await?;
            (ops, folder_url(parent.0), name.to_string())
        }
    };
    submit(&state, &u.user, ops, memory).await?;
    Ok(see_other_with(
        &back_to,
        &format!("Restored {name} to version {version}; it syncs as a new version."),
    ))
}
