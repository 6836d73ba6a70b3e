//! Several devices of one user on one machine: a real server process and one real mount per
//! device (each a `--home` of its own), plus what the sync tests compare: the tree a user
//! sees through a mount, and a wait until every device shows the same tree with nothing left
//! to seal or send. On a failure it prints the logs of the server and of every mount.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::server::TestServer;
use super::{run, Mounted};

/// How long a change may take to travel in these tests (the machines are shared and slow;
/// the latency itself is measured by the benchmark harness, not here).
pub const LIMIT: Duration = Duration::from_secs(45);

/// One entry of a mounted tree, as a user sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir {
        mode: u32,
        xattrs: Vec<(String, Vec<u8>)>,
    },
    File {
        mode: u32,
        size: u64,
        hash: String,
        mtime_ns: i64,
        xattrs: Vec<(String, Vec<u8>)>,
    },
    Symlink(PathBuf),
}

pub fn user_xattrs(p: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(names) = xattr_list(p) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Vec<u8>)> = names
        .into_iter()
        .filter(|n| n.starts_with("user.") && n != "user.deltadrive.status")
        .filter_map(|n| xattr_get(p, &n).map(|v| (n, v)))
        .collect();
    out.sort();
    out
}

pub fn xattr_list(p: &Path) -> std::io::Result<Vec<String>> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    // SAFETY: valid path and buffer.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

pub fn xattr_get(p: &Path, name: &str) -> Option<Vec<u8>> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    // SAFETY: valid strings and buffer.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return None;
    }
    buf.truncate(r as usize);
    Some(buf)
}

pub fn xattr_set(p: &Path, name: &str, value: &[u8]) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid strings and buffer.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(r, 0, "setxattr {name} on {}", p.display());
}

/// Every name under `root` (relative path, full path, metadata without following symlinks),
/// folders before what they hold. Names that vanish during the walk are left out.
pub fn walk(root: &Path) -> Vec<(String, PathBuf, fs::Metadata)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let Ok(md) = fs::symlink_metadata(&p) else {
                continue;
            };
            if md.file_type().is_dir() {
                stack.push(p.clone());
            }
            out.push((rel, p, md));
        }
    }
    out
}

/// The whole tree under `root` (relative paths).
pub fn tree(root: &Path) -> BTreeMap<String, Entry> {
    walk(root)
        .into_iter()
        .map(|(rel, p, md)| {
            let ft = md.file_type();
            let entry = if ft.is_symlink() {
                Entry::Symlink(fs::read_link(&p).unwrap_or_default())
            } else if ft.is_dir() {
                Entry::Dir {
                    mode: md.mode() & 0o7777,
                    xattrs: user_xattrs(&p),
                }
            } else {
                let content = fs::read(&p).unwrap_or_default();
                Entry::File {
                    mode: md.mode() & 0o7777,
                    size: md.len(),
                    hash: blake3::hash(&content).to_hex().to_string(),
                    mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
                    xattrs: user_xattrs(&p),
                }
            };
            (rel, entry)
        })
        .collect()
}

