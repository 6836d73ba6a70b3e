//! `deltadrive mount`, `unmount` and `status`.
//!
//! `mount` without `--foreground` starts itself again in the background (a new session,
//! output to `H/mount.log`) and returns only when that daemon reports the mount ready, or
//! with the daemon's own error line if it failed.
//!
//! `unmount` returns once the daemon has exited (so the home is free for a new mount), or
//! with an error if it is still running after `--timeout`.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use super::{HomeArg, StatusArgs};
use crate::fs::mount::{is_deltadrive_mount, lazy_unmount, PidRecord};
use crate::fs::FsOptions;
use crate::home::Home;

/// Set in the background daemon: the fd on which it reports readiness or its error.
const READY_FD_ENV: &str = "DELTADRIVE_READY_FD";

#[derive(Args, Debug)]
#[command(
    after_help = "A home serves one folder at a time: mounting a home that a running \
    mount or watch uses elsewhere is refused at once. Right after an unmount, a mount of the \
    same home waits (up to 30 s) for the previous daemon to finish."
)]
pub struct MountArgs {
    /// An existing folder to mount the synced folder on
    pub mountpoint: PathBuf,
    #[command(flatten)]
    pub home: HomeArg,
    /// Stay in the foreground instead of returning once the mount is ready
    #[arg(long)]
    pub foreground: bool,
    /// Let the kernel cache writes (faster small writes; data reaches the store at
    /// close, fsync or when the kernel flushes)
    #[arg(long)]
    pub writeback_cache: bool,
    /// Milliseconds the tree must be quiet before new files, renames and deletes are
    /// committed as a change (lets editors' save patterns become edits)
    #[arg(long, default_value_t = 300, value_name = "MS")]
    pub quiet_ms: u64,
    /// Files on demand: the whole tree syncs, but the content of other devices' new and
    /// changed files stays on the server until it is read (or the file is pinned with
    /// `deltadrive pin`)
    #[arg(long)]
    pub on_demand: bool,
    /// With --on-demand: local content of unpinned files is kept under this size, least
    /// recently used evicted first (bytes, or with a K/M/G/T suffix)
    #[arg(long, value_name = "SIZE", default_value = "10G", value_parser = parse_size)]
    pub cache_size: u64,
    /// Let other local users (and root) reach the mounted folder, within its files' modes
    /// (needs root or user_allow_other in /etc/fuse.conf); by default only the mounting user can
    #[arg(long)]
    pub allow_other: bool,
}

/// Parses `123`, `100M`, `10G`, `1.5T` (powers of 1024; a trailing `B`/`iB` is accepted).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => {
                    return Err(format!(
                        "unknown size unit {c:?} in {s:?} (use K, M, G or T)"
                    ))
                }
            };
            (&t[..t.len() - 1], m)
        }
        _ => (t, 1),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (like 500M or 10G)"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s:?} is not a size (like 500M or 10G)"));
    }
    Ok((v * mult as f64) as u64)
}

#[derive(Args, Debug)]
pub struct UnmountArgs {
    /// The mounted folder
    pub mountpoint: PathBuf,
    /// Seconds to wait for the daemon to finish after unmounting (it seals what is left,
    /// stops and lets go of its home; it gives up by itself after 20 s)
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
}

