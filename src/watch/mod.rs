//! `deltadrive watch DIR`: the same engine as a mount (store, capture, sync driver) over a
//! plain folder, kept as a two-way mirror of the device's store (decision 0011).
//!
//! What always holds:
//! - Local changes reach the store only through [`crate::fs::FsCore`]'s operations, so they
//!   become ordinary change-log transactions (deltas, quiet period, ignore rules).
//! - Before the sync driver applies pulled transactions, local changes are imported first,
//!   so the engine's conflict rules decide; after it applied them, the folder is updated.
//! - One reconcile pass runs at a time ([`reconcile::Reconciler`]); the watcher only says
//!   when to run one (debounced by the quiet period).

pub mod names;
pub mod reconcile;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use notify::Watcher;

use crate::fs::capture::Capture;
use crate::fs::{FsCore, FsOptions};
use crate::home::Home;
use names::NameRules;
use reconcile::{Caps, Reconciler, TMP_PREFIX};

/// How often the sealer looks for quiet pending changes.
const SEAL_TICK: Duration = Duration::from_millis(50);
/// A pass that left something for later runs again after this long at the latest.
const RETRY: Duration = Duration::from_millis(500);
/// On FAT-like folders ([`Caps::hash`]) a pass runs at least this often, events or not.
/// The watcher's events are the main trigger there too (inotify on a FUSE mount reports
/// what goes through this kernel), but such a folder may be a FUSE driver's view of an
/// image changed behind the kernel's back, and no mtime tells a later scan what changed
/// then: the periodic pass (hashing the folder's files) is the fallback.
const FAT_RESCAN: Duration = Duration::from_secs(5);

enum Msg {
    /// Something changed in the folder.
    Local,
    /// The sync driver applied remote changes to the store.
    Remote,
    /// A stop signal, with the shutdown's watchdog, armed when the signal came (it keeps the
    /// handlers, so it hears a second one even while a pass still runs).
    Stop(&'static str, Option<Box<crate::fs::mount::Watchdog>>),
}

/// Checks `dir` and `home` before anything is started; returns `dir` made absolute.
///
/// # Errors
/// One clear line: the folder is missing or not a folder, or the home is inside it (or it
/// inside the home).
pub fn check_paths(home: &Home, dir: &Path) -> anyhow::Result<PathBuf> {
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("the folder to watch {} does not exist", dir.display())
        }
        Err(e) => bail!("the folder to watch {}: {e}", dir.display()),
    };
    if !meta.is_dir() {
        bail!("{} is not a folder", dir.display());
    }
    let dir = dir.canonicalize()?;
    let home_abs = absolute_existing_prefix(home.root());
    if home_abs.starts_with(&dir) {
        bail!(
            "the home folder {} is inside the watched folder {}; use a home outside it (--home)",
            home.root().display(),
            dir.display()
        );
    }
    if dir.starts_with(&home_abs) {
        bail!(
            "the watched folder {} is inside the home folder {}",
            dir.display(),
            home.root().display()
        );
    }
    Ok(dir)
}

/// `p` with its longest existing prefix resolved (the home may not exist yet).
fn absolute_existing_prefix(p: &Path) -> PathBuf {
    let p = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut rest = Vec::new();
    let mut cur = p.as_path();
    loop {
        if let Ok(c) = cur.canonicalize() {
            let mut out = c;
            for r in rest.iter().rev() {
                out.push(r);
            }
            return out;
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                cur = parent;
            }
            _ => return p,
        }
    }
}

