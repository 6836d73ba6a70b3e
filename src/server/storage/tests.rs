//! Tests of the storage service over a real embedded backend.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use proptest::prelude::*;

use crate::changelog::{
    encode_changelog, ChangeLog, Delta, Name, ObjectId, ObjectKind, Op, OpKind,
};
use crate::delta::hash_tree::{LeafHashes, LEAF_LEN};
use crate::server::backend::embedded::Embedded;
use crate::server::backend::{
    AppendRecord, Backend, BoxFut, ChunkId, CommitBatch, DeviceRecord, DirEntries, HeadEvent,
    HistoryEntry, ObjectState, ShareRecord, TokenRecord, UserLock, UserRecord,
};
use crate::server::content::{read_range, stream_range};
use crate::server::error::ApiError;

use super::{Storage, StorageConfig, CHUNK_SIZE};

const MIB: usize = 1 << 20;

/// A backend that counts chunk reads and chunk writes of the embedded one it wraps.
struct Counting {
    inner: Embedded,
    chunk_reads: AtomicUsize,
    chunks_written: AtomicUsize,
}

impl Counting {
    fn reset(&self) {
        self.chunk_reads.store(0, Ordering::SeqCst);
        self.chunks_written.store(0, Ordering::SeqCst);
    }

    /// (chunks read, chunks written) since the last reset.
    fn counts(&self) -> (usize, usize) {
        (
            self.chunk_reads.load(Ordering::SeqCst),
            self.chunks_written.load(Ordering::SeqCst),
        )
    }
}

impl Backend for Counting {
    fn admin_token_hash(&self) -> BoxFut<'_, Option<String>> {
        self.inner.admin_token_hash()
    }
    fn set_admin_token_hash(&self, hash: String) -> BoxFut<'_, ()> {
        self.inner.set_admin_token_hash(hash)
    }
    fn create_user(&self, user: UserRecord) -> BoxFut<'_, ()> {
        self.inner.create_user(user)
    }
    fn get_user(&self, name: String) -> BoxFut<'_, Option<UserRecord>> {
        self.inner.get_user(name)
    }
    fn list_users(&self) -> BoxFut<'_, Vec<UserRecord>> {
        self.inner.list_users()
    }
    fn delete_user(&self, name: String) -> BoxFut<'_, ()> {
        self.inner.delete_user(name)
    }
    fn put_device(&self, device: DeviceRecord, old: Option<String>) -> BoxFut<'_, ()> {
        self.inner.put_device(device, old)
    }
    fn set_password(&self, user: String, hash: String, keep: Option<String>) -> BoxFut<'_, ()> {
        self.inner.set_password(user, hash, keep)
    }
    fn get_device(&self, user: String, device: String) -> BoxFut<'_, Option<DeviceRecord>> {
        self.inner.get_device(user, device)
    }
    fn list_devices(&self, user: String) -> BoxFut<'_, Vec<DeviceRecord>> {
        self.inner.list_devices(user)
    }
    fn lookup_token(&self, hash: String) -> BoxFut<'_, Option<TokenRecord>> {
        self.inner.lookup_token(hash)
    }
    fn put_share(&self, share: ShareRecord) -> BoxFut<'_, ()> {
        self.inner.put_share(share)
    }
    fn get_share(&self, hash: String) -> BoxFut<'_, Option<ShareRecord>> {
        self.inner.get_share(hash)
    }
    fn list_shares(&self, user: String) -> BoxFut<'_, Vec<ShareRecord>> {
        self.inner.list_shares(user)
    }
    fn delete_share(&self, user: String, hash: String) -> BoxFut<'_, ()> {
        self.inner.delete_share(user, hash)
    }
    fn lock_user(&self, user: String) -> BoxFut<'_, UserLock> {
        self.inner.lock_user(user)
    }
    fn head(&self, user: String) -> BoxFut<'_, u64> {
        self.inner.head(user)
    }
    fn idempotency(&self, user: String, key: String) -> BoxFut<'_, Option<AppendRecord>> {
        self.inner.idempotency(user, key)
    }
    fn get_object(&self, user: String, id: [u8; 16]) -> BoxFut<'_, Option<ObjectState>> {
        self.inner.get_object(user, id)
    }
    fn list_children(&self, user: String, dir: [u8; 16]) -> BoxFut<'_, DirEntries> {
        self.inner.list_children(user, dir)
    }
    fn commit(&self, user: String, batch: CommitBatch) -> BoxFut<'_, ()> {
        self.inner.commit(user, batch)
    }
    fn read_log(
        &self,
        user: String,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFut<'_, Vec<(u64, Vec<u8>)>> {
        self.inner.read_log(user, after, limit, max_bytes)
    }
    fn snapshot(&self, user: String) -> BoxFut<'_, (u64, Vec<ObjectState>)> {
        self.inner.snapshot(user)
    }
    fn history(&self, user: String, id: [u8; 16]) -> BoxFut<'_, Vec<HistoryEntry>> {
        self.inner.history(user, id)
    }
    fn put_chunks(&self, chunks: Vec<(ChunkId, bytes::Bytes)>) -> BoxFut<'_, ()> {
        self.chunks_written
            .fetch_add(chunks.len(), Ordering::SeqCst);
        self.inner.put_chunks(chunks)
    }
    fn get_chunk(&self, id: ChunkId) -> BoxFut<'_, Vec<u8>> {
        self.chunk_reads.fetch_add(1, Ordering::SeqCst);
        self.inner.get_chunk(id)
    }
    fn head_events(&self) -> tokio::sync::broadcast::Receiver<HeadEvent> {
        self.inner.head_events()
    }
}

