//! The fuser adapter: translates kernel requests into store operations.
//!
//! What it owns: the open-file and open-folder handles, the per-inode open counts, and the
//! mapping of every failure to an errno (in [`errors`], one place).
//!
//! What always holds:
//! - It never waits on the network: every request is served from the local store, except
//!   reads of online-only content on an on-demand mount ([`ondemand`], decision 0012).
//! - Namespace and attribute changes run under one metadata lock and commit as one store
//!   batch, so each request's effect is all-or-nothing, also across a crash.
//! - File data goes straight to the object's content file with `pread`/`pwrite`, outside
//!   the metadata lock, so data I/O of different files (and readers of one file) run in
//!   parallel on the session's threads.
//! - An inode unlinked while open stays readable and writable through its open handles and
//!   is removed at its last close (or at the next start, after a crash).

pub mod apply;
mod attr;
pub mod capture;
mod errors;
pub mod mount;
pub mod ondemand;
pub mod status;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig,
    LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::{Mutex, MutexGuard};

use crate::changelog::ObjectId;
use crate::store::{FileKind, Inode, Store, Timespec, ROOT_INO};
use errors::FsResult;

/// The largest write the kernel sends in one request.
pub const MAX_WRITE: u32 = 1 << 20;
/// Longest name in a folder, in bytes.
pub const NAME_MAX: usize = 255;
/// Largest extended attribute value (as ext4).
const XATTR_SIZE_MAX: usize = 64 * 1024;
/// How long the kernel may cache attributes and entries. Remote changes invalidate
/// explicitly, so this only bounds staleness if an invalidation is ever missed.
const TTL: Duration = Duration::from_secs(1);

/// Tunables of one mount.
#[derive(Clone, Debug)]
pub struct FsOptions {
    /// Let the kernel cache writes and send them in large batches.
    pub writeback_cache: bool,
    /// How long the tree must be quiet before new files, deletes and renames are sealed.
    pub quiet_period: Duration,
    /// Files on demand: content of new and changed remote files arrives when it is read.
    pub on_demand: Option<ondemand::OnDemand>,
    /// Let other local users reach the mount (FUSE `allow_other`; root, or `user_allow_other`
    /// in /etc/fuse.conf). Off unless asked: the folder is the mounting user's alone.
    pub allow_other: bool,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            writeback_cache: false,
            quiet_period: Duration::from_millis(300),
            on_demand: None,
            allow_other: false,
        }
    }
}

struct FileHandleState {
    file: Arc<File>,
    /// The inode's content generation when this handle was opened (see `FsCore::content_gen`).
    gen: u64,
    /// Written after a remote change replaced the content under it: kept as a conflicted
    /// copy at close.
    stale_written: bool,
    /// The content was online-only at open: reads make their range local first.
    absent: bool,
    /// Opened for writing (counted in [`capture::Capture::writer_opened`]).
    write: bool,
}

/// The mounted file system: a thin handle the FUSE session owns, over state that the
/// sealer thread shares.
pub struct DeltaFs(pub Arc<FsCore>);

impl std::ops::Deref for DeltaFs {
    type Target = FsCore;
    fn deref(&self) -> &FsCore {
        &self.0
    }
}

/// The file system's state: store, handles, capture.
pub struct FsCore {
    store: Arc<Store>,
    capture: capture::Capture,
    options: FsOptions,
    /// Serializes namespace and attribute changes (read-modify-write of inodes).
    meta: Mutex<()>,
    files: Mutex<HashMap<u64, FileHandleState>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<DirItem>>>>,
    /// Open handles per inode, for unlinked-but-open files.
    open_count: Mutex<HashMap<u64, u32>>,
    next_fh: AtomicU64,
    /// Inodes whose content a remote change replaced since they were last opened: their
    /// next open drops the kernel's cached pages.
    replaced: Mutex<std::collections::HashSet<u64>>,
    /// Per inode, how many times a remote change replaced its content file during this run.
    content_gen: Mutex<HashMap<u64, u64>>,
    ondemand: ondemand::OnDemandState,
}

#[derive(Clone)]
struct DirItem {
    name: Vec<u8>,
    ino: u64,
    kind: FileKind,
}

fn name_bytes(name: &OsStr) -> FsResult<&[u8]> {
    let b = name.as_bytes();
    if b.len() > NAME_MAX {
        return Err(Errno::ENAMETOOLONG);
    }
    Ok(b)
}

fn resolve_time(t: TimeOrNow, now: Timespec) -> Timespec {
    match t {
        TimeOrNow::Now => now,
        TimeOrNow::SpecificTime(s) => Timespec::from_system(s),
    }
}

/// Who asks for a change: the kernel's request, or the watched-folder adapter acting for
/// the owner of a local file.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// The process whose supplementary groups count (0: none).
    pub pid: u32,
}

impl Caller {
    fn of(req: &Request) -> Caller {
        Caller {
            uid: req.uid(),
            gid: req.gid(),
            pid: req.pid(),
        }
    }
}

