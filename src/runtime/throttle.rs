//! Rate-limited repeated warnings: a storm of the same event (refused TLS
//! handshakes, accept failing with EMFILE, bad lines from a peer) logs its
//! first [`BURST`] occurrences per window, then one summary per
//! [`WINDOW`] ("… repeated 4123 times in the last 10 s") instead of one
//! line per event.
//!
//! Invariants:
//! - State is per call site (a `static` [`Throttle`] that the
//!   [`warn_throttled!`](crate::warn_throttled) macro declares), made of
//!   atomics only: any shard may hit the same site, no lock is taken and
//!   nothing is allocated on the event path.
//! - No count is lost: events suppressed in a window are summarised by the
//!   next event after the window ends, or by the flusher thread (started
//!   on the first suppression) within about one window after the storm
//!   stops, whichever comes first.
//!
//! Alternatives rejected: a `tracing` layer that deduplicates by message
//! (it would format every suppressed event and take a lock on a shared
//! map); a crate such as `governor` (a token bucket says when to log, but
//! not how many were dropped, which is the figure an operator needs).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

/// Occurrences logged in full per window.
pub const BURST: u64 = 3;
/// Length of a window; a storm prints at most one summary per window.
pub const WINDOW: Duration = Duration::from_secs(10);

/// One call site's counters.
pub struct Throttle {
    /// What the site logs (for the summary line).
    what: &'static str,
    /// Start of the current window, ms since [`epoch`].
    start: AtomicU64,
    /// Events seen in the current window.
    seen: AtomicU64,
    /// Events of the current window not logged.
    dropped: AtomicU64,
    registered: Once,
}

/// What a call site should do with one event.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `dropped` events were suppressed before it (in a window that
    /// lasted `over`), to be reported first when non-zero.
    Log {
        /// Events suppressed in the previous window.
        dropped: u64,
        /// How long that window lasted.
        over: Duration,
    },
    /// Do not log it (counted for the next summary).
    Drop,
}

fn epoch() -> Instant {
    static E: OnceLock<Instant> = OnceLock::new();
    *E.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    // +1: 0 means "no window started yet".
    epoch().elapsed().as_millis() as u64 + 1
}

impl Throttle {
    /// A site logging `what`.
    pub const fn new(what: &'static str) -> Throttle {
        Throttle {
            what,
            start: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            registered: Once::new(),
        }
    }

    /// Counts one event and says whether to log it.
    pub fn hit(&'static self) -> Verdict {
        self.hit_at(now_ms())
    }

    fn hit_at(&'static self, now: u64) -> Verdict {
        let start = self.start.load(Ordering::Relaxed);
        if (start == 0 || now.saturating_sub(start) >= WINDOW.as_millis() as u64)
            && self.start.compare_exchange(start, now, Ordering::AcqRel, Ordering::Relaxed).is_ok()
        {
            // This event opens a new window.
            self.seen.store(1, Ordering::Relaxed);
            let dropped = self.dropped.swap(0, Ordering::AcqRel);
            return Verdict::Log { dropped, over: Duration::from_millis(now.saturating_sub(start)) };
        }
        if self.seen.fetch_add(1, Ordering::Relaxed) < BURST {
            return Verdict::Log { dropped: 0, over: Duration::ZERO };
        }
        self.dropped.fetch_add(1, Ordering::Relaxed);
        self.registered.call_once(|| register(self));
        Verdict::Drop
    }

    /// Reports the suppressed events of a window that ended (the flusher).
    fn flush_at(&'static self, now: u64) {
        let start = self.start.load(Ordering::Relaxed);
        if self.dropped.load(Ordering::Relaxed) == 0 || now.saturating_sub(start) < WINDOW.as_millis() as u64 {
            return;
        }
        if self.start.compare_exchange(start, now, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            self.seen.store(0, Ordering::Relaxed);
            let n = self.dropped.swap(0, Ordering::AcqRel);
            summary(self.what, n, Duration::from_millis(now - start));
        }
    }
}

/// The summary line of `n` suppressed events.
pub fn summary(what: &str, n: u64, over: Duration) {
    if n > 0 {
        tracing::warn!(repeated = n, "{what}: repeated {n} more times in the last {} s", over.as_secs().max(1));
    }
}

fn register(t: &'static Throttle) {
    static SITES: Mutex<Vec<&'static Throttle>> = Mutex::new(Vec::new());
    static FLUSHER: Once = Once::new();
    SITES.lock().unwrap_or_else(|e| e.into_inner()).push(t);
    FLUSHER.call_once(|| {
        let _ = std::thread::Builder::new().name("log-throttle".into()).spawn(|| loop {
            std::thread::sleep(WINDOW / 4);
            let sites: Vec<_> = SITES.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let now = now_ms();
            for s in sites {
                s.flush_at(now);
            }
        });
    });
}

/// `tracing::warn!` through a per-call-site [`Throttle`]:
/// `warn_throttled!("what", field = value, ...; "message")`. The first
/// argument names the site in the summary line.
#[macro_export]
macro_rules! warn_throttled {
    ($what:literal, $($arg:tt)+) => {{
        static SITE: $crate::runtime::throttle::Throttle = $crate::runtime::throttle::Throttle::new($what);
        if let $crate::runtime::throttle::Verdict::Log { dropped, over } = SITE.hit() {
            $crate::runtime::throttle::summary($what, dropped, over);
            tracing::warn!($($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storm_logs_a_burst_then_one_summary_per_window() {
        static T: Throttle = Throttle::new("t");
        let w = WINDOW.as_millis() as u64;
        let logged = (0..10_000).filter(|i| T.hit_at(100 + i / 100) != Verdict::Drop).count();
        assert_eq!(logged as u64, BURST, "{logged} logged in one window");
        // The first event of the next window carries the count of the last.
        assert_eq!(T.hit_at(100 + w), Verdict::Log { dropped: 10_000 - BURST, over: Duration::from_millis(w) });
        // The flusher reports a window that ended with no event after it.
        for _ in 0..50 {
            T.hit_at(200 + w);
        }
        assert_eq!(T.dropped.load(Ordering::Relaxed), 50 - (BURST - 1));
        T.flush_at(100 + w + w / 2);
        assert_eq!(T.dropped.load(Ordering::Relaxed), 50 - (BURST - 1), "flushed before the window ended");
        T.flush_at(100 + 2 * w);
        assert_eq!(T.dropped.load(Ordering::Relaxed), 0);
    }
}