/// The names whose entries differ between two trees, one line each (for failure messages).
pub fn tree_diff<V: PartialEq + Debug>(
    a: &BTreeMap<String, V>,
    b: &BTreeMap<String, V>,
) -> Vec<String> {
    let mut names: Vec<&String> = a.keys().chain(b.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter(|n| a.get(*n) != b.get(*n))
        .map(|n| format!("{n}: {:?} | {:?}", a.get(n), b.get(n)))
        .collect()
}

/// A server and devices of one user; prints every log when a test fails.
pub struct Cluster {
    pub srv: TestServer,
    pub devices: Vec<Mounted>,
    pub pw: tempfile::TempDir,
}

impl Cluster {
    pub fn new(n: usize) -> Cluster {
        let srv = TestServer::start();
        let pw = tempfile::tempdir().unwrap();
        fs::write(pw.path().join("admin.token"), &srv.admin_token).unwrap();
        fs::write(pw.path().join("pw"), "correct horse battery staple").unwrap();
        let mut c = Cluster {
            srv,
            devices: Vec::new(),
            pw,
        };
        let out = run(&[
            "admin",
            "--server",
            &c.srv.url,
            "--admin-token-file",
            c.pw.path().join("admin.token").to_str().unwrap(),
            "user",
            "add",
            "ann",
            "--password-file",
            c.pw.path().join("pw").to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for i in 0..n {
            c.add_device(&format!("dev{i}"));
        }
        c
    }

    /// Logs a new device in and mounts it.
    pub fn add_device(&mut self, name: &str) -> usize {
        let mut m = Mounted::unmounted(&["--quiet-ms", "100"]);
        // A stand-in for gdbus on a session bus: records the desktop notifications asked for.
        let stub = self.pw.path().join("bin");
        fs::create_dir_all(&stub).unwrap();
        let gdbus = stub.join("gdbus");
        fs::write(
            &gdbus,
            format!(
                "#!/bin/sh\nprintf '%s\\n' \"$*\" >> {}\n",
                self.pw.path().join("notifications").display()
            ),
        )
        .unwrap();
        fs::set_permissions(&gdbus, fs::Permissions::from_mode(0o755)).unwrap();
        m.extra_env = vec![
            (
                "PATH".into(),
                format!(
                    "{}:{}",
                    stub.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            ),
            (
                "DBUS_SESSION_BUS_ADDRESS".into(),
                "unix:path=/nonexistent/bus".into(),
            ),
        ];
        let out = run(&[
            "login",
            "--server",
            &self.srv.url,
            "--user",
            "ann",
            "--password-file",
            self.pw.path().join("pw").to_str().unwrap(),
            "--device",
            name,
            "--home",
            m.home.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        m.mount();
        self.devices.push(m);
        self.devices.len() - 1
    }

    pub fn p(&self, dev: usize, rel: &str) -> PathBuf {
        self.devices[dev].path(rel)
    }

    pub fn fail(&self, what: &str) -> ! {
        self.srv.print_logs();
        for d in &self.devices {
            d.dump_logs();
        }
        panic!("{what}");
    }

    /// Waits until `ok` holds.
    pub fn wait(&self, what: &str, ok: impl Fn() -> bool) {
        let start = Instant::now();
        while !ok() {
            if start.elapsed() > LIMIT {
                self.fail(&format!("{what}: not within {LIMIT:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every mounted device shows the same tree and has nothing left to seal or
    /// send; returns that tree.
    pub fn converge(&self, what: &str) -> BTreeMap<String, Entry> {
        self.converge_by(what, tree)
    }

    /// [`Cluster::converge`] with the trees taken by `snapshot`. On a timeout it prints the
    /// names that differ from the first device's tree and every log.
    pub fn converge_by<V: PartialEq + Debug>(
        &self,
        what: &str,
        snapshot: impl Fn(&Path) -> BTreeMap<String, V>,
    ) -> BTreeMap<String, V> {
        let start = Instant::now();
        loop {
            let trees: Vec<_> = self.devices.iter().map(|d| snapshot(&d.mp)).collect();
            let same = trees.windows(2).all(|w| w[0] == w[1]);
            if same && self.devices.iter().all(|d| idle(&d.home)) {
                // Stable for a moment (nothing still arriving).
                std::thread::sleep(Duration::from_millis(300));
                let again: Vec<_> = self.devices.iter().map(|d| snapshot(&d.mp)).collect();
                if again == trees {
                    return trees.into_iter().next().unwrap_or_default();
                }
                continue;
            }
            if start.elapsed() > LIMIT {
                for (i, t) in trees.iter().enumerate().skip(1) {
                    eprintln!("--- names that differ: dev0 | dev{i} ---");
                    for line in tree_diff(&trees[0], t) {
                        eprintln!("{line}");
                    }
                }
                for (i, d) in self.devices.iter().enumerate() {
                    eprintln!("--- status of dev{i} ---\n{}", status_json(&d.home));
                }
                self.fail(&format!(
                    "{what}: devices did not converge within {LIMIT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Transactions in the outbox of a device (`u64::MAX` if `status` fails).
pub fn pending(home: &Path) -> u64 {
    let out = run(&["status", "--home", home.to_str().unwrap(), "--json"]);
    if !out.status.success() {
        return u64::MAX;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["pending_uploads"]["count"].as_u64().unwrap_or(u64::MAX)
}

/// Whether a device has nothing left to send and no change waiting to be sealed.
pub fn idle(home: &Path) -> bool {
    let out = run(&["status", "--home", home.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    out.status.success()
        && v["pending_uploads"]["count"].as_u64() == Some(0)
        && v["unsealed_changes"].as_u64() == Some(0)
}

pub fn status_json(home: &Path) -> serde_json::Value {
    let out = run(&["status", "--home", home.to_str().unwrap(), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
