//! Running a mount: take the home, open the store, mount, say "ready", serve until
//! unmounted or told to stop, then seal, stop the threads and close the store.
//!
//! What always holds: readiness is announced only after the kernel's INIT handshake is
//! done (fuser's `Session::new` performs it), so a caller that waited for readiness can
//! use the folder at once. On SIGTERM, SIGINT or SIGHUP the folder is unmounted; if it is
//! busy it is detached lazily and the daemon exits when the kernel lets go of it.
//!
//! Shutting down (docs/architecture.md, "The daemon's life cycle"): once the session has
//! ended or a signal came, the daemon marks itself stopping in its pid file, then stops in
//! order: the FUSE session, the sealer thread, one last seal of everything pending, the
//! sync driver, the store. A watchdog bounds it: a second signal, or [`SHUTDOWN_DEADLINE`]
//! after the first stop event, logs what was still pending and exits at once. Nothing
//! acknowledged is lost then: unsealed changes keep their pending marks in the store and
//! are sealed at the next start. The home stays locked ([`Home::lock`]) until the process
//! has ended, so a new daemon of the same home that waits for the lock never finds the
//! store still open.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use fuser::{Config, MountOption, Session, SessionACL};

use super::capture::Capture;
use super::{DeltaFs, FsCore, FsOptions};
use crate::home::{Holder, Home, HomeLock};
use crate::store::Store;

/// How many kernel requests are served at once.
const SESSION_THREADS: usize = 4;
/// How often the sealer looks for quiet pending changes.
const SEAL_TICK: std::time::Duration = std::time::Duration::from_millis(50);
/// How often an on-demand mount checks its local content against the cache size.
const EVICT_TICK: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a new daemon waits for a previous daemon of its home that is finishing.
pub(crate) const HOME_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a stopping daemon may take, from its first stop event, before it exits anyway.
pub(crate) const SHUTDOWN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(20);
/// The exit status of a daemon that hit [`SHUTDOWN_DEADLINE`] or a second signal.
pub(crate) const EXIT_CUT_SHORT: i32 = 3;

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
    /// The daemon is shutting down: it serves nothing any more and exits soon.
    pub stopping: bool,
}

impl PidRecord {
    pub fn read(home: &Home) -> Option<PidRecord> {
        let text = std::fs::read_to_string(home.pid_file()).ok()?;
        let mut lines = text.lines();
        let pid = lines.next()?.trim().parse().ok()?;
        let mountpoint = PathBuf::from(lines.next()?);
        let (mut watch, mut stopping) = (false, false);
        for l in lines {
            match l.trim() {
                "watch" => watch = true,
                "stopping" => stopping = true,
                _ => {}
            }
        }
        Some(PidRecord {
            pid,
            mountpoint,
            watch,
            stopping,
        })
    }

    /// Whether the recorded process still runs.
    pub fn alive(&self) -> bool {
        running(self.pid)
    }
}

/// Whether process `pid` exists and has not exited: a zombie (exited, not yet reaped by its
/// parent) holds no files, locks or mounts any more.
pub fn running(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    if unsafe { libc::kill(pid as libc::pid_t, 0) } != 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold any byte.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state != "Z"),
        Err(_) => true,
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

/// Who holds `home`'s lock: a daemon whose pid file says it serves a folder that is still
/// mounted (or a watch not stopping) is live; anything else is starting or finishing.
pub(crate) fn holder(home: &Home) -> Holder {
    match PidRecord::read(home) {
        Some(r) if r.alive() && !r.stopping && (r.watch || is_deltadrive_mount(&r.mountpoint)) => {
            Holder::Live(format!(
                "the deltadrive {} of {} (pid {})",
                if r.watch { "watch" } else { "mount" },
                r.mountpoint.display(),
                r.pid
            ))
        }
        Some(r) if r.alive() => Holder::Passing(Some(r.pid)),
        _ => Holder::Passing(None),
    }
}

/// Takes `home` for a daemon (a mount or a watch) and opens its store: waits up to
/// [`HOME_WAIT`] for a previous daemon that is finishing, refuses at once when a live
/// daemon holds it. The lock is kept until the process ends.
pub(crate) fn open_store(home: &Home) -> anyhow::Result<(HomeLock, Arc<Store>)> {
    let lock = home.lock(HOME_WAIT, holder)?;
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let store = Store::open(&home.db_dir(), &home.content_dir(), uid, gid).map_err(|e| {
        let msg = e.to_string();
        if msg.contains("lock") {
            anyhow::anyhow!(
                "the home folder {} is in use by another deltadrive process",
                home.root().display()
            )
        } else {
            anyhow::anyhow!(msg)
        }
    })?;
    Ok((lock, store))
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
    let (home_lock, store) = open_store(home)?;
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
    let mut signals = StopSignals::install()?;
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

    let signalled = signals.wait_or(done_rx);
    mark_stopping(home);
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    let watchdog = Watchdog::start(signals, SHUTDOWN_DEADLINE, pending_of(&core))?;
    if let Some(sig) = signalled {
        tracing::info!("received {sig}: unmounting {}", mountpoint.display());
        if let Err(e) = unmounter.unmount() {
            tracing::warn!("unmount failed ({e}); detaching lazily");
            lazy_unmount(&mountpoint);
        }
    } else {
        tracing::info!("{} was unmounted: stopping", mountpoint.display());
    }
    watchdog.stage("waiting for the kernel to let go of the mount (files still open)");
    let result = serve
        .join()
        .map_err(|_| anyhow::anyhow!("the FUSE session thread panicked"))?;
    watchdog.stage("stopping the sealer");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sealer.join();
    // Whatever is still pending is sealed now: nothing acknowledged waits for a next mount.
    watchdog.stage("sealing the last changes");
    core.seal_if_due(true);
    watchdog.stage("stopping the sync driver");
    if let Some(s) = sync {
        s.stop();
    }
    watchdog.stage("closing the store");
    store.sync_wal().context("flushing the store at unmount")?;
    drop(core);
    drop(store);
    drop(watchdog);
    let _ = std::fs::remove_file(home.pid_file());
    tracing::info!("unmounted {}", mountpoint.display());
    // The home stays locked until the process has ended (see the module docs).
    std::mem::forget(home_lock);
    result.context("FUSE session")
}

