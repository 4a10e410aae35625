//! Byte budgets for what served pipes hold in memory: request bodies being read or handled, and
//! answers not yet written (see `pipe::serve`).
//!
//! Two levels: each pipe has its own budget, reserved before a body is read (a pipe waits for
//! its own room, so one pipe cannot take another's), and each protocol of a server has one shared
//! by all its pipes, charged as bytes arrive and answers are made, which gates admission: no
//! pipe starts reading a new request while the protocol holds its whole budget. The protocol's
//! count may pass its limit by what pipes had already admitted; it never waits on another pipe,
//! so no two pipes can wait on each other.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// Bytes held against a limit, with a way to wait for room.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: usize,
    used: AtomicUsize,
    freed: Notify,
}

impl MemoryBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(MemoryBudget { limit, used: AtomicUsize::new(0), freed: Notify::new() })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Bytes that may still be taken before the limit.
    pub fn free(&self) -> usize {
        self.limit.saturating_sub(self.used())
    }

    /// Waits until less than the whole budget is held.
    pub async fn wait_below_limit(&self) {
        self.wait_until(|used| used < self.limit).await;
    }

    /// Takes `bytes`, waiting until they fit (or until nothing is held, so that a request as
    /// large as the whole budget still goes through, alone).
    pub async fn reserve(&self, bytes: usize) {
        loop {
            self.wait_until(|used| used == 0 || used + bytes <= self.limit).await;
            let fits = self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used == 0 || used + bytes <= self.limit).then_some(used + bytes)
            });
            if fits.is_ok() {
                return;
            }
        }
    }

    /// Takes `bytes` now, past the limit if need be.
    pub fn charge(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Gives `bytes` back.
    pub fn release(&self, bytes: usize) {
        if bytes > 0 {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
            self.freed.notify_waiters();
        }
    }

    async fn wait_until(&self, ok: impl Fn(usize) -> bool) {
        loop {
            // Registered before the check, so a release between the two still wakes us.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if ok(self.used()) {
                return;
            }
            freed.await;
        }
    }
}

/// Bytes taken from a pipe's budget and its protocol's, given back to both when dropped.
#[derive(Debug)]
pub struct Held {
    pipe: Arc<MemoryBudget>,
    protocol: Arc<MemoryBudget>,
    pipe_bytes: usize,
    protocol_bytes: usize,
}

impl Held {
    /// Nothing held yet.
    pub fn none(pipe: &Arc<MemoryBudget>, protocol: &Arc<MemoryBudget>) -> Self {
        Held { pipe: Arc::clone(pipe), protocol: Arc::clone(protocol), pipe_bytes: 0, protocol_bytes: 0 }
    }

    /// Takes `bytes` more of the pipe's budget, waiting for its room.
    pub async fn reserve_pipe(&mut self, bytes: usize) {
        self.pipe.reserve(bytes).await;
        self.pipe_bytes += bytes;
    }

    /// Takes `bytes` more of the protocol's budget, now (it only gates admission).
    pub fn charge_protocol(&mut self, bytes: usize) {
        self.protocol.charge(bytes);
        self.protocol_bytes += bytes;
    }

    /// Holds `bytes` of both instead of what it held, now.
    pub fn resize(&mut self, bytes: usize) {
        fn to(budget: &MemoryBudget, held: &mut usize, bytes: usize) {
            if bytes > *held {
                budget.charge(bytes - *held);
            } else {
                budget.release(*held - bytes);
            }
            *held = bytes;
        }
        to(&self.pipe, &mut self.pipe_bytes, bytes);
        to(&self.protocol, &mut self.protocol_bytes, bytes);
    }

    /// What both budgets still have room for.
    pub fn room(&self) -> usize {
        self.pipe.free().min(self.protocol.free())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.resize(0);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_pipe_waits_for_its_own_room_and_the_protocol_gates_admission() {
        let (pipe, protocol) = (MemoryBudget::new(100), MemoryBudget::new(150));
        let mut first = Held::none(&pipe, &protocol);
        first.reserve_pipe(80).await;
        first.charge_protocol(80);
        // Alone, a reservation larger than the budget goes through.
        let other_pipe = MemoryBudget::new(10);
        let mut big = Held::none(&other_pipe, &protocol);
        big.reserve_pipe(50).await;
        big.charge_protocol(50);
        assert_eq!((protocol.used(), first.room()), (130, 20));

        // 30 more do not fit the first pipe's 100: it waits until 80 are given back.
        let mut second = Held::none(&pipe, &protocol);
        let waiting = tokio::time::timeout(Duration::from_millis(50), second.reserve_pipe(30)).await;
        assert!(waiting.is_err(), "waits for room");
        drop(first);
        second.reserve_pipe(30).await;
        second.charge_protocol(30);
        assert_eq!((pipe.used(), protocol.used()), (30, 80));

        // Answers are charged at once, past the limit; admission then waits.
        second.resize(130);
        assert!(tokio::time::timeout(Duration::from_millis(50), protocol.wait_below_limit()).await.is_err());
        second.resize(10);
        protocol.wait_below_limit().await;
        drop((second, big));
        assert_eq!((pipe.used(), protocol.used(), other_pipe.used()), (0, 0, 0));
    }
}
