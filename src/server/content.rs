//! A file's content as the storage service reads and changes it: fixed-size chunks of
//! [`CHUNK_SIZE`] bytes (the hash tree's 1 MiB leaf), each with its BLAKE3 chaining value at its
//! place in the content. An op that touches a few chunks reads, patches, hashes and stores only
//! those; the whole-content hash comes from merging the chaining values
//! ([`crate::delta::hash_tree`]), so it is verified without rehashing untouched chunks.
//!
//! What always holds for a [`Content`]: chunk `i` holds bytes `[i * CHUNK_SIZE, (i + 1) *
//! CHUNK_SIZE)` of the content (the last one shorter, none empty), and `cvs[i]` is
//! `leaf_cv(i, chunk i)`. Chunks made during an append live in memory (refcounted, freed when
//! no content names them any more) until the append commits; nothing here writes to the backend.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use futures_util::stream::{self, Stream, StreamExt};

use crate::changelog::empty_hash;
use crate::delta::hash_tree::{leaf_cv, LeafHashes, LEAF_LEN};
use crate::delta::DeltaError;

use super::backend::{Backend, BackendError, ChunkId, ObjectState};
use super::error::ApiError;
use super::limits::Spend;

/// Content is stored as chunks of this size (the last one shorter): one hash-tree leaf.
pub const CHUNK_SIZE: usize = LEAF_LEN as usize;

const CHUNK: u64 = LEAF_LEN;

/// A whole chunk of zeros, shared by every content extended with zeros.
static ZEROS: [u8; CHUNK_SIZE] = [0; CHUNK_SIZE];

fn zero_chunk() -> (ChunkId, Bytes) {
    static ID: OnceLock<ChunkId> = OnceLock::new();
    let id = *ID.get_or_init(|| *blake3::hash(&ZEROS).as_bytes());
    (id, Bytes::from_static(&ZEROS))
}

/// How many chunks content of `size` bytes has.
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK)
}

/// The length of chunk `i` of content of `size` bytes (`i` < [`chunk_count`]).
fn chunk_len(size: u64, i: u64) -> usize {
    // At most CHUNK_SIZE, so it fits.
    (size - i * CHUNK).min(CHUNK) as usize
}

/// Reads one stored chunk, checking it has the length its place says.
async fn read_stored(backend: &dyn Backend, id: &ChunkId, len: usize) -> Result<Bytes, ApiError> {
    let bytes = match backend.get_chunk(*id).await {
        Ok(b) => b,
        Err(BackendError::NotFound) => {
            return Err(ApiError::Internal(format!(
                "chunk {} missing",
                hex::encode(id)
            )))
        }
        Err(e) => return Err(e.into()),
    };
    if bytes.len() != len {
        return Err(ApiError::Internal(format!(
            "chunk {} holds {} bytes where the content needs {len}",
            hex::encode(id),
            bytes.len()
        )));
    }
    Ok(Bytes::from(bytes))
}

/// Bytes `[start, end)` of stored content of `size` bytes made of `chunks`, reading only the
/// chunks that hold them.
///
/// # Errors
/// A missing or malformed chunk (500), a backend failure.
pub async fn read_range(
    backend: &dyn Backend,
    chunks: &[ChunkId],
    size: u64,
    start: u64,
    end: u64,
) -> Result<Vec<u8>, ApiError> {
    if chunks.len() as u64 != chunk_count(size) {
        return Err(ApiError::Internal(format!(
            "the content has {} chunks for {size} bytes, not {}",
            chunks.len(),
            chunk_count(size)
        )));
    }
    let end = end.min(size);
    if start >= end {
        return Ok(Vec::new());
    }
    // The size comes from a stored record: the allocation may fail, and is refused, not aborted.
    let mut out = Vec::new();
    out.try_reserve_exact(usize::try_from(end - start).unwrap_or(usize::MAX))
        .map_err(|_| ApiError::Internal(format!("cannot hold {} bytes of content", end - start)))?;
    for i in start / CHUNK..end.div_ceil(CHUNK) {
        let bytes = read_stored(backend, &chunks[i as usize], chunk_len(size, i)).await?;
        let base = i * CHUNK;
        let s = start.saturating_sub(base) as usize;
        let e = (end - base).min(bytes.len() as u64) as usize;
        out.extend_from_slice(&bytes[s..e]);
    }
    Ok(out)
}