/// Whether `uid` may act on `gid` as a member (primary or supplementary group of `pid`).
fn in_group(req: &Caller, gid: u32) -> bool {
    if req.gid == gid {
        return true;
    }
    if req.pid == 0 {
        return false;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", req.pid)) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| g.split_whitespace().any(|x| x.parse::<u32>() == Ok(gid)))
        .unwrap_or(false)
}

impl FsCore {
    pub fn new(store: Arc<Store>, options: FsOptions, capture: capture::Capture) -> FsCore {
        FsCore {
            store,
            capture,
            options,
            meta: Mutex::new(()),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            open_count: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            replaced: Mutex::new(std::collections::HashSet::new()),
            content_gen: Mutex::new(HashMap::new()),
            ondemand: ondemand::OnDemandState::default(),
        }
    }

    /// The metadata lock: every change to the tree and every seal runs under it.
    pub(crate) fn lock(&self) -> MutexGuard<'_, ()> {
        self.meta.lock()
    }

    fn inode(&self, ino: u64) -> FsResult<Inode> {
        self.store.get_inode(ino)?.ok_or(Errno::ENOENT)
    }

    fn dir_inode(&self, ino: u64) -> FsResult<Inode> {
        let i = self.inode(ino)?;
        if i.kind != FileKind::Directory {
            return Err(Errno::ENOTDIR);
        }
        Ok(i)
    }

    fn attr(&self, inode: &Inode) -> fuser::FileAttr {
        let blocks = if inode.kind == FileKind::File {
            use std::os::unix::fs::MetadataExt;
            // Online-only content uses only what was fetched of it.
            let missing = if inode.flags & crate::store::absent::INODE_ABSENT != 0 {
                0
            } else {
                inode.size.div_ceil(512)
            };
            std::fs::metadata(self.store.content_path(inode.ino))
                .map(|m| m.blocks())
                .unwrap_or(missing)
        } else {
            inode.size.div_ceil(512)
        };
        attr::file_attr(inode, blocks)
    }

    fn open_handle(&self, ino: u64, file: File, absent: bool, write: bool) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let gen = self.content_gen.lock().get(&ino).copied().unwrap_or(0);
        self.files.lock().insert(
            fh,
            FileHandleState {
                file: Arc::new(file),
                gen,
                stale_written: false,
                absent,
                write,
            },
        );
        *self.open_count.lock().entry(ino).or_insert(0) += 1;
        if write {
            self.capture.writer_opened(ino);
        }
        fh
    }

    fn handle_file(&self, fh: u64) -> FsResult<Arc<File>> {
        self.files
            .lock()
            .get(&fh)
            .map(|h| h.file.clone())
            .ok_or(Errno::EBADF)
    }

    fn handle_file_absent(&self, fh: u64) -> FsResult<(Arc<File>, bool)> {
        self.files
            .lock()
            .get(&fh)
            .map(|h| (h.file.clone(), h.absent))
            .ok_or(Errno::EBADF)
    }

    fn is_open(&self, ino: u64) -> bool {
        self.open_count.lock().get(&ino).copied().unwrap_or(0) > 0
    }

    /// Makes a new inode of `kind` named `name` in `parent`, in one batch.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn make_node(
        &self,
        req: &Caller,
        parent: u64,
        name: &OsStr,
        kind: FileKind,
        mode: u32,
        umask: u32,
        rdev: u32,
        symlink: &[u8],
    ) -> FsResult<Inode> {
        let name = name_bytes(name)?;
        let _g = self.lock();
        let mut p = self.dir_inode(parent)?;
        if p.nlink == 0 {
            return Err(Errno::ENOENT);
        }
        if self.store.lookup(parent, name)?.is_some() {
            return Err(Errno::EEXIST);
        }
        let now = Timespec::now();
        let mut perm = (mode & !umask & 0o7777) as u16;
        let mut gid = req.gid;
        if p.perm & libc::S_ISGID as u16 != 0 {
            gid = p.gid;
            if kind == FileKind::Directory {
                perm |= libc::S_ISGID as u16;
            }
        }
        if kind != FileKind::Directory
            && perm & libc::S_ISGID as u16 != 0
            && req.uid != 0
            && !in_group(req, gid)
        {
            perm &= !(libc::S_ISGID as u16);
        }
        if kind == FileKind::Symlink {
            perm = 0o777;
        }
        let mut b = self.store.batch();
        let ino = self.store.allocate_ino(&mut b);
        let inode = Inode {
            ino,
            object: ObjectId::random(),
            kind,
            perm,
            uid: req.uid,
            gid,
            nlink: if kind == FileKind::Directory { 2 } else { 1 },
            size: if kind == FileKind::Symlink {
                symlink.len() as u64
            } else {
                0
            },
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            rdev,
            parent,
            flags: 0,
            symlink: symlink.to_vec(),
            name: name.to_vec(),
            links: Vec::new(),
        };
        if kind == FileKind::Directory {
            p.nlink += 1;
        }
        p.mtime = now;
        p.ctime = now;
        b.put_inode(&inode);
        b.put_inode(&p);
        b.put_dirent(parent, name, ino, kind);
        self.capture.touch(&mut b, &inode, false);
        self.store.commit(b, false)?;
        Ok(inode)
    }

    /// Drops one link of `child` (already removed from its folder in `b`); deletes the
    /// inode and its content when no link and no open handle remains.
    fn drop_link(
        &self,
        b: &mut crate::store::Batch<'_>,
        child: &mut Inode,
        now: Timespec,
    ) -> FsResult<bool> {
        child.ctime = now;
        self.capture.touch(b, child, false);
        if child.kind == FileKind::Directory {
            child.nlink = 0;
        } else {
            child.nlink = child.nlink.saturating_sub(1);
        }
        if child.nlink > 0 {
            b.put_inode(child);
            return Ok(false);
        }
        if self.is_open(child.ino) {
            b.put_inode(child);
            b.mark_orphan(child.ino);
            Ok(false)
        } else {
            b.delete_inode(child)?;
            self.capture.forget(child.ino);
            Ok(true)
        }
    }

    /// A second (third, ...) name `newname` in folder `newparent` for file `ino`.
    pub(crate) fn do_link(&self, ino: u64, newparent: u64, newname: &OsStr) -> FsResult<Inode> {
        let newname = name_bytes(newname)?;
        let _g = self.lock();
        let mut p = self.dir_inode(newparent)?;
        let mut i = self.inode(ino)?;
        if i.kind == FileKind::Directory {
            return Err(Errno::EPERM);
        }
        if self.store.lookup(newparent, newname)?.is_some() {
            return Err(Errno::EEXIST);
        }
        if i.nlink == 0 {
            return Err(Errno::ENOENT);
        }
        let now = Timespec::now();
        i.nlink += 1;
        i.ctime = now;
        i.add_link(newparent, newname);
        p.mtime = now;
        p.ctime = now;
        let mut b = self.store.batch();
        b.put_dirent(newparent, newname, i.ino, i.kind);
        b.put_inode(&i);
        b.put_inode(&p);
        // A new name is a change to announce, like a rename.
        self.capture.touch(&mut b, &i, false);
        self.store.commit(b, false)?;
        Ok(i)
    }

    pub(crate) fn do_unlink(&self, parent: u64, name: &OsStr, dir: bool) -> FsResult<()> {
        let name = name_bytes(name)?;
        let _g = self.lock();
        let mut p = self.dir_inode(parent)?;
        let (ino, kind) = self.store.lookup(parent, name)?.ok_or(Errno::ENOENT)?;
        let mut child = self.inode(ino)?;
        if dir {
            if kind != FileKind::Directory {
                return Err(Errno::ENOTDIR);
            }
            if !self.store.dir_is_empty(ino)? {
                return Err(Errno::ENOTEMPTY);
            }
            p.nlink = p.nlink.saturating_sub(1);
        } else if kind == FileKind::Directory {
            return Err(Errno::EISDIR);
        }
        let now = Timespec::now();
        p.mtime = now;
        p.ctime = now;
        let mut b = self.store.batch();
        b.delete_dirent(parent, name);
        b.put_inode(&p);
        child.remove_link(parent, name);
        let gone = self.drop_link(&mut b, &mut child, now)?;
        self.store.commit(b, false)?;
        if gone {
            self.store.remove_content(child.ino)?;
        }
        Ok(())
    }

    pub(crate) fn do_rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> FsResult<()> {
        let name = name_bytes(name)?;
        let newname = name_bytes(newname)?;
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return Err(Errno::EINVAL);
        }
        let _g = self.lock();
        let (src_ino, src_kind) = self.store.lookup(parent, name)?.ok_or(Errno::ENOENT)?;
        let target = self.store.lookup(newparent, newname)?;
        let now = Timespec::now();
        let mut b = self.store.batch();
        // Parents are loaded once each; when they are the same folder, one record.
        let mut p_old = self.dir_inode(parent)?;
        let mut p_new = if newparent == parent {
            None
        } else {
            Some(self.dir_inode(newparent)?)
        };
        let mut src = self.inode(src_ino)?;
        let mut removed_content = None;

        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            let (dst_ino, dst_kind) = target.ok_or(Errno::ENOENT)?;
            if dst_ino == src_ino {
                // Two names of one file swapped: nothing changes.
                return Ok(());
            }
            let mut dst = self.inode(dst_ino)?;
            b.put_dirent(parent, name, dst_ino, dst_kind);
            b.put_dirent(newparent, newname, src_ino, src_kind);
            if let Some(pn) = p_new.as_mut() {
                let (src_dir, dst_dir) = (
                    src_kind == FileKind::Directory,
                    dst_kind == FileKind::Directory,
                );
                if src_dir && !dst_dir {
                    p_old.nlink -= 1;
                    pn.nlink += 1;
                } else if dst_dir && !src_dir {
                    p_old.nlink += 1;
                    pn.nlink -= 1;
                }
            }
            src.move_link(parent, name, newparent, newname);
            dst.move_link(newparent, newname, parent, name);
            dst.ctime = now;
            b.put_inode(&dst);
            self.capture.touch(&mut b, &dst, false);
        } else {
            if let Some((dst_ino, dst_kind)) = target {
                if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                    return Err(Errno::EEXIST);
                }
                if dst_ino == src_ino {
                    // Two links to one inode: POSIX says do nothing.
                    return Ok(());
                }
                let mut dst = self.inode(dst_ino)?;
                if src_kind == FileKind::Directory {
                    if dst_kind != FileKind::Directory {
                        return Err(Errno::ENOTDIR);
                    }
                    if !self.store.dir_is_empty(dst_ino)? {
                        return Err(Errno::ENOTEMPTY);
                    }
                    p_new.as_mut().unwrap_or(&mut p_old).nlink -= 1;
                } else if dst_kind == FileKind::Directory {
                    return Err(Errno::EISDIR);
                }
                dst.remove_link(newparent, newname);
                if self.drop_link(&mut b, &mut dst, now)? {
                    removed_content = Some(dst.ino);
                }
            }
            b.delete_dirent(parent, name);
            b.put_dirent(newparent, newname, src_ino, src_kind);
            if src_kind == FileKind::Directory {
                if let Some(pn) = p_new.as_mut() {
                    p_old.nlink -= 1;
                    pn.nlink += 1;
                }
            }
            src.move_link(parent, name, newparent, newname);
        }
        // Renaming a conflicted copy settles it.
        src.flags &= !crate::store::absent::INODE_CONFLICT;
        src.ctime = now;
        b.put_inode(&src);
        self.capture.touch(&mut b, &src, false);
        p_old.mtime = now;
        p_old.ctime = now;
        b.put_inode(&p_old);
        if let Some(mut pn) = p_new {
            pn.mtime = now;
            pn.ctime = now;
            b.put_inode(&pn);
        }
        self.store.commit(b, false)?;
        if let Some(ino) = removed_content {
            self.store.remove_content(ino)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn do_setattr(
        &self,
        req: &Caller,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
    ) -> FsResult<Inode> {
        if let Some(sz) = size.filter(|s| *s > 0) {
            // Changing the size of online-only content needs all of it here first.
            let i = self.inode(ino)?;
            if i.flags & crate::store::absent::INODE_ABSENT != 0 {
                self.open_absent(&i, true)?;
                tracing::debug!("made inode {ino} local to resize it to {sz}");
            }
        }
        let _g = self.lock();
        let mut i = self.inode(ino)?;
        let now = Timespec::now();
        let mut changed = false;
        let mut was_absent = false;
        if let Some(m) = mode {
            let mut perm = (m & 0o7777) as u16;
            // A non-owner group member may not keep setgid on a file it cannot use as group.
            if req.uid != 0
                && i.kind != FileKind::Directory
                && perm & libc::S_ISGID as u16 != 0
                && !in_group(req, gid.unwrap_or(i.gid))
            {
                perm &= !(libc::S_ISGID as u16);
            }
            i.perm = perm;
            changed = true;
        }
        if uid.is_some() || gid.is_some() {
            let new_uid = uid.unwrap_or(i.uid);
            let new_gid = gid.unwrap_or(i.gid);
            if (new_uid != i.uid || new_gid != i.gid)
                && i.kind != FileKind::Directory
                && req.uid != 0
            {
                // As ext4: a chown by a non-root caller clears setuid and setgid.
                i.perm &= !((libc::S_ISUID | libc::S_ISGID) as u16);
            }
            i.uid = new_uid;
            i.gid = new_gid;
            changed = true;
        }
        if let Some(sz) = size {
            if i.kind == FileKind::Directory {
                return Err(Errno::EISDIR);
            }
            if i.kind != FileKind::File {
                return Err(Errno::EINVAL);
            }
            let file = match fh {
                Some(fh) => self.handle_file(fh.0).ok(),
                None => None,
            };
            match file {
                Some(f) => f.set_len(sz)?,
                None => self.store.open_content(i.ino, true)?.set_len(sz)?,
            }
            if sz == 0 && i.flags & crate::store::absent::INODE_ABSENT != 0 {
                // Emptied: nothing of the online-only content is needed any more.
                i.flags &= !crate::store::absent::INODE_ABSENT;
                was_absent = true;
            }
            i.size = sz;
            i.mtime = now;
            self.capture.resized(ino, sz);
            changed = true;
        }
        if let Some(t) = atime {
            i.atime = resolve_time(t, now);
            changed = true;
        }
        if let Some(t) = mtime {
            i.mtime = resolve_time(t, now);
            changed = true;
        }
        if changed {
            i.ctime = now;
            let mut b = self.store.batch();
            b.put_inode(&i);
            if was_absent {
                b.delete_absent(ino);
            }
            self.capture.touch(&mut b, &i, false);
            self.store.commit(b, false)?;
        }
        Ok(i)
    }

    pub(crate) fn do_open(&self, ino: u64, flags: OpenFlags) -> FsResult<u64> {
        let mut i = self.inode(ino)?;
        match i.kind {
            FileKind::Directory => return Err(Errno::EISDIR),
            FileKind::File => {}
            _ => return Err(Errno::EINVAL),
        }
        self.touch_content(ino);
        let write = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        if i.flags & crate::store::absent::INODE_ABSENT != 0 {
            self.open_absent(&i, write)?;
            if write {
                i = self.inode(ino)?;
            }
        }
        let absent = i.flags & crate::store::absent::INODE_ABSENT != 0;
        let mut file = self.store.open_content(i.ino, true)?;
        // A crash can leave content past the committed size: never let it show. `i` was read
        // without the metadata lock: a remote apply may have swapped in longer content (and
        // committed its size) since, and cutting that to the old size would corrupt it. Look
        // again under the lock, where no apply runs.
        if file.metadata()?.len() > i.size {
            let _g = self.lock();
            let now = self.inode(ino)?;
            file = self.store.open_content(now.ino, true)?;
            if file.metadata()?.len() > now.size {
                file.set_len(now.size)?;
            }
        }
        let fh = self.open_handle(ino, file, absent, write);
        if !absent && self.options.on_demand.is_some() {
            // Eviction checks for open handles under the metadata lock: once this handle is
            // counted it is safe, but an eviction may have finished between the read of the
            // inode above and that count. Look again under the lock.
            let _g = self.lock();
            if self.inode(ino)?.flags & crate::store::absent::INODE_ABSENT != 0 {
                if let Some(h) = self.files.lock().get_mut(&fh) {
                    h.absent = true;
                }
            }
        }
        Ok(fh)
    }

    pub(crate) fn do_write(&self, ino: u64, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let file = self.handle_file(fh)?;
        file.write_all_at(data, offset)?;
        let end = offset + data.len() as u64;
        // Under the metadata lock, so a seal never sees these ranges before the size they
        // belong to.
        let _g = self.lock();
        if self.handle_is_stale(ino, fh) {
            // The bytes went to the previous content file this handle still holds; they are
            // kept as a conflicted copy when it closes.
            return Ok(data.len() as u32);
        }
        let rewritten = self.capture.wrote(ino, offset, data.len() as u64);
        let mut i = self.inode(ino)?;
        let now = Timespec::now();
        if end > i.size {
            i.size = end;
        }
        i.mtime = now;
        i.ctime = now;
        let mut b = self.store.batch();
        b.put_inode(&i);
        self.capture.touch(&mut b, &i, rewritten);
        self.store.commit(b, false)?;
        Ok(data.len() as u32)
    }

    pub(crate) fn do_release(&self, ino: u64, fh: u64) -> FsResult<()> {
        let state = self.files.lock().remove(&fh);
        if state.as_ref().is_some_and(|s| s.write) {
            // Counted down even if the store cannot be read, or the file would stay
            // unsettled until the 60 s cap.
            let object = self
                .store
                .get_inode(ino)
                .ok()
                .flatten()
                .map_or(ObjectId::ROOT, |i| i.object);
            self.capture.writer_closed(ino, object);
        }
        if let Some(st) = state.filter(|s| s.stale_written) {
            if let Err(e) = self.keep_stale_handle(ino, &st.file) {
                tracing::error!(
                    "keeping writes made to inode {ino} after a remote change replaced it \
                     failed: {e:?}"
                );
            }
        }
        self.seal_file(ino);
        let last = {
            let mut oc = self.open_count.lock();
            let n = oc.entry(ino).or_insert(1);
            *n -= 1;
            if *n == 0 {
                oc.remove(&ino);
                true
            } else {
                false
            }
        };
        if last {
            let _g = self.lock();
            if let Some(i) = self.store.get_inode(ino)? {
                if i.nlink == 0 && !self.is_open(ino) {
                    let mut b = self.store.batch();
                    b.delete_inode(&i)?;
                    b.clear_orphan(ino);
                    self.store.commit(b, false)?;
                    self.store.remove_content(i.ino)?;
                }
            }
        }
        Ok(())
    }

    fn dir_items(&self, ino: u64) -> FsResult<Vec<DirItem>> {
        let i = self.dir_inode(ino)?;
        let mut items = vec![
            DirItem {
                name: b".".to_vec(),
                ino,
                kind: FileKind::Directory,
            },
            DirItem {
                name: b"..".to_vec(),
                ino: i.parent,
                kind: FileKind::Directory,
            },
        ];
        items.extend(self.store.list_dir(ino)?.into_iter().map(|e| DirItem {
            name: e.name,
            ino: e.ino,
            kind: e.kind,
        }));
        Ok(items)
    }

    /// The folder listing of an open folder handle; offset 0 takes a fresh snapshot.
    fn dir_snapshot(&self, ino: u64, fh: u64, offset: u64) -> FsResult<Arc<Vec<DirItem>>> {
        if offset == 0 {
            let items = Arc::new(self.dir_items(ino)?);
            self.dirs.lock().insert(fh, items.clone());
            return Ok(items);
        }
        if let Some(items) = self.dirs.lock().get(&fh) {
            return Ok(items.clone());
        }
        Ok(Arc::new(self.dir_items(ino)?))
    }

    fn do_setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> FsResult<()> {
        let name = name.as_bytes();
        check_xattr_name(name)?;
        if name == status::STATUS_XATTR {
            return Err(status::STATUS_WRITE_ERRNO);
        }
        if name == ondemand::PIN_XATTR {
            return self.set_pinned(ino, value);
        }
        if value.len() > XATTR_SIZE_MAX {
            return Err(Errno::E2BIG);
        }
        let _g = self.lock();
        let mut i = self.inode(ino)?;
        let exists = self.store.get_xattr(ino, name)?.is_some();
        if flags & libc::XATTR_CREATE != 0 && exists {
            return Err(Errno::EEXIST);
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return Err(Errno::NO_XATTR);
        }
        i.ctime = Timespec::now();
        let mut b = self.store.batch();
        b.put_xattr(ino, name, value);
        b.put_inode(&i);
        self.capture.touch(&mut b, &i, false);
        self.store.commit(b, false)?;
        Ok(())
    }

    fn do_removexattr(&self, ino: u64, name: &OsStr) -> FsResult<()> {
        let name = name.as_bytes();
        check_xattr_name(name)?;
        if name == status::STATUS_XATTR {
            return Err(status::STATUS_WRITE_ERRNO);
        }
        if name == ondemand::PIN_XATTR {
            return self.set_pinned(ino, b"0");
        }
        let _g = self.lock();
        let mut i = self.inode(ino)?;
        if self.store.get_xattr(ino, name)?.is_none() {
            return Err(Errno::NO_XATTR);
        }
        i.ctime = Timespec::now();
        let mut b = self.store.batch();
        b.delete_xattr(ino, name);
        b.put_inode(&i);
        self.capture.touch(&mut b, &i, false);
        self.store.commit(b, false)?;
        Ok(())
    }

    fn do_fallocate(&self, ino: u64, fh: u64, offset: u64, length: u64, mode: i32) -> FsResult<()> {
        let file = self.handle_file(fh)?;
        let _g = self.lock();
        let mut i = self.inode(ino)?;
        // SAFETY: a valid open fd and plain integer arguments.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                length as libc::off_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let now = Timespec::now();
        if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && offset + length > i.size {
            i.size = offset + length;
            self.capture.resized(ino, i.size);
        }
        if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
            self.capture.wrote(ino, offset, length);
        }
        if mode != 0 {
            i.mtime = now;
        }
        i.ctime = now;
        let mut b = self.store.batch();
        b.put_inode(&i);
        self.capture.touch(&mut b, &i, false);
        self.store.commit(b, false)?;
        Ok(())
    }

    /// Whether a remote change replaced `ino`'s content since handle `fh` was opened; marks
    /// the handle as written then. Call under the metadata lock.
    fn handle_is_stale(&self, ino: u64, fh: u64) -> bool {
        let current = self.content_gen.lock().get(&ino).copied().unwrap_or(0);
        let mut files = self.files.lock();
        match files.get_mut(&fh) {
            Some(h) if h.gen != current => {
                h.stale_written = true;
                true
            }
            _ => false,
        }
    }

    /// A conflicted-copy name of `name` (this device, now) that folder `parent` does not hold.
    ///
    /// # Errors
    /// The store cannot be read.
    pub(crate) fn free_conflicted_copy_name(
        &self,
        parent: u64,
        name: &[u8],
    ) -> Result<Vec<u8>, crate::store::StoreError> {
        let base = crate::changelog::Name(name.to_vec());
        let now_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let mut attempt = 0;
        loop {
            let n =
                crate::engine::conflicted_copy_name(&base, self.capture.device(), now_ms, attempt);
            if self.store.lookup(parent, &n.0)?.is_none() {
                return Ok(n.0);
            }
            attempt += 1;
        }
    }

    /// Saves what a stale handle holds as a new file beside the inode: a conflicted copy
    /// named after this device, sealed and synced like any new file.
    fn keep_stale_handle(&self, ino: u64, file: &File) -> FsResult<()> {
        let _g = self.lock();
        let Some(orig) = self.store.get_inode(ino)? else {
            return Ok(());
        };
        // Beside where it was (an orphaned inode keeps its last place), else at the top.
        let parent = match self.store.get_inode(orig.parent)? {
            Some(p) if p.kind == FileKind::Directory && p.nlink > 0 => orig.parent,
            _ => ROOT_INO,
        };
        let name = self.free_conflicted_copy_name(parent, &orig.name)?;
        let len = file.metadata()?.len();
        let mut b = self.store.batch();
        let new_ino = self.store.allocate_ino(&mut b);
        let content = self.store.open_content(new_ino, true)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0u64;
        while off < len {
            let n = file.read_at(&mut buf, off)?;
            if n == 0 {
                break;
            }
            content.write_all_at(&buf[..n], off)?;
            off += n as u64;
        }
        content.sync_data()?;
        let now = Timespec::now();
        let inode = Inode {
            ino: new_ino,
            object: ObjectId::random(),
            size: off,
            nlink: 1,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            parent,
            name: name.clone(),
            links: Vec::new(),
            flags: (orig.flags & !crate::store::absent::INODE_ABSENT)
                | crate::store::absent::INODE_CONFLICT,
            ..orig.clone()
        };
        let mut p = self.dir_inode(parent)?;
        p.mtime = now;
        p.ctime = now;
        b.put_inode(&inode);
        b.put_inode(&p);
        b.put_dirent(parent, &name, new_ino, FileKind::File);
        self.capture.touch(&mut b, &inode, true);
        self.store.commit(b, false)?;
        tracing::warn!(
            "writes made to {:?} after another device replaced it are kept as {:?}",
            String::from_utf8_lossy(&orig.name),
            String::from_utf8_lossy(&name)
        );
        Ok(())
    }

    /// Seals one announced file's content edit now (its close after writing, or fsync).
    fn seal_file(&self, ino: u64) {
        let Ok(Some(i)) = self.store.get_inode(ino) else {
            return;
        };
        if !self.capture.has_pending(&i.object) {
            return;
        }
        let _g = self.lock();
        let sealer = capture::Sealer {
            store: &self.store,
            capture: &self.capture,
        };
        if let Err(e) = sealer.seal(Some(i.object)) {
            tracing::error!("sealing the change of inode {ino} failed: {e}");
        }
    }

    /// Takes the metadata lock for the sync driver and, with `seal`, seals everything
    /// pending first, so the engine knows every local change before a remote one is applied.
    pub fn sync_lock(&self, seal: bool) -> SyncGuard<'_> {
        let g = self.lock();
        if seal && self.capture.any_pending() {
            let sealer = capture::Sealer {
                store: &self.store,
                capture: &self.capture,
            };
            if let Err(e) = sealer.seal(None) {
                tracing::error!("sealing pending changes before a remote change failed: {e}");
            }
        }
        SyncGuard {
            core: self,
            _guard: g,
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn capture(&self) -> &capture::Capture {
        &self.capture
    }

    /// Whether this mount keeps new remote content online-only until it is read.
    pub fn options_on_demand(&self) -> bool {
        self.options.on_demand.is_some()
    }

    /// Seals every pending change when the tree has been quiet long enough; returns how
    /// many transactions went to the outbox.
    pub fn seal_if_due(&self, force: bool) -> usize {
        if !force && !self.capture.due() {
            return 0;
        }
        let _g = self.lock();
        let sealer = capture::Sealer {
            store: &self.store,
            capture: &self.capture,
        };
        let r = if force {
            sealer.seal(None)
        } else {
            let r = sealer.seal_settled();
            self.capture.rearm();
            r
        };
        match r {
            Ok(n) => n,
            Err(e) => {
                tracing::error!("sealing pending changes failed: {e}");
                0
            }
        }
    }
}

