//! The server's work and memory stay bounded whatever one request asks (`docs/security.md`,
//! "Resource limits"), against the real `deltadrive server` binary on the backend chosen by
//! `DELTADRIVE_TEST_BACKEND` (see `tests/common/server.rs`): an rsync delta asking for far more
//! than its op's size, a truncate to 64 GiB, the per-append work budget, the appends' memory
//! budget (413 and 503 with Retry-After), metrics under made-up methods, and history naming
//! the token's device and the server's time.

mod common;

use std::time::Duration;

use common::server::TestServer;
use deltadrive::changelog::{
    encode_changelog, ChangeLog, Delta, Name, ObjectId, ObjectKind, Op, OpKind, Transaction,
};
use deltadrive::client::{Client, ClientError};
use reqwest::StatusCode;

const MIB: usize = 1 << 20;

fn raw() -> reqwest::Client {
    deltadrive::server::install_crypto_provider();
    reqwest::Client::new()
}

fn status(e: &ClientError) -> StatusCode {
    e.status()
        .unwrap_or_else(|| panic!("expected an API error, got {e}"))
}

fn hash(b: &[u8]) -> [u8; 32] {
    *blake3::hash(b).as_bytes()
}

/// A transaction that claims a device and a time of its own (2023).
fn tx(ops: Vec<Op>) -> Transaction {
    Transaction {
        id: rand::random(),
        device: "claimed-device".into(),
        time_ms: 1_700_000_000_000,
        ops,
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

async fn append(c: &Client, ops: Vec<Op>) -> Result<(), ClientError> {
    let t = tx(ops);
    c.append(
        &hex::encode(t.id),
        encode_changelog(&ChangeLog {
            transactions: vec![t],
        }),
    )
    .await
    .map(|_| ())
}

/// A new file at the root holding `content` (version 2).
async fn file_with(c: &Client, name: &str, content: &[u8]) -> ObjectId {
    let id = ObjectId::random();
    let create = op(
        id,
        0,
        OpKind::Create {
            parent: ObjectId::ROOT,
            name: Name::new(name.as_bytes().to_vec()).expect("name"),
            kind: ObjectKind::File,
            mode: 0o644,
            mtime_ns: 1,
        },
    );
    let write = op(
        id,
        1,
        OpKind::Write {
            base_hash: hash(b""),
            new_hash: hash(content),
            new_size: content.len() as u64,
            delta: Delta::Whole(content.to_vec()),
        },
    );
    append(c, vec![create, write]).await.expect("new file");
    id
}

/// Bytes that do not compress, so the body is as large as the content.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The server process's peak resident memory (VmHWM), in bytes.
fn peak_rss(s: &TestServer) -> u64 {
    let pid = s.pid().expect("server running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmHWM value");
    kib * 1024
}

/// An rsync delta (librsync format) of `copies` copy commands, each of the whole 1 MiB base:
/// about 6 bytes each, asking for `copies` MiB of output.
fn copy_bomb(copies: usize) -> Vec<u8> {
    let mut d = vec![0x72, 0x73, 0x02, 0x36];
    for _ in 0..copies {
        // RS_OP_COPY_N1_N4: a 1-byte offset (0), a 4-byte length (1 MiB).
        d.push(0x47);
        d.push(0);
        d.extend_from_slice(&(MIB as u32).to_be_bytes());
    }
    d.push(0);
    d
}

#[tokio::test]
async fn an_rsync_delta_producing_more_than_its_new_size_is_refused_in_bounded_memory() {
    let s = TestServer::start();
    let c = s.device("alice", "laptop").await;
    let base = noise(MIB, 1);
    let f = file_with(&c, "base.bin", &base).await;
    let before = peak_rss(&s);
    // 110,000 copies of the base, 64 GiB and more, for a result the op says is 2 MiB.
    let bomb = copy_bomb(110_000);
    assert!(bomb.len() > 600_000, "a ~650 KB delta");
    let claimed = [base.clone(), base.clone()].concat();
    let e = append(
        &c,
        vec![op(
            f,
            2,
            OpKind::Write {
                base_hash: hash(&base),
                new_hash: hash(&claimed),
                new_size: claimed.len() as u64,
                delta: Delta::Rsync(bomb),
            },
        )],
    )
    .await
    .expect_err("the delta asks for more than the op's size");
    let after = peak_rss(&s);
    if status(&e) != StatusCode::UNPROCESSABLE_ENTITY || after > before + (256 << 20) {
        s.print_logs();
    }
    assert_eq!(status(&e), StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert!(
        e.to_string().contains("limit"),
        "the answer says the result passed the op's size: {e}"
    );
    assert!(
        after <= before + (256 << 20),
        "the server's peak memory grew from {before} to {after} bytes"
    );
    // Nothing changed, and the server keeps serving.
    let id = f.to_hex();
    assert_eq!(c.content(&id, None, None).await.expect("content"), base);
    let fine = [base.clone(), b"tail".to_vec()].concat();
    append(
        &c,
        vec![op(
            f,
            2,
            OpKind::Write {
                base_hash: hash(&base),
                new_hash: hash(&fine),
                new_size: fine.len() as u64,
                delta: Delta::Ranges {
                    new_size: fine.len() as u64,
                    ranges: vec![(MIB as u64, b"tail".to_vec())],
                },
            },
        )],
    )
    .await
    .expect("a good write after the refusal");
    assert_eq!(c.content(&id, None, None).await.expect("content"), fine);
}

#[tokio::test]
async fn rsync_bases_and_results_over_the_rsync_cap_are_refused() {
    let s = TestServer::start_with(&["--max-rsync-bytes", "1048576"]);
    let c = s.device("alice", "laptop").await;
    let base = noise(2 * MIB, 2);
    let f = file_with(&c, "big.bin", &base).await;
    let mut new = base.clone();
    new[10] ^= 1;
    let sig = fast_rsync::Signature::calculate(
        &base,
        fast_rsync::SignatureOptions {
            block_size: 4096,
            crypto_hash_size: 8,
        },
    );
    let mut d = Vec::new();
    fast_rsync::diff(&sig.index(), &new, &mut d).expect("diff");
    let e = append(
        &c,
        vec![op(
            f,
            2,
            OpKind::Write {
                base_hash: hash(&base),
                new_hash: hash(&new),
                new_size: new.len() as u64,
                delta: Delta::Rsync(d),
            },
        )],
    )
    .await
    .expect_err("a 2 MiB base over a 1 MiB cap");
    assert_eq!(status(&e), StatusCode::PAYLOAD_TOO_LARGE, "{e}");
    assert!(e.to_string().contains("rsync"), "{e}");
}

#[tokio::test]
async fn a_truncate_to_64_gib_is_refused_at_once_by_the_work_budget() {
    let s = TestServer::start();
    let c = s.device("alice", "laptop").await;
    let f = file_with(&c, "sparse", b"hello").await;
    let huge = 64u64 << 30;
    // The hash the op would need is not computed here either: the refusal comes first.
    let e = append(
        &c,
        vec![op(
            f,
            2,
            OpKind::Truncate {
                new_size: huge,
                new_hash: [7; 32],
            },
        )],
    )
    .await
    .expect_err("64 GiB of zeros to hash");
    if status(&e) != StatusCode::PAYLOAD_TOO_LARGE {
        s.print_logs();
    }
    assert_eq!(status(&e), StatusCode::PAYLOAD_TOO_LARGE, "{e}");
    assert!(e.to_string().contains("work"), "{e}");
    // Unchanged; a truncate within the budget still works.
    let id = f.to_hex();
    assert_eq!(c.content(&id, None, None).await.expect("content"), b"hello");
    let mut grown = b"hello".to_vec();
    grown.resize(3 * MIB, 0);
    append(
        &c,
        vec![op(
            f,
            2,
            OpKind::Truncate {
                new_size: grown.len() as u64,
                new_hash: hash(&grown),
            },
        )],
    )
    .await
    .expect("a 3 MiB truncate");
    assert_eq!(c.content(&id, None, None).await.expect("content"), grown);
}

#[tokio::test]
async fn the_work_budget_is_a_server_option() {
    let s = TestServer::start_with(&["--max-append-work-bytes", "4194304"]);
    let c = s.device("alice", "laptop").await;
    file_with(&c, "small", &noise(MIB, 3)).await;
    let id = ObjectId::random();
    let create = op(
        id,
        0,
        OpKind::Create {
            parent: ObjectId::ROOT,
            name: Name::new(b"large".to_vec()).expect("name"),
            kind: ObjectKind::File,
            mode: 0o644,
            mtime_ns: 1,
        },
    );
    let content = noise(5 * MIB, 4);
    let write = op(
        id,
        1,
        OpKind::Write {
            base_hash: hash(b""),
            new_hash: hash(&content),
            new_size: content.len() as u64,
            delta: Delta::Whole(content),
        },
    );
    let e = append(&c, vec![create, write])
        .await
        .expect_err("5 MiB to hash, over 4 MiB of work");
    assert_eq!(status(&e), StatusCode::PAYLOAD_TOO_LARGE, "{e}");
    let snap = c.snapshot().await.expect("snapshot");
    assert_eq!(snap["objects"].as_array().expect("objects").len(), 1);
}

#[tokio::test]
async fn appends_past_the_memory_budget_get_413_alone_and_503_together() {
    // 8 MiB for all appends; an append waits 300 ms for memory held by others.
    let s = TestServer::start_with(&[
        "--append-memory-bytes",
        "8388608",
        "--append-memory-wait-ms",
        "300",
    ]);
    let c = s.device("alice", "laptop").await;
    let token = s
        .anon()
        .login("alice", "password-123", "phone")
        .await
        .expect("login")
        .token;

    // Alone: a 6 MiB body, its decoded copy and its chunks need more than the whole budget.
    let id = ObjectId::random();
    let content = noise(6 * MIB, 5);
    let create = op(
        id,
        0,
        OpKind::Create {
            parent: ObjectId::ROOT,
            name: Name::new(b"f".to_vec()).expect("name"),
            kind: ObjectKind::File,
            mode: 0o644,
            mtime_ns: 1,
        },
    );
    let write = op(
        id,
        1,
        OpKind::Write {
            base_hash: hash(b""),
            new_hash: hash(&content),
            new_size: content.len() as u64,
            delta: Delta::Whole(content),
        },
    );
    let e = append(&c, vec![create.clone(), write])
        .await
        .expect_err("more than the whole budget");
    assert_eq!(status(&e), StatusCode::PAYLOAD_TOO_LARGE, "{e}");
    assert!(e.to_string().contains("memory budget"), "{e}");

    // Together: a body of 7 MiB still arriving holds its memory; a second append waits, then
    // gets 503 with Retry-After.
    let (tx_body, rx_body) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let stream = futures_util::stream::unfold(rx_body, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let slow = raw()
        .post(format!("{}/v1/log", s.url))
        .bearer_auth(&token)
        .header("idempotency-key", "slow")
        .header(reqwest::header::CONTENT_LENGTH, 7 * MIB)
        .body(reqwest::Body::wrap_stream(stream))
        .send();
    let slow = tokio::spawn(slow);
    tx_body.send(Ok(vec![0; 1024])).await.expect("first bytes");
    // A 2 MiB body does not fit the 1 MiB left: it waits, then is refused before it is read.
    // (Until the server has reserved the slow body's memory, it is read and refused as
    // undecodable.)
    let mut refused = None;
    for attempt in 0..50 {
        let r = raw()
            .post(format!("{}/v1/log", s.url))
            .bearer_auth(&token)
            .header("idempotency-key", format!("big-{attempt}"))
            .body(vec![0u8; 2 * MIB])
            .send()
            .await
            .expect("request");
        if r.status() == StatusCode::SERVICE_UNAVAILABLE {
            refused = Some(r);
            break;
        }
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = refused.unwrap_or_else(|| {
        s.print_logs();
        panic!("no 503 while a 7 MiB body held the 8 MiB budget")
    });
    assert_eq!(
        refused
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()),
        Some("2")
    );
    let text = refused.text().await.expect("body");
    assert!(text.contains("busy"), "{text}");

    // The slow body is cut: its memory comes back and appends pass again.
    drop(tx_body);
    let _ = slow.await;
    let other = ObjectId::random();
    let mut second = create;
    second.object = other;
    if let OpKind::Create { name, .. } = &mut second.kind {
        *name = Name::new(b"g".to_vec()).expect("name");
    }
    let mut ok = false;
    for _ in 0..50 {
        match append(&c, vec![second.clone()]).await {
            Ok(()) => {
                ok = true;
                break;
            }
            Err(e) if status(&e) == StatusCode::SERVICE_UNAVAILABLE => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(ok, "appends pass again once the memory is released");
}

#[tokio::test]
async fn made_up_methods_are_counted_as_other() {
    let s = TestServer::start();
    for i in 0..5 {
        let method = reqwest::Method::from_bytes(format!("MADEUP{i}").as_bytes()).expect("method");
        let r = raw()
            .request(method, format!("{}/v1/log", s.url))
            .send()
            .await
            .expect("request");
        assert!(r.status().is_client_error(), "{}", r.status());
    }
    let text = raw()
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(!text.contains("MADEUP"), "{text}");
    let other: u64 = text
        .lines()
        .filter(|l| l.starts_with("deltadrive_http_requests_total{method=\"OTHER\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(other, 5, "{text}");
}

#[tokio::test]
async fn history_names_the_tokens_device_and_the_servers_time() {
    let s = TestServer::start();
    let c = s.device("alice", "laptop").await;
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    // The transaction claims "claimed-device" and a time in 2023.
    let f = file_with(&c, "f", b"content").await;
    let end = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let h = c.history(&f.to_hex()).await.expect("history");
    let entries = h.as_array().expect("entries");
    assert!(!entries.is_empty());
    for e in entries {
        assert_eq!(e["device"], "laptop", "{h}");
        let t = e["time_ms"].as_i64().expect("time");
        assert!(
            start - 1000 <= t && t <= end + 1000,
            "{t} not in {start}..{end}"
        );
    }
}
