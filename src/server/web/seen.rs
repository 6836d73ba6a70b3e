//! When each device was last seen by this process: every request authenticated with a device
//! token marks its device, and a device in a long poll counts as online while it waits.
//!
//! Kept in memory only (lost at a restart, per replica): "last seen" on the web's device page is
//! what this server process saw; the backend keeps the last login time.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;

/// A device seen within this long counts as online.
pub const ONLINE_WITHIN: Duration = Duration::from_secs(90);

/// Last request time (ms since the epoch) per (user, device).
#[derive(Default)]
pub struct Seen {
    map: Mutex<HashMap<(String, String), i64>>,
}

impl Seen {
    /// Marks `device` of `user` as seen at `now_ms`.
    pub fn touch(&self, user: &str, device: &str, now_ms: i64) {
        let mut map = self.map.lock();
        match map.get_mut(&(user.to_string(), device.to_string())) {
            Some(t) => *t = (*t).max(now_ms),
            None => {
                map.insert((user.to_string(), device.to_string()), now_ms);
            }
        }
    }

    /// When `device` of `user` was last seen, if since this process started.
    pub fn last(&self, user: &str, device: &str) -> Option<i64> {
        self.map
            .lock()
            .get(&(user.to_string(), device.to_string()))
            .copied()
    }
}
