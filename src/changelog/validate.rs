//! Validation of change logs: the rules every log obeys beyond its byte layout.
//!
//! Owns [`validate`], [`validate_transaction`] and [`ValidationError`]. What always holds: the
//! decoder runs these checks on everything it decodes, so a decoded log obeys every rule below;
//! the rules need no state (no knowledge of the user's tree), only the log itself. The rules:
//!
//! 1. A log holds at most [`MAX_TRANSACTIONS_PER_LOG`] transactions, [`MAX_OPS_PER_LOG`] ops
//!    and [`MAX_RANGES_PER_LOG`] ranges in all; a transaction holds
//!    1..=[`MAX_OPS_PER_TRANSACTION`] ops and a device name of at most [`MAX_DEVICE_NAME_LEN`] bytes.
//! 2. Every op has `new_version == base_version + 1`.
//! 3. Within one transaction, the ops on one object chain: an op's `base_version` equals the
//!    `new_version` of the previous op on the same object in that transaction.
//! 4. `Create` has `base_version == 0`, is not on [`ObjectId::ROOT`], is not its own parent,
//!    has a valid name ([`Name::check`]), mode at most [`MAX_MODE`], and a symlink target of
//!    1..=[`MAX_SYMLINK_TARGET_LEN`] bytes without NUL.
//! 5. [`ObjectId::ROOT`] only takes `SetAttr`, `SetXattr` and `RemoveXattr`: never `Create`,
//!    `Write`, `Truncate`, `Rename`, `Delete`, `Link` or `Unlink`.
//! 6. `Rename`, `Link` and `Unlink` have a valid name in a folder that is not the object
//!    itself (format version 2 adds `Link` and `Unlink`).
//! 7. `Write`: `new_size <= MAX_FILE_SIZE`; `Whole` content is exactly `new_size` bytes;
//!    `Ranges` states the same `new_size` as the op, has at most [`MAX_RANGES_PER_DELTA`]
//!    ranges, each non-empty and lying within `new_size`; the payload of any delta is at most
//!    [`MAX_DELTA_LEN`] bytes; an `Rsync` delta starts with the rsync delta magic.
//! 8. `Truncate`: `new_size <= MAX_FILE_SIZE`.
//! 9. `SetAttr` changes something (at least one field is `Some`), and its mode is at most
//!    [`MAX_MODE`].
//! 10. Extended attribute names are 1..=[`MAX_XATTR_NAME_LEN`] bytes without NUL; values are at
//!     most [`MAX_XATTR_VALUE_LEN`] bytes.

use std::collections::HashMap;
use std::fmt;

use super::limits::{
    MAX_DELTA_LEN, MAX_DEVICE_NAME_LEN, MAX_FILE_SIZE, MAX_MODE, MAX_OPS_PER_LOG,
    MAX_OPS_PER_TRANSACTION, MAX_RANGES_PER_DELTA, MAX_RANGES_PER_LOG, MAX_SYMLINK_TARGET_LEN,
    MAX_TRANSACTIONS_PER_LOG, MAX_XATTR_NAME_LEN, MAX_XATTR_VALUE_LEN,
};
use super::model::{ChangeLog, Delta, Name, ObjectId, ObjectKind, Op, OpKind, Transaction};

/// The first four bytes of every rsync delta (librsync's `RS_DELTA_MAGIC`, big-endian).
pub const RSYNC_DELTA_MAGIC: [u8; 4] = 0x7273_0236_u32.to_be_bytes();

/// Where in a log a rule was broken, and which rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {violation}", Location { transaction: *.transaction, op: *.op })]
pub struct ValidationError {
    /// Index of the transaction in the log (0 for a single transaction).
    pub transaction: usize,
    /// Index of the op in the transaction, if the rule is about one op.
    pub op: Option<usize>,
    /// The rule that was broken.
    pub violation: Violation,
}

struct Location {
    transaction: usize,
    op: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.op {
            Some(op) => write!(f, "transaction {}, op {}", self.transaction, op),
            None => write!(f, "transaction {}", self.transaction),
        }
    }
}