/// A storage service over a counting embedded backend in `dir`.
fn counted(dir: &std::path::Path, max_object_bytes: u64) -> (Storage, Arc<Counting>) {
    let backend = Arc::new(Counting {
        inner: Embedded::open(dir).expect("open embedded backend"),
        chunk_reads: AtomicUsize::new(0),
        chunks_written: AtomicUsize::new(0),
    });
    let s = Storage::new(
        backend.clone(),
        StorageConfig {
            max_object_bytes,
            history_versions: 3,
            limits: crate::server::limits::AppendLimits::default(),
        },
    );
    (s, backend)
}

fn storage(dir: &std::path::Path, max_object_bytes: u64) -> Storage {
    counted(dir, max_object_bytes).0
}

fn op(object: ObjectId, base_version: u64, kind: OpKind) -> Op {
    Op {
        object,
        base_version,
        new_version: base_version + 1,
        kind,
    }
}

fn hash(b: &[u8]) -> [u8; 32] {
    *blake3::hash(b).as_bytes()
}

fn create(f: ObjectId) -> Op {
    op(
        f,
        0,
        OpKind::Create {
            parent: ObjectId::ROOT,
            name: Name::new(f.to_hex()).expect("name"),
            kind: ObjectKind::File,
            mode: 0o644,
            mtime_ns: 0,
        },
    )
}

/// A `Write` of `delta`, which turns `base` into `new`.
fn write(f: ObjectId, version: u64, base: &[u8], new: &[u8], delta: Delta) -> Op {
    op(
        f,
        version,
        OpKind::Write {
            base_hash: hash(base),
            new_hash: hash(new),
            new_size: new.len() as u64,
            delta,
        },
    )
}

fn truncate(f: ObjectId, version: u64, new: &[u8]) -> Op {
    op(
        f,
        version,
        OpKind::Truncate {
            new_size: new.len() as u64,
            new_hash: hash(new),
        },
    )
}

fn body(ops: Vec<Op>) -> Vec<u8> {
    encode_changelog(&ChangeLog {
        transactions: vec![crate::changelog::Transaction {
            id: rand::random(),
            device: "test".into(),
            time_ms: 0,
            ops,
        }],
    })
}

async fn try_append(s: &Storage, ops: Vec<Op>) -> Result<AppendRecord, ApiError> {
    let key = hex::encode(rand::random::<[u8; 16]>());
    s.append("u", "dev", &key, body(ops).into())
        .await
        .map_err(ApiError::from)
}

async fn append(s: &Storage, ops: Vec<Op>) {
    try_append(s, ops).await.expect("append");
}

