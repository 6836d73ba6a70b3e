//! The binary encoding of change logs and single transactions (`docs/change-log-format.md`).
//!
//! Owns [`encode_changelog`], [`decode_changelog`], [`encode_transaction`],
//! [`decode_transaction`] and [`DecodeError`]. What always holds: the decoder never panics,
//! checks every limit of [`super::limits`] before allocating for the thing it bounds, never
//! trusts a declared length (the body is decompressed through a bounded reader), and returns
//! only logs that pass [`super::validate`]. Encoding then decoding a valid log gives it back.

use std::io::{Read, Write};

use super::limits::{
    MAX_BODY_LEN, MAX_DELTA_LEN, MAX_DEVICE_NAME_LEN, MAX_NAME_LEN, MAX_OPS_PER_LOG,
    MAX_OPS_PER_TRANSACTION, MAX_RANGES_PER_DELTA, MAX_RANGES_PER_LOG, MAX_SYMLINK_TARGET_LEN,
    MAX_TRANSACTIONS_PER_LOG, MAX_XATTR_NAME_LEN, MAX_XATTR_VALUE_LEN,
};
use super::model::{ChangeLog, Delta, Name, ObjectId, ObjectKind, Op, OpKind, Transaction};
use super::validate::{validate, validate_transaction, ValidationError};

/// Magic bytes of an encoded change log.
pub const CHANGELOG_MAGIC: [u8; 4] = *b"DDCL";
/// Magic bytes of one encoded transaction (what the server stores per log entry).
pub const TRANSACTION_MAGIC: [u8; 4] = *b"DDTX";
/// The newest format version this build writes and reads. A log is written in version 1
/// unless it holds an op that only version 2 has (`Link`, `Unlink`), so what older builds
/// wrote and read stays byte for byte the same.
pub const FORMAT_VERSION: u16 = 2;
/// The oldest format version this build reads.
pub const OLDEST_FORMAT_VERSION: u16 = 1;
/// Length of the uncompressed header: magic, version, reserved, two lengths, body check.
pub const HEADER_LEN: usize = 32;
/// zstd level used for the body.
pub const ZSTD_LEVEL: i32 = 3;
/// Largest zstd window (log2) the encoder uses and the decoder accepts: 8 MiB. Bounds the
/// decoder's memory whatever a frame asks for.
pub const ZSTD_WINDOW_LOG: u32 = 23;

// Tag bytes. 0 is never a valid tag, so zero-filled input fails at once.
const OP_CREATE: u8 = 1;
const OP_WRITE: u8 = 2;
const OP_TRUNCATE: u8 = 3;
const OP_RENAME: u8 = 4;
const OP_DELETE: u8 = 5;
const OP_SET_ATTR: u8 = 6;
const OP_SET_XATTR: u8 = 7;
const OP_REMOVE_XATTR: u8 = 8;
const OP_LINK: u8 = 9;
const OP_UNLINK: u8 = 10;
const KIND_FILE: u8 = 1;
const KIND_DIRECTORY: u8 = 2;
const KIND_SYMLINK: u8 = 3;
const DELTA_WHOLE: u8 = 1;
const DELTA_RANGES: u8 = 2;
const DELTA_RSYNC: u8 = 3;
const SET_ATTR_MODE: u8 = 0b01;
const SET_ATTR_MTIME: u8 = 0b10;

/// Why bytes could not be decoded as a change log or transaction. Nothing was produced.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(
        "input is {len} bytes, shorter than the {HEADER_LEN}-byte header: not a deltadrive \
         change log, or cut short in transfer"
    )]
    TooShort { len: usize },
    #[error(
        "not a deltadrive {expected_what}: magic bytes are {found:02x?}, expected {expected:?}"
    )]
    BadMagic {
        found: [u8; 4],
        expected: &'static str,
        expected_what: &'static str,
    },
    #[error(
        "unsupported change-log format version {found} (this build reads \
         {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}); upgrade deltadrive to read it"
    )]
    UnsupportedVersion { found: u16 },
    #[error("reserved header field is {found:#06x}, must be 0 in format version {FORMAT_VERSION}")]
    ReservedNotZero { found: u16 },
    #[error("op tag {tag} at byte {offset} needs format version 2, but the header says 1")]
    TagNeedsNewerVersion { tag: u8, offset: usize },
    #[error("declared body size {declared} bytes exceeds the limit of {MAX_BODY_LEN} bytes")]
    BodyTooLarge { declared: u64 },
    #[error(
        "header declares {declared} compressed bytes but {actual} follow it: the input was \
         truncated or has trailing data"
    )]
    CompressedLengthMismatch { declared: u64, actual: u64 },
    #[error(
        "the body check does not match: the input was corrupted in storage or transfer \
         (fetch it again)"
    )]
    BodyCheckMismatch,
    #[error("the compressed body is corrupt: {0}")]
    Decompress(#[source] std::io::Error),
    #[error(
        "the body decompresses to {actual} bytes but the header declares {declared}{}",
        if *.actual > *.declared { " (or more)" } else { "" }
    )]
    BodyLengthMismatch { declared: u64, actual: u64 },
    #[error("the body ends in the middle of {what} at byte {offset}")]
    Truncated { what: &'static str, offset: usize },
    #[error("malformed or overlong varint for {what} at byte {offset}")]
    BadVarint { what: &'static str, offset: usize },
    #[error("unknown {what} tag {tag} at byte {offset} (written by a newer deltadrive?)")]
    UnknownTag {
        what: &'static str,
        tag: u8,
        offset: usize,
    },
    #[error("{what} is {value}, more than the limit of {max} (at byte {offset})")]
    LimitExceeded {
        what: &'static str,
        value: u64,
        max: u64,
        offset: usize,
    },
    #[error("device name at byte {offset} is not UTF-8")]
    DeviceNameNotUtf8 { offset: usize },
    #[error("{count} unexpected bytes after the end of the body")]
    TrailingBytes { count: usize },
    #[error("the log is well-formed but invalid: {0}")]
    Invalid(#[from] ValidationError),
}

/// Why a log could not be encoded into something a decoder accepts.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("the log is invalid: {0}")]
    Invalid(#[from] ValidationError),
    #[error(
        "the encoded body is {len} bytes, more than the limit of {MAX_BODY_LEN}; split the log"
    )]
    BodyTooLarge { len: u64 },
}

/// Encodes a change log. Encodes whatever it is given; use [`encode_changelog_checked`] for a
/// log that must decode (anything sent to the server).
pub fn encode_changelog(log: &ChangeLog) -> Vec<u8> {
    let mut body = Vec::new();
    put_varint(&mut body, len_u64(log.transactions.len()));
    for transaction in &log.transactions {
        put_transaction(&mut body, transaction);
    }
    let version = log
        .transactions
        .iter()
        .map(version_needed)
        .max()
        .unwrap_or(OLDEST_FORMAT_VERSION);
    frame_version(CHANGELOG_MAGIC, version, &body)
}

/// Encodes a change log after checking that the result will decode.
///
/// # Errors
/// [`EncodeError::Invalid`] if the log breaks a validation rule, [`EncodeError::BodyTooLarge`]
/// if its body exceeds [`MAX_BODY_LEN`].
pub fn encode_changelog_checked(log: &ChangeLog) -> Result<Vec<u8>, EncodeError> {
    validate(log)?;
    let encoded = encode_changelog(log);
    check_encoded_size(&encoded)?;
    Ok(encoded)
}

/// Encodes one transaction (the form the server stores per log entry).
pub fn encode_transaction(transaction: &Transaction) -> Vec<u8> {
    let mut body = Vec::new();
    put_transaction(&mut body, transaction);
    frame_version(TRANSACTION_MAGIC, version_needed(transaction), &body)
}

