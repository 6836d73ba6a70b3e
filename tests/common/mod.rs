//! Shared helpers of the integration tests: real `deltadrive` processes, real FUSE mounts,
//! a temp folder each. Every helper cleans up on drop, also when the test panics, and
//! prints the logs of the processes it started when the test fails.
#![allow(dead_code)]

pub mod cluster;
pub mod mix;
pub mod proxy;
pub mod replay;
pub mod server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_deltadrive")
}

/// Runs `deltadrive ARGS` and returns its output (never panics on a non-zero exit).
pub fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("DELTADRIVE_LOG", "debug,fuser=info")
        .output()
        .expect("run deltadrive")
}

/// A device home with a mounted folder. Unmounts and kills the daemon on drop.
pub struct Mounted {
    pub dir: tempfile::TempDir,
    pub home: PathBuf,
    pub mp: PathBuf,
    /// Extra `deltadrive mount` arguments, used by every (re)mount.
    pub extra_args: Vec<String>,
    /// Extra environment of the mount daemon.
    pub extra_env: Vec<(String, String)>,
    mounted: bool,
}

impl Mounted {
    /// A fresh home and mount point under a new temp folder, mounted.
    pub fn new() -> Mounted {
        Self::with_args(&[])
    }

    pub fn with_args(extra: &[&str]) -> Mounted {
        let mut m = Self::unmounted(extra);
        m.mount();
        m
    }

    /// A fresh home and mount point, not mounted yet (to log in first).
    pub fn unmounted(extra: &[&str]) -> Mounted {
        let dir = tempfile::Builder::new()
            .prefix("deltadrive-test")
            .tempdir()
            .expect("tempdir");
        let home = dir.path().join("home");
        let mp = dir.path().join("mnt");
        std::fs::create_dir_all(&mp).unwrap();
        let m = Mounted {
            dir,
            home,
            mp,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            extra_env: Vec::new(),
            mounted: false,
        };
        m
    }

    /// `deltadrive mount` (it returns once the mount is ready).
    pub fn mount(&mut self) {
        let mut args = vec![
            "mount".to_string(),
            self.mp.display().to_string(),
            "--home".into(),
            self.home.display().to_string(),
        ];
        args.extend(self.extra_args.iter().cloned());
        let out = Command::new(bin())
            .args(&args)
            .env("DELTADRIVE_LOG", "debug,fuser=info")
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run deltadrive mount");
        if !out.status.success() {
            self.dump_logs();
            panic!(
                "mount failed: {}\nstdout: {}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        self.mounted = true;
    }

    /// `deltadrive unmount`, asserting it succeeds and the daemon is gone.
    pub fn unmount(&mut self) {
        let pid = self.daemon_pid();
        let out = run(&["unmount", &self.mp.display().to_string()]);
        if !out.status.success() {
            self.dump_logs();
            panic!("unmount failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        self.mounted = false;
        if let Some(pid) = pid {
            wait_gone(pid, Duration::from_secs(20));
        }
    }

    /// The mount daemon's pid, from the home's pid file.
    pub fn daemon_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.home.join("mount.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Kills the daemon with SIGKILL and clears the dead mount, as a crash would leave it.
    pub fn crash(&mut self) {
        let pid = self.daemon_pid().expect("daemon pid");
        // SAFETY: plain kill of our own child daemon.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_gone(pid, Duration::from_secs(20));
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&self.mp)
            .status();
        self.mounted = false;
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mp.join(rel)
    }

    pub fn dump_logs(&self) {
        let log = self.home.join("mount.log");
        eprintln!("===== mount log {} =====", log.display());
        eprintln!(
            "{}",
            std::fs::read_to_string(&log).unwrap_or_else(|e| format!("(unreadable: {e})"))
        );
        eprintln!("===== end of mount log =====");
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        if self.mounted {
            let pid = self.daemon_pid();
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.mp)
                .status();
            if let Some(pid) = pid {
                if !wait_gone_quietly(pid, Duration::from_secs(10)) {
                    // SAFETY: kill our own daemon that did not stop.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}

fn wait_gone_quietly(pid: i32, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        // SAFETY: signal 0 only probes.
        if unsafe { libc::kill(pid, 0) } != 0 {
            return true;
        }
        // Reap it if it is our child (it is not: the daemon is reparented), then retry.
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

pub fn wait_gone(pid: i32, limit: Duration) {
    assert!(
        wait_gone_quietly(pid, limit),
        "process {pid} still running after {limit:?}"
    );
}

/// Whether `p` is currently a mount point (per /proc/self/mountinfo).
pub fn is_mounted(p: &Path) -> bool {
    let p = p.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(p.as_str()))
}

/// `renameat2(2)` with `flags`; the errno on failure.
pub fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> Result<(), i32> {
    let a = std::ffi::CString::new(from.as_os_str().as_encoded_bytes()).unwrap();
    let b = std::ffi::CString::new(to.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: two valid C strings; AT_FDCWD with absolute paths.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}
