//! A change the server refuses for good never wedges the device's other changes (issue 15).
//!
//! A real server started with a small per-file limit (`--max-object-bytes`) refuses a big
//! file (422) and the growth of a synced file past the limit; the device sets both aside
//! (listed by `status --json` with the server's reason) while its later changes, also edits
//! of a file set aside, still reach a second device. The set-aside changes survive a
//! restart of the device, and arrive once the server restarts with the default limit.
//!
//! On a failure the test prints the logs of the server and of every mount.

mod common;

use std::fs;
use std::path::Path;

use common::cluster::{status_json, Cluster};

/// The limit the refusing server runs with; the big files are twice as large.
const LIMIT: u64 = 1_000_000;

/// The set-aside entries `status --json` lists: (path, reason).
fn set_aside(home: &Path) -> Vec<(String, String)> {
    status_json(home)["set_aside"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| {
                    (
                        n["path"].as_str().unwrap_or_default().to_string(),
                        n["reason"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn content(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

#[test]
fn a_change_the_server_refuses_is_set_aside_and_the_later_ones_sync() {
    let mut c = Cluster::new(2);
    // A file both devices have before the server's limit goes down.
    fs::write(c.p(0, "grow.txt"), b"small at first").unwrap();
    c.converge("grow.txt reaches dev1");
    c.srv.set_args(&["--max-object-bytes", &LIMIT.to_string()]);
    c.srv.restart_same_port();

    let big = content(2 * LIMIT as usize, 1);
    let grown = content(2 * LIMIT as usize, 2);
    fs::write(c.p(0, "big.bin"), &big).unwrap();
    fs::write(c.p(0, "grow.txt"), &grown).unwrap();
    let home0 = c.devices[0].home.clone();
    c.wait(
        "status lists both refused changes with the server's reason",
        || {
            let a = set_aside(&home0);
            ["/big.bin", "/grow.txt"].iter().all(|p| {
                a.iter()
                    .any(|(path, reason)| path == p && reason.contains("limit"))
            })
        },
    );

    // Everything after them goes on: a new file, a folder with a file, and a file made
    // too big and then cut below the limit (a later edit of a refused change).
    fs::write(c.p(0, "shrunk.bin"), content(2 * LIMIT as usize, 3)).unwrap();
    let home0b = home0.clone();
    c.wait("shrunk.bin is set aside", || {
        set_aside(&home0b).iter().any(|(p, _)| p == "/shrunk.bin")
    });
    fs::write(c.p(0, "shrunk.bin"), b"now it fits").unwrap();
    fs::write(c.p(0, "after.txt"), b"written after the refusals").unwrap();
    fs::create_dir(c.p(0, "d")).unwrap();
    fs::write(c.p(0, "d/x"), b"x").unwrap();
    c.wait("the later changes reach dev1", || {
        fs::read(c.p(1, "after.txt")).ok().as_deref() == Some(&b"written after the refusals"[..])
            && fs::read(c.p(1, "d/x")).ok().as_deref() == Some(&b"x"[..])
            && fs::read(c.p(1, "shrunk.bin")).ok().as_deref() == Some(&b"now it fits"[..])
    });
    assert!(
        !c.p(1, "big.bin").exists(),
        "the server refused big.bin, yet dev1 has it"
    );
    assert_eq!(
        fs::read(c.p(1, "grow.txt")).unwrap(),
        b"small at first",
        "dev1 has the grown grow.txt the server refused"
    );
    let home0c = home0.clone();
    c.wait("shrunk.bin is no longer set aside once synced", || {
        !set_aside(&home0c).iter().any(|(p, _)| p == "/shrunk.bin")
    });

    // A restart of the device keeps the refused changes: they are refused again.
    c.devices[0].unmount();
    c.devices[0].mount();
    let home0d = home0.clone();
    c.wait("after a restart both are set aside again", || {
        let a = set_aside(&home0d);
        a.iter().any(|(p, _)| p == "/big.bin") && a.iter().any(|(p, _)| p == "/grow.txt")
    });

    // The server takes them once its limit is raised.
    c.srv.set_args(&[]);
    c.srv.restart_same_port();
    let t = c.converge("the set-aside changes arrive after the limit was raised");
    assert!(t.contains_key("big.bin"));
    assert_eq!(fs::read(c.p(1, "big.bin")).unwrap(), big);
    assert_eq!(fs::read(c.p(1, "grow.txt")).unwrap(), grown);
    let home0e = home0.clone();
    c.wait("nothing is set aside any more", || {
        set_aside(&home0e).is_empty()
    });
}
