//! Running a mount: open the store, mount, say "ready", serve until unmounted or told to
//! stop, then unmount and close the store cleanly.
//!
//! What always holds: readiness is announced only after the kernel's INIT handshake is
//! done (fuser's `Session::new` performs it), so a caller that waited for readiness can
//! use the folder at once. On SIGTERM, SIGINT or SIGHUP the folder is unmounted; if it is
//! busy it is detached lazily and the daemon exits when the kernel lets go of it.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use fuser::{Config, MountOption, Session, SessionACL};

use super::capture::Capture;
use super::{DeltaFs, FsCore, FsOptions};
use crate::home::Home;
use crate::store::Store;

/// How many kernel requests are served at once.
const SESSION_THREADS: usize = 4;
/// How often the sealer looks for quiet pending changes.
const SEAL_TICK: std::time::Duration = std::time::Duration::from_millis(50);
/// How often an on-demand mount checks its local content against the cache size.
const EVICT_TICK: std::time::Duration = std::time::Duration::from_secs(2);

/// This device's name in change logs: from its login, else the host name.
pub fn device_name(home: &Home) -> String {
    std::fs::read(home.device_file())
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("device").and_then(|d| d.as_str()).map(str::to_string))
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "device".to_string())
}

/// Where a running mount is recorded, so `status` and `unmount` can find it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PidRecord {
    pub pid: u32,
    pub mountpoint: PathBuf,
    /// A `deltadrive watch` daemon: `mountpoint` is the watched folder.
    pub watch: bool,
}

impl PidRecord {
    pub fn read(home: &Home) -> Option<PidRecord> {
        let text = std::fs::read_to_string(home.pid_file()).ok()?;
        let mut lines = text.lines();
        let pid = lines.next()?.trim().parse().ok()?;
        let mountpoint = PathBuf::from(lines.next()?);
        let watch = lines.next().is_some_and(|l| l.trim() == "watch");
        Some(PidRecord {
            pid,
            mountpoint,
            watch,
        })
    }

    /// Whether the recorded process still runs.
    pub fn alive(&self) -> bool {
        // SAFETY: signal 0 only checks that the process exists.
        unsafe { libc::kill(self.pid as libc::pid_t, 0) == 0 }
    }
}

/// Whether `path` is a mount point of a deltadrive file system right now.
pub fn is_deltadrive_mount(path: &Path) -> bool {
    let Ok(path) = path.canonicalize() else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-");
        let fstype = sep.and_then(|s| f.get(s + 1)).copied().unwrap_or("");
        let source = sep.and_then(|s| f.get(s + 2)).copied().unwrap_or("");
        let ours =
            fstype == "fuse.deltadrive" || (fstype.starts_with("fuse") && source == "deltadrive");
        ours && f
            .get(4)
            .is_some_and(|mp| Path::new(&unescape_mountinfo(mp)) == path)
    })
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether this process may mount with `allow_other`: root, or `user_allow_other` in
/// /etc/fuse.conf.
fn may_allow_other() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    std::fs::read_to_string("/etc/fuse.conf")
        .map(|c| c.lines().any(|l| l.trim() == "user_allow_other"))
        .unwrap_or(false)
}

/// Opens `home`'s store for a daemon (a mount or a watch), with a clear error when another
/// daemon holds it.
pub(crate) fn open_store(home: &Home) -> anyhow::Result<Arc<Store>> {
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    Store::open(&home.db_dir(), &home.content_dir(), uid, gid).map_err(|e| {
        let msg = e.to_string();
        if msg.contains("lock") {
            anyhow::anyhow!(
                "the home folder {} is in use by another deltadrive process",
                home.root().display()
            )
        } else {
            anyhow::anyhow!(msg)
        }
    })
}

