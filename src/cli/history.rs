//! `deltadrive history PATH`, `deltadrive restore PATH --version V` and `deltadrive wait`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::{HistoryArgs, RestoreArgs, WaitArgs};
use crate::changelog::ObjectId;
use crate::client::DeviceConfig;
use crate::fs::mount::{is_deltadrive_mount, PidRecord};
use crate::home::Home;
use crate::store::{Store, ROOT_INO};

/// The object id of `path`, a path inside the mounted folder of `home`.
fn object_of(home: &Home, path: &Path) -> anyhow::Result<(ObjectId, PathBuf)> {
    let rec = PidRecord::read(home)
        .filter(|r| r.alive() && is_deltadrive_mount(&r.mountpoint))
        .with_context(|| {
            format!(
                "the folder of {} is not mounted (deltadrive mount first)",
                home.root().display()
            )
        })?;
    let abs = std::path::absolute(path)?;
    // Resolve the folders (symlinks, `..`) but not the last name: a symlink names itself.
    let parent = abs
        .parent()
        .unwrap_or(&abs)
        .canonicalize()
        .with_context(|| format!("{}: no such folder", abs.parent().unwrap_or(&abs).display()))?;
    let full = match abs.file_name() {
        Some(n) => parent.join(n),
        None => parent,
    };
    let rel = full.strip_prefix(&rec.mountpoint).map_err(|_| {
        anyhow::anyhow!(
            "{} is not inside the mounted folder {}",
            path.display(),
            rec.mountpoint.display()
        )
    })?;
    let store = Store::open_read_only(&home.db_dir(), &home.content_dir())?;
    let mut ino = ROOT_INO;
    for part in rel.components() {
        let name = part.as_os_str().as_encoded_bytes();
        ino = match store.lookup(ino, name)? {
            Some((i, _)) => i,
            None => bail!("{}: no such file in the synced folder", path.display()),
        };
    }
    let inode = store
        .get_inode(ino)?
        .with_context(|| format!("{}: no such file", path.display()))?;
    Ok((inode.object, full))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn format_ms(ms: i64) -> String {
    super::mount::format_ms(ms)
}

#[derive(serde::Deserialize)]
struct Version {
    version: u64,
    size: u64,
    hash: String,
    time_ms: i64,
    device: String,
}

fn versions(home: &Home, id: ObjectId) -> anyhow::Result<Vec<Version>> {
    let client = DeviceConfig::load(home)?.client()?;
    let rt = runtime()?;
    let v = rt
        .block_on(client.history(&hex::encode(id.0)))
        .map_err(|e| match e.status() {
            Some(s) if s == reqwest::StatusCode::NOT_FOUND => {
                anyhow::anyhow!("the server keeps no versions of this file yet (not synced?)")
            }
            _ => anyhow::anyhow!("asking the server for the history: {e}"),
        })?;
    Ok(serde_json::from_value(v)?)
}

pub fn history(args: HistoryArgs) -> anyhow::Result<()> {
    let home = Home::resolve(args.home.home.as_deref())?;
    let (id, full) = object_of(&home, &args.path)?;
    let mut vs = versions(&home, id)?;
    vs.sort_by_key(|v| v.version);
    println!("versions of {} kept by the server:", full.display());
    println!(
        "{:>8}  {:<23}  {:<16}  {:>12}  hash",
        "version", "saved", "device", "bytes"
    );
    let last = vs.last().map(|v| v.version);
    for v in &vs {
        println!(
            "{:>8}  {:<23}  {:<16}  {:>12}  {}{}",
            v.version,
            format_ms(v.time_ms),
            v.device,
            v.size,
            &v.hash[..12.min(v.hash.len())],
            if Some(v.version) == last {
                "  (current)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

pub fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let home = Home::resolve(args.home.home.as_deref())?;
    let (id, full) = object_of(&home, &args.path)?;
    let vs = versions(&home, id)?;
    let Some(v) = vs.iter().find(|v| v.version == args.version) else {
        let known: Vec<String> = vs.iter().map(|v| v.version.to_string()).collect();
        bail!(
            "version {} of {} is not kept; kept: {}",
            args.version,
            full.display(),
            known.join(", ")
        );
    };
    let client = DeviceConfig::load(&home)?.client()?;
    let rt = runtime()?;
    let content = rt
        .block_on(client.content(&hex::encode(id.0), Some(v.version), None))
        .map_err(|e| anyhow::anyhow!("fetching version {}: {e}", v.version))?;
    if blake3::hash(&content).to_hex().as_str() != v.hash {
        bail!(
            "the server sent version {} with the wrong hash; nothing was changed",
            v.version
        );
    }
    // Written through the mount: an ordinary edit that syncs as a new version.
    std::fs::write(&full, &content).with_context(|| format!("writing {}", full.display()))?;
    println!(
        "restored {} to version {} ({} bytes, saved {} by {}); it syncs as a new version",
        full.display(),
        v.version,
        content.len(),
        format_ms(v.time_ms),
        v.device
    );
    Ok(())
}

/// Waits until the mounted device has sent everything and received everything, with a
/// progress bar on a terminal.
pub fn wait(args: WaitArgs) -> anyhow::Result<()> {
    let home = Home::resolve(args.home.home.as_deref())?;
    if !home.device_file().exists() {
        bail!("not logged in: nothing to wait for (deltadrive login)");
    }
    let start_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let started = Instant::now();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg} [{bar:30}] {pos}/{len} changes ({elapsed})",
        )?
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    loop {
        let mounted = PidRecord::read(&home)
            .filter(|r| r.alive() && is_deltadrive_mount(&r.mountpoint))
            .is_some();
        if !mounted {
            bar.abandon();
            bail!("the folder of {} is not mounted", home.root().display());
        }
        let r = crate::sync::SyncReport::load(&home);
        // Changes written but not sealed yet count as unsent too: a file written just
        // before `wait` must not be reported in sync.
        let outbox = Store::open_read_only(&home.db_dir(), &home.content_dir())
            .and_then(|s| Ok(s.outbox_size()?.0 + s.pending()?.len() as u64))
            .unwrap_or(u64::MAX);
        let head = r.head.max(r.cursor);
        bar.set_length(head);
        bar.set_position(r.cursor);
        bar.set_message(if outbox > 0 {
            format!("sending {outbox} change(s);")
        } else if r.online == Some(false) {
            "server unreachable;".to_string()
        } else {
            "receiving".to_string()
        });
        if outbox == 0 && r.last_sync_ms.is_some_and(|t| t >= start_ms) && r.cursor >= r.head {
            bar.finish_with_message("in sync");
            return Ok(());
        }
        if let Some(t) = args.timeout_secs {
            if started.elapsed() > Duration::from_secs(t) {
                bar.abandon_with_message("not in sync yet");
                bail!("not in sync after {t} s");
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
