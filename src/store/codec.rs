//! The byte layout of the store's records. Little-endian, fixed layout, one version byte
//! first so a later layout can be told apart.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{Result, StoreError};
use crate::changelog::ObjectId;

/// What an inode is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    File,
    Directory,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl FileKind {
    fn to_u8(self) -> u8 {
        match self {
            FileKind::File => 1,
            FileKind::Directory => 2,
            FileKind::Symlink => 3,
            FileKind::Fifo => 4,
            FileKind::Socket => 5,
            FileKind::CharDevice => 6,
            FileKind::BlockDevice => 7,
        }
    }

    fn from_u8(v: u8) -> Result<FileKind> {
        Ok(match v {
            1 => FileKind::File,
            2 => FileKind::Directory,
            3 => FileKind::Symlink,
            4 => FileKind::Fifo,
            5 => FileKind::Socket,
            6 => FileKind::CharDevice,
            7 => FileKind::BlockDevice,
            _ => return Err(StoreError::Corrupt(format!("unknown file kind {v}"))),
        })
    }

    /// The `S_IFMT` bits of this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            FileKind::File => libc::S_IFREG,
            FileKind::Directory => libc::S_IFDIR,
            FileKind::Symlink => libc::S_IFLNK,
            FileKind::Fifo => libc::S_IFIFO,
            FileKind::Socket => libc::S_IFSOCK,
            FileKind::CharDevice => libc::S_IFCHR,
            FileKind::BlockDevice => libc::S_IFBLK,
        }
    }

    /// The kind named by the `S_IFMT` bits of `mode` (a plain file when they are 0).
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        Some(match mode & libc::S_IFMT {
            0 | libc::S_IFREG => FileKind::File,
            libc::S_IFDIR => FileKind::Directory,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDevice,
            libc::S_IFBLK => FileKind::BlockDevice,
            _ => return None,
        })
    }
}

/// A point in time with nanoseconds, as stat(2) shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Timespec {
    pub secs: i64,
    pub nsec: u32,
}

impl Timespec {
    pub fn now() -> Timespec {
        Timespec::from_system(SystemTime::now())
    }

    pub fn from_system(t: SystemTime) -> Timespec {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timespec {
                secs: d.as_secs() as i64,
                nsec: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                let mut secs = -(d.as_secs() as i64);
                let mut nsec = d.subsec_nanos();
                if nsec > 0 {
                    secs -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                Timespec { secs, nsec }
            }
        }
    }

    pub fn to_system(self) -> SystemTime {
        if self.secs >= 0 {
            UNIX_EPOCH + Duration::new(self.secs as u64, self.nsec)
        } else {
            UNIX_EPOCH - Duration::from_secs(self.secs.unsigned_abs())
                + Duration::from_nanos(self.nsec as u64)
        }
    }

    /// Nanoseconds since the Unix epoch (the change log's unit).
    pub fn as_nanos(self) -> i64 {
        self.secs
            .saturating_mul(1_000_000_000)
            .saturating_add(self.nsec as i64)
    }
}

/// One inode: a file, folder, symlink or special file of the mounted tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub ino: u64,
    /// Its stable id in the change log.
    pub object: ObjectId,
    pub kind: FileKind,
    /// Permission bits including setuid, setgid and sticky (`0o7777`).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub crtime: Timespec,
    pub rdev: u32,
    /// The folder holding its (first) link (the root holds itself).
    pub parent: u64,
    /// Reserved for per-inode flags (content absent, ...).
    pub flags: u32,
    /// A symlink's target.
    pub symlink: Vec<u8>,
    /// The name of its (first) link in `parent`, for building change-log ops.
    pub name: Vec<u8>,
    /// Its other links (hard links), as (folder inode, name), in the order they were made.
    /// Together with (`parent`, `name`) these are all of its names; `nlink` counts them.
    pub links: Vec<(u64, Vec<u8>)>,
}

/// Layout 1: the fixed fields, the symlink target, then the name to the end. Layout 2 (an
/// inode with several names): the name with its length, then the other links.
const INODE_LAYOUT: u8 = 1;
const INODE_LAYOUT_LINKS: u8 = 2;
const INODE_FIXED: usize = 1 + 16 + 1 + 2 + 4 + 4 + 4 + 8 + 4 * 12 + 4 + 8 + 4 + 4;

