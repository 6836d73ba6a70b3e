//! The promises of `docs/security.md` against the real `deltadrive server` binary: strangers
//! are refused early (login limits before any password hashing, small JSON bodies before
//! authentication, header and idle timeouts, a connection cap), tokens do not outlive a revoke,
//! a password change or the removal of their user, passwords can be changed, and content files
//! on the server are its user's alone. Runs on both backends (`DELTADRIVE_TEST_BACKEND`).

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::server::TestServer;
use deltadrive::client::{Client, DeviceConfig};
use reqwest::StatusCode;

/// A plain reqwest client whose connections come from `from` (any 127/8 address reaches the
/// server on 127.0.0.1), so a test can be several clients.
fn client_from(from: &str) -> reqwest::Client {
    deltadrive::server::install_crypto_provider();
    reqwest::Client::builder()
        .local_address(from.parse::<IpAddr>().unwrap())
        .build()
        .unwrap()
}

fn server_log(s: &TestServer) -> String {
    std::fs::read_to_string(s.dir.path().join("server-1.log")).unwrap_or_default()
}

async fn login_status(c: &reqwest::Client, url: &str, user: &str, pw: &str) -> reqwest::Response {
    c.post(format!("{url}/v1/login"))
        .json(&serde_json::json!({"user": user, "password": pw, "device": "d"}))
        .send()
        .await
        .expect("login request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_login_flood_is_refused_before_hashing_and_another_user_still_logs_in() {
    let s = TestServer::start();
    let admin = s.admin();
    admin.add_user("victim", "password-123").await.unwrap();
    admin.add_user("alice", "password-123").await.unwrap();
    let url = s.url.clone();
    // 400 wrong passwords for one user from one address, 32 at a time.
    let flood = {
        let url = url.clone();
        tokio::spawn(async move {
            let c = client_from("127.0.0.2");
            let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
            let mut tries = Vec::new();
            for i in 0..400 {
                let (c, url, sem) = (c.clone(), url.clone(), sem.clone());
                tries.push(tokio::spawn(async move {
                    let _p = sem.acquire().await.unwrap();
                    let r = login_status(&c, &url, "victim", &format!("wrong-{i}")).await;
                    let retry = r
                        .headers()
                        .get("retry-after")
                        .map(|v| v.to_str().unwrap().to_string());
                    (r.status(), retry)
                }));
            }
            let mut out = Vec::new();
            for t in tries {
                out.push(t.await.unwrap());
            }
            out
        })
    };
    // During the flood, the right password of another user, from another address.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = login_status(&client_from("127.0.0.1"), &url, "alice", "password-123").await;
    assert_eq!(r.status(), StatusCode::OK, "alice during the flood");
    let results = flood.await.unwrap();
    let unauthorized = results
        .iter()
        .filter(|(st, _)| *st == StatusCode::UNAUTHORIZED)
        .count();
    let limited: Vec<_> = results
        .iter()
        .filter(|(st, _)| *st == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert_eq!(unauthorized + limited.len(), 400, "{results:?}");
    // Only the user's burst (10 a minute by default) reached a password check.
    assert!(
        unauthorized <= 10,
        "{unauthorized} tries were checked (argon2) instead of refused early"
    );
    assert!(
        limited.iter().all(|(_, retry)| retry
            .as_deref()
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|secs| secs >= 1)),
        "every 429 says when to retry: {limited:?}"
    );
    // The right password of the flooded user from the flooding address is refused too (the
    // address is over its limit), and says so.
    let r = login_status(&client_from("127.0.0.2"), &url, "victim", "password-123").await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    // Each checked failure is logged once, at warn, with the client address and no password.
    let log = server_log(&s);
    let failed: Vec<&str> = log.lines().filter(|l| l.contains("login failed")).collect();
    assert_eq!(failed.len(), unauthorized, "{log}");
    assert!(
        failed
            .iter()
            .all(|l| l.contains("WARN") && l.contains("client=127.0.0.2") && l.contains("victim")),
        "{failed:?}"
    );
    assert!(!log.contains("wrong-"), "a password reached the log");
}

#[tokio::test]
async fn json_bodies_over_the_limit_are_refused_before_authentication() {
    let s = TestServer::start_with(&["--max-json-bytes", "4096"]);
    let c = client_from("127.0.0.1");
    let big = serde_json::json!({"user": "a", "password": "x".repeat(8192), "device": "d"});
    let r = c
        .post(format!("{}/v1/login", s.url))
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // No token at all: the size is refused before the missing token is.
    let r = c
        .post(format!("{}/v1/admin/users", s.url))
        .json(&serde_json::json!({"name": "a", "password": "x".repeat(8192)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // A body sent without a length is cut at the limit while read.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        vec![Ok(vec![b' '; 3000]), Ok(vec![b' '; 3000])];
    let r = c
        .post(format!("{}/v1/login", s.url))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // Small bodies are served as before.
    let ok = s.admin().add_user("bob", "password-123").await;
    assert!(ok.is_ok(), "{ok:?}");
}

fn addr_of(s: &TestServer) -> String {
    s.url.trim_start_matches("http://").to_string()
}

/// Whether the server closes `c` within `limit` (a read returns end of file or an error).
fn closed_within(c: &mut TcpStream, limit: Duration) -> bool {
    c.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn slow_headers_idle_connections_and_too_many_connections_are_closed() {
    let s = TestServer::start_with(&[
        "--header-read-timeout-secs",
        "1",
        "--max-wait-ms",
        "1000",
        "--idle-timeout-secs",
        "11",
        "--max-connections",
        "2",
    ]);
    let addr = addr_of(&s);
    // Half a request, then nothing: closed at the header timeout.
    let mut slow = TcpStream::connect(&addr).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let start = Instant::now();
    assert!(
        closed_within(&mut slow, Duration::from_secs(10)),
        "slow headers kept open"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    // Two silent connections hold both slots: a third is closed at once.
    let mut a = TcpStream::connect(&addr).unwrap();
    let _b = TcpStream::connect(&addr).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut third = TcpStream::connect(&addr).unwrap();
    let _ = third.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut reply = Vec::new();
    third
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = third.read_to_end(&mut reply);
    assert!(
        !String::from_utf8_lossy(&reply).contains("200 OK"),
        "a connection over the cap was served"
    );
    // Once they are gone (closed by the header timeout, as idle keep-alives), a new one is
    // served.
    assert!(closed_within(&mut a, Duration::from_secs(10)));
    std::thread::sleep(Duration::from_millis(300));
    let mut fresh = TcpStream::connect(&addr).unwrap();
    fresh
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    fresh.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_login_racing_the_removal_of_its_user_leaves_nothing_behind() {
    let s = TestServer::start();
    let admin = s.admin();
    for round in 0..3 {
        let user = format!("racer{round}");
        admin.add_user(&user, "password-123").await.unwrap();
        // Logins in flight (each spends its time in the password check) while the user goes.
        let mut logins = Vec::new();
        for i in 0..6 {
            let (anon, user) = (s.anon(), user.clone());
            logins.push(tokio::spawn(async move {
                anon.login(&user, "password-123", &format!("dev{i}")).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(20 * round)).await;
        admin.remove_user(&user).await.unwrap();
        let mut tokens = Vec::new();
        for l in logins {
            if let Ok(info) = l.await.unwrap() {
                tokens.push(info.token);
            }
        }
        // A later user of the same name inherits nothing.
        admin.add_user(&user, "another-password").await.unwrap();
        for t in &tokens {
            let e = s.anon().with_token(t.clone()).me().await;
            assert_eq!(
                e.err().and_then(|e| e.status()),
                Some(StatusCode::UNAUTHORIZED),
                "round {round}: a token from before the removal still works"
            );
        }
        assert!(
            admin.admin_list_devices(&user).await.unwrap().is_empty(),
            "round {round}: the new {user} has devices of the old one"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_device_has_no_working_token_whatever_raced_the_revoke() {
    let s = TestServer::start();
    let admin = s.admin();
    admin.add_user("ann", "password-123").await.unwrap();
    for round in 0..5 {
        s.anon().login("ann", "password-123", "tab").await.unwrap();
        let mut logins = Vec::new();
        for _ in 0..4 {
            let anon = s.anon();
            logins.push(tokio::spawn(async move {
                anon.login("ann", "password-123", "tab").await
            }));
        }
        tokio::time::sleep(Duration::from_millis(10 * round)).await;
        admin.admin_revoke_device("ann", "tab").await.unwrap();
        let mut tokens = Vec::new();
        for l in logins {
            if let Ok(info) = l.await.unwrap() {
                tokens.push(info.token);
            }
        }
        let revoked = admin
            .admin_list_devices("ann")
            .await
            .unwrap()
            .iter()
            .find(|d| d.name == "tab")
            .unwrap()
            .revoked;
        let mut working = 0;
        for t in &tokens {
            if s.anon().with_token(t.clone()).me().await.is_ok() {
                working += 1;
            }
        }
        if revoked {
            assert_eq!(
                working, 0,
                "round {round}: the device is revoked, a token works"
            );
        } else {
            assert!(
                working <= 1,
                "round {round}: {working} tokens for one device"
            );
        }
        admin.admin_revoke_device("ann", "tab").await.unwrap();
    }
}

/// The device's own login, as `deltadrive login` wrote it.
fn device_client(home: &Path) -> Client {
    let home = deltadrive::home::Home::resolve(Some(home)).unwrap();
    let d = DeviceConfig::load(&home).unwrap();
    Client::new(&d.server_url, Some(d.token), None).unwrap()
}

#[test]
fn passwd_and_admin_set_password_change_it_and_log_out_the_other_devices() {
    let s = TestServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    // TestServer::login: the password is "correct horse battery staple".
    s.login(&a, "ann", "laptop");
    s.login(&b, "ann", "phone");
    let me = |home: &Path| rt.block_on(device_client(home).me()).map(|_| ());
    let login = |pw: &str| rt.block_on(s.anon().login("ann", pw, "x")).map(|_| ());
    let file = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let (old, new, wrong) = (
        file("old", "correct horse battery staple\n"),
        file("new", "a new password\n"),
        file("wrong", "not the password\n"),
    );
    let passwd = |old: &str, new: &str| {
        common::run(&[
            "passwd",
            "--home",
            a.to_str().unwrap(),
            "--old-password-file",
            old,
            "--new-password-file",
            new,
        ])
    };
    let out = passwd(&wrong, &new);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{out:?}"
    );
    assert!(me(&b).is_ok(), "a refused change logs no one out");

    let out = passwd(&old, &new);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(me(&a).is_ok(), "the device that changed it keeps working");
    assert_eq!(
        me(&b).err().and_then(|e| e.status()),
        Some(StatusCode::UNAUTHORIZED),
        "the other device is logged out"
    );
    assert!(login("correct horse battery staple").is_err());
    login("a new password").expect("the new password");

    // The admin sets it: every device is logged out.
    let tok = file("admin.token", &s.admin_token);
    let third = file("third", "the third password\n");
    let set = |user: &str| {
        common::run(&[
            "admin",
            "--server",
            &s.url,
            "--admin-token-file",
            &tok,
            "user",
            "set-password",
            user,
            "--password-file",
            &third,
        ])
    };
    let out = set("ann");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(me(&a).is_err(), "logged out by the admin");
    assert!(login("a new password").is_err());
    login("the third password").expect("the admin's password");
    let out = set("nobody");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("404"),
        "{out:?}"
    );
}

#[test]
fn login_refuses_a_storage_url_that_downgrades_or_changes_host() {
    // The server names storage elsewhere than where the device logged in.
    let s = TestServer::start_with(&["--public-url", "http://elsewhere.example:8080"]);
    let tmp = tempfile::tempdir().unwrap();
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, "password-123\n").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(s.admin().add_user("ann", "password-123"))
        .unwrap();
    let home = tmp.path().join("home");
    let out = common::run(&[
        "login",
        "--server",
        &s.url,
        "--user",
        "ann",
        "--device",
        "d",
        "--password-file",
        pw.to_str().unwrap(),
        "--home",
        home.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another host") && err.contains("--public-url"),
        "{err}"
    );
    assert!(
        !home.join("device.json").exists(),
        "no token kept for that URL"
    );
}

/// Creates file `name` at the root with `content`, in one append.
async fn upload_file(c: &Client, name: &str, content: &[u8]) {
    use deltadrive::changelog::{
        encode_changelog, ChangeLog, Delta, Name, ObjectId, ObjectKind, Op, OpKind, Transaction,
    };
    let id = ObjectId::random();
    let ops = vec![
        Op {
            object: id,
            base_version: 0,
            new_version: 1,
            kind: OpKind::Create {
                parent: ObjectId::ROOT,
                name: Name::new(name.as_bytes().to_vec()).unwrap(),
                kind: ObjectKind::File,
                mode: 0o644,
                mtime_ns: 1,
            },
        },
        Op {
            object: id,
            base_version: 1,
            new_version: 2,
            kind: OpKind::Write {
                base_hash: *blake3::hash(b"").as_bytes(),
                new_hash: *blake3::hash(content).as_bytes(),
                new_size: content.len() as u64,
                delta: Delta::Whole(content.to_vec()),
            },
        },
    ];
    let t = Transaction {
        id: rand::random(),
        device: "laptop".into(),
        time_ms: 1_700_000_000_000,
        ops,
    };
    let key = hex::encode(t.id);
    c.append(
        &key,
        encode_changelog(&ChangeLog {
            transactions: vec![t],
        }),
    )
    .await
    .expect("append");
}

#[tokio::test]
async fn server_chunks_are_the_server_users_alone() {
    if common::server::backend_name() != "embedded" {
        return; // chunk files exist only in the embedded backend's data folder
    }
    let s = TestServer::start();
    let c = s.device("ann", "laptop").await;
    upload_file(&c, "f", &vec![7u8; 3 << 20]).await;
    let chunks = s.data_dir().join("chunks");
    let mut files = 0;
    let mut stack = vec![chunks.clone()];
    while let Some(d) = stack.pop() {
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "folder {}", d.display());
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files += 1;
                let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "chunk {}", p.display());
            }
        }
    }
    assert!(files > 0, "no chunk written under {}", chunks.display());
    let data = std::fs::metadata(s.data_dir())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(data, 0o700);
}

/// Starts `deltadrive server` on the scale-out backend over TCP with `args` and `env`; returns
/// the running child once it listens, or everything it printed when it exits first.
fn start_scaleout(
    data: &Path,
    args: &[String],
    env: &[(&str, String)],
) -> Result<std::process::Child, String> {
    use std::io::BufRead;
    let (_, endpoint, bucket) = common::server::scaleout_env();
    let schema = format!("t_sec_{}", hex::encode(rand::random::<[u8; 5]>()));
    let log = data.join(format!("{schema}.log"));
    let mut child = std::process::Command::new(common::bin())
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--metadata-schema",
            &schema,
        ])
        .args([
            "--objects",
            &format!("s3://{bucket}/{schema}"),
            "--s3-endpoint",
            &endpoint,
        ])
        .arg("--admin-token-file")
        .arg(data.join(format!("{schema}.token")))
        .args(args)
        .env_remove("DELTADRIVE_METADATA_PASSWORD")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("listening on") {
                let _ = tx.send(());
            }
        }
    });
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if rx.recv_timeout(Duration::from_millis(100)).is_ok() {
            return Ok(child);
        }
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!(
                "{st}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!(
        "the server neither listened nor stopped in 60 s: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// Stops a server this test started.
fn stop(mut c: std::process::Child) {
    let _ = c.kill();
    let _ = c.wait();
}

#[test]
fn postgres_password_file_and_tls() {
    if common::server::backend_name() != "postgres_s3" {
        // This promise is about the scale-out backend: `scripts/test.sh` runs this file again
        // under tests/scaleout-env.sh, which serves a password-checked, TLS-only TCP port.
        return;
    }
    let env = |k: &str| {
        std::env::var(k).unwrap_or_else(|_| panic!("{k} unset: run under tests/scaleout-env.sh"))
    };
    let (url, password) = (
        env("DELTADRIVE_TEST_PG_TCP_URL"),
        env("DELTADRIVE_TEST_PG_PASSWORD"),
    );
    let (ca, other_ca) = (
        env("DELTADRIVE_TEST_PG_CA"),
        env("DELTADRIVE_TEST_PG_OTHER_CA"),
    );
    let tmp = tempfile::tempdir().unwrap();
    let pw_file = tmp.path().join("pg-password");
    std::fs::write(&pw_file, format!("{password}\n")).unwrap();
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v = vec!["--metadata".to_string(), url.clone()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let pw_arg = pw_file.display().to_string();

    // The password from a file, TLS verified against the run's CA: it starts, over TLS.
    let c = start_scaleout(
        tmp.path(),
        &args(&[
            "--metadata-password-file",
            &pw_arg,
            "--metadata-ca-file",
            &ca,
        ]),
        &[],
    )
    .unwrap_or_else(|e| panic!("with the password file and the CA: {e}"));
    let out = std::process::Command::new(env("DELTADRIVE_TEST_PSQL"))
        .arg(env("DELTADRIVE_TEST_PG_URL"))
        .args([
            "-tAc",
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.usename = 'deltadrive_pw'",
        ])
        .output()
        .unwrap();
    stop(c);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "t",
        "the server's sessions are not all TLS: {out:?}"
    );
    // The password from the environment.
    let c = start_scaleout(
        tmp.path(),
        &args(&["--metadata-ca-file", &ca]),
        &[("DELTADRIVE_METADATA_PASSWORD", password.clone())],
    )
    .unwrap_or_else(|e| panic!("with the password in the environment: {e}"));
    stop(c);
    // No password: refused by the database.
    let e = start_scaleout(tmp.path(), &args(&["--metadata-ca-file", &ca]), &[])
        .expect_err("started without a password");
    assert!(e.contains("password"), "{e}");
    // A CA that did not sign the database's certificate: refused before the password goes.
    let e = start_scaleout(
        tmp.path(),
        &args(&[
            "--metadata-password-file",
            &pw_arg,
            "--metadata-ca-file",
            &other_ca,
        ]),
        &[],
    )
    .expect_err("started with a certificate its CA did not sign");
    assert!(e.to_lowercase().contains("certificate"), "{e}");
}
