//! The change-log format: the universal, platform-independent description of what changed
//! in a user's tree. Pure: no I/O beyond byte slices.
//!
//! - `model`: the data model every part shares.
//! - `limits`: the hard bounds of the format.
//! - `validate`: the rules a log obeys beyond its byte layout.
//! - `encoding`: the versioned binary encoding (`docs/change-log-format.md`).
//!
//! What always holds: whatever [`decode_changelog`] or [`decode_transaction`] returns passed
//! [`validate`], and encoding it again then decoding gives an equal value.

pub mod encoding;
pub mod limits;
pub mod model;
pub mod payload;
pub mod validate;

#[cfg(test)]
pub(crate) mod arbitrary;

pub use encoding::{
    declared_body_len, decode_changelog, decode_transaction, encode_changelog,
    encode_changelog_checked, encode_transaction, encode_transaction_checked, DecodeError,
    EncodeError,
};
pub use model::*;
pub use validate::{validate, validate_transaction, ValidationError, Violation};
