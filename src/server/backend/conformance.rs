//! The conformance suite every [`Backend`] passes (garage's `test_suite(db)` pattern): call
//! [`run`] on a fresh, empty backend. The embedded backend runs it in its unit tests; a later
//! backend runs the same function. It checks what the trait promises, not how it is stored.

use super::{
    AppendRecord, Backend, BackendError, CommitBatch, DeviceRecord, HeadEvent, HistoryEntry,
    ObjectState, ShareRecord, StoredKind, UserRecord,
};

fn object(id: u8, parent: u8, name: &str) -> ObjectState {
    ObjectState {
        links: Vec::new(),
        id: [id; 16],
        parent: [parent; 16],
        name: name.as_bytes().to_vec(),
        kind: StoredKind::File,
        version: 1,
        mode: 0o644,
        mtime_ns: 0,
        size: 0,
        hash: [0; 32],
        chunks: Vec::new(),
        chunk_cvs: None,
        // Binary xattr names and values must survive every backend's encoding.
        xattrs: [(b"user.tag".to_vec(), vec![0, 255, 1])]
            .into_iter()
            .collect(),
        seq: 1,
    }
}

fn history(version: u64) -> HistoryEntry {
    HistoryEntry {
        version,
        size: 0,
        hash: [0; 32],
        time_ms: 0,
        device: "d".into(),
        seq: version,
        chunks: Vec::new(),
    }
}

fn batch(head: u64, n: u64, key: &str) -> CommitBatch {
    CommitBatch {
        expected_head: head,
        entries: (head + 1..=head + n)
            .map(|s| (s, vec![s as u8; 3]))
            .collect(),
        history_keep: 2,
        idempotency: (
            key.to_string(),
            AppendRecord {
                first_seq: head + 1,
                last_seq: head + n,
                body_hash: [7; 32],
            },
        ),
        ..CommitBatch::default()
    }
}

