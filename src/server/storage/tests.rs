//! Tests of the storage service over a real embedded backend.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::changelog::{
    encode_changelog, ChangeLog, Delta, Name, ObjectId, ObjectKind, Op, OpKind,
};
use crate::delta::hash_tree::{LeafHashes, LEAF_LEN};
use crate::server::backend::embedded::Embedded;

use super::{Storage, StorageConfig};

fn storage(dir: &std::path::Path, max_object_bytes: u64) -> Storage {
    let backend = Embedded::open(dir).expect("open embedded backend");
    Storage::new(
        Arc::new(backend),
        StorageConfig {
            max_object_bytes,
            history_versions: 3,
        },
    )
}

fn op(object: ObjectId, base_version: u64, kind: OpKind) -> Op {
    Op {
        object,
        base_version,
        new_version: base_version + 1,
        kind,
    }
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

async fn append(s: &Storage, ops: Vec<Op>) {
    let key = hex::encode(rand::random::<[u8; 16]>());
    s.append("u", &key, &body(ops)).await.expect("append");
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