/// Encodes one transaction after checking that the result will decode.
///
/// # Errors
/// As [`encode_changelog_checked`].
pub fn encode_transaction_checked(transaction: &Transaction) -> Result<Vec<u8>, EncodeError> {
    validate_transaction(transaction)?;
    let encoded = encode_transaction(transaction);
    check_encoded_size(&encoded)?;
    Ok(encoded)
}

/// Decodes and validates a change log.
///
/// # Errors
/// A [`DecodeError`] saying what is wrong with the input: not a change log, a version this
/// build does not read, corruption, a limit exceeded, or a validation rule broken.
pub fn decode_changelog(input: &[u8]) -> Result<ChangeLog, DecodeError> {
    let (version, body) = unframe(input, CHANGELOG_MAGIC, "change log")?;
    let mut reader = Reader::new(&body);
    reader.version = version;
    let count = reader.count("transaction count", MAX_TRANSACTIONS_PER_LOG)?;
    let mut transactions = Vec::with_capacity(reader.capacity_for(count, MIN_TRANSACTION_LEN));
    for _ in 0..count {
        transactions.push(reader.transaction()?);
    }
    reader.finish()?;
    let log = ChangeLog { transactions };
    validate(&log)?;
    Ok(log)
}

/// Decodes and validates one transaction.
///
/// # Errors
/// As [`decode_changelog`].
pub fn decode_transaction(input: &[u8]) -> Result<Transaction, DecodeError> {
    let (version, body) = unframe(input, TRANSACTION_MAGIC, "transaction")?;
    let mut reader = Reader::new(&body);
    reader.version = version;
    let transaction = reader.transaction()?;
    reader.finish()?;
    validate_transaction(&transaction)?;
    Ok(transaction)
}

/// The body size an encoded log or transaction declares (before compression): what it
/// weighs against [`MAX_BODY_LEN`] when sent. `None` if `encoded` is too short to say.
pub fn declared_body_len(encoded: &[u8]) -> Option<u64> {
    let b: [u8; 8] = encoded.get(8..16)?.try_into().ok()?;
    Some(u64::from_le_bytes(b))
}

fn check_encoded_size(encoded: &[u8]) -> Result<(), EncodeError> {
    let mut declared = [0u8; 8];
    declared.copy_from_slice(&encoded[8..16]);
    let len = u64::from_le_bytes(declared);
    if len > MAX_BODY_LEN {
        return Err(EncodeError::BodyTooLarge { len });
    }
    Ok(())
}

fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

fn compress(body: &[u8]) -> Vec<u8> {
    // Writing into a Vec cannot fail; should the zstd library ever fail, fall back to
    // level-0 bulk compression, which the decoder reads all the same.
    let streamed = (|| -> std::io::Result<Vec<u8>> {
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), ZSTD_LEVEL)?;
        encoder.window_log(ZSTD_WINDOW_LOG - 1)?;
        encoder.include_checksum(true)?;
        encoder.include_contentsize(true)?;
        encoder.set_pledged_src_size(Some(len_u64(body.len())))?;
        encoder.write_all(body)?;
        encoder.finish()
    })();
    match streamed {
        Ok(compressed) => compressed,
        Err(_) => zstd::bulk::compress(body, 0).unwrap_or_default(),
    }
}

/// The first 8 bytes of the BLAKE3 hash of the compressed body.
fn body_check(compressed: &[u8]) -> [u8; 8] {
    let mut check = [0u8; 8];
    check.copy_from_slice(&blake3::hash(compressed).as_bytes()[..8]);
    check
}

/// The oldest format version that can hold `transaction`: 2 if it names an object twice
/// (`Link`, `Unlink`), else 1.
pub fn version_needed(transaction: &Transaction) -> u16 {
    if transaction
        .ops
        .iter()
        .any(|op| matches!(op.kind, OpKind::Link { .. } | OpKind::Unlink { .. }))
    {
        2
    } else {
        OLDEST_FORMAT_VERSION
    }
}

/// Frames `body` with a header of the newest version (tests and the fuzz targets, which
/// include this module by path, build bodies by hand with it).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn frame(magic: [u8; 4], body: &[u8]) -> Vec<u8> {
    frame_version(magic, FORMAT_VERSION, body)
}

/// Frames `body` with a header: compresses it and writes the header before it.
pub(crate) fn frame_version(magic: [u8; 4], version: u16, body: &[u8]) -> Vec<u8> {
    let compressed = compress(body);
    let mut out = Vec::with_capacity(HEADER_LEN + compressed.len());
    out.extend_from_slice(&magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&len_u64(body.len()).to_le_bytes());
    out.extend_from_slice(&len_u64(compressed.len()).to_le_bytes());
    out.extend_from_slice(&body_check(&compressed));
    out.extend_from_slice(&compressed);
    out
}

/// Checks the header and decompresses the body; returns the format version and the body.
fn unframe(
    input: &[u8],
    magic: [u8; 4],
    what: &'static str,
) -> Result<(u16, Vec<u8>), DecodeError> {
    if input.len() < HEADER_LEN {
        return Err(DecodeError::TooShort { len: input.len() });
    }
    let (header, compressed) = input.split_at(HEADER_LEN);
    let field = |from: usize, to: usize| &header[from..to];
    let found: [u8; 4] = [header[0], header[1], header[2], header[3]];
    if found != magic {
        return Err(DecodeError::BadMagic {
            found,
            expected: if magic == CHANGELOG_MAGIC {
                "DDCL"
            } else {
                "DDTX"
            },
            expected_what: what,
        });
    }
    let version = u16::from_le_bytes([header[4], header[5]]);
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(DecodeError::UnsupportedVersion { found: version });
    }
    let reserved = u16::from_le_bytes([header[6], header[7]]);
    if reserved != 0 {
        return Err(DecodeError::ReservedNotZero { found: reserved });
    }
    let mut eight = [0u8; 8];
    eight.copy_from_slice(field(8, 16));
    let declared = u64::from_le_bytes(eight);
    eight.copy_from_slice(field(16, 24));
    let declared_compressed = u64::from_le_bytes(eight);
    if declared > MAX_BODY_LEN {
        return Err(DecodeError::BodyTooLarge { declared });
    }
    let actual_compressed = len_u64(compressed.len());
    if declared_compressed != actual_compressed {
        return Err(DecodeError::CompressedLengthMismatch {
            declared: declared_compressed,
            actual: actual_compressed,
        });
    }
    if field(24, 32) != body_check(compressed) {
        return Err(DecodeError::BodyCheckMismatch);
    }
    let mut decoder = zstd::stream::read::Decoder::with_buffer(compressed)
        .map_err(DecodeError::Decompress)?
        .single_frame();
    decoder
        .window_log_max(ZSTD_WINDOW_LOG)
        .map_err(DecodeError::Decompress)?;
    // Never trust the declared length: read at most one byte more than declared, growing the
    // buffer as bytes actually arrive.
    let mut body = Vec::new();
    decoder
        .take(declared.saturating_add(1))
        .read_to_end(&mut body)
        .map_err(DecodeError::Decompress)?;
    let actual = len_u64(body.len());
    if actual != declared {
        return Err(DecodeError::BodyLengthMismatch { declared, actual });
    }
    Ok((version, body))
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, len_u64(bytes.len()));
    out.extend_from_slice(bytes);
}

fn put_transaction(out: &mut Vec<u8>, transaction: &Transaction) {
    out.extend_from_slice(&transaction.id);
    put_bytes(out, transaction.device.as_bytes());
    out.extend_from_slice(&transaction.time_ms.to_le_bytes());
    put_varint(out, len_u64(transaction.ops.len()));
    for op in &transaction.ops {
        put_op(out, op);
    }
}

