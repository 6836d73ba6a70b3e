//! An in-memory [`Backend`]: every record in ordered maps behind one mutex, chunks in a map of
//! shared bytes. For tests and the append-path fuzz target (`fuzz/`); nothing survives the
//! process.
//!
//! What always holds: it keeps every promise of the trait that does not name durability (it
//! passes [`super::conformance`]): a commit is all or nothing (checked before anything is
//! changed, then applied under the one lock), a user's sequence numbers have no gaps, the per-user
//! commit lock excludes a second holder, and every commit is announced on the head events.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use super::{
    AppendRecord, Backend, BackendError, BoxFut, ChunkId, CommitBatch, DeviceRecord, DirEntries,
    HeadEvent, HistoryEntry, ObjectState, ShareRecord, TokenRecord, UserLock, UserRecord,
};

/// Everything one user owns.
#[derive(Default)]
struct UserData {
    record: Option<UserRecord>,
    devices: BTreeMap<String, DeviceRecord>,
    log: BTreeMap<u64, Vec<u8>>,
    objects: BTreeMap<[u8; 16], ObjectState>,
    children: BTreeMap<([u8; 16], Vec<u8>), [u8; 16]>,
    history: BTreeMap<([u8; 16], u64), HistoryEntry>,
    idempotency: HashMap<String, AppendRecord>,
}

impl UserData {
    fn head(&self) -> u64 {
        self.log.last_key_value().map_or(0, |(s, _)| *s)
    }
}

#[derive(Default)]
struct State {
    admin_token_hash: Option<String>,
    users: BTreeMap<String, UserData>,
    tokens: HashMap<String, TokenRecord>,
    shares: HashMap<String, ShareRecord>,
    chunks: HashMap<ChunkId, Bytes>,
}

/// The in-memory backend (see the module documentation).
pub struct Memory {
    state: Mutex<State>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    events: tokio::sync::broadcast::Sender<HeadEvent>,
}

impl Default for Memory {
    fn default() -> Self {
        Memory {
            state: Mutex::default(),
            locks: Mutex::default(),
            events: tokio::sync::broadcast::channel(1024).0,
        }
    }
}

impl Memory {
    /// An empty backend.
    pub fn new() -> Memory {
        Memory::default()
    }

    /// Checks, then applies a commit under the one lock, and announces it.
    fn commit_now(&self, user: String, batch: CommitBatch) -> Result<(), BackendError> {
        let mut s = self.state.lock();
        let u = s.users.entry(user.clone()).or_default();
        let found = u.head();
        if found != batch.expected_head {
            return Err(BackendError::HeadMoved {
                expected: batch.expected_head,
                found,
            });
        }
        let mut last = batch.expected_head;
        for (seq, _) in &batch.entries {
            if *seq != last + 1 {
                return Err(BackendError::Corrupt(format!("sequence gap at {seq}")));
            }
            last = *seq;
        }
        // Checked: from here nothing fails, so the commit is whole.
        u.log.extend(batch.entries);
        for id in &batch.delete_objects {
            u.objects.remove(id);
        }
        for o in batch.put_objects {
            u.objects.insert(o.id, o);
        }
        for key in batch.delete_children {
            u.children.remove(&key);
        }
        for (parent, name, child) in batch.put_children {
            u.children.insert((parent, name), child);
        }
        let mut touched = Vec::new();
        for (id, h) in batch.history {
            touched.push(id);
            u.history.insert((id, h.version), h);
        }
        let keep = batch.history_keep.max(1);
        for id in touched {
            let versions: Vec<u64> = u
                .history
                .range((id, 0)..=(id, u64::MAX))
                .map(|((_, v), _)| *v)
                .collect();
            for v in &versions[..versions.len().saturating_sub(keep)] {
                u.history.remove(&(id, *v));
            }
        }
        let (key, rec) = batch.idempotency;
        u.idempotency.insert(key, rec);
        drop(s);
        let _ = self.events.send(HeadEvent::Moved { user, head: last });
        Ok(())
    }

    /// Runs `f` on the state now (nothing here waits), as a backend future.
    fn now<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State) -> Result<T, BackendError>,
    ) -> BoxFut<'_, T> {
        let r = f(&mut self.state.lock());
        Box::pin(async move { r })
    }
}

