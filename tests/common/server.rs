//! Test harness: starts a real `deltadrive server` process on 127.0.0.1 with a temporary data
//! folder and kills it on drop (also on panic, printing its log when the test failed).
//!
//! Backend-agnostic: [`TestServer::start`] asks [`backend_args`] how to start the server, chosen
//! by `DELTADRIVE_TEST_BACKEND` (`embedded`, or `postgres_s3` under `tests/scaleout-env.sh`), so
//! the same suite runs on any backend.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use deltadrive::client::Client;

/// The backend the suite runs against: `DELTADRIVE_TEST_BACKEND` (default `embedded`).
pub fn backend_name() -> String {
    std::env::var("DELTADRIVE_TEST_BACKEND").unwrap_or_else(|_| "embedded".to_string())
}

/// The environment `tests/scaleout-env.sh` exports: (PostgreSQL URL, S3 endpoint, bucket).
/// Panics when it is missing, so a run that asked for `postgres_s3` never silently skips.
pub fn scaleout_env() -> (String, String, String) {
    let get = |k: &str| {
        std::env::var(k).unwrap_or_else(|_| {
            panic!("{k} is unset: run the postgres_s3 tests under tests/scaleout-env.sh")
        })
    };
    (
        get("DELTADRIVE_TEST_PG_URL"),
        get("DELTADRIVE_TEST_S3_ENDPOINT"),
        get("DELTADRIVE_TEST_S3_BUCKET"),
    )
}

/// Extra server arguments selecting the backend under test. With `postgres_s3` every data folder
/// gets its own schema and bucket prefix (derived from the folder, so a restart finds its state)
/// and the admin token is written to `DATA/admin.token`.
pub fn backend_args(data: &Path) -> Vec<String> {
    match backend_name().as_str() {
        "embedded" => vec!["--data".into(), data.display().to_string()],
        "postgres_s3" => {
            let (url, endpoint, bucket) = scaleout_env();
            std::fs::create_dir_all(data).expect("data folder");
            let schema = format!(
                "t_{}",
                &blake3::hash(data.display().to_string().as_bytes()).to_hex()[..20]
            );
            vec![
                "--metadata".into(),
                url,
                "--metadata-schema".into(),
                schema.clone(),
                "--objects".into(),
                format!("s3://{bucket}/{schema}"),
                "--s3-endpoint".into(),
                endpoint,
                "--admin-token-file".into(),
                data.join("admin.token").display().to_string(),
            ]
        }
        other => panic!("DELTADRIVE_TEST_BACKEND={other} is not supported by this build"),
    }
}

/// A running server process.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub admin_token: String,
    child: Option<Child>,
    extra: Vec<String>,
    /// Certificate, key, and the CA clients trust.
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
    starts: usize,
    /// Another server's data folder: this one is a replica on the same storage.
    shared_data: Option<PathBuf>,
}

impl TestServer {
    /// Starts a server with default settings.
    pub fn start() -> TestServer {
        Self::start_with(&[])
    }

    /// Starts a server with extra command-line arguments.
    pub fn start_with(extra: &[&str]) -> TestServer {
        Self::start_full(extra, None)
    }

