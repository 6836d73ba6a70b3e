//! The mounted folder as a local file system: persistence, crash safety, large and many
//! files, and the POSIX corners editors and databases rely on. Real mounts, real daemon.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::process::Command;

use common::{is_mounted, renameat2, run, Mounted};

#[test]
fn everything_is_there_after_unmount_and_mount() {
    let mut m = Mounted::new();
    fs::create_dir_all(m.path("a/b/c")).unwrap();
    fs::write(m.path("a/b/c/file.txt"), b"hello world").unwrap();
    fs::set_permissions(m.path("a/b/c/file.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("b/c/file.txt", m.path("a/link")).unwrap();
    fs::hard_link(m.path("a/b/c/file.txt"), m.path("a/hard")).unwrap();
    xattr_set(&m.path("a/b/c/file.txt"), "user.color", b"blue");
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(m.path("big.bin"), &big).unwrap();
    let mtime_before = fs::metadata(m.path("a/b/c/file.txt")).unwrap().mtime_nsec();

    m.unmount();
    assert!(!is_mounted(&m.mp));
    m.mount();

    assert_eq!(fs::read(m.path("a/b/c/file.txt")).unwrap(), b"hello world");
    let md = fs::metadata(m.path("a/b/c/file.txt")).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o640);
    assert_eq!(md.nlink(), 2, "hard link count survives");
    assert_eq!(md.mtime_nsec(), mtime_before, "nanosecond mtime survives");
    assert_eq!(
        fs::read_link(m.path("a/link")).unwrap().to_str(),
        Some("b/c/file.txt")
    );
    assert_eq!(fs::read(m.path("a/link")).unwrap(), b"hello world");
    assert_eq!(fs::read(m.path("a/hard")).unwrap(), b"hello world");
    assert_eq!(
        xattr_get(&m.path("a/b/c/file.txt"), "user.color").as_deref(),
        Some(&b"blue"[..])
    );
    assert_eq!(fs::read(m.path("big.bin")).unwrap(), big);
}

#[test]
fn fsynced_data_survives_kill_9_of_the_daemon() {
    let mut m = Mounted::new();
    let mut f = File::create(m.path("journal.db")).unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
    f.write_all(&payload).unwrap();
    f.sync_all().unwrap();
    fs::create_dir(m.path("dir")).unwrap();
    let d = File::open(m.path("dir")).unwrap();
    d.sync_all().unwrap();
    m.crash();
    m.mount();
    assert_eq!(fs::read(m.path("journal.db")).unwrap(), payload);
    assert!(m.path("dir").is_dir());
    // The store still works: a full write/read cycle after the crash.
    fs::write(m.path("after.txt"), b"after crash").unwrap();
    assert_eq!(fs::read(m.path("after.txt")).unwrap(), b"after crash");
}

#[test]
fn repeated_crashes_during_writes_never_corrupt_the_store() {
    let mut m = Mounted::new();
    for round in 0..3 {
        let mp = m.mp.clone();
        let writer = std::thread::spawn(move || {
            for i in 0..400 {
                let p = mp.join(format!("r{round}-{i}"));
                if fs::write(&p, vec![b'x'; 1000 + i]).is_err() {
                    break; // the daemon died under us
                }
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(150));
        m.crash();
        let _ = writer.join();
        m.mount();
        // Every file that exists is whole or empty-and-being-written, and listing works.
        for e in fs::read_dir(&m.mp).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            let i: usize = name.split('-').nth(1).unwrap().parse().unwrap();
            let len = fs::read(e.path()).unwrap().len();
            assert!(len == 0 || len == 1000 + i, "{name} has {len} bytes");
        }
    }
}

#[test]
fn a_5_gib_sparse_file_works_and_stays_sparse() {
    let mut m = Mounted::new();
    let p = m.path("sparse.img");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .read(true)
        .open(&p)
        .unwrap();
    let five_gib = 5u64 << 30;
    f.write_all_at(b"END", five_gib - 3).unwrap();
    f.write_all_at(b"MID", 4u64 << 30).unwrap();
    drop(f);
    let md = fs::metadata(&p).unwrap();
    assert_eq!(md.len(), five_gib);
    assert!(
        md.blocks() * 512 < 64 << 20,
        "sparse: {} blocks allocated",
        md.blocks()
    );
    m.unmount();
    m.mount();
    let f = File::open(&p).unwrap();
    let mut buf = [0u8; 3];
    f.read_exact_at(&mut buf, five_gib - 3).unwrap();
    assert_eq!(&buf, b"END");
    f.read_exact_at(&mut buf, 4u64 << 30).unwrap();
    assert_eq!(&buf, b"MID");
    let mut zeros = vec![1u8; 4096];
    f.read_exact_at(&mut zeros, 3u64 << 30).unwrap();
    assert!(zeros.iter().all(|b| *b == 0));
}

#[test]
fn ten_thousand_files_in_one_folder() {
    let mut m = Mounted::new();
    let dir = m.path("many");
    fs::create_dir(&dir).unwrap();
    for i in 0..10_000 {
        File::create(dir.join(format!("file-{i:05}"))).unwrap();
    }
    let count = fs::read_dir(&dir).unwrap().count();
    assert_eq!(count, 10_000);
    m.unmount();
    m.mount();
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 10_000);
    assert_eq!(names[0], "file-00000");
    assert_eq!(names[9_999], "file-09999");
    assert!(dir.join("file-04242").exists());
}

#[test]
fn rename_over_an_open_file_keeps_the_old_content_readable() {
    let m = Mounted::new();
    fs::write(m.path("doc.txt"), b"old version").unwrap();
    let mut old = File::open(m.path("doc.txt")).unwrap();
    fs::write(m.path(".doc.txt.tmp"), b"new version, longer").unwrap();
    fs::rename(m.path(".doc.txt.tmp"), m.path("doc.txt")).unwrap();
    let mut s = String::new();
    old.read_to_string(&mut s).unwrap();
    assert_eq!(s, "old version", "the open file keeps its content");
    assert_eq!(fs::read(m.path("doc.txt")).unwrap(), b"new version, longer");
    assert!(!m.path(".doc.txt.tmp").exists());
    drop(old);
    assert_eq!(fs::read_dir(&m.mp).unwrap().count(), 1);
}

#[test]
fn an_unlinked_open_file_stays_usable_until_closed() {
    let m = Mounted::new();
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(m.path("tmp"))
        .unwrap();
    f.write_all(b"scratch data").unwrap();
    fs::remove_file(m.path("tmp")).unwrap();
    assert!(!m.path("tmp").exists());
    f.write_all(b" more").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "scratch data more");
    assert_eq!(f.metadata().unwrap().nlink(), 0);
}

