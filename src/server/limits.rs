//! Bounds on what one append may cost the server: a work budget per request (bytes read,
//! produced and hashed, plus a fixed cost per op) and a memory budget shared by every append
//! in the process (bytes held for bodies, decoded logs, delta results and new chunks).
//!
//! What always holds: an append charges its work before doing it and reserves its memory
//! before allocating it, so a request whose work is over the budget is refused (413) before the
//! work starts, and the appends in progress never hold more than the memory budget together. A
//! request that would need more than the whole memory budget is refused at once (413); one that
//! must wait for others to finish waits at most [`AppendLimits::memory_wait`], then gets 503
//! with `Retry-After`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;

/// The bounds of appends, given as server options.
#[derive(Clone, Debug)]
pub struct AppendLimits {
    /// Bytes one append may read, produce and hash (with [`OP_WORK_BYTES`] per op).
    pub work_bytes: u64,
    /// Bytes all appends in progress may hold together.
    pub memory_bytes: u64,
    /// How long an append waits for memory held by others before it gets 503.
    pub memory_wait: Duration,
    /// The largest base and result of an rsync delta (both are held whole in memory).
    pub max_rsync_bytes: u64,
}

impl Default for AppendLimits {
    fn default() -> Self {
        AppendLimits {
            work_bytes: 4 << 30,
            memory_bytes: 2 << 30,
            memory_wait: Duration::from_secs(5),
            max_rsync_bytes: 512 << 20,
        }
    }
}

/// The work an op costs besides the bytes it touches (its reads of object states and folder
/// entries, its checks): a log of a million ops costs 1 GiB of work.
pub const OP_WORK_BYTES: u64 = 1024;

/// What `Retry-After` says when an append waited for memory in vain, in seconds.
pub const RETRY_AFTER_SECS: u64 = 2;

/// The memory budget shared by every append of the process (see the module documentation).
/// Counted in KiB, so one reservation may be as large as 4 TiB.
pub struct MemoryBudget {
    permits: Arc<Semaphore>,
    total_kib: u64,
    wait: Duration,
}

fn kib(bytes: u64) -> u64 {
    bytes.div_ceil(1024)
}

impl MemoryBudget {
    /// A budget of `bytes` (at least 1 MiB) where a reservation waits at most `wait`.
    pub fn new(bytes: u64, wait: Duration) -> MemoryBudget {
        let total_kib = kib(bytes)
            .clamp(1024, u64::from(u32::MAX))
            .min(Semaphore::MAX_PERMITS as u64);
        MemoryBudget {
            permits: Arc::new(Semaphore::new(total_kib as usize)),
            total_kib,
            wait,
        }
    }

    /// The budget in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.total_kib * 1024
    }

    /// Bytes not reserved now.
    pub fn available_bytes(&self) -> u64 {
        self.permits.available_permits() as u64 * 1024
    }

    /// An empty reservation, grown with [`MemoryBudget::grow`].
    pub fn reservation(self: &Arc<Self>) -> Reservation {
        Reservation {
            budget: self.clone(),
            permit: None,
            kib: 0,
        }
    }

    /// Adds `bytes` to `r`, waiting for appends in progress to release memory.
    ///
    /// # Errors
    /// 413 if `r` would hold more than the whole budget; 503 if the memory did not come free
    /// within the wait.
    pub async fn grow(&self, r: &mut Reservation, bytes: u64, what: &str) -> Result<(), ApiError> {
        let more = kib(bytes);
        if more == 0 {
            return Ok(());
        }
        let after = r.kib.saturating_add(more);
        if after > self.total_kib {
            return Err(ApiError::OverLimit(format!(
                "this append needs more than the server's memory budget for appends ({} \
                 bytes) for {what}: send smaller change logs",
                self.total_bytes()
            )));
        }
        // Fits u32: the total does.
        let n = more as u32;
        let permit = tokio::time::timeout(self.wait, self.permits.clone().acquire_many_owned(n))
            .await
            .map_err(|_| {
                tracing::warn!(bytes, what, "append refused: the memory budget stayed full");
                ApiError::Busy(format!(
                    "the server is busy with other appends (memory budget of {} bytes in use): \
                     try again later",
                    self.total_bytes()
                ))
            })?
            .map_err(|_| ApiError::Internal("the memory budget was closed".into()))?;
        match &mut r.permit {
            Some(p) => p.merge(permit),
            None => r.permit = Some(permit),
        }
        r.kib = after;
        Ok(())
    }
}