/// The metadata lock held by the sync driver (see [`FsCore::sync_lock`]).
pub struct SyncGuard<'a> {
    core: &'a FsCore,
    _guard: MutexGuard<'a, ()>,
}

impl SyncGuard<'_> {
    /// Applies one remote transaction (see [`apply`]).
    ///
    /// # Errors
    /// [`apply::ApplyError`]; nothing was changed.
    pub fn apply(
        &self,
        a: &crate::engine::LocalApply,
        device: &str,
        now_ms: i64,
        staged: &apply::StagedContent,
    ) -> Result<apply::Applied, apply::ApplyError> {
        self.core.apply_remote(a, device, now_ms, staged)
    }

    /// What `a` needs staged first (see [`apply`]).
    ///
    /// # Errors
    /// The store cannot be read.
    pub fn content_needs(
        &self,
        a: &crate::engine::LocalApply,
        staged: &apply::StagedContent,
    ) -> Result<Vec<apply::ContentNeed>, apply::ApplyError> {
        self.core.content_needs(a, staged)
    }

    /// Whether applying `a` needs the delta bytes its light form lacks (files on demand).
    pub fn needs_delta_bytes(&self, a: &crate::engine::LocalApply) -> bool {
        self.core.needs_delta_bytes(a).unwrap_or(true)
    }

    pub fn on_demand(&self) -> bool {
        self.core.options.on_demand.is_some()
    }
}

