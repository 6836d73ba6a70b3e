//! Who may knock, and how often: the server's defences against strangers, before any request
//! reaches a backend or a password hash.
//!
//! Owns [`AccessConfig`] (the limits, all server options with defaults), [`LoginLimiter`] (tries
//! per client address and per user name, refused with 429 and `Retry-After` before any password
//! hashing), [`PasswordPool`] (argon2 on a few threads of its own with a short queue, so a
//! flood of password checks never occupies tokio's blocking pool that every RocksDB call uses),
//! and [`Guarded`] (the connection acceptor: a cap on open connections, and an idle timeout on
//! every socket, under TLS too).
//!
//! What always holds: a refused try costs no hashing and no backend call; a successful login
//! gives its charge back, so a user who types the right password is never slowed by their own
//! earlier tries; the limiter's memory is bounded (expired entries are dropped, and past
//! `MAX_KEYS` live keys new ones are refused).

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The limits of [`super::ServerConfig`] that face strangers.
#[derive(Clone, Debug)]
pub struct AccessConfig {
    /// Login (and password-check) tries per minute from one client address (IPv6: per /64);
    /// also the burst.
    pub login_per_address_per_minute: u32,
    /// Login tries per minute for one user name; also the burst.
    pub login_per_user_per_minute: u32,
    /// Threads that run argon2 (each check holds ~19 MiB while it runs).
    pub password_threads: usize,
    /// Password checks that may wait for a thread; beyond, 429 at once.
    pub password_queue: usize,
    /// The largest JSON request body (login, admin and password routes), refused with 413 before
    /// authentication.
    pub max_json_bytes: usize,
    /// Longest wait for a request's headers (HTTP/1; also closes keep-alive connections that
    /// stay idle this long).
    pub header_read_timeout: Duration,
    /// A connection on which no byte moves for this long is closed (longer than a long poll).
    pub idle_timeout: Duration,
    /// Open connections at most; further ones are closed at once.
    pub max_connections: usize,
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            login_per_address_per_minute: 30,
            login_per_user_per_minute: 10,
            password_threads: 2,
            password_queue: 16,
            max_json_bytes: 64 << 10,
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            max_connections: 1000,
        }
    }
}

/// Live keys a limiter keeps at most (each ~100 bytes).
const MAX_KEYS: usize = 100_000;

/// A keyed GCRA limiter (the algorithm of the `governor` crate) that can give a charge back,
/// which `governor` cannot: a successful login must not count against its user.
pub struct KeyedLimiter<K> {
    /// Time one try costs.
    period: Duration,
    /// How far ahead of now the theoretical arrival time may run (burst × period).
    tolerance: Duration,
    tats: parking_lot::Mutex<HashMap<K, Instant>>,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// `per_minute` tries a minute, with a burst of as many.
    pub fn per_minute(per_minute: u32) -> Self {
        let per_minute = per_minute.max(1);
        let period = Duration::from_secs(60) / per_minute;
        KeyedLimiter {
            period,
            tolerance: period * per_minute,
            tats: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    /// Counts one try of `key`; `Err(wait)` when it is over the limit (nothing is counted).
    pub fn charge(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let mut tats = self.tats.lock();
        if tats.len() >= MAX_KEYS && !tats.contains_key(key) {
            tats.retain(|_, tat| *tat > now);
            if tats.len() >= MAX_KEYS {
                return Err(self.period);
            }
        }
        let tat = tats.get(key).copied().unwrap_or(now).max(now);
        let next = tat + self.period;
        let ahead = next - now;
        if ahead > self.tolerance {
            return Err(ahead - self.tolerance);
        }
        tats.insert(key.clone(), next);
        Ok(())
    }

    /// Gives one charge of `key` back.
    pub fn refund(&self, key: &K, now: Instant) {
        let mut tats = self.tats.lock();
        if let Some(tat) = tats.get_mut(key) {
            *tat = tat.checked_sub(self.period).unwrap_or(now).max(now);
            if *tat <= now {
                tats.remove(key);
            }
        }
    }
}

/// The key of a client address: the address itself, or its /64 for IPv6 (one host usually owns
/// a whole /64).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Why a password check was not run.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("too many login attempts from this address; retry in {} s", .0.as_secs().max(1))]
    Address(Duration),
    #[error("too many login attempts for this user; retry in {} s", .0.as_secs().max(1))]
    User(Duration),
    #[error("too many password checks in progress; retry in a second")]
    Busy,
}

// Here rather than in `error.rs`, which the append fuzz target includes without this module.
impl From<Refused> for super::error::ApiError {
    fn from(r: Refused) -> Self {
        super::error::ApiError::TooManyRequests {
            retry_after_secs: r.retry_after_secs(),
            message: r.to_string(),
        }
    }
}

impl Refused {
    /// Seconds for `Retry-After` (at least 1).
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            Refused::Address(d) | Refused::User(d) => d.as_secs_f64().ceil().max(1.0) as u64,
            Refused::Busy => 1,
        }
    }
}