/// What `dir`'s file system can hold: from its type (vfat, exFAT), else by probing.
pub fn probe(dir: &Path) -> Caps {
    const MSDOS_SUPER_MAGIC: i64 = 0x4d44;
    const EXFAT_SUPER_MAGIC: i64 = 0x2011_BAB0;
    let fat = {
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok();
        c.is_some_and(|c| {
            // SAFETY: a valid path and an out-struct of the right type.
            let mut st: libc::statfs = unsafe { std::mem::zeroed() };
            let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
            #[allow(clippy::unnecessary_cast)]
            let t = st.f_type as i64;
            rc == 0 && (t == MSDOS_SUPER_MAGIC || t == EXFAT_SUPER_MAGIC)
        })
    };
    let tag = format!("{TMP_PREFIX}probe-{}", std::process::id());
    let forbidden_fails = {
        let p = dir.join(format!("{tag}-a:b"));
        let r = std::fs::File::create(&p);
        let _ = std::fs::remove_file(&p);
        r.is_err()
    };
    let folds = {
        let p = dir.join(format!("{tag}-case"));
        let upper = dir.join(format!("{tag}-CASE").to_uppercase());
        let r = std::fs::File::create(&p).is_ok() && upper.exists();
        let _ = std::fs::remove_file(&p);
        r
    };
    let links = {
        let (a, b) = (
            dir.join(format!("{tag}-hard1")),
            dir.join(format!("{tag}-hard2")),
        );
        let r = std::fs::File::create(&a).is_ok() && std::fs::hard_link(&a, &b).is_ok();
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(&b);
        r
    };
    let symlinks = {
        let p = dir.join(format!("{tag}-link"));
        let r = std::os::unix::fs::symlink("target", &p).is_ok();
        let _ = std::fs::remove_file(&p);
        r
    };
    let inos = {
        let (a, b) = (
            dir.join(format!("{tag}-ino1")),
            dir.join(format!("{tag}-ino2")),
        );
        let r = match (std::fs::File::create(&a), std::fs::File::create(&b)) {
            (Ok(_), Ok(_)) => {
                use std::os::unix::fs::MetadataExt;
                match (std::fs::metadata(&a), std::fs::metadata(&b)) {
                    (Ok(x), Ok(y)) => x.ino() != y.ino(),
                    _ => true,
                }
            }
            _ => true,
        };
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(&b);
        r
    };
    let names = NameRules {
        restricted: fat || forbidden_fails,
        fold_case: fat || folds,
    };
    // A file system that refuses FAT's forbidden characters is FAT-like (vfat through
    // FUSE, for one): it holds no modes either, its inode numbers are not the files' own
    // (fusefat numbers its nodes as they are looked up) and its mtimes do not reliably move
    // on write (fusefat keeps none; vfat counts in 2 s steps).
    let fat_like = names.restricted;
    Caps {
        names,
        modes: !fat_like,
        symlinks: symlinks && !fat_like,
        links: links && inos && !fat_like,
        inos: inos && !fat_like,
        hash: fat_like,
    }
}

