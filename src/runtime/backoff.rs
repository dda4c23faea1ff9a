//! Capped, jittered exponential backoff for reconnect loops.
//!
//! Invariant: delays grow by 2x from `base` up to `cap`, each drawn
//! uniformly from the upper half of the current step, so a fleet that lost
//! a proxy at once does not reconnect in lockstep.

use std::time::Duration;

use rand::Rng;

/// Backoff state.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    step: u32,
}

impl Backoff {
    /// Starts at `base`, never exceeds `cap`.
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff { base, cap, step: 0 }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let full = self.base.saturating_mul(1 << self.step.min(16)).min(self.cap);
        self.step = self.step.saturating_add(1);
        let half = full / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=half)
    }

    /// Back to `base` (after a connection that lasted).
    pub fn reset(&mut self) {
        self.step = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_jittered_and_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let d: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d.iter().all(|x| *x <= Duration::from_secs(2)));
        assert!(d[9] >= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