/// Login tries counted per client address and per user name.
pub struct LoginLimiter {
    by_address: KeyedLimiter<IpAddr>,
    by_user: KeyedLimiter<String>,
}

/// The charges of one try, given back by [`LoginLimiter::succeeded`].
pub struct Charge {
    address: IpAddr,
    user: String,
}

impl LoginLimiter {
    pub fn new(c: &AccessConfig) -> Self {
        LoginLimiter {
            by_address: KeyedLimiter::per_minute(c.login_per_address_per_minute),
            by_user: KeyedLimiter::per_minute(c.login_per_user_per_minute),
        }
    }

    /// Counts a try of `user` from `ip`, or refuses it.
    pub fn try_login(&self, ip: IpAddr, user: &str) -> Result<Charge, Refused> {
        let now = Instant::now();
        let address = address_key(ip);
        self.by_address
            .charge(&address, now)
            .map_err(Refused::Address)?;
        let user = user.to_string();
        if let Err(wait) = self.by_user.charge(&user, now) {
            self.by_address.refund(&address, now);
            return Err(Refused::User(wait));
        }
        Ok(Charge { address, user })
    }

    /// The try succeeded: it does not count.
    pub fn succeeded(&self, charge: Charge) {
        let now = Instant::now();
        self.by_address.refund(&charge.address, now);
        self.by_user.refund(&charge.user, now);
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// argon2 on threads of its own, with a bounded queue in front.
pub struct PasswordPool {
    jobs: std::sync::mpsc::SyncSender<Job>,
}

impl PasswordPool {
    /// Starts `threads` threads (at least one) and a queue of `queue` waiting checks.
    ///
    /// # Errors
    /// A thread cannot be started.
    pub fn new(threads: usize, queue: usize) -> io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(queue);
        let rx = Arc::new(parking_lot::Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("password-{i}"))
                .spawn(move || loop {
                    let job = rx.lock().recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => break,
                    }
                })?;
        }
        Ok(PasswordPool { jobs: tx })
    }

    /// Runs `f` on a password thread; `Busy` when the queue is full.
    pub async fn run<T, F>(&self, f: F) -> Result<T, Refused>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .try_send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| Refused::Busy)?;
        rx.await.map_err(|_| Refused::Busy)
    }
}

/// The connection acceptor: a slot of the connection cap and an idle timeout for every socket,
/// around `inner` (the plain acceptor; TLS goes on top of this one).
#[derive(Clone)]
pub struct Guarded<A> {
    inner: A,
    slots: Arc<Semaphore>,
    idle: Duration,
}

impl<A> Guarded<A> {
    pub fn new(inner: A, max_connections: usize, idle: Duration) -> Self {
        Guarded {
            inner,
            slots: Arc::new(Semaphore::new(max_connections.max(1))),
            idle,
        }
    }
}

/// A socket holding its slot of the connection cap until it is dropped, closed after a read or
/// a write that waits longer than the idle timeout.
pub struct GuardedStream<S> {
    stream: Pin<Box<tokio_io_timeout::TimeoutStream<S>>>,
    _slot: OwnedSemaphorePermit,
}

