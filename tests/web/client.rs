//! A browser stand-in for the web side's tests: a reqwest client that keeps the session cookie
//! by hand (so tests can also read its attributes, drop it or swap it), follows no redirects,
//! and builds multipart uploads.

use reqwest::header::{HeaderMap, COOKIE, LOCATION, SET_COOKIE};
use reqwest::{Response, StatusCode};

/// One browser: a base URL and, once signed in, a session cookie.
pub struct WebClient {
    pub http: reqwest::Client,
    pub url: String,
    pub cookie: Option<String>,
}

const FORM: &str = "application/x-www-form-urlencoded";

/// An urlencoded form body, as a browser sends it.
pub fn form_body(fields: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The root folder's id.
pub const ROOT: &str = "00000000000000000000000000000000";

impl WebClient {
    pub fn new(url: &str) -> WebClient {
        deltadrive::server::install_crypto_provider();
        WebClient {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
            url: url.trim_end_matches('/').to_string(),
            cookie: None,
        }
    }

    fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(c) = &self.cookie {
            h.insert(COOKIE, format!("dd_session={c}").parse().unwrap());
        }
        h
    }

    /// Posts the sign-in form; keeps the cookie it sets. Returns the response.
    pub async fn sign_in(&mut self, user: &str, password: &str) -> Response {
        let r = self
            .http
            .post(format!("{}/web/login", self.url))
            .header("content-type", FORM)
            .body(form_body(&[("user", user), ("password", password)]))
            .send()
            .await
            .expect("sign-in request");
        if let Some(c) = r.headers().get(SET_COOKIE) {
            let c = c.to_str().unwrap();
            let v = c
                .strip_prefix("dd_session=")
                .and_then(|r| r.split(';').next())
                .unwrap();
            self.cookie = (!v.is_empty()).then(|| v.to_string());
        }
        r
    }

    /// Signs in and checks it worked.
    pub async fn signed_in(url: &str, user: &str, password: &str) -> WebClient {
        let mut w = WebClient::new(url);
        let r = w.sign_in(user, password).await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER, "sign-in of {user}");
        assert!(w.cookie.is_some(), "a session cookie");
        w
    }

    pub async fn get(&self, path: &str) -> Response {
        self.http
            .get(format!("{}{path}", self.url))
            .headers(self.headers())
            .send()
            .await
            .expect("GET")
    }

    pub async fn get_range(&self, path: &str, range: &str) -> Response {
        self.http
            .get(format!("{}{path}", self.url))
            .headers(self.headers())
            .header("range", range)
            .send()
            .await
            .expect("GET")
    }

    pub async fn text(&self, path: &str) -> (StatusCode, String) {
        let r = self.get(path).await;
        (r.status(), r.text().await.unwrap_or_default())
    }

    pub async fn post(&self, path: &str, form: &[(&str, &str)]) -> Response {
        self.http
            .post(format!("{}{path}", self.url))
            .headers(self.headers())
            .header("content-type", FORM)
            .body(form_body(form))
            .send()
            .await
            .expect("POST")
    }

    /// The CSRF token of this session (from the files page).
    pub async fn csrf(&self) -> String {
        let (s, page) = self.text("/web/files").await;
        assert_eq!(s, StatusCode::OK, "{page}");
        let at = page.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
        page[at..at + 64].to_string()
    }

    /// Posts a multipart upload of `name` into `folder`, with `csrf` (if any) first.
    pub async fn upload(
        &self,
        folder: &str,
        name: &[u8],
        content: &[u8],
        csrf: Option<&str>,
    ) -> Response {
        self.upload_as(folder, None, name, content, csrf).await
    }

    /// As [`WebClient::upload`], with the form's "save as" field set to `save_as`.
    pub async fn upload_as(
        &self,
        folder: &str,
        save_as: Option<&[u8]>,
        name: &[u8],
        content: &[u8],
        csrf: Option<&str>,
    ) -> Response {
        let b = "deltadrive-test-boundary-7e1c";
        let mut body = Vec::new();
        if let Some(c) = csrf {
            body.extend_from_slice(
                format!("--{b}\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\n{c}\r\n")
                    .as_bytes(),
            );
        }
        if let Some(n) = save_as {
            body.extend_from_slice(
                format!("--{b}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\n")
                    .as_bytes(),
            );
            body.extend_from_slice(n);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(
            format!("--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"")
                .as_bytes(),
        );
        body.extend_from_slice(name);
        body.extend_from_slice(b"\"\r\nContent-Type: application/octet-stream\r\n\r\n");
        body.extend_from_slice(content);
        body.extend_from_slice(format!("\r\n--{b}--\r\n").as_bytes());
        self.http
            .post(format!("{}/web/files/{folder}/upload", self.url))
            .headers(self.headers())
            .header("content-type", format!("multipart/form-data; boundary={b}"))
            .body(body)
            .send()
            .await
            .expect("upload")
    }
}

/// Where a 303 sends the browser.
pub fn location(r: &Response) -> String {
    r.headers()
        .get(LOCATION)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// Asserts `r` sends the browser to the sign-in page.
pub fn assert_sign_in(r: &Response, what: &str) {
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "{what}");
    assert_eq!(location(r), "/web/login", "{what}");
}

/// The id of the entry `name` linked from a folder page.
pub fn id_in(page: &str, name: &str) -> String {
    for n in [format!("\">{name}</a>"), format!("\">{name}/</a>")] {
        if let Some(end) = page.find(&n) {
            return page[end - 32..end].to_string();
        }
    }
    panic!("no entry {name} in the page:\n{page}");
}
