//! rsync deltas: the previous-state signature a device keeps per file, updated block by block,
//! and deltas computed against it with `fast_rsync`.
//!
//! Owns [`BlockSignature`], [`block_size_for`] and [`rsync_delta`]. What always holds: a
//! [`BlockSignature`] has one [`BlockHash`] per `block_size` block of the content it describes
//! (the last block may be shorter), each equal to what `fast_rsync::Signature::calculate`
//! computes for that block (weak rolling checksum and MD4 truncated to `strong_len` bytes); its
//! byte form ([`BlockSignature::to_bytes`]) is librsync's MD4 signature format, which
//! `fast_rsync::Signature::deserialize` reads.

use std::io;

use fast_rsync::{Signature, SignatureOptions};

use super::DeltaError;
use crate::changelog::model::Delta;

/// librsync's magic for MD4 signatures (`RS_MD4_SIG_MAGIC`), big-endian on the wire.
pub const MD4_SIGNATURE_MAGIC: u32 = 0x7273_0136;
/// Length of the signature header: magic, block size, strong hash length (u32 BE each).
pub const SIGNATURE_HEADER_LEN: usize = 12;
/// Bytes of the MD4 hash kept per block (the whole hash).
pub const STRONG_HASH_LEN: u32 = 16;
/// The smallest block size [`block_size_for`] picks.
pub const MIN_BLOCK_SIZE: u32 = 1024;
/// The largest block size [`block_size_for`] picks.
pub const MAX_BLOCK_SIZE: u32 = 64 * 1024;

/// The block size for a file of `file_len` bytes: the square root of the length rounded up to a
/// power of two, clamped to 1 KiB..=64 KiB. A 1 MiB file gets 1 KiB blocks (1024 blocks), a
/// 64 MiB file 8 KiB, a 1 GiB file 32 KiB, 4 GiB and more 64 KiB. The square root balances the
/// signature's size (blocks) against the delta's precision (block size).
pub fn block_size_for(file_len: u64) -> u32 {
    let root = file_len.isqrt().max(1);
    let rounded = root.checked_next_power_of_two().unwrap_or(u64::MAX);
    let clamped = rounded.clamp(u64::from(MIN_BLOCK_SIZE), u64::from(MAX_BLOCK_SIZE));
    u32::try_from(clamped).unwrap_or(MAX_BLOCK_SIZE)
}

/// The hashes of one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockHash {
    /// rsync's weak rolling checksum of the block.
    pub weak: u32,
    /// The MD4 hash of the block; only the first `strong_len` bytes count, the rest are 0.
    pub strong: [u8; 16],
}

/// A file's previous-state signature, as per-block entries that can be updated in place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockSignature {
    block_size: u32,
    strong_len: u32,
    content_len: u64,
    blocks: Vec<BlockHash>,
}

impl BlockSignature {
    /// The signature of `content`, with the block size of [`block_size_for`].
    pub fn calculate(content: &[u8]) -> Self {
        Self::calculate_with_block_size(content, block_size_for(len_u64(content.len())))
    }

    /// The signature of `content` with the given block size (0 is taken as 1).
    pub fn calculate_with_block_size(content: &[u8], block_size: u32) -> Self {
        let block_size = block_size.max(1);
        let whole = Signature::calculate(
            content,
            SignatureOptions {
                block_size,
                crypto_hash_size: STRONG_HASH_LEN,
            },
        );
        let blocks = whole.serialized()[SIGNATURE_HEADER_LEN..]
            .chunks_exact(4 + STRONG_HASH_LEN as usize)
            .map(parse_entry)
            .collect();
        BlockSignature {
            block_size,
            strong_len: STRONG_HASH_LEN,
            content_len: len_u64(content.len()),
            blocks,
        }
    }

    /// The block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The length of the content this signature describes.
    pub fn content_len(&self) -> u64 {
        self.content_len
    }

    /// The per-block hashes, in block order.
    pub fn blocks(&self) -> &[BlockHash] {
        &self.blocks
    }

    /// The librsync byte form: `72 73 01 36`, block size (u32 BE), strong hash length (u32
    /// BE), then per block the weak checksum (u32 BE) and `strong_len` bytes of MD4.
    pub fn to_bytes(&self) -> Vec<u8> {
        let per_block = 4 + self.strong_len as usize;
        let mut out = Vec::with_capacity(SIGNATURE_HEADER_LEN + self.blocks.len() * per_block);
        out.extend_from_slice(&MD4_SIGNATURE_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.block_size.to_be_bytes());
        out.extend_from_slice(&self.strong_len.to_be_bytes());
        for block in &self.blocks {
            out.extend_from_slice(&block.weak.to_be_bytes());
            out.extend_from_slice(&block.strong[..self.strong_len as usize]);
        }
        out
    }