impl<S: AsyncRead + AsyncWrite> AsyncRead for GuardedStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.stream.as_mut().poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite> AsyncWrite for GuardedStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        self.stream.as_mut().poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.stream.as_mut().poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.stream.as_mut().poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        self.stream.as_mut().poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl<A, I, S> axum_server::accept::Accept<I, S> for Guarded<A>
where
    A: axum_server::accept::Accept<I, S> + Clone + Send + Sync + 'static,
    A::Stream: AsyncRead + AsyncWrite + Send + 'static,
    A::Future: Send + 'static,
    A::Service: Send + 'static,
{
    type Stream = GuardedStream<A::Stream>;
    type Service = A::Service;
    type Future = Pin<Box<dyn Future<Output = io::Result<(Self::Stream, Self::Service)>> + Send>>;

    fn accept(&self, stream: I, service: S) -> Self::Future {
        // Taken before anything else: a connection over the cap is closed at once.
        let slot = self.slots.clone().try_acquire_owned();
        let idle = self.idle;
        let accepted = match slot {
            Ok(slot) => Ok((slot, self.inner.accept(stream, service))),
            Err(_) => Err(()),
        };
        Box::pin(async move {
            let (slot, accepted) = accepted.map_err(|()| {
                io::Error::new(io::ErrorKind::ConnectionRefused, "connection limit reached")
            })?;
            let (stream, service) = accepted.await?;
            let mut timed = tokio_io_timeout::TimeoutStream::new(stream);
            timed.set_read_timeout(Some(idle));
            timed.set_write_timeout(Some(idle));
            Ok((
                GuardedStream {
                    stream: Box::pin(timed),
                    _slot: slot,
                },
                service,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_tries_wait_and_a_refund_gives_one_back() {
        let l = KeyedLimiter::<u8>::per_minute(3);
        let t0 = Instant::now();
        for _ in 0..3 {
            l.charge(&1, t0).expect("within the burst");
        }
        let wait = l.charge(&1, t0).expect_err("past the burst");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        l.charge(&2, t0).expect("another key has its own budget");
        l.refund(&1, t0);
        l.charge(&1, t0).expect("the refunded try is free again");
        l.charge(&1, t0 + Duration::from_secs(20))
            .expect("one period later one more try");
    }

    #[test]
    fn ipv6_addresses_count_per_64() {
        let a: IpAddr = "2001:db8:1:2:3:4:5:6".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        let m: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(address_key(m), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn a_user_refusal_gives_the_address_charge_back() {
        let c = AccessConfig {
            login_per_address_per_minute: 5,
            login_per_user_per_minute: 1,
            ..AccessConfig::default()
        };
        let l = LoginLimiter::new(&c);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        l.try_login(ip, "bob").expect("first try");
        assert!(matches!(l.try_login(ip, "bob"), Err(Refused::User(_))));
        for u in ["c1", "c2", "c3", "c4"] {
            l.try_login(ip, u).expect("within the address's budget");
        }
        // 1 (bob) + 4 tries: the refused bob try did not count against the address.
        assert!(matches!(l.try_login(ip, "dave"), Err(Refused::Address(_))));
    }

    #[tokio::test]
    async fn the_password_pool_refuses_when_its_queue_is_full() {
        let pool = Arc::new(PasswordPool::new(1, 1).unwrap());
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let go_rx = Arc::new(parking_lot::Mutex::new(go_rx));
        let g = go_rx.clone();
        let p = pool.clone();
        let running = tokio::spawn(async move { p.run(move || g.lock().recv().is_ok()).await });
        // Wait until the thread holds the first job, then fill the queue.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let p = pool.clone();
        let queued = tokio::spawn(async move { p.run(|| 7).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(matches!(pool.run(|| 8).await, Err(Refused::Busy)));
        go_tx.send(()).unwrap();
        assert!(running.await.unwrap().unwrap());
        assert_eq!(queued.await.unwrap().unwrap(), 7);
        assert_eq!(pool.run(|| 9).await.unwrap(), 9);
    }
}
