//! A TCP proxy for tests, between a device and the server: it can pace what the server sends
//! (a slow link) and hold it (a stalled server: connections stay open, nothing more arrives),
//! and release it again. Threads only; stopped on drop (every held connection is closed).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Default)]
struct State {
    stop: AtomicBool,
    /// While set, a connection that has sent `hold_after` bytes to the client sends no more.
    hold: AtomicBool,
    hold_after: AtomicU64,
    /// Bytes per second each connection sends to the client (0: no limit).
    rate: AtomicU64,
    /// Connections waiting in a hold right now.
    held: AtomicUsize,
    /// Bytes sent to clients in all.
    sent: AtomicU64,
}

/// A running proxy; `url` is what the device talks to.
pub struct Proxy {
    pub url: String,
    state: Arc<State>,
}

impl Proxy {
    /// Proxies `http://127.0.0.1:PORT` to the server at `upstream` (`http://host:port`).
    pub fn start(upstream: &str) -> Proxy {
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        let url = format!("http://{}", listener.local_addr().unwrap());
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(State::default());
        let st = Arc::clone(&state);
        std::thread::spawn(move || {
            while !st.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        if let Ok(server) = TcpStream::connect(&upstream) {
                            connect(client, server, Arc::clone(&st));
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy { url, state }
    }

    /// Paces what each connection sends to the client at `bytes_per_s` (0: no limit).
    pub fn pace(&self, bytes_per_s: u64) {
        self.state.rate.store(bytes_per_s, Ordering::Relaxed);
    }

    /// Holds every connection once it has sent `after` bytes to the client.
    pub fn hold(&self, after: u64) {
        self.state.hold_after.store(after, Ordering::Relaxed);
        self.state.hold.store(true, Ordering::Relaxed);
    }

    pub fn release(&self) {
        self.state.hold.store(false, Ordering::Relaxed);
    }

    /// Connections held right now.
    pub fn held(&self) -> usize {
        self.state.held.load(Ordering::Relaxed)
    }

    /// Bytes sent to clients so far.
    pub fn sent(&self) -> u64 {
        self.state.sent.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.hold.store(false, Ordering::Relaxed);
        self.state.stop.store(true, Ordering::Relaxed);
    }
}

fn connect(client: TcpStream, server: TcpStream, st: Arc<State>) {
    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    // Client to server: as it comes.
    {
        let st = Arc::clone(&st);
        let (mut from, mut to) = (c2, s2);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            // A read timeout lets the pump see `stop`.
            let _ = from.set_read_timeout(Some(Duration::from_millis(200)));
            loop {
                if st.stop.load(Ordering::Relaxed) {
                    break;
                }
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        });
    }
    // Server to client: paced and holdable.
    std::thread::spawn(move || {
        let (mut from, mut to) = (server, client);
        let _ = from.set_read_timeout(Some(Duration::from_millis(200)));
        let mut buf = vec![0u8; 16 << 10];
        let mut sent = 0u64;
        loop {
            if st.stop.load(Ordering::Relaxed) {
                break;
            }
            let mut counted = false;
            while st.hold.load(Ordering::Relaxed)
                && sent >= st.hold_after.load(Ordering::Relaxed)
                && !st.stop.load(Ordering::Relaxed)
            {
                if !counted {
                    st.held.fetch_add(1, Ordering::Relaxed);
                    counted = true;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if counted {
                st.held.fetch_sub(1, Ordering::Relaxed);
            }
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(_) => break,
            };
            let rate = st.rate.load(Ordering::Relaxed);
            if rate > 0 {
                std::thread::sleep(Duration::from_secs_f64(n as f64 / rate as f64));
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            sent += n as u64;
            st.sent.fetch_add(n as u64, Ordering::Relaxed);
        }
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    });
}