fn put_op(out: &mut Vec<u8>, op: &Op) {
    out.extend_from_slice(&op.object.0);
    put_varint(out, op.base_version);
    put_varint(out, op.new_version);
    match &op.kind {
        OpKind::Create {
            parent,
            name,
            kind,
            mode,
            mtime_ns,
        } => {
            out.push(OP_CREATE);
            out.extend_from_slice(&parent.0);
            put_bytes(out, name.as_bytes());
            match kind {
                ObjectKind::File => out.push(KIND_FILE),
                ObjectKind::Directory => out.push(KIND_DIRECTORY),
                ObjectKind::Symlink { target } => {
                    out.push(KIND_SYMLINK);
                    put_bytes(out, target);
                }
            }
            out.extend_from_slice(&mode.to_le_bytes());
            out.extend_from_slice(&mtime_ns.to_le_bytes());
        }
        OpKind::Write {
            base_hash,
            new_hash,
            new_size,
            delta,
        } => {
            out.push(OP_WRITE);
            out.extend_from_slice(base_hash);
            out.extend_from_slice(new_hash);
            put_varint(out, *new_size);
            match delta {
                Delta::Whole(content) => {
                    out.push(DELTA_WHOLE);
                    put_bytes(out, content);
                }
                Delta::Ranges { new_size, ranges } => {
                    out.push(DELTA_RANGES);
                    put_varint(out, *new_size);
                    put_varint(out, len_u64(ranges.len()));
                    for (offset, bytes) in ranges {
                        put_varint(out, *offset);
                        put_bytes(out, bytes);
                    }
                }
                Delta::Rsync(bytes) => {
                    out.push(DELTA_RSYNC);
                    put_bytes(out, bytes);
                }
            }
        }
        OpKind::Truncate { new_size, new_hash } => {
            out.push(OP_TRUNCATE);
            put_varint(out, *new_size);
            out.extend_from_slice(new_hash);
        }
        OpKind::Rename {
            new_parent,
            new_name,
        } => {
            out.push(OP_RENAME);
            out.extend_from_slice(&new_parent.0);
            put_bytes(out, new_name.as_bytes());
        }
        OpKind::Delete => out.push(OP_DELETE),
        OpKind::SetAttr { mode, mtime_ns } => {
            out.push(OP_SET_ATTR);
            let mut flags = 0u8;
            if mode.is_some() {
                flags |= SET_ATTR_MODE;
            }
            if mtime_ns.is_some() {
                flags |= SET_ATTR_MTIME;
            }
            out.push(flags);
            if let Some(mode) = mode {
                out.extend_from_slice(&mode.to_le_bytes());
            }
            if let Some(mtime_ns) = mtime_ns {
                out.extend_from_slice(&mtime_ns.to_le_bytes());
            }
        }
        OpKind::SetXattr { name, value } => {
            out.push(OP_SET_XATTR);
            put_bytes(out, name);
            put_bytes(out, value);
        }
        OpKind::RemoveXattr { name } => {
            out.push(OP_REMOVE_XATTR);
            put_bytes(out, name);
        }
        OpKind::Link { parent, name } => {
            out.push(OP_LINK);
            out.extend_from_slice(&parent.0);
            put_bytes(out, name.as_bytes());
        }
        OpKind::Unlink { parent, name } => {
            out.push(OP_UNLINK);
            out.extend_from_slice(&parent.0);
            put_bytes(out, name.as_bytes());
        }
    }
}

/// The fewest bytes one encoded transaction takes (id, device length, time, op count, one op),
/// used to bound capacity reservations by the bytes actually present.
const MIN_TRANSACTION_LEN: usize = 16 + 1 + 8 + 1 + MIN_OP_LEN;
/// The fewest bytes one encoded op takes (object, two versions, tag).
const MIN_OP_LEN: usize = 16 + 1 + 1 + 1;
/// The fewest bytes one encoded range takes (offset, length, one byte).
const MIN_RANGE_LEN: usize = 3;

/// A cursor over a decompressed body that never reads past its end.
struct Reader<'a> {
    body: &'a [u8],
    offset: usize,
    /// Ops decoded so far, against [`MAX_OPS_PER_LOG`].
    ops_seen: u64,
    /// Ranges decoded so far, against [`MAX_RANGES_PER_LOG`].
    ranges_seen: u64,
    /// The header's format version: ops newer than it are refused.
    version: u16,
}

impl<'a> Reader<'a> {
    fn new(body: &'a [u8]) -> Self {
        Reader {
            body,
            offset: 0,
            ops_seen: 0,
            ranges_seen: 0,
            version: FORMAT_VERSION,
        }
    }

    /// Adds `count` to a running total and refuses it past `max`, before anything is allocated.
    fn charge(
        total: &mut u64,
        count: u64,
        max: u64,
        what: &'static str,
        offset: usize,
    ) -> Result<(), DecodeError> {
        *total = total.saturating_add(count);
        if *total > max {
            return Err(DecodeError::LimitExceeded {
                what,
                value: *total,
                max,
                offset,
            });
        }
        Ok(())
    }

    fn remaining(&self) -> usize {
        self.body.len().saturating_sub(self.offset)
    }

    /// A capacity for `count` items of at least `min_len` bytes each that the remaining input
    /// could actually hold.
    fn capacity_for(&self, count: u64, min_len: usize) -> usize {
        let possible = self.remaining() / min_len.max(1);
        usize::try_from(count).unwrap_or(usize::MAX).min(possible)
    }