/// A broken validation rule (see the module documentation for the list).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("the log holds {count} transactions, more than the limit of {max}")]
    TooManyTransactions { count: u64, max: u64 },
    #[error("the log holds {count} ops in all, more than the limit of {max}", max = MAX_OPS_PER_LOG)]
    TooManyOpsInLog { count: u64 },
    #[error("the log holds {count} ranges in all, more than the limit of {max}", max = MAX_RANGES_PER_LOG)]
    TooManyRangesInLog { count: u64 },
    #[error("the transaction holds no op")]
    EmptyTransaction,
    #[error("the transaction holds {count} ops, more than the limit of {max}")]
    TooManyOps { count: u64, max: u64 },
    #[error("device name is {len} bytes, longer than the limit of {max}")]
    DeviceNameTooLong { len: u64, max: u64 },
    #[error("new version {new} is not base version {base} + 1")]
    VersionNotIncremented { base: u64, new: u64 },
    #[error(
        "op on object {object} has base version {base}, but the previous op on it in this \
         transaction made version {expected}"
    )]
    VersionChainBroken {
        object: ObjectId,
        base: u64,
        expected: u64,
    },
    #[error("Create must have base version 0, not {base}")]
    CreateWithBase { base: u64 },
    #[error("{op} is not allowed on the root folder")]
    NotAllowedOnRoot { op: &'static str },
    #[error("an object cannot be its own parent")]
    OwnParent,
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("mode {mode:#o} has bits outside {max:#o}", max = MAX_MODE)]
    InvalidMode { mode: u32 },
    #[error("symlink target is {len} bytes; it must be 1..={max} bytes", max = MAX_SYMLINK_TARGET_LEN)]
    SymlinkTargetLength { len: u64 },
    #[error("symlink target contains NUL")]
    SymlinkTargetNul,
    #[error("file size {size} is larger than the limit of {max}", max = MAX_FILE_SIZE)]
    FileTooLarge { size: u64 },
    #[error("whole content is {len} bytes but the op says the new size is {new_size}")]
    WholeSizeMismatch { len: u64, new_size: u64 },
    #[error("ranges delta says new size {delta_size} but the op says {op_size}")]
    RangesSizeMismatch { delta_size: u64, op_size: u64 },
    #[error("ranges delta holds {count} ranges, more than the limit of {max}", max = MAX_RANGES_PER_DELTA)]
    TooManyRanges { count: u64 },
    #[error("range {index} is empty")]
    EmptyRange { index: usize },
    #[error("range {index} at offset {offset} with {len} bytes ends past the new size {new_size}")]
    RangeOutOfBounds {
        index: usize,
        offset: u64,
        len: u64,
        new_size: u64,
    },
    #[error("delta carries {len} bytes, more than the limit of {max}", max = MAX_DELTA_LEN)]
    DeltaTooLarge { len: u64 },
    #[error("rsync delta does not start with the rsync delta magic 72730236")]
    RsyncMagic,
    #[error("SetAttr changes nothing (mode and mtime both absent)")]
    EmptySetAttr,
    #[error("xattr name is {len} bytes; it must be 1..={max} bytes", max = MAX_XATTR_NAME_LEN)]
    XattrNameLength { len: u64 },
    #[error("xattr name contains NUL")]
    XattrNameNul,
    #[error("xattr value is {len} bytes, more than the limit of {max}", max = MAX_XATTR_VALUE_LEN)]
    XattrValueTooLarge { len: u64 },
}

/// Checks every rule of the module documentation on a whole log.
///
/// # Errors
/// The first broken rule, with the index of its transaction and op.
pub fn validate(log: &ChangeLog) -> Result<(), ValidationError> {
    let count = len_u64(log.transactions.len());
    if count > MAX_TRANSACTIONS_PER_LOG {
        return Err(ValidationError {
            transaction: 0,
            op: None,
            violation: Violation::TooManyTransactions {
                count,
                max: MAX_TRANSACTIONS_PER_LOG,
            },
        });
    }
    let mut totals = Totals::default();
    for (index, transaction) in log.transactions.iter().enumerate() {
        check_transaction(transaction, &mut totals).map_err(|mut e| {
            e.transaction = index;
            e
        })?;
    }
    Ok(())
}

/// Counts across a whole log, for the per-log limits.
#[derive(Default)]
struct Totals {
    ops: u64,
    ranges: u64,
}

