//! Connection receive windows that grow with the streams that may hold
//! them, within the shard's buffer budget.
//!
//! The relay returns a chunk's credit only once it was handed on (the one
//! credit rule, `relay::grpc`), and h2 returns stream and connection credit
//! together. So a stream whose reader stalls holds up to its stream window
//! of the connection's shared window: on a multiplexed link (a tunnel, a
//! peer link) about `connection_window / stream_window` stalled streams
//! (8 by default) would leave no credit for anybody else's data, and new
//! dials on the link would pass their deadline.
//!
//! Invariants:
//! - Every connection keeps its configured `connection_window` free beyond
//!   what its streams may hold: the target window is `base + grant`, where
//!   `grant` bounds what the open streams can hold (each at most the stream
//!   window it was given), as far as the shard's pool allows.
//! - The grants of a shard's connections add up to at most a quarter of
//!   `shard_buffer_bytes`, and with the bytes the relay holds to at most
//!   half of it ([`BufMeter::window_room`]): memory stays bounded by the
//!   connections' base windows plus a share of the buffer budget.
//! - When the pool cannot cover every open stream's full window, the stream
//!   window (SETTINGS_INITIAL_WINDOW_SIZE) of that connection is lowered to
//!   its share (a power of two, at least [`MIN_STREAM_WINDOW`]), so the
//!   remaining pool takes many more stalled streams; it is restored when the
//!   pool has room again. A lowered window applies to the open streams too
//!   (RFC 9113 §6.9.2), but data they already hold stays counted: streams
//!   open when the window was lowered are assumed to hold a full one.
//! - Checked every [`TICK`] by the connection's driver, never per frame.
//!   The tick must stay short even on an idle connection: a burst of
//!   streams opened between two ticks each gets the full stream window
//!   before the window can be lowered (tried: a 1 s tick while idle let
//!   200 streams opened at once hold the whole window, and new dials on the
//!   tunnel timed out). Cost: 20 timer wake-ups a second per connection.
//!
//! Rejected: a 2 GiB connection window (unblocks, but the window is also
//! what bounds memory: an agent reached 908 MiB RSS); growing the window by
//! the shard meter's held bytes (the meter sees only chunks the relay has
//! taken, not what h2 buffers for a stalled stream, up to 4 MiB each, so it
//! grew 64 KiB per stalled stream that took 4 MiB); an exact per-connection
//! held count (h2 keeps it, `in_flight_data`, but does not expose it);
//! re-computing on every stream open and close (the client side has no such
//! event, and a 50 ms tick is one timer per connection).

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::runtime::budget::BufMeter;

/// How often a connection's windows are re-computed.
pub const TICK: Duration = Duration::from_millis(50);

/// The least stream window a crowded connection lowers its streams to.
pub const MIN_STREAM_WINDOW: u32 = 64 << 10;

/// HTTP/2's largest window (2^31 - 1).
const MAX_WINDOW: usize = i32::MAX as usize;

/// What the driver is to apply to its h2 connection.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// A new connection target window (`set_target_window_size`).
    pub target: Option<u32>,
    /// A new stream window (`set_initial_window_size`).
    pub stream: Option<u32>,
}

/// One connection's share of the shard's window pool.
pub struct ConnWindow {
    meter: BufMeter,
    base: usize,
    full: u32,
    /// The stream window in force (or asked for).
    level: u32,
    /// Streams open when the window was last lowered: each may hold `full`.
    old: usize,
    grant: usize,
    target: usize,
}

impl ConnWindow {
    /// A connection with `base` connection window and `stream` stream
    /// window (the `[h2]` settings), drawing on `meter`'s pool.
    pub fn new(meter: &BufMeter, base: u32, stream: u32) -> ConnWindow {
        let base = base as usize;
        ConnWindow { meter: meter.clone(), base, full: stream, level: stream, old: 0, grant: 0, target: base }
    }

