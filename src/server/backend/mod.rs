//! The storage boundary of the server: everything the API and storage-service layers keep,
//! behind one coarse, object-safe trait, so the embedded RocksDB backend and a later
//! PostgreSQL + S3 backend are interchangeable.
//!
//! What always holds for every implementation:
//! - [`Backend::commit`] is atomic and durable when it returns `Ok`: the log entries, the object
//!   state changes, the history records and the idempotency record are all there, or none is;
//! - chunks passed to [`Backend::put_chunks`] are durable before it returns, so a commit that
//!   references them (made afterwards) never points at missing content;
//! - a user's log sequence numbers start at 1 and have no gaps;
//! - the backend holds no state logic (versions, tree rules, deltas): the storage service decides,
//!   the backend stores.

#[cfg(test)]
pub mod conformance;
// The append-path fuzz target (`fuzz/`) includes this module by `#[path]` without the storage
// engines (no RocksDB or PostgreSQL build), against the in-memory backend.
#[cfg(not(fuzzing))]
pub mod embedded;
pub mod memory;
#[cfg(not(fuzzing))]
pub mod postgres_s3;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

/// A boxed future returned by [`Backend`] methods (object-safe async).
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = Result<T, BackendError>> + Send + 'a>>;

/// The entries of one directory: (name, child id).
pub type DirEntries = Vec<(Vec<u8>, [u8; 16])>;

/// The BLAKE3 hash naming one content chunk.
pub type ChunkId = [u8; 32];

/// Failures of a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("already exists")]
    AlreadyExists,
    #[error("not found")]
    NotFound,
    /// The user's head moved under a commit (another writer without the lock).
    #[error("log head moved: expected {expected}, found {found}")]
    HeadMoved { expected: u64, found: u64 },
    #[error("storage I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("database: {0}")]
    Db(String),
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

/// A user account.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UserRecord {
    pub name: String,
    /// argon2 PHC string.
    pub password_hash: String,
    pub created_ms: i64,
}

/// A device of a user.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub user: String,
    pub name: String,
    /// Random 128-bit id, hex.
    pub id: String,
    /// Hash (hex) of the device's current token; `None` once revoked.
    pub token_hash: Option<String>,
    pub created_ms: i64,
    pub last_login_ms: i64,
}

/// Who a device token belongs to.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRecord {
    pub user: String,
    pub device: String,
    pub device_id: String,
}

/// A read-only link to a file or folder of a user (the web side's share links).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareRecord {
    /// BLAKE3 (hex) of the link's token; the token itself is shown once, never kept.
    pub hash: String,
    pub user: String,
    /// The shared file or folder.
    pub object: [u8; 16],
    pub created_ms: i64,
    /// When the link stops working, if ever (ms since the epoch).
    pub expires_ms: Option<i64>,
    /// argon2 PHC string of the link's password, if it has one.
    pub password_hash: Option<String>,
}

/// The kind of a stored object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredKind {
    File,
    Directory,
    Symlink { target: Vec<u8> },
}

/// The server's current state of one object of a user's tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectState {
    pub id: [u8; 16],
    pub parent: [u8; 16],
    pub name: Vec<u8>,
    /// The object's other names (hard links), sorted; (`parent`, `name`) is the least of
    /// all its names. Absent in records written before names could be several.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<([u8; 16], Vec<u8>)>,
    pub kind: StoredKind,
    pub version: u64,
    pub mode: u32,
    pub mtime_ns: i64,
    pub size: u64,
    pub hash: [u8; 32],
    /// The content as consecutive chunks (files only), each `CHUNK_SIZE` bytes but the last,
    /// so byte `o` is in chunk `o / CHUNK_SIZE`.
    pub chunks: Vec<ChunkId>,
    /// The BLAKE3 chaining value of each chunk at its place in the content
    /// (`delta::hash_tree::leaf_cv`), so the content hash after an edit comes from rehashing
    /// only the chunks it changed. Kept as one hex string in records; `None` in records written
    /// before they were kept (the storage service then computes them once from the chunks).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "hex_cvs")]
    pub chunk_cvs: Option<Vec<[u8; 32]>>,
    /// Stored as a list of pairs: JSON map keys must be strings, xattr names are bytes.
    #[serde(with = "xattr_pairs")]
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The log sequence number of the last change to this object.
    pub seq: u64,
}

mod xattr_pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<Vec<u8>, Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let pairs: Vec<(&Vec<u8>, &Vec<u8>)> = map.iter().collect();
        pairs.serialize(s)
    }

    /// Records written before the pairs hold a JSON map; only empty ones could be written
    /// (a non-empty map failed to serialize), and every object record has one.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Stored {
        Pairs(Vec<(Vec<u8>, Vec<u8>)>),
        OldMap(BTreeMap<String, Vec<u8>>),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, D::Error> {
        Ok(match Stored::deserialize(d)? {
            Stored::Pairs(pairs) => pairs.into_iter().collect(),
            Stored::OldMap(map) => map.into_iter().map(|(k, v)| (k.into_bytes(), v)).collect(),
        })
    }
}

