//! Load tool for `deltadrive server`: U users × D devices append small transactions
//! concurrently; measures appends per second and long-poll wake-up latency (time from an
//! append's acknowledgement to each other device of that user waking).
//!
//! ```text
//! cargo bench --bench server_load -- [--users 10] [--devices 10] [--duration-secs 10] [--server URL[,URL...] --admin-token-file F]
//! ```
//! Without `--server` it starts the built binary (`target/*/deltadrive`) on a temporary folder.
//! With several URLs (replicas sharing one backend) device `d` of every user talks to URL
//! `d mod n`, so a user's devices are spread over the replicas and wake-ups cross them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deltadrive::changelog::{
    encode_changelog, ChangeLog, Name, ObjectId, ObjectKind, Op, OpKind, Transaction,
};
use deltadrive::client::Client;
use parking_lot::Mutex;

/// (user, seq) → (appending device, acknowledgement time).
type Acks = HashMap<(usize, u64), (usize, Instant)>;
/// Every wake-up: (user, seq, waking device, time).
type Wakes = Vec<(usize, u64, usize, Instant)>;

struct Args {
    users: usize,
    devices: usize,
    duration: Duration,
    server: Option<Vec<String>>,
    admin_token_file: Option<PathBuf>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        users: 10,
        devices: 10,
        duration: Duration::from_secs(10),
        server: None,
        admin_token_file: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--users" => a.users = val()?.parse()?,
            "--devices" => a.devices = val()?.parse()?,
            "--duration-secs" => a.duration = Duration::from_secs_f64(val()?.parse()?),
            "--server" => {
                a.server = Some(val()?.split(',').map(|u| u.trim().to_string()).collect())
            }
            "--admin-token-file" => a.admin_token_file = Some(PathBuf::from(val()?)),
            "--bench" => {}
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(
        a.users > 0 && a.devices > 1,
        "need at least 1 user and 2 devices"
    );
    Ok(a)
}

