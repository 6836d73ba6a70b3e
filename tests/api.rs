//! API tests against the real `deltadrive server` binary (see `tests/common/server.rs`).
//! Each test starts its own server on 127.0.0.1 with a temporary data folder.

mod common;

use std::time::{Duration, Instant};

use common::server::TestServer;
use deltadrive::changelog::{
    decode_transaction, empty_hash, encode_changelog, ChangeLog, Delta, Name, ObjectId, ObjectKind,
    Op, OpKind, Transaction,
};
use deltadrive::client::{Client, ClientError};
use reqwest::StatusCode;

/// A plain reqwest client (crypto provider installed first).
fn raw() -> reqwest::Client {
    deltadrive::server::install_crypto_provider();
    reqwest::Client::new()
}

fn status(e: &ClientError) -> StatusCode {
    e.status()
        .unwrap_or_else(|| panic!("expected an API error, got {e}"))
}

fn tx(ops: Vec<Op>) -> Transaction {
    Transaction {
        id: rand::random(),
        device: "test-device".into(),
        time_ms: 1_700_000_000_000,
        ops,
    }
}

fn create(id: ObjectId, parent: ObjectId, name: &str, kind: ObjectKind) -> Op {
    Op {
        object: id,
        base_version: 0,
        new_version: 1,
        kind: OpKind::Create {
            parent,
            name: Name::new(name.as_bytes().to_vec()).expect("valid name"),
            kind,
            mode: 0o644,
            mtime_ns: 1,
        },
    }
}

fn write(id: ObjectId, base_version: u64, base: &[u8], new: &[u8], delta: Delta) -> Op {
    Op {
        object: id,
        base_version,
        new_version: base_version + 1,
        kind: OpKind::Write {
            base_hash: *blake3::hash(base).as_bytes(),
            new_hash: *blake3::hash(new).as_bytes(),
            new_size: new.len() as u64,
            delta,
        },
    }
}

fn op(id: ObjectId, base_version: u64, kind: OpKind) -> Op {
    Op {
        object: id,
        base_version,
        new_version: base_version + 1,
        kind,
    }
}

/// Appends a log of the given transactions, keyed by the first transaction id.
async fn append(c: &Client, txs: Vec<Transaction>) -> Result<(u64, u64), ClientError> {
    let key = hex::encode(txs[0].id);
    let log = ChangeLog { transactions: txs };
    c.append(&key, encode_changelog(&log))
        .await
        .map(|r| (r.first_seq, r.last_seq))
}

/// A fresh file object at the root, created in its own transaction.
async fn new_file(c: &Client, name: &str) -> ObjectId {
    let id = ObjectId::random();
    append(
        c,
        vec![tx(vec![create(id, ObjectId::ROOT, name, ObjectKind::File)])],
    )
    .await
    .expect("create file");
    id
}

async fn raw_post_log(
    s: &TestServer,
    token: &str,
    key: Option<&str>,
    body: Vec<u8>,
) -> reqwest::Response {
    let mut r = raw()
        .post(format!("{}/v1/log", s.url))
        .bearer_auth(token)
        .body(body);
    if let Some(k) = key {
        r = r.header("idempotency-key", k);
    }
    r.send().await.expect("request")
}

async fn snapshot_ids(c: &Client) -> (u64, Vec<String>) {
    let s = c.snapshot().await.expect("snapshot");
    let head = s["head"].as_u64().expect("head");
    let ids = s["objects"]
        .as_array()
        .expect("objects")
        .iter()
        .map(|o| o["id"].as_str().expect("id").to_string())
        .collect();
    (head, ids)
}

async fn login_token(s: &TestServer, user: &str, device: &str) -> String {
    let admin = s.admin();
    let _ = admin.add_user(user, "password-123").await;
    s.anon()
        .login(user, "password-123", device)
        .await
        .expect("login")
        .token
}

