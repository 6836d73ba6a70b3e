//! What a content op (`Write`, `Truncate`) makes of a file's bytes held in memory: the device's
//! apply, the simulation's server and the test replay build new content with it (the server
//! builds it chunk by chunk in `server/content.rs`).
//!
//! What always holds: the result is exactly `new_size` bytes hashing to `new_hash`, built from
//! content whose hash is the op's base hash, and never larger than the caller's limit;
//! anything else is an error and nothing is returned.

use crate::changelog::{ObjectId, OpKind};
use crate::delta::{self, DeltaError};

use super::ContentChange;

/// Why a content op does not give its content.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error(transparent)]
    Delta(#[from] DeltaError),
    #[error("size too large")]
    TooLarge,
    #[error("truncate of {0} does not give its hash")]
    TruncateHash(ObjectId),
}

impl<'op> ContentChange<'op> {
    /// The content change of a `Write` or `Truncate`; `None` for other ops.
    pub fn of(kind: &'op OpKind) -> Option<ContentChange<'op>> {
        match super::effect_of_kind(kind) {
            Some(super::Effect::Content(c)) => Some(c),
            _ => None,
        }
    }

    /// The content after the op, from `base` (the file's content before it); at most `limit`
    /// bytes.
    ///
    /// # Errors
    /// A base that is not the op's base, a delta that does not apply or gives other content, a
    /// result over `limit`, a truncate that does not give its hash.
    pub fn apply_to(
        &self,
        object: ObjectId,
        mut base: Vec<u8>,
        limit: usize,
    ) -> Result<Vec<u8>, ContentError> {
        match *self {
            ContentChange::Write {
                base_hash,
                delta,
                new_size,
                new_hash,
            } => Ok(delta::apply_checked(
                &base, base_hash, delta, new_hash, new_size, limit,
            )?),
            ContentChange::Truncate { new_size, new_hash } => {
                let n = usize::try_from(new_size).map_err(|_| ContentError::TooLarge)?;
                if n > limit {
                    return Err(ContentError::TooLarge);
                }
                base.resize(n, 0);
                if blake3::hash(&base).as_bytes() != new_hash {
                    return Err(ContentError::TruncateHash(object));
                }
                Ok(base)
            }
        }
    }
}
