//! Files on demand: which files' content is not (entirely) on this device.
//!
//! A file whose content is online-only carries [`INODE_ABSENT`] in its inode flags and one
//! [`AbsentContent`] record in column family `absent`, keyed by inode number: the server
//! version its content is fetched by, the hash the whole content must have, and which
//! [`CHUNK`]-sized pieces of the content file already hold fetched bytes. Reads serve only
//! the pieces the record marks present; everything else is fetched by range first.
//!
//! What always holds:
//! - A piece is marked present only after its bytes were written to the content file, so a
//!   present mark never covers bytes that were not fetched. (After a crash the marks may be
//!   fewer than what was written: those pieces are fetched again.)
//! - The flag and the record change together, in the batch that changes the inode.
//! - Once every piece is present and the whole content has the record's hash, the record
//!   goes and the file is local like any other ([`INODE_ABSENT`] cleared).

use crate::changelog::{ContentHash, ObjectId};

use super::sync_state::R;
use super::{Batch, Result, Store, StoreError};

pub(super) const CF_ABSENT: &str = "absent";

/// Inode flag: the content is not (entirely) on this device (see the module docs).
pub const INODE_ABSENT: u32 = 1;
/// Inode flag: the file or folder is pinned: its content (for a folder, everything under
/// it) is kept on this device and updated eagerly.
pub const INODE_PINNED: u32 = 2;

/// Inode flag: a conflicted copy this device made (the sync status `conflict` comes from
/// it, not from the name). Cleared when the user renames the file, which settles it.
pub const INODE_CONFLICT: u32 = 4;

/// The piece size of online-only content: what one fetch covers at least.
pub const CHUNK: u64 = 1 << 20;

/// The record of an online-only file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AbsentContent {
    pub object: ObjectId,
    /// The server version to fetch the content by (`?version=`).
    pub version: u64,
    pub hash: ContentHash,
    pub size: u64,
    /// One bit per [`CHUNK`]: set when the content file holds that piece.
    pub present: Vec<u8>,
}

impl AbsentContent {
    pub fn new(object: ObjectId, version: u64, hash: ContentHash, size: u64) -> AbsentContent {
        AbsentContent {
            object,
            version,
            hash,
            size,
            present: vec![0; Self::chunks_of(size).div_ceil(8) as usize],
        }
    }

    /// How many pieces a file of `size` bytes has.
    pub fn chunks_of(size: u64) -> u64 {
        size.div_ceil(CHUNK)
    }

    pub fn chunks(&self) -> u64 {
        Self::chunks_of(self.size)
    }

    pub fn has(&self, chunk: u64) -> bool {
        self.present
            .get((chunk / 8) as usize)
            .is_some_and(|b| b & (1 << (chunk % 8)) != 0)
    }

    pub fn mark(&mut self, chunk: u64) {
        if let Some(b) = self.present.get_mut((chunk / 8) as usize) {
            *b |= 1 << (chunk % 8);
        }
    }

    /// Whether every piece is present.
    pub fn complete(&self) -> bool {
        (0..self.chunks()).all(|c| self.has(c))
    }

    /// Bytes of the content present on this device.
    pub fn present_bytes(&self) -> u64 {
        (0..self.chunks())
            .filter(|c| self.has(*c))
            .map(|c| (self.size - c * CHUNK).min(CHUNK))
            .sum()
    }

    /// The runs of missing pieces that overlap `[start, end)`, as byte ranges `[a, b)`
    /// clipped to the file; a run never exceeds `max_run` bytes.
    pub fn missing(&self, start: u64, end: u64, max_run: u64) -> Vec<(u64, u64)> {
        let end = end.min(self.size);
        if start >= end {
            return Vec::new();
        }
        let max_chunks = (max_run / CHUNK).max(1);
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut run: Option<(u64, u64)> = None;
        for c in start / CHUNK..end.div_ceil(CHUNK) {
            if self.has(c) {
                if let Some(r) = run.take() {
                    out.push(r);
                }
                continue;
            }
            run = match run {
                Some((a, n)) if n < max_chunks => Some((a, n + 1)),
                Some(r) => {
                    out.push(r);
                    Some((c, 1))
                }
                None => Some((c, 1)),
            };
        }
        out.extend(run);
        out.into_iter()
            .map(|(c, n)| (c * CHUNK, ((c + n) * CHUNK).min(self.size)))
            .collect()
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 16 + 8 + 32 + 8 + 4 + self.present.len());
        out.push(1);
        out.extend_from_slice(&self.object.0);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.hash);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&(self.present.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.present);
        out
    }

    fn decode(b: &[u8]) -> Result<AbsentContent> {
        let mut r = R(b);
        if r.u8()? != 1 {
            return Err(StoreError::Corrupt(
                "unknown online-only record layout".into(),
            ));
        }
        let object = ObjectId(r.arr()?);
        let version = r.u64()?;
        let hash = r.arr()?;
        let size = r.u64()?;
        let present = r.bytes()?;
        if present.len() as u64 != Self::chunks_of(size).div_ceil(8) {
            return Err(StoreError::Corrupt(
                "online-only record of the wrong length".into(),
            ));
        }
        Ok(AbsentContent {
            object,
            version,
            hash,
            size,
            present,
        })
    }
}

