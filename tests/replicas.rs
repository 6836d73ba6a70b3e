//! Several stateless server replicas on one PostgreSQL database and one S3 bucket (the
//! `postgres_s3` backend; run under `tests/scaleout-env.sh` with
//! `DELTADRIVE_TEST_BACKEND=postgres_s3`). Skipped, with a message, on the embedded backend,
//! whose folder one process owns.
//!
//! Devices of one user on different replicas converge (a long poll on one wakes for an append on
//! the other); concurrent appends through both keep one gapless order; SIGKILL of one replica
//! loses nothing it acknowledged.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::server::{backend_name, TestServer};
use deltadrive::changelog::{
    decode_transaction, encode_changelog, ChangeLog, Name, ObjectId, ObjectKind, Op, OpKind,
    Transaction,
};
use deltadrive::client::Client;

fn shared_backend() -> bool {
    if backend_name() == "postgres_s3" {
        return true;
    }
    eprintln!(
        "skipped: replicas need a shared backend (DELTADRIVE_TEST_BACKEND=postgres_s3 under \
         tests/scaleout-env.sh)"
    );
    false
}

/// One transaction creating a file at the root.
fn create_tx(name: &str) -> Transaction {
    Transaction {
        id: rand::random(),
        device: "replica-test".into(),
        time_ms: 1_700_000_000_000,
        ops: vec![Op {
            object: ObjectId::random(),
            base_version: 0,
            new_version: 1,
            kind: OpKind::Create {
                parent: ObjectId::ROOT,
                name: Name::new(name.as_bytes().to_vec()).expect("valid name"),
                kind: ObjectKind::File,
                mode: 0o644,
                mtime_ns: 1,
            },
        }],
    }
}

/// Appends one transaction; returns (its seq, its id).
async fn append_one(c: &Client, name: &str) -> Result<(u64, [u8; 16]), String> {
    let t = create_tx(name);
    let id = t.id;
    let body = encode_changelog(&ChangeLog {
        transactions: vec![t],
    });
    c.append(&hex::encode(id), body)
        .await
        .map(|r| (r.first_seq, id))
        .map_err(|e| e.to_string())
}

/// Every (seq, transaction id) of the log, checking the order is gapless from 1.
async fn read_all(c: &Client) -> Vec<[u8; 16]> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = c.read_log(after, 1000).await.expect("read log");
        if page.entries.is_empty() {
            return all;
        }
        for (seq, bytes) in page.entries {
            assert_eq!(seq, after + 1, "the log is gapless");
            after = seq;
            all.push(decode_transaction(&bytes).expect("decode").id);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_on_one_replica_wakes_for_an_append_on_the_other() {
    if !shared_backend() {
        return;
    }
    let a = TestServer::start();
    let b = TestServer::start_replica_of(&a);
    let on_a = a.device("alice", "laptop").await;
    let on_b = b.device("alice", "desktop").await;
    for round in 0..3u64 {
        let waiter = on_b.clone();
        let wait = tokio::spawn(async move {
            let t0 = Instant::now();
            let head = waiter.wait(round, Duration::from_secs(20)).await;
            (head, t0.elapsed())
        });
        // Let the long poll settle on B before appending on A.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (seq, id) = append_one(&on_a, &format!("f{round}"))
            .await
            .expect("append on A");
        assert_eq!(seq, round + 1);
        let (head, took) = wait.await.expect("waiter");
        assert_eq!(head.expect("wait on B"), round + 1, "B woke with A's head");
        assert!(
            took < Duration::from_secs(10),
            "B woke promptly, not at its timeout ({took:?})"
        );
        let page = on_b.read_log(round, 10).await.expect("read on B");
        assert_eq!(page.entries.len(), 1);
        assert_eq!(decode_transaction(&page.entries[0].1).unwrap().id, id);
    }
    // And the other way round.
    let waiter = on_a.clone();
    let wait = tokio::spawn(async move { waiter.wait(3, Duration::from_secs(20)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    append_one(&on_b, "from-b").await.expect("append on B");
    assert_eq!(wait.await.unwrap().expect("wait on A"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_through_two_replicas_keep_one_gapless_order() {
    if !shared_backend() {
        return;
    }
    let a = TestServer::start();
    let b = TestServer::start_replica_of(&a);
    let mut clients = Vec::new();
    for d in 0..6 {
        let s = if d % 2 == 0 { &a } else { &b };
        clients.push(s.device("bob", &format!("dev{d}")).await);
    }
    let mut tasks = Vec::new();
    for (d, c) in clients.iter().cloned().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..15 {
                acked.push(
                    append_one(&c, &format!("d{d}-{i}"))
                        .await
                        .unwrap_or_else(|e| panic!("append d{d}-{i}: {e}")),
                );
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.expect("appender"));
    }
    assert_eq!(acked.len(), 90);
    for reader in [&clients[0], &clients[1]] {
        let all = read_all(reader).await;
        assert_eq!(all.len(), 90, "every append stored exactly once");
        for (seq, id) in &acked {
            assert_eq!(all[(*seq - 1) as usize], *id, "seq {seq} holds its append");
        }
    }
    let mut seqs: Vec<u64> = acked.iter().map(|(s, _)| *s).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=90).collect::<Vec<u64>>(), "one gapless order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_one_replica_loses_nothing_it_acknowledged() {
    if !shared_backend() {
        return;
    }
    let mut a = TestServer::start();
    let b = TestServer::start_replica_of(&a);
    let mut clients = Vec::new();
    for d in 0..4 {
        let s = if d % 2 == 0 { &a } else { &b };
        clients.push(s.device("carol", &format!("dev{d}")).await);
    }
    let acked = Arc::new(parking_lot::Mutex::new(Vec::<(u64, [u8; 16])>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (d, c) in clients.iter().cloned().enumerate() {
        let (acked, stop) = (acked.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..2000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                match append_one(&c, &format!("d{d}-{i}")).await {
                    Ok(r) => acked.lock().push(r),
                    // Devices on the killed replica fail from then on; the others go on.
                    Err(_) if d % 2 == 0 => break,
                    Err(e) => panic!("append through the surviving replica failed: {e}"),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.expect("appender");
    }
    let acked = acked.lock().clone();
    assert!(
        acked.len() > 4,
        "appends were acknowledged ({})",
        acked.len()
    );
    let all = read_all(&clients[1]).await;
    for (seq, id) in &acked {
        assert_eq!(
            all.get((*seq - 1) as usize),
            Some(id),
            "acknowledged seq {seq} readable through the surviving replica"
        );
    }
    // The survivor keeps serving, also for the user whose lock A may have held.
    let (seq, _) = append_one(&clients[1], "after-kill")
        .await
        .expect("append after the kill");
    assert_eq!(seq as usize, all.len() + 1);
}