/// The file's stored content, read back through its chunk list, with its state.
async fn stored(b: &dyn Backend, f: ObjectId) -> (Vec<u8>, ObjectState) {
    let o = b
        .get_object("u".into(), f.0)
        .await
        .expect("get")
        .expect("exists");
    let c = read_range(b, &o.chunks, o.size, 0, o.size)
        .await
        .expect("read content");
    (c, o)
}

/// Checks the stored file is `want`, its hash and its chaining values too.
async fn check_stored(b: &dyn Backend, f: ObjectId, want: &[u8]) {
    let (got, o) = stored(b, f).await;
    assert_eq!(got.len(), want.len(), "size");
    assert!(got == want, "content differs from the in-memory result");
    assert_eq!(o.size, want.len() as u64);
    assert_eq!(o.hash, hash(want));
    let leaves = LeafHashes::of(want);
    assert_eq!(
        o.chunk_cvs.as_deref(),
        Some(leaves.leaves()),
        "chaining values"
    );
    assert!(o.chunks.iter().enumerate().all(|(i, c)| {
        *c == hash(&want[i * CHUNK_SIZE..((i + 1) * CHUNK_SIZE).min(want.len())])
    }));
}

/// Pseudo-random bytes, so no two chunks are alike (chunks are content-addressed).
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let mut v = vec![0; len];
    fill(&mut v, u64::from(seed) << 32 | 0x9e37);
    v
}

/// One change a test applies, to the server (as an op) and to an in-memory copy.
#[derive(Clone, Debug)]
enum Change {
    /// Ranges at (offset as a fraction of the new size in 1/1000, length), resizing first.
    Ranges {
        new_size: usize,
        ranges: Vec<(usize, usize)>,
    },
    Truncate(usize),
}

fn arb_change() -> impl Strategy<Value = Change> {
    // Sizes and offsets cluster around chunk boundaries, where the bugs would be.
    let size = prop_oneof![
        0usize..5 * MIB,
        (0usize..5, -3i64..4).prop_map(|(c, d)| (c as i64 * MIB as i64 + d).max(0) as usize),
    ];
    let range = (0usize..1000, prop_oneof![1usize..64, 1usize..3 * MIB]);
    prop_oneof![
        (size.clone(), proptest::collection::vec(range, 0..5))
            .prop_map(|(new_size, ranges)| { Change::Ranges { new_size, ranges } }),
        size.prop_map(Change::Truncate),
    ]
}

