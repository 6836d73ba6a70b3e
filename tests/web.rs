//! The web side of `deltadrive server` (`docs/web.md`) against the real binary: every page and
//! action refuses without a session, another user's files, versions and devices are never
//! reachable, CSRF tokens are checked, bad names are refused with a clear message, the sign-in
//! is under the API's login limits, and what the web changes is an ordinary change in the
//! user's log (seen by the API and by a mounted device). The browser walk-through (Chromium
//! through WebDriver) is `browser_walkthrough`.

#[path = "web/browser.rs"]
mod browser;
#[path = "web/client.rs"]
mod client;
mod common;

use client::{assert_sign_in, id_in, location, WebClient, ROOT};
use std::path::PathBuf;

use browser::Browser;
use common::cluster::{idle, Cluster};
use common::server::TestServer;
use reqwest::StatusCode;

const PW: &str = "password-123";

/// The user's head and tree, to show that a refused action changed nothing.
async fn state_of(c: &deltadrive::client::Client) -> serde_json::Value {
    c.snapshot().await.expect("snapshot")
}

/// A server with user `ann` (device `laptop`) holding `docs/` and `a.txt` uploaded on the web.
async fn ann_with_files() -> (
    TestServer,
    deltadrive::client::Client,
    WebClient,
    String,
    String,
) {
    let s = TestServer::start();
    let api = s.device("ann", "laptop").await;
    let w = WebClient::signed_in(&s.url, "ann", PW).await;
    let csrf = w.csrf().await;
    let r = w.upload(ROOT, b"a.txt", b"hello web", Some(&csrf)).await;
    assert_eq!(
        r.status(),
        StatusCode::SEE_OTHER,
        "{}",
        r.text().await.unwrap()
    );
    let r = w
        .post(
            &format!("/web/files/{ROOT}/mkdir"),
            &[("csrf", &csrf), ("name", "docs")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let (_, page) = w.text("/web/files").await;
    let (file, dir) = (id_in(&page, "a.txt"), id_in(&page, "docs"));
    (s, api, w, file, dir)
}

#[tokio::test]
async fn every_page_and_action_refuses_without_a_session() {
    let (s, api, w, file, dir) = ann_with_files().await;
    let csrf = w.csrf().await;
    let before = state_of(&api).await;
    let gets = [
        "/web/files".to_string(),
        format!("/web/files/{dir}"),
        format!("/web/file/{file}"),
        format!("/web/file/{file}/download"),
        format!("/web/file/{file}/download?version=2"),
        "/web/devices".into(),
        "/web/shares".into(),
        "/web/password".into(),
    ];
    let posts: Vec<(String, Vec<(&str, &str)>)> = vec![
        (
            format!("/web/files/{ROOT}/mkdir"),
            vec![("csrf", &csrf), ("name", "x")],
        ),
        (
            format!("/web/object/{file}/rename"),
            vec![("csrf", &csrf), ("name", "b.txt")],
        ),
        (format!("/web/object/{file}/delete"), vec![("csrf", &csrf)]),
        (
            format!("/web/file/{file}/restore"),
            vec![("csrf", &csrf), ("version", "2")],
        ),
        ("/web/devices/laptop/revoke".into(), vec![("csrf", &csrf)]),
        (format!("/web/object/{file}/share"), vec![("csrf", &csrf)]),
        (
            format!("/web/shares/{}/revoke", "ab".repeat(32)),
            vec![("csrf", &csrf)],
        ),
        (
            "/web/password".into(),
            vec![
                ("csrf", &csrf),
                ("old_password", PW),
                ("new_password", "new-password-1"),
                ("repeat", "new-password-1"),
            ],
        ),
        ("/web/logout".into(), vec![("csrf", &csrf)]),
    ];
    // No cookie, a made-up cookie, and the cookie of a session that signed out.
    let gone = WebClient::signed_in(&s.url, "ann", PW).await;
    let gone_csrf = gone.csrf().await;
    let r = gone.post("/web/logout", &[("csrf", &gone_csrf)]).await;
    assert_sign_in(&r, "sign-out");
    assert!(r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    let mut made_up = WebClient::new(&s.url);
    made_up.cookie = Some("ab".repeat(32));
    let anon = WebClient::new(&s.url);
    for (who, c) in [
        ("no cookie", &anon),
        ("made-up cookie", &made_up),
        ("signed out", &gone),
    ] {
        for g in &gets {
            assert_sign_in(&c.get(g).await, &format!("{who}: GET {g}"));
        }
        for (p, form) in &posts {
            assert_sign_in(&c.post(p, form).await, &format!("{who}: POST {p}"));
        }
        let r = c.upload(ROOT, b"z.txt", b"zz", Some(&csrf)).await;
        assert_sign_in(&r, &format!("{who}: upload"));
    }
    assert_eq!(state_of(&api).await, before, "nothing changed");
    assert!(api.me().await.is_ok(), "the device was not revoked");
    // The sign-in page and the assets are open.
    assert_eq!(anon.get("/web/login").await.status(), StatusCode::OK);
    assert_eq!(
        anon.get("/web/static/style.css").await.status(),
        StatusCode::OK
    );
    // And the real session still works.
    assert_eq!(w.get("/web/files").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn the_session_cookie_is_http_only_strict_and_pages_forbid_framing() {
    let s = TestServer::start();
    s.device("ann", "laptop").await;
    let mut w = WebClient::new(&s.url);
    let r = w.sign_in("ann", PW).await;
    let c = r.headers()["set-cookie"].to_str().unwrap().to_string();
    for part in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(c.contains(part), "{part} in {c}");
    }
    assert!(!c.contains("Secure"), "plain HTTP: no Secure ({c})");
    let page = w.get("/web/files").await;
    let h = page.headers();
    assert!(h["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("frame-ancestors 'none'"));
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["referrer-policy"], "no-referrer");
}

#[tokio::test]
async fn another_users_paths_versions_and_devices_are_never_reachable() {
    let (s, ann_api, _ann, file, dir) = ann_with_files().await;
    s.device("bob", "phone").await;
    let bob = WebClient::signed_in(&s.url, "bob", PW).await;
    let csrf = bob.csrf().await;
    let before = state_of(&ann_api).await;
    for g in [
        format!("/web/files/{dir}"),
        format!("/web/file/{file}"),
        format!("/web/file/{file}/download"),
        format!("/web/file/{file}/download?version=2"),
    ] {
        let (st, body) = bob.text(&g).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "bob GET {g}: {body}");
        assert!(
            !body.contains("hello web") && !body.contains("a.txt"),
            "{body}"
        );
    }
    let r = bob
        .get_range(&format!("/web/file/{file}/download"), "bytes=0-3")
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    for (p, form) in [
        (
            format!("/web/files/{dir}/mkdir"),
            vec![("csrf", csrf.as_str()), ("name", "x")],
        ),
        (
            format!("/web/object/{file}/rename"),
            vec![("csrf", &csrf), ("name", "b.txt")],
        ),
        (format!("/web/object/{dir}/delete"), vec![("csrf", &csrf)]),
        (format!("/web/object/{file}/delete"), vec![("csrf", &csrf)]),
        (
            format!("/web/file/{file}/restore"),
            vec![("csrf", &csrf), ("version", "2")],
        ),
    ] {
        let r = bob.post(&p, &form).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "bob POST {p}");
    }
    let r = bob.upload(&dir, b"into-ann.txt", b"x", Some(&csrf)).await;
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "bob uploads into ann's folder"
    );
    // Ann's device is not bob's to see or revoke.
    let (_, devices) = bob.text("/web/devices").await;
    assert!(
        devices.contains("phone") && !devices.contains("laptop"),
        "{devices}"
    );
    let r = bob
        .post("/web/devices/laptop/revoke", &[("csrf", &csrf)])
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(ann_api.me().await.is_ok(), "ann's laptop still works");
    // Bob's own root does not list ann's files.
    let (_, root) = bob.text("/web/files").await;
    assert!(!root.contains("a.txt") && !root.contains("docs/"), "{root}");
    assert_eq!(state_of(&ann_api).await, before, "ann's tree is unchanged");
}

#[tokio::test]
async fn csrf_tokens_are_checked_on_every_post() {
    let (s, api, w, file, _dir) = ann_with_files().await;
    // Another session of the same user has another token, which is no good here.
    let other = WebClient::signed_in(&s.url, "ann", PW).await;
    let foreign = other.csrf().await;
    let mine = w.csrf().await;
    assert_ne!(foreign, mine);
    let before = state_of(&api).await;
    for token in [None, Some(""), Some(foreign.as_str()), Some("00")] {
        let with = |mut f: Vec<(&'static str, String)>| {
            if let Some(t) = token {
                f.push(("csrf", t.to_string()));
            }
            f
        };
        let posts: Vec<(String, Vec<(&str, String)>)> = vec![
            (
                format!("/web/files/{ROOT}/mkdir"),
                with(vec![("name", "x".into())]),
            ),
            (
                format!("/web/object/{file}/rename"),
                with(vec![("name", "b.txt".into())]),
            ),
            (format!("/web/object/{file}/delete"), with(vec![])),
            (
                format!("/web/file/{file}/restore"),
                with(vec![("version", "2".into())]),
            ),
            ("/web/devices/laptop/revoke".into(), with(vec![])),
            (format!("/web/object/{file}/share"), with(vec![])),
            (
                "/web/password".into(),
                with(vec![
                    ("old_password", PW.into()),
                    ("new_password", "new-password-1".into()),
                    ("repeat", "new-password-1".into()),
                ]),
            ),
            ("/web/logout".into(), with(vec![])),
        ];
        for (p, form) in posts {
            let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let r = w.post(&p, &form).await;
            assert_eq!(r.status(), StatusCode::FORBIDDEN, "POST {p} with {token:?}");
            let body = r.text().await.unwrap();
            assert!(body.contains("CSRF"), "{body}");
        }
        let r = w.upload(ROOT, b"c.txt", b"c", token).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "upload with {token:?}");
    }
    assert_eq!(state_of(&api).await, before, "nothing changed");
    assert!(api.me().await.is_ok(), "not revoked, password unchanged");
    assert_eq!(
        w.get("/web/files").await.status(),
        StatusCode::OK,
        "not signed out"
    );
}

#[tokio::test]
async fn bad_names_in_uploads_and_renames_are_refused_with_a_clear_message() {
    let (_s, api, w, file, _dir) = ann_with_files().await;
    let csrf = w.csrf().await;
    let before = state_of(&api).await;
    for name in [&b".."[..], b".", b"a/b", b"../up"] {
        let r = w.upload(ROOT, name, b"x", Some(&csrf)).await;
        let st = r.status();
        let body = r.text().await.unwrap();
        assert_eq!(st, StatusCode::BAD_REQUEST, "upload {name:?}: {body}");
        assert!(body.contains("cannot be used"), "upload {name:?}: {body}");
    }
    // A NUL cannot travel in a multipart header; it can in the "save as" field.
    for name in [&b"a\0b"[..], b"..", b"x/y"] {
        let r = w
            .upload_as(ROOT, Some(name), b"fine.txt", b"x", Some(&csrf))
            .await;
        let st = r.status();
        let body = r.text().await.unwrap();
        assert_eq!(st, StatusCode::BAD_REQUEST, "save as {name:?}: {body}");
        assert!(body.contains("cannot be used"), "save as {name:?}: {body}");
    }
    let r = w.upload(ROOT, b"a\0b", b"x", Some(&csrf)).await;
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "a NUL in the file name header"
    );
    for name in ["..", ".", "x/y", "a\0b", ""] {
        let r = w
            .post(
                &format!("/web/object/{file}/rename"),
                &[("csrf", &csrf), ("name", name)],
            )
            .await;
        let st = r.status();
        let body = r.text().await.unwrap();
        assert_eq!(st, StatusCode::BAD_REQUEST, "rename to {name:?}: {body}");
        assert!(
            body.contains("cannot be used"),
            "rename to {name:?}: {body}"
        );
        let r = w
            .post(
                &format!("/web/files/{ROOT}/mkdir"),
                &[("csrf", &csrf), ("name", name)],
            )
            .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "mkdir {name:?}");
    }
    assert_eq!(state_of(&api).await, before, "nothing changed");
}

