//! Credit-based flow control shared by the agent and the client.
//!
//! A sender owns a [`SendWindow`]: it takes credit before sending bytes and the peer's
//! `Credit` messages give credit back. A receiver owns a [`RecvBudget`]: it checks that
//! the peer never sends more than it was granted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::protocol::INITIAL_WINDOW;

#[derive(Debug)]
struct WindowState {
    available: u64,
    closed: bool,
}

/// Credit available for sending on one stream. One task takes, any task grants.
#[derive(Debug)]
pub struct SendWindow {
    state: Mutex<WindowState>,
    notify: Notify,
}

impl Default for SendWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl SendWindow {
    /// A window holding [`INITIAL_WINDOW`] bytes of credit.
    pub fn new() -> Self {
        Self {
            state: Mutex::new(WindowState {
                available: u64::from(INITIAL_WINDOW),
                closed: false,
            }),
            notify: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WindowState> {
        // The state is two plain fields that no code path leaves inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for credit and takes between 1 and `max` bytes of it. Returns `None` once
    /// the window is closed.
    pub async fn take(&self, max: usize) -> Option<usize> {
        loop {
            {
                let mut state = self.lock();
                if state.closed {
                    return None;
                }
                if state.available > 0 {
                    let n = state.available.min(max as u64);
                    state.available -= n;
                    // n <= max, so it fits in usize.
                    return Some(n as usize);
                }
            }
            self.notify.notified().await;
        }
    }

    /// Returns `bytes` of credit (from the peer, or taken but not used).
    pub fn grant(&self, bytes: u64) {
        let mut state = self.lock();
        state.available = state.available.saturating_add(bytes);
        drop(state);
        self.notify.notify_one();
    }

    /// Wakes the taker for good: `take` returns `None` from now on.
    pub fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_one();
    }
}

/// Bytes the peer may still send on one stream before it has to wait for credit.
#[derive(Debug)]
pub struct RecvBudget(AtomicU64);

impl Default for RecvBudget {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBudget {
    /// A budget of [`INITIAL_WINDOW`] bytes.
    pub fn new() -> Self {
        Self(AtomicU64::new(u64::from(INITIAL_WINDOW)))
    }

    /// Accounts for `bytes` received; `false` if the peer exceeded its credit.
    pub fn consume(&self, bytes: usize) -> bool {
        let bytes = bytes as u64;
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(bytes)
            })
            .is_ok()
    }

    /// Accounts for `bytes` of credit granted to the peer.
    pub fn replenish(&self, bytes: u32) {
        self.0.fetch_add(u64::from(bytes), Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn take_waits_for_grant() {
        let window = Arc::new(SendWindow::new());
        assert_eq!(window.take(usize::MAX).await, Some(INITIAL_WINDOW as usize));
        let w = window.clone();
        let taker = tokio::spawn(async move { w.take(10).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!taker.is_finished());
        window.grant(4);
        assert_eq!(taker.await.unwrap(), Some(4));
        window.close();
        assert_eq!(window.take(1).await, None);
    }

    #[test]
    fn budget_rejects_overrun() {
        let budget = RecvBudget::new();
        assert!(budget.consume(INITIAL_WINDOW as usize));
        assert!(!budget.consume(1));
        budget.replenish(5);
        assert!(budget.consume(5));
        assert!(!budget.consume(1));
    }
}
