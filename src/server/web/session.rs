//! Web sessions: a random 256-bit token in a cookie, kept in this process's memory as its
//! BLAKE3 hash with the user, the user's password hash at sign-in, a CSRF token and two
//! deadlines (idle and absolute).
//!
//! Why in memory and not on the backend: a session is cheap to lose (the user signs in again)
//! and this keeps the backend trait unchanged; the cost is that a restart signs everyone out and
//! that several replicas behind one address need sticky sessions (docs/web.md says so).
//!
//! What always holds: a session is only as good as its user's password: every request re-reads
//! the user, so removing the user or changing the password ends every session of the user at
//! once (the changer's own session is re-keyed to the new hash). The store holds at most
//! [`MAX_SESSIONS`] sessions; expired ones are dropped before a new one is refused.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::server::auth::{hash_token, new_token};
use crate::server::error::ApiError;

/// Most sessions kept at once (a sign-in beyond this is refused with 503).
pub const MAX_SESSIONS: usize = 10_000;
/// A session unused this long ends.
pub const IDLE: Duration = Duration::from_secs(2 * 3600);
/// A session ends this long after its sign-in, used or not.
pub const LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// One signed-in browser.
#[derive(Clone, Debug)]
pub struct Session {
    pub user: String,
    /// The user's password hash when the session began.
    pub password_hash: String,
    /// The token every form of this session posts back.
    pub csrf: String,
    created: Instant,
    last: Instant,
}

/// The sessions of this process, by token hash.
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
    /// The key of values this process binds to something ([`Sessions::bind`]).
    secret: [u8; 32],
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            map: Mutex::default(),
            secret: rand::random(),
        }
    }
}

impl Sessions {
    /// Starts a session for `user`; returns its cookie token (shown once, kept hashed).
    ///
    /// # Errors
    /// `Busy` when [`MAX_SESSIONS`] live sessions exist.
    pub fn start(&self, user: &str, password_hash: &str) -> Result<String, ApiError> {
        let now = Instant::now();
        let mut map = self.map.lock();
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, s| live(s, now));
        }
        if map.len() >= MAX_SESSIONS {
            return Err(ApiError::Busy(
                "too many signed-in browsers on this server: try again later".into(),
            ));
        }
        let token = new_token();
        map.insert(
            hash_token(&token),
            Session {
                user: user.to_string(),
                password_hash: password_hash.to_string(),
                csrf: new_token(),
                created: now,
                last: now,
            },
        );
        Ok(token)
    }

    /// The live session of `token` (its idle deadline moves on).
    pub fn get(&self, token: &str) -> Option<(String, Session)> {
        let now = Instant::now();
        let key = hash_token(token);
        let mut map = self.map.lock();
        let s = map.get_mut(&key)?;
        if !live(s, now) {
            map.remove(&key);
            return None;
        }
        s.last = now;
        Some((key, s.clone()))
    }

    /// A value only this process can make for `what` (keyed BLAKE3, hex): a share link's unlock
    /// cookie, bound to the link and its password.
    pub fn bind(&self, what: &str) -> String {
        blake3::keyed_hash(&self.secret, what.as_bytes())
            .to_hex()
            .to_string()
    }

    /// Ends the session with token hash `key`.
    pub fn end(&self, key: &str) {
        self.map.lock().remove(key);
    }

    /// After a password change through session `key`: every other session of `user` ends,
    /// this one carries the new hash.
    pub fn password_changed(&self, user: &str, key: &str, new_hash: &str) {
        let mut map = self.map.lock();
        map.retain(|k, s| s.user != user || k == key);
        if let Some(s) = map.get_mut(key) {
            s.password_hash = new_hash.to_string();
        }
    }
}

fn live(s: &Session, now: Instant) -> bool {
    now.duration_since(s.last) < IDLE && now.duration_since(s.created) < LIFETIME
}

/// Whether two tokens are equal, in time independent of where they differ.
pub fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_end_on_sign_out_and_on_password_change() {
        let s = Sessions::default();
        let a = s.start("ann", "h1").expect("start");
        let b = s.start("ann", "h1").expect("start");
        let c = s.start("bob", "h2").expect("start");
        let (ka, sa) = s.get(&a).expect("live");
        assert_eq!(sa.user, "ann");
        assert_eq!(sa.csrf.len(), 64);
        assert!(s.get("not a token").is_none());
        s.password_changed("ann", &ka, "h3");
        assert_eq!(s.get(&a).expect("kept").1.password_hash, "h3");
        assert!(s.get(&b).is_none(), "the other session of ann ended");
        assert!(s.get(&c).is_some(), "bob's session is untouched");
        s.end(&ka);
        assert!(s.get(&a).is_none());
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token("abcd", "abcd"));
        assert!(!same_token("abcd", "abce"));
        assert!(!same_token("abcd", "abc"));
        assert!(!same_token("", "a"));
    }
}
