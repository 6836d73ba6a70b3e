//! Uploads the server refuses: which refusals a pull and a rebase can cure, and what becomes
//! of a transaction at the head of the outbox the server refuses for good.
//!
//! What always holds: a refusal of a batch of several transactions never sets anything
//! aside; the next upload holds the head transaction alone, so the one the server refuses is
//! known. A head transaction refused alone, at once for a refusal that can never succeed as
//! it is ([`Refusal::Final`]) or [`REFUSALS_BEFORE_ASIDE`] times in a row after a pull and a
//! rebase on the latest head ([`Refusal::Conflict`]), leaves the outbox; the rest of the
//! outbox is replayed on the server tree without it, and every object whose change is no
//! longer in the outbox is handed back to the I/O side with the state the local tree now
//! gives it ([`SetAside`]). Invariants of the engine (the outbox applies on S, L = S + O)
//! hold after it as before.

use std::collections::BTreeSet;

use crate::changelog::{ObjectId, Op, OpKind, Transaction};

use super::{Engine, ObjectState};

/// A head transaction refused with a clash this many times in a row, each after a pull and a
/// rebase on the latest head, is set aside.
pub const REFUSALS_BEFORE_ASIDE: u32 = 3;

/// How the server refused an upload (the I/O side reads it from the answer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 409 naming stale base versions: pull, rebase, retry.
    Stale,
    /// 409 for a clash with the server's tree that a pull and a rebase usually cure.
    Conflict(String),
    /// The upload can never be accepted as it is (400, 413, 422: over the server's limits, a
    /// name or a change it refuses). It may be later, when the server's limits change.
    Final(String),
}

/// A head transaction the server refused for good, taken out of the outbox. The I/O side
/// persists it at once, in one write batch: the outbox becomes `outbox`; each of `objects`
/// is marked changed again, with the state the engine's local tree now gives it as its
/// previous state (`None`: the server does not know it), so the next seal announces what
/// the device holds with base versions the server holds. Its content is sent whole (the
/// server does not have the base the old deltas were made against).
#[derive(Clone, Debug, PartialEq)]
pub struct SetAside {
    /// The refused transaction.
    pub transaction: Transaction,
    /// The server's reason.
    pub reason: String,
    /// The rest of the outbox, replayed on the server tree without the refused transaction.
    pub outbox: Vec<Transaction>,
    /// Every object whose change left the outbox, with its state in the new local tree.
    pub objects: Vec<(ObjectId, Option<ObjectState>)>,
}

/// The folders an op puts a name into or takes one out of.
fn folders_of(op: &Op) -> Option<ObjectId> {
    match &op.kind {
        OpKind::Create { parent, .. }
        | OpKind::Link { parent, .. }
        | OpKind::Unlink { parent, .. } => Some(*parent),
        OpKind::Rename { new_parent, .. } => Some(*new_parent),
        _ => None,
    }
}

impl Engine {
    /// The upload in flight was refused (see [`Refusal`]). Returns the transaction set aside
    /// when the refusal was final for the head of the outbox: persist it at once.
    pub fn handle_upload_refused(
        &mut self,
        now_ms: u64,
        request: super::RequestId,
        refusal: Refusal,
    ) -> Option<SetAside> {
        self.tick(now_ms);
        if !self.finish(request, super::Request::Upload) {
            return None;
        }
        let batch = self.unconfirmed.take().map(|(_, b)| b).unwrap_or_default();
        let (reason, final_) = match refusal {
            Refusal::Stale => {
                self.conflicted(now_ms);
                return None;
            }
            Refusal::Conflict(r) => (r, false),
            Refusal::Final(r) => (r, true),
        };
        if batch.len() > 1 {
            // Which of them? The next upload holds the head alone.
            self.head_only = true;
            if final_ {
                self.drive(now_ms);
            } else {
                self.conflicted(now_ms);
            }
            return None;
        }
        let head = batch.first().map(|t| t.id);
        let count = match self.refused {
            Some((id, n)) if Some(id) == head => n + 1,
            _ => 1,
        };
        self.refused = head.map(|id| (id, count));
        let at_head = head.is_some() && self.outbox.first().map(|t| t.id) == head;
        if at_head && (final_ || count >= REFUSALS_BEFORE_ASIDE) {
            let aside = self.set_aside_head(reason);
            self.refused = None;
            self.head_only = false;
            self.conflicts_without_progress = 0;
            self.drive(now_ms);
            return Some(aside);
        }
        self.conflicted(now_ms);
        None
    }

