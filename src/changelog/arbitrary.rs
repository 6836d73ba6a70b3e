//! Proptest strategies for the change-log model (tests only).
//!
//! Owns generators of *valid* logs: everything [`arb_changelog`] yields passes
//! [`crate::changelog::validate`], so round-trip tests can assert equality.

use proptest::collection::vec;
use proptest::prelude::*;

use super::model::{ChangeLog, Delta, Name, ObjectId, ObjectKind, Op, OpKind, Transaction};
use super::validate::RSYNC_DELTA_MAGIC;

pub(crate) fn arb_object_id() -> impl Strategy<Value = ObjectId> {
    prop_oneof![
        1 => Just(ObjectId::ROOT),
        6 => any::<[u8; 16]>().prop_map(ObjectId),
    ]
}

fn arb_non_root_id() -> impl Strategy<Value = ObjectId> {
    any::<[u8; 16]>()
        .prop_filter("not root", |id| *id != [0; 16])
        .prop_map(ObjectId)
}

pub(crate) fn arb_name() -> impl Strategy<Value = Name> {
    prop_oneof![
        "[a-zA-Z0-9 ._-]{1,40}".prop_map(|s| s.into_bytes()),
        vec(1u8..=255, 1..=255),
    ]
    .prop_filter_map("valid name", |bytes| Name::new(bytes).ok())
}

fn arb_hash() -> impl Strategy<Value = [u8; 32]> {
    any::<[u8; 32]>()
}

fn arb_kind() -> impl Strategy<Value = ObjectKind> {
    prop_oneof![
        Just(ObjectKind::File),
        Just(ObjectKind::Directory),
        vec(1u8..=255, 1..200).prop_map(|target| ObjectKind::Symlink { target }),
    ]
}

fn arb_delta_and_size() -> impl Strategy<Value = (u64, Delta)> {
    prop_oneof![
        vec(any::<u8>(), 0..300).prop_map(|content| (content.len() as u64, Delta::Whole(content))),
        (
            0u64..1_000_000,
            vec((any::<u64>(), vec(any::<u8>(), 1..50)), 0..6)
        )
            .prop_map(|(new_size, ranges)| {
                let ranges = ranges
                    .into_iter()
                    .filter(|(_, bytes)| (bytes.len() as u64) <= new_size)
                    .map(|(offset, bytes)| {
                        let room = new_size - bytes.len() as u64;
                        (offset % (room + 1), bytes)
                    })
                    .collect();
                (new_size, Delta::Ranges { new_size, ranges })
            }),
        (any::<u64>(), vec(any::<u8>(), 0..100)).prop_map(|(size, tail)| {
            let mut bytes = RSYNC_DELTA_MAGIC.to_vec();
            bytes.extend(tail);
            (size % (1 << 40), Delta::Rsync(bytes))
        }),
    ]
}

/// An op kind valid on a non-root object with base version 0 or more (Create excluded).
fn arb_edit_kind() -> impl Strategy<Value = OpKind> {
    prop_oneof![
        (arb_hash(), arb_hash(), arb_delta_and_size()).prop_map(
            |(base_hash, new_hash, (new_size, delta))| OpKind::Write {
                base_hash,
                new_hash,
                new_size,
                delta,
            }
        ),
        (0u64..=(1 << 40), arb_hash())
            .prop_map(|(new_size, new_hash)| OpKind::Truncate { new_size, new_hash }),
        (arb_object_id(), arb_name()).prop_map(|(new_parent, new_name)| OpKind::Rename {
            new_parent,
            new_name
        }),
        Just(OpKind::Delete),
        arb_attr_kind(),
        (arb_object_id(), arb_name()).prop_map(|(parent, name)| OpKind::Link { parent, name }),
        (arb_object_id(), arb_name()).prop_map(|(parent, name)| OpKind::Unlink { parent, name }),
    ]
}

/// An op kind valid on any object, the root included.
fn arb_attr_kind() -> impl Strategy<Value = OpKind> {
    prop_oneof![
        (
            proptest::option::of(0u32..=0o7777),
            proptest::option::of(any::<i64>())
        )
            .prop_filter("changes something", |(m, t)| m.is_some() || t.is_some())
            .prop_map(|(mode, mtime_ns)| OpKind::SetAttr { mode, mtime_ns }),
        (vec(1u8..=255, 1..=255), vec(any::<u8>(), 0..100))
            .prop_map(|(name, value)| OpKind::SetXattr { name, value }),
        vec(1u8..=255, 1..=255).prop_map(|name| OpKind::RemoveXattr { name }),
    ]
}

/// One valid op, on a fresh object each time (so versions never need chaining).
pub(crate) fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (
            arb_non_root_id(),
            arb_object_id(),
            arb_name(),
            arb_kind(),
            0u32..=0o7777,
            any::<i64>()
        )
            .prop_filter("not own parent", |(object, parent, ..)| object != parent)
            .prop_map(|(object, parent, name, kind, mode, mtime_ns)| Op {
                object,
                base_version: 0,
                new_version: 1,
                kind: OpKind::Create {
                    parent,
                    name,
                    kind,
                    mode,
                    mtime_ns,
                },
            }),
        (arb_non_root_id(), 0u64..(1 << 62), arb_edit_kind())
            .prop_filter("not own parent", |(object, _, kind)| {
                !matches!(kind, OpKind::Rename { new_parent: p, .. }
                    | OpKind::Link { parent: p, .. }
                    | OpKind::Unlink { parent: p, .. } if p == object)
            })
            .prop_map(|(object, base_version, kind)| Op {
                object,
                base_version,
                new_version: base_version + 1,
                kind,
            }),
        (0u64..(1 << 62), arb_attr_kind()).prop_map(|(base_version, kind)| Op {
            object: ObjectId::ROOT,
            base_version,
            new_version: base_version + 1,
            kind,
        }),
    ]
}

/// A valid transaction: its ops get chained versions where they share an object.
pub(crate) fn arb_transaction() -> impl Strategy<Value = Transaction> {
    (
        any::<[u8; 16]>(),
        "[a-z0-9-]{0,20}",
        any::<i64>(),
        vec(arb_op(), 1..6),
    )
        .prop_map(|(id, device, time_ms, mut ops)| {
            chain_versions(&mut ops);
            Transaction {
                id,
                device,
                time_ms,
                ops,
            }
        })
}

/// Rewrites versions so that ops on one object chain (rule 3 of validation).
fn chain_versions(ops: &mut [Op]) {
    let mut last = std::collections::HashMap::new();
    for op in ops.iter_mut() {
        if let Some(&previous) = last.get(&op.object) {
            if matches!(op.kind, OpKind::Create { .. }) {
                // A second Create of one object cannot chain: make it a SetAttr.
                op.kind = OpKind::SetAttr {
                    mode: Some(0o644),
                    mtime_ns: None,
                };
            }
            op.base_version = previous;
            op.new_version = previous + 1;
        }
        last.insert(op.object, op.new_version);
    }
}

pub(crate) fn arb_changelog() -> impl Strategy<Value = ChangeLog> {
    vec(arb_transaction(), 0..5).prop_map(|transactions| ChangeLog { transactions })
}
