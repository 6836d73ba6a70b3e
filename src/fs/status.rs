//! The per-file sync status: the virtual, read-only extended attribute
//! `user.deltadrive.status` on every file and folder of the mount.
//!
//! What always holds:
//! - It is computed at each read, never stored: reading it changes nothing (no pending
//!   mark, no store write), and it is never synced (it is not in the store, and capture
//!   skips every `user.deltadrive.` name anyway).
//! - `setxattr`/`removexattr` of it fail with `EPERM` (the operation is not permitted to
//!   anyone, whatever the file's permissions); `listxattr` does not list it, like other
//!   virtual attributes, so `cp -a`, `rsync -X` and `tar --xattrs` do not try to copy it.
//!
//! The values: `ignored` (the path stays on this device), `pending` (unsealed changes, an
//! outbox entry the server has not acknowledged, or not announced yet), `conflict` (a
//! conflicted copy this device made, from the inode's record; renaming it settles it), `online-only` (synced, content not on this device: files on
//! demand), `synced` otherwise. The root folder speaks for the whole
//! device: `pending` while anything at all waits, else `synced`.

use fuser::Errno;

use super::errors::FsResult;
use super::FsCore;
use crate::store::{FileKind, ROOT_INO};

/// The attribute's name.
pub const STATUS_XATTR: &[u8] = b"user.deltadrive.status";

/// One object's sync status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncStatus {
    Synced,
    Pending,
    Ignored,
    Conflict,
    /// Synced, and its content is not (entirely) on this device (files on demand).
    OnlineOnly,
}

impl SyncStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncStatus::Synced => "synced",
            SyncStatus::Pending => "pending",
            SyncStatus::Ignored => "ignored",
            SyncStatus::Conflict => "conflict",
            SyncStatus::OnlineOnly => "online-only",
        }
    }
}

/// The errno of a write or removal of the status attribute.
pub const STATUS_WRITE_ERRNO: Errno = Errno::EPERM;

impl FsCore {
    /// The sync status of inode `ino`.
    pub(super) fn sync_status(&self, ino: u64) -> FsResult<SyncStatus> {
        let i = self.inode(ino)?;
        if i.ino == ROOT_INO {
            let busy = self.capture.any_pending() || !self.store.outbox_is_empty()?;
            return Ok(if busy {
                SyncStatus::Pending
            } else {
                SyncStatus::Synced
            });
        }
        // Sockets, FIFOs and device nodes never sync.
        if !matches!(
            i.kind,
            FileKind::File | FileKind::Directory | FileKind::Symlink
        ) || self.capture.ignore().is_ignored(&self.store, &i)?
        {
            return Ok(SyncStatus::Ignored);
        }
        if self.capture.has_pending(&i.object)
            || self.store.outbox_touches(&i.object)?
            || self.store.object_state(&i.object)?.is_none()
        {
            return Ok(SyncStatus::Pending);
        }
        if i.flags & crate::store::absent::INODE_CONFLICT != 0 {
            return Ok(SyncStatus::Conflict);
        }
        if i.flags & crate::store::absent::INODE_ABSENT != 0 {
            return Ok(SyncStatus::OnlineOnly);
        }
        Ok(SyncStatus::Synced)
    }
}
