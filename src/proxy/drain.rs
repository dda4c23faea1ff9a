//! The drain protocol's process-wide state: a proxy that is asked to go
//! (SIGTERM, `ringpeer proxy … drain`, or a successor taking over its
//! listeners) moves through [`Phase`]s, and each shard acts on the phase it
//! finds when [`Drain::begun`] fires.
//!
//! - **Running.** Serving.
//! - **Marked** (SIGTERM). The backend record carries the draining mark, so
//!   peers send new dials to other holders first. Still serving, and
//!   waiting up to `handover_wait_ms` for a successor.
//! - **Successor** (restart or upgrade in place). Another process holds the
//!   same listening sockets and owns the proxy id in the backend. This one
//!   stops accepting, sends GOAWAY to clients and peers, tells each agent to
//!   open its replacement tunnel at the same address, and keeps its open
//!   streams until they end or `drain_timeout_ms` passes.
//! - **Leaving** (decommission, or no successor came). Agents are told to
//!   move to other proxies (they open the new tunnel before closing this
//!   one); clients get GOAWAY; peer links stay served until the agents have
//!   moved, since peers reach the agents through them meanwhile.
//!
//! Invariants: phases only move forward (Running → Marked → Successor or
//! Leaving), so a late SIGTERM never undoes a handover; `begun` fires once,
//! after the phase it announces is set. The state is two atomics and two
//! [`Shutdown`] signals: shards read it once per drain, never per dial.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::runtime::Shutdown;

use super::control::Commands;

/// Where a proxy is in its drain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Serving.
    Running = 0,
    /// Asked to go; draining mark written; waiting for a successor.
    Marked = 1,
    /// A successor took over the listeners and the proxy id.
    Successor = 2,
    /// Leaving the fleet: agents move to other proxies.
    Leaving = 3,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            1 => Phase::Marked,
            2 => Phase::Successor,
            3 => Phase::Leaving,
            _ => Phase::Running,
        }
    }
}

#[derive(Default)]
struct Inner {
    phase: AtomicU8,
    /// Fires on SIGTERM (or a leave request).
    requested: Shutdown,
    /// Fires when the phase becomes Successor or Leaving.
    begun: Shutdown,
}

/// The drain state shared by the signal handler, the upgrade socket, the
/// coordinator thread and the shards.
#[derive(Clone, Default)]
pub struct Drain(Arc<Inner>);

impl Drain {
    /// A proxy that is running.
    pub fn new() -> Drain {
        Drain::default()
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.0.phase.load(Ordering::Acquire))
    }

    fn advance(&self, from: &[Phase], to: Phase) -> bool {
        let mut cur = self.0.phase.load(Ordering::Acquire);
        loop {
            if !from.contains(&Phase::from_u8(cur)) {
                return false;
            }
            match self.0.phase.compare_exchange(cur, to as u8, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// SIGTERM: start draining (mark, wait for a successor, else leave).
    /// False when a drain is already under way.
    pub fn request(&self) -> bool {
        let ok = self.advance(&[Phase::Running], Phase::Marked);
        self.0.requested.trigger();
        ok
    }

    /// Leave the fleet now (`ringpeer proxy … drain`); false when a
    /// successor already took over or the proxy is already leaving.
    pub fn leave(&self) -> bool {
        let ok = self.advance(&[Phase::Running, Phase::Marked], Phase::Leaving);
        self.0.requested.trigger();
        if ok {
            self.0.begun.trigger();
        }
        ok
    }

    /// Whether a successor may take over now (no other handover, not
    /// leaving).
    pub fn can_hand_over(&self) -> bool {
        matches!(self.phase(), Phase::Running | Phase::Marked)
    }

    /// A successor holds the listeners: drain in place.
    pub fn handed_over(&self) -> bool {
        let ok = self.advance(&[Phase::Running, Phase::Marked], Phase::Successor);
        self.0.requested.trigger();
        if ok {
            self.0.begun.trigger();
        }
        ok
    }

    /// Fires when shards must act (phase Successor or Leaving).
    pub fn begun(&self) -> &Shutdown {
        &self.0.begun
    }

    /// Fires on the first request of any kind.
    pub fn requested(&self) -> &Shutdown {
        &self.0.requested
    }
}

/// The coordinator: on a drain request, writes the draining mark, waits up
/// to `handover_wait` for a successor, and otherwise leaves the fleet.
/// Runs on its own thread until `stop` fires.
pub fn coordinate(drain: Drain, commands: Commands, handover_wait: Duration, stop: Shutdown) {
    loop {
        if stop.is_triggered() {
            return;
        }
        if drain.requested().wait_blocking_for(Duration::from_millis(200)) {
            break;
        }
    }
    // Either phase may have been reached directly (a handover, `drain`).
    if drain.phase() != Phase::Successor {
        commands.mark(true);
    }
    if drain.phase() == Phase::Marked {
        tracing::info!(wait = ?handover_wait, "draining: waiting for a successor to take over the listeners");
        if !drain.begun().wait_blocking_for(handover_wait) && drain.leave() {
            tracing::info!("no successor took over; leaving the fleet");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_only_move_forward() {
        let d = Drain::new();
        assert!(d.can_hand_over() && !d.begun().is_triggered());
        assert!(d.request(), "SIGTERM marks");
        assert!(!d.request(), "a second request changes nothing");
        assert_eq!(d.phase(), Phase::Marked);
        assert!(!d.begun().is_triggered(), "marked: still serving, waiting for a successor");
        assert!(d.handed_over());
        assert!(d.begun().is_triggered());
        assert!(!d.leave() && !d.handed_over(), "after a handover nothing else takes");
        assert_eq!(d.phase(), Phase::Successor);
        let d = Drain::new();
        assert!(d.leave());
        assert!(!d.can_hand_over() && !d.handed_over(), "a leaving proxy hands nothing over");
        assert_eq!(d.phase(), Phase::Leaving);
    }
}