fn check_xattr_name(name: &[u8]) -> FsResult<()> {
    if name.is_empty() || name.len() > 255 {
        return Err(Errno::ERANGE);
    }
    const NAMESPACES: [&[u8]; 4] = [b"user.", b"trusted.", b"security.", b"system."];
    if !NAMESPACES.iter().any(|ns| name.starts_with(ns)) {
        return Err(Errno::ENOTSUP);
    }
    if name.starts_with(b"system.") {
        // No POSIX ACLs or other system attributes.
        return Err(Errno::ENOTSUP);
    }
    Ok(())
}

/// Replies to getxattr/listxattr: the size when asked for 0 bytes, ERANGE when too small.
fn reply_xattr(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if (size as usize) < data.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

impl Filesystem for DeltaFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        let _ = config.set_max_background(64);
        let mut want = fuser::InitFlags::FUSE_PARALLEL_DIROPS
            | fuser::InitFlags::FUSE_DO_READDIRPLUS
            | fuser::InitFlags::FUSE_READDIRPLUS_AUTO
            | fuser::InitFlags::FUSE_CACHE_SYMLINKS
            | fuser::InitFlags::FUSE_ASYNC_DIO;
        if self.options.writeback_cache {
            want |= fuser::InitFlags::FUSE_WRITEBACK_CACHE;
        }
        let _ = config.add_capabilities(want & config.capabilities());
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = (|| {
            let name = name_bytes(name)?;
            let (ino, _) = self.store.lookup(parent.0, name)?.ok_or(Errno::ENOENT)?;
            self.inode(ino)
        })();
        match r {
            Ok(i) => reply.entry(&TTL, &self.attr(&i), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.inode(ino.0) {
            Ok(i) => reply.attr(&TTL, &self.attr(&i)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.do_setattr(
            &Caller::of(req),
            ino.0,
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
            fh,
        ) {
            Ok(i) => reply.attr(&TTL, &self.attr(&i)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.inode(ino.0) {
            Ok(i) if i.kind == FileKind::Symlink => reply.data(&i.symlink),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let Some(kind) = FileKind::from_mode(mode) else {
            reply.error(Errno::EINVAL);
            return;
        };
        if kind == FileKind::Directory || kind == FileKind::Symlink {
            reply.error(Errno::EINVAL);
            return;
        }
        match self.make_node(
            &Caller::of(req),
            parent.0,
            name,
            kind,
            mode,
            umask,
            rdev,
            &[],
        ) {
            Ok(i) => reply.entry(&TTL, &self.attr(&i), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        match self.make_node(
            &Caller::of(req),
            parent.0,
            name,
            FileKind::Directory,
            mode,
            umask,
            0,
            &[],
        ) {
            Ok(i) => reply.entry(&TTL, &self.attr(&i), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        errors::reply_empty(reply, self.do_unlink(parent.0, name, false));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        errors::reply_empty(reply, self.do_unlink(parent.0, name, true));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let target = target.as_os_str().as_bytes();
        if target.len() > libc::PATH_MAX as usize {
            reply.error(Errno::ENAMETOOLONG);
            return;
        }
        match self.make_node(
            &Caller::of(req),
            parent.0,
            link_name,
            FileKind::Symlink,
            0o777,
            0,
            0,
            target,
        ) {
            Ok(i) => reply.entry(&TTL, &self.attr(&i), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        errors::reply_empty(
            reply,
            self.do_rename(parent.0, name, newparent.0, newname, flags),
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        match self.do_link(ino.0, newparent.0, newname) {
            Ok(i) => reply.entry(&TTL, &self.attr(&i), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.do_open(ino.0, flags) {
            Ok(fh) => {
                // The first open after a remote change drops what the kernel cached.
                let fresh = self.replaced.lock().remove(&ino.0);
                let flags = if fresh {
                    FopenFlags::empty()
                } else {
                    FopenFlags::FOPEN_KEEP_CACHE
                };
                reply.opened(FileHandle(fh), flags)
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let r = (|| {
            let (file, absent) = self.handle_file_absent(fh.0)?;
            if absent {
                self.make_local(_ino.0, offset, offset + u64::from(size), &file, false)?;
            }
            let mut buf = vec![0u8; size as usize];
            let mut done = 0;
            while done < buf.len() {
                match file.read_at(&mut buf[done..], offset + done as u64) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Errno::from(e)),
                }
            }
            buf.truncate(done);
            Ok(buf)
        })();
        match r {
            Ok(buf) => reply.data(&buf),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.do_write(ino.0, fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        errors::reply_empty(reply, self.do_release(ino.0, fh.0));
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            let file = self.handle_file(fh.0)?;
            if datasync {
                file.sync_data()?;
            } else {
                file.sync_all()?;
            }
            self.seal_file(ino.0);
            self.store.sync_wal()?;
            Ok(())
        })();
        errors::reply_empty(reply, r);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.dir_inode(ino.0) {
            Ok(_) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.dir_snapshot(ino.0, fh.0, offset) {
            Ok(items) => {
                for (idx, it) in items.iter().enumerate().skip(offset as usize) {
                    let full = reply.add(
                        INodeNo(it.ino),
                        idx as u64 + 1,
                        attr::fuse_kind(it.kind),
                        OsStr::from_bytes(&it.name),
                    );
                    if full {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        match self.dir_snapshot(ino.0, fh.0, offset) {
            Ok(items) => {
                for (idx, it) in items.iter().enumerate().skip(offset as usize) {
                    let Ok(Some(inode)) = self.store.get_inode(it.ino) else {
                        continue;
                    };
                    let full = reply.add(
                        INodeNo(it.ino),
                        idx as u64 + 1,
                        OsStr::from_bytes(&it.name),
                        &TTL,
                        &self.attr(&inode),
                        Generation(0),
                    );
                    if full {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs.lock().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        errors::reply_empty(reply, self.store.sync_wal().map_err(Errno::from));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.store.disk_space() {
            Ok(st) => {
                let frsize = st.f_frsize.max(1);
                reply.statfs(
                    st.f_blocks,
                    st.f_bfree,
                    st.f_bavail,
                    st.f_files,
                    st.f_ffree,
                    frsize as u32,
                    NAME_MAX as u32,
                    frsize as u32,
                );
            }
            Err(e) => reply.error(e.into()),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        errors::reply_empty(reply, self.do_setxattr(ino.0, name, value, flags));
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let r = (|| {
            let name = name.as_bytes();
            check_xattr_name(name)?;
            if name == status::STATUS_XATTR {
                return Ok(self.sync_status(ino.0)?.as_str().as_bytes().to_vec());
            }
            if name == ondemand::PIN_XATTR {
                let i = self.inode(ino.0)?;
                let pinned = i.flags & crate::store::absent::INODE_PINNED != 0;
                return Ok(if pinned { b"1".to_vec() } else { b"0".to_vec() });
            }
            self.inode(ino.0)?;
            self.store.get_xattr(ino.0, name)?.ok_or(Errno::NO_XATTR)
        })();
        match r {
            Ok(v) => reply_xattr(reply, size, &v),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let r = (|| {
            self.inode(ino.0)?;
            let mut out = Vec::new();
            for n in self.store.list_xattrs(ino.0)? {
                out.extend_from_slice(&n);
                out.push(0);
            }
            Ok(out)
        })();
        match r {
            Ok(v) => reply_xattr(reply, size, &v),
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        errors::reply_empty(reply, self.do_removexattr(ino.0, name));
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // The kernel checks permissions (default_permissions); this only confirms existence.
        errors::reply_empty(reply, self.inode(ino.0).map(|_| ()));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = (|| {
            let kind = FileKind::from_mode(mode).ok_or(Errno::EINVAL)?;
            if kind != FileKind::File {
                return Err(Errno::EINVAL);
            }
            let i = self.make_node(
                &Caller::of(req),
                parent.0,
                name,
                FileKind::File,
                mode,
                umask,
                0,
                &[],
            )?;
            let fh = self.do_open(i.ino, OpenFlags(flags))?;
            Ok((i, fh))
        })();
        match r {
            Ok((i, fh)) => reply.created(
                &TTL,
                &self.attr(&i),
                Generation(0),
                FileHandle(fh),
                FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        errors::reply_empty(reply, self.do_fallocate(ino.0, fh.0, offset, length, mode));
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let r = (|| {
            let file = self.handle_file(fh.0)?;
            // SAFETY: a valid open fd; SEEK_DATA/SEEK_HOLE are answered by the content file.
            let pos = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
            if pos < 0 {
                return Err(Errno::from(std::io::Error::last_os_error()));
            }
            Ok(pos)
        })();
        match r {
            Ok(p) => reply.offset(p),
            Err(e) => reply.error(e),
        }
    }
}