/// What a stopping daemon still has to do, for the log line of a cut-short stop. Holds
/// the core weakly, so the store can close while the watchdog is armed.
pub(crate) fn pending_of(core: &Arc<FsCore>) -> Box<dyn Fn() -> String + Send> {
    let core = Arc::downgrade(core);
    Box::new(move || match core.upgrade() {
        Some(core) => describe_pending(&core),
        None => "nothing (the store was closing)".to_string(),
    })
}

fn describe_pending(core: &FsCore) -> String {
    let unsealed = core.capture().pending_count();
    let outbox = core
        .store()
        .outbox_size()
        .map(|(n, b)| format!("{n} transaction(s), {b} bytes, waiting for upload"))
        .unwrap_or_else(|e| format!("outbox unreadable: {e}"));
    format!("{unsealed} change(s) not sealed yet (sealed at the next start); {outbox}")
}

/// Rewrites this daemon's pid file with the `stopping` mark, so a new daemon of the same
/// home waits for this one instead of refusing (see [`holder`]).
pub(crate) fn mark_stopping(home: &Home) {
    let Some(rec) = PidRecord::read(home) else {
        return;
    };
    if rec.pid != std::process::id() || rec.stopping {
        return;
    }
    let mut text = format!("{}\n{}\n", rec.pid, rec.mountpoint.display());
    if rec.watch {
        text.push_str("watch\n");
    }
    text.push_str("stopping\n");
    let tmp = home.pid_file().with_extension("pid.tmp");
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, home.pid_file());
    }
}

/// Bounds a daemon's shutdown: a second stop signal, or the deadline, logs what was still
/// pending and exits the process at once. Dropping it (the shutdown finished) disarms it.
pub(crate) struct Watchdog {
    stage: Arc<parking_lot::Mutex<&'static str>>,
    disarm: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Arms the watchdog with the daemon's signal handlers (kept installed, so a second
    /// signal is heard rather than swallowed) and `pending`, which says what is left.
    pub(crate) fn start(
        signals: StopSignals,
        deadline: std::time::Duration,
        pending: Box<dyn Fn() -> String + Send>,
    ) -> anyhow::Result<Watchdog> {
        let stage = Arc::new(parking_lot::Mutex::new("stopping"));
        let (disarm, disarmed) = tokio::sync::oneshot::channel::<()>();
        let thread = {
            let stage = Arc::clone(&stage);
            std::thread::Builder::new()
                .name("shutdown-watchdog".into())
                .spawn(move || {
                    let StopSignals {
                        rt,
                        mut term,
                        mut int,
                        mut hup,
                    } = signals;
                    let why = rt.block_on(async move {
                        tokio::select! {
                            _ = term.recv() => Some("received SIGTERM again".to_string()),
                            _ = int.recv() => Some("received SIGINT again".to_string()),
                            _ = hup.recv() => Some("received SIGHUP again".to_string()),
                            _ = tokio::time::sleep(deadline) => Some(format!(
                                "still stopping after {} s", deadline.as_secs()
                            )),
                            _ = disarmed => None,
                        }
                    });
                    if let Some(why) = why {
                        let at = *stage.lock();
                        tracing::error!(
                            "{why} (at: {at}); exiting now. Still pending: {}",
                            pending()
                        );
                        // _exit: no atexit handlers or C++ static destructors (RocksDB's)
                        // racing the threads that still use them. The log is unbuffered.
                        // SAFETY: _exit ends the process; nothing runs after it.
                        unsafe { libc::_exit(EXIT_CUT_SHORT) };
                    }
                })?
        };
        Ok(Watchdog {
            stage,
            disarm: Some(disarm),
            thread: Some(thread),
        })
    }

    /// Records what the shutdown does now, for the watchdog's log line.
    pub(crate) fn stage(&self, what: &'static str) {
        tracing::debug!("shutdown: {what}");
        *self.stage.lock() = what;
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(d) = self.disarm.take() {
            let _ = d.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
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
    /// itself (an external `umount`/`fusermount3 -u`; returns `None`). The handlers stay
    /// installed: pass `self` on to a [`Watchdog`] to hear a second signal.
    pub(crate) fn wait_or(
        &mut self,
        done: tokio::sync::oneshot::Receiver<()>,
    ) -> Option<&'static str> {
        let StopSignals { rt, term, int, hup } = self;
        rt.block_on(async move {
            tokio::select! {
                _ = term.recv() => Some("SIGTERM"),
                _ = int.recv() => Some("SIGINT"),
                _ = hup.recv() => Some("SIGHUP"),
                _ = done => None,
            }
        })
    }
}
