//! Delta strategies: how a file's new content travels as a [`Delta`] against its base content,
//! and which strategy a file uses. Pure: no I/O beyond caller-supplied read callbacks.
//!
//! - [`apply`] / [`apply_checked`]: one entry point that applies any [`Delta`].
//! - `ranges`: [`DirtyRanges`], filled by the FUSE layer on each write, and [`ranges_delta`].
//! - `rsync`: [`BlockSignature`], the per-block previous-state signature the store keeps, and
//!   [`rsync_delta`].
//! - `strategy`: [`Strategy`] and [`choose`].
//!
//! What always holds: applying never produces more than the caller's `limit` bytes and never
//! panics on any delta; [`apply_checked`] produces content only when the base and the result
//! both match their BLAKE3 hashes. For every strategy, applying the delta built from an old
//! content and a new content to the old content gives the new content.

pub mod hash_tree;
pub mod ranges;
pub mod rsync;
pub mod strategy;

pub use ranges::{ranges_delta, DirtyRanges};
pub use rsync::{block_size_for, rsync_delta, BlockHash, BlockSignature};
pub use strategy::{choose, ChoiceContext, Strategy, WriteKind};

use crate::changelog::model::{ContentHash, Delta};

/// Why a delta could not be applied or built. Nothing was produced.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("the result would be {size} bytes, more than the limit of {limit}")]
    OutputTooLarge { size: u64, limit: usize },
    #[error("range {index} at offset {offset} with {len} bytes ends past the new size {new_size}")]
    RangeOutOfBounds {
        index: usize,
        offset: u64,
        len: u64,
        new_size: u64,
    },
    #[error("the rsync delta cannot be applied: {0}")]
    Rsync(String),
    #[error("the rsync delta cannot be computed: {0}")]
    RsyncDiff(String),
    #[error("invalid signature: {0}")]
    InvalidSignature(&'static str),
    #[error(
        "the base content does not match the delta's base (hash {actual}, expected {expected}): \
         fetch the whole file"
    )]
    BaseHashMismatch { expected: String, actual: String },
    #[error("the result is {actual} bytes, but the op says {expected}")]
    ResultSizeMismatch { expected: u64, actual: u64 },
    #[error(
        "the result does not match the op's new hash (hash {actual}, expected {expected}): the \
         delta is corrupt"
    )]
    ResultHashMismatch { expected: String, actual: String },
}

fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// Applies `delta` to `base`, producing at most `limit` bytes.
///
/// `Whole` is the content itself; `Ranges` resizes the base to `new_size` (cut, or extended
/// with zeros) then writes each range at its offset, in order; `Rsync` runs
/// `fast_rsync::apply_limited`.
///
/// # Errors
/// [`DeltaError::OutputTooLarge`] if the result would exceed `limit` (checked before
/// allocating), [`DeltaError::RangeOutOfBounds`] for a range past `new_size`,
/// [`DeltaError::Rsync`] for a malformed rsync delta or one that does not fit `base`.
pub fn apply(base: &[u8], delta: &Delta, limit: usize) -> Result<Vec<u8>, DeltaError> {
    match delta {
        Delta::Whole(content) => {
            if content.len() > limit {
                return Err(DeltaError::OutputTooLarge {
                    size: len_u64(content.len()),
                    limit,
                });
            }
            Ok(content.clone())
        }
        Delta::Ranges { new_size, ranges } => {
            let size = usize::try_from(*new_size)
                .ok()
                .filter(|size| *size <= limit)
                .ok_or(DeltaError::OutputTooLarge {
                    size: *new_size,
                    limit,
                })?;
            for (index, (offset, bytes)) in ranges.iter().enumerate() {
                let len = len_u64(bytes.len());
                if offset.checked_add(len).is_none_or(|end| end > *new_size) {
                    return Err(DeltaError::RangeOutOfBounds {
                        index,
                        offset: *offset,
                        len,
                        new_size: *new_size,
                    });
                }
            }
            let kept = base.len().min(size);
            let mut out = Vec::new();
            // Even within the limit, the allocation may be impossible: refuse, don't abort.
            out.try_reserve_exact(size)
                .map_err(|_| DeltaError::OutputTooLarge {
                    size: *new_size,
                    limit,
                })?;
            out.extend_from_slice(&base[..kept]);
            out.resize(size, 0);
            for (offset, bytes) in ranges {
                // In bounds: checked above, and offset + len <= new_size = size fits usize.
                let start = usize::try_from(*offset).unwrap_or(size);
                if let Some(target) = out.get_mut(start..start.saturating_add(bytes.len())) {
                    target.copy_from_slice(bytes);
                }
            }
            Ok(out)
        }
        Delta::Rsync(bytes) => {
            let mut out = Vec::new();
            fast_rsync::apply_limited(base, bytes, &mut out, limit)
                .map_err(|e| DeltaError::Rsync(e.to_string()))?;
            Ok(out)
        }
    }
}