    /// Reads the form written by [`BlockSignature::to_bytes`] (or any librsync MD4 signature)
    /// for content of `content_len` bytes (the librsync form does not hold the length).
    ///
    /// # Errors
    /// [`DeltaError::InvalidSignature`] if the magic is not MD4's, the block size is 0, the
    /// strong length is over 16, or the block count does not fit `content_len`.
    pub fn from_bytes(bytes: &[u8], content_len: u64) -> Result<Self, DeltaError> {
        let word = |at: usize| -> Result<u32, DeltaError> {
            let b = bytes
                .get(at..at + 4)
                .ok_or(DeltaError::InvalidSignature("truncated"))?;
            Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        if word(0)? != MD4_SIGNATURE_MAGIC {
            return Err(DeltaError::InvalidSignature("not an MD4 rsync signature"));
        }
        let block_size = word(4)?;
        let strong_len = word(8)?;
        if block_size == 0 {
            return Err(DeltaError::InvalidSignature("block size 0"));
        }
        if strong_len > 16 {
            return Err(DeltaError::InvalidSignature("strong hash longer than MD4"));
        }
        let per_block = 4 + strong_len as usize;
        let body = &bytes[SIGNATURE_HEADER_LEN..];
        if body.len() % per_block != 0 {
            return Err(DeltaError::InvalidSignature("partial block entry"));
        }
        let count = body.len() / per_block;
        if len_u64(count) != block_count(content_len, block_size) {
            return Err(DeltaError::InvalidSignature(
                "block count does not match the content length",
            ));
        }
        let blocks = body.chunks_exact(per_block).map(parse_entry).collect();
        Ok(BlockSignature {
            block_size,
            strong_len,
            content_len,
            blocks,
        })
    }

    /// Updates the signature for new content of `new_len` bytes, recomputing only the blocks
    /// that overlap `changed` ranges `(offset, len)` and the blocks from the old or new end of
    /// the content (whichever is smaller) on. Blocks are read through `read_at(offset, buffer)`,
    /// which fills `buffer` exactly from the new content.
    ///
    /// For the result to equal [`BlockSignature::calculate_with_block_size`] of the new content,
    /// `changed` must cover every byte that differs at the same offset (e.g.
    /// [`super::DirtyRanges::to_send`]).
    ///
    /// # Errors
    /// The first error of `read_at`; `InvalidInput` if `new_len` does not fit memory indices.
    /// On error the signature is left as it was.
    pub fn update_blocks(
        &mut self,
        new_len: u64,
        changed: impl IntoIterator<Item = (u64, u64)>,
        mut read_at: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let block_size = u64::from(self.block_size);
        let new_count = usize::try_from(block_count(new_len, self.block_size))
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large"))?;
        let mut dirty_blocks: Vec<usize> = Vec::new();
        let tail_from = self.content_len.min(new_len) / block_size;
        let to_index = |block: u64| usize::try_from(block).unwrap_or(usize::MAX);
        for (offset, len) in changed {
            if len == 0 || offset >= new_len {
                continue;
            }
            let end = offset.saturating_add(len).min(new_len);
            let first = offset / block_size;
            let last = (end - 1) / block_size;
            dirty_blocks.extend((first..=last.min(tail_from)).map(to_index));
        }
        dirty_blocks.extend((to_index(tail_from)..new_count).filter(|b| *b < new_count));
        dirty_blocks.sort_unstable();
        dirty_blocks.dedup();
        dirty_blocks.retain(|b| *b < new_count);

        let mut blocks = self.blocks.clone();
        blocks.resize(
            new_count,
            BlockHash {
                weak: 0,
                strong: [0; 16],
            },
        );
        let mut buffer = vec![0u8; self.block_size as usize];
        for index in dirty_blocks {
            let start = len_u64(index) * block_size;
            let len = (new_len - start).min(block_size) as usize;
            read_at(start, &mut buffer[..len])?;
            let mut hash = hash_block(&buffer[..len], self.block_size);
            hash.strong[self.strong_len as usize..].fill(0);
            blocks[index] = hash;
        }
        self.blocks = blocks;
        self.content_len = new_len;
        Ok(())
    }

    /// The `fast_rsync` form of this signature; call `.index()` on it to diff.
    ///
    /// # Errors
    /// [`DeltaError::InvalidSignature`] if `fast_rsync` refuses the byte form (it never should).
    pub fn to_fast_rsync(&self) -> Result<Signature, DeltaError> {
        Signature::deserialize(self.to_bytes())
            .map_err(|_| DeltaError::InvalidSignature("fast_rsync refused the signature"))
    }
}

/// The number of `block_size` blocks (the last one possibly short) in `len` bytes.
fn block_count(len: u64, block_size: u32) -> u64 {
    len.div_ceil(u64::from(block_size.max(1)))
}

fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// One librsync signature entry: weak checksum (u32 BE), then up to 16 bytes of MD4.
fn parse_entry(entry: &[u8]) -> BlockHash {
    let mut weak = [0u8; 4];
    let mut strong = [0u8; 16];
    let (weak_bytes, strong_bytes) = entry.split_at(4.min(entry.len()));
    weak[..weak_bytes.len()].copy_from_slice(weak_bytes);
    let strong_len = strong_bytes.len().min(16);
    strong[..strong_len].copy_from_slice(&strong_bytes[..strong_len]);
    BlockHash {
        weak: u32::from_be_bytes(weak),
        strong,
    }
}

/// Hashes one block exactly as `fast_rsync::Signature::calculate` does.
fn hash_block(block: &[u8], block_size: u32) -> BlockHash {
    let one = Signature::calculate(
        block,
        SignatureOptions {
            block_size: block_size.max(1),
            crypto_hash_size: STRONG_HASH_LEN,
        },
    );
    parse_entry(&one.serialized()[SIGNATURE_HEADER_LEN..])
}

/// An rsync delta that turns the content `signature` describes into `new_content`.
///
/// # Errors
/// [`DeltaError::InvalidSignature`] or [`DeltaError::RsyncDiff`] if `fast_rsync` refuses.
pub fn rsync_delta(signature: &BlockSignature, new_content: &[u8]) -> Result<Delta, DeltaError> {
    let fast = signature.to_fast_rsync()?;
    let mut out = Vec::new();
    fast_rsync::diff(&fast.index(), new_content, &mut out)
        .map_err(|e| DeltaError::RsyncDiff(e.to_string()))?;
    Ok(Delta::Rsync(out))
}