/// Chaining values as one hex string (64 digits each) instead of JSON arrays of numbers.
mod hex_cvs {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<[u8; 32]>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(cvs) => s.serialize_some(&hex::encode(cvs.concat())),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<[u8; 32]>>, D::Error> {
        let Some(text) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        let bytes = hex::decode(&text).map_err(serde::de::Error::custom)?;
        if bytes.len() % 32 != 0 {
            return Err(serde::de::Error::custom(
                "chunk chaining values are not a whole number of 32-byte values",
            ));
        }
        Ok(Some(
            bytes
                .chunks_exact(32)
                .map(|c| {
                    let mut a = [0u8; 32];
                    a.copy_from_slice(c);
                    a
                })
                .collect(),
        ))
    }
}

/// One kept version of a file's content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub version: u64,
    pub size: u64,
    pub hash: [u8; 32],
    pub time_ms: i64,
    pub device: String,
    pub seq: u64,
    pub chunks: Vec<ChunkId>,
}

/// Everything one append changes, committed atomically by [`Backend::commit`].
#[derive(Clone, Debug, Default)]
pub struct CommitBatch {
    /// The head the service validated against; the commit fails if it moved.
    pub expected_head: u64,
    /// Encoded transactions with their sequence numbers, `expected_head + 1` onwards.
    pub entries: Vec<(u64, Vec<u8>)>,
    /// Objects whose state is replaced (inserted or updated).
    pub put_objects: Vec<ObjectState>,
    /// Objects that no longer exist.
    pub delete_objects: Vec<[u8; 16]>,
    /// Directory entries removed, applied before `put_children`: (parent, name).
    pub delete_children: Vec<([u8; 16], Vec<u8>)>,
    /// Directory entries added: (parent, name, child).
    pub put_children: Vec<([u8; 16], Vec<u8>, [u8; 16])>,
    /// New history records: (object, entry).
    pub history: Vec<([u8; 16], HistoryEntry)>,
    /// How many history records to keep per object touched (older ones are dropped).
    pub history_keep: usize,
    /// The idempotency key and the result recorded under it.
    pub idempotency: (String, AppendRecord),
}

/// The result of an append, kept under its idempotency key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendRecord {
    pub first_seq: u64,
    pub last_seq: u64,
    /// BLAKE3 of the appended body, so a key reused for another body is refused.
    #[serde(default)]
    pub body_hash: [u8; 32],
}

/// A held per-user commit lock; dropping it releases the lock.
pub type UserLock = Box<dyn Send + Sync>;

/// A change of the log heads seen by a backend, from this process or from another replica
/// sharing the same storage. Only a wake-up hint: receivers re-read the head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeadEvent {
    /// `user`'s head is now (at least) `head`.
    Moved { user: String, head: u64 },
    /// Events may have been missed (a reconnect, a lagging receiver): re-check every head.
    Resync,
}

