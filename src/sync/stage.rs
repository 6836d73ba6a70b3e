//! Phase one of a remote apply (decision 0017): the new content an apply needs, fetched from
//! the server or built from a delta, into files under the store's `content/incoming/` folder,
//! before the driver takes any lock. Phase two (`crate::fs::apply`) links them into place
//! under the lock.
//!
//! What always holds:
//! - Nothing here holds the file system's metadata lock or the engine's lock: a slow or
//!   stalled server delays only the apply waiting for it, never a `write()` in the mount.
//! - Content never sits whole in memory: a fetch is written to disk chunk by chunk as it
//!   arrives, a delta of ranges is written into a copy of its base (only an rsync delta
//!   still reads its base and builds its result in memory, bounded by
//!   [`crate::fs::apply::MAX_APPLY_CONTENT`]).
//! - A staged file is named `<content hash>` only after its bytes were hashed and matched
//!   the hash and size the change names (built or fetched, the same check as the apply's),
//!   and made durable. Content of a hash never changes, so a staged file stays valid whatever
//!   the engine decides next.
//! - Sizes are checked before any byte is fetched: against the change (the answer's
//!   `Content-Length`, then what arrives) and against the free disk space, which keeps
//!   [`FREE_SPACE_MARGIN`] spare; a file that does not fit is refused ([`StageError::NoSpace`]).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::changelog::{ContentHash, Delta, OpKind};
use crate::client::{Client, ClientError};
use crate::delta::hash_tree::{leaf_cv, LeafHashes, LEAF_LEN};
use crate::delta::{block_size_for, BlockSignature};
use crate::fs::apply::{ContentNeed, StagedFile, MAX_APPLY_CONTENT};
use crate::store::Store;

/// Free disk space always left after staging a file.
pub const FREE_SPACE_MARGIN: u64 = 64 << 20;
/// Attempts of one fetch before the apply waits for the engine's back-off.
const FETCH_ATTEMPTS: u32 = 3;

/// Why content could not be staged. Nothing is kept of it but what a retry can reuse.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(
        "{name:?} ({size} bytes) does not fit on this device: {free} bytes are free and \
         {FREE_SPACE_MARGIN} are kept spare; it is received once there is room"
    )]
    NoSpace { name: String, size: u64, free: u64 },
    #[error("fetching {name:?}: {reason}")]
    Fetch { name: String, reason: String },
    #[error("staging {name:?}: {source}")]
    Io {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// Stages content into one folder.
pub struct Stager<'a> {
    pub client: &'a Client,
    pub store: &'a Store,
}

fn hex_of(hash: &ContentHash) -> String {
    hex::encode(hash)
}

/// Bytes available to this user on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out pointer for the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