#[tokio::test]
async fn the_login_rate_limit_applies_to_the_web_sign_in() {
    let s = TestServer::start_with(&["--login-tries-per-user", "3"]);
    s.device("ann", "laptop").await;
    let mut w = WebClient::new(&s.url);
    // The device's login above succeeded and did not count; three wrong tries do.
    for _ in 0..3 {
        let r = w.sign_in("ann", "wrong password").await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.text().await.unwrap().contains("Wrong user or password"));
    }
    let r = w.sign_in("ann", PW).await;
    assert_eq!(
        r.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the right password, too late"
    );
    assert!(r.headers().contains_key("retry-after"));
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("Too many sign-in attempts"));
    assert!(w.cookie.is_none(), "no session");
    // The same limit as the API's: a device login for ann is refused too.
    let e = s
        .anon()
        .login("ann", PW, "phone")
        .await
        .expect_err("limited");
    assert_eq!(e.status(), Some(StatusCode::TOO_MANY_REQUESTS));
}

#[tokio::test]
async fn web_changes_are_changes_in_the_users_log_with_history_and_restore() {
    let (_s, api, w, file, dir) = ann_with_files().await;
    let csrf = w.csrf().await;
    // The upload is in the log as a transaction of device "web", like any device's.
    let log = api.read_log(0, 100).await.expect("log");
    let txs: Vec<_> = log
        .entries
        .iter()
        .map(|(_, b)| deltadrive::changelog::decode_transaction(b).expect("decode"))
        .collect();
    assert_eq!(txs.len(), 2, "{txs:?}");
    assert!(txs.iter().all(|t| t.device == "web"));
    assert_eq!(
        api.content(&file, None, None).await.expect("content"),
        b"hello web"
    );
    // Download, whole and by range.
    let r = w.get(&format!("/web/file/{file}/download")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .contains("a.txt"));
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"hello web");
    let r = w
        .get_range(&format!("/web/file/{file}/download"), "bytes=6-")
        .await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.headers()["content-range"], "bytes 6-8/9");
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"web");
    // A second upload of the same name is a new version of the same file.
    let r = w.upload(ROOT, b"a.txt", b"second", Some(&csrf)).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let h = api.history(&file).await.expect("history");
    let versions: Vec<u64> = h
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, vec![2, 3]);
    let (_, page) = w.text(&format!("/web/file/{file}")).await;
    assert!(
        page.contains("3 (current)") && page.contains(">web<"),
        "{page}"
    );
    // Any version downloads; restoring one makes it the content again, as a new version.
    let r = w.get(&format!("/web/file/{file}/download?version=2")).await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"hello web");
    let r = w
        .post(
            &format!("/web/file/{file}/restore"),
            &[("csrf", &csrf), ("version", "2")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(location(&r).contains("Restored"), "{}", location(&r));
    assert_eq!(api.content(&file, None, None).await.unwrap(), b"hello web");
    // Rename, upload into a folder, delete the folder with its content: the deleted file's
    // versions stay on the server and it can be restored.
    let r = w
        .post(
            &format!("/web/object/{file}/rename"),
            &[("csrf", &csrf), ("name", "b.txt")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let r = w.upload(&dir, b"inner.txt", b"inside", Some(&csrf)).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let (_, folder) = w.text(&format!("/web/files/{dir}")).await;
    let inner = id_in(&folder, "inner.txt");
    let r = w
        .post(&format!("/web/object/{inner}/delete"), &[("csrf", &csrf)])
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let back = location(&r);
    assert!(back.contains(&format!("%2Fweb%2Ffile%2F{inner}")), "{back}");
    let (st, page) = w
        .text(&format!("/web/file/{inner}?name=inner.txt&parent={dir}"))
        .await;
    assert_eq!(st, StatusCode::OK);
    assert!(page.contains("was deleted"), "{page}");
    let r = w
        .post(
            &format!("/web/file/{inner}/restore"),
            &[
                ("csrf", &csrf),
                ("version", "2"),
                ("name", "inner.txt"),
                ("parent", &dir),
            ],
        )
        .await;
    assert_eq!(
        r.status(),
        StatusCode::SEE_OTHER,
        "{}",
        r.text().await.unwrap()
    );
    let (_, folder) = w.text(&format!("/web/files/{dir}")).await;
    let again = id_in(&folder, "inner.txt");
    assert_eq!(api.content(&again, None, None).await.unwrap(), b"inside");
    let r = w
        .post(&format!("/web/object/{dir}/delete"), &[("csrf", &csrf)])
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let snap = state_of(&api).await;
    let names: Vec<&str> = snap["objects"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["name"].as_str())
        .collect();
    assert_eq!(
        names
            .iter()
            .filter(|n| !n.is_empty())
            .copied()
            .collect::<Vec<_>>(),
        vec!["b.txt"],
        "{snap}"
    );
}

#[tokio::test]
async fn devices_are_listed_and_revoked_and_a_password_change_signs_everything_out() {
    let s = TestServer::start();
    let laptop = s.device("ann", "laptop").await;
    let phone = s.device("ann", "phone").await;
    laptop.me().await.expect("seen by the server");
    let w = WebClient::signed_in(&s.url, "ann", PW).await;
    let other = WebClient::signed_in(&s.url, "ann", PW).await;
    let csrf = w.csrf().await;
    let (_, page) = w.text("/web/devices").await;
    assert!(page.contains("laptop") && page.contains("phone"), "{page}");
    assert!(page.contains("online"), "laptop was just seen: {page}");
    let r = w
        .post("/web/devices/phone/revoke", &[("csrf", &csrf)])
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let e = phone.me().await.expect_err("revoked");
    assert_eq!(e.status(), Some(StatusCode::UNAUTHORIZED));
    assert!(laptop.me().await.is_ok());
    let (_, page) = w.text("/web/devices").await;
    assert!(page.contains("revoked"), "{page}");
    // A wrong old password changes nothing.
    let r = w
        .post(
            "/web/password",
            &[
                ("csrf", &csrf),
                ("old_password", "nope-nope"),
                ("new_password", "new-password-1"),
                ("repeat", "new-password-1"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(laptop.me().await.is_ok());
    let r = w
        .post(
            "/web/password",
            &[
                ("csrf", &csrf),
                ("old_password", PW),
                ("new_password", "new-password-1"),
                ("repeat", "new-password-1"),
            ],
        )
        .await;
    assert_eq!(
        r.status(),
        StatusCode::SEE_OTHER,
        "{}",
        r.text().await.unwrap()
    );
    let e = laptop
        .me()
        .await
        .expect_err("every device token is revoked");
    assert_eq!(e.status(), Some(StatusCode::UNAUTHORIZED));
    assert_sign_in(
        &other.get("/web/files").await,
        "the other browser is signed out",
    );
    assert_eq!(
        w.get("/web/files").await.status(),
        StatusCode::OK,
        "this one stays"
    );
    let mut fresh = WebClient::new(&s.url);
    assert_eq!(
        fresh.sign_in("ann", PW).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        fresh.sign_in("ann", "new-password-1").await.status(),
        StatusCode::SEE_OTHER
    );
    s.anon()
        .login("ann", "new-password-1", "laptop")
        .await
        .expect("new password logs in");
}

/// The web side in a real browser (headless Chromium through WebDriver), next to a mounted
/// device: sign-in, browse, upload (arriving on the device), download, restore (arriving on the
/// device), the phone-width layout, revoke, a share link made, sign-out, the link opened
/// without signing in. With `DELTADRIVE_WEB_SCREENSHOTS=DIR` it saves a PNG of each main page
/// there (how `docs/img/web-*.png` were made).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_walkthrough() {
    let shots = std::env::var_os("DELTADRIVE_WEB_SCREENSHOTS").map(PathBuf::from);
    let shots = shots.as_deref();
    let c = Cluster::new(1);
    let url = c.srv.url.clone();
    std::fs::create_dir(c.p(0, "Photos")).unwrap();
    std::fs::write(c.p(0, "notes.txt"), "written on dev0\n").unwrap();
    c.wait("dev0 sends its files", || idle(&c.devices[0].home));

    let b = Browser::start().await;
    b.goto(&format!("{url}/web/files")).await;
    assert!(b.url().await.ends_with("/web/login"), "{}", b.url().await);
    b.screenshot(shots, "web-login.png").await;
    b.type_into("#user", "ann").await;
    b.type_into("#password", "correct horse battery staple")
        .await;
    b.click("main button[type=submit]").await;
    b.wait_for_text("notes.txt").await;
    assert!(b.source().await.contains("Photos/"));

    // Upload: the file becomes a change every device receives.
    let local = tempfile::tempdir().unwrap();
    let up = local.path().join("from-web.txt");
    std::fs::write(&up, "uploaded in a browser\n").unwrap();
    b.choose_file("#file", &up).await;
    b.click("form[enctype] button[type=submit]").await;
    b.wait_for_text("Uploaded from-web.txt").await;
    b.screenshot(shots, "web-files.png").await;
    c.wait("the upload arrives on dev0", || {
        std::fs::read(c.p(0, "from-web.txt")).ok().as_deref()
            == Some(&b"uploaded in a browser\n"[..])
    });

    // Download through the browser.
    b.click_link("notes.txt").await;
    b.wait_for_text("Versions").await;
    b.click("a.button[download]").await;
    assert_eq!(b.downloaded("notes.txt").await, b"written on dev0\n");

    // Restore: dev0 edits the file, the browser brings the first version back, dev0 gets it.
    std::fs::write(c.p(0, "notes.txt"), "edited on dev0\n").unwrap();
    c.wait("dev0 sends its edit", || idle(&c.devices[0].home));
    let page = b.url().await;
    b.goto(&page).await;
    b.wait_for_text("3 (current)").await;
    b.click("button[aria-label='Restore version 2']").await;
    b.wait_for_text("Restored notes.txt to version 2").await;
    b.screenshot(shots, "web-file.png").await;
    c.wait("the restored version arrives on dev0", || {
        std::fs::read(c.p(0, "notes.txt")).ok().as_deref() == Some(&b"written on dev0\n"[..])
    });

    // The folder at phone width.
    b.set_size(390, 844).await;
    b.goto(&format!("{url}/web/files")).await;
    b.wait_for_text("from-web.txt").await;
    b.screenshot(shots, "web-files-phone.png").await;
    b.set_size(1100, 800).await;

    // Devices: dev0 is online; revoking it signs it out.
    b.goto(&format!("{url}/web/devices")).await;
    b.wait_for_text("dev0").await;
    b.screenshot(shots, "web-devices.png").await;
    b.click("button[aria-label='Revoke dev0']").await;
    b.wait_for_text("Revoked dev0").await;
    let devices = c.srv.admin().admin_list_devices("ann").await.unwrap();
    assert!(
        devices.iter().all(|d| d.name != "dev0" || d.revoked),
        "{devices:?}"
    );

    // A share link, opened after signing out.
    b.goto(&format!("{url}/web/files")).await;
    b.click_link("from-web.txt").await;
    b.wait_for_text("Create link").await;
    b.click("form[action$='/share'] button[type=submit]").await;
    let page = b.wait_for_text("shown only once").await;
    let at = page.find("/s/").unwrap();
    let link = format!("{url}{}", &page[at..at + 67]);
    b.screenshot(shots, "web-share-created.png").await;

    // Sign out: the pages send the browser back to the sign-in.
    b.click("form.signout button").await;
    b.wait_for_text("Sign in").await;
    b.goto(&format!("{url}/web/devices")).await;
    assert!(b.url().await.ends_with("/web/login"), "{}", b.url().await);
    b.goto(&link).await;
    b.wait_for_text("Shared with you").await;
    b.screenshot(shots, "web-share.png").await;
    b.click("a.button[download]").await;
    assert_eq!(
        b.downloaded("from-web.txt").await,
        b"uploaded in a browser\n"
    );
}

/// Makes a share link of `id` on ann's web session; returns its token.
async fn share(w: &WebClient, id: &str, form: &[(&str, &str)]) -> String {
    let csrf = w.csrf().await;
    let mut f = vec![("csrf", csrf.as_str())];
    f.extend_from_slice(form);
    let r = w.post(&format!("/web/object/{id}/share"), &f).await;
    let st = r.status();
    let page = r.text().await.unwrap();
    assert_eq!(st, StatusCode::OK, "{page}");
    let at = page.find("/s/").expect("the link is shown") + 3;
    page[at..at + 64].to_string()
}

/// The revoke form's link hashes on a /web/shares page.
fn share_hashes(page: &str) -> Vec<String> {
    page.match_indices("/web/shares/")
        .map(|(i, _)| page[i + 12..i + 76].to_string())
        .collect()
}

#[tokio::test]
async fn share_links_are_read_only_scoped_revocable_expiring_and_their_users_alone() {
    let (s, api, w, file, dir) = ann_with_files().await;
    let csrf = w.csrf().await;
    let r = w.upload(&dir, b"inner.txt", b"inside", Some(&csrf)).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let anon = WebClient::new(&s.url);

    // A file link: seen and downloaded (with Range) without signing in.
    let t_file = share(&w, &file, &[]).await;
    let (st, page) = anon.text(&format!("/s/{t_file}")).await;
    assert_eq!(st, StatusCode::OK);
    assert!(page.contains("a.txt") && !page.contains("docs"), "{page}");
    let r = anon.get(&format!("/s/{t_file}/download")).await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"hello web");
    let r = anon
        .get_range(&format!("/s/{t_file}/download"), "bytes=0-4")
        .await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"hello");
    // A file link reaches nothing else, by any id.
    for p in [
        format!("/s/{t_file}/download?file={file}"),
        format!("/s/{t_file}?dir={dir}"),
    ] {
        let r = anon.get(&p).await;
        assert!(
            r.status() == StatusCode::NOT_FOUND || !r.text().await.unwrap().contains("inner"),
            "{p}"
        );
    }

    // A folder link with a password: locked until the password is given.
    let t_dir = share(&w, &dir, &[("password", "share-pass-1")]).await;
    let (st, page) = anon.text(&format!("/s/{t_dir}")).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert!(
        page.contains("password") && !page.contains("inner.txt"),
        "{page}"
    );
    let (_, folder) = w.text(&format!("/web/files/{dir}")).await;
    let inner = id_in(&folder, "inner.txt");
    let r = anon.get(&format!("/s/{t_dir}/download?file={inner}")).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "locked downloads too");
    let r = anon
        .post(
            &format!("/s/{t_dir}/unlock"),
            &[("password", "wrong-password")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().get("set-cookie").is_none());
    let r = anon
        .post(
            &format!("/s/{t_dir}/unlock"),
            &[("password", "share-pass-1")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let unlock = cookie.split(';').next().unwrap().to_string();
    let get = |p: String| {
        anon.http
            .get(format!("{}{p}", s.url))
            .header("cookie", unlock.clone())
            .send()
    };
    let page = get(format!("/s/{t_dir}"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("inner.txt"), "{page}");
    let r = get(format!("/s/{t_dir}/download?file={inner}"))
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"inside");
    // Nothing outside the shared folder, even unlocked: not its parent, not a file beside it.
    for p in [
        format!("/s/{t_dir}/download?file={file}"),
        format!("/s/{t_dir}?dir={ROOT}"),
        format!("/s/{t_dir}?dir={file}"),
    ] {
        assert_eq!(
            get(p.clone()).await.unwrap().status(),
            StatusCode::NOT_FOUND,
            "{p}"
        );
    }
    // The unlock cookie of one link does not open another.
    let t_dir2 = share(&w, &dir, &[("password", "share-pass-1")]).await;
    assert_eq!(
        get(format!("/s/{t_dir2}")).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );

    // Links are their user's alone: bob neither sees nor revokes ann's.
    let (_, mine) = w.text("/web/shares").await;
    let hashes = share_hashes(&mine);
    assert_eq!(hashes.len(), 3, "{mine}");
    s.device("bob", "phone").await;
    let bob = WebClient::signed_in(&s.url, "bob", PW).await;
    let bob_csrf = bob.csrf().await;
    let (_, theirs) = bob.text("/web/shares").await;
    assert!(share_hashes(&theirs).is_empty(), "{theirs}");
    for h in &hashes {
        let r = bob
            .post(&format!("/web/shares/{h}/revoke"), &[("csrf", &bob_csrf)])
            .await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }
    let r = bob
        .post(&format!("/web/object/{file}/share"), &[("csrf", &bob_csrf)])
        .await;
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "bob cannot share ann's file"
    );
    assert_eq!(
        anon.get(&format!("/s/{t_file}")).await.status(),
        StatusCode::OK
    );

    // A revoked link is refused at once.
    let first = hashes[0].clone();
    let r = w
        .post(&format!("/web/shares/{first}/revoke"), &[("csrf", &csrf)])
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let (st, page) = anon.text(&format!("/s/{t_file}")).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert!(page.contains("does not exist or was revoked"), "{page}");
    assert_eq!(
        anon.get(&format!("/s/{t_file}/download")).await.status(),
        StatusCode::NOT_FOUND
    );

    // An expired link is refused.
    let t_short = share(
        &w,
        &file,
        &[("expires_in", "1"), ("expires_unit", "seconds")],
    )
    .await;
    assert_eq!(
        anon.get(&format!("/s/{t_short}")).await.status(),
        StatusCode::OK
    );
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let (st, page) = anon.text(&format!("/s/{t_short}")).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert!(page.contains("expired"), "{page}");
    assert_eq!(
        anon.get(&format!("/s/{t_short}/download")).await.status(),
        StatusCode::NOT_FOUND
    );
    // A made-up token.
    assert_eq!(
        anon.get(&format!("/s/{}", "ab".repeat(32))).await.status(),
        StatusCode::NOT_FOUND
    );
    // Links change nothing in the tree.
    let names = state_of(&api).await.to_string();
    assert!(names.contains("inner.txt") && names.contains("a.txt"));
}