#[tokio::test]
async fn users_and_devices_lifecycle() {
    let s = TestServer::start();
    let admin = s.admin();
    s.anon().health().await.expect("healthz");
    admin
        .add_user("alice", "password-123")
        .await
        .expect("add alice");
    admin
        .add_user("bob", "password-456")
        .await
        .expect("add bob");
    let e = admin.add_user("alice", "password-123").await.unwrap_err();
    assert_eq!(status(&e), StatusCode::CONFLICT);
    let names: Vec<String> = admin
        .list_users()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.name)
        .collect();
    assert_eq!(names, vec!["alice", "bob"]);

    let l1 = s
        .anon()
        .login("alice", "password-123", "laptop")
        .await
        .expect("login");
    assert_eq!(l1.token.len(), 64);
    assert!(l1.storage_url.starts_with("http://127.0.0.1:"));
    let laptop = s.anon().with_token(&l1.token);
    let me = laptop.me().await.unwrap();
    assert_eq!(me["user"], "alice");
    assert_eq!(me["device"], "laptop");
    let _phone = s
        .anon()
        .login("alice", "password-123", "phone")
        .await
        .unwrap();
    let devs = admin.admin_list_devices("alice").await.unwrap();
    assert_eq!(devs.len(), 2);
    assert_eq!(laptop.list_devices().await.unwrap().len(), 2);

    // Re-login of the same device name: same id, new token, old token refused.
    let l2 = s
        .anon()
        .login("alice", "password-123", "laptop")
        .await
        .unwrap();
    assert_eq!(l2.device_id, l1.device_id);
    assert_ne!(l2.token, l1.token);
    assert_eq!(
        status(&laptop.me().await.unwrap_err()),
        StatusCode::UNAUTHORIZED
    );
    let laptop = s.anon().with_token(&l2.token);
    laptop.me().await.unwrap();

    // Wrong password.
    let e = s
        .anon()
        .login("alice", "wrong-password", "x")
        .await
        .unwrap_err();
    assert_eq!(status(&e), StatusCode::UNAUTHORIZED);
    let e = s
        .anon()
        .login("nobody", "password-123", "x")
        .await
        .unwrap_err();
    assert_eq!(status(&e), StatusCode::UNAUTHORIZED);

    // Revoke by admin: refused at once.
    admin.admin_revoke_device("alice", "laptop").await.unwrap();
    assert_eq!(
        status(&laptop.me().await.unwrap_err()),
        StatusCode::UNAUTHORIZED
    );
    let devs = admin.admin_list_devices("alice").await.unwrap();
    assert!(devs.iter().any(|d| d.name == "laptop" && d.revoked));

    // A device revokes another device of its user.
    let l3 = s
        .anon()
        .login("alice", "password-123", "tablet")
        .await
        .unwrap();
    let tablet = s.anon().with_token(&l3.token);
    let l4 = s
        .anon()
        .login("alice", "password-123", "desktop")
        .await
        .unwrap();
    tablet.revoke_device("desktop").await.unwrap();
    assert_eq!(
        status(&s.anon().with_token(&l4.token).me().await.unwrap_err()),
        StatusCode::UNAUTHORIZED
    );

    // Removing a user removes their devices and data.
    new_file(&tablet, "f").await;
    admin.remove_user("alice").await.unwrap();
    assert_eq!(
        status(&tablet.me().await.unwrap_err()),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status(&admin.remove_user("alice").await.unwrap_err()),
        StatusCode::NOT_FOUND
    );
    admin.add_user("alice", "password-789").await.unwrap();
    let fresh = s.anon().with_token(
        s.anon()
            .login("alice", "password-789", "laptop")
            .await
            .unwrap()
            .token,
    );
    assert_eq!(snapshot_ids(&fresh).await, (0, vec![]));

    // Bad names.
    for bad in ["a/b", "..", "", ".hidden", "x y"] {
        let e = admin.add_user(bad, "password-123").await.unwrap_err();
        assert!(status(&e).is_client_error(), "{bad:?}: {e}");
    }
    let e = admin.add_user("shortpw", "123").await.unwrap_err();
    assert_eq!(status(&e), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn refusals() {
    let s = TestServer::start();
    let alice_token = login_token(&s, "alice", "laptop").await;
    let bob_token = login_token(&s, "bob", "laptop").await;
    let alice = s.anon().with_token(&alice_token);
    let bob = s.anon().with_token(&bob_token);

    // No token, bad token.
    assert_eq!(
        status(&s.anon().me().await.unwrap_err()),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status(&s.anon().snapshot().await.unwrap_err()),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status(&s.anon().list_users().await.unwrap_err()),
        StatusCode::UNAUTHORIZED
    );
    let bad = s.anon().with_token("0".repeat(64));
    assert_eq!(
        status(&bad.me().await.unwrap_err()),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status(&bad.list_users().await.unwrap_err()),
        StatusCode::UNAUTHORIZED
    );
    // Admin route with a device token, device route with the admin token.
    assert_eq!(
        status(&alice.list_users().await.unwrap_err()),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(&alice.add_user("eve", "password-123").await.unwrap_err()),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(&s.admin().me().await.unwrap_err()),
        StatusCode::FORBIDDEN
    );

    // Another user's data: bob cannot see alice's object or revoke her devices.
    let f = new_file(&alice, "secret").await;
    let e = bob.content(&f.to_hex(), None, None).await.unwrap_err();
    assert_eq!(status(&e), StatusCode::NOT_FOUND);
    let e = bob.history(&f.to_hex()).await.unwrap_err();
    assert_eq!(status(&e), StatusCode::NOT_FOUND);
    assert_eq!(snapshot_ids(&bob).await, (0, vec![]));
    assert_eq!(bob.read_log(0, 100).await.unwrap().entries.len(), 0);
    let e = bob.revoke_device("laptop").await;
    // bob's own "laptop" is revoked, never alice's.
    assert!(e.is_ok());
    alice.me().await.expect("alice's laptop still works");
    assert_eq!(
        status(&bob.me().await.unwrap_err()),
        StatusCode::UNAUTHORIZED
    );

    // A revoked token is refused at once for storage too.
    s.admin()
        .admin_revoke_device("alice", "laptop")
        .await
        .unwrap();
    assert_eq!(
        status(&alice.snapshot().await.unwrap_err()),
        StatusCode::UNAUTHORIZED
    );
    let e = append(
        &alice,
        vec![tx(vec![create(
            ObjectId::random(),
            ObjectId::ROOT,
            "x",
            ObjectKind::File,
        )])],
    )
    .await
    .unwrap_err();
    assert_eq!(status(&e), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn append_read_and_paging() {
    let s = TestServer::start();
    let c = s.device("alice", "laptop").await;
    let dir = ObjectId::random();
    let r = append(
        &c,
        vec![tx(vec![create(
            dir,
            ObjectId::ROOT,
            "docs",
            ObjectKind::Directory,
        )])],
    )
    .await
    .unwrap();
    assert_eq!(r, (1, 1));
    let mut sent = Vec::new();
    for i in 0..24 {
        let t1 = tx(vec![create(
            ObjectId::random(),
            dir,
            &format!("a{i}"),
            ObjectKind::File,
        )]);
        let t2 = tx(vec![create(
            ObjectId::random(),
            dir,
            &format!("b{i}"),
            ObjectKind::File,
        )]);
        sent.push(t1.clone());
        sent.push(t2.clone());
        let r = append(&c, vec![t1, t2]).await.unwrap();
        assert_eq!(r, (2 + 2 * i, 3 + 2 * i));
    }
    // Page through 10 at a time.
    let mut after = 0;
    let mut got = Vec::new();
    loop {
        let page = c.read_log(after, 10).await.unwrap();
        assert_eq!(page.head, 49);
        if page.entries.is_empty() {
            break;
        }
        assert!(page.entries.len() <= 10);
        for (seq, bytes) in page.entries {
            assert_eq!(seq, after + 1, "gapless, in order");
            after = seq;
            got.push(decode_transaction(&bytes).expect("decodes"));
        }
    }
    assert_eq!(got.len(), 49);
    assert_eq!(&got[1..], &sent[..]);
    let (head, ids) = snapshot_ids(&c).await;
    assert_eq!(head, 49);
    assert_eq!(ids.len(), 49);
}

#[tokio::test]
async fn long_poll_wakes_on_append_and_returns_at_timeout() {
    let s = TestServer::start();
    let a = s.device("alice", "laptop").await;
    let b = s.anon().with_token(login_token(&s, "alice", "phone").await);
    let other = s.device("bob", "laptop").await;

    // Nothing comes: returns at the timeout with the unchanged head.
    let t = Instant::now();
    assert_eq!(b.wait(0, Duration::from_millis(700)).await.unwrap(), 0);
    assert!(
        t.elapsed() >= Duration::from_millis(600),
        "{:?}",
        t.elapsed()
    );

    // Wakes on an append by another device of the same user.
    let waiter = tokio::spawn(async move {
        let t = Instant::now();
        let h = b.wait(0, Duration::from_secs(30)).await.unwrap();
        (h, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Another user's append does not wake it.
    new_file(&other, "x").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished());
    new_file(&a, "f").await;
    let (h, took) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(h, 1);
    assert!(took < Duration::from_secs(10));

    // Already past: answers at once.
    let t = Instant::now();
    assert_eq!(a.wait(0, Duration::from_secs(30)).await.unwrap(), 1);
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn stale_base_is_refused_naming_the_object() {
    let s = TestServer::start();
    let c = s.device("alice", "laptop").await;
    let f = new_file(&c, "f").await;
    append(
        &c,
        vec![tx(vec![write(
            f,
            1,
            b"",
            b"one",
            Delta::Whole(b"one".to_vec()),
        )])],
    )
    .await
    .unwrap();
    // A second device still at version 1.
    let e = append(
        &c,
        vec![tx(vec![write(
            f,
            1,
            b"",
            b"two",
            Delta::Whole(b"two".to_vec()),
        )])],
    )
    .await
    .unwrap_err();
    assert_eq!(status(&e), StatusCode::CONFLICT);
    let ClientError::Api {
        body: Some(body), ..
    } = &e
    else {
        panic!("{e}")
    };
    let stale = body["stale"].as_array().expect("stale list");
    assert_eq!(stale.len(), 1);
    assert_eq!(stale[0]["object"], f.to_hex());
    assert_eq!(stale[0]["expected"], 1);
    assert_eq!(stale[0]["current"], 2);
    // Create of an existing id is stale too.
    let e = append(
        &c,
        vec![tx(vec![create(f, ObjectId::ROOT, "g", ObjectKind::File)])],
    )
    .await
    .unwrap_err();
    assert_eq!(status(&e), StatusCode::CONFLICT);
    assert_eq!(c.read_log(0, 100).await.unwrap().head, 2);
    assert_eq!(c.content(&f.to_hex(), None, None).await.unwrap(), b"one");
}

#[tokio::test]
async fn idempotent_retry_is_stored_once() {
    let s = TestServer::start();
    let c = s.device("alice", "laptop").await;
    new_file(&c, "first").await;
    let t = tx(vec![create(
        ObjectId::random(),
        ObjectId::ROOT,
        "x",
        ObjectKind::File,
    )]);
    let key = hex::encode(t.id);
    let body = encode_changelog(&ChangeLog {
        transactions: vec![t],
    });
    let r1 = c.append(&key, body.clone()).await.unwrap();
    let r2 = c.append(&key, body.clone()).await.unwrap();
    assert_eq!(r1, r2);
    assert_eq!((r1.first_seq, r1.last_seq), (2, 2));
    let page = c.read_log(0, 100).await.unwrap();
    assert_eq!(page.head, 2);
    assert_eq!(page.entries.len(), 2);
    // The same key with another body is refused.
    let other = encode_changelog(&ChangeLog {
        transactions: vec![tx(vec![create(
            ObjectId::random(),
            ObjectId::ROOT,
            "y",
            ObjectKind::File,
        )])],
    });
    assert_eq!(
        status(&c.append(&key, other).await.unwrap_err()),
        StatusCode::CONFLICT
    );
    assert_eq!(c.read_log(0, 100).await.unwrap().head, 2);
    // Missing key → 400.
    let tok = login_token(&s, "alice", "phone").await;
    let r = raw_post_log(&s, &tok, None, body).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_log_with_an_invalid_transaction_stores_nothing() {
    let s = TestServer::start();
    let c = s.device("alice", "laptop").await;
    new_file(&c, "taken").await;
    let good = ObjectId::random();
    let t1 = tx(vec![create(good, ObjectId::ROOT, "good", ObjectKind::File)]);
    // Name already taken in the root: a conflict with the current tree.
    let t2 = tx(vec![create(
        ObjectId::random(),
        ObjectId::ROOT,
        "taken",
        ObjectKind::File,
    )]);
    let e = append(&c, vec![t1.clone(), t2]).await.unwrap_err();
    assert_eq!(status(&e), StatusCode::CONFLICT);
    let (head, ids) = snapshot_ids(&c).await;
    assert_eq!(head, 1);
    assert!(!ids.contains(&good.to_hex()));
    // Parent missing.
    let t2 = tx(vec![create(
        ObjectId::random(),
        ObjectId::random(),
        "orphan",
        ObjectKind::File,
    )]);
    assert_eq!(
        status(&append(&c, vec![t1.clone(), t2]).await.unwrap_err()),
        StatusCode::CONFLICT
    );
    // Write whose base hash does not match the content.
    let t2 = tx(vec![write(
        good,
        1,
        b"not-empty",
        b"x",
        Delta::Whole(b"x".to_vec()),
    )]);
    assert_eq!(
        status(&append(&c, vec![t1.clone(), t2]).await.unwrap_err()),
        StatusCode::CONFLICT
    );
    let (head, ids) = snapshot_ids(&c).await;
    assert_eq!(head, 1);
    assert!(!ids.contains(&good.to_hex()));
    // The same first transaction alone goes through.
    assert_eq!(append(&c, vec![t1]).await.unwrap(), (2, 2));
}

#[tokio::test]
async fn tree_rules() {
    let s = TestServer::start();
    let c = s.device("alice", "laptop").await;
    let a = ObjectId::random();
    let b = ObjectId::random();
    let f = ObjectId::random();
    append(
        &c,
        vec![tx(vec![
            create(a, ObjectId::ROOT, "A", ObjectKind::Directory),
            create(b, a, "B", ObjectKind::Directory),
            create(f, b, "f", ObjectKind::File),
        ])],
    )
    .await
    .unwrap();
    let mv = |obj, v, parent, name: &str| {
        op(
            obj,
            v,
            OpKind::Rename {
                new_parent: parent,
                new_name: Name::new(name.as_bytes().to_vec()).unwrap(),
            },
        )
    };
    // Cycle: A into B (inside A).
    assert_eq!(
        status(
            &append(&c, vec![tx(vec![mv(a, 1, b, "A")])])
                .await
                .unwrap_err()
        ),
        StatusCode::CONFLICT
    );
    // Into itself: a rule of the format, refused before the tree is looked at.
    let e = append(&c, vec![tx(vec![mv(a, 1, a, "A")])])
        .await
        .unwrap_err();
    assert!(status(&e).is_client_error(), "{e}");
    // Into a file.
    assert_eq!(
        status(
            &append(&c, vec![tx(vec![mv(b, 1, f, "B")])])
                .await
                .unwrap_err()
        ),
        StatusCode::CONFLICT
    );
    // Create inside a file.
    let e = append(
        &c,
        vec![tx(vec![create(
            ObjectId::random(),
            f,
            "x",
            ObjectKind::File,
        )])],
    )
    .await
    .unwrap_err();
    assert_eq!(status(&e), StatusCode::CONFLICT);
    // Delete of a non-empty folder.
    assert_eq!(
        status(
            &append(&c, vec![tx(vec![op(a, 1, OpKind::Delete)])])
                .await
                .unwrap_err()
        ),
        StatusCode::CONFLICT
    );
    // Write to a folder.
    let e = append(
        &c,
        vec![tx(vec![write(
            a,
            1,
            b"",
            b"x",
            Delta::Whole(b"x".to_vec()),
        )])],
    )
    .await
    .unwrap_err();
    assert_eq!(status(&e), StatusCode::CONFLICT);
    // Deleting the whole tree bottom-up in one transaction works; so does a valid move.
    append(&c, vec![tx(vec![mv(f, 1, ObjectId::ROOT, "f2")])])
        .await
        .unwrap();
    append(
        &c,
        vec![tx(vec![op(b, 1, OpKind::Delete), op(a, 1, OpKind::Delete)])],
    )
    .await
    .unwrap();
    let (head, ids) = snapshot_ids(&c).await;
    assert_eq!(head, 3);
    assert_eq!(ids, vec![f.to_hex()]);
    let snap = c.snapshot().await.unwrap();
    assert_eq!(snap["objects"][0]["name"], "f2");
    assert_eq!(snap["objects"][0]["version"], 2);
    // The name freed by the move can be reused, the new one cannot.
    append(
        &c,
        vec![tx(vec![create(
            ObjectId::random(),
            ObjectId::ROOT,
            "A",
            ObjectKind::File,
        )])],
    )
    .await
    .unwrap();
    let e = append(
        &c,
        vec![tx(vec![create(
            ObjectId::random(),
            ObjectId::ROOT,
            "f2",
            ObjectKind::File,
        )])],
    )
    .await
    .unwrap_err();
    assert_eq!(status(&e), StatusCode::CONFLICT);
}

#[tokio::test]
async fn bad_input_is_refused_and_the_server_keeps_serving() {
    let s = TestServer::start_with(&["--max-request-bytes", "100000"]);
    let tok = login_token(&s, "alice", "laptop").await;
    let c = s.anon().with_token(&tok);
    let good = encode_changelog(&ChangeLog {
        transactions: vec![tx(vec![create(
            ObjectId::random(),
            ObjectId::ROOT,
            "ok",
            ObjectKind::File,
        )])],
    });
    // Truncated at every tenth length, and garbage.
    for cut in (0..good.len()).step_by(10) {
        let r = raw_post_log(&s, &tok, Some("k-trunc"), good[..cut].to_vec()).await;
        assert!(r.status().is_client_error(), "cut {cut}: {}", r.status());
        let body: serde_json::Value = r.json().await.expect("JSON error body");
        assert!(body["error"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let garbage: Vec<u8> = (0..5000).map(|_| rand::random::<u8>()).collect();
    let r = raw_post_log(&s, &tok, Some("k-garbage"), garbage).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Oversized → 413.
    let r = raw_post_log(&s, &tok, Some("k-big"), vec![0u8; 200_000]).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // Names with /, .., NUL, empty: refused, never stored.
    for bad in [&b"a/b"[..], b"..", b".", b"a\0b", b""] {
        let log = ChangeLog {
            transactions: vec![tx(vec![Op {
                object: ObjectId::random(),
                base_version: 0,
                new_version: 1,
                kind: OpKind::Create {
                    parent: ObjectId::ROOT,
                    name: Name(bad.to_vec()),
                    kind: ObjectKind::File,
                    mode: 0o644,
                    mtime_ns: 0,
                },
            }])],
        };
        let r = raw_post_log(&s, &tok, Some("k-name"), encode_changelog(&log)).await;
        assert!(
            r.status() == StatusCode::BAD_REQUEST || r.status() == StatusCode::UNPROCESSABLE_ENTITY,
            "{bad:?}: {}",
            r.status()
        );
    }
    // Bad object ids, ranges and queries.
    let e = c.content("zz", None, None).await.unwrap_err();
    assert_eq!(status(&e), StatusCode::BAD_REQUEST);
    let r = raw()
        .get(format!("{}/v1/log?after=-1", s.url))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = raw()
        .post(format!("{}/v1/admin/users", s.url))
        .bearer_auth(&s.admin_token)
        .body("{not json")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Still serving; nothing was stored.
    assert_eq!(c.read_log(0, 10).await.unwrap().head, 0);
    assert_eq!(
        append(
            &c,
            vec![tx(vec![create(
                ObjectId::random(),
                ObjectId::ROOT,
                "ok",
                ObjectKind::File
            )])]
        )
        .await
        .unwrap(),
        (1, 1)
    );
}

#[tokio::test]
async fn content_from_whole_ranges_and_rsync_deltas_and_history() {
    let s = TestServer::start_with(&["--history-versions", "3"]);
    let c = s.device("alice", "laptop").await;
    let f = new_file(&c, "f.bin").await;
    let id = f.to_hex();
    assert_eq!(c.content(&id, None, None).await.unwrap(), b"");

    // Whole: 2.5 MiB so the content spans three chunks.
    let v1: Vec<u8> = (0..(5 << 19)).map(|i: u32| (i * 7 % 251) as u8).collect();
    append(
        &c,
        vec![tx(vec![write(f, 1, b"", &v1, Delta::Whole(v1.clone()))])],
    )
    .await
    .unwrap();
    assert_eq!(c.content(&id, None, None).await.unwrap(), v1);

    // Ranges: overwrite in the second chunk and extend.
    let mut v2 = v1.clone();
    v2[1_500_000..1_500_010].copy_from_slice(b"0123456789");
    v2.resize(v1.len() + 100, 0);
    v2[v1.len() + 50..v1.len() + 53].copy_from_slice(b"end");
    let ranges = Delta::Ranges {
        new_size: v2.len() as u64,
        ranges: vec![
            (1_500_000, b"0123456789".to_vec()),
            (v1.len() as u64 + 50, b"end".to_vec()),
        ],
    };
    append(&c, vec![tx(vec![write(f, 2, &v1, &v2, ranges)])])
        .await
        .unwrap();
    assert_eq!(c.content(&id, None, None).await.unwrap(), v2);

    // Rsync.
    let mut v3 = v2.clone();
    v3.splice(1000..1000, b"inserted bytes".iter().copied());
    let sig = fast_rsync::Signature::calculate(
        &v2,
        fast_rsync::SignatureOptions {
            block_size: 4096,
            crypto_hash_size: 8,
        },
    );
    let mut d = Vec::new();
    fast_rsync::diff(&sig.index(), &v3, &mut d).unwrap();
    append(&c, vec![tx(vec![write(f, 3, &v2, &v3, Delta::Rsync(d))])])
        .await
        .unwrap();
    assert_eq!(c.content(&id, None, None).await.unwrap(), v3);

    // Range request → exactly those bytes.
    let part = c
        .content(&id, None, Some((1_048_570, 1_048_590)))
        .await
        .unwrap();
    assert_eq!(part, &v3[1_048_570..=1_048_590]);
    let r = raw()
        .get(format!("{}/v1/objects/{id}/content", s.url))
        .bearer_auth(login_token(&s, "alice", "phone").await)
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);

    // Truncate, then a corrupt delta (hash mismatch) is refused.
    let v5 = v3[..100].to_vec();
    append(
        &c,
        vec![tx(vec![op(
            f,
            4,
            OpKind::Truncate {
                new_size: 100,
                new_hash: *blake3::hash(&v5).as_bytes(),
            },
        )])],
    )
    .await
    .unwrap();
    assert_eq!(c.content(&id, None, None).await.unwrap(), v5);
    let mut lie = write(f, 5, &v5, b"claimed", Delta::Whole(b"actual".to_vec()));
    if let OpKind::Write { new_size, .. } = &mut lie.kind {
        *new_size = 6;
    }
    let e = append(&c, vec![tx(vec![lie])]).await.unwrap_err();
    assert!(status(&e).is_client_error());

    // History keeps the last 3 content versions (of 1 create + 4 changes).
    let h = c.history(&id).await.unwrap();
    let versions: Vec<u64> = h
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, vec![3, 4, 5]);
    assert_eq!(
        h[0]["device"], "laptop",
        "the token's device, not the claimed one"
    );
    assert_eq!(c.content(&id, Some(3), None).await.unwrap(), v2);
    assert_eq!(c.content(&id, Some(4), None).await.unwrap(), v3);
    let e = c.content(&id, Some(1), None).await.unwrap_err();
    assert_eq!(status(&e), StatusCode::NOT_FOUND);
    // Snapshot carries size and hash.
    let snap = c.snapshot().await.unwrap();
    assert_eq!(snap["objects"][0]["size"], 100);
    assert_eq!(
        snap["objects"][0]["hash"],
        hex::encode(blake3::hash(&v5).as_bytes())
    );
    let _ = empty_hash();
}

/// Writes that the server applies chunk by chunk (1 MiB chunks): several Ranges ops and
/// truncates on one file in one append, across chunk boundaries, then Range reads and history,
/// byte for byte against applying the same deltas in memory.
#[tokio::test]
async fn several_chunked_writes_in_one_append_and_range_reads() {
    const MIB: usize = 1 << 20;
    let s = TestServer::start_with(&["--history-versions", "5"]);
    let c = s.device("alice", "laptop").await;
    let f = new_file(&c, "big.bin").await;
    let id = f.to_hex();
    let v1: Vec<u8> = (0..3 * MIB + 17)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[1])
        .collect();
    append(
        &c,
        vec![tx(vec![write(f, 1, b"", &v1, Delta::Whole(v1.clone()))])],
    )
    .await
    .unwrap();
    // Patch across the first boundary, cut inside chunk 1, grow to 5 MiB + 1 with a write at
    // the end, and cut again: four ops, one append.
    let mut ops = Vec::new();
    let mut content = v1.clone();
    let mut version = 2;
    let deltas = vec![
        (3 * MIB + 17, vec![(MIB as u64 - 4, b"boundary".to_vec())]),
        (MIB + 100, vec![]),
        (5 * MIB + 1, vec![(5 * MIB as u64 - 2, b"end".to_vec())]),
        (4 * MIB + 3, vec![(2 * MIB as u64, vec![7; MIB])]),
    ];
    for (new_size, ranges) in deltas {
        let delta = Delta::Ranges {
            new_size: new_size as u64,
            ranges,
        };
        let next = deltadrive::delta::apply(&content, &delta, usize::MAX).unwrap();
        ops.push(write(f, version, &content, &next, delta));
        content = next;
        version += 1;
    }
    let cut = content[..2 * MIB + 5].to_vec();
    ops.push(op(
        f,
        version,
        OpKind::Truncate {
            new_size: cut.len() as u64,
            new_hash: *blake3::hash(&cut).as_bytes(),
        },
    ));
    let mut grown = cut.clone();
    grown.resize(3 * MIB, 0);
    ops.push(op(
        f,
        version + 1,
        OpKind::Truncate {
            new_size: grown.len() as u64,
            new_hash: *blake3::hash(&grown).as_bytes(),
        },
    ));
    append(&c, vec![tx(ops)]).await.unwrap();
    assert!(c.content(&id, None, None).await.unwrap() == grown);
    for (a, b) in [
        (0, 10),
        (MIB - 3, MIB + 3),
        (2 * MIB, 2 * MIB + 9),
        (3 * MIB - 1, 3 * MIB - 1),
    ] {
        let part = c
            .content(&id, None, Some((a as u64, b as u64)))
            .await
            .unwrap();
        assert_eq!(part, &grown[a..=b], "bytes {a}..={b}");
    }
    // The final version of that append is in history; the one before it too.
    let v = version + 2;
    assert!(c.content(&id, Some(v), None).await.unwrap() == grown);
    assert!(c.content(&id, Some(2), None).await.unwrap() == v1);
    // A Ranges op whose result does not match its hash is refused.
    let bad = op(
        f,
        v,
        OpKind::Write {
            base_hash: *blake3::hash(&grown).as_bytes(),
            new_hash: *blake3::hash(b"something else").as_bytes(),
            new_size: grown.len() as u64,
            delta: Delta::Ranges {
                new_size: grown.len() as u64,
                ranges: vec![(2 * MIB as u64, b"x".to_vec())],
            },
        },
    );
    let e = append(&c, vec![tx(vec![bad])]).await.unwrap_err();
    assert_eq!(status(&e), StatusCode::UNPROCESSABLE_ENTITY);
    // Followed by an op on the same object in the same transaction, the refusal is still the
    // write's (422), not a stale base for the op after it (409 made clients rebase forever).
    let bad = op(
        f,
        v,
        OpKind::Write {
            base_hash: *blake3::hash(&grown).as_bytes(),
            new_hash: *blake3::hash(b"something else").as_bytes(),
            new_size: grown.len() as u64,
            delta: Delta::Ranges {
                new_size: grown.len() as u64,
                ranges: vec![(2 * MIB as u64, b"x".to_vec())],
            },
        },
    );
    let then = op(
        f,
        v + 1,
        OpKind::SetAttr {
            mode: Some(0o600),
            mtime_ns: None,
        },
    );
    let e = append(&c, vec![tx(vec![bad, then])]).await.unwrap_err();
    assert_eq!(status(&e), StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_during_concurrent_appends_keeps_every_acknowledged_append() {
    let mut s = TestServer::start();
    let mut clients = Vec::new();
    for d in 0..4 {
        clients.push(s.device("alice", &format!("dev{d}")).await);
    }
    let acked = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<(u64, [u8; 16])>::new()));
    let mut tasks = Vec::new();
    for (d, c) in clients.into_iter().enumerate() {
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let t = tx(vec![create(
                    ObjectId::random(),
                    ObjectId::ROOT,
                    &format!("d{d}-{i}"),
                    ObjectKind::File,
                )]);
                let id = t.id;
                match append(&c, vec![t]).await {
                    Ok((first, _)) => acked.lock().push((first, id)),
                    Err(_) => break,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.kill9();
    for t in tasks {
        let _ = t.await;
    }
    s.restart();
    let c = s
        .anon()
        .with_token(login_token(&s, "alice", "checker").await);
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = c.read_log(after, 1000).await.unwrap();
        if page.entries.is_empty() {
            break;
        }
        for (seq, bytes) in page.entries {
            assert_eq!(seq, after + 1, "gapless");
            after = seq;
            all.push(decode_transaction(&bytes).unwrap().id);
        }
    }
    let acked = acked.lock().clone();
    assert!(
        !acked.is_empty(),
        "some appends were acknowledged before the kill"
    );
    for (seq, id) in &acked {
        assert_eq!(
            all.get((*seq - 1) as usize),
            Some(id),
            "acknowledged seq {seq} present"
        );
    }
    let (head, ids) = snapshot_ids(&c).await;
    assert_eq!(head, after);
    assert_eq!(ids.len() as u64, after);
    // And it keeps working.
    append(
        &c,
        vec![tx(vec![create(
            ObjectId::random(),
            ObjectId::ROOT,
            "after",
            ObjectKind::File,
        )])],
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn metrics_and_graceful_shutdown() {
    let mut s = TestServer::start();
    let c = s.device("alice", "laptop").await;
    new_file(&c, "f").await;
    let text = raw()
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(
            "deltadrive_http_requests_total{method=\"POST\",route=\"/v1/log\",status=\"200\"} 1"
        ),
        "{text}"
    );
    assert!(text.contains("deltadrive_log_appends_total 1"));
    assert!(text.contains("deltadrive_long_polls_open 0"));
    assert_eq!(s.terminate(Duration::from_secs(15)), Some(0));
}

#[test]
fn cli_admin_and_login_write_device_json() {
    let s = TestServer::start();
    let bin = env!("CARGO_BIN_EXE_deltadrive");
    let tmp = tempfile::tempdir().unwrap();
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, "secret-password\n").unwrap();
    let token_file = s.data_dir().join("admin.token");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin).args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let tf = token_file.to_str().unwrap();
    let (ok, _, err) = run(&[
        "admin",
        "--server",
        &s.url,
        "--admin-token-file",
        tf,
        "user",
        "add",
        "carol",
        "--password-file",
        pw.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (ok, out, _) = run(&[
        "admin",
        "--server",
        &s.url,
        "--admin-token-file",
        tf,
        "user",
        "list",
    ]);
    assert!(ok && out.contains("carol"));
    let home = tmp.path().join("home");
    let (ok, _, err) = run(&[
        "login",
        "--server",
        &s.url,
        "--user",
        "carol",
        "--password-file",
        pw.to_str().unwrap(),
        "--device",
        "laptop",
        "--home",
        home.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let df = home.join("device.json");
    assert_eq!(
        std::fs::metadata(&df).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let h = deltadrive::home::Home::resolve(Some(&home)).unwrap();
    let cfg = deltadrive::client::DeviceConfig::load(&h).unwrap();
    assert_eq!(cfg.user, "carol");
    assert_eq!(cfg.device, "laptop");
    assert_eq!(cfg.token.len(), 64);
    let (ok, out, _) = run(&[
        "admin",
        "--server",
        &s.url,
        "--admin-token-file",
        tf,
        "device",
        "list",
        "carol",
    ]);
    assert!(ok && out.contains("laptop"), "{out}");
    let (ok, _, _) = run(&[
        "admin",
        "--server",
        &s.url,
        "--admin-token-file",
        tf,
        "device",
        "revoke",
        "carol",
        "laptop",
    ]);
    assert!(ok);
    // Errors: one line on stderr, non-zero exit.
    let (ok, _, err) = run(&[
        "login",
        "--server",
        &s.url,
        "--user",
        "carol",
        "--password-file",
        tf,
        "--device",
        "x",
        "--home",
        home.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("401"), "{err}");
    let (ok, _, err) = run(&[
        "admin",
        "--server",
        &s.url,
        "--admin-token-file",
        pw.to_str().unwrap(),
        "user",
        "list",
    ]);
    assert!(!ok && err.contains("401"), "{err}");
}

#[tokio::test]
async fn https_with_a_private_ca() {
    let tmp = tempfile::tempdir().unwrap();
    // A private CA and a server certificate it signs (webpki refuses a CA used as the leaf).
    let p = |n: &str| tmp.path().join(n);
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(tmp.path())
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "key.pem",
        "-out",
        "req.csr",
    ]);
    std::fs::write(
        p("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "req.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "cert.pem",
    ]);
    let (cert, key, ca) = (p("cert.pem"), p("key.pem"), p("ca.pem"));
    let s = TestServer::start_full(&[], Some((cert, key, ca.clone())));
    assert!(s.url.starts_with("https://"));
    let c = s.device("alice", "laptop").await;
    new_file(&c, "over-tls").await;
    // Without the CA the server is not trusted.
    let plain = Client::new(&s.url, None, None).unwrap();
    assert!(matches!(
        plain.health().await,
        Err(ClientError::Transport(_))
    ));
    // login --ca-cert through the CLI.
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, "password-123\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_deltadrive"))
        .args([
            "login",
            "--server",
            &s.url,
            "--user",
            "alice",
            "--device",
            "cli",
            "--password-file",
        ])
        .arg(&pw)
        .arg("--ca-cert")
        .arg(&ca)
        .arg("--home")
        .arg(tmp.path().join("home"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