/// Applies `delta` to `base` like [`apply`], verifying BLAKE3 of the base before and of the
/// result after, and the result's size.
///
/// # Errors
/// [`DeltaError::BaseHashMismatch`] if `base` is not the content the delta was made against,
/// [`DeltaError::ResultSizeMismatch`] / [`DeltaError::ResultHashMismatch`] if the result is not
/// the content the op describes, and every error of [`apply`].
pub fn apply_checked(
    base: &[u8],
    base_hash: &ContentHash,
    delta: &Delta,
    new_hash: &ContentHash,
    new_size: u64,
    limit: usize,
) -> Result<Vec<u8>, DeltaError> {
    let actual = blake3::hash(base);
    if actual.as_bytes() != base_hash {
        return Err(DeltaError::BaseHashMismatch {
            expected: hex::encode(base_hash),
            actual: actual.to_hex().to_string(),
        });
    }
    if usize::try_from(new_size).map_or(true, |size| size > limit) {
        return Err(DeltaError::OutputTooLarge {
            size: new_size,
            limit,
        });
    }
    let out = apply(base, delta, limit)?;
    let actual_size = len_u64(out.len());
    if actual_size != new_size {
        return Err(DeltaError::ResultSizeMismatch {
            expected: new_size,
            actual: actual_size,
        });
    }
    let actual = blake3::hash(&out);
    if actual.as_bytes() != new_hash {
        return Err(DeltaError::ResultHashMismatch {
            expected: hex::encode(new_hash),
            actual: actual.to_hex().to_string(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use proptest::collection::vec;
    use proptest::prelude::{any, prop_assert, prop_assert_eq, prop_oneof, proptest};
    use proptest::strategy::Strategy as _;

    use super::*;

    /// One edit as an application makes it, and as the FUSE layer then reports it.
    #[derive(Clone, Debug)]
    enum Edit {
        Overwrite { at: usize, bytes: Vec<u8> },
        Append(Vec<u8>),
        Truncate(usize),
        Insert { at: usize, bytes: Vec<u8> },
        Delete { at: usize, len: usize },
    }

    fn arb_edit() -> impl proptest::strategy::Strategy<Value = Edit> {
        prop_oneof![
            (any::<usize>(), vec(any::<u8>(), 1..300))
                .prop_map(|(at, bytes)| Edit::Overwrite { at, bytes }),
            vec(any::<u8>(), 1..500).prop_map(Edit::Append),
            any::<usize>().prop_map(Edit::Truncate),
            (any::<usize>(), vec(any::<u8>(), 1..100))
                .prop_map(|(at, bytes)| Edit::Insert { at, bytes }),
            (any::<usize>(), 1usize..200).prop_map(|(at, len)| Edit::Delete { at, len }),
        ]
    }

    fn u(n: usize) -> u64 {
        n as u64
    }

    /// Applies `edit` to `content` and reports it to `dirty` as the FUSE layer would: writes
    /// as `insert`, size changes as `truncate`; an insertion or deletion is the application
    /// rewriting the tail in place (and cutting the file for a deletion).
    fn perform(edit: &Edit, content: &mut Vec<u8>, dirty: &mut DirtyRanges) {
        let len = content.len();
        match edit {
            Edit::Overwrite { at, bytes } => {
                // Up to 100 bytes past the end: leaves a hole of zeros.
                let at = at % (len + 100);
                if at + bytes.len() > len {
                    content.resize(at + bytes.len(), 0);
                }
                content[at..at + bytes.len()].copy_from_slice(bytes);
                dirty.insert(u(at), u(bytes.len()));
            }
            Edit::Append(bytes) => {
                content.extend_from_slice(bytes);
                dirty.insert(u(len), u(bytes.len()));
            }
            Edit::Truncate(size) => {
                let size = size % (len + 1000);
                content.resize(size, 0);
                dirty.truncate(u(size));
            }
            Edit::Insert { at, bytes } => {
                let at = at % (len + 1);
                content.splice(at..at, bytes.iter().copied());
                dirty.insert(u(at), u(content.len() - at));
            }
            Edit::Delete { at, len: cut } => {
                if len == 0 {
                    return;
                }
                let at = at % len;
                let end = (at + cut).min(len);
                content.drain(at..end);
                dirty.insert(u(at), u(content.len() - at));
                dirty.truncate(u(content.len()));
            }
        }
    }

    fn read_from(content: &[u8]) -> impl FnMut(u64, &mut [u8]) -> std::io::Result<()> + '_ {
        move |offset, buffer| {
            let start = offset as usize;
            buffer.copy_from_slice(&content[start..start + buffer.len()]);
            Ok(())
        }
    }

    fn hash(content: &[u8]) -> ContentHash {
        *blake3::hash(content).as_bytes()
    }

    const LIMIT: usize = 1 << 20;

    proptest! {
        #[test]
        fn every_strategy_reproduces_the_new_content(
            base in vec(any::<u8>(), 0..20_000),
            edits in vec(arb_edit(), 1..8),
            block_size in 16u32..2048,
        ) {
            let mut new = base.clone();
            let mut dirty = DirtyRanges::new();
            for edit in &edits {
                perform(edit, &mut new, &mut dirty);
            }
            let new_size = u(new.len());

            let whole = Delta::Whole(new.clone());
            let ranges = ranges_delta(&dirty, new_size, read_from(&new)).expect("ranges delta");
            let signature = BlockSignature::calculate_with_block_size(&base, block_size);
            let rsync = rsync_delta(&signature, &new).expect("rsync delta");
            for delta in [&whole, &ranges, &rsync] {
                prop_assert_eq!(&apply(&base, delta, LIMIT).expect("applies"), &new, "{:?}", Strategy::of(delta));
                let checked = apply_checked(&base, &hash(&base), delta, &hash(&new), new_size, LIMIT)
                    .expect("checked apply");
                prop_assert_eq!(&checked, &new);
            }
        }

        #[test]
        fn ranges_delta_reads_only_dirty_bytes(
            base in vec(any::<u8>(), 0..5_000),
            edits in vec(arb_edit(), 1..6),
        ) {
            let mut new = base.clone();
            let mut dirty = DirtyRanges::new();
            for edit in &edits {
                perform(edit, &mut new, &mut dirty);
            }
            let to_send = dirty.to_send(u(new.len()));
            let mut bytes_read = 0u64;
            let delta = ranges_delta(&dirty, u(new.len()), |offset, buffer| {
                let end = offset + u(buffer.len());
                assert!(
                    to_send.iter().any(|(o, l)| *o <= offset && end <= o + l),
                    "read {offset}..{end} outside {to_send:?}"
                );
                bytes_read += u(buffer.len());
                buffer.copy_from_slice(&new[offset as usize..end as usize]);
                Ok(())
            }).expect("ranges delta");
            prop_assert_eq!(bytes_read, to_send.iter().map(|(_, l)| l).sum::<u64>());
            prop_assert_eq!(Strategy::of(&delta), Strategy::Ranges);
        }

        #[test]
        fn updated_signature_equals_a_fresh_one(
            base in vec(any::<u8>(), 0..20_000),
            edits in vec(arb_edit(), 1..8),
            block_size in 16u32..2048,
        ) {
            let mut new = base.clone();
            let mut dirty = DirtyRanges::new();
            for edit in &edits {
                perform(edit, &mut new, &mut dirty);
            }
            let mut signature = BlockSignature::calculate_with_block_size(&base, block_size);
            let changed = dirty.to_send(u(new.len()));
            let mut blocks_read = 0usize;
            signature.update_blocks(u(new.len()), changed, |offset, buffer| {
                blocks_read += 1;
                read_from(&new)(offset, buffer)
            }).expect("update");
            let fresh = BlockSignature::calculate_with_block_size(&new, block_size);
            prop_assert!(blocks_read <= fresh.blocks().len());
            prop_assert_eq!(signature, fresh);
        }

        #[test]
        fn signature_bytes_are_fast_rsyncs(content in vec(any::<u8>(), 0..10_000), block_size in 1u32..3000) {
            let ours = BlockSignature::calculate_with_block_size(&content, block_size);
            let theirs = fast_rsync::Signature::calculate(
                &content,
                fast_rsync::SignatureOptions { block_size, crypto_hash_size: 16 },
            );
            prop_assert_eq!(ours.to_bytes(), theirs.serialized().to_vec());
            let back = BlockSignature::from_bytes(&ours.to_bytes(), u(content.len())).expect("parses");
            prop_assert_eq!(back, ours);
        }

        #[test]
        fn dirty_ranges_match_a_bitmap(
            ops in vec((any::<bool>(), 0u64..400, 0u64..80), 1..40),
        ) {
            let mut dirty = DirtyRanges::new();
            let mut bitmap = vec![false; 500];
            for (is_write, offset, len) in ops {
                if is_write {
                    dirty.insert(offset, len);
                    for b in &mut bitmap[offset as usize..(offset + len) as usize] { *b = true; }
                } else {
                    dirty.truncate(offset);
                    for b in &mut bitmap[offset as usize..] { *b = false; }
                }
            }
            let ranges: Vec<(u64, u64)> = dirty.iter().collect();
            for pair in ranges.windows(2) {
                prop_assert!(pair[0].0 + pair[0].1 < pair[1].0, "not merged: {:?}", ranges);
            }
            let mut from_ranges = vec![false; 500];
            for (offset, len) in &ranges {
                prop_assert!(*len > 0);
                for b in &mut from_ranges[*offset as usize..(offset + len) as usize] { *b = true; }
            }
            prop_assert_eq!(&from_ranges, &bitmap);
            prop_assert_eq!(dirty.total_bytes(), u(bitmap.iter().filter(|b| **b).count()));
        }
    }

    #[test]
    fn dirty_ranges_merge_and_clip() {
        let mut dirty = DirtyRanges::new();
        assert!(dirty.is_empty());
        dirty.insert(10, 5); // 10..15
        dirty.insert(15, 5); // adjacent: 10..20
        dirty.insert(30, 10); // 30..40
        dirty.insert(0, 0); // nothing
        assert_eq!(dirty.iter().collect::<Vec<_>>(), vec![(10, 10), (30, 10)]);
        dirty.insert(18, 13); // bridges: 10..40
        assert_eq!(dirty.iter().collect::<Vec<_>>(), vec![(10, 30)]);
        dirty.insert(50, 1);
        dirty.truncate(35);
        assert_eq!(dirty.iter().collect::<Vec<_>>(), vec![(10, 25)]);
        assert_eq!(dirty.total_bytes(), 25);
        assert_eq!(dirty.shrunk_to(), Some(35));
        // Grown back to 100: the cut base bytes 35..100 must travel too.
        assert_eq!(dirty.to_send(100), vec![(10, 90)]);
        dirty.insert(u64::MAX - 1, 10);
        assert_eq!(dirty.iter().last(), Some((u64::MAX - 1, 1)));
        dirty.clear();
        assert!(dirty.is_empty());
    }

    #[test]
    fn apply_refuses_results_over_the_limit() {
        let too_big = |result: Result<Vec<u8>, DeltaError>| {
            matches!(result, Err(DeltaError::OutputTooLarge { .. }))
        };
        assert!(too_big(apply(b"", &Delta::Whole(vec![0; 11]), 10)));
        assert_eq!(
            apply(b"", &Delta::Whole(vec![0; 10]), 10)
                .expect("at limit")
                .len(),
            10
        );
        let huge = Delta::Ranges {
            new_size: u64::MAX,
            ranges: vec![],
        };
        assert!(too_big(apply(b"", &huge, usize::MAX)));
        let eleven = Delta::Ranges {
            new_size: 11,
            ranges: vec![],
        };
        assert!(too_big(apply(b"", &eleven, 10)));
        let signature = BlockSignature::calculate_with_block_size(b"", 16);
        let rsync = rsync_delta(&signature, &[7; 11]).expect("delta");
        assert!(matches!(
            apply(b"", &rsync, 10),
            Err(DeltaError::Rsync(message)) if message.contains("limit")
        ));
        assert_eq!(apply(b"", &rsync, 11).expect("at limit"), vec![7; 11]);
    }

    #[test]
    fn apply_refuses_bad_ranges_and_corrupt_rsync() {
        let out_of_bounds = Delta::Ranges {
            new_size: 4,
            ranges: vec![(3, vec![1, 2])],
        };
        assert!(matches!(
            apply(b"abcd", &out_of_bounds, 100),
            Err(DeltaError::RangeOutOfBounds {
                index: 0,
                offset: 3,
                len: 2,
                new_size: 4
            })
        ));
        let wrapping = Delta::Ranges {
            new_size: 4,
            ranges: vec![(u64::MAX, vec![1])],
        };
        assert!(matches!(
            apply(b"abcd", &wrapping, 100),
            Err(DeltaError::RangeOutOfBounds { .. })
        ));
        let resized = Delta::Ranges {
            new_size: 6,
            ranges: vec![(1, vec![b'X'])],
        };
        assert_eq!(apply(b"abcd", &resized, 100).expect("applies"), b"aXcd\0\0");
        assert!(matches!(
            apply(b"abcd", &Delta::Rsync(b"junk".to_vec()), 100),
            Err(DeltaError::Rsync(_))
        ));
        // A copy past the end of a shorter base is refused, not read out of bounds.
        let signature = BlockSignature::calculate_with_block_size(&[9; 64], 16);
        let copy = rsync_delta(&signature, &[9; 64]).expect("delta");
        assert!(matches!(
            apply(&[9; 10], &copy, 100),
            Err(DeltaError::Rsync(_))
        ));
    }

    #[test]
    fn apply_checked_verifies_base_and_result() {
        let base = b"hello world".to_vec();
        let new = b"hello there".to_vec();
        let delta = Delta::Ranges {
            new_size: 11,
            ranges: vec![(6, b"there".to_vec())],
        };
        let ok = apply_checked(&base, &hash(&base), &delta, &hash(&new), 11, 100).expect("ok");
        assert_eq!(ok, new);
        let err = apply_checked(b"other base!", &hash(&base), &delta, &hash(&new), 11, 100)
            .expect_err("wrong base");
        assert!(
            matches!(err, DeltaError::BaseHashMismatch { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains(&hex::encode(hash(&base))), "{err}");
        assert!(matches!(
            apply_checked(
                &base,
                &hash(&base),
                &delta,
                &hash(b"something else"),
                11,
                100
            ),
            Err(DeltaError::ResultHashMismatch { .. })
        ));
        assert!(matches!(
            apply_checked(&base, &hash(&base), &delta, &hash(&new), 12, 100),
            Err(DeltaError::ResultSizeMismatch {
                expected: 12,
                actual: 11
            })
        ));
        assert!(matches!(
            apply_checked(&base, &hash(&base), &delta, &hash(&new), 11, 10),
            Err(DeltaError::OutputTooLarge {
                size: 11,
                limit: 10
            })
        ));
    }

    #[test]
    fn signature_from_bytes_refuses_bad_input() {
        let signature = BlockSignature::calculate_with_block_size(&[1; 100], 32);
        let bytes = signature.to_bytes();
        assert_eq!(bytes.len(), 12 + 4 * 20);
        assert!(BlockSignature::from_bytes(&bytes, 100).is_ok());
        assert!(
            BlockSignature::from_bytes(&bytes, 200).is_err(),
            "wrong length"
        );
        assert!(BlockSignature::from_bytes(&bytes[..bytes.len() - 1], 100).is_err());
        assert!(BlockSignature::from_bytes(&bytes[..5], 100).is_err());
        let mut magic = bytes.clone();
        magic[3] = 0x37;
        assert!(
            BlockSignature::from_bytes(&magic, 100).is_err(),
            "BLAKE2 magic"
        );
        let mut zero_block = bytes.clone();
        zero_block[4..8].copy_from_slice(&[0; 4]);
        assert!(BlockSignature::from_bytes(&zero_block, 100).is_err());
    }

    #[test]
    fn block_size_follows_the_square_root_rule() {
        assert_eq!(block_size_for(0), 1024);
        assert_eq!(block_size_for(100_000), 1024);
        assert_eq!(block_size_for(1 << 20), 1024);
        assert_eq!(block_size_for(1025 * 1025), 2048);
        assert_eq!(block_size_for(64 << 20), 8192);
        assert_eq!(block_size_for(1 << 30), 32 * 1024);
        assert_eq!(block_size_for(1 << 40), 64 * 1024);
        assert_eq!(block_size_for(u64::MAX), 64 * 1024);
        assert_eq!(BlockSignature::calculate(&[0; 5000]).block_size(), 1024);
    }

    fn context() -> ChoiceContext {
        ChoiceContext {
            file_size: 10 << 20,
            last_strategy: None,
            write_kind: WriteKind::Rewritten,
            dirty_bytes: 0,
            has_signature: true,
            last_delta_ratio: None,
        }
    }

    #[test]
    fn strategy_rules() {
        let small = ChoiceContext {
            file_size: 64 * 1024,
            write_kind: WriteKind::InPlace,
            dirty_bytes: 10,
            ..context()
        };
        assert_eq!(choose(&small), Strategy::Whole);
        let in_place = ChoiceContext {
            write_kind: WriteKind::InPlace,
            dirty_bytes: 4096,
            last_strategy: Some(Strategy::Whole),
            ..context()
        };
        assert_eq!(choose(&in_place), Strategy::Ranges);
        let dirty_everywhere = ChoiceContext {
            dirty_bytes: 10 << 20,
            ..in_place
        };
        assert_eq!(
            choose(&dirty_everywhere),
            Strategy::Whole,
            "remembered Whole"
        );
        assert_eq!(choose(&context()), Strategy::Rsync);
        let no_signature = ChoiceContext {
            has_signature: false,
            last_strategy: Some(Strategy::Rsync),
            ..context()
        };
        assert_eq!(choose(&no_signature), Strategy::Whole);
        let rsync_paid = ChoiceContext {
            last_strategy: Some(Strategy::Rsync),
            last_delta_ratio: Some(0.2),
            ..context()
        };
        assert_eq!(choose(&rsync_paid), Strategy::Rsync);
        let rsync_did_not_pay = ChoiceContext {
            last_delta_ratio: Some(0.95),
            ..rsync_paid
        };
        assert_eq!(choose(&rsync_did_not_pay), Strategy::Whole);
        let after_ranges = ChoiceContext {
            last_strategy: Some(Strategy::Ranges),
            last_delta_ratio: Some(0.99),
            ..context()
        };
        assert_eq!(
            choose(&after_ranges),
            Strategy::Rsync,
            "ranges ratio says nothing of rsync"
        );
        let remembered_whole = ChoiceContext {
            last_strategy: Some(Strategy::Whole),
            ..context()
        };
        assert_eq!(choose(&remembered_whole), Strategy::Whole);
    }

    #[test]
    fn strategy_bytes_roundtrip() {
        for strategy in [Strategy::Ranges, Strategy::Rsync, Strategy::Whole] {
            assert_eq!(Strategy::from_u8(strategy.as_u8()), Some(strategy));
        }
        assert_eq!(Strategy::from_u8(0), None);
        assert_eq!(Strategy::from_u8(4), None);
        assert_eq!(
            [Strategy::Ranges, Strategy::Rsync, Strategy::Whole].map(Strategy::as_u8),
            [1, 2, 3]
        );
    }
}
