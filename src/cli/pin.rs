//! `deltadrive pin PATH` and `deltadrive unpin PATH` (files on demand).
//!
//! Pinning sets the mount's local attribute `user.deltadrive.pinned` (never synced) and then
//! reads every online-only file under PATH through the mount, so its content is fetched and
//! kept; the mount keeps pinned content out of eviction and fetches later changes to it
//! eagerly. Unpinning clears the attribute: the content stays until the cache needs room.

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;

const PIN_XATTR: &str = "user.deltadrive.pinned";
const STATUS_XATTR: &str = "user.deltadrive.status";

#[derive(Args, Debug)]
pub struct PinArgs {
    /// A file or folder inside a mounted synced folder
    pub path: PathBuf,
    /// Only mark it pinned; do not fetch its online-only content now
    #[arg(long)]
    pub no_fetch: bool,
}

#[derive(Args, Debug)]
pub struct UnpinArgs {
    /// A file or folder inside a mounted synced folder
    pub path: PathBuf,
}

fn cpath(p: &Path) -> anyhow::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).context("a path with a NUL byte")
}

/// The value of an extended attribute of `path` (not following a final symlink).
fn get_xattr(path: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes())?;
    let n = CString::new(name)?;
    let mut buf = vec![0u8; 64];
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// Checks that `path` exists inside a deltadrive mount; returns its status.
fn check_in_mount(path: &Path) -> anyhow::Result<String> {
    std::fs::symlink_metadata(path).with_context(|| format!("{}", path.display()))?;
    match get_xattr(path, STATUS_XATTR) {
        Ok(v) => Ok(String::from_utf8_lossy(&v).into_owned()),
        Err(_) => bail!(
            "{} is not inside a mounted synced folder (deltadrive mount)",
            path.display()
        ),
    }
}

fn set_pin(path: &Path, on: bool) -> anyhow::Result<()> {
    let p = cpath(path)?;
    let n = CString::new(PIN_XATTR)?;
    let v: &[u8] = if on { b"1" } else { b"0" };
    // SAFETY: valid NUL-terminated strings and a value of the given length.
    let r = unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        bail!(
            "cannot {} {}: {e}",
            if on { "pin" } else { "unpin" },
            path.display()
        );
    }
    Ok(())
}

/// Online-only files under `path` (itself if a file), with their sizes.
fn online_only(path: &Path, out: &mut Vec<(PathBuf, u64)>) -> anyhow::Result<()> {
    let m = std::fs::symlink_metadata(path)?;
    if m.is_dir() {
        for e in std::fs::read_dir(path).with_context(|| format!("{}", path.display()))? {
            online_only(&e?.path(), out)?;
        }
    } else if m.is_file()
        && get_xattr(path, STATUS_XATTR).is_ok_and(|v| v.as_slice() == b"online-only")
    {
        out.push((path.to_path_buf(), m.len()));
    }
    Ok(())
}

pub fn pin(args: PinArgs) -> anyhow::Result<()> {
    check_in_mount(&args.path)?;
    set_pin(&args.path, true)?;
    if args.no_fetch {
        println!("pinned {}", args.path.display());
        return Ok(());
    }
    let mut files = Vec::new();
    online_only(&args.path, &mut files)?;
    let total: u64 = files.iter().map(|(_, s)| s).sum();
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {wide_msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut buf = vec![0u8; 1 << 20];
    for (f, _) in &files {
        bar.set_message(f.display().to_string());
        // Reading through the mount fetches the content and keeps it.
        let mut file = File::open(f).with_context(|| format!("fetching {}", f.display()))?;
        loop {
            let n = file
                .read(&mut buf)
                .with_context(|| format!("fetching {}", f.display()))?;
            if n == 0 {
                break;
            }
            bar.inc(n as u64);
        }
    }
    bar.finish_and_clear();
    println!(
        "pinned {}: {} file(s) fetched ({} bytes)",
        args.path.display(),
        files.len(),
        total
    );
    Ok(())
}

pub fn unpin(args: UnpinArgs) -> anyhow::Result<()> {
    check_in_mount(&args.path)?;
    set_pin(&args.path, false)?;
    println!(
        "unpinned {}: its content stays until the cache needs the room",
        args.path.display()
    );
    Ok(())
}
