//! Fuzzes the append path: change logs decoded and applied by the server's storage role
//! (`src/server/storage.rs`, included by `#[path]` with the content, limits and error modules
//! and the tree rules of `src/rules/`)
//! against the in-memory backend, under small work and memory budgets. Never a panic, never a
//! 500, never more memory than the budgets allow (run with `-rss_limit_mb=512`); an append is
//! all or nothing, and the stored files always equal a model of them.
//!
//! The first input byte picks the mode. Bit 0 set: the rest is a change-log body, framed and
//! appended as is (the decoder and every rule on garbage). Bit 0 clear: the rest is read as a
//! program of ops on four files (create, whole / ranges / rsync writes, raw rsync deltas,
//! truncates up to 1 TiB, deletes, attributes), mostly valid against a model, some made stale
//! or wrong on purpose; appends the model says are valid must succeed and leave exactly the
//! model's content, refused ones must change nothing.
#![no_main]
#![allow(dead_code, unused_imports)]

#[path = "../../src/changelog/mod.rs"]
mod changelog;
#[path = "../../src/delta/mod.rs"]
mod delta;
#[path = "../../src/rules/mod.rs"]
mod rules;

#[path = "append_server.rs"]
mod server;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use changelog::encoding::{frame, CHANGELOG_MAGIC};
use changelog::{encode_changelog, ChangeLog, Delta, Name, ObjectId, ObjectKind, Op, OpKind};
use libfuzzer_sys::fuzz_target;
use server::backend::memory::Memory;
use server::backend::Backend;
use server::error::ApiError;
use server::limits::AppendLimits;
use server::storage::{AppendError, Storage, StorageConfig};

/// Budgets small enough that everything they allow fits the fuzzer's 512 MiB.
fn config() -> StorageConfig {
    StorageConfig {
        // The server's default: only the work budget keeps a huge truncate from being done.
        max_object_bytes: 64 << 30,
        history_versions: 3,
        limits: AppendLimits {
            work_bytes: 64 << 20,
            memory_bytes: 96 << 20,
            memory_wait: Duration::from_millis(10),
            max_rsync_bytes: 8 << 20,
        },
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fn hash(b: &[u8]) -> [u8; 32] {
    *blake3::hash(b).as_bytes()
}

/// Reads the program.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.byte()?, self.byte()?]))
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

/// The model of one file.
#[derive(Clone, Debug)]
struct File {
    version: u64,
    content: Vec<u8>,
}

/// Content of `len` bytes made from `seed` (cheap to make large).
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(seed | 1)
                .wrapping_add((i >> 12) as u8)
        })
        .collect()
}

/// A size from one byte: mostly small, sometimes past a chunk, sometimes far past every budget.
fn size(b: u8, rest: u16) -> u64 {
    let r = u64::from(rest);
    match b % 8 {
        0..=3 => r % 4096,
        4 | 5 => (1 << 20) - 2048 + r % 4096,
        6 => (2 << 20) + r,
        _ => 1u64 << (30 + (r % 11)),
    }
}

fn id(k: u8) -> ObjectId {
    let mut id = [0u8; 16];
    id[0] = 1 + k % 4;
    ObjectId(id)
}

/// What the model expects of one op.
enum Expect {
    /// Valid: the append must succeed (unless a later op of it is refused).
    Valid,
    /// May be refused with a 4xx: the model cannot tell (raw rsync bytes, over the budgets).
    Maybe,
}

struct Program {
    files: BTreeMap<u8, File>,
}

