//! Prometheus metrics of the server (`GET /metrics`, text format, names start with
//! `deltadrive_`): requests by method (standard ones, else `OTHER`), route and status, bytes in
//! and out, appends, open long polls, errors. Counters only grow; the long-poll gauge is decremented by a guard on drop.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use parking_lot::Mutex;

/// All counters of one server process.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    appends: AtomicU64,
    transactions: AtomicU64,
    long_polls: AtomicI64,
    errors: AtomicU64,
}

/// Keeps the open-long-poll gauge up while alive.
pub struct LongPollGuard(Arc<Metrics>);

impl Drop for LongPollGuard {
    fn drop(&mut self) {
        self.0.long_polls.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    pub fn appended(&self, transactions: usize) {
        self.appends.fetch_add(1, Ordering::Relaxed);
        self.transactions
            .fetch_add(transactions as u64, Ordering::Relaxed);
    }

    pub fn long_poll(self: &Arc<Self>) -> LongPollGuard {
        self.long_polls.fetch_add(1, Ordering::Relaxed);
        LongPollGuard(self.clone())
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# TYPE deltadrive_http_requests_total counter");
        for ((method, route, status), n) in self.requests.lock().iter() {
            let _ = writeln!(
                s,
                "deltadrive_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let l = |s: &mut String, name: &str, kind: &str, v: String| {
            let _ = writeln!(s, "# TYPE {name} {kind}\n{name} {v}");
        };
        l(
            &mut s,
            "deltadrive_http_request_bytes_total",
            "counter",
            self.bytes_in.load(Ordering::Relaxed).to_string(),
        );
        l(
            &mut s,
            "deltadrive_http_response_bytes_total",
            "counter",
            self.bytes_out.load(Ordering::Relaxed).to_string(),
        );
        l(
            &mut s,
            "deltadrive_log_appends_total",
            "counter",
            self.appends.load(Ordering::Relaxed).to_string(),
        );
        l(
            &mut s,
            "deltadrive_log_transactions_total",
            "counter",
            self.transactions.load(Ordering::Relaxed).to_string(),
        );
        l(
            &mut s,
            "deltadrive_long_polls_open",
            "gauge",
            self.long_polls.load(Ordering::Relaxed).to_string(),
        );
        l(
            &mut s,
            "deltadrive_http_errors_total",
            "counter",
            self.errors.load(Ordering::Relaxed).to_string(),
        );
        s
    }
}

fn content_length(h: &axum::http::HeaderMap) -> u64 {
    h.get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The label of a request's method: one of the standard methods, or `OTHER`, so made-up
/// methods cannot grow the metrics without bound.
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

/// Middleware counting every request by matched route and status.
pub async fn track(State(m): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = method_label(req.method()).to_string();
    m.bytes_in
        .fetch_add(content_length(req.headers()), Ordering::Relaxed);
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let out = axum::body::HttpBody::size_hint(resp.body())
        .exact()
        .unwrap_or_else(|| content_length(resp.headers()));
    m.bytes_out.fetch_add(out, Ordering::Relaxed);
    if status >= 400 {
        m.errors.fetch_add(1, Ordering::Relaxed);
    }
    *m.requests
        .lock()
        .entry((method, route, status))
        .or_insert(0) += 1;
    resp
}