#[test]
fn mmap_writes_are_read_back_after_remount() {
    let mut m = Mounted::new();
    let p = m.path("mapped.bin");
    let len = 1usize << 20;
    {
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        f.set_len(len as u64).unwrap();
        // SAFETY: mapping a file we own, of the length we just set; unmapped below.
        unsafe {
            let ptr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            );
            assert_ne!(
                ptr,
                libc::MAP_FAILED,
                "mmap: {}",
                std::io::Error::last_os_error()
            );
            let s = std::slice::from_raw_parts_mut(ptr as *mut u8, len);
            for (i, b) in s.iter_mut().enumerate().step_by(4096) {
                *b = (i / 4096) as u8;
            }
            s[len - 1] = 0xAB;
            assert_eq!(libc::msync(ptr, len, libc::MS_SYNC), 0);
            libc::munmap(ptr, len);
        }
    }
    m.unmount();
    m.mount();
    let data = fs::read(&p).unwrap();
    assert_eq!(data.len(), len);
    for i in (0..len).step_by(4096) {
        assert_eq!(data[i], (i / 4096) as u8, "page {}", i / 4096);
    }
    assert_eq!(data[len - 1], 0xAB);
}

#[test]
fn several_processes_write_and_read_one_file_at_once() {
    let m = Mounted::new();
    let p = m.path("shared.dat");
    let block = 64 * 1024;
    let writers = 6;
    File::create(&p)
        .unwrap()
        .set_len((block * writers) as u64)
        .unwrap();
    let mut children = Vec::new();
    for w in 0..writers {
        // Each writer fills its own block with its digit, several times over.
        let script = format!(
            "for i in 1 2 3 4 5; do head -c {block} /dev/zero | tr '\\0' '{w}' | dd of='{}' bs={block} seek={w} conv=notrunc status=none || exit 1; done",
            p.display()
        );
        children.push(Command::new("sh").arg("-c").arg(script).spawn().unwrap());
    }
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let p = p.clone();
            std::thread::spawn(move || {
                for _ in 0..50 {
                    let d = fs::read(&p).unwrap();
                    assert_eq!(d.len(), block * writers);
                }
            })
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    for r in readers {
        r.join().unwrap();
    }
    let d = fs::read(&p).unwrap();
    for w in 0..writers {
        let digit = b'0' + w as u8;
        assert!(
            d[w * block..(w + 1) * block].iter().all(|b| *b == digit),
            "block {w}"
        );
    }
}