impl Backend for Memory {
    fn admin_token_hash(&self) -> BoxFut<'_, Option<String>> {
        self.now(|s| Ok(s.admin_token_hash.clone()))
    }

    fn set_admin_token_hash(&self, hash: String) -> BoxFut<'_, ()> {
        self.now(|s| {
            s.admin_token_hash = Some(hash);
            Ok(())
        })
    }

    fn create_user(&self, user: UserRecord) -> BoxFut<'_, ()> {
        self.now(|s| {
            let data = s.users.entry(user.name.clone()).or_default();
            if data.record.is_some() {
                return Err(BackendError::AlreadyExists);
            }
            data.record = Some(user);
            Ok(())
        })
    }

    fn get_user(&self, name: String) -> BoxFut<'_, Option<UserRecord>> {
        self.now(move |s| Ok(s.users.get(&name).and_then(|u| u.record.clone())))
    }

    fn list_users(&self) -> BoxFut<'_, Vec<UserRecord>> {
        self.now(|s| Ok(s.users.values().filter_map(|u| u.record.clone()).collect()))
    }

    fn delete_user(&self, name: String) -> BoxFut<'_, ()> {
        self.now(move |s| {
            if s.users.get(&name).is_none_or(|u| u.record.is_none()) {
                return Err(BackendError::NotFound);
            }
            if let Some(data) = s.users.remove(&name) {
                for d in data.devices.values() {
                    if let Some(h) = &d.token_hash {
                        s.tokens.remove(h);
                    }
                }
            }
            s.shares.retain(|_, l| l.user != name);
            Ok(())
        })
    }

    fn put_device(&self, device: DeviceRecord, old_token_hash: Option<String>) -> BoxFut<'_, ()> {
        self.now(move |s| {
            if s.users.get(&device.user).is_none_or(|u| u.record.is_none()) {
                return Err(BackendError::NotFound);
            }
            if let Some(old) = old_token_hash {
                s.tokens.remove(&old);
            }
            // Every other token of the device goes: one device, one token.
            s.tokens
                .retain(|_, t| !(t.user == device.user && t.device == device.name));
            if let Some(h) = &device.token_hash {
                s.tokens.insert(
                    h.clone(),
                    TokenRecord {
                        user: device.user.clone(),
                        device: device.name.clone(),
                        device_id: device.id.clone(),
                    },
                );
            }
            s.users
                .entry(device.user.clone())
                .or_default()
                .devices
                .insert(device.name.clone(), device);
            Ok(())
        })
    }

    fn set_password(
        &self,
        user: String,
        password_hash: String,
        keep: Option<String>,
    ) -> BoxFut<'_, ()> {
        self.now(move |s| {
            let data = s.users.get_mut(&user).ok_or(BackendError::NotFound)?;
            let rec = data.record.as_mut().ok_or(BackendError::NotFound)?;
            rec.password_hash = password_hash;
            for d in data.devices.values_mut() {
                if keep.as_deref() != Some(d.name.as_str()) {
                    d.token_hash = None;
                }
            }
            s.tokens
                .retain(|_, t| t.user != user || keep.as_deref() == Some(t.device.as_str()));
            Ok(())
        })
    }

    fn get_device(&self, user: String, device: String) -> BoxFut<'_, Option<DeviceRecord>> {
        self.now(move |s| {
            Ok(s.users
                .get(&user)
                .and_then(|u| u.devices.get(&device).cloned()))
        })
    }

    fn list_devices(&self, user: String) -> BoxFut<'_, Vec<DeviceRecord>> {
        self.now(move |s| {
            Ok(s.users
                .get(&user)
                .map(|u| u.devices.values().cloned().collect())
                .unwrap_or_default())
        })
    }

    fn lookup_token(&self, hash: String) -> BoxFut<'_, Option<TokenRecord>> {
        self.now(move |s| Ok(s.tokens.get(&hash).cloned()))
    }

    fn put_share(&self, share: ShareRecord) -> BoxFut<'_, ()> {
        self.now(move |s| {
            if s.users.get(&share.user).is_none_or(|u| u.record.is_none()) {
                return Err(BackendError::NotFound);
            }
            s.shares.insert(share.hash.clone(), share);
            Ok(())
        })
    }

    fn get_share(&self, hash: String) -> BoxFut<'_, Option<ShareRecord>> {
        self.now(move |s| Ok(s.shares.get(&hash).cloned()))
    }

    fn list_shares(&self, user: String) -> BoxFut<'_, Vec<ShareRecord>> {
        self.now(move |s| {
            let mut v: Vec<ShareRecord> = s
                .shares
                .values()
                .filter(|l| l.user == user)
                .cloned()
                .collect();
            v.sort_by(|a, b| (a.created_ms, &a.hash).cmp(&(b.created_ms, &b.hash)));
            Ok(v)
        })
    }

    fn delete_share(&self, user: String, hash: String) -> BoxFut<'_, ()> {
        self.now(move |s| match s.shares.get(&hash) {
            Some(l) if l.user == user => {
                s.shares.remove(&hash);
                Ok(())
            }
            _ => Err(BackendError::NotFound),
        })
    }

    fn lock_user(&self, user: String) -> BoxFut<'_, UserLock> {
        let m = self
            .locks
            .lock()
            .entry(user)
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
            .clone();
        Box::pin(async move { Ok(Box::new(m.lock_owned().await) as UserLock) })
    }

    fn head(&self, user: String) -> BoxFut<'_, u64> {
        self.now(move |s| Ok(s.users.get(&user).map_or(0, UserData::head)))
    }

    fn idempotency(&self, user: String, key: String) -> BoxFut<'_, Option<AppendRecord>> {
        self.now(move |s| {
            Ok(s.users
                .get(&user)
                .and_then(|u| u.idempotency.get(&key).copied()))
        })
    }

    fn get_object(&self, user: String, id: [u8; 16]) -> BoxFut<'_, Option<ObjectState>> {
        self.now(move |s| Ok(s.users.get(&user).and_then(|u| u.objects.get(&id).cloned())))
    }

    fn list_children(&self, user: String, dir: [u8; 16]) -> BoxFut<'_, DirEntries> {
        self.now(move |s| {
            Ok(s.users
                .get(&user)
                .map(|u| {
                    u.children
                        .range((dir, Vec::new())..)
                        .take_while(|((p, _), _)| *p == dir)
                        .map(|((_, name), child)| (name.clone(), *child))
                        .collect()
                })
                .unwrap_or_default())
        })
    }

    fn commit(&self, user: String, batch: CommitBatch) -> BoxFut<'_, ()> {
        let r = self.commit_now(user, batch);
        Box::pin(async move { r })
    }

    fn read_log(
        &self,
        user: String,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFut<'_, Vec<(u64, Vec<u8>)>> {
        self.now(move |s| {
            let mut out = Vec::new();
            let mut bytes = 0usize;
            let Some(u) = s.users.get(&user) else {
                return Ok(out);
            };
            for (seq, v) in u.log.range(after.saturating_add(1)..) {
                if out.len() >= limit || (!out.is_empty() && bytes + v.len() > max_bytes) {
                    break;
                }
                bytes += v.len();
                out.push((*seq, v.clone()));
            }
            Ok(out)
        })
    }

    fn snapshot(&self, user: String) -> BoxFut<'_, (u64, Vec<ObjectState>)> {
        self.now(move |s| {
            Ok(s.users.get(&user).map_or((0, Vec::new()), |u| {
                (u.head(), u.objects.values().cloned().collect())
            }))
        })
    }

    fn history(&self, user: String, id: [u8; 16]) -> BoxFut<'_, Vec<HistoryEntry>> {
        self.now(move |s| {
            Ok(s.users
                .get(&user)
                .map(|u| {
                    u.history
                        .range((id, 0)..=(id, u64::MAX))
                        .map(|(_, h)| h.clone())
                        .collect()
                })
                .unwrap_or_default())
        })
    }

    fn put_chunks(&self, chunks: Vec<(ChunkId, Bytes)>) -> BoxFut<'_, ()> {
        self.now(move |s| {
            for (id, bytes) in chunks {
                s.chunks.entry(id).or_insert(bytes);
            }
            Ok(())
        })
    }

    fn get_chunk(&self, id: ChunkId) -> BoxFut<'_, Vec<u8>> {
        self.now(move |s| {
            s.chunks
                .get(&id)
                .map(|b| b.to_vec())
                .ok_or(BackendError::NotFound)
        })
    }

    fn head_events(&self) -> tokio::sync::broadcast::Receiver<HeadEvent> {
        self.events.subscribe()
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_backend_conformance_suite() {
        crate::server::backend::conformance::run(&super::Memory::new()).await;
    }
}