impl Program {
    /// The next op and its expectation, with the model updated (`None`: the input ended;
    /// `Some(None)`: the op was on an object in `blocked`, skipped).
    fn op(&mut self, input: &mut Input, blocked: &[u8]) -> Option<Option<(Op, Expect)>> {
        let action = input.byte()?;
        let k = input.byte()? % 4;
        if blocked.contains(&k) {
            return Some(None);
        }
        let object = id(k);
        let corrupt = action & 0x80 != 0 && action & 0x40 != 0;
        let Some(file) = self.files.get(&k).cloned() else {
            let op = Op {
                object,
                base_version: 0,
                new_version: 1,
                kind: OpKind::Create {
                    parent: ObjectId::ROOT,
                    name: Name::new(format!("f{k}")).expect("name"),
                    kind: ObjectKind::File,
                    mode: 0o644,
                    mtime_ns: 0,
                },
            };
            self.files.insert(
                k,
                File {
                    version: 1,
                    content: Vec::new(),
                },
            );
            return Some(Some((op, Expect::Valid)));
        };
        let base = file.content.clone();
        let mut expect = Expect::Valid;
        let (kind, new_content) = match action % 8 {
            0 | 1 => {
                let len = size(input.byte()?, input.u16()?) as usize % (3 << 20);
                let new = pattern(len, input.byte()?);
                (
                    OpKind::Write {
                        base_hash: hash(&base),
                        new_hash: hash(&new),
                        new_size: new.len() as u64,
                        delta: Delta::Whole(new.clone()),
                    },
                    Some(new),
                )
            }
            2 => {
                let new_size = size(input.byte()?, input.u16()?);
                if new_size > (4 << 20) {
                    expect = Expect::Maybe;
                }
                let count = input.byte()? % 4;
                let mut ranges = Vec::new();
                let mut new = base.clone();
                let modelled = new_size <= (4 << 20);
                if modelled {
                    new.resize(new_size as usize, 0);
                }
                for _ in 0..count {
                    let at = u64::from(input.u16()?) * 97 % new_size.max(1);
                    let len = usize::from(input.byte()?);
                    let len = len.min((new_size - at) as usize);
                    let bytes = input.bytes(len).to_vec();
                    if bytes.is_empty() {
                        continue;
                    }
                    if modelled {
                        new[at as usize..at as usize + bytes.len()].copy_from_slice(&bytes);
                    }
                    ranges.push((at, bytes));
                }
                (
                    OpKind::Write {
                        base_hash: hash(&base),
                        new_hash: hash(&new),
                        new_size,
                        delta: Delta::Ranges { new_size, ranges },
                    },
                    modelled.then_some(new),
                )
            }
            3 => {
                // An rsync delta of an edit: a cut, an insertion, an append.
                let at = usize::from(input.u16()?) * 131 % (base.len() + 1);
                let cut = usize::from(input.byte()?).min(base.len() - at);
                let n = usize::from(input.byte()?);
                let insert = input.bytes(n).to_vec();
                let mut new = base[..at].to_vec();
                new.extend_from_slice(&insert);
                new.extend_from_slice(&base[at + cut..]);
                let block = u32::from(input.byte()?) * 64 + 256;
                let signature = delta::BlockSignature::calculate_with_block_size(&base, block);
                let d = delta::rsync_delta(&signature, &new).expect("diff");
                (
                    OpKind::Write {
                        base_hash: hash(&base),
                        new_hash: hash(&new),
                        new_size: new.len() as u64,
                        delta: d,
                    },
                    Some(new),
                )
            }
            4 => {
                // Raw rsync bytes (with the format's magic), e.g. copy commands asking for far
                // more than the stated size.
                let new_size = size(input.byte()?, input.u16()?);
                let mut raw = vec![0x72, 0x73, 0x02, 0x36];
                if action & 0x20 != 0 {
                    // Copies of the whole base, up to 20,000 of them: a result of gigabytes.
                    let copies = usize::from(input.u16()?) % 20_000;
                    let len = u32::try_from(base.len()).unwrap_or(u32::MAX);
                    for _ in 0..copies {
                        raw.extend_from_slice(&[0x47, 0]);
                        raw.extend_from_slice(&len.to_be_bytes());
                    }
                    raw.push(0);
                } else {
                    let len = usize::from(input.u16()?) % 4096;
                    raw.extend_from_slice(input.bytes(len));
                }
                expect = Expect::Maybe;
                (
                    OpKind::Write {
                        base_hash: hash(&base),
                        new_hash: hash(input.bytes(4)),
                        new_size,
                        delta: Delta::Rsync(raw),
                    },
                    None,
                )
            }
            5 => {
                let new_size = size(input.byte()?, input.u16()?);
                let modelled = new_size <= (4 << 20);
                let mut new = base.clone();
                if modelled {
                    new.resize(new_size as usize, 0);
                } else {
                    expect = Expect::Maybe;
                }
                (
                    OpKind::Truncate {
                        new_size,
                        new_hash: hash(&new),
                    },
                    modelled.then_some(new),
                )
            }
            6 => {
                self.files.remove(&k);
                let op = Op {
                    object,
                    base_version: file.version,
                    new_version: file.version + 1,
                    kind: OpKind::Delete,
                };
                return Some(Some((op, Expect::Valid)));
            }
            _ => (
                OpKind::SetXattr {
                    name: b"user.x".to_vec(),
                    value: input.bytes(8).to_vec(),
                },
                Some(base.clone()),
            ),
        };
        let mut op = Op {
            object,
            base_version: file.version,
            new_version: file.version + 1,
            kind,
        };
        if corrupt {
            // A wrong base hash, or a stale version.
            expect = Expect::Maybe;
            match &mut op.kind {
                OpKind::Write { base_hash, .. } => base_hash[0] ^= 1,
                _ => {
                    op.base_version += 1;
                    op.new_version += 1;
                }
            }
        }
        match new_content {
            Some(content) => {
                self.files.insert(
                    k,
                    File {
                        version: file.version + 1,
                        content,
                    },
                );
            }
            // The model cannot say what the content would be: it must be refused or it is
            // not checked; forget the file (it is re-read from the server below).
            None => {
                expect = Expect::Maybe;
                self.files.insert(
                    k,
                    File {
                        version: file.version + 1,
                        content: base,
                    },
                );
            }
        }
        Some(Some((op, expect)))
    }
}

