//! What the control thread says about itself: the health verdict that
//! `/readyz` answers and the log repeats, and the rate-limited line that
//! names bad backend data.
//!
//! Invariants: the verdict is a pure function of [`Health`]; the same bad
//! keys are reported at most once per [`BAD_DATA_LOG_EVERY`] (again at once
//! when the set changes), so garbage in the backend never floods the log.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Whether this proxy has its routes from the backend and keeps them
/// current, and why not: what `/readyz` answers and the log says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// The backend description (`redis redis://…`, `memory`).
    pub backend: String,
    /// A full load has completed since the last outage began (or ever).
    pub synced: bool,
    /// Whether a full load ever completed.
    pub ever_synced: bool,
    /// Why the backend reader cannot load or follow the routes.
    pub reader_error: Option<String>,
    /// Why writes (registration, heartbeats, routes) fail.
    pub writer_error: Option<String>,
    /// Keys the last full load skipped as bad data.
    pub skipped: usize,
    /// Version of the latest published snapshot.
    pub version: u64,
    /// When the reader last heard from the backend (a full load or a batch
    /// of events): the `ringpeer_route_sync_age_seconds` gauge.
    pub last_sync: Option<Instant>,
}

impl Health {
    /// Healthy (routes loaded, backend reachable both ways), and a one-line
    /// reason either way.
    pub fn verdict(&self) -> (bool, String) {
        let b = &self.backend;
        if let Some(e) = &self.reader_error {
            let what = if self.ever_synced {
                "serving the last snapshot"
            } else {
                "no routes loaded yet: every dial to another proxy's agent fails"
            };
            return (false, format!("route backend {b} unreachable ({what}): {e}"));
        }
        if !self.synced {
            return (false, format!("not yet synced with route backend {b}"));
        }
        if let Some(e) = &self.writer_error {
            return (false, format!("route backend {b} refuses writes (heartbeats and routes not published): {e}"));
        }
        let bad = if self.skipped > 0 { format!("; {} bad keys skipped", self.skipped) } else { String::new() };
        (true, format!("ok: synced with {b}, routes version {}{bad}", self.version))
    }
}

/// The latest [`Health`], readable off the hot path.
pub type HealthCell = Arc<Mutex<Health>>;

/// How often the same bad backend data is reported again.
pub const BAD_DATA_LOG_EVERY: Duration = Duration::from_secs(300);

/// The rate limit of the bad-data log line.
#[derive(Default)]
pub(super) struct BadDataLog {
    keys: Vec<String>,
    at: Option<Instant>,
    events: u64,
}

impl BadDataLog {
    /// Reports the keys a full load skipped, when they are news.
    pub(super) fn loaded(&mut self, skipped: &[(String, crate::route::model::BadValue)], now: Instant) {
        let keys: Vec<String> = skipped.iter().map(|(k, _)| k.clone()).collect();
        let stale = self.at.is_none_or(|t| now.duration_since(t) >= BAD_DATA_LOG_EVERY);
        if !keys.is_empty() && (keys != self.keys || stale) {
            let (key, e) = &skipped[0];
            tracing::error!(
                count = keys.len(),
                first = key,
                error = %e,
                keys = ?keys.iter().take(8).collect::<Vec<_>>(),
                "skipping backend values that do not decode or have the wrong type; sync goes on"
            );
            self.at = Some(now);
        }
        self.keys = keys;
    }

    /// Reports an undecodable event, at most once per period.
    pub(super) fn event(&mut self, id: &dyn std::fmt::Display, e: &crate::route::model::BadValue, now: Instant) {
        self.events += 1;
        if self.at.is_none_or(|t| now.duration_since(t) >= BAD_DATA_LOG_EVERY) {
            tracing::error!(id = %id, error = %e, skipped_so_far = self.events, "skipping route events that do not decode");
            self.at = Some(now);
        }
    }
}