pub fn mount(args: MountArgs) -> anyhow::Result<()> {
    let home = Home::resolve(args.home.home.as_deref())?;
    let options = FsOptions {
        writeback_cache: args.writeback_cache,
        quiet_period: std::time::Duration::from_millis(args.quiet_ms),
        on_demand: args.on_demand.then_some(crate::fs::ondemand::OnDemand {
            cache_bytes: args.cache_size,
        }),
        allow_other: args.allow_other,
    };
    if args.foreground {
        return run_reporting_ready(|ready| {
            crate::fs::mount::run(&home, &args.mountpoint, options, ready)
        });
    }
    if !args.mountpoint.is_dir() {
        bail!(
            "mount point {} is not an existing folder",
            args.mountpoint.display()
        );
    }
    home.create()?;
    let mountpoint = args.mountpoint.canonicalize()?;
    let mut daemon_args: Vec<std::ffi::OsString> = vec![
        "mount".into(),
        mountpoint.clone().into(),
        "--foreground".into(),
        "--home".into(),
        home.root().into(),
    ];
    if args.writeback_cache {
        daemon_args.push("--writeback-cache".into());
    }
    daemon_args.push("--quiet-ms".into());
    daemon_args.push(args.quiet_ms.to_string().into());
    if args.allow_other {
        daemon_args.push("--allow-other".into());
    }
    if args.on_demand {
        daemon_args.push("--on-demand".into());
        daemon_args.push("--cache-size".into());
        daemon_args.push(args.cache_size.to_string().into());
    }
    let pid = spawn_daemon(&home.mount_log(), &daemon_args, "mount")?;
    println!("mounted {} (pid {pid})", mountpoint.display());
    Ok(())
}

/// `deltadrive watch DIR`: like `mount`, in the background unless `--foreground`.
pub fn watch(args: crate::cli::WatchArgs) -> anyhow::Result<()> {
    let home = Home::resolve(args.home.home.as_deref())?;
    let options = FsOptions {
        writeback_cache: false,
        quiet_period: std::time::Duration::from_millis(args.quiet_ms),
        on_demand: None,
        allow_other: false,
    };
    if args.foreground {
        return run_reporting_ready(|ready| crate::watch::run(&home, &args.dir, options, ready));
    }
    // Checked here too, so a bad folder is refused before anything starts.
    let dir = crate::watch::check_paths(&home, &args.dir)?;
    home.create()?;
    let daemon_args: Vec<std::ffi::OsString> = vec![
        "watch".into(),
        dir.clone().into(),
        "--foreground".into(),
        "--home".into(),
        home.root().into(),
        "--quiet-ms".into(),
        args.quiet_ms.to_string().into(),
    ];
    let pid = spawn_daemon(&home.watch_log(), &daemon_args, "watch")?;
    println!("watching {} (pid {pid})", dir.display());
    Ok(())
}

/// Runs a daemon's body in the foreground; when started by [`spawn_daemon`], reports
/// "ready" or the error line on the fd it was given.
fn run_reporting_ready(
    body: impl FnOnce(Box<dyn FnOnce()>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let ready_fd = std::env::var(READY_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok());
    // SAFETY: the fd was created for us by the parent and is used only here.
    let ready = ready_fd.map(|fd| std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }));
    let ready = std::sync::Arc::new(std::sync::Mutex::new(ready));
    let on_ready = {
        let ready = std::sync::Arc::clone(&ready);
        Box::new(move || {
            if let Some(mut f) = ready.lock().ok().and_then(|mut r| r.take()) {
                let _ = f.write_all(b"ready\n");
            }
        })
    };
    let result = body(on_ready);
    if let (Err(e), Some(mut f)) = (&result, ready.lock().ok().and_then(|mut r| r.take())) {
        let _ = writeln!(f, "error: {e:#}");
    }
    result
}

