//! The change-log data model: what a device says happened to a user's tree.
//!
//! This is the contract shared by every part of deltadrive: the FUSE layer and the
//! delta engine produce it, the server orders and stores it, the sync engine applies it.
//! It names objects by stable ids, never by paths, so a rename is one small op and edits
//! compose with renames. Every op carries the object's base version (the version the
//! device saw) and its new version (`base + 1`); the server refuses a stale base.
//!
//! Invariants (checked by [`crate::changelog::validate`]):
//! - a [`Name`] is 1..=255 bytes, holds no `/` and no NUL, and is not `.` or `..`;
//! - `new_version == base_version + 1`, and `Create` has `base_version == 0`;
//! - a transaction holds at least one op.

use std::fmt;

/// A stable identity of a file, directory or symlink, chosen by the device that
/// created it (random, 128 bits). The root folder of every user's tree is [`ObjectId::ROOT`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ObjectId(pub [u8; 16]);

impl ObjectId {
    /// The root folder of a user's tree. It always exists and has no parent.
    pub const ROOT: ObjectId = ObjectId([0; 16]);

    /// A fresh random id.
    pub fn random() -> ObjectId {
        ObjectId(rand::random())
    }

    /// Lowercase hex, 32 characters (the form used in file names and URLs).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses the form written by [`ObjectId::to_hex`].
    pub fn from_hex(s: &str) -> Option<ObjectId> {
        let bytes = hex::decode(s).ok()?;
        Some(ObjectId(bytes.try_into().ok()?))
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({})", self.to_hex())
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The version of one object: 0 before it exists, then +1 for each op applied to it
/// in the server's order.
pub type Version = u64;

/// A BLAKE3 hash of a file's whole content.
pub type ContentHash = [u8; 32];

/// The BLAKE3 hash of empty content.
pub fn empty_hash() -> ContentHash {
    *blake3::hash(&[]).as_bytes()
}

/// One directory entry name, as bytes (Linux names need not be UTF-8). Each device adapts
/// names its platform cannot hold; the log keeps the original.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(pub Vec<u8>);

impl Name {
    /// The longest name accepted, in bytes.
    pub const MAX_LEN: usize = 255;

    /// Checks the rules every name obeys: 1..=255 bytes, no `/`, no NUL, not `.` or `..`.
    pub fn check(bytes: &[u8]) -> Result<(), &'static str> {
        if bytes.is_empty() {
            return Err("empty name");
        }
        if bytes.len() > Self::MAX_LEN {
            return Err("name longer than 255 bytes");
        }
        if bytes == b"." || bytes == b".." {
            return Err("name is . or ..");
        }
        if bytes.contains(&b'/') {
            return Err("name contains /");
        }
        if bytes.contains(&0) {
            return Err("name contains NUL");
        }
        Ok(())
    }

    /// A checked name.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Name, &'static str> {
        let bytes = bytes.into();
        Self::check(&bytes)?;
        Ok(Name(bytes))
    }

    /// The name as raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

/// What kind of object a `Create` makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObjectKind {
    /// A regular file; its content arrives in later `Write` ops (empty until then).
    File,
    /// A directory.
    Directory,
    /// A symbolic link to `target` (bytes, not interpreted).
    Symlink { target: Vec<u8> },
}

/// How a file's new content is expressed against its base content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delta {
    /// The whole new content.
    Whole(Vec<u8>),
    /// The base content resized to `new_size` (cut, or extended with zeros), then each
    /// range's bytes written at its offset, in order.
    Ranges {
        new_size: u64,
        ranges: Vec<(u64, Vec<u8>)>,
    },
    /// An rsync delta (fast_rsync / librsync format) against the base content.
    Rsync(Vec<u8>),
}

/// What an op does to its object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Makes a new object named `name` in folder `parent`.
    Create {
        parent: ObjectId,
        name: Name,
        kind: ObjectKind,
        /// Permission bits (`0o7777` at most).
        mode: u32,
        /// Modification time, nanoseconds since the Unix epoch.
        mtime_ns: i64,
    },
    /// Replaces a file's content. `base_hash` is the content the delta applies to.
    Write {
        base_hash: ContentHash,
        new_hash: ContentHash,
        new_size: u64,
        delta: Delta,
    },
    /// Cuts or extends (with zeros) a file's content.
    Truncate {
        new_size: u64,
        new_hash: ContentHash,
    },
    /// Moves the object to another folder and/or name. Only for an object with one name: a
    /// name of an object with several moves as `Link` of the new name and `Unlink` of the old.
    Rename {
        new_parent: ObjectId,
        new_name: Name,
    },
    /// Removes the object (a folder: only once it is empty, in the same transaction or before).
    Delete,
    /// Changes attributes; `None` leaves one as it is.
    SetAttr {
        mode: Option<u32>,
        mtime_ns: Option<i64>,
    },
    /// Sets an extended attribute.
    SetXattr { name: Vec<u8>, value: Vec<u8> },
    /// Removes an extended attribute.
    RemoveXattr { name: Vec<u8> },
    /// Gives a file or symlink one more name, `name` in folder `parent` (a hard link): the
    /// names are one object, with one content. Format version 2.
    Link { parent: ObjectId, name: Name },
    /// Takes one name away from an object that has several (removing the last name is a
    /// `Delete`). Format version 2.
    Unlink { parent: ObjectId, name: Name },
}

/// One change to one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    pub object: ObjectId,
    /// The version this change was made against (0 for `Create`).
    pub base_version: Version,
    /// Always `base_version + 1`.
    pub new_version: Version,
    pub kind: OpKind,
}

/// A group of ops that applies whole or not at all, on the server and on every device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    /// Random id chosen by the device; also the idempotency key of its upload.
    pub id: [u8; 16],
    /// The device that made the change (its name, for conflicted-copy names and history).
    pub device: String,
    /// When the device committed it, milliseconds since the Unix epoch (information only).
    pub time_ms: i64,
    pub ops: Vec<Op>,
}

/// What a device uploads at once, and what the server hands out: transactions in order.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ChangeLog {
    pub transactions: Vec<Transaction>,
}
