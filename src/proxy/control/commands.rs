//! The drain protocol's commands to the control thread: the draining mark,
//! retiring the backend writer when a successor owns the proxy id, and
//! resuming it when a handover failed.
//!
//! Invariants: commands travel on their own bounded channel, so a burst of
//! tunnel events never delays a retirement; [`Commands::retire`] returns
//! only once the thread has stopped writing (or says it did not in time).

use std::time::Duration;

use crossbeam::channel::Sender;

/// What the drain protocol asks of the control thread (`proxy::drain`).
pub enum Command {
    /// Write (true) or clear the draining mark on this proxy's record.
    Mark(bool),
    /// Stop writing to the backend for good: a successor with the same id
    /// owns this proxy's record and routes from now on. Answered once the
    /// thread has stopped (so nothing this process writes can land after
    /// the successor's first write).
    Retire(Sender<()>),
    /// The handover failed: write again, republishing everything.
    Resume,
}

/// A clonable handle to send [`Command`]s.
#[derive(Clone)]
pub struct Commands(pub(super) Sender<Command>);

impl Commands {
    /// Sets or clears the draining mark.
    pub fn mark(&self, draining: bool) {
        let _ = self.0.send(Command::Mark(draining));
    }

    /// Retires the writer; false when the thread did not confirm in time.
    pub fn retire(&self, within: Duration) -> bool {
        let (tx, rx) = crossbeam::channel::bounded(1);
        self.0.send(Command::Retire(tx)).is_ok() && rx.recv_timeout(within).is_ok()
    }

    /// Undoes [`Commands::retire`].
    pub fn resume(&self) {
        let _ = self.0.send(Command::Resume);
    }
}
