//! Incremental whole-content hashes: the BLAKE3 hash of a file, recomputed after an edit
//! by rehashing only the 1 MiB leaves the edit touched.
//!
//! A change log names every version of a file by `blake3::hash(content)`. Hashing a 1 GiB
//! file after a 1-byte edit would read the whole file; instead the store keeps the chaining
//! value of every 1 MiB leaf (BLAKE3's tree is built from 1 KiB chunks, and a 1 MiB leaf
//! is a complete subtree of 1,024 chunks) and merges them up to the root with
//! `blake3::hazmat`.
//!
//! What always holds: [`LeafHashes::root`] equals `blake3::hash` of the content the leaves
//! were computed from (property-tested below against `blake3::hash`).

use blake3::hazmat::{
    merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

/// Bytes per leaf: a complete BLAKE3 subtree (a power of two of 1 KiB chunks).
pub const LEAF_LEN: u64 = 1 << 20;

/// The chaining values of a content's 1 MiB leaves, and its length.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct LeafHashes {
    len: u64,
    leaves: Vec<ChainingValue>,
}

fn leaf_count(len: u64) -> u64 {
    len.div_ceil(LEAF_LEN)
}

/// The chaining value of leaf `index` holding `data` (at most [`LEAF_LEN`] bytes; shorter
/// only for the last leaf of a content).
pub fn leaf_cv(index: u64, data: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(index * LEAF_LEN);
    h.update(data);
    h.finalize_non_root()
}

/// Errors of [`LeafHashes::decode`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeafHashError {
    #[error("leaf hash record is malformed ({0})")]
    Malformed(&'static str),
}

impl LeafHashes {
    /// The leaves of `content`, hashed whole.
    pub fn of(content: &[u8]) -> LeafHashes {
        let len = content.len() as u64;
        let leaves = content
            .chunks(LEAF_LEN as usize)
            .enumerate()
            .map(|(i, c)| leaf_cv(i as u64, c))
            .collect();
        LeafHashes { len, leaves }
    }

    /// Leaves already computed, for content of `len` bytes (one value per started leaf).
    ///
    /// # Errors
    /// The number of leaves does not match `len`.
    pub fn from_leaves(len: u64, leaves: Vec<ChainingValue>) -> Result<LeafHashes, LeafHashError> {
        if leaves.len() as u64 != leaf_count(len) {
            return Err(LeafHashError::Malformed("leaf count does not match length"));
        }
        Ok(LeafHashes { len, leaves })
    }

    /// The chaining value of every leaf, in order.
    pub fn leaves(&self) -> &[ChainingValue] {
        &self.leaves
    }

    /// The BLAKE3 hash of the whole content when it spans more than one leaf; `None` for
    /// content of one leaf or less, whose hash is `blake3::hash` of that leaf's bytes.
    pub fn root(&self) -> Option<[u8; 32]> {
        (self.len > LEAF_LEN).then(|| {
            let (l, r) = self.split(0, self.leaves.len());
            *merge_subtrees_root(&l, &r, Mode::Hash).as_bytes()
        })
    }

    /// Content length these leaves describe.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Brings the leaves to content of `new_len` bytes whose bytes changed only inside
    /// `changed` ranges (offset, length) and past the old length. `read_leaf(i, buf)` must
    /// fill `buf` with leaf `i` of the NEW content (its exact length). Only leaves that
    /// overlap a change, and the last leaf when the length changed, are read.
    ///
    /// # Errors
    /// Whatever `read_leaf` returns.
    pub fn update<E>(
        &mut self,
        new_len: u64,
        changed: impl IntoIterator<Item = (u64, u64)>,
        mut read_leaf: impl FnMut(u64, &mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let old_len = self.len;
        let count = leaf_count(new_len);
        let mut dirty: Vec<u64> = Vec::new();
        for (off, l) in changed {
            if l == 0 || off >= new_len {
                continue;
            }
            let end = (off + l).min(new_len);
            dirty.extend(off / LEAF_LEN..end.div_ceil(LEAF_LEN));
        }
        if new_len != old_len {
            // The old last leaf changes length (or is cut), and every new leaf is new.
            let first_affected = old_len.min(new_len) / LEAF_LEN;
            dirty.extend(first_affected..count);
        }
        self.leaves.resize(count as usize, [0; 32]);
        self.len = new_len;
        dirty.sort_unstable();
        dirty.dedup();
        let mut buf = Vec::new();
        for i in dirty.into_iter().filter(|i| *i < count) {
            let start = i * LEAF_LEN;
            let n = (new_len - start).min(LEAF_LEN) as usize;
            buf.resize(n, 0);
            read_leaf(i, &mut buf)?;
            self.leaves[i as usize] = leaf_cv(i, &buf);
        }
        Ok(())
    }

    /// The BLAKE3 hash of the whole content.
    ///
    /// Content of one leaf or less is hashed as a root directly by `update`'s caller;
    /// here it is rebuilt from that leaf's bytes, so callers must keep small contents'
    /// root via [`LeafHashes::root_with`].
    pub fn root_with(&self, small_content: impl FnOnce() -> Vec<u8>) -> [u8; 32] {
        // A single chunk-run is the root itself: it must be finalized as root.
        self.root()
            .unwrap_or_else(|| *blake3::hash(&small_content()).as_bytes())
    }

    /// Chaining values of the left and right subtrees of leaves `[from, to)`.
    fn split(&self, from: usize, to: usize) -> (ChainingValue, ChainingValue) {
        let n = to - from;
        // BLAKE3's left subtree holds the largest power of two of leaves that leaves at
        // least one for the right (all leaves but the last are full).
        let left = if n.is_power_of_two() {
            n / 2
        } else {
            1 << (usize::BITS - 1 - (n - 1).leading_zeros())
        };
        (self.cv(from, from + left), self.cv(from + left, to))
    }

    fn cv(&self, from: usize, to: usize) -> ChainingValue {
        if to - from == 1 {
            return self.leaves[from];
        }
        let (l, r) = self.split(from, to);
        merge_subtrees_non_root(&l, &r, Mode::Hash)
    }

    /// Bytes for the store: length (u64 LE) then 32 bytes a leaf.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 32 * self.leaves.len());
        out.extend_from_slice(&self.len.to_le_bytes());
        for l in &self.leaves {
            out.extend_from_slice(l);
        }
        out
    }