/// Starts `deltadrive ARGS` (which must run in the foreground) as a daemon in a new
/// session, output to `log`; returns its pid once it reports ready, or its error line.
fn spawn_daemon(
    log_path: &Path,
    daemon_args: &[std::ffi::OsString],
    what: &str,
) -> anyhow::Result<u32> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid out-array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: pipe2 just returned these two fresh fds; each is owned exactly once.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let child_fd = fds[1];
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(daemon_args);
    cmd.env(READY_FD_ENV, child_fd.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            let flags = libc::fcntl(child_fd, libc::F_GETFD);
            libc::fcntl(child_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting the {what} daemon"))?;
    drop(write_end);
    let mut reader = BufReader::new(std::fs::File::from(read_end));
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if line.trim() == "ready" {
        return Ok(child.id());
    }
    let status = child.wait()?;
    let msg = line
        .trim()
        .strip_prefix("error: ")
        .unwrap_or(line.trim())
        .to_string();
    if msg.is_empty() {
        bail!(
            "the {what} daemon exited ({status}) before it was ready; see {}",
            log_path.display()
        );
    }
    bail!("{msg}")
}

pub fn unmount(args: UnmountArgs) -> anyhow::Result<()> {
    let mp = &args.mountpoint;
    if !is_deltadrive_mount(mp) {
        bail!("{} is not a deltadrive mount", mp.display());
    }
    let mp = mp.canonicalize()?;
    let daemon = find_daemon(&mp);
    let out = Command::new("fusermount3")
        .arg("-u")
        .arg(&mp)
        .output()
        .context("running fusermount3 (install the fuse3 package)")?;
    let mut lazy = false;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("busy") {
            lazy_unmount(&mp);
            lazy = true;
        } else {
            bail!("unmounting {} failed: {}", mp.display(), err.trim());
        }
    }
    if is_deltadrive_mount(&mp) {
        bail!("{} is still mounted", mp.display());
    }
    if lazy {
        println!(
            "unmounted {} (files still open there keep working until closed)",
            mp.display()
        );
        return Ok(());
    }
    // The kernel let go of the folder; the daemon still seals, stops its threads and closes
    // its store. Returning only once it has exited means the home is free again.
    if let Some(pid) = daemon {
        let deadline = Instant::now() + Duration::from_secs(args.timeout);
        while crate::fs::mount::running(pid) {
            if Instant::now() >= deadline {
                bail!(
                    "{} is unmounted, but its daemon (pid {pid}) is still finishing after {} s",
                    mp.display(),
                    args.timeout
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    println!("unmounted {}", mp.display());
    Ok(())
}

/// The pid of the daemon serving `mountpoint`, found through its command line.
fn find_daemon(mountpoint: &Path) -> Option<u32> {
    let me = std::fs::read_dir("/proc").ok()?;
    for e in me.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_mount =
            args.iter().any(|a| *a == b"mount") && args.iter().any(|a| *a == b"--foreground");
        if !is_mount {
            continue;
        }
        // A daemon started by hand may name its folder relative to its own working folder.
        let cwd = std::fs::read_link(e.path().join("cwd")).ok();
        let names_mp = args.iter().skip(1).any(|a| {
            let p = Path::new(std::ffi::OsStr::from_bytes(a));
            p == mountpoint
                || cwd
                    .as_ref()
                    .filter(|_| p.is_relative())
                    .and_then(|c| c.join(p).canonicalize().ok())
                    .is_some_and(|c| c == mountpoint)
        });
        if is_mount && names_mp {
            return Some(pid);
        }
    }
    None
}

#[derive(serde::Serialize)]
struct StatusReport {
    home: PathBuf,
    mounted: bool,
    mountpoint: Option<PathBuf>,
    /// The folder a running `deltadrive watch` keeps in sync.
    watching: Option<PathBuf>,
    pid: Option<u32>,
    logged_in: bool,
    server: Option<String>,
    online: Option<bool>,
    pending_uploads: Pending,
    /// Objects changed since their last seal (not in the outbox yet).
    unsealed_changes: u64,
    last_sync: Option<String>,
    /// Conflicted copies made since the user last looked (`status` without `--json`).
    conflicts: Vec<Conflict>,
    /// The last server sequence applied on this device.
    cursor: u64,
    last_error: Option<String>,
    /// Remote content this device cannot receive yet, and why (not enough free disk space);
    /// retried until it fits.
    waiting: Option<String>,
    /// Local and online-only files (files on demand; null on other mounts).
    content: Option<crate::fs::ondemand::ContentCounts>,
    /// Bytes of online-only content fetched since the mount started.
    fetched_bytes: u64,
    /// Local changes the sync engine refused: they wait aside and are retried, while every
    /// other change syncs.
    set_aside: Vec<crate::fs::capture::AsideNote>,
    /// How the watched folder holds a file with several names: `"hard links"`, or
    /// `"separate copies"` where its file system has no hard links (vfat); null when not
    /// watching.
    hard_links: Option<String>,
}

#[derive(serde::Serialize)]
struct Conflict {
    name: String,
    time: String,
}

#[derive(serde::Serialize)]
struct Pending {
    count: u64,
    bytes: u64,
}

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let home = Home::resolve(args.home.home.as_deref())?;
    let rec = PidRecord::read(&home)
        .filter(|r| r.alive() && (r.watch || is_deltadrive_mount(&r.mountpoint)));
    let watching = rec
        .as_ref()
        .filter(|r| r.watch)
        .map(|r| r.mountpoint.clone());
    let rec = rec.filter(|r| !r.watch);
    let device: Option<serde_json::Value> = std::fs::read(home.device_file())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let server = device.as_ref().and_then(|d| {
        d.get("server_url")
            .and_then(|s| s.as_str())
            .map(str::to_string)
    });
    let online = server.as_deref().map(server_reachable);
    let (pending, unsealed, content) = if home.db_dir().exists() {
        crate::store::Store::open_read_only(&home.db_dir(), &home.content_dir())
            .and_then(|s| {
                Ok((
                    s.outbox_size()?,
                    s.pending()?.len() as u64,
                    crate::fs::ondemand::content_counts(&s)?,
                ))
            })
            .map_err(|e| {
                anyhow::anyhow!("reading the local store in {}: {e}", home.root().display())
            })?
    } else {
        ((0, 0), 0, None)
    };
    let sync_report = crate::sync::SyncReport::load(&home);
    let seen_file = home.root().join("conflicts-seen");
    let conflicts_seen: i64 = std::fs::read_to_string(&seen_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let report = StatusReport {
        home: home.root().to_path_buf(),
        mounted: rec.is_some(),
        mountpoint: rec.as_ref().map(|r| r.mountpoint.clone()),
        watching: watching.clone(),
        pid: rec.as_ref().map(|r| r.pid).or_else(|| {
            watching
                .as_ref()
                .and_then(|_| PidRecord::read(&home).map(|r| r.pid))
        }),
        logged_in: device.is_some(),
        server,
        online,
        pending_uploads: Pending {
            count: pending.0,
            bytes: pending.1,
        },
        unsealed_changes: unsealed,
        last_sync: sync_report
            .last_sync_ms
            .or(sync_report.last_upload_ms)
            .map(format_ms),
        conflicts: sync_report
            .conflicts
            .iter()
            .filter(|c| c.time_ms > conflicts_seen)
            .map(|c| Conflict {
                name: c.name.clone(),
                time: format_ms(c.time_ms),
            })
            .collect(),
        cursor: sync_report.cursor,
        last_error: sync_report.last_error.clone(),
        waiting: sync_report.waiting.clone(),
        content,
        fetched_bytes: sync_report.fetched_bytes,
        set_aside: if rec.is_some() || watching.is_some() {
            home.load_set_aside()
        } else {
            Vec::new()
        },
        hard_links: watching
            .as_ref()
            .and_then(|_| home.load_watch_folder())
            .map(|w| w.hard_links),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("home:            {}", report.home.display());
    match (&report.mountpoint, report.pid) {
        (Some(mp), Some(pid)) => println!("mounted:         {} (pid {pid})", mp.display()),
        _ => println!("mounted:         no"),
    }
    if let (Some(dir), Some(pid)) = (&report.watching, report.pid) {
        println!("watching:        {} (pid {pid})", dir.display());
        if report.hard_links.as_deref() == Some("separate copies") {
            println!(
                "hard links:      kept as separate copies (the folder's file system has none)"
            );
        }
    }
    match (&report.server, report.online) {
        (Some(s), Some(true)) => println!("server:          {s} (reachable)"),
        (Some(s), _) => println!("server:          {s} (unreachable: offline)"),
        (None, _) => println!("server:          not logged in (deltadrive login)"),
    }
    println!(
        "pending uploads: {} ({} bytes){}",
        report.pending_uploads.count,
        report.pending_uploads.bytes,
        if report.unsealed_changes > 0 {
            format!(
                ", {} change(s) still being written",
                report.unsealed_changes
            )
        } else {
            String::new()
        }
    );
    println!(
        "last sync:       {}",
        report.last_sync.as_deref().unwrap_or("never")
    );
    if let Some(c) = &report.content {
        println!(
            "local files:     {} ({})",
            c.local_files,
            crate::cli::human_bytes(c.local_bytes)
        );
        println!(
            "online-only:     {} ({} not on this device)",
            c.online_only_files,
            crate::cli::human_bytes(c.online_only_bytes)
        );
    }
    println!("conflicts:       {}", report.conflicts.len());
    for c in &report.conflicts {
        println!("  {} (made {})", c.name, c.time);
    }
    // Shown once: the next `status` lists only newer ones (`--json` never marks them seen).
    if let Some(newest) = sync_report.conflicts.iter().map(|c| c.time_ms).max() {
        if newest > conflicts_seen {
            let _ = std::fs::write(&seen_file, newest.to_string());
        }
    }
    if let Some(e) = &report.last_error {
        println!("last error:      {e}");
    }
    if let Some(w) = &report.waiting {
        println!("waiting:         {w}");
    }
    if !report.set_aside.is_empty() {
        println!(
            "set aside:       {} change(s) cannot sync and are retried; everything else syncs",
            report.set_aside.len()
        );
        for n in &report.set_aside {
            println!("  {} (tried {} time(s)): {}", n.path, n.attempts, n.reason);
        }
    }
    Ok(())
}

/// Whether the server's address accepts a TCP connection within two seconds.
fn server_reachable(url: &str) -> bool {
    use std::net::ToSocketAddrs;
    let rest = url.split("://").nth(1).unwrap_or(url);
    let hostport = rest.split('/').next().unwrap_or(rest);
    let default_port = if url.starts_with("https") { 443 } else { 80 };
    let target = if hostport
        .rsplit(':')
        .next()
        .is_some_and(|p| p.parse::<u16>().is_ok())
    {
        hostport.to_string()
    } else {
        format!("{hostport}:{default_port}")
    };
    target
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
}

/// Milliseconds since the Unix epoch as UTC `YYYY-MM-DD HH:MM:SS`.
pub(crate) fn format_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `deltadrive outbox`: what this device will upload, one line an op.
pub fn outbox(args: StatusArgs) -> anyhow::Result<()> {
    use crate::changelog::OpKind;
    let home = Home::resolve(args.home.home.as_deref())?;
    let store = crate::store::Store::open_read_only(&home.db_dir(), &home.content_dir())?;
    for (seq, bytes) in store.outbox()? {
        let tx = crate::changelog::decode_transaction(&bytes)?;
        println!(
            "#{seq} tx {} ({} bytes) from {}",
            hex::encode(tx.id),
            bytes.len(),
            tx.device
        );
        for op in &tx.ops {
            let what = match &op.kind {
                OpKind::Create { name, .. } => format!("create {name}"),
                OpKind::Write {
                    new_size, delta, ..
                } => {
                    format!(
                        "write {new_size} bytes ({:?})",
                        crate::delta::Strategy::of(delta)
                    )
                }
                OpKind::Truncate { new_size, .. } => format!("truncate {new_size}"),
                OpKind::Rename { new_name, .. } => format!("rename to {new_name}"),
                OpKind::Delete => "delete".into(),
                OpKind::SetAttr { mode, mtime_ns } => {
                    format!("setattr mode {mode:?} mtime {mtime_ns:?}")
                }
                OpKind::SetXattr { name, .. } => {
                    format!("setxattr {}", String::from_utf8_lossy(name))
                }
                OpKind::RemoveXattr { name } => {
                    format!("removexattr {}", String::from_utf8_lossy(name))
                }
                OpKind::Link { name, .. } => format!("link as {name}"),
                OpKind::Unlink { name, .. } => format!("unlink {name}"),
            };
            println!(
                "  {} v{}->v{} {what}",
                op.object, op.base_version, op.new_version
            );
        }
    }
    Ok(())
}