/// Bytes `[start, end)` like [`read_range`], as a stream that holds at most two chunks at a
/// time (the next one is read while the current one is sent). The first chunk is read before
/// this returns, so content missing from the start is an error answer, not a cut stream.
///
/// # Errors
/// As [`read_range`], for the first chunk; later chunks fail the stream.
pub async fn stream_range(
    backend: Arc<dyn Backend>,
    chunks: Vec<ChunkId>,
    size: u64,
    start: u64,
    end: u64,
) -> Result<impl Stream<Item = Result<Bytes, ApiError>> + Send + 'static, ApiError> {
    if chunks.len() as u64 != chunk_count(size) {
        return Err(ApiError::Internal(format!(
            "the content has {} chunks for {size} bytes, not {}",
            chunks.len(),
            chunk_count(size)
        )));
    }
    let end = end.min(size);
    let (first, last) = if start < end {
        (start / CHUNK, end.div_ceil(CHUNK))
    } else {
        (0, 0)
    };
    // The part of chunk `i` inside the range.
    let part = move |i: u64, bytes: Bytes| {
        let base = i * CHUNK;
        let s = start.saturating_sub(base) as usize;
        let e = (end - base).min(bytes.len() as u64) as usize;
        bytes.slice(s..e)
    };
    let head = if first < last {
        let i = first as usize;
        Some(part(
            first,
            read_stored(backend.as_ref(), &chunks[i], chunk_len(size, first)).await?,
        ))
    } else {
        None
    };
    let rest = stream::iter((first + 1)..last)
        .map(move |i| {
            let backend = backend.clone();
            let id = chunks[i as usize];
            async move {
                read_stored(backend.as_ref(), &id, chunk_len(size, i))
                    .await
                    .map(|b| part(i, b))
            }
        })
        .buffered(2);
    Ok(stream::iter(head.map(Ok)).chain(rest))
}

/// One chunk of a content: already in the backend, or made by the append in progress.
#[derive(Clone, Debug)]
enum Chunk {
    Stored(ChunkId),
    New { id: ChunkId, bytes: Bytes },
}

impl Chunk {
    fn id(&self) -> ChunkId {
        match self {
            Chunk::Stored(id) | Chunk::New { id, .. } => *id,
        }
    }
}

/// A chunk an op changes, until it is hashed.
enum Slot {
    /// The old chunk's first `keep` bytes, then zeros up to `len` (not read yet: a range that
    /// covers the whole chunk makes reading it needless).
    Old { keep: usize, len: usize },
    /// The new bytes.
    Bytes(Vec<u8>),
}

/// A file's content as chunks with their chaining values (see the module documentation).
#[derive(Clone, Debug, Default)]
pub struct Content {
    size: u64,
    chunks: Vec<Chunk>,
    cvs: Vec<[u8; 32]>,
}

fn delta_error(e: DeltaError) -> ApiError {
    ApiError::Unprocessable(format!("cannot apply delta: {e}"))
}

/// Hashes new chunks (content id and chaining value at their place) on a blocking thread, so
/// hashing megabytes does not hold up the async workers. A known id is not recomputed.
async fn hash_chunks(
    chunks: Vec<(u64, Bytes, Option<ChunkId>)>,
) -> Result<Vec<(u64, Chunk, [u8; 32])>, ApiError> {
    tokio::task::spawn_blocking(move || {
        chunks
            .into_iter()
            .map(|(i, bytes, id)| {
                let id = id.unwrap_or_else(|| *blake3::hash(&bytes).as_bytes());
                let cv = leaf_cv(i, &bytes);
                (i, Chunk::New { id, bytes }, cv)
            })
            .collect()
    })
    .await
    .map_err(|e| ApiError::Internal(format!("chunk hashing failed: {e}")))
}