/// Watches `dir` with `home`'s store until SIGTERM/SIGINT/SIGHUP; `on_ready` runs once the
/// first pass is done and changes are being watched.
///
/// # Errors
/// Bad paths (see [`check_paths`]), the store is in use or unreadable, the watch cannot
/// start.
pub fn run(
    home: &Home,
    dir: &Path,
    options: FsOptions,
    on_ready: impl FnOnce(),
) -> anyhow::Result<()> {
    let dir = check_paths(home, dir)?;
    home.create()?;
    let (home_lock, store) = crate::fs::mount::open_store(home)?;
    let device = crate::fs::mount::device_name(home);
    let quiet = options.quiet_period;
    let capture = Capture::load(&store, device.clone(), quiet)?;
    let core = Arc::new(FsCore::new(Arc::clone(&store), options, capture));
    let caps = probe(&dir);
    tracing::info!("watching {} ({caps:?})", dir.display());
    let signals = crate::fs::mount::StopSignals::install()?;

    let rec = Arc::new(Reconciler::new(Arc::clone(&core), dir.clone(), caps)?);
    rec.reconcile();

    let (tx, rx) = mpsc::channel::<Msg>();
    let mut watcher = {
        let tx = tx.clone();
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // Reads (ours included: a pass reads the folder) change nothing; closing a file
            // written to does (it may be all a FUSE file system reports of a write).
            let ours = res.as_ref().is_ok_and(|ev| {
                matches!(ev.kind, notify::EventKind::Access(a)
                    if a != notify::event::AccessKind::Close(notify::event::AccessMode::Write))
                    && !ev.need_rescan()
            }) || res.as_ref().is_ok_and(|ev| {
                !ev.need_rescan()
                    && !ev.paths.is_empty()
                    && ev.paths.iter().all(|p| {
                        p.file_name().is_some_and(|n| {
                            n.as_encoded_bytes().starts_with(TMP_PREFIX.as_bytes())
                        })
                    })
            });
            if let Err(e) = &res {
                tracing::warn!("watch: the watcher reported {e}; rescanning");
            }
            if !ours {
                let _ = tx.send(Msg::Local);
            }
        })
        .context("starting the folder watcher")?
    };
    watcher
        .watch(&dir, notify::RecursiveMode::Recursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    // Changes made between the first pass and the watch: one more pass finds them.
    rec.reconcile();

    let sealer_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    home.save_set_aside(&[]);
    home.save_watch_folder(&crate::home::WatchFolderInfo {
        hard_links: if caps.links {
            "hard links".into()
        } else {
            "separate copies".into()
        },
    });
    let sealer = {
        let core = Arc::clone(&core);
        let stop = Arc::clone(&sealer_stop);
        let home = home.clone();
        std::thread::Builder::new()
            .name("sealer".into())
            .spawn(move || {
                let mut aside_seen = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(SEAL_TICK);
                    core.seal_if_due(false);
                    let (generation, notes) = core.capture().aside_notes();
                    if generation != aside_seen {
                        home.save_set_aside(&notes);
                        aside_seen = generation;
                    }
                }
            })?
    };

    let invalidate: crate::sync::Invalidate = {
        let tx = std::sync::Mutex::new(tx.clone());
        Box::new(move |_| {
            if let Ok(tx) = tx.lock() {
                let _ = tx.send(Msg::Remote);
            }
        })
    };
    let before_apply: crate::sync::BeforeApply = {
        let rec = Arc::clone(&rec);
        Box::new(move || rec.reconcile())
    };
    let sync = match crate::sync::Syncer::start_with(
        Arc::clone(&core),
        home,
        device,
        invalidate,
        Some(before_apply),
    ) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!("sync disabled: {e:#}");
            None
        }
    };
    crate::fs::mount::write_pid_file(home, &dir, true)?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    on_ready();

    // Signals end the loop; the sender of `done` lives as long as this function.
    let (_done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    {
        let tx = tx.clone();
        let pending = crate::fs::mount::pending_of(&core);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut signals = signals;
                if let Some(sig) = signals.wait_or(done_rx) {
                    let watchdog = crate::fs::mount::Watchdog::start(
                        signals,
                        crate::fs::mount::SHUTDOWN_DEADLINE,
                        pending,
                    )
                    .inspect_err(|e| tracing::warn!("no shutdown deadline: {e}"))
                    .ok()
                    .map(Box::new);
                    let _ = tx.send(Msg::Stop(sig, watchdog));
                }
            })?;
    }
    drop(tx);

    let mut stop = None;
    while stop.is_none() {
        let timeout = if rec.take_retry() {
            RETRY
        } else if caps.hash {
            FAT_RESCAN
        } else {
            Duration::from_secs(3600)
        };
        let first = match rx.recv_timeout(timeout) {
            Ok(m) => m,
            Err(mpsc::RecvTimeoutError::Timeout) => Msg::Local,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        match first {
            Msg::Stop(sig, watchdog) => stop = Some((sig, watchdog)),
            Msg::Remote => rec.reconcile(),
            Msg::Local => {
                // Debounce: wait until the folder is quiet for the quiet period.
                loop {
                    match rx.recv_timeout(quiet) {
                        Ok(Msg::Stop(sig, watchdog)) => {
                            stop = Some((sig, watchdog));
                            break;
                        }
                        Ok(_) => continue,
                        Err(_) => break,
                    }
                }
                rec.reconcile();
            }
        }
    }
    let (why, watchdog) = match stop {
        Some((sig, watchdog)) => (sig, watchdog.map(|w| *w)),
        None => ("end of input", None),
    };
    tracing::info!("received {why}: stopping the watch of {}", dir.display());
    crate::fs::mount::mark_stopping(home);
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    let stage = |what| {
        if let Some(w) = &watchdog {
            w.stage(what);
        }
    };
    drop(watcher);
    // What changed up to now goes into the store and is sealed: nothing waits for a restart.
    stage("importing the folder's last changes");
    rec.reconcile();
    stage("stopping the sealer");
    sealer_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sealer.join();
    stage("sealing the last changes");
    core.seal_if_due(true);
    stage("stopping the sync driver");
    if let Some(s) = sync {
        s.stop();
    }
    stage("closing the store");
    store.sync_wal().context("flushing the store")?;
    drop(rec);
    drop(core);
    drop(store);
    drop(watchdog);
    let _ = std::fs::remove_file(home.pid_file());
    tracing::info!("stopped watching {}", dir.display());
    // The home stays locked until the process has ended (see `fs::mount`).
    std::mem::forget(home_lock);
    Ok(())
}