const META_ON_DEMAND: &[u8] = b"on_demand";

impl Store {
    /// Whether the last mount of this store was an on-demand one (`status` counts local and
    /// online-only files only then, or while online-only files are left).
    ///
    /// # Errors
    /// The store cannot be read.
    pub fn on_demand_mode(&self) -> Result<bool> {
        Ok(self
            .meta_range(META_ON_DEMAND)?
            .iter()
            .any(|(k, _)| k.as_slice() == META_ON_DEMAND))
    }

    /// Whether any file's content is online-only.
    ///
    /// # Errors
    /// The store cannot be read.
    pub fn has_absent(&self) -> Result<bool> {
        match self
            .db
            .iterator_cf(self.cf(CF_ABSENT), rocksdb::IteratorMode::Start)
            .next()
        {
            Some(item) => {
                item?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Records whether this store is mounted on demand.
    ///
    /// # Errors
    /// The write failed.
    pub fn set_on_demand_mode(&self, on: bool) -> Result<()> {
        let mut b = self.batch();
        if on {
            b.put_meta(META_ON_DEMAND, b"1");
        } else {
            b.delete_meta(META_ON_DEMAND);
        }
        self.commit(b, false)
    }

    /// The online-only record of inode `ino`, if its content is not entirely local.
    ///
    /// # Errors
    /// The record cannot be read.
    pub fn absent(&self, ino: u64) -> Result<Option<AbsentContent>> {
        match self
            .db
            .get_pinned_cf(self.cf(CF_ABSENT), ino.to_be_bytes())?
        {
            Some(v) => Ok(Some(AbsentContent::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Every online-only record: (inode, record).
    ///
    /// # Errors
    /// A record cannot be read.
    pub fn absent_all(&self) -> Result<Vec<(u64, AbsentContent)>> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_ABSENT), rocksdb::IteratorMode::Start)
        {
            let (k, v) = item?;
            let ino = u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("bad online-only key".into()))?,
            );
            out.push((ino, AbsentContent::decode(&v)?));
        }
        Ok(out)
    }

    /// Calls `f` with every inode (in inode order) until it returns `false`.
    ///
    /// # Errors
    /// A record cannot be read.
    pub fn for_each_inode(&self, mut f: impl FnMut(super::Inode) -> bool) -> Result<()> {
        for item in self
            .db
            .iterator_cf(self.cf(super::CF_INODES), rocksdb::IteratorMode::Start)
        {
            let (k, v) = item?;
            let ino = u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("bad inode key".into()))?,
            );
            if !f(super::Inode::decode(ino, &v)?) {
                break;
            }
        }
        Ok(())
    }
}

impl Batch<'_> {
    pub fn put_absent(&mut self, ino: u64, rec: &AbsentContent) {
        self.wb
            .put_cf(self.store.cf(CF_ABSENT), ino.to_be_bytes(), rec.encode());
    }

    pub fn delete_absent(&mut self, ino: u64) {
        self.wb
            .delete_cf(self.store.cf(CF_ABSENT), ino.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_runs_are_clipped_cut_and_skip_present_pieces() {
        let mut r = AbsentContent::new(ObjectId([1; 16]), 3, [2; 32], 10 * CHUNK + 5);
        assert_eq!(r.chunks(), 11);
        assert_eq!(r.missing(0, 1, 4 * CHUNK), vec![(0, CHUNK)]);
        r.mark(1);
        r.mark(2);
        assert_eq!(
            r.missing(0, 6 * CHUNK, 2 * CHUNK),
            vec![(0, CHUNK), (3 * CHUNK, 5 * CHUNK), (5 * CHUNK, 6 * CHUNK)]
        );
        // The last piece is short.
        assert_eq!(
            r.missing(10 * CHUNK + 1, u64::MAX, CHUNK),
            vec![(10 * CHUNK, 10 * CHUNK + 5)]
        );
        assert!(r.missing(CHUNK, 3 * CHUNK, CHUNK).is_empty());
        assert!(r.missing(20 * CHUNK, 30 * CHUNK, CHUNK).is_empty());
        assert_eq!(r.present_bytes(), 2 * CHUNK);
        for c in 0..11 {
            r.mark(c);
        }
        assert!(r.complete());
        assert_eq!(r.present_bytes(), r.size);
    }

    #[test]
    fn a_record_round_trips_and_a_damaged_one_is_refused() {
        let mut r = AbsentContent::new(ObjectId([1; 16]), 3, [2; 32], 17 * CHUNK);
        r.mark(16);
        let b = r.encode();
        assert_eq!(AbsentContent::decode(&b).unwrap(), r);
        assert!(AbsentContent::decode(&b[..b.len() - 1]).is_err());
        let mut wrong = b.clone();
        wrong[0] = 9;
        assert!(AbsentContent::decode(&wrong).is_err());
        let empty = AbsentContent::new(ObjectId([1; 16]), 1, [0; 32], 0);
        assert!(empty.complete());
        assert_eq!(AbsentContent::decode(&empty.encode()).unwrap(), empty);
    }
}
