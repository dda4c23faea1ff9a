//! Ping keepalive and the link health it publishes.
//!
//! Every HTTP/2 connection pings its peer `keepalive_interval_ms` after the
//! last answer. A ping unanswered for `keepalive_miss_ms` marks the link
//! suspect in its [`LinkHealth`]: whoever picks links for new work (peer
//! links, the proxy's local tunnels, the agent's tunnel set) skips it at
//! once, while streams already on it go on. The answer clears the mark. A
//! ping unanswered for `keepalive_timeout_ms` ends the connection.
//!
//! Invariants: one ping in flight per connection (h2 allows one user ping
//! at a time); the flag is shard-local (`Rc<Cell>`), read without a lock or
//! an await; the keepalive is its only writer.
//!
//! Rejected: ending the connection after one missed ping (a slow but live
//! peer, whose answer queues behind megabytes of DATA, would lose every open
//! stream); measuring from the last frame received (h2 does not expose it,
//! and an idle link receives nothing to measure).

use std::cell::Cell;
use std::future::poll_fn;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::future::or;
use h2::{Ping, PingPong};

use super::h2conf::H2Tuning;

/// Whether a connection's last ping went unanswered for longer than
/// `keepalive_miss_ms`. Clones share the flag.
#[derive(Clone, Debug, Default)]
pub struct LinkHealth(Rc<Cell<Option<Instant>>>);

impl LinkHealth {
    /// A healthy link.
    pub fn new() -> LinkHealth {
        LinkHealth::default()
    }

    /// Whether new work should avoid this link.
    pub fn is_suspect(&self) -> bool {
        self.0.get().is_some()
    }

    /// Since when the link is suspect.
    pub fn suspect_since(&self) -> Option<Instant> {
        self.0.get()
    }

    /// Sets or clears the mark. The keepalive is its only writer in the
    /// product; public so tests can play a missed ping.
    pub fn mark(&self, suspect: bool) {
        match (suspect, self.0.get()) {
            (true, None) => self.0.set(Some(Instant::now())),
            (false, Some(_)) => self.0.set(None),
            _ => {}
        }
    }
}

/// Sends a ping every `keepalive_interval_ms`, keeps `health` up to date,
/// and resolves (with a static reason) only when the peer stops answering.
pub(super) async fn keepalive(pp: Option<PingPong>, t: &H2Tuning, health: &LinkHealth) -> &'static str {
    let Some(mut pp) = pp else { return std::future::pending().await };
    let miss = Duration::from_millis(t.keepalive_miss_ms);
    let give_up = Duration::from_millis(t.keepalive_timeout_ms);
    loop {
        glommio::timer::sleep(Duration::from_millis(t.keepalive_interval_ms)).await;
        if pp.send_ping(Ping::opaque()).is_err() {
            return "keepalive_send_failed";
        }
        let sent = Instant::now();
        let answered = {
            let pong = poll_fn(|cx| pp.poll_pong(cx));
            let late = async {
                glommio::timer::sleep(miss).await;
                health.mark(true);
                tracing::warn!(after_ms = t.keepalive_miss_ms, "keepalive ping unanswered; link suspect");
                glommio::timer::sleep(give_up.saturating_sub(miss)).await;
                Err(())
            };
            or(async { Ok(pong.await) }, late).await
        };
        match answered {
            Ok(Ok(_)) => {
                if health.is_suspect() {
                    tracing::info!(
                        after_ms = sent.elapsed().as_millis() as u64,
                        "keepalive answered; link healthy again"
                    );
                }
                health.mark(false);
            }
            Ok(Err(_)) => return "keepalive_failed",
            Err(()) => return "keepalive_timeout",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_is_shared_and_remembers_since_when() {
        let h = LinkHealth::new();
        let seen = h.clone();
        assert!(!seen.is_suspect());
        h.mark(true);
        let since = seen.suspect_since().unwrap();
        h.mark(true);
        assert_eq!(seen.suspect_since(), Some(since), "a second miss keeps the first instant");
        h.mark(false);
        assert!(!seen.is_suspect());
    }
}