/// Applies `change` to `content` in memory (with `delta::apply`, the client's rule) and
/// returns the op that does the same.
fn make_op(f: ObjectId, version: u64, content: &mut Vec<u8>, change: &Change, seed: u8) -> Op {
    let base = content.clone();
    match change {
        Change::Truncate(n) => {
            content.resize(*n, 0);
            truncate(f, version, content)
        }
        Change::Ranges { new_size, ranges } => {
            let ranges: Vec<(u64, Vec<u8>)> = ranges
                .iter()
                .filter(|_| *new_size > 0)
                .map(|(at, len)| {
                    let at = at * new_size / 1000;
                    let len = (*len).min(new_size - at);
                    (at as u64, pattern(len, seed))
                })
                .filter(|(_, b)| !b.is_empty())
                .collect();
            let delta = Delta::Ranges {
                new_size: *new_size as u64,
                ranges,
            };
            *content = crate::delta::apply(&base, &delta, usize::MAX).expect("apply in memory");
            write(f, version, &base, content, delta)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    /// Appends of several Ranges writes and truncates, across chunk boundaries, grouped into
    /// appends at random, give byte for byte what applying them in memory gives, with the right
    /// hashes, chunk ids and chaining values, and history.
    #[test]
    fn chunked_apply_matches_applying_in_memory(
        start in prop_oneof![Just(0usize), 1usize..4 * MIB],
        changes in proptest::collection::vec((arb_change(), 1usize..4), 1..7),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let dir = tempfile::tempdir().expect("temp dir");
            let (s, b) = counted(dir.path(), 64 << 20);
            let f = ObjectId::random();
            let mut content = pattern(start, 0xa5);
            append(&s, vec![
                create(f),
                write(f, 1, b"", &content, Delta::Whole(content.clone())),
            ]).await;
            check_stored(b.as_ref(), f, &content).await;
            let mut version = 2;
            let mut versions = vec![(version, content.clone())];
            let mut pending = Vec::new();
            let n = changes.len();
            for (k, (change, group)) in changes.iter().enumerate() {
                pending.push(make_op(f, version, &mut content, change, k as u8));
                version += 1;
                // Several ops on the file in one append, sometimes.
                if pending.len() >= *group || k + 1 == n {
                    append(&s, std::mem::take(&mut pending)).await;
                    check_stored(b.as_ref(), f, &content).await;
                    versions.push((version, content.clone()));
                }
            }
            // History: each append's last version reads back whole.
            let kept = b.history("u".into(), f.0).await.expect("history");
            prop_assert!(!kept.is_empty());
            for e in kept {
                if let Some((_, want)) = versions.iter().find(|(v, _)| *v == e.version) {
                    let got = read_range(b.as_ref(), &e.chunks, e.size, 0, e.size)
                        .await
                        .expect("read history");
                    prop_assert!(got == *want, "version {}", e.version);
                    prop_assert_eq!(e.hash, hash(want));
                }
            }
            Ok(())
        })?;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_inside_a_chunk_then_an_extend_reads_zeros_past_the_cut() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (s, b) = counted(dir.path(), 64 << 20);
    let f = ObjectId::random();
    let v1 = pattern(5 * MIB / 2, 1);
    append(
        &s,
        vec![create(f), write(f, 1, b"", &v1, Delta::Whole(v1.clone()))],
    )
    .await;
    // Cut inside the second chunk, then grow past the old end: the old bytes must not show.
    let mut v2 = v1.clone();
    v2.truncate(MIB + 12_345);
    let mut v3 = v2.clone();
    v3.resize(3 * MIB + 7, 0);
    append(&s, vec![truncate(f, 2, &v2)]).await;
    check_stored(b.as_ref(), f, &v2).await;
    append(&s, vec![truncate(f, 3, &v3)]).await;
    check_stored(b.as_ref(), f, &v3).await;
    // The same in one append, the extend as a Ranges write that patches the cut chunk.
    let mut v4 = v3.clone();
    v4.truncate(MIB / 2);
    let mut v5 = v4.clone();
    v5.resize(2 * MIB + 3, 0);
    v5[MIB - 2..MIB + 2].copy_from_slice(b"edge");
    let d5 = Delta::Ranges {
        new_size: v5.len() as u64,
        ranges: vec![((MIB - 2) as u64, b"edge".to_vec())],
    };
    append(&s, vec![truncate(f, 4, &v4), write(f, 5, &v4, &v5, d5)]).await;
    check_stored(b.as_ref(), f, &v5).await;
    // A truncate whose hash lies is refused and changes nothing.
    let e = try_append(
        &s,
        vec![op(
            f,
            6,
            OpKind::Truncate {
                new_size: 10,
                new_hash: hash(b"not this"),
            },
        )],
    )
    .await
    .expect_err("a wrong hash");
    assert!(matches!(e, ApiError::Unprocessable(_)), "{e:?}");
    check_stored(b.as_ref(), f, &v5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ranges_write_to_a_large_file_reads_and_writes_only_the_chunks_it_touches() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (s, b) = counted(dir.path(), 1 << 30);
    let f = ObjectId::random();
    let size = 64 * MIB + 100;
    let v1 = pattern(size, 3);
    append(
        &s,
        vec![create(f), write(f, 1, b"", &v1, Delta::Whole(v1.clone()))],
    )
    .await;
    assert_eq!(
        b.counts(),
        (0, 65),
        "a Whole write reads nothing, writes every chunk"
    );

    // One byte inside chunk 40: one chunk read, one written.
    b.reset();
    let mut v2 = v1.clone();
    v2[40 * MIB + 5] ^= 0xff;
    let d = Delta::Ranges {
        new_size: size as u64,
        ranges: vec![((40 * MIB + 5) as u64, vec![v2[40 * MIB + 5]])],
    };
    append(&s, vec![write(f, 2, &v1, &v2, d)]).await;
    assert_eq!(b.counts(), (1, 1));

    // Across the boundary of chunks 9 and 10, and all of chunk 20: two reads, three writes.
    b.reset();
    let mut v3 = v2.clone();
    v3[10 * MIB - 3..10 * MIB + 3].copy_from_slice(b"across");
    let whole = pattern(MIB, 9);
    v3[20 * MIB..21 * MIB].copy_from_slice(&whole);
    let d = Delta::Ranges {
        new_size: size as u64,
        ranges: vec![
            ((10 * MIB - 3) as u64, b"across".to_vec()),
            ((20 * MIB) as u64, whole),
        ],
    };
    append(&s, vec![write(f, 3, &v2, &v3, d)]).await;
    assert_eq!(b.counts(), (2, 3));

    // Growing by 3 MiB + 1 with zeros: the old last chunk (100 bytes) is read and extended;
    // the zero chunks are one chunk; the last is shorter.
    b.reset();
    let mut v4 = v3.clone();
    v4.resize(size + 3 * MIB + 1, 0);
    append(&s, vec![truncate(f, 4, &v4)]).await;
    let (reads, writes) = b.counts();
    assert_eq!(reads, 1);
    assert!(writes <= 4, "{writes} chunks written");
    check_stored(b.as_ref(), f, &v4).await;

    // Two ops on the file in one append: nothing is written before the commit, and the
    // chunk the first op made is patched in memory by the second.
    b.reset();
    let mut v5 = v4.clone();
    v5[30 * MIB] = 1;
    let mut v6 = v5.clone();
    v6[30 * MIB + 1] = 2;
    let d5 = Delta::Ranges {
        new_size: v5.len() as u64,
        ranges: vec![((30 * MIB) as u64, vec![1])],
    };
    let d6 = Delta::Ranges {
        new_size: v6.len() as u64,
        ranges: vec![((30 * MIB + 1) as u64, vec![2])],
    };
    append(
        &s,
        vec![write(f, 5, &v4, &v5, d5), write(f, 6, &v5, &v6, d6)],
    )
    .await;
    assert_eq!(b.counts(), (1, 1), "the final chunk only");
    check_stored(b.as_ref(), f, &v6).await;

    // A Ranges write whose hash lies: refused, nothing written.
    b.reset();
    let mut bad = write(
        f,
        7,
        &v6,
        b"other",
        Delta::Ranges {
            new_size: v6.len() as u64,
            ranges: vec![(0, vec![9])],
        },
    );
    if let OpKind::Write { new_size, .. } = &mut bad.kind {
        *new_size = v6.len() as u64;
    }
    let e = try_append(&s, vec![bad]).await.expect_err("a wrong hash");
    assert!(
        e.to_string().contains("does not match the op's new hash"),
        "{e}"
    );
    assert_eq!(b.counts().1, 0);
    check_stored(b.as_ref(), f, &v6).await;

    // A 4 KiB read at 50 MiB reads one chunk; one across a boundary reads two.
    b.reset();
    let o = b.get_object("u".into(), f.0).await.unwrap().unwrap();
    let part = read_range(
        b.as_ref(),
        &o.chunks,
        o.size,
        50 * MIB as u64,
        (50 * MIB + 4096) as u64,
    )
    .await
    .unwrap();
    assert_eq!(part, &v6[50 * MIB..50 * MIB + 4096]);
    assert_eq!(b.counts(), (1, 0));
    b.reset();
    let part = read_range(
        b.as_ref(),
        &o.chunks,
        o.size,
        (MIB - 1) as u64,
        (MIB + 1) as u64,
    )
    .await
    .unwrap();
    assert_eq!(part, &v6[MIB - 1..MIB + 1]);
    assert_eq!(b.counts(), (2, 0));

    // A streamed read of 20 MiB from the middle reads the 21 chunks holding it, once each.
    b.reset();
    let (a, z) = (10 * MIB + 7, 30 * MIB + 7);
    let backend: Arc<dyn Backend> = b.clone();
    let parts: Vec<bytes::Bytes> = stream_range(
        backend.clone(),
        o.chunks.clone(),
        o.size,
        a as u64,
        z as u64,
    )
    .await
    .expect("first chunk")
    .try_collect()
    .await
    .expect("stream");
    assert!(parts.concat() == v6[a..z]);
    assert_eq!(b.counts(), (21, 0));
    // A chunk missing at the start is an error answer; one missing later cuts the stream.
    let mut holes = o.chunks.clone();
    holes[12] = [0xee; 32];
    assert!(stream_range(
        backend.clone(),
        holes.clone(),
        o.size,
        (12 * MIB) as u64,
        o.size
    )
    .await
    .is_err());
    let cut: Result<Vec<bytes::Bytes>, ApiError> = stream_range(backend, holes, o.size, 0, o.size)
        .await
        .expect("first chunk is there")
        .try_collect()
        .await;
    assert!(cut.unwrap_err().to_string().contains("missing"));
}

/// Rewrites the file's record as one written before chaining values were kept (or, with
/// `corrupt`, one whose chunks are out of order), as a commit of its own.
async fn make_old_record(b: &dyn Backend, f: ObjectId, corrupt: bool) {
    let (_, mut o) = stored(b, f).await;
    o.chunk_cvs = None;
    if corrupt {
        o.chunks.swap(0, 1);
    }
    let head = b.head("u".into()).await.unwrap();
    let batch = CommitBatch {
        expected_head: head,
        entries: vec![(head + 1, b"-".to_vec())],
        put_objects: vec![o],
        history_keep: 3,
        idempotency: (format!("old-record-{head}"), AppendRecord::default()),
        ..CommitBatch::default()
    };
    b.commit("u".into(), batch).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsync_writes_apply_to_the_appends_own_content_and_to_old_records() {
    use crate::delta::{rsync_delta, BlockSignature};
    let dir = tempfile::tempdir().expect("temp dir");
    let (s, b) = counted(dir.path(), 1 << 30);
    let f = ObjectId::random();
    let v1 = pattern(2 * MIB + 3, 5);
    append(
        &s,
        vec![create(f), write(f, 1, b"", &v1, Delta::Whole(v1.clone()))],
    )
    .await;
    // A Ranges write, then an rsync delta against its result, in one append.
    let mut v2 = v1.clone();
    v2[MIB - 1..MIB + 1].copy_from_slice(b"<>");
    let d2 = Delta::Ranges {
        new_size: v2.len() as u64,
        ranges: vec![((MIB - 1) as u64, b"<>".to_vec())],
    };
    let mut v3 = v2.clone();
    v3.splice(1000..1000, b"inserted".iter().copied());
    let d3 = rsync_delta(&BlockSignature::calculate(&v2), &v3).expect("rsync delta");
    append(
        &s,
        vec![write(f, 2, &v1, &v2, d2), write(f, 3, &v2, &v3, d3)],
    )
    .await;
    check_stored(b.as_ref(), f, &v3).await;
    // On an old record the base is read once, chunk by chunk.
    make_old_record(b.as_ref(), f, false).await;
    b.reset();
    let mut v4 = v3.clone();
    v4.drain(MIB..MIB + 500);
    let d4 = rsync_delta(&BlockSignature::calculate(&v3), &v4).expect("rsync delta");
    append(&s, vec![write(f, 4, &v3, &v4, d4)]).await;
    assert_eq!(b.counts().0, 3, "each of the 3 chunks read once");
    check_stored(b.as_ref(), f, &v4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_without_chaining_values_get_them_on_their_first_ranges_write() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (s, b) = counted(dir.path(), 1 << 30);
    let f = ObjectId::random();
    let v1 = pattern(3 * MIB + 5, 4);
    append(
        &s,
        vec![create(f), write(f, 1, b"", &v1, Delta::Whole(v1.clone()))],
    )
    .await;
    // Make the record look like one written before chaining values were kept.
    make_old_record(b.as_ref(), f, false).await;
    let (_, o) = stored(b.as_ref(), f).await;
    let json = serde_json::to_string(&o).unwrap();
    assert!(
        !json.contains("chunk_cvs"),
        "old records have no such field: {json}"
    );
    assert_eq!(serde_json::from_str::<ObjectState>(&json).unwrap(), o);

    b.reset();
    let mut v2 = v1.clone();
    v2[7] = 0;
    let d = Delta::Ranges {
        new_size: v2.len() as u64,
        ranges: vec![(7, vec![0])],
    };
    append(&s, vec![write(f, 2, &v1, &v2, d)]).await;
    assert_eq!(
        b.counts(),
        (4 + 1, 1),
        "every chunk read once to compute the values, then the one written to"
    );
    check_stored(b.as_ref(), f, &v2).await;

    // A record whose chunks do not give its hash is reported, not built on.
    make_old_record(b.as_ref(), f, true).await;
    let d = Delta::Ranges {
        new_size: v2.len() as u64,
        ranges: vec![(8, vec![0])],
    };
    let e = try_append(&s, vec![write(f, 3, &v2, &v2, d)])
        .await
        .expect_err("corrupt record");
    assert!(e.to_string().contains("does not match its hash"), "{e}");
}

/// Fills `buf` with cheap pseudo-random bytes (incompressible enough for the log's zstd).
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

/// The figures in the chunked-apply commit: a new 1 GiB file uploaded the way the mount does
/// (every op states the final size, each carries the next 32 MiB of data), then a 1-byte edit.
/// `DELTADRIVE_BENCH_OPS_PER_APPEND` (default 1) groups ops into appends; `..._MIB` sets the
/// size. Run with `cargo test --lib server::storage::tests::upload_figures -- --ignored
/// --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: slow, needs a few GiB of memory"]
async fn upload_figures() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let mib = env("DELTADRIVE_BENCH_MIB", 1024);
    let per_append = env("DELTADRIVE_BENCH_OPS_PER_APPEND", 1).max(1) as usize;
    let size = mib << 20;
    let step = 32u64 << 20;
    let dir = tempfile::tempdir().expect("temp dir");
    let s = storage(dir.path(), size);
    let f = ObjectId::random();
    append(
        &s,
        vec![op(
            f,
            0,
            OpKind::Create {
                parent: ObjectId::ROOT,
                name: Name::new("big").expect("name"),
                kind: ObjectKind::File,
                mode: 0o644,
                mtime_ns: 0,
            },
        )],
    )
    .await;
    let mut content = vec![0u8; size as usize];
    fill(&mut content, 42);
    // The client's leaf hashes: all zeros of the final size, then the data leaves op by op.
    let mut leaves = LeafHashes::default();
    leaves
        .update(size, [(0, size)], |_, b: &mut [u8]| {
            b.fill(0);
            Ok::<(), ()>(())
        })
        .expect("zeros");
    let mut base_hash = *blake3::hash(b"").as_bytes();
    let mut version = 1;
    let mut pending = Vec::new();
    let mut upload = Duration::ZERO;
    let mut off = 0;
    while off < size {
        let end = (off + step).min(size);
        leaves
            .update(size, [(off, end - off)], |i, b| {
                let s = (i * LEAF_LEN) as usize;
                b.copy_from_slice(&content[s..s + b.len()]);
                Ok::<(), ()>(())
            })
            .expect("leaves");
        let new_hash = leaves.root_with(|| content.clone());
        pending.push(op(
            f,
            version,
            OpKind::Write {
                base_hash,
                new_hash,
                new_size: size,
                delta: Delta::Ranges {
                    new_size: size,
                    ranges: vec![(off, content[off as usize..end as usize].to_vec())],
                },
            },
        ));
        version += 1;
        base_hash = new_hash;
        off = end;
        if pending.len() == per_append || off == size {
            let t = Instant::now();
            append(&s, std::mem::take(&mut pending)).await;
            upload += t.elapsed();
        }
    }
    assert_eq!(base_hash, *blake3::hash(&content).as_bytes());
    // A 1-byte edit at 900/1024 of the file.
    let at = size / 1024 * 900;
    content[at as usize] ^= 0x5a;
    let new_hash = *blake3::hash(&content).as_bytes();
    let t = Instant::now();
    append(
        &s,
        vec![op(
            f,
            version,
            OpKind::Write {
                base_hash,
                new_hash,
                new_size: size,
                delta: Delta::Ranges {
                    new_size: size,
                    ranges: vec![(at, vec![content[at as usize]])],
                },
            },
        )],
    )
    .await;
    let edit = t.elapsed();
    eprintln!(
        "FIGURES: {mib} MiB new file as {}-MiB Ranges ops, {per_append} op(s) per append: \
         upload {upload:.2?}; 1-byte edit {edit:.2?}",
        step >> 20
    );
}

/// Refusals by a tree rule reach HTTP (through `server/api/`) with the words and the status
/// they had when the storage role wrote them itself: devices log the body, and tell a stale
/// base (pull, rebase, retry) from any other 409 by its `stale` list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_rule_refusals_keep_their_http_answers() {
    use crate::server::error::StaleOp;
    let dir = tempfile::tempdir().expect("temp dir");
    let s = storage(dir.path(), 64 << 20);
    let (d, e, f, g) = (
        ObjectId([1; 16]),
        ObjectId([4; 16]),
        ObjectId([2; 16]),
        ObjectId([3; 16]),
    );
    let n = |s: &str| Name::new(s.as_bytes().to_vec()).expect("name");
    // `create`'s op, somewhere else.
    let make = |id, at: ObjectId, name: &str, of: ObjectKind| {
        let mut o = create(id);
        if let OpKind::Create {
            parent,
            name: nm,
            kind,
            ..
        } = &mut o.kind
        {
            (*parent, *nm, *kind) = (at, n(name), of);
        }
        o
    };
    append(
        &s,
        vec![
            make(d, ObjectId::ROOT, "d", ObjectKind::Directory),
            make(f, d, "f", ObjectKind::File),
            make(e, d, "e", ObjectKind::Directory),
        ],
    )
    .await;
    let refused = |e: ApiError| match e {
        ApiError::Conflict(m) => m,
        other => panic!("not a 409 conflict: {other:?}"),
    };
    let cases: Vec<(Op, String)> = vec![
        (
            make(g, ObjectId::ROOT, "d", ObjectKind::File),
            format!("transaction 0, object {g}: name d is already taken in its folder"),
        ),
        (
            make(g, ObjectId([9; 16]), "x", ObjectKind::File),
            format!(
                "transaction 0, object {g}: parent folder {} does not exist",
                ObjectId([9; 16])
            ),
        ),
        (
            make(g, f, "x", ObjectKind::File),
            format!("transaction 0, object {g}: parent {f} is a file, not a folder"),
        ),
        (
            write(f, 1, b"not it", b"x", Delta::Whole(b"x".to_vec())),
            format!(
                "transaction 0, object {f}: the delta's base hash does not match the current \
                 content"
            ),
        ),
        (
            write(d, 1, b"", b"x", Delta::Whole(b"x".to_vec())),
            format!("transaction 0, object {d}: write to a directory"),
        ),
        (
            op(d, 1, OpKind::Delete),
            format!("transaction 0, object {d}: delete of a folder that is not empty"),
        ),
        (
            op(
                d,
                1,
                OpKind::Rename {
                    new_parent: e,
                    new_name: n("d"),
                },
            ),
            format!("transaction 0, object {d}: the move would put a folder inside itself"),
        ),
        (
            op(
                f,
                1,
                OpKind::Unlink {
                    parent: d,
                    name: n("f"),
                },
            ),
            format!(
                "transaction 0, object {f}: an object's last name goes with a delete, not an \
                 unlink"
            ),
        ),
    ];
    for (o, want) in cases {
        let e = try_append(&s, vec![o]).await.expect_err("refused");
        assert_eq!(e.status(), axum::http::StatusCode::CONFLICT);
        assert_eq!(refused(e), want);
    }
    // A stale base: its own 409, with the list of stale ops.
    let e = try_append(&s, vec![truncate(f, 4, b"")])
        .await
        .expect_err("stale");
    assert_eq!(e.status(), axum::http::StatusCode::CONFLICT);
    assert_eq!(e.to_string(), "stale base version");
    let ApiError::Stale(ops) = e else {
        panic!("not a stale-base answer: {e:?}")
    };
    assert_eq!(
        ops,
        [StaleOp {
            object: f.to_hex(),
            expected: 4,
            current: 1
        }]
    );
}