impl Content {
    /// The stored content of a file. Records written before chaining values were kept get
    /// them computed here, reading each chunk once and checking the result against the
    /// record's hash.
    ///
    /// # Errors
    /// A record whose chunks do not fit its size or hash, a missing chunk (500), a backend
    /// failure.
    pub async fn load(backend: &dyn Backend, s: &ObjectState) -> Result<Content, ApiError> {
        let count = chunk_count(s.size);
        if s.chunks.len() as u64 != count {
            return Err(ApiError::Internal(format!(
                "object {} has {} chunks for {} bytes, not {count}",
                hex::encode(s.id),
                s.chunks.len(),
                s.size
            )));
        }
        let chunks: Vec<Chunk> = s.chunks.iter().map(|c| Chunk::Stored(*c)).collect();
        if let Some(cvs) = s.chunk_cvs.as_ref().filter(|c| c.len() == chunks.len()) {
            return Ok(Content {
                size: s.size,
                chunks,
                cvs: cvs.clone(),
            });
        }
        let mut cvs = Vec::with_capacity(chunks.len());
        for (i, id) in s.chunks.iter().enumerate() {
            let i = i as u64;
            let bytes = read_stored(backend, id, chunk_len(s.size, i)).await?;
            cvs.push(
                tokio::task::spawn_blocking(move || leaf_cv(i, &bytes))
                    .await
                    .map_err(|e| ApiError::Internal(format!("chunk hashing failed: {e}")))?,
            );
        }
        let content = Content {
            size: s.size,
            chunks,
            cvs,
        };
        if content.hash()? != s.hash {
            return Err(ApiError::Internal(format!(
                "the stored content of object {} does not match its hash",
                hex::encode(s.id)
            )));
        }
        Ok(content)
    }

    /// New content holding `bytes` (split into chunks that share its buffer, hashed on a
    /// blocking thread).
    ///
    /// # Errors
    /// Only if the hashing task fails.
    pub async fn from_bytes(bytes: Bytes) -> Result<Content, ApiError> {
        let parts = (0..bytes.len())
            .step_by(CHUNK_SIZE)
            .enumerate()
            .map(|(i, at)| {
                let end = (at + CHUNK_SIZE).min(bytes.len());
                (i as u64, bytes.slice(at..end), None)
            })
            .collect();
        let mut content = Content {
            size: bytes.len() as u64,
            ..Content::default()
        };
        for (_, chunk, cv) in hash_chunks(parts).await? {
            content.chunks.push(chunk);
            content.cvs.push(cv);
        }
        Ok(content)
    }

    /// Content length in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The chunk ids, in order (for the object's record).
    pub fn chunk_ids(&self) -> Vec<ChunkId> {
        self.chunks.iter().map(Chunk::id).collect()
    }

    /// The chaining value of each chunk, in order (for the object's record).
    pub fn chunk_cvs(&self) -> &[[u8; 32]] {
        &self.cvs
    }