/// Runs every check against `b`, which must be empty.
///
/// # Panics
/// On the first broken promise, naming it.
pub async fn run(b: &dyn Backend) {
    let s = |x: &str| x.to_string();
    // Users.
    assert!(b.admin_token_hash().await.unwrap().is_none());
    b.set_admin_token_hash(s("h")).await.unwrap();
    assert_eq!(b.admin_token_hash().await.unwrap().as_deref(), Some("h"));
    let user = |n: &str| UserRecord {
        name: s(n),
        password_hash: s("x"),
        created_ms: 0,
    };
    b.create_user(user("bob")).await.unwrap();
    b.create_user(user("alice")).await.unwrap();
    assert!(matches!(
        b.create_user(user("alice")).await,
        Err(BackendError::AlreadyExists)
    ));
    let names: Vec<String> = b
        .list_users()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.name)
        .collect();
    assert_eq!(names, vec!["alice", "bob"], "users listed by name");

    // Devices and tokens: a new token replaces the old one atomically.
    let mut d = DeviceRecord {
        user: s("alice"),
        name: s("laptop"),
        id: s("id1"),
        token_hash: Some(s("t1")),
        created_ms: 0,
        last_login_ms: 0,
    };
    b.put_device(d.clone(), None).await.unwrap();
    assert_eq!(
        b.lookup_token(s("t1")).await.unwrap().unwrap().device,
        "laptop"
    );
    d.token_hash = Some(s("t2"));
    b.put_device(d.clone(), Some(s("t1"))).await.unwrap();
    assert!(
        b.lookup_token(s("t1")).await.unwrap().is_none(),
        "old token gone"
    );
    assert_eq!(
        b.lookup_token(s("t2")).await.unwrap().unwrap().user,
        "alice"
    );
    assert_eq!(b.list_devices(s("alice")).await.unwrap().len(), 1);
    assert!(b.list_devices(s("bob")).await.unwrap().is_empty());

    // Writing a device drops every token of it, also one the record no longer names (a login
    // that raced a revoke), and never brings back a device of a user that is not there.
    let mut stray = d.clone();
    stray.name = s("laptop");
    stray.token_hash = Some(s("stray"));
    b.put_device(stray, None).await.unwrap();
    d.token_hash = None;
    b.put_device(d.clone(), Some(s("t2"))).await.unwrap();
    for t in ["t2", "stray"] {
        assert!(
            b.lookup_token(s(t)).await.unwrap().is_none(),
            "token {t} of a revoked device still works"
        );
    }
    let ghost = DeviceRecord {
        user: s("nobody"),
        name: s("phone"),
        id: s("id9"),
        token_hash: Some(s("t9")),
        created_ms: 0,
        last_login_ms: 0,
    };
    assert!(matches!(
        b.put_device(ghost, None).await,
        Err(BackendError::NotFound)
    ));
    assert!(b.lookup_token(s("t9")).await.unwrap().is_none());
    assert!(b.list_devices(s("nobody")).await.unwrap().is_empty());

    // A password change revokes every token of the user but the kept device's.
    let phone = DeviceRecord {
        name: s("phone"),
        id: s("id3"),
        token_hash: Some(s("t3")),
        ..d.clone()
    };
    b.put_device(phone, None).await.unwrap();
    d.token_hash = Some(s("t2"));
    b.put_device(d.clone(), None).await.unwrap();
    b.put_device(
        DeviceRecord {
            user: s("bob"),
            name: s("desk"),
            id: s("id4"),
            token_hash: Some(s("t4")),
            created_ms: 0,
            last_login_ms: 0,
        },
        None,
    )
    .await
    .unwrap();
    b.set_password(s("alice"), s("y"), Some(s("laptop")))
        .await
        .unwrap();
    assert_eq!(
        b.get_user(s("alice")).await.unwrap().unwrap().password_hash,
        "y"
    );
    assert!(
        b.lookup_token(s("t2")).await.unwrap().is_some(),
        "kept device"
    );
    assert!(
        b.lookup_token(s("t3")).await.unwrap().is_none(),
        "other device"
    );
    assert!(
        b.lookup_token(s("t4")).await.unwrap().is_some(),
        "another user"
    );
    let revoked: Vec<bool> = b
        .list_devices(s("alice"))
        .await
        .unwrap()
        .iter()
        .map(|d| d.token_hash.is_none())
        .collect();
    assert_eq!(revoked, vec![false, true], "laptop kept, phone revoked");
    b.set_password(s("alice"), s("x"), None).await.unwrap();
    assert!(
        b.lookup_token(s("t2")).await.unwrap().is_none(),
        "none kept"
    );
    assert!(matches!(
        b.set_password(s("nobody"), s("z"), None).await,
        Err(BackendError::NotFound)
    ));
    d.token_hash = Some(s("t2"));
    b.put_device(d.clone(), None).await.unwrap();

    // Log: gapless commits, head check, paging, idempotency.
    let mut events = b.head_events();
    assert_eq!(b.head(s("alice")).await.unwrap(), 0);
    let mut first = batch(0, 3, "k1");
    // A file with content keeps its chunk list and per-chunk chaining values as given.
    let mut f = object(1, 0, "f");
    f.size = 3 << 20;
    f.chunks = vec![[3; 32], [4; 32], [3; 32]];
    f.chunk_cvs = Some(vec![[5; 32], [6; 32], [7; 32]]);
    first.put_objects.push(f.clone());
    first.put_children.push(([0; 16], b"f".to_vec(), [1; 16]));
    first.history = (1..=3).map(|v| ([1; 16], history(v))).collect();
    b.commit(s("alice"), first).await.unwrap();
    assert_eq!(b.head(s("alice")).await.unwrap(), 3);
    // A commit is announced to head-event receivers (a Resync is also an acceptable wake-up).
    let ev = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match events.recv().await {
                Ok(HeadEvent::Moved { user, head }) if user == "alice" => {
                    return HeadEvent::Moved { user, head }
                }
                Ok(HeadEvent::Moved { .. }) => {}
                Ok(HeadEvent::Resync) | Err(_) => return HeadEvent::Resync,
            }
        }
    })
    .await
    .expect("a head event after the commit");
    if let HeadEvent::Moved { head, .. } = ev {
        assert_eq!(head, 3, "the event names the new head");
    }
    assert_eq!(b.head(s("bob")).await.unwrap(), 0, "logs are per user");
    assert!(matches!(
        b.commit(s("alice"), batch(2, 1, "k2")).await,
        Err(BackendError::HeadMoved { .. })
    ));
    b.commit(s("alice"), batch(3, 2, "k2")).await.unwrap();
    let all = b.read_log(s("alice"), 0, 100, 1 << 20).await.unwrap();
    assert_eq!(
        all.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(all[3].1, vec![4u8; 3]);
    let page = b.read_log(s("alice"), 1, 2, 1 << 20).await.unwrap();
    assert_eq!(page.iter().map(|e| e.0).collect::<Vec<_>>(), vec![2, 3]);
    let one = b.read_log(s("alice"), 0, 100, 1).await.unwrap();
    assert_eq!(one.len(), 1, "at least one entry even past max_bytes");
    assert!(b
        .read_log(s("bob"), 0, 100, 1 << 20)
        .await
        .unwrap()
        .is_empty());
    let rec = b.idempotency(s("alice"), s("k1")).await.unwrap().unwrap();
    assert_eq!((rec.first_seq, rec.last_seq), (1, 3));
    assert!(b.idempotency(s("bob"), s("k1")).await.unwrap().is_none());

    // Objects, children, snapshot, history retention.
    assert_eq!(
        b.get_object(s("alice"), [1; 16]).await.unwrap(),
        Some(f.clone()),
        "the object state comes back whole"
    );
    assert!(b.get_object(s("bob"), [1; 16]).await.unwrap().is_none());
    assert_eq!(
        b.list_children(s("alice"), [0; 16]).await.unwrap(),
        vec![(b"f".to_vec(), [1; 16])]
    );
    let (head, objects) = b.snapshot(s("alice")).await.unwrap();
    assert_eq!((head, objects.len()), (5, 1));
    assert_eq!(objects[0], f, "the snapshot carries the whole state too");
    let kept: Vec<u64> = b
        .history(s("alice"), [1; 16])
        .await
        .unwrap()
        .iter()
        .map(|h| h.version)
        .collect();
    assert_eq!(kept, vec![2, 3], "only the last history_keep versions");
    let mut del = batch(5, 1, "k3");
    del.delete_objects.push([1; 16]);
    del.delete_children.push(([0; 16], b"f".to_vec()));
    b.commit(s("alice"), del).await.unwrap();
    assert!(b.get_object(s("alice"), [1; 16]).await.unwrap().is_none());
    assert!(b
        .list_children(s("alice"), [0; 16])
        .await
        .unwrap()
        .is_empty());

    // Chunks.
    let id = *blake3::hash(b"chunk").as_bytes();
    assert!(matches!(b.get_chunk(id).await, Err(BackendError::NotFound)));
    b.put_chunks(vec![(id, bytes::Bytes::from_static(b"chunk"))])
        .await
        .unwrap();
    b.put_chunks(vec![(id, bytes::Bytes::from_static(b"chunk"))])
        .await
        .unwrap();
    assert_eq!(b.get_chunk(id).await.unwrap(), b"chunk");

    // Share links: stored for existing users only, listed per user in creation order, removed
    // only by their user.
    let share = |hash: &str, user: &str, created_ms: i64| ShareRecord {
        hash: s(hash),
        user: s(user),
        object: [3; 16],
        created_ms,
        expires_ms: Some(1_000),
        password_hash: Some(s("$argon2id$x")),
    };
    b.put_share(share("s2", "alice", 20)).await.unwrap();
    b.put_share(share("s1", "alice", 10)).await.unwrap();
    b.put_share(share("s3", "bob", 5)).await.unwrap();
    assert!(matches!(
        b.put_share(share("s4", "nobody", 1)).await,
        Err(BackendError::NotFound)
    ));
    assert!(b.get_share(s("s4")).await.unwrap().is_none());
    assert_eq!(
        b.get_share(s("s2")).await.unwrap(),
        Some(share("s2", "alice", 20))
    );
    let hashes = |v: Vec<ShareRecord>| v.into_iter().map(|l| l.hash).collect::<Vec<_>>();
    assert_eq!(
        hashes(b.list_shares(s("alice")).await.unwrap()),
        vec!["s1", "s2"]
    );
    assert!(matches!(
        b.delete_share(s("bob"), s("s1")).await,
        Err(BackendError::NotFound)
    ));
    b.delete_share(s("alice"), s("s1")).await.unwrap();
    assert!(b.get_share(s("s1")).await.unwrap().is_none());
    assert!(matches!(
        b.delete_share(s("alice"), s("s1")).await,
        Err(BackendError::NotFound)
    ));

    // Removing a user removes everything of theirs, and only theirs.
    b.delete_user(s("alice")).await.unwrap();
    assert!(b.get_share(s("s2")).await.unwrap().is_none());
    assert!(b.list_shares(s("alice")).await.unwrap().is_empty());
    assert_eq!(hashes(b.list_shares(s("bob")).await.unwrap()), vec!["s3"]);
    assert!(matches!(
        b.delete_user(s("alice")).await,
        Err(BackendError::NotFound)
    ));
    assert!(b.get_user(s("alice")).await.unwrap().is_none());
    assert!(b.lookup_token(s("t2")).await.unwrap().is_none());
    assert_eq!(b.head(s("alice")).await.unwrap(), 0);
    assert!(b
        .read_log(s("alice"), 0, 100, 1 << 20)
        .await
        .unwrap()
        .is_empty());
    assert!(b.history(s("alice"), [1; 16]).await.unwrap().is_empty());
    assert!(b.list_devices(s("alice")).await.unwrap().is_empty());
    assert!(b.get_user(s("bob")).await.unwrap().is_some());
    assert_eq!(b.admin_token_hash().await.unwrap().as_deref(), Some("h"));

    // The commit lock excludes a second holder until dropped.
    let g = b.lock_user(s("bob")).await.unwrap();
    let second =
        tokio::time::timeout(std::time::Duration::from_millis(100), b.lock_user(s("bob"))).await;
    assert!(second.is_err(), "second lock waits");
    drop(g);
    b.lock_user(s("bob")).await.unwrap();
}