struct Spawned {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server() -> anyhow::Result<(Spawned, String, String)> {
    let exe = std::env::current_exe()?;
    let target = exe
        .parent()
        .and_then(|p| p.parent())
        .ok_or_else(|| anyhow::anyhow!("cannot find the target folder"))?;
    let bin = target.join("deltadrive");
    anyhow::ensure!(
        bin.exists(),
        "{} not built (cargo build first)",
        bin.display()
    );
    let dir = tempfile::tempdir()?;
    let mut child = Command::new(&bin)
        .args(["server", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path().join("data"))
        .env("DELTADRIVE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let out = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)?;
    let url = line
        .split("listening on ")
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("unexpected server output {line:?}"))?
        .trim()
        .to_string();
    let token = std::fs::read_to_string(dir.path().join("data/admin.token"))?
        .trim()
        .to_string();
    Ok((Spawned { child, _dir: dir }, url, token))
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let (_guard, url, admin_token) = match &args.server {
        Some(u) => {
            let f = args
                .admin_token_file
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("--server needs --admin-token-file"))?;
            (
                None,
                u.clone(),
                std::fs::read_to_string(f)?.trim().to_string(),
            )
        }
        None => {
            let (g, u, t) = spawn_server()?;
            (Some(g), vec![u], t)
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args, url, admin_token))
}

async fn run(args: Args, urls: Vec<String>, admin_token: String) -> anyhow::Result<()> {
    anyhow::ensure!(!urls.is_empty(), "no server URL");
    let admin = Client::new(&urls[0], Some(admin_token), None)?;
    let anons = urls
        .iter()
        .map(|u| Client::new(u, None, None))
        .collect::<Result<Vec<_>, _>>()?;
    let url = urls.join(",");
    let run_id = hex::encode(rand::random::<[u8; 3]>());
    let mut users = Vec::new();
    for u in 0..args.users {
        let name = format!("load{run_id}-{u}");
        admin.add_user(&name, "load-password").await?;
        let mut devs = Vec::new();
        for d in 0..args.devices {
            let anon = &anons[d % anons.len()];
            let l = anon.login(&name, "load-password", &format!("d{d}")).await?;
            devs.push(anon.with_token(l.token));
        }
        users.push(devs);
    }
    // (user, seq) → (appending device, acknowledgement time); and every wake-up as
    // (user, seq, waking device, time). Latencies are computed at the end, so a waiter that wakes
    // before the appender has recorded its acknowledgement is still counted (as 0).
    let acks: Arc<Mutex<Acks>> = Arc::default();
    let wakes: Arc<Mutex<Wakes>> = Arc::default();
    let appends: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let end = start + args.duration;
    let mut tasks = Vec::new();
    for (u, devs) in users.into_iter().enumerate() {
        for (d, c) in devs.into_iter().enumerate() {
            // Device 0 of each user only long-polls; the others append and long-poll.
            let (acks, appends) = (acks.clone(), appends.clone());
            let waiter = c.clone();
            let wakes2 = wakes.clone();
            tasks.push(tokio::spawn(async move {
                let mut after = 0;
                while Instant::now() < end {
                    let Ok(head) = waiter.wait(after, Duration::from_secs(2)).await else {
                        break;
                    };
                    let now = Instant::now();
                    if head > after {
                        let mut w = wakes2.lock();
                        for seq in after + 1..=head {
                            w.push((u, seq, d, now));
                        }
                        after = head;
                    }
                }
            }));
            if d == 0 {
                continue;
            }
            tasks.push(tokio::spawn(async move {
                let mut i = 0u64;
                while Instant::now() < end {
                    let t = Transaction {
                        id: rand::random(),
                        device: format!("d{d}"),
                        time_ms: 0,
                        ops: vec![Op {
                            object: ObjectId::random(),
                            base_version: 0,
                            new_version: 1,
                            kind: OpKind::Create {
                                parent: ObjectId::ROOT,
                                name: Name(format!("d{d}-{i}").into_bytes()),
                                kind: ObjectKind::File,
                                mode: 0o644,
                                mtime_ns: 0,
                            },
                        }],
                    };
                    let key = hex::encode(t.id);
                    let body = encode_changelog(&ChangeLog {
                        transactions: vec![t],
                    });
                    let t0 = Instant::now();
                    match c.append(&key, body).await {
                        Ok(r) => {
                            let now = Instant::now();
                            acks.lock().insert((u, r.first_seq), (d, now));
                            appends.lock().push((now - t0).as_secs_f64() * 1000.0);
                        }
                        Err(e) => {
                            eprintln!("append failed: {e}");
                            break;
                        }
                    }
                    i += 1;
                }
            }));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = start.elapsed().as_secs_f64();
    let mut ap = appends.lock().clone();
    let mut wk: Vec<f64> = {
        let acks = acks.lock();
        wakes
            .lock()
            .iter()
            .filter_map(|(u, seq, d, at)| {
                let (by, acked) = acks.get(&(*u, *seq))?;
                (by != d).then(|| at.saturating_duration_since(*acked).as_secs_f64() * 1000.0)
            })
            .collect()
    };
    let n = ap.len();
    let rate = n as f64 / secs;
    let (a50, a99) = (pct(&mut ap, 0.5), pct(&mut ap, 0.99));
    let (w50, w99) = (pct(&mut wk, 0.5), pct(&mut wk, 0.99));
    println!(
        "users {} x devices {} for {:.1} s against {url}",
        args.users, args.devices, secs
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10}",
        "metric", "count", "p50 ms", "p99 ms"
    );
    println!(
        "{:<28} {:>10} {:>10.2} {:>10.2}",
        "append latency", n, a50, a99
    );
    println!(
        "{:<28} {:>10} {:>10.2} {:>10.2}",
        "long-poll wake-up latency",
        wk.len(),
        w50,
        w99
    );
    println!("appends/second: {rate:.1}");
    println!(
        "{}",
        serde_json::json!({
            "users": args.users, "devices": args.devices, "seconds": secs,
            "appends": n, "appends_per_second": rate,
            "append_p50_ms": a50, "append_p99_ms": a99,
            "wakeups": wk.len(), "wake_p50_ms": w50, "wake_p99_ms": w99,
        })
    );
    Ok(())
}
