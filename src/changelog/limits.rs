//! Hard limits of the change-log format.
//!
//! Owns every bound the decoder and [`crate::changelog::validate`] enforce. What always holds:
//! a change log that decodes successfully respects every limit here, and the decoder checks a
//! limit *before* it allocates memory for the thing the limit bounds, so no input can make it
//! allocate more than these limits allow.

/// The largest uncompressed body a change log (or a single transaction) may have: 256 MiB.
pub const MAX_BODY_LEN: u64 = 256 * 1024 * 1024;

/// The most transactions one change log may hold.
pub const MAX_TRANSACTIONS_PER_LOG: u64 = 100_000;

/// The most ops one transaction may hold.
pub const MAX_OPS_PER_TRANSACTION: u64 = 100_000;

/// The most ops one change log (or one transaction) may hold in all. Bounds the decoder's memory:
/// an op takes about 150 bytes decoded but as few as 19 encoded.
pub const MAX_OPS_PER_LOG: u64 = 1_000_000;

/// The most `Delta::Ranges` ranges one change log (or one transaction) may hold in all. Bounds
/// the decoder's memory like [`MAX_OPS_PER_LOG`]: a range takes 3 bytes encoded.
pub const MAX_RANGES_PER_LOG: u64 = 1_000_000;

/// The most payload bytes one delta may carry: the whole content of `Delta::Whole`, the rsync
/// bytes of `Delta::Rsync`, or the sum of the range bytes of `Delta::Ranges` (128 MiB).
pub const MAX_DELTA_LEN: u64 = 128 * 1024 * 1024;

/// The most ranges one `Delta::Ranges` may hold.
pub const MAX_RANGES_PER_DELTA: u64 = 65_536;

/// The largest file size an op may state (`Write::new_size`, `Truncate::new_size`,
/// `Delta::Ranges::new_size`): 1 TiB.
pub const MAX_FILE_SIZE: u64 = 1 << 40;

/// The longest directory entry name, in bytes (the same as `Name::MAX_LEN`).
pub const MAX_NAME_LEN: u64 = 255;

/// The longest extended attribute name, in bytes (Linux `XATTR_NAME_MAX`).
pub const MAX_XATTR_NAME_LEN: u64 = 255;

/// The largest extended attribute value, in bytes (Linux `XATTR_SIZE_MAX`).
pub const MAX_XATTR_VALUE_LEN: u64 = 65_536;

/// The longest symlink target, in bytes (Linux `PATH_MAX` less the terminating NUL).
pub const MAX_SYMLINK_TARGET_LEN: u64 = 4_095;

/// The longest device name in a transaction, in bytes (UTF-8).
pub const MAX_DEVICE_NAME_LEN: u64 = 255;

/// The largest permission bits a `Create` or `SetAttr` may carry.
pub const MAX_MODE: u32 = 0o7777;
