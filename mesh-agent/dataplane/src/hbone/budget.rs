//! The receive-window budget of a process's HBONE connections, server and client. A peer may
//! send a connection as many bytes as its receive window allows before anything reads them, and
//! a hostile one (or one whose app stops reading, or a client pod that never reads the answers
//! it asked for) leaves them there: the windows are memory the process holds for its peers. Each connection starts with HTTP/2's smallest window
//! ([`BASE_CONNECTION_WINDOW`], 64 KiB) and grows to [`super::CONNECTION_WINDOW`] only with a
//! grant from the budget, returned when the connection closes; past the budget, new connections
//! keep the small window (slower, never refused). What the connections hold together is at most
//! the budget and 64 KiB a connection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The window every HBONE connection starts with: HTTP/2's initial 65,535 bytes.
pub const BASE_CONNECTION_WINDOW: u32 = 65_535;

/// The default budget: 64 MiB, four connections at the full window.
pub const DEFAULT_WINDOW_BUDGET: usize = 64 << 20;

/// Describes the budget's gauge and sets it to zero (a scrape lists it before any grant).
pub fn describe_metrics() {
    metrics::describe_gauge!(
        "ferrymesh_hbone_window_granted_bytes",
        "HBONE receive window granted to connections (inbound, and the process's own client connections) beyond their 64 KiB base (--hbone-window-budget)."
    );
    metrics::gauge!("ferrymesh_hbone_window_granted_bytes").set(0.0);
}

/// Bytes of connection window the process may grant beyond the base windows.
#[derive(Debug)]
pub struct WindowBudget {
    limit: usize,
    granted: AtomicUsize,
}

/// One connection's grant, returned to the budget when dropped.
#[derive(Debug)]
pub struct WindowGrant {
    budget: Arc<WindowBudget>,
    bytes: usize,
}

impl WindowBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { limit, granted: AtomicUsize::new(0) })
    }

    /// `bytes` more window for one connection, if the budget has them.
    pub fn take(self: &Arc<Self>, bytes: usize) -> Option<WindowGrant> {
        self.granted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |granted| {
                granted.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .ok()?;
        metrics::gauge!("ferrymesh_hbone_window_granted_bytes").increment(bytes as f64);
        Some(WindowGrant { budget: self.clone(), bytes })
    }

    /// Bytes granted now.
    pub fn granted(&self) -> usize {
        self.granted.load(Ordering::Acquire)
    }
}

impl Drop for WindowGrant {
    fn drop(&mut self) {
        self.budget.granted.fetch_sub(self.bytes, Ordering::AcqRel);
        metrics::gauge!("ferrymesh_hbone_window_granted_bytes").decrement(self.bytes as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_stop_at_the_budget_and_come_back_when_dropped() {
        let budget = WindowBudget::new(40);
        let (a, b) = (budget.take(16).unwrap(), budget.take(16).unwrap());
        assert!(budget.take(16).is_none(), "48 is past 40");
        assert_eq!(budget.granted(), 32);
        drop(a);
        let c = budget.take(16).expect("a dropped grant came back");
        drop((b, c));
        assert_eq!(budget.granted(), 0);
    }
}