    /// The chunks made since the content was loaded (some may repeat or already be stored:
    /// chunks are content-addressed).
    pub fn new_chunks(&self) -> impl Iterator<Item = (ChunkId, Bytes)> + '_ {
        self.chunks.iter().filter_map(|c| match c {
            Chunk::New { id, bytes } => Some((*id, bytes.clone())),
            Chunk::Stored(_) => None,
        })
    }

    /// `blake3::hash` of the whole content, from the chaining values (no chunk is read).
    ///
    /// # Errors
    /// Broken invariants only (500).
    pub fn hash(&self) -> Result<[u8; 32], ApiError> {
        match self.chunks.as_slice() {
            [] => Ok(empty_hash()),
            // One chunk is the whole content: its content id is the content's hash.
            [only] => Ok(only.id()),
            _ => LeafHashes::from_leaves(self.size, self.cvs.clone())
                .ok()
                .and_then(|l| l.root())
                .ok_or_else(|| {
                    ApiError::Internal("chunk chaining values do not fit the content".into())
                }),
        }
    }

    /// Chunk `i`'s bytes: from memory if made in this append, else from the backend.
    async fn chunk_bytes(&self, backend: &dyn Backend, i: u64) -> Result<Bytes, ApiError> {
        match &self.chunks[i as usize] {
            Chunk::New { bytes, .. } => Ok(bytes.clone()),
            Chunk::Stored(id) => read_stored(backend, id, chunk_len(self.size, i)).await,
        }
    }

    /// The whole content in memory (what an rsync delta applies to).
    ///
    /// # Errors
    /// As [`read_range`].
    pub async fn read_all(&self, backend: &dyn Backend) -> Result<Vec<u8>, ApiError> {
        let mut out = Vec::new();
        out.try_reserve_exact(usize::try_from(self.size).unwrap_or(usize::MAX))
            .map_err(|_| {
                ApiError::Internal(format!("cannot hold {} bytes of content", self.size))
            })?;
        for i in 0..self.chunks.len() as u64 {
            out.extend_from_slice(&self.chunk_bytes(backend, i).await?);
        }
        Ok(out)
    }

    /// Charges what [`Content::apply_ranges`] will do, before it reads or hashes anything: the
    /// work is every chunk it hashes (the chunks the ranges touch, the chunk holding the cut
    /// point and every chunk past it), the memory every such chunk but the whole chunks of
    /// zeros past the old end (shared, not held).
    async fn charge_ranges(
        &self,
        new_size: u64,
        ranges: &[(u64, Vec<u8>)],
        spend: &mut Spend,
    ) -> Result<(), ApiError> {
        let kept = self.size.min(new_size);
        // The resize: from the chunk holding the cut point to the new end (counted in bytes,
        // without listing the chunks: a truncate may ask for millions of them).
        let resized_from = kept / CHUNK;
        let resize_work = new_size.saturating_sub(resized_from * CHUNK);
        let resize_memory = resize_work.min(2 * CHUNK);
        let mut touched = std::collections::BTreeSet::new();
        for (offset, bytes) in ranges {
            if bytes.is_empty() {
                continue;
            }
            let last = (offset + bytes.len() as u64 - 1) / CHUNK;
            touched.extend(offset / CHUNK..=last);
        }
        let ranges_work: u64 = touched.iter().map(|i| chunk_len(new_size, *i) as u64).sum();
        let outside: u64 = touched
            .iter()
            .filter(|i| **i < resized_from)
            .map(|i| chunk_len(new_size, *i) as u64)
            .sum();
        let what = if ranges.is_empty() {
            format!("resizing a file of {} bytes to {new_size}", self.size)
        } else {
            format!("a write of {} ranges", ranges.len())
        };
        spend
            .charge(
                resize_work.saturating_add(outside),
                resize_memory.saturating_add(ranges_work),
                &what,
            )
            .await
    }

    /// Chunk `i` (of the old content) as its first `keep` bytes, then zeros up to `len`.
    async fn old_bytes(
        &self,
        backend: &dyn Backend,
        i: u64,
        keep: usize,
        len: usize,
    ) -> Result<Vec<u8>, ApiError> {
        let mut out = Vec::with_capacity(len);
        if keep > 0 {
            out.extend_from_slice(&self.chunk_bytes(backend, i).await?[..keep]);
        }
        out.resize(len, 0);
        Ok(out)
    }

    /// Resizes the content to `new_size` (cut, or extended with zeros), then writes each
    /// range's bytes at its offset, in order: a `Delta::Ranges`, or a `Truncate` with no range.
    /// Reads only the old chunks a range covers in part or the resize cuts, hashes only the
    /// chunks that change, after charging that work and memory to `spend`. The caller checks
    /// the size cap and the resulting hash.
    ///
    /// # Errors
    /// 422 for a range past `new_size`, 413 over the work budget, 503 when the memory budget
    /// stays full (nothing changed then); a missing chunk (500).
    pub async fn apply_ranges(
        &mut self,
        backend: &dyn Backend,
        new_size: u64,
        ranges: &[(u64, Vec<u8>)],
        spend: &mut Spend,
    ) -> Result<(), ApiError> {
        for (index, (offset, bytes)) in ranges.iter().enumerate() {
            let len = bytes.len() as u64;
            if offset.checked_add(len).is_none_or(|end| end > new_size) {
                return Err(delta_error(DeltaError::RangeOutOfBounds {
                    index,
                    offset: *offset,
                    len,
                    new_size,
                }));
            }
        }
        self.charge_ranges(new_size, ranges, spend).await?;
        let kept = self.size.min(new_size);
        let new_count = chunk_count(new_size);
        let old_count = self.chunks.len() as u64;
        let mut slots: BTreeMap<u64, Slot> = BTreeMap::new();
        // The resize: the chunk holding the cut point changes, and every chunk past it is zeros.
        for i in kept / CHUNK..new_count {
            let len = chunk_len(new_size, i);
            let old_len = if i < old_count {
                chunk_len(self.size, i)
            } else {
                0
            };
            let keep = kept.saturating_sub(i * CHUNK).min(CHUNK) as usize;
            if old_len == len && keep == len {
                continue;
            }
            slots.insert(i, Slot::Old { keep, len });
        }
        for (offset, bytes) in ranges {
            let end = offset + bytes.len() as u64;
            let mut at = *offset;
            while at < end {
                let i = at / CHUNK;
                let len = chunk_len(new_size, i);
                let from = (at - i * CHUNK) as usize;
                let n = ((end - at) as usize).min(len - from);
                let src = &bytes[(at - offset) as usize..][..n];
                // A chunk no resize touched keeps all its old bytes.
                let slot = slots.entry(i).or_insert(Slot::Old { keep: len, len });
                match slot {
                    Slot::Bytes(b) => b[from..from + n].copy_from_slice(src),
                    // Covered whole: the old bytes are not needed.
                    Slot::Old { .. } if n == len => *slot = Slot::Bytes(src.to_vec()),
                    Slot::Old { keep, len } => {
                        let mut b = self.old_bytes(backend, i, *keep, *len).await?;
                        b[from..from + n].copy_from_slice(src);
                        *slot = Slot::Bytes(b);
                    }
                }
                at += n as u64;
            }
        }
        let mut parts = Vec::with_capacity(slots.len());
        for (i, slot) in slots {
            parts.push(match slot {
                Slot::Bytes(b) => (i, Bytes::from(b), None),
                Slot::Old { keep: 0, len } if len == CHUNK_SIZE => {
                    let (id, zeros) = zero_chunk();
                    (i, zeros, Some(id))
                }
                Slot::Old { keep, len } => (
                    i,
                    Bytes::from(self.old_bytes(backend, i, keep, len).await?),
                    None,
                ),
            });
        }
        let hashed = hash_chunks(parts).await?;
        let n = new_count as usize;
        self.chunks.truncate(n);
        self.cvs.truncate(n);
        // Every chunk past the old end is among the hashed ones and replaces its placeholder.
        self.chunks.resize(n, Chunk::Stored([0; 32]));
        self.cvs.resize(n, [0; 32]);
        for (i, chunk, cv) in hashed {
            self.chunks[i as usize] = chunk;
            self.cvs[i as usize] = cv;
        }
        self.size = new_size;
        Ok(())
    }
}
