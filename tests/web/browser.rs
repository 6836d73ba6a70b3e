//! A headless Chromium driven through WebDriver (`/usr/bin/chromedriver`, from Debian's
//! `chromium-driver`), for the web side's browser tests. The protocol is a handful of JSON
//! calls, spoken here with the reqwest the tests already build (no WebDriver crate, no browser
//! downloaded at run time). The driver and the browser run in their own process group, killed
//! on drop, also when the test panics; the driver's log is printed then.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    http: reqwest::Client,
    driver: Child,
    session: String,
    dir: tempfile::TempDir,
    /// Where the browser saves downloads.
    pub downloads: PathBuf,
}

impl Browser {
    /// Starts chromedriver on a free port and a headless Chromium with a fresh profile.
    pub async fn start() -> Browser {
        // Everything that may panic comes before the driver starts or after `Browser` owns it
        // (its drop kills it).
        deltadrive::server::install_crypto_provider();
        let http = reqwest::Client::new();
        let dir = tempfile::tempdir().expect("temp dir");
        let downloads = dir.path().join("downloads");
        std::fs::create_dir_all(&downloads).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.path().join("chromedriver.log")).unwrap();
        let driver = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .process_group(0)
            .spawn()
            .expect("start /usr/bin/chromedriver (apt install chromium chromium-driver)");
        let mut b = Browser {
            http,
            driver,
            session: format!("http://127.0.0.1:{port}"),
            dir,
            downloads,
        };
        let start = Instant::now();
        loop {
            let ready = b
                .http
                .get(format!("{}/status", b.session))
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success());
            if ready.is_some() {
                break;
            }
            if start.elapsed() > Duration::from_secs(20) {
                b.print_log();
                panic!("chromedriver did not answer within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = b.dir.path().join("profile");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "unhandledPromptBehavior": "accept",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1100,800",
                    format!("--user-data-dir={}", profile.display()),
                ],
                "prefs": {
                    "download.default_directory": b.downloads.display().to_string(),
                    "download.prompt_for_download": false,
                },
            },
        }}});
        let v = b.call("POST", "/session", caps).await;
        let id = v["sessionId"].as_str().expect("a session id").to_string();
        b.session = format!("{}/session/{id}", b.session);
        b.call(
            "POST",
            "/chromium/send_command",
            json!({"cmd": "Page.setDownloadBehavior",
                   "params": {"behavior": "allow", "downloadPath": b.downloads.display().to_string()}}),
        )
        .await;
        b
    }

    fn print_log(&self) {
        let log =
            std::fs::read_to_string(self.dir.path().join("chromedriver.log")).unwrap_or_default();
        eprintln!("===== chromedriver log =====\n{log}===== end of chromedriver log =====");
    }

    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.session);
        let req = match method {
            "GET" => self.http.get(&url),
            "DELETE" => self.http.delete(&url),
            _ => self.http.post(&url).json(&body),
        };
        let r = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            panic!("WebDriver {method} {path}: {status} {v}");
        }
        v["value"].clone()
    }

    pub async fn goto(&self, url: &str) {
        self.call("POST", "/url", json!({ "url": url })).await;
    }

    pub async fn url(&self) -> String {
        self.call("GET", "/url", Value::Null)
            .await
            .as_str()
            .unwrap()
            .to_string()
    }

    pub async fn source(&self) -> String {
        self.call("GET", "/source", Value::Null)
            .await
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The first element matching `css`, waiting up to 10 s for it.
    pub async fn find(&self, css: &str) -> String {
        self.find_by("css selector", css).await
    }

    /// The first link whose text is `text`, waiting up to 10 s for it.
    pub async fn click_link(&self, text: &str) {
        let e = self.find_by("link text", text).await;
        self.call("POST", &format!("/element/{e}/click"), json!({}))
            .await;
    }

    /// Types `path` into the file input `css` (the browser uploads that file).
    pub async fn choose_file(&self, css: &str, path: &Path) {
        let e = self.find(css).await;
        self.call(
            "POST",
            &format!("/element/{e}/value"),
            json!({ "text": path.display().to_string() }),
        )
        .await;
    }

    async fn find_by(&self, using: &str, css: &str) -> String {
        let start = Instant::now();
        loop {
            let url = format!("{}/element", self.session);
            let r = self
                .http
                .post(&url)
                .json(&json!({"using": using, "value": css}))
                .send()
                .await
                .expect("find");
            if r.status().is_success() {
                let v: Value = r.json().await.unwrap();
                return v["value"][ELEMENT].as_str().unwrap().to_string();
            }
            if start.elapsed() > Duration::from_secs(10) {
                let page = self.source().await;
                panic!("no element {css} in {}:\n{page}", self.url().await);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.call("POST", &format!("/element/{e}/click"), json!({}))
            .await;
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.call("POST", &format!("/element/{e}/clear"), json!({}))
            .await;
        self.call(
            "POST",
            &format!("/element/{e}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    /// Waits up to 10 s for the page to contain `text`.
    pub async fn wait_for_text(&self, text: &str) -> String {
        let start = Instant::now();
        loop {
            let page = self.source().await;
            if page.contains(text) {
                return page;
            }
            if start.elapsed() > Duration::from_secs(10) {
                panic!("no {text:?} in {}:\n{page}", self.url().await);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn set_size(&self, width: u32, height: u32) {
        self.call(
            "POST",
            "/window/rect",
            json!({"width": width, "height": height}),
        )
        .await;
    }

    /// Saves a PNG of the page to `dir/name` when `dir` is given.
    pub async fn screenshot(&self, dir: Option<&Path>, name: &str) {
        use base64::Engine;
        let Some(dir) = dir else { return };
        let v = self.call("GET", "/screenshot", Value::Null).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap();
        std::fs::write(dir.join(name), png).unwrap();
    }

    /// Waits up to 10 s for a finished download named `name`; returns its bytes.
    pub async fn downloaded(&self, name: &str) -> Vec<u8> {
        let p = self.downloads.join(name);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(b) = std::fs::read(&p) {
                return b;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let listing: Vec<_> = std::fs::read_dir(&self.downloads)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        panic!(
            "no download {name} in {}: {listing:?}",
            self.downloads.display()
        );
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_log();
        }
        // SAFETY: kill(2) on the process group this test started (the driver's, holding the
        // browser too).
        unsafe {
            libc::kill(-(self.driver.id() as i32), libc::SIGKILL);
        }
        let _ = self.driver.wait();
    }
}