    /// # Errors
    /// The record's length does not match its leaf count.
    pub fn decode(b: &[u8]) -> Result<LeafHashes, LeafHashError> {
        let len_bytes: [u8; 8] = b
            .get(..8)
            .and_then(|s| s.try_into().ok())
            .ok_or(LeafHashError::Malformed("too short"))?;
        let len = u64::from_le_bytes(len_bytes);
        let rest = &b[8..];
        if rest.len() % 32 != 0 || (rest.len() / 32) as u64 != leaf_count(len) {
            return Err(LeafHashError::Malformed("leaf count does not match length"));
        }
        let leaves = rest
            .chunks_exact(32)
            .map(|c| {
                let mut a = [0u8; 32];
                a.copy_from_slice(c);
                a
            })
            .collect();
        Ok(LeafHashes { len, leaves })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn root_of(content: &[u8]) -> [u8; 32] {
        LeafHashes::of(content).root_with(|| content.to_vec())
    }

    #[test]
    fn root_equals_blake3_for_leaf_boundaries() {
        let l = LEAF_LEN as usize;
        for len in [
            0,
            1,
            1024,
            l - 1,
            l,
            l + 1,
            2 * l,
            2 * l + 7,
            3 * l,
            5 * l - 1,
            8 * l,
            9 * l + 3,
        ] {
            let content: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            assert_eq!(
                root_of(&content),
                *blake3::hash(&content).as_bytes(),
                "len {len}"
            );
        }
    }

    #[test]
    fn update_reads_only_touched_leaves() {
        let l = LEAF_LEN as usize;
        let mut content: Vec<u8> = (0..6 * l).map(|i| (i % 253) as u8).collect();
        let mut hashes = LeafHashes::of(&content);
        content[3 * l + 5] ^= 0xff;
        let mut read = Vec::new();
        hashes
            .update(content.len() as u64, [((3 * l + 5) as u64, 1)], |i, buf| {
                read.push(i);
                let s = i as usize * l;
                buf.copy_from_slice(&content[s..s + buf.len()]);
                Ok::<(), ()>(())
            })
            .unwrap();
        assert_eq!(read, vec![3]);
        assert_eq!(
            hashes.root_with(|| unreachable!()),
            *blake3::hash(&content).as_bytes()
        );
    }

    #[test]
    fn leaves_rebuilt_from_their_values_give_the_same_root() {
        let content: Vec<u8> = (0..3 * LEAF_LEN as usize + 5).map(|i| i as u8).collect();
        let h = LeafHashes::of(&content);
        let again = LeafHashes::from_leaves(h.len(), h.leaves().to_vec()).unwrap();
        assert_eq!(again.root(), Some(*blake3::hash(&content).as_bytes()));
        assert_eq!(
            h.leaves()[1],
            leaf_cv(1, &content[LEAF_LEN as usize..2 * LEAF_LEN as usize])
        );
        assert!(LeafHashes::from_leaves(h.len(), h.leaves()[..3].to_vec()).is_err());
        assert_eq!(
            LeafHashes::of(&content[..100]).root(),
            None,
            "one leaf: hash its bytes"
        );
    }

    #[test]
    fn encode_decode_round_trips_and_rejects_bad_records() {
        let content = vec![7u8; 3 * LEAF_LEN as usize + 9];
        let h = LeafHashes::of(&content);
        assert_eq!(LeafHashes::decode(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad.pop();
        assert!(LeafHashes::decode(&bad).is_err());
        assert!(LeafHashes::decode(&[1, 2, 3]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn incremental_update_matches_full_hash(
            base_leaves in 0u64..5,
            base_extra in 0u64..3000,
            edits in proptest::collection::vec((0u64..6 * LEAF_LEN, 1u64..5000), 0..4),
            new_len_delta in -3000i64..(2 * LEAF_LEN as i64),
        ) {
            let base_len = base_leaves * LEAF_LEN + base_extra;
            let mut content: Vec<u8> = (0..base_len).map(|i| (i % 241) as u8).collect();
            let mut h = LeafHashes::of(&content);
            let new_len = (base_len as i64 + new_len_delta).max(0) as u64;
            content.resize(new_len as usize, 0);
            let mut changed = Vec::new();
            for (off, len) in edits {
                if off >= new_len { continue; }
                let end = (off + len).min(new_len);
                for b in &mut content[off as usize..end as usize] { *b = b.wrapping_add(1); }
                changed.push((off, end - off));
            }
            h.update(new_len, changed, |i, buf| {
                let s = (i * LEAF_LEN) as usize;
                buf.copy_from_slice(&content[s..s + buf.len()]);
                Ok::<(), ()>(())
            }).unwrap();
            prop_assert_eq!(h.root_with(|| content.clone()), *blake3::hash(&content).as_bytes());
        }
    }
}