impl Stager<'_> {
    fn dir(&self) -> PathBuf {
        self.store.incoming_dir()
    }

    /// Empties the folder (a restart stages again what it still needs).
    pub fn clear(&self) {
        let _ = std::fs::remove_dir_all(self.dir());
    }

    /// Stages `need`: built from `ops` (its delta bytes present) over the local base when
    /// given, else (or when that fails its check) fetched whole.
    ///
    /// # Errors
    /// [`StageError`]; the apply waits and is retried.
    pub async fn stage(
        &self,
        need: &ContentNeed,
        ops: Option<Vec<&OpKind>>,
    ) -> Result<StagedFile, StageError> {
        let name = String::from_utf8_lossy(&need.name).into_owned();
        let io = |source| StageError::Io {
            name: name.clone(),
            source,
        };
        let dir = self.dir();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io)?;
        let path = dir.join(hex_of(&need.hash));
        let free = free_bytes(&dir).map_err(io)?;
        let largest = ops
            .iter()
            .flatten()
            .filter_map(|op| match op {
                OpKind::Write { new_size, .. } | OpKind::Truncate { new_size, .. } => {
                    Some(*new_size)
                }
                _ => None,
            })
            .fold(need.size, u64::max);
        if largest.saturating_add(FREE_SPACE_MARGIN) > free {
            return Err(StageError::NoSpace {
                name,
                size: largest,
                free,
            });
        }
        let part = dir.join(format!("{}.part", hex_of(&need.hash)));
        if let Some(ops) = ops {
            let built = tokio::task::block_in_place(|| self.build(need, &ops, &part));
            match built {
                Ok(()) => {
                    if let Some(f) =
                        tokio::task::block_in_place(|| finish(&part, &path, need)).map_err(io)?
                    {
                        return Ok(f);
                    }
                    tracing::warn!("the delta for {name:?} does not give its content; fetching it");
                }
                Err(e) => tracing::warn!("building {name:?} from its delta: {e}; fetching it"),
            }
        }
        let mut delay = Duration::from_millis(500);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.fetch(need, &part).await {
                Ok(()) => break,
                Err(ClientError::Io(e)) => return Err(io(e)),
                Err(e)
                    if attempt < FETCH_ATTEMPTS
                        && !e.status().is_some_and(|s| s.is_client_error()) =>
                {
                    tracing::info!("fetching {name:?} (attempt {attempt}): {e}; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&part);
                    return Err(StageError::Fetch {
                        name,
                        reason: e.to_string(),
                    });
                }
            }
        }
        match tokio::task::block_in_place(|| finish(&part, &path, need)).map_err(io)? {
            Some(f) => Ok(f),
            None => Err(StageError::Fetch {
                name,
                reason: "the server's content does not have the change's hash".into(),
            }),
        }
    }

    /// Streams the whole content to `part`.
    async fn fetch(&self, need: &ContentNeed, part: &Path) -> Result<(), ClientError> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(part)?;
        self.client
            .content_to(
                &hex::encode(need.object.0),
                need.version,
                need.size,
                |chunk| f.write_all(chunk),
            )
            .await?;
        Ok(())
    }

    /// Writes into `part` the local base of `ops` and applies them in place.
    fn build(&self, need: &ContentNeed, ops: &[&OpKind], part: &Path) -> std::io::Result<()> {
        let empty = *blake3::hash(&[]).as_bytes();
        let base_hash = ops.iter().find_map(|op| match op {
            OpKind::Write { base_hash, .. } => Some(*base_hash),
            _ => None,
        });
        let staged_base = base_hash.map(|h| self.dir().join(hex_of(&h)));
        let base: Option<PathBuf> = match (base_hash, staged_base) {
            (Some(h), _) if h == empty => None,
            (_, Some(p)) if p.exists() => Some(p),
            _ => need.base_ino.map(|ino| self.store.content_path(ino)),
        };
        let mut out = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(part)?;
        if let Some(base) = base {
            match File::open(&base) {
                Ok(b) => copy_sparse(&b, &out)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        for op in ops {
            match op {
                OpKind::Write {
                    new_size, delta, ..
                } => match delta {
                    Delta::Ranges { new_size, ranges } => {
                        out.set_len(*new_size)?;
                        for (off, bytes) in ranges {
                            if off.saturating_add(bytes.len() as u64) > *new_size {
                                return Err(std::io::Error::other("a range ends past the size"));
                            }
                            out.write_all_at(bytes, *off)?;
                        }
                    }
                    Delta::Whole(bytes) => {
                        out.set_len(0)?;
                        out.write_all_at(bytes, 0)?;
                    }
                    Delta::Rsync(d) => {
                        // fast_rsync reads its base from memory (bounded, and said so in
                        // the module docs); its result streams to a second file.
                        let len = out.metadata()?.len();
                        if len > MAX_APPLY_CONTENT || *new_size > MAX_APPLY_CONTENT {
                            return Err(std::io::Error::other("too big for an rsync delta"));
                        }
                        let mut base = vec![0u8; len as usize];
                        out.read_exact_at(&mut base, 0)?;
                        let next = part.with_extension("rsync");
                        let mut w = std::io::BufWriter::new(
                            std::fs::OpenOptions::new()
                                .write(true)
                                .create(true)
                                .truncate(true)
                                .mode(0o600)
                                .open(&next)?,
                        );
                        fast_rsync::apply_limited(&base, d, &mut w, *new_size as usize)
                            .map_err(|e| std::io::Error::other(e.to_string()))?;
                        w.flush()?;
                        drop((base, w));
                        std::fs::rename(&next, part)?;
                        out = std::fs::OpenOptions::new()
                            .read(true)
                            .write(true)
                            .open(part)?;
                    }
                },
                OpKind::Truncate { new_size, .. } => out.set_len(*new_size)?,
                _ => {}
            }
        }
        Ok(())
    }
}

/// Copies `src` into the empty `dst`, only its data: holes stay holes. The kernel copies
/// (`copy_file_range`), so the bytes never pass through this process's memory.
fn copy_sparse(src: &File, dst: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = src.metadata()?.len();
    let (fi, fo) = (src.as_raw_fd(), dst.as_raw_fd());
    let last = std::io::Error::last_os_error;
    let mut off: i64 = 0;
    while (off as u64) < len {
        // SAFETY: lseek on a descriptor `src` keeps open for the call.
        let data = unsafe { libc::lseek(fi, off, libc::SEEK_DATA) };
        if data < 0 {
            let e = last();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fi, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(last());
        }
        let (mut i, mut o) = (data, data);
        while i < hole {
            // SAFETY: both descriptors are open; the offsets are valid pointers for the call.
            let n =
                unsafe { libc::copy_file_range(fi, &mut i, fo, &mut o, (hole - i) as usize, 0) };
            if n < 0 {
                let e = last();
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
                ) {
                    return Err(e);
                }
                // No kernel copy here: through a buffer, 1 MiB at a time.
                let mut buf = vec![0u8; LEAF_LEN as usize];
                while i < hole {
                    let n = ((hole - i) as usize).min(buf.len());
                    src.read_exact_at(&mut buf[..n], i as u64)?;
                    dst.write_all_at(&buf[..n], i as u64)?;
                    i += n as i64;
                }
                break;
            }
            if n == 0 {
                break;
            }
        }
        off = hole;
    }
    dst.set_len(len)
}