/// The storage boundary. Methods are coarse; each call is one backend round trip.
pub trait Backend: Send + Sync + 'static {
    /// The hash of the admin token, if one was set.
    fn admin_token_hash(&self) -> BoxFut<'_, Option<String>>;
    /// Sets the admin token hash.
    fn set_admin_token_hash(&self, hash: String) -> BoxFut<'_, ()>;

    /// Creates a user; `AlreadyExists` if the name is taken.
    fn create_user(&self, user: UserRecord) -> BoxFut<'_, ()>;
    fn get_user(&self, name: String) -> BoxFut<'_, Option<UserRecord>>;
    fn list_users(&self) -> BoxFut<'_, Vec<UserRecord>>;
    /// Removes a user with all their devices, tokens, log, objects, history; `NotFound` if absent.
    fn delete_user(&self, name: String) -> BoxFut<'_, ()>;

    /// Stores a device record, registers its token hash and drops `old_token_hash` and every
    /// other token of the device, atomically; `NotFound` (and nothing written) if the user does
    /// not exist, so a login that raced the user's removal cannot bring a device back.
    fn put_device(&self, device: DeviceRecord, old_token_hash: Option<String>) -> BoxFut<'_, ()>;
    /// Replaces a user's password hash and revokes every token of the user but those of device
    /// `keep` (if given), atomically; `NotFound` if the user does not exist.
    fn set_password(
        &self,
        user: String,
        password_hash: String,
        keep: Option<String>,
    ) -> BoxFut<'_, ()>;
    fn get_device(&self, user: String, device: String) -> BoxFut<'_, Option<DeviceRecord>>;
    fn list_devices(&self, user: String) -> BoxFut<'_, Vec<DeviceRecord>>;
    /// Who holds this token hash (never cached).
    fn lookup_token(&self, hash: String) -> BoxFut<'_, Option<TokenRecord>>;

    /// Stores a share link; `NotFound` (and nothing written) if its user does not exist.
    /// Removing the user removes the user's links.
    fn put_share(&self, share: ShareRecord) -> BoxFut<'_, ()>;
    /// The share link of this token hash (never cached).
    fn get_share(&self, hash: String) -> BoxFut<'_, Option<ShareRecord>>;
    /// The user's share links, oldest first.
    fn list_shares(&self, user: String) -> BoxFut<'_, Vec<ShareRecord>>;
    /// Removes one of the user's share links; `NotFound` if the user has none of that hash.
    fn delete_share(&self, user: String, hash: String) -> BoxFut<'_, ()>;

    /// Takes the user's commit lock (waits while another commit holds it). The lock excludes
    /// every holder sharing this backend's storage, in this process or in another replica.
    fn lock_user(&self, user: String) -> BoxFut<'_, UserLock>;
    /// The user's head sequence (0 for an empty log).
    fn head(&self, user: String) -> BoxFut<'_, u64>;
    fn idempotency(&self, user: String, key: String) -> BoxFut<'_, Option<AppendRecord>>;
    fn get_object(&self, user: String, id: [u8; 16]) -> BoxFut<'_, Option<ObjectState>>;
    /// The entries of one directory: (name, child id).
    fn list_children(&self, user: String, dir: [u8; 16]) -> BoxFut<'_, DirEntries>;
    /// Commits one append atomically and durably (see [`CommitBatch`]); once it returns `Ok`,
    /// every receiver of [`Backend::head_events`] (in any replica) gets a `Moved` event.
    fn commit(&self, user: String, batch: CommitBatch) -> BoxFut<'_, ()>;
    /// Up to `limit` entries after `after`, stopping past `max_bytes` (at least one entry).
    fn read_log(
        &self,
        user: String,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFut<'_, Vec<(u64, Vec<u8>)>>;
    /// A consistent view of every object of the user and the head it reflects.
    fn snapshot(&self, user: String) -> BoxFut<'_, (u64, Vec<ObjectState>)>;
    /// The kept versions of one object, oldest first.
    fn history(&self, user: String, id: [u8; 16]) -> BoxFut<'_, Vec<HistoryEntry>>;

    /// Stores chunks durably (content-addressed; existing ones are kept).
    fn put_chunks(&self, chunks: Vec<(ChunkId, bytes::Bytes)>) -> BoxFut<'_, ()>;
    /// One chunk's bytes; `NotFound` if absent.
    fn get_chunk(&self, id: ChunkId) -> BoxFut<'_, Vec<u8>>;

    /// Head changes committed through this backend's storage by any replica (including this
    /// one), for waking long polls. A receiver that lags gets `RecvError::Lagged` and must treat
    /// it as [`HeadEvent::Resync`].
    fn head_events(&self) -> tokio::sync::broadcast::Receiver<HeadEvent>;
}

#[cfg(test)]
mod tests {
    use super::ObjectState;

    #[test]
    fn records_from_before_xattr_pairs_are_read() {
        let old = r#"{"id":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1],"parent":[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0],
            "name":[102],"kind":"Directory","version":1,"mode":493,"mtime_ns":0,"size":0,
            "hash":[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0],
            "chunks":[],"xattrs":{},"seq":1}"#;
        let mut o: ObjectState = serde_json::from_str(old).expect("an old record, empty map");
        assert!(o.xattrs.is_empty());
        o.xattrs.insert(vec![0, 255], vec![1]);
        let json = serde_json::to_string(&o).expect("encode");
        assert!(json.contains(r#""xattrs":[[[0,255],[1]]]"#), "{json}");
        assert_eq!(
            serde_json::from_str::<ObjectState>(&json).expect("decode"),
            o
        );
    }

    #[test]
    fn chunk_chaining_values_are_one_hex_string_and_optional() {
        let mut o: ObjectState = serde_json::from_str(
            r#"{"id":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1],"parent":[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0],
                "name":[102],"kind":"File","version":2,"mode":420,"mtime_ns":0,"size":0,
                "hash":[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0],
                "chunks":[],"xattrs":{},"seq":3}"#,
        )
        .expect("a record from before chunk_cvs");
        assert_eq!(o.chunk_cvs, None);
        o.chunk_cvs = Some(vec![[0xab; 32], [0x01; 32]]);
        let json = serde_json::to_string(&o).expect("encode");
        assert!(
            json.contains(&format!(
                r#""chunk_cvs":"{}{}""#,
                "ab".repeat(32),
                "01".repeat(32)
            )),
            "{json}"
        );
        assert_eq!(
            serde_json::from_str::<ObjectState>(&json).expect("decode"),
            o
        );
        let bad = json.replace(&"01".repeat(32), &"01".repeat(31));
        let e = serde_json::from_str::<ObjectState>(&bad).expect_err("a cut value");
        assert!(e.to_string().contains("32-byte"), "{e}");
    }
}