    /// Starts an HTTPS server with the given certificate and key.
    pub fn start_full(extra: &[&str], tls: Option<(PathBuf, PathBuf, PathBuf)>) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = TestServer {
            dir,
            url: String::new(),
            admin_token: String::new(),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            tls,
            starts: 0,
            shared_data: None,
        };
        s.spawn();
        s
    }

    /// Creates user `user` (if needed) and logs `home` in to this server as device `device`.
    pub fn login(&self, home: &Path, user: &str, device: &str) {
        let dir = tempfile::tempdir().unwrap();
        let (tok, pw) = (dir.path().join("admin.token"), dir.path().join("pw"));
        std::fs::write(&tok, &self.admin_token).unwrap();
        std::fs::write(&pw, "correct horse battery staple").unwrap();
        let (tok, pw) = (tok.to_str().unwrap(), pw.to_str().unwrap());
        let out = super::run(&[
            "admin",
            "--server",
            &self.url,
            "--admin-token-file",
            tok,
            "user",
            "add",
            user,
            "--password-file",
            pw,
        ]);
        assert!(
            out.status.success() || String::from_utf8_lossy(&out.stderr).contains("exists"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = super::run(&[
            "login",
            "--server",
            &self.url,
            "--user",
            user,
            "--password-file",
            pw,
            "--device",
            device,
            "--home",
            home.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts another replica on `other`'s storage (only meaningful for a shared backend such
    /// as `postgres_s3`); it uses the same admin token.
    pub fn start_replica_of(other: &TestServer) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = TestServer {
            dir,
            url: String::new(),
            admin_token: String::new(),
            child: None,
            extra: other.extra.clone(),
            tls: None,
            starts: 0,
            shared_data: Some(other.data_dir()),
        };
        s.spawn();
        s
    }

    pub fn data_dir(&self) -> PathBuf {
        self.shared_data
            .clone()
            .unwrap_or_else(|| self.dir.path().join("data"))
    }

    /// The process id of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("server-{}.log", self.starts))
    }

    fn spawn(&mut self) {
        self.spawn_on("127.0.0.1:0");
    }

    fn spawn_on(&mut self, listen: &str) {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path()).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_deltadrive"));
        cmd.arg("server").arg("--listen").arg(listen);
        cmd.args(backend_args(&self.data_dir()));
        cmd.args(&self.extra);
        if let Some((c, k, _)) = &self.tls {
            cmd.arg("--tls-cert").arg(c).arg("--tls-key").arg(k);
        }
        cmd.env("DELTADRIVE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut child = cmd.spawn().expect("start deltadrive server");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(Ok(line)) = lines.next() {
                if let Some(url) = line.split("listening on ").nth(1) {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        self.child = Some(child);
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => self.url = url,
            Err(_) => {
                self.print_logs();
                panic!("the server did not print its address within 60 s");
            }
        }
        let token =
            std::fs::read_to_string(self.data_dir().join("admin.token")).expect("admin.token");
        self.admin_token = token.trim().to_string();
    }

    /// Replaces the extra command-line arguments of the next (re)start.
    pub fn set_args(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
    }

    /// Kills the server with SIGKILL and waits for it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same data folder (a new port).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Starts the server again on the same data folder and the same address, so logged-in
    /// devices find it again (after [`TestServer::kill9`] or while running).
    pub fn restart_same_port(&mut self) {
        self.kill9();
        let addr = self
            .url
            .split("://")
            .nth(1)
            .unwrap_or(&self.url)
            .trim_end_matches('/')
            .to_string();
        self.spawn_on(&addr);
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Sends SIGTERM and waits up to `timeout` for a clean exit; returns the exit status code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// A client with the admin token.
    pub fn admin(&self) -> Client {
        Client::new(
            &self.url,
            Some(self.admin_token.clone()),
            self.tls.as_ref().map(|(_, _, ca)| ca.as_path()),
        )
        .expect("client")
    }

    /// A client without a token.
    pub fn anon(&self) -> Client {
        Client::new(
            &self.url,
            None,
            self.tls.as_ref().map(|(_, _, ca)| ca.as_path()),
        )
        .expect("client")
    }

    /// Creates `user` and logs in `device`, returning the device's client.
    pub async fn device(&self, user: &str, device: &str) -> Client {
        let admin = self.admin();
        match admin.add_user(user, "password-123").await {
            Ok(_) => {}
            Err(e) if e.status() == Some(reqwest::StatusCode::CONFLICT) => {}
            Err(e) => panic!("add user {user}: {e}"),
        }
        let info = self
            .anon()
            .login(user, "password-123", device)
            .await
            .unwrap_or_else(|e| panic!("login {user}/{device}: {e}"));
        self.anon().with_token(info.token)
    }

    pub fn print_logs(&self) {
        for i in 1..=self.starts {
            let p = self.dir.path().join(format!("server-{i}.log"));
            let log = std::fs::read_to_string(&p).unwrap_or_default();
            eprintln!(
                "===== server log {} =====\n{log}===== end of server log =====",
                p.display()
            );
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            self.print_logs();
        }
    }
}