    fn take(&mut self, len: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = self
            .offset
            .checked_add(len)
            .filter(|end| *end <= self.body.len())
            .ok_or(DecodeError::Truncated {
                what,
                offset: self.offset,
            })?;
        let bytes = &self.body[self.offset..end];
        self.offset = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N, what)?;
        let mut array = [0u8; N];
        array.copy_from_slice(bytes);
        Ok(array)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array(what)?))
    }

    /// An unsigned LEB128 varint: at most 10 bytes, no bits beyond 64, no overlong form.
    fn varint(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let start = self.offset;
        let mut value: u64 = 0;
        for index in 0..10u32 {
            let byte = self.u8(what)?;
            let payload = u64::from(byte & 0x7f);
            let shift = index * 7;
            if index == 9 && payload > 1 {
                return Err(DecodeError::BadVarint {
                    what,
                    offset: start,
                });
            }
            value |= payload << shift;
            if byte & 0x80 == 0 {
                if index > 0 && payload == 0 {
                    return Err(DecodeError::BadVarint {
                        what,
                        offset: start,
                    });
                }
                return Ok(value);
            }
        }
        Err(DecodeError::BadVarint {
            what,
            offset: start,
        })
    }

    /// A varint that must not exceed `max`.
    fn count(&mut self, what: &'static str, max: u64) -> Result<u64, DecodeError> {
        let offset = self.offset;
        let value = self.varint(what)?;
        if value > max {
            return Err(DecodeError::LimitExceeded {
                what,
                value,
                max,
                offset,
            });
        }
        Ok(value)
    }

    /// A length-prefixed byte string of at most `max` bytes, checked against the limit and
    /// the remaining input before anything is allocated.
    fn bytes(&mut self, what: &'static str, max: u64) -> Result<&'a [u8], DecodeError> {
        let len = self.count(what, max)?;
        let len = usize::try_from(len).map_err(|_| DecodeError::Truncated {
            what,
            offset: self.offset,
        })?;
        self.take(len, what)
    }

    fn object_id(&mut self, what: &'static str) -> Result<ObjectId, DecodeError> {
        Ok(ObjectId(self.array(what)?))
    }

    fn name(&mut self, what: &'static str) -> Result<Name, DecodeError> {
        Ok(Name(self.bytes(what, MAX_NAME_LEN)?.to_vec()))
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes { count }),
        }
    }

    fn transaction(&mut self) -> Result<Transaction, DecodeError> {
        let id = self.array("transaction id")?;
        let device_offset = self.offset;
        let device = self.bytes("device name length", MAX_DEVICE_NAME_LEN)?;
        let device =
            String::from_utf8(device.to_vec()).map_err(|_| DecodeError::DeviceNameNotUtf8 {
                offset: device_offset,
            })?;
        let time_ms = self.i64("transaction time")?;
        let count_offset = self.offset;
        let count = self.count("op count", MAX_OPS_PER_TRANSACTION)?;
        Self::charge(
            &mut self.ops_seen,
            count,
            MAX_OPS_PER_LOG,
            "total op count",
            count_offset,
        )?;
        let mut ops = Vec::with_capacity(self.capacity_for(count, MIN_OP_LEN));
        for _ in 0..count {
            ops.push(self.op()?);
        }
        Ok(Transaction {
            id,
            device,
            time_ms,
            ops,
        })
    }

    fn op(&mut self) -> Result<Op, DecodeError> {
        let object = self.object_id("op object id")?;
        let base_version = self.varint("base version")?;
        let new_version = self.varint("new version")?;
        let tag_offset = self.offset;
        let tag = self.u8("op tag")?;
        let kind = match tag {
            OP_CREATE => {
                let parent = self.object_id("Create parent")?;
                let name = self.name("Create name length")?;
                let kind_offset = self.offset;
                let kind = match self.u8("object kind tag")? {
                    KIND_FILE => ObjectKind::File,
                    KIND_DIRECTORY => ObjectKind::Directory,
                    KIND_SYMLINK => ObjectKind::Symlink {
                        target: self
                            .bytes("symlink target length", MAX_SYMLINK_TARGET_LEN)?
                            .to_vec(),
                    },
                    other => {
                        return Err(DecodeError::UnknownTag {
                            what: "object kind",
                            tag: other,
                            offset: kind_offset,
                        })
                    }
                };
                let mode = self.u32("Create mode")?;
                let mtime_ns = self.i64("Create mtime")?;
                OpKind::Create {
                    parent,
                    name,
                    kind,
                    mode,
                    mtime_ns,
                }
            }
            OP_WRITE => {
                let base_hash = self.array("Write base hash")?;
                let new_hash = self.array("Write new hash")?;
                let new_size = self.varint("Write new size")?;
                let delta = self.delta()?;
                OpKind::Write {
                    base_hash,
                    new_hash,
                    new_size,
                    delta,
                }
            }
            OP_TRUNCATE => {
                let new_size = self.varint("Truncate new size")?;
                let new_hash = self.array("Truncate new hash")?;
                OpKind::Truncate { new_size, new_hash }
            }
            OP_RENAME => {
                let new_parent = self.object_id("Rename new parent")?;
                let new_name = self.name("Rename new name length")?;
                OpKind::Rename {
                    new_parent,
                    new_name,
                }
            }
            OP_DELETE => OpKind::Delete,
            OP_SET_ATTR => {
                let flags_offset = self.offset;
                let flags = self.u8("SetAttr flags")?;
                if flags & !(SET_ATTR_MODE | SET_ATTR_MTIME) != 0 {
                    return Err(DecodeError::UnknownTag {
                        what: "SetAttr flags",
                        tag: flags,
                        offset: flags_offset,
                    });
                }
                let mode = if flags & SET_ATTR_MODE != 0 {
                    Some(self.u32("SetAttr mode")?)
                } else {
                    None
                };
                let mtime_ns = if flags & SET_ATTR_MTIME != 0 {
                    Some(self.i64("SetAttr mtime")?)
                } else {
                    None
                };
                OpKind::SetAttr { mode, mtime_ns }
            }
            OP_SET_XATTR => {
                let name = self
                    .bytes("xattr name length", MAX_XATTR_NAME_LEN)?
                    .to_vec();
                let value = self
                    .bytes("xattr value length", MAX_XATTR_VALUE_LEN)?
                    .to_vec();
                OpKind::SetXattr { name, value }
            }
            OP_REMOVE_XATTR => OpKind::RemoveXattr {
                name: self
                    .bytes("xattr name length", MAX_XATTR_NAME_LEN)?
                    .to_vec(),
            },
            OP_LINK | OP_UNLINK if self.version < 2 => {
                return Err(DecodeError::TagNeedsNewerVersion {
                    tag,
                    offset: tag_offset,
                })
            }
            OP_LINK => OpKind::Link {
                parent: self.object_id("Link parent")?,
                name: self.name("Link name length")?,
            },
            OP_UNLINK => OpKind::Unlink {
                parent: self.object_id("Unlink parent")?,
                name: self.name("Unlink name length")?,
            },
            other => {
                return Err(DecodeError::UnknownTag {
                    what: "op",
                    tag: other,
                    offset: tag_offset,
                })
            }
        };
        Ok(Op {
            object,
            base_version,
            new_version,
            kind,
        })
    }

    fn delta(&mut self) -> Result<Delta, DecodeError> {
        let tag_offset = self.offset;
        match self.u8("delta tag")? {
            DELTA_WHOLE => Ok(Delta::Whole(
                self.bytes("whole content length", MAX_DELTA_LEN)?.to_vec(),
            )),
            DELTA_RANGES => {
                let new_size = self.varint("ranges new size")?;
                let count_offset = self.offset;
                let count = self.count("range count", MAX_RANGES_PER_DELTA)?;
                Self::charge(
                    &mut self.ranges_seen,
                    count,
                    MAX_RANGES_PER_LOG,
                    "total range count",
                    count_offset,
                )?;
                let mut ranges = Vec::with_capacity(self.capacity_for(count, MIN_RANGE_LEN));
                let mut total: u64 = 0;
                for _ in 0..count {
                    let offset = self.varint("range offset")?;
                    let length_offset = self.offset;
                    let len = self.count("range length", MAX_DELTA_LEN)?;
                    total = total.saturating_add(len);
                    if total > MAX_DELTA_LEN {
                        return Err(DecodeError::LimitExceeded {
                            what: "total range bytes",
                            value: total,
                            max: MAX_DELTA_LEN,
                            offset: length_offset,
                        });
                    }
                    let len = usize::try_from(len).map_err(|_| DecodeError::Truncated {
                        what: "range bytes",
                        offset: self.offset,
                    })?;
                    let bytes = self.take(len, "range bytes")?;
                    ranges.push((offset, bytes.to_vec()));
                }
                Ok(Delta::Ranges { new_size, ranges })
            }
            DELTA_RSYNC => Ok(Delta::Rsync(
                self.bytes("rsync delta length", MAX_DELTA_LEN)?.to_vec(),
            )),
            other => Err(DecodeError::UnknownTag {
                what: "delta",
                tag: other,
                offset: tag_offset,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::arbitrary::{arb_changelog, arb_transaction};
    use super::super::limits::{MAX_FILE_SIZE, MAX_MODE, MAX_OPS_PER_LOG, MAX_RANGES_PER_LOG};
    use super::super::validate::{Violation, RSYNC_DELTA_MAGIC};
    use super::*;

    fn tx(ops: Vec<Op>) -> Transaction {
        Transaction {
            id: [7; 16],
            device: "laptop".into(),
            time_ms: 1_700_000_000_000,
            ops,
        }
    }

    fn id(byte: u8) -> ObjectId {
        ObjectId([byte; 16])
    }

    fn op(object: ObjectId, base_version: u64, kind: OpKind) -> Op {
        Op {
            object,
            base_version,
            new_version: base_version + 1,
            kind,
        }
    }

    fn create(name: &[u8]) -> Op {
        op(
            id(1),
            0,
            OpKind::Create {
                parent: ObjectId::ROOT,
                name: Name(name.to_vec()),
                kind: ObjectKind::File,
                mode: 0o644,
                mtime_ns: 5,
            },
        )
    }

    fn log_of(ops: Vec<Op>) -> ChangeLog {
        ChangeLog {
            transactions: vec![tx(ops)],
        }
    }

    /// Encodes `log` without validation and decodes it.
    fn roundtrip(log: &ChangeLog) -> Result<ChangeLog, DecodeError> {
        decode_changelog(&encode_changelog(log))
    }

    fn limit_exceeded(result: Result<ChangeLog, DecodeError>) -> (&'static str, u64, u64) {
        match result {
            Err(DecodeError::LimitExceeded {
                what, value, max, ..
            }) => (what, value, max),
            other => panic!("expected LimitExceeded, got {other:?}"),
        }
    }

    /// A body of one transaction with one op whose bytes after the tag are `after_tag`.
    fn body_with_op(tag: u8, after_tag: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        put_varint(&mut body, 1);
        body.extend_from_slice(&[7; 16]);
        put_bytes(&mut body, b"dev");
        body.extend_from_slice(&0i64.to_le_bytes());
        put_varint(&mut body, 1);
        body.extend_from_slice(&[1; 16]);
        put_varint(&mut body, 0);
        put_varint(&mut body, 1);
        body.push(tag);
        body.extend_from_slice(after_tag);
        body
    }

    fn sample_log() -> ChangeLog {
        ChangeLog {
            transactions: vec![tx(vec![
                create(b"notes.txt"),
                op(
                    id(1),
                    1,
                    OpKind::Write {
                        base_hash: super::super::model::empty_hash(),
                        new_hash: *blake3::hash(b"hi").as_bytes(),
                        new_size: 2,
                        delta: Delta::Whole(b"hi".to_vec()),
                    },
                ),
            ])],
        }
    }

    proptest! {
        #[test]
        fn changelog_roundtrips(log in arb_changelog()) {
            prop_assert_eq!(validate(&log), Ok(()));
            let encoded = encode_changelog_checked(&log).expect("valid log encodes");
            prop_assert_eq!(decode_changelog(&encoded).expect("decodes"), log);
        }

        #[test]
        fn transaction_roundtrips(transaction in arb_transaction()) {
            let encoded = encode_transaction_checked(&transaction).expect("valid tx encodes");
            prop_assert_eq!(decode_transaction(&encoded).expect("decodes"), transaction);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            // Random bytes essentially never form a valid header: require an error.
            prop_assert!(decode_changelog(&bytes).is_err());
            prop_assert!(decode_transaction(&bytes).is_err());
        }

        #[test]
        fn garbage_after_valid_header_never_panics(body in proptest::collection::vec(any::<u8>(), 0..400)) {
            // A well-framed body of random bytes: must not panic; if it decodes it is valid.
            let framed = frame(CHANGELOG_MAGIC, &body);
            if let Ok(log) = decode_changelog(&framed) {
                prop_assert_eq!(validate(&log), Ok(()));
                prop_assert_eq!(roundtrip(&log).expect("re-decodes"), log);
            }
        }

        #[test]
        fn truncated_input_is_refused(log in arb_changelog(), cut in any::<prop::sample::Index>()) {
            let encoded = encode_changelog(&log);
            let len = cut.index(encoded.len());
            prop_assert!(decode_changelog(&encoded[..len]).is_err());
        }

        #[test]
        fn truncated_body_is_refused(log in arb_changelog(), cut in any::<prop::sample::Index>()) {
            // Cut the *uncompressed* body and frame it properly: the parser must notice.
            let mut body = Vec::new();
            put_varint(&mut body, len_u64(log.transactions.len()));
            for t in &log.transactions {
                put_transaction(&mut body, t);
            }
            let len = cut.index(body.len());
            prop_assert!(decode_changelog(&frame(CHANGELOG_MAGIC, &body[..len])).is_err());
        }
    }

    #[test]
    fn every_single_bit_flip_is_refused() {
        let encoded = encode_changelog(&sample_log());
        for bit in 0..encoded.len() * 8 {
            let mut flipped = encoded.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode_changelog(&flipped).is_err(),
                "flipping bit {bit} of {} bytes was not detected",
                encoded.len()
            );
        }
    }

    /// The example of `docs/change-log-format.md`: version 1 is frozen by it.
    const DOC_EXAMPLE_BODY: &str = "01 11111111111111111111111111111111 06 6c6170746f70 \
        0068e5cf8b010000 01 22222222222222222222222222222222 00 01 01 \
        00000000000000000000000000000000 05 612e747874 01 a4010000 00002a36fe9c9717";
    const DOC_EXAMPLE_ENCODED: &str = "4444434c01000000570000000000000\
        03f00000000000000a77b56f0d33f5f3d28b52ffd24579501005402011106\
        6c6170746f700068e5cf8b0100000122000101000561 2e74787401a42a36fe9c97\
        1704003c050e3a1274ab03587ffc3619";

    fn unhex(text: &str) -> Vec<u8> {
        let digits: String = text.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        hex::decode(digits).expect("hex")
    }

    fn doc_example() -> ChangeLog {
        ChangeLog {
            transactions: vec![Transaction {
                id: [0x11; 16],
                device: "laptop".into(),
                time_ms: 1_700_000_000_000,
                ops: vec![Op {
                    object: ObjectId([0x22; 16]),
                    base_version: 0,
                    new_version: 1,
                    kind: OpKind::Create {
                        parent: ObjectId::ROOT,
                        name: Name(b"a.txt".to_vec()),
                        kind: ObjectKind::File,
                        mode: 0o644,
                        mtime_ns: 1_700_000_000_000_000_000,
                    },
                }],
            }],
        }
    }

    #[test]
    fn version_1_doc_example_is_frozen() {
        let log = doc_example();
        let mut body = Vec::new();
        put_varint(&mut body, 1);
        put_transaction(&mut body, &log.transactions[0]);
        assert_eq!(hex::encode(&body), hex::encode(unhex(DOC_EXAMPLE_BODY)));
        let encoded = unhex(DOC_EXAMPLE_ENCODED);
        assert_eq!(encoded.len(), 95);
        assert_eq!(
            decode_changelog(&encoded).expect("the doc example decodes"),
            log
        );
    }

    fn link_log() -> ChangeLog {
        let file = ObjectId([0x22; 16]);
        let mut log = doc_example();
        let ops = &mut log.transactions[0].ops;
        ops.push(op(
            file,
            1,
            OpKind::Link {
                parent: ObjectId::ROOT,
                name: Name(b"b.txt".to_vec()),
            },
        ));
        ops.push(op(
            file,
            2,
            OpKind::Unlink {
                parent: ObjectId::ROOT,
                name: Name(b"a.txt".to_vec()),
            },
        ));
        log
    }

    #[test]
    fn names_need_version_2_and_everything_else_stays_version_1() {
        // A log without Link/Unlink is written exactly as version 1 wrote it.
        assert_eq!(&encode_changelog(&doc_example())[4..6], &[1, 0]);
        assert_eq!(
            &encode_transaction(&doc_example().transactions[0])[4..6],
            &[1, 0]
        );
        // With them it is version 2, and it round-trips.
        let log = link_log();
        let encoded = encode_changelog_checked(&log).expect("valid");
        assert_eq!(&encoded[4..6], &[2, 0]);
        assert_eq!(decode_changelog(&encoded).expect("decodes"), log);
        let tx = encode_transaction_checked(&log.transactions[0]).expect("valid");
        assert_eq!(&tx[4..6], &[2, 0]);
        assert_eq!(
            decode_transaction(&tx).expect("decodes"),
            log.transactions[0]
        );
        // A version-1 header cannot carry the new tags: an old writer never made them.
        let mut body = Vec::new();
        put_varint(&mut body, 1);
        put_transaction(&mut body, &log.transactions[0]);
        let err = decode_changelog(&frame_version(CHANGELOG_MAGIC, 1, &body))
            .expect_err("a Link under a version-1 header");
        assert!(
            matches!(err, DecodeError::TagNeedsNewerVersion { tag: OP_LINK, .. }),
            "{err:?}"
        );
        // The version-1 doc example still reads under this build.
        assert_eq!(
            decode_changelog(&unhex(DOC_EXAMPLE_ENCODED)).expect("v1"),
            doc_example()
        );
    }

    #[test]
    fn header_layout_is_as_documented() {
        let encoded = encode_changelog(&sample_log());
        assert_eq!(&encoded[0..4], b"DDCL");
        assert_eq!(&encoded[4..6], &[1, 0]);
        assert_eq!(&encoded[6..8], &[0, 0]);
        let compressed_len = u64::from_le_bytes(encoded[16..24].try_into().expect("8 bytes"));
        assert_eq!(compressed_len, (encoded.len() - HEADER_LEN) as u64);
        let check = blake3::hash(&encoded[HEADER_LEN..]);
        assert_eq!(&encoded[24..32], &check.as_bytes()[..8]);
        let mut body = Vec::new();
        zstd::stream::read::Decoder::new(&encoded[HEADER_LEN..])
            .expect("zstd")
            .read_to_end(&mut body)
            .expect("a zstd frame");
        let body_len = u64::from_le_bytes(encoded[8..16].try_into().expect("8 bytes"));
        assert_eq!(body_len, body.len() as u64);
        assert_eq!(body[0], 1, "one transaction");
        assert_eq!(&body[1..17], &[7; 16], "transaction id");
        assert_eq!(
            &encode_transaction(&sample_log().transactions[0])[0..4],
            b"DDTX"
        );
    }

    #[test]
    fn wrong_magic_version_and_reserved_are_refused_with_clear_messages() {
        let encoded = encode_changelog(&sample_log());
        let as_tx = decode_transaction(&encoded).expect_err("a log is not a transaction");
        assert!(matches!(as_tx, DecodeError::BadMagic { .. }), "{as_tx:?}");
        assert!(as_tx.to_string().contains("DDTX"), "{as_tx}");

        let mut v7 = encoded.clone();
        v7[4] = 7;
        let err = decode_changelog(&v7).expect_err("version 7");
        assert_eq!(
            err.to_string(),
            "unsupported change-log format version 7 (this build reads 1 to 2); upgrade \
             deltadrive to read it"
        );

        let mut reserved = encoded.clone();
        reserved[7] = 1;
        assert!(matches!(
            decode_changelog(&reserved),
            Err(DecodeError::ReservedNotZero { found: 0x100 })
        ));
        assert!(matches!(
            decode_changelog(&encoded[..10]),
            Err(DecodeError::TooShort { len: 10 })
        ));
        let mut trailing = encoded.clone();
        trailing.push(0);
        assert!(matches!(
            decode_changelog(&trailing),
            Err(DecodeError::CompressedLengthMismatch { .. })
        ));
    }

    #[test]
    fn declared_body_over_limit_is_refused_before_decompressing() {
        let mut encoded = encode_changelog(&sample_log());
        encoded[8..16].copy_from_slice(&(MAX_BODY_LEN + 1).to_le_bytes());
        assert!(matches!(
            decode_changelog(&encoded),
            Err(DecodeError::BodyTooLarge { declared }) if declared == MAX_BODY_LEN + 1
        ));
    }

    #[test]
    fn body_longer_than_declared_is_refused() {
        let body = vec![0u8; 1000];
        let mut framed = frame(CHANGELOG_MAGIC, &body);
        framed[8..16].copy_from_slice(&10u64.to_le_bytes());
        assert!(matches!(
            decode_changelog(&framed),
            Err(DecodeError::BodyLengthMismatch {
                declared: 10,
                actual: 11
            })
        ));
    }

    #[test]
    fn trailing_body_bytes_and_unknown_tags_are_refused() {
        let mut body = Vec::new();
        put_varint(&mut body, 0);
        body.push(0);
        assert!(matches!(
            decode_changelog(&frame(CHANGELOG_MAGIC, &body)),
            Err(DecodeError::TrailingBytes { count: 1 })
        ));
        let unknown_op = frame(CHANGELOG_MAGIC, &body_with_op(99, &[]));
        let err = decode_changelog(&unknown_op).expect_err("tag 99");
        assert!(
            matches!(
                err,
                DecodeError::UnknownTag {
                    what: "op",
                    tag: 99,
                    ..
                }
            ),
            "{err:?}"
        );
        let mut write = vec![0u8; 64];
        write.push(0); // new size
        write.push(9); // delta tag
        let err = decode_changelog(&frame(CHANGELOG_MAGIC, &body_with_op(OP_WRITE, &write)))
            .expect_err("delta tag 9");
        assert!(
            matches!(
                err,
                DecodeError::UnknownTag {
                    what: "delta",
                    tag: 9,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn overlong_and_oversized_varints_are_refused() {
        let mut two_byte_zero = Vec::new();
        two_byte_zero.extend_from_slice(&[0x80, 0x00]);
        assert!(matches!(
            decode_changelog(&frame(CHANGELOG_MAGIC, &two_byte_zero)),
            Err(DecodeError::BadVarint { .. })
        ));
        let too_big = [0xff; 10];
        assert!(matches!(
            decode_changelog(&frame(CHANGELOG_MAGIC, &too_big)),
            Err(DecodeError::BadVarint { .. })
        ));
        let mut max = Vec::new();
        put_varint(&mut max, u64::MAX);
        assert_eq!(max.len(), 10);
        let mut reader = Reader::new(&max);
        assert_eq!(reader.varint("test").expect("u64::MAX"), u64::MAX);
    }

    #[test]
    fn transaction_count_one_over_limit_is_refused() {
        let mut body = Vec::new();
        put_varint(&mut body, MAX_TRANSACTIONS_PER_LOG + 1);
        let result = decode_changelog(&frame(CHANGELOG_MAGIC, &body));
        assert_eq!(
            limit_exceeded(result),
            (
                "transaction count",
                MAX_TRANSACTIONS_PER_LOG + 1,
                MAX_TRANSACTIONS_PER_LOG
            )
        );
    }

    #[test]
    fn transaction_count_at_limit_is_accepted() {
        let one = tx(vec![op(
            id(1),
            0,
            OpKind::SetAttr {
                mode: Some(0o600),
                mtime_ns: None,
            },
        )]);
        let log = ChangeLog {
            transactions: vec![one; MAX_TRANSACTIONS_PER_LOG as usize],
        };
        assert_eq!(
            roundtrip(&log).expect("at the limit").transactions.len(),
            100_000
        );
    }

    #[test]
    fn op_count_one_over_limit_is_refused() {
        let ops = (0..=MAX_OPS_PER_TRANSACTION)
            .map(|i| op(id(2), i, OpKind::Delete))
            .collect();
        assert_eq!(
            limit_exceeded(roundtrip(&log_of(ops))),
            (
                "op count",
                MAX_OPS_PER_TRANSACTION + 1,
                MAX_OPS_PER_TRANSACTION
            )
        );
    }

    #[test]
    fn total_ops_one_over_the_log_limit_is_refused() {
        // 10 transactions of 100 000 ops, then one more op: declared counts are charged
        // before the ops are read, so the counts alone trip the limit.
        let mut body = Vec::new();
        put_varint(&mut body, 11);
        for count in [MAX_OPS_PER_TRANSACTION; 10] {
            body.extend_from_slice(&[7; 16]);
            put_bytes(&mut body, b"d");
            body.extend_from_slice(&0i64.to_le_bytes());
            put_varint(&mut body, count);
            for version in 0..count {
                put_op(&mut body, &op(id(1), version, OpKind::Delete));
            }
        }
        body.extend_from_slice(&[7; 16]);
        put_bytes(&mut body, b"d");
        body.extend_from_slice(&0i64.to_le_bytes());
        put_varint(&mut body, 1);
        assert_eq!(
            limit_exceeded(decode_changelog(&frame(CHANGELOG_MAGIC, &body))),
            ("total op count", MAX_OPS_PER_LOG + 1, MAX_OPS_PER_LOG)
        );
        let one_op_each = ChangeLog {
            transactions: vec![tx(vec![op(id(1), 0, OpKind::Delete)]); 11],
        };
        let mut over = one_op_each.clone();
        over.transactions[0].ops = (0..MAX_OPS_PER_TRANSACTION)
            .map(|v| op(id(2), v, OpKind::Delete))
            .collect();
        for t in 1..10 {
            over.transactions[t].ops = over.transactions[0].ops.clone();
        }
        assert_eq!(
            violation(&over),
            Violation::TooManyOpsInLog {
                count: MAX_OPS_PER_LOG + 1
            }
        );
    }

    #[test]
    fn total_ranges_one_over_the_log_limit_is_refused() {
        let ranges_op = |count: u64| {
            op(
                id(5),
                1,
                OpKind::Write {
                    base_hash: [0; 32],
                    new_hash: [0; 32],
                    new_size: 1 << 20,
                    delta: Delta::Ranges {
                        new_size: 1 << 20,
                        ranges: (0..count).map(|i| (i * 2, vec![1])).collect(),
                    },
                },
            )
        };
        let full = tx(vec![ranges_op(50_000)]);
        let mut log = ChangeLog {
            transactions: vec![full; 20],
        };
        roundtrip(&log).expect("at the limit");
        log.transactions.push(tx(vec![ranges_op(1)]));
        assert_eq!(
            limit_exceeded(roundtrip(&log)),
            (
                "total range count",
                MAX_RANGES_PER_LOG + 1,
                MAX_RANGES_PER_LOG
            )
        );
        assert_eq!(
            violation(&log),
            Violation::TooManyRangesInLog {
                count: MAX_RANGES_PER_LOG + 1
            }
        );
    }

    #[test]
    fn name_of_256_bytes_is_refused_by_decoder_and_255_accepted() {
        assert_eq!(
            limit_exceeded(roundtrip(&log_of(vec![create(&[b'a'; 256])]))),
            ("Create name length", 256, MAX_NAME_LEN)
        );
        roundtrip(&log_of(vec![create(&[b'a'; 255])])).expect("255-byte name");
    }

    #[test]
    fn xattr_sizes_one_over_limit_are_refused() {
        let set = |name_len: usize, value_len: usize| {
            log_of(vec![op(
                id(3),
                4,
                OpKind::SetXattr {
                    name: vec![b'x'; name_len],
                    value: vec![1; value_len],
                },
            )])
        };
        roundtrip(&set(255, 65_536)).expect("at the limits");
        assert_eq!(
            limit_exceeded(roundtrip(&set(256, 1))),
            ("xattr name length", 256, MAX_XATTR_NAME_LEN)
        );
        assert_eq!(
            limit_exceeded(roundtrip(&set(1, 65_537))),
            ("xattr value length", 65_537, MAX_XATTR_VALUE_LEN)
        );
        let remove = log_of(vec![op(
            id(3),
            4,
            OpKind::RemoveXattr {
                name: vec![b'x'; 256],
            },
        )]);
        assert_eq!(
            limit_exceeded(roundtrip(&remove)),
            ("xattr name length", 256, MAX_XATTR_NAME_LEN)
        );
    }

    #[test]
    fn symlink_target_one_over_limit_is_refused() {
        let link = |len: usize| {
            log_of(vec![op(
                id(4),
                0,
                OpKind::Create {
                    parent: ObjectId::ROOT,
                    name: Name(b"l".to_vec()),
                    kind: ObjectKind::Symlink {
                        target: vec![b't'; len],
                    },
                    mode: 0o777,
                    mtime_ns: 0,
                },
            )])
        };
        roundtrip(&link(4095)).expect("at the limit");
        assert_eq!(
            limit_exceeded(roundtrip(&link(4096))),
            ("symlink target length", 4096, MAX_SYMLINK_TARGET_LEN)
        );
    }

    #[test]
    fn device_name_one_over_limit_is_refused() {
        let mut log = log_of(vec![create(b"a")]);
        log.transactions[0].device = "d".repeat(255);
        roundtrip(&log).expect("at the limit");
        log.transactions[0].device = "d".repeat(256);
        assert_eq!(
            limit_exceeded(roundtrip(&log)),
            ("device name length", 256, MAX_DEVICE_NAME_LEN)
        );
        assert!(matches!(
            encode_changelog_checked(&log),
            Err(EncodeError::Invalid(ValidationError {
                violation: Violation::DeviceNameTooLong { len: 256, .. },
                ..
            }))
        ));
    }

    fn write_prefix(new_size: u64, delta_tag: u8) -> Vec<u8> {
        let mut after_tag = vec![0u8; 64];
        put_varint(&mut after_tag, new_size);
        after_tag.push(delta_tag);
        after_tag
    }

    #[test]
    fn delta_payloads_one_over_limit_are_refused_before_allocating() {
        // Only the length is declared: the limit must fire before the missing bytes matter.
        for (tag, what) in [
            (DELTA_WHOLE, "whole content length"),
            (DELTA_RSYNC, "rsync delta length"),
        ] {
            let mut after_tag = write_prefix(MAX_DELTA_LEN + 1, tag);
            put_varint(&mut after_tag, MAX_DELTA_LEN + 1);
            let framed = frame(CHANGELOG_MAGIC, &body_with_op(OP_WRITE, &after_tag));
            assert_eq!(
                limit_exceeded(decode_changelog(&framed)),
                (what, MAX_DELTA_LEN + 1, MAX_DELTA_LEN)
            );
        }
        // Ranges: 10 real bytes, then a range declaring the rest of the limit plus one.
        let mut after_tag = write_prefix(MAX_FILE_SIZE, DELTA_RANGES);
        put_varint(&mut after_tag, MAX_FILE_SIZE);
        put_varint(&mut after_tag, 2);
        put_varint(&mut after_tag, 0);
        put_bytes(&mut after_tag, &[5; 10]);
        put_varint(&mut after_tag, 100);
        put_varint(&mut after_tag, MAX_DELTA_LEN - 9);
        let framed = frame(CHANGELOG_MAGIC, &body_with_op(OP_WRITE, &after_tag));
        assert_eq!(
            limit_exceeded(decode_changelog(&framed)),
            ("total range bytes", MAX_DELTA_LEN + 1, MAX_DELTA_LEN)
        );
    }

    #[test]
    fn range_count_one_over_limit_is_refused() {
        let ranges = |count: u64| {
            let ranges: Vec<(u64, Vec<u8>)> = (0..count).map(|i| (i * 2, vec![1])).collect();
            log_of(vec![op(
                id(5),
                1,
                OpKind::Write {
                    base_hash: [0; 32],
                    new_hash: [0; 32],
                    new_size: 1 << 20,
                    delta: Delta::Ranges {
                        new_size: 1 << 20,
                        ranges,
                    },
                },
            )])
        };
        roundtrip(&ranges(MAX_RANGES_PER_DELTA)).expect("at the limit");
        assert_eq!(
            limit_exceeded(roundtrip(&ranges(MAX_RANGES_PER_DELTA + 1))),
            (
                "range count",
                MAX_RANGES_PER_DELTA + 1,
                MAX_RANGES_PER_DELTA
            )
        );
    }

    #[test]
    fn file_size_one_over_limit_is_refused() {
        let truncate = |new_size| {
            log_of(vec![op(
                id(6),
                1,
                OpKind::Truncate {
                    new_size,
                    new_hash: [0; 32],
                },
            )])
        };
        roundtrip(&truncate(MAX_FILE_SIZE)).expect("at the limit");
        let err = roundtrip(&truncate(MAX_FILE_SIZE + 1)).expect_err("over");
        assert!(
            matches!(
                err,
                DecodeError::Invalid(ValidationError {
                    violation: Violation::FileTooLarge { .. },
                    ..
                })
            ),
            "{err:?}"
        );
    }

    #[test]
    fn decoder_validates() {
        let log = log_of(vec![create(b"..")]);
        let err = roundtrip(&log).expect_err("`..` is not a name");
        assert_eq!(
            err.to_string(),
            "the log is well-formed but invalid: transaction 0, op 0: invalid name \"..\": \
             name is . or .."
        );
    }

    fn violation(log: &ChangeLog) -> Violation {
        validate(log).expect_err("must be invalid").violation
    }

    #[test]
    fn validation_rejects_bad_names() {
        for bad in [&b"a/b"[..], b"a\0b", b".", b"..", &[b'n'; 256], b""] {
            let as_create = log_of(vec![create(bad)]);
            assert!(
                matches!(violation(&as_create), Violation::InvalidName { .. }),
                "{bad:?}"
            );
            let as_rename = log_of(vec![op(
                id(1),
                3,
                OpKind::Rename {
                    new_parent: ObjectId::ROOT,
                    new_name: Name(bad.to_vec()),
                },
            )]);
            assert!(
                matches!(violation(&as_rename), Violation::InvalidName { .. }),
                "{bad:?}"
            );
        }
        assert_eq!(validate(&log_of(vec![create(b"...")])), Ok(()));
    }

    #[test]
    fn validation_rules_on_versions_root_and_transactions() {
        let mut skipped = create(b"a");
        skipped.new_version = 2;
        assert_eq!(
            violation(&log_of(vec![skipped])),
            Violation::VersionNotIncremented { base: 0, new: 2 }
        );
        let overflow = Op {
            object: id(1),
            base_version: u64::MAX,
            new_version: 0,
            kind: OpKind::Delete,
        };
        assert!(matches!(
            violation(&log_of(vec![overflow])),
            Violation::VersionNotIncremented { .. }
        ));
        let mut late_create = create(b"a");
        late_create.base_version = 3;
        late_create.new_version = 4;
        assert_eq!(
            violation(&log_of(vec![late_create])),
            Violation::CreateWithBase { base: 3 }
        );
        let mut root_create = create(b"a");
        root_create.object = ObjectId::ROOT;
        assert_eq!(
            violation(&log_of(vec![root_create])),
            Violation::NotAllowedOnRoot { op: "Create" }
        );
        for (kind, name) in [
            (OpKind::Delete, "Delete"),
            (
                OpKind::Rename {
                    new_parent: id(9),
                    new_name: Name(b"r".to_vec()),
                },
                "Rename",
            ),
            (
                OpKind::Truncate {
                    new_size: 0,
                    new_hash: [0; 32],
                },
                "Truncate",
            ),
        ] {
            assert_eq!(
                violation(&log_of(vec![op(ObjectId::ROOT, 1, kind)])),
                Violation::NotAllowedOnRoot { op: name }
            );
        }
        let root_attr = op(
            ObjectId::ROOT,
            1,
            OpKind::SetAttr {
                mode: Some(0o755),
                mtime_ns: None,
            },
        );
        let root_xattr = op(
            ObjectId::ROOT,
            2,
            OpKind::SetXattr {
                name: b"user.a".to_vec(),
                value: vec![],
            },
        );
        assert_eq!(validate(&log_of(vec![root_attr, root_xattr])), Ok(()));
        assert_eq!(violation(&log_of(vec![])), Violation::EmptyTransaction);
        let broken_chain = vec![create(b"a"), op(id(1), 5, OpKind::Delete)];
        assert_eq!(
            violation(&log_of(broken_chain)),
            Violation::VersionChainBroken {
                object: id(1),
                base: 5,
                expected: 1
            }
        );
        let mut own_parent = create(b"a");
        if let OpKind::Create { parent, .. } = &mut own_parent.kind {
            *parent = id(1);
        }
        assert_eq!(violation(&log_of(vec![own_parent])), Violation::OwnParent);
        let mut bad_mode = create(b"a");
        if let OpKind::Create { mode, .. } = &mut bad_mode.kind {
            *mode = MAX_MODE + 1;
        }
        assert_eq!(
            violation(&log_of(vec![bad_mode])),
            Violation::InvalidMode { mode: 0o10000 }
        );
        let empty_attr = op(
            id(1),
            1,
            OpKind::SetAttr {
                mode: None,
                mtime_ns: None,
            },
        );
        assert_eq!(
            violation(&log_of(vec![empty_attr])),
            Violation::EmptySetAttr
        );
    }

    fn write(new_size: u64, delta: Delta) -> ChangeLog {
        log_of(vec![op(
            id(1),
            1,
            OpKind::Write {
                base_hash: [0; 32],
                new_hash: [0; 32],
                new_size,
                delta,
            },
        )])
    }

    #[test]
    fn validation_rules_on_deltas() {
        assert_eq!(
            violation(&write(3, Delta::Whole(vec![1, 2]))),
            Violation::WholeSizeMismatch {
                len: 2,
                new_size: 3
            }
        );
        let ranges = |new_size, ranges| Delta::Ranges { new_size, ranges };
        assert_eq!(
            violation(&write(10, ranges(11, vec![]))),
            Violation::RangesSizeMismatch {
                delta_size: 11,
                op_size: 10
            }
        );
        assert_eq!(
            violation(&write(10, ranges(10, vec![(8, vec![1, 2, 3])]))),
            Violation::RangeOutOfBounds {
                index: 0,
                offset: 8,
                len: 3,
                new_size: 10
            }
        );
        assert!(matches!(
            violation(&write(10, ranges(10, vec![(u64::MAX, vec![1])]))),
            Violation::RangeOutOfBounds { .. }
        ));
        assert_eq!(
            violation(&write(10, ranges(10, vec![(0, vec![1]), (2, vec![])]))),
            Violation::EmptyRange { index: 1 }
        );
        assert_eq!(
            validate(&write(10, ranges(10, vec![(7, vec![1, 2, 3])]))),
            Ok(())
        );
        assert_eq!(
            violation(&write(10, Delta::Rsync(b"nope".to_vec()))),
            Violation::RsyncMagic
        );
        assert_eq!(
            validate(&write(10, Delta::Rsync(RSYNC_DELTA_MAGIC.to_vec()))),
            Ok(())
        );
    }
}