/// The server's files, as the model sees them.
async fn files(backend: &Memory) -> BTreeMap<u8, File> {
    let mut out = BTreeMap::new();
    for k in 0..4u8 {
        if let Some(s) = backend.get_object("u".into(), id(k).0).await.expect("get") {
            let content = server::content::read_range(backend, &s.chunks, s.size, 0, s.size)
                .await
                .expect("stored content reads back");
            assert_eq!(hash(&content), s.hash, "stored content matches its hash");
            out.insert(
                k,
                File {
                    version: s.version,
                    content,
                },
            );
        }
    }
    out
}

fn same(a: &BTreeMap<u8, File>, b: &BTreeMap<u8, File>) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|((ka, fa), (kb, fb))| {
            ka == kb && fa.version == fb.version && fa.content == fb.content
        })
}

fn check_refusal(e: &AppendError) {
    assert!(
        !matches!(
            e,
            AppendError::Api(ApiError::Internal(_))
                | AppendError::Refused {
                    rule: rules::RuleError::TooDeep(_),
                    ..
                }
        ),
        "an append failed inside the server: {e}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    runtime().block_on(async {
        let backend = Arc::new(Memory::new());
        let storage = Storage::new(backend.clone(), config());
        let total = storage.memory_budget().total_bytes();
        if mode & 1 == 1 {
            let body = frame(CHANGELOG_MAGIC, rest);
            if let Err(e) = storage.append("u", "d", "k", body.into()).await {
                check_refusal(&e);
            }
            assert_eq!(storage.memory_budget().available_bytes(), total);
            return;
        }
        let mut input = Input(rest);
        let mut program = Program {
            files: BTreeMap::new(),
        };
        let mut n = 0u32;
        while !input.0.is_empty() && n < 16 {
            n += 1;
            let before = program.files.clone();
            let mut valid = true;
            let mut transactions = Vec::new();
            let tx_count = 1 + input.byte().unwrap_or(0) % 3;
            for t in 0..tx_count {
                let mut ops: Vec<Op> = Vec::new();
                // Ops on an object deleted earlier in this transaction would not chain.
                let mut deleted = Vec::new();
                let op_count = 1 + input.byte().unwrap_or(0) % 4;
                for _ in 0..op_count {
                    let Some(next) = program.op(&mut input, &deleted) else {
                        break;
                    };
                    let Some((op, expect)) = next else {
                        continue;
                    };
                    if op.kind == OpKind::Delete {
                        deleted.push(op.object.0[0] - 1);
                    }
                    if matches!(expect, Expect::Maybe) {
                        valid = false;
                    }
                    ops.push(op);
                }
                if ops.is_empty() {
                    continue;
                }
                transactions.push(changelog::Transaction {
                    id: [t + 1; 16],
                    device: "claimed-device".into(),
                    time_ms: 1,
                    ops,
                });
            }
            if transactions.is_empty() {
                break;
            }
            let body = encode_changelog(&ChangeLog { transactions });
            let key = format!("k{n}");
            let result = storage.append("u", "d", &key, body.into()).await;
            assert_eq!(
                storage.memory_budget().available_bytes(),
                total,
                "an append's memory is released when it ends"
            );
            let stored = files(&backend).await;
            match result {
                Ok(_) => {
                    if valid {
                        assert!(
                            same(&stored, &program.files),
                            "the stored files are not the model's"
                        );
                    }
                    program.files = stored;
                }
                Err(e) => {
                    check_refusal(&e);
                    // Valid ops may still pass the budgets together.
                    let over = matches!(
                        e,
                        AppendError::Api(ApiError::OverLimit(_) | ApiError::Busy(_))
                    );
                    assert!(!valid || over, "a valid append was refused: {e}");
                    assert!(
                        same(&stored, &before),
                        "a refused append changed the stored files: {e}"
                    );
                    program.files = before;
                }
            }
        }
    });
});
