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
            let mut out = Vec::with_capacity(size);
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