/// Memory held by one append; released when dropped.
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    permit: Option<OwnedSemaphorePermit>,
    kib: u64,
}

impl Reservation {
    /// Adds `bytes` (see [`MemoryBudget::grow`]).
    ///
    /// # Errors
    /// As [`MemoryBudget::grow`].
    pub async fn grow(&mut self, bytes: u64, what: &str) -> Result<(), ApiError> {
        let budget = self.budget.clone();
        budget.grow(self, bytes, what).await
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.kib * 1024
    }
}

/// The work budget of one append.
#[derive(Debug)]
pub struct WorkBudget {
    limit: u64,
    spent: u64,
}

impl WorkBudget {
    pub fn new(limit: u64) -> WorkBudget {
        WorkBudget { limit, spent: 0 }
    }

    /// Charges `bytes` of work for `what`, before it is done.
    ///
    /// # Errors
    /// 413 if the append's work would pass the budget (nothing is charged then).
    pub fn charge(&mut self, bytes: u64, what: &str) -> Result<(), ApiError> {
        let after = self.spent.saturating_add(bytes);
        if after > self.limit {
            return Err(ApiError::OverLimit(format!(
                "{what} would bring this append's work to {after} bytes, over the server's \
                 limit of {} bytes per append: send it in smaller steps",
                self.limit
            )));
        }
        self.spent = after;
        Ok(())
    }

    /// Work charged so far.
    pub fn spent(&self) -> u64 {
        self.spent
    }
}

/// What one append charges as it goes: its work and its memory.
pub struct Spend {
    pub work: WorkBudget,
    pub memory: Reservation,
}

impl Spend {
    /// Charges `work` bytes of work and reserves `memory` bytes for `what`.
    ///
    /// # Errors
    /// As [`WorkBudget::charge`] and [`MemoryBudget::grow`].
    pub async fn charge(&mut self, work: u64, memory: u64, what: &str) -> Result<(), ApiError> {
        self.work.charge(work, what)?;
        self.memory.grow(memory, what).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_is_shared_and_released() {
        let budget = Arc::new(MemoryBudget::new(4 << 20, Duration::from_millis(50)));
        let mut a = budget.reservation();
        a.grow(3 << 20, "a").await.expect("fits");
        assert_eq!(budget.available_bytes(), 1 << 20);
        let mut b = budget.reservation();
        let busy = b.grow(2 << 20, "b").await.expect_err("only 1 MiB left");
        assert!(matches!(busy, ApiError::Busy(_)), "{busy:?}");
        assert_eq!(busy.status().as_u16(), 503);
        let huge = b
            .grow(5 << 20, "c")
            .await
            .expect_err("over the whole budget");
        assert!(matches!(huge, ApiError::OverLimit(_)), "{huge:?}");
        assert_eq!(huge.status().as_u16(), 413);
        drop(a);
        b.grow(2 << 20, "b").await.expect("freed");
        b.grow(2 << 20, "b again")
            .await
            .expect("grows to the whole");
        assert_eq!(b.bytes(), 4 << 20);
        assert_eq!(budget.available_bytes(), 0);
        drop(b);
        assert_eq!(budget.available_bytes(), 4 << 20);
    }

    #[test]
    fn work_is_charged_before_it_is_done() {
        let mut w = WorkBudget::new(100);
        w.charge(60, "x").expect("fits");
        let e = w.charge(41, "a truncate to 101 bytes").expect_err("over");
        assert!(e.to_string().contains("a truncate to 101 bytes"), "{e}");
        assert_eq!(w.spent(), 60, "a refused charge is not counted");
        w.charge(40, "y").expect("exactly the limit");
    }
}