/// Checks `part` against the need's size and hash (leaves and signature computed on the
/// way, reading it in 1 MiB pieces), makes it durable and names it `path`. `None`: it does
/// not match (it is removed).
fn finish(part: &Path, path: &Path, need: &ContentNeed) -> std::io::Result<Option<StagedFile>> {
    let mut f = File::open(part)?;
    let len = f.metadata()?.len();
    if len != need.size {
        let _ = std::fs::remove_file(part);
        return Ok(None);
    }
    let mut leaves = Vec::with_capacity(len.div_ceil(LEAF_LEN) as usize);
    let mut whole = blake3::Hasher::new();
    let mut buf = vec![0u8; LEAF_LEN as usize];
    let mut index = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            let r = f.read(&mut buf[n..])?;
            if r == 0 {
                break;
            }
            n += r;
        }
        if n == 0 {
            break;
        }
        leaves.push(leaf_cv(index, &buf[..n]));
        if len <= LEAF_LEN {
            whole.update(&buf[..n]);
        }
        index += 1;
    }
    let leaves = LeafHashes::from_leaves(len, leaves).map_err(std::io::Error::other)?;
    let hash = leaves
        .root()
        .unwrap_or_else(|| *whole.finalize().as_bytes());
    if hash != need.hash {
        let _ = std::fs::remove_file(part);
        return Ok(None);
    }
    let signature = if len > crate::delta::strategy::SMALL_FILE_MAX {
        let mut sig = BlockSignature::calculate_with_block_size(&[], block_size_for(len));
        sig.update_blocks(len, [(0, len)], |off, b| f.read_exact_at(b, off))?;
        Some(sig)
    } else {
        None
    };
    File::open(part)?.sync_all()?;
    std::fs::rename(part, path)?;
    if let Some(d) = path.parent() {
        File::open(d)?.sync_all()?;
    }
    Ok(Some(StagedFile {
        path: path.to_path_buf(),
        size: len,
        leaves,
        signature,
    }))
}
