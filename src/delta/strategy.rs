//! Strategy selection: which kind of delta a file's change travels as.
//!
//! Owns [`Strategy`], [`ChoiceContext`] and [`choose`]. What always holds: [`choose`] is a pure
//! function of its context and only returns a strategy that can serve it (`Rsync` only with a
//! signature, `Ranges` only for in-place writes with known dirty ranges); `Whole` can always
//! serve, so it is the fallback. The rules, in order:
//!
//! 1. A small file (at most [`SMALL_FILE_MAX`] bytes) travels `Whole`: any delta would save
//!    too little to pay for itself.
//! 2. An in-place write with known dirty ranges covering less than the whole file travels as
//!    `Ranges`: it carries exactly the changed bytes, which no other strategy beats.
//! 3. Otherwise the file was rewritten (truncated to 0 and written again, replaced by a rename,
//!    or dirty everywhere). The remembered strategy wins while it still applies: `Whole` stays
//!    `Whole`; `Rsync` stays `Rsync` while a signature exists and the last delta/file ratio
//!    was at most [`RSYNC_GIVE_UP_RATIO`].
//! 4. With no remembered strategy that applies: `Rsync` if a signature exists and the last
//!    ratio (if any, from an rsync delta) did not show rsync failing to pay, else `Whole`.
//!
//! So a file that fell back to `Whole` because rsync did not pay stays there while it keeps
//! being rewritten whole; an in-place edit (rule 2) makes it `Ranges`, and its next whole
//! rewrite tries `Rsync` again.

/// A delta strategy; the store remembers the one last used per file ([`Strategy::as_u8`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// `Delta::Ranges` from the dirty ranges the FUSE layer recorded.
    Ranges,
    /// `Delta::Rsync` against the previous-state signature.
    Rsync,
    /// `Delta::Whole`: the whole new content.
    Whole,
}

impl Strategy {
    /// The stable byte the store keeps for this strategy: 1, 2, 3.
    pub fn as_u8(self) -> u8 {
        match self {
            Strategy::Ranges => 1,
            Strategy::Rsync => 2,
            Strategy::Whole => 3,
        }
    }

    /// The strategy of a byte written by [`Strategy::as_u8`]; `None` for any other byte.
    pub fn from_u8(byte: u8) -> Option<Strategy> {
        match byte {
            1 => Some(Strategy::Ranges),
            2 => Some(Strategy::Rsync),
            3 => Some(Strategy::Whole),
            _ => None,
        }
    }

    /// The strategy a delta was made with.
    pub fn of(delta: &crate::changelog::model::Delta) -> Strategy {
        use crate::changelog::model::Delta;
        match delta {
            Delta::Whole(_) => Strategy::Whole,
            Delta::Ranges { .. } => Strategy::Ranges,
            Delta::Rsync(_) => Strategy::Rsync,
        }
    }
}

/// Files up to this size (64 KiB) always travel whole.
pub const SMALL_FILE_MAX: u64 = 64 * 1024;

/// An rsync delta larger than this fraction of the file did not pay: the file goes `Whole`.
pub const RSYNC_GIVE_UP_RATIO: f64 = 0.9;

/// How the file's new content came about since its base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteKind {
    /// Written in place; the dirty ranges are known.
    InPlace,
    /// Rewritten whole: truncated to 0 and written again, or replaced by a rename.
    Rewritten,
}

/// What [`choose`] knows about a file's change.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChoiceContext {
    /// The new content's size in bytes.
    pub file_size: u64,
    /// The strategy that served this file last, if any.
    pub last_strategy: Option<Strategy>,
    /// How the new content was written.
    pub write_kind: WriteKind,
    /// Bytes the dirty ranges cover (`DirtyRanges::to_send` total) for `InPlace` writes.
    pub dirty_bytes: u64,
    /// Whether a previous-state signature of the base exists.
    pub has_signature: bool,
    /// The last delta's size divided by the file's size, if known.
    pub last_delta_ratio: Option<f64>,
}

/// Chooses the strategy for one file's change (rules in the module documentation).
pub fn choose(context: &ChoiceContext) -> Strategy {
    if context.file_size <= SMALL_FILE_MAX {
        return Strategy::Whole;
    }
    if context.write_kind == WriteKind::InPlace && context.dirty_bytes < context.file_size {
        return Strategy::Ranges;
    }
    let rsync_paid = !(context.last_strategy == Some(Strategy::Rsync)
        && context
            .last_delta_ratio
            .is_some_and(|ratio| ratio.is_nan() || ratio > RSYNC_GIVE_UP_RATIO));
    match context.last_strategy {
        Some(Strategy::Whole) => Strategy::Whole,
        _ if context.has_signature && rsync_paid => Strategy::Rsync,
        _ => Strategy::Whole,
    }
}
