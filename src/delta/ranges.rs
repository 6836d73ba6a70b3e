//! Dirty ranges: which bytes of a file changed since its base content, as the FUSE layer sees
//! them, and the `Delta::Ranges` built from them.
//!
//! Owns [`DirtyRanges`] and [`ranges_delta`]. What always holds: the ranges in a
//! [`DirtyRanges`] are non-empty, sorted, and neither overlap nor touch (adjacent ranges are
//! merged); every byte of the current content that may differ from the base at the same
//! offset lies in [`DirtyRanges::to_send`], provided the FUSE layer reports every write with
//! [`DirtyRanges::insert`] and every size change with [`DirtyRanges::truncate`].

use std::collections::BTreeMap;
use std::io;

use crate::changelog::limits::{MAX_DELTA_LEN, MAX_RANGES_PER_DELTA};
use crate::changelog::model::Delta;

/// The set of byte ranges written since the base content.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyRanges {
    /// start -> end (exclusive); non-empty, disjoint, non-adjacent.
    ranges: BTreeMap<u64, u64>,
    /// The smallest size the file was cut to since the base, if it was cut. Base bytes at and
    /// past this offset are gone: if the file grows again they read as zeros (or new data),
    /// not as the base's bytes, so they must travel.
    shrunk_to: Option<u64>,
}

impl DirtyRanges {
    /// An empty set: the content equals the base.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a write of `len` bytes at `offset`, merging with overlapping or adjacent ranges.
    /// A range past `u64::MAX` is clipped there.
    pub fn insert(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut start = offset;
        let mut end = offset.saturating_add(len);
        // A range starting before `start` that reaches it merges.
        if let Some((&before_start, &before_end)) = self.ranges.range(..=start).next_back() {
            if before_end >= start {
                start = before_start;
                end = end.max(before_end);
            }
        }
        // Ranges starting within [start, end] merge.
        let swallowed: Vec<(u64, u64)> = self
            .ranges
            .range(start..=end)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in swallowed {
            self.ranges.remove(&s);
            end = end.max(e);
        }
        self.ranges.insert(start, end);
    }

    /// Records that the file was cut or extended to `size` bytes: ranges are clipped to it.
    /// Extending needs no range (the delta's resize fills zeros) unless the file was cut
    /// below its base size before, which this remembers.
    pub fn truncate(&mut self, size: u64) {
        let past: Vec<u64> = self.ranges.range(size..).map(|(&s, _)| s).collect();
        for start in past {
            self.ranges.remove(&start);
        }
        if let Some((&start, end)) = self.ranges.range_mut(..size).next_back() {
            if *end > size {
                *end = size;
            }
            debug_assert!(start < *end);
        }
        self.shrunk_to = Some(self.shrunk_to.map_or(size, |s| s.min(size)));
    }

    /// The written ranges as `(offset, len)`, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges
            .iter()
            .map(|(&start, &end)| (start, end - start))
    }

    /// How many disjoint ranges were written.
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }

    /// The number of bytes in the written ranges.
    pub fn total_bytes(&self) -> u64 {
        self.iter().map(|(_, len)| len).sum()
    }

    /// Whether nothing was written or cut since the base.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty() && self.shrunk_to.is_none()
    }

    /// Forgets everything: the current content becomes the base.
    pub fn clear(&mut self) {
        self.ranges.clear();
        self.shrunk_to = None;
    }

    /// The smallest size the file was cut to since the base, if it was cut.
    pub fn shrunk_to(&self) -> Option<u64> {
        self.shrunk_to
    }

    /// The ranges `(offset, len)` that must travel for content of `new_size` bytes: the written
    /// ranges, plus everything between the smallest cut and `new_size` (base bytes there are
    /// gone), clipped to `new_size`, merged and in order.
    pub fn to_send(&self, new_size: u64) -> Vec<(u64, u64)> {
        let mut all = self.clone();
        if let Some(shrunk_to) = self.shrunk_to {
            if shrunk_to < new_size {
                all.insert(shrunk_to, new_size - shrunk_to);
            }
        }
        all.truncate(new_size);
        all.iter().collect()
    }
}

/// Builds a `Delta::Ranges` for content of `new_size` bytes, reading only the bytes of
/// [`DirtyRanges::to_send`] through `read_at(offset, buffer)` (which fills `buffer` exactly).
///
/// # Errors
/// The first error of `read_at`; `InvalidInput` if the ranges exceed the change-log limits
/// ([`MAX_DELTA_LEN`] bytes or [`MAX_RANGES_PER_DELTA`] ranges): send `Whole` or `Rsync` then.
pub fn ranges_delta(
    dirty: &DirtyRanges,
    new_size: u64,
    mut read_at: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
) -> io::Result<Delta> {
    let to_send = dirty.to_send(new_size);
    let total: u64 = to_send.iter().map(|(_, len)| len).sum();
    if total > MAX_DELTA_LEN
        || u64::try_from(to_send.len()).unwrap_or(u64::MAX) > MAX_RANGES_PER_DELTA
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} dirty ranges of {total} bytes exceed the change-log limits ({} ranges, {} \
                 bytes); use another strategy",
                to_send.len(),
                MAX_RANGES_PER_DELTA,
                MAX_DELTA_LEN
            ),
        ));
    }
    let mut ranges = Vec::with_capacity(to_send.len());
    for (offset, len) in to_send {
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "range too large"))?;
        let mut bytes = vec![0u8; len];
        read_at(offset, &mut bytes)?;
        ranges.push((offset, bytes));
    }
    Ok(Delta::Ranges { new_size, ranges })
}