    /// Re-computes the windows for `open` streams; returns what changed.
    pub fn tick(&mut self, open: usize) -> Plan {
        let mut plan = Plan::default();
        let room = self.meter.window_room(self.grant);
        let share = room / open.max(1);
        let level = if share >= self.full as usize {
            self.full
        } else {
            let p2 = if share == 0 { 0 } else { 1usize << (usize::BITS - 1 - share.leading_zeros()) };
            (p2 as u32).clamp(MIN_STREAM_WINDOW.min(self.full), self.full)
        };
        if level != self.level {
            if level < self.level {
                self.old = open;
            }
            self.level = level;
            plan.stream = Some(level);
        }
        if self.level == self.full {
            self.old = 0;
        }
        self.old = self.old.min(open);
        let want = self.old.saturating_mul(self.full as usize) + (open - self.old).saturating_mul(self.level as usize);
        let grant = want.min(room).min(MAX_WINDOW - self.base);
        self.meter.regrant_window(self.grant, grant);
        self.grant = grant;
        if self.base + grant != self.target {
            self.target = self.base + grant;
            plan.target = Some(self.target as u32);
        }
        plan
    }

    /// The stream window could not be sent (a previous SETTINGS is not yet
    /// acknowledged): the next tick tries again.
    pub fn stream_not_sent(&mut self, was: u32) {
        self.level = was;
    }

    /// The stream window in force.
    pub fn level(&self) -> u32 {
        self.level
    }
}

impl Drop for ConnWindow {
    fn drop(&mut self) {
        self.meter.regrant_window(self.grant, 0);
    }
}

/// An h2 connection whose receive windows can be changed.
pub(super) trait Windows {
    fn target(&mut self, size: u32);
    fn stream(&mut self, size: u32) -> Result<(), h2::Error>;
}

impl<T: AsyncRead + AsyncWrite + Unpin> Windows for h2::server::Connection<T, Bytes> {
    fn target(&mut self, size: u32) {
        self.set_target_window_size(size)
    }
    fn stream(&mut self, size: u32) -> Result<(), h2::Error> {
        self.set_initial_window_size(size)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Windows for h2::client::Connection<T, Bytes> {
    fn target(&mut self, size: u32) {
        self.set_target_window_size(size)
    }
    fn stream(&mut self, size: u32) -> Result<(), h2::Error> {
        self.set_initial_window_size(size)
    }
}

/// One window tick: re-computes `w` for `open` streams and applies it.
pub(super) fn apply(w: &mut ConnWindow, open: usize, conn: &mut impl Windows) {
    let was = w.level();
    let plan = w.tick(open);
    if plan != Plan::default() {
        tracing::debug!(open, stream = ?plan.stream, target = ?plan.target, "receive windows changed");
    }
    if let Some(size) = plan.stream {
        if let Err(e) = conn.stream(size) {
            tracing::debug!(error = %e, "stream window not changed yet");
            w.stream_not_sent(was);
        }
    }
    if let Some(size) = plan.target {
        conn.target(size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn a_few_streams_get_their_full_windows_on_top_of_the_base() {
        let m = BufMeter::new(256 * MIB);
        let mut w = ConnWindow::new(&m, 32 << 20, 4 << 20);
        assert_eq!(w.tick(0), Plan::default());
        assert_eq!(w.tick(10), Plan { target: Some((32 + 40) << 20), stream: None });
        assert_eq!(m.windows(), 40 * MIB);
        assert_eq!(w.tick(10), Plan::default(), "nothing changed, nothing sent");
        drop(w);
        assert_eq!(m.windows(), 0, "the grant goes back to the pool");
    }

    #[test]
    fn past_the_pool_the_stream_window_shrinks_and_old_streams_keep_their_share() {
        let m = BufMeter::new(256 * MIB);
        let mut w = ConnWindow::new(&m, 32 << 20, 4 << 20);
        // 200 streams at 4 MiB would want 800 MiB; the pool has 64 MiB
        // (half the soft level): 327 KiB each, lowered to 256 KiB, and the
        // connection gets all of the pool (the 200 open ones may hold 4 MiB
        // each).
        let p = w.tick(200);
        assert_eq!(p, Plan { target: Some((32 + 64) << 20), stream: Some(256 << 10) });
        // Another connection now gets nothing beyond its base, and at
        // least the least stream window.
        let mut other = ConnWindow::new(&m, 32 << 20, 4 << 20);
        assert_eq!(other.tick(5), Plan { target: None, stream: Some(MIN_STREAM_WINDOW) });
        drop(other);
        // The stalled streams end: the full window comes back.
        assert_eq!(w.tick(3), Plan { target: Some((32 + 12) << 20), stream: Some(4 << 20) });
        assert_eq!(m.windows(), 12 * MIB);
    }
}
