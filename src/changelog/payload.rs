//! Transactions with and without their delta bytes.
//!
//! The sync engine reasons about ops (ids, versions, hashes, sizes) and never about the bytes
//! of a delta, while a device's outbox can hold gigabytes of them. So the engine holds
//! *light* transactions ([`strip`]): every `Write` keeps its hashes and size but carries an
//! empty delta. The bytes stay in the store's outbox and are put back ([`PayloadIndex`])
//! when a transaction is uploaded or when the engine rewrites the outbox after a rebase, which
//! renumbers versions but never changes a write's hashes.

use std::collections::HashMap;

use super::model::{ContentHash, Delta, ObjectId, Op, OpKind, Transaction};

/// An empty delta: what a light transaction's writes carry.
fn placeholder() -> Delta {
    Delta::Whole(Vec::new())
}

/// An op's kind without the bytes of its delta (hashes and size kept); other kinds as they
/// are. Not cloned: the bytes may be large.
pub fn strip_kind(kind: &OpKind) -> OpKind {
    match kind {
        OpKind::Write {
            base_hash,
            new_hash,
            new_size,
            ..
        } => OpKind::Write {
            base_hash: *base_hash,
            new_hash: *new_hash,
            new_size: *new_size,
            delta: placeholder(),
        },
        other => other.clone(),
    }
}

/// The transaction without the bytes of its deltas.
pub fn strip(tx: &Transaction) -> Transaction {
    let ops = tx
        .ops
        .iter()
        .map(|op| Op {
            object: op.object,
            base_version: op.base_version,
            new_version: op.new_version,
            kind: strip_kind(&op.kind),
        })
        .collect();
    Transaction {
        id: tx.id,
        device: tx.device.clone(),
        time_ms: tx.time_ms,
        ops,
    }
}

/// The transaction as a light log page sends it (`GET /v1/log?light=1`): every write keeps
/// its hashes and size and carries an empty ranges delta, so the result is still a valid
/// transaction. Applying such a write to anything gives the wrong hash, which the apply
/// catches: a device reads the entry whole when it needs the bytes.
pub fn light(tx: &Transaction) -> Transaction {
    let mut out = strip(tx);
    for op in &mut out.ops {
        if let OpKind::Write {
            new_size, delta, ..
        } = &mut op.kind
        {
            *delta = Delta::Ranges {
                new_size: *new_size,
                ranges: Vec::new(),
            };
        }
    }
    out
}

type WriteKey = ([u8; 16], ObjectId, ContentHash, ContentHash);

/// The delta bytes of full transactions, by transaction id, object and hashes.
#[derive(Default)]
pub struct PayloadIndex {
    deltas: HashMap<WriteKey, Delta>,
}

impl PayloadIndex {
    /// Indexes the writes of `txs` (taking their deltas).
    pub fn new(txs: impl IntoIterator<Item = Transaction>) -> PayloadIndex {
        let mut deltas = HashMap::new();
        for tx in txs {
            for op in tx.ops {
                if let OpKind::Write {
                    base_hash,
                    new_hash,
                    delta,
                    ..
                } = op.kind
                {
                    deltas.insert((tx.id, op.object, base_hash, new_hash), delta);
                }
            }
        }
        PayloadIndex { deltas }
    }

    /// The bytes of one write of transaction `tx` to `object`, by its hashes.
    pub fn delta(
        &self,
        tx: [u8; 16],
        object: ObjectId,
        base_hash: ContentHash,
        new_hash: ContentHash,
    ) -> Option<&Delta> {
        self.deltas.get(&(tx, object, base_hash, new_hash))
    }

    /// `tx` with the bytes of each of its writes put back; `None` if a write's bytes are not
    /// in the index.
    pub fn fill(&self, tx: &Transaction) -> Option<Transaction> {
        let mut out = tx.clone();
        for op in &mut out.ops {
            if let OpKind::Write {
                base_hash,
                new_hash,
                delta,
                ..
            } = &mut op.kind
            {
                *delta = self
                    .deltas
                    .get(&(tx.id, op.object, *base_hash, *new_hash))?
                    .clone();
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx() -> Transaction {
        Transaction {
            id: [7; 16],
            device: "d".into(),
            time_ms: 1,
            ops: vec![Op {
                object: ObjectId([1; 16]),
                base_version: 3,
                new_version: 4,
                kind: OpKind::Write {
                    base_hash: [1; 32],
                    new_hash: [2; 32],
                    new_size: 5,
                    delta: Delta::Whole(b"hello".to_vec()),
                },
            }],
        }
    }

    #[test]
    fn a_light_transaction_is_valid_and_carries_no_bytes() {
        let full = tx();
        let l = light(&full);
        crate::changelog::validate_transaction(&l).unwrap();
        let enc = crate::changelog::encode_transaction(&l);
        assert_eq!(crate::changelog::decode_transaction(&enc).unwrap(), l);
        let OpKind::Write { delta, .. } = &l.ops[0].kind else {
            panic!()
        };
        assert_eq!(
            delta,
            &Delta::Ranges {
                new_size: 5,
                ranges: Vec::new()
            }
        );
        let index = PayloadIndex::new([full.clone()]);
        assert_eq!(index.fill(&l).unwrap(), full);
    }

    #[test]
    fn a_stripped_transaction_is_filled_back_also_after_renumbering() {
        let full = tx();
        let light = strip(&full);
        assert_ne!(light, full);
        let OpKind::Write { delta, .. } = &light.ops[0].kind else {
            panic!()
        };
        assert_eq!(delta, &Delta::Whole(Vec::new()));
        let index = PayloadIndex::new([full.clone()]);
        assert_eq!(index.fill(&light).unwrap(), full);
        let mut renumbered = light.clone();
        renumbered.ops[0].base_version = 9;
        renumbered.ops[0].new_version = 10;
        let filled = index.fill(&renumbered).unwrap();
        assert_eq!(filled.ops[0].kind, full.ops[0].kind);
        assert_eq!(filled.ops[0].base_version, 9);
        let mut other = light;
        other.id = [8; 16];
        assert!(index.fill(&other).is_none());
    }
}