#[test]
fn unmount_works_while_a_file_is_open() {
    let mut m = Mounted::new();
    fs::write(m.path("open.txt"), b"x").unwrap();
    let f = File::open(m.path("open.txt")).unwrap();
    let out = run(&["unmount", &m.mp.display().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(&m.mp));
    drop(f);
    let pid = m.daemon_pid();
    if let Some(pid) = pid {
        common::wait_gone(pid, std::time::Duration::from_secs(20));
    }
    // The data is intact at the next mount.
    m.mount();
    assert_eq!(fs::read(m.path("open.txt")).unwrap(), b"x");
}

#[test]
fn sigterm_unmounts_and_exits_cleanly() {
    let mut m = Mounted::new();
    fs::write(m.path("f"), b"kept").unwrap();
    let pid = m.daemon_pid().unwrap();
    // SAFETY: terminating our own daemon.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    common::wait_gone(pid, std::time::Duration::from_secs(20));
    assert!(!is_mounted(&m.mp));
    m.mount();
    assert_eq!(fs::read(m.path("f")).unwrap(), b"kept");
}

#[test]
fn external_fusermount_u_stops_the_daemon() {
    let mut m = Mounted::new();
    let pid = m.daemon_pid().unwrap();
    let st = Command::new("fusermount3")
        .arg("-u")
        .arg(&m.mp)
        .status()
        .unwrap();
    assert!(st.success());
    common::wait_gone(pid, std::time::Duration::from_secs(20));
    m.mount();
}

#[test]
fn bad_mount_requests_fail_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let missing = dir.path().join("no-such-folder");
    let out = run(&[
        "mount",
        missing.to_str().unwrap(),
        "--home",
        home.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-folder"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    // The same home mounted twice: the second is refused and the first keeps working.
    let m = Mounted::new();
    let other = dir.path().join("mnt2");
    fs::create_dir(&other).unwrap();
    let out = run(&[
        "mount",
        other.to_str().unwrap(),
        "--home",
        m.home.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");
    assert!(!is_mounted(&other));
    fs::write(m.path("still"), b"ok").unwrap();
}

#[test]
fn posix_corner_cases() {
    let m = Mounted::new();
    // rename(2) flags through renameat2.
    fs::write(m.path("a"), b"A").unwrap();
    fs::write(m.path("b"), b"B").unwrap();
    assert_eq!(
        renameat2(&m.path("a"), &m.path("b"), libc::RENAME_NOREPLACE),
        Err(libc::EEXIST)
    );
    assert_eq!(
        renameat2(&m.path("a"), &m.path("b"), libc::RENAME_EXCHANGE),
        Ok(())
    );
    assert_eq!(fs::read(m.path("a")).unwrap(), b"B");
    assert_eq!(fs::read(m.path("b")).unwrap(), b"A");
    // Directory over non-empty directory.
    fs::create_dir_all(m.path("d1")).unwrap();
    fs::create_dir_all(m.path("d2/x")).unwrap();
    let e = fs::rename(m.path("d1"), m.path("d2")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTEMPTY));
    // Folder link counts.
    assert_eq!(fs::metadata(m.path("d2")).unwrap().nlink(), 3);
    // Names longer than 255 bytes.
    let long = "x".repeat(256);
    let e = File::create(m.path(&long)).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG));
    // fifo via mknod.
    let c = std::ffi::CString::new(m.path("fifo").to_str().unwrap()).unwrap();
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    assert!(fs::symlink_metadata(m.path("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    // fallocate extends.
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(m.path("alloc"))
        .unwrap();
    // SAFETY: valid fd.
    assert_eq!(
        unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, 1 << 20) },
        0
    );
    assert_eq!(f.metadata().unwrap().len(), 1 << 20);
    // statfs reports the name limit.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new(m.mp.to_str().unwrap()).unwrap();
    // SAFETY: valid path and out-pointer.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    assert_eq!(st.f_namemax, 255);
    assert!(st.f_blocks > 0);
}

use std::os::unix::fs::FileTypeExt;

fn xattr_set(p: &std::path::Path, name: &str, value: &[u8]) {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings and buffer.
    let rc = unsafe {
        libc::setxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(rc, 0, "setxattr: {}", std::io::Error::last_os_error());
}

fn xattr_get(p: &std::path::Path, name: &str) -> Option<Vec<u8>> {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C strings and buffer of the given length.
    let rc = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if rc < 0 {
        return None;
    }
    buf.truncate(rc as usize);
    Some(buf)
}
