//! The outbox goes to the server: a real server process, a real mount logged in to it.
//! Changes made through the mount reach the server's current state; while the server is
//! down the mount keeps working and changes wait in the outbox; once it is back they go out,
//! each transaction exactly once.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::server::TestServer;
use common::{run, Mounted};
use deltadrive::client::DeviceConfig;
use deltadrive::home::Home;

fn pending(home: &Path) -> u64 {
    let out = run(&["status", "--home", home.to_str().unwrap(), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["pending_uploads"]["count"].as_u64().unwrap()
}

/// Waits until the server's files satisfy `ok` and nothing waits in the outbox.
fn wait_until(m: &Mounted, srv: &TestServer, ok: impl Fn(&[(String, u64, String)]) -> bool) {
    let start = Instant::now();
    while !(ok(&server_files(&m.home)) && pending(&m.home) == 0) {
        if start.elapsed() > Duration::from_secs(60) {
            srv.print_logs();
            m.dump_logs();
            panic!("the server did not reach the expected state within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The server's current tree: name → (size, content hash hex).
fn server_files(home: &Path) -> Vec<(String, u64, String)> {
    let cfg = DeviceConfig::load(&Home::resolve(Some(home)).unwrap()).unwrap();
    let client = cfg.client().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let snap = rt.block_on(client.snapshot()).unwrap();
    let mut out: Vec<(String, u64, String)> = snap["objects"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["kind"] == "file")
        .map(|o| {
            (
                o["name"].as_str().unwrap().to_string(),
                o["size"].as_u64().unwrap(),
                o["hash"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

fn hash_hex(b: &[u8]) -> String {
    blake3::hash(b).to_hex().to_string()
}

#[test]
fn changes_reach_the_server_and_offline_changes_go_out_later_exactly_once() {
    let mut srv = TestServer::start();
    let mut m = Mounted::new();
    m.unmount();
    srv.login(&m.home, "ann", "laptop");
    m.mount();

    fs::create_dir(m.path("docs")).unwrap();
    fs::write(m.path("docs/a.txt"), b"hello, server").unwrap();
    let big: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
    fs::write(m.path("docs/big.bin"), &big).unwrap();
    let want = vec![
        ("a.txt".to_string(), 13, hash_hex(b"hello, server")),
        ("big.bin".to_string(), big.len() as u64, hash_hex(&big)),
    ];
    wait_until(&m, &srv, |f| f == want.as_slice());

    // An in-place edit travels as a delta and the server's content follows it.
    let f = fs::OpenOptions::new()
        .write(true)
        .open(m.path("docs/big.bin"))
        .unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"EDIT", 1_000_000).unwrap();
    drop(f);
    let mut edited = big.clone();
    edited[1_000_000..1_000_004].copy_from_slice(b"EDIT");
    let want = (
        "big.bin".to_string(),
        edited.len() as u64,
        hash_hex(&edited),
    );
    wait_until(&m, &srv, |f| f.contains(&want));

    // The server goes away: the mount stays writable and the change waits.
    srv.kill9();
    fs::write(m.path("docs/offline.txt"), b"written offline").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        pending(&m.home) > 0,
        "the offline change waits in the outbox"
    );
    assert_eq!(
        fs::read(m.path("docs/offline.txt")).unwrap(),
        b"written offline"
    );
    let status = run(&["status", "--home", m.home.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("unreachable"));

    // Back (on a new port): point the device at it and mount again; the outbox drains.
    srv.restart();
    m.unmount();
    let home = Home::resolve(Some(&m.home)).unwrap();
    let mut cfg = DeviceConfig::load(&home).unwrap();
    cfg.server_url = srv.url.clone();
    cfg.storage_url = srv.url.clone();
    cfg.save(&home).unwrap();
    m.mount();
    let want = ("offline.txt".to_string(), 15, hash_hex(b"written offline"));
    wait_until(&m, &srv, |f| f.contains(&want));

    // Exactly once: the server's log holds one entry per transaction the device sealed.
    let cfg = DeviceConfig::load(&home).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let page = rt
        .block_on(cfg.client().unwrap().read_log(0, 1000))
        .unwrap();
    let mut ids: Vec<[u8; 16]> = page
        .entries
        .iter()
        .map(|(_, b)| deltadrive::changelog::decode_transaction(b).unwrap().id)
        .collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "no transaction stored twice");
}
