//! Store inodes as the kernel sees them.

use fuser::{FileAttr, FileType, INodeNo};

use crate::store::{FileKind, Inode};

/// The block size `stat` reports: large, so tools move data in large requests.
pub const BLKSIZE: u32 = 1 << 20;

pub fn fuse_kind(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

/// `blocks` is the allocated size in 512-byte units (sparse files allocate less).
pub fn file_attr(i: &Inode, blocks: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(i.ino),
        size: i.size,
        blocks,
        atime: i.atime.to_system(),
        mtime: i.mtime.to_system(),
        ctime: i.ctime.to_system(),
        crtime: i.crtime.to_system(),
        kind: fuse_kind(i.kind),
        perm: i.perm,
        nlink: i.nlink,
        uid: i.uid,
        gid: i.gid,
        rdev: i.rdev,
        blksize: BLKSIZE,
        flags: 0,
    }
}