fn put_ts(out: &mut Vec<u8>, t: Timespec) {
    out.extend_from_slice(&t.secs.to_le_bytes());
    out.extend_from_slice(&t.nsec.to_le_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(StoreError::Corrupt("inode record too short".into()));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.arr::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn ts(&mut self) -> Result<Timespec> {
        let secs = i64::from_le_bytes(self.arr()?);
        let nsec = self.u32()?;
        Ok(Timespec { secs, nsec })
    }
}

impl Inode {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(INODE_FIXED + self.symlink.len());
        out.push(if self.links.is_empty() {
            INODE_LAYOUT
        } else {
            INODE_LAYOUT_LINKS
        });
        out.extend_from_slice(&self.object.0);
        out.push(self.kind.to_u8());
        out.extend_from_slice(&self.perm.to_le_bytes());
        out.extend_from_slice(&self.uid.to_le_bytes());
        out.extend_from_slice(&self.gid.to_le_bytes());
        out.extend_from_slice(&self.nlink.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        put_ts(&mut out, self.atime);
        put_ts(&mut out, self.mtime);
        put_ts(&mut out, self.ctime);
        put_ts(&mut out, self.crtime);
        out.extend_from_slice(&self.rdev.to_le_bytes());
        out.extend_from_slice(&self.parent.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&(self.symlink.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.symlink);
        if self.links.is_empty() {
            out.extend_from_slice(&self.name);
        } else {
            out.extend_from_slice(&(self.name.len() as u32).to_le_bytes());
            out.extend_from_slice(&self.name);
            out.extend_from_slice(&(self.links.len() as u32).to_le_bytes());
            for (parent, name) in &self.links {
                out.extend_from_slice(&parent.to_le_bytes());
                out.extend_from_slice(&(name.len() as u32).to_le_bytes());
                out.extend_from_slice(name);
            }
        }
        out
    }

    /// Every name of the inode, (folder inode, name), the first one first.
    pub fn names(&self) -> impl Iterator<Item = (u64, &[u8])> {
        std::iter::once((self.parent, self.name.as_slice()))
            .chain(self.links.iter().map(|(p, n)| (*p, n.as_slice())))
    }

    /// Adds a name (a new hard link).
    pub fn add_link(&mut self, parent: u64, name: &[u8]) {
        self.links.push((parent, name.to_vec()));
    }

    /// Removes one name; the first name is replaced by the oldest other link when it goes.
    /// Returns whether the inode had that name.
    pub fn remove_link(&mut self, parent: u64, name: &[u8]) -> bool {
        if self.parent == parent && self.name == name {
            if !self.links.is_empty() {
                let (p, n) = self.links.remove(0);
                self.parent = p;
                self.name = n;
            }
            return true;
        }
        match self
            .links
            .iter()
            .position(|(p, n)| *p == parent && n == name)
        {
            Some(i) => {
                self.links.remove(i);
                true
            }
            None => false,
        }
    }

    /// Replaces the name (`parent`, `name`) by (`new_parent`, `new_name`), keeping the others.
    pub fn move_link(&mut self, parent: u64, name: &[u8], new_parent: u64, new_name: &[u8]) {
        if self.parent == parent && self.name == name {
            self.parent = new_parent;
            self.name = new_name.to_vec();
        } else if let Some(l) = self
            .links
            .iter_mut()
            .find(|(p, n)| *p == parent && n == name)
        {
            *l = (new_parent, new_name.to_vec());
        } else {
            self.parent = new_parent;
            self.name = new_name.to_vec();
        }
    }

    pub fn decode(ino: u64, buf: &[u8]) -> Result<Inode> {
        let mut r = Reader { buf };
        let layout = r.u8()?;
        if layout != INODE_LAYOUT && layout != INODE_LAYOUT_LINKS {
            return Err(StoreError::Corrupt(format!(
                "inode {ino}: unknown layout {layout}"
            )));
        }
        let mut inode = Inode {
            ino,
            object: ObjectId(r.arr()?),
            kind: FileKind::from_u8(r.u8()?)?,
            perm: r.u16()?,
            uid: r.u32()?,
            gid: r.u32()?,
            nlink: r.u32()?,
            size: r.u64()?,
            atime: r.ts()?,
            mtime: r.ts()?,
            ctime: r.ts()?,
            crtime: r.ts()?,
            rdev: r.u32()?,
            parent: r.u64()?,
            flags: r.u32()?,
            symlink: Vec::new(),
            name: Vec::new(),
            links: Vec::new(),
        };
        let symlink_len = r.u32()? as usize;
        inode.symlink = r.take(symlink_len)?.to_vec();
        if layout == INODE_LAYOUT {
            inode.name = r.buf.to_vec();
        } else {
            let len = r.u32()? as usize;
            inode.name = r.take(len)?.to_vec();
            let count = r.u32()? as usize;
            for _ in 0..count {
                let parent = r.u64()?;
                let len = r.u32()? as usize;
                inode.links.push((parent, r.take(len)?.to_vec()));
            }
        }
        Ok(inode)
    }
}

pub(super) fn encode_dirent(ino: u64, kind: FileKind) -> [u8; 9] {
    let mut out = [0u8; 9];
    out[..8].copy_from_slice(&ino.to_le_bytes());
    out[8] = kind.to_u8();
    out
}

pub(super) fn decode_dirent(v: &[u8]) -> Result<(u64, FileKind)> {
    if v.len() != 9 {
        return Err(StoreError::Corrupt(
            "directory entry has the wrong length".into(),
        ));
    }
    let mut ino = [0u8; 8];
    ino.copy_from_slice(&v[..8]);
    Ok((u64::from_le_bytes(ino), FileKind::from_u8(v[8])?))
}