impl Totals {
    fn add(&mut self, op: &Op) -> Result<(), Violation> {
        self.ops = self.ops.saturating_add(1);
        if self.ops > MAX_OPS_PER_LOG {
            return Err(Violation::TooManyOpsInLog { count: self.ops });
        }
        if let OpKind::Write {
            delta: Delta::Ranges { ranges, .. },
            ..
        } = &op.kind
        {
            self.ranges = self.ranges.saturating_add(len_u64(ranges.len()));
            if self.ranges > MAX_RANGES_PER_LOG {
                return Err(Violation::TooManyRangesInLog { count: self.ranges });
            }
        }
        Ok(())
    }
}

/// Checks every rule of the module documentation on one transaction.
///
/// # Errors
/// The first broken rule (its `transaction` index is 0).
pub fn validate_transaction(transaction: &Transaction) -> Result<(), ValidationError> {
    check_transaction(transaction, &mut Totals::default())
}

fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

fn check_transaction(
    transaction: &Transaction,
    totals: &mut Totals,
) -> Result<(), ValidationError> {
    let at_tx = |violation| ValidationError {
        transaction: 0,
        op: None,
        violation,
    };
    let device_len = len_u64(transaction.device.len());
    if device_len > MAX_DEVICE_NAME_LEN {
        return Err(at_tx(Violation::DeviceNameTooLong {
            len: device_len,
            max: MAX_DEVICE_NAME_LEN,
        }));
    }
    if transaction.ops.is_empty() {
        return Err(at_tx(Violation::EmptyTransaction));
    }
    let count = len_u64(transaction.ops.len());
    if count > MAX_OPS_PER_TRANSACTION {
        return Err(at_tx(Violation::TooManyOps {
            count,
            max: MAX_OPS_PER_TRANSACTION,
        }));
    }
    let mut last_version: HashMap<ObjectId, u64> = HashMap::new();
    for (index, op) in transaction.ops.iter().enumerate() {
        let at_op = |violation| ValidationError {
            transaction: 0,
            op: Some(index),
            violation,
        };
        check_op(op).map_err(at_op)?;
        totals.add(op).map_err(at_op)?;
        if let Some(&expected) = last_version.get(&op.object) {
            if op.base_version != expected {
                return Err(at_op(Violation::VersionChainBroken {
                    object: op.object,
                    base: op.base_version,
                    expected,
                }));
            }
        }
        last_version.insert(op.object, op.new_version);
    }
    Ok(())
}

fn check_name(name: &Name) -> Result<(), Violation> {
    Name::check(name.as_bytes()).map_err(|reason| Violation::InvalidName {
        name: String::from_utf8_lossy(name.as_bytes()).into_owned(),
        reason,
    })
}

fn check_mode(mode: u32) -> Result<(), Violation> {
    if mode > MAX_MODE {
        return Err(Violation::InvalidMode { mode });
    }
    Ok(())
}

fn check_xattr_name(name: &[u8]) -> Result<(), Violation> {
    let len = len_u64(name.len());
    if len == 0 || len > MAX_XATTR_NAME_LEN {
        return Err(Violation::XattrNameLength { len });
    }
    if name.contains(&0) {
        return Err(Violation::XattrNameNul);
    }
    Ok(())
}

fn check_file_size(size: u64) -> Result<(), Violation> {
    if size > MAX_FILE_SIZE {
        return Err(Violation::FileTooLarge { size });
    }
    Ok(())
}

/// The name of an op kind, as used in error messages.
fn op_name(kind: &OpKind) -> &'static str {
    match kind {
        OpKind::Create { .. } => "Create",
        OpKind::Write { .. } => "Write",
        OpKind::Truncate { .. } => "Truncate",
        OpKind::Rename { .. } => "Rename",
        OpKind::Delete => "Delete",
        OpKind::SetAttr { .. } => "SetAttr",
        OpKind::SetXattr { .. } => "SetXattr",
        OpKind::RemoveXattr { .. } => "RemoveXattr",
        OpKind::Link { .. } => "Link",
        OpKind::Unlink { .. } => "Unlink",
    }
}