    /// After a refusal a pull and a rebase may cure: pull, then try again (backing off after
    /// a few refusals without progress).
    fn conflicted(&mut self, now_ms: u64) {
        self.need_pull = true;
        self.conflicts_without_progress += 1;
        if self.conflicts_without_progress > 2 {
            self.back_off(now_ms);
        }
        self.drive(now_ms);
    }

    /// Takes the head transaction out of the outbox and replays the rest on the server tree
    /// without it. An op on an object the refused transaction (or an op dropped here)
    /// touched, or naming such a folder, or no longer applying, is dropped, and its object
    /// joins the set: the next seal sends its state as the device holds it then.
    fn set_aside_head(&mut self, reason: String) -> SetAside {
        let refused = self.outbox.remove(0);
        let mut touched: BTreeSet<ObjectId> = refused.ops.iter().map(|o| o.object).collect();
        let mut tree = self.server.clone();
        let mut rest = Vec::with_capacity(self.outbox.len());
        for tx in std::mem::take(&mut self.outbox) {
            let mut kept = Vec::with_capacity(tx.ops.len());
            for op in &tx.ops {
                let depends = touched.contains(&op.object)
                    || folders_of(op).is_some_and(|f| touched.contains(&f));
                if depends || tree.apply_op(op).is_err() {
                    touched.insert(op.object);
                } else {
                    kept.push(op.clone());
                }
            }
            if !kept.is_empty() {
                rest.push(Transaction { ops: kept, ..tx });
            }
        }
        self.local = tree;
        self.outbox = rest.clone();
        let objects = touched
            .into_iter()
            .map(|id| (id, self.local.get(id).cloned()))
            .collect();
        SetAside {
            transaction: refused,
            reason,
            outbox: rest,
            objects,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changelog::{Delta, Name, ObjectKind};
    use crate::engine::{Action, EngineConfig, PersistedState, RequestId};

    fn id(n: u8) -> ObjectId {
        ObjectId([n; 16])
    }

    fn tx(n: u8, ops: Vec<Op>) -> Transaction {
        Transaction {
            id: [n; 16],
            device: "a".into(),
            time_ms: 0,
            ops,
        }
    }

    fn create(o: ObjectId, parent: ObjectId, name: &str, kind: ObjectKind) -> Op {
        Op {
            object: o,
            base_version: 0,
            new_version: 1,
            kind: OpKind::Create {
                parent,
                name: Name(name.as_bytes().to_vec()),
                kind,
                mode: 0o644,
                mtime_ns: 0,
            },
        }
    }

    fn write(o: ObjectId, base: u64, content: &[u8], base_content: &[u8]) -> Op {
        Op {
            object: o,
            base_version: base,
            new_version: base + 1,
            kind: OpKind::Write {
                base_hash: *blake3::hash(base_content).as_bytes(),
                new_hash: *blake3::hash(content).as_bytes(),
                new_size: content.len() as u64,
                delta: Delta::Whole(content.to_vec()),
            },
        }
    }

    /// An engine at cursor 0 with `outbox`, online, that has pulled (nothing) and now
    /// uploads; returns it with the upload's request and batch.
    fn uploading(outbox: Vec<Transaction>) -> (Engine, RequestId, Vec<Transaction>) {
        let mut e = Engine::restore(
            EngineConfig::new("a", 1),
            PersistedState {
                cursor: 0,
                server_tree: Vec::new(),
                outbox,
            },
        )
        .unwrap();
        e.handle_connectivity(0, true);
        let pull = match e.poll_action() {
            Some(Action::Pull { request, .. }) => request,
            other => panic!("expected a pull, got {other:?}"),
        };
        e.handle_pulled(1, pull, Vec::new(), 0);
        let (request, batch) = next_upload(&mut e);
        (e, request, batch)
    }

    fn next_upload(e: &mut Engine) -> (RequestId, Vec<Transaction>) {
        while let Some(a) = e.poll_action() {
            match a {
                Action::Upload {
                    request,
                    transactions,
                    ..
                } => return (request, transactions),
                Action::Pull { request, .. } => e.handle_pulled(2, request, Vec::new(), 0),
                other => panic!("expected an upload, got {other:?}"),
            }
        }
        panic!("no upload");
    }

    /// Big file B refused for good at the head; small file S after it, and a later edit of
    /// B, and a file made inside folder D that B's transaction made.
    fn outbox() -> Vec<Transaction> {
        let (b, s, d, f) = (id(1), id(2), id(3), id(4));
        vec![
            tx(
                1,
                vec![
                    create(d, ObjectId::ROOT, "d", ObjectKind::Directory),
                    create(b, ObjectId::ROOT, "big", ObjectKind::File),
                    write(b, 1, b"big", b""),
                ],
            ),
            tx(
                2,
                vec![
                    create(s, ObjectId::ROOT, "small", ObjectKind::File),
                    write(s, 1, b"small", b""),
                ],
            ),
            tx(3, vec![write(b, 2, b"bigger", b"big")]),
            tx(
                4,
                vec![
                    create(f, d, "f", ObjectKind::File),
                    write(s, 2, b"small 2", b"small"),
                ],
            ),
        ]
    }

    #[test]
    fn a_final_refusal_of_a_batch_retries_the_head_alone_then_sets_it_aside() {
        let (mut e, request, batch) = uploading(outbox());
        assert_eq!(batch.len(), 4);
        let none = e.handle_upload_refused(3, request, Refusal::Final("too big".into()));
        assert_eq!(none, None, "a batch is never set aside whole");
        assert_eq!(e.outbox().len(), 4);
        let (request, batch) = next_upload(&mut e);
        assert_eq!(batch.len(), 1, "the head goes alone");
        assert_eq!(batch[0].id, [1; 16]);
        let aside = e
            .handle_upload_refused(4, request, Refusal::Final("too big".into()))
            .expect("the head refused alone is set aside");
        assert_eq!(aside.transaction.id, [1; 16]);
        assert_eq!(aside.reason, "too big");
        // The small file's create travels; the edit of the big file and the file inside
        // the folder the refused transaction made cannot; the small file's later edit can.
        let ids: Vec<[u8; 16]> = aside.outbox.iter().map(|t| t.id).collect();
        assert_eq!(ids, vec![[2; 16], [4; 16]]);
        assert_eq!(aside.outbox[1].ops.len(), 1);
        assert_eq!(aside.outbox[1].ops[0].object, id(2));
        let objects: Vec<ObjectId> = aside.objects.iter().map(|(o, _)| *o).collect();
        assert_eq!(objects, vec![id(1), id(3), id(4)]);
        assert!(aside.objects.iter().all(|(_, s)| s.is_none()));
        // The engine's state is the outbox it handed over, and it still holds together.
        assert_eq!(e.outbox(), &aside.outbox[..]);
        assert_eq!(e.local_version(id(2)), 3);
        assert_eq!(e.local_version(id(1)), 0);
        let restored = Engine::restore(EngineConfig::new("a", 1), e.persisted_state());
        assert!(restored.is_ok(), "the rest applies on the server tree");
        // Everything after it goes on: the next upload is the small file's.
        let (_, batch) = next_upload(&mut e);
        assert_eq!(batch[0].id, [2; 16]);
        // A new seal of the big file is based on what the server holds (version 0).
        let again = tx(
            5,
            vec![
                create(id(1), ObjectId::ROOT, "big", ObjectKind::File),
                write(id(1), 1, b"bigger", b""),
            ],
        );
        e.handle_local_commit(5, again).unwrap();
    }

    #[test]
    fn a_clash_is_set_aside_only_after_refusals_following_a_pull_each() {
        let (mut e, request, batch) = uploading(vec![outbox().remove(1)]);
        assert_eq!(batch.len(), 1);
        let mut request = request;
        for n in 1..REFUSALS_BEFORE_ASIDE {
            let r = e.handle_upload_refused(
                10 * u64::from(n),
                request,
                Refusal::Conflict("name refused".into()),
            );
            assert_eq!(r, None, "refusal {n} is not yet final");
            match e.poll_action() {
                Some(Action::Pull { request, .. }) => {
                    e.handle_pulled(10 * u64::from(n) + 1, request, Vec::new(), 0)
                }
                other => panic!("a clash pulls first, got {other:?}"),
            }
            e.handle_timeout(1_000_000 * u64::from(n));
            request = next_upload(&mut e).0;
        }
        let aside = e
            .handle_upload_refused(5_000_000, request, Refusal::Conflict("name refused".into()))
            .expect("set aside after the last refusal");
        assert!(aside.outbox.is_empty());
        assert!(e.outbox().is_empty());
        assert_eq!(aside.objects.len(), 1);
    }

    #[test]
    fn a_stale_refusal_never_sets_aside() {
        let (mut e, mut request, _) = uploading(vec![outbox().remove(1)]);
        for n in 0..(REFUSALS_BEFORE_ASIDE + 2) {
            let t = 1_000_000 * u64::from(n + 1);
            assert_eq!(e.handle_upload_refused(t, request, Refusal::Stale), None);
            e.handle_timeout(t + 500_000);
            request = next_upload(&mut e).0;
        }
        assert_eq!(e.outbox().len(), 1);
    }
}