/// Mounts `home`'s store on `mountpoint` and serves it until unmounted or signalled.
/// `on_ready` runs once the mount answers requests.
///
/// # Errors
/// The mount point is not an empty-or-not folder we can mount on, the store is locked by
/// another daemon or unreadable, or the kernel refused the mount.
pub fn run(
    home: &Home,
    mountpoint: &Path,
    options: FsOptions,
    on_ready: impl FnOnce(),
) -> anyhow::Result<()> {
    let meta = std::fs::metadata(mountpoint)
        .with_context(|| format!("mount point {}", mountpoint.display()))?;
    if !meta.is_dir() {
        bail!("mount point {} is not a folder", mountpoint.display());
    }
    if is_deltadrive_mount(mountpoint) {
        bail!("{} is already a deltadrive mount", mountpoint.display());
    }
    let mountpoint = mountpoint.canonicalize()?;
    home.create()?;
    let store = open_store(home)?;
    store.set_on_demand_mode(options.on_demand.is_some())?;
    let device = device_name(home);
    let capture = Capture::load(&store, device.clone(), options.quiet_period)?;
    let allow_other = options.allow_other;
    let core = Arc::new(FsCore::new(Arc::clone(&store), options, capture));
    let fs = DeltaFs(Arc::clone(&core));

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("deltadrive".into()),
        MountOption::Subtype("deltadrive".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    if allow_other {
        if !may_allow_other() {
            bail!("--allow-other needs root or user_allow_other in /etc/fuse.conf");
        }
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(SESSION_THREADS);

    let mut session = Session::new(fs, &mountpoint, &config)
        .with_context(|| format!("cannot mount on {}", mountpoint.display()))?;
    let mut unmounter = session.unmount_callable();
    let notifier = session.notifier();

    // Signal handlers before READY=1: a stop right after the start unmounts cleanly instead
    // of dying by SIGTERM's default action and leaving a dead mount.
    let signals = StopSignals::install()?;
    write_pid_file(home, &mountpoint, false)?;
    tracing::info!(
        "mounted {} (home {})",
        mountpoint.display(),
        home.root().display()
    );
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    on_ready();

    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let serve = std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || {
            let r = session.run();
            let _ = done_tx.send(());
            r
        })?;

    // The sealer: turns quiet pending changes into outbox transactions.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    home.save_set_aside(&[]);
    let sealer = {
        let core = Arc::clone(&core);
        let stop = Arc::clone(&stop);
        let home = home.clone();
        std::thread::Builder::new()
            .name("sealer".into())
            .spawn(move || {
                let mut last_evict = std::time::Instant::now();
                let mut aside_seen = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(SEAL_TICK);
                    core.seal_if_due(false);
                    let (generation, notes) = core.capture().aside_notes();
                    if generation != aside_seen {
                        home.save_set_aside(&notes);
                        aside_seen = generation;
                    }
                    // Files on demand: keep local content under the cache size.
                    if core.options_on_demand() && last_evict.elapsed() >= EVICT_TICK {
                        if let Err(e) = core.evict() {
                            tracing::warn!("evicting content failed: {e}");
                        }
                        last_evict = std::time::Instant::now();
                    }
                }
            })?
    };

    let invalidate: crate::sync::Invalidate = Box::new(move |items| {
        use super::apply::Invalidation;
        for item in items {
            // ENOENT: the kernel had nothing cached; nothing to do.
            let _ = match item {
                Invalidation::Inode(ino) => notifier.inval_inode(fuser::INodeNo(*ino), 0, 0),
                Invalidation::Entry { parent, name } => {
                    notifier.inval_entry(fuser::INodeNo(*parent), std::ffi::OsStr::from_bytes(name))
                }
            };
        }
    });
    let sync = match crate::sync::Syncer::start(Arc::clone(&core), home, device, invalidate) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!("sync disabled: {e:#}");
            None
        }
    };

    let signalled = signals.wait_or(done_rx)?;
    if let Some(sig) = signalled {
        tracing::info!("received {sig}: unmounting {}", mountpoint.display());
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        if let Err(e) = unmounter.unmount() {
            tracing::warn!("unmount failed ({e}); detaching lazily");
            lazy_unmount(&mountpoint);
        }
    }
    let result = serve
        .join()
        .map_err(|_| anyhow::anyhow!("the FUSE session thread panicked"))?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sealer.join();
    // Whatever is still pending is sealed now: nothing acknowledged waits for a next mount.
    core.seal_if_due(true);
    if let Some(s) = sync {
        s.stop();
    }
    let _ = std::fs::remove_file(home.pid_file());
    store.sync_wal().context("flushing the store at unmount")?;
    drop(core);
    drop(store);
    tracing::info!("unmounted {}", mountpoint.display());
    result.context("FUSE session")
}

/// Records the running daemon: its pid, its folder and, for `watch`, a third line `watch`.
pub(crate) fn write_pid_file(home: &Home, folder: &Path, watch: bool) -> anyhow::Result<()> {
    let tmp = home.pid_file().with_extension("pid.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "{}\n{}", std::process::id(), folder.display())?;
    if watch {
        writeln!(f, "watch")?;
    }
    std::fs::rename(&tmp, home.pid_file())?;
    Ok(())
}

/// Detaches a busy mount; the kernel finishes it once the last open file closes.
pub fn lazy_unmount(mountpoint: &Path) {
    let ok = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(mountpoint)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        if let Ok(c) = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid path; MNT_DETACH only detaches.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// SIGTERM, SIGINT and SIGHUP, caught from [`StopSignals::install`] on.
pub(crate) struct StopSignals {
    rt: tokio::runtime::Runtime,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub(crate) fn install() -> anyhow::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (term, int, hup) = {
            let _guard = rt.enter();
            (
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
                signal(SignalKind::hangup())?,
            )
        };
        Ok(StopSignals { rt, term, int, hup })
    }

    /// Blocks until SIGTERM/SIGINT/SIGHUP (returns its name) or until the session ends by
    /// itself (an external `umount`/`fusermount3 -u`; returns `None`).
    pub(crate) fn wait_or(
        self,
        done: tokio::sync::oneshot::Receiver<()>,
    ) -> anyhow::Result<Option<&'static str>> {
        let StopSignals {
            rt,
            mut term,
            mut int,
            mut hup,
        } = self;
        Ok(rt.block_on(async move {
            tokio::select! {
                _ = term.recv() => Some("SIGTERM"),
                _ = int.recv() => Some("SIGINT"),
                _ = hup.recv() => Some("SIGHUP"),
                _ = done => None,
            }
        }))
    }
}