fn check_op(op: &Op) -> Result<(), Violation> {
    if op.base_version.checked_add(1) != Some(op.new_version) {
        return Err(Violation::VersionNotIncremented {
            base: op.base_version,
            new: op.new_version,
        });
    }
    let allowed_on_root = matches!(
        op.kind,
        OpKind::SetAttr { .. } | OpKind::SetXattr { .. } | OpKind::RemoveXattr { .. }
    );
    if op.object == ObjectId::ROOT && !allowed_on_root {
        return Err(Violation::NotAllowedOnRoot {
            op: op_name(&op.kind),
        });
    }
    match &op.kind {
        OpKind::Create {
            parent,
            name,
            kind,
            mode,
            mtime_ns: _,
        } => {
            if op.base_version != 0 {
                return Err(Violation::CreateWithBase {
                    base: op.base_version,
                });
            }
            if *parent == op.object {
                return Err(Violation::OwnParent);
            }
            check_name(name)?;
            check_mode(*mode)?;
            if let ObjectKind::Symlink { target } = kind {
                let len = len_u64(target.len());
                if len == 0 || len > MAX_SYMLINK_TARGET_LEN {
                    return Err(Violation::SymlinkTargetLength { len });
                }
                if target.contains(&0) {
                    return Err(Violation::SymlinkTargetNul);
                }
            }
        }
        OpKind::Write {
            base_hash: _,
            new_hash: _,
            new_size,
            delta,
        } => {
            check_file_size(*new_size)?;
            check_delta(delta, *new_size)?;
        }
        OpKind::Truncate {
            new_size,
            new_hash: _,
        } => check_file_size(*new_size)?,
        OpKind::Rename {
            new_parent,
            new_name,
        } => {
            if *new_parent == op.object {
                return Err(Violation::OwnParent);
            }
            check_name(new_name)?;
        }
        OpKind::Delete => {}
        OpKind::SetAttr { mode, mtime_ns } => {
            if mode.is_none() && mtime_ns.is_none() {
                return Err(Violation::EmptySetAttr);
            }
            if let Some(mode) = mode {
                check_mode(*mode)?;
            }
        }
        OpKind::SetXattr { name, value } => {
            check_xattr_name(name)?;
            let len = len_u64(value.len());
            if len > MAX_XATTR_VALUE_LEN {
                return Err(Violation::XattrValueTooLarge { len });
            }
        }
        OpKind::RemoveXattr { name } => check_xattr_name(name)?,
        OpKind::Link { parent, name } | OpKind::Unlink { parent, name } => {
            if *parent == op.object {
                return Err(Violation::OwnParent);
            }
            check_name(name)?;
        }
    }
    Ok(())
}

fn check_delta(delta: &Delta, op_new_size: u64) -> Result<(), Violation> {
    match delta {
        Delta::Whole(content) => {
            let len = len_u64(content.len());
            if len > MAX_DELTA_LEN {
                return Err(Violation::DeltaTooLarge { len });
            }
            if len != op_new_size {
                return Err(Violation::WholeSizeMismatch {
                    len,
                    new_size: op_new_size,
                });
            }
        }
        Delta::Ranges { new_size, ranges } => {
            if *new_size != op_new_size {
                return Err(Violation::RangesSizeMismatch {
                    delta_size: *new_size,
                    op_size: op_new_size,
                });
            }
            let count = len_u64(ranges.len());
            if count > MAX_RANGES_PER_DELTA {
                return Err(Violation::TooManyRanges { count });
            }
            let mut total: u64 = 0;
            for (index, (offset, bytes)) in ranges.iter().enumerate() {
                let len = len_u64(bytes.len());
                if len == 0 {
                    return Err(Violation::EmptyRange { index });
                }
                let in_bounds = offset.checked_add(len).is_some_and(|end| end <= *new_size);
                if !in_bounds {
                    return Err(Violation::RangeOutOfBounds {
                        index,
                        offset: *offset,
                        len,
                        new_size: *new_size,
                    });
                }
                total = total.saturating_add(len);
                if total > MAX_DELTA_LEN {
                    return Err(Violation::DeltaTooLarge { len: total });
                }
            }
        }
        Delta::Rsync(bytes) => {
            let len = len_u64(bytes.len());
            if len > MAX_DELTA_LEN {
                return Err(Violation::DeltaTooLarge { len });
            }
            if !bytes.starts_with(&RSYNC_DELTA_MAGIC) {
                return Err(Violation::RsyncMagic);
            }
        }
    }
    Ok(())
}
