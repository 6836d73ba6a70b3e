//! Every failure becomes an errno here, in one place.
//!
//! Store failures are logged once (they mean the device's disk or database is in trouble)
//! and surface as `EIO`, except a full disk, which stays `ENOSPC` so programs can tell.

use fuser::{Errno, ReplyEmpty};

use crate::store::StoreError;

pub type FsResult<T> = Result<T, Errno>;

impl From<StoreError> for Errno {
    fn from(e: StoreError) -> Errno {
        match e {
            StoreError::Io(io) => {
                if io.raw_os_error() != Some(libc::ENOSPC) {
                    tracing::error!("local store I/O failed: {io}");
                }
                Errno::from(io)
            }
            other => {
                let msg = other.to_string();
                if msg.contains("No space left") {
                    return Errno::ENOSPC;
                }
                tracing::error!("{msg}");
                Errno::EIO
            }
        }
    }
}

pub fn reply_empty(reply: ReplyEmpty, r: FsResult<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}
